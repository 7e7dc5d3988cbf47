//! The NBD server: a [`Frontend`] that exports every volume of a
//! [`VolumeProvider`] over TCP.
//!
//! One task per connection, on one of the per-core connection threads
//! (`shards`; [`NbdOptions::connection_threads`]), where all of the
//! connection's tasks stay. The handshake (fixed newstyle) runs under a
//! timeout; then the connection splits in three kinds of task:
//!
//! - the **reader** (the connection task itself) reads request headers in
//!   order, and for a `WRITE` reads the whole payload before the next header
//!   (or drains it when the request is refused) so the stream stays in step;
//!   for a client that sends one request at a time it busy-polls briefly for
//!   the next header instead of sleeping ([`NbdOptions::busy_poll`]);
//! - one **request task** per accepted request calls the device, so the
//!   requests of one connection run concurrently, overlapping their waits
//!   (on the node's shared runtime, where they also spread over both
//!   cores, running them on the reader instead, as the peer server does,
//!   cost a fifth of random reads); a request that panics gets `EIO`. Large writes are the
//!   exception: the reader runs them until they first wait, and only then
//!   hands them to a task ([`INLINE_WRITE_MIN`]);
//! - one **writer** task writes the replies it receives on a channel. Small
//!   replies are batched. A large `READ` reply is sent by its request task
//!   itself when no other reply is being written ([`DIRECT_REPLY_MIN`]);
//!   the socket's write half is behind a lock ([`ReplyOut`]), so replies
//!   never interleave. A large `READ` payload goes to the socket without a
//!   copy, in the same `writev` as its header (see `replies`), and, with
//!   [`NbdOptions::splice_reads`], one that is a view of file pages is
//!   spliced into it by reference (`splice`).
//!
//! Back-pressure: every request holds a slot (and, for data-carrying
//! requests, its byte count) of two per-connection semaphores from the moment
//! its header is read until its reply is written. When either runs out the
//! reader stops reading, so a client cannot make the server buffer more than
//! `max_in_flight` requests or `max_in_flight_bytes` of data.
//!
//! Two error levels, as in the protocol: a bad *request* gets an error reply
//! and the connection goes on; a broken *stream* (wrong magic, a `WRITE`
//! longer than the server accepts, a client gone mid-message) ends that
//! connection only. When a connection ends, its in-flight requests finish,
//! the device is flushed (so a clean client disconnect persists data), and
//! the device handle is dropped (the provider releases the volume's lock on
//! the last drop).

use super::congestion;
use super::proto::{
    self, client, cmd_flag, errno, handshake, opt, rep, transmission, ClientOption, Command, Info,
    InfoRequest, OptionHeader, OptionReply, ProtoError, Request, SimpleReply, CLIENT_FLAGS_LEN,
    OPTION_HEADER_LEN, REQUEST_HEADER_LEN,
};
use super::replies::{ReplyWriter, WRITE_BUFFER};
use super::shards;
use super::splice::Splicer;
use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Mutex as AsyncMutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use torus_traits::pagecache::{is_file_view, want_views, ViewsWanted};
use torus_traits::{BlockDevice, Error, ExportInfo, Frontend, Result, Shutdown, VolumeProvider};
use tracing::{debug, error, info, warn};

/// Handshake flags this server advertises.
const HANDSHAKE_FLAGS: u16 = handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES;
/// Command flags we never negotiate (they need structured replies).
const UNNEGOTIATED_FLAGS: u16 = cmd_flag::DF | cmd_flag::REQ_ONE;
/// Socket read buffer: big enough to batch many small headers, small enough
/// that large `WRITE` payloads bypass it.
const READ_BUFFER: usize = 64 * 1024;
/// Smallest `READ` payload worth splicing (when it is file pages at all).
const SPLICE_MIN: usize = 64 * 1024;

/// Settings of an [`NbdFrontend`].
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Longest `READ` or `WRITE` accepted (advertised as the maximum block size).
    pub max_request: u32,
    /// Requests of one connection in flight at once; the server stops reading
    /// from the connection while this many are unanswered.
    pub max_in_flight: usize,
    /// Bytes of `READ`/`WRITE` data one connection may have in flight.
    pub max_in_flight_bytes: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// On shutdown, how long connections get to finish in-flight requests
    /// before they are closed.
    pub shutdown_grace: Duration,
    /// Open every volume read-only and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
    /// Longest a reply may take to be written to the client. A client that
    /// stops reading replies is disconnected after this, so it cannot keep
    /// its volume (and the volume's writer lock) open forever.
    pub reply_timeout: Duration,
    /// Splice large `READ` payloads that are views of file pages into the
    /// socket by reference instead of copying them (see [`Splicer`]); the
    /// stores then make such views of large reads instead of copying them
    /// into a buffer, for every reader in the process (peer connections
    /// too), while this frontend lives. Off
    /// by default: it saves the server a copy, but the client then copies
    /// out of page-cache pages instead of fresh socket buffers, and whether
    /// that is a gain depends on the machine (1 MiB reads: +35 % on one
    /// machine, about half the throughput on another).
    pub splice_reads: bool,
    /// TCP congestion control for connections from this host (see
    /// [`congestion`]): "cubic" by default, because BBR's pacing costs a
    /// timer interrupt per burst on a link that needs none. `None` leaves
    /// every socket with the system's algorithm; connections from other
    /// hosts always keep it.
    pub loopback_congestion: Option<String>,
    /// How long a connection whose client sends one request at a time
    /// busy-polls for the next one before its thread sleeps (see
    /// `Conn::poll_for_header`); zero never polls. It trades CPU for
    /// latency: while such a client keeps up, a core spins between its
    /// requests. One connection of the process polls at a time, so that is
    /// one core at most, whatever the number of such clients. At most
    /// [`MAX_BUSY_POLL`].
    pub busy_poll: Duration,
    /// Run each connection whole on one of a set of threads, one per core
    /// and shared by the process, the least busy one (see `shards`),
    /// instead of on the caller's runtime. On by default.
    pub connection_threads: bool,
}

/// Connections busy-polling right now, in this process: at most
/// [`MAX_POLLING`], so polling costs at most one core however many clients
/// send one request at a time (a storage node shares its cores with the
/// workloads it serves); the others wait for their next request as usual.
static POLLING: AtomicUsize = AtomicUsize::new(0);
const MAX_POLLING: usize = 1;

