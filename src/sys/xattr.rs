//! Extended attributes of an entry named relative to a directory lamina holds open, without
//! following a symlink at that name.
//!
//! Linux has no `lsetxattr` relative to a descriptor before 6.13 (`setxattrat`), and a file
//! cannot be opened to use `fsetxattr` without side effects for every type (a fifo blocks, a
//! device opens). `/proc/self/fd/<dir>/<name>` names the entry through the directory lamina
//! already resolved, and the `l*` calls do not follow its last component. A regular file
//! lamina has just created and still holds open takes `fsetxattr` ([`set_open`]).

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
};

fn path_of(dir: &OwnedFd, name: &OsStr) -> io::Result<CString> {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.as_bytes());
    CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn c_name(key: &[u8]) -> io::Result<CString> {
    CString::new(key).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A setting call's answer: 0, or -1 and errno.
fn done(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `key` to `value` on `name` in `dir`; with `create_only`, an existing attribute is an
/// EEXIST error rather than replaced.
pub fn set(
    dir: &OwnedFd,
    name: &OsStr,
    key: &[u8],
    value: &[u8],
    create_only: bool,
) -> io::Result<()> {
    let path = path_of(dir, name)?;
    let key = c_name(key)?;
    let flags = if create_only { libc::XATTR_CREATE } else { 0 };
    // SAFETY: both strings are NUL-terminated and live across the call; the value pointer and
    // length describe one slice.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    done(rc)
}

/// Sets `key` to `value` on the open file `file` (replacing it if there).
pub fn set_open(file: &impl AsRawFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let key = c_name(key)?;
    // SAFETY: the key is NUL-terminated and lives across the call; the value pointer and
    // length describe one slice.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    done(rc)
}

/// Calls `call` with a buffer (its pointer and length), growing the buffer while the call
/// answers ERANGE (the attribute changed size between calls), up to 1 MiB; the bytes it wrote.
fn grown(start: usize, call: impl Fn(*mut libc::c_void, usize) -> isize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; start];
    loop {
        let n = call(buf.as_mut_ptr().cast(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || buf.len() >= 1 << 20 {
            return Err(err);
        }
        let len = buf.len() * 4;
        buf.resize(len, 0);
    }
}

/// The names of the attributes of `name` in `dir`.
pub fn list(dir: &OwnedFd, name: &OsStr) -> io::Result<Vec<Vec<u8>>> {
    let path = path_of(dir, name)?;
    // SAFETY: the path is NUL-terminated; `grown` passes a buffer's pointer and its length.
    let buf = grown(1024, |at, len| unsafe {
        libc::llistxattr(path.as_ptr(), at.cast(), len)
    })?;
    Ok(buf
        .split(|&b| b == 0)
        .filter(|k| !k.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// The value of attribute `key` of `name` in `dir`.
pub fn get(dir: &OwnedFd, name: &OsStr, key: &[u8]) -> io::Result<Vec<u8>> {
    let path = path_of(dir, name)?;
    let key = c_name(key)?;
    // SAFETY: both strings are NUL-terminated; `grown` passes a buffer's pointer and its length.
    grown(256, |at, len| unsafe {
        libc::lgetxattr(path.as_ptr(), key.as_ptr(), at, len)
    })
}
