//! 1–2: the basic workflow through mounts, and the shape of every mount lamina returns.

use super::*;

// ---------------------------------------------------------------------------------------------
// 1. The basic workflow

daemon_test!(basic_workflow_through_mounts, |d, mut c| {
    let first = |r: &Path| {
        put(r, "/foo", b"foo\n", 0o777);
        put(r, "/empty", b"", 0o600);
        mkdir(r, "/a", 0o755);
        mkdir(r, "/a/b", 0o755);
        mkdir(r, "/a/b/c", 0o750);
        put(r, "/a/b/c/deep", b"deep down\n", 0o640);
        ln_s(r, "foo", "/link");
        ln_s(r, "/a/b/c/deep", "/a/abs");
    };
    let second = |r: &Path| {
        put(r, "/bar", b"bar\n", 0o777);
        put(r, "/foo", b"bar\n", 0o777);
        rm_rf(r, "/a/b");
        rm(r, "/link");
        ln_s(r, "bar", "/link");
        mkdir(r, "/a/new", 0o700);
    };
    let flat1 = flat_dir(&d, "flat1");
    first(&flat1);
    let flat2 = flat_dir(&d, "flat2");
    first(&flat2);
    second(&flat2);

    // Layer 1: no parent, written through its mount.
    let mounts = c.prepare("preparing", "").await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("preparing"));
        assert_eq!(
            ls(m.path(), "/"),
            Vec::<String>::new(),
            "a new snapshot is empty"
        );
        first(m.path());
        assert_same_tree(&tree(m.path()), &tree(&flat1), "layer 1 as written");
    }
    c.commit("committed", "preparing").await.unwrap();
    let si = c.stat("committed").await.unwrap();
    assert_eq!((si.parent.as_str(), si.kind), ("", COMMITTED));
    assert_code(c.stat("preparing").await, Code::NotFound, "preparing");

    // Layer 2: sees layer 1, changes it.
    let mounts = c.prepare("next", "committed").await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("next"));
        assert_same_tree(&tree(m.path()), &tree(&flat1), "child before changes");
        assert_eq!(
            read(m.path(), "/link"),
            b"foo\n",
            "symlink followed inside the mount"
        );
        assert_eq!(read(m.path(), "/a/b/c/deep"), b"deep down\n");
        second(m.path());
        assert_same_tree(&tree(m.path()), &tree(&flat2), "child after changes");
    }
    let ni = c.stat("next").await.unwrap();
    assert_eq!((ni.parent.as_str(), ni.kind), ("committed", ACTIVE));
    c.commit("committed-next", "next").await.unwrap();
    let si2 = c.stat("committed-next").await.unwrap();
    assert_eq!((si2.parent.as_str(), si2.kind), ("committed", COMMITTED));
    assert_code(c.stat("next").await, Code::NotFound, "next");

    // A view of the top shows the merged result.
    let mounts = c.view("nextnext", "committed-next").await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("nextnext"));
        let r = m.path();
        assert_same_tree(&tree(r), &tree(&flat2), "view of the top");
        assert_eq!(read(r, "/foo"), b"bar\n");
        assert_eq!(read(r, "/bar"), b"bar\n");
        assert_eq!(fs::read_link(at(r, "/link")).unwrap(), PathBuf::from("bar"));
        assert_eq!(read(r, "/link"), b"bar\n");
        assert_absent(r, "/a/b");
        assert_eq!(ls(r, "/a"), strings(&["abs", "new"]));
        assert_eq!(mode(r, "/a/new"), 0o700);
        // The dangling absolute link is still a link, pointing into a removed directory.
        assert_eq!(
            fs::read_link(at(r, "/a/abs")).unwrap(),
            PathBuf::from("/a/b/c/deep")
        );
    }
    // A view of the bottom shows the first layer only.
    let mounts = c.view("bottom", "committed").await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("bottom"));
        let r = m.path();
        assert_same_tree(&tree(r), &tree(&flat1), "view of the bottom");
        assert_eq!(read(r, "/foo"), b"foo\n");
        assert_absent(r, "/bar");
        assert_eq!(read(r, "/a/b/c/deep"), b"deep down\n");
    }

    c.remove("nextnext").await.unwrap();
    c.remove("bottom").await.unwrap();
    assert_code(c.remove("committed").await, Code::FailedPrecondition, "");
    c.remove("committed-next").await.unwrap();
    c.remove("committed").await.unwrap();
});

