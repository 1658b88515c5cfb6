//! Applying an image layer to a snapshot (containerd's Diff service, Apply): the layer's blob
//! is read once, its digest checked as it goes, decompressed on one thread while another
//! writes its files into the snapshot's upper directory (`extract.rs`), and the uncompressed
//! stream's digest is the answer. Nothing holds a whole layer: the two threads pass chunks of
//! [`CHUNK`] bytes through a channel of [`DEPTH`] of them.
//!
//! Knows tar, the compressions and OCI's whiteouts; not gRPC, not the store, not which
//! snapshot it writes into (the caller opens the directories).

pub mod extract;
mod guard;
pub mod names;
mod sparse;

use std::{
    io::{self, Read},
    sync::mpsc,
};

use sha2::Digest as _;

pub use extract::{OverlayXattrs, Target, Whiteouts};

use crate::error::{Error, Result};

/// Bytes per chunk passed from the decompressing thread to the writing one.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the two threads.
const DEPTH: usize = 8;

/// The media type of what containerd's applier answers with: an uncompressed layer.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a layer of `media_type`: OCI's layer types (distributable or not) and
/// Docker's. Anything else (encrypted layers, other artifacts) is refused: lamina's differ
/// only applies what it can read to the end.
pub fn compression(media_type: &str) -> Result<Compression> {
    const OCI: &str = "application/vnd.oci.image.layer.v1.tar";
    const OCI_FOREIGN: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    const DOCKER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    const DOCKER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar";
    let base = [OCI, OCI_FOREIGN, DOCKER, DOCKER_FOREIGN]
        .into_iter()
        .find_map(|b| media_type.strip_prefix(b).map(|rest| (b, rest)));
    match base {
        Some((_, "")) => Ok(Compression::None),
        Some((b, "+gzip")) if b.starts_with("application/vnd.oci") => Ok(Compression::Gzip),
        Some((b, "+zstd")) if b.starts_with("application/vnd.oci") => Ok(Compression::Zstd),
        Some((b, ".gzip")) if b.starts_with("application/vnd.docker") => Ok(Compression::Gzip),
        Some((b, ".zstd")) if b.starts_with("application/vnd.docker") => Ok(Compression::Zstd),
        _ => Err(Error::Unimplemented(format!(
            "media type {media_type:?}: lamina's differ applies OCI and Docker image layers, \
             uncompressed, gzip or zstd; use containerd's own differ for this content"
        ))),
    }
}

/// A content digest, `algorithm:hex`, of the algorithms OCI names.
#[derive(Clone)]
enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// The hasher for a digest like `sha256:<64 hex digits>`, checked for shape.
    fn for_digest(digest: &str) -> Result<Hasher> {
        let bad = || {
            Error::InvalidArgument(format!(
                "digest {digest:?} is not `sha256:`, `sha384:` or `sha512:` followed by its \
                 lowercase hex"
            ))
        };
        let (algorithm, hex) = digest.split_once(':').ok_or_else(bad)?;
        let (hasher, len) = match algorithm {
            "sha256" => (Hasher::Sha256(sha2::Sha256::new()), 64),
            "sha384" => (Hasher::Sha384(sha2::Sha384::new()), 96),
            "sha512" => (Hasher::Sha512(sha2::Sha512::new()), 128),
            _ => return Err(bad()),
        };
        if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        Ok(hasher)
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> String {
        let (name, bytes) = match self {
            Hasher::Sha256(h) => ("sha256", h.finalize().to_vec()),
            Hasher::Sha384(h) => ("sha384", h.finalize().to_vec()),
            Hasher::Sha512(h) => ("sha512", h.finalize().to_vec()),
        };
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("{name}:{hex}")
    }
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Hasher,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The reading end of the channel from the decompressing thread. Read chunks go back to
/// it on `used`, to be filled again: allocating a fresh one each time made that thread zero
/// as many bytes as it decompressed.
struct Chunks {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    used: mpsc::Sender<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    let used = std::mem::replace(&mut self.chunk, chunk?);
                    // The other thread may be gone: the chunk is then just dropped.
                    let _ = self.used.send(used);
                    self.at = 0;
                }
                Err(_) => return Ok(0), // the sender is done: end of the stream
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The blob as containerd's content store names it.
#[derive(Debug, Clone)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// What was applied: the uncompressed layer's digest and size, as containerd's applier
/// answers (the image's config lists these as the layer's diff ID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub digest: String,
    pub size: u64,
}

