//! Figures, and the Markdown tables they are printed in: the snapshotter level's three tables
//! (against overlay, lamina's own targets, details), and the table primitives the user level
//! and durable_commit use too.

use std::{
    fmt::Display,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use crate::{
    pair::Pair,
    snapshotter::{MainFigures, Point, SnapshotterLevel},
    Sizes,
};

/// Set for a smoke run: its figures come from a few operations, often on a debug build, and
/// judging them against the targets would print verdicts that mean nothing.
static SMOKE: AtomicBool = AtomicBool::new(false);

/// Makes every table of this run leave its verdicts out.
pub fn set_smoke() {
    SMOKE.store(true, Ordering::Relaxed);
}

/// Every sample recorded for the machine-readable output (`--json`), in order.
static RECORDS: std::sync::Mutex<Vec<serde_json::Value>> = std::sync::Mutex::new(Vec::new());

/// Records the samples of `workload` on `side` ("lamina", "overlay", …) in `section`, in
/// seconds, for `--json` (plots are drawn from them: `benches/plot.py`).
pub fn record(section: &str, workload: &str, side: &str, samples: &[Duration]) {
    record_at(section, workload, side, None, samples);
}

/// [`record`] for a point of a curve: `x` is its store size.
pub fn record_at(section: &str, workload: &str, side: &str, x: Option<u64>, samples: &[Duration]) {
    let side = match side {
        "overlayfs" => "overlay",
        other => other,
    };
    RECORDS.lock().unwrap().push(serde_json::json!({
        "section": section,
        "workload": workload,
        "side": side,
        "x": x,
        "seconds": samples.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
    }));
}

/// Writes what was recorded as JSON lines, with `facts` (machine, versions) first.
pub fn write_records(path: &std::path::Path, facts: serde_json::Value) {
    let mut out = format!("{}\n", serde_json::json!({ "facts": facts }));
    for r in RECORDS.lock().unwrap().iter() {
        out.push_str(&format!("{r}\n"));
    }
    std::fs::write(path, out).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A verdict, or what a smoke run prints instead.
fn verdict(met: bool) -> &'static str {
    match (SMOKE.load(Ordering::Relaxed), met) {
        (true, _) => "(smoke)",
        (false, true) => "yes",
        (false, false) => "**no**",
    }
}

/// The snapshotter-level tables.
pub fn snapshotter_level(s: &Sizes, level: &SnapshotterLevel) -> String {
    for (side, points) in [
        ("lamina", &level.curve.lamina),
        ("overlay", &level.curve.overlay),
    ] {
        for p in points {
            let x = Some(p.size as u64);
            record_at("curve", "prepare+commit pair", side, x, &p.pair);
            record_at("curve", "Remove", side, x, &p.remove);
        }
    }
    let mut out = String::new();
    out.push_str("### Snapshotter level (each over its own unix socket, same client)\n\n");
    out.push_str(&comparison_table(&snapshotter_rows(s, level)));
    out.push_str("\n### lamina's own targets\n\n");
    out.push_str(&checks_table(&lamina_checks(s, level)));
    out.push_str("\n### Details\n\n| figure | lamina | overlay |\n|---|---:|---:|\n");
    for line in details(s, level) {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// lamina against overlay, workload by workload, each with the ratio the issue asks for.
fn snapshotter_rows(s: &Sizes, level: &SnapshotterLevel) -> Vec<Row> {
    let main = &level.main;
    let time = |f: fn(&MainFigures) -> Duration| main.as_ref().map(|m| Val::Time(f(m)));
    let mut rows = vec![
        Row::new(
            format!("{} serial prepare+commit pairs (total)", s.serial),
            time(|m| m.serial),
            Some(0.5),
        ),
        Row::new(
            format!(
                "{} prepare+commit pairs from {} clients (total)",
                s.concurrent, s.clients
            ),
            time(|m| m.concurrent),
            Some(0.5),
        ),
        Row::new(
            format!("{} Stats from {} clients (total)", s.stats, s.clients),
            time(|m| m.stats),
            Some(0.5),
        ),
        Row::new(
            format!(
                "{} Lists of {} snapshots (total)",
                s.lists, main.lamina.list_size
            ),
            time(|m| m.lists),
            Some(0.5),
        ),
        Row::new(
            format!("{}-layer chain: prepare+commit each (total)", s.chain),
            time(|m| m.chain),
            Some(0.5),
        ),
        Row::new(
            format!("{} Views of the chain's top (total)", s.views),
            time(|m| m.views),
            Some(0.5),
        ),
        Row::new(
            format!(
                "Commit of a snapshot holding {} files (median of {})",
                s.files, s.file_reps
            ),
            time(|m| median(&m.big)),
            Some(0.5),
        ),
        Row::new(
            format!(
                "Remove of {} snapshots + Cleanup, until `du` shows it freed",
                main.lamina.removed
            ),
            time(|m| m.remove.until_freed),
            Some(0.25),
        ),
        Row::new(
            "peak RSS of the server (VmHWM), after all of the above",
            main.as_ref().map(|m| Val::Bytes(m.rss)),
            Some(0.5),
        ),
    ];
    let curve = level.curve.as_ref();
    for (k, &size) in s.scale.iter().enumerate() {
        rows.push(Row::new(
            format!("prepare+commit latency (median) with {size} snapshots in the store"),
            curve.map(|points| Val::Time(median(&points[k].pair))),
            Some(0.5),
        ));
    }
    for (k, &size) in s.scale.iter().enumerate() {
        rows.push(Row::new(
            format!("Remove latency (median) with {size} snapshots in the store"),
            curve.map(|points| Val::Time(median(&points[k].remove))),
            Some(0.5),
        ));
    }
    if let Some(&last) = s.scale.last() {
        rows.push(Row::new(
            format!("peak RSS of the server (VmHWM) with {last} snapshots"),
            level.curve_rss.map(Val::Bytes),
            Some(0.5),
        ));
    }
    rows
}

/// The targets lamina is held to on its own; overlay's figures are shown for reference.
fn lamina_checks(s: &Sizes, level: &SnapshotterLevel) -> Vec<Check> {
    let main = &level.main;
    let limit = level.limits.pair;
    let pair_mean = main.as_ref().map(|m| mean(&m.serial_lat));
    let x_limit = |pair: Duration| pair.as_secs_f64() / limit.as_secs_f64();
    let mut checks = vec![Check {
        what: format!(
            "serial prepare+commit pair (mean) ÷ machine limit ({} per pair)",
            dur(limit)
        ),
        value: pair_mean.map(|pair| format!("{:.2}× ({})", x_limit(pair), dur(pair))),
        target: "≤ 2×".into(),
        met: Some(x_limit(pair_mean.lamina) <= 2.0),
    }];

    // Pairs per second from all the clients ÷ pairs per second from one; and both rates.
    let speedup = |m: &MainFigures| {
        let serial = s.serial as f64 / m.serial.as_secs_f64();
        let conc = s.concurrent as f64 / m.concurrent.as_secs_f64();
        (conc / serial, serial, conc)
    };
    checks.push(Check {
        what: format!(
            "{}-client throughput ÷ serial throughput (prepare+commit pairs)",
            s.clients
        ),
        value: main.as_ref().map(|m| {
            let (x, serial, conc) = speedup(m);
            format!("{x:.2}× ({conc:.0} vs {serial:.0} pairs/s)")
        }),
        target: "≥ 3×".into(),
        met: Some(speedup(&main.lamina).0 >= 3.0),
    });

    if s.scale.len() >= 2 {
        let (first, last) = (s.scale[0], *s.scale.last().expect("sizes"));
        // How much a median latency grew from the smallest store to the largest.
        let growth = |points: &Vec<Point>, f: fn(&Point) -> &Vec<Duration>| {
            let (small, large) = (&points[0], points.last().expect("points"));
            median(f(large)).as_secs_f64() / median(f(small)).as_secs_f64()
        };
        for (what, f) in [
            (
                "prepare+commit",
                (|p: &Point| &p.pair) as fn(&Point) -> &Vec<Duration>,
            ),
            ("Remove", |p: &Point| &p.remove),
        ] {
            let grew = level.curve.as_ref().map(|points| growth(points, f));
            checks.push(Check {
                what: format!("{what} latency (median) at {last} ÷ at {first} snapshots"),
                value: grew.map(|x| format!("{x:.2}×")),
                target: "≤ 1.5×".into(),
                met: Some(grew.lamina <= 1.5),
            });
        }
    }
    checks
}

/// The lines of the details table: figures behind the rows above, without targets.
fn details(s: &Sizes, level: &SnapshotterLevel) -> Vec<String> {
    /// `| figure | f(lamina's) | f(overlay's) |`
    fn line<T>(figure: impl Display, sides: Pair<&T>, f: impl Fn(&T) -> String) -> String {
        format!("| {figure} | {} | {} |", f(sides.lamina), f(sides.overlay))
    }
    let p50_p99 = |xs: &[Duration]| format!("{} / {}", dur(median(xs)), dur(quantile(xs, 0.99)));
    let main = level.main.as_ref();
    let rm_limit = level.limits.remove_all;
    let mut lines = vec![
        line("serial pair latency p50 / p99", main, |m| {
            p50_p99(&m.serial_lat)
        }),
        line(
            "remove-all: Removes / Cleanup call / until freed",
            main,
            |m| {
                let r = &m.remove;
                format!(
                    "{} / {} / {}",
                    dur(r.removes),
                    dur(r.cleanup_rpc),
                    dur(r.until_freed)
                )
            },
        ),
        line(
            format_args!(
                "remove-all until freed ÷ `rm -rf` of a tree of the same shape ({})",
                dur(rm_limit)
            ),
            main,
            |m| {
                let x = m.remove.until_freed.as_secs_f64() / rm_limit.as_secs_f64();
                format!("{x:.2}×")
            },
        ),
        line(
            "serial Stat latency p50 / p99 (a round trip without I/O)",
            main,
            |m| p50_p99(&m.stat_lat),
        ),
        line("peak RSS (VmHWM) after each step", main, |m| {
            hwm_steps(&m.hwm)
        }),
    ];
    for (k, &size) in s.scale.iter().enumerate() {
        lines.push(line(
            format_args!("at {size}: pair p50 / p99; Remove p50 / p99; fill rate"),
            level.curve.as_ref(),
            |points| {
                let p = &points[k];
                format!(
                    "{}; {}; {:.0} pairs/s",
                    p50_p99(&p.pair),
                    p50_p99(&p.remove),
                    fill_rate(points, k)
                )
            },
        ));
    }
    lines
}

/// "step: N MiB" for each step, joined.
fn hwm_steps(hwm: &[(&str, u64)]) -> String {
    hwm.iter()
        .map(|(step, b)| format!("{step}: {:.0} MiB", *b as f64 / (1024.0 * 1024.0)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pairs per second while filling the store from the previous point's size up to point `k`'s.
fn fill_rate(points: &[Point], k: usize) -> f64 {
    let from = if k == 0 { 0 } else { points[k - 1].size };
    (points[k].size - from) as f64 / points[k].populate.as_secs_f64()
}

/// One measured value.
#[derive(Clone, Debug)]
pub enum Val {
    Time(Duration),
    Bytes(u64),
    /// Samples: compared by their median, shown as "median (min – max)".
    Spread(Vec<Duration>),
}

impl Val {
    fn number(&self) -> f64 {
        match self {
            Val::Time(d) => d.as_secs_f64(),
            Val::Bytes(b) => *b as f64,
            Val::Spread(xs) => median(xs).as_secs_f64(),
        }
    }
}

impl std::fmt::Display for Val {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Val::Time(d) => f.write_str(&dur(*d)),
            Val::Bytes(b) => write!(f, "{:.1} MiB", *b as f64 / (1024.0 * 1024.0)),
            Val::Spread(xs) => f.write_str(&spread(xs)),
        }
    }
}

/// A duration with a unit that suits it.
pub fn dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// One line of the comparison table: lower is better for every value in it.
pub struct Row {
    pub workload: String,
    pub value: Pair<Val>,
    /// The ratio lamina/overlay the issue asks for, if any.
    pub target: Option<f64>,
    /// For a target "within noise": the highest ratio overlay's own runs reached against their
    /// median (its slowest run ÷ its median). A ratio up to that is as close as the
    /// measurement can tell.
    pub noise: Option<f64>,
}

impl Row {
    pub fn new(workload: impl Into<String>, value: Pair<Val>, target: Option<f64>) -> Row {
        Row {
            workload: workload.into(),
            value,
            target,
            noise: None,
        }
    }

    /// A row whose target allows for the run-to-run spread of overlay's own samples.
    pub fn within_noise(mut self, overlay_samples: &[Duration]) -> Row {
        let median = median(overlay_samples).as_secs_f64();
        let slowest = overlay_samples
            .iter()
            .max()
            .map_or(0.0, |d| d.as_secs_f64());
        if median > 0.0 {
            self.noise = Some(slowest / median);
        }
        self
    }

    pub fn ratio(&self) -> f64 {
        self.value.lamina.number() / self.value.overlay.number()
    }
}

pub fn comparison_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| workload | lamina | overlay | lamina/overlay | target | met |\n|---|---:|---:|---:|---:|:---:|\n",
    );
    for r in rows {
        let ratio = r.ratio();
        let (target, met) = match (r.target, r.noise) {
            (Some(t), Some(noise)) => {
                let allowed = t.max(noise);
                (
                    format!("≤ {t:.2} within noise (≤ {allowed:.2})"),
                    verdict(ratio <= allowed),
                )
            }
            (Some(t), None) => (format!("≤ {t:.2}"), verdict(ratio <= t)),
            (None, _) => ("—".into(), ""),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.workload,
            r.value.lamina,
            r.value.overlay,
            ratio_text(ratio, r.target),
            target,
            met
        ));
    }
    out
}

/// The ratio with two decimals, or three when two would round it onto the target.
fn ratio_text(ratio: f64, target: Option<f64>) -> String {
    let two = format!("{ratio:.2}");
    match target {
        Some(t) if two == format!("{t:.2}") && ratio != t => format!("{ratio:.3}"),
        _ => two,
    }
}

/// A target lamina is held to on its own (not against overlay).
pub struct Check {
    pub what: String,
    pub value: Pair<String>,
    pub target: String,
    pub met: Option<bool>,
}

pub fn checks_table(checks: &[Check]) -> String {
    let mut out = String::from(
        "| target | lamina | overlay (for reference) | wanted | met |\n|---|---:|---:|---:|:---:|\n",
    );
    for c in checks {
        let met = match c.met {
            Some(met) => verdict(met),
            None => "",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            c.what, c.value.lamina, c.value.overlay, c.target, met
        ));
    }
    out
}

