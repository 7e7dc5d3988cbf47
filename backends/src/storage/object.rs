//! [`ObjectBlockStore`]: chunks as objects in an object store (S3, a local
//! directory, memory: anything behind the `object_store` crate's
//! [`ObjectStore`] trait), with a local write-back cache that absorbs small
//! writes between flushes.
//!
//! # On-object layout
//!
//! Chunk `index` of volume `volume` is the object `<prefix>/<volume>/<index>`
//! (both decimal). Objects under the prefix with other names are ignored, so
//! other data may live beside the chunks. An object is *sparse*: a header
//! saying which 4 KiB blocks hold data, then only those blocks:
//!
//! ```text
//! 0   magic "TORUSCHK"                      8 bytes
//! 8   version = 1                           u32 little-endian
//! 12  flags = 0 (reserved)                  u32 little-endian
//! 16  chunk size in bytes                   u64 little-endian
//! 24  number of blocks holding data (n)     u64 little-endian
//! 32  allocation bitmap: bit b (byte b/8, least significant bit first) is
//!     set when block b holds data           ceil(chunk_size / 4096 / 8) bytes
//! H   the n blocks holding data, in ascending order, 4096 bytes each
//! ```
//!
//! `H` is 64 bytes for 1 MiB chunks and 160 for 4 MiB ones. Why sparse:
//! thin provisioning survives the trip to the object store (a chunk with one
//! 4 KiB block written is a ~4 KiB object, not a whole chunk of zeros), and
//! the header is everything needed to rebuild the space accounting, so
//! opening a store is one LIST plus one small ranged GET per object, and the
//! object's size (known from the LIST) is checked against the header. A run
//! of consecutive blocks holding data is contiguous in the object, so a read
//! of a clean chunk is one ranged GET per run (`get_ranges` coalesces them).
//! A chunk that holds no data has no object.
//!
//! # Write-back cache
//!
//! Object stores only replace whole objects, so writing through would upload
//! a whole chunk per 4 KiB write (the original Torus's read-modify-write, made
//! worse by the network). Instead a chunk that is written becomes *cached*: its
//! content lives in a sparse file `<cache_dir>/chunk-<volume>-<index>`, and
//! writes and zeros are `pwrite`s and hole punches on that file. `flush`
//! uploads every chunk changed since the last flush (one PUT per chunk, or a
//! DELETE when it no longer holds data), at most
//! [`upload_concurrency`](ObjectBlockStore::upload_concurrency) at a time, and
//! then drops its cache file, so the cache holds only data not yet uploaded.
//!
//! A chunk becomes cached *whole*: the first write (or partial zero) to a
//! chunk that has an object downloads that object once and writes its blocks
//! into the cache file. The alternative, fetching blocks lazily, costs the
//! same bytes (the next upload needs every block anyway) but lets a chunk's
//! content be split between the cache and an object that an upload may be
//! replacing at that moment; with whole chunks, a cached chunk is read only
//! from its cache file and a clean chunk only from its object, and the
//! object of a chunk changes only while it is cached, so reads never race
//! with uploads. The price is one GET of the chunk (of its data, not its
//! full size) before the first write to it after each flush.
//!
//! The cache is on disk rather than in memory because dirty data between two
//! flushes can be large (a kernel NBD client flushes when the file system
//! above it asks, which may be gigabytes later). It needs no limit of its
//! own: cached data is always data of the pool, so the cache holds at most
//! `capacity` bytes (in practice only what changed since the last flush).
//! Cache files are opened for each operation rather than kept open, so many
//! dirty chunks cannot exhaust file descriptors. The cache is not durable:
//! on open, cache files left by an earlier run are deleted, since only what
//! was flushed is promised. One store per cache directory.
//!
//! # Accounting
//!
//! Each chunk has an allocation bitmap (the shared [`Bitmap`]) and the pool a
//! block counter ([`Space`]), exactly as in the other stores: a write
//! reserves the blocks it newly touches before changing anything (`NoSpace`
//! otherwise), `zero` frees the whole blocks inside its range, `delete_chunk`
//! frees the chunk. On open both are rebuilt from the object headers.
//! `list_chunks` answers from this index (the objects plus chunks written
//! but not yet uploaded, less chunks emptied but not yet uploaded) without a
//! LIST: the store assumes it is the only writer of its prefix.
//!
//! # Concurrency
//!
//! Each chunk has an async read-write lock: reads share it; writes, zeros
//! and the snapshot and commit steps of an upload take it exclusively (so
//! writes to one chunk are serialised, and reads run in parallel with each
//! other). The PUT itself runs without it, so writes continue during an
//! upload; a chunk written meanwhile stays dirty for the next flush. A
//! second per-chunk lock, held for the whole upload, makes `delete_chunk`
//! wait for an upload in progress, so a deleted chunk is never brought back
//! by an upload finishing after it. Flushes run one at a time. `delete_chunk`
//! deletes the object at once.
//!
//! # Errors
//!
//! Object store failures are `Unavailable` (or `Unsupported`, or
//! `InvalidArgument` for a bad path) naming the object; a missing object
//! reads as zeros. A failed upload leaves its chunk dirty, so the next flush
//! tries again. An object whose header does not decode or does not match its
//! size is `Corrupt`, and makes `open` fail rather than lose data silently.
//!
//! # Checksums
//!
//! None of its own: `scan_chunk` is the trait's default (it reads the chunk
//! and reports its crc32c per 4 KiB block, never a bad block). Object stores
//! check the integrity of what they store themselves (S3 checksums every
//! object on upload and at rest), and the local cache holds only data not
//! yet uploaded, for one flush interval.

