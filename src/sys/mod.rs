//! The only code that calls mount(2) and umount(2). lamina itself mounts only to probe the
//! kernel at start-up; containerd mounts what lamina returns.

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
