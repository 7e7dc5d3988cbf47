//! The in-process metadata engine shared by
//! [`MemoryMetadata`](super::MemoryMetadata) and
//! [`SledMetadata`](super::SledMetadata): revisions, compares, transactions, watches and leases,
//! written once on top of a plain sorted byte map ([`KvBackend`]).
//!
//! # How it works
//!
//! - **One lock.** All state (the backend, the global revision, the lease
//!   table, the watchers) sits behind one async mutex. Every operation, read
//!   or write, takes it, so a transaction's compares and writes see no other
//!   write in between, and events leave in revision order. Metadata traffic is
//!   light (volume opens, heartbeats, ring changes), so a single writer costs
//!   nothing that matters and keeps the code obviously correct.
//! - **Durable before visible.** A write is applied to the backend as one
//!   atomic batch (data records plus the revision counter), flushed, and only
//!   then are watchers told and the caller answered. The lock is held across
//!   the flush so no one can read a write that is not yet durable.
//! - **Leases.** The lease table (id, TTL, deadline, bound keys) lives in
//!   memory; each lease's id and TTL are also stored, so a persistent backend
//!   still knows them after a restart. Deadlines are not stored: on open every
//!   lease gets a fresh full TTL, as etcd does on a leader change. Expired
//!   leases are ended by a timer task (which holds only a `Weak` reference, so
//!   it stops when the store is dropped) *and* at the start of every
//!   operation, so no caller ever observes a key whose lease has run out.
//!
//! # Stored layout (inside the backend)
//!
//! | key                        | value                                    |
//! |----------------------------|------------------------------------------|
//! | `k` + user key             | a record (see [`Record`])                 |
//! | `l` + lease id (8 B, BE)   | TTL in nanoseconds (8 B, BE)             |
//! | `m/revision`               | global revision (8 B, BE)                |
//! | `m/next-lease`             | next lease id to hand out (8 B, BE)      |

use async_trait::async_trait;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use torus_traits::{
    CompareOp, CompareTarget, Error, EventKind, KeyValue, LeaseId, MetadataStore, Result, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchEvent, WatchStream,
};

/// Writes to apply atomically: `(key, Some(value))` stores, `(key, None)` removes.
pub type Batch = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// What the engine needs from storage: a sorted byte map whose batches are
/// applied atomically, and a durability barrier.
///
/// The engine calls these only while holding its lock, so implementations
/// need no locking of their own for consistency.
pub trait KvBackend: Send + Sync + 'static {
    /// The value stored at `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Every entry whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Apply every write of `batch`, all or nothing.
    fn apply(&mut self, batch: Batch) -> Result<()>;
    /// Make every applied batch durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    /// Release the backend's files; when this returns, the same files can
    /// be opened again. By default dropping is enough.
    fn release(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async move { drop(self) }
    }
}

/// How often the timer task looks for expired leases. The contract allows
/// expiry to lag the TTL by about a second.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

const DATA: u8 = b'k';
const LEASE: u8 = b'l';
const META_REVISION: &[u8] = b"m/revision";
const META_NEXT_LEASE: &[u8] = b"m/next-lease";
/// Format tag of a stored record, so the layout can change later.
const RECORD_FORMAT: u8 = 1;
/// format (1) + create_revision, mod_revision, version, lease (4 × 8).
const RECORD_HEADER: usize = 1 + 4 * 8;

/// A generic in-process [`MetadataStore`] over any [`KvBackend`].
///
/// Cloning is cheap and gives another handle to the same store.
pub struct LocalMetadata<B: KvBackend> {
    inner: Arc<Inner<B>>,
}

impl<B: KvBackend> Clone for LocalMetadata<B> {
    fn clone(&self) -> Self {
        LocalMetadata {
            inner: self.inner.clone(),
        }
    }
}

impl<B: KvBackend> std::fmt::Debug for LocalMetadata<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalMetadata")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

