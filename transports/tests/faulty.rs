//! `FaultyTransport` over the memory transport (and TCP for the suite):
//! transparent with no fault set (the conformance suite), partitions and
//! healing, dropped calls in each mode, delays, seeded random failures, and
//! calls bounded in time.

use async_trait::async_trait;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_traits::conformance::transport;
use torus_traits::{
    ChunkRef, Epoch, Error, PeerHandler, PeerListener, PeerRequest, PeerResponse, PeerTransport,
    Result, VolumeId,
};
use torus_transports::{
    DropMode, FaultyTransport, MemoryNetwork, TcpOptions, TcpTransport, TransportFaultControl,
};

/// Answers everything, counting the requests it handled.
#[derive(Default)]
struct Counter {
    handled: AtomicUsize,
}

#[async_trait]
impl PeerHandler for Counter {
    async fn handle(&self, _request: PeerRequest) -> Result<PeerResponse> {
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(PeerResponse::Pong)
    }
}

struct Setup {
    t: FaultyTransport,
    control: TransportFaultControl,
    handlers: Vec<Arc<Counter>>,
    _listeners: Vec<Box<dyn PeerListener>>,
}

/// A faulty transport and `n` peers at `peer-0`… on one memory network.
async fn setup(n: usize) -> Setup {
    let net = MemoryNetwork::new();
    let server = net.transport();
    let mut handlers = Vec::new();
    let mut listeners = Vec::new();
    for i in 0..n {
        let h = Arc::new(Counter::default());
        listeners.push(server.listen(&peer(i), h.clone()).await.unwrap());
        handlers.push(h);
    }
    let t = FaultyTransport::new(Arc::new(net.transport()));
    let control = t.control();
    Setup {
        t,
        control,
        handlers,
        _listeners: listeners,
    }
}

fn peer(i: usize) -> String {
    format!("peer-{i}")
}

fn write() -> PeerRequest {
    PeerRequest::Write {
        chunk: ChunkRef::new(VolumeId(1), 0),
        offset: 0,
        data: bytes::Bytes::from_static(b"x"),
        epoch: Epoch(1),
    }
}

#[tokio::test]
async fn conformance_with_no_fault() {
    let net = MemoryNetwork::new();
    let t = FaultyTransport::new(Arc::new(net.transport()));
    transport::all(&t, &|i| format!("mem-{i}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_over_tcp_with_no_fault() {
    let t = FaultyTransport::new(Arc::new(TcpTransport::new(TcpOptions::default())));
    transport::all(&t, &|_| "127.0.0.1:0".to_string()).await;
}

#[tokio::test]
async fn conformance_with_harmless_rules() {
    // Rules for other addresses and a generous timeout change nothing.
    let net = MemoryNetwork::new();
    let t = FaultyTransport::new(Arc::new(net.transport()));
    let control = t.control();
    control.partition(["elsewhere"]);
    control.drop_calls("nowhere", DropMode::Refuse);
    control.delay_to("far", Duration::from_secs(60));
    control.set_call_timeout(Some(Duration::from_secs(30)));
    transport::all(&t, &|i| format!("mem-{i}")).await;
}

#[tokio::test]
async fn partition_then_heal() {
    let s = setup(3).await;
    s.control.partition([peer(0), peer(1)]);
    assert_eq!(s.control.partitioned(), vec![peer(0), peer(1)]);
    for i in 0..2 {
        let r = s.t.call(&peer(i), PeerRequest::Ping).await;
        assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
    }
    assert_eq!(
        s.t.call(&peer(2), PeerRequest::Ping).await.unwrap(),
        PeerResponse::Pong
    );
    // Nothing reached the partitioned peers.
    assert_eq!(s.handlers[0].handled.load(Ordering::SeqCst), 0);
    assert_eq!(s.handlers[1].handled.load(Ordering::SeqCst), 0);
    s.control.heal_addr(&peer(1));
    s.t.call(&peer(1), PeerRequest::Ping).await.unwrap();
    assert!(s.t.call(&peer(0), PeerRequest::Ping).await.is_err());
    s.control.heal();
    assert!(s.control.partitioned().is_empty());
    for i in 0..3 {
        s.t.call(&peer(i), write()).await.unwrap();
    }
    let stats = s.control.stats();
    assert_eq!(stats.partitioned, 3);
    assert_eq!(stats.calls, 8);
}

#[tokio::test]
async fn partition_is_one_sided() {
    // A's transport cannot reach B; B's (unwrapped) transport still reaches A.
    let net = MemoryNetwork::new();
    let a = FaultyTransport::new(Arc::new(net.transport()));
    let b = net.transport();
    let _la = a.listen("a", Arc::new(Counter::default())).await.unwrap();
    let _lb = b.listen("b", Arc::new(Counter::default())).await.unwrap();
    a.control().partition(["b"]);
    assert!(a.call("b", PeerRequest::Ping).await.is_err());
    b.call("a", PeerRequest::Ping).await.unwrap();
}

#[tokio::test]
async fn partition_can_black_hole() {
    let s = setup(1).await;
    s.control
        .partition_with([peer(0)], DropMode::Hang(Duration::from_millis(150)));
    let t = Instant::now();
    let r = s.t.call(&peer(0), PeerRequest::Ping).await;
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert_eq!(s.handlers[0].handled.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn drop_refuse_hang_and_lose_reply() {
    let s = setup(3).await;
    s.control.drop_calls(peer(0), DropMode::Refuse);
    s.control
        .drop_calls(peer(1), DropMode::Hang(Duration::from_millis(300)));
    s.control.drop_calls(peer(2), DropMode::LoseReply);

    let t = Instant::now();
    let r = s.t.call(&peer(0), write()).await;
    assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_millis(250));

    let t = Instant::now();
    let r = s.t.call(&peer(1), write()).await;
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert!(t.elapsed() >= Duration::from_millis(300));

    let r = s.t.call(&peer(2), write()).await;
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");

    // Only the lost reply's request reached its peer.
    let handled: Vec<usize> = s
        .handlers
        .iter()
        .map(|h| h.handled.load(Ordering::SeqCst))
        .collect();
    assert_eq!(handled, vec![0, 0, 1]);
    assert_eq!(s.control.stats().dropped, 3);

    s.control.undrop(&peer(0));
    s.t.call(&peer(0), PeerRequest::Ping).await.unwrap();
    assert!(s.t.call(&peer(2), PeerRequest::Ping).await.is_err());
    s.control.clear_drops();
    for i in 0..3 {
        s.t.call(&peer(i), PeerRequest::Ping).await.unwrap();
    }
}

#[tokio::test]
async fn delay_all_or_one_address() {
    let s = setup(2).await;
    s.control.delay(Duration::from_millis(200));
    s.control.delay_to(peer(1), Duration::from_millis(600));
    let t = Instant::now();
    s.t.call(&peer(0), PeerRequest::Ping).await.unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(600));
    let t = Instant::now();
    s.t.call(&peer(1), PeerRequest::Ping).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(600));
    // Delayed calls overlap.
    let t = Instant::now();
    let p0 = peer(0);
    let calls = (0..20).map(|_| s.t.call(&p0, PeerRequest::Ping));
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
    assert!(t.elapsed() < Duration::from_millis(2000));
    assert_eq!(s.control.stats().delayed, 22);
    s.control.clear_delay();
    let t = Instant::now();
    s.t.call(&peer(1), PeerRequest::Ping).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(150));
}