/// One of the [`MAX_POLLING`] places, given back when dropped.
struct PollSlot;

impl PollSlot {
    fn take() -> Option<PollSlot> {
        POLLING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_POLLING).then_some(n + 1)
            })
            .ok()
            .map(|_| PollSlot)
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        POLLING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Request headers a busy poll saw arrive, in this process (see
/// [`busy_poll_hits`]).
static BUSY_POLL_HITS: AtomicU64 = AtomicU64::new(0);

/// How many connections of this process are busy-polling now (for tests:
/// never more than one).
#[doc(hidden)]
pub fn busy_polling_now() -> usize {
    POLLING.load(Ordering::Acquire)
}

/// How many request headers busy polling has caught in this process (for
/// tests: that the poll runs at all).
#[doc(hidden)]
pub fn busy_poll_hits() -> u64 {
    BUSY_POLL_HITS.load(Ordering::Relaxed)
}

/// The longest `NbdOptions::busy_poll` accepted.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// Whether `poll` is an acceptable `NbdOptions::busy_poll` (for config
/// validation too): why not.
pub fn check_busy_poll(poll: Duration) -> std::result::Result<(), String> {
    if poll > MAX_BUSY_POLL {
        return Err(format!("{poll:?} is too long (at most {MAX_BUSY_POLL:?})"));
    }
    Ok(())
}
/// `NbdOptions::busy_poll` by default: above the gap between one reply and
/// the next request of a client in a loop on this kind of machine (about
/// 80 µs), so that gap is polled, not slept through.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(200);

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            max_request: 32 * 1024 * 1024,
            max_in_flight: 128,
            max_in_flight_bytes: 128 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            read_only: false,
            reply_timeout: Duration::from_secs(60),
            splice_reads: false,
            loopback_congestion: Some(congestion::DEFAULT.into()),
            busy_poll: DEFAULT_BUSY_POLL,
            connection_threads: true,
        }
    }
}

impl NbdOptions {
    fn validate(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::InvalidArgument(format!("NBD options: {why}")));
        if self.max_request < 4096 {
            return bad("max_request must be at least 4096");
        }
        if self.max_in_flight == 0 || self.max_in_flight > u32::MAX as usize / 2 {
            return bad("max_in_flight must be between 1 and 2^31");
        }
        // A budget below max_request is allowed: one large request then
        // takes the whole budget and runs alone.
        if self.max_in_flight_bytes == 0 || self.max_in_flight_bytes > Semaphore::MAX_PERMITS {
            return bad("max_in_flight_bytes must be between 1 and 2^61");
        }
        check_busy_poll(self.busy_poll).or_else(|why| bad(&format!("busy_poll: {why}")))?;
        if let Some(name) = &self.loopback_congestion {
            congestion::check_name(name)
                .or_else(|why| bad(&format!("loopback_congestion: {why}")))?;
        }
        Ok(())
    }
}

/// The NBD server frontend (see the module docs).
pub struct NbdFrontend {
    /// Taken by `serve`, and closed when it returns: a stopped frontend
    /// must not leave connections queueing in the kernel's backlog.
    listener: std::sync::Mutex<Option<TcpListener>>,
    local_addr: SocketAddr,
    provider: Arc<dyn VolumeProvider>,
    options: Arc<NbdOptions>,
    /// With splicing on: asks the stores for file views of large reads.
    _views: Option<ViewsWanted>,
}

impl NbdFrontend {
    /// Bind the listening socket (port 0 picks a free port; see
    /// [`Frontend::local_addr`]). Nothing is accepted until `serve`, which
    /// may be called once.
    pub async fn bind(
        addr: SocketAddr,
        provider: Arc<dyn VolumeProvider>,
        mut options: NbdOptions,
    ) -> Result<NbdFrontend> {
        options.validate()?;
        if let Some(name) = &options.loopback_congestion {
            if let Err(e) = congestion::usable(name, addr) {
                warn!(
                    "NBD: TCP congestion control {name:?} is not usable on this host ({e}); \
                     loopback connections keep the system's (see \
                     net.ipv4.tcp_allowed_congestion_control)"
                );
                options.loopback_congestion = None;
            }
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("bind NBD listener on {addr}"), e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io("NBD listener address", e))?;
        Ok(NbdFrontend {
            listener: std::sync::Mutex::new(Some(listener)),
            local_addr,
            provider,
            _views: options.splice_reads.then(want_views),
            options: Arc::new(options),
        })
    }
}

/// Resolves when the value turns true, or when the sender is gone (nobody
/// can ever tell us to go on, so stopping is the only safe reading).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

#[async_trait]
impl Frontend for NbdFrontend {
    fn name(&self) -> &str {
        "nbd"
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        Some(self.local_addr)
    }

    async fn serve(&self, mut shutdown: Shutdown) -> Result<()> {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| Error::Closed("NBD frontend already served".into()))?;
        info!(addr = %self.local_addr, "NBD server listening");

        // Connections watch this instead of `shutdown` so they stop only
        // once we have stopped accepting.
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        // Connections on their own threads open volumes here (see `OpenOn`).
        let provider: Arc<dyn VolumeProvider> = if self.options.connection_threads {
            Arc::new(OpenOn {
                inner: self.provider.clone(),
                runtime: tokio::runtime::Handle::current(),
            })
        } else {
            self.provider.clone()
        };
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => spawn_connection(
                        &mut connections,
                        stream,
                        peer,
                        provider.clone(),
                        self.options.clone(),
                        stop_rx.clone(),
                    ),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    log_join(done);
                }
            }
        }
        drop(listener);
        info!(
            connections = connections.len(),
            "NBD server stopping: no longer accepting"
        );
        let _ = stop_tx.send(true);
        let drain = async {
            while let Some(done) = connections.join_next().await {
                log_join(done);
            }
        };
        if tokio::time::timeout(self.options.shutdown_grace, drain)
            .await
            .is_err()
        {
            warn!(
                connections = connections.len(),
                "NBD connections still busy after the grace period; closing them"
            );
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
        info!("NBD server stopped");
        Ok(())
    }
}