struct Inner<B: KvBackend> {
    /// What the store is, for messages ("memory", a path).
    name: String,
    state: Mutex<State<B>>,
    /// The lease-expiry timer task, started on first use inside a runtime.
    expiry_task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl<B: KvBackend> Drop for Inner<B> {
    fn drop(&mut self) {
        let slot = self
            .expiry_task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = slot.take() {
            task.abort();
        }
    }
}

struct State<B> {
    /// `None` once the store is closed.
    backend: Option<B>,
    revision: i64,
    next_lease: i64,
    leases: HashMap<LeaseId, Lease>,
    watchers: Vec<Watcher>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    /// Keys currently bound to this lease.
    keys: BTreeSet<Vec<u8>>,
}

struct Watcher {
    prefix: Vec<u8>,
    tx: mpsc::UnboundedSender<Result<WatchEvent>>,
}

/// One stored key: value plus the etcd-style bookkeeping.
///
/// Encoded as `[format=1][create_revision][mod_revision][version][lease or 0]`
/// (each i64 big-endian) followed by the value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: Option<LeaseId>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_HEADER + self.value.len());
        out.push(RECORD_FORMAT);
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.mod_revision.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.lease.map_or(0, |l| l.0).to_be_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(key: &[u8], bytes: &[u8]) -> Result<Record> {
        let corrupt = |why: &str| {
            Error::Corrupt(format!(
                "metadata record for key {}: {why}",
                key.escape_ascii()
            ))
        };
        if bytes.len() < RECORD_HEADER {
            return Err(corrupt(&format!("{} bytes, too short", bytes.len())));
        }
        if bytes[0] != RECORD_FORMAT {
            return Err(corrupt(&format!("unknown record format {}", bytes[0])));
        }
        let field = |i: usize| i64_at(bytes, 1 + 8 * i);
        let record = Record {
            create_revision: field(0),
            mod_revision: field(1),
            version: field(2),
            lease: match field(3) {
                0 => None,
                id => Some(LeaseId(id)),
            },
            value: bytes[RECORD_HEADER..].to_vec(),
        };
        if record.create_revision <= 0
            || record.mod_revision < record.create_revision
            || record.version <= 0
        {
            return Err(corrupt("impossible revisions"));
        }
        Ok(record)
    }

    fn to_kv(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// The big-endian i64 at `at`; the caller has checked the length.
fn i64_at(bytes: &[u8], at: usize) -> i64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[at..at + 8]);
    i64::from_be_bytes(buf)
}

/// An 8-byte big-endian integer stored under a meta or lease key.
fn decode_u64(what: &str, bytes: &[u8]) -> Result<u64> {
    let buf: [u8; 8] = bytes.try_into().map_err(|_| {
        Error::Corrupt(format!(
            "metadata {what}: expected 8 bytes, found {}",
            bytes.len()
        ))
    })?;
    Ok(u64::from_be_bytes(buf))
}

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(DATA);
    out.extend_from_slice(key);
    out
}

fn lease_key(lease: LeaseId) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.push(LEASE);
    out.extend_from_slice(&lease.0.to_be_bytes());
    out
}

fn ttl_nanos(ttl: Duration) -> Result<u64> {
    u64::try_from(ttl.as_nanos())
        .map_err(|_| Error::InvalidArgument(format!("lease TTL {ttl:?} is too long")))
}

fn deadline_after(ttl: Duration) -> Result<Instant> {
    Instant::now()
        .checked_add(ttl)
        .ok_or_else(|| Error::InvalidArgument(format!("lease TTL {ttl:?} is too long")))
}

fn compare_ord<T: Ord + ?Sized>(current: &T, op: CompareOp, target: &T) -> bool {
    match op {
        CompareOp::Equal => current == target,
        CompareOp::NotEqual => current != target,
        CompareOp::Greater => current > target,
        CompareOp::Less => current < target,
    }
}

fn delete_event(key: Vec<u8>, revision: i64) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Delete,
        kv: KeyValue {
            key,
            value: Vec::new(),
            create_revision: 0,
            mod_revision: revision,
            version: 0,
            lease: None,
        },
    }
}

impl<B: KvBackend> LocalMetadata<B> {
    /// A store over a backend known to be empty: nothing to load, so it
    /// cannot fail (used by the memory store).
    pub(crate) fn new_empty(backend: B, name: &str) -> Self {
        Self::from_state(
            name,
            State {
                backend: Some(backend),
                revision: 0,
                next_lease: 1,
                leases: HashMap::new(),
                watchers: Vec::new(),
            },
        )
    }