/// The `q`-quantile (0..=1) of `xs` (nearest rank).
pub fn quantile(xs: &[Duration], q: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    let mut v = xs.to_vec();
    v.sort();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub fn median(xs: &[Duration]) -> Duration {
    quantile(xs, 0.5)
}

pub fn mean(xs: &[Duration]) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    xs.iter().sum::<Duration>() / xs.len() as u32
}

/// Samples as "median (min – max)".
pub fn spread(xs: &[Duration]) -> String {
    let (min, max) = (
        xs.iter().min().copied().unwrap_or_default(),
        xs.iter().max().copied().unwrap_or_default(),
    );
    format!("{} ({} – {})", dur(median(xs)), dur(min), dur(max))
}

/// One workload of lamina against itself, with a boolean setting on and off.
pub struct OnOff {
    pub workload: String,
    pub on: Vec<Duration>,
    pub off: Vec<Duration>,
}

/// The table of [`OnOff`] rows for `setting`: each side's median and range, and the ratio of
/// the medians.
pub fn on_off_table(setting: &str, rows: &[OnOff]) -> String {
    pair_table(
        &format!("{setting} = true"),
        &format!("{setting} = false"),
        rows,
    )
}

/// [`on_off_table`] with each side named: `a` is each row's `on`, `b` its `off`.
pub fn pair_table(a: &str, b: &str, rows: &[OnOff]) -> String {
    let mut out = format!(
        "| workload | {a}: median (min – max) | {b}: median (min – max) | ratio of the medians |\n|---|---:|---:|---:|\n"
    );
    for r in rows {
        let ratio = median(&r.on).as_secs_f64() / median(&r.off).as_secs_f64();
        out.push_str(&format!(
            "| {} | {} | {} | {ratio:.2} |\n",
            r.workload,
            spread(&r.on),
            spread(&r.off)
        ));
    }
    out
}
