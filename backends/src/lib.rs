//! Implementations of the storage-side traits.
//!
//! - [`metadata`]: `MetadataStore` for memory and sled (etcd comes with the cluster work).
//! - [`storage`]: `BlockStore` for memory, files and mmap.

pub mod metadata;
pub mod storage;
