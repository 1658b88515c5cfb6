//! User level: a private containerd 2.x (the long-term release of `.ci/versions`, built by
//! `.ci/go-tools`) with both snapshotters, its built-in `overlayfs` and lamina as the `lamina`
//! proxy plugin, configured as `lamina config containerd` says. The same Rust client drives
//! containerd's Snapshots service with `snapshotter = "overlayfs"` or `"lamina"`, and `ctr`
//! imports, unpacks, runs and removes images on each: a realistic one in gzip and in zstd
//! layers, and the small one; the stats loop is CRI's, Usage of every active snapshot.

use std::{
    cell::Cell,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    client::Target,
    containerd_support::Flavor,
    image::{self, Compression, Image},
    pair::{alternate, chunk, Pair},
    report::{self, Row, Val},
    server::{Bins, Kind, Server},
    workloads, Sizes,
};

const IMAGE: &str = "lamina.bench/img:1";
/// The sandbox image of the CRI workload.
const PAUSE: &str = "lamina.bench/pause:1";
/// CRI's runtime handlers: a pod run with one has its snapshots on its snapshotter.
const CRI_RUNTIMES: [(&str, &str); 2] =
    [("runc-lamina", "lamina"), ("runc-overlayfs", "overlayfs")];
const CTR_TIMEOUT: Duration = Duration::from_secs(600);

/// The containerd the user level runs: the long-term 2.x release of `.ci/versions`.
pub fn flavor() -> Result<Flavor, String> {
    Flavor::v2(0)
}

/// Why the user-level part cannot run here, if it cannot.
pub fn missing_tools() -> Option<String> {
    if let Err(e) = flavor() {
        return Some(e);
    }
    for tool in ["gzip", "zstd"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("/bin/busybox (busybox-static) is not installed".into());
    }
    None
}

/// The three images of the user level, built once (cached under `cache`).
pub struct Images {
    pub gzip: Image,
    pub zstd: Image,
    pub small: Image,
}

impl Images {
    pub fn build(cache: &Path, sizes: &Sizes, smoke: bool) -> Images {
        let small_archive = cache.join(format!(
            "small-{}x{}.tar",
            sizes.image_layers, sizes.image_files
        ));
        let layers =
            image::write_archive(&small_archive, IMAGE, sizes.image_layers, sizes.image_files);
        Images {
            gzip: image::realistic(cache, Compression::Gzip, smoke),
            zstd: image::realistic(cache, Compression::Zstd, smoke),
            small: Image {
                name: IMAGE.into(),
                archive: small_archive,
                layers,
                files: (sizes.image_layers * sizes.image_files) as u64,
                bytes: 0,
            },
        }
    }

    /// Each image with the label its rows carry.
    fn each(&self) -> [(&'static str, &Image); 3] {
        [
            ("gzip", &self.gzip),
            ("zstd", &self.zstd),
            ("small", &self.small),
        ]
    }
}

/// What lamina's `config containerd` prints for a containerd 2.x and this lamina: the proxy
/// plugin, its capabilities and exports, and the transfer service's unpack list.
fn lamina_fragment(bins: &Bins, lamina: &Server, differ: bool) -> String {
    let out = Command::new(&bins.lamina)
        .env("LAMINA_CONFIG", "")
        .args([
            "config",
            "containerd",
            "--containerd-version",
            "2",
            "--root",
        ])
        .arg(&lamina.root)
        .arg("--address")
        .arg(&lamina.target.socket)
        .args(differ.then_some("--differ"))
        .output()
        .expect("running lamina config containerd");
    assert!(
        out.status.success(),
        "lamina config containerd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 config")
}

/// `sync`, then a pause: the previous step's writeback and discards land before the next
/// timing (this VM's disk takes seconds to settle after a large deletion).
fn settle(sizes: &Sizes) {
    crate::sync_disks();
    std::thread::sleep(sizes.settle);
}

struct Out {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// A private containerd that knows lamina as a proxy snapshotter.
struct Containerd {
    flavor: Flavor,
    dir: PathBuf,
    address: PathBuf,
    child: Option<Child>,
    calls: Cell<usize>,
    namespaces: std::cell::RefCell<Vec<String>>,
}

impl Containerd {
    /// With `cri`, containerd's CRI too, with a runtime handler per snapshotter (see
    /// [`CRI_RUNTIMES`]).
    fn start(dir: &Path, bins: &Bins, lamina: &Server, cri: bool) -> Containerd {
        Containerd::start_with(dir, bins, lamina, cri, false, false)
    }

