//! `ObjectBlockStore`: the `BlockStore` conformance suite on an in-memory
//! and a local-directory object store, plus what the suite cannot check:
//! close and reopen, the sparse on-object layout, concurrent writes with
//! flushes, opening from URLs, and failing uploads and deletes.

use bytes::Bytes;
use futures::future::join_all;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use torus_backends::storage::ObjectBlockStore;
use torus_traits::conformance::block_store as suite;
use torus_traits::{BlockStore, ChunkRef, Error, VolumeId, SECTOR};

const CHUNK: u64 = suite::CHUNK_SIZE;
const CAPACITY: u64 = suite::CAPACITY;
const PREFIX: &str = "pool/node-a";

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

fn c(volume: u64, index: u64) -> ChunkRef {
    ChunkRef::new(VolumeId(volume), index)
}

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i.wrapping_mul(13).wrapping_add(seed.wrapping_mul(101))) % 251 + 1) as u8)
        .collect()
}

async fn open(store: &Arc<dyn ObjectStore>, cache: &std::path::Path) -> ObjectBlockStore {
    ObjectBlockStore::open(store.clone(), PREFIX, cache, CHUNK, CAPACITY)
        .await
        .expect("open ObjectBlockStore")
}

/// Every object under the prefix, with its size, sorted.
async fn objects(store: &Arc<dyn ObjectStore>) -> Vec<(String, u64)> {
    use futures::TryStreamExt;
    let mut all: Vec<(String, u64)> = store
        .list(Some(&ObjectPath::from(PREFIX)))
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .expect("list objects");
    all.sort();
    all
}

#[tokio::test]
async fn conformance_in_memory() {
    let cache = tmp();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    suite::all(&open(&store, cache.path()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_local_file_system() {
    let root = tmp();
    let cache = tmp();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(root.path()).expect("local store"));
    let blocks = open(&store, cache.path()).await;
    suite::all(&blocks).await;
    // The suite deletes what it made: nothing may be left in the bucket.
    blocks.flush().await.unwrap();
    assert_eq!(objects(&store).await, vec![]);
}

/// The suite again with one upload at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_serial_uploads() {
    let cache = tmp();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let blocks = open(&store, cache.path()).await;
    blocks.set_upload_concurrency(1);
    suite::all(&blocks).await;
}

#[tokio::test]
async fn reopen_sees_flushed_data() {
    let cache = tmp();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = c(1, 0);
    let b = c(1, 5);
    let d = c(2, 3);
    let data_a = pattern(1, 3 * SECTOR + 100);
    let data_b = pattern(2, CHUNK);
    let data_d = pattern(3, 10);
    {
        let s = open(&store, cache.path()).await;
        s.write(a, 1000, Bytes::from(data_a.clone())).await.unwrap();
        s.write(b, 0, Bytes::from(data_b.clone())).await.unwrap();
        s.write(d, CHUNK - 10, Bytes::from(data_d.clone()))
            .await
            .unwrap();
        s.zero(b, SECTOR, 2 * SECTOR).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.dirty_chunks(), 0);
        // Not flushed: may be lost, must not break anything.
        s.write(c(3, 0), 0, Bytes::from_static(b"lost"))
            .await
            .unwrap();
        s.write(a, 0, Bytes::from_static(b"also lost"))
            .await
            .unwrap();
    }
    let s = open(&store, cache.path()).await;
    // used: a = blocks 0..=1 (1000..1000+12388 ends in block 3) -> 4 blocks;
    // b = 256 - 2; d = 1.
    let used_a = (1000 + data_a.len() as u64).div_ceil(SECTOR);
    let expected_used = (used_a + 254 + 1) * SECTOR;
    assert_eq!(s.used().await.unwrap(), expected_used);
    assert_eq!(s.list_chunks().await.unwrap(), vec![a, b, d]);
    assert_eq!(
        &s.read(a, 1000, data_a.len() as u64).await.unwrap()[..],
        &data_a[..]
    );
    assert!(s.read(a, 0, 1000).await.unwrap().iter().all(|&x| x == 0));
    let mut expected_b = data_b.clone();
    expected_b[SECTOR as usize..3 * SECTOR as usize].fill(0);
    assert_eq!(&s.read(b, 0, CHUNK).await.unwrap()[..], &expected_b[..]);
    assert_eq!(&s.read(d, CHUNK - 10, 10).await.unwrap()[..], &data_d[..]);
    assert!(s
        .read(c(3, 0), 0, SECTOR)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));

    // The reopened store keeps working: partial write into a clean chunk
    // (downloaded once), zero, delete, flush, reopen again.
    s.write(b, 5, Bytes::from_static(b"xyz")).await.unwrap();
    expected_b[5..8].copy_from_slice(b"xyz");
    s.zero(a, 0, CHUNK).await.unwrap();
    s.delete_chunk(d).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(s.used().await.unwrap(), 254 * SECTOR);
    drop(s);
    assert_eq!(objects(&store).await.len(), 1, "only chunk b has an object");
    let s = open(&store, cache.path()).await;
    assert_eq!(s.list_chunks().await.unwrap(), vec![b]);
    assert_eq!(s.used().await.unwrap(), 254 * SECTOR);
    assert_eq!(&s.read(b, 0, CHUNK).await.unwrap()[..], &expected_b[..]);
}

