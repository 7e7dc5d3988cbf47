//! Checksums of the chunk files kept by `chunk_dir`: a crc32c per 4 KiB
//! block ([`Sums`], in memory while a chunk is open), the per-volume files
//! that keep them on disk ([`SumsFile`]), and the dirty log that keeps them
//! consistent with the data across a crash ([`DirtyLog`]). The layout and
//! the protocol are described in the `chunk_dir` module docs ("Checksums").

use super::chunk_dir::sync_dir;
use super::lock;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::Duration;
use torus_traits::{ChunkRef, Error, Result, VolumeId, SECTOR};

/// crc32c of a 4 KiB block of zeros: what a hole, and a block never
/// written, checks against.
pub(crate) const ZERO_CRC: u32 = 0x98f9_4189;

/// Name of the checksum file in each volume directory.
pub(crate) const SUMS_FILE: &str = "crc32c";

/// Bytes per checksum in a checksum file.
const ENTRY: u64 = 4;

/// Names of the two dirty log files in the store's directory.
const LOG_FILES: [&str; 2] = ["dirty.0.log", "dirty.1.log"];

/// Bytes per dirty log entry: volume and index, little-endian.
const LOG_ENTRY: usize = 16;

/// The checksum of one 4 KiB block.
pub(crate) use torus_traits::storage::crc32c as block_crc;

/// On disk a checksum is stored XORed with [`ZERO_CRC`], so that zero bytes
/// (a hole in the checksum file, or a range never written) stand for the
/// checksum of a zero block, which is what a hole in a chunk file reads as.
fn encode(crc: u32) -> [u8; 4] {
    (crc ^ ZERO_CRC).to_le_bytes()
}

fn decode(raw: [u8; 4]) -> u32 {
    u32::from_le_bytes(raw) ^ ZERO_CRC
}

/// Reads at `offset` until `buf` is full or the file ends; returns the bytes
/// read (the rest of `buf` is left as it was).
pub(crate) fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Where the checksums of chunk `id` are in its volume's checksum file.
/// Refused (not a panic) when that offset does not fit in a file offset.
pub(crate) fn sums_offset(id: ChunkRef, blocks_per_chunk: u64) -> Result<u64> {
    let len = blocks_per_chunk * ENTRY;
    id.index
        .checked_mul(len)
        .filter(|at| {
            at.checked_add(len)
                .is_some_and(|end| end <= i64::MAX as u64)
        })
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "chunk {id}: index too large for the volume's checksum file"
            ))
        })
}

/// The checksums of one open chunk, in memory.
///
/// Reads look at them without locking; writes and zeros change them under
/// [`lock`](Sums::lock), which they hold across their data I/O, so under it
/// data and checksums agree. A read whose data fails its checksum looks
/// again under that lock before calling it corrupt (it may have raced a
/// write).
pub(crate) struct Sums {
    update: Mutex<()>,
    crcs: Box<[AtomicU32]>,
}

impl Sums {
    /// The checksums of a chunk that reads as zeros.
    pub(crate) fn zeroed(blocks: u64) -> Sums {
        Sums {
            update: Mutex::new(()),
            crcs: (0..blocks).map(|_| AtomicU32::new(ZERO_CRC)).collect(),
        }
    }

    /// Loads a chunk's checksums from its volume's checksum file; past the
    /// end of the file they are those of zero blocks.
    pub(crate) fn load(file: &File, at: u64, blocks: u64) -> io::Result<Sums> {
        let mut raw = vec![0u8; (blocks * ENTRY) as usize];
        read_at_most(file, &mut raw, at)?;
        Ok(Sums {
            update: Mutex::new(()),
            crcs: raw
                .chunks_exact(ENTRY as usize)
                .map(|e| AtomicU32::new(decode([e[0], e[1], e[2], e[3]])))
                .collect(),
        })
    }

    /// Held by writes and zeros of the chunk across data I/O and checksum
    /// update.
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.update)
    }

    /// [`lock`](Sums::lock) if nobody holds it now.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, ()>> {
        match self.update.try_lock() {
            Ok(guard) => Some(guard),
            // The guarded value is `()`: a panic under it left nothing torn.
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    pub(crate) fn get(&self, block: u64) -> u32 {
        self.crcs
            .get(block as usize)
            .map_or(ZERO_CRC, |c| c.load(Ordering::Acquire))
    }

    /// Sets a block's checksum; only under [`lock`](Sums::lock).
    pub(crate) fn set(&self, block: u64, crc: u32) {
        if let Some(c) = self.crcs.get(block as usize) {
            c.store(crc, Ordering::Release);
        }
    }

    fn encoded(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(self.crcs.len() * ENTRY as usize);
        for c in self.crcs.iter() {
            raw.extend_from_slice(&encode(c.load(Ordering::Acquire)));
        }
        raw
    }
}

