//! Rebalancing: moving a volume's chunks to the owners a changed ring gives
//! them, whether a peer joined, was removed by an operator (drained), or was
//! taken out automatically after being down too long (re-replicated).
//!
//! # Placement state
//!
//! A volume's chunks are placed by the ring version recorded for it under
//! `placement/<id>` ([`PlacementRecord`]), not by whatever ring is current:
//! `settled` is the version every chunk is placed by; during a move, chunks
//! below `cursor` are placed by `target` instead. Ring versions still in use
//! are kept in the ring history (`rings/<version>`). A volume without a record
//! (created before records existed) is placed by the current ring, which is
//! where it was: the ring could not change while volumes existed before.
//!
//! # Moving one volume
//!
//! The volume's writer does it ([`ReplicatedChunks::rebalance`]): the node
//! that has it open, or else a node's rebalancer that takes the volume's lock
//! for a few seconds at a time (an open elsewhere waits for it to let go).
//! Only the writer can move chunks safely, because it holds the chunk locks
//! that keep a copy and a write from interleaving.
//!
//! 1. Start: record `target` = the current ring version and `cursor` 0. From
//!    then on, writes to chunks not yet moved go to their old replicas *and*
//!    to their new owners, and every chunk written is noted; a barrier over
//!    every chunk lock lets writes started before the move drain first.
//! 2. Find the chunks that exist: `ListChunks` on every member of both rings,
//!    plus the chunks written since the start. A member that cannot be listed
//!    makes every chunk it could hold "maybe existing" (copied, never skipped).
//! 3. Take the existing chunks in index order, eight at a time, under their
//!    locks: copy each from a current old replica to each new owner (256 KiB
//!    pieces, all in flight at once, zero runs as zeroing), make the copies
//!    durable, then advance and record `cursor` past the batch; the next
//!    batch is copied while one is made durable and recorded, so the copy
//!    keeps going during the flushes. A new owner that cannot be reached is
//!    recorded degraded for the chunk (the resync brings it up to date
//!    later); a chunk whose old replicas all fail to read stops the move, to
//!    be retried: the cursor never passes a chunk that has no copy under the
//!    new ring. Chunks that exist nowhere are skipped: every write to them
//!    since the start also reached their new owners.
//! 4. Finish: record `settled` = target. Then, after a short grace so readers
//!    following the record see it, delete the old copies that the new ring no
//!    longer places (old copies are deleted only after the new ones are
//!    durable), and the degraded records of replicas no longer placed. A copy
//!    on a peer that is down is recorded as an orphan
//!    (`orphans/<volume>/<index>/<peer>`) and deleted by a later pass of the
//!    volume's writer once the peer answers, unless a move made the peer an
//!    owner of that chunk again meanwhile. Only the writer deletes, and it
//!    moves chunks one pass at a time, so a delete can never race a copy.
//!
//! Every record update is a transaction that checks the volume's epoch is
//! still this writer's, so a writer that lost its lock cannot move the
//! cursor under its successor. The copy is rate-limited, and runs in bounded
//! slices so foreground I/O (which only waits for the one chunk being copied)
//! keeps going. If the ring changes again during a move, the move finishes
//! to its target first and then starts again to the newest ring.

use crate::catalog;
use crate::cluster;
use crate::codec::{decode, encode};
use crate::keys;
use crate::placement;
use crate::replication::{degraded_key, piece_request, ReplicatedChunks, RESYNC_PIECE};
use crate::volume::ChunkIo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_traits::{
    ChunkRef, Compare, CompareOp, Epoch, Error, MetadataStore, PeerId, PeerRequest, Result, Ring,
    Txn, TxnOp, VolumeId,
};

/// Where a volume's chunks are placed, as recorded in metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    /// Ring version placing every chunk at or past `cursor`.
    pub settled: u64,
    /// Ring version the volume is moving to; it places chunks below `cursor`.
    pub target: Option<u64>,
    pub cursor: u64,
}

impl PlacementRecord {
    /// Every chunk placed by ring `version`.
    pub fn settled(version: u64) -> Self {
        PlacementRecord {
            settled: version,
            target: None,
            cursor: 0,
        }
    }

