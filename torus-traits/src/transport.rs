//! `PeerTransport`: request/response messages between peers.
//!
//! A transport carries [`PeerRequest`]s to the peer listening at an address and
//! brings back its [`PeerResponse`] or error. Many requests may be in flight at
//! once, to one peer or many, and replies may come back in any order. Payloads
//! are [`Bytes`] so they travel without copies where the transport allows.
//! Errors raised by the remote handler arrive as the same [`Error`](crate::Error)
//! kind; failures to reach the peer are `Unavailable` or `Timeout`.

use crate::{ChunkRef, Epoch, Result, VolumeId};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

/// A request from one peer to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRequest {
    /// Liveness check; answered with `Pong`.
    Ping,
    /// Read a range of a chunk; answered with `Data`.
    Read {
        chunk: ChunkRef,
        offset: u64,
        len: u64,
    },
    /// Write at an offset of a chunk under the writer's epoch; answered with `Done`.
    Write {
        chunk: ChunkRef,
        offset: u64,
        data: Bytes,
        epoch: Epoch,
    },
    /// Zero a range of a chunk under the writer's epoch; answered with `Done`.
    Zero {
        chunk: ChunkRef,
        offset: u64,
        len: u64,
        epoch: Epoch,
    },
    /// Make every write received so far for `volume` durable; answered with `Done`.
    Flush { volume: VolumeId, epoch: Epoch },
    /// Remove a chunk under the writer's epoch (a writer that lost its
    /// lock cannot delete a copy its successor placed); answered with `Done`.
    DeleteChunk { chunk: ChunkRef, epoch: Epoch },
    /// The indices of the chunks of `volume` this peer holds; answered with
    /// `Chunks` (rebalancing finds what exists without reading holes).
    ListChunks { volume: VolumeId },
    /// Checksums of a chunk as stored; answered with `Scan` (scrub compares
    /// replicas without moving their data).
    ScanChunk { chunk: ChunkRef },
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerResponse {
    Pong,
    Data(Bytes),
    Done,
    /// Chunk indices, ascending.
    Chunks(Vec<u64>),
    Scan(crate::ChunkScan),
}

/// Serves requests arriving at a listening peer.
#[async_trait]
pub trait PeerHandler: Send + Sync + 'static {
    async fn handle(&self, request: PeerRequest) -> Result<PeerResponse>;
}

/// A bound listener. Dropping it stops accepting new requests.
pub trait PeerListener: Send + Sync {
    /// The address peers reach this listener at (with the real port when 0 was asked).
    fn local_addr(&self) -> String;
}

#[async_trait]
pub trait PeerTransport: Send + Sync + 'static {
    /// Start serving `handler` at `addr`.
    async fn listen(
        &self,
        addr: &str,
        handler: Arc<dyn PeerHandler>,
    ) -> Result<Box<dyn PeerListener>>;
    /// Send `request` to the peer at `addr` and wait for its reply.
    async fn call(&self, addr: &str, request: PeerRequest) -> Result<PeerResponse>;
}
