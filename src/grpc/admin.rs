//! lamina's admin API (proto/lamina/admin/v1/admin.proto): Status and Fsck.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};
use tracing::info_span;

use super::traced;
use crate::{
    config::Config,
    overlay::probe::Feature,
    snapshot::{fsck, Snapshotter},
};

pub mod proto {
    tonic::include_proto!("lamina.admin.v1");
}

pub use proto::admin_server::AdminServer;

/// What the admin API reports beyond the snapshotter itself, fixed at start-up.
pub struct Admin {
    pub snapshotter: Arc<Snapshotter>,
    pub config: Config,
    pub features: Vec<Feature>,
    pub mount_options: Vec<String>,
    pub started: Instant,
}

fn wire_finding(f: fsck::Finding) -> proto::Finding {
    proto::Finding {
        kind: f.kind.as_str().into(),
        key: f.key,
        path: f.path.display().to_string(),
        detail: f.detail,
        action: f.action,
        repaired: f.repaired,
        bytes: f.bytes,
    }
}

pub fn wire_report(r: fsck::Report) -> proto::FsckResponse {
    proto::FsckResponse {
        findings: r.findings.into_iter().map(wire_finding).collect(),
        snapshots_checked: r.snapshots_checked,
        directories_checked: r.directories_checked,
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for Arc<Admin> {
    async fn status(
        &self,
        _req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let this = Arc::clone(self);
        traced("Status", info_span!("status"), async move {
            let counts = this.snapshotter.counts();
            let store_bytes = std::fs::metadata(this.snapshotter.layout().db_path())
                .map(|m| m.len())
                .unwrap_or(0);
            Ok(proto::StatusResponse {
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_seconds: this.started.elapsed().as_secs(),
                root: this.config.root.display().to_string(),
                features: this
                    .features
                    .iter()
                    .map(|f| proto::Feature {
                        name: f.name.into(),
                        supported: f.supported,
                        detail: f.detail.clone(),
                    })
                    .collect(),
                mount_options: this.mount_options.clone(),
                config_toml: this.config.to_toml(),
                active: counts.active,
                views: counts.views,
                committed: counts.committed,
                store_bytes,
            })
        })
        .await
    }

    async fn fsck(
        &self,
        req: Request<proto::FsckRequest>,
    ) -> Result<Response<proto::FsckResponse>, Status> {
        let r = req.into_inner();
        let repair = fsck::Repair {
            safe: r.repair,
            unknown: r.repair && r.delete_unknown,
        };
        let s = Arc::clone(&self.snapshotter);
        traced("Fsck", info_span!("fsck", ?repair), async move {
            let report = s.run(move |s| s.fsck(repair)).await?;
            Ok(wire_report(report))
        })
        .await
    }
}
