//! The test daemon: `lamina serve` on a temporary root and socket.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::Duration,
};

use nix::sys::signal::Signal;

use super::{
    channel, id_of, lamina, signal, stop_child, wait_for, wait_for_blocking, Client, Mount,
};

/// `lamina serve` on a temporary root and socket.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub socket: PathBuf,
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl TestDaemon {
    pub async fn start() -> TestDaemon {
        Self::start_with_config("").await
    }

    /// Starts with `config` (TOML) as its config file; root and address come from flags.
    pub async fn start_with_config(config: &str) -> TestDaemon {
        Self::start_at(None, config, |_| {}).await
    }

    /// [`TestDaemon::start_with_config`], with `adjust` applied to the command first
    /// (environment, limits, where its log goes).
    pub async fn start_with(config: &str, adjust: impl FnOnce(&mut Command)) -> TestDaemon {
        Self::start_at(None, config, adjust).await
    }

    /// [`TestDaemon::start_with_config`] with lamina's root at `root` instead of in the test's
    /// temporary directory: for tests that give the root a filesystem of its own.
    pub async fn start_in(root: &Path, config: &str) -> TestDaemon {
        Self::start_at(Some(root), config, |_| {}).await
    }

    async fn start_at(
        root: Option<&Path>,
        config: &str,
        adjust: impl FnOnce(&mut Command),
    ) -> TestDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = root.map_or_else(|| dir.path().join("root"), Path::to_path_buf);
        let socket = dir.path().join("run/lamina.sock");
        let config_path = if config.is_empty() {
            None
        } else {
            let p = dir.path().join("config.toml");
            std::fs::write(&p, config).unwrap();
            Some(p)
        };
        let mut d = TestDaemon {
            dir,
            root,
            socket,
            config: config_path,
            child: None,
        };
        d.spawn_with(adjust).await;
        d
    }

    /// `lamina serve` on this daemon's root, socket and config.
    pub fn command(&self) -> Command {
        let mut cmd = lamina(["serve"]);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd
    }

    pub async fn spawn(&mut self) {
        self.spawn_with(|_| {}).await
    }

    /// [`TestDaemon::spawn`], with `adjust` applied to the command first.
    pub async fn spawn_with(&mut self, adjust: impl FnOnce(&mut Command)) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = self.command();
        adjust(&mut cmd);
        let child = cmd.stdin(Stdio::null()).spawn().expect("starting lamina");
        self.child = Some(child);
        // The socket accepts (into its backlog) before recovery is done; wait until a request
        // is answered.
        let served = wait_for(
            Duration::from_secs(20),
            Duration::from_millis(20),
            async || {
                if answers(&self.socket).await {
                    return Some(());
                }
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    self.child = None;
                    panic!("lamina exited during start-up: {status}");
                }
                None
            },
        )
        .await;
        assert!(served.is_some(), "lamina did not start serving within 20 s");
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// How lamina exited, if it has (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().expect("started").try_wait().unwrap()
    }

    /// Waits for a daemon already sent a signal to exit, letting this runtime's tasks (open
    /// client connections answering the server's HTTP/2 GOAWAY and PING) run meanwhile; kills
    /// it and fails after 15 s.
    pub async fn stop_async_after_signal(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = wait_for(
            Duration::from_secs(15),
            Duration::from_millis(20),
            async || child.try_wait().unwrap(),
        )
        .await;
        status.unwrap_or_else(|| {
            stop_child(child);
            panic!("lamina did not exit within 15 s of the signal");
        })
    }

    /// SIGTERM, then [`TestDaemon::stop_async_after_signal`].
    pub async fn stop_async(&mut self) -> ExitStatus {
        signal(self.pid(), Signal::SIGTERM);
        self.stop_async_after_signal().await
    }

    /// SIGTERM, then waits for the exit status. Blocks the thread: a client connection still
    /// open on a single-threaded runtime cannot answer the server's shutdown handshake, so the
    /// daemon then waits out its drain limit; prefer [`TestDaemon::stop_async`].
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), Signal::SIGTERM);
        let status = wait_for_blocking(Duration::from_secs(15), Duration::from_millis(20), || {
            child.try_wait().unwrap()
        });
        status.unwrap_or_else(|| {
            stop_child(child);
            panic!("lamina did not exit within 15 s of SIGTERM");
        })
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        stop_child(self.child.take().expect("running"));
    }

    pub async fn restart(&mut self) {
        let status = self.stop_async().await;
        assert!(status.success(), "lamina exited with {status} on SIGTERM");
        self.spawn().await;
    }

    /// `lamina ARGS --root <root> --address <socket>`, run to its end: a command of the CLI on
    /// this daemon, through its socket while it serves, offline on its root while it is stopped.
    pub fn cli(&self, args: &[&str]) -> Output {
        lamina(args)
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    /// `lamina ARGS --root <root>` with an address nobody serves on, run to its end: the
    /// offline tools, on this daemon's root even while it serves.
    pub fn offline(&self, args: &[&str]) -> Output {
        lamina(args)
            .arg("--root")
            .arg(&self.root)
            .args(["--address", "/nonexistent/lamina.sock"])
            .output()
            .unwrap()
    }

    /// Names of the directories under `<root>/snapshots`, sorted.
    pub fn snapshot_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// [`TestDaemon::snapshot_dirs`] once `until` accepts them, or as they are when `limit`
    /// has passed (the caller asserts): for deletions lamina finishes in the background.
    pub async fn snapshot_dirs_when(
        &self,
        limit: Duration,
        until: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let settled = wait_for(limit, Duration::from_millis(10), async || {
            let dirs = self.snapshot_dirs();
            until(&dirs).then_some(dirs)
        })
        .await;
        settled.unwrap_or_else(|| self.snapshot_dirs())
    }

    /// A fresh directory under the test's temp dir.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
    }
}

