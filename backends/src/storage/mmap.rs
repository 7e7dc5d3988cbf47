//! [`MmapBlockStore`]: the chunk files of [`FileBlockStore`](super::FileBlockStore)
//! (same layout, same accounting and checksums, same directory can be opened
//! by either), with data moved through a shared memory mapping of each chunk
//! file.
//!
//! Each chunk file is extended (sparsely) to `chunk_size` and mapped whole
//! when first used; the mapping is cached like the file store's descriptors.
//!
//! - Reads copy out of the mapping only the blocks the allocation bitmap says
//!   hold data; the rest of the buffer stays zero. Touching a hole through a
//!   shared mapping would allocate a page on some file systems (tmpfs), which
//!   would then count as used when the store is reopened.
//! - A store into a mapped page dirties the whole page-cache folio holding it,
//!   and writeback then allocates every block of the folio, holes included.
//!   On current kernels page faults on a mapping create one-page folios
//!   (unless the mapping is `MADV_HUGEPAGE`, which it is not), but buffered
//!   I/O by others, such as a `FileBlockStore` on the same directory
//!   earlier, leaves large folios (ext4 since Linux 6.16), which would make
//!   the bitmap undercount what is on disk. So the clean cached pages of a file are dropped before it is
//!   mapped. The test `mmap_neighbouring_holes_stay_holes` checks the
//!   outcome.
//! - Writes that allocate new blocks first `fallocate` them: storing into a
//!   hole of a mapping when the disk is full raises `SIGBUS` and kills the
//!   process, whereas `fallocate` fails cleanly with `ENOSPC` (`NoSpace`).
//! - `zero` punches holes through the descriptor, which also drops the mapped
//!   pages, and overwrites partial blocks in the mapping.
//! - `flush` is `fdatasync` of the file, not `msync`: on Linux `msync(MS_SYNC)`
//!   of a shared file mapping is implemented as `vfs_fsync_range(.., datasync)`
//!   over the range, so syncing the whole file is the same barrier, needs no
//!   access to the mapping (so no lock that writers wait on), and keeps flush
//!   shared with the file store.
//!
//! Concurrency: each mapping sits behind a read-write lock: reads of a chunk
//! run in parallel, writes to one chunk take turns for the copy itself
//! (writes to different chunks do not). Copying under a lock keeps this free
//! of `unsafe` beyond creating the mapping; parallel writers into one mapping
//! would need raw-pointer copies.
//!
//! Caveats of any mmap store: an I/O error reading a mapped page raises
//! `SIGBUS` (pages are only read for blocks that hold data), and another
//! process truncating a chunk file while it is mapped does too.

use super::alloc::Bitmap;
use super::chunk_dir::{chunk_dir_block_store, ChunkDir, ChunkIo};
use super::{read_lock, sys, write_lock};
use memmap2::{MmapMut, MmapOptions};
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};
use torus_traits::{Result, SECTOR};

/// A `BlockStore` keeping each chunk in its own sparse file under one
/// directory, accessed through memory mappings.
pub struct MmapBlockStore {
    dir: Arc<ChunkDir<MappedChunk>>,
}

impl MmapBlockStore {
    /// Opens the store in `dir` (created if missing) with chunks of
    /// `chunk_size` bytes (a non-zero multiple of 4 KiB) and a pool of
    /// `capacity` bytes, rebuilding the space accounting from the chunk files
    /// already there. A capacity smaller than what is already used is
    /// accepted: writes needing new space then fail with `NoSpace`.
    pub fn open(dir: &Path, chunk_size: u64, capacity: u64) -> Result<Self> {
        Ok(MmapBlockStore {
            dir: Arc::new(ChunkDir::open(dir, chunk_size, capacity)?),
        })
    }

    /// The directory holding the chunk files.
    pub fn dir(&self) -> &Path {
        self.dir.root()
    }

