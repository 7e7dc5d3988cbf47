//! [`MemoryMetadata`]: the shared metadata engine over an in-memory
//! `BTreeMap`. For tests and in-process clusters; nothing is persisted.

use super::local::{Batch, KvBackend, LocalMetadata};
use std::collections::BTreeMap;
use std::future::Future;
use torus_traits::Result;

/// A `MetadataStore` held in memory. See [`LocalMetadata`] for how it works.
pub type MemoryMetadata = LocalMetadata<MemoryBackend>;

impl LocalMetadata<MemoryBackend> {
    /// An empty store at revision 0.
    ///
    /// Works inside or outside a tokio runtime; the lease-expiry task starts
    /// right away inside one, or with the first operation otherwise.
    pub fn new() -> Self {
        LocalMetadata::new_empty(MemoryBackend::default(), "memory")
    }
}

impl Default for LocalMetadata<MemoryBackend> {
    fn default() -> Self {
        Self::new()
    }
}

/// A sorted map in memory. Batches are atomic because the engine applies
/// them under its lock and a `BTreeMap` update cannot fail.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl KvBackend for MemoryBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.map.get(key).cloned())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&mut self, batch: Batch) -> Result<()> {
        for (key, value) in batch {
            match value {
                Some(value) => self.map.insert(key, value),
                None => self.map.remove(&key),
            };
        }
        Ok(())
    }

    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}
