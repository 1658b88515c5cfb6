//! The snapshotter's rules: what each request may do to which snapshot, and in what order the
//! store and the directories change so that a crash at any instant leaves a state start-up
//! recovery can finish.
//!
//! Ordering, the invariant behind crash safety: a snapshot's record (and with it the bump of the
//! never-reused ID counter) is committed durably *before* its directory is created, and deleted
//! *before* its directory is deleted. So a directory always has, or had, a record; a leftover
//! directory's ID is never handed out again; and a record without its directories is a creation
//! that never answered, which recovery completes.
//!
//! Where work runs: reads of the store and the few mkdirs of a creation run on the runtime
//! worker that received the request (microseconds: cheaper than a hand-off to another thread);
//! writes wait for the store's committer thread without holding a thread; work of unbounded
//! length (walking a tree, reading the whole store) runs on tokio's blocking pool, and deleting
//! trees on the deleter's thread (see `dirs/deleter.rs`). `checks.rs` holds the limits a
//! request must keep; `unabandoned.rs` makes a change finish when its client hangs up.

mod apply;
mod checks;
pub mod filter;
pub mod fsck;
pub mod idmap;
mod unabandoned;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, OnceLock,
    },
    time::{Instant, SystemTime},
};

use tracing::{error, info, warn, Instrument, Span};

use crate::{
    dirs::{deleter::Deleter, spares::Spares, DirEntry, Layout},
    error::{chain, Error, Result},
    metrics,
    overlay::{self, usage, Dirs, Mount, Usage},
    store::{Labels, Record, RecordView, Store},
};
pub use apply::LayerTarget;
pub(crate) use checks::shorten;
use checks::{check_depth, check_key, check_labels, check_labels_total};
pub use checks::{MAX_ANCESTORS, MAX_KEY_BYTES, MAX_LABELS_TOTAL_BYTES, MAX_LABEL_BYTES};
use filter::{Fields, Filter};
use unabandoned::Unabandoned;

/// A snapshot's kind, as the store records it: what the rules below depend on most.
pub use crate::store::Kind;

/// The label that reports a snapshot's upper directory when `upperdir_label` is on.
pub const UPPERDIR_LABEL: &str = "containerd.io/snapshot/overlay.upperdir";

/// Threads of tokio's blocking pool (main.rs builds the runtime with this many), where work of
/// unbounded length runs: usage walks too long to make in place, Cleanup, synchronous
/// removes, and Lists.
pub const BLOCKING_THREADS: usize = 32;
/// Lists that run at once; more wait for their turn without holding a thread. A List holds a
/// blocking-pool thread and a read transaction for as long as its reader takes to read it,
/// and a reader that stops reading holds them until the idle deadline ends the stream. Were
/// Lists to take the whole pool, Commit's walk and Cleanup would queue behind them; at most a
/// quarter of it, they always find a thread. containerd lists rarely (its garbage collector,
/// one List at a time), so Lists seldom wait even for each other.
const MAX_LISTS: usize = 8;
const _: () = assert!(MAX_LISTS <= BLOCKING_THREADS / 4);

/// What Stat, Update and List report of a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub name: String,
    pub parent: String,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

/// A snapshot as List hands it out, borrowed from the store's read for one call of `each`: List
/// reads every snapshot, and an owned [`Info`] for each was most of what it cost.
pub struct Listed<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: Kind,
    pub created: SystemTime,
    pub updated: SystemTime,
    labels: Labels<'a>,
    /// The upperdir label's value, when `upperdir_label` is on.
    upperdir: Option<String>,
}

impl Listed<'_> {
    /// The labels as Stat reports them: the stored ones, with the upperdir label (when on) in
    /// place of any stored label of that name.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        let upperdir = self.upperdir.as_deref();
        self.labels
            .iter()
            .filter(move |(k, _)| upperdir.is_none() || *k != UPPERDIR_LABEL)
            .chain(upperdir.map(|v| (UPPERDIR_LABEL, v)))
    }
}

/// Where [`Snapshotter::list`] hands the snapshots it reads, on the listing's thread.
pub trait ListSink: Send + 'static {
    /// Takes one snapshot. `Ok(false)` stops the listing (nobody reads it any more); an error
    /// ends it with that error.
    fn push(&mut self, l: &Listed<'_>) -> Result<bool>;

    /// Called once after the last snapshot, unless the listing stopped early.
    fn finish(&mut self) -> Result<()>;
}

/// Settings the rules depend on.
#[derive(Debug, Clone)]
pub struct Options {
    /// Options appended to every overlay mount, already resolved against the host.
    pub mount_options: Vec<String>,
    pub sync_remove: bool,
    pub upperdir_label: bool,
    /// Commit makes the layer durable (see [`Layout::sync_snapshot`]) before it answers.
    pub durable_commit: bool,
    /// Put a user-namespaced snapshot's ID mappings on its mounts (`uidmap=`/`gidmap=`, see
    /// [`idmap`]), for containerd to ID-map its lowers: the kernel can mount overlays on
    /// ID-mapped lowers. Either way the mappings are checked and the snapshot's `fs` belongs
    /// to the container's root, as in containerd's overlayfs (where containerd copies and
    /// chowns the layers itself instead, the parent already belongs to that root).
    pub remap_ids: bool,
}

impl Default for Options {
    /// What the configuration's defaults give, with no mount options of the host's.
    fn default() -> Self {
        Options {
            mount_options: Vec::new(),
            sync_remove: false,
            upperdir_label: false,
            durable_commit: true,
            remap_ids: false,
        }
    }
}

