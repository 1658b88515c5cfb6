//! Hostile input: every RPC with keys, names, labels, filters and field paths that are empty,
//! huge, malformed or odd. Each must get its documented gRPC code with a message a person can act
//! on, none may crash the daemon, and none may change what is stored. Keys that merely look
//! dangerous (`/`, `..`, NUL, newlines) are valid keys: they must work and never become paths.
//!
//! Seeded fuzzing at the end: random filter strings through List, random requests with random
//! field values at every RPC, and raw bytes that are not a valid request at all.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
};

use prost::bytes::{Buf, BufMut};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Code, Status,
};

use crate::util::*;

/// Hostile inputs sent over all tests of this module.
static TRIED: AtomicUsize = AtomicUsize::new(0);

fn tried(n: usize) {
    TRIED.fetch_add(n, Ordering::Relaxed);
}

fn report(test: &str, n: usize) {
    eprintln!(
        "hostile: {test}: {n} hostile inputs tried ({} so far in this module)",
        TRIED.load(Ordering::Relaxed)
    );
}

/// Shortens a key for a failure message.
fn show(s: &str) -> String {
    if s.len() <= 80 {
        return format!("{s:?}");
    }
    let mut cut = 60;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..cut], s.len())
}

/// `field` followed by `needles`.
fn with<'a>(field: &'a str, needles: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![field];
    v.extend_from_slice(needles);
    v
}

/// Asserts an error of `code` whose message is non-empty and mentions every one of `needles`
/// (case-insensitively).
#[track_caller]
fn refused<T: std::fmt::Debug>(what: &str, res: Res<T>, code: Code, needles: &[&str]) {
    tried(1);
    let status = match res {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(s) => s,
    };
    let msg = status.message();
    assert_eq!(
        status.code(),
        code,
        "{what}: wrong code; message: {}",
        show(msg)
    );
    assert!(
        !msg.trim().is_empty(),
        "{what}: {code:?} with an empty message"
    );
    let lower = msg.to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "{what}: message {} does not mention {n:?}",
            show(msg)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// What is stored, to compare before and after
// ---------------------------------------------------------------------------------------------

type Stored = (
    Vec<(String, i32, String, BTreeMap<String, String>, String)>,
    Vec<(String, i64, i64)>,
    Vec<String>,
);

/// Everything a client can see of the store (List with every field, Usage of each snapshot)
/// plus the directory names under `<root>/snapshots`.
async fn stored(c: &mut Client, d: &TestDaemon) -> Stored {
    let (infos, _) = c.list_batches(&[]).await.expect("List after hostile input");
    let mut all: Vec<_> = infos
        .into_iter()
        .map(|i| {
            (
                i.name,
                i.kind,
                i.parent,
                i.labels.into_iter().collect(),
                format!("{:?} {:?}", i.created_at, i.updated_at),
            )
        })
        .collect();
    all.sort();
    let mut usage = Vec::new();
    for (name, ..) in &all {
        let u = c.usage(name).await.expect("Usage after hostile input");
        usage.push((name.clone(), u.size, u.inodes));
    }
    let dirs = d.snapshot_dirs();
    (all, usage, dirs)
}

/// Fails unless everything under the test's directory is lamina's: the store, `snapshots/<id>`
/// with decimal IDs holding only `fs` and `work`, the spare trees, the socket. A key that became a path, here or
/// above the root, shows up as something else.
fn check_tree(d: &TestDaemon) {
    let base = d.dir.path();
    let mut bad = Vec::new();
    walk(base, base, &mut bad);
    assert!(bad.is_empty(), "paths lamina should not have made: {bad:?}");
}

fn walk(base: &Path, dir: &Path, bad: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path
            .strip_prefix(base)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let parts: Vec<&str> = rel.split('/').collect();
        // Ready-made empty trees: `a-<n>` (with work) or `v-<n>`.
        let spare = |s: &str| {
            s.strip_prefix("a-")
                .or_else(|| s.strip_prefix("v-"))
                .is_some_and(is_decimal)
        };
        let ok = match parts.as_slice() {
            ["root"] | ["run"] | ["config.toml"] => true,
            ["root", "metadata.redb"] | ["root", "snapshots"] | ["run", "lamina.sock"] => true,
            ["root", "snapshots", id] => is_decimal(id),
            ["root", "snapshots", id, "fs" | "work"] => is_decimal(id),
            ["root", "spare"] => true,
            ["root", "spare", tree] => spare(tree),
            ["root", "spare", tree, "fs" | "work"] => spare(tree),
            // Inside a snapshot's own directories: the snapshot's data, not lamina's names.
            ["root", "snapshots", id, "fs" | "work", ..] => is_decimal(id),
            _ => false,
        };
        if !ok {
            bad.push(rel);
            continue;
        }
        if path.is_dir() && !path.is_symlink() && parts.len() < 4 {
            walk(base, &path, bad);
        }
    }
}

