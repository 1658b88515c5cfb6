//! Power cuts. lamina's root gets a filesystem of its own, ext4 or xfs in a sparse image under
//! /dev/shm mounted through a loop device. Each round prepares snapshots, writes files into them
//! as containerd's applier writes a layer (plain writes, no fsync; through a bind mount, or
//! straight into an overlay's upper directory), commits, removes, and then cuts the power: the
//! filesystem is shut down without flushing its journal or log (FS_IOC_SHUTDOWN with
//! FS_SHUTDOWN_FLAGS_NOLOGFLUSH, what fstests' godown and `xfs_io -x -c shutdown` do), so the
//! disk keeps exactly what had reached it at that instant. lamina is SIGKILLed, the filesystem
//! unmounted and mounted again (replaying its journal), and lamina started on it.
//!
//! Then everything lamina acknowledged must be there: every committed layer, read back through
//! a View, holds exactly what was written before its Commit; every removed snapshot stays
//! removed; every prepared one still exists; start-up recovery leaves no directory without its
//! snapshot; `lamina fsck` finds nothing wrong. One round removes many layers before the cut,
//! and the last one cuts the power while a Cleanup is deleting directories.
//!
//! `LAMINA_POWERCUT_ROUNDS` sets the number of power cuts per filesystem (default 10).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::mount::{umount2, MntFlags};

use crate::util::*;

/// The upperdir label tells the test which directory each snapshot owns.
const CONFIG: &str = "upperdir_label = true\n";

/// `FS_IOC_SHUTDOWN` of linux/fs.h, `_IOR('X', 125, __u32)`; ext4 and xfs both take it.
const FS_IOC_SHUTDOWN: libc::c_ulong = (2 << 30) | (4 << 16) | ((b'X' as libc::c_ulong) << 8) | 125;
/// Shut down without writing out the journal or log: what was only in memory is lost, as when
/// the power goes.
const FS_SHUTDOWN_FLAGS_NOLOGFLUSH: u32 = 0x2;

root_test!(
    acknowledged_layers_survive_power_cuts_on_ext4,
    threads = 2,
    || {
        power_cuts("ext4").await;
    }
);

root_test!(
    acknowledged_layers_survive_power_cuts_on_xfs,
    threads = 2,
    || {
        power_cuts("xfs").await;
    }
);

/// True when `mkfs.<fstype>` can be run. Without it the test prints why and skips, except
/// under CI, where `.ci/setup` installs it.
fn require_mkfs(fstype: &str) -> bool {
    let tool = format!("mkfs.{fstype}");
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(&tool).is_file());
    if found {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs {tool} and CI is set: run .ci/setup");
    }
    eprintln!("skipped: needs {tool}");
    false
}

/// A filesystem for lamina's root alone: a sparse image under /dev/shm, loop-mounted. The image
/// is in RAM, so the test is fast, and whatever the filesystem had written to its device
/// survives the power cut, as on a real disk.
struct LoopFs {
    fstype: &'static str,
    image: PathBuf,
    mnt: PathBuf,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn new(fstype: &'static str) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("lamina-powercut.")
            .tempdir_in("/dev/shm")
            .expect("a directory under /dev/shm");
        let image = dir.path().join(format!("{fstype}.img"));
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        // 1 GiB (xfs wants 300 MiB at least), sparse: only what is written takes memory.
        fs::File::create(&image)
            .and_then(|f| f.set_len(1 << 30))
            .unwrap();
        let force = if fstype == "xfs" { "-f" } else { "-F" };
        run(Command::new(format!("mkfs.{fstype}"))
            .args(["-q", force])
            .arg(&image));
        let mut lfs = LoopFs {
            fstype,
            image,
            mnt,
            mounted: false,
            _dir: dir,
        };
        lfs.mount();
        lfs
    }

    fn mount(&mut self) {
        run(Command::new("mount")
            .args(["-t", self.fstype, "-o", "loop"])
            .arg(&self.image)
            .arg(&self.mnt));
        self.mounted = true;
    }

