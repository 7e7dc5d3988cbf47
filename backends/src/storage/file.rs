//! [`FileBlockStore`]: one sparse file per chunk, read and written with
//! positional I/O (`pread`/`pwrite`) on cached descriptors.
//!
//! Layout, accounting, checksums, the descriptor cache and flush are shared
//! with the mmap store and described in the `chunk_dir` module: chunks live
//! at `<dir>/<volume>/<index>`, each 4 KiB block has a crc32c (kept in
//! `<dir>/<volume>/crc32c`) that every read checks, space is counted exactly
//! in 4 KiB blocks, `zero` punches holes, and `flush` is `fdatasync` of every
//! chunk and checksum file written since the last flush plus `fsync` of every
//! directory whose entries changed, after which the dirty log that makes the
//! checksums crash consistent is emptied.
//!
//! Reads are copied with `pread` into memory that is not zeroed first. While
//! a consumer wants file views (the NBD server with splicing on), reads of
//! at least 512 KiB inside the file are not copied: the range is mapped and
//! locked in memory (`sys::Pinned`), checked against its checksums there,
//! and handed up as `Bytes` that the NBD server splices into its socket by
//! reference (the mapping is registered as a file view,
//! `torus_traits::pagecache`; see `chunk_dir::PINNED_READ_MIN`). A range
//! that fails to map or to check is read with `pread`.
//!
//! Reads, flushes and large writes run on tokio's blocking pool
//! (`spawn_blocking`), so a slow disk stalls no async task; writes of up to
//! 64 KiB only copy into the page cache and run on the calling task, which
//! is cheaper than the hand-off, and so do writes of up to 1 MiB unless
//! one of them was slow in the last second, and reads of up to 1 MiB that
//! the page cache holds (`preadv2` with `RWF_NOWAIT`; those of 512 KiB or
//! more go to the pool while file views are wanted; see
//! `chunk_dir::INLINE_IO_MAX`, `INLINE_WRITE_MAX` and `INLINE_READ_MAX`; a
//! write still goes to the pool when its chunk must first be entered in
//! the dirty log, once per chunk per flush). Files are read
//! and written concurrently through one shared descriptor each: `pread` and
//! `pwrite` need no lock.

use super::alloc::Bitmap;
use super::chunk_dir::{chunk_dir_block_store, pwrite_zeros, ChunkDir, ChunkIo};
use super::sys;
use bytes::Bytes;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use torus_traits::Result;

/// The largest single `pwrite`. The page cache sizes a file's folios by the
/// writes that create them (ext4 has large folios since Linux 6.16), and
/// every later write into a folio walks all of its buffer heads: after
/// 1 MiB writes, a 4 KiB overwrite of the same file costs about six times
/// more CPU than after 64 KiB ones, and the 1 MiB writes themselves run at
/// half the speed of the same bytes in 64 KiB pieces (measured on Linux
/// 6.18, ext4, 1 GiB file: 1.1–1.5 GB/s vs 3.3 GB/s sequential, 41–45 k vs
/// 257 k random 4 KiB pwrites per second afterwards). Smaller pieces cost
/// sequential throughput (16 KiB: 2.4 GB/s), larger ones the random writes
/// (256 KiB: 136 k/s). Rechecked through the server (Linux 6.18.44, a
/// fresh 1 GiB volume written once, then overwritten with 1 MiB writes at
/// QD8, then 4 KiB random writes at QD32): 64 KiB pieces 3.75 GB/s then
/// 92–97 k IOPS; 256 KiB 4.03 GB/s then 57–60 k; 1 MiB 3.0–4.2 GB/s then
/// 41 k, and its first pass, which allocates, ran at 0.7–0.8 GB/s against
/// 1.2–1.4.
///
/// A range the page cache already holds in full (`sys::all_cached`) is
/// written in one `pwrite`: the folios are there, whatever their size, and
/// a write only creates folios for what is missing, so this changes no
/// folio's size and saves the calls. Overwriting a 1 GiB file in 1 MiB
/// writes whose folios came from 64 KiB pieces: 0.118–0.121 s of CPU per
/// GB against 0.129–0.130 in pieces (the check included). For comparison,
/// the same overwrite of folios made by 1 MiB writes costs 0.098: the price
/// of keeping random writes fast. Folios made by pieces of 64, 128, 256
/// KiB and 1 MiB (a scratch C program, Linux 6.18.44): 1 MiB overwrites
/// 0.126, 0.117, 0.110, 0.103–0.111 s per GB; 4 KiB random overwrites
/// 3.9, 5.4–5.9, 7.0, 21–23 µs of CPU each.
const WRITE_PIECE: usize = 64 << 10;

