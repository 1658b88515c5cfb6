//! The daemon's life: start-up checks and recovery, the socket, serving, and shutdown.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::Stream;
use tokio::net::{UnixListener, UnixStream};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    dirs::Layout,
    error::{Error, Result},
    grpc::{self, admin::Admin},
    overlay::probe::{self, Host},
    snapshot::{Options, Snapshotter},
};

/// Runs `lamina serve` until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    // Signals are caught from the very start: SIGTERM during start-up means "do not serve",
    // not death by signal with the socket left behind.
    let signals = Signals::install()?;
    // Listen first: a second lamina fails fast, and containerd's connections wait in the
    // backlog while recovery runs instead of being refused.
    let (listener, activated) = match inherited_listener()? {
        Some(l) => {
            if config.socket_group.is_some() {
                // systemd made the socket; its group is lamina.socket's SocketGroup=.
                warn!("socket_group is ignored: the socket comes from systemd; set SocketGroup= in lamina.socket instead");
            }
            (l, true)
        }
        None => (bind(&config.address, config.socket_group)?, false),
    };
    // An inherited socket belongs to systemd, which keeps it open across our restarts.
    let own_socket = (!activated).then(|| config.address.clone());
    let result = start_and_serve(&config, listener, signals, own_socket.clone()).await;
    if let Some(socket) = &own_socket {
        remove_socket(socket);
    }
    result
}

fn remove_socket(path: &Path) {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            warn!(error = %e, "could not remove the socket")
        }
        _ => {}
    }
}

/// `own_socket`: the socket lamina bound (none when systemd passed it), removed on exit.
async fn start_and_serve(
    config: &Config,
    listener: UnixListener,
    mut signals: Signals,
    own_socket: Option<PathBuf>,
) -> Result<()> {
    let activated = own_socket.is_none();
    // Start-up (probe, store, recovery) is blocking work. A signal meanwhile lets it finish,
    // since stopping recovery half-way gains nothing, and then exits without serving.
    let cfg = config.clone();
    let mut starting = tokio::task::spawn_blocking(move || start(&cfg));
    let started = tokio::select! {
        started = &mut starting => started,
        _ = signals.recv() => {
            info!("stopping before serving; letting start-up finish first (a second signal exits now)");
            exit_on_next_signal(signals, own_socket);
            let _ = starting.await;
            return Ok(());
        }
    };
    let admin = started.map_err(|e| Error::Internal(format!("start-up task failed: {e}")))??;
    // lamina's own socket was bound in a private directory and then renamed (see `bind`), so
    // its bound name is not where clients find it; systemd's is.
    let address = own_socket.clone().unwrap_or_else(|| {
        listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_else(|| config.address.clone())
    });
    info!(address = %address.display(), root = %config.root.display(), activated, "serving");
    if let Some(address) = config.metrics_address.clone() {
        let snapshotter = Arc::clone(&admin.snapshotter);
        let counts = Arc::new(move || {
            let c = snapshotter.counts();
            vec![
                ("active", c.active),
                ("view", c.views),
                ("committed", c.committed),
            ]
        });
        let endpoint = crate::metrics::bind(address, counts)?;
        tokio::spawn(async move {
            if let Err(e) = endpoint.await {
                error!(error = %crate::error::chain(&e), "metrics endpoint stopped");
            }
        });
    }
    notify(sd_notify::NotifyState::Ready);
    let watchdog = sd_notify::watchdog_enabled().map(|every| tokio::spawn(watchdog(every)));
    let result = grpc::serve(incoming(listener), admin, async move {
        signals.recv().await;
        notify(sd_notify::NotifyState::Stopping);
        exit_on_next_signal(signals, own_socket);
    })
    .await;
    if let Some(w) = watchdog {
        w.abort();
    }
    result
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) how we are doing.
///
/// Sent without blocking, unlike `sd_notify::notify`: a receiver that stopped reading would
/// otherwise stall a runtime worker (and the tasks queued behind it) on a full socket buffer.
fn notify(state: sd_notify::NotifyState) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::{ffi::OsStrExt, net::SocketAddr};
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        let addr = match path.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(&path)?,
        };
        sock.connect_addr(&addr)?;
        sock.send(format!("{state}\n").as_bytes())?;
        Ok(())
    })();
    if let Err(e) = sent {
        warn!(error = %e, %state, "could not notify systemd");
    }
}

/// Pings systemd's watchdog at half its interval for as long as the runtime serves requests.
async fn watchdog(every: Duration) {
    let mut tick = tokio::time::interval(every / 2);
    loop {
        tick.tick().await;
        notify(sd_notify::NotifyState::Watchdog);
    }
}

