//! Running under systemd: readiness and watchdog notifications, socket activation, and the
//! packaged units' sandbox (lamina's differ included).

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use crate::{
    containerd::{image_layers, import, Containerd, IMAGE1},
    containerd_support::Flavor,
    oci_support::write_oci_archive,
    util::*,
};

/// Reads notification datagrams until one contains `want` or `limit` passes.
fn notification(sock: &UnixDatagram, want: &str, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]);
                if msg.lines().any(|l| l == want) {
                    return Some(Instant::now());
                }
            }
            Err(_) => return None,
        }
    }
    None
}

root_test!(
    notifies_ready_only_once_serving_then_watchdog_and_stopping,
    threads = 2,
    || {
        let dir = tempfile::tempdir().unwrap();
        let notify_path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        let socket = dir.path().join("lamina.sock");
        let mut child = lamina(["serve", "--root"])
            .arg(dir.path().join("root"))
            .arg("--address")
            .arg(&socket)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "200000")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();

        assert!(
            notification(&notify, "READY=1", Duration::from_secs(20)).is_some(),
            "no READY=1"
        );
        // READY=1 means requests are answered now, not merely that the process runs.
        let mut c = Client::connect(&socket).await;
        assert_eq!(c.list(&[]).await.unwrap(), Vec::<String>::new());

        // WATCHDOG_USEC=200ms: pings come at half that; two in a second is well inside the limit.
        let start = Instant::now();
        assert!(
            notification(&notify, "WATCHDOG=1", Duration::from_secs(1)).is_some(),
            "no WATCHDOG=1"
        );
        assert!(
            notification(&notify, "WATCHDOG=1", Duration::from_secs(1)).is_some(),
            "no second WATCHDOG=1"
        );
        assert!(start.elapsed() < Duration::from_secs(2));

        drop(c);
        signal(child.id(), Signal::SIGTERM);
        assert!(
            notification(&notify, "STOPPING=1", Duration::from_secs(10)).is_some(),
            "no STOPPING=1"
        );
        assert!(child.wait().unwrap().success());
    }
);

root_test!(serves_the_socket_systemd_passes, threads = 2, || {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let root = dir.path().join("root");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "socket_group = \"daemon\"\n").unwrap();
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(env!("CARGO_BIN_EXE_lamina"))
        .args(["serve", "--root"])
        .arg(&root)
        // The address must be ignored under activation: binding it would fail the test below.
        .args(["--address", "/nonexistent/dir/never.sock"])
        // So must socket_group (systemd's SocketGroup= decides), and lamina says so.
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian's systemd package) must be installed");
    let made = wait_for(
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || socket.exists().then_some(()),
    )
    .await;
    assert!(
        made.is_some(),
        "systemd-socket-activate did not create the socket"
    );
    // The first connection waits in the backlog while lamina starts behind it.
    let mut c = Client::connect(&socket).await;
    c.prepare("k", "").await.unwrap();
    assert_eq!(c.stat("k").await.unwrap().kind, ACTIVE);
    assert!(root.join("metadata.redb").exists());
    assert!(!std::path::Path::new("/nonexistent/dir").exists());
    drop(c);
    let out = terminate(child);
    assert!(out.status.success());
    assert!(
        socket.exists(),
        "an inherited socket belongs to systemd and stays"
    );
    let logs = stderr(&out);
    assert!(logs.contains("socket_group is ignored"), "{logs}");
    let serving = logs.lines().find(|l| l.contains(" serving ")).unwrap();
    assert!(serving.contains("activated.sock"), "{serving}");
});

/// A container booted by systemd-nspawn with this machine's systemd (its /usr shared
/// read-only) and lamina's units; halted on drop.
struct Booted {
    nspawn: std::process::Child,
    /// The container's PID 1, as this (the host's) PID namespace numbers it.
    leader: u32,
    console: std::path::PathBuf,
}

