//! The contracts of Torus.
//!
//! This crate knows no implementation. It defines what each layer of a node
//! must do, the plain-data types they exchange, and one [`Error`] type shared
//! by every implementation:
//!
//! - [`MetadataStore`]: a small transactional key-value store shaped like
//!   etcd v3 (get/put/delete, prefix ranges, compare-and-swap transactions,
//!   prefix watches, leases). Cluster state (volume catalog, peers, ring,
//!   volume locks) is written once, in the engine, on top of it.
//! - [`BlockStore`]: chunk storage on one node, addressed by [`ChunkRef`] and
//!   byte offset inside the chunk; `flush` is a durability barrier.
//! - [`PeerTransport`]: request/response messages between peers, many in flight.
//! - [`BlockDevice`] / [`VolumeProvider`] / [`Frontend`]: what a frontend (NBD,
//!   FlexVolume) sees of the engine, and how a frontend is run.
//!
//! With the `conformance` feature, [`conformance`] holds one suite per trait:
//! plain async functions taking `&dyn Trait` that every implementation's tests
//! call, so that "a new backend is done when it passes the suite".

pub mod device;
pub mod error;
pub mod metadata;
pub mod pagecache;
pub mod size;
pub mod storage;
pub mod transport;
pub mod types;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use device::{BlockDevice, ExportInfo, Frontend, Shutdown, VolumeProvider};
pub use error::{Error, Result};
pub use metadata::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, LeaseId, MetadataStore, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchEvent, WatchStream,
};
pub use size::ByteSize;
pub use storage::{BlockStore, ChunkScan, SECTOR};
pub use transport::{PeerHandler, PeerListener, PeerRequest, PeerResponse, PeerTransport};
pub use types::{ChunkRef, Epoch, PeerId, PeerInfo, Ring, RingMember, VolumeId};
