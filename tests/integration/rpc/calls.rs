//! Prepare, View, Mounts, Commit, Remove, Cleanup, Stat, Update and Usage, each on its own:
//! what it answers, its error codes in containerd's order, and the state it leaves.

use super::*;

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
