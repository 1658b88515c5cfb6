//! The daemon's life: its socket and root, a second daemon, a stale socket, SIGTERM, a restart,
//! its configuration.

use super::*;

// ---------------------------------------------------------------------------------------------
// The daemon's life
// ---------------------------------------------------------------------------------------------

daemon_test!(socket_is_a_0660_socket_and_root_is_0700, |d| {
    let meta = std::fs::symlink_metadata(&d.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode_of(&d.socket), 0o660);
    assert_eq!(mode_of(&d.root), 0o700);
});

daemon_test!(
    a_second_daemon_on_the_same_socket_refuses_to_start,
    |d, mut c| {
        c.prepare("a", "").await.unwrap();
        let other_root = d.scratch("other-root");

        let out = run_to_exit(lamina([
            "serve".as_ref(),
            "--root".as_ref(),
            other_root.as_os_str(),
            "--address".as_ref(),
            d.socket.as_os_str(),
        ]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "second lamina exited {}", out.status);
        assert!(stderr.contains("already serving"), "stderr: {stderr}");

        // The first one still owns and serves the socket.
        assert!(std::fs::symlink_metadata(&d.socket)
            .unwrap()
            .file_type()
            .is_socket());
        let mut fresh = d.client().await;
        assert_eq!(fresh.stat("a").await.unwrap().kind, ACTIVE);
    }
);

root_test!(an_address_that_is_not_a_socket_is_left_alone, || {
    let dir = tempfile::tempdir().unwrap();
    let address = dir.path().join("lamina.sock");
    std::fs::write(&address, b"precious").unwrap();
    let out = run_to_exit(lamina([
        "serve".as_ref(),
        "--root".as_ref(),
        dir.path().join("root").as_os_str(),
        "--address".as_ref(),
        address.as_os_str(),
    ]));
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&address).unwrap(), b"precious");
});

daemon_test!(a_stale_socket_is_replaced, |mut d, mut c| {
    c.prepare("a", "").await.unwrap();
    assert!(d.stop().success());
    drop(c);

    drop(std::os::unix::net::UnixListener::bind(&d.socket).unwrap());
    assert!(std::fs::symlink_metadata(&d.socket)
        .unwrap()
        .file_type()
        .is_socket());
    assert!(UnixStream::connect(&d.socket).is_err());

    d.spawn().await;
    let mut c = d.client().await;
    assert_eq!(c.stat("a").await.unwrap().kind, ACTIVE);
    assert_eq!(mode_of(&d.socket), 0o660);
});

daemon_test!(sigterm_exits_zero_and_removes_the_socket, |mut d, mut c| {
    c.prepare("a", "").await.unwrap();
    let status = d.stop();
    assert_eq!(status.code(), Some(0), "{status}");
    match std::fs::symlink_metadata(&d.socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => panic!("the socket is still there: {other:?}"),
    }
});

daemon_test!(data_persists_across_restart, |mut d, mut c| {
    let p_fs = commit_new(&mut c, "P", "", labels(&[("l", "p")])).await;
    std::fs::write(p_fs.join("f"), b"x").unwrap();
    c.prepare_with("a", "P", labels(&[("l", "a")]))
        .await
        .unwrap();
    c.view("v", "P").await.unwrap();
    c.update(info("v", labels(&[("u", "1")])), &[])
        .await
        .unwrap();
    let keys = ["P", "a", "v"];
    let mut before = Vec::new();
    for k in keys {
        before.push(c.stat(k).await.unwrap());
    }
    let usage = c.usage("P").await.unwrap();
    let mounts = (c.mounts("a").await.unwrap(), c.mounts("v").await.unwrap());
    let dirs = d.snapshot_dirs();

    d.restart().await;
    let mut c = d.client().await;
    for (k, b) in keys.iter().zip(&before) {
        assert_eq!(&c.stat(k).await.unwrap(), b, "{k}");
    }
    assert_eq!(c.usage("P").await.unwrap(), usage);
    assert_eq!(
        (c.mounts("a").await.unwrap(), c.mounts("v").await.unwrap()),
        mounts
    );
    assert_eq!(c.list(&[]).await.unwrap(), names(&keys));
    assert_code(c.remove("P").await, Code::FailedPrecondition, "P");
    let new = id_of(own_fs(&c.prepare("b", "").await.unwrap())).to_string();
    assert!(!dirs.contains(&new), "IDs are not handed out again");
});

