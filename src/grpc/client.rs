//! Clients of a running lamina, for the operator commands.

use std::path::Path;

use containerd_snapshots::api::snapshots::v1::{
    snapshots_client::SnapshotsClient, ListSnapshotsRequest, MountsRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::admin::proto::admin_client::AdminClient;
use crate::{
    error::{Error, Result},
    overlay::Mount,
};

/// Connects to the unix socket at `socket`.
pub async fn connect(socket: &Path) -> Result<Channel> {
    let path = socket.to_path_buf();
    Endpoint::try_from("http://lamina.sock")
        .map_err(|e| Error::Internal(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(path.clone())
        }))
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot reach lamina at {}: {e}; is it running (`systemctl status lamina`)?",
                socket.display()
            ))
        })
}

pub fn admin(channel: Channel) -> AdminClient<Channel> {
    AdminClient::new(channel)
}

/// The mounts of snapshot `key`, as containerd would get them.
pub async fn mounts(channel: Channel, key: &str) -> Result<Vec<Mount>> {
    let resp = SnapshotsClient::new(channel)
        .mounts(MountsRequest {
            snapshotter: "lamina".into(),
            key: key.into(),
        })
        .await
        .map_err(remote)?;
    Ok(resp
        .into_inner()
        .mounts
        .into_iter()
        .map(|m| Mount {
            r#type: m.r#type,
            source: m.source,
            options: m.options,
        })
        .collect())
}

/// The keys of every snapshot, as containerd stores them (`<namespace>/<n>/<name>`).
pub async fn keys(channel: Channel) -> Result<Vec<String>> {
    let mut stream = SnapshotsClient::new(channel)
        .list(ListSnapshotsRequest {
            snapshotter: "lamina".into(),
            filters: Vec::new(),
        })
        .await
        .map_err(remote)?
        .into_inner();
    let mut keys = Vec::new();
    while let Some(batch) = stream.message().await.map_err(remote)? {
        keys.extend(batch.info.into_iter().map(|i| i.name));
    }
    Ok(keys)
}

/// A status the daemon answered with, as an error the command line prints.
pub fn remote(status: tonic::Status) -> Error {
    Error::Remote(format!(
        "lamina answered {:?}: {}",
        status.code(),
        status.message()
    ))
}
