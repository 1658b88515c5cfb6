//! The metadata store: every snapshot's record, the parent→children index, and the ID counter,
//! in one redb database under the root.
//!
//! Every mutation is one write transaction, committed durably (redb fsyncs on commit) before it
//! returns, so whatever lamina has acknowledged survives SIGKILL and power loss. redb runs one
//! write transaction at a time: two Prepares of one key, or a Prepare racing the Remove of its
//! parent, are decided in a total order with no lock of ours. Readers see a consistent snapshot
//! and never wait for the writer.
//!
//! No operation here scans the whole store except [`Store::list`] and [`Store::owned_ids`],
//! which List, Cleanup and start-up recovery call.

mod delete;
pub mod layout;
mod readonly;
pub mod reaper;
mod record;
pub mod spares;

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    future::Future,
    path::Path,
    sync::{
        atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed},
        Arc, Condvar, Mutex, RwLock,
    },
    time::SystemTime,
};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::{chain, Error, Result};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
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

/// Snapshots by kind (indexed by `Kind as usize`), kept by the writes as they commit, so that
/// the metrics and `lamina status` need not read the whole store.
#[derive(Debug, Default)]
struct Counts([AtomicI64; 3]);

impl Counts {
    fn add(&self, kind: Kind, n: i64) {
        self.0[kind as usize].fetch_add(n, Relaxed);
    }

    fn get(&self, kind: Kind) -> u64 {
        self.0[kind as usize].load(Relaxed).max(0) as u64
    }
}

pub struct Store {
    db: Arc<Handle>,
    /// Writes waiting for a transaction (see [`Store::write`]).
    queue: Arc<Queue>,
    /// Changes under way (see [`Store::enter`]).
    changes: Arc<AtomicUsize>,
    committer: Option<std::thread::JoinHandle<()>>,
    counts: Arc<Counts>,
}

impl Drop for Store {
    /// Closes the queue and waits for the committer, so that the database file is released
    /// (and can be opened again) when the store is gone.
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.more.notify_all();
        if let Some(thread) = self.committer.take() {
            let _ = thread.join();
        }
    }
}

/// The open database, which the committer replaces after an I/O failure: redb refuses every
/// later write on an instance that saw one ("Previous I/O error occurred"), so a full disk
/// would otherwise break lamina until a restart, even once space is freed.
struct Handle {
    path: std::path::PathBuf,
    db: RwLock<Option<Arc<Database>>>,
    /// Opened by [`Store::open_read_only`]: writes live in memory and are never reopened from
    /// the file.
    read_only: bool,
}

impl Handle {
    /// The database for one transaction; hold it no longer than that transaction.
    fn get(&self) -> Result<Arc<Database>> {
        if let Some(db) = self.current() {
            return Ok(db);
        }
        // A reopen gave up waiting for a long read; once that read is over, whoever comes
        // next (a read as well as a write) opens the file again.
        if let Err(e) = self.reopen() {
            tracing::debug!(error = %e, "store not reopened yet");
        }
        self.current().ok_or_else(|| {
            Error::Unavailable(format!(
                "store {} is being reopened after a failed write; retry",
                self.path.display()
            ))
        })
    }

    fn current(&self) -> Option<Arc<Database>> {
        self.db.read().ok().and_then(|db| db.clone())
    }