/// Reads `len` bytes at `offset` into new memory that is not zeroed first,
/// calling `read` for what is still missing: it returns how many bytes it
/// read (0 at the end of the file, after which the rest reads as zeros,
/// as past the end of a chunk written only near its start) or `None` to
/// give up, which this returns.
///
/// # Safety
/// `read` must have written the first `n` bytes of the slice it was given
/// when it returns `Some(n)`, and `n` must not exceed the slice's length.
unsafe fn read_new(
    len: usize,
    offset: u64,
    mut read: impl FnMut(&mut [MaybeUninit<u8>], u64) -> io::Result<Option<usize>>,
) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let spare = &mut buf.spare_capacity_mut()[..len - done];
        let n = match read(spare, offset + done as u64)? {
            Some(0) => break,
            Some(n) => n,
            None => return Ok(None),
        };
        // SAFETY: `read` initialised the next `n` bytes, within the spare
        // capacity it was given (the caller's promise).
        unsafe { buf.set_len(done + n) };
    }
    buf.resize(len, 0);
    Ok(Some(buf))
}

/// A `BlockStore` keeping each chunk in its own sparse file under one
/// directory.
pub struct FileBlockStore {
    dir: Arc<ChunkDir<FileChunk>>,
}

impl FileBlockStore {
    /// Opens the store in `dir` (created if missing) with chunks of
    /// `chunk_size` bytes (a non-zero multiple of 4 KiB) and a pool of
    /// `capacity` bytes, rebuilding the space accounting from the chunk files
    /// already there. A capacity smaller than what is already used is
    /// accepted: writes needing new space then fail with `NoSpace`.
    pub fn open(dir: &Path, chunk_size: u64, capacity: u64) -> Result<Self> {
        Ok(FileBlockStore {
            dir: Arc::new(ChunkDir::open(dir, chunk_size, capacity)?),
        })
    }

    /// The directory holding the chunk files.
    pub fn dir(&self) -> &Path {
        self.dir.root()
    }

    /// How many chunk files are kept open at most (more may be, while they
    /// have unflushed writes).
    pub fn open_files_limit(&self) -> usize {
        self.dir.open_files_limit()
    }

    /// Changes the descriptor cache's limit (at least 1).
    pub fn set_open_files_limit(&self, limit: usize) {
        self.dir.set_open_files_limit(limit)
    }
}

impl std::fmt::Debug for FileBlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBlockStore")
            .field("dir", &self.dir.root())
            .field("chunk_size", &self.dir.chunk_size())
            .field("capacity", &self.dir.capacity())
            .finish()
    }
}

chunk_dir_block_store!(FileBlockStore);

/// An open chunk file.
pub(crate) struct FileChunk {
    file: File,
}

impl ChunkIo for FileChunk {
    const CACHED_READS: bool = true;
    fn open(file: File, _chunk_size: u64) -> io::Result<Self> {
        Ok(FileChunk { file })
    }

    fn file(&self) -> &File {
        &self.file
    }

    fn read(&self, offset: u64, buf: &mut [u8], _alloc: &Bitmap) -> io::Result<()> {
        // Holes read as zeros by themselves; past the end of the file (a
        // chunk written only near its start) `buf` keeps its zeros.
        super::sums::read_at_most(&self.file, buf, offset).map(drop)
    }

