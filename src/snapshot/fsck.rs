//! Consistency check: the store against the directories, with an optional repair of what is
//! safe to repair. Runs online (admin API) or offline on a stopped daemon's root.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use nix::sys::stat::FileStat;

use super::Snapshotter;
use crate::{
    dirs::{DirEntry, Part},
    error::{chain, Result},
    overlay::usage,
    store::{Kind, Record},
    sys::at,
};

/// What fsck can find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// A directory of an ID the store handed out and no snapshot owns any more.
    Orphan,
    /// A directory of an ID the store never handed out (it is missing, or older than it).
    Unknown,
    MissingDirectory,
    MissingWorkdir,
    /// A symlink or a file where a snapshot's directory should be.
    NotADirectory,
    DanglingParent,
    WrongMode,
    /// An entry under `snapshots/` that is not lamina's: only reported.
    Foreign,
}

impl Problem {
    const ALL: [Problem; 8] = [
        Problem::Orphan,
        Problem::Unknown,
        Problem::MissingDirectory,
        Problem::MissingWorkdir,
        Problem::NotADirectory,
        Problem::DanglingParent,
        Problem::WrongMode,
        Problem::Foreign,
    ];

    /// The name fsck prints and the admin API sends.
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Orphan => "orphan",
            Problem::Unknown => "unknown",
            Problem::MissingDirectory => "missing_directory",
            Problem::MissingWorkdir => "missing_workdir",
            Problem::NotADirectory => "not_a_directory",
            Problem::DanglingParent => "dangling_parent",
            Problem::WrongMode => "wrong_mode",
            Problem::Foreign => "foreign",
        }
    }

    /// The problem named `name` (as the admin API sends it), if any.
    pub fn from_name(name: &str) -> Option<Problem> {
        Problem::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Whether a finding of this kind leaves the root unclean until repaired: all but entries
    /// that are not lamina's, which are only reported.
    pub fn needs_repair(self) -> bool {
        self != Problem::Foreign
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: Problem,
    pub key: String,
    pub path: PathBuf,
    pub detail: String,
    /// What repair did, or why it cannot; empty when not repairing.
    pub action: String,
    pub repaired: bool,
    /// For `unknown`: the bytes the directory holds (what deleting it frees).
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub snapshots_checked: u64,
    pub directories_checked: u64,
}

impl Report {
    /// Nothing found that lamina considers wrong (foreign entries are only reported).
    pub fn clean(&self) -> bool {
        self.findings
            .iter()
            .all(|f| !f.kind.needs_repair() || f.repaired)
    }
}

/// What fsck may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Repair {
    /// Fix what is safe: orphans, missing directories of active snapshots and views, modes.
    pub safe: bool,
    /// Also delete the directories whose IDs the store never handed out (a missing or
    /// restored store; see `Snapshotter::open`). Only with `safe`.
    pub unknown: bool,
}

/// How long after its record a creation may still be making its directories, as far as an
/// online fsck is concerned (it takes milliseconds; this leaves room for a stalled disk).
const IN_FLIGHT: Duration = Duration::from_secs(10);

struct Check<'a> {
    report: &'a mut Report,
    repair: bool,
}

impl Check<'_> {
    fn found(
        &mut self,
        kind: Problem,
        key: &str,
        path: &Path,
        detail: String,
        fix: Option<(&str, &mut dyn FnMut() -> Result<()>)>,
        cannot: &str,
    ) {
        let (action, repaired) = match (self.repair, fix) {
            (false, _) => (String::new(), false),
            (true, Some((did, f))) => match f() {
                Ok(()) => (did.to_string(), true),
                Err(e) => (format!("repair failed: {}", chain(&e)), false),
            },
            (true, None) => (cannot.to_string(), false),
        };
        self.report.findings.push(Finding {
            kind,
            key: key.to_string(),
            path: path.to_path_buf(),
            detail,
            action,
            repaired,
            bytes: 0,
        });
    }

    /// Reports a mode other than `want`; `fix` sets it.
    fn mode(
        &mut self,
        key: &str,
        path: &Path,
        have: u32,
        want: u32,
        fix: &mut dyn FnMut() -> Result<()>,
    ) {
        let have = have & 0o7777;
        if have != want {
            self.found(
                Problem::WrongMode,
                key,
                path,
                format!("mode {have:04o}, expected {want:04o}"),
                Some((&format!("set mode {want:04o}"), fix)),
                "",
            );
        }
    }

    /// The root and `snapshots/`: paths the operator chose, so followed like any path.
    fn path_mode(&mut self, path: &Path, want: u32) {
        let Ok(meta) = fs::metadata(path) else { return };
        self.mode("", path, meta.permissions().mode(), want, &mut || {
            fs::set_permissions(path, fs::Permissions::from_mode(want))
                .map_err(|e| crate::error::Error::io("setting mode of", path, e))
        });
    }
}

