//! List, answered with messages lamina encodes itself.
//!
//! The generated server would want a `ListSnapshotsResponse` of owned `Info`s, each with a
//! `HashMap` of labels, built for every snapshot only to be encoded and dropped. containerd's
//! garbage collector lists every snapshot on each run, so on a node with many snapshots that
//! was most of what a List cost. Here each snapshot goes from the store's bytes to the wire's
//! bytes without an allocation of its own. The bytes are exactly what prost would encode for
//! the same `Info` (the tests decode them with the generated types).

use std::{sync::Arc, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use containerd_snapshots::api::snapshots::v1::ListSnapshotsRequest;
use futures::{stream::BoxStream, StreamExt};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, message, WireType};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    codec::{Codec, EncodeBuf, Encoder, ProstCodec},
    Status,
};
use tracing::{error, warn, Instrument};

use super::wire_kind;
use crate::{
    error::{chain, Error, Result as LaminaResult},
    snapshot::{self, ListSink, Listed, Snapshotter},
};

/// Batch size of List responses, as containerd's own server sends them.
const LIST_BATCH: usize = 100;
/// Most bytes of Info in one List message.
const LIST_BATCH_BYTES: usize = 4 << 20;
/// List messages ready ahead of the reader; beyond that the listing waits for it.
const LIST_QUEUE: usize = 2;
/// How long a listing waits for its reader to take a message before it gives up, unless
/// `LAMINA_LIST_IDLE_TIMEOUT_MS` says otherwise (see `server.rs`). A waiting listing holds a
/// thread, a read transaction (which keeps the store from reusing the pages it reads) and up
/// to [`LIST_QUEUE`] messages of up to 4 MiB. containerd reads its Lists as fast as they
/// come; a minute without taking anything means a client that is stuck or gone.
pub const LIST_IDLE: Duration = Duration::from_secs(60);

/// The messages of one List, as they are encoded, then the error that ended it early, if any.
pub type ListStream = BoxStream<'static, Result<Bytes, Status>>;

/// Starts listing the snapshots that match `filters` and returns the stream of encoded
/// messages; `idle`: how long the listing waits for its reader (see [`LIST_IDLE`]). A bad filter
/// fails the call itself; what fails later ends the stream.
pub(super) async fn stream(
    s: Arc<Snapshotter>,
    filters: Vec<String>,
    idle: Duration,
) -> LaminaResult<ListStream> {
    let filter = snapshot::parse_filters(&filters)?;
    let (tx, rx) = mpsc::channel(LIST_QUEUE);
    // The error that ends the stream, if any, comes after every message queued before it,
    // even when the queue is full: a listing that gives up on its reader could not queue it
    // there.
    let (end_tx, end_rx) = oneshot::channel::<Status>();
    let reader = tx.clone();
    let batches = Batches::new(tx, idle);
    tokio::spawn(
        async move {
            tokio::select! {
                listed = s.list(filter, batches) => {
                    if let Err(err) = listed {
                        ended_early(&err);
                        let _ = end_tx.send(Status::from(err));
                    }
                }
                // The reader left while the listing waited for its turn (or while it ran:
                // it then stops at its next message).
                _ = reader.closed() => {}
            }
        }
        .in_current_span(),
    );
    let end =
        futures::stream::once(end_rx).filter_map(|end| futures::future::ready(end.ok().map(Err)));
    Ok(ReceiverStream::new(rx).map(Ok).chain(end).boxed())
}

/// Logs why a List stream ended with an error, as `traced` logs a call's.
fn ended_early(err: &Error) {
    if matches!(err.code(), tonic::Code::Internal | tonic::Code::Unknown) {
        error!(error = %chain(err), "List ended early");
    } else {
        warn!(error = %chain(err), "List ended early");
    }
}

/// List's codec (see build.rs): reads the request as prost's codec does, writes messages that
/// are already encoded.
#[derive(Default)]
pub struct ListCodec;

impl Codec for ListCodec {
    type Encode = Bytes;
    type Decode = ListSnapshotsRequest;
    type Encoder = Encoded;
    type Decoder = <ProstCodec<ListSnapshotsRequest, ListSnapshotsRequest> as Codec>::Decoder;

