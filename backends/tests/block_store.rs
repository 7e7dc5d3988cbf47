//! The `BlockStore` conformance suite on every implementation, plus what the
//! suite cannot check: persistence across close and reopen for the stores on
//! disk, reopening with a smaller capacity, the descriptor cache under a
//! tiny limit, and the checksums of the stores on disk (bit rot, power cuts,
//! concurrent I/O).

use bytes::Bytes;
use std::path::{Path, PathBuf};
use torus_backends::storage::{FileBlockStore, MemoryBlockStore, MmapBlockStore};
use torus_traits::conformance::block_store as suite;
use torus_traits::{BlockStore, ChunkRef, ChunkScan, Error, VolumeId, SECTOR};

const CHUNK: u64 = suite::CHUNK_SIZE;
const CAPACITY: u64 = suite::CAPACITY;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

#[tokio::test]
async fn memory_conformance() {
    suite::all(&MemoryBlockStore::new(CHUNK, CAPACITY)).await;
}

#[tokio::test]
async fn file_conformance() {
    let dir = tmp();
    suite::all(&FileBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap()).await;
}

#[tokio::test]
async fn mmap_conformance() {
    let dir = tmp();
    suite::all(&MmapBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap()).await;
}

/// The suite again with at most two chunk files open, so that descriptors
/// (and mappings) are closed and reopened all the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_conformance_with_tiny_descriptor_cache() {
    let dir = tmp();
    let store = FileBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    store.set_open_files_limit(2);
    suite::all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mmap_conformance_with_tiny_mapping_cache() {
    let dir = tmp();
    let store = MmapBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    store.set_open_files_limit(2);
    suite::all(&store).await;
}

type Opener = fn(&Path, u64, u64) -> torus_traits::Result<Box<dyn BlockStore>>;

fn open_file(dir: &Path, chunk: u64, cap: u64) -> torus_traits::Result<Box<dyn BlockStore>> {
    Ok(Box::new(FileBlockStore::open(dir, chunk, cap)?))
}

fn open_mmap(dir: &Path, chunk: u64, cap: u64) -> torus_traits::Result<Box<dyn BlockStore>> {
    Ok(Box::new(MmapBlockStore::open(dir, chunk, cap)?))
}

fn c(volume: u64, index: u64) -> ChunkRef {
    ChunkRef::new(VolumeId(volume), index)
}

fn bytes(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7) ^ seed | 1)
            .collect::<Vec<_>>(),
    )
}

/// Writes a mix of data, partial and whole-block zeros, a deleted chunk and
/// a wholly zeroed chunk; flushes; returns the chunks touched.
async fn populate(store: &dyn BlockStore) -> Vec<ChunkRef> {
    let touched = vec![c(1, 0), c(1, 3), c(2, 0), c(2, 1), c(3, 9)];
    store.write(c(1, 0), 1, bytes(1, 10_000)).await.unwrap();
    store.write(c(1, 0), CHUNK - 5, bytes(2, 5)).await.unwrap();
    store
        .write(c(1, 3), 0, bytes(3, CHUNK as usize))
        .await
        .unwrap();
    store.zero(c(1, 3), 4096, 3 * 4096).await.unwrap(); // frees 3 blocks
    store.zero(c(1, 3), 50_000, 100).await.unwrap(); // partial: stays allocated
    store
        .write(c(2, 0), 123_457, bytes(4, 70_000))
        .await
        .unwrap();
    store.write(c(2, 1), 0, bytes(5, 4096)).await.unwrap();
    store.delete_chunk(c(2, 1)).await.unwrap();
    store.write(c(3, 9), 8192, bytes(6, 3)).await.unwrap();
    store.zero(c(3, 9), 0, CHUNK).await.unwrap(); // holds nothing now
    store.flush().await.unwrap();
    touched
}

struct Snapshot {
    list: Vec<ChunkRef>,
    used: u64,
    data: Vec<Bytes>,
}

