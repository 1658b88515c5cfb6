//! 3–8: what upper layers do to the files below them, checked against a flat copy: updates,
//! opaque directories, copy-up by chown, permissions, whiteouts, renames and hard links.

use super::*;

// ---------------------------------------------------------------------------------------------
// 3. A file updated in upper layers, again and again

daemon_test!(file_updated_in_every_layer, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let base = |r: &Path| {
        mkdir(r, "/etc", 0o700);
        put(r, "/etc/hosts", b"mydomain 10.0.0.1", 0o644);
        put(r, "/etc/profile", b"PATH=/usr/bin", 0o644);
        put(r, "/etc/motd", &vec![b'.'; 8192], 0o644);
        put(r, "/etc/log", b"1\n", 0o600);
    };
    // Every later layer rewrites /etc/hosts with content of the same length (same size, same
    // second: the case that fooled tar-based diffs), flips /etc/profile's mode, patches one
    // byte in the middle of /etc/motd (copy-up must keep the rest) and appends to /etc/log.
    let update = |k: u8| {
        move |r: &Path| {
            put(
                r,
                "/etc/hosts",
                format!("mydomain 10.0.0.{k}").as_bytes(),
                0o644,
            );
            chmod(
                r,
                "/etc/profile",
                if k.is_multiple_of(2) { 0o666 } else { 0o644 },
            );
            let f = fs::OpenOptions::new()
                .write(true)
                .open(at(r, "/etc/motd"))
                .unwrap();
            f.write_all_at(&[b'0' + k], 4000 + k as u64).unwrap();
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(at(r, "/etc/log"))
                .unwrap();
            writeln!(f, "{k}").unwrap();
        }
    };
    let (u2, u3, u4, u5, u6) = (update(2), update(3), update(4), update(5), update(6));
    let chain = build(&d, &mut c, &flat, "", &[&base, &u2, &u3, &u4, &u5, &u6]).await;

    let top = chain.names.last().unwrap();
    with_view(&d, &mut c, top, |r| {
        assert_eq!(read(r, "/etc/hosts"), b"mydomain 10.0.0.6");
        assert_eq!(mode(r, "/etc/profile"), 0o666);
        let motd = read(r, "/etc/motd");
        assert_eq!(motd.len(), 8192);
        for k in 2..=6u8 {
            assert_eq!(motd[4000 + k as usize], b'0' + k);
        }
        assert_eq!(motd.iter().filter(|&&b| b == b'.').count(), 8192 - 5);
        assert_eq!(read(r, "/etc/log"), b"1\n2\n3\n4\n5\n6\n");
    })
    .await;
    // Lower layers are untouched by the ones above them.
    for (i, name) in chain.names.iter().enumerate() {
        let t = view_tree(&d, &mut c, name).await;
        assert_same_tree(
            &t,
            &chain.trees[i],
            &format!("layer {i} after all layers were built"),
        );
        let hosts = &t["/etc/hosts"].what;
        assert_eq!(
            hosts,
            &What::File(format!("mydomain 10.0.0.{}", i + 1).into_bytes())
        );
    }
    // And the bottom layer's own directory still holds the first version.
    assert_eq!(read(&chain.fs[0], "/etc/hosts"), b"mydomain 10.0.0.1");
});

// ---------------------------------------------------------------------------------------------
// 4. A directory removed and recreated over a lower layer (opaque directory)

