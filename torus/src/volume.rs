//! Volume I/O: an open volume as a [`BlockDevice`], mapping byte ranges onto
//! chunks.
//!
//! A request is split at chunk boundaries and each piece goes to the chunk's
//! [`ChunkIo`] at its byte offset inside the chunk — a 4 KiB write moves
//! 4 KiB, never a whole chunk. Pieces of one request run concurrently. The
//! chunk side is a trait so the same volume code serves a single node (its
//! local [`Replica`]) and, later, replicated chunks over a transport.

use crate::catalog::VolumeRecord;
use crate::replica::Replica;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::future::{join_all, try_join_all};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use torus_traits::{BlockDevice, ChunkRef, Epoch, Error, Result, VolumeId};

/// Where a volume's chunk I/O goes.
#[async_trait]
pub trait ChunkIo: Send + Sync + 'static {
    async fn read(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<Bytes>;
    async fn write(&self, chunk: ChunkRef, offset: u64, data: Bytes, epoch: Epoch) -> Result<()>;
    async fn zero(&self, chunk: ChunkRef, offset: u64, len: u64, epoch: Epoch) -> Result<()>;
    /// Durability barrier for everything written to `volume` so far.
    async fn flush(&self, volume: VolumeId, epoch: Epoch) -> Result<()>;
    /// Bring stale replicas up to date (replicated I/O); nothing to do for a
    /// single local replica.
    async fn resync(&self, _epoch: Epoch) -> Result<crate::replication::ResyncReport> {
        Ok(Default::default())
    }
    /// Move chunks towards the current ring for at most `budget` (see
    /// [`rebalance`](crate::rebalance)); a single local replica never moves.
    async fn rebalance(
        &self,
        _epoch: Epoch,
        _chunks: u64,
        _budget: std::time::Duration,
        _rate: u64,
    ) -> Result<crate::rebalance::RebalanceReport> {
        Ok(crate::rebalance::RebalanceReport {
            done: true,
            ..Default::default()
        })
    }
    /// Compare replicas and repair them (see [`scrub`](crate::scrub)).
    async fn scrub(&self, _epoch: Epoch, _rate: u64) -> Result<crate::scrub::ScrubReport> {
        Ok(Default::default())
    }
}

#[async_trait]
impl ChunkIo for Replica {
    async fn read(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<Bytes> {
        Replica::read(self, chunk, offset, len).await
    }
    async fn write(&self, chunk: ChunkRef, offset: u64, data: Bytes, epoch: Epoch) -> Result<()> {
        Replica::write(self, chunk, offset, data, epoch).await
    }
    async fn zero(&self, chunk: ChunkRef, offset: u64, len: u64, epoch: Epoch) -> Result<()> {
        Replica::zero(self, chunk, offset, len, epoch).await
    }
    async fn flush(&self, volume: VolumeId, epoch: Epoch) -> Result<()> {
        Replica::flush(self, volume, epoch).await
    }
}

/// One piece of a request: `len` bytes at `offset` in chunk `index`, which is
/// `buf_offset` bytes into the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub index: u64,
    pub offset: u64,
    pub buf_offset: u64,
    pub len: u64,
}

/// Split `[offset, offset+len)` at chunk boundaries.
pub fn pieces(offset: u64, len: u64, chunk_size: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let index = pos / chunk_size;
        let in_chunk = pos % chunk_size;
        let n = (chunk_size - in_chunk).min(end - pos);
        let piece = Piece {
            index,
            offset: in_chunk,
            buf_offset: pos - offset,
            len: n,
        };
        pos += n;
        Some(piece)
    })
}

/// The first error of several completed operations.
fn all_ok(results: Vec<Result<()>>) -> Result<()> {
    results.into_iter().collect()
}

/// Zeros written for `write_zeroes` without trimming, shared and never copied.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// An open volume.
pub struct Volume {
    record: VolumeRecord,
    chunk_size: u64,
    io: Arc<dyn ChunkIo>,
    read_only: bool,
    /// Set when this node lost the volume's lock (its lease lapsed): every
    /// further write is refused, since another node may now be the writer.
    fenced: AtomicBool,
}

