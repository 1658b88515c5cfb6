#!/usr/bin/env python3
"""Draws BENCHMARKS.md's pictures from the benchmark's machine-readable output.

    benches/plot.py RESULTS_DIR OUT_DIR

RESULTS_DIR holds the JSON lines `cargo bench --bench compare -- --json FILE` writes (one file
per storage setup, as benches/setups.sh names them: root.jsonl, ram-ext4.jsonl, ...). Writes,
as SVG (Python's standard library only, so it runs wherever the benchmark does):

- curve.svg: per-op latency (median, with the 10th-90th percentile band) against the number of
  snapshots in the store, for both snapshotters;
- user.svg: the user-level workloads as paired bars, lamina beside containerd's overlayfs, each
  as a multiple of overlayfs' median on the same setup, whiskers from the fastest to the
  slowest round; one panel per storage setup;
- startup.svg: start-up at scale, each start as a dot;

and summary.md, the user-level medians of every setup side by side, as a Markdown table.
"""

import json
import math
import statistics
import sys
from pathlib import Path

COLORS = {"lamina": "#1f77b4", "overlay": "#ff7f0e"}
SETUP_TITLES = {
    "ram-ext4": "ext4 in a loop file on /dev/shm (RAM)",
    "disk-ext4": "ext4 (journaled) in a loop file on the disk",
    "disk-xfs": "xfs in a loop file on the disk",
    "root": "the machine's root: ext4 without journal, discard",
}
SETUP_ORDER = ["ram-ext4", "disk-ext4", "disk-xfs", "root"]


def load(path):
    facts, records = {}, []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "facts" in obj:
            facts = obj["facts"]
        else:
            records.append(obj)
    return facts, records


def quantile(xs, q):
    xs = sorted(xs)
    rank = min(max(math.ceil(q * len(xs)), 1), len(xs))
    return xs[rank - 1]


def esc(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Svg:
    def __init__(self, width, height):
        self.width, self.height, self.parts = width, height, []

    def add(self, element):
        self.parts.append(element)

    def text(self, x, y, s, size=12, anchor="start", weight="normal", color="#222"):
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{color}">{esc(s)}</text>'
        )

    def line(self, x1, y1, x2, y2, color="#999", width=1, dash=None):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{color}" stroke-width="{width}"{d}/>'
        )

    def rect(self, x, y, w, h, color, opacity=1.0):
        self.add(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
            f'fill="{color}" fill-opacity="{opacity}"/>'
        )

    def polyline(self, points, color, width=2, dash=None):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(
            f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{width}"{d}/>'
        )

    def polygon(self, points, color, opacity):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        self.add(f'<polygon points="{pts}" fill="{color}" fill-opacity="{opacity}"/>')

    def circle(self, x, y, r, color):
        self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}" fill-opacity="0.7"/>')

    def save(self, path):
        body = "\n".join(self.parts)
        path.write_text(
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            f"{body}\n</svg>\n"
        )


def legend(svg, x, y, entries):
    for i, (label, color, dash) in enumerate(entries):
        yy = y + i * 18
        svg.line(x, yy, x + 28, yy, color, 3, dash)
        svg.text(x + 34, yy + 4, label, 12)


def nice_ticks(lo, hi, n=5):
    span = hi - lo
    if span <= 0:
        return [lo]
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 2.5, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 10))
        t += step
    return ticks


def one_setup(results, section):
    """The records of `section` from one setup (the first in SETUP_ORDER that has any): samples
    of different filesystems are never drawn as one line."""
    for setup in SETUP_ORDER + sorted(set(results) - set(SETUP_ORDER)):
        if setup in results:
            records = [r for r in results[setup][1] if r["section"] == section]
            if records:
                return setup, records
    return None, []