/// Starts a connection's task: whole on a connection thread, its socket
/// moved to that thread's reactor, when `options.connection_threads` (and
/// there is one), else on this runtime.
fn spawn_connection(
    connections: &mut JoinSet<()>,
    stream: TcpStream,
    peer: SocketAddr,
    provider: Arc<dyn VolumeProvider>,
    options: Arc<NbdOptions>,
    stop: watch::Receiver<bool>,
) {
    let Some(placed) = options.connection_threads.then(shards::place).flatten() else {
        connections.spawn(run_connection(stream, peer, provider, options, stop));
        return;
    };
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            warn!(%peer, "NBD: cannot hand the connection over: {e}");
            return;
        }
    };
    let handle = placed.handle.clone();
    let connection = async move {
        let _placed = placed;
        match TcpStream::from_std(stream) {
            Ok(stream) => run_connection(stream, peer, provider, options, stop).await,
            Err(e) => warn!(%peer, "NBD: cannot take the connection on: {e}"),
        }
    };
    connections.spawn_on(connection, &handle);
}

/// A provider whose opens run on `runtime`, the node's: what opening a
/// volume starts and outlives the connection (the volume's heal loop, the
/// peer connections it dials) must not land on the connection thread that
/// asked (see `shards`).
struct OpenOn {
    inner: Arc<dyn VolumeProvider>,
    runtime: tokio::runtime::Handle,
}

#[async_trait]
impl VolumeProvider for OpenOn {
    async fn list(&self) -> Result<Vec<ExportInfo>> {
        self.inner.list().await
    }

    async fn info(&self, name: &str) -> Result<ExportInfo> {
        self.inner.info(name).await
    }

    async fn open(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        let inner = self.inner.clone();
        let name = name.to_owned();
        self.runtime
            .spawn(async move { inner.open(&name, read_only).await })
            .await
            .map_err(|e| Error::Other(format!("opening the volume failed: {e}")))?
    }
}

fn log_join(done: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            error!("NBD connection task panicked: {e}");
        }
    }
}

// --- one connection ----------------------------------------------------------

/// Why a connection ended early; logged, never propagated past the connection.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtoError),
    #[error("{0}")]
    Refused(String),
}

impl ConnError {
    fn log(&self, peer: SocketAddr, phase: &str) {
        match self {
            ConnError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                debug!(%peer, "NBD client went away during {phase}: {e}")
            }
            ConnError::Io(e) => info!(%peer, "NBD connection I/O error during {phase}: {e}"),
            ConnError::Protocol(e) => {
                warn!(%peer, "NBD client broke the protocol during {phase}: {e}; closing")
            }
            ConnError::Refused(why) => warn!(%peer, "NBD export refused: {why}; closing"),
        }
    }
}

/// An export chosen during the handshake.
struct Export {
    name: String,
    device: Arc<dyn BlockDevice>,
    size: u64,
    flags: u16,
    read_only: bool,
}

async fn run_connection(
    stream: TcpStream,
    peer: SocketAddr,
    provider: Arc<dyn VolumeProvider>,
    options: Arc<NbdOptions>,
    mut stop: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, "TCP_NODELAY: {e}");
    }
    if let Some(name) = &options.loopback_congestion {
        congestion::apply(&stream, name);
    }
    debug!(%peer, "NBD client connected");
    let (rd, wr) = stream.into_split();
    // One reader for both phases: a client may pipeline its first request
    // right behind NBD_OPT_GO, and those bytes must not be lost.
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let mut wr = BufWriter::with_capacity(WRITE_BUFFER, wr);

    let negotiated = tokio::select! {
        r = tokio::time::timeout(
            options.handshake_timeout,
            negotiate(&mut rd, &mut wr, provider.as_ref(), &options),
        ) => r,
        _ = stopped(&mut stop) => {
            debug!(%peer, "server stopping during the handshake; closing");
            return;
        }
    };
    let export = match negotiated {
        Err(_) => {
            warn!(%peer, "NBD handshake timed out; closing");
            return;
        }
        Ok(Err(e)) => {
            e.log(peer, "handshake");
            return;
        }
        Ok(Ok(None)) => {
            debug!(%peer, "NBD client ended the handshake");
            return;
        }
        Ok(Ok(Some(export))) => export,
    };
    info!(%peer, export = %export.name, size = export.size, read_only = export.read_only,
          "NBD client attached");
    // Every handshake reply was flushed: the buffer is empty.
    let wr = ReplyWriter::new(wr.into_inner());
    transmission(rd, wr, export, peer, &options, stop).await;
}

/// Send the option replies gathered in `out`.
async fn send(wr: &mut BufWriter<OwnedWriteHalf>, out: &[u8]) -> io::Result<()> {
    wr.write_all(out).await?;
    wr.flush().await
}