    /// [`Containerd::start`]; with `differ`, lamina's layers are unpacked by lamina's differ;
    /// with `unpigz`, containerd's applier decompresses gzip layers with `unpigz` (which must
    /// be on PATH: see [`unpigz`]), and without, with Go's reader, whatever PATH holds.
    fn start_with(
        dir: &Path,
        bins: &Bins,
        lamina: &Server,
        cri: bool,
        differ: bool,
        unpigz: bool,
    ) -> Containerd {
        let flavor = flavor().expect("checked by missing_tools");
        fs::create_dir_all(dir).expect("containerd dir");
        let address = dir.join("c.sock");
        let mut config = format!(
            "{}\n{}",
            flavor.private_config(dir, cri),
            lamina_fragment(bins, lamina, differ)
        );
        if cri {
            crate::cri_support::install_cni(dir);
            config.push_str(&crate::cri_support::config(dir, PAUSE, &CRI_RUNTIMES));
        }
        fs::write(dir.join("config.toml"), config).expect("containerd config");
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let mut cmd = Command::new(flavor.program("containerd"));
        // containerd's switches for the decompressors it runs when on PATH
        // (pkg/archive/compression): igzip, which it prefers, never, so the sides are what
        // they say; unpigz only when asked.
        cmd.env("CONTAINERD_DISABLE_IGZIP", "1");
        if !unpigz {
            cmd.env("CONTAINERD_DISABLE_PIGZ", "1");
        }
        let child = cmd
            .env("PATH", flavor.path_env())
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let mut c = Containerd {
            flavor,
            dir: dir.to_path_buf(),
            address,
            child: Some(child),
            calls: Cell::new(0),
            namespaces: Default::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                c.child = None;
                panic!(
                    "containerd exited during start-up: {status}; log:\n{}",
                    c.log_tail()
                );
            }
            if c.address.exists()
                && c.ctr("default", &["version"], Duration::from_secs(10))
                    .success
            {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within 30 s:\n{}",
                c.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `ctr --namespace NS ARGS`, killed after `limit`.
    fn ctr(&self, ns: &str, args: &[&str], limit: Duration) -> Out {
        if !self.namespaces.borrow().iter().any(|n| n == ns) {
            self.namespaces.borrow_mut().push(ns.to_string());
        }
        let n = self.calls.get();
        self.calls.set(n + 1);
        let out_path = self.dir.join(format!("ctr{n}.out"));
        let err_path = self.dir.join(format!("ctr{n}.err"));
        let mut child = Command::new(self.flavor.program("ctr"))
            .env("PATH", self.flavor.path_env())
            .arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(ns)
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).expect("ctr stdout"))
            .stderr(fs::File::create(&err_path).expect("ctr stderr"))
            .spawn()
            .expect("starting ctr");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for ctr") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`ctr {}` did not finish within {limit:?}", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let out = Out {
            success: status.success(),
            status: status.to_string(),
            stdout: fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        };
        let _ = fs::remove_file(&out_path);
        let _ = fs::remove_file(&err_path);
        out
    }

    /// `ctr`, which must succeed; returns how long it took.
    fn ctr_ok(&self, ns: &str, args: &[&str]) -> Duration {
        let start = Instant::now();
        let out = self.ctr(ns, args, CTR_TIMEOUT);
        let took = start.elapsed();
        assert!(
            out.success,
            "`ctr -n {ns} {}` failed ({}):\nstderr: {}\nstdout: {}\ncontainerd log:\n{}",
            args.join(" "),
            out.status,
            out.stderr,
            out.stdout,
            self.log_tail()
        );
        took
    }

