//! The domain error, and the one place it becomes a gRPC status.
//!
//! containerd turns status codes back into its `errdefs` errors and branches on them (the image
//! unpacker retries on `AlreadyExists` after Prepare/Commit and treats `NotFound` after Stat as
//! "not unpacked yet"), so every variant maps to a deliberate code.

use std::{
    io,
    path::{Path, PathBuf},
};

/// Everything that can go wrong while serving a snapshot request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message names what is missing, e.g. `snapshot "k" does not exist`.
    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    AlreadyExists(String),

    /// The request is well-formed but the snapshot is in the wrong state for it.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The request itself is malformed: bad key, label, filter or field path.
    #[error("{0}")]
    InvalidArgument(String),

    /// A client let one of lamina's deadlines pass (a List's reader that stopped reading);
    /// says which and what to do.
    #[error("{0}")]
    TimedOut(String),

    #[error("metadata store: {context}")]
    Store {
        context: String,
        #[source]
        source: Box<redb::Error>,
    },

    #[error("{context} {path:?}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The kernel or the root's filesystem cannot do what lamina needs; says what to fix.
    #[error("{0}")]
    Unsupported(String),

    /// A request lamina does not serve (the Diff service's Diff, a layer's media type it does
    /// not read); says what to use instead. containerd reads the code as its `NotImplemented`.
    #[error("{0}")]
    Unimplemented(String),

    /// A config file or flag that lamina cannot use; names the key and what is wrong.
    #[error("{0}")]
    Config(String),

    /// Another process answers on the socket lamina was asked to serve on.
    #[error(
        "another process is already serving on {0:?}: stop it, or give lamina another --address"
    )]
    AddressInUse(PathBuf),

    /// lamina cannot do it now but may a moment later: it is shutting down (see
    /// [`Error::shutting_down`]), the store is being reopened after a failed write, a deletion
    /// was cut short by a stop, or (operator commands) the daemon cannot be reached. The
    /// message says to retry, or that lamina is stopping.
    #[error("{0}")]
    Unavailable(String),

    /// The daemon answered an operator command with an error.
    #[error("{0}")]
    Remote(String),

    /// The store file is damaged; the message says what to do.
    #[error("{0}")]
    Corrupt(String),

    /// A snapshot directory already exists where lamina is about to create one. IDs are never
    /// handed out twice, so it is not lamina's doing: it is left as it is.
    #[error(
        "{0:?} already exists, though its ID was never given to a snapshot before: something \
         other than lamina writes under the root (`lamina fsck` reports what it finds there)"
    )]
    Occupied(PathBuf),

    /// The store does not know some of the snapshot directories beside it: it is missing, or
    /// older than they are. Starting would hand out their IDs again and delete them.
    #[error("{}", store_behind(.store, *.missing, *.unknown, *.highest, *.next_id))]
    StoreBehind {
        store: PathBuf,
        /// The store file does not exist at all.
        missing: bool,
        /// Directories under `snapshots/` with IDs the store never handed out.
        unknown: usize,
        highest: u64,
        /// The store's next ID (1 when missing).
        next_id: u64,
    },

    /// The disk is full (or read-only); the message says what to free.
    #[error("{0}")]
    Exhausted(String),

    /// A fault inside lamina that no request could have caused.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub fn store(context: impl Into<String>, source: impl Into<redb::Error>) -> Self {
        Error::Store {
            context: context.into(),
            source: Box::new(source.into()),
        }
    }

    /// A request that arrives once lamina has begun to stop.
    pub fn shutting_down() -> Self {
        Error::Unavailable("lamina is shutting down".into())
    }

    pub fn not_found(key: &str) -> Self {
        Error::NotFound(format!("snapshot {key:?} does not exist"))
    }

    pub fn already_exists(key: &str) -> Self {
        Error::AlreadyExists(format!("snapshot {key:?} already exists"))
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    pub fn precondition(msg: impl Into<String>) -> Self {
        Error::FailedPrecondition(msg.into())
    }

    /// Names the operation a store error happened in; other errors pass unchanged.
    pub fn in_context(self, what: &str) -> Self {
        match self {
            Error::Store { source, .. } => Error::Store {
                context: what.to_string(),
                source,
            },
            other => other,
        }
    }

    /// The gRPC code containerd expects for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            // Transient: containerd's errdefs reads Unavailable as "try again", which is what
            // each of these messages asks for; Internal would mean a fault for a human to fix.
            Error::Unavailable(_) => Code::Unavailable,
            Error::TimedOut(_) => Code::DeadlineExceeded,
            Error::Unimplemented(_) => Code::Unimplemented,
            // A full disk or a read-only root is something an operator can fix and retry.
            Error::Io { source, .. } if is_resource_error(source) => Code::ResourceExhausted,
            Error::Exhausted(_) => Code::ResourceExhausted,
            Error::Store { .. } if exhausts_resources(self) => Code::ResourceExhausted,
            Error::Io { .. }
            | Error::Store { .. }
            | Error::Unsupported(_)
            | Error::Config(_)
            | Error::AddressInUse(_)
            | Error::Remote(_)
            | Error::Corrupt(_)
            | Error::Occupied(_)
            | Error::StoreBehind { .. }
            | Error::Internal(_) => Code::Internal,
        }
    }
}

