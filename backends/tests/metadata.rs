//! MetadataStore tests for the in-process implementations: the shared
//! conformance suite on memory and sled, plus what only sled promises
//! (persistence across a reopen, a locked directory).

use futures::StreamExt;
use std::path::Path;
use std::time::Duration;
use tokio::time::{sleep, timeout, Instant};
use torus_backends::metadata::{MemoryMetadata, SledMetadata};
use torus_traits::{conformance, Error, EventKind, MetadataStore};

#[tokio::test]
async fn memory_passes_conformance() {
    let store = MemoryMetadata::new();
    conformance::metadata::all(&store).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn sled_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledMetadata::open(dir.path()).unwrap();
    conformance::metadata::all(&store).await;
    store.close().await.unwrap();
}

/// Also on a multi-threaded runtime, where operations really run in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_passes_conformance_multi_thread() {
    let store = MemoryMetadata::new();
    conformance::metadata::txn_concurrent_compare_and_swap(&store).await;
    conformance::metadata::watch_prefix(&store).await;
    conformance::metadata::lease_expiry(&store).await;
}

/// A store built outside any runtime still expires leases by itself once
/// used inside one (the timer starts with the first operation).
#[test]
fn memory_store_created_outside_a_runtime_expires_leases() {
    let store = MemoryMetadata::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let lease = store.grant(Duration::from_millis(200)).await.unwrap();
        store.put(b"k", b"v", Some(lease)).await.unwrap();
        let mut watch = store.watch(b"k").await.unwrap();
        // No further operations: only the timer task can produce this event.
        let event = timeout(Duration::from_secs(3), watch.next())
            .await
            .expect("no Delete event: the lease-expiry timer is not running")
            .expect("watch ended")
            .unwrap();
        assert_eq!(event.kind, EventKind::Delete);
        assert_eq!(event.kv.key, b"k");
    });
}

#[tokio::test]
async fn closed_store_refuses_operations_and_ends_watches() {
    let store = MemoryMetadata::new();
    let mut watch = store.watch(b"").await.unwrap();
    store.close().await.unwrap();
    assert!(matches!(store.get(b"k").await, Err(Error::Closed(_))));
    assert!(matches!(
        store.put(b"k", b"v", None).await,
        Err(Error::Closed(_))
    ));
    assert!(matches!(watch.next().await, Some(Err(Error::Closed(_)))));
    assert!(watch.next().await.is_none());
    // Closing twice is fine.
    store.close().await.unwrap();
}

#[tokio::test]
async fn sled_second_open_of_the_same_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledMetadata::open(dir.path()).unwrap();
    let err = SledMetadata::open(dir.path()).expect_err("second open succeeded");
    let message = err.to_string();
    assert!(
        matches!(err, Error::Io { .. }),
        "unexpected error kind: {err:?}"
    );
    assert!(
        message.contains(&dir.path().display().to_string()),
        "error does not name the path: {message}"
    );
    assert!(
        message.contains("already in use"),
        "unclear error: {message}"
    );

    // Once closed, the directory can be opened again.
    store.close().await.unwrap();
    drop(store);
    let again = SledMetadata::open(dir.path()).unwrap();
    again.close().await.unwrap();
}

