//! QUIC transport: the peer protocol over quinn, TLS 1.3 with mutual
//! authentication always on (QUIC has no plaintext mode).
//!
//! **Shape.** One QUIC connection per pair of peers (per remote address on
//! the client side), one bidirectional stream per request: the caller writes
//! one request frame of [`crate::wire`] and finishes its side; the server
//! answers with one reply frame and finishes. Streams are independent, so a
//! slow or lost reply holds up no other call (no head-of-line blocking), and
//! QUIC's stream limit (`max_in_flight`) is the back-pressure on a sender.
//! The TRSP handshake of the TCP transport is not used: the ALPN protocol
//! id [`crate::tls::ALPN`] plays its part of version agreement, and the
//! certificates say who the peer is.
//!
//! **Security.** Every incoming connection must present a certificate signed
//! by the cluster CA ([`PeerTls`]); one that does not is refused during the
//! QUIC handshake, before any stream is accepted, and logged with the peer's
//! address. Each new connection takes the current certificates, so a reload
//! applies to new connections while open ones keep running.
//!
//! **Failures.** A broken connection fails every call on it with
//! `Unavailable` and is dropped from the cache; the next call dials anew.
//! Bytes on a stream that are not one well-formed request close that
//! connection with a warning naming the peer.

use crate::tcp::{encode_reply, handle_request};
use crate::tls::PeerTls;
use crate::wire::{self, Frame, Message, WireError};
use async_trait::async_trait;
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, VarInt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
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
    /// Requests (streams) one peer may have open at once on a connection.
    pub max_in_flight: u32,
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

impl QuicOptions {
    pub fn new(tls: Arc<PeerTls>) -> Self {
        QuicOptions {
            tls,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_frame: wire::DEFAULT_MAX_FRAME,
            max_in_flight: 256,
            idle_timeout: Duration::from_secs(30),
        }
    }

    fn transport_config(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_in_flight.max(1)));
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
        let crypto = QuicClientConfig::try_from(self.tls.client_config())
            .map_err(|e| Error::InvalidArgument(format!("peer TLS for QUIC: {e}")))?;
        let mut c = quinn::ClientConfig::new(Arc::new(crypto));
        c.transport_config(self.transport_config());
        Ok(c)
    }

    fn server_config(&self) -> Result<Arc<quinn::ServerConfig>> {
        let crypto = QuicServerConfig::try_from(self.tls.server_config())
            .map_err(|e| Error::InvalidArgument(format!("peer TLS for QUIC: {e}")))?;
        let mut s = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        s.transport_config(self.transport_config());
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
    /// Client endpoints (one UDP socket each), by address family (`true` = IPv4).
    endpoints: Mutex<HashMap<bool, Endpoint>>,
    peers: Mutex<HashMap<String, Arc<Slot>>>,
}

/// The connection to one remote address.
#[derive(Default)]
struct Slot {
    conn: Mutex<Option<Connection>>,
    /// Held while dialling, so concurrent callers share one attempt.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn open(&self) -> Option<Connection> {
        let mut c = lock(&self.conn);
        if c.as_ref().is_some_and(|c| c.close_reason().is_some()) {
            *c = None;
        }
        c.clone()
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
        slot.open().map(|c| c.stats())
    }

    /// The open connection to `addr`, or a new one.
    async fn connection(&self, addr: &str) -> Result<Connection> {
        let slot = lock(&self.inner.peers)
            .entry(addr.to_string())
            .or_default()
            .clone();
        if let Some(c) = slot.open() {
            return Ok(c);
        }
        let _dialling = slot.connecting.lock().await;
        if let Some(c) = slot.open() {
            return Ok(c);
        }
        let opts = &self.inner.opts;
        let remote = resolve(addr).await?;
        let endpoint = self.endpoint(remote.is_ipv4())?;
        let connecting = endpoint
            .connect_with(opts.client_config()?, remote, crate::tls::PEER_SERVER_NAME)
            .map_err(|e| Error::Unavailable(format!("cannot connect to peer at {addr}: {e}")))?;
        let conn = crate::bounded(
            opts.connect_timeout,
            connecting,
            || format!("cannot connect to peer at {addr}"),
            || format!("connecting to peer at {addr}"),
        )
        .await?;
        debug!(addr, "connected to peer over QUIC");
        *lock(&slot.conn) = Some(conn.clone());
        Ok(conn)
    }

    async fn call_on(
        &self,
        conn: &Connection,
        addr: &str,
        request: &PeerRequest,
    ) -> Result<PeerResponse> {
        let max = self.inner.opts.max_frame;
        let lost = |e: &dyn std::fmt::Display| {
            Error::Unavailable(format!("connection to peer {addr} lost: {e}"))
        };
        let frame = wire::encode_request(0, request, max)
            .map_err(|e| Error::InvalidArgument(format!("request cannot be sent: {e}")))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        let mut chunks = [frame.head().clone(), frame.payload().clone()];
        send.write_all_chunks(&mut chunks)
            .await
            .map_err(|e| lost(&e))?;
        send.finish().map_err(|e| lost(&e))?;
        let reply = recv
            .read_to_end(wire::LEN_PREFIX + max as usize)
            .await
            .map_err(|e| lost(&e))?;
        match decode_whole(Bytes::from(reply), max) {
            Ok(Frame {
                message: Message::Response(result),
                ..
            }) => result,
            Ok(_) => {
                let reason = "peer sent a request as a reply";
                warn!(peer = %addr, reason, "closing peer connection");
                conn.close(VarInt::from_u32(1), reason.as_bytes());
                Err(lost(&reason))
            }
            Err(e) => {
                warn!(peer = %addr, reason = %e, "closing peer connection");
                conn.close(VarInt::from_u32(1), b"protocol error");
                Err(lost(&e))
            }
        }
    }
}

