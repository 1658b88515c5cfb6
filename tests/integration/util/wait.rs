//! Waiting for something that happens in the background, with a limit.

use std::time::{Duration, Instant};

/// Calls `poll` until it returns Some, pausing `pause` between calls (on the test's runtime,
/// whose other tasks run meanwhile), and returns that; None once `limit` has passed without.
/// `poll` runs at least once, and once more at the limit.
pub async fn wait_for<T>(
    limit: Duration,
    pause: Duration,
    mut poll: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        let last = Instant::now() >= deadline;
        if let Some(v) = poll().await {
            return Some(v);
        }
        if last {
            return None;
        }
        tokio::time::sleep(pause).await;
    }
}

/// [`wait_for`] outside async code: the thread sleeps between calls.
pub fn wait_for_blocking<T>(
    limit: Duration,
    pause: Duration,
    mut poll: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        let last = Instant::now() >= deadline;
        if let Some(v) = poll() {
            return Some(v);
        }
        if last {
            return None;
        }
        std::thread::sleep(pause);
    }
}
