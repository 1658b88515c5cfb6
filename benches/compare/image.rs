//! A small multi-layer OCI image archive for `ctr images import`, built here (no registry is
//! needed): busybox-static as the userland, then layers of small files.

use std::{fs, path::Path};

use sha2::{Digest, Sha256};

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

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
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
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in &layers {
        let digest = sha256(l);
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": l.len(),
        }));
        diff_ids.push(digest.clone());
        blobs.push((digest, l.clone()));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": goarch(),
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["sh"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .expect("json");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(&config),
            "size": config.len(),
        },
        "layers": descs,
    }))
    .expect("json");
    let tag = name.rsplit(':').next().expect("name:tag");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(&manifest),
            "size": manifest.len(),
            "platform": { "architecture": goarch(), "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .expect("json");
    blobs.push((sha256(&config), config));
    blobs.push((sha256(&manifest), manifest));
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let mut entries = vec![
        Entry::File("oci-layout".into(), layout, 0o644),
        Entry::File("index.json".into(), &index, 0o644),
        Entry::Dir("blobs".into()),
        Entry::Dir("blobs/sha256".into()),
    ];
    for (digest, data) in &blobs {
        entries.push(Entry::File(
            format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
            data,
            0o644,
        ));
    }
    fs::write(path, tar_of(&entries)).expect("writing the image archive");
    layers.len()
}
