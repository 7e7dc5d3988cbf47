//! A directory of chunk files: the layout, accounting, descriptor cache and
//! flush protocol shared by [`FileBlockStore`](super::FileBlockStore) and
//! [`MmapBlockStore`](super::MmapBlockStore). They differ only in how bytes
//! move in and out of an open chunk file, which is the [`ChunkIo`] trait.
//!
//! # On-disk layout
//!
//! `<dir>/<volume>/<index>`, both decimal (`<dir>/7/12` is chunk 12 of volume
//! 7). Each chunk file is sparse: at most `chunk_size` bytes long, with holes
//! wherever nothing was written or space was freed. Names that are not
//! canonical decimal numbers are ignored, so other files may live beside the
//! chunks. Volume directories are kept when their last chunk goes.
//!
//! # Accounting
//!
//! Each chunk has a bitmap of its 4 KiB blocks that hold data. It is rebuilt
//! when the store opens from the files themselves (`SEEK_DATA`/`SEEK_HOLE`,
//! which on file systems without hole tracking report the whole file as data)
//! and kept exact afterwards:
//!
//! - a write counts the blocks of its range whose bits are clear, reserves
//!   them from the pool (failing with `NoSpace` before any I/O), writes, and
//!   sets the bits; the reservation is reconciled with the bits it actually
//!   set, so two writers allocating the same block (disjoint bytes of it)
//!   count it once. A write failing with an I/O error may have written part
//!   of its range, so its blocks stay counted (until zeroed or deleted):
//!   the bitmap must cover every block that may hold data, or a later `zero`
//!   would skip overwriting a partial block;
//! - `zero` punches a hole over the whole blocks of its range, clears their
//!   bits and releases them; the partial blocks at its edges are overwritten
//!   with zeros, and only if they hold data, so zeroing never allocates;
//! - `delete_chunk` unlinks the file and releases every block of the chunk.
//!
//! This assumes the file system allocates in 4 KiB blocks (ext4, XFS, btrfs
//! and tmpfs with 4 KiB pages do); with larger blocks, the bitmap rebuilt on
//! open can count more than was counted before.
//!
//! # Concurrency
//!
//! The chunk table is behind a read-write lock taken only to find a chunk.
//! Each chunk has its own small lock, held to reserve space, open its file or
//! update its bitmap, never during data I/O. So I/O on different chunks, and
//! on disjoint ranges of one chunk, runs in parallel.
//!
//! # Descriptor cache
//!
//! Open chunk files are kept open, up to a limit (by default half the
//! process's descriptor limit). Beyond it, the least recently used clean file
//! (second-chance clock) is closed. A file with writes not yet flushed, or I/O
//! in flight, stays open until it is clean: `fdatasync` then runs on the
//! descriptor the writes went through, which is the one guaranteed to see any
//! writeback error.
//!
//! # Flush
//!
//! A write, zero or creation marks its chunk dirty after its I/O completed
//! and before it returns; creating or unlinking a chunk file marks its
//! directory (and a new volume directory marks the root) dirty. `flush`
//! starts writeback on every dirty file, waits with `fdatasync` (`fsync` when
//! holes were punched), then `fsync`s every dirty directory. Flushes run one
//! at a time, so a flush that finds a chunk already taken by a flush in
//! progress waits for that flush to finish. A failed `fdatasync` may have
//! dropped data the kernel could not write back, so from then on every flush
//! of the store fails: the data can only be trusted again after reopening
//! and rebuilding from a replica.

use super::alloc::{Bitmap, Space};
use super::{
    blocks_inside, blocks_touched, check_geometry, check_range, lock, partial_edges, read_lock,
    sys, write_lock,
};
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use torus_traits::{ChunkRef, Error, Result, VolumeId, SECTOR};