    fn read_vec(&self, offset: u64, len: usize, _alloc: &Bitmap) -> io::Result<Vec<u8>> {
        let pread = |spare: &mut [MaybeUninit<u8>], at| loop {
            match sys::pread_uninit(&self.file, spare, at) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                read => return read.map(Some),
            }
        };
        // SAFETY: `pread_uninit` returns how many bytes it wrote.
        let buf = unsafe { read_new(len, offset, pread) }?;
        // Never `None`: this `pread` never gives up.
        Ok(buf.unwrap_or_default())
    }

    fn read_pinned(&self, offset: u64, len: usize) -> Option<Bytes> {
        sys::Pinned::map(&self.file, offset, len).map(Bytes::from_owner)
    }

    fn read_cached_vec(
        &self,
        offset: u64,
        len: usize,
        _alloc: &Bitmap,
    ) -> io::Result<Option<Vec<u8>>> {
        let pread =
            |spare: &mut [MaybeUninit<u8>], at| sys::pread_cached_uninit(&self.file, spare, at);
        // SAFETY: `pread_cached_uninit` returns how many bytes it wrote.
        unsafe { read_new(len, offset, pread) }
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8], _alloc: &Bitmap) -> io::Result<bool> {
        // Bounded: every pass reads at least one byte or returns.
        let mut done = 0;
        while done < buf.len() {
            match sys::pread_cached(&self.file, &mut buf[done..], offset + done as u64)? {
                Some(0) => break, // end of file: the rest stays zeros
                Some(n) => done += n,
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        // Whole where the page cache already holds the range, else in
        // pieces: see WRITE_PIECE.
        if data.len() > WRITE_PIECE && sys::all_cached(&self.file, offset, data.len() as u64) {
            return self.file.write_all_at(data, offset);
        }
        let mut offset = offset;
        for piece in data.chunks(WRITE_PIECE) {
            self.file.write_all_at(piece, offset)?;
            offset += piece.len() as u64;
        }
        Ok(())
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        pwrite_zeros(&self.file, offset, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        sys::punch_hole(&self.file, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use torus_traits::{ChunkRef, VolumeId};

    #[test]
    fn small_reads_come_from_the_page_cache_only_through_open_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let chunk = ChunkRef::new(VolumeId(1), 0);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        {
            let store = FileBlockStore::open(tmp.path(), 1 << 20, 8 << 20).expect("open");
            store.dir.write(chunk, 4096, &data).expect("write");
            // Just written: cached, and the descriptor is open.
            let got = store.dir.read_cached(chunk, 0, 16384).expect("read");
            let got = got.expect("served from the page cache");
            assert_eq!(&got[..4096], &[0u8; 4096][..], "hole before the data");
            assert_eq!(&got[4096..12288], &data[..]);
            assert_eq!(&got[12288..], &[0u8; 4096][..], "past the end of the file");
            // A chunk never written reads as zeros without any I/O.
            let other = ChunkRef::new(VolumeId(1), 3);
            let zeros = store.dir.read_cached(other, 0, 4096).expect("read");
            assert_eq!(zeros.as_deref(), Some(&[0u8; 4096][..]));
        }
        // Reopened: no descriptor is open yet, so the read is left to the
        // blocking path, which still returns the data.
        let store = FileBlockStore::open(tmp.path(), 1 << 20, 8 << 20).expect("reopen");
        assert!(store
            .dir
            .read_cached(chunk, 0, 4096)
            .expect("read")
            .is_none());
        let got = store.dir.read(chunk, 4096, 8192).expect("read");
        assert_eq!(&got[..], &data[..]);
    }

    #[test]
    fn an_inline_write_does_not_wait_for_another_writes_hold() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = FileBlockStore::open(tmp.path(), 1 << 20, 8 << 20).expect("open");
        let chunk = ChunkRef::new(VolumeId(1), 0);
        store.dir.write(chunk, 0, &[1u8; 4096]).expect("write");
        // As if a large write on the blocking pool held the checksums.
        let done = store.dir.with_update_lock(chunk, || {
            store
                .dir
                .write_inline(chunk, 0, &[2u8; 4096])
                .expect("inline")
        });
        assert!(!done, "the inline write must give up, not wait");
        assert_eq!(
            &store.dir.read(chunk, 0, 4096).expect("read")[..],
            &[1u8; 4096][..]
        );
        assert!(store
            .dir
            .write_inline(chunk, 0, &[2u8; 4096])
            .expect("inline"));
        assert_eq!(
            &store.dir.read(chunk, 0, 4096).expect("read")[..],
            &[2u8; 4096][..]
        );
    }

    #[test]
    fn large_writes_leave_the_calling_task_for_a_while_after_a_slow_one() {
        use super::super::chunk_dir::{INLINE_WRITE_MAX, SLOW_INLINE_WRITE};
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = FileBlockStore::open(tmp.path(), 4 << 20, 16 << 20).expect("open");
        let chunk = ChunkRef::new(VolumeId(1), 0);
        let large = INLINE_WRITE_MAX;
        // Entered in the dirty log (a sync), so later writes can be inline.
        store.dir.write(chunk, 0, &[1u8; 4096]).expect("write");
        assert!(store
            .dir
            .write_on_task(chunk, 0, &vec![2u8; large])
            .expect("inline"));
        assert!(
            !store
                .dir
                .write_on_task(chunk, 0, &vec![3u8; large + 4096])
                .expect("inline"),
            "over the largest inline write"
        );
        store.dir.pretend_large_inline_took(SLOW_INLINE_WRITE);
        assert!(
            store
                .dir
                .write_on_task(chunk, 0, &vec![4u8; large])
                .expect("inline"),
            "not slow"
        );
        store.dir.pretend_large_inline_took(SLOW_INLINE_WRITE * 2);
        assert!(
            !store
                .dir
                .write_on_task(chunk, 0, &vec![5u8; large])
                .expect("inline"),
            "large writes go to the pool after a slow one"
        );
        assert!(
            store
                .dir
                .write_on_task(chunk, 0, &[6u8; 4096])
                .expect("inline"),
            "small writes stay on the task"
        );
        let got = store.dir.read(chunk, 0, large as u64).expect("read");
        assert_eq!(&got[..4096], &[6u8; 4096][..]);
        assert!(
            got[4096..].iter().all(|&b| b == 4),
            "the refused writes changed nothing"
        );
    }

    /// Large writes go whole only where the page cache holds every page of
    /// the range: the check sees pages just written, and not a hole nobody
    /// touched or pages dropped from the cache.
    #[test]
    fn the_page_cache_check_sees_what_is_cached() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.write_all_at(&vec![1u8; 1 << 20], 0).unwrap();
        f.set_len(4 << 20).unwrap();
        assert!(
            sys::all_cached(&f, 0, 1 << 20),
            "cachestat (Linux 6.5 and later) should see the pages just written"
        );
        assert!(sys::all_cached(&f, 4096 + 100, 8000), "an unaligned range");
        assert!(!sys::all_cached(&f, 0, 2 << 20), "the hole after them");
        assert!(!sys::all_cached(&f, 0, 0), "an empty range");
        f.sync_data().unwrap();
        // SAFETY: fadvise on a descriptor we own; no memory is passed.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        assert!(!sys::all_cached(&f, 0, 1 << 20), "dropped from the cache");
        // A large write over the dropped range still lands whole.
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
        let chunk = FileChunk::open(f.try_clone().unwrap(), 4 << 20).unwrap();
        chunk.write(0, &data).unwrap();
        assert!(sys::all_cached(&f, 0, 1 << 20));
        chunk.write(4096, &data).unwrap();
        let mut back = vec![0u8; (1 << 20) + 4096];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[..4096], &data[..4096]);
        assert!(
            back[4096..] == data[..],
            "the whole write over cached pages"
        );
    }

    #[test]
    fn reading_a_chunk_leaves_its_access_time_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let chunk = ChunkRef::new(VolumeId(1), 0);
        let path = tmp.path().join("1").join("0");
        {
            let store = FileBlockStore::open(tmp.path(), 1 << 20, 8 << 20).expect("open");
            store.dir.write(chunk, 0, &[7u8; 4096]).expect("write");
            // Flushed, so the reopen has no checksums to recover (which
            // reads the chunk).
            store.dir.flush().expect("flush");
        }
        // An access time older than the modification: relatime would
        // update it on the next read.
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
        let times = std::fs::FileTimes::new().set_accessed(old);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_times(times))
            .expect("set atime");
        let store = FileBlockStore::open(tmp.path(), 1 << 20, 8 << 20).expect("reopen");
        assert_eq!(
            &store.dir.read(chunk, 0, 4096).expect("read")[..],
            &[7u8; 4096][..]
        );
        let cached = store.dir.read_cached(chunk, 0, 4096).expect("read");
        assert_eq!(cached.as_deref(), Some(&[7u8; 4096][..]));
        let atime = std::fs::metadata(&path)
            .and_then(|m| m.accessed())
            .expect("atime");
        assert_eq!(atime, old, "reads updated the chunk file's access time");
    }

    const MIB: usize = 1 << 20;

    /// A store of 4 MiB chunks whose first chunk holds `len` bytes of a
    /// pattern, returned with them.
    fn written(len: usize) -> (tempfile::TempDir, FileBlockStore, ChunkRef, Vec<u8>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = FileBlockStore::open(tmp.path(), 4 << 20, 16 << 20).expect("open");
        let chunk = ChunkRef::new(VolumeId(1), 0);
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        store.dir.write(chunk, 0, &data).expect("write");
        (tmp, store, chunk, data)
    }

    /// `read` failed its checksum in block 256.
    fn assert_corrupt_block_256(read: Result<Bytes>) {
        match read {
            Err(torus_traits::Error::Corrupt(msg)) => assert!(msg.contains("block 256"), "{msg}"),
            other => panic!("expected a checksum error, got {other:?}"),
        }
    }

    #[test]
    fn large_reads_from_a_mapping_are_checked_and_fall_back_to_pread() {
        let (tmp, store, chunk, data) = written(2 * MIB);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(tmp.path().join("1").join("0"))
            .expect("chunk file");

        // Inside the file: mapped. Unaligned, empty or past the end: not.
        let pinned = sys::Pinned::map(&file, MIB as u64, MIB).expect("mapped");
        assert_eq!(pinned.as_ref(), &data[MIB..]);
        assert!(sys::Pinned::map(&file, 512, MIB).is_none());
        assert!(sys::Pinned::map(&file, 0, 0).is_none());
        assert!(sys::Pinned::map(&file, MIB as u64, MIB + 4096).is_none());

        // Through the store, while views are wanted: a mapped read, an
        // unaligned one, and one that runs past the end of the file (the
        // rest reads as zeros).
        let views = torus_traits::pagecache::want_views();
        let got = store.dir.read(chunk, 0, MIB as u64).expect("read");
        assert!(torus_traits::pagecache::is_file_view(&got), "mapped");
        assert_eq!(&got[..], &data[..MIB]);
        let got = store.dir.read(chunk, 1000, MIB as u64).expect("read");
        assert_eq!(&got[..], &data[1000..1000 + MIB]);
        let got = store
            .dir
            .read(chunk, MIB as u64, 2 * MIB as u64)
            .expect("read");
        assert_eq!(&got[..MIB], &data[MIB..]);
        assert!(got[MIB..].iter().all(|&b| b == 0), "zeros past the end");

        // A flipped byte under a mapped read is caught, not served.
        file.write_all_at(&[data[MIB + 5] ^ 0xff], MIB as u64 + 5)
            .expect("flip");
        assert_corrupt_block_256(store.dir.read(chunk, 0, 2 * MIB as u64));
        drop(views);
    }

    #[test]
    fn large_cached_reads_are_checked_and_zero_past_the_end() {
        let (tmp, store, chunk, data) = written(MIB + 8192);
        // Just written, so cached: served without the pool, unaligned, and
        // past the end of the file as zeros.
        let got = store
            .dir
            .read_cached(chunk, 100, MIB as u64)
            .expect("read")
            .expect("cached");
        assert!(got[..] == data[100..100 + MIB], "bytes differ");
        let got = store
            .dir
            .read_cached(chunk, MIB as u64, MIB as u64)
            .expect("read")
            .expect("cached");
        assert!(got[..8192] == data[MIB..], "bytes differ");
        assert!(got[8192..].iter().all(|&b| b == 0), "zeros past the end");

        // A flipped byte is not served from the cache: the blocking read
        // looks again and reports it.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path().join("1").join("0"))
            .expect("chunk file");
        file.write_all_at(&[data[MIB + 5] ^ 0xff], MIB as u64 + 5)
            .expect("flip");
        let cached = store.dir.read_cached(chunk, 0, MIB as u64 + 4096);
        assert!(matches!(cached, Ok(None)), "{cached:?}");
        assert_corrupt_block_256(store.dir.read(chunk, 0, MIB as u64 + 4096));
    }
}
