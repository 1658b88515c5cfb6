//! End to end through a real containerd, as a user would drive it with `ctr`: a private
//! containerd registers lamina as its `lamina` proxy snapshotter with the fragment `lamina
//! config containerd` prints, imports a multi-layer OCI image built here (no registry needed),
//! runs containers on it with runc, inspects the snapshots, garbage-collects them, and survives
//! a restart of lamina. Each test runs against every containerd tested: Debian's 1.6 and the
//! 2.x releases of `.ci/versions`.
//!
//! Needs root, the containerds and runcs `.ci/setup` installs and builds, and Debian's
//! `busybox-static` (`/bin/busybox`, the only program in the image).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{
    containerd_support::Flavor,
    oci_support::{busybox_layer, layer_tar, sha256, write_oci_archive, Entry},
    util::*,
};

pub(crate) const IMAGE1: &str = "lamina.test/e2e:1";
pub(crate) const IMAGE2: &str = "lamina.test/e2e:2";
/// No single `ctr` call may take longer than this.
const CTR_TIMEOUT: Duration = Duration::from_secs(120);
/// Busybox applets the image links in `/bin`.
const APPLETS: &[&str] = &[
    "sh", "cat", "ls", "echo", "printf", "test", "sleep", "tr", "mkdir", "rm", "id", "stat",
];

// ---------------------------------------------------------------------------------------------
// What a `ctr` call printed.