    /// Closes the database once no transaction uses it, and opens the file again.
    fn reopen(&self) -> std::result::Result<(), String> {
        // Taken out under the lock, waited for outside it: a reader holds its clone for one
        // read transaction, and a List's lasts as long as its client takes to read the
        // stream. Meanwhile other readers get Unavailable at once instead of blocking a
        // runtime thread, which a List waiting for its client could otherwise deadlock.
        let old = self
            .db
            .write()
            .map_err(|_| "store lock poisoned".to_string())?
            .take();
        if let Some(mut old) = old {
            let deadline = std::time::Instant::now() + REOPEN_WAIT;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => break drop(db),
                    Err(still) => old = still,
                }
                if std::time::Instant::now() > deadline {
                    // The last reader closes it; the next request after that reopens.
                    return Err(format!(
                        "a read still uses the store after {REOPEN_WAIT:?}; requests get \
                         Unavailable until it ends, and the next one reopens the store"
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let mut slot = self
            .db
            .write()
            .map_err(|_| "store lock poisoned".to_string())?;
        if slot.is_some() {
            return Ok(());
        }
        if self.read_only {
            return Err("a store opened read-only is not reopened".into());
        }
        // Open, never create: a store file deleted or emptied meanwhile must not come back as
        // a new, empty store, which would hand out IDs again and orphan every snapshot.
        if std::fs::metadata(&self.path).map_or(true, |m| m.len() == 0) {
            return Err(format!(
                "store {} is missing or empty: not starting a new one over existing snapshots; \
                 restore it, then restart lamina",
                self.path.display()
            ));
        }
        let db = open_guarded(&self.path, || Database::open(&self.path))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        *slot = Some(Arc::new(db));
        Ok(())
    }
}

/// How long a reopen waits for reads of the old database to end before leaving the reopen
/// to a later request (it holds the writer meanwhile).
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a batch was not committed.
struct Failure {
    message: String,
    /// The disk is full or read-only: something an operator can fix, then retry.
    exhausted: bool,
}

impl Failure {
    fn to_error(&self, what: &str) -> Error {
        let message = format!("{what}: {}", self.message);
        if self.exhausted {
            Error::Exhausted(format!(
                "{message}; free space on the root's filesystem and retry"
            ))
        } else {
            Error::Internal(message)
        }
    }

    fn new(context: &str, err: &(dyn std::error::Error + 'static)) -> Failure {
        Failure {
            message: format!("metadata store: {context}: {}", chain(err)),
            exhausted: crate::error::exhausts_resources(err),
        }
    }
}

/// Called once the batch a job ran in has committed (`None`) or failed.
type Finish = Box<dyn FnOnce(Option<&Failure>) + Send>;
/// One write, run inside a shared transaction by the committer thread (or told why there is
/// none).
type Job = Box<
    dyn FnOnce(std::result::Result<&redb::WriteTransaction, &Failure>) -> (bool, Finish) + Send,
>;

/// Most writes committed by one fsync.
const MAX_BATCH: usize = 256;

/// A change under way, from [`Store::enter`].
pub struct Change(Arc<AtomicUsize>);

impl Drop for Change {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// The writes waiting for a transaction, and who is writing one.
struct Queue {
    state: Mutex<QueueState>,
    /// Signals the committer thread: jobs are waiting and nobody is writing, or closing.
    more: Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// A batch is being written, by the committer thread or by a caller in place.
    writing: bool,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding the lock cannot leave the queue half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next queued job for the batch being written.
    fn pop(&self) -> Option<Job> {
        self.lock().jobs.pop_front()
    }

    /// Ends a batch; wakes the committer if writes queued up meanwhile (or it must exit).
    fn done(&self) {
        let mut state = self.lock();
        state.writing = false;
        if !state.jobs.is_empty() || state.closed {
            self.more.notify_one();
        }
    }
}

/// Group commit. Writes that arrive while a batch is being written queue up; the committer
/// thread takes every queued write, runs them in order in one transaction, commits once, and
/// only then answers each of them: concurrent writers share an fsync, none is acknowledged
/// before it is durable. A write that finds nobody writing and nobody waiting writes its batch
/// of one itself, in place (see [`Store::write`]); the thread is for writes that must wait.
fn committer(handle: Arc<Handle>, queue: Arc<Queue>) {
    loop {
        let first = {
            let mut state = queue.lock();
            loop {
                if !state.writing {
                    if let Some(job) = state.jobs.pop_front() {
                        state.writing = true;
                        break job;
                    }
                    if state.closed {
                        return;
                    }
                }
                state = queue.more.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        };
        write_contained(&handle, first, || queue.pop());
        queue.done();
    }
}

/// [`write_batch`], surviving a panic inside it (redb asserts on some damaged files): the
/// batch's requests fail (their answers are dropped), the database is reopened, and the
/// writer - the committer thread or a request's own thread - stays usable.
fn write_contained(handle: &Handle, first: Job, next: impl FnMut() -> Option<Job>) {
    let wrote = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_batch(handle, first, next)
    }));
    if wrote.is_err() {
        tracing::error!("the store panicked while writing; that batch's requests failed");
        reopen(handle);
    }
}

/// Writes one batch: `first`, then whatever `next` yields (up to [`MAX_BATCH`]), in one
/// transaction, then answers each job once the commit is durable or has failed.
///
/// A job that fails with a request error (NotFound…) must not have written anything: every
/// write below checks first and writes after, so such a job leaves the shared transaction as
/// it found it. A store error may leave a partial write, so it aborts the whole batch.
fn write_batch(handle: &Handle, first: Job, mut next: impl FnMut() -> Option<Job>) {
    let begun = handle.get().and_then(|db| {
        db.begin_write()
            .map_err(|e| Error::store("starting a transaction", e))
    });
    let tx = match begun {
        Ok(tx) => tx,
        Err(e) => {
            let failure = Failure::new("starting a transaction", &e);
            let (_, finish) = first(Err(&failure));
            finish(Some(&failure));
            reopen(handle);
            return;
        }
    };
    let mut finishes = Vec::new();
    let mut poisoned = false;
    let (ok, finish) = first(Ok(&tx));
    poisoned |= !ok;
    finishes.push(finish);
    while finishes.len() < MAX_BATCH {
        let Some(job) = next() else { break };
        let (ok, finish) = job(Ok(&tx));
        poisoned |= !ok;
        finishes.push(finish);
    }
    let outcome = if poisoned {
        let _ = tx.abort();
        Some(Failure {
            message: "metadata store: a write in the same batch failed; nothing was written".into(),
            exhausted: false,
        })
    } else {
        let started = std::time::Instant::now();
        let committed = tx.commit();
        crate::metrics::global().store_commit(started.elapsed());
        committed.err().map(|e| Failure::new("committing", &e))
    };
    let failed = outcome.is_some();
    for finish in finishes {
        finish(outcome.as_ref());
    }
    if failed {
        reopen(handle);
    }
}

fn reopen(handle: &Handle) {
    match handle.reopen() {
        Ok(()) => {
            tracing::warn!(path = %handle.path.display(), "store reopened after a failed write")
        }
        Err(e) => {
            tracing::error!(path = %handle.path.display(), error = %e, "store cannot be reopened; writes fail until it can")
        }
    }
}

use record::{decode, encode, view};
pub use record::{Labels, RecordView};

/// Rewrites every schema-1 (JSON) record in schema 2. Reads and decodes them all before writing
/// any, so that an unreadable record fails the migration with nothing changed.
fn migrate_v1(tx: &redb::WriteTransaction) -> Result<usize> {
    let mut table = tx.open_table(SNAPSHOTS)?;
    let mut records = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let key = k.value().to_string();
        let record = record::decode_v1(&key, v.value())?;
        records.push((key, record));
    }
    for (key, record) in &records {
        table.insert(key.as_str(), encode(record).as_slice())?;
    }
    Ok(records.len())
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
        let db = Arc::new(Handle {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            read_only,
        });
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            more: Condvar::new(),
        });
        let (writer, jobs) = (Arc::clone(&db), Arc::clone(&queue));
        let thread = std::thread::Builder::new()
            .name("lamina-commit".into())
            .spawn(move || committer(writer, jobs))
            .map_err(|e| Error::Internal(format!("starting the store's committer thread: {e}")))?;
        let store = Store {
            db,
            queue,
            changes: Arc::new(AtomicUsize::new(0)),
            committer: Some(thread),
            counts: Arc::default(),
        };
        // Called outside the async runtime (start-up, tools), so waiting here blocks nobody.
        futures::executor::block_on(store.write("initialising tables", |tx| {
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
                    let migrated = migrate_v1(tx)?;
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
        let mut counts = [0u64; 3];
        store.each_view(|_, record| {
            counts[record.kind as usize] += 1;
            true
        })?;
        for (kind, n) in [Kind::View, Kind::Active, Kind::Committed]
            .into_iter()
            .zip(counts)
        {
            store.counts.add(kind, n as i64);
        }
        Ok(store)
    }

    /// Runs `f` in a write transaction, shared with other writes queued meanwhile, and returns
    /// its result once that transaction is durably committed. If `f` fails with a request
    /// error it must not have written anything (check first, then write).
    ///
    /// The job is written or queued when this is called, not when the future is first polled,
    /// and it runs whether or not anybody still waits for its answer. A queued job's answer
    /// comes back on a oneshot channel, so an async caller waits without holding a thread; a
    /// job written in place holds its caller's thread for the fsync (one caller at a time).
    fn write<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T> + Send + 'static,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        self.write_then(what, f, |_| {})
    }

    /// [`Store::write`], calling `committed` with the result once it is durable (whether or not
    /// anybody still waits for the answer): for what must follow the store exactly, the counts.
    fn write_then<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T> + Send + 'static,
        committed: impl FnOnce(&T) + Send + 'static,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |tx| {
            let result = match tx {
                Ok(tx) => f(tx).map_err(|e| e.in_context(what)),
                Err(failure) => Err(failure.to_error(what)),
            };
            let ok = !matches!(result, Err(Error::Store { .. }));
            let finish: Finish = Box::new(move |failed: Option<&Failure>| {
                let out = match (failed, result) {
                    (None, Ok(v)) => {
                        committed(&v);
                        Ok(v)
                    }
                    (None, Err(e)) => Err(e),
                    // This job's own store error: the cause of the failure, said precisely.
                    (Some(_), Err(e @ Error::Store { .. })) => Err(e),
                    // A request error (AlreadyExists, NotFound…) was decided against the
                    // batch's uncommitted writes, which are now undone: it may be false
                    // ("exists" of a key whose creation just failed). Only the failure is true.
                    (Some(failure), _) => Err(failure.to_error(what)),
                };
                let _ = reply.send(out);
            });
            (ok, finish)
        });
        let mut state = self.queue.lock();
        let sent = if state.closed {
            false
        } else if !state.writing && state.jobs.is_empty() && self.changes.load(Relaxed) <= 1 {
            // Nobody to share an fsync with, and no other change under way that could come
            // to: write now, on this thread, rather than pay two thread wake-ups (to the
            // committer and back) on top of the fsync. With company, the write queues, so
            // that the runtime thread stays free and concurrent writes share the committer's
            // fsync. At most one caller ever blocks here.
            state.writing = true;
            drop(state);
            write_contained(&self.db, job, || None);
            self.queue.done();
            true
        } else {
            state.jobs.push_back(job);
            if !state.writing {
                self.queue.more.notify_one();
            }
            true
        };
        async move {
            if !sent {
                return Err(Error::Internal(format!("{what}: the store is closed")));
            }
            answer.await.map_err(|_| {
                Error::Internal(format!(
                    "{what}: the store failed while writing (see lamina's log); retry"
                ))
            })?
        }
    }

    /// Announces a change (a request that will write) until the guard is dropped. A write
    /// made while no other change is announced commits in place; see [`Store::write`].
    pub fn enter(&self) -> Change {
        self.changes.fetch_add(1, Relaxed);
        Change(Arc::clone(&self.changes))
    }

    fn read<T>(
        &self,
        what: &str,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T>,
    ) -> Result<T> {
        let db = self.db.get()?;
        let tx = db.begin_read().map_err(|e| Error::store(what, e))?;
        f(&tx).map_err(|e| e.in_context(what))
    }

    pub fn get(&self, key: &str) -> Result<Record> {
        self.read("reading a snapshot", |tx| {
            lookup(&tx.open_table(SNAPSHOTS)?, key)
        })
    }

    /// Records a new active snapshot or view under a fresh ID. The caller creates its
    /// directories afterwards: a directory never exists before the record that owns it.
    ///
    /// [`Store::create_checked`] without a check of the chain: for tools and tests that make
    /// records directly.
    pub fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        now: SystemTime,
    ) -> impl Future<Output = Result<Record>> + Send + 'static {
        self.create_checked(key, parent, kind, labels, now, |_| Ok(()))
    }

    /// [`Store::create`], refused with `check_chain`'s error if it fails on the new snapshot's
    /// ancestors (their IDs, nearest first). Checked inside the write transaction, against the
    /// parent as it is when the snapshot is recorded: a parent removed and committed again
    /// under the same key meanwhile may have another chain.
    pub fn create_checked(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        now: SystemTime,
        check_chain: impl FnOnce(&[u64]) -> Result<()> + Send + 'static,
    ) -> impl Future<Output = Result<Record>> + Send + 'static {
        let (key, parent) = (key.to_string(), parent.to_string());
        let counts = Arc::clone(&self.counts);
        let count = move |r: &Record| counts.add(r.kind, 1);
        self.write_then(
            "creating a snapshot",
            move |tx| {
                let (key, parent) = (key.as_str(), parent.as_str());
                let mut snapshots = tx.open_table(SNAPSHOTS)?;
                if snapshots.get(key)?.is_some() {
                    return Err(Error::already_exists(key));
                }
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
        let counts = Arc::clone(&self.counts);
        let count = move |_: &Record| {
            counts.add(Kind::Active, -1);
            counts.add(Kind::Committed, 1);
        };
        self.write_then(
            "committing a snapshot",
            move |tx| {
                let (key, name) = (key.as_str(), name.as_str());
                let mut snapshots = tx.open_table(SNAPSHOTS)?;
                if snapshots.get(name)?.is_some() {
                    return Err(Error::already_exists(name));
                }
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
        let counts = Arc::clone(&self.counts);
        let count = move |r: &Record| counts.add(r.kind, -1);
        self.write_then(
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
        self.write("updating a snapshot", move |tx| {
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
        self.read("listing snapshots", |tx| {
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
        self.read("listing snapshots", |tx| {
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
        self.read("listing snapshots", |tx| {
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
        self.read("listing snapshots", |tx| {
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
        self.read("reading the ID counter", |tx| {
            next_id(&tx.open_table(META)?)
        })
    }

    /// Makes the next ID at least `at_least`: after directories the store did not know were
    /// deleted, their IDs are still never handed out again.
    pub fn raise_next_id(
        &self,
        at_least: u64,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        self.write("raising the ID counter", move |tx| {
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

/// Opens the database with `open`, turning a panic inside redb (it asserts on some damaged
/// files, e.g. one truncated below its recorded length) into a Corrupt error instead of a crash.
fn open_guarded(
    path: &Path,
    open: impl FnOnce() -> std::result::Result<Database, redb::DatabaseError>,
) -> Result<std::result::Result<Database, redb::DatabaseError>> {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open));
    std::panic::set_hook(quiet);
    opened.map_err(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown damage".into());
        Error::Corrupt(format!(
            "store {} is damaged ({why}). lamina will not start empty over existing snapshots: \
             restore the file from a backup, or move it aside to start over (the snapshots \
             under {} are then lost to lamina and `lamina fsck --repair --delete-unknown` \
             removes them)",
            path.display(),
            path.parent().unwrap_or(path).join("snapshots").display()
        ))
    })
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
        let a = wait(s.create("a", "", Kind::Active, BTreeMap::new(), now())).unwrap();
        wait(s.commit("a", a.id, "A", BTreeMap::new(), Usage::default(), now())).unwrap();
        let b = wait(s.create("b", "A", Kind::Active, BTreeMap::new(), now())).unwrap();
        assert_eq!(b.parent_ids, vec![a.id]);
        wait(s.commit("b", b.id, "B", BTreeMap::new(), Usage::default(), now())).unwrap();
        let c = wait(s.create("c", "B", Kind::View, BTreeMap::new(), now())).unwrap();
        assert_eq!(c.parent_ids, vec![b.id, a.id]);
        wait(s.remove("c")).unwrap();
        let c2 = wait(s.create("c", "B", Kind::View, BTreeMap::new(), now())).unwrap();
        assert!(c2.id > c.id, "a removed ID must not be handed out again");
    }

    #[test]
    fn a_panic_while_writing_fails_its_request_and_nothing_else() {
        let (_d, s) = store();
        let boom = wait(s.write("injected panic", |_| -> Result<()> {
            panic!("injected panic inside a write")
        }));
        assert!(matches!(boom, Err(Error::Internal(_))), "{boom:?}");
        // Written in place (no other change under way) and through the committer thread.
        let a = wait(s.create("a", "", Kind::Active, BTreeMap::new(), now())).unwrap();
        let _busy = s.enter();
        let _other = s.enter();
        let boom = wait(s.write("injected panic", |_| -> Result<()> {
            panic!("injected panic inside a queued write")
        }));
        assert!(matches!(boom, Err(Error::Internal(_))), "{boom:?}");
        let b = wait(s.create("b", "", Kind::Active, BTreeMap::new(), now())).unwrap();
        assert_eq!(s.get("a").unwrap(), a);
        assert_eq!(s.get("b").unwrap(), b);
    }

    #[test]
    fn a_store_file_deleted_while_open_is_not_recreated_empty() {
        let (d, s) = store();
        wait(s.create("a", "", Kind::Active, BTreeMap::new(), now())).unwrap();
        let path = d.path().join("db");
        std::fs::remove_file(&path).unwrap();
        // A failed write makes the store reopen its file.
        let boom = wait(s.write("injected panic", |_| -> Result<()> {
            panic!("injected panic inside a write")
        }));
        assert!(boom.is_err());
        // An empty store would hand out ID 1 again, and Cleanup would then take every
        // existing snapshot's directory for an orphan.
        let again = wait(s.create("b", "", Kind::Active, BTreeMap::new(), now()));
        assert!(again.is_err(), "{again:?}");
        assert!(!path.exists(), "no new, empty store file");
    }

    #[test]
    fn a_conditional_remove_leaves_a_key_that_changed_hands() {
        let (_d, s) = store();
        let first = wait(s.create("k", "", Kind::Active, BTreeMap::new(), now())).unwrap();
        wait(s.remove("k")).unwrap();
        let second = wait(s.create("k", "", Kind::Active, BTreeMap::new(), now())).unwrap();
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
        let a = wait(s.create("a", "", Kind::Active, BTreeMap::new(), now())).unwrap();
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
        let boom = wait(s.write("injected panic", |_| -> Result<()> {
            panic!("injected panic inside a write")
        }));
        assert!(boom.is_err());
        let busy = s.get("a");
        assert!(matches!(busy, Err(Error::Unavailable(_))), "{busy:?}");
        release.send(()).unwrap();
        lister.join().unwrap().unwrap();
        // Once the read is over, the next request opens the store again, with everything.
        assert_eq!(s.get("a").unwrap(), a);
        wait(s.create("b", "", Kind::Active, BTreeMap::new(), now())).unwrap();
    }

    #[test]
    fn a_failed_batch_answers_no_request_error_decided_on_its_undone_writes() {
        let (_d, s) = store();
        // Two changes under way: writes queue for the committer and share its batches.
        let _busy = s.enter();
        let _other = s.enter();
        let (inside, is_inside) = std::sync::mpsc::channel();
        let (go, wait_go) = std::sync::mpsc::channel::<()>();
        let holder = s.write("holding the batch open", move |_| -> Result<()> {
            inside.send(()).unwrap();
            wait_go.recv().unwrap();
            Ok(())
        });
        is_inside.recv().unwrap();
        // Queued while the committer is inside the batch: they join it.
        let first = s.create("k", "", Kind::Active, BTreeMap::new(), now());
        let second = s.create("k", "", Kind::Active, BTreeMap::new(), now());
        let broken = s.write("injected", |_| -> Result<()> {
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
        let a = wait(s.create("a", "", Kind::Active, BTreeMap::new(), now())).unwrap();
        wait(s.commit("a", a.id, "A", BTreeMap::new(), Usage::default(), now())).unwrap();
        // A sibling key that sorts right after the parent must not count as a child.
        wait(s.create("A\0", "", Kind::View, BTreeMap::new(), now())).unwrap();
        wait(s.remove("A\0")).unwrap();
        wait(s.create("child", "A", Kind::Active, BTreeMap::new(), now())).unwrap();
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
        let a = wait(s.create("a", "", Kind::Active, BTreeMap::new(), now())).unwrap();
        assert!(matches!(
            wait(s.create("a", "", Kind::View, BTreeMap::new(), now())),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            wait(s.create("b", "a", Kind::View, BTreeMap::new(), now())),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            wait(s.create("b", "nope", Kind::View, BTreeMap::new(), now())),
            Err(Error::NotFound(_))
        ));
        let v = wait(s.create("v", "", Kind::View, BTreeMap::new(), now())).unwrap();
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
            wait(s.create(
                "a",
                "",
                Kind::Active,
                BTreeMap::from([("l".into(), "v".into())]),
                now(),
            ))
            .unwrap()
        };
        let s = Store::open(&path).unwrap();
        assert_eq!(s.get("a").unwrap(), a);
        let b = wait(s.create("b", "", Kind::Active, BTreeMap::new(), now())).unwrap();
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
        let c = wait(s.create("c", "a", Kind::View, BTreeMap::new(), now())).unwrap();
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
        wait(
            Store::open(&path)
                .unwrap()
                .create("a", "", Kind::Active, BTreeMap::new(), now()),
        )
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
