//! Keys, names and labels: refused when empty or too long, with messages that say so; valid
//! however odd, and then never paths.

use std::{collections::HashMap, path::Path, sync::atomic::Ordering};

use tonic::Code;

use super::*;

// ---------------------------------------------------------------------------------------------
// Keys and names
// ---------------------------------------------------------------------------------------------

daemon_test!(bad_keys_and_names_are_refused_by_every_rpc, |d| {
    let (mut c, before) = seeded(&d).await;
    let start = TRIED.load(Ordering::Relaxed);

    let long = "k".repeat(4097);
    let mib = "/..\n".repeat(1 << 18);
    let cases: [(&str, &str, &[&str]); 3] = [
        ("empty", "", &["must not be empty"]),
        ("4097 bytes", &long, &["4097 bytes", "at most 4096"]),
        ("1 MiB", &mib, &["1048576 bytes", "at most 4096"]),
    ];
    for (label, bad, needles) in cases {
        // The field the message must name, the request, and what it is called in a failure.
        let mut table = vec![
            ("key", Call::prepare(bad, ""), ""),
            ("key", Call::view(bad, ""), ""),
            ("key", Call::Mounts(bad.into()), ""),
            ("key", Call::Remove(bad.into()), ""),
            ("key", Call::Stat(bad.into()), ""),
            ("key", Call::Usage(bad.into()), ""),
            ("key", Call::commit("fresh", bad), " (key)"),
            ("name", Call::commit(bad, "act"), " (name)"),
            (
                "name",
                Call::update(bad, labels(&[("a", "1")]), &["labels"]),
                "",
            ),
        ];
        if !bad.is_empty() {
            // An empty parent means "no parent"; any other bad parent is refused.
            table.push(("parent", Call::prepare("fresh", bad), " (parent)"));
            table.push(("parent", Call::view("fresh", bad), " (parent)"));
        }
        let table: Vec<Refusal> = table
            .into_iter()
            .map(|(field, call, which)| {
                let what = format!("{}{which} with a {label} key", call.rpc());
                refusal(what, call, Code::InvalidArgument, &with(field, needles))
            })
            .collect();
        refuse_all(&mut c, &table).await;
    }
    assert_eq!(
        stored(&mut c, &d).await,
        before,
        "hostile keys changed the store"
    );
    check_tree(&d);

    // Past the 16 MiB message limit: refused by the transport, the daemon goes on.
    let huge = "x".repeat(17 << 20);
    for res in [
        c.stat(&huge).await.map(|_| ()),
        c.prepare(&huge, "").await.map(|_| ()),
        c.commit("fresh", &huge).await,
    ] {
        tried(1);
        let s = res.expect_err("a 17 MiB request must be refused");
        assert!(
            matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted),
            "17 MiB request: {:?} {}",
            s.code(),
            show(s.message())
        );
        assert!(s.message().contains("too large"), "{}", show(s.message()));
    }
    let mut c = big_client(&d).await;
    assert_eq!(
        stored(&mut c, &d).await,
        before,
        "oversized requests changed the store"
    );
    report("bad keys", TRIED.load(Ordering::Relaxed) - start);
});

/// Keys are arbitrary strings to containerd: these are all valid, and must round-trip through
/// every RPC without ever naming a path.
fn odd_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "/",
        "//",
        "/etc/passwd",
        ".",
        "..",
        "../..",
        "../../../../../../tmp/lamina-escaped",
        "a/../../b",
        "snapshots/1",
        "1",
        "0",
        "007",
        "metadata.redb",
        "\n",
        "a\nb",
        "\0",
        "a\0b",
        "\r\n\t",
        " ",
        "ключ/🙂",
        "%2e%2e%2f",
        "*",
        "~",
        "$HOME",
        "-rf",
        "\\",
        "\"",
        "name==a,kind==view",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    keys.push("k".repeat(4096)); // the longest key accepted
    keys.push(format!("{}/..", "../".repeat(1000)));
    keys
}