impl Booted {
    /// Runs `args` inside the container: in its mount and PID namespaces, where `systemctl`
    /// talks to its systemd.
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-m", "-p", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter (util-linux) must be installed")
    }

    fn stdout(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn show(&self, property: &str) -> String {
        self.stdout(&[
            "systemctl",
            "show",
            "-p",
            property,
            "--value",
            "lamina.service",
        ])
    }

    /// What systemd and lamina logged about lamina.service, and the console, for a failure.
    fn logs(&self) -> String {
        let journal = self.run(&[
            "journalctl",
            "-u",
            "lamina.service",
            "-o",
            "cat",
            "--no-pager",
        ]);
        format!(
            "journal of lamina.service:\n{}\nconsole:\n{}",
            String::from_utf8_lossy(&journal.stdout),
            std::fs::read_to_string(&self.console).unwrap_or_default()
        )
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        // nspawn halts the container on the first SIGTERM, and kills it on a second.
        let pid = self.nspawn.id();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let halted = wait_for_blocking(Duration::from_secs(30), Duration::from_millis(50), || {
            self.nspawn.try_wait().ok().flatten()
        });
        if halted.is_some() {
            return;
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

// The packaged units, run by systemd itself. systemd-nspawn boots this machine's systemd as
// PID 1 of a container (the host's /usr, read-only, everything else fresh) with
// lamina.socket and lamina.service exactly as in systemd/, the packaged config.toml and the
// binary under test as /usr/bin/lamina. So lamina runs in the sandbox the unit declares, set
// up by systemd: its capability bounding set, seccomp filter (SystemCallFilter=,
// SystemCallArchitectures=, RestrictNamespaces=,
// MemoryDenyWriteExecute=, ...), no_new_privs and mount namespace (ProtectSystem=, ...).
// Through the socket systemd holds, a workload then makes lamina do what it does in
// production: the start-up overlay probe mount and the new-mount-API probe, Prepare, writes
// as containerd's applier makes them, Commit (usage walk), View, Stat, Usage, List, Remove,
// Cleanup (the parallel deleter), fsck and status through the admin API, and a restart with
// recovery. A syscall the filter denies fails with EPERM (SystemCallErrorNumber=), which
// fails start-up or a request, or shows in lamina's log.
root_test!(
    the_packaged_units_run_lamina_in_their_sandbox,
    threads = 2,
    || {
        if Command::new("systemd-nspawn")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "systemd-nspawn (Debian's systemd-container, which .ci/setup installs) is missing"
            );
            eprintln!("skipped: needs systemd-nspawn (Debian's systemd-container)");
            return;
        }
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().unwrap();
        let path = |p: &str| dir.path().join(p);
        for d in ["units", "etc", "bin", "state", "run"] {
            std::fs::create_dir(path(d)).unwrap();
        }
        for unit in ["lamina.service", "lamina.socket"] {
            std::fs::copy(repo.join("systemd").join(unit), path("units").join(unit)).unwrap();
        }
        // Boot only into what `systemctl enable --now lamina.socket lamina.service` starts (and
        // what lamina.service depends on), without asking for a first-boot configuration.
        std::fs::write(
            path("units/lamina-test.target"),
            "[Unit]\nDescription=lamina under test\nWants=lamina.socket lamina.service\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/null", path("units/systemd-firstboot.service")).unwrap();
        // A containerd outside, with lamina's differ: lamina, inside, reads the layers from
        // it through its socket, which the container sees under /run/lamina-test-containerd.
        let flavor = crate::containerd::flavor(|| Flavor::v2(0));
        let socket = path("run/lamina.sock");
        let ctrd = flavor.as_ref().map(|flavor| {
            let binary = flavor.program("containerd");
            let fragment = lamina(["config", "containerd", "--differ", "--containerd"])
                .arg(&binary)
                .arg("--address")
                .arg(&socket)
                .output()
                .unwrap();
            assert!(fragment.status.success(), "{fragment:?}");
            let fragment = stdout(&fragment);
            Containerd::launch(flavor, "systemd", |p| {
                format!("{}{fragment}", flavor.private_config(p, false))
            })
        });
        let config = std::fs::read_to_string(repo.join("packaging/config.toml")).unwrap();
        let packaged = "containerd_address = \"/run/containerd/containerd.sock\"";
        assert!(config.contains(packaged), "{config}");
        std::fs::write(
            path("etc/config.toml"),
            config.replace(
                packaged,
                "containerd_address = \"/run/lamina-test-containerd/c.sock\"",
            ),
        )
        .unwrap();
        let containerd_dir = ctrd.as_ref().map(|c| {
            format!(
                "--bind-ro={}:/run/lamina-test-containerd",
                c.address.parent().unwrap().display()
            )
        });
        std::fs::copy(env!("CARGO_BIN_EXE_lamina"), path("bin/lamina")).unwrap();
        let console = path("console.log");
        let arg =
            |flag: &str, from: &str, to: &str| format!("{flag}={}:{to}", path(from).display());
        let nspawn = Command::new("systemd-nspawn")
            .args([
                "--quiet",
                // No machined, no host systemd to make a scope: PID 1 here is not systemd.
                "--register=no",
                "--keep-unit",
                "--machine",
                &format!("lamina-test-{}", std::process::id()),
                "--directory=/",
                "--volatile=yes",
                // nspawn's default set leaves CAP_SYS_MODULE out: give it, so that it is the unit
                // that must keep it from lamina.
                "--capability=CAP_SYS_MODULE",
                "--console=pipe",
                &format!("--overlay-ro=/usr/bin:{}:/usr/bin", path("bin").display()),
                &arg("--bind-ro", "units", "/etc/systemd/system"),
                &arg("--bind-ro", "etc", "/etc/lamina"),
                &arg("--bind", "state", "/var/lib/lamina"),
                &arg("--bind", "run", "/run/lamina"),
            ])
            .args(&containerd_dir)
            .args(["--boot", "--", "systemd.unit=lamina-test.target"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&console)
                    .unwrap(),
            ))
            .spawn()
            .unwrap();
        let nspawn_pid = nspawn.id();
        let mut booted = Booted {
            nspawn,
            leader: 0,
            console: console.clone(),
        };
        let leader = wait_for_blocking(Duration::from_secs(30), Duration::from_millis(50), || {
            // nspawn's child that is PID 1 of its own PID namespace (NSpid: <here> 1); nspawn's
            // other, short-lived children are not.
            let leader = std::fs::read_dir("/proc").unwrap().find_map(|e| {
                let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let field = |name: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.split_whitespace().collect::<Vec<_>>())
                };
                let ppid = field("PPid:")?;
                let nspid = field("NSpid:")?;
                (ppid == [nspawn_pid.to_string()] && nspid == [pid.to_string(), "1".to_string()])
                    .then_some(pid)
            });
            if leader.is_some() {
                return leader;
            }
            if let Ok(Some(status)) = booted.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited with {status}: {}",
                    std::fs::read_to_string(&console).unwrap_or_default()
                );
            }
            None
        });
        booted.leader = leader.expect("no container PID 1 within 30 s");

        // Served through lamina.socket: the first request starts lamina if it is not up yet.
        let c = wait_for(
            Duration::from_secs(60),
            Duration::from_millis(200),
            async || {
                if socket.exists() {
                    let attempt = tokio::time::timeout(Duration::from_secs(5), async {
                        let mut c = Client::connect(&socket).await;
                        c.list(&[]).await.map(|_| c)
                    })
                    .await;
                    if let Ok(Ok(c)) = attempt {
                        return Some(c);
                    }
                }
                if let Ok(Some(status)) = booted.nspawn.try_wait() {
                    panic!("the container stopped ({status}):\n{}", booted.logs());
                }
                let state = booted.run(&[
                    "systemctl",
                    "show",
                    "-p",
                    "NRestarts",
                    "--value",
                    "lamina.service",
                ]);
                let restarts = String::from_utf8_lossy(&state.stdout).trim().to_string();
                assert!(
                    restarts.is_empty() || restarts == "0",
                    "lamina failed to start under its unit ({restarts} restarts):\n{}",
                    booted.logs()
                );
                None
            },
        )
        .await;
        let mut c =
            c.unwrap_or_else(|| panic!("lamina did not answer within 60 s:\n{}", booted.logs()));

        // The sandbox is the unit's: lamina's bounding set has CAP_SYS_ADMIN, CAP_CHOWN,
        // CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, and for its differ CAP_FSETID,
        // CAP_MKNOD and CAP_SETFCAP only (bits 21, 0, 1, 2, 3, 4, 27, 31; not CAP_SYS_MODULE,
        // 16), no_new_privs is set and a seccomp filter is in place.
        let main_pid = booted.show("MainPID");
        let status = booted.stdout(&["cat", &format!("/proc/{main_pid}/status")]);
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                .to_string()
        };
        assert_eq!(field("CapBnd:"), "000000008820001f", "{status}");
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
        assert_eq!(field("Seccomp:"), "2", "{status}");
        // Only modprobe runs with full privileges ("+").
        let pre = booted.show("ExecStartPreEx");
        assert!(pre.contains("flags=ignore-failure privileged"), "{pre}");

        // The workload. Paths in mounts are the container's; the test writes through the host's.
        let host = |p: &str| {
            path("state").join(
                p.strip_prefix("/var/lib/lamina/")
                    .unwrap_or_else(|| panic!("{p} is not under the root")),
            )
        };
        let upper = |m: &[Mount]| host(own_fs(m).to_str().unwrap());
        let fill = |dir: &std::path::Path, tag: &str| {
            for d in 0..4 {
                let sub = dir.join(format!("{tag}-{d}/nested"));
                std::fs::create_dir_all(&sub).unwrap();
                for f in 0..50 {
                    std::fs::write(sub.join(f.to_string()), format!("{tag} {d} {f}")).unwrap();
                }
            }
        };
        let base = c.prepare("base", "").await.unwrap();
        fill(&upper(&base), "base");
        c.commit("B", "base").await.unwrap();
        let app = c.prepare("app", "B").await.unwrap();
        fill(&upper(&app), "app");
        assert!(c.usage("app").await.unwrap().inodes > 200);
        c.commit("A", "app").await.unwrap();
        assert!(c.usage("A").await.unwrap().inodes > 200);
        let view = c.view("v", "A").await.unwrap();
        assert_eq!(view[0].r#type, "overlay");
        assert_eq!(c.stat("A").await.unwrap().kind, COMMITTED);
        let gone = c.prepare("gone", "A").await.unwrap();
        fill(&upper(&gone), "gone");
        c.remove("gone").await.unwrap();
        c.remove("v").await.unwrap();
        c.cleanup().await.unwrap();
        assert_eq!(c.list(&[]).await.unwrap(), ["A", "B"]);
        let dirs = std::fs::read_dir(path("state/snapshots")).unwrap().count();
        assert_eq!(dirs, 2, "Cleanup left the directories of A and B only");

        // The admin API: features probed at start-up inside the sandbox, and an online fsck.
        let cli = |args: &[&str]| lamina(args).arg("--address").arg(&socket).output().unwrap();
        let status = cli(&["status"]);
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(status.status.success(), "{status:?}");
        for feature in [
            "overlayfs        yes",
            "d_type           yes",
            "lowerdir+        yes",
        ] {
            assert!(
                text.contains(feature),
                "{feature}: {text}\n{}",
                booted.logs()
            );
        }
        let fsck = cli(&["fsck"]);
        assert!(fsck.status.success(), "{fsck:?}\n{}", booted.logs());

        // A restart: the drain on SIGTERM, then start-up recovery, with the socket kept meanwhile.
        drop(c);
        booted.stdout(&["systemctl", "restart", "lamina.service"]);
        let mut c = Client::connect(&socket).await;
        assert_eq!(c.list(&[]).await.unwrap(), ["A", "B"]);
        assert_ne!(booted.show("MainPID"), main_pid);
        if let Some(ctrd) = &ctrd {
            applies_layers_in_the_sandbox(ctrd, &mut c, &path("state")).await;
        }
        drop(c);

        assert_eq!(booted.show("NRestarts"), "0", "{}", booted.logs());
        assert_eq!(booted.show("ActiveState"), "active");
        let logs = booted.logs();
        assert!(!logs.contains(" ERROR "), "{logs}");
        // And the units pass systemd's own check (their man: documentation is containerd's).
        let verify = booted.run(&[
            "systemd-analyze",
            "verify",
            "--man=no",
            "/etc/systemd/system/lamina.service",
            "/etc/systemd/system/lamina.socket",
        ]);
        assert!(verify.status.success(), "{verify:?}");
        let analysis = booted.run(&[
            "systemd-analyze",
            "security",
            "--no-pager",
            "lamina.service",
        ]);
        let analysis = String::from_utf8_lossy(&analysis.stdout);
        eprintln!("{}", analysis.lines().last().unwrap_or_default());
    }
);

