//! Content through the layers: what containerd's conformance suite checks, as our own tests.
//!
//! Every test mounts what lamina returns, for real, writes through it, commits, and reads the
//! result back through views: bind mounts and overlays alike.

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

/// The options lamina adds after `lowerdir=` on this host with no configured options
/// (REFERENCE §2): `index=off` when the kernel has the parameter, `userxattr` in a user namespace.
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

// ---------------------------------------------------------------------------------------------
// 1. The basic workflow

daemon_test!(basic_workflow_through_mounts, |d, mut c| {
    let first = |r: &Path| {
        put(r, "/foo", b"foo\n", 0o777);
        put(r, "/empty", b"", 0o600);
        mkdir(r, "/a", 0o755);
        mkdir(r, "/a/b", 0o755);
        mkdir(r, "/a/b/c", 0o750);
        put(r, "/a/b/c/deep", b"deep down\n", 0o640);
        ln_s(r, "foo", "/link");
        ln_s(r, "/a/b/c/deep", "/a/abs");
    };
    let second = |r: &Path| {
        put(r, "/bar", b"bar\n", 0o777);
        put(r, "/foo", b"bar\n", 0o777);
        rm_rf(r, "/a/b");
        rm(r, "/link");
        ln_s(r, "bar", "/link");
        mkdir(r, "/a/new", 0o700);
    };
    let flat1 = flat_dir(&d, "flat1");
    first(&flat1);
    let flat2 = flat_dir(&d, "flat2");
    first(&flat2);
    second(&flat2);

    // Layer 1: no parent, written through its mount.
    let mounts = c.prepare("preparing", "").await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("preparing"));
        assert_eq!(
            ls(m.path(), "/"),
            Vec::<String>::new(),
            "a new snapshot is empty"
        );
        first(m.path());
        assert_same_tree(&tree(m.path()), &tree(&flat1), "layer 1 as written");
    }
    c.commit("committed", "preparing").await.unwrap();
    let si = c.stat("committed").await.unwrap();
    assert_eq!((si.parent.as_str(), si.kind), ("", COMMITTED));
    assert_code(c.stat("preparing").await, Code::NotFound, "preparing");

    // Layer 2: sees layer 1, changes it.
    let mounts = c.prepare("next", "committed").await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("next"));
        assert_same_tree(&tree(m.path()), &tree(&flat1), "child before changes");
        assert_eq!(
            read(m.path(), "/link"),
            b"foo\n",
            "symlink followed inside the mount"
        );
        assert_eq!(read(m.path(), "/a/b/c/deep"), b"deep down\n");
        second(m.path());
        assert_same_tree(&tree(m.path()), &tree(&flat2), "child after changes");
    }
    let ni = c.stat("next").await.unwrap();
    assert_eq!((ni.parent.as_str(), ni.kind), ("committed", ACTIVE));
    c.commit("committed-next", "next").await.unwrap();
    let si2 = c.stat("committed-next").await.unwrap();
    assert_eq!((si2.parent.as_str(), si2.kind), ("committed", COMMITTED));
    assert_code(c.stat("next").await, Code::NotFound, "next");

    // A view of the top shows the merged result.
    let mounts = c.view("nextnext", "committed-next").await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("nextnext"));
        let r = m.path();
        assert_same_tree(&tree(r), &tree(&flat2), "view of the top");
        assert_eq!(read(r, "/foo"), b"bar\n");
        assert_eq!(read(r, "/bar"), b"bar\n");
        assert_eq!(fs::read_link(at(r, "/link")).unwrap(), PathBuf::from("bar"));
        assert_eq!(read(r, "/link"), b"bar\n");
        assert_absent(r, "/a/b");
        assert_eq!(ls(r, "/a"), strings(&["abs", "new"]));
        assert_eq!(mode(r, "/a/new"), 0o700);
        // The dangling absolute link is still a link, pointing into a removed directory.
        assert_eq!(
            fs::read_link(at(r, "/a/abs")).unwrap(),
            PathBuf::from("/a/b/c/deep")
        );
    }
    // A view of the bottom shows the first layer only.
    let mounts = c.view("bottom", "committed").await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("bottom"));
        let r = m.path();
        assert_same_tree(&tree(r), &tree(&flat1), "view of the bottom");
        assert_eq!(read(r, "/foo"), b"foo\n");
        assert_absent(r, "/bar");
        assert_eq!(read(r, "/a/b/c/deep"), b"deep down\n");
    }

    c.remove("nextnext").await.unwrap();
    c.remove("bottom").await.unwrap();
    assert_code(c.remove("committed").await, Code::FailedPrecondition, "");
    c.remove("committed-next").await.unwrap();
    c.remove("committed").await.unwrap();
});

// ---------------------------------------------------------------------------------------------
// 2. The mount shapes over the wire

/// The ID of snapshot directory `fs` ([`id_of`]), which must exist under this daemon's
/// `<root>/snapshots`.
#[track_caller]
fn id_under(d: &TestDaemon, fs: impl AsRef<Path>) -> u64 {
    let fs = fs.as_ref();
    let id = id_of(fs);
    assert_eq!(
        fs.parent().unwrap().parent().unwrap(),
        d.root.join("snapshots"),
        "{} is under <root>/snapshots",
        fs.display()
    );
    assert!(fs.is_dir(), "{} exists", fs.display());
    id
}

fn fs_of(d: &TestDaemon, id: u64) -> String {
    d.root
        .join(format!("snapshots/{id}/fs"))
        .display()
        .to_string()
}

fn work_of(d: &TestDaemon, id: u64) -> String {
    d.root
        .join(format!("snapshots/{id}/work"))
        .display()
        .to_string()
}

