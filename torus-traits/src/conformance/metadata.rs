//! Conformance suite for [`MetadataStore`].
//!
//! Every function takes the store as `&dyn MetadataStore`, checks one part of
//! the contract written in the module docs of [`crate::metadata`], and panics
//! with a message saying what broke. [`all`] runs every function, one after
//! another, on the same store.
//!
//! Rules the functions follow so they can share one store (including a real
//! etcd that already holds other data):
//!
//! - each function works under its own key prefix,
//!   `/torus-conformance/metadata/<random>/<function>/`, so functions never see
//!   each other's keys and a rerun never sees an old run's keys;
//! - every lease a function grants is revoked or has expired (and been seen to
//!   expire) before the function returns, so nothing changes the store in the
//!   background while the next function checks exact revision numbers;
//! - every wait is bounded by a timeout, and the whole suite takes a few
//!   seconds (the lease tests wait for a 1 s TTL to pass).
//!
//! The revision checks are exact (`+1` per mutation), so the store must not be
//! written by anyone else while the suite runs.

use crate::{
    Compare, CompareOp, Error, EventKind, KeyValue, LeaseId, MetadataStore, Result, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchEvent, WatchStream,
};
use futures::StreamExt;
use std::fmt::Debug;
use std::time::Duration;
use tokio::time::{sleep, timeout, Instant};

/// How long to wait for a watch event that must come.
const EVENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a store may take to delete the keys of an expired 1 s lease,
/// counted from the grant (the contract allows about a second of lag; etcd
/// also rounds short TTLs up to its minimum of about 2 s).
const EXPIRY_DEADLINE: Duration = Duration::from_secs(4);
/// Attempts each contender gets in the concurrent compare-and-swap test.
const CAS_ATTEMPTS: usize = 500;
/// Contenders in the concurrent tests.
const CONTENDERS: usize = 20;

/// Runs every function of the suite, one after another, on one store.
pub async fn all(store: &dyn MetadataStore) {
    get_put_delete_roundtrip(store).await;
    range_by_prefix(store).await;
    revision_increments_by_one(store).await;
    key_revisions_and_version(store).await;
    delete_absent_key(store).await;
    txn_compare_present_key(store).await;
    txn_compare_absent_key(store).await;
    txn_branches_and_responses(store).await;
    txn_concurrent_compare_and_swap(store).await;
    watch_prefix(store).await;
    lease_grant_keep_alive_revoke(store).await;
    lease_unknown(store).await;
    lease_expiry(store).await;
    lease_keep_alive_extends(store).await;
}

// ---------------------------------------------------------------------------
// Key/value basics
// ---------------------------------------------------------------------------

/// `put` then `get` returns the value with fresh bookkeeping; `delete`
/// removes it; binary keys and empty values round-trip.
pub async fn get_put_delete_roundtrip(store: &dyn MetadataStore) {
    let p = prefix("roundtrip");
    let key = k(&p, "key");

    let absent = ok(store.get(&key).await, "get of a key never written");
    assert!(
        absent.is_none(),
        "get of a key never written returned {absent:?}"
    );

    let rev = ok(store.put(&key, b"v1", None).await, "put");
    let kv = must_get(store, &key, "get after put").await;
    assert_eq!(kv.key, key, "get returned the wrong key");
    assert_eq!(kv.value, b"v1", "get after put returned the wrong value");
    assert_eq!(
        kv.create_revision, rev,
        "create_revision of a new key must be the revision returned by its put"
    );
    assert_eq!(
        kv.mod_revision, rev,
        "mod_revision of a new key must be the revision returned by its put"
    );
    assert_eq!(kv.version, 1, "version of a new key must be 1");
    assert_eq!(kv.lease, None, "a put without lease must not bind a lease");

    let rev2 = ok(store.put(&key, b"v2", None).await, "second put");
    assert!(rev2 > rev, "second put returned revision {rev2} <= {rev}");
    let kv = must_get(store, &key, "get after overwrite").await;
    assert_eq!(kv.value, b"v2", "overwrite did not replace the value");

    // Binary key (NUL, 0xff, non-UTF-8) and an empty value.
    let mut bin = p.clone();
    bin.extend_from_slice(&[0x00, 0xff, 0x80, b'/', 0x00]);
    ok(store.put(&bin, b"", None).await, "put of an empty value");
    let kv = must_get(store, &bin, "get of a binary key with an empty value").await;
    assert_eq!(kv.key, bin, "binary key did not round-trip");
    assert!(
        kv.value.is_empty(),
        "empty value came back as {:?}",
        kv.value
    );
    let binary_value = vec![0u8, 1, 0xff, 0xfe, 0, 0x80];
    ok(
        store.put(&bin, &binary_value, None).await,
        "put of a binary value",
    );
    let kv = must_get(store, &bin, "get of a binary value").await;
    assert_eq!(kv.value, binary_value, "binary value did not round-trip");

    assert!(
        ok(store.delete(&key).await, "delete"),
        "delete of an existing key returned false"
    );
    let gone = ok(store.get(&key).await, "get after delete");
    assert!(gone.is_none(), "get after delete returned {gone:?}");
    assert!(
        !ok(store.delete(&key).await, "second delete"),
        "delete of an already deleted key returned true"
    );
    assert!(
        ok(store.delete(&bin).await, "delete binary key"),
        "delete of the binary key returned false"
    );
}

