//! One gRPC client for both snapshotters: containerd's generated `Snapshots` client over a unix
//! socket, optionally speaking to a containerd (then `snapshotter` picks the backend and the
//! `containerd-namespace` header is set).

use std::{collections::HashMap, path::PathBuf};

use containerd_snapshots::api::{
    snapshots::v1::{snapshots_client::SnapshotsClient, *},
    types::Mount,
};
use tonic::{metadata::MetadataValue, transport::Channel, Request};

/// Where a snapshotter is reached: its socket, the `snapshotter` field every request carries, and
/// the containerd namespace (only when the socket is containerd's).
#[derive(Clone, Debug)]
pub struct Target {
    /// Shown in messages: "lamina" or "overlay".
    pub label: String,
    pub socket: PathBuf,
    pub snapshotter: String,
    pub namespace: Option<String>,
}

impl Target {
    pub async fn client(&self) -> Client {
        let socket = self.socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://snapshotter.invalid")
            .expect("static URI")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                tokio::net::UnixStream::connect(socket.clone())
            }))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connecting to {} at {}: {e}",
                    self.label,
                    self.socket.display()
                )
            });
        Client {
            inner: SnapshotsClient::new(channel),
            target: self.clone(),
        }
    }

    /// `n` independent clients, each with its own connection.
    pub async fn clients(&self, n: usize) -> Vec<Client> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.client().await);
        }
        out
    }
}

#[derive(Clone)]
pub struct Client {
    inner: SnapshotsClient<Channel>,
    target: Target,
}

/// A failed call: which snapshotter, which call, what status. Benchmarks stop on the first one.
fn fail(target: &Target, what: &str, key: &str, status: tonic::Status) -> ! {
    panic!(
        "{}: {what} {key:?} failed: {:?}: {}",
        target.label,
        status.code(),
        status.message()
    )
}

impl Client {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(ns) = &self.target.namespace {
            let value: MetadataValue<_> = ns.parse().expect("namespace is ASCII");
            req.metadata_mut().insert("containerd-namespace", value);
        }
        req
    }

    fn sn(&self) -> String {
        self.target.snapshotter.clone()
    }

    pub async fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Vec<Mount> {
        let req = self.req(PrepareSnapshotRequest {
            snapshotter: self.sn(),
            key: key.into(),
            parent: parent.into(),
            labels,
        });
        match self.inner.prepare(req).await {
            Ok(r) => r.into_inner().mounts,
            Err(s) => fail(&self.target, "Prepare", key, s),
        }
    }

    pub async fn view(&mut self, key: &str, parent: &str) -> Vec<Mount> {
        let req = self.req(ViewSnapshotRequest {
            snapshotter: self.sn(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        });
        match self.inner.view(req).await {
            Ok(r) => r.into_inner().mounts,
            Err(s) => fail(&self.target, "View", key, s),
        }
    }

    pub async fn commit(&mut self, name: &str, key: &str, labels: HashMap<String, String>) {
        let req = self.req(CommitSnapshotRequest {
            snapshotter: self.sn(),
            name: name.into(),
            key: key.into(),
            labels,
        });
        if let Err(s) = self.inner.commit(req).await {
            fail(&self.target, "Commit", key, s)
        }
    }

    pub async fn remove(&mut self, key: &str) {
        let req = self.req(RemoveSnapshotRequest {
            snapshotter: self.sn(),
            key: key.into(),
        });
        if let Err(s) = self.inner.remove(req).await {
            fail(&self.target, "Remove", key, s)
        }
    }

    pub async fn stat(&mut self, key: &str) -> Info {
        let req = self.req(StatSnapshotRequest {
            snapshotter: self.sn(),
            key: key.into(),
        });
        match self.inner.stat(req).await {
            Ok(r) => r.into_inner().info.unwrap_or_else(|| {
                panic!("{}: Stat {key:?} answered without info", self.target.label)
            }),
            Err(s) => fail(&self.target, "Stat", key, s),
        }
    }

    /// Usage of `key`: (bytes, inodes).
    pub async fn usage(&mut self, key: &str) -> (i64, i64) {
        let req = self.req(UsageRequest {
            snapshotter: self.sn(),
            key: key.into(),
        });
        match self.inner.usage(req).await {
            Ok(r) => {
                let r = r.into_inner();
                (r.size, r.inodes)
            }
            Err(s) => fail(&self.target, "Usage", key, s),
        }
    }

    /// A Stat of a key that does not exist: true once the server answers it (NotFound), false
    /// on any other outcome (not serving yet).
    pub async fn answers(&mut self) -> bool {
        let req = self.req(StatSnapshotRequest {
            snapshotter: self.sn(),
            key: "lamina-bench-no-such-key".into(),
        });
        matches!(self.inner.stat(req).await, Err(s) if s.code() == tonic::Code::NotFound)
    }

    /// Lists every snapshot (no filter) and returns how many there are.
    pub async fn list_count(&mut self) -> usize {
        let req = self.req(ListSnapshotsRequest {
            snapshotter: self.sn(),
            filters: Vec::new(),
        });
        let mut stream = match self.inner.list(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => fail(&self.target, "List", "", s),
        };
        let mut n = 0;
        loop {
            match stream.message().await {
                Ok(Some(msg)) => n += msg.info.len(),
                Ok(None) => return n,
                Err(s) => fail(&self.target, "List (stream)", "", s),
            }
        }
    }

    pub async fn cleanup(&mut self) {
        let req = self.req(CleanupRequest {
            snapshotter: self.sn(),
        });
        if let Err(s) = self.inner.cleanup(req).await {
            fail(&self.target, "Cleanup", "", s)
        }
    }
}
