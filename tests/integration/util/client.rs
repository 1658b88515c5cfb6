//! containerd's generated client on lamina's socket, with the calls tests make, and what they
//! compare answers with.

use std::{collections::HashMap, path::Path};

use containerd_snapshots::api::snapshots::v1::{
    snapshots_client::SnapshotsClient, CleanupRequest, CommitSnapshotRequest, ListSnapshotsRequest,
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
    UpdateSnapshotRequest, UsageRequest, UsageResponse, ViewSnapshotRequest,
};
pub use containerd_snapshots::api::{snapshots::v1::Info, types::Mount};
use tonic::{
    transport::{Channel, Endpoint},
    Code, Status,
};

/// The kinds as the wire numbers them.
pub const VIEW: i32 = 1;
pub const ACTIVE: i32 = 2;
pub const COMMITTED: i32 = 3;

pub type Res<T> = Result<T, Status>;

/// A gRPC connection to lamina's unix socket, its endpoint first adjusted by `tune` (flow
/// control windows, for instance).
pub async fn channel_with(
    socket: &Path,
    tune: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    tune(Endpoint::try_from("http://lamina.invalid").unwrap())
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            tokio::net::UnixStream::connect(socket.clone())
        }))
        .await
}

/// A gRPC connection to lamina's unix socket.
pub async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    channel_with(socket, |e| e).await
}

/// containerd's generated client on lamina's socket, with the calls tests make.
#[derive(Clone)]
pub struct Client {
    pub inner: SnapshotsClient<Channel>,
    /// The connection, for other services on the same socket (admin, health).
    pub channel: Channel,
}

pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An `Info` for Update: the snapshot's name and labels, nothing else.
pub fn info(name: &str, labels: HashMap<String, String>) -> Info {
    Info {
        name: name.into(),
        labels,
        ..Info::default()
    }
}

impl Client {
    pub fn new(channel: Channel) -> Client {
        Client {
            inner: SnapshotsClient::new(channel.clone()),
            channel,
        }
    }

    pub async fn connect(socket: &Path) -> Client {
        Client::new(channel(socket).await.expect("connecting to lamina"))
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
        self.view_with(key, parent, HashMap::new()).await
    }

    pub async fn view_with(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Res<Vec<Mount>> {
        let req = ViewSnapshotRequest {
            snapshotter: "lamina".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
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

    /// Update with `info` and a field mask of `paths` (an empty mask when there are none).
    pub async fn update(&mut self, info: Info, paths: &[&str]) -> Res<Info> {
        let paths = paths.iter().map(|s| s.to_string()).collect();
        self.update_with(Some(info), Some(paths)).await
    }

    /// Update as a client may send it: `info` and the field mask each optional.
    pub async fn update_with(
        &mut self,
        info: Option<Info>,
        paths: Option<Vec<String>>,
    ) -> Res<Info> {
        let req = UpdateSnapshotRequest {
            snapshotter: "lamina".into(),
            info,
            update_mask: paths.map(|paths| prost_types::FieldMask { paths }),
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

/// Renders `s` as a containerd filter `"…"` literal, with Go escapes.
pub fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
