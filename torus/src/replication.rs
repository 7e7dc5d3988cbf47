//! Replicated chunk I/O: the writer's side of the data path.
//!
//! A [`ReplicatedChunks`] serves one open volume. Each chunk's replicas come
//! from [`placement`](crate::placement) on the current ring; this node's own
//! replica is reached directly, the others through the [`PeerTransport`].
//!
//! - **Writes and zeros** go to every current replica of the chunk in
//!   parallel and succeed when all of them succeed. A replica that fails is
//!   recorded as *degraded* for that chunk in metadata **before** the write is
//!   acknowledged without it, so a lost copy is always known (and later
//!   rebuilt), never silently dropped. A degraded replica gets no further
//!   writes or reads of that chunk until it is rebuilt.
//! - **Flush** is a durability barrier: every peer that received writes since
//!   the last flush must make them durable; a peer that cannot is marked
//!   degraded for every chunk it received, and the flush fails if any chunk
//!   would be left without a durable copy.
//! - **Reads** prefer this node's replica, then the others in placement
//!   order, falling back on error.
//! - A `Fenced` answer from any replica means a newer writer exists: it is
//!   returned as is and never marks anything degraded.
//!
//! **Resync** ([`ReplicatedChunks::resync`], run periodically by the node
//! holding the volume): a degraded replica that answers again receives only
//! the chunks it is recorded degraded for, copied from a healthy replica,
//! then is made durable and its records deleted; a restart of one node
//! therefore costs a copy of what was written while it was away, not a full
//! copy. Zero runs are sent as zeroing (holes stay holes). Writes to a
//! chunk hold a shared lock on its stripe and a resync of the chunk holds it
//! exclusively, so no write can slip between the copy and the return of the
//! replica to the chunk's targets.

use crate::codec::{decode, encode};
use crate::placement;
use crate::rebalance::Placement;
use crate::replica::Replica;
use crate::volume::ChunkIo;
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use torus_traits::{
    ChunkRef, Epoch, Error, EventKind, MetadataStore, PeerId, PeerRequest, PeerResponse,
    PeerTransport, Result, Ring, Txn, TxnOp, VolumeId,
};

/// Prefix of degraded-replica records: `/torus/degraded/<volume>/<index>/<peer>`.
pub const DEGRADED: &str = "/torus/degraded/";

pub fn degraded_prefix(volume: VolumeId) -> String {
    format!("{DEGRADED}{:020}/", volume.0)
}

pub fn degraded_key(chunk: ChunkRef, peer: PeerId) -> String {
    format!(
        "{}{:020}/{peer}",
        degraded_prefix(chunk.volume),
        chunk.index
    )
}

/// Why and when a replica was marked degraded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DegradedRecord {
    pub epoch: Epoch,
    pub reason: String,
    pub since_unix_ms: u64,
}

/// Where peers are reached: `PeerId → transport address`, shared by a node.
#[derive(Default)]
pub struct PeerDirectory {
    addrs: RwLock<HashMap<PeerId, String>>,
}

impl PeerDirectory {
    pub fn set(&self, id: PeerId, addr: String) {
        self.addrs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, addr);
    }
    pub fn get(&self, id: PeerId) -> Option<String> {
        self.addrs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }
}

/// What a replicated volume needs from its node.
#[derive(Clone)]
pub struct ClusterLink {
    pub me: PeerId,
    pub local: Arc<Replica>,
    pub transport: Option<Arc<dyn PeerTransport>>,
    pub meta: Arc<dyn MetadataStore>,
    pub ring: Arc<RwLock<Arc<Ring>>>,
    pub directory: Arc<PeerDirectory>,
    /// Bytes this node copied to rebuild or move replicas (the heartbeat
    /// turns it into the REB/REP rate).
    pub copied: Arc<AtomicU64>,
}

impl ClusterLink {
    pub(crate) fn ring(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// [`call`](Self::call), failing with `Timeout` after `limit`.
    pub(crate) async fn call_within(
        &self,
        peer: PeerId,
        request: PeerRequest,
        limit: std::time::Duration,
    ) -> Result<PeerResponse> {
        match tokio::time::timeout(limit, self.call(peer, request)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(format!(
                "peer {peer} did not answer within {limit:?}"
            ))),
        }
    }

