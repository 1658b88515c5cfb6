//! The only code that knows tonic and the wire types: request → domain call → response.
//! It decides nothing; every rule lives in `snapshot/`.

pub mod admin;
pub mod client;
pub mod diff;
mod list;
mod serving;

use std::{future::Future, sync::Arc};

use containerd_snapshots::api::{snapshots::v1::*, types};
use tonic::{Request, Response, Status};
use tracing::{debug, error, info_span, Instrument, Span};

use crate::{
    error::{Error, Result},
    overlay::Mount,
    snapshot::{self, Kind, Snapshotter},
};

/// containerd's Snapshots service, as build.rs generates it from the messages of
/// `containerd-snapshots`, with List's codec of lamina's own (see `list.rs`).
// The generated code makes each call's codec with `Default::default()`, List's unit struct too.
#[allow(clippy::default_constructed_unit_structs)]
mod generated {
    include!(concat!(
        env!("OUT_DIR"),
        "/containerd.services.snapshots.v1.Snapshots.rs"
    ));
}

use generated::snapshots_server::{Snapshots, SnapshotsServer};
pub use list::LIST_IDLE;
pub use serving::{serve, DRAIN, MAX_STREAMS_PER_CONNECTION};

/// Serves containerd's Snapshots API over a [`Snapshotter`].
pub struct Service {
    snapshotter: Arc<Snapshotter>,
    /// How long a List waits for its reader to take a message (see [`LIST_IDLE`]).
    list_idle: std::time::Duration,
}

/// google.protobuf.Empty, as prost decodes it (named for build.rs, which takes only paths).
pub type Empty = ();

/// The service as tonic serves it.
pub type SnapshotsApi = SnapshotsServer<Service>;

/// containerd's largest message (it sends and accepts up to 16 MiB on proxy connections).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The Snapshots service; a List whose reader takes no message for `list_idle` is ended.
pub fn server(snapshotter: Arc<Snapshotter>, list_idle: std::time::Duration) -> SnapshotsApi {
    SnapshotsServer::new(Service {
        snapshotter,
        list_idle,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Runs one request inside its span, logs how it ended and counts it in the metrics; errors
/// become statuses here only.
async fn traced<T>(
    rpc: &'static str,
    span: Span,
    fut: impl Future<Output = Result<T>>,
) -> Result<Response<T>, Status> {
    async move {
        debug!("request");
        let started = std::time::Instant::now();
        let result = fut.await;
        let code = result
            .as_ref()
            .map_or_else(Error::code, |_| tonic::Code::Ok);
        crate::metrics::global().request(rpc, &format!("{code:?}"), started.elapsed());
        match result {
            Ok(v) => Ok(Response::new(v)),
            Err(err) => {
                let status = Status::from(err);
                // ERROR means a human must look: only faults inside lamina, never bad requests.
                if matches!(status.code(), tonic::Code::Internal | tonic::Code::Unknown) {
                    error!(code = ?status.code(), "{}", status.message());
                } else {
                    debug!(code = ?status.code(), "{}", status.message());
                }
                Err(status)
            }
        }
    }
    .instrument(span)
    .await
}

fn namespace<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("containerd-namespace")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn wire_mounts(mounts: Vec<Mount>) -> Vec<types::Mount> {
    mounts
        .into_iter()
        .map(|m| types::Mount {
            r#type: m.r#type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

/// The wire's number for `kind`: containerd's, which lamina's kinds use already (a test
/// below holds them to the generated enum).
fn wire_kind(kind: Kind) -> i32 {
    kind.number() as i32
}

fn wire_info(info: snapshot::Info) -> Info {
    Info {
        name: info.name,
        parent: info.parent,
        kind: wire_kind(info.kind),
        created_at: Some(info.created.into()),
        updated_at: Some(info.updated.into()),
        labels: info.labels.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let span = info_span!("prepare", key = ?r.key, parent = ?r.parent, ns);
        let s = &self.snapshotter;
        traced("Prepare", span, async {
            let mounts = s
                .new_snapshot(Kind::Active, r.key, r.parent, r.labels)
                .await?;
            Ok(PrepareSnapshotResponse {
                mounts: wire_mounts(mounts),
            })
        })
        .await
    }

    async fn view(
        &self,
        req: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let span = info_span!("view", key = ?r.key, parent = ?r.parent, ns);
        let s = &self.snapshotter;
        traced("View", span, async {
            let mounts = s
                .new_snapshot(Kind::View, r.key, r.parent, r.labels)
                .await?;
            Ok(ViewSnapshotResponse {
                mounts: wire_mounts(mounts),
            })
        })
        .await
    }

    async fn mounts(
        &self,
        req: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let span = info_span!("mounts", key = ?r.key, ns);
        let s = &self.snapshotter;
        traced("Mounts", span, async {
            let mounts = s.mounts(r.key).await?;
            Ok(MountsResponse {
                mounts: wire_mounts(mounts),
            })
        })
        .await
    }

    async fn commit(&self, req: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let span = info_span!("commit", key = ?r.key, name = ?r.name, ns);
        let s = &self.snapshotter;
        traced("Commit", span, s.commit(r.name, r.key, r.labels)).await
    }

    async fn remove(&self, req: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let span = info_span!("remove", key = ?r.key, ns);
        traced("Remove", span, self.snapshotter.remove(r.key)).await
    }

    async fn stat(
        &self,
        req: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let span = info_span!("stat", key = ?r.key, ns);
        let s = &self.snapshotter;
        traced("Stat", span, async {
            let info = s.stat(r.key).await?;
            Ok(StatSnapshotResponse {
                info: Some(wire_info(info)),
            })
        })
        .await
    }

    async fn update(
        &self,
        req: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let key = r.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        let span = info_span!("update", key = ?key, ns);
        let s = &self.snapshotter;
        traced("Update", span, async {
            let info = r.info.ok_or_else(|| {
                Error::invalid("update needs the snapshot's info (name and labels)")
            })?;
            let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
            // Only the name and labels of an Update's info matter; the rest is ignored, as
            // containerd ignores it.
            let info = s.update(info.name, info.labels, paths).await?;
            Ok(UpdateSnapshotResponse {
                info: Some(wire_info(info)),
            })
        })
        .await
    }

    type ListStream = list::ListStream;

    /// Streams the snapshots matching the request's filters, encoded by `list.rs`.
    async fn list(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let span = info_span!("list", filters = ?r.filters, ns);
        let (s, idle) = (Arc::clone(&self.snapshotter), self.list_idle);
        traced("List", span, list::stream(s, r.filters, idle)).await
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let span = info_span!("usage", key = ?r.key, ns);
        let s = &self.snapshotter;
        traced("Usage", span, async {
            let u = s.usage(r.key).await?;
            Ok(UsageResponse {
                size: u.size,
                inodes: u.inodes,
            })
        })
        .await
    }

    async fn cleanup(&self, req: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        let ns = namespace(&req);
        let span = info_span!("cleanup", ns);
        let s = &self.snapshotter;
        traced("Cleanup", span, async {
            let deleted = s.cleanup().await?;
            tracing::info!(directories = deleted.directories, "cleanup done");
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_number_as_the_generated_enum_does() {
        use containerd_snapshots::api::snapshots::v1::Kind as Wire;
        for (kind, wire) in [
            (Kind::View, Wire::View),
            (Kind::Active, Wire::Active),
            (Kind::Committed, Wire::Committed),
        ] {
            assert_eq!(wire_kind(kind), wire as i32);
            assert_eq!(Kind::from_number(wire as u32), Some(kind));
        }
        assert_eq!(Kind::from_number(Wire::Unknown as u32), None);
    }
}
