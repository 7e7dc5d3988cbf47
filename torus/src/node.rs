//! A running node: the engine assembled from trait objects.
//!
//! [`Node::start`] takes already-built parts (metadata store, block store) so
//! tests compose nodes from in-memory parts exactly as `torusd` composes them
//! from a [`Config`](crate::config::Config) in [`compose`](crate::compose).
//!
//! The node keeps a lease in metadata (its liveness), registers itself in the
//! peer registry and refreshes it with a heartbeat, serves volumes to
//! frontends as a [`VolumeProvider`] (one writer lock per volume, shared by
//! every handle on this node), and frees the chunks of deleted volumes.
//!
//! It also heals the cluster: the writer of each open volume resyncs stale
//! replicas and moves chunks after a ring change; a rebalancer moves the
//! chunks of volumes nobody has open (taking their lock a few seconds at a
//! time); and the live ring member with the smallest id takes members that
//! stayed down longer than `down_out_interval` out of the ring, which makes
//! their chunks re-replicate (see [`rebalance`](crate::rebalance)).

use crate::catalog::{self, VolumeRecord};
use crate::cluster::{self, ClusterRecord};
use crate::peers;
use crate::replica::Replica;
use crate::replication::{ClusterLink, PeerDirectory, ReplicatedChunks};
use crate::volume::{ChunkIo, Volume};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;
use tokio::task::JoinHandle;
use torus_traits::{
    BlockDevice, BlockStore, Error, EventKind, ExportInfo, LeaseId, MetadataStore, PeerHandler,
    PeerId, PeerInfo, PeerListener, PeerTransport, Result, VolumeProvider, WatchStream,
};

/// What a node needs besides its storage parts.
#[derive(Clone)]
pub struct NodeOptions {
    pub id: PeerId,
    /// Address shown to operators (replaced by the peer listener's address
    /// when the node listens for peers).
    pub address: String,
    /// How this node reaches other peers; `None` for a node that only ever
    /// holds every replica itself (a ring of one).
    pub transport: Option<Arc<dyn PeerTransport>>,
    /// Where to listen for peers (`IP:PORT`, port 0 picks one).
    pub peer_listen: Option<String>,
    /// Address other peers should use, when it differs from the listener's
    /// (NAT, 0.0.0.0 listens).
    pub peer_advertise: Option<String>,
    /// Time to live of the node's lease (its liveness and its volume locks).
    pub lease_ttl: Duration,
    /// Join the ring on start.
    pub auto_join: bool,
    pub healing: Healing,
}

/// Self-healing settings of a node.
#[derive(Clone, Debug)]
pub struct Healing {
    /// Take a ring member that stays down this long out of the ring, so its
    /// chunks are re-replicated (`None`: never).
    pub down_out_interval: Option<Duration>,
    /// Most bytes per second copied to move chunks (0: unlimited).
    pub rebalance_rate: u64,
    /// Scrub each open volume this often (`None`: only when asked).
    pub scrub_interval: Option<Duration>,
    /// Most bytes per second a scheduled scrub scans (0: unlimited).
    pub scrub_rate: u64,
}

impl Default for Healing {
    fn default() -> Self {
        Healing {
            down_out_interval: Some(Duration::from_secs(300)),
            rebalance_rate: 512 << 20,
            scrub_interval: Some(Duration::from_secs(7 * 24 * 3600)),
            scrub_rate: 64 << 20,
        }
    }
}

/// How long a rebalancer or writer moves chunks before looking around again
/// (an open waiting for a rebalancer's lock waits about this long).
const REBALANCE_SLICE: Duration = Duration::from_secs(2);
/// The rebalancer's pause between slices of a move still under way.
const REBALANCE_GAP: Duration = Duration::from_millis(250);

struct Inner {
    opts: NodeOptions,
    /// Advertised address; set once the frontends know their real ports.
    address: Mutex<String>,
    meta: Arc<dyn MetadataStore>,
    replica: Arc<Replica>,
    link: ClusterLink,
    listener: Mutex<Option<Box<dyn PeerListener>>>,
    cluster: ClusterRecord,
    lease: Mutex<LeaseId>,
    /// Writable volumes open on this node, shared by all their handles.
    open: Mutex<HashMap<String, Weak<OpenVolume>>>,
    /// Serialises writable opens so two local opens of one volume share one
    /// lock and epoch instead of racing for it.
    open_gate: tokio::sync::Mutex<()>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Copied bytes at the last rate sample, when, and the rate then.
    copy_rate: Mutex<(u64, std::time::Instant, u64)>,
    /// Wakes the movers (volume writers, the rebalancer) on a ring change.
    ring_changed: Arc<tokio::sync::Notify>,
}

