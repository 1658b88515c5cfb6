//! Writes an uncompressed OCI layer (a tar stream) into a snapshot's upper directory, with the
//! result containerd's own applier gives (`archive.Apply`, with its overlay whiteout
//! conversion when the snapshot has parents).
//!
//! Every name is resolved inside the upper directory: the parent of each entry is opened with
//! `openat2(RESOLVE_IN_ROOT)` from the descriptor of the upper directory (or is the last
//! entry's, still open), so a symlink the layer made earlier, or `..` in a name or a link
//! target, resolves as if the upper directory were `/`, never outside it; the last component
//! is then created (replacing what the name held), chowned and chmodded relative to that
//! parent without following a symlink. A hardlink's target is resolved the same way, so it can
//! only be an entry of this layer's tree.

use std::{
    collections::HashSet,
    ffi::OsStr,
    fs::File,
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    rc::Rc,
};

use nix::{
    errno::Errno,
    fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag},
    sys::{
        stat::{fchmodat, fstatat, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag},
        time::TimeSpec,
    },
    unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags},
};

use super::{
    names::{self, Base},
    sparse,
};
use crate::error::{Error, Result};
use crate::sys::{at, xattr};

/// How the layer's whiteouts are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// The snapshot has parents and is mounted as an overlay: a whiteout becomes a 0/0
    /// character device and the opaque marker overlayfs' `opaque` attribute (in the namespace
    /// of [`Target::overlay_xattrs`]), for the kernel to read.
    Overlay,
    /// The snapshot has no parent (a bind mount): there is nothing below to hide, so a
    /// whiteout deletes what this layer itself wrote earlier, as containerd's applier does.
    Delete,
}

/// The namespace of the attributes overlayfs reads on lamina's layers: its mount option
/// `userxattr` (which lamina adds inside a user namespace, where `trusted.*` cannot be set)
/// switches it from `trusted.overlay.*` to `user.overlay.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayXattrs {
    Trusted,
    User,
}

impl OverlayXattrs {
    /// What the overlay options `options` make overlayfs read.
    pub fn of_mount_options(options: &[String]) -> OverlayXattrs {
        if options.iter().any(|o| o == "userxattr") {
            OverlayXattrs::User
        } else {
            OverlayXattrs::Trusted
        }
    }

    fn opaque(self) -> &'static [u8] {
        match self {
            OverlayXattrs::Trusted => b"trusted.overlay.opaque",
            OverlayXattrs::User => b"user.overlay.opaque",
        }
    }

    /// Whether the attribute `key` is never taken from a layer nor copied from a parent
    /// layer's directory: the kernel's `trusted.*` (containerd's applier leaves those out
    /// too), and under `userxattr` overlayfs' own `user.overlay.*`, which would otherwise make
    /// a directory opaque or a file a whiteout in the merged view.
    fn reserved(self, key: &[u8]) -> bool {
        key.starts_with(b"trusted.")
            || (self == OverlayXattrs::User && key.starts_with(b"user.overlay."))
    }
}

/// Where a layer goes.
pub struct Target {
    /// The snapshot's upper directory (its `fs`), the root every name is resolved in.
    pub upper: OwnedFd,
    /// The parents' `fs` directories, nearest first: a directory the layer implies but does
    /// not list takes its owner, mode, times and attributes from the nearest parent that has
    /// it, as containerd's applier does.
    pub lowers: Vec<OwnedFd>,
    pub whiteouts: Whiteouts,
    pub overlay_xattrs: OverlayXattrs,
    /// Leave out block and character devices, which a user namespace cannot make; containerd's
    /// applier skips them there too.
    pub skip_devices: bool,
}

/// What one entry's header says, after the PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    atime: Option<TimeSpec>,
    mtime: TimeSpec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A sparse file's map and name (PAX `GNU.sparse.*` records).
    sparse: Option<sparse::Sparse>,
}

/// Extracts the tar stream `input` into `target`. Stops at the archive's end (what follows is
/// the caller's to read); an error names the entry it stopped at.
pub fn extract(target: &Target, input: &mut impl Read) -> Result<()> {
    let mut x = Extractor {
        t: target,
        dirs: Vec::new(),
        unpacked: HashSet::new(),
        opaque_done: HashSet::new(),
        buf: vec![0; COPY_BUF],
        last_dir: None,
    };
    // Records over Go's limit are refused before the tar reader would read them whole.
    let mut archive = tar::Archive::new(super::guard::Guard::new(input));
    let entries = archive
        .entries()
        .map_err(|e| invalid("reading the layer", &e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid("reading the layer", &e))?;
        let name = entry.path_bytes().into_owned();
        x.entry(&name, &mut entry).map_err(|e| match e {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!(
                "layer entry {:?}: {m}",
                String::from_utf8_lossy(&name)
            )),
            e => e,
        })?;
    }
    x.finish()
}

fn invalid(context: &str, e: &io::Error) -> Error {
    Error::InvalidArgument(format!(
        "{context}: {e} (the layer is not a valid tar stream)"
    ))
}

fn os(e: impl Into<io::Error>, what: &str, name: &[u8]) -> Error {
    let e: io::Error = e.into();
    match e.raw_os_error() {
        // The layer asks for something the tree cannot hold (a file where it needs a
        // directory, a hardlink to nothing): its content is wrong, not the disk.
        Some(
            libc::ENOTDIR
            | libc::EEXIST
            | libc::ENOENT
            | libc::ELOOP
            | libc::EXDEV
            | libc::EPERM
            | libc::EINVAL
            | libc::ENAMETOOLONG
            | libc::E2BIG
            | libc::ERANGE,
        ) => Error::InvalidArgument(format!("{what} {:?}: {e}", String::from_utf8_lossy(name))),
        _ => Error::io(
            "writing a layer entry",
            String::from_utf8_lossy(name).into_owned(),
            e,
        ),
    }
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: the caller passes a descriptor a syscall just returned, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens the directory `components` under `root`, resolving every symlink on the way as if
/// `root` were `/`.
fn resolve(root: &OwnedFd, components: &[&[u8]]) -> nix::Result<OwnedFd> {
    if components.is_empty() {
        return root
            .try_clone()
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)));
    }
    let path = OsStr::from_bytes(&names::join(components)).to_owned();
    let how = || {
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    // RESOLVE_IN_ROOT fails with EAGAIN when a rename anywhere on the system raced with the
    // lookup: it is safe to try again.
    let mut tries = 0;
    loop {
        match openat2(root.as_raw_fd(), path.as_os_str(), how()) {
            Err(Errno::EAGAIN) if tries < 16 => tries += 1,
            result => return result.map(owned),
        }
    }
}

