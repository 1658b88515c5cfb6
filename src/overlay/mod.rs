//! Overlayfs knowledge: the mount specs lamina answers with (pure data from pure functions),
//! the kernel feature probes run at start-up, and the disk-usage walk.

pub mod mountinfo;
pub mod probe;
pub mod usage;

pub use usage::Usage;

use std::path::{Path, PathBuf};

/// One mount as containerd will perform it. Plain data; `grpc/` converts it to the wire type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The filesystem type (`bind`, `overlay`), as containerd's Mount names it.
    pub r#type: String,
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
    /// Options that come first on each of the snapshot's mounts, bind or overlay: the
    /// `uidmap=`/`gidmap=` of a user-namespaced container, where containerd's overlayfs puts
    /// them. containerd ID-maps the common parent of the lowers (lamina's `snapshots/`) or the
    /// bind's source from them.
    pub first_options: &'a [String],
}

fn bind(source: &Path, writable: bool, first: &[String]) -> Mount {
    let mut options = first.to_vec();
    options.extend([if writable { "rw" } else { "ro" }.into(), "rbind".into()]);
    Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        options,
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
        return vec![bind(dirs.fs, true, dirs.first_options)];
    }
    let mut opts = dirs.first_options.to_vec();
    opts.extend([
        format!("workdir={}", dirs.work.display()),
        format!("upperdir={}", dirs.fs.display()),
        lowerdir(dirs.lowers),
    ]);
    opts.extend(options.iter().cloned());
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        options: opts,
    }]
}

/// The mounts for a view: a read-only bind of its own empty `fs` (no parent) or of the parent's
/// `fs` (one parent), else a read-only overlay of the lowers alone (no upperdir).
pub fn view_mounts(dirs: Dirs<'_>, options: &[String]) -> Vec<Mount> {
    match dirs.lowers {
        [] => vec![bind(dirs.fs, false, dirs.first_options)],
        [parent] => vec![bind(parent, false, dirs.first_options)],
        lowers => {
            let mut opts = dirs.first_options.to_vec();
            opts.push(lowerdir(lowers));
            opts.extend(options.iter().cloned());
            vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                options: opts,
            }]
        }
    }
}

/// `mounts` (what Mounts answers) made read-only, for `lamina mount` to inspect a snapshot
/// without writing to it. An active snapshot's overlay loses its `upperdir` and `workdir`, and
/// its upper directory becomes the topmost lower: read-only by construction, and it never
/// touches the work directory a mount by containerd may be using. A bind becomes read-only.
/// Mounts that are read-only already (a view's) are returned as they are.
///
/// ID-mapping options (`uidmap=`, `gidmap=`) go: they are containerd's to apply, not the
/// kernel's, and an inspection shows the files with the IDs they have on disk.
pub fn read_only(mounts: &[Mount]) -> Vec<Mount> {
    mounts
        .iter()
        .map(|m| {
            let mut m = read_only_one(m);
            m.options.retain(|o| !is_id_mapping(o));
            m
        })
        .collect()
}

/// An option that asks containerd to ID-map the mount (see [`Dirs::first_options`]).
pub fn is_id_mapping(option: &str) -> bool {
    option.starts_with("uidmap=") || option.starts_with("gidmap=")
}

fn read_only_one(m: &Mount) -> Mount {
    match m.r#type.as_str() {
        "bind" => Mount {
            options: m
                .options
                .iter()
                .map(|o| if o == "rw" { "ro".into() } else { o.clone() })
                .chain((!m.options.iter().any(|o| o == "rw" || o == "ro")).then(|| "ro".into()))
                .collect(),
            ..m.clone()
        },
        "overlay" => {
            let Some(upper) = m.options.iter().find_map(|o| o.strip_prefix("upperdir=")) else {
                return m.clone();
            };
            let mut lowers = vec![upper];
            let mut rest = Vec::new();
            for o in &m.options {
                match o.split_once('=') {
                    Some(("lowerdir", list)) => lowers.extend(list.split(':')),
                    Some(("upperdir" | "workdir", _)) => {}
                    _ => rest.push(o.clone()),
                }
            }
            let mut options = vec![format!("lowerdir={}", lowers.join(":"))];
            options.extend(rest);
            Mount {
                options,
                ..m.clone()
            }
        }
        _ => m.clone(),
    }
}

/// The directories of the snapshot that `mounts` (what containerd passes to the Diff service's
/// Apply) write a layer into, if they have the shape [`active_mounts`] gives: the upper
/// directory, the lowers (nearest first) and the work directory (none for a bind). None for
/// any other shape: a view's or read-only mount, several mounts, ID-mapped ones, or another
/// snapshotter's.
pub fn layer_dirs(mounts: &[Mount]) -> Option<(PathBuf, Vec<PathBuf>, Option<PathBuf>)> {
    let [m] = mounts else { return None };
    if m.options.iter().any(|o| is_id_mapping(o)) {
        return None;
    }
    match m.r#type.as_str() {
        "bind" => (m.options.iter().any(|o| o == "rw") && !m.options.iter().any(|o| o == "ro"))
            .then(|| (PathBuf::from(&m.source), Vec::new(), None)),
        "overlay" => {
            let (mut upper, mut work, mut lowers) = (None, None, None);
            for o in &m.options {
                match o.split_once('=') {
                    Some(("upperdir", v)) => upper = Some(v),
                    Some(("workdir", v)) => work = Some(v),
                    Some(("lowerdir", v)) => lowers = Some(v),
                    _ => {}
                }
            }
            let lowers = lowers?.split(':').map(PathBuf::from).collect();
            Some((PathBuf::from(upper?), lowers, Some(PathBuf::from(work?))))
        }
        _ => None,
    }
}

