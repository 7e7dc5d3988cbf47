//! [`MemoryBlockStore`]: chunks kept in memory as sparse 4 KiB pages, for
//! tests and in-process clusters. Nothing survives the process; `flush` has
//! nothing to do.
//!
//! A page exists exactly while its block holds data, so the pool's used
//! space is the number of pages. Each chunk has its own lock, held for the
//! whole of an operation on it (copies in memory are short): operations on
//! different chunks run in parallel, and a write reserves, allocates and
//! copies atomically, so a write refused for lack of space changes nothing.
//!
//! It keeps no checksums (memory does not rot): `scan_chunk` checksums the
//! pages as they are and never reports a bad block.

use super::alloc::Space;
use super::sums::ZERO_CRC;
use super::{
    blocks_inside, blocks_touched, check_range, lock, partial_edges, read_lock, write_lock,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use torus_traits::{BlockStore, ChunkRef, ChunkScan, Result, VolumeId, SECTOR};

const PAGE: usize = SECTOR as usize;

/// A `BlockStore` in memory.
pub struct MemoryBlockStore {
    chunk_size: u64,
    capacity: u64,
    space: Space,
    chunks: RwLock<HashMap<ChunkRef, Arc<Mutex<MemChunk>>>>,
}

struct MemChunk {
    /// One slot per block; `Some` while the block holds data.
    pages: Vec<Option<Box<[u8]>>>,
    /// Number of `Some` pages.
    allocated: u64,
    /// Deleted: this entry is dead; the next user makes a fresh one.
    deleted: bool,
}

impl MemoryBlockStore {
    /// A store with chunks of `chunk_size` bytes and a pool of `capacity`
    /// bytes.
    ///
    /// # Panics
    ///
    /// If `chunk_size` is zero or not a multiple of [`SECTOR`]: that is a bug
    /// in the caller, not a runtime condition.
    pub fn new(chunk_size: u64, capacity: u64) -> Self {
        if let Err(e) = super::check_geometry(chunk_size) {
            panic!("MemoryBlockStore::new: {e}");
        }
        MemoryBlockStore {
            chunk_size,
            capacity,
            space: Space::new(capacity, 0),
            chunks: RwLock::new(HashMap::new()),
        }
    }

    fn lookup(&self, id: ChunkRef) -> Option<Arc<Mutex<MemChunk>>> {
        read_lock(&self.chunks).get(&id).cloned()
    }

    fn lookup_or_insert(&self, id: ChunkRef) -> Arc<Mutex<MemChunk>> {
        if let Some(chunk) = self.lookup(id) {
            return chunk;
        }
        let blocks = (self.chunk_size / SECTOR) as usize;
        write_lock(&self.chunks)
            .entry(id)
            .or_insert_with(|| {
                Arc::new(Mutex::new(MemChunk {
                    pages: (0..blocks).map(|_| None).collect(),
                    allocated: 0,
                    deleted: false,
                }))
            })
            .clone()
    }

    /// Drops a dead entry from the table (if it is still the one there).
    fn forget(&self, id: ChunkRef, chunk: &Arc<Mutex<MemChunk>>) {
        let mut chunks = write_lock(&self.chunks);
        if chunks.get(&id).is_some_and(|c| Arc::ptr_eq(c, chunk)) {
            chunks.remove(&id);
        }
    }
}

impl std::fmt::Debug for MemoryBlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBlockStore")
            .field("chunk_size", &self.chunk_size)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Calls `f(page index, range in page, range in buffer)` for each block
/// touched by `[offset, offset+len)`.
fn for_pages(
    offset: u64,
    len: u64,
    mut f: impl FnMut(usize, std::ops::Range<usize>, std::ops::Range<usize>),
) {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let page = (pos / SECTOR) as usize;
        let in_page = (pos % SECTOR) as usize;
        let n = ((SECTOR - pos % SECTOR).min(end - pos)) as usize;
        let at = (pos - offset) as usize;
        f(page, in_page..in_page + n, at..at + n);
        pos += n as u64;
    }
}

#[async_trait]
impl BlockStore for MemoryBlockStore {
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    async fn used(&self) -> Result<u64> {
        Ok(self.space.used_bytes())
    }