async fn snapshot(store: &dyn BlockStore, chunks: &[ChunkRef]) -> Snapshot {
    let mut data = Vec::new();
    for &chunk in chunks {
        // Copied: a large read from the file store may be a mapping of its
        // file (while file views are wanted),
        // and one kept while the mmap store writes the same file through its
        // own mapping makes ext4 allocate whole (large) folios there, which
        // the mmap store's accounting does not expect. One store per
        // directory never does that; this test swaps stores under held data.
        let read = store.read(chunk, 0, CHUNK).await.unwrap();
        data.push(Bytes::copy_from_slice(&read));
    }
    Snapshot {
        list: store.list_chunks().await.unwrap(),
        used: store.used().await.unwrap(),
        data,
    }
}

fn assert_same(before: &Snapshot, after: &Snapshot, chunks: &[ChunkRef]) {
    assert_eq!(after.list, before.list, "list_chunks after reopen");
    assert_eq!(after.used, before.used, "used() after reopen");
    for (i, chunk) in chunks.iter().enumerate() {
        assert!(
            after.data[i] == before.data[i],
            "data of {chunk} after reopen"
        );
    }
}

async fn reopen_keeps_everything(open: Opener, reopen: Opener) {
    let dir = tmp();
    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    let chunks = populate(&*store).await;
    let before = snapshot(&*store, &chunks).await;
    assert_eq!(before.list, vec![c(1, 0), c(1, 3), c(2, 0)]);
    // 1/0: blocks 0..=2 and the last; 1/3: all but 3; 2/0: 123457..193457.
    let expected_blocks =
        3 + 1 + (CHUNK / SECTOR - 3) + (193_457u64.div_ceil(4096) - 123_457 / 4096);
    assert_eq!(before.used, expected_blocks * SECTOR);
    drop(store);

    let store = reopen(dir.path(), CHUNK, CAPACITY).unwrap();
    let after = snapshot(&*store, &chunks).await;
    assert_same(&before, &after, &chunks);

    // The reopened store carries on: accounting continues from the rebuilt
    // bitmaps, and a second reopen still agrees.
    store.write(c(1, 3), 4096, bytes(7, 10)).await.unwrap();
    assert_eq!(store.used().await.unwrap(), before.used + SECTOR);
    store.zero(c(1, 0), 0, 3 * SECTOR).await.unwrap();
    assert_eq!(store.used().await.unwrap(), before.used - 2 * SECTOR);
    store.flush().await.unwrap();
    let again = snapshot(&*store, &chunks).await;
    drop(store);
    let store = reopen(dir.path(), CHUNK, CAPACITY).unwrap();
    assert_same(&again, &snapshot(&*store, &chunks).await, &chunks);
}

#[tokio::test]
async fn file_reopen_keeps_everything() {
    reopen_keeps_everything(open_file, open_file).await;
}

#[tokio::test]
async fn mmap_reopen_keeps_everything() {
    reopen_keeps_everything(open_mmap, open_mmap).await;
}

/// Both stores use one layout: either can open what the other wrote.
#[tokio::test]
async fn file_and_mmap_share_the_layout() {
    reopen_keeps_everything(open_file, open_mmap).await;
    reopen_keeps_everything(open_mmap, open_file).await;
}

