//! Helpers for unit tests.

use std::time::Duration;

/// Runs `f` on a thread of its own and returns what it returns, or fails the test if it takes
/// longer than `limit`: a hang shows as a failure naming `what`, not as a test that never
/// ends. A check that fails inside `f` fails the test the same way.
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|e| panic!("{what}: no answer ({e}) within {limit:?}"))
}