#[tokio::test]
async fn fail_rate_is_seeded() {
    async fn run(p: f64, seed: u64) -> Vec<bool> {
        let s = setup(1).await;
        s.control.fail_rate(p, seed);
        let mut out = Vec::new();
        for _ in 0..400 {
            match s.t.call(&peer(0), PeerRequest::Ping).await {
                Ok(_) => out.push(true),
                Err(Error::Unavailable(_)) => out.push(false),
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        let failed = out.iter().filter(|ok| !**ok).count();
        assert_eq!(s.control.stats().failed, failed as u64);
        assert_eq!(
            s.handlers[0].handled.load(Ordering::SeqCst),
            400 - failed,
            "failed calls are not delivered"
        );
        out
    }
    let a = run(0.3, 42).await;
    let failed = a.iter().filter(|ok| !**ok).count();
    assert!(
        (80..=160).contains(&failed),
        "about 30% failed, got {failed}"
    );
    assert_eq!(a, run(0.3, 42).await, "same seed, same failures");
    assert_ne!(a, run(0.3, 43).await);
    assert!(run(0.0, 1).await.iter().all(|ok| *ok));
    assert!(run(1.0, 1).await.iter().all(|ok| !*ok));
    assert!(run(f64::NAN, 1).await.iter().all(|ok| *ok));
}

#[tokio::test]
async fn call_timeout_bounds_every_call() {
    let s = setup(2).await;
    s.control.set_call_timeout(Some(Duration::from_millis(100)));
    s.control
        .drop_calls(peer(0), DropMode::Hang(Duration::from_secs(3600)));
    s.control.delay_to(peer(1), Duration::from_secs(3600));
    for i in 0..2 {
        let t = Instant::now();
        let r = s.t.call(&peer(i), PeerRequest::Ping).await;
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(2),
            "call {i} took {took:?}"
        );
    }
    assert_eq!(s.control.stats().timed_out, 2);
    // A fast call within the bound is unaffected.
    s.control.clear_delay();
    s.t.call(&peer(1), PeerRequest::Ping).await.unwrap();
    s.control.reset();
    s.t.call(&peer(0), PeerRequest::Ping).await.unwrap();
    assert_eq!(s.control.stats().calls, 4);
}

#[tokio::test]
async fn unreachable_address_still_unavailable() {
    // The inner transport's own failures pass through unchanged.
    let s = setup(0).await;
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        s.t.call("nobody", PeerRequest::Ping),
    )
    .await
    .unwrap();
    assert!(matches!(r, Err(Error::Unavailable(_))), "{r:?}");
}