/// Fixed newstyle negotiation. `Ok(None)` when the client aborts.
async fn negotiate(
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut BufWriter<OwnedWriteHalf>,
    provider: &dyn VolumeProvider,
    options: &NbdOptions,
) -> std::result::Result<Option<Export>, ConnError> {
    send(wr, &proto::encode_greeting(HANDSHAKE_FLAGS)).await?;
    let mut flags = [0u8; CLIENT_FLAGS_LEN];
    rd.read_exact(&mut flags).await?;
    // Unknown client flags: the spec says the server MUST drop the connection.
    let client_flags = proto::decode_client_flags(&flags, HANDSHAKE_FLAGS)?;
    let no_zeroes = client_flags & client::NO_ZEROES != 0;

    let mut out = Vec::with_capacity(256);
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        rd.read_exact(&mut header).await?;
        // Wrong magic or an option over MAX_OPTION_LEN: we cannot stay in
        // step (or refuse to buffer that much), so the connection ends.
        let header = OptionHeader::decode(&header)?;
        let mut data = vec![0u8; header.len as usize];
        rd.read_exact(&mut data).await?;
        out.clear();

        let option = match ClientOption::parse(header.option, &data) {
            Ok(option) => option,
            // NBD_OPT_EXPORT_NAME has no error reply: hard disconnect.
            Err(e) if header.option == opt::EXPORT_NAME => return Err(e.into()),
            Err(e) => {
                debug!("malformed option {}: {e}", header.option);
                OptionReply::Error {
                    code: rep::ERR_INVALID,
                    message: e.to_string(),
                }
                .encode(header.option, &mut out);
                send(wr, &out).await?;
                continue;
            }
        };
        match option {
            ClientOption::Abort => {
                OptionReply::Ack.encode(opt::ABORT, &mut out);
                // The client may already have closed; that is fine.
                let _ = send(wr, &out).await;
                let _ = wr.shutdown().await;
                return Ok(None);
            }
            ClientOption::List => match provider.list().await {
                Ok(exports) => {
                    for e in exports {
                        OptionReply::Server {
                            name: e.name,
                            description: e.description,
                        }
                        .encode(opt::LIST, &mut out);
                    }
                    OptionReply::Ack.encode(opt::LIST, &mut out);
                }
                Err(e) => open_error_reply(&e).encode(opt::LIST, &mut out),
            },
            ClientOption::ExportName(name) => match open_export(provider, &name, options, false)
                .await
            {
                Ok(export) => {
                    proto::encode_export_name_reply(export.size, export.flags, no_zeroes, &mut out);
                    send(wr, &out).await?;
                    return Ok(Some(export));
                }
                Err(e) => {
                    return Err(ConnError::Refused(format!(
                        "NBD_OPT_EXPORT_NAME {name:?}: {e}"
                    )))
                }
            },
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = header.option == opt::GO;
                match open_export(provider, &req.name, options, !go).await {
                    Ok(export) => {
                        encode_infos(&export, &req, provider, options, header.option, &mut out)
                            .await;
                        OptionReply::Ack.encode(header.option, &mut out);
                        if go {
                            send(wr, &out).await?;
                            return Ok(Some(export));
                        }
                        // NBD_OPT_INFO: the read-only probe handle is dropped here.
                    }
                    Err(e) => {
                        debug!("option {} for {:?} refused: {e}", header.option, req.name);
                        open_error_reply(&e).encode(header.option, &mut out);
                    }
                }
            }
            ClientOption::StartTls | ClientOption::StructuredReply | ClientOption::Unknown(_) => {
                OptionReply::Error {
                    code: rep::ERR_UNSUP,
                    message: format!("option {} is not supported", header.option),
                }
                .encode(header.option, &mut out);
            }
        }
        send(wr, &out).await?;
    }
}

/// The option error for a failed open; the message is the error's text so
/// the client shows e.g. "locked: held by node X".
fn open_error_reply(e: &Error) -> OptionReply {
    let code = match e {
        Error::NotFound(_) => rep::ERR_UNKNOWN,
        Error::InvalidArgument(_) => rep::ERR_INVALID,
        Error::Closed(_) => rep::ERR_SHUTDOWN,
        // There is no generic "server error" reply; POLICY ("known, valid,
        // but the server will not") fits a lock held elsewhere best, and the
        // message says what really happened.
        _ => rep::ERR_POLICY,
    };
    OptionReply::Error {
        code,
        message: e.to_string(),
    }
}

/// Resolve a name (empty = the only volume, if there is exactly one) and
/// open it. A volume the provider will only open read-only is exported
/// read-only rather than refused.
///
/// With `probe` (for `NBD_OPT_INFO`) the volume is opened read-only whatever
/// the mode: asking about a volume must not take (and bump the epoch of) its
/// writer lock, and `nbdinfo --list` must still show a volume another node
/// holds. The flags reported are those a writable attach would get; the
/// lock, if any, is reported by `NBD_OPT_GO`.
async fn open_export(
    provider: &dyn VolumeProvider,
    requested: &str,
    options: &NbdOptions,
    probe: bool,
) -> Result<Export> {
    let name = if requested.is_empty() {
        let exports = provider.list().await?;
        match exports.as_slice() {
            [only] => only.name.clone(),
            _ => {
                return Err(Error::NotFound(format!(
                    "no default export: {} volumes exist, name one",
                    exports.len()
                )))
            }
        }
    } else {
        requested.to_owned()
    };
    let device = match provider.open(&name, options.read_only || probe).await {
        Err(Error::ReadOnly(_)) if !options.read_only => provider.open(&name, true).await?,
        other => other?,
    };
    let read_only = options.read_only || (!probe && device.read_only());
    let mut flags = transmission::HAS_FLAGS | transmission::SEND_FLUSH | transmission::SEND_FUA;
    if read_only {
        flags |= transmission::READ_ONLY;
    } else {
        flags |= transmission::SEND_TRIM
            | transmission::SEND_WRITE_ZEROES
            | transmission::SEND_FAST_ZERO;
    }
    if device.multi_conn_safe() {
        flags |= transmission::CAN_MULTI_CONN;
    }
    Ok(Export {
        name,
        size: device.size(),
        device,
        flags,
        read_only,
    })
}

/// Block size constraints: any alignment (min 1), the device's preferred
/// size as a power of two in [512, max], and our request cap as the max.
fn block_sizes(preferred: u32, max: u32) -> (u32, u32, u32) {
    let mut pref = preferred.clamp(512, 1 << 30).next_power_of_two();
    while pref > max && pref > 512 {
        pref /= 2;
    }
    (1, pref, max)
}

async fn encode_infos(
    export: &Export,
    req: &InfoRequest,
    provider: &dyn VolumeProvider,
    options: &NbdOptions,
    option: u32,
    out: &mut Vec<u8>,
) {
    OptionReply::Info(Info::Export {
        size: export.size,
        flags: export.flags,
    })
    .encode(option, out);
    // Sent even when not asked for (the spec allows it): we do enforce a
    // maximum, and clients that understand it use it.
    let (min, preferred, max) =
        block_sizes(export.device.preferred_block_size(), options.max_request);
    OptionReply::Info(Info::BlockSize {
        min,
        preferred,
        max,
    })
    .encode(option, out);
    if req.requests.contains(&proto::info::NAME) {
        OptionReply::Info(Info::Name(export.name.clone())).encode(option, out);
    }
    if req.requests.contains(&proto::info::DESCRIPTION) {
        if let Ok(info) = provider.info(&export.name).await {
            OptionReply::Info(Info::Description(info.description)).encode(option, out);
        }
    }
}