    /// Whether every chunk is placed by ring `version` (or a later one a
    /// lagging view of the ring has not seen yet).
    pub fn balanced_at(&self, version: u64) -> bool {
        self.target.is_none() && self.settled >= version
    }
}

/// The placement record of a volume, if it has one.
pub async fn load_record(
    meta: &dyn MetadataStore,
    volume: VolumeId,
) -> Result<Option<PlacementRecord>> {
    match meta.get(&keys::placement(volume)).await? {
        Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
        None => Ok(None),
    }
}

/// The rings a volume's chunks are placed by, in memory.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub settled: Arc<Ring>,
    /// The ring being moved to, and the first chunk not moved yet.
    pub target: Option<(Arc<Ring>, u64)>,
}

impl Placement {
    pub fn current(ring: Arc<Ring>) -> Self {
        Placement {
            settled: ring,
            target: None,
        }
    }

    /// The ring placing chunk `index`, and the ring it is moving to (whose
    /// new owners also receive its writes) if it has not moved yet.
    pub fn of(&self, index: u64) -> (&Ring, Option<&Ring>) {
        match &self.target {
            Some((target, cursor)) if index < *cursor => (target, None),
            Some((target, _)) => (&self.settled, Some(target)),
            None => (&self.settled, None),
        }
    }

    /// Every member of every ring in use.
    pub fn members(&self) -> BTreeSet<PeerId> {
        let mut all: BTreeSet<PeerId> = self.settled.members.iter().map(|m| m.id).collect();
        if let Some((t, _)) = &self.target {
            all.extend(t.members.iter().map(|m| m.id));
        }
        all
    }

    /// Load a volume's placement; without a record it is `current`.
    pub async fn load(
        meta: &dyn MetadataStore,
        volume: VolumeId,
        current: Arc<Ring>,
    ) -> Result<Placement> {
        let Some(record) = load_record(meta, volume).await? else {
            return Ok(Placement::current(current));
        };
        let ring = |v: u64| {
            let current = current.clone();
            async move {
                if v == current.version {
                    Ok(current)
                } else {
                    cluster::ring_at(meta, v).await.map(Arc::new)
                }
            }
        };
        let settled = ring(record.settled).await?;
        let target = match record.target {
            Some(v) => Some((ring(v).await?, record.cursor)),
            None => None,
        };
        Ok(Placement { settled, target })
    }
}

/// What one rebalancing slice did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebalanceReport {
    /// Every chunk is placed by the ring the slice saw as current.
    pub done: bool,
    /// Chunks moved (copied to at least one new owner).
    pub chunks: u64,
    /// Bytes of data sent to new owners (zero runs not counted).
    pub bytes: u64,
}

/// What copying one chunk did.
#[derive(Default)]
struct Copied {
    /// Data bytes sent (zero runs not counted).
    bytes: u64,
    /// New owners that took every piece.
    done: Vec<PeerId>,
    /// New owners that did not, and why.
    failed: Vec<(PeerId, String)>,
}

/// A batch copied to its new owners, its chunks still locked, waiting for
/// `commit_batch`.
struct CopiedBatch<'a> {
    batch: Vec<u64>,
    _locks: Vec<tokio::sync::RwLockWriteGuard<'a, ()>>,
    /// (chunk, new owner) pairs that took every piece.
    copied: Vec<(u64, PeerId)>,
    failed: Vec<(u64, PeerId, String)>,
    chunks: u64,
    sent: u64,
}

/// A batch being committed.
type Commit<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;

/// Chunks copied at once (each up to a chunk's size in memory).
const MOVE_BATCH: u64 = 8;

/// How long a new owner may take to answer one copy request.
const COPY_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait between recording a finished move and deleting old copies, so
/// readers following the record stop reading them first.
const DELETE_GRACE: Duration = Duration::from_millis(500);

