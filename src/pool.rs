//! A stack of tasks shared by a few threads, for work that fans out as it goes (measuring or
//! deleting a directory tree): a task may add more, and the threads stop once no task is left
//! and none is running, so nobody has to know the size of the tree beforehand.

use std::{
    sync::{Condvar, Mutex, MutexGuard},
    thread::Scope,
};

/// Runs `work` on `tasks`, and on every task it adds, on up to `threads` threads: the
/// caller's, and more only while tasks wait with no thread free to take them, so that a small
/// job never pays for starting threads. Each thread keeps its own state `S`; all of them are
/// returned. The first error stops every thread before its next task and is returned. A panic
/// in `work` stops every thread the same way, then goes on unwinding in the caller.
pub fn run<T, S, E>(
    threads: usize,
    tasks: Vec<T>,
    work: impl Fn(T, &mut S) -> Result<Vec<T>, E> + Sync,
) -> Result<Vec<S>, E>
where
    T: Send,
    S: Default + Send,
    E: Send,
{
    let pool = Pool {
        state: Mutex::new(State {
            tasks,
            busy: 0,
            waiting: 0,
            threads: 1,
            failed: None,
            panicked: false,
        }),
        more: Condvar::new(),
        max: threads.max(1),
        done: Mutex::new(Vec::new()),
    };
    std::thread::scope(|scope| pool.worker(scope, &work));
    let state = pool.state.into_inner().unwrap_or_else(|e| e.into_inner());
    match state.failed {
        Some(err) => Err(err),
        None => Ok(pool.done.into_inner().unwrap_or_else(|e| e.into_inner())),
    }
}

struct Pool<T, S, E> {
    state: Mutex<State<T, E>>,
    /// Signals waiting threads: tasks were added, or the work is over.
    more: Condvar,
    max: usize,
    /// Each thread's state, once it has stopped.
    done: Mutex<Vec<S>>,
}

struct State<T, E> {
    tasks: Vec<T>,
    /// Threads running a task (which may add more).
    busy: usize,
    /// Threads waiting for a task.
    waiting: usize,
    /// Threads started (the caller's included).
    threads: usize,
    failed: Option<E>,
    /// A task panicked: the others stop as on an error, and the panic reaches the caller
    /// when the scope ends.
    panicked: bool,
}

/// Held while a task runs. Dropped by unwinding, it does what the end of the task would
/// have: without it, the other threads would wait forever for a busy thread that is gone.
struct Running<'a, T, S, E>(&'a Pool<T, S, E>);

impl<T, S, E> Drop for Running<'_, T, S, E> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            state.busy -= 1;
            state.panicked = true;
            self.0.more.notify_all();
        }
    }
}

