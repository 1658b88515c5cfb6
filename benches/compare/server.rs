//! The two snapshotter daemons, each its own process on its own unix socket: `lamina serve`
//! and `overlayd` (containerd's built-in overlayfs snapshotter behind containerd's own
//! `contrib/snapshotservice`, built here from `benches/go` in GOPATH mode).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::client::Target;

/// Which snapshotter a server runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Lamina,
    Overlay,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Lamina => "lamina",
            Kind::Overlay => "overlay",
        }
    }
}

/// The two server binaries.
pub struct Bins {
    pub lamina: PathBuf,
    pub overlayd: PathBuf,
}

impl Bins {
    fn of(&self, kind: Kind) -> &Path {
        match kind {
            Kind::Lamina => &self.lamina,
            Kind::Overlay => &self.overlayd,
        }
    }
}

/// Builds `overlayd` with the Go toolchain against Debian's packaged containerd sources
/// (`/usr/share/gocode`, package `golang-github-containerd-containerd-dev`), offline, into
/// `out_dir`; returns the binary.
pub fn build_overlayd(out_dir: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gopath = format!(
        "{}:/usr/share/gocode",
        manifest.join("benches/go").display()
    );
    fs::create_dir_all(out_dir).expect("creating the Go output directory");
    let bin = out_dir.join("overlayd");
    let go = std::env::var("GO").unwrap_or_else(|_| "go".into());
    let started = Instant::now();
    let out = Command::new(&go)
        .args(["build", "-o"])
        .arg(&bin)
        .arg("laminabench/overlayd")
        .env("GO111MODULE", "off")
        .env("GOPATH", &gopath)
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOSUMDB", "off")
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", out_dir.join("gocache"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{go}` ({e}): the benchmark builds containerd's overlay snapshotter \
                 with Go; install the packages in tests/conformance/debian-packages.txt"
            )
        });
    assert!(
        out.status.success(),
        "building benches/go/src/laminabench/overlayd failed ({}); GOPATH={gopath}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "built {} in {:.1} s ({})",
        bin.display(),
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(
            &Command::new(&go)
                .arg("version")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .trim()
    );
    bin
}

/// A running snapshotter daemon. Killed on drop if still running.
pub struct Server {
    pub kind: Kind,
    pub root: PathBuf,
    pub target: Target,
    /// When the process was spawned.
    pub spawned: Instant,
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    /// Starts `kind` with `--root <dir>/root --address <dir>/s.sock` and waits until its socket
    /// accepts connections.
    pub fn start(kind: Kind, bins: &Bins, dir: &Path) -> Server {
        Server::start_with(kind, bins, dir, "")
    }

    /// [`Server::start`], with `config` (TOML, lamina only) as the config file when not empty.
    pub fn start_with(kind: Kind, bins: &Bins, dir: &Path, config: &str) -> Server {
        fs::create_dir_all(dir).expect("creating the server directory");
        let root = dir.join("root");
        let socket = dir.join("s.sock");
        let log = dir.join("server.log");
        let logf = fs::File::create(&log).expect("creating the server log");
        let mut cmd = Command::new(bins.of(kind));
        // Only the config given here, never the machine's /etc/lamina/config.toml.
        cmd.env("LAMINA_CONFIG", "");
        cmd.arg("serve")
            .arg("--root")
            .arg(&root)
            .arg("--address")
            .arg(&socket);
        if !config.is_empty() {
            let path = dir.join("config.toml");
            fs::write(&path, config).expect("writing the server's config");
            cmd.arg("--config").arg(path);
        }
        cmd.env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log file"))
            .stderr(logf);
        let spawned = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bins.of(kind).display()));
        let mut server = Server {
            kind,
            root,
            target: Target {
                label: kind.label().into(),
                socket: socket.clone(),
                snapshotter: match kind {
                    Kind::Lamina => "lamina".into(),
                    Kind::Overlay => "overlayfs".into(),
                },
                namespace: None,
            },
            spawned,
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return server;
            }
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                server.child = None;
                panic!(
                    "{} exited during start-up ({status}); log:\n{}",
                    kind.label(),
                    server.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not serve {} within 30 s",
                kind.label(),
                socket.display()
            );
            // Finely: overlayfs serves within milliseconds, and the start-up figures include
            // this poll.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        peak_rss_of(self.pid())
    }

    /// How long the log is now: where [`Server::log_since`] reads from afterwards.
    pub fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// What the server logged after `offset` (a [`Server::log_len`]).
    pub fn log_since(&self, offset: u64) -> String {
        let log = fs::read(&self.log).unwrap_or_default();
        let from = (offset as usize).min(log.len());
        String::from_utf8_lossy(&log[from..]).into_owned()
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then waits (at most 30 s, then SIGKILL).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                eprintln!("{} ignored SIGTERM for 30 s: killing it", self.kind.label());
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.wait();
    }
}

impl Server {
    /// SIGKILL, as a crash would end it, and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// VmHWM of process `pid`, in bytes.
pub fn peak_rss_of(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}