/// A chunk deleted and written again before a flush is uploaded by it.
#[tokio::test]
async fn rewritten_after_delete_is_flushed() {
    let cache = tmp();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let a = c(6, 1);
    {
        let s = open(&store, cache.path()).await;
        s.write(a, 0, Bytes::from_static(b"first")).await.unwrap();
        s.delete_chunk(a).await.unwrap();
        s.write(a, 100, Bytes::from_static(b"second"))
            .await
            .unwrap();
        s.flush().await.unwrap();
    }
    {
        let s = open(&store, cache.path()).await;
        assert_eq!(s.list_chunks().await.unwrap(), vec![a]);
        assert_eq!(&s.read(a, 100, 6).await.unwrap()[..], b"second");
        s.delete_chunk(a).await.unwrap();
        s.write(a, 300, Bytes::from_static(b"third")).await.unwrap();
        s.flush().await.unwrap();
    }
    let s = open(&store, cache.path()).await;
    assert_eq!(s.list_chunks().await.unwrap(), vec![a]);
    assert_eq!(&s.read(a, 300, 5).await.unwrap()[..], b"third");
    assert!(s.read(a, 0, 300).await.unwrap().iter().all(|&x| x == 0));
    assert_eq!(s.used().await.unwrap(), SECTOR);
}

