//! [`EtcdMetadata`]: the `MetadataStore` on a real etcd v3 cluster, through
//! the `etcd-client` crate (gRPC).
//!
//! etcd implements the contract's semantics itself — one global revision,
//! per-key `create_revision`/`mod_revision`/`version`, compare-and-swap
//! transactions, prefix watches and leases — so every method is one etcd
//! request translated field by field; nothing is emulated client-side.
//!
//! # Timeouts and retries
//!
//! - Every request is bounded by [`EtcdConfig::request_timeout`]; when it
//!   passes the call fails with [`Error::Timeout`] naming the endpoints.
//!   Nothing waits forever, also while etcd is down.
//! - A request that fails because etcd cannot be reached (connection
//!   refused or reset, no leader, ...) fails with [`Error::Unavailable`]
//!   naming the endpoints. The connection is re-established by the next
//!   request, so the store works again once etcd is back.
//! - Idempotent reads (`get`, `range`, `revision`) are retried a few times
//!   with a short backoff (50 ms, doubling), all within the one request
//!   timeout. Writes are never retried: a write whose reply was lost may
//!   have been applied, and repeating it would bump the revision twice.
//!   For the same reason a write that failed with `Timeout` (or with
//!   `Unavailable` after the request was sent) may or may not have taken
//!   effect; callers that care re-read, or make the write a compare-and-swap.
//! - [`EtcdMetadata::connect`] makes one request to check the cluster
//!   answers (bounded by [`EtcdConfig::dial_timeout`]), so a wrong address
//!   fails at start-up rather than on first use.
//! - A watch whose connection breaks yields one `Err` item and ends; the
//!   caller re-reads state and watches again (the trait's contract).
//!
//! # Differences from the in-process stores worth knowing
//!
//! etcd refuses an empty key, a transaction that writes the same key twice
//! and transactions with more than `--max-txn-ops` (128 by default)
//! operations ([`Error::InvalidArgument`]); and it rounds lease TTLs up to
//! whole seconds and to its minimum (1.5 × the election timeout).

use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::{sleep, timeout, Instant};
use torus_traits::{
    Compare, CompareOp, CompareTarget, Error, EventKind, KeyValue, LeaseId, MetadataStore, Result,
    Txn, TxnOp, TxnOpResponse, TxnResponse, WatchEvent, WatchStream,
};

use etcd_client as ec;
use etcd_client::proto::{PbKeyValue, PbTxnOpResponse};

/// Keys per page of a `range`: bounds the size of one gRPC message.
const RANGE_PAGE: i64 = 1000;
/// Largest gRPC message accepted from etcd (a page of large values).
const MAX_MESSAGE: usize = 64 << 20;
/// Attempts of an idempotent read (first try included).
const READ_ATTEMPTS: u32 = 5;
/// First pause between read attempts; doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// HTTP/2 ping interval while a watch or other stream is open. etcd's
/// default `--grpc-keepalive-min-time` is 5 s; pinging more often gets the
/// connection closed.
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// Where and how to reach etcd.
///
/// Durations are written as humantime strings (`"5s"`, `"500ms"`, `"1m"`)
/// or whole seconds (`5`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client endpoints, `host:port` (or `http://host:port`; with TLS,
    /// `host:port` or `https://host:port`).
    pub endpoints: Vec<String>,
    /// How long `connect` may take to reach the cluster.
    #[serde(with = "crate::duration_text")]
    pub dial_timeout: Duration,
    /// Upper bound of every request, retries of reads included.
    #[serde(with = "crate::duration_text")]
    pub request_timeout: Duration,
    /// TLS towards etcd (server verified against `ca_file`; client
    /// certificate when `cert_file` and `key_file` are given).
    pub tls: Option<EtcdTls>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["127.0.0.1:2379".to_string()],
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// TLS files (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA certificate(s) that signed the etcd server certificates.
    pub ca_file: PathBuf,
    /// Client certificate, for etcd's `--client-cert-auth`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// A `MetadataStore` backed by etcd v3. Cheap to share: one HTTP/2