async fn reopen_smaller_than_used(open: Opener) {
    let dir = tmp();
    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    store
        .write(c(1, 0), 0, bytes(1, 5 * SECTOR as usize))
        .await
        .unwrap();
    store.flush().await.unwrap();
    drop(store);

    let store = open(dir.path(), CHUNK, 2 * SECTOR).unwrap();
    assert_eq!(store.capacity(), 2 * SECTOR);
    assert_eq!(store.used().await.unwrap(), 5 * SECTOR);
    let r = store.write(c(1, 0), 10 * SECTOR, bytes(2, 1)).await;
    assert!(matches!(r, Err(Error::NoSpace(_))), "{r:?}");
    let r = store.write(c(1, 1), 0, bytes(2, 1)).await;
    assert!(matches!(r, Err(Error::NoSpace(_))), "{r:?}");
    // Overwriting allocated blocks needs no space.
    store.write(c(1, 0), 100, bytes(3, 100)).await.unwrap();
    // Freeing down to below the capacity makes room again.
    store.zero(c(1, 0), SECTOR, 4 * SECTOR).await.unwrap();
    assert_eq!(store.used().await.unwrap(), SECTOR);
    store.write(c(1, 1), 0, bytes(2, 1)).await.unwrap();
    assert_eq!(store.used().await.unwrap(), 2 * SECTOR);
    assert_eq!(store.list_chunks().await.unwrap(), vec![c(1, 0), c(1, 1)]);
}

#[tokio::test]
async fn file_reopen_smaller_than_used() {
    reopen_smaller_than_used(open_file).await;
}

#[tokio::test]
async fn mmap_reopen_smaller_than_used() {
    reopen_smaller_than_used(open_mmap).await;
}

/// The layout is `<dir>/<volume>/<index>`, files are sparse and stray names
/// are ignored; bad geometry and foreign chunk files are refused.
#[tokio::test]
async fn layout_and_refusals() {
    let dir = tmp();
    let store = FileBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    store
        .write(c(7, 12), 3 * SECTOR, bytes(1, 10))
        .await
        .unwrap();
    store.flush().await.unwrap();
    let path = dir.path().join("7").join("12");
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.len() <= CHUNK);
    drop(store);

    std::fs::write(dir.path().join("README"), "not a chunk").unwrap();
    std::fs::write(dir.path().join("7").join("012"), "not canonical").unwrap();
    let store = MmapBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    assert_eq!(store.list_chunks().await.unwrap(), vec![c(7, 12)]);
    assert_eq!(store.used().await.unwrap(), SECTOR);
    drop(store);

    for bad in [0, 100, SECTOR + 1] {
        let r = FileBlockStore::open(dir.path(), bad, CAPACITY);
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "chunk size {bad}"
        );
    }
    // Files longer than the chunk size mean a wrong chunk size.
    let r = MmapBlockStore::open(dir.path(), SECTOR, CAPACITY);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}

/// Reading a block through the page cache and then writing its neighbour
/// must not allocate the holes around them on disk (a mapping's store dirties
/// a whole page-cache folio, and folios can be large).
async fn neighbouring_holes_stay_holes(open: Opener) {
    let dir = tmp();
    let chunk = c(1, 0);
    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    store.write(chunk, 0, bytes(1, 100)).await.unwrap();
    store
        .write(chunk, 200 * SECTOR, bytes(2, 100))
        .await
        .unwrap();
    store.flush().await.unwrap();
    drop(store);

    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    assert_eq!(store.used().await.unwrap(), 2 * SECTOR);
    store.read(chunk, 0, CHUNK).await.unwrap();
    store.write(chunk, SECTOR + 10, bytes(3, 10)).await.unwrap();
    store
        .write(chunk, 100 * SECTOR, bytes(4, 10))
        .await
        .unwrap();
    assert_eq!(store.used().await.unwrap(), 4 * SECTOR);
    store.flush().await.unwrap();
    drop(store);

    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    assert_eq!(
        store.used().await.unwrap(),
        4 * SECTOR,
        "blocks on disk after reopen"
    );
}

#[tokio::test]
async fn file_neighbouring_holes_stay_holes() {
    neighbouring_holes_stay_holes(open_file).await;
}

#[tokio::test]
async fn mmap_neighbouring_holes_stay_holes() {
    neighbouring_holes_stay_holes(open_mmap).await;
}

// ---------------------------------------------------------------------------
// Checksums: bit rot on disk, crashes, and concurrent I/O.

