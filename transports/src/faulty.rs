//! [`FaultyTransport`]: a decorator that wraps any [`PeerTransport`] and
//! loses, stalls or fails calls on command, for in-process failure tests
//! (dead peers, slow links, lost acknowledgements, network partitions).
//!
//! It is built like `object_store`'s `throttle.rs`: every call is forwarded
//! to the inner transport, with one behaviour added around it, and the
//! behaviour is changed at run time through a [`TransportFaultControl`], a
//! cheap, cloneable handle. With no fault set the decorator is transparent:
//! it passes the `PeerTransport` conformance suite over a conforming
//! transport.
//!
//! Faults act on the *calling* side, from this transport's point of view:
//! `listen` is forwarded untouched, and a partition between nodes A and B is
//! A's transport not reaching B plus (for a symmetric split) B's not reaching
//! A. Addresses are compared as strings, exactly as passed to `call` (use
//! the listener's `local_addr`).
//!
//! # What happens to one call
//!
//! The first rule that matches decides, in this order:
//!
//! 1. The address is partitioned ([`TransportFaultControl::partition`]): the
//!    call fails the partition's [`DropMode`] way (by default
//!    [`DropMode::Refuse`]). [`TransportFaultControl::heal`] reconnects.
//! 2. The address has a drop rule ([`TransportFaultControl::drop_calls`]):
//!    the call fails that rule's way.
//! 3. A random failure rate is set ([`TransportFaultControl::fail_rate`]):
//!    with that probability, drawn from an RNG seeded by the test, the call
//!    fails with `Unavailable` without reaching the peer.
//! 4. Otherwise the call is delivered, after the delay set for its address
//!    or for every call ([`TransportFaultControl::delay`],
//!    [`TransportFaultControl::delay_to`]).
//!
//! A [`DropMode`] says how a lost call fails: at once with `Unavailable`
//! (connection refused), after a wait with `Timeout` (packets black-holed),
//! or after the peer handled it, with `Timeout` (the reply was lost, so the
//! request's side effects happened but the caller cannot know).
//!
//! A call timeout ([`TransportFaultControl::set_call_timeout`]) bounds every
//! call, delays and hangs included: a call not done by then fails with
//! `Timeout` (the request may or may not have reached the peer).
//!
//! Rules are read when a call starts: changing them affects later calls,
//! not calls already waiting.

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use torus_traits::{
    Error, PeerHandler, PeerListener, PeerRequest, PeerResponse, PeerTransport, Result,
};

/// How a lost call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropMode {
    /// Not delivered; fails at once with `Unavailable`.
    Refuse,
    /// Not delivered; fails with `Timeout` after the given wait.
    Hang(Duration),
    /// Delivered and handled, but the reply is lost: fails with `Timeout`
    /// once the peer has answered.
    LoseReply,
}

/// Counts of calls and of faults injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportFaultStats {
    /// Every call made through the decorator.
    pub calls: u64,
    /// Calls stopped by a partition.
    pub partitioned: u64,
    /// Calls stopped by a drop rule.
    pub dropped: u64,
    /// Calls failed by the random failure rate.
    pub failed: u64,
    /// Calls delayed.
    pub delayed: u64,
    /// Calls that ran out of the call timeout.
    pub timed_out: u64,
}

#[derive(Default)]
struct Faults {
    partition: HashMap<String, DropMode>,
    drops: HashMap<String, DropMode>,
    fail_rate: Option<(f64, StdRng)>,
    delay: Option<Duration>,
    delay_to: HashMap<String, Duration>,
    call_timeout: Option<Duration>,
    stats: TransportFaultStats,
}

/// A [`PeerTransport`] decorator that injects faults; see the
/// [module docs](crate::faulty).
pub struct FaultyTransport {
    inner: Arc<dyn PeerTransport>,
    faults: Arc<Mutex<Faults>>,
}

/// Changes what a [`FaultyTransport`] does, while it runs. Clones control
/// the same transport.
#[derive(Clone)]
pub struct TransportFaultControl {
    faults: Arc<Mutex<Faults>>,
}

fn lock(faults: &Mutex<Faults>) -> MutexGuard<'_, Faults> {
    // The rules are plain data updated in one step: still consistent after
    // a panic elsewhere.
    faults
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FaultyTransport {
    /// Wraps `inner`, with no fault set.
    pub fn new(inner: Arc<dyn PeerTransport>) -> Self {
        FaultyTransport {
            inner,
            faults: Arc::new(Mutex::new(Faults::default())),
        }
    }

    /// A handle that changes this transport's faults.
    pub fn control(&self) -> TransportFaultControl {
        TransportFaultControl {
            faults: self.faults.clone(),
        }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &Arc<dyn PeerTransport> {
        &self.inner
    }
}

impl std::fmt::Debug for FaultyTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyTransport").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TransportFaultControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportFaultControl")
            .finish_non_exhaustive()
    }
}