struct Out {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

impl From<Output> for Out {
    fn from(o: Output) -> Out {
        Out {
            success: o.status.success(),
            status: o.status.to_string(),
            stdout: stdout(&o),
            stderr: stderr(&o),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A private containerd that knows lamina as a proxy snapshotter.

pub(crate) struct Containerd {
    dir: tempfile::TempDir,
    pub(crate) address: PathBuf,
    /// The containerd namespace `ctr` works in.
    pub(crate) ns: String,
    pub(crate) flavor: Flavor,
    child: Option<Child>,
}

/// The containerd of `flavor`, or None (the test is skipped, having said why) when it is not
/// built; under CI a missing containerd fails the test instead.
pub(crate) fn flavor(get: impl FnOnce() -> Result<Flavor, String>) -> Option<Flavor> {
    match get() {
        Ok(f) => Some(f),
        Err(why) if std::env::var_os("CI").is_some() => panic!("{why} (and CI is set)"),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

impl Containerd {
    /// Starts `flavor`'s containerd on a short temp dir under /tmp (unix socket paths must
    /// stay under 108 bytes), configured as a user would: its own settings, then what `lamina
    /// config containerd` prints for it and for lamina `d` (with `--cri` when `cri`), then what
    /// `extra` returns, given containerd's directory (where it may also write files). Waits
    /// until `ctr version` answers. `tag` makes the containerd namespace unique.
    pub(crate) fn start(
        d: &TestDaemon,
        flavor: &Flavor,
        tag: &str,
        cri: bool,
        extra: impl FnOnce(&Path) -> String,
    ) -> Containerd {
        let flags: &[&str] = if cri { &["--cri"] } else { &[] };
        Self::start_with(d, flavor, tag, flags, extra)
    }

    /// [`Containerd::start`] with `flags` for `lamina config containerd` (`--cri`,
    /// `--differ`).
    pub(crate) fn start_with(
        d: &TestDaemon,
        flavor: &Flavor,
        tag: &str,
        flags: &[&str],
        extra: impl FnOnce(&Path) -> String,
    ) -> Containerd {
        let cri = flags.contains(&"--cri");
        let fragment = fragment(d, flavor, flags);
        Self::launch(flavor, tag, |p| {
            format!("{}{fragment}\n{}", flavor.private_config(p, cri), extra(p))
        })
    }

    /// Starts `flavor`'s containerd with the config `config` returns, given containerd's
    /// directory: its socket must be `c.sock` there.
    pub(crate) fn launch(
        flavor: &Flavor,
        tag: &str,
        config: impl FnOnce(&Path) -> String,
    ) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("lc")
            .tempdir_in("/tmp")
            .expect("tempdir in /tmp");
        let p = dir.path().to_path_buf();
        let address = p.join("c.sock");
        let binary = flavor.program("containerd");
        fs::write(p.join("config.toml"), config(&p)).unwrap();
        let log = fs::File::create(p.join("containerd.log")).unwrap();
        let child = Command::new(&binary)
            .env("PATH", flavor.path_env())
            .arg("--config")
            .arg(p.join("config.toml"))
            .arg("--log-level")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd (is it installed? .ci/setup installs it)");
        let mut c = Containerd {
            dir,
            address,
            ns: format!("lamina-e2e-{}-{}-{tag}", std::process::id(), flavor.slug()),
            flavor: flavor.clone(),
            child: Some(child),
        };
        let answered =
            wait_for_blocking(Duration::from_secs(30), Duration::from_millis(50), || {
                if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                    c.child = None;
                    panic!(
                        "containerd exited during start-up: {status}; log:\n{}",
                        c.log_tail()
                    );
                }
                let version = c
                    .address
                    .exists()
                    .then(|| c.try_ctr(&["version"], Duration::from_secs(10)));
                matches!(version, Some(Ok(Out { success: true, .. }))).then_some(())
            });
        assert!(
            answered.is_some(),
            "containerd did not answer `ctr version` within 30 s; log:\n{}",
            c.log_tail()
        );
        c
    }

    fn try_ctr(&self, args: &[&str], limit: Duration) -> Result<Out, String> {
        let mut cmd = Command::new(self.flavor.program("ctr"));
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.ns)
            .args(args);
        run_for(&mut cmd, limit).map(Out::from)
    }

    /// `ctr ARGS`, whatever its exit status.
    fn ctr(&self, args: &[&str]) -> Out {
        self.try_ctr(args, CTR_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ctr ARGS`, which must succeed; returns its stdout.
    #[track_caller]
    pub(crate) fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.success,
            "`ctr {}` failed ({}):\nstderr: {}\nstdout: {}\ncontainerd log:\n{}",
            args.join(" "),
            out.status,
            out.stderr,
            out.stdout,
            self.log_tail()
        );
        out.stdout
    }

    /// `ctr snapshots --snapshotter lamina ARGS`, which must succeed.
    #[track_caller]
    fn snap_ok(&self, args: &[&str]) -> String {
        let mut all = vec!["snapshots", "--snapshotter", "lamina"];
        all.extend_from_slice(args);
        self.ctr_ok(&all)
    }

    /// `ctr snapshots --snapshotter lamina ls`, parsed: (key, parent, kind) per snapshot.
    pub(crate) fn snapshots(&self) -> Result<Vec<(String, String, String)>, String> {
        let out = self.try_ctr(&["snapshots", "--snapshotter", "lamina", "ls"], CTR_TIMEOUT)?;
        if !out.success {
            return Err(format!(
                "`ctr snapshots ls` failed ({}): {}",
                out.status, out.stderr
            ));
        }
        Ok(parse_snapshot_list(&out.stdout))
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.path("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until task `id` reports `status` in `ctr task ls`.
    fn wait_task(&self, id: &str, status: &str) {
        let mut out = String::new();
        let reached =
            wait_for_blocking(Duration::from_secs(30), Duration::from_millis(100), || {
                out = self.ctr_ok(&["task", "ls"]);
                out.lines()
                    .any(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.first() == Some(&id) && f.last() == Some(&status)
                    })
                    .then_some(())
            });
        assert!(
            reached.is_some(),
            "task {id} not {status} within 30 s; `ctr task ls`:\n{out}"
        );
    }

    /// Deletes what a failed test left (tasks, containers), stops containerd, then ends the
    /// shims started for this containerd and detaches mounts left under its directory.
    fn teardown(&mut self) {
        let short = Duration::from_secs(20);
        if self.child.is_some() {
            if let Ok(out) = self.try_ctr(&["task", "ls", "-q"], short) {
                for id in out.stdout.split_whitespace() {
                    let _ = self.try_ctr(&["task", "rm", "-f", id], short);
                }
            }
            if let Ok(out) = self.try_ctr(&["containers", "ls", "-q"], short) {
                for id in out.stdout.split_whitespace() {
                    let _ = self.try_ctr(&["containers", "rm", id], short);
                }
            }
        }
        crate::containerd_support::stop(
            self.child.take(),
            &self.address,
            self.dir.path(),
            std::slice::from_ref(&self.ns),
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- containerd log (last lines) ---\n{}", self.log_tail());
        }
        self.teardown();
    }
}

/// What `lamina config containerd` prints for `flavor`'s containerd and lamina `d`.
fn fragment(d: &TestDaemon, flavor: &Flavor, flags: &[&str]) -> String {
    let binary = flavor.program("containerd");
    let mut args = vec![
        "config",
        "containerd",
        "--containerd",
        binary.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let out = d.cli(&args);
    assert!(
        out.status.success(),
        "`lamina {}` failed: {}",
        args.join(" "),
        stderr(&out)
    );
    stdout(&out)
}

/// `containerd config default` of `flavor`, its paths moved under `dir`: the config a user
/// starts from.
fn stock_config(flavor: &Flavor, dir: &Path) -> String {
    let out = Command::new(flavor.program("containerd"))
        .args(["config", "default"])
        .output()
        .expect("containerd config default");
    assert!(
        out.status.success(),
        "containerd config default: {}",
        stderr(&out)
    );
    let mut config = stdout(&out);
    for (from, to) in [
        ("/run/containerd/containerd.sock", "c.sock"),
        ("/run/containerd", "state"),
        ("/var/lib/containerd", "root"),
        ("/etc/containerd", "etc"),
        ("/opt/containerd", "opt"),
        // 2.x's NRI (which its CRI starts) and its plugins: host-wide paths otherwise.
        ("/var/run/nri", "nri"),
        ("/opt/nri", "nri-plugins"),
        ("/etc/nri", "nri-conf"),
    ] {
        config = config.replace(from, &dir.join(to).display().to_string());
    }
    config
}

/// `ctr snapshots ls` output → (key, parent, kind); parent is "" for a root snapshot.
fn parse_snapshot_list(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [key, kind] => Some((key.to_string(), String::new(), kind.to_string())),
                [key, parent, kind] => {
                    Some((key.to_string(), parent.to_string(), kind.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// An OCI image archive, built here.

/// The chain IDs of layers with these diff IDs: what containerd names the committed snapshots.
pub(crate) fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The image's layers: (L1) busybox, /etc/msg = one, /gone, /d/old; (L2) /etc/msg = two,
/// whiteout of /gone, /d opaque with /d/new; then `extra` layers.
pub(crate) fn image_layers(extra: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let l1 = busybox_layer(
        APPLETS,
        &[
            Entry::Dir("etc"),
            Entry::File("etc/msg", b"one", 0o644),
            Entry::File("gone", b"x", 0o644),
            Entry::Dir("d"),
            Entry::File("d/old", b"old", 0o644),
        ],
    );
    let l2 = [
        Entry::Dir("etc"),
        Entry::File("etc/msg", b"two", 0o644),
        Entry::File(".wh.gone", b"", 0o644),
        Entry::Dir("d"),
        Entry::File("d/.wh..wh..opq", b"", 0o644),
        Entry::File("d/new", b"new", 0o644),
    ];
    let mut layers = vec![l1, layer_tar(&l2)];
    layers.extend(extra.iter().cloned());
    layers
}

/// Imports the image at `tar` into lamina and checks containerd unpacked it.
pub(crate) fn import(c: &Containerd, tar: &Path, name: &str) {
    let out = c.ctr_ok(&[
        "images",
        "import",
        "--snapshotter",
        "lamina",
        tar.to_str().unwrap(),
    ]);
    // 1.x's ctr unpacks itself and says so; 2.x's asks the transfer service, which unpacks
    // only into the snapshotters of its unpack_config (lamina's fragment lists lamina), and
    // prints progress instead. Either way the snapshots are checked where the tests need them.
    if !c.flavor.v2 {
        assert!(
            out.contains(&format!("unpacking {name}")) && out.contains("done"),
            "`ctr images import` did not unpack {name}: {out}"
        );
    }
    let names = c.ctr_ok(&["images", "ls", "-q"]);
    assert!(
        names.lines().any(|l| l == name),
        "image {name} missing from `ctr images ls`: {names}"
    );
}

/// The merged view the container must see, and a write inside it.
const CHECK_SCRIPT: &str = r#"printf 'msg=%s\n' "$(cat /etc/msg)"
printf 'd=%s\n' "$(ls -A /d | tr '\n' ' ')"
if [ -e /gone ]; then echo gone=present; else echo gone=absent; fi
if [ -e /w/file ]; then echo fresh=no; else echo fresh=yes; fi
mkdir -p /w && echo written > /w/file && printf 'rw=%s\n' "$(cat /w/file)""#;

fn check_merged_view(c: &Containerd, name: &str) {
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "lamina",
        IMAGE1,
        name,
        "sh",
        "-c",
        CHECK_SCRIPT,
    ]);
    let lines: Vec<&str> = out.lines().map(str::trim_end).collect();
    assert_eq!(
        lines,
        ["msg=two", "d=new", "gone=absent", "fresh=yes", "rw=written"],
        "the container's root is not the merged image plus a writable layer; output:\n{out}"
    );
}

/// Polls until containerd lists no lamina snapshot and lamina has neither records nor
/// directories left (containerd's GC removed them and called Cleanup).
pub(crate) async fn wait_all_collected(c: &Containerd, d: &TestDaemon) {
    let mut left = String::new();
    let collected = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(200),
        async || {
            let listed = c.snapshots().unwrap_or_else(|e| panic!("{e}"));
            let records = d.client().await.list(&[]).await.expect("lamina List");
            let dirs = d.snapshot_dirs();
            left = format!(
            "containerd lists {listed:?}, lamina has records {records:?} and directories {dirs:?}"
        );
            (listed.is_empty() && records.is_empty() && dirs.is_empty()).then_some(())
        },
    )
    .await;
    assert!(
        collected.is_some(),
        "30 s after `ctr images rm --sync` something is left: {left} under {}",
        d.root.join("snapshots").display()
    );
}

/// The `-o` options of a `mount -t TYPE SOURCE TARGET -o OPTS` line printed by ctr.
fn parse_mount_line(out: &str) -> (String, String, Vec<String>) {
    let line = out.lines().next().unwrap_or_default();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert!(
        f.len() == 7 && f[0] == "mount" && f[1] == "-t" && f[5] == "-o",
        "not a mount command line: {out:?}"
    );
    (
        f[2].to_string(),
        f[3].to_string(),
        f[6].split(',').map(String::from).collect(),
    )
}

// ---------------------------------------------------------------------------------------------

/// Each test of this file, once per containerd: a module per containerd, a test per function.
macro_rules! per_containerd {
    ($($module:ident => $flavor:expr),* $(,)?) => {$(
        mod $module {
            use super::*;
            daemon_test!(imports_runs_inspects_and_collects, config = "sync_remove = false\n", |d| {
                if let Some(f) = flavor($flavor) {
                    super::imports_runs_inspects_and_collects(d, f).await
                }
            });
            daemon_test!(rides_out_a_lamina_restart, config = "sync_remove = false\n", |d| {
                if let Some(f) = flavor($flavor) {
                    super::rides_out_a_lamina_restart(d, f).await
                }
            });
            daemon_test!(the_fragment_appends_to_the_stock_config, |d| {
                if let Some(f) = flavor($flavor) {
                    super::the_fragment_appends_to_the_stock_config(d, f)
                }
            });
        }
    )*};
}

per_containerd!(
    v1_6 => || Ok(Flavor::debian()),
    v1_7 => Flavor::v1_7,
    v2_lts => || Flavor::v2(0),
    v2_newest => || Flavor::v2(1),
);

root_test!(v1_7_unpacks_through_lamina_s_differ, || {
    if let Some(f) = flavor(Flavor::v1_7) {
        unpacks_through_lamina_s_differ(f).await
    }
});
root_test!(v2_lts_unpacks_through_lamina_s_differ, || {
    if let Some(f) = flavor(|| Flavor::v2(0)) {
        unpacks_through_lamina_s_differ(f).await
    }
});
root_test!(v2_newest_unpacks_through_lamina_s_differ, || {
    if let Some(f) = flavor(|| Flavor::v2(1)) {
        unpacks_through_lamina_s_differ(f).await
    }
});
root_test!(
    v2_lts_unpacks_through_lamina_s_differ_in_a_user_namespace,
    || {
        if let Some(f) = flavor(|| Flavor::v2(0)) {
            unpacks_in_a_user_namespace(f).await
        }
    }
);

/// A lamina for lamina's differ, logging each request (debug) to a file the test reads. It
/// starts before containerd, whose socket is in a directory made at its start: lamina's
/// containerd_address is a symlink, made to that socket by [`DifferDaemon::reads_from`].
pub(crate) struct DifferDaemon {
    pub(crate) d: TestDaemon,
    log: tempfile::NamedTempFile,
    link: PathBuf,
}

impl DifferDaemon {
    pub(crate) async fn start(tag: &str) -> DifferDaemon {
        DifferDaemon::start_with(tag, "").await
    }

    /// [`DifferDaemon::start`], with `config` (TOML) added to lamina's config.
    pub(crate) async fn start_with(tag: &str, config: &str) -> DifferDaemon {
        DifferDaemon::start_adjusted(tag, config, |_| {}).await
    }

    /// [`DifferDaemon::start_with`], with `adjust` applied to lamina's command.
    pub(crate) async fn start_adjusted(
        tag: &str,
        config: &str,
        adjust: impl FnOnce(&mut std::process::Command),
    ) -> DifferDaemon {
        let link = PathBuf::from(format!("/tmp/ldiff-{}-{tag}.sock", std::process::id()));
        let _ = fs::remove_file(&link);
        let log = tempfile::NamedTempFile::new().unwrap();
        let stderr = log.reopen().unwrap();
        let config = format!(
            "{config}containerd_address = {:?}\n",
            link.display().to_string()
        );
        let d = TestDaemon::start_with(&config, |cmd| {
            // Each request's start is logged at debug, in its span.
            cmd.env("RUST_LOG", "lamina=debug").stderr(stderr);
            adjust(cmd);
        })
        .await;
        DifferDaemon { d, log, link }
    }

    /// Points lamina's containerd_address at `c`.
    pub(crate) fn reads_from(&self, c: &Containerd) {
        std::os::unix::fs::symlink(&c.address, &self.link).unwrap();
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap()
    }

    /// How many Apply requests lamina's differ got so far.
    pub(crate) fn applies(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("apply{") && l.contains(": request"))
            .count()
    }
}

impl Drop for DifferDaemon {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.link);
    }
}

/// lamina's differ: a containerd configured by `lamina config containerd --differ` unpacks
/// the image through lamina's Diff service (lamina writes both layers, whiteout and opaque
/// directory included, reading them from containerd), runs it (the union view checked) and
/// collects it; on 2.x the same through a client's own unpack (`--local`: the diff service's
/// list, lamina's differ added to it as README says), which is how 1.7's ctr always unpacks
/// (the list `--differ` writes there); and into overlayfs, which lamina's differ leaves to
/// containerd's.
async fn unpacks_through_lamina_s_differ(flavor: Flavor) {
    let dd = DifferDaemon::start(&flavor.name).await;
    let d = &dd.d;
    {
        let tag = format!("differ-{}", flavor.name);
        let c = Containerd::start_with(d, &flavor, &tag, &["--differ"], |_| {
            if flavor.v2 {
                "[plugins.\"io.containerd.service.v1.diff-service\"]\n  default = \
                 [\"lamina-diff\", \"walking\"]\n"
                    .to_string()
            } else {
                String::new()
            }
        });
        dd.reads_from(&c);
        let plugins = c.ctr_ok(&["plugins", "ls"]);
        assert!(
            plugins.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 3
                    && f[0] == "io.containerd.differ.v1"
                    && f[1] == "lamina-diff"
                    && f.last() == Some(&"ok")
            }),
            "`ctr plugins ls` has no `io.containerd.differ.v1 lamina-diff … ok` line:\n{plugins}"
        );
        let tar = import_through_lamina_s_differ(&c, &dd);
        check_merged_view(&c, "run1");
        c.ctr_ok(&["images", "rm", "--sync", IMAGE1]);
        wait_all_collected(&c, d).await;

        let tar_arg = tar.to_str().unwrap();
        // 2.x's ctr imports through the transfer service; `--local` unpacks client-side.
        let import: &[&str] = if flavor.v2 {
            &["images", "import", "--local"]
        } else {
            &["images", "import"]
        };
        let mut applies = 2;
        if flavor.v2 {
            // A client's own unpack (not the transfer service's) goes through the diff
            // service's list: with lamina's differ first in it, as README says to set it,
            // through lamina's.
            c.ctr_ok(&[import, &["--snapshotter", "lamina", tar_arg]].concat());
            applies += 2;
            assert_eq!(
                dd.applies(),
                applies,
                "`ctr images import --local` did not unpack through lamina's differ; \
                 containerd's log:\n{}",
                c.log_tail()
            );
            check_merged_view(&c, "run2");
            c.ctr_ok(&["images", "rm", "--sync", IMAGE1]);
            wait_all_collected(&c, d).await;
        }

        // Into another snapshotter, lamina's differ refuses the mounts as not its own
        // (Unimplemented), and containerd's diff service goes on to its own differ.
        c.ctr_ok(&[import, &["--snapshotter", "overlayfs", tar_arg]].concat());
        let logged = dd.log();
        let refused = logged
            .lines()
            .filter(|l| l.contains("apply{") && l.contains("code=Unimplemented"))
            .count();
        assert_eq!(
            (dd.applies(), refused),
            (applies + 2, 2),
            "lamina's differ was not asked and did not refuse overlayfs' two layers; lamina's \
             log:\n{logged}"
        );
        let committed = c.ctr_ok(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
        assert_eq!(
            committed
                .lines()
                .filter(|l| l.contains("Committed"))
                .count(),
            2,
            "containerd's own differ did not unpack the image into overlayfs:\n{committed}"
        );
        c.ctr_ok(&["images", "rm", "--sync", IMAGE1]);
    }
}

/// Imports IMAGE1 (its archive written in `c`'s directory, returned) and checks that both its
/// layers went through lamina's differ.
fn import_through_lamina_s_differ(c: &Containerd, dd: &DifferDaemon) -> PathBuf {
    let tar = c.path("e2e1.tar");
    write_oci_archive(&tar, IMAGE1, &image_layers(&[]));
    import(c, &tar, IMAGE1);
    assert_eq!(
        dd.applies(),
        2,
        "lamina's differ did not apply the image's two layers; lamina's log:\n{}\n\
         containerd's log:\n{}",
        dd.log(),
        c.log_tail()
    );
    tar
}

/// lamina in a user namespace (rootless, or in a container): it mounts its overlays with
/// `userxattr`, so its differ writes the opaque marker as `user.overlay.opaque` (`trusted.*`
/// cannot be set there) and a whiteout as a 0/0 device (which Linux lets a user namespace
/// make). containerd, outside it, unpacks the image through lamina's differ, runs it with the
/// union view right (the opaque directory hides its parent's file, the whiteout its file) and
/// collects it.
async fn unpacks_in_a_user_namespace(flavor: Flavor) {
    let tag = format!("differ-userns-{}", flavor.name);
    let dd = DifferDaemon::start_adjusted(&tag, "", in_own_user_namespace).await;
    let d = &dd.d;
    let c = Containerd::start_with(d, &flavor, &tag, &["--differ"], |_| String::new());
    dd.reads_from(&c);
    import_through_lamina_s_differ(&c, &dd);
    let mut markers: Vec<_> = d
        .snapshot_dirs()
        .iter()
        .map(|id| d.root.join("snapshots").join(id).join("fs/d"))
        .filter(|dir| dir.join(".").exists())
        .map(|dir| crate::differ::xattrs_of(&dir))
        .collect();
    markers.sort();
    assert_eq!(
        markers,
        [
            BTreeMap::new(),
            BTreeMap::from([("user.overlay.opaque".to_string(), b"y".to_vec())])
        ],
        "the second layer's d/ is not opaque by user.overlay.opaque (and by nothing else)"
    );
    check_merged_view(&c, "run-userns");
    c.ctr_ok(&["images", "rm", "--sync", IMAGE1]);
    wait_all_collected(&c, d).await;
}

/// What `lamina config containerd` prints, appended to `containerd config default` as a user
/// would, makes a containerd that starts and has lamina, and (2.x) unpacks into it.
fn the_fragment_appends_to_the_stock_config(d: TestDaemon, flavor: Flavor) {
    let fragment = fragment(&d, &flavor, &[]);
    let c = Containerd::launch(&flavor, "stock", |p| {
        format!("{}\n{fragment}", stock_config(&flavor, p))
    });
    assert_lamina_plugin_ok(&c);
    let tar = c.path("e2e1.tar");
    write_oci_archive(&tar, IMAGE1, &image_layers(&[]));
    import(&c, &tar, IMAGE1);
    let listed = c.snapshots().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(listed.len(), 2, "the image's layers in lamina: {listed:?}");
    drop(c);
    if flavor.v2 {
        // With the differ too: the fragment must not define a table the stock config has.
        let with_differ = self::fragment(&d, &flavor, &["--differ"]);
        let c = Containerd::launch(&flavor, "stock-differ", |p| {
            format!("{}\n{with_differ}", stock_config(&flavor, p))
        });
        assert_lamina_plugin_ok(&c);
        let plugins = c.ctr_ok(&["plugins", "ls"]);
        assert!(
            plugins
                .lines()
                .any(|l| l.starts_with("io.containerd.differ.v1") && l.contains("lamina-diff")),
            "no lamina-diff differ in `ctr plugins ls`:\n{plugins}"
        );
    }
}

/// `ctr plugins ls` has lamina as a working snapshotter.
#[track_caller]
fn assert_lamina_plugin_ok(c: &Containerd) {
    let plugins = c.ctr_ok(&["plugins", "ls"]);
    assert!(
        plugins.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 3
                && f[0] == "io.containerd.snapshotter.v1"
                && f[1] == "lamina"
                && f.last() == Some(&"ok")
        }),
        "`ctr plugins ls` has no `io.containerd.snapshotter.v1 lamina … ok` line:\n{plugins}"
    );
}

async fn imports_runs_inspects_and_collects(d: TestDaemon, flavor: Flavor) {
    {
        let started = Instant::now();
        let c = Containerd::start(&d, &flavor, "a", false, |_| String::new());
        let snapshots_dir = format!("{}/", d.root.join("snapshots").display());

        // containerd knows the plugin.
        assert_lamina_plugin_ok(&c);

        // Import: containerd unpacks both layers through lamina.
        let tar = c.path("e2e1.tar");
        let chain = chain_ids(&write_oci_archive(&tar, IMAGE1, &image_layers(&[])));
        import(&c, &tar, IMAGE1);

        // Run: the merged filesystem, writable; a second run starts from the image again.
        check_merged_view(&c, "run1");
        check_merged_view(&c, "run2");

        // ls: the two committed layers, the second on the first.
        let listed = c.snapshots().unwrap_or_else(|e| panic!("{e}"));
        let expected = vec![
            (chain[0].clone(), String::new(), "Committed".to_string()),
            (chain[1].clone(), chain[0].clone(), "Committed".to_string()),
        ];
        let mut sorted = listed.clone();
        sorted.sort_by_key(|(k, _, _)| if *k == chain[0] { 0 } else { 1 });
        assert_eq!(
            sorted, expected,
            "`ctr snapshots ls` should list exactly the image's two layers"
        );

        // info: kind, name and parent chain.
        for (i, key) in chain.iter().enumerate() {
            let out = c.snap_ok(&["info", key]);
            let info: serde_json::Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("`ctr snapshots info` printed no JSON ({e}): {out}"));
            assert_eq!(info["Kind"], "Committed", "info {key}: {out}");
            assert_eq!(info["Name"], key.as_str(), "info {key}: {out}");
            let parent = if i == 0 {
                serde_json::Value::Null
            } else {
                chain[i - 1].clone().into()
            };
            assert_eq!(info["Parent"], parent, "info {key}: wrong parent: {out}");
            assert!(
                info["Created"].is_string() && info["Updated"].is_string(),
                "info {key}: {out}"
            );
        }

        // usage: L1 holds busybox (a few MB) and every entry of L1; L2 is small.
        let busybox_size = fs::metadata("/bin/busybox").unwrap().len();
        let out = c.snap_ok(&["usage", "-b", &chain[0], &chain[1]]);
        let usage: Vec<(String, u64, u64)> = out
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(f.len(), 3, "`ctr snapshots usage -b` line {l:?} in:\n{out}");
                (
                    f[0].to_string(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(usage.len(), 2, "usage lines:\n{out}");
        // L1: root, bin, busybox, the links, etc, etc/msg, gone, d, d/old.
        let l1_inodes = 3 + APPLETS.len() as u64 + 5;
        assert_eq!(usage[0].0, chain[0]);
        assert!(
            usage[0].1 >= busybox_size,
            "L1 usage {} < busybox {busybox_size}:\n{out}",
            usage[0].1
        );
        assert_eq!(usage[0].2, l1_inodes, "L1 inode count:\n{out}");
        // L2: root, etc, etc/msg, the whiteout device for /gone, d, d/new.
        assert_eq!(usage[1].0, chain[1]);
        assert!(
            usage[1].1 > 0 && usage[1].1 < busybox_size,
            "L2 size:\n{out}"
        );
        assert_eq!(usage[1].2, 6, "L2 inode count:\n{out}");
        let human = c.snap_ok(&["usage", &chain[0]]);
        assert!(
            human.contains("MiB") || human.contains("MB"),
            "human-readable usage of L1: {human}"
        );

        // tree: L2 under L1.
        let tree = c.snap_ok(&["tree"]);
        let lines: Vec<&str> = tree.lines().collect();
        assert_eq!(lines.len(), 2, "tree:\n{tree}");
        assert_eq!(lines[0].trim(), chain[0], "tree root:\n{tree}");
        assert_eq!(
            lines[1].trim(),
            format!("\\_ {}", chain[1]),
            "tree child:\n{tree}"
        );
        assert!(lines[1].starts_with("  "), "child not indented:\n{tree}");

        // mounts: a view on L1 is a read-only bind of L1's directory; a view on L2 is a read-only
        // overlay of both; an active snapshot on L2 is a writable overlay over both.
        //
        // `ctr snapshots view` gives its view no GC root (unlike `prepare`), so containerd's
        // collector would remove a view whenever it runs, and the containers run above queue runs
        // of it. A synchronous collection first settles them (later runs only come from new
        // deletions), and each view is made a root right after it is created.
        c.ctr_ok(&["leases", "create", "--id", "e2e-settle"]);
        c.ctr_ok(&["leases", "delete", "--sync", "e2e-settle"]);
        for (view, parent) in [("e2e-view1", &chain[0]), ("e2e-view2", &chain[1])] {
            c.snap_ok(&["view", view, parent]);
            c.snap_ok(&["label", view, "containerd.io/gc.root=e2e"]);
        }
        c.snap_ok(&["prepare", "e2e-active", &chain[1]]);

        // `lamina mount` finds a snapshot by the name ctr shows, in ctr's namespace, and not
        // in another.
        let target = c.path("inspect");
        fs::create_dir(&target).unwrap();
        let target_arg = target.to_str().unwrap();
        let out = d.cli(&["mount", "--namespace", &c.ns, "e2e-view1", target_arg]);
        assert!(
            out.status.success(),
            "lamina mount by name: {}",
            stderr(&out)
        );
        let mounted = target.join("bin/busybox").is_file();
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(mounted, "lamina mount of e2e-view1 shows no bin/busybox");
        let out = d.cli(&["mount", "--namespace", "elsewhere", "e2e-view1", target_arg]);
        assert!(
            !out.status.success() && stderr(&out).contains("--namespace"),
            "a name from another namespace: {}",
            stderr(&out)
        );
        let (ty, l1_fs, opts) = parse_mount_line(&c.snap_ok(&["mounts", "/mnt/x", "e2e-view1"]));
        assert_eq!(ty, "bind", "view on one layer");
        assert!(
            l1_fs.starts_with(&snapshots_dir) && l1_fs.ends_with("/fs"),
            "bind source {l1_fs}"
        );
        assert!(
            opts.contains(&"ro".into()) && opts.contains(&"rbind".into()),
            "bind options {opts:?}"
        );
        assert!(
            Path::new(&l1_fs).join("bin/busybox").is_file(),
            "L1's directory lacks bin/busybox: {l1_fs}"
        );

        let (ty, src, opts) = parse_mount_line(&c.snap_ok(&["mounts", "/mnt/x", "e2e-view2"]));
        assert_eq!(
            (ty.as_str(), src.as_str()),
            ("overlay", "overlay"),
            "view on two layers"
        );
        let lower = option(&opts, "lowerdir").unwrap_or_else(|| panic!("no lowerdir in {opts:?}"));
        let lowers: Vec<&str> = lower.split(':').collect();
        assert_eq!(lowers.len(), 2, "lowerdir {lower}");
        assert_eq!(
            lowers[1], l1_fs,
            "the view's lowest layer is L1's directory"
        );
        assert!(
            lowers[0].starts_with(&snapshots_dir) && lowers[0] != l1_fs,
            "lowerdir {lower}"
        );
        assert!(
            Path::new(lowers[0]).join("d/new").is_file(),
            "L2's directory lacks d/new: {}",
            lowers[0]
        );
        assert!(
            option(&opts, "upperdir").is_none(),
            "a view has no upperdir: {opts:?}"
        );

        let (ty, _, opts) = parse_mount_line(&c.snap_ok(&["mounts", "/mnt/x", "e2e-active"]));
        assert_eq!(ty, "overlay", "active on two layers");
        assert_eq!(
            option(&opts, "lowerdir"),
            Some(lower),
            "active's lowers: {opts:?}"
        );
        let upper = option(&opts, "upperdir").unwrap_or_else(|| panic!("no upperdir in {opts:?}"));
        let work = option(&opts, "workdir").unwrap_or_else(|| panic!("no workdir in {opts:?}"));
        assert!(
            upper.starts_with(&snapshots_dir) && upper.ends_with("/fs"),
            "upperdir {upper}"
        );
        assert_eq!(
            Path::new(work).parent(),
            Path::new(upper).parent(),
            "workdir {work} beside upperdir {upper}"
        );

        // Mounts of a committed layer is refused.
        let out = c.ctr(&[
            "snapshots",
            "--snapshotter",
            "lamina",
            "mounts",
            "/mnt/x",
            &chain[1],
        ]);
        assert!(
            !out.success,
            "`ctr snapshots mounts` of a committed snapshot succeeded: {}",
            out.stdout
        );

        // The active and views show in ls with their kinds, then go.
        let kinds: Vec<(String, String)> = c
            .snapshots()
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|(k, _, kind)| (k, kind))
            .collect();
        for (key, kind) in [
            ("e2e-view1", "View"),
            ("e2e-view2", "View"),
            ("e2e-active", "Active"),
        ] {
            assert!(
                kinds.contains(&(key.to_string(), kind.to_string())),
                "{key} not {kind} in ls: {kinds:?}"
            );
        }
        c.snap_ok(&["rm", "e2e-view1", "e2e-view2", "e2e-active"]);

        // Removing the image lets containerd's GC remove the snapshots, then Cleanup the directories.
        c.ctr_ok(&["images", "rm", "--sync", IMAGE1]);
        wait_all_collected(&c, &d).await;
        eprintln!(
            "containerd {} end-to-end took {:?}",
            flavor.name,
            started.elapsed()
        );
    }
}

async fn rides_out_a_lamina_restart(mut d: TestDaemon, flavor: Flavor) {
    {
        let started = Instant::now();
        let c = Containerd::start(&d, &flavor, "b", false, |_| String::new());

        let tar1 = c.path("e2e1.tar");
        let chain1 = chain_ids(&write_oci_archive(&tar1, IMAGE1, &image_layers(&[])));
        import(&c, &tar1, IMAGE1);
        c.ctr_ok(&[
            "run",
            "-d",
            "--snapshotter",
            "lamina",
            IMAGE1,
            "sleeper",
            "sleep",
            "1000",
        ]);
        c.wait_task("sleeper", "RUNNING");

        d.restart().await;

        // containerd reconnects by itself.
        let mut last = Ok(Vec::new());
        let listed = wait_for(
            Duration::from_secs(20),
            Duration::from_millis(200),
            async || {
                last = c.snapshots();
                last.as_ref().ok().filter(|l| !l.is_empty()).cloned()
            },
        )
        .await
        .unwrap_or_else(|| {
            panic!(
                "containerd did not reach lamina again within 20 s of its restart: {:?}",
                last.map(|l| format!("listed {l:?}"))
            )
        });
        for key in ["sleeper", chain1[0].as_str(), chain1[1].as_str()] {
            assert!(
                listed.iter().any(|(k, _, _)| k == key),
                "{key} missing after lamina's restart: {listed:?}"
            );
        }

        // The container started before keeps running, on its filesystem.
        c.wait_task("sleeper", "RUNNING");
        let out = c.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "check",
            "sleeper",
            "cat",
            "/etc/msg",
        ]);
        assert_eq!(out.trim(), "two", "the running container's /etc/msg");

        // The next import (one more layer over the same two) and run work.
        let l3 = layer_tar(&[Entry::Dir("etc"), Entry::File("etc/msg", b"three", 0o644)]);
        let tar2 = c.path("e2e2.tar");
        let chain2 = chain_ids(&write_oci_archive(&tar2, IMAGE2, &image_layers(&[l3])));
        assert_eq!(
            chain2[..2],
            chain1[..],
            "the second image shares the first two layers"
        );
        import(&c, &tar2, IMAGE2);
        let listed = c.snapshots().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            listed.contains(&(chain2[2].clone(), chain2[1].clone(), "Committed".into())),
            "the third layer is not committed on the second: {listed:?}"
        );
        let out = c.ctr_ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "lamina",
            IMAGE2,
            "after",
            "sh",
            "-c",
            "echo \"$(cat /etc/msg)\"; ls -A /d",
        ]);
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            ["three", "new"],
            "run after restart: {out}"
        );
        check_merged_view(&c, "after1");

        // End the container, drop both images: everything is collected.
        c.ctr_ok(&["task", "kill", "--signal", "SIGKILL", "sleeper"]);
        c.wait_task("sleeper", "STOPPED");
        c.ctr_ok(&["task", "rm", "sleeper"]);
        c.ctr_ok(&["containers", "rm", "sleeper"]);
        c.ctr_ok(&["images", "rm", "--sync", IMAGE1, IMAGE2]);
        wait_all_collected(&c, &d).await;
        eprintln!(
            "containerd {} restart test took {:?}",
            flavor.name,
            started.elapsed()
        );
    }
}
