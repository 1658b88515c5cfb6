//! Disk usage of one snapshot directory, counted the way containerd counts it.

use std::{
    collections::HashSet,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::store::Usage;

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
    let meta = fs::symlink_metadata(root)?;
    let dev = meta.dev();
    let mut tally = Tally::default();
    tally.add(&meta);
    let tallies = crate::pool::run(
        threads,
        vec![Task::Dir(root.to_path_buf())],
        |task, tally: &mut Tally| -> io::Result<Vec<Task>> {
            match task {
                Task::Dir(dir) => {
                    let entries = fs::read_dir(&dir)?.collect::<io::Result<Vec<_>>>()?;
                    let mut chunks = Vec::new();
                    let mut rest = entries.into_iter().peekable();
                    while rest.peek().is_some() {
                        chunks.push(Task::Entries(rest.by_ref().take(CHUNK).collect()));
                    }
                    Ok(chunks)
                }
                Task::Entries(entries) => {
                    let mut dirs = Vec::new();
                    for entry in entries {
                        let Some(meta) = metadata(&entry)? else {
                            continue;
                        };
                        tally.add(&meta);
                        if meta.is_dir() && meta.dev() == dev {
                            dirs.push(Task::Dir(entry.path()));
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

enum Task {
    Dir(PathBuf),
    Entries(Vec<fs::DirEntry>),
}

/// One thread's count: files met once summed as they come, inodes that could be met twice
/// kept for de-duplication at the end.
#[derive(Default)]
struct Tally {
    once: Usage,
    shared: Vec<(u64, u64, i64)>,
}

impl Tally {
    fn add(&mut self, meta: &fs::Metadata) {
        // A file with one link can be met only once, so only hard-linked files (and
        // directories, which a same-device bind mount could show twice) need remembering: a
        // layer of 20,000 plain files then costs no set of 20,000 inodes.
        let size = meta.blocks() as i64 * 512;
        if !meta.is_dir() && meta.nlink() == 1 {
            self.once.inodes += 1;
            self.once.size += size;
        } else {
            self.shared.push((meta.dev(), meta.ino(), size));
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
    let meta = fs::symlink_metadata(root)?;
    let dev = meta.dev();
    let mut tally = Tally::default();
    tally.add(&meta);
    // An explicit stack: layer trees can be deeper than a thread's stack allows recursion.
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            seen_entries += 1;
            if seen_entries > limit {
                return Ok(None);
            }
            let Some(meta) = metadata(&entry)? else {
                continue;
            };
            tally.add(&meta);
            if meta.is_dir() && meta.dev() == dev {
                stack.push(entry.path());
            }
        }
    }
    Ok(Some(tally.total()))
}

/// An entry's metadata, or `None` if it was removed while we walked (it no longer uses
/// space).
fn metadata(entry: &fs::DirEntry) -> io::Result<Option<fs::Metadata>> {
    match entry.metadata() {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