    /// `crictl ARGS` against this containerd, which must succeed; its output and how long it
    /// took.
    fn crictl_ok(&self, args: &[&str]) -> (String, Duration) {
        let crictl = self
            .flavor
            .crictl
            .as_ref()
            .expect("a containerd 2.x has crictl");
        let start = Instant::now();
        let out = Command::new(crictl)
            .arg("--runtime-endpoint")
            .arg(format!("unix://{}", self.address.display()))
            .arg("--timeout")
            .arg("120s")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running crictl");
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "`crictl {}` failed ({}): {}{}\ncontainerd log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            self.log_tail()
        );
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            took,
        )
    }

    /// Writes `json` to a file in containerd's directory; returns its path.
    fn json_file(&self, name: &str, json: serde_json::Value) -> String {
        let path = self.dir.join(name);
        fs::write(&path, json.to_string()).expect("writing a crictl config");
        path.display().to_string()
    }

    fn target(&self, snapshotter: &str, ns: &str) -> Target {
        Target {
            label: format!("containerd/{snapshotter}"),
            socket: self.address.clone(),
            snapshotter: snapshotter.into(),
            namespace: Some(ns.into()),
        }
    }

    /// Deletes leftover tasks and containers, stops containerd, ends its shims and detaches
    /// mounts left under its directory.
    fn teardown(&mut self) {
        let short = Duration::from_secs(20);
        if self.child.is_some() {
            for ns in self.namespaces.borrow().clone() {
                let tasks = self.ctr(&ns, &["task", "ls", "-q"], short);
                for id in tasks.stdout.split_whitespace() {
                    let _ = self.ctr(&ns, &["task", "rm", "-f", id], short);
                }
                let containers = self.ctr(&ns, &["containers", "ls", "-q"], short);
                for id in containers.stdout.split_whitespace() {
                    let _ = self.ctr(&ns, &["containers", "rm", id], short);
                }
            }
        }
        let namespaces = self.namespaces.borrow().clone();
        crate::containerd_support::stop(self.child.take(), &self.address, &self.dir, &namespaces);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// One snapshotter as containerd's client sees it: its name in containerd, the target that
/// reaches it through containerd, the snapshots the benchmark holds on it, and what it measured.
struct Side {
    snapshotter: &'static str,
    target: Target,
    /// Where the backend keeps its snapshot directories.
    snapshots_dir: PathBuf,
    live: Vec<String>,
    serial: Duration,
    concurrent: Duration,
    /// Per image label: the samples of each image workload.
    images: Vec<(&'static str, ImageSamples)>,
    /// One sample per round: a List and the Usage of each active snapshot, as CRI does.
    stats: Vec<Duration>,
    /// `crictl create` + `crictl start` of a container in a running pod.
    cri: Vec<Duration>,
}

/// The samples of the image workloads, for one image on one snapshotter.
#[derive(Default, Clone)]
pub struct ImageSamples {
    /// `ctr images import`: ingest and unpack.
    pub import: Vec<Duration>,
    /// The same with the content already ingested: the unpack alone.
    pub unpack: Vec<Duration>,
    /// `ctr run --rm … /bin/true`.
    pub run: Vec<Duration>,
    /// `ctr images rm --sync` until the image's snapshot directories are gone.
    pub gc: Vec<Duration>,
}

impl Side {
    fn samples(&mut self, label: &'static str) -> &mut ImageSamples {
        if let Some(i) = self.images.iter().position(|(l, _)| *l == label) {
            return &mut self.images[i].1;
        }
        self.images.push((label, ImageSamples::default()));
        &mut self.images.last_mut().unwrap().1
    }

    fn entries(&self) -> usize {
        fs::read_dir(&self.snapshots_dir)
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Runs the user-level workloads; returns their rows.
pub async fn run(
    dir: &Path,
    bins: &Bins,
    sizes: &Sizes,
    images: &Images,
    only: Option<&[String]>,
) -> Vec<Row> {
    let mut lamina = Server::start(Kind::Lamina, bins, &dir.join("lamina"));
    let c = Containerd::start(&dir.join("ctrd"), bins, &lamina, true);
    eprintln!(
        "user level: containerd {} at {} (overlayfs root under {})",
        c.flavor.name,
        c.address.display(),
        c.dir.display()
    );

    let mut sides = Pair::new(|kind| {
        let (snapshotter, snapshots_dir) = match kind {
            Kind::Lamina => ("lamina", lamina.root.join("snapshots")),
            Kind::Overlay => (
                "overlayfs",
                c.dir
                    .join("root/io.containerd.snapshotter.v1.overlayfs/snapshots"),
            ),
        };
        Side {
            snapshotter,
            target: c.target(snapshotter, &format!("bench-{snapshotter}")),
            snapshots_dir,
            live: Vec::new(),
            serial: Duration::ZERO,
            concurrent: Duration::ZERO,
            images: Vec::new(),
            stats: Vec::new(),
            cri: Vec::new(),
        }
    });
    for side in sides.each_mut() {
        // containerd dials a proxy plugin on first use: not part of the timing.
        side.target.client().await.list_count().await;
    }
    crate::stage("user level: Snapshots API pairs through containerd");
    alternate(0..sizes.rounds, sides.each_mut(), async |r, side| {
        crate::sync_disks();
        let range = chunk(sizes.user_pairs, sizes.rounds, r);
        let (wall, _) =
            workloads::serial_pairs(&side.target, "cserial", range, 10, "", &mut side.live).await;
        side.serial += wall;
    })
    .await;
    alternate(0..sizes.rounds, sides.each_mut(), async |r, side| {
        crate::sync_disks();
        let range = chunk(sizes.user_concurrent, sizes.rounds, r);
        side.concurrent += workloads::concurrent_pairs(
            &side.target,
            "cconc",
            range,
            sizes.clients,
            10,
            &mut side.live,
        )
        .await;
    })
    .await;
    for side in sides.each_mut() {
        // Not timed: through containerd, Remove only drops containerd's record and its
        // garbage collector removes the snapshot later.
        let doomed: Vec<String> = side.live.drain(..).rev().collect();
        workloads::removes(&side.target, &doomed).await;
        collect(&c, side).await;
    }

    let chosen = images
        .each()
        .into_iter()
        .filter(|(label, _)| only.is_none_or(|o| o.iter().any(|x| x == label)));
    for (label, img) in chosen {
        crate::stage(&format!(
            "user level: {label} image ({}): import, run, removal, unpack",
            img.describe()
        ));
        let archive = img.archive.to_str().expect("UTF-8 path").to_string();
        alternate(0..sizes.user_reps, sides.each_mut(), async |rep, side| {
            let sn = side.snapshotter;
            let ns = format!("{label}-{sn}-{rep}");
            let empty = side.entries();
            settle(sizes);
            let import = ["images", "import", "--snapshotter", sn, &archive];
            let took = c.ctr_ok(&ns, &import);
            side.samples(label).import.push(took);
            settle(sizes);
            let id = format!("run{rep}");
            let run = [
                "run",
                "--rm",
                "--snapshotter",
                sn,
                &img.name,
                &id,
                "/bin/true",
            ];
            let took = c.ctr_ok(&ns, &run);
            side.samples(label).run.push(took);
            settle(sizes);
            let took = remove_until_freed(&c, &ns, &img.name, side, empty).await;
            side.samples(label).gc.push(took);
            // The content again, untimed, so the next import only unpacks the layers.
            c.ctr_ok(&ns, &["images", "import", "--no-unpack", &archive]);
            settle(sizes);
            let took = c.ctr_ok(&ns, &import);
            side.samples(label).unpack.push(took);
            remove_until_freed(&c, &ns, &img.name, side, empty).await;
        })
        .await;
    }

    crate::stage("user level: CRI, a container created and started in a running pod");
    cri_containers(&c, &mut sides, sizes, images).await;

    crate::stage(&format!(
        "user level: the stats loop ({} active snapshots of {} files each)",
        sizes.stats_snapshots, sizes.stats_files
    ));
    for side in sides.each_mut() {
        fill_active(side, sizes).await;
    }
    alternate(0..sizes.user_reps, sides.each_mut(), async |_, side| {
        settle(sizes);
        let mut client = side.target.client().await;
        let start = Instant::now();
        // CRI's snapshot syncer: a List of the snapshotter's snapshots, then the Usage of
        // each active one, one after the other.
        let listed = client.list_count().await;
        let mut inodes = 0;
        for i in 0..sizes.stats_snapshots {
            inodes += client.usage(&stats_key(i)).await.1;
        }
        side.stats.push(start.elapsed());
        assert!(
            listed >= sizes.stats_snapshots,
            "{}: List missed snapshots",
            side.snapshotter
        );
        let least = (sizes.stats_snapshots * sizes.stats_files) as i64;
        assert!(
            inodes >= least,
            "{}: Usage counted {inodes} inodes, fewer than the {least} files written",
            side.snapshotter
        );
    })
    .await;
    for side in sides.each_mut() {
        let doomed: Vec<String> = (0..sizes.stats_snapshots).map(stats_key).collect();
        workloads::removes(&side.target, &doomed).await;
        collect(&c, side).await;
    }
    drop(c);
    lamina.stop();

    let reps = sizes.user_reps;
    for side in [&sides.lamina, &sides.overlay] {
        let sn = side.snapshotter;
        for (label, s) in &side.images {
            report::record("user", &format!("{label} import"), sn, &s.import);
            report::record("user", &format!("{label} unpack"), sn, &s.unpack);
            report::record("user", &format!("{label} run"), sn, &s.run);
            report::record("user", &format!("{label} removal until freed"), sn, &s.gc);
        }
        report::record("user", "stats loop", sn, &side.stats);
        report::record("user", "CRI create + start", sn, &side.cri);
    }
    let time = |f: fn(&Side) -> Duration| sides.as_ref().map(|side| Val::Time(f(side)));
    let mut rows = vec![
        Row::new(
            format!(
                "containerd Snapshots API: {} serial prepare+commit pairs",
                sizes.user_pairs
            ),
            time(|side| side.serial),
            None,
        ),
        Row::new(
            format!(
                "containerd Snapshots API: {} pairs from {} clients",
                sizes.user_concurrent, sizes.clients
            ),
            time(|side| side.concurrent),
            None,
        ),
    ];
    for (label, img) in images.each() {
        // Left out by --user-images.
        if [&sides.lamina, &sides.overlay]
            .iter()
            .all(|side| side.images.iter().all(|(l, _)| *l != label))
        {
            continue;
        }
        let samples = sides.as_ref().map(|side| {
            side.images
                .iter()
                .find(|(l, _)| *l == label)
                .map(|(_, s)| s.clone())
                .unwrap_or_default()
        });
        let what = format!("{label} image ({})", img.describe());
        let workloads: [(&str, Samples, f64); 4] = [
            ("`ctr images import` (ingest + unpack)", |s| &s.import, 1.0),
            (
                "unpack alone (content already ingested)",
                |s| &s.unpack,
                1.0,
            ),
            ("`ctr run --rm … /bin/true`", |s| &s.run, 1.0),
            (
                "`ctr images rm --sync` until its snapshots are freed",
                |s| &s.gc,
                0.5,
            ),
        ];
        for (workload, get, target) in workloads {
            let row = Row::new(
                format!("{what}: {workload}, median (min – max) of {reps}"),
                samples.as_ref().map(|s| Val::Spread(get(s).clone())),
                Some(target),
            );
            // Import, unpack and run are judged "within noise"; freeing space is a ratio.
            rows.push(if target == 1.0 {
                row.within_noise(get(&samples.overlay))
            } else {
                row
            });
        }
    }
    rows.push(
        Row::new(
            format!(
                "CRI: `crictl create` + `crictl start` of a container ({}) in a running pod, median (min – max) of {}",
                images.small.describe(),
                sizes.cri_reps
            ),
            sides.as_ref().map(|side| Val::Spread(side.cri.clone())),
            Some(1.0),
        )
        .within_noise(&sides.overlay.cri),
    );
    rows.push(Row::new(
        format!(
            "stats loop: List + Usage of {} active snapshots of {} files each, median (min – max) of {reps}",
            sizes.stats_snapshots, sizes.stats_files
        ),
        sides.as_ref().map(|side| Val::Spread(side.stats.clone())),
        Some(0.5),
    ));
    rows
}

/// The CRI workload: on each snapshotter, through its runtime handler, a pod (its sandbox
/// image and the small image imported for that snapshotter first), then in rounds a container
/// created and started in it (timed), stopped and removed (not timed).
async fn cri_containers(c: &Containerd, sides: &mut Pair<Side>, sizes: &Sizes, images: &Images) {
    let pause = c.dir.join("pause.tar");
    crate::cri_support::write_pause_image(&pause, PAUSE);
    let pause = pause.to_str().expect("UTF-8 path").to_string();
    let small = images
        .small
        .archive
        .to_str()
        .expect("UTF-8 path")
        .to_string();
    struct Pod {
        id: String,
        config: String,
        container: String,
    }
    let mut pods = Vec::new();
    for side in sides.each_mut() {
        let sn = side.snapshotter;
        for archive in [&pause, &small] {
            c.ctr_ok(
                "k8s.io",
                &["images", "import", "--snapshotter", sn, archive],
            );
        }
        let pod = serde_json::json!({
            "metadata": { "name": format!("bench-{sn}"), "namespace": "bench", "uid": sn },
            "log_directory": c.dir.join(format!("pod-{sn}")).display().to_string(),
            // The host's network: the pod needs no network of its own to measure this.
            "linux": { "security_context": { "namespace_options": { "network": 2 } } },
        });
        let config = c.json_file(&format!("pod-{sn}.json"), pod);
        let runtime = format!("runc-{sn}");
        let (id, _) = c.crictl_ok(&["runp", "--runtime", &runtime, &config]);
        let container = serde_json::json!({
            "metadata": { "name": "app" },
            "image": { "image": IMAGE },
            "command": ["/bin/busybox", "sleep", "1000"],
            "log_path": "app.log",
            "linux": { "security_context": { "namespace_options": { "network": 2 } } },
        });
        let container = c.json_file(&format!("container-{sn}.json"), container);
        pods.push((
            sn,
            Pod {
                id,
                config,
                container,
            },
        ));
    }
    alternate(0..sizes.cri_reps, sides.each_mut(), async |_, side| {
        let pod = &pods
            .iter()
            .find(|(sn, _)| *sn == side.snapshotter)
            .unwrap()
            .1;
        settle(sizes);
        let (id, create) = c.crictl_ok(&["create", &pod.id, &pod.container, &pod.config]);
        let (_, start) = c.crictl_ok(&["start", &id]);
        side.cri.push(create + start);
        // Through the pod's runtime handler, the container's snapshot (its key is the
        // container's ID) is this side's: a Stat on any other snapshotter fails the run.
        c.target(side.snapshotter, "k8s.io")
            .client()
            .await
            .stat(&id)
            .await;
        c.crictl_ok(&["stop", "--timeout", "0", &id]);
        c.crictl_ok(&["rm", &id]);
    })
    .await;
    for (_, pod) in &pods {
        c.crictl_ok(&["stopp", &pod.id]);
        c.crictl_ok(&["rmp", &pod.id]);
    }
    c.crictl_ok(&["rmi", IMAGE, PAUSE]);
}

/// One workload's samples in [`ImageSamples`].
type Samples = fn(&ImageSamples) -> &Vec<Duration>;

/// The key of the stats loop's `i`th active snapshot.
fn stats_key(i: usize) -> String {
    format!("stats-{i}")
}

/// Prepares the stats loop's active snapshots and writes their files into each one's upper
/// directory (the bind mount's source: what a container writes to).
async fn fill_active(side: &mut Side, sizes: &Sizes) {
    let mut client = side.target.client().await;
    for i in 0..sizes.stats_snapshots {
        // A root for containerd's collector, which would otherwise remove it (no lease, no
        // container refers to it) whenever a removal elsewhere sets it off.
        let labels = [("containerd.io/gc.root".to_string(), "bench".to_string())].into();
        let mounts = client.prepare(&stats_key(i), "", labels).await;
        let source = PathBuf::from(&mounts.first().expect("a mount").source);
        let data = [b'x'; 512];
        for f in 0..sizes.stats_files {
            let sub = source.join(format!("d{}", f / 1000));
            if f % 1000 == 0 {
                fs::create_dir_all(&sub).expect("creating a directory in an upper dir");
            }
            fs::write(sub.join(format!("f{f}")), data).expect("writing into an upper dir");
        }
    }
}

/// Removes image `name` (`ctr images rm --sync`: containerd collects its content and
/// snapshots before answering) and waits until the snapshotter's directory holds no more
/// entries than `empty` (`du` then shows the space freed). Returns the time from the call.
async fn remove_until_freed(
    c: &Containerd,
    ns: &str,
    name: &str,
    side: &Side,
    empty: usize,
) -> Duration {
    let start = Instant::now();
    c.ctr_ok(ns, &["images", "rm", "--sync", name]);
    let deadline = Instant::now() + Duration::from_secs(300);
    while side.entries() > empty {
        assert!(
            Instant::now() < deadline,
            "{}: the image's snapshots were not freed within 300 s of its removal",
            side.snapshotter
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

/// Lets containerd's collector remove what the benchmark removed, and waits until the
/// snapshotter's directory is empty: it runs on its own only every 100 changes, so a run is
/// forced (deleting a lease with --sync collects synchronously).
async fn collect(c: &Containerd, side: &Side) {
    let sn = side.snapshotter;
    let ns = format!("bench-{sn}");
    let lease = format!("gc-{sn}");
    c.ctr_ok(&ns, &["leases", "create", "--id", &lease]);
    c.ctr_ok(&ns, &["leases", "delete", "--sync", &lease]);
    let deadline = Instant::now() + Duration::from_secs(300);
    while side.entries() > 0 {
        assert!(
            Instant::now() < deadline,
            "containerd did not garbage-collect the {sn} snapshots within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where `unpigz` is on the PATH containerd gets, if anywhere.
pub fn unpigz() -> Option<PathBuf> {
    let flavor = flavor().ok()?;
    std::env::split_paths(&flavor.path_env())
        .map(|d| d.join("unpigz"))
        .find(|p| p.is_file())
}

/// One side of [`paired_unpack`]: lamina's config, whether containerd unpacks through
/// lamina's differ (`lamina config containerd --differ`) or its own applier, and whether its
/// applier may use `unpigz`.
pub struct Variant {
    pub label: &'static str,
    pub lamina_config: &'static str,
    pub differ: bool,
    pub unpigz: bool,
}

/// What a paired unpack measured on one side.
pub struct Unpacked {
    /// `ctr images import`: ingest and unpack.
    pub import: Vec<Duration>,
    /// The unpack within it: from containerd's first Prepare to lamina's answer to its last
    /// Commit, by lamina's log (lamina is the snapshotter on every side, so the same clock
    /// and the same marks measure each).
    pub unpack: Vec<Duration>,
    /// lamina's peak resident memory over the whole run (VmHWM), in bytes.
    pub peak_rss: u64,
}

/// lamina's log level in [`paired_unpack`]: each request's arrival (`lamina::grpc` at debug)
/// and each Commit's answer (info).
const UNPACK_MARKS: &str = "log_level = \"info,lamina::grpc=debug\"\n";

/// The unpack in the log `log` of one import: from the first Prepare's arrival to the last
/// Commit's answer. Times of day are enough (a span under a day, across midnight included).
fn unpack_span(log: &str) -> Option<Duration> {
    fn time_of_day(line: &str) -> Option<f64> {
        // 2026-11-30T22:17:32.981285Z
        let t = line.split_whitespace().next()?.split_once('T')?.1;
        let t = t.strip_suffix('Z')?;
        let mut parts = t.splitn(3, ':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    }
    let first = log
        .lines()
        .find(|l| l.contains(" prepare{") && l.ends_with("lamina::grpc: request"))
        .and_then(time_of_day)?;
    let last = log
        .lines()
        .rev()
        .filter(|l| l.contains("lamina::snapshot: committed"))
        .find_map(time_of_day)?;
    let span = if last >= first {
        last - first
    } else {
        last + 86_400.0 - first
    };
    Some(Duration::from_secs_f64(span))
}

/// `ctr images import` of `image` through one containerd per variant, each with its own
/// lamina, set up as `variants` say, in rounds that [`alternate`] between them (and which goes
/// first). Each round imports into an empty root and content store: the image and its content
/// are removed after each, and lamina's deleting waited for.
pub async fn paired_unpack<const N: usize>(
    dir: &Path,
    bins: &Bins,
    sizes: &Sizes,
    image: &Image,
    variants: [Variant; N],
) -> [Unpacked; N] {
    /// One lamina, the containerd that uses it, and what was measured.
    struct Side {
        server: Server,
        containerd: Containerd,
        import: Vec<Duration>,
        unpack: Vec<Duration>,
    }
    let mut sides = variants.map(|v| {
        let server_dir = dir.join(format!("lamina-{}", v.label));
        let ctrd_dir = dir.join(format!("ctrd-{}", v.label));
        // lamina's differ reads the layers from this containerd.
        let config = format!(
            "{}{UNPACK_MARKS}containerd_address = {:?}\n",
            v.lamina_config,
            ctrd_dir.join("c.sock").display().to_string()
        );
        let server = Server::start_with(Kind::Lamina, bins, &server_dir, &config);
        let containerd =
            Containerd::start_with(&ctrd_dir, bins, &server, false, v.differ, v.unpigz);
        Side {
            server,
            containerd,
            import: Vec::new(),
            unpack: Vec::new(),
        }
    });
    let archive = image.archive.to_str().expect("UTF-8 path").to_string();
    alternate(
        0..sizes.durable_reps,
        sides.each_mut(),
        async |rep, side| {
            let ns = format!("paired-{rep}");
            let c = &side.containerd;
            settle(sizes);
            let from = side.server.log_len();
            let import = ["images", "import", "--snapshotter", "lamina", &archive];
            side.import.push(c.ctr_ok(&ns, &import));
            let log = side.server.log_since(from);
            side.unpack.push(unpack_span(&log).unwrap_or_else(|| {
                panic!("no Prepare and Commit in lamina's log of the import:\n{log}")
            }));
            // Removed again with its content (a synchronous GC), so that each round ingests
            // and unpacks the same amount into an empty root, and waited for: lamina deletes
            // in the background, and that deleting must not overlap another side's timed
            // import.
            c.ctr_ok(&ns, &["images", "rm", "--sync", &image.name]);
            let snapshots = side.server.root.join("snapshots");
            let deadline = Instant::now() + Duration::from_secs(300);
            while fs::read_dir(&snapshots).map(|d| d.count()).unwrap_or(0) > 0 {
                assert!(
                    Instant::now() < deadline,
                    "the image's snapshots were not freed within 300 s of its removal"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        },
    )
    .await;
    let peaks = sides
        .each_ref()
        .map(|s| crate::machine::peak_rss(s.server.pid()));
    let mut servers = Vec::new();
    let mut measured = Vec::new();
    for (side, peak_rss) in sides.into_iter().zip(peaks) {
        // Every containerd first: each still talks to its lamina while it tears down.
        drop(side.containerd);
        servers.push(side.server);
        measured.push(Unpacked {
            import: side.import,
            unpack: side.unpack,
            peak_rss,
        });
    }
    for mut server in servers {
        server.stop();
    }
    measured
        .try_into()
        .unwrap_or_else(|_| unreachable!("one per variant"))
}
