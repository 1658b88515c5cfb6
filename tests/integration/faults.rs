//! Faults of the host under lamina: a full disk, a read-only root, a damaged store file, files
//! under the root that are not lamina's, a signal during start-up. Nothing acknowledged may be
//! lost, nothing may be deleted that lamina did not make, and every failure must say what is
//! wrong.

use std::{
    collections::BTreeMap,
    io::{Read, Seek, SeekFrom, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tonic::Code;

use crate::util::*;

/// Faults injected over all tests of this module.
static INJECTED: AtomicUsize = AtomicUsize::new(0);

fn injected(what: &str) {
    let n = INJECTED.fetch_add(1, Ordering::Relaxed) + 1;
    eprintln!("faults: injected #{n}: {what}");
}

/// A tmpfs mounted over a directory for the test; lazily unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(options),
        )
        .unwrap_or_else(|e| panic!("mount -t tmpfs -o {options} {}: {e}", path.display()));
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    fn remount(&self, flags: MsFlags) {
        mount(
            None::<&str>,
            &self.path,
            None::<&str>,
            MsFlags::MS_REMOUNT | flags,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("remount {flags:?} {}: {e}", self.path.display()));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
    }
}

/// A daemon whose root is a fresh tmpfs mounted with `options`. Fields drop in order: the
/// daemon is killed before its root is unmounted.
struct OnTmpfs {
    d: TestDaemon,
    fs: Tmpfs,
}

async fn daemon_on_tmpfs(options: &str) -> OnTmpfs {
    let mut d = TestDaemon::start().await;
    // Serving before the SIGTERM (a SIGTERM during start-up is tested on its own below).
    d.client().await.list(&[]).await.unwrap();
    let status = d.stop_async().await;
    assert!(status.success());
    std::fs::remove_dir_all(&d.root).unwrap();
    let fs = Tmpfs::mount(&d.root, options);
    d.spawn().await;
    OnTmpfs { d, fs }
}

/// What List says, sorted: name, kind, parent, labels.
async fn listed(c: &mut Client) -> Vec<(String, i32, String, BTreeMap<String, String>)> {
    let mut v: Vec<_> = c
        .list_batches(&[])
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|i| (i.name, i.kind, i.parent, i.labels.into_iter().collect()))
        .collect();
    v.sort();
    v
}

fn mentions_no_space(msg: &str) -> bool {
    let m = msg.to_lowercase();
    m.contains("no space left") || m.contains("space")
}

// ---------------------------------------------------------------------------------------------
// (a) A full disk
// ---------------------------------------------------------------------------------------------

