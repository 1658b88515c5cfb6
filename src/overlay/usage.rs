//! Disk usage of one snapshot directory, counted the way containerd counts it.
//!
//! The tree is a container's upper directory: its contents are the container's to change while
//! lamina measures, a directory swapped for a symlink to `/` included. So every directory is
//! opened relative to its parent with `O_NOFOLLOW` and every entry is looked at without
//! following it (see `sys::at`): nothing outside the tree is ever counted or read.

use std::{collections::HashSet, ffi::CString, io, os::fd::OwnedFd, path::Path, sync::Arc};

use nix::sys::stat::FileStat;

use serde::{Deserialize, Serialize};

use crate::sys::at;

/// The disk space a snapshot's own directory takes, as containerd reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes of the blocks its unique inodes hold.
    pub size: i64,
    pub inodes: i64,
}

/// Sums `st_blocks * 512` over the unique inodes under `root` (itself included), and counts
/// them. Hard links count once; symlinks are not followed; other mounts are not crossed.
pub fn walk(root: &Path) -> io::Result<Usage> {
    Ok(walk_up_to(root, usize::MAX)?.expect("an unbounded walk always finishes"))
}

/// Entries one thread of [`walk_parallel`] measures before it takes more work.
const CHUNK: usize = 512;

/// [`walk`] on `threads` threads. Every file costs a `statx`, so a layer's big directories
/// (tens of thousands of files in one `usr/lib`) are cut into chunks that the threads share,
/// not only its subdirectories.
pub fn walk_parallel(root: &Path, threads: usize) -> io::Result<Usage> {
    let (fd, meta) = open_root(root)?;
    let dev = meta.st_dev;
    let mut tally = Tally::default();
    tally.add(&meta);
    let tallies = crate::pool::run(
        threads,
        vec![Task::List(Arc::new(fd))],
        |task, tally: &mut Tally| -> io::Result<Vec<Task>> {
            match task {
                Task::Open { parent, name } => match open_child(&parent, &name, dev)? {
                    Some(dir) => Ok(vec![Task::List(Arc::new(dir))]),
                    None => Ok(Vec::new()),
                },
                Task::List(dir) => {
                    let names = at::names(&dir)?;
                    let mut chunks = Vec::new();
                    let mut rest = names.into_iter().peekable();
                    while rest.peek().is_some() {
                        chunks.push(Task::Entries {
                            dir: Arc::clone(&dir),
                            names: rest.by_ref().take(CHUNK).collect(),
                        });
                    }
                    Ok(chunks)
                }
                Task::Entries { dir, names } => {
                    let mut dirs = Vec::new();
                    for name in names {
                        let Some(meta) = stat_entry(&dir, &name)? else {
                            continue;
                        };
                        tally.add(&meta);
                        if at::is_dir(&meta) && meta.st_dev == dev {
                            dirs.push(Task::Open {
                                parent: Arc::clone(&dir),
                                name,
                            });
                        }
                    }
                    Ok(dirs)
                }
            }
        },
    )?;
    for t in tallies {
        tally.once.size += t.once.size;
        tally.once.inodes += t.once.inodes;
        tally.shared.extend(t.shared);
    }
    Ok(tally.total())
}

/// A directory is opened only when its turn comes, and held only while its entries wait: open
/// descriptors grow with the tree's depth, not with its width.
enum Task {
    Open {
        parent: Arc<OwnedFd>,
        name: CString,
    },
    List(Arc<OwnedFd>),
    Entries {
        dir: Arc<OwnedFd>,
        names: Vec<CString>,
    },
}

/// One thread's count: files met once summed as they come, inodes that could be met twice
/// kept for de-duplication at the end.
#[derive(Default)]
struct Tally {
    once: Usage,
    shared: Vec<(u64, u64, i64)>,
}

impl Tally {
    fn add(&mut self, meta: &FileStat) {
        // A file with one link can be met only once, so only hard-linked files (and
        // directories, which a same-device bind mount could show twice) need remembering: a
        // layer of 20,000 plain files then costs no set of 20,000 inodes.
        let size = meta.st_blocks * 512;
        if !at::is_dir(meta) && meta.st_nlink == 1 {
            self.once.inodes += 1;
            self.once.size += size;
        } else {
            self.shared.push((meta.st_dev, meta.st_ino, size));
        }
    }

    fn total(self) -> Usage {
        let mut usage = self.once;
        let mut seen = HashSet::new();
        for (dev, ino, size) in self.shared {
            if seen.insert((dev, ino)) {
                usage.inodes += 1;
                usage.size += size;
            }
        }
        usage
    }
}

/// [`walk`], giving up (`None`) once more than `limit` directory entries have been seen: lets a
/// caller measure a small tree where it is and send a big one elsewhere.
pub fn walk_up_to(root: &Path, limit: usize) -> io::Result<Option<Usage>> {
    let mut seen_entries = 0usize;
    let (fd, meta) = open_root(root)?;
    let dev = meta.st_dev;
    let mut tally = Tally::default();
    tally.add(&meta);
    // An explicit stack: layer trees can be deeper than a thread's stack allows recursion.
    let mut pending: Vec<(Arc<OwnedFd>, Option<CString>)> = vec![(Arc::new(fd), None)];
    while let Some((parent, name)) = pending.pop() {
        let dir = match name {
            None => parent,
            Some(name) => match open_child(&parent, &name, dev)? {
                Some(dir) => Arc::new(dir),
                None => continue,
            },
        };
        for name in at::names(&dir)? {
            seen_entries += 1;
            if seen_entries > limit {
                return Ok(None);
            }
            let Some(meta) = stat_entry(&dir, &name)? else {
                continue;
            };
            tally.add(&meta);
            if at::is_dir(&meta) && meta.st_dev == dev {
                pending.push((Arc::clone(&dir), Some(name)));
            }
        }
    }
    Ok(Some(tally.total()))
}

