//! The one error type every layer returns.
//!
//! Variants are kinds a caller can act on (retry, report "no space", map to an
//! NBD errno), not a mirror of each backend's internals. It is `Clone` so one
//! failure can be reported to many waiters (replicated writes fan out).

use std::sync::Arc;

/// Result with the shared [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors shared by every Torus layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A key, volume, chunk, lease or peer does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Something with that name or key already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The storage pool (or the disk behind it) is full.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The request itself is wrong (offset past the end, bad size, bad name).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A write carried an epoch older than the volume's current one.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The volume is locked by another holder.
    #[error("locked: {0}")]
    Locked(String),
    /// A lease is unknown or has expired.
    #[error("lease {0:#x} not found or expired")]
    LeaseNotFound(i64),
    /// The target is read-only.
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// A service (etcd, a peer) cannot be reached right now; retrying may help.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Stored data failed a check (checksum, decoding).
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The operation is not supported by this implementation.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The object was closed or shut down.
    #[error("closed: {0}")]
    Closed(String),
    /// An operating-system I/O error, with what was being done.
    #[error("I/O error: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Anything else, with a message a person can read.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An I/O error with context (a path, an operation).
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(28) {
            // ENOSPC from the disk under the pool is the same condition as a full pool.
            return Error::NoSpace(format!("{}: {source}", context.into()));
        }
        Error::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// A short stable name for the kind, for logs and wire codes.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::NoSpace(_) => "no_space",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Fenced(_) => "fenced",
            Error::Locked(_) => "locked",
            Error::LeaseNotFound(_) => "lease_not_found",
            Error::ReadOnly(_) => "read_only",
            Error::Unavailable(_) => "unavailable",
            Error::Timeout(_) => "timeout",
            Error::Corrupt(_) => "corrupt",
            Error::Unsupported(_) => "unsupported",
            Error::Closed(_) => "closed",
            Error::Io { .. } => "io",
            Error::Other(_) => "other",
        }
    }
}