    /// Unmounts for real (the loop device goes with it). Never lazily: mounting the image
    /// again while the old superblock lived on would put two filesystems on one device.
    fn unmount(&mut self) {
        let unmounted = wait_for_blocking(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || match umount2(&self.mnt, MntFlags::empty()) {
                Err(nix::errno::Errno::EBUSY) => None,
                done => Some(done),
            },
        );
        match unmounted {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("unmounting {}: {e}", self.mnt.display()),
            None => panic!("unmounting {}: still busy after 10 s", self.mnt.display()),
        }
        self.mounted = false;
    }

    /// The power cut: from now on the filesystem writes nothing more to its device, not even
    /// the journal or log records it holds in memory, and fails every call with EIO.
    fn cut_power(&self) {
        let dir = fs::File::open(&self.mnt).unwrap();
        let flags: u32 = FS_SHUTDOWN_FLAGS_NOLOGFLUSH;
        // SAFETY: the descriptor is open for the whole call, and the kernel reads one u32
        // through the pointer, which points at a live local.
        let ret = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_SHUTDOWN, &flags as *const u32) };
        assert_eq!(
            ret,
            0,
            "FS_IOC_SHUTDOWN on {} ({}): {}",
            self.mnt.display(),
            self.fstype,
            io::Error::last_os_error()
        );
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = umount2(&self.mnt, MntFlags::MNT_DETACH);
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a layer into `top` with plain writes and no fsync, as containerd's applier does,
/// and returns what a View of it must show: `below` (its parent's tree) with the changes.
/// `files` files of up to `max_size` random bytes, under `tag/`. `top` is the snapshot's mount,
/// or with `into_upper` its overlay's upper directory, where a deletion is a whiteout.
fn write_layer(
    top: &Path,
    tag: &str,
    files: usize,
    max_size: usize,
    rng: &mut Rng,
    below: &Tree,
    into_upper: bool,
) -> Tree {
    let mut tree = below.clone();
    for dir in [tag.to_string(), format!("{tag}/sub")] {
        fs::create_dir(top.join(&dir)).unwrap();
        tree.insert(dir, Entry::Dir);
    }
    for i in 0..files {
        let rel = if i % 4 == 3 {
            format!("{tag}/sub/f{i}")
        } else {
            format!("{tag}/f{i}")
        };
        let data = random_bytes(rng, max_size);
        fs::write(top.join(&rel), &data).unwrap();
        tree.insert(rel, Entry::File(data));
    }
    let link = format!("{tag}/link");
    std::os::unix::fs::symlink("f0", top.join(&link)).unwrap();
    tree.insert(link, Entry::Symlink("f0".into()));
    // Over a parent: rewrite one of its files (a copy-up) and delete another (a whiteout).
    let theirs: Vec<String> = below
        .iter()
        .filter(|(_, e)| matches!(e, Entry::File(_)))
        .map(|(p, _)| p.clone())
        .collect();
    if theirs.len() >= 2 {
        let i = rng.below(theirs.len());
        let j = (i + 1 + rng.below(theirs.len() - 1)) % theirs.len();
        let data = random_bytes(rng, max_size);
        for path in [&theirs[i], &theirs[j]] {
            // In the upper directory, the lower's directories are not there yet.
            fs::create_dir_all(top.join(path).parent().unwrap()).unwrap();
        }
        fs::write(top.join(&theirs[i]), &data).unwrap();
        tree.insert(theirs[i].clone(), Entry::File(data));
        if into_upper {
            nix::sys::stat::mknod(
                &top.join(&theirs[j]),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .unwrap();
        } else {
            fs::remove_file(top.join(&theirs[j])).unwrap();
        }
        tree.remove(&theirs[j]);
    }
    tree
}

/// Between 1 and `max` random bytes: never empty, so that a file the power cut emptied cannot
/// pass for one written so.
fn random_bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    let n = 1 + rng.below(max);
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(n);
    out
}

/// What lamina acknowledged so far, and what was found broken after a power cut.
#[derive(Default)]
struct Acked {
    /// Committed layers (not removed since), what a View of each must show, and its parent.
    committed: BTreeMap<String, (Tree, String)>,
    removed: Vec<String>,
    /// Prepared and written into, never committed: the snapshot must exist, its data may not.
    active: Vec<String>,
    /// Committed layers found lost or torn, with what was wrong; checked no more and never
    /// used as parents again.
    broken: BTreeMap<String, String>,
    /// Everything else found wrong after a power cut.
    problems: Vec<String>,
}

