//! Ready-made snapshot directories, so that a Prepare or View answers after one `rename`
//! instead of three `mkdir`s.
//!
//! Why: on ext4, creating directories right after an fsync is slow (each new directory takes an
//! inode and a block that the journal must commit; 3 mkdirs cost 0.2–0.5 ms on the benchmark's
//! VM, a rename of a finished tree 20 µs). A background thread keeps a few empty trees of each
//! shape under `<root>/spare/`; a creation renames one to `<root>/snapshots/<id>` once the
//! record is durable, exactly where `mkdir` would have put it. The order that crash safety rests
//! on is unchanged: the directory appears under `snapshots/` only after its record commits.
//!
//! A spare is nobody's snapshot: the pool deletes `<root>/spare` when it starts, so spares left
//! by a crash never outlive a restart. When the pool is empty or a rename fails, the creation
//! makes its directories itself, as it would without a pool.

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use tracing::{debug, warn};

use super::layout::Layout;
use crate::error::{chain, Error, Result};

/// Trees kept ready per shape: enough for a burst of creations (unpacking a many-layer image,
/// starting dozens of containers), few enough that spares cost nothing worth counting (an
/// empty directory is one inode and one block: 64 active trees hold 192 of each).
const DEPTH: usize = 64;

/// How long the refill waits after failing (a full disk, say) before it tries again.
const BACKOFF: Duration = Duration::from_secs(2);

pub struct Spares {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    layout: Layout,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Trees with `fs` and `work` (for active snapshots).
    active: VecDeque<PathBuf>,
    /// Trees with `fs` only (for views).
    view: VecDeque<PathBuf>,
    next: u64,
    stopping: bool,
}

impl State {
    fn queue(&mut self, with_work: bool) -> &mut VecDeque<PathBuf> {
        if with_work {
            &mut self.active
        } else {
            &mut self.view
        }
    }

    /// The shape to make next, if any pool is below its depth.
    fn wanted(&self) -> Option<bool> {
        if self.active.len() < DEPTH {
            Some(true)
        } else if self.view.len() < DEPTH {
            Some(false)
        } else {
            None
        }
    }
}

