//! lamina's differ writes what containerd's own applier writes: the same image (a corpus of
//! crafted layers; layers of the machine's own trees) is unpacked by a containerd 2.x through
//! lamina's differ and by another
//! through containerd's applier (its overlay fast path, into lamina's upper directories too),
//! and each layer's upper directory is compared entry by entry: names (non-UTF-8 included),
//! types, modes with setuid/setgid/sticky, owners, sizes, contents, symlink targets, device
//! numbers, hardlink groups, extended attributes (overlay whiteouts and opaque markers,
//! `security.capability`, `user.*`) and times. The corpus has sparse files in the PAX format
//! too (GNU tar's 1.0 and 0.1).

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    fs,
    io::Write,
    os::unix::{
        ffi::OsStrExt,
        fs::{FileTypeExt, MetadataExt},
    },
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::{
    containerd::{flavor, Containerd, DifferDaemon},
    containerd_support::Flavor,
    oci_support::{append_machine_trees, busybox_layer, sha256, write_layers, Data, Layer},
    util::*,
};

const IMAGE: &str = "lamina.test/differ-corpus:1";

/// One entry of a crafted layer, written into its header as it is.
struct E<'a> {
    kind: tar::EntryType,
    name: &'a [u8],
    link: &'a [u8],
    mode: u32,
    owner: (u64, u64),
    mtime: u64,
    data: Vec<u8>,
    pax: Vec<(&'a str, Vec<u8>)>,
    dev: (u32, u32),
}

fn e(kind: tar::EntryType, name: &str) -> E<'_> {
    E {
        kind,
        name: name.as_bytes(),
        link: b"",
        mode: if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        },
        owner: (0, 0),
        mtime: 1_500_000_000,
        data: Vec::new(),
        pax: Vec::new(),
        dev: (0, 0),
    }
}

fn file<'a>(name: &'a str, data: &[u8]) -> E<'a> {
    E {
        data: data.to_vec(),
        ..e(tar::EntryType::Regular, name)
    }
}

fn dir(name: &str) -> E<'_> {
    e(tar::EntryType::Directory, name)
}

fn link<'a>(kind: tar::EntryType, name: &'a str, target: &'a str) -> E<'a> {
    E {
        link: target.as_bytes(),
        ..e(kind, name)
    }
}

