//! The volume catalog and volume locks, on top of [`MetadataStore`].
//!
//! A volume has a by-name index (`name → id`) and a by-id record (size,
//! replication, write epoch). Creation allocates the id from a counter and
//! writes all three keys in one transaction that also checks the name is free,
//! so two concurrent creates of one name cannot both succeed.
//!
//! One writer per volume: [`acquire_lock`] writes the lock key bound to the
//! holder's lease and increments the volume's epoch in the same transaction.
//! Replicas refuse writes carrying an older epoch, so a holder that lost its
//! lock (its lease lapsed) is fenced even if it still runs.

use crate::codec::{decode, encode};
use crate::keys;
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};
use torus_traits::{
    ByteSize, Compare, CompareOp, Epoch, Error, KeyValue, LeaseId, MetadataStore, PeerId, Result,
    Txn, TxnOp, VolumeId,
};

/// Largest volume accepted (1 PiB): far beyond any pool here, small enough
/// that chunk arithmetic never overflows.
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;

/// What the catalog knows about a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Copies of each chunk.
    pub replication: u32,
    /// Incremented by every writable open; writes carry it for fencing.
    pub epoch: Epoch,
    pub created_unix_ms: u64,
}

/// Who holds a volume's writer lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub holder: PeerId,
    /// The holder's address, so an error can name it.
    pub address: String,
    pub epoch: Epoch,
    pub acquired_unix_ms: u64,
    /// Held by a node's rebalancer, not by a user of the volume: it lets go
    /// within seconds, so an open waits for it instead of failing.
    #[serde(default)]
    pub rebalancing: bool,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Check a volume name: 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not
/// starting with `.` or `-` (it becomes the NBD export name and a path part).
pub fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > 128 || !ok_chars || name.starts_with(['.', '-']) {
        return Err(Error::InvalidArgument(format!(
            "bad volume name {name:?}: use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )));
    }
    Ok(())
}

/// Check a volume size and round it up to whole 4 KiB blocks (block devices
/// and NBD clients work in sectors; `10M` is not a multiple of 512).
pub fn validate_size(size: u64) -> Result<u64> {
    if size == 0 || size > MAX_VOLUME_SIZE {
        return Err(Error::InvalidArgument(format!(
            "bad volume size {size} bytes ({}): it must be between 1 byte and 1 PiB",
            ByteSize(size)
        )));
    }
    Ok(size.div_ceil(torus_traits::SECTOR) * torus_traits::SECTOR)
}

/// Create a block volume. `AlreadyExists` when the name is taken.
pub async fn create(
    meta: &dyn MetadataStore,
    name: &str,
    size: u64,
    replication: u32,
) -> Result<VolumeRecord> {
    validate_name(name)?;
    let size = validate_size(size)?;
    const ATTEMPTS: usize = 32;
    for _ in 0..ATTEMPTS {
        // The volume's chunks are placed by the ring of its creation; the
        // transaction checks the ring did not change in between.
        let (ring, ring_rev) = crate::cluster::ring(meta).await?;
        let placement = crate::rebalance::PlacementRecord::settled(ring.version);
        let counter = meta.get(keys::NEXT_VOLUME_ID.as_bytes()).await?;
        let (next, counter_rev) = match &counter {
            Some(kv) => (decode::<u64>(&kv.key, &kv.value)?, kv.mod_revision),
            None => (1, 0),
        };
        let record = VolumeRecord {
            id: VolumeId(next),
            name: name.to_string(),
            size,
            replication,
            epoch: Epoch(0),
            created_unix_ms: now_ms(),
        };
        let by_name = keys::volume_by_name(name);
        let resp = meta
            .txn(
                Txn::new()
                    .when([
                        Compare::absent(by_name.clone()),
                        Compare::mod_revision(keys::NEXT_VOLUME_ID, CompareOp::Equal, counter_rev),
                        Compare::mod_revision(keys::RING, CompareOp::Equal, ring_rev),
                    ])
                    .and_then([
                        TxnOp::put(keys::placement(record.id), encode(&placement)?),
                        TxnOp::put(by_name.clone(), encode(&record.id)?),
                        TxnOp::put(keys::volume_by_id(record.id), encode(&record)?),
                        TxnOp::put(keys::NEXT_VOLUME_ID, encode(&(next + 1))?),
                    ])
                    .or_else([TxnOp::get(by_name)]),
            )
            .await?;
        if resp.succeeded {
            return Ok(record);
        }
        if meta.get(&keys::volume_by_name(name)).await?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "volume {name:?} already exists"
            )));
        }
        // Only the id counter or the ring moved under us: try again.
    }
    Err(Error::Unavailable(
        "volume catalog changed concurrently too many times; try again".into(),
    ))
}

/// Every volume, ordered by id.
pub async fn list(meta: &dyn MetadataStore) -> Result<Vec<VolumeRecord>> {
    meta.range(keys::VOLUMES_BY_ID.as_bytes())
        .await?
        .iter()
        .map(|kv| decode(&kv.key, &kv.value))
        .collect()
}

/// Look a volume up by name, with the revision of its record.
pub async fn get_by_name(meta: &dyn MetadataStore, name: &str) -> Result<(VolumeRecord, i64)> {
    let not_found = || Error::NotFound(format!("volume {name:?} does not exist"));
    let kv = meta
        .get(&keys::volume_by_name(name))
        .await?
        .ok_or_else(not_found)?;
    let id: VolumeId = decode(&kv.key, &kv.value)?;
    get_by_id(meta, id).await?.ok_or_else(not_found)
}