    fn encoder(&mut self) -> Encoded {
        Encoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<ListSnapshotsRequest, ListSnapshotsRequest>::default().decoder()
    }
}

pub struct Encoded;

impl Encoder for Encoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

/// Cuts a List into encoded `ListSnapshotsResponse`s as it is read: batches of 100 as
/// containerd sends them, cut earlier when large labels would push a message towards the
/// 16 MiB limit. Runs on the listing's blocking thread, which waits when the reader is
/// [`LIST_QUEUE`] messages behind, and gives up when the reader has taken nothing for `idle`.
struct Batches {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
    count: usize,
    idle: Duration,
    /// To wait for the reader with a deadline from the listing's thread.
    runtime: tokio::runtime::Handle,
}

impl Batches {
    /// Call inside the runtime.
    fn new(tx: mpsc::Sender<Bytes>, idle: Duration) -> Self {
        Batches {
            tx,
            buf: BytesMut::new(),
            count: 0,
            idle,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Sends the batch; false once the reader has gone.
    fn flush(&mut self) -> LaminaResult<bool> {
        // The next message is likely about as long as this one.
        let next = BytesMut::with_capacity(self.buf.len());
        let msg = std::mem::replace(&mut self.buf, next).freeze();
        self.count = 0;
        // Most messages find room at once; only a reader behind needs the deadline's timer.
        let msg = match self.tx.try_send(msg) {
            Ok(()) => return Ok(true),
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(false),
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
        };
        let sent = self
            .runtime
            .block_on(tokio::time::timeout(self.idle, self.tx.send(msg)));
        match sent {
            Ok(sent) => Ok(sent.is_ok()),
            Err(_) => Err(Error::TimedOut(format!(
                "List stopped: its reader took no message for {:?}, lamina's limit; list \
                 again and read the stream as it comes",
                self.idle
            ))),
        }
    }
}

impl ListSink for Batches {
    fn push(&mut self, l: &Listed<'_>) -> LaminaResult<bool> {
        let len = info_len(l);
        if self.count > 0
            && (self.count == LIST_BATCH || self.buf.len() + framed_len(1, len) > LIST_BATCH_BYTES)
            && !self.flush()?
        {
            return Ok(false);
        }
        put_info(1, l, len, &mut self.buf);
        self.count += 1;
        Ok(true)
    }

    /// Sends the last, partial batch.
    fn finish(&mut self) -> LaminaResult<()> {
        if self.count > 0 {
            self.flush()?;
        }
        Ok(())
    }
}

// containerd's `Info`: 1 name, 2 parent, 3 kind, 4 created_at, 5 updated_at, 6 labels (a map,
// i.e. repeated entries of 1 key, 2 value). As prost does, fields holding their default value
// (an empty string) are left out, and the timestamps are always present.

/// Bytes of a length-delimited field: its key, its length and its body.
fn framed_len(tag: u32, body: usize) -> usize {
    key_len(tag) + encoded_len_varint(body as u64) + body
}

fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        framed_len(tag, s.len())
    }
}

fn put_str(tag: u32, s: &str, buf: &mut BytesMut) {
    if !s.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(s.len() as u64, buf);
        buf.put_slice(s.as_bytes());
    }
}

fn entry_len(k: &str, v: &str) -> usize {
    str_len(1, k) + str_len(2, v)
}

fn timestamps(l: &Listed<'_>) -> [(u32, prost_types::Timestamp); 2] {
    [(4, l.created.into()), (5, l.updated.into())]
}

/// Bytes of an `Info`'s body.
fn info_len(l: &Listed<'_>) -> usize {
    let mut len = str_len(1, l.name) + str_len(2, l.parent);
    len += key_len(3) + encoded_len_varint(wire_kind(l.kind) as u64);
    for (tag, t) in timestamps(l) {
        len += message::encoded_len(tag, &t);
    }
    for (k, v) in l.labels() {
        len += framed_len(6, entry_len(k, v));
    }
    len
}