use super::alloc::{Bitmap, Space};
use super::chunk_dir::pwrite_zeros;
use super::{
    blocks_inside, blocks_touched, check_geometry, check_range, lock, partial_edges, read_lock,
    sys, write_lock,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{Mutex as AsyncMutex, RwLock as AsyncRwLock};
use torus_traits::{BlockStore, ChunkRef, Error, Result, VolumeId, SECTOR};

const MAGIC: &[u8; 8] = b"TORUSCHK";
const VERSION: u32 = 1;
/// Bytes of the header before the bitmap.
const FIXED_HEADER: u64 = 32;
/// Uploads (and header reads on open) in flight at once, by default.
const DEFAULT_CONCURRENCY: usize = 8;
/// Prefix of cache file names.
const CACHE_PREFIX: &str = "chunk-";

/// A `BlockStore` keeping each chunk as a sparse object in an
/// [`ObjectStore`], with a local write-back cache (see the module docs).
pub struct ObjectBlockStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    cache_dir: PathBuf,
    chunk_size: u64,
    capacity: u64,
    blocks_per_chunk: u64,
    space: Space,
    chunks: RwLock<HashMap<ChunkRef, Arc<Chunk>>>,
    /// Chunks changed since the last flush took them.
    dirty: Mutex<HashMap<ChunkRef, Arc<Chunk>>>,
    /// Serialises flushes.
    flush_lock: AsyncMutex<()>,
    upload_concurrency: AtomicUsize,
}

/// One chunk known to the store.
struct Chunk {
    id: ChunkRef,
    key: ObjectPath,
    cache_path: PathBuf,
    /// Which blocks hold data; changed only under `state`'s write lock.
    alloc: Bitmap,
    /// Number of set bits in `alloc` (for listing without locking).
    allocated: AtomicU64,
    state: AsyncRwLock<ChunkState>,
    /// Held for the whole of an upload; `delete_chunk` waits for it.
    upload: AsyncMutex<()>,
}

#[derive(Default)]
struct ChunkState {
    /// An object exists for the chunk (as of open or the last upload).
    remote: bool,
    /// The content is in the cache: the cache file (if `file`) holds every
    /// block holding data, and everything else reads as zeros. Otherwise the
    /// content is the object, laid out by `alloc`.
    cached: bool,
    /// The cache file may exist.
    file: bool,
    /// Bumped by every change; the chunk is dirty while `gen != uploaded`.
    gen: u64,
    uploaded: u64,
    /// Deleted: this entry is dead; the next user makes a fresh one.
    deleted: bool,
}

/// Where to find the bytes of a read in a clean chunk's object.
struct RemotePiece {
    /// Byte range in the object.
    object: Range<u64>,
    /// Offset in the read buffer.
    at: usize,
}

