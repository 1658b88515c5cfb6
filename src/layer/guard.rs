//! The tar reader reads a PAX record (`x`, `g`) or a GNU long name (`L`, `K`) whole, at the
//! size its header declares: a layer of a few compressed megabytes could declare gigabytes and
//! make lamina allocate them. Go's reader, containerd's, refuses such records over 1 MiB. This
//! reader sits under the tar reader, follows the stream's headers as the tar reader will, and
//! refuses the same records before a byte of them is read.

use std::io::{self, Read};

/// The largest PAX or GNU long-name record accepted: Go's `archive/tar` limit.
pub const MAX_RECORD: u64 = 1 << 20;

const BLOCK: usize = 512;

enum State {
    /// The next 512 bytes are a header.
    Header,
    /// An entry's content (`left`, padding included); `record` collects a PAX record's own
    /// bytes (`content` of them), to learn the size it gives the next entry.
    Data {
        left: u64,
        content: u64,
        record: Option<Vec<u8>>,
    },
    /// Extension blocks of an old GNU sparse header; `size` is its entry's content.
    Sparse { size: u64 },
    /// Past the archive's end (or past what could be followed): bytes pass as they are.
    Done,
}

pub struct Guard<R> {
    inner: R,
    state: State,
    /// A header block read ahead, and how much of it was handed out.
    block: Vec<u8>,
    at: usize,
    /// The size the last PAX record gives the next entry.
    pax_size: Option<u64>,
}

impl<R: Read> Guard<R> {
    pub fn new(inner: R) -> Self {
        Guard {
            inner,
            state: State::Header,
            block: Vec::new(),
            at: 0,
            pax_size: None,
        }
    }

    /// Reads a whole block (fewer bytes only at the end of the stream).
    fn fill_block(&mut self) -> io::Result<()> {
        self.block.clear();
        self.block.resize(BLOCK, 0);
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut self.block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.block.truncate(filled);
        self.at = 0;
        Ok(())
    }

    fn after_header(&mut self) -> io::Result<State> {
        let h = &self.block;
        if h.len() < BLOCK || h.iter().all(|&b| b == 0) {
            return Ok(State::Done);
        }
        let Some(size) = number(&h[124..136]) else {
            return Ok(State::Done); // the tar reader reports it
        };
        let padded = |n: u64| n.div_ceil(BLOCK as u64) * BLOCK as u64;
        Ok(match h[156] {
            kind @ (b'x' | b'g' | b'L' | b'K') => {
                if size > MAX_RECORD {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "a {} record of {size} bytes, over the {MAX_RECORD} containerd's \
                             reader accepts",
                            if matches!(kind, b'x' | b'g') {
                                "PAX"
                            } else {
                                "GNU long-name"
                            }
                        ),
                    ));
                }
                State::Data {
                    left: padded(size),
                    content: size,
                    record: (kind == b'x').then(Vec::new),
                }
            }
            b'S' if h[482] != 0 => State::Sparse { size },
            _ => {
                let size = self.pax_size.take().unwrap_or(size);
                State::Data {
                    left: padded(size),
                    content: 0,
                    record: None,
                }
            }
        })
    }
}

/// A header's numeric field: octal text, or base-256 when its first byte's top bit is set.
fn number(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut n: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            n = n.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(n);
    }
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = std::str::from_utf8(&field[..end]).ok()?.trim();
    u64::from_str_radix(text, 8).ok()
}