    /// Opens the store kept in `backend`: reads the revision, the lease table
    /// (every lease gets a fresh full TTL) and which keys each lease holds.
    ///
    /// Keys bound to a lease that no longer exists (which atomic batches
    /// should make impossible) are deleted, as their lease has ended.
    /// Undecodable records give [`Error::Corrupt`].
    pub fn load(mut backend: B, name: &str) -> Result<Self> {
        let revision = match backend.get(META_REVISION)? {
            Some(bytes) => decode_u64("revision", &bytes)? as i64,
            None => 0,
        };
        let next_lease = match backend.get(META_NEXT_LEASE)? {
            Some(bytes) => decode_u64("next lease id", &bytes)? as i64,
            None => 1,
        };
        if revision < 0 || next_lease < 1 {
            return Err(Error::Corrupt(format!(
                "metadata store {name}: revision {revision}, next lease {next_lease}"
            )));
        }

        let mut leases = HashMap::new();
        for (key, value) in backend.scan_prefix(&[LEASE])? {
            let id = decode_u64("lease id", &key[1..])? as i64;
            let nanos = decode_u64("lease TTL", &value)?;
            let ttl = Duration::from_nanos(nanos);
            if id == 0 {
                return Err(Error::Corrupt(format!(
                    "metadata store {name}: lease id 0 stored"
                )));
            }
            leases.insert(
                LeaseId(id),
                Lease {
                    ttl,
                    deadline: deadline_after(ttl)?,
                    keys: BTreeSet::new(),
                },
            );
        }

        let mut orphans = Vec::new();
        for (stored_key, bytes) in backend.scan_prefix(&[DATA])? {
            let key = &stored_key[1..];
            let record = Record::decode(key, &bytes)?;
            if let Some(id) = record.lease {
                match leases.get_mut(&id) {
                    Some(lease) => {
                        lease.keys.insert(key.to_vec());
                    }
                    None => orphans.push(stored_key),
                }
            }
        }

        let mut revision = revision;
        if !orphans.is_empty() {
            tracing::warn!(
                store = name,
                keys = orphans.len(),
                "deleting keys bound to leases that no longer exist"
            );
            revision += 1;
            let mut batch: Batch = orphans.into_iter().map(|k| (k, None)).collect();
            batch.push((
                META_REVISION.to_vec(),
                Some(revision.to_be_bytes().to_vec()),
            ));
            // Not flushed here: if lost in a crash, the next open redoes it.
            backend.apply(batch)?;
        }

        Ok(Self::from_state(
            name,
            State {
                backend: Some(backend),
                revision,
                next_lease,
                leases,
                watchers: Vec::new(),
            },
        ))
    }

    fn from_state(name: &str, state: State<B>) -> Self {
        let store = LocalMetadata {
            inner: Arc::new(Inner {
                name: name.to_string(),
                state: Mutex::new(state),
                expiry_task: std::sync::Mutex::new(None),
            }),
        };
        // Start the timer now when we are inside a runtime; otherwise the
        // first operation (always inside one) starts it.
        store.ensure_expiry_task();
        store
    }

    /// Starts the lease-expiry task if it is not running (never started, or
    /// its runtime has gone away).
    fn ensure_expiry_task(&self) {
        let mut slot = self
            .inner
            .expiry_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        *slot = Some(runtime.spawn(expiry_loop(weak)));
    }

    /// Takes the lock of an open store and ends every lease that is due, so
    /// the operation that follows never sees a key whose lease has run out.
    async fn lock_open(&self) -> Result<tokio::sync::MutexGuard<'_, State<B>>> {
        self.ensure_expiry_task();
        let mut state = self.inner.state.lock().await;
        if state.backend.is_none() {
            return Err(self.inner.closed());
        }
        self.inner.expire_due(&mut state).await?;
        Ok(state)
    }
}

/// The timer task: ends due leases until the store is dropped or closed.
async fn expiry_loop<B: KvBackend>(weak: Weak<Inner<B>>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let mut state = inner.state.lock().await;
        if state.backend.is_none() {
            return;
        }
        if let Err(e) = inner.expire_due(&mut state).await {
            tracing::warn!(store = %inner.name, error = %e, "ending expired leases failed; will retry");
        }
    }
}

impl<B: KvBackend> Inner<B> {
    fn closed(&self) -> Error {
        Error::Closed(format!("metadata store {} is closed", self.name))
    }

