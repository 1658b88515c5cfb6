//! A layer's tar stream, extracted into a fresh upper directory over a parent layer (overlay
//! whiteouts) and into one without (deletions): lamina's extractor must never panic, and
//! nothing outside the upper directory may change, whatever the layer says.
//!
//! Half of the inputs are fed as they are; the other half describe entries, which are written
//! as a tar with valid checksums from names built of the parts that matter (`..`, `/`,
//! whiteout prefixes, a few short names), so that the fuzzer spends its time on what the
//! entries do rather than on headers the tar reader rejects.
#![no_main]

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use lamina::layer::{extract::extract, OverlayXattrs, Target, Whiteouts};
use libfuzzer_sys::fuzz_target;

const PARTS: &[&[u8]] = &[
    b"a",
    b"b",
    b"/",
    b"..",
    b".",
    b".wh.",
    b".wh..wh..opq",
    b"etc",
    b"lower",
    b"secret",
    b"dir",
    b"f",
];
const KINDS: &[u8] = b"0125634xgSL";

/// Entries from `data`: each is a kind, a name and a link target (parts), a mode, and content.
fn structured(data: &[u8]) -> Vec<u8> {
    let mut it = data.iter().copied();
    let mut out = Vec::new();
    let pick = |it: &mut dyn Iterator<Item = u8>| {
        let n = it.next().unwrap_or(0) % 6;
        let mut s = Vec::new();
        for _ in 0..n {
            s.extend_from_slice(PARTS[it.next().unwrap_or(0) as usize % PARTS.len()]);
        }
        s
    };
    while let Some(k) = it.next() {
        let kind = KINDS[k as usize % KINDS.len()];
        let name = pick(&mut it);
        let link = pick(&mut it);
        let mode = u32::from(it.next().unwrap_or(0)) << 4 | u32::from(it.next().unwrap_or(0));
        let len = it.next().unwrap_or(0) as usize % 64;
        let body: Vec<u8> = (&mut it).take(len).collect();
        let mut h = [0u8; 512];
        let name = &name[..name.len().min(99)];
        let link = &link[..link.len().min(99)];
        h[..name.len()].copy_from_slice(name);
        h[100..107].copy_from_slice(format!("{:07o}", mode & 0o7777).as_bytes());
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{:011o}", body.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&body);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn open(p: &Path) -> std::os::fd::OwnedFd {
    fs::File::open(p).expect("open").into()
}

/// What the fuzzer must never change: entries beside the upper directories (type, mode,
/// owner, size, times, content) and what the directories among them hold.
fn outside(base: &Path) -> Vec<(String, String, Vec<u8>)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for name in ["secret", "dir", "lower", "lower/etc", "lower/etc/f"] {
        let p = base.join(name);
        let m = fs::symlink_metadata(&p).expect("outside entry");
        let data = if m.is_file() {
            fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        let meta = format!(
            "{:o} {}:{} {} {}.{}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        );
        out.push((name.to_string(), meta, data));
    }
    for dir in [
        base.to_path_buf(),
        base.join("dir"),
        base.join("lower"),
        base.join("lower/etc"),
    ] {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        out.push((names.join(","), String::new(), Vec::new()));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let layer = match data.split_first() {
        Some((first, rest)) if first % 2 == 0 => structured(rest),
        _ => data.to_vec(),
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path();
    fs::write(base.join("secret"), "secret").unwrap();
    fs::set_permissions(base.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(base.join("dir")).unwrap();
    fs::create_dir_all(base.join("lower/etc")).unwrap();
    fs::write(base.join("lower/etc/f"), "lower").unwrap();
    for i in 0..2 {
        fs::create_dir(base.join(format!("upper{i}"))).unwrap();
    }
    let before = outside(base);
    for (i, whiteouts) in [Whiteouts::Overlay, Whiteouts::Delete]
        .into_iter()
        .enumerate()
    {
        let lowers = if whiteouts == Whiteouts::Overlay {
            vec![open(&base.join("lower"))]
        } else {
            Vec::new()
        };
        let target = Target {
            upper: open(&base.join(format!("upper{i}"))),
            lowers,
            whiteouts,
            overlay_xattrs: OverlayXattrs::Trusted,
            skip_devices: false,
        };
        // An error is fine (a layer may be refused); a panic or an escape is not.
        let _ = extract(&target, &mut &layer[..]);
    }
    assert_eq!(
        before,
        outside(base),
        "an entry reached outside the upper directory"
    );
    // The upper directories may hold anything, 0000 directories included: make them deletable.
    unlock(base);
});

/// Makes every directory under `dir` (never through a symlink) readable and writable.
fn unlock(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                unlock(&e.path());
            }
        }
    }
}