impl Spares {
    /// Deletes what earlier runs left under `<root>/spare` and starts filling it.
    pub fn start(layout: Layout) -> Result<Spares> {
        // With the deleter, which never follows a symlink nor descends into a mount: whatever
        // was left there, nothing outside `spare/` is touched.
        super::layout::delete_tree(layout.root(), "spare").map_err(|e| {
            Error::Internal(format!(
                "removing leftover spare directories under {}: {}",
                layout.spare_dir().display(),
                chain(&e)
            ))
        })?;
        layout.make_spare_root()?;
        let shared = Arc::new(Shared {
            layout,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let filler = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("lamina-spares".into())
            .spawn(move || fill(&filler))
            .map_err(|e| Error::Internal(format!("starting the spare-directory thread: {e}")))?;
        Ok(Spares {
            shared,
            thread: Some(thread),
        })
    }

    /// Creates the directories of snapshot `id` (see [`Layout::make_dirs`]), from a spare
    /// tree when one is ready.
    pub fn make_dirs(&self, id: u64, with_work: bool, owner: Option<(u32, u32)>) -> Result<()> {
        let layout = &self.shared.layout;
        if let Some(tree) = self.take(with_work) {
            match layout.adopt(&tree, id, owner) {
                Ok(()) => return Ok(()),
                Err(e @ Error::Occupied(_)) => {
                    // The spare is as good as new; only the place it was to go is taken.
                    self.put_back(with_work, tree);
                    return Err(e);
                }
                Err(e) => {
                    warn!(id, error = %chain(&e), "could not use a spare directory; making one");
                    self.discard(&tree);
                }
            }
        }
        layout.make_dirs(id, with_work, owner)
    }

    fn put_back(&self, with_work: bool, tree: PathBuf) {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.queue(with_work).push_front(tree);
    }

    /// Deletes a spare tree that could not be used, with the deleter that never crosses into
    /// a mount (nothing should be mounted in a spare, but nothing is assumed).
    fn discard(&self, tree: &std::path::Path) {
        let (Some(parent), Some(name)) = (tree.parent(), tree.file_name()) else {
            return;
        };
        if let Err(e) = super::layout::delete_tree(parent, &name.to_string_lossy()) {
            warn!(path = %tree.display(), error = %chain(&e), "could not delete an unused spare directory");
        }
    }

    /// Spare trees ready now, of each shape (active, view).
    pub fn ready(&self) -> (usize, usize) {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.active.len(), state.view.len())
    }

    fn take(&self, with_work: bool) -> Option<PathBuf> {
        let tree = {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.queue(with_work).pop_front()
        };
        // Woken after the lock is released, so the filler does not wake only to wait for it
        // while the request still holds it.
        if tree.is_some() {
            self.shared.wake.notify_one();
        }
        tree
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stopping = true;
        }
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The refill loop: makes one tree at a time, outside the lock, until every pool is full.
fn fill(shared: &Shared) {
    let mut failing = false;
    loop {
        let (with_work, n) = {
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if state.stopping {
                    return;
                }
                if let Some(with_work) = state.wanted() {
                    state.next += 1;
                    break (with_work, state.next);
                }
                state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        };
        match shared.layout.make_spare(n, with_work) {
            Ok(tree) => {
                if failing {
                    debug!("spare directories can be made again");
                    failing = false;
                }
                let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                state.queue(with_work).push_back(tree);
            }
            Err(e) => {
                // Creations still work without spares (and report the error themselves).
                if !failing {
                    warn!(error = %chain(&e), "cannot make spare directories; retrying later");
                    failing = true;
                }
                let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                if state.stopping {
                    return;
                }
                let _ = shared.wake.wait_timeout(state, BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, os::unix::fs::PermissionsExt};

    fn wait_full(spares: &Spares) {
        for _ in 0..500 {
            if spares.ready() == (DEPTH, DEPTH) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("pool never filled: {:?}", spares.ready());
    }

    /// Stops the refill, so that what the pool holds changes only by what a test takes.
    fn stop_refilling(spares: &mut Spares) {
        spares.shared.state.lock().unwrap().stopping = true;
        spares.shared.wake.notify_one();
        spares.thread.take().unwrap().join().unwrap();
    }

    #[test]
    fn creations_take_ready_trees_of_their_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path().join("root"));
        layout.init().unwrap();
        let mut spares = Spares::start(layout.clone()).unwrap();
        wait_full(&spares);
        // Without its refill, which would race the count below.
        stop_refilling(&mut spares);
        spares.make_dirs(1, true, None).unwrap();
        spares.make_dirs(2, false, Some((1234, 5678))).unwrap();
        assert_eq!(spares.ready(), (DEPTH - 1, DEPTH - 1));
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(layout.dir(1)), 0o700);
        assert_eq!(mode(layout.fs(1)), 0o755);
        assert_eq!(mode(layout.work(1)), 0o711);
        assert!(!layout.work(2).exists(), "a view has no work directory");
        assert_eq!(layout.owner(2).unwrap(), (1234, 5678));
        assert_eq!(fs::read_dir(layout.fs(1)).unwrap().count(), 0);
    }

    #[test]
    fn the_pool_refills_what_creations_take() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path().join("root"));
        layout.init().unwrap();
        let spares = Spares::start(layout.clone()).unwrap();
        wait_full(&spares);
        spares.make_dirs(1, true, None).unwrap();
        spares.make_dirs(2, false, None).unwrap();
        wait_full(&spares);
    }

    #[test]
    fn leftovers_are_deleted_and_an_empty_pool_still_creates() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path().join("root"));
        layout.init().unwrap();
        let stale = layout.spare_dir().join("a-7/fs/junk");
        fs::create_dir_all(&stale).unwrap();
        let spares = Spares::start(layout.clone()).unwrap();
        wait_full(&spares);
        assert!(
            !stale.exists(),
            "a crash's leftover spare must not be reused"
        );
        // Stop the refill and empty the pool: a creation then makes its own directories.
        let mut spares = spares;
        stop_refilling(&mut spares);
        {
            let mut state = spares.shared.state.lock().unwrap();
            state.active.clear();
            state.view.clear();
        }
        spares.make_dirs(9, true, None).unwrap();
        assert!(layout.work(9).is_dir());
    }
}
