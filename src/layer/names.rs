//! What a tar entry's name means inside the layer's root, as containerd's applier reads it:
//! pure functions, no filesystem.

/// The whiteout prefix of OCI layers: `.wh.<name>` deletes `<name>` of the layers below.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The marker that makes its directory opaque: nothing of the layers below shows through.
pub const OPAQUE: &[u8] = b".wh..wh..opq";

/// The components of `name` relative to the layer's root, none of them empty, `.` or `..`;
/// empty for the root itself.
///
/// containerd cleans the name lexically (Go's `filepath.Clean`) and then resolves it inside
/// the root, where `..` at the root stays at the root: `../../etc/passwd` and `/etc/passwd`
/// both mean `etc/passwd` of the layer. The same here, so a name can never leave the root by
/// its spelling (symlinks on the way are the resolver's business).
pub fn clean(name: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// `components` joined with `/`: the key of an entry in the sets the extractor keeps.
pub fn join(components: &[&[u8]]) -> Vec<u8> {
    components.join(&b'/')
}

/// What an entry's last component says.
#[derive(Debug, PartialEq, Eq)]
pub enum Base<'a> {
    /// An ordinary name: the entry is written.
    Plain,
    /// `.wh..wh..opq`: the directory it is in becomes opaque.
    Opaque,
    /// `.wh.<name>`: `<name>` of the layers below is deleted.
    Whiteout(&'a [u8]),
}

/// Reads an entry's last component. A whiteout of nothing (`.wh.`), of `.` or of `..` would
/// name the directory itself or its parent, and containerd refuses it (`invalid whiteout
/// name`); so does this, naming the entry.
pub fn base(base: &[u8]) -> Result<Base<'_>, String> {
    if base == OPAQUE {
        return Ok(Base::Opaque);
    }
    match base.strip_prefix(WHITEOUT_PREFIX) {
        None => Ok(Base::Plain),
        Some(b"" | b"." | b"..") => Err(format!(
            "invalid whiteout name {:?}: it names no entry of its directory",
            String::from_utf8_lossy(base)
        )),
        Some(original) => Ok(Base::Whiteout(original)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str) -> Vec<String> {
        clean(name.as_bytes())
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn names_never_climb_out_of_the_root() {
        assert_eq!(c("usr/bin/sh"), ["usr", "bin", "sh"]);
        assert_eq!(c("./usr//bin/"), ["usr", "bin"]);
        assert_eq!(c("/etc/passwd"), ["etc", "passwd"]);
        assert_eq!(c("../../etc/passwd"), ["etc", "passwd"]);
        assert_eq!(c("a/../../b"), ["b"]);
        assert_eq!(c("a/b/../c"), ["a", "c"]);
        assert!(c("./").is_empty());
        assert!(c("..").is_empty());
        assert!(c("").is_empty());
    }

    #[test]
    fn whiteouts_and_the_opaque_marker_are_told_apart() {
        assert_eq!(base(b"file"), Ok(Base::Plain));
        assert_eq!(base(b".wh..wh..opq"), Ok(Base::Opaque));
        assert_eq!(base(b".wh.file"), Ok(Base::Whiteout(b"file")));
        // containerd's overlay conversion makes this a whiteout of ".wh..foo": the same here.
        assert_eq!(base(b".wh..wh..foo"), Ok(Base::Whiteout(b".wh..foo")));
        for bad in [".wh.", ".wh..", ".wh..."] {
            let err = base(bad.as_bytes()).unwrap_err();
            assert!(err.contains("invalid whiteout name"), "{bad}: {err}");
        }
    }
}
