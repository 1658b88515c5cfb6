//! Kubernetes' way in, through containerd 2.x's CRI, driven with crictl as a kubelet would: a
//! private containerd configured with `lamina config containerd --cri`, images imported into
//! its `k8s.io` namespace (a pause image built here pinned as the sandbox image), then a
//! host-network pod with a container on lamina, and a user-namespaced pod whose layers lamina
//! ID-maps (containerd's `remap-ids`) instead of containerd copying them; and with `--differ`, an
//! image pulled from a registry served by the test, unpacked through lamina's differ.
//!
//! Needs root, the containerd 2.x, crictl and runc that `.ci/go-tools` builds (runc 1.2+ for
//! the ID-mapped bind mounts of a user-namespaced pod), `ip` and `nsenter` for the test's own
//! CNI plugin, and `/bin/busybox`.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    containerd::{
        chain_ids, flavor, image_layers, wait_all_collected, Containerd, DifferDaemon, IMAGE2,
    },
    containerd_support::Flavor,
    cri_support,
    oci_support::{layer_tar, write_oci_archive, Entry},
    registry::Registry,
    util::*,
};

const PAUSE: &str = "lamina.test/pause:1";
/// The host IDs a user-namespaced pod's IDs 0..65536 map to.
const USERNS_BASE: u32 = 65536;

/// A containerd with CRI on lamina, the images imported, and crictl pointed at it.
struct Cri {
    c: Containerd,
    /// The chain IDs of IMAGE2's layers: the keys of its committed snapshots.
    chain: Vec<String>,
    /// The image containers run.
    image: String,
}

impl Cri {
    /// With IMAGE2 imported.
    fn start(d: &TestDaemon, flavor: &Flavor) -> Cri {
        let mut cri = Cri::launch(d, flavor, &["--cri"], |_| {});
        let l3 = layer_tar(&[Entry::Dir("etc"), Entry::File("etc/msg", b"three", 0o644)]);
        let image = cri.c.path("e2e2.tar");
        cri.chain = chain_ids(&write_oci_archive(&image, IMAGE2, &image_layers(&[l3])));
        import_for_cri(&cri.c, &image);
        cri
    }

    /// containerd with `lamina config containerd FLAGS`, `started` called once it answers,
    /// then the pause image imported.
    fn launch(
        d: &TestDaemon,
        flavor: &Flavor,
        flags: &[&str],
        started: impl FnOnce(&Containerd),
    ) -> Cri {
        let mut c = Containerd::start_with(d, flavor, "cri", flags, |dir| {
            // The CNI plugin and its config, where the config says, before containerd starts.
            cri_support::install_cni(dir);
            cri_support::config(dir, PAUSE, &[])
        });
        // CRI's images and containers live in containerd's k8s.io namespace.
        c.ns = "k8s.io".into();
        started(&c);
        let pause = c.path("pause.tar");
        cri_support::write_pause_image(&pause, PAUSE);
        import_for_cri(&c, &pause);
        Cri {
            c,
            chain: Vec::new(),
            image: IMAGE2.into(),
        }
    }

    fn crictl(&self, args: &[&str]) -> Result<String, String> {
        let endpoint = format!("unix://{}", self.c.address.display());
        let crictl = self
            .c
            .flavor
            .crictl
            .as_ref()
            .expect("a containerd 2.x has crictl");
        let mut cmd = Command::new(crictl);
        cmd.args([
            "--runtime-endpoint",
            &endpoint,
            "--image-endpoint",
            &endpoint,
        ])
        .args(["--timeout", "60s"])
        .args(args);
        let out = run_for(&mut cmd, Duration::from_secs(120))?;
        if out.status.success() {
            Ok(stdout(&out))
        } else {
            Err(format!(
                "`crictl {}` failed ({}): {}{}",
                args.join(" "),
                out.status,
                stderr(&out),
                stdout(&out)
            ))
        }
    }

    #[track_caller]
    fn crictl_ok(&self, args: &[&str]) -> String {
        self.crictl(args).unwrap_or_else(|e| {
            panic!("{e}\ncontainerd log:\n{}", self.c.log_tail());
        })
    }

    /// Writes `json` to a file of the test's and returns its path.
    fn file(&self, name: &str, json: serde_json::Value) -> String {
        let path = self.c.path(name);
        fs::write(&path, json.to_string()).unwrap();
        path.display().to_string()
    }

    /// Runs a pod from `pod` (a PodSandboxConfig) and in it a container of the image sleeping,
    /// in the pod's namespaces (as a kubelet asks: a container's must match its pod's);
    /// returns (pod ID, container ID).
    fn pod_with_container(&self, name: &str, pod: serde_json::Value) -> (String, String) {
        let namespaces = pod["linux"]["security_context"]["namespace_options"].clone();
        let pod_file = self.file(&format!("{name}-pod.json"), pod);
        let pod_id = self.crictl_ok(&["runp", &pod_file]).trim().to_string();
        let container = serde_json::json!({
            "metadata": { "name": "app" },
            "image": { "image": self.image },
            "command": ["sleep", "1000"],
            "log_path": "app.log",
            "linux": { "security_context": { "namespace_options": namespaces } },
        });
        let container_file = self.file(&format!("{name}-container.json"), container);
        let id = self
            .crictl_ok(&["create", &pod_id, &container_file, &pod_file])
            .trim()
            .to_string();
        self.crictl_ok(&["start", &id]);
        (pod_id, id)
    }