/// The record of a volume id, with its revision.
pub async fn get_by_id(
    meta: &dyn MetadataStore,
    id: VolumeId,
) -> Result<Option<(VolumeRecord, i64)>> {
    match meta.get(&keys::volume_by_id(id)).await? {
        Some(kv) => Ok(Some((decode(&kv.key, &kv.value)?, kv.mod_revision))),
        None => Ok(None),
    }
}

/// The lock record of a volume, if held.
pub async fn get_lock(
    meta: &dyn MetadataStore,
    id: VolumeId,
) -> Result<Option<(LockRecord, KeyValue)>> {
    match meta.get(&keys::lock(id)).await? {
        Some(kv) => Ok(Some((decode(&kv.key, &kv.value)?, kv))),
        None => Ok(None),
    }
}

fn locked_error(name: &str, lock: &LockRecord) -> Error {
    Error::Locked(format!(
        "volume {name:?} is open for writing on node {} ({})",
        lock.holder, lock.address
    ))
}

/// Delete a volume from the catalog. Refused with `Locked` while a node has it
/// open for writing. The chunks are freed by every node's garbage collector
/// when it sees the record go.
pub async fn delete(meta: &dyn MetadataStore, name: &str) -> Result<VolumeRecord> {
    let (record, rev) = get_by_name(meta, name).await?;
    let resp = meta
        .txn(
            Txn::new()
                .when([
                    Compare::mod_revision(keys::volume_by_id(record.id), CompareOp::Equal, rev),
                    Compare::absent(keys::lock(record.id)),
                ])
                .and_then([
                    TxnOp::delete(keys::volume_by_name(name)),
                    TxnOp::delete(keys::volume_by_id(record.id)),
                    // Stale-replica records die with the volume (no writer
                    // can add one: the lock is absent).
                    TxnOp::delete_prefix(crate::replication::degraded_prefix(record.id)),
                    TxnOp::delete(keys::placement(record.id)),
                    TxnOp::delete_prefix(keys::orphans_of(record.id)),
                    TxnOp::delete_prefix(keys::scrub_of(record.id)),
                ]),
        )
        .await?;
    if resp.succeeded {
        return Ok(record);
    }
    if let Some((lock, _)) = get_lock(meta, record.id).await? {
        return Err(locked_error(name, &lock));
    }
    Err(Error::Unavailable(format!(
        "volume {name:?} changed while deleting it; try again"
    )))
}

/// Take the writer lock of a volume for `holder`, bound to `lease`, and bump
/// the volume's epoch. Returns the record with the new epoch.
///
/// A lock already held by the same peer id is taken over: that is this node
/// restarted (a peer id belongs to one data directory), and the old process is
/// gone, so waiting for its lease to lapse would only delay recovery.
pub async fn acquire_lock(
    meta: &dyn MetadataStore,
    name: &str,
    holder: PeerId,
    address: &str,
    lease: LeaseId,
) -> Result<VolumeRecord> {
    acquire_lock_for(meta, name, holder, address, lease, false).await
}

/// [`acquire_lock`], saying whether the holder is a rebalancer.
pub async fn acquire_lock_for(
    meta: &dyn MetadataStore,
    name: &str,
    holder: PeerId,
    address: &str,
    lease: LeaseId,
    rebalancing: bool,
) -> Result<VolumeRecord> {
    const ATTEMPTS: usize = 16;
    for _ in 0..ATTEMPTS {
        let (mut record, rev) = get_by_name(meta, name).await?;
        let lock_key = keys::lock(record.id);
        let lock_cmp = match get_lock(meta, record.id).await? {
            Some((lock, _)) if lock.holder != holder => return Err(locked_error(name, &lock)),
            Some((_, kv)) => {
                Compare::mod_revision(lock_key.clone(), CompareOp::Equal, kv.mod_revision)
            }
            None => Compare::absent(lock_key.clone()),
        };
        record.epoch = Epoch(record.epoch.0 + 1);
        let lock = LockRecord {
            holder,
            address: address.to_string(),
            epoch: record.epoch,
            acquired_unix_ms: now_ms(),
            rebalancing,
        };
        let resp = meta
            .txn(
                Txn::new()
                    .when([
                        Compare::mod_revision(keys::volume_by_id(record.id), CompareOp::Equal, rev),
                        lock_cmp,
                    ])
                    .and_then([
                        TxnOp::put(keys::volume_by_id(record.id), encode(&record)?),
                        TxnOp::put_with_lease(lock_key, encode(&lock)?, lease),
                    ]),
            )
            .await?;
        if resp.succeeded {
            return Ok(record);
        }
    }
    Err(Error::Unavailable(format!(
        "volume {name:?} lock contended too many times; try again"
    )))
}

/// Release a volume's writer lock if `holder` still holds it at `epoch`.
pub async fn release_lock(
    meta: &dyn MetadataStore,
    id: VolumeId,
    holder: PeerId,
    epoch: Epoch,
) -> Result<()> {
    if let Some((lock, kv)) = get_lock(meta, id).await? {
        if lock.holder == holder && lock.epoch == epoch {
            meta.txn(
                Txn::new()
                    .when([Compare::mod_revision(
                        kv.key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision,
                    )])
                    .and_then([TxnOp::delete(kv.key)]),
            )
            .await?;
        }
    }
    Ok(())
}
