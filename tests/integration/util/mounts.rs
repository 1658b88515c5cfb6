//! Mounting what lamina returns, and reading lamina's mount specs: a snapshot's own `fs`
//! directory, its ID, an option's value.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{Client, Mount};

/// Mounts what lamina returned at `target`, as containerd would; unmounts on drop.
///
/// Deliberately written apart from `lamina::sys::mount_spec`: the tests judge lamina's mount
/// specs, so they interpret them with code of their own (only chains too long for one page
/// borrow lamina's new-mount-API path, see [`Mounted::new_any`]).
#[derive(Debug)]
pub struct Mounted {
    target: PathBuf,
}

impl Mounted {
    pub fn new(mounts: &[Mount], target: &Path) -> Mounted {
        assert_eq!(
            mounts.len(),
            1,
            "lamina returns exactly one mount: {mounts:?}"
        );
        let m = &mounts[0];
        std::fs::create_dir_all(target).unwrap();
        match m.r#type.as_str() {
            "bind" => {
                let ro = m.options.iter().any(|o| o == "ro");
                let mut flags = MsFlags::MS_BIND;
                if m.options.iter().any(|o| o == "rbind") {
                    flags |= MsFlags::MS_REC;
                }
                mount(
                    Some(m.source.as_str()),
                    target,
                    None::<&str>,
                    flags,
                    None::<&str>,
                )
                .unwrap_or_else(|e| panic!("bind mount {m:?}: {e}"));
                if ro {
                    mount(
                        None::<&str>,
                        target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    )
                    .unwrap_or_else(|e| panic!("read-only remount {m:?}: {e}"));
                }
            }
            "overlay" => {
                let data = m.options.join(",");
                mount(
                    Some("overlay"),
                    target,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(data.as_str()),
                )
                .unwrap_or_else(|e| panic!("overlay mount {m:?}: {e}"));
            }
            other => panic!("unexpected mount type {other:?}"),
        }
        Mounted {
            target: target.to_path_buf(),
        }
    }

    /// Like [`Mounted::new`], but mounts overlays through lamina's own mount code (see
    /// [`lamina_mount`]) when their options exceed one page (deep chains), as containerd would
    /// shorten them.
    pub fn new_any(mounts: &[Mount], target: &Path) -> Mounted {
        let len: usize = mounts[0].options.iter().map(|o| o.len() + 1).sum();
        if len < 4096 {
            return Mounted::new(mounts, target);
        }
        lamina_mount(&mounts[0], target).unwrap_or_else(|e| panic!("mount {:?}: {e}", mounts[0]))
    }

    /// A mount someone else made at `target` (`lamina mount`), unmounted on drop.
    pub fn adopt(target: &Path) -> Mounted {
        Mounted {
            target: target.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.target.join(p)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = umount2(&self.target, MntFlags::MNT_DETACH);
    }
}

/// Mounts `m` at `target` through lamina's own mount code (`lamina::sys::mount_spec`, with the
/// new mount API's one `lowerdir+` per layer): the one place the tests borrow it, for chains
/// whose options are longer than mount(2) takes.
pub fn lamina_mount(m: &Mount, target: &Path) -> std::io::Result<Mounted> {
    std::fs::create_dir_all(target)?;
    lamina::sys::mount_spec(&m.r#type, &m.source, &m.options, target)?;
    Ok(Mounted::adopt(target))
}

/// The value of option `name` (`upperdir`, `lowerdir`, …) in a mount's options.
pub fn option<'a>(options: &'a [String], name: &str) -> Option<&'a str> {
    options
        .iter()
        .find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
}

/// A snapshot's own `fs` directory, from the mounts of an active snapshot (or of a view
/// without parent): the source of its bind mount, or the `upperdir=` of its overlay.
#[track_caller]
pub fn own_fs(mounts: &[Mount]) -> PathBuf {
    assert_eq!(mounts.len(), 1, "one mount: {mounts:?}");
    let m = &mounts[0];
    match m.r#type.as_str() {
        "bind" => PathBuf::from(&m.source),
        "overlay" => PathBuf::from(
            option(&m.options, "upperdir").unwrap_or_else(|| panic!("no upperdir in {m:?}")),
        ),
        other => panic!("unexpected mount type {other:?}"),
    }
}

/// [`own_fs`] of a snapshot whose mount must be a bind mount (an active snapshot or a view
/// without parent).
#[track_caller]
pub fn bind_source(mounts: &[Mount]) -> PathBuf {
    assert_eq!(mounts.len(), 1, "one mount: {mounts:?}");
    assert_eq!(mounts[0].r#type, "bind", "{mounts:?}");
    own_fs(mounts)
}

/// Whether `name` is a decimal number (what lamina names its snapshot directories).
pub fn is_decimal(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `path` is `<snapshots>/<decimal>/fs`: a snapshot's own directory, never a key.
pub fn is_snapshot_fs(snapshots: &str, path: &str) -> bool {
    path.strip_prefix(snapshots)
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_suffix("/fs"))
        .is_some_and(is_decimal)
}

/// The ID in a snapshot's `…/snapshots/<id>/fs` path, which must be canonical decimal.
#[track_caller]
pub fn id_of(fs: impl AsRef<Path>) -> u64 {
    let fs = fs.as_ref();
    assert_eq!(
        fs.file_name().and_then(|n| n.to_str()),
        Some("fs"),
        "{} is a snapshot's fs directory",
        fs.display()
    );
    let dir = fs.parent().unwrap();
    assert_eq!(
        dir.parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str()),
        Some("snapshots"),
        "{} is under a snapshots directory",
        fs.display()
    );
    let id = dir.file_name().unwrap().to_str().unwrap();
    let n: u64 = id
        .parse()
        .unwrap_or_else(|_| panic!("ID {id:?} of {} is decimal", fs.display()));
    assert_eq!(n.to_string(), id, "ID {id:?} is canonical decimal");
    n
}

/// The label under which lamina reports a snapshot's own directory (with `upperdir_label`).
pub const UPPERDIR: &str = "containerd.io/snapshot/overlay.upperdir";

/// The directory names (IDs) that the listed snapshots own, learnt from the upperdir label
/// (the daemon must run with `upperdir_label = true`).
pub async fn owned_dirs(c: &mut Client) -> BTreeSet<String> {
    let (infos, _) = c.list_batches(&[]).await.unwrap();
    infos
        .iter()
        .map(|i| id_of(&i.labels[UPPERDIR]).to_string())
        .collect()
}

/// Mount points at or under `dir`, from this process's mount table.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.display().to_string();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == dir || m.starts_with(&format!("{dir}/")))
        .map(str::to_string)
        .collect()
}