/// connection per endpoint carries every concurrent request and watch.
pub struct EtcdMetadata {
    client: ec::Client,
    /// The endpoints as given, for error messages.
    endpoints: String,
    request_timeout: Duration,
    closed: AtomicBool,
    /// Flipped by `close` so open watch streams end.
    closed_tx: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for EtcdMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMetadata")
            .field("endpoints", &self.endpoints)
            .field("request_timeout", &self.request_timeout)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl EtcdMetadata {
    /// Connect to the cluster and check that it answers.
    ///
    /// Fails with [`Error::InvalidArgument`] for a bad configuration,
    /// [`Error::Io`] for unreadable TLS files, and [`Error::Unavailable`]
    /// (naming the endpoints) when no endpoint answers within the dial
    /// timeout.
    pub async fn connect(cfg: EtcdConfig) -> Result<Self> {
        if cfg.endpoints.is_empty() {
            return Err(Error::InvalidArgument(
                "etcd: no endpoints configured".to_string(),
            ));
        }
        if cfg.dial_timeout.is_zero() || cfg.request_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "etcd: dial_timeout and request_timeout must be greater than zero".to_string(),
            ));
        }
        let endpoints = format!("[{}]", cfg.endpoints.join(", "));
        let mut options = ec::ConnectOptions::new()
            .with_connect_timeout(cfg.dial_timeout)
            // Detects a server that vanished without closing the connection
            // (host down, network cut) while a watch waits for events.
            .with_keep_alive(PING_INTERVAL, cfg.request_timeout)
            .with_keep_alive_while_idle(false)
            // A member cut off from its cluster fails requests and watches
            // at once instead of leaving them hanging.
            .with_require_leader(true);
        if let Some(tls) = &cfg.tls {
            options = options.with_tls(tls_options(tls)?);
        }

        let client = match timeout(
            cfg.dial_timeout,
            ec::Client::connect(&cfg.endpoints, Some(options)),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(unreachable(map_client_error(
                    &endpoints, "connect", e, None,
                )))
            }
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "cannot connect to etcd at {endpoints} within {:?}",
                    cfg.dial_timeout
                )))
            }
        };

        let (closed_tx, _) = tokio::sync::watch::channel(false);
        let store = EtcdMetadata {
            client,
            endpoints,
            request_timeout: cfg.request_timeout,
            closed: AtomicBool::new(false),
            closed_tx,
        };
        // One cheap read proves the cluster answers (and has a leader).
        let mut kv = store.kv();
        match timeout(cfg.dial_timeout, kv.get(vec![0u8], Some(probe_options()))).await {
            Ok(Ok(_)) => Ok(store),
            Ok(Err(e)) => Err(unreachable(map_client_error(
                &store.endpoints,
                "connect",
                e,
                None,
            ))),
            Err(_) => Err(Error::Unavailable(format!(
                "etcd at {} did not answer within {:?}",
                store.endpoints, cfg.dial_timeout
            ))),
        }
    }

    /// The endpoints this store talks to, as configured.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    fn kv(&self) -> ec::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed(format!(
                "etcd metadata store ({}) is closed",
                self.endpoints
            )))
        } else {
            Ok(())
        }
    }

    fn timed_out(&self, what: &str) -> Error {
        Error::Timeout(format!(
            "etcd at {}: {what} did not finish within {:?}",
            self.endpoints, self.request_timeout
        ))
    }

    /// One request, bounded by the request timeout, never retried.
    async fn once<T, Fut>(&self, what: &str, lease: Option<i64>, fut: Fut) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<T, ec::Error>>,
    {
        self.check_open()?;
        match timeout(self.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_client_error(&self.endpoints, what, e, lease)),
            Err(_) => Err(self.timed_out(what)),
        }
    }

    /// An idempotent read: retried on `Unavailable` with a short backoff,
    /// everything within one request timeout.
    async fn read<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.check_open()?;
        let deadline = Instant::now() + self.request_timeout;
        let mut backoff = FIRST_BACKOFF;
        let mut tries = 0;
        loop {
            tries += 1;
            let err = match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => return Err(self.timed_out(what)),
            };
            let retry = matches!(err, Error::Unavailable(_))
                && tries < READ_ATTEMPTS
                && Instant::now() + backoff < deadline;
            if !retry {
                return Err(err);
            }
            tracing::debug!(what, error = %err, "etcd read failed; retrying");
            sleep(backoff).await;
            backoff *= 2;
        }
    }

    /// `range` in pages of [`RANGE_PAGE`] keys, all read at the revision of
    /// the first page so the result is one consistent snapshot.
    async fn range_once(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let (mut start, end) = prefix_range(prefix);
        let mut kv = self.kv();
        let mut out = Vec::new();
        let mut at_revision = 0;
        loop {
            let mut options = ec::GetOptions::new()
                .with_range(end.clone())
                .with_limit(RANGE_PAGE);
            if at_revision > 0 {
                options = options.with_revision(at_revision);
            }
            let resp = kv
                .get(start.clone(), Some(options))
                .await
                .map_err(|e| map_client_error(&self.endpoints, "range", e, None))?;
            if at_revision == 0 {
                at_revision = header_revision(resp.header(), &self.endpoints, "range")?;
            }
            let more = resp.more();
            let mut page = resp.0.kvs;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            // The next page starts right after the last key of this one.
            start = last.key.clone();
            start.push(0);
            out.extend(page.drain(..).map(convert_kv));
            if !more {
                return Ok(out);
            }
        }
    }
}

