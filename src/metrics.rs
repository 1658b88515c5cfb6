//! Prometheus metrics: what is recorded where, and the optional scrape endpoint.
//!
//! Recording is cheap (atomics) and always on; the endpoint exists only when `metrics_address`
//! is configured.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tracing::info;

use crate::{
    config::Address,
    error::{Error, Result},
};

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    snapshots: Family<Labels, Gauge>,
    store_commit: Histogram,
    deleted_dirs: Counter,
    deleted_bytes: Counter,
    registry: Registry,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            snapshots: Family::default(),
            store_commit: latency_histogram(),
            deleted_dirs: Counter::default(),
            deleted_bytes: Counter::default(),
            registry: Registry::with_prefix("lamina"),
        };
        // Each metric: its field, its name (under `lamina_`) and its help. The two "reclaimed"
        // names are lamina's since its first metrics; dashboards know them so.
        macro_rules! register {
            ($($metric:expr => $name:literal, $help:literal;)*) => {
                $(m.registry.register($name, $help, $metric.clone());)*
            };
        }
        register! {
            m.requests => "requests", "Requests by RPC and gRPC code";
            m.latency => "request_duration_seconds", "Request latency by RPC";
            m.snapshots => "snapshots", "Snapshots by kind";
            m.store_commit => "store_commit_duration_seconds",
                "Latency of durable store transactions";
            m.deleted_dirs => "cleanup_reclaimed_directories",
                "Snapshot directories deleted (after Remove, by Cleanup, by recovery)";
            m.deleted_bytes => "cleanup_reclaimed_bytes",
                "Bytes freed by deleting snapshot directories (after Remove, by Cleanup, by recovery)";
        }
        m
    }

    /// A request answered with gRPC status `code` (its name, e.g. `NotFound`).
    pub fn request(&self, rpc: &'static str, code: &str, took: Duration) {
        let code = code.to_string();
        self.requests
            .get_or_create(&vec![("rpc", rpc.to_string()), ("code", code)])
            .inc();
        self.latency
            .get_or_create(&vec![("rpc", rpc.to_string())])
            .observe(took.as_secs_f64());
    }

    pub fn store_commit(&self, took: Duration) {
        self.store_commit.observe(took.as_secs_f64());
    }

    pub fn deleted(&self, bytes: u64) {
        self.deleted_dirs.inc();
        self.deleted_bytes.inc_by(bytes);
    }

    /// The text exposition, with `snapshots` (kind, count) as they are now.
    pub fn render(&self, snapshots: &[(&str, u64)]) -> String {
        for &(kind, n) in snapshots {
            self.snapshots
                .get_or_create(&vec![("kind", kind.to_string())])
                .set(n as i64);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Snapshots by kind as they are now, for each scrape: (kind, count).
pub type SnapshotCounts = Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

/// Binds `address` now and returns the server of `GET /metrics`, to run until the process ends.
/// Binding up front makes an unusable address fail start-up, where an operator sees it, instead
/// of a background task that logs one line and leaves lamina serving without its metrics.
pub fn bind(
    address: Address,
    counts: SnapshotCounts,
) -> Result<futures::future::BoxFuture<'static, Result<()>>> {
    use hyper::{
        service::{make_service_fn, service_fn},
        Body, Request, Response, StatusCode,
    };
    let handle = move |req: Request<Body>| {
        // The counts are kept by the store's writes: a scrape reads no snapshot.
        let body = (req.uri().path() == "/metrics").then(|| global().render(&counts()));
        async move {
            let resp = if let Some(body) = body {
                Response::builder()
                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                    .body(Body::from(body))
            } else {
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(Body::from("try /metrics\n"))
            };
            Ok::<_, std::convert::Infallible>(resp.expect("a valid response"))
        }
    };
    // One service per connection; the connection types differ, so each listener gets its own.
    macro_rules! make {
        ($conn:ty) => {
            make_service_fn(move |_: &$conn| {
                let handle = handle.clone();
                async move { Ok::<_, std::convert::Infallible>(service_fn(handle)) }
            })
        };
    }
    let server: futures::future::BoxFuture<'static, hyper::Result<()>> = match address {
        Address::Tcp(addr) => {
            let server = hyper::Server::try_bind(&addr)
                .map_err(|e| Error::Config(format!("metrics_address {addr}: {e}")))?;
            info!(%addr, "metrics endpoint");
            Box::pin(server.serve(make!(hyper::server::conn::AddrStream)))
        }
        Address::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).map_err(|e| {
                Error::Config(format!("metrics_address unix:{}: {e}", path.display()))
            })?;
            info!(path = %path.display(), "metrics endpoint");
            let incoming = hyper::server::accept::from_stream(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
            );
            Box::pin(hyper::Server::builder(incoming).serve(make!(tokio::net::UnixStream)))
        }
    };
    Ok(Box::pin(async move {
        server
            .await
            .map_err(|e| Error::Internal(format!("metrics endpoint failed: {e}")))
    }))
}