    /// Ends every lease whose deadline has passed, one revision per lease
    /// that still held keys.
    async fn expire_due(&self, state: &mut State<B>) -> Result<()> {
        let now = Instant::now();
        let mut due: Vec<(Instant, LeaseId)> = state
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, lease)| (lease.deadline, *id))
            .collect();
        // Oldest deadline first, so revisions follow expiry order.
        due.sort();
        for (_, id) in due {
            self.end_lease(state, id).await?;
        }
        Ok(())
    }

    /// Revokes `id`: deletes its keys and its stored record in one batch.
    /// The lease leaves the table only once the batch is applied, so a failed
    /// write is retried later instead of orphaning keys.
    async fn end_lease(&self, state: &mut State<B>, id: LeaseId) -> Result<()> {
        let Some(lease) = state.leases.get(&id) else {
            return Err(Error::LeaseNotFound(id.0));
        };
        let keys: Vec<Vec<u8>> = lease.keys.iter().cloned().collect();
        let mut batch: Batch = vec![(lease_key(id), None)];
        let mut events = Vec::new();
        let new_revision = state.revision + 1;
        for key in keys {
            batch.push((data_key(&key), None));
            events.push(delete_event(key, new_revision));
        }
        let revision = if events.is_empty() {
            None
        } else {
            Some(new_revision)
        };
        let flushed = self.commit(state, batch, revision, &events).await?;
        state.leases.remove(&id);
        flushed
    }

    /// Applies `batch` (plus the new revision, if any) atomically, flushes it,
    /// then tells the watchers.
    ///
    /// The outer error means nothing was applied: the caller leaves its
    /// in-memory state alone. The inner one is a failed flush after the batch
    /// was applied: readers already see the write, so the caller updates its
    /// state to match and then reports the error.
    async fn commit(
        &self,
        state: &mut State<B>,
        mut batch: Batch,
        new_revision: Option<i64>,
        events: &[WatchEvent],
    ) -> Result<Result<()>> {
        let backend = state.backend.as_mut().ok_or_else(|| self.closed())?;
        if let Some(rev) = new_revision {
            batch.push((META_REVISION.to_vec(), Some(rev.to_be_bytes().to_vec())));
        }
        backend.apply(batch)?;
        let flushed = backend.flush().await;
        if let Some(rev) = new_revision {
            state.revision = rev;
        }
        notify(&mut state.watchers, events);
        Ok(flushed)
    }

    /// Runs a transaction. The public `put` and `delete` are one-op
    /// transactions, so there is a single write path.
    async fn execute(&self, state: &mut State<B>, txn: Txn) -> Result<TxnResponse> {
        let backend = state.backend.as_ref().ok_or_else(|| self.closed())?;

        let mut succeeded = true;
        for compare in &txn.compares {
            let record = load(backend, &BTreeMap::new(), &compare.key)?;
            let holds = match (&compare.target, &record) {
                // etcd: a value compare on an absent key is always false.
                (CompareTarget::Value(_), None) => false,
                (CompareTarget::Value(v), Some(r)) => {
                    compare_ord(r.value.as_slice(), compare.op, v.as_slice())
                }
                (CompareTarget::CreateRevision(t), r) => {
                    compare_ord(&r.as_ref().map_or(0, |r| r.create_revision), compare.op, t)
                }
                (CompareTarget::ModRevision(t), r) => {
                    compare_ord(&r.as_ref().map_or(0, |r| r.mod_revision), compare.op, t)
                }
                (CompareTarget::Version(t), r) => {
                    compare_ord(&r.as_ref().map_or(0, |r| r.version), compare.op, t)
                }
            };
            if !holds {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { txn.success } else { txn.failure };

        // Check every lease before writing anything (etcd does the same).
        for op in &ops {
            if let TxnOp::Put {
                lease: Some(id), ..
            } = op
            {
                if !state.leases.contains_key(id) {
                    return Err(Error::LeaseNotFound(id.0));
                }
            }
        }

        // Ops run in order over an overlay of this transaction's own writes,
        // so later ops see earlier ones (as in etcd).
        let new_revision = state.revision + 1;
        let mut overlay: BTreeMap<Vec<u8>, Option<Record>> = BTreeMap::new();
        // The lease each touched key had before the transaction.
        let mut old_leases: HashMap<Vec<u8>, Option<LeaseId>> = HashMap::new();
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                TxnOp::Get { key } => {
                    let record = load(backend, &overlay, &key)?;
                    responses.push(TxnOpResponse::Get(record.map(|r| r.to_kv(&key))));
                }
                TxnOp::Put { key, value, lease } => {
                    let old = load(backend, &overlay, &key)?;
                    remember_lease(backend, &mut old_leases, &key)?;
                    let record = match old {
                        Some(old) => Record {
                            value,
                            create_revision: old.create_revision,
                            mod_revision: new_revision,
                            version: old.version + 1,
                            lease,
                        },
                        None => Record {
                            value,
                            create_revision: new_revision,
                            mod_revision: new_revision,
                            version: 1,
                            lease,
                        },
                    };
                    events.push(WatchEvent {
                        kind: EventKind::Put,
                        kv: record.to_kv(&key),
                    });
                    overlay.insert(key, Some(record));
                    responses.push(TxnOpResponse::Put);
                }
                TxnOp::Delete { key } => {
                    let deleted = if load(backend, &overlay, &key)?.is_some() {
                        remember_lease(backend, &mut old_leases, &key)?;
                        events.push(delete_event(key.clone(), new_revision));
                        overlay.insert(key, None);
                        1
                    } else {
                        0
                    };
                    responses.push(TxnOpResponse::Delete(deleted));
                }
                TxnOp::DeletePrefix { prefix } => {
                    let keys = live_keys(backend, &overlay, &prefix)?;
                    let count = keys.len() as u64;
                    for key in keys {
                        remember_lease(backend, &mut old_leases, &key)?;
                        events.push(delete_event(key.clone(), new_revision));
                        overlay.insert(key, None);
                    }
                    responses.push(TxnOpResponse::Delete(count));
                }
            }
        }

        if overlay.is_empty() {
            return Ok(TxnResponse {
                succeeded,
                revision: state.revision,
                responses,
            });
        }

        let batch: Batch = overlay
            .iter()
            .map(|(key, record)| (data_key(key), record.as_ref().map(Record::encode)))
            .collect();
        let flushed = self
            .commit(state, batch, Some(new_revision), &events)
            .await?;
        // Move each touched key from the lease it had to the lease it has now.
        for (key, record) in &overlay {
            if let Some(Some(id)) = old_leases.get(key) {
                if let Some(lease) = state.leases.get_mut(id) {
                    lease.keys.remove(key);
                }
            }
            if let Some(Record {
                lease: Some(id), ..
            }) = record
            {
                if let Some(lease) = state.leases.get_mut(id) {
                    lease.keys.insert(key.clone());
                }
            }
        }
        flushed?;
        Ok(TxnResponse {
            succeeded,
            revision: state.revision,
            responses,
        })
    }
}

