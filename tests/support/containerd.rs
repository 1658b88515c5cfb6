//! A private containerd that reaches lamina as its `lamina` proxy plugin: its config, and
//! finding its shims. Shared by the end-to-end tests and the benchmark (each includes this
//! file with `#[path]`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

/// containerd's config (version 2) with everything under `dir`: its root, state, gRPC, ttrpc
/// and debug sockets; CRI and the snapshotters this machine cannot use are off.
pub fn config_toml(dir: &Path, lamina_socket: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = "{debug}"

[metrics]
  address = ""

[proxy_plugins.lamina]
  type = "snapshot"
  address = "{lamina}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        address = dir.join("c.sock").display(),
        ttrpc = dir.join("t.sock").display(),
        debug = dir.join("d.sock").display(),
        lamina = lamina_socket.display(),
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
