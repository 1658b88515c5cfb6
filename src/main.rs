//! `lamina`: parse the command line, load the config, set up logging, run.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lamina::{
    config::{Config, Flags, LogFormat},
    error::{chain, Error},
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    version,
    about = "An overlayfs snapshotter for containerd, served as a proxy plugin"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve containerd's Snapshots API on a unix socket.
    Serve {
        #[command(flatten)]
        flags: Flags,
    },
    /// Print configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Ask the running daemon what it is, what it found and what it holds.
    Status {
        #[command(flatten)]
        flags: Flags,
    },
    /// Compare the store with the snapshot directories (through the daemon, or offline on
    /// a stopped daemon's root). Exits 1 when it finds problems, 2 when it cannot run.
    Fsck {
        /// Fix what is safe to fix: orphans, missing directories of active snapshots, modes.
        #[arg(long)]
        repair: bool,
        /// With --repair, also delete the directories whose IDs the store never handed out
        /// (its store is missing, or older than they are): their layers are given up.
        #[arg(long, requires = "repair")]
        delete_unknown: bool,
        #[command(flatten)]
        flags: Flags,
    },
    /// Report what the kernel and the root's filesystem support, without a daemon.
    Check {
        #[command(flatten)]
        flags: Flags,
    },
    /// Mount snapshot KEY at TARGET for inspection, read-only.
    Mount {
        /// lamina's key (containerd's `<namespace>/<n>/<name>`), or the name `ctr snapshots
        /// ls` shows.
        key: String,
        target: PathBuf,
        /// The containerd namespace a name is looked up in.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Mount an active snapshot writable, exactly as containerd would; refused while
        /// anything else mounts it (two writable mounts of one snapshot corrupt it).
        #[arg(long)]
        rw: bool,
        #[command(flatten)]
        flags: Flags,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the default config file, every key commented.
    Default,
    /// Print the configuration in effect: the file (if given) with the flags applied.
    Dump {
        #[command(flatten)]
        flags: Flags,
    },
    /// Print what to append to containerd's config.toml to use lamina, for the containerd
    /// installed here (or the one named), filled from lamina's config.
    Containerd {
        /// The containerd series to write for: 1.6, 1.7 or 2 [default: asks `containerd
        /// --version`].
        #[arg(long, value_name = "VERSION")]
        containerd_version: Option<String>,
        /// The containerd binary to ask for its version [default: containerd on PATH].
        #[arg(long, value_name = "PATH", conflicts_with = "containerd_version")]
        containerd: Option<PathBuf>,
        /// Also make Kubernetes (containerd's CRI) use lamina for images and containers.
        #[arg(long)]
        cri: bool,
        /// Also make containerd (1.7+) unpack lamina's layers with lamina's differ, which
        /// reads them from containerd at lamina's containerd_address.
        #[arg(long)]
        differ: bool,
        /// Whether the node's kernel can ID-map overlay lowers (5.19+), which decides the
        /// remap-ids capability [default: this machine's kernel]. For a fragment written
        /// elsewhere than on the node.
        #[arg(
            long,
            value_name = "yes|no",
            value_parser = clap::builder::BoolishValueParser::new(),
            hide_possible_values = true
        )]
        idmapped_mounts: Option<bool>,
        #[command(flatten)]
        flags: Flags,
    },
}

/// The command ran and found something wrong (fsck's problems, a root `check` finds unusable).
const FOUND_PROBLEMS: u8 = 1;
/// The command could not do what it was asked (a bad configuration, a daemon that cannot start
/// or be reached, an I/O error): its message says why. Distinct from [`FOUND_PROBLEMS`], so
/// that a script can tell "fsck found damage" from "fsck could not run".
const FAILED: u8 = 2;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Found(what)) => {
            eprintln!("lamina: {what}");
            ExitCode::from(FOUND_PROBLEMS)
        }
        Err(err) => {
            eprintln!("lamina: {}", chain(&err));
            ExitCode::from(FAILED)
        }
    }
}