impl ReplicatedChunks {
    /// Move this volume towards the current ring for at most `budget`,
    /// copying at most `rate` bytes per second (0: unlimited). `chunks` is
    /// the volume's chunk count. See the module docs.
    pub async fn rebalance(
        &self,
        epoch: Epoch,
        chunks: u64,
        budget: Duration,
        rate: u64,
    ) -> Result<RebalanceReport> {
        let _one = self.resync_gate.lock().await;
        let started = Instant::now();
        let mut report = RebalanceReport::default();
        let current = self.link.ring();
        let placement = self.placement();
        let (settled, target, mut cursor) = match placement.target {
            Some((t, c)) => (placement.settled, t, c),
            // Nothing newer (this node's view of the ring may also lag the
            // version the volume was placed by: never move backwards).
            None if placement.settled.version >= current.version => {
                self.delete_orphans(epoch).await?;
                report.done = true;
                return Ok(report);
            }
            None => {
                let record = PlacementRecord {
                    settled: placement.settled.version,
                    target: Some(current.version),
                    cursor: 0,
                };
                self.start_noting_writes();
                self.save_placement(&record, epoch).await?;
                self.set_placement(Placement {
                    settled: placement.settled.clone(),
                    target: Some((current.clone(), 0)),
                });
                tracing::info!(volume = %self.volume, from = record.settled, to = current.version, "rebalancing started");
                (placement.settled, current.clone(), 0)
            }
        };
        self.start_noting_writes();
        // Writes that chose their replicas before the move started drain
        // before anything is listed.
        self.barrier().await;
        let (existing, maybe_everywhere) = self.existing_chunks(&settled, &target).await;
        // The batch copied last, being made durable and recorded while the
        // next one is copied (see `copy_batch`).
        let mut committing: Option<Commit<'_>> = None;
        while cursor < chunks {
            if started.elapsed() >= budget {
                if let Some(c) = committing.take() {
                    c.await?;
                }
                return Ok(report);
            }
            let noted = self.noted_writes();
            let batch: Vec<u64> = if maybe_everywhere {
                (cursor..chunks.min(cursor + MOVE_BATCH)).collect()
            } else {
                let mut next: BTreeSet<u64> = existing
                    .range(cursor..)
                    .take(MOVE_BATCH as usize)
                    .copied()
                    .collect();
                next.extend(noted.range(cursor..).take(MOVE_BATCH as usize));
                next.into_iter()
                    .filter(|&i| i < chunks)
                    .take(MOVE_BATCH as usize)
                    .collect()
            };
            let Some(&last) = batch.last() else {
                break;
            };
            let copy = self.copy_batch(batch, &settled, &target, epoch);
            let copied = match committing.take() {
                Some(previous) => {
                    let (copied, committed) = tokio::join!(copy, previous);
                    committed?;
                    copied?
                }
                None => copy.await?,
            };
            report.chunks += copied.chunks;
            report.bytes += copied.sent;
            self.link.count_copied(copied.sent);
            committing = Some(Box::pin(
                self.commit_batch(copied, &settled, &target, epoch),
            ));
            cursor = last + 1;
            if rate > 0 {
                // Pace to `rate` over the slice so far.
                let due = Duration::from_secs_f64(report.bytes as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait.min(budget)).await;
                }
            }
        }
        if let Some(c) = committing.take() {
            c.await?;
        }
        self.finish(&settled, &target, &existing, epoch).await?;
        report.done = target.version >= self.link.ring().version;
        Ok(report)
    }

    /// Record the move finished, then delete what the new ring no longer
    /// places: old copies and their degraded records.
    async fn finish(
        &self,
        settled: &Ring,
        target: &Arc<Ring>,
        existing: &BTreeSet<u64>,
        epoch: Epoch,
    ) -> Result<()> {
        let mut touched = existing.clone();
        touched.extend(self.noted_writes());
        // Old copies the new ring does not place are recorded first, so a
        // crash after the record below cannot leave them unknown; until the
        // record below, a listed copy is still placed and never deleted.
        let mut old_copies = Vec::new();
        for &index in &touched {
            let chunk = ChunkRef::new(self.volume, index);
            let new = placement::replicas(target, chunk, self.replication);
            for old in placement::replicas(settled, chunk, self.replication) {
                if !new.contains(&old) {
                    old_copies.push(TxnOp::put(keys::orphan(self.volume, index, old), "{}"));
                }
            }
        }
        // Bounded transactions: etcd limits the operations per transaction.
        for batch in old_copies.chunks(64) {
            self.link
                .meta
                .txn(Txn::new().and_then(batch.iter().cloned()))
                .await?;
        }
        {
            // No write may choose replicas while the placement changes.
            let _all = self.barrier_guard().await;
            self.save_placement(&PlacementRecord::settled(target.version), epoch)
                .await?;
            self.set_placement(Placement::current(target.clone()));
            self.stop_noting_writes();
        }
        tracing::info!(volume = %self.volume, version = target.version, "rebalancing finished");
        tokio::time::sleep(DELETE_GRACE).await;
        self.delete_orphans(epoch).await?;
        let stale = self.degraded();
        for (index, peer) in stale {
            let chunk = ChunkRef::new(self.volume, index);
            if !placement::replicas(target, chunk, self.replication).contains(&peer) {
                self.disown(chunk, peer).await?;
            }
        }
        Ok(())
    }

    async fn delete_copy(&self, chunk: ChunkRef, peer: PeerId, epoch: Epoch) -> Result<()> {
        let delete = PeerRequest::DeleteChunk { chunk, epoch };
        self.link.call_within(peer, delete, COPY_TIMEOUT).await?;
        Ok(())
    }

    /// Delete the orphaned copies of this volume on live peers.
    async fn delete_orphans(&self, epoch: Epoch) -> Result<()> {
        let meta = &*self.link.meta;
        let records = meta.range(keys::orphans_of(self.volume).as_bytes()).await?;
        if records.is_empty() {
            return Ok(());
        }
        let alive = crate::peers::alive(meta).await?;
        for kv in records {
            let (index, peer) = crate::replication::parse_degraded_key(&kv.key)?;
            if !alive.contains(&peer) {
                continue;
            }
            let chunk = ChunkRef::new(self.volume, index);
            let _exclusive = self.stripe(index).write().await;
            // Owner again (a later move copied the chunk there): keep it.
            if !self.placed(chunk).contains(&peer) {
                match self.delete_copy(chunk, peer, epoch).await {
                    Ok(()) => {}
                    Err(e @ Error::Fenced(_)) => return Err(e),
                    Err(e) => {
                        tracing::debug!(%chunk, %peer, "orphaned copy not deleted yet: {e}");
                        continue;
                    }
                }
            }
            meta.delete(&kv.key).await?;
        }
        Ok(())
    }

    /// Copy a batch of chunks to their new owners under the chunks' locks,
    /// which the returned batch keeps until `commit_batch` has made the
    /// copies durable: a write in between could fail on a new owner and be
    /// recorded stale, a record the commit would then wrongly clear. The
    /// next batch is copied while this one commits, so the copying does not
    /// wait for the disks' flushes and the metadata records.
    async fn copy_batch(
        &self,
        batch: Vec<u64>,
        settled: &Ring,
        target: &Ring,
        epoch: Epoch,
    ) -> Result<CopiedBatch<'_>> {
        // Each stripe once, in order (two chunks of a batch may share one).
        // A batch still committing may hold some of them: only it can be,
        // and it waits for no lock, so this waits at most for its commit.
        let stripes: BTreeSet<u64> = batch
            .iter()
            .map(|i| i % crate::replication::STRIPES)
            .collect();
        let mut locks = Vec::with_capacity(stripes.len());
        for s in stripes {
            locks.push(self.stripe(s).write().await);
        }
        let copies = futures::future::join_all(
            batch
                .iter()
                .map(|&index| self.copy_chunk(index, settled, target, epoch)),
        )
        .await;
        let mut out = CopiedBatch {
            batch,
            _locks: locks,
            copied: Vec::new(),
            failed: Vec::new(),
            chunks: 0,
            sent: 0,
        };
        for (&index, c) in out.batch.iter().zip(copies) {
            let c = c?;
            if c.bytes > 0 || !c.done.is_empty() {
                out.chunks += 1;
            }
            out.sent += c.bytes;
            out.copied.extend(c.done.iter().map(|&p| (index, p)));
            out.failed
                .extend(c.failed.into_iter().map(|(p, why)| (index, p, why)));
        }
        Ok(out)
    }

    /// Make a copied batch durable on its new owners, settle their degraded
    /// records, then advance and record the cursor past it.
    async fn commit_batch(
        &self,
        copied: CopiedBatch<'_>,
        settled: &Ring,
        target: &Ring,
        epoch: Epoch,
    ) -> Result<()> {
        let CopiedBatch {
            batch,
            _locks,
            copied,
            mut failed,
            ..
        } = copied;
        let reached: BTreeSet<PeerId> = copied.iter().map(|&(_, p)| p).collect();
        let reached: Vec<PeerId> = reached.into_iter().collect();
        let flushes = futures::future::join_all(reached.iter().map(|&p| {
            let flush = PeerRequest::Flush {
                volume: self.volume,
                epoch,
            };
            self.link.call_within(p, flush, COPY_TIMEOUT)
        }))
        .await;
        let mut unflushed: BTreeSet<PeerId> = BTreeSet::new();
        for (&p, r) in reached.iter().zip(flushes) {
            match r {
                Ok(_) => {}
                Err(e @ Error::Fenced(_)) => return Err(e),
                Err(e) => {
                    unflushed.insert(p);
                    tracing::info!(peer = %p, "rebalancing flush failed: {e}");
                }
            }
        }
        for (index, p) in copied {
            if unflushed.contains(&p) {
                failed.push((index, p, "flush failed".into()));
            } else if self.is_degraded(index, p) {
                // A write during the move that missed it recorded it stale.
                let chunk = ChunkRef::new(self.volume, index);
                self.link
                    .meta
                    .delete(degraded_key(chunk, p).as_bytes())
                    .await?;
                self.forget_degraded(index, p);
            }
        }
        // Each chunk must keep a current copy under the new ring.
        for &index in &batch {
            let chunk = ChunkRef::new(self.volume, index);
            let left = placement::replicas(target, chunk, self.replication)
                .iter()
                .filter(|p| {
                    !failed.iter().any(|(i, f, _)| *i == index && f == *p)
                        && !self.is_degraded(index, **p)
                })
                .count();
            if left == 0 {
                return Err(Error::Unavailable(format!(
                    "chunk {chunk}: no new owner could take a copy; the move will be retried"
                )));
            }
        }
        for (index, peer, why) in failed {
            self.mark_degraded(peer, &[index], epoch, &format!("rebalancing: {why}"))
                .await?;
        }
        let last = batch.last().copied().unwrap_or(0);
        let record = PlacementRecord {
            settled: settled.version,
            target: Some(target.version),
            cursor: last + 1,
        };
        self.save_placement(&record, epoch).await?;
        self.advance_cursor(last + 1);
        Ok(())
    }

    /// Copy one chunk (its lock held by the caller) from its old replicas
    /// to the owners `target` adds, its pieces all in flight at once.
    async fn copy_chunk(
        &self,
        index: u64,
        settled: &Ring,
        target: &Ring,
        epoch: Epoch,
    ) -> Result<Copied> {
        let chunk = ChunkRef::new(self.volume, index);
        let old = placement::replicas(settled, chunk, self.replication);
        let dests: Vec<PeerId> = placement::replicas(target, chunk, self.replication)
            .into_iter()
            .filter(|p| !old.contains(p))
            .collect();
        let mut out = Copied::default();
        if dests.is_empty() {
            return Ok(out);
        }
        let chunk_size = self.link.local.store().chunk_size();
        let pieces: Vec<(u64, u64)> = (0..chunk_size.div_ceil(RESYNC_PIECE))
            .map(|n| {
                let offset = n * RESYNC_PIECE;
                (offset, RESYNC_PIECE.min(chunk_size - offset))
            })
            .collect();
        // Reads go to the old replicas: the chunk has not moved yet.
        let data = futures::future::join_all(
            pieces
                .iter()
                .map(|&(offset, len)| self.read(chunk, offset, len)),
        )
        .await;
        let mut requests = Vec::with_capacity(pieces.len());
        for (&(offset, _), d) in pieces.iter().zip(data) {
            requests.push(piece_request(chunk, offset, d?, epoch));
        }
        for p in dests {
            let sends = futures::future::join_all(
                requests
                    .iter()
                    .map(|(_, r)| self.link.call_within(p, r.clone(), COPY_TIMEOUT)),
            )
            .await;
            let mut why = None;
            for r in sends {
                match r {
                    Ok(_) => {}
                    Err(e @ Error::Fenced(_)) => return Err(e),
                    Err(e) => {
                        why.get_or_insert(e.to_string());
                    }
                }
            }
            match why {
                None => {
                    out.bytes += requests.iter().map(|(n, _)| n).sum::<u64>();
                    out.done.push(p);
                }
                Some(why) => out.failed.push((p, why)),
            }
        }
        Ok(out)
    }

    /// Indices of the chunks of this volume held by any member of either
    /// ring; `true` when some member of the old ring could not be asked.
    async fn existing_chunks(&self, settled: &Ring, target: &Ring) -> (BTreeSet<u64>, bool) {
        let mut members: BTreeSet<PeerId> = settled.members.iter().map(|m| m.id).collect();
        members.extend(target.members.iter().map(|m| m.id));
        let (existing, unasked) = self.list_held(members, COPY_TIMEOUT).await;
        // Only a member of the old ring can hold chunks nobody else lists:
        // then every chunk is treated as existing.
        let unknown = unasked.iter().any(|&p| settled.contains(p));
        (existing, unknown)
    }

    /// Record a placement, if this writer still holds the volume at `epoch`.
    async fn save_placement(&self, record: &PlacementRecord, epoch: Epoch) -> Result<()> {
        let meta = &*self.link.meta;
        let fenced = || {
            Error::Fenced(format!(
                "volume {} has a newer writer: placement not recorded",
                self.volume
            ))
        };
        let (volume, rev) = catalog::get_by_id(meta, self.volume)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {} was deleted", self.volume)))?;
        if volume.epoch != epoch {
            return Err(fenced());
        }
        let resp = meta
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(
                        keys::volume_by_id(self.volume),
                        CompareOp::Equal,
                        rev,
                    )])
                    .and_then([TxnOp::put(keys::placement(self.volume), encode(record)?)]),
            )
            .await?;
        if !resp.succeeded {
            return Err(fenced());
        }
        Ok(())
    }
}

