//! A directory of chunk files: the layout, accounting, checksums, descriptor
//! cache and flush protocol shared by [`FileBlockStore`](super::FileBlockStore)
//! and [`MmapBlockStore`](super::MmapBlockStore). They differ only in how
//! bytes move in and out of an open chunk file, which is the [`ChunkIo`]
//! trait.
//!
//! # On-disk layout
//!
//! `<dir>/<volume>/<index>`, both decimal (`<dir>/7/12` is chunk 12 of volume
//! 7). Each chunk file is sparse: at most `chunk_size` bytes long, with holes
//! wherever nothing was written or space was freed. Names that are not
//! canonical decimal numbers are ignored, so other files may live beside the
//! chunks. The store keeps two kinds of its own there:
//!
//! - `<dir>/<volume>/crc32c`, the volume's checksum file: 4 bytes per 4 KiB
//!   block of each chunk (0.1% of the data), chunk `index` at byte
//!   `index * chunk_size / 1024`, sparse like the chunks. Each entry is the
//!   block's crc32c XOR the crc32c of a zero block, little-endian, so zero
//!   bytes (a hole, a range never written) stand for a zero block, which is
//!   what a hole in a chunk file reads as.
//! - `<dir>/dirty.0.log` and `<dir>/dirty.1.log`, the dirty log (see "Crash
//!   consistency"): 16 bytes per chunk listed (volume, index, little-endian),
//!   empty after a flush.
//!
//! Volume directories are kept when their last chunk goes, and so are their
//! checksum files, except that `delete_volume` removes the checksum file.
//! Neither kind of file counts against the pool's capacity.
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
//! # Checksums
//!
//! Every 4 KiB block of every chunk has a crc32c, so that rot on the disk is
//! reported (and the engine can serve the block from another replica and
//! rewrite this one) instead of being returned as data.
//!
//! - A chunk's checksums are loaded into memory when its file is opened (one
//!   `pread` of at most 4 KiB) and dropped when it is closed, so reads check
//!   them with no system call of their own.
//! - A read checks every block its range touches (the edges of an unaligned
//!   range are read whole for that), on every path: blocking pool, page
//!   cache fast path, calling task. A block that fails makes the read fail
//!   with `Error::Corrupt("chunk V/I block B: checksum mismatch ...")`.
//!   Holes (no data bit, zero-block checksum) are zeros by construction and
//!   are not checksummed.
//! - A write checksums the whole blocks it covers from the data it was
//!   given. A block it covers only partly is read and checked first: if it
//!   fails, the write fails with `Corrupt` and changes nothing (checksumming
//!   the merged block would bless the rot); otherwise the merged block is
//!   checksummed. A write covering a rotten block whole repairs it. `zero`
//!   does the same for the partial blocks at its edges, and the whole blocks
//!   it frees get the zero-block checksum.
//! - Checksums reach the checksum file only at `flush` (one `pwrite` per
//!   chunk flushed), so a write costs no system call for them.
//! - Data and checksums of a chunk change together under the chunk's update
//!   lock (`Sums::lock`), held by writes and zeros across their data I/O.
//!   Reads do not take it; a read whose data fails a checksum takes it and
//!   reads the block again before calling it corrupt, since it may have
//!   raced a write (or read through a handle since closed and reopened).
//! - A write failing with an I/O error may have written part of its range:
//!   its blocks keep their old checksums, so they fail them (their content
//!   is unknown) until rewritten.
//! - `scan_chunk` reads the whole chunk and reports the checksum of every
//!   block as it is stored and the blocks that fail theirs.
//!
//! # Crash consistency
//!
//! The kernel writes data and checksums back independently, so after a power
//! cut the blocks changed since the last flush may disagree with their
//! checksums. That must not be mistaken for rot: anything unflushed may be
//! lost, but the volume stays readable. The dirty log lists the chunks that
//! may disagree:
//!
//! 1. Before a write or zero changes a chunk for the first time since the
//!    last flush, the chunk is appended to the log and the log is synced
//!    (appenders at the same moment share one `fdatasync`). Further changes
//!    of that chunk until the next flush cost nothing more. A write on the
//!    calling task that would need this sync goes to the blocking pool.
//! 2. `flush` makes data, checksums and directories durable, then empties
//!    the log (see "Flush").
//! 3. Opening the store recomputes, from the data as it is, the checksums of
//!    every chunk the log lists, syncs them, and empties the log.
//!
//! Flushes and changes overlap, so the log is cut into epochs, one per
//! flush, alternating between its two files (`sums::DirtyLog` explains why
//! two): a flush empties only the closing epoch's file, after waiting for
//! that epoch's changes still running.
//!
//! The limitation: rot inside a chunk that was being changed when the power
//! went is not detected, since its checksums are recomputed from whatever
//! the data is. The costs: one small synced append per chunk changed per
//! flush interval, and on opening after a crash, a read of each chunk
//! listed. A store directory without log files predates checksums: all its
//! chunks are recomputed on first open. If syncing the log ever fails, no
//! later change can be logged reliably, so every write and zero fails until
//! the store is reopened.
//!
//! `delete_chunk` is not logged: it leaves the checksum file alone, so a
//! chunk whose unlink a crash undoes comes back with checksums that match it.
//! A chunk file created later at the same index starts by resetting its
//! checksums to those of zero blocks; `delete_volume` syncs the unlinks of
//! the chunks before it removes the checksum file.
//!
//! # Concurrency
//!
//! The chunk table is behind a read-write lock taken only to find a chunk.
//! Each chunk has its own small lock, held to reserve space, open its file or
//! update its bitmap, never during data I/O. Writes and zeros of one chunk
//! also hold its checksum update lock across their I/O, so they take turns
//! (the kernel already serialises buffered writes to one file, and the mmap
//! store copies under a lock of its own); reads run in parallel with them.
//! Writes and reads of different chunks never wait for each other.
//!
//! # Descriptor cache
//!
//! Open chunk files are kept open, up to a limit (by default a third of the
//! process's descriptor limit: each volume with open chunks also holds its
//! checksum file open). Beyond it, the least recently used clean file
//! (second-chance clock) is closed, with the chunk's checksums in memory. A
//! file with writes not yet flushed, or I/O in flight, stays open until it
//! is clean: `fdatasync` then runs on the descriptor the writes went through,
//! which is the one guaranteed to see any writeback error, and the
//! checksums in memory are the only up-to-date copy until the flush wrote
//! them.
//!
//! # Flush
//!
//! A write, zero or creation marks its chunk dirty after its I/O completed
//! and before it returns; creating or unlinking a chunk file or a checksum
//! file marks its directory (and a new volume directory marks the root)
//! dirty. `flush` starts a new dirty log epoch and waits for the changes of
//! the closing one still running; then, for every dirty chunk, writes its
//! checksums to the volume's checksum file (under the chunk's lock, so the
//! handle holding them cannot be closed first) and starts writeback; waits
//! with `fdatasync` (`fsync` when holes were punched) on each chunk file and
//! then on each checksum file written; `fsync`s every dirty directory; and
//! only then empties the closing epoch's log file. Flushes run one at a
//! time, so a flush that finds a chunk already taken by a flush in progress
//! waits for that flush to finish. A failed `fdatasync` may have dropped
//! data the kernel could not write back, so from then on every flush of the
//! store fails (and the log is never emptied): the data can only be trusted
//! again after reopening and rebuilding from a replica.

