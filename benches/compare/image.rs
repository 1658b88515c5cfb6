//! OCI image archives for `ctr images import`, built here (no registry is needed): a small
//! multi-layer one (busybox-static as the userland, then layers of small files), and a
//! realistic one, hundreds of megabytes of the machine's own trees in gzip or zstd layers.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::oci_support::{busybox_layer, layer_tar, Entry};

/// Busybox applets linked in `/bin`.
const APPLETS: &[&str] = &["sh", "true", "ls", "cat", "echo"];

/// The layers: busybox and its applets, then `extra` layers of `files` files of 1 KiB each.
fn layers(extra: usize, files: usize) -> Vec<Vec<u8>> {
    let mut out = vec![busybox_layer(APPLETS, &[Entry::Dir("etc")])];
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

/// How a realistic image's layers are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    pub fn label(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// The command that compresses stdin to stdout: the standard tools, at their default
    /// levels, as an image build would.
    fn command(self) -> Command {
        match self {
            Compression::Gzip => {
                let mut c = Command::new("gzip");
                c.arg("-c");
                c
            }
            Compression::Zstd => {
                let mut c = Command::new("zstd");
                c.args(["-q", "-c"]);
                c
            }
        }
    }
}

/// An image archive on disk, and what it holds.
#[derive(Clone, Debug)]
pub struct Image {
    pub name: String,
    pub archive: PathBuf,
    pub layers: usize,
    /// Regular files in all layers.
    pub files: u64,
    /// Bytes of the uncompressed layers.
    pub bytes: u64,
}

impl Image {
    pub fn describe(&self) -> String {
        if self.bytes == 0 {
            return format!("{} layers, {} files", self.layers, self.files);
        }
        format!(
            "{} layers, {} MB in {} files",
            self.layers,
            self.bytes / 1_000_000,
            self.files
        )
    }
}

/// The machine's trees each layer of the realistic image is made of (those that exist): a
/// development image's headers, documentation and translations, and a language runtime.
const TREES: &[&[&str]] = &[
    &["usr/include"],
    &["usr/share/locale", "usr/share/doc"],
    &[
        "usr/lib/python3",
        "usr/lib/python3.11",
        "usr/lib/python3.12",
        "usr/lib/python3.13",
    ],
];

/// A few megabytes of the same kind, for a smoke run.
const SMOKE_TREES: &[&[&str]] = &[&["usr/include/linux"], &["usr/include/x86_64-linux-gnu"]];

/// The realistic image (busybox under layers made of the machine's own trees, see [`TREES`]),
/// compressed with `compression`, built once into `cache` and reused.
pub fn realistic(cache: &Path, compression: Compression, smoke: bool) -> Image {
    let kind = if smoke { "smoke" } else { "big" };
    let name = format!("lamina.bench/{kind}:{}", compression.label());
    let dir = cache.join(format!("{kind}-{}", compression.label()));
    let archive = dir.join("image.tar");
    let facts = dir.join("facts.json");
    if let Ok(text) = fs::read_to_string(&facts) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if archive.is_file() {
                return Image {
                    name,
                    archive,
                    layers: v["layers"].as_u64().unwrap_or(0) as usize,
                    files: v["files"].as_u64().unwrap_or(0),
                    bytes: v["bytes"].as_u64().unwrap_or(0),
                };
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("creating the image cache");
    let trees = if smoke { SMOKE_TREES } else { TREES };
    let busybox = layers(0, 0).remove(0);
    let mut files = APPLETS.len() as u64 + 1;
    let mut bytes = busybox.len() as u64;
    let mut tars = vec![dir.join("layer0.tar")];
    fs::write(&tars[0], &busybox).expect("writing the busybox layer");
    for (i, paths) in trees.iter().enumerate() {
        let tar_path = dir.join(format!("layer{}.tar", i + 1));
        let out = fs::File::create(&tar_path).expect("creating a layer tar");
        let mut b = tar::Builder::new(std::io::BufWriter::new(out));
        for p in crate::oci_support::append_machine_trees(&mut b, paths) {
            let (f, _) = count(&Path::new("/").join(p));
            files += f;
        }
        b.into_inner()
            .and_then(|mut w| std::io::Write::flush(&mut w))
            .expect("writing a layer tar");
        bytes += fs::metadata(&tar_path).expect("layer tar").len();
        tars.push(tar_path);
    }
    let mut described = Vec::new();
    for tar_path in &tars {
        let diff_id = sha256_file(tar_path);
        let blob = tar_path.with_extension(compression.label());
        let status = compression
            .command()
            .stdin(fs::File::open(tar_path).expect("layer tar"))
            .stdout(fs::File::create(&blob).expect("creating a blob"))
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", compression.label()));
        assert!(status.success(), "{} failed: {status}", compression.label());
        fs::remove_file(tar_path).expect("removing a layer tar");
        described.push(crate::oci_support::Layer {
            media_type: compression.media_type(),
            digest: sha256_file(&blob),
            diff_id,
            size: fs::metadata(&blob).expect("blob").len(),
            data: crate::oci_support::Data::File(blob),
        });
    }
    crate::oci_support::write_layers(&archive, &name, &described, &["sh"]);
    for l in &described {
        if let crate::oci_support::Data::File(f) = &l.data {
            let _ = fs::remove_file(f);
        }
    }
    let image = Image {
        name,
        archive,
        layers: described.len(),
        files,
        bytes,
    };
    let v = serde_json::json!({"layers": image.layers, "files": image.files, "bytes": image.bytes});
    fs::write(&facts, v.to_string()).expect("writing the image's facts");
    image
}

/// Regular files and bytes under `dir`, symlinks not followed.
fn count(dir: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                let (f, b) = count(&e.path());
                files += f;
                bytes += b;
            } else if md.is_file() {
                files += 1;
                bytes += md.len();
            }
        }
    }
    (files, bytes)
}

/// The OCI digest of a file's contents, read in chunks.
fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).expect("hashing a blob");
    format!("sha256:{:x}", h.finalize())
}
