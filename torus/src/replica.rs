//! The replica side of chunk I/O: a node's [`BlockStore`] guarded by epoch
//! fencing.
//!
//! Every write, zero and flush carries the writer's epoch. A replica keeps the
//! highest epoch it has seen per volume and refuses anything older with
//! `Fenced`, so a writer that lost its lock cannot change data after a new
//! writer has started. Two details make that hold:
//!
//! - The epoch check and the store operation are one step: mutations hold a
//!   shared guard on the volume's epoch across the I/O, and raising the epoch
//!   takes it exclusively, so an old write admitted just before a new writer
//!   arrived finishes before the new epoch is in force — it can never land on
//!   top of the new writer's data.
//! - A replica meeting a volume for the first time (a restart, or a volume it
//!   never held) starts from the epoch recorded in metadata, which is bumped
//!   in the same transaction that hands out the lock; a stale writer is
//!   refused even by replicas the new writer has not written to yet.
//!
//! The same `Replica` serves local I/O directly and, as a [`PeerHandler`],
//! requests that arrive from other peers over a transport.

use crate::catalog;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use torus_traits::{
    BlockStore, ChunkRef, Epoch, Error, MetadataStore, PeerHandler, PeerRequest, PeerResponse,
    Result, VolumeId,
};

#[derive(Debug, Default)]
struct Fence {
    epoch: Epoch,
    /// Whether the epoch recorded in metadata has been read.
    loaded: bool,
}

/// A node's chunk store with epoch fencing.
pub struct Replica {
    store: Arc<dyn BlockStore>,
    meta: Option<Arc<dyn MetadataStore>>,
    fences: Mutex<HashMap<VolumeId, Arc<RwLock<Fence>>>>,
}

impl Replica {
    /// A replica that knows epochs only from the writes it receives (tests,
    /// or a store no one else writes).
    pub fn new(store: Arc<dyn BlockStore>) -> Self {
        Replica {
            store,
            meta: None,
            fences: Mutex::new(HashMap::new()),
        }
    }

    /// A replica that starts each volume from the epoch in metadata.
    pub fn with_metadata(store: Arc<dyn BlockStore>, meta: Arc<dyn MetadataStore>) -> Self {
        Replica {
            meta: Some(meta),
            ..Replica::new(store)
        }
    }

    pub fn store(&self) -> &Arc<dyn BlockStore> {
        &self.store
    }

    fn fence(&self, volume: VolumeId) -> Arc<RwLock<Fence>> {
        self.fences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(volume)
            .or_insert_with(|| {
                Arc::new(RwLock::new(Fence {
                    epoch: Epoch(0),
                    loaded: self.meta.is_none(),
                }))
            })
            .clone()
    }

    /// Admit an operation at `epoch`; the returned guard must be held across
    /// the store operation.
    async fn admit(&self, volume: VolumeId, epoch: Epoch) -> Result<OwnedRwLockReadGuard<Fence>> {
        let fence = self.fence(volume);
        // Bounded: each pass either admits, refuses, or raises the epoch to
        // `epoch`, after which the next pass admits or refuses.
        for _ in 0..4 {
            let guard = fence.clone().read_owned().await;
            if guard.loaded && epoch < guard.epoch {
                return Err(Error::Fenced(format!(
                    "volume {volume} is now written at epoch {}; epoch {} is stale",
                    guard.epoch.0, epoch.0
                )));
            }
            if guard.loaded && epoch == guard.epoch {
                return Ok(guard);
            }
            drop(guard);
            let mut w = fence.clone().write_owned().await;
            if !w.loaded {
                if let Some(meta) = &self.meta {
                    if let Some((record, _)) = catalog::get_by_id(&**meta, volume).await? {
                        w.epoch = w.epoch.max(record.epoch);
                    }
                }
                w.loaded = true;
            }
            if epoch > w.epoch {
                w.epoch = epoch;
            }
        }
        Err(Error::Unavailable(format!(
            "volume {volume}: epoch kept changing while admitting a write"
        )))
    }

    pub async fn read(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<Bytes> {
        self.store.read(chunk, offset, len).await
    }

    pub async fn write(
        &self,
        chunk: ChunkRef,
        offset: u64,
        data: Bytes,
        epoch: Epoch,
    ) -> Result<()> {
        let _admitted = self.admit(chunk.volume, epoch).await?;
        self.store.write(chunk, offset, data).await
    }

    pub async fn zero(&self, chunk: ChunkRef, offset: u64, len: u64, epoch: Epoch) -> Result<()> {
        let _admitted = self.admit(chunk.volume, epoch).await?;
        self.store.zero(chunk, offset, len).await
    }

    pub async fn flush(&self, volume: VolumeId, epoch: Epoch) -> Result<()> {
        let _admitted = self.admit(volume, epoch).await?;
        self.store.flush().await
    }

    /// Free a deleted volume's chunks and forget its epoch.
    pub async fn drop_volume(&self, volume: VolumeId) -> Result<()> {
        self.store.delete_volume(volume).await?;
        self.fences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&volume);
        Ok(())
    }
}

#[async_trait]
impl PeerHandler for Replica {
    async fn handle(&self, request: PeerRequest) -> Result<PeerResponse> {
        match request {
            PeerRequest::Ping => Ok(PeerResponse::Pong),
            PeerRequest::Read { chunk, offset, len } => {
                self.read(chunk, offset, len).await.map(PeerResponse::Data)
            }
            PeerRequest::Write {
                chunk,
                offset,
                data,
                epoch,
            } => self
                .write(chunk, offset, data, epoch)
                .await
                .map(|_| PeerResponse::Done),
            PeerRequest::Zero {
                chunk,
                offset,
                len,
                epoch,
            } => self
                .zero(chunk, offset, len, epoch)
                .await
                .map(|_| PeerResponse::Done),
            PeerRequest::Flush { volume, epoch } => {
                self.flush(volume, epoch).await.map(|_| PeerResponse::Done)
            }
            PeerRequest::DeleteChunk { chunk, epoch } => {
                let _admitted = self.admit(chunk.volume, epoch).await?;
                self.store
                    .delete_chunk(chunk)
                    .await
                    .map(|_| PeerResponse::Done)
            }
            PeerRequest::ListChunks { volume } => Ok(PeerResponse::Chunks(
                self.store
                    .list_chunks()
                    .await?
                    .into_iter()
                    .filter(|c| c.volume == volume)
                    .map(|c| c.index)
                    .collect(),
            )),
            PeerRequest::ScanChunk { chunk } => {
                self.store.scan_chunk(chunk).await.map(PeerResponse::Scan)
            }
        }
    }
}