/// `range(prefix)` returns exactly the keys starting with the prefix, in
/// byte order, with the same data `get` returns.
pub async fn range_by_prefix(store: &dyn MetadataStore) {
    let p = prefix("range");
    // Written out of order, with prefix siblings ("a/b" vs "a/bc", "a" vs
    // "a0") and 0xff bytes at the end of a prefix (where computing the end of
    // a prefix range needs a carry).
    let suffixes: Vec<Vec<u8>> = vec![
        b"a/bc".to_vec(),
        b"a0".to_vec(),
        b"a/b".to_vec(),
        b"b".to_vec(),
        b"a/b/c".to_vec(),
        b"a".to_vec(),
        b"a/".to_vec(),
        b"a/b\xff".to_vec(),
        b"\xff\xff".to_vec(),
        b"\xff".to_vec(),
        b"\xff\x00".to_vec(),
        b"ab".to_vec(),
    ];
    let mut revs = Vec::new();
    for s in &suffixes {
        let key = kb(&p, s);
        let rev = ok(store.put(&key, s, None).await, "put for range");
        revs.push((key, rev));
    }

    let check = |query: &[u8], got: Vec<KeyValue>, expected: &[&[u8]]| {
        let strip = |key: &[u8]| -> Vec<u8> {
            key.strip_prefix(p.as_slice())
                .unwrap_or_else(|| {
                    panic!(
                        "range({}) returned {}, outside the prefix",
                        show(query),
                        show(key)
                    )
                })
                .to_vec()
        };
        let got_keys: Vec<Vec<u8>> = got.iter().map(|kv| strip(&kv.key)).collect();
        let expected: Vec<Vec<u8>> = expected.iter().map(|s| s.to_vec()).collect();
        assert_eq!(
            got_keys,
            expected,
            "range({}) returned the wrong keys or order (keys shown without the test prefix)",
            show(query)
        );
        for kv in &got {
            assert_eq!(
                kv.value,
                strip(&kv.key),
                "range returned the wrong value for {}",
                show(&kv.key)
            );
            let rev = revs
                .iter()
                .find(|(key, _)| *key == kv.key)
                .map(|(_, r)| *r)
                .unwrap_or_else(|| panic!("range returned unknown key {}", show(&kv.key)));
            assert_eq!(
                kv.mod_revision,
                rev,
                "range: wrong mod_revision for {}",
                show(&kv.key)
            );
            assert_eq!(
                kv.create_revision,
                rev,
                "range: wrong create_revision for {}",
                show(&kv.key)
            );
            assert_eq!(kv.version, 1, "range: wrong version for {}", show(&kv.key));
        }
    };

    let q = kb(&p, b"a/b");
    let got = ok(store.range(&q).await, "range a/b");
    check(&q, got, &[b"a/b", b"a/b/c", b"a/bc", b"a/b\xff"]);

    let q = kb(&p, b"a/");
    let got = ok(store.range(&q).await, "range a/");
    check(&q, got, &[b"a/", b"a/b", b"a/b/c", b"a/bc", b"a/b\xff"]);

    let q = kb(&p, b"a");
    let got = ok(store.range(&q).await, "range a");
    check(
        &q,
        got,
        &[
            b"a", b"a/", b"a/b", b"a/b/c", b"a/bc", b"a/b\xff", b"a0", b"ab",
        ],
    );

    let q = kb(&p, b"\xff");
    let got = ok(store.range(&q).await, "range 0xff");
    check(&q, got, &[b"\xff", b"\xff\x00", b"\xff\xff"]);

    let q = kb(&p, b"a/bc/");
    let got = ok(store.range(&q).await, "range with no match");
    check(&q, got, &[]);

    let q = kb(&p, b"zzz");
    let got = ok(store.range(&q).await, "range with no match");
    check(&q, got, &[]);

    // The whole test prefix: everything, sorted bytewise.
    let mut all_sorted = suffixes.clone();
    all_sorted.sort();
    let expected: Vec<&[u8]> = all_sorted.iter().map(|s| s.as_slice()).collect();
    let got = ok(store.range(&p).await, "range of the test prefix");
    check(&p, got, &expected);

    // A range after a delete no longer lists the key.
    ok(store.delete(&kb(&p, b"a/b")).await, "delete for range");
    let q = kb(&p, b"a/b");
    let got = ok(store.range(&q).await, "range after delete");
    check(&q, got, &[b"a/b/c", b"a/bc", b"a/b\xff"]);
}

// ---------------------------------------------------------------------------
// Revisions
// ---------------------------------------------------------------------------

/// The global revision grows by exactly one per mutation; all writes of one
/// transaction share one revision; operations that change nothing do not
/// move it.
pub async fn revision_increments_by_one(store: &dyn MetadataStore) {
    let p = prefix("revision");
    let r0 = ok(store.revision().await, "revision");
    assert!(r0 >= 0, "revision is negative: {r0}");

    let r = ok(store.put(&k(&p, "a"), b"1", None).await, "put a");
    assert_eq!(r, r0 + 1, "put must increase the revision by exactly one");
    assert_eq!(
        ok(store.revision().await, "revision"),
        r0 + 1,
        "revision() after put"
    );

    let r = ok(store.put(&k(&p, "b"), b"1", None).await, "put b");
    assert_eq!(
        r,
        r0 + 2,
        "second put must increase the revision by exactly one"
    );

    assert!(ok(store.delete(&k(&p, "a")).await, "delete a"));
    assert_eq!(
        ok(store.revision().await, "revision"),
        r0 + 3,
        "delete of an existing key must increase the revision by exactly one"
    );

    assert!(!ok(store.delete(&k(&p, "a")).await, "delete a again"));
    assert_eq!(
        ok(store.revision().await, "revision"),
        r0 + 3,
        "delete of an absent key must not change the revision"
    );

    // Three writes in one transaction: one revision.
    let resp = ok(
        store
            .txn(Txn::new().and_then([
                TxnOp::put(k(&p, "c"), "1"),
                TxnOp::put(k(&p, "d"), "1"),
                TxnOp::delete(k(&p, "b")),
            ]))
            .await,
        "txn with three writes",
    );
    assert!(resp.succeeded, "txn without compares must succeed");
    assert_eq!(
        resp.revision,
        r0 + 4,
        "a transaction must increase the revision by exactly one, whatever it writes"
    );
    assert_eq!(
        ok(store.revision().await, "revision"),
        r0 + 4,
        "revision() after txn"
    );
    for name in ["c", "d"] {
        let kv = must_get(store, &k(&p, name), "get after txn").await;
        assert_eq!(
            kv.mod_revision,
            r0 + 4,
            "every write of a transaction must carry the transaction's revision"
        );
    }

    // Transactions that write nothing leave the revision alone.
    let no_writes: Vec<(&str, Txn)> = vec![
        (
            "failed compare with an empty failure branch",
            Txn::new()
                .when([Compare::value(k(&p, "c"), CompareOp::Equal, "nope")])
                .and_then([TxnOp::put(k(&p, "x"), "1")]),
        ),
        (
            "only gets",
            Txn::new().and_then([TxnOp::get(k(&p, "c")), TxnOp::get(k(&p, "zz"))]),
        ),
        (
            "delete of an absent key and delete_prefix of an empty prefix",
            Txn::new().and_then([
                TxnOp::delete(k(&p, "absent")),
                TxnOp::delete_prefix(k(&p, "nothing-here/")),
            ]),
        ),
        ("empty", Txn::new()),
    ];
    for (what, txn) in no_writes {
        let resp = ok(store.txn(txn).await, what);
        assert_eq!(
            resp.revision,
            r0 + 4,
            "txn ({what}) must not change the revision and must report the current one"
        );
        assert_eq!(
            ok(store.revision().await, "revision"),
            r0 + 4,
            "txn ({what}) changed the revision"
        );
    }
    assert!(
        ok(store.get(&k(&p, "x")).await, "get x").is_none(),
        "the success branch ran although the compare failed"
    );

    // A failure branch that writes bumps it once.
    let resp = ok(
        store
            .txn(
                Txn::new()
                    .when([Compare::value(k(&p, "c"), CompareOp::Equal, "nope")])
                    .or_else([TxnOp::put(k(&p, "e"), "1"), TxnOp::put(k(&p, "f"), "1")]),
            )
            .await,
        "txn with a writing failure branch",
    );
    assert!(!resp.succeeded, "txn with a false compare reported success");
    assert_eq!(
        resp.revision,
        r0 + 5,
        "a writing failure branch must bump the revision once"
    );
}

