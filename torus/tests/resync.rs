//! Incremental resync: a replica that failed while a volume was being written
//! gets back exactly the chunks written while it was away, from the writer's
//! degraded records, and becomes healthy again; chunks it already had are not
//! copied again.

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use torus::catalog;
use torus::control::{Control, MetaControl};
use torus::node::Node;
use torus::replication::DEGRADED;
use torus_backends::storage::faulty::OpSet;
use torus_backends::storage::{FaultyBlockStore, MemoryBlockStore};
use torus_traits::{BlockStore, ChunkRef, Error, MetadataStore, Result, VolumeId, VolumeProvider};
use torus_transports::MemoryNetwork;

mod common;
use common::pid;

const CHUNK: u64 = 256 << 10;

/// Records which chunks received writes or zeroing.
struct Counting {
    inner: Arc<dyn BlockStore>,
    touched: Mutex<BTreeSet<u64>>,
}

#[async_trait]
impl BlockStore for Counting {
    fn chunk_size(&self) -> u64 {
        self.inner.chunk_size()
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    async fn used(&self) -> Result<u64> {
        self.inner.used().await
    }
    async fn read(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<Bytes> {
        self.inner.read(chunk, offset, len).await
    }
    async fn write(&self, chunk: ChunkRef, offset: u64, data: Bytes) -> Result<()> {
        let r = self.inner.write(chunk, offset, data).await;
        self.touched.lock().unwrap().insert(chunk.index);
        r
    }
    async fn zero(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<()> {
        let r = self.inner.zero(chunk, offset, len).await;
        self.touched.lock().unwrap().insert(chunk.index);
        r
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
    async fn delete_chunk(&self, chunk: ChunkRef) -> Result<()> {
        self.inner.delete_chunk(chunk).await
    }
    async fn list_chunks(&self) -> Result<Vec<ChunkRef>> {
        self.inner.list_chunks().await
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn status(meta: &Arc<dyn MetadataStore>) -> String {
    let list = MetaControl::new(meta.clone()).list_volumes().await.unwrap();
    list[0].status.clone()
}

async fn degraded_count(meta: &dyn MetadataStore) -> usize {
    meta.range(DEGRADED.as_bytes()).await.unwrap().len()
}

/// Three nodes, replication 3, node 2 on `store2`; a volume "vol" of 8 chunks.
async fn three_nodes(store2: Arc<dyn BlockStore>) -> (Arc<dyn MetadataStore>, Vec<Node>) {
    let meta = common::init(CHUNK, 3).await;
    let net = MemoryNetwork::new();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let store: Arc<dyn BlockStore> = if i == 2 {
            store2.clone()
        } else {
            Arc::new(MemoryBlockStore::new(CHUNK, 64 << 20))
        };
        nodes.push(common::start_node(&meta, &net, i, store).await);
    }
    for n in &nodes {
        n.refresh_cluster_view().await.unwrap();
    }
    catalog::create(&*meta, "vol", 8 * CHUNK, 3).await.unwrap();
    (meta, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_replica_gets_only_the_chunks_written_while_it_was_away() {
    let faulty = FaultyBlockStore::new(Arc::new(MemoryBlockStore::new(CHUNK, 64 << 20)));
    let control = faulty.control();
    let counting = Arc::new(Counting {
        inner: Arc::new(faulty),
        touched: Mutex::new(BTreeSet::new()),
    });
    let (meta, nodes) = three_nodes(counting.clone()).await;
    let dev = nodes[0].open("vol", false).await.unwrap();

    // Chunks 0..4 reach every replica.
    for c in 0..4u64 {
        dev.write(c * CHUNK, pattern(c as u8, 64 << 10), false)
            .await
            .unwrap();
    }
    dev.flush().await.unwrap();
    assert_eq!(degraded_count(&*meta).await, 0);
    assert_eq!(status(&meta).await, "healthy");

    // Node 2's disk fails: writes to chunks 5 and 6 (one of them partly
    // zeroed) are acknowledged without it and recorded degraded.
    control.fail(
        OpSet::WRITES.union(OpSet::FLUSH),
        Error::Unavailable("disk offline".into()),
    );
    dev.write(5 * CHUNK + 4096, pattern(5, 100 << 10), false)
        .await
        .unwrap();
    dev.write(6 * CHUNK, pattern(6, CHUNK as usize), false)
        .await
        .unwrap();
    dev.write_zeroes(6 * CHUNK + 8192, 16384, true, false)
        .await
        .unwrap();
    dev.flush().await.unwrap();
    assert_eq!(
        degraded_count(&*meta).await,
        2,
        "chunks 5 and 6 recorded stale on node 2"
    );
    // Node 2 is alive and the volume's writer retries: rebuilding.
    assert_eq!(status(&meta).await, "rebuilding");

    // The disk comes back: the writer's periodic resync repairs it.
    counting.touched.lock().unwrap().clear();
    control.clear_fail();
    let deadline = Instant::now() + Duration::from_secs(20);
    while degraded_count(&*meta).await > 0 {
        assert!(
            Instant::now() < deadline,
            "degraded records still there after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(&meta).await, "healthy");
    let touched = counting.touched.lock().unwrap().clone();
    assert_eq!(
        touched,
        BTreeSet::from([5, 6]),
        "only the chunks written while the replica was away are copied"
    );
    // Node 2's copy equals the writer's view, byte for byte.
    for c in 0..8u64 {
        let chunk = ChunkRef::new(VolumeId(1), c);
        let want = dev.read(c * CHUNK, CHUNK).await.unwrap();
        let got = counting.read(chunk, 0, CHUNK).await.unwrap();
        assert!(got == want, "chunk {c} differs on the resynced replica");
    }
    // And it takes writes again (no longer degraded).
    counting.touched.lock().unwrap().clear();
    dev.write(5 * CHUNK, pattern(9, 4096), true).await.unwrap();
    assert!(counting.touched.lock().unwrap().contains(&5));
    assert_eq!(degraded_count(&*meta).await, 0);
    drop(dev);
    for n in &nodes {
        n.abandon();
    }
}

#[tokio::test]
async fn deleting_a_volume_forgets_its_stale_replica_records() {
    let meta = common::init(CHUNK, 3).await;
    let keep = catalog::create(&*meta, "keep", CHUNK, 3).await.unwrap();
    let gone = catalog::create(&*meta, "gone", CHUNK, 3).await.unwrap();
    for v in [keep.id, gone.id] {
        let key = torus::replication::degraded_key(ChunkRef::new(v, 0), pid(9));
        meta.put(key.as_bytes(), b"{}", None).await.unwrap();
    }
    catalog::delete(&*meta, "gone").await.unwrap();
    let left = meta.range(DEGRADED.as_bytes()).await.unwrap();
    assert_eq!(left.len(), 1, "only the deleted volume's records go");
    assert!(String::from_utf8_lossy(&left[0].key)
        .starts_with(&torus::replication::degraded_prefix(keep.id)));
}

/// A reader opened before a replica went stale stops reading that replica
/// (here its own local copy) once the writer records it stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_follows_the_writers_stale_replica_records() {
    let faulty = FaultyBlockStore::new(Arc::new(MemoryBlockStore::new(CHUNK, 64 << 20)));
    let control = faulty.control();
    let (_meta, nodes) = three_nodes(Arc::new(faulty)).await;
    let dev = nodes[0].open("vol", false).await.unwrap();
    dev.write(CHUNK, pattern(1, 4096), true).await.unwrap();
    // Node 2 reads its own local copy by preference.
    let reader = nodes[2].open("vol", true).await.unwrap();
    assert_eq!(reader.read(CHUNK, 4096).await.unwrap(), pattern(1, 4096));

    // Node 2's disk stops taking writes: the new data is acknowledged
    // without it, and node 2's copy is now stale.
    control.fail(OpSet::WRITES, Error::Unavailable("disk offline".into()));
    dev.write(CHUNK, pattern(2, 4096), true).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = reader.read(CHUNK, 4096).await.unwrap();
        if got == pattern(2, 4096) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reader still reads its stale local copy 10 s after it was recorded stale"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(reader);
    drop(dev);
    for n in &nodes {
        n.abandon();
    }
}
