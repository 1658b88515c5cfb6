//! Operating lamina: the admin API through the CLI, health, metrics, fsck, check, mount, logs.

use std::{
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use nix::sys::signal::Signal;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use crate::util::*;

daemon_test!(
    status_reports_counts_features_and_config,
    threads = 2,
    |d, mut c| {
        c.prepare("a", "").await.unwrap();
        c.commit("A", "a").await.unwrap();
        c.prepare("b", "A").await.unwrap();
        c.view("v", "A").await.unwrap();
        let out = d.cli(&["status"]);
        assert!(out.status.success(), "{out:?}");
        let text = stdout(&out);
        assert!(
            text.contains("snapshots:     1 active, 1 views, 1 committed"),
            "{text}"
        );
        assert!(
            text.contains(&format!("root:          {}", d.root.display())),
            "{text}"
        );
        for feature in [
            "overlayfs",
            "d_type",
            "index",
            "metacopy",
            "userxattr",
            "idmapped_mounts",
            "lowerdir+",
        ] {
            assert!(
                text.contains(&format!("  {feature} ")),
                "{feature} missing: {text}"
            );
        }
        assert!(text.contains("sync_remove = false"), "{text}");
    }
);

daemon_test!(
    fsck_finds_and_repairs_online_and_offline,
    threads = 2,
    config = "upperdir_label = true\n",
    |mut d, mut c| {
        c.prepare("act", "").await.unwrap();
        let fs = PathBuf::from(&c.stat("act").await.unwrap().labels[UPPERDIR]);
        let dir = fs.parent().unwrap().to_path_buf();
        let clean = d.cli(&["fsck"]);
        assert!(clean.status.success(), "{clean:?}");
        assert!(stdout(&clean).contains("clean"));

        // An orphan, a foreign entry, a lost work directory, a wrong mode.
        let orphan = d
            .root
            .join(format!("snapshots/{}", spent_id(&d, &mut c).await));
        std::fs::create_dir_all(orphan.join("fs")).unwrap();
        std::fs::create_dir(d.root.join("snapshots/not-ours")).unwrap();
        std::fs::remove_dir(dir.join("work")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let found = d.cli(&["fsck"]);
        assert!(
            !found.status.success(),
            "problems must give a non-zero exit"
        );
        let text = stdout(&found);
        for kind in ["orphan:", "foreign:", "missing_workdir:", "wrong_mode:"] {
            assert!(text.contains(kind), "{kind} not reported: {text}");
        }
        assert!(orphan.exists(), "fsck without --repair changes nothing");

        let repaired = d.cli(&["fsck", "--repair"]);
        assert!(repaired.status.success(), "{repaired:?}");
        assert!(!orphan.exists());
        assert!(
            d.root.join("snapshots/not-ours").exists(),
            "what is not lamina's is never deleted"
        );
        assert!(dir.join("work").is_dir());

        // Offline, on the stopped daemon's root.
        let orphan = d
            .root
            .join(format!("snapshots/{}", spent_id(&d, &mut c).await));
        drop(c);
        d.stop_async().await;
        std::fs::create_dir_all(orphan.join("fs")).unwrap();
        let offline = d.cli(&["fsck", "--repair"]);
        assert!(offline.status.success(), "{offline:?}");
        assert!(stdout(&offline).contains("orphan:"));
        assert!(!orphan.exists());

        // While a daemon runs, an offline fsck on its root is refused (one writer at a time).
        d.spawn().await;
        let blocked = d.offline(&["fsck"]);
        // Could not run at all: 2, where problems found would be 1.
        assert_eq!(blocked.status.code(), Some(2), "{blocked:?}");
        assert!(
            stderr(&blocked).contains("in use by another process"),
            "{blocked:?}"
        );
    }
);

// An offline `lamina fsck` without `--repair` only looks: the store file keeps every byte (even
// after a SIGKILL, when opening it would repair it), and no mode it reports is changed.
daemon_test!(
    offline_fsck_without_repair_changes_nothing,
    threads = 2,
    |mut d, mut c| {
        let fs = own_fs(&c.prepare("a", "").await.unwrap());
        c.commit("A", "a").await.unwrap();
        c.prepare("b", "A").await.unwrap();
        drop(c);
        d.kill();
        let dir = fs.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&d.root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let db = d.root.join("metadata.redb");
        let before = std::fs::read(&db).unwrap();
        let modified = std::fs::metadata(&db).unwrap().modified().unwrap();

        let out = d.cli(&["fsck"]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(text.contains("wrong_mode:"), "{text}");
        assert!(text.contains("checked 2 snapshots"), "{text}");
        assert!(
            std::fs::read(&db).unwrap() == before,
            "fsck wrote to the store"
        );
        assert_eq!(
            std::fs::metadata(&db).unwrap().modified().unwrap(),
            modified
        );
        assert_eq!(mode_of(&d.root), 0o755, "fsck changed the root's mode");
        assert_eq!(mode_of(dir), 0o777, "fsck changed a snapshot's mode");
    }
);

daemon_test!(health_is_serving_after_start, threads = 2, |_d, c| {
    let mut health = HealthClient::new(c.channel.clone());
    for service in ["", "containerd.services.snapshots.v1.Snapshots"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service:?}");
    }
});

/// GET /metrics over the unix socket lamina serves them on.
fn scrape(path: &Path) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lamina\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

root_test!(metrics_move_with_the_work_done, threads = 2, || {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("metrics.sock");
    let d =
        TestDaemon::start_with_config(&format!("metrics_address = \"unix:{}\"\n", sock.display()))
            .await;
    let mut c = d.client().await;
    wait_for(
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || sock.exists().then_some(()),
    )
    .await
    .expect("lamina makes its metrics socket");
    let before = scrape(&sock);
    assert_eq!(metric(&before, "lamina_snapshots{kind=\"active\"}"), 0.0);

    c.prepare("a", "").await.unwrap();
    c.commit("A", "a").await.unwrap();
    c.prepare("b", "A").await.unwrap();
    assert_code(c.stat("missing").await, tonic::Code::NotFound, "missing");
    c.prepare("gone", "").await.unwrap();
    c.remove("gone").await.unwrap();
    c.cleanup().await.unwrap();

    let after = scrape(&sock);
    assert_eq!(
        metric(&after, "lamina_requests_total{rpc=\"Prepare\",code=\"Ok\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "lamina_requests_total{rpc=\"Stat\",code=\"NotFound\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "lamina_request_duration_seconds_count{rpc=\"Commit\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "lamina_snapshots{kind=\"active\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "lamina_snapshots{kind=\"committed\"}"),
        1.0,
        "{after}"
    );
    assert!(
        metric(&after, "lamina_store_commit_duration_seconds_count") >= 5.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "lamina_cleanup_reclaimed_directories_total"),
        1.0,
        "{after}"
    );
    assert!(
        metric(&after, "lamina_cleanup_reclaimed_bytes_total") > 0.0,
        "{after}"
    );
});

root_test!(check_reports_without_a_daemon, threads = 2, || {
    let dir = tempfile::tempdir().unwrap();
    let out = lamina(["check", "--root"])
        .arg(dir.path().join("root"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.starts_with("kernel "), "{text}");
    assert!(text.contains("  overlayfs        yes"), "{text}");
    assert!(text.contains("  d_type           yes"), "{text}");
    let index = Path::new("/sys/module/overlay/parameters/index").exists();
    assert_eq!(text.contains("lamina adds index=off"), index, "{text}");
    // It only looks: a missing root is not created, nothing is left beside it, and an existing
    // directory keeps its mode and gets no snapshots directory.
    assert!(!dir.path().join("root").exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = lamina(["check", "--root"]).arg(&shared).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode_of(&shared), 0o1777);
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
});

// `lamina mount` of the top of a 200-layer chain: its options are far over one page, so it
// must go through the new mount API, one lowerdir+ per layer.
daemon_test!(mount_command_mounts_deep_chains, threads = 2, |d, mut c| {
    let mut parent = String::new();
    for i in 0..200 {
        let key = format!("layer-{i}-active");
        let mounts = c.prepare(&key, &parent).await.unwrap();
        if i == 0 || i == 199 {
            let m = Mounted::new_any(&mounts, &d.scratch(&format!("w{i}")));
            std::fs::write(m.join(&format!("f{i}")), format!("{i}")).unwrap();
        }
        let name = format!("layer-{i}");
        c.commit(&name, &key).await.unwrap();
        parent = name;
    }
    c.view("top", &parent).await.unwrap();
    let options_len: usize = c.mounts("top").await.unwrap()[0]
        .options
        .iter()
        .map(|o| o.len() + 1)
        .sum();
    assert!(
        options_len > 4096,
        "the chain must not fit in one page ({options_len} bytes)"
    );
    let target = d.scratch("inspect");
    let out = d.cli(&["mount", "top", target.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let inspected = Mounted::adopt(&target);
    let read = |f: &str| std::fs::read_to_string(inspected.join(f));
    let first = read("f0");
    let last = read("f199");
    drop(inspected);
    assert_eq!(first.unwrap(), "0");
    assert_eq!(last.unwrap(), "199");
});

// `lamina mount` inspects an active snapshot read-only, with or without parents, even while
// containerd has it mounted; `--rw` is refused while that mount is in place (two writable
// mounts of one upper directory corrupt it) and mounts it writable once it is gone. A view
// cannot be mounted writable at all.
daemon_test!(
    mount_command_is_read_only_unless_rw_and_rw_only_when_not_in_use,
    threads = 2,
    |d, mut c| {
        let lower = c.prepare("lower", "").await.unwrap();
        {
            let m = Mounted::new(&lower, &d.scratch("w-lower"));
            std::fs::write(m.join("from-lower"), "lower").unwrap();
        }
        c.commit("L", "lower").await.unwrap();
        c.prepare("alone", "").await.unwrap();
        c.prepare("on-l", "L").await.unwrap();
        for key in ["alone", "on-l"] {
            let mounts = c.mounts(key).await.unwrap();
            let upper = own_fs(&mounts);
            // As containerd would have it, for a running container.
            let containerd = Mounted::new(&mounts, &d.scratch(&format!("rootfs-{key}")));
            std::fs::write(containerd.join("in-use"), "container").unwrap();

            let ro = d.scratch(&format!("ro-{key}"));
            let out = d.cli(&["mount", key, ro.to_str().unwrap()]);
            assert!(out.status.success(), "{key}: {out:?}");
            let ro = Mounted::adopt(&ro);
            assert_eq!(
                std::fs::read_to_string(ro.join("in-use")).unwrap(),
                "container"
            );
            if key == "on-l" {
                assert_eq!(
                    std::fs::read_to_string(ro.join("from-lower")).unwrap(),
                    "lower"
                );
            }
            let write = std::fs::write(ro.join("new"), "x");
            assert_eq!(
                write.as_ref().map_err(|e| e.raw_os_error()),
                Err(Some(libc::EROFS)),
                "{key}: the inspection mount must be read-only: {write:?}"
            );
            drop(ro);

            let rw = d.scratch(&format!("rw-{key}"));
            let out = d.cli(&["mount", "--rw", key, rw.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{key}: --rw while in use: {out:?}");
            assert!(
                stderr.contains(containerd.path().to_str().unwrap()) && stderr.contains("--rw"),
                "{key}: the message names the mount in the way and the way out: {stderr}"
            );
            assert!(mounts_under(&rw).is_empty(), "{key}: nothing was mounted");

            drop(containerd);
            let out = d.cli(&["mount", "--rw", key, rw.to_str().unwrap()]);
            assert!(out.status.success(), "{key}: --rw once not in use: {out:?}");
            let rw = Mounted::adopt(&rw);
            std::fs::write(rw.join("written"), "by hand").unwrap();
            drop(rw);
            assert_eq!(
                std::fs::read_to_string(upper.join("written")).unwrap(),
                "by hand"
            );
        }

        c.view("v", "L").await.unwrap();
        let target = d.scratch("rw-view");
        let out = d.cli(&["mount", "--rw", "v", target.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("is a view"), "{out:?}");
        assert!(mounts_under(&target).is_empty());
        let out = d.cli(&["mount", "v", target.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        let view = Mounted::adopt(&target);
        assert_eq!(
            std::fs::read_to_string(view.join("from-lower")).unwrap(),
            "lower"
        );
        let write = std::fs::write(view.join("new"), "x");
        assert_eq!(
            write.map_err(|e| e.raw_os_error()).err(),
            Some(Some(libc::EROFS))
        );
    }
);

root_test!(
    json_logs_carry_the_key_in_the_request_span,
    threads = 2,
    || {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("l.sock");
        let child = lamina([
            "serve",
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--root",
        ])
        .arg(dir.path().join("root"))
        .arg("--address")
        .arg(&socket)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        wait_for(
            Duration::from_secs(10),
            Duration::from_millis(20),
            async || UnixStream::connect(&socket).ok(),
        )
        .await;
        let mut c = Client::connect(&socket).await;
        c.prepare("json-key", "").await.unwrap();
        drop(c);
        let out = terminate(child);
        assert!(out.status.success());
        let logs = stderr(&out);
        let mut created = None;
        for line in logs.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
            if v["fields"]["message"] == "created" {
                created = Some(v);
            }
        }
        let created = created.expect("an info line for the created snapshot");
        assert_eq!(created["span"]["name"], "prepare");
        assert_eq!(created["span"]["key"], "\"json-key\"");
        assert_eq!(created["level"], "INFO");
    }
);

// A health watch opened while serving sees NOT_SERVING once shutdown starts.
daemon_test!(
    health_turns_not_serving_on_shutdown,
    threads = 2,
    |mut d, c| {
        let mut health = HealthClient::new(c.channel.clone());
        let mut watch = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32);
        signal(d.pid(), Signal::SIGTERM);
        // tonic-health may repeat the current status before the change; wait for the change.
        let changed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let msg = watch.message().await.unwrap().expect("the watch ended");
                if msg.status != ServingStatus::Serving as i32 {
                    return msg.status;
                }
            }
        })
        .await
        .expect("a health change within 5 s of SIGTERM");
        assert_eq!(changed, ServingStatus::NotServing as i32);
        drop(watch);
        drop(health);
        drop(c);
        assert!(d.stop_async_after_signal().await.success());
    }
);

// Started with a low soft limit on open files (as by a shell or a unit without LimitNOFILE),
// lamina raises it to the hard limit: deleting a deep tree holds a descriptor per level.
daemon_test!(
    raises_its_open_files_limit_to_the_hard_one,
    threads = 2,
    |mut d| {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        use std::os::unix::process::CommandExt;

        d.stop();
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let hard = hard.min(4096);
        let soft = hard.min(256);
        d.spawn_with(|cmd| {
            // SAFETY: the closure runs between fork and exec; it only makes one system call, which
            // is async-signal-safe, and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(Into::into)
                });
            }
        })
        .await;
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let values: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
        let hard = hard.to_string();
        assert_eq!(values, [&hard[..], &hard[..]], "{line}");
    }
);

// Orphans that start-up recovery finds (here 200,000 files a crash left behind) are deleted
// by the deleter while lamina serves, not before: containerd does not wait for them, and a
// Cleanup returns once they are gone. Meanwhile a signal starts the drain, which waits for
// that Cleanup; a second signal exits at once, with 128 + its number, and takes the socket
// along (as Ctrl-C pressed twice should; a signal during start-up works the same way).
daemon_test!(
    orphans_go_after_start_up_and_a_second_signal_cuts_the_drain,
    threads = 2,
    |mut d| {
        let id = spent_id(&d, &mut d.client().await).await;
        d.stop();
        let orphan = d.root.join(format!("snapshots/{id}"));
        for dir in 0..200 {
            let dir = orphan.join(format!("fs/{dir}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..1000 {
                std::fs::File::create(dir.join(f.to_string())).unwrap();
            }
        }
        d.spawn().await;
        assert!(
            orphan.exists(),
            "start-up deleted the orphan before serving"
        );

        let mut c = d.client().await;
        let cleanup = tokio::spawn(async move { c.cleanup().await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        signal(d.pid(), Signal::SIGTERM);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            d.socket.exists(),
            "draining: the Cleanup is still under way"
        );
        signal(d.pid(), Signal::SIGINT);
        let status = d.stop_async_after_signal().await;
        assert_eq!(status.code(), Some(128 + Signal::SIGINT as i32), "{status}");
        assert!(orphan.exists(), "the drain was waited for");
        assert!(!d.socket.exists());
        assert!(cleanup.await.unwrap().is_err());

        // The next start queues the orphan again, and a Cleanup waits for it.
        d.spawn().await;
        d.client().await.cleanup().await.unwrap();
        assert!(!orphan.exists());
    }
);

// A metrics address lamina cannot bind (here a port already taken; under the packaged unit
// also one its sandbox forbids) fails start-up with a message naming it, instead of leaving
// lamina serving without metrics and one line in its log.
root_test!(
    an_unusable_metrics_address_fails_start_up,
    threads = 2,
    || {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!("metrics_address = \"{}\"\n", taken.local_addr().unwrap()),
        )
        .unwrap();
        let mut serve = lamina(["serve", "--root"]);
        serve
            .arg(dir.path().join("root"))
            .arg("--address")
            .arg(dir.path().join("lamina.sock"))
            .arg("--config")
            .arg(&config);
        // Killed, and the test failed, if lamina keeps running without its metrics endpoint.
        let out = run_to_exit(serve);
        let stderr = stderr(&out);
        assert!(!out.status.success());
        assert!(stderr.contains("metrics_address 127.0.0.1:"), "{stderr}");
        assert!(!dir.path().join("lamina.sock").exists());
    }
);

// A Commit that was under way when SIGTERM came finishes within the drain, its usage walk and
// its sync included: once a request has been admitted, closing refuses only new ones.
daemon_test!(
    a_commit_under_way_at_sigterm_finishes,
    threads = 2,
    |mut d, mut c| {
        let fs = own_fs(&c.prepare("big", "").await.unwrap());
        // Enough files that the walk takes a while after the Commit is admitted.
        for dir in 0..50 {
            let dir = fs.join(dir.to_string());
            std::fs::create_dir(&dir).unwrap();
            for f in 0..1000 {
                std::fs::write(dir.join(f.to_string()), b"x").unwrap();
            }
        }
        let commit = tokio::spawn(async move { c.commit("Big", "big").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        signal(d.pid(), Signal::SIGTERM);
        let answer = commit.await.unwrap();
        assert!(
            answer.is_ok(),
            "a Commit admitted before SIGTERM failed: {answer:?}"
        );
        assert!(d.stop_async_after_signal().await.success());
        d.spawn().await;
        let info = d.client().await.stat("Big").await.unwrap();
        assert_eq!(info.kind, COMMITTED);
    }
);

/// Without `--config`, the default file is read: `LAMINA_CONFIG` names it here (the machine's
/// own is /etc/lamina/config.toml), and `--config` wins over it.
#[test]
fn without_config_the_default_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "upperdir_label = true\n").unwrap();
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "sync_remove = true\n").unwrap();
    let dump = |cmd: &mut std::process::Command| stdout(&cmd.output().unwrap());
    let by_default = dump(lamina(["config", "dump"]).env("LAMINA_CONFIG", &file));
    assert!(
        by_default.contains("upperdir_label = true"),
        "the default file was not read:\n{by_default}"
    );
    let given = dump(
        lamina(["config", "dump", "--config", other.to_str().unwrap()]).env("LAMINA_CONFIG", &file),
    );
    assert!(
        given.contains("sync_remove = true") && given.contains("upperdir_label = false"),
        "--config must replace the default file:\n{given}"
    );
    let none = dump(&mut lamina(["config", "dump"]));
    assert!(none.contains("upperdir_label = false"), "{none}");
}
