//! A store file opened so that nothing is ever written to it: what an offline `lamina fsck`
//! without `--repair` reads.
//!
//! redb writes as soon as it opens a file (it marks the file in use, and repairs it after an
//! unclean shutdown), and opening a store creates lamina's tables and migrates older schemas.
//! None of that may reach a file an operator only asked to inspect. So redb gets a backend that
//! reads the file and keeps every write in memory, page by page: redb sees its own writes, the
//! file keeps its bytes.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::Path,
    sync::Mutex,
};

use redb::StorageBackend;

/// Granularity of the in-memory copies of written parts of the file.
const PAGE: u64 = 4096;

#[derive(Debug)]
pub(super) struct ReadOnlyFile {
    file: File,
    state: Mutex<Overlay>,
}

#[derive(Debug)]
struct Overlay {
    /// The length redb set, whatever the file's.
    len: u64,
    /// How much of the file still shows through: a shrink hides the file's bytes beyond it for
    /// good (growing again reads zeros there, as a real file would).
    visible: u64,
    /// Pages written, by index.
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl ReadOnlyFile {
    /// Opens `path` for reading, with a shared lock: a lamina serving on this store holds an
    /// exclusive one (redb's), so either this fails with `WouldBlock` or the daemon cannot
    /// start until the inspection is over.
    pub(super) fn open(path: &Path) -> io::Result<ReadOnlyFile> {
        let file = File::open(path)?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = file.metadata()?.len();
        Ok(ReadOnlyFile {
            file,
            state: Mutex::new(Overlay {
                len,
                visible: len,
                pages: BTreeMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Overlay> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Page `index` as it reads now: the written copy, else the file's bytes (zeros past what
    /// shows of it).
    fn page(&self, o: &Overlay, index: u64) -> io::Result<Box<[u8]>> {
        if let Some(page) = o.pages.get(&index) {
            return Ok(page.clone());
        }
        let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
        let start = index * PAGE;
        let shown = o.visible.saturating_sub(start).min(PAGE) as usize;
        if shown > 0 {
            self.file.read_exact_at(&mut page[..shown], start)?;
        }
        Ok(page)
    }
}

impl StorageBackend for ReadOnlyFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len)
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let o = self.lock();
        if offset + len as u64 > o.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {len} bytes at {offset} past the end ({})", o.len),
            ));
        }
        let mut out = Vec::with_capacity(len);
        let mut at = offset;
        let end = offset + len as u64;
        while at < end {
            let (index, within) = (at / PAGE, at % PAGE);
            let take = (PAGE - within).min(end - at);
            let page = self.page(&o, index)?;
            out.extend_from_slice(&page[within as usize..(within + take) as usize]);
            at += take;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut o = self.lock();
        if len < o.len {
            o.visible = o.visible.min(len);
            // What lies past the new end must read as zeros if the file grows again.
            o.pages.retain(|&index, _| index * PAGE < len);
            let last = len / PAGE;
            if !len.is_multiple_of(PAGE) {
                if let Some(page) = o.pages.get_mut(&last) {
                    page[(len % PAGE) as usize..].fill(0);
                }
            }
        }
        o.len = len;
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut o = self.lock();
        let end = offset + data.len() as u64;
        let mut at = offset;
        while at < end {
            let (index, within) = (at / PAGE, at % PAGE);
            let take = (PAGE - within).min(end - at);
            let mut page = self.page(&o, index)?;
            let from = (at - offset) as usize;
            page[within as usize..(within + take) as usize]
                .copy_from_slice(&data[from..from + take as usize]);
            o.pages.insert(index, page);
            at += take;
        }
        o.len = o.len.max(end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_see_writes_and_the_file_keeps_its_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let original: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &original).unwrap();
        let f = ReadOnlyFile::open(&path).unwrap();
        assert_eq!(f.read(0, 10_000).unwrap(), original);
        // Across a page boundary, and past the end (the file grows in memory).
        f.write(4090, &[1; 20]).unwrap();
        f.write(9_990, &[2; 100]).unwrap();
        assert_eq!(f.len().unwrap(), 10_090);
        let mut want = original.clone();
        want[4090..4110].fill(1);
        want.resize(10_090, 0);
        want[9_990..].fill(2);
        assert_eq!(f.read(0, 10_090).unwrap(), want);
        assert!(f.read(10_000, 100).is_err());
        // Shrunk, then grown: the file's bytes past the shrink do not come back.
        f.set_len(5_000).unwrap();
        f.set_len(9_000).unwrap();
        let back = f.read(0, 9_000).unwrap();
        assert_eq!(&back[..4090], &original[..4090]);
        assert!(back[5_000..].iter().all(|&b| b == 0));
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), original);
    }

    #[test]
    fn a_file_locked_by_its_writer_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("db");
        let _db = redb::Database::create(&path).unwrap();
        let err = ReadOnlyFile::open(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }
}