impl Acked {
    /// Committed layers that no other committed layer is stacked on (only those can be
    /// removed), intact ones only.
    fn leaves(&self) -> Vec<String> {
        let parents: BTreeSet<&String> = self.committed.values().map(|(_, p)| p).collect();
        self.committed
            .keys()
            .filter(|n| !parents.contains(n) && !self.broken.contains_key(*n))
            .cloned()
            .collect()
    }

    fn intact(&self) -> Vec<String> {
        self.committed
            .keys()
            .filter(|n| !self.broken.contains_key(*n))
            .cloned()
            .collect()
    }
}

/// One client's work in a round.
struct Round<'a> {
    d: &'a TestDaemon,
    c: Client,
    rng: Rng,
    round: usize,
    acked: &'a mut Acked,
}

impl Round<'_> {
    /// Prepare on `parent`, write a layer as containerd's applier does, Commit; records the
    /// layer once the Commit is acknowledged.
    async fn commit_layer(&mut self, tag: &str, parent: &str, files: usize, max_size: usize) {
        let key = format!("k-{tag}");
        let name = format!("C-{tag}");
        let mounts = self.c.prepare(&key, parent).await.unwrap();
        let below = match self.acked.committed.get(parent) {
            Some((tree, _)) => tree.clone(),
            None => Tree::new(),
        };
        // As containerd's applier: an overlay is never mounted, the layer goes straight into
        // its upper directory (and that matters here: unmounting an overlay syncs its upper
        // directory's filesystem); anything else is mounted and written through.
        let upper = (mounts[0].r#type == "overlay").then(|| own_fs(&mounts));
        let tree = match upper {
            Some(upper) => write_layer(&upper, tag, files, max_size, &mut self.rng, &below, true),
            None => {
                let m = Mounted::new(&mounts, &self.d.scratch(&format!("w-{tag}")));
                write_layer(m.path(), tag, files, max_size, &mut self.rng, &below, false)
            }
        };
        self.c.commit(&name, &key).await.unwrap();
        self.acked
            .committed
            .insert(name, (tree, parent.to_string()));
    }

    async fn remove(&mut self, name: &str) {
        self.c.remove(name).await.unwrap();
        self.acked.committed.remove(name);
        self.acked.removed.push(name.to_string());
    }

    /// A snapshot prepared and written into but not committed.
    async fn leave_active(&mut self) {
        let key = format!("active-{}", self.round);
        let mounts = self.c.prepare(&key, "").await.unwrap();
        let m = Mounted::new(&mounts, &self.d.scratch(&key));
        write_layer(
            m.path(),
            "uncommitted",
            4,
            4096,
            &mut self.rng,
            &Tree::new(),
            false,
        );
        drop(m);
        self.acked.active.push(key);
    }

    /// Layers, some stacked, with a Remove now and then; the power goes right after a Commit
    /// is acknowledged.
    async fn layers(&mut self) {
        let r = self.round;
        let leaves = self.acked.leaves();
        if !leaves.is_empty() && self.rng.chance(50) {
            let victim = self.rng.pick(&leaves).clone();
            self.remove(&victim).await;
        }
        self.leave_active().await;
        self.commit_stacked(&format!("{r}b")).await;
        self.commit_layer(&format!("{r}a"), "", 24, 256 << 10).await;
    }

    /// A layer on a random intact committed one (parentless when there is none).
    async fn commit_stacked(&mut self, tag: &str) {
        let intact = self.acked.intact();
        let parent = match intact.is_empty() {
            true => String::new(),
            false => self.rng.pick(&intact).clone(),
        };
        self.commit_layer(tag, &parent, 24, 64 << 10).await;
    }

    /// Many Removes, of fresh layers and of older ones; the power goes right after the last
    /// is acknowledged, while the directories are being deleted.
    async fn remove_heavy(&mut self) {
        let r = self.round;
        for i in 0..6 {
            self.commit_layer(&format!("{r}h{i}"), "", 400, 4096).await;
        }
        let mut leaves = self.acked.leaves();
        // Keep one layer from before, for the rounds after.
        leaves.retain(|n| !n.starts_with(&format!("C-{r}h")));
        leaves.pop();
        for i in 0..6 {
            self.remove(&format!("C-{r}h{i}")).await;
        }
        for name in leaves {
            self.remove(&name).await;
        }
    }
}