daemon_test!(odd_keys_are_ordinary_keys_and_never_paths, |d| {
    let mut c = big_client(&d).await;
    let snapshots = d.root.join("snapshots").display().to_string();
    let is_fs = |p: &str| is_snapshot_fs(&snapshots, p);
    let keys = odd_keys();
    // The key itself as a label value, unless the label would then exceed 4096 bytes.
    let short = |k: &str| {
        if k.len() < 4000 {
            k.to_string()
        } else {
            "long".to_string()
        }
    };
    let committed = |k: &str| {
        if k.len() < 4096 {
            format!("{k}\u{1}committed")
        } else {
            "c".repeat(4096)
        }
    };
    for k in &keys {
        tried(1);
        let what = show(k);
        let mounts = c
            .prepare_with(k, "", labels(&[("containerd.io/snapshot/key", &short(k))]))
            .await
            .unwrap_or_else(|e| panic!("Prepare {what}: {e:?}"));
        assert!(is_fs(&mounts[0].source), "Prepare {what}: {mounts:?}");
        let st = c.stat(k).await.unwrap();
        assert_eq!((st.name.as_str(), st.kind), (k.as_str(), ACTIVE), "{what}");
        assert_eq!(st.labels["containerd.io/snapshot/key"], short(k));
        assert_eq!(c.mounts(k).await.unwrap(), mounts, "Mounts {what}");
        c.usage(k).await.unwrap();
        let up = c
            .update(info(k, labels(&[("x", &short(k))])), &["labels.x"])
            .await
            .unwrap();
        assert_eq!(up.labels["x"], short(k), "Update {what}");
        let name = committed(k);
        c.commit(&name, k).await.unwrap();
        refused(
            &format!("Stat {what} after commit"),
            c.stat(k).await,
            Code::NotFound,
            &["does not exist"],
        );
        let child = c.prepare(k, &name).await.unwrap();
        let lower = option(&child[0].options, "lowerdir")
            .unwrap_or_else(|| panic!("child of {what}: {child:?}"));
        assert!(is_fs(lower), "child of {what}: {child:?}");
        let vmounts = c.view(&format!("{k}\u{2}view"), &name).await;
        let vmounts = match (k.len() < 4096, vmounts) {
            (true, Ok(m)) => m,
            (false, r) => {
                refused(
                    "View of a key over 4096 bytes",
                    r,
                    Code::InvalidArgument,
                    &["4096"],
                );
                Vec::new()
            }
            (true, Err(e)) => panic!("View on {what}: {e:?}"),
        };
        if let Some(m) = vmounts.first() {
            assert_eq!(m.source, lower, "a view of {what} binds the parent's fs");
        }
        // Filters find it by its exact name, whatever characters it has.
        let found = c
            .list(&[&format!("name=={}", go_quote(k))])
            .await
            .unwrap_or_else(|e| panic!("List name=={what}: {e:?}"));
        assert_eq!(found, vec![k.clone()], "List by name {what}");
        let found = c
            .list(&[&format!("parent=={}", go_quote(&name))])
            .await
            .unwrap();
        assert_eq!(
            found.len(),
            if k.len() < 4096 { 2 } else { 1 },
            "List by parent {what}"
        );
    }
    check_tree(&d);
    assert!(
        !Path::new("/tmp/lamina-escaped").exists(),
        "a key escaped the root"
    );
    assert_eq!(c.list(&[]).await.unwrap().len(), keys.len() * 3 - 1);
    let dirs = d.snapshot_dirs();
    assert_eq!(
        dirs.len(),
        keys.len() * 3 - 1,
        "one directory per snapshot: {dirs:?}"
    );

    // Persisted as given, and all removable again, children first.
    let mut d = d;
    drop(c);
    d.restart().await;
    let mut c = big_client(&d).await;
    for k in &keys {
        let what = show(k);
        if k.len() < 4096 {
            c.remove(&format!("{k}\u{2}view")).await.unwrap();
        }
        c.remove(k)
            .await
            .unwrap_or_else(|e| panic!("Remove {what}: {e:?}"));
        c.remove(&committed(k))
            .await
            .unwrap_or_else(|e| panic!("Remove committed {what}: {e:?}"));
        refused(
            &format!("Stat {what} after remove"),
            c.stat(k).await,
            Code::NotFound,
            &["does not exist"],
        );
    }
    c.cleanup().await.unwrap();
    assert_eq!(c.list(&[]).await.unwrap(), Vec::<String>::new());
    assert_eq!(d.snapshot_dirs(), Vec::<String>::new());
    check_tree(&d);
    report("odd keys", keys.len());
});

// ---------------------------------------------------------------------------------------------
// Labels
// ---------------------------------------------------------------------------------------------

