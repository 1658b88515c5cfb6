//! lamina against containerd's built-in overlayfs snapshotter, side by side, in one run.
//!
//! ```sh
//! cargo bench --bench compare                 # full run, as root (about 40 minutes here)
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
//! The run has four parts, each measured by its own module and printed as a Markdown section:
//! the snapshotter level (`snapshotter`: the main sequence and the latency curve; its tables in
//! `report`), start-up at scale (`startup`, on the curve's roots), the user level through one
//! containerd 2.x with both snapshotters (`containerd`, with the images of `image`), and what
//! durable_commit costs (`durable`, lamina against itself). `--json FILE` also writes every
//! sample as JSON lines, which `benches/plot.py` draws. Underneath them: `pair` (a [`pair::Pair`] of
//! figures and [`pair::alternate`], the rounds every workload is cut into), `workloads` (the
//! calls, the same for either snapshotter), `client` (the gRPC client), `server` (the two
//! daemons) and `machine` (what the figures were taken on).
//!
//! Needs root (the snapshotters probe overlayfs; containerd runs containers).

mod client;
mod containerd;
#[path = "../../tests/support/containerd.rs"]
mod containerd_support;
#[path = "../../tests/support/cri.rs"]
mod cri_support;
mod durable;
mod image;
mod machine;
#[path = "../../tests/support/oci.rs"]
mod oci_support;
mod pair;
mod report;
mod server;
mod snapshotter;
mod startup;
mod workloads;

use std::{
    fs,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    time::Instant,
};

use futures::FutureExt;
use report::dur;
use server::Bins;

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
    /// Run only the user level (and, unless --no-durable, what durable_commit costs an
    /// image's unpack).
    #[arg(long)]
    only_containerd: bool,
    /// Run only what durable_commit costs (lamina with it on against lamina with it off).
    #[arg(long)]
    only_durable: bool,
    /// Leave out what durable_commit costs.
    #[arg(long)]
    no_durable: bool,
    /// Run only lamina's differ against containerd's applier (the user level's images).
    #[arg(long)]
    only_differ: bool,
    /// Leave out lamina's differ against containerd's applier.
    #[arg(long)]
    no_differ: bool,
    /// The user level's image workloads only for these images (comma-separated: gzip, zstd,
    /// small); the other workloads run as always.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    user_images: Option<Vec<String>>,
    /// Run only start-up at scale (filling both stores to --max-scale first).
    #[arg(long)]
    only_startup: bool,
    /// Where the roots go; not a tmpfs, to be fair to both.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    dir: PathBuf,
    /// Also write every sample as JSON lines to FILE (what `benches/plot.py` draws).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where the user level's images are built once and kept.
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
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
        // Without --bench (`cargo test --bench compare`, which tests/all.sh runs) it runs the
        // smoke mode: CI keeps the benchmark building and running without spending minutes on
        // it.
        args.smoke |= !args.bench
            || std::env::var("LAMINA_BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0");
        args
    }

    /// Whether the snapshotter level runs (each snapshotter over its own socket).
    fn snapshotter(&self) -> bool {
        !self.only_containerd && !self.only_startup && !self.only_differ
    }

    /// Whether the user level runs (through containerd).
    fn containerd(&self) -> bool {
        !self.no_containerd && !self.only_startup
    }

    /// Whether start-up at scale runs.
    fn startup(&self) -> bool {
        !self.only_containerd && !self.only_durable && !self.only_differ
    }

    /// Whether lamina's differ is measured against containerd's applier.
    fn differ(&self) -> bool {
        self.containerd() && !self.no_differ && !self.only_durable
    }
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

    let load_start = machine::loadavg();
    println!(
        "\n## lamina vs containerd's overlayfs snapshotter ({} mode)\n",
        if args.smoke { "smoke" } else { "full" }
    );
    if args.smoke {
        report::set_smoke();
        println!(
            "Smoke run: a few operations of each workload, to show the benchmark still works. \
             No figure below is a measurement, and no target is judged.\n"
        );
    }
    println!("{}", machine::describe(base.path()));
    if args.snapshotter() && !args.only_durable {
        let level = snapshotter::run(base.path(), &bins, &s).await;
        println!("{}", report::snapshotter_level(&s, &level));
    }
    if args.startup() {
        // On the latency curve's roots, when it ran; else it fills its own.
        let figures = startup::run(base.path(), &bins, &s).await;
        println!("{}", startup::table(&figures));
    }
    let mut failed = false;
    // Built once and kept (building the realistic ones takes a minute).
    let images = (args.containerd() && containerd::missing_tools().is_none()).then(|| {
        let cache = args
            .images
            .clone()
            .unwrap_or_else(|| manifest.join("target/lamina-bench/images"));
        fs::create_dir_all(&cache).expect("creating the image cache");
        stage(&format!(
            "building the user level's images in {}",
            cache.display()
        ));
        containerd::Images::build(&cache, &s, args.smoke)
    });
    if args.containerd() && !args.only_durable && !args.only_differ {
        let only = args.user_images.as_deref();
        failed |= !user_level(base.path(), &bins, &s, images.as_ref(), only).await;
    }
    if args.differ() {
        differ(base.path(), &bins, &s, images.as_ref()).await;
    }
    if (args.snapshotter() || args.containerd()) && !args.no_durable && !args.only_differ {
        durable_commit(base.path(), &bins, &s, &args, images.as_ref()).await;
    }
    if let Some(path) = &args.json {
        let facts = serde_json::json!({
            "machine": machine::describe(base.path()),
            "containerd": containerd::flavor().map(|f| f.name).unwrap_or_default(),
            "smoke": args.smoke,
        });
        report::write_records(path, facts);
        eprintln!("samples written to {}", path.display());
    }
    println!(
        "- total run time: {}; load average (1, 5, 15 min) at start: {load_start}, at end: {}\n",
        dur(started.elapsed()),
        machine::loadavg()
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

/// Prints the user-level section; returns false if it failed. A failure is printed in place of
/// the table and the rest of the run goes on; the exit status tells of it at the end.
async fn user_level(
    base: &Path,
    bins: &Bins,
    s: &Sizes,
    images: Option<&containerd::Images>,
    only: Option<&[String]>,
) -> bool {
    println!(
        "### User level (one containerd {}: its built-in `overlayfs` vs `lamina` as its proxy plugin)\n",
        containerd::flavor().map(|f| f.name).unwrap_or_default()
    );
    let Some(images) = images else {
        println!(
            "skipped: {}\n",
            containerd::missing_tools().unwrap_or_default()
        );
        return true;
    };
    let dir = base.join("user");
    let run = containerd::run(&dir, bins, s, images, only);
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(rows) => {
            println!("{}", report::comparison_table(&rows));
            true
        }
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            println!("failed: {}\n", msg.lines().next().unwrap_or_default());
            false
        }
    }
}