/// The record at `key`, looking first at the transaction's own writes.
fn load<B: KvBackend>(
    backend: &B,
    overlay: &BTreeMap<Vec<u8>, Option<Record>>,
    key: &[u8],
) -> Result<Option<Record>> {
    if let Some(pending) = overlay.get(key) {
        return Ok(pending.clone());
    }
    match backend.get(&data_key(key))? {
        Some(bytes) => Record::decode(key, &bytes).map(Some),
        None => Ok(None),
    }
}

/// Notes the lease `key` had before the transaction touched it.
fn remember_lease<B: KvBackend>(
    backend: &B,
    old_leases: &mut HashMap<Vec<u8>, Option<LeaseId>>,
    key: &[u8],
) -> Result<()> {
    if !old_leases.contains_key(key) {
        let before = load(backend, &BTreeMap::new(), key)?.and_then(|r| r.lease);
        old_leases.insert(key.to_vec(), before);
    }
    Ok(())
}

/// Keys under `prefix` that exist, counting the transaction's own writes.
fn live_keys<B: KvBackend>(
    backend: &B,
    overlay: &BTreeMap<Vec<u8>, Option<Record>>,
    prefix: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let mut keys: BTreeSet<Vec<u8>> = backend
        .scan_prefix(&data_key(prefix))?
        .into_iter()
        .map(|(k, _)| k[1..].to_vec())
        .collect();
    for (key, record) in overlay.range(prefix.to_vec()..) {
        if !key.starts_with(prefix) {
            break;
        }
        if record.is_some() {
            keys.insert(key.clone());
        } else {
            keys.remove(key);
        }
    }
    Ok(keys.into_iter().collect())
}

