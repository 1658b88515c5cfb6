//! The metadata store: every snapshot's record, the parent→children index, the ID counter and
//! the counts by kind, in one redb database under the root. The only code that knows redb.
//!
//! Every mutation is one write transaction, committed durably (redb fsyncs on commit) before it
//! returns, so whatever lamina has acknowledged survives SIGKILL and power loss. redb runs one
//! write transaction at a time: two Prepares of one key, or a Prepare racing the Remove of its
//! parent, are decided in a total order with no lock of ours. Readers see a consistent snapshot
//! and never wait for the writer.
//!
//! `commit.rs` runs the transactions (group commit); `record.rs` is the records' format and its
//! migration; `readonly.rs` reads a store file without writing to it.
//!
//! No operation here scans the whole store except the listings ([`Store::list`],
//! [`Store::each_view`], [`Store::owned_ids`]), which List, Cleanup, fsck and start-up call.

mod commit;
mod readonly;
mod record;

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    path::Path,
    sync::{
        atomic::{AtomicI64, Ordering::Relaxed},
        Arc,
    },
    time::SystemTime,
};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    overlay::Usage,
};

/// key → encoded [`Record`] (see `record.rs`).
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// (parent key, child key) → (). Answers "has children?" with one range probe.
const CHILDREN: TableDefinition<(&str, &str), ()> = TableDefinition::new("children");
/// Counters and the schema version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const NEXT_ID: &str = "next_id";
const SCHEMA: &str = "schema_version";
/// 1: records in JSON; 2: records in protobuf (see `record.rs`), migrated from 1 on open.
const SCHEMA_VERSION: u64 = 2;

/// A snapshot's kind. Its numbers are containerd's (the wire's `Kind` enum), which the records
/// store too: one numbering, converted here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum Kind {
    View = 1,
    Active = 2,
    Committed = 3,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::View, Kind::Active, Kind::Committed];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }

    /// containerd's number for this kind.
    pub fn number(self) -> u32 {
        self as u32
    }

    /// The kind containerd numbers `n`, if any.
    pub fn from_number(n: u32) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.number() == n)
    }
}

/// What the store knows of one snapshot. The key is the table key, not a field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Names the directory `<root>/snapshots/<id>`. Never reused.
    pub id: u64,
    pub kind: Kind,
    /// The parent's key, or empty.
    pub parent: String,
    /// IDs of all ancestors, nearest first. Ancestors are committed and cannot be removed while
    /// this snapshot exists, so the chain is fixed at creation and Mounts needs no lookups.
    pub parent_ids: Vec<u64>,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Stored at Commit; zero for active snapshots (computed on demand) and views.
    pub usage: Usage,
}

/// Snapshots by kind, kept by the writes as they commit, so that the metrics and `lamina
/// status` need not read the whole store.
#[derive(Debug, Default)]
struct Counts([AtomicI64; 3]);

impl Counts {
    fn slot(&self, kind: Kind) -> &AtomicI64 {
        &self.0[kind.number() as usize - 1]
    }

    fn add(&self, kind: Kind, n: i64) {
        self.slot(kind).fetch_add(n, Relaxed);
    }

    fn get(&self, kind: Kind) -> u64 {
        self.slot(kind).load(Relaxed).max(0) as u64
    }
}

/// The metadata store; see the module's documentation.
pub struct Store {
    writer: Writer,
    counts: Arc<Counts>,
}

pub use commit::Change;
use commit::{open_guarded, Writer};
use record::{decode, encode, view};
pub use record::{Labels, RecordView};

/// A check of a new snapshot's ancestors that accepts any chain, for [`Store::insert`] from
/// tools and tests.
pub fn any_chain(_: &[u64]) -> Result<()> {
    Ok(())
}