daemon_test!(
    directory_recreated_over_lower_hides_old_contents,
    |d, mut c| {
        let flat = flat_dir(&d, "flat");

        let l1 = |r: &Path| {
            mkdir(r, "/lib", 0o700);
            put(r, "/lib/hidden", b"", 0o644);
            mkdir(r, "/lib/sub", 0o755);
            put(r, "/lib/sub/deep", b"deep", 0o644);
        };
        let l2 = |r: &Path| {
            rm_rf(r, "/lib");
            mkdir(r, "/lib", 0o755);
            put(r, "/lib/not-hidden", b"", 0o644);
        };
        let l3 = |r: &Path| {
            put(r, "/lib/newfile", b"", 0o644);
        };
        let chain = build(&d, &mut c, &flat, "", &[&l1, &l2, &l3]).await;

        let names = &chain.names;
        with_view(&d, &mut c, &names[0], |r| {
            assert_eq!(ls(r, "/lib"), strings(&["hidden", "sub"]));
            assert_eq!(mode(r, "/lib"), 0o700);
        })
        .await;
        with_view(&d, &mut c, &names[1], |r| {
            assert_eq!(ls(r, "/lib"), strings(&["not-hidden"]));
            assert_eq!(mode(r, "/lib"), 0o755);
            assert_absent(r, "/lib/hidden");
            assert_absent(r, "/lib/sub");
        })
        .await;
        with_view(&d, &mut c, &names[2], |r| {
            assert_eq!(ls(r, "/lib"), strings(&["newfile", "not-hidden"]));
            assert_absent(r, "/lib/sub/deep");
        })
        .await;
        // An active snapshot on top sees the same, and the old entries cannot be reached there either.
        let mounts = c.prepare("top", &names[2]).await.unwrap();
        let m = mount_at(&mounts, &d.scratch("top"));
        assert_eq!(ls(m.path(), "/lib"), strings(&["newfile", "not-hidden"]));
        assert_absent(m.path(), "/lib/hidden");
    }
);

// ---------------------------------------------------------------------------------------------
// 5. chown of lower files: copy-up

daemon_test!(chown_of_lower_files_copies_up_and_persists, |d, mut c| {
    let flat = flat_dir(&d, "flat");
    let big: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();

    let l1 = |r: &Path| {
        mkdir(r, "/opt", 0o700);
        mkdir(r, "/opt/a", 0o700);
        mkdir(r, "/opt/a/b", 0o700);
        put(r, "/opt/a/b/file.txt", b"hello", 0o644);
        put(r, "/opt/big", &big, 0o640);
        ln_s(r, "a/b/file.txt", "/opt/link");
    };
    let l2 = |r: &Path| {
        for p in [
            "/opt",
            "/opt/a",
            "/opt/a/b",
            "/opt/a/b/file.txt",
            "/opt/big",
        ] {
            chown_to(r, p, 1, 1);
        }
        chown_to(r, "/opt/link", 2, 3);
    };

    // Layer 1 through the chain helper; layer 2 by hand, to look inside the active snapshot.
    let chain = build(&d, &mut c, &flat, "", &[&l1]).await;
    let base = &chain.names[0];
    let mounts = c.prepare("chown", base).await.unwrap();
    let lower_fs = &chain.fs[0];
    {
        let m = mount_at(&mounts, &d.scratch("chown"));
        l2(m.path());
        l2(&flat);
        let r = m.path();
        assert_eq!(
            (
                meta(r, "/opt/a/b/file.txt").uid(),
                meta(r, "/opt/a/b/file.txt").gid()
            ),
            (1, 1)
        );
        assert_eq!(
            (meta(r, "/opt/link").uid(), meta(r, "/opt/link").gid()),
            (2, 3)
        );
        assert_eq!(read(r, "/opt/big"), big, "copy-up kept the data");
        assert_eq!(mode(r, "/opt/a/b"), 0o700, "chown kept the mode");
        assert_same_tree(&tree(r), &tree(&flat), "active snapshot after chown");
        // The lower layer itself was not touched: the change lives in the upper directory.
        assert_eq!(meta(lower_fs, "/opt/a/b/file.txt").uid(), 0);
        assert_eq!(meta(lower_fs, "/opt").uid(), 0);
        assert_eq!(meta(&own_fs(&mounts), "/opt/a/b/file.txt").uid(), 1);
    }
    c.commit("chowned", "chown").await.unwrap();
    let want = tree(&flat);
    with_view(&d, &mut c, "chowned", |r| {
        assert_same_tree(&tree(r), &want, "view after commit");
        for p in [
            "/opt",
            "/opt/a",
            "/opt/a/b",
            "/opt/a/b/file.txt",
            "/opt/big",
        ] {
            assert_eq!((meta(r, p).uid(), meta(r, p).gid()), (1, 1), "{p}");
        }
        assert_eq!(read(r, "/opt/a/b/file.txt"), b"hello");
        assert_eq!(read(r, "/opt/link"), b"hello");
    })
    .await;
    with_view(&d, &mut c, base, |r| {
        assert_same_tree(&tree(r), &chain.trees[0], "the base keeps its owners");
        assert_eq!(meta(r, "/opt/a/b/file.txt").uid(), 0);
    })
    .await;
});

