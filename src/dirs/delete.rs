//! Deleting many directory trees at once: the deleter's batches (after Remove, for Cleanup and
//! for the orphans start-up finds), and lamina's scratch trees.
//!
//! On a filesystem mounted with `discard` (this project's VM and many cloud disks), freeing a
//! file's blocks waits for the disk to acknowledge their discard: deletion is bound by I/O
//! latency, not by CPU, and goes faster the more unlinks are in flight. The evicting part of an
//! unlink runs after the kernel has let go of the directory's lock, so even one directory of
//! 20,000 files can be emptied by many threads at once. Measured on this VM, three layers of
//! 20,000 files plus 3,000 small trees: `rm -rf` 6.4 s, 16 parallel deleters 1.9 s.
//!
//! Every directory is opened relative to its parent with `O_NOFOLLOW` and its entries are
//! unlinked relative to that descriptor, so a symlink put in place of a directory meanwhile
//! is unlinked, never followed, and no path outside the tree is ever touched. A tree that has
//! something mounted inside it (another filesystem, or a bind mount of a directory elsewhere on
//! this one, such as a volume propagated back from a container) is left (that part of it) and
//! reported.
//!
//! A container can nest directories far beyond PATH_MAX. Memory grows with such a tree's depth,
//! not with its square (a directory being emptied holds its name, not its path), and the climb
//! back up, removing directories that are done, is a loop, not a recursion that could overflow
//! the stack. Each level does hold a descriptor while it is emptied, so the depth deleted is
//! bounded by the open-file limit (lamina's unit allows a million); what is left is reported.

use std::{
    ffi::{CStr, CString, OsStr},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use nix::{
    dir::{Dir, Type},
    errno::Errno,
    fcntl::{openat, AtFlags, OFlag},
    sys::stat::{fstatat, FileStat, Mode},
    unistd::{unlinkat, UnlinkatFlags},
};

use crate::error::{Error, Result};

/// Entries one task unlinks: a big directory is shared among the threads in chunks.
const CHUNK: usize = 256;

/// Deletes the trees `names` (entries of the directory `parent`) on up to `threads` threads.
/// For each tree: the bytes its deletion freed, or the first thing that stopped part of it
/// from being deleted. A tree that does not exist is deleted already (0 bytes).
#[cfg(test)]
pub fn delete_trees(parent: &Path, names: &[String], threads: usize) -> Result<Vec<Result<u64>>> {
    delete_trees_until(parent, names, threads, &AtomicBool::new(false))
}

/// [`delete_trees`], given up between two tasks once `stop` is set (the daemon is stopping and
/// a tree of millions of files must not hold it up): the error is then `Unavailable`, and what
/// is left of the trees is nobody's, for the next start-up to delete.
pub fn delete_trees_until(
    parent: &Path,
    names: &[String],
    threads: usize,
    stop: &AtomicBool,
) -> Result<Vec<Result<u64>>> {
    let base = open_dir(None, parent).map_err(|e| Error::io("opening", parent, e.into()))?;
    let (mount, _) = stat_dir(&base).map_err(|e| Error::io("reading", parent, e.into()))?;
    let mut tasks = Vec::with_capacity(names.len());
    for (tree, name) in names.iter().enumerate() {
        let name = CString::new(name.as_str()).map_err(|_| {
            Error::Internal(format!(
                "tree name {name:?} has a NUL byte; not deleting it"
            ))
        })?;
        tasks.push(Task::Open {
            parent: None,
            name,
            tree,
        });
    }
    let deleter = Deleter {
        base,
        base_path: parent,
        mount,
        trees: names.iter().map(|_| Tree::default()).collect(),
    };
    let stopped = crate::pool::run(threads, tasks, |task, _: &mut ()| {
        if stop.load(Ordering::Relaxed) {
            return Err(());
        }
        Ok(deleter.run(task))
    });
    if stopped.is_err() {
        return Err(Error::Unavailable(
            "lamina is stopping; the rest of this deletion is left for its next start".into(),
        ));
    }
    Ok(deleter
        .trees
        .into_iter()
        .map(
            |t| match t.failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                Some(err) => Err(err),
                None => Ok(t.bytes.into_inner()),
            },
        )
        .collect())
}