/// Prints the durable_commit section: the snapshotter-level rows and the `ctr images import`
/// row, as far as `args` asks for them.
/// lamina's differ against containerd's applier, lamina (with its defaults) under both: each
/// image's unpack, and lamina's peak memory.
async fn differ(base: &Path, bins: &Bins, s: &Sizes, images: Option<&containerd::Images>) {
    println!(
        "### lamina's differ against containerd's applier (containerd {}, lamina under both)\n",
        containerd::flavor().map(|f| f.name).unwrap_or_default()
    );
    let Some(images) = images else {
        println!(
            "skipped: {}\n",
            containerd::missing_tools().unwrap_or_default()
        );
        return;
    };
    let unpigz = containerd::unpigz();
    let mut rows = Vec::new();
    let mut peaks = String::new();
    for (label, image) in [
        ("gzip", &images.gzip),
        ("zstd", &images.zstd),
        ("small", &images.small),
    ] {
        stage(&format!(
            "lamina's differ against containerd's applier: import of the {label} image"
        ));
        let variant = |label, differ, unpigz| containerd::Variant {
            label,
            lamina_config: "",
            differ,
            unpigz,
        };
        let dir = base.join(format!("differ-{label}"));
        // unpigz decompresses gzip only (containerd's applier uses it when on its PATH).
        let (ours, theirs, with_unpigz) = if unpigz.is_some() && label != "zstd" {
            let variants = [
                variant("differ", true, false),
                variant("applier", false, false),
                variant("applier-unpigz", false, true),
            ];
            let [a, b, c] = containerd::paired_unpack(&dir, bins, s, image, variants).await;
            (a, b, Some(c))
        } else {
            let variants = [
                variant("differ", true, false),
                variant("applier", false, false),
            ];
            let [a, b] = containerd::paired_unpack(&dir, bins, s, image, variants).await;
            (a, b, None)
        };
        let record = |what: &str, side: &str, u: &containerd::Unpacked| {
            report::record("differ", &format!("{label} {what}"), side, &u.unpack);
            let import = format!("{label} {what} (whole import)");
            report::record("differ", &import, side, &u.import);
        };
        record("unpack", "lamina's differ", &ours);
        record("unpack", "containerd's applier", &theirs);
        let described = image.describe();
        let mut row = |what: String, on: &[std::time::Duration], off: &[std::time::Duration]| {
            rows.push(report::OnOff {
                workload: what,
                on: on.to_vec(),
                off: off.to_vec(),
            })
        };
        row(
            format!("{label} image ({described}): unpack"),
            &ours.unpack,
            &theirs.unpack,
        );
        if let Some(u) = &with_unpigz {
            record("unpack", "containerd's applier with unpigz", u);
            row(
                format!("{label} image: unpack, containerd with unpigz"),
                &ours.unpack,
                &u.unpack,
            );
        }
        row(
            format!("{label} image: `ctr images import` (ingest + unpack)"),
            &ours.import,
            &theirs.import,
        );
        if let Some(u) = &with_unpigz {
            row(
                format!("{label} image: `ctr images import`, containerd with unpigz"),
                &ours.import,
                &u.import,
            );
        }
        peaks.push_str(&format!(
            "| {label} | {:.1} MiB | {:.1} MiB |\n",
            ours.peak_rss as f64 / (1 << 20) as f64,
            theirs.peak_rss as f64 / (1 << 20) as f64
        ));
    }
    let unpigz_note = match &unpigz {
        Some(path) => format!("containerd's unpigz: {}", path.display()),
        None => "no unpigz on containerd's PATH: containerd with unpigz not measured".into(),
    };
    println!(
        "{}\n{} rounds of each, taking turns (and which goes first). Each round imports the \
         image into an empty root and content store; the unpack is the part from containerd's \
         first Prepare to lamina's answer to its last Commit, by lamina's log (lamina is the \
         snapshotter on every side). containerd runs with CONTAINERD_DISABLE_IGZIP=1, and \
         without unpigz with CONTAINERD_DISABLE_PIGZ=1; {unpigz_note}.\n",
        report::pair_table("lamina's differ", "containerd's applier", &rows),
        s.durable_reps
    );
    println!(
        "lamina's peak resident memory (VmHWM) over each run:\n\n| image | with its differ | \
         without |\n|---|---:|---:|\n{peaks}"
    );
}

