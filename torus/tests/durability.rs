//! Durability and fencing regressions of the replicated data path, each a
//! scenario that once broke a promise:
//! - a FLUSH acknowledged while an earlier flush was still making a remote
//!   replica durable;
//! - a failed FLUSH followed by a retry that reported success;
//! - a stale writer's epoch accepted by replicas the new writer had not yet
//!   written to;
//! - a flush and a write, failing on different replicas, that between them
//!   gave up every copy of a chunk.

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use torus::catalog;
use torus::cluster::{self, InitParams};
use torus::node::{Node, NodeOptions};
use torus::placement;
use torus::replica::Replica;
use torus::replication::{ClusterLink, PeerDirectory, ReplicatedChunks};
use torus::volume::ChunkIo;
use torus_backends::metadata::MemoryMetadata;
use torus_backends::storage::MemoryBlockStore;
use torus_traits::{
    BlockStore, ChunkRef, Epoch, Error, MetadataStore, PeerHandler, PeerId, PeerListener,
    PeerRequest, PeerResponse, PeerTransport, Result, Ring, RingMember, VolumeId, VolumeProvider,
};
use torus_transports::MemoryNetwork;

mod common;
use common::pid;

const CHUNK: u64 = 1 << 20;

/// What the test transports answer to `listen`: they only route calls.
fn not_listening() -> Result<Box<dyn PeerListener>> {
    Err(Error::Unsupported(
        "this test transport does not listen".into(),
    ))
}

/// Routes every call to one remote replica; flushes are slow or fail.
struct Remote {
    replica: Arc<Replica>,
    flush_delay: Duration,
    fail_flushes: AtomicUsize,
    flushed: Arc<AtomicBool>,
}

#[async_trait]
impl PeerTransport for Remote {
    async fn listen(&self, _: &str, _: Arc<dyn PeerHandler>) -> Result<Box<dyn PeerListener>> {
        not_listening()
    }
    async fn call(&self, _addr: &str, request: PeerRequest) -> Result<PeerResponse> {
        if let PeerRequest::Flush { .. } = request {
            if self
                .fail_flushes
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Error::Unavailable(
                    "flush: peer unreachable (injected)".into(),
                ));
            }
            tokio::time::sleep(self.flush_delay).await;
            let r = self.replica.handle(request).await;
            self.flushed.store(true, Ordering::SeqCst);
            return r;
        }
        self.replica.handle(request).await
    }
}

async fn link(members: &[PeerId], remote: Arc<Remote>) -> (ClusterLink, Arc<dyn MetadataStore>) {
    let meta: Arc<dyn MetadataStore> = Arc::new(MemoryMetadata::new());
    let local = Arc::new(Replica::new(Arc::new(MemoryBlockStore::new(
        CHUNK,
        64 << 20,
    ))));
    let ring = Ring {
        version: 1,
        replication: 2,
        members: members
            .iter()
            .map(|&id| RingMember { id, weight: 1 })
            .collect(),
    };
    let dir = Arc::new(PeerDirectory::default());
    dir.set(pid(2), "remote".into());
    let link = ClusterLink {
        me: pid(1),
        local,
        transport: Some(remote as Arc<dyn PeerTransport>),
        meta: meta.clone(),
        ring: Arc::new(RwLock::new(Arc::new(ring))),
        directory: dir,
        copied: Default::default(),
    };
    (link, meta)
}

fn remote(delay: Duration, fails: usize) -> Arc<Remote> {
    Arc::new(Remote {
        replica: Arc::new(Replica::new(Arc::new(MemoryBlockStore::new(
            CHUNK,
            64 << 20,
        )))),
        flush_delay: delay,
        fail_flushes: AtomicUsize::new(fails),
        flushed: Arc::new(AtomicBool::new(false)),
    })
}