/// A volume's checksum file, `<dir>/<volume>/crc32c`, open. The checksums
/// of chunk `index` are at [`sums_offset`].
pub(crate) struct SumsFile {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
}

impl SumsFile {
    /// Opens (creating if needed) the checksum file in `vol_dir`, which must
    /// exist; `true` with it when it was created.
    pub(crate) fn open(vol_dir: &Path) -> io::Result<(SumsFile, bool)> {
        let path = vol_dir.join(SUMS_FILE);
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        let (file, created) = match opts.open(&path) {
            Ok(file) => (file, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (opts.create(true).open(&path)?, true),
            Err(e) => return Err(e),
        };
        Ok((SumsFile { file, path }, created))
    }

    /// Writes a chunk's checksums at `at`.
    pub(crate) fn store(&self, at: u64, sums: &Sums) -> io::Result<()> {
        self.file.write_all_at(&sums.encoded(), at)
    }

    /// Sets a chunk's checksums at `at` to those of zero blocks (before a new
    /// chunk file is created, so nothing left by a deleted chunk of the same
    /// index applies to it).
    pub(crate) fn reset(&self, at: u64, blocks: u64) -> io::Result<()> {
        let zeros = vec![0u8; (blocks * ENTRY) as usize];
        self.file.write_all_at(&zeros, at)
    }
}

/// Recomputes the checksums of `chunks` from the data in their files
/// (trusted as it is) and makes them durable: what opening a store does for
/// the chunks its dirty log lists.
pub(crate) fn recompute(
    root: &Path,
    chunk_size: u64,
    chunks: &[(ChunkRef, PathBuf)],
) -> Result<()> {
    let blocks = chunk_size / SECTOR;
    let mut files: HashMap<VolumeId, SumsFile> = HashMap::new();
    let mut new_in = Vec::new();
    // Fits: chunk_size fits in usize (checked by check_geometry).
    let mut data = vec![0u8; chunk_size as usize];
    for (id, path) in chunks {
        let at = sums_offset(*id, blocks)?;
        let file = File::open(path)
            .map_err(|e| Error::io(format!("opening chunk {id} ({})", path.display()), e))?;
        let n = read_at_most(&file, &mut data, 0)
            .map_err(|e| Error::io(format!("reading chunk {id} ({})", path.display()), e))?;
        data[n..].fill(0);
        let mut raw = Vec::with_capacity((blocks * ENTRY) as usize);
        for block in data.chunks(SECTOR as usize) {
            raw.extend_from_slice(&encode(block_crc(block)));
        }
        let sums = match files.entry(id.volume) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let vol_dir = root.join(id.volume.0.to_string());
                let (sums, created) = SumsFile::open(&vol_dir).map_err(|e| {
                    Error::io(format!("opening {}", vol_dir.join(SUMS_FILE).display()), e)
                })?;
                if created {
                    new_in.push(vol_dir);
                }
                v.insert(sums)
            }
        };
        sums.file
            .write_all_at(&raw, at)
            .map_err(|e| Error::io(format!("writing {}", sums.path.display()), e))?;
    }
    for sums in files.values() {
        sums.file
            .sync_data()
            .map_err(|e| Error::io(format!("syncing {}", sums.path.display()), e))?;
    }
    for dir in new_in {
        sync_dir(&dir)?;
    }
    Ok(())
}

/// The dirty log: the chunks that may hold changes not yet flushed, so that
/// opening the store after a crash recomputes their checksums instead of
/// calling them corrupt. See the `chunk_dir` module docs for the protocol.
///
/// Time is cut into epochs, one per flush; epoch `e` logs into file `e % 2`.
/// A write or zero [enters](DirtyLog::enter) the current epoch before it
/// looks at its chunk and leaves it when done; the first one of a chunk in
/// an epoch appends the chunk to the epoch's file and syncs it first. A
/// flush starts the next epoch, waits until every operation of the closing
/// one has left (so all of them are in the dirty lists it then syncs), and
/// once everything is durable empties the closing epoch's file. Operations
/// of the new epoch, meanwhile, log into the other file, which no flush is
/// emptying; with a single file, a flush could not tell their entries from
/// the ones it may drop.
pub(crate) struct DirtyLog {
    /// The current epoch; starts at 1 (0 is "never" in chunks' marks).
    epoch: AtomicU64,
    /// Operations in progress, per file (epoch % 2).
    active: [AtomicU64; 2],
    files: [LogFile; 2],
    /// Set when syncing the log failed: from then on nothing can be logged
    /// reliably, so writes fail until the store is reopened.
    failed: OnceLock<String>,
}

struct LogFile {
    path: PathBuf,
    file: File,
    state: Mutex<LogState>,
    /// How many entries (by sequence number) are known durable. Held while
    /// syncing, so concurrent appenders share one sync (group commit).
    synced: Mutex<u64>,
}

