//! 9–12: what holds for every snapshot whatever it holds: views are read-only, new snapshots
//! have the contract's modes whatever the umask, 128 stacked layers equal a flat copy, and
//! usage counts a snapshot's own inodes once.

use super::*;

// ---------------------------------------------------------------------------------------------
// 9. Views are read-only when mounted

#[track_caller]
fn assert_erofs<T: std::fmt::Debug>(res: io::Result<T>, what: &str) {
    match res {
        Ok(v) => panic!("{what}: succeeded on a view ({v:?}); EROFS expected"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(Errno::EROFS as i32), "{what}: {e}"),
    }
}

fn assert_read_only(r: &Path, existing: &str) {
    assert_erofs(
        fs::write(r.join("testfile"), b"testcontent"),
        "create a file",
    );
    assert_erofs(
        fs::OpenOptions::new().write(true).open(at(r, existing)),
        "open for writing",
    );
    assert_erofs(fs::create_dir(r.join("newdir")), "mkdir");
    assert_erofs(fs::remove_file(at(r, existing)), "unlink");
    assert_erofs(
        fs::set_permissions(at(r, existing), fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    assert_erofs(chown(at(r, existing), Some(7), Some(7)), "chown");
    let st = nix::sys::statvfs::statvfs(r).unwrap();
    assert!(
        st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        "mounted read-only"
    );
}

daemon_test!(views_are_read_only_when_mounted, |d, mut c| {
    let m1 = c.prepare("p1", "").await.unwrap();
    let fs1 = own_fs(&m1);
    {
        let m = mount_at(&m1, &d.scratch("p1"));
        put(m.path(), "/f", b"one", 0o644);
    }
    c.commit("c1", "p1").await.unwrap();
    let m2 = c.prepare("p2", "c1").await.unwrap();
    let fs2 = own_fs(&m2);
    {
        let m = mount_at(&m2, &d.scratch("p2"));
        put(m.path(), "/g", b"two", 0o644);
    }
    c.commit("c2", "p2").await.unwrap();

    // No parent: a read-only bind of the view's own empty directory.
    let v0 = c.view("v0", "").await.unwrap();
    {
        let m = mount_at(&v0, &d.scratch("v0"));
        assert_erofs(
            fs::write(m.path().join("testfile"), b"x"),
            "create in an empty view",
        );
        assert_erofs(fs::create_dir(m.path().join("d")), "mkdir in an empty view");
    }
    assert_eq!(fs::read_dir(&v0[0].source).unwrap().count(), 0);

    // One parent: a read-only bind of the parent's directory.
    let v1 = c.view("v1", "c1").await.unwrap();
    assert_eq!(v1[0].r#type, "bind", "{v1:?}");
    {
        let m = mount_at(&v1, &d.scratch("v1"));
        assert_read_only(m.path(), "/f");
        assert_eq!(read(m.path(), "/f"), b"one");
    }
    // Two parents: an overlay without upperdir.
    let v2 = c.view("v2", "c2").await.unwrap();
    assert_eq!(v2[0].r#type, "overlay", "{v2:?}");
    {
        let m = mount_at(&v2, &d.scratch("v2"));
        assert_read_only(m.path(), "/f");
        assert_read_only(m.path(), "/g");
        assert_eq!(read(m.path(), "/g"), b"two");
    }
    // Nothing leaked into the committed layers.
    assert_eq!(ls(&fs1, "/"), strings(&["f"]));
    assert_eq!(ls(&fs2, "/"), strings(&["g"]));
    assert_eq!(
        (read(&fs1, "/f"), mode(&fs1, "/f")),
        (b"one".to_vec(), 0o644)
    );
    for v in ["v0", "v1", "v2", "c2", "c1"] {
        c.remove(v).await.unwrap();
    }
});

// ---------------------------------------------------------------------------------------------
// 10. Modes of new snapshots, whatever the umask

/// Starts lamina with `mask` as its umask without touching this process's umask, which every
/// concurrently running test shares. The umask lives in the filesystem context, so a thread that
/// unshares it (`unshare(CLONE_FS)`) has its own; a child spawned from that thread inherits it.
fn start_with_umask(mask: u32) -> TestDaemon {
    std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_FS).expect("unshare(CLONE_FS)");
        umask(Mode::from_bits_truncate(mask));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(TestDaemon::start())
    })
    .join()
    .expect("starting lamina with a umask")
}

root_test!(new_snapshots_have_contract_modes_whatever_the_umask, || {
    for mask in [0o000, 0o077] {
        let d = start_with_umask(mask);
        let status = fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let umask_line = status
            .lines()
            .find(|l| l.starts_with("Umask:"))
            .expect("Umask line");
        assert_eq!(
            u32::from_str_radix(umask_line["Umask:".len()..].trim(), 8).unwrap(),
            mask,
            "lamina runs with the umask under test"
        );
        let mut c = d.client().await;
        assert_eq!(mode_of(&d.root), 0o700, "umask {mask:o}: root");
        assert_eq!(
            mode_of(&d.root.join("snapshots")),
            0o700,
            "umask {mask:o}: snapshots"
        );

        // Active, no parent.
        let a = c.prepare("a", "").await.unwrap();
        let fs_a = own_fs(&a);
        assert_eq!(mode_of(&fs_a), 0o755, "umask {mask:o}: fs");
        assert_eq!(
            mode_of(&fs_a.parent().unwrap().join("work")),
            0o711,
            "umask {mask:o}: work"
        );
        {
            let m = mount_at(&a, &d.scratch("a"));
            assert_eq!(
                mode_of(m.path()),
                0o755,
                "umask {mask:o}: root of the mount"
            );
            // Hand the layer's root to another owner: children's fs follow it.
            chown(m.path(), Some(1000), Some(1001)).unwrap();
            put(m.path(), "/f", b"f", 0o644);
        }
        c.commit("A", "a").await.unwrap();

        // Active with a parent: an overlay whose root is the new upper directory.
        let b = c.prepare("b", "A").await.unwrap();
        let fs_b = own_fs(&b);
        let work_b = fs_b.parent().unwrap().join("work");
        assert_eq!(mode_of(&fs_b), 0o755, "umask {mask:o}: child fs");
        assert_eq!(mode_of(&work_b), 0o711, "umask {mask:o}: child work");
        let mb = fs::metadata(&fs_b).unwrap();
        assert_eq!(
            (mb.uid(), mb.gid()),
            (1000, 1001),
            "a child's fs takes its parent's owner"
        );
        {
            let m = mount_at(&b, &d.scratch("b"));
            let st = fs::metadata(m.path()).unwrap();
            assert_eq!(
                st.mode() & 0o7777,
                0o755,
                "umask {mask:o}: root of the overlay"
            );
            assert_eq!((st.uid(), st.gid()), (1000, 1001));
            assert_eq!(read(m.path(), "/f"), b"f");
        }

        // A view has fs but no work directory.
        let v = c.view("v", "").await.unwrap();
        let fs_v = PathBuf::from(&v[0].source);
        assert_eq!(mode_of(&fs_v), 0o755, "umask {mask:o}: view fs");
        assert!(!fs_v.parent().unwrap().join("work").exists());
        {
            let m = mount_at(&v, &d.scratch("v"));
            assert_eq!(mode_of(m.path()), 0o755);
        }
    }
});

// ---------------------------------------------------------------------------------------------
// 11. 128 stacked layers against a flat copy

/// Layer `i` of the stack. Layer 0 lays the ground; each later one overwrites a file, adds one,
/// replaces a directory wholesale (opaque), deletes a file an earlier layer added (whiteout),
/// changes a lower file's mode (copy-up), and now and then adds or removes symlinks and renames
/// a lower file.
fn stack_layer(i: usize, r: &Path) {
    if i == 0 {
        put(r, "/bottom", b"way at the bottom\n", 0o777);
        put(r, "/overwriteme", b"FIRST!\n", 0o777);
        mkdir(r, "/ADDHERE", 0o755);
        mkdir(r, "/ONLYME", 0o755);
        put(r, "/ONLYME/bottom", b"bye!\n", 0o777);
        put(r, "/chmodme", b"modes\n", 0o644);
        mkdir(r, "/links", 0o755);
        return;
    }
    put(
        r,
        "/overwriteme",
        format!("{i} WAS HERE!\n").as_bytes(),
        0o777,
    );
    put(r, &format!("/ADDHERE/file-{i}"), b"same\n", 0o755);
    rm_rf(r, "/ONLYME");
    mkdir(r, "/ONLYME", 0o755);
    put(r, &format!("/ONLYME/file-{i}"), b"only me!\n", 0o777);
    if i.is_multiple_of(3) && at(r, &format!("/ADDHERE/file-{}", i - 2)).exists() {
        rm(r, &format!("/ADDHERE/file-{}", i - 2));
    }
    chmod(r, "/chmodme", [0o644, 0o600, 0o755, 0o4750][i % 4]);
    if i.is_multiple_of(5) {
        ln_s(
            r,
            &format!("../ADDHERE/file-{}", i - 1),
            &format!("/links/l-{i}"),
        );
    }
    if i.is_multiple_of(10) {
        rm(r, &format!("/links/l-{}", i - 5));
    }
    if i.is_multiple_of(16) {
        mv(
            r,
            &format!("/ADDHERE/file-{}", i - 1),
            &format!("/ADDHERE/renamed-{i}"),
        );
    }
}

daemon_test!(stack_of_128_layers_equals_a_flat_copy, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let layers: Vec<_> = (0..128)
        .map(|i| move |r: &Path| stack_layer(i, r))
        .collect();
    let refs: Vec<Layer<'_>> = layers.iter().map(|l| l as Layer<'_>).collect();
    let chain = build(&d, &mut c, &flat, "", &refs).await;
    assert_eq!(chain.names.len(), 128);
    let top = chain.names.last().unwrap().clone();
    let want = tree(&flat);

    // Sanity of the mirror itself, so that equal trees mean something.
    assert_eq!(read(&flat, "/overwriteme"), b"127 WAS HERE!\n");
    assert_eq!(ls(&flat, "/ONLYME"), strings(&["file-127"]));
    assert_eq!(read(&flat, "/bottom"), b"way at the bottom\n");
    assert!(want.len() > 80, "{} entries", want.len());

    // A view of the top: 128 lower directories.
    let mounts = c.view("fullview", &top).await.unwrap();
    let lowers = mounts[0].options[0].matches(':').count() + 1;
    assert_eq!(lowers, 128);
    {
        let m = mount_at(&mounts, &d.scratch("fullview"));
        assert_same_tree(&tree(m.path()), &want, "the view of 128 layers");
        eprintln!(
            "128 layers: {} option bytes, {} mounts used relative lowerdirs",
            mounts[0].options.iter().map(String::len).sum::<usize>(),
            chain.compacted + m.compacted() as usize
        );
    }
    // An active snapshot on top: 128 lowers plus an upper directory; still writable.
    let mounts = c.prepare("top-active", &top).await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("top-active"));
        assert_same_tree(
            &tree(m.path()),
            &want,
            "the active snapshot over 128 layers",
        );
        stack_layer(128, m.path());
        stack_layer(128, &flat);
        assert_same_tree(&tree(m.path()), &tree(&flat), "layer 128 applied on top");
    }
    // The layers below are unchanged: spot-check a few views.
    for i in [0, 1, 63, 126] {
        let t = view_tree(&d, &mut c, &chain.names[i]).await;
        assert_same_tree(&t, &chain.trees[i], &format!("layer {i} at the end"));
    }
});

