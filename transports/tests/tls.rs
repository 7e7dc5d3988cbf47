//! Peer TLS: TCP+TLS and QUIC pass the transport conformance suite, mutual
//! authentication refuses every peer without a certificate from the cluster
//! CA (logging its address) and accepts a correct one, plain TCP to a TLS
//! port fails cleanly, reloaded certificates apply to new connections
//! while open ones keep running, and QUIC carries a 4 KiB write in one
//! datagram on a path that allows it, also under bulk load, runs calls on
//! lanes with `max_in_flight` bounding a whole connection, closes a
//! connection whose lane broke, and refuses the first QUIC protocol during
//! the handshake.

use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use torus_traits::conformance::transport;
use torus_traits::{
    Error, PeerHandler, PeerListener, PeerRequest, PeerResponse, PeerTransport, Result,
};
use torus_transports::tls::{self, CertPem};
use torus_transports::wire::{self, Handshake, Hello, Version};
use torus_transports::{
    PeerTls, QuicOptions, QuicPeerListener, QuicTransport, TcpOptions, TcpTransport, TlsFiles,
};

const DAY: Duration = Duration::from_secs(86_400);

struct Pong;

#[async_trait::async_trait]
impl PeerHandler for Pong {
    async fn handle(&self, _: PeerRequest) -> Result<PeerResponse> {
        Ok(PeerResponse::Pong)
    }
}

/// Certificates on disk: two cluster CAs and node certificates of every kind.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertPem,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = tls::new_cluster_ca("test cluster CA", 30).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert).unwrap();
        Pki { dir, ca }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Files for a node certificate `name` signed by `ca`, trusting this PKI's CA.
    fn node_signed_by(
        &self,
        ca: &CertPem,
        name: &str,
        from: SystemTime,
        to: SystemTime,
    ) -> TlsFiles {
        let pem = tls::new_node_cert(ca, name, &["127.0.0.1".into()], from, to).unwrap();
        self.files(name, &pem)
    }

    fn node(&self, name: &str) -> TlsFiles {
        let now = SystemTime::now();
        self.node_signed_by(&self.ca.clone(), name, now - DAY, now + DAY)
    }

    fn files(&self, name: &str, pem: &CertPem) -> TlsFiles {
        let cert = self.path(&format!("{name}.crt"));
        let key = self.path(&format!("{name}.key"));
        std::fs::write(&cert, &pem.cert).unwrap();
        std::fs::write(&key, &pem.key).unwrap();
        TlsFiles {
            cert,
            key,
            ca: self.path("ca.pem"),
        }
    }

    /// Every kind of certificate the cluster must refuse, by description.
    fn bad_clients(&self) -> Vec<(&'static str, TlsFiles)> {
        let now = SystemTime::now();
        let self_signed = {
            let key = rcgen::KeyPair::generate().unwrap();
            let params =
                rcgen::CertificateParams::new(vec![tls::PEER_SERVER_NAME.to_string()]).unwrap();
            let cert = params.self_signed(&key).unwrap();
            CertPem {
                cert: cert.pem(),
                key: key.serialize_pem(),
            }
        };
        let other_ca = tls::new_cluster_ca("another CA", 30).unwrap();
        vec![
            ("self-signed", self.files("self-signed", &self_signed)),
            (
                "expired",
                self.node_signed_by(&self.ca.clone(), "expired", now - 10 * DAY, now - DAY),
            ),
            (
                "from another CA",
                self.node_signed_by(&other_ca, "other-ca", now - DAY, now + DAY),
            ),
        ]
    }
}

fn tcp_tls(files: TlsFiles) -> TcpTransport {
    TcpTransport::new(TcpOptions {
        tls: Some(PeerTls::load(files).expect("load certificates")),
        handshake_timeout: Duration::from_secs(3),
        ..TcpOptions::default()
    })
}

/// A QUIC node answering pings: the transport, its listener and address.
async fn quic_pong_server(pki: &Pki) -> (QuicTransport, QuicPeerListener, String) {
    let server = quic(pki.node("server"));
    let l = server.bind("127.0.0.1:0", Arc::new(Pong)).await.unwrap();
    let at = l.local_addr();
    (server, l, at)
}

fn quic(files: TlsFiles) -> QuicTransport {
    QuicTransport::new(QuicOptions {
        connect_timeout: Duration::from_secs(3),
        ..QuicOptions::new(PeerTls::load(files).expect("load certificates"))
    })
}

