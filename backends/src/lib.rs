//! Implementations of the storage-side traits.
//!
//! - [`metadata`]: `MetadataStore` for memory, sled and etcd.
//! - [`storage`]: `BlockStore` for memory, files, mmap and object stores, and a
//!   fault-injecting decorator for tests.

pub mod duration_text;
pub mod metadata;
pub mod storage;