fn chunk_path(dir: &Path, chunk: ChunkRef) -> PathBuf {
    dir.join(chunk.volume.0.to_string())
        .join(chunk.index.to_string())
}

/// Flips the lowest bit of the byte at `offset` of a chunk file, behind the
/// store's back (the page cache is shared, so an open store sees it too).
fn rot_on_disk(dir: &Path, chunk: ChunkRef, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(chunk_path(dir, chunk))
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 1;
    file.write_all_at(&byte, offset).unwrap();
}

#[track_caller]
fn expect_corrupt<T: std::fmt::Debug>(r: torus_traits::Result<T>, chunk: ChunkRef, block: u64) {
    match r {
        Err(Error::Corrupt(m)) => {
            let named = format!("chunk {chunk} block {block}:");
            assert!(m.contains(&named), "{m:?} should name {named:?}");
        }
        other => panic!("expected Corrupt for chunk {chunk} block {block}, got {other:?}"),
    }
}

/// A whole chunk's bytes: `data` at 0, zeros after.
fn whole(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(CHUNK as usize, 0);
    v
}

async fn expect_clean(store: &dyn BlockStore, chunk: ChunkRef, content: &[u8]) {
    let data = store.read(chunk, 0, CHUNK).await.unwrap();
    assert!(data == content, "content of {chunk}");
    let scan = store.scan_chunk(chunk).await.unwrap();
    assert_eq!(scan.bad, Vec::<u32>::new(), "bad blocks of {chunk}");
    assert!(
        scan.crcs == ChunkScan::of(content).crcs,
        "checksums of {chunk}"
    );
}

/// Rot in a flushed chunk: reads of the rotten block fail (on every path),
/// reads of the others work, the scan lists exactly that block, writes and
/// zeros covering part of it fail without changing anything, and a write or
/// zero covering it whole repairs it.
async fn bit_rot_is_detected_and_repaired(open: Opener) {
    let dir = tmp();
    let chunk = c(1, 0);
    let data = bytes(1, 8 * SECTOR as usize);
    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    store.write(chunk, 0, data.clone()).await.unwrap();
    store.flush().await.unwrap();
    drop(store);
    rot_on_disk(dir.path(), chunk, 3 * SECTOR + 17);
    let mut content = whole(&data);
    content[(3 * SECTOR + 17) as usize] ^= 1;

    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    // Through the blocking pool first (nothing open yet), then, with the
    // file open and cached, through the fast path.
    expect_corrupt(store.read(chunk, 3 * SECTOR + 100, 10).await, chunk, 3);
    let good = store.read(chunk, 0, 3 * SECTOR).await.unwrap();
    assert_eq!(good, data.slice(..3 * SECTOR as usize));
    let good = store.read(chunk, 4 * SECTOR, 4 * SECTOR).await.unwrap();
    assert_eq!(good, data.slice(4 * SECTOR as usize..));
    expect_corrupt(store.read(chunk, 3 * SECTOR, SECTOR).await, chunk, 3);
    expect_corrupt(
        store.read(chunk, 2 * SECTOR + 5, 2 * SECTOR).await,
        chunk,
        3,
    );
    expect_corrupt(store.read(chunk, 0, CHUNK).await, chunk, 3);

    let scan = store.scan_chunk(chunk).await.unwrap();
    assert_eq!(scan.bad, vec![3]);
    assert!(
        scan.crcs == ChunkScan::of(&content).crcs,
        "the data as stored"
    );

    // Covering part of the rotten block: refused, nothing changes (not
    // even the neighbouring block the second write also covers).
    expect_corrupt(
        store.write(chunk, 3 * SECTOR + 100, bytes(2, 10)).await,
        chunk,
        3,
    );
    expect_corrupt(
        store.write(chunk, 3 * SECTOR - 10, bytes(2, 20)).await,
        chunk,
        3,
    );
    expect_corrupt(store.zero(chunk, 3 * SECTOR + 100, 10).await, chunk, 3);
    let good = store.read(chunk, 0, 3 * SECTOR).await.unwrap();
    assert_eq!(good, data.slice(..3 * SECTOR as usize));
    assert_eq!(store.scan_chunk(chunk).await.unwrap().bad, vec![3]);

    // A whole-block write repairs it.
    let fresh = bytes(3, SECTOR as usize);
    store.write(chunk, 3 * SECTOR, fresh.clone()).await.unwrap();
    content[3 * SECTOR as usize..4 * SECTOR as usize].copy_from_slice(&fresh);
    assert_eq!(store.read(chunk, 3 * SECTOR, SECTOR).await.unwrap(), fresh);
    expect_clean(&*store, chunk, &content).await;

    // Rot while the store is open, then a zero covering the block whole.
    rot_on_disk(dir.path(), chunk, 5 * SECTOR);
    expect_corrupt(store.read(chunk, 5 * SECTOR, 1).await, chunk, 5);
    assert_eq!(store.scan_chunk(chunk).await.unwrap().bad, vec![5]);
    store.zero(chunk, 5 * SECTOR, SECTOR).await.unwrap();
    content[5 * SECTOR as usize..6 * SECTOR as usize].fill(0);
    expect_clean(&*store, chunk, &content).await;

    // The repairs last.
    store.flush().await.unwrap();
    drop(store);
    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    expect_clean(&*store, chunk, &content).await;
}

