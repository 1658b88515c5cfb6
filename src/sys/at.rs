//! Directory operations relative to a directory lamina already holds open, that never follow a
//! symlink at the name they are given.
//!
//! Why: paths under lamina's root are not all lamina's to trust. A container writes its upper
//! directory as it likes (it can swap a directory for a symlink to `/` while lamina measures
//! it), and whoever can write under `snapshots/` can plant a symlink where lamina is about to
//! create, chmod or chown. Each step here opens one name below an open directory with
//! `O_NOFOLLOW`, so nothing lamina does can be redirected outside the directory it started from.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use nix::{
    dir::Dir,
    fcntl::{openat, renameat2, AtFlags, OFlag, RenameFlags},
    sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode},
    unistd::{fchownat, Gid, Uid},
    NixPath,
};

/// Opens the directory `name` (relative to `at`, or as a path when `at` is None). A symlink
/// there fails with ELOOP and anything that is not a directory with ENOTDIR: neither is
/// followed.
pub fn open_dir<P: ?Sized + NixPath>(at: Option<&OwnedFd>, name: &P) -> io::Result<OwnedFd> {
    let fd = openat(
        at.map(AsRawFd::as_raw_fd),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `openat` just returned this descriptor, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates the directory `name` in `at` with `mode` (less the umask). An existing entry of that
/// name, a symlink included, fails with EEXIST: mkdir never follows its last component.
pub fn mkdir(at: &OwnedFd, name: &str, mode: u32) -> io::Result<()> {
    mkdirat(Some(at.as_raw_fd()), name, Mode::from_bits_truncate(mode))?;
    Ok(())
}

/// The status of `name` in `at` itself, not of what a symlink there points to.
pub fn stat<P: ?Sized + NixPath>(at: &OwnedFd, name: &P) -> io::Result<FileStat> {
    Ok(fstatat(
        Some(at.as_raw_fd()),
        name,
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )?)
}

/// The status of an open file.
pub fn stat_fd(fd: &OwnedFd) -> io::Result<FileStat> {
    Ok(fstat(fd.as_raw_fd())?)
}

/// Sets the mode of an open file.
pub fn chmod(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    Ok(fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))?)
}

/// Sets the owner of `name` in `at`; a symlink there has its own owner changed, not its
/// target's.
pub fn chown(at: &OwnedFd, name: &str, (uid, gid): (u32, u32)) -> io::Result<()> {
    fchownat(
        Some(at.as_raw_fd()),
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Renames `from` in `from_dir` to `to` in `to_dir`, failing with EEXIST when anything exists
/// at `to` (where a plain rename would replace an empty directory or a file there).
pub fn rename_new<P: ?Sized + NixPath>(
    from_dir: Option<&OwnedFd>,
    from: &P,
    to_dir: &OwnedFd,
    to: &str,
) -> io::Result<()> {
    renameat2(
        from_dir.map(AsRawFd::as_raw_fd),
        from,
        Some(to_dir.as_raw_fd()),
        to,
        RenameFlags::RENAME_NOREPLACE,
    )?;
    Ok(())
}

/// The names in the open directory `dir`, without `.` and `..`.
pub fn names(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    // `Dir` closes what it is given; it gets a duplicate, and `dir` stays open for the `*at`
    // calls on what it lists.
    let mut listing = Dir::from(dir.try_clone()?)?;
    let mut out = Vec::new();
    for entry in listing.iter() {
        let name = entry?.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            out.push(name);
        }
    }
    Ok(out)
}

/// Whether a status is that of a directory.
pub fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_follows_a_symlink_at_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let dir = tmp.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        let at = open_dir(None, &dir).unwrap();

        let err = open_dir(Some(&at), "link").unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
            "{err}"
        );
        let err = mkdir(&at, "link", 0o700).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(!is_dir(&stat(&at, "link").unwrap()));

        std::fs::create_dir(dir.join("from")).unwrap();
        let err = rename_new(Some(&at), "from", &at, "link").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        std::fs::create_dir(dir.join("empty")).unwrap();
        let err = rename_new(Some(&at), "from", &at, "empty").unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::AlreadyExists,
            "an empty directory is replaced"
        );
        rename_new(Some(&at), "from", &at, "to").unwrap();
        assert!(dir.join("to").is_dir());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }
}