#[derive(Default)]
struct Tree {
    bytes: AtomicU64,
    failed: Mutex<Option<Error>>,
}

/// A directory being emptied, kept open so that its entries are unlinked relative to it.
struct Node {
    fd: OwnedFd,
    /// Its name in its parent.
    name: CString,
    /// `None` for a tree's top, whose parent is the base directory.
    parent: Option<Arc<Node>>,
    tree: usize,
    /// Tasks still working inside it; the last one to finish removes it.
    pending: AtomicUsize,
}

impl Drop for Node {
    /// Lets go of the ancestors that only this node kept alive one by one, rather than by the
    /// recursion of nested drops, which a deep enough tree would overflow.
    fn drop(&mut self) {
        let mut next = self.parent.take();
        while let Some(node) = next {
            next = match Arc::try_unwrap(node) {
                Ok(mut node) => node.parent.take(),
                Err(_) => None,
            };
        }
    }
}

enum Task {
    /// Open directory `name` of `parent` (the base if `None`) and hand out its entries.
    Open {
        parent: Option<Arc<Node>>,
        name: CString,
        tree: usize,
    },
    /// Unlink these entries (not directories, as far as the listing said) of `node`.
    Unlink {
        node: Arc<Node>,
        names: Vec<CString>,
    },
}

struct Deleter<'a> {
    base: OwnedFd,
    base_path: &'a Path,
    /// What a directory must be on to be deleted into (see [`Mount`]).
    mount: Mount,
    trees: Vec<Tree>,
}

