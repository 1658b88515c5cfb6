//! The test daemon, a thin client, and mounting what lamina returns.

#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use containerd_snapshots::api::{
    snapshots::v1::snapshots_client::SnapshotsClient, snapshots::v1::*, types::Mount,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tonic::{transport::Channel, Code, Status};

/// True when the test may run. Without root it prints why and returns false, except under CI,
/// where a test that cannot run is a failure.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (it mounts overlayfs) and CI is set: run it as root");
    }
    eprintln!("skipped: needs root (lamina probes overlayfs and the test mounts)");
    false
}

/// Declares a test that needs root (every test of this binary does): a `#[tokio::test]` that,
/// without root, prints why and passes, or fails when `CI` is set (see [`require_root`]).
///
/// `root_test!(name, || { … })` runs the body on tokio's single-threaded test runtime;
/// `root_test!(name, threads = N, || { … })` on a multi-threaded one with N workers, for tests
/// whose spawned tasks must run beside each other or beside a blocking call (a daemon stopped
/// with SIGTERM while a client connection is open, a thread that mounts). The closure is only
/// syntax, so that rustfmt formats the body: it is the test function's body.
macro_rules! root_test {
    ($name:ident, || $body:block) => {
        #[tokio::test]
        async fn $name() {
            if !$crate::util::require_root() {
                return;
            }
            $body
        }
    };
    ($name:ident, threads = $n:tt, || $body:block) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = $n)]
        async fn $name() {
            if !$crate::util::require_root() {
                return;
            }
            $body
        }
    };
}

/// A [`root_test!`] on a `lamina serve` of its own: the closure's first parameter is the
/// [`TestDaemon`], started and answering; with a second, a [`Client`] connected to it.
///
/// ```ignore
/// daemon_test!(name, |d, mut c| { … });
/// daemon_test!(name, threads = 2, config = "sync_remove = true\n", |mut d| { … });
/// ```
///
/// `threads = N` as for [`root_test!`]; `config = "…"` is the daemon's config file (TOML, see
/// [`TestDaemon::start_with_config`]). The parameters are patterns (`mut d`, `_c`).
macro_rules! daemon_test {
    ($name:ident, $(threads = $n:tt,)? $(config = $config:expr,)? |$d:pat_param| $body:block) => {
        $crate::util::root_test!($name, $(threads = $n,)? || {
            let $d = $crate::util::TestDaemon::start_with_config(
                $crate::util::daemon_test!(@config $($config)?),
            )
            .await;
            $body
        });
    };
    (
        $name:ident,
        $(threads = $n:tt,)?
        $(config = $config:expr,)?
        |$d:pat_param, $c:pat_param| $body:block
    ) => {
        $crate::util::root_test!($name, $(threads = $n,)? || {
            let daemon = $crate::util::TestDaemon::start_with_config(
                $crate::util::daemon_test!(@config $($config)?),
            )
            .await;
            let client = daemon.client().await;
            let $d = daemon;
            let $c = client;
            $body
        });
    };
    (@config) => {
        ""
    };
    (@config $config:expr) => {
        $config
    };
}

