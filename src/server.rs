//! The daemon's life: start-up checks and recovery, the socket, serving, and shutdown.

use std::{
    fs,
    future::Future,
    io::ErrorKind,
    os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use crate::{
    config::Config,
    error::{Error, Result},
    grpc,
    overlay::probe::{self, Host},
    snapshot::{Options, Snapshotter},
    store::layout::Layout,
};

/// How long in-flight requests may run on after a shutdown signal before lamina exits anyway.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Runs `lamina serve` until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    // Bind first: a second lamina fails fast, and containerd's connections wait in the backlog
    // while recovery runs instead of being refused.
    let listener = bind(&config.address)?;
    let result = match start(&config) {
        Ok(snapshotter) => {
            info!(address = %config.address.display(), root = %config.root.display(), "serving");
            serve(listener, snapshotter, shutdown_signal()).await
        }
        Err(e) => Err(e),
    };
    match fs::remove_file(&config.address) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            warn!(error = %e, "could not remove the socket")
        }
        _ => {}
    }
    result
}

/// Checks the host, opens the store and recovers from whatever a crash left behind.
pub fn start(config: &Config) -> Result<Arc<Snapshotter>> {
    let layout = Layout::new(&config.root);
    layout.init()?;
    let host = Host::detect();
    let mount_options = probe::overlay_options(&config.mount_options, host);
    probe::check(layout.root(), &mount_options)?;
    info!(?host, options = ?mount_options, "overlayfs works on the root");
    let snapshotter = Snapshotter::open(
        layout,
        Options {
            mount_options,
            sync_remove: config.sync_remove,
            upperdir_label: config.upperdir_label,
        },
    )?;
    let reclaimed = snapshotter.recover()?;
    info!(
        directories = reclaimed.directories,
        "start-up recovery done"
    );
    Ok(snapshotter)
}

/// Binds the unix socket with mode 0660, replacing a stale socket file but never one that a
/// live process still answers on.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(|e| Error::io("creating the socket's directory", dir, e))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::AddressInUse(path.to_path_buf()));
            }
            info!(path = %path.display(), "replacing a stale socket");
            fs::remove_file(path).map_err(|e| Error::io("removing stale socket", path, e))?;
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
    let listener = UnixListener::bind(path).map_err(|e| Error::io("binding", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .map_err(|e| Error::io("setting mode 0660 on", path, e))?;
    Ok(listener)
}

/// Serves on `listener` until `shutdown` completes, then stops accepting, lets in-flight
/// requests finish for at most [`DRAIN`], and returns.
pub async fn serve(
    listener: UnixListener,
    snapshotter: Arc<Snapshotter>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(grpc::server(Arc::clone(&snapshotter)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);
    tokio::select! {
        res = &mut server => return finished(res),
        _ = shutdown => {}
    }
    info!("shutting down: no new connections, draining requests");
    snapshotter.close();
    let _ = stop_tx.send(());
    match tokio::time::timeout(DRAIN, &mut server).await {
        Ok(res) => finished(res),
        Err(_) => {
            warn!(after = ?DRAIN, "requests still running; exiting anyway");
            server.abort();
            Ok(())
        }
    }
}

fn finished(
    res: std::result::Result<
        std::result::Result<(), tonic::transport::Error>,
        tokio::task::JoinError,
    >,
) -> Result<()> {
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Internal(format!("gRPC server failed: {e}"))),
        Err(e) => Err(Error::Internal(format!("gRPC server task failed: {e}"))),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
}