// --- transmission ------------------------------------------------------------

/// A reply on its way to the writer. The permits travel with it so a
/// request's slot and bytes are released only once its reply is written
/// (or dropped because the connection is gone).
struct Reply {
    handle: u64,
    error: u32,
    payload: Option<Bytes>,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// How the request reader stopped.
#[derive(Debug)]
enum ReadEnd {
    /// NBD_CMD_DISC.
    Disconnect,
    /// The server is stopping.
    Stopped,
    /// The writer is gone (the client stopped reading or reset).
    WriterGone,
    /// The stream is unusable.
    Broken(ConnError),
}

struct Conn<'a> {
    rd: BufReader<OwnedReadHalf>,
    export: &'a Export,
    options: &'a NbdOptions,
    peer: SocketAddr,
    tx: mpsc::Sender<Reply>,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    /// Requests handed to a request task and not yet replied to.
    running: Arc<AtomicUsize>,
    /// The socket's write side, shared by the writer task and requests
    /// that send their own replies.
    out: Arc<AsyncMutex<ReplyOut>>,
    /// How long the last wait for a request header took (see
    /// [`poll_for_header`](Self::poll_for_header)).
    last_gap: Duration,
}

async fn transmission(
    rd: BufReader<OwnedReadHalf>,
    wr: ReplyWriter,
    export: Export,
    peer: SocketAddr,
    options: &NbdOptions,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, rx) = mpsc::channel(options.max_in_flight);
    // Aborted if this connection task is (after the shutdown grace period),
    // so a writer stuck on a client that stopped reading cannot outlive it.
    let pages = if options.splice_reads {
        Pages::Untried
    } else {
        Pages::Copy
    };
    let running = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(AsyncMutex::new(ReplyOut { wr, pages }));
    let mut writer = AbortOnDrop(tokio::spawn(write_replies(
        out.clone(),
        rx,
        running.clone(),
        peer,
        options.reply_timeout,
    )));
    let slots = Arc::new(Semaphore::new(options.max_in_flight));
    let mut conn = Conn {
        rd,
        export: &export,
        options,
        peer,
        tx,
        slots: slots.clone(),
        bytes: Arc::new(Semaphore::new(options.max_in_flight_bytes)),
        running,
        out,
        last_gap: Duration::MAX,
    };
    let end = conn.read_requests(&mut stop).await;
    match &end {
        ReadEnd::Disconnect => debug!(%peer, "NBD client disconnected"),
        ReadEnd::Stopped => debug!(%peer, "server stopping; finishing in-flight requests"),
        ReadEnd::WriterGone => debug!(%peer, "NBD reply stream closed"),
        ReadEnd::Broken(e) => e.log(peer, "transmission"),
    }
    let Conn { rd, tx, .. } = conn;
    drop(rd);

    // Every in-flight request holds a slot until its reply is written or
    // dropped, so owning all slots means they are all done.
    let all = u32::try_from(options.max_in_flight).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    if !export.read_only {
        if let Err(e) = export.device.flush().await {
            warn!(%peer, export = %export.name, "flush on disconnect failed: {e}");
        }
    }
    drop(tx);
    if let Err(e) = (&mut writer.0).await {
        error!(%peer, "NBD reply writer failed: {e}");
    }
    info!(%peer, export = %export.name, "NBD client detached");
    // `export` (and with it the device handle) is dropped here.
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Conn<'_> {
    /// Something that ends reading: the server stopping or the writer gone.
    async fn interrupted(stop: &mut watch::Receiver<bool>, tx: &mpsc::Sender<Reply>) -> ReadEnd {
        tokio::select! {
            _ = stopped(stop) => ReadEnd::Stopped,
            _ = tx.closed() => ReadEnd::WriterGone,
        }
    }

    /// Busy-poll for the next request header, for up to
    /// `NbdOptions::busy_poll` since `waited`, when the client looks like it
    /// waits for each reply before sending its next request: at most one
    /// request of this connection in flight, nothing buffered, and the last
    /// header came within the budget, and no other connection is polling.
    /// Otherwise (an idle or a pipelining client) it returns at once.
    ///
    /// Why: a worker thread that parks in `epoll_wait` is woken by the
    /// client's next request through an interrupt and a context switch, and
    /// on a virtual machine the halted CPU's wake-up costs more again; for a
    /// client that sends one request at a time that wake-up is on the
    /// critical path of every request. Each round here yields to the
    /// runtime, which runs this connection's other tasks (the request
    /// itself, the reply writer) in between, so nothing waits behind the
    /// poll, and, with a yielded task pending, does not park: it polls the
    /// sockets without sleeping. (On a connection thread the thread owns
    /// its runtime's I/O driver; on the shared multi-threaded runtime,
    /// when another worker holds the driver, parked in `epoll_wait`, that
    /// one is woken by the request, but this one, awake, sees the header as
    /// soon as the driver marks the socket readable.) Measured on a 2-core
    /// VM on the shared runtime, QD1 4 KiB random reads: 55 µs per request
    /// instead of 89–97; writes 81–89 µs instead of 106–112 (150 µs poll).
    ///
    /// The poll does not watch for the server stopping or the writer
    /// ending: both wait for it, at most `busy_poll` (10 ms at most).
    ///
    /// The poll starts when the reader waits, while the request it just
    /// read still runs, so the thread stays awake through the whole round
    /// trip. Starting it only once nothing was in flight (the request
    /// tasks signalling idle) gave the same mean and twice the p99 (QD1
    /// writes 268–277 µs against 132–144): the thread then parked while
    /// the request ran. On the three-node cluster on this machine neither
    /// variant moved QD1 latency (230–245 µs mean with or without).
    async fn poll_for_header(&mut self, waited: std::time::Instant) {
        let budget = self.options.busy_poll;
        if budget.is_zero()
            || self.last_gap >= budget
            || !self.rd.buffer().is_empty()
            || self.running.load(Ordering::Acquire) > 1
        {
            return;
        }
        let Some(_polling) = PollSlot::take() else {
            return;
        };
        while waited.elapsed() < budget {
            if self.rd.get_ref().readable().now_or_never().is_some() {
                BUSY_POLL_HITS.fetch_add(1, Ordering::Relaxed);
                return;
            }
            tokio::task::yield_now().await;
        }
    }

    async fn read_requests(&mut self, stop: &mut watch::Receiver<bool>) -> ReadEnd {
        loop {
            // Back-pressure: do not read another header while every slot is taken.
            let slot = tokio::select! {
                biased;
                end = Self::interrupted(stop, &self.tx) => return end,
                slot = self.slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return ReadEnd::Stopped,
                },
            };
            let mut header = [0u8; REQUEST_HEADER_LEN];
            let waited = std::time::Instant::now();
            self.poll_for_header(waited).await;
            tokio::select! {
                biased;
                end = Self::interrupted(stop, &self.tx) => return end,
                read = self.rd.read_exact(&mut header) => {
                    if let Err(e) = read {
                        return ReadEnd::Broken(e.into());
                    }
                }
            }
            self.last_gap = waited.elapsed();
            let req = match Request::decode(&header) {
                Ok(req) => req,
                Err(ProtoError::UnknownCommand { command, handle }) => {
                    // We assume it carries no payload; a client sending one
                    // will break its own stream and hit the magic check.
                    debug!(peer = %self.peer, "unknown NBD command {command}");
                    self.reply_now(handle, errno::EINVAL, slot).await;
                    continue;
                }
                Err(e) => return ReadEnd::Broken(e.into()),
            };
            match req.command {
                Command::Disc => return ReadEnd::Disconnect,
                Command::Write => {
                    if let Err(end) = self.accept_write(req, slot).await {
                        return end;
                    }
                }
                _ => self.accept_other(req, slot).await,
            }
        }
    }

    /// A reply decided by the reader itself (a refused request).
    async fn reply_now(&self, handle: u64, error: u32, slot: OwnedSemaphorePermit) {
        let _ = self
            .tx
            .send(Reply {
                handle,
                error,
                payload: None,
                _slot: slot,
                _bytes: None,
            })
            .await;
    }

    /// Byte permits for `len` bytes of data in flight (capped at the whole
    /// budget, so one request can always go through alone).
    async fn data_permit(&self, len: u32) -> Option<OwnedSemaphorePermit> {
        if len == 0 {
            return None;
        }
        let want = (len as usize).min(self.options.max_in_flight_bytes);
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        self.bytes.clone().acquire_many_owned(want).await.ok()
    }

    async fn accept_write(
        &mut self,
        req: Request,
        slot: OwnedSemaphorePermit,
    ) -> std::result::Result<(), ReadEnd> {
        if req.len > self.options.max_request {
            // Draining gigabytes is not worth it: refuse and hang up (the
            // spec lets a server disconnect on an oversized payload).
            warn!(peer = %self.peer, len = req.len, max = self.options.max_request,
                  "NBD write over the maximum request length; closing");
            self.reply_now(req.handle, errno::EINVAL, slot).await;
            return Err(ReadEnd::Broken(ConnError::Refused(format!(
                "write of {} bytes over the {} byte maximum",
                req.len, self.options.max_request
            ))));
        }
        if let Err(error) = check_request(&req, self.export) {
            debug!(peer = %self.peer, ?req, error, "NBD write refused");
            drain(&mut self.rd, req.len as usize)
                .await
                .map_err(|e| ReadEnd::Broken(e.into()))?;
            self.reply_now(req.handle, error, slot).await;
            return Ok(());
        }
        let bytes = self.data_permit(req.len).await;
        let payload = read_payload(&mut self.rd, req.len as usize)
            .await
            .map_err(|e| ReadEnd::Broken(e.into()))?;
        self.spawn(req, Some(payload), slot, bytes);
        Ok(())
    }

    async fn accept_other(&mut self, req: Request, slot: OwnedSemaphorePermit) {
        if let Err(error) = check_request(&req, self.export) {
            debug!(peer = %self.peer, ?req, error, "NBD request refused");
            self.reply_now(req.handle, error, slot).await;
            return;
        }
        if req.command == Command::Read && req.len > self.options.max_request {
            self.reply_now(req.handle, errno::EINVAL, slot).await;
            return;
        }
        let bytes = if req.command == Command::Read {
            self.data_permit(req.len).await
        } else {
            None
        };
        self.spawn(req, None, slot, bytes);
    }

    /// Runs an accepted request: in a task of its own, or, for a large
    /// write ([`INLINE_WRITE_MIN`]), on the reader until it first has to
    /// wait (see there).
    fn spawn(
        &self,
        req: Request,
        payload: Option<Bytes>,
        slot: OwnedSemaphorePermit,
        bytes: Option<OwnedSemaphorePermit>,
    ) {
        let inline = req.command == Command::Write && req.len >= INLINE_WRITE_MIN;
        let task = self.request_task(req, payload, slot, bytes);
        if !inline {
            tokio::spawn(task);
            return;
        }
        let mut task = Box::pin(task);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            // The task polls it again, which registers the task's waker
            // with whatever this poll waited on.
            tokio::spawn(task);
        }
    }

    /// The work of one accepted request, up to sending its reply.
    fn request_task(
        &self,
        req: Request,
        payload: Option<Bytes>,
        slot: OwnedSemaphorePermit,
        bytes: Option<OwnedSemaphorePermit>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let device = self.export.device.clone();
        let tx = self.tx.clone();
        let peer = self.peer;
        let running = self.running.clone();
        let out = self.out.clone();
        let limit = self.options.reply_timeout;
        running.fetch_add(1, Ordering::AcqRel);
        async move {
            // A panic in the device fails this request, not the connection.
            let (error, payload) = match AssertUnwindSafe(execute(device.as_ref(), &req, payload))
                .catch_unwind()
                .await
            {
                Ok(Ok(payload)) => (0, payload),
                Ok(Err(failed)) => {
                    // Failures an operator must see (the store, a replica,
                    // a full pool); the rest are the client's mistakes.
                    if matches!(failed.errno, errno::EIO | errno::ENOSPC) {
                        warn!(%peer, ?req, errno = failed.errno, why = %failed.why, "NBD request failed");
                    } else {
                        debug!(%peer, ?req, errno = failed.errno, why = %failed.why, "NBD request refused");
                    }
                    (failed.errno, None)
                }
                Err(_) => {
                    error!(%peer, ?req, "NBD request panicked; replying EIO");
                    (errno::EIO, None)
                }
            };
            // Drop the handle before the reply can release the last slot, so
            // the connection's final drop really is the last.
            drop(device);
            // Before the send that wakes the writer, which reads this.
            running.fetch_sub(1, Ordering::AcqRel);
            let reply = Reply {
                handle: req.handle,
                error,
                payload,
                _slot: slot,
                _bytes: bytes,
            };
            if reply.payload.as_ref().map_or(0, Bytes::len) >= DIRECT_REPLY_MIN {
                // Sent from here when the socket is free (see DIRECT_REPLY_MIN).
                if let Ok(mut out) = out.try_lock() {
                    out.send_alone(reply, peer, limit).await;
                    return;
                }
            }
            let _ = tx.send(reply).await;
        }
    }
}

