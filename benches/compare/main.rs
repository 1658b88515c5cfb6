//! lamina against containerd's built-in overlayfs snapshotter, side by side, in one run.
//!
//! ```sh
//! cargo bench --bench compare                 # full run, as root (about 5 minutes here)
//! cargo bench --bench compare -- --smoke      # every workload at a few ops (seconds)
//! ```
//!
//! Both snapshotters run as their own process, each serving containerd's Snapshots gRPC API on
//! its own unix socket, and both are driven by the same Rust client code (containerd's
//! generated client): `lamina serve` (this package's binary, release build) and `overlayd`
//! (benches/go: containerd's `snapshots/overlay` with its default options behind
//! `contrib/snapshotservice`, built here with Go in GOPATH mode against Debian's packaged
//! containerd sources). Their roots are side by side under one directory (default /var/tmp),
//! so on the same filesystem. Every workload is cut into rounds that alternate between the two
//! (and which of them goes first), so both meet the same disk and CPU weather.
//!
//! Options come after `--`; `cargo bench --bench compare -- --help` lists them ([`Args`]).
//!
//! Needs root (the snapshotters probe overlayfs; containerd runs containers).

mod client;
mod containerd;
#[path = "../../tests/support/containerd.rs"]
mod containerd_support;
mod image;
#[path = "../../tests/support/oci.rs"]
mod oci_support;
mod pair;
mod report;
mod server;
mod workloads;

use std::{
    fs,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures::FutureExt;
use pair::{alternate, chunk, Pair};
use report::dur;
use server::{Bins, Kind, Server};

/// How much of each workload to do.
pub struct Sizes {
    pub serial: usize,
    pub concurrent: usize,
    pub clients: usize,
    pub stats: usize,
    pub lists: usize,
    pub chain: usize,
    pub views: usize,
    pub files: usize,
    pub file_reps: usize,
    pub scale: Vec<usize>,
    pub samples: usize,
    pub machine: usize,
    pub rounds: usize,
    pub user_pairs: usize,
    pub user_concurrent: usize,
    pub user_reps: usize,
    pub image_layers: usize,
    pub image_files: usize,
    /// Rounds of each durable_commit workload, on and off.
    pub durable_reps: usize,
}

impl Sizes {
    fn full(max_scale: usize) -> Sizes {
        Sizes {
            serial: 1000,
            concurrent: 2000,
            clients: 16,
            stats: 5000,
            lists: 50,
            chain: 128,
            views: 50,
            files: 20_000,
            file_reps: 3,
            scale: cap(&[1000, 10_000, 100_000], max_scale),
            samples: 200,
            machine: 2000,
            rounds: 10,
            user_pairs: 500,
            user_concurrent: 1000,
            user_reps: 9,
            image_layers: 4,
            image_files: 500,
            durable_reps: 7,
        }
    }

    fn smoke(max_scale: usize) -> Sizes {
        Sizes {
            serial: 20,
            concurrent: 64,
            clients: 16,
            stats: 64,
            lists: 3,
            chain: 8,
            views: 3,
            files: 200,
            file_reps: 1,
            scale: cap(&[100, 200, 400], max_scale),
            samples: 10,
            machine: 50,
            rounds: 2,
            user_pairs: 10,
            user_concurrent: 32,
            user_reps: 1,
            image_layers: 2,
            image_files: 20,
            durable_reps: 1,
        }
    }
}

/// `sizes` up to `max`, with `max` itself added when it falls between two of them.
fn cap(sizes: &[usize], max: usize) -> Vec<usize> {
    let mut out: Vec<usize> = sizes.iter().copied().filter(|&s| s <= max).collect();
    if out.last() != Some(&max) && sizes.iter().any(|&s| s > max) && max > 0 {
        out.push(max);
    }
    out
}

/// lamina against containerd's built-in overlayfs snapshotter, side by side, in one run (as
/// root).
#[derive(clap::Parser)]
#[command(
    name = "compare",
    override_usage = "cargo bench --bench compare -- [OPTIONS]",
    // The old hand-written parser let a flag come twice; so does this one.
    args_override_self = true
)]
struct Args {
    /// Every workload at a few operations (seconds, not minutes). Also set by
    /// LAMINA_BENCH_SMOKE=1, and whenever the program runs without --bench.
    #[arg(long)]
    smoke: bool,
    /// The largest store size of the latency curve.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    max_scale: usize,
    /// Leave out the user level (a private containerd, `ctr images import` and `ctr run`).
    #[arg(long)]
    no_containerd: bool,
    /// Run only the user level.
    #[arg(long)]
    only_containerd: bool,
    /// Run only what durable_commit costs (lamina with it on against lamina with it off).
    #[arg(long)]
    only_durable: bool,
    /// Where the roots go; not a tmpfs, to be fair to both.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    dir: PathBuf,
    /// Keep the roots and logs afterwards.
    #[arg(long)]
    keep: bool,
    /// Passed by `cargo bench` to targets with `harness = false`.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    /// The command line, and LAMINA_BENCH_SMOKE.
    fn from_command_line() -> Args {
        let mut args = <Args as clap::Parser>::parse();
        // `cargo test --all-targets` (README's test command) runs this program without --bench,
        // and then it runs the smoke mode: CI keeps the benchmark building and running without
        // spending minutes on it.
        args.smoke |= !args.bench
            || std::env::var("LAMINA_BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0");
        args
    }