/// How a command that ran to its end ended.
enum Outcome {
    Done,
    /// It found problems, which it has printed; the text says so in one line.
    Found(&'static str),
}

/// [`Outcome::Done`] when `ok`, else [`Outcome::Found`] with `what`.
fn found_unless(ok: bool, what: &'static str) -> Outcome {
    if ok {
        Outcome::Done
    } else {
        Outcome::Found(what)
    }
}

fn run(cli: Cli) -> Result<Outcome, Error> {
    match cli.command {
        Command::Serve { flags } => {
            let config = Config::load(&flags)?;
            init_logging(&config);
            limit_malloc_arenas();
            // Requests do their disk work on the blocking pool. Its default of 512 threads buys
            // nothing on a few cores when every write waits for the same committer, and each
            // extra thread costs memory (a stack, a malloc arena).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(lamina::snapshot::BLOCKING_THREADS)
                .build()
                .map_err(|e| Error::Internal(format!("starting the async runtime: {e}")))?;
            let result = runtime.block_on(lamina::server::run(config));
            // Blocking work still running after the drain's deadline (a long Cleanup, a big
            // usage walk) is cut off, not waited for: dropping the runtime would wait for it
            // all. What it leaves half done, start-up recovery finishes, as after a crash.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
            result.map(|()| Outcome::Done)
        }
        Command::Status { flags } => {
            print!("{}", block_on(lamina::cli::status(&Config::load(&flags)?))?);
            Ok(Outcome::Done)
        }
        Command::Fsck {
            repair,
            delete_unknown,
            flags,
        } => {
            let repair = lamina::snapshot::fsck::Repair {
                safe: repair,
                unknown: delete_unknown,
            };
            let (out, clean) = block_on(lamina::cli::fsck(&Config::load(&flags)?, repair))?;
            print!("{out}");
            Ok(found_unless(
                clean,
                "fsck found problems; see above (--repair fixes what is safe)",
            ))
        }
        Command::Check { flags } => {
            let (out, usable) = lamina::cli::check(&Config::load(&flags)?)?;
            print!("{out}");
            Ok(found_unless(
                usable,
                "lamina cannot run on this root; see above",
            ))
        }
        Command::Mount {
            key,
            target,
            namespace,
            rw,
            flags,
        } => block_on(lamina::cli::mount(
            &Config::load(&flags)?,
            &key,
            &namespace,
            &target,
            rw,
        ))
        .map(|()| Outcome::Done),
        Command::Config(ConfigCommand::Default) => {
            print!("{}", lamina::config::DEFAULT_FILE);
            Ok(Outcome::Done)
        }
        Command::Config(ConfigCommand::Dump { flags }) => {
            print!("{}", Config::load(&flags)?.to_toml());
            Ok(Outcome::Done)
        }
        Command::Config(ConfigCommand::Containerd {
            containerd_version,
            containerd,
            cri,
            idmapped_mounts,
            differ,
            flags,
        }) => {
            let config = Config::load(&flags)?;
            let out = lamina::cli::containerd_config(
                &config,
                containerd_version.as_deref(),
                containerd.as_deref(),
                cri,
                idmapped_mounts,
                differ,
            )?;
            print!("{out}");
            Ok(Outcome::Done)
        }
    }
}

fn block_on<T>(fut: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("starting the async runtime: {e}")))?
        .block_on(fut)
}

fn init_logging(config: &Config) {
    // Validated in Config::load, so the fallback only guards a RUST_LOG that does not parse.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // journald and log files get plain text; colours only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// glibc gives each thread that allocates its own malloc arena (up to 8 per core), and memory
/// freed in one arena is not reused by others: a burst of Lists on many blocking-pool threads
/// tripled the daemon's peak RSS. Two arenas keep the peak near the live size; lamina's
/// threads mostly wait on the disk, so contention on them is no cost worth measuring.
#[cfg(target_env = "gnu")]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only changes allocator tuning; it is called before the runtime starts
    // any thread, and M_ARENA_MAX takes any positive value.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(target_env = "gnu"))]
fn limit_malloc_arenas() {}