/// How bytes move between memory and one open chunk file.
pub(crate) trait ChunkIo: Send + Sync + Sized + 'static {
    /// Prepares a chunk file, open for reading and writing, for I/O.
    fn open(file: File, chunk_size: u64) -> io::Result<Self>;
    /// The underlying file, for `fdatasync` and `fallocate`.
    fn file(&self) -> &File;
    /// Fills `buf` with the bytes at `offset`. `buf` arrives zeroed, and
    /// `alloc` tells which blocks hold data (the others read as zeros).
    fn read(&self, offset: u64, buf: &mut [u8], alloc: &Bitmap) -> io::Result<()>;
    /// `read` into a new buffer of `len` bytes. The default zero-fills one
    /// and calls `read`; a store whose reads fill every byte themselves
    /// skips the zeroing (a large cost for 1 MiB reads).
    fn read_vec(&self, offset: u64, len: usize, alloc: &Bitmap) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read(offset, &mut buf, alloc)?;
        Ok(buf)
    }
    /// Like `read`, but only when it needs no disk I/O: `Ok(false)` means
    /// "not done, read with `read` on the blocking pool" (`buf` may then hold
    /// part of the data). By default nothing can be read that way.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8], _alloc: &Bitmap) -> io::Result<bool> {
        Ok(false)
    }
    /// Called before a write that allocates blocks, with its byte range. An
    /// error means nothing was written (the write fails and its reservation
    /// is returned); by default there is nothing to do.
    fn preallocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Writes `data` at `offset`. On error, part of it may have been written.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Overwrites `[offset, offset+len)` with zeros (a piece of one block).
    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Deallocates the whole blocks `[offset, offset+len)`.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// One chunk known to the store.
struct Chunk<H> {
    id: ChunkRef,
    path: PathBuf,
    /// Which blocks hold data; changed only under `state`.
    alloc: Bitmap,
    /// Number of set bits in `alloc` (for listing without locking).
    allocated: AtomicU64,
    /// Clock bit of the descriptor cache: used since last looked at.
    referenced: AtomicBool,
    state: Mutex<ChunkState<H>>,
}

struct ChunkState<H> {
    /// The open file, if cached.
    handle: Option<Arc<H>>,
    /// The file exists on disk.
    created: bool,
    /// Deleted: this entry is dead; the next user makes a fresh one.
    deleted: bool,
    /// In the descriptor cache's clock list.
    in_cache: bool,
    /// Writes and zeros between reservation and completion.
    inflight: u32,
    /// Written since the last flush took it (and in the dirty list).
    dirty: bool,
    /// Holes punched since the last flush: needs `fsync`, not `fdatasync`.
    meta_dirty: bool,
}

impl<H> Chunk<H> {
    fn new(id: ChunkRef, path: PathBuf, blocks: u64, created: bool) -> Self {
        Chunk {
            id,
            path,
            alloc: Bitmap::new(blocks),
            allocated: AtomicU64::new(0),
            referenced: AtomicBool::new(false),
            state: Mutex::new(ChunkState {
                handle: None,
                created,
                deleted: false,
                in_cache: false,
                inflight: 0,
                dirty: false,
                meta_dirty: false,
            }),
        }
    }

    fn io_error(&self, what: &str, e: io::Error) -> Error {
        Error::io(
            format!("{what} chunk {} ({})", self.id, self.path.display()),
            e,
        )
    }
}

/// A handle obtained under a chunk's lock; `fresh` when it was just opened and
/// must be entered in the descriptor cache once the lock is released.
struct Opened<H> {
    handle: Arc<H>,
    fresh: bool,
}

/// Zeros for overwriting partial blocks.
static ZEROS: [u8; SECTOR as usize] = [0; SECTOR as usize];

/// Writes zeros with `pwrite`, for stores without a mapping.
pub(crate) fn pwrite_zeros(file: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    while len > 0 {
        let n = len.min(SECTOR);
        file.write_all_at(&ZEROS[..n as usize], offset)?;
        offset += n;
        len -= n;
    }
    Ok(())
}

