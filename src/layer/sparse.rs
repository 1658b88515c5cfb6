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

/// The `GNU.sparse.*` PAX records of one entry, as they came (bytes: Go's reader does not ask
/// them to be UTF-8; a value that is not a number where one is needed is refused).
#[derive(Default)]
pub struct Records {
    major: Vec<u8>,
    minor: Vec<u8>,
    name: Vec<u8>,
    size: Vec<u8>,
    realsize: Vec<u8>,
    map: Vec<u8>,
    numblocks: Vec<u8>,
    /// 0.0's alternating `GNU.sparse.offset` / `GNU.sparse.numbytes` records, in order.
    pairs: Vec<Vec<u8>>,
}

fn bad(why: &str) -> Error {
    Error::InvalidArgument(format!("its sparse-file records: {why}"))
}

/// A decimal number as Go's `strconv.ParseInt` reads one (an optional sign, digits).
fn int(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

impl Records {
    /// Takes `key`'s record if it is one of the sparse-file ones (true), as Go's reader does:
    /// the last of a repeated key wins (an empty value counts as none), except 0.0's
    /// offset/numbytes pairs, which must alternate.
    pub fn take(&mut self, key: &[u8], value: &[u8]) -> Result<bool> {
        let slot = match key {
            b"GNU.sparse.major" => &mut self.major,
            b"GNU.sparse.minor" => &mut self.minor,
            b"GNU.sparse.name" => &mut self.name,
            b"GNU.sparse.size" => &mut self.size,
            b"GNU.sparse.realsize" => &mut self.realsize,
            b"GNU.sparse.map" => &mut self.map,
            b"GNU.sparse.numblocks" => &mut self.numblocks,
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                let want: &[u8] = if self.pairs.len().is_multiple_of(2) {
                    b"GNU.sparse.offset"
                } else {
                    b"GNU.sparse.numbytes"
                };
                if key != want || value.contains(&b',') {
                    return Err(bad("offset and numbytes records out of order"));
                }
                self.pairs.push(value.to_vec());
                return Ok(true);
            }
            _ => return Ok(false),
        };
        *slot = value.to_vec();
        Ok(true)
    }

    /// What the records make of the entry, whose data (`physical_size` bytes) is `data`: None
    /// when they do not make it sparse (no records, or a version Go's reader does not know,
    /// which it reads as a plain file). A 1.0 map is read from the data here, and every map
    /// checked, whatever the entry turns out to be, as Go's reader does.
    pub fn sparse(self, physical_size: u64, data: &mut impl Read) -> Result<Option<Sparse>> {
        let map = if self.pairs.is_empty() {
            self.map
        } else {
            self.pairs.join(&b',')
        };
        let in_data = match (&self.major[..], &self.minor[..]) {
            (b"0", b"0" | b"1") => false,
            (b"1", b"0") => true,
            (b"", b"") if !map.is_empty() => false,
            (b"", b"") => return Ok(None),
            _ => return Ok(None),
        };
        let size = if !self.size.is_empty() {
            &self.size
        } else {
            &self.realsize
        };
        let size = if size.is_empty() {
            i64::try_from(physical_size).map_err(|_| bad("its size is too large"))?
        } else {
            int(size).ok_or_else(|| bad("its size is not a number"))?
        };
        let fragments = if in_data {
            map_1x0(data)?
        } else {
            map_0x(&self.numblocks, &map)?
        };
        let size = u64::try_from(size).map_err(|_| bad("its size is negative"))?;
        let mut end = 0i64;
        for &(offset, len) in &fragments {
            let valid = offset >= 0
                && len >= 0
                && offset.checked_add(len).is_some_and(|e| e as u64 <= size)
                && end <= offset;
            if !valid {
                return Err(bad(
                    "its fragments overlap, go past its size or are out of order",
                ));
            }
            end = offset + len;
        }
        Ok(Some(Sparse {
            name: (!self.name.is_empty()).then_some(self.name),
            size,
            fragments,
        }))
    }
}

/// A sparse file's name (when the records give one), logical size, and fragments (offset,
/// length), checked: in order, apart, within the size.
pub struct Sparse {
    pub name: Option<Vec<u8>>,
    size: u64,
    fragments: Vec<(i64, i64)>,
}

/// 0.0's and 0.1's map: `numblocks` fragments, as offset,length,offset,length...
fn map_0x(numblocks: &[u8], map: &[u8]) -> Result<Vec<(i64, i64)>> {
    let n = int(numblocks).ok_or_else(|| bad("GNU.sparse.numblocks is not a number"))?;
    let values: Vec<&[u8]> = if map.is_empty() {
        Vec::new()
    } else {
        map.split(|&b| b == b',').collect()
    };
    if n < 0 || values.len() as u64 != 2 * n as u64 {
        return Err(bad("the map does not hold numblocks fragments"));
    }
    pairs(values.into_iter())
}

fn pairs<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    while let (Some(o), Some(l)) = (values.next(), values.next()) {
        match (int(o), int(l)) {
            (Some(o), Some(l)) => out.push((o, l)),
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
    let n = int(first)
        .filter(|&n| n >= 0)
        .ok_or_else(|| bad("its map's count is not a number"))?;
    let want = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_mul(2))
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| bad("its map's count is too large"))?;
    feed(&mut text, want)?;
    pairs(text.split(|&b| b == b'\n').skip(1).take(want - 1))
}