#[tokio::test]
async fn file_bit_rot_is_detected_and_repaired() {
    bit_rot_is_detected_and_repaired(open_file).await;
}

#[tokio::test]
async fn mmap_bit_rot_is_detected_and_repaired() {
    bit_rot_is_detected_and_repaired(open_mmap).await;
}

/// The chunks listed in the store's dirty log files.
fn dirty_log(dir: &Path) -> Vec<ChunkRef> {
    let mut listed = Vec::new();
    for name in ["dirty.0.log", "dirty.1.log"] {
        let raw = std::fs::read(dir.join(name)).unwrap();
        for e in raw.chunks_exact(16) {
            let volume = u64::from_le_bytes(e[..8].try_into().unwrap());
            let index = u64::from_le_bytes(e[8..].try_into().unwrap());
            listed.push(c(volume, index));
        }
    }
    listed.sort();
    listed.dedup();
    listed
}

/// Power cut: a store dropped without a flush leaves data the kernel may
/// write back while the checksums on disk are those of the last flush (or
/// none, for a chunk created since). Reopening recomputes the checksums of
/// the chunks in the dirty log, so everything reads, whatever the data is;
/// rot in a chunk flushed and not changed since is still caught.
async fn unflushed_changes_never_read_as_corrupt(open: Opener) {
    let dir = tmp();
    let clean = c(1, 0); // flushed, then rots on disk
    let changed = c(1, 1); // flushed, then changed
    let born = c(2, 0); // created after the flush, in a new volume
    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    store.write(clean, 0, bytes(1, 4 * 4096)).await.unwrap();
    store.write(changed, 0, bytes(2, 4 * 4096)).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(dirty_log(dir.path()), vec![], "emptied by the flush");

    store.write(changed, 0, bytes(3, 4 * 4096)).await.unwrap();
    store
        .write(changed, 6 * SECTOR + 5, bytes(4, 100))
        .await
        .unwrap();
    store.write(born, 100, bytes(5, 9000)).await.unwrap();
    assert_eq!(dirty_log(dir.path()), vec![changed, born]);
    let mut changed_content = whole(&bytes(3, 4 * 4096));
    changed_content[6 * 4096 + 5..6 * 4096 + 105].copy_from_slice(&bytes(4, 100));
    let mut born_content = vec![0u8; CHUNK as usize];
    born_content[100..9100].copy_from_slice(&bytes(5, 9000));
    drop(store); // no flush: the checksums never reach the disk

    // A torn write-back in the changed chunk, and rot in the clean one.
    rot_on_disk(dir.path(), changed, 2 * SECTOR + 1);
    changed_content[2 * 4096 + 1] ^= 1;
    rot_on_disk(dir.path(), clean, SECTOR + 5);

    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    assert_eq!(dirty_log(dir.path()), vec![], "emptied once recomputed");
    expect_clean(&*store, changed, &changed_content).await;
    expect_clean(&*store, born, &born_content).await;
    expect_corrupt(store.read(clean, SECTOR, 10).await, clean, 1);
    assert_eq!(store.scan_chunk(clean).await.unwrap().bad, vec![1]);
    let good = store.read(clean, 2 * SECTOR, 2 * SECTOR).await.unwrap();
    assert_eq!(good, bytes(1, 4 * 4096).slice(2 * 4096..));
}