root_test!(
    a_full_disk_fails_requests_clearly_and_recovers_when_space_returns,
    || {
        let mut t = daemon_on_tmpfs("size=4m,mode=0700").await;
        let mut c = t.d.client().await;
        let m = c.prepare("base-tmp", "").await.unwrap();
        std::fs::write(bind_source(&m).join("hello"), b"layer data").unwrap();
        c.commit("base", "base-tmp").await.unwrap();
        c.prepare("pending", "base").await.unwrap();
        let fill = c.prepare("fill", "").await.unwrap();
        let before = listed(&mut c).await;

        // Fill the root's filesystem through the snapshot's mount, as a container would.
        let filler = {
            let mnt = Mounted::new(&fill, &t.d.scratch("fill-mnt"));
            let path = mnt.join("filler");
            let mut f = std::fs::File::create(&path).unwrap();
            let chunk = vec![0x55u8; 64 << 10];
            let mut written = 0usize;
            let err = loop {
                match f.write_all(&chunk).and_then(|_| f.sync_data()) {
                    Ok(()) => written += chunk.len(),
                    Err(e) => break e,
                }
                assert!(written < 64 << 20, "a 4 MiB tmpfs took 64 MiB");
            };
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "filling: {err}");
            injected(&format!("ENOSPC on lamina's root after {written} bytes"));
            bind_source(&fill).join("filler")
        };

        // While full: every write either succeeds (and is then really done) or fails with a
        // message that says the disk is full. Reads keep working.
        let mut acked: Vec<String> = Vec::new();
        let mut failures: Vec<(String, Code, String)> = Vec::new();
        let big = labels(&[("containerd.io/snapshot/pad", &"p".repeat(4000))]);
        for i in 0..200 {
            let key = format!("full-{i}");
            match c.prepare_with(&key, "base", big.clone()).await {
                Ok(_) => acked.push(key),
                Err(s) => {
                    failures.push((format!("Prepare {key}"), s.code(), s.message().to_string()));
                    break;
                }
            }
        }
        match c.commit_with("pending-c", "pending", big.clone()).await {
            Ok(()) => acked.push("commit pending".into()),
            Err(s) => failures.push(("Commit pending".into(), s.code(), s.message().to_string())),
        }
        match c.view("full-view", "base").await {
            Ok(_) => acked.push("full-view".into()),
            Err(s) => failures.push(("View full-view".into(), s.code(), s.message().to_string())),
        }
        eprintln!("faults: while full, acknowledged {acked:?}; refused: {failures:?}");
        assert!(
            !failures.is_empty(),
            "nothing failed on a full disk after {} acknowledged writes",
            acked.len()
        );
        // Problems are gathered, so that one run shows every one of them.
        let mut problems: Vec<String> = Vec::new();
        for (what, code, msg) in &failures {
            if !matches!(code, Code::ResourceExhausted | Code::Internal) || !mentions_no_space(msg)
            {
                problems.push(format!(
                    "{what} on a full disk answered {code:?} {msg:?}, not that the disk is full"
                ));
            }
        }
        // Still serving reads, and the store holds exactly what was acknowledged.
        assert_eq!(c.stat("base").await.unwrap().kind, COMMITTED);
        let mut expected: std::collections::BTreeSet<String> =
            before.iter().map(|(n, ..)| n.clone()).collect();
        expected.extend(acked.iter().filter(|a| a.starts_with("full-")).cloned());
        let mut pending_committed = acked.iter().any(|a| a == "commit pending");
        if pending_committed {
            expected.remove("pending");
            expected.insert("pending-c".into());
        }
        let names = |l: Vec<(String, i32, String, BTreeMap<String, String>)>| {
            l.into_iter()
                .map(|(n, ..)| n)
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(
            names(listed(&mut c).await),
            expected,
            "while full, the store must hold exactly what was acknowledged"
        );

        // Space comes back: everything works again, without a restart.
        std::fs::remove_file(&filler).unwrap();
        injected("space freed");
        let writes = |c: &Client, round: &'static str| {
            let mut c = c.clone();
            async move {
                let p = format!("after-{round}");
                c.prepare(&p, "base")
                    .await
                    .map_err(|s| (format!("Prepare {p}"), s))?;
                c.commit(&format!("{p}-c"), &p)
                    .await
                    .map_err(|s| (format!("Commit {p}"), s))?;
                c.view(&format!("{p}-v"), &format!("{p}-c"))
                    .await
                    .map_err(|s| (format!("View on {p}-c"), s))?;
                Ok::<_, (String, tonic::Status)>(vec![format!("{p}-c"), format!("{p}-v")])
            }
        };
        match writes(&c, "free").await {
            Ok(made) => expected.extend(made),
            Err((what, s)) => problems.push(format!(
                "after the disk had space again, {what} still failed until a restart: {:?} {:?}",
                s.code(),
                s.message()
            )),
        }
        if !pending_committed && c.commit("pending-c", "pending").await.is_ok() {
            pending_committed = true;
            expected.remove("pending");
            expected.insert("pending-c".into());
        }
        // Whatever happened, a restart brings back exactly what was acknowledged, and works.
        drop(c);
        t.d.restart().await;
        let mut c = t.d.client().await;
        // A write that failed may have left a half-made snapshot behind only if nothing says so:
        // the names must be exactly the acknowledged ones.
        assert_eq!(names(listed(&mut c).await), expected, "after a restart");
        let made = writes(&c, "restart")
            .await
            .unwrap_or_else(|(what, s)| panic!("after a restart, {what}: {s:?}"));
        expected.extend(made);
        if !pending_committed {
            c.commit("pending-c", "pending").await.unwrap();
            expected.remove("pending");
            expected.insert("pending-c".into());
        }
        assert_eq!(names(listed(&mut c).await), expected);
        let m = c.view("check", "base").await.unwrap();
        assert_eq!(
            std::fs::read(Path::new(&m[0].source).join("hello")).unwrap(),
            b"layer data"
        );
        assert!(problems.is_empty(), "on a full disk: {problems:#?}");
    }
);

// ---------------------------------------------------------------------------------------------
// (b) A read-only root
// ---------------------------------------------------------------------------------------------