/// The directories mount `m` writes to: an overlay's upper and work directories, or the source
/// of a bind that is not read-only. None for a read-only mount.
pub fn written_dirs(m: &Mount) -> Vec<PathBuf> {
    match m.r#type.as_str() {
        "bind" if !m.options.iter().any(|o| o == "ro") => vec![PathBuf::from(&m.source)],
        "overlay" => m
            .options
            .iter()
            .filter_map(|o| {
                o.strip_prefix("upperdir=")
                    .or_else(|| o.strip_prefix("workdir="))
            })
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
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
                first_options: &[],
            },
            &["index=off".into()],
        );
        assert_eq!(
            m,
            vec![Mount {
                r#type: "bind".into(),
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
                first_options: &[],
            },
            &["index=off".into()],
        );
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.as_str()),
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
                first_options: &[],
            },
            &["x".into()],
        );
        assert_eq!(none[0].r#type, "bind");
        assert_eq!(none[0].source, "/r/snapshots/9/fs");
        assert_eq!(opts(&none[0]), vec!["ro", "rbind"]);

        let one = [p("/r/snapshots/4/fs")];
        let m = view_mounts(
            Dirs {
                fs: &fs,
                work: &work,
                lowers: &one,
                first_options: &[],
            },
            &["x".into()],
        );
        assert_eq!(m[0].r#type, "bind");
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
                first_options: &[],
            },
            &["x".into()],
        );
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            opts(&m[0]),
            vec!["lowerdir=/r/snapshots/4/fs:/r/snapshots/2/fs", "x"],
            "no upperdir or workdir: the overlay is read-only"
        );
    }

    #[test]
    fn read_only_inspection_of_an_active_overlay_has_its_upper_as_top_lower() {
        let (fs, work) = (p("/r/snapshots/3/fs"), p("/r/snapshots/3/work"));
        let lowers = [p("/r/snapshots/2/fs"), p("/r/snapshots/1/fs")];
        let active = active_mounts(
            Dirs {
                fs: &fs,
                work: &work,
                lowers: &lowers,
                first_options: &[],
            },
            &["index=off".into(), "userxattr".into()],
        );
        assert_eq!(
            written_dirs(&active[0]),
            vec![p("/r/snapshots/3/work"), p("/r/snapshots/3/fs")]
        );
        let ro = read_only(&active);
        assert_eq!(
            opts(&ro[0]),
            vec![
                "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs:/r/snapshots/1/fs",
                "index=off",
                "userxattr",
            ],
            "no upperdir or workdir: read-only, and the work directory is left alone"
        );
        assert!(written_dirs(&ro[0]).is_empty());
        assert_eq!(read_only(&ro), ro, "a read-only mount stays as it is");
    }

    #[test]
    fn read_only_inspection_of_an_active_bind_is_a_read_only_bind() {
        let (fs, work) = (p("/r/snapshots/1/fs"), p("/r/snapshots/1/work"));
        let dirs = Dirs {
            fs: &fs,
            work: &work,
            lowers: &[],
            first_options: &[],
        };
        let active = active_mounts(dirs, &[]);
        assert_eq!(written_dirs(&active[0]), vec![p("/r/snapshots/1/fs")]);
        let ro = read_only(&active);
        assert_eq!(ro[0].source, "/r/snapshots/1/fs");
        assert_eq!(opts(&ro[0]), vec!["ro", "rbind"]);
        assert!(written_dirs(&ro[0]).is_empty());
        // Views are read-only already.
        for lowers in [vec![], vec![p("/r/snapshots/4/fs")], vec![p("/a"), p("/b")]] {
            let view = view_mounts(
                Dirs {
                    fs: &fs,
                    work: &work,
                    lowers: &lowers,
                    first_options: &[],
                },
                &[],
            );
            assert_eq!(read_only(&view), view);
            assert!(written_dirs(&view[0]).is_empty(), "{view:?}");
        }
    }

    #[test]
    fn id_mapping_options_come_first_on_every_shape() {
        let (fs, work) = (
            PathBuf::from("/r/snapshots/9/fs"),
            PathBuf::from("/r/snapshots/9/work"),
        );
        let mapped = [
            "uidmap=0:65536:65536".to_string(),
            "gidmap=0:65536:65536".into(),
        ];
        let lowers: Vec<PathBuf> = (1..=2)
            .map(|i| PathBuf::from(format!("/r/snapshots/{i}/fs")))
            .collect();
        for n in 0..=2 {
            let dirs = Dirs {
                fs: &fs,
                work: &work,
                lowers: &lowers[..n],
                first_options: &mapped,
            };
            for mounts in [
                active_mounts(dirs, &["x".into()]),
                view_mounts(dirs, &["x".into()]),
            ] {
                assert_eq!(mounts.len(), 1);
                assert_eq!(mounts[0].options[..2], mapped, "{n} lowers: {mounts:?}");
                assert_eq!(
                    mounts[0]
                        .options
                        .iter()
                        .filter(|o| o.contains("map="))
                        .count(),
                    2
                );
                // An inspection mounts the files as they are on disk.
                let ro = read_only(&mounts);
                assert!(!ro[0].options.iter().any(|o| is_id_mapping(o)), "{ro:?}");
            }
        }
    }
}