    /// Whether the snapshotter level runs (each snapshotter over its own socket).
    fn snapshotter(&self) -> bool {
        !self.only_containerd
    }

    /// Whether the user level runs (through containerd).
    fn containerd(&self) -> bool {
        !self.no_containerd
    }
}

/// Flushes dirty data so that one workload's writeback does not land in the next one's timing.
pub fn sync_disks() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// lamina's config with durable_commit on, then off, and the label of each.
pub const DURABLE: [(&str, &str); 2] = [
    ("durable_commit = true\n", "on"),
    ("durable_commit = false\n", "off"),
];

/// What remove-all took.
#[derive(Default)]
struct RemoveAll {
    /// All the Removes.
    removes: Duration,
    cleanup_rpc: Duration,
    /// From the first Remove until nothing is left under `<root>/snapshots`: the Removes, then
    /// from the Cleanup call until the directories are gone.
    until_freed: Duration,
}

/// What the main sequence measured for one snapshotter.
#[derive(Default)]
struct MainFigures {
    serial: Duration,
    serial_lat: Vec<Duration>,
    concurrent: Duration,
    stats: Duration,
    lists: Duration,
    list_size: usize,
    chain: Duration,
    views: Duration,
    big: Vec<Duration>,
    removed: usize,
    remove: RemoveAll,
    /// Serial Stats, one at a time: the cost of a round trip that does no I/O.
    stat_lat: Vec<Duration>,
    /// VmHWM after each step.
    hwm: Vec<(&'static str, u64)>,
    rss: u64,
}

/// What the machine itself takes for the main sequence's durable work, on the filesystem that
/// holds both roots.
struct MachineLimits {
    /// Per serial pair: 2 mkdir + 2 × (4 KiB write + fsync), measured in the same rounds.
    pair: Duration,
    /// `rm -rf` of a tree shaped like the one remove-all frees.
    remove_all: Duration,
}

/// One snapshotter in the main sequence: its server, the snapshots it holds (oldest first), and
/// what it measured.
struct MainSide {
    server: Server,
    live: Vec<String>,
    /// The top of the chain built so far: where the chain's next round and the views start.
    top: String,
    figures: MainFigures,
}

impl MainSide {
    /// Records the server's peak RSS so far, after `step`.
    fn mark(&mut self, step: &'static str) {
        self.figures.hwm.push((step, self.server.peak_rss()));
    }
}

/// Everything the snapshotter level measured.
struct SnapshotterLevel {
    main: Pair<MainFigures>,
    limits: MachineLimits,
    /// The latency curve: one point per store size.
    curve: Pair<Vec<Point>>,
    /// Each server's peak RSS at the end of the curve.
    curve_rss: Pair<u64>,
}

/// One store size of the latency curve, for one snapshotter.
struct Point {
    size: usize,
    populate: Duration,
    pair: Vec<Duration>,
    remove: Vec<Duration>,
}

/// The main sequence on two fresh servers: every snapshotter-level workload, then peak RSS.
/// Each workload is cut into rounds that [`alternate`] between the two snapshotters.
async fn main_sequence(base: &Path, bins: &Bins, s: &Sizes) -> (Pair<MainFigures>, MachineLimits) {
    let mut sides = Pair::new(|kind| MainSide {
        server: Server::start(kind, bins, &base.join(format!("main-{}", kind.label()))),
        live: Vec::new(),
        top: String::new(),
        figures: MainFigures::default(),
    });
    let rounds = s.rounds;
    let mark = |sides: &mut Pair<MainSide>, step| {
        for side in sides.each_mut() {
            side.mark(step);
        }
    };

    // Serial pairs, with the machine's floor for a durable pair (same filesystem) measured at the
    // start of each of their rounds.
    stage(&format!(
        "{} serial prepare+commit pairs; machine limit: {} × (2 mkdir + 2 × (4 KiB write + fsync))",
        s.serial, s.machine
    ));
    let mut floor = workloads::Floor::new(&base.join("machine"));
    let mut floor_time = Duration::ZERO;
    for r in 0..rounds {
        sync_disks();
        floor_time += floor.pairs(chunk(s.machine, rounds, r).len());
        alternate(r..r + 1, sides.each_mut(), async |r, side| {
            sync_disks();
            let range = chunk(s.serial, rounds, r);
            let (wall, lat) = workloads::serial_pairs(
                &side.server.target,
                "serial",
                range,
                10,
                "",
                &mut side.live,
            )
            .await;
            side.figures.serial += wall;
            side.figures.serial_lat.extend(lat);
        })
        .await;
    }
    drop(floor);
    let pair_limit = floor_time / s.machine as u32;
    mark(&mut sides, "serial pairs");

    stage(&format!(
        "{} pairs from {} clients",
        s.concurrent, s.clients
    ));
    alternate(0..rounds, sides.each_mut(), async |r, side| {
        sync_disks();
        let c = chunk(s.concurrent, rounds, r);
        side.figures.concurrent += workloads::concurrent_pairs(
            &side.server.target,
            "conc",
            c.start,
            c.len(),
            s.clients,
            10,
            &mut side.live,
        )
        .await;
    })
    .await;
    mark(&mut sides, "concurrent pairs");

    stage(&format!(
        "{} Stats from {} clients, then {} serial Stats",
        s.stats, s.clients, s.serial
    ));
    alternate(0..rounds, sides.each_mut(), async |r, side| {
        let t = &side.server.target;
        let n = chunk(s.stats, rounds, r).len();
        side.figures.stats += workloads::stats(t, &side.live, n, s.clients, r as u64).await;
        let n = chunk(s.serial, rounds, r).len();
        let lat = workloads::serial_stats(t, &side.live, n, r as u64).await;
        side.figures.stat_lat.extend(lat);
    })
    .await;
    mark(&mut sides, "Stats");

    stage(&format!(
        "{} Lists of {} snapshots",
        s.lists,
        sides.lamina.live.len()
    ));
    alternate(0..rounds, sides.each_mut(), async |r, side| {
        let n = chunk(s.lists, rounds, r).len();
        side.figures.lists += workloads::lists(&side.server.target, n, side.live.len()).await;
        side.figures.list_size = side.live.len();
    })
    .await;
    mark(&mut sides, "Lists");

    stage(&format!(
        "{}-layer chain, then {} views of its top",
        s.chain, s.views
    ));
    alternate(0..rounds, sides.each_mut(), async |r, side| {
        sync_disks();
        let range = chunk(s.chain, rounds, r);
        let (wall, _) = workloads::serial_pairs(
            &side.server.target,
            "chain",
            range,
            usize::MAX,
            &side.top,
            &mut side.live,
        )
        .await;
        side.figures.chain += wall;
        if let Some(last) = side.live.last() {
            side.top = last.clone();
        }
    })
    .await;
    alternate(0..rounds, sides.each_mut(), async |r, side| {
        let range = chunk(s.views, rounds, r);
        side.figures.views += workloads::views(
            &side.server.target,
            "view",
            &side.top,
            range,
            &mut side.live,
        )
        .await;
    })
    .await;
    mark(&mut sides, "chain and views");

    stage(&format!(
        "Commit of an active snapshot holding {} files (×{})",
        s.files, s.file_reps
    ));
    alternate(0..s.file_reps, sides.each_mut(), async |r, side| {
        sync_disks();
        let t = &side.server.target;
        let took = workloads::big_commit(t, "big", r, s.files, true, &mut side.live).await;
        side.figures.big.push(took);
    })
    .await;
    mark(&mut sides, "big Commits");

    stage(&format!(
        "Remove of all {} snapshots, Cleanup, until the space is freed",
        sides.lamina.live.len()
    ));
    for side in sides.each_mut() {
        // Newest first, so children go before their parents.
        side.live.reverse();
        side.figures.removed = side.live.len();
    }
    alternate(0..rounds, sides.each_mut(), async |r, side| {
        sync_disks();
        let doomed = &side.live[chunk(side.live.len(), rounds, r)];
        side.figures.remove.removes += workloads::removes(&side.server.target, doomed).await;
    })
    .await;
    // One round more, so that the order keeps alternating.
    alternate(rounds..rounds + 1, sides.each_mut(), async |_, side| {
        sync_disks();
        let (rpc, freed) =
            workloads::cleanup_until_freed(&side.server.target, &side.server.root).await;
        let remove = &mut side.figures.remove;
        remove.cleanup_rpc = rpc;
        remove.until_freed = remove.removes + freed;
    })
    .await;
    mark(&mut sides, "remove-all");
    for side in sides.each_mut() {
        side.figures.rss = side.server.peak_rss();
        side.server.stop();
    }

    // The floor for freeing that much: `rm -rf` (remove_dir_all) of a tree of the same shape.
    stage("machine limit for remove-all: remove_dir_all of a tree of the same shape");
    let limits = MachineLimits {
        pair: pair_limit,
        remove_all: workloads::machine_remove_limit(
            &base.join("machine"),
            sides.lamina.figures.removed,
            s.files,
            s.file_reps,
        ),
    };
    (sides.map(|side| side.figures), limits)
}

/// The latency curve: for each size, both stores are filled up to it (16 clients, parentless
/// pairs), then `samples` serial pairs and `samples` Removes are timed one by one, in rounds
/// that [`alternate`] between the two. Returns the points and each server's peak RSS.
async fn scale_sequence(base: &Path, bins: &Bins, s: &Sizes) -> (Pair<Vec<Point>>, Pair<u64>) {
    /// One snapshotter: its server, the snapshots it holds, and its points so far.
    struct Side {
        server: Server,
        populated: Vec<String>,
        points: Vec<Point>,
    }
    impl Side {
        /// The point of the size being measured.
        fn point(&mut self) -> &mut Point {
            self.points
                .last_mut()
                .expect("a point is pushed for each size")
        }
    }
    let mut sides = Pair::new(|kind| Side {
        server: Server::start(kind, bins, &base.join(format!("scale-{}", kind.label()))),
        populated: Vec::new(),
        points: Vec::new(),
    });
    let mut filled = 0;
    for &size in &s.scale {
        stage(&format!(
            "filling both stores from {filled} to {size} snapshots"
        ));
        for side in sides.each_mut() {
            side.points.push(Point {
                size,
                populate: Duration::ZERO,
                pair: Vec::new(),
                remove: Vec::new(),
            });
        }
        let add = size.saturating_sub(filled);
        alternate(0..s.rounds, sides.each_mut(), async |r, side| {
            let c = chunk(add, s.rounds, r);
            let took = workloads::concurrent_pairs(
                &side.server.target,
                "pop",
                filled + c.start,
                c.len(),
                s.clients,
                1,
                &mut side.populated,
            )
            .await;
            side.point().populate += took;
        })
        .await;
        filled = size;
        stage(&format!(
            "latency of {} pairs and {} Removes at {size}",
            s.samples, s.samples
        ));
        let tag = format!("lat{size}");
        alternate(0..s.rounds, sides.each_mut(), async |r, side| {
            let t = &side.server.target;
            sync_disks();
            let mut names = Vec::new();
            let range = chunk(s.samples, s.rounds, r);
            let (_, lat) = workloads::serial_pairs(t, &tag, range, 1, "", &mut names).await;
            sync_disks();
            let removes = workloads::timed_removes(t, &names).await;
            let point = side.point();
            point.pair.extend(lat);
            point.remove.extend(removes);
        })
        .await;
    }
    let rss = sides.as_mut().map(|side| {
        let rss = side.server.peak_rss();
        side.server.stop();
        rss
    });
    (sides.map(|side| side.points), rss)
}

/// What durable_commit costs Commit, on two lamina servers, one with durable_commit on and one
/// with it off, in rounds that [`alternate`] between them: a freshly written layer of `s.files`
/// files (not synced, as containerd's applier leaves it), and empty layers (the sync's fixed
/// cost), from one client and from `s.clients`.
async fn durable_sequence(base: &Path, bins: &Bins, s: &Sizes) -> Vec<report::OnOff> {
    /// One of the two servers, and its samples: one per round.
    struct Side {
        server: Server,
        commit: Vec<Duration>,
        serial: Vec<Duration>,
        concurrent: Vec<Duration>,
        live: Vec<String>,
    }
    let mut sides = DURABLE.map(|(config, label)| {
        let dir = base.join(format!("durable-{label}"));
        let mut server = Server::start_with(Kind::Lamina, bins, &dir, config);
        server.target.label = format!("lamina (durable_commit {label})");
        Side {
            server,
            commit: Vec::new(),
            serial: Vec::new(),
            concurrent: Vec::new(),
            live: Vec::new(),
        }
    });
    stage(&format!(
        "durable_commit on and off: Commit of a freshly written layer of {} files, {} serial \
         pairs, {} pairs from {} clients (in {} rounds)",
        s.files, s.serial, s.concurrent, s.clients, s.durable_reps
    ));
    let reps = s.durable_reps;
    alternate(0..reps, sides.each_mut(), async |r, side| {
        let t = &side.server.target;
        // What the previous round left dirty is written out first, untimed; this round's
        // files stay dirty until its Commit.
        sync_disks();
        let took = workloads::big_commit(t, "fresh", r, s.files, false, &mut side.live).await;
        side.commit.push(took);
        // Per pair, so that each round is one sample; after the layer above is on disk,
        // so that neither server's pairs meet its writeback.
        sync_disks();
        let range = chunk(s.serial, reps, r);
        let n = range.len() as u32;
        let (wall, _) = workloads::serial_pairs(t, "dserial", range, 10, "", &mut side.live).await;
        side.serial.push(wall / n);
        let range = chunk(s.concurrent, reps, r);
        let n = range.len() as u32;
        let wall = workloads::concurrent_pairs(
            t,
            "dconc",
            range.start,
            range.len(),
            s.clients,
            10,
            &mut side.live,
        )
        .await;
        side.concurrent.push(wall / n);
    })
    .await;
    for side in &mut sides {
        side.server.stop();
    }
    let [on, off] = sides;
    vec![
        report::OnOff {
            workload: format!(
                "Commit of a freshly written (unsynced) layer of {} files",
                s.files
            ),
            on: on.commit,
            off: off.commit,
        },
        report::OnOff {
            workload: format!(
                "serial prepare+commit pair, empty layers (wall time per pair; {} in all)",
                s.serial
            ),
            on: on.serial,
            off: off.serial,
        },
        report::OnOff {
            workload: format!(
                "prepare+commit pairs from {} clients, empty layers (wall time per pair; {} in all)",
                s.clients, s.concurrent
            ),
            on: on.concurrent,
            off: off.concurrent,
        },
    ]
}

fn stage(what: &str) {
    eprintln!("[{:>8.1} s] {what}", START.elapsed().as_secs_f64());
}

/// When the program started, for the progress lines.
static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// nproc, memory, kernel, and the filesystem holding `dir`.
fn machine(dir: &Path) -> String {
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
fn loadavg() -> String {
    let l = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(", ")
}

fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("the benchmark needs root (both snapshotters probe overlayfs) and CI is set");
    }
    eprintln!("skipped: the benchmark needs root (both snapshotters probe overlayfs)");
    false
}

