//! The replica side of chunk I/O: a node's [`BlockStore`] guarded by epoch
//! fencing.
//!
//! Every write and zero carries the writer's epoch. A replica remembers the
//! highest epoch it has seen per volume and refuses anything older with
//! `Fenced`, so a writer that lost its lock cannot change data after a new
//! writer has started. The same `Replica` serves local I/O directly and, as a
//! [`PeerHandler`], requests that arrive from other peers over a transport.

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use torus_traits::{
    BlockStore, ChunkRef, Epoch, Error, PeerHandler, PeerRequest, PeerResponse, Result, VolumeId,
};

/// A node's chunk store with epoch fencing.
pub struct Replica {
    store: Arc<dyn BlockStore>,
    epochs: Mutex<HashMap<VolumeId, Epoch>>,
}

impl Replica {
    pub fn new(store: Arc<dyn BlockStore>) -> Self {
        Replica {
            store,
            epochs: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Arc<dyn BlockStore> {
        &self.store
    }

    /// Admit an operation at `epoch`: raise the volume's epoch to it, or refuse
    /// it when a newer writer has been seen.
    fn admit(&self, volume: VolumeId, epoch: Epoch) -> Result<()> {
        let mut epochs = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        let seen = epochs.entry(volume).or_default();
        if epoch < *seen {
            return Err(Error::Fenced(format!(
                "volume {volume} is now written at epoch {}; epoch {} is stale",
                seen.0, epoch.0
            )));
        }
        *seen = epoch;
        Ok(())
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
        self.admit(chunk.volume, epoch)?;
        self.store.write(chunk, offset, data).await
    }

    pub async fn zero(&self, chunk: ChunkRef, offset: u64, len: u64, epoch: Epoch) -> Result<()> {
        self.admit(chunk.volume, epoch)?;
        self.store.zero(chunk, offset, len).await
    }

    pub async fn flush(&self, volume: VolumeId, epoch: Epoch) -> Result<()> {
        self.admit(volume, epoch)?;
        self.store.flush().await
    }

    /// Free a deleted volume's chunks and forget its epoch.
    pub async fn drop_volume(&self, volume: VolumeId) -> Result<()> {
        self.store.delete_volume(volume).await?;
        self.epochs
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
            PeerRequest::DeleteChunk { chunk } => self
                .store
                .delete_chunk(chunk)
                .await
                .map(|_| PeerResponse::Done),
        }
    }
}