/// `create_revision`, `mod_revision` and `version` of one key across puts,
/// a delete and a re-create.
pub async fn key_revisions_and_version(store: &dyn MetadataStore) {
    let p = prefix("bookkeeping");
    let key = k(&p, "key");
    let other = k(&p, "other");

    let r1 = ok(store.put(&key, b"1", None).await, "put 1");
    let kv = must_get(store, &key, "get").await;
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r1, 1),
        "(create_revision, mod_revision, version) after the first put"
    );

    let r2 = ok(store.put(&key, b"2", None).await, "put 2");
    let kv = must_get(store, &key, "get").await;
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r2, 2),
        "(create_revision, mod_revision, version) after the second put"
    );

    // A write to another key moves the global revision, not this key's.
    let r3 = ok(store.put(&other, b"x", None).await, "put other");
    let kv = must_get(store, &key, "get").await;
    assert_eq!(
        kv.mod_revision, r2,
        "a put to another key changed this key's mod_revision"
    );
    assert!(r3 > r2);

    let resp = ok(
        store
            .txn(Txn::new().and_then([TxnOp::put(key.clone(), "3")]))
            .await,
        "txn put",
    );
    let r4 = resp.revision;
    let kv = must_get(store, &key, "get").await;
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r4, 3),
        "(create_revision, mod_revision, version) after a put inside a transaction"
    );

    assert!(ok(store.delete(&key).await, "delete"));
    // Deleting resets everything: compares see an absent key again.
    let resp = ok(
        store
            .txn(Txn::new().when([
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Compare::mod_revision(key.clone(), CompareOp::Equal, 0),
                Compare::version(key.clone(), CompareOp::Equal, 0),
            ]))
            .await,
        "txn compare on a deleted key",
    );
    assert!(
        resp.succeeded,
        "after a delete, create_revision, mod_revision and version must compare as 0"
    );

    let r6 = ok(store.put(&key, b"again", None).await, "put after delete");
    let kv = must_get(store, &key, "get").await;
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r6, r6, 1),
        "a key re-created after a delete must start over (create_revision = mod_revision = its put, version 1)"
    );
}

/// Deleting an absent key returns false and does not change the revision.
pub async fn delete_absent_key(store: &dyn MetadataStore) {
    let p = prefix("delete-absent");
    let key = k(&p, "never");
    let r0 = ok(store.revision().await, "revision");
    assert!(
        !ok(store.delete(&key).await, "delete of a never-written key"),
        "delete of a never-written key returned true"
    );
    assert_eq!(
        ok(store.revision().await, "revision"),
        r0,
        "delete of an absent key changed the revision"
    );

    ok(store.put(&key, b"v", None).await, "put");
    assert!(ok(store.delete(&key).await, "delete"));
    let r1 = ok(store.revision().await, "revision");
    assert!(
        !ok(store.delete(&key).await, "delete of a deleted key"),
        "delete of an already deleted key returned true"
    );
    assert_eq!(
        ok(store.revision().await, "revision"),
        r1,
        "delete of an already deleted key changed the revision"
    );
}

// ---------------------------------------------------------------------------
// Transactions
// ---------------------------------------------------------------------------

