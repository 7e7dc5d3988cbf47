//! [`FileBlockStore`]: one sparse file per chunk, read and written with
//! positional I/O (`pread`/`pwrite`) on cached descriptors.
//!
//! Layout, accounting, the descriptor cache and flush are shared with the
//! mmap store and described in the `chunk_dir` module: chunks live at
//! `<dir>/<volume>/<index>`, space is counted exactly in 4 KiB blocks, `zero`
//! punches holes, and `flush` is `fdatasync` of every file written since the
//! last flush plus `fsync` of every directory whose entries changed.
//!
//! Reads, flushes and large writes run on tokio's blocking pool
//! (`spawn_blocking`), so a slow disk stalls no async task; writes of up to
//! 64 KiB only copy into the page cache and run on the calling task, which
//! is cheaper than the hand-off (see `chunk_dir::INLINE_WRITE_MAX`). Files are read
//! and written concurrently through one shared descriptor each: `pread` and
//! `pwrite` need no lock.

use super::alloc::Bitmap;
use super::chunk_dir::{chunk_dir_block_store, pwrite_zeros, ChunkDir, ChunkIo};
use super::sys;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use torus_traits::Result;

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
    fn open(file: File, _chunk_size: u64) -> io::Result<Self> {
        Ok(FileChunk { file })
    }

    fn file(&self) -> &File {
        &self.file
    }

    fn read(&self, offset: u64, buf: &mut [u8], _alloc: &Bitmap) -> io::Result<()> {
        // Holes read as zeros by themselves; past the end of the file (a
        // chunk written only near its start) `buf` keeps its zeros.
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        pwrite_zeros(&self.file, offset, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        sys::punch_hole(&self.file, offset, len)
    }
}
