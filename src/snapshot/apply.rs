//! The rules of the Diff service's Apply: which snapshot a layer goes into. containerd passes
//! back the mounts lamina answered for an active snapshot; lamina writes the layer into that
//! snapshot's upper directory itself (`layer/`) instead of containerd mounting it.

use std::{io::Read, sync::Arc};

use super::{Kind, Snapshotter};
use crate::{
    error::{Error, Result},
    layer::{self, Whiteouts},
    overlay::{self, Mount},
    sys::at,
};

/// The snapshot a layer is applied to, by ID: its own and its parents' (nearest first); and
/// how to write it there (read once, when the mounts are checked).
#[derive(Debug, PartialEq, Eq)]
pub struct LayerTarget {
    upper: u64,
    lowers: Vec<u64>,
    overlay_xattrs: layer::OverlayXattrs,
    in_user_namespace: bool,
}

impl Snapshotter {
    /// The snapshot that `mounts` are the mounts of: exactly the shape lamina answers for an
    /// active snapshot (a writable bind of its `fs`, or one overlay with its `fs` as
    /// `upperdir`, its `work` as `workdir` and its ancestors' `fs` as `lowerdir`), under this
    /// root. Anything else is not lamina's to write into and is refused as Unimplemented, the
    /// code on which containerd's diff service tries its next differ; a view's read-only
    /// mounts, ID-mapped ones and another snapshotter's all are.
    ///
    /// Then the store is read: the upper directory must be an active snapshot's, the lowers
    /// exactly its ancestors' (see [`Snapshotter::check_layer_target`]).
    pub async fn layer_target(self: &Arc<Self>, mounts: &[Mount]) -> Result<LayerTarget> {
        let target = self.target_of(mounts)?;
        self.run(move |s| s.check_layer_target(&target).map(|()| target))
            .await
    }

    fn target_of(&self, mounts: &[Mount]) -> Result<LayerTarget> {
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
            overlay_xattrs: layer::OverlayXattrs::of_mount_options(&self.options.mount_options),
            in_user_namespace: overlay::probe::in_user_namespace(),
        };
        if let Some(work) = work {
            if work != self.layout.work(target.upper) {
                return Err(not_ours("its workdir is not the snapshot's own"));
            }
        }
        // Inside a user namespace trusted.* cannot be set: over parents the opaque marker
        // needs `userxattr`, which lamina leaves out only where the kernel lacks it (< 5.11).
        if !target.lowers.is_empty()
            && target.in_user_namespace
            && target.overlay_xattrs == layer::OverlayXattrs::Trusted
        {
            return Err(Error::Unimplemented(
                "lamina runs in a user namespace without overlayfs' userxattr (Linux before \
                 5.11), where it cannot write opaque directories: use containerd's own differ \
                 (leave out --differ)"
                    .into(),
            ));
        }
        Ok(target)
    }

    /// Refuses a target whose upper directory is not an active snapshot's (a committed layer
    /// is immutable, and a view has no upper directory of its own), or whose lowers are not
    /// exactly that snapshot's ancestors, nearest first (whiteouts are written for the layers
    /// below, or as deletions when there are none: the wrong lowers would write the wrong
    /// ones). Reads every record: there is no index by ID, and an Apply (a layer's whole
    /// unpack) costs far more than the read.
    fn check_layer_target(&self, target: &LayerTarget) -> Result<()> {
        // Every snapshot's key, kind and parent by ID, and IDs by key.
        let mut by_id = std::collections::HashMap::new();
        let mut by_key = std::collections::HashMap::new();
        self.store.each_view(|key, view| {
            by_id.insert(
                view.id,
                (key.to_string(), view.kind, view.parent.to_string()),
            );
            by_key.insert(key.to_string(), view.id);
            true
        })?;
        let (key, kind, mut parent) = match by_id.get(&target.upper) {
            Some(found) => found.clone(),
            None => {
                return Err(Error::NotFound(format!(
                    "no snapshot has the directory {} (was it removed?)",
                    self.layout.fs(target.upper).display()
                )))
            }
        };
        if kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "the mounts are those of snapshot {key:?}, which is {}: a layer is applied only \
                 to an active snapshot",
                kind.as_str()
            )));
        }
        let wrong = || {
            Error::FailedPrecondition(format!(
                "the mounts' lower directories are not the ancestors of snapshot {key:?}: they \
                 are not the mounts lamina answered for it"
            ))
        };
        for id in &target.lowers {
            match by_key.get(&parent) {
                Some(parent_id) if parent_id == id => {}
                _ => return Err(wrong()),
            }
            parent = by_id[id].2.clone();
        }
        if !parent.is_empty() {
            return Err(wrong());
        }
        Ok(())
    }

    /// Applies the layer `blob`, read from `input`, to the snapshot `target` (see
    /// [`layer::apply`]): whiteouts as overlayfs reads them when it has parents, as deletions
    /// when it has none; `target` comes from [`Snapshotter::layer_target`]. A snapshot removed
    /// meanwhile fails to open (NotFound).
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
                // Whiteouts are 0/0 character devices even inside a user namespace (Linux
                // lets anyone make those since 5.8); the opaque marker follows `userxattr`.
                overlay_xattrs: target.overlay_xattrs,
                skip_devices: target.in_user_namespace,
            };
            layer::apply(&layer_target, &blob, input, sync)
        })
        .await
    }
}