fn store_behind(store: &Path, missing: bool, unknown: usize, highest: u64, next_id: u64) -> String {
    let snapshots = store.parent().unwrap_or(store).join("snapshots");
    let root = store.parent().unwrap_or(store);
    let what = if missing {
        format!(
            "store {} is missing, but {} holds {unknown} snapshot directories (the highest on \
             disk is {highest})",
            store.display(),
            snapshots.display()
        )
    } else {
        format!(
            "store {} is older than the snapshot directories beside it: {} holds {unknown} \
             directories with IDs it never handed out (its next ID is {next_id}; the highest on \
             disk is {highest}), as when a store is put back from a backup",
            store.display(),
            snapshots.display()
        )
    };
    format!(
        "{what}. lamina will not start over them: it would give their IDs to new snapshots and \
         delete them as orphans. Either restore the store that knows them and start lamina \
         again, or give those layers up: `lamina fsck --root {root}` says how much space they \
         take, and `lamina fsck --root {root} --repair --delete-unknown` deletes them (containerd \
         then unpacks its images again)",
        root = root.display()
    )
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::store("metadata store", e)
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Whether an I/O error somewhere in `err`'s chain says the disk is full or read-only.
pub fn exhausts_resources(err: &(dyn std::error::Error + 'static)) -> bool {
    // redb's errors carry their io::Error in a variant, not as a source().
    fn storage_io(e: &redb::StorageError) -> Option<&io::Error> {
        match e {
            redb::StorageError::Io(io) => Some(io),
            _ => None,
        }
    }
    let mut cur = Some(err);
    while let Some(e) = cur {
        let io = e
            .downcast_ref::<io::Error>()
            .or_else(|| e.downcast_ref::<redb::StorageError>().and_then(storage_io))
            .or_else(|| match e.downcast_ref::<redb::CommitError>() {
                Some(redb::CommitError::Storage(s)) => storage_io(s),
                _ => None,
            })
            .or_else(|| match e.downcast_ref::<redb::TransactionError>() {
                Some(redb::TransactionError::Storage(s)) => storage_io(s),
                _ => None,
            })
            .or_else(|| {
                let redb = e
                    .downcast_ref::<redb::Error>()
                    .or_else(|| e.downcast_ref::<Box<redb::Error>>().map(|b| &**b));
                match redb {
                    Some(redb::Error::Io(io)) => Some(io),
                    _ => None,
                }
            });
        if io.is_some_and(is_resource_error) {
            return true;
        }
        cur = e.source();
    }
    false
}

fn is_resource_error(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EROFS)
    )
}

/// Renders the error with its whole source chain, once, for a status message or a log line.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(source) = cur {
        out.push_str(": ");
        out.push_str(&source.to_string());
        cur = source.source();
    }
    out
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.code(), chain(&err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_containerd_branches_on() {
        let nf = Error::NotFound("snapshot \"k\" does not exist".into());
        assert_eq!(tonic::Status::from(nf).code(), tonic::Code::NotFound);
        let ae = Error::AlreadyExists("snapshot \"k\" already exists".into());
        assert_eq!(tonic::Status::from(ae).code(), tonic::Code::AlreadyExists);
        let full = Error::io("creating", "/x", io::Error::from_raw_os_error(libc::ENOSPC));
        let status = tonic::Status::from(full);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let redb_full = redb::CommitError::Storage(redb::StorageError::Io(
            io::Error::from_raw_os_error(libc::ENOSPC),
        ));
        assert!(exhausts_resources(&redb_full));
        let store_full = Error::store("committing", redb_full);
        assert_eq!(store_full.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("creating \"/x\": No space left"));
    }

    /// Every error that asks the client to retry, or says lamina is stopping, is answered
    /// Unavailable: with these messages, the store being reopened after a failed write and a
    /// deletion cut short by a stop (the deleter, the deleter) answer their requests.
    #[test]
    fn retry_and_stopping_are_unavailable() {
        for err in [
            Error::Unavailable(
                "store /r/metadata.redb is being reopened after a failed write; retry".into(),
            ),
            Error::Unavailable("lamina is stopping; the deletion was not finished".into()),
            Error::Unavailable(
                "lamina is stopping; the rest of this deletion is left for its next start".into(),
            ),
            Error::shutting_down(),
        ] {
            let message = err.to_string();
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), tonic::Code::Unavailable, "{message}");
            assert_eq!(status.message(), message);
        }
    }
}