/// Every compare target with every operator on an existing key.
pub async fn txn_compare_present_key(store: &dyn MetadataStore) {
    use CompareOp::*;
    let p = prefix("compare-present");
    let key = k(&p, "key");
    let c = ok(store.put(&key, b"first", None).await, "put");
    let m = ok(store.put(&key, b"m", None).await, "put");
    // Now: value "m", create_revision c, mod_revision m, version 2.
    let v = 2;

    let cases: Vec<(Compare, bool)> = vec![
        (Compare::value(key.clone(), Equal, "m"), true),
        (Compare::value(key.clone(), Equal, "n"), false),
        (Compare::value(key.clone(), Equal, ""), false),
        (Compare::value(key.clone(), NotEqual, "n"), true),
        (Compare::value(key.clone(), NotEqual, "m"), false),
        (Compare::value(key.clone(), Greater, "l"), true),
        (Compare::value(key.clone(), Greater, ""), true),
        (Compare::value(key.clone(), Greater, "m"), false),
        (Compare::value(key.clone(), Greater, "mm"), false),
        (Compare::value(key.clone(), Greater, "n"), false),
        (Compare::value(key.clone(), Less, "n"), true),
        (Compare::value(key.clone(), Less, "mm"), true),
        (Compare::value(key.clone(), Less, "m"), false),
        (Compare::value(key.clone(), Less, "l"), false),
        (Compare::create_revision(key.clone(), Equal, c), true),
        (Compare::create_revision(key.clone(), Equal, c + 1), false),
        (Compare::create_revision(key.clone(), NotEqual, c + 1), true),
        (Compare::create_revision(key.clone(), NotEqual, c), false),
        (Compare::create_revision(key.clone(), Greater, c - 1), true),
        (Compare::create_revision(key.clone(), Greater, c), false),
        (Compare::create_revision(key.clone(), Less, c + 1), true),
        (Compare::create_revision(key.clone(), Less, c), false),
        (Compare::create_revision(key.clone(), Equal, 0), false),
        (Compare::absent(key.clone()), false),
        (Compare::mod_revision(key.clone(), Equal, m), true),
        (Compare::mod_revision(key.clone(), Equal, c), false),
        (Compare::mod_revision(key.clone(), NotEqual, c), true),
        (Compare::mod_revision(key.clone(), NotEqual, m), false),
        (Compare::mod_revision(key.clone(), Greater, m - 1), true),
        (Compare::mod_revision(key.clone(), Greater, m), false),
        (Compare::mod_revision(key.clone(), Less, m + 1), true),
        (Compare::mod_revision(key.clone(), Less, m), false),
        (Compare::version(key.clone(), Equal, v), true),
        (Compare::version(key.clone(), Equal, v + 1), false),
        (Compare::version(key.clone(), NotEqual, v + 1), true),
        (Compare::version(key.clone(), NotEqual, v), false),
        (Compare::version(key.clone(), Greater, v - 1), true),
        (Compare::version(key.clone(), Greater, v), false),
        (Compare::version(key.clone(), Less, v + 1), true),
        (Compare::version(key.clone(), Less, v), false),
    ];
    check_compares(store, &key, cases, "existing key").await;

    // Several compares: all must hold.
    let t = Compare::value(key.clone(), Equal, "m");
    let f = Compare::version(key.clone(), Equal, 99);
    for (compares, expected) in [
        (vec![t.clone(), t.clone()], true),
        (vec![t.clone(), f.clone()], false),
        (vec![f.clone(), t.clone()], false),
        (vec![], true),
    ] {
        let n = compares.len();
        let resp = ok(
            store.txn(Txn::new().when(compares)).await,
            "txn with several compares",
        );
        assert_eq!(
            resp.succeeded, expected,
            "a txn with {n} compares must succeed only when every compare holds"
        );
    }
}

/// Compares on an absent key: revisions and version are 0; a `Value`
/// compare is false for every operator.
pub async fn txn_compare_absent_key(store: &dyn MetadataStore) {
    use CompareOp::*;
    let p = prefix("compare-absent");
    let key = k(&p, "absent");
    let cases: Vec<(Compare, bool)> = vec![
        (Compare::absent(key.clone()), true),
        (Compare::create_revision(key.clone(), Equal, 0), true),
        (Compare::create_revision(key.clone(), NotEqual, 0), false),
        (Compare::create_revision(key.clone(), Greater, 0), false),
        (Compare::create_revision(key.clone(), Less, 1), true),
        (Compare::mod_revision(key.clone(), Equal, 0), true),
        (Compare::mod_revision(key.clone(), Greater, 0), false),
        (Compare::mod_revision(key.clone(), Less, 1), true),
        (Compare::version(key.clone(), Equal, 0), true),
        (Compare::version(key.clone(), NotEqual, 0), false),
        (Compare::version(key.clone(), Greater, 0), false),
        (Compare::version(key.clone(), Less, 1), true),
        (Compare::value(key.clone(), Equal, ""), false),
        (Compare::value(key.clone(), Equal, "x"), false),
        (Compare::value(key.clone(), NotEqual, ""), false),
        (Compare::value(key.clone(), NotEqual, "x"), false),
        (Compare::value(key.clone(), Greater, ""), false),
        (Compare::value(key.clone(), Greater, "x"), false),
        (Compare::value(key.clone(), Less, "x"), false),
        (
            Compare::value(key.clone(), Less, b"\xff\xff".to_vec()),
            false,
        ),
    ];
    check_compares(store, &key, cases, "absent key").await;
}