/// A small store with every kind: committed `base` (labelled), active `act` and view `vw` on
/// it, and active `solo` without parent.
async fn seed(c: &mut Client) {
    c.prepare("base-tmp", "").await.unwrap();
    c.commit_with(
        "base",
        "base-tmp",
        labels(&[("containerd.io/snapshot/l", "1")]),
    )
    .await
    .unwrap();
    c.prepare_with("act", "base", labels(&[("l", "2")]))
        .await
        .unwrap();
    c.view("vw", "base").await.unwrap();
    c.prepare("solo", "").await.unwrap();
}

/// containerd accepts up to 16 MiB messages, and so does lamina; the tests' client too.
async fn big_client(d: &TestDaemon) -> Client {
    let mut c = d.client().await;
    c.inner = c
        .inner
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(usize::MAX);
    c
}

// ---------------------------------------------------------------------------------------------
// Keys and names
// ---------------------------------------------------------------------------------------------

daemon_test!(bad_keys_and_names_are_refused_by_every_rpc, |d| {
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let before = stored(&mut c, &d).await;
    let start = TRIED.load(Ordering::Relaxed);

    let long = "k".repeat(4097);
    let mib = "/..\n".repeat(1 << 18);
    let cases: [(&str, &str, &[&str]); 3] = [
        ("empty", "", &["must not be empty"]),
        ("4097 bytes", &long, &["4097 bytes", "at most 4096"]),
        ("1 MiB", &mib, &["1048576 bytes", "at most 4096"]),
    ];
    for (label, bad, needles) in cases {
        let w = |rpc: &str| format!("{rpc} with a {label} key");
        refused(
            &w("Prepare"),
            c.prepare(bad, "").await,
            Code::InvalidArgument,
            &with("key", needles),
        );
        refused(
            &w("View"),
            c.view(bad, "").await,
            Code::InvalidArgument,
            &with("key", needles),
        );
        refused(
            &w("Mounts"),
            c.mounts(bad).await,
            Code::InvalidArgument,
            &with("key", needles),
        );
        refused(
            &w("Remove"),
            c.remove(bad).await,
            Code::InvalidArgument,
            &with("key", needles),
        );
        refused(
            &w("Stat"),
            c.stat(bad).await,
            Code::InvalidArgument,
            &with("key", needles),
        );
        refused(
            &w("Usage"),
            c.usage(bad).await,
            Code::InvalidArgument,
            &with("key", needles),
        );
        refused(
            &w("Commit (key)"),
            c.commit("fresh", bad).await,
            Code::InvalidArgument,
            &with("key", needles),
        );
        refused(
            &w("Commit (name)"),
            c.commit(bad, "act").await,
            Code::InvalidArgument,
            &with("name", needles),
        );
        refused(
            &w("Update"),
            c.update(info(bad, labels(&[("a", "1")])), &["labels"])
                .await,
            Code::InvalidArgument,
            &with("name", needles),
        );
        if !bad.is_empty() {
            // An empty parent means "no parent"; any other bad parent is refused.
            refused(
                &w("Prepare (parent)"),
                c.prepare("fresh", bad).await,
                Code::InvalidArgument,
                &with("parent", needles),
            );
            refused(
                &w("View (parent)"),
                c.view("fresh", bad).await,
                Code::InvalidArgument,
                &with("parent", needles),
            );
        }
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
    let is_fs = |p: &str| {
        p.strip_prefix(&snapshots)
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.strip_suffix("/fs"))
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
    };
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
        let lower = child[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
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
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let before = stored(&mut c, &d).await;
    let start = TRIED.load(Ordering::Relaxed);

    let over = [
        ("k".repeat(4000), "v".repeat(97)),
        ("k".repeat(4097), String::new()),
        ("k".into(), "v".repeat(1 << 20)),
    ];
    for (k, v) in &over {
        let total = k.len() + v.len();
        let needles = ["label", "4096", &format!("{total} bytes")];
        let l = || HashMap::from([(k.clone(), v.clone())]);
        let w = |rpc: &str| format!("{rpc} with a {total}-byte label");
        refused(
            &w("Prepare"),
            c.prepare_with("fresh", "", l()).await,
            Code::InvalidArgument,
            &needles,
        );
        refused(
            &w("View"),
            c.view_with("fresh", "", l()).await,
            Code::InvalidArgument,
            &needles,
        );
        refused(
            &w("Commit"),
            c.commit_with("fresh", "act", l()).await,
            Code::InvalidArgument,
            &needles,
        );
        refused(
            &w("Update"),
            c.update(info("act", l()), &["labels"]).await,
            Code::InvalidArgument,
            &needles,
        );
    }
    // An empty label key.
    let empty = || labels(&[("", "v")]);
    refused(
        "Prepare with an empty label key",
        c.prepare_with("fresh", "", empty()).await,
        Code::InvalidArgument,
        &["label", "empty"],
    );
    refused(
        "View with an empty label key",
        c.view_with("fresh", "", empty()).await,
        Code::InvalidArgument,
        &["label", "empty"],
    );
    refused(
        "Commit with an empty label key",
        c.commit_with("fresh", "act", empty()).await,
        Code::InvalidArgument,
        &["label", "empty"],
    );
    refused(
        "Update with an empty label key",
        c.update(info("act", empty()), &["labels"]).await,
        Code::InvalidArgument,
        &["label", "empty"],
    );
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

// ---------------------------------------------------------------------------------------------
// Filters and field paths
// ---------------------------------------------------------------------------------------------

daemon_test!(filters_that_do_not_parse_are_invalid_arguments, |d| {
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let before = stored(&mut c, &d).await;
    let start = TRIED.load(Ordering::Relaxed);
    let mut bad: Vec<String> = [
        "name==",
        "name=",
        "name=~a",
        "name===a",
        "==a",
        "!=a",
        "name==a,",
        ",name",
        "name,,kind",
        "name==a b",
        "name==\"open",
        "labels.\"open",
        "name==/re/",
        "/name/==a",
        "|name|==a",
        "name~=\"(\"",
        "name~=/[/",
        "name~=|a{2,1}|",
        "name~=",
        "labels.",
        ".name",
        "name.",
        "name==\"\\q\"",
        "na\0me",
        "name==\"\\xff\"",
        "name==\"\\u12\"",
        "name==\"\\U0011ffff\"",
        "name!",
        "name ~ a",
        "name==a\nkind==view",
        "🙂",
        "name==\"a\"b",
        "name~=a{1000}{1000}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    bad.push(format!("name~={}", "(".repeat(300)));
    bad.push(format!("name=={}", "\"".repeat(300)));
    for f in &bad {
        refused(
            &format!("List {}", show(f)),
            c.list(&[f]).await,
            Code::InvalidArgument,
            &["filter", "does not parse"],
        );
        // A good filter beside a bad one does not make the list parse.
        refused(
            &format!("List kind==view + {}", show(f)),
            c.list(&["kind==view", f]).await,
            Code::InvalidArgument,
            &["does not parse"],
        );
    }
    // The filter language's own edge cases that do parse.
    for ok in [
        "",
        "name",
        "kind==view,kind!=view",
        "labels.\"\"",
        "name~=\"\"",
        "name==\"\\x00\"",
    ] {
        tried(1);
        c.list(&[ok])
            .await
            .unwrap_or_else(|e| panic!("List {ok:?}: {e:?}"));
    }
    tried(1);
    let many: Vec<String> = (0..64).map(|i| format!("name==n{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(c.list(&refs).await.unwrap(), Vec::<String>::new());
    assert_eq!(stored(&mut c, &d).await, before);
    report("filters", TRIED.load(Ordering::Relaxed) - start);
});

// What a List's filters may cost is bounded: how many strings, how long each, how many
// regular expressions and how big each compiles. Within the limits filters work as ever;
// beyond them the List is refused, and the message names the limit.
daemon_test!(
    filters_beyond_lamina_s_limits_are_refused_naming_the_limit,
    |d| {
        let mut c = big_client(&d).await;
        seed(&mut c).await;
        let before = stored(&mut c, &d).await;
        let start = TRIED.load(Ordering::Relaxed);
        let strs = |v: &[String]| v.iter().map(String::clone).collect::<Vec<_>>();

        // How many: 64 strings, each a selector of its own.
        let mut filters: Vec<String> = (1..64).map(|i| format!("name==n{i}")).collect();
        filters.push("name==base".into());
        let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
        tried(1);
        assert_eq!(c.list(&refs).await.unwrap(), ["base"]);
        filters.push("name==act".into());
        let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
        refused(
            "List of 65 filters",
            c.list(&refs).await,
            Code::InvalidArgument,
            &["65 filters", "at most 64"],
        );

        // How long: 16 KiB each, room for an equality on the longest label containerd allows.
        let long = |len: usize| {
            let f = format!("name==\"{}\"", "x".repeat(len - 8));
            assert_eq!(f.len(), len);
            f
        };
        tried(1);
        assert!(c
            .list(&["name==none", &long(16 << 10)])
            .await
            .unwrap()
            .is_empty());
        refused(
            "List of a 16385-byte filter",
            c.list(&["name==none", &long((16 << 10) + 1)]).await,
            Code::InvalidArgument,
            &["filter #2", "16385 bytes", "at most 16384"],
        );

        // How many regular expressions: 16 in all the strings together.
        let regexes = |n: usize| -> Vec<String> {
            let all: Vec<String> = (0..n).map(|i| format!("name~=^[a-z]{{{i}}}$")).collect();
            vec![all[..n / 2].join(","), all[n / 2..].join(",")]
        };
        let ok = strs(&regexes(16));
        let refs: Vec<&str> = ok.iter().map(String::as_str).collect();
        tried(1);
        c.list(&refs).await.unwrap();
        let bad = strs(&regexes(17));
        let refs: Vec<&str> = bad.iter().map(String::as_str).collect();
        refused(
            "List of 17 regular expressions",
            c.list(&refs).await,
            Code::InvalidArgument,
            &["regular expressions", "at most 16"],
        );

        // How big each compiles: 256 KiB. Unicode classes repeated grow fast (`.{500}` is about
        // 500 KB compiled, well within the regex crate's own 10 MiB default).
        for ok in [
            "name~=^sha256:[a-f0-9]{64}$",
            "name~=\\w+",
            "name~=/.{100}/",
        ] {
            tried(1);
            c.list(&[ok])
                .await
                .unwrap_or_else(|e| panic!("List {ok:?}: {e:?}"));
        }
        for big in ["name~=/.{500}/", "labels.l~=\\w{64}", "name~=[\\p{L}]{20}"] {
            refused(
                &format!("List {big:?}"),
                c.list(&[big]).await,
                Code::InvalidArgument,
                &["does not parse", "regular expression", "262144 bytes"],
            );
        }

        assert_eq!(stored(&mut c, &d).await, before);
        report("filter limits", TRIED.load(Ordering::Relaxed) - start);
    }
);

// A refusal names what was wrong, but does not echo a huge input whole: a status message
// travels in an HTTP/2 header, and a multi-megabyte one costs the client dearly (tonic's
// client takes tens of seconds to receive a 2 MiB one) and helps no person reading it.
daemon_test!(refusals_do_not_echo_huge_input_whole, |d| {
    const LIMIT: usize = 8 << 10;
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let before = stored(&mut c, &d).await;
    let big = 64 << 10;
    // Filters as long as lamina takes them (16 KiB; longer ones are refused for their length
    // alone), so that they reach the parser.
    let near = (16 << 10) - 16;
    let filters = [
        format!("name~={}", "(".repeat(near)),
        format!("name=={}", "\"".repeat(near)),
        format!("name==a {}", "b".repeat(near)),
        format!("{}==a", "\u{1}".repeat(near)),
    ];
    let mut seen = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let what = format!("List of {}-byte bad filter #{i}", f.len());
        let res = c.list(&[f]).await;
        refused(
            &what,
            res.clone(),
            Code::InvalidArgument,
            &["filter", "does not parse"],
        );
        seen.push((what, res.unwrap_err().message().len()));
    }
    let path = format!("labels{}", "x".repeat(big));
    let res = c.update(info("act", labels(&[("a", "1")])), &[&path]).await;
    refused(
        "Update of a 64 KiB field path",
        res.clone(),
        Code::InvalidArgument,
        &["labels"],
    );
    seen.push((
        "Update of a 64 KiB path".into(),
        res.unwrap_err().message().len(),
    ));
    for (what, key) in [
        ("a 1 MiB key", "k".repeat(1 << 20)),
        ("a 4097-byte key", "k".repeat(4097)),
    ] {
        let res = c.stat(&key).await;
        refused(
            &format!("Stat of {what}"),
            res.clone(),
            Code::InvalidArgument,
            &["at most 4096"],
        );
        seen.push((format!("Stat of {what}"), res.unwrap_err().message().len()));
    }
    let res = c
        .prepare_with("fresh", "", labels(&[("k", &"v".repeat(1 << 20))]))
        .await;
    refused(
        "Prepare with a 1 MiB label",
        res.clone(),
        Code::InvalidArgument,
        &["4096"],
    );
    seen.push((
        "Prepare with a 1 MiB label".into(),
        res.unwrap_err().message().len(),
    ));
    assert_eq!(stored(&mut c, &d).await, before);
    let long: Vec<_> = seen.iter().filter(|(_, len)| *len > LIMIT).collect();
    assert!(
        long.is_empty(),
        "refusals whose message echoes the input whole (bytes; limit {LIMIT}): {long:?}"
    );
    report("huge input echoed", seen.len());
});

daemon_test!(update_refuses_fields_it_cannot_change, |d| {
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let before = stored(&mut c, &d).await;
    let start = TRIED.load(Ordering::Relaxed);
    let new = || labels(&[("containerd.io/snapshot/l", "changed"), ("n", "new")]);
    for paths in [
        vec!["parent"],
        vec!["name"],
        vec!["kind"],
        vec!["created_at"],
        vec!["updated_at"],
        vec!["Labels"],
        vec!["labelsx"],
        vec!["labels/n"],
        vec![""],
        vec![" labels"],
        vec!["labels", "parent"],
        vec!["labels.n", "name"],
        vec!["labels.n", "labels.containerd.io/snapshot/l", "kind"],
    ] {
        let bad = paths
            .iter()
            .find(|p| **p != "labels" && !p.starts_with("labels."))
            .unwrap();
        for key in ["base", "act", "vw"] {
            refused(
                &format!("Update {key} {paths:?}"),
                c.update(info(key, new()), &paths).await,
                Code::InvalidArgument,
                &[&format!("{bad:?}"), "labels", key],
            );
        }
    }
    refused(
        "Update without info",
        c.update_with(None, None).await,
        Code::InvalidArgument,
        &["info"],
    );
    refused(
        "Update without info, with paths",
        c.update_with(None, Some(vec!["labels".into()])).await,
        Code::InvalidArgument,
        &["info"],
    );
    refused(
        "Update of an unknown key with a bad path",
        c.update(info("nope", new()), &["parent"]).await,
        Code::NotFound,
        &["nope", "does not exist"],
    );
    assert_eq!(
        stored(&mut c, &d).await,
        before,
        "a refused Update changed labels"
    );
    report("update paths", TRIED.load(Ordering::Relaxed) - start);
});

// ---------------------------------------------------------------------------------------------
// Wrong kinds and missing keys
// ---------------------------------------------------------------------------------------------

daemon_test!(wrong_kinds_and_missing_keys_get_their_codes, |d| {
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let before = stored(&mut c, &d).await;
    let start = TRIED.load(Ordering::Relaxed);
    use Code::*;

    for parent in ["act", "vw", "solo"] {
        refused(
            &format!("Prepare on {parent}"),
            c.prepare("fresh", parent).await,
            InvalidArgument,
            &[parent, "committed"],
        );
        refused(
            &format!("View on {parent}"),
            c.view("fresh", parent).await,
            InvalidArgument,
            &[parent, "committed"],
        );
    }
    refused(
        "Prepare on a missing parent",
        c.prepare("fresh", "gone").await,
        NotFound,
        &["gone", "does not exist"],
    );
    refused(
        "View on a missing parent",
        c.view("fresh", "gone").await,
        NotFound,
        &["gone", "does not exist"],
    );
    for key in ["base", "act", "vw", "solo"] {
        refused(
            &format!("Prepare {key} again"),
            c.prepare(key, "").await,
            AlreadyExists,
            &[key, "already exists"],
        );
        refused(
            &format!("View {key} again"),
            c.view(key, "base").await,
            AlreadyExists,
            &[key, "already exists"],
        );
    }
    refused(
        "Commit of a view",
        c.commit("fresh", "vw").await,
        FailedPrecondition,
        &["vw", "view"],
    );
    refused(
        "Commit of a committed snapshot",
        c.commit("fresh", "base").await,
        FailedPrecondition,
        &["base", "committed"],
    );
    refused(
        "Commit onto an existing name",
        c.commit("solo", "act").await,
        AlreadyExists,
        &["solo", "already exists"],
    );
    refused(
        "Commit onto its own key",
        c.commit("act", "act").await,
        AlreadyExists,
        &["act"],
    );
    refused(
        "Commit of a missing key",
        c.commit("fresh", "gone").await,
        NotFound,
        &["gone", "does not exist"],
    );
    refused(
        "Commit of a missing key onto a taken name",
        c.commit("base", "gone").await,
        NotFound,
        &["gone"],
    );
    refused(
        "Mounts of a committed snapshot",
        c.mounts("base").await,
        FailedPrecondition,
        &["base", "committed"],
    );
    refused(
        "Remove of a parent",
        c.remove("base").await,
        FailedPrecondition,
        &["base", "child"],
    );
    for (rpc, res) in [
        ("Mounts", c.mounts("gone").await.map(|_| ())),
        ("Remove", c.remove("gone").await),
        ("Stat", c.stat("gone").await.map(|_| ())),
        ("Usage", c.usage("gone").await.map(|_| ())),
        (
            "Update",
            c.update(info("gone", labels(&[("a", "1")])), &[])
                .await
                .map(|_| ()),
        ),
    ] {
        refused(
            &format!("{rpc} of a missing key"),
            res,
            NotFound,
            &["gone", "does not exist"],
        );
    }
    assert_eq!(stored(&mut c, &d).await, before);
    check_tree(&d);
    report(
        "kinds and missing keys",
        TRIED.load(Ordering::Relaxed) - start,
    );
});

// ---------------------------------------------------------------------------------------------
// Fuzzing
// ---------------------------------------------------------------------------------------------

/// Pieces of the filter language and things around it.
const FILTER_PIECES: &[&str] = &[
    "name", "parent", "kind", "labels", "a", "b", "1", "view", ".", ".", ",", "==", "!=", "~=",
    "=", "!", "~", "\"", "\"", "/", "|", "\\", "\\x", "\\u00", "\\n", "\\q", " ", "\t", "\n", "\0",
    "(", ")", "[", "]", "*", "+", "?", "{", "}", "^", "$", "é", "🙂", "\u{7f}", "_", "-",
];

/// Filters that parse, for mutation.
const GOOD_FILTERS: &[&str] = &[
    "name==base",
    "kind==view",
    "kind!=active,parent",
    "labels.\"containerd.io/snapshot/l\"==1",
    "labels.l~=^2",
    "name~=/^ba/",
    "name~=|s|,parent!=\"\"",
    "parent==base,labels.l",
    "name==\"a\\x41\\u00e9\"",
    "labels.a.b!=x",
];

/// Half of the time a valid filter with a few random edits, else random pieces.
fn random_filter(rng: &mut Rng) -> String {
    if rng.chance(50) {
        let mut f: Vec<char> = rng.pick(GOOD_FILTERS).chars().collect();
        for _ in 0..rng.below(3) {
            let piece: Vec<char> = rng.pick(FILTER_PIECES).chars().collect();
            let at = rng.below(f.len() + 1);
            match rng.below(3) {
                0 => {
                    f.splice(at..at, piece);
                }
                1 if at < f.len() => {
                    f.remove(at);
                }
                _ if at < f.len() => {
                    f.splice(at..at + 1, piece);
                }
                _ => {}
            }
        }
        return f.into_iter().collect();
    }
    (0..1 + rng.below(12))
        .map(|_| {
            if rng.chance(10) {
                char::from_u32(rng.below(0x3000) as u32)
                    .unwrap_or('x')
                    .to_string()
            } else {
                rng.pick(FILTER_PIECES).to_string()
            }
        })
        .collect()
}

daemon_test!(random_filters_parse_or_are_invalid_arguments, |d| {
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let before = stored(&mut c, &d).await;
    let n = env_or("LAMINA_FUZZ_FILTERS", 3000);
    let mut rng = Rng::new(env_or("LAMINA_FUZZ_SEED", 0xf1_17e5));
    let (mut ok, mut invalid) = (0, 0);
    for _ in 0..n {
        let filters: Vec<String> = (0..1 + rng.below(3))
            .map(|_| random_filter(&mut rng))
            .collect();
        let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
        tried(1);
        match c.list(&refs).await {
            Ok(names) => {
                ok += 1;
                assert!(names.len() <= 4, "{filters:?} listed {names:?}");
            }
            Err(s)
                if s.code() == Code::InvalidArgument && s.message().contains("does not parse") =>
            {
                invalid += 1
            }
            Err(s) => panic!("List {filters:?}: {:?} {}", s.code(), show(s.message())),
        }
    }
    assert_eq!(stored(&mut c, &d).await, before);
    eprintln!("hostile: random filters: {n} tried, {ok} parsed, {invalid} InvalidArgument");
    report("random filters", n as usize);
});

/// A random string: often one of the keys in play, else odd characters, sometimes huge.
fn random_string(rng: &mut Rng, pool: &[&str]) -> String {
    match rng.below(100) {
        0..=49 => rng.pick(pool).to_string(),
        50..=54 => String::new(),
        55..=57 => "k".repeat(4096 + rng.below(2)),
        _ => (0..rng.below(12))
            .map(|_| {
                *rng.pick(&[
                    'a', 'b', '/', '.', '\0', '\n', ' ', '"', ',', '=', 'é', '🙂', '\u{1}',
                ])
            })
            .collect(),
    }
}

fn random_labels(rng: &mut Rng, pool: &[&str]) -> HashMap<String, String> {
    (0..rng.below(4))
        .map(|_| {
            let k = if rng.chance(80) {
                format!("containerd.io/snapshot/{}", rng.below(3))
            } else {
                random_string(rng, &["l", ""])
            };
            let v = match rng.below(10) {
                0 => "v".repeat(4097),
                1 => String::new(),
                _ => random_string(rng, pool),
            };
            (k, v)
        })
        .collect()
}

daemon_test!(random_requests_get_only_documented_codes, |mut d| {
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let n = env_or("LAMINA_FUZZ_REQUESTS", 2000);
    let mut rng = Rng::new(env_or("LAMINA_FUZZ_SEED", 0xf1_17e5) ^ 0x5eed);
    let pool = [
        "base", "act", "vw", "solo", "a", "b", "c", "a/..", "\0", "x\ny",
    ];
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        let s = |rng: &mut Rng| random_string(rng, &pool);
        let rpc = rng.below(10);
        let res: Res<()> = match rpc {
            0 => {
                let (k, p, l) = (s(&mut rng), s(&mut rng), random_labels(&mut rng, &pool));
                c.prepare_with(&k, &p, l).await.map(|_| ())
            }
            1 => {
                let (k, p, l) = (s(&mut rng), s(&mut rng), random_labels(&mut rng, &pool));
                c.view_with(&k, &p, l).await.map(|_| ())
            }
            2 => c.mounts(&s(&mut rng)).await.map(|_| ()),
            3 => {
                let (n, k, l) = (s(&mut rng), s(&mut rng), random_labels(&mut rng, &pool));
                c.commit_with(&n, &k, l).await
            }
            4 => c.remove(&s(&mut rng)).await,
            5 => c.stat(&s(&mut rng)).await.map(|_| ()),
            6 => {
                let inf = rng
                    .chance(95)
                    .then(|| info(&s(&mut rng), random_labels(&mut rng, &pool)));
                let paths = rng.chance(80).then(|| {
                    (0..rng.below(3))
                        .map(|_| match rng.below(4) {
                            0 => "labels".to_string(),
                            1 => format!("labels.containerd.io/snapshot/{}", rng.below(3)),
                            2 => format!("labels.{}", s(&mut rng)),
                            _ => s(&mut rng),
                        })
                        .collect()
                });
                c.update_with(inf, paths).await.map(|_| ())
            }
            7 => c.usage(&s(&mut rng)).await.map(|_| ()),
            8 => {
                let f: Vec<String> = (0..rng.below(3)).map(|_| random_filter(&mut rng)).collect();
                let refs: Vec<&str> = f.iter().map(String::as_str).collect();
                c.list(&refs).await.map(|_| ())
            }
            _ => c.cleanup().await,
        };
        tried(1);
        let code = match &res {
            Ok(()) => Code::Ok,
            Err(st) => st.code(),
        };
        *codes
            .entry(format!(
                "{}:{code:?}",
                [
                    "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "Usage",
                    "List", "Cleanup"
                ][rpc]
            ))
            .or_default() += 1;
        match res {
            Ok(()) => {}
            Err(st)
                if matches!(
                    st.code(),
                    Code::NotFound
                        | Code::AlreadyExists
                        | Code::FailedPrecondition
                        | Code::InvalidArgument
                ) =>
            {
                assert!(
                    !st.message().is_empty(),
                    "request {i}: {:?} without a message",
                    st.code()
                );
            }
            Err(st) => panic!(
                "request {i} (rpc {rpc}): undocumented {:?}: {}",
                st.code(),
                show(st.message())
            ),
        }
    }
    // Still serving; the store is consistent: one directory per snapshot after Cleanup, all
    // of them lamina's, and the same after a restart.
    c.cleanup().await.unwrap();
    let after = stored(&mut c, &d).await;
    assert_eq!(
        after.0.len(),
        after.2.len(),
        "snapshots vs directories: {after:?}"
    );
    check_tree(&d);
    drop(c);
    d.restart().await;
    let mut c = big_client(&d).await;
    assert_eq!(
        stored(&mut c, &d).await,
        after,
        "the fuzzed store did not survive a restart"
    );
    eprintln!("hostile: random requests: {n} tried, outcomes {codes:?}");
    report("random requests", n as usize);
});

// ---------------------------------------------------------------------------------------------
// Bytes that are not a valid request at all
// ---------------------------------------------------------------------------------------------

/// Sends and receives raw message bodies, so requests can be anything.
#[derive(Default, Clone)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// One protobuf length-delimited field.
fn field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for mut v in [((tag << 3) | 2) as u64, bytes.len() as u64] {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    out.extend_from_slice(bytes);
    out
}

async fn raw_call(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    grpc.ready().await.expect("connection ready");
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!(
        "/containerd.services.snapshots.v1.Snapshots/{method}"
    ))
    .unwrap();
    if method == "List" {
        let mut stream = grpc
            .server_streaming(tonic::Request::new(body), path, RawCodec)
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.extend(m);
        }
        return Ok(out);
    }
    Ok(grpc
        .unary(tonic::Request::new(body), path, RawCodec)
        .await?
        .into_inner())
}

daemon_test!(malformed_requests_are_refused_and_change_nothing, |d| {
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let before = stored(&mut c, &d).await;
    // The raw requests go over a connection of their own.
    let mut grpc = tonic::client::Grpc::new(channel(&d.socket).await.unwrap());
    let methods = [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "Usage", "List",
        "Cleanup",
    ];
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = 0;

    // Keys, names, parents and label values that are not UTF-8 (protobuf strings must be).
    let bad_utf8: &[u8] = b"k\xff\xfe/..";
    let mut bodies: Vec<(&str, Vec<u8>)> = vec![
        ("Prepare", field(2, bad_utf8)),
        ("Prepare", [field(2, b"fresh"), field(3, bad_utf8)].concat()),
        (
            "Prepare",
            [
                field(2, b"fresh"),
                field(4, &[field(1, b"l"), field(2, bad_utf8)].concat()),
            ]
            .concat(),
        ),
        ("View", field(2, bad_utf8)),
        ("Mounts", field(2, bad_utf8)),
        ("Commit", [field(2, bad_utf8), field(3, b"act")].concat()),
        ("Remove", field(2, bad_utf8)),
        ("Stat", field(2, b"base\xc0")),
        ("Update", field(2, &field(1, bad_utf8))),
        ("Usage", field(2, bad_utf8)),
        ("List", field(2, bad_utf8)),
    ];
    // Random bytes at every method.
    let mut rng = Rng::new(0xbad_b0d1e5);
    for i in 0..300 {
        let len = rng.below(64);
        let body: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        bodies.push((methods[i % methods.len()], body));
    }
    for (method, body) in bodies {
        count += 1;
        tried(1);
        match raw_call(&mut grpc, method, body.clone()).await {
            Ok(_) => *seen.entry(format!("{method}:Ok")).or_default() += 1,
            Err(s) => {
                // Undecodable bytes are refused by the gRPC layer before lamina sees them:
                // tonic (like Go's gRPC) answers Internal "failed to decode Protobuf message".
                assert!(
                    matches!(
                        s.code(),
                        Code::InvalidArgument
                            | Code::Internal
                            | Code::NotFound
                            | Code::AlreadyExists
                            | Code::FailedPrecondition
                    ),
                    "{method} {body:?}: {:?} {}",
                    s.code(),
                    show(s.message())
                );
                assert!(!s.message().is_empty());
                *seen.entry(format!("{method}:{:?}", s.code())).or_default() += 1;
            }
        }
    }
    // Random bytes that happen to decode are valid requests with odd fields; whatever they
    // did, it went through lamina's rules. Only the seeded store must be untouched apart
    // from what such requests could legally do; the seeded snapshots are all still there.
    let after = stored(&mut c, &d).await;
    for (name, ..) in &before.0 {
        assert!(
            after.0.iter().any(|(n, ..)| n == name),
            "{name} disappeared: {after:?}"
        );
    }
    check_tree(&d);
    eprintln!("hostile: malformed requests: {count} tried, outcomes {seen:?}");
    report("malformed requests", count);
});