/// A tar stream; names longer than a header holds go in a PAX record (as Go and GNU tar
/// write them) unless `gnu_long` asks for GNU's `L` entries.
fn tar(entries: &[E<'_>], gnu_long: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for x in entries {
        let mut pax: Vec<(&str, Vec<u8>)> = x.pax.clone();
        let long = x.name.len() > 99;
        if long && !gnu_long {
            pax.push(("path", x.name.to_vec()));
        }
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (*k, &v[..])))
                .unwrap();
        }
        if long && gnu_long {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
            h.set_entry_type(tar::EntryType::GNULongName);
            let mut name = x.name.to_vec();
            name.push(0);
            h.set_size(name.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, &name[..]).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        let gnu = h.as_gnu_mut().unwrap();
        let short = &x.name[..x.name.len().min(99)];
        gnu.name[..short.len()].copy_from_slice(short);
        gnu.linkname[..x.link.len()].copy_from_slice(x.link);
        h.set_entry_type(x.kind);
        h.set_mode(x.mode);
        h.set_uid(x.owner.0);
        h.set_gid(x.owner.1);
        h.set_mtime(x.mtime);
        h.set_size(x.data.len() as u64);
        h.set_device_major(x.dev.0).unwrap();
        h.set_device_minor(x.dev.1).unwrap();
        h.set_cksum();
        b.append(&h, &x.data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// `security.capability` granting cap_net_bind_service (VFS_CAP_REVISION_2, effective).
fn capability() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 10).to_le_bytes()); // permitted, low word
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, low word
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// The corpus: three layers that exercise what an applier must get right.
fn corpus() -> Vec<Vec<u8>> {
    use tar::EntryType as T;
    let long_dir = format!("long/{}", "d".repeat(120));
    let long_file = format!("{long_dir}/{}", "f".repeat(90));
    let gnu_long = format!("gnu/{}", "g".repeat(150));
    let big: Vec<u8> = (0..9 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    // Sparse files in the PAX format, as GNU tar writes them (`--sparse --format=pax`): 1.0,
    // its map in the data's first block (a 64 MiB file of three fragments), and 0.1, its map
    // in a record.
    let mut one_oh = b"3\n0\n4096\n1048576\n10\n67108860\n4\n".to_vec();
    one_oh.resize(512, 0);
    one_oh.extend((0..4096u32).map(|i| (i % 7 + 1) as u8));
    one_oh.extend_from_slice(b"0123456789tail");
    let sparse = |name: &str, records: &[(&'static str, &str)]| -> Vec<(&'static str, Vec<u8>)> {
        let mut pax: Vec<(&'static str, Vec<u8>)> = vec![("GNU.sparse.name", name.into())];
        pax.extend(records.iter().map(|(k, v)| (*k, v.as_bytes().to_vec())));
        pax
    };
    let l1 = vec![
        dir("etc"),
        file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        E {
            mode: 0o640,
            owner: (0, 42),
            ..file("etc/shadow", b"root:*:1::::::\n")
        },
        dir("opq"),
        file("opq/a", b"a"),
        dir("opq/sub"),
        file("opq/sub/b", b"b"),
        dir("replace_dir"),
        file("replace_dir/x", b"x"),
        file("replace_file", b"f"),
        dir("bin"),
        E {
            mode: 0o4755,
            ..file("bin/tool", b"#!/bin/sh\necho tool\n")
        },
        E {
            mode: 0o4755,
            ..link(T::Link, "bin/tool-link", "bin/tool")
        },
        E {
            mode: 0o2755,
            owner: (0, 50),
            ..file("bin/sgid", b"sgid")
        },
        link(T::Symlink, "bin/sh", "tool"),
        link(T::Symlink, "bin/dangling", "/nowhere/at/all"),
        E {
            name: b"bin/caf\xe9",
            ..file("", b"latin-1 name")
        },
        E {
            mode: 0o1777,
            ..dir("tmp")
        },
        E {
            mode: 0o600,
            ..e(T::Fifo, "run/fifo")
        },
        E {
            mode: 0o666,
            dev: (1, 3),
            ..e(T::Char, "dev/null")
        },
        E {
            mode: 0o660,
            owner: (0, 6),
            dev: (7, 0),
            ..e(T::Block, "dev/loop0")
        },
        file("empty", b""),
        file("big", &big),
        dir("sparse"),
        E {
            pax: sparse(
                "sparse/one-oh",
                &[
                    ("GNU.sparse.major", "1"),
                    ("GNU.sparse.minor", "0"),
                    ("GNU.sparse.realsize", "67108864"),
                ],
            ),
            ..file("GNUSparseFile.0/one-oh", &one_oh)
        },
        E {
            pax: sparse(
                "sparse/zero-one",
                &[
                    ("GNU.sparse.major", "0"),
                    ("GNU.sparse.minor", "1"),
                    ("GNU.sparse.size", "9000"),
                    ("GNU.sparse.numblocks", "2"),
                    ("GNU.sparse.map", "0,3,8000,4"),
                ],
            ),
            ..file("GNUSparseFile.0/zero-one", b"abcdefg")
        },
        E {
            mode: 0o000,
            ..dir("locked")
        },
        file("locked/f", b"in a 0000 directory"),
        E {
            mode: 0o700,
            owner: (5, 6),
            mtime: 1_400_000_000,
            ..dir("implied2")
        },
        E {
            pax: vec![
                ("SCHILY.xattr.security.capability", capability()),
                ("SCHILY.xattr.user.comment", b"a comment".to_vec()),
                ("SCHILY.xattr.trusted.evil", b"y".to_vec()),
            ],
            mode: 0o755,
            ..file("caps", b"\x7fELF")
        },
        E {
            pax: vec![
                ("mtime", b"1600000000.123456789".to_vec()),
                ("atime", b"1700000000.5".to_vec()),
            ],
            ..file("frac", b"fractional times")
        },
        E {
            pax: vec![("uid", b"100000".to_vec()), ("gid", b"200000".to_vec())],
            ..file("bigids", b"large ids")
        },
        file("implied/deep/file", b"no directory entries above me"),
        // Whiteouts in the first layer (no parents): deletions of what it wrote itself.
        file("gone", b"written, then whited out"),
        file(".wh.gone", b""),
        dir("odir"),
        file("odir/kept", b"the layer's own survives its opaque marker"),
        file("odir/.wh..wh..opq", b""),
        file(&long_file, b"a name longer than a header (PAX path)"),
        E {
            mtime: 1_000,
            ..file(&gnu_long, b"a GNU long name")
        },
    ];
    let l2 = vec![
        file("etc/.wh.shadow", b""),
        file("opq/.wh..wh..opq", b""),
        file("opq/new", b"new"),
        file("replace_dir", b"a file where a directory was"),
        dir("replace_file"),
        file("replace_file/inner", b"a directory where a file was"),
        file(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
        ),
        link(T::Link, "etc/passwd-link", "etc/passwd"),
        file("implied2/sub/x", b"under a directory of the layer below"),
        file("locked/f2", b"into the 0000 directory of the layer below"),
        file("bin/.wh.sh", b""),
        file(".wh.empty", b""),
    ];
    let l3 = vec![
        file(".wh.bin", b""),
        dir("newdir"),
        file("newdir/.wh.never-was", b""),
        E {
            mode: 0o751,
            ..dir("etc")
        },
    ];
    vec![tar(&l1, true), tar(&l2, false), tar(&l3, false)]
}

/// What the comparison sees of one entry.
fn describe(
    path: &Path,
    m: &fs::Metadata,
    since: i64,
    links: &mut HashMap<u64, Vec<u8>>,
    rel: &[u8],
) -> String {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "dir".to_string()
    } else if ft.is_symlink() {
        format!("symlink -> {:?}", fs::read_link(path).unwrap())
    } else if ft.is_file() {
        let data = fs::read(path).unwrap();
        // Hardlinks: the group is named by the first path met with that inode.
        let group = links.entry(m.ino()).or_insert_with(|| rel.to_vec());
        format!(
            "file {} bytes {} links={} group={:?}",
            data.len(),
            sha256(&data),
            m.nlink(),
            String::from_utf8_lossy(group)
        )
    } else if ft.is_char_device() {
        format!("char {:x}", m.rdev())
    } else if ft.is_block_device() {
        format!("block {:x}", m.rdev())
    } else if ft.is_fifo() {
        "fifo".into()
    } else {
        "other".into()
    };
    // A directory's mtime is the time its last entry was made, unless the layer sets it, and a
    // whiteout's is the time it was made: a time during this test means "now" on both sides
    // (every time the corpus sets is years old).
    let mtime = if m.mtime() >= since {
        "now".to_string()
    } else {
        format!("{}.{:09}", m.mtime(), m.mtime_nsec())
    };
    let xattrs = xattrs_of(path);
    format!(
        "{kind} mode={:o} owner={}:{} mtime={mtime} xattrs={xattrs:?}",
        m.mode() & 0o7777,
        m.uid(),
        m.gid()
    )
}

pub(crate) fn xattrs_of(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: the path is NUL-terminated and the buffer's pointer and length match.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    buf.truncate(n as usize);
    let mut out = BTreeMap::new();
    for key in buf.split(|&b| b == 0).filter(|k| !k.is_empty()) {
        let ck = std::ffi::CString::new(key).unwrap();
        let mut v = vec![0u8; 4096];
        // SAFETY: as above.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), ck.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(n >= 0, "lgetxattr {}", path.display());
        v.truncate(n as usize);
        out.insert(String::from_utf8_lossy(key).into_owned(), v);
    }
    out
}

/// Every entry under `root` (itself included, as ""), by its name's bytes.
fn tree(root: &Path, since: i64) -> BTreeMap<Vec<u8>, String> {
    let mut out = BTreeMap::new();
    let mut links = HashMap::new();
    let mut todo = vec![(root.to_path_buf(), Vec::new())];
    while let Some((path, rel)) = todo.pop() {
        let m = fs::symlink_metadata(&path).unwrap();
        out.insert(rel.clone(), describe(&path, &m, since, &mut links, &rel));
        if m.file_type().is_dir() {
            let mut names: Vec<_> = fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for name in names.into_iter().rev() {
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(name.as_bytes());
                todo.push((path.join(&name), r));
            }
        }
    }
    out
}

/// The upper directory of each of the image's layers, bottom first (lamina reports it in a
/// label when `upperdir_label` is on).
fn upper_dirs(c: &Containerd, chain: &[String]) -> Vec<PathBuf> {
    chain
        .iter()
        .map(|key| {
            let out = c.ctr_ok(&["snapshots", "--snapshotter", "lamina", "info", key]);
            let info: serde_json::Value = serde_json::from_str(&out).unwrap();
            let upper = info["Labels"]["containerd.io/snapshot/overlay.upperdir"]
                .as_str()
                .unwrap_or_else(|| panic!("no upperdir label in {out}"));
            PathBuf::from(upper)
        })
        .collect()
}

/// An image of `layers`, gzip-compressed as registries hold them when `gzip`; the chain IDs.
fn write_image(path: &Path, layers: &[Vec<u8>], gzip: bool) -> Vec<String> {
    let compressed: Vec<Vec<u8>> = layers
        .iter()
        .filter(|_| gzip)
        .map(|l| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(l).unwrap();
            gz.finish().unwrap()
        })
        .collect();
    let descs: Vec<Layer<'_>> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| match compressed.get(i) {
            Some(z) => Layer {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
                diff_id: sha256(l),
                digest: sha256(z),
                size: z.len() as u64,
                data: Data::Bytes(z),
            },
            None => Layer {
                media_type: "application/vnd.oci.image.layer.v1.tar",
                diff_id: sha256(l),
                digest: sha256(l),
                size: l.len() as u64,
                data: Data::Bytes(l),
            },
        })
        .collect();
    write_layers(path, IMAGE, &descs, &["sh"]);
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    crate::containerd::chain_ids(&diff_ids)
}

