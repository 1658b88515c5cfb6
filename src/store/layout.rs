//! Where things live under the root, and the only code that creates or deletes snapshot
//! directories.
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
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

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

    /// Creates the root and `snapshots/` with their modes, fixing the modes of existing ones.
    pub fn init(&self) -> Result<()> {
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

    /// Creates (or completes) the directories of snapshot `id`. Idempotent, so start-up recovery
    /// can finish what a crash interrupted. `owner` is applied to `fs` (a child's upper directory
    /// takes the owner of its parent's, as containerd's overlay snapshotter does).
    pub fn create_dirs(&self, id: u64, with_work: bool, owner: Option<(u32, u32)>) -> Result<()> {
        make_tree(&self.dir(id), with_work)?;
        match owner {
            Some(owner) => set_owner(&self.fs(id), owner),
            None => Ok(()),
        }
    }

    pub(super) fn make_spare_root(&self) -> Result<()> {
        make_dir(&self.spare_dir(), 0o700)
    }

    /// Makes spare tree `n`: the directories of a snapshot, with the same modes, that belong to
    /// no snapshot yet.
    pub(super) fn make_spare(&self, n: u64, with_work: bool) -> Result<PathBuf> {
        let tree = self
            .spare_dir()
            .join(format!("{}-{n}", if with_work { "a" } else { "v" }));
        make_tree(&tree, with_work)?;
        Ok(tree)
    }

    /// Moves a spare tree into place as snapshot `id`'s directories (one rename on the same
    /// filesystem), then gives `fs` its owner as [`Layout::create_dirs`] does.
    pub(super) fn adopt(&self, tree: &Path, id: u64, owner: Option<(u32, u32)>) -> Result<()> {
        let dir = self.dir(id);
        fs::rename(tree, &dir).map_err(|e| Error::io("moving a spare directory to", &dir, e))?;
        // Spares are made by this process, so they already have its owner.
        let ours = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        match owner.filter(|&o| o != ours) {
            Some(owner) => set_owner(&self.fs(id), owner),
            None => Ok(()),
        }
    }

    /// The uid and gid of snapshot `id`'s `fs` directory.
    pub fn owner(&self, id: u64) -> Result<(u32, u32)> {
        let path = self.fs(id);
        let meta = fs::metadata(&path).map_err(|e| Error::io("reading owner of", &path, e))?;
        Ok((meta.uid(), meta.gid()))
    }

    /// Deletes snapshot `id`'s directory tree; a missing tree is not an error.
    pub fn remove_dirs(&self, id: u64) -> Result<()> {
        let mut out = self.remove_trees(&[id])?;
        out.pop().unwrap_or(Ok(0)).map(drop)
    }

    /// Deletes the trees of snapshots `ids` at once, on up to [`DELETE_THREADS`] threads (see
    /// `delete.rs` for why so many). For each: the bytes freed, or why it is not all gone.
    pub fn remove_trees(&self, ids: &[u64]) -> Result<Vec<Result<u64>>> {
        self.remove_trees_until(ids, &std::sync::atomic::AtomicBool::new(false))
    }

    /// [`Layout::remove_trees`], given up once `stop` is set (see `delete::remove_trees_until`).
    pub fn remove_trees_until(
        &self,
        ids: &[u64],
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Vec<Result<u64>>> {
        let names: Vec<String> = ids.iter().map(u64::to_string).collect();
        super::delete::remove_trees_until(&self.snapshots_dir(), &names, DELETE_THREADS, stop)
    }

    pub fn exists(&self, id: u64) -> bool {
        self.dir(id).exists()
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

/// Only canonical decimal names are IDs: `007` or `+7` were not written by lamina.
fn parse_entry(name: &str) -> DirEntry {
    match name.parse::<u64>() {
        Ok(id) if id.to_string() == name => DirEntry::Id(id),
        _ => DirEntry::Foreign(name.to_string()),
    }
}

/// The directories of one snapshot, with the modes of the contract: `dir` 0700, `dir/fs`
/// 0755, and `dir/work` 0711 when asked. Idempotent.
fn make_tree(dir: &Path, with_work: bool) -> Result<()> {
    make_dir(dir, 0o700)?;
    make_dir(&dir.join("fs"), 0o755)?;
    if with_work {
        make_dir(&dir.join("work"), 0o711)?;
    }
    Ok(())
}

fn set_owner(path: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| Error::io("changing owner of", path, e))
}

fn make_dir(path: &Path, mode: u32) -> Result<()> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(Error::io("creating directory", path, e));
        }
        _ => {}
    }
    // The process umask may have masked bits off; the modes are part of the contract. Only
    // then is a chmod needed (most umasks, e.g. systemd's 022, leave these modes whole).
    if mode & umask() == 0 {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("setting mode of", path, e))
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
        layout.create_dirs(3, true, None).unwrap();
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(layout.root().to_path_buf()), 0o700);
        assert_eq!(mode(layout.fs(3)), 0o755);
        assert_eq!(mode(layout.work(3)), 0o711);
        // Idempotent: recovery calls it again on a half-made snapshot.
        fs::remove_dir(layout.work(3)).unwrap();
        layout.create_dirs(3, true, None).unwrap();
        assert!(layout.work(3).is_dir());
        assert_eq!(layout.list().unwrap(), vec![DirEntry::Id(3)]);
        layout.remove_dirs(3).unwrap();
        layout.remove_dirs(3).unwrap();
        assert!(layout.list().unwrap().is_empty());
    }
}