root_test!(
    a_read_only_root_is_refused_at_start_with_a_clear_message,
    || {
        let mut t = daemon_on_tmpfs("size=16m,mode=0700").await;
        let mut c = t.d.client().await;
        c.prepare("base-tmp", "").await.unwrap();
        c.commit("base", "base-tmp").await.unwrap();
        c.prepare("active", "base").await.unwrap();
        let before = listed(&mut c).await;
        drop(c);
        assert!(t.d.stop_async().await.success());
        let files = contents(&t.d.root);

        t.fs.remount(MsFlags::MS_RDONLY);
        injected("lamina's root remounted read-only");
        match start_or_exit(&t.d).await {
            Started::Exited(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                eprintln!(
                    "faults: on a read-only root lamina exited with {}: {stderr}",
                    out.status
                );
                assert!(!out.status.success(), "exit status {}", out.status);
                assert!(
                    stderr.contains(&t.d.root.display().to_string()),
                    "the message does not name the root: {stderr}"
                );
                assert!(
                    stderr.to_lowercase().contains("read-only"),
                    "the message does not say the root is read-only: {stderr}"
                );
            }
            Started::Serving(child) => {
                // Serving a read-only root is acceptable only if every write is refused clearly.
                let mut c = Client::connect(&t.d.socket).await;
                let res = c.prepare("new", "base").await;
                stop_child(child);
                match res {
                    Ok(_) => panic!("a Prepare succeeded on a read-only root"),
                    Err(s) => assert!(
                        s.message().to_lowercase().contains("read-only"),
                        "{:?} {}",
                        s.code(),
                        s.message()
                    ),
                }
            }
        }
        assert_eq!(contents(&t.d.root), files, "the read-only root changed");

        // Writable again: lamina starts, with everything.
        t.fs.remount(MsFlags::empty());
        let _ = std::fs::remove_file(&t.d.socket);
        t.d.spawn().await;
        let mut c = t.d.client().await;
        assert_eq!(listed(&mut c).await, before);
        c.prepare("new", "base").await.unwrap();
    }
);

// ---------------------------------------------------------------------------------------------
// (c) A damaged store file
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Damage {
    TruncatedToHalf,
    GarbageInTheMiddle,
    ZeroLength,
    /// Garbage over every page after the first: nothing of the store is readable.
    GarbageAfterTheHeader,
}

fn damage(path: &Path, how: Damage) {
    let len = std::fs::metadata(path).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    match how {
        Damage::TruncatedToHalf => f.set_len(len / 2).unwrap(),
        Damage::ZeroLength => f.set_len(0).unwrap(),
        Damage::GarbageInTheMiddle => {
            f.seek(SeekFrom::Start(len / 2 - 2048)).unwrap();
            f.write_all(&[0xa5; 4096]).unwrap();
        }
        Damage::GarbageAfterTheHeader => {
            let mut head = [0u8; 4096];
            f.read_exact(&mut head).unwrap();
            let garbage: Vec<u8> = (0..len - 4096).map(|i| (i * 7 + 13) as u8).collect();
            f.write_all(&garbage).unwrap();
        }
    }
    f.sync_all().unwrap();
}

