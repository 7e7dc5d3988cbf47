//! In-process engine tests: nodes composed from in-memory parts, exactly as
//! `compose` builds them from a config.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use torus::catalog;
use torus::cluster::{self, InitParams};
use torus::control::{Control, MetaControl};
use torus::node::{Node, NodeOptions};
use torus::replica::Replica;
use torus_backends::metadata::MemoryMetadata;
use torus_backends::storage::MemoryBlockStore;
use torus_traits::{
    BlockStore, ChunkRef, Epoch, Error, MetadataStore, PeerId, VolumeId, VolumeProvider,
};

const CHUNK: u64 = 1 << 20;

async fn cluster_meta() -> Arc<dyn MetadataStore> {
    let meta: Arc<dyn MetadataStore> = Arc::new(MemoryMetadata::new());
    cluster::init(
        &*meta,
        InitParams {
            chunk_size: CHUNK,
            replication: 1,
        },
    )
    .await
    .unwrap();
    meta
}

async fn node_on(meta: &Arc<dyn MetadataStore>, name: &str, ttl: Duration) -> Node {
    node_reachable(meta, name, ttl, None).await
}

/// A node that peers reach as `name` on `net`, when given.
async fn node_reachable(
    meta: &Arc<dyn MetadataStore>,
    name: &str,
    ttl: Duration,
    net: Option<&torus_transports::MemoryNetwork>,
) -> Node {
    let store: Arc<dyn BlockStore> = Arc::new(MemoryBlockStore::new(CHUNK, 256 << 20));
    let cluster = cluster::get(&**meta).await.unwrap().unwrap();
    let opts = NodeOptions {
        id: PeerId::random(),
        address: format!("nbd://{name}"),
        transport: net.map(|n| Arc::new(n.transport()) as Arc<dyn torus_traits::PeerTransport>),
        peer_listen: net.map(|_| name.to_string()),
        peer_advertise: None,
        lease_ttl: ttl,
        auto_join: true,
        healing: Default::default(),
    };
    Node::start(opts, meta.clone(), store, cluster)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_volume_passes_the_block_device_suite() {
    let meta = cluster_meta().await;
    let node = node_on(&meta, "a", Duration::from_secs(10)).await;
    catalog::create(&*meta, "suite", 16 << 20, 1).await.unwrap();
    let dev = node.open("suite", false).await.unwrap();
    torus_traits::conformance::block_device::all(&*dev).await;
}

#[tokio::test]
async fn catalog_names_sizes_and_concurrent_creates() {
    let meta = cluster_meta().await;
    let ctl = MetaControl::new(meta.clone());
    // Ten concurrent creates of one name: exactly one wins.
    let results =
        futures::future::join_all((0..10).map(|_| ctl.create_volume("same", 1 << 20))).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(results
        .iter()
        .all(|r| r.is_ok() || matches!(r, Err(Error::AlreadyExists(_)))));
    // Distinct names get distinct ids.
    let made = futures::future::join_all((0..10).map(|i| {
        let ctl = &ctl;
        async move {
            ctl.create_volume(&format!("v{i}"), 1 << 20)
                .await
                .unwrap()
                .id
        }
    }))
    .await;
    let mut ids = made.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10);
    assert_eq!(ctl.list_volumes().await.unwrap().len(), 11);
    assert!(matches!(
        ctl.create_volume("", 1).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        ctl.create_volume("a/b", 1).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        ctl.create_volume("z", 0).await,
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(ctl.create_volume("r", 1000).await.unwrap().size, 4096);
    assert!(matches!(
        ctl.delete_volume("missing").await,
        Err(Error::NotFound(_))
    ));
    ctl.delete_volume("same").await.unwrap();
    assert!(
        ctl.create_volume("same", 1 << 20).await.is_ok(),
        "a deleted name can be reused"
    );
}

#[tokio::test]
async fn one_writer_per_volume_with_fencing_and_takeover() {
    let meta = cluster_meta().await;
    // Both hold data (the ring places chunks on either), so they must reach
    // each other.
    let net = torus_transports::MemoryNetwork::new();
    let a = node_reachable(&meta, "a", Duration::from_secs(2), Some(&net)).await;
    let b = node_reachable(&meta, "b", Duration::from_secs(2), Some(&net)).await;
    a.refresh_cluster_view().await.unwrap();
    b.refresh_cluster_view().await.unwrap();
    catalog::create(&*meta, "v", 8 << 20, 1).await.unwrap();

    let dev_a = a.open("v", false).await.unwrap();
    let dev_a2 = a.open("v", false).await.unwrap();
    dev_a
        .write(0, Bytes::from_static(b"from a"), false)
        .await
        .unwrap();
    dev_a2
        .write(100, Bytes::from_static(b"second handle"), true)
        .await
        .unwrap();
    // B is refused, with the holder named.
    match b.open("v", false).await {
        Err(Error::Locked(m)) => {
            assert!(m.contains(&a.id().to_string()) && m.contains("(a)"), "{m}")
        }
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("second writer must be refused"),
    }
    // Read-only opens are always allowed.
    let ro = b.open("v", true).await.unwrap();
    assert!(matches!(
        ro.write(0, Bytes::from_static(b"x"), false).await,
        Err(Error::ReadOnly(_))
    ));
    // Deleting an open volume is refused.
    assert!(matches!(
        catalog::delete(&*meta, "v").await,
        Err(Error::Locked(_))
    ));

    // A dies without releasing: its lease lapses and B takes over at a newer epoch.
    let (epoch_a, _) = catalog::get_by_name(&*meta, "v").await.unwrap();
    a.abandon();
    let start = tokio::time::Instant::now();
    let dev_b = loop {
        match b.open("v", false).await {
            Ok(d) => break d,
            Err(Error::Locked(_)) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("takeover failed: {e}"),
        }
    };
    let (epoch_b, _) = catalog::get_by_name(&*meta, "v").await.unwrap();
    assert!(epoch_b.epoch > epoch_a.epoch);
    dev_b.flush().await.unwrap();
    drop((dev_a, dev_a2, dev_b));
}

#[tokio::test]
async fn replicas_refuse_stale_epochs() {
    let store: Arc<dyn BlockStore> = Arc::new(MemoryBlockStore::new(CHUNK, 64 << 20));
    let r = Replica::new(store);
    let c = ChunkRef::new(VolumeId(1), 0);
    r.write(c, 0, Bytes::from_static(b"epoch 2"), Epoch(2))
        .await
        .unwrap();
    assert!(matches!(
        r.write(c, 0, Bytes::from_static(b"epoch 1"), Epoch(1))
            .await,
        Err(Error::Fenced(_))
    ));
    assert!(matches!(
        r.zero(c, 0, 7, Epoch(1)).await,
        Err(Error::Fenced(_))
    ));
    assert!(matches!(
        r.flush(VolumeId(1), Epoch(1)).await,
        Err(Error::Fenced(_))
    ));
    assert_eq!(&r.read(c, 0, 7).await.unwrap()[..], b"epoch 2");
    // Nor may an old writer delete the chunk.
    use torus_traits::PeerHandler;
    let delete = |e| torus_traits::PeerRequest::DeleteChunk {
        chunk: c,
        epoch: Epoch(e),
    };
    assert!(matches!(r.handle(delete(1)).await, Err(Error::Fenced(_))));
    assert_eq!(&r.read(c, 0, 7).await.unwrap()[..], b"epoch 2");
    // Another volume's epochs are independent.
    r.write(
        ChunkRef::new(VolumeId(2), 0),
        0,
        Bytes::from_static(b"x"),
        Epoch(1),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn deleting_a_volume_frees_its_chunks() {
    let meta = cluster_meta().await;
    let node = node_on(&meta, "a", Duration::from_secs(10)).await;
    catalog::create(&*meta, "gone", 8 << 20, 1).await.unwrap();
    catalog::create(&*meta, "kept", 8 << 20, 1).await.unwrap();
    for name in ["gone", "kept"] {
        let dev = node.open(name, false).await.unwrap();
        dev.write(3 << 20, Bytes::from(vec![7u8; 2 << 20]), true)
            .await
            .unwrap();
    }
    // Wait for the lock releases of the closed handles.
    let start = tokio::time::Instant::now();
    while catalog::delete(&*meta, "gone").await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "lock not released after close"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = tokio::time::Instant::now();
    while node.store().used().await.unwrap() != 2 << 20 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "deleted volume's chunks not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dev = node.open("kept", true).await.unwrap();
    assert!(dev
        .read(3 << 20, 2 << 20)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 7));
}