/// Snapshots by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub active: u64,
    pub views: u64,
    pub committed: u64,
}

/// What Cleanup (or start-up recovery) did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    pub directories: u64,
}

/// What start-up recovery did before lamina serves, and the check it left running.
#[derive(Debug)]
pub struct Recovered {
    pub deleted: Deleted,
    /// Active snapshots and views checked before serving.
    pub unsettled: u64,
    /// The check of the committed snapshots, running while lamina serves.
    pub committed: std::thread::JoinHandle<()>,
}

/// What start-up recovery repairs: what is safe, never what the store does not know.
const RECOVERY: fsck::Repair = fsck::Repair {
    safe: true,
    unknown: false,
};

/// Logs what start-up recovery found; returns the orphans it queued.
fn log_recovery(report: &fsck::Report) -> Deleted {
    let mut deleted = Deleted::default();
    for f in &report.findings {
        let path = f.path.display();
        match (f.kind, f.repaired) {
            (fsck::Problem::Orphan, true) => deleted.directories += 1,
            (fsck::Problem::Foreign, _) => warn!(%path, "not created by lamina; left alone"),
            (kind, true) => {
                warn!(key = ?f.key, %path, kind = kind.as_str(), detail = %f.detail, action = %f.action, "recovered")
            }
            (kind, false) => {
                error!(key = ?f.key, %path, kind = kind.as_str(), detail = %f.detail, action = %f.action, "cannot recover")
            }
        }
    }
    deleted
}

pub struct Snapshotter {
    store: Store,
    layout: Layout,
    options: Options,
    closing: AtomicBool,
    /// Ready-made directories for creations; only a serving lamina keeps them.
    spares: OnceLock<Spares>,
    /// Deletes removed snapshots' directories in the background; only a serving lamina has
    /// one (without it, they wait for Cleanup).
    deleter: OnceLock<Deleter>,
    /// Turns to run a List (see [`MAX_LISTS`]).
    lists: Arc<tokio::sync::Semaphore>,
}

impl Snapshotter {
    /// Opens the store under the layout's root, for serving. Call [`Snapshotter::recover`]
    /// before serving.
    ///
    /// Refuses with [`Error::StoreBehind`] when `snapshots/` holds directories whose IDs the
    /// store never handed out: the store is missing, or older than they are (put back from a
    /// backup). A record always commits before its directory is made, so that cannot happen
    /// otherwise; and starting would give those IDs to new snapshots (whose mounts would show
    /// the old layers' files) and delete the directories as orphans. Hence, whenever lamina
    /// serves, its ID counter is above every ID on disk.
    pub fn open(layout: Layout, options: Options) -> Result<Arc<Snapshotter>> {
        layout.init()?;
        let ids: Vec<u64> = layout
            .list()?
            .into_iter()
            .filter_map(|e| match e {
                DirEntry::Id(id) => Some(id),
                DirEntry::Foreign(_) => None,
            })
            .collect();
        let db = layout.db_path();
        let store = Store::open_existing(&db)?;
        let next_id = match &store {
            Some(store) => store.next_id()?,
            None => 1,
        };
        let unknown: Vec<u64> = ids.into_iter().filter(|&id| id >= next_id).collect();
        if let Some(&highest) = unknown.iter().max() {
            return Err(Error::StoreBehind {
                store: db,
                missing: store.is_none(),
                unknown: unknown.len(),
                highest,
                next_id,
            });
        }
        let store = match store {
            Some(store) => store,
            None => Store::open(&db)?,
        };
        Ok(Snapshotter::with(layout, store, options))
    }

    /// Opens a stopped daemon's root for `lamina fsck`, without the check of
    /// [`Snapshotter::open`] (fsck is how an operator finds out what it refused). With
    /// `writable` false nothing is changed, nor opened for writing: a missing store reads as
    /// an empty one.
    pub fn open_offline(layout: Layout, writable: bool) -> Result<Arc<Snapshotter>> {
        let store = if writable {
            layout.init()?;
            Store::open(&layout.db_path())?
        } else {
            Store::open_read_only(&layout.db_path())?
        };
        Ok(Snapshotter::with(layout, store, Options::default()))
    }

    fn with(layout: Layout, store: Store, options: Options) -> Arc<Snapshotter> {
        Arc::new(Snapshotter {
            store,
            layout,
            options,
            closing: AtomicBool::new(false),
            spares: OnceLock::new(),
            deleter: OnceLock::new(),
            lists: Arc::new(tokio::sync::Semaphore::new(MAX_LISTS)),
        })
    }

