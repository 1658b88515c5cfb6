//! What a request may carry: keys, labels and parent chains within containerd's limits and the
//! kernel's. Each refusal is InvalidArgument or FailedPrecondition with a message that names the
//! limit.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

/// Longest key or name accepted. containerd's keys are `<namespace>/<n>/<chain id>`, far shorter.
pub const MAX_KEY_BYTES: usize = 4096;
/// containerd's own limit on one label's key plus value.
pub const MAX_LABEL_BYTES: usize = 4096;
/// lamina's limit on all of one snapshot's labels together, as encoded (see
/// [`check_labels_total`]), so that every snapshot's Info fits in one gRPC message
/// (containerd's limit is 16 MiB) with room to spare.
pub const MAX_LABELS_TOTAL_BYTES: usize = 12 << 20;
/// What one label costs in an Info beyond its key and value: protobuf's map-entry framing (a
/// tag and a length for the entry, its key and its value), rounded up.
const LABEL_ENCODING_BYTES: usize = 16;
/// Most ancestors a snapshot may have. overlayfs stacks at most 500 lower layers
/// (OVL_MAX_STACK in the kernel's fs/overlayfs), and a snapshot with N ancestors mounts all N
/// as lowers (an active snapshot always, a view from two on). A deeper one could be recorded
/// but never mounted: containerd would learn only when its mount failed.
pub const MAX_ANCESTORS: usize = 500;

/// How much of a caller's string an error message quotes.
const SHOWN: usize = 128;

/// `s` quoted for an error message: whole when short, else its start and its length.
pub(crate) fn shorten(s: &str) -> String {
    if s.len() <= SHOWN {
        return format!("{s:?}");
    }
    let mut end = SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// Refuses a snapshot `key` on `parent` that would have more than [`MAX_ANCESTORS`].
pub(super) fn check_depth(key: &str, parent: &str, ancestors: usize) -> Result<()> {
    if ancestors > MAX_ANCESTORS {
        return Err(Error::precondition(format!(
            "cannot create {} on parent {}: it would have {ancestors} layers below it, and \
             overlayfs mounts at most {MAX_ANCESTORS} (the kernel's OVL_MAX_STACK); an image \
             this deep must be flattened to fewer layers",
            shorten(key),
            shorten(parent)
        )));
    }
    Ok(())
}

pub(super) fn check_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid(format!("{what} must not be empty")));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::invalid(format!(
            "{what} is {} bytes long; at most {MAX_KEY_BYTES} are accepted",
            key.len()
        )));
    }
    Ok(())
}

/// Refuses labels that would take more than [`MAX_LABELS_TOTAL_BYTES`] in an Info, counting
/// each one's encoding: many tiny labels cost far more than their text.
pub(super) fn check_labels_total<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<()> {
    let (mut n, mut total) = (0, 0);
    for (k, v) in labels {
        n += 1;
        total += k.len() + v.len() + LABEL_ENCODING_BYTES;
    }
    if total > MAX_LABELS_TOTAL_BYTES {
        return Err(Error::invalid(format!(
            "{n} labels of {total} bytes in all (counting {LABEL_ENCODING_BYTES} bytes of \
             encoding each); at most {MAX_LABELS_TOTAL_BYTES} bytes are accepted per snapshot"
        )));
    }
    Ok(())
}

pub(super) fn check_labels(labels: HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    check_labels_total(&labels)?;
    for (k, v) in &labels {
        if k.is_empty() {
            return Err(Error::invalid("label keys must not be empty"));
        }
        if k.len() + v.len() > MAX_LABEL_BYTES {
            let shown: String = k.chars().take(64).collect();
            return Err(Error::invalid(format!(
                "label {shown:?}: key and value together are {} bytes; at most \
                 {MAX_LABEL_BYTES} are accepted",
                k.len() + v.len()
            )));
        }
    }
    // containerd's store never keeps a label with an empty value: setting one deletes it.
    Ok(labels.into_iter().filter(|(_, v)| !v.is_empty()).collect())
}
