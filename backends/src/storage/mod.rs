//! `BlockStore` implementations.
//!
//! - [`MemoryBlockStore`]: chunks as sparse 4 KiB pages in memory; for tests
//!   and in-process clusters.
//! - [`FileBlockStore`]: one sparse file per chunk, positional I/O
//!   (`pread`/`pwrite`) on cached descriptors, holes punched to free space.
//! - [`MmapBlockStore`]: the same files and accounting as `FileBlockStore`,
//!   with I/O through a shared memory mapping of each chunk file.
//! - [`ObjectBlockStore`]: chunks as sparse objects in any `object_store`
//!   (local filesystem, memory, S3), behind a local write-back cache; FLUSH
//!   means the data is in the object store.
//! - [`FaultyBlockStore`]: a decorator for tests that fails, delays or
//!   corrupts operations, rots stored bits, and simulates power loss by
//!   dropping everything not yet flushed.
//!
//! The file and mmap stores share everything but the I/O itself
//! (`chunk_dir`): the on-disk layout `<dir>/<volume>/<index>`, the exact
//! per-chunk allocation bitmaps, capacity reservation, a crc32c per 4 KiB
//! block checked on every read (`Corrupt` on a mismatch) and kept consistent
//! across crashes by a dirty log (`sums`), the descriptor cache and the flush
//! protocol. Each runs its blocking system calls on tokio's blocking pool.
//! The memory store needs no checksums (memory does not rot) and the object
//! store leaves integrity to the object store.
//!
//! All of them account space in [`SECTOR`]-sized (4 KiB) blocks: a block is
//! "used" from the first write that touches it until a `zero` covering all of
//! it, or `delete_chunk`. A chunk is listed by `list_chunks` while it holds at
//! least one used block.

mod alloc;
mod chunk_dir;
pub mod faulty;
pub mod file;
pub mod memory;
pub mod mmap;
pub mod object;
mod sums;
mod sys;

pub use faulty::{FaultControl, FaultyBlockStore};
pub use file::FileBlockStore;
pub use memory::MemoryBlockStore;
pub use mmap::MmapBlockStore;
pub use object::ObjectBlockStore;

use std::ops::Range;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use torus_traits::{ChunkRef, Error, Result, SECTOR};

/// Locks a mutex, recovering from poisoning. Critical sections in this module
/// only update counters and flags and never panic half-way, so the data
/// behind a poisoned lock is still consistent; failing every later request
/// instead would turn one bug into an outage.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// [`lock`] for the read side of an `RwLock`.
fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// [`lock`] for the write side of an `RwLock`.
fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Checks a store's geometry: chunks are a whole, non-zero number of blocks
/// and small enough to be addressed in memory.
fn check_geometry(chunk_size: u64) -> Result<()> {
    // SECTOR is a power of two (and `is_multiple_of` is newer than our MSRV).
    if chunk_size == 0 || chunk_size & (SECTOR - 1) != 0 {
        return Err(Error::InvalidArgument(format!(
            "chunk size {chunk_size} is not a non-zero multiple of {SECTOR}"
        )));
    }
    if usize::try_from(chunk_size).is_err() {
        return Err(Error::InvalidArgument(format!(
            "chunk size {chunk_size} does not fit in memory"
        )));
    }
    Ok(())
}

/// `InvalidArgument` unless `[offset, offset+len)` lies inside a chunk.
fn check_range(chunk: ChunkRef, offset: u64, len: u64, chunk_size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= chunk_size => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "range {offset}+{len} of chunk {chunk} is past the chunk size {chunk_size}"
        ))),
    }
}

/// The blocks touched by a non-empty byte range.
fn blocks_touched(offset: u64, len: u64) -> Range<u64> {
    offset / SECTOR..(offset + len).div_ceil(SECTOR)
}

/// The blocks lying wholly inside a byte range (possibly empty).
fn blocks_inside(offset: u64, len: u64) -> Range<u64> {
    let first = offset.div_ceil(SECTOR);
    let end = (offset + len) / SECTOR;
    first..end.max(first)
}

/// The bytes of `[offset, offset+len)` that fall in blocks only partly
/// covered by it: at most two pieces, as `(offset, len)`, either may be empty.
fn partial_edges(offset: u64, len: u64) -> [(u64, u64); 2] {
    let end = offset + len;
    let inside = blocks_inside(offset, len);
    if inside.is_empty() {
        // No whole block inside: one piece per touched block (one or two).
        let boundary = offset.div_ceil(SECTOR) * SECTOR;
        if boundary > offset && boundary < end {
            [(offset, boundary - offset), (boundary, end - boundary)]
        } else {
            [(offset, len), (end, 0)]
        }
    } else {
        let inner_start = inside.start * SECTOR;
        let inner_end = inside.end * SECTOR;
        [(offset, inner_start - offset), (inner_end, end - inner_end)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(blocks_touched(0, 1), 0..1);
        assert_eq!(blocks_touched(4095, 2), 0..2);
        assert_eq!(blocks_touched(4096, 4096), 1..2);
        assert_eq!(blocks_inside(0, 4096), 0..1);
        assert_eq!(blocks_inside(1, 4096), 1..1);
        assert_eq!(blocks_inside(1, 8191), 1..2);
        assert_eq!(partial_edges(0, 4096), [(0, 0), (4096, 0)]);
        assert_eq!(partial_edges(10, 20), [(10, 20), (30, 0)]);
        assert_eq!(partial_edges(4000, 1000), [(4000, 96), (4096, 904)]);
        assert_eq!(partial_edges(4000, 96), [(4000, 96), (4096, 0)]);
        assert_eq!(partial_edges(100, 8192), [(100, 3996), (8192, 100)]);
        assert_eq!(partial_edges(4096, 5000), [(4096, 0), (8192, 904)]);
    }

    #[test]
    fn range_checks() {
        let c = ChunkRef::new(torus_traits::VolumeId(1), 0);
        assert!(check_range(c, 0, 4096, 4096).is_ok());
        assert!(check_range(c, 4096, 0, 4096).is_ok());
        assert!(check_range(c, 4096, 1, 4096).is_err());
        assert!(check_range(c, u64::MAX, 2, 4096).is_err());
        assert!(check_geometry(0).is_err());
        assert!(check_geometry(4097).is_err());
        assert!(check_geometry(1 << 20).is_ok());
    }
}
