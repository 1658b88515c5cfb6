//! How a [`Record`] is stored: a protobuf message (schema 2), written and read with prost,
//! which lamina already links for gRPC. Schema 1 stored JSON; it is read only to migrate, which
//! [`migrate_v1`] does when a schema-1 store is opened.
//!
//! Why not JSON any more: List decodes every record, and JSON parsing was most of its cost.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use prost::{
    encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType},
    Message,
};

use redb::ReadableTable;

use super::{Kind, Record};
use crate::error::{Error, Result};
use crate::overlay::Usage;

#[derive(Clone, PartialEq, Message)]
struct Stored {
    #[prost(uint64, tag = "1")]
    id: u64,
    /// 1 view, 2 active, 3 committed (containerd's numbering).
    #[prost(uint32, tag = "2")]
    kind: u32,
    #[prost(string, tag = "3")]
    parent: String,
    #[prost(uint64, repeated, tag = "4")]
    parent_ids: Vec<u64>,
    #[prost(btree_map = "string, string", tag = "5")]
    labels: BTreeMap<String, String>,
    /// Nanoseconds since the Unix epoch.
    #[prost(uint64, tag = "6")]
    created: u64,
    #[prost(uint64, tag = "7")]
    updated: u64,
    #[prost(int64, tag = "8")]
    size: i64,
    #[prost(int64, tag = "9")]
    inodes: i64,
}

fn nanos(t: SystemTime) -> u64 {
    // Times before 1970 do not occur (they come from the clock at creation); clamp, not panic.
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn time(nanos: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
}

pub(super) fn encode(record: &Record) -> Vec<u8> {
    Stored {
        id: record.id,
        kind: record.kind.number(),
        parent: record.parent.clone(),
        parent_ids: record.parent_ids.clone(),
        labels: record.labels.clone(),
        created: nanos(record.created),
        updated: nanos(record.updated),
        size: record.usage.size,
        inodes: record.usage.inodes,
    }
    .encode_to_vec()
}

pub(super) fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    let unreadable =
        |why: String| Error::Internal(format!("record of snapshot {key:?} is unreadable: {why}"));
    let s = Stored::decode(bytes).map_err(|e| unreadable(e.to_string()))?;
    let kind =
        Kind::from_number(s.kind).ok_or_else(|| unreadable(format!("unknown kind {}", s.kind)))?;
    Ok(Record {
        id: s.id,
        kind,
        parent: s.parent,
        parent_ids: s.parent_ids,
        labels: s.labels,
        created: time(s.created),
        updated: time(s.updated),
        usage: Usage {
            size: s.size,
            inodes: s.inodes,
        },
    })
}

/// A stored record read in place: its strings borrow the stored bytes. List reads every
/// record, and decoding each into owned strings and maps was most of what a List cost.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub id: u64,
    pub kind: Kind,
    /// The parent's key, or empty.
    pub parent: &'a str,
    pub labels: Labels<'a>,
    pub created: SystemTime,
    pub updated: SystemTime,
}

/// The labels of a [`RecordView`]: the part of the stored message that holds them, scanned
/// again on each use (a record has a few labels; scanning is cheaper than collecting them).
/// [`view`] has checked every entry.
#[derive(Debug, Clone, Copy)]
pub struct Labels<'a>(&'a [u8]);

impl<'a> Labels<'a> {
    /// The entries in stored order. lamina writes records from a map, so no key repeats.
    pub fn iter(self) -> impl Iterator<Item = (&'a str, &'a str)> {
        let mut buf = self.0;
        // The entries were checked when the view was made, so an error cannot occur here;
        // should one anyway, the iteration ends.
        std::iter::from_fn(move || next_label(&mut buf).ok().flatten())
    }

    /// The value of `key`; were a key stored twice, the last one, as protobuf decoders read it.
    pub fn get(self, key: &str) -> Option<&'a str> {
        self.iter()
            .filter(|(k, _)| *k == key)
            .last()
            .map(|(_, v)| v)
    }
}

const LABELS_TAG: u32 = 5;

