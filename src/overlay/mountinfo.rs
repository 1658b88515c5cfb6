//! Which mounts use a directory, read from `/proc/self/mountinfo` text (pure: the caller reads
//! the file). `lamina mount --rw` asks it before mounting an active snapshot writable: two
//! writable overlays on one upper directory corrupt it, and with `index=off` overlayfs only
//! warns.
//!
//! Two kinds of use show in mountinfo (proc(5)):
//! - an overlay names its directories in its super options: `upperdir=`, `workdir=`,
//!   `lowerdir=` (a `:`-separated list), and `lowerdir+=`/`datadir+=` (one each);
//! - a bind mount of a directory shows, in its "root" field, that directory's path within its
//!   filesystem; the filesystem is told by the device field (`major:minor`).
//!
//! Only mounts in the reader's mount namespace are seen; containerd's shims mount containers'
//! root filesystems in the host's, where `lamina mount` runs.

use std::path::{Path, PathBuf};

/// One line of mountinfo, the fields this module needs.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    device: String,
    root: PathBuf,
    mount_point: PathBuf,
    fstype: String,
    super_options: Vec<String>,
}

/// A mount that uses the directory asked about, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    pub mount_point: PathBuf,
    /// `upperdir`, `workdir`, `lowerdir` (an overlay's) or `bind`.
    pub how: &'static str,
}

/// The mounts in `mountinfo` that use `dir`: overlays naming it (as `dir` or as any of
/// `also_named`, the other spellings the mount may have been given), and mounts of `dir` or of
/// a directory inside it. `dir` must be canonical (no symlinks, no `..`): a bind is found by
/// where `dir` lies within its filesystem, which is computed from the mount it is reached
/// through.
pub fn users(mountinfo: &str, dir: &Path, also_named: &[&Path]) -> Vec<Use> {
    let entries: Vec<Entry> = mountinfo.lines().filter_map(parse_line).collect();
    let mut out = Vec::new();
    let named = |p: &String| Path::new(p) == dir || also_named.iter().any(|a| Path::new(p) == *a);
    for e in entries.iter().filter(|e| e.fstype == "overlay") {
        for opt in &e.super_options {
            let how = match opt.split_once('=') {
                Some(("upperdir", p)) if named(&overlay_path(p)) => "upperdir",
                Some(("workdir", p)) if named(&overlay_path(p)) => "workdir",
                Some(("lowerdir+" | "datadir+", p)) if named(&overlay_path(p)) => "lowerdir",
                Some(("lowerdir", p)) if lower_paths(p).iter().any(named) => "lowerdir",
                _ => continue,
            };
            out.push(Use {
                mount_point: e.mount_point.clone(),
                how,
            });
        }
    }
    // The mount `dir` is reached through: the last one (the topmost) on the longest prefix.
    let through = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| dir.starts_with(&e.mount_point))
        .max_by_key(|(i, e)| (e.mount_point.components().count(), *i))
        .map(|(_, e)| e);
    if let Some(through) = through {
        let rest = dir
            .strip_prefix(&through.mount_point)
            .unwrap_or(Path::new(""));
        let within = through.root.join(rest);
        for e in &entries {
            if e.device == through.device && e.root.starts_with(&within) {
                out.push(Use {
                    mount_point: e.mount_point.clone(),
                    how: "bind",
                });
            }
        }
    }
    out
}

fn parse_line(line: &str) -> Option<Entry> {
    let (before, after) = line.split_once(" - ")?;
    let before: Vec<&str> = before.split(' ').collect();
    let after: Vec<&str> = after.split(' ').collect();
    if before.len() < 6 || after.len() < 3 {
        return None;
    }
    Some(Entry {
        device: before[2].to_string(),
        root: PathBuf::from(unescape(before[3])),
        mount_point: PathBuf::from(unescape(before[4])),
        fstype: after[0].to_string(),
        // Still escaped: a comma within a value is, so splitting first is right.
        super_options: after[2].split(',').map(str::to_string).collect(),
    })
}