#[tokio::test]
async fn file_unflushed_changes_never_read_as_corrupt() {
    unflushed_changes_never_read_as_corrupt(open_file).await;
}

#[tokio::test]
async fn mmap_unflushed_changes_never_read_as_corrupt() {
    unflushed_changes_never_read_as_corrupt(open_mmap).await;
}

/// Without the dirty log, the same power cut would read as corruption:
/// the log is what prevents it (and emptied log files are respected).
#[tokio::test]
async fn without_the_dirty_log_a_power_cut_reads_as_corrupt() {
    let dir = tmp();
    let chunk = c(1, 0);
    let store = FileBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    store.write(chunk, 0, bytes(1, 4096)).await.unwrap();
    store.flush().await.unwrap();
    store.write(chunk, 0, bytes(2, 4096)).await.unwrap();
    drop(store);
    for name in ["dirty.0.log", "dirty.1.log"] {
        std::fs::write(dir.path().join(name), b"").unwrap();
    }
    let store = FileBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    expect_corrupt(store.read(chunk, 0, 4096).await, chunk, 0);
}

/// A directory written before checksums were kept (chunk files, no log,
/// no checksum files) opens with checksums computed from the data.
#[tokio::test]
async fn a_store_without_checksums_gets_them_on_open() {
    let dir = tmp();
    let chunk = c(4, 2);
    std::fs::create_dir(dir.path().join("4")).unwrap();
    let content = whole(&bytes(1, 3 * 4096 + 10));
    std::fs::write(chunk_path(dir.path(), chunk), &content[..3 * 4096 + 10]).unwrap();
    let store = MmapBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    assert_eq!(store.list_chunks().await.unwrap(), vec![chunk]);
    expect_clean(&store, chunk, &content).await;
    assert!(dir.path().join("4").join("crc32c").is_file());
}

/// Checksum and log files are not chunks and use none of the pool;
/// `delete_volume` removes the volume's checksum file (the directory stays).
#[tokio::test]
async fn checksum_files_beside_the_chunks() {
    let dir = tmp();
    let store = FileBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    store.write(c(7, 12), 0, bytes(1, 10)).await.unwrap();
    store.write(c(8, 0), 0, bytes(1, 10)).await.unwrap();
    store.flush().await.unwrap();
    let sums = dir.path().join("7").join("crc32c");
    assert!(sums.is_file());
    assert!(dir.path().join("dirty.0.log").is_file());
    drop(store);

    let store = FileBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    assert_eq!(store.list_chunks().await.unwrap(), vec![c(7, 12), c(8, 0)]);
    assert_eq!(store.used().await.unwrap(), 2 * SECTOR);
    store.delete_volume(VolumeId(7)).await.unwrap();
    assert!(!sums.exists());
    assert!(dir.path().join("7").is_dir());
    assert!(dir.path().join("8").join("crc32c").is_file());
    assert_eq!(store.list_chunks().await.unwrap(), vec![c(8, 0)]);
    assert_eq!(store.used().await.unwrap(), SECTOR);

    // A chunk of a deleted volume, or a deleted chunk, starts afresh.
    store.write(c(7, 12), SECTOR, bytes(2, 10)).await.unwrap();
    store.write(c(8, 0), 0, bytes(3, 3 * 4096)).await.unwrap();
    store.delete_chunk(c(8, 0)).await.unwrap();
    store
        .write(c(8, 0), 2 * SECTOR, bytes(4, 10))
        .await
        .unwrap();
    store.flush().await.unwrap();
    drop(store);
    let store = FileBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    let mut content = vec![0u8; CHUNK as usize];
    content[4096..4106].copy_from_slice(&bytes(2, 10));
    expect_clean(&store, c(7, 12), &content).await;
    let mut content = vec![0u8; CHUNK as usize];
    content[8192..8202].copy_from_slice(&bytes(4, 10));
    expect_clean(&store, c(8, 0), &content).await;
}