#[derive(Default)]
struct LogState {
    /// Length of the file.
    len: u64,
    /// Entries appended so far, ever: their sequence numbers.
    appended: u64,
    /// Chunks in the file, with the sequence number of their entry.
    listed: HashMap<ChunkRef, u64>,
}

/// An operation's presence in an epoch (see [`DirtyLog`]); leaves on drop.
pub(crate) struct Entered<'a> {
    log: &'a DirtyLog,
    epoch: u64,
}

impl Entered<'_> {
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.log.active[(self.epoch % 2) as usize].fetch_sub(1, Ordering::SeqCst);
    }
}

impl DirtyLog {
    /// Opens the log in `root`, creating its files if needed; returns it with
    /// the chunks its files list, or `None` when neither file existed (a
    /// store written before checksums were kept, or a new one).
    pub(crate) fn open(root: &Path) -> Result<(DirtyLog, Option<BTreeSet<ChunkRef>>)> {
        let mut listed = BTreeSet::new();
        let mut created = 0;
        let mut open = |name: &str| -> Result<LogFile> {
            let path = root.join(name);
            let ctx = |what: &str| format!("{what} {}", path.display());
            let mut opts = OpenOptions::new();
            opts.read(true).write(true);
            let file = match opts.open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    created += 1;
                    opts.create(true)
                        .open(&path)
                        .map_err(|e| Error::io(ctx("creating"), e))?
                }
                Err(e) => return Err(Error::io(ctx("opening"), e)),
            };
            let len = file
                .metadata()
                .map_err(|e| Error::io(ctx("inspecting"), e))?
                .len();
            let size = usize::try_from(len)
                .map_err(|_| Error::Corrupt(format!("{} is {len} bytes long", path.display())))?;
            let mut raw = vec![0u8; size];
            let n = read_at_most(&file, &mut raw, 0).map_err(|e| Error::io(ctx("reading"), e))?;
            // A torn last entry was never synced, so its write never started.
            for e in raw[..n].chunks_exact(LOG_ENTRY) {
                let mut volume = [0u8; 8];
                let mut index = [0u8; 8];
                volume.copy_from_slice(&e[..8]);
                index.copy_from_slice(&e[8..]);
                listed.insert(ChunkRef::new(
                    VolumeId(u64::from_le_bytes(volume)),
                    u64::from_le_bytes(index),
                ));
            }
            Ok(LogFile {
                path,
                file,
                state: Mutex::new(LogState {
                    len,
                    ..LogState::default()
                }),
                synced: Mutex::new(0),
            })
        };
        let files = [open(LOG_FILES[0])?, open(LOG_FILES[1])?];
        if created > 0 {
            sync_dir(root)?;
        }
        let log = DirtyLog {
            epoch: AtomicU64::new(1),
            active: [AtomicU64::new(0), AtomicU64::new(0)],
            files,
            failed: OnceLock::new(),
        };
        Ok((log, (created < 2).then_some(listed)))
    }

    /// Enters the current epoch, for one write or zero.
    pub(crate) fn enter(&self) -> Entered<'_> {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let active = &self.active[(epoch % 2) as usize];
            active.fetch_add(1, Ordering::SeqCst);
            // A flush that moved on in between may already have found the
            // old epoch idle: enter the new one instead.
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return Entered { log: self, epoch };
            }
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Makes sure `id` is listed, durably, in the file of `entered`'s epoch.
    pub(crate) fn append(&self, entered: &Entered<'_>, id: ChunkRef) -> Result<()> {
        if let Some(failed) = self.failed.get() {
            return Err(Error::Io {
                context: format!(
                    "the dirty log cannot be trusted since an earlier sync failed ({failed})"
                ),
                source: std::sync::Arc::new(io::Error::other("earlier dirty log sync failure")),
            });
        }
        let log = &self.files[(entered.epoch % 2) as usize];
        let seq = {
            let mut st = lock(&log.state);
            match st.listed.get(&id) {
                Some(&seq) => seq,
                None => {
                    let mut entry = [0u8; LOG_ENTRY];
                    entry[..8].copy_from_slice(&id.volume.0.to_le_bytes());
                    entry[8..].copy_from_slice(&id.index.to_le_bytes());
                    log.file
                        .write_all_at(&entry, st.len)
                        .map_err(|e| Error::io(format!("writing {}", log.path.display()), e))?;
                    st.len += LOG_ENTRY as u64;
                    st.appended += 1;
                    let seq = st.appended;
                    st.listed.insert(id, seq);
                    seq
                }
            }
        };
        let mut synced = lock(&log.synced);
        if *synced >= seq {
            return Ok(());
        }
        // Every entry appended so far is in the page cache: this sync makes
        // them all durable, for whoever is waiting behind us too.
        let upto = lock(&log.state).appended;
        if let Err(e) = log.file.sync_data() {
            let e = Error::io(format!("syncing {}", log.path.display()), e);
            // After a failed fdatasync a retry may succeed without the lost
            // pages being written: the log can no longer be relied on.
            let _ = self.failed.set(e.to_string());
            return Err(e);
        }
        *synced = upto;
        Ok(())
    }

    /// Starts a new epoch and waits until every operation of the closing one
    /// has finished; returns the closing epoch, for [`end_flush`](Self::end_flush).
    pub(crate) fn begin_flush(&self) -> u64 {
        let closing = self.epoch.fetch_add(1, Ordering::SeqCst);
        let active = &self.active[(closing % 2) as usize];
        // Operations are short (one pwrite, or a memory copy): spin briefly,
        // then sleep in small steps.
        let mut spins = 0u32;
        while active.load(Ordering::SeqCst) > 0 {
            if spins < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
            spins += 1;
        }
        closing
    }

    /// After a successful flush: empties the closing epoch's file. Not
    /// synced: a stale entry only costs a needless recomputation, and the
    /// next sync of the file (when it is used again) includes the truncation.
    pub(crate) fn end_flush(&self, closing: u64) -> Result<()> {
        self.files[(closing % 2) as usize].truncate(false)
    }

    /// Empties both files durably (after opening, once the listed chunks
    /// were recomputed).
    pub(crate) fn clear(&self) -> Result<()> {
        for log in &self.files {
            log.truncate(true)?;
        }
        Ok(())
    }
}