/// Captures WARN logs of the current thread (tests run on a current-thread
/// runtime, so the server's tasks log here).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn capture() -> (Log, tracing::subscriber::DefaultGuard) {
        let log = Log::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || sink.clone())
            .finish();
        (log, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits (up to 5 s) for a refusal warning naming `port` on loopback.
    async fn expect_refusal_of(&self, port: u16, what: &str) {
        self.expect_warning("refusing peer connection", port, what)
            .await
    }

    /// Waits (up to 5 s) for a warning saying `phrase` and naming `port`
    /// on loopback.
    async fn expect_warning(&self, phrase: &str, port: u16, what: &str) {
        let needle = format!("127.0.0.1:{port}");
        for _ in 0..100 {
            let text = self.text();
            if text
                .lines()
                .any(|l| l.contains("WARN") && l.contains(phrase) && l.contains(&needle))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{what}: no {phrase:?} warning with the peer address {needle}; log:\n{}",
            self.text()
        );
    }
}

fn expect_refused(what: &str, r: Result<PeerResponse>) {
    match r {
        Err(Error::Unavailable(_)) => {}
        other => panic!("{what}: expected the call to be refused as Unavailable, got {other:?}"),
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

fn rustls_client_without_certificate(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    Arc::new(config)
}

// ---------------------------------------------------------------------------
// Conformance

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_with_tls_passes_the_transport_conformance_suite() {
    let pki = Pki::new();
    let t = tcp_tls(pki.node("a"));
    transport::all(&t, &|_| "127.0.0.1:0".to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_passes_the_transport_conformance_suite() {
    let pki = Pki::new();
    let t = quic(pki.node("a"));
    transport::all(&t, &|_| "127.0.0.1:0".to_string()).await;
}

/// A transport of `kind` (`"tcp+tls"` or `"quic"`) with these certificates.
fn secure(kind: &str, files: TlsFiles) -> Box<dyn PeerTransport> {
    match kind {
        "quic" => Box::new(quic(files)),
        _ => Box::new(tcp_tls(files)),
    }
}

const SECURE: [&str; 2] = ["tcp+tls", "quic"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_their_own_certificates_talk_both_ways() {
    let pki = Pki::new();
    for kind in SECURE {
        let a = secure(kind, pki.node("a"));
        let b = secure(kind, pki.node("b"));
        let la = a.listen("127.0.0.1:0", Arc::new(Pong)).await.unwrap();
        let lb = b.listen("127.0.0.1:0", Arc::new(Pong)).await.unwrap();
        let b_to_a = b.call(&la.local_addr(), PeerRequest::Ping).await;
        assert_eq!(b_to_a.unwrap(), PeerResponse::Pong, "{kind}");
        let a_to_b = a.call(&lb.local_addr(), PeerRequest::Ping).await;
        assert_eq!(a_to_b.unwrap(), PeerResponse::Pong, "{kind}");
    }
}

/// Peers agree on TLS 1.3 with AES-128-GCM (the cheapest of the strong
/// suites for bulk data), while a client that prefers AES-256 still connects.
#[tokio::test]
async fn peers_agree_on_aes_128_gcm_and_others_still_connect() {
    let pki = Pki::new();
    let a = PeerTls::load(pki.node("a")).unwrap();
    let b = PeerTls::load(pki.node("b")).unwrap();
    let handshake = |client: Arc<rustls::ClientConfig>| {
        let server = tokio_rustls::TlsAcceptor::from(a.server_config());
        async move {
            let (c, s) = tokio::io::duplex(64 * 1024);
            let connector = tokio_rustls::TlsConnector::from(client);
            let (c, s) = tokio::join!(
                connector.connect(PeerTls::server_name(), c),
                server.accept(s)
            );
            let (c, s) = (c.unwrap(), s.unwrap());
            let suite = c.get_ref().1.negotiated_cipher_suite().unwrap().suite();
            assert_eq!(
                suite,
                s.get_ref().1.negotiated_cipher_suite().unwrap().suite()
            );
            suite
        }
    };
    assert_eq!(
        handshake(b.client_config()).await,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    // A client with ring's own order, AES-256-GCM first, and the same node
    // certificate.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    assert_eq!(
        provider.cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
    let files = pki.node("c");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&files.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .collect::<std::result::Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let mut other = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    other.alpn_protocols = vec![tls::ALPN.to_vec()];
    assert_eq!(
        handshake(Arc::new(other)).await,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
}

// ---------------------------------------------------------------------------
// Mutual authentication

/// What a node with default settings says in its handshake.
fn default_hello() -> Hello {
    Hello {
        version: Version::CURRENT,
        max_frame: wire::DEFAULT_MAX_FRAME,
        cluster: None,
        peer: None,
    }
}

/// A valid peer hello, as a client sends it first on a connection or lane.
fn hello() -> bytes::Bytes {
    wire::encode_handshake(&Handshake::Hello(default_hello())).unwrap()
}

/// Connects over TCP with `config`, completes TLS if the server lets it, and
/// sends a valid peer hello. Returns the client's port and whether the server
/// answered the hello (rather than failing the handshake or closing).
async fn raw_tcp_tls(addr: &str, config: Arc<rustls::ClientConfig>) -> (u16, bool) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let connector = tokio_rustls::TlsConnector::from(config);
    let Ok(mut s) = connector.connect(PeerTls::server_name(), tcp).await else {
        return (port, false);
    };
    if s.write_all(&hello()).await.is_err() {
        return (port, false);
    }
    let mut buf = [0u8; 256];
    let read = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the server must answer or close within 5 s");
    (port, matches!(read, Ok(n) if n > 0))
}

/// Opens a QUIC connection with `config` and sends a valid peer hello on a
/// stream. Returns the client's port and whether the hello was answered.
async fn raw_quic(addr: &str, config: Arc<rustls::ClientConfig>) -> (u16, bool) {
    let (port, reply) = raw_quic_send(addr, config, &hello()).await;
    (port, reply.is_some_and(|r| !r.is_empty()))
}

/// Opens a QUIC connection with `config`, sends `bytes` on one stream and
/// returns the client's port and the stream's reply (`None`: refused or reset).
async fn raw_quic_send(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    bytes: &[u8],
) -> (u16, Option<Vec<u8>>) {
    raw_quic_send_as(torus_transports::quic::ALPN, addr, config, bytes).await
}

/// `raw_quic_send` offering `alpn` as the application protocol.
async fn raw_quic_send_as(
    alpn: &[u8],
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    bytes: &[u8],
) -> (u16, Option<Vec<u8>>) {
    let mut config = (*config).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(config)).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = endpoint.local_addr().unwrap().port();
    let attempt = async {
        let conn = endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(crypto)),
                addr.parse().unwrap(),
                tls::PEER_SERVER_NAME,
            )
            .ok()?
            .await
            .ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(bytes).await.ok()?;
        send.finish().ok()?;
        recv.read_to_end(1 << 16).await.ok()
    };
    let reply = timeout(Duration::from_secs(10), attempt)
        .await
        .expect("the server must answer or refuse within 10 s");
    (port, reply)
}

async fn raw(kind: &str, addr: &str, config: Arc<rustls::ClientConfig>) -> (u16, bool) {
    match kind {
        "quic" => raw_quic(addr, config).await,
        _ => raw_tcp_tls(addr, config).await,
    }
}

#[tokio::test]
async fn peers_without_a_certificate_from_the_cluster_ca_are_refused_and_logged() {
    let (log, _guard) = Log::capture();
    let pki = Pki::new();
    for kind in SECURE {
        let server = secure(kind, pki.node("server"));
        let l = server.listen("127.0.0.1:0", Arc::new(Pong)).await.unwrap();
        let at = l.local_addr();

        // The correct certificate works, raw and through the transport.
        let good = PeerTls::load(pki.node("good")).unwrap();
        let (_, answered) = raw(kind, &at, good.client_config()).await;
        assert!(
            answered,
            "{kind}: a client with a correct certificate must be served"
        );
        let client = secure(kind, pki.node("good"));
        assert_eq!(
            client.call(&at, PeerRequest::Ping).await.unwrap(),
            PeerResponse::Pong
        );

        // No certificate at all.
        let (port, answered) = raw(
            kind,
            &at,
            rustls_client_without_certificate(&pki.path("ca.pem")),
        )
        .await;
        assert!(
            !answered,
            "{kind}: a client without a certificate was served"
        );
        log.expect_refusal_of(port, &format!("{kind}, no certificate"))
            .await;

        // Self-signed, expired, and signed by another CA.
        for (what, files) in pki.bad_clients() {
            let bad = PeerTls::load(files.clone()).unwrap();
            let (port, answered) = raw(kind, &at, bad.client_config()).await;
            assert!(
                !answered,
                "{kind}: a client with a {what} certificate was served"
            );
            log.expect_refusal_of(port, &format!("{kind}, {what} certificate"))
                .await;
            let client = secure(kind, files);
            expect_refused(
                &format!("{kind}, {what}"),
                client.call(&at, PeerRequest::Ping).await,
            );
        }
        // The server still serves the good client.
        assert_eq!(
            client.call(&at, PeerRequest::Ping).await.unwrap(),
            PeerResponse::Pong
        );
    }
}

#[tokio::test]
async fn a_client_refuses_a_server_outside_the_cluster_ca() {
    let pki = Pki::new();
    let other = Pki::new();
    for kind in SECURE {
        let server = secure(kind, other.node("stranger"));
        let l = server.listen("127.0.0.1:0", Arc::new(Pong)).await.unwrap();
        let client = secure(kind, pki.node("good"));
        expect_refused(kind, client.call(&l.local_addr(), PeerRequest::Ping).await);
    }
}

#[tokio::test]
async fn plain_tcp_to_a_tls_port_fails_cleanly() {
    let (log, _guard) = Log::capture();
    let pki = Pki::new();
    let server = tcp_tls(pki.node("server"));
    let l = server.bind("127.0.0.1:0", Arc::new(Pong)).await.unwrap();
    let at = l.local_addr();
    // The plain transport gets an error, not a hang.
    let plain = TcpTransport::new(TcpOptions {
        handshake_timeout: Duration::from_secs(3),
        ..TcpOptions::default()
    });
    let r = timeout(Duration::from_secs(10), plain.call(&at, PeerRequest::Ping))
        .await
        .expect("a plain call to a TLS port must not hang");
    expect_refused("plain TCP to TLS", r);
    // A raw plain hello is refused and logged with the client's address.
    let mut s = TcpStream::connect(&at).await.unwrap();
    let port = s.local_addr().unwrap().port();
    let hello = Hello {
        version: Version::CURRENT,
        max_frame: wire::DEFAULT_MAX_FRAME,
        cluster: None,
        peer: None,
    };
    s.write_all(&wire::encode_handshake(&Handshake::Hello(hello)).unwrap())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the server must close a plain connection");
    assert!(
        !buf.starts_with(&wire::MAGIC),
        "a TLS port answered a plain peer handshake"
    );
    log.expect_refusal_of(port, "plain TCP").await;
    // And TLS peers are still served.
    let good = tcp_tls(pki.node("good"));
    assert_eq!(
        good.call(&at, PeerRequest::Ping).await.unwrap(),
        PeerResponse::Pong
    );
    assert_eq!(port_of(&at), l.socket_addr().port());
}

// ---------------------------------------------------------------------------
// Reload

/// Copies `from`'s files over `to`'s paths and moves their modification
/// time forward, as an operator replacing certificates would.
fn replace_files(from: &TlsFiles, to: &TlsFiles) {
    let later = SystemTime::now() + Duration::from_secs(10);
    for (src, dst) in [
        (&from.cert, &to.cert),
        (&from.key, &to.key),
        (&from.ca, &to.ca),
    ] {
        std::fs::copy(src, dst).unwrap();
        std::fs::File::options()
            .write(true)
            .open(dst)
            .unwrap()
            .set_modified(later)
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificates_apply_to_new_connections_and_open_ones_keep_running() {
    for kind in SECURE {
        let old = Pki::new();
        let new = Pki::new();
        let server_files = old.node("server");
        let server_tls = PeerTls::load(server_files.clone()).unwrap();
        let server: Box<dyn PeerTransport> = match kind {
            "quic" => Box::new(QuicTransport::new(QuicOptions::new(server_tls.clone()))),
            _ => Box::new(TcpTransport::new(TcpOptions {
                tls: Some(server_tls.clone()),
                ..TcpOptions::default()
            })),
        };
        let l = server.listen("127.0.0.1:0", Arc::new(Pong)).await.unwrap();
        let at = l.local_addr();
        let old_client = secure(kind, old.node("old-client"));
        assert_eq!(
            old_client.call(&at, PeerRequest::Ping).await.unwrap(),
            PeerResponse::Pong
        );

        // Unchanged files: nothing to reload.
        assert!(!server_tls.reload_if_changed().unwrap(), "{kind}");
        // The cluster moves to a new CA: the server's files are replaced.
        replace_files(&new.node("server"), &server_files);
        assert!(
            server_tls.reload_if_changed().unwrap(),
            "{kind}: change not seen"
        );
        assert_eq!(server_tls.reloads(), 1);

        // The open connection keeps running.
        assert_eq!(
            old_client.call(&at, PeerRequest::Ping).await.unwrap(),
            PeerResponse::Pong,
            "{kind}: an open connection was dropped by the reload"
        );
        // A new connection gets the new certificates: a new-CA client is
        // served, a fresh old-CA client is refused.
        let new_client = secure(kind, new.node("new-client"));
        assert_eq!(
            new_client.call(&at, PeerRequest::Ping).await.unwrap(),
            PeerResponse::Pong,
            "{kind}"
        );
        let fresh_old = secure(kind, old.node("fresh-old-client"));
        expect_refused(kind, fresh_old.call(&at, PeerRequest::Ping).await);
    }
}

#[tokio::test]
async fn a_broken_replacement_keeps_the_previous_certificates() {
    let pki = Pki::new();
    let files = pki.node("server");
    let tls = PeerTls::load(files.clone()).unwrap();
    std::fs::write(&files.key, "not a key").unwrap();
    let e = tls.reload().expect_err("a broken key must not load");
    assert!(e.to_string().contains("server.key"), "{e}");
    let t = TcpTransport::new(TcpOptions {
        tls: Some(tls),
        ..TcpOptions::default()
    });
    let l = t.bind("127.0.0.1:0", Arc::new(Pong)).await.unwrap();
    let client = tcp_tls(pki.node("client"));
    assert_eq!(
        client
            .call(&l.local_addr(), PeerRequest::Ping)
            .await
            .unwrap(),
        PeerResponse::Pong
    );
}

#[test]
fn missing_or_bad_files_are_errors_naming_the_file() {
    let pki = Pki::new();
    let mut files = pki.node("n");
    files.ca = pki.path("nope.pem");
    let e = PeerTls::load(files.clone()).expect_err("missing CA");
    assert!(e.to_string().contains("nope.pem"), "{e}");
    files.ca = files.key.clone();
    let e = PeerTls::load(files).expect_err("a key is not a CA certificate");
    assert!(e.to_string().contains("n.key"), "{e}");
}

#[tokio::test]
async fn junk_on_a_quic_stream_closes_only_that_connection_with_a_warning() {
    let (log, _guard) = Log::capture();
    let pki = Pki::new();
    let (_server, _listener, at) = quic_pong_server(&pki).await;
    let client = quic(pki.node("client"));
    assert_eq!(
        client.call(&at, PeerRequest::Ping).await.unwrap(),
        PeerResponse::Pong
    );
    let config = PeerTls::load(pki.node("raw")).unwrap().client_config();
    let reply = wire::encode_response(1, &Ok(PeerResponse::Pong), wire::DEFAULT_MAX_FRAME)
        .unwrap()
        .to_vec();
    let mut over_limit = vec![0xff; 4];
    over_limit.extend_from_slice(&[0; 16]);
    let accept = wire::encode_handshake(&Handshake::Accept(default_hello())).unwrap();
    // Junk instead of the hello, and after a valid hello.
    let after_hello = |junk: &[u8]| [&hello()[..], junk].concat();
    for junk in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        reply.clone(),
        over_limit.clone(),
        vec![],
        after_hello(b"GET / HTTP/1.1\r\n\r\n"),
        after_hello(&reply),
        after_hello(&over_limit),
        after_hello(&over_limit[..6]),
    ] {
        let (port, answer) = raw_quic_send(&at, config.clone(), &junk).await;
        // A valid hello is accepted; nothing after it is.
        assert!(
            answer.is_none_or(|a| a.is_empty() || a == accept),
            "junk {junk:?} got an answer"
        );
        log.expect_warning("closing peer connection", port, &format!("junk {junk:?}"))
            .await;
    }
    // Other connections carry on.
    assert_eq!(
        client.call(&at, PeerRequest::Ping).await.unwrap(),
        PeerResponse::Pong
    );
}

#[tokio::test]
async fn watching_reloads_when_the_files_change() {
    let old = Pki::new();
    let new = Pki::new();
    let files = old.node("server");
    let tls = PeerTls::load(files.clone()).unwrap();
    let _watch = tls.watch(Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(tls.reloads(), 0, "reloaded without a change");
    replace_files(&new.node("server"), &files);
    for _ in 0..250 {
        if tls.reloads() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tls.reloads(), 1, "the change was not picked up within 5 s");
    // The watcher ends with the certificates it watches.
    let watch = tls.watch(Duration::from_millis(20));
    drop(tls);
    timeout(Duration::from_secs(5), watch)
        .await
        .expect("the watcher must stop once its PeerTls is dropped")
        .unwrap();
}

// ---------------------------------------------------------------------------
// QUIC datagram size

/// Answers every request with `Done` (the payload is dropped).
struct Sink;

#[async_trait::async_trait]
impl PeerHandler for Sink {
    async fn handle(&self, _: PeerRequest) -> Result<PeerResponse> {
        Ok(PeerResponse::Done)
    }
}

/// MTU discovery takes a QUIC connection past the 1452-byte default on a
/// path that carries more (loopback), so a 4 KiB write is one datagram; and
/// bulk transfers at that size keep it: GSO batches that went over the
/// 64 KiB datagram limit were dropped without a word by the UDP layer, which
/// quinn took for an MTU black hole and answered with 1200-byte packets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_sends_a_4k_write_in_one_datagram_and_keeps_that_under_bulk_load() {
    use futures::StreamExt;
    use torus_traits::{ChunkRef, Epoch, VolumeId};
    let pki = Pki::new();
    let (a, b) = (quic(pki.node("a")), quic(pki.node("b")));
    let lb = b.listen("127.0.0.1:0", Arc::new(Sink)).await.unwrap();
    let addr = lb.local_addr();
    let write = |len: usize, i: u64| PeerRequest::Write {
        chunk: ChunkRef::new(VolumeId(1), i),
        offset: 0,
        data: bytes::Bytes::from(vec![i as u8; len]),
        epoch: Epoch(1),
    };
    let run = |len: usize, count: u64, depth: usize| {
        let a = &a;
        let addr = &addr;
        futures::stream::iter(0..count)
            .map(move |i| async move { a.call(addr, write(len, i)).await })
            .buffer_unordered(depth)
            .for_each(|r| async move { assert_eq!(r.unwrap(), PeerResponse::Done) })
    };
    // A 4 KiB write with its frame and QUIC headers fits in this MTU.
    const FITS_4K: u16 = 4200;
    // Discovery probes on a connection with traffic; give it a bounded while.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        run(4096, 64, 8).await;
        let mtu = a.stats(&addr).expect("an open connection").path.current_mtu;
        if mtu >= FITS_4K {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "path MTU still {mtu} after 10 s on loopback"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 64 MiB in 1 MiB requests, 8 in flight: full GSO batches all along.
    run(1 << 20, 64, 8).await;
    run(4096, 256, 32).await;
    let path = a.stats(&addr).expect("an open connection").path;
    assert_eq!(path.black_holes_detected, 0, "{path:?}");
    assert!(path.current_mtu >= FITS_4K, "{path:?}");
}

/// Concurrent calls on one QUIC connection run on its lanes, with no
/// stream opened per call, and a peer that goes away with calls done is a
/// clean close for the server, not a protocol error (its lanes end with the
/// connection).
#[tokio::test]
async fn quic_lanes_carry_concurrent_calls_and_a_client_leaving_is_no_protocol_error() {
    use futures::StreamExt;
    let (log, _guard) = Log::capture();
    let pki = Pki::new();
    let (_server, _listener, at) = quic_pong_server(&pki).await;
    let client = quic(pki.node("client"));
    let replies: Vec<_> = futures::stream::iter(0..200)
        .map(|_| client.call(&at, PeerRequest::Ping))
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(replies.iter().all(|r| matches!(r, Ok(PeerResponse::Pong))));
    // A stream per call would have made the server grant new streams.
    let stats = client.stats(&at).expect("an open connection");
    assert_eq!(stats.frame_rx.max_streams_bidi, 0, "{stats:?}");
    drop(client);
    // The server notices the close within its own time; give it a bounded while.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = quic(pki.node("other"));
    assert_eq!(
        other.call(&at, PeerRequest::Ping).await.unwrap(),
        PeerResponse::Pong
    );
    let text = log.text();
    assert!(
        !text.contains("closing peer connection"),
        "a client leaving was logged as a protocol error:\n{text}"
    );
}

/// A node of the first QUIC protocol (a stream per request, protocol id
/// `torus-peer/1`) is refused during the TLS handshake, with a warning
/// naming it, instead of sending requests this node would read as junk.
#[tokio::test]
async fn quic_refuses_the_first_protocol_version_during_the_handshake() {
    let (log, _guard) = Log::capture();
    let pki = Pki::new();
    let (_server, _listener, at) = quic_pong_server(&pki).await;
    let config = PeerTls::load(pki.node("old")).unwrap().client_config();
    let (port, answer) = raw_quic_send_as(b"torus-peer/1", &at, config, &hello()).await;
    assert!(answer.is_none(), "an old node was served: {answer:?}");
    log.expect_refusal_of(port, "a torus-peer/1 client").await;
}

/// Counts the requests running at once, each for a while.
#[derive(Default)]
struct Slow {
    running: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl PeerHandler for Slow {
    async fn handle(&self, _: PeerRequest) -> Result<PeerResponse> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.running.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.running.fetch_sub(1, SeqCst);
        Ok(PeerResponse::Pong)
    }
}

/// `max_in_flight` bounds the requests a peer runs on one connection, over
/// all the lanes it opens (not per lane).
#[tokio::test]
async fn quic_max_in_flight_bounds_a_whole_connection_over_its_lanes() {
    use futures::StreamExt;
    let pki = Pki::new();
    let server = QuicTransport::new(QuicOptions {
        max_in_flight: 4,
        ..QuicOptions::new(PeerTls::load(pki.node("server")).unwrap())
    });
    let slow = Arc::new(Slow::default());
    let l = server.bind("127.0.0.1:0", slow.clone()).await.unwrap();
    let at = l.local_addr();
    let client = QuicTransport::new(QuicOptions {
        lanes: torus_transports::quic::MAX_LANES,
        ..QuicOptions::new(PeerTls::load(pki.node("client")).unwrap())
    });
    let replies: Vec<_> = futures::stream::iter(0..40)
        .map(|_| client.call(&at, PeerRequest::Ping))
        .buffer_unordered(40)
        .collect()
        .await;
    assert!(replies.iter().all(|r| matches!(r, Ok(PeerResponse::Pong))));
    let most = slow.most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(most <= 4, "{most} requests ran at once on one connection");
    assert!(most >= 2, "calls did not run concurrently ({most})");
}

/// A lane that breaks on the client side (its peer sent junk) closes the
/// QUIC connection at once, not at the next call to that peer.
#[tokio::test]
async fn a_quic_lane_broken_by_its_peer_closes_the_connection_at_once() {
    let pki = Pki::new();
    let mut tls = (*PeerTls::load(pki.node("fake")).unwrap().server_config()).clone();
    tls.alpn_protocols = vec![torus_transports::quic::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let at = endpoint.local_addr().unwrap().to_string();
    // A fake peer: accepts both lanes' hellos, then sends junk on the first.
    let fake = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let accept = wire::encode_handshake(&Handshake::Accept(default_hello())).unwrap();
        let mut lanes = Vec::new();
        for _ in 0..torus_transports::quic::DEFAULT_LANES {
            let (mut send, recv) = conn.accept_bi().await.unwrap();
            send.write_all(&accept).await.unwrap();
            lanes.push((send, recv));
        }
        lanes[0]
            .0
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let closed = timeout(Duration::from_secs(2), conn.closed()).await.is_ok();
        (closed, endpoint)
    });
    let client = QuicTransport::new(QuicOptions {
        request_timeout: Duration::from_millis(500),
        ..QuicOptions::new(PeerTls::load(pki.node("client")).unwrap())
    });
    // The call fails (junk, or no answer from the fake); nothing calls again.
    assert!(client.call(&at, PeerRequest::Ping).await.is_err());
    let (closed, _endpoint) = fake.await.unwrap();
    assert!(
        closed,
        "the client kept a connection with a broken lane open"
    );
}