/// Writes `l` as field `tag` of the message in `buf`, `len` being its [`info_len`].
fn put_info(tag: u32, l: &Listed<'_>, len: usize, buf: &mut BytesMut) {
    buf.reserve(framed_len(tag, len));
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
    put_str(1, l.name, buf);
    put_str(2, l.parent, buf);
    encode_key(3, WireType::Varint, buf);
    encode_varint(wire_kind(l.kind) as u64, buf);
    for (tag, t) in timestamps(l) {
        message::encode(tag, &t, buf);
    }
    for (k, v) in l.labels() {
        encode_key(6, WireType::LengthDelimited, buf);
        encode_varint(entry_len(k, v) as u64, buf);
        put_str(1, k, buf);
        put_str(2, v, buf);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use containerd_snapshots::api::snapshots::v1::{Info, ListSnapshotsResponse};
    use prost::Message;

    use super::*;
    use crate::{
        dirs::Layout,
        snapshot::{Kind, Options, UPPERDIR_LABEL},
    };

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Decodes List's messages with the generated types and compares them with what Stat
    /// answers through them: same snapshots, fields and labels (the upperdir label included, a
    /// stored label of the same name replaced), in batches of 100.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn list_encodes_what_stat_reports_in_batches_of_100() {
        let tmp = tempfile::tempdir().unwrap();
        let options = Options {
            upperdir_label: true,
            ..Options::default()
        };
        let s = Snapshotter::open(Layout::new(tmp.path().join("root")), options).unwrap();
        let many: Vec<(String, String)> = (0..40)
            .map(|i| (format!("label/{i}"), "v".repeat(i * 7)))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let shapes: [&[(&str, &str)]; 4] = [
            &[],
            &[("k", "v"), ("é/ü", "日本"), (UPPERDIR_LABEL, "stored")],
            &many,
            &[("containerd.io/snapshot.ref", "sha256:0123")],
        ];
        let mut keys = Vec::new();
        let mut parent = String::new();
        for i in 0..250 {
            let key = format!("k/{i:03}");
            let l = labels(shapes[i % shapes.len()]);
            s.new_snapshot(Kind::Active, key.clone(), parent.clone(), l.clone())
                .await
                .unwrap();
            if i % 3 == 0 {
                // Committed snapshots become the parents of those that follow.
                let name = format!("c/{i:03}");
                s.commit(name.clone(), key, l).await.unwrap();
                parent = name.clone();
                keys.push(name);
            } else if i % 3 == 1 {
                s.new_snapshot(Kind::View, format!("v/{i:03}"), parent.clone(), l)
                    .await
                    .unwrap();
                keys.push(format!("v/{i:03}"));
                keys.push(key);
            } else {
                keys.push(key);
            }
        }
        keys.sort();
        // Updated later than created, so that the two timestamps differ.
        for key in keys.iter().step_by(7) {
            let updated = labels(&[("updated", "1")]);
            s.update(key.clone(), updated, vec!["labels.updated".into()])
                .await
                .unwrap();
        }

        let (tx, mut rx) = mpsc::channel(keys.len());
        let batches = Batches::new(tx, LIST_IDLE);
        let filter = snapshot::parse_filters(&[]).unwrap();
        s.list(filter, batches).await.unwrap();
        let (mut sizes, mut listed) = (Vec::new(), Vec::new());
        while let Some(bytes) = rx.recv().await {
            let msg = ListSnapshotsResponse::decode(bytes.clone()).unwrap();
            // Byte for byte as long as prost's own encoding: nothing repeated or left over.
            assert_eq!(bytes.len(), msg.encoded_len());
            sizes.push(msg.info.len());
            listed.extend(msg.info);
        }

        let mut expected: Vec<Info> = Vec::new();
        for key in &keys {
            expected.push(super::super::wire_info(s.stat(key.clone()).await.unwrap()));
        }
        let full = keys.len() / LIST_BATCH;
        let mut want = vec![LIST_BATCH; full];
        want.push(keys.len() % LIST_BATCH);
        assert_eq!(sizes, want);
        assert_eq!(listed.len(), expected.len());
        for (got, want) in listed.iter().zip(&expected) {
            assert_eq!(got, want);
        }
        let upper = &listed[0].labels[UPPERDIR_LABEL];
        assert!(upper.ends_with("/fs"), "{upper}");
        assert!(listed.iter().any(|i| i.created_at != i.updated_at));
    }
}
