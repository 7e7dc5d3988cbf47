//! The cluster record and the ring, on top of [`MetadataStore`].
//!
//! `torusctl init` writes the cluster record once: the chunk size every node
//! cuts volumes into, the default replication, and the key-layout version.
//! The ring lists which peers hold data; it is versioned and only ever changed
//! by compare-and-swap on its `mod_revision`, so concurrent joins never lose
//! one another. Every version written is also kept under `rings/<version>`,
//! because a volume being rebalanced still places part of its chunks by an
//! older version (see [`rebalance`](crate::rebalance)); versions no volume
//! refers to any more are pruned.

use crate::codec::{decode, encode};
use crate::keys;
use serde::{Deserialize, Serialize};
use torus_traits::{
    ByteSize, Compare, CompareOp, Error, MetadataStore, PeerId, Result, Ring, RingMember, Txn,
    TxnOp,
};

/// Default chunk size: large enough to keep placement metadata small, while
/// I/O inside a chunk is at byte offsets so small writes stay small.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

/// Cluster-wide settings fixed at `torusctl init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Chunk size in bytes (the placement unit).
    pub chunk_size: u64,
    /// Default number of copies of each chunk.
    pub replication: u32,
    /// Version of the metadata key layout.
    pub layout_version: u32,
}

/// Parameters of `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitParams {
    pub chunk_size: u64,
    pub replication: u32,
}

impl Default for InitParams {
    fn default() -> Self {
        InitParams {
            chunk_size: DEFAULT_CHUNK_SIZE,
            replication: 1,
        }
    }
}

impl InitParams {
    pub fn validate(&self) -> Result<()> {
        let cs = self.chunk_size;
        if !(64 << 10..=256 << 20).contains(&cs) || !cs.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "block size {} must be a power of two between 64 KiB and 256 MiB",
                ByteSize(cs)
            )));
        }
        if !(1..=16).contains(&self.replication) {
            return Err(Error::InvalidArgument(format!(
                "replication {} must be between 1 and 16",
                self.replication
            )));
        }
        Ok(())
    }
}

/// Read the cluster record; `None` when the cluster is not initialised.
pub async fn get(meta: &dyn MetadataStore) -> Result<Option<ClusterRecord>> {
    match meta.get(keys::CLUSTER.as_bytes()).await? {
        Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
        None => Ok(None),
    }
}

/// Write the cluster record and an empty ring. Fails with `AlreadyExists`
/// (saying what the cluster has) when it was initialised before.
pub async fn init(meta: &dyn MetadataStore, params: InitParams) -> Result<ClusterRecord> {
    params.validate()?;
    let record = ClusterRecord {
        chunk_size: params.chunk_size,
        replication: params.replication,
        layout_version: keys::LAYOUT_VERSION,
    };
    let ring = Ring {
        version: 1,
        replication: params.replication,
        members: vec![],
    };
    let resp = meta
        .txn(
            Txn::new()
                .when([Compare::absent(keys::CLUSTER)])
                .and_then([
                    TxnOp::put(keys::CLUSTER, encode(&record)?),
                    TxnOp::put(keys::RING, encode(&ring)?),
                ])
                .or_else([TxnOp::get(keys::CLUSTER)]),
        )
        .await?;
    if resp.succeeded {
        return Ok(record);
    }
    let existing = match get(meta).await? {
        Some(r) => format!(
            " (block size {}, replication {})",
            ByteSize(r.chunk_size),
            r.replication
        ),
        None => String::new(),
    };
    Err(Error::AlreadyExists(format!(
        "cluster is already initialised{existing}"
    )))
}

/// The ring and the revision it was read at (for compare-and-swap).
pub async fn ring(meta: &dyn MetadataStore) -> Result<(Ring, i64)> {
    match meta.get(keys::RING.as_bytes()).await? {
        Some(kv) => Ok((decode(&kv.key, &kv.value)?, kv.mod_revision)),
        None => Err(Error::NotFound(
            "ring (is the cluster initialised? run `torusctl init`)".into(),
        )),
    }
}

