//! Sparse files in the PAX format (GNU tar's 0.0, 0.1 and 1.0), read as Go's tar reader reads
//! them for containerd's applier: the entry's data holds only the file's fragments, a map says
//! where each goes, and the rest of the file is holes. Written here by seeking over the holes,
//! so the file reads the same as containerd's (which writes the holes out as zeros).
//!
//! An old GNU sparse entry (type `S`) is not this: containerd refuses those, and so does lamina
//! (`extract.rs`).

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom, Write},
};

use crate::error::{Error, Result};

/// The longest 1.0 map read from an entry's data, in bytes: like the PAX records, the map is
/// held whole, so it is bounded (Go's reader has no bound; a map this long describes some
/// 60,000 fragments).
const MAX_MAP: usize = 1 << 20;

/// The `GNU.sparse.*` PAX records of one entry, as they came.
#[derive(Default)]
pub struct Records {
    major: Option<String>,
    minor: Option<String>,
    name: Option<Vec<u8>>,
    size: Option<String>,
    realsize: Option<String>,
    map: Option<String>,
    numblocks: Option<String>,
    /// 0.0's alternating `GNU.sparse.offset` / `GNU.sparse.numbytes` records, in order.
    pairs: Vec<String>,
}

fn bad(why: &str) -> Error {
    Error::InvalidArgument(format!("its sparse-file records: {why}"))
}

impl Records {
    /// Takes `key`'s record if it is one of the sparse-file ones (true), as Go's reader does:
    /// the last of a repeated key wins, except 0.0's offset/numbytes pairs, which must
    /// alternate.
    pub fn take(&mut self, key: &[u8], value: &[u8]) -> Result<bool> {
        let text =
            || String::from_utf8(value.to_vec()).map_err(|_| bad("a value is not UTF-8 text"));
        match key {
            b"GNU.sparse.major" => self.major = Some(text()?),
            b"GNU.sparse.minor" => self.minor = Some(text()?),
            b"GNU.sparse.name" => self.name = Some(value.to_vec()),
            b"GNU.sparse.size" => self.size = Some(text()?),
            b"GNU.sparse.realsize" => self.realsize = Some(text()?),
            b"GNU.sparse.map" => self.map = Some(text()?),
            b"GNU.sparse.numblocks" => self.numblocks = Some(text()?),
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                let want: &[u8] = if self.pairs.len().is_multiple_of(2) {
                    b"GNU.sparse.offset"
                } else {
                    b"GNU.sparse.numbytes"
                };
                let v = text()?;
                if key != want || v.contains(',') {
                    return Err(bad("offset and numbytes records out of order"));
                }
                self.pairs.push(v);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// What the records make of the entry: None when they do not make it sparse (no records,
    /// or a version Go's reader does not know, which it reads as a plain file).
    pub fn sparse(self, physical_size: u64) -> Result<Option<Sparse>> {
        let map = if self.pairs.is_empty() {
            self.map
        } else {
            Some(self.pairs.join(","))
        };
        let in_data = match (self.major.as_deref(), self.minor.as_deref()) {
            (Some("0"), Some("0" | "1")) => false,
            (Some("1"), Some("0")) => true,
            (Some(_), _) | (_, Some(_)) => return Ok(None),
            (None, None) if map.as_deref().is_some_and(|m| !m.is_empty()) => false,
            (None, None) => return Ok(None),
        };
        let size = match self.size.filter(|s| !s.is_empty()).or(self.realsize) {
            Some(s) if !s.is_empty() => {
                let n: i64 = s.parse().map_err(|_| bad("its size is not a number"))?;
                u64::try_from(n).map_err(|_| bad("its size is negative"))?
            }
            _ => physical_size,
        };
        let fragments = if in_data {
            None
        } else {
            Some(map_0x(
                self.numblocks.as_deref().unwrap_or(""),
                map.as_deref().unwrap_or(""),
            )?)
        };
        Ok(Some(Sparse {
            name: self.name.filter(|n| !n.is_empty()),
            size,
            fragments,
        }))
    }
}

/// A sparse file's name (when the records give one), logical size, and fragments (offset,
/// length), unless they are at the start of its data (1.0).
pub struct Sparse {
    pub name: Option<Vec<u8>>,
    size: u64,
    fragments: Option<Vec<(i64, i64)>>,
}

/// 0.0's and 0.1's map: `numblocks` fragments, as offset,length,offset,length...
fn map_0x(numblocks: &str, map: &str) -> Result<Vec<(i64, i64)>> {
    let n: i64 = numblocks
        .parse()
        .map_err(|_| bad("GNU.sparse.numblocks is not a number"))?;
    let values: Vec<&str> = if map.is_empty() {
        Vec::new()
    } else {
        map.split(',').collect()
    };
    if n < 0 || values.len() as u64 != 2 * n as u64 {
        return Err(bad("the map does not hold numblocks fragments"));
    }
    pairs(values.into_iter())
}

fn pairs<'a>(mut values: impl Iterator<Item = &'a str>) -> Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    while let (Some(o), Some(l)) = (values.next(), values.next()) {
        match (o.parse(), l.parse()) {
            (Ok(o), Ok(l)) => out.push((o, l)),
            _ => return Err(bad("a fragment's offset or length is not a number")),
        }
    }
    Ok(out)
}