    /// A pod `name` on the host's network (no CNI involved) with a container of the image
    /// sleeping in it: the container's ID.
    fn host_network_pod(&self, name: &str) -> String {
        let pod = serde_json::json!({
            "metadata": { "name": name, "namespace": "default", "uid": format!("lamina-{name}") },
            "log_directory": self.c.path("logs"),
            // NODE: the host's network, no CNI involved.
            "linux": { "security_context": { "namespace_options": { "network": 2 } } },
        });
        self.pod_with_container(name, pod).1
    }

    /// `sh -c SCRIPT` in container `id`, its output.
    fn exec(&self, id: &str, script: &str) -> String {
        self.crictl_ok(&["exec", "-s", id, "sh", "-c", script])
    }

    /// Stops and removes every pod, removes the images: what a kubelet's image GC leaves.
    fn remove_all(&self) {
        for pod in self.crictl_ok(&["pods", "-q"]).split_whitespace() {
            self.crictl_ok(&["stopp", pod]);
        }
        self.crictl_ok(&["rmp", "--all", "--force"]);
        self.crictl_ok(&["rmi", &self.image, PAUSE]);
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        // Pods left by a failed test: their shims, mounts and network namespaces go with them.
        let _ = self.crictl(&["rmp", "--all", "--force"]);
    }
}

/// A protobuf JSON number (64-bit ones are strings), 0 when absent.
fn number(v: &serde_json::Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// `ctr -n k8s.io images import --snapshotter lamina`: the image, unpacked into lamina, where
/// CRI finds it.
fn import_for_cri(c: &Containerd, tar: &Path) {
    c.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        "lamina",
        tar.to_str().unwrap(),
    ]);
}

/// The files named `name` directly in a snapshot's `fs` under lamina's root (the tests expect
/// one).
fn find_in_snapshots(root: &Path, name: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root.join("snapshots")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| Some(e.ok()?.path().join("fs").join(name)))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// Each CRI test, once per containerd 2.x.
macro_rules! per_containerd_2 {
    ($($module:ident => $flavor:expr),* $(,)?) => {$(
        mod $module {
            use super::*;
            daemon_test!(pod_runs_on_lamina, config = "sync_remove = false\n", |d| {
                if let Some(f) = flavor($flavor) {
                    super::pod_runs_on_lamina(d, f).await
                }
            });
            daemon_test!(user_namespaced_pod_is_id_mapped_not_copied, |d| {
                if let Some(f) = flavor($flavor) {
                    super::user_namespaced_pod_is_id_mapped_not_copied(d, f).await
                }
            });
            root_test!(pulls_through_lamina_s_differ, || {
                if let Some(f) = flavor($flavor) {
                    super::pulls_through_lamina_s_differ(f).await
                }
            });
        }
    )*};
}

per_containerd_2!(
    v2_lts => || Flavor::v2(0),
    v2_newest => || Flavor::v2(1),
);

async fn pod_runs_on_lamina(d: TestDaemon, flavor: Flavor) {
    let cri = Cri::start(&d, &flavor);
    let id = cri.host_network_pod("hostnet");

    // The union of the three layers, and a write.
    let out = cri.exec(
        &id,
        "echo \"$(cat /etc/msg)\"; ls -A /d; [ -e /gone ] || echo gone-absent; echo hi > /w; cat /w",
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["three", "new", "gone-absent", "hi"],
        "the container's root through CRI: {out}"
    );

    // The container's writable layer is one of lamina's, measured through Usage: CRI
    // refreshes its figures every 10 s or so.
    let mut stats = serde_json::Value::Null;
    let measured = wait_for_blocking(Duration::from_secs(40), Duration::from_secs(1), || {
        stats = serde_json::from_str(&cri.crictl_ok(&["stats", "-o", "json", &id])).unwrap();
        (number(&stats["stats"][0]["writableLayer"]["usedBytes"]["value"]) > 0).then_some(())
    });
    assert!(
        measured.is_some(),
        "crictl stats reports no writable-layer use within 40 s: {stats}"
    );
    let written = find_in_snapshots(&d.root, "w");
    assert_eq!(
        written.len(),
        1,
        "the file the container wrote: {written:?}"
    );

    // The image filesystem CRI reports (to kubelet's image GC) is lamina's root.
    let info: serde_json::Value =
        serde_json::from_str(&cri.crictl_ok(&["imagefsinfo", "-o", "json"])).unwrap();
    let mountpoint = info["status"]["imageFilesystems"][0]["fsId"]["mountpoint"].clone();
    assert_eq!(
        mountpoint.as_str(),
        d.root.to_str(),
        "imagefsinfo must report lamina's root (exports.root): {info}"
    );

    cri.crictl_ok(&["stop", &id]);
    cri.crictl_ok(&["rm", &id]);
    cri.remove_all();
    wait_all_collected(&cri.c, &d).await;
}