daemon_test!(mount_shapes_over_the_wire, |d, mut c| {
    let extra = host_overlay_options();

    // Active, no parent: a writable bind of its own fs.
    let a = c.prepare("a", "").await.unwrap();
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].r#type, "bind");
    assert_eq!(a[0].options, strings(&["rw", "rbind"]));
    assert_eq!(a[0].target, "");
    let id_a = id_under(&d, &a[0].source);
    assert!(
        Path::new(&work_of(&d, id_a)).is_dir(),
        "an active snapshot has a work directory"
    );
    assert_eq!(
        c.mounts("a").await.unwrap(),
        a,
        "Mounts repeats what Prepare answered"
    );
    {
        let m = mount_at(&a, &d.scratch("ma"));
        put(m.path(), "/from-a", b"a", 0o644);
    }
    c.commit("A", "a").await.unwrap();
    assert_code(c.mounts("A").await, Code::FailedPrecondition, "");

    // Active, one parent: overlay, workdir, upperdir, lowerdir, then the host's options.
    let b = c.prepare("b", "A").await.unwrap();
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(
        (b[0].r#type.as_str(), b[0].source.as_str()),
        ("overlay", "overlay")
    );
    let id_b = id_under(&d, own_fs(&b));
    assert_ne!(id_b, id_a);
    let mut want = vec![
        format!("workdir={}", work_of(&d, id_b)),
        format!("upperdir={}", fs_of(&d, id_b)),
        format!("lowerdir={}", fs_of(&d, id_a)),
    ];
    want.extend(extra.iter().cloned());
    assert_eq!(b[0].options, want);
    assert_eq!(c.mounts("b").await.unwrap(), b);
    {
        let m = mount_at(&b, &d.scratch("mb"));
        assert_eq!(read(m.path(), "/from-a"), b"a");
        put(m.path(), "/from-b", b"b", 0o644);
    }
    c.commit("B", "b").await.unwrap();

    // Active, two parents: lowerdir nearest parent first.
    let cc = c.prepare("c", "B").await.unwrap();
    let id_c = id_under(&d, own_fs(&cc));
    let mut want = vec![
        format!("workdir={}", work_of(&d, id_c)),
        format!("upperdir={}", fs_of(&d, id_c)),
        format!("lowerdir={}:{}", fs_of(&d, id_b), fs_of(&d, id_a)),
    ];
    want.extend(extra.iter().cloned());
    assert_eq!(cc[0].options, want);
    {
        let m = mount_at(&cc, &d.scratch("mc"));
        assert_eq!(ls(m.path(), "/"), strings(&["from-a", "from-b"]));
    }

    // View, no parent: a read-only bind of its own (empty) fs, and no work directory.
    let v0 = c.view("v0", "").await.unwrap();
    assert_eq!(v0.len(), 1);
    assert_eq!(v0[0].r#type, "bind");
    assert_eq!(v0[0].options, strings(&["ro", "rbind"]));
    let id_v0 = id_under(&d, &v0[0].source);
    assert!(
        ![&id_a, &id_b, &id_c].contains(&&id_v0),
        "a view gets its own directory"
    );
    assert!(
        !Path::new(&work_of(&d, id_v0)).exists(),
        "views have no work directory"
    );
    assert_eq!(fs::read_dir(&v0[0].source).unwrap().count(), 0);
    assert_eq!(c.mounts("v0").await.unwrap(), v0);

    // View, one parent: a read-only bind of the PARENT's fs.
    let v1 = c.view("v1", "A").await.unwrap();
    assert_eq!(v1.len(), 1);
    assert_eq!(v1[0].r#type, "bind");
    assert_eq!(v1[0].source, fs_of(&d, id_a));
    assert_eq!(v1[0].options, strings(&["ro", "rbind"]));
    assert_eq!(c.mounts("v1").await.unwrap(), v1);

    // View, two parents: an overlay with lowerdir only (no upperdir: read-only).
    let v2 = c.view("v2", "B").await.unwrap();
    assert_eq!(v2.len(), 1);
    assert_eq!(
        (v2[0].r#type.as_str(), v2[0].source.as_str()),
        ("overlay", "overlay")
    );
    let mut want = vec![format!("lowerdir={}:{}", fs_of(&d, id_b), fs_of(&d, id_a))];
    want.extend(extra.iter().cloned());
    assert_eq!(v2[0].options, want);
    assert_eq!(c.mounts("v2").await.unwrap(), v2);
    {
        let m = mount_at(&v2, &d.scratch("mv2"));
        assert_eq!(ls(m.path(), "/"), strings(&["from-a", "from-b"]));
    }
    {
        let m = mount_at(&v1, &d.scratch("mv1"));
        assert_eq!(ls(m.path(), "/"), strings(&["from-a"]));
    }
});

// Configured `mount_options` go on overlays (after `lowerdir=`), never on bind mounts, and
// what lamina returns with them still mounts.
daemon_test!(
    configured_mount_options_go_on_overlays_only,
    config = "mount_options = [\"redirect_dir=off\"]\n",
    |d, mut c| {
        let a = c.prepare("a", "").await.unwrap();
        assert_eq!(a[0].options, strings(&["rw", "rbind"]));
        c.commit("A", "a").await.unwrap();
        let b = c.prepare("b", "A").await.unwrap();
        let opts = &b[0].options;
        assert!(
            opts[0].starts_with("workdir=") && opts[1].starts_with("upperdir="),
            "{opts:?}"
        );
        assert!(opts[2].starts_with("lowerdir="), "{opts:?}");
        let mut tail: Vec<String> = opts[3..].to_vec();
        tail.sort();
        let mut want = host_overlay_options();
        want.push("redirect_dir=off".into());
        want.sort();
        assert_eq!(
            tail, want,
            "configured then automatic options follow lowerdir"
        );
        drop(mount_at(&b, &d.scratch("mb")));
        c.commit("B", "b").await.unwrap();
        let v1 = c.view("v1", "A").await.unwrap();
        assert_eq!(v1[0].options, strings(&["ro", "rbind"]));
        let v2 = c.view("v2", "B").await.unwrap();
        assert!(
            v2[0].options.contains(&"redirect_dir=off".to_string()),
            "{v2:?}"
        );
        drop(mount_at(&v2, &d.scratch("mv2")));
    }
);

// ---------------------------------------------------------------------------------------------
// 3. A file updated in upper layers, again and again

daemon_test!(file_updated_in_every_layer, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let base = |r: &Path| {
        mkdir(r, "/etc", 0o700);
        put(r, "/etc/hosts", b"mydomain 10.0.0.1", 0o644);
        put(r, "/etc/profile", b"PATH=/usr/bin", 0o644);
        put(r, "/etc/motd", &vec![b'.'; 8192], 0o644);
        put(r, "/etc/log", b"1\n", 0o600);
    };
    // Every later layer rewrites /etc/hosts with content of the same length (same size, same
    // second: the case that fooled tar-based diffs), flips /etc/profile's mode, patches one
    // byte in the middle of /etc/motd (copy-up must keep the rest) and appends to /etc/log.
    let update = |k: u8| {
        move |r: &Path| {
            put(
                r,
                "/etc/hosts",
                format!("mydomain 10.0.0.{k}").as_bytes(),
                0o644,
            );
            chmod(
                r,
                "/etc/profile",
                if k.is_multiple_of(2) { 0o666 } else { 0o644 },
            );
            let f = fs::OpenOptions::new()
                .write(true)
                .open(at(r, "/etc/motd"))
                .unwrap();
            f.write_all_at(&[b'0' + k], 4000 + k as u64).unwrap();
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(at(r, "/etc/log"))
                .unwrap();
            writeln!(f, "{k}").unwrap();
        }
    };
    let (u2, u3, u4, u5, u6) = (update(2), update(3), update(4), update(5), update(6));
    let chain = build(&d, &mut c, &flat, "", &[&base, &u2, &u3, &u4, &u5, &u6]).await;

    let top = chain.names.last().unwrap();
    with_view(&d, &mut c, top, |r| {
        assert_eq!(read(r, "/etc/hosts"), b"mydomain 10.0.0.6");
        assert_eq!(mode(r, "/etc/profile"), 0o666);
        let motd = read(r, "/etc/motd");
        assert_eq!(motd.len(), 8192);
        for k in 2..=6u8 {
            assert_eq!(motd[4000 + k as usize], b'0' + k);
        }
        assert_eq!(motd.iter().filter(|&&b| b == b'.').count(), 8192 - 5);
        assert_eq!(read(r, "/etc/log"), b"1\n2\n3\n4\n5\n6\n");
    })
    .await;
    // Lower layers are untouched by the ones above them.
    for (i, name) in chain.names.iter().enumerate() {
        let t = view_tree(&d, &mut c, name).await;
        assert_same_tree(
            &t,
            &chain.trees[i],
            &format!("layer {i} after all layers were built"),
        );
        let hosts = &t["/etc/hosts"].what;
        assert_eq!(
            hosts,
            &What::File(format!("mydomain 10.0.0.{}", i + 1).into_bytes())
        );
    }
    // And the bottom layer's own directory still holds the first version.
    assert_eq!(read(&chain.fs[0], "/etc/hosts"), b"mydomain 10.0.0.1");
});

// ---------------------------------------------------------------------------------------------
// 4. A directory removed and recreated over a lower layer (opaque directory)

daemon_test!(
    directory_recreated_over_lower_hides_old_contents,
    |d, mut c| {
        let flat = flat_dir(&d, "flat");

        let l1 = |r: &Path| {
            mkdir(r, "/lib", 0o700);
            put(r, "/lib/hidden", b"", 0o644);
            mkdir(r, "/lib/sub", 0o755);
            put(r, "/lib/sub/deep", b"deep", 0o644);
        };
        let l2 = |r: &Path| {
            rm_rf(r, "/lib");
            mkdir(r, "/lib", 0o755);
            put(r, "/lib/not-hidden", b"", 0o644);
        };
        let l3 = |r: &Path| {
            put(r, "/lib/newfile", b"", 0o644);
        };
        let chain = build(&d, &mut c, &flat, "", &[&l1, &l2, &l3]).await;

        let names = &chain.names;
        with_view(&d, &mut c, &names[0], |r| {
            assert_eq!(ls(r, "/lib"), strings(&["hidden", "sub"]));
            assert_eq!(mode(r, "/lib"), 0o700);
        })
        .await;
        with_view(&d, &mut c, &names[1], |r| {
            assert_eq!(ls(r, "/lib"), strings(&["not-hidden"]));
            assert_eq!(mode(r, "/lib"), 0o755);
            assert_absent(r, "/lib/hidden");
            assert_absent(r, "/lib/sub");
        })
        .await;
        with_view(&d, &mut c, &names[2], |r| {
            assert_eq!(ls(r, "/lib"), strings(&["newfile", "not-hidden"]));
            assert_absent(r, "/lib/sub/deep");
        })
        .await;
        // An active snapshot on top sees the same, and the old entries cannot be reached there either.
        let mounts = c.prepare("top", &names[2]).await.unwrap();
        let m = mount_at(&mounts, &d.scratch("top"));
        assert_eq!(ls(m.path(), "/lib"), strings(&["newfile", "not-hidden"]));
        assert_absent(m.path(), "/lib/hidden");
    }
);

// ---------------------------------------------------------------------------------------------
// 5. chown of lower files: copy-up

daemon_test!(chown_of_lower_files_copies_up_and_persists, |d, mut c| {
    let flat = flat_dir(&d, "flat");
    let big: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();

    let l1 = |r: &Path| {
        mkdir(r, "/opt", 0o700);
        mkdir(r, "/opt/a", 0o700);
        mkdir(r, "/opt/a/b", 0o700);
        put(r, "/opt/a/b/file.txt", b"hello", 0o644);
        put(r, "/opt/big", &big, 0o640);
        ln_s(r, "a/b/file.txt", "/opt/link");
    };
    let l2 = |r: &Path| {
        for p in [
            "/opt",
            "/opt/a",
            "/opt/a/b",
            "/opt/a/b/file.txt",
            "/opt/big",
        ] {
            chown_to(r, p, 1, 1);
        }
        chown_to(r, "/opt/link", 2, 3);
    };

    // Layer 1 through the chain helper; layer 2 by hand, to look inside the active snapshot.
    let chain = build(&d, &mut c, &flat, "", &[&l1]).await;
    let base = &chain.names[0];
    let mounts = c.prepare("chown", base).await.unwrap();
    let lower_fs = &chain.fs[0];
    {
        let m = mount_at(&mounts, &d.scratch("chown"));
        l2(m.path());
        l2(&flat);
        let r = m.path();
        assert_eq!(
            (
                meta(r, "/opt/a/b/file.txt").uid(),
                meta(r, "/opt/a/b/file.txt").gid()
            ),
            (1, 1)
        );
        assert_eq!(
            (meta(r, "/opt/link").uid(), meta(r, "/opt/link").gid()),
            (2, 3)
        );
        assert_eq!(read(r, "/opt/big"), big, "copy-up kept the data");
        assert_eq!(mode(r, "/opt/a/b"), 0o700, "chown kept the mode");
        assert_same_tree(&tree(r), &tree(&flat), "active snapshot after chown");
        // The lower layer itself was not touched: the change lives in the upper directory.
        assert_eq!(meta(lower_fs, "/opt/a/b/file.txt").uid(), 0);
        assert_eq!(meta(lower_fs, "/opt").uid(), 0);
        assert_eq!(meta(&own_fs(&mounts), "/opt/a/b/file.txt").uid(), 1);
    }
    c.commit("chowned", "chown").await.unwrap();
    let want = tree(&flat);
    with_view(&d, &mut c, "chowned", |r| {
        assert_same_tree(&tree(r), &want, "view after commit");
        for p in [
            "/opt",
            "/opt/a",
            "/opt/a/b",
            "/opt/a/b/file.txt",
            "/opt/big",
        ] {
            assert_eq!((meta(r, p).uid(), meta(r, p).gid()), (1, 1), "{p}");
        }
        assert_eq!(read(r, "/opt/a/b/file.txt"), b"hello");
        assert_eq!(read(r, "/opt/link"), b"hello");
    })
    .await;
    with_view(&d, &mut c, base, |r| {
        assert_same_tree(&tree(r), &chain.trees[0], "the base keeps its owners");
        assert_eq!(meta(r, "/opt/a/b/file.txt").uid(), 0);
    })
    .await;
});

// ---------------------------------------------------------------------------------------------
// 6. Permissions kept over three layers

daemon_test!(permissions_kept_over_three_layers, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let l1 = |r: &Path| {
        for dir in ["/dir1", "/dir2", "/dir3", "/dir4", "/dir5"] {
            mkdir(r, dir, 0o700);
        }
        put(r, "/dir4/f1", b"...", 0o644);
        put(r, "/dir5/f1", b"...", 0o644);
        chown_to(r, "/dir1", 1, 1);
        chown_to(r, "/dir2", 1, 1);
        chown_to(r, "/dir3", 1, 1);
        chown_to(r, "/dir5", 1, 1);
        chown_to(r, "/dir5/f1", 1, 1);
        // chown clears set-id bits: modes are set after owners.
        put(r, "/suid", b"#!/bin/true\n", 0o4755);
        put(r, "/sgid-file", b"x", 0o2711);
        mkdir(r, "/shared", 0o2775);
        chown_to(r, "/shared", 0, 5);
        chmod(r, "/shared", 0o2775);
        mkdir(r, "/tmp", 0o1777);
        put(r, "/readonly", b"ro", 0o444);
        mkdir(r, "/x", 0o711);
    };
    let l2 = |r: &Path| {
        chown_to(r, "/dir2", 0, 0);
        rm_rf(r, "/dir3");
        chown_to(r, "/dir4", 1, 1);
        chown_to(r, "/dir4/f1", 1, 1);
        chmod(r, "/suid", 0o6711);
        put(r, "/tmp/f", b"in sticky dir", 0o600);
        chmod(r, "/readonly", 0o400);
        chmod(r, "/x", 0o1751);
    };
    let l3 = |r: &Path| {
        mkdir(r, "/dir3", 0o700);
        chown_to(r, "/dir3", 1, 1);
        rm_rf(r, "/dir5");
        mkdir(r, "/dir5", 0o700);
        chown_to(r, "/dir5", 1, 1);
        // A file created in a set-gid directory takes its group.
        fs::write(at(r, "/shared/new"), b"n").unwrap();
        chmod(r, "/shared/new", 0o664);
        put(r, "/dir1/mine", b"m", 0o4700);
    };
    let chain = build(&d, &mut c, &flat, "", &[&l1, &l2, &l3]).await;

    // The mirror could be wrong the same way as the mount: check the modes themselves too.
    let want: &[(&str, u32, u32, u32)] = &[
        ("/dir1", 0o700, 1, 1),
        ("/dir1/mine", 0o4700, 0, 0),
        ("/dir2", 0o700, 0, 0),
        ("/dir3", 0o700, 1, 1),
        ("/dir4", 0o700, 1, 1),
        ("/dir4/f1", 0o644, 1, 1),
        ("/dir5", 0o700, 1, 1),
        ("/suid", 0o6711, 0, 0),
        ("/sgid-file", 0o2711, 0, 0),
        ("/shared", 0o2775, 0, 5),
        ("/shared/new", 0o664, 0, 5),
        ("/tmp", 0o1777, 0, 0),
        ("/tmp/f", 0o600, 0, 0),
        ("/readonly", 0o400, 0, 0),
        ("/x", 0o1751, 0, 0),
    ];
    let top = chain.names.last().unwrap().clone();
    with_view(&d, &mut c, &top, |r| {
        for &(p, m, uid, gid) in want {
            let md = meta(r, p);
            assert_eq!(
                (md.mode() & 0o7777, md.uid(), md.gid()),
                (m, uid, gid),
                "{p}"
            );
        }
        assert_eq!(
            ls(r, "/dir5"),
            Vec::<String>::new(),
            "dir5 was recreated empty"
        );
        assert_eq!(ls(r, "/dir3"), Vec::<String>::new());
    })
    .await;
    // And in an active snapshot on top (an overlay with an upper directory).
    let mounts = c.prepare("top-active", &top).await.unwrap();
    let m = mount_at(&mounts, &d.scratch("top-active"));
    assert_same_tree(
        &tree(m.path()),
        chain.trees.last().unwrap(),
        "active on top",
    );
    // The middle layer still shows dir3 gone and the first /suid mode changed.
    with_view(&d, &mut c, &chain.names[1], |r| {
        assert_absent(r, "/dir3");
        assert_eq!(mode(r, "/suid"), 0o6711);
        assert_eq!(meta(r, "/dir5/f1").uid(), 1);
    })
    .await;
    with_view(&d, &mut c, &chain.names[0], |r| {
        assert_eq!(mode(r, "/suid"), 0o4755);
        assert_eq!(mode(r, "/x"), 0o711);
    })
    .await;
});

// ---------------------------------------------------------------------------------------------
// 7. Whiteouts: deleted files stay deleted in children

daemon_test!(deleted_files_stay_deleted_in_children, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let l1 = |r: &Path| {
        put(r, "/foo", b"foo\n", 0o777);
        put(r, "/foobar", b"foobar\n", 0o777);
        mkdir(r, "/dir", 0o755);
        put(r, "/dir/x", b"x", 0o644);
        put(r, "/dir/y", b"y", 0o644);
        mkdir(r, "/gone", 0o755);
        put(r, "/gone/inside", b"i", 0o644);
        ln_s(r, "foo", "/link");
    };
    let l2 = |r: &Path| {
        rm(r, "/foobar");
        rm(r, "/dir/x");
        rm_rf(r, "/gone");
        rm(r, "/link");
    };
    let l3 = |_: &Path| {};
    let l4 = |r: &Path| put(r, "/foobar", b"reborn\n", 0o600);
    let l5 = |r: &Path| rm(r, "/foobar");
    let chain = build(&d, &mut c, &flat, "", &[&l1, &l2, &l3, &l4, &l5]).await;
    let n = &chain.names;

    for (i, reborn) in [(1, false), (2, false), (3, true), (4, false)] {
        with_view(&d, &mut c, &n[i], |r| {
            assert_eq!(read(r, "/foo"), b"foo\n");
            assert_eq!(ls(r, "/dir"), strings(&["y"]), "layer {i}");
            assert_absent(r, "/dir/x");
            assert_absent(r, "/gone");
            assert_absent(r, "/link");
            if reborn {
                assert_eq!(read(r, "/foobar"), b"reborn\n");
            } else {
                assert_absent(r, "/foobar");
            }
        })
        .await;
    }
    // The first layer still has everything.
    with_view(&d, &mut c, &n[0], |r| {
        assert_eq!(read(r, "/foobar"), b"foobar\n");
        assert_eq!(ls(r, "/dir"), strings(&["x", "y"]));
    })
    .await;
    // An active snapshot on top of the empty layer: still deleted, and can be created afresh.
    let mounts = c.prepare("on-empty", &n[2]).await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("on-empty"));
        assert_eq!(ls(m.path(), "/"), strings(&["dir", "foo"]));
        put(m.path(), "/gone", b"now a file", 0o644);
    }
    c.commit("on-empty-c", "on-empty").await.unwrap();
    with_view(&d, &mut c, "on-empty-c", |r| {
        assert!(meta(r, "/gone").is_file());
        assert_eq!(read(r, "/gone"), b"now a file");
    })
    .await;
});