/// What repairing an orphan directory does.
pub(super) enum Orphans<'a> {
    /// Delete it now, and say whether that worked.
    Delete,
    /// Only note its ID, for the caller to hand to the deleter (start-up recovery).
    Collect(&'a mut Vec<u64>),
}

/// Which part of the comparison runs. Start-up recovery splits it in two: what a request could
/// meet wrong runs before lamina serves, the rest while it serves (see `Snapshotter::recover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// All of it (fsck).
    All,
    /// The entries under `snapshots/` (orphans, unknown IDs, foreign entries), the root's
    /// modes, and the snapshots that are not committed: an active snapshot or view whose
    /// creation a crash cut short has no directories, and its mounts would point nowhere.
    Unsettled,
    /// The committed snapshots: a lost layer or a dangling parent can only be reported, and a
    /// mode set right; nothing a request depends on is repaired here.
    Committed,
}

impl Scope {
    fn entries(self) -> bool {
        self != Scope::Committed
    }

    fn covers(self, record: &Record) -> bool {
        match self {
            Scope::All => true,
            Scope::Unsettled => record.kind != Kind::Committed,
            Scope::Committed => record.kind == Kind::Committed,
        }
    }
}

/// What is at a place where a snapshot directory should be, symlinks not followed.
enum Seen {
    Missing,
    Dir(FileStat),
    /// A symlink, a file, or what cannot be looked into: not lamina's, never followed.
    Other(String),
}

impl Snapshotter {
    /// Compares the store with `<root>/snapshots`. With `repair.safe`: deletes orphan
    /// directories, recreates missing directories of active snapshots and views, and fixes
    /// modes; a committed snapshot's lost data and a dangling parent cannot be repaired and are
    /// only reported, as are entries that are not lamina's. Directories whose IDs the store
    /// never handed out are deleted only with `repair.unknown`, and their IDs are then never
    /// handed out either. While lamina serves, an active snapshot or view created in the last
    /// 10 s may still be making its directories and is left alone.
    pub fn fsck(&self, repair: Repair) -> Result<Report> {
        self.fsck_with(repair, Orphans::Delete, Scope::All)
    }

    pub(super) fn fsck_with(
        &self,
        repair: Repair,
        orphans: Orphans<'_>,
        scope: Scope,
    ) -> Result<Report> {
        // Directories first, then the store: a snapshot prepared meanwhile is in the store read.
        let entries = if scope.entries() {
            self.layout.list()?
        } else {
            Vec::new()
        };
        let (records, next_id) = self.store.list_with_next_id()?;
        let report = self.compare(repair, entries, records, next_id, orphans, scope);
        let deleted = report
            .findings
            .iter()
            .filter(|f| f.kind == Problem::Unknown && f.repaired)
            .filter_map(|f| f.path.file_name()?.to_str()?.parse::<u64>().ok())
            .max();
        if let Some(highest) = deleted {
            futures::executor::block_on(self.store.raise_next_id(highest + 1))?;
        }
        Ok(report)
    }

    /// Whether `key` is still snapshot `id`. Online, a Remove (perhaps followed by a Prepare
    /// of the same key) can land after the store was read: what was seen of that snapshot is
    /// then stale, not wrong, and repairing it would recreate directories nobody owns.
    fn still_is(&self, key: &str, id: u64) -> bool {
        self.store.get(key).is_ok_and(|r| r.id == id)
    }

    fn seen(&self, id: u64, part: Part) -> Seen {
        match self.layout.inspect(id, part) {
            Ok(None) => Seen::Missing,
            Ok(Some(st)) if at::is_dir(&st) => Seen::Dir(st),
            Ok(Some(_)) => Seen::Other("not a directory (a symlink or a file)".into()),
            Err(e) => Seen::Other(format!("cannot be looked into ({e})")),
        }
    }

