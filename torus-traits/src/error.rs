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

    /// The text of a kind that carries only a message; `None` for
    /// `LeaseNotFound` and `Io`, which carry more.
    pub fn message(&self) -> Option<&str> {
        match self {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::NoSpace(m)
            | Error::InvalidArgument(m)
            | Error::Fenced(m)
            | Error::Locked(m)
            | Error::ReadOnly(m)
            | Error::Unavailable(m)
            | Error::Timeout(m)
            | Error::Corrupt(m)
            | Error::Unsupported(m)
            | Error::Closed(m)
            | Error::Other(m) => Some(m),
            Error::LeaseNotFound(_) | Error::Io { .. } => None,
        }
    }

    /// Rebuild a message-only error from its [`kind_name`](Error::kind_name)
    /// and [`message`](Error::message); `None` for other names.
    pub fn from_kind_name(kind: &str, message: String) -> Option<Error> {
        let m = message;
        Some(match kind {
            "not_found" => Error::NotFound(m),
            "already_exists" => Error::AlreadyExists(m),
            "no_space" => Error::NoSpace(m),
            "invalid_argument" => Error::InvalidArgument(m),
            "fenced" => Error::Fenced(m),
            "locked" => Error::Locked(m),
            "read_only" => Error::ReadOnly(m),
            "unavailable" => Error::Unavailable(m),
            "timeout" => Error::Timeout(m),
            "corrupt" => Error::Corrupt(m),
            "unsupported" => Error::Unsupported(m),
            "closed" => Error::Closed(m),
            "other" => Error::Other(m),
            _ => return None,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_kinds_round_trip_through_their_names() {
        let all = [
            Error::NotFound("m".into()),
            Error::AlreadyExists("m".into()),
            Error::NoSpace("m".into()),
            Error::InvalidArgument("m".into()),
            Error::Fenced("m".into()),
            Error::Locked("m".into()),
            Error::ReadOnly("m".into()),
            Error::Unavailable("m".into()),
            Error::Timeout("m".into()),
            Error::Corrupt("m".into()),
            Error::Unsupported("m".into()),
            Error::Closed("m".into()),
            Error::Other("m".into()),
        ];
        for e in all {
            let back = Error::from_kind_name(e.kind_name(), "m".into()).expect("rebuilt");
            assert_eq!(back.kind_name(), e.kind_name());
            assert_eq!(back.message(), Some("m"));
        }
        let lease = Error::LeaseNotFound(7);
        assert_eq!(lease.message(), None);
        assert!(Error::from_kind_name(lease.kind_name(), "x".into()).is_none());
        let io = Error::io("ctx", std::io::Error::other("boom"));
        assert_eq!(io.message(), None);
        assert!(Error::from_kind_name("io", "x".into()).is_none());
    }
}
