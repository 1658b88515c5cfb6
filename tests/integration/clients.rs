//! One client must not be able to stop the daemon, nor to hold what other clients need: running
//! out of descriptors, Lists whose reader stops reading, peers that stop answering, streams
//! opened by the thousand on one connection, and parent chains deeper than overlayfs mounts.

use std::{
    io::{Read, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    path::Path,
    process::Stdio,
    time::Duration,
};

use containerd_snapshots::api::snapshots::v1::{
    snapshots_client::SnapshotsClient, ListSnapshotsRequest, ListSnapshotsResponse,
};
use tonic::{Code, Streaming};

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

// With its open files limited to 64 (soft and hard: lamina raises the soft limit to the hard
// one at start), 80 connections that never speak exhaust lamina's descriptors. lamina must
// say so (once per burst of failures, not at every retry), keep trying, and serve again once
// they are gone.
root_test!(
    running_out_of_descriptors_never_stops_serving,
    threads = 2,
    || {
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
        let logged = wait_for(
            Duration::from_secs(30),
            Duration::from_millis(20),
            async || {
                if let Some(status) = d.exited() {
                    panic!(
                    "lamina stopped serving when it ran out of descriptors ({status}); log:\n{}",
                    log.text()
                );
                }
                log.text().contains("cannot accept").then_some(())
            },
        )
        .await;
        assert!(
            logged.is_some(),
            "lamina neither logged an accept error nor exited with 80 connections open; log:\n{}",
            log.text()
        );
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
);

// ---------------------------------------------------------------------------------------------
// Lists whose reader stops reading
// ---------------------------------------------------------------------------------------------

/// Snapshots with a 1000-byte label each: 100 make one List message of about 100 KB, so a
/// List of all of them is far more than a reader with 64 KiB windows holds unread.
const LISTED: usize = 1000;

async fn fill(c: &Client) {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let mut c = c.clone();
        tasks.spawn(async move {
            let l = labels(&[("containerd.io/snapshot/pad", &"p".repeat(1000))]);
            for i in (w..LISTED).step_by(16) {
                c.view_with(&format!("v{i:04}"), "", l.clone()).await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
}

/// A connection whose flow-control windows are HTTP/2's initial 64 KiB, so that a reader that
/// stops reading stops the stream soon (tonic's client otherwise takes megabytes ahead).
async fn narrow_client(socket: &Path) -> SnapshotsClient<tonic::transport::Channel> {
    let channel = channel_with(socket, |e| {
        e.initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
    })
    .await
    .expect("connecting to lamina");
    SnapshotsClient::new(channel)
}

/// `n` Lists of everything, over connections of ten Lists each, that nobody reads. Returns
/// once lamina has answered each with its headers, and the first with a message (so that one
/// listing at least is surely under way: its reader took the first of its 1000 snapshots).
async fn stalled_lists(socket: &Path, n: usize) -> Vec<Streaming<ListSnapshotsResponse>> {
    let mut streams = Vec::new();
    let mut client = narrow_client(socket).await;
    for i in 0..n {
        if i > 0 && i % 10 == 0 {
            client = narrow_client(socket).await;
        }
        let req = ListSnapshotsRequest {
            snapshotter: "lamina".into(),
            filters: vec![],
        };
        let mut stream = client.list(req).await.unwrap().into_inner();
        if i == 0 {
            // Before the others share its connection's window, which they would fill.
            let first = stream.message().await.unwrap().expect("a first batch");
            assert_eq!(first.info.len(), 100);
        }
        streams.push(stream);
    }
    streams
}

// More Lists than lamina has threads for work of unbounded length (32), each stalled by a
// reader that never reads: Commit's usage walk of a big snapshot and Cleanup, which need
// such a thread too, must still answer. The idle deadline is an hour here, so only Lists
// having a capacity of their own can make that so.
root_test!(
    stalled_lists_leave_room_for_commit_and_cleanup,
    threads = 2,
    || {
        let d = TestDaemon::start_with("", |cmd| {
            cmd.env("LAMINA_LIST_IDLE_TIMEOUT_MS", "3600000");
        })
        .await;
        let mut c = d.client().await;
        fill(&c).await;
        // More than the 32 entries a Commit measures in place before handing the walk over.
        let fs = own_fs(&c.prepare("big", "").await.unwrap());
        for i in 0..100 {
            std::fs::write(fs.join(format!("f{i}")), b"x").unwrap();
        }

        let stalled = stalled_lists(&d.socket, 40).await;
        tokio::time::timeout(Duration::from_secs(60), c.commit("big-c", "big"))
            .await
            .expect(
                "Commit (its usage walk off the request's thread) must answer while 40 Lists \
                 are stalled",
            )
            .unwrap();
        assert_eq!(c.usage("big-c").await.unwrap().inodes, 101);
        tokio::time::timeout(Duration::from_secs(60), c.cleanup())
            .await
            .expect("Cleanup must answer while 40 Lists are stalled")
            .unwrap();

        // Their readers gone, the stalled Lists end, and a List reads everything.
        drop(stalled);
        let all = tokio::time::timeout(Duration::from_secs(60), c.list(&[]))
            .await
            .expect("a List once the stalled ones are gone")
            .unwrap();
        assert_eq!(all.len(), LISTED + 1);
    }
);

// A List whose reader takes nothing for the idle deadline (one second here) is ended: its
// thread and read transaction go back, and the reader, should it come back, gets the
// messages already queued and then DeadlineExceeded, never a stream that looks complete.
// With more stalled Lists than lamina's threads, only that lets a reading List through.
root_test!(
    a_stalled_list_ends_after_its_idle_deadline,
    threads = 2,
    || {
        let d = TestDaemon::start_with("", |cmd| {
            cmd.env("LAMINA_LIST_IDLE_TIMEOUT_MS", "1000");
        })
        .await;
        let mut c = d.client().await;
        fill(&c).await;
        let stalled = stalled_lists(&d.socket, 40).await;

        let all = tokio::time::timeout(Duration::from_secs(120), c.list(&[]))
            .await
            .expect("a List that reads must get through once stalled ones reach their deadline")
            .unwrap();
        assert_eq!(all.len(), LISTED);

        // All read at once: streams that share a connection share its window, which any one of
        // them left unread would fill.
        let mut readers = tokio::task::JoinSet::new();
        for (i, mut s) in stalled.into_iter().enumerate() {
            readers.spawn(async move {
                // The first List's first batch was read already.
                let mut got = if i == 0 { 100 } else { 0 };
                loop {
                    match s.message().await {
                        Ok(Some(m)) => got += m.info.len(),
                        Ok(None) => return (i, got, Ok(())),
                        Err(status) => return (i, got, Err(status)),
                    }
                }
            });
        }
        let (mut ended, mut complete) = (0, 0);
        while let Some(read) = readers.join_next().await {
            let (i, got, end) = read.unwrap();
            match end {
                Ok(()) => {
                    assert_eq!(
                        got, LISTED,
                        "List {i} ended without error, so it must be whole"
                    );
                    complete += 1;
                }
                Err(status) => {
                    assert_eq!(
                        status.code(),
                        Code::DeadlineExceeded,
                        "List {i}: {status:?}"
                    );
                    assert!(
                        status.message().contains("1s"),
                        "List {i}: the message names the deadline: {}",
                        status.message()
                    );
                    assert!(got < LISTED, "List {i} got everything, yet failed");
                    ended += 1;
                }
            }
        }
        eprintln!("40 stalled Lists: {ended} ended by the deadline, {complete} read whole later");
        assert!(ended > 0, "no stalled List was ended by its deadline");
    }
);

// ---------------------------------------------------------------------------------------------
// Raw HTTP/2, to act as no well-behaved client would
// ---------------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The next frame, or None at the end of the connection.
fn read_frame(s: &mut UnixStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    if let Err(e) = s.read_exact(&mut head) {
        use std::io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset => return None,
            WouldBlock | TimedOut => panic!("no frame from lamina, and no end, within 60 s"),
            _ => panic!("reading from lamina: {e}"),
        }
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).ok()?;
    Some((head[3], head[4], stream, payload))
}

/// A header block of literal fields without indexing (HPACK's simplest form).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127);
        b.push(0);
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    }
    b
}

// A peer that stops answering (frozen, or gone without closing its socket) must not keep its
// connection, and what it holds, for ever: lamina pings an idle connection and closes it when
// no answer comes. A client that answers keeps its connection.
root_test!(
    a_peer_that_stops_answering_pings_is_disconnected,
    threads = 2,
    || {
        let d = TestDaemon::start_with("", |cmd| {
            cmd.env("LAMINA_KEEPALIVE_MS", "500");
        })
        .await;
        let mut live = d.client().await;
        live.prepare("k", "").await.unwrap();

        let socket = d.socket.clone();
        let seen = tokio::task::spawn_blocking(move || {
            let mut s = UnixStream::connect(socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s.write_all(PREFACE).unwrap();
            s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
            // Reads whatever comes and answers nothing, not even the server's SETTINGS.
            let mut kinds = Vec::new();
            loop {
                match read_frame(&mut s) {
                    Some((kind, ..)) => kinds.push(kind),
                    None => return kinds,
                }
            }
        });
        let kinds = seen.await.unwrap_or_else(|e| {
            panic!("the silent peer's connection was not closed within 60 s: {e}")
        });
        assert!(kinds.contains(&PING), "lamina never pinged: {kinds:?}");
        // The client that answers pings kept its connection through several of them.
        assert_eq!(live.stat("k").await.unwrap().kind, ACTIVE);
    }
);

// containerd sends all its requests over one connection, and it waits for a free stream when
// the server says how many it may open; a client that opens more anyway gets the excess
// refused (REFUSED_STREAM, safe to retry) instead of tying up lamina without bound.
daemon_test!(streams_per_connection_are_capped, threads = 2, |d| {
    let socket = d.socket.clone();
    const OPENED: u32 = 1500;
    let (refused, other) = tokio::task::spawn_blocking(move || {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        let block = header_block(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/containerd.services.snapshots.v1.Snapshots/List"),
            (":authority", "lamina"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]);
        // Requests whose body never comes: each stream stays open.
        for i in 0..OPENED {
            out.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i, &block));
        }
        // lamina answers a PING only once it has dealt with every frame sent before it.
        out.extend(frame(PING, 0, 0, b"barrier!"));
        s.write_all(&out).unwrap();
        let (mut refused, mut other) = (Vec::new(), Vec::new());
        loop {
            let Some((kind, flags, stream, payload)) = read_frame(&mut s) else {
                panic!("lamina closed the connection; frames so far: {other:?}");
            };
            match kind {
                SETTINGS if flags & ACK == 0 => s.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap(),
                PING if flags & ACK != 0 && payload == b"barrier!" => break,
                RST_STREAM => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    if code == REFUSED_STREAM {
                        refused.push(stream);
                    } else {
                        other.push(format!("RST_STREAM {stream} code {code}"));
                    }
                }
                GOAWAY | HEADERS | DATA => other.push(format!("frame {kind} on stream {stream}")),
                _ => {}
            }
        }
        (refused, other)
    })
    .await
    .unwrap();
    assert!(
        other.is_empty(),
        "streams within the cap must stay open: {other:?}"
    );
    assert!(
        !refused.is_empty(),
        "{OPENED} streams open at once on one connection, and none refused"
    );
    // The refused streams are the last ones: every one past the cap.
    let accepted = (refused[0] - 1) / 2;
    let expected: Vec<u32> = (accepted..OPENED).map(|i| 1 + 2 * i).collect();
    assert_eq!(refused, expected, "refused streams");
    // Generous: far more than containerd has in flight at once.
    assert!(
        accepted >= 256,
        "only {accepted} streams accepted on one connection"
    );
    eprintln!(
        "{accepted} streams accepted on one connection, {} refused",
        refused.len()
    );

    let mut c = d.client().await;
    assert_code(c.stat("none").await, Code::NotFound, "does not exist");
});

