//! `EtcdMetadata` against a real etcd server started by the test (Debian
//! `etcd-server`; `scripts/deps.sh test` installs it): the shared conformance
//! suite, plus what only a networked store has to get right — bounded
//! failures while etcd is down, recovery after it restarts, and watches that
//! break visibly.

use futures::StreamExt;
use std::time::Duration;
use tokio::time::{timeout, Instant};
use torus_backends::metadata::{EtcdConfig, EtcdMetadata, EtcdTls};
use torus_integration::etcd::{EtcdServer, TestCertificates};
use torus_traits::{conformance, Error, EventKind, MetadataStore, Txn, TxnOp};

fn config(server: &EtcdServer, request_timeout: Duration) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![server.endpoint()],
        dial_timeout: Duration::from_secs(5),
        request_timeout,
        tls: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_conformance() {
    let server = EtcdServer::start();
    let store = EtcdMetadata::connect(config(&server, Duration::from_secs(10)))
        .await
        .expect("connect to the test etcd");
    conformance::metadata::all(&store).await;
    store.close().await.unwrap();
}

/// A failure while etcd is down: `Unavailable` or `Timeout`, naming the
/// endpoint, well within the request timeout (plus scheduling slack).
#[track_caller]
fn assert_down<T: std::fmt::Debug>(
    what: &str,
    result: torus_traits::Result<T>,
    took: Duration,
    limit: Duration,
    endpoint: &str,
) {
    match &result {
        Err(e @ (Error::Unavailable(_) | Error::Timeout(_))) => {
            eprintln!("{what} while etcd is down, after {took:?}: {e}");
            assert!(
                e.to_string().contains(endpoint),
                "{what}: the error does not name the endpoint {endpoint}: {e}"
            );
        }
        other => {
            panic!("{what} while etcd is down: expected Unavailable or Timeout, got {other:?}")
        }
    }
    assert!(
        took <= limit + Duration::from_millis(500),
        "{what} took {took:?} while etcd was down (request timeout {limit:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_fails_within_the_timeout_and_recovers_after_restart() {
    let mut server = EtcdServer::start();
    let endpoint = server.endpoint();
    let request_timeout = Duration::from_secs(2);
    let store = EtcdMetadata::connect(config(&server, request_timeout))
        .await
        .unwrap();
    let rev = store.put(b"/down/k", b"before", None).await.unwrap();
    let lease = store.grant(Duration::from_secs(60)).await.unwrap();

    server.kill();

    macro_rules! check {
        ($what:expr, $call:expr) => {{
            let start = Instant::now();
            let result = $call.await;
            assert_down($what, result, start.elapsed(), request_timeout, &endpoint);
        }};
    }
    check!("get", store.get(b"/down/k"));
    check!("range", store.range(b"/down/"));
    check!("put", store.put(b"/down/k", b"during", None));
    check!("delete", store.delete(b"/down/k"));
    check!(
        "txn",
        store.txn(Txn::new().and_then([TxnOp::put("/down/t", "1")]))
    );
    check!("watch", async { store.watch(b"/down/").await.map(|_| ()) });
    check!("grant", store.grant(Duration::from_secs(5)));
    check!("keep_alive", store.keep_alive(lease));
    check!("revoke", store.revoke(lease));
    check!("revision", store.revision());

    // Connecting to a dead endpoint fails within the dial timeout.
    let mut cfg = config(&server, request_timeout);
    cfg.dial_timeout = Duration::from_secs(1);
    let start = Instant::now();
    let result = EtcdMetadata::connect(cfg).await;
    match &result {
        Err(e @ Error::Unavailable(_)) => assert!(
            e.to_string().contains(&endpoint),
            "connect error does not name the endpoint: {e}"
        ),
        other => panic!("connect to a dead etcd: expected Unavailable, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "connect to a dead etcd took {:?}",
        start.elapsed()
    );

    // Same store handle, same data directory: everything works again.
    server.restart();
    let kv = store
        .get(b"/down/k")
        .await
        .expect("get after restart")
        .expect("key lost over the restart");
    assert_eq!(kv.value, b"before");
    assert_eq!(kv.mod_revision, rev);
    // (A grant does not move the revision; nothing else was written.)
    assert_eq!(
        store.revision().await.unwrap(),
        rev,
        "revision after restart"
    );
    let rev2 = store.put(b"/down/k", b"after", None).await.unwrap();
    assert_eq!(
        rev2,
        rev + 1,
        "the revision did not go on from before the crash"
    );
    assert_eq!(
        store.keep_alive(lease).await.unwrap(),
        Duration::from_secs(60),
        "the lease did not survive the restart"
    );
    store.revoke(lease).await.unwrap();
    let mut w = store.watch(b"/down/").await.unwrap();
    store.put(b"/down/w", b"1", None).await.unwrap();
    let ev = timeout(Duration::from_secs(5), w.next())
        .await
        .expect("no watch event after restart")
        .expect("watch ended")
        .unwrap();
    assert_eq!(
        (ev.kind, ev.kv.key.as_slice()),
        (EventKind::Put, &b"/down/w"[..])
    );
    store.close().await.unwrap();
}

/// A hung etcd (stopped, sockets still open) makes requests time out at
/// the request timeout instead of hanging; it answers again once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_etcd_times_out_and_recovers() {
    let mut server = EtcdServer::start();
    let endpoint = server.endpoint();
    let request_timeout = Duration::from_secs(1);
    let store = EtcdMetadata::connect(config(&server, request_timeout))
        .await
        .unwrap();
    let lease = store.grant(Duration::from_secs(60)).await.unwrap();

    server.pause();
    for what in ["get", "put", "watch", "keep_alive"] {
        let start = Instant::now();
        let result = match what {
            "get" => store.get(b"/hung/k").await.map(|_| ()),
            "put" => store.put(b"/hung/k", b"v", None).await.map(|_| ()),
            "watch" => store.watch(b"/hung/").await.map(|_| ()),
            _ => store.keep_alive(lease).await.map(|_| ()),
        };
        let took = start.elapsed();
        assert!(
            matches!(result, Err(Error::Timeout(_))),
            "{what} on a hung etcd: expected Timeout, got {result:?}"
        );
        assert_down(what, result, took, request_timeout, &endpoint);
        assert!(
            took >= request_timeout,
            "{what} timed out early, after {took:?}"
        );
    }

    server.resume();
    store
        .put(b"/hung/k", b"v", None)
        .await
        .expect("put after resume");
    assert_eq!(store.get(b"/hung/k").await.unwrap().unwrap().value, b"v");
    store.revoke(lease).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_a_killed_etcd_breaks_visibly() {
    let mut server = EtcdServer::start();
    let store = EtcdMetadata::connect(config(&server, Duration::from_secs(2)))
        .await
        .unwrap();
    let mut w = store.watch(b"/w/").await.unwrap();
    store.put(b"/w/a", b"1", None).await.unwrap();
    let ev = timeout(Duration::from_secs(5), w.next())
        .await
        .expect("no watch event")
        .expect("watch ended")
        .unwrap();
    assert_eq!(ev.kv.key, b"/w/a");

    server.kill();
    match timeout(Duration::from_secs(5), w.next()).await {
        Err(_) => panic!("the watch neither failed nor ended within 5 s of etcd dying"),
        Ok(Some(Ok(ev))) => panic!("the watch delivered {ev:?} after etcd died"),
        Ok(Some(Err(e))) => {
            eprintln!("watch after etcd died: {e}");
            assert!(
                matches!(e, Error::Unavailable(_)),
                "a broken watch should report Unavailable, got {e:?}"
            );
            // After the error the stream ends.
            let end = timeout(Duration::from_secs(1), w.next())
                .await
                .expect("the broken watch neither ended nor yielded");
            assert!(end.is_none(), "the watch went on after its error: {end:?}");
        }
        Ok(None) => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_store_refuses_operations_and_ends_watches() {
    let server = EtcdServer::start();
    let store = EtcdMetadata::connect(config(&server, Duration::from_secs(2)))
        .await
        .unwrap();
    let mut w = store.watch(b"/c/").await.unwrap();
    store.close().await.unwrap();
    assert!(matches!(store.get(b"/c/k").await, Err(Error::Closed(_))));
    assert!(matches!(
        store.put(b"/c/k", b"v", None).await,
        Err(Error::Closed(_))
    ));
    let item = timeout(Duration::from_secs(2), w.next()).await.unwrap();
    assert!(matches!(item, Some(Err(Error::Closed(_)))), "{item:?}");
    assert!(w.next().await.is_none());
    store.close().await.unwrap();
}

/// Lease errors carry the lease id; etcd's error text is mapped, not leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_lease_errors_name_the_lease() {
    let server = EtcdServer::start();
    let store = EtcdMetadata::connect(config(&server, Duration::from_secs(5)))
        .await
        .unwrap();
    let bogus = torus_traits::LeaseId(0x7e57_0000_0000_0001);
    for (what, result) in [
        ("revoke", store.revoke(bogus).await.map(|_| ())),
        ("keep_alive", store.keep_alive(bogus).await.map(|_| ())),
        (
            "put",
            store.put(b"/l/k", b"v", Some(bogus)).await.map(|_| ()),
        ),
        (
            "txn",
            store
                .txn(Txn::new().and_then([TxnOp::put_with_lease("/l/t", "v", bogus)]))
                .await
                .map(|_| ()),
        ),
    ] {
        match result {
            Err(Error::LeaseNotFound(id)) => assert_eq!(id, bogus.0, "{what}"),
            other => panic!("{what} with an unknown lease: {other:?}"),
        }
    }
    // A grant rounds a sub-second TTL up to etcd's whole seconds.
    let lease = store.grant(Duration::from_millis(1500)).await.unwrap();
    assert_eq!(
        store.keep_alive(lease).await.unwrap(),
        Duration::from_secs(2)
    );
    store.revoke(lease).await.unwrap();
}

/// TLS end to end: server verified against the CA, client certificate
/// required by etcd; without the client certificate `connect` fails clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCertificates::generate(dir.path());
    let server = EtcdServer::start_tls(certs.server_tls());
    let mut cfg = config(&server, Duration::from_secs(5));
    cfg.tls = Some(EtcdTls {
        ca_file: certs.ca_file.clone(),
        cert_file: Some(certs.client_cert.clone()),
        key_file: Some(certs.client_key.clone()),
    });
    let store = EtcdMetadata::connect(cfg.clone())
        .await
        .expect("connect over TLS");
    let mut w = store.watch(b"/tls/").await.unwrap();
    let rev = store.put(b"/tls/k", b"secret", None).await.unwrap();
    let kv = store.get(b"/tls/k").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"secret"[..], rev)
    );
    let ev = timeout(Duration::from_secs(5), w.next())
        .await
        .expect("no watch event over TLS")
        .expect("watch ended")
        .unwrap();
    assert_eq!(ev.kv.key, b"/tls/k");
    store.close().await.unwrap();

    // etcd requires a client certificate: refused, within the dial timeout.
    let mut no_client_cert = cfg.clone();
    no_client_cert.dial_timeout = Duration::from_secs(2);
    no_client_cert.tls = Some(EtcdTls {
        ca_file: certs.ca_file.clone(),
        cert_file: None,
        key_file: None,
    });
    match EtcdMetadata::connect(no_client_cert).await {
        Err(Error::Unavailable(m)) => {
            eprintln!("without a client certificate: {m}");
            assert!(m.contains(&server.endpoint()), "{m}");
        }
        other => panic!("connect without the required client certificate: {other:?}"),
    }

    // Half a client identity is a configuration error.
    let mut half = cfg;
    half.tls = Some(EtcdTls {
        ca_file: certs.ca_file.clone(),
        cert_file: Some(certs.client_cert.clone()),
        key_file: None,
    });
    assert!(matches!(
        EtcdMetadata::connect(half).await,
        Err(Error::InvalidArgument(_))
    ));
}

/// `range` pages through more keys than one reply holds (1000 a page) and
/// still returns every key once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_pages_through_many_keys() {
    let server = EtcdServer::start();
    let store = EtcdMetadata::connect(config(&server, Duration::from_secs(10)))
        .await
        .unwrap();
    let keys: Vec<Vec<u8>> = (0..2500u32)
        .map(|i| format!("/many/{i:05}").into_bytes())
        .collect();
    // etcd takes at most 128 operations per transaction by default.
    for chunk in keys.chunks(125) {
        let ops: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::put(k.clone(), "v")).collect();
        store.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    store.put(b"/many0", b"outside", None).await.unwrap();
    let got: Vec<Vec<u8>> = store
        .range(b"/many/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        got.len(),
        keys.len(),
        "range lost or repeated keys across pages"
    );
    assert!(got == keys, "range across pages is not the sorted key list");
}