async fn damaged_store_case(how: Damage) -> String {
    let mut d = TestDaemon::start().await;
    let mut c = d.client().await;
    let m = c.prepare("base-tmp", "").await.unwrap();
    std::fs::write(bind_source(&m).join("data"), b"precious layer").unwrap();
    c.commit_with(
        "base",
        "base-tmp",
        labels(&[("containerd.io/snapshot/l", "1")]),
    )
    .await
    .unwrap();
    c.prepare("active", "base").await.unwrap();
    c.view("view", "base").await.unwrap();
    for i in 0..50 {
        c.prepare_with(
            &format!("more-{i}"),
            "",
            labels(&[("l", &"x".repeat(1000))]),
        )
        .await
        .unwrap();
    }
    let before = listed(&mut c).await;
    drop(c);
    assert!(d.stop_async().await.success());
    let snapshots = d.root.join("snapshots");
    let files = contents(&snapshots);
    let db = d.root.join("metadata.redb");
    damage(&db, how);
    injected(&format!("{how:?} metadata.redb"));

    let (served, stderr) = match start_or_exit(&d).await {
        Started::Exited(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            eprintln!(
                "faults: {how:?}: lamina exited with {}: {stderr}",
                out.status
            );
            assert!(!out.status.success(), "{how:?}: exit status {}", out.status);
            (None, stderr)
        }
        Started::Serving(child) => {
            let mut c = Client::connect(&d.socket).await;
            let now = listed(&mut c).await;
            drop(c);
            stop_child(child);
            eprintln!(
                "faults: {how:?}: lamina started and lists {} snapshots",
                now.len()
            );
            (Some(now), String::new())
        }
    };
    // First of all: nothing of the snapshots' data may be gone.
    let after = contents(&snapshots);
    let lost: Vec<&String> = files.keys().filter(|k| !after.contains_key(*k)).collect();
    assert!(
        lost.is_empty() && after == files,
        "{how:?}: after {}, {} of {} paths under snapshots/ are gone (e.g. {:?})",
        if served.is_some() {
            "lamina started"
        } else {
            "a refused start"
        },
        lost.len(),
        files.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    match served {
        // Starting is acceptable only with every snapshot intact (the damage hit unused
        // space); never empty over existing snapshots.
        Some(now) => {
            assert_eq!(
                now.len(),
                before.len(),
                "{how:?}: lamina started over a damaged store, listing {} of {} snapshots",
                now.len(),
                before.len()
            );
            assert_eq!(now, before, "{how:?}: lamina started over a damaged store");
            String::from("started with everything intact")
        }
        None => {
            assert!(
                stderr.contains(&db.display().to_string()),
                "{how:?}: the message does not name the store file {}: {stderr}",
                db.display()
            );
            stderr
        }
    }
}

root_test!(a_truncated_store_is_refused_and_nothing_is_deleted, || {
    damaged_store_case(Damage::TruncatedToHalf).await;
});

root_test!(a_store_with_garbage_inside_is_refused_or_intact, || {
    damaged_store_case(Damage::GarbageInTheMiddle).await;
    damaged_store_case(Damage::GarbageAfterTheHeader).await;
});

root_test!(
    an_emptied_store_never_starts_empty_over_existing_snapshots,
    || {
        damaged_store_case(Damage::ZeroLength).await;
    }
);

// The message of a refused start says what to do, not only what went wrong.
root_test!(a_damaged_store_message_says_what_to_do, || {
    let msg = damaged_store_case(Damage::TruncatedToHalf).await;
    let lower = msg.to_lowercase();
    assert!(
        ["restore", "backup", "move", "remove", "delete", "repair", "fsck"]
            .iter()
            .any(|w| lower.contains(w)),
        "the message names the file but not what to do about it: {msg}"
    );
});

// ---------------------------------------------------------------------------------------------
// (d) Files under the root that are not lamina's
// ---------------------------------------------------------------------------------------------

daemon_test!(
    files_that_are_not_lamina_s_survive_recovery_and_cleanup,
    |mut d, mut c| {
        c.prepare("keep", "").await.unwrap();
        c.prepare("gone", "").await.unwrap();
        c.remove("gone").await.unwrap(); // its directory goes in the background
        let snaps = d.root.join("snapshots");
        let outside = d.scratch("outside");
        std::fs::write(outside.join("precious"), b"not lamina's").unwrap();

        let root = d.root.clone();
        let plant = |stage: &str| {
            std::fs::write(snaps.join(format!("not-ours-{stage}")), b"x").unwrap();
            std::fs::create_dir_all(snaps.join(format!("foo-{stage}/fs"))).unwrap();
            std::fs::write(snaps.join(format!("foo-{stage}/fs/data")), b"y").unwrap();
            std::fs::write(root.join(format!("extra-{stage}")), b"z").unwrap();
            std::fs::create_dir_all(snaps.join(format!("00{stage}"))).unwrap();
        };
        // While running, then again while stopped: Cleanup and start-up recovery both see them.
        plant("running");
        std::fs::create_dir_all(snaps.join("007")).unwrap();
        std::fs::create_dir_all(snaps.join("new-123/fs")).unwrap();
        std::fs::write(snaps.join(".hidden"), b"h").unwrap();
        // Decimal names lamina never made: a symlink to a directory outside the root, a file.
        std::os::unix::fs::symlink(&outside, snaps.join("900")).unwrap();
        std::fs::write(snaps.join("901"), b"a file, not a snapshot directory").unwrap();
        injected("foreign files and directories under the root");
        let foreign = |d: &TestDaemon| -> Vec<String> {
            let mut v: Vec<String> = d
                .snapshot_dirs()
                .into_iter()
                .filter(|n| !is_decimal(n) || n.starts_with('0'))
                .collect();
            v.sort();
            v
        };
        let foreign_before = foreign(&d);

        // Problems are gathered, so that one run shows every one of them.
        let mut problems: Vec<String> = Vec::new();
        if let Err(s) = c.cleanup().await {
            problems.push(format!(
                "Cleanup failed because of a file that is not lamina's: {:?} {:?}",
                s.code(),
                s.message()
            ));
        }
        assert_eq!(
            foreign(&d),
            foreign_before,
            "Cleanup deleted what is not lamina's"
        );
        assert_eq!(
            std::fs::read(outside.join("precious")).unwrap(),
            b"not lamina's"
        );
        assert!(d.root.join("extra-running").is_file());
        assert_eq!(
            std::fs::read(snaps.join("foo-running/fs/data")).unwrap(),
            b"y"
        );
        let kept_fs = bind_source(&c.mounts("keep").await.unwrap());
        assert!(kept_fs.is_dir());

        drop(c);
        assert!(d.stop_async().await.success());
        plant("stopped");
        let foreign_stopped = foreign(&d);
        match start_or_exit(&d).await {
            Started::Serving(child) => stop_child(child),
            Started::Exited(out) => {
                problems.push(format!(
                    "lamina refused to start because of a file that is not lamina's: {}",
                    final_line(&out.stderr)
                ));
                // Go on without the file that stops it, to check the rest.
                std::fs::remove_file(snaps.join("901")).unwrap();
            }
        }
        let _ = std::fs::remove_file(&d.socket);
        d.spawn().await;
        let mut c = d.client().await;
        assert_eq!(
            foreign(&d),
            foreign_stopped,
            "start-up recovery deleted what is not lamina's"
        );
        if let Err(s) = c.cleanup().await {
            problems.push(format!("second Cleanup: {:?} {:?}", s.code(), s.message()));
        }
        assert_eq!(foreign(&d), foreign_stopped);
        for stage in ["running", "stopped"] {
            assert!(d.root.join(format!("extra-{stage}")).is_file());
            assert!(snaps.join(format!("not-ours-{stage}")).is_file());
            assert_eq!(
                std::fs::read(snaps.join(format!("foo-{stage}/fs/data"))).unwrap(),
                b"y"
            );
        }
        assert_eq!(
            std::fs::read(outside.join("precious")).unwrap(),
            b"not lamina's"
        );
        assert_eq!(c.list(&[]).await.unwrap(), vec!["keep"]);
        c.prepare("after", "").await.unwrap();
        assert!(problems.is_empty(), "{problems:#?}");
    }
);

// ---------------------------------------------------------------------------------------------
// (e) A signal during start-up
// ---------------------------------------------------------------------------------------------

// containerd connects as soon as the socket exists; systemd may stop lamina at any moment. A
// SIGTERM while lamina is still starting (probe, store, recovery) must end it as cleanly as
// one while serving: exit 0, socket removed.
daemon_test!(sigterm_during_start_up_exits_cleanly, |mut d, mut c| {
    for i in 0..200 {
        c.prepare(&format!("s{i}"), "").await.unwrap();
    }
    drop(c);
    assert!(d.stop_async().await.success());
    let mut bad = Vec::new();
    for attempt in 0..5 {
        let mut child = d
            .command()
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let listening =
            wait_for_blocking(Duration::from_secs(20), Duration::from_millis(1), || {
                if child.try_wait().unwrap().is_some() {
                    panic!("lamina exited during start-up");
                }
                UnixStream::connect(&d.socket).ok()
            });
        assert!(listening.is_some(), "lamina never listened");
        let out = terminate(child);
        injected("SIGTERM during start-up");
        let socket_left = d.socket.exists();
        // Killed during its overlayfs probe, lamina would leave the probe mounted.
        let leaked = mounts_under(&d.root);
        if !out.status.success() || socket_left || !leaked.is_empty() {
            bad.push(format!(
                "attempt {attempt}: {} (socket left behind: {socket_left}; mounts left: \
                 {leaked:?}) {}",
                out.status,
                final_line(&out.stderr)
            ));
        }
        for m in leaked.iter().rev() {
            let _ = umount2(m.as_str(), MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_file(&d.socket);
    }
    d.spawn().await;
    let mut c = d.client().await;
    assert_eq!(c.list(&[]).await.unwrap().len(), 200);
    assert!(bad.is_empty(), "SIGTERM during start-up: {bad:#?}");
});

// ---------------------------------------------------------------------------------------------
// (f) A root that cannot be lamina's
// ---------------------------------------------------------------------------------------------

// `lamina serve --root /var/lib` by mistake, a root whose path breaks overlay options, a root
// whose name is not UTF-8: each is refused at once with a message that says why (no panic),
// and nothing in the directory is changed.
root_test!(a_root_that_cannot_be_lamina_s_is_refused_untouched, || {
    use std::os::unix::{ffi::OsStrExt, fs::PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("s.sock");
    let system = tmp.path().join("var-lib");
    std::fs::create_dir(&system).unwrap();
    for f in ["dpkg", "apt", "containerd"] {
        std::fs::create_dir(system.join(f)).unwrap();
    }
    std::fs::set_permissions(&system, std::fs::Permissions::from_mode(0o755)).unwrap();
    let comma = tmp.path().join("a,b");
    let bad_utf8 = tmp.path().join(std::ffi::OsStr::from_bytes(b"r\xff"));
    let mut problems = Vec::new();
    for (root, why) in [
        (&system, "not lamina's"),
        (&comma, "separator"),
        (&bad_utf8, "UTF-8"),
    ] {
        let args = [
            "serve".as_ref(),
            "--root".as_ref(),
            root.as_os_str(),
            "--address".as_ref(),
            socket.as_os_str(),
        ];
        match exits(lamina(args)) {
            None => problems.push(format!("{}: lamina started serving", root.display())),
            Some(out) => {
                let line = final_line(&out.stderr);
                eprintln!("faults: --root {}: {} {line}", root.display(), out.status);
                if out.status.code() != Some(2) || !line.contains(why) {
                    problems.push(format!("{}: {} {line:?}", root.display(), out.status));
                }
            }
        }
        let _ = std::fs::remove_file(&socket);
    }
    // Commands that only read the configuration must not panic on it either.
    for cmd in ["status", "fsck", "check"] {
        let args = [
            cmd.as_ref(),
            "--root".as_ref(),
            bad_utf8.as_os_str(),
            "--address".as_ref(),
            socket.as_os_str(),
        ];
        let out = exits(lamina(args)).unwrap();
        if out.status.code() != Some(2) {
            problems.push(format!("{cmd}: {} {}", out.status, final_line(&out.stderr)));
        }
    }
    let out = exits(lamina([
        "config".as_ref(),
        "dump".as_ref(),
        "--root".as_ref(),
        bad_utf8.as_os_str(),
    ]))
    .unwrap();
    if out.status.code() != Some(2) {
        problems.push(format!(
            "config dump: {} {}",
            out.status,
            final_line(&out.stderr)
        ));
    }
    assert_eq!(
        mode_of(&system),
        0o755,
        "the mode of a directory that is not lamina's changed"
    );
    let mut names: Vec<_> = std::fs::read_dir(&system)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["apt", "containerd", "dpkg"], "lamina wrote into it");
    assert!(problems.is_empty(), "{problems:#?}");
});

// Something replaced an active snapshot's directory with a symlink to a directory elsewhere
// while lamina was stopped. Recovery (and fsck) report it, but never create, chmod or chown
// anything through it.
daemon_test!(
    recovery_never_works_through_a_symlink_in_a_snapshot_s_place,
    |mut d, mut c| {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let base = bind_source(&c.prepare("base", "").await.unwrap());
        // Owned by someone else, so that a child's directories would be chowned to match it.
        std::os::unix::fs::chown(&base, Some(1234), Some(1234)).unwrap();
        c.commit("Base", "base").await.unwrap();
        let m = c.prepare("active", "Base").await.unwrap();
        let upper = own_fs(&m);
        drop(c);
        assert!(d.stop_async().await.success());
        let dir = upper.parent().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        let outside = d.scratch("outside");
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink(&outside, dir).unwrap();
        injected("a symlink in place of an active snapshot's directory");

        d.spawn().await;
        assert_eq!(mode_of(&outside), 0o750, "chmod through a symlink");
        let meta = std::fs::metadata(&outside).unwrap();
        assert_eq!(meta.uid(), 0, "chown through a symlink");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "recovery created directories where the symlink points"
        );
        assert!(std::fs::symlink_metadata(dir)
            .unwrap()
            .file_type()
            .is_symlink());
        let out = d.cli(&["fsck", "--repair"]);
        let text = stdout(&out);
        assert!(text.contains("not_a_directory:"), "{text}");
        assert!(!out.status.success());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }
);