/// Success vs failure branch, the response of every op kind, `Get` inside a
/// transaction and `DeletePrefix` counts.
pub async fn txn_branches_and_responses(store: &dyn MetadataStore) {
    let p = prefix("branches");
    let key = k(&p, "lock");

    // Create-if-absent: the first wins, the second reads the winner.
    let create = || {
        Txn::new()
            .when([Compare::absent(key.clone())])
            .and_then([TxnOp::put(key.clone(), "first")])
            .or_else([TxnOp::get(key.clone())])
    };
    let resp = ok(store.txn(create()).await, "create-if-absent");
    assert!(resp.succeeded, "create-if-absent on an absent key failed");
    assert_eq!(
        resp.responses,
        vec![TxnOpResponse::Put],
        "responses of a branch with one put"
    );
    let created_at = resp.revision;

    let resp = ok(store.txn(create()).await, "second create-if-absent");
    assert!(
        !resp.succeeded,
        "create-if-absent on an existing key succeeded"
    );
    match resp.responses.as_slice() {
        [TxnOpResponse::Get(Some(kv))] => {
            assert_eq!(kv.key, key, "Get in a txn returned the wrong key");
            assert_eq!(kv.value, b"first", "Get in a txn returned the wrong value");
            assert_eq!(
                kv.create_revision, created_at,
                "Get in a txn: create_revision"
            );
            assert_eq!(kv.mod_revision, created_at, "Get in a txn: mod_revision");
            assert_eq!(kv.version, 1, "Get in a txn: version");
        }
        other => panic!("failure branch [Get] returned {other:?}"),
    }
    let kv = must_get(store, &key, "get").await;
    assert_eq!(
        kv.value, b"first",
        "the failed create-if-absent changed the value"
    );

    // Only the chosen branch runs.
    for (holds, ran, skipped) in [(true, "s", "f"), (false, "f", "s")] {
        let target = if holds { "first" } else { "other" };
        let resp = ok(
            store
                .txn(
                    Txn::new()
                        .when([Compare::value(key.clone(), CompareOp::Equal, target)])
                        .and_then([TxnOp::put(k(&p, &format!("{holds}-s")), "x")])
                        .or_else([TxnOp::put(k(&p, &format!("{holds}-f")), "x")]),
                )
                .await,
            "txn choosing a branch",
        );
        assert_eq!(resp.succeeded, holds, "txn reported the wrong branch");
        assert!(
            ok(store.get(&k(&p, &format!("{holds}-{ran}"))).await, "get").is_some(),
            "the chosen branch (compare holds: {holds}) did not run"
        );
        assert!(
            ok(
                store.get(&k(&p, &format!("{holds}-{skipped}"))).await,
                "get"
            )
            .is_none(),
            "the other branch (compare holds: {holds}) ran too"
        );
    }

    // Every op kind in one branch, and the response of each, in order.
    ok(store.put(&k(&p, "keep"), b"kept", None).await, "put");
    ok(store.put(&k(&p, "gone"), b"x", None).await, "put");
    for s in ["d/1", "d/2", "d/3/x", "d0", "d"] {
        ok(store.put(&k(&p, s), s.as_bytes(), None).await, "put");
    }
    let before = ok(store.revision().await, "revision");
    let resp = ok(
        store
            .txn(
                Txn::new()
                    .when([Compare::absent(k(&p, "nothing"))])
                    .and_then([
                        TxnOp::get(k(&p, "keep")),
                        TxnOp::get(k(&p, "missing")),
                        TxnOp::put(k(&p, "new"), "n"),
                        TxnOp::delete(k(&p, "gone")),
                        TxnOp::delete(k(&p, "missing")),
                        TxnOp::delete_prefix(k(&p, "d/")),
                        TxnOp::delete_prefix(k(&p, "empty/")),
                    ]),
            )
            .await,
        "txn with every op kind",
    );
    assert!(resp.succeeded, "txn with a true compare failed");
    assert_eq!(
        resp.revision,
        before + 1,
        "a txn must bump the revision by exactly one"
    );
    assert_eq!(
        resp.responses.len(),
        7,
        "one response per op: {:?}",
        resp.responses
    );
    match &resp.responses[0] {
        TxnOpResponse::Get(Some(kv)) if kv.value == b"kept" => {}
        other => panic!("Get of an existing key in a txn returned {other:?}"),
    }
    assert_eq!(
        resp.responses[1],
        TxnOpResponse::Get(None),
        "Get of an absent key in a txn"
    );
    assert_eq!(resp.responses[2], TxnOpResponse::Put, "Put response");
    assert_eq!(
        resp.responses[3],
        TxnOpResponse::Delete(1),
        "Delete of an existing key"
    );
    assert_eq!(
        resp.responses[4],
        TxnOpResponse::Delete(0),
        "Delete of an absent key"
    );
    assert_eq!(
        resp.responses[5],
        TxnOpResponse::Delete(3),
        "DeletePrefix must return the number of keys it deleted"
    );
    assert_eq!(
        resp.responses[6],
        TxnOpResponse::Delete(0),
        "DeletePrefix of an empty prefix"
    );

    let left: Vec<Vec<u8>> = ok(store.range(&k(&p, "d")).await, "range")
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        left,
        vec![k(&p, "d"), k(&p, "d0")],
        "DeletePrefix(\"d/\") must delete exactly the keys under d/"
    );
    assert!(
        ok(store.get(&k(&p, "gone")).await, "get").is_none(),
        "Delete in a txn did not delete"
    );
    let kv = must_get(store, &k(&p, "new"), "get of a key put in a txn").await;
    assert_eq!(kv.mod_revision, before + 1, "Put in a txn: mod_revision");
}

/// Transactions are atomic under concurrency: contenders incrementing one
/// counter by compare-and-swap lose no update, and of many concurrent
/// create-if-absent transactions exactly one succeeds.
pub async fn txn_concurrent_compare_and_swap(store: &dyn MetadataStore) {
    let p = prefix("cas");
    let counter = k(&p, "counter");

    let increment = |id: usize| {
        let counter = counter.clone();
        async move {
            for attempt in 0..CAS_ATTEMPTS {
                let current = ok(store.get(&counter).await, "get counter");
                // Let the other contenders read the same value before we write.
                tokio::task::yield_now().await;
                let (compare, next) = match current {
                    None => (Compare::absent(counter.clone()), 1u64),
                    Some(kv) => {
                        let n: u64 = std::str::from_utf8(&kv.value)
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or_else(|| panic!("counter holds garbage: {:?}", kv.value));
                        (
                            Compare::mod_revision(
                                counter.clone(),
                                CompareOp::Equal,
                                kv.mod_revision,
                            ),
                            n + 1,
                        )
                    }
                };
                let resp = ok(
                    store
                        .txn(
                            Txn::new()
                                .when([compare])
                                .and_then([TxnOp::put(counter.clone(), next.to_string())]),
                        )
                        .await,
                    "compare-and-swap txn",
                );
                if resp.succeeded {
                    return attempt;
                }
            }
            panic!("contender {id} did not win a compare-and-swap in {CAS_ATTEMPTS} attempts");
        }
    };
    futures::future::join_all((0..CONTENDERS).map(increment)).await;
    let kv = must_get(store, &counter, "get counter").await;
    assert_eq!(
        kv.value,
        CONTENDERS.to_string().into_bytes(),
        "{CONTENDERS} concurrent compare-and-swap increments lost updates"
    );
    assert_eq!(
        kv.version, CONTENDERS as i64,
        "the counter must have been put exactly {CONTENDERS} times"
    );

    // Exactly one of many concurrent create-if-absent transactions wins.
    let lock = k(&p, "lock");
    let create = |id: usize| {
        let lock = lock.clone();
        async move {
            tokio::task::yield_now().await;
            ok(
                store
                    .txn(
                        Txn::new()
                            .when([Compare::absent(lock.clone())])
                            .and_then([TxnOp::put(lock, id.to_string())]),
                    )
                    .await,
                "create-if-absent txn",
            )
        }
    };
    let results: Vec<TxnResponse> = futures::future::join_all((0..CONTENDERS).map(create)).await;
    let winners = results.iter().filter(|r| r.succeeded).count();
    assert_eq!(
        winners, 1,
        "{winners} concurrent create-if-absent transactions succeeded"
    );
    let kv = must_get(store, &lock, "get lock").await;
    assert_eq!(kv.version, 1, "the lock key was written more than once");
}