/// The listening socket systemd passed (socket activation, `LISTEN_FDS`), if any.
fn inherited_listener() -> Result<Option<UnixListener>> {
    use std::os::fd::FromRawFd;
    let mut fds =
        sd_notify::listen_fds().map_err(|e| Error::Config(format!("socket activation: {e}")))?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    // SAFETY: systemd passed this descriptor to us alone (LISTEN_PID is our pid), and nothing
    // else in lamina takes ownership of it.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    let addr = std_listener.local_addr().map_err(|e| {
        Error::Config(format!(
            "socket activation: descriptor {fd} is not a unix socket: {e}"
        ))
    })?;
    std_listener.set_nonblocking(true).map_err(|e| {
        Error::io(
            "configuring inherited socket",
            addr.as_pathname().unwrap_or(Path::new("?")),
            e,
        )
    })?;
    info!(fd, address = ?addr.as_pathname(), "serving the socket systemd passed");
    UnixListener::from_std(std_listener).map(Some).map_err(|e| {
        Error::io(
            "using inherited socket",
            addr.as_pathname().unwrap_or(Path::new("?")),
            e,
        )
    })
}

/// Raises the soft limit on open files to the hard one, as Go programs (containerd among them)
/// do at start. Deleting a tree holds a descriptor per level, and each connection holds one;
/// the default soft limit (1024) is far below what the hard limit allows, and a limit hit
/// halfway through a deletion leaves the tree for a later Cleanup.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => warn!(soft, hard, "cannot raise the open files limit: {e}"),
        },
        Ok(_) => {}
        Err(e) => warn!("cannot read the open files limit: {e}"),
    }
}

/// Checks the host, opens the store and recovers from whatever a crash left behind.
pub fn start(config: &Config) -> Result<Arc<Admin>> {
    raise_open_files_limit();
    let layout = Layout::new(&config.root);
    layout.init()?;
    let host = Host::detect();
    let mount_options = probe::usable_options(layout.root(), &config.mount_options, host)?;
    info!(?host, options = ?mount_options, "overlayfs works on the root");
    let features = probe::features_with(
        layout.root(),
        &config.mount_options,
        host,
        Ok(&mount_options),
    );
    let snapshotter = Snapshotter::open(
        layout,
        Options {
            mount_options: mount_options.clone(),
            sync_remove: config.sync_remove,
            upperdir_label: config.upperdir_label,
            durable_commit: config.durable_commit,
            remap_ids: probe::supports_idmapped_layers(),
        },
    )?;
    let recovered = snapshotter.recover()?;
    info!(
        orphans = recovered.deleted.directories,
        unsettled = recovered.unsettled,
        "start-up recovery done; orphan directories are deleted and the committed snapshots \
         checked in the background"
    );
    Ok(Arc::new(Admin {
        snapshotter,
        config: config.clone(),
        features,
        mount_options,
        started: Instant::now(),
    }))
}

/// Binds the unix socket with mode 0660, replacing a stale socket file but never one that a
/// live process still answers on.
///
/// bind(2) creates the socket with the mode the umask leaves (0777 under umask 000), and it
/// listens from then on: bound at `path` and chmodded after, it would be open to everyone for
/// a moment. So it is bound in a private 0700 directory beside `path`, given its mode and
/// group there, and renamed into place: a rename keeps the bound inode, so `path` names a
/// listening socket with its final mode from the moment it exists. (Setting the umask instead
/// would change it for every thread of the process, which may be creating files meanwhile.)
pub fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(|e| Error::io("creating the socket's directory", dir, e))?;
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::AddressInUse(path.to_path_buf()));
            }
            // The rename below replaces it in one step.
            info!(path = %path.display(), "replacing a stale socket");
        }
        Ok(_) => {
            return Err(Error::Config(format!(
                "address {} exists and is not a socket; remove it or choose another address",
                path.display()
            )))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("inspecting", path, e)),
    }
    let private = PrivateDir::create(dir)?;
    let listener = private.bind()?;
    let bound = private.socket();
    fs::set_permissions(&bound, fs::Permissions::from_mode(0o660))
        .map_err(|e| Error::io("setting mode 0660 on", &bound, e))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&bound, None, Some(gid))
            .map_err(|e| Error::io("setting the group of", &bound, e))?;
    }
    fs::rename(&bound, path).map_err(|e| Error::io("moving the socket to", path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("configuring the socket", path, e))?;
    UnixListener::from_std(listener).map_err(|e| Error::io("listening on", path, e))
}

/// A directory only root can enter, beside the socket's final path, removed (with a socket
/// left in it by a failure) when dropped.
struct PrivateDir {
    path: PathBuf,
    /// Held open so that the socket can be bound through `/proc/self/fd`.
    fd: std::os::fd::OwnedFd,
}

impl PrivateDir {
    const SOCKET: &'static str = "socket";