/// The store engine: a directory of chunk files accessed through `H`.
pub(crate) struct ChunkDir<H> {
    root: PathBuf,
    chunk_size: u64,
    capacity: u64,
    blocks_per_chunk: u64,
    space: Space,
    chunks: RwLock<HashMap<ChunkRef, Arc<Chunk<H>>>>,
    /// Clock list of chunks with an open handle.
    cache: Mutex<VecDeque<Arc<Chunk<H>>>>,
    open_limit: AtomicUsize,
    /// Chunks written since the last flush took the list.
    dirty: Mutex<Vec<Arc<Chunk<H>>>>,
    /// Directories with entries created or removed since the last flush.
    dirty_dirs: Mutex<HashSet<PathBuf>>,
    /// Serialises flushes (see the module docs).
    flush_lock: Mutex<()>,
    /// Set once an `fdatasync` failed; every later flush reports it.
    sync_failed: OnceLock<String>,
}

impl<H: ChunkIo> ChunkDir<H> {
    /// Opens (creating if needed) a store in `root` and rebuilds its
    /// accounting from the chunk files found there.
    pub(crate) fn open(root: &Path, chunk_size: u64, capacity: u64) -> Result<Self> {
        check_geometry(chunk_size)?;
        let blocks_per_chunk = chunk_size / SECTOR;
        if !root.is_dir() {
            fs::create_dir_all(root)
                .map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
            // Make the new directory's own entry durable too.
            let parent = root
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            sync_dir(parent)?;
        }
        let mut chunks = HashMap::new();
        let mut used = 0;
        let entries =
            fs::read_dir(root).map_err(|e| Error::io(format!("listing {}", root.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", root.display()), e))?;
            let Some(volume) = parse_name(&entry.file_name()) else {
                continue;
            };
            let vol_dir = entry.path();
            if !vol_dir.is_dir() {
                continue;
            }
            let files = fs::read_dir(&vol_dir)
                .map_err(|e| Error::io(format!("listing {}", vol_dir.display()), e))?;
            for file in files {
                let file =
                    file.map_err(|e| Error::io(format!("listing {}", vol_dir.display()), e))?;
                let Some(index) = parse_name(&file.file_name()) else {
                    continue;
                };
                let path = file.path();
                if !path.is_file() {
                    continue;
                }
                let id = ChunkRef::new(VolumeId(volume), index);
                let chunk = Chunk::new(id, path, blocks_per_chunk, true);
                let n = scan_allocation(&chunk, chunk_size)?;
                chunk.allocated.store(n, Ordering::Relaxed);
                used += n;
                chunks.insert(id, Arc::new(chunk));
            }
        }
        let open_limit =
            sys::open_files_soft_limit().map_or(512, |soft| (soft / 2).clamp(16, 16384) as usize);
        Ok(ChunkDir {
            root: root.to_path_buf(),
            chunk_size,
            capacity,
            blocks_per_chunk,
            space: Space::new(capacity, used),
            chunks: RwLock::new(chunks),
            cache: Mutex::new(VecDeque::new()),
            open_limit: AtomicUsize::new(open_limit),
            dirty: Mutex::new(Vec::new()),
            dirty_dirs: Mutex::new(HashSet::new()),
            flush_lock: Mutex::new(()),
            sync_failed: OnceLock::new(),
        })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(crate) fn used(&self) -> u64 {
        self.space.used_bytes()
    }

    pub(crate) fn open_files_limit(&self) -> usize {
        self.open_limit.load(Ordering::Relaxed)
    }

    pub(crate) fn set_open_files_limit(&self, limit: usize) {
        self.open_limit.store(limit.max(1), Ordering::Relaxed);
    }

    pub(crate) fn list_chunks(&self) -> Vec<ChunkRef> {
        let mut list: Vec<ChunkRef> = read_lock(&self.chunks)
            .values()
            .filter(|c| c.allocated.load(Ordering::Relaxed) > 0)
            .map(|c| c.id)
            .collect();
        list.sort_unstable();
        list
    }

    pub(crate) fn read(&self, id: ChunkRef, offset: u64, len: u64) -> Result<Bytes> {
        check_range(id, offset, len, self.chunk_size)?;
        // Fits: len <= chunk_size, which fits in usize (check_geometry).
        let zeros = || Ok(Bytes::from(vec![0u8; len as usize]));
        if len == 0 {
            return Ok(Bytes::new());
        }
        let Some(chunk) = self.lookup(id) else {
            return zeros();
        };
        let opened = {
            let mut st = lock(&chunk.state);
            if st.deleted {
                None
            } else {
                self.handle(&chunk, &mut st, false)?
            }
        };
        match opened {
            Some(opened) => {
                self.cache_fresh(&chunk, &opened);
                opened
                    .handle
                    .read_vec(offset, len as usize, &chunk.alloc)
                    .map(Bytes::from)
                    .map_err(|e| chunk.io_error("reading", e))
            }
            None => zeros(),
        }
    }

    /// `read`, if it can be done without waiting for the disk: from the
    /// page cache through an already open descriptor. `None`: use `read`.
    pub(crate) fn read_cached(&self, id: ChunkRef, offset: u64, len: u64) -> Result<Option<Bytes>> {
        check_range(id, offset, len, self.chunk_size)?;
        let mut buf = vec![0u8; len as usize];
        let Some(chunk) = self.lookup(id) else {
            return Ok(Some(Bytes::from(buf))); // never written: zeros
        };
        let handle = {
            let st = lock(&chunk.state);
            if st.deleted {
                return Ok(Some(Bytes::from(buf)));
            }
            // Opening a file may wait for the disk; leave that to `read`.
            match &st.handle {
                Some(h) => h.clone(),
                None => return Ok(None),
            }
        };
        chunk.referenced.store(true, Ordering::Relaxed);
        match handle.read_cached(offset, &mut buf, &chunk.alloc) {
            Ok(true) => Ok(Some(Bytes::from(buf))),
            Ok(false) => Ok(None),
            Err(e) => Err(chunk.io_error("reading", e)),
        }
    }

    pub(crate) fn write(&self, id: ChunkRef, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        check_range(id, offset, len, self.chunk_size)?;
        if len == 0 {
            return Ok(());
        }
        let blocks = blocks_touched(offset, len);
        let (chunk, opened, reserved) = loop {
            let chunk = self.lookup_or_insert(id);
            let mut st = lock(&chunk.state);
            if st.deleted {
                drop(st);
                self.forget(&chunk);
                continue;
            }
            let reserved = (blocks.end - blocks.start) - chunk.alloc.count_set(blocks.clone());
            if let Err(e) = self.space.reserve(reserved, id) {
                self.abandon_if_unborn(&chunk, st);
                return Err(e);
            }
            let opened = match self.handle(&chunk, &mut st, true) {
                Ok(Some(opened)) => opened,
                Ok(None) => unreachable_none(&chunk)?,
                Err(e) => {
                    self.space.release(reserved);
                    self.abandon_if_unborn(&chunk, st);
                    return Err(e);
                }
            };
            st.inflight += 1;
            drop(st);
            break (chunk, opened, reserved);
        };
        self.cache_fresh(&chunk, &opened);
        let h = &opened.handle;
        if reserved > 0 {
            if let Err(e) = h.preallocate(offset, len) {
                // Nothing written: give the reservation back.
                let mut st = lock(&chunk.state);
                st.inflight -= 1;
                self.space.release(reserved);
                return Err(chunk.io_error("allocating space in", e));
            }
        }
        let result = h
            .write(offset, data)
            .map_err(|e| chunk.io_error("writing", e));
        let mut st = lock(&chunk.state);
        st.inflight -= 1;
        if st.deleted {
            // Deleted meanwhile: delete released what was counted then,
            // which did not include this reservation.
            self.space.release(reserved);
        } else {
            // Count the blocks even when the write failed: part of it may
            // have reached the file, and a later zero must clear it.
            let newly = chunk.alloc.set(blocks);
            chunk.allocated.fetch_add(newly, Ordering::Relaxed);
            if newly <= reserved {
                self.space.release(reserved - newly);
            } else {
                self.space.force_add(newly - reserved);
            }
            self.mark_dirty(&chunk, &mut st, false);
        }
        result
    }

    pub(crate) fn zero(&self, id: ChunkRef, offset: u64, len: u64) -> Result<()> {
        check_range(id, offset, len, self.chunk_size)?;
        if len == 0 {
            return Ok(());
        }
        let Some(chunk) = self.lookup(id) else {
            return Ok(()); // never written: already zeros
        };
        let opened = {
            let mut st = lock(&chunk.state);
            if st.deleted {
                return Ok(());
            }
            let Some(opened) = self.handle(&chunk, &mut st, false)? else {
                return Ok(()); // file not created yet: already zeros
            };
            st.inflight += 1;
            opened
        };
        self.cache_fresh(&chunk, &opened);
        let h = &opened.handle;

        // Whole blocks: punch a hole, or, where the file system cannot,
        // overwrite the ones holding data with zeros (they stay allocated).
        let inside = blocks_inside(offset, len);
        let mut punched = false;
        let mut result = Ok(());
        if !inside.is_empty() {
            let (start, n) = (inside.start * SECTOR, (inside.end - inside.start) * SECTOR);
            match h.punch_hole(start, n) {
                Ok(()) => punched = true,
                Err(e) if sys::is_unsupported(&e) => {
                    for block in inside.clone() {
                        if chunk.alloc.get(block) {
                            if let Err(e) = h.write_zeros(block * SECTOR, SECTOR) {
                                result = Err(chunk.io_error("zeroing", e));
                                break;
                            }
                        }
                    }
                }
                Err(e) => result = Err(chunk.io_error("punching a hole in", e)),
            }
        }
        // Partial blocks at the edges: only those holding data need zeros.
        if result.is_ok() {
            for (off, n) in partial_edges(offset, len) {
                if n > 0 && chunk.alloc.get(off / SECTOR) {
                    if let Err(e) = h.write_zeros(off, n) {
                        result = Err(chunk.io_error("zeroing", e));
                        break;
                    }
                }
            }
        }

        let mut st = lock(&chunk.state);
        st.inflight -= 1;
        if !st.deleted {
            if punched {
                let freed = chunk.alloc.clear(inside);
                chunk.allocated.fetch_sub(freed, Ordering::Relaxed);
                self.space.release(freed);
            }
            // Even a failed zero may have changed the file: flush it.
            self.mark_dirty(&chunk, &mut st, punched);
        }
        result
    }

    pub(crate) fn delete_chunk(&self, id: ChunkRef) -> Result<()> {
        let Some(chunk) = self.lookup(id) else {
            return Ok(());
        };
        let handle = {
            let mut st = lock(&chunk.state);
            if !st.deleted {
                if st.created {
                    match fs::remove_file(&chunk.path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(chunk.io_error("deleting", e)),
                    }
                    self.mark_dir_dirty(chunk.path.parent());
                }
                st.deleted = true;
                let freed = chunk.allocated.swap(0, Ordering::Relaxed);
                self.space.release(freed);
            }
            st.handle.take()
        };
        // Closing (and unmapping) outside the chunk's lock.
        drop(handle);
        self.forget(&chunk);
        Ok(())
    }

    /// Deletes every chunk of `volume`, including ones whose blocks were all
    /// zeroed (which `list_chunks` leaves out but which still have a file).
    pub(crate) fn delete_volume(&self, volume: VolumeId) -> Result<()> {
        let ids: Vec<ChunkRef> = read_lock(&self.chunks)
            .keys()
            .filter(|c| c.volume == volume)
            .copied()
            .collect();
        for id in ids {
            self.delete_chunk(id)?;
        }
        Ok(())
    }

    pub(crate) fn flush(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.flush_lock);
        let chunks = std::mem::take(&mut *lock(&self.dirty));
        let dirs = std::mem::take(&mut *lock(&self.dirty_dirs));

        // Take each chunk's dirty mark before syncing it: a write completing
        // after this point marks it again for the next flush.
        let mut pending = Vec::with_capacity(chunks.len());
        let mut result = Ok(());
        for chunk in chunks {
            let mut st = lock(&chunk.state);
            if st.deleted {
                continue;
            }
            st.dirty = false;
            let meta = std::mem::take(&mut st.meta_dirty);
            // A dirty chunk is never evicted, so its handle is there; reopen
            // defensively if not.
            let opened = match self.handle(&chunk, &mut st, false) {
                Ok(Some(opened)) => opened,
                Ok(None) => continue,
                Err(e) => {
                    // Its dirty mark is gone: make every later flush fail
                    // rather than silently skip it.
                    let _ = self.sync_failed.set(e.to_string());
                    result = result.and(Err(e));
                    continue;
                }
            };
            drop(st);
            self.cache_fresh(&chunk, &opened);
            sys::start_writeback(opened.handle.file());
            pending.push((chunk, opened.handle, meta));
        }
        for (chunk, handle, meta) in pending {
            let synced = if meta {
                handle.file().sync_all()
            } else {
                handle.file().sync_data()
            };
            if let Err(e) = synced {
                let e = chunk.io_error("syncing", e);
                let _ = self.sync_failed.set(e.to_string());
                result = result.and(Err(e));
            }
        }
        for dir in dirs {
            if let Err(e) = sync_dir(&dir) {
                lock(&self.dirty_dirs).insert(dir);
                result = result.and(Err(e));
            }
        }
        result?;
        if let Some(failed) = self.sync_failed.get() {
            return Err(Error::Io {
                context: format!("an earlier flush failed ({failed}); data may be lost"),
                source: Arc::new(io::Error::other("earlier fdatasync failure")),
            });
        }
        Ok(())
    }

    fn lookup(&self, id: ChunkRef) -> Option<Arc<Chunk<H>>> {
        read_lock(&self.chunks).get(&id).cloned()
    }

    fn lookup_or_insert(&self, id: ChunkRef) -> Arc<Chunk<H>> {
        if let Some(chunk) = self.lookup(id) {
            return chunk;
        }
        let mut chunks = write_lock(&self.chunks);
        chunks
            .entry(id)
            .or_insert_with(|| {
                let path = self
                    .root
                    .join(id.volume.0.to_string())
                    .join(id.index.to_string());
                Arc::new(Chunk::new(id, path, self.blocks_per_chunk, false))
            })
            .clone()
    }

    /// After a failed first write: drops the entry of a chunk whose file was
    /// never created, so refused writes leave nothing behind. (No other
    /// writer can hold a reservation on it: reserving and creating the file
    /// happen under the same lock.)
    fn abandon_if_unborn(&self, chunk: &Arc<Chunk<H>>, mut st: MutexGuard<'_, ChunkState<H>>) {
        if !st.created {
            st.deleted = true;
            drop(st);
            self.forget(chunk);
        }
    }

    /// Drops a dead entry from the table (if it is still the one there).
    fn forget(&self, chunk: &Arc<Chunk<H>>) {
        let mut chunks = write_lock(&self.chunks);
        if chunks.get(&chunk.id).is_some_and(|c| Arc::ptr_eq(c, chunk)) {
            chunks.remove(&chunk.id);
        }
    }

    /// The chunk's open handle, opening its file if needed. With `create`,
    /// the file is created if it does not exist yet; without, `None` then.
    fn handle(
        &self,
        chunk: &Chunk<H>,
        st: &mut ChunkState<H>,
        create: bool,
    ) -> Result<Option<Opened<H>>> {
        if let Some(handle) = &st.handle {
            chunk.referenced.store(true, Ordering::Relaxed);
            return Ok(Some(Opened {
                handle: handle.clone(),
                fresh: false,
            }));
        }
        let file = if st.created {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&chunk.path)
                .map_err(|e| chunk.io_error("opening", e))?
        } else if create {
            let file = self.create_file(chunk)?;
            st.created = true;
            file
        } else {
            return Ok(None);
        };
        let handle =
            Arc::new(H::open(file, self.chunk_size).map_err(|e| chunk.io_error("opening", e))?);
        st.handle = Some(handle.clone());
        chunk.referenced.store(true, Ordering::Relaxed);
        let fresh = !st.in_cache;
        st.in_cache = true;
        Ok(Some(Opened { handle, fresh }))
    }

    fn create_file(&self, chunk: &Chunk<H>) -> Result<File> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true);
        let file = match opts.open(&chunk.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // First chunk of this volume: make its directory.
                if let Some(vol_dir) = chunk.path.parent() {
                    match fs::create_dir(vol_dir) {
                        Ok(()) => self.mark_dir_dirty(Some(&self.root)),
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => {
                            return Err(Error::io(format!("creating {}", vol_dir.display()), e))
                        }
                    }
                }
                opts.open(&chunk.path)
            }
            other => other,
        }
        .map_err(|e| chunk.io_error("creating", e))?;
        self.mark_dir_dirty(chunk.path.parent());
        Ok(file)
    }

    fn mark_dirty(&self, chunk: &Arc<Chunk<H>>, st: &mut ChunkState<H>, meta: bool) {
        st.meta_dirty |= meta;
        if !st.dirty {
            st.dirty = true;
            lock(&self.dirty).push(chunk.clone());
        }
    }

    fn mark_dir_dirty(&self, dir: Option<&Path>) {
        if let Some(dir) = dir {
            let mut dirs = lock(&self.dirty_dirs);
            if !dirs.contains(dir) {
                dirs.insert(dir.to_path_buf());
            }
        }
    }

    /// Enters a freshly opened handle in the descriptor cache and closes the
    /// least recently used clean ones beyond the limit. Called without any
    /// chunk lock held; takes the chunks' locks only with `try_lock`.
    fn cache_fresh(&self, chunk: &Arc<Chunk<H>>, opened: &Opened<H>) {
        if !opened.fresh {
            return;
        }
        let limit = self.open_limit.load(Ordering::Relaxed);
        let mut cache = lock(&self.cache);
        cache.push_back(chunk.clone());
        // Each entry is looked at most twice (once to clear its clock bit),
        // so eviction is bounded even when every file is busy or dirty.
        let mut budget = cache.len() * 2;
        while cache.len() > limit && budget > 0 {
            budget -= 1;
            let Some(victim) = cache.pop_front() else {
                break;
            };
            if victim.referenced.swap(false, Ordering::Relaxed) {
                cache.push_back(victim);
                continue;
            }
            if !try_close(&victim) {
                cache.push_back(victim);
            }
        }
    }
}