/// Reads a record in place. Refuses exactly what [`decode`] refuses: every known field is
/// checked (wire type, length, UTF-8), unknown ones are skipped.
pub(super) fn view<'a>(key: &str, bytes: &'a [u8]) -> Result<RecordView<'a>> {
    let unreadable =
        |why: String| Error::Internal(format!("record of snapshot {key:?} is unreadable: {why}"));
    let (mut id, mut kind, mut parent, mut created, mut updated) = (0, 0, "", 0, 0);
    // From the first label to the end of the last: all that scanning them needs to read (prost
    // writes them as one run of fields; any other field in between is skipped).
    let mut labels: Option<(usize, usize)> = None;
    let mut buf = bytes;
    while !buf.is_empty() {
        let start = bytes.len() - buf.len();
        let (tag, wire) = decode_key(&mut buf).map_err(|e| unreadable(e.to_string()))?;
        let expected = match tag {
            1 | 2 | 6..=9 => WireType::Varint,
            3 => WireType::LengthDelimited,
            // Repeated numbers come packed or one by one; prost reads a map entry whatever
            // wire type its key gives (see `next_label`).
            4 if wire == WireType::Varint => wire,
            4 => WireType::LengthDelimited,
            _ => wire,
        };
        if wire != expected {
            return Err(unreadable(format!("field {tag} has wire type {wire:?}")));
        }
        match tag {
            1 => id = varint(&mut buf).map_err(&unreadable)?,
            2 => kind = varint(&mut buf).map_err(&unreadable)? as u32,
            3 => parent = string(&mut buf).map_err(&unreadable)?,
            LABELS_TAG => {
                label_entry(&mut buf).map_err(&unreadable)?;
                let end = bytes.len() - buf.len();
                labels = Some((labels.map_or(start, |(first, _)| first), end));
            }
            6 => created = varint(&mut buf).map_err(&unreadable)?,
            7 => updated = varint(&mut buf).map_err(&unreadable)?,
            // Not needed here, but checked all the same: what decode refuses must not be read
            // otherwise (a damaged length before the ID could make a later number look like
            // it, and Cleanup trusts the IDs it reads).
            4 if wire == WireType::LengthDelimited => {
                let mut packed = delimited(&mut buf).map_err(&unreadable)?;
                while !packed.is_empty() {
                    varint(&mut packed).map_err(&unreadable)?;
                }
            }
            4 | 8 | 9 => {
                varint(&mut buf).map_err(&unreadable)?;
            }
            // Fields of later schemas, which decode skips too.
            _ => skip_field(wire, tag, &mut buf, DecodeContext::default())
                .map_err(|e| unreadable(e.to_string()))?,
        }
    }
    let kind = Kind::from_number(kind).ok_or_else(|| unreadable(format!("unknown kind {kind}")))?;
    Ok(RecordView {
        id,
        kind,
        parent,
        labels: Labels(labels.map_or(&[], |(first, end)| &bytes[first..end])),
        created: time(created),
        updated: time(updated),
    })
}

fn varint(buf: &mut &[u8]) -> std::result::Result<u64, String> {
    decode_varint(buf).map_err(|e| e.to_string())
}

/// The bytes of a length-delimited field, after its key.
fn delimited<'a>(buf: &mut &'a [u8]) -> std::result::Result<&'a [u8], String> {
    let len = varint(buf)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len <= buf.len())
        .ok_or("field runs past the end of the record")?;
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(field)
}

fn string<'a>(buf: &mut &'a [u8]) -> std::result::Result<&'a str, String> {
    std::str::from_utf8(delimited(buf)?).map_err(|e| format!("a string is not UTF-8: {e}"))
}

/// One map entry (the field's key already read): its key and value, either of which may be
/// left out when empty.
fn label_entry<'a>(buf: &mut &'a [u8]) -> std::result::Result<(&'a str, &'a str), String> {
    let mut entry = delimited(buf)?;
    let (mut k, mut v) = ("", "");
    while !entry.is_empty() {
        match decode_key(&mut entry).map_err(|e| e.to_string())? {
            (1, WireType::LengthDelimited) => k = string(&mut entry)?,
            (2, WireType::LengthDelimited) => v = string(&mut entry)?,
            (tag @ (1 | 2), wire) => {
                return Err(format!("label field {tag} has wire type {wire:?}"))
            }
            (tag, wire) => skip_field(wire, tag, &mut entry, DecodeContext::default())
                .map_err(|e| e.to_string())?,
        }
    }
    Ok((k, v))
}

/// The next label after `buf`, skipping the record's other fields.
fn next_label<'a>(buf: &mut &'a [u8]) -> std::result::Result<Option<(&'a str, &'a str)>, String> {
    while !buf.is_empty() {
        match decode_key(buf).map_err(|e| e.to_string())? {
            // Like prost, whose map fields read a length and an entry whatever the wire type.
            (LABELS_TAG, _) => return label_entry(buf).map(Some),
            (tag, wire) => {
                skip_field(wire, tag, buf, DecodeContext::default()).map_err(|e| e.to_string())?
            }
        }
    }
    Ok(None)
}

/// A record as schema 1 stored it (JSON), for the migration to schema 2.
pub(super) fn decode_v1(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Internal(format!(
            "record of snapshot {key:?} (schema 1) is unreadable: {e}"
        ))
    })
}

