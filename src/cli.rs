//! The operator commands: `status`, `fsck`, `check`, `mount`, `config containerd`. Each prints
//! what it found in plain text and returns an error (non-zero exit) when something needs
//! attention.

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use crate::{
    config::Config,
    dirs::Layout,
    error::{Error, Result},
    grpc::{self, admin::proto},
    overlay::{self, probe},
    snapshot::{
        fsck::{Problem, Repair},
        Snapshotter,
    },
};

/// `lamina config containerd`: the fragment for containerd's config, for the series named or
/// else the one `containerd --version` (of `binary`, or on PATH) reports, and for a kernel that
/// can ID-map overlay lowers or not (`idmapped`; by default, this machine's).
pub fn containerd_config(
    config: &Config,
    series: Option<&str>,
    binary: Option<&Path>,
    cri: bool,
    idmapped: Option<bool>,
    differ: bool,
) -> Result<String> {
    use crate::config::containerd::{fragment, host_platform, Series, Wanted};
    let series = match series {
        Some(name) => Series::from_name(name)?,
        None => {
            let binary = binary.unwrap_or(Path::new("containerd"));
            let out = std::process::Command::new(binary)
                .arg("--version")
                .output()
                .map_err(|e| {
                    Error::Config(format!(
                        "running `{} --version`: {e}; name the containerd series with \
                         --containerd-version 1.6|1.7|2",
                        binary.display()
                    ))
                })?;
            Series::from_version_output(&String::from_utf8_lossy(&out.stdout))?
        }
    };
    let wanted = Wanted {
        series,
        cri,
        idmapped_mounts: idmapped.unwrap_or_else(probe::supports_idmapped_layers),
        platform: host_platform(),
        differ,
    };
    fragment(config, &wanted)
}

/// `lamina status`: asks the running daemon.
pub async fn status(config: &Config) -> Result<String> {
    let channel = grpc::client::connect(&config.address).await?;
    let s = grpc::client::admin(channel)
        .status(proto::StatusRequest {})
        .await
        .map_err(grpc::client::remote)?
        .into_inner();
    let mut out = String::new();
    let _ = writeln!(out, "lamina {} up {}s", s.version, s.uptime_seconds);
    let _ = writeln!(out, "root:          {}", s.root);
    let _ = writeln!(out, "store:         {} bytes", s.store_bytes);
    let _ = writeln!(
        out,
        "snapshots:     {} active, {} views, {} committed",
        s.active, s.views, s.committed
    );
    let _ = writeln!(out, "mount options: {}", s.mount_options.join(","));
    let _ = writeln!(out, "features:");
    for f in &s.features {
        out.push_str(&feature_line(&f.name, f.supported, &f.detail));
    }
    let _ = writeln!(out, "config:");
    for line in s.config_toml.lines() {
        let _ = writeln!(out, "  {line}");
    }
    Ok(out)
}

fn feature_line(name: &str, supported: bool, detail: &str) -> String {
    let mark = if supported { "yes" } else { "no " };
    format!("  {name:<16} {mark}  {detail}\n")
}

/// `lamina fsck`: through the running daemon when it answers on its socket, else offline on
/// the root (the store's file lock keeps a second writer out).
pub async fn fsck(config: &Config, repair: Repair) -> Result<(String, bool)> {
    let report = match grpc::client::connect(&config.address).await {
        Ok(channel) => grpc::client::admin(channel)
            .fsck(proto::FsckRequest {
                repair: repair.safe,
                delete_unknown: repair.unknown,
            })
            .await
            .map_err(grpc::client::remote)?
            .into_inner(),
        Err(_) => {
            let root = config.root.clone();
            let report = tokio::task::spawn_blocking(move || offline_fsck(&root, repair))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
            grpc::admin::wire_report(report)
        }
    };
    let mut out = String::new();
    let mut clean = true;
    let (mut unknown, mut unknown_bytes) = (0, 0);
    for f in &report.findings {
        // A name this lamina does not know (from a newer daemon) counts as a problem.
        let kind = Problem::from_name(&f.kind);
        if kind.is_none_or(Problem::needs_repair) && !f.repaired {
            clean = false;
        }
        if kind == Some(Problem::Unknown) && !f.repaired {
            unknown += 1;
            unknown_bytes += f.bytes;
        }
        let key = if f.key.is_empty() {
            String::new()
        } else {
            format!(" key={:?}", f.key)
        };
        let action = if f.action.is_empty() {
            String::new()
        } else {
            format!(" -> {}", f.action)
        };
        let _ = writeln!(out, "{}: {}{key}: {}{action}", f.kind, f.path, f.detail);
    }
    let freed: u64 = report
        .findings
        .iter()
        .filter(|f| Problem::from_name(&f.kind) == Some(Problem::Unknown) && f.repaired)
        .map(|f| f.bytes)
        .sum();
    if freed > 0 {
        let _ = writeln!(
            out,
            "deleted directories the store did not know: {freed} bytes freed"
        );
    }
    if unknown > 0 {
        let _ = writeln!(
            out,
            "{unknown} directories ({unknown_bytes} bytes) have IDs the store never handed out: \
             its store is missing or older than they are. Restore the store that knows them, or \
             give them up: `lamina fsck --repair --delete-unknown` deletes them, freeing \
             {unknown_bytes} bytes"
        );
    }
    let _ = writeln!(
        out,
        "checked {} snapshots and {} directories: {}",
        report.snapshots_checked,
        report.directories_checked,
        if clean { "clean" } else { "problems found" }
    );
    Ok((out, clean))
}