    fn compare(
        &self,
        repair: Repair,
        entries: Vec<DirEntry>,
        records: Vec<(String, Record)>,
        next_id: u64,
        mut orphans: Orphans<'_>,
        scope: Scope,
    ) -> Report {
        let mut report = Report::default();
        // Serving: creations are under way, and one whose record is committed but whose
        // directories are not made yet is no finding (repairing it would fail that Prepare).
        let online = self.deleter.get().is_some();
        let in_flight = |r: &Record| {
            r.kind != Kind::Committed
                && SystemTime::now()
                    .duration_since(r.created)
                    .is_ok_and(|age| age < IN_FLIGHT)
        };
        let by_key: HashMap<&str, u64> = records.iter().map(|(k, r)| (k.as_str(), r.id)).collect();
        let owned: HashMap<u64, &str> = records.iter().map(|(k, r)| (r.id, k.as_str())).collect();
        report.directories_checked = entries.len() as u64;
        let mut c = Check {
            report: &mut report,
            repair: repair.safe,
        };
        let layout = &self.layout;

        if scope.entries() {
            c.path_mode(layout.root(), 0o700);
            c.path_mode(&layout.snapshots_dir(), 0o700);
        }
        for entry in entries {
            match entry {
                DirEntry::Id(id) if id >= next_id => {
                    let path = layout.dir(id);
                    let bytes = usage::walk(&path).map_or(0, |u| u.size.max(0) as u64);
                    let mut fix = || match self
                        .delete_now(
                            vec![id],
                            "the store never handed out its ID (fsck --delete-unknown)",
                        )?
                        .pop()
                    {
                        Some(Err(e)) => Err(e),
                        _ => Ok(()),
                    };
                    let fix = repair
                        .unknown
                        .then_some(("deleted", &mut fix as &mut dyn FnMut() -> Result<()>));
                    c.found(
                        Problem::Unknown,
                        "",
                        &path,
                        format!(
                            "directory of ID {id}, which the store never handed out (its next \
                             ID is {next_id}): the store is missing or older than this \
                             directory; it holds {bytes} bytes"
                        ),
                        fix,
                        "left alone: --delete-unknown deletes it",
                    );
                    if let Some(f) = c.report.findings.last_mut() {
                        f.bytes = bytes;
                    }
                }
                DirEntry::Id(id) if !owned.contains_key(&id) => {
                    let did = match orphans {
                        Orphans::Delete => "removed",
                        Orphans::Collect(_) => "queued for deletion",
                    };
                    let mut fix = || match &mut orphans {
                        Orphans::Delete => self.delete_orphan(id, "owned by no snapshot (fsck)"),
                        Orphans::Collect(ids) => {
                            ids.push(id);
                            Ok(())
                        }
                    };
                    c.found(
                        Problem::Orphan,
                        "",
                        &layout.dir(id),
                        format!("directory of ID {id}, which no snapshot owns"),
                        Some((did, &mut fix)),
                        "",
                    );
                }
                DirEntry::Id(_) => {}
                DirEntry::Foreign(name) => c.found(
                    Problem::Foreign,
                    "",
                    &layout.snapshots_dir().join(&name),
                    "not created by lamina".into(),
                    None,
                    "left alone: lamina never deletes what is not its own",
                ),
            }
        }
        for (key, record) in records.iter().filter(|(_, r)| scope.covers(r)) {
            // A background check gives way to a lamina that is stopping.
            if scope == Scope::Committed && self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            c.report.snapshots_checked += 1;
            let id = record.id;
            let (dir, fs) = (self.seen(id, Part::Dir), self.seen(id, Part::Fs));
            if let Some((part, why)) = match (&dir, &fs) {
                (Seen::Other(why), _) => Some((Part::Dir, why)),
                (_, Seen::Other(why)) => Some((Part::Fs, why)),
                _ => None,
            } {
                if self.still_is(key, id) {
                    c.found(
                        Problem::NotADirectory,
                        key,
                        &layout.part(id, part),
                        format!("{} snapshot's directory is {why}", record.kind.as_str()),
                        None,
                        "left alone: lamina never follows or deletes what it did not make; \
                         remove it, then run fsck --repair again",
                    );
                }
                continue;
            }
            if matches!(fs, Seen::Missing) {
                if !self.still_is(key, id) || (online && in_flight(record)) {
                    continue;
                }
                let detail = format!("{} snapshot has no data directory", record.kind.as_str());
                if record.kind == Kind::Committed {
                    c.found(
                        Problem::MissingDirectory,
                        key,
                        &layout.fs(id),
                        detail,
                        None,
                        "cannot repair: the layer's data is gone; remove this snapshot and its \
                         children, then pull the image again",
                    );
                } else {
                    let mut fix = || {
                        let owner = self.owner_of_new(record)?;
                        layout.complete_dirs(id, record.kind == Kind::Active, owner)
                    };
                    c.found(
                        Problem::MissingDirectory,
                        key,
                        &layout.fs(id),
                        detail,
                        Some(("recreated empty", &mut fix)),
                        "",
                    );
                }
                continue;
            }
            // A wrong mode is looked at again only when there is one: a snapshot removed after
            // the store was read (its directory being deleted) is no finding.
            let wrong = |st: &FileStat, want: u32| st.st_mode & 0o7777 != want;
            if let Seen::Dir(st) = &dir {
                if wrong(st, 0o700) && self.still_is(key, id) {
                    c.mode(key, &layout.dir(id), st.st_mode, 0o700, &mut || {
                        layout.set_mode(id, Part::Dir, 0o700)
                    });
                }
            }
            if record.kind == Kind::Active {
                match self.seen(id, Part::Work) {
                    Seen::Dir(st) if wrong(&st, 0o711) && self.still_is(key, id) => {
                        c.mode(key, &layout.work(id), st.st_mode, 0o711, &mut || {
                            layout.set_mode(id, Part::Work, 0o711)
                        })
                    }
                    Seen::Dir(_) => {}
                    Seen::Missing if self.still_is(key, id) => {
                        let mut fix = || layout.complete_dirs(id, true, None);
                        c.found(
                            Problem::MissingWorkdir,
                            key,
                            &layout.work(id),
                            "active snapshot has no overlay work directory".into(),
                            Some(("recreated", &mut fix)),
                            "",
                        );
                    }
                    Seen::Missing => {}
                    Seen::Other(why) => c.found(
                        Problem::NotADirectory,
                        key,
                        &layout.work(id),
                        format!("active snapshot's work directory is {why}"),
                        None,
                        "left alone: lamina never follows or deletes what it did not make; \
                         remove it, then run fsck --repair again",
                    ),
                }
            }
            if !record.parent.is_empty()
                && by_key.get(record.parent.as_str()) != record.parent_ids.first()
                && self.still_is(key, id)
            {
                c.found(
                    Problem::DanglingParent,
                    key,
                    &layout.dir(id),
                    format!(
                        "parent {:?} is missing or is not the layer it was",
                        record.parent
                    ),
                    None,
                    "cannot repair: remove this snapshot (and its children)",
                );
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

    use futures::executor::block_on as wait;

    use super::*;
    use crate::{dirs::Layout, snapshot::Options, store::any_chain};

    /// Records active snapshot `key`, as a Prepare does before it makes its directories.
    fn record_active(s: &Snapshotter, key: &str) -> Record {
        let now = SystemTime::now();
        wait(
            s.store
                .insert(key, "", Kind::Active, BTreeMap::new(), now, any_chain),
        )
        .unwrap()
    }

    const REPAIR: Repair = Repair {
        safe: true,
        unknown: false,
    };

    /// A snapshotter on `<dir>/root`, not serving (see `start_background`).
    fn open(dir: &Path) -> Arc<Snapshotter> {
        Snapshotter::open(Layout::new(dir.join("root")), Options::default()).unwrap()
    }

    #[test]
    fn a_snapshot_removed_after_the_store_was_read_is_neither_reported_nor_recreated() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        for key in ["gone", "kept"] {
            let r = record_active(&s, key);
            s.layout.make_dirs(r.id, true, None).unwrap();
        }
        // What fsck read, then a Remove lands (record, then directory) before it looks.
        let (records, next_id) = s.store.list_with_next_id().unwrap();
        let gone = wait(s.store.remove("gone")).unwrap();
        s.layout.delete_dirs(gone.id).unwrap();
        let kept = s.store.get("kept").unwrap();
        std::fs::remove_dir_all(s.layout.dir(kept.id)).unwrap();
        let report = s.compare(
            REPAIR,
            s.layout.list().unwrap(),
            records,
            next_id,
            Orphans::Delete,
            Scope::All,
        );
        let keys: Vec<&str> = report.findings.iter().map(|f| f.key.as_str()).collect();
        // "kept" really lost its directory and gets it back; "gone" is nobody's any more.
        assert_eq!(keys, vec!["kept"], "{:?}", report.findings);
        assert!(s.layout.fs(kept.id).is_dir());
        assert!(
            !s.layout.dir(gone.id).exists(),
            "a removed snapshot's directory came back"
        );
    }

    #[test]
    fn online_a_creation_under_way_is_left_to_finish() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        s.start_background().unwrap();
        // A Prepare between its record and its directories.
        let r = record_active(&s, "new");
        let report = s.fsck(REPAIR).unwrap();
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        assert!(
            !s.layout.dir(r.id).exists(),
            "fsck made the directories first"
        );
        drop(s);
        // Stopped (after a crash, say), the same record is a creation that never finished.
        let s = open(tmp.path());
        let report = s.fsck(REPAIR).unwrap();
        let kinds: Vec<Problem> = report.findings.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, vec![Problem::MissingDirectory]);
        assert!(s.layout.fs(r.id).is_dir());
    }

