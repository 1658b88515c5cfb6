//! The gRPC server: lamina's services on one listener, with the limits that keep one client from
//! holding more than its share, and the drain at shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use futures::Stream;
use tokio::net::UnixStream;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use super::admin::{Admin, AdminServer};
use crate::error::{Error, Result};

/// How long in-flight requests may run on after a shutdown signal before lamina exits anyway.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Most HTTP/2 streams (requests) open at once on one connection; the client is told so, and a
/// stream beyond it is refused (REFUSED_STREAM, which a client may retry). containerd sends all
/// its requests over one connection, and grpc-go waits for a free stream rather than fail when
/// the server's limit is reached, so the cap must sit far above what containerd has in flight:
/// requests to a snapshotter come from image unpacks (a few layers at a time) and container
/// starts (a Prepare and a Mounts each, at most a pod's worth per kubelet worker), a few
/// hundred at the very most on a node of 110 pods all starting together. 1024 leaves that
/// room several times over while bounding what one connection can have lamina hold.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// HTTP/2 pings on a connection with nothing read for this long; one not answered within
/// [`KEEPALIVE_TIMEOUT`] closes the connection, ending its requests. A peer that dies closes
/// its socket and the kernel tells lamina, but a frozen one (stopped, hung, or gone without
/// its socket closing) would otherwise hold its streams, a List's thread among them, for
/// ever. grpc-go answers pings by itself, whatever its application is doing.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Deadlines on clients, from the environment when set there, for tests (which cannot wait
/// minutes) and for an operator chasing a problem. They are not config-file keys: no
/// deployment should need to change them.
struct ClientDeadlines {
    /// `LAMINA_LIST_IDLE_TIMEOUT_MS`: see [`super::LIST_IDLE`].
    list_idle: Duration,
    /// `LAMINA_KEEPALIVE_MS`: the keepalive interval and timeout both.
    keepalive: (Duration, Duration),
}

impl ClientDeadlines {
    fn from_env() -> ClientDeadlines {
        let ms = |name: &str| {
            let value = std::env::var(name).ok()?;
            match value.parse::<u64>() {
                Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
                _ => {
                    warn!(%name, %value, "ignored: not a positive number of milliseconds");
                    None
                }
            }
        };
        let deadlines = ClientDeadlines {
            list_idle: ms("LAMINA_LIST_IDLE_TIMEOUT_MS").unwrap_or(super::LIST_IDLE),
            keepalive: ms("LAMINA_KEEPALIVE_MS")
                .map_or((KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT), |d| (d, d)),
        };
        if deadlines.list_idle != super::LIST_IDLE
            || deadlines.keepalive != (KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        {
            info!(list_idle = ?deadlines.list_idle, keepalive = ?deadlines.keepalive, "client deadlines from the environment");
        }
        deadlines
    }
}

/// Serves lamina's gRPC services (Snapshots, Diff, admin, health) on the connections `incoming`
/// yields until `shutdown` completes, then stops accepting, lets in-flight requests finish for
/// at most [`DRAIN`], and returns.
pub async fn serve<S>(
    incoming: S,
    admin: Arc<Admin>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()>
where
    S: Stream<Item = std::io::Result<UnixStream>> + Send + 'static,
{
    let snapshotter = Arc::clone(&admin.snapshotter);
    let containerd = admin.config.containerd_address.clone();
    // Health: SERVING from here (recovery is done), NOT_SERVING once shutdown starts.
    let (mut health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health.set_serving::<super::SnapshotsApi>().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let deadlines = ClientDeadlines::from_env();
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(deadlines.keepalive.0))
        .http2_keepalive_timeout(Some(deadlines.keepalive.1))
        .add_service(health_service)
        .add_service(AdminServer::new(admin))
        .add_service(super::server(Arc::clone(&snapshotter), deadlines.list_idle))
        .add_service(super::diff::server(Arc::clone(&snapshotter), containerd))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);
    tokio::select! {
        res = &mut server => return finished(res),
        _ = shutdown => {}
    }
    info!("shutting down: no new connections, draining requests");
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health.set_not_serving::<super::SnapshotsApi>().await;
    snapshotter.close();
    let _ = stop_tx.send(());
    match tokio::time::timeout(DRAIN, &mut server).await {
        Ok(res) => finished(res),
        Err(_) => {
            warn!(after = ?DRAIN, "requests or connections still open; exiting anyway");
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