/// fsck on a stopped daemon's root. Without `--repair` nothing is opened for writing: the store
/// is read through a view that keeps redb's own writes in memory (see `store/readonly.rs`).
/// A missing store is created only when told to give up what it does not know
/// (`--delete-unknown`): an empty store over existing directories would be refused at start
/// anyway, as older than they are.
fn offline_fsck(root: &Path, repair: Repair) -> Result<crate::snapshot::fsck::Report> {
    if !root.is_dir() {
        return Err(Error::Config(format!(
            "{} does not exist, and no daemon answers on the socket",
            root.display()
        )));
    }
    let layout = Layout::new(root);
    let writable = repair.safe && (layout.db_path().exists() || repair.unknown);
    let repair = if writable { repair } else { Repair::default() };
    Snapshotter::open_offline(layout, writable)?.fsck(repair)
}

/// `lamina check`: what this kernel and the root's filesystem support, without a daemon.
///
/// It only looks: the probes run in a scratch directory that is removed afterwards, and a root
/// that does not exist yet is neither created nor has its mode changed (it is probed in its
/// nearest existing ancestor, on whose filesystem it would be created).
pub fn check(config: &Config) -> Result<(String, bool)> {
    let root = &config.root;
    let (major, minor) = probe::kernel_version();
    let mut out = format!("kernel {major}.{minor}, root {}\n", root.display());
    let features = if root.is_dir() {
        probe::features(root, &config.mount_options)
    } else {
        let near = root
            .ancestors()
            .skip(1)
            .find(|a| a.is_dir())
            .ok_or_else(|| Error::Config(format!("no directory above {}", root.display())))?;
        out.push_str(&format!(
            "(the root does not exist yet: probed on the filesystem of {})\n",
            near.display()
        ));
        let name = format!(".lamina-check-{}", std::process::id());
        let scratch = near.join(&name);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&scratch)
            .map_err(|e| Error::io("creating a scratch directory", &scratch, e))?;
        let features = probe::features(&scratch, &config.mount_options);
        if let Err(e) = remove_scratch(near, &name) {
            let _ = writeln!(
                out,
                "(could not remove {}: {}; remove it by hand)",
                scratch.display(),
                crate::error::chain(&e)
            );
        }
        features
    };
    for f in &features {
        out.push_str(&feature_line(f.name, f.supported, &f.detail));
    }
    let usable = features
        .iter()
        .filter(|f| matches!(f.name, "overlayfs" | "d_type"))
        .all(|f| f.supported);
    Ok((out, usable))
}

/// Removes `check`'s scratch directory `name` in `parent` with the deleter, not
/// `remove_dir_all`: should a probe mount be left inside it (an unmount that failed, or one
/// made meanwhile), `remove_dir_all` would delete what that mount shows.
fn remove_scratch(parent: &Path, name: &str) -> Result<()> {
    crate::dirs::layout::delete_tree(parent, name).map(drop)
}