pub(crate) use {daemon_test, root_test};

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

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lamina"));
        cmd.arg("serve")
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("LAMINA_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        );
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
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // The socket accepts (into its backlog) before recovery is done; wait until a
            // request is answered.
            if self.answers().await {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("lamina exited during start-up: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "lamina did not start serving within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether lamina answers a request now (it may also have exited meanwhile).
    async fn answers(&self) -> bool {
        if std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            return false;
        }
        let socket = self.socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://lamina.invalid")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                tokio::net::UnixStream::connect(socket.clone())
            }))
            .await;
        let Ok(channel) = channel else { return false };
        let mut client = Client {
            inner: SnapshotsClient::new(channel.clone()),
            channel,
        };
        client.list(&[]).await.is_ok()
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

    /// Waits for a daemon already sent a signal to exit.
    pub async fn stop_async_after_signal(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "lamina did not exit within 15 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for the exit status, letting this runtime's tasks (open client
    /// connections answering the server's HTTP/2 GOAWAY and PING) run meanwhile.
    pub async fn stop_async(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("lamina did not exit within 15 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for the exit status. Blocks the thread: a client connection still
    /// open on a single-threaded runtime cannot answer the server's shutdown handshake, so the
    /// daemon then waits out its drain limit; prefer [`TestDaemon::stop_async`].
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        wait_timeout(&mut child, Duration::from_secs(15))
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub async fn restart(&mut self) {
        let status = self.stop_async().await;
        assert!(status.success(), "lamina exited with {status} on SIGTERM");
        self.spawn().await;
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
        let deadline = Instant::now() + limit;
        loop {
            let dirs = self.snapshot_dirs();
            if until(&dirs) || Instant::now() > deadline {
                return dirs;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lamina did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// containerd's generated client on lamina's socket, with the calls tests make.
#[derive(Clone)]
pub struct Client {
    pub inner: SnapshotsClient<Channel>,
    /// The connection, for other services on the same socket (admin, health).
    pub channel: Channel,
}

pub type Res<T> = Result<T, Status>;

pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Client {
    pub async fn connect(socket: &Path) -> Client {
        let socket = socket.to_path_buf();
        let channel = tonic::transport::Endpoint::try_from("http://lamina.invalid")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                tokio::net::UnixStream::connect(socket.clone())
            }))
            .await
            .expect("connecting to lamina");
        Client {
            inner: SnapshotsClient::new(channel.clone()),
            channel,
        }
    }

    pub async fn prepare(&mut self, key: &str, parent: &str) -> Res<Vec<Mount>> {
        self.prepare_with(key, parent, HashMap::new()).await
    }

    pub async fn prepare_with(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Res<Vec<Mount>> {
        let req = PrepareSnapshotRequest {
            snapshotter: "lamina".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        };
        Ok(self.inner.prepare(req).await?.into_inner().mounts)
    }

    pub async fn view(&mut self, key: &str, parent: &str) -> Res<Vec<Mount>> {
        let req = ViewSnapshotRequest {
            snapshotter: "lamina".into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        };
        Ok(self.inner.view(req).await?.into_inner().mounts)
    }

    pub async fn mounts(&mut self, key: &str) -> Res<Vec<Mount>> {
        let req = MountsRequest {
            snapshotter: "lamina".into(),
            key: key.into(),
        };
        Ok(self.inner.mounts(req).await?.into_inner().mounts)
    }

    pub async fn commit(&mut self, name: &str, key: &str) -> Res<()> {
        self.commit_with(name, key, HashMap::new()).await
    }

    pub async fn commit_with(
        &mut self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Res<()> {
        let req = CommitSnapshotRequest {
            snapshotter: "lamina".into(),
            name: name.into(),
            key: key.into(),
            labels,
        };
        self.inner.commit(req).await.map(|_| ())
    }

    pub async fn remove(&mut self, key: &str) -> Res<()> {
        let req = RemoveSnapshotRequest {
            snapshotter: "lamina".into(),
            key: key.into(),
        };
        self.inner.remove(req).await.map(|_| ())
    }

    pub async fn stat(&mut self, key: &str) -> Res<Info> {
        let req = StatSnapshotRequest {
            snapshotter: "lamina".into(),
            key: key.into(),
        };
        Ok(self.inner.stat(req).await?.into_inner().info.expect("info"))
    }

    pub async fn update(&mut self, info: Info, paths: &[&str]) -> Res<Info> {
        let req = UpdateSnapshotRequest {
            snapshotter: "lamina".into(),
            info: Some(info),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|s| s.to_string()).collect(),
            }),
        };
        Ok(self
            .inner
            .update(req)
            .await?
            .into_inner()
            .info
            .expect("info"))
    }

    pub async fn usage(&mut self, key: &str) -> Res<UsageResponse> {
        let req = UsageRequest {
            snapshotter: "lamina".into(),
            key: key.into(),
        };
        Ok(self.inner.usage(req).await?.into_inner())
    }

    /// All snapshots matching `filters`, and the number of stream messages they came in.
    pub async fn list_batches(&mut self, filters: &[&str]) -> Res<(Vec<Info>, usize)> {
        let req = ListSnapshotsRequest {
            snapshotter: "lamina".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        };
        let mut stream = self.inner.list(req).await?.into_inner();
        let (mut out, mut batches) = (Vec::new(), 0);
        while let Some(msg) = stream.message().await? {
            batches += 1;
            out.extend(msg.info);
        }
        Ok((out, batches))
    }

    /// Names of the snapshots matching `filters`, sorted.
    pub async fn list(&mut self, filters: &[&str]) -> Res<Vec<String>> {
        let mut names: Vec<String> = self
            .list_batches(filters)
            .await?
            .0
            .into_iter()
            .map(|i| i.name)
            .collect();
        names.sort();
        Ok(names)
    }

    pub async fn cleanup(&mut self) -> Res<()> {
        let req = CleanupRequest {
            snapshotter: "lamina".into(),
        };
        self.inner.cleanup(req).await.map(|_| ())
    }
}

/// Asserts that `res` failed with `code` and a message mentioning `needle`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(res: Res<T>, code: Code, needle: &str) {
    match res {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            assert!(
                s.message().contains(needle),
                "message {:?} does not mention {needle:?}",
                s.message()
            );
        }
    }
}

