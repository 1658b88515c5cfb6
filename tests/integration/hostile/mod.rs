//! Hostile input: every RPC with keys, names, labels, filters and field paths that are empty,
//! huge, malformed or odd. Each must get its documented gRPC code with a message a person can act
//! on, none may crash the daemon, and none may change what is stored. Keys that merely look
//! dangerous (`/`, `..`, NUL, newlines) are valid keys: they must work and never become paths.
//!
//! `names`: keys, names and labels; `fields`: filters, field paths, wrong kinds and missing
//! keys; `fuzz`: seeded fuzzing, with random filter strings through List, random requests with
//! random field values at every RPC, and raw bytes that are not a valid request at all.

mod fields;
mod fuzz;
mod names;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
};

use tonic::{Code, Status};

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
/// (case-insensitively); returns it.
#[track_caller]
fn refused<T: std::fmt::Debug>(what: &str, res: Res<T>, code: Code, needles: &[&str]) -> Status {
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
    status
}

// ---------------------------------------------------------------------------------------------
// Requests as data, for tables of refusals
// ---------------------------------------------------------------------------------------------

/// One request to lamina.
#[derive(Clone)]
enum Call {
    Prepare(String, String, HashMap<String, String>),
    View(String, String, HashMap<String, String>),
    Mounts(String),
    /// Name, key, labels.
    Commit(String, String, HashMap<String, String>),
    Remove(String),
    Stat(String),
    Usage(String),
    Update(Option<Info>, Option<Vec<String>>),
    List(Vec<String>),
    Cleanup,
}

impl Call {
    fn prepare(key: &str, parent: &str) -> Call {
        Call::Prepare(key.into(), parent.into(), HashMap::new())
    }

    fn view(key: &str, parent: &str) -> Call {
        Call::View(key.into(), parent.into(), HashMap::new())
    }

    fn commit(name: &str, key: &str) -> Call {
        Call::Commit(name.into(), key.into(), HashMap::new())
    }

    /// An Update of snapshot `name` with `labels` and field paths `paths`.
    fn update(name: &str, labels: HashMap<String, String>, paths: &[&str]) -> Call {
        let paths = paths.iter().map(|p| p.to_string()).collect();
        Call::Update(Some(info(name, labels)), Some(paths))
    }

    fn list(filters: &[&str]) -> Call {
        Call::List(filters.iter().map(|f| f.to_string()).collect())
    }

    /// This Prepare, View or Commit with `labels`.
    fn labelled(self, labels: HashMap<String, String>) -> Call {
        match self {
            Call::Prepare(k, p, _) => Call::Prepare(k, p, labels),
            Call::View(k, p, _) => Call::View(k, p, labels),
            Call::Commit(n, k, _) => Call::Commit(n, k, labels),
            _ => unreachable!("only Prepare, View and Commit carry labels"),
        }
    }

    fn rpc(&self) -> &'static str {
        match self {
            Call::Prepare(..) => "Prepare",
            Call::View(..) => "View",
            Call::Mounts(_) => "Mounts",
            Call::Commit(..) => "Commit",
            Call::Remove(_) => "Remove",
            Call::Stat(_) => "Stat",
            Call::Usage(_) => "Usage",
            Call::Update(..) => "Update",
            Call::List(_) => "List",
            Call::Cleanup => "Cleanup",
        }
    }

    /// Sends it; an answer is rendered for a failure message, if one is needed.
    async fn send(&self, c: &mut Client) -> Res<String> {
        let shown = |v: &dyn std::fmt::Debug| format!("{v:?}");
        Ok(match self {
            Call::Prepare(k, p, l) => shown(&c.prepare_with(k, p, l.clone()).await?),
            Call::View(k, p, l) => shown(&c.view_with(k, p, l.clone()).await?),
            Call::Mounts(k) => shown(&c.mounts(k).await?),
            Call::Commit(n, k, l) => shown(&c.commit_with(n, k, l.clone()).await?),
            Call::Remove(k) => shown(&c.remove(k).await?),
            Call::Stat(k) => shown(&c.stat(k).await?),
            Call::Usage(k) => shown(&c.usage(k).await?),
            Call::Update(i, p) => shown(&c.update_with(i.clone(), p.clone()).await?),
            Call::List(f) => {
                let f: Vec<&str> = f.iter().map(String::as_str).collect();
                shown(&c.list(&f).await?)
            }
            Call::Cleanup => shown(&c.cleanup().await?),
        })
    }
}

/// A request that must be refused with `code`, its message naming every one of `needles`.
struct Refusal {
    what: String,
    call: Call,
    code: Code,
    needles: Vec<String>,
}

fn refusal(what: impl Into<String>, call: Call, code: Code, needles: &[&str]) -> Refusal {
    Refusal {
        what: what.into(),
        call,
        code,
        needles: needles.iter().map(|n| n.to_string()).collect(),
    }
}

/// Sends each request of `table` and asserts its [`refused`]; returns the refusals' statuses.
async fn refuse_all(c: &mut Client, table: &[Refusal]) -> Vec<Status> {
    let mut out = Vec::new();
    for r in table {
        let needles: Vec<&str> = r.needles.iter().map(String::as_str).collect();
        out.push(refused(&r.what, r.call.send(c).await, r.code, &needles));
    }
    out
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
/// with decimal IDs holding only `fs` and `work`, the spare trees, the socket. A key that
/// became a path, here or above the root, shows up as something else.
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

/// A [`big_client`] on `d`, the store [`seed`]ed through it, and what is stored then.
async fn seeded(d: &TestDaemon) -> (Client, Stored) {
    let mut c = big_client(d).await;
    seed(&mut c).await;
    let before = stored(&mut c, d).await;
    (c, before)
}
