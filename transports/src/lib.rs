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
