//! The model: what containerd's snapshotter rules say each step answers, and the store it
//! leaves (kinds, parents, labels, error codes, mount shapes, filters).

use super::*;

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// Keys and names: few, so that collisions and parent relations happen often; odd ones on
/// purpose (keys are arbitrary strings to containerd).
pub(super) const KEYS: &[&str] = &["a", "b", "c", "d/e", "..", "x\ny", "n\0l"];
pub(super) const LABEL_KEYS: &[&str] = &["a", "b", "a.b", "containerd.io/snapshot.ref"];
pub(super) const LABEL_VALUES: &[&str] = &["", "1", "2"];

pub(super) fn kind_name(kind: i32) -> &'static str {
    match kind {
        VIEW => "view",
        ACTIVE => "active",
        COMMITTED => "committed",
        _ => "?",
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Snap {
    pub(super) kind: i32,
    pub(super) parent: String,
    pub(super) labels: BTreeMap<String, String>,
    /// Its own `fs` directory, when the mounts revealed it (active snapshots, and committed
    /// ones through the active snapshot they were).
    pub(super) fs: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug, Clone)]
pub(super) enum FOp {
    Present,
    Eq(String),
    Ne(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub(super) struct Sel {
    pub(super) field: Field,
    pub(super) op: FOp,
    /// Render the label key unquoted (`labels.a.b`) rather than quoted.
    pub(super) bare: bool,
}

/// A value the scanner reads unquoted: it must not start with a separator, operator or quote.
fn is_bare_value(v: &str) -> bool {
    v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
}

impl Sel {
    pub(super) fn render(&self) -> String {
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

    pub(super) fn matches(&self, name: &str, s: &Snap) -> bool {
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
pub(super) enum Op {
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
pub(super) enum Expect {
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
pub(super) struct Model {
    pub(super) snaps: BTreeMap<String, Snap>,
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
    pub(super) fn committed(&self) -> Vec<String> {
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

    pub(super) fn apply(&mut self, op: &Op) -> Result<Expect, Code> {
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
