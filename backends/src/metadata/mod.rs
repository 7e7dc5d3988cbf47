//! `MetadataStore` implementations: three that run inside the process and
//! one client of etcd.
//!
//! - [`local`]: the engine written once — revisions, compare-and-swap
//!   transactions, prefix watches and leases — over any sorted byte map
//!   ([`KvBackend`]).
//! - [`memory`]: [`MemoryMetadata`], the engine over a `BTreeMap`; for tests
//!   and in-process clusters. Nothing survives the process.
//! - [`sled`]: [`SledMetadata`], the engine over an embedded sled database;
//!   for single-node and development setups. Every write is durable before it
//!   returns, and keys, revisions and leases survive a restart.
//! - [`etcd`]: [`EtcdMetadata`], a client of a real etcd v3 cluster; for
//!   multi-node clusters. It does not use the shared engine: etcd implements
//!   these semantics itself.

pub mod etcd;
pub mod local;
pub mod memory;
pub mod sled;

pub use self::etcd::{EtcdConfig, EtcdMetadata, EtcdTls};
pub use self::local::{Batch, KvBackend, LocalMetadata};
pub use self::memory::{MemoryBackend, MemoryMetadata};
pub use self::sled::{SledBackend, SledMetadata};
