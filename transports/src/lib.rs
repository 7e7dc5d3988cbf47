//! `PeerTransport` implementations.
//!
//! - [`memory`]: in-process channels between nodes of one test or simulation.
//! - [`tcp`]: multiplexed TCP connections carrying the [`wire`] protocol.
//! - [`wire`]: the peer protocol's pure encode/decode functions (no I/O).
//! - [`faulty`]: a decorator for tests that drops, delays, partitions or
//!   fails calls of any transport.
//!
//! QUIC comes later as one more module here, passing the same conformance suite.

pub mod faulty;
pub mod memory;
pub mod tcp;
pub mod wire;

pub use faulty::{DropMode, FaultyTransport, TransportFaultControl};
pub use memory::{MemoryNetwork, MemoryTransport};
pub use tcp::{TcpOptions, TcpPeerListener, TcpTransport};
