//! containerd's Diff service (lamina's differ): Apply writes an image layer into a snapshot
//! lamina prepared, reading the layer's blob from containerd's content store; Diff (computing a
//! layer from two trees) is containerd's own differ's job and answers Unimplemented.
//!
//! containerd calls Apply with the caller's namespace in the `containerd-namespace` header and
//! with the mounts lamina answered for the snapshot; the blob is read in that namespace over
//! containerd's socket (`containerd_address`), streamed into the snapshotter's apply (which
//! checks the mounts are lamina's own) without holding it.

use std::{
    collections::HashMap,
    io::{self, Read},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use containerd_client::{
    services::v1::{
        content_client::ContentClient, ApplyResponse, DiffRequest, DiffResponse, ReadContentRequest,
    },
    types::{Descriptor, Mount as WireMount},
};
use tonic::{
    transport::{Channel, Endpoint, Uri},
    Request, Response, Status,
};
use tracing::info_span;

use super::{namespace, traced};
use crate::{
    error::{Error, Result},
    layer,
    overlay::Mount,
    snapshot::Snapshotter,
};

/// containerd's ApplyRequest as containerd 2.x sends it: `containerd-client`'s protos end at
/// field 3, and `sync_fs` (4) came with 2.0.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ApplyRequest {
    #[prost(message, optional, tag = "1")]
    pub diff: Option<Descriptor>,
    #[prost(message, repeated, tag = "2")]
    pub mounts: Vec<WireMount>,
    #[prost(map = "string, message", tag = "3")]
    pub payloads: HashMap<String, prost_types::Any>,
    #[prost(bool, tag = "4")]
    pub sync_fs: bool,
}

#[allow(clippy::default_constructed_unit_structs)]
mod generated {
    include!(concat!(
        env!("OUT_DIR"),
        "/containerd.services.diff.v1.Diff.rs"
    ));
}

use generated::diff_server::Diff;
pub use generated::diff_server::DiffServer;

/// Blob chunks in flight between containerd's stream and the thread that decompresses.
const IN_FLIGHT: usize = 4;

pub struct Service {
    snapshotter: Arc<Snapshotter>,
    containerd: PathBuf,
    /// containerd's connection, made at the first Apply and kept (tonic reconnects it).
    channel: Channel,
}

/// The Diff service; layers are read from the containerd at `containerd`.
pub fn server(snapshotter: Arc<Snapshotter>, containerd: PathBuf) -> DiffServer<Service> {
    let path = containerd.clone();
    let channel = Endpoint::from_static("http://containerd.sock").connect_with_connector_lazy(
        tower::service_fn(move |_: Uri| tokio::net::UnixStream::connect(path.clone())),
    );
    DiffServer::new(Service {
        snapshotter,
        containerd,
        channel,
    })
    .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(super::MAX_MESSAGE_BYTES)
}