    /// How many chunk files are kept mapped (and open) at most (more may be,
    /// while they have unflushed writes).
    pub fn open_files_limit(&self) -> usize {
        self.dir.open_files_limit()
    }

    /// Changes the mapping cache's limit (at least 1).
    pub fn set_open_files_limit(&self, limit: usize) {
        self.dir.set_open_files_limit(limit)
    }
}

impl std::fmt::Debug for MmapBlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmapBlockStore")
            .field("dir", &self.dir.root())
            .field("chunk_size", &self.dir.chunk_size())
            .field("capacity", &self.dir.capacity())
            .finish()
    }
}

chunk_dir_block_store!(MmapBlockStore);

/// An open, mapped chunk file.
pub(crate) struct MappedChunk {
    file: File,
    map: RwLock<MmapMut>,
}

impl MappedChunk {
    fn range(offset: u64, len: usize) -> std::ops::Range<usize> {
        // In range: offset + len <= chunk_size, which fits in usize.
        offset as usize..offset as usize + len
    }
}

impl ChunkIo for MappedChunk {
    fn open(file: File, chunk_size: u64) -> io::Result<Self> {
        if file.metadata()?.len() < chunk_size {
            // Sparse: no blocks are allocated by growing the file.
            file.set_len(chunk_size)?;
        }
        let len = usize::try_from(chunk_size)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a shared read-write mapping of a chunk file this store owns.
        // The store never truncates a mapped file (delete unlinks it, which
        // keeps the inode alive until unmapped) and the file is at least
        // `len` bytes long, so every mapped page is backed. All access goes
        // through the `RwLock`, so Rust never holds aliasing references, and
        // hole punching takes the write lock. What no mapping can rule out is
        // another process modifying or truncating the file; the chunk
        // directory must belong to this store alone.
        // Best effort (see the module docs); without it only the exactness
        // of the accounting can suffer.
        sys::drop_cached_pages(&file);
        let map = unsafe { MmapOptions::new().len(len).map_mut(&file)? };
        Ok(MappedChunk {
            file,
            map: RwLock::new(map),
        })
    }

    fn file(&self) -> &File {
        &self.file
    }

    fn read(&self, offset: u64, buf: &mut [u8], alloc: &Bitmap) -> io::Result<()> {
        let map = read_lock(&self.map);
        // Copy runs of blocks holding data; holes stay zero in `buf`.
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let block = pos / SECTOR;
            let block_end = ((block + 1) * SECTOR).min(end);
            if !alloc.get(block) {
                pos = block_end;
                continue;
            }
            let mut run_end = block_end;
            while run_end < end && alloc.get(run_end / SECTOR) {
                run_end = ((run_end / SECTOR + 1) * SECTOR).min(end);
            }
            let dst = (pos - offset) as usize..(run_end - offset) as usize;
            buf[dst].copy_from_slice(&map[Self::range(pos, (run_end - pos) as usize)]);
            pos = run_end;
        }
        Ok(())
    }

    fn read_block_inline(&self, offset: u64, buf: &mut [u8], alloc: &Bitmap) -> io::Result<bool> {
        // The write that follows stores into this page, which faults it in
        // if it is not resident: reading it first waits for nothing more.
        self.read(offset, buf, alloc).map(|()| true)
    }

    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // Allocate before storing into holes: ENOSPC here is an error; during
        // the copy it would be SIGBUS.
        let start = offset / SECTOR * SECTOR;
        let end = (offset + len).div_ceil(SECTOR) * SECTOR;
        match sys::allocate(&self.file, start, end - start) {
            Err(e) if sys::is_unsupported(&e) => Ok(()),
            other => other,
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        write_lock(&self.map)[Self::range(offset, data.len())].copy_from_slice(data);
        Ok(())
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        write_lock(&self.map)[Self::range(offset, len as usize)].fill(0);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // Under the write lock: the punch changes mapped bytes, which no
        // reader may be borrowing meanwhile.
        let _map = write_lock(&self.map);
        sys::punch_hole(&self.file, offset, len)
    }
}
