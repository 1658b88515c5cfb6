//! Start-up at scale: from spawning a snapshotter to its first answer, with the latency curve's
//! largest store, its files in the page cache (a restart) and not (a reboot, caches dropped);
//! and lamina after a SIGKILL that cut thousands of creations short.
//!
//! A creation cut short is a Prepare whose record committed and whose directories were not made
//! yet when the process died: recovery must make them before lamina answers, or the snapshot's
//! mounts would point nowhere. A SIGKILL during a burst of Prepares leaves a few of those (one
//! per Prepare in flight); to have thousands at once, the benchmark prepares them, kills
//! lamina, and deletes their directories, which is the state such a crash leaves on disk.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crate::{
    pair::{alternate, Pair},
    report::{self, Check},
    server::{Bins, Kind, Server},
    stage, sync_disks, workloads, Sizes,
};

/// What start-up at scale measured.
pub struct Startup {
    /// Snapshots in the store.
    pub size: usize,
    /// From spawn to the first answer, page cache warm.
    pub warm: Pair<Vec<Duration>>,
    /// The same, after `drop_caches`.
    pub cold: Pair<Vec<Duration>>,
    /// Creations cut short by the SIGKILL.
    pub cut: usize,
    /// lamina's start-up after that SIGKILL.
    pub killed: Vec<Duration>,
}

/// Restarts both servers on the latency curve's roots (filled here if the curve did not run)
/// and lamina after a SIGKILL.
pub async fn run(base: &Path, bins: &Bins, s: &Sizes) -> Startup {
    let size = s.scale.last().copied().unwrap_or(0);
    let dirs = Pair::new(|kind| base.join(format!("scale-{}", kind.label())));
    if !dirs.lamina.join("root").exists() {
        fill(&dirs, bins, s, size).await;
    }
    let mut sides = Pair::new(|kind| Side {
        kind,
        dir: match kind {
            Kind::Lamina => dirs.lamina.clone(),
            Kind::Overlay => dirs.overlay.clone(),
        },
        warm: Vec::new(),
        cold: Vec::new(),
    });
    stage(&format!("start-up with {size} snapshots: page cache warm"));
    alternate(0..s.startup_reps, sides.each_mut(), async |_, side| {
        sync_disks();
        let mut server = Server::start(side.kind, bins, &side.dir);
        side.warm.push(first_answer(&server).await);
        server.stop();
    })
    .await;
    stage(&format!(
        "start-up with {size} snapshots: page cache dropped"
    ));
    alternate(0..s.startup_reps, sides.each_mut(), async |_, side| {
        // Not in a smoke run: it would fail where /proc/sys is read-only, for no figure.
        if s.drop_caches {
            drop_caches();
        }
        let mut server = Server::start(side.kind, bins, &side.dir);
        side.cold.push(first_answer(&server).await);
        server.stop();
    })
    .await;

    let cut = s.startup_cut;
    stage(&format!(
        "start-up of lamina after a SIGKILL with {cut} creations cut short"
    ));
    let mut server = Server::start(Kind::Lamina, bins, &dirs.lamina);
    let ids = prepare_many(&server, cut, s.clients).await;
    let mut killed = Vec::new();
    for _ in 0..s.startup_reps {
        server.kill();
        for id in &ids {
            let dir = server.root.join("snapshots").join(id.to_string());
            fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
        }
        sync_disks();
        server = Server::start(Kind::Lamina, bins, &dirs.lamina);
        killed.push(first_answer(&server).await);
        // Recovery makes them before lamina answers: a Mounts meanwhile would point nowhere.
        let missing = ids
            .iter()
            .filter(|id| !server.root.join(format!("snapshots/{id}/fs")).is_dir())
            .count();
        assert_eq!(
            missing, 0,
            "lamina answered before recreating the directories of {missing} of {cut} \
             creations cut short"
        );
    }
    server.stop();
    for (side, warm, cold) in [
        ("lamina", &sides.lamina.warm, &sides.lamina.cold),
        ("overlay", &sides.overlay.warm, &sides.overlay.cold),
    ] {
        report::record_at("startup", "page cache warm", side, Some(size as u64), warm);
        report::record_at(
            "startup",
            "page cache dropped",
            side,
            Some(size as u64),
            cold,
        );
    }
    report::record_at(
        "startup",
        "after SIGKILL",
        "lamina",
        Some((size + cut) as u64),
        &killed,
    );
    Startup {
        size,
        warm: sides.as_ref().map(|side| side.warm.clone()),
        cold: sides.as_ref().map(|side| side.cold.clone()),
        cut,
        killed,
    }
}

