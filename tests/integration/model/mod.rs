//! Model-based test: random sequences of all ten RPCs run against the real daemon and against a
//! small in-memory model of REFERENCE.md §4–§8 (kinds, parents, labels, error codes, mount
//! shapes, filters), compared after every step. The daemon is restarted now and then in the
//! middle of a sequence, and must still agree with the model afterwards (persistence).
//!
//! Deterministic: a fixed seed and a fixed budget in CI. `LAMINA_MODEL_CASES` (sequences),
//! `LAMINA_MODEL_STEPS` (steps per sequence) and `LAMINA_MODEL_SEED` (base seed) change them; a
//! failure prints the seed of its sequence and every step up to the one that disagreed.

use std::collections::{BTreeMap, HashMap};

use tonic::Code;

use crate::util::*;

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// Keys and names: few, so that collisions and parent relations happen often; odd ones on
/// purpose (keys are arbitrary strings to containerd).
const KEYS: &[&str] = &["a", "b", "c", "d/e", "..", "x\ny", "n\0l"];
const LABEL_KEYS: &[&str] = &["a", "b", "a.b", "containerd.io/snapshot.ref"];
const LABEL_VALUES: &[&str] = &["", "1", "2"];

fn kind_name(kind: i32) -> &'static str {
    match kind {
        VIEW => "view",
        ACTIVE => "active",
        COMMITTED => "committed",
        _ => "?",
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Snap {
    kind: i32,
    parent: String,
    labels: BTreeMap<String, String>,
    /// Its own `fs` directory, when the mounts revealed it (active snapshots, and committed
    /// ones through the active snapshot they were).
    fs: Option<String>,
}

#[derive(Debug, Clone)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, Clone)]
enum FOp {
    Present,
    Eq(String),
    Ne(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
struct Sel {
    field: Field,
    op: FOp,
    /// Render the label key unquoted (`labels.a.b`) rather than quoted.
    bare: bool,
}

/// A value the scanner reads unquoted: it must not start with a separator, operator or quote.
fn is_bare_value(v: &str) -> bool {
    v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
}

impl Sel {
    fn render(&self) -> String {
        let field = match &self.field {
            Field::Name => "name".to_string(),
            Field::Parent => "parent".to_string(),
            Field::Kind => "kind".to_string(),
            Field::Label(k) if self.bare => format!("labels.{k}"),
            Field::Label(k) => format!("labels.{}", go_quote(k)),
        };
        let value = |v: &str| {
            if self.bare && is_bare_value(v) {
                v.to_string()
            } else {
                go_quote(v)
            }
        };
        match &self.op {
            FOp::Present => field,
            FOp::Eq(v) => format!("{field}=={}", value(v)),
            FOp::Ne(v) => format!("{field}!={}", value(v)),
            FOp::Prefix(p) => format!("{field}~={}", go_quote(&format!("^{}", regex::escape(p)))),
        }
    }

    fn matches(&self, name: &str, s: &Snap) -> bool {
        let value = match &self.field {
            Field::Name => Some(name.to_string()),
            Field::Parent => Some(s.parent.clone()),
            Field::Kind => Some(kind_name(s.kind).to_string()),
            Field::Label(k) => s.labels.get(k).cloned(),
        };
        match &self.op {
            FOp::Present => value.is_some(),
            FOp::Eq(v) => value.as_deref() == Some(v.as_str()),
            FOp::Ne(v) => value.as_deref().unwrap_or("") != v,
            FOp::Prefix(p) => value.as_deref().unwrap_or("").starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Prepare {
        key: String,
        parent: String,
        labels: Vec<(String, String)>,
    },
    View {
        key: String,
        parent: String,
        labels: Vec<(String, String)>,
    },
    Mounts {
        key: String,
    },
    Commit {
        name: String,
        key: String,
        labels: Vec<(String, String)>,
    },
    Remove {
        key: String,
    },
    Stat {
        key: String,
    },
    Update {
        key: String,
        labels: Vec<(String, String)>,
        /// None: no field mask at all.
        paths: Option<Vec<String>>,
    },
    Usage {
        key: String,
    },
    /// Each inner Vec is one filter string (selectors joined by commas); `bad` is a filter
    /// string that does not parse, added to the list.
    List {
        filters: Vec<Vec<Sel>>,
        bad: Option<String>,
    },
    Cleanup,
    Restart,
}

/// What the model says a step answers.
#[derive(Debug)]
enum Expect {
    /// Mounts of a snapshot of `kind` whose ancestors' `fs` directories are `lowers`.
    Mounts {
        kind: i32,
        lowers: Vec<Option<String>>,
    },
    Info(String, Snap),
    Usage(i32),
    List(Vec<(String, Snap)>),
    Unit,
}

#[derive(Default)]
struct Model {
    snaps: BTreeMap<String, Snap>,
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 4096
}

/// Labels as lamina keeps them: a label with an empty value is not stored. None: a label key
/// is empty (InvalidArgument).
fn kept(labels: &[(String, String)]) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (k, v) in labels {
        if k.is_empty() {
            return None;
        }
        if v.is_empty() {
            out.remove(k);
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    Some(out)
}

impl Model {
    fn committed(&self) -> Vec<String> {
        self.of_kind(COMMITTED)
    }

    fn of_kind(&self, kind: i32) -> Vec<String> {
        self.snaps
            .iter()
            .filter(|(_, s)| s.kind == kind)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The `fs` of every ancestor of a snapshot whose parent is `parent`, nearest first.
    fn chain<'a>(&'a self, mut parent: &'a str) -> Vec<Option<String>> {
        let mut out = Vec::new();
        while !parent.is_empty() {
            let p = &self.snaps[parent];
            out.push(p.fs.clone());
            parent = &p.parent;
        }
        out
    }

    fn create(
        &mut self,
        key: &str,
        parent: &str,
        labels: &[(String, String)],
        kind: i32,
    ) -> Result<Expect, Code> {
        if !valid_key(key) || (!parent.is_empty() && !valid_key(parent)) {
            return Err(Code::InvalidArgument);
        }
        let labels = kept(labels).ok_or(Code::InvalidArgument)?;
        if self.snaps.contains_key(key) {
            return Err(Code::AlreadyExists);
        }
        if !parent.is_empty() {
            match self.snaps.get(parent) {
                None => return Err(Code::NotFound),
                Some(p) if p.kind != COMMITTED => return Err(Code::InvalidArgument),
                Some(_) => {}
            }
        }
        let snap = Snap {
            kind,
            parent: parent.to_string(),
            labels,
            fs: None,
        };
        self.snaps.insert(key.to_string(), snap);
        let lowers = self.chain(parent);
        Ok(Expect::Mounts { kind, lowers })
    }

    fn apply(&mut self, op: &Op) -> Result<Expect, Code> {
        match op {
            Op::Prepare {
                key,
                parent,
                labels,
            } => self.create(key, parent, labels, ACTIVE),
            Op::View {
                key,
                parent,
                labels,
            } => self.create(key, parent, labels, VIEW),
            Op::Mounts { key } => {
                if !valid_key(key) {
                    return Err(Code::InvalidArgument);
                }
                let s = self.snaps.get(key).ok_or(Code::NotFound)?;
                if s.kind == COMMITTED {
                    return Err(Code::FailedPrecondition);
                }
                let lowers = self.chain(&s.parent);
                Ok(Expect::Mounts {
                    kind: s.kind,
                    lowers,
                })
            }
            Op::Commit { name, key, labels } => {
                if !valid_key(key) || !valid_key(name) {
                    return Err(Code::InvalidArgument);
                }
                let labels = kept(labels).ok_or(Code::InvalidArgument)?;
                let s = self.snaps.get(key).ok_or(Code::NotFound)?;
                if self.snaps.contains_key(name) {
                    return Err(Code::AlreadyExists);
                }
                if s.kind != ACTIVE {
                    return Err(Code::FailedPrecondition);
                }
                let mut s = self.snaps.remove(key).unwrap();
                s.kind = COMMITTED;
                s.labels = labels;
                self.snaps.insert(name.clone(), s);
                Ok(Expect::Unit)
            }
            Op::Remove { key } => {
                if !valid_key(key) {
                    return Err(Code::InvalidArgument);
                }
                if !self.snaps.contains_key(key) {
                    return Err(Code::NotFound);
                }
                if self.snaps.values().any(|s| s.parent == *key) {
                    return Err(Code::FailedPrecondition);
                }
                self.snaps.remove(key);
                Ok(Expect::Unit)
            }
            Op::Stat { key } => {
                if !valid_key(key) {
                    return Err(Code::InvalidArgument);
                }
                let s = self.snaps.get(key).ok_or(Code::NotFound)?;
                Ok(Expect::Info(key.clone(), s.clone()))
            }
            Op::Update { key, labels, paths } => {
                if !valid_key(key) {
                    return Err(Code::InvalidArgument);
                }
                let given = kept(labels).ok_or(Code::InvalidArgument)?;
                let s = self.snaps.get(key).ok_or(Code::NotFound)?;
                let mut new = s.labels.clone();
                let all = vec!["labels".to_string()];
                let paths = match paths {
                    Some(p) if !p.is_empty() => p,
                    _ => &all,
                };
                for path in paths {
                    if path == "labels" {
                        new = given.clone();
                    } else if let Some(k) = path.strip_prefix("labels.") {
                        match given.get(k) {
                            Some(v) => new.insert(k.to_string(), v.clone()),
                            None => new.remove(k),
                        };
                    } else {
                        return Err(Code::InvalidArgument);
                    }
                }
                let s = self.snaps.get_mut(key).unwrap();
                s.labels = new;
                Ok(Expect::Info(key.clone(), s.clone()))
            }
            Op::Usage { key } => {
                if !valid_key(key) {
                    return Err(Code::InvalidArgument);
                }
                let s = self.snaps.get(key).ok_or(Code::NotFound)?;
                Ok(Expect::Usage(s.kind))
            }
            Op::List { filters, bad } => {
                if bad.is_some() {
                    return Err(Code::InvalidArgument);
                }
                let out = self
                    .snaps
                    .iter()
                    .filter(|(name, s)| {
                        filters.is_empty()
                            || filters
                                .iter()
                                .any(|all| all.iter().all(|sel| sel.matches(name, s)))
                    })
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .collect();
                Ok(Expect::List(out))
            }
            Op::Cleanup | Op::Restart => Ok(Expect::Unit),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generating steps
// ---------------------------------------------------------------------------------------------

fn any_key(rng: &mut Rng) -> String {
    if rng.chance(2) {
        return String::new();
    }
    rng.pick(KEYS).to_string()
}

/// An existing key of one of `kinds` most of the time, else any key.
fn biased_key(rng: &mut Rng, m: &Model, kinds: &[i32], percent: u32) -> String {
    let existing: Vec<String> = m
        .snaps
        .iter()
        .filter(|(_, s)| kinds.contains(&s.kind))
        .map(|(k, _)| k.clone())
        .collect();
    if !existing.is_empty() && rng.chance(percent) {
        rng.pick(&existing).clone()
    } else {
        any_key(rng)
    }
}

fn gen_parent(rng: &mut Rng, m: &Model) -> String {
    match rng.below(100) {
        0..=34 => String::new(),
        35..=79 => {
            let committed = m.committed();
            if committed.is_empty() {
                rng.pick(KEYS).to_string()
            } else {
                rng.pick(&committed).clone()
            }
        }
        _ => rng.pick(KEYS).to_string(),
    }
}

fn gen_labels(rng: &mut Rng) -> Vec<(String, String)> {
    let n = rng.below(3);
    let mut out: Vec<(String, String)> = (0..n)
        .map(|_| {
            (
                rng.pick(LABEL_KEYS).to_string(),
                rng.pick(LABEL_VALUES).to_string(),
            )
        })
        .collect();
    // A map cannot hold one key twice: keep the last.
    let mut seen = std::collections::HashSet::new();
    out.reverse();
    out.retain(|(k, _)| seen.insert(k.clone()));
    out.reverse();
    if rng.chance(2) {
        out.push((String::new(), "x".into()));
    }
    out
}

fn gen_sel(rng: &mut Rng, m: &Model) -> Sel {
    let field = match rng.below(4) {
        0 => Field::Name,
        1 => Field::Parent,
        2 => Field::Kind,
        _ => Field::Label(rng.pick(LABEL_KEYS).to_string()),
    };
    let value = |rng: &mut Rng| -> String {
        match &field {
            Field::Kind => rng.pick(&["active", "view", "committed", "x"]).to_string(),
            Field::Label(_) => rng.pick(LABEL_VALUES).to_string(),
            Field::Name | Field::Parent => {
                if rng.chance(20) {
                    String::new()
                } else if !m.snaps.is_empty() && rng.chance(60) {
                    let keys: Vec<&String> = m.snaps.keys().collect();
                    rng.pick(&keys).to_string()
                } else {
                    rng.pick(KEYS).to_string()
                }
            }
        }
    };
    let op = match rng.below(10) {
        0..=1 => FOp::Present,
        2..=5 => FOp::Eq(value(rng)),
        6..=7 => FOp::Ne(value(rng)),
        _ => {
            let v = value(rng);
            let cut = rng.below(v.chars().count() + 1);
            FOp::Prefix(v.chars().take(cut).collect())
        }
    };
    // Unquoted label keys only where the grammar allows them.
    let bare = match &field {
        Field::Label(k) => {
            k.split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                && rng.chance(50)
        }
        _ => rng.chance(50),
    };
    Sel { field, op, bare }
}

fn gen_op(rng: &mut Rng, m: &Model) -> Op {
    match rng.below(1000) {
        0..=179 => Op::Prepare {
            key: any_key(rng),
            parent: gen_parent(rng, m),
            labels: gen_labels(rng),
        },
        180..=249 => Op::View {
            key: any_key(rng),
            parent: gen_parent(rng, m),
            labels: gen_labels(rng),
        },
        250..=309 => Op::Mounts {
            key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 80),
        },
        310..=459 => Op::Commit {
            name: any_key(rng),
            key: biased_key(rng, m, &[ACTIVE], 70),
            labels: gen_labels(rng),
        },
        460..=559 => Op::Remove {
            key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 70),
        },
        560..=629 => Op::Stat {
            key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 70),
        },
        630..=719 => {
            let paths = match rng.below(10) {
                0 => None,
                1 => Some(vec![]),
                2 => Some(vec!["labels".into()]),
                3..=6 => Some(
                    (0..1 + rng.below(2))
                        .map(|_| format!("labels.{}", rng.pick(LABEL_KEYS)))
                        .collect(),
                ),
                7 => Some(vec![rng
                    .pick(&["parent", "name", "kind", "created_at", "Labels"])
                    .to_string()]),
                _ => Some(vec![
                    format!("labels.{}", rng.pick(LABEL_KEYS)),
                    rng.pick(&["parent", "kind"]).to_string(),
                ]),
            };
            Op::Update {
                key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 80),
                labels: gen_labels(rng),
                paths,
            }
        }
        720..=769 => Op::Usage {
            key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 80),
        },
        770..=949 => {
            let n = rng.below(3);
            let filters = (0..n)
                .map(|_| (0..1 + rng.below(2)).map(|_| gen_sel(rng, m)).collect())
                .collect();
            let bad = rng.chance(5).then(|| {
                rng.pick(&["name==", "==a", "kind=view", "name~=\"(\"", "labels."])
                    .to_string()
            });
            Op::List { filters, bad }
        }
        950..=979 => Op::Cleanup,
        _ => Op::Restart,
    }
}

// ---------------------------------------------------------------------------------------------
// Running a step against the daemon
// ---------------------------------------------------------------------------------------------

/// What the daemon answered, reduced to what the model predicts.
#[derive(Debug)]
enum Got {
    Mounts(Vec<Mount>),
    Info(Info),
    Usage(i64, i64),
    List(Vec<Info>),
    Unit,
}

fn hmap(labels: &[(String, String)]) -> HashMap<String, String> {
    labels.iter().cloned().collect()
}

async fn run_op(c: &mut Client, op: &Op) -> Res<Got> {
    Ok(match op {
        Op::Prepare {
            key,
            parent,
            labels,
        } => Got::Mounts(c.prepare_with(key, parent, hmap(labels)).await?),
        Op::View {
            key,
            parent,
            labels,
        } => Got::Mounts(c.view_with(key, parent, hmap(labels)).await?),
        Op::Mounts { key } => Got::Mounts(c.mounts(key).await?),
        Op::Commit { name, key, labels } => {
            c.commit_with(name, key, hmap(labels)).await?;
            Got::Unit
        }
        Op::Remove { key } => {
            c.remove(key).await?;
            Got::Unit
        }
        Op::Stat { key } => Got::Info(c.stat(key).await?),
        Op::Update { key, labels, paths } => Got::Info(
            c.update_with(Some(info(key, hmap(labels))), paths.clone())
                .await?,
        ),
        Op::Usage { key } => {
            let u = c.usage(key).await?;
            Got::Usage(u.size, u.inodes)
        }
        Op::List { filters, bad } => {
            let mut strings: Vec<String> = filters
                .iter()
                .map(|all| all.iter().map(Sel::render).collect::<Vec<_>>().join(","))
                .collect();
            strings.extend(bad.clone());
            let refs: Vec<&str> = strings.iter().map(String::as_str).collect();
            Got::List(c.list_batches(&refs).await?.0)
        }
        Op::Cleanup => {
            c.cleanup().await?;
            Got::Unit
        }
        Op::Restart => Got::Unit,
    })
}

fn info_matches(info: &Info, name: &str, s: &Snap) -> Result<(), String> {
    let labels: BTreeMap<String, String> = info.labels.clone().into_iter().collect();
    if info.name != name || info.kind != s.kind || info.parent != s.parent || labels != s.labels {
        return Err(format!(
            "daemon: {:?} kind {} parent {:?} labels {labels:?}; model: {name:?} kind {} parent \
             {:?} labels {:?}",
            info.name,
            kind_name(info.kind),
            info.parent,
            kind_name(s.kind),
            s.parent,
            s.labels
        ));
    }
    Ok(())
}

/// Checks the mount shape of REFERENCE.md §2 and that every directory named is
/// `<root>/snapshots/<decimal>/fs` (keys never become paths).
fn check_mounts(
    mounts: &[Mount],
    kind: i32,
    lowers: &[Option<String>],
    snapshots_dir: &str,
) -> Result<(), String> {
    let fail = |why: &str| {
        Err(format!(
            "{why}: {mounts:?} (kind {}, lowers {lowers:?})",
            kind_name(kind)
        ))
    };
    if mounts.len() != 1 {
        return fail("not exactly one mount");
    }
    let m = &mounts[0];
    let is_fs = |p: &str| is_snapshot_fs(snapshots_dir, p);
    let same_lowers = |got: &[&str]| {
        got.len() == lowers.len()
            && got
                .iter()
                .zip(lowers)
                .all(|(g, want)| is_fs(g) && want.as_deref().is_none_or(|w| w == *g))
    };
    match (kind, lowers.len()) {
        (ACTIVE, 0) | (VIEW, 0) | (VIEW, 1) => {
            let ro = if kind == ACTIVE { "rw" } else { "ro" };
            if m.r#type != "bind" || m.options != [ro, "rbind"] || !is_fs(&m.source) {
                return fail("expected one bind mount of an fs directory");
            }
            if kind == VIEW && lowers.len() == 1 && !same_lowers(&[m.source.as_str()]) {
                return fail("a view of one parent binds the parent's fs");
            }
        }
        _ => {
            if m.r#type != "overlay" || m.source != "overlay" {
                return fail("expected an overlay mount");
            }
            let lowerdir: Vec<&str> =
                match m.options.iter().find_map(|o| o.strip_prefix("lowerdir=")) {
                    Some(l) => l.split(':').collect(),
                    None => return fail("no lowerdir="),
                };
            if !same_lowers(&lowerdir) {
                return fail("lowerdir= is not the chain of parents, nearest first");
            }
            let upper = m.options.iter().find_map(|o| o.strip_prefix("upperdir="));
            let work = m.options.iter().any(|o| o.starts_with("workdir="));
            match kind {
                ACTIVE if !upper.is_some_and(is_fs) || !work => {
                    return fail("an active overlay needs upperdir= and workdir=")
                }
                VIEW if upper.is_some() || work => return fail("a view has no upperdir"),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Compares one answer with the model's prediction; `Ok(fs)` carries the `fs` of a new
/// active snapshot.
fn compare(
    want: &Result<Expect, Code>,
    got: &Res<Got>,
    snapshots_dir: &str,
) -> Result<Option<String>, String> {
    match (want, got) {
        (Err(code), Err(status)) if status.code() == *code => {
            if status.message().is_empty() {
                return Err(format!("{code:?} with an empty message"));
            }
            Ok(None)
        }
        (Err(code), Err(status)) => Err(format!(
            "model: {code:?}; daemon: {:?} {:?}",
            status.code(),
            status.message()
        )),
        (Err(code), Ok(got)) => Err(format!("model: {code:?}; daemon: Ok({got:?})")),
        (Ok(want), Err(status)) => Err(format!(
            "model: Ok({want:?}); daemon: {:?} {:?}",
            status.code(),
            status.message()
        )),
        (Ok(want), Ok(got)) => match (want, got) {
            (Expect::Mounts { kind, lowers }, Got::Mounts(m)) => {
                check_mounts(m, *kind, lowers, snapshots_dir)?;
                Ok((*kind == ACTIVE).then(|| own_fs(m).display().to_string()))
            }
            (Expect::Info(name, s), Got::Info(info)) => info_matches(info, name, s).map(|_| None),
            (Expect::Usage(kind), Got::Usage(size, inodes)) => {
                // Nothing is ever written into these snapshots: an active or committed one
                // holds its empty root directory (one inode), a view is zero.
                let ok = match *kind {
                    VIEW => (*size, *inodes) == (0, 0),
                    _ => *inodes == 1 && *size >= 0,
                };
                if ok {
                    Ok(None)
                } else {
                    Err(format!(
                        "usage of a {} snapshot: size {size} inodes {inodes}",
                        kind_name(*kind)
                    ))
                }
            }
            (Expect::List(want), Got::List(got)) => {
                compare_list(want, got)?;
                Ok(None)
            }
            (Expect::Unit, Got::Unit) => Ok(None),
            (want, got) => Err(format!("model: {want:?}; daemon: {got:?}")),
        },
    }
}

fn compare_list(want: &[(String, Snap)], got: &[Info]) -> Result<(), String> {
    let mut got: Vec<&Info> = got.iter().collect();
    got.sort_by(|a, b| a.name.cmp(&b.name));
    let got_names: Vec<&str> = got.iter().map(|i| i.name.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    if got_names != want_names {
        return Err(format!("listed {got_names:?}; model: {want_names:?}"));
    }
    for (info, (name, s)) in got.iter().zip(want) {
        info_matches(info, name, s)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Totals {
    sequences: u64,
    steps: u64,
    restarts: u64,
    errors: u64,
}

/// Runs one sequence of `steps` random steps from `seed` on a fresh daemon.
async fn run_sequence(seed: u64, steps: u64, sync_remove: bool, totals: &mut Totals) {
    let config = if sync_remove {
        "sync_remove = true\n"
    } else {
        ""
    };
    let mut d = TestDaemon::start_with_config(config).await;
    let mut c = d.client().await;
    let snapshots_dir = d.root.join("snapshots").display().to_string();
    let mut rng = Rng::new(seed);
    let mut model = Model::default();
    let mut trace: Vec<String> = Vec::new();
    // Serving (not merely listening) before the first step, which may be a restart.
    assert_eq!(c.list(&[]).await.unwrap(), Vec::<String>::new());

    for step in 0..steps {
        let op = gen_op(&mut rng, &model);
        let want = model.apply(&op);
        let got = if let Op::Restart = op {
            drop(c);
            d.restart().await;
            c = d.client().await;
            totals.restarts += 1;
            Ok(Got::Unit)
        } else {
            run_op(&mut c, &op).await
        };
        if got.is_err() {
            totals.errors += 1;
        }
        trace.push(format!(
            "{step:3}: {op:?} -> {}",
            match &got {
                Ok(_) => "Ok".to_string(),
                Err(s) => format!("{:?} {:?}", s.code(), s.message()),
            }
        ));
        let fail = |why: String, trace: &[String]| -> ! {
            panic!(
                "sequence seed {seed:#x} (sync_remove {sync_remove}) disagrees with the model at \
                 step {step}: {why}\n{}",
                trace.join("\n")
            )
        };
        match compare(&want, &got, &snapshots_dir) {
            Ok(Some(fs)) => {
                if let Op::Prepare { key, .. } = &op {
                    model.snaps.get_mut(key).unwrap().fs = Some(fs);
                }
            }
            Ok(None) => {}
            Err(why) => fail(why, &trace),
        }
        // After every step: the whole store as the daemon lists it is the model.
        let all = match c.list_batches(&[]).await {
            Ok((all, _)) => all,
            Err(s) => fail(format!("List failed: {s:?}"), &trace),
        };
        let want: Vec<(String, Snap)> = model
            .snaps
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        if let Err(why) = compare_list(&want, &all) {
            fail(format!("after the step, {why}"), &trace);
        }
        // Directories: only decimal names; one per snapshot once nothing is pending removal.
        // After a restart, what the stopped lamina had still queued for deletion is found by
        // start-up recovery and deleted in the background: wait for it (a Cleanup would too).
        let dirs = if matches!(op, Op::Restart) {
            let n = model.snaps.len();
            d.snapshot_dirs_when(std::time::Duration::from_secs(10), |dirs| dirs.len() <= n)
                .await
        } else {
            d.snapshot_dirs()
        };
        if !dirs.iter().all(|d| is_decimal(d)) {
            fail(
                format!("non-decimal names under snapshots/: {dirs:?}"),
                &trace,
            );
        }
        let settled = sync_remove || matches!(op, Op::Cleanup | Op::Restart);
        if settled && dirs.len() != model.snaps.len() {
            fail(
                format!(
                    "{} directories under snapshots/ for {} snapshots: {dirs:?}",
                    dirs.len(),
                    model.snaps.len()
                ),
                &trace,
            );
        }
        if dirs.len() < model.snaps.len() {
            fail(
                format!("fewer directories than snapshots: {dirs:?}"),
                &trace,
            );
        }
        totals.steps += 1;
    }
    drop(c);
    let status = d.stop_async().await;
    assert!(status.success(), "lamina exited with {status}");
    totals.sequences += 1;
}

root_test!(random_sequences_agree_with_the_model, || {
    let cases = env_or("LAMINA_MODEL_CASES", 32);
    let steps = env_or("LAMINA_MODEL_STEPS", 60);
    let seed = env_or("LAMINA_MODEL_SEED", 0x1a31_7a00_5eed);
    let started = std::time::Instant::now();
    let mut totals = Totals::default();
    for i in 0..cases {
        let seq_seed = Rng::new(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d)).next_u64();
        run_sequence(seq_seed, steps, i % 4 == 3, &mut totals).await;
    }
    eprintln!(
        "model: {} sequences x {steps} steps = {} steps ({} answered an error), {} restarts, \
         base seed {seed:#x}, {:.1?}",
        totals.sequences,
        totals.steps,
        totals.errors,
        totals.restarts,
        started.elapsed()
    );
});