// ---------------------------------------------------------------------------------------------
// Parent chains
// ---------------------------------------------------------------------------------------------

// overlayfs stacks at most 500 lower layers (OVL_MAX_STACK in the kernel's fs/overlayfs).
// An active snapshot or a view with 500 ancestors mounts; one with 501 would fail only when
// containerd mounts it, so Prepare and View refuse it up front, naming the limit.
daemon_test!(
    parent_chains_deeper_than_overlayfs_stacks_are_refused,
    threads = 2,
    |d, mut c| {
        // c1 … c501: c<n> has n-1 ancestors.
        let mut parent = String::new();
        for n in 1..=501 {
            let (key, name) = (format!("a{n}"), format!("c{n}"));
            c.prepare(&key, &parent)
                .await
                .unwrap_or_else(|e| panic!("Prepare on a chain of {} layers: {e:?}", n - 1));
            c.commit(&name, &key).await.unwrap();
            parent = name;
        }

        // 500 ancestors: accepted, and the kernel mounts them.
        let mounts = c.prepare("top", "c500").await.unwrap();
        let lowers = |m: &Mount| option(&m.options, "lowerdir").unwrap().split(':').count();
        assert_eq!(lowers(&mounts[0]), 500);
        {
            let m = Mounted::new_any(&mounts, &d.scratch("top"));
            std::fs::write(m.join("f"), b"on 500 layers").unwrap();
        }
        let view = c.view("top-view", "c500").await.unwrap();
        assert_eq!(lowers(&view[0]), 500);
        drop(Mounted::new_any(&view, &d.scratch("top-view")));

        // 501 ancestors: refused with a clear reason, and nothing is left behind.
        let dirs = d.snapshot_dirs();
        for res in [
            c.prepare("deep", "c501").await,
            c.view("deep-view", "c501").await,
        ] {
            let Err(err) = res else {
                panic!("a snapshot on 501 layers was accepted");
            };
            assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
            for needle in ["501", "500", "overlayfs"] {
                assert!(
                    err.message().contains(needle),
                    "{needle:?} in {}",
                    err.message()
                );
            }
        }
        assert_code(c.stat("deep").await, Code::NotFound, "does not exist");
        assert_code(c.stat("deep-view").await, Code::NotFound, "does not exist");
        assert_eq!(d.snapshot_dirs(), dirs);

        // The limit is the kernel's: the same mount with one lower more is refused by overlayfs.
        let extra = d.scratch("extra-lower");
        let mut deeper = view[0].clone();
        for o in &mut deeper.options {
            if let Some(list) = o.strip_prefix("lowerdir=") {
                *o = format!("lowerdir={}:{list}", extra.display());
            }
        }
        let err = lamina_mount(&deeper, &d.scratch("501"))
            .expect_err("overlayfs mounted 501 lower layers");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }
);
