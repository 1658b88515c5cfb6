//! Requests that race: on one key, a child against its parent's removal, and Prepares their
//! clients give up midway.

use super::*;

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

daemon_test!(
    concurrent_prepares_of_one_key_make_one_snapshot,
    threads = 4,
    |d| {
        let mut clients = Vec::new();
        for _ in 0..16 {
            clients.push(d.client().await);
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let mut tasks = tokio::task::JoinSet::new();
        for mut c in clients {
            let barrier = Arc::clone(&barrier);
            tasks.spawn(async move {
                barrier.wait().await;
                c.prepare("same", "").await
            });
        }
        let (mut ok, mut exists) = (0, 0);
        while let Some(r) = tasks.join_next().await {
            match r.unwrap() {
                Ok(_) => ok += 1,
                Err(s) if s.code() == Code::AlreadyExists => exists += 1,
                Err(s) => panic!("unexpected {s:?}"),
            }
        }
        assert_eq!((ok, exists), (1, 15));
        let mut c = d.client().await;
        assert_eq!(c.list(&[]).await.unwrap(), names(&["same"]));
        assert_eq!(d.snapshot_dirs().len(), 1, "the losers left no directory");
    }
);

daemon_test!(
    prepare_of_a_child_races_remove_of_its_parent,
    threads = 4,
    |d, mut c| {
        let mut other = d.client().await;
        let rounds = 40;
        let mut expected = BTreeSet::new();
        let (mut child_won, mut remove_won) = (0, 0);
        for i in 0..rounds {
            let parent = format!("P{i}");
            let child = format!("c{i}");
            commit_new(&mut c, &parent, "", labels(&[])).await;

            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let (b1, b2) = (Arc::clone(&barrier), barrier);
            let (mut c1, mut c2) = (c.clone(), other.clone());
            let (p1, p2, ch) = (parent.clone(), parent.clone(), child.clone());
            let prep = tokio::spawn(async move {
                b1.wait().await;
                c1.prepare(&ch, &p1).await
            });
            let rm = tokio::spawn(async move {
                b2.wait().await;
                c2.remove(&p2).await
            });
            let (prep, rm) = (prep.await.unwrap(), rm.await.unwrap());
            match (&prep, &rm) {
                (Ok(_), Err(s)) if s.code() == Code::FailedPrecondition => {
                    child_won += 1;
                    let info = c.stat(&child).await.unwrap();
                    assert_eq!((info.parent.as_str(), info.kind), (parent.as_str(), ACTIVE));
                    assert_eq!(c.stat(&parent).await.unwrap().kind, COMMITTED);
                    expected.insert(parent.clone());
                    expected.insert(child.clone());
                }
                (Err(s), Ok(())) if s.code() == Code::NotFound => {
                    remove_won += 1;
                    assert_code(c.stat(&parent).await, Code::NotFound, &parent);
                    assert_code(c.stat(&child).await, Code::NotFound, &child);
                }
                _ => panic!("round {i}: prepare {prep:?}, remove {rm:?}"),
            }
        }
        eprintln!("child created first {child_won} times, parent removed first {remove_won} times");

        // The store is consistent: what is listed is what the rounds decided, every child's parent
        // is there and refuses removal, and Cleanup leaves exactly one directory per snapshot.
        let (infos, _) = c.list_batches(&[]).await.unwrap();
        let listed: BTreeSet<String> = infos.iter().map(|i| i.name.clone()).collect();
        assert_eq!(listed, expected);
        c.cleanup().await.unwrap();
        assert_eq!(d.snapshot_dirs().len(), expected.len());
        for info in infos.iter().filter(|i| i.kind == ACTIVE) {
            assert!(listed.contains(&info.parent));
            assert_code(
                other.remove(&info.parent).await,
                Code::FailedPrecondition,
                "",
            );
            c.remove(&info.name).await.unwrap();
            c.remove(&info.parent).await.unwrap();
        }
        assert_eq!(c.list(&[]).await.unwrap(), names(&[]));
        c.cleanup().await.unwrap();
        assert_eq!(d.snapshot_dirs(), Vec::<String>::new());
    }
);

// A client that gives up on a Prepare (here: a grpc-timeout shorter than the call, which makes
// the server drop the request) may drop it anywhere, even between the record and its
// directories. Every snapshot that exists afterwards must have its directories.
daemon_test!(
    prepares_given_up_midway_still_get_their_directories,
    threads = 4,
    |d| {
        use containerd_snapshots::api::snapshots::v1::PrepareSnapshotRequest;
        let mut tasks = Vec::new();
        for w in 0..16u64 {
            let mut c = d.client().await;
            let socket = d.socket.clone();
            tasks.push(tokio::spawn(async move {
                let (mut answered, mut gave_up) = (0, 0);
                for i in 0..25u64 {
                    let mut req = tonic::Request::new(PrepareSnapshotRequest {
                        snapshotter: "lamina".into(),
                        key: format!("k-{w}-{i}"),
                        parent: String::new(),
                        labels: HashMap::new(),
                    });
                    // From 20 µs to 5 ms: some expire before the record, some after it, some
                    // not at all.
                    req.set_timeout(Duration::from_micros(20 + (w * 25 + i) * 137 % 5000));
                    match c.inner.prepare(req).await {
                        Ok(_) => answered += 1,
                        Err(s) if matches!(s.code(), Code::Cancelled | Code::DeadlineExceeded) => {
                            gave_up += 1
                        }
                        // The server's HTTP/2 library closes a connection whose client resets more
                        // than 20 streams it has not accepted yet (its guard against "rapid reset"
                        // floods), which a loaded machine makes likely here. The requests cut off
                        // were given up too; the worker goes on over a new connection. The
                        // connection's end comes as a transport error, or as the GOAWAY itself
                        // (ResourceExhausted, "too_many_resets") when it lands on a request.
                        Err(s)
                            if (s.code() == Code::Unknown && s.message() == "transport error")
                                || (s.code() == Code::ResourceExhausted
                                    && s.message().contains("too_many_resets")) =>
                        {
                            gave_up += 1;
                            c = Client::connect(&socket).await;
                        }
                        Err(s) => panic!("unexpected answer: {s:?}"),
                    }
                }
                (answered, gave_up)
            }));
        }
        let (mut answered, mut gave_up) = (0, 0);
        for t in tasks {
            let (a, g) = t.await.unwrap();
            answered += a;
            gave_up += g;
        }
        assert!(gave_up > 0, "no request was given up ({answered} answered)");
        eprintln!("{answered} Prepares answered, {gave_up} given up");

        // A given-up Prepare finishes in the background; give it a moment, no more.
        let mut c = d.client().await;
        let mut missing = Vec::new();
        let keys = wait_for(
            Duration::from_secs(5),
            Duration::from_millis(50),
            async || {
                missing.clear();
                let keys = c.list(&[]).await.unwrap();
                for key in &keys {
                    let fs = bind_source(&c.mounts(key).await.unwrap());
                    let work = fs.parent().unwrap().join("work");
                    if !fs.is_dir() || !work.is_dir() {
                        missing.push(key.clone());
                    }
                }
                missing.is_empty().then_some(keys)
            },
        )
        .await
        .unwrap_or_else(|| {
            panic!("snapshots without their directories ({gave_up} Prepares given up): {missing:?}")
        });
        assert!(
            keys.len() >= answered,
            "{} snapshots listed, {answered} Prepares answered",
            keys.len()
        );
    }
);