    pub(crate) fn count_copied(&self, bytes: u64) {
        self.copied.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Send one request to a peer (this node's own replica directly).
    pub async fn call(&self, peer: PeerId, request: PeerRequest) -> Result<PeerResponse> {
        if peer == self.me {
            use torus_traits::PeerHandler;
            return self.local.handle(request).await;
        }
        let transport = self.transport.as_ref().ok_or_else(|| {
            Error::Unavailable(format!(
                "peer {peer} is remote and this node has no transport"
            ))
        })?;
        let addr = self
            .directory
            .get(peer)
            .ok_or_else(|| Error::Unavailable(format!("no known address for peer {peer}")))?;
        transport.call(&addr, request).await
    }
}

/// Replicated chunk I/O for one open volume.
pub struct ReplicatedChunks {
    pub(crate) link: ClusterLink,
    pub(crate) volume: VolumeId,
    pub(crate) replication: u32,
    /// Which rings place which chunks (see [`rebalance`](crate::rebalance)).
    placement: RwLock<Placement>,
    /// Chunks written since a move started, while one runs.
    noted: Mutex<Option<BTreeSet<u64>>>,
    /// The epoch this volume is written at here (0: a reader), so a read
    /// finding a copy that fails its checksum can record it stale.
    writer_epoch: AtomicU64,
    /// Replicas known to be stale, per chunk index.
    degraded: Mutex<HashMap<u64, HashSet<PeerId>>>,
    /// Chunks each peer received since the last flush.
    dirty: Mutex<HashMap<PeerId, BTreeSet<u64>>>,
    /// One flush at a time: a flush that finds nothing pending must not
    /// return while an earlier one is still making remote replicas durable.
    flush_gate: tokio::sync::Mutex<()>,
    /// Chunk locks, striped by index: writes shared, resync exclusive.
    stripes: Vec<tokio::sync::RwLock<()>>,
    /// One resync or rebalancing pass at a time.
    pub(crate) resync_gate: tokio::sync::Mutex<()>,
    /// A reader's tasks following the writer's degraded and placement records.
    followers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for ReplicatedChunks {
    fn drop(&mut self) {
        for task in lock(&self.followers).drain(..) {
            task.abort();
        }
    }
}

/// `(chunk index, peer)` of a degraded-record key.
pub fn parse_degraded_key(key: &[u8]) -> Result<(u64, PeerId)> {
    let text = String::from_utf8_lossy(key);
    let mut parts = text.rsplit('/');
    let peer = parts.next().and_then(|p| p.parse::<PeerId>().ok());
    let index = parts.next().and_then(|i| i.parse::<u64>().ok());
    match (index, peer) {
        (Some(i), Some(p)) => Ok((i, p)),
        _ => Err(Error::Corrupt(format!("bad degraded-replica key {text}"))),
    }
}

async fn load_degraded(
    meta: &dyn MetadataStore,
    volume: VolumeId,
) -> Result<HashMap<u64, HashSet<PeerId>>> {
    let mut degraded: HashMap<u64, HashSet<PeerId>> = HashMap::new();
    for kv in meta.range(degraded_prefix(volume).as_bytes()).await? {
        let (index, peer) = parse_degraded_key(&kv.key)?;
        degraded.entry(index).or_default().insert(peer);
    }
    Ok(degraded)
}

/// What a reader follows of the writer's records.
#[derive(Clone, Copy)]
enum Followed {
    /// Stale-replica records: each change is applied as it comes.
    Degraded,
    /// The placement record: the writer moving chunks to a new ring is seen
    /// as it goes, so no read goes to an old copy after the move deleted it.
    Placement,
}

impl Followed {
    fn name(self) -> &'static str {
        match self {
            Followed::Degraded => "stale-replica records",
            Followed::Placement => "placement record",
        }
    }

    fn key(self, volume: VolumeId) -> Vec<u8> {
        match self {
            Followed::Degraded => degraded_prefix(volume).into_bytes(),
            Followed::Placement => crate::keys::placement(volume),
        }
    }

    /// Apply one change seen by the watch.
    async fn apply(self, io: &ReplicatedChunks, event: &torus_traits::WatchEvent) -> Result<()> {
        match self {
            Followed::Degraded => {
                io.apply_degraded(&event.kv.key, event.kind == EventKind::Put);
                Ok(())
            }
            Followed::Placement => self.reload(io).await,
        }
    }

    /// Load the records afresh (after the watch broke).
    async fn reload(self, io: &ReplicatedChunks) -> Result<()> {
        let meta = &*io.link.meta;
        match self {
            Followed::Degraded => *lock(&io.degraded) = load_degraded(meta, io.volume).await?,
            Followed::Placement => {
                io.set_placement(Placement::load(meta, io.volume, io.link.ring()).await?)
            }
        }
        Ok(())
    }
}

/// A reader's follower of the writer's records (`what`): applies each change
/// the watch brings; when the watch breaks, watches again and reloads. Ends
/// with the reader.
async fn follow(
    io: std::sync::Weak<ReplicatedChunks>,
    volume: VolumeId,
    what: Followed,
    mut watch: torus_traits::WatchStream,
) {
    use futures::StreamExt;
    loop {
        while let Some(event) = watch.next().await {
            let Some(io) = io.upgrade() else { return };
            let applied = match event {
                Ok(ev) => what.apply(&io, &ev).await,
                Err(e) => {
                    tracing::debug!(%volume, "watch of the {} broke: {e}", what.name());
                    break;
                }
            };
            if let Err(e) = applied {
                tracing::warn!(%volume, "applying a change of the {}: {e}", what.name());
            }
        }
        // Bounded by the reader's life: every pass first checks it is alive.
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let Some(io) = io.upgrade() else { return };
            let Ok(w) = io.link.meta.watch(&what.key(volume)).await else {
                continue;
            };
            match what.reload(&io).await {
                Ok(()) => {
                    watch = w;
                    break;
                }
                Err(e) => tracing::debug!(%volume, "reloading the {}: {e}", what.name()),
            }
        }
    }
}

/// The request that copies one piece read from a good replica: zeroing for
/// a run of zeros (holes stay holes), else the data; and the data bytes it
/// sends.
pub(crate) fn piece_request(
    chunk: ChunkRef,
    offset: u64,
    data: Bytes,
    epoch: Epoch,
) -> (u64, PeerRequest) {
    let len = data.len() as u64;
    if data.iter().all(|&b| b == 0) {
        let zero = PeerRequest::Zero {
            chunk,
            offset,
            len,
            epoch,
        };
        (0, zero)
    } else {
        let write = PeerRequest::Write {
            chunk,
            offset,
            data,
            epoch,
        };
        (len, write)
    }
}

/// Stripes of chunk locks per volume.
pub(crate) const STRIPES: u64 = 64;
/// Bytes copied per request during a resync.
pub(crate) const RESYNC_PIECE: u64 = 256 << 10;
/// How long a resync waits for a degraded peer to answer a ping.
const RESYNC_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What one resync pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncReport {
    /// Degraded (chunk, replica) pairs brought up to date and healthy again.
    pub repaired: u64,
    /// Bytes sent as data (zero runs are sent as zeroing, not counted).
    pub bytes: u64,
    /// Pairs left degraded (replica unreachable, no longer a replica, or a
    /// copy failed); a later pass retries.
    pub remaining: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `peer` is recorded degraded for chunk `index` in `degraded`
/// (the map of [`ReplicatedChunks`], read under its lock).
fn marked(degraded: &HashMap<u64, HashSet<PeerId>>, index: u64, peer: &PeerId) -> bool {
    degraded.get(&index).is_some_and(|b| b.contains(peer))
}

impl ReplicatedChunks {
    /// Open replicated I/O for `volume`, loading its degraded records.
    pub async fn open(link: ClusterLink, volume: VolumeId, replication: u32) -> Result<Self> {
        let degraded = load_degraded(&*link.meta, volume).await?;
        let placement = Placement::load(&*link.meta, volume, link.ring()).await?;
        Ok(ReplicatedChunks {
            link,
            volume,
            replication,
            placement: RwLock::new(placement),
            noted: Mutex::new(None),
            writer_epoch: AtomicU64::new(0),
            degraded: Mutex::new(degraded),
            dirty: Mutex::new(HashMap::new()),
            flush_gate: tokio::sync::Mutex::new(()),
            stripes: (0..STRIPES).map(|_| tokio::sync::RwLock::new(())).collect(),
            resync_gate: tokio::sync::Mutex::new(()),
            followers: Mutex::new(Vec::new()),
        })
    }

    /// Open replicated I/O for a reader that is not the volume's writer: its
    /// view of stale replicas follows the writer's records in metadata (a
    /// watch), so it never reads a replica recorded stale after it opened.
    pub async fn open_following(
        link: ClusterLink,
        volume: VolumeId,
        replication: u32,
    ) -> Result<Arc<Self>> {
        let meta = link.meta.clone();
        // Watch first, then load: no change between the two is missed.
        let watch = meta.watch(&Followed::Degraded.key(volume)).await?;
        let placement = meta.watch(&Followed::Placement.key(volume)).await?;
        let io = Arc::new(ReplicatedChunks::open(link, volume, replication).await?);
        let degraded = tokio::spawn(follow(
            Arc::downgrade(&io),
            volume,
            Followed::Degraded,
            watch,
        ));
        let moves = tokio::spawn(follow(
            Arc::downgrade(&io),
            volume,
            Followed::Placement,
            placement,
        ));
        lock(&io.followers).extend([degraded, moves]);
        Ok(io)
    }

    /// Apply one change of a degraded record seen in metadata.
    fn apply_degraded(&self, key: &[u8], present: bool) {
        let Ok((index, peer)) = parse_degraded_key(key) else {
            return;
        };
        if present {
            lock(&self.degraded).entry(index).or_default().insert(peer);
        } else {
            self.forget_degraded(index, peer);
        }
    }

    /// `peer` holds a current copy of chunk `index` again (in memory only).
    pub(crate) fn forget_degraded(&self, index: u64, peer: PeerId) {
        let mut degraded = lock(&self.degraded);
        let empty = degraded.get_mut(&index).is_some_and(|p| {
            p.remove(&peer);
            p.is_empty()
        });
        if empty {
            degraded.remove(&index);
        }
    }

    /// The lock of chunk `index` (shared by the chunks of its stripe).
    pub(crate) fn stripe(&self, index: u64) -> &tokio::sync::RwLock<()> {
        // In range: the modulus is the vector's length.
        &self.stripes[(index % STRIPES) as usize]
    }

    /// The (chunk index, peer) pairs recorded degraded.
    pub fn degraded(&self) -> Vec<(u64, PeerId)> {
        let mut v: Vec<(u64, PeerId)> = lock(&self.degraded)
            .iter()
            .flat_map(|(&i, peers)| peers.iter().map(move |&p| (i, p)))
            .collect();
        v.sort();
        v
    }

    /// Bring degraded replicas that answer again up to date (see the module
    /// docs). Stops at a `Fenced` answer (a newer writer exists).
    pub async fn resync(&self, epoch: Epoch) -> Result<ResyncReport> {
        let _one = self.resync_gate.lock().await;
        self.writer_epoch.fetch_max(epoch.0, Ordering::Relaxed);
        let mut report = ResyncReport::default();
        let mut alive: HashMap<PeerId, bool> = HashMap::new();
        for (index, peer) in self.degraded() {
            let chunk = ChunkRef::new(self.volume, index);
            if !self.placed(chunk).contains(&peer) {
                if self.incoming(chunk).contains(&peer) {
                    // A new owner of a chunk being moved: the move copies it.
                    report.remaining += 1;
                } else {
                    // Not a replica of this chunk any more (a flush or write
                    // to an old replica failed after the chunk moved): its
                    // copy is garbage, handed to the orphan cleanup.
                    self.disown(chunk, peer).await?;
                }
                continue;
            }
            let up = match alive.get(&peer) {
                Some(&up) => up,
                None => {
                    let ping = self.link.call(peer, PeerRequest::Ping);
                    let up = matches!(
                        tokio::time::timeout(RESYNC_PING_TIMEOUT, ping).await,
                        Ok(Ok(_))
                    );
                    alive.insert(peer, up);
                    up
                }
            };
            if !up {
                report.remaining += 1;
                continue;
            }
            match self.resync_chunk(chunk, peer, epoch).await {
                Ok(bytes) => {
                    report.repaired += 1;
                    report.bytes += bytes;
                    self.link.count_copied(bytes);
                }
                Err(e @ Error::Fenced(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(%chunk, %peer, "resync failed, will retry: {e}");
                    report.remaining += 1;
                    // Likely down again: skip its other chunks this pass.
                    alive.insert(peer, false);
                }
            }
        }
        if report.repaired > 0 {
            tracing::info!(volume = %self.volume, repaired = report.repaired, bytes = report.bytes, remaining = report.remaining, "resync pass");
        }
        Ok(report)
    }

    /// `peer`'s stale copy of `chunk` is no replica: record it as an orphan
    /// (deleted by the writer once the peer answers) and drop the stale
    /// record.
    pub(crate) async fn disown(&self, chunk: ChunkRef, peer: PeerId) -> Result<()> {
        let meta = &self.link.meta;
        meta.put(
            &crate::keys::orphan(self.volume, chunk.index, peer),
            b"{}",
            None,
        )
        .await?;
        meta.delete(degraded_key(chunk, peer).as_bytes()).await?;
        self.forget_degraded(chunk.index, peer);
        Ok(())
    }

    /// Copy one chunk to a degraded replica, make it durable, and mark the
    /// replica healthy again. Returns the data bytes sent.
    async fn resync_chunk(&self, chunk: ChunkRef, peer: PeerId, epoch: Epoch) -> Result<u64> {
        let _exclusive = self.stripe(chunk.index).write().await;
        let still = marked(&lock(&self.degraded), chunk.index, &peer);
        if !still {
            return Ok(0);
        }
        let chunk_size = self.link.local.store().chunk_size();
        let mut sent = 0;
        let mut offset = 0;
        // Bounded: advances by RESYNC_PIECE each pass.
        while offset < chunk_size {
            let len = RESYNC_PIECE.min(chunk_size - offset);
            let data = self.read(chunk, offset, len).await?;
            let (bytes, request) = piece_request(chunk, offset, data, epoch);
            sent += bytes;
            self.link.call(peer, request).await?;
            offset += len;
        }
        self.link
            .call(
                peer,
                PeerRequest::Flush {
                    volume: self.volume,
                    epoch,
                },
            )
            .await?;
        self.link
            .meta
            .delete(degraded_key(chunk, peer).as_bytes())
            .await?;
        self.forget_degraded(chunk.index, peer);
        Ok(sent)
    }

    /// The chunks of this volume that `peers` hold, asked all at once, and
    /// the peers that could not be asked.
    pub(crate) async fn list_held(
        &self,
        peers: impl IntoIterator<Item = PeerId>,
        limit: std::time::Duration,
    ) -> (BTreeSet<u64>, BTreeSet<PeerId>) {
        let list = PeerRequest::ListChunks {
            volume: self.volume,
        };
        let asks = peers.into_iter().map(|p| {
            let ask = self.link.call_within(p, list.clone(), limit);
            async move { (p, ask.await) }
        });
        let mut held = BTreeSet::new();
        let mut unasked = BTreeSet::new();
        for (p, r) in join_all(asks).await {
            match r {
                Ok(PeerResponse::Chunks(indices)) => held.extend(indices),
                other => {
                    tracing::info!(peer = %p, volume = %self.volume, "cannot list chunks: {other:?}");
                    unasked.insert(p);
                }
            }
        }
        (held, unasked)
    }

    /// The replicas placing `chunk` now, in placement order.
    pub(crate) fn placed(&self, chunk: ChunkRef) -> Vec<PeerId> {
        let placement = self.placement.read().unwrap_or_else(|e| e.into_inner());
        placement::replicas(placement.of(chunk.index).0, chunk, self.replication)
    }

    /// New owners of a chunk being moved that are not among its replicas:
    /// they receive its writes too, so the move never misses one.
    fn incoming(&self, chunk: ChunkRef) -> Vec<PeerId> {
        let placement = self.placement.read().unwrap_or_else(|e| e.into_inner());
        let (now, next) = placement.of(chunk.index);
        let Some(next) = next else { return Vec::new() };
        let old = placement::replicas(now, chunk, self.replication);
        placement::replicas(next, chunk, self.replication)
            .into_iter()
            .filter(|p| !old.contains(p))
            .collect()
    }

    pub(crate) fn placement(&self) -> Placement {
        self.placement
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_placement(&self, placement: Placement) {
        *self.placement.write().unwrap_or_else(|e| e.into_inner()) = placement;
    }

    /// Chunks below `cursor` have moved to the target ring.
    pub(crate) fn advance_cursor(&self, cursor: u64) {
        let mut placement = self.placement.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = &mut placement.target {
            *c = cursor;
        }
    }

    /// Every ring member that may hold this volume's chunks.
    pub fn members(&self) -> BTreeSet<PeerId> {
        self.placement
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .members()
    }

    pub(crate) fn start_noting_writes(&self) {
        lock(&self.noted).get_or_insert_with(BTreeSet::new);
    }

    pub(crate) fn noted_writes(&self) -> BTreeSet<u64> {
        lock(&self.noted).clone().unwrap_or_default()
    }

    pub(crate) fn stop_noting_writes(&self) -> BTreeSet<u64> {
        lock(&self.noted).take().unwrap_or_default()
    }

    /// Every chunk lock, exclusively: no write is choosing or using
    /// replicas while it is held.
    pub(crate) async fn barrier_guard(&self) -> Vec<tokio::sync::RwLockWriteGuard<'_, ()>> {
        let mut all = Vec::with_capacity(self.stripes.len());
        for s in &self.stripes {
            all.push(s.write().await);
        }
        all
    }

    /// Wait for every write in flight to finish.
    pub(crate) async fn barrier(&self) {
        drop(self.barrier_guard().await);
    }

    pub(crate) fn is_degraded(&self, index: u64, peer: PeerId) -> bool {
        marked(&lock(&self.degraded), index, &peer)
    }

    /// The healthy replicas of a chunk, in placement order.
    fn targets(&self, chunk: ChunkRef) -> Result<Vec<PeerId>> {
        let all = self.placed(chunk);
        if all.is_empty() {
            return Err(Error::Unavailable(
                "the ring has no members: add peers with `torusctl peer add`".into(),
            ));
        }
        let degraded = lock(&self.degraded);
        let healthy: Vec<PeerId> = all
            .into_iter()
            .filter(|p| !marked(&degraded, chunk.index, p))
            .collect();
        if healthy.is_empty() {
            return Err(Error::Unavailable(format!(
                "chunk {chunk} has no healthy replica left"
            )));
        }
        Ok(healthy)
    }

    /// Record `peer` as degraded for `chunks` in metadata, then in memory.
    pub(crate) async fn mark_degraded(
        &self,
        peer: PeerId,
        chunks: &[u64],
        epoch: Epoch,
        reason: &str,
    ) -> Result<()> {
        let record = DegradedRecord {
            epoch,
            reason: reason.to_string(),
            since_unix_ms: crate::catalog::now_ms(),
        };
        // In memory first: even if the record cannot be written, this writer
        // must stop treating the stale copy as current.
        {
            let mut degraded = lock(&self.degraded);
            for &i in chunks {
                degraded.entry(i).or_default().insert(peer);
            }
        }
        let value = encode(&record)?;
        // Bounded transactions: etcd limits the operations per transaction.
        for batch in chunks.chunks(64) {
            let ops = batch.iter().map(|&i| {
                TxnOp::put(
                    degraded_key(ChunkRef::new(self.volume, i), peer),
                    value.clone(),
                )
            });
            self.link.meta.txn(Txn::new().and_then(ops)).await?;
        }
        tracing::warn!(volume = %self.volume, %peer, chunks = chunks.len(), "replica marked degraded: {reason}");
        Ok(())
    }

    /// Send a mutation to every healthy replica; degrade the ones that fail.
    async fn replicate(&self, chunk: ChunkRef, epoch: Epoch, request: PeerRequest) -> Result<()> {
        // Held until the write is recorded (or its failures are): a resync
        // of this chunk must not run in between.
        let _shared = self.stripe(chunk.index).read().await;
        self.writer_epoch.fetch_max(epoch.0, Ordering::Relaxed);
        if let Some(noted) = lock(&self.noted).as_mut() {
            noted.insert(chunk.index);
        }
        let targets = self.targets(chunk)?;
        let placed = targets.len();
        let mut targets = targets;
        targets.extend(self.incoming(chunk));
        let results = join_all(targets.iter().map(|&p| self.link.call(p, request.clone()))).await;
        let mut failed = Vec::new();
        let mut failed_placed = 0;
        let mut first_err = None;
        let mut refused = None;
        // Look at every answer before returning, so each replica that took
        // the write is tracked for the next flush whatever else happened.
        for (n, (&peer, r)) in targets.iter().zip(results).enumerate() {
            match r {
                Ok(_) => {
                    lock(&self.dirty)
                        .entry(peer)
                        .or_default()
                        .insert(chunk.index);
                }
                // A newer writer exists, or the request itself is wrong
                // (every replica would say so): not the replica's fault.
                Err(e @ (Error::Fenced(_) | Error::InvalidArgument(_))) => {
                    refused.get_or_insert(e);
                }
                Err(e) => {
                    // A new owner that misses a write is recorded like a
                    // replica: the move may pass this chunk before copying it.
                    failed.push((peer, e.to_string()));
                    if n < placed {
                        failed_placed += 1;
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = refused {
            return Err(e);
        }
        if failed_placed == placed {
            return Err(
                first_err.unwrap_or_else(|| Error::Unavailable("no replica answered".into()))
            );
        }
        if !failed.is_empty() {
            // Decided under the lock other writes decide theirs under: some
            // replica this write reached must still be healthy once the ones
            // it missed are given up. Two concurrent writes that each miss a
            // different replica could otherwise each give up the only copy
            // of the other, leaving no replica with every acknowledged write.
            let mut degraded = lock(&self.degraded);
            let missed = |p: &PeerId| failed.iter().any(|(f, _)| f == p);
            let left = targets[..placed]
                .iter()
                .filter(|p| !missed(p))
                .filter(|p| !marked(&degraded, chunk.index, p))
                .count();
            if left == 0 {
                return Err(first_err.unwrap_or_else(|| {
                    Error::Unavailable(format!(
                        "chunk {chunk}: every replica the write reached was given up meanwhile"
                    ))
                }));
            }
            let bad = degraded.entry(chunk.index).or_default();
            bad.extend(failed.iter().map(|(p, _)| *p));
        }
        for (peer, why) in failed {
            self.mark_degraded(peer, &[chunk.index], epoch, &why)
                .await?;
        }
        Ok(())
    }

    /// Put chunks back as not yet flushed on `peer`.
    fn restore_dirty(&self, peer: PeerId, chunks: impl IntoIterator<Item = u64>) {
        lock(&self.dirty).entry(peer).or_default().extend(chunks);
    }

    /// Copies of `chunk` that failed their checksum while another copy
    /// served the read: as the writer, record them stale, so the resync
    /// rewrites the chunk from a good copy (a reader leaves that to the
    /// writer's scrub). The only good copy is never the one given up.
    async fn record_rotten(&self, chunk: ChunkRef, rotten: &[(PeerId, String)]) -> Result<()> {
        let epoch = self.writer_epoch.load(Ordering::Relaxed);
        if epoch == 0 {
            return Ok(());
        }
        for (peer, why) in rotten {
            let why = format!("checksum mismatch: {why}");
            self.mark_degraded(*peer, &[chunk.index], Epoch(epoch), &why)
                .await?;
        }
        Ok(())
    }

    /// The peers a write of `chunk` reached, for tests and status.
    pub fn healthy_replicas(&self, chunk: ChunkRef) -> Result<Vec<PeerId>> {
        self.targets(chunk)
    }
}

#[async_trait]
impl ChunkIo for ReplicatedChunks {
    async fn read(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<Bytes> {
        let mut targets = self.targets(chunk)?;
        if let Some(pos) = targets.iter().position(|&p| p == self.link.me) {
            targets[..=pos].rotate_right(1);
        }
        let mut last = None;
        let mut rotten = Vec::new();
        for peer in targets {
            match self
                .link
                .call(peer, PeerRequest::Read { chunk, offset, len })
                .await
            {
                Ok(PeerResponse::Data(d)) if d.len() as u64 == len => {
                    self.record_rotten(chunk, &rotten).await?;
                    return Ok(d);
                }
                Ok(other) => {
                    last = Some(Error::Corrupt(format!(
                        "peer {peer} answered a read with {other:?}"
                    )))
                }
                Err(e @ Error::InvalidArgument(_)) => return Err(e),
                Err(Error::Corrupt(why)) => {
                    tracing::warn!(%peer, %chunk, "copy fails its checksum, reading another: {why}");
                    rotten.push((peer, why.clone()));
                    last = Some(Error::Corrupt(why));
                }
                Err(e) => {
                    tracing::debug!(%peer, %chunk, "read failed, trying the next replica: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable(format!("no replica of {chunk}"))))
    }

    async fn write(&self, chunk: ChunkRef, offset: u64, data: Bytes, epoch: Epoch) -> Result<()> {
        self.replicate(
            chunk,
            epoch,
            PeerRequest::Write {
                chunk,
                offset,
                data,
                epoch,
            },
        )
        .await
    }

    async fn zero(&self, chunk: ChunkRef, offset: u64, len: u64, epoch: Epoch) -> Result<()> {
        self.replicate(
            chunk,
            epoch,
            PeerRequest::Zero {
                chunk,
                offset,
                len,
                epoch,
            },
        )
        .await
    }

    async fn resync(&self, epoch: Epoch) -> Result<ResyncReport> {
        ReplicatedChunks::resync(self, epoch).await
    }

    async fn rebalance(
        &self,
        epoch: Epoch,
        chunks: u64,
        budget: std::time::Duration,
        rate: u64,
    ) -> Result<crate::rebalance::RebalanceReport> {
        ReplicatedChunks::rebalance(self, epoch, chunks, budget, rate).await
    }

    async fn scrub(&self, epoch: Epoch, rate: u64) -> Result<crate::scrub::ScrubReport> {
        ReplicatedChunks::scrub(self, epoch, rate).await
    }

    async fn flush(&self, volume: VolumeId, epoch: Epoch) -> Result<()> {
        let _gate = self.flush_gate.lock().await;
        let pending: Vec<(PeerId, BTreeSet<u64>)> = lock(&self.dirty).drain().collect();
        if pending.is_empty() {
            // Nothing written since the last completed barrier; still make
            // this node's own earlier writes durable (cheap when clean).
            return self.link.local.flush(volume, epoch).await;
        }
        let results = join_all(
            pending
                .iter()
                .map(|(p, _)| self.link.call(*p, PeerRequest::Flush { volume, epoch })),
        )
        .await;
        let mut failed: Vec<(PeerId, &BTreeSet<u64>, Error)> = Vec::new();
        for ((peer, chunks), r) in pending.iter().zip(results) {
            if let Err(e) = r {
                failed.push((*peer, chunks, e));
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        if let Some((_, _, e)) = failed.iter().find(|f| matches!(f.2, Error::Fenced(_))) {
            // A newer writer exists: nothing of ours is durable by this
            // barrier's standard; keep it pending so no retry reports success.
            let e = e.clone();
            for (peer, chunks, _) in &failed {
                self.restore_dirty(*peer, chunks.iter().copied());
            }
            return Err(e);
        }
        // A replica that could not flush is given up for a chunk only when
        // another replica made that chunk durable; the last copy is never
        // written off — it stays pending and the flush fails, to be retried.
        let mut first_err = None;
        let failed_peers: HashSet<PeerId> = failed.iter().map(|f| f.0).collect();
        for (peer, chunks, e) in &failed {
            // Covered: held by another healthy replica that did not fail
            // this barrier, so it flushed everything it got (a healthy
            // replica received every write since it became healthy, and a
            // resync or move that made it healthy flushed the copy).
            //
            // Decided, and recorded in memory, under the lock that writes
            // and other barriers decide under: two barriers running at once
            // could otherwise each see the other's failed replica as the
            // healthy one and give up every copy between them. So a chunk is
            // covered only by a replica that is still healthy now (one that
            // flushed it here, or had nothing of it to flush).
            let (covered, uncovered): (Vec<u64>, Vec<u64>) = {
                let mut degraded = lock(&self.degraded);
                let (covered, uncovered): (Vec<u64>, Vec<u64>) = chunks.iter().partition(|&&i| {
                    self.placed(ChunkRef::new(volume, i))
                        .iter()
                        .any(|p| p != peer && !failed_peers.contains(p) && !marked(&degraded, i, p))
                });
                for &i in &covered {
                    degraded.entry(i).or_default().insert(*peer);
                }
                (covered, uncovered)
            };
            if !covered.is_empty() {
                if let Err(me) = self
                    .mark_degraded(*peer, &covered, epoch, &format!("flush failed: {e}"))
                    .await
                {
                    self.restore_dirty(*peer, covered);
                    first_err.get_or_insert(me);
                }
            }
            if !uncovered.is_empty() {
                let first = uncovered[0];
                self.restore_dirty(*peer, uncovered);
                first_err.get_or_insert(Error::Unavailable(format!(
                    "chunk {}/{first} has no durable copy yet: {e}",
                    volume.0
                )));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Decode a degraded record (for status and repair).
pub fn decode_degraded(key: &[u8], value: &[u8]) -> Result<DegradedRecord> {
    decode(key, value)
}