/// Reads the blob from `input`, checks it is the one `blob` names, and writes the layer into
/// `target`. With `sync`, the filesystem is synced before the answer (containerd's `sync_fs`).
pub fn apply(target: &Target, blob: &Blob, input: impl Read + Send, sync: bool) -> Result<Applied> {
    let compression = compression(&blob.media_type)?;
    let mut compressed = Hashing {
        inner: input,
        hasher: Hasher::for_digest(&blob.digest)?,
        bytes: 0,
    };
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(DEPTH);
    let (used, recycled) = mpsc::channel::<Vec<u8>>();
    let (extracted, read) = std::thread::scope(|scope| {
        let decompressing = std::thread::Builder::new()
            .name("lamina-unpack".into())
            .spawn_scoped(scope, || {
                let recycled = recycled; // moved in: a Receiver is not shared
                let result = decompress(compression, &mut compressed, &tx, &recycled);
                // The rest of the blob (what follows the compressed stream) is read too, so
                // its digest covers all of it; not when the writer stopped early (its error is
                // the answer, and the rest of the blob need not be fetched).
                let rest = result.and_then(|finished| match finished {
                    Some(applied) => io::copy(&mut compressed, &mut io::sink()).map(|_| applied),
                    None => Err(io::Error::other("the layer's writer stopped first")),
                });
                if let Err(e) = &rest {
                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
                drop(tx);
                rest
            })
            .map_err(|e| Error::io("starting a thread for", "the layer's decompression", e));
        let decompressing = match decompressing {
            Ok(d) => d,
            Err(e) => return (Err(e), Err(io::Error::other("not started"))),
        };
        let mut uncompressed = Chunks {
            rx,
            used,
            chunk: Vec::new(),
            at: 0,
        };
        let extracted = extract::extract(target, &mut uncompressed).and_then(|()| {
            // What follows the tar's end counts in the digest, as in containerd's: read to the
            // end, so the decompressing thread hashes all of it.
            io::copy(&mut uncompressed, &mut io::sink())
                .map_err(|e| Error::InvalidArgument(format!("reading the layer: {e}")))
                .map(drop)
        });
        // An early stop drops the receiver, so the decompressing thread stops at its next
        // chunk rather than reading the blob to its end.
        drop(uncompressed);
        let read = decompressing
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the decompressing thread panicked")));
        (extracted, read)
    });
    extracted?;
    let applied = read.map_err(|e| Error::InvalidArgument(format!("reading the layer: {e}")))?;
    let digest = compressed.hasher.finish();
    if digest != blob.digest || compressed.bytes != blob.size {
        return Err(Error::InvalidArgument(format!(
            "the blob read for {} ({} bytes) has digest {digest} and {} bytes: it is not the \
             content the descriptor names",
            blob.digest, blob.size, compressed.bytes
        )));
    }
    if sync {
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&target.upper))
            .map_err(|e| Error::io("syncing the filesystem of", "the snapshot", e.into()))?;
    }
    Ok(applied)
}

