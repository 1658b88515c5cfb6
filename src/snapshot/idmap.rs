//! User-namespaced containers (containerd 2.x's `remap-ids`): the ID mappings containerd puts
//! in a snapshot's labels, checked and read. lamina then owns the new upper directory by the
//! host IDs of the container's root, and returns the mappings as `uidmap=`/`gidmap=` mount
//! options, from which containerd ID-maps the lower layers (never an overlay's upper
//! directory; the bind of a snapshot without a parent, as containerd's overlayfs does).

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// containerd's label with the container's UID mapping, `containerID:hostID:size[,…]`.
pub const UID_LABEL: &str = "containerd.io/snapshot/uidmapping";
/// Its GID counterpart.
pub const GID_LABEL: &str = "containerd.io/snapshot/gidmapping";

/// A snapshot's ID mappings, as its labels give them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping<'a> {
    pub uid_map: &'a str,
    pub gid_map: &'a str,
    /// The host UID and GID the container's root (0) maps to.
    pub root: (u32, u32),
}

impl Mapping<'_> {
    /// The mount options that carry the mappings to containerd, first on every mount, as
    /// containerd's overlayfs snapshotter places them.
    pub fn options(&self) -> [String; 2] {
        [
            format!("uidmap={}", self.uid_map),
            format!("gidmap={}", self.gid_map),
        ]
    }
}

/// The mappings in `labels`: none when neither label is there. Both or neither: containerd
/// always sets both, and one alone would leave half of the container's IDs unmapped.
///
/// Errors (InvalidArgument, naming the label): one label without the other; an entry that is
/// not three numbers `containerID:hostID:size`, a size of 0, a range past 2³²−1; no entry for
/// the container's root (ID 0).
pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Option<Mapping<'_>>> {
    let uid = labels.get(UID_LABEL).map(String::as_str);
    let gid = labels.get(GID_LABEL).map(String::as_str);
    let (uid_map, gid_map) = match (uid, gid) {
        (None, None) => return Ok(None),
        (Some(u), Some(g)) => (u, g),
        (Some(_), None) | (None, Some(_)) => {
            let (given, missing) = if uid.is_some() {
                (UID_LABEL, GID_LABEL)
            } else {
                (GID_LABEL, UID_LABEL)
            };
            return Err(Error::invalid(format!(
                "label {given} is set but {missing} is not: a user-namespaced snapshot needs \
                 both ID mappings"
            )));
        }
    };
    let root = (root_of(UID_LABEL, uid_map)?, root_of(GID_LABEL, gid_map)?);
    Ok(Some(Mapping {
        uid_map,
        gid_map,
        root,
    }))
}

/// The host ID that container ID 0 maps to in `value`, after checking every entry.
fn root_of(label: &str, value: &str) -> Result<u32> {
    let bad = |why: String| {
        Error::invalid(format!(
            "label {label}={:?}: {why}; expected containerID:hostID:size[,…], e.g. \
             0:65536:65536",
            super::checks::shorten(value).trim_matches('"')
        ))
    };
    let mut root = None;
    for entry in value.split(',') {
        let fields: Vec<&str> = entry.split(':').collect();
        let [container, host, size] = fields[..] else {
            return Err(bad(format!("entry {entry:?} is not three numbers")));
        };
        let number = |s: &str| {
            s.parse::<u32>().map_err(|_| {
                bad(format!(
                    "{s:?} in entry {entry:?} is not a number below 2^32"
                ))
            })
        };
        let (container, host, size) = (number(container)?, number(host)?, number(size)?);
        if size == 0 {
            return Err(bad(format!("entry {entry:?} maps no IDs (size 0)")));
        }
        // The last ID of each range must exist and not be 2³²−1, which the kernel reserves.
        let fits = |start: u32| {
            start
                .checked_add(size - 1)
                .is_some_and(|last| last < u32::MAX)
        };
        if !fits(container) || !fits(host) {
            return Err(bad(format!("entry {entry:?} runs past the largest ID")));
        }
        if container == 0 && root.is_none() {
            root = Some(host);
        }
    }
    root.ok_or_else(|| bad("no entry maps the container's root (ID 0)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_labels_no_mapping() {
        assert_eq!(from_labels(&labels(&[("a", "b")])).unwrap(), None);
    }

    #[test]
    fn the_root_pair_and_the_options_come_from_the_labels() {
        let l = labels(&[
            (UID_LABEL, "0:65536:65536"),
            (GID_LABEL, "1:70000:10,0:80000:1"),
        ]);
        let m = from_labels(&l).unwrap().unwrap();
        assert_eq!(m.root, (65536, 80000));
        assert_eq!(
            m.options(),
            ["uidmap=0:65536:65536", "gidmap=1:70000:10,0:80000:1"]
        );
    }

    #[test]
    fn one_label_alone_is_refused_naming_the_missing_one() {
        let err = from_labels(&labels(&[(UID_LABEL, "0:1:1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains(GID_LABEL) && err.contains("both"), "{err}");
    }

    #[test]
    fn malformed_mappings_are_refused_naming_the_label() {
        for (value, why) in [
            ("0:65536", "three numbers"),
            ("0:65536:65536:1", "three numbers"),
            ("a:1:1", "not a number"),
            ("0:-1:1", "not a number"),
            ("0:1:0", "size 0"),
            ("0:4294967295:1", "largest ID"),
            ("0:4294967000:1000", "largest ID"),
            ("1:65536:10", "root (ID 0)"),
            ("", "three numbers"),
        ] {
            let l = labels(&[(UID_LABEL, "0:1:1"), (GID_LABEL, value)]);
            let err = from_labels(&l).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{value}: {err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains(GID_LABEL) && msg.contains(why),
                "{value:?}: {msg}"
            );
        }
    }
}