impl<T: Send, S: Default + Send, E: Send> Pool<T, S, E> {
    fn lock(&self) -> MutexGuard<'_, State<T, E>> {
        // Only counters and a stack change under this lock; a panic cannot leave them torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn worker<'scope, W>(&'scope self, scope: &'scope Scope<'scope, '_>, work: &'scope W)
    where
        W: Fn(T, &mut S) -> Result<Vec<T>, E> + Sync,
    {
        let mut mine = S::default();
        loop {
            let (task, another) = {
                let mut state = self.lock();
                let task = loop {
                    if state.failed.is_some() || state.panicked {
                        break None;
                    }
                    if let Some(task) = state.tasks.pop() {
                        break Some(task);
                    }
                    if state.busy == 0 {
                        // Nothing left and nobody who could add more: the work is over.
                        self.more.notify_all();
                        break None;
                    }
                    state.waiting += 1;
                    state = self.more.wait(state).unwrap_or_else(|e| e.into_inner());
                    state.waiting -= 1;
                };
                let Some(task) = task else { break };
                state.busy += 1;
                // Tasks left over that no waiting thread will take: start one more thread
                // (which does the same), up to the limit.
                let another = state.tasks.len() > state.waiting && state.threads < self.max;
                if another {
                    state.threads += 1;
                }
                (task, another)
            };
            if another {
                let started = std::thread::Builder::new()
                    .spawn_scoped(scope, move || self.worker(scope, work));
                // Refused (a limit on threads or tasks): the threads already running carry on.
                if started.is_err() {
                    self.lock().threads -= 1;
                }
            }
            let running = Running(self);
            let result = work(task, &mut mine);
            std::mem::forget(running);
            let mut state = self.lock();
            state.busy -= 1;
            match result {
                Ok(more) => state.tasks.extend(more),
                Err(err) => {
                    state.failed.get_or_insert(err);
                }
            }
            if state.waiting > 0 {
                self.more.notify_all();
            }
        }
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(mine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    /// Each task `n > 0` adds tasks `n - 1` twice: a binary tree of 2^(depth+1) - 1 tasks.
    fn tree(threads: usize, depth: u32) -> (usize, usize) {
        let ran = AtomicUsize::new(0);
        let states = run(threads, vec![depth], |n, count: &mut usize| {
            ran.fetch_add(1, Relaxed);
            *count += 1;
            Ok::<_, ()>(if n == 0 { vec![] } else { vec![n - 1, n - 1] })
        })
        .unwrap();
        assert!(states.len() <= threads.max(1), "{} threads", states.len());
        (ran.into_inner(), states.iter().sum())
    }

    #[test]
    fn runs_every_task_once_whatever_the_threads() {
        for threads in [0, 1, 2, 8] {
            assert_eq!(tree(threads, 10), (2047, 2047), "{threads} threads");
        }
        let none = run(4, Vec::<u32>::new(), |_, _: &mut ()| Ok::<_, ()>(vec![])).unwrap();
        assert_eq!(none.len(), 1, "only the caller's thread");
    }

    #[test]
    fn a_small_job_stays_on_the_callers_thread() {
        let caller = std::thread::current().id();
        let states = run(8, vec![1, 2, 3], |_, seen: &mut Vec<_>| {
            seen.push(std::thread::current().id());
            Ok::<_, ()>(vec![])
        })
        .unwrap();
        // Three tasks queued at once may start helpers, but a single task never does.
        let single = run(8, vec![1], |_, seen: &mut Vec<_>| {
            seen.push(std::thread::current().id());
            Ok::<_, ()>(vec![])
        })
        .unwrap();
        assert_eq!(single, vec![vec![caller]]);
        assert_eq!(states.iter().map(Vec::len).sum::<usize>(), 3);
    }

    #[test]
    fn the_first_error_stops_the_work() {
        let ran = AtomicUsize::new(0);
        let out = run(1, vec![5, 4, 3, 2, 1], |n, _: &mut ()| {
            ran.fetch_add(1, Relaxed);
            if n == 2 {
                Err(format!("task {n} failed"))
            } else {
                Ok(vec![])
            }
        });
        assert_eq!(out.unwrap_err(), "task 2 failed");
        // One thread takes the stack from the top: 1, then 2, which fails; 3, 4, 5 never run.
        assert_eq!(ran.into_inner(), 2);
    }

    #[test]
    fn a_panicking_task_stops_the_others_and_reaches_the_caller() {
        crate::testing::within(
            std::time::Duration::from_secs(60),
            "the pool after a task panicked",
            || {
                for threads in [1, 4] {
                    panicking_task(threads);
                }
            },
        );
    }

    fn panicking_task(threads: usize) {
        // Task 0, the first taken, panics while the other 63 wait or run on other threads.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(threads, (0..64).rev().collect(), |n: u32, _: &mut ()| {
                if n == 0 {
                    panic!("task {n} panicked");
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                Ok::<_, ()>(vec![])
            })
        }));
        assert!(
            out.is_err(),
            "{threads} threads: the panic reaches the caller"
        );
    }
}
