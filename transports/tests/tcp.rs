//! `TcpTransport`: the conformance suite, hostile input on the port, dying
//! servers, reconnection, and many calls multiplexed on one connection.

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};
use torus_traits::conformance::transport;
use torus_traits::{
    ChunkRef, Epoch, Error, PeerHandler, PeerListener, PeerRequest, PeerResponse, PeerTransport,
    Result, VolumeId,
};
use torus_transports::wire::{self, Handshake, Hello, Version};
use torus_transports::{TcpOptions, TcpPeerListener, TcpTransport};

/// Test handler. `Read` sleeps `offset` milliseconds, then answers `len` bytes
/// of the chunk index (low byte); `Write` echoes its payload; `DeleteChunk` of
/// index 666 panics. It records how many requests run at once.
#[derive(Default)]
struct Handler {
    running: AtomicUsize,
    peak: AtomicUsize,
}

#[async_trait]
impl PeerHandler for Handler {
    async fn handle(&self, request: PeerRequest) -> Result<PeerResponse> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let reply = match request {
            PeerRequest::Ping => Ok(PeerResponse::Pong),
            PeerRequest::Read { chunk, offset, len } => {
                tokio::time::sleep(Duration::from_millis(offset)).await;
                Ok(PeerResponse::Data(Bytes::from(vec![
                    chunk.index as u8;
                    len as usize
                ])))
            }
            PeerRequest::Write { data, .. } => Ok(PeerResponse::Data(data)),
            PeerRequest::DeleteChunk { chunk, .. } if chunk.index == 666 => {
                self.running.fetch_sub(1, Ordering::SeqCst);
                panic!("handler bug")
            }
            _ => Ok(PeerResponse::Done),
        };
        self.running.fetch_sub(1, Ordering::SeqCst);
        reply
    }
}

fn read(index: u64, sleep_ms: u64, len: u64) -> PeerRequest {
    PeerRequest::Read {
        chunk: ChunkRef::new(VolumeId(1), index),
        offset: sleep_ms,
        len,
    }
}

async fn server(opts: TcpOptions) -> (TcpTransport, TcpPeerListener, Arc<Handler>) {
    let t = TcpTransport::new(opts);
    let h = Arc::new(Handler::default());
    let l = t.bind("127.0.0.1:0", h.clone()).await.expect("bind");
    (t, l, h)
}

/// Reads until the server closes the connection (EOF or reset), within 5 s;
/// returns what it sent before closing.
async fn expect_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match timeout(end - Instant::now(), s.read(&mut buf)).await {
            Err(_) => panic!("server did not close the connection within 5 s"),
            Ok(Ok(0)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Ok(Err(e)) => panic!("unexpected read error: {e}"),
        }
    }
}

/// The handshake of a peer of this version, in no cluster, without an id.
fn plain_hello() -> Hello {
    Hello {
        version: Version::CURRENT,
        max_frame: wire::DEFAULT_MAX_FRAME,
        cluster: None,
        peer: None,
    }
}

/// A fake server's side of the handshake on an accepted connection: reads
/// the client's hello and accepts it.
async fn accept_handshake(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut b = [0u8; 512];
    while wire::decode_handshake(&buf).unwrap().is_none() {
        let n = s.read(&mut b).await.unwrap();
        buf.extend_from_slice(&b[..n]);
    }
    s.write_all(&wire::encode_handshake(&Handshake::Accept(plain_hello())).unwrap())
        .await
        .unwrap();
}

/// A raw connection that has completed a valid handshake.
async fn handshaken(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&wire::encode_handshake(&Handshake::Hello(plain_hello())).unwrap())
        .await
        .unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some((h, used)) = wire::decode_handshake(&buf).expect("server handshake") {
            assert!(matches!(h, Handshake::Accept(_)), "{h:?}");
            assert_eq!(used, buf.len(), "nothing may follow the accept yet");
            return s;
        }
        let mut b = [0u8; 256];
        let n = timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("accept in time")
            .expect("read accept");
        assert!(n > 0, "server closed during the handshake");
        buf.extend_from_slice(&b[..n]);
    }
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A normal call succeeds, and the listener holds only the connections it should.
async fn still_serves(t: &TcpTransport, l: &TcpPeerListener) {
    assert_eq!(
        t.call(&l.local_addr(), PeerRequest::Ping)
            .await
            .expect("a normal call after bad input"),
        PeerResponse::Pong
    );
}

