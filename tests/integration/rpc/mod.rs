//! Each RPC's semantics and error codes, filters, and concurrency.
//!
//! Every test runs the real daemon and checks what containerd's own overlay snapshotter (and
//! the metadata store behind it) would answer: the gRPC code containerd turns back into an
//! errdefs error, and the state left behind. `calls`: each RPC on its own; `list`: List and
//! its filters; `concurrency`: requests that race; `life`: the daemon's socket, start and stop.

mod calls;
mod concurrency;
mod diff;
mod life;
mod list;

use std::{
    collections::{BTreeSet, HashMap},
    os::unix::{
        fs::{FileTypeExt, MetadataExt, PermissionsExt},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, SystemTime},
};

use containerd_snapshots::api::snapshots::v1::ListSnapshotsRequest;
use tonic::Code;

use crate::util::*;

const GC_ROOT: &str = "containerd.io/gc.root";

fn time(ts: &Option<prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from(ts.clone().expect("timestamp set")).expect("valid timestamp")
}

/// Prepares `<name>-tmp` on `parent` and commits it as `name` with `labels`; returns the
/// committed snapshot's `fs` directory.
async fn commit_new(
    c: &mut Client,
    name: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> PathBuf {
    let tmp = format!("{name}-tmp");
    let mounts = c.prepare(&tmp, parent).await.unwrap();
    c.commit_with(name, &tmp, labels).await.unwrap();
    own_fs(&mounts)
}

fn names(v: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

/// `st_blocks * 512` of one path.
fn bytes_of(path: &Path) -> i64 {
    std::fs::symlink_metadata(path).unwrap().blocks() as i64 * 512
}
