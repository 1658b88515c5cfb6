//! Overlayfs knowledge: the mount specs lamina answers with (pure data from pure functions),
//! the kernel feature probes run at start-up, and the disk-usage walk.

pub mod probe;
pub mod usage;

use std::path::{Path, PathBuf};

/// One mount as containerd will perform it. Plain data; `grpc/` converts it to the wire type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The directories a snapshot's mounts are built from.
#[derive(Debug, Clone, Copy)]
pub struct Dirs<'a> {
    pub fs: &'a Path,
    pub work: &'a Path,
    /// Ancestors' `fs` directories, nearest first.
    pub lowers: &'a [PathBuf],
}

fn bind(source: &Path, writable: bool) -> Mount {
    Mount {
        kind: "bind".into(),
        source: source.display().to_string(),
        options: vec![if writable { "rw" } else { "ro" }.into(), "rbind".into()],
    }
}

fn lowerdir(lowers: &[PathBuf]) -> String {
    let joined: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    format!("lowerdir={}", joined.join(":"))
}

/// The mounts for an active snapshot: a writable bind of its own `fs` when it has no parent,
/// else one overlay with `workdir`, `upperdir`, `lowerdir` in that order, then `options`.
///
/// containerd's layer applier recognises exactly this overlay shape and writes a layer straight
/// into `upperdir` without mounting; any other shape costs a real mount per layer.
pub fn active_mounts(dirs: Dirs<'_>, options: &[String]) -> Vec<Mount> {
    if dirs.lowers.is_empty() {
        return vec![bind(dirs.fs, true)];
    }
    let mut opts = vec![
        format!("workdir={}", dirs.work.display()),
        format!("upperdir={}", dirs.fs.display()),
        lowerdir(dirs.lowers),
    ];
    opts.extend(options.iter().cloned());
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options: opts,
    }]
}

/// The mounts for a view: a read-only bind of its own empty `fs` (no parent) or of the parent's
/// `fs` (one parent), else a read-only overlay of the lowers alone (no upperdir).
pub fn view_mounts(dirs: Dirs<'_>, options: &[String]) -> Vec<Mount> {
    match dirs.lowers {
        [] => vec![bind(dirs.fs, false)],
        [parent] => vec![bind(parent, false)],
        lowers => {
            let mut opts = vec![lowerdir(lowers)];
            opts.extend(options.iter().cloned());
            vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: opts,
            }]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn opts(m: &Mount) -> Vec<&str> {
        m.options.iter().map(String::as_str).collect()
    }

    #[test]
    fn active_without_parent_is_a_writable_bind() {
        let (fs, work) = (p("/r/snapshots/1/fs"), p("/r/snapshots/1/work"));
        let m = active_mounts(
            Dirs {
                fs: &fs,
                work: &work,
                lowers: &[],
            },
            &["index=off".into()],
        );
        assert_eq!(
            m,
            vec![Mount {
                kind: "bind".into(),
                source: "/r/snapshots/1/fs".into(),
                options: vec!["rw".into(), "rbind".into()],
            }]
        );
    }

    #[test]
    fn active_with_parents_is_an_overlay_nearest_first_then_options() {
        let (fs, work) = (p("/r/snapshots/3/fs"), p("/r/snapshots/3/work"));
        let lowers = [p("/r/snapshots/2/fs"), p("/r/snapshots/1/fs")];
        let m = active_mounts(
            Dirs {
                fs: &fs,
                work: &work,
                lowers: &lowers,
            },
            &["index=off".into()],
        );
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].kind.as_str(), m[0].source.as_str()),
            ("overlay", "overlay")
        );
        assert_eq!(
            opts(&m[0]),
            vec![
                "workdir=/r/snapshots/3/work",
                "upperdir=/r/snapshots/3/fs",
                "lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs",
                "index=off",
            ]
        );
    }

    #[test]
    fn view_shapes() {
        let (fs, work) = (p("/r/snapshots/9/fs"), p("/r/snapshots/9/work"));
        let none = view_mounts(
            Dirs {
                fs: &fs,
                work: &work,
                lowers: &[],
            },
            &["x".into()],
        );
        assert_eq!(none[0].kind, "bind");
        assert_eq!(none[0].source, "/r/snapshots/9/fs");
        assert_eq!(opts(&none[0]), vec!["ro", "rbind"]);

        let one = [p("/r/snapshots/4/fs")];
        let m = view_mounts(
            Dirs {
                fs: &fs,
                work: &work,
                lowers: &one,
            },
            &["x".into()],
        );
        assert_eq!(m[0].kind, "bind");
        assert_eq!(
            m[0].source, "/r/snapshots/4/fs",
            "a one-parent view binds the parent"
        );
        assert_eq!(opts(&m[0]), vec!["ro", "rbind"]);

        let two = [p("/r/snapshots/4/fs"), p("/r/snapshots/2/fs")];
        let m = view_mounts(
            Dirs {
                fs: &fs,
                work: &work,
                lowers: &two,
            },
            &["x".into()],
        );
        assert_eq!(m[0].kind, "overlay");
        assert_eq!(
            opts(&m[0]),
            vec!["lowerdir=/r/snapshots/4/fs:/r/snapshots/2/fs", "x"],
            "no upperdir or workdir: the overlay is read-only"
        );
    }
}