fn pseudo_random(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_transport_conformance_suite() {
    let t = TcpTransport::new(TcpOptions::default());
    transport::all(&t, &|_| "127.0.0.1:0".to_string()).await;
}

#[tokio::test]
async fn passes_the_conformance_suite_with_a_connection_pool() {
    let t = TcpTransport::new(TcpOptions {
        connections_per_peer: 3,
        ..TcpOptions::default()
    });
    transport::all(&t, &|_| "127.0.0.1:0".to_string()).await;
}

#[tokio::test]
async fn random_bytes_close_only_that_connection() {
    let (t, l, _) = server(TcpOptions::default()).await;
    let addr = l.local_addr();
    still_serves(&t, &l).await;
    for seed in 1..=5u64 {
        let mut junk = pseudo_random(4096, seed);
        junk[0] = b'X'; // never the magic's first byte, whatever the seed
        let mut s = TcpStream::connect(&addr).await.unwrap();
        // The server may close (and reset) before everything is written.
        let _ = s.write_all(&junk).await;
        assert!(expect_closed(&mut s).await.is_empty(), "no reply to junk");
        still_serves(&t, &l).await;
    }
    wait_for("junk connections to close", || l.open_connections() == 1).await;
}

#[tokio::test]
async fn bad_magic_is_logged_with_the_peer_address() {
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
    let log = Log::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || sink.clone())
        .finish();
    // Current-thread runtime: the server's tasks log on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let (t, l, _) = server(TcpOptions::default()).await;
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    let me = s.local_addr().unwrap().to_string();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    expect_closed(&mut s).await;
    still_serves(&t, &l).await;
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("WARN") && text.contains(&me) && text.contains("bad magic"),
        "expected a warning naming {me} and the reason, got:\n{text}"
    );
}

#[tokio::test]
async fn wrong_version_is_refused_with_a_reason() {
    let (t, l, _) = server(TcpOptions::default()).await;
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    let hello = Hello {
        version: Version {
            major: Version::CURRENT.major + 1,
            minor: 0,
        },
        max_frame: wire::DEFAULT_MAX_FRAME,
        cluster: None,
        peer: None,
    };
    s.write_all(&wire::encode_handshake(&Handshake::Hello(hello)).unwrap())
        .await
        .unwrap();
    let reply = expect_closed(&mut s).await;
    let (h, _) = wire::decode_handshake(&reply)
        .expect("a readable refusal")
        .expect("a complete refusal before the close");
    match h {
        Handshake::Refuse { version, reason } => {
            assert_eq!(version, Version::CURRENT);
            assert!(
                reason.contains("incompatible protocol version 2.0"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    still_serves(&t, &l).await;
}

#[tokio::test]
async fn a_client_refused_for_its_version_gets_a_clear_error() {
    // A fake server of a later major version refuses whatever it is sent.
    let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = fake.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = fake.accept().await.unwrap();
        let mut b = [0u8; 512];
        let _ = s.read(&mut b).await;
        let refuse = Handshake::Refuse {
            version: Version { major: 2, minor: 0 },
            reason: "this peer speaks 2.x only".into(),
        };
        s.write_all(&wire::encode_handshake(&refuse).unwrap())
            .await
            .unwrap();
    });
    let t = TcpTransport::new(TcpOptions::default());
    let e = t.call(&addr, PeerRequest::Ping).await.unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&addr) && msg.contains("2.x only"), "{msg}");
}

#[tokio::test]
async fn cluster_mismatch_is_refused() {
    let (_, l, _) = server(TcpOptions {
        cluster: Some("prod".into()),
        ..TcpOptions::default()
    })
    .await;
    let t = TcpTransport::new(TcpOptions {
        cluster: Some("staging".into()),
        ..TcpOptions::default()
    });
    let e = t
        .call(&l.local_addr(), PeerRequest::Ping)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert!(e.to_string().contains("cluster mismatch"), "{e}");
    let same = TcpTransport::new(TcpOptions {
        cluster: Some("prod".into()),
        ..TcpOptions::default()
    });
    same.call(&l.local_addr(), PeerRequest::Ping).await.unwrap();
}

#[tokio::test]
async fn truncated_frame_closes_the_connection() {
    let (t, l, _) = server(TcpOptions::default()).await;
    let mut s = handshaken(&l.local_addr()).await;
    // A frame announcing 100 bytes, cut after 10, then end of stream.
    let mut f = 100u32.to_be_bytes().to_vec();
    f.extend_from_slice(&[0; 10]);
    s.write_all(&f).await.unwrap();
    s.shutdown().await.unwrap();
    assert!(expect_closed(&mut s).await.is_empty());
    still_serves(&t, &l).await;
}

