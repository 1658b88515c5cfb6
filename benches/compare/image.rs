//! A small multi-layer OCI image archive for `ctr images import`, built here (no registry is
//! needed): busybox-static as the userland, then layers of small files.

use std::{fs, path::Path};

use crate::oci_support::{layer_tar, Entry};

/// Busybox applets linked in `/bin`.
const APPLETS: &[&str] = &["sh", "true", "ls", "cat", "echo"];

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
    let mut out = vec![layer_tar(&l1)];
    let data = vec![b'x'; 1024];
    for l in 0..extra {
        let mut e = vec![Entry::Dir("data".into()), Entry::Dir(format!("data/l{l}"))];
        for f in 0..files {
            e.push(Entry::File(format!("data/l{l}/f{f:05}"), &data, 0o644));
        }
        out.push(layer_tar(&e));
    }
    out
}

/// Writes an OCI image layout tar holding image `name` to `path`; returns its layer count.
pub fn write_archive(path: &Path, name: &str, extra: usize, files: usize) -> usize {
    let layers = layers(extra, files);
    crate::oci_support::write_oci_archive(path, name, &layers);
    layers.len()
}