#[async_trait::async_trait]
impl MetadataStore for EtcdMetadata {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        let kv = self.kv();
        self.read("get", || {
            let mut kv = kv.clone();
            let key = key.to_vec();
            async move {
                let resp = kv
                    .get(key, None)
                    .await
                    .map_err(|e| map_client_error(&self.endpoints, "get", e, None))?;
                Ok(resp.0.kvs.into_iter().next().map(convert_kv))
            }
        })
        .await
    }

    async fn range(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        self.read("range", || self.range_once(prefix)).await
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: Option<LeaseId>) -> Result<i64> {
        let mut kv = self.kv();
        let options = ec::PutOptions::new().with_lease(lease.map_or(0, |l| l.0));
        let resp = self
            .once("put", lease.map(|l| l.0), kv.put(key, value, Some(options)))
            .await?;
        header_revision(resp.header(), &self.endpoints, "put")
    }

    async fn delete(&self, key: &[u8]) -> Result<bool> {
        let mut kv = self.kv();
        let resp = self.once("delete", None, kv.delete(key, None)).await?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        // etcd's "lease not found" does not say which lease; report the
        // first one the transaction uses.
        let lease = txn
            .success
            .iter()
            .chain(txn.failure.iter())
            .find_map(|op| match op {
                TxnOp::Put { lease: Some(l), .. } => Some(l.0),
                _ => None,
            });
        let request = ec::Txn::new()
            .when(txn.compares.iter().map(convert_compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(convert_op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(convert_op).collect::<Vec<_>>());
        let mut kv = self.kv();
        let resp = self.once("txn", lease, kv.txn(request)).await?;
        let revision = header_revision(resp.header(), &self.endpoints, "txn")?;
        let raw = resp.0;
        let mut responses = Vec::with_capacity(raw.responses.len());
        for op in raw.responses {
            responses.push(match op.response {
                Some(PbTxnOpResponse::ResponsePut(_)) => TxnOpResponse::Put,
                Some(PbTxnOpResponse::ResponseDeleteRange(d)) => {
                    TxnOpResponse::Delete(u64::try_from(d.deleted).unwrap_or(0))
                }
                Some(PbTxnOpResponse::ResponseRange(r)) => {
                    TxnOpResponse::Get(r.kvs.into_iter().next().map(convert_kv))
                }
                Some(PbTxnOpResponse::ResponseTxn(_)) | None => {
                    return Err(Error::Other(format!(
                        "etcd at {}: txn returned an unexpected operation response",
                        self.endpoints
                    )))
                }
            });
        }
        Ok(TxnResponse {
            succeeded: raw.succeeded,
            revision,
            responses,
        })
    }

    async fn watch(&self, prefix: &[u8]) -> Result<WatchStream> {
        let mut client = self.client.watch_client();
        // No start revision: etcd starts the watch at its current revision
        // + 1 when it registers it, and the `created` reply comes after
        // registration, so every write acknowledged after this returns is
        // delivered and nothing earlier is.
        let (prefix, end) = prefix_range(prefix);
        let options = ec::WatchOptions::new().with_range(end);
        let endpoints = self.endpoints.clone();
        let watch = self
            .once("watch", None, async move {
                let mut watch = client.watch(prefix, Some(options)).await?;
                let first = watch.message().await?;
                Ok((watch, first))
            })
            .await
            .map(|(watch, first)| match first {
                Some(resp) if resp.created() && !resp.canceled() => Ok(watch),
                Some(resp) => Err(Error::Other(format!(
                    "etcd at {endpoints} refused the watch: {}",
                    resp.cancel_reason()
                ))),
                None => Err(Error::Unavailable(format!(
                    "etcd at {endpoints} closed the watch before creating it"
                ))),
            })??;

        let state = WatchState {
            watch: Some(watch),
            pending: VecDeque::new(),
            endpoints: self.endpoints.clone(),
            closed: self.closed_tx.subscribe(),
        };
        Ok(stream::unfold(state, next_watch_item).boxed())
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd counts whole seconds: round up, at least 1.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        let mut lease = self.client.lease_client();
        let resp = self.once("grant", None, lease.grant(secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(Error::Other(format!(
                "etcd at {}: grant failed: {}",
                self.endpoints,
                resp.error()
            )));
        }
        if resp.id() == 0 {
            return Err(Error::Other(format!(
                "etcd at {}: grant returned lease id 0",
                self.endpoints
            )));
        }
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let mut client = self.client.lease_client();
        let ttl = self
            .once("keep_alive", Some(lease.0), async move {
                // The crate's `keep_alive` sends one keep-alive and checks
                // the lease exists (an unknown or expired lease answers TTL
                // 0), but drops the reply; one more on the same stream
                // reports the TTL.
                let (mut keeper, mut replies) = client.keep_alive(lease.0).await?;
                keeper.keep_alive().await?;
                match replies.message().await? {
                    Some(reply) => Ok(reply.ttl()),
                    None => Err(ec::Error::LeaseKeepAliveError(
                        "keep-alive stream ended without a reply".to_string(),
                    )),
                }
            })
            .await?;
        if ttl <= 0 {
            return Err(Error::LeaseNotFound(lease.0));
        }
        Ok(Duration::from_secs(ttl.unsigned_abs()))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let mut client = self.client.lease_client();
        self.once("revoke", Some(lease.0), client.revoke(lease.0))
            .await?;
        Ok(())
    }

    async fn revision(&self) -> Result<i64> {
        let kv = self.kv();
        self.read("revision", || {
            let mut kv = kv.clone();
            async move {
                let resp = kv
                    .get(vec![0u8], Some(probe_options()))
                    .await
                    .map_err(|e| map_client_error(&self.endpoints, "revision", e, None))?;
                header_revision(resp.header(), &self.endpoints, "revision")
            }
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        // etcd made every acknowledged write durable before answering;
        // closing only stops this handle and its watches.
        self.closed.store(true, Ordering::Release);
        self.closed_tx.send_replace(true);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Watch stream
// ---------------------------------------------------------------------------

struct WatchState {
    /// `None` once the stream has ended (after its last item).
    watch: Option<ec::WatchStream>,
    pending: VecDeque<WatchEvent>,
    endpoints: String,
    closed: tokio::sync::watch::Receiver<bool>,
}

/// The next item of a watch: buffered events first, then the next etcd
/// reply. A break (error, cancel, end of stream, close) yields one `Err`
/// and then ends the stream.
async fn next_watch_item(mut st: WatchState) -> Option<(Result<WatchEvent>, WatchState)> {
    loop {
        if let Some(event) = st.pending.pop_front() {
            return Some((Ok(event), st));
        }
        let watch = st.watch.as_mut()?;
        // Only an explicit `close` ends the watch; a dropped store handle
        // (the sender gone) leaves it running on its own connection.
        let closed = async {
            if st.closed.wait_for(|closed| *closed).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let reply = tokio::select! {
            biased;
            _ = closed => None,
            reply = watch.message() => Some(reply),
        };
        let Some(reply) = reply else {
            st.watch = None;
            let e = Error::Closed(format!("etcd metadata store ({}) is closed", st.endpoints));
            return Some((Err(e), st));
        };
        let failure = match reply {
            Ok(Some(resp)) if resp.canceled() => {
                let reason = if resp.compact_revision() > 0 {
                    format!("history compacted at revision {}", resp.compact_revision())
                } else {
                    resp.cancel_reason().to_string()
                };
                Error::Unavailable(format!(
                    "etcd at {} canceled the watch: {reason}",
                    st.endpoints
                ))
            }
            Ok(Some(resp)) => {
                let mut failure = None;
                for event in resp.0.events {
                    let kind = match event.r#type {
                        0 => EventKind::Put,
                        1 => EventKind::Delete,
                        other => {
                            failure = Some(Error::Other(format!(
                                "etcd at {} sent a watch event of unknown type {other}",
                                st.endpoints
                            )));
                            break;
                        }
                    };
                    let Some(kv) = event.kv else {
                        failure = Some(Error::Other(format!(
                            "etcd at {} sent a watch event without a key",
                            st.endpoints
                        )));
                        break;
                    };
                    st.pending.push_back(WatchEvent {
                        kind,
                        kv: convert_kv(kv),
                    });
                }
                match failure {
                    // Deliver what came before the bad event, then the error.
                    Some(e) => {
                        st.watch = None;
                        st.pending.clear();
                        return Some((Err(e), st));
                    }
                    // Progress notifications carry no events: read on.
                    None => continue,
                }
            }
            Ok(None) => {
                Error::Unavailable(format!("etcd at {}: the watch stream ended", st.endpoints))
            }
            Err(e) => map_client_error(&st.endpoints, "watch", e, None),
        };
        st.watch = None;
        let failure = match failure {
            Error::Unavailable(m) => Error::Unavailable(format!("watch broke: {m}")),
            other => other,
        };
        return Some((Err(failure), st));
    }
}

// ---------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------

fn convert_kv(kv: PbKeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: (kv.lease != 0).then_some(LeaseId(kv.lease)),
    }
}

fn convert_compare(c: &Compare) -> ec::Compare {
    let op = match c.op {
        CompareOp::Equal => ec::CompareOp::Equal,
        CompareOp::NotEqual => ec::CompareOp::NotEqual,
        CompareOp::Greater => ec::CompareOp::Greater,
        CompareOp::Less => ec::CompareOp::Less,
    };
    let key = c.key.clone();
    match &c.target {
        CompareTarget::Value(v) => ec::Compare::value(key, op, v.clone()),
        CompareTarget::CreateRevision(r) => ec::Compare::create_revision(key, op, *r),
        CompareTarget::ModRevision(r) => ec::Compare::mod_revision(key, op, *r),
        CompareTarget::Version(v) => ec::Compare::version(key, op, *v),
    }
}

fn convert_op(op: &TxnOp) -> ec::TxnOp {
    match op {
        TxnOp::Put { key, value, lease } => {
            let options = ec::PutOptions::new().with_lease(lease.map_or(0, |l| l.0));
            ec::TxnOp::put(key.clone(), value.clone(), Some(options))
        }
        TxnOp::Delete { key } => ec::TxnOp::delete(key.clone(), None),
        TxnOp::DeletePrefix { prefix } => {
            let (start, end) = prefix_range(prefix);
            ec::TxnOp::delete(start, Some(ec::DeleteOptions::new().with_range(end)))
        }
        TxnOp::Get { key } => ec::TxnOp::get(key.clone(), None),
    }
}

/// `[start, end)` of every key starting with `prefix`, in etcd's encoding:
/// the prefix with its last byte below 0xff incremented (later bytes
/// dropped); `end = "\0"` means "no upper bound" (a prefix of only 0xff
/// bytes, or the empty prefix, which etcd spells as start `"\0"`).
fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    let end = match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    };
    (prefix.to_vec(), end)
}

/// A failure of `connect` as `Unavailable` ("cannot reach etcd: ..."),
/// except configuration errors, which stay what they are.
fn unreachable(e: Error) -> Error {
    match e {
        Error::Unavailable(m)
        | Error::Timeout(m)
        | Error::Other(m)
        | Error::NotFound(m)
        | Error::Closed(m) => Error::Unavailable(format!("cannot reach etcd: {m}")),
        other => other,
    }
}

/// A read that returns no keys, only the header with the revision.
fn probe_options() -> ec::GetOptions {
    ec::GetOptions::new().with_count_only()
}

fn header_revision(
    header: Option<&ec::ResponseHeader>,
    endpoints: &str,
    what: &str,
) -> Result<i64> {
    header.map(|h| h.revision()).ok_or_else(|| {
        Error::Other(format!(
            "etcd at {endpoints}: {what} reply carries no header"
        ))
    })
}

/// gRPC status codes (numbering fixed by the gRPC spec; `tonic::Code`'s
/// discriminants), so this crate need not depend on tonic itself.
mod grpc_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

/// An `etcd-client` error as a Torus error naming the endpoints. `lease` is
/// the lease the request used, reported by `LeaseNotFound`.
fn map_client_error(endpoints: &str, what: &str, e: ec::Error, lease: Option<i64>) -> Error {
    use grpc_code::*;
    let lease_not_found = || Error::LeaseNotFound(lease.unwrap_or(0));
    match e {
        ec::Error::GRpcStatus(status) => {
            let message = status.message();
            if message.contains("requested lease not found") {
                return lease_not_found();
            }
            // A paged `range` whose snapshot was compacted away between
            // pages: transient, a retry reads a fresh snapshot.
            let compacted = message.contains("required revision has been compacted");
            let code = status.code();
            // Transport failures keep the useful part ("connection
            // refused") in the source chain.
            let detail = message_chain(message.to_string(), std::error::Error::source(&status));
            let text = format!("etcd at {endpoints}: {what}: {detail}");
            match code as i32 {
                UNAVAILABLE | CANCELLED | UNKNOWN | ABORTED | RESOURCE_EXHAUSTED | INTERNAL => {
                    Error::Unavailable(text)
                }
                _ if compacted => Error::Unavailable(text),
                DEADLINE_EXCEEDED => Error::Timeout(text),
                INVALID_ARGUMENT | OUT_OF_RANGE => Error::InvalidArgument(text),
                NOT_FOUND => Error::NotFound(text),
                _ => Error::Other(format!("{text} ({code:?})")),
            }
        }
        ec::Error::LeaseKeepAliveError(m) if m.contains("lease not found") => lease_not_found(),
        ec::Error::TransportError(e) => Error::Unavailable(format!(
            "etcd at {endpoints} is unreachable: {what}: {}",
            message_chain(e.to_string(), std::error::Error::source(&e))
        )),
        ec::Error::IoError(e) => {
            Error::Unavailable(format!("etcd at {endpoints} is unreachable: {what}: {e}"))
        }
        ec::Error::LeaseKeepAliveError(m) | ec::Error::WatchError(m) => {
            Error::Unavailable(format!("etcd at {endpoints}: {what}: {m}"))
        }
        e @ (ec::Error::InvalidArgs(_) | ec::Error::InvalidUri(_)) => {
            Error::InvalidArgument(format!("etcd at {endpoints}: {what}: {e}"))
        }
        other => Error::Other(format!("etcd at {endpoints}: {what}: {other}")),
    }
}

/// `first: source: source...`, each distinct message once (tonic's
/// transport errors hide the useful part, such as "connection refused",
/// deep in the source chain, between repeats of the same words).
fn message_chain(first: String, mut source: Option<&dyn std::error::Error>) -> String {
    let mut parts = vec![first];
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.contains(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// The crate's TLS options from the configured PEM files.
fn tls_options(tls: &EtcdTls) -> Result<ec::TlsOptions> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path)
            .map_err(|e| Error::io(format!("reading the etcd TLS {what} {}", path.display()), e))
    };
    let ca = read(&tls.ca_file, "CA certificate")?;
    let mut options = ec::TlsOptions::new().ca_certificate(ec::Certificate::from_pem(ca));
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let identity =
                ec::Identity::from_pem(read(cert, "certificate")?, read(key, "private key")?);
            options = options.identity(identity);
        }
        (None, None) => {}
        _ => {
            return Err(Error::InvalidArgument(
                "etcd TLS: cert_file and key_file must be given together".to_string(),
            ))
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_carries_over_0xff() {
        assert_eq!(prefix_range(b"a/b"), (b"a/b".to_vec(), b"a/c".to_vec()));
        assert_eq!(prefix_range(b"a\xff"), (b"a\xff".to_vec(), b"b".to_vec()));
        assert_eq!(prefix_range(b"\xff\xff"), (b"\xff\xff".to_vec(), vec![0]));
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
    }

    #[test]
    fn config_defaults_and_durations() {
        let c = EtcdConfig::default();
        assert_eq!(c.endpoints, vec!["127.0.0.1:2379".to_string()]);
        assert_eq!(c.dial_timeout, Duration::from_secs(5));
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        let c: EtcdConfig = serde_json::from_str(
            r#"{"endpoints":["a:1","b:2"],"dial_timeout":"500ms","request_timeout":3}"#,
        )
        .unwrap();
        assert_eq!(c.dial_timeout, Duration::from_millis(500));
        assert_eq!(c.request_timeout, Duration::from_secs(3));
        assert!(c.tls.is_none());
        let e = serde_json::from_str::<EtcdConfig>(r#"{"endpoint":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = serde_json::from_str::<EtcdConfig>(r#"{"dial_timeout":"soon"}"#).unwrap_err();
        assert!(e.to_string().contains("bad duration"), "{e}");
        let c: EtcdConfig = serde_json::from_str(r#"{"tls":{"ca_file":"/ca.pem"}}"#).unwrap();
        assert_eq!(c.tls.unwrap().ca_file, PathBuf::from("/ca.pem"));
    }
}