/// Whether lamina answers a request on `socket` now.
async fn answers(socket: &Path) -> bool {
    if std::os::unix::net::UnixStream::connect(socket).is_err() {
        return false;
    }
    let Ok(channel) = channel(socket).await else {
        return false;
    };
    Client::new(channel).list(&[]).await.is_ok()
}

/// How a `lamina serve` that may or may not start ended up.
pub enum Started {
    Exited(Output),
    /// It answered a List: serving.
    Serving(Child),
}

/// Starts lamina on `d`'s root and socket (d must be stopped) and waits until it either exits
/// or answers a request, for at most 20 s.
pub async fn start_or_exit(d: &TestDaemon) -> Started {
    let mut child = d
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lamina");
    let exited_or_serving = wait_for(
        Duration::from_secs(20),
        Duration::from_millis(20),
        async || {
            if child.try_wait().unwrap().is_some() {
                return Some(true);
            }
            // The socket is bound before start-up checks run: only an answer means serving.
            let answered = tokio::time::timeout(Duration::from_secs(1), answers(&d.socket)).await;
            (answered == Ok(true)).then_some(false)
        },
    )
    .await;
    match exited_or_serving {
        Some(true) => Started::Exited(child.wait_with_output().unwrap()),
        Some(false) => Started::Serving(child),
        None => {
            stop_child(child);
            panic!("lamina neither exited nor served within 20 s");
        }
    }
}

/// An ID the daemon handed out and no snapshot owns any more, its directory deleted: where a
/// test can plant an orphan, as a crash between a Remove and its deletion would leave one.
/// (A directory with an ID the store never handed out is not an orphan: lamina refuses to
/// start over it, and never deletes it unless told to.)
pub async fn spent_id(d: &TestDaemon, c: &mut Client) -> u64 {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let key = format!(
        "spent-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mounts: Vec<Mount> = c.prepare(&key, "").await.unwrap();
    let id = id_of(&mounts[0].source);
    c.remove(&key).await.unwrap();
    let gone = d
        .snapshot_dirs_when(Duration::from_secs(30), |dirs| {
            !dirs.contains(&id.to_string())
        })
        .await;
    assert!(
        !gone.contains(&id.to_string()),
        "the directory of {key} was never deleted"
    );
    id
}