/// One snapshotter's root and its samples.
struct Side {
    kind: Kind,
    dir: PathBuf,
    warm: Vec<Duration>,
    cold: Vec<Duration>,
}

/// Fills both roots with `size` committed snapshots, as the latency curve leaves them.
async fn fill(dirs: &Pair<PathBuf>, bins: &Bins, s: &Sizes, size: usize) {
    stage(&format!("filling both stores with {size} snapshots"));
    for (kind, dir) in [(Kind::Lamina, &dirs.lamina), (Kind::Overlay, &dirs.overlay)] {
        let mut server = Server::start(kind, bins, dir);
        let mut live = Vec::new();
        workloads::concurrent_pairs(&server.target, "pop", 0..size, s.clients, 1, &mut live).await;
        server.stop();
    }
}

/// From the server's spawn until it answers a Stat.
async fn first_answer(server: &Server) -> Duration {
    let mut client = server.target.client().await;
    while !client.answers().await {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.spawned.elapsed()
}

/// `n` parentless active snapshots from `clients` clients at once; returns their IDs (from the
/// bind mount of `snapshots/<id>/fs` lamina answers with).
async fn prepare_many(server: &Server, n: usize, clients: usize) -> Vec<u64> {
    let ids = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::new();
    for (c, mut client) in server.target.clients(clients).await.into_iter().enumerate() {
        let ids = Arc::clone(&ids);
        tasks.push(tokio::spawn(async move {
            for i in (c..n).step_by(clients) {
                let key = workloads::key("cut", i);
                let mounts = client.prepare(&key, "", Default::default()).await;
                let id = mounts
                    .first()
                    .and_then(|m| Path::new(&m.source).parent()?.file_name()?.to_str())
                    .and_then(|id| id.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("no snapshots/<id>/fs bind mount in {mounts:?}"));
                ids.lock().unwrap().push(id);
            }
        }));
    }
    for task in tasks {
        task.await.expect("prepare task");
    }
    Arc::try_unwrap(ids).unwrap().into_inner().unwrap()
}

/// Empties the page cache (after writing back what is dirty), as a reboot would find it.
fn drop_caches() {
    sync_disks();
    fs::write("/proc/sys/vm/drop_caches", "3").expect("writing /proc/sys/vm/drop_caches");
}

/// The start-up table.
pub fn table(st: &Startup) -> String {
    let reps = st.warm.lamina.len();
    let median = |xs: &[Duration]| report::median(xs);
    let checks = vec![
        Check {
            what: format!(
                "from spawn to the first answer, {} snapshots in the store, page cache warm \
                 (median (min – max) of {reps})",
                st.size
            ),
            value: st.warm.as_ref().map(|xs| report::spread(xs)),
            target: "≤ 1 s".into(),
            met: Some(median(&st.warm.lamina) <= Duration::from_secs(1)),
        },
        Check {
            what: format!(
                "the same, page cache dropped before each start (a reboot), median of {reps}"
            ),
            value: st.cold.as_ref().map(|xs| report::spread(xs)),
            target: "—".into(),
            met: None,
        },
        Check {
            what: format!(
                "after a SIGKILL with {} of its {} snapshots' creations cut short (median of \
                 {reps})",
                st.cut,
                st.size + st.cut
            ),
            value: Pair {
                lamina: report::spread(&st.killed),
                overlay: "—".into(),
            },
            target: "≤ 2 s".into(),
            met: Some(median(&st.killed) <= Duration::from_secs(2)),
        },
    ];
    format!(
        "### Start-up at scale\n\n{}\nEach start is timed from spawning the server to its first \
         answer (a Stat); the creations cut short are the records of Prepares whose directories \
         the benchmark deleted after a SIGKILL, all of them recreated before lamina answered.\n",
        report::checks_table(&checks)
    )
}
