//! A private containerd that reaches lamina as its `lamina` proxy plugin: which containerd
//! (Debian's 1.6, or a 2.x built by `.ci/go-tools`), its config, and finding its shims.
//! Shared by the end-to-end tests and the benchmark (each includes this file with `#[path]`).

// Each of the test and benchmark binaries uses part of this file.
#![allow(dead_code)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

/// One containerd the tests run: Debian's 1.6 from PATH, or a 1.7 or 2.x that `.ci/go-tools`
/// built.
#[derive(Debug, Clone)]
pub struct Flavor {
    /// As the tests print it: `1.6 (Debian)`, `v1.7.35`, `v2.3.7`.
    pub name: String,
    /// The directory of `containerd`, `ctr` and `containerd-shim-runc-v2`; None: PATH.
    pub bin_dir: Option<PathBuf>,
    /// A directory put first on containerd's PATH, holding the `runc` its shims run.
    pub runc_dir: Option<PathBuf>,
    /// containerd 2.x: config version 3, the transfer service, capabilities.
    pub v2: bool,
    /// The crictl that `.ci/go-tools` built (2.x only: CRI is tested there).
    pub crictl: Option<PathBuf>,
}

impl Flavor {
    /// Debian's containerd 1.6 and runc, from PATH (.ci/setup installs them).
    pub fn debian() -> Flavor {
        Flavor {
            name: "1.6 (Debian)".into(),
            bin_dir: None,
            runc_dir: None,
            v2: false,
            crictl: None,
        }
    }

    /// The `index`th containerd 2.x of `.ci/versions` (0: the long-term release, 1: the
    /// newest), with the runc built beside it; Err says what is missing.
    pub fn v2(index: usize) -> Result<Flavor, String> {
        let containerd = ci_version("CONTAINERD_VERSIONS")?;
        let version = containerd
            .split_whitespace()
            .nth(index)
            .ok_or_else(|| format!(".ci/versions lists no containerd #{index}"))?;
        Flavor::built(version, true)
    }

    /// The containerd 1.7 of `.ci/versions`, built by `.ci/go-tools` with the same runc.
    pub fn v1_7() -> Result<Flavor, String> {
        Flavor::built(&ci_version("CONTAINERD_17_VERSION")?, false)
    }

    fn built(version: &str, v2: bool) -> Result<Flavor, String> {
        let cache = ci_cache();
        let bin_dir = cache.join(format!("containerd-{version}"));
        let runc_dir = cache.join(format!("runc-{}", ci_version("RUNC_VERSION")?));
        let crictl = cache.join(format!("crictl-{}/crictl", ci_version("CRICTL_VERSION")?));
        let mut needed = vec![bin_dir.join("containerd"), runc_dir.join("runc")];
        if v2 {
            needed.push(crictl.clone());
        }
        for needed in needed {
            if !needed.is_file() {
                return Err(format!(
                    "{} is missing: .ci/setup builds it (.ci/go-tools)",
                    needed.display()
                ));
            }
        }
        Ok(Flavor {
            name: version.to_string(),
            bin_dir: Some(bin_dir),
            runc_dir: Some(runc_dir),
            v2,
            crictl: v2.then_some(crictl),
        })
    }

    /// The name as a containerd namespace may hold it (`1.6Debian`, `v2.3.7`): runc keeps
    /// its state per namespace in one host-wide directory, so containerds running side by
    /// side must not share namespaces.
    pub fn slug(&self) -> String {
        self.name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
            .collect()
    }