// ---------------------------------------------------------------------------------------------
// 2. The mount shapes over the wire

/// The ID of snapshot directory `fs` ([`id_of`]), which must exist under this daemon's
/// `<root>/snapshots`.
#[track_caller]
fn id_under(d: &TestDaemon, fs: impl AsRef<Path>) -> u64 {
    let fs = fs.as_ref();
    let id = id_of(fs);
    assert_eq!(
        fs.parent().unwrap().parent().unwrap(),
        d.root.join("snapshots"),
        "{} is under <root>/snapshots",
        fs.display()
    );
    assert!(fs.is_dir(), "{} exists", fs.display());
    id
}

fn fs_of(d: &TestDaemon, id: u64) -> String {
    d.root
        .join(format!("snapshots/{id}/fs"))
        .display()
        .to_string()
}

fn work_of(d: &TestDaemon, id: u64) -> String {
    d.root
        .join(format!("snapshots/{id}/work"))
        .display()
        .to_string()
}

daemon_test!(mount_shapes_over_the_wire, |d, mut c| {
    let extra = host_overlay_options();

    // Active, no parent: a writable bind of its own fs.
    let a = c.prepare("a", "").await.unwrap();
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].r#type, "bind");
    assert_eq!(a[0].options, strings(&["rw", "rbind"]));
    assert_eq!(a[0].target, "");
    let id_a = id_under(&d, &a[0].source);
    assert!(
        Path::new(&work_of(&d, id_a)).is_dir(),
        "an active snapshot has a work directory"
    );
    assert_eq!(
        c.mounts("a").await.unwrap(),
        a,
        "Mounts repeats what Prepare answered"
    );
    {
        let m = mount_at(&a, &d.scratch("ma"));
        put(m.path(), "/from-a", b"a", 0o644);
    }
    c.commit("A", "a").await.unwrap();
    assert_code(c.mounts("A").await, Code::FailedPrecondition, "");

    // Active, one parent: overlay, workdir, upperdir, lowerdir, then the host's options.
    let b = c.prepare("b", "A").await.unwrap();
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(
        (b[0].r#type.as_str(), b[0].source.as_str()),
        ("overlay", "overlay")
    );
    let id_b = id_under(&d, own_fs(&b));
    assert_ne!(id_b, id_a);
    let mut want = vec![
        format!("workdir={}", work_of(&d, id_b)),
        format!("upperdir={}", fs_of(&d, id_b)),
        format!("lowerdir={}", fs_of(&d, id_a)),
    ];
    want.extend(extra.iter().cloned());
    assert_eq!(b[0].options, want);
    assert_eq!(c.mounts("b").await.unwrap(), b);
    {
        let m = mount_at(&b, &d.scratch("mb"));
        assert_eq!(read(m.path(), "/from-a"), b"a");
        put(m.path(), "/from-b", b"b", 0o644);
    }
    c.commit("B", "b").await.unwrap();

    // Active, two parents: lowerdir nearest parent first.
    let cc = c.prepare("c", "B").await.unwrap();
    let id_c = id_under(&d, own_fs(&cc));
    let mut want = vec![
        format!("workdir={}", work_of(&d, id_c)),
        format!("upperdir={}", fs_of(&d, id_c)),
        format!("lowerdir={}:{}", fs_of(&d, id_b), fs_of(&d, id_a)),
    ];
    want.extend(extra.iter().cloned());
    assert_eq!(cc[0].options, want);
    {
        let m = mount_at(&cc, &d.scratch("mc"));
        assert_eq!(ls(m.path(), "/"), strings(&["from-a", "from-b"]));
    }

    // View, no parent: a read-only bind of its own (empty) fs, and no work directory.
    let v0 = c.view("v0", "").await.unwrap();
    assert_eq!(v0.len(), 1);
    assert_eq!(v0[0].r#type, "bind");
    assert_eq!(v0[0].options, strings(&["ro", "rbind"]));
    let id_v0 = id_under(&d, &v0[0].source);
    assert!(
        ![&id_a, &id_b, &id_c].contains(&&id_v0),
        "a view gets its own directory"
    );
    assert!(
        !Path::new(&work_of(&d, id_v0)).exists(),
        "views have no work directory"
    );
    assert_eq!(fs::read_dir(&v0[0].source).unwrap().count(), 0);
    assert_eq!(c.mounts("v0").await.unwrap(), v0);

    // View, one parent: a read-only bind of the PARENT's fs.
    let v1 = c.view("v1", "A").await.unwrap();
    assert_eq!(v1.len(), 1);
    assert_eq!(v1[0].r#type, "bind");
    assert_eq!(v1[0].source, fs_of(&d, id_a));
    assert_eq!(v1[0].options, strings(&["ro", "rbind"]));
    assert_eq!(c.mounts("v1").await.unwrap(), v1);

    // View, two parents: an overlay with lowerdir only (no upperdir: read-only).
    let v2 = c.view("v2", "B").await.unwrap();
    assert_eq!(v2.len(), 1);
    assert_eq!(
        (v2[0].r#type.as_str(), v2[0].source.as_str()),
        ("overlay", "overlay")
    );
    let mut want = vec![format!("lowerdir={}:{}", fs_of(&d, id_b), fs_of(&d, id_a))];
    want.extend(extra.iter().cloned());
    assert_eq!(v2[0].options, want);
    assert_eq!(c.mounts("v2").await.unwrap(), v2);
    {
        let m = mount_at(&v2, &d.scratch("mv2"));
        assert_eq!(ls(m.path(), "/"), strings(&["from-a", "from-b"]));
    }
    {
        let m = mount_at(&v1, &d.scratch("mv1"));
        assert_eq!(ls(m.path(), "/"), strings(&["from-a"]));
    }
});

// Configured `mount_options` go on overlays (after `lowerdir=`), never on bind mounts, and
// what lamina returns with them still mounts.
daemon_test!(
    configured_mount_options_go_on_overlays_only,
    config = "mount_options = [\"redirect_dir=off\"]\n",
    |d, mut c| {
        let a = c.prepare("a", "").await.unwrap();
        assert_eq!(a[0].options, strings(&["rw", "rbind"]));
        c.commit("A", "a").await.unwrap();
        let b = c.prepare("b", "A").await.unwrap();
        let opts = &b[0].options;
        assert!(
            opts[0].starts_with("workdir=") && opts[1].starts_with("upperdir="),
            "{opts:?}"
        );
        assert!(opts[2].starts_with("lowerdir="), "{opts:?}");
        let mut tail: Vec<String> = opts[3..].to_vec();
        tail.sort();
        let mut want = host_overlay_options();
        want.push("redirect_dir=off".into());
        want.sort();
        assert_eq!(
            tail, want,
            "configured then automatic options follow lowerdir"
        );
        drop(mount_at(&b, &d.scratch("mb")));
        c.commit("B", "b").await.unwrap();
        let v1 = c.view("v1", "A").await.unwrap();
        assert_eq!(v1[0].options, strings(&["ro", "rbind"]));
        let v2 = c.view("v2", "B").await.unwrap();
        assert!(
            v2[0].options.contains(&"redirect_dir=off".to_string()),
            "{v2:?}"
        );
        drop(mount_at(&v2, &d.scratch("mv2")));
    }
);