// ---------------------------------------------------------------------------------------------
// 12. Usage

daemon_test!(usage_counts_own_inodes_once, |d, mut c| {
    let m1 = c.prepare("u1", "").await.unwrap();
    let fs1 = own_fs(&m1);
    {
        let m = mount_at(&m1, &d.scratch("u1"));
        let r = m.path();
        put(r, "/big", &vec![7u8; 256 * 1024], 0o644);
        put(r, "/h1", &vec![1u8; 10_000], 0o644);
        ln(r, "/h1", "/h2");
        mkdir(r, "/d", 0o755);
        ln(r, "/h1", "/d/h3");
        ln_s(r, "big", "/l");
        fs::File::open(at(r, "/big")).unwrap().sync_all().unwrap();
    }
    c.commit("U1", "u1").await.unwrap();
    let (size1, inodes1, naive1) = du(&fs1);
    // root, big, h1 (== h2 == d/h3), d, l
    assert_eq!(inodes1, 5);
    assert!(
        naive1 >= size1 + 2 * 8192,
        "the hard links make a difference worth testing"
    );
    let u = c.usage("U1").await.unwrap();
    assert_eq!(
        (u.size, u.inodes),
        (size1, inodes1),
        "committed usage: hard links count once"
    );

    // An active child: its own upper directory only, never its parents.
    let m2 = c.prepare("u2", "U1").await.unwrap();
    let fs2 = own_fs(&m2);
    let before = c.usage("u2").await.unwrap();
    let (s, n, _) = du(&fs2);
    assert_eq!(
        (before.size, before.inodes),
        (s, n),
        "an empty active snapshot"
    );
    assert_eq!(before.inodes, 1, "only its root directory");
    {
        let m = mount_at(&m2, &d.scratch("u2"));
        let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8 + 1).collect();
        let mut f = fs::File::create(at(m.path(), "/mib")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let after = c.usage("u2").await.unwrap();
        let (s, n, _) = du(&fs2);
        assert_eq!(
            (after.size, after.inodes),
            (s, n),
            "active usage is measured now"
        );
        assert_eq!(after.inodes, before.inodes + 1);
        assert!(
            after.size - before.size >= 1024 * 1024,
            "{after:?} vs {before:?}"
        );
        assert!(
            after.size < size1 + 1024 * 1024,
            "parents are not counted: {after:?}"
        );
    }
    c.commit("U2", "u2").await.unwrap();
    let (s2, n2, _) = du(&fs2);
    let u2 = c.usage("U2").await.unwrap();
    assert_eq!(
        (u2.size, u2.inodes),
        (s2, n2),
        "committed usage of the child"
    );
    assert_eq!(
        c.usage("U1").await.unwrap(),
        u,
        "the parent's usage is unchanged"
    );

    // Views use nothing of their own.
    c.view("v1", "U1").await.unwrap();
    c.view("v2", "U2").await.unwrap();
    c.view("v0", "").await.unwrap();
    for v in ["v0", "v1", "v2"] {
        let u = c.usage(v).await.unwrap();
        assert_eq!((u.size, u.inodes), (0, 0), "usage of view {v}");
    }
});