fn lstat(dir: &OwnedFd, name: &OsStr) -> nix::Result<Option<nix::sys::stat::FileStat>> {
    match fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `name` in `dir`, a whole tree if it is a directory, never following a symlink. A
/// loop over a stack of open directories, not a recursion: a layer can build a tree deep enough
/// (through symlinked parents) to overflow a thread's stack.
fn remove_all(dir: &OwnedFd, name: &OsStr) -> nix::Result<()> {
    match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e),
    }
    /// A directory being emptied: its descriptor, its name in its parent, what is left in it.
    struct Level {
        fd: OwnedFd,
        name: std::ffi::OsString,
        left: Vec<std::ffi::CString>,
    }
    let enter = |at: &OwnedFd, name: &OsStr| -> nix::Result<Level> {
        let fd = openat(
            Some(at.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(owned)?;
        let left = at::names(&fd).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
        Ok(Level {
            fd,
            name: name.to_owned(),
            left,
        })
    };
    let mut stack = vec![enter(dir, name)?];
    while let Some(top) = stack.last_mut() {
        match top.left.pop() {
            Some(child) => {
                let child = OsStr::from_bytes(child.as_bytes());
                match unlinkat(Some(top.fd.as_raw_fd()), child, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(Errno::EISDIR) => {
                        let level = enter(&top.fd, child)?;
                        stack.push(level);
                    }
                    Err(e) => return Err(e),
                }
            }
            None => {
                let done = stack.pop().expect("a level is on the stack");
                let parent = stack.last().map_or(dir, |l| &l.fd);
                unlinkat(
                    Some(parent.as_raw_fd()),
                    done.name.as_os_str(),
                    UnlinkatFlags::RemoveDir,
                )?;
            }
        }
    }
    Ok(())
}

/// Go's `time.Unix(0, 0)` … `time.Unix(0, 1<<63-1)`: containerd sets a time outside that range
/// to the epoch.
fn bound(t: TimeSpec) -> TimeSpec {
    if t.tv_sec() < 0
        || (t.tv_sec() as i128) * 1_000_000_000 + (t.tv_nsec() as i128) > i64::MAX as i128
    {
        TimeSpec::new(0, 0)
    } else {
        t
    }
}

/// A PAX time: decimal seconds, an optional fraction, maybe negative.
fn pax_time(value: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(value).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        if !d.is_ascii_digit() {
            return None;
        }
        nanos += i64::from(d - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if neg {
        // -1.5 s is 2 s before the epoch plus 0.5 s.
        if nanos == 0 {
            TimeSpec::new(-secs, 0)
        } else {
            TimeSpec::new(-secs - 1, 1_000_000_000 - nanos)
        }
    } else {
        TimeSpec::new(secs, nanos)
    })
}

struct Extractor<'t> {
    t: &'t Target,
    /// Directories written, with their times: set at the end, since each file created in a
    /// directory changes its mtime.
    dirs: Vec<(Vec<u8>, Option<TimeSpec>, TimeSpec)>,
    /// Entries this layer wrote (Delete mode: an opaque marker keeps them).
    unpacked: HashSet<Vec<u8>>,
    /// Directories whose opaque marker was handled (Delete mode).
    opaque_done: HashSet<Vec<u8>>,
    /// Where file contents pass from the layer to their files.
    buf: Vec<u8>,
    /// The last entry's directory, by its name's components: entries mostly follow a sibling,
    /// and resolving the same directory again (openat2, then close) would be two of a small
    /// file's seven system calls. Forgotten whenever anything is deleted or replaced (see
    /// [`Extractor::forget_dir`]); creating a name cannot change what an existing one
    /// resolves to.
    last_dir: Option<(Vec<Vec<u8>>, Rc<OwnedFd>)>,
}

/// An entry just written: open (a regular file), or by its name in its directory.
#[derive(Clone, Copy)]
enum At<'a> {
    Open(&'a File),
    Name(&'a OwnedFd, &'a OsStr),
}

/// Bytes per write of a file's content.
const COPY_BUF: usize = 256 * 1024;

