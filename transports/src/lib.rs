//! `PeerTransport` implementations.
//!
//! - [`memory`]: in-process channels between nodes of one test or simulation.
//! - [`tcp`]: multiplexed TCP connections carrying the [`wire`] protocol.
//! - [`wire`]: the peer protocol's pure encode/decode functions (no I/O).
//!
//! QUIC comes later as one more module here, passing the same conformance suite.

pub mod memory;
pub mod tcp;
pub mod wire;

pub use memory::{MemoryNetwork, MemoryTransport};
pub use tcp::{TcpOptions, TcpPeerListener, TcpTransport};
