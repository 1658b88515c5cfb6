//! List (containerd's Walk): its filters, its batches, a stream held open, and the upperdir
//! label it reports.

use super::*;

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