impl ObjectBlockStore {
    /// Opens the store kept under `prefix` in `store`, with chunks of
    /// `chunk_size` bytes (a non-zero multiple of 4 KiB), a pool of
    /// `capacity` bytes and its write-back cache in `cache_dir` (created if
    /// missing; cache files left there by an earlier run are deleted). The
    /// space accounting is rebuilt from the objects' headers. A capacity
    /// smaller than what is already used is accepted: writes needing new
    /// space then fail with `NoSpace`.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        cache_dir: &Path,
        chunk_size: u64,
        capacity: u64,
    ) -> Result<Self> {
        check_geometry(chunk_size)?;
        let prefix = ObjectPath::parse(prefix)
            .map_err(|e| Error::InvalidArgument(format!("object store prefix {prefix:?}: {e}")))?;
        let dir = cache_dir.to_path_buf();
        blocking(format!("preparing cache {}", dir.display()), move || {
            clear_cache_dir(&dir)
        })
        .await?;
        let blocks_per_chunk = chunk_size / SECTOR;
        let store = ObjectBlockStore {
            store,
            prefix,
            cache_dir: cache_dir.to_path_buf(),
            chunk_size,
            capacity,
            blocks_per_chunk,
            space: Space::new(capacity, 0),
            chunks: RwLock::new(HashMap::new()),
            dirty: Mutex::new(HashMap::new()),
            flush_lock: AsyncMutex::new(()),
            upload_concurrency: AtomicUsize::new(DEFAULT_CONCURRENCY),
        };
        store.load().await?;
        Ok(store)
    }

    /// Opens a store from a URL, with [`object_store::parse_url_opts`]:
    /// `memory://` (a new, empty in-memory store), `file:///some/dir` (a local
    /// directory) or `s3://bucket/some/prefix`. The URL's path is the prefix.
    /// S3 settings and credentials come from the `AWS_*` environment
    /// variables, as `AmazonS3Builder::from_env` reads them (and, failing
    /// those, from the instance's or container's credential provider).
    pub async fn from_url(
        url: &str,
        cache_dir: &Path,
        chunk_size: u64,
        capacity: u64,
    ) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::InvalidArgument(format!("object store URL {url:?}: {e}")))?;
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with("AWS_"))
            .collect();
        let (store, prefix) = object_store::parse_url_opts(&parsed, env)
            .map_err(|e| Error::InvalidArgument(format!("object store URL {url:?}: {e}")))?;
        Self::open(
            Arc::from(store),
            prefix.as_ref(),
            cache_dir,
            chunk_size,
            capacity,
        )
        .await
    }

    /// The object store holding the chunks.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The prefix of every chunk object.
    pub fn prefix(&self) -> &ObjectPath {
        &self.prefix
    }

    /// The write-back cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The object holding `chunk` (once uploaded): `<prefix>/<volume>/<index>`.
    pub fn object_path(&self, chunk: ChunkRef) -> ObjectPath {
        self.prefix
            .clone()
            .join(chunk.volume.0.to_string().as_str())
            .join(chunk.index.to_string().as_str())
    }

    /// How many uploads a flush runs at once.
    pub fn upload_concurrency(&self) -> usize {
        self.upload_concurrency.load(Ordering::Relaxed)
    }

    /// Changes how many uploads a flush runs at once (at least 1).
    pub fn set_upload_concurrency(&self, n: usize) {
        self.upload_concurrency.store(n.max(1), Ordering::Relaxed);
    }

    /// Number of chunks changed since the last flush (uploaded by the next).
    pub fn dirty_chunks(&self) -> usize {
        lock(&self.dirty).len()
    }

    fn header_len(&self) -> u64 {
        FIXED_HEADER + self.blocks_per_chunk.div_ceil(8)
    }

    /// Rebuilds the chunk index and the accounting from the objects.
    async fn load(&self) -> Result<()> {
        let prefix = self.prefix.clone();
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| object_error("listing", &prefix, e))?;
        let found: Vec<(ChunkRef, u64)> = metas
            .iter()
            .filter_map(|m| {
                let parts: Vec<_> = m.location.prefix_match(&prefix)?.collect();
                match parts.as_slice() {
                    [v, i] => Some((
                        ChunkRef::new(
                            VolumeId(parse_decimal(v.as_ref())?),
                            parse_decimal(i.as_ref())?,
                        ),
                        m.size,
                    )),
                    _ => None,
                }
            })
            .collect();
        let concurrency = self.upload_concurrency();
        let chunks: Vec<Option<Arc<Chunk>>> = stream::iter(found)
            .map(|(id, size)| self.load_chunk(id, size))
            .buffer_unordered(concurrency)
            .try_collect()
            .await?;
        let mut used = 0;
        let mut table = write_lock(&self.chunks);
        for chunk in chunks.into_iter().flatten() {
            used += chunk.allocated.load(Ordering::Relaxed);
            table.insert(chunk.id, chunk);
        }
        drop(table);
        self.space.force_add(used);
        Ok(())
    }

    /// Reads one object's header into a clean chunk entry.
    async fn load_chunk(&self, id: ChunkRef, size: u64) -> Result<Option<Arc<Chunk>>> {
        let key = self.object_path(id);
        let header_len = self.header_len();
        if size < header_len {
            return Err(corrupt(&key, &format!("{size} bytes is too short")));
        }
        let header = match self.store.get_range(&key, 0..header_len).await {
            Ok(h) => h,
            // Deleted since the listing: not a chunk any more.
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(object_error("reading the header of", &key, e)),
        };
        let runs = self.decode_header(&key, &header, Some(size))?;
        let chunk = self.new_chunk(id, key, true);
        let mut n = 0;
        for run in runs {
            n += chunk.alloc.set(run);
        }
        chunk.allocated.store(n, Ordering::Relaxed);
        Ok(Some(Arc::new(chunk)))
    }

    /// A chunk entry holding nothing yet; `remote` when its object exists.
    fn new_chunk(&self, id: ChunkRef, key: ObjectPath, remote: bool) -> Chunk {
        Chunk {
            id,
            key,
            cache_path: self
                .cache_dir
                .join(format!("{CACHE_PREFIX}{}-{}", id.volume.0, id.index)),
            alloc: Bitmap::new(self.blocks_per_chunk),
            allocated: AtomicU64::new(0),
            state: AsyncRwLock::new(ChunkState {
                remote,
                ..ChunkState::default()
            }),
            upload: AsyncMutex::new(()),
        }
    }

    /// Encodes the header of an object holding the blocks of `runs`.
    fn encode_header(&self, runs: &[Range<u64>], out: &mut Vec<u8>) {
        let blocks: u64 = runs.iter().map(|r| r.end - r.start).sum();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&blocks.to_le_bytes());
        let start = out.len();
        out.resize(start + self.blocks_per_chunk.div_ceil(8) as usize, 0);
        for b in runs.iter().flat_map(|r| r.clone()) {
            out[start + (b / 8) as usize] |= 1 << (b % 8);
        }
    }

    /// Decodes a header into the runs of blocks holding data, checking it
    /// against this store's geometry and, when known, the object's size.
    fn decode_header(
        &self,
        key: &ObjectPath,
        header: &[u8],
        size: Option<u64>,
    ) -> Result<Vec<Range<u64>>> {
        let header_len = self.header_len();
        if (header.len() as u64) < header_len {
            return Err(corrupt(
                key,
                &format!("header of {} bytes, expected {header_len}", header.len()),
            ));
        }
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if header[..8] != MAGIC[..] {
            return Err(corrupt(key, "not a Torus chunk object (bad magic)"));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(corrupt(key, &format!("unknown layout version {version}")));
        }
        let chunk_size = u64_at(16);
        if chunk_size != self.chunk_size {
            return Err(Error::InvalidArgument(format!(
                "object {key} holds a chunk of {chunk_size} bytes, but the store was opened \
                 with chunks of {} bytes",
                self.chunk_size
            )));
        }
        let count = u64_at(24);
        let bitmap = &header[FIXED_HEADER as usize..header_len as usize];
        let is_set = |b: u64| bitmap[(b / 8) as usize] & (1 << (b % 8)) != 0;
        let runs = runs_of(0..self.blocks_per_chunk, is_set);
        let set: u64 = runs.iter().map(|r| r.end - r.start).sum();
        let spare_bits = bitmap.iter().map(|b| b.count_ones() as u64).sum::<u64>() - set;
        if set != count || spare_bits != 0 {
            return Err(corrupt(
                key,
                &format!("header counts {count} blocks, its bitmap {set} (+{spare_bits} spare)"),
            ));
        }
        if let Some(size) = size {
            let expected = header_len + set * SECTOR;
            if size != expected {
                return Err(corrupt(
                    key,
                    &format!("{size} bytes, but its header says {expected}"),
                ));
            }
        }
        Ok(runs)
    }

    fn lookup(&self, id: ChunkRef) -> Option<Arc<Chunk>> {
        read_lock(&self.chunks).get(&id).cloned()
    }

    fn lookup_or_insert(&self, id: ChunkRef) -> Arc<Chunk> {
        if let Some(chunk) = self.lookup(id) {
            return chunk;
        }
        write_lock(&self.chunks)
            .entry(id)
            .or_insert_with(|| Arc::new(self.new_chunk(id, self.object_path(id), false)))
            .clone()
    }

    /// Drops a dead entry from the table (if it is still the one there).
    fn forget(&self, chunk: &Arc<Chunk>) {
        let mut chunks = write_lock(&self.chunks);
        if chunks.get(&chunk.id).is_some_and(|c| Arc::ptr_eq(c, chunk)) {
            chunks.remove(&chunk.id);
        }
    }

    fn mark_dirty(&self, chunk: &Arc<Chunk>, st: &mut ChunkState) {
        st.gen += 1;
        // Replacing, not `or_insert`: the map may still hold a dead entry of
        // a deleted chunk with the same id, which flush would skip.
        lock(&self.dirty).insert(chunk.id, chunk.clone());
    }

    /// Drops a chunk that holds nothing and has no object (a fresh entry
    /// after a refused write, or a chunk zeroed before it was ever
    /// uploaded). Not while an upload of it is in progress: that upload may
    /// be creating an object, which the next flush must then delete.
    async fn discard_if_empty(&self, chunk: &Arc<Chunk>, st: &mut ChunkState) {
        if chunk.allocated.load(Ordering::Relaxed) > 0 || st.remote {
            return;
        }
        let Ok(_no_upload) = chunk.upload.try_lock() else {
            return;
        };
        if st.file {
            self.remove_cache_file(chunk).await;
            st.file = false;
        }
        st.deleted = true;
        self.forget(chunk);
    }

    /// Deletes a chunk's cache file; a failure only costs disk space (a new
    /// cache file is created truncated), so it is logged, not returned.
    async fn remove_cache_file(&self, chunk: &Chunk) -> bool {
        let path = chunk.cache_path.clone();
        let r = blocking(
            format!("removing {}", path.display()),
            move || match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        )
        .await;
        if let Err(e) = &r {
            tracing::warn!(chunk = %chunk.id, "object store cache: {e}");
        }
        r.is_ok()
    }

    /// The whole object of a chunk, `None` if it does not exist.
    async fn fetch_object(&self, chunk: &Chunk) -> Result<Option<Bytes>> {
        let got = match self.store.get(&chunk.key).await {
            Ok(got) => got.bytes().await,
            Err(e) => Err(e),
        };
        match got {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => {
                tracing::warn!(chunk = %chunk.id, object = %chunk.key,
                    "object store: chunk object missing; it reads as zeros");
                Ok(None)
            }
            Err(e) => Err(object_error("reading", &chunk.key, e)),
        }
    }

    /// Makes a clean chunk cached: downloads its object (if it has one) and
    /// writes its blocks into a new cache file. Called with the chunk's write
    /// lock held.
    async fn hydrate(&self, chunk: &Chunk, st: &mut ChunkState) -> Result<()> {
        let mut pieces = Vec::new();
        if st.remote && chunk.allocated.load(Ordering::Relaxed) > 0 {
            if let Some(object) = self.fetch_object(chunk).await? {
                let runs = self.decode_header(&chunk.key, &object, Some(object.len() as u64))?;
                let expected = runs_of(0..self.blocks_per_chunk, |b| chunk.alloc.get(b));
                if runs != expected {
                    return Err(corrupt(
                        &chunk.key,
                        "its blocks differ from those it had when it was uploaded or opened",
                    ));
                }
                let mut at = self.header_len() as usize;
                for run in runs {
                    let n = ((run.end - run.start) * SECTOR) as usize;
                    pieces.push((run.start * SECTOR, object.slice(at..at + n)));
                    at += n;
                }
            }
        }
        if !pieces.is_empty() {
            let path = chunk.cache_path.clone();
            blocking(
                format!("writing cache file {}", path.display()),
                move || {
                    let file = open_cache(&path, true)?;
                    for (offset, data) in pieces {
                        file.write_all_at(&data, offset)?;
                    }
                    Ok(())
                },
            )
            .await?;
            st.file = true;
        }
        st.cached = true;
        Ok(())
    }

    /// Where the bytes of `[offset, offset+len)` of a clean chunk are in its
    /// object: one piece per run of blocks holding data.
    fn remote_pieces(&self, chunk: &Chunk, offset: u64, len: u64) -> Vec<RemotePiece> {
        let end = offset + len;
        let touched = blocks_touched(offset, len);
        let header_len = self.header_len();
        runs_of(touched, |b| chunk.alloc.get(b))
            .into_iter()
            .map(|run| {
                let lo = offset.max(run.start * SECTOR);
                let hi = end.min(run.end * SECTOR);
                // The run's first block follows every block holding data
                // before it in the object.
                let rank = chunk.alloc.count_set(0..run.start);
                let start = header_len + rank * SECTOR + (lo - run.start * SECTOR);
                RemotePiece {
                    object: start..start + (hi - lo),
                    at: (lo - offset) as usize,
                }
            })
            .collect()
    }

    /// Uploads one dirty chunk (see the module docs), then drops its cache
    /// file if nothing changed meanwhile.
    async fn upload(&self, chunk: Arc<Chunk>) -> Result<()> {
        let result = self.upload_once(&chunk).await;
        if result.is_err() {
            // Still dirty: the next flush tries again. `or_insert`: a chunk
            // written meanwhile is in the map already.
            lock(&self.dirty).entry(chunk.id).or_insert(chunk);
        }
        result
    }

    async fn upload_once(&self, chunk: &Arc<Chunk>) -> Result<()> {
        let uploading = chunk.upload.lock().await;
        let (gen, runs, body, remote) = {
            let st = chunk.state.read().await;
            if st.deleted || !st.cached || st.gen == st.uploaded {
                return Ok(());
            }
            let runs = runs_of(0..self.blocks_per_chunk, |b| chunk.alloc.get(b));
            let body = if runs.is_empty() {
                None
            } else {
                let mut body = Vec::new();
                self.encode_header(&runs, &mut body);
                let header_len = body.len();
                let blocks: u64 = runs.iter().map(|r| r.end - r.start).sum();
                body.resize(header_len + (blocks * SECTOR) as usize, 0);
                if st.file {
                    let path = chunk.cache_path.clone();
                    let runs = runs.clone();
                    body = blocking(
                        format!("reading cache file {}", path.display()),
                        move || read_runs(&path, &runs, header_len, body),
                    )
                    .await?;
                }
                Some(Bytes::from(body))
            };
            (st.gen, runs, body, st.remote)
        };

        let sent = match body {
            Some(body) => self
                .store
                .put(&chunk.key, PutPayload::from(body))
                .await
                .map(drop)
                .map_err(|e| object_error("uploading", &chunk.key, e)),
            None if remote => self.delete_object(&chunk.key).await,
            None => Ok(()),
        };
        sent?;

        let mut st = chunk.state.write().await;
        if st.deleted {
            // Cannot happen (delete waits for uploads), but never leave an
            // object behind for a deleted chunk.
            if !runs.is_empty() {
                self.delete_object(&chunk.key).await?;
            }
            return Ok(());
        }
        st.remote = !runs.is_empty();
        st.uploaded = gen;
        if st.gen == gen {
            // The object now holds exactly the chunk: the cache copy can go.
            if !st.file || self.remove_cache_file(chunk).await {
                st.file = false;
                st.cached = false;
            }
            drop(uploading);
            self.discard_if_empty(chunk, &mut st).await;
        }
        Ok(())
    }

    /// Deletes an object; one already gone is fine.
    async fn delete_object(&self, key: &ObjectPath) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(object_error("deleting", key, e)),
        }
    }
}