/// `lamina mount KEY TARGET [--rw]`: mounts a snapshot for inspection.
///
/// Read-only unless `writable`: an active snapshot is likely mounted by containerd already, and
/// a second writable overlay on the same upper and work directories corrupts them (overlayfs
/// only warns with `index=off`). Read-only, its upper directory is the topmost lower of an
/// overlay with no upper (or, without parents, a read-only bind), which changes nothing.
/// `writable` mounts exactly what containerd would, and only while no mount in this mount
/// namespace uses the directories it writes; a mount made after that check is not seen.
///
/// `key` is lamina's key (containerd's `<namespace>/<n>/<name>`, as lamina logs it) or the
/// name `ctr snapshots ls` shows in containerd namespace `namespace`.
pub async fn mount(
    config: &Config,
    key: &str,
    namespace: &str,
    target: &Path,
    writable: bool,
) -> Result<()> {
    let channel = grpc::client::connect(&config.address).await?;
    let keys = grpc::client::keys(channel.clone()).await?;
    let key = resolve_key(&keys, key, namespace)?;
    let key = key.as_str();
    let mounts = grpc::client::mounts(channel, key).await?;
    let mounts = if writable {
        if mounts
            .iter()
            .flat_map(|m| &m.options)
            .any(|o| overlay::is_id_mapping(o))
        {
            return Err(Error::precondition(format!(
                "snapshot {key:?} belongs to a user-namespaced container: containerd ID-maps its \
                 layers when it mounts it, which --rw cannot do the same way; leave out --rw to \
                 inspect it read-only"
            )));
        }
        refuse_if_in_use(key, &mounts)?;
        mounts
    } else {
        overlay::read_only(&mounts)
    };
    for m in &mounts {
        crate::sys::mount_spec(&m.r#type, &m.source, &m.options, target)
            .map_err(|e| Error::io("mounting at", target, e))?;
    }
    Ok(())
}

/// The key `given` means: itself when a snapshot has that key, else the one snapshot that
/// containerd names `given` in `namespace` (containerd keys a snapshot `<namespace>/<n>/<name>`,
/// `n` a number it counts up).
fn resolve_key(keys: &[String], given: &str, namespace: &str) -> Result<String> {
    if keys.iter().any(|k| k == given) {
        return Ok(given.to_string());
    }
    let named = |k: &&String| {
        k.strip_prefix(namespace)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(n, name)| {
                name == given && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
            })
    };
    let found: Vec<&String> = keys.iter().filter(named).collect();
    match found[..] {
        [key] => Ok(key.clone()),
        [] => Err(Error::NotFound(format!(
            "no snapshot has key {given:?}, and none is named so in containerd namespace \
             {namespace:?} (`ctr -n {namespace} snapshots --snapshotter lamina ls` lists them; \
             --namespace picks another)"
        ))),
        _ => Err(Error::invalid(format!(
            "{} snapshots are named {given:?} in containerd namespace {namespace:?}: {}; give \
             the full key",
            found.len(),
            found
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn refuse_if_in_use(key: &str, mounts: &[overlay::Mount]) -> Result<()> {
    let written: Vec<PathBuf> = mounts.iter().flat_map(overlay::written_dirs).collect();
    if written.is_empty() {
        return Err(Error::precondition(format!(
            "snapshot {key:?} is a view: its mounts are read-only, and --rw cannot change that"
        )));
    }
    let info = Path::new("/proc/self/mountinfo");
    let mountinfo = fs::read_to_string(info).map_err(|e| Error::io("reading", info, e))?;
    let mut users = Vec::new();
    for dir in &written {
        let canonical = fs::canonicalize(dir).map_err(|e| Error::io("resolving", dir, e))?;
        for u in overlay::mountinfo::users(&mountinfo, &canonical, &[dir]) {
            if !users.contains(&u) {
                users.push(u);
            }
        }
    }
    if users.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = users
        .iter()
        .map(|u| format!("{} ({})", u.mount_point.display(), u.how))
        .collect();
    Err(Error::precondition(format!(
        "snapshot {key:?} is mounted already, at {}: a second writable mount of it would \
         corrupt it. Leave out --rw to inspect it read-only, or unmount it there first",
        list.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_taken_as_given_or_as_a_name_in_the_namespace() {
        let keys: Vec<String> = ["default/7/app", "k8s.io/9/app", "default/12/sha256:ab", "x"]
            .iter()
            .map(|k| k.to_string())
            .collect();
        let r = |given, ns| resolve_key(&keys, given, ns);
        assert_eq!(r("default/7/app", "default").unwrap(), "default/7/app");
        assert_eq!(r("x", "k8s.io").unwrap(), "x");
        assert_eq!(r("app", "default").unwrap(), "default/7/app");
        assert_eq!(r("app", "k8s.io").unwrap(), "k8s.io/9/app");
        assert_eq!(r("sha256:ab", "default").unwrap(), "default/12/sha256:ab");
        let err = r("app", "other").unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
        assert!(err.to_string().contains("--namespace"), "{err}");
        // Not a number between namespace and name: not containerd's key of that name.
        let keys = vec!["default/x/app".to_string()];
        assert!(resolve_key(&keys, "app", "default").is_err());
        let keys = vec!["default/1/app".to_string(), "default/2/app".to_string()];
        let err = resolve_key(&keys, "app", "default")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("default/1/app") && err.contains("full key"),
            "{err}"
        );
    }

    /// A mount left inside `check`'s scratch directory: removing the directory must not delete
    /// what the mount shows (here a directory elsewhere on the same filesystem).
    #[test]
    fn removing_the_scratch_directory_does_not_delete_through_a_mount() {
        if !crate::testing::mounting_allowed() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let precious = tmp.path().join("precious");
        fs::create_dir(&precious).unwrap();
        fs::write(precious.join("data"), "keep me").unwrap();
        let scratch = tmp.path().join(".lamina-check-1");
        fs::create_dir_all(scratch.join("merged")).unwrap();
        fs::write(scratch.join("upper-file"), "scratch").unwrap();
        crate::testing::bind(&precious, &scratch.join("merged"));
        let removed = remove_scratch(tmp.path(), ".lamina-check-1");
        let _ = crate::sys::unmount(&scratch.join("merged"));
        assert_eq!(
            fs::read_to_string(precious.join("data")).ok().as_deref(),
            Some("keep me"),
            "deleted through the mount"
        );
        let err = removed.expect_err("a mount inside is reported");
        assert!(
            crate::error::chain(&err).contains("mount point"),
            "{}",
            crate::error::chain(&err)
        );
        assert!(!scratch.join("upper-file").exists(), "the rest is deleted");
    }
}
