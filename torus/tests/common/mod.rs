//! In-process clusters shared by the engine's tests: memory metadata, the
//! in-process transport, nodes with short leases.

// Each test file uses only some of these.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;
use torus::cluster::{self, InitParams};
use torus::node::{Healing, Node, NodeOptions};
use torus_backends::metadata::MemoryMetadata;
use torus_traits::{BlockStore, MetadataStore, PeerId, PeerTransport};
use torus_transports::MemoryNetwork;

/// The peer id of test node `n` (node `i` has id `i + 1`).
pub fn pid(n: u128) -> PeerId {
    PeerId(uuid::Uuid::from_u128(n))
}

/// Fresh memory metadata holding an initialised cluster.
pub async fn init(chunk_size: u64, replication: u32) -> Arc<dyn MetadataStore> {
    let meta: Arc<dyn MetadataStore> = Arc::new(MemoryMetadata::new());
    cluster::init(
        &*meta,
        InitParams {
            chunk_size,
            replication,
        },
    )
    .await
    .expect("init the cluster");
    meta
}

/// Start node `i` on `store`: reachable as `node{i}` on `net`, a 2 s lease,
/// joining the ring.
pub async fn start_node(
    meta: &Arc<dyn MetadataStore>,
    net: &MemoryNetwork,
    i: usize,
    store: Arc<dyn BlockStore>,
) -> Node {
    start_node_with_ttl(meta, net, i, store, Duration::from_secs(2)).await
}

/// [`start_node`] with a lease of `lease_ttl`.
pub async fn start_node_with_ttl(
    meta: &Arc<dyn MetadataStore>,
    net: &MemoryNetwork,
    i: usize,
    store: Arc<dyn BlockStore>,
    lease_ttl: Duration,
) -> Node {
    start_node_healing(meta, net, i, store, lease_ttl, Healing::default()).await
}

/// [`start_node_with_ttl`] with its self-healing settings.
pub async fn start_node_healing(
    meta: &Arc<dyn MetadataStore>,
    net: &MemoryNetwork,
    i: usize,
    store: Arc<dyn BlockStore>,
    lease_ttl: Duration,
    healing: Healing,
) -> Node {
    let t: Arc<dyn PeerTransport> = Arc::new(net.transport());
    start_node_on(meta, t, i, store, lease_ttl, healing).await
}

/// Start node `i` calling peers through `transport` (a fault-injecting
/// decorator, say), listening as `node{i}`.
pub async fn start_node_on(
    meta: &Arc<dyn MetadataStore>,
    transport: Arc<dyn PeerTransport>,
    i: usize,
    store: Arc<dyn BlockStore>,
    lease_ttl: Duration,
    healing: Healing,
) -> Node {
    let record = cluster::get(&**meta)
        .await
        .expect("read the cluster")
        .expect("cluster initialised");
    let opts = NodeOptions {
        id: pid(i as u128 + 1),
        address: format!("node{i}"),
        transport: Some(transport),
        peer_listen: Some(format!("node{i}")),
        peer_advertise: None,
        lease_ttl,
        auto_join: true,
        healing,
    };
    Node::start(opts, meta.clone(), store, record)
        .await
        .expect("start the node")
}
