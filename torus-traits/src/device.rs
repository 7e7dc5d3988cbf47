//! What frontends see of the engine, and how a frontend runs.
//!
//! A frontend (the NBD server, the FlexVolume driver) knows volumes only as
//! [`BlockDevice`]s handed out by a [`VolumeProvider`]; it never sees chunks,
//! replicas or metadata. A [`Frontend`] is a long-running service the node
//! starts and stops.
//!
//! `BlockDevice` semantics (checked by `conformance::block_device`):
//! - Byte-addressed; any range inside `[0, size)` may be read or written
//!   (no alignment required). A range past the end is `InvalidArgument`.
//! - Unwritten ranges read as zeros; `write_zeroes` and `trim` make a range
//!   read as zeros (`trim` frees space; `write_zeroes` frees it too unless
//!   `may_trim` is false).
//! - `flush` returns only when every write completed before it on *any* handle
//!   of this volume on this node is durable (so `CAN_MULTI_CONN` is honest when
//!   `multi_conn_safe` is true). `fua` makes one write durable before it returns.
//! - A read-only device refuses writes with `ReadOnly`.

use crate::Result;
use async_trait::async_trait;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;

/// One open volume as a flat array of bytes.
#[async_trait]
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// True when writes are refused.
    fn read_only(&self) -> bool;
    /// The block size I/O works best at (and the minimum without read-modify-write).
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    /// True when a `flush` on one handle covers writes made through every
    /// handle of this volume (NBD `CAN_MULTI_CONN`).
    fn multi_conn_safe(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes>;
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()>;
    /// Make a range read as zeros. With `may_trim` false, the space stays allocated.
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()>;
    /// Discard a range: it reads as zeros afterwards and its space is freed.
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    /// Durability barrier (see module docs).
    async fn flush(&self) -> Result<()>;
}

/// What a frontend can list about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub description: String,
}

/// Hands out volumes by name.
#[async_trait]
pub trait VolumeProvider: Send + Sync + 'static {
    /// Every volume a client may open.
    async fn list(&self) -> Result<Vec<ExportInfo>>;
    /// Describe one volume without opening it (`NotFound` if absent).
    async fn info(&self, name: &str) -> Result<ExportInfo>;
    /// Open a volume. A writable open takes the volume's writer lock for this
    /// node (shared by every handle on this node); it is released when the last
    /// handle is dropped. Fails with `Locked` (naming the holder) when another
    /// node holds it.
    async fn open(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>>;
}

/// A stop signal for services: the value turns `true` when they must stop.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;

/// A long-running frontend service.
#[async_trait]
pub trait Frontend: Send + Sync {
    /// A short name for logs ("nbd").
    fn name(&self) -> &str;
    /// The address it listens on, if any.
    fn local_addr(&self) -> Option<SocketAddr>;
    /// Serve until `shutdown` turns true, then stop accepting, let in-flight
    /// requests finish (flushing what they wrote), and return.
    async fn serve(&self, shutdown: Shutdown) -> Result<()>;
}