/// A started node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// The writer's shared state of a volume; the last handle dropped releases
/// the lock.
struct OpenVolume {
    volume: Volume,
    node: Weak<Inner>,
}

impl Drop for OpenVolume {
    fn drop(&mut self) {
        let Some(inner) = self.node.upgrade() else {
            return;
        };
        let record = self.volume.record().clone();
        let io = self.volume.io();
        // Drop cannot await: flush and release in the background. A new open
        // racing with this is safe: it takes the lock over (same holder) and
        // the release below only deletes a lock at this handle's epoch.
        let fut = async move {
            if let Err(e) = io.flush(record.id, record.epoch).await {
                tracing::warn!(volume = %record.name, "flush on close failed: {e}");
            }
            let id = inner.opts.id;
            if let Err(e) = catalog::release_lock(&*inner.meta, record.id, id, record.epoch).await {
                tracing::warn!(volume = %record.name, "releasing the lock failed: {e}");
            }
            tracing::info!(volume = %record.name, epoch = record.epoch.0, "volume closed");
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(fut);
        }
    }
}

/// A handle given to a frontend: delegates to the shared open volume.
struct Handle(Arc<OpenVolume>);

#[async_trait]
impl BlockDevice for Handle {
    fn size(&self) -> u64 {
        self.0.volume.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn multi_conn_safe(&self) -> bool {
        self.0.volume.multi_conn_safe()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.0.volume.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.0.volume.write(offset, data, fua).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.0.volume.write_zeroes(offset, len, may_trim, fua).await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.0.volume.trim(offset, len, fua).await
    }
    async fn flush(&self) -> Result<()> {
        self.0.volume.flush().await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Node {
    /// Start a node on an initialised cluster: take a lease, register, join
    /// the ring if asked, free chunks of deleted volumes, start the heartbeat.
    pub async fn start(
        opts: NodeOptions,
        meta: Arc<dyn MetadataStore>,
        store: Arc<dyn BlockStore>,
        cluster: ClusterRecord,
    ) -> Result<Node> {
        if store.chunk_size() != cluster.chunk_size {
            return Err(Error::InvalidArgument(format!(
                "block store chunk size {} differs from the cluster's {}",
                store.chunk_size(),
                cluster.chunk_size
            )));
        }
        let lease = meta.grant(opts.lease_ttl).await?;
        let replica = Arc::new(Replica::with_metadata(store, meta.clone()));
        let (ring, _) = cluster::ring(&*meta).await?;
        let link = ClusterLink {
            me: opts.id,
            local: replica.clone(),
            transport: opts.transport.clone(),
            meta: meta.clone(),
            ring: Arc::new(RwLock::new(Arc::new(ring))),
            directory: Arc::new(PeerDirectory::default()),
            copied: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        };
        // Listen for peers before registering, so the advertised address works.
        let mut address = opts.address.clone();
        let mut listener = None;
        if let (Some(t), Some(at)) = (&opts.transport, &opts.peer_listen) {
            let handler: Arc<dyn PeerHandler> = replica.clone();
            let l = t
                .listen(at, handler)
                .await
                .map_err(|e| Error::Other(format!("cannot listen for peers on {at}: {e}")))?;
            address = opts
                .peer_advertise
                .clone()
                .unwrap_or_else(|| l.local_addr());
            listener = Some(l);
        }
        link.directory.set(opts.id, address.clone());
        // Only nodes that talk to peers can be confused with one another.
        if opts.transport.is_some() {
            let record = peer_record(&replica, &opts, address.clone(), 0).await?;
            peers::claim_id(&*meta, &record, lease, opts.lease_ttl).await?;
        }
        let node = Node {
            inner: Arc::new(Inner {
                replica,
                link,
                listener: Mutex::new(listener),
                address: Mutex::new(address),
                opts,
                meta,
                cluster,
                lease: Mutex::new(lease),
                open: Mutex::new(HashMap::new()),
                open_gate: tokio::sync::Mutex::new(()),
                tasks: Mutex::new(Vec::new()),
                copy_rate: Mutex::new((0, std::time::Instant::now(), 0)),
                ring_changed: Arc::new(tokio::sync::Notify::new()),
            }),
        };
        node.heartbeat().await?;
        if node.inner.opts.auto_join {
            let me = torus_traits::RingMember {
                id: node.inner.opts.id,
                weight: node.store().capacity(),
            };
            match cluster::add_members(&*node.inner.meta, &[me]).await {
                Ok(_) => {}
                // Not fatal: the node serves volumes and can join later.
                Err(Error::Unsupported(why)) => {
                    tracing::warn!("not joining the ring: {why}");
                }
                Err(e) => return Err(e),
            }
        }
        // Watch before collecting garbage, so a delete in between is not missed.
        let watch = node
            .inner
            .meta
            .watch(crate::keys::VOLUMES_BY_ID.as_bytes())
            .await?;
        node.collect_garbage().await?;
        let cluster_watch = node.inner.meta.watch(crate::keys::ROOT.as_bytes()).await?;
        node.refresh_cluster_view().await?;
        let gc = tokio::spawn(gc_loop(Arc::downgrade(&node.inner), watch));
        let hb = tokio::spawn(heartbeat_loop(Arc::downgrade(&node.inner)));
        let view = tokio::spawn(cluster_view_loop(
            Arc::downgrade(&node.inner),
            cluster_watch,
        ));
        lock(&node.inner.tasks).extend([gc, hb, view]);
        let rebalancer = tokio::spawn(rebalance_loop(Arc::downgrade(&node.inner)));
        lock(&node.inner.tasks).push(rebalancer);
        if let Some(interval) = node.inner.opts.healing.down_out_interval {
            let out = tokio::spawn(down_out_loop(Arc::downgrade(&node.inner), interval));
            lock(&node.inner.tasks).push(out);
        }
        tracing::info!(id = %node.id(), "node started");
        Ok(node)
    }

    /// Change the advertised address (when a port was picked at bind time)
    /// and publish it.
    pub async fn set_address(&self, address: String) -> Result<()> {
        *lock(&self.inner.address) = address;
        self.heartbeat().await
    }

    pub fn address(&self) -> String {
        lock(&self.inner.address).clone()
    }

    pub fn id(&self) -> PeerId {
        self.inner.opts.id
    }

    pub fn meta(&self) -> &Arc<dyn MetadataStore> {
        &self.inner.meta
    }

    pub fn store(&self) -> &Arc<dyn BlockStore> {
        self.inner.replica.store()
    }

    pub fn cluster(&self) -> &ClusterRecord {
        &self.inner.cluster
    }

    /// Re-read the ring and the peers' addresses from metadata.
    pub async fn refresh_cluster_view(&self) -> Result<()> {
        refresh_view(&self.inner).await
    }

    /// The ring as this node currently sees it.
    pub fn ring(&self) -> Arc<torus_traits::Ring> {
        self.inner
            .link
            .ring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The address peers reach this node at (when it listens for peers).
    pub fn peer_address(&self) -> Option<String> {
        lock(&self.inner.listener).as_ref().map(|l| l.local_addr())
    }

    /// Write this node's peer record now.
    pub async fn heartbeat(&self) -> Result<()> {
        heartbeat_once(&self.inner).await
    }

    /// Delete local chunks of volumes that are no longer in the catalog.
    pub async fn collect_garbage(&self) -> Result<()> {
        // Chunks first, then the catalog: a volume created (and written here)
        // between the two reads is then in the catalog, never mistaken for
        // an orphan.
        let chunks = self.store().list_chunks().await?;
        let live: std::collections::HashSet<_> = catalog::list(&*self.inner.meta)
            .await?
            .into_iter()
            .map(|v| v.id)
            .collect();
        let mut orphans: Vec<_> = chunks
            .into_iter()
            .map(|c| c.volume)
            .filter(|v| !live.contains(v))
            .collect();
        orphans.dedup();
        for v in orphans {
            tracing::info!(volume = %v, "freeing chunks of deleted volume");
            self.inner.replica.drop_volume(v).await?;
        }
        Ok(())
    }

    /// Stop the heartbeat and background tasks and release nothing, as a
    /// crashed process would: the lease lapses after its TTL and other nodes
    /// may take the volumes over. Open volumes are fenced.
    pub fn abandon(&self) {
        for t in lock(&self.inner.tasks).drain(..) {
            t.abort();
        }
        lock(&self.inner.listener).take();
        for ov in lock(&self.inner.open)
            .drain()
            .filter_map(|(_, w)| w.upgrade())
        {
            ov.volume.fence();
        }
    }

    /// Flush everything, release every volume lock and the lease, stop tasks.
    pub async fn shutdown(&self) -> Result<()> {
        for t in lock(&self.inner.tasks).drain(..) {
            t.abort();
        }
        let open: Vec<Arc<OpenVolume>> = lock(&self.inner.open)
            .drain()
            .filter_map(|(_, w)| w.upgrade())
            .collect();
        let mut first_err = None;
        // Make everything written durable on every replica that received
        // it, then stop further writes, then release the locks.
        for ov in &open {
            if let Err(e) = ov.volume.flush().await {
                first_err.get_or_insert(e);
            }
            ov.volume.fence();
        }
        if let Err(e) = self.store().flush().await {
            first_err.get_or_insert(e);
        }
        for ov in &open {
            let r = ov.volume.record();
            if let Err(e) = catalog::release_lock(&*self.inner.meta, r.id, self.id(), r.epoch).await
            {
                first_err.get_or_insert(e);
            }
        }
        lock(&self.inner.listener).take();
        let lease = *lock(&self.inner.lease);
        if let Err(e) = self.inner.meta.revoke(lease).await {
            tracing::debug!("revoking lease: {e}");
        }
        if let Err(e) = self.inner.meta.close().await {
            first_err.get_or_insert(e);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Tell every ring member the volume's new epoch (a flush at that epoch),
    /// so replicas holding epochs of the previous writer refuse it from now
    /// on, and its in-flight writes drain first. Best effort: a member that
    /// is down learns the epoch from metadata when it next sees the volume.
    async fn announce_epoch(&self, record: &VolumeRecord) {
        let mut members: std::collections::BTreeSet<PeerId> =
            self.ring().members.iter().map(|m| m.id).collect();
        // Members of rings the volume is still moving from hold copies too.
        match crate::rebalance::Placement::load(&*self.inner.meta, record.id, self.ring()).await {
            Ok(p) => members.extend(p.members()),
            Err(e) => {
                tracing::debug!(volume = %record.name, "placement for the epoch announcement: {e}")
            }
        }
        let link = &self.inner.link;
        let calls = members.iter().map(|&peer| {
            let req = torus_traits::PeerRequest::Flush {
                volume: record.id,
                epoch: record.epoch,
            };
            async move {
                let r = tokio::time::timeout(Duration::from_secs(5), link.call(peer, req)).await;
                if !matches!(r, Ok(Ok(_))) {
                    tracing::debug!(%peer, volume = %record.name, "could not announce the new epoch");
                }
            }
        });
        futures::future::join_all(calls).await;
    }

    /// Chunk I/O for a volume: the writer's own view of stale replicas, or
    /// (`follow`) a reader's view that follows the writer's records.
    async fn chunk_io(&self, record: &VolumeRecord, follow: bool) -> Result<Arc<dyn ChunkIo>> {
        let link = self.inner.link.clone();
        if follow {
            let io = ReplicatedChunks::open_following(link, record.id, record.replication).await?;
            return Ok(io);
        }
        let io = ReplicatedChunks::open(link, record.id, record.replication).await?;
        Ok(Arc::new(io))
    }

    /// Take a volume's writer lock; a lock held by another node's rebalancer
    /// is waited for (it lets go after one slice), any other holder is an error.
    async fn acquire_waiting_for_rebalancer(&self, name: &str) -> Result<VolumeRecord> {
        let meta = &*self.inner.meta;
        // Bounded: a few rebalancing slices.
        for _ in 0..(REBALANCE_SLICE.as_millis() as u64 * 5 / 100) {
            let lease = *lock(&self.inner.lease);
            let address = self.address();
            match catalog::acquire_lock(meta, name, self.id(), &address, lease).await {
                Err(Error::Locked(why)) => {
                    let (record, _) = catalog::get_by_name(meta, name).await?;
                    match catalog::get_lock(meta, record.id).await? {
                        Some((held, _)) if held.rebalancing => {}
                        Some(_) => return Err(Error::Locked(why)),
                        // Released in between: try again at once.
                        None => continue,
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
        Err(Error::Locked(format!(
            "volume {name:?} is being rebalanced and its lock was not released in time; try again"
        )))
    }

    /// One slice of healing for every volume that no node has open and that
    /// is placed by an older ring, has stale replicas that answer again,
    /// orphaned copies on live peers, or a scrub asked for. `true` when a
    /// move is still under way.
    async fn rebalance_unopened(&self) -> Result<bool> {
        let meta = &*self.inner.meta;
        let ring = self.ring();
        let mut records = HashMap::new();
        for kv in meta.range(crate::keys::PLACEMENT.as_bytes()).await? {
            if let Some(id) = crate::keys::volume_id_after(crate::keys::PLACEMENT, &kv.key) {
                let record: crate::rebalance::PlacementRecord =
                    crate::codec::decode(&kv.key, &kv.value)?;
                records.insert(id, record);
            }
        }
        let orphans = crate::rebalance::live_orphans(meta).await?;
        // Stale replicas that answer again: a resync is due.
        let alive = peers::alive(meta).await?;
        let stale: std::collections::HashSet<_> = meta
            .range(crate::replication::DEGRADED.as_bytes())
            .await?
            .iter()
            .filter(|kv| {
                crate::replication::parse_degraded_key(&kv.key)
                    .is_ok_and(|(_, peer)| alive.contains(&peer))
            })
            .filter_map(|kv| crate::keys::volume_id_after(crate::replication::DEGRADED, &kv.key))
            .collect();
        let scrubs: std::collections::HashSet<_> = meta
            .range(crate::keys::SCRUB.as_bytes())
            .await?
            .iter()
            .filter(|kv| kv.key.ends_with(b"/request"))
            .filter_map(|kv| crate::keys::volume_id_after(crate::keys::SCRUB, &kv.key))
            .collect();
        let mut moving = false;
        for volume in catalog::list(meta).await? {
            let balanced = records
                .get(&volume.id)
                .is_none_or(|r| r.balanced_at(ring.version))
                && !orphans.contains_key(&volume.id)
                && !scrubs.contains(&volume.id);
            let open_here = lock(&self.inner.open)
                .get(&volume.name)
                .is_some_and(|w| w.strong_count() > 0);
            if (balanced && !stale.contains(&volume.id))
                || open_here
                || catalog::get_lock(meta, volume.id).await?.is_some()
            {
                continue;
            }
            let lease = *lock(&self.inner.lease);
            let address = self.address();
            let record = match catalog::acquire_lock_for(
                meta,
                &volume.name,
                self.id(),
                &address,
                lease,
                true,
            )
            .await
            {
                Ok(r) => r,
                Err(Error::Locked(_)) => continue,
                Err(e) => return Err(e),
            };
            let result = self.rebalance_slice(&record).await;
            catalog::release_lock(meta, record.id, self.id(), record.epoch).await?;
            match result {
                Ok(done) => moving |= !done,
                Err(Error::Fenced(_)) => {}
                Err(e) => {
                    tracing::warn!(volume = %record.name, "rebalancing failed, will retry: {e}")
                }
            }
        }
        Ok(moving)
    }

    /// One slice for a volume whose lock this node holds; `true` when its
    /// move is done.
    async fn rebalance_slice(&self, record: &VolumeRecord) -> Result<bool> {
        let io =
            ReplicatedChunks::open(self.inner.link.clone(), record.id, record.replication).await?;
        self.announce_epoch(record).await;
        let chunks = record.size.div_ceil(self.inner.cluster.chunk_size);
        let rate = self.inner.opts.healing.rebalance_rate;
        let report = io
            .rebalance(record.epoch, chunks, REBALANCE_SLICE, rate)
            .await?;
        // Stale replicas of the volume are this writer's to repair too, and
        // an operator's scrub request.
        io.resync(record.epoch).await?;
        if report.done {
            let asked_only = Healing {
                scrub_interval: None,
                ..self.inner.opts.healing.clone()
            };
            scrub_if_due(&*self.inner.meta, record, &io, &asked_only).await?;
        }
        ChunkIo::flush(&io, record.id, record.epoch).await?;
        tracing::debug!(volume = %record.name, ?report, "rebalancing slice");
        Ok(report.done)
    }

    fn export_info(record: &VolumeRecord) -> ExportInfo {
        ExportInfo {
            name: record.name.clone(),
            size: record.size,
            description: format!("torus block volume {}", record.name),
        }
    }
}

/// While a volume is open for writing here, bring its stale replicas up to
/// date (incremental resync) and move its chunks after a ring change, every
/// `period` (continuously while a move is under way).
async fn heal_loop(
    volume: Weak<OpenVolume>,
    period: Duration,
    chunk_size: u64,
    healing: Healing,
    meta: Arc<dyn MetadataStore>,
    ring_changed: Arc<tokio::sync::Notify>,
) {
    let rate = healing.rebalance_rate;
    loop {
        let Some(ov) = volume.upgrade() else { return };
        let record = ov.volume.record().clone();
        let io = ov.volume.io();
        // Do not keep the volume open (and locked) just for the healing.
        drop(ov);
        match io.resync(record.epoch).await {
            Ok(_) => {}
            Err(Error::Fenced(_)) => return,
            Err(e) => tracing::warn!("resync pass failed: {e}"),
        }
        let chunks = record.size.div_ceil(chunk_size);
        let moving = match io
            .rebalance(record.epoch, chunks, REBALANCE_SLICE, rate)
            .await
        {
            Ok(r) => !r.done,
            Err(Error::Fenced(_)) => return,
            Err(e) => {
                tracing::warn!(volume = %record.name, "rebalancing failed, will retry: {e}");
                false
            }
        };
        if !moving {
            match scrub_if_due(&*meta, &record, &*io, &healing).await {
                Ok(()) => {}
                Err(Error::Fenced(_)) => return,
                Err(e) => tracing::warn!(volume = %record.name, "scrub failed: {e}"),
            }
        }
        drop(io);
        let pause = if moving {
            Duration::from_millis(20)
        } else {
            period
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = ring_changed.notified() => {}
        }
    }
}

/// Scrub a volume if an operator asked for it or its schedule says so, and
/// record the result.
async fn scrub_if_due(
    meta: &dyn MetadataStore,
    record: &VolumeRecord,
    io: &dyn ChunkIo,
    healing: &Healing,
) -> Result<()> {
    let request = crate::scrub::pending_request(meta, record.id).await?;
    let due = match (healing.scrub_interval, &request) {
        (_, Some(_)) => true,
        (None, None) => false,
        (Some(every), None) => {
            let last = crate::scrub::last_result(meta, record.id)
                .await?
                .map_or(record.created_unix_ms, |r| r.finished_unix_ms);
            catalog::now_ms().saturating_sub(last) >= every.as_millis() as u64
        }
    };
    if !due {
        return Ok(());
    }
    // An operator waiting for the answer gets it at full speed.
    let rate = if request.is_some() {
        0
    } else {
        healing.scrub_rate
    };
    tracing::info!(volume = %record.name, "scrub started");
    let outcome = io.scrub(record.epoch, rate).await;
    if let Err(e @ Error::Fenced(_)) = outcome {
        return Err(e);
    }
    let result = crate::scrub::ScrubResult {
        request: request.map_or(0, |r| r.id),
        finished_unix_ms: catalog::now_ms(),
        report: outcome.as_ref().cloned().unwrap_or_default(),
        error: outcome.as_ref().err().map(|e| e.to_string()),
    };
    tracing::info!(volume = %record.name, report = ?result.report, error = ?result.error, "scrub finished");
    crate::scrub::record(meta, record.id, &result).await
}

/// Move the chunks of volumes that no node has open, taking each one's lock
/// for one slice at a time.
async fn rebalance_loop(inner: Weak<Inner>) {
    let Some(ring_changed) = inner.upgrade().map(|i| i.ring_changed.clone()) else {
        return;
    };
    let mut pause = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = ring_changed.notified() => {}
        }
        pause = Duration::from_secs(1);
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let node = Node { inner: strong };
        if !node.ring().contains(node.id()) {
            continue;
        }
        match node.rebalance_unopened().await {
            // A move under way goes on after a gap just long enough for an
            // open waiting for the lock (it polls every 100 ms) to take it.
            Ok(true) => pause = REBALANCE_GAP,
            Ok(false) => {}
            Err(e) => tracing::warn!("rebalancing pass failed: {e}"),
        }
        if let Err(e) = crate::rebalance::prune_ring_history(&*node.inner.meta).await {
            tracing::debug!("pruning the ring history: {e}");
        }
    }
}

/// Take ring members that stayed down longer than `interval` out of the
/// ring. Every member watches; only the live member with the smallest id
/// acts, and the ring's compare-and-swap makes a racing second one harmless.
async fn down_out_loop(inner: Weak<Inner>, interval: Duration) {
    let mut down_since: HashMap<PeerId, tokio::time::Instant> = HashMap::new();
    let tick = (interval / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = inner.upgrade() else { return };
        let meta = &*inner.meta;
        let (ring, alive) = match (cluster::ring(meta).await, peers::alive(meta).await) {
            (Ok((ring, _)), Ok(alive)) => (ring, alive),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("down-out check: {e}");
                continue;
            }
        };
        down_since.retain(|p, _| ring.contains(*p) && !alive.contains(p));
        for m in &ring.members {
            if !alive.contains(&m.id) {
                down_since
                    .entry(m.id)
                    .or_insert_with(tokio::time::Instant::now);
            }
        }
        let leader = ring
            .members
            .iter()
            .map(|m| m.id)
            .filter(|id| alive.contains(id))
            .min();
        if leader != Some(inner.opts.id) {
            continue;
        }
        let out: Vec<PeerId> = down_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= interval)
            .map(|(p, _)| *p)
            .collect();
        if out.is_empty() || out.len() >= ring.members.len() {
            continue;
        }
        tracing::warn!(peers = ?out, "taking peers out of the ring: down for more than {interval:?}; their chunks will be re-replicated");
        match cluster::remove_members(meta, &out).await {
            Ok(ring) => {
                tracing::info!(version = ring.version, "ring changed");
                down_since.retain(|p, _| !out.contains(p));
            }
            Err(e) => tracing::warn!("taking peers out of the ring failed: {e}"),
        }
    }
}

/// Bytes per second copied to rebuild or move chunks, sampled over at
/// least a second (heartbeats on demand come more often).
fn copy_rate(inner: &Inner) -> u64 {
    let now = std::time::Instant::now();
    let copied = inner.link.copied.load(std::sync::atomic::Ordering::Relaxed);
    let mut sample = lock(&inner.copy_rate);
    let elapsed = now.duration_since(sample.1);
    if elapsed >= Duration::from_secs(1) {
        let rate = copied.saturating_sub(sample.0) as f64 / elapsed.as_secs_f64();
        *sample = (copied, now, rate as u64);
    }
    sample.2
}

/// This node's peer record as of now.
async fn peer_record(
    replica: &Replica,
    opts: &NodeOptions,
    address: String,
    rebalance_rate: u64,
) -> Result<PeerInfo> {
    let store = replica.store();
    Ok(PeerInfo {
        id: opts.id,
        address,
        capacity: store.capacity(),
        used: store.used().await?,
        rebalance_rate,
        updated_unix_ms: catalog::now_ms(),
        // heartbeat_loop's period.
        heartbeat_ms: u64::try_from((opts.lease_ttl / 3).as_millis()).unwrap_or(u64::MAX),
    })
}

async fn heartbeat_once(inner: &Inner) -> Result<()> {
    let address = lock(&inner.address).clone();
    let info = peer_record(&inner.replica, &inner.opts, address, copy_rate(inner)).await?;
    let lease = *lock(&inner.lease);
    peers::heartbeat(&*inner.meta, &info, lease).await
}

/// Keep the lease alive and the peer record fresh, and fence this node's
/// writers before its lease can lapse on the server.
///
/// The lease expires on the metadata server `lease_ttl` after the last renewal
/// it received. If no renewal has succeeded for most of that time (etcd
/// unreachable, slow, partitioned), another node may take the volumes over
/// soon, so every writable volume here is fenced first — by the clock, not only
/// on a `LeaseNotFound` answer that a partition would never deliver. If the
/// lease is gone the node registers again under a new one.
async fn heartbeat_loop(inner: Weak<Inner>) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let ttl = strong.opts.lease_ttl;
        drop(strong);
        let healthy = last_ok.elapsed() < ttl / 3;
        let period = if healthy {
            ttl / 3
        } else {
            Duration::from_millis(300)
        };
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        let lease = *lock(&inner.lease);
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(ttl / 3, inner.meta.keep_alive(lease)).await {
            Ok(Ok(_)) => last_ok = sent,
            Ok(Err(Error::LeaseNotFound(_))) => {
                tracing::error!("lease lost: fencing every open volume and registering again");
                fence_all(&inner).await;
                match inner.meta.grant(ttl).await {
                    Ok(new) => {
                        *lock(&inner.lease) = new;
                        last_ok = sent;
                    }
                    Err(e) => tracing::warn!("cannot grant a new lease: {e}"),
                }
            }
            Ok(Err(e)) => tracing::warn!("lease keep-alive failed: {e}"),
            Err(_) => tracing::warn!("lease keep-alive timed out"),
        }
        // Fence with a margin before the server could expire the lease.
        if last_ok.elapsed() >= ttl - ttl / 4 && !lock(&inner.open).is_empty() {
            tracing::error!(
                silent_for = ?last_ok.elapsed(),
                "no lease renewal for most of its TTL: fencing open volumes before another node can take them"
            );
            fence_all(&inner).await;
        }
        if let Err(e) = tokio::time::timeout(ttl / 3, heartbeat_once(&inner))
            .await
            .unwrap_or_else(|_| Err(Error::Timeout("peer heartbeat".into())))
        {
            tracing::warn!("heartbeat failed: {e}");
        }
    }
}

/// Fence and forget every writable volume. Under the open gate, so an open
/// racing with this either finishes first (and is fenced) or starts after.
async fn fence_all(inner: &Inner) {
    let _gate = inner.open_gate.lock().await;
    for ov in lock(&inner.open).drain().filter_map(|(_, w)| w.upgrade()) {
        ov.volume.fence();
    }
}

async fn refresh_view(inner: &Inner) -> Result<()> {
    let (ring, _) = cluster::ring(&*inner.meta).await?;
    *inner.link.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
    for p in peers::list(&*inner.meta).await? {
        if !p.info.address.is_empty() && p.info.id != inner.opts.id {
            inner.link.directory.set(p.info.id, p.info.address);
        }
    }
    Ok(())
}

/// Keep the ring and the peer directory current from metadata events; on a
/// broken watch, re-read everything and watch again.
async fn cluster_view_loop(inner: Weak<Inner>, mut watch: WatchStream) {
    loop {
        let event = watch.next().await;
        let Some(inner) = inner.upgrade() else { return };
        match event {
            Some(Ok(ev)) if ev.kind == EventKind::Put => {
                if ev.kv.key == crate::keys::RING.as_bytes() {
                    match crate::codec::decode::<torus_traits::Ring>(&ev.kv.key, &ev.kv.value) {
                        Ok(ring) => {
                            tracing::info!(
                                version = ring.version,
                                members = ring.members.len(),
                                "ring changed"
                            );
                            *inner.link.ring.write().unwrap_or_else(|e| e.into_inner()) =
                                Arc::new(ring);
                            inner.ring_changed.notify_waiters();
                        }
                        Err(e) => tracing::warn!("ignoring an undecodable ring: {e}"),
                    }
                } else if ev.kv.key.starts_with(crate::keys::PEERS.as_bytes()) {
                    if let Ok(info) = crate::codec::decode::<PeerInfo>(&ev.kv.key, &ev.kv.value) {
                        if info.id != inner.opts.id {
                            inner.link.directory.set(info.id, info.address);
                        }
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match inner.meta.watch(crate::keys::ROOT.as_bytes()).await {
                    Ok(w) => watch = w,
                    Err(e) => {
                        tracing::warn!("cluster watch failed: {e}");
                        continue;
                    }
                }
                if let Err(e) = refresh_view(&inner).await {
                    tracing::warn!("refreshing the cluster view failed: {e}");
                }
            }
        }
    }
}

/// Free chunks as volumes are deleted; on a broken watch, rescan and rewatch.
async fn gc_loop(inner: Weak<Inner>, mut watch: torus_traits::WatchStream) {
    loop {
        let event = watch.next().await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let node = Node { inner: strong };
        match event {
            Some(Ok(ev)) if ev.kind == EventKind::Delete => {
                if let Some(id) = crate::keys::volume_id_from_key(&ev.kv.key) {
                    tracing::info!(volume = %id, "volume deleted: freeing its chunks");
                    if let Err(e) = node.inner.replica.drop_volume(id).await {
                        tracing::warn!(volume = %id, "freeing chunks failed: {e}");
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match node
                    .inner
                    .meta
                    .watch(crate::keys::VOLUMES_BY_ID.as_bytes())
                    .await
                {
                    Ok(w) => watch = w,
                    Err(e) => {
                        tracing::warn!("volume watch failed: {e}");
                        continue;
                    }
                }
                if let Err(e) = node.collect_garbage().await {
                    tracing::warn!("garbage collection failed: {e}");
                }
            }
        }
    }
}

#[async_trait]
impl VolumeProvider for Node {
    async fn list(&self) -> Result<Vec<ExportInfo>> {
        Ok(catalog::list(&*self.inner.meta)
            .await?
            .iter()
            .map(Node::export_info)
            .collect())
    }

    async fn info(&self, name: &str) -> Result<ExportInfo> {
        let (record, _) = catalog::get_by_name(&*self.inner.meta, name).await?;
        Ok(Node::export_info(&record))
    }

    async fn open(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        let chunk_size = self.inner.cluster.chunk_size;
        if read_only {
            let (record, _) = catalog::get_by_name(&*self.inner.meta, name).await?;
            let io = self.chunk_io(&record, true).await?;
            return Ok(Arc::new(Volume::new(record, chunk_size, io, true)));
        }
        let _gate = self.inner.open_gate.lock().await;
        if let Some(ov) = lock(&self.inner.open).get(name).and_then(Weak::upgrade) {
            return Ok(Arc::new(Handle(ov)));
        }
        let record = self.acquire_waiting_for_rebalancer(name).await?;
        tracing::info!(volume = %name, epoch = record.epoch.0, "volume opened for writing");
        let io = match self.chunk_io(&record, false).await {
            Ok(io) => io,
            Err(e) => {
                let _ =
                    catalog::release_lock(&*self.inner.meta, record.id, self.id(), record.epoch)
                        .await;
                return Err(e);
            }
        };
        self.announce_epoch(&record).await;
        let ov = Arc::new(OpenVolume {
            volume: Volume::new(record, chunk_size, io, false),
            node: Arc::downgrade(&self.inner),
        });
        let period = (self.inner.opts.lease_ttl / 2).max(Duration::from_millis(500));
        let heal = tokio::spawn(heal_loop(
            Arc::downgrade(&ov),
            period,
            chunk_size,
            self.inner.opts.healing.clone(),
            self.inner.meta.clone(),
            self.inner.ring_changed.clone(),
        ));
        {
            let mut tasks = lock(&self.inner.tasks);
            tasks.retain(|t| !t.is_finished());
            tasks.push(heal);
        }
        let mut open = lock(&self.inner.open);
        open.insert(name.to_string(), Arc::downgrade(&ov));
        Ok(Arc::new(Handle(ov)))
    }
}