/// The tree's top (which lamina made: it is opened by path, but not followed if a symlink).
fn open_root(root: &Path) -> io::Result<(OwnedFd, FileStat)> {
    let fd = at::open_dir(None, root)?;
    let meta = at::stat_fd(&fd)?;
    Ok((fd, meta))
}

/// An entry's status, or `None` if it was removed while we walked (it no longer uses space).
fn stat_entry(dir: &OwnedFd, name: &CString) -> io::Result<Option<FileStat>> {
    match at::stat(dir, name.as_c_str()) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens subdirectory `name` to walk into it, or `None` when it is no longer a directory of
/// this filesystem: removed, or swapped (for a symlink, a file, a mount) since it was looked at.
/// Such a swap is the container's doing, and what took its place is not walked.
fn open_child(parent: &OwnedFd, name: &CString, dev: u64) -> io::Result<Option<OwnedFd>> {
    match at::open_dir(Some(parent), name.as_c_str()) {
        Ok(dir) if at::stat_fd(&dir)?.st_dev == dev => Ok(Some(dir)),
        Ok(_) => Ok(None),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
#[cfg(test)]
mod tests {
    use std::{
        fs,
        os::unix::fs::MetadataExt,
        sync::atomic::{AtomicBool, Ordering},
    };

    use super::*;

    /// A container can swap a directory of its upper directory for a symlink (to `/usr` here)
    /// while lamina measures it: whatever the symlink points to is never walked, nor does the
    /// walk fail.
    #[test]
    fn a_directory_swapped_for_a_symlink_while_walking_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("fs");
        fs::create_dir_all(root.join("d")).unwrap();
        for f in 0..3 {
            fs::write(root.join(format!("d/{f}")), b"x").unwrap();
        }
        std::os::unix::fs::symlink("/usr", root.join("x")).unwrap();
        // root, d, its 3 files, and the symlink, whichever name each has at the moment. A walk
        // can count fewer (it may see the symlink under both names, one after the other), or
        // the directory and its files twice (under both names: its entries are listed once,
        // then each is opened when the swap has moved the directory to it), so at most 10.
        // Anything more is something outside the tree: /usr alone holds thousands.
        let inodes = 1 + 2 * 4 + 1;
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let at = at::open_dir(None, &root).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    nix::fcntl::renameat2(
                        Some(std::os::fd::AsRawFd::as_raw_fd(&at)),
                        "d",
                        Some(std::os::fd::AsRawFd::as_raw_fd(&at)),
                        "x",
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    )
                    .unwrap();
                }
            });
            let mut failures = Vec::new();
            for _ in 0..300 {
                for walked in [walk(&root), walk_parallel(&root, 2)] {
                    match walked {
                        Ok(u) if u.inodes <= inodes => {}
                        other => failures.push(format!("{other:?}")),
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            failures.sort();
            failures.dedup();
            assert!(
                failures.is_empty(),
                "walks went wrong, with these results: {failures:?}"
            );
        });
    }

    #[test]
    fn counts_unique_inodes_and_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("fs");
        fs::create_dir(&root).unwrap();
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/a"), vec![1u8; 10_000]).unwrap();
        fs::hard_link(root.join("d/a"), root.join("b")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("l")).unwrap();
        let u = walk(&root).unwrap();
        // root, d, a (== b), l
        assert_eq!(u.inodes, 4);
        let blocks: u64 = ["", "d", "d/a", "l"]
            .iter()
            .map(|p| fs::symlink_metadata(root.join(p)).unwrap().blocks())
            .sum();
        assert_eq!(u.size, blocks as i64 * 512);
        assert!(u.size >= 10_000);
        assert_eq!(
            walk_up_to(&root, 3).unwrap(),
            None,
            "4 entries are more than 3"
        );
        assert_eq!(walk_up_to(&root, 4).unwrap(), Some(u));
        assert_eq!(walk_parallel(&root, 3).unwrap(), u);
    }

    #[test]
    fn parallel_walk_agrees_on_a_big_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("fs");
        for d in 0..5 {
            let dir = root.join(format!("d{d}/sub"));
            fs::create_dir_all(&dir).unwrap();
            // More than a chunk in one directory, so it is split among threads.
            for f in 0..(CHUNK + 100) {
                fs::write(dir.join(format!("f{f}")), vec![7u8; f % 5000]).unwrap();
            }
            fs::hard_link(dir.join("f1"), root.join(format!("link{d}"))).unwrap();
        }
        let one = walk(&root).unwrap();
        assert_eq!(one.inodes, 1 + 5 * 2 + 5 * (CHUNK as i64 + 100));
        for threads in [1, 2, 4] {
            assert_eq!(
                walk_parallel(&root, threads).unwrap(),
                one,
                "{threads} threads"
            );
        }
        assert!(walk_parallel(&tmp.path().join("missing"), 2).is_err());
    }
}
