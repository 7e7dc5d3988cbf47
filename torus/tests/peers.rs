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