impl Deleter<'_> {
    fn run(&self, task: Task) -> Vec<Task> {
        match task {
            Task::Open { parent, name, tree } => self.open(parent, name, tree),
            Task::Unlink { node, names } => {
                let mut more = Vec::new();
                for name in names {
                    if let Some(dir) = self.unlink(&node, name) {
                        more.push(dir);
                    }
                }
                self.finished(Some(node));
                more
            }
        }
    }

    fn dir_of(&self, parent: Option<&Node>) -> RawFd {
        match parent {
            Some(p) => p.fd.as_raw_fd(),
            None => self.base.as_raw_fd(),
        }
    }

    /// The path of entry `name` of `at` (the base if `None`), for messages.
    fn path(&self, mut at: Option<&Node>, name: &CStr) -> PathBuf {
        let mut names = vec![name];
        while let Some(node) = at {
            names.push(&node.name);
            at = node.parent.as_deref();
        }
        let mut path = self.base_path.to_path_buf();
        for name in names.iter().rev() {
            path.push(OsStr::from_bytes(name.to_bytes()));
        }
        path
    }

    fn fail(&self, tree: usize, context: &'static str, path: PathBuf, err: Errno) {
        self.failed(tree, Error::io(context, path, io::Error::from(err)));
    }

    /// Keeps the first error of a tree; the rest of it is still deleted as far as it can be.
    fn failed(&self, tree: usize, err: Error) {
        let mut failed = self.trees[tree]
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert(err);
    }

    fn freed(&self, tree: usize, bytes: u64) {
        self.trees[tree].bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn open(&self, parent: Option<Arc<Node>>, name: CString, tree: usize) -> Vec<Task> {
        let Some((fd, dirs, files)) = self.read(parent.as_deref(), &name, tree) else {
            // Nothing to descend into: the parent waits for this entry no longer.
            self.finished(parent);
            return Vec::new();
        };
        let chunks = files.len().div_ceil(CHUNK);
        let node = Arc::new(Node {
            fd,
            name,
            parent,
            tree,
            pending: AtomicUsize::new(dirs.len() + chunks),
        });
        if dirs.is_empty() && chunks == 0 {
            self.remove(node);
            return Vec::new();
        }
        let mut tasks: Vec<Task> = dirs
            .into_iter()
            .map(|name| Task::Open {
                parent: Some(Arc::clone(&node)),
                name,
                tree,
            })
            .collect();
        let mut files = files.into_iter().peekable();
        while files.peek().is_some() {
            tasks.push(Task::Unlink {
                node: Arc::clone(&node),
                names: files.by_ref().take(CHUNK).collect(),
            });
        }
        tasks
    }

    /// Opens and lists directory `name` of `at`. `None` when there is nothing to descend
    /// into: it is gone already, it was not a directory (and is unlinked instead), or it
    /// failed (recorded for `tree`).
    fn read(
        &self,
        parent: Option<&Node>,
        name: &CStr,
        tree: usize,
    ) -> Option<(OwnedFd, Vec<CString>, Vec<CString>)> {
        let at = self.dir_of(parent);
        let path = || self.path(parent, name);
        let fd = match open_dir(Some(at), name) {
            Ok(fd) => fd,
            // Deleted already (a tree removed twice, or its parent's listing is stale).
            Err(Errno::ENOENT) => return None,
            // Not a directory any more: unlink whatever it is instead, without following it.
            Err(Errno::ENOTDIR | Errno::ELOOP) => {
                match unlinkat(Some(at), name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(err) => self.fail(tree, "removing", path(), err),
                }
                return None;
            }
            Err(err) => {
                self.fail(tree, "opening", path(), err);
                return None;
            }
        };
        let listed = stat_dir(&fd).and_then(|(mount, bytes)| {
            if mount != self.mount {
                return Err(Errno::EXDEV);
            }
            self.freed(tree, bytes);
            list(&fd)
        });
        match listed {
            Ok((dirs, files)) => Some((fd, dirs, files)),
            Err(Errno::EXDEV) => {
                self.failed(
                    tree,
                    Error::Unsupported(format!(
                        "{} is a mount point inside a snapshot's tree: not deleting into \
                         it; unmount it, then run Cleanup again",
                        path().display()
                    )),
                );
                None
            }
            Err(err) => {
                self.fail(tree, "listing", path(), err);
                None
            }
        }
    }

    /// Unlinks one entry of `node`; a directory found in its place becomes a task to open.
    fn unlink(&self, node: &Arc<Node>, name: CString) -> Option<Task> {
        let stat = match fstatat(
            Some(node.fd.as_raw_fd()),
            name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return None,
            Err(err) => {
                self.fail(node.tree, "reading", self.path(Some(node), &name), err);
                return None;
            }
        };
        if is_dir(&stat) {
            node.pending.fetch_add(1, Ordering::Relaxed);
            return Some(Task::Open {
                parent: Some(Arc::clone(node)),
                name,
                tree: node.tree,
            });
        }
        match unlinkat(
            Some(node.fd.as_raw_fd()),
            name.as_c_str(),
            UnlinkatFlags::NoRemoveDir,
        ) {
            // Blocks are freed with an inode's last link; a file linked twice counts once.
            Ok(()) if stat.st_nlink <= 1 => self.freed(node.tree, stat.st_blocks as u64 * 512),
            Ok(()) => {}
            Err(Errno::ENOENT) => {}
            Err(err) => self.fail(node.tree, "removing", self.path(Some(node), &name), err),
        }
        None
    }

    /// One task inside `parent` is over; the last one removes it (and so on upwards).
    fn finished(&self, parent: Option<Arc<Node>>) {
        if let Some(node) = parent {
            if node.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.remove(node);
            }
        }
    }

    /// Removes `node`, now empty, from its parent; then the parent too if that was the last
    /// thing it waited for, and so on upwards.
    fn remove(&self, mut node: Arc<Node>) {
        loop {
            let at = self.dir_of(node.parent.as_deref());
            match unlinkat(Some(at), node.name.as_c_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                // Not empty: something inside failed (and was reported), or was created
                // meanwhile.
                Err(Errno::ENOTEMPTY)
                    if self.trees[node.tree]
                        .failed
                        .lock()
                        .is_ok_and(|f| f.is_some()) => {}
                Err(err) => {
                    let path = self.path(node.parent.as_deref(), &node.name);
                    self.fail(node.tree, "removing", path, err)
                }
            }
            let Some(parent) = node.parent.clone() else {
                return;
            };
            drop(node);
            if parent.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
                return;
            }
            node = parent;
        }
    }
}