async fn durable_commit(
    base: &Path,
    bins: &Bins,
    s: &Sizes,
    args: &Args,
    images: Option<&containerd::Images>,
) {
    println!("### durable_commit: what a durable Commit costs (lamina against itself)\n");
    let mut rows = Vec::new();
    if args.snapshotter() {
        rows.extend(durable::run(base, bins, s).await);
    }
    if args.containerd() {
        match images {
            None => println!(
                "`ctr images import` skipped: {}\n",
                containerd::missing_tools().unwrap_or_default()
            ),
            Some(images) => {
                // The big image shows the cost where the layers are large; the small one where
                // each Commit's sync is a larger share of a short unpack.
                for (label, image) in [("gzip", &images.gzip), ("small", &images.small)] {
                    stage(&format!(
                        "durable_commit on and off: unpack of the {label} image"
                    ));
                    let dir = base.join(format!("durable-user-{label}"));
                    let variants =
                        durable::DURABLE.map(|(lamina_config, label)| containerd::Variant {
                            label,
                            lamina_config,
                            differ: false,
                            unpigz: false,
                        });
                    let [on, off] = containerd::paired_unpack(&dir, bins, s, image, variants)
                        .await
                        .map(|u| u.unpack);
                    let what = format!("{label} unpack");
                    report::record("durable", &what, "durable_commit on", &on);
                    report::record("durable", &what, "durable_commit off", &off);
                    rows.push(report::OnOff {
                        workload: format!(
                            "unpack of the {label} image ({}) by containerd {}",
                            image.describe(),
                            containerd::flavor().map(|f| f.name).unwrap_or_default()
                        ),
                        on,
                        off,
                    });
                }
            }
        }
    }
    println!(
        "{}\n{} rounds of each workload, alternating between the two servers (and which goes first).\n",
        report::on_off_table("durable_commit", &rows),
        s.durable_reps
    );
}

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
    /// CRI: containers created and started in a pod, on each snapshotter.
    pub cri_reps: usize,
    /// The stats loop: active snapshots, and files written into each.
    pub stats_snapshots: usize,
    pub stats_files: usize,
    /// The pause after `sync` between the user level's steps.
    pub settle: std::time::Duration,
    /// Starts of each server in each start-up workload.
    pub startup_reps: usize,
    /// Creations cut short by the SIGKILL of the start-up workload.
    pub startup_cut: usize,
    /// Whether the start-up workload drops the page cache for its cold starts.
    pub drop_caches: bool,
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
            user_reps: 5,
            image_layers: 4,
            image_files: 500,
            durable_reps: 7,
            cri_reps: 9,
            stats_snapshots: 20,
            stats_files: 20_000,
            settle: std::time::Duration::from_secs(2),
            startup_reps: 5,
            startup_cut: 10_000,
            drop_caches: true,
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
            cri_reps: 1,
            stats_snapshots: 2,
            stats_files: 50,
            settle: std::time::Duration::ZERO,
            startup_reps: 1,
            startup_cut: 40,
            drop_caches: false,
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

/// Flushes dirty data so that one workload's writeback does not land in the next one's timing.
pub fn sync_disks() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// A progress line on stderr, with the time since the program started.
fn stage(what: &str) {
    eprintln!("[{:>8.1} s] {what}", START.elapsed().as_secs_f64());
}

/// When the program started, for the progress lines.
static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Whether the run can go on: it needs root. Without it, like the integration tests, it skips
/// with a reason on a developer's machine and fails when `CI` is set.
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
