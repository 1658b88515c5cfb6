//! The snapshotter-level workloads. Each takes a [`Target`] and does exactly the same calls,
//! in the same order, whichever snapshotter is behind it.

use std::{
    collections::HashMap,
    fs,
    future::Future,
    io::Write,
    ops::Range,
    os::unix::fs::{FileExt, MetadataExt},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use crate::{
    client::{Client, Target},
    sync_disks,
};

/// A containerd-like chain ID for (tag, i): 64 hex digits.
fn digest(tag: &str, i: usize) -> String {
    let d = Sha256::digest(format!("{tag}/{i}").as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of an active snapshot, shaped like those containerd's unpacker uses.
pub fn key(tag: &str, i: usize) -> String {
    format!("bench/{i}/extract-{tag}-{i:07} sha256:{}", digest(tag, i))
}

/// The name a committed snapshot gets, shaped like containerd's (`<ns>/<n>/<chain id>`).
pub fn name(tag: &str, i: usize) -> String {
    format!("bench/{i}/sha256:{}", digest(tag, i))
}

/// The labels put on every Prepare and Commit: the one containerd passes to snapshotters during
/// unpack, and (through containerd only) a GC root so containerd's collector leaves the
/// benchmark's snapshots alone.
fn labels(t: &Target, name: &str) -> HashMap<String, String> {
    let mut l = HashMap::new();
    l.insert("containerd.io/snapshot.ref".to_string(), name.to_string());
    if t.namespace.is_some() {
        l.insert(
            "containerd.io/gc.root".to_string(),
            "lamina-bench".to_string(),
        );
    }
    l
}

/// One planned prepare+commit pair.
#[derive(Clone)]
struct PlannedPair {
    key: String,
    name: String,
    parent: String,
    labels: HashMap<String, String>,
}

/// Pairs with indices `idx` of `tag`. The first takes `parent0` as parent; after it, every
/// `chain`-th starts a new chain and the others take the previous pair's snapshot as parent (as
/// unpacking the layers of images does).
fn plan(t: &Target, tag: &str, idx: &[usize], chain: usize, parent0: &str) -> Vec<PlannedPair> {
    let mut prev = parent0.to_string();
    idx.iter()
        .enumerate()
        .map(|(j, &i)| {
            let parent = if j > 0 && j.is_multiple_of(chain) {
                String::new()
            } else {
                prev.clone()
            };
            let p = PlannedPair {
                key: key(tag, i),
                name: name(tag, i),
                parent,
                labels: labels(t, &name(tag, i)),
            };
            prev = p.name.clone();
            p
        })
        .collect()
}

/// Pairs `idx` (see [`plan`]) from one client, one after the other. Returns the wall time and
/// the latency of each pair; the committed names are appended to `live`.
pub async fn serial_pairs(
    t: &Target,
    tag: &str,
    idx: Range<usize>,
    chain: usize,
    parent0: &str,
    live: &mut Vec<String>,
) -> (Duration, Vec<Duration>) {
    let idx: Vec<usize> = idx.collect();
    let pairs = plan(t, tag, &idx, chain, parent0);
    let mut c = t.client().await;
    let mut lat = Vec::with_capacity(idx.len());
    let start = Instant::now();
    for p in pairs {
        let s = Instant::now();
        c.prepare(&p.key, &p.parent, p.labels.clone()).await;
        c.commit(&p.name, &p.key, p.labels).await;
        lat.push(s.elapsed());
        live.push(p.name);
    }
    (start.elapsed(), lat)
}

/// Pairs `idx` (see [`plan`]; every client's first pair starts a chain) dealt out to `clients`
/// clients, each with its own connection, all at once. Returns the wall time; the committed
/// names are appended to `live` in the order they were committed (a parent always before its
/// children).
pub async fn concurrent_pairs(
    t: &Target,
    tag: &str,
    idx: Range<usize>,
    clients: usize,
    chain: usize,
    live: &mut Vec<String>,
) -> Duration {
    let conns = t.clients(clients).await;
    let done = Arc::new(Mutex::new(Vec::with_capacity(idx.len())));
    let plans: Vec<Vec<PlannedPair>> = (0..clients)
        .map(|c| {
            let idx: Vec<usize> = idx.clone().skip(c).step_by(clients).collect();
            plan(t, tag, &idx, chain, "")
        })
        .collect();
    let wall = all_at_once(conns, plans, |mut c, pairs| {
        let done = Arc::clone(&done);
        async move {
            for p in pairs {
                c.prepare(&p.key, &p.parent, p.labels.clone()).await;
                c.commit(&p.name, &p.key, p.labels).await;
                done.lock().unwrap().push(p.name);
            }
        }
    })
    .await;
    live.extend(done.lock().unwrap().drain(..));
    wall
}

/// Runs `work` for each client and its part, each on its own task, all at once. Returns the
/// wall time from the first start until the last one is done.
async fn all_at_once<P, F, Fut>(conns: Vec<Client>, parts: Vec<P>, work: F) -> Duration
where
    F: Fn(Client, P) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(parts)
        .map(|(c, part)| tokio::spawn(work(c, part)))
        .collect();
    for task in tasks {
        task.await.expect("client task");
    }
    start.elapsed()
}

/// A small deterministic generator (xorshift64*), so both snapshotters get the same keys.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `n` Stats of existing snapshots, picked at random, from `clients` clients at once.
pub async fn stats(t: &Target, keys: &[String], n: usize, clients: usize, seed: u64) -> Duration {
    let conns = t.clients(clients).await;
    let plans: Vec<Vec<String>> = (0..clients)
        .map(|c| {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed << 16) ^ (c as u64 + 1));
            let count = n / clients + usize::from(c < n % clients);
            (0..count)
                .map(|_| keys[(rng.next() % keys.len() as u64) as usize].clone())
                .collect()
        })
        .collect();
    all_at_once(conns, plans, |mut c, keys| async move {
        for k in keys {
            let info = c.stat(&k).await;
            assert_eq!(info.name, k);
        }
    })
    .await
}