/// Rewrites every schema-1 (JSON) record in schema 2. Reads and decodes them all before writing
/// any, so that an unreadable record fails the migration with nothing changed.
pub(super) fn migrate_v1(tx: &redb::WriteTransaction) -> Result<usize> {
    let mut table = tx.open_table(super::SNAPSHOTS)?;
    let mut records = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let key = k.value().to_string();
        let record = decode_v1(&key, v.value())?;
        records.push((key, record));
    }
    for (key, record) in &records {
        table.insert(key.as_str(), encode(record).as_slice())?;
    }
    Ok(records.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            id: 42,
            kind: Kind::Committed,
            parent: "p".into(),
            parent_ids: vec![7, 1030, 3, u64::MAX],
            labels: BTreeMap::from([("a".into(), "1".into()), ("é\0".into(), String::new())]),
            created: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            updated: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_001, 1),
            usage: Usage {
                size: 4096,
                inodes: 3,
            },
        }
    }

    #[test]
    fn round_trips_every_field_to_the_nanosecond() {
        for kind in [Kind::View, Kind::Active, Kind::Committed] {
            let r = Record { kind, ..record() };
            assert_eq!(decode("k", &encode(&r)).unwrap(), r);
        }
    }

    /// The fields a view reads, as a decoded record has them.
    fn seen(
        r: &Record,
    ) -> (
        u64,
        Kind,
        &str,
        BTreeMap<&str, &str>,
        SystemTime,
        SystemTime,
    ) {
        let labels = r.labels.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        (r.id, r.kind, &r.parent, labels, r.created, r.updated)
    }

    fn seen_in_view<'a>(
        v: &RecordView<'a>,
    ) -> (
        u64,
        Kind,
        &'a str,
        BTreeMap<&'a str, &'a str>,
        SystemTime,
        SystemTime,
    ) {
        // Collected as a decoder would: a repeated key keeps its last value.
        let labels = v.labels.iter().collect();
        (v.id, v.kind, v.parent, labels, v.created, v.updated)
    }

    #[test]
    fn a_view_reads_what_decode_reads() {
        let plain = Record {
            parent: String::new(),
            parent_ids: Vec::new(),
            labels: BTreeMap::new(),
            ..record()
        };
        let mut unknown = encode(&record());
        // Fields of some later schema: a varint (15) and a string (14).
        unknown.extend_from_slice(&[15 << 3, 1, (14 << 3) | 2, 2, b'h', b'i']);
        // A label after the fields that follow the others: the labels are no longer one run.
        let mut scattered = encode(&record());
        scattered.extend_from_slice(&[(5 << 3) | 2, 6, 10, 1, b'z', 18, 1, b'9']);
        let r = decode("k", &scattered).unwrap();
        assert_eq!(r.labels.len(), 3);
        let mut cases = vec![encode(&plain), unknown, scattered];
        for kind in [Kind::View, Kind::Active, Kind::Committed] {
            cases.push(encode(&Record { kind, ..record() }));
        }
        for bytes in cases {
            let r = decode("k", &bytes).unwrap();
            let v = view("k", &bytes).unwrap();
            assert_eq!(seen_in_view(&v), seen(&r));
            for key in ["a", "é\0", "z", "missing"] {
                assert_eq!(v.labels.get(key), r.labels.get(key).map(|s| &s[..]));
            }
        }
    }

    /// Every prefix and every one-byte change of a record: a view reads exactly what decode
    /// reads, and refuses exactly what decode refuses.
    #[test]
    fn a_damaged_record_gives_a_view_the_same_answer_as_decode() {
        let bytes = encode(&record());
        let mut damaged: Vec<Vec<u8>> = (0..bytes.len()).map(|n| bytes[..n].to_vec()).collect();
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                damaged.push(b);
            }
        }
        let mut refused = 0;
        for b in &damaged {
            match (decode("k", b), view("k", b)) {
                (Ok(r), Ok(v)) => assert_eq!(seen_in_view(&v), seen(&r), "{b:?}"),
                (Ok(r), Err(e)) => panic!("decode read {r:?} where the view failed: {e}"),
                (Err(_), Err(_)) => refused += 1,
                (Err(e), Ok(v)) => panic!("decode failed ({e}) where the view read {v:?}"),
            }
        }
        assert!(refused > bytes.len(), "only {refused} refused");
        // Truncated inside the parent's key, and with a parent that is not UTF-8.
        assert!(view("k", &bytes[..6]).is_err());
        let mut bad = bytes.clone();
        let p = bad.iter().position(|&b| b == b'p').unwrap();
        bad[p] = 0xff;
        let err = view("k", &bad).unwrap_err().to_string();
        assert!(
            err.contains("snapshot \"k\"") && err.contains("UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn reads_schema_1_json() {
        let r = record();
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode_v1("k", &json).unwrap(), r);
        assert!(decode("k", b"\xff\xff").is_err());
    }
}