#[tokio::main]
async fn main() {
    std::sync::LazyLock::force(&START);
    let args = Args::from_command_line();
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let s = if args.smoke {
        Sizes::smoke(args.max_scale)
    } else {
        Sizes::full(args.max_scale)
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bins = Bins {
        lamina: PathBuf::from(env!("CARGO_BIN_EXE_lamina")),
        overlayd: server::build_overlayd(&manifest.join("target/lamina-bench")),
    };
    fs::create_dir_all(&args.dir).expect("creating --dir");
    let base = tempfile::Builder::new()
        .prefix("lamina-bench.")
        .tempdir_in(&args.dir)
        .expect("creating the benchmark directory");
    eprintln!("benchmark directory: {}", base.path().display());
    eprintln!("lamina: {}", bins.lamina.display());

    let load_start = loadavg();
    let mut failed = false;
    println!(
        "\n## lamina vs containerd's overlayfs snapshotter ({} mode)\n",
        if args.smoke { "smoke" } else { "full" }
    );
    println!("{}", machine(base.path()));
    if args.snapshotter() && !args.only_durable {
        let (main, limits) = main_sequence(base.path(), &bins, &s).await;
        let (curve, curve_rss) = scale_sequence(base.path(), &bins, &s).await;
        let level = SnapshotterLevel {
            main,
            limits,
            curve,
            curve_rss,
        };
        println!("{}", report::snapshotter_level(&s, &level));
    }
    if args.containerd() && !args.only_durable {
        println!(
            "### User level (one containerd: its built-in `overlayfs` vs `lamina` as its proxy plugin)\n"
        );
        if let Some(why) = containerd::missing_tools() {
            println!("skipped: {why}\n");
        } else {
            let dir = base.path().join("user");
            let run = containerd::run(&dir, &bins, &s);
            match AssertUnwindSafe(run).catch_unwind().await {
                Ok(rows) => println!("{}", report::comparison_table(&rows)),
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    println!("failed: {}\n", msg.lines().next().unwrap_or_default());
                    failed = true;
                }
            }
        }
    }
    if args.snapshotter() || args.containerd() {
        println!("### durable_commit: what a durable Commit costs (lamina against itself)\n");
        let mut rows = Vec::new();
        if args.snapshotter() {
            rows.extend(durable_sequence(base.path(), &bins, &s).await);
        }
        match containerd::missing_tools() {
            Some(why) if args.containerd() => println!("`ctr images import` skipped: {why}\n"),
            None if args.containerd() => {
                stage("durable_commit on and off: `ctr images import`");
                let dir = base.path().join("durable-user");
                let ([on, off], layers) = containerd::durable_import(&dir, &bins, &s).await;
                rows.push(report::OnOff {
                    workload: format!(
                        "`ctr images import` (unpack of {layers} layers, {} files)",
                        s.image_layers * s.image_files
                    ),
                    on,
                    off,
                });
            }
            _ => {}
        }
        println!(
            "{}\n{} rounds of each workload, alternating between the two servers (and which goes first).\n",
            report::on_off_table("durable_commit", &rows),
            s.durable_reps
        );
    }
    println!(
        "- total run time: {}; load average (1, 5, 15 min) at start: {load_start}, at end: {}\n",
        dur(started.elapsed()),
        loadavg()
    );

    if args.keep {
        let kept = base.keep();
        eprintln!("kept {}", kept.display());
    } else {
        eprintln!("removing {}", base.path().display());
        drop(base);
    }
    if failed {
        std::process::exit(1);
    }
}