/// The power cut and what follows: lamina SIGKILLed, the filesystem unmounted and mounted
/// again, lamina started on it.
async fn cut_and_restart(lfs: &mut LoopFs, d: &mut TestDaemon) {
    lfs.cut_power();
    d.kill();
    lfs.unmount();
    lfs.mount();
    // Panics if lamina cannot start: the store must open.
    d.spawn().await;
}

/// After a power cut: everything acknowledged is as it was acknowledged, start-up recovery
/// leaves no directory without its snapshot, and fsck is clean. Records what is wrong.
async fn verify(d: &TestDaemon, acked: &mut Acked, fstype: &str, round: usize) {
    let mut c = d.client().await;
    let at = format!("{fstype}, after power cut {round}");
    for name in acked.intact() {
        let want = acked.committed[&name].0.clone();
        if let Some(wrong) = check_layer(d, &mut c, &name, &want, round).await {
            acked.broken.insert(name, format!("{at}: {wrong}"));
        }
    }
    for name in &acked.removed {
        match c.stat(name).await {
            Err(s) if s.code() == tonic::Code::NotFound => {}
            other => acked
                .problems
                .push(format!("{at}: removed {name} is back: Stat says {other:?}")),
        }
    }
    for key in &acked.active {
        match c.stat(key).await {
            Ok(info) if info.kind == ACTIVE => {}
            other => acked
                .problems
                .push(format!("{at}: prepared {key} lost: Stat says {other:?}")),
        }
    }
    // Recovery recreates what a creation did not finish before serving, and deletes orphans
    // (left by Removes and by the Cleanup the power cut interrupted) in the background.
    let owned = owned_dirs(&mut c).await;
    let settled: BTreeSet<String> = d
        .snapshot_dirs_when(Duration::from_secs(30), |dirs| {
            dirs.iter().all(|d| owned.contains(d))
        })
        .await
        .into_iter()
        .collect();
    let orphans: Vec<_> = settled.difference(&owned).collect();
    if !orphans.is_empty() {
        acked.problems.push(format!(
            "{at}: directories without a snapshot 30 s after start-up: {orphans:?}"
        ));
    }
    let missing: Vec<_> = owned.difference(&settled).collect();
    if !missing.is_empty() {
        acked
            .problems
            .push(format!("{at}: snapshots without a directory: {missing:?}"));
    }
    let fsck = d.cli(&["fsck"]);
    let report = stdout(&fsck);
    if !fsck.status.success() || !report.contains(": clean") {
        acked.problems.push(format!(
            "{at}: lamina fsck ({}): {report}{}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stderr)
        ));
    }
}

/// None when committed layer `name` exists and a View of it shows exactly `want`; else what is
/// wrong with it.
async fn check_layer(
    d: &TestDaemon,
    c: &mut Client,
    name: &str,
    want: &Tree,
    round: usize,
) -> Option<String> {
    match c.stat(name).await {
        Err(s) => return Some(format!("lost: Stat says {:?}: {}", s.code(), s.message())),
        Ok(info) if info.kind != COMMITTED => {
            return Some(format!("no longer committed: kind {}", info.kind))
        }
        Ok(_) => {}
    }
    let view = format!("check-{round}-{name}");
    let mounts = match c.view(&view, name).await {
        Ok(m) => m,
        Err(s) => return Some(format!("View refused: {:?}: {}", s.code(), s.message())),
    };
    let target = d.scratch(&view);
    // A layer whose directory is gone cannot be mounted: report it with the others rather than
    // stop at the first.
    let got = std::panic::catch_unwind(|| {
        let m = Mounted::new(&mounts, &target);
        read_tree(m.path())
    });
    c.remove(&view).await.unwrap();
    match got {
        Err(_) => Some("its View does not mount".into()),
        Ok(Err(e)) => Some(format!("cannot be read through a View: {e}")),
        Ok(Ok(got)) => {
            let wrong = differences(&got, want);
            let shown: Vec<&str> = wrong.iter().take(3).map(String::as_str).collect();
            (!wrong.is_empty()).then(|| {
                format!(
                    "{} of {} entries wrong, e.g. {}",
                    wrong.len(),
                    want.len(),
                    shown.join("; ")
                )
            })
        }
    }
}

