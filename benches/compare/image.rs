//! A small multi-layer OCI image archive for `ctr images import`, built here (no registry is
//! needed): busybox-static as the userland, then layers of small files.

use std::{fs, path::Path};

/// Busybox applets linked in `/bin`.
const APPLETS: &[&str] = &["sh", "true", "ls", "cat", "echo"];

enum Entry<'a> {
    Dir(String),
    File(String, &'a [u8], u32),
    Symlink(String, &'a str),
}

/// An uncompressed tar with deterministic headers (root-owned, fixed mtime).
fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).expect("tar");
            }
            Entry::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).expect("tar");
            }
            Entry::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                h.set_link_name(target).expect("tar");
                b.append_data(&mut h, p, std::io::empty()).expect("tar");
            }
        }
    }
    b.into_inner().expect("tar")
}

/// The layers: busybox and its applets, then `extra` layers of `files` files of 1 KiB each.
fn layers(extra: usize, files: usize) -> Vec<Vec<u8>> {
    let busybox = fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
    let mut l1 = vec![
        Entry::Dir("bin".into()),
        Entry::File("bin/busybox".into(), &busybox, 0o755),
    ];
    l1.extend(
        APPLETS
            .iter()
            .map(|a| Entry::Symlink(format!("bin/{a}"), "busybox")),
    );
    l1.push(Entry::Dir("etc".into()));
    let mut out = vec![tar_of(&l1)];
    let data = vec![b'x'; 1024];
    for l in 0..extra {
        let mut e = vec![Entry::Dir("data".into()), Entry::Dir(format!("data/l{l}"))];
        for f in 0..files {
            e.push(Entry::File(format!("data/l{l}/f{f:05}"), &data, 0o644));
        }
        out.push(tar_of(&e));
    }
    out
}

/// Writes an OCI image layout tar holding image `name` to `path`; returns its layer count.
pub fn write_archive(path: &Path, name: &str, extra: usize, files: usize) -> usize {
    let layers = layers(extra, files);
    crate::oci_support::write_oci_archive(path, name, &layers);
    layers.len()
}