/// `n` Stats of existing snapshots from one client, one after the other; returns each one's
/// latency.
pub async fn serial_stats(t: &Target, keys: &[String], n: usize, seed: u64) -> Vec<Duration> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (seed + 1));
    let picks: Vec<&String> = (0..n)
        .map(|_| &keys[(rng.next() % keys.len() as u64) as usize])
        .collect();
    let mut c = t.client().await;
    let mut out = Vec::with_capacity(n);
    for k in picks {
        let s = Instant::now();
        c.stat(k).await;
        out.push(s.elapsed());
    }
    out
}

/// `n` Lists of every snapshot, one after the other; each must return `expected` snapshots.
pub async fn lists(t: &Target, n: usize, expected: usize) -> Duration {
    let mut c = t.client().await;
    let start = Instant::now();
    for _ in 0..n {
        let got = c.list_count().await;
        assert_eq!(
            got, expected,
            "{}: List returned {got} snapshots, expected {expected}",
            t.label
        );
    }
    start.elapsed()
}

/// Views `idx` of `parent`, one after the other; their keys are appended to `live`.
pub async fn views(
    t: &Target,
    tag: &str,
    parent: &str,
    idx: Range<usize>,
    live: &mut Vec<String>,
) -> Duration {
    let keys: Vec<String> = idx.map(|i| key(tag, i)).collect();
    let mut c = t.client().await;
    let start = Instant::now();
    for k in &keys {
        c.view(k, parent).await;
    }
    let wall = start.elapsed();
    live.extend(keys);
    wall
}

/// Prepares a parentless active snapshot (number `r` of `tag`), writes `files` small files
/// straight into its directory (its mount is a bind of that directory), syncs when `synced`,
/// and times only the Commit call. Unsynced, the files are dirty in the page cache when Commit
/// starts, as after containerd's applier, which is what a durable Commit has to write out.
pub async fn big_commit(
    t: &Target,
    tag: &str,
    r: usize,
    files: usize,
    synced: bool,
    live: &mut Vec<String>,
) -> Duration {
    let mut c = t.client().await;
    let (k, n) = (key(tag, r), name(tag, r));
    let mounts = c.prepare(&k, "", labels(t, &n)).await;
    assert!(
        mounts.len() == 1 && mounts[0].r#type == "bind",
        "{}: a parentless active snapshot should be one bind mount: {mounts:?}",
        t.label
    );
    write_files(Path::new(&mounts[0].source), files);
    if synced {
        sync_disks();
    }
    let s = Instant::now();
    c.commit(&n, &k, labels(t, &n)).await;
    let took = s.elapsed();
    live.push(n);
    took
}