async fn user_namespaced_pod_is_id_mapped_not_copied(d: TestDaemon, flavor: Flavor) {
    // lamina declares remap-ids only where overlayfs can use ID-mapped lowers: its own rule.
    if !lamina::overlay::probe::supports_idmapped_layers() {
        let (major, minor) = lamina::overlay::probe::kernel_version();
        let why = format!("kernel {major}.{minor} has no ID-mapped overlay lowers (5.19+)");
        assert!(std::env::var_os("CI").is_none(), "{why} (and CI is set)");
        eprintln!("skipped: {why}");
        return;
    }
    let cri = Cri::start(&d, &flavor);
    let mapping = serde_json::json!([
        { "host_id": USERNS_BASE, "container_id": 0, "length": 65536 }
    ]);
    let pod = serde_json::json!({
        "metadata": { "name": "userns", "namespace": "default", "uid": "lamina-userns" },
        "log_directory": cri.c.path("logs"),
        "linux": { "security_context": { "namespace_options": {
            // POD: a network namespace of its own (from the CNI plugin above); a user
            // namespace of its own, mode POD, with this mapping.
            "network": 0,
            "userns_options": { "mode": 0, "uids": mapping, "gids": mapping },
        } } },
    });
    let (_, id) = cri.pod_with_container("userns", pod);

    let out = cri.exec(
        &id,
        "id -u; stat -c %u:%g /etc/msg /bin/busybox; echo mine > /mine; stat -c %u /mine",
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "0:0", "0:0", "0"],
        "inside the pod: root, image files owned by root, a new file owned by root: {out}"
    );
    // On the host the container's file belongs to the mapped root.
    let mine = find_in_snapshots(&d.root, "mine");
    assert_eq!(mine.len(), 1, "the file the container wrote: {mine:?}");
    let meta = fs::metadata(&mine[0]).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (USERNS_BASE, USERNS_BASE),
        "{} as the host sees it",
        mine[0].display()
    );
    // lamina's layers were ID-mapped where they are: the container's snapshot sits right on
    // the image's top layer. containerd's copy-and-chown fallback would have put a copy of the
    // image in between (committed under a digest of its own).
    let keys = cri.c.snapshots().unwrap_or_else(|e| panic!("{e}"));
    let container = keys.iter().find(|(k, _, _)| *k == id);
    assert_eq!(
        container.map(|(_, parent, _)| parent),
        Some(&cri.chain[2]),
        "the container's snapshot is not on the image's top layer: {keys:?}"
    );

    cri.crictl_ok(&["stop", &id]);
    cri.crictl_ok(&["rm", &id]);
    cri.remove_all();
    wait_all_collected(&cri.c, &d).await;
}

/// CRI pulls as a kubelet makes it (from a registry: one served here), and with `lamina
/// config containerd --cri --differ` containerd's transfer service unpacks the pulled layers
/// through lamina's differ; a pod runs on them (the union view checked) and image GC frees
/// them.
async fn pulls_through_lamina_s_differ(flavor: Flavor) {
    let dd = DifferDaemon::start(&format!("cri-{}", flavor.name)).await;
    let mut cri = Cri::launch(&dd.d, &flavor, &["--cri", "--differ"], |c| dd.reads_from(c));
    let before = dd.applies();
    let layers = image_layers(&[layer_tar(&[
        Entry::Dir("etc"),
        Entry::File("etc/msg", b"pulled", 0o644),
    ])]);
    let tar = cri.c.path("pulled.tar");
    write_oci_archive(&tar, "lamina.test/pulled:1", &layers);
    let registry = Registry::serve(&tar);
    let reference = format!("{}/lamina/pulled:1", registry.addr);
    cri.crictl_ok(&["pull", &reference]);
    assert_eq!(
        dd.applies() - before,
        layers.len(),
        "CRI's pull did not unpack the image's {} layers through lamina's differ; the \
         registry's requests:\n{}\nlamina's log:\n{}\ncontainerd's log:\n{}",
        layers.len(),
        registry.requests(),
        dd.log(),
        cri.c.log_tail()
    );
    cri.image = reference;

    let id = cri.host_network_pod("pulled");
    let out = cri.exec(
        &id,
        "echo \"$(cat /etc/msg)\"; ls -A /d; [ -e /gone ] || echo gone-absent",
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["pulled", "new", "gone-absent"],
        "the pulled image's root through CRI: {out}"
    );
    cri.crictl_ok(&["stop", &id]);
    cri.crictl_ok(&["rm", &id]);
    cri.remove_all();
    wait_all_collected(&cri.c, &dd.d).await;
}
