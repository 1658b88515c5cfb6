//! The rules of the Diff service's Apply: which snapshot a layer goes into. containerd passes
//! back the mounts lamina answered for an active snapshot; lamina writes the layer into that
//! snapshot's upper directory itself (`layer/`) instead of containerd mounting it.

use std::{io::Read, sync::Arc};

use super::Snapshotter;
use crate::{
    error::{Error, Result},
    layer::{self, Whiteouts},
    overlay::{self, Mount},
    sys::at,
};

/// The snapshot a layer is applied to, by ID: its own and its parents' (nearest first).
#[derive(Debug, PartialEq, Eq)]
pub struct LayerTarget {
    upper: u64,
    lowers: Vec<u64>,
}

impl Snapshotter {
    /// The snapshot that `mounts` are the mounts of: exactly the shape lamina answers for an
    /// active snapshot (a writable bind of its `fs`, or one overlay with its `fs` as
    /// `upperdir`, its `work` as `workdir` and its ancestors' `fs` as `lowerdir`), under this
    /// root. Anything else is not lamina's to write into and is refused as Unimplemented, the
    /// code on which containerd's diff service tries its next differ; a view's read-only
    /// mounts, ID-mapped ones and another snapshotter's all are.
    pub fn layer_target(&self, mounts: &[Mount]) -> Result<LayerTarget> {
        let not_ours = |why: &str| {
            Error::Unimplemented(format!(
                "lamina's differ applies layers only to the mounts of a snapshot lamina \
                 prepared under {} ({why}); these are {mounts:?}: use containerd's own differ \
                 for them",
                self.layout.root().display()
            ))
        };
        let (upper, lowers, work) = overlay::layer_dirs(mounts)
            .ok_or_else(|| not_ours("one writable bind or overlay, not ID-mapped"))?;
        let id = |path: &std::path::Path| {
            self.layout
                .fs_id(path)
                .ok_or_else(|| not_ours(&format!("{} is not a snapshot's fs", path.display())))
        };
        let target = LayerTarget {
            upper: id(&upper)?,
            lowers: lowers.iter().map(|p| id(p)).collect::<Result<_>>()?,
        };
        if let Some(work) = work {
            if work != self.layout.work(target.upper) {
                return Err(not_ours("its workdir is not the snapshot's own"));
            }
        }
        Ok(target)
    }

    /// Applies the layer `blob`, read from `input`, to the snapshot `target` (see
    /// [`layer::apply`]): whiteouts as overlayfs reads them when it has parents, as deletions
    /// when it has none. A snapshot removed meanwhile fails to open (NotFound).
    pub async fn apply(
        self: &Arc<Self>,
        target: LayerTarget,
        blob: layer::Blob,
        input: impl Read + Send + 'static,
        sync: bool,
    ) -> Result<layer::Applied> {
        self.run(move |s| {
            let open = |id: u64| {
                let path = s.layout.fs(id);
                at::open_dir(None, &path).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Error::NotFound(format!(
                            "the snapshot directory {} does not exist (was the snapshot \
                             removed?)",
                            path.display()
                        ))
                    } else {
                        Error::io("opening", path, e)
                    }
                })
            };
            let layer_target = layer::Target {
                upper: open(target.upper)?,
                lowers: target
                    .lowers
                    .iter()
                    .map(|&id| open(id))
                    .collect::<Result<_>>()?,
                whiteouts: if target.lowers.is_empty() {
                    Whiteouts::Delete
                } else {
                    Whiteouts::Overlay
                },
            };
            layer::apply(&layer_target, &blob, input, sync)
        })
        .await
    }
}