/// Two concurrent flushes: the second returns while the first is still
/// waiting for the remote replica's fdatasync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_waits_for_an_earlier_flush_still_in_progress() {
    let r = remote(Duration::from_millis(500), 0);
    let flushed = r.flushed.clone();
    let (link, _meta) = link(&[pid(1), pid(2)], r).await;
    let vol = VolumeId(7);
    let io = Arc::new(ReplicatedChunks::open(link, vol, 2).await.unwrap());
    let e = Epoch(1);
    io.write(ChunkRef::new(vol, 0), 0, Bytes::from_static(b"x"), e)
        .await
        .unwrap();
    let io2 = io.clone();
    let f1 = tokio::spawn(async move { io2.flush(vol, e).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The write completed before this flush was called: it must be covered.
    io.flush(vol, e).await.unwrap();
    let durable_when_acked = flushed.load(Ordering::SeqCst);
    f1.await.unwrap().unwrap();
    assert!(
        durable_when_acked,
        "a FLUSH was acknowledged while the remote replica had not made an earlier write durable"
    );
}

/// A flush that fails on the only replica of a chunk fails, keeps the chunk
/// pending and readable, and a retry once the peer is back succeeds.
#[tokio::test]
async fn a_failed_flush_is_retried_not_forgotten() {
    let r = remote(Duration::ZERO, 1);
    // Ring holds only the remote peer: R=1 effectively.
    let (link, _meta) = link(&[pid(2)], r).await;
    let vol = VolumeId(8);
    let io = ReplicatedChunks::open(link, vol, 1).await.unwrap();
    let e = Epoch(1);
    let c = ChunkRef::new(vol, 0);
    io.write(c, 0, Bytes::from_static(b"data"), e)
        .await
        .unwrap();
    let first = io.flush(vol, e).await;
    assert!(first.is_err(), "first flush should fail: {first:?}");
    // The only copy is not written off: it still reads back.
    assert_eq!(&io.read(c, 0, 4).await.unwrap()[..], b"data");
    // The peer flushes again now: the retry covers the pending chunk.
    io.flush(vol, e)
        .await
        .expect("retry after the peer recovered");
    assert_eq!(&io.read(c, 0, 4).await.unwrap()[..], b"data");
}

async fn cluster(n: usize, replication: u32) -> (Arc<dyn MetadataStore>, MemoryNetwork, Vec<Node>) {
    let meta = common::init(CHUNK, replication).await;
    let net = MemoryNetwork::new();
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(start(&meta, &net, i).await);
    }
    for n in &nodes {
        n.refresh_cluster_view().await.unwrap();
    }
    (meta, net, nodes)
}

async fn start(meta: &Arc<dyn MetadataStore>, net: &MemoryNetwork, i: usize) -> Node {
    let store: Arc<dyn BlockStore> = Arc::new(MemoryBlockStore::new(CHUNK, 256 << 20));
    common::start_node(meta, net, i, store).await
}

