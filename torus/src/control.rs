//! The operator's view of a cluster: what `torusctl` does.
//!
//! [`Control`] is implemented once on top of metadata ([`MetaControl`]), and
//! carried over HTTP by the node's admin endpoint (`admin` module: server and
//! [`AdminClient`](crate::admin::AdminClient)). So `torusctl` against a local
//! embedded node and `torusctl --etcd` against a cluster run the same code.

use crate::catalog::{self, VolumeRecord};
use crate::cluster::{self, ClusterRecord, InitParams};
use crate::keys;
use crate::peers::{self, PeerStatus};
use crate::replication::{parse_degraded_key, DEGRADED};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use torus_traits::{Error, MetadataStore, PeerId, Result, Ring, RingMember};

/// A volume as `volume list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub record: VolumeRecord,
    /// `healthy` (every copy current), `rebuilding` (some replica is
    /// recorded stale, is alive, and the volume's writer is copying to it)
    /// or `degraded` (stale replicas that nothing is repairing now).
    pub status: String,
    /// Address of the node that has it open for writing, if any.
    pub open_on: Option<String>,
}

/// Cluster operations.
#[async_trait]
pub trait Control: Send + Sync {
    async fn init(&self, params: InitParams) -> Result<ClusterRecord>;
    async fn cluster(&self) -> Result<ClusterRecord>;
    async fn create_volume(&self, name: &str, size: u64) -> Result<VolumeRecord>;
    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>>;
    async fn delete_volume(&self, name: &str) -> Result<VolumeRecord>;
    async fn list_peers(&self) -> Result<Vec<PeerStatus>>;
    async fn ring(&self) -> Result<Ring>;
    /// Add peers, named by UUID or address, to the ring.
    async fn add_peers(&self, peers: &[String]) -> Result<Ring>;
    /// Take peers, named by UUID or address, out of the ring.
    async fn remove_peers(&self, peers: &[String]) -> Result<Ring>;
    async fn set_replication(&self, replication: u32) -> Result<Ring>;
}

/// Find the peers named by UUID or address among `known`.
fn resolve(known: &[PeerStatus], names: &[String]) -> Result<Vec<PeerStatus>> {
    names
        .iter()
        .map(|name| {
            let plain = crate::config::strip_scheme(name);
            known
                .iter()
                .find(|p| {
                    p.info.id.to_string() == *name
                        || crate::config::strip_scheme(&p.info.address) == plain
                })
                .cloned()
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "no peer {name:?} is known (see `torusctl list-peers`)"
                    ))
                })
        })
        .collect()
}

/// [`Control`] directly on a metadata store.
pub struct MetaControl {
    meta: Arc<dyn MetadataStore>,
}

impl MetaControl {
    pub fn new(meta: Arc<dyn MetadataStore>) -> Self {
        MetaControl { meta }
    }
}

fn not_initialised() -> Error {
    Error::NotFound("the cluster is not initialised: run `torusctl init`".into())
}

#[async_trait]
impl Control for MetaControl {
    async fn init(&self, params: InitParams) -> Result<ClusterRecord> {
        cluster::init(&*self.meta, params).await
    }

    async fn cluster(&self) -> Result<ClusterRecord> {
        cluster::get(&*self.meta).await?.ok_or_else(not_initialised)
    }

    async fn create_volume(&self, name: &str, size: u64) -> Result<VolumeRecord> {
        self.cluster().await?;
        let (ring, _) = cluster::ring(&*self.meta).await?;
        catalog::create(&*self.meta, name, size, ring.replication).await
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>> {
        // Four ranges in all (locks, degraded records, peers, volumes), not
        // requests per volume.
        let mut open_on = std::collections::HashMap::new();
        for kv in self.meta.range(keys::LOCKS.as_bytes()).await? {
            if let Some(id) = keys::volume_id_after(keys::LOCKS, &kv.key) {
                let lock: catalog::LockRecord = crate::codec::decode(&kv.key, &kv.value)?;
                open_on.insert(id, lock.address);
            }
        }
        // Any replica recorded as stale makes the volume degraded until it
        // is rebuilt; it is being rebuilt when the volume is open for
        // writing (its writer resyncs) and a stale replica is alive.
        let mut degraded: std::collections::HashMap<_, Vec<PeerId>> = Default::default();
        for kv in self.meta.range(DEGRADED.as_bytes()).await? {
            if let Some(id) = keys::volume_id_after(DEGRADED, &kv.key) {
                let peer = parse_degraded_key(&kv.key).ok().map(|(_, peer)| peer);
                degraded.entry(id).or_default().extend(peer);
            }
        }
        let alive: std::collections::HashSet<PeerId> = self
            .meta
            .range(keys::PEERS.as_bytes())
            .await?
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(&kv.key);
                key.strip_prefix(keys::PEERS)?.parse::<PeerId>().ok()
            })
            .collect();
        Ok(catalog::list(&*self.meta)
            .await?
            .into_iter()
            .map(|record| VolumeStatus {
                status: match degraded.get(&record.id) {
                    None => "healthy",
                    Some(stale)
                        if open_on.contains_key(&record.id)
                            && stale.iter().any(|p| alive.contains(p)) =>
                    {
                        "rebuilding"
                    }
                    Some(_) => "degraded",
                }
                .into(),
                open_on: open_on.remove(&record.id),
                record,
            })
            .collect())
    }

    async fn delete_volume(&self, name: &str) -> Result<VolumeRecord> {
        catalog::delete(&*self.meta, name).await
    }

    async fn list_peers(&self) -> Result<Vec<PeerStatus>> {
        peers::list(&*self.meta).await
    }

    async fn ring(&self) -> Result<Ring> {
        self.cluster().await?;
        Ok(cluster::ring(&*self.meta).await?.0)
    }

    async fn add_peers(&self, names: &[String]) -> Result<Ring> {
        let found = resolve(&self.list_peers().await?, names)?;
        let members: Vec<RingMember> = found
            .iter()
            .map(|p| RingMember {
                id: p.info.id,
                weight: p.info.capacity.max(1),
            })
            .collect();
        cluster::add_members(&*self.meta, &members).await
    }

    async fn remove_peers(&self, names: &[String]) -> Result<Ring> {
        let found = resolve(&self.list_peers().await?, names)?;
        let ids: Vec<PeerId> = found.iter().map(|p| p.info.id).collect();
        cluster::remove_members(&*self.meta, &ids).await
    }

    async fn set_replication(&self, replication: u32) -> Result<Ring> {
        cluster::set_replication(&*self.meta, replication).await
    }
}