// ---------------------------------------------------------------------------
// Watches
// ---------------------------------------------------------------------------

/// A watch sees every put and delete under its prefix after it was created,
/// in revision order, and nothing else.
pub async fn watch_prefix(store: &dyn MetadataStore) {
    let p = prefix("watch");
    let wp = k(&p, "w/");
    let key_a = kb(&wp, b"a");

    // Before the watch: must not be delivered.
    ok(
        store.put(&kb(&wp, b"before"), b"0", None).await,
        "put before watch",
    );

    let mut wide = ok(store.watch(&wp).await, "watch");
    let mut narrow = ok(store.watch(&key_a).await, "second watch");
    // A watch dropped right away must not disturb the others.
    drop(ok(store.watch(&wp).await, "third watch"));

    let r1 = ok(store.put(&key_a, b"1", None).await, "put a");
    ok(
        store.put(&k(&p, "w"), b"out", None).await,
        "put outside (the prefix without its slash)",
    );
    ok(
        store.put(&k(&p, "wx/a"), b"out", None).await,
        "put outside (sibling prefix)",
    );
    let r2 = ok(store.put(&key_a, b"2", None).await, "put a again");
    ok(
        store.put(&k(&p, "other"), b"out", None).await,
        "put outside",
    );
    assert!(ok(store.delete(&key_a).await, "delete a"));
    let r3 = ok(store.revision().await, "revision");
    assert!(!ok(store.delete(&key_a).await, "delete a again"));
    let resp = ok(
        store
            .txn(Txn::new().and_then([
                TxnOp::put(kb(&wp, b"b"), "3"),
                TxnOp::put(kb(&wp, b"c"), "4"),
                TxnOp::put(k(&p, "outside"), "out"),
            ]))
            .await,
        "txn",
    );
    let r4 = resp.revision;
    // The last write matches both watches, so both must have delivered
    // everything before it (events come in revision order).
    let end = kb(&wp, b"a-end");
    let r5 = ok(store.put(&end, b"end", None).await, "put end marker");

    struct Want {
        kind: EventKind,
        key: Vec<u8>,
        value: &'static [u8],
        rev: i64,
    }
    let put = |key: &Vec<u8>, value: &'static [u8], rev: i64| Want {
        kind: EventKind::Put,
        key: key.clone(),
        value,
        rev,
    };
    let del = |key: &Vec<u8>, rev: i64| Want {
        kind: EventKind::Delete,
        key: key.clone(),
        value: b"",
        rev,
    };
    let wide_want = vec![
        put(&key_a, b"1", r1),
        put(&key_a, b"2", r2),
        del(&key_a, r3),
        put(&kb(&wp, b"b"), b"3", r4),
        put(&kb(&wp, b"c"), b"4", r4),
        put(&end, b"end", r5),
    ];
    let narrow_want = vec![
        put(&key_a, b"1", r1),
        put(&key_a, b"2", r2),
        del(&key_a, r3),
        put(&end, b"end", r5),
    ];

    for (name, stream, want) in [
        ("watch(w/)", &mut wide, wide_want),
        ("watch(w/a)", &mut narrow, narrow_want),
    ] {
        let mut got = Vec::new();
        for _ in 0..want.len() {
            got.push(next_event(stream, name).await);
        }
        for pair in got.windows(2) {
            assert!(
                pair[0].kv.mod_revision <= pair[1].kv.mod_revision,
                "{name}: events out of revision order: {} then {}",
                pair[0].kv.mod_revision,
                pair[1].kv.mod_revision
            );
        }
        // Events of one revision (one txn) may come in any order.
        let mut got_sorted: Vec<(i64, Vec<u8>, EventKind, Vec<u8>)> = got
            .iter()
            .map(|e| {
                (
                    e.kv.mod_revision,
                    e.kv.key.clone(),
                    e.kind,
                    e.kv.value.clone(),
                )
            })
            .collect();
        got_sorted.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut want_sorted: Vec<(i64, Vec<u8>, EventKind, Vec<u8>)> = want
            .iter()
            .map(|w| (w.rev, w.key.clone(), w.kind, w.value.to_vec()))
            .collect();
        want_sorted.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let show_events = |v: &[(i64, Vec<u8>, EventKind, Vec<u8>)]| {
            v.iter()
                .map(|(r, key, kind, value)| {
                    format!("{kind:?} {} = {} @{r}", show(key), show(value))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert!(
            got_sorted == want_sorted,
            "{name} delivered the wrong events (or something written before the watch, or outside its prefix).\n got: {}\nwant: {}",
            show_events(&got_sorted),
            show_events(&want_sorted)
        );
        // Bookkeeping carried by put events.
        let first = &got[0];
        assert_eq!(
            (first.kv.create_revision, first.kv.version),
            (r1, 1),
            "{name}: a put event must carry the key's create_revision and version"
        );
        let second = &got[1];
        assert_eq!(
            (second.kv.create_revision, second.kv.version),
            (r1, 2),
            "{name}: a put event must carry the key's create_revision and version"
        );
        // Nothing more is pending.
        match timeout(Duration::from_millis(100), stream.next()).await {
            Err(_) => {}
            Ok(extra) => panic!("{name} delivered an unexpected extra item: {extra:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------

/// Grant, bind keys, keep alive, revoke: revoking deletes exactly the bound
/// keys (one revision, `Delete` watch events) and ends the lease.
pub async fn lease_grant_keep_alive_revoke(store: &dyn MetadataStore) {
    let p = prefix("lease");
    let ttl = Duration::from_secs(5);
    let l1 = ok(store.grant(ttl).await, "grant");
    let l2 = ok(store.grant(ttl).await, "second grant");
    assert_ne!(l1.0, 0, "lease id 0 is reserved for \"no lease\"");
    assert_ne!(l2.0, 0, "lease id 0 is reserved for \"no lease\"");
    assert_ne!(l1, l2, "two grants returned the same lease id");

    let mut w = ok(store.watch(&p).await, "watch");
    let (a, b, c, d) = (k(&p, "a"), k(&p, "b"), k(&p, "c"), k(&p, "d"));
    ok(store.put(&a, b"1", Some(l1)).await, "put with lease");
    ok(store.put(&b, b"2", Some(l1)).await, "put with lease");
    ok(
        store.put(&c, b"3", Some(l2)).await,
        "put with another lease",
    );
    let r4 = ok(store.put(&d, b"4", None).await, "put without lease");

    let kv = must_get(store, &a, "get of a key put with a lease").await;
    assert_eq!(kv.lease, Some(l1), "get must report the key's lease");
    let kv = must_get(store, &c, "get").await;
    assert_eq!(kv.lease, Some(l2), "get must report the key's lease");
    let listed = ok(store.range(&p).await, "range");
    let leases: Vec<Option<LeaseId>> = listed.iter().map(|kv| kv.lease).collect();
    assert_eq!(
        leases,
        vec![Some(l1), Some(l1), Some(l2), None],
        "range must report each key's lease"
    );
    for _ in 0..4 {
        let ev = next_event(&mut w, "watch of lease keys").await;
        assert_eq!(ev.kind, EventKind::Put, "expected the put events first");
    }

    let got = ok(store.keep_alive(l1).await, "keep_alive");
    check_ttl(got, ttl, "keep_alive");

    ok(store.revoke(l1).await, "revoke");
    assert!(
        ok(store.get(&a).await, "get").is_none(),
        "revoke did not delete a key bound to the lease"
    );
    assert!(
        ok(store.get(&b).await, "get").is_none(),
        "revoke did not delete a key bound to the lease"
    );
    assert!(
        ok(store.get(&c).await, "get").is_some(),
        "revoke deleted a key bound to another lease"
    );
    assert!(
        ok(store.get(&d).await, "get").is_some(),
        "revoke deleted a key without lease"
    );
    assert_eq!(
        ok(store.revision().await, "revision"),
        r4 + 1,
        "revoking a lease with keys must bump the revision exactly once"
    );

    let mut deleted = Vec::new();
    for _ in 0..2 {
        let ev = next_event(&mut w, "watch after revoke").await;
        assert_eq!(
            ev.kind,
            EventKind::Delete,
            "revoke must produce Delete events, got {ev:?}"
        );
        assert_eq!(
            ev.kv.mod_revision,
            r4 + 1,
            "Delete event of a revoke: mod_revision"
        );
        assert!(
            ev.kv.value.is_empty(),
            "a Delete event must have an empty value"
        );
        deleted.push(ev.kv.key);
    }
    deleted.sort();
    assert_eq!(
        deleted,
        vec![a.clone(), b.clone()],
        "revoke deleted the wrong keys"
    );

    expect_lease_not_found(
        store.keep_alive(l1).await,
        l1,
        "keep_alive of a revoked lease",
    );
    expect_lease_not_found(
        store.put(&k(&p, "e"), b"5", Some(l1)).await,
        l1,
        "put with a revoked lease",
    );
    assert!(
        ok(store.get(&k(&p, "e")).await, "get").is_none(),
        "a put with a revoked lease wrote the key"
    );

    ok(store.revoke(l2).await, "revoke second lease");
    assert!(
        ok(store.get(&c).await, "get").is_none(),
        "revoke did not delete a key bound to the lease"
    );
    ok(store.delete(&d).await, "delete");
}

/// A lease id that was never granted is rejected by `put`, `keep_alive` and a
/// transaction put (which then writes nothing at all).
pub async fn lease_unknown(store: &dyn MetadataStore) {
    let p = prefix("lease-unknown");
    // High bits set, so it collides neither with counters nor, in practice,
    // with etcd's random ids.
    let bogus = LeaseId(0x5eed_0000_0000_0000 | i64::from(rand::random::<u32>()));
    expect_lease_not_found(
        store.put(&k(&p, "a"), b"1", Some(bogus)).await,
        bogus,
        "put with a never-granted lease",
    );
    assert!(
        ok(store.get(&k(&p, "a")).await, "get").is_none(),
        "a put with an unknown lease wrote the key"
    );
    expect_lease_not_found(
        store.keep_alive(bogus).await,
        bogus,
        "keep_alive of a never-granted lease",
    );

    let r0 = ok(store.revision().await, "revision");
    // (etcd's error for a txn does not say which lease, so any id is accepted.)
    match store
        .txn(Txn::new().and_then([
            TxnOp::put(k(&p, "plain"), "1"),
            TxnOp::put_with_lease(k(&p, "bound"), "2", bogus),
        ]))
        .await
    {
        Err(Error::LeaseNotFound(_)) => {}
        other => panic!(
            "txn putting with a never-granted lease: expected Error::LeaseNotFound, got {other:?}"
        ),
    }
    assert!(
        ok(store.get(&k(&p, "plain")).await, "get").is_none(),
        "a txn that failed on an unknown lease applied its other writes"
    );
    assert_eq!(
        ok(store.revision().await, "revision"),
        r0,
        "a failed txn changed the revision"
    );
}

/// Keys bound to a lease that is not kept alive are deleted (with `Delete`
/// watch events) once its TTL passes; the lease is gone afterwards.
pub async fn lease_expiry(store: &dyn MetadataStore) {
    let p = prefix("lease-expiry");
    let ttl = Duration::from_secs(1);
    let granted = Instant::now();
    let lease = ok(store.grant(ttl).await, "grant");
    let (a, b, c) = (k(&p, "a"), k(&p, "b"), k(&p, "c"));
    ok(store.put(&a, b"1", Some(lease)).await, "put with lease");
    ok(store.put(&b, b"2", Some(lease)).await, "put with lease");
    ok(store.put(&c, b"3", None).await, "put without lease");
    let mut w = ok(store.watch(&p).await, "watch");

    sleep(Duration::from_millis(300)).await;
    // Only meaningful when this task was not starved for most of the TTL.
    if granted.elapsed() < Duration::from_millis(800) {
        assert!(
            ok(store.get(&a).await, "get").is_some(),
            "a key bound to a 1 s lease vanished after {:?}",
            granted.elapsed()
        );
    }

    let mut polls = 0;
    loop {
        if ok(store.get(&a).await, "get").is_none() {
            break;
        }
        polls += 1;
        assert!(
            granted.elapsed() < EXPIRY_DEADLINE && polls < 200,
            "a key bound to a 1 s lease was still there {:?} after the grant",
            granted.elapsed()
        );
        sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ok(store.get(&b).await, "get").is_none(),
        "expiry left a key bound to the lease"
    );
    assert!(
        ok(store.get(&c).await, "get").is_some(),
        "expiry deleted a key without lease"
    );

    let mut deleted = Vec::new();
    for _ in 0..2 {
        let ev = next_event(&mut w, "watch of expiring keys").await;
        assert_eq!(
            ev.kind,
            EventKind::Delete,
            "lease expiry must produce Delete events, got {ev:?}"
        );
        assert!(
            ev.kv.value.is_empty(),
            "a Delete event must have an empty value"
        );
        deleted.push(ev.kv.key);
    }
    deleted.sort();
    assert_eq!(
        deleted,
        vec![a.clone(), b.clone()],
        "lease expiry deleted the wrong keys"
    );

    expect_lease_not_found(
        store.keep_alive(lease).await,
        lease,
        "keep_alive of an expired lease",
    );
    expect_lease_not_found(
        store.put(&k(&p, "late"), b"x", Some(lease)).await,
        lease,
        "put with an expired lease",
    );
    ok(store.delete(&c).await, "delete");
}

/// Regular `keep_alive` calls keep a lease's keys alive well past its TTL.
pub async fn lease_keep_alive_extends(store: &dyn MetadataStore) {
    let p = prefix("lease-keepalive");
    let ttl = Duration::from_secs(1);
    let lease = ok(store.grant(ttl).await, "grant");
    let key = k(&p, "alive");
    ok(store.put(&key, b"1", Some(lease)).await, "put with lease");

    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_millis(2500) && rounds < 100 {
        let got = ok(store.keep_alive(lease).await, "keep_alive");
        check_ttl(got, ttl, "keep_alive");
        sleep(Duration::from_millis(250)).await;
        rounds += 1;
    }
    let kv = ok(store.get(&key).await, "get");
    assert!(
        kv.is_some(),
        "a key whose 1 s lease was kept alive every 250 ms vanished within {:?}",
        start.elapsed()
    );
    ok(store.revoke(lease).await, "revoke");
    assert!(
        ok(store.get(&key).await, "get").is_none(),
        "revoke did not delete the key"
    );
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A fresh key prefix for one function of one run.
fn prefix(function: &str) -> Vec<u8> {
    format!(
        "/torus-conformance/metadata/{:08x}/{function}/",
        rand::random::<u32>()
    )
    .into_bytes()
}

fn k(prefix: &[u8], suffix: &str) -> Vec<u8> {
    kb(prefix, suffix.as_bytes())
}

fn kb(prefix: &[u8], suffix: &[u8]) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(suffix);
    key
}

/// Bytes as text where printable, escaped otherwise.
fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

#[track_caller]
fn ok<T>(result: Result<T>, what: &str) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

async fn must_get(store: &dyn MetadataStore, key: &[u8], what: &str) -> KeyValue {
    match store.get(key).await {
        Ok(Some(kv)) => kv,
        Ok(None) => panic!("{what}: key {} is missing", show(key)),
        Err(e) => panic!("{what}: get of {} failed: {e}", show(key)),
    }
}

async fn next_event(stream: &mut WatchStream, what: &str) -> WatchEvent {
    match timeout(EVENT_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("{what}: the watch broke: {e}"),
        Ok(None) => panic!("{what}: the watch stream ended"),
        Err(_) => panic!("{what}: no watch event within {EVENT_TIMEOUT:?}"),
    }
}

#[track_caller]
fn expect_lease_not_found<T: Debug>(result: Result<T>, lease: LeaseId, what: &str) {
    match result {
        Err(Error::LeaseNotFound(id)) => {
            assert_eq!(id, lease.0, "{what}: LeaseNotFound names the wrong lease");
        }
        other => panic!(
            "{what}: expected Error::LeaseNotFound({:#x}), got {other:?}",
            lease.0
        ),
    }
}

/// The TTL `keep_alive` reports: the granted one (etcd may round a short
/// TTL up to its minimum, about 2 s).
#[track_caller]
fn check_ttl(got: Duration, granted: Duration, what: &str) {
    assert!(
        got >= granted && got <= granted + Duration::from_secs(2),
        "{what} returned a TTL of {got:?} for a lease granted with {granted:?}"
    );
}

/// Runs each compare alone in a txn whose branches only read, and checks
/// which branch ran.
async fn check_compares(
    store: &dyn MetadataStore,
    key: &[u8],
    cases: Vec<(Compare, bool)>,
    what: &str,
) {
    let before = ok(store.revision().await, "revision");
    for (compare, expected) in cases {
        let shown = format!("{:?} {:?}", compare.target, compare.op);
        let resp = ok(
            store
                .txn(
                    Txn::new()
                        .when([compare])
                        .and_then([TxnOp::get(key.to_vec())]),
                )
                .await,
            "txn",
        );
        assert_eq!(
            resp.succeeded, expected,
            "compare (current {shown}) on an {what} must be {expected}"
        );
        let expected_responses = if expected { 1 } else { 0 };
        assert_eq!(
            resp.responses.len(),
            expected_responses,
            "compare (current {shown}) on an {what}: the responses are not those of the chosen branch"
        );
    }
    assert_eq!(
        ok(store.revision().await, "revision"),
        before,
        "read-only transactions changed the revision"
    );
}