    async fn read(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<Bytes> {
        check_range(chunk, offset, len, self.chunk_size)?;
        let mut buf = vec![0u8; len as usize];
        if let Some(c) = self.lookup(chunk) {
            let c = lock(&c);
            if !c.deleted {
                for_pages(offset, len, |page, src, dst| {
                    if let Some(p) = &c.pages[page] {
                        buf[dst].copy_from_slice(&p[src]);
                    }
                });
            }
        }
        Ok(Bytes::from(buf))
    }

    async fn write(&self, chunk: ChunkRef, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        check_range(chunk, offset, len, self.chunk_size)?;
        if len == 0 {
            return Ok(());
        }
        loop {
            let entry = self.lookup_or_insert(chunk);
            let mut c = lock(&entry);
            if c.deleted {
                drop(c);
                self.forget(chunk, &entry);
                continue;
            }
            let blocks = blocks_touched(offset, len);
            let new = c.pages[blocks.start as usize..blocks.end as usize]
                .iter()
                .filter(|p| p.is_none())
                .count() as u64;
            if let Err(e) = self.space.reserve(new, chunk) {
                if c.allocated == 0 {
                    c.deleted = true;
                    drop(c);
                    self.forget(chunk, &entry);
                }
                return Err(e);
            }
            c.allocated += new;
            for_pages(offset, len, |page, dst, src| {
                c.pages[page].get_or_insert_with(|| vec![0u8; PAGE].into_boxed_slice())[dst]
                    .copy_from_slice(&data[src]);
            });
            return Ok(());
        }
    }

    async fn zero(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<()> {
        check_range(chunk, offset, len, self.chunk_size)?;
        if len == 0 {
            return Ok(());
        }
        let Some(entry) = self.lookup(chunk) else {
            return Ok(());
        };
        let mut c = lock(&entry);
        if c.deleted {
            return Ok(());
        }
        let mut freed = 0;
        for page in blocks_inside(offset, len) {
            freed += u64::from(c.pages[page as usize].take().is_some());
        }
        for (off, n) in partial_edges(offset, len) {
            if n > 0 {
                let in_page = (off % SECTOR) as usize;
                if let Some(p) = &mut c.pages[(off / SECTOR) as usize] {
                    p[in_page..in_page + n as usize].fill(0);
                }
            }
        }
        c.allocated -= freed;
        self.space.release(freed);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn delete_chunk(&self, chunk: ChunkRef) -> Result<()> {
        let Some(entry) = self.lookup(chunk) else {
            return Ok(());
        };
        {
            let mut c = lock(&entry);
            if !c.deleted {
                c.deleted = true;
                self.space.release(c.allocated);
                c.allocated = 0;
                c.pages = Vec::new();
            }
        }
        self.forget(chunk, &entry);
        Ok(())
    }

    async fn list_chunks(&self) -> Result<Vec<ChunkRef>> {
        let mut list: Vec<ChunkRef> = read_lock(&self.chunks)
            .iter()
            .filter(|(_, c)| lock(c).allocated > 0)
            .map(|(id, _)| *id)
            .collect();
        list.sort_unstable();
        Ok(list)
    }

    async fn scan_chunk(&self, chunk: ChunkRef) -> Result<ChunkScan> {
        let mut crcs = vec![ZERO_CRC; (self.chunk_size / SECTOR) as usize];
        if let Some(c) = self.lookup(chunk) {
            let c = lock(&c);
            if !c.deleted {
                for (crc, page) in crcs.iter_mut().zip(&c.pages) {
                    if let Some(page) = page {
                        *crc = torus_traits::storage::crc32c(page);
                    }
                }
            }
        }
        Ok(ChunkScan {
            crcs,
            bad: Vec::new(),
        })
    }

    async fn delete_volume(&self, volume: VolumeId) -> Result<()> {
        let ids: Vec<ChunkRef> = read_lock(&self.chunks)
            .keys()
            .filter(|c| c.volume == volume)
            .copied()
            .collect();
        for id in ids {
            self.delete_chunk(id).await?;
        }
        Ok(())
    }
}
