//! What a private containerd 2.x needs to run CRI pods here, with no registry and no network: a
//! pause image built from busybox, a CNI plugin that only answers, and CRI's part of the config.
//! Shared by the CRI tests and the benchmark (each includes this file with `#[path]`).

// Each of the test and benchmark binaries uses part of this file.
#![allow(dead_code)]

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use crate::oci_support::{busybox_layer, write_oci_archive_with};

/// A CNI plugin that gives the pod's network namespace an `eth0` with an address, and nothing
/// more: a pod with a network namespace of its own (a user-namespaced one must have one) needs
/// CNI to answer, not a network. Installed as `loopback` too, which CRI adds to every network
/// (it brings `lo` up).
const CNI_PLUGIN: &str = r#"#!/bin/sh
set -e
case "$CNI_COMMAND" in
VERSION)
    echo '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}' ;;
ADD)
    if [ "$CNI_IFNAME" = lo ]; then
        nsenter --net="$CNI_NETNS" ip link set lo up
        printf '{"cniVersion":"1.0.0","interfaces":[{"name":"lo","sandbox":"%s"}],"ips":[{"address":"127.0.0.1/8","interface":0}]}\n' \
            "$CNI_NETNS"
        exit 0
    fi
    nsenter --net="$CNI_NETNS" ip link add "$CNI_IFNAME" type veth peer name lamina-peer
    nsenter --net="$CNI_NETNS" ip addr add 10.88.0.2/16 dev "$CNI_IFNAME"
    nsenter --net="$CNI_NETNS" ip link set "$CNI_IFNAME" up
    nsenter --net="$CNI_NETNS" ip link set lo up
    printf '{"cniVersion":"1.0.0","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{"address":"10.88.0.2/16","interface":0}]}\n' \
        "$CNI_IFNAME" "$CNI_NETNS" ;;
*) ;;
esac
"#;

/// Installs the CNI plugin and its network config under `dir` (`cni/bin`, `cni/conf`), where
/// [`config`] points CRI; before containerd starts.
pub fn install_cni(dir: &Path) {
    let plugin = dir.join("cni/bin/lamina-test-cni");
    fs::create_dir_all(plugin.parent().unwrap()).expect("creating cni/bin");
    fs::write(&plugin, CNI_PLUGIN).expect("writing the CNI plugin");
    fs::set_permissions(&plugin, fs::Permissions::from_mode(0o755)).expect("chmod CNI plugin");
    std::os::unix::fs::symlink("lamina-test-cni", plugin.with_file_name("loopback"))
        .expect("linking loopback");
    fs::create_dir_all(dir.join("cni/conf")).expect("creating cni/conf");
    fs::write(
        dir.join("cni/conf/10-lamina-test.conflist"),
        r#"{"cniVersion":"1.0.0","name":"lamina-test","plugins":[{"type":"lamina-test-cni"}]}"#,
    )
    .expect("writing the CNI config");
}

/// CRI's part of the private config: `pause` as the sandbox image, the CNI plugin of
/// [`install_cni`], and a runc runtime handler per `(name, snapshotter)` of `runtimes` (CRI
/// puts a pod's and its containers' snapshots on its handler's snapshotter, and unpacks the
/// image there if it must).
///
/// `restrict_oom_score_adj`: CRI gives a pod's sandbox an OOM score adjustment of -998, and
/// lowering one needs CAP_SYS_RESOURCE, which the machines these tests run on may not grant
/// even to root (runc then fails with "can't get final child's PID from pipe"). Restricted,
/// CRI keeps adjustments at or above containerd's own.
pub fn config(dir: &Path, pause: &str, runtimes: &[(&str, &str)]) -> String {
    let mut out = format!(
        r#"[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["{bin}"]
  conf_dir = "{conf}"
"#,
        bin = dir.join("cni/bin").display(),
        conf = dir.join("cni/conf").display(),
    );
    for (name, snapshotter) in runtimes {
        out.push_str(&format!(
            r#"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{name}]
  runtime_type = "io.containerd.runc.v2"
  snapshotter = "{snapshotter}"
"#
        ));
    }
    out
}

/// Writes the pause image `name` (busybox sleeping until told to stop) as an archive to `path`.
pub fn write_pause_image(path: &Path, name: &str) {
    write_oci_archive_with(
        path,
        name,
        &[busybox_layer(&["sh", "sleep"], &[])],
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM INT; while :; do sleep 1; done",
        ],
    );
}