impl Extractor<'_> {
    fn entry<R: Read>(&mut self, raw_name: &[u8], entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let header = entry.header().clone();
        let mut kind = header.entry_type();
        // Legacy archives mark directories by a trailing slash on a regular-file entry (by
        // the name of the header and its records, not a sparse file's own: Go's order).
        if header.as_bytes()[156] == 0 && raw_name.ends_with(b"/") {
            kind = tar::EntryType::Directory;
        }
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let mut meta = self.meta(entry)?;
        let sparse = meta.sparse.take();
        if sparse.is_some() && kind != tar::EntryType::Regular {
            return Err(Error::InvalidArgument(
                "sparse-file records on an entry that is not a regular file".into(),
            ));
        }
        // Go's reader names a sparse file as its records do (GNU tar puts a made-up name,
        // `GNUSparseFile.<pid>/<name>`, in the header).
        let sparse_name = sparse.as_ref().and_then(|s| s.name.clone());
        let raw_name = sparse_name.as_deref().unwrap_or(raw_name);
        if self.t.skip_devices && matches!(kind, tar::EntryType::Block | tar::EntryType::Char) {
            tracing::warn!(entry = %String::from_utf8_lossy(raw_name), "device node left out: lamina runs in a user namespace");
            return Ok(());
        }
        let components = names::clean(raw_name);
        let Some((base, parent)) = components.split_last() else {
            return Ok(()); // the root itself: containerd ignores it too
        };
        let base_os = OsStr::from_bytes(base);
        let dir = self.parent(parent)?;
        match names::base(base).map_err(Error::InvalidArgument)? {
            Base::Opaque => return self.opaque(&dir, parent),
            Base::Whiteout(original) => return self.whiteout(&dir, parent, original, &meta),
            Base::Plain => {}
        }
        let is_dir = kind == tar::EntryType::Directory;
        let perm = meta.mode & 0o7777;
        let fd = Some(dir.as_raw_fd());
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                let failed = |e| os(e, "creating directory", raw_name);
                self.make(&dir, base_os, raw_name, true, failed, || {
                    mkdirat(fd, base_os, Mode::from_bits_truncate(perm))
                })?;
            }
            T::Regular => {
                let failed = |e| os(e, "creating file", raw_name);
                let file = self
                    .make(&dir, base_os, raw_name, false, failed, || {
                        openat(
                            fd,
                            base_os,
                            OFlag::O_WRONLY
                                | OFlag::O_CREAT
                                | OFlag::O_EXCL
                                | OFlag::O_NOFOLLOW
                                | OFlag::O_CLOEXEC,
                            Mode::from_bits_truncate(perm),
                        )
                    })?
                    .expect("only a directory is kept");
                let mut file = File::from(owned(file));
                let copied = match sparse {
                    Some(sparse) => sparse::write(sparse, entry, &mut file, &mut self.buf),
                    None => self.copy(entry, &mut file).map_err(|e| {
                        if e.kind() == io::ErrorKind::UnexpectedEof
                            || e.kind() == io::ErrorKind::InvalidData
                            || e.kind() == io::ErrorKind::InvalidInput
                        {
                            invalid("reading a file's content", &e)
                        } else {
                            Error::io(
                                "writing a layer file",
                                String::from_utf8_lossy(raw_name).into_owned(),
                                e,
                            )
                        }
                    }),
                };
                copied?;
                // The file just made is the one open: its owner, attributes, mode and times go
                // through the descriptor, without looking the name up four more times.
                self.finish_entry(At::Open(&file), raw_name, kind, &meta)?;
            }
            T::Block | T::Char | T::Fifo => {
                let sflag = match kind {
                    T::Block => SFlag::S_IFBLK,
                    T::Char => SFlag::S_IFCHR,
                    _ => SFlag::S_IFIFO,
                };
                let bad = |e: io::Error| Error::InvalidArgument(format!("its device number: {e}"));
                let major = header.device_major().map_err(bad)?.unwrap_or(0);
                let minor = header.device_minor().map_err(bad)?.unwrap_or(0);
                let failed = |e| os(e, "creating device or fifo", raw_name);
                self.make(&dir, base_os, raw_name, false, failed, || {
                    mknodat(
                        fd,
                        base_os,
                        sflag,
                        Mode::from_bits_truncate(perm),
                        libc::makedev(major, minor),
                    )
                })?;
            }
            T::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| Error::InvalidArgument("a hardlink without a target".into()))?
                    .into_owned();
                let target = names::clean(&link);
                let Some((tbase, tparent)) = target.split_last() else {
                    return Err(Error::InvalidArgument(format!(
                        "hardlink to the layer's root ({:?})",
                        String::from_utf8_lossy(&link)
                    )));
                };
                // containerd looks for the target once the name is cleared: a target reached
                // through what the name held is gone by then. So the name is cleared first
                // here (hardlinks are few: the lstat is cheap).
                self.clear(&dir, base_os, raw_name, false)?;
                let tdir =
                    resolve(&self.t.upper, tparent).map_err(|e| os(e, "hardlink target", &link))?;
                linkat(
                    Some(tdir.as_raw_fd()),
                    OsStr::from_bytes(tbase),
                    fd,
                    base_os,
                    AtFlags::empty(),
                )
                .map_err(|e| os(e, "hardlink to", &link))?;
            }
            T::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| Error::InvalidArgument("a symlink without a target".into()))?
                    .into_owned();
                let failed = |e| os(e, "creating symlink", raw_name);
                self.make(&dir, base_os, raw_name, false, failed, || {
                    symlinkat(OsStr::from_bytes(&link), fd, base_os)
                })?;
            }
            other => {
                // containerd's applier knows these types and no others (an old GNU sparse
                // file, 'S', included: Go's reader leaves its type as it is).
                return Err(Error::InvalidArgument(format!(
                    "unhandled tar entry type {:?} ({})",
                    other.as_byte() as char,
                    other.as_byte()
                )));
            }
        }
        if kind != tar::EntryType::Regular {
            self.finish_entry(At::Name(&dir, base_os), raw_name, kind, &meta)?;
        }
        if is_dir {
            self.dirs
                .push((names::join(&components), meta.atime, meta.mtime));
        }
        if self.t.whiteouts == Whiteouts::Delete {
            self.unpacked.insert(names::join(&components));
        }
        Ok(())
    }

    /// Owner, attributes, mode and times, in containerd's order (the mode after the owner,
    /// since chown clears setuid and setgid).
    fn finish_entry(
        &self,
        at: At<'_>,
        raw_name: &[u8],
        kind: tar::EntryType,
        meta: &Meta,
    ) -> Result<()> {
        let (uid, gid) = (Uid::from_raw(meta.uid), Gid::from_raw(meta.gid));
        let mode = Mode::from_bits_truncate(meta.mode & 0o7777);
        // A file just made mostly has the owner and mode it should (lamina's own, the mode
        // it was created with): one fstat then spares a chown and a chmod, each a journaled
        // inode update. It shows what is there, whatever made it so (a setgid parent, a
        // default ACL, the umask, a write that cleared setuid); chown would only clear what
        // the chmod below sets again.
        let mut chmod = true;
        match at {
            At::Open(file) => {
                let st = nix::sys::stat::fstat(file.as_raw_fd())
                    .map_err(|e| os(e, "looking at", raw_name))?;
                if (st.st_uid, st.st_gid) != (meta.uid, meta.gid) {
                    fchown(file.as_raw_fd(), Some(uid), Some(gid))
                } else {
                    // An attribute set below can change the mode (an access ACL does): then
                    // the chmod comes after it, as in containerd's order.
                    chmod = st.st_mode & 0o7777 != mode.bits() || !meta.xattrs.is_empty();
                    Ok(())
                }
            }
            At::Name(dir, name) => fchownat(
                Some(dir.as_raw_fd()),
                name,
                Some(uid),
                Some(gid),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ),
        }
        .map_err(|e| os(e, "changing the owner of", raw_name))?;
        for (key, value) in &meta.xattrs {
            // containerd refuses to set the kernel's own attributes from an archive, and
            // goes on without them; overlayfs' own (under userxattr) go the same way.
            if self.t.overlay_xattrs.reserved(key) {
                tracing::warn!(entry = %String::from_utf8_lossy(raw_name), key = %String::from_utf8_lossy(key), "ignored an attribute the kernel or overlayfs reserves");
                continue;
            }
            let set = match at {
                At::Open(file) => xattr::set_open(file, key, value),
                At::Name(dir, name) => xattr::set(dir, name, key, value, false),
            };
            match set {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                    tracing::warn!(entry = %String::from_utf8_lossy(raw_name), key = %String::from_utf8_lossy(key), "ignored an attribute the filesystem does not support");
                }
                // In user.*, only regular files and directories may have attributes.
                Err(e)
                    if e.raw_os_error() == Some(libc::EPERM)
                        && key.starts_with(b"user.")
                        && !matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory) =>
                {
                    tracing::warn!(entry = %String::from_utf8_lossy(raw_name), key = %String::from_utf8_lossy(key), "ignored a user attribute on an entry that cannot have one");
                }
                Err(e) => return Err(os(e, "setting an attribute of", raw_name)),
            }
        }
        match at {
            At::Open(file) => {
                if chmod {
                    nix::sys::stat::fchmod(file.as_raw_fd(), mode)
                        .map_err(|e| os(e, "changing the mode of", raw_name))?;
                }
                let (atime, mtime) = times(meta.atime, meta.mtime);
                nix::sys::stat::futimens(file.as_raw_fd(), &atime, &mtime)
                    .map_err(|e| os(e, "setting the times of", raw_name))?;
            }
            At::Name(dir, name) => {
                // By what is there, not by the entry's type: a hardlink to a symlink is a
                // symlink, and chmod would follow it (containerd's applier looks first too).
                let is_symlink = lstat(dir, name)
                    .map_err(|e| os(e, "looking at", raw_name))?
                    .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
                if !is_symlink {
                    fchmodat(
                        Some(dir.as_raw_fd()),
                        name,
                        mode,
                        FchmodatFlags::FollowSymlink,
                    )
                    .map_err(|e| os(e, "changing the mode of", raw_name))?;
                }
                if kind != tar::EntryType::Directory {
                    set_times(dir, name, meta.atime, meta.mtime)
                        .map_err(|e| os(e, "setting the times of", raw_name))?;
                }
            }
        }
        Ok(())
    }

    /// A file's content from the layer into `file`, through the extractor's buffer (larger
    /// than `io::copy`'s 8 KiB: fewer writes, each one more of the page cache at once).
    fn copy(&mut self, entry: &mut impl Read, file: &mut File) -> io::Result<()> {
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            file.write_all(&self.buf[..n])?;
        }
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<Meta> {
        let header = entry.header();
        let bad = |what: &str, e: io::Error| Error::InvalidArgument(format!("its {what}: {e}"));
        let mut meta = Meta {
            mode: header.mode().map_err(|e| bad("mode", e))?,
            uid: header.uid().map_err(|e| bad("uid", e))? as u32,
            gid: header.gid().map_err(|e| bad("gid", e))? as u32,
            atime: header
                .as_gnu()
                .filter(|g| g.atime[0] != 0)
                .and_then(|g| g.atime().ok())
                .map(|t| TimeSpec::new(t as i64, 0)),
            mtime: TimeSpec::new(header.mtime().map_err(|e| bad("mtime", e))? as i64, 0),
            xattrs: Vec::new(),
            sparse: None,
        };
        let mut sparse_records = sparse::Records::default();
        if let Some(pax) = entry.pax_extensions().map_err(|e| bad("PAX records", e))? {
            for ext in pax {
                let ext = ext.map_err(|e| bad("PAX records", e))?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                let number = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u32>().ok())
                };
                match key {
                    b"uid" => {
                        meta.uid = number().ok_or_else(|| {
                            Error::InvalidArgument("its PAX uid is not a number".into())
                        })?
                    }
                    b"gid" => {
                        meta.gid = number().ok_or_else(|| {
                            Error::InvalidArgument("its PAX gid is not a number".into())
                        })?
                    }
                    b"mtime" => {
                        meta.mtime = pax_time(value).ok_or_else(|| {
                            Error::InvalidArgument("its PAX mtime is not a time".into())
                        })?
                    }
                    b"atime" => {
                        meta.atime = Some(pax_time(value).ok_or_else(|| {
                            Error::InvalidArgument("its PAX atime is not a time".into())
                        })?)
                    }
                    k if sparse_records.take(k, value)? => {}
                    k => {
                        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                            meta.xattrs.push((name.to_vec(), value.to_vec()));
                        }
                    }
                }
            }
        }
        // A 1.0 map is read from the entry's data now, and every map checked, whatever the
        // entry turns out to be (a whiteout too), as Go's reader does.
        meta.sparse = sparse_records.sparse(entry.size(), entry)?;
        Ok(meta)
    }

    /// Opens the directory an entry goes in, creating what is missing of it as containerd
    /// does (0755, or as the nearest parent layer has it).
    ///
    /// containerd resolves the parent's path inside the root first, symlinks included (a
    /// symlink to `/x` means the root's `x`), and then creates what is missing of the resolved
    /// path. When it all exists, one `openat2(RESOLVE_IN_ROOT)` does that resolution; when not,
    /// [`Extractor::walk`] does it a component at a time. The last entry's directory is
    /// answered again without either (see `last_dir`).
    fn parent(&mut self, components: &[&[u8]]) -> Result<Rc<OwnedFd>> {
        if let Some((name, fd)) = &self.last_dir {
            if name.len() == components.len() && name.iter().zip(components).all(|(a, b)| a == b) {
                return Ok(fd.clone());
            }
        }
        let fd = Rc::new(match resolve(&self.t.upper, components) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => self.walk(components)?,
            Err(e) => return Err(os(e, "opening directory", &names::join(components))),
        });
        self.last_dir = Some((components.iter().map(|c| c.to_vec()).collect(), fd.clone()));
        Ok(fd)
    }

    /// Makes the entry `name` in `dir` with `create`, which fails with EEXIST when the name is
    /// taken. Most entries name something new, so the name is looked at only then: what is
    /// there is replaced (deleted, a whole tree if a directory), but a directory by a
    /// directory, which is kept (`None`), as containerd's applier keeps it.
    fn make<T>(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        raw_name: &[u8],
        is_dir: bool,
        failed: impl Fn(Errno) -> Error,
        mut create: impl FnMut() -> nix::Result<T>,
    ) -> Result<Option<T>> {
        match create() {
            Err(Errno::EEXIST) => {}
            made => return made.map(Some).map_err(failed),
        }
        if self.clear(dir, name, raw_name, is_dir)? {
            return Ok(None);
        }
        create().map(Some).map_err(failed)
    }

    /// Deletes what `name` in `dir` holds (a whole tree if a directory), but a directory when
    /// the entry is one (`is_dir`): that one is kept, and the answer is true.
    fn clear(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        raw_name: &[u8],
        is_dir: bool,
    ) -> Result<bool> {
        let Some(st) = lstat(dir, name).map_err(|e| os(e, "looking at", raw_name))? else {
            return Ok(false);
        };
        if is_dir && at::is_dir(&st) {
            return Ok(true);
        }
        self.forget_dir();
        remove_all(dir, name).map_err(|e| os(e, "replacing", raw_name))?;
        Ok(false)
    }

    /// Forgets the cached directory before anything is deleted: it may be what goes, or lie
    /// under it, or be reached through a symlink that goes.
    fn forget_dir(&mut self) {
        self.last_dir = None;
    }

    /// Resolves `components` inside the root one at a time, each opened relative to the last
    /// with `O_NOFOLLOW`: a symlink is read and its target resolved in its place (an absolute
    /// one from the root, `..` never above the root), and a missing directory is created.
    fn walk(&self, components: &[&[u8]]) -> Result<OwnedFd> {
        /// Linux's own limit on symlinks in one resolution.
        const MAX_LINKS: usize = 40;
        let failed = |e: Errno| os(e, "opening directory", &names::join(components));
        // The resolved directories below the root, with their names.
        let mut stack: Vec<(OwnedFd, Vec<u8>)> = Vec::new();
        let mut todo: std::collections::VecDeque<Vec<u8>> =
            components.iter().map(|c| c.to_vec()).collect();
        let mut links = 0;
        while let Some(c) = todo.pop_front() {
            match &c[..] {
                b"" | b"." => continue,
                b".." => {
                    stack.pop();
                    continue;
                }
                _ => {}
            }
            let cur = stack.last().map_or(&self.t.upper, |(fd, _)| fd);
            let name = OsStr::from_bytes(&c);
            match lstat(cur, name).map_err(failed)? {
                Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(failed(Errno::ELOOP));
                    }
                    let target =
                        nix::fcntl::readlinkat(Some(cur.as_raw_fd()), name).map_err(failed)?;
                    let target = target.as_bytes();
                    if target.starts_with(b"/") {
                        stack.clear();
                    }
                    for part in target.split(|&b| b == b'/').rev() {
                        todo.push_front(part.to_vec());
                    }
                }
                Some(st) if at::is_dir(&st) => {
                    let fd = at::open_dir(Some(cur), name)
                        .map_err(|e| failed(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
                    stack.push((fd, c));
                }
                Some(_) => return Err(failed(Errno::ENOTDIR)),
                None => {
                    mkdirat(Some(cur.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
                        .map_err(failed)?;
                    let fd = at::open_dir(Some(cur), name)
                        .map_err(|e| failed(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
                    // Made here, so its descriptor is the directory itself (no umask in its
                    // mode).
                    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o755))
                        .map_err(failed)?;
                    let resolved: Vec<&[u8]> = stack
                        .iter()
                        .map(|(_, n)| &n[..])
                        .chain(std::iter::once(&c[..]))
                        .collect();
                    self.copy_dir_info(cur, &resolved)?;
                    stack.push((fd, c));
                }
            }
        }
        match stack.pop() {
            Some((fd, _)) => Ok(fd),
            None => {
                self.t.upper.try_clone().map_err(|e| {
                    Error::io("duplicating the descriptor of", "the upper directory", e)
                })
            }
        }
    }

    /// A directory the layer implies takes owner, mode, times and attributes (but the
    /// reserved ones, [`OverlayXattrs::reserved`]) from the nearest parent layer that has a
    /// directory there; a non-directory there stops the search (the layer replaced it).
    fn copy_dir_info(&self, dir: &OwnedFd, prefix: &[&[u8]]) -> Result<()> {
        let (base, parent) = prefix.split_last().expect("a prefix has a last component");
        let name = OsStr::from_bytes(base);
        let joined = names::join(prefix);
        for lower in &self.t.lowers {
            let ldir = match resolve(lower, parent) {
                Ok(d) => d,
                Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
                Err(e) => return Err(os(e, "looking at a parent layer's", &joined)),
            };
            let Some(st) =
                lstat(&ldir, name).map_err(|e| os(e, "looking at a parent layer's", &joined))?
            else {
                continue;
            };
            if !at::is_dir(&st) {
                break;
            }
            let fd = Some(dir.as_raw_fd());
            fchownat(
                fd,
                name,
                Some(Uid::from_raw(st.st_uid)),
                Some(Gid::from_raw(st.st_gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| os(e, "changing the owner of", &joined))?;
            fchmodat(
                fd,
                name,
                Mode::from_bits_truncate(st.st_mode & 0o7777),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| os(e, "changing the mode of", &joined))?;
            set_times(
                dir,
                name,
                Some(TimeSpec::new(st.st_atime, st.st_atime_nsec)),
                TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
            )
            .map_err(|e| os(e, "setting the times of", &joined))?;
            let keys = match xattr::list(&ldir, name) {
                Ok(keys) => keys,
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
                Err(e) => return Err(os(e, "listing the attributes of", &joined)),
            };
            for key in keys.iter().filter(|k| !self.t.overlay_xattrs.reserved(k)) {
                let value = match xattr::get(&ldir, name, key) {
                    Ok(v) => v,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::ENODATA)) => {
                        continue
                    }
                    Err(e) => return Err(os(e, "reading an attribute of", &joined)),
                };
                match xattr::set(dir, name, key, &value, true) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOTSUP | libc::ENODATA | libc::EEXIST)
                        ) => {}
                    Err(e) => return Err(os(e, "setting an attribute of", &joined)),
                }
            }
            return Ok(());
        }
        Ok(())
    }

    fn opaque(&mut self, dir: &OwnedFd, parent: &[&[u8]]) -> Result<()> {
        self.forget_dir();
        let joined = names::join(parent);
        match self.t.whiteouts {
            Whiteouts::Overlay => xattr::set(
                dir,
                OsStr::new("."),
                self.t.overlay_xattrs.opaque(),
                b"y",
                false,
            )
            .map_err(|e| os(e, "making opaque", &joined)),
            Whiteouts::Delete => {
                if self.opaque_done.insert(joined.clone()) {
                    self.remove_not_unpacked(dir, &joined)?;
                }
                Ok(())
            }
        }
    }

    /// Deletes what under `dir` (whose name is `prefix`) this layer did not write itself.
    fn remove_not_unpacked(&self, dir: &OwnedFd, prefix: &[u8]) -> Result<()> {
        for child in at::names(dir).map_err(|e| os(e, "listing", prefix))? {
            let mut path = prefix.to_vec();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(child.as_bytes());
            let name = OsStr::from_bytes(child.as_bytes());
            if !self.unpacked.contains(&path) {
                remove_all(dir, name).map_err(|e| os(e, "deleting", &path))?;
                continue;
            }
            let is_dir = lstat(dir, name)
                .map_err(|e| os(e, "looking at", &path))?
                .is_some_and(|st| at::is_dir(&st));
            if is_dir {
                let sub = at::open_dir(Some(dir), name).map_err(|e| os(e, "opening", &path))?;
                self.remove_not_unpacked(&sub, &path)?;
            }
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        dir: &OwnedFd,
        parent: &[&[u8]],
        original: &[u8],
        meta: &Meta,
    ) -> Result<()> {
        self.forget_dir();
        let mut path = names::join(parent);
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(original);
        let name = OsStr::from_bytes(original);
        match self.t.whiteouts {
            Whiteouts::Overlay => {
                mknodat(
                    Some(dir.as_raw_fd()),
                    name,
                    SFlag::S_IFCHR,
                    Mode::empty(),
                    0,
                )
                .map_err(|e| os(e, "writing the whiteout of", &path))?;
                fchownat(
                    Some(dir.as_raw_fd()),
                    name,
                    Some(Uid::from_raw(meta.uid)),
                    Some(Gid::from_raw(meta.gid)),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| os(e, "changing the owner of", &path))
            }
            Whiteouts::Delete => remove_all(dir, name).map_err(|e| os(e, "deleting", &path)),
        }
    }

    /// Sets the directories' times, now that nothing more is created in them.
    fn finish(self) -> Result<()> {
        for (path, atime, mtime) in &self.dirs {
            let components = names::clean(path);
            let Some((base, parent)) = components.split_last() else {
                continue;
            };
            let dir = resolve(&self.t.upper, parent).map_err(|e| os(e, "opening", path))?;
            set_times(&dir, OsStr::from_bytes(base), *atime, *mtime)
                .map_err(|e| os(e, "setting the times of", path))?;
        }
        Ok(())
    }
}