/// Decode a stream's whole content as exactly one frame (no copy: payloads
/// are slices of `bytes`).
fn decode_whole(bytes: Bytes, max_frame: u32) -> std::result::Result<Frame, WireError> {
    let Some(prefix) = bytes.first_chunk::<{ wire::LEN_PREFIX }>() else {
        return Err(WireError::Truncated {
            what: "frame length",
            needed: wire::LEN_PREFIX,
            available: bytes.len(),
        });
    };
    let len = u32::from_be_bytes(*prefix);
    if len > max_frame {
        return Err(WireError::Oversize {
            len: u64::from(len),
            max: max_frame,
        });
    }
    let body = bytes.slice(wire::LEN_PREFIX..);
    if body.len() != len as usize {
        return Err(WireError::Truncated {
            what: "stream (its frame length and size differ)",
            needed: len as usize,
            available: body.len(),
        });
    }
    wire::decode_frame(body)
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
        let attempt = async {
            let conn = self.connection(addr).await?;
            self.call_on(&conn, addr, &request).await
        };
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

async fn accept_loop(endpoint: Endpoint, handler: Arc<dyn PeerHandler>, opts: QuicOptions) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                conns.spawn(accept_connection(incoming, handler.clone(), opts.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Completes the QUIC handshake with the current certificates, refusing a
/// peer without a certificate from the cluster CA, then serves its streams.
async fn accept_connection(
    incoming: quinn::Incoming,
    handler: Arc<dyn PeerHandler>,
    opts: QuicOptions,
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
    // aborts the handlers still running.
    let mut streams = JoinSet::new();
    let reason = loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(send, recv, handler.clone(), conn.clone(), peer, opts.clone()));
                }
                Err(e) => break e,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    };
    debug!(%peer, %reason, "QUIC peer connection ended");
}

/// Reads one request off a stream, runs it, writes the reply.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Arc<dyn PeerHandler>,
    conn: Connection,
    peer: SocketAddr,
    opts: QuicOptions,
) {
    let max_frame = opts.max_frame;
    // A stream left open without its request would hold one of the peer's
    // stream slots forever: give it as long as a call may take.
    let read = timeout(
        opts.request_timeout,
        recv.read_to_end(wire::LEN_PREFIX + max_frame as usize),
    );
    let bytes = match read.await {
        Err(_) => {
            debug!(%peer, "request stream not finished within {:?}", opts.request_timeout);
            let _ = recv.stop(VarInt::from_u32(2));
            return;
        }
        Ok(Ok(b)) => b,
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            let e = WireError::Oversize {
                len: u64::from(max_frame) + 1,
                max: max_frame,
            };
            warn!(%peer, reason = %e, "closing peer connection");
            conn.close(VarInt::from_u32(1), b"frame over the limit");
            return;
        }
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "request stream ended early");
            return;
        }
    };
    let (id, request) = match decode_whole(Bytes::from(bytes), max_frame) {
        Ok(Frame {
            id,
            message: Message::Request(r),
        }) => (id, r),
        Ok(_) => {
            warn!(%peer, reason = "reply frame from a client", "closing peer connection");
            conn.close(VarInt::from_u32(1), b"reply frame from a client");
            return;
        }
        Err(e) => {
            warn!(%peer, reason = %e, "closing peer connection");
            conn.close(VarInt::from_u32(1), b"protocol error");
            return;
        }
    };
    let result = handle_request(&*handler, request).await;
    let Some(frame) = encode_reply(id, result, max_frame) else {
        return;
    };
    let mut chunks = [frame.head().clone(), frame.payload().clone()];
    if let Err(e) = send.write_all_chunks(&mut chunks).await {
        debug!(%peer, error = %e, "cannot send a reply");
        return;
    }
    let _ = send.finish();
}
