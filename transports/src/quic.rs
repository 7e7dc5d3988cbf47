//! QUIC transport: the peer protocol over quinn, TLS 1.3 with mutual
//! authentication always on (QUIC has no plaintext mode).
//!
//! **Shape.** One QUIC connection per pair of peers (per remote address on
//! the client side), carrying a few long-lived bidirectional streams, the
//! *lanes* ([`QuicOptions::lanes`]). Each lane is run exactly like one TCP
//! peer connection, by the same code (`crate::tcp`): the TRSP handshake,
//! then multiplexed request frames matched to replies by id, one writer per
//! side that batches frames. A lane's writer hands quinn large payloads in
//! their own buffers (`LaneSink`), so they are not copied into the stream:
//! one copy less per byte than writing through `AsyncWrite` (the primary's
//! CPU per GB of 1 MiB writes at replication 3 fell by about 14 %); quinn
//! holds such a buffer until the peer acknowledges it. At most
//! `max_in_flight` requests run per connection, shared by its lanes (a
//! lane with none free is not read: the back-pressure on a sender). Calls
//! spread over the lanes.
//!
//! Why lanes and not one stream per request (the first design): a stream
//! per request paid for opening, finishing and acknowledging a stream, and
//! one `sendmsg` per reply, on every call; profiles of a replica put about
//! two-thirds of its CPU time per 4 KiB write in quinn. On lanes, replies
//! that finish together leave in one stream write and share packets, as
//! they share segments on TCP. Head-of-line blocking is bounded by the lane
//! count: a lost packet delays only the calls of its lane.
//!
//! **Security.** Every incoming connection must present a certificate signed
//! by the cluster CA ([`PeerTls`]); one that does not is refused during the
//! QUIC handshake, before any stream is accepted, and logged with the peer's
//! address. Each new connection takes the current certificates, so a reload
//! applies to new connections while open ones keep running. The ALPN
//! protocol id ([`ALPN`], QUIC's own) and the TRSP handshake on every lane
//! agree on the protocol version.
//!
//! **Failures.** A broken connection or lane fails every call on it with
//! `Unavailable`; a broken lane closes its connection at once, the link is
//! dropped from the cache, and the next call dials anew. Bytes on a lane
//! that are not the protocol close that QUIC connection (all its lanes)
//! with a warning naming the peer.

use crate::tcp::{self, ClientConn, FrameSink, TcpOptions};
use crate::tls::PeerTls;
use crate::wire::{self, Encoded};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, VarInt};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use torus_traits::{
    Error, PeerHandler, PeerListener, PeerRequest, PeerResponse, PeerTransport, Result,
};
use tracing::{debug, warn};

/// Settings of a [`QuicTransport`].
#[derive(Debug, Clone)]
pub struct QuicOptions {
    /// Certificates for mutual TLS; mandatory for QUIC.
    pub tls: Arc<PeerTls>,
    /// How long to wait for a connection (QUIC and TLS handshakes) to open.
    pub connect_timeout: Duration,
    /// How long a call waits for its reply once a connection is open.
    pub request_timeout: Duration,
    /// Largest frame (length-prefix value) either side sends or accepts.
    pub max_frame: u32,
    /// Requests one peer may have running at once on a connection (over
    /// all its lanes).
    pub max_in_flight: u32,
    /// Streams each connection carries calls on (see the module docs), at
    /// most [`MAX_LANES`].
    pub lanes: usize,
    /// A connection with no traffic (keep-alives included) for this long is closed.
    pub idle_timeout: Duration,
}

