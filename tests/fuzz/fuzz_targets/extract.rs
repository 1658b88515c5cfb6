//! Any bytes as a layer's tar stream, extracted into a fresh upper directory over a parent
//! layer (overlay whiteouts) and into one without (deletions): lamina's extractor must never
//! panic, and nothing outside the upper directory may change, whatever the layer says.
#![no_main]

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use lamina::layer::{extract::extract, Target, Whiteouts};
use libfuzzer_sys::fuzz_target;

fn open(p: &Path) -> std::os::fd::OwnedFd {
    fs::File::open(p).expect("open").into()
}

/// What the fuzzer must never change: a file and a directory beside the upper directory.
fn outside(base: &Path) -> Vec<(String, u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    for name in ["secret", "dir", "lower", "lower/etc", "lower/etc/f"] {
        let p = base.join(name);
        let m = fs::symlink_metadata(&p).expect("outside entry");
        let data = if m.is_file() { fs::read(&p).unwrap() } else { Vec::new() };
        out.push((name.to_string(), m.permissions().mode(), m.len(), data));
    }
    let mut names: Vec<_> = fs::read_dir(base.join("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    out.push((names.join(","), 0, 0, Vec::new()));
    out
}

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path();
    fs::write(base.join("secret"), "secret").unwrap();
    fs::set_permissions(base.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(base.join("dir")).unwrap();
    fs::create_dir_all(base.join("lower/etc")).unwrap();
    fs::write(base.join("lower/etc/f"), "lower").unwrap();
    let before = outside(base);
    for (i, whiteouts) in [Whiteouts::Overlay, Whiteouts::Delete].into_iter().enumerate() {
        let upper = base.join(format!("upper{i}"));
        fs::create_dir(&upper).unwrap();
        let lowers = if whiteouts == Whiteouts::Overlay {
            vec![open(&base.join("lower"))]
        } else {
            Vec::new()
        };
        let target = Target {
            upper: open(&upper),
            lowers,
            whiteouts,
        };
        // An error is fine (most inputs are not tars); a panic or an escape is not.
        let _ = extract(&target, &mut &data[..]);
    }
    assert_eq!(before, outside(base), "an entry reached outside the upper directory");
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