/// Change the ring with `change` under compare-and-swap, retrying on
/// conflicts. `change` returns false when there is nothing to do.
pub async fn update_ring(
    meta: &dyn MetadataStore,
    mut change: impl FnMut(&mut Ring) -> Result<bool>,
) -> Result<Ring> {
    const ATTEMPTS: usize = 32;
    for _ in 0..ATTEMPTS {
        let (mut ring, rev) = ring(meta).await?;
        let old = ring.clone();
        if !change(&mut ring)? {
            return Ok(ring);
        }
        ring.version += 1;
        let resp = meta
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(keys::RING, CompareOp::Equal, rev)])
                    .and_then([
                        TxnOp::put(keys::RING, encode(&ring)?),
                        TxnOp::put(keys::ring_version(ring.version), encode(&ring)?),
                        // Volumes placed by the old version move from it.
                        TxnOp::put(keys::ring_version(old.version), encode(&old)?),
                    ]),
            )
            .await?;
        if resp.succeeded {
            return Ok(ring);
        }
    }
    Err(Error::Unavailable(
        "ring changed concurrently too many times; try again".into(),
    ))
}

/// The ring as it was at `version` (the current one, or one kept in the
/// history for volumes still moving from it).
pub async fn ring_at(meta: &dyn MetadataStore, version: u64) -> Result<Ring> {
    let (current, _) = ring(meta).await?;
    if current.version == version {
        return Ok(current);
    }
    match meta.get(&keys::ring_version(version)).await? {
        Some(kv) => decode(&kv.key, &kv.value),
        None => Err(Error::Corrupt(format!(
            "ring version {version} is needed by a volume but is not in the ring history"
        ))),
    }
}

/// Delete ring versions older than `keep_from` from the history.
pub async fn prune_rings(meta: &dyn MetadataStore, keep_from: u64) -> Result<()> {
    for kv in meta.range(keys::RINGS.as_bytes()).await? {
        let version = String::from_utf8_lossy(&kv.key[keys::RINGS.len()..])
            .parse::<u64>()
            .ok();
        if version.is_some_and(|v| v < keep_from) {
            meta.delete(&kv.key).await?;
        }
    }
    Ok(())
}

/// Add members to the ring (present ones are ignored). Volumes' chunks move
/// to their new owners in the background (see [`rebalance`](crate::rebalance)).
pub async fn add_members(meta: &dyn MetadataStore, members: &[RingMember]) -> Result<Ring> {
    update_ring(meta, |ring| {
        let mut changed = false;
        for m in members {
            if !ring.contains(m.id) {
                ring.members.push(*m);
                changed = true;
            }
        }
        Ok(changed)
    })
    .await
}

/// Take members out of the ring (absent ones are ignored). Their chunks are
/// copied to the new owners before their copies are deleted, so a live
/// member is drained and a dead one re-replicated from the other replicas.
/// Taking out every member is refused while volumes exist: their data would
/// have nowhere to go.
pub async fn remove_members(meta: &dyn MetadataStore, peers: &[PeerId]) -> Result<Ring> {
    let (current, _) = ring(meta).await?;
    if current.members.iter().all(|m| peers.contains(&m.id))
        && !current.members.is_empty()
        && !crate::catalog::list(meta).await?.is_empty()
    {
        return Err(Error::InvalidArgument(
            "cannot take every member out of the ring while volumes exist: their chunks would have nowhere to go".into(),
        ));
    }
    update_ring(meta, |ring| {
        let before = ring.members.len();
        ring.members.retain(|m| !peers.contains(&m.id));
        Ok(ring.members.len() != before)
    })
    .await
}

/// Change the ring's default replication for new volumes.
pub async fn set_replication(meta: &dyn MetadataStore, replication: u32) -> Result<Ring> {
    if !(1..=16).contains(&replication) {
        return Err(Error::InvalidArgument(format!(
            "replication {replication} must be between 1 and 16"
        )));
    }
    update_ring(meta, |ring| {
        let changed = ring.replication != replication;
        ring.replication = replication;
        Ok(changed)
    })
    .await
}
