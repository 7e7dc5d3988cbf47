//! The peer registry, on top of [`MetadataStore`].
//!
//! A live node keeps `peers/<uuid>` bound to its lease and rewrites it with
//! every heartbeat (address, pool size, used bytes, rebuild rate). When the
//! node dies its lease lapses and the key vanishes. The last record a peer
//! wrote is also kept, lease-free, under `peer-info/<uuid>`, so a ring member
//! that is down can still be shown with its address.

use crate::cluster;
use crate::codec::{decode, encode};
use crate::keys;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use torus_traits::{Compare, LeaseId, MetadataStore, PeerId, PeerInfo, Result, Txn, TxnOp};

const PEER_INFO: &str = "/torus/peer-info/";

fn info_key(id: PeerId) -> Vec<u8> {
    format!("{PEER_INFO}{id}").into_bytes()
}

/// Liveness and membership of a peer, as `list-peers` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Membership {
    /// Alive and in the ring.
    #[serde(rename = "OK")]
    Ok,
    /// Alive, not in the ring (not holding data).
    #[serde(rename = "Avail")]
    Avail,
    /// In the ring, not alive.
    #[serde(rename = "DOWN")]
    Down,
}

/// One row of `list-peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub info: PeerInfo,
    pub member: Membership,
}

/// Claim `info.id` for this node, refusing while another live node uses
/// that id: a data directory copied from another node (a cloned VM, a
/// restored backup) carries its `peer-id`, and two nodes under one id would
/// take each other's replica traffic, each acknowledging writes for chunks
/// the other holds. Called before this node's first heartbeat, with the
/// record it will write (its advertised address) and its lease.
///
/// The record is created only where there is none, in one transaction, so
/// of two nodes starting at once under one id exactly one writes it; the
/// other finds a record, as it would a running node's.
///
/// A live record with this id and the same address is this node's own
/// earlier run (two live processes cannot listen on one address), and so
/// is one at another address that nobody rewrites: a dead run's record,
/// lapsing with its lease (a restart that picked a new port). A live node
/// rewrites its record every third of its lease's TTL (`heartbeat`, the
/// record's `heartbeat_ms`), so the record is watched for half a TTL, the
/// longer of this node's and the record's (at most [`MAX_CLAIM_WAIT`]):
/// rewritten means alive. A record that lapses meanwhile is claimed anew.
pub async fn claim_id(
    meta: &dyn MetadataStore,
    info: &PeerInfo,
    lease: LeaseId,
    ttl: std::time::Duration,
) -> Result<()> {
    let key = keys::peer(info.id);
    // Bounded: each round either claims, decides, or saw a record lapse.
    for _ in 0..CLAIM_ROUNDS {
        let claim = Txn::new()
            .when([Compare::absent(key.clone())])
            .and_then([TxnOp::put_with_lease(key.clone(), encode(info)?, lease)]);
        if meta.txn(claim).await?.succeeded {
            return Ok(());
        }
        let Some(first) = meta.get(&key).await? else {
            continue; // lapsed between the two: claim again
        };
        let (theirs, their_beat) = decode::<PeerInfo>(&key, &first.value)
            .map(|info| (info.address, info.heartbeat_ms))
            .unwrap_or_default();
        if theirs == info.address {
            return Ok(());
        }
        // Half their TTL is one and a half of their heartbeat periods.
        let wait = (ttl / 2)
            .max(std::time::Duration::from_millis(
                their_beat.saturating_mul(3) / 2,
            ))
            .min(MAX_CLAIM_WAIT);
        tracing::info!(
            id = %info.id, address = %theirs, ?wait,
            "peer id has a record at another address; waiting to see whether that node is alive"
        );
        match watch(meta, &key, first.mod_revision, wait).await? {
            // Nobody rewrites it: a dead run's record.
            Watched::Unchanged => return Ok(()),
            Watched::Rewritten => {
                return Err(torus_traits::Error::InvalidArgument(format!(
                    "peer id {} is in use by a live node at {theirs:?}: every node needs a \
                     data directory of its own (was this one copied from that node's?)",
                    info.id
                )))
            }
            Watched::Lapsed => {} // claim again
        }
    }
    Err(torus_traits::Error::Unavailable(format!(
        "could not claim peer id {}: its record kept changing hands",
        info.id
    )))
}