/// Receive and send buffer asked for on every QUIC socket (the kernel caps
/// it at `net.core.rmem_max`/`wmem_max`). The default (~208 KiB) overflowed
/// during 1 MiB writes: every datagram dropped is a loss to QUIC, answered
/// with a retransmission and a smaller congestion window.
const UDP_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` with `UDP_BUFFER`-sized buffers; `dual`
/// lets an IPv6 socket reach IPv4 peers too (as quinn's own client does).
fn udp_socket(addr: SocketAddr, dual: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if dual && addr.is_ipv6() {
        if let Err(e) = s.set_only_v6(false) {
            debug!("QUIC socket stays IPv6-only: {e}");
        }
    }
    // Best effort: a smaller buffer still works, only with more losses.
    if let Err(e) = s.set_recv_buffer_size(UDP_BUFFER) {
        debug!("QUIC socket receive buffer: {e}");
    }
    if let Err(e) = s.set_send_buffer_size(UDP_BUFFER) {
        debug!("QUIC socket send buffer: {e}");
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Largest UDP payload this node sends or accepts, and the upper bound of
/// quinn's path MTU discovery (its defaults stop at 1452/1472 bytes).
///
/// Why raise it: below it, every 4 KiB request is three datagrams, each
/// built, encrypted, sent, received and acknowledged on its own; with it, a
/// 4 KiB request is one datagram wherever the path carries it (loopback,
/// jumbo frames). Discovery still finds the real path MTU (probes too big
/// for the interface fail locally and are simply lost), so on a 1500-byte
/// network nothing changes. Why this value: a GSO batch is one `sendmsg`
/// and must fit in one IP datagram (at most 65,507 bytes of UDP payload),
/// and quinn builds batches of up to ten packets of the current MTU; a
/// batch over the limit fails with `EMSGSIZE`, which quinn-udp drops
/// silently (it expects that only from MTU probes). With a 16 KiB bound,
/// those silent drops looked like an MTU black hole under load and sent
/// the MTU back to 1200. [`GsoCapped`] keeps batches within the limit.
const MAX_UDP_PAYLOAD: u16 = 6_500;

/// Packets of [`MAX_UDP_PAYLOAD`] bytes that fit in one `sendmsg`: 65,507
/// bytes of UDP payload at most (IPv4's limit; IPv6's is 20 bytes more).
const MAX_GSO_SEGMENTS: usize = 65_507 / MAX_UDP_PAYLOAD as usize;

/// A quinn endpoint on a [`udp_socket`]: a server's when `server` is given,
/// else a client-only one.
fn bind_endpoint(
    addr: SocketAddr,
    dual: bool,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<Endpoint> {
    use quinn::Runtime;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(format!("QUIC payload size: {e}")))?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = runtime.wrap_udp_socket(udp_socket(addr, dual)?)?;
    Endpoint::new_with_abstract_socket(config, server, Arc::new(GsoCapped(socket)), runtime)
}

/// quinn's UDP socket with its GSO batches capped at [`MAX_GSO_SEGMENTS`]
/// packets, so a batch of packets of [`MAX_UDP_PAYLOAD`] bytes still fits
/// in one datagram (see there). Everything else is the inner socket's.
#[derive(Debug)]
struct GsoCapped(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for GsoCapped {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments().min(MAX_GSO_SEGMENTS)
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

/// The ALPN protocol id of the peer protocol over QUIC. Version 1 ran a
/// stream per request; 2 runs lanes. Nodes of the two cannot talk, and the
/// id makes that a clear TLS handshake failure (no common application
/// protocol, logged by both) rather than a stream neither side can read.
/// TCP+TLS keeps [`crate::tls::ALPN`]: its protocol did not change.
pub const ALPN: &[u8] = b"torus-quic/2";

/// Lanes per connection by default (see the module docs).
pub const DEFAULT_LANES: usize = 2;
/// Most lanes one connection may carry: the stream limit each side grants.
pub const MAX_LANES: usize = 8;

impl QuicOptions {
    pub fn new(tls: Arc<PeerTls>) -> Self {
        QuicOptions {
            tls,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_frame: wire::DEFAULT_MAX_FRAME,
            max_in_flight: 256,
            lanes: DEFAULT_LANES,
            idle_timeout: Duration::from_secs(30),
        }
    }

    /// The lanes to open: `lanes` brought into `1..=MAX_LANES`.
    fn lane_count(&self) -> usize {
        self.lanes.clamp(1, MAX_LANES)
    }

    /// What every lane runs with: the TCP connection code's settings.
    fn lane_options(&self) -> Arc<TcpOptions> {
        Arc::new(
            TcpOptions {
                connect_timeout: self.connect_timeout,
                handshake_timeout: self.connect_timeout,
                request_timeout: self.request_timeout,
                max_frame: self.max_frame,
                max_in_flight: self.max_in_flight as usize,
                connections_per_peer: 1,
                cluster: None,
                peer_id: None,
                tls: None,
            }
            .normalized(),
        )
    }

    /// quinn's settings; `server`: for accepting connections (only a
    /// server lets its peer open streams: the lanes).
    fn transport_config(&self, server: bool) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        let lanes = if server { MAX_LANES as u32 } else { 0 };
        t.max_concurrent_bidi_streams(VarInt::from_u32(lanes));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        // Chunk-sized payloads: let a stream and the connection carry several
        // MiB in flight, so one round trip does not cap throughput.
        t.stream_receive_window(VarInt::from_u32(16 << 20));
        t.receive_window(VarInt::from_u32(64 << 20));
        t.send_window(64 << 20);
        t.keep_alive_interval(Some(self.idle_timeout / 3));
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(MAX_UDP_PAYLOAD);
        t.mtu_discovery_config(Some(mtu));
        if let Ok(idle) = quinn::IdleTimeout::try_from(self.idle_timeout) {
            t.max_idle_timeout(Some(idle));
        }
        Arc::new(t)
    }

    fn client_config(&self) -> Result<quinn::ClientConfig> {
        let mut tls = (*self.tls.client_config()).clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(Arc::new(tls))
            .map_err(|e| Error::InvalidArgument(format!("peer TLS for QUIC: {e}")))?;
        let mut c = quinn::ClientConfig::new(Arc::new(crypto));
        c.transport_config(self.transport_config(false));
        Ok(c)
    }

    fn server_config(&self) -> Result<Arc<quinn::ServerConfig>> {
        let mut tls = (*self.tls.server_config()).clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(Arc::new(tls))
            .map_err(|e| Error::InvalidArgument(format!("peer TLS for QUIC: {e}")))?;
        let mut s = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        s.transport_config(self.transport_config(true));
        Ok(Arc::new(s))
    }
}

/// A [`PeerTransport`] over QUIC. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct QuicTransport {
    inner: Arc<Inner>,
}

struct Inner {
    opts: QuicOptions,
    /// What each lane runs with (from `opts`).
    lane_opts: Arc<TcpOptions>,
    /// Client endpoints (one UDP socket each), by address family (`true` = IPv4).
    endpoints: Mutex<HashMap<bool, Endpoint>>,
    peers: Mutex<HashMap<String, Arc<Slot>>>,
}

/// The connection to one remote address.
#[derive(Default)]
struct Slot {
    link: Mutex<Option<Arc<Link>>>,
    /// Held while dialling, so concurrent callers share one attempt.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    /// The open link, if any; a broken one is dropped (and closed).
    fn open(&self) -> Option<Arc<Link>> {
        let mut l = lock(&self.link);
        if l.as_ref().is_some_and(|l| l.is_broken()) {
            *l = None;
        }
        l.clone()
    }
}

/// An open QUIC connection to a peer and its lanes.
struct Link {
    conn: Connection,
    lanes: Vec<ClientConn>,
    next: AtomicUsize,
}

impl Link {
    fn is_broken(&self) -> bool {
        self.conn.close_reason().is_some() || self.lanes.iter().any(ClientConn::is_closed)
    }

    /// The lane for the next call (round robin).
    fn lane(&self) -> &ClientConn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        &self.lanes[i]
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Before the lanes' tasks are aborted (fields drop after this), so
        // the peer sees the connection close rather than a lane cut off in
        // the middle of a frame, which it would log as a protocol error.
        self.conn.close(VarInt::from_u32(0), b"closed");
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot resolve peer address {addr}: {e}")))?
        .next()
        .ok_or_else(|| Error::Unavailable(format!("peer address {addr} resolves to nothing")))
}

impl QuicTransport {
    pub fn new(opts: QuicOptions) -> Self {
        QuicTransport {
            inner: Arc::new(Inner {
                lane_opts: opts.lane_options(),
                opts,
                endpoints: Mutex::new(HashMap::new()),
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Like [`PeerTransport::listen`], returning the concrete listener.
    pub async fn bind(
        &self,
        addr: &str,
        handler: Arc<dyn PeerHandler>,
    ) -> Result<QuicPeerListener> {
        let sock = resolve(addr).await.map_err(|_| {
            Error::InvalidArgument(format!("{addr:?} is not an address to listen on"))
        })?;
        let server_config = (*self.inner.opts.server_config()?).clone();
        let endpoint = bind_endpoint(sock, false, Some(server_config)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                Error::AlreadyExists(format!("address {addr} is in use"))
            } else {
                Error::io(format!("binding QUIC peer listener to {addr}"), e)
            }
        })?;
        let local = endpoint
            .local_addr()
            .map_err(|e| Error::io(format!("reading the address bound for {addr}"), e))?;
        let task = tokio::spawn(accept_loop(
            endpoint.clone(),
            handler,
            self.inner.opts.clone(),
            self.inner.lane_opts.clone(),
        ));
        debug!(%local, "QUIC peer listener started");
        Ok(QuicPeerListener {
            local,
            endpoint,
            task,
        })
    }

    fn endpoint(&self, v4: bool) -> Result<Endpoint> {
        let mut eps = lock(&self.inner.endpoints);
        if let Some(e) = eps.get(&v4) {
            return Ok(e.clone());
        }
        let any: SocketAddr = if v4 {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let e = bind_endpoint(any, true, None)
            .map_err(|e| Error::io("opening a UDP socket for QUIC peers", e))?;
        eps.insert(v4, e.clone());
        Ok(e)
    }

    /// Statistics of the open connection to `addr` (path MTU, datagrams,
    /// losses), for diagnostics; `None` when there is none.
    pub fn stats(&self, addr: &str) -> Option<quinn::ConnectionStats> {
        let slot = lock(&self.inner.peers).get(addr).cloned()?;
        slot.open().map(|l| l.conn.stats())
    }

    /// The open link to `addr`, or a new one.
    async fn link(&self, addr: &str) -> Result<Arc<Link>> {
        let slot = lock(&self.inner.peers)
            .entry(addr.to_string())
            .or_default()
            .clone();
        if let Some(l) = slot.open() {
            return Ok(l);
        }
        let _dialling = slot.connecting.lock().await;
        if let Some(l) = slot.open() {
            return Ok(l);
        }
        let opts = &self.inner.opts;
        // Boxed, as in `tcp`: so that every call's future stays small.
        let link = crate::bounded(
            opts.connect_timeout,
            Box::pin(self.dial(addr)),
            || format!("cannot connect to peer at {addr}"),
            || format!("connecting to peer at {addr}"),
        )
        .await?;
        let link = Arc::new(link);
        *lock(&slot.link) = Some(link.clone());
        Ok(link)
    }

    /// Opens a QUIC connection to `addr` and its lanes, running the peer
    /// handshake on each.
    async fn dial(&self, addr: &str) -> Result<Link> {
        let opts = &self.inner.opts;
        let remote = resolve(addr).await?;
        let endpoint = self.endpoint(remote.is_ipv4())?;
        let conn = endpoint
            .connect_with(opts.client_config()?, remote, crate::tls::PEER_SERVER_NAME)
            .map_err(|e| Error::Unavailable(format!("cannot connect to peer at {addr}: {e}")))?
            .await
            .map_err(|e| Error::Unavailable(format!("cannot connect to peer at {addr}: {e}")))?;
        let lane_opts = &self.inner.lane_opts;
        let lanes = (0..opts.lane_count()).map(|_| async {
            let (send, recv) = conn.open_bi().await.map_err(|e| {
                Error::Unavailable(format!("cannot open a stream to peer at {addr}: {e}"))
            })?;
            // A lane that breaks takes its connection down at once, so
            // no half-broken connection lingers until the next call.
            let conn = conn.clone();
            let on_broken: tcp::OnBroken =
                Box::new(move || conn.close(VarInt::from_u32(1), b"lane broken"));
            tcp::start_client::<_, LaneSink>(recv, send, addr, lane_opts, Some(on_broken)).await
        });
        let lanes = match futures::future::try_join_all(lanes).await {
            Ok(lanes) => lanes,
            Err(e) => {
                conn.close(VarInt::from_u32(0), b"handshake failed");
                return Err(e);
            }
        };
        debug!(addr, lanes = lanes.len(), "connected to peer over QUIC");
        Ok(Link {
            conn,
            lanes,
            next: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl PeerTransport for QuicTransport {
    async fn listen(
        &self,
        addr: &str,
        handler: Arc<dyn PeerHandler>,
    ) -> Result<Box<dyn PeerListener>> {
        Ok(Box::new(self.bind(addr, handler).await?))
    }

    async fn call(&self, addr: &str, request: PeerRequest) -> Result<PeerResponse> {
        let limit = self.inner.opts.request_timeout;
        let attempt = async { self.link(addr).await?.lane().call(request).await };
        match timeout(limit, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(format!(
                "no reply from peer {addr} within {limit:?}"
            ))),
        }
    }
}

/// A listening QUIC peer. Dropping it closes the endpoint and its connections.
pub struct QuicPeerListener {
    local: SocketAddr,
    endpoint: Endpoint,
    task: JoinHandle<()>,
}

impl QuicPeerListener {
    /// The bound UDP socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        self.local
    }
}

impl PeerListener for QuicPeerListener {
    fn local_addr(&self) -> String {
        self.local.to_string()
    }
}

impl Drop for QuicPeerListener {
    fn drop(&mut self) {
        self.endpoint
            .close(VarInt::from_u32(0), b"listener stopped");
        self.task.abort();
    }
}

async fn accept_loop(
    endpoint: Endpoint,
    handler: Arc<dyn PeerHandler>,
    opts: QuicOptions,
    lane_opts: Arc<TcpOptions>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                conns.spawn(accept_connection(
                    incoming,
                    handler.clone(),
                    opts.clone(),
                    lane_opts.clone(),
                ));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Completes the QUIC handshake with the current certificates, refusing a
/// peer without a certificate from the cluster CA, then serves its lanes.
async fn accept_connection(
    incoming: quinn::Incoming,
    handler: Arc<dyn PeerHandler>,
    opts: QuicOptions,
    lane_opts: Arc<TcpOptions>,
) {
    let peer = incoming.remote_address();
    let config = match opts.server_config() {
        Ok(c) => c,
        Err(e) => {
            warn!(%peer, reason = %e, "refusing peer connection: no usable certificates");
            incoming.refuse();
            return;
        }
    };
    let connecting = match incoming.accept_with(config) {
        Ok(c) => c,
        Err(e) => {
            warn!(%peer, reason = %e, "refusing peer connection");
            return;
        }
    };
    let conn = match timeout(opts.connect_timeout, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            warn!(%peer, reason = %e, "refusing peer connection: QUIC/TLS handshake failed");
            return;
        }
        Err(_) => {
            warn!(%peer, "refusing peer connection: no QUIC handshake within {:?}", opts.connect_timeout);
            return;
        }
    };
    debug!(%peer, "QUIC peer connection accepted");
    // Dropping the set (the connection ends or the listener is dropped)
    // aborts the lanes still running.
    let mut lanes = JoinSet::new();
    // `max_in_flight` bounds the requests running for the whole connection,
    // however many lanes the peer opens.
    let slots = Arc::new(Semaphore::new(lane_opts.max_in_flight));
    let reason = loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok(lane) => {
                    let (h, c, o, s) = (handler.clone(), conn.clone(), lane_opts.clone(), slots.clone());
                    lanes.spawn(serve_lane(lane, h, c, peer, o, s));
                }
                Err(e) => break e,
            },
            Some(_) = lanes.join_next(), if !lanes.is_empty() => {}
        }
    };
    debug!(%peer, %reason, "QUIC peer connection ended");
}

/// Serves one lane like a TCP peer connection. Bytes that are not the
/// protocol close the whole QUIC connection, with a warning.
async fn serve_lane(
    (send, recv): (quinn::SendStream, quinn::RecvStream),
    handler: Arc<dyn PeerHandler>,
    conn: Connection,
    peer: SocketAddr,
    opts: Arc<TcpOptions>,
    slots: Arc<Semaphore>,
) {
    match tcp::serve::<_, LaneSink>(recv, send, &peer.to_string(), handler, &opts, slots).await {
        Ok(()) => debug!(%peer, "QUIC lane closed by the peer"),
        // The connection went away (closed, timed out): not this lane's doing.
        Err(reason) if conn.close_reason().is_some() => {
            debug!(%peer, %reason, "QUIC lane ended with its connection")
        }
        Err(reason) => {
            warn!(%peer, %reason, "closing peer connection");
            conn.close(VarInt::from_u32(1), b"protocol error");
        }
    }
}

/// A lane's writer. Large payloads are handed to quinn as the buffers they
/// are in (a 1 MiB payload is not copied into the stream); frame heads and
/// small payloads are gathered into one buffer, since quinn keeps every
/// buffer it is given as a segment until the peer acknowledges it and
/// walks them for every packet it builds.
struct LaneSink {
    stream: quinn::SendStream,
    /// What goes to quinn at the next flush, in order.
    queued: Vec<Bytes>,
    /// Heads and small payloads since the last entry of `queued`.
    small: BytesMut,
    queued_bytes: usize,
}

/// Bytes a lane queues before it hands them to quinn without waiting for
/// the batch to end (so a large payload starts leaving at once).
const LANE_BATCH: usize = 64 * 1024;

/// Payloads up to this size are copied into the lane's gathering buffer;
/// larger ones are handed over as they are.
const LANE_COPY_MAX: usize = 16 * 1024;

impl LaneSink {
    /// Moves the gathered small pieces into the queue.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.queued.push(self.small.split().freeze());
        }
    }
}

impl FrameSink for LaneSink {
    type Io = quinn::SendStream;

    fn new(stream: quinn::SendStream) -> Self {
        LaneSink {
            stream,
            queued: Vec::new(),
            small: BytesMut::new(),
            queued_bytes: 0,
        }
    }

    async fn push(&mut self, frame: Encoded) -> io::Result<()> {
        self.queued_bytes += frame.wire_len();
        let payload = frame.payload();
        let copied = payload.len() <= LANE_COPY_MAX;
        let needed = frame.head().len() + if copied { payload.len() } else { 0 };
        // Gathered pieces share one allocation until it is used up (a new
        // one per batch would be held, whole, until the batch is acknowledged).
        if self.small.capacity() - self.small.len() < needed {
            self.small.reserve(needed.max(LANE_BATCH));
        }
        self.small.extend_from_slice(frame.head());
        if copied {
            self.small.extend_from_slice(payload);
        } else {
            self.seal();
            self.queued.push(payload.clone());
        }
        if self.queued_bytes >= LANE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.seal();
        self.stream.write_all_chunks(&mut self.queued).await?;
        self.queued.clear();
        self.queued_bytes = 0;
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        // Already finished or reset: the peer is gone, nothing to tell it.
        let _ = self.stream.finish();
        Ok(())
    }
}