/// Closes a cached chunk's handle if it is idle and clean (or already closed
/// by delete); `false` when it must stay open. Never blocks on the chunk's
/// lock: a chunk busy right now is in use, so not a candidate anyway.
fn try_close<H>(chunk: &Chunk<H>) -> bool {
    let mut st = match chunk.state.try_lock() {
        Ok(st) => st,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return false,
    };
    if st.handle.is_some() && (st.inflight > 0 || st.dirty) {
        return false;
    }
    // I/O still using the handle holds its own reference; the file closes
    // when the last one goes.
    st.in_cache = false;
    let handle = st.handle.take();
    drop(st);
    drop(handle);
    true
}

/// `handle(.., create: true)` always yields a handle; this turns the
/// impossible `None` into an error instead of a panic.
fn unreachable_none<H>(chunk: &Chunk<H>) -> Result<Opened<H>> {
    Err(Error::Other(format!(
        "chunk {}: no handle after creating its file",
        chunk.id
    )))
}

/// A canonical decimal name (`0`, `17`, not `017` or `+17`).
fn parse_name(name: &OsStr) -> Option<u64> {
    let s = name.to_str()?;
    let canonical = s == "0" || (!s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit()));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// Rebuilds a chunk's bitmap from its file; returns the number of blocks
/// holding data.
fn scan_allocation<H>(chunk: &Chunk<H>, chunk_size: u64) -> Result<u64> {
    let file = File::open(&chunk.path).map_err(|e| chunk.io_error("opening", e))?;
    let len = file
        .metadata()
        .map_err(|e| chunk.io_error("inspecting", e))?
        .len();
    if len > chunk_size {
        return Err(Error::InvalidArgument(format!(
            "chunk file {} is {len} bytes, more than the chunk size {chunk_size}: \
             opened with the wrong chunk size?",
            chunk.path.display()
        )));
    }
    let mut pos = 0;
    while pos < len {
        let start = match sys::seek_data(&file, pos) {
            Ok(Some(start)) => start,
            Ok(None) => break,
            Err(_) => {
                // No hole tracking here: count everything up to the end.
                chunk.alloc.set(blocks_touched(pos, len - pos));
                break;
            }
        };
        let end = match sys::seek_hole(&file, start) {
            Ok(Some(end)) => end.min(len),
            _ => len,
        };
        if end <= start {
            break;
        }
        chunk.alloc.set(blocks_touched(start, end - start));
        pos = end;
    }
    Ok(chunk.alloc.count_set(0..chunk_size / SECTOR))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// Largest write, and largest read served from the page cache, done on the
/// calling task instead of the blocking pool.
///
/// A small buffered write only copies into the page cache: a few
/// microseconds, less than handing it to a blocking-pool thread and waking
/// the task again (two context switches, which dominated small replicated
/// writes in profiles). Reads try the page cache without blocking first
/// (`RWF_NOWAIT`) and go to the pool only when the disk must be read.
/// Larger I/O and flushes always go to the pool.
pub(crate) const INLINE_IO_MAX: usize = 64 * 1024;

/// Runs one of the engine's blocking operations on tokio's blocking pool.
pub(crate) async fn blocking<H: ChunkIo, T: Send + 'static>(
    dir: &Arc<ChunkDir<H>>,
    op: impl FnOnce(&ChunkDir<H>) -> Result<T> + Send + 'static,
) -> Result<T> {
    let dir = dir.clone();
    tokio::task::spawn_blocking(move || op(&dir))
        .await
        .map_err(|e| Error::Other(format!("block store I/O task failed: {e}")))?
}

