//! Conformance suite for [`PeerTransport`].
//!
//! Each function takes a transport and `addr(i)`, which gives the i-th
//! distinct address this transport can listen on (for TCP, `127.0.0.1:0`
//! style addresses work because the listener reports its real address). The
//! functions start their own listeners with a reference handler.

use crate::{
    ChunkRef, Epoch, Error, PeerHandler, PeerRequest, PeerResponse, PeerTransport, Result, VolumeId,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The reference handler: echoes writes back as reads, fails on demand,
/// and delays reads of chunk index 1 so replies complete out of order.
struct Echo {
    calls: AtomicUsize,
}

#[async_trait]
impl PeerHandler for Echo {
    async fn handle(&self, request: PeerRequest) -> Result<PeerResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match request {
            PeerRequest::Ping => Ok(PeerResponse::Pong),
            PeerRequest::Write { data, .. } => Ok(PeerResponse::Data(data)),
            PeerRequest::Read { chunk, len, .. } => {
                if chunk.index == 1 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if chunk.index == 99 {
                    return Err(Error::NotFound(format!("chunk {chunk}")));
                }
                let tag = (chunk.index % 251) as u8;
                Ok(PeerResponse::Data(Bytes::from(vec![tag; len as usize])))
            }
            PeerRequest::Flush { epoch, .. } if epoch.0 == 0 => {
                Err(Error::Fenced("epoch 0 is stale".into()))
            }
            _ => Ok(PeerResponse::Done),
        }
    }
}

fn echo() -> Arc<Echo> {
    Arc::new(Echo {
        calls: AtomicUsize::new(0),
    })
}

fn chunk(index: u64) -> ChunkRef {
    ChunkRef::new(VolumeId(7), index)
}

/// Ping and a payload round trip to a listening peer.
pub async fn round_trip(t: &dyn PeerTransport, addr: &dyn Fn(usize) -> String) {
    let l = t.listen(&addr(0), echo()).await.expect("listen");
    let at = l.local_addr();
    assert_eq!(
        t.call(&at, PeerRequest::Ping).await.expect("ping"),
        PeerResponse::Pong
    );
    let data = Bytes::from((0..100_000u32).map(|i| i as u8).collect::<Vec<_>>());
    let reply = t
        .call(
            &at,
            PeerRequest::Write {
                chunk: chunk(0),
                offset: 4096,
                data: data.clone(),
                epoch: Epoch(3),
            },
        )
        .await
        .expect("write");
    assert_eq!(
        reply,
        PeerResponse::Data(data),
        "payload must arrive intact"
    );
}

/// A handler's error arrives as the same error kind.
pub async fn errors_keep_their_kind(t: &dyn PeerTransport, addr: &dyn Fn(usize) -> String) {
    let l = t.listen(&addr(1), echo()).await.expect("listen");
    let at = l.local_addr();
    let e = t
        .call(
            &at,
            PeerRequest::Read {
                chunk: chunk(99),
                offset: 0,
                len: 1,
            },
        )
        .await
        .expect_err("handler error must come back");
    assert!(
        matches!(e, Error::NotFound(_)),
        "expected NotFound, got {e:?}"
    );
    let e = t
        .call(
            &at,
            PeerRequest::Flush {
                volume: VolumeId(7),
                epoch: Epoch(0),
            },
        )
        .await
        .expect_err("fenced must come back");
    assert!(matches!(e, Error::Fenced(_)), "expected Fenced, got {e:?}");
}

/// Many requests in flight at once; a slow one does not hold up the rest.
pub async fn many_in_flight(t: &dyn PeerTransport, addr: &dyn Fn(usize) -> String) {
    let l = t.listen(&addr(2), echo()).await.expect("listen");
    let at = l.local_addr();
    let started = tokio::time::Instant::now();
    let calls = (0..64u64).map(|i| {
        let at = at.clone();
        async move {
            let r = t
                .call(
                    &at,
                    PeerRequest::Read {
                        chunk: chunk(i),
                        offset: 0,
                        len: 512,
                    },
                )
                .await
                .expect("read");
            (i, r)
        }
    });
    for (i, r) in futures::future::join_all(calls).await {
        assert_eq!(
            r,
            PeerResponse::Data(Bytes::from(vec![(i % 251) as u8; 512])),
            "reply {i} mismatched"
        );
    }
    // Index 1 sleeps 200 ms: 64 calls in series would take far longer than in parallel.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "requests were not concurrent"
    );
}