#[tokio::test]
async fn small_write_uploads_small_object() {
    let cache = tmp();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let s = open(&store, cache.path()).await;
    let chunk = c(7, 42);
    let data = pattern(9, SECTOR);
    s.write(chunk, 512 * 1024, Bytes::from(data.clone()))
        .await
        .unwrap();
    s.flush().await.unwrap();
    let objs = objects(&store).await;
    assert_eq!(objs.len(), 1);
    assert_eq!(objs[0].0, s.object_path(chunk).to_string());
    assert_eq!(objs[0].0, format!("{PREFIX}/7/42"));
    // Header (64 bytes for 1 MiB chunks) plus the one block.
    assert_eq!(objs[0].1, 64 + SECTOR);
    assert!(objs[0].1 < CHUNK / 100);
    // Served from the object now (the cache copy is gone after upload).
    assert_eq!(
        &s.read(chunk, 512 * 1024, SECTOR).await.unwrap()[..],
        &data[..]
    );
    let window = s.read(chunk, 512 * 1024 - 10, 20).await.unwrap();
    assert_eq!(&window[..10], &[0; 10]);
    assert_eq!(&window[10..], &data[..10]);
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_and_flushes() {
    let cache = tmp();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let s = Arc::new(open(&store, cache.path()).await);
    s.set_upload_concurrency(3);
    const TASKS: u64 = 8;
    const ROUNDS: u64 = 24;
    const SLOT: u64 = 3000;
    // Task t writes slot (round * TASKS + t) of chunk round % 4, and flushes
    // every few rounds, while the others write.
    let tasks = (0..TASKS).map(|t| {
        let s = s.clone();
        tokio::spawn(async move {
            for round in 0..ROUNDS {
                let chunk = c(9, round % 4);
                let off = (round / 4 * TASKS + t) * SLOT + 1;
                s.write(chunk, off, Bytes::from(pattern(t * 1000 + round, SLOT)))
                    .await
                    .unwrap();
                if round % 5 == t % 5 {
                    s.flush().await.unwrap();
                }
            }
        })
    });
    for r in join_all(tasks).await {
        r.unwrap();
    }
    s.flush().await.unwrap();
    let check = |s: Arc<ObjectBlockStore>| async move {
        for i in 0..4u64 {
            let mut expected = vec![0u8; CHUNK as usize];
            for round in (0..ROUNDS).filter(|r| r % 4 == i) {
                for t in 0..TASKS {
                    let off = ((round / 4 * TASKS + t) * SLOT + 1) as usize;
                    expected[off..off + SLOT as usize]
                        .copy_from_slice(&pattern(t * 1000 + round, SLOT));
                }
            }
            let got = s.read(c(9, i), 0, CHUNK).await.unwrap();
            assert!(got[..] == expected[..], "chunk 9/{i} differs");
        }
        let span = (ROUNDS / 4 * TASKS) * SLOT + 1;
        assert_eq!(s.used().await.unwrap(), 4 * span.div_ceil(SECTOR) * SECTOR);
    };
    check(s.clone()).await;
    drop(s);
    check(Arc::new(open(&store, cache.path()).await)).await;
}

/// Reads of a clean chunk while it is written and uploaded see either the
/// old or the new bytes of each written range, never a mix from a replaced
/// object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_uploads() {
    let cache = tmp();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let s = Arc::new(open(&store, cache.path()).await);
    let chunk = c(4, 0);
    // Sparse: every other block, so object offsets shift as blocks appear.
    for b in (0..64).step_by(2) {
        s.write(
            chunk,
            b * SECTOR,
            Bytes::from(vec![b as u8 + 1; SECTOR as usize]),
        )
        .await
        .unwrap();
    }
    s.flush().await.unwrap();
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for b in (1..64).step_by(2) {
                s.write(
                    chunk,
                    b * SECTOR,
                    Bytes::from(vec![b as u8 + 1; SECTOR as usize]),
                )
                .await
                .unwrap();
                s.flush().await.unwrap();
            }
        })
    };
    for _ in 0..50 {
        let got = s.read(chunk, 0, 64 * SECTOR).await.unwrap();
        for b in 0..64usize {
            let block = &got[b * SECTOR as usize..(b + 1) * SECTOR as usize];
            let v = block[0];
            assert!(
                block.iter().all(|&x| x == v) && (v == b as u8 + 1 || (v == 0 && b % 2 == 1)),
                "block {b} reads {v:#x}.."
            );
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
}

#[tokio::test]
async fn open_from_urls() {
    let cache = tmp();
    let s = ObjectBlockStore::from_url("memory://", cache.path(), CHUNK, CAPACITY)
        .await
        .unwrap();
    suite::read_write_roundtrip(&s).await;

    let root = tmp();
    let url = format!("file://{}/pool", root.path().display());
    let chunk = c(1, 2);
    {
        let s = ObjectBlockStore::from_url(&url, cache.path(), CHUNK, CAPACITY)
            .await
            .unwrap();
        s.write(chunk, 100, Bytes::from_static(b"hello"))
            .await
            .unwrap();
        s.flush().await.unwrap();
    }
    assert!(root.path().join("pool/1/2").is_file());
    let s = ObjectBlockStore::from_url(&url, cache.path(), CHUNK, CAPACITY)
        .await
        .unwrap();
    assert_eq!(&s.read(chunk, 100, 5).await.unwrap()[..], b"hello");
    assert_eq!(s.used().await.unwrap(), SECTOR);

    for bad in ["not a url", "nosuchscheme://x/y"] {
        match ObjectBlockStore::from_url(bad, cache.path(), CHUNK, CAPACITY).await {
            Err(Error::InvalidArgument(_)) => {}
            other => panic!("from_url({bad:?}): expected InvalidArgument, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn open_checks_objects() {
    let cache = tmp();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    {
        let s = open(&store, cache.path()).await;
        s.write(c(1, 1), 0, Bytes::from_static(b"x")).await.unwrap();
        s.flush().await.unwrap();
    }
    // Another chunk size is refused, naming the object.
    match ObjectBlockStore::open(store.clone(), PREFIX, cache.path(), 2 * CHUNK, CAPACITY).await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("pool/node-a/1/1"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // Foreign objects beside the chunks are ignored.
    for name in ["README", "1/notanumber", "01/2", "1/2/3"] {
        store
            .put(
                &ObjectPath::from(format!("{PREFIX}/{name}").as_str()),
                PutPayload::from_static(b"not a chunk"),
            )
            .await
            .unwrap();
    }
    let s = open(&store, cache.path()).await;
    assert_eq!(s.list_chunks().await.unwrap(), vec![c(1, 1)]);
    drop(s);
    // A truncated chunk object is corrupt.
    let key = ObjectPath::from(format!("{PREFIX}/1/1").as_str());
    let whole = store.get(&key).await.unwrap().bytes().await.unwrap();
    store
        .put(&key, PutPayload::from(whole.slice(..whole.len() - 1)))
        .await
        .unwrap();
    match ObjectBlockStore::open(store.clone(), PREFIX, cache.path(), CHUNK, CAPACITY).await {
        Err(Error::Corrupt(m)) => assert!(m.contains("pool/node-a/1/1"), "{m}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// An object deleted behind the store's back reads as zeros.
#[tokio::test]
async fn missing_object_reads_zeros() {
    let cache = tmp();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let s = open(&store, cache.path()).await;
    let chunk = c(3, 3);
    s.write(chunk, 0, Bytes::from(pattern(1, 2 * SECTOR)))
        .await
        .unwrap();
    s.flush().await.unwrap();
    store.delete(&s.object_path(chunk)).await.unwrap();
    assert!(s
        .read(chunk, 0, 2 * SECTOR)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    s.write(chunk, 10, Bytes::from_static(b"ab")).await.unwrap();
    let got = s.read(chunk, 0, 20).await.unwrap();
    assert_eq!(&got[10..12], b"ab");
    s.delete_chunk(chunk).await.unwrap();
    assert_eq!(s.used().await.unwrap(), 0);
}

/// An `InMemory` store whose writes (PUT, DELETE) fail while `fail` is set.
#[derive(Debug, Default)]
struct Flaky {
    inner: InMemory,
    fail: AtomicBool,
}

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Flaky({})", self.inner)
    }
}

impl Flaky {
    fn check(&self) -> object_store::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            Err(object_store::Error::Generic {
                store: "Flaky",
                source: "injected failure".into(),
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for Flaky {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.check()?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.check()?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectPath>> {
        use futures::StreamExt;
        if self.fail.load(Ordering::Relaxed) {
            return locations
                .map(|_| {
                    Err(object_store::Error::Generic {
                        store: "Flaky",
                        source: "injected failure".into(),
                    })
                })
                .boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.check()?;
        self.inner.copy_opts(from, to, options).await
    }
}

/// A failed upload is `Unavailable`, names the object, leaves the chunk
/// dirty and readable, and the next flush uploads it; a failed delete
/// changes nothing.
#[tokio::test]
async fn failed_uploads_stay_dirty() {
    let cache = tmp();
    let flaky = Arc::new(Flaky::default());
    let store: Arc<dyn ObjectStore> = flaky.clone();
    let s = open(&store, cache.path()).await;
    let a = c(5, 0);
    let b = c(5, 1);
    s.write(a, 0, Bytes::from(pattern(1, 2 * SECTOR)))
        .await
        .unwrap();
    s.write(b, 0, Bytes::from(pattern(2, SECTOR)))
        .await
        .unwrap();
    s.flush().await.unwrap();

    s.write(a, 3, Bytes::from_static(b"new")).await.unwrap();
    flaky.fail.store(true, Ordering::Relaxed);
    match s.flush().await {
        Err(Error::Unavailable(m)) => assert!(m.contains("pool/node-a/5/0"), "{m}"),
        other => panic!("flush with failing PUT: expected Unavailable, got {other:?}"),
    }
    assert_eq!(s.dirty_chunks(), 1);
    assert_eq!(&s.read(a, 3, 3).await.unwrap()[..], b"new");
    match s.delete_chunk(b).await {
        Err(Error::Unavailable(m)) => assert!(m.contains("pool/node-a/5/1"), "{m}"),
        other => panic!("delete with failing DELETE: expected Unavailable, got {other:?}"),
    }
    assert_eq!(s.list_chunks().await.unwrap(), vec![a, b]);
    assert_eq!(s.used().await.unwrap(), 3 * SECTOR);
    assert_eq!(
        &s.read(b, 0, SECTOR).await.unwrap()[..],
        &pattern(2, SECTOR)[..]
    );

    flaky.fail.store(false, Ordering::Relaxed);
    s.flush().await.unwrap();
    assert_eq!(s.dirty_chunks(), 0);
    drop(s);
    let s = open(&store, cache.path()).await;
    let mut expected = pattern(1, 2 * SECTOR);
    expected[3..6].copy_from_slice(b"new");
    assert_eq!(&s.read(a, 0, 2 * SECTOR).await.unwrap()[..], &expected[..]);
    assert_eq!(s.used().await.unwrap(), 3 * SECTOR);
}
