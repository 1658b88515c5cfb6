//! One client must not be able to stop the daemon, nor to hold what other clients need.

use std::{
    os::unix::{net::UnixStream, process::CommandExt},
    process::Stdio,
    time::{Duration, Instant},
};

use crate::util::*;

/// A path to give lamina's log to, and what it holds so far.
struct Log(tempfile::NamedTempFile);

impl Log {
    fn new() -> Log {
        Log(tempfile::NamedTempFile::new().unwrap())
    }

    fn stderr(&self) -> Stdio {
        Stdio::from(self.0.reopen().unwrap())
    }

    fn text(&self) -> String {
        std::fs::read_to_string(self.0.path()).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Accept errors
// ---------------------------------------------------------------------------------------------

/// With its open files limited to 64 (soft and hard: lamina raises the soft limit to the hard
/// one at start), 80 connections that never speak exhaust lamina's descriptors. lamina must
/// say so (once per burst of failures, not at every retry), keep trying, and serve again once
/// they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_never_stops_serving() {
    if !require_root() {
        return;
    }
    let log = Log::new();
    let stderr = log.stderr();
    let mut d = TestDaemon::start_with("", |cmd| {
        cmd.stderr(stderr).env("RUST_LOG", "lamina=info");
        // SAFETY: the closure runs in the child between fork and exec; it only makes the
        // setrlimit system call, which is async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                use nix::sys::resource::{setrlimit, Resource};
                setrlimit(Resource::RLIMIT_NOFILE, 64, 64).map_err(std::io::Error::from)
            });
        }
    })
    .await;
    let mut c = d.client().await;
    c.prepare("before", "").await.unwrap();
    drop(c);

    let flood: Vec<UnixStream> = (0..80)
        .map(|i| {
            UnixStream::connect(&d.socket)
                .unwrap_or_else(|e| panic!("connection {i} into lamina's backlog: {e}"))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log.text().contains("cannot accept") {
        if let Some(status) = d.exited() {
            panic!(
                "lamina stopped serving when it ran out of descriptors ({status}); its log:\n{}",
                log.text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "lamina neither logged an accept error nor exited with 80 connections open; log:\n{}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long enough for several retries (the pause starts at a few milliseconds).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(d.exited().is_none(), "lamina exited; log:\n{}", log.text());

    drop(flood);
    let mut c = tokio::time::timeout(Duration::from_secs(30), d.client())
        .await
        .expect("a new connection once the flood is gone");
    let info = tokio::time::timeout(Duration::from_secs(30), c.stat("before"))
        .await
        .expect("Stat answers once the flood is gone")
        .unwrap();
    assert_eq!(info.kind, ACTIVE);
    assert!(d.exited().is_none());

    // A burst may end early when lamina closes a connection of its own (descriptors come
    // free), so there may be more than one; each is logged when it starts and when it ends,
    // and its retries in between are not.
    let text = log.text();
    let started = text.matches("cannot accept").count();
    let ended: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("accepting connections again"))
        .map(|l| {
            let n = l.split("failures=").nth(1).expect("failures=N");
            n.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(
        started,
        ended.len(),
        "each burst logged at its start and end:\n{text}"
    );
    let failures: u64 = ended.iter().sum();
    assert!(
        failures > started as u64,
        "{failures} failed accepts over {started} bursts: retries must not log:\n{text}"
    );
    eprintln!("{failures} failed accepts in {started} burst(s), each logged once");
}
