//! What the kernel and the root's filesystem support, checked once at start-up, and the mount
//! options that follow from it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::dir::{Dir, Type};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::{error::Error, sys};

/// Facts about this host that change the mounts lamina hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// `/sys/module/overlay/parameters/index` exists: the kernel knows the `index=` option.
    pub has_index_param: bool,
    /// lamina runs inside a user namespace.
    pub in_user_namespace: bool,
}

impl Host {
    pub fn detect() -> Host {
        Host {
            has_index_param: Path::new("/sys/module/overlay/parameters/index").exists(),
            in_user_namespace: in_user_namespace(),
        }
    }
}

/// The options appended to every overlay mount: the configured ones, plus `index=off` when the
/// kernel has the index feature and nothing configured it (with the index on, a lower layer
/// shared by two overlays makes the second mount fail), plus `userxattr` inside a user namespace
/// (where `trusted.*` xattrs are unavailable).
pub fn overlay_options(configured: &[String], host: Host) -> Vec<String> {
    let mut options = configured.to_vec();
    if host.has_index_param && !configured.iter().any(|o| o.starts_with("index=")) {
        options.push("index=off".into());
    }
    if host.in_user_namespace && !configured.iter().any(|o| o == "userxattr") {
        options.push("userxattr".into());
    }
    options
}

/// The options lamina hands out, proven by a probe mount under `root`: [`overlay_options`], or
/// the same without the `userxattr` lamina added when only that keeps overlayfs from mounting
/// (kernels before 5.11 do not know the option; containerd likewise adds it only where a mount
/// with it works). A `userxattr` the user configured stays: then the probe's error stands.
pub fn usable_options(
    root: &Path,
    configured: &[String],
    host: Host,
) -> Result<Vec<String>, Error> {
    first_that_mounts(candidates(configured, host), |options| check(root, options))
}

/// The option sets to try, in order.
fn candidates(configured: &[String], host: Host) -> Vec<Vec<String>> {
    let options = overlay_options(configured, host);
    let added_userxattr =
        options.iter().any(|o| o == "userxattr") && !configured.iter().any(|o| o == "userxattr");
    if !added_userxattr {
        return vec![options];
    }
    let without = options
        .iter()
        .filter(|o| *o != "userxattr")
        .cloned()
        .collect();
    vec![options, without]
}

/// The first candidate `check` accepts; if none, the first candidate's error.
fn first_that_mounts(
    candidates: Vec<Vec<String>>,
    mut check: impl FnMut(&[String]) -> Result<(), Error>,
) -> Result<Vec<String>, Error> {
    let mut first_error = None;
    for options in candidates {
        match check(&options) {
            Ok(()) => return Ok(options),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| Error::Unsupported("no mount options to try".into())))
}

