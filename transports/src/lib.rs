//! `PeerTransport` implementations.
//!
//! - [`memory`]: in-process channels between nodes of one test or simulation.
//! - [`tcp`]: multiplexed TCP connections carrying the [`wire`] protocol,
//!   plain or with mutual TLS.
//! - [`quic`]: QUIC (quinn), one stream per request, mutual TLS always.
//! - [`tls`]: the peer certificates (cluster CA trust, reload, generation).
//! - [`wire`]: the peer protocol's pure encode/decode functions (no I/O).
//! - [`faulty`]: a decorator for tests that drops, delays, partitions or
//!   fails calls of any transport.

pub mod faulty;
pub mod memory;
pub mod quic;
pub mod tcp;
pub mod tls;
pub mod wire;

pub use faulty::{DropMode, FaultyTransport, TransportFaultControl};
pub use memory::{MemoryNetwork, MemoryTransport};
pub use quic::{QuicOptions, QuicPeerListener, QuicTransport};
pub use tcp::{TcpOptions, TcpPeerListener, TcpTransport};
pub use tls::{PeerTls, TlsFiles};

/// Runs a step of opening a connection for at most `limit`. Its error
/// becomes `Unavailable("{failed}: {error}")`, running out of time
/// `Unavailable("{doing} timed out after {limit:?}")`.
pub(crate) async fn bounded<T, E: std::fmt::Display>(
    limit: std::time::Duration,
    step: impl std::future::Future<Output = std::result::Result<T, E>>,
    failed: impl FnOnce() -> String,
    doing: impl FnOnce() -> String,
) -> torus_traits::Result<T> {
    use torus_traits::Error;
    match tokio::time::timeout(limit, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Unavailable(format!("{}: {e}", failed()))),
        Err(_) => Err(Error::Unavailable(format!(
            "{} timed out after {limit:?}",
            doing()
        ))),
    }
}