root_test!(an_unknown_config_key_is_refused_by_name, || {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "sync_remove = true\nbogus_option = 1\n").unwrap();
    let address = dir.path().join("lamina.sock");
    let out = run_to_exit(lamina([
        "serve".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--root".as_ref(),
        dir.path().join("root").as_os_str(),
        "--address".as_ref(),
        address.as_os_str(),
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exited {}", out.status);
    assert!(stderr.contains("bogus_option"), "stderr: {stderr}");
    assert!(!address.exists(), "no socket was bound");
});

daemon_test!(
    socket_group_owns_the_socket,
    config = "socket_group = \"4321\"\n",
    |d| {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(&d.socket).unwrap();
        assert_eq!(meta.gid(), 4321);
        assert_eq!(meta.uid(), 0);
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    }
);

// Started with umask 000, lamina's socket is never at its address with a mode wider than
// 0660, not even for a moment: an inotify watch on its directory sees the name appear, its
// mode is read at once, and it must never be changed afterwards (a chmod or chown after the
// name appeared means it had another mode before). Half the rounds start over a stale
// socket, which must be replaced the same way. The log names the address clients use.
root_test!(
    the_socket_never_has_a_wider_mode_than_0660,
    threads = 2,
    || {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        use std::os::unix::process::CommandExt;
        for round in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let run = dir.path().join("run");
            std::fs::create_dir(&run).unwrap();
            let socket = run.join("lamina.sock");
            if round % 2 == 1 {
                // Stale: nobody listens on it any more.
                drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
            }
            let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).unwrap();
            inotify
                .add_watch(
                    &run,
                    AddWatchFlags::IN_CREATE
                        | AddWatchFlags::IN_MOVED_TO
                        | AddWatchFlags::IN_ATTRIB,
                )
                .unwrap();
            let mut cmd = lamina(["serve"]);
            cmd.arg("--root")
                .arg(dir.path().join("root"))
                .arg("--address")
                .arg(&socket)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stderr(Stdio::piped());
            // SAFETY: umask(2) is async-signal-safe and allocates nothing.
            unsafe {
                cmd.pre_exec(|| {
                    libc::umask(0);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().unwrap();

            // (what happened to the name, its mode in octal read right then)
            let mut seen: Vec<(String, Option<String>)> = Vec::new();
            let served = wait_for(
                Duration::from_secs(20),
                Duration::from_millis(2),
                async || {
                    assert!(child.try_wait().unwrap().is_none(), "lamina exited");
                    // Once it answers, every event of its start-up is queued already.
                    let answered = UnixStream::connect(&socket).is_ok();
                    loop {
                        let events = match inotify.read_events() {
                            Ok(events) => events,
                            Err(nix::errno::Errno::EAGAIN) => break,
                            Err(e) => panic!("inotify: {e}"),
                        };
                        for e in events {
                            if e.name.as_deref() != Some(std::ffi::OsStr::new("lamina.sock")) {
                                continue;
                            }
                            let mode = std::fs::symlink_metadata(&socket)
                                .ok()
                                .map(|m| format!("{:o}", m.permissions().mode() & 0o7777));
                            seen.push((format!("{:?}", e.mask), mode));
                        }
                    }
                    answered.then_some(())
                },
            )
            .await;
            assert!(served.is_some(), "lamina did not serve");
            let appeared = seen
                .iter()
                .position(|(what, _)| what.contains("IN_CREATE") || what.contains("IN_MOVED_TO"))
                .unwrap_or_else(|| panic!("round {round}: the socket never appeared: {seen:?}"));
            for (what, mode) in &seen[appeared..] {
                assert!(
                    !what.contains("IN_ATTRIB"),
                    "round {round}: the socket's mode or owner changed after it appeared at its \
                 address, so it had another mode there before: {seen:?}"
                );
                assert_eq!(mode.as_deref(), Some("660"), "round {round}: {seen:?}");
            }
            assert_eq!(mode_of(&socket), 0o660);

            // Serving (a SIGTERM during start-up would exit before the line below is logged).
            let mut c = Client::connect(&socket).await;
            assert_eq!(c.list(&[]).await.unwrap(), Vec::<String>::new());
            drop(c);
            let names: Vec<_> = std::fs::read_dir(&run)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                names,
                ["lamina.sock"],
                "once serving, nothing else is left beside it"
            );
            let out = terminate(child);
            assert!(out.status.success(), "{out:?}");
            let logs = stderr(&out);
            let serving = logs
                .lines()
                .find(|l| l.contains(" serving "))
                .unwrap_or_else(|| panic!("no serving line: {logs}"));
            assert!(
                serving.contains(&format!("address={}", socket.display())),
                "{serving}"
            );
        }
    }
);