use super::alloc::{Bitmap, Space};
use super::sums::{self, block_crc, sums_offset, DirtyLog, Entered, Sums, SumsFile, ZERO_CRC};
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
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};
use torus_traits::storage::crcs_per_sector;
use torus_traits::{pagecache, ChunkRef, ChunkScan, Error, Result, VolumeId, SECTOR};

/// How bytes move between memory and one open chunk file.
pub(crate) trait ChunkIo: Send + Sync + Sized + 'static {
    /// Whether `read_cached` can ever succeed: without it a read is not
    /// even tried on the calling task (which would allocate a buffer for
    /// nothing).
    const CACHED_READS: bool = false;
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
    /// The bytes at `offset` without copying them, when the store can
    /// (`None`: use `read_vec`). Only asked for reads of at least
    /// [`PINNED_READ_MIN`] bytes, and only while someone wants file views
    /// (`torus_traits::pagecache::views_wanted`).
    fn read_pinned(&self, _offset: u64, _len: usize) -> Option<Bytes> {
        None
    }
    /// Like `read`, but only when it needs no disk I/O: `Ok(false)` means
    /// "not done, read with `read` on the blocking pool" (`buf` may then hold
    /// part of the data). By default nothing can be read that way.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8], _alloc: &Bitmap) -> io::Result<bool> {
        Ok(false)
    }
    /// `read_cached` into a new buffer of `len` bytes (`None`: not done).
    /// The default zero-fills one and calls `read_cached`; a store whose
    /// reads fill every byte themselves skips the zeroing, as in
    /// `read_vec`.
    fn read_cached_vec(
        &self,
        offset: u64,
        len: usize,
        alloc: &Bitmap,
    ) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; len];
        Ok(self.read_cached(offset, &mut buf, alloc)?.then_some(buf))
    }
    /// Reads a block that a write on the calling task is about to cover
    /// partly (to check and re-checksum it), like `read_cached`. A store
    /// whose write would wait for that block anyway (a store into a mapped
    /// page faults it in) may simply read it.
    fn read_block_inline(&self, offset: u64, buf: &mut [u8], alloc: &Bitmap) -> io::Result<bool> {
        self.read_cached(offset, buf, alloc)
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
    /// The last dirty log epoch the chunk was logged in (0: none).
    logged: AtomicU64,
    state: Mutex<ChunkState<H>>,
}