/// A client that stops in the middle of a frame, keeping the connection
/// open: the server gives up on it after the request timeout; one that is
/// merely idle between frames keeps its connection.
#[tokio::test]
async fn a_frame_stalled_halfway_closes_the_connection_but_idleness_does_not() {
    let (t, l, _) = server(TcpOptions {
        request_timeout: Duration::from_millis(300),
        ..TcpOptions::default()
    })
    .await;
    let mut idle = handshaken(&l.local_addr()).await;
    let mut s = handshaken(&l.local_addr()).await;
    let mut f = 100u32.to_be_bytes().to_vec();
    f.extend_from_slice(&[0; 10]);
    s.write_all(&f).await.unwrap();
    let started = Instant::now();
    assert!(expect_closed(&mut s).await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Idle for longer than that: still open (nothing to read, no EOF).
    let mut b = [0u8; 16];
    assert!(
        timeout(Duration::from_millis(200), idle.read(&mut b))
            .await
            .is_err(),
        "an idle connection must stay open"
    );
    still_serves(&t, &l).await;
}

#[tokio::test]
async fn truncated_handshake_closes_the_connection() {
    let (t, l, _) = server(TcpOptions::default()).await;
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    s.write_all(b"TRS").await.unwrap();
    s.shutdown().await.unwrap();
    assert!(expect_closed(&mut s).await.is_empty());
    still_serves(&t, &l).await;
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_handshake_timeout() {
    let (t, l, _) = server(TcpOptions {
        handshake_timeout: Duration::from_millis(200),
        ..TcpOptions::default()
    })
    .await;
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    assert!(expect_closed(&mut s).await.is_empty());
    still_serves(&t, &l).await;
}

#[tokio::test]
async fn frame_over_the_limit_closes_the_connection() {
    let (t, l, _) = server(TcpOptions::default()).await;
    for len in [wire::DEFAULT_MAX_FRAME + 1, u32::MAX] {
        let mut s = handshaken(&l.local_addr()).await;
        s.write_all(&len.to_be_bytes()).await.unwrap();
        // Closed on the prefix alone: nothing else is sent.
        assert!(expect_closed(&mut s).await.is_empty());
        still_serves(&t, &l).await;
    }
    // A smaller configured limit is enforced too.
    let (t, l, _) = server(TcpOptions {
        max_frame: 64 * 1024,
        ..TcpOptions::default()
    })
    .await;
    let mut s = handshaken(&l.local_addr()).await;
    s.write_all(&(64 * 1024u32 + 1).to_be_bytes())
        .await
        .unwrap();
    assert!(expect_closed(&mut s).await.is_empty());
    still_serves(&t, &l).await;
}

#[tokio::test]
async fn unknown_kind_and_reply_frames_close_the_connection() {
    let (t, l, _) = server(TcpOptions::default()).await;
    // Unknown kind.
    let mut s = handshaken(&l.local_addr()).await;
    let mut f = 9u32.to_be_bytes().to_vec();
    f.extend_from_slice(&1u64.to_be_bytes());
    f.push(0x7f);
    s.write_all(&f).await.unwrap();
    assert!(expect_closed(&mut s).await.is_empty());
    // A reply where a request belongs.
    let mut s = handshaken(&l.local_addr()).await;
    let pong = wire::encode_response(1, &Ok(PeerResponse::Pong), wire::DEFAULT_MAX_FRAME).unwrap();
    s.write_all(&pong.to_vec()).await.unwrap();
    assert!(expect_closed(&mut s).await.is_empty());
    // A valid frame with garbage after it: the connection ends at the garbage;
    // the valid request's reply may or may not have left before.
    let mut s = handshaken(&l.local_addr()).await;
    let ping = wire::encode_request(5, &PeerRequest::Ping, wire::DEFAULT_MAX_FRAME).unwrap();
    let mut f = ping.to_vec();
    f.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 6, 0xee]);
    s.write_all(&f).await.unwrap();
    let got = expect_closed(&mut s).await;
    if !got.is_empty() {
        let frame = wire::decode_frame(Bytes::from(got).slice(wire::LEN_PREFIX..)).unwrap();
        assert_eq!(frame.id, 5);
        assert!(matches!(
            frame.message,
            wire::Message::Response(Ok(PeerResponse::Pong))
        ));
    }
    still_serves(&t, &l).await;
    wait_for("bad connections to close", || l.open_connections() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_calls_share_one_connection_and_reply_out_of_order() {
    let (t, l, _) = server(TcpOptions::default()).await;
    let addr = l.local_addr();
    let finished = Arc::new(Mutex::new(Vec::new()));
    let calls = (0..200u64).map(|i| {
        let (t, addr, finished) = (t.clone(), addr.clone(), finished.clone());
        async move {
            // Earlier requests sleep longer, so replies come back reversed.
            let r = t.call(&addr, read(i, 400 - 2 * i, 16)).await.expect("read");
            assert_eq!(
                r,
                PeerResponse::Data(Bytes::from(vec![i as u8; 16])),
                "reply {i}"
            );
            finished.lock().unwrap().push(i);
        }
    });
    let started = Instant::now();
    futures::future::join_all(calls).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls were not concurrent"
    );
    assert_eq!(
        l.connections_accepted(),
        1,
        "calls must share one connection"
    );
    let order = finished.lock().unwrap().clone();
    assert_eq!(order.len(), 200);
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "replies came back in order"
    );
}

