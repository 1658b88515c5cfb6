//! Group commit: every write of the store runs here, in a transaction shared with the writes
//! queued meanwhile, and is answered only once that transaction is durable.
//!
//! Writes that arrive while a batch is being written queue up; the committer thread takes
//! every queued write, runs them in order in one transaction, commits once (one fsync), and
//! only then answers each of them. A write that finds nobody writing, nobody waiting and no
//! other change under way (see [`Writer::enter`]) writes its batch of one itself, in place:
//! that decision is made here only.
//!
//! Also here: the open database, which is replaced after a failed write (redb refuses every
//! later write on an instance that saw an I/O error).

use std::{
    collections::VecDeque,
    future::Future,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Condvar, Mutex, RwLock,
    },
};

use redb::Database;
use tokio::sync::oneshot;

use crate::error::{chain, Error, Result};

/// Runs the store's transactions: reads at once, writes through group commit.
pub(super) struct Writer {
    db: Arc<Handle>,
    /// Writes waiting for a transaction (see [`Writer::write`]).
    queue: Arc<Queue>,
    /// Changes under way (see [`Writer::enter`]).
    changes: Arc<AtomicUsize>,
    committer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
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

impl Writer {
    /// Starts the committer thread over `db`, opened from `path` (`read_only`: see
    /// `Store::open_read_only`; such a database is never reopened from the file).
    pub(super) fn start(path: &Path, db: Database, read_only: bool) -> Result<Writer> {
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
        Ok(Writer {
            db,
            queue,
            changes: Arc::new(AtomicUsize::new(0)),
            committer: Some(thread),
        })
    }

    /// Runs `f` in a write transaction, shared with other writes queued meanwhile, and returns
    /// its result once that transaction is durably committed. If `f` fails with a request
    /// error it must not have written anything (check first, then write).
    ///
    /// The job is written or queued when this is called, not when the future is first polled,
    /// and it runs whether or not anybody still waits for its answer. A queued job's answer
    /// comes back on a oneshot channel, so an async caller waits without holding a thread; a
    /// job written in place holds its caller's thread for the fsync (one caller at a time).
    pub(super) fn write<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T> + Send + 'static,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        self.write_then(what, f, |_| {})
    }

    /// [`Writer::write`], calling `committed` with the result once it is durable (whether or not
    /// anybody still waits for the answer): for what must follow the store exactly, the counts.
    pub(super) fn write_then<T: Send + 'static>(
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

    /// Announces a change: a request that will write, from its first read until its answer.
    /// A write made while no other change is announced commits in place (see
    /// [`Writer::write_then`]): the announcement is what that decision counts.
    pub(super) fn enter(&self) -> Change {
        self.changes.fetch_add(1, Relaxed);
        Change(Arc::clone(&self.changes))
    }

    pub(super) fn read<T>(
        &self,
        what: &str,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T>,
    ) -> Result<T> {
        let db = self.db.get()?;
        let tx = db.begin_read().map_err(|e| Error::store(what, e))?;
        f(&tx).map_err(|e| e.in_context(what))
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

/// A change under way, from [`Store::enter`]; see [`Writer::enter`].
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
/// of one itself, in place (see [`Writer::write_then`]); the thread is for writes that must wait.
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

/// Opens the database with `open`, turning a panic inside redb (it asserts on some damaged
/// files, e.g. one truncated below its recorded length) into a Corrupt error instead of a crash.
pub(super) fn open_guarded(
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
