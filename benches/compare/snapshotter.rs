//! The snapshotter level: lamina and overlay each over its own socket, driven by the same
//! client. The main sequence runs every workload on one pair of fresh servers; the latency
//! curve fills another pair store size by store size.

use std::{path::Path, time::Duration};

use crate::{
    pair::{alternate, chunk, Pair},
    server::{Bins, Server},
    stage, sync_disks, workloads, Sizes,
};

/// Both sequences, one after the other.
pub async fn run(base: &Path, bins: &Bins, s: &Sizes) -> SnapshotterLevel {
    let (main, limits) = main_sequence(base, bins, s).await;
    let (curve, curve_rss) = scale_sequence(base, bins, s).await;
    SnapshotterLevel {
        main,
        limits,
        curve,
        curve_rss,
    }
}

/// Everything the snapshotter level measured.
pub struct SnapshotterLevel {
    pub main: Pair<MainFigures>,
    pub limits: MachineLimits,
    /// The latency curve: one point per store size.
    pub curve: Pair<Vec<Point>>,
    /// Each server's peak RSS at the end of the curve.
    pub curve_rss: Pair<u64>,
}

/// What the main sequence measured for one snapshotter.
#[derive(Default)]
pub struct MainFigures {
    pub serial: Duration,
    pub serial_lat: Vec<Duration>,
    pub concurrent: Duration,
    pub stats: Duration,
    pub lists: Duration,
    pub list_size: usize,
    pub chain: Duration,
    pub views: Duration,
    pub big: Vec<Duration>,
    pub removed: usize,
    pub remove: RemoveAll,
    /// Serial Stats, one at a time: the cost of a round trip that does no I/O.
    pub stat_lat: Vec<Duration>,
    /// VmHWM after each step.
    pub hwm: Vec<(&'static str, u64)>,
    pub rss: u64,
}

/// What remove-all took.
#[derive(Default)]
pub struct RemoveAll {
    /// All the Removes.
    pub removes: Duration,
    pub cleanup_rpc: Duration,
    /// From the first Remove until nothing is left under `<root>/snapshots`: the Removes, then
    /// from the Cleanup call until the directories are gone.
    pub until_freed: Duration,
}

/// What the machine itself takes for the main sequence's durable work, on the filesystem that
/// holds both roots.
pub struct MachineLimits {
    /// Per serial pair: 2 mkdir + 2 × (4 KiB write + fsync), measured in the same rounds.
    pub pair: Duration,
    /// `rm -rf` of a tree shaped like the one remove-all frees.
    pub remove_all: Duration,
}

/// One store size of the latency curve, for one snapshotter.
pub struct Point {
    pub size: usize,
    pub populate: Duration,
    pub pair: Vec<Duration>,
    pub remove: Vec<Duration>,
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
        let range = chunk(s.concurrent, rounds, r);
        side.figures.concurrent += workloads::concurrent_pairs(
            &side.server.target,
            "conc",
            range,
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
            let range = filled + c.start..filled + c.end;
            let took = workloads::concurrent_pairs(
                &side.server.target,
                "pop",
                range,
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