/// 1.0's map, at the start of the entry's data in whole 512-byte blocks: the number of
/// fragments, then each one's offset and length, one decimal number a line.
fn map_1x0(data: &mut impl Read) -> Result<Vec<(i64, i64)>> {
    let mut text = Vec::new();
    let mut block = [0u8; 512];
    let mut lines = 0usize;
    let mut feed = |text: &mut Vec<u8>, want: usize| -> Result<()> {
        while lines < want {
            if text.len() >= MAX_MAP {
                return Err(bad("its map is over 1 MiB"));
            }
            data.read_exact(&mut block)
                .map_err(|e| bad(&format!("reading its map: {e}")))?;
            lines += block.iter().filter(|&&b| b == b'\n').count();
            text.extend_from_slice(&block);
        }
        Ok(())
    };
    feed(&mut text, 1)?;
    let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let n: i64 = std::str::from_utf8(first)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n >= 0)
        .ok_or_else(|| bad("its map's count is not a number"))?;
    let want = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_mul(2))
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| bad("its map's count is too large"))?;
    feed(&mut text, want)?;
    let tokens: Vec<&str> = text
        .split(|&b| b == b'\n')
        .skip(1)
        .take(want - 1)
        .map(|t| std::str::from_utf8(t).unwrap_or("x"))
        .collect();
    pairs(tokens.into_iter())
}