/// containerd's times: the access time is the later of the two, each bounded to what Go can
/// hold.
fn times(atime: Option<TimeSpec>, mtime: TimeSpec) -> (TimeSpec, TimeSpec) {
    let atime = match atime {
        Some(a) if (a.tv_sec(), a.tv_nsec()) > (mtime.tv_sec(), mtime.tv_nsec()) => a,
        _ => mtime,
    };
    (bound(atime), bound(mtime))
}

fn set_times(
    dir: &OwnedFd,
    name: &OsStr,
    atime: Option<TimeSpec>,
    mtime: TimeSpec,
) -> nix::Result<()> {
    let (atime, mtime) = times(atime, mtime);
    utimensat(
        Some(dir.as_raw_fd()),
        name,
        &atime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        fs,
        os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
        path::Path,
    };

    use super::*;

    /// One entry of a crafted layer; names and link targets are written into the header as
    /// they are (no checks), as a hostile layer would have them.
    pub struct E<'a> {
        pub kind: tar::EntryType,
        pub name: &'a str,
        pub link: &'a str,
        pub mode: u32,
        pub owner: (u64, u64),
        pub mtime: u64,
        pub data: &'a [u8],
        pub pax: &'a [(&'a str, &'a [u8])],
        pub dev: (u32, u32),
    }

    pub fn e(kind: tar::EntryType, name: &str) -> E<'_> {
        E {
            kind,
            name,
            link: "",
            mode: if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            },
            owner: (0, 0),
            mtime: 1_600_000_000,
            data: b"",
            pax: &[],
            dev: (0, 0),
        }
    }

    pub fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
        E {
            data,
            ..e(tar::EntryType::Regular, name)
        }
    }

    pub fn dir(name: &str) -> E<'_> {
        e(tar::EntryType::Directory, name)
    }

    pub fn link<'a>(kind: tar::EntryType, name: &'a str, target: &'a str) -> E<'a> {
        E {
            link: target,
            ..e(kind, name)
        }
    }

    /// The tar stream of `entries`.
    pub fn tar(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for x in entries {
            if !x.pax.is_empty() {
                b.append_pax_extensions(x.pax.iter().copied()).unwrap();
            }
            let mut h = tar::Header::new_gnu();
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..x.name.len()].copy_from_slice(x.name.as_bytes());
            gnu.linkname[..x.link.len()].copy_from_slice(x.link.as_bytes());
            h.set_entry_type(x.kind);
            h.set_mode(x.mode);
            h.set_uid(x.owner.0);
            h.set_gid(x.owner.1);
            h.set_mtime(x.mtime);
            h.set_size(x.data.len() as u64);
            h.set_device_major(x.dev.0).unwrap();
            h.set_device_minor(x.dev.1).unwrap();
            if x.kind == tar::EntryType::GNUSparse {
                h.as_gnu_mut().unwrap().set_real_size(x.data.len() as u64);
            }
            h.set_cksum();
            b.append(&h, x.data).unwrap();
        }
        b.into_inner().unwrap()
    }

    pub fn target(upper: &Path, lowers: &[&Path], whiteouts: Whiteouts) -> Target {
        let open = |p: &Path| at::open_dir(None, p).unwrap();
        Target {
            upper: open(upper),
            lowers: lowers.iter().map(|p| open(p)).collect(),
            whiteouts,
            overlay_xattrs: OverlayXattrs::Trusted,
            skip_devices: false,
        }
    }

    fn run(upper: &Path, lowers: &[&Path], whiteouts: Whiteouts, entries: &[E<'_>]) -> Result<()> {
        extract(&target(upper, lowers, whiteouts), &mut &tar(entries)[..])
    }

    fn meta(p: &Path) -> fs::Metadata {
        fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn xattr_of(p: &Path, key: &str) -> Option<Vec<u8>> {
        let dir = at::open_dir(None, p.parent().unwrap()).unwrap();
        xattr::get(&dir, p.file_name().unwrap(), key.as_bytes()).ok()
    }

    use tar::EntryType as T;

    #[test]
    fn entries_are_written_with_their_modes_owners_times_links_and_attributes() {
        if !crate::testing::root_allowed("chown, mknod") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let up = tmp.path();
        let entries = [
            E {
                mtime: 5,
                ..dir("usr/")
            },
            E {
                mode: 0o4755,
                owner: (1000, 1001),
                mtime: 1_000_000,
                ..file("usr/bin/tool", b"#!/bin/sh\n")
            },
            link(T::Symlink, "usr/link", "bin/tool"),
            // A hardlink's header carries its file's mode, owner and time (containerd applies
            // them to the shared inode again, as tar writers expect).
            E {
                mode: 0o4755,
                owner: (1000, 1001),
                mtime: 1_000_000,
                ..link(T::Link, "usr/hard", "usr/bin/tool")
            },
            E {
                mode: 0o600,
                ..e(T::Fifo, "run/fifo")
            },
            E {
                mode: 0o666,
                dev: (1, 3),
                ..e(T::Char, "dev/null")
            },
            E {
                pax: &[
                    ("SCHILY.xattr.user.note", b"kept"),
                    ("SCHILY.xattr.trusted.evil", b"y"),
                    ("mtime", b"1234.5"),
                    ("uid", b"3000000"),
                ],
                ..file("notes", b"x")
            },
            E {
                mode: 0o000,
                ..dir("locked")
            },
            file("locked/inside", b"y"),
        ];
        run(up, &[], Whiteouts::Delete, &entries).unwrap();

        let tool = meta(&up.join("usr/bin/tool"));
        assert_eq!(
            tool.permissions().mode() & 0o7777,
            0o4755,
            "setuid kept after chown"
        );
        assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
        assert_eq!(tool.mtime(), 1_000_000);
        assert_eq!(tool.nlink(), 2, "the hardlink shares the inode");
        assert_eq!(fs::read(up.join("usr/hard")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(
            fs::read_link(up.join("usr/link")).unwrap(),
            Path::new("bin/tool")
        );
        // A directory the layer implies but does not list: 0755, as containerd makes it.
        assert_eq!(
            meta(&up.join("usr/bin")).permissions().mode() & 0o7777,
            0o755
        );
        // Its mtime is set at the end, after its files were created in it.
        assert_eq!(meta(&up.join("usr")).mtime(), 5);
        assert!(meta(&up.join("run/fifo")).file_type().is_fifo());
        let null = meta(&up.join("dev/null"));
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), libc::makedev(1, 3));
        let notes = up.join("notes");
        assert_eq!(xattr_of(&notes, "user.note").as_deref(), Some(&b"kept"[..]));
        assert_eq!(
            xattr_of(&notes, "trusted.evil"),
            None,
            "trusted.* never comes from a layer"
        );
        assert_eq!(
            (meta(&notes).mtime(), meta(&notes).mtime_nsec()),
            (1234, 500_000_000)
        );
        assert_eq!(
            meta(&notes).uid(),
            3_000_000,
            "PAX uid wins over the header's"
        );
        assert_eq!(meta(&up.join("locked")).permissions().mode() & 0o7777, 0);
        assert_eq!(fs::read(up.join("locked/inside")).unwrap(), b"y");
    }

    /// A file lamina makes mostly has the owner and mode its entry asks for already, and
    /// lamina then leaves out the chown and chmod; these are the cases where it does not, and
    /// the entry's owner and mode must still be what ends up on disk.
    #[test]
    fn a_file_gets_its_entry_s_owner_and_mode_whatever_it_was_created_with() {
        if !crate::testing::root_allowed("chown") {
            return;
        }
        // An access ACL: lamina's owner rw-, user 1000 rwx, group r--, mask rwx, others
        // r--. Setting it makes the mode's group bits the mask's (0674) until the chmod.
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 6u16, u32::MAX),
            (0x02, 7, 1000),
            (0x04, 4, u32::MAX),
            (0x10, 7, u32::MAX),
            (0x20, 4, u32::MAX),
        ] {
            acl.extend(tag.to_le_bytes());
            acl.extend(perm.to_le_bytes());
            acl.extend(id.to_le_bytes());
        }
        let tmp = tempfile::tempdir().unwrap();
        let up = tmp.path();
        let entries = [
            // New files in a setgid directory take its group, not lamina's.
            E {
                mode: 0o2775,
                owner: (0, 1234),
                ..dir("shared/")
            },
            file("shared/f", b"x"),
            // A umask takes bits away from the mode a file is created with.
            E {
                mode: 0o666,
                ..file("wide", b"x")
            },
            E {
                mode: 0o4755,
                ..file("suid", b"x")
            },
            E {
                pax: &[("SCHILY.xattr.system.posix_acl_access", &acl)],
                ..file("acl", b"x")
            },
        ];
        run(up, &[], Whiteouts::Delete, &entries).unwrap();
        let f = meta(&up.join("shared/f"));
        assert_eq!(meta(&up.join("shared")).gid(), 1234);
        assert_eq!(
            (f.uid(), f.gid()),
            (0, 0),
            "not the setgid directory's group"
        );
        let mode = |name: &str| meta(&up.join(name)).permissions().mode() & 0o7777;
        assert_eq!(mode("wide"), 0o666);
        assert_eq!(mode("suid"), 0o4755);
        assert_eq!(mode("acl"), 0o644, "the chmod comes after the ACL");
    }

    /// A parent layer with `etc/old`, and an empty upper directory beside it.
    fn parent_with_etc_old() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let (lower, up) = (tmp.path().join("lower"), tmp.path().join("upper"));
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::create_dir(&up).unwrap();
        fs::write(lower.join("etc/old"), "old").unwrap();
        (tmp, lower, up)
    }

    #[test]
    fn over_parents_whiteouts_are_overlay_whiteouts_and_implied_dirs_copy_the_parent_s() {
        if !crate::testing::root_allowed("chown, mknod, trusted.* attributes") {
            return;
        }
        let (_tmp, lower, up) = parent_with_etc_old();
        fs::set_permissions(lower.join("etc"), fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::chown(lower.join("etc"), Some(5), Some(6)).unwrap();
        let ldir = at::open_dir(None, &lower).unwrap();
        xattr::set(&ldir, OsStr::new("etc"), b"user.k", b"v", false).unwrap();
        let entries = [
            file("etc/.wh.old", b""),
            file("etc/new", b"new"),
            file("var/.wh..wh..opq", b""),
        ];
        run(&up, &[&lower], Whiteouts::Overlay, &entries).unwrap();

        let etc = meta(&up.join("etc"));
        assert_eq!(
            etc.permissions().mode() & 0o7777,
            0o750,
            "mode from the parent layer"
        );
        assert_eq!(
            (etc.uid(), etc.gid()),
            (5, 6),
            "owner from the parent layer"
        );
        assert_eq!(
            xattr_of(&up.join("etc"), "user.k").as_deref(),
            Some(&b"v"[..])
        );
        let old = meta(&up.join("etc/old"));
        assert!(
            old.file_type().is_char_device() && old.rdev() == 0,
            "a 0/0 whiteout"
        );
        assert_eq!(
            xattr_of(&up.join("var"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        for name in ["etc/.wh.old", "var/.wh..wh..opq"] {
            assert!(!up.join(name).exists(), "{name} is not written as a file");
        }
    }

    /// Under `userxattr` (lamina in a user namespace) overlayfs reads `user.overlay.*`: the
    /// opaque marker goes there, and those attributes never come from a layer or from a
    /// parent layer's directory (a parent's opaque marker would hide its own content).
    #[test]
    fn under_userxattr_overlay_s_attributes_are_user_overlay_and_never_copied() {
        if !crate::testing::root_allowed("mknod") {
            return;
        }
        let (_tmp, lower, up) = parent_with_etc_old();
        let ldir = at::open_dir(None, &lower).unwrap();
        xattr::set(
            &ldir,
            OsStr::new("etc"),
            b"user.overlay.opaque",
            b"y",
            false,
        )
        .unwrap();
        xattr::set(&ldir, OsStr::new("etc"), b"user.k", b"v", false).unwrap();
        let entries = [
            file("etc/.wh.old", b""),
            E {
                pax: &[
                    ("SCHILY.xattr.user.overlay.whiteout", b"y"),
                    ("SCHILY.xattr.user.note", b"kept"),
                ],
                ..file("etc/new", b"new")
            },
            file("var/.wh..wh..opq", b""),
        ];
        let target = Target {
            overlay_xattrs: OverlayXattrs::User,
            ..target(&up, &[&lower], Whiteouts::Overlay)
        };
        extract(&target, &mut &tar(&entries)[..]).unwrap();

        let old = meta(&up.join("etc/old"));
        assert!(
            old.file_type().is_char_device() && old.rdev() == 0,
            "a 0/0 whiteout"
        );
        assert_eq!(
            xattr_of(&up.join("var"), "user.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(xattr_of(&up.join("var"), "trusted.overlay.opaque"), None);
        assert_eq!(
            xattr_of(&up.join("etc"), "user.overlay.opaque"),
            None,
            "the parent's opaque marker is not copied to the implied directory"
        );
        assert_eq!(
            xattr_of(&up.join("etc"), "user.k").as_deref(),
            Some(&b"v"[..])
        );
        assert_eq!(xattr_of(&up.join("etc/new"), "user.overlay.whiteout"), None);
        assert_eq!(
            xattr_of(&up.join("etc/new"), "user.note").as_deref(),
            Some(&b"kept"[..])
        );
    }

    #[test]
    fn without_parents_whiteouts_delete_what_the_layer_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let up = tmp.path();
        let entries = [
            file("a", b"a"),
            file("d/x", b"x"),
            file("d/y", b"y"),
            file("d/.wh.x", b""),
            file(".wh.a", b""),
            file("d/.wh..wh..opq", b""),
        ];
        run(up, &[], Whiteouts::Delete, &entries).unwrap();
        assert!(!up.join("a").exists() && !up.join("d/x").exists());
        assert_eq!(
            fs::read(up.join("d/y")).unwrap(),
            b"y",
            "the opaque marker keeps this layer's own"
        );
        assert!(!up.join("d/.wh.x").exists() && !up.join(".wh.a").exists());
    }

    #[test]
    fn a_file_and_a_directory_replace_each_other() {
        let tmp = tempfile::tempdir().unwrap();
        let up = tmp.path();
        let entries = [
            file("p/q", b"q"),
            file("p", b"now a file"),
            dir("f"),
            file("f/in", b"in"),
            dir("f"),
            // The directory entries were written into is replaced by a symlink: what follows
            // is written where the name now leads.
            dir("b"),
            file("a/x", b"x"),
            link(T::Symlink, "a", "b"),
            file("a/y", b"y"),
        ];
        run(up, &[], Whiteouts::Delete, &entries).unwrap();
        assert_eq!(fs::read(up.join("p")).unwrap(), b"now a file");
        assert_eq!(
            fs::read(up.join("f/in")).unwrap(),
            b"in",
            "a directory over a directory merges"
        );
        assert_eq!(fs::read(up.join("b/y")).unwrap(), b"y");
        assert!(!up.join("b/x").exists());

        // A hardlink whose target is reached through the name it replaces: containerd clears
        // the name first, and then finds no target.
        let tmp = tempfile::tempdir().unwrap();
        let up = tmp.path();
        let entries = [
            dir("d"),
            file("d/f", b"f"),
            link(T::Symlink, "l", "d"),
            link(T::Link, "l", "l/f"),
        ];
        let err = run(up, &[], Whiteouts::Delete, &entries).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("hardlink target")),
            "{err}"
        );
        assert_eq!(meta(&up.join("d/f")).nlink(), 1);
    }

    /// Each crafted layer, and whether containerd's applier takes it: whatever it does, nothing
    /// outside the upper directory changes.
    #[test]
    fn names_and_links_never_reach_outside_the_upper_directory() {
        if !crate::testing::root_allowed("chmod of files it does not own") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host");
        fs::create_dir(&host).unwrap();
        fs::write(host.join("secret"), "secret").unwrap();
        fs::set_permissions(host.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        let secret = host.join("secret");
        let secret = secret.to_str().unwrap();
        let host_dir = host.to_str().unwrap();
        let cases: Vec<(&str, Vec<E<'_>>, Option<&str>)> = vec![
            (
                "dot-dot name",
                vec![file("../../host/secret", b"pwned")],
                None,
            ),
            ("absolute name", vec![file(secret, b"pwned")], None),
            (
                "symlink to a directory outside, then a file through it",
                vec![
                    link(T::Symlink, "esc", host_dir),
                    file("esc/secret", b"pwned"),
                ],
                None,
            ),
            (
                "symlink up and out, then a file through it",
                vec![
                    link(T::Symlink, "up", "../../../../../.."),
                    file(&secret[1..], b"pwned"),
                ],
                None,
            ),
            (
                "symlink to /, then a hardlink through it",
                vec![
                    link(T::Symlink, "root", "/"),
                    link(T::Link, "stolen", &secret[1..]),
                ],
                Some("hardlink"),
            ),
            (
                "hardlink with dot-dots",
                vec![link(T::Link, "stolen", "../../host/secret")],
                Some("hardlink"),
            ),
            (
                "hardlink to a symlink to the secret, then chmod",
                vec![
                    link(T::Symlink, "s", secret),
                    E {
                        mode: 0o777,
                        ..link(T::Link, "h", "s")
                    },
                ],
                None,
            ),
            // containerd resolves the symlink inside the root and makes what is missing there.
            (
                "dangling symlink to outside as a parent",
                vec![
                    link(T::Symlink, "d", "/nonexistent-lamina-test"),
                    file("d/f", b"x"),
                ],
                None,
            ),
            (
                "whiteout of the parent",
                vec![file("a/.wh..", b"")],
                Some("invalid whiteout"),
            ),
            (
                "whiteout of nothing",
                vec![file(".wh.", b"")],
                Some("invalid whiteout"),
            ),
        ];
        for (what, entries, refused) in cases {
            let up = tmp.path().join("upper");
            let _ = fs::remove_dir_all(&up);
            fs::create_dir(&up).unwrap();
            let result = run(&up, &[], Whiteouts::Delete, &entries);
            match (refused, &result) {
                (None, Ok(())) => {}
                (Some(want), Err(e)) => {
                    assert!(e.to_string().contains(want), "{what}: {e}");
                    assert!(matches!(e, Error::InvalidArgument(_)), "{what}: {e}");
                }
                _ => panic!("{what}: {result:?}"),
            }
            assert_eq!(fs::read(secret).unwrap(), b"secret", "{what}");
            let m = meta(Path::new(secret));
            assert_eq!(m.permissions().mode() & 0o7777, 0o600, "{what}");
            assert_eq!(m.nlink(), 1, "{what}");
            let names: Vec<_> = fs::read_dir(&host)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["secret"], "{what}");
            if what.starts_with("dangling") {
                assert_eq!(
                    fs::read(up.join("nonexistent-lamina-test/f")).unwrap(),
                    b"x"
                );
            }
            if what.starts_with("symlink to a directory outside") {
                let inside = up.join(&host_dir[1..]).join("secret");
                assert_eq!(
                    fs::read(inside).unwrap(),
                    b"pwned",
                    "{what}: written inside"
                );
            }
        }
        assert!(!Path::new("/nonexistent-lamina-test").exists());
    }

    #[test]
    fn a_pax_record_declared_over_a_mebibyte_is_refused_unread() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(4 << 30);
        h.set_path("pax").unwrap();
        h.set_cksum();
        let tmp = tempfile::tempdir().unwrap();
        let target = target(tmp.path(), &[], Whiteouts::Delete);
        let err = extract(&target, &mut h.as_bytes().as_slice()).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(
            err.to_string().contains("PAX record of 4294967296 bytes"),
            "{err}"
        );
    }

    #[test]
    fn types_containerd_does_not_write_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = run(
            tmp.path(),
            &[],
            Whiteouts::Delete,
            &[e(T::GNUSparse, "sparse")],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unhandled tar entry type 'S'"),
            "{err}"
        );
    }

    #[test]
    fn a_pax_sparse_file_is_written_under_its_real_name_with_its_holes() {
        let tmp = tempfile::tempdir().unwrap();
        // GNU tar's 1.0 format: the map in the data's first block, the name in a record.
        let mut data = b"2\n0\n5\n8192\n3\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"helloabc");
        let records: &[(&str, &[u8])] = &[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"sparse/file"),
            ("GNU.sparse.realsize", b"10000"),
        ];
        run(
            tmp.path(),
            &[],
            Whiteouts::Delete,
            &[
                dir("sparse"),
                E {
                    pax: records,
                    ..file("GNUSparseFile.1/file", &data)
                },
            ],
        )
        .unwrap();
        let got = fs::read(tmp.path().join("sparse/file")).unwrap();
        let mut want = vec![0u8; 10000];
        want[..5].copy_from_slice(b"hello");
        want[8192..8195].copy_from_slice(b"abc");
        assert!(got == want, "the sparse file's content");
        assert!(!tmp.path().join("GNUSparseFile.1").exists());
        // On a directory entry, the records are refused (Go's reader: an invalid header).
        let err = run(
            tmp.path(),
            &[],
            Whiteouts::Delete,
            &[E {
                pax: records,
                ..dir("d")
            }],
        )
        .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        // A bad map is refused whatever the entry is, a whiteout too (Go checks it first).
        let err = run(
            tmp.path(),
            &[],
            Whiteouts::Delete,
            &[E {
                pax: &[
                    ("GNU.sparse.numblocks", b"2"),
                    ("GNU.sparse.map", b"5,3,0,1"),
                ],
                ..file("sparse/.wh.file", b"")
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("sparse-file records"), "{err}");
        assert!(tmp.path().join("sparse/file").exists());
    }
}