/// Writes (whole blocks and pieces of blocks, overlapping), reads, scans and
/// flushes of two chunks from many threads, with at most one file open so
/// handles are closed and reopened all the time: no read ever fails its
/// checksum, and the chunks end clean.
async fn checksums_hold_under_concurrent_io(open: Opener) {
    use std::sync::Arc;
    let dir = tmp();
    let store: Arc<dyn BlockStore> = Arc::from(open(dir.path(), CHUNK, CAPACITY).unwrap());
    let chunks = [c(1, 0), c(1, 1)];
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..600u64 {
                let chunk = chunks[((t + i / 8) % 2) as usize];
                // A few blocks only, so that tasks collide.
                let block = (t + i) % 3;
                let seed = (t * 31 + i) as u8;
                match i % 6 {
                    0 => store
                        .write(chunk, block * SECTOR, bytes(seed, 4096))
                        .await
                        .unwrap(),
                    1 | 2 => store
                        .write(chunk, block * SECTOR + t * 100 + 1, bytes(seed, 150))
                        .await
                        .unwrap(),
                    3 => {
                        store.read(chunk, 0, 8 * SECTOR).await.unwrap();
                    }
                    4 => {
                        let scan = store.scan_chunk(chunk).await.unwrap();
                        assert_eq!(scan.bad, Vec::<u32>::new());
                    }
                    _ => {
                        if t == 0 {
                            store.flush().await.unwrap();
                        } else if t == 1 {
                            store.zero(chunk, block * SECTOR + 10, 5000).await.unwrap();
                        } else {
                            store.read(chunk, block * SECTOR + 7, 100).await.unwrap();
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    store.flush().await.unwrap();
    for chunk in chunks {
        let data = store.read(chunk, 0, CHUNK).await.unwrap();
        expect_clean(&*store, chunk, &data).await;
    }
    drop(store);
    let store = open(dir.path(), CHUNK, CAPACITY).unwrap();
    for chunk in chunks {
        let data = store.read(chunk, 0, CHUNK).await.unwrap();
        expect_clean(&*store, chunk, &data).await;
    }
}

fn open_file_one_open(
    dir: &Path,
    chunk: u64,
    cap: u64,
) -> torus_traits::Result<Box<dyn BlockStore>> {
    let store = FileBlockStore::open(dir, chunk, cap)?;
    store.set_open_files_limit(1);
    Ok(Box::new(store))
}

fn open_mmap_one_open(
    dir: &Path,
    chunk: u64,
    cap: u64,
) -> torus_traits::Result<Box<dyn BlockStore>> {
    let store = MmapBlockStore::open(dir, chunk, cap)?;
    store.set_open_files_limit(1);
    Ok(Box::new(store))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_checksums_hold_under_concurrent_io() {
    checksums_hold_under_concurrent_io(open_file_one_open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mmap_checksums_hold_under_concurrent_io() {
    checksums_hold_under_concurrent_io(open_mmap_one_open).await;
}