/// Writes the sparse file's fragments from `data` (the entry's data) into `file`, a new empty
/// file: each at its offset, the holes left unwritten, the file as long as its logical size.
/// Refused as Go's reader refuses them: fragments out of order, overlapping, or past the end;
/// less data than the fragments, or more.
pub fn write(sparse: Sparse, data: &mut impl Read, file: &mut File, buf: &mut [u8]) -> Result<()> {
    let fragments = match sparse.fragments {
        Some(f) => f,
        None => map_1x0(data)?,
    };
    let size = i64::try_from(sparse.size).map_err(|_| bad("its size is too large"))?;
    let mut end = 0i64;
    for &(offset, len) in &fragments {
        let valid = offset >= 0
            && len >= 0
            && offset.checked_add(len).is_some_and(|e| e <= size)
            && end <= offset;
        if !valid {
            return Err(bad(
                "its fragments overlap, go past its size or are out of order",
            ));
        }
        end = offset + len;
    }
    let io_err = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            bad("less data than its fragments")
        } else {
            Error::io("writing", "a sparse layer file", e)
        }
    };
    for (offset, len) in fragments {
        file.seek(SeekFrom::Start(offset as u64)).map_err(io_err)?;
        let mut left = len as u64;
        while left > 0 {
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            data.read_exact(&mut buf[..n]).map_err(io_err)?;
            file.write_all(&buf[..n]).map_err(io_err)?;
            left -= n as u64;
        }
    }
    if data.read(&mut buf[..1]).map_err(io_err)? != 0 {
        return Err(bad("more data than its fragments"));
    }
    file.set_len(sparse.size).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(recs: &[(&str, &str)]) -> Records {
        let mut r = Records::default();
        for (k, v) in recs {
            assert!(r.take(k.as_bytes(), v.as_bytes()).unwrap(), "{k}");
        }
        r
    }

    fn written(sparse: Sparse, data: &[u8]) -> Result<Vec<u8>> {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let mut file = File::create(&path).unwrap();
        let mut buf = vec![0u8; 3];
        write(sparse, &mut &data[..], &mut file, &mut buf)?;
        Ok(std::fs::read(&path).unwrap())
    }

    #[test]
    fn each_format_writes_its_fragments_at_their_offsets() {
        let want = {
            let mut v = vec![0u8; 20];
            v[0..5].copy_from_slice(b"hello");
            v[12..15].copy_from_slice(b"abc");
            v
        };
        // 0.1: the map in one record.
        let s = records(&[
            ("GNU.sparse.major", "0"),
            ("GNU.sparse.minor", "1"),
            ("GNU.sparse.size", "20"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.map", "0,5,12,3"),
            ("GNU.sparse.name", "real/name"),
        ])
        .sparse(8)
        .unwrap()
        .unwrap();
        assert_eq!(s.name.as_deref(), Some(&b"real/name"[..]));
        assert_eq!(written(s, b"helloabc").unwrap(), want);
        // 0.0: pairs of records, no version records.
        let s = records(&[
            ("GNU.sparse.size", "20"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.offset", "0"),
            ("GNU.sparse.numbytes", "5"),
            ("GNU.sparse.offset", "12"),
            ("GNU.sparse.numbytes", "3"),
        ])
        .sparse(8)
        .unwrap()
        .unwrap();
        assert_eq!(written(s, b"helloabc").unwrap(), want);
        // 1.0: the map at the start of the data, in a block of its own.
        let s = records(&[
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.realsize", "20"),
        ])
        .sparse(520)
        .unwrap()
        .unwrap();
        let mut data = b"2\n0\n5\n12\n3\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"helloabc");
        assert_eq!(written(s, &data).unwrap(), want);
    }

    #[test]
    fn unknown_versions_and_no_records_are_plain_files() {
        assert!(records(&[("GNU.sparse.major", "1")])
            .sparse(1)
            .unwrap()
            .is_none());
        assert!(
            records(&[("GNU.sparse.major", "2"), ("GNU.sparse.minor", "0")])
                .sparse(1)
                .unwrap()
                .is_none()
        );
        assert!(Records::default().sparse(1).unwrap().is_none());
        assert!(!Records::default().take(b"path", b"x").unwrap());
    }

    #[test]
    fn bad_maps_and_data_are_refused() {
        let with = |map: &str, n: &str| {
            records(&[
                ("GNU.sparse.major", "0"),
                ("GNU.sparse.minor", "1"),
                ("GNU.sparse.size", "20"),
                ("GNU.sparse.numblocks", n),
                ("GNU.sparse.map", map),
            ])
            .sparse(8)
        };
        // Malformed maps: wrong count, not numbers, negative.
        for (map, n) in [("0,5", "2"), ("0,x", "1"), ("0,5", "-1"), ("0,5", "")] {
            assert!(with(map, n).is_err(), "{map} / {n}");
        }
        // Fragments out of order, overlapping, past the end, negative.
        for map in ["12,3,0,5", "0,5,3,3", "18,5,0,0", "-1,1,0,0", "0,-1,0,0"] {
            let s = with(map, "2").unwrap().unwrap();
            assert!(written(s, b"helloabc").is_err(), "{map}");
        }
        // Less data, more data.
        let s = with("0,5,12,3", "2").unwrap().unwrap();
        assert!(written(s, b"hello").is_err());
        let s = with("0,5,12,3", "2").unwrap().unwrap();
        assert!(written(s, b"helloabcdef").is_err());
        // 0.0's records out of order.
        let mut r = Records::default();
        assert!(r.take(b"GNU.sparse.numbytes", b"5").is_err());
        // 1.0: a map that never ends, a count that is not a number.
        let one = || {
            records(&[("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0")])
                .sparse(512)
                .unwrap()
                .unwrap()
        };
        assert!(written(one(), &[b'1'; 512]).is_err());
        let mut data = b"x\n".to_vec();
        data.resize(512, 0);
        assert!(written(one(), &data).is_err());
    }
}