/// Writes the sparse file's fragments from `data` (the entry's data, after a 1.0 map) into
/// `file`, a new empty file: each at its offset, the holes left unwritten, the file as long as
/// its logical size. Refused: less data than the fragments, or more (as Go's reader refuses
/// them), and a size over the filesystem's free space (containerd's applier, writing the holes
/// out, would run out of it).
pub fn write(sparse: Sparse, data: &mut impl Read, file: &mut File, buf: &mut [u8]) -> Result<()> {
    let free = nix::sys::statvfs::fstatvfs(&*file)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .map_err(|e| {
            Error::io(
                "measuring the free space for",
                "a sparse layer file",
                e.into(),
            )
        })?;
    if sparse.size > free {
        return Err(bad(&format!(
            "its size ({} bytes) is over the filesystem's free space ({free} bytes)",
            sparse.size
        )));
    }
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad("less data than its fragments"),
        _ if matches!(e.raw_os_error(), Some(libc::EFBIG | libc::EINVAL)) => {
            bad(&format!("its size or a fragment's offset: {e}"))
        }
        _ => Error::io("writing", "a sparse layer file", e),
    };
    for (offset, len) in sparse.fragments {
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

    /// The records' sparse file, its data `data` (a 1.0 map first), written to a new file.
    fn written(records: Records, data: &[u8]) -> Result<Vec<u8>> {
        let mut data = data;
        let sparse = records.sparse(data.len() as u64, &mut data)?.unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let mut file = File::create(&path).unwrap();
        let mut buf = vec![0u8; 3];
        write(sparse, &mut data, &mut file, &mut buf)?;
        Ok(std::fs::read(&path).unwrap())
    }

    fn zero_one(map: &str, n: &str) -> Records {
        records(&[
            ("GNU.sparse.major", "0"),
            ("GNU.sparse.minor", "1"),
            ("GNU.sparse.size", "20"),
            ("GNU.sparse.numblocks", n),
            ("GNU.sparse.map", map),
        ])
    }

    fn one_oh() -> Records {
        records(&[("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0")])
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
        let mut r = zero_one("0,5,12,3", "2");
        r.take(b"GNU.sparse.name", b"real/name").unwrap();
        let s = r.sparse(8, &mut &b""[..]).unwrap().unwrap();
        assert_eq!(s.name.as_deref(), Some(&b"real/name"[..]));
        assert_eq!(
            written(zero_one("0,5,12,3", "2"), b"helloabc").unwrap(),
            want
        );
        // 0.0: pairs of records, no version records.
        let r = records(&[
            ("GNU.sparse.size", "20"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.offset", "0"),
            ("GNU.sparse.numbytes", "5"),
            ("GNU.sparse.offset", "12"),
            ("GNU.sparse.numbytes", "3"),
        ]);
        assert_eq!(written(r, b"helloabc").unwrap(), want);
        // Empty version records count as none (0.x, by its map).
        let r = records(&[
            ("GNU.sparse.major", ""),
            ("GNU.sparse.minor", ""),
            ("GNU.sparse.size", "20"),
            ("GNU.sparse.numblocks", "2"),
            ("GNU.sparse.map", "0,5,12,3"),
        ]);
        assert_eq!(written(r, b"helloabc").unwrap(), want);
        // 1.0: the map at the start of the data, in a block of its own.
        let mut r = one_oh();
        r.take(b"GNU.sparse.realsize", b"20").unwrap();
        let mut data = b"2\n0\n5\n12\n3\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"helloabc");
        assert_eq!(written(r, &data).unwrap(), want);
    }

    #[test]
    fn unknown_versions_and_no_records_are_plain_files() {
        let none = |r: Records| r.sparse(1, &mut &b""[..]).unwrap().is_none();
        assert!(none(records(&[("GNU.sparse.major", "1")])));
        assert!(none(records(&[
            ("GNU.sparse.major", "2"),
            ("GNU.sparse.minor", "0")
        ])));
        let mut r = Records::default();
        r.take(b"GNU.sparse.major", b"\xff").unwrap();
        assert!(none(r), "a version that is not text is an unknown one");
        assert!(none(Records::default()));
        assert!(!Records::default().take(b"path", b"x").unwrap());
    }

    #[test]
    fn bad_maps_and_data_are_refused() {
        let checked = |r: Records| r.sparse(8, &mut &b""[..]).map(|_| ());
        // Malformed maps: wrong count, not numbers, negative.
        for (map, n) in [("0,5", "2"), ("0,x", "1"), ("0,5", "-1"), ("0,5", "")] {
            assert!(checked(zero_one(map, n)).is_err(), "{map} / {n}");
        }
        // Fragments out of order, overlapping, past the end, negative: refused with the
        // records, before any data.
        for map in ["12,3,0,5", "0,5,3,3", "18,5,0,0", "-1,1,0,0", "0,-1,0,0"] {
            assert!(checked(zero_one(map, "2")).is_err(), "{map}");
        }
        // Less data, more data.
        assert!(written(zero_one("0,5,12,3", "2"), b"hello").is_err());
        assert!(written(zero_one("0,5,12,3", "2"), b"helloabcdef").is_err());
        // 0.0's records out of order.
        let mut r = Records::default();
        assert!(r.take(b"GNU.sparse.numbytes", b"5").is_err());
        // 1.0: a map cut short, a count that is not a number, a map over 1 MiB.
        assert!(written(one_oh(), &[b'1'; 512]).is_err());
        let mut data = b"x\n".to_vec();
        data.resize(512, 0);
        assert!(written(one_oh(), &data).is_err());
        let err = written(one_oh(), &vec![b'1'; 2 * MAX_MAP]).unwrap_err();
        assert!(err.to_string().contains("over 1 MiB"), "{err}");
        // A size past the filesystem's free space.
        let r = records(&[
            ("GNU.sparse.size", "9223372036854775807"),
            ("GNU.sparse.numblocks", "0"),
            ("GNU.sparse.map", ""),
            ("GNU.sparse.major", "0"),
            ("GNU.sparse.minor", "1"),
        ]);
        let err = written(r, b"").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
}
