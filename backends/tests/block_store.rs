//! The `BlockStore` conformance suite on every implementation, plus what the
//! suite cannot check: persistence across close and reopen for the stores on
//! disk, reopening with a smaller capacity, and the descriptor cache under a
//! tiny limit.

use bytes::Bytes;
use std::path::Path;
use torus_backends::storage::{FileBlockStore, MemoryBlockStore, MmapBlockStore};
use torus_traits::conformance::block_store as suite;
use torus_traits::{BlockStore, ChunkRef, Error, VolumeId, SECTOR};

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
        data.push(store.read(chunk, 0, CHUNK).await.unwrap());
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