/// Layers made of the machine's own trees, as an image built from a distribution would be:
/// `/etc` (odd modes and owners, many symlinks), then headers, then a language runtime and
/// system binaries. Uncompressed: what is compared is the tree (the corpus covers gzip).
fn machine_layers() -> Vec<Vec<u8>> {
    const TREES: &[&[&str]] = &[
        &["etc"],
        &["usr/include"],
        &["usr/lib/python3", "usr/lib/python3.11", "usr/sbin"],
    ];
    TREES
        .iter()
        .map(|paths| {
            let mut b = tar::Builder::new(Vec::new());
            append_machine_trees(&mut b, paths);
            b.into_inner().unwrap()
        })
        .collect()
}

/// Unpacks an image of `layers` (gzip-compressed when `gzip`: the corpus; the machine's trees
/// are not) through a containerd of
/// `flavor`, with lamina's differ or without, and returns each layer's tree.
async fn unpacked(
    flavor: &Flavor,
    with_differ: bool,
    since: i64,
    layers: &[Vec<u8>],
    gzip: bool,
    run: Option<&dyn Fn(&Containerd)>,
) -> Vec<BTreeMap<Vec<u8>, String>> {
    // Unique per test: the link and containerd's namespace are named by it.
    let what = if gzip { "corpus" } else { "trees" };
    let tag = format!("{what}-{}-{with_differ}", flavor.name);
    let dd = DifferDaemon::start_with(&tag, "upperdir_label = true\n").await;
    let d = &dd.d;
    let flags: &[&str] = if with_differ { &["--differ"] } else { &[] };
    let c = Containerd::start_with(d, flavor, &tag, flags, |_| String::new());
    dd.reads_from(&c);
    let archive = c.path("corpus.tar");
    let chain = write_image(&archive, layers, gzip);
    crate::containerd::import(&c, &archive, IMAGE);
    // The side that names lamina's differ unpacked through it, the other never called it.
    let want = if with_differ { chain.len() } else { 0 };
    assert_eq!(dd.applies(), want, "Applies in lamina's log:\n{}", dd.log());
    let trees = upper_dirs(&c, &chain)
        .iter()
        .map(|dir| tree(dir, since))
        .collect();
    if let Some(run) = run {
        // A container on the image, then its collection.
        run(&c);
        c.ctr_ok(&["images", "rm", "--sync", IMAGE]);
        crate::containerd::wait_all_collected(&c, d).await;
    }
    drop(c);
    trees
}