    fn create(beside: &Path) -> Result<PrivateDir> {
        use nix::fcntl::{open, OFlag};
        // mkdtemp makes it 0700 whatever the umask, under a name nobody can claim first.
        let path = nix::unistd::mkdtemp(&beside.join(".lamina-bind-XXXXXX"))
            .map_err(|e| Error::io("creating a private directory in", beside, e.into()))?;
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match open(&path, flags, nix::sys::stat::Mode::empty()) {
            Ok(fd) => Ok(PrivateDir {
                // SAFETY: open just returned this descriptor, and nothing else owns it.
                fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) },
                path,
            }),
            Err(e) => {
                let _ = fs::remove_dir(&path);
                Err(Error::io("opening", path, e.into()))
            }
        }
    }

    fn socket(&self) -> PathBuf {
        self.path.join(Self::SOCKET)
    }

    /// Binds through the directory's descriptor: a socket's path must fit in 108 bytes, and
    /// the private directory's name must not make a path that fits at its final place too long.
    fn bind(&self) -> Result<std::os::unix::net::UnixListener> {
        use std::os::fd::AsRawFd;
        let via_fd = format!("/proc/self/fd/{}/{}", self.fd.as_raw_fd(), Self::SOCKET);
        std::os::unix::net::UnixListener::bind(via_fd)
            .map_err(|e| Error::io("binding a socket in", &self.path, e))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // Only this process made entries here: after a successful rename there are none.
        let _ = fs::remove_file(self.socket());
        if let Err(e) = fs::remove_dir(&self.path) {
            warn!(path = %self.path.display(), error = %e, "could not remove the private directory");
        }
    }
}

/// The connections on `listener`, for as long as lamina serves. A failed accept never ends
/// serving (tonic would stop the server on the first error it is handed): it is retried after
/// a pause, and the connections meanwhile wait in the socket's backlog.
///
/// Most accept errors are about the listener's process, not the connection: out of
/// descriptors (EMFILE, ENFILE) or memory (ENOBUFS, ENOMEM). Retrying at once would spin,
/// since the pending connection is still there, so the pause doubles from 5 ms up to 1 s, as
/// Go's net/http does; the next accept that succeeds resets it. A connection aborted before it
/// was accepted (ECONNABORTED) costs one short pause, which is harmless.
fn incoming(listener: UnixListener) -> impl Stream<Item = std::io::Result<UnixStream>> {
    futures::stream::unfold(
        (listener, AcceptFailures::default()),
        |(listener, mut failures)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        failures.ended();
                        return Some((Ok(stream), (listener, failures)));
                    }
                    Err(e) => tokio::time::sleep(failures.failed(&e)).await,
                }
            }
        },
    )
}

/// A burst of failed accepts: logged when it starts and when it ends, not at every retry
/// (which would be a line every second for as long as descriptors are short).
#[derive(Default)]
struct AcceptFailures {
    since: Option<Instant>,
    count: u64,
    pause: Duration,
}

impl AcceptFailures {
    const FIRST_PAUSE: Duration = Duration::from_millis(5);
    const MAX_PAUSE: Duration = Duration::from_secs(1);

    /// Counts a failure and returns how long to wait before the next accept.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        if self.count == 0 {
            warn!(error = %e, "cannot accept connections; retrying until it works (pending connections wait in the socket's backlog)");
            self.since = Some(Instant::now());
            self.pause = Self::FIRST_PAUSE;
        } else {
            self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        }
        self.count += 1;
        self.pause
    }

    fn ended(&mut self) {
        if self.count > 0 {
            let after = self.since.map(|t| t.elapsed()).unwrap_or_default();
            info!(failures = self.count, ?after, "accepting connections again");
            *self = AcceptFailures::default();
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let failed = |e| Error::Internal(format!("installing signal handlers: {e}"));
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(failed)?,
            int: signal(SignalKind::interrupt()).map_err(failed)?,
        })
    }

    /// Waits for SIGTERM or SIGINT and returns its number.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => {
                info!("SIGTERM");
                libc::SIGTERM
            }
            _ = self.int.recv() => {
                info!("SIGINT");
                libc::SIGINT
            }
        }
    }
}

/// After the first signal, which waits for start-up or drains requests: a second one exits at
/// once, as an operator pressing Ctrl-C twice expects. What it cuts short is what a crash
/// would: start-up recovery finishes it next time, and every acknowledged write is durable.
fn exit_on_next_signal(mut signals: Signals, socket: Option<PathBuf>) {
    tokio::spawn(async move {
        let signo = signals.recv().await;
        warn!("second signal; exiting without waiting");
        if let Some(socket) = socket {
            remove_socket(&socket);
        }
        std::process::exit(128 + signo);
    });
}