/// How many times [`claim_id`] tries again after the record lapsed.
const CLAIM_ROUNDS: usize = 5;

/// The longest [`claim_id`] watches another node's record, whatever its
/// heartbeat period says.
pub const MAX_CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// What became of a record watched by [`watch`].
enum Watched {
    Unchanged,
    Rewritten,
    Lapsed,
}

/// Watches `key` (last written at `revision`) for up to `wait`, until it is
/// rewritten or deleted.
async fn watch(
    meta: &dyn MetadataStore,
    key: &[u8],
    revision: i64,
    wait: std::time::Duration,
) -> Result<Watched> {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        match meta.get(key).await? {
            Some(now) if now.mod_revision == revision => {}
            Some(_) => return Ok(Watched::Rewritten),
            None => return Ok(Watched::Lapsed),
        }
    }
    Ok(Watched::Unchanged)
}

/// Write this peer's record under its lease (and the lease-free copy).
pub async fn heartbeat(meta: &dyn MetadataStore, info: &PeerInfo, lease: LeaseId) -> Result<()> {
    let value = encode(info)?;
    meta.txn(Txn::new().and_then([
        TxnOp::put_with_lease(keys::peer(info.id), value.clone(), lease),
        TxnOp::put(info_key(info.id), value),
    ]))
    .await?;
    Ok(())
}

/// Delete the lease-free record of a peer leaving for good that never held
/// data (a client-only node such as `torusblk`), so such records do not pile
/// up. Refused for a ring member: its record shows it while it is down.
pub async fn forget(meta: &dyn MetadataStore, id: PeerId) -> Result<()> {
    let (ring, _) = cluster::ring(meta).await?;
    if ring.members.iter().any(|m| m.id == id) {
        return Err(torus_traits::Error::InvalidArgument(format!(
            "peer {id} is in the ring: remove it from the ring first"
        )));
    }
    meta.delete(&info_key(id)).await?;
    Ok(())
}

/// The ids of the live peers (those whose lease holds their record).
pub async fn alive(meta: &dyn MetadataStore) -> Result<std::collections::BTreeSet<PeerId>> {
    Ok(meta
        .range(keys::PEERS.as_bytes())
        .await?
        .iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(&kv.key);
            key.strip_prefix(keys::PEERS)?.parse::<PeerId>().ok()
        })
        .collect())
}

/// Every peer that is alive or in the ring, with its membership.
pub async fn list(meta: &dyn MetadataStore) -> Result<Vec<PeerStatus>> {
    let mut alive = BTreeMap::new();
    for kv in meta.range(keys::PEERS.as_bytes()).await? {
        let info: PeerInfo = decode(&kv.key, &kv.value)?;
        alive.insert(info.id, info);
    }
    let ring: Vec<PeerId> = match cluster::ring(meta).await {
        Ok((ring, _)) => ring.members.iter().map(|m| m.id).collect(),
        Err(torus_traits::Error::NotFound(_)) => vec![],
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for id in &ring {
        match alive.remove(id) {
            Some(info) => out.push(PeerStatus {
                info,
                member: Membership::Ok,
            }),
            None => {
                let info = match meta.get(&info_key(*id)).await? {
                    Some(kv) => decode(&kv.key, &kv.value)?,
                    None => PeerInfo {
                        id: *id,
                        address: String::new(),
                        capacity: 0,
                        used: 0,
                        rebalance_rate: 0,
                        updated_unix_ms: 0,
                        heartbeat_ms: 0,
                    },
                };
                out.push(PeerStatus {
                    info,
                    member: Membership::Down,
                });
            }
        }
    }
    out.extend(alive.into_values().map(|info| PeerStatus {
        info,
        member: Membership::Avail,
    }));
    Ok(out)
}