impl LogFile {
    fn truncate(&self, sync: bool) -> Result<()> {
        let mut st = lock(&self.state);
        if st.len > 0 {
            self.file
                .set_len(0)
                .map_err(|e| Error::io(format!("truncating {}", self.path.display()), e))?;
            st.len = 0;
            if sync {
                self.file
                    .sync_data()
                    .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
            }
        }
        st.listed.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_crc_is_the_checksum_of_a_zero_block() {
        assert_eq!(ZERO_CRC, block_crc(&[0u8; SECTOR as usize]));
        assert_eq!(decode([0; 4]), ZERO_CRC);
        assert_eq!(decode(encode(0x1234_5678)), 0x1234_5678);
    }

    #[test]
    fn sums_offsets() {
        let c = |i| ChunkRef::new(VolumeId(1), i);
        assert_eq!(sums_offset(c(0), 256).ok(), Some(0));
        assert_eq!(sums_offset(c(3), 256).ok(), Some(3 * 1024));
        assert!(sums_offset(c(u64::MAX), 256).is_err());
        assert!(sums_offset(c(u64::MAX / 1024), 256).is_err());
    }

    #[test]
    fn a_flush_waits_for_the_changes_of_the_epoch_it_closes() {
        use std::sync::atomic::AtomicBool;
        let tmp = tempfile::tempdir().expect("tempdir");
        let (log, _) = DirtyLog::open(tmp.path()).expect("open");
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let old = log.enter();
            let flush = s.spawn(|| {
                let closing = log.begin_flush();
                done.store(true, Ordering::SeqCst);
                closing
            });
            while log.epoch.load(Ordering::SeqCst) == old.epoch() {
                std::thread::yield_now();
            }
            // A change starting now belongs to the next epoch: not waited for.
            let new = log.enter();
            assert_eq!(new.epoch(), old.epoch() + 1);
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !done.load(Ordering::SeqCst),
                "returned with a change running"
            );
            let epoch = old.epoch();
            drop(old);
            assert_eq!(flush.join().expect("flush thread"), epoch);
            drop(new);
        });
    }

    #[test]
    fn log_lists_what_was_appended_until_cleared() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = ChunkRef::new(VolumeId(7), 3);
        let b = ChunkRef::new(VolumeId(1), u64::MAX);
        {
            let (log, listed) = DirtyLog::open(tmp.path()).expect("open");
            assert_eq!(listed, None, "new files: nothing known");
            let entered = log.enter();
            log.append(&entered, a).expect("append");
            log.append(&entered, a).expect("append again");
            drop(entered);
            let closing = log.begin_flush();
            let entered = log.enter();
            log.append(&entered, b).expect("append in the next epoch");
            drop(entered);
            // Emptying the closing epoch's file keeps the other one's.
            log.end_flush(closing).expect("end flush");
        }
        let (log, listed) = DirtyLog::open(tmp.path()).expect("reopen");
        assert_eq!(listed, Some(BTreeSet::from([b])));
        log.clear().expect("clear");
        drop(log);
        let (_, listed) = DirtyLog::open(tmp.path()).expect("reopen");
        assert_eq!(listed, Some(BTreeSet::new()));
        let len = std::fs::metadata(tmp.path().join(LOG_FILES[0]))
            .expect("log")
            .len();
        assert_eq!(len, 0);
    }
}