    /// The path of one of this containerd's programs (`containerd`, `ctr`).
    pub fn program(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    /// The PATH containerd runs with: its own directory (for the shim) and the runc to use
    /// first.
    pub fn path_env(&self) -> std::ffi::OsString {
        let mut dirs: Vec<PathBuf> = self
            .runc_dir
            .iter()
            .chain(self.bin_dir.iter())
            .cloned()
            .collect();
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::env::join_paths(dirs).expect("PATH entries without ':'")
    }

    /// The start of a private config for this containerd: everything under `dir` (its root,
    /// state, gRPC, ttrpc and debug sockets) and the plugins this machine cannot use off; CRI
    /// too unless `cri`. What lamina's `config containerd` prints is appended to it.
    pub fn private_config(&self, dir: &Path, cri: bool) -> String {
        let mut disabled: Vec<&str> = Vec::new();
        if self.v2 {
            if !cri {
                disabled.push("io.containerd.grpc.v1.cri");
            }
        } else {
            if !cri {
                disabled.push("io.containerd.grpc.v1.cri");
            }
            disabled.extend([
                "io.containerd.snapshotter.v1.aufs",
                "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.snapshotter.v1.zfs",
            ]);
        }
        let disabled: Vec<String> = disabled.iter().map(|p| format!("  \"{p}\",\n")).collect();
        format!(
            r#"version = {version}
root = "{root}"
state = "{state}"
disabled_plugins = [
{disabled}]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = "{debug}"

[metrics]
  address = ""
{nri}
"#,
            // containerd 2.x's CRI starts NRI, whose socket is host-wide (/var/run/nri): a
            // test's containerd must neither take it from the machine's nor from another test.
            nri = if self.v2 && cri {
                "\n[plugins.\"io.containerd.nri.v1.nri\"]\n  disable = true\n"
            } else {
                ""
            },
            version = if self.v2 { 3 } else { 2 },
            disabled = disabled.concat(),
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            address = dir.join("c.sock").display(),
            ttrpc = dir.join("t.sock").display(),
            debug = dir.join("d.sock").display(),
        )
    }
}

/// The value of `key` in `.ci/versions`.
fn ci_version(key: &str) -> Result<String, String> {
    ci_versions()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .ok_or_else(|| format!(".ci/versions has no {key}"))
}

/// `KEY=VALUE` lines of `.ci/versions` (quotes removed).
fn ci_versions() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/versions");
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// Where `.ci/go-tools` puts what it builds.
fn ci_cache() -> PathBuf {
    std::env::var_os("LAMINA_CI_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/lamina-ci"))
}

/// containerd 1.6's config with everything under `dir` and lamina's socket registered as the
/// `lamina` snapshotter, written here rather than by lamina (the benchmark runs lamina
/// builds that predate `lamina config containerd`).
pub fn config_toml(dir: &Path, lamina_socket: &Path) -> String {
    format!(
        "{}[proxy_plugins.lamina]\n  type = \"snapshot\"\n  address = \"{}\"\n",
        Flavor::debian().private_config(dir, false),
        lamina_socket.display()
    )
}

/// PIDs of the `containerd-shim-runc-v2` processes serving the containerd at `address`.
pub fn shims_of(address: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let address = address.to_string_lossy().into_owned();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.first()
                .is_some_and(|a| a.ends_with("containerd-shim-runc-v2"))
                && args
                    .windows(2)
                    .any(|w| w[0] == "-address" && w[1] == address)
        })
        .collect()
}

/// Stops a private containerd for good (SIGTERM, SIGKILL after 10 s), ends the shims it
/// started, detaches mounts left under `dir`, and removes what runc leaves per namespace (its
/// state directory, the now empty cgroups; `remove_dir` only removes them when empty).
pub fn stop(child: Option<Child>, address: &Path, dir: &Path, namespaces: &[String]) {
    if let Some(mut child) = child {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    for pid in shims_of(address) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    let mut targets: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|t| t.starts_with(&prefix))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
    }
    for ns in namespaces {
        let _ = fs::remove_dir(format!("/run/containerd/runc/{ns}"));
        let mut cgroups = vec![PathBuf::from("/sys/fs/cgroup")];
        if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
            cgroups.extend(entries.filter_map(|e| Some(e.ok()?.path())));
        }
        for c in cgroups {
            let _ = fs::remove_dir(c.join(ns));
        }
    }
}