/// Calling an address nobody listens on fails with `Unavailable` or `Timeout`,
/// and a dropped listener stops answering.
pub async fn dead_peer_is_unavailable(t: &dyn PeerTransport, addr: &dyn Fn(usize) -> String) {
    let l = t.listen(&addr(3), echo()).await.expect("listen");
    let at = l.local_addr();
    t.call(&at, PeerRequest::Ping)
        .await
        .expect("ping while listening");
    drop(l);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = tokio::time::timeout(Duration::from_secs(20), t.call(&at, PeerRequest::Ping))
        .await
        .expect("a call to a dead peer must not hang");
    match r {
        Err(Error::Unavailable(_)) | Err(Error::Timeout(_)) | Err(Error::Closed(_)) => {}
        other => panic!("call to a dropped listener must fail as unavailable, got {other:?}"),
    }
}

/// Answers every request with the error kind chosen by the read's chunk index.
struct Failing;

/// One error of every kind, in the order `Failing` returns them.
fn every_error() -> Vec<Error> {
    vec![
        Error::NotFound("chunk 7/1".into()),
        Error::AlreadyExists("volume v".into()),
        Error::NoSpace("pool full".into()),
        Error::InvalidArgument("offset past the end".into()),
        Error::Fenced("epoch 3 < 4".into()),
        Error::Locked("held by peer a".into()),
        Error::LeaseNotFound(0x1234_5678),
        Error::ReadOnly("volume v".into()),
        Error::Unavailable("disk gone".into()),
        Error::Timeout("fsync".into()),
        Error::Corrupt("crc mismatch in block 3".into()),
        Error::Unsupported("trim".into()),
        Error::Closed("store shut down".into()),
        Error::io(
            "writing /data/chunk",
            std::io::Error::other("input/output error"),
        ),
        Error::Other("ünïcode message ✓".into()),
    ]
}

#[async_trait]
impl PeerHandler for Failing {
    async fn handle(&self, request: PeerRequest) -> Result<PeerResponse> {
        match request {
            PeerRequest::Read { chunk, .. } => Err(every_error()
                .into_iter()
                .nth(chunk.index as usize)
                .unwrap_or_else(|| Error::Other("no such error".into()))),
            _ => Ok(PeerResponse::Done),
        }
    }
}

/// Every error kind a handler returns arrives as the same kind with the same
/// message (an `Io` error keeps its context and its message).
pub async fn every_error_kind_survives(t: &dyn PeerTransport, addr: &dyn Fn(usize) -> String) {
    let l = t.listen(&addr(4), Arc::new(Failing)).await.expect("listen");
    let at = l.local_addr();
    for (i, want) in every_error().into_iter().enumerate() {
        let got = t
            .call(
                &at,
                PeerRequest::Read {
                    chunk: chunk(i as u64),
                    offset: 0,
                    len: 1,
                },
            )
            .await
            .expect_err("handler error must come back");
        assert_eq!(
            got.kind_name(),
            want.kind_name(),
            "error kind changed: sent {want:?}, got {got:?}"
        );
        assert_eq!(
            got.to_string(),
            want.to_string(),
            "error message changed: sent {want:?}, got {got:?}"
        );
    }
}

/// A multi-megabyte payload travels intact both ways, next to small calls.
pub async fn large_payload_round_trip(t: &dyn PeerTransport, addr: &dyn Fn(usize) -> String) {
    let l = t.listen(&addr(5), echo()).await.expect("listen");
    let at = l.local_addr();
    let data = Bytes::from(
        (0..8 * 1024 * 1024u32)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<_>>(),
    );
    let big = t.call(
        &at,
        PeerRequest::Write {
            chunk: chunk(0),
            offset: 0,
            data: data.clone(),
            epoch: Epoch(1),
        },
    );
    let small = t.call(&at, PeerRequest::Ping);
    let (big, small) = futures::join!(big, small);
    assert_eq!(small.expect("ping"), PeerResponse::Pong);
    match big.expect("large write") {
        PeerResponse::Data(got) => {
            assert_eq!(got.len(), data.len(), "payload length changed");
            assert!(got == data, "payload bytes changed");
        }
        other => panic!("expected Data, got {other:?}"),
    }
}

/// Run every function of the suite.
pub async fn all(t: &dyn PeerTransport, addr: &dyn Fn(usize) -> String) {
    round_trip(t, addr).await;
    errors_keep_their_kind(t, addr).await;
    many_in_flight(t, addr).await;
    dead_peer_is_unavailable(t, addr).await;
    every_error_kind_survives(t, addr).await;
    large_payload_round_trip(t, addr).await;
}
