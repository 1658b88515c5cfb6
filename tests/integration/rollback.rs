//! A store that does not know the directories beside it: missing (moved aside, lost), or older
//! than they are (put back from a backup). lamina must neither delete the layers it does not
//! know nor hand out their IDs again, and it must say how to go on.

use std::{process::Output, time::Duration};

use crate::util::*;

/// What `o` printed, stdout then stderr.
fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// Commits a layer holding `secret` and a directory of files under `name`; returns its ID.
async fn layer(c: &mut Client, name: &str, secret: &str) -> u64 {
    let key = format!("{name}-tmp");
    let fs = bind_source(&c.prepare(&key, "").await.unwrap());
    std::fs::create_dir(fs.join("big")).unwrap();
    for i in 0..100 {
        std::fs::write(fs.join(format!("big/{i}")), vec![7u8; 4096]).unwrap();
    }
    std::fs::write(fs.join("secret"), secret).unwrap();
    c.commit(name, &key).await.unwrap();
    id_of(&fs)
}

/// Starting must be refused, with `needles` in the message, and nothing under `snapshots/`
/// touched.
async fn refused(d: &TestDaemon, needles: &[&str]) -> String {
    let before = contents(&d.root.join("snapshots"));
    let message = match start_or_exit(d).await {
        Started::Exited(out) => {
            assert!(!out.status.success(), "exit status {}", out.status);
            final_line(&out.stderr)
        }
        Started::Serving(child) => {
            stop_child(child);
            panic!("lamina started over snapshots its store does not know");
        }
    };
    eprintln!("rollback: refused: {message}");
    for needle in needles {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
    assert_eq!(
        contents(&d.root.join("snapshots")),
        before,
        "a refused start changed what is under snapshots/"
    );
    let _ = std::fs::remove_file(&d.socket);
    message
}

/// A new snapshot after the store was mended: an ID above every one that was on disk, empty,
/// and still there once the background deleter has had time to run.
async fn a_fresh_snapshot_is_its_own(d: &TestDaemon, highest: u64) {
    let mut c = d.client().await;
    let fs = bind_source(&c.prepare("fresh", "").await.unwrap());
    let id = id_of(&fs);
    assert!(
        id > highest,
        "ID {id} handed out again (highest on disk was {highest})"
    );
    assert_eq!(
        std::fs::read_dir(&fs).unwrap().count(),
        0,
        "{fs:?} not empty"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fs.is_dir(), "the fresh snapshot's directory was deleted");
    c.stat("fresh").await.unwrap();
}

daemon_test!(
    a_missing_store_over_existing_layers_refuses_to_start,
    |mut d, mut c| {
        let base = layer(&mut c, "base", "base's secret").await;
        c.prepare("app", "base").await.unwrap();
        drop(c);
        assert!(d.stop_async().await.success());
        let db = d.root.join("metadata.redb");
        let aside = d.dir.path().join("metadata.redb.aside");
        std::fs::rename(&db, &aside).unwrap();

        let message = refused(
            &d,
            &[
                &db.display().to_string(),
                "missing",
                "2 snapshot directories",
            ],
        )
        .await;
        assert!(!db.exists(), "a refused start created a new, empty store");
        for way in ["restore", "--repair --delete-unknown"] {
            assert!(
                message.contains(way),
                "the way on {way:?} is not named: {message}"
            );
        }

        // The first way on: the store comes back, and so does everything.
        std::fs::rename(&aside, &db).unwrap();
        d.spawn().await;
        let mut c = d.client().await;
        let view = c.view("check", "base").await.unwrap();
        let m = Mounted::new(&view, &d.scratch("check"));
        assert_eq!(
            std::fs::read_to_string(m.join("secret")).unwrap(),
            "base's secret"
        );
        drop(m);
        assert!(d.root.join(format!("snapshots/{base}")).is_dir());
    }
);

// The second way on: fsck says what the directories the store does not know hold, deletes
// them only when told to in so many words, and lamina then starts with IDs above theirs.
daemon_test!(
    without_its_store_fsck_deletes_unknown_layers_only_when_told,
    |mut d, mut c| {
        let base = layer(&mut c, "base", "base's secret").await;
        let other = layer(&mut c, "other", "other's secret").await;
        drop(c);
        assert!(d.stop_async().await.success());
        std::fs::remove_file(d.root.join("metadata.redb")).unwrap();
        let snapshots = d.root.join("snapshots");
        let before = contents(&snapshots);

        let looked = d.offline(&["fsck"]);
        let out = text(&looked);
        eprintln!("rollback: fsck: {out}");
        assert_eq!(looked.status.code(), Some(1), "{out}");
        assert!(out.contains(&format!("snapshots/{base}")), "{out}");
        assert!(out.contains(&format!("snapshots/{other}")), "{out}");
        assert!(
            out.contains("bytes"),
            "fsck does not say what deleting them frees: {out}"
        );
        assert!(out.contains("--delete-unknown"), "{out}");
        assert_eq!(
            contents(&snapshots),
            before,
            "fsck without --repair changed something"
        );
        assert!(
            !d.root.join("metadata.redb").exists(),
            "fsck created a store"
        );

        let repaired = d.offline(&["fsck", "--repair"]);
        let out = text(&repaired);
        eprintln!("rollback: fsck --repair: {out}");
        assert_eq!(repaired.status.code(), Some(1), "{out}");
        assert!(out.contains("--delete-unknown"), "{out}");
        assert_eq!(
            contents(&snapshots),
            before,
            "--repair alone deleted unknown layers"
        );

        let deleted = d.offline(&["fsck", "--repair", "--delete-unknown"]);
        let out = text(&deleted);
        eprintln!("rollback: fsck --repair --delete-unknown: {out}");
        assert!(deleted.status.success(), "{out}");
        assert!(out.contains("freed"), "{out}");
        assert_eq!(d.snapshot_dirs(), Vec::<String>::new());

        d.spawn().await;
        a_fresh_snapshot_is_its_own(&d, base.max(other)).await;
    }
);

daemon_test!(
    a_store_older_than_its_directories_refuses_to_start,
    |mut d, mut c| {
        let old = layer(&mut c, "old", "old secret").await;
        drop(c);
        assert!(d.stop_async().await.success());
        let db = d.root.join("metadata.redb");
        let backup = d.dir.path().join("backup.redb");
        std::fs::copy(&db, &backup).unwrap();

        d.spawn().await;
        let mut c = d.client().await;
        let newer = layer(&mut c, "newer", "newer secret").await;
        c.prepare("on-newer", "newer").await.unwrap();
        drop(c);
        assert!(d.stop_async().await.success());
        std::fs::copy(&backup, &db).unwrap();

        let highest = newer + 1;
        refused(
            &d,
            &["older", &format!("highest on disk is {highest}"), "restore"],
        )
        .await;

        let deleted = d.offline(&["fsck", "--repair", "--delete-unknown"]);
        let out = text(&deleted);
        eprintln!("rollback: fsck --repair --delete-unknown: {out}");
        assert!(deleted.status.success(), "{out}");
        assert_eq!(d.snapshot_dirs(), vec![old.to_string()], "{out}");

        d.spawn().await;
        a_fresh_snapshot_is_its_own(&d, highest).await;
        let mut c = d.client().await;
        let view = c.view("check", "old").await.unwrap();
        let m = Mounted::new(&view, &d.scratch("check"));
        assert_eq!(
            std::fs::read_to_string(m.join("secret")).unwrap(),
            "old secret"
        );
    }
);

// Something made `snapshots/<next ID>` while lamina serves: a creation does not take it for
// its own (its files would show in the new snapshot, and whatever deletes it later would
// delete the new snapshot's data), nor does it create anything where a symlink there points.
daemon_test!(
    a_directory_planted_for_the_next_id_is_never_adopted,
    |d, mut c| {
        let first = id_of(bind_source(&c.prepare("first", "").await.unwrap()));
        let snapshots = d.root.join("snapshots");
        let planted = snapshots.join((first + 1).to_string());
        std::fs::create_dir_all(planted.join("fs/old-layer")).unwrap();
        std::fs::write(planted.join("fs/secret"), "not yours").unwrap();
        std::fs::create_dir(planted.join("work")).unwrap();
        let elsewhere = d.scratch("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, snapshots.join((first + 2).to_string())).unwrap();

        for key in ["second", "third"] {
            let fs = bind_source(&c.prepare(key, "").await.unwrap());
            let id = id_of(&fs);
            assert!(id > first + 2, "{key} took planted ID {id}");
            assert!(fs.symlink_metadata().unwrap().is_dir());
            assert_eq!(
                std::fs::read_dir(&fs).unwrap().count(),
                0,
                "{key}: {fs:?} not empty"
            );
        }
        assert_eq!(
            std::fs::read_dir(&elsewhere).unwrap().count(),
            0,
            "a creation made directories where a symlink under snapshots/ points"
        );
        assert_eq!(
            std::fs::read_to_string(planted.join("fs/secret")).unwrap(),
            "not yours"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        for key in ["second", "third"] {
            let fs = bind_source(&c.mounts(key).await.unwrap());
            assert!(fs.is_dir(), "{key}'s directory was deleted under it");
        }
    }
);