#[tokio::test]
async fn sled_keeps_data_revisions_and_leases_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata");

    let store = SledMetadata::open(&path).unwrap();
    store.put(b"a", b"1", None).await.unwrap();
    store.put(b"a", b"2", None).await.unwrap();
    store.put(b"b", b"x", None).await.unwrap();
    assert!(store.delete(b"b").await.unwrap());
    let long = store.grant(Duration::from_secs(60)).await.unwrap();
    store.put(b"bound/1", b"1", Some(long)).await.unwrap();
    store.put(b"bound/2", b"2", Some(long)).await.unwrap();
    let short = store.grant(Duration::from_secs(1)).await.unwrap();
    store.put(b"short", b"s", Some(short)).await.unwrap();
    let a_before = store.get(b"a").await.unwrap().unwrap();
    let rev = store.revision().await.unwrap();
    store.close().await.unwrap();
    drop(store);

    // Longer than the short lease's TTL: on reopen it must get a fresh full TTL.
    sleep(Duration::from_millis(1200)).await;

    let reopened = Instant::now();
    let store = SledMetadata::open(&path).unwrap();
    assert_eq!(
        store.revision().await.unwrap(),
        rev,
        "revision lost on reopen"
    );
    assert_eq!(
        store.get(b"a").await.unwrap().unwrap(),
        a_before,
        "key a changed on reopen"
    );
    assert!(
        store.get(b"b").await.unwrap().is_none(),
        "deleted key came back"
    );
    let bound = store.range(b"bound/").await.unwrap();
    assert_eq!(bound.len(), 2);
    assert!(
        bound.iter().all(|kv| kv.lease == Some(long)),
        "lease binding lost: {bound:?}"
    );
    if reopened.elapsed() < Duration::from_millis(700) {
        assert!(
            store.get(b"short").await.unwrap().is_some(),
            "a lease did not get a fresh TTL on reopen"
        );
    }
    assert_eq!(
        store.keep_alive(long).await.unwrap(),
        Duration::from_secs(60)
    );

    // Lease ids stay unique across reopens.
    let fresh = store.grant(Duration::from_secs(60)).await.unwrap();
    assert!(
        fresh != long && fresh != short,
        "lease id reused after reopen"
    );

    // The revision goes on from where it was.
    assert_eq!(store.put(b"c", b"3", None).await.unwrap(), rev + 1);

    // The reopened lease still owns its keys.
    store.revoke(long).await.unwrap();
    assert!(
        store.range(b"bound/").await.unwrap().is_empty(),
        "revoke after reopen left keys"
    );
    assert_eq!(store.revision().await.unwrap(), rev + 2);

    // The short lease expires about a second after the reopen.
    let deadline = Instant::now() + Duration::from_secs(3);
    while store.get(b"short").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the reopened short lease never expired"
        );
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.revision().await.unwrap(), rev + 3);
    assert!(matches!(
        store.keep_alive(short).await,
        Err(Error::LeaseNotFound(_))
    ));
    store.revoke(fresh).await.unwrap();
    store.close().await.unwrap();
    drop(store);

    // And once more: everything that ended stays ended.
    let store = SledMetadata::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), rev + 3);
    assert!(store.get(b"short").await.unwrap().is_none());
    assert_eq!(
        store.get(b"c").await.unwrap().unwrap().mod_revision,
        rev + 1
    );
    for lease in [long, short, fresh] {
        assert!(matches!(
            store.keep_alive(lease).await,
            Err(Error::LeaseNotFound(_))
        ));
    }
    store.close().await.unwrap();
}

/// A sled store that is simply dropped (no `close`) has still made every
/// acknowledged write durable.
#[tokio::test]
async fn sled_writes_are_durable_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let rev = {
        let store = SledMetadata::open(dir.path()).unwrap();
        store.put(b"k", b"v", None).await.unwrap()
    };
    let store = reopen_when_released(dir.path()).await;
    assert_eq!(store.revision().await.unwrap(), rev);
    assert_eq!(store.get(b"k").await.unwrap().unwrap().value, b"v");
    store.close().await.unwrap();
}

/// Opens `path`, retrying briefly: after a plain drop the lease timer task
/// may hold the store for one more tick before it notices.
async fn reopen_when_released(path: &Path) -> SledMetadata {
    let mut last = None;
    for _ in 0..40 {
        match SledMetadata::open(path) {
            Ok(store) => return store,
            Err(e) => last = Some(e),
        }
        sleep(Duration::from_millis(50)).await;
    }
    panic!("could not reopen {}: {last:?}", path.display());
}