struct ChunkState<H> {
    /// The open file and checksums, if cached.
    handle: Option<Arc<Open<H>>>,
    /// The file exists on disk.
    created: bool,
    /// Deleted: this entry is dead; the next user makes a fresh one.
    deleted: bool,
    /// In the descriptor cache's clock list.
    in_cache: bool,
    /// Writes, zeros and checksum re-checks between taking the handle and
    /// completion: the handle must stay open meanwhile.
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
            logged: AtomicU64::new(0),
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

/// An open chunk: its file, and its checksums in memory.
pub(crate) struct Open<H> {
    io: H,
    sums: Sums,
    /// The volume's checksum file, and where this chunk's checksums are in it.
    sums_file: Arc<SumsFile>,
    sums_at: u64,
}

/// A handle obtained under a chunk's lock; `fresh` when it was just opened and
/// must be entered in the descriptor cache once the lock is released.
struct Opened<H> {
    handle: Arc<Open<H>>,
    fresh: bool,
}

/// A chunk and its open file.
type OpenChunk<H> = (Arc<Chunk<H>>, Opened<H>);

/// A block that failed its checksum: block, stored and computed checksums.
type Mismatch = (u64, u32, u32);

fn corrupt(id: ChunkRef, bad: &[Mismatch]) -> Error {
    let Some(&(block, stored, found)) = bad.first() else {
        return Error::Corrupt(format!("chunk {id}: checksum mismatch"));
    };
    let more = match bad.len() {
        1 => String::new(),
        n => format!(" (and {} more blocks)", n - 1),
    };
    Error::Corrupt(format!(
        "chunk {id} block {block}: checksum mismatch (stored {stored:#010x}, \
         data {found:#010x}){more}"
    ))
}

/// The checksum of a block as read, or `None` when it is a hole (no data
/// bit and a zero-block checksum: zeros by construction, not worth
/// checksumming).
fn checksum(block: &[u8], b: u64, alloc: &Bitmap, stored: u32) -> Option<u32> {
    (!is_hole(b, alloc, stored)).then(|| block_crc(block))
}

/// Whether block `b` is a hole: no data bit and a zero-block checksum.
fn is_hole(b: u64, alloc: &Bitmap, stored: u32) -> bool {
    stored == ZERO_CRC && !alloc.get(b)
}

/// The blocks of `buf` (the chunk's bytes from the block-aligned `start`)
/// that fail their checksums.
fn mismatches<H>(chunk: &Chunk<H>, sums: &Sums, start: u64, buf: &[u8]) -> Vec<u64> {
    let first = start / SECTOR;
    buf.chunks(SECTOR as usize)
        .zip(first..)
        .filter(|&(block, b)| {
            let stored = sums.get(b);
            checksum(block, b, &chunk.alloc, stored).is_some_and(|found| found != stored)
        })
        .map(|(_, b)| b)
        .collect()
}

/// The block-aligned range holding `[offset, offset+len)`.
fn aligned(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / SECTOR * SECTOR,
        (offset + len).div_ceil(SECTOR) * SECTOR,
    )
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
    /// Chunks that may have changes not yet flushed (see the module docs).
    log: DirtyLog,
    /// Checksum files open, by volume; each lives while an open chunk of
    /// its volume holds it. The count is when to next drop dead entries.
    sums_files: Mutex<(HashMap<VolumeId, Weak<SumsFile>>, usize)>,
    /// Large writes on the calling task are off until this instant (see
    /// [`INLINE_WRITE_MAX`]), in nanoseconds since `epoch`.
    large_inline_off_until: AtomicU64,
    epoch: Instant,
}

impl<H: ChunkIo> ChunkDir<H> {
    /// Opens (creating if needed) a store in `root`, rebuilds its
    /// accounting from the chunk files found there, and recomputes the
    /// checksums of the chunks the dirty log lists.
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

        let (log, logged) = DirtyLog::open(root)?;
        let mut recompute: Vec<(ChunkRef, PathBuf)> = match &logged {
            Some(ids) => ids
                .iter()
                .filter_map(|id| {
                    chunks
                        .get(id)
                        .map(|c: &Arc<Chunk<H>>| (*id, c.path.clone()))
                })
                .collect(),
            None => chunks.values().map(|c| (c.id, c.path.clone())).collect(),
        };
        recompute.sort_unstable_by_key(|(id, _)| *id);
        if !recompute.is_empty() {
            if logged.is_some() {
                tracing::info!(
                    dir = %root.display(),
                    chunks = recompute.len(),
                    "recomputing the checksums of chunks changed before an unclean shutdown"
                );
            } else {
                tracing::warn!(
                    dir = %root.display(),
                    chunks = recompute.len(),
                    "no dirty log: computing checksums of every chunk (store written without them)"
                );
            }
            sums::recompute(root, chunk_size, &recompute)?;
        }
        log.clear()?;