def curve(results, out):
    setup, records = one_setup(results, "curve")
    series = {}
    for r in records:
        if r["section"] != "curve" or not r["seconds"]:
            continue
        series.setdefault((r["workload"], r["side"]), []).append((r["x"], r["seconds"]))
    if not series:
        return False
    workloads = sorted({w for w, _ in series}, reverse=True)
    svg = Svg(760, 260 * len(workloads) + 40)
    svg.text(380, 24, f"Latency against store size (median; band: 10th–90th percentile) — {setup}",
             15, "middle", "bold")
    for row, workload in enumerate(workloads):
        top = 50 + row * 260
        left, width, height = 80, 480, 190
        sides = [s for s in ("lamina", "overlay") if (workload, s) in series]
        xs = sorted({x for s in sides for x, _ in series[(workload, s)]})
        ymax = max(quantile(v, 0.9) for s in sides for _, v in series[(workload, s)]) * 1000
        ymax *= 1.1
        lx = [math.log10(x) for x in xs]
        x0, x1 = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1

        def px(x):
            return left + (math.log10(x) - x0) / (x1 - x0) * width

        def py(ms):
            return top + height - ms / ymax * height

        for t in nice_ticks(0, ymax):
            svg.line(left, py(t), left + width, py(t), "#e5e5e5")
            svg.text(left - 6, py(t) + 4, f"{t:g}", 11, "end")
        for x in xs:
            svg.line(px(x), top + height, px(x), top + height + 4, "#666")
            svg.text(px(x), top + height + 18, f"{x:,}", 11, "middle")
        svg.line(left, top + height, left + width, top + height, "#666")
        svg.line(left, top, left, top + height, "#666")
        svg.text(left + width / 2, top - 8, f"{workload}, ms", 13, "middle", "bold")
        svg.text(left + width / 2, top + height + 36, "snapshots in the store (log scale)",
                 11, "middle")
        for side in sides:
            pts = sorted(series[(workload, side)])
            color = COLORS[side]
            band = [(px(x), py(quantile(v, 0.9) * 1000)) for x, v in pts]
            band += [(px(x), py(quantile(v, 0.1) * 1000)) for x, v in reversed(pts)]
            svg.polygon(band, color, 0.15)
            med = [(px(x), py(statistics.median(v) * 1000)) for x, v in pts]
            svg.polyline(med, color)
            for x, y in med:
                svg.circle(x, y, 3, color)
        legend(svg, left + width + 30, top + 20,
               [(s if s == "lamina" else "overlayfs", COLORS[s], None) for s in sides])
    svg.save(out / "curve.svg")
    return True


def user(results, out):
    panels = []
    for setup in SETUP_ORDER + sorted(set(results) - set(SETUP_ORDER)):
        if setup not in results:
            continue
        facts, records = results[setup]
        by = {}
        for r in records:
            if r["section"] == "user" and r["seconds"]:
                by.setdefault(r["workload"], {})[r["side"]] = r["seconds"]
        rows = [(w, v) for w, v in by.items() if "lamina" in v and "overlay" in v]
        if rows:
            panels.append((setup, facts, rows))
    if not panels:
        return False
    bar, gap, group = 9, 4, 2 * 9 + 4 + 14
    left = 300
    height = 60 + sum(50 + len(rows) * group for _, _, rows in panels)
    svg = Svg(900, height + 40)
    svg.text(450, 24, "User level through one containerd: lamina ÷ overlayfs (overlayfs' median = 1)",
             15, "middle", "bold")
    svg.text(450, 42, "bar: median of the rounds; whisker: fastest to slowest round; "
             "label: median in seconds", 11, "middle")
    scale_max = 2.5
    width = 520

    def px(v):
        return left + min(v, scale_max) / scale_max * width

    y = 60
    for setup, facts, rows in panels:
        title = SETUP_TITLES.get(setup, setup)
        version = facts.get("containerd", "")
        svg.text(20, y + 18, f"{title} — containerd {version}", 13, weight="bold")
        y += 30
        top = y
        for workload, sides in rows:
            base = statistics.median(sides["overlay"])
            svg.text(left - 8, y + bar + 4, workload, 11, "end")
            for i, side in enumerate(("lamina", "overlay")):
                v = sides[side]
                med = statistics.median(v) / base
                lo, hi = min(v) / base, max(v) / base
                yy = y + i * (bar + gap)
                svg.rect(left, yy, px(med) - left, bar, COLORS[side], 0.85)
                svg.line(px(lo), yy + bar / 2, px(hi), yy + bar / 2, "#333", 1)
                svg.line(px(lo), yy + 1, px(lo), yy + bar - 1, "#333", 1)
                svg.line(px(hi), yy + 1, px(hi), yy + bar - 1, "#333", 1)
                svg.text(px(max(hi, med)) + 4, yy + bar - 1,
                         f"{statistics.median(v):.3g} s" + (" →" if hi > scale_max else ""), 9)
            y += group
        for t in (0, 0.5, 1, 1.5, 2, 2.5):
            svg.line(px(t), top - 4, px(t), y - 10, "#ccc" if t != 1 else "#666", 1,
                     None if t == 1 else "3,3")
            svg.text(px(t), y + 2, f"{t:g}", 10, "middle")
        y += 20
    legend(svg, 20, height + 10, [("lamina", COLORS["lamina"], None),
                                   ("overlayfs", COLORS["overlay"], None)])
    svg.save(out / "user.svg")
    return True


