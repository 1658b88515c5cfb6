//! The only code that calls mount(2) and umount(2) and the new mount API. lamina itself mounts
//! only to probe the kernel at start-up (and `lamina mount`, for an operator); containerd
//! mounts what lamina returns. `at.rs` holds the directory operations that never follow a
//! symlink, which everything under the root goes through.

pub mod at;
pub mod xattr;

use std::{io, path::Path};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Mounts an overlay at `target` with the given comma-separated `options`.
pub fn mount_overlay(target: &Path, options: &str) -> io::Result<()> {
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options),
    )
    .map_err(io::Error::from)
}

/// Detaches the mount at `target`.
pub fn unmount(target: &Path) -> io::Result<()> {
    umount2(target, MntFlags::MNT_DETACH).map_err(io::Error::from)
}

/// Whether overlayfs accepts `lowerdir+` through the new mount API (Linux 6.8+): one lower
/// directory per call, so a chain's options need not fit in one page.
pub fn supports_lowerdir_plus(scratch_parent: &Path) -> io::Result<bool> {
    let ctx = match FsContext::open("overlay") {
        Ok(ctx) => ctx,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(false),
        Err(e) => return Err(e),
    };
    match ctx.set_string("lowerdir+", scratch_parent) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Mounts an overlay at `target` through the new mount API, passing each lower directory
/// separately with `lowerdir+` (nearest first) and every other option on its own.
pub fn mount_overlay_lowers(
    target: &Path,
    lowers: &[&str],
    options: &[(&str, Option<&str>)],
) -> io::Result<()> {
    let ctx = FsContext::open("overlay")?;
    for lower in lowers {
        ctx.set_string("lowerdir+", Path::new(lower))?;
    }
    for (key, value) in options {
        match value {
            Some(v) => ctx.set_string(key, Path::new(v))?,
            None => ctx.set_flag(key)?,
        }
    }
    ctx.create_and_attach(target)
}

/// A filesystem context from fsopen(2), closed on drop.
struct FsContext(std::os::fd::OwnedFd);

fn cstr(s: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl FsContext {
    fn open(fstype: &str) -> io::Result<FsContext> {
        use std::os::fd::FromRawFd;
        let name = cstr(fstype.as_bytes())?;
        const FSOPEN_CLOEXEC: libc::c_uint = 1;
        // SAFETY: fsopen reads the NUL-terminated name and returns a new descriptor or -1.
        let fd = check(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })?;
        // SAFETY: fd was just returned by fsopen and is owned by nothing else.
        Ok(FsContext(unsafe {
            std::os::fd::OwnedFd::from_raw_fd(fd as i32)
        }))
    }

    fn config(&self, cmd: libc::c_uint, key: Option<&str>, value: Option<&Path>) -> io::Result<()> {
        use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
        let key = key.map(|k| cstr(k.as_bytes())).transpose()?;
        let value = value.map(|v| cstr(v.as_os_str().as_bytes())).transpose()?;
        let ptr =
            |c: &Option<std::ffi::CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: the descriptor is a live fs context; key and value are NUL-terminated strings
        // (or null where the command takes none) that outlive the call.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.0.as_raw_fd(),
                cmd,
                ptr(&key),
                ptr(&value),
                0,
            )
        })?;
        Ok(())
    }

    fn set_string(&self, key: &str, value: &Path) -> io::Result<()> {
        const FSCONFIG_SET_STRING: libc::c_uint = 1;
        self.config(FSCONFIG_SET_STRING, Some(key), Some(value))
    }

    fn set_flag(&self, key: &str) -> io::Result<()> {
        const FSCONFIG_SET_FLAG: libc::c_uint = 0;
        self.config(FSCONFIG_SET_FLAG, Some(key), None)
    }

    fn create_and_attach(self, target: &Path) -> io::Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd};
        const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
        const FSMOUNT_CLOEXEC: libc::c_uint = 1;
        self.config(FSCONFIG_CMD_CREATE, None, None)?;
        // SAFETY: the descriptor is a created fs context; fsmount returns a new descriptor.
        let mfd = check(unsafe {
            libc::syscall(libc::SYS_fsmount, self.0.as_raw_fd(), FSMOUNT_CLOEXEC, 0)
        })?;
        // SAFETY: mfd was just returned by fsmount and is owned by nothing else.
        let mfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(mfd as i32) };
        attach(&mfd, target)
    }
}

/// Attaches the detached mount `mfd` (from fsmount or open_tree) at `target`.
fn attach(mfd: &std::os::fd::OwnedFd, target: &Path) -> io::Result<()> {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let empty = cstr(b"")?;
    let to = cstr(target.as_os_str().as_bytes())?;
    // SAFETY: mfd is a detached mount; both paths are NUL-terminated and outlive the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mfd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// Binds `source` at `target` read-only from the start: the copy of the mount is made read-only
/// while still detached, then attached. (A bind followed by a read-only remount would leave
/// `target` writable in between.) `recursive`: mounts under `source` come along, read-only too.
pub fn bind_read_only(source: &Path, target: &Path, recursive: bool) -> io::Result<()> {
    use std::os::{
        fd::{AsRawFd, FromRawFd},
        unix::ffi::OsStrExt,
    };
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOUNT_ATTR_RDONLY: u64 = 1;
    /// `struct mount_attr` of linux/mount.h (its first version, which mount_setattr takes by
    /// size).
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let recursive = if recursive { libc::AT_RECURSIVE } else { 0 } as libc::c_uint;
    let from = cstr(source.as_os_str().as_bytes())?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | recursive;
    // SAFETY: the path is NUL-terminated and outlives the call; open_tree returns a new
    // descriptor or -1.
    let fd =
        check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, from.as_ptr(), flags) })?;
    // SAFETY: fd was just returned by open_tree and is owned by nothing else.
    let tree = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let empty = cstr(b"")?;
    // SAFETY: tree is a detached mount; the empty path is NUL-terminated, and attr is a
    // mount_attr of the size passed, all outliving the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | recursive,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    attach(&tree, target)
}

/// The most mount data one mount(2) call takes.
const PAGE: usize = 4096;

/// Mounts one of lamina's mount specs at `target`, given as its type, source and options (the
/// spec type is `overlay::Mount`'s; this module knows none of lamina's types), as containerd
/// would. Overlay options that do not fit in one page go through the new mount API, one
/// `lowerdir+` per layer.
pub fn mount_spec(kind: &str, source: &str, options: &[String], target: &Path) -> io::Result<()> {
    let has = |o: &str| options.iter().any(|x| x == o);
    match kind {
        "bind" if has("ro") => bind_read_only(Path::new(source), target, has("rbind")),
        "bind" => {
            let mut flags = MsFlags::MS_BIND;
            if has("rbind") {
                flags |= MsFlags::MS_REC;
            }
            mount(Some(source), target, None::<&str>, flags, None::<&str>)?;
            Ok(())
        }
        "overlay" => {
            let data = options.join(",");
            if data.len() < PAGE {
                return mount_overlay(target, &data);
            }
            let mut lowers = Vec::new();
            let mut others = Vec::new();
            for opt in options {
                match opt.split_once('=') {
                    Some(("lowerdir", list)) => lowers.extend(list.split(':')),
                    Some((k, v)) => others.push((k, Some(v))),
                    None => others.push((opt.as_str(), None)),
                }
            }
            mount_overlay_lowers(target, &lowers, &others)
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown mount type {other:?}"),
        )),
    }
}