/// The `size` a PAX record sets, if any (records are `<length> <key>=<value>\n`).
fn pax_size(record: &[u8]) -> Option<u64> {
    record
        .split(|&b| b == b'\n')
        .filter_map(|r| {
            let (_, kv) = std::str::from_utf8(r).ok()?.split_once(' ')?;
            let (k, v) = kv.split_once('=')?;
            (k == "size").then(|| v.parse().ok()).flatten()
        })
        .next_back()
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.at < self.block.len() {
                let n = buf.len().min(self.block.len() - self.at);
                buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            match &mut self.state {
                State::Done => return self.inner.read(buf),
                State::Header => {
                    self.fill_block()?;
                    if self.block.is_empty() {
                        return Ok(0);
                    }
                    self.state = self.after_header()?;
                }
                State::Sparse { size } => {
                    let size = *size;
                    self.fill_block()?;
                    if self.block.len() < BLOCK {
                        self.state = State::Done;
                    } else if self.block[504] == 0 {
                        self.state = State::Data {
                            left: size.div_ceil(BLOCK as u64) * BLOCK as u64,
                            content: 0,
                            record: None,
                        };
                    }
                }
                State::Data {
                    left: 0, record, ..
                } => {
                    // As the tar reader does, only the latest PAX record counts.
                    if let Some(r) = record.take() {
                        self.pax_size = pax_size(&r);
                    }
                    self.state = State::Header;
                }
                State::Data {
                    left,
                    content,
                    record,
                } => {
                    if buf.is_empty() {
                        return Ok(0);
                    }
                    let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let n = self.inner.read(&mut buf[..want])?;
                    if n == 0 {
                        return Ok(0);
                    }
                    if let Some(r) = record {
                        let take = (n as u64).min(*content) as usize;
                        r.extend_from_slice(&buf[..take]);
                        *content -= take as u64;
                    }
                    *left -= n as u64;
                    return Ok(n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_path("x").unwrap();
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn read_all(data: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Guard::new(data).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn records_over_the_limit_are_refused_before_they_are_read() {
        for kind in [b'x', b'g', b'L', b'K'] {
            // Only the header: the record itself is never there to read.
            let err = read_all(&header(kind, MAX_RECORD + 1)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("1048577 bytes"), "{err}");
            let mut ok = header(kind, 3);
            ok.extend_from_slice(&[b'a'; BLOCK]);
            assert_eq!(read_all(&ok).unwrap(), ok, "{}", kind as char);
        }
    }

    #[test]
    fn headers_are_followed_past_files_and_pax_sizes() {
        // A PAX record giving the next file 600 bytes (the header says 0), that file, then a
        // record over the limit: found only if the 600 bytes were skipped right.
        let record = b"12 size=600\n";
        let mut s = header(b'x', record.len() as u64);
        s.extend_from_slice(record);
        s.resize(2 * BLOCK, 0);
        s.extend_from_slice(&header(b'0', 0));
        s.extend_from_slice(&[7u8; 1024]);
        s.extend_from_slice(&header(b'L', 5 << 20));
        let err = read_all(&s).unwrap_err();
        assert!(err.to_string().contains("GNU long-name"), "{err}");
        // Only the latest PAX record gives the next entry its size.
        let mut two = header(b'x', record.len() as u64);
        two.extend_from_slice(record);
        two.resize(2 * BLOCK, 0);
        let other = b"13 path=abcd\n";
        two.extend_from_slice(&header(b'x', other.len() as u64));
        two.extend_from_slice(other);
        two.resize(4 * BLOCK, 0);
        two.extend_from_slice(&header(b'0', 0));
        two.extend_from_slice(&header(b'L', 5 << 20));
        let err = read_all(&two).unwrap_err();
        assert!(err.to_string().contains("GNU long-name"), "{err}");
        // After the end of the archive, nothing is looked at.
        let mut end = vec![0u8; 2 * BLOCK];
        end.extend_from_slice(&header(b'x', 5 << 20));
        assert_eq!(read_all(&end).unwrap(), end);
    }

    #[test]
    fn numbers_are_octal_or_base_256() {
        assert_eq!(number(b"00000001750\0"), Some(1000));
        assert_eq!(number(b"  1750 \0\0\0\0\0"), Some(1000));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 1;
        big[10] = 2;
        assert_eq!(number(&big), Some(513));
        assert_eq!(number(b"zz\0\0\0\0\0\0\0\0\0\0"), None);
    }
}