#[tokio::test]
async fn a_full_connection_stops_reading_and_still_completes_everything() {
    let (t, l, h) = server(TcpOptions {
        max_in_flight: 4,
        ..TcpOptions::default()
    })
    .await;
    let addr = l.local_addr();
    let calls = (0..64u64).map(|i| {
        let (t, addr) = (t.clone(), addr.clone());
        async move { t.call(&addr, read(i, 5, 8)).await.expect("read") }
    });
    futures::future::join_all(calls).await;
    let peak = h.peak.load(Ordering::SeqCst);
    assert!(peak <= 4, "{peak} requests ran at once, limit 4");
}

#[tokio::test]
async fn server_dying_mid_call_fails_pending_calls_quickly() {
    let (t, l, _) = server(TcpOptions::default()).await;
    let addr = l.local_addr();
    t.call(&addr, PeerRequest::Ping).await.unwrap();
    let calls: Vec<_> = (0..10u64)
        .map(|i| {
            let (t, addr) = (t.clone(), addr.clone());
            tokio::spawn(async move { t.call(&addr, read(i, 60_000, 1)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let died = Instant::now();
    drop(l);
    for c in calls {
        let r = timeout(Duration::from_secs(3), c)
            .await
            .expect("pending call must fail quickly, not hang")
            .unwrap();
        assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
    }
    assert!(died.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn peer_closing_abruptly_after_a_request_fails_the_call() {
    // A fake server that accepts the handshake, reads a request and hangs up.
    let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = fake.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = fake.accept().await.unwrap();
        accept_handshake(&mut s).await;
        let _ = s.read(&mut [0u8; 512]).await;
        drop(s);
    });
    let t = TcpTransport::new(TcpOptions::default());
    let r = timeout(Duration::from_secs(3), t.call(&addr, PeerRequest::Ping))
        .await
        .expect("must not hang");
    assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
}

#[tokio::test]
async fn reconnects_after_the_server_restarts_on_the_same_port() {
    let t = TcpTransport::new(TcpOptions::default());
    let h: Arc<Handler> = Arc::default();
    let l = t.bind("127.0.0.1:0", h.clone()).await.unwrap();
    let addr = l.local_addr();
    t.call(&addr, PeerRequest::Ping).await.unwrap();
    drop(l);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = t.call(&addr, PeerRequest::Ping).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert!(
        e.to_string().contains(&addr),
        "the error must name the address: {e}"
    );
    // Bind the same port again (the old socket closes as its task is aborted).
    let end = Instant::now() + Duration::from_secs(5);
    let l = loop {
        match t.bind(&addr, h.clone()).await {
            Ok(l) => break l,
            Err(e) if Instant::now() < end => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    };
    assert_eq!(l.local_addr(), addr);
    assert_eq!(
        t.call(&addr, PeerRequest::Ping).await.unwrap(),
        PeerResponse::Pong
    );
    assert_eq!(l.connections_accepted(), 1);
}

#[tokio::test]
async fn request_timeout_fails_the_call_and_keeps_the_connection() {
    let (t, l, _) = server(TcpOptions {
        request_timeout: Duration::from_millis(200),
        ..TcpOptions::default()
    })
    .await;
    let addr = l.local_addr();
    let e = t.call(&addr, read(1, 2_000, 1)).await.unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    t.call(&addr, PeerRequest::Ping).await.unwrap();
    assert_eq!(l.connections_accepted(), 1);
}

#[tokio::test]
async fn connect_failure_is_unavailable_and_names_the_address() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let t = TcpTransport::new(TcpOptions::default());
    let calls = (0..20).map(|_| t.call(&addr, PeerRequest::Ping));
    for r in futures::future::join_all(calls).await {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        assert!(e.to_string().contains(&addr), "{e}");
    }
}

#[tokio::test]
async fn payloads_over_the_peers_limit_fail_without_breaking_the_connection() {
    let (t, l, _) = server(TcpOptions {
        max_frame: 1024 * 1024,
        ..TcpOptions::default()
    })
    .await;
    let addr = l.local_addr();
    // A request larger than the server accepts fails locally.
    let big = PeerRequest::Write {
        chunk: ChunkRef::new(VolumeId(1), 1),
        offset: 0,
        data: Bytes::from(vec![1u8; 2 * 1024 * 1024]),
        epoch: Epoch(1),
    };
    let e = t.call(&addr, big).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    // A reply larger than the client accepts comes back as an error reply.
    let e = t
        .call(&addr, read(1, 0, 2 * 1024 * 1024))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("reply cannot be sent"), "{e}");
    t.call(&addr, PeerRequest::Ping).await.unwrap();
    assert_eq!(l.connections_accepted(), 1);
}

#[tokio::test]
async fn a_panicking_handler_answers_unavailable() {
    let (t, l, _) = server(TcpOptions::default()).await;
    let addr = l.local_addr();
    let r = t
        .call(
            &addr,
            PeerRequest::DeleteChunk {
                chunk: ChunkRef::new(VolumeId(1), 666),
                epoch: torus_traits::Epoch(1),
            },
        )
        .await;
    assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
    t.call(&addr, PeerRequest::Ping).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_payload_fits_the_default_limit() {
    let (t, l, _) = server(TcpOptions::default()).await;
    let data = Bytes::from(vec![0xabu8; wire::DEFAULT_MAX_PAYLOAD]);
    let r = t
        .call(
            &l.local_addr(),
            PeerRequest::Write {
                chunk: ChunkRef::new(VolumeId(1), 1),
                offset: 0,
                data: data.clone(),
                epoch: Epoch(1),
            },
        )
        .await
        .expect("64 MiB write");
    assert!(r == PeerResponse::Data(data));
}

/// A peer whose process stops reading while its kernel keeps the connection
/// open: the writer blocked on it gives up after the request timeout and
/// breaks the connection, so the next call dials again instead of queueing
/// behind it for good.
#[tokio::test]
async fn a_peer_that_stops_reading_loses_its_connection_and_the_next_call_dials_again() {
    let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = fake.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut s, _) = fake.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            accept_handshake(&mut s).await;
            // Never read again, never close.
            held.push(s);
        }
    });
    let t = TcpTransport::new(TcpOptions {
        request_timeout: Duration::from_millis(500),
        ..TcpOptions::default()
    });
    // Far more than the socket buffers hold while nobody reads.
    let big = PeerRequest::Write {
        chunk: ChunkRef::new(VolumeId(1), 1),
        offset: 0,
        data: Bytes::from(vec![1u8; 16 * 1024 * 1024]),
        epoch: Epoch(1),
    };
    let e = timeout(Duration::from_secs(5), t.call(&addr, big))
        .await
        .expect("the call must end by its timeout")
        .unwrap_err();
    assert!(
        matches!(e, Error::Timeout(_) | Error::Unavailable(_)),
        "{e:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Past the writer's own limit: the connection is broken and dropped.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let e = timeout(Duration::from_secs(5), t.call(&addr, PeerRequest::Ping))
        .await
        .expect("the call must end by its timeout")
        .unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the second call must have dialled a new connection"
    );
}

/// Callers on the node's multi-threaded runtime share one connection per
/// peer; a caller on a single-threaded runtime of its own (an NBD
/// connection thread) dials connections of its own on its thread, which
/// keep serving it after the other callers' runtime is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_threaded_callers_get_connections_of_their_own() {
    let (t, l, _) = server(TcpOptions::default()).await;
    let t = Arc::new(t);
    let addr = l.local_addr();
    for _ in 0..3 {
        let (t, addr) = (t.clone(), addr.clone());
        tokio::spawn(async move { t.call(&addr, PeerRequest::Ping).await })
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(l.connections_accepted(), 1, "the shared pool dials once");
    // Two threads with runtimes of their own: a connection each, made and
    // used there, reused by their later calls.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (t, addr) = (t.clone(), addr.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for _ in 0..3 {
                        assert_eq!(
                            t.call(&addr, PeerRequest::Ping).await.unwrap(),
                            PeerResponse::Pong
                        );
                    }
                })
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(l.connections_accepted(), 3);
    // Their runtimes are gone with their connections; the shared one serves on.
    still_serves(&t, &l).await;
    assert_eq!(l.connections_accepted(), 3);
}