/// The blob's bytes as a `Read` for the blocking thread, fed by containerd's stream.
struct Incoming {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    chunk: bytes::Bytes,
    /// Set by the feeding task when containerd's stream failed.
    failed: Arc<Mutex<Option<Error>>>,
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                None => {
                    return match self.failed.lock().expect("not poisoned").as_ref() {
                        Some(e) => Err(io::Error::other(e.to_string())),
                        None => Ok(0),
                    }
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

impl Service {
    /// Starts reading `digest` from containerd's content store in namespace `ns`.
    fn read_blob(&self, ns: &str, digest: &str) -> Result<Incoming> {
        let ns_value = ns.parse().map_err(|_| {
            Error::InvalidArgument(format!("namespace {ns:?} cannot be sent as a header"))
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
        let failed = Arc::new(Mutex::new(None));
        let failure = Arc::clone(&failed);
        let mut client = ContentClient::new(self.channel.clone())
            .max_decoding_message_size(super::MAX_MESSAGE_BYTES);
        let containerd = self.containerd.clone();
        let digest = digest.to_string();
        tokio::spawn(async move {
            let mut req = Request::new(ReadContentRequest {
                digest: digest.clone(),
                offset: 0,
                size: 0,
            });
            req.metadata_mut().insert("containerd-namespace", ns_value);
            let fail = |status: Status| {
                let what = format!(
                    "reading layer {digest} from containerd's content store at {}: {}",
                    containerd.display(),
                    status.message()
                );
                let e = match status.code() {
                    tonic::Code::NotFound => Error::NotFound(what),
                    tonic::Code::Unavailable | tonic::Code::Unknown => Error::Unavailable(format!(
                        "{what}; lamina's differ reads layers from containerd at the \
                         containerd_address of its config"
                    )),
                    _ => Error::FailedPrecondition(what),
                };
                *failure.lock().expect("not poisoned") = Some(e);
            };
            let mut stream = match client.read(req).await {
                Ok(r) => r.into_inner(),
                Err(status) => return fail(status),
            };
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        if tx.send(bytes::Bytes::from(msg.data)).await.is_err() {
                            return; // the apply stopped reading
                        }
                    }
                    Ok(None) => return,
                    Err(status) => return fail(status),
                }
            }
        });
        Ok(Incoming {
            rx,
            chunk: bytes::Bytes::new(),
            failed,
        })
    }
}

#[tonic::async_trait]
impl Diff for Service {
    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let desc = r.diff.unwrap_or_default();
        let span = info_span!("apply", digest = ?desc.digest, ns);
        traced("Apply", span, async {
            if ns.is_empty() {
                return Err(Error::FailedPrecondition(
                    "Apply came without containerd's namespace header (containerd-namespace): \
                     lamina reads the layer from containerd's content store in the caller's \
                     namespace and will not guess it"
                        .into(),
                ));
            }
            if !r.payloads.is_empty() {
                let kinds: Vec<&String> = r.payloads.keys().collect();
                return Err(Error::Unimplemented(format!(
                    "stream processor payloads ({kinds:?}, e.g. for encrypted layers): lamina's \
                     differ does not run stream processors; use containerd's own differ"
                )));
            }
            let size = u64::try_from(desc.size).map_err(|_| {
                Error::InvalidArgument(format!("layer size {} is negative", desc.size))
            })?;
            // Checked before anything is read, so a wrong request costs no transfer.
            layer::compression(&desc.media_type)?;
            let mounts: Vec<Mount> = r
                .mounts
                .into_iter()
                .map(|m| Mount {
                    r#type: m.r#type,
                    source: m.source,
                    options: m.options,
                })
                .collect();
            let target = self.snapshotter.layer_target(&mounts).await?;
            let input = self.read_blob(&ns, &desc.digest)?;
            let failed = Arc::clone(&input.failed);
            let blob = layer::Blob {
                media_type: desc.media_type.clone(),
                digest: desc.digest.clone(),
                size,
            };
            let applied = self
                .snapshotter
                .apply(target, blob, input, r.sync_fs)
                .await
                .map_err(|e| {
                    // containerd's own error, when its stream is what failed, says more.
                    failed.lock().expect("not poisoned").take().unwrap_or(e)
                })?;
            Ok(ApplyResponse {
                applied: Some(Descriptor {
                    media_type: layer::LAYER_TAR.into(),
                    digest: applied.digest,
                    size: applied.size as i64,
                    annotations: HashMap::new(),
                }),
            })
        })
        .await
    }

    async fn diff(&self, req: Request<DiffRequest>) -> Result<Response<DiffResponse>, Status> {
        let ns = namespace(&req);
        let span = info_span!("diff", ns);
        traced("Diff", span, async {
            Err::<DiffResponse, _>(Error::Unimplemented(
                "lamina's differ only applies layers; computing one (Diff) is containerd's own \
                 differ's job: list it after lamina's (containerd's walking differ)"
                    .into(),
            ))
        })
        .await
    }
}
