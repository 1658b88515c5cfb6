//! How a [`Record`] is stored: a protobuf message (schema 2), written and read with prost,
//! which lamina already links for gRPC. Schema 1 stored JSON; it is read only to migrate.
//!
//! Why not JSON any more: List decodes every record, and JSON parsing was most of its cost.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use prost::Message;

use super::{Kind, Record, Usage};
use crate::error::{Error, Result};

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
        kind: match record.kind {
            Kind::View => 1,
            Kind::Active => 2,
            Kind::Committed => 3,
        },
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
    let kind = match s.kind {
        1 => Kind::View,
        2 => Kind::Active,
        3 => Kind::Committed,
        other => return Err(unreadable(format!("unknown kind {other}"))),
    };
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

/// A record as schema 1 stored it (JSON), for the migration to schema 2.
pub(super) fn decode_v1(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Internal(format!(
            "record of snapshot {key:?} (schema 1) is unreadable: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            id: 42,
            kind: Kind::Committed,
            parent: "p".into(),
            parent_ids: vec![7, 3],
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

    #[test]
    fn reads_schema_1_json() {
        let r = record();
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode_v1("k", &json).unwrap(), r);
        assert!(decode("k", b"\xff\xff").is_err());
    }
}
