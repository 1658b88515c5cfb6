//! Disk usage of one snapshot directory, counted the way containerd counts it.

use std::{collections::HashSet, fs, io, os::unix::fs::MetadataExt, path::Path};

use crate::store::Usage;

/// Sums `st_blocks * 512` over the unique inodes under `root` (itself included), and counts
/// them. Hard links count once; symlinks are not followed; other mounts are not crossed.
pub fn walk(root: &Path) -> io::Result<Usage> {
    Ok(walk_up_to(root, usize::MAX)?.expect("an unbounded walk always finishes"))
}

/// [`walk`], giving up (`None`) once more than `limit` directory entries have been seen: lets a
/// caller measure a small tree where it is and send a big one elsewhere.
pub fn walk_up_to(root: &Path, limit: usize) -> io::Result<Option<Usage>> {
    let mut seen_entries = 0usize;
    let meta = fs::symlink_metadata(root)?;
    let dev = meta.dev();
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    add(&meta, &mut seen, &mut usage);
    // An explicit stack: layer trees can be deeper than a thread's stack allows recursion.
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            seen_entries += 1;
            if seen_entries > limit {
                return Ok(None);
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Removed while we walked: it no longer uses space.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            add(&meta, &mut seen, &mut usage);
            if meta.is_dir() && meta.dev() == dev {
                stack.push(entry.path());
            }
        }
    }
    Ok(Some(usage))
}

fn add(meta: &fs::Metadata, seen: &mut HashSet<(u64, u64)>, usage: &mut Usage) {
    // A file with one link can be met only once, so only hard-linked files (and directories,
    // which a same-device bind mount could show twice) need remembering: a layer of 20,000
    // plain files then costs no set of 20,000 inodes.
    let once = !meta.is_dir() && meta.nlink() == 1;
    if once || seen.insert((meta.dev(), meta.ino())) {
        usage.inodes += 1;
        usage.size += meta.blocks() as i64 * 512;
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
    }
}