async fn power_cuts(fstype: &'static str) {
    if !require_mkfs(fstype) {
        return;
    }
    let rounds = env_or("LAMINA_POWERCUT_ROUNDS", 10) as usize;
    let mut lfs = LoopFs::new(fstype);
    let mut d = TestDaemon::start_in(&lfs.mnt.join("lamina"), CONFIG).await;
    let mut acked = Acked::default();
    let mut rng = Rng::new(0x706f_7765_7263_7574 ^ fstype.len() as u64);
    let (mut commits, mut removes) = (0, 0);
    for round in 0..rounds {
        let c = d.client().await;
        let before = (acked.committed.len(), acked.removed.len());
        let mut w = Round {
            d: &d,
            c,
            rng: Rng::new(rng.next_u64()),
            round,
            acked: &mut acked,
        };
        let mut cleanup = None;
        let what = if round + 1 == rounds && rounds >= 2 {
            // A layer to keep; layers with many files to delete, removed; then a Cleanup that
            // waits for their deletion, and the power goes while it runs.
            w.commit_stacked(&format!("{round}k")).await;
            for i in 0..4 {
                w.commit_layer(&format!("{round}c{i}"), "", 2000, 512).await;
            }
            for i in 0..4 {
                w.remove(&format!("C-{round}c{i}")).await;
            }
            let mut c = w.c.clone();
            cleanup = Some(tokio::spawn(async move { c.cleanup().await }));
            tokio::time::sleep(Duration::from_millis(5)).await;
            "during a Cleanup"
        } else if round == rounds / 2 && rounds >= 3 {
            w.remove_heavy().await;
            "after many Removes"
        } else {
            w.layers().await;
            "after a Commit"
        };
        let added = acked.committed.len() + acked.removed.len() - before.0 - before.1;
        let removed = acked.removed.len() - before.1;
        commits += added;
        removes += removed;
        cut_and_restart(&mut lfs, &mut d).await;
        let cleanup = match cleanup {
            None => String::new(),
            Some(task) => match tokio::time::timeout(Duration::from_secs(20), task).await {
                Ok(Ok(Ok(()))) => "; the Cleanup had answered before the cut".into(),
                Ok(Ok(Err(s))) => format!("; the Cleanup was cut off ({})", s.code()),
                Ok(Err(e)) => panic!("cleanup task: {e}"),
                Err(_) => "; the Cleanup was cut off (no answer)".into(),
            },
        };
        let broken = acked.broken.len();
        verify(&d, &mut acked, fstype, round).await;
        eprintln!(
            "{fstype} round {round}: power cut {what} ({added} commits, {removed} removes \
             acknowledged{cleanup}); {} committed layers checked, {} newly found lost or torn",
            acked.committed.len(),
            acked.broken.len() - broken
        );
    }
    d.stop_async().await;
    lfs.unmount();
    eprintln!(
        "{fstype}: {rounds} power cuts, {commits} acknowledged commits and {removes} removes"
    );
    let mut failure = String::new();
    if !acked.broken.is_empty() {
        failure += &format!(
            "{fstype}: {} of the {} committed layers lost or torn by {rounds} power cuts \
             ({commits} commits acknowledged, {removes} removes):\n",
            acked.broken.len(),
            acked.committed.len()
        );
        for (name, what) in &acked.broken {
            failure += &format!("  {name}: {what}\n");
        }
    }
    // The same problem tends to come back after every later power cut: the first few say it.
    for p in acked.problems.iter().take(4) {
        failure += &format!("{p}\n");
    }
    if acked.problems.len() > 4 {
        failure += &format!("(and {} more problems)\n", acked.problems.len() - 4);
    }
    assert!(failure.is_empty(), "{failure}");
    assert!(
        commits > 0,
        "nothing was committed: the test proved nothing"
    );
}