        let open_limit =
            sys::open_files_soft_limit().map_or(512, |soft| (soft / 3).clamp(16, 16384) as usize);
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
            log,
            sums_files: Mutex::new((HashMap::new(), 64)),
            large_inline_off_until: AtomicU64::new(0),
            epoch: Instant::now(),
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
        let Some((chunk, opened)) = self.open_existing(id)? else {
            return zeros();
        };
        let h = &opened.handle;
        // Whole blocks, to check their checksums.
        let (start, end) = aligned(offset, len);
        let at = (offset - start) as usize;
        if pinned_read(end - start) {
            if let Some(data) = h.io.read_pinned(start, (end - start) as usize) {
                if mismatches(&chunk, &h.sums, start, &data).is_empty() {
                    return Ok(data.slice(at..at + len as usize));
                }
                // Looked at again below, copied and under the lock.
            }
        }
        let mut buf =
            h.io.read_vec(start, (end - start) as usize, &chunk.alloc)
                .map_err(|e| chunk.io_error("reading", e))?;
        let suspects = mismatches(&chunk, &h.sums, start, &buf);
        if !suspects.is_empty() {
            let bad = self.recheck(&chunk, h, start, &mut buf, &suspects)?;
            if !bad.is_empty() {
                return Err(corrupt(id, &bad));
            }
        }
        Ok(Bytes::from(buf).slice(at..at + len as usize))
    }

    /// `read`, if it can be done without waiting for the disk: from the
    /// page cache through an already open descriptor. `None`: use `read`
    /// (also when a checksum fails: `read` looks again, under a lock).
    pub(crate) fn read_cached(&self, id: ChunkRef, offset: u64, len: u64) -> Result<Option<Bytes>> {
        check_range(id, offset, len, self.chunk_size)?;
        if !H::CACHED_READS {
            return Ok(None);
        }
        let zeros = || Ok(Some(Bytes::from(vec![0u8; len as usize])));
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let Some(chunk) = self.lookup(id) else {
            return zeros(); // never written
        };
        let handle = {
            let st = lock(&chunk.state);
            if st.deleted {
                return zeros();
            }
            // Opening a file may wait for the disk; leave that to `read`.
            match &st.handle {
                Some(h) => h.clone(),
                None => return Ok(None),
            }
        };
        chunk.referenced.store(true, Ordering::Relaxed);
        let (start, end) = aligned(offset, len);
        match handle
            .io
            .read_cached_vec(start, (end - start) as usize, &chunk.alloc)
        {
            Ok(Some(buf)) if mismatches(&chunk, &handle.sums, start, &buf).is_empty() => {
                let at = (offset - start) as usize;
                Ok(Some(Bytes::from(buf).slice(at..at + len as usize)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(chunk.io_error("reading", e)),
        }
    }

    /// Looks again at blocks that failed their checksums when read without a
    /// lock (`suspects`, blocks of `buf`, which holds the chunk's bytes from
    /// the block-aligned `start`): a write may have been changing them, or
    /// `own`, the handle they were read through, may since have been closed
    /// and the chunk reopened and written through another. Under the update
    /// lock of the chunk's current handle, data and checksums agree. Puts
    /// what it read into `buf`; returns the blocks that still fail.
    fn recheck(
        &self,
        chunk: &Arc<Chunk<H>>,
        own: &Arc<Open<H>>,
        start: u64,
        buf: &mut [u8],
        suspects: &[u64],
    ) -> Result<Vec<Mismatch>> {
        let current = {
            let mut st = lock(&chunk.state);
            if st.deleted {
                None
            } else {
                let opened = self.handle(chunk, &mut st, false)?;
                if opened.is_some() {
                    // Keeps the handle (and its checksums) from being closed.
                    st.inflight += 1;
                }
                opened
            }
        };
        if let Some(opened) = &current {
            self.cache_fresh(chunk, opened);
        }
        // A deleted chunk has no current handle; no write changes its
        // checksums any more but through the handles it had.
        let h = current.as_ref().map_or(own, |o| &o.handle);
        let result = (|| -> Result<Vec<Mismatch>> {
            let _update = h.sums.lock();
            let mut bad = Vec::new();
            for &b in suspects {
                let at = (b * SECTOR - start) as usize;
                let block = &mut buf[at..at + SECTOR as usize];
                block.fill(0);
                h.io.read(b * SECTOR, block, &chunk.alloc)
                    .map_err(|e| chunk.io_error("reading", e))?;
                let stored = h.sums.get(b);
                if let Some(found) = checksum(block, b, &chunk.alloc, stored) {
                    if found != stored {
                        bad.push((b, stored, found));
                    }
                }
            }
            Ok(bad)
        })();
        if current.is_some() {
            lock(&chunk.state).inflight -= 1;
        }
        result
    }

    /// Checksums every block of a chunk as stored and lists those that fail.
    pub(crate) fn scan_chunk(&self, id: ChunkRef) -> Result<ChunkScan> {
        let blocks = self.blocks_per_chunk as usize;
        let zeros = || {
            Ok(ChunkScan {
                crcs: vec![ZERO_CRC; blocks],
                bad: Vec::new(),
            })
        };
        let Some((chunk, opened)) = self.open_existing(id)? else {
            return zeros();
        };
        let h = &opened.handle;
        let mut data =
            h.io.read_vec(0, self.chunk_size as usize, &chunk.alloc)
                .map_err(|e| chunk.io_error("reading", e))?;
        let mut crcs = Vec::with_capacity(blocks);
        let mut suspects = Vec::new();
        for (block, b) in data.chunks(SECTOR as usize).zip(0u64..) {
            let stored = h.sums.get(b);
            let crc = checksum(block, b, &chunk.alloc, stored).unwrap_or(ZERO_CRC);
            if crc != stored {
                suspects.push(b);
            }
            crcs.push(crc);
        }
        let mut bad = Vec::new();
        if !suspects.is_empty() {
            let failing = self.recheck(&chunk, h, 0, &mut data, &suspects)?;
            for &b in &suspects {
                let at = (b * SECTOR) as usize;
                crcs[b as usize] = block_crc(&data[at..at + SECTOR as usize]);
            }
            bad = failing.iter().map(|&(b, _, _)| b as u32).collect();
        }
        Ok(ChunkScan { crcs, bad })
    }

    /// `write`, on the calling task: `Ok(false)` when that would mean
    /// waiting for the disk (to log the chunk as dirty, or to read a block
    /// the write covers partly that is not cached) or for another write's
    /// hold on the chunk's checksums, having changed nothing; then call
    /// `write`.
    pub(crate) fn write_inline(&self, id: ChunkRef, offset: u64, data: &[u8]) -> Result<bool> {
        self.write_impl(id, offset, data, true)
    }

    /// `write_inline` if `data` is small enough to write on the calling
    /// task ([`INLINE_IO_MAX`], or [`INLINE_WRITE_MAX`] unless a recent
    /// large write there was slow); `Ok(false)`: call `write` on the pool.
    pub(crate) fn write_on_task(&self, id: ChunkRef, offset: u64, data: &[u8]) -> Result<bool> {
        if data.len() <= INLINE_IO_MAX {
            return self.write_inline(id, offset, data);
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        if data.len() > INLINE_WRITE_MAX
            || now < self.large_inline_off_until.load(Ordering::Relaxed)
        {
            return Ok(false);
        }
        let started = Instant::now();
        let done = self.write_impl(id, offset, data, true);
        self.timed_large_inline(id, started.elapsed());
        done
    }

    /// Turns large writes on the calling task off for
    /// [`LARGE_INLINE_PAUSE`] if one took `took`, longer than
    /// [`SLOW_INLINE_WRITE`].
    fn timed_large_inline(&self, id: ChunkRef, took: Duration) {
        if took <= SLOW_INLINE_WRITE {
            return;
        }
        let off_until = self.epoch.elapsed() + LARGE_INLINE_PAUSE;
        self.large_inline_off_until
            .fetch_max(off_until.as_nanos() as u64, Ordering::Relaxed);
        tracing::debug!(chunk = %id, ?took,
            "slow write on the calling task: large writes go to the blocking pool for a while");
    }

    /// As if a large write on the calling task had taken `took`.
    #[cfg(test)]
    pub(crate) fn pretend_large_inline_took(&self, took: Duration) {
        self.timed_large_inline(ChunkRef::new(VolumeId(0), 0), took);
    }

    /// Runs `f` while holding the update lock of chunk `id` (open).
    #[cfg(test)]
    pub(crate) fn with_update_lock<R>(&self, id: ChunkRef, f: impl FnOnce() -> R) -> R {
        let chunk = self.lookup(id).expect("chunk exists");
        let handle = lock(&chunk.state).handle.clone().expect("chunk open");
        let _held = handle.sums.lock();
        f()
    }

    pub(crate) fn write(&self, id: ChunkRef, offset: u64, data: &[u8]) -> Result<()> {
        self.write_impl(id, offset, data, false).map(drop)
    }

    fn write_impl(&self, id: ChunkRef, offset: u64, data: &[u8], inline: bool) -> Result<bool> {
        let len = data.len() as u64;
        check_range(id, offset, len, self.chunk_size)?;
        if len == 0 {
            return Ok(true);
        }
        let blocks = blocks_touched(offset, len);
        // Checksums of the whole blocks, before taking any lock.
        let inside = blocks_inside(offset, len);
        let whole: Vec<u32> = if inside.is_empty() {
            Vec::new()
        } else {
            let from = (inside.start * SECTOR - offset) as usize;
            let to = (inside.end * SECTOR - offset) as usize;
            crcs_per_sector(&data[from..to])
        };
        let entered = self.log.enter();
        let (chunk, opened, reserved) = loop {
            let chunk = self.lookup_or_insert(id);
            if !self.ensure_logged(&entered, &chunk, inline)? {
                return Ok(false);
            }
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
        // On the calling task, do not wait for the update lock: a large
        // write on the blocking pool may hold it for a whole `pwrite`, and
        // the caller may be a connection's reader (see `tcp::serve`).
        let held = if inline {
            let Some(held) = h.sums.try_lock() else {
                self.undo(&chunk, reserved);
                return Ok(false);
            };
            Some(held)
        } else {
            None
        };
        if reserved > 0 {
            if let Err(e) = h.io.preallocate(offset, len) {
                // Nothing written: give the reservation back.
                drop(held);
                self.undo(&chunk, reserved);
                return Err(chunk.io_error("allocating space in", e));
            }
        }
        let update = held.unwrap_or_else(|| h.sums.lock());
        // The blocks covered only partly: check what they hold and checksum
        // them merged with the new bytes, before writing anything.
        let mut edges: [Option<(u64, u32)>; 2] = [None, None];
        for (edge, (off, n)) in edges.iter_mut().zip(partial_edges(offset, len)) {
            if n == 0 {
                continue;
            }
            let b = off / SECTOR;
            let mut block = [0u8; SECTOR as usize];
            match self.old_block(&chunk, h, b, &mut block, inline) {
                Ok(true) => {}
                other => {
                    drop(update);
                    self.undo(&chunk, reserved);
                    return other;
                }
            }
            let at = (off % SECTOR) as usize;
            let from = (off - offset) as usize;
            block[at..at + n as usize].copy_from_slice(&data[from..from + n as usize]);
            *edge = Some((b, block_crc(&block)));
        }
        let result =
            h.io.write(offset, data)
                .map_err(|e| chunk.io_error("writing", e));
        if result.is_ok() {
            for (b, crc) in inside.zip(whole) {
                h.sums.set(b, crc);
            }
            for (b, crc) in edges.into_iter().flatten() {
                h.sums.set(b, crc);
            }
        }
        let mut st = lock(&chunk.state);
        st.inflight -= 1;
        if st.deleted {
            // Deleted meanwhile: delete released what was counted then,
            // which did not include this reservation.
            self.space.release(reserved);
        } else {
            // Count the blocks even when the write failed: part of it may
            // have reached the file, and a later zero must clear it. (Under
            // the update lock: a read re-checking a block under it must see
            // the data bit of a block just written.)
            let newly = chunk.alloc.set(blocks);
            chunk.allocated.fetch_add(newly, Ordering::Relaxed);
            if newly <= reserved {
                self.space.release(reserved - newly);
            } else {
                self.space.force_add(newly - reserved);
            }
            self.mark_dirty(&chunk, &mut st, false);
        }
        drop(st);
        drop(update);
        result.map(|()| true)
    }

    /// Reads block `b` into `buf` (zeroed) and checks it against its
    /// checksum, under the chunk's update lock; `Ok(false)` when `inline`
    /// and the block is not cached.
    fn old_block(
        &self,
        chunk: &Chunk<H>,
        h: &Open<H>,
        b: u64,
        buf: &mut [u8; SECTOR as usize],
        inline: bool,
    ) -> Result<bool> {
        let stored = h.sums.get(b);
        let found = if chunk.alloc.get(b) {
            let at = b * SECTOR;
            let read = if inline {
                h.io.read_block_inline(at, buf, &chunk.alloc)
            } else {
                h.io.read(at, buf, &chunk.alloc).map(|()| true)
            };
            if !read.map_err(|e| chunk.io_error("reading", e))? {
                return Ok(false);
            }
            block_crc(buf)
        } else {
            ZERO_CRC // a hole: `buf` stays zeros
        };
        if found != stored {
            return Err(corrupt(chunk.id, &[(b, stored, found)]));
        }
        Ok(true)
    }

    /// Ends a write or zero that changed nothing.
    fn undo(&self, chunk: &Chunk<H>, reserved: u64) {
        let mut st = lock(&chunk.state);
        st.inflight -= 1;
        self.space.release(reserved);
    }

    /// Makes sure the chunk is in the dirty log of `entered`'s epoch;
    /// `Ok(false)` when that needs a sync and `inline` forbids it.
    fn ensure_logged(&self, entered: &Entered<'_>, chunk: &Chunk<H>, inline: bool) -> Result<bool> {
        if chunk.logged.load(Ordering::Acquire) == entered.epoch() {
            return Ok(true);
        }
        if inline {
            return Ok(false);
        }
        self.log.append(entered, chunk.id)?;
        chunk.logged.fetch_max(entered.epoch(), Ordering::AcqRel);
        Ok(true)
    }

    pub(crate) fn zero(&self, id: ChunkRef, offset: u64, len: u64) -> Result<()> {
        check_range(id, offset, len, self.chunk_size)?;
        if len == 0 {
            return Ok(());
        }
        let Some(chunk) = self.lookup(id) else {
            return Ok(()); // never written: already zeros
        };
        let entered = self.log.enter();
        self.ensure_logged(&entered, &chunk, false)?;
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
        let update = h.sums.lock();

        // Partial blocks at the edges: only those holding data need zeros.
        // Check them first, so that a rotten one fails the zero before
        // anything changed instead of being checksummed anew.
        let mut edges: [Option<(u64, u64, u32)>; 2] = [None, None];
        for (edge, (off, n)) in edges.iter_mut().zip(partial_edges(offset, len)) {
            let b = off / SECTOR;
            if n == 0 || !chunk.alloc.get(b) {
                continue;
            }
            let mut block = [0u8; SECTOR as usize];
            if let Err(e) = self.old_block(&chunk, h, b, &mut block, false) {
                drop(update);
                self.undo(&chunk, 0);
                return Err(e);
            }
            let at = (off % SECTOR) as usize;
            block[at..at + n as usize].fill(0);
            *edge = Some((off, n, block_crc(&block)));
        }

        // Whole blocks: punch a hole, or, where the file system cannot,
        // overwrite the ones holding data with zeros (they stay allocated).
        let inside = blocks_inside(offset, len);
        let mut punched = false;
        let mut result = Ok(());
        if !inside.is_empty() {
            let (start, n) = (inside.start * SECTOR, (inside.end - inside.start) * SECTOR);
            match h.io.punch_hole(start, n) {
                Ok(()) => {
                    punched = true;
                    for b in inside.clone() {
                        h.sums.set(b, ZERO_CRC);
                    }
                }
                Err(e) if sys::is_unsupported(&e) => {
                    for block in inside.clone() {
                        if chunk.alloc.get(block) {
                            if let Err(e) = h.io.write_zeros(block * SECTOR, SECTOR) {
                                result = Err(chunk.io_error("zeroing", e));
                                break;
                            }
                            h.sums.set(block, ZERO_CRC);
                        }
                    }
                }
                Err(e) => result = Err(chunk.io_error("punching a hole in", e)),
            }
        }
        if result.is_ok() {
            for (off, n, crc) in edges.into_iter().flatten() {
                if let Err(e) = h.io.write_zeros(off, n) {
                    result = Err(chunk.io_error("zeroing", e));
                    break;
                }
                h.sums.set(off / SECTOR, crc);
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
        drop(st);
        drop(update);
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
    /// zeroed (which `list_chunks` leaves out but which still have a file),
    /// and then the volume's checksum file.
    pub(crate) fn delete_volume(&self, volume: VolumeId) -> Result<()> {
        let ids: Vec<ChunkRef> = read_lock(&self.chunks)
            .keys()
            .filter(|c| c.volume == volume)
            .copied()
            .collect();
        for id in ids {
            self.delete_chunk(id)?;
        }
        self.remove_sums_file(volume)
    }

    /// Removes a volume's checksum file if no chunk of the volume is left.
    fn remove_sums_file(&self, volume: VolumeId) -> Result<()> {
        // Held throughout, so no chunk of the volume opens the file meanwhile.
        let mut files = lock(&self.sums_files);
        if files.0.get(&volume).is_some_and(|f| f.strong_count() > 0)
            || read_lock(&self.chunks).keys().any(|c| c.volume == volume)
        {
            return Ok(()); // in use (a chunk written meanwhile)
        }
        files.0.remove(&volume);
        let dir = self.root.join(volume.0.to_string());
        let path = dir.join(sums::SUMS_FILE);
        if !path.is_file() {
            return Ok(());
        }
        // The chunks' unlinks first: a crash must not bring back a chunk
        // file without the checksums that match it.
        sync_dir(&dir)?;
        match fs::remove_file(&path) {
            Ok(()) => self.mark_dir_dirty(Some(&dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("deleting {}", path.display()), e)),
        }
        Ok(())
    }

    pub(crate) fn flush(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.flush_lock);
        // From here on, changes log into the next epoch; once this returns,
        // every change of the closing one has marked its chunk dirty.
        let closing = self.log.begin_flush();
        let chunks = std::mem::take(&mut *lock(&self.dirty));
        let dirs = std::mem::take(&mut *lock(&self.dirty_dirs));

        // Take each chunk's dirty mark before syncing it: a write completing
        // after this point marks it again for the next flush.
        let mut pending = Vec::with_capacity(chunks.len());
        let mut sums_files: Vec<Arc<SumsFile>> = Vec::new();
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
            // Under the chunk's lock: once it is clean, its handle (with the
            // only up-to-date copy of its checksums) may be closed.
            let h = &opened.handle;
            let stored = h.sums_file.store(h.sums_at, &h.sums);
            drop(st);
            self.cache_fresh(&chunk, &opened);
            if let Err(e) = stored {
                let e = chunk.io_error("writing the checksums of", e);
                let _ = self.sync_failed.set(e.to_string());
                result = result.and(Err(e));
                continue;
            }
            sys::start_writeback(h.io.file());
            if !sums_files.iter().any(|f| Arc::ptr_eq(f, &h.sums_file)) {
                sums_files.push(h.sums_file.clone());
            }
            pending.push((chunk, opened.handle, meta));
        }
        for f in &sums_files {
            sys::start_writeback(&f.file);
        }
        for (chunk, handle, meta) in pending {
            let file = handle.io.file();
            let synced = if meta {
                file.sync_all()
            } else {
                file.sync_data()
            };
            if let Err(e) = synced {
                let e = chunk.io_error("syncing", e);
                let _ = self.sync_failed.set(e.to_string());
                result = result.and(Err(e));
            }
        }
        for f in sums_files {
            if let Err(e) = f.file.sync_data() {
                let e = Error::io(format!("syncing {}", f.path.display()), e);
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
        // Everything the closing epoch changed is durable. Failing to empty
        // its log file loses nothing (its chunks are recomputed needlessly
        // after a crash), so the flush still succeeds.
        if let Err(e) = self.log.end_flush(closing) {
            tracing::warn!(dir = %self.root.display(), "emptying the dirty log: {e}");
        }
        Ok(())
    }

    fn lookup(&self, id: ChunkRef) -> Option<Arc<Chunk<H>>> {
        read_lock(&self.chunks).get(&id).cloned()
    }

    /// A chunk that exists, with its file open (for reading); `None` when it
    /// was never written or is deleted (it reads as zeros).
    fn open_existing(&self, id: ChunkRef) -> Result<Option<OpenChunk<H>>> {
        let Some(chunk) = self.lookup(id) else {
            return Ok(None);
        };
        let opened = {
            let mut st = lock(&chunk.state);
            if st.deleted {
                None
            } else {
                self.handle(&chunk, &mut st, false)?
            }
        };
        Ok(opened.map(|opened| {
            self.cache_fresh(&chunk, &opened);
            (chunk, opened)
        }))
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

    /// The chunk's open handle, opening its file and loading its checksums
    /// if needed. With `create`, the file is created if it does not exist
    /// yet; without, `None` then.
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
        if !st.created && !create {
            return Ok(None);
        }
        let sums_at = sums_offset(chunk.id, self.blocks_per_chunk)?;
        let sums_file = self.sums_file(chunk.id.volume)?;
        let (file, sums) = if st.created {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&chunk.path)
                .map_err(|e| chunk.io_error("opening", e))?;
            let sums = Sums::load(&sums_file.file, sums_at, self.blocks_per_chunk)
                .map_err(|e| chunk.io_error("reading the checksums of", e))?;
            (file, sums)
        } else {
            // A new chunk reads as zeros; a deleted chunk of the same index
            // may have left other checksums in the file.
            sums_file
                .reset(sums_at, self.blocks_per_chunk)
                .map_err(|e| chunk.io_error("resetting the checksums of", e))?;
            let file = self.create_file(chunk)?;
            st.created = true;
            (file, Sums::zeroed(self.blocks_per_chunk))
        };
        sys::no_atime(&file);
        let io = H::open(file, self.chunk_size).map_err(|e| chunk.io_error("opening", e))?;
        let handle = Arc::new(Open {
            io,
            sums,
            sums_file,
            sums_at,
        });
        st.handle = Some(handle.clone());
        chunk.referenced.store(true, Ordering::Relaxed);
        let fresh = !st.in_cache;
        st.in_cache = true;
        Ok(Some(Opened { handle, fresh }))
    }

    /// The volume's checksum file, opened (and created, with the volume's
    /// directory, if needed) unless an open chunk of the volume has it open.
    fn sums_file(&self, volume: VolumeId) -> Result<Arc<SumsFile>> {
        let mut files = lock(&self.sums_files);
        if let Some(f) = files.0.get(&volume).and_then(Weak::upgrade) {
            return Ok(f);
        }
        let vol_dir = self.root.join(volume.0.to_string());
        let context = |e| {
            Error::io(
                format!("opening {}", vol_dir.join(sums::SUMS_FILE).display()),
                e,
            )
        };
        let (f, created) = match SumsFile::open(&vol_dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // First chunk of this volume: make its directory.
                match fs::create_dir(&vol_dir) {
                    Ok(()) => self.mark_dir_dirty(Some(&self.root)),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::io(format!("creating {}", vol_dir.display()), e)),
                }
                SumsFile::open(&vol_dir).map_err(context)?
            }
            other => other.map_err(context)?,
        };
        if created {
            self.mark_dir_dirty(Some(&vol_dir));
        }
        let f = Arc::new(f);
        let (table, prune_at) = &mut *files;
        if table.len() >= *prune_at {
            table.retain(|_, f| f.strong_count() > 0);
            *prune_at = (table.len() * 2).max(64);
        }
        table.insert(volume, Arc::downgrade(&f));
        Ok(f)
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

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// Largest write done on the calling task instead of the blocking pool.
///
/// A small buffered write only copies into the page cache: a few
/// microseconds, less than handing it to a blocking-pool thread and waking
/// the task again (two context switches, which dominated small replicated
/// writes in profiles). A write goes to the pool when its chunk must
/// first be entered in the dirty log (a sync) or a block it covers partly
/// is not cached. Larger writes and flushes always go to the pool.
pub(crate) const INLINE_IO_MAX: usize = 64 * 1024;

/// Largest write done on the calling task while large writes there are
/// fast. Handing a 1 MiB write to the blocking pool and waking the task
/// again cost more than the copy into the page cache itself, and on two
/// cores the pool's threads competed with the connection that feeds them:
/// with the NBD reader running such writes itself (see the NBD server's
/// `INLINE_WRITE_MIN`), 1 MiB writes at queue depth 8 ran at 3.2–3.9 GB/s
/// instead of 2.6–3.1, for 0.24–0.27 instead of 0.33–0.40 s of server CPU
/// per GB. This half alone saved 8 % of the CPU at the same speed.
///
/// The risk is a `pwrite` that blocks: the kernel throttling a writer
/// that dirties pages faster than the disk takes them (up to 200 ms a
/// pause), or reclaiming memory. That would hold a runtime worker and
/// every task queued behind it. So a large write on the task that takes
/// longer than [`SLOW_INLINE_WRITE`] (a cached 1 MiB write takes about
/// 0.2 ms) sends large writes to the pool for [`LARGE_INLINE_PAUSE`]:
/// a throttled disk costs a worker one such stall per pause at most.
pub(crate) const INLINE_WRITE_MAX: usize = 1024 * 1024;

/// A large write on the calling task slower than this turns them off for
/// [`LARGE_INLINE_PAUSE`].
pub(crate) const SLOW_INLINE_WRITE: Duration = Duration::from_millis(3);

/// How long large writes go to the blocking pool after a slow one.
pub(crate) const LARGE_INLINE_PAUSE: Duration = Duration::from_secs(1);

/// Largest read served from the page cache on the calling task. Reads try
/// the page cache without blocking first (`RWF_NOWAIT`) and go to the pool
/// only when the disk must be read, or when a checksum fails.
///
/// Up to 1 MiB, because the hand-off costs more than it spares the task:
/// a 1 MiB copy and its checksums take about 0.1 ms, while every
/// `spawn_blocking` takes the blocking pool's one lock, which the pool's
/// threads also take, and on two cores that lock was contended on every
/// large read (`sched_yield` in its spin loop, 1,000 a second per worker).
/// Served on the task, 1 MiB reads cost the server a fifth less CPU
/// (0.42–0.46 instead of 0.50–0.53 s per GB on the same data). Larger reads, and large
/// reads while file views are wanted ([`PINNED_READ_MIN`]), still go to
/// the pool.
pub(crate) const INLINE_READ_MAX: usize = 1024 * 1024;

/// Reads this large are served from the page cache without a copy where the
/// store can ([`ChunkIo::read_pinned`]) while a consumer wants file views
/// (`torus_traits::pagecache::views_wanted`: the NBD server with splicing
/// on). Below it, mapping and locking cost more than the copy they save
/// (no gain at 256 KiB). Without a consumer the mapping is not worth it
/// either: mapping, locking and unmapping (which takes the process's
/// memory-map lock and shoots down other cores' TLB entries) cost about
/// what the copy does, and they need the blocking pool.
pub(crate) const PINNED_READ_MIN: usize = 512 * 1024;

/// Whether a read of `len` bytes is made as a file view
/// ([`PINNED_READ_MIN`]) where the store can, instead of being copied.
pub(crate) fn pinned_read(len: u64) -> bool {
    len >= PINNED_READ_MIN as u64 && pagecache::views_wanted()
}

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
/// writes and reads the page cache holds (see [`INLINE_IO_MAX`] and
/// [`INLINE_READ_MAX`]).
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
                use $crate::storage::chunk_dir::{pinned_read, INLINE_READ_MAX};
                // A read to be made a file view needs the blocking pool.
                if len <= INLINE_READ_MAX as u64 && !pinned_read(len) {
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
                if self.dir.write_on_task(chunk, offset, &data)? {
                    return Ok(());
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

            async fn scan_chunk(
                &self,
                chunk: torus_traits::ChunkRef,
            ) -> torus_traits::Result<torus_traits::ChunkScan> {
                $crate::storage::chunk_dir::blocking(&self.dir, move |d| d.scan_chunk(chunk)).await
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