/// Decompresses `input` into chunks sent on `tx`, hashing them on the way (this thread has
/// less to do than the writing one): the uncompressed stream's digest and size once it ended,
/// None when the receiver went away first.
fn decompress(
    compression: Compression,
    input: &mut impl Read,
    tx: &mpsc::SyncSender<io::Result<Vec<u8>>>,
    recycled: &mpsc::Receiver<Vec<u8>>,
) -> io::Result<Option<Applied>> {
    let mut reader: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(input),
        // Layers made by pigz and others can hold several gzip members; Go's reader reads
        // them all, and so does this.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
    };
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    loop {
        let mut chunk = match recycled.try_recv() {
            Ok(mut used) => {
                used.resize(CHUNK, 0); // zeroes only what the last fill left short
                used
            }
            Err(_) => vec![0u8; CHUNK],
        };
        let mut filled = 0;
        while filled < CHUNK {
            match reader.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(Some(Applied {
                digest: Hasher::Sha256(hasher).finish(),
                size,
            }));
        }
        chunk.truncate(filled);
        hasher.update(&chunk);
        size += filled as u64;
        if tx.send(Ok(chunk)).is_err() {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_name_their_compression() {
        let cases = [
            ("application/vnd.oci.image.layer.v1.tar", Compression::None),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                Compression::None,
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Compression::Gzip,
            ),
        ];
        for (media_type, want) in cases {
            assert_eq!(compression(media_type).unwrap(), want, "{media_type}");
        }
        for refused in [
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "application/vnd.oci.image.layer.v1.tar+bzip2",
            "application/vnd.docker.image.rootfs.diff.tar+gzip",
            "application/octet-stream",
        ] {
            let err = compression(refused).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unimplemented, "{refused}");
            assert!(err.to_string().contains(refused), "{err}");
        }
    }

    #[test]
    fn digests_are_checked_for_shape() {
        assert!(Hasher::for_digest(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(Hasher::for_digest(&format!("sha512:{}", "0".repeat(128))).is_ok());
        for bad in [
            "sha256:abc",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "",
            "sha256",
        ] {
            let err = Hasher::for_digest(bad).err().expect(bad);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
        }
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(Hasher::for_digest(&upper).is_err());
        let mut h = Hasher::for_digest(&format!("sha256:{}", "0".repeat(64))).unwrap();
        h.update(b"");
        assert_eq!(
            h.finish(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    fn sha256(data: &[u8]) -> String {
        let mut h = Hasher::Sha256(sha2::Sha256::new());
        h.update(data);
        h.finish()
    }

    fn blob(media_type: &str, data: &[u8]) -> Blob {
        Blob {
            media_type: media_type.into(),
            digest: sha256(data),
            size: data.len() as u64,
        }
    }

    /// A layer through the whole pipeline: read, digests, decompression on its own thread.
    fn apply_to(dir: &std::path::Path, blob: &Blob, data: &[u8]) -> Result<Applied> {
        let target = extract::tests::target(dir, &[], Whiteouts::Delete);
        apply(&target, blob, data, false)
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    fn layer() -> Vec<u8> {
        use extract::tests::{dir, file, tar};
        let big = vec![7u8; 3 * CHUNK + 5];
        tar(&[dir("a"), file("a/big", &big), file("a/small", b"small")])
    }

    #[test]
    fn each_compression_applies_and_answers_the_uncompressed_digest() {
        let plain = layer();
        let gz = gzip(&plain);
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        let cases = [
            ("application/vnd.oci.image.layer.v1.tar", &plain),
            ("application/vnd.oci.image.layer.v1.tar+gzip", &gz),
            ("application/vnd.oci.image.layer.v1.tar+zstd", &zst),
        ];
        for (media_type, data) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let applied = apply_to(tmp.path(), &blob(media_type, data), data).unwrap();
            assert_eq!(applied.digest, sha256(&plain), "{media_type}");
            assert_eq!(applied.size, plain.len() as u64, "{media_type}");
            assert_eq!(
                std::fs::read(tmp.path().join("a/big")).unwrap().len(),
                3 * CHUNK + 5
            );
            assert_eq!(std::fs::read(tmp.path().join("a/small")).unwrap(), b"small");
        }
    }

    #[test]
    fn a_blob_that_is_not_the_one_named_or_is_corrupt_is_refused() {
        let plain = layer();
        let gz = gzip(&plain);
        let gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
        let tmp = tempfile::tempdir().unwrap();

        // Another blob than the descriptor names.
        let mut other = blob(gzip, &gz);
        other.digest = sha256(b"something else");
        let err = apply_to(tmp.path(), &other, &gz).unwrap_err();
        assert!(
            err.to_string()
                .contains("not the content the descriptor names"),
            "{err}"
        );
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        // Cut short, and flipped inside the deflate stream.
        let cut = &gz[..gz.len() / 2];
        let err = apply_to(tmp.path(), &blob(gzip, cut), cut).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let mut flipped = gz.clone();
        let at = flipped.len() / 3;
        flipped[at] ^= 0xff;
        let err = apply_to(tmp.path(), &blob(gzip, &flipped), &flipped).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

        // Not a tar at all.
        let junk = vec![0x5a; 4096];
        let tar = "application/vnd.oci.image.layer.v1.tar";
        let err = apply_to(tmp.path(), &blob(tar, &junk), &junk).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
}