/// `files` files of 100 bytes, 100 per subdirectory.
fn write_files(dir: &Path, files: usize) {
    let data = [b'x'; 100];
    for i in 0..files {
        let sub = dir.join(format!("d{:04}", i / 100));
        if i.is_multiple_of(100) {
            fs::create_dir(&sub).expect("creating a directory in the snapshot");
        }
        let mut f = fs::File::create(sub.join(format!("f{i:06}")))
            .expect("creating a file in the snapshot");
        f.write_all(&data).expect("writing a file in the snapshot");
    }
}

/// Removes `keys` one after the other from one client; returns the wall time.
pub async fn removes(t: &Target, keys: &[String]) -> Duration {
    let mut c = t.client().await;
    let start = Instant::now();
    for k in keys {
        c.remove(k).await;
    }
    start.elapsed()
}

/// Calls Cleanup, then waits until `<root>/snapshots` holds nothing (`du` would show it
/// freed). Returns how long the Cleanup call took and how long until the space was free.
pub async fn cleanup_until_freed(t: &Target, root: &Path) -> (Duration, Duration) {
    let mut c = t.client().await;
    let snapshots = root.join("snapshots");
    let start = Instant::now();
    c.cleanup().await;
    let cleanup_rpc = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left = fs::read_dir(&snapshots).map(|d| d.count()).unwrap_or(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {left} entries still under {} 10 min after Cleanup",
            t.label,
            snapshots.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let until_freed = start.elapsed();
    assert_eq!(
        du(&snapshots),
        0,
        "{}: blocks left under {}",
        t.label,
        snapshots.display()
    );
    (cleanup_rpc, until_freed)
}

/// Bytes allocated (st_blocks × 512) to everything under `dir`, `dir` itself excluded.
pub fn du(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let Ok(md) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        total += md.blocks() * 512;
        if md.is_dir() {
            total += du(&e.path());
        }
    }
    total
}

/// Removes `keys` one after the other; returns each Remove's latency.
pub async fn timed_removes(t: &Target, keys: &[String]) -> Vec<Duration> {
    let mut c = t.client().await;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let s = Instant::now();
        c.remove(k).await;
        out.push(s.elapsed());
    }
    out
}

/// The floor for durable prepare+commit pairs on the filesystem holding a directory: what a
/// pair cannot avoid, i.e. creating the snapshot's `fs` and `work` directories and making two
/// metadata updates durable (a 4 KiB write then fsync, twice).
pub struct Floor {
    dir: std::path::PathBuf,
    file: fs::File,
    next: usize,
}

impl Floor {
    pub fn new(dir: &Path) -> Floor {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).expect("creating the machine-limit directory");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("meta"))
            .expect("creating the machine-limit file");
        file.write_all_at(&[0u8; 4096], 0).expect("write");
        file.sync_all().expect("fsync");
        Floor {
            dir: dir.to_path_buf(),
            file,
            next: 0,
        }
    }

    /// `n` pairs' worth; returns the wall time.
    pub fn pairs(&mut self, n: usize) -> Duration {
        let block = [0u8; 4096];
        let start = Instant::now();
        for _ in 0..n {
            let i = self.next;
            self.next += 1;
            fs::create_dir(self.dir.join(format!("{i}-fs"))).expect("mkdir");
            fs::create_dir(self.dir.join(format!("{i}-work"))).expect("mkdir");
            for _ in 0..2 {
                self.file.write_all_at(&block, 0).expect("write");
                self.file.sync_all().expect("fsync");
            }
        }
        start.elapsed()
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The floor for freeing what remove-all frees: `remove_dir_all` of a tree of the same shape
/// (`snapshots` directories, each with `fs` and `work`, `reps` of them holding `files` small
/// files) on the filesystem holding `dir`.
pub fn machine_remove_limit(dir: &Path, snapshots: usize, files: usize, reps: usize) -> Duration {
    let _ = fs::remove_dir_all(dir);
    for i in 0..snapshots {
        let d = dir.join(i.to_string());
        fs::create_dir_all(d.join("fs")).expect("mkdir");
        fs::create_dir_all(d.join("work")).expect("mkdir");
        if i < reps {
            write_files(&d.join("fs"), files);
        }
    }
    sync_disks();
    let start = Instant::now();
    fs::remove_dir_all(dir).expect("removing the machine-limit tree");
    start.elapsed()
}
