//! User level: a private containerd with both snapshotters, its built-in `overlayfs` and lamina
//! as the `lamina` proxy plugin. The same Rust client drives containerd's Snapshots service with
//! `snapshotter = "overlayfs"` or `"lamina"`, and `ctr` imports and runs a small image on each.

use std::{
    cell::Cell,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    client::Target,
    image,
    pair::{alternate, chunk, Pair},
    report::{median, Row, Val},
    server::{Bins, Kind, Server},
    workloads, Sizes,
};

const IMAGE: &str = "lamina.bench/img:1";
const CTR_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the user-level part cannot run here, if it cannot.
pub fn missing_tools() -> Option<String> {
    for tool in ["containerd", "ctr", "runc"] {
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

struct Out {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// A private containerd that knows lamina as a proxy snapshotter.
struct Containerd {
    dir: PathBuf,
    address: PathBuf,
    child: Option<Child>,
    calls: Cell<usize>,
    namespaces: std::cell::RefCell<Vec<String>>,
}

impl Containerd {
    fn start(dir: &Path, lamina_socket: &Path) -> Containerd {
        fs::create_dir_all(dir).expect("containerd dir");
        let address = dir.join("c.sock");
        let config = crate::containerd_support::config_toml(dir, lamina_socket);
        fs::write(dir.join("config.toml"), config).expect("containerd config");
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let mut c = Containerd {
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
        let mut child = Command::new("ctr")
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
    import: Vec<Duration>,
    run: Vec<Duration>,
}

/// Runs the user-level workloads; returns their rows.
pub async fn run(dir: &Path, bins: &Bins, sizes: &Sizes) -> Vec<Row> {
    let mut lamina = Server::start(Kind::Lamina, bins, &dir.join("lamina"));
    let c = Containerd::start(&dir.join("ctrd"), &lamina.target.socket);
    eprintln!(
        "user level: containerd at {} (overlayfs root under {})",
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
            import: Vec::new(),
            run: Vec::new(),
        }
    });
    for side in sides.each_mut() {
        // containerd dials a proxy plugin on first use: not part of the timing.
        side.target.client().await.list_count().await;
    }
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
        let sn = side.snapshotter;
        // Not timed: through containerd, Remove only drops containerd's record and its
        // garbage collector removes the snapshot later.
        let doomed: Vec<String> = side.live.iter().rev().cloned().collect();
        workloads::removes(&side.target, &doomed).await;
        // Let containerd's collector reach the backend before anything else is timed: it
        // runs on its own only every 100 changes, so force a run (deleting a lease with
        // --sync collects synchronously), then wait for the directories to go.
        let ns = format!("bench-{sn}");
        let lease = format!("gc-{sn}");
        c.ctr_ok(&ns, &["leases", "create", "--id", &lease]);
        c.ctr_ok(&ns, &["leases", "delete", "--sync", &lease]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !is_empty(&side.snapshots_dir) {
            assert!(
                Instant::now() < deadline,
                "containerd did not garbage-collect the {sn} snapshots within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let archive = dir.join("image.tar");
    let layers = image::write_archive(&archive, IMAGE, sizes.image_layers, sizes.image_files);
    let archive = archive.to_str().expect("UTF-8 path").to_string();
    alternate(0..sizes.user_reps, sides.each_mut(), async |rep, side| {
        let sn = side.snapshotter;
        let ns = format!("img-{sn}-{rep}");
        // The content first, untimed, so the timed import only unpacks the layers.
        c.ctr_ok(&ns, &["images", "import", "--no-unpack", &archive]);
        crate::sync_disks();
        let import = ["images", "import", "--snapshotter", sn, &archive];
        side.import.push(c.ctr_ok(&ns, &import));
        crate::sync_disks();
        let id = format!("run{rep}");
        let run = ["run", "--rm", "--snapshotter", sn, IMAGE, &id, "/bin/true"];
        side.run.push(c.ctr_ok(&ns, &run));
    })
    .await;
    drop(c);
    lamina.stop();

    let reps = sizes.user_reps;
    let time = |f: fn(&Side) -> Duration| sides.as_ref().map(|side| Val::Time(f(side)));
    vec![
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
        Row::new(
            format!(
                "`ctr images import` (unpack of {layers} layers, {} files), median of {reps}",
                sizes.image_layers * sizes.image_files
            ),
            time(|side| median(&side.import)),
            Some(1.0),
        )
        .within_noise(&sides.overlay.import),
        Row::new(
            format!("`ctr run --rm … /bin/true`, median of {reps}"),
            time(|side| median(&side.run)),
            Some(1.0),
        )
        .within_noise(&sides.overlay.run),
    ]
}

/// True when `dir` holds nothing (or is not there).
fn is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).map(|d| d.count() == 0).unwrap_or(true)
}

/// `ctr images import` of the image archive through two containerds, each with its own lamina,
/// one with durable_commit on and one with it off ([`crate::durable::DURABLE`]), in rounds that
/// [`alternate`] between them. Returns the samples, [on, off], and the image's layer count.
pub async fn durable_import(dir: &Path, bins: &Bins, sizes: &Sizes) -> ([Vec<Duration>; 2], usize) {
    /// One lamina, the containerd that uses it, and the import times.
    struct Side {
        server: Server,
        containerd: Containerd,
        import: Vec<Duration>,
    }
    let mut sides = crate::durable::DURABLE.map(|(config, label)| {
        let server_dir = dir.join(format!("lamina-{label}"));
        let server = Server::start_with(Kind::Lamina, bins, &server_dir, config);
        let containerd =
            Containerd::start(&dir.join(format!("ctrd-{label}")), &server.target.socket);
        Side {
            server,
            containerd,
            import: Vec::new(),
        }
    });
    let archive = dir.join("image.tar");
    let layers = image::write_archive(&archive, IMAGE, sizes.image_layers, sizes.image_files);
    let archive = archive.to_str().expect("UTF-8 path").to_string();
    alternate(
        0..sizes.durable_reps,
        sides.each_mut(),
        async |rep, side| {
            let ns = format!("durable-{rep}");
            let c = &side.containerd;
            // The content first, untimed, so the timed import only unpacks the layers.
            c.ctr_ok(&ns, &["images", "import", "--no-unpack", &archive]);
            crate::sync_disks();
            let import = ["images", "import", "--snapshotter", "lamina", &archive];
            side.import.push(c.ctr_ok(&ns, &import));
        },
    )
    .await;
    let [mut on, mut off] = sides;
    // Both containerds first: each still talks to its lamina while it tears down.
    drop((on.containerd, off.containerd));
    on.server.stop();
    off.server.stop();
    ([on.import, off.import], layers)
}
