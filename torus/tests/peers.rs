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
        heartbeat_ms: 0,
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

/// `info` at `address`.
fn at(id: PeerId, address: &str) -> PeerInfo {
    PeerInfo {
        address: address.into(),
        ..info(id)
    }
}

/// A node must not start under an id a live node uses (a copied data
/// directory), and must start under the id of its own earlier run.
#[tokio::test]
async fn an_id_in_use_by_a_live_node_is_refused() {
    let meta = std::sync::Arc::new(MemoryMetadata::new());
    let ttl = Duration::from_millis(600);
    let id = PeerId::random();
    let (one, two) = (at(id, "10.0.0.1:40000"), at(id, "10.0.0.2:40000"));
    let mine = meta.grant(Duration::from_secs(10)).await.unwrap();

    // Nobody has the id: the claim writes the record.
    peers::claim_id(&*meta, &two, mine, ttl).await.unwrap();
    assert_eq!(
        peers::list(&*meta).await.unwrap()[0].info.address,
        two.address
    );
    meta.revoke(mine).await.unwrap();
    let mine = meta.grant(Duration::from_secs(10)).await.unwrap();

    // Its record says this very address: this node's own earlier run.
    let lease = meta.grant(Duration::from_secs(10)).await.unwrap();
    peers::heartbeat(&*meta, &one, lease).await.unwrap();
    let started = std::time::Instant::now();
    peers::claim_id(&*meta, &one, mine, ttl).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(200), "no wait");

    // Another address, nobody rewriting it: a dead run's record.
    peers::claim_id(&*meta, &two, mine, ttl).await.unwrap();

    // Another address, rewritten as a live node does: refused, naming it.
    let beating = {
        let meta = meta.clone();
        let one = one.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                peers::heartbeat(&*meta, &one, lease).await.unwrap();
            }
        })
    };
    let e = peers::claim_id(&*meta, &two, mine, ttl).await.unwrap_err();
    assert!(e.to_string().contains("in use by a live node"), "{e}");
    assert!(e.to_string().contains("10.0.0.1:40000"), "{e}");
    beating.abort();

    // The live node's lease lapses (it died): its record goes, and the id
    // is free again.
    meta.revoke(lease).await.unwrap();
    peers::claim_id(&*meta, &two, mine, ttl).await.unwrap();
    assert_eq!(
        peers::list(&*meta).await.unwrap()[0].info.address,
        two.address
    );
}

/// Two nodes starting at the same moment under one id (two clones of one
/// data directory booted together): exactly one of them gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_nodes_starting_at_once_under_one_id_one_is_refused() {
    let meta = std::sync::Arc::new(MemoryMetadata::new());
    let ttl = Duration::from_millis(600);
    for round in 0..5 {
        let id = PeerId::random();
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let nodes = ["10.0.0.1:40000", "10.0.0.2:40000"].map(|address| {
            let (meta, start, me) = (meta.clone(), start.clone(), at(id, address));
            tokio::spawn(async move {
                let lease = meta.grant(Duration::from_secs(10)).await.unwrap();
                start.wait().await;
                peers::claim_id(&*meta, &me, lease, ttl).await?;
                // Started: heartbeats as a node does, every third of its TTL.
                tokio::spawn(async move {
                    for _ in 0..30 {
                        peers::heartbeat(&*meta, &me, lease).await.unwrap();
                        tokio::time::sleep(ttl / 3).await;
                    }
                });
                Ok::<_, torus_traits::Error>(())
            })
        });
        let mut started = 0;
        for node in nodes {
            match node.await.unwrap() {
                Ok(()) => started += 1,
                Err(e) => assert!(e.to_string().contains("in use by a live node"), "{e}"),
            }
        }
        assert_eq!(started, 1, "round {round}: {started} nodes took the id");
    }
}

/// The live node's lease is longer than this node's: its record is
/// rewritten less often than this node's own TTL would suggest, and is
/// still seen to be alive.
#[tokio::test]
async fn a_live_node_with_a_longer_lease_is_seen_alive() {
    let meta = std::sync::Arc::new(MemoryMetadata::new());
    let id = PeerId::random();
    let beat = Duration::from_millis(400);
    let one = PeerInfo {
        heartbeat_ms: beat.as_millis() as u64,
        ..at(id, "10.0.0.1:40000")
    };
    let lease = meta.grant(Duration::from_secs(10)).await.unwrap();
    let beating = {
        let meta = meta.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                peers::heartbeat(&*meta, &one, lease).await.unwrap();
                tokio::time::sleep(beat).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // This node's TTL alone would watch for 150 ms, less than one period.
    let mine = meta.grant(Duration::from_secs(10)).await.unwrap();
    let two = at(id, "10.0.0.2:40000");
    let e = peers::claim_id(&*meta, &two, mine, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("in use by a live node"), "{e}");
    beating.abort();
}