daemon_test!(labels_over_the_limit_are_refused_by_every_rpc, |d| {
    let (mut c, before) = seeded(&d).await;
    let start = TRIED.load(Ordering::Relaxed);

    // Prepare, View, Commit and Update with `l`, each to be refused naming `needles`.
    let with_labels = |what: &str, l: HashMap<String, String>, needles: &[&str]| {
        [
            Call::prepare("fresh", "").labelled(l.clone()),
            Call::view("fresh", "").labelled(l.clone()),
            Call::commit("fresh", "act").labelled(l.clone()),
            Call::update("act", l, &["labels"]),
        ]
        .map(|call| {
            let what = format!("{} {what}", call.rpc());
            refusal(what, call, Code::InvalidArgument, needles)
        })
    };
    let over = [
        ("k".repeat(4000), "v".repeat(97)),
        ("k".repeat(4097), String::new()),
        ("k".into(), "v".repeat(1 << 20)),
    ];
    for (k, v) in &over {
        let total = k.len() + v.len();
        let needles = ["label", "4096", &format!("{total} bytes")];
        let l = HashMap::from([(k.clone(), v.clone())]);
        let table = with_labels(&format!("with a {total}-byte label"), l, &needles);
        refuse_all(&mut c, &table).await;
    }
    let empty = labels(&[("", "v")]);
    let table = with_labels("with an empty label key", empty, &["label", "empty"]);
    refuse_all(&mut c, &table).await;
    assert_eq!(
        stored(&mut c, &d).await,
        before,
        "refused labels changed the store"
    );

    // Exactly 4096 bytes is allowed.
    let edge = HashMap::from([("k".repeat(4000), "v".repeat(96))]);
    c.prepare_with("edge", "", edge.clone()).await.unwrap();
    assert_eq!(c.stat("edge").await.unwrap().labels, edge);
    c.remove("edge").await.unwrap();

    // 5000 labels: containerd sets no limit on their number; they are kept, all of them.
    let many: HashMap<String, String> = (0..5000)
        .map(|i| (format!("containerd.io/snapshot/l{i}"), format!("v{i}")))
        .collect();
    tried(3);
    c.prepare_with("many", "", many.clone()).await.unwrap();
    assert_eq!(c.stat("many").await.unwrap().labels, many);
    c.commit_with("many-c", "many", many.clone()).await.unwrap();
    let up = c.update(info("many-c", many.clone()), &[]).await.unwrap();
    assert_eq!(up.labels, many);
    assert_eq!(
        c.list(&["labels.\"containerd.io/snapshot/l4999\"==v4999"])
            .await
            .unwrap(),
        vec!["many-c"]
    );
    c.remove("many-c").await.unwrap();

    // 5000 labels of 4096 bytes: past the 16 MiB message limit.
    let huge: HashMap<String, String> = (0..5000)
        .map(|i| (format!("{i:04}"), "v".repeat(4092)))
        .collect();
    tried(1);
    let s = c
        .prepare_with("huge", "", huge)
        .await
        .expect_err("a 20 MB request");
    assert!(
        matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted)
            && s.message().contains("too large"),
        "{:?} {}",
        s.code(),
        show(s.message())
    );
    let mut c = big_client(&d).await;
    c.cleanup().await.unwrap();
    assert_eq!(
        stored(&mut c, &d).await,
        before,
        "label tests left something behind"
    );
    check_tree(&d);
    report("labels", TRIED.load(Ordering::Relaxed) - start);
});

// Every label is within containerd's limit, and so is every request, yet two snapshots carry
// more label bytes together than one message may: List (containerd's Walk, which its garbage
// collector needs) must still answer, in messages under the limit.
daemon_test!(
    list_answers_when_all_labels_together_exceed_one_message,
    |d| {
        let mut c = big_client(&d).await;
        let big: HashMap<String, String> = (0..2500)
            .map(|i| (format!("containerd.io/snapshot/{i:04}"), "v".repeat(4000)))
            .collect();
        for k in ["big1", "big2"] {
            tried(1);
            c.prepare_with(k, "", big.clone()).await.unwrap();
        }
        let listed = c.list(&[]).await;
        assert_eq!(
            listed
                .as_ref()
                .map_err(|s| format!("{:?} {}", s.code(), show(s.message()))),
            Ok(&vec!["big1".to_string(), "big2".to_string()]),
            "List of two snapshots with 10 MB of labels each"
        );
        report("labels beyond one message", 2);
    }
);

// Updates of one label at a time add up. What they add up to is held to the same limit as
// one request, or a snapshot could grow past what one message carries: then its Stat fails,
// and so does every List that includes it (containerd's garbage collector with it).
daemon_test!(label_updates_cannot_grow_a_snapshot_past_the_limit, |d| {
    let mut c = big_client(&d).await;
    c.prepare_with("grown", "", HashMap::new()).await.unwrap();
    // Batches of 1000 labels of 4000 bytes: about 4 MB each, within the 12 MiB limit until
    // the fourth.
    let batch = |b: usize| -> HashMap<String, String> {
        (0..1000)
            .map(|i| (format!("containerd.io/l{b}-{i:04}"), "v".repeat(4000)))
            .collect()
    };
    let mut all = HashMap::new();
    for b in 0..4 {
        let labels = batch(b);
        let paths: Vec<String> = labels.keys().map(|k| format!("labels.{k}")).collect();
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        // Only the count, so that a failure does not print megabytes of labels.
        let updated = c
            .update(info("grown", labels.clone()), &paths)
            .await
            .map(|i| i.labels.len());
        if b < 3 {
            tried(1);
            assert_eq!(updated.unwrap(), 1000 * (b + 1));
            all.extend(labels);
        } else {
            refused(
                "an Update of single labels past the total",
                updated,
                Code::InvalidArgument,
                &["4000 labels", "bytes in all"],
            );
        }
    }
    assert_eq!(c.stat("grown").await.unwrap().labels, all);
    assert_eq!(c.list(&[]).await.unwrap(), vec!["grown"]);
    report("label updates past the total", 4);
});
