//! Persistence across restarts, and SIGKILL in the middle of work.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::util::*;

daemon_test!(everything_survives_a_restart, |mut d, mut c| {
    c.prepare_with("base", "", labels(&[("l", "1")]))
        .await
        .unwrap();
    c.commit_with("Base", "base", labels(&[("c", "2")]))
        .await
        .unwrap();
    c.prepare("active", "Base").await.unwrap();
    c.view("view", "Base").await.unwrap();
    c.prepare("a2", "").await.unwrap();
    c.remove("a2").await.unwrap();
    let before = c.list_batches(&[]).await.unwrap().0;
    let mounts_before = c.mounts("active").await.unwrap();

    d.restart().await;
    let mut c = d.client().await;
    let mut after = c.list_batches(&[]).await.unwrap().0;
    let mut before = before;
    before.sort_by(|a, b| a.name.cmp(&b.name));
    after.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        before, after,
        "names, kinds, parents, labels and times all survive"
    );
    assert_eq!(c.mounts("active").await.unwrap(), mounts_before);
    assert_code(c.stat("a2").await, tonic::Code::NotFound, "a2");
    // IDs are not handed out again after a restart either.
    let m = c.prepare("new", "").await.unwrap();
    assert!(!mounts_before[0]
        .options
        .iter()
        .any(|o| o.contains(&m[0].source)));
});

// Several clients prepare, write, commit and remove while the daemon is SIGKILLed at random
// instants. After each restart, every acknowledged commit is there with its content, every
// acknowledged remove stayed removed, and no directory is without its snapshot.
daemon_test!(
    acknowledged_work_survives_sigkill,
    threads = 4,
    config = "upperdir_label = true\n",
    |mut d| {
        let rounds = env_or("LAMINA_CRASH_ROUNDS", 25) as usize;
        // name -> content, for every commit lamina acknowledged; and removes it acknowledged.
        let committed: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let removed: Arc<Mutex<Vec<String>>> = Arc::default();
        // Removes that got no answer because the daemon died: either outcome is correct.
        let in_doubt: Arc<Mutex<Vec<String>>> = Arc::default();
        // When each round's SIGKILL comes.
        let mut rng = Rng::new(0x9e3779b97f4a7c15);
        let mut verified_upto = 0;
        for round in 0..rounds {
            let mut workers = Vec::new();
            for w in 0..4 {
                let (committed, removed, in_doubt) =
                    (committed.clone(), removed.clone(), in_doubt.clone());
                let c = d.client().await;
                let scratch = d.scratch(&format!("m-{round}-{w}"));
                workers.push(tokio::spawn(async move {
                    let mut c = c;
                    for i in 0.. {
                        let key = format!("r{round}-w{w}-{i}");
                        let name = format!("C-{key}");
                        let content = format!("content of {key}");
                        // Stack on this worker's previous commit now and then, to cover overlays.
                        let parent = {
                            let list = committed.lock().unwrap();
                            if i % 2 == 1 {
                                list.iter()
                                    .rev()
                                    .find(|(n, _)| n.contains(&format!("-w{w}-")))
                                    .map(|(n, _)| n.clone())
                            } else {
                                None
                            }
                        };
                        let parent = parent
                            .filter(|p| !removed.lock().unwrap().contains(p))
                            .unwrap_or_default();
                        let Ok(mounts) = c.prepare(&key, &parent).await else {
                            return;
                        };
                        let target = scratch.join(format!("{i}"));
                        let written = tokio::task::spawn_blocking(move || {
                            let m = Mounted::new(&mounts, &target);
                            std::fs::write(m.join("file"), content.as_bytes()).map(|_| content)
                        })
                        .await
                        .unwrap();
                        let Ok(content) = written else { return };
                        if c.commit(&name, &key).await.is_err() {
                            return;
                        }
                        committed.lock().unwrap().push((name.clone(), content));
                        if i % 3 == 2 && parent.is_empty() {
                            match c.remove(&name).await {
                                Ok(()) => removed.lock().unwrap().push(name),
                                Err(_) => {
                                    in_doubt.lock().unwrap().push(name);
                                    return;
                                }
                            }
                        }
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(50 + rng.below(400) as u64)).await;
            d.kill();
            for mut w in workers {
                // A request cut off by the kill normally fails at once; one that tonic's channel
                // leaves waiting on the dead connection is abandoned after a while. Either way it
                // was not acknowledged, so nothing was recorded for it.
                match tokio::time::timeout(Duration::from_secs(20), &mut w).await {
                    Ok(joined) => joined.unwrap(),
                    Err(_) => w.abort(),
                }
            }
            d.spawn().await;
            let mut c = d.client().await;

            // Start-up recovery alone, without a Cleanup, must leave no directory without its
            // snapshot: every snapshot's directories at once, orphans once its deleter is through.
            let owned = owned_dirs(&mut c).await;
            let on_disk: BTreeSet<String> = d.snapshot_dirs().into_iter().collect();
            assert!(
                owned.is_subset(&on_disk),
                "round {round}: snapshots without directories: {:?}",
                owned.difference(&on_disk).collect::<Vec<_>>()
            );
            let settled = d
                .snapshot_dirs_when(Duration::from_secs(30), |dirs| {
                    dirs.iter().cloned().collect::<BTreeSet<_>>() == owned
                })
                .await;
            let on_disk: BTreeSet<String> = settled.into_iter().collect();
            assert_eq!(
                on_disk, owned,
                "round {round}: directories on disk vs snapshots in the store, 30 s after start-up"
            );

            let doubtful = std::mem::take(&mut *in_doubt.lock().unwrap());
            for name in doubtful {
                match c.stat(&name).await {
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        removed.lock().unwrap().push(name)
                    }
                    Err(s) => panic!("stat {name}: {s}"),
                    Ok(_) => {}
                }
            }
            let removed_now = removed.lock().unwrap().clone();
            for name in &removed_now {
                assert_code(c.stat(name).await, tonic::Code::NotFound, name);
            }
            let committed_now = committed.lock().unwrap().clone();
            let last_round = round + 1 == rounds;
            for (n, (name, content)) in committed_now.iter().enumerate() {
                if removed_now.contains(name) {
                    continue;
                }
                let info = c
                    .stat(name)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: acknowledged {name} lost: {e}"));
                assert_eq!(info.kind, COMMITTED, "{name}");
                // Content is read back through a view for this round's commits, and for all of
                // them after the last round: every commit is read at least twice, at linear cost.
                if n < verified_upto && !last_round {
                    continue;
                }
                let view = format!("check-{round}-{n}");
                let mounts = c.view(&view, name).await.unwrap();
                let m = Mounted::new(&mounts, &d.scratch(&view));
                assert_eq!(
                    &std::fs::read_to_string(m.join("file")).unwrap(),
                    content,
                    "{name}"
                );
                drop(m);
                c.remove(&view).await.unwrap();
            }
            verified_upto = committed_now.len();
            c.cleanup().await.unwrap();
            let owned = owned_dirs(&mut c).await;
            let on_disk: BTreeSet<String> = d.snapshot_dirs().into_iter().collect();
            assert_eq!(on_disk, owned, "round {round}: after Cleanup");
        }
        let total = committed.lock().unwrap().len();
        eprintln!("crash: {rounds} rounds, {total} acknowledged commits verified");
        assert!(
            total > 0,
            "no commit was acknowledged at all: the test proved nothing"
        );
    }
);
