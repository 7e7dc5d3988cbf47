//! `PeerTransport` implementations.
//!
//! - [`memory`]: in-process channels between nodes of one test or simulation.
//!
//! TCP (length-prefixed frames, optional TLS) and QUIC come with the cluster
//! work; each will be one module here and pass the same conformance suite.

pub mod memory;

pub use memory::{MemoryNetwork, MemoryTransport};
