//! Implementations of the storage-side traits.
//!
//! - [`metadata`]: `MetadataStore` for memory, sled and etcd.
//! - [`storage`]: `BlockStore` for memory, files and mmap.

pub mod metadata;
pub mod storage;
