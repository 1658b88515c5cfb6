//! An OCI image archive for `ctr images import`, built here from layer tars (no registry is
//! needed). Shared by the end-to-end tests and the benchmark (each includes this file with
//! `#[path]`).

// The tests build layers in memory; the benchmark also from files.
#![allow(dead_code)]

use std::{fs, path::Path};

use sha2::{Digest, Sha256};

/// The OCI digest (`sha256:<hex>`) of `data`.
pub fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// This machine's architecture as OCI (Go) names it.
fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A tar header for a root-owned entry with a fixed mtime, so archives are deterministic.
fn header(kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size as u64);
    h
}

/// One entry of a layer: a directory (0755), a file with its contents and mode, or a symlink
/// and its target. `S` is the path: `&str` or `String`.
#[derive(Clone, Copy)]
pub enum Entry<'a, S: AsRef<str> = &'a str> {
    Dir(S),
    File(S, &'a [u8], u32),
    Symlink(S, &'a str),
}

/// An uncompressed layer tar of `entries`, in order, with deterministic headers.
pub fn layer_tar<S: AsRef<str>>(entries: &[Entry<'_, S>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(p) => {
                let mut h = header(tar::EntryType::Directory, 0o755, 0);
                b.append_data(&mut h, p.as_ref(), std::io::empty())
            }
            Entry::File(p, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len());
                b.append_data(&mut h, p.as_ref(), *data)
            }
            Entry::Symlink(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                h.set_link_name(target).expect("tar link name");
                b.append_data(&mut h, p.as_ref(), std::io::empty())
            }
        }
        .expect("tar entry");
    }
    b.into_inner().expect("tar")
}

/// A layer with the machine's `/bin/busybox` (busybox-static), `applets` linked to it in
/// `/bin`, then `more`: the userland of every image the tests and the benchmark build.
pub fn busybox_layer(applets: &[&str], more: &[Entry<'_>]) -> Vec<u8> {
    let busybox = fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
    let links: Vec<String> = applets.iter().map(|a| format!("bin/{a}")).collect();
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
    ];
    entries.extend(links.iter().map(|l| Entry::Symlink(l.as_str(), "busybox")));
    entries.extend(more.iter().copied());
    layer_tar(&entries)
}

/// Appends to `b` the machine's trees at `paths` (relative to `/`; those that are not
/// directories here are left out), symlinks as symlinks, after their parent directories as
/// the machine has them; returns the paths appended.
pub fn append_machine_trees<'p, W: std::io::Write>(
    b: &mut tar::Builder<W>,
    paths: &[&'p str],
) -> Vec<&'p str> {
    b.follow_symlinks(false);
    let root = Path::new("/");
    let present: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| root.join(p).is_dir())
        .collect();
    let mut parents = std::collections::BTreeSet::new();
    for p in &present {
        let mut parent = Path::new(p).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            parents.insert(dir.to_path_buf());
            parent = dir.parent();
        }
    }
    for dir in &parents {
        b.append_path_with_name(root.join(dir), dir)
            .expect("tar entry");
    }
    for p in &present {
        b.append_dir_all(p, root.join(p))
            .unwrap_or_else(|e| panic!("adding /{p} to a layer: {e}"));
    }
    present
}

/// Writes to `path` an OCI image layout tar holding one image, for `ctr images import`:
/// `oci-layout`, `index.json`, and under `blobs/sha256/` the layers, the image config and the
/// manifest.
///
/// `layers` are already-built uncompressed layer tars, bottom first; they are stored as they
/// are (media type `application/vnd.oci.image.layer.v1.tar`), so each one's digest is also its
/// diff ID. The config is for linux on this machine's architecture, with `PATH=/bin` and
/// command `sh`. The index names the image `name` (`io.containerd.image.name`) and its tag,
/// the part after the last `:` (`org.opencontainers.image.ref.name`). Returns the layers' diff
/// IDs, bottom first.
///
/// Shared so that the end-to-end tests and the benchmark import images built the same way,
/// each with its own layers.
pub fn write_oci_archive(path: &Path, name: &str, layers: &[Vec<u8>]) -> Vec<String> {
    write_oci_archive_with(path, name, layers, &["sh"])
}

/// [`write_oci_archive`], with `cmd` as the image's command.
pub fn write_oci_archive_with(
    path: &Path,
    name: &str,
    layers: &[Vec<u8>],
    cmd: &[&str],
) -> Vec<String> {
    let layers: Vec<Layer<'_>> = layers
        .iter()
        .map(|l| {
            let digest = sha256(l);
            Layer {
                media_type: "application/vnd.oci.image.layer.v1.tar",
                diff_id: digest.clone(),
                digest,
                size: l.len() as u64,
                data: Data::Bytes(l),
            }
        })
        .collect();
    write_layers(path, name, &layers, cmd);
    layers.into_iter().map(|l| l.diff_id).collect()
}

/// Where a layer blob's bytes are.
pub enum Data<'a> {
    Bytes(&'a [u8]),
    /// A file, read when the archive is written (a large layer need not be held in memory).
    File(std::path::PathBuf),
}

/// One layer blob as the manifest describes it.
pub struct Layer<'a> {
    /// `application/vnd.oci.image.layer.v1.tar`, `…+gzip`, `…+zstd`.
    pub media_type: &'static str,
    /// The blob's digest (of the compressed bytes, when compressed).
    pub digest: String,
    /// The digest of the uncompressed tar, which the image config lists.
    pub diff_id: String,
    pub size: u64,
    pub data: Data<'a>,
}

/// [`write_oci_archive_with`] for layers already described (compressed or not), streamed into
/// the archive.
pub fn write_layers(path: &Path, name: &str, layers: &[Layer<'_>], cmd: &[&str]) {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "mediaType": l.media_type,
                "digest": l.digest,
                "size": l.size,
            })
        })
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": goarch(),
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": cmd },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .expect("image config JSON");
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .expect("image manifest JSON");
    let manifest_digest = sha256(&manifest);
    let tag = name.rsplit(':').next().expect("name:tag");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": goarch(), "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .expect("image index JSON");

    let out = fs::File::create(path).expect("creating the image archive");
    let mut b = tar::Builder::new(std::io::BufWriter::new(out));
    let add = |b: &mut tar::Builder<_>, p: &str, size: u64, data: &mut dyn std::io::Read| {
        let mut h = header(tar::EntryType::Regular, 0o644, 0);
        h.set_size(size);
        b.append_data(&mut h, p, data).expect("image archive tar");
    };
    for (p, data) in [
        (
            "oci-layout",
            br#"{"imageLayoutVersion":"1.0.0"}"#.as_slice(),
        ),
        ("index.json", index.as_slice()),
    ] {
        add(&mut b, p, data.len() as u64, &mut &data[..]);
    }
    for dir in ["blobs", "blobs/sha256"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, dir, std::io::empty())
            .expect("image archive tar");
    }
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    for l in layers {
        match &l.data {
            Data::Bytes(data) => add(&mut b, &blob(&l.digest), l.size, &mut &data[..]),
            Data::File(file) => {
                let mut f = fs::File::open(file)
                    .unwrap_or_else(|e| panic!("opening {}: {e}", file.display()));
                add(&mut b, &blob(&l.digest), l.size, &mut f)
            }
        }
    }
    for (data, digest) in [(&config, &config_digest), (&manifest, &manifest_digest)] {
        add(&mut b, &blob(digest), data.len() as u64, &mut &data[..]);
    }
    b.into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .expect("writing the image archive");
}