/// Whether lamina runs inside a user namespace (rootless, or in a container).
pub fn in_user_namespace() -> bool {
    // The initial namespace maps the whole 32-bit uid range onto itself.
    match fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

/// Checks that overlayfs works on `root` by mounting a tiny overlay in a scratch directory
/// under it, and that the root's filesystem reports file types in directory entries (overlayfs
/// needs `d_type` to find whiteouts). The scratch directory is removed whatever happens.
pub fn check(root: &Path, options: &[String]) -> Result<(), Error> {
    let scratch = scratch_dir(root);
    // A lamina killed mid-probe leaves the probe overlay mounted; detach it before deleting.
    let _ = sys::unmount(&scratch.join("merged"));
    remove_scratch(&scratch);
    let result = check_in(&scratch, options);
    remove_scratch(&scratch);
    result
}

/// Deletes a probe's scratch directory with the deleter, which never descends into a mount:
/// should the probe overlay still be mounted (its unmount failed), its layers are left, not
/// deleted through it.
fn remove_scratch(scratch: &Path) {
    let (Some(parent), Some(name)) = (scratch.parent(), scratch.file_name()) else {
        return;
    };
    if let Err(e) = crate::dirs::layout::delete_tree(parent, &name.to_string_lossy()) {
        tracing::warn!(path = %scratch.display(), error = %crate::error::chain(&e), "could not delete the probe's scratch directory");
    }
}

/// The probe's scratch directory; start-up removes a leftover one before anything else.
pub fn scratch_dir(root: &Path) -> PathBuf {
    root.join(".probe")
}

fn check_in(scratch: &Path, options: &[String]) -> Result<(), Error> {
    let unsupported = |what: String| Error::Unsupported(what);
    for d in ["lower1", "lower2", "upper", "work", "merged"] {
        let p = scratch.join(d);
        fs::create_dir_all(&p).map_err(|e| Error::io("creating probe directory", &p, e))?;
    }
    fs::write(scratch.join("lower1/f"), b"").map_err(|e| Error::io("writing", scratch, e))?;
    if !supports_d_type(&scratch.join("lower1"))? {
        return Err(unsupported(format!(
            "the filesystem of {} does not report d_type (xfs formatted with ftype=0?); \
             overlayfs needs it: put the root on ext4, xfs with ftype=1 or btrfs",
            scratch.parent().unwrap_or(scratch).display()
        )));
    }
    let mut opts = vec![
        format!(
            "lowerdir={}:{}",
            scratch.join("lower2").display(),
            scratch.join("lower1").display()
        ),
        format!("upperdir={}", scratch.join("upper").display()),
        format!("workdir={}", scratch.join("work").display()),
    ];
    opts.extend(options.iter().cloned());
    let merged = scratch.join("merged");
    sys::mount_overlay(&merged, &opts.join(",")).map_err(|e| {
        unsupported(format!(
            "overlayfs cannot be mounted on {} ({e}); load it with `modprobe overlay`, run \
             lamina as root, and check the configured mount_options {:?}",
            scratch.display(),
            options
        ))
    })?;
    let seen = merged.join("f").exists();
    sys::unmount(&merged).map_err(|e| Error::io("unmounting probe", &merged, e))?;
    if !seen {
        return Err(unsupported(
            "an overlayfs probe mount did not show its lower layer".into(),
        ));
    }
    Ok(())
}

fn supports_d_type(dir: &Path) -> Result<bool, Error> {
    let mut d = Dir::open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
        .map_err(|e| Error::io("opening", dir, e.into()))?;
    for entry in d.iter() {
        let entry = entry.map_err(|e| Error::io("reading", dir, e.into()))?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        return Ok(entry.file_type().is_some_and(|t| t == Type::File));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Host = Host {
        has_index_param: false,
        in_user_namespace: false,
    };

    #[test]
    fn index_off_only_when_the_kernel_has_it_and_nothing_configured_it() {
        let with_index = Host {
            has_index_param: true,
            ..PLAIN
        };
        assert_eq!(overlay_options(&[], with_index), vec!["index=off"]);
        assert_eq!(overlay_options(&[], PLAIN), Vec::<String>::new());
        assert_eq!(
            overlay_options(&["index=on".into()], with_index),
            vec!["index=on"]
        );
    }

    #[test]
    fn userxattr_only_inside_a_user_namespace() {
        let userns = Host {
            in_user_namespace: true,
            ..PLAIN
        };
        assert_eq!(
            overlay_options(&["volatile".into()], userns),
            vec!["volatile", "userxattr"]
        );
        assert_eq!(
            overlay_options(&["volatile".into()], PLAIN),
            vec!["volatile"]
        );
    }

    /// Inside a user namespace on a kernel that does not know `userxattr` (before 5.11), the
    /// probe with it fails and lamina starts without it; a configured one is never dropped.
    #[test]
    fn an_added_userxattr_is_dropped_when_only_it_keeps_overlayfs_from_mounting() {
        let userns = Host {
            in_user_namespace: true,
            ..PLAIN
        };
        let old_kernel = |o: &[String]| {
            if o.iter().any(|o| o == "userxattr") {
                Err(Error::Unsupported("unknown option userxattr".into()))
            } else {
                Ok(())
            }
        };
        fn pick(
            configured: &[String],
            host: Host,
            check: impl FnMut(&[String]) -> Result<(), Error>,
        ) -> Result<Vec<String>, Error> {
            first_that_mounts(candidates(configured, host), check)
        }
        let volatile = vec!["volatile".to_string()];
        assert_eq!(pick(&volatile, userns, &old_kernel).unwrap(), volatile);
        let new_kernel = |_: &[String]| Ok(());
        assert_eq!(
            pick(&volatile, userns, &new_kernel).unwrap(),
            ["volatile", "userxattr"]
        );
        // Configured by the user: kept, and the probe's error is the answer.
        let err = pick(&["userxattr".into()], userns, &old_kernel).unwrap_err();
        assert!(err.to_string().contains("userxattr"), "{err}");
        // Outside a user namespace there is nothing to drop: one try, its error.
        let tries = std::cell::Cell::new(0);
        let failing = |_: &[String]| {
            tries.set(tries.get() + 1);
            Err(Error::Unsupported("no overlay".into()))
        };
        assert!(pick(&volatile, PLAIN, &failing).is_err());
        assert_eq!(tries.get(), 1);
    }
}

/// One kernel or filesystem capability, what was seen, and what lamina does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub supported: bool,
    pub detail: String,
}

/// Everything `lamina check` and `lamina status` report. Needs root to try the mounts; without
/// it, the mount-based answers say they could not be tried.
pub fn features(root: &Path, configured: &[String]) -> Vec<Feature> {
    let host = Host::detect();
    let options = usable_options(root, configured, host);
    features_with(root, configured, host, options.as_deref())
}

/// [`features`], given the answer of [`usable_options`] that the caller already has (start-up
/// has just probed, and need not mount the probe again).
pub fn features_with(
    root: &Path,
    configured: &[String],
    host: Host,
    options: Result<&[String], &Error>,
) -> Vec<Feature> {
    let param = |name: &str| {
        fs::read_to_string(format!("/sys/module/overlay/parameters/{name}"))
            .ok()
            .map(|v| v.trim().to_string())
    };
    let mut out = Vec::new();

    out.push(Feature {
        name: "overlayfs",
        supported: options.is_ok(),
        detail: match options {
            Ok(o) => format!(
                "a probe overlay mounts under {} with options {o:?}",
                root.display()
            ),
            Err(e) => format!("lamina will not start: {e}"),
        },
    });

    let scratch = scratch_dir(root);
    let d_type = fs::create_dir_all(&scratch)
        .and_then(|_| fs::write(scratch.join("f"), b""))
        .map_err(|e| Error::io("writing probe file in", &scratch, e))
        .and_then(|_| supports_d_type(&scratch));
    remove_scratch(&scratch);
    out.push(Feature {
        name: "d_type",
        supported: matches!(d_type, Ok(true)),
        detail: match d_type {
            Ok(true) => "directory entries carry file types; overlayfs can find whiteouts".into(),
            Ok(false) => "missing: lamina refuses to start on this filesystem".into(),
            Err(e) => format!("could not be checked: {e}"),
        },
    });

    let index = param("index");
    out.push(Feature {
        name: "index",
        supported: index.is_some(),
        detail: match (&index, configured.iter().find(|o| o.starts_with("index="))) {
            (None, _) => "the kernel has no index feature; nothing to do".into(),
            (Some(v), Some(o)) => format!("kernel default {v}; configured {o} is used"),
            (Some(v), None) => {
                format!("kernel default {v}; lamina adds index=off to every overlay")
            }
        },
    });

    let metacopy = param("metacopy");
    out.push(Feature {
        name: "metacopy",
        supported: metacopy.is_some(),
        detail: match metacopy {
            None => "the kernel has no metacopy feature".into(),
            Some(v) => format!(
                "kernel default {v}; lamina leaves it alone (add metacopy=on to mount_options \
                 to use it)"
            ),
        },
    });

    let (major, minor) = kernel_version();
    out.push(Feature {
        name: "userxattr",
        supported: (major, minor) >= (5, 11),
        detail: match (host.in_user_namespace, options) {
            (false, _) => {
                "not in a user namespace: trusted.* xattrs are used, userxattr is not added".into()
            }
            (true, Ok(o)) if !o.iter().any(|o| o == "userxattr") => {
                "running in a user namespace, but overlayfs mounts here only without userxattr"
                    .into()
            }
            (true, _) => "running in a user namespace: lamina adds userxattr".into(),
        },
    });

    let idmapped = supports_idmapped_layers();
    out.push(Feature {
        name: "idmapped_mounts",
        supported: idmapped,
        detail: if idmapped {
            format!(
                "kernel {major}.{minor}: containerd can ID-map lamina's layers for \
                 user-namespaced containers; lamina honours their ID-mapping labels and \
                 `lamina config containerd` declares remap-ids"
            )
        } else {
            format!(
                "kernel {major}.{minor}: overlayfs on ID-mapped layers needs 5.19; \
                 user-namespaced containers need containerd's copy-and-chown fallback \
                 (slow_chown)"
            )
        },
    });

    let lowerdir_plus = sys::supports_lowerdir_plus(root);
    out.push(Feature {
        name: "lowerdir+",
        supported: matches!(lowerdir_plus, Ok(true)),
        detail: match lowerdir_plus {
            Ok(true) => "the new mount API takes one lower at a time: `lamina mount` uses it \
                         for chains whose options do not fit in one page"
                .into(),
            Ok(false) => {
                "not supported: `lamina mount` needs the options to fit in one page".into()
            }
            Err(e) => format!("could not be checked: {e}"),
        },
    });
    out
}

/// Whether containerd can mount overlays on ID-mapped lower directories here, which is what
/// honouring its ID-mapping labels relies on: kernel 5.19 or later, the rule containerd's own
/// overlayfs snapshotter applies before it declares `remap-ids`.
pub fn supports_idmapped_layers() -> bool {
    kernel_version() >= (5, 19)
}

/// The running kernel's major and minor version.
pub fn kernel_version() -> (u32, u32) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}