/// Delete ring versions no volume is placed by any more.
pub async fn prune_ring_history(meta: &dyn MetadataStore) -> Result<()> {
    let (current, _) = cluster::ring(meta).await?;
    // A margin of recent versions: a move may record its target just after
    // this reads the records.
    let mut oldest = current.version.saturating_sub(16);
    for kv in meta.range(keys::PLACEMENT.as_bytes()).await? {
        let record: PlacementRecord = decode(&kv.key, &kv.value)?;
        oldest = oldest.min(record.settled);
        if let Some(t) = record.target {
            oldest = oldest.min(t);
        }
    }
    cluster::prune_rings(meta, oldest).await
}

/// Volumes with orphaned copies on live peers, and how many.
pub async fn live_orphans(
    meta: &dyn MetadataStore,
) -> Result<std::collections::HashMap<VolumeId, u64>> {
    let alive = crate::peers::alive(meta).await?;
    let mut out = std::collections::HashMap::new();
    for kv in meta.range(keys::ORPHANS.as_bytes()).await? {
        let Some(volume) = keys::volume_id_after(keys::ORPHANS, &kv.key) else {
            continue;
        };
        let (_, peer) = crate::replication::parse_degraded_key(&kv.key)?;
        if alive.contains(&peer) {
            *out.entry(volume).or_default() += 1;
        }
    }
    Ok(out)
}