/// After a takeover, even replicas the new writer has not written to refuse
/// the old writer's epoch.
#[tokio::test]
async fn a_stale_epoch_is_refused_by_replicas_the_new_writer_never_touched() {
    let (meta, net, nodes) = cluster(4, 1).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let vol = catalog::create(&*meta, "v", 16 * CHUNK, 1).await.unwrap();
    let dev_a = a.open("v", false).await.unwrap();
    for i in 0..16 {
        dev_a
            .write(i * CHUNK, Bytes::from_static(b"A"), false)
            .await
            .unwrap();
    }
    dev_a.flush().await.unwrap();
    let stale = catalog::get_by_name(&*meta, "v").await.unwrap().0.epoch;
    a.abandon();
    let dev_b = loop {
        match b.open("v", false).await {
            Ok(d) => break d,
            Err(Error::Locked(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e}"),
        }
    };
    dev_b
        .write(0, Bytes::from_static(b"B"), true)
        .await
        .unwrap();
    let ring = b.ring();
    let writer_b_replica = placement::replicas(&ring, ChunkRef::new(vol.id, 0), 1)[0];
    let t = net.transport();
    let mut accepted = vec![];
    for k in 1..16 {
        let c = ChunkRef::new(vol.id, k);
        let p = placement::replicas(&ring, c, 1)[0];
        if p == writer_b_replica || p == a.id() {
            continue;
        }
        let idx = (p.0.as_u128() - 1) as usize;
        let r = t
            .call(
                &format!("node{idx}"),
                PeerRequest::Write {
                    chunk: c,
                    offset: 0,
                    data: Bytes::from_static(b"stale"),
                    epoch: stale,
                },
            )
            .await;
        if r.is_ok() {
            accepted.push(k);
        }
    }
    assert!(
        accepted.is_empty(),
        "stale writer accepted after takeover on chunks {accepted:?}"
    );
    // Every chunk with a live replica still holds A's flushed data.
    for k in 1..16 {
        if placement::replicas(&ring, ChunkRef::new(vol.id, k), 1)[0] != a.id() {
            assert_eq!(&dev_b.read(k * CHUNK, 1).await.unwrap()[..], b"A");
        }
    }
}

/// Metadata between a node and the real store: lease renewals can stop
/// getting through, as when a node is cut off from etcd (calls fail as
/// unavailable and never say the lease is gone), and one transaction can be
/// held until the test lets it through.
struct CutOff {
    inner: Arc<dyn MetadataStore>,
    cut: AtomicBool,
    /// The next transaction stops, says so on `held` and waits for `release`.
    hold_next_txn: AtomicBool,
    held: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

impl CutOff {
    fn over(inner: Arc<dyn MetadataStore>) -> CutOff {
        CutOff {
            inner,
            cut: AtomicBool::new(false),
            hold_next_txn: AtomicBool::new(false),
            held: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

#[async_trait]
impl MetadataStore for CutOff {
    async fn get(&self, key: &[u8]) -> Result<Option<torus_traits::KeyValue>> {
        self.inner.get(key).await
    }
    async fn range(&self, prefix: &[u8]) -> Result<Vec<torus_traits::KeyValue>> {
        self.inner.range(prefix).await
    }
    async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: Option<torus_traits::LeaseId>,
    ) -> Result<i64> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.inner.delete(key).await
    }
    async fn txn(&self, txn: torus_traits::Txn) -> Result<torus_traits::TxnResponse> {
        if self.hold_next_txn.swap(false, Ordering::SeqCst) {
            self.held.notify_one();
            let permit = self.release.acquire().await;
            drop(permit.map_err(|e| Error::Other(e.to_string()))?);
        }
        self.inner.txn(txn).await
    }
    async fn watch(&self, prefix: &[u8]) -> Result<torus_traits::WatchStream> {
        self.inner.watch(prefix).await
    }
    async fn grant(&self, ttl: Duration) -> Result<torus_traits::LeaseId> {
        self.inner.grant(ttl).await
    }
    async fn keep_alive(&self, lease: torus_traits::LeaseId) -> Result<Duration> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(Error::Unavailable("etcd unreachable (test)".into()));
        }
        self.inner.keep_alive(lease).await
    }
    async fn revoke(&self, lease: torus_traits::LeaseId) -> Result<()> {
        self.inner.revoke(lease).await
    }
    async fn revision(&self) -> Result<i64> {
        self.inner.revision().await
    }
}

/// A writer that cannot renew its lease fences itself before the lease can
/// lapse on the server, so it never writes once another node may own the volume.
#[tokio::test]
async fn a_writer_cut_off_from_metadata_fences_itself_before_its_lease_lapses() {
    let inner: Arc<dyn MetadataStore> = Arc::new(MemoryMetadata::new());
    cluster::init(
        &*inner,
        InitParams {
            chunk_size: CHUNK,
            replication: 1,
        },
    )
    .await
    .unwrap();
    let cut = Arc::new(CutOff::over(inner.clone()));
    let meta: Arc<dyn MetadataStore> = cut.clone();
    let store: Arc<dyn BlockStore> = Arc::new(MemoryBlockStore::new(CHUNK, 64 << 20));
    let c = cluster::get(&*meta).await.unwrap().unwrap();
    let ttl = Duration::from_secs(2);
    let opts = NodeOptions {
        id: pid(1),
        address: "a".into(),
        transport: None,
        peer_listen: None,
        peer_advertise: None,
        lease_ttl: ttl,
        auto_join: true,
        healing: Default::default(),
    };
    let node = Node::start(opts, meta, store, c).await.unwrap();
    catalog::create(&*inner, "v", 4 * CHUNK, 1).await.unwrap();
    let dev = node.open("v", false).await.unwrap();
    dev.write(0, Bytes::from_static(b"before"), true)
        .await
        .unwrap();
    let cut_at = tokio::time::Instant::now();
    cut.cut.store(true, Ordering::SeqCst);
    // Writes keep working for a while, then stop strictly before the TTL.
    let fenced_after = loop {
        match dev.write(0, Bytes::from_static(b"during"), false).await {
            Ok(()) => {
                assert!(
                    cut_at.elapsed() < ttl,
                    "still writing {:?} after losing etcd",
                    cut_at.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(Error::Fenced(_)) => break cut_at.elapsed(),
            Err(e) => panic!("expected Fenced, got {e}"),
        }
    };
    assert!(fenced_after < ttl, "fenced only after {fenced_after:?}");
}

/// Routes each call to the in-process replica at its address, failing the
/// kinds of request a test picks for each address.
struct Peers {
    replicas: HashMap<String, Arc<Replica>>,
    failing: Mutex<HashSet<(String, &'static str)>>,
}

impl Peers {
    fn fail(&self, addr: &str, kind: &'static str) {
        lock(&self.failing).insert((addr.to_string(), kind));
    }
    fn heal(&self) {
        lock(&self.failing).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl PeerTransport for Peers {
    async fn listen(&self, _: &str, _: Arc<dyn PeerHandler>) -> Result<Box<dyn PeerListener>> {
        not_listening()
    }
    async fn call(&self, addr: &str, request: PeerRequest) -> Result<PeerResponse> {
        let kind = match request {
            PeerRequest::Write { .. } => "write",
            PeerRequest::Flush { .. } => "flush",
            _ => "other",
        };
        if lock(&self.failing).contains(&(addr.to_string(), kind)) {
            return Err(Error::Unavailable(format!(
                "{kind}: {addr} unreachable (injected)"
            )));
        }
        let Some(replica) = self.replicas.get(addr) else {
            return Err(Error::Unavailable(format!("no peer at {addr}")));
        };
        replica.handle(request).await
    }
}

/// A flush that gives up the replicas it could not flush, while a write
/// gives up the replica the flush counted on, must leave the chunk a copy:
/// the flush may only count a replica that is still healthy when it records
/// its decision. (Once, the flush counted a replica that had flushed in the
/// same barrier; a write that failed on it meanwhile gave it up, and the
/// flush then gave up the last one: the chunk had no replica left.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_and_a_write_failing_on_different_replicas_leave_a_copy() {
    let meta = Arc::new(CutOff::over(Arc::new(MemoryMetadata::new())));
    let store = || {
        Arc::new(Replica::new(Arc::new(MemoryBlockStore::new(
            CHUNK,
            64 << 20,
        ))))
    };
    // This node is the writer only; the three replicas are all remote, so
    // every one of their answers can be failed.
    let ids = [pid(2), pid(3), pid(4)];
    let dir = Arc::new(PeerDirectory::default());
    let mut replicas = HashMap::new();
    for id in ids {
        dir.set(id, format!("{id}"));
        replicas.insert(format!("{id}"), store());
    }
    let peers = Arc::new(Peers {
        replicas,
        failing: Mutex::new(HashSet::new()),
    });
    let ring = Ring {
        version: 1,
        replication: 3,
        members: ids.iter().map(|&id| RingMember { id, weight: 1 }).collect(),
    };
    let link = ClusterLink {
        me: pid(1),
        local: store(),
        transport: Some(peers.clone() as Arc<dyn PeerTransport>),
        meta: meta.clone() as Arc<dyn MetadataStore>,
        ring: Arc::new(RwLock::new(Arc::new(ring))),
        directory: dir,
        copied: Default::default(),
    };
    let vol = VolumeId(9);
    let io = Arc::new(ReplicatedChunks::open(link, vol, 3).await.unwrap());
    let (e, c) = (Epoch(1), ChunkRef::new(vol, 0));
    io.write(c, 0, Bytes::from_static(b"one"), e).await.unwrap();
    let placed = io.healthy_replicas(c).unwrap();
    assert_eq!(placed.len(), 3);
    let (x, y, z) = (placed[0], placed[1], placed[2]);

    // The flush reaches x but not y or z; its record of the first replica it
    // gives up stops in metadata.
    peers.fail(&format!("{y}"), "flush");
    peers.fail(&format!("{z}"), "flush");
    meta.hold_next_txn.store(true, Ordering::SeqCst);
    let flushing = tokio::spawn({
        let io = io.clone();
        async move { io.flush(vol, e).await }
    });
    tokio::time::timeout(Duration::from_secs(10), meta.held.notified())
        .await
        .expect("the flush gives a replica up");

    // Meanwhile a write misses x, the copy the flush counted on; it still
    // reaches the replica the flush has not given up yet.
    peers.fail(&format!("{x}"), "write");
    io.write(c, 0, Bytes::from_static(b"two"), e)
        .await
        .expect("the write reaches a healthy replica");
    meta.release.add_permits(1);
    let flushed = tokio::time::timeout(Duration::from_secs(10), flushing)
        .await
        .expect("the flush finishes")
        .unwrap();

    let left = io.healthy_replicas(c);
    assert!(
        left.as_ref().is_ok_and(|l| l.len() == 1),
        "the chunk must keep exactly the one replica holding every write, got {left:?}"
    );
    assert!(
        flushed.is_err(),
        "the last copy could not be flushed: the FLUSH must fail, not succeed"
    );
    // Once the peers answer again the retried flush succeeds and the
    // acknowledged write is there.
    peers.heal();
    io.flush(vol, e).await.expect("the retried flush");
    assert_eq!(&io.read(c, 0, 3).await.unwrap()[..], b"two");
}