// ---------------------------------------------------------------------------------------------
// 6. Permissions kept over three layers

daemon_test!(permissions_kept_over_three_layers, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let l1 = |r: &Path| {
        for dir in ["/dir1", "/dir2", "/dir3", "/dir4", "/dir5"] {
            mkdir(r, dir, 0o700);
        }
        put(r, "/dir4/f1", b"...", 0o644);
        put(r, "/dir5/f1", b"...", 0o644);
        chown_to(r, "/dir1", 1, 1);
        chown_to(r, "/dir2", 1, 1);
        chown_to(r, "/dir3", 1, 1);
        chown_to(r, "/dir5", 1, 1);
        chown_to(r, "/dir5/f1", 1, 1);
        // chown clears set-id bits: modes are set after owners.
        put(r, "/suid", b"#!/bin/true\n", 0o4755);
        put(r, "/sgid-file", b"x", 0o2711);
        mkdir(r, "/shared", 0o2775);
        chown_to(r, "/shared", 0, 5);
        chmod(r, "/shared", 0o2775);
        mkdir(r, "/tmp", 0o1777);
        put(r, "/readonly", b"ro", 0o444);
        mkdir(r, "/x", 0o711);
    };
    let l2 = |r: &Path| {
        chown_to(r, "/dir2", 0, 0);
        rm_rf(r, "/dir3");
        chown_to(r, "/dir4", 1, 1);
        chown_to(r, "/dir4/f1", 1, 1);
        chmod(r, "/suid", 0o6711);
        put(r, "/tmp/f", b"in sticky dir", 0o600);
        chmod(r, "/readonly", 0o400);
        chmod(r, "/x", 0o1751);
    };
    let l3 = |r: &Path| {
        mkdir(r, "/dir3", 0o700);
        chown_to(r, "/dir3", 1, 1);
        rm_rf(r, "/dir5");
        mkdir(r, "/dir5", 0o700);
        chown_to(r, "/dir5", 1, 1);
        // A file created in a set-gid directory takes its group.
        fs::write(at(r, "/shared/new"), b"n").unwrap();
        chmod(r, "/shared/new", 0o664);
        put(r, "/dir1/mine", b"m", 0o4700);
    };
    let chain = build(&d, &mut c, &flat, "", &[&l1, &l2, &l3]).await;

    // The mirror could be wrong the same way as the mount: check the modes themselves too.
    let want: &[(&str, u32, u32, u32)] = &[
        ("/dir1", 0o700, 1, 1),
        ("/dir1/mine", 0o4700, 0, 0),
        ("/dir2", 0o700, 0, 0),
        ("/dir3", 0o700, 1, 1),
        ("/dir4", 0o700, 1, 1),
        ("/dir4/f1", 0o644, 1, 1),
        ("/dir5", 0o700, 1, 1),
        ("/suid", 0o6711, 0, 0),
        ("/sgid-file", 0o2711, 0, 0),
        ("/shared", 0o2775, 0, 5),
        ("/shared/new", 0o664, 0, 5),
        ("/tmp", 0o1777, 0, 0),
        ("/tmp/f", 0o600, 0, 0),
        ("/readonly", 0o400, 0, 0),
        ("/x", 0o1751, 0, 0),
    ];
    let top = chain.names.last().unwrap().clone();
    with_view(&d, &mut c, &top, |r| {
        for &(p, m, uid, gid) in want {
            let md = meta(r, p);
            assert_eq!(
                (md.mode() & 0o7777, md.uid(), md.gid()),
                (m, uid, gid),
                "{p}"
            );
        }
        assert_eq!(
            ls(r, "/dir5"),
            Vec::<String>::new(),
            "dir5 was recreated empty"
        );
        assert_eq!(ls(r, "/dir3"), Vec::<String>::new());
    })
    .await;
    // And in an active snapshot on top (an overlay with an upper directory).
    let mounts = c.prepare("top-active", &top).await.unwrap();
    let m = mount_at(&mounts, &d.scratch("top-active"));
    assert_same_tree(
        &tree(m.path()),
        chain.trees.last().unwrap(),
        "active on top",
    );
    // The middle layer still shows dir3 gone and the first /suid mode changed.
    with_view(&d, &mut c, &chain.names[1], |r| {
        assert_absent(r, "/dir3");
        assert_eq!(mode(r, "/suid"), 0o6711);
        assert_eq!(meta(r, "/dir5/f1").uid(), 1);
    })
    .await;
    with_view(&d, &mut c, &chain.names[0], |r| {
        assert_eq!(mode(r, "/suid"), 0o4755);
        assert_eq!(mode(r, "/x"), 0o711);
    })
    .await;
});

