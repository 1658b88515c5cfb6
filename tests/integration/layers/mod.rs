//! Content through the layers: what containerd's conformance suite checks, as our own tests.
//!
//! Every test mounts what lamina returns, for real, writes through it, commits, and reads the
//! result back through views: bind mounts and overlays alike. This file holds what the tests
//! share (file helpers, trees, mounting as containerd does, chains of layers); `basics` the
//! workflow and the mount shapes, `changes` what layers do to the files below them,
//! `snapshots` what holds for every snapshot (read-only views, modes, deep stacks, usage).

mod basics;
mod changes;
mod snapshots;

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{self, Write},
    os::unix::fs::{chown, lchown, symlink, FileExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use containerd_snapshots::api::types::Mount;
use nix::{
    errno::Errno,
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{unshare, CloneFlags},
    sys::stat::{umask, Mode},
};
use tonic::Code;

use crate::util::*;

// ---------------------------------------------------------------------------------------------
// Files

/// `root` joined with `p`, where `p` is written as an absolute path inside the layer.
fn at(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

/// Writes a file and sets its mode exactly (whatever the umask).
fn put(root: &Path, p: &str, data: &[u8], mode: u32) {
    let path = at(root, p);
    fs::write(&path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    chmod(root, p, mode);
}

fn mkdir(root: &Path, p: &str, mode: u32) {
    let path = at(root, p);
    fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    chmod(root, p, mode);
}

fn chmod(root: &Path, p: &str, mode: u32) {
    let path = at(root, p);
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn chown_to(root: &Path, p: &str, uid: u32, gid: u32) {
    let path = at(root, p);
    lchown(&path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn rm(root: &Path, p: &str) {
    let path = at(root, p);
    fs::remove_file(&path).unwrap_or_else(|e| panic!("rm {}: {e}", path.display()));
}

fn rm_rf(root: &Path, p: &str) {
    let path = at(root, p);
    fs::remove_dir_all(&path).unwrap_or_else(|e| panic!("rm -r {}: {e}", path.display()));
}

fn ln_s(root: &Path, target: &str, p: &str) {
    let path = at(root, p);
    symlink(target, &path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
}

fn ln(root: &Path, from: &str, to: &str) {
    fs::hard_link(at(root, from), at(root, to))
        .unwrap_or_else(|e| panic!("link {from} -> {to} under {}: {e}", root.display()));
}

fn mv(root: &Path, from: &str, to: &str) {
    fs::rename(at(root, from), at(root, to))
        .unwrap_or_else(|e| panic!("rename {from} -> {to} under {}: {e}", root.display()));
}

fn read(root: &Path, p: &str) -> Vec<u8> {
    let path = at(root, p);
    fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn meta(root: &Path, p: &str) -> fs::Metadata {
    let path = at(root, p);
    fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
}

fn mode(root: &Path, p: &str) -> u32 {
    mode_of(&at(root, p))
}

#[track_caller]
fn assert_absent(root: &Path, p: &str) {
    match fs::symlink_metadata(at(root, p)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => panic!("{p} under {}: expected ENOENT, got {e}", root.display()),
        Ok(m) => panic!(
            "{p} under {} should not exist, found {:?}",
            root.display(),
            m.file_type()
        ),
    }
}

/// The sorted names in directory `p`.
fn ls(root: &Path, p: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(at(root, p))
        .unwrap_or_else(|e| panic!("listing {p} under {}: {e}", root.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// One entry of a tree as a container would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum What {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    /// Anything else: the file-type bits and the device number.
    Special(u32, u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    what: What,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Path ("/" for the root) -> entry, for everything under `root`.
type Tree = BTreeMap<String, Node>;

fn tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![(root.to_path_buf(), "/".to_string())];
    while let Some((path, name)) = stack.pop() {
        let m =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        let ft = m.file_type();
        let what = if ft.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                let entry = entry.unwrap();
                let child = entry.file_name().to_string_lossy().into_owned();
                let child_name = if name == "/" {
                    format!("/{child}")
                } else {
                    format!("{name}/{child}")
                };
                stack.push((entry.path(), child_name));
            }
            What::Dir
        } else if ft.is_file() {
            What::File(fs::read(&path).unwrap())
        } else if ft.is_symlink() {
            What::Symlink(fs::read_link(&path).unwrap())
        } else {
            What::Special(m.mode() & 0o170000, m.rdev())
        };
        out.insert(
            name,
            Node {
                what,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
            },
        );
    }
    out
}

/// Asserts two trees are equal, listing every difference (not just the first).
#[track_caller]
fn assert_same_tree(actual: &Tree, expected: &Tree, what: &str) {
    let diffs = differences(actual, expected);
    assert!(
        diffs.is_empty(),
        "{what}: trees differ\n  {}",
        diffs.join("\n  ")
    );
}

/// A fresh directory to mirror the layers in, with the mode a snapshot's `fs` has.
fn flat_dir(d: &TestDaemon, name: &str) -> PathBuf {
    let p = d.scratch(name);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Disk usage counted independently of lamina: unique inodes under `root` (itself included),
/// `st_blocks * 512` each; and the same sum without merging hard links.
fn du(root: &Path) -> (i64, i64, i64) {
    let mut seen = HashSet::new();
    let (mut size, mut inodes, mut naive) = (0i64, 0i64, 0i64);
    let mut stack = vec![root.to_path_buf()];
    let mut first = true;
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p).unwrap();
        naive += m.blocks() as i64 * 512;
        if seen.insert((m.dev(), m.ino())) {
            size += m.blocks() as i64 * 512;
            inodes += 1;
        }
        if m.is_dir() || first {
            first = false;
            for e in fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    (size, inodes, naive)
}

// ---------------------------------------------------------------------------------------------
// Mounting

/// Page size and containerd's 512-byte margin: at or over this many bytes of options, containerd
/// rewrites `lowerdir=` relative to the directories' common parent (`compactLowerdirOption`).
const PAGE: usize = 4096;
const COMPACT_AT: usize = PAGE - 512;

/// What lamina returned, mounted at a target; unmounted on drop.
///
/// Short option strings go through util's [`Mounted`]. An overlay whose options would overflow
/// the one page mount(2) copies is mounted the way containerd does it: `lowerdir=` made
/// relative to the longest common parent of the lower directories (which lamina's
/// `<root>/snapshots/<id>/fs` layout makes `<root>/snapshots`), then mounted with that
/// directory as the working directory. chdir() would change the cwd of every thread of this
/// multi-threaded test binary, so the mount runs on a short-lived thread that first unshares
/// its filesystem context (`unshare(CLONE_FS)`): its chdir() is then its own and ends with it.
/// That needs no external `mount` binary and no fork of a multi-threaded process.
struct Mnt {
    target: PathBuf,
    util: Option<Mounted>,
}

impl Mnt {
    fn path(&self) -> &Path {
        &self.target
    }

    fn compacted(&self) -> bool {
        self.util.is_none()
    }
}

impl Drop for Mnt {
    fn drop(&mut self) {
        if self.util.is_none() {
            let _ = umount2(&self.target, MntFlags::MNT_DETACH);
        }
    }
}

fn mount_at(mounts: &[Mount], target: &Path) -> Mnt {
    assert_eq!(
        mounts.len(),
        1,
        "lamina returns exactly one mount: {mounts:?}"
    );
    let m = &mounts[0];
    let size: usize = m.options.iter().map(String::len).sum();
    if m.r#type != "overlay" || size < COMPACT_AT {
        return Mnt {
            target: target.to_path_buf(),
            util: Some(Mounted::new(mounts, target)),
        };
    }
    let (dir, options) = compact_lowerdir(&m.options);
    let data = options.join(",");
    assert!(
        data.len() < PAGE,
        "even relative to {dir}, the options are {} bytes: {data}",
        data.len()
    );
    fs::create_dir_all(target).unwrap();
    let (dir2, target2) = (PathBuf::from(&dir), target.to_path_buf());
    let res = std::thread::spawn(move || -> nix::Result<()> {
        unshare(CloneFlags::CLONE_FS)?;
        nix::unistd::chdir(&dir2)?;
        mount(
            Some("overlay"),
            &target2,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
    })
    .join()
    .expect("mount thread panicked");
    res.unwrap_or_else(|e| panic!("overlay mount in {dir} with {options:?}: {e}"));
    Mnt {
        target: target.to_path_buf(),
        util: None,
    }
}

/// containerd's `compactLowerdirOption`: the directory to mount from, and the options with
/// `lowerdir=` rewritten relative to it (moved last, as containerd does).
fn compact_lowerdir(options: &[String]) -> (String, Vec<String>) {
    let idx = options
        .iter()
        .position(|o| o.starts_with("lowerdir="))
        .expect("an overlay with lowerdir=");
    let dirs: Vec<&str> = options[idx]["lowerdir=".len()..].split(':').collect();
    assert!(dirs.len() > 1, "a single long lowerdir cannot be compacted");
    let mut common = dirs[0].len();
    for d in &dirs[1..] {
        common = common.min(
            dirs[0]
                .bytes()
                .zip(d.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    // Back to the enclosing directory: "/r/snapshots/1" of ".../1/fs", ".../12/fs" is no parent.
    let prefix = &dirs[0][..common];
    let cut = prefix.rfind('/').expect("absolute lower directories");
    let common_dir = &dirs[0][..cut];
    assert!(
        !common_dir.is_empty(),
        "the lower directories share no parent: {dirs:?}"
    );
    let rel: Vec<&str> = dirs.iter().map(|d| &d[cut + 1..]).collect();
    let mut out: Vec<String> = options.to_vec();
    out.remove(idx);
    out.push(format!("lowerdir={}", rel.join(":")));
    (common_dir.to_string(), out)
}

// ---------------------------------------------------------------------------------------------
// Snapshots

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn unique(what: &str) -> String {
    format!("{what}-{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Mounts a new view of `parent`, hands its root to `f`, then unmounts and removes the view.
async fn with_view<T>(
    d: &TestDaemon,
    c: &mut Client,
    parent: &str,
    f: impl FnOnce(&Path) -> T,
) -> T {
    let key = unique("view");
    let mounts = c.view(&key, parent).await.unwrap();
    let out = {
        let m = mount_at(&mounts, &d.scratch(&key));
        f(m.path())
    };
    c.remove(&key).await.unwrap();
    out
}

async fn view_tree(d: &TestDaemon, c: &mut Client, parent: &str) -> Tree {
    with_view(d, c, parent, tree).await
}

/// A layer: changes applied the same way to a mounted snapshot and to the flat mirror.
type Layer<'a> = &'a dyn Fn(&Path);

/// The committed layers of a chain, and what each one should look like.
struct Chain {
    names: Vec<String>,
    /// The flat mirror's tree after each layer.
    trees: Vec<Tree>,
    /// Each layer's own `fs` (its upper directory while it was active).
    fs: Vec<PathBuf>,
    /// How many mounts needed containerd's long-options treatment.
    compacted: usize,
}

/// Builds a chain of committed snapshots, one per layer, on top of `parent`, as containerd's
/// `checkSnapshots` does: each layer is prepared, mounted, checked equal to the flat mirror,
/// changed (and the mirror with it), checked again, unmounted and committed; then a view of the
/// new committed snapshot is mounted and checked against the mirror.
async fn build(
    d: &TestDaemon,
    c: &mut Client,
    flat: &Path,
    parent: &str,
    layers: &[Layer<'_>],
) -> Chain {
    let mut chain = Chain {
        names: vec![],
        trees: vec![],
        fs: vec![],
        compacted: 0,
    };
    let mut parent = parent.to_string();
    for (i, layer) in layers.iter().enumerate() {
        let key = unique("prepare");
        let mounts = c.prepare(&key, &parent).await.unwrap();
        chain.fs.push(own_fs(&mounts));
        {
            let m = mount_at(&mounts, &d.scratch(&key));
            chain.compacted += m.compacted() as usize;
            assert_same_tree(
                &tree(m.path()),
                &tree(flat),
                &format!("layer {i} before changes"),
            );
            layer(m.path());
            layer(flat);
            assert_same_tree(
                &tree(m.path()),
                &tree(flat),
                &format!("layer {i} after changes"),
            );
        }
        let name = unique("layer");
        c.commit(&name, &key).await.unwrap();
        let expected = tree(flat);
        let seen = with_view(d, c, &name, |root| {
            let t = tree(root);
            // A view's mount must not be writable, whatever its shape.
            (t, fs::write(root.join(".probe-write"), b"x").is_err())
        })
        .await;
        assert_same_tree(&seen.0, &expected, &format!("view of committed layer {i}"));
        assert!(seen.1, "the view of layer {i} accepted a write");
        chain.names.push(name.clone());
        chain.trees.push(expected);
        parent = name;
    }
    chain
}

/// The options lamina adds after `lowerdir=` on this host with no configured options, as
/// containerd's overlay snapshotter does: `index=off` when the kernel has the parameter,
/// `userxattr` in a user namespace.
fn host_overlay_options() -> Vec<String> {
    let mut out = Vec::new();
    if Path::new("/sys/module/overlay/parameters/index").exists() {
        out.push("index=off".to_string());
    }
    let map = fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let fields: Vec<&str> = map.split_whitespace().collect();
    if !fields.is_empty() && fields != ["0", "0", "4294967295"] {
        out.push("userxattr".to_string());
    }
    out
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