def startup(results, out):
    setup, records = one_setup(results, "startup")
    rows = []
    for r in records:
        if r["seconds"]:
            rows.append((f'{r["workload"]} ({r["x"]:,} records)', r["side"], r["seconds"]))
    if not rows:
        return False
    labels = []
    for label, _, _ in rows:
        if label not in labels:
            labels.append(label)
    tmax = max(max(s) for _, _, s in rows) * 1.1
    left, width = 260, 480
    svg = Svg(800, 80 + len(labels) * 60)
    svg.text(400, 24, f"Start-up: from spawn to the first answer (each start a dot) — {setup}",
             15, "middle", "bold")

    def px(t):
        return left + t / tmax * width

    for i, label in enumerate(labels):
        y = 60 + i * 60
        svg.text(left - 8, y + 14, label, 11, "end")
        for j, side in enumerate(("lamina", "overlay")):
            for lab, s, secs in rows:
                if lab == label and s == side:
                    for t in secs:
                        svg.circle(px(t), y + 6 + j * 16, 4, COLORS[side])
                    med = statistics.median(secs)
                    svg.line(px(med), y + j * 16, px(med), y + 12 + j * 16, "#000", 2)
    bottom = 60 + len(labels) * 60 - 10
    for t in nice_ticks(0, tmax):
        svg.line(px(t), 50, px(t), bottom, "#e5e5e5")
        svg.text(px(t), bottom + 14, f"{t:g} s", 10, "middle")
    legend(svg, left + width + 10, 70, [("lamina", COLORS["lamina"], None),
                                        ("overlayfs", COLORS["overlay"], None)])
    svg.save(out / "startup.svg")
    return True


def fmt(seconds):
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def summary(results, out):
    setups = [s for s in SETUP_ORDER + sorted(set(results) - set(SETUP_ORDER)) if s in results]
    columns, rows = [], []
    for setup in setups:
        by = {}
        for r in results[setup][1]:
            if r["section"] == "user" and r["seconds"]:
                by.setdefault(r["workload"], {})[r["side"]] = r["seconds"]
        if not by:
            continue
        columns.append((setup, by))
        for w in by:
            if w not in rows:
                rows.append(w)
    if not columns:
        return False
    head = "| workload | " + " | ".join(f"{s}: lamina / overlayfs (ratio)" for s, _ in columns)
    lines = [head + " |", "|---|" + "---:|" * len(columns)]
    for w in rows:
        cells = []
        for _, by in columns:
            v = by.get(w, {})
            if "lamina" in v and "overlay" in v:
                lam, ovl = statistics.median(v["lamina"]), statistics.median(v["overlay"])
                cells.append(f"{fmt(lam)} / {fmt(ovl)} ({lam / ovl:.2f})")
            else:
                cells.append("—")
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return True


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    results = {p.stem: load(p) for p in sorted(src.glob("*.jsonl"))}
    if not results:
        sys.exit(f"no *.jsonl in {src}")
    drawn = [name for name, ok in [
        ("curve.svg", curve(results, out)),
        ("user.svg", user(results, out)),
        ("startup.svg", startup(results, out)),
        ("summary.md", summary(results, out)),
    ] if ok]
    print("wrote " + ", ".join(str(out / d) for d in drawn) if drawn else "nothing to draw")


if __name__ == "__main__":
    main()
