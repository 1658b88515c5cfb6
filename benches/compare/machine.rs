//! What the figures were taken on: the machine, the filesystem of the roots, lamina's revision,
//! and the load.

use std::{fs, path::Path};

/// nproc, memory, kernel, and the filesystem holding `dir`.
pub fn describe(dir: &Path) -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    // The mount holding `dir`: the longest mount point that is a prefix of it.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for l in mountinfo.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (point, opts) = (f[4], f[5]);
        if dir.starts_with(point) && best.as_ref().is_none_or(|(n, _)| point.len() >= *n) {
            let (fstype, source, fs_opts) = (
                f.get(sep + 1).unwrap_or(&"?"),
                f.get(sep + 2).unwrap_or(&"?"),
                f.get(sep + 3).unwrap_or(&"?"),
            );
            // The filesystem's own options matter: with `discard`, every freed block waits
            // for the disk, which is most of what deleting a tree costs.
            best = Some((
                point.len(),
                format!("{fstype} on {source} (mounted at {point}, {opts}; filesystem options {fs_opts})"),
            ));
        }
    }
    format!(
        "- CPUs: {nproc} × {cpu}\n- memory: {mem}\n- kernel: Linux {}\n- filesystem of {}: {}\n- lamina: {}\n",
        kernel.trim(),
        dir.display(),
        best.map(|b| b.1).unwrap_or_else(|| "?".into()),
        revision()
    )
}

/// The commit lamina was built from, and whether src/ had uncommitted changes.
fn revision() -> String {
    let manifest = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(manifest)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        None => "unknown revision (not a git checkout)".into(),
        Some(rev) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "src",
                "Cargo.toml",
                "Cargo.lock",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("git {rev} with uncommitted changes in src/ or Cargo.*")
            } else {
                format!("git {rev}")
            }
        }
    }
}

/// The first three fields of /proc/loadavg: other work on the machine skews every figure.
pub fn loadavg() -> String {
    let l = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(", ")
}

/// The peak resident memory of process `pid` so far (its VmHWM), in bytes; 0 if unreadable.
pub fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