/// containerd (outside) imports an image through lamina's differ, lamina running in its
/// unit's sandbox: lamina writes both layers (files, the whiteout's 0/0 device, the opaque
/// directory's `trusted.overlay.opaque`) reading them from containerd, and containerd's
/// collection removes them, with every other snapshot (containerd owns its snapshotters: its
/// GC removes what its metadata does not know, A and B here). containerd cannot run a
/// container here: lamina's mounts name the paths inside its container, so the layers are
/// checked in its state directory, from outside.
async fn applies_layers_in_the_sandbox(ctrd: &Containerd, c: &mut Client, state: &Path) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    let tar = ctrd.path("e2e1.tar");
    write_oci_archive(&tar, IMAGE1, &image_layers(&[]));
    import(ctrd, &tar, IMAGE1);
    let keys = c.list(&[]).await.unwrap();
    assert_eq!(keys.len(), 4, "A, B and the image's two layers: {keys:?}");
    let layer_dirs: Vec<_> = std::fs::read_dir(state.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path().join("fs"))
        .collect();
    assert_eq!(layer_dirs.len(), 4, "{layer_dirs:?}");
    let upper = layer_dirs
        .iter()
        .find(|fs| fs.join("etc/msg").exists() && fs.join("d/new").exists())
        .unwrap_or_else(|| panic!("no layer with etc/msg and d/new among {layer_dirs:?}"));
    assert_eq!(std::fs::read(upper.join("etc/msg")).unwrap(), b"two");
    let gone = std::fs::symlink_metadata(upper.join("gone")).unwrap();
    assert!(
        gone.file_type().is_char_device() && gone.rdev() == 0,
        "the whiteout of `gone` is not a 0/0 device: {gone:?}"
    );
    assert_eq!(
        crate::differ::xattrs_of(&upper.join("d")).get("trusted.overlay.opaque"),
        Some(&b"y".to_vec()),
        "d/ is not opaque"
    );
    ctrd.ctr_ok(&["images", "rm", "--sync", IMAGE1]);
    let left = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        async || {
            let keys = c.list(&[]).await.unwrap();
            let dirs = std::fs::read_dir(state.join("snapshots")).unwrap().count();
            (keys.is_empty() && dirs == 0).then_some(())
        },
    )
    .await;
    assert!(
        left.is_some(),
        "containerd's GC left {:?} and {:?}",
        c.list(&[]).await,
        std::fs::read_dir(state.join("snapshots"))
            .unwrap()
            .collect::<Vec<_>>()
    );
}
