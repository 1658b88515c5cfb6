//! What the tests share: the macros every test is declared with, the test daemon and its
//! client, mounting what lamina returns, running the lamina binary, waiting, and the helpers
//! more than one test file needs. Each lives here once; a test file keeps only what is its own.

mod client;
mod daemon;
mod files;
mod mounts;
mod process;
mod rng;
mod wait;

pub use client::*;
pub use daemon::*;
pub use files::*;
pub use mounts::*;
pub use process::*;
pub use rng::*;
pub use wait::*;

/// True when the test may run. Without root it prints why and returns false, except under CI,
/// where a test that cannot run is a failure.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (it mounts overlayfs) and CI is set: run it as root");
    }
    eprintln!("skipped: needs root (lamina probes overlayfs and the test mounts)");
    false
}

/// Declares a test that needs root (every test of this binary does): a `#[tokio::test]` that,
/// without root, prints why and passes, or fails when `CI` is set (see [`require_root`]).
///
/// `root_test!(name, || { … })` runs the body on tokio's single-threaded test runtime;
/// `root_test!(name, threads = N, || { … })` on a multi-threaded one with N workers, for tests
/// whose spawned tasks must run beside each other or beside a blocking call (a daemon stopped
/// with SIGTERM while a client connection is open, a thread that mounts). The closure is only
/// syntax, so that rustfmt formats the body: it is the test function's body.
macro_rules! root_test {
    ($name:ident, || $body:block) => {
        #[tokio::test]
        async fn $name() {
            if !$crate::util::require_root() {
                return;
            }
            $body
        }
    };
    ($name:ident, threads = $n:tt, || $body:block) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = $n)]
        async fn $name() {
            if !$crate::util::require_root() {
                return;
            }
            $body
        }
    };
}

/// A [`root_test!`] on a `lamina serve` of its own: the closure's first parameter is the
/// [`TestDaemon`], started and answering; with a second, a [`Client`] connected to it.
///
/// ```ignore
/// daemon_test!(name, |d, mut c| { … });
/// daemon_test!(name, threads = 2, config = "sync_remove = true\n", |mut d| { … });
/// ```
///
/// `threads = N` as for [`root_test!`]; `config = "…"` is the daemon's config file (TOML, see
/// [`TestDaemon::start_with_config`]). The parameters are patterns (`mut d`, `_c`).
macro_rules! daemon_test {
    ($name:ident, $(threads = $n:tt,)? $(config = $config:expr,)? |$d:pat_param| $body:block) => {
        $crate::util::root_test!($name, $(threads = $n,)? || {
            let $d = $crate::util::TestDaemon::start_with_config(
                $crate::util::daemon_test!(@config $($config)?),
            )
            .await;
            $body
        });
    };
    (
        $name:ident,
        $(threads = $n:tt,)?
        $(config = $config:expr,)?
        |$d:pat_param, $c:pat_param| $body:block
    ) => {
        $crate::util::root_test!($name, $(threads = $n,)? || {
            let daemon = $crate::util::TestDaemon::start_with_config(
                $crate::util::daemon_test!(@config $($config)?),
            )
            .await;
            let client = daemon.client().await;
            let $d = daemon;
            let $c = client;
            $body
        });
    };
    (@config) => {
        ""
    };
    (@config $config:expr) => {
        $config
    };
}

pub(crate) use {daemon_test, root_test};