/// Sends each event to the watchers whose prefix matches, dropping watchers
/// whose stream is gone.
fn notify(watchers: &mut Vec<Watcher>, events: &[WatchEvent]) {
    watchers.retain(|watcher| {
        for event in events {
            if event.kv.key.starts_with(&watcher.prefix)
                && watcher.tx.send(Ok(event.clone())).is_err()
            {
                return false;
            }
        }
        !watcher.tx.is_closed()
    });
}

#[async_trait]
impl<B: KvBackend> MetadataStore for LocalMetadata<B> {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        let state = self.lock_open().await?;
        let backend = state.backend.as_ref().ok_or_else(|| self.inner.closed())?;
        Ok(load(backend, &BTreeMap::new(), key)?.map(|r| r.to_kv(key)))
    }

    async fn range(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let state = self.lock_open().await?;
        let backend = state.backend.as_ref().ok_or_else(|| self.inner.closed())?;
        backend
            .scan_prefix(&data_key(prefix))?
            .into_iter()
            .map(|(stored_key, bytes)| {
                let key = &stored_key[1..];
                Record::decode(key, &bytes).map(|r| r.to_kv(key))
            })
            .collect()
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: Option<LeaseId>) -> Result<i64> {
        let mut state = self.lock_open().await?;
        let txn = Txn::new().and_then([TxnOp::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
        }]);
        Ok(self.inner.execute(&mut state, txn).await?.revision)
    }

    async fn delete(&self, key: &[u8]) -> Result<bool> {
        let mut state = self.lock_open().await?;
        let txn = Txn::new().and_then([TxnOp::delete(key)]);
        let response = self.inner.execute(&mut state, txn).await?;
        Ok(response.responses.first() == Some(&TxnOpResponse::Delete(1)))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let mut state = self.lock_open().await?;
        self.inner.execute(&mut state, txn).await
    }

    async fn watch(&self, prefix: &[u8]) -> Result<WatchStream> {
        let mut state = self.lock_open().await?;
        // Registering under the lock: the watch sees exactly the writes that
        // commit after this call returns.
        let (tx, mut rx) = mpsc::unbounded_channel();
        state.watchers.retain(|w| !w.tx.is_closed());
        state.watchers.push(Watcher {
            prefix: prefix.to_vec(),
            tx,
        });
        Ok(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(Error::InvalidArgument("lease TTL must be positive".into()));
        }
        let nanos = ttl_nanos(ttl)?;
        let mut state = self.lock_open().await?;
        let id = LeaseId(state.next_lease);
        let next = id.0.checked_add(1).ok_or_else(|| {
            Error::Other(format!(
                "metadata store {}: lease ids exhausted",
                self.inner.name
            ))
        })?;
        let batch = vec![
            (lease_key(id), Some(nanos.to_be_bytes().to_vec())),
            (META_NEXT_LEASE.to_vec(), Some(next.to_be_bytes().to_vec())),
        ];
        // Granting does not change any key, so it does not bump the revision.
        let flushed = self.inner.commit(&mut state, batch, None, &[]).await?;
        state.next_lease = next;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: deadline_after(ttl)?,
                keys: BTreeSet::new(),
            },
        );
        flushed?;
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let mut state = self.lock_open().await?;
        let entry = state
            .leases
            .get_mut(&lease)
            .ok_or(Error::LeaseNotFound(lease.0))?;
        entry.deadline = deadline_after(entry.ttl)?;
        Ok(entry.ttl)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let mut state = self.lock_open().await?;
        self.inner.end_lease(&mut state, lease).await
    }

    async fn revision(&self) -> Result<i64> {
        Ok(self.lock_open().await?.revision)
    }

    async fn close(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        let Some(backend) = state.backend.take() else {
            return Ok(());
        };
        let flushed = backend.flush().await;
        // Releasing the backend frees its files (for sled, the directory
        // lock), so the same path can be opened again.
        backend.release().await;
        state.leases.clear();
        let closed = self.inner.closed();
        for watcher in state.watchers.drain(..) {
            let _ = watcher.tx.send(Err(closed.clone()));
        }
        if let Some(task) = self
            .inner
            .expiry_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
        flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::MemoryBackend;

    fn record() -> Record {
        Record {
            value: b"value".to_vec(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            lease: Some(LeaseId(9)),
        }
    }

    #[test]
    fn record_round_trips() {
        let r = record();
        assert_eq!(Record::decode(b"k", &r.encode()).unwrap(), r);
        let plain = Record {
            lease: None,
            value: Vec::new(),
            ..record()
        };
        assert_eq!(Record::decode(b"k", &plain.encode()).unwrap(), plain);
    }

    #[test]
    fn damaged_records_are_corrupt_not_panics() {
        let good = record().encode();
        let mut wrong_format = good.clone();
        wrong_format[0] = 99;
        let mut bad_revisions = good.clone();
        bad_revisions[1..9].copy_from_slice(&0i64.to_be_bytes());
        for bytes in [
            Vec::new(),
            good[..RECORD_HEADER - 1].to_vec(),
            wrong_format,
            bad_revisions,
        ] {
            assert!(matches!(
                Record::decode(b"k", &bytes),
                Err(Error::Corrupt(_))
            ));
        }
    }

    #[test]
    fn loading_damaged_data_is_corrupt() {
        let cases: Vec<Batch> = vec![
            vec![(data_key(b"key"), Some(b"garbage".to_vec()))],
            vec![(META_REVISION.to_vec(), Some(b"1234".to_vec()))],
            vec![(lease_key(LeaseId(5)), Some(b"x".to_vec()))],
        ];
        for batch in cases {
            let mut backend = MemoryBackend::default();
            backend.apply(batch).unwrap();
            assert!(matches!(
                LocalMetadata::load(backend, "test"),
                Err(Error::Corrupt(_))
            ));
        }
    }

    #[tokio::test]
    async fn keys_of_a_vanished_lease_are_deleted_on_load() {
        let mut backend = MemoryBackend::default();
        let orphan = Record {
            lease: Some(LeaseId(42)),
            ..record()
        };
        backend
            .apply(vec![
                (data_key(b"orphan"), Some(orphan.encode())),
                (
                    data_key(b"plain"),
                    Some(
                        Record {
                            lease: None,
                            ..record()
                        }
                        .encode(),
                    ),
                ),
                (META_REVISION.to_vec(), Some(7i64.to_be_bytes().to_vec())),
            ])
            .unwrap();
        let store = LocalMetadata::load(backend, "test").unwrap();
        assert!(store.get(b"orphan").await.unwrap().is_none());
        assert!(store.get(b"plain").await.unwrap().is_some());
        assert_eq!(store.revision().await.unwrap(), 8);
    }

    #[tokio::test]
    async fn txn_ops_see_earlier_ops_of_the_same_txn() {
        let store = LocalMetadata::new_empty(MemoryBackend::default(), "test");
        let resp = store
            .txn(Txn::new().and_then([
                TxnOp::put("a", "1"),
                TxnOp::get("a"),
                TxnOp::put("a", "2"),
                TxnOp::delete_prefix("a"),
                TxnOp::get("a"),
            ]))
            .await
            .unwrap();
        assert_eq!(resp.revision, 1);
        match &resp.responses[1] {
            TxnOpResponse::Get(Some(kv)) => {
                assert_eq!((kv.value.as_slice(), kv.version), (&b"1"[..], 1))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(resp.responses[3], TxnOpResponse::Delete(1));
        assert_eq!(resp.responses[4], TxnOpResponse::Get(None));
        assert!(store.get(b"a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn moving_a_key_between_leases_rebinds_it() {
        let store = LocalMetadata::new_empty(MemoryBackend::default(), "test");
        let first = store.grant(Duration::from_secs(60)).await.unwrap();
        let second = store.grant(Duration::from_secs(60)).await.unwrap();
        store.put(b"k", b"1", Some(first)).await.unwrap();
        store.put(b"k", b"2", Some(second)).await.unwrap();
        store.revoke(first).await.unwrap();
        assert!(
            store.get(b"k").await.unwrap().is_some(),
            "revoking the old lease deleted the key"
        );
        store.put(b"k", b"3", None).await.unwrap();
        store.revoke(second).await.unwrap();
        assert!(
            store.get(b"k").await.unwrap().is_some(),
            "a put without lease did not unbind the key"
        );
    }
}