/// Writes at least this large run on the reader until they first wait,
/// instead of in a task of their own from the start. The reader has just
/// copied the payload out of the socket, so it is in this core's cache,
/// and a device that can write it without waiting (a local store copying
/// into the page cache) does so before the reader reads on: no hand-off to
/// another task, no other worker woken to run it. This is how a threaded
/// server such as nbdkit handles a write, and on two cores it beat
/// spreading the work: 1 MiB writes at queue depth 8 went from 2.6–3.1 to
/// 3.2–3.9 GB/s (with the store writing them on the calling task, see
/// `torus_backends`' `INLINE_WRITE_MAX`). A write that must wait (for a
/// replica, the blocking pool, the disk) continues in its own task from
/// there, so the reader is held only for work that was going to keep a
/// core busy anyway. Small writes keep their own tasks: their cost is per
/// request, and the second core running them is worth the hand-off.
const INLINE_WRITE_MIN: u32 = 256 * 1024;

/// Checks the reader makes before accepting a request: flags, supported
/// command, read-only export, range. `Err` is the NBD error to reply with.
fn check_request(req: &Request, export: &Export) -> std::result::Result<(), u32> {
    let allowed = req.command.allowed_flags() & !UNNEGOTIATED_FLAGS;
    if req.flags & !allowed != 0 {
        return Err(errno::EINVAL);
    }
    let writes = match req.command {
        Command::Read => false,
        Command::Write | Command::Trim | Command::WriteZeroes => true,
        Command::Flush => return Ok(()),
        // Not advertised (CACHE, BLOCK_STATUS, RESIZE); DISC never gets here.
        _ => return Err(errno::EINVAL),
    };
    if writes && export.read_only {
        return Err(errno::EPERM);
    }
    let in_range = req
        .offset
        .checked_add(req.len.into())
        .is_some_and(|end| end <= export.size);
    if !in_range {
        // The spec: ENOSPC for writes past the end, EINVAL for reads and trims.
        return Err(match req.command {
            Command::Write | Command::WriteZeroes => errno::ENOSPC,
            _ => errno::EINVAL,
        });
    }
    if req.command == Command::WriteZeroes && req.fast_zero() && req.no_hole() {
        // Zeroing without punching holes writes every byte: not fast.
        return Err(errno::ENOTSUP);
    }
    Ok(())
}