impl Volume {
    pub fn new(
        record: VolumeRecord,
        chunk_size: u64,
        io: Arc<dyn ChunkIo>,
        read_only: bool,
    ) -> Self {
        Volume {
            record,
            chunk_size,
            io,
            read_only,
            fenced: AtomicBool::new(false),
        }
    }

    pub fn record(&self) -> &VolumeRecord {
        &self.record
    }

    /// Where this volume's chunk I/O goes.
    pub fn io(&self) -> Arc<dyn ChunkIo> {
        self.io.clone()
    }

    pub fn epoch(&self) -> Epoch {
        self.record.epoch
    }

    /// Refuse every further write: the lock is gone.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.record.size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "range {offset}+{len} is past the end of volume {:?} ({} bytes)",
                self.record.name, self.record.size
            ))),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(format!(
                "volume {:?} is open read-only",
                self.record.name
            )));
        }
        if self.fenced.load(Ordering::SeqCst) {
            return Err(Error::Fenced(format!(
                "this node lost the writer lock of volume {:?}",
                self.record.name
            )));
        }
        Ok(())
    }

    fn chunk(&self, index: u64) -> ChunkRef {
        ChunkRef::new(self.record.id, index)
    }

    async fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let epoch = self.epoch();
        all_ok(
            join_all(
                pieces(offset, len, self.chunk_size)
                    .map(|p| self.io.zero(self.chunk(p.index), p.offset, p.len, epoch)),
            )
            .await,
        )
    }

    async fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        let epoch = self.epoch();
        for p in pieces(offset, len, self.chunk_size) {
            let mut done = 0;
            while done < p.len {
                let n = (p.len - done).min(ZEROS.len() as u64);
                let data = Bytes::from_static(&ZEROS[..n as usize]);
                self.io
                    .write(self.chunk(p.index), p.offset + done, data, epoch)
                    .await?;
                done += n;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.record.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn multi_conn_safe(&self) -> bool {
        // Every handle of a volume on this node shares one ChunkIo, and its
        // flush covers everything written through it.
        true
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.check_range(offset, len)?;
        let mut parts = pieces(offset, len, self.chunk_size);
        let first = match parts.next() {
            Some(p) => p,
            None => return Ok(Bytes::new()),
        };
        let rest: Vec<Piece> = parts.collect();
        if rest.is_empty() {
            return self
                .io
                .read(self.chunk(first.index), first.offset, first.len)
                .await;
        }
        let bufs = try_join_all(
            std::iter::once(first)
                .chain(rest)
                .map(|p| self.io.read(self.chunk(p.index), p.offset, p.len)),
        )
        .await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for b in bufs {
            out.extend_from_slice(&b);
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        self.check_writable()?;
        let epoch = self.epoch();
        // join_all, not try_join_all: one failed piece must not cancel the
        // others half-way through their replication.
        all_ok(
            join_all(pieces(offset, len, self.chunk_size).map(|p| {
                let slice = data.slice(p.buf_offset as usize..(p.buf_offset + p.len) as usize);
                self.io.write(self.chunk(p.index), p.offset, slice, epoch)
            }))
            .await,
        )?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.check_range(offset, len)?;
        self.check_writable()?;
        if may_trim {
            self.zero_range(offset, len).await?;
        } else {
            self.write_zero_bytes(offset, len).await?;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check_range(offset, len)?;
        self.check_writable()?;
        self.zero_range(offset, len).await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.io.flush(self.record.id, self.epoch()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pieces_cover_the_range_exactly(offset in 0u64..1 << 30, len in 0u64..1 << 24, shift in 12u32..24) {
            let cs = 1u64 << shift;
            let mut expect = offset;
            let mut total = 0;
            for p in pieces(offset, len, cs) {
                prop_assert_eq!(p.index * cs + p.offset, expect);
                prop_assert!(p.offset + p.len <= cs);
                prop_assert!(p.len > 0);
                prop_assert_eq!(p.buf_offset, total);
                expect += p.len;
                total += p.len;
            }
            prop_assert_eq!(total, len);
        }
    }
}
