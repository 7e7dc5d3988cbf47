//! In-process clusters: memory metadata, memory transport, memory storage.
//! Placement, replication, degraded marking and fencing, fast and
//! deterministic.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use torus::catalog;
use torus::cluster;
use torus::node::{Node, NodeOptions};
use torus::placement;
use torus::replication::degraded_prefix;
use torus_backends::storage::MemoryBlockStore;
use torus_traits::{
    BlockStore, ChunkRef, Epoch, Error, MetadataStore, PeerId, PeerRequest, PeerTransport,
    VolumeProvider,
};
use torus_transports::MemoryNetwork;

mod common;

const CHUNK: u64 = 1 << 20;

struct Cluster {
    meta: Arc<dyn MetadataStore>,
    net: MemoryNetwork,
    nodes: Vec<Node>,
}

async fn cluster(n: usize, replication: u32, ttl: Duration) -> Cluster {
    let meta = common::init(CHUNK, replication).await;
    let net = MemoryNetwork::new();
    let mut nodes = Vec::new();
    for i in 0..n {
        let store: Arc<dyn BlockStore> = Arc::new(MemoryBlockStore::new(CHUNK, 256 << 20));
        nodes.push(common::start_node_with_ttl(&meta, &net, i, store, ttl).await);
    }
    // Every node sees every other's address and the full ring.
    for n in &nodes {
        n.refresh_cluster_view().await.unwrap();
    }
    Cluster { meta, net, nodes }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn writes_reach_every_replica_and_reads_survive_a_dead_peer() {
    let c = cluster(3, 3, Duration::from_secs(10)).await;
    let (a, b, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    assert_eq!(a.ring().members.len(), 3);
    let vol = catalog::create(&*c.meta, "rep", 8 << 20, 3).await.unwrap();
    let dev = a.open("rep", false).await.unwrap();
    let data = pattern(1, 3 << 20);
    dev.write(512 * 1024, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    dev.flush().await.unwrap();
    // Every node holds a full copy of every chunk written.
    for n in &c.nodes {
        assert_eq!(
            n.store().used().await.unwrap(),
            3 << 20,
            "node {} lacks a copy",
            n.id()
        );
        let chunk = ChunkRef::new(vol.id, 1);
        let got = n.store().read(chunk, 0, CHUNK).await.unwrap();
        assert_eq!(
            &got[..],
            &data[CHUNK as usize - 512 * 1024..][..CHUNK as usize]
        );
    }

    // B dies: writes and reads through A still succeed; B is recorded degraded.
    b.abandon();
    let more = pattern(2, 1 << 20);
    dev.write(4 << 20, Bytes::from(more.clone()), true)
        .await
        .unwrap();
    let degraded = c
        .meta
        .range(degraded_prefix(vol.id).as_bytes())
        .await
        .unwrap();
    assert!(
        !degraded.is_empty(),
        "a write acknowledged without B must record B as degraded"
    );
    assert!(degraded
        .iter()
        .all(|kv| String::from_utf8_lossy(&kv.key).ends_with(&b.id().to_string())));
    assert_eq!(&dev.read(4 << 20, 1 << 20).await.unwrap()[..], &more[..]);
    assert_eq!(&dev.read(512 * 1024, 3 << 20).await.unwrap()[..], &data[..]);
    dev.flush().await.unwrap();
    drop(dev);

    // A releases the volume; the third node opens it and reads everything.
    let start = tokio::time::Instant::now();
    let dev3 = loop {
        match n3.open("rep", false).await {
            Ok(d) => break d,
            Err(Error::Locked(_)) if start.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("open on the third node: {e}"),
        }
    };
    assert_eq!(
        &dev3.read(512 * 1024, 3 << 20).await.unwrap()[..],
        &data[..]
    );
    assert_eq!(&dev3.read(4 << 20, 1 << 20).await.unwrap()[..], &more[..]);
    drop(c.net);
}

#[tokio::test]
async fn placement_spreads_replicas_over_distinct_peers() {
    let c = cluster(4, 2, Duration::from_secs(10)).await;
    let vol = catalog::create(&*c.meta, "spread", 32 << 20, 2)
        .await
        .unwrap();
    let dev = c.nodes[0].open("spread", false).await.unwrap();
    dev.write(0, Bytes::from(vec![9u8; 32 << 20]), true)
        .await
        .unwrap();
    let ring = c.nodes[0].ring();
    let mut total = 0;
    for n in &c.nodes {
        let chunks = n.store().list_chunks().await.unwrap();
        for ch in &chunks {
            assert!(
                placement::replicas(&ring, *ch, 2).contains(&n.id()),
                "chunk {ch} on a non-replica"
            );
        }
        // 32 chunks x 2 copies over 4 equal peers: each holds some, none all.
        assert!(
            !chunks.is_empty() && chunks.len() < 32,
            "{} chunks on one peer",
            chunks.len()
        );
        total += chunks.len();
    }
    assert_eq!(total, 64);
    let _ = vol;
}

#[tokio::test]
async fn a_stale_writer_is_fenced_by_every_replica() {
    let c = cluster(3, 3, Duration::from_secs(2)).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let vol = catalog::create(&*c.meta, "fence", 4 << 20, 3)
        .await
        .unwrap();
    let dev_a = a.open("fence", false).await.unwrap();
    dev_a
        .write(0, Bytes::from_static(b"from A, flushed"), false)
        .await
        .unwrap();
    dev_a.flush().await.unwrap();
    match b.open("fence", false).await {
        Err(Error::Locked(m)) => assert!(m.contains(&a.id().to_string()), "{m}"),
        other => panic!(
            "B must be refused while A holds the volume, got {:?}",
            other.err()
        ),
    }
    // A stops heartbeating (a partition): its lease lapses, B takes over.
    a.abandon();
    let start = tokio::time::Instant::now();
    let dev_b = loop {
        match b.open("fence", false).await {
            Ok(d) => break d,
            Err(Error::Locked(_)) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("takeover: {e}"),
        }
    };
    assert_eq!(&dev_b.read(0, 15).await.unwrap()[..], b"from A, flushed");
    dev_b
        .write(0, Bytes::from_static(b"from B"), true)
        .await
        .unwrap();
    // A write still carrying A's epoch is refused by every replica.
    let (record, _) = catalog::get_by_name(&*c.meta, "fence").await.unwrap();
    let stale = Epoch(record.epoch.0 - 1);
    let t = c.net.transport();
    for (i, _) in c.nodes.iter().enumerate() {
        let r = t
            .call(
                &format!("node{i}"),
                PeerRequest::Write {
                    chunk: ChunkRef::new(vol.id, 0),
                    offset: 0,
                    data: Bytes::from_static(b"stale!"),
                    epoch: stale,
                },
            )
            .await;
        if i == 0 {
            continue; // A's listener is gone with it.
        }
        assert!(
            matches!(r, Err(Error::Fenced(_))),
            "replica {i} accepted a stale write: {r:?}"
        );
    }
    assert_eq!(&dev_b.read(0, 6).await.unwrap()[..], b"from B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ring_changes_under_existing_data_and_the_data_follows() {
    let c = cluster(2, 1, Duration::from_secs(10)).await;
    catalog::create(&*c.meta, "data", 8 << 20, 1).await.unwrap();
    let dev = c.nodes[0].open("data", false).await.unwrap();
    dev.write(0, Bytes::from(vec![5u8; 8 << 20]), true)
        .await
        .unwrap();
    // A third node auto-joins a ring that already places data; the chunks
    // it now owns move to it (see tests/rebalance.rs), and nothing written
    // stops reading back meanwhile.
    let store: Arc<dyn BlockStore> = Arc::new(MemoryBlockStore::new(CHUNK, 256 << 20));
    let rec = cluster::get(&*c.meta).await.unwrap().unwrap();
    let opts = NodeOptions {
        id: PeerId(uuid::Uuid::from_u128(99)),
        address: "late".into(),
        transport: Some(Arc::new(c.net.transport())),
        peer_listen: Some("late".into()),
        peer_advertise: None,
        lease_ttl: Duration::from_secs(10),
        auto_join: true,
        healing: Default::default(),
    };
    let late = Node::start(opts, c.meta.clone(), store, rec).await.unwrap();
    assert!(cluster::ring(&*c.meta).await.unwrap().0.contains(late.id()));
    assert!(dev.read(0, 8 << 20).await.unwrap().iter().all(|&b| b == 5));
    // Taking every member out would leave the data nowhere: refused.
    let all: Vec<PeerId> = cluster::ring(&*c.meta)
        .await
        .unwrap()
        .0
        .members
        .iter()
        .map(|m| m.id)
        .collect();
    assert!(matches!(
        cluster::remove_members(&*c.meta, &all).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(dev.read(0, 8 << 20).await.unwrap().iter().all(|&b| b == 5));
    late.abandon();
}
