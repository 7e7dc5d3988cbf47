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
use crate::rebalance::PlacementRecord;
use crate::replication::{parse_degraded_key, DEGRADED};
use crate::scrub::ScrubResult;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use torus_traits::{Error, MetadataStore, PeerId, Result, Ring, RingMember};

/// A volume as `volume list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub record: VolumeRecord,
    /// `healthy` (every copy current and where the ring places it),
    /// `rebuilding` (chunks are moving to a changed ring's owners, or a
    /// stale replica is alive and the volume's writer is copying to it) or
    /// `degraded` (stale replicas that nothing is repairing now, or fewer
    /// ring members than the volume's replication).
    pub status: String,
    /// Address of the node that has it open for writing, if any.
    pub open_on: Option<String>,
}

/// How far the cluster is from every chunk having all its copies where the
/// current ring places them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// Volumes still placed (partly) by an older ring: chunks to move.
    pub moving: u64,
    /// Replicas recorded stale (chunk, peer) on ring members, waiting for a
    /// resync, and copies left by a move on a live peer, waiting to be
    /// deleted.
    pub stale: u64,
}

impl Balance {
    pub fn balanced(&self) -> bool {
        self.moving == 0 && self.stale == 0
    }
}

/// Cluster operations.
#[async_trait]
pub trait Control: Send + Sync {
    /// Chunks still to move or rebuild.
    async fn balance(&self) -> Result<Balance>;
    async fn init(&self, params: InitParams) -> Result<ClusterRecord>;
    async fn cluster(&self) -> Result<ClusterRecord>;
    async fn create_volume(&self, name: &str, size: u64) -> Result<VolumeRecord>;
    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>>;
    async fn delete_volume(&self, name: &str) -> Result<VolumeRecord>;
    /// Ask for a scrub of a volume; returns the request id its result will
    /// carry (see [`scrub`](crate::scrub)).
    async fn request_scrub(&self, name: &str) -> Result<u64>;
    /// The last recorded scrub of a volume.
    async fn scrub_result(&self, name: &str) -> Result<Option<ScrubResult>>;
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

    /// Every volume's placement record.
    async fn placements(
        &self,
    ) -> Result<std::collections::HashMap<torus_traits::VolumeId, PlacementRecord>> {
        let mut out = std::collections::HashMap::new();
        for kv in self.meta.range(keys::PLACEMENT.as_bytes()).await? {
            if let Some(id) = keys::volume_id_after(keys::PLACEMENT, &kv.key) {
                out.insert(id, crate::codec::decode(&kv.key, &kv.value)?);
            }
        }
        Ok(out)
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

    async fn balance(&self) -> Result<Balance> {
        let (ring, _) = cluster::ring(&*self.meta).await?;
        let moving = self.placements().await?;
        Ok(Balance {
            moving: moving
                .values()
                .filter(|r| !r.balanced_at(ring.version))
                .count() as u64,
            // A record of a peer out of the ring waits only to be dropped
            // by the volume's writer: no copy is missing for it.
            stale: self
                .meta
                .range(DEGRADED.as_bytes())
                .await?
                .iter()
                .filter(|kv| {
                    parse_degraded_key(&kv.key).map_or(true, |(_, peer)| ring.contains(peer))
                })
                .count() as u64
                + crate::rebalance::live_orphans(&*self.meta)
                    .await?
                    .values()
                    .sum::<u64>(),
        })
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeStatus>> {
        // Six ranges and gets in all (locks, degraded records, peers,
        // placements, ring, volumes), not requests per volume.
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
        let alive = peers::alive(&*self.meta).await?;
        let (ring, _) = cluster::ring(&*self.meta).await?;
        let placements = self.placements().await?;
        Ok(catalog::list(&*self.meta)
            .await?
            .into_iter()
            .map(|record| VolumeStatus {
                status: match degraded.get(&record.id) {
                    // Chunks are moving to the current ring's owners.
                    _ if placements
                        .get(&record.id)
                        .is_some_and(|p| !p.balanced_at(ring.version)) =>
                    {
                        "rebuilding"
                    }
                    // Fewer ring members than copies wanted.
                    None if (ring.members.len() as u32) < record.replication => "degraded",
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

    async fn request_scrub(&self, name: &str) -> Result<u64> {
        let (record, _) = catalog::get_by_name(&*self.meta, name).await?;
        crate::scrub::request(&*self.meta, record.id).await
    }

    async fn scrub_result(&self, name: &str) -> Result<Option<ScrubResult>> {
        let (record, _) = catalog::get_by_name(&*self.meta, name).await?;
        crate::scrub::last_result(&*self.meta, record.id).await
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
