//! Each RPC's semantics and error codes, filters, and concurrency.
//!
//! Every test runs the real daemon and checks what containerd's own overlay snapshotter (and
//! the metadata store behind it) would answer: the gRPC code containerd turns back into an
//! errdefs error, and the state left behind.

use std::{
    collections::{BTreeSet, HashMap},
    os::unix::{
        fs::{FileTypeExt, MetadataExt, PermissionsExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, SystemTime},
};

use containerd_snapshots::api::snapshots::v1::ListSnapshotsRequest;
use tonic::Code;

use crate::util::*;

const GC_ROOT: &str = "containerd.io/gc.root";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn time(ts: &Option<prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from(ts.clone().expect("timestamp set")).expect("valid timestamp")
}

/// Prepares `<name>-tmp` on `parent` and commits it as `name` with `labels`; returns the
/// committed snapshot's `fs` directory.
async fn commit_new(
    c: &mut Client,
    name: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> PathBuf {
    let tmp = format!("{name}-tmp");
    let mounts = c.prepare(&tmp, parent).await.unwrap();
    c.commit_with(name, &tmp, labels).await.unwrap();
    own_fs(&mounts)
}

fn names(v: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

/// `st_blocks * 512` of one path.
fn bytes_of(path: &Path) -> i64 {
    std::fs::symlink_metadata(path).unwrap().blocks() as i64 * 512
}

// ---------------------------------------------------------------------------------------------
// Prepare / View
// ---------------------------------------------------------------------------------------------

daemon_test!(
    prepare_and_view_refuse_a_key_that_exists_as_any_kind,
    |d, mut c| {
        commit_new(&mut c, "committed", "", labels(&[])).await;
        c.prepare("active", "").await.unwrap();
        c.view("view", "").await.unwrap();
        let before = c.list_batches(&[]).await.unwrap().0;
        let dirs = d.snapshot_dirs();

        for key in ["active", "view", "committed"] {
            assert_code(c.prepare(key, "").await, Code::AlreadyExists, key);
            assert_code(c.view(key, "").await, Code::AlreadyExists, key);
            // The key check comes first: a valid parent does not change the answer.
            assert_code(c.prepare(key, "committed").await, Code::AlreadyExists, key);
            assert_code(c.view(key, "committed").await, Code::AlreadyExists, key);
        }

        assert_eq!(
            c.list_batches(&[]).await.unwrap().0,
            before,
            "nothing changed"
        );
        assert_eq!(d.snapshot_dirs(), dirs, "no directory was created");
        assert_eq!(c.stat("active").await.unwrap().kind, ACTIVE);
        assert_eq!(c.stat("view").await.unwrap().kind, VIEW);
        assert_eq!(c.stat("committed").await.unwrap().kind, COMMITTED);
    }
);

daemon_test!(prepare_and_view_check_the_parent_and_the_key, |d, mut c| {
    commit_new(&mut c, "committed", "", labels(&[])).await;
    c.prepare("active", "").await.unwrap();
    c.view("view", "").await.unwrap();
    let dirs = d.snapshot_dirs();

    assert_code(c.prepare("x", "missing").await, Code::NotFound, "missing");
    assert_code(c.view("x", "missing").await, Code::NotFound, "missing");
    for parent in ["active", "view"] {
        assert_code(c.prepare("x", parent).await, Code::InvalidArgument, parent);
        assert_code(c.view("x", parent).await, Code::InvalidArgument, parent);
    }
    assert_code(c.prepare("", "").await, Code::InvalidArgument, "");
    assert_code(c.view("", "").await, Code::InvalidArgument, "");
    assert_code(c.prepare("", "committed").await, Code::InvalidArgument, "");

    assert_code(c.stat("x").await, Code::NotFound, "x");
    assert_eq!(
        c.list(&[]).await.unwrap(),
        names(&["active", "committed", "view"])
    );
    assert_eq!(
        d.snapshot_dirs(),
        dirs,
        "failed creations leave no directory"
    );

    // The parent still has no children: it can be removed.
    c.remove("committed").await.unwrap();
});

daemon_test!(
    created_snapshots_report_their_labels_and_equal_times,
    |_d, mut c| {
        let t0 = SystemTime::now();
        let l = labels(&[
            ("containerd.io/snapshot.ref", "sha256:abc"),
            (
                "containerd.io/snapshot/x.y",
                "with spaces, commas=and=equals",
            ),
        ]);
        c.prepare_with("a", "", l.clone()).await.unwrap();
        commit_new(&mut c, "p", "", labels(&[])).await;
        c.view_with("v", "p", labels(&[("v", "1")])).await.unwrap();
        let t1 = SystemTime::now();

        let a = c.stat("a").await.unwrap();
        assert_eq!(
            (a.name.as_str(), a.parent.as_str(), a.kind),
            ("a", "", ACTIVE)
        );
        assert_eq!(a.labels, l);
        assert_eq!(a.created_at, a.updated_at, "created == updated at creation");
        let created = time(&a.created_at);
        assert!(
            t0 <= created && created <= t1,
            "created {created:?} not in [{t0:?}, {t1:?}]"
        );

        let v = c.stat("v").await.unwrap();
        assert_eq!(
            (v.name.as_str(), v.parent.as_str(), v.kind),
            ("v", "p", VIEW)
        );
        assert_eq!(v.labels, labels(&[("v", "1")]));
        assert_eq!(v.created_at, v.updated_at);
        let created = time(&v.created_at);
        assert!(t0 <= created && created <= t1);
    }
);

// containerd's store drops labels whose value is empty when it writes them (boltutil's
// writeMap): they are neither reported nor matched by filters.
daemon_test!(empty_label_values_are_not_stored, |_d, mut c| {
    c.prepare_with("a", "", labels(&[("k", "v"), ("empty", "")]))
        .await
        .unwrap();
    assert_eq!(c.stat("a").await.unwrap().labels, labels(&[("k", "v")]));
    assert_eq!(c.list(&["labels.empty"]).await.unwrap(), names(&[]));

    c.commit_with("A", "a", labels(&[("c", "1"), ("empty", "")]))
        .await
        .unwrap();
    assert_eq!(c.stat("A").await.unwrap().labels, labels(&[("c", "1")]));

    let updated = c
        .update(info("A", labels(&[("u", "1"), ("empty", "")])), &[])
        .await
        .unwrap();
    assert_eq!(updated.labels, labels(&[("u", "1")]));
    assert_eq!(c.stat("A").await.unwrap().labels, labels(&[("u", "1")]));
});

// ---------------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------------

daemon_test!(mounts_of_each_kind, |_d, mut c| {
    let p_fs = commit_new(&mut c, "p", "", labels(&[])).await;

    let a = c.prepare("a", "").await.unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].r#type, "bind");
    assert_eq!(a[0].options, vec!["rw", "rbind"]);
    assert_eq!(c.mounts("a").await.unwrap(), a);

    let child = c.prepare("child", "p").await.unwrap();
    assert_eq!(child[0].r#type, "overlay");
    assert!(child[0]
        .options
        .contains(&format!("lowerdir={}", p_fs.display())));
    assert_eq!(c.mounts("child").await.unwrap(), child);

    let v = c.view("v", "p").await.unwrap();
    assert_eq!(v[0].r#type, "bind");
    assert_eq!(v[0].source, p_fs.display().to_string());
    assert_eq!(v[0].options, vec!["ro", "rbind"]);
    assert_eq!(c.mounts("v").await.unwrap(), v);

    let v0 = c.view("v0", "").await.unwrap();
    assert_eq!(c.mounts("v0").await.unwrap(), v0);

    assert_code(c.mounts("p").await, Code::FailedPrecondition, "p");
    assert_code(c.mounts("nope").await, Code::NotFound, "nope");
});

// ---------------------------------------------------------------------------------------------
// Commit
// ---------------------------------------------------------------------------------------------

// containerd's order: the key must exist (NotFound), then the name must be new
// (AlreadyExists), then the key must be active (FailedPrecondition).
daemon_test!(commit_errors, |_d, mut c| {
    commit_new(&mut c, "committed", "", labels(&[])).await;
    c.prepare("active", "").await.unwrap();
    c.view("view", "").await.unwrap();
    let before = c.list_batches(&[]).await.unwrap().0;

    assert_code(
        c.commit("n", "view").await,
        Code::FailedPrecondition,
        "view",
    );
    assert_code(
        c.commit("n", "committed").await,
        Code::FailedPrecondition,
        "committed",
    );
    for name in ["committed", "active", "view"] {
        assert_code(c.commit(name, "active").await, Code::AlreadyExists, name);
    }
    assert_code(
        c.commit("committed", "committed").await,
        Code::AlreadyExists,
        "committed",
    );
    assert_code(c.commit("n", "nope").await, Code::NotFound, "nope");
    assert_code(c.commit("committed", "nope").await, Code::NotFound, "nope");
    assert_code(c.commit("", "active").await, Code::InvalidArgument, "");

    assert_code(c.stat("n").await, Code::NotFound, "n");
    assert_eq!(
        c.list_batches(&[]).await.unwrap().0,
        before,
        "failed commits change nothing"
    );
});

daemon_test!(commit_moves_the_snapshot_to_its_name, |_d, mut c| {
    let p_fs = commit_new(&mut c, "p", "", labels(&[])).await;
    let m = c
        .prepare_with("a", "p", labels(&[("x", "1"), ("y", "2")]))
        .await
        .unwrap();
    let a_fs = own_fs(&m);
    std::fs::write(a_fs.join("file"), b"data").unwrap();
    let active = c.stat("a").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    let t0 = SystemTime::now();
    c.commit_with("N", "a", labels(&[("y", "3"), ("z", "4")]))
        .await
        .unwrap();
    let t1 = SystemTime::now();

    assert_code(c.stat("a").await, Code::NotFound, "a");
    let n = c.stat("N").await.unwrap();
    assert_eq!(
        (n.name.as_str(), n.parent.as_str(), n.kind),
        ("N", "p", COMMITTED)
    );
    assert_eq!(
        n.labels,
        labels(&[("y", "3"), ("z", "4")]),
        "replaced, not merged"
    );
    assert_eq!(n.created_at, n.updated_at);
    let created = time(&n.created_at);
    assert!(t0 <= created && created <= t1);
    assert!(created > time(&active.created_at), "a new creation time");

    // The data directory is kept: a view of N has the active one's fs as its nearest lower.
    let v = c.view("v", "N").await.unwrap();
    assert_eq!(
        v[0].options[0],
        format!("lowerdir={}:{}", a_fs.display(), p_fs.display())
    );
    assert_eq!(std::fs::read(a_fs.join("file")).unwrap(), b"data");

    // The key is free at once, and N is p's child now.
    let again = c.prepare("a", "N").await.unwrap();
    assert_ne!(own_fs(&again), a_fs);
    assert_code(c.remove("p").await, Code::FailedPrecondition, "p");
    assert_code(c.remove("N").await, Code::FailedPrecondition, "N");
    c.remove("a").await.unwrap();
    c.remove("v").await.unwrap();
    c.remove("N").await.unwrap();
    c.remove("p").await.unwrap();
    assert_eq!(c.list(&[]).await.unwrap(), names(&[]));
});

// ---------------------------------------------------------------------------------------------
// Remove and Cleanup
// ---------------------------------------------------------------------------------------------

daemon_test!(remove_refuses_parents_and_unknown_keys, |_d, mut c| {
    commit_new(&mut c, "p", "", labels(&[])).await;
    commit_new(&mut c, "q", "p", labels(&[])).await;
    c.prepare("a", "q").await.unwrap();
    c.view("v", "q").await.unwrap();

    assert_code(c.remove("nope").await, Code::NotFound, "nope");
    assert_code(c.remove("p").await, Code::FailedPrecondition, "p");
    assert_code(c.remove("q").await, Code::FailedPrecondition, "q");
    c.remove("a").await.unwrap();
    assert_code(c.remove("q").await, Code::FailedPrecondition, "q");
    c.remove("v").await.unwrap();
    assert_code(c.remove("p").await, Code::FailedPrecondition, "p");
    c.remove("q").await.unwrap();
    c.remove("p").await.unwrap();
    assert_code(c.remove("p").await, Code::NotFound, "p");
    assert_code(c.stat("p").await, Code::NotFound, "p");
    assert_eq!(c.list(&[]).await.unwrap(), names(&[]));
});

daemon_test!(remove_frees_the_key_and_the_name_at_once, |_d, mut c| {
    let first = own_fs(&c.prepare("a", "").await.unwrap());
    c.remove("a").await.unwrap();
    let second = own_fs(&c.prepare("a", "").await.unwrap());
    assert_ne!(first, second, "a new snapshot, in a new directory");
    assert_eq!(c.stat("a").await.unwrap().kind, ACTIVE);

    c.view("v", "").await.unwrap();
    c.remove("v").await.unwrap();
    c.prepare("v", "").await.unwrap();
    assert_eq!(c.stat("v").await.unwrap().kind, ACTIVE);

    commit_new(&mut c, "N", "", labels(&[("gen", "1")])).await;
    c.remove("N").await.unwrap();
    c.prepare("t", "").await.unwrap();
    c.commit_with("N", "t", labels(&[("gen", "2")]))
        .await
        .unwrap();
    assert_eq!(c.stat("N").await.unwrap().labels, labels(&[("gen", "2")]));
    // And a committed name is usable as an active key again.
    c.remove("N").await.unwrap();
    c.prepare("N", "").await.unwrap();
    assert_eq!(c.stat("N").await.unwrap().kind, ACTIVE);
});

daemon_test!(
    remove_deletes_the_directory_in_the_background,
    |d, mut c| {
        let a = id_of(own_fs(&c.prepare("a", "").await.unwrap())).to_string();
        let b = id_of(own_fs(&c.prepare("b", "").await.unwrap())).to_string();
        let mut both = vec![a.clone(), b.clone()];
        both.sort();
        assert_eq!(d.snapshot_dirs(), both);

        // Remove answers once the record is gone; the directory follows without a Cleanup.
        c.remove("a").await.unwrap();
        assert_code(c.stat("a").await, Code::NotFound, "a");
        let dirs = d
            .snapshot_dirs_when(std::time::Duration::from_secs(20), |dirs| {
                dirs == [b.clone()]
            })
            .await;
        assert_eq!(
            dirs,
            vec![b.clone()],
            "the directory of a removed snapshot is still there"
        );
        assert!(d.root.join("snapshots").join(&b).join("fs").is_dir());
        assert_eq!(c.stat("b").await.unwrap().kind, ACTIVE);

        // A Cleanup right after a Remove returns only once the directory is gone, however big.
        let big = own_fs(&c.prepare("big", "").await.unwrap());
        for i in 0..3000 {
            std::fs::write(big.join(format!("f{i}")), b"data").unwrap();
        }
        c.remove("big").await.unwrap();
        c.cleanup().await.unwrap();
        assert_eq!(d.snapshot_dirs(), vec![b.clone()]);
        assert!(!big.exists());

        // Nothing left to do: a second Cleanup keeps what is owned.
        c.cleanup().await.unwrap();
        assert_eq!(d.snapshot_dirs(), vec![b]);
    }
);

daemon_test!(
    sync_remove_deletes_the_directory_before_answering,
    config = "sync_remove = true\n",
    |d, mut c| {
        let p = id_of(&commit_new(&mut c, "p", "", labels(&[])).await).to_string();
        let a = id_of(own_fs(&c.prepare("a", "p").await.unwrap())).to_string();
        let mut both = vec![p.clone(), a];
        both.sort();
        assert_eq!(d.snapshot_dirs(), both);

        c.remove("a").await.unwrap();
        assert_eq!(d.snapshot_dirs(), vec![p]);
        c.remove("p").await.unwrap();
        assert_eq!(d.snapshot_dirs(), Vec::<String>::new());
    }
);

// ---------------------------------------------------------------------------------------------
// Stat
// ---------------------------------------------------------------------------------------------

daemon_test!(stat_reports_every_field, |_d, mut c| {
    commit_new(&mut c, "p", "", labels(&[("l", "p")])).await;
    c.prepare_with("a", "p", labels(&[("l", "a")]))
        .await
        .unwrap();
    c.view_with("v", "p", labels(&[("l", "v")])).await.unwrap();

    // The wire numbers of containerd's snapshots.v1.Kind: VIEW 1, ACTIVE 2, COMMITTED 3.
    for (key, parent, kind) in [("p", "", 3), ("a", "p", 2), ("v", "p", 1)] {
        let i = c.stat(key).await.unwrap();
        assert_eq!(i.name, key);
        assert_eq!(i.parent, parent, "{key}");
        assert_eq!(i.kind, kind, "{key}");
        assert_eq!(i.labels, labels(&[("l", key)]));
        assert!(i.created_at.is_some() && i.created_at == i.updated_at);
    }
    assert_code(c.stat("nope").await, Code::NotFound, "nope");
});

// ---------------------------------------------------------------------------------------------
// Update
// ---------------------------------------------------------------------------------------------

daemon_test!(update_changes_labels_as_the_field_paths_say, |_d, mut c| {
    c.prepare_with("a", "", labels(&[("a", "1"), ("b", "2")]))
        .await
        .unwrap();
    let created = c.stat("a").await.unwrap();
    let mut last = created.clone();

    // (labels given, field paths, labels expected afterwards)
    type Step = (
        HashMap<String, String>,
        Vec<&'static str>,
        HashMap<String, String>,
    );
    let steps: Vec<Step> = vec![
        // No field paths: replace all.
        (labels(&[("c", "3")]), vec![], labels(&[("c", "3")])),
        // "labels": replace all.
        (
            labels(&[("d", "4"), ("e", "5")]),
            vec!["labels"],
            labels(&[("d", "4"), ("e", "5")]),
        ),
        // "labels.k": set k only; labels not named are ignored.
        (
            labels(&[("d", "40"), ("f", "6"), ("x", "9")]),
            vec!["labels.d", "labels.f"],
            labels(&[("d", "40"), ("e", "5"), ("f", "6")]),
        ),
        // "labels.k" with k absent: delete k.
        (
            labels(&[("d", "41")]),
            vec!["labels.e"],
            labels(&[("d", "40"), ("f", "6")]),
        ),
        // "labels.k" with k empty: delete k.
        (
            labels(&[("d", "")]),
            vec!["labels.d"],
            labels(&[("f", "6")]),
        ),
        // Deleting a label that is not there changes nothing.
        (labels(&[]), vec!["labels.missing"], labels(&[("f", "6")])),
        // Everything after "labels." is the key, dots and slashes included.
        (
            labels(&[("containerd.io/snapshot/a.b", "v")]),
            vec!["labels.containerd.io/snapshot/a.b"],
            labels(&[("f", "6"), ("containerd.io/snapshot/a.b", "v")]),
        ),
        // Paths apply in order.
        (
            labels(&[("g", "7")]),
            vec!["labels", "labels.f"],
            labels(&[("g", "7")]),
        ),
    ];
    for (given, paths, want) in steps {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let got = c.update(info("a", given.clone()), &paths).await.unwrap();
        assert_eq!(got.labels, want, "update {given:?} with {paths:?}");
        let stat = c.stat("a").await.unwrap();
        assert_eq!(got, stat, "Update answers what Stat then reports");
        assert_eq!(stat.name, "a");
        assert_eq!(stat.kind, ACTIVE);
        assert_eq!(stat.parent, "");
        assert_eq!(stat.created_at, created.created_at, "Created stays");
        assert!(
            time(&stat.updated_at) > time(&last.updated_at),
            "Updated advances"
        );
        last = stat;
    }
});

daemon_test!(
    update_refuses_other_fields_and_changes_nothing,
    |_d, mut c| {
        commit_new(&mut c, "p", "", labels(&[])).await;
        c.prepare_with("a", "p", labels(&[("keep", "1")]))
            .await
            .unwrap();
        let before = c.stat("a").await.unwrap();

        let mut changed = info("a", labels(&[("new", "1")]));
        changed.parent = "other".into();
        changed.kind = COMMITTED;
        for paths in [
            vec!["parent"],
            vec!["name"],
            vec!["kind"],
            vec!["created_at"],
            vec!["labelsx"],
            vec!["labels", "parent"],
            vec!["labels.new", "kind"],
        ] {
            assert_code(
                c.update(changed.clone(), &paths).await,
                Code::InvalidArgument,
                "",
            );
            assert_eq!(
                c.stat("a").await.unwrap(),
                before,
                "{paths:?} changed nothing, not even Updated"
            );
        }

        // Only labels are mutable: parent and kind in the info are ignored.
        let got = c.update(changed, &[]).await.unwrap();
        assert_eq!(got.labels, labels(&[("new", "1")]));
        assert_eq!((got.parent.as_str(), got.kind), ("p", ACTIVE));
        assert_eq!(c.stat("a").await.unwrap(), got);

        // No info at all.
        assert_code(c.update_with(None, None).await, Code::InvalidArgument, "");

        assert_code(
            c.update(info("nope", labels(&[])), &[]).await,
            Code::NotFound,
            "nope",
        );
        assert_code(
            c.update(info("nope", labels(&[("l", "1")])), &["labels.l"])
                .await,
            Code::NotFound,
            "nope",
        );

        // Committed snapshots and views take label updates too.
        c.view("v", "p").await.unwrap();
        for key in ["p", "v"] {
            let got = c
                .update(info(key, labels(&[("u", key)])), &["labels"])
                .await
                .unwrap();
            assert_eq!(got.labels, labels(&[("u", key)]));
            assert_eq!(c.stat(key).await.unwrap().labels, labels(&[("u", key)]));
        }
    }
);

// ---------------------------------------------------------------------------------------------
// Usage
// ---------------------------------------------------------------------------------------------

daemon_test!(usage_by_kind, |d, mut c| {
    // A committed layer with a 64 KiB file: its usage is measured at commit.
    let base = c.prepare("base", "").await.unwrap();
    let p_fs = own_fs(&base);
    {
        let m = Mounted::new(&base, &d.scratch("base"));
        std::fs::write(m.join("big"), vec![7u8; 65536]).unwrap();
    }
    let p_expected = (bytes_of(&p_fs) + bytes_of(&p_fs.join("big")), 2);
    let live = c.usage("base").await.unwrap();
    assert_eq!((live.size, live.inodes), p_expected);
    c.commit("P", "base").await.unwrap();
    let u = c.usage("P").await.unwrap();
    assert_eq!((u.size, u.inodes), p_expected);
    assert!(u.size >= 65536);

    // An active child: computed now, over its own fs only.
    let a = c.prepare("a", "P").await.unwrap();
    let a_fs = own_fs(&a);
    let u = c.usage("a").await.unwrap();
    assert_eq!(
        (u.size, u.inodes),
        (bytes_of(&a_fs), 1),
        "only its empty fs"
    );
    {
        let m = Mounted::new(&a, &d.scratch("a"));
        std::fs::write(m.join("f"), vec![1u8; 8192]).unwrap();
        std::fs::hard_link(m.join("f"), m.join("f2")).unwrap();
        let mut entries: Vec<String> = std::fs::read_dir(&a_fs)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(entries, vec!["f", "f2"], "the upper holds what was written");
        let u = c.usage("a").await.unwrap();
        assert_eq!(
            (u.size, u.inodes),
            (bytes_of(&a_fs) + bytes_of(&a_fs.join("f")), 2),
            "a hard link counts once; the parent's file is not counted"
        );
        std::fs::write(m.join("g"), vec![2u8; 1 << 20]).unwrap();
        let u2 = c.usage("a").await.unwrap();
        assert_eq!(u2.inodes, 3);
        assert_eq!(
            u2.size,
            bytes_of(&a_fs) + bytes_of(&a_fs.join("f")) + bytes_of(&a_fs.join("g"))
        );
        assert!(u2.size >= u.size + (1 << 20));
    }

    // Views use nothing.
    c.view("v", "P").await.unwrap();
    c.view("v0", "").await.unwrap();
    for key in ["v", "v0"] {
        let u = c.usage(key).await.unwrap();
        assert_eq!((u.size, u.inodes), (0, 0), "{key}");
    }

    // The committed value is the stored one, not measured again.
    std::fs::write(p_fs.join("later"), vec![3u8; 65536]).unwrap();
    let u = c.usage("P").await.unwrap();
    assert_eq!((u.size, u.inodes), p_expected);

    assert_code(c.usage("nope").await, Code::NotFound, "nope");
});

// ---------------------------------------------------------------------------------------------
// List (Walk) and filters
// ---------------------------------------------------------------------------------------------

// The snapshot set and the ten filter cases of containerd's testsuite `checkWalk`.
daemon_test!(list_filters_of_the_conformance_walk, |_d, mut c| {
    let gc = || labels(&[(GC_ROOT, "check-walk")]);
    let gc_l = |l: &str| {
        let mut m = gc();
        m.insert("l".into(), l.into());
        m
    };

    c.prepare_with("a-np", "", gc()).await.unwrap();
    c.prepare_with("p-tmp", "", gc()).await.unwrap();
    c.commit_with("p", "p-tmp", gc()).await.unwrap();
    c.prepare_with("a", "p", gc()).await.unwrap();
    c.view_with("v", "p", gc()).await.unwrap();
    c.prepare_with("p-wl-tmp", "", gc()).await.unwrap();
    c.commit_with("p-wl", "p-wl-tmp", gc_l("1")).await.unwrap();
    c.prepare_with("a-wl", "p-wl", gc_l("2")).await.unwrap();
    c.view_with("v-wl", "p-wl", gc_l("3")).await.unwrap();
    c.prepare_with("a-np-wl", "", gc_l("2")).await.unwrap();

    let cases: [(&[&str], &[&str]); 10] = [
        (
            &[r#"labels."containerd.io/gc.root"==check-walk"#],
            &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
        ),
        (
            &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
            &["a-np", "a", "a-wl", "a-np-wl"],
        ),
        (
            &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
            &["v", "v-wl"],
        ),
        (
            &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
            &["p", "p-wl"],
        ),
        (&["name==p", "name==a-np-wl"], &["p", "a-np-wl"]),
        (&["name==a-wl,labels.l"], &["a-wl"]),
        (&["parent==p"], &["a", "v"]),
        (
            &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
            &["a", "v", "a-wl", "v-wl"],
        ),
        (&["labels.l"], &["p-wl", "a-wl", "v-wl", "a-np-wl"]),
        (&["labels.l==2"], &["a-wl", "a-np-wl"]),
    ];
    for (i, (filters, want)) in cases.iter().enumerate() {
        assert_eq!(
            c.list(filters).await.unwrap(),
            names(want),
            "case {i}: {filters:?}"
        );
    }
    assert_eq!(
        c.list(&[]).await.unwrap(),
        names(&["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"])
    );
});

daemon_test!(list_filter_syntax, |_d, mut c| {
    c.prepare_with(
        "n1",
        "",
        labels(&[(GC_ROOT, "x"), ("a.b/c", "1"), ("l", "one")]),
    )
    .await
    .unwrap();
    commit_new(&mut c, "n2", "", labels(&[("l", "two"), ("a.b", "dot")])).await;
    c.view_with("layer-10", "n2", labels(&[("l", "pipe|x")]))
        .await
        .unwrap();
    let all = names(&["n1", "n2", "layer-10"]);

    let cases: &[(&[&str], &[&str])] = &[
        // No filter, or an empty one, matches everything.
        (&[""], &["n1", "n2", "layer-10"]),
        // OR across filter strings, AND within one, no duplicates.
        (&["name==n1", "kind==committed"], &["n1", "n2"]),
        (&["name==n1", "labels.l==one"], &["n1"]),
        (&["name==n1,kind==committed"], &[]),
        (&["name==n1,kind==active"], &["n1"]),
        // !=, with an absent field reading as "".
        (&["kind!=active"], &["n2", "layer-10"]),
        (&["labels.l!=one"], &["n2", "layer-10"]),
        (&["labels.missing!=x"], &["n1", "n2", "layer-10"]),
        (&[r#"labels.missing!="""#], &[]),
        (&[r#"parent!="""#], &["layer-10"]),
        (&[r#"parent==n2"#], &["layer-10"]),
        (&["parent==\"\""], &["n1", "n2"]),
        // ~= with bare, /re/, |re| and "re" quoting.
        (&["name~=^n[0-9]$"], &["n1", "n2"]),
        (&["name~=/^layer-[0-9]+$/"], &["layer-10"]),
        (&["name~=|^n|"], &["n1", "n2"]),
        (&[r#"name~="1$""#], &["n1"]),
        (&["name~=/^lay{1,2}er/"], &["layer-10"]),
        (&["labels.l~=/[|]/"], &["layer-10"]),
        // Go escapes inside the quotes: \\ is one backslash, so the regex is \|.
        (&[r"labels.l~=/\\|/"], &["layer-10"]),
        (&["labels.l~=/^t/"], &["n2"]),
        (&["name~=/^n/,labels.l~=|o$|"], &["n2"]),
        // Presence.
        (&["labels.l"], &["n1", "n2", "layer-10"]),
        (&["labels.nope"], &[]),
        (&["parent"], &["n1", "n2", "layer-10"]),
        (&["name,kind"], &["n1", "n2", "layer-10"]),
        // Label keys with dots and slashes.
        (&[r#"labels."containerd.io/gc.root"==x"#], &["n1"]),
        (&[r#"labels."containerd.io/gc.root""#], &["n1"]),
        (&[r#"labels."a.b/c"==1"#], &["n1"]),
        (&["labels.a.b==dot"], &["n2"]),
        (&[r#"labels."a.b""#], &["n2"]),
        (&[r#"labels."a.b"!=dot"#], &["n1", "layer-10"]),
        // Spaces around operators and after commas (not before a comma, as in containerd).
        (&["name == n1, kind == active"], &["n1"]),
    ];
    for (filters, want) in cases {
        assert_eq!(
            c.list(filters).await.unwrap(),
            names(want),
            "filters {filters:?}"
        );
    }
    assert_eq!(c.list(&[]).await.unwrap(), all);
    let (one, _) = c
        .list_batches(&["name==n1", "labels.l==one"])
        .await
        .unwrap();
    assert_eq!(
        one.len(),
        1,
        "a snapshot matching two filters is listed once"
    );

    for bad in [
        &["name=="][..],
        &["name==a b"],
        &["kind==active,"],
        &[",kind==active"],
        &[r#"labels."open"#],
        &["name~=/(/"],
        &["name=~n1"],
        &["name==/n1/"],
        &["name==n1 ,kind==active"],
        // As in containerd, only the quote itself may be escaped, not the other quotes.
        &[r"labels.l~=/\|/"],
        &["name==n1", "name=="],
    ] {
        assert_code(c.list(bad).await, Code::InvalidArgument, "filter");
    }
});

daemon_test!(list_streams_batches_of_at_most_100, |_d, c| {
    // Enough for ten full batches, and for a filter that matches only the last snapshot to
    // pass over a thousand that it does not.
    let n = 1050;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let mut c = c.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(16) {
                c.view(&format!("v{i:04}"), "").await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let mut c = c;

    let req = ListSnapshotsRequest {
        snapshotter: "lamina".into(),
        filters: vec![],
    };
    let mut stream = c.inner.list(req).await.unwrap().into_inner();
    let mut sizes = Vec::new();
    let mut seen = BTreeSet::new();
    while let Some(msg) = stream.message().await.unwrap() {
        sizes.push(msg.info.len());
        seen.extend(msg.info.into_iter().map(|i| i.name));
    }
    let mut want_sizes = vec![100; 10];
    want_sizes.push(50);
    assert_eq!(sizes, want_sizes, "1050 snapshots in batches of 100");
    let want: BTreeSet<String> = (0..n).map(|i| format!("v{i:04}")).collect();
    assert_eq!(seen, want, "each snapshot exactly once");

    let (infos, batches) = c.list_batches(&["name~=^v00"]).await.unwrap();
    assert_eq!((infos.len(), batches), (100, 1));
    let (infos, batches) = c.list_batches(&["name==v1049"]).await.unwrap();
    assert_eq!(
        infos.len(),
        1,
        "the last snapshot, after 1049 that do not match"
    );
    assert_eq!((infos[0].name.as_str(), batches), ("v1049", 1));
    let (infos, _) = c.list_batches(&["name==none"]).await.unwrap();
    assert!(infos.is_empty());
});

// Clients Stat inside their Walk callback: nothing may be held while a List stream is open.
daemon_test!(
    stat_and_prepare_while_a_list_stream_is_open,
    threads = 4,
    |d, mut c| {
        for i in 0..150 {
            c.view(&format!("v{i:03}"), "").await.unwrap();
        }
        let req = ListSnapshotsRequest {
            snapshotter: "lamina".into(),
            filters: vec![],
        };
        let mut stream = c.inner.list(req).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().expect("a first batch");
        assert!(!first.info.is_empty());

        let mut other = c.clone();
        let mut fresh = d.client().await;
        let stats = tokio::time::timeout(Duration::from_secs(10), async {
            for i in &first.info {
                let s = other.stat(&i.name).await.unwrap();
                assert_eq!(&s, i);
            }
            fresh.prepare("during", "").await.unwrap();
            fresh.stat("during").await.unwrap()
        })
        .await
        .expect("Stat and Prepare must not wait for the open List stream");
        assert_eq!(stats.kind, ACTIVE);

        let mut total = first.info.len();
        while let Some(msg) = stream.message().await.unwrap() {
            total += msg.info.len();
        }
        assert_eq!(
            total, 150,
            "the stream lists the snapshots as they were when it began"
        );
    }
);

// ---------------------------------------------------------------------------------------------
// The upperdir label
// ---------------------------------------------------------------------------------------------

daemon_test!(
    upperdir_label_reports_each_snapshots_own_fs,
    config = "upperdir_label = true\n",
    |d, mut c| {
        let p_fs = commit_new(&mut c, "p", "", labels(&[("l", "1")])).await;
        let a_fs = own_fs(&c.prepare("a", "p").await.unwrap());
        c.view("v", "p").await.unwrap();

        let snapshots = d.root.join("snapshots");
        let expect = |fs: &Path| {
            assert_eq!(fs.parent().unwrap().parent().unwrap(), snapshots);
            fs.display().to_string()
        };
        let p = c.stat("p").await.unwrap();
        assert_eq!(p.labels.get(UPPERDIR), Some(&expect(&p_fs)));
        assert_eq!(p.labels.get("l").map(String::as_str), Some("1"));
        assert_eq!(p.labels.len(), 2);
        let a = c.stat("a").await.unwrap();
        assert_eq!(a.labels.get(UPPERDIR), Some(&expect(&a_fs)));
        let v = c.stat("v").await.unwrap();
        let v_fs = PathBuf::from(v.labels.get(UPPERDIR).expect("label on a view"));
        assert_eq!(v_fs.file_name().unwrap(), "fs");
        assert_eq!(v_fs.parent().unwrap().parent().unwrap(), snapshots);
        assert_ne!(v_fs, p_fs, "a view reports its own fs, not its parent's");
        let mut dirs: Vec<String> = [&p_fs, &a_fs, &v_fs]
            .iter()
            .map(|fs| id_of(fs).to_string())
            .collect();
        dirs.sort();
        assert_eq!(d.snapshot_dirs(), dirs);
        for info in [&p, &a, &v] {
            assert!(Path::new(&info.labels[UPPERDIR]).is_dir(), "{info:?}");
        }

        let (listed, _) = c.list_batches(&[]).await.unwrap();
        assert_eq!(listed.len(), 3);
        for info in listed {
            assert_eq!(
                info,
                c.stat(&info.name).await.unwrap(),
                "List reports what Stat does"
            );
        }

        // Computed, not stored: replacing all labels keeps it; it is no filter field of the store.
        let got = c.update(info("p", labels(&[])), &[]).await.unwrap();
        assert_eq!(got.labels, labels(&[(UPPERDIR, &expect(&p_fs))]));
    }
);

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

// ---------------------------------------------------------------------------------------------
// Label limits
// ---------------------------------------------------------------------------------------------

daemon_test!(oversized_labels_are_refused, |d, mut c| {
    let key = "containerd.io/snapshot/big";
    let fits = "v".repeat(4096 - key.len());
    let over = "v".repeat(4097 - key.len());
    let long_key = "k".repeat(4097);

    // Exactly 4096 bytes is accepted.
    c.prepare_with("ok", "", labels(&[(key, &fits)]))
        .await
        .unwrap();
    assert_eq!(c.stat("ok").await.unwrap().labels[key], fits);

    let dirs = d.snapshot_dirs();
    assert_code(
        c.prepare_with("big", "", labels(&[(key, &over)])).await,
        Code::InvalidArgument,
        "",
    );
    assert_code(
        c.prepare_with("big", "", labels(&[(&long_key, "")])).await,
        Code::InvalidArgument,
        "",
    );
    assert_code(
        c.view_with("big", "", labels(&[(key, &over)])).await,
        Code::InvalidArgument,
        "",
    );
    assert_code(c.stat("big").await, Code::NotFound, "big");
    assert_eq!(d.snapshot_dirs(), dirs, "nothing stored");

    assert_code(
        c.commit_with("N", "ok", labels(&[(key, &over)])).await,
        Code::InvalidArgument,
        "",
    );
    assert_eq!(c.stat("ok").await.unwrap().kind, ACTIVE);
    assert_code(c.stat("N").await, Code::NotFound, "N");

    let before = c.stat("ok").await.unwrap();
    assert_code(
        c.update(info("ok", labels(&[(&long_key, "v")])), &[]).await,
        Code::InvalidArgument,
        "",
    );
    assert_code(
        c.update(
            info("ok", labels(&[(key, &over)])),
            &["labels.containerd.io/snapshot/big"],
        )
        .await,
        Code::InvalidArgument,
        "",
    );
    assert_eq!(c.stat("ok").await.unwrap(), before);
});

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
                        // were given up too; the worker goes on over a new connection.
                        Err(s) if s.code() == Code::Unknown && s.message() == "transport error" => {
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