// ---------------------------------------------------------------------------------------------
// 7. Whiteouts: deleted files stay deleted in children

daemon_test!(deleted_files_stay_deleted_in_children, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let l1 = |r: &Path| {
        put(r, "/foo", b"foo\n", 0o777);
        put(r, "/foobar", b"foobar\n", 0o777);
        mkdir(r, "/dir", 0o755);
        put(r, "/dir/x", b"x", 0o644);
        put(r, "/dir/y", b"y", 0o644);
        mkdir(r, "/gone", 0o755);
        put(r, "/gone/inside", b"i", 0o644);
        ln_s(r, "foo", "/link");
    };
    let l2 = |r: &Path| {
        rm(r, "/foobar");
        rm(r, "/dir/x");
        rm_rf(r, "/gone");
        rm(r, "/link");
    };
    let l3 = |_: &Path| {};
    let l4 = |r: &Path| put(r, "/foobar", b"reborn\n", 0o600);
    let l5 = |r: &Path| rm(r, "/foobar");
    let chain = build(&d, &mut c, &flat, "", &[&l1, &l2, &l3, &l4, &l5]).await;
    let n = &chain.names;

    for (i, reborn) in [(1, false), (2, false), (3, true), (4, false)] {
        with_view(&d, &mut c, &n[i], |r| {
            assert_eq!(read(r, "/foo"), b"foo\n");
            assert_eq!(ls(r, "/dir"), strings(&["y"]), "layer {i}");
            assert_absent(r, "/dir/x");
            assert_absent(r, "/gone");
            assert_absent(r, "/link");
            if reborn {
                assert_eq!(read(r, "/foobar"), b"reborn\n");
            } else {
                assert_absent(r, "/foobar");
            }
        })
        .await;
    }
    // The first layer still has everything.
    with_view(&d, &mut c, &n[0], |r| {
        assert_eq!(read(r, "/foobar"), b"foobar\n");
        assert_eq!(ls(r, "/dir"), strings(&["x", "y"]));
    })
    .await;
    // An active snapshot on top of the empty layer: still deleted, and can be created afresh.
    let mounts = c.prepare("on-empty", &n[2]).await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("on-empty"));
        assert_eq!(ls(m.path(), "/"), strings(&["dir", "foo"]));
        put(m.path(), "/gone", b"now a file", 0o644);
    }
    c.commit("on-empty-c", "on-empty").await.unwrap();
    with_view(&d, &mut c, "on-empty-c", |r| {
        assert!(meta(r, "/gone").is_file());
        assert_eq!(read(r, "/gone"), b"now a file");
    })
    .await;
});

// ---------------------------------------------------------------------------------------------
// 8. Rename and hard link of files from a lower layer

