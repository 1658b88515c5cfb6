//! Reading what is on disk, for before/after comparisons.

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// One entry of a directory tree.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    /// Anything else: a device (an overlay whiteout), a socket, a FIFO.
    Other,
}

/// Sizes rather than contents: a failure names the entries that differ without printing
/// megabytes.
impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Dir => f.write_str("a directory"),
            Entry::File(data) => write!(f, "a file of {} bytes", data.len()),
            Entry::Symlink(to) => write!(f, "a symlink to {to:?}"),
            Entry::Other => f.write_str("neither file, directory nor symlink"),
        }
    }
}

/// Path relative to the tree's root -> entry.
pub type Tree = BTreeMap<String, Entry>;

/// Everything under `root` (not `root` itself), without following symlinks. Errors are
/// returned, not panicked on, for a caller that reports them with other findings.
pub fn read_tree(root: &Path) -> io::Result<Tree> {
    let mut out = Tree::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let rel = format!("{prefix}{}", entry.file_name().to_string_lossy());
            let ft = entry.file_type()?;
            let what = if ft.is_dir() {
                stack.push((entry.path(), format!("{rel}/")));
                Entry::Dir
            } else if ft.is_symlink() {
                Entry::Symlink(fs::read_link(entry.path())?)
            } else if ft.is_file() {
                Entry::File(fs::read(entry.path())?)
            } else {
                Entry::Other
            };
            out.insert(rel, what);
        }
    }
    Ok(out)
}

/// Every file under `dir` with its contents, for before/after comparisons.
#[track_caller]
pub fn contents(dir: &Path) -> Tree {
    read_tree(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
}

/// Each difference between two maps of paths: missing, different or unexpected entries.
pub fn differences<V: PartialEq + fmt::Debug>(
    got: &BTreeMap<String, V>,
    want: &BTreeMap<String, V>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (path, w) in want {
        match got.get(path) {
            None => out.push(format!("{path}: missing, expected {w:?}")),
            Some(g) if g != w => out.push(format!("{path}: {g:?}, expected {w:?}")),
            Some(_) => {}
        }
    }
    for (path, g) in got {
        if !want.contains_key(path) {
            out.push(format!("{path}: {g:?}, expected nothing"));
        }
    }
    out
}

/// The permission bits of `path` (itself, not what a symlink points to), set-ID and sticky
/// bits included.
#[track_caller]
pub fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}
