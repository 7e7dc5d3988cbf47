//! The peer registry's records: a client-only peer can be forgotten, a ring
//! member cannot.

use std::time::Duration;
use torus::cluster::{self, InitParams};
use torus::peers;
use torus_backends::metadata::MemoryMetadata;
use torus_traits::{MetadataStore, PeerId, PeerInfo, RingMember};

fn info(id: PeerId) -> PeerInfo {
    PeerInfo {
        id,
        address: "torusblk@host".into(),
        capacity: 0,
        used: 0,
        rebalance_rate: 0,
        updated_unix_ms: 1,
    }
}

async fn records(m: &MemoryMetadata) -> usize {
    m.range(b"/torus/peer-info/").await.unwrap().len()
}

#[tokio::test]
async fn forget_removes_a_client_peer_record_but_not_a_ring_member() {
    let meta = MemoryMetadata::new();
    cluster::init(
        &meta,
        InitParams {
            chunk_size: 1 << 20,
            replication: 1,
        },
    )
    .await
    .unwrap();
    let lease = meta.grant(Duration::from_secs(10)).await.unwrap();
    let (client, member) = (PeerId::random(), PeerId::random());
    peers::heartbeat(&meta, &info(client), lease).await.unwrap();
    peers::heartbeat(&meta, &info(member), lease).await.unwrap();
    cluster::add_members(
        &meta,
        &[RingMember {
            id: member,
            weight: 1 << 30,
        }],
    )
    .await
    .unwrap();
    assert_eq!(records(&meta).await, 2);
    meta.revoke(lease).await.unwrap();
    peers::forget(&meta, client).await.unwrap();
    assert_eq!(records(&meta).await, 1);
    let err = peers::forget(&meta, member).await.unwrap_err();
    assert!(err.to_string().contains("in the ring"), "{err}");
    // The member is still shown, as DOWN, with its address.
    let list = peers::list(&meta).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].info.address, "torusblk@host");
}

/// A node must not start under an id a live node uses (a copied data
/// directory), and must start under the id of its own earlier run.
#[tokio::test]
async fn an_id_in_use_by_a_live_node_is_refused() {
    let meta = std::sync::Arc::new(MemoryMetadata::new());
    let ttl = Duration::from_millis(600);
    let id = PeerId::random();
    let mut other = info(id);
    other.address = "10.0.0.1:40000".into();

    // Nobody has the id.
    peers::check_id_unused(&*meta, id, "10.0.0.2:40000", ttl)
        .await
        .unwrap();

    // Its record says this very address: this node's own earlier run.
    let lease = meta.grant(Duration::from_secs(10)).await.unwrap();
    peers::heartbeat(&*meta, &other, lease).await.unwrap();
    let started = std::time::Instant::now();
    peers::check_id_unused(&*meta, id, "10.0.0.1:40000", ttl)
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(200), "no wait");

    // Another address, nobody rewriting it: a dead run's record.
    peers::check_id_unused(&*meta, id, "10.0.0.2:40000", ttl)
        .await
        .unwrap();

    // Another address, rewritten as a live node does: refused, naming it.
    let beating = {
        let meta = meta.clone();
        let other = other.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                peers::heartbeat(&*meta, &other, lease).await.unwrap();
            }
        })
    };
    let e = peers::check_id_unused(&*meta, id, "10.0.0.2:40000", ttl)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("in use by a live node"), "{e}");
    assert!(e.to_string().contains("10.0.0.1:40000"), "{e}");
    beating.abort();

    // The live node's lease lapses (it died): its record goes, and the id
    // is free again.
    meta.revoke(lease).await.unwrap();
    peers::check_id_unused(&*meta, id, "10.0.0.2:40000", ttl)
        .await
        .unwrap();
}