// ---------------------------------------------------------------------------------------------
// 8. Rename and hard link of files from a lower layer

/// Renames a directory; when overlayfs refuses a lower directory (EXDEV without
/// redirect_dir), does what `mv` does: copy, then delete.
fn mv_dir(root: &Path, from: &str, to: &str) {
    match fs::rename(at(root, from), at(root, to)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(Errno::EXDEV as i32) => {
            copy_tree(&at(root, from), &at(root, to));
            fs::remove_dir_all(at(root, from)).unwrap();
        }
        Err(e) => panic!("rename {from} -> {to}: {e}"),
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let m = fs::symlink_metadata(from).unwrap();
    if m.is_dir() {
        fs::create_dir(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else if m.file_type().is_symlink() {
        symlink(fs::read_link(from).unwrap(), to).unwrap();
    } else {
        fs::copy(from, to).unwrap();
    }
    if !m.file_type().is_symlink() {
        fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777)).unwrap();
    }
    lchown(to, Some(m.uid()), Some(m.gid())).unwrap();
}

daemon_test!(rename_and_hard_link_of_lower_files, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let l1 = |r: &Path| {
        mkdir(r, "/dir1", 0o700);
        put(r, "/dir1/f1", b"Hello", 0o644);
        mkdir(r, "/dir2", 0o700);
        put(r, "/dir2/f2", b"...", 0o644);
        mkdir(r, "/somefiles", 0o700);
        put(r, "/somefiles/f1", b"was here first!", 0o644);
        put(r, "/somefiles/f2", b"nothing interesting", 0o644);
        put(r, "/somefiles/f4", b"moving out", 0o600);
        mkdir(r, "/h", 0o755);
        put(r, "/h/a", b"linked", 0o640);
        mkdir(r, "/olddir", 0o750);
        put(r, "/olddir/inner", b"inner", 0o644);
    };
    let l2 = |r: &Path| {
        mkdir(r, "/dir3", 0o700);
        put(r, "/dir3/f1", b"Hello", 0o644);
        rm_rf(r, "/dir1");
        // Hard link a lower file elsewhere, then drop the original name.
        ln(r, "/dir2/f2", "/dir3/f2");
        rm(r, "/dir2/f2");
        // Replace a lower file by renaming a new one over it; rename lower files.
        put(r, "/somefiles/f1-overwrite", b"new content 1", 0o644);
        mv(r, "/somefiles/f1-overwrite", "/somefiles/f1");
        mv(r, "/somefiles/f2", "/somefiles/f3");
        mv(r, "/somefiles/f4", "/dir3/f4");
        // Two names for one lower file, both kept.
        ln(r, "/h/a", "/h/b");
        mv_dir(r, "/olddir", "/newdir");
    };
    let chain = build(&d, &mut c, &flat, "", &[&l1]).await;

    let mounts = c.prepare("l2", &chain.names[0]).await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("l2"));
        let r = m.path();
        l2(r);
        l2(&flat);
        assert_same_tree(
            &tree(r),
            &tree(&flat),
            "active snapshot after renames and links",
        );
        let (a, b) = (meta(r, "/h/a"), meta(r, "/h/b"));
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "one inode, two names");
        // Writing through one name shows through the other.
        fs::OpenOptions::new()
            .append(true)
            .open(at(r, "/h/b"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        assert_eq!(read(r, "/h/a"), b"linked!");
        fs::OpenOptions::new()
            .append(true)
            .open(at(&flat, "/h/b"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
    }
    c.commit("l2c", "l2").await.unwrap();
    let want = tree(&flat);
    {
        with_view(&d, &mut c, "l2c", |r| {
            assert_same_tree(&tree(r), &want, "view after commit");
            assert_absent(r, "/dir1");
            assert_absent(r, "/dir2/f2");
            assert_eq!(ls(r, "/dir2"), Vec::<String>::new());
            assert_eq!(read(r, "/dir3/f2"), b"...");
            assert_eq!(read(r, "/dir3/f1"), b"Hello");
            assert_eq!(read(r, "/dir3/f4"), b"moving out");
            assert_eq!(mode(r, "/dir3/f4"), 0o600);
            assert_eq!(ls(r, "/somefiles"), strings(&["f1", "f3"]));
            assert_eq!(read(r, "/somefiles/f1"), b"new content 1");
            assert_eq!(read(r, "/somefiles/f3"), b"nothing interesting");
            let (a, b) = (meta(r, "/h/a"), meta(r, "/h/b"));
            assert_eq!(
                (a.ino(), a.nlink()),
                (b.ino(), 2),
                "the link survived the commit"
            );
            assert_eq!(read(r, "/h/b"), b"linked!");
            assert_absent(r, "/olddir");
            assert_eq!(read(r, "/newdir/inner"), b"inner");
            assert_eq!(mode(r, "/newdir"), 0o750);
        })
        .await;
    }
    // The lower layer is as it was.
    with_view(&d, &mut c, &chain.names[0], |r| {
        assert_same_tree(&tree(r), &chain.trees[0], "base after the child's renames");
    })
    .await;
});

// ---------------------------------------------------------------------------------------------
// 9. Views are read-only when mounted

#[track_caller]
fn assert_erofs<T: std::fmt::Debug>(res: io::Result<T>, what: &str) {
    match res {
        Ok(v) => panic!("{what}: succeeded on a view ({v:?}); EROFS expected"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(Errno::EROFS as i32), "{what}: {e}"),
    }
}

fn assert_read_only(r: &Path, existing: &str) {
    assert_erofs(
        fs::write(r.join("testfile"), b"testcontent"),
        "create a file",
    );
    assert_erofs(
        fs::OpenOptions::new().write(true).open(at(r, existing)),
        "open for writing",
    );
    assert_erofs(fs::create_dir(r.join("newdir")), "mkdir");
    assert_erofs(fs::remove_file(at(r, existing)), "unlink");
    assert_erofs(
        fs::set_permissions(at(r, existing), fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    assert_erofs(chown(at(r, existing), Some(7), Some(7)), "chown");
    let st = nix::sys::statvfs::statvfs(r).unwrap();
    assert!(
        st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        "mounted read-only"
    );
}

daemon_test!(views_are_read_only_when_mounted, |d, mut c| {
    let m1 = c.prepare("p1", "").await.unwrap();
    let fs1 = own_fs(&m1);
    {
        let m = mount_at(&m1, &d.scratch("p1"));
        put(m.path(), "/f", b"one", 0o644);
    }
    c.commit("c1", "p1").await.unwrap();
    let m2 = c.prepare("p2", "c1").await.unwrap();
    let fs2 = own_fs(&m2);
    {
        let m = mount_at(&m2, &d.scratch("p2"));
        put(m.path(), "/g", b"two", 0o644);
    }
    c.commit("c2", "p2").await.unwrap();

    // No parent: a read-only bind of the view's own empty directory.
    let v0 = c.view("v0", "").await.unwrap();
    {
        let m = mount_at(&v0, &d.scratch("v0"));
        assert_erofs(
            fs::write(m.path().join("testfile"), b"x"),
            "create in an empty view",
        );
        assert_erofs(fs::create_dir(m.path().join("d")), "mkdir in an empty view");
    }
    assert_eq!(fs::read_dir(&v0[0].source).unwrap().count(), 0);

    // One parent: a read-only bind of the parent's directory.
    let v1 = c.view("v1", "c1").await.unwrap();
    assert_eq!(v1[0].r#type, "bind", "{v1:?}");
    {
        let m = mount_at(&v1, &d.scratch("v1"));
        assert_read_only(m.path(), "/f");
        assert_eq!(read(m.path(), "/f"), b"one");
    }
    // Two parents: an overlay without upperdir.
    let v2 = c.view("v2", "c2").await.unwrap();
    assert_eq!(v2[0].r#type, "overlay", "{v2:?}");
    {
        let m = mount_at(&v2, &d.scratch("v2"));
        assert_read_only(m.path(), "/f");
        assert_read_only(m.path(), "/g");
        assert_eq!(read(m.path(), "/g"), b"two");
    }
    // Nothing leaked into the committed layers.
    assert_eq!(ls(&fs1, "/"), strings(&["f"]));
    assert_eq!(ls(&fs2, "/"), strings(&["g"]));
    assert_eq!(
        (read(&fs1, "/f"), mode(&fs1, "/f")),
        (b"one".to_vec(), 0o644)
    );
    for v in ["v0", "v1", "v2", "c2", "c1"] {
        c.remove(v).await.unwrap();
    }
});

// ---------------------------------------------------------------------------------------------
// 10. Modes of new snapshots, whatever the umask

/// Starts lamina with `mask` as its umask without touching this process's umask, which every
/// concurrently running test shares. The umask lives in the filesystem context, so a thread that
/// unshares it (`unshare(CLONE_FS)`) has its own; a child spawned from that thread inherits it.
fn start_with_umask(mask: u32) -> TestDaemon {
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_FS).expect("unshare(CLONE_FS)");
        umask(Mode::from_bits_truncate(mask));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(TestDaemon::start())
    })
    .join()
    .expect("starting lamina with a umask")
}

root_test!(new_snapshots_have_contract_modes_whatever_the_umask, || {
    for mask in [0o000, 0o077] {
        let d = start_with_umask(mask);
        let status = fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let umask_line = status
            .lines()
            .find(|l| l.starts_with("Umask:"))
            .expect("Umask line");
        assert_eq!(
            u32::from_str_radix(umask_line["Umask:".len()..].trim(), 8).unwrap(),
            mask,
            "lamina runs with the umask under test"
        );
        let mut c = d.client().await;
        assert_eq!(mode_of(&d.root), 0o700, "umask {mask:o}: root");
        assert_eq!(
            mode_of(&d.root.join("snapshots")),
            0o700,
            "umask {mask:o}: snapshots"
        );

        // Active, no parent.
        let a = c.prepare("a", "").await.unwrap();
        let fs_a = own_fs(&a);
        assert_eq!(mode_of(&fs_a), 0o755, "umask {mask:o}: fs");
        assert_eq!(
            mode_of(&fs_a.parent().unwrap().join("work")),
            0o711,
            "umask {mask:o}: work"
        );
        {
            let m = mount_at(&a, &d.scratch("a"));
            assert_eq!(
                mode_of(m.path()),
                0o755,
                "umask {mask:o}: root of the mount"
            );
            // Hand the layer's root to another owner: children's fs follow it.
            chown(m.path(), Some(1000), Some(1001)).unwrap();
            put(m.path(), "/f", b"f", 0o644);
        }
        c.commit("A", "a").await.unwrap();

        // Active with a parent: an overlay whose root is the new upper directory.
        let b = c.prepare("b", "A").await.unwrap();
        let fs_b = own_fs(&b);
        let work_b = fs_b.parent().unwrap().join("work");
        assert_eq!(mode_of(&fs_b), 0o755, "umask {mask:o}: child fs");
        assert_eq!(mode_of(&work_b), 0o711, "umask {mask:o}: child work");
        let mb = fs::metadata(&fs_b).unwrap();
        assert_eq!(
            (mb.uid(), mb.gid()),
            (1000, 1001),
            "a child's fs takes its parent's owner"
        );
        {
            let m = mount_at(&b, &d.scratch("b"));
            let st = fs::metadata(m.path()).unwrap();
            assert_eq!(
                st.mode() & 0o7777,
                0o755,
                "umask {mask:o}: root of the overlay"
            );
            assert_eq!((st.uid(), st.gid()), (1000, 1001));
            assert_eq!(read(m.path(), "/f"), b"f");
        }

        // A view has fs but no work directory.
        let v = c.view("v", "").await.unwrap();
        let fs_v = PathBuf::from(&v[0].source);
        assert_eq!(mode_of(&fs_v), 0o755, "umask {mask:o}: view fs");
        assert!(!fs_v.parent().unwrap().join("work").exists());
        {
            let m = mount_at(&v, &d.scratch("v"));
            assert_eq!(mode_of(m.path()), 0o755);
        }
    }
});

// ---------------------------------------------------------------------------------------------
// 11. 128 stacked layers against a flat copy

/// Layer `i` of the stack. Layer 0 lays the ground; each later one overwrites a file, adds one,
/// replaces a directory wholesale (opaque), deletes a file an earlier layer added (whiteout),
/// changes a lower file's mode (copy-up), and now and then adds or removes symlinks and renames
/// a lower file.
fn stack_layer(i: usize, r: &Path) {
    if i == 0 {
        put(r, "/bottom", b"way at the bottom\n", 0o777);
        put(r, "/overwriteme", b"FIRST!\n", 0o777);
        mkdir(r, "/ADDHERE", 0o755);
        mkdir(r, "/ONLYME", 0o755);
        put(r, "/ONLYME/bottom", b"bye!\n", 0o777);
        put(r, "/chmodme", b"modes\n", 0o644);
        mkdir(r, "/links", 0o755);
        return;
    }
    put(
        r,
        "/overwriteme",
        format!("{i} WAS HERE!\n").as_bytes(),
        0o777,
    );
    put(r, &format!("/ADDHERE/file-{i}"), b"same\n", 0o755);
    rm_rf(r, "/ONLYME");
    mkdir(r, "/ONLYME", 0o755);
    put(r, &format!("/ONLYME/file-{i}"), b"only me!\n", 0o777);
    if i.is_multiple_of(3) && at(r, &format!("/ADDHERE/file-{}", i - 2)).exists() {
        rm(r, &format!("/ADDHERE/file-{}", i - 2));
    }
    chmod(r, "/chmodme", [0o644, 0o600, 0o755, 0o4750][i % 4]);
    if i.is_multiple_of(5) {
        ln_s(
            r,
            &format!("../ADDHERE/file-{}", i - 1),
            &format!("/links/l-{i}"),
        );
    }
    if i.is_multiple_of(10) {
        rm(r, &format!("/links/l-{}", i - 5));
    }
    if i.is_multiple_of(16) {
        mv(
            r,
            &format!("/ADDHERE/file-{}", i - 1),
            &format!("/ADDHERE/renamed-{i}"),
        );
    }
}

daemon_test!(stack_of_128_layers_equals_a_flat_copy, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let layers: Vec<_> = (0..128)
        .map(|i| move |r: &Path| stack_layer(i, r))
        .collect();
    let refs: Vec<Layer<'_>> = layers.iter().map(|l| l as Layer<'_>).collect();
    let chain = build(&d, &mut c, &flat, "", &refs).await;
    assert_eq!(chain.names.len(), 128);
    let top = chain.names.last().unwrap().clone();
    let want = tree(&flat);

    // Sanity of the mirror itself, so that equal trees mean something.
    assert_eq!(read(&flat, "/overwriteme"), b"127 WAS HERE!\n");
    assert_eq!(ls(&flat, "/ONLYME"), strings(&["file-127"]));
    assert_eq!(read(&flat, "/bottom"), b"way at the bottom\n");
    assert!(want.len() > 80, "{} entries", want.len());

    // A view of the top: 128 lower directories.
    let mounts = c.view("fullview", &top).await.unwrap();
    let lowers = mounts[0].options[0].matches(':').count() + 1;
    assert_eq!(lowers, 128);
    {
        let m = mount_at(&mounts, &d.scratch("fullview"));
        assert_same_tree(&tree(m.path()), &want, "the view of 128 layers");
        eprintln!(
            "128 layers: {} option bytes, {} mounts used relative lowerdirs",
            mounts[0].options.iter().map(String::len).sum::<usize>(),
            chain.compacted + m.compacted() as usize
        );
    }
    // An active snapshot on top: 128 lowers plus an upper directory; still writable.
    let mounts = c.prepare("top-active", &top).await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("top-active"));
        assert_same_tree(
            &tree(m.path()),
            &want,
            "the active snapshot over 128 layers",
        );
        stack_layer(128, m.path());
        stack_layer(128, &flat);
        assert_same_tree(&tree(m.path()), &tree(&flat), "layer 128 applied on top");
    }
    // The layers below are unchanged: spot-check a few views.
    for i in [0, 1, 63, 126] {
        let t = view_tree(&d, &mut c, &chain.names[i]).await;
        assert_same_tree(&t, &chain.trees[i], &format!("layer {i} at the end"));
    }
});