/// The mount a directory is reached through: its device and, where the kernel reports it
/// (5.8 and later), its mount ID. The device alone tells filesystems apart but not a bind
/// mount from the same filesystem.
type Mount = (u64, Option<u64>);

/// An open directory's mount and the bytes of its own blocks, from one `statx`.
fn stat_dir(fd: &OwnedFd) -> nix::Result<(Mount, u64)> {
    // SAFETY: `statx` is plain data, for which all zeroes is a valid value.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx only writes into `buf`, which has the right type, and reads the empty,
    // NUL-terminated path; the descriptor stays open for the whole call.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BLOCKS | libc::STATX_MNT_ID,
            &mut buf,
        )
    };
    Errno::result(rc)?;
    let dev = libc::makedev(buf.stx_dev_major, buf.stx_dev_minor);
    let id = (buf.stx_mask & libc::STATX_MNT_ID != 0).then_some(buf.stx_mnt_id);
    Ok(((dev, id), buf.stx_blocks * 512))
}

fn is_dir(stat: &FileStat) -> bool {
    stat.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn open_dir<P: ?Sized + nix::NixPath>(at: Option<RawFd>, path: &P) -> nix::Result<OwnedFd> {
    let fd = openat(
        at,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `openat` just returned this descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The entries of an open directory: (subdirectories, everything else).
fn list(fd: &OwnedFd) -> nix::Result<(Vec<CString>, Vec<CString>)> {
    // `Dir` closes what it is given; it gets a duplicate, and `fd` stays open for the unlinks.
    let dup = fd
        .try_clone()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    let mut dir = Dir::from(dup)?;
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    for entry in dir.iter() {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        // Without a type in the listing, the unlink task looks (and opens a directory).
        match entry.file_type() {
            Some(Type::Directory) => dirs.push(name.to_owned()),
            _ => files.push(name.to_owned()),
        }
    }
    Ok((dirs, files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, os::unix::fs::PermissionsExt};

    fn names(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// Two trees like layers: a big directory, a deep one, a symlink; optionally a file
    /// linked twice.
    fn make_trees(base: &Path, hard_link: bool) {
        for t in ["1", "2"] {
            let d = base.join(t).join("fs/deep/er");
            fs::create_dir_all(&d).unwrap();
            // More than a chunk in one directory, so it is shared among threads.
            for f in 0..(CHUNK * 3 + 7) {
                fs::write(base.join(t).join(format!("fs/f{f}")), vec![1u8; 5000]).unwrap();
            }
            fs::write(d.join("x"), b"x").unwrap();
            std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap();
            if hard_link {
                fs::hard_link(d.join("x"), base.join(t).join("fs/x2")).unwrap();
            }
        }
    }

    #[test]
    fn deletes_whole_trees_and_counts_what_they_freed() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        fs::create_dir(base.join("keep")).unwrap();
        // Two links unlinked at the same instant by two threads may both look shared, so the
        // exact count of a hard-linked file is checked on one thread.
        for (threads, hard_link) in [(1, true), (16, false)] {
            make_trees(base, hard_link);
            let want: Vec<u64> = ["1", "2"]
                .iter()
                .map(|t| crate::overlay::usage::walk(&base.join(t)).unwrap().size as u64)
                .collect();
            let out = delete_trees(base, &names(&["1", "2", "missing"]), threads).unwrap();
            let got: Vec<u64> = out.into_iter().map(|r| r.unwrap()).collect();
            assert_eq!(got, vec![want[0], want[1], 0], "{threads} threads");
            assert!(!base.join("1").exists() && !base.join("2").exists());
            assert!(base.join("keep").is_dir());
        }
        assert!(
            fs::metadata("/etc/passwd").is_ok(),
            "a symlink is not followed"
        );
    }

    #[test]
    fn a_tree_deeper_than_path_max_is_deleted() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        // The deleter holds a descriptor per level while it works down a tree; lamina's unit
        // allows a million. Here: as many as the limits allow (root may raise them).
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let want = hard.max(if nix::unistd::geteuid().is_root() {
            65_536
        } else {
            0
        });
        let limit = match setrlimit(Resource::RLIMIT_NOFILE, want, want) {
            Ok(()) => want,
            Err(_) => {
                setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
                hard
            }
        };
        let depth = 20_000.min(limit.saturating_sub(500) as usize);
        // Not a TempDir: on failure, its recursive cleanup would overflow the stack on this
        // tree and hide the assertion's message.
        let base = tempfile::tempdir().unwrap().keep();
        // Nested directories (a path of 2 bytes a level) made relative to each other, as a
        // container can. Deleting them climbs back up every level, which recursion would do
        // on a thread's stack at its peril.
        fs::create_dir(base.join("9")).unwrap();
        let mut at = open_dir(None, &base.join("9")).unwrap();
        let mode = Mode::from_bits_truncate(0o755);
        for _ in 0..depth {
            nix::sys::stat::mkdirat(Some(at.as_raw_fd()), "d", mode).unwrap();
            at = open_dir(Some(at.as_raw_fd()), "d").unwrap();
        }
        nix::sys::stat::mkdirat(Some(at.as_raw_fd()), "leaf", mode).unwrap();
        drop(at);
        let out = delete_trees(&base, &names(&["9"]), 4).unwrap();
        assert!(out[0].is_ok(), "{depth} levels: {:.300?}", out[0]);
        assert!(!base.join("9").exists());
        fs::remove_dir(&base).unwrap();
    }

    #[test]
    fn a_bind_mount_inside_a_tree_is_not_deleted_into() {
        if !crate::testing::mounting_allowed() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        let outside = tmp.path().join("volume");
        fs::create_dir_all(base.join("3/fs/vol")).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), b"p").unwrap();
        // Same filesystem, so the same device: only the mount ID tells it apart (as with a
        // volume propagated back into a snapshot from a container).
        crate::testing::bind(&outside, &base.join("3/fs/vol"));
        let out = delete_trees(&base, &names(&["3"]), 2);
        crate::sys::unmount(&base.join("3/fs/vol")).unwrap();
        let err = out.unwrap().remove(0).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("3/fs/vol"), "{err}");
        assert!(
            outside.join("precious").exists(),
            "nothing deleted through the mount"
        );
    }

    #[test]
    fn a_tree_that_is_a_symlink_is_unlinked_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), b"p").unwrap();
        let base = tmp.path().join("base");
        fs::create_dir(&base).unwrap();
        std::os::unix::fs::symlink(&outside, base.join("7")).unwrap();
        let out = delete_trees(&base, &names(&["7"]), 4).unwrap();
        assert!(out[0].is_ok(), "{out:?}");
        assert!(!base.join("7").exists());
        assert!(outside.join("precious").exists());
    }

    #[test]
    fn a_failure_is_reported_for_its_tree_only() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        fs::create_dir_all(base.join("1/fs")).unwrap();
        fs::create_dir_all(base.join("2/fs")).unwrap();
        fs::write(base.join("2/fs/f"), b"f").unwrap();
        // A file whose name cannot be passed on is refused up front, deleting nothing.
        assert!(delete_trees(base, &names(&["1", "a\0b"]), 2).is_err());
        assert!(base.join("1").exists());
        // A tree that cannot be listed: its error names the path; the other tree goes.
        let unreadable = base.join("2/fs");
        let out = if nix::unistd::geteuid().is_root() {
            // Root reads anything; a mount inside the tree is what stops it instead.
            nix::mount::mount(
                Some("tmpfs"),
                &unreadable,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            let out = delete_trees(base, &names(&["1", "2"]), 2);
            crate::sys::unmount(&unreadable).unwrap();
            let out = out.unwrap();
            assert!(
                unreadable.join("f").exists(),
                "nothing deleted inside the mount"
            );
            out
        } else {
            fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o000)).unwrap();
            let out = delete_trees(base, &names(&["1", "2"]), 2).unwrap();
            fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o755)).unwrap();
            out
        };
        assert!(out[0].is_ok(), "{out:?}");
        let err = out[1].as_ref().unwrap_err().to_string();
        assert!(err.contains("2/fs"), "{err}");
        assert!(!base.join("1").exists());
        assert!(base.join("2/fs").exists());
    }
}