impl std::fmt::Debug for ObjectBlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectBlockStore")
            .field("store", &format_args!("{}", self.store))
            .field("prefix", &self.prefix.as_ref())
            .field("cache_dir", &self.cache_dir)
            .field("chunk_size", &self.chunk_size)
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[async_trait]
impl BlockStore for ObjectBlockStore {
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    async fn used(&self) -> Result<u64> {
        Ok(self.space.used_bytes())
    }

    async fn read(&self, id: ChunkRef, offset: u64, len: u64) -> Result<Bytes> {
        check_range(id, offset, len, self.chunk_size)?;
        // Fits: len <= chunk_size, which fits in usize (check_geometry).
        let mut buf = vec![0u8; len as usize];
        if len == 0 {
            return Ok(Bytes::new());
        }
        let Some(chunk) = self.lookup(id) else {
            return Ok(Bytes::from(buf));
        };
        let st = chunk.state.read().await;
        if st.deleted {
            return Ok(Bytes::from(buf));
        }
        if st.cached {
            if !st.file {
                return Ok(Bytes::from(buf));
            }
            let path = chunk.cache_path.clone();
            return blocking(
                format!("reading cache file {}", path.display()),
                move || {
                    match OpenOptions::new().read(true).open(&path) {
                        Ok(file) => read_full_at(&file, &mut buf, offset)?,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                    Ok(Bytes::from(buf))
                },
            )
            .await;
        }
        let pieces = self.remote_pieces(&chunk, offset, len);
        if pieces.is_empty() {
            return Ok(Bytes::from(buf));
        }
        let ranges: Vec<Range<u64>> = pieces.iter().map(|p| p.object.clone()).collect();
        match self.store.get_ranges(&chunk.key, &ranges).await {
            Ok(parts) => {
                for (piece, data) in pieces.iter().zip(parts) {
                    let n = (piece.object.end - piece.object.start) as usize;
                    if data.len() != n {
                        return Err(corrupt(
                            &chunk.key,
                            &format!("range {:?} returned {} bytes", piece.object, data.len()),
                        ));
                    }
                    buf[piece.at..piece.at + n].copy_from_slice(&data);
                }
            }
            Err(object_store::Error::NotFound { .. }) => {
                tracing::warn!(chunk = %chunk.id, object = %chunk.key,
                    "object store: chunk object missing; it reads as zeros");
            }
            Err(e) => return Err(object_error("reading", &chunk.key, e)),
        }
        Ok(Bytes::from(buf))
    }

    async fn write(&self, id: ChunkRef, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        check_range(id, offset, len, self.chunk_size)?;
        if len == 0 {
            return Ok(());
        }
        let blocks = blocks_touched(offset, len);
        loop {
            let chunk = self.lookup_or_insert(id);
            let mut st = chunk.state.write().await;
            if st.deleted {
                drop(st);
                self.forget(&chunk);
                continue;
            }
            let new = (blocks.end - blocks.start) - chunk.alloc.count_set(blocks.clone());
            if let Err(e) = self.space.reserve(new, id) {
                self.discard_if_empty(&chunk, &mut st).await;
                return Err(e);
            }
            if !st.cached {
                if let Err(e) = self.hydrate(&chunk, &mut st).await {
                    self.space.release(new);
                    self.discard_if_empty(&chunk, &mut st).await;
                    return Err(e);
                }
            }
            let create = !st.file;
            let path = chunk.cache_path.clone();
            let result = blocking(
                format!("writing cache file {}", path.display()),
                move || open_cache(&path, create)?.write_all_at(&data, offset),
            )
            .await;
            // The file may exist now even if the write failed, and part of
            // the data may be in it: count its blocks (a later zero or
            // delete frees them), as the other stores do.
            st.file = true;
            let newly = chunk.alloc.set(blocks);
            chunk.allocated.fetch_add(newly, Ordering::Relaxed);
            if newly <= new {
                self.space.release(new - newly);
            } else {
                self.space.force_add(newly - new);
            }
            self.mark_dirty(&chunk, &mut st);
            return result;
        }
    }

    async fn zero(&self, id: ChunkRef, offset: u64, len: u64) -> Result<()> {
        check_range(id, offset, len, self.chunk_size)?;
        if len == 0 {
            return Ok(());
        }
        let Some(chunk) = self.lookup(id) else {
            return Ok(()); // never written: already zeros
        };
        let mut st = chunk.state.write().await;
        if st.deleted {
            return Ok(());
        }
        let inside = blocks_inside(offset, len);
        let freeing = chunk.alloc.count_set(inside.clone());
        let edges: Vec<(u64, u64)> = partial_edges(offset, len)
            .into_iter()
            .filter(|&(off, n)| n > 0 && chunk.alloc.get(off / SECTOR))
            .collect();
        if freeing == 0 && edges.is_empty() {
            return Ok(()); // nothing there holds data
        }
        if !st.cached {
            if freeing == chunk.allocated.load(Ordering::Relaxed) {
                // Everything goes (a whole-chunk TRIM): no need to download
                // what is about to be dropped.
                st.cached = true;
            } else {
                self.hydrate(&chunk, &mut st).await?;
            }
        }
        let mut result = Ok(());
        if st.file {
            let path = chunk.cache_path.clone();
            let allocated_inside = runs_of(inside.clone(), |b| chunk.alloc.get(b));
            result = blocking(
                format!("zeroing in cache file {}", path.display()),
                move || zero_cache(&path, &allocated_inside, &edges),
            )
            .await;
        }
        if result.is_ok() {
            let freed = chunk.alloc.clear(inside);
            chunk.allocated.fetch_sub(freed, Ordering::Relaxed);
            self.space.release(freed);
        }
        // Even a failed zero may have changed the cache file.
        self.mark_dirty(&chunk, &mut st);
        if result.is_ok() {
            self.discard_if_empty(&chunk, &mut st).await;
        }
        result
    }

    async fn flush(&self) -> Result<()> {
        let _one_at_a_time = self.flush_lock.lock().await;
        let chunks: Vec<Arc<Chunk>> = std::mem::take(&mut *lock(&self.dirty))
            .into_values()
            .collect();
        let results: Vec<Result<()>> = stream::iter(chunks)
            .map(|chunk| self.upload(chunk))
            .buffer_unordered(self.upload_concurrency())
            .collect()
            .await;
        let failed: Vec<Error> = results.into_iter().filter_map(|r| r.err()).collect();
        let n = failed.len();
        match failed.into_iter().next() {
            None => Ok(()),
            Some(only) if n == 1 => Err(only),
            Some(first) => Err(Error::Unavailable(format!(
                "flush: {n} chunks failed to upload (they stay dirty); the first: {first}"
            ))),
        }
    }

    async fn delete_chunk(&self, id: ChunkRef) -> Result<()> {
        let Some(chunk) = self.lookup(id) else {
            return Ok(());
        };
        let _no_upload = chunk.upload.lock().await;
        let mut st = chunk.state.write().await;
        if st.deleted {
            return Ok(());
        }
        if st.remote {
            // On failure nothing has changed.
            self.delete_object(&chunk.key).await?;
            st.remote = false;
        }
        if st.file {
            self.remove_cache_file(&chunk).await;
            st.file = false;
        }
        st.deleted = true;
        chunk.alloc.clear(0..self.blocks_per_chunk);
        let freed = chunk.allocated.swap(0, Ordering::Relaxed);
        self.space.release(freed);
        drop(st);
        self.forget(&chunk);
        Ok(())
    }

    async fn list_chunks(&self) -> Result<Vec<ChunkRef>> {
        let mut list: Vec<ChunkRef> = read_lock(&self.chunks)
            .values()
            .filter(|c| c.allocated.load(Ordering::Relaxed) > 0)
            .map(|c| c.id)
            .collect();
        list.sort_unstable();
        Ok(list)
    }

    /// Deletes every chunk of the volume, including ones whose blocks were
    /// all zeroed but whose object is not deleted yet.
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

/// Maps an object store error to ours, naming what was done to which object.
fn object_error(what: &str, key: &ObjectPath, e: object_store::Error) -> Error {
    let msg = format!("object store: {what} {key}: {e}");
    match e {
        object_store::Error::NotFound { .. } => Error::NotFound(msg),
        object_store::Error::NotSupported { .. } | object_store::Error::NotImplemented { .. } => {
            Error::Unsupported(msg)
        }
        object_store::Error::InvalidPath { .. } => Error::InvalidArgument(msg),
        _ => Error::Unavailable(msg),
    }
}

fn corrupt(key: &ObjectPath, what: &str) -> Error {
    Error::Corrupt(format!("chunk object {key}: {what}"))
}

/// A canonical decimal number ("0", "17"; not "017", "+1" or "").
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

/// The maximal runs of blocks in `range` for which `is_set` holds.
fn runs_of(range: Range<u64>, is_set: impl Fn(u64) -> bool) -> Vec<Range<u64>> {
    let mut runs = Vec::new();
    let mut start = None;
    for b in range.clone() {
        match (is_set(b), start) {
            (true, None) => start = Some(b),
            (false, Some(s)) => {
                runs.push(s..b);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push(s..range.end);
    }
    runs
}

/// Runs blocking file I/O on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::io(what, e)),
        Err(e) => Err(Error::Other(format!("{what}: blocking task failed: {e}"))),
    }
}

/// Creates the cache directory, or deletes the cache files an earlier run
/// left in it (only files named like ours).
fn clear_cache_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let is_ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(CACHE_PREFIX));
        if is_ours && entry.file_type()?.is_file() {
            match fs::remove_file(entry.path()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Opens a cache file for writing; `fresh` creates it empty (truncating any
/// stale file of that name), otherwise it is created if missing.
fn open_cache(path: &Path, fresh: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(fresh)
        .open(path)
}

/// Fills `buf` from `offset`; past the end of the file it keeps its zeros.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    super::sums::read_at_most(file, buf, offset).map(|_| ())
}

/// Reads the blocks of `runs` from a cache file into `body`, one after the
/// other from `at`.
fn read_runs(
    path: &Path,
    runs: &[Range<u64>],
    at: usize,
    mut body: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let file = match OpenOptions::new().read(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(body),
        Err(e) => return Err(e),
    };
    let mut at = at;
    for run in runs {
        let n = ((run.end - run.start) * SECTOR) as usize;
        read_full_at(&file, &mut body[at..at + n], run.start * SECTOR)?;
        at += n;
    }
    Ok(body)
}

/// Zeros parts of a cache file: punches holes over the runs of whole blocks
/// holding data (overwriting them with zeros where the file system cannot
/// punch) and overwrites the partial `edges` with zeros.
fn zero_cache(path: &Path, runs: &[Range<u64>], edges: &[(u64, u64)]) -> io::Result<()> {
    let file = match OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for run in runs {
        let (offset, len) = (run.start * SECTOR, (run.end - run.start) * SECTOR);
        match sys::punch_hole(&file, offset, len) {
            Ok(()) => {}
            Err(e) if sys::is_unsupported(&e) => pwrite_zeros(&file, offset, len)?,
            Err(e) => return Err(e),
        }
    }
    for &(offset, len) in edges {
        pwrite_zeros(&file, offset, len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_roundtrip() {
        let cache = tempfile::tempdir().expect("temporary directory");
        let store = ObjectBlockStore::open(
            Arc::new(object_store::memory::InMemory::new()),
            "p",
            cache.path(),
            1 << 20,
            8 << 20,
        )
        .await
        .expect("open");
        let key = store.object_path(ChunkRef::new(VolumeId(3), 4));
        assert_eq!(key.as_ref(), "p/3/4");
        let runs = vec![0..1, 7..9, 255..256];
        let mut header = Vec::new();
        store.encode_header(&runs, &mut header);
        assert_eq!(header.len() as u64, store.header_len());
        assert_eq!(header.len(), 64);
        let size = Some(64 + 4 * SECTOR);
        assert_eq!(
            store.decode_header(&key, &header, size).expect("decode"),
            runs
        );
        assert!(matches!(
            store.decode_header(&key, &header, Some(64 + 3 * SECTOR)),
            Err(Error::Corrupt(_))
        ));
        let mut bad = header.clone();
        bad[24] = 5; // count disagrees with the bitmap
        assert!(matches!(
            store.decode_header(&key, &bad, size),
            Err(Error::Corrupt(_))
        ));
        let mut bad = header.clone();
        bad[0] = b'X';
        assert!(matches!(
            store.decode_header(&key, &bad, size),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            store.decode_header(&key, &header[..63], size),
            Err(Error::Corrupt(_))
        ));
    }

    #[test]
    fn decimal_names() {
        assert_eq!(parse_decimal("0"), Some(0));
        assert_eq!(parse_decimal("17"), Some(17));
        assert_eq!(parse_decimal("017"), None);
        assert_eq!(parse_decimal(""), None);
        assert_eq!(parse_decimal("+1"), None);
        assert_eq!(parse_decimal("1a"), None);
        assert_eq!(parse_decimal("99999999999999999999999"), None);
    }

    #[test]
    fn runs() {
        let set = [1, 2, 3, 7, 9, 10];
        let runs = runs_of(0..11, |b| set.contains(&b));
        assert_eq!(runs, vec![1..4, 7..8, 9..11]);
        assert_eq!(runs_of(2..9, |b| set.contains(&b)), vec![2..4, 7..8]);
        assert!(runs_of(4..7, |b| set.contains(&b)).is_empty());
    }
}
