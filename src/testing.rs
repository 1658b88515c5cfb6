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

/// True when a test that mounts may run: as root. Otherwise it prints why and the test returns
/// early, unless `CI` is set, where a test that cannot run is a failure.
pub fn mounting_allowed() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "needs root (it mounts); CI is set"
    );
    eprintln!("skipped: needs root (it mounts)");
    false
}

/// Bind-mounts `source` at `target` (which must exist), for tests of what lamina does with a
/// mount inside a tree.
pub fn bind(source: &std::path::Path, target: &std::path::Path) {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("bind {} at {}: {e}", source.display(), target.display()));
}

/// True when a test that needs root (chown to other users, device nodes, `trusted.*`
/// attributes) may run. Otherwise it prints why and the test returns early, unless `CI` is
/// set, where a test that cannot run is a failure.
pub fn root_allowed(why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "needs root ({why}); CI is set"
    );
    eprintln!("skipped: needs root ({why})");
    false
}