/// The kinds as the wire numbers them.
pub const VIEW: i32 = 1;
pub const ACTIVE: i32 = 2;
pub const COMMITTED: i32 = 3;

/// Mounts what lamina returned at `target`, as containerd would; unmounts on drop.
///
/// Deliberately written apart from `lamina::sys::mount_spec`: the tests judge lamina's mount
/// specs, so they interpret them with code of their own (only chains too long for one page
/// borrow lamina's new-mount-API path, see [`Mounted::new_any`]).
pub struct Mounted {
    target: PathBuf,
}

impl Mounted {
    pub fn new(mounts: &[Mount], target: &Path) -> Mounted {
        assert_eq!(
            mounts.len(),
            1,
            "lamina returns exactly one mount: {mounts:?}"
        );
        let m = &mounts[0];
        std::fs::create_dir_all(target).unwrap();
        match m.r#type.as_str() {
            "bind" => {
                let ro = m.options.iter().any(|o| o == "ro");
                let mut flags = MsFlags::MS_BIND;
                if m.options.iter().any(|o| o == "rbind") {
                    flags |= MsFlags::MS_REC;
                }
                mount(
                    Some(m.source.as_str()),
                    target,
                    None::<&str>,
                    flags,
                    None::<&str>,
                )
                .unwrap_or_else(|e| panic!("bind mount {m:?}: {e}"));
                if ro {
                    mount(
                        None::<&str>,
                        target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    )
                    .unwrap_or_else(|e| panic!("read-only remount {m:?}: {e}"));
                }
            }
            "overlay" => {
                let data = m.options.join(",");
                mount(
                    Some("overlay"),
                    target,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(data.as_str()),
                )
                .unwrap_or_else(|e| panic!("overlay mount {m:?}: {e}"));
            }
            other => panic!("unexpected mount type {other:?}"),
        }
        Mounted {
            target: target.to_path_buf(),
        }
    }

    /// Like [`Mounted::new`], but mounts overlays through `lamina`'s own mount code path when
    /// their options exceed one page (deep chains), as containerd would shorten them.
    pub fn new_any(mounts: &[Mount], target: &Path) -> Mounted {
        let len: usize = mounts[0].options.iter().map(|o| o.len() + 1).sum();
        if len < 4096 {
            return Mounted::new(mounts, target);
        }
        std::fs::create_dir_all(target).unwrap();
        let m = &mounts[0];
        lamina::sys::mount_spec(&m.r#type, &m.source, &m.options, target)
            .unwrap_or_else(|e| panic!("mount {m:?}: {e}"));
        Mounted {
            target: target.to_path_buf(),
        }
    }

    /// A mount someone else made at `target` (`lamina mount`), unmounted on drop.
    pub fn adopt(target: &Path) -> Mounted {
        Mounted {
            target: target.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.target.join(p)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = umount2(&self.target, MntFlags::MNT_DETACH);
    }
}

/// How a `lamina serve` that may or may not start ended up.
pub enum Started {
    Exited(std::process::Output),
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            return Started::Exited(child.wait_with_output().unwrap());
        }
        // The socket is bound before start-up checks run: only an answer means serving.
        if std::os::unix::net::UnixStream::connect(&d.socket).is_ok() {
            let answered = tokio::time::timeout(Duration::from_secs(1), async {
                let mut c = Client::connect(&d.socket).await;
                c.list(&[]).await.is_ok()
            })
            .await;
            if answered == Ok(true) {
                return Started::Serving(child);
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lamina neither exited nor served within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The line where lamina says why it exits (`lamina: …`), else the last line of `stderr`.
pub fn final_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .rev()
        .find(|l| l.starts_with("lamina:"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .to_string()
}

pub fn stop_child(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Every file under `dir` with its contents, for before/after comparisons.
pub fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn go(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                go(base, &p, out);
            } else if meta.is_file() {
                out.insert(rel, std::fs::read(&p).unwrap());
            } else {
                out.insert(format!("{rel}@"), Vec::new());
            }
        }
    }
    go(dir, dir, &mut out);
    out
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
    let mounts = c.prepare(&key, "").await.unwrap();
    let fs = Path::new(&mounts[0].source);
    let id = fs
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    c.remove(&key).await.unwrap();
    let gone = d
        .snapshot_dirs_when(Duration::from_secs(30), |dirs| !dirs.contains(&id))
        .await;
    assert!(
        !gone.contains(&id),
        "the directory of {key} was never deleted"
    );
    id.parse().unwrap()
}