/// Both sides' trees of an image of `layers`, compared layer by layer; lamina's differ's.
async fn same_trees(
    flavor: &Flavor,
    layers: &[Vec<u8>],
    gzip: bool,
    run: Option<&dyn Fn(&Containerd)>,
) -> Vec<BTreeMap<Vec<u8>, String>> {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 5;
    let ours = unpacked(flavor, true, since, layers, gzip, run).await;
    let theirs = unpacked(flavor, false, since, layers, gzip, None).await;
    assert_eq!(ours.len(), layers.len());
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let mut diffs = Vec::new();
        for key in a
            .keys()
            .chain(b.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let (x, y) = (a.get(key), b.get(key));
            if x != y {
                diffs.push(format!(
                    "  {:?}\n    lamina's differ:      {x:?}\n    containerd's applier: {y:?}",
                    OsStr::from_bytes(key)
                ));
            }
        }
        assert!(
            diffs.is_empty(),
            "layer {}: {} entries differ:\n{}",
            i + 1,
            diffs.len(),
            diffs.join("\n")
        );
        assert!(a.len() > 3, "layer {}: only {} entries", i + 1, a.len());
    }
    ours
}

async fn writes_what_containerd_s_applier_writes(flavor: Flavor) {
    let trees = same_trees(&flavor, &corpus(), true, None).await;
    // The sparse files are there, under their real names and sizes (on both sides, the same).
    for (name, size) in [("sparse/one-oh", 67_108_864), ("sparse/zero-one", 9000)] {
        let found = trees[0].get(name.as_bytes()).map(String::as_str);
        assert!(
            found.is_some_and(|d| d.starts_with(&format!("file {size} bytes"))),
            "{name}: {found:?}"
        );
    }
}