    /// Starts the background threads of a serving lamina: ready-made directories for
    /// creations (see [`Spares`]) and the deletion of removed snapshots' directories (see
    /// [`Deleter`]). After [`Snapshotter::recover`]; offline tools do without.
    pub fn start_background(&self) -> Result<()> {
        if self.spares.get().is_none() {
            let _ = self.spares.set(Spares::start(self.layout.clone())?);
        }
        if self.deleter.get().is_none() {
            let layout = self.layout.clone();
            let report = Box::new(move |id: u64, result: &Result<u64>| {
                report_deleted(&layout, id, result, "no snapshot owns it")
            });
            let _ = self
                .deleter
                .set(Deleter::start(self.layout.clone(), report)?);
        }
        Ok(())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Snapshots by kind, as the writes keep them: free to call (metrics scrapes, status).
    pub fn counts(&self) -> Counts {
        let (active, views, committed) = self.store.counts();
        Counts {
            active,
            views,
            committed,
        }
    }

    /// Refuses new requests from now on (they get Unavailable); requests already running finish.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    fn admit(&self) -> Result<()> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::shutting_down());
        }
        Ok(())
    }

    /// Runs `f` on the blocking pool inside the caller's span; refused once closing. For work
    /// of unbounded length: walking or deleting trees, reading the whole store.
    pub async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> Result<T> + Send + 'static,
    {
        self.admit()?;
        self.blocking(f).await
    }

    /// [`Snapshotter::run`] for a step of a request already admitted: a Commit that began
    /// before lamina started closing must finish (its walk and sync included) within the
    /// drain, not fail halfway.
    async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> Result<T> + Send + 'static,
    {
        let this = Arc::clone(self);
        let span = Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| f(&this)))
            .await
            .map_err(|e| Error::Internal(format!("request task failed: {e}")))?
    }

    /// Runs a change where the request arrived, and makes sure that once begun it finishes:
    /// if the request is dropped midway (the client hung up), the rest runs as a task of its
    /// own. A Prepare abandoned between its record and its directories must not leave a record
    /// whose mounts point nowhere. Refused once closing.
    async fn change<T, F>(self: &Arc<Self>, f: impl FnOnce(Arc<Snapshotter>) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        self.admit()?;
        let change = self.store.enter();
        let work = f(Arc::clone(self));
        Unabandoned::new(
            async move {
                let done = work.await;
                drop(change);
                done
            }
            .instrument(Span::current()),
        )
        .await
    }

    /// Prepare (`kind` Active) or View (`kind` View): creates snapshot `key` on top of
    /// committed `parent` (or on nothing when `parent` is empty) and answers its mounts.
    ///
    /// An active snapshot is writable: a writable bind of its own `fs` without a parent, else
    /// one overlay whose upper directory is its `fs` and whose lowers are its ancestors' `fs`,
    /// nearest first (see `overlay::active_mounts`). A view is read-only, with no work
    /// directory, and its contents never change: a read-only bind of its own empty `fs` without
    /// a parent, of the parent's `fs` with one, else an overlay of the ancestors alone (see
    /// `overlay::view_mounts`). Labelled with a user-namespaced container's ID mappings (see
    /// [`idmap`]), its `fs` belongs to the container's root as the host sees it, and (with
    /// [`Options::remap_ids`]) each of its mounts starts with `uidmap=` and `gidmap=`.
    ///
    /// Errors: `key` taken by any snapshot → AlreadyExists; `parent` missing → NotFound;
    /// `parent` not committed → InvalidArgument; more ancestors than overlayfs stacks →
    /// FailedPrecondition; an empty or oversized key or labels → InvalidArgument; ID-mapping
    /// labels that are malformed or come alone → InvalidArgument;
    /// `kind` Committed → InvalidArgument (only Commit makes one). On any error nothing is left behind
    /// and the key can be used again. Once it answers, the snapshot is durable in the store and
    /// its directories exist.
    pub async fn new_snapshot(
        self: &Arc<Self>,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if kind == Kind::Committed {
            return Err(Error::invalid(
                "a committed snapshot is made by Commit, not created",
            ));
        }
        self.change(|s| async move { s.create_and_finish(key, parent, labels, kind).await })
            .await
    }

    // Reads (Mounts, Stat, the lookup of Usage) are served where the request arrived: a read
    // transaction is a few microseconds from redb's cache, less than handing the request to
    // another thread and back.

    /// The mounts Prepare or View answered for `key`, again. Changes nothing.
    ///
    /// Errors: unknown → NotFound; committed → FailedPrecondition (a committed snapshot is
    /// mounted only as a lower of its children).
    pub async fn mounts(self: &Arc<Self>, key: String) -> Result<Vec<Mount>> {
        self.admit()?;
        check_key("key", &key)?;
        let record = self.store.get(&key)?;
        if record.kind == Kind::Committed {
            return Err(Error::precondition(format!(
                "cannot get mounts of committed snapshot {key:?}: prepare an active \
                 snapshot or a view with it as parent"
            )));
        }
        Ok(self.mounts_of(&record))
    }

    /// Turns active snapshot `key` into committed snapshot `name`, with `labels` (which
    /// replace the active snapshot's) and the disk usage of its `fs` measured now. `key` is free
    /// again at once; `name` keeps `key`'s parent and directory, and can only be read from now
    /// on (as a parent). Unless `durable_commit` is off, the layer's data is on disk before the
    /// commit is recorded.
    ///
    /// Errors: `key` unknown → NotFound; `key` a view or committed → FailedPrecondition; `name`
    /// taken → AlreadyExists; `key` removed and prepared again while being measured →
    /// FailedPrecondition. On any error the active snapshot is as it was.
    pub async fn commit(
        self: &Arc<Self>,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        self.change(|s| async move {
            check_key("key", &key)?;
            check_key("name", &name)?;
            let labels = check_labels(labels)?;
            let record = s.store.get(&key)?;
            // The walk runs outside any store transaction so that other requests go on; the
            // store re-checks at commit that the snapshot is still the one measured.
            let usage = if record.kind == Kind::Active {
                let usage = s.measure(record.id).await?;
                // containerd syncs nothing it writes into a layer: without this, a power cut
                // after the answer can leave the committed layer's files empty or missing.
                // Before the store records the commit, so that a recorded layer is a durable
                // one; after the walk, which only reads.
                if s.options.durable_commit {
                    let id = record.id;
                    s.blocking(move |s| s.layout.sync_snapshot(id)).await?;
                }
                usage
            } else {
                Usage::default()
            };
            let committed = s
                .store
                .commit(&key, record.id, &name, labels, usage, SystemTime::now())
                .await?;
            info!(name = ?name, id = committed.id, size = usage.size, inodes = usage.inodes, "committed");
            Ok(())
        })
        .await
    }

    /// Removes snapshot `key` of any kind: its record goes durably before the answer, and the
    /// key is free at once; its directories are deleted before the answer with `sync_remove`,
    /// else in the background right after (a Cleanup waits for them).
    ///
    /// Errors: unknown → NotFound; a snapshot with children → FailedPrecondition (remove them
    /// first). A failure to delete the directories does not fail the Remove: they are orphans
    /// for Cleanup.
    pub async fn remove(self: &Arc<Self>, key: String) -> Result<()> {
        self.change(|s| async move {
            check_key("key", &key)?;
            let record = s.store.remove(&key).await?;
            // The record is gone, so the removal stands; a directory left behind is an orphan
            // that Cleanup or the next start-up deletes.
            let id = record.id;
            if s.options.sync_remove {
                let removed = s
                    .blocking(move |s| s.delete_now(vec![id], "removed"))
                    .await
                    .and_then(|mut r| r.pop().unwrap_or(Ok(0)));
                if let Err(e) = removed {
                    warn!(id, error = %chain(&e), "removed, but its directory stays until Cleanup");
                }
            } else if let Some(deleter) = s.deleter.get() {
                deleter.delete_later(id);
            }
            info!(id = record.id, "removed");
            Ok(())
        })
        .await
    }

    /// What snapshot `key` is: name, parent, kind, labels (with the upperdir label when
    /// `upperdir_label` is on), created and updated times. Changes nothing.
    ///
    /// Errors: unknown → NotFound.
    pub async fn stat(self: &Arc<Self>, key: String) -> Result<Info> {
        self.admit()?;
        check_key("key", &key)?;
        let record = self.store.get(&key)?;
        Ok(self.info(key, record))
    }

    /// Changes the labels of snapshot `key`, of any kind (the only field that can change), and
    /// answers what [`Snapshotter::stat`] would then. `paths` empty or `labels`: the labels
    /// become `labels`; `labels.<k>`: label k is set from `labels`, or deleted when absent or
    /// empty there. Updated becomes now; nothing else changes.
    ///
    /// Errors: unknown → NotFound (whatever the paths); a path other than those →
    /// InvalidArgument; labels over the limits, each or all together → InvalidArgument;
    /// ID-mapping labels left malformed or alone → InvalidArgument (Mounts reads them). On any
    /// error nothing changes.
    pub async fn update(
        self: &Arc<Self>,
        key: String,
        labels: HashMap<String, String>,
        paths: Vec<String>,
    ) -> Result<Info> {
        self.change(|s| async move {
            check_key("info.name", &key)?;
            let given = check_labels(labels)?;
            let paths = if paths.is_empty() {
                vec![String::from("labels")]
            } else {
                paths
            };
            // The snapshot is looked up first, so an unknown key is NotFound whatever the
            // paths say (as in containerd). The labels are changed in memory and written only
            // if every path is valid.
            let name = key.clone();
            let record = s
                .store
                .update_labels(&key, SystemTime::now(), move |labels| {
                    for path in &paths {
                        if path == "labels" {
                            labels.clone_from(&given);
                        } else if let Some(k) = path.strip_prefix("labels.") {
                            match given.get(k) {
                                Some(v) => labels.insert(k.to_string(), v.clone()),
                                None => labels.remove(k),
                            };
                        } else {
                            return Err(Error::invalid(format!(
                                "cannot update field {} of snapshot {name:?}: only \"labels\" \
                             and \"labels.<key>\" can be updated",
                                shorten(path)
                            )));
                        }
                    }
                    // Updates of single labels add up: the result must fit too.
                    check_labels_total(labels.iter())?;
                    // Mounts reads the ID mappings from the labels, as they are then.
                    idmap::from_labels(labels)?;
                    Ok(())
                })
                .await?;
            Ok(s.info(key, record))
        })
        .await
    }

    /// The disk space snapshot `key`'s own `fs` takes (unique inodes' blocks, and their count):
    /// measured now for an active snapshot, as measured at Commit for a committed one, zero for
    /// a view. Changes nothing.
    ///
    /// Errors: unknown → NotFound.
    pub async fn usage(self: &Arc<Self>, key: String) -> Result<Usage> {
        self.admit()?;
        check_key("key", &key)?;
        let record = self.store.get(&key)?;
        match record.kind {
            Kind::Active => self.measure(record.id).await,
            Kind::Committed => Ok(record.usage),
            Kind::View => Ok(Usage::default()),
        }
    }

    /// Disk usage of snapshot `id`'s `fs`: measured in place when the tree is small (most
    /// Commits of a freshly prepared snapshot), else on the blocking pool.
    async fn measure(self: &Arc<Self>, id: u64) -> Result<Usage> {
        /// Entries read in place before handing the walk over: about as long as a hand-off.
        const IN_PLACE: usize = 32;
        let fs = self.layout.fs(id);
        match usage::walk_up_to(&fs, IN_PLACE) {
            Ok(Some(usage)) => Ok(usage),
            Ok(None) => {
                self.blocking(move |s| {
                    let fs = s.layout.fs(id);
                    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
                    usage::walk_parallel(&fs, threads.min(4))
                        .map_err(|e| Error::io("measuring disk usage of", fs, e))
                })
                .await
            }
            Err(e) => Err(Error::io("measuring disk usage of", fs, e)),
        }
    }

    /// Hands every snapshot matching `filter` (containerd's filter language; a bad filter is
    /// InvalidArgument, from [`parse_filters`]) to `sink`, in key order, as Stat would report
    /// it, from one consistent read of the store: a snapshot created or removed meanwhile is
    /// either all in or all out. Stops when the sink says so or fails; changes nothing.
    ///
    /// Runs on the blocking pool, at most [`MAX_LISTS`] at once (the others wait for a turn,
    /// holding no thread); the sink may block (to wait for a slow reader) without holding up
    /// other requests, which meanwhile read and write as usual.
    pub async fn list(self: &Arc<Self>, filter: Filter, mut sink: impl ListSink) -> Result<()> {
        self.admit()?;
        // Owned, and moved into the listing: if the caller stops waiting, the turn still ends
        // only when the listing's thread is done.
        let turn = Arc::clone(&self.lists)
            .acquire_owned()
            .await
            .map_err(|_| Error::shutting_down())?;
        self.run(move |s| {
            let _turn = turn;
            let (mut stopped, mut failed) = (false, None);
            s.store.each_view(|key, record| {
                if !filter.matches(&Fielded(key, &record)) {
                    return true;
                }
                let pushed = sink.push(&Listed {
                    name: key,
                    parent: record.parent,
                    kind: record.kind,
                    created: record.created,
                    updated: record.updated,
                    labels: record.labels,
                    upperdir: s.upperdir_label(record.id),
                });
                match pushed {
                    Ok(more) => {
                        stopped = !more;
                        more
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            })?;
            match failed {
                Some(e) => Err(e),
                None if stopped => Ok(()),
                None => sink.finish(),
            }
        })
        .await
    }

    /// Deletes every directory under `<root>/snapshots` that no snapshot owns (orphans: of
    /// removed snapshots, including those still queued for deletion, and of creations a crash
    /// cut short), and returns once they are gone, with how many there were. Never deletes a
    /// snapshot's directories, an entry that is not lamina's, or a directory whose ID the store
    /// never handed out (those are reported). A directory that cannot be deleted fails the
    /// Cleanup, after the others are gone.
    pub async fn cleanup(self: &Arc<Self>) -> Result<Deleted> {
        self.run(|s| s.delete_orphans("not owned by any snapshot (Cleanup)"))
            .await
    }

    /// Start-up recovery: finishes what a crash interrupted, then starts the background
    /// threads. It is [`Snapshotter::fsck`] with repair: missing directories of active
    /// snapshots and views (a creation that crashed before answering) are recreated, what
    /// cannot be repaired (a committed snapshot whose data is gone) is logged as an error, and
    /// directories no snapshot owns are deleted.
    ///
    /// Only what a request could meet wrong is settled before this returns (and lamina
    /// serves): the entries under `snapshots/` and the snapshots that are not committed. The
    /// committed ones, nearly all of a node's snapshots, are checked by a thread while lamina
    /// serves: looking at each one's directories took 1.9 s with 91,000 of them in the page
    /// cache and 17 s without, and what that check can find (a lost layer, a dangling parent)
    /// is only reported, while a wrong mode is set right a little later. [`Snapshotter::open`]
    /// already settled the other thing a request depends on: no directory under `snapshots/`
    /// has an ID the store can hand out.
    ///
    /// Orphans are only queued: once the rest is repaired, the background threads start and
    /// the deleter deletes them while lamina serves. A node that crashed in the middle of a
    /// garbage collection can hold tens of gigabytes of them, and deleting them first kept
    /// containerd (and systemd's start timeout) waiting. Their IDs are never handed out again,
    /// so nothing can meet them meanwhile but a Cleanup, which waits for them.
    pub fn recover(self: &Arc<Self>) -> Result<Recovered> {
        let mut orphans = Vec::new();
        let report = self.fsck_with(
            RECOVERY,
            fsck::Orphans::Collect(&mut orphans),
            fsck::Scope::Unsettled,
        )?;
        let deleted = log_recovery(&report);
        self.start_background()?;
        if let Some(deleter) = self.deleter.get() {
            for id in orphans {
                deleter.delete_later(id);
            }
        }
        let this = Arc::clone(self);
        let span = Span::current();
        let committed = std::thread::Builder::new()
            .name("lamina-check".into())
            .spawn(move || span.in_scope(|| this.check_committed()))
            .map_err(|e| Error::Internal(format!("cannot start the start-up check: {e}")))?;
        Ok(Recovered {
            deleted,
            unsettled: report.snapshots_checked,
            committed,
        })
    }

    /// The second half of start-up recovery, while lamina serves: the committed snapshots.
    fn check_committed(&self) {
        let started = Instant::now();
        // Nothing here is an orphan: those were queued before serving.
        let mut ignored = Vec::new();
        let orphans = fsck::Orphans::Collect(&mut ignored);
        match self.fsck_with(RECOVERY, orphans, fsck::Scope::Committed) {
            Ok(report) => {
                log_recovery(&report);
                let done = if self.closing.load(Ordering::SeqCst) {
                    "start-up check of the committed snapshots stopped: lamina is stopping"
                } else {
                    "start-up check of the committed snapshots done"
                };
                info!(
                    committed = report.snapshots_checked,
                    findings = report.findings.len(),
                    took = ?started.elapsed(),
                    "{done}"
                );
            }
            Err(e) => error!(
                error = %crate::error::chain(&e),
                "start-up check of the committed snapshots failed; `lamina fsck` runs it again"
            ),
        }
    }

    fn delete_orphans(&self, why: &str) -> Result<Deleted> {
        // List the directories first, then read which IDs are owned: a directory is created
        // only after its record commits, so any directory seen here that belongs to a snapshot
        // being prepared right now is already in the store read below.
        let entries = self.layout.list()?;
        let (owned, next_id) = self.store.owned_ids()?;
        let mut orphans = Vec::new();
        for entry in entries {
            match entry {
                // Not a directory this store's lamina made: only `lamina fsck --repair
                // --delete-unknown` deletes those (see `Snapshotter::open`).
                DirEntry::Id(id) if id >= next_id => warn!(
                    path = %self.layout.dir(id).display(),
                    next_id,
                    "the store never handed out this ID; left alone (lamina fsck reports it)"
                ),
                DirEntry::Id(id) if !owned.contains(&id) => orphans.push(id),
                DirEntry::Id(_) => {}
                DirEntry::Foreign(name) => warn!(
                    path = %self.layout.snapshots_dir().join(&name).display(),
                    "not created by lamina; left alone"
                ),
            }
        }
        // All at once, so that the deleter's threads share the whole job (see `delete.rs`).
        let results = self.delete_now(orphans, why)?;
        let mut deleted = Deleted::default();
        let mut failure = None;
        for result in results {
            match result {
                Ok(_) => deleted.directories += 1,
                Err(err) => {
                    failure.get_or_insert(err);
                }
            }
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(deleted),
        }
    }

    /// Deletes the directory of an ID no snapshot owns.
    fn delete_orphan(&self, id: u64, why: &str) -> Result<()> {
        self.delete_now(vec![id], why)?
            .pop()
            .unwrap_or(Ok(0))
            .map(drop)
    }

    /// Deletes the directories of `ids` (which no snapshot owns) and reports each: through the
    /// deleter when there is one, so that no directory is deleted by two threads at once.
    fn delete_now(&self, ids: Vec<u64>, why: &str) -> Result<Vec<Result<u64>>> {
        if let Some(deleter) = self.deleter.get() {
            return deleter.delete_now(ids);
        }
        let results = self.layout.delete_trees(&ids)?;
        for (id, result) in ids.iter().zip(&results) {
            report_deleted(&self.layout, *id, result, why);
        }
        Ok(results)
    }

    async fn create_and_finish(
        self: Arc<Self>,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>> {
        check_key("key", &key)?;
        if !parent.is_empty() {
            check_key("parent", &parent)?;
        }
        let labels = check_labels(labels)?;
        idmap::from_labels(&labels)?;
        let depth = |key: &str, parent: &str| {
            let (key, parent) = (key.to_string(), parent.to_string());
            move |chain: &[u64]| check_depth(&key, &parent, chain.len())
        };
        let mut record = self
            .store
            .insert(
                &key,
                &parent,
                kind,
                labels,
                SystemTime::now(),
                depth(&key, &parent),
            )
            .await?;
        // A directory already at the new ID's place was not made for it (see `make_dirs`):
        // it is left alone, this record undone, and the snapshot takes the next ID. A third
        // one in a row would be something making them on purpose: the creation fails.
        for attempt in 1.. {
            match self.finish_creation(&key, &record).await {
                Err(Error::Occupied(path)) => {
                    self.store.remove_if(&key, Some(record.id)).await?;
                    if attempt == 3 {
                        return Err(Error::Occupied(path));
                    }
                    warn!(id = record.id, path = %path.display(), "a directory is already where this snapshot's goes; leaving it alone and taking another ID");
                    record = self
                        .store
                        .insert(
                            &key,
                            &parent,
                            kind,
                            record.labels,
                            SystemTime::now(),
                            depth(&key, &parent),
                        )
                        .await?;
                }
                done => return done,
            }
        }
        unreachable!("the loop returns by its third attempt")
    }

    /// Makes the directories of a creation whose record just committed, and answers its
    /// mounts. A failure undoes the record, so that a failed Prepare leaves nothing behind
    /// (the key can be retried) - except [`Error::Occupied`], which the caller handles.
    async fn finish_creation(&self, key: &str, record: &Record) -> Result<Vec<Mount>> {
        // A rename (or a few mkdirs), made where the answer arrived: cheaper than a hand-off to
        // the blocking pool and back.
        let with_work = record.kind == Kind::Active;
        let made = self
            .owner_of_new(record)
            .and_then(|owner| match self.spares.get() {
                Some(spares) => spares.make_dirs(record.id, with_work, owner),
                None => self.layout.make_dirs(record.id, with_work, owner),
            });
        match made {
            Ok(()) => {}
            Err(err @ Error::Occupied(_)) => return Err(err),
            Err(err) => {
                // By ID: the key may have been removed and prepared again meanwhile (by a
                // client that reuses keys), and that snapshot is not this one to undo. Either
                // way this ID's record is then gone, and whatever part of its directory was
                // made goes too.
                match self.store.remove_if(key, Some(record.id)).await {
                    Ok(_) | Err(Error::NotFound(_)) => self.delete_soon(record.id),
                    Err(e) => {
                        error!(error = %chain(&e), "could not undo a failed create; recovery will finish it")
                    }
                }
                return Err(err);
            }
        }
        // A Remove of this key may have landed between the record and its directories: its
        // deletion then found nothing to delete, and the directories just made would be
        // nobody's. Looked at after they exist, so that a Remove landing later than this look
        // finds them (and deletes them) itself.
        match self.store.get(key) {
            Err(Error::NotFound(_)) => {}
            Ok(now) if now.id != record.id => {}
            _ => {
                info!(id = record.id, kind = record.kind.as_str(), "created");
                return Ok(self.mounts_of(record));
            }
        }
        self.delete_soon(record.id);
        Err(Error::NotFound(format!(
            "snapshot {key:?} was removed while it was being created"
        )))
    }

    /// Deletes the directories of `id`, whose record is gone: in the background when serving.
    fn delete_soon(&self, id: u64) {
        match self.deleter.get() {
            Some(deleter) => deleter.delete_later(id),
            None => {
                if let Err(e) = self.layout.delete_dirs(id) {
                    warn!(id, error = %chain(&e), "directory stays until Cleanup");
                }
            }
        }
    }

    /// The owner of a new snapshot's `fs`: a user-namespaced container's root, as the host
    /// sees it, so that it may write there (containerd never ID-maps an overlay's upper
    /// directory); else its parent's owner. As in containerd's overlayfs, also for a snapshot
    /// without a parent, whose `fs` containerd binds ID-mapped.
    fn owner_of_new(&self, record: &Record) -> Result<Option<(u32, u32)>> {
        match idmap::from_labels(&record.labels)? {
            Some(mapping) => Ok(Some(mapping.root)),
            None => self.parent_owner(record),
        }
    }

    /// A child's `fs` takes the owner of its parent's, so a layer unpacked by a non-root user
    /// (or remapped) stays writable by it.
    fn parent_owner(&self, record: &Record) -> Result<Option<(u32, u32)>> {
        match record.parent_ids.first() {
            Some(&parent) => self.layout.owner(parent).map(Some),
            None => Ok(None),
        }
    }

    fn mounts_of(&self, record: &Record) -> Vec<Mount> {
        let fs = self.layout.fs(record.id);
        let work = self.layout.work(record.id);
        let lowers: Vec<PathBuf> = record
            .parent_ids
            .iter()
            .map(|&id| self.layout.fs(id))
            .collect();
        // Checked at creation and at every Update of the labels: only a store written by a
        // lamina that did not check them can hold bad ones, and their mounts go without.
        let mapped = self
            .options
            .remap_ids
            .then(|| idmap::from_labels(&record.labels).ok().flatten())
            .flatten()
            .map(|m| m.options());
        let dirs = Dirs {
            fs: &fs,
            work: &work,
            lowers: &lowers,
            first_options: mapped.as_ref().map_or(&[], |o| o.as_slice()),
        };
        match record.kind {
            Kind::View => overlay::view_mounts(dirs, &self.options.mount_options),
            _ => overlay::active_mounts(dirs, &self.options.mount_options),
        }
    }

    /// The value of [`UPPERDIR_LABEL`] for snapshot `id`, when `upperdir_label` is on; it
    /// replaces a stored label of that name in what Stat, Update and List report.
    fn upperdir_label(&self, id: u64) -> Option<String> {
        self.options
            .upperdir_label
            .then(|| self.layout.fs(id).display().to_string())
    }

    fn info(&self, name: String, record: Record) -> Info {
        let mut labels = record.labels;
        if let Some(upperdir) = self.upperdir_label(record.id) {
            labels.insert(UPPERDIR_LABEL.into(), upperdir);
        }
        Info {
            name,
            parent: record.parent,
            kind: record.kind,
            labels,
            created: record.created,
            updated: record.updated,
        }
    }
}

/// Logs (and counts, for the metrics) the deletion of snapshot `id`'s directory.
fn report_deleted(layout: &Layout, id: u64, result: &Result<u64>, why: &str) {
    let path = layout.dir(id);
    match result {
        Ok(bytes) => {
            metrics::global().deleted(*bytes);
            info!(id, path = %path.display(), bytes, reason = why, "removed directory");
        }
        Err(err) => {
            warn!(id, path = %path.display(), error = %chain(err), "could not remove directory; Cleanup tries again")
        }
    }
}

/// containerd's filters for List, parsed; a bad one is InvalidArgument.
pub fn parse_filters(filters: &[String]) -> Result<Filter> {
    Filter::parse_all(filters).map_err(|e| Error::invalid(e.to_string()))
}

/// The fields containerd's filters see on a snapshot: its stored fields (the upperdir label,
/// made up for the answer, is not among them).
struct Fielded<'a>(&'a str, &'a RecordView<'a>);

impl Fields for Fielded<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        let Fielded(name, record) = self;
        match path.first()?.as_str() {
            "name" => Some(name.to_string()),
            "parent" => Some(record.parent.to_string()),
            "kind" => Some(record.kind.as_str().to_string()),
            "labels" if path.len() > 1 => {
                record.labels.get(&path[1..].join(".")).map(str::to_string)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::any_chain;

    fn open(dir: &std::path::Path) -> Arc<Snapshotter> {
        Snapshotter::open(Layout::new(dir.join("root")), Options::default()).unwrap()
    }

    /// A Remove that lands between a Prepare's record and its directories finds nothing to
    /// delete; the Prepare must not then make directories that nobody owns and answer as if
    /// its snapshot existed.
    #[tokio::test]
    async fn a_remove_between_record_and_directories_leaves_no_orphan() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let insert = || {
            s.store.insert(
                "k",
                "",
                Kind::Active,
                BTreeMap::new(),
                SystemTime::now(),
                any_chain,
            )
        };
        let record = insert().await.unwrap();
        s.store.remove("k").await.unwrap();
        let answer = s.finish_creation("k", &record).await;
        assert!(matches!(answer, Err(Error::NotFound(_))), "{answer:?}");
        assert!(!s.layout.dir(record.id).exists(), "orphan left behind");
        // Prepared again meanwhile: that snapshot is not this one, and keeps what is its own.
        let record = insert().await.unwrap();
        s.store.remove("k").await.unwrap();
        let again = s
            .new_snapshot(Kind::Active, "k".into(), String::new(), HashMap::new())
            .await
            .unwrap();
        assert!(s.finish_creation("k", &record).await.is_err());
        assert!(!s.layout.dir(record.id).exists());
        let now = s.store.get("k").unwrap();
        assert!(s.layout.fs(now.id).is_dir());
        assert_eq!(again, s.mounts("k".into()).await.unwrap());
    }

    /// The counts that metrics and status report follow exactly what the store committed.
    #[tokio::test]
    async fn counts_follow_the_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let none = HashMap::new;
        s.new_snapshot(Kind::Active, "a".into(), String::new(), none())
            .await
            .unwrap();
        s.commit("A".into(), "a".into(), none()).await.unwrap();
        s.new_snapshot(Kind::Active, "b".into(), "A".into(), none())
            .await
            .unwrap();
        s.new_snapshot(Kind::View, "v".into(), "A".into(), none())
            .await
            .unwrap();
        s.new_snapshot(Kind::Active, "gone".into(), String::new(), none())
            .await
            .unwrap();
        s.remove("gone".into()).await.unwrap();
        // Refused requests change nothing.
        assert!(s
            .new_snapshot(Kind::Active, "b".into(), String::new(), none())
            .await
            .is_err());
        assert!(s.remove("A".into()).await.is_err());
        let want = Counts {
            active: 1,
            views: 1,
            committed: 1,
        };
        assert_eq!(s.counts(), want);
        // Counted from the store when it opens again.
        drop(s);
        assert_eq!(open(tmp.path()).counts(), want);
    }

    fn mapped(uid: &str, gid: &str) -> HashMap<String, String> {
        HashMap::from([
            (idmap::UID_LABEL.to_string(), uid.to_string()),
            (idmap::GID_LABEL.to_string(), gid.to_string()),
        ])
    }

    /// A user-namespaced container's snapshot (remap-ids): its upper directory belongs to the
    /// container's root as the host sees it, and every mount of it carries the mappings first.
    #[tokio::test]
    async fn id_mapped_snapshots_own_their_upper_and_carry_the_mappings() {
        // Chowning to another user needs root (or CAP_CHOWN).
        if !crate::testing::mounting_allowed() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let options = Options {
            remap_ids: true,
            ..Options::default()
        };
        let s = Snapshotter::open(Layout::new(tmp.path().join("root")), options).unwrap();
        let none = HashMap::new;
        s.new_snapshot(Kind::Active, "l1".into(), String::new(), none())
            .await
            .unwrap();
        s.commit("L1".into(), "l1".into(), none()).await.unwrap();
        s.new_snapshot(Kind::Active, "l2".into(), "L1".into(), none())
            .await
            .unwrap();
        s.commit("L2".into(), "l2".into(), none()).await.unwrap();

        let labels = mapped("0:65536:65536", "0:70000:65536");
        let want = ["uidmap=0:65536:65536", "gidmap=0:70000:65536"];
        for (key, parent) in [("c0", ""), ("c1", "L1"), ("c2", "L2")] {
            let mounts = s
                .new_snapshot(Kind::Active, key.into(), parent.into(), labels.clone())
                .await
                .unwrap();
            assert_eq!(mounts[0].options[..2], want, "{key}: {mounts:?}");
            assert_eq!(mounts, s.mounts(key.into()).await.unwrap());
            let id = s.store.get(key).unwrap().id;
            assert_eq!(s.layout.owner(id).unwrap(), (65536, 70000), "{key}'s fs");
        }
        for (key, parent) in [("v1", "L1"), ("v2", "L2")] {
            let mounts = s
                .new_snapshot(Kind::View, key.into(), parent.into(), labels.clone())
                .await
                .unwrap();
            assert_eq!(mounts[0].options[..2], want, "{key}: {mounts:?}");
        }

        // Bad mappings are refused, naming the label, and leave nothing behind.
        let before = s.counts();
        for bad in [
            mapped("0:65536", "0:1:1"),
            mapped("1:65536:10", "0:1:1"),
            HashMap::from([(idmap::UID_LABEL.to_string(), "0:1:1".to_string())]),
        ] {
            let err = s
                .new_snapshot(Kind::Active, "bad".into(), "L2".into(), bad)
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            assert!(err.to_string().contains("containerd.io/snapshot/"), "{err}");
        }
        assert_eq!(s.counts(), before);
        // Update may not break the mappings Mounts reads either.
        let err = s
            .update("c2".into(), mapped("x", "0:1:1"), vec![])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert_eq!(s.mounts("c2".into()).await.unwrap()[0].options[..2], want);
    }

    /// Where the kernel cannot ID-map layers, the mounts carry no mappings (containerd then
    /// copies and chowns the layers itself, if allowed to); the labels are still checked, and
    /// the new `fs` still belongs to the container's root, as in containerd's overlayfs.
    #[tokio::test]
    async fn without_remap_ids_the_mounts_carry_no_mappings() {
        if !crate::testing::mounting_allowed() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let mounts = s
            .new_snapshot(
                Kind::Active,
                "c".into(),
                String::new(),
                mapped("0:65536:65536", "0:65536:65536"),
            )
            .await
            .unwrap();
        assert!(
            !mounts[0].options.iter().any(|o| overlay::is_id_mapping(o)),
            "{mounts:?}"
        );
        let id = s.store.get("c").unwrap().id;
        assert_eq!(s.layout.owner(id).unwrap(), (65536, 65536));
        let err = s
            .new_snapshot(
                Kind::Active,
                "d".into(),
                String::new(),
                mapped("x", "0:1:1"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    }
}