// ---------------------------------------------------------------------------------------------
// 12. Usage

daemon_test!(usage_counts_own_inodes_once, |d, mut c| {
    let m1 = c.prepare("u1", "").await.unwrap();
    let fs1 = own_fs(&m1);
    {
        let m = mount_at(&m1, &d.scratch("u1"));
        let r = m.path();
        put(r, "/big", &vec![7u8; 256 * 1024], 0o644);
        put(r, "/h1", &vec![1u8; 10_000], 0o644);
        ln(r, "/h1", "/h2");
        mkdir(r, "/d", 0o755);
        ln(r, "/h1", "/d/h3");
        ln_s(r, "big", "/l");
        fs::File::open(at(r, "/big")).unwrap().sync_all().unwrap();
    }
    c.commit("U1", "u1").await.unwrap();
    let (size1, inodes1, naive1) = du(&fs1);
    // root, big, h1 (== h2 == d/h3), d, l
    assert_eq!(inodes1, 5);
    assert!(
        naive1 >= size1 + 2 * 8192,
        "the hard links make a difference worth testing"
    );
    let u = c.usage("U1").await.unwrap();
    assert_eq!(
        (u.size, u.inodes),
        (size1, inodes1),
        "committed usage: hard links count once"
    );

    // An active child: its own upper directory only, never its parents.
    let m2 = c.prepare("u2", "U1").await.unwrap();
    let fs2 = own_fs(&m2);
    let before = c.usage("u2").await.unwrap();
    let (s, n, _) = du(&fs2);
    assert_eq!(
        (before.size, before.inodes),
        (s, n),
        "an empty active snapshot"
    );
    assert_eq!(before.inodes, 1, "only its root directory");
    {
        let m = mount_at(&m2, &d.scratch("u2"));
        let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8 + 1).collect();
        let mut f = fs::File::create(at(m.path(), "/mib")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let after = c.usage("u2").await.unwrap();
        let (s, n, _) = du(&fs2);
        assert_eq!(
            (after.size, after.inodes),
            (s, n),
            "active usage is measured now"
        );
        assert_eq!(after.inodes, before.inodes + 1);
        assert!(
            after.size - before.size >= 1024 * 1024,
            "{after:?} vs {before:?}"
        );
        assert!(
            after.size < size1 + 1024 * 1024,
            "parents are not counted: {after:?}"
        );
    }
    c.commit("U2", "u2").await.unwrap();
    let (s2, n2, _) = du(&fs2);
    let u2 = c.usage("U2").await.unwrap();
    assert_eq!(
        (u2.size, u2.inodes),
        (s2, n2),
        "committed usage of the child"
    );
    assert_eq!(
        c.usage("U1").await.unwrap(),
        u,
        "the parent's usage is unchanged"
    );

    // Views use nothing of their own.
    c.view("v1", "U1").await.unwrap();
    c.view("v2", "U2").await.unwrap();
    c.view("v0", "").await.unwrap();
    for v in ["v0", "v1", "v2"] {
        let u = c.usage(v).await.unwrap();
        assert_eq!((u.size, u.inodes), (0, 0), "usage of view {v}");
    }
});
