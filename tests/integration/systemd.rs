//! Running under systemd: readiness and watchdog notifications, and socket activation.

use std::{
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::util::*;

/// Reads notification datagrams until one contains `want` or `limit` passes.
fn wait_for(sock: &UnixDatagram, want: &str, limit: Duration) -> Option<Instant> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_only_once_serving_then_watchdog_and_stopping() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let socket = dir.path().join("lamina.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lamina"))
        .args(["serve", "--root"])
        .arg(dir.path().join("root"))
        .arg("--address")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    assert!(
        wait_for(&notify, "READY=1", Duration::from_secs(20)).is_some(),
        "no READY=1"
    );
    // READY=1 means requests are answered now, not merely that the process runs.
    let mut c = Client::connect(&socket).await;
    assert_eq!(c.list(&[]).await.unwrap(), Vec::<String>::new());

    // WATCHDOG_USEC=200ms: pings come at half that; two in a second is well inside the limit.
    let start = Instant::now();
    assert!(
        wait_for(&notify, "WATCHDOG=1", Duration::from_secs(1)).is_some(),
        "no WATCHDOG=1"
    );
    assert!(
        wait_for(&notify, "WATCHDOG=1", Duration::from_secs(1)).is_some(),
        "no second WATCHDOG=1"
    );
    assert!(start.elapsed() < Duration::from_secs(2));

    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        wait_for(&notify, "STOPPING=1", Duration::from_secs(10)).is_some(),
        "no STOPPING=1"
    );
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_socket_systemd_passes() {
    if !require_root() {
        return;
    }
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not create the socket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first connection waits in the backlog while lamina starts behind it.
    let mut c = Client::connect(&socket).await;
    c.prepare("k", "").await.unwrap();
    assert_eq!(c.stat("k").await.unwrap().kind, ACTIVE);
    assert!(root.join("metadata.redb").exists());
    assert!(!std::path::Path::new("/nonexistent/dir").exists());
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        socket.exists(),
        "an inherited socket belongs to systemd and stays"
    );
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("socket_group is ignored"), "{logs}");
    let serving = logs.lines().find(|l| l.contains(" serving ")).unwrap();
    assert!(serving.contains("activated.sock"), "{serving}");
}