/// The paths in a `lowerdir=` value as mountinfo shows it: the value the mount was given
/// (where `\` escapes the next character, and an unescaped `:` separates lowers), with
/// mountinfo's octal escapes on top. Seen on Linux 6.18: `lowerdir=/a\,b:/c\:d` shows as
/// `lowerdir=/a\134\054b:/c\134:d`.
fn lower_paths(value: &str) -> Vec<String> {
    let mut paths = vec![String::new()];
    let mut chars = unescape(value).chars().collect::<Vec<_>>().into_iter();
    while let Some(c) = chars.next() {
        match c {
            '\\' => paths.last_mut().unwrap().extend(chars.next()),
            ':' => paths.push(String::new()),
            c => paths.last_mut().unwrap().push(c),
        }
    }
    paths
}

/// The path in an overlay option that names one directory, unescaped as in [`lower_paths`].
fn overlay_path(value: &str) -> String {
    let mut path = String::new();
    let mut chars = unescape(value).chars().collect::<Vec<_>>().into_iter();
    while let Some(c) = chars.next() {
        path.extend(if c == '\\' { chars.next() } else { Some(c) });
    }
    path
}

/// Undoes the kernel's `\ooo` octal escapes (of space, tab, newline and backslash, and in
/// overlayfs' options also of `,` and `=`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From a host where lamina's root is /var/lib/lamina on /dev/vda1 (253:1), with lines of
    /// the shapes this kernel writes.
    const HOST: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,discard
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
24 22 0:22 / /run rw,nosuid,nodev shared:6 - tmpfs tmpfs rw,mode=755
90 22 0:50 / /run/containerd/io.containerd.runtime.v2.task/default/app/rootfs rw,relatime shared:40 - overlay overlay rw,lowerdir=/var/lib/lamina/snapshots/2/fs:/var/lib/lamina/snapshots/1/fs,upperdir=/var/lib/lamina/snapshots/3/fs,workdir=/var/lib/lamina/snapshots/3/work,index=off
91 22 253:1 /var/lib/lamina/snapshots/4/fs /run/containerd/x/rootfs rw,relatime shared:1 - ext4 /dev/vda1 rw,discard
92 22 253:1 /var/lib/lamina/snapshots/5/fs/sub /mnt/sub rw,relatime shared:1 - ext4 /dev/vda1 rw,discard
93 22 0:51 / /mnt/inspect ro,relatime shared:41 - overlay overlay ro,lowerdir+=/var/lib/lamina/snapshots/6/fs,lowerdir+=/var/lib/lamina/snapshots/1/fs,index=off
94 22 253:1 /var/lib/lamina /srv/lamina-bind rw,relatime shared:1 - ext4 /dev/vda1 rw,discard
";

    fn at(uses: &[Use]) -> Vec<(&str, &str)> {
        uses.iter()
            .map(|u| (u.mount_point.to_str().unwrap(), u.how))
            .collect()
    }

    fn users_of(dir: &str) -> Vec<(String, &'static str)> {
        users(HOST, Path::new(dir), &[])
            .into_iter()
            .map(|u| (u.mount_point.display().to_string(), u.how))
            .collect()
    }

    #[test]
    fn finds_the_overlay_of_an_active_snapshot_by_its_upper_and_work_dirs() {
        let rootfs = "/run/containerd/io.containerd.runtime.v2.task/default/app/rootfs";
        assert_eq!(
            users_of("/var/lib/lamina/snapshots/3/fs"),
            [(rootfs.to_string(), "upperdir")]
        );
        assert_eq!(
            users_of("/var/lib/lamina/snapshots/3/work"),
            [(rootfs.to_string(), "workdir")]
        );
        // A parent, through lowerdir= and through lowerdir+=.
        let one = users_of("/var/lib/lamina/snapshots/1/fs");
        assert_eq!(
            one,
            [
                (rootfs.to_string(), "lowerdir"),
                ("/mnt/inspect".to_string(), "lowerdir")
            ]
        );
        assert_eq!(
            users_of("/var/lib/lamina/snapshots/6/fs"),
            [("/mnt/inspect".to_string(), "lowerdir")]
        );
    }

    #[test]
    fn finds_binds_of_a_directory_or_inside_it_but_not_of_what_holds_it() {
        assert_eq!(
            users_of("/var/lib/lamina/snapshots/4/fs"),
            [("/run/containerd/x/rootfs".to_string(), "bind")]
        );
        assert_eq!(
            users_of("/var/lib/lamina/snapshots/5/fs"),
            [("/mnt/sub".to_string(), "bind")]
        );
        // Nothing uses these: the root's own mount and a bind of lamina's root hold them but
        // are not mounts of them.
        assert!(users_of("/var/lib/lamina/snapshots/7/fs").is_empty());
        assert!(users_of("/var/lib/lamina/snapshots/30/fs").is_empty());
        assert!(users_of("/var/lib/lamina/snapshots/3/fsx").is_empty());
    }

    #[test]
    fn a_root_on_a_bind_mount_is_located_within_its_filesystem() {
        // lamina's root is /data/lamina of 8:16, bind-mounted at /var/lib/lamina.
        let text = "\
22 1 253:1 / / rw - ext4 /dev/vda1 rw
30 22 8:16 / /data rw - xfs /dev/sdb rw
31 22 8:16 /lamina /var/lib/lamina rw - xfs /dev/sdb rw
40 22 8:16 /lamina/snapshots/1/fs /run/c/rootfs rw - xfs /dev/sdb rw
41 22 253:1 /lamina/snapshots/1/fs /elsewhere rw - ext4 /dev/vda1 rw
";
        let found = users(text, Path::new("/var/lib/lamina/snapshots/1/fs"), &[]);
        assert_eq!(at(&found), [("/run/c/rootfs", "bind")]);
        // The same directory reached through /data.
        let found = users(text, Path::new("/data/lamina/snapshots/1/fs"), &[]);
        assert_eq!(at(&found), [("/run/c/rootfs", "bind")]);
    }

    #[test]
    fn a_directory_that_is_itself_a_mount_point_is_in_use() {
        let text = "\
22 1 253:1 / / rw - ext4 /dev/vda1 rw
50 22 0:60 / /r/snapshots/1/fs rw - tmpfs tmpfs rw
";
        let found = users(text, Path::new("/r/snapshots/1/fs"), &[]);
        assert_eq!(at(&found), [("/r/snapshots/1/fs", "bind")]);
    }

    #[test]
    fn escaped_paths_and_other_spellings_match() {
        // As Linux 6.18 shows lowerdir=/r\:x/1/fs,upperdir=/r\,y/2/fs,workdir=/r\,y/2/work
        // mounted at "/mnt/with space".
        let text = "\
22 1 253:1 / / rw - ext4 /dev/vda1 rw
60 22 0:70 / /mnt/with\\040space rw - overlay overlay rw,lowerdir=/r\\134:x/1/fs:/s/0/fs,upperdir=/r\\134\\054y/2/fs,workdir=/r\\134\\054y/2/work,uuid=on
61 22 253:1 /r\\134z/3/fs /mnt/b rw - ext4 /dev/vda1 rw
62 22 0:71 / /mnt/o2 rw - overlay overlay rw,lowerdir=/srv/l/1/fs,upperdir=/srv/l/5/fs,workdir=/srv/l/5/work
";
        let found = users(text, Path::new("/r,y/2/fs"), &[]);
        assert_eq!(at(&found), [("/mnt/with space", "upperdir")]);
        let found = users(text, Path::new("/r:x/1/fs"), &[]);
        assert_eq!(at(&found), [("/mnt/with space", "lowerdir")]);
        let found = users(text, Path::new("/s/0/fs"), &[]);
        assert_eq!(at(&found), [("/mnt/with space", "lowerdir")]);
        assert!(users(text, Path::new("/r"), &[]).is_empty());
        let found = users(text, Path::new("/r\\z/3/fs"), &[]);
        assert_eq!(at(&found), [("/mnt/b", "bind")]);
        // The overlay was given a path through a symlink (/srv/l -> /data/l).
        let found = users(text, Path::new("/data/l/5/fs"), &[Path::new("/srv/l/5/fs")]);
        assert_eq!(at(&found), [("/mnt/o2", "upperdir")]);
        assert_eq!(unescape("a\\134b\\0"), "a\\b\\0");
        assert_eq!(unescape("\\777"), "\\777", "not a byte: left as it is");
    }

    #[test]
    fn lines_that_do_not_parse_are_skipped() {
        let text = "garbage\n\n22 1 253:1 / / rw - ext4 /dev/vda1 rw\n1 2 3\n";
        assert!(users(text, Path::new("/x"), &[]).is_empty());
    }
}