/// Renames a directory; when overlayfs refuses a lower directory (EXDEV without
/// redirect_dir), does what `mv` does: copy, then delete.
fn mv_dir(root: &Path, from: &str, to: &str) {
    match fs::rename(at(root, from), at(root, to)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(Errno::EXDEV as i32) => {
            copy_tree(&at(root, from), &at(root, to));
            fs::remove_dir_all(at(root, from)).unwrap();
        }
        Err(e) => panic!("rename {from} -> {to}: {e}"),
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let m = fs::symlink_metadata(from).unwrap();
    if m.is_dir() {
        fs::create_dir(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else if m.file_type().is_symlink() {
        symlink(fs::read_link(from).unwrap(), to).unwrap();
    } else {
        fs::copy(from, to).unwrap();
    }
    if !m.file_type().is_symlink() {
        fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777)).unwrap();
    }
    lchown(to, Some(m.uid()), Some(m.gid())).unwrap();
}

daemon_test!(rename_and_hard_link_of_lower_files, |d, mut c| {
    let flat = flat_dir(&d, "flat");

    let l1 = |r: &Path| {
        mkdir(r, "/dir1", 0o700);
        put(r, "/dir1/f1", b"Hello", 0o644);
        mkdir(r, "/dir2", 0o700);
        put(r, "/dir2/f2", b"...", 0o644);
        mkdir(r, "/somefiles", 0o700);
        put(r, "/somefiles/f1", b"was here first!", 0o644);
        put(r, "/somefiles/f2", b"nothing interesting", 0o644);
        put(r, "/somefiles/f4", b"moving out", 0o600);
        mkdir(r, "/h", 0o755);
        put(r, "/h/a", b"linked", 0o640);
        mkdir(r, "/olddir", 0o750);
        put(r, "/olddir/inner", b"inner", 0o644);
    };
    let l2 = |r: &Path| {
        mkdir(r, "/dir3", 0o700);
        put(r, "/dir3/f1", b"Hello", 0o644);
        rm_rf(r, "/dir1");
        // Hard link a lower file elsewhere, then drop the original name.
        ln(r, "/dir2/f2", "/dir3/f2");
        rm(r, "/dir2/f2");
        // Replace a lower file by renaming a new one over it; rename lower files.
        put(r, "/somefiles/f1-overwrite", b"new content 1", 0o644);
        mv(r, "/somefiles/f1-overwrite", "/somefiles/f1");
        mv(r, "/somefiles/f2", "/somefiles/f3");
        mv(r, "/somefiles/f4", "/dir3/f4");
        // Two names for one lower file, both kept.
        ln(r, "/h/a", "/h/b");
        mv_dir(r, "/olddir", "/newdir");
    };
    let chain = build(&d, &mut c, &flat, "", &[&l1]).await;

    let mounts = c.prepare("l2", &chain.names[0]).await.unwrap();
    {
        let m = mount_at(&mounts, &d.scratch("l2"));
        let r = m.path();
        l2(r);
        l2(&flat);
        assert_same_tree(
            &tree(r),
            &tree(&flat),
            "active snapshot after renames and links",
        );
        let (a, b) = (meta(r, "/h/a"), meta(r, "/h/b"));
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "one inode, two names");
        // Writing through one name shows through the other.
        fs::OpenOptions::new()
            .append(true)
            .open(at(r, "/h/b"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        assert_eq!(read(r, "/h/a"), b"linked!");
        fs::OpenOptions::new()
            .append(true)
            .open(at(&flat, "/h/b"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
    }
    c.commit("l2c", "l2").await.unwrap();
    let want = tree(&flat);
    {
        with_view(&d, &mut c, "l2c", |r| {
            assert_same_tree(&tree(r), &want, "view after commit");
            assert_absent(r, "/dir1");
            assert_absent(r, "/dir2/f2");
            assert_eq!(ls(r, "/dir2"), Vec::<String>::new());
            assert_eq!(read(r, "/dir3/f2"), b"...");
            assert_eq!(read(r, "/dir3/f1"), b"Hello");
            assert_eq!(read(r, "/dir3/f4"), b"moving out");
            assert_eq!(mode(r, "/dir3/f4"), 0o600);
            assert_eq!(ls(r, "/somefiles"), strings(&["f1", "f3"]));
            assert_eq!(read(r, "/somefiles/f1"), b"new content 1");
            assert_eq!(read(r, "/somefiles/f3"), b"nothing interesting");
            let (a, b) = (meta(r, "/h/a"), meta(r, "/h/b"));
            assert_eq!(
                (a.ino(), a.nlink()),
                (b.ino(), 2),
                "the link survived the commit"
            );
            assert_eq!(read(r, "/h/b"), b"linked!");
            assert_absent(r, "/olddir");
            assert_eq!(read(r, "/newdir/inner"), b"inner");
            assert_eq!(mode(r, "/newdir"), 0o750);
        })
        .await;
    }
    // The lower layer is as it was.
    with_view(&d, &mut c, &chain.names[0], |r| {
        assert_same_tree(&tree(r), &chain.trees[0], "base after the child's renames");
    })
    .await;
});