/// Why a request failed: the NBD error to reply with and the cause, for
/// the log (the client only ever sees the errno).
struct Failed {
    errno: u32,
    why: String,
}

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed {
            errno: proto::errno_for(&e),
            why: e.to_string(),
        }
    }
}

/// Run one accepted request on the device: its READ payload, or why it
/// failed.
async fn execute(
    device: &dyn BlockDevice,
    req: &Request,
    payload: Option<Bytes>,
) -> std::result::Result<Option<Bytes>, Failed> {
    let offset = req.offset;
    let len = u64::from(req.len);
    let fua = req.fua();
    match req.command {
        Command::Read => {
            if len == 0 {
                return Ok(Some(Bytes::new()));
            }
            let data = device.read(offset, len).await?;
            if data.len() as u64 != len {
                // A short read would desynchronise the client: report EIO.
                return Err(Failed {
                    errno: errno::EIO,
                    why: format!("the device returned {} of {len} bytes", data.len()),
                });
            }
            Ok(Some(data))
        }
        Command::Write => {
            let data = payload.unwrap_or_default();
            if !data.is_empty() {
                device.write(offset, data, fua).await?;
            }
            Ok(None)
        }
        Command::Trim if len == 0 => Ok(None),
        Command::Trim => {
            device.trim(offset, len, fua).await?;
            Ok(None)
        }
        Command::WriteZeroes if len == 0 => Ok(None),
        Command::WriteZeroes => {
            let may_trim = !req.no_hole();
            device.write_zeroes(offset, len, may_trim, fua).await?;
            Ok(None)
        }
        Command::Flush => {
            device.flush().await?;
            Ok(None)
        }
        command => Err(Failed {
            errno: errno::EINVAL,
            why: format!("{command:?} is not supported"),
        }),
    }
}

/// Read exactly `len` payload bytes into one buffer, without zero-filling
/// it first (large reads bypass the `BufReader`).
async fn read_payload(rd: &mut BufReader<OwnedReadHalf>, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let remaining = len - buf.len();
        let n = rd.read_buf(&mut (&mut buf).limit(remaining)).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

/// Skip `len` payload bytes of a refused write.
async fn drain(rd: &mut BufReader<OwnedReadHalf>, mut len: usize) -> io::Result<()> {
    while len > 0 {
        let available = rd.fill_buf().await?;
        if available.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = available.len().min(len);
        rd.consume(n);
        len -= n;
    }
    Ok(())
}

/// A `READ` reply with at least this much data is sent by the request
/// task that read it, when no other reply is being written at that moment,
/// instead of being handed to the writer task. The data was just read into
/// this core's cache, and sending it from here copies it into the socket
/// from there and wakes no other task; such a reply is sent on its own
/// anyway (it is never batched, see `replies`). 1 MiB reads at queue depth
/// 8, four interleaved rounds on a 2-core VM: 3.68–3.86 GB/s against
/// 3.37–3.73 handed over, for 0.26–0.27 s of server CPU per GB against
/// 0.27–0.31. Write replies, only headers, stay batched: sending each large
/// write's reply from the reader as soon as it was written cost more CPU
/// (0.26 against 0.21 s per GB) and throughput.
const DIRECT_REPLY_MIN: usize = 256 * 1024;

/// Everything that writes to the socket after the handshake, behind one
/// lock so that replies never interleave: the writer task holds it while
/// it sends a batch, a request sending its own reply while it sends that.
struct ReplyOut {
    wr: ReplyWriter,
    pages: Pages,
}

impl ReplyOut {
    /// Sends one reply at once, by a request task. When that fails, the
    /// socket is shut down both ways: the reader sees the end of the
    /// stream and the connection ends as when the writer task fails.
    async fn send_alone(&mut self, reply: Reply, peer: SocketAddr, limit: Duration) {
        let sent = bounded(limit, async {
            write_reply(&mut self.wr, &mut self.pages, peer, reply).await?;
            self.wr.flush().await
        })
        .await;
        if let Err(e) = sent {
            reply_write_failed(peer, &e);
            let _ = socket2::SockRef::from(self.wr.socket()).shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Every socket write is bounded: a client that stops reading must not pin
/// its connection (and its volume handle) forever.
async fn bounded<F: Future<Output = io::Result<()>>>(limit: Duration, f: F) -> io::Result<()> {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client did not read replies in time",
        ))
    })
}