/// Implements `BlockStore` for a store type holding `dir: Arc<ChunkDir<_>>`,
/// running every operation that does I/O on the blocking pool except small
/// writes and small reads the page cache holds (see [`INLINE_IO_MAX`]).
macro_rules! chunk_dir_block_store {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl torus_traits::BlockStore for $store {
            fn chunk_size(&self) -> u64 {
                self.dir.chunk_size()
            }

            fn capacity(&self) -> u64 {
                self.dir.capacity()
            }

            async fn used(&self) -> torus_traits::Result<u64> {
                Ok(self.dir.used())
            }

            async fn read(
                &self,
                chunk: torus_traits::ChunkRef,
                offset: u64,
                len: u64,
            ) -> torus_traits::Result<bytes::Bytes> {
                if len <= $crate::storage::chunk_dir::INLINE_IO_MAX as u64 {
                    if let Some(data) = self.dir.read_cached(chunk, offset, len)? {
                        return Ok(data);
                    }
                }
                $crate::storage::chunk_dir::blocking(&self.dir, move |d| d.read(chunk, offset, len))
                    .await
            }

            async fn write(
                &self,
                chunk: torus_traits::ChunkRef,
                offset: u64,
                data: bytes::Bytes,
            ) -> torus_traits::Result<()> {
                if data.len() <= $crate::storage::chunk_dir::INLINE_IO_MAX {
                    return self.dir.write(chunk, offset, &data);
                }
                $crate::storage::chunk_dir::blocking(&self.dir, move |d| {
                    d.write(chunk, offset, &data)
                })
                .await
            }

            async fn zero(
                &self,
                chunk: torus_traits::ChunkRef,
                offset: u64,
                len: u64,
            ) -> torus_traits::Result<()> {
                $crate::storage::chunk_dir::blocking(&self.dir, move |d| d.zero(chunk, offset, len))
                    .await
            }

            async fn flush(&self) -> torus_traits::Result<()> {
                $crate::storage::chunk_dir::blocking(&self.dir, |d| d.flush()).await
            }

            async fn delete_chunk(
                &self,
                chunk: torus_traits::ChunkRef,
            ) -> torus_traits::Result<()> {
                $crate::storage::chunk_dir::blocking(&self.dir, move |d| d.delete_chunk(chunk))
                    .await
            }

            async fn list_chunks(&self) -> torus_traits::Result<Vec<torus_traits::ChunkRef>> {
                Ok(self.dir.list_chunks())
            }

            async fn delete_volume(
                &self,
                volume: torus_traits::VolumeId,
            ) -> torus_traits::Result<()> {
                $crate::storage::chunk_dir::blocking(&self.dir, move |d| d.delete_volume(volume))
                    .await
            }
        }
    };
}
pub(crate) use chunk_dir_block_store;