/// The same for layers of the machine's trees: thousands of ordinary files, directories and
/// symlinks as a distribution lays them out, over busybox. On lamina's differ's side, a
/// container then runs on the image (its union view: a file of each layer, the headers' file
/// as the machine has it) and containerd collects it.
async fn writes_what_containerd_s_applier_writes_from_machine_trees(flavor: Flavor) {
    let mut layers = vec![busybox_layer(&["sh"], &[])];
    layers.extend(machine_layers());
    let stdio = sha256(&fs::read("/usr/include/stdio.h").expect("/usr/include/stdio.h"));
    let headers = fs::read_dir("/usr/include").unwrap().count();
    let run = |c: &Containerd| {
        let out = c.ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "lamina",
            IMAGE,
            "machine-trees",
            "sh",
            "-c",
            "busybox sha256sum /usr/include/stdio.h; busybox ls -A /usr/include | busybox wc -l; \
             busybox test -f /etc/passwd && busybox test -d /usr/sbin && echo layers",
        ]);
        let words: Vec<&str> = out.split_whitespace().collect();
        let want_sum = stdio.trim_start_matches("sha256:");
        let want_count = headers.to_string();
        assert_eq!(
            words,
            [
                want_sum,
                "/usr/include/stdio.h",
                want_count.as_str(),
                "layers"
            ],
            "the container's view of the machine-trees image: {out}"
        );
    };
    same_trees(&flavor, &layers, false, Some(&run)).await;
}

root_test!(v2_lts_writes_what_containerd_s_applier_writes, || {
    if let Some(f) = flavor(|| Flavor::v2(0)) {
        writes_what_containerd_s_applier_writes(f).await
    }
});
root_test!(v2_newest_writes_what_containerd_s_applier_writes, || {
    if let Some(f) = flavor(|| Flavor::v2(1)) {
        writes_what_containerd_s_applier_writes(f).await
    }
});
root_test!(
    v2_lts_writes_what_containerd_s_applier_writes_from_machine_trees,
    || {
        if let Some(f) = flavor(|| Flavor::v2(0)) {
            writes_what_containerd_s_applier_writes_from_machine_trees(f).await
        }
    }
);
root_test!(
    v2_newest_writes_what_containerd_s_applier_writes_from_machine_trees,
    || {
        if let Some(f) = flavor(|| Flavor::v2(1)) {
            writes_what_containerd_s_applier_writes_from_machine_trees(f).await
        }
    }
);