impl TransportFaultControl {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }

    /// Makes every address in `addrs` unreachable (refused with
    /// `Unavailable`), in addition to those already cut off.
    pub fn partition<I, S>(&self, addrs: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.partition_with(addrs, DropMode::Refuse);
    }

    /// Makes every address in `addrs` unreachable, failing calls the `mode`
    /// way.
    pub fn partition_with<I, S>(&self, addrs: I, mode: DropMode)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut f = self.faults();
        for addr in addrs {
            f.partition.insert(addr.into(), mode);
        }
    }

    /// Reconnects every partitioned address.
    pub fn heal(&self) {
        self.faults().partition.clear();
    }

    /// Reconnects one partitioned address.
    pub fn heal_addr(&self, addr: &str) {
        self.faults().partition.remove(addr);
    }

    /// The partitioned addresses, sorted.
    pub fn partitioned(&self) -> Vec<String> {
        let mut addrs: Vec<String> = self.faults().partition.keys().cloned().collect();
        addrs.sort();
        addrs
    }

    /// Loses every call to `addr` the `mode` way, until
    /// [`undrop`](Self::undrop) or [`clear_drops`](Self::clear_drops).
    pub fn drop_calls(&self, addr: impl Into<String>, mode: DropMode) {
        self.faults().drops.insert(addr.into(), mode);
    }

    /// Stops losing calls to `addr`.
    pub fn undrop(&self, addr: &str) {
        self.faults().drops.remove(addr);
    }

    /// Stops losing calls to any address.
    pub fn clear_drops(&self) {
        self.faults().drops.clear();
    }

    /// Fails each call (to any address) with probability `p`, with
    /// `Unavailable` and without delivering it; the draws come from an RNG
    /// seeded with `seed`, so a run is repeatable when calls happen in the
    /// same order. `p` is clamped to `[0, 1]`; 0 turns it off.
    pub fn fail_rate(&self, p: f64, seed: u64) {
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        self.faults().fail_rate = (p > 0.0).then(|| (p, StdRng::seed_from_u64(seed)));
    }

    /// Delays every delivered call by `by` (a per-address delay wins).
    pub fn delay(&self, by: Duration) {
        self.faults().delay = Some(by);
    }

    /// Delays every delivered call to `addr` by `by`.
    pub fn delay_to(&self, addr: impl Into<String>, by: Duration) {
        self.faults().delay_to.insert(addr.into(), by);
    }

    /// Removes every delay.
    pub fn clear_delay(&self) {
        let mut f = self.faults();
        f.delay = None;
        f.delay_to.clear();
    }

    /// Bounds every call: one not done after `limit` fails with `Timeout`.
    /// `None` removes the bound.
    pub fn set_call_timeout(&self, limit: Option<Duration>) {
        self.faults().call_timeout = limit;
    }

    /// Removes every fault: partitions, drops, failure rate, delays and the
    /// call timeout.
    pub fn reset(&self) {
        let mut f = self.faults();
        let stats = f.stats;
        *f = Faults {
            stats,
            ..Faults::default()
        };
    }

    /// Counts of calls and faults so far.
    pub fn stats(&self) -> TransportFaultStats {
        self.faults().stats
    }
}

/// What one call will do, decided when it starts.
enum Fate {
    Lose(DropMode, &'static str),
    Fail,
    Deliver(Option<Duration>),
}

impl FaultyTransport {
    fn decide(&self, addr: &str) -> (Fate, Option<Duration>) {
        let mut f = lock(&self.faults);
        f.stats.calls += 1;
        let timeout = f.call_timeout;
        if let Some(&mode) = f.partition.get(addr) {
            f.stats.partitioned += 1;
            return (Fate::Lose(mode, "partitioned"), timeout);
        }
        if let Some(&mode) = f.drops.get(addr) {
            f.stats.dropped += 1;
            return (Fate::Lose(mode, "dropped"), timeout);
        }
        if let Some((p, rng)) = &mut f.fail_rate {
            if rng.gen_bool(*p) {
                f.stats.failed += 1;
                return (Fate::Fail, timeout);
            }
        }
        let delay = f.delay_to.get(addr).copied().or(f.delay);
        if delay.is_some() {
            f.stats.delayed += 1;
        }
        (Fate::Deliver(delay), timeout)
    }

    async fn run(&self, fate: Fate, addr: &str, request: PeerRequest) -> Result<PeerResponse> {
        match fate {
            Fate::Lose(DropMode::Refuse, why) => Err(Error::Unavailable(format!(
                "call to {addr} {why} by fault injection"
            ))),
            Fate::Lose(DropMode::Hang(wait), why) => {
                tokio::time::sleep(wait).await;
                Err(Error::Timeout(format!(
                    "call to {addr} {why} by fault injection: no answer in {wait:?}"
                )))
            }
            Fate::Lose(DropMode::LoseReply, why) => {
                // The peer handles it; whatever it answered is lost.
                let _ = self.inner.call(addr, request).await;
                Err(Error::Timeout(format!(
                    "reply from {addr} {why} by fault injection"
                )))
            }
            Fate::Fail => Err(Error::Unavailable(format!(
                "call to {addr} failed by fault injection"
            ))),
            Fate::Deliver(delay) => {
                if let Some(by) = delay {
                    tokio::time::sleep(by).await;
                }
                self.inner.call(addr, request).await
            }
        }
    }
}

#[async_trait]
impl PeerTransport for FaultyTransport {
    async fn listen(
        &self,
        addr: &str,
        handler: Arc<dyn PeerHandler>,
    ) -> Result<Box<dyn PeerListener>> {
        self.inner.listen(addr, handler).await
    }

    async fn call(&self, addr: &str, request: PeerRequest) -> Result<PeerResponse> {
        let (fate, limit) = self.decide(addr);
        let Some(limit) = limit else {
            return self.run(fate, addr, request).await;
        };
        match tokio::time::timeout(limit, self.run(fate, addr, request)).await {
            Ok(result) => result,
            Err(_) => {
                lock(&self.faults).stats.timed_out += 1;
                Err(Error::Timeout(format!(
                    "call to {addr} took longer than {limit:?}"
                )))
            }
        }
    }
}