fn reply_write_failed(peer: SocketAddr, e: &io::Error) {
    if e.kind() == io::ErrorKind::TimedOut {
        warn!(%peer, "disconnecting an NBD client that stopped reading replies");
    } else {
        debug!(%peer, "writing NBD replies failed: {e}");
    }
}

/// The writer task: sends the replies handed to it, batched.
async fn write_replies(
    out: Arc<AsyncMutex<ReplyOut>>,
    mut rx: mpsc::Receiver<Reply>,
    running: Arc<AtomicUsize>,
    peer: SocketAddr,
    limit: Duration,
) {
    let result: io::Result<()> = async {
        while let Some(reply) = rx.recv().await {
            let mut out = out.lock().await;
            let ReplyOut { wr, pages } = &mut *out;
            bounded(limit, write_reply(wr, pages, peer, reply)).await?;
            // Batch whatever else is ready before paying for a flush. The
            // yield lets requests that are already runnable finish first:
            // woken tasks run right after the one that woke them, so without
            // it every reply would cost its own send. Only while some are
            // running: a yield also wakes the other worker thread to steal
            // work, and with nothing to wait for (one request at a time)
            // that wake-up cost more than the whole write (QD1 4 KiB
            // writes: a futex wake and a cross-core hop per request).
            while let Ok(reply) = rx.try_recv() {
                bounded(limit, write_reply(wr, pages, peer, reply)).await?;
            }
            if running.load(Ordering::Acquire) > 0 {
                tokio::task::yield_now().await;
                while let Ok(reply) = rx.try_recv() {
                    bounded(limit, write_reply(wr, pages, peer, reply)).await?;
                }
            }
            bounded(limit, wr.flush()).await?;
        }
        bounded(limit, out.lock().await.wr.shutdown()).await
    }
    .await;
    if let Err(e) = result {
        reply_write_failed(peer, &e);
    }
    // Dropping `rx` releases the permits of replies never written, and makes
    // the reader stop.
}

/// How the writer sends payloads that are file pages.
enum Pages {
    /// Not tried yet: the pipe is made on the first such payload.
    Untried,
    Splice(Splicer),
    /// Splicing is off, or failed to start here; payloads are written as
    /// usual.
    Copy,
}

impl Pages {
    fn splicer(&mut self, peer: SocketAddr) -> Option<&Splicer> {
        if let Pages::Untried = self {
            *self = match Splicer::new() {
                Ok(s) => Pages::Splice(s),
                Err(e) => {
                    debug!(%peer, "no pipe to splice replies through ({e}); copying them");
                    Pages::Copy
                }
            };
        }
        match self {
            Pages::Splice(s) => Some(s),
            _ => None,
        }
    }
}

async fn write_reply(
    wr: &mut ReplyWriter,
    pages: &mut Pages,
    peer: SocketAddr,
    reply: Reply,
) -> io::Result<()> {
    let header = SimpleReply {
        error: reply.error,
        handle: reply.handle,
    }
    .encode();
    wr.put(&header).await?;
    let Some(data) = &reply.payload else {
        return Ok(());
    };
    // Asked in this order so that with splicing off (the default) no large
    // reply pays for a look into the global registry of file views.
    if data.len() >= SPLICE_MIN && !matches!(pages, Pages::Copy) && is_file_view(data) {
        if let Some(splicer) = pages.splicer(peer) {
            // The header (and any replies batched before it) go first.
            wr.flush().await?;
            if splicer.send(wr.socket(), data).await? {
                return Ok(());
            }
            debug!(%peer, "splicing is not supported here; copying replies");
            *pages = Pages::Copy;
        }
    }
    wr.put(data).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_valid() {
        assert_eq!(block_sizes(4096, 32 << 20), (1, 4096, 32 << 20));
        assert_eq!(block_sizes(0, 32 << 20), (1, 512, 32 << 20));
        assert_eq!(block_sizes(3000, 32 << 20), (1, 4096, 32 << 20));
        assert_eq!(block_sizes(u32::MAX, 1 << 20), (1, 1 << 20, 1 << 20));
        assert_eq!(block_sizes(64 << 20, 5000), (1, 4096, 5000));
    }

    #[test]
    fn options_are_validated() {
        assert!(NbdOptions::default().validate().is_ok());
        let o = NbdOptions {
            max_in_flight: 0,
            ..NbdOptions::default()
        };
        assert!(o.validate().is_err());
        let o = NbdOptions {
            max_in_flight_bytes: 0,
            ..NbdOptions::default()
        };
        assert!(o.validate().is_err());
        for (poll, ok) in [
            (Duration::ZERO, true),
            (MAX_BUSY_POLL, true),
            (MAX_BUSY_POLL + Duration::from_micros(1), false),
        ] {
            let o = NbdOptions {
                busy_poll: poll,
                ..NbdOptions::default()
            };
            assert_eq!(o.validate().is_ok(), ok, "busy_poll {poll:?}");
        }
    }
}