    /// Start-up recovery settles the snapshots a request depends on before lamina serves and
    /// leaves the committed ones to a check while it serves: each half repairs its own part and
    /// nothing of the other's.
    #[tokio::test]
    async fn recovery_settles_creations_first_and_committed_snapshots_after() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let labels = std::collections::HashMap::new();
        s.new_snapshot(
            Kind::Active,
            "layer-key".into(),
            String::new(),
            labels.clone(),
        )
        .await
        .unwrap();
        s.commit("layer".into(), "layer-key".into(), labels.clone())
            .await
            .unwrap();
        let layer = s.store.get("layer").unwrap();
        s.layout.set_mode(layer.id, Part::Dir, 0o755).unwrap();
        // A creation a crash cut short: its record, and no directories.
        let cut = record_active(&s, "cut");
        let mode = |id| {
            std::fs::metadata(s.layout.dir(id))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };

        let mut orphans = Vec::new();
        let first = s
            .fsck_with(REPAIR, Orphans::Collect(&mut orphans), Scope::Unsettled)
            .unwrap();
        assert_eq!(first.snapshots_checked, 1);
        let kinds: Vec<Problem> = first.findings.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            vec![Problem::MissingDirectory],
            "{:?}",
            first.findings
        );
        assert!(s.layout.fs(cut.id).is_dir() && s.layout.work(cut.id).is_dir());
        assert_eq!(
            mode(layer.id),
            0o755,
            "the first half looked at a committed snapshot"
        );

        std::fs::remove_dir_all(s.layout.dir(cut.id)).unwrap();
        let second = s
            .fsck_with(REPAIR, Orphans::Collect(&mut orphans), Scope::Committed)
            .unwrap();
        assert_eq!(second.snapshots_checked, 1);
        let kinds: Vec<Problem> = second.findings.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, vec![Problem::WrongMode], "{:?}", second.findings);
        assert_eq!(mode(layer.id), 0o700);
        assert!(
            !s.layout.dir(cut.id).exists(),
            "the second half repaired a creation"
        );
        assert!(orphans.is_empty(), "{orphans:?}");

        // Together, as lamina starts: the creation is repaired when `recover` returns, the
        // committed snapshot once the check it leaves running ends.
        s.layout.set_mode(layer.id, Part::Dir, 0o755).unwrap();
        let recovered = s.recover().unwrap();
        assert_eq!(recovered.unsettled, 1);
        assert!(s.layout.fs(cut.id).is_dir(), "not repaired before serving");
        recovered.committed.join().unwrap();
        assert_eq!(mode(layer.id), 0o700);
    }

    /// The background check of committed snapshots meets Removes: a snapshot removed after the
    /// store was read, whose directory is still being deleted, is no finding (before, its mode
    /// was "repaired", or reported as a failed repair once the directory was gone).
    #[tokio::test]
    async fn a_committed_snapshot_removed_meanwhile_is_not_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let labels = std::collections::HashMap::new();
        s.new_snapshot(Kind::Active, "k".into(), String::new(), labels.clone())
            .await
            .unwrap();
        s.commit("layer".into(), "k".into(), labels).await.unwrap();
        let layer = s.store.get("layer").unwrap();
        s.layout.set_mode(layer.id, Part::Dir, 0o755).unwrap();
        let (records, next_id) = s.store.list_with_next_id().unwrap();
        wait(s.store.remove("layer")).unwrap();
        let report = s.compare(
            REPAIR,
            Vec::new(),
            records,
            next_id,
            Orphans::Delete,
            Scope::Committed,
        );
        assert!(report.findings.is_empty(), "{:?}", report.findings);
    }
}