/// AlreadyExists when a snapshot has the key `key`.
fn refuse_taken(table: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<()> {
    match table.get(key)? {
        Some(_) => Err(Error::already_exists(key)),
        None => Ok(()),
    }
}

/// The record of `key`, or NotFound.
fn lookup(table: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Record> {
    match table.get(key)? {
        Some(bytes) => decode(key, bytes.value()),
        None => Err(Error::not_found(key)),
    }
}

impl Store {
    /// Opens (or creates) the store file. A file that is not a valid store is an error: lamina
    /// never starts empty over existing snapshots.
    pub fn open(path: &Path) -> Result<Store> {
        // redb would initialise an empty file as a new store; an existing empty file is a store
        // that lost its contents, and starting empty over the snapshots would hide the loss.
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(Error::Corrupt(format!(
                "store {} is empty (0 bytes) but exists: it lost its contents. Restore it from a \
                 backup, or delete it to start over (existing snapshots are then lost to lamina)",
                path.display()
            )));
        }
        let db = open_guarded(path, || Database::create(path))?.map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => in_use(path),
            redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
                Error::io("opening store", path, io)
            }
            other => Error::Corrupt(format!(
                "store {} cannot be opened ({other}). lamina will not start empty over existing \
                 snapshots: restore the file from a backup, or move it aside to start over (the \
                 snapshots under {} are then lost to lamina and `lamina fsck --repair \
                 --delete-unknown` removes them)",
                path.display(),
                path.parent().unwrap_or(path).join("snapshots").display()
            )),
        })?;
        Store::with(path, db, false)
    }

    /// [`Store::open`], or `None` when there is no store file at all (which the caller must
    /// tell apart from an empty store: see `Snapshotter::open`).
    pub fn open_existing(path: &Path) -> Result<Option<Store>> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            _ => Store::open(path).map(Some),
        }
    }

    /// Opens the store without ever writing to its file (see `readonly.rs`): what it writes,
    /// creating tables or migrating, stays in memory. A missing file reads as an empty store.
    pub fn open_read_only(path: &Path) -> Result<Store> {
        let opened = match readonly::ReadOnlyFile::open(path) {
            Ok(file) => open_guarded(path, || Database::builder().create_with_backend(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => open_guarded(path, || {
                Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(in_use(path)),
            Err(e) => return Err(Error::io("opening store", path, e)),
        };
        let db = opened?.map_err(|e| {
            Error::Corrupt(format!("store {} cannot be read ({e})", path.display()))
        })?;
        Store::with(path, db, true)
    }

    fn with(path: &Path, db: Database, read_only: bool) -> Result<Store> {
        let store = Store {
            writer: Writer::start(path, db, read_only)?,
            counts: Arc::default(),
        };
        // Called outside the async runtime (start-up, tools), so waiting here blocks nobody.
        futures::executor::block_on(store.writer.write("initialising tables", |tx| {
            tx.open_table(SNAPSHOTS)?;
            tx.open_table(CHILDREN)?;
            let mut meta = tx.open_table(META)?;
            let version = meta.get(SCHEMA)?.map(|v| v.value());
            match version {
                None => {
                    meta.insert(SCHEMA, SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(1) => {
                    let migrated = record::migrate_v1(tx)?;
                    meta.insert(SCHEMA, SCHEMA_VERSION)?;
                    tracing::info!(
                        records = migrated,
                        "store migrated from schema 1 (JSON records) to 2"
                    );
                }
                Some(other) => {
                    return Err(Error::Internal(format!(
                        "store schema version {other} is not supported by this lamina \
                         (expects {SCHEMA_VERSION}); run the lamina that wrote it"
                    )))
                }
            }
            Ok(())
        }))?;
        // The one whole read of the store that the counts need; writes keep them after it.
        store.each_view(|_, record| {
            store.counts.add(record.kind, 1);
            true
        })?;
        Ok(store)
    }

    /// What a write does to the counts by kind, once its batch is durable (see
    /// [`Writer::write_then`]).
    fn counting(
        &self,
        change: impl FnOnce(&Counts, &Record) + Send + 'static,
    ) -> impl FnOnce(&Record) + Send + 'static {
        let counts = Arc::clone(&self.counts);
        move |record| change(&counts, record)
    }

    /// Announces a change (a request that will write) until the guard is dropped; see
    /// `commit.rs` for what it decides.
    pub fn enter(&self) -> Change {
        self.writer.enter()
    }

    pub fn get(&self, key: &str) -> Result<Record> {
        self.writer.read("reading a snapshot", |tx| {
            lookup(&tx.open_table(SNAPSHOTS)?, key)
        })
    }

    /// Records a new active snapshot or view under a fresh ID. The caller creates its
    /// directories afterwards: a directory never exists before the record that owns it.
    ///
    /// Refused with `check_chain`'s error if it fails on the new snapshot's ancestors (their
    /// IDs, nearest first; [`any_chain`] accepts all). Checked inside the write transaction,
    /// against the parent as it is when the snapshot is recorded: a parent removed and
    /// committed again under the same key meanwhile may have another chain.
    pub fn insert(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        now: SystemTime,
        check_chain: impl FnOnce(&[u64]) -> Result<()> + Send + 'static,
    ) -> impl Future<Output = Result<Record>> + Send + 'static {
        let (key, parent) = (key.to_string(), parent.to_string());
        let count = self.counting(|counts, r| counts.add(r.kind, 1));
        self.writer.write_then(
            "creating a snapshot",
            move |tx| {
                let (key, parent) = (key.as_str(), parent.as_str());
                let mut snapshots = tx.open_table(SNAPSHOTS)?;
                refuse_taken(&snapshots, key)?;
                let mut parent_ids = Vec::new();
                if !parent.is_empty() {
                    let parent_record = lookup(&snapshots, parent).map_err(|e| match e {
                        Error::NotFound(_) => {
                            Error::NotFound(format!("parent snapshot {parent:?} does not exist"))
                        }
                        other => other,
                    })?;
                    if parent_record.kind != Kind::Committed {
                        return Err(Error::invalid(format!(
                            "parent snapshot {parent:?} is {}, not committed: only committed \
                         snapshots can be parents",
                            parent_record.kind.as_str()
                        )));
                    }
                    parent_ids.push(parent_record.id);
                    parent_ids.extend(parent_record.parent_ids);
                }
                check_chain(&parent_ids)?;
                let mut meta = tx.open_table(META)?;
                let id = next_id(&meta)?;
                meta.insert(NEXT_ID, id + 1)?;
                let record = Record {
                    id,
                    kind,
                    parent: parent.to_string(),
                    parent_ids,
                    labels,
                    created: now,
                    updated: now,
                    usage: Usage::default(),
                };
                snapshots.insert(key, encode(&record).as_slice())?;
                if !parent.is_empty() {
                    tx.open_table(CHILDREN)?.insert((parent, key), ())?;
                }
                Ok(record)
            },
            count,
        )
    }

    /// Turns active snapshot `key` (which must still have ID `id`) into committed `name`.
    pub fn commit(
        &self,
        key: &str,
        id: u64,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
        now: SystemTime,
    ) -> impl Future<Output = Result<Record>> + Send + 'static {
        let (key, name) = (key.to_string(), name.to_string());
        let count = self.counting(|counts, _| {
            counts.add(Kind::Active, -1);
            counts.add(Kind::Committed, 1);
        });
        self.writer.write_then(
            "committing a snapshot",
            move |tx| {
                let (key, name) = (key.as_str(), name.as_str());
                let mut snapshots = tx.open_table(SNAPSHOTS)?;
                refuse_taken(&snapshots, name)?;
                let active = lookup(&snapshots, key)?;
                if active.kind != Kind::Active {
                    return Err(commit_wrong_kind(key, active.kind));
                }
                if active.id != id {
                    // Removed and prepared again while its usage was being computed.
                    return Err(Error::precondition(format!(
                        "snapshot {key:?} was replaced while being committed; retry"
                    )));
                }
                snapshots.remove(key)?;
                let record = Record {
                    kind: Kind::Committed,
                    labels,
                    created: now,
                    updated: now,
                    usage,
                    ..active
                };
                snapshots.insert(name, encode(&record).as_slice())?;
                if !record.parent.is_empty() {
                    let mut children = tx.open_table(CHILDREN)?;
                    children.remove((record.parent.as_str(), key))?;
                    children.insert((record.parent.as_str(), name), ())?;
                }
                Ok(record)
            },
            count,
        )
    }

    /// Deletes the record of `key`, refusing while it has children. Returns what was removed.
    pub fn remove(&self, key: &str) -> impl Future<Output = Result<Record>> + Send + 'static {
        self.remove_if(key, None)
    }

    /// [`Store::remove`], only while `key` is still snapshot `id` (NotFound otherwise): for
    /// undoing a creation, which must not remove whatever took the key since.
    pub fn remove_if(
        &self,
        key: &str,
        id: Option<u64>,
    ) -> impl Future<Output = Result<Record>> + Send + 'static {
        let key = key.to_string();
        let count = self.counting(|counts, r| counts.add(r.kind, -1));
        self.writer.write_then(
            "removing a snapshot",
            move |tx| {
                let key = key.as_str();
                let mut snapshots = tx.open_table(SNAPSHOTS)?;
                let record = lookup(&snapshots, key)?;
                if let Some(id) = id.filter(|&id| id != record.id) {
                    return Err(Error::NotFound(format!(
                        "snapshot {key:?} is no longer snapshot {id}"
                    )));
                }
                let mut children = tx.open_table(CHILDREN)?;
                let first_child = children
                    .range((key, "")..)?
                    .next()
                    .transpose()?
                    .map(|(k, _)| k.value().0 == key);
                if first_child == Some(true) {
                    return Err(Error::precondition(format!(
                        "cannot remove snapshot {key:?}: it has children; remove them first"
                    )));
                }
                snapshots.remove(key)?;
                if !record.parent.is_empty() {
                    children.remove((record.parent.as_str(), key))?;
                }
                Ok(record)
            },
            count,
        )
    }

    /// Applies `change` to the labels of `key` and stamps the update time.
    pub fn update_labels(
        &self,
        key: &str,
        now: SystemTime,
        change: impl FnOnce(&mut BTreeMap<String, String>) -> Result<()> + Send + 'static,
    ) -> impl Future<Output = Result<Record>> + Send + 'static {
        let key = key.to_string();
        self.writer.write("updating a snapshot", move |tx| {
            let key = key.as_str();
            let mut snapshots = tx.open_table(SNAPSHOTS)?;
            let mut record = lookup(&snapshots, key)?;
            change(&mut record.labels)?;
            record.updated = now;
            snapshots.insert(key, encode(&record).as_slice())?;
            Ok(record)
        })
    }

    /// Every snapshot, in key order, from one consistent read snapshot.
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        let mut out = Vec::new();
        self.each(|key, record| {
            out.push((key.to_string(), record));
            true
        })?;
        Ok(out)
    }

    /// Calls `each` on every snapshot in key order, from one consistent read snapshot, until
    /// it returns false. Nothing is collected, so memory stays flat however many there are.
    pub fn each(&self, mut each: impl FnMut(&str, Record) -> bool) -> Result<()> {
        self.writer.read("listing snapshots", |tx| {
            let table = tx.open_table(SNAPSHOTS)?;
            for entry in table.iter()? {
                let (k, v) = entry?;
                if !each(k.value(), decode(k.value(), v.value())?) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// [`Store::each`] with each record read in place instead of decoded: no allocation per
    /// snapshot, for List and the counts that read every record.
    pub fn each_view(&self, mut each: impl FnMut(&str, RecordView<'_>) -> bool) -> Result<()> {
        self.writer.read("listing snapshots", |tx| {
            let table = tx.open_table(SNAPSHOTS)?;
            for entry in table.iter()? {
                let (k, v) = entry?;
                let (key, bytes) = (k.value(), v.value());
                if !each(key, view(key, bytes)?) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// IDs of every snapshot that has a record, and the next ID the store will hand out, from
    /// one read: a directory whose ID is at or above it was not made by this store's lamina.
    pub fn owned_ids(&self) -> Result<(HashSet<u64>, u64)> {
        self.writer.read("listing snapshots", |tx| {
            let mut ids = HashSet::new();
            for entry in tx.open_table(SNAPSHOTS)?.iter()? {
                let (k, v) = entry?;
                ids.insert(view(k.value(), v.value())?.id);
            }
            Ok((ids, next_id(&tx.open_table(META)?)?))
        })
    }

    /// [`Store::list`], and the next ID, from one read.
    pub fn list_with_next_id(&self) -> Result<(Vec<(String, Record)>, u64)> {
        self.writer.read("listing snapshots", |tx| {
            let mut out = Vec::new();
            for entry in tx.open_table(SNAPSHOTS)?.iter()? {
                let (k, v) = entry?;
                out.push((k.value().to_string(), decode(k.value(), v.value())?));
            }
            Ok((out, next_id(&tx.open_table(META)?)?))
        })
    }

    /// The ID the next creation gets.
    pub fn next_id(&self) -> Result<u64> {
        self.writer.read("reading the ID counter", |tx| {
            next_id(&tx.open_table(META)?)
        })
    }

    /// Makes the next ID at least `at_least`: after directories the store did not know were
    /// deleted, their IDs are still never handed out again.
    pub fn raise_next_id(
        &self,
        at_least: u64,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        self.writer.write("raising the ID counter", move |tx| {
            let mut meta = tx.open_table(META)?;
            if next_id(&meta)? < at_least {
                meta.insert(NEXT_ID, at_least)?;
            }
            Ok(())
        })
    }

    /// Snapshots by kind: (active, views, committed). Kept by the writes, so free to call.
    pub fn counts(&self) -> (u64, u64, u64) {
        let c = &self.counts;
        (
            c.get(Kind::Active),
            c.get(Kind::View),
            c.get(Kind::Committed),
        )
    }
}

fn next_id(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64> {
    Ok(meta.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(1))
}

fn in_use(path: &Path) -> Error {
    Error::Config(format!(
        "store {} is in use by another process (a running lamina?): stop it, or use its socket",
        path.display()
    ))
}

fn commit_wrong_kind(key: &str, kind: Kind) -> Error {
    Error::precondition(format!(
        "cannot commit snapshot {key:?}: it is {}, only active snapshots can be committed",
        kind.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        (dir, store)
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    fn wait<T>(f: impl Future<Output = T>) -> T {
        futures::executor::block_on(f)
    }

    #[test]
    fn ids_are_never_reused_and_chains_are_recorded() {
        let (_d, s) = store();
        let a = wait(s.insert("a", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        wait(s.commit("a", a.id, "A", BTreeMap::new(), Usage::default(), now())).unwrap();
        let b = wait(s.insert("b", "A", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        assert_eq!(b.parent_ids, vec![a.id]);
        wait(s.commit("b", b.id, "B", BTreeMap::new(), Usage::default(), now())).unwrap();
        let c = wait(s.insert("c", "B", Kind::View, BTreeMap::new(), now(), any_chain)).unwrap();
        assert_eq!(c.parent_ids, vec![b.id, a.id]);
        wait(s.remove("c")).unwrap();
        let c2 = wait(s.insert("c", "B", Kind::View, BTreeMap::new(), now(), any_chain)).unwrap();
        assert!(c2.id > c.id, "a removed ID must not be handed out again");
    }

    #[test]
    fn a_panic_while_writing_fails_its_request_and_nothing_else() {
        let (_d, s) = store();
        let boom = wait(s.writer.write("injected panic", |_| -> Result<()> {
            panic!("injected panic inside a write")
        }));
        assert!(matches!(boom, Err(Error::Internal(_))), "{boom:?}");
        // Written in place (no other change under way) and through the committer thread.
        let a = wait(s.insert("a", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        let _busy = s.enter();
        let _other = s.enter();
        let boom = wait(s.writer.write("injected panic", |_| -> Result<()> {
            panic!("injected panic inside a queued write")
        }));
        assert!(matches!(boom, Err(Error::Internal(_))), "{boom:?}");
        let b = wait(s.insert("b", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        assert_eq!(s.get("a").unwrap(), a);
        assert_eq!(s.get("b").unwrap(), b);
    }

    #[test]
    fn a_store_file_deleted_while_open_is_not_recreated_empty() {
        let (d, s) = store();
        wait(s.insert("a", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        let path = d.path().join("db");
        std::fs::remove_file(&path).unwrap();
        // A failed write makes the store reopen its file.
        let boom = wait(s.writer.write("injected panic", |_| -> Result<()> {
            panic!("injected panic inside a write")
        }));
        assert!(boom.is_err());
        // An empty store would hand out ID 1 again, and Cleanup would then take every
        // existing snapshot's directory for an orphan.
        let again = wait(s.insert("b", "", Kind::Active, BTreeMap::new(), now(), any_chain));
        assert!(again.is_err(), "{again:?}");
        assert!(!path.exists(), "no new, empty store file");
    }

    #[test]
    fn a_conditional_remove_leaves_a_key_that_changed_hands() {
        let (_d, s) = store();
        let first =
            wait(s.insert("k", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        wait(s.remove("k")).unwrap();
        let second =
            wait(s.insert("k", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        let stale = wait(s.remove_if("k", Some(first.id)));
        assert!(matches!(stale, Err(Error::NotFound(_))), "{stale:?}");
        assert_eq!(s.get("k").unwrap(), second);
        wait(s.remove_if("k", Some(second.id))).unwrap();
        assert!(matches!(s.get("k"), Err(Error::NotFound(_))));
    }

    #[test]
    fn a_reopen_does_not_wait_forever_for_a_long_read() {
        crate::testing::within(
            std::time::Duration::from_secs(60),
            "the store while a read outlived a reopen",
            a_long_read_during_a_reopen,
        );
    }

    fn a_long_read_during_a_reopen() {
        let (_d, s) = store();
        let s = Arc::new(s);
        let a = wait(s.insert("a", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        // A List whose client does not read: it holds its read transaction.
        let (started, reading) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let lister = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                s.each(|_, _| {
                    started.send(()).unwrap();
                    released.recv().unwrap();
                    true
                })
            })
        };
        reading.recv().unwrap();
        // A failed write reopens the store; it gives up waiting for the read instead of
        // blocking every later request behind it.
        let boom = wait(s.writer.write("injected panic", |_| -> Result<()> {
            panic!("injected panic inside a write")
        }));
        assert!(boom.is_err());
        let busy = s.get("a");
        assert!(matches!(busy, Err(Error::Unavailable(_))), "{busy:?}");
        release.send(()).unwrap();
        lister.join().unwrap().unwrap();
        // Once the read is over, the next request opens the store again, with everything.
        assert_eq!(s.get("a").unwrap(), a);
        wait(s.insert("b", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
    }

    #[test]
    fn a_failed_batch_answers_no_request_error_decided_on_its_undone_writes() {
        let (_d, s) = store();
        // Two changes under way: writes queue for the committer and share its batches.
        let _busy = s.enter();
        let _other = s.enter();
        let (inside, is_inside) = std::sync::mpsc::channel();
        let (go, wait_go) = std::sync::mpsc::channel::<()>();
        let holder = s
            .writer
            .write("holding the batch open", move |_| -> Result<()> {
                inside.send(()).unwrap();
                wait_go.recv().unwrap();
                Ok(())
            });
        is_inside.recv().unwrap();
        // Queued while the committer is inside the batch: they join it.
        let first = s.insert("k", "", Kind::Active, BTreeMap::new(), now(), any_chain);
        let second = s.insert("k", "", Kind::Active, BTreeMap::new(), now(), any_chain);
        let broken = s.writer.write("injected", |_| -> Result<()> {
            Err(Error::store(
                "injected",
                redb::StorageError::Corrupted("injected".into()),
            ))
        });
        go.send(()).unwrap();
        assert!(wait(holder).is_err());
        assert!(wait(first).is_err());
        // The second saw the first's record, which was never committed.
        let second = wait(second);
        assert!(
            second
                .as_ref()
                .is_err_and(|e| !matches!(e, Error::AlreadyExists(_))),
            "{second:?}"
        );
        assert!(matches!(wait(broken), Err(Error::Store { .. })));
        // The store reopens after the failed batch; a read meanwhile may be told to retry.
        let mut k = s.get("k");
        for _ in 0..500 {
            if !matches!(k, Err(Error::Unavailable(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            k = s.get("k");
        }
        assert!(matches!(k, Err(Error::NotFound(_))), "{k:?}");
    }

    #[test]
    fn remove_refuses_while_children_exist() {
        let (_d, s) = store();
        let a = wait(s.insert("a", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        wait(s.commit("a", a.id, "A", BTreeMap::new(), Usage::default(), now())).unwrap();
        // A sibling key that sorts right after the parent must not count as a child.
        wait(s.insert("A\0", "", Kind::View, BTreeMap::new(), now(), any_chain)).unwrap();
        wait(s.remove("A\0")).unwrap();
        wait(s.insert(
            "child",
            "A",
            Kind::Active,
            BTreeMap::new(),
            now(),
            any_chain,
        ))
        .unwrap();
        assert!(matches!(
            wait(s.remove("A")),
            Err(Error::FailedPrecondition(_))
        ));
        wait(s.remove("child")).unwrap();
        wait(s.remove("A")).unwrap();
        assert!(matches!(s.get("A"), Err(Error::NotFound(_))));
    }

    #[test]
    fn errors_leave_the_store_unchanged() {
        let (_d, s) = store();
        let a = wait(s.insert("a", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        assert!(matches!(
            wait(s.insert("a", "", Kind::View, BTreeMap::new(), now(), any_chain)),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            wait(s.insert("b", "a", Kind::View, BTreeMap::new(), now(), any_chain)),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            wait(s.insert("b", "nope", Kind::View, BTreeMap::new(), now(), any_chain)),
            Err(Error::NotFound(_))
        ));
        let v = wait(s.insert("v", "", Kind::View, BTreeMap::new(), now(), any_chain)).unwrap();
        assert!(matches!(
            wait(s.commit("v", v.id, "V", BTreeMap::new(), Usage::default(), now())),
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(s.get("a").unwrap(), a);
        assert_eq!(s.get("v").unwrap(), v);
        assert_eq!(s.list().unwrap().len(), 2);
    }

    #[test]
    fn reopens_with_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let a = {
            let s = Store::open(&path).unwrap();
            wait(s.insert(
                "a",
                "",
                Kind::Active,
                BTreeMap::from([("l".into(), "v".into())]),
                now(),
                any_chain,
            ))
            .unwrap()
        };
        let s = Store::open(&path).unwrap();
        assert_eq!(s.get("a").unwrap(), a);
        let b = wait(s.insert("b", "", Kind::Active, BTreeMap::new(), now(), any_chain)).unwrap();
        assert_eq!(b.id, a.id + 1);
    }

    #[test]
    fn migrates_a_schema_1_store_keeping_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let a = Record {
            id: 5,
            kind: Kind::Committed,
            parent: String::new(),
            parent_ids: vec![],
            labels: BTreeMap::from([("l".into(), "v".into())]),
            created: now(),
            updated: now(),
            usage: Usage {
                size: 8192,
                inodes: 2,
            },
        };
        let b = Record {
            id: 6,
            kind: Kind::Active,
            parent: "a".into(),
            parent_ids: vec![5],
            ..a.clone()
        };
        {
            // A store as schema 1 wrote it: JSON records.
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(SNAPSHOTS).unwrap();
                t.insert("a", serde_json::to_vec(&a).unwrap().as_slice())
                    .unwrap();
                t.insert("b", serde_json::to_vec(&b).unwrap().as_slice())
                    .unwrap();
                tx.open_table(CHILDREN)
                    .unwrap()
                    .insert(("a", "b"), ())
                    .unwrap();
                let mut meta = tx.open_table(META).unwrap();
                meta.insert(SCHEMA, 1).unwrap();
                meta.insert(NEXT_ID, 7).unwrap();
            }
            tx.commit().unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.get("a").unwrap(), a);
        assert_eq!(s.get("b").unwrap(), b);
        assert!(matches!(
            wait(s.remove("a")),
            Err(Error::FailedPrecondition(_))
        ));
        let c = wait(s.insert("c", "a", Kind::View, BTreeMap::new(), now(), any_chain)).unwrap();
        assert_eq!(c.id, 7);
        drop(s);
        let db = Database::create(&path).unwrap();
        let tx = db.begin_read().unwrap();
        let meta = tx.open_table(META).unwrap();
        assert_eq!(meta.get(SCHEMA).unwrap().unwrap().value(), SCHEMA_VERSION);
    }

    #[test]
    fn refuses_a_schema_1_store_with_an_unreadable_record_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(SNAPSHOTS).unwrap();
                t.insert("bad", b"{not json".as_slice()).unwrap();
                tx.open_table(META).unwrap().insert(SCHEMA, 1).unwrap();
            }
            tx.commit().unwrap();
        }
        let err = Store::open(&path)
            .err()
            .expect("an unreadable record must stop the migration");
        assert!(err.to_string().contains("\"bad\""), "{err}");
        let db = Database::create(&path).unwrap();
        let tx = db.begin_read().unwrap();
        assert_eq!(
            tx.open_table(META)
                .unwrap()
                .get(SCHEMA)
                .unwrap()
                .unwrap()
                .value(),
            1
        );
    }

    #[test]
    fn refuses_a_truncated_store_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        wait(Store::open(&path).unwrap().insert(
            "a",
            "",
            Kind::Active,
            BTreeMap::new(),
            now(),
            any_chain,
        ))
        .unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let err = Store::open(&path)
            .err()
            .expect("a truncated store must not open");
        assert!(matches!(err, Error::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("backup"), "{err}");
    }

    #[test]
    fn refuses_a_file_that_is_not_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(Store::open(&path).is_err());
    }
}
