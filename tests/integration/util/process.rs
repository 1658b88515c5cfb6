//! Running the lamina binary (and other programs) with a deadline, and signalling them.

use std::{
    ffi::OsStr,
    io::{Read, Seek},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use nix::sys::signal::Signal;

use super::wait_for_blocking;

/// The lamina binary under test with `args`, logging at `LAMINA_TEST_LOG` (default `warn`),
/// reading no config file but the one `args` name.
pub fn lamina<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lamina"));
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("LAMINA_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        // Never the machine's /etc/lamina/config.toml: only what a test gives.
        .env("LAMINA_CONFIG", "");
    cmd
}

pub fn signal(pid: u32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// SIGKILL, and the exit collected.
pub fn stop_child(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM to `child`, then its exit status and what it wrote to its pipes; kills it and fails
/// the test when it has not exited within 15 s.
pub fn terminate(child: Child) -> Output {
    let pid = child.id();
    signal(pid, Signal::SIGTERM);
    // The pipes are read while waiting, or a child that fills one would never exit.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("pid {pid} did not exit within 15 s of SIGTERM");
        }
    }
}

/// Runs `cmd` until it exits, for at most `limit`: stdin from /dev/null, stdout and stderr
/// into anonymous files (not pipes, which a grandchild such as a containerd shim would hold
/// open after the command exits). After `limit` it is killed, and the error says what it
/// printed so far.
pub fn run_for(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut out = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut err = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(err.try_clone().map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let status = wait_for_blocking(limit, Duration::from_millis(20), || {
        child.try_wait().unwrap()
    });
    let read = |f: &mut std::fs::File| {
        let mut v = Vec::new();
        let _ = f.rewind().and_then(|()| f.read_to_end(&mut v));
        v
    };
    match status {
        Some(status) => Ok(Output {
            status,
            stdout: read(&mut out),
            stderr: read(&mut err),
        }),
        None => {
            stop_child(child);
            Err(format!(
                "{what} did not finish within {limit:?}; stdout: {}; stderr: {}",
                String::from_utf8_lossy(&read(&mut out)),
                String::from_utf8_lossy(&read(&mut err))
            ))
        }
    }
}

/// Runs `cmd` (see [`run_for`]) and returns its output once it exits, or None when it was
/// still running after 20 s (killed then: it started serving, say).
pub fn exits(mut cmd: Command) -> Option<Output> {
    run_for(&mut cmd, Duration::from_secs(20)).ok()
}

/// [`exits`] for a command that must exit: fails the test when it is still running after 20 s.
#[track_caller]
pub fn run_to_exit(mut cmd: Command) -> Output {
    run_for(&mut cmd, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"))
}

/// What `o` printed on stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What `o` printed on stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The line where lamina says why it exits (`lamina: …`), else the last line of `stderr`.
pub fn final_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .rev()
        .find(|l| l.starts_with("lamina:"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .to_string()
}

/// Makes `cmd` start in a user namespace and a mount namespace of its own, with uids and gids
/// 0–65535 mapped onto the same numbers outside: the program is not in the initial user
/// namespace (no `trusted.*` attributes, no device nodes but whiteouts), yet owns what it
/// writes as it would outside, and containerd outside can use its files and socket.
///
/// Only a process outside may write a range into the new namespace's maps, so the child
/// unshares, sends its pid down one pipe and waits on another while a thread of the test
/// writes its maps; then it goes on to exec. (`unshare --map-users` would need newuidmap and
/// /etc/subuid entries for root.)
pub fn in_own_user_namespace(cmd: &mut Command) {
    use nix::{
        fcntl::OFlag,
        sched::{unshare, CloneFlags},
        unistd::{pipe2, read, write},
    };
    use std::os::{fd::AsRawFd, unix::process::CommandExt};

    let (pid_r, pid_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
    // The thread's ends, as the child closes its copies of them first: should the thread
    // fail, the child then reads the end of the pipe (and spawn fails) instead of waiting.
    let (pid_rfd, go_wfd) = (pid_r.as_raw_fd(), go_w.as_raw_fd());
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (close, unshare, getpid, write, read) and allocates nothing: its errors are bare OS
    // error numbers, all that spawn passes back anyway. It owns the child's ends, so the
    // Command closes the parent's copies when it is dropped.
    unsafe {
        cmd.pre_exec(move || {
            libc::close(pid_rfd);
            libc::close(go_wfd);
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)?;
            let pid = nix::unistd::getpid().as_raw().to_ne_bytes();
            if write(&pid_w, &pid)? != pid.len() {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            let mut go = [0u8; 1];
            if read(go_r.as_raw_fd(), &mut go)? != 1 {
                // The test wrote no maps.
                return Err(std::io::Error::from_raw_os_error(libc::EPIPE));
            }
            Ok(())
        });
    }
    std::thread::spawn(move || {
        let mut pid = [0u8; 4];
        let mut got = 0;
        while got < pid.len() {
            match read(pid_r.as_raw_fd(), &mut pid[got..]) {
                Ok(0) => return, // the child failed before it sent its pid
                Ok(n) => got += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => panic!("reading the child's pid: {e}"),
            }
        }
        let pid = i32::from_ne_bytes(pid);
        for map in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{map}"), "0 0 65536\n")
                .unwrap_or_else(|e| panic!("writing the {map} of {pid}: {e}"));
        }
        write(&go_w, b"x").unwrap();
    });
}
