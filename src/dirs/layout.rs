//! Where things live under the root, and how a snapshot's directories are made, completed and
//! inspected (relative to `snapshots/`, never following a symlink). Deleting them is
//! `delete.rs`'s, through [`Layout::delete_trees`].
//!
//! ```text
//! <root>/                    0700
//! <root>/metadata.redb       the store
//! <root>/snapshots/<id>/fs   0755, the snapshot's data (upperdir, or a lower for children)
//! <root>/snapshots/<id>/work 0711, overlayfs' workdir, active snapshots only
//! <root>/spare/              0700, ready-made empty trees (see `spares`), nobody's snapshot
//! ```
//!
//! containerd shortens long `lowerdir=` lists by making them relative to their longest common
//! parent, which assumes exactly this shape with short decimal IDs.

use std::{
    fs, io,
    os::{
        fd::OwnedFd,
        unix::fs::{DirBuilderExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use nix::sys::stat::FileStat;

use crate::{
    error::{Error, Result},
    sys::at,
};

/// Most threads deleting trees at once: unlinks wait on the disk (see `delete.rs`), and beyond
/// 16 in flight this VM's disk gained nothing more.
pub const DELETE_THREADS: usize = 16;

/// Paths under one lamina root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// One entry of `<root>/snapshots` as found on disk.
#[derive(Debug, PartialEq, Eq)]
pub enum DirEntry {
    /// A decimal name: lamina's, owned or not.
    Id(u64),
    /// Anything else: not lamina's; reported, never deleted.
    Foreign(String),
}

/// The directories of one snapshot: `snapshots/<id>`, and its `fs` and `work` inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Dir,
    Fs,
    Work,
}

impl Part {
    /// The name inside `snapshots/<id>` (of the directory itself: itself).
    fn name(self) -> &'static str {
        match self {
            Part::Dir => ".",
            Part::Fs => "fs",
            Part::Work => "work",
        }
    }
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn db_path(&self) -> PathBuf {
        self.root.join("metadata.redb")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn spare_dir(&self) -> PathBuf {
        self.root.join("spare")
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    pub fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    pub fn work(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// The ID whose `fs` directory `path` is, spelled as [`Layout::fs`] spells it; None for
    /// any other path.
    pub fn fs_id(&self, path: &Path) -> Option<u64> {
        let rest = path.strip_prefix(self.snapshots_dir()).ok()?;
        let id: u64 = rest
            .components()
            .next()?
            .as_os_str()
            .to_str()?
            .parse()
            .ok()?;
        (path.as_os_str() == self.fs(id).as_os_str()).then_some(id)
    }

    /// Creates the root and `snapshots/` with their modes, fixing the modes of existing ones.
    /// An existing root that holds anything must be lamina's (see [`Layout::check_ours`]).
    pub fn init(&self) -> Result<()> {
        self.check_ours()?;
        for dir in [self.root.clone(), self.snapshots_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::io("creating directory", &dir, e))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io("setting mode 0700 on", &dir, e))?;
        }
        Ok(())
    }

    /// Refuses a root that exists, holds something, and holds neither a store nor `snapshots/`:
    /// it is somebody else's directory (`--root /var/lib` by mistake), which lamina would set
    /// to mode 0700 and fill. Empty, or a fresh filesystem's `lost+found`, is fine.
    fn check_ours(&self) -> Result<()> {
        let entries = match fs::read_dir(&self.root) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("listing", &self.root, e)),
            Ok(entries) => entries,
        };
        let mut others = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing", &self.root, e))?;
            match entry.file_name().to_str() {
                Some("metadata.redb" | "snapshots") => return Ok(()),
                // What lamina itself leaves (spares, a probe cut short), and mkfs's own.
                Some("spare" | ".probe" | "lost+found") => {}
                _ => others.push(entry.file_name()),
            }
        }
        if others.is_empty() {
            return Ok(());
        }
        others.sort();
        Err(Error::Config(format!(
            "root {} is not lamina's: it holds {} entries (such as {:?}) but no lamina store \
             (metadata.redb) or snapshots/, and lamina would change its mode to 0700. Give \
             lamina an empty or new directory of its own as root",
            self.root.display(),
            others.len(),
            others[0]
        )))
    }

    /// `<root>/snapshots`, open for the operations below, which work relative to it. The root
    /// itself is the operator's choice and trusted; what is under `snapshots/` is not (see
    /// `sys::at`).
    fn open_snapshots(&self) -> Result<OwnedFd> {
        let dir = self.snapshots_dir();
        at::open_dir(None, &dir).map_err(|e| Error::io("opening", dir, e))
    }

    /// Creates the directories of a new snapshot `id`, giving `fs` the `owner` if any (a
    /// child's upper directory takes the owner of its parent's, as containerd's overlay
    /// snapshotter does).
    ///
    /// `snapshots/<id>` must not exist yet: its record committed just before, and an ID is
    /// never handed out twice, so whatever is already there was not made for this snapshot. It
    /// is left as it is, and the answer is [`Error::Occupied`].
    pub fn make_dirs(&self, id: u64, with_work: bool, owner: Option<(u32, u32)>) -> Result<()> {
        let snapshots = self.open_snapshots()?;
        make_tree(&snapshots, &id.to_string(), with_work, false)
            .map_err(|e| self.dir_error(id, e))?;
        self.set_owner(&snapshots, id, owner)
    }

    /// Completes the directories of snapshot `id` that a crash left half made (start-up
    /// recovery, fsck): what exists is kept, but only directories count; a symlink or a file
    /// where one should be is an error, never followed.
    pub fn complete_dirs(&self, id: u64, with_work: bool, owner: Option<(u32, u32)>) -> Result<()> {
        let snapshots = self.open_snapshots()?;
        make_tree(&snapshots, &id.to_string(), with_work, true)
            .map_err(|e| self.dir_error(id, e))?;
        self.set_owner(&snapshots, id, owner)
    }

    fn dir_error(&self, id: u64, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::AlreadyExists {
            Error::Occupied(self.dir(id))
        } else {
            Error::io("creating the directories of", self.dir(id), e)
        }
    }

    fn set_owner(&self, snapshots: &OwnedFd, id: u64, owner: Option<(u32, u32)>) -> Result<()> {
        let Some(owner) = owner else { return Ok(()) };
        at::open_dir(Some(snapshots), &*id.to_string())
            .and_then(|dir| at::chown(&dir, "fs", owner))
            .map_err(|e| Error::io("changing owner of", self.fs(id), e))
    }

    pub(super) fn make_spare_root(&self) -> Result<()> {
        let root =
            at::open_dir(None, &self.root).map_err(|e| Error::io("opening", &self.root, e))?;
        make_dir(&root, "spare", 0o700, true)
            .map_err(|e| Error::io("creating", self.spare_dir(), e))
    }

    /// Makes spare tree `n`: the directories of a snapshot, with the same modes, that belong to
    /// no snapshot yet.
    pub(super) fn make_spare(&self, n: u64, with_work: bool) -> Result<PathBuf> {
        let name = format!("{}-{n}", if with_work { "a" } else { "v" });
        let tree = self.spare_dir().join(&name);
        let spare = at::open_dir(None, &self.spare_dir())
            .map_err(|e| Error::io("opening", self.spare_dir(), e))?;
        make_tree(&spare, &name, with_work, false).map_err(|e| Error::io("creating", &tree, e))?;
        Ok(tree)
    }

    /// Moves a spare tree into place as snapshot `id`'s directories (one rename on the same
    /// filesystem), then gives `fs` its owner as [`Layout::make_dirs`] does. As there, an
    /// existing `snapshots/<id>` is [`Error::Occupied`] and left as it is (a plain rename would
    /// replace an empty directory, and fail on others only by chance of their contents).
    pub(super) fn adopt(&self, tree: &Path, id: u64, owner: Option<(u32, u32)>) -> Result<()> {
        let snapshots = self.open_snapshots()?;
        at::rename_new(None, tree, &snapshots, &id.to_string()).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Error::Occupied(self.dir(id))
            } else {
                Error::io("moving a spare directory to", self.dir(id), e)
            }
        })?;
        // Spares are made by this process, so they already have its owner.
        let ours = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        self.set_owner(&snapshots, id, owner.filter(|&o| o != ours))
    }

    /// Makes snapshot `id` durable: the files and directories written into it, and the
    /// directories lamina made for it (`snapshots/<id>`, made by mkdir or renamed from
    /// `spare/`, with its `fs` and `work`), all reach the disk before this returns.
    ///
    /// One syncfs(2) of the filesystem holding it, not an fsync per file and per parent
    /// directory: on ext4 and xfs, syncfs writes back every dirty page of the filesystem, then
    /// its dirty inodes, and commits the journal (ext4) or forces the log (xfs) before it
    /// returns. The entries lamina created at Prepare are metadata of that same filesystem, so
    /// they are in that commit too; nothing needs an fsync of its own. It costs the writeback
    /// of whatever else is dirty on the filesystem at that moment (data the kernel would write
    /// within about 30 s anyway), and one journal commit instead of one per file.
    ///
    /// Errors: syncfs reports a writeback error of the filesystem that no syncfs has reported
    /// yet (Linux 5.8+), even one from before the descriptor was opened, so a layer whose
    /// pages failed to reach the disk in the background fails its Commit. An error is
    /// reported to one syncfs only: of two Commits at once, the one that fails may not be the
    /// one whose page was lost.
    pub fn sync_snapshot(&self, id: u64) -> Result<()> {
        use std::os::{fd::AsRawFd, unix::fs::OpenOptionsExt};
        let dir = self.dir(id);
        let handle = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&dir)
            .map_err(|e| Error::io("opening snapshot directory", &dir, e))?;
        nix::unistd::syncfs(handle.as_raw_fd())
            .map_err(|e| Error::io("syncing the filesystem of", &dir, io::Error::from(e)))
    }

    /// The uid and gid of snapshot `id`'s `fs` directory.
    pub fn owner(&self, id: u64) -> Result<(u32, u32)> {
        match self.inspect(id, Part::Fs) {
            Ok(Some(st)) if at::is_dir(&st) => Ok((st.st_uid, st.st_gid)),
            Ok(_) => Err(Error::io(
                "reading owner of",
                self.fs(id),
                io::Error::from_raw_os_error(libc::ENOTDIR),
            )),
            Err(e) => Err(Error::io("reading owner of", self.fs(id), e)),
        }
    }

    /// The status of `part` of snapshot `id` as it is on disk, symlinks not followed: `None`
    /// when nothing is there. A symlink or file in place of `snapshots/<id>` makes the parts
    /// inside it unreachable (ENOTDIR or ELOOP), not followed.
    pub fn inspect(&self, id: u64, part: Part) -> io::Result<Option<FileStat>> {
        let snapshots = at::open_dir(None, &self.snapshots_dir())?;
        let found = match part {
            Part::Dir => at::stat(&snapshots, &*id.to_string()),
            Part::Fs | Part::Work => at::open_dir(Some(&snapshots), &*id.to_string())
                .and_then(|dir| at::stat(&dir, part.name())),
        };
        match found {
            Ok(st) => Ok(Some(st)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets the mode of `part` of snapshot `id`, which must be a directory (not followed if it
    /// is a symlink).
    pub fn set_mode(&self, id: u64, part: Part, mode: u32) -> Result<()> {
        let path = self.part(id, part);
        let snapshots = self.open_snapshots()?;
        let mut dir = at::open_dir(Some(&snapshots), &*id.to_string());
        if part != Part::Dir {
            dir = dir.and_then(|d| at::open_dir(Some(&d), part.name()));
        }
        dir.and_then(|d| at::chmod(&d, mode))
            .map_err(|e| Error::io("setting mode of", path, e))
    }

    /// The path of `part` of snapshot `id`, for messages and mount specs.
    pub fn part(&self, id: u64, part: Part) -> PathBuf {
        match part {
            Part::Dir => self.dir(id),
            Part::Fs => self.fs(id),
            Part::Work => self.work(id),
        }
    }

    /// Deletes snapshot `id`'s directory tree; a missing tree is not an error.
    pub fn delete_dirs(&self, id: u64) -> Result<()> {
        let mut out = self.delete_trees(&[id])?;
        out.pop().unwrap_or(Ok(0)).map(drop)
    }

    /// Deletes the trees of snapshots `ids` at once, on up to [`DELETE_THREADS`] threads (see
    /// `delete.rs` for why so many). For each: the bytes freed, or why it is not all gone.
    pub fn delete_trees(&self, ids: &[u64]) -> Result<Vec<Result<u64>>> {
        self.delete_trees_until(ids, &std::sync::atomic::AtomicBool::new(false))
    }

    /// [`Layout::delete_trees`], given up once `stop` is set (see `delete::delete_trees_until`).
    pub fn delete_trees_until(
        &self,
        ids: &[u64],
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Vec<Result<u64>>> {
        let names: Vec<String> = ids.iter().map(u64::to_string).collect();
        super::delete::delete_trees_until(&self.snapshots_dir(), &names, DELETE_THREADS, stop)
    }

    /// Lists `<root>/snapshots`. Costs one directory read; only Cleanup and start-up call it.
    pub fn list(&self) -> Result<Vec<DirEntry>> {
        let dir = self.snapshots_dir();
        let entries = fs::read_dir(&dir).map_err(|e| Error::io("listing", &dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only directories can be lamina's: a file or symlink with a decimal name is not.
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            out.push(if is_dir {
                parse_entry(&name)
            } else {
                DirEntry::Foreign(name)
            });
        }
        Ok(out)
    }
}

/// Deletes the tree `name` inside `parent` the way snapshot trees are deleted (see
/// `delete.rs`): never following a symlink, never descending into anything mounted inside it
/// (that part is left, and reported). For lamina's scratch directories outside `snapshots/`.
pub fn delete_tree(parent: &Path, name: &str) -> Result<u64> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut out = super::delete::delete_trees_until(parent, &[name.to_string()], 1, &stop)?;
    out.pop().unwrap_or(Ok(0))
}

/// Only canonical decimal names are IDs: `007` or `+7` were not written by lamina.
fn parse_entry(name: &str) -> DirEntry {
    match name.parse::<u64>() {
        Ok(id) if id.to_string() == name => DirEntry::Id(id),
        _ => DirEntry::Foreign(name.to_string()),
    }
}

/// The directories of one snapshot, with the modes of the contract: `name` 0700, `name/fs`
/// 0755, and `name/work` 0711 when asked, made in `parent`. With `existing`, what is there
/// already is kept (completing a half-made tree); else `name` must be new (EEXIST).
fn make_tree(parent: &OwnedFd, name: &str, with_work: bool, existing: bool) -> io::Result<()> {
    make_dir(parent, name, 0o700, existing)?;
    // Inside a directory just made (0700, lamina's own) nothing else can have put anything, but
    // a half-made tree is completed after a crash, so the names inside are never followed
    // either.
    let dir = at::open_dir(Some(parent), name)?;
    make_dir(&dir, "fs", 0o755, true)?;
    if with_work {
        make_dir(&dir, "work", 0o711, true)?;
    }
    Ok(())
}

/// Makes directory `name` in `parent` with exactly `mode`. With `existing`, a directory already
/// there is accepted as it is (but not a symlink or a file).
fn make_dir(parent: &OwnedFd, name: &str, mode: u32, existing: bool) -> io::Result<()> {
    match at::mkdir(parent, name, mode) {
        Ok(()) => {}
        Err(e) if existing && e.kind() == io::ErrorKind::AlreadyExists => {
            // Not followed: a symlink here fails to open as a directory.
            at::open_dir(Some(parent), name)?;
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    // The process umask may have masked bits off; the modes are part of the contract. Only
    // then is a chmod needed (most umasks, e.g. systemd's 022, leave these modes whole).
    if mode & umask() == 0 {
        return Ok(());
    }
    at::chmod(&at::open_dir(Some(parent), name)?, mode)
}

/// The process umask, read once from `/proc/self/status` (reading it with umask(2) would have
/// to change it, racing other threads). Unknown: every bit, so that every mode is set by chmod.
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("Umask:"))?;
                u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
            })
            .unwrap_or(0o7777)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_decimal_names_are_ids() {
        assert_eq!(parse_entry("12"), DirEntry::Id(12));
        assert_eq!(parse_entry("012"), DirEntry::Foreign("012".into()));
        assert_eq!(parse_entry("new-1"), DirEntry::Foreign("new-1".into()));
        assert_eq!(parse_entry("+3"), DirEntry::Foreign("+3".into()));
    }

    #[test]
    fn reads_the_process_umask() {
        // Tests run with whatever umask they inherit; compare with what the kernel says.
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        assert_eq!(umask(), u32::from_str_radix(line[6..].trim(), 8).unwrap());
        assert!(umask() <= 0o777);
    }

    #[test]
    fn creates_dirs_with_contract_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path().join("root"));
        layout.init().unwrap();
        layout.make_dirs(3, true, None).unwrap();
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(layout.root().to_path_buf()), 0o700);
        assert_eq!(mode(layout.fs(3)), 0o755);
        assert_eq!(mode(layout.work(3)), 0o711);
        // A new snapshot's place must be free: what is there is not taken over.
        let again = layout.make_dirs(3, true, None);
        assert!(matches!(again, Err(Error::Occupied(_))), "{again:?}");
        // Recovery completes a half-made snapshot.
        fs::remove_dir(layout.work(3)).unwrap();
        layout.complete_dirs(3, true, None).unwrap();
        assert!(layout.work(3).is_dir());
        assert_eq!(layout.list().unwrap(), vec![DirEntry::Id(3)]);
        layout.delete_dirs(3).unwrap();
        layout.delete_dirs(3).unwrap();
        assert!(layout.list().unwrap().is_empty());
    }

    #[test]
    fn a_symlink_in_a_snapshot_s_place_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path().join("root"));
        layout.init().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, layout.dir(4)).unwrap();
        assert!(matches!(
            layout.make_dirs(4, true, Some((1, 1))),
            Err(Error::Occupied(_))
        ));
        assert!(layout.complete_dirs(4, true, Some((1, 1))).is_err());
        assert!(layout.set_mode(4, Part::Dir, 0o777).is_err());
        assert!(layout.owner(4).is_err());
        let st = layout.inspect(4, Part::Dir).unwrap().unwrap();
        assert!(!at::is_dir(&st));
        assert!(layout.inspect(4, Part::Fs).is_err());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        let mode = fs::metadata(&outside).unwrap().permissions().mode() & 0o777;
        assert_ne!(mode, 0o777);
    }
}
