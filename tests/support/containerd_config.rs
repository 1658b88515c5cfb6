//! The config of a private containerd that reaches lamina as its `lamina` proxy plugin; shared
//! by the end-to-end tests and the benchmark (each includes this file with `#[path]`).

use std::path::Path;

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
