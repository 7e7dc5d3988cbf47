//! `MetadataStore`: a small transactional key-value store shaped like etcd v3.
//!
//! Semantics every implementation provides (the conformance suite checks them):
//!
//! - One global, strictly increasing **revision** counter. Every successful
//!   mutation (a `put`, a `delete` that removed something, a transaction whose
//!   chosen branch wrote anything) increments it by exactly one; all writes of
//!   one transaction share that revision. A fresh store is at revision 0 or 1.
//! - Each key records `create_revision` (revision of the put that created it),
//!   `mod_revision` (of the last put) and `version` (number of puts since
//!   creation, 1 for a new key). Deleting a key resets all three.
//! - **Compares** on an absent key see value = none, `create_revision` = 0,
//!   `mod_revision` = 0, `version` = 0. So "create if absent" is
//!   `Compare::create_revision(key, Equal, 0)`. A `Value` compare on an absent
//!   key is false for every operator.
//! - **Transactions** are atomic: compares are evaluated and one branch applied
//!   with no other write in between.
//! - **Watches** deliver, in revision order, every put and delete under the
//!   prefix that happens after `watch` returns. A dropped stream stops the watch.
//! - **Leases**: `grant(ttl)` returns a lease; a key put with that lease is
//!   deleted (with a watch `Delete` event) when the lease expires or is revoked.
//!   `keep_alive` resets the TTL and returns it; on an unknown or expired lease
//!   it returns [`Error::LeaseNotFound`](crate::Error::LeaseNotFound), and so
//!   does a put bound to one. Expiry may lag the TTL by up to about a second.

use crate::Result;
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::time::Duration;

/// An etcd lease id. Never 0 (0 means "no lease" on the wire in etcd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

/// A stored key with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: Option<LeaseId>,
}

/// What a compare looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    Value(Vec<u8>),
    CreateRevision(i64),
    ModRevision(i64),
    Version(i64),
}

/// How the key's current field is compared with the target (`current OP target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// One condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Compare {
            key: key.into(),
            op,
            target: CompareTarget::Value(value.into()),
        }
    }
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, rev: i64) -> Self {
        Compare {
            key: key.into(),
            op,
            target: CompareTarget::CreateRevision(rev),
        }
    }
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, rev: i64) -> Self {
        Compare {
            key: key.into(),
            op,
            target: CompareTarget::ModRevision(rev),
        }
    }
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: i64) -> Self {
        Compare {
            key: key.into(),
            op,
            target: CompareTarget::Version(version),
        }
    }
    /// True when the key does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Compare::create_revision(key, CompareOp::Equal, 0)
    }
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: Vec<u8>,
    },
    DeletePrefix {
        prefix: Vec<u8>,
    },
    Get {
        key: Vec<u8>,
    },
}

impl TxnOp {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }
    pub fn put_with_lease(
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Delete { key: key.into() }
    }
    pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> Self {
        TxnOp::DeletePrefix {
            prefix: prefix.into(),
        }
    }
    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Get { key: key.into() }
    }
}

/// A compare-and-swap transaction: if every compare holds, apply `success`,
/// else apply `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    pub fn new() -> Self {
        Txn::default()
    }
    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(compares);
        self
    }
    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success.extend(ops);
        self
    }
    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.failure.extend(ops);
        self
    }
}

/// The result of one operation of the branch that ran, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResponse {
    Put,
    /// Number of keys deleted.
    Delete(u64),
    Get(Option<KeyValue>),
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// True when the compares held and `success` ran.
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    pub responses: Vec<TxnOpResponse>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change seen by a watch. For a delete, `kv.value` is empty and
/// `kv.mod_revision` is the revision of the delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// A stream of watch events. An `Err` item means the watch broke (e.g. the
/// server went away); the caller re-reads state and watches again.
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// The metadata store. See the module docs for the exact semantics.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// The current value of `key`.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>>;
    /// All keys starting with `prefix`, in key order.
    async fn range(&self, prefix: &[u8]) -> Result<Vec<KeyValue>>;
    /// Store `value` at `key`, optionally bound to a lease. Returns the new revision.
    async fn put(&self, key: &[u8], value: &[u8], lease: Option<LeaseId>) -> Result<i64>;
    /// Remove `key`; true when it existed.
    async fn delete(&self, key: &[u8]) -> Result<bool>;
    /// Run a compare-and-swap transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse>;
    /// Watch every change under `prefix` from now on.
    async fn watch(&self, prefix: &[u8]) -> Result<WatchStream>;
    /// Grant a lease that expires after `ttl` unless kept alive.
    async fn grant(&self, ttl: Duration) -> Result<LeaseId>;
    /// Reset a lease's time to live; returns the TTL.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;
    /// End a lease now, deleting every key bound to it.
    async fn revoke(&self, lease: LeaseId) -> Result<()>;
    /// The store's current revision.
    async fn revision(&self) -> Result<i64>;
    /// Make every acknowledged write durable and release resources. Further
    /// calls may fail with [`Error::Closed`](crate::Error::Closed).
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
