//! [`FaultyBlockStore`]: a decorator that wraps any [`BlockStore`] and makes
//! it fail, stall, return corrupt data or lose power on command, for
//! in-process failure tests (dead disks, slow disks, bit rot, power loss).
//!
//! It is built like `object_store`'s `limit.rs`/`throttle.rs`: it forwards
//! every call to the inner store and adds one behaviour around it. The
//! behaviour is changed at run time through a [`FaultControl`], a cheap,
//! cloneable handle that a test keeps after handing the store to a node.
//! With no fault set the decorator is transparent: it passes the
//! `BlockStore` conformance suite over a conforming store.
//!
//! # Operations and fault order
//!
//! Each trait method is one [`Op`] (`scan_chunk` counts as a read); an
//! [`OpSet`] names several
//! ([`OpSet::READS`] is `read`, [`OpSet::WRITES`] is `write`, `zero` and
//! `delete_chunk`, [`OpSet::FLUSH`] is `flush`, [`OpSet::ALL`] adds
//! `list_chunks` and `used`). `delete_volume` is `list_chunks` followed by
//! `delete_chunk` of each chunk of the volume, each subject to faults.
//! `chunk_size` and `capacity` never fail.
//!
//! Every call first sleeps for the delay set for its op, if any
//! ([`FaultControl::delay`]); then fails, without reaching the inner store,
//! if a failure rule covers it ([`FaultControl::fail`],
//! [`FaultControl::fail_next`], [`FaultControl::fail_chunk`]); then runs on
//! the inner store. A read's result may then be corrupted
//! ([`FaultControl::corrupt_chunk`], [`FaultControl::corrupt_reads`]): the
//! store's data is untouched, only the returned copy has bits flipped. A
//! `scan_chunk` (forwarded to the inner store) is corrupted the same way, as
//! a read of the whole chunk: the blocks hit get the checksum of the flipped
//! data and are listed as bad. Lasting damage to stored data is
//! [`FaultControl::rot`]; it goes through the inner store's `write`, so a
//! store that keeps checksums (file, mmap) checksums the rotten byte like
//! any write and does not report it: to test their detection, damage their
//! files directly.
//!
//! # Power loss
//!
//! With [`FaultControl::set_drop_unflushed`] on, the decorator keeps an undo
//! log: before a `write`, `zero` or `delete_chunk` changes the inner store,
//! it saves the prior content and allocation of every 4 KiB block the
//! operation may change. [`FaultControl::power_cut`] then puts back, block by
//! block, the state from before the oldest operation not yet made durable,
//! so the inner store holds exactly what a crash would have left: everything
//! that was durable and nothing else (same bytes, same `used()`, same
//! `list_chunks()`).
//!
//! What is durable follows the trait's promise, and no more:
//!
//! - An operation that completed before `flush` was *called* is durable once
//!   that flush returns `Ok`. A write racing with a flush (still running when
//!   flush was called) is not made durable by it, even if it finishes first.
//!   A flush that fails (a fault, or the inner store's error) makes nothing
//!   durable; a flush still running when the power is cut fails with
//!   `Unavailable` and makes nothing durable either.
//! - Turning the mode on counts as a flush of everything done so far;
//!   turning it off forgets the log (everything counts as durable).
//! - `power_cut` waits for `write`/`zero`/`delete_chunk` calls already
//!   running on the inner store (they are then undone, like every other
//!   unflushed change) and holds back new ones until it is done; reads are
//!   not held back and may see the state half restored. After a cut, the
//!   store keeps working, as after a reboot; a test that wants the node down
//!   meanwhile sets [`FaultControl::fail`] before the cut and clears it after.
//! - Failed operations (faults or inner errors) are assumed to have changed
//!   nothing, as the trait requires for `NoSpace`.
//!
//! To know which blocks were allocated the decorator follows allocation
//! itself, by the trait's rules (a non-empty write allocates every block it
//! touches, a zero frees the blocks wholly inside it, a delete frees all).
//! It learns the starting state on its first change: chunks the inner store
//! does not list hold nothing, and in chunks it lists, a block counts as
//! allocated when it holds a non-zero byte. That is exact for a store that
//! starts empty, the normal case; for a store that already holds blocks
//! written with zeros, a power cut may free such a block (same content,
//! lower `used()`). Nothing must write to the inner store except through the
//! decorator.
//!
//! To keep the log coherent, `write`, `zero` and `delete_chunk` on one chunk
//! run one at a time (memory stores lock a chunk per operation anyway);
//! operations on different chunks, and reads, run in parallel as before.

use super::sums::ZERO_CRC;
use super::{blocks_inside, blocks_touched, check_range, lock};
use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Mutex as AsyncMutex, OnceCell, OwnedMutexGuard, RwLock as AsyncRwLock};
use torus_traits::{BlockStore, ChunkRef, ChunkScan, Error, Result, VolumeId, SECTOR};

/// One `BlockStore` method, as far as faults are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Zero,
    Flush,
    Delete,
    List,
    Used,
}

impl Op {
    const fn bit(self) -> u8 {
        match self {
            Op::Read => 1,
            Op::Write => 2,
            Op::Zero => 4,
            Op::Flush => 8,
            Op::Delete => 16,
            Op::List => 32,
            Op::Used => 64,
        }
    }
}

/// A set of [`Op`]s a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpSet(u8);

impl OpSet {
    /// No operation.
    pub const NONE: OpSet = OpSet(0);
    /// `read` (and `scan_chunk`).
    pub const READS: OpSet = OpSet(Op::Read.bit());
    /// `write`, `zero` and `delete_chunk`: everything that changes data.
    pub const WRITES: OpSet = OpSet(Op::Write.bit() | Op::Zero.bit() | Op::Delete.bit());
    /// `flush`.
    pub const FLUSH: OpSet = OpSet(Op::Flush.bit());
    /// Every operation, including `list_chunks` and `used`.
    pub const ALL: OpSet = OpSet(0x7f);

    /// The set holding only `op`.
    pub const fn only(op: Op) -> OpSet {
        OpSet(op.bit())
    }

    /// This set and `other`.
    pub const fn union(self, other: OpSet) -> OpSet {
        OpSet(self.0 | other.0)
    }

    /// Whether `op` is in the set.
    pub const fn contains(self, op: Op) -> bool {
        self.0 & op.bit() != 0
    }
}

impl From<Op> for OpSet {
    fn from(op: Op) -> OpSet {
        OpSet::only(op)
    }
}

/// Counts of faults injected so far (see [`FaultControl::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Calls that failed by a failure rule.
    pub failed: u64,
    /// Calls that were delayed.
    pub delayed: u64,
    /// Reads whose returned data was corrupted.
    pub corrupted_reads: u64,
    /// Completed power cuts.
    pub power_cuts: u64,
    /// 4 KiB blocks put back by power cuts.
    pub reverted_blocks: u64,
}

/// Fails every op in `ops`, `remaining` more times (forever when `None`).
struct FailRule {
    ops: OpSet,
    error: Error,
    remaining: Option<u64>,
}

#[derive(Default)]
struct Faults {
    fail: Option<FailRule>,
    failing_chunks: HashMap<ChunkRef, Error>,
    delay: Option<(OpSet, Duration)>,
    corrupt_chunks: BTreeSet<ChunkRef>,
    corrupt_rate: Option<(f64, StdRng)>,
    stats: FaultStats,
}

/// Saved state of the blocks one operation may change: `None` for a block
/// that held no data, else its 4 KiB.
struct Undo {
    seq: u64,
    blocks: Vec<(u64, Option<Bytes>)>,
}

#[derive(Default)]
struct Track {
    drop_unflushed: bool,
    /// Sequence number of the next recorded change.
    next_seq: u64,
    /// Bumped by every power cut, so flushes running across one fail.
    generation: u64,
    /// Allocated blocks of every chunk that has any.
    alloc: HashMap<ChunkRef, BTreeSet<u64>>,
    /// Unflushed changes per chunk, oldest first.
    logs: HashMap<ChunkRef, VecDeque<Undo>>,
}

struct Core {
    inner: Arc<dyn BlockStore>,
    faults: Mutex<Faults>,
    track: Mutex<Track>,
    /// Serialises changes to one chunk.
    chunk_locks: Mutex<HashMap<ChunkRef, Arc<AsyncMutex<()>>>>,
    /// Changes hold it shared; a power cut holds it exclusively.
    gate: AsyncRwLock<()>,
    /// Starting allocation learnt from the inner store.
    init: OnceCell<()>,
}

/// A [`BlockStore`] decorator that injects faults; see the
/// [module docs](crate::storage::faulty).
pub struct FaultyBlockStore {
    core: Arc<Core>,
}

/// Changes what a [`FaultyBlockStore`] does, while it runs. Clones control
/// the same store.
#[derive(Clone)]
pub struct FaultControl {
    core: Arc<Core>,
}

impl FaultyBlockStore {
    /// Wraps `inner`, with no fault set and the power-loss mode off.
    pub fn new(inner: Arc<dyn BlockStore>) -> Self {
        FaultyBlockStore {
            core: Arc::new(Core {
                inner,
                faults: Mutex::new(Faults::default()),
                track: Mutex::new(Track::default()),
                chunk_locks: Mutex::new(HashMap::new()),
                gate: AsyncRwLock::new(()),
                init: OnceCell::new(),
            }),
        }
    }

    /// A handle that changes this store's faults.
    pub fn control(&self) -> FaultControl {
        FaultControl {
            core: self.core.clone(),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn BlockStore> {
        &self.core.inner
    }

    /// Same as [`FaultControl::power_cut`].
    pub async fn power_cut(&self) -> Result<()> {
        self.core.power_cut().await
    }
}

impl std::fmt::Debug for FaultyBlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyBlockStore")
            .field("chunk_size", &self.core.inner.chunk_size())
            .field("capacity", &self.core.inner.capacity())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for FaultControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultControl").finish_non_exhaustive()
    }
}

impl FaultControl {
    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        lock(&self.core.faults)
    }

    /// Every op in `ops` fails with `error` until [`clear_fail`](Self::clear_fail)
    /// (replaces an earlier `fail`/`fail_next`).
    pub fn fail(&self, ops: impl Into<OpSet>, error: Error) {
        self.faults().fail = Some(FailRule {
            ops: ops.into(),
            error,
            remaining: None,
        });
    }

    /// The next `n` ops in `ops` fail with `error`, then they work again
    /// (replaces an earlier `fail`/`fail_next`).
    pub fn fail_next(&self, ops: impl Into<OpSet>, error: Error, n: u64) {
        self.faults().fail = (n > 0).then(|| FailRule {
            ops: ops.into(),
            error,
            remaining: Some(n),
        });
    }

    /// Every `read`, `write`, `zero` and `delete_chunk` of `chunk` fails with
    /// `error` (a bad spot on the disk) until [`clear_fail`](Self::clear_fail).
    pub fn fail_chunk(&self, chunk: ChunkRef, error: Error) {
        self.faults().failing_chunks.insert(chunk, error);
    }

    /// Removes every failure rule.
    pub fn clear_fail(&self) {
        let mut f = self.faults();
        f.fail = None;
        f.failing_chunks.clear();
    }

    /// Every op in `ops` sleeps `by` before it runs (replaces an earlier delay).
    pub fn delay(&self, ops: impl Into<OpSet>, by: Duration) {
        self.faults().delay = Some((ops.into(), by));
    }

    /// Removes the delay.
    pub fn clear_delay(&self) {
        self.faults().delay = None;
    }

    /// Every non-empty read of `chunk` returns data with the lowest bit of
    /// the first byte flipped in each 4 KiB block it covers (so every block
    /// read fails its checksum, and a scan lists every block as bad), until
    /// [`clear_corruption`](Self::clear_corruption).
    pub fn corrupt_chunk(&self, chunk: ChunkRef) {
        self.faults().corrupt_chunks.insert(chunk);
    }

    /// Each non-empty read, with probability `p`, returns data with one
    /// random bit flipped; the choices come from an RNG seeded with `seed`,
    /// so a run is repeatable when reads happen in the same order. `p` is
    /// clamped to `[0, 1]`.
    pub fn corrupt_reads(&self, p: f64, seed: u64) {
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        self.faults().corrupt_rate = Some((p, StdRng::seed_from_u64(seed)));
    }

    /// Stops corrupting reads.
    pub fn clear_corruption(&self) {
        let mut f = self.faults();
        f.corrupt_chunks.clear();
        f.corrupt_rate = None;
    }

    /// Removes every failure, delay and corruption (not the power-loss mode).
    pub fn heal(&self) {
        let mut f = self.faults();
        let stats = f.stats;
        *f = Faults {
            stats,
            ..Faults::default()
        };
    }

    /// Counts of faults injected so far.
    pub fn stats(&self) -> FaultStats {
        self.faults().stats
    }

    /// Turns the power-loss mode on or off (see the
    /// [module docs](crate::storage::faulty)). Turning it on counts as a
    /// flush of everything done so far.
    pub fn set_drop_unflushed(&self, on: bool) {
        let mut t = lock(&self.core.track);
        t.drop_unflushed = on;
        t.logs.clear();
    }

    /// Whether the power-loss mode is on.
    pub fn drop_unflushed(&self) -> bool {
        lock(&self.core.track).drop_unflushed
    }

    /// Number of 4 KiB block images kept for changes not yet flushed.
    pub fn unflushed_blocks(&self) -> usize {
        lock(&self.core.track)
            .logs
            .values()
            .flat_map(|log| log.iter())
            .map(|u| u.blocks.len())
            .sum()
    }

    /// Simulates a power loss: puts the inner store back to the state as of
    /// the last successful flush (see the
    /// [module docs](crate::storage::faulty)). Does nothing to the data when
    /// the power-loss mode is off. Faults do not apply to the restoring
    /// writes. An error from the inner store leaves it partly
    /// restored.
    pub async fn power_cut(&self) -> Result<()> {
        self.core.power_cut().await
    }

    /// Bit rot: flips the lowest bit of the byte at `offset` of `chunk` in
    /// the inner store itself, so every later read sees it until the byte is
    /// written again. The block must hold data (`InvalidArgument` otherwise:
    /// rot does not allocate). The damage is not a change of the log: if the
    /// block has unflushed changes, a power cut puts back its flushed,
    /// undamaged content.
    pub async fn rot(&self, chunk: ChunkRef, offset: u64) -> Result<()> {
        self.core.rot(chunk, offset).await
    }
}

/// Holds one chunk's change lock and drops its table entry when unused.
struct ChunkGuard<'a> {
    core: &'a Core,
    chunk: ChunkRef,
    mutex: Arc<AsyncMutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        self.guard = None;
        let mut locks = lock(&self.core.chunk_locks);
        // Only the table and this guard hold it: nobody waits for it.
        if Arc::strong_count(&self.mutex) == 2 {
            locks.remove(&self.chunk);
        }
    }
}

/// A change to one chunk.
enum Change {
    Write { offset: u64, data: Bytes },
    Zero { offset: u64, len: u64 },
    Delete,
}

/// Contiguous runs of block numbers in an ordered sequence.
fn runs(blocks: impl IntoIterator<Item = u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some(r) if r.end == b => r.end = b + 1,
            _ => out.push(b..b + 1),
        }
    }
    out
}

impl Core {
    /// Delay, then failure rules, for one call.
    async fn before(&self, op: Op, chunk: Option<ChunkRef>) -> Result<()> {
        let delay = {
            let mut f = lock(&self.faults);
            match f.delay {
                Some((ops, by)) if ops.contains(op) => {
                    f.stats.delayed += 1;
                    Some(by)
                }
                _ => None,
            }
        };
        if let Some(by) = delay {
            tokio::time::sleep(by).await;
        }
        let mut f = lock(&self.faults);
        if let Some(error) = chunk.and_then(|c| f.failing_chunks.get(&c)).cloned() {
            if OpSet::READS.union(OpSet::WRITES).contains(op) {
                f.stats.failed += 1;
                return Err(error);
            }
        }
        let mut spent = false;
        let mut failure = None;
        if let Some(rule) = &mut f.fail {
            if rule.ops.contains(op) {
                failure = Some(rule.error.clone());
                if let Some(n) = &mut rule.remaining {
                    *n = n.saturating_sub(1);
                    spent = *n == 0;
                }
            }
        }
        if spent {
            f.fail = None;
        }
        match failure {
            Some(error) => {
                f.stats.failed += 1;
                Err(error)
            }
            None => Ok(()),
        }
    }

    /// Whether the read corruption faults hit a read of `len` bytes of
    /// `chunk` (not empty): `None`, or whether the whole chunk is corrupted
    /// and the byte and bit of a random flip. Counts the read as corrupted.
    fn corruption(&self, chunk: ChunkRef, len: usize) -> Option<(bool, Option<(usize, u8)>)> {
        let mut f = lock(&self.faults);
        let whole = f.corrupt_chunks.contains(&chunk);
        let random = match (&mut f.corrupt_rate, whole) {
            (Some((p, rng)), false) => rng
                .gen_bool(*p)
                .then(|| (rng.gen_range(0..len), rng.gen_range(0..8u8))),
            _ => None,
        };
        if !whole && random.is_none() {
            return None;
        }
        f.stats.corrupted_reads += 1;
        Some((whole, random))
    }

    /// Applies the read corruption faults to a scan's result, as if the
    /// whole chunk had been read with them: the blocks whose bits they flip
    /// get the checksum of the flipped data and are listed as bad (a store
    /// keeping checksums would find they fail them).
    fn corrupt_scan(&self, chunk: ChunkRef, mut scan: ChunkScan) -> ChunkScan {
        let block = SECTOR as usize;
        let len = scan.crcs.len() * block;
        if len == 0 {
            return scan;
        }
        let Some((whole, random)) = self.corruption(chunk, len) else {
            return scan;
        };
        // CRCs are affine: crc(a ^ e) = crc(a) ^ crc(e) ^ crc(zeros) for
        // blocks of one length, so a flip needs no data.
        let flip = |byte: usize, bit: u8| {
            let mut e = vec![0u8; block];
            e[byte] ^= 1 << bit;
            torus_traits::storage::crc32c(&e) ^ ZERO_CRC
        };
        if whole {
            // The first byte of each block, as `corrupt` does from offset 0.
            let delta = flip(0, 0);
            for (b, crc) in scan.crcs.iter_mut().enumerate() {
                *crc ^= delta;
                scan.bad.push(b as u32);
            }
        }
        if let Some((i, bit)) = random {
            let b = i / block;
            scan.crcs[b] ^= flip(i % block, bit);
            scan.bad.push(b as u32);
        }
        scan.bad.sort_unstable();
        scan.bad.dedup();
        scan
    }

    /// Applies the read corruption faults to a read's result.
    fn corrupt(&self, chunk: ChunkRef, offset: u64, data: Bytes) -> Bytes {
        if data.is_empty() {
            return data;
        }
        let len = data.len();
        let Some((whole, random)) = self.corruption(chunk, len) else {
            return data;
        };
        let mut buf = data.to_vec();
        if whole {
            // The first byte of the read, then the first byte of each block.
            let mut i = 0usize;
            while i < len {
                buf[i] ^= 0x01;
                let pos = offset + i as u64;
                i += (SECTOR - pos % SECTOR) as usize;
            }
        }
        if let Some((i, bit)) = random {
            buf[i] ^= 1 << bit;
        }
        Bytes::from(buf)
    }

    /// Learns the starting allocation from the inner store, once.
    async fn ensure_init(&self) -> Result<()> {
        self.init
            .get_or_try_init(|| async {
                let mut alloc = HashMap::new();
                let chunk_size = self.inner.chunk_size();
                for chunk in self.inner.list_chunks().await? {
                    let data = self.inner.read(chunk, 0, chunk_size).await?;
                    let blocks: BTreeSet<u64> = data
                        .chunks(SECTOR as usize)
                        .enumerate()
                        .filter(|(_, b)| b.iter().any(|&x| x != 0))
                        .map(|(i, _)| i as u64)
                        .collect();
                    if !blocks.is_empty() {
                        alloc.insert(chunk, blocks);
                    }
                }
                lock(&self.track).alloc = alloc;
                Ok::<(), Error>(())
            })
            .await?;
        Ok(())
    }

    async fn lock_chunk(&self, chunk: ChunkRef) -> ChunkGuard<'_> {
        let mutex = lock(&self.chunk_locks)
            .entry(chunk)
            .or_insert_with(|| Arc::new(AsyncMutex::new(())))
            .clone();
        let guard = mutex.clone().lock_owned().await;
        ChunkGuard {
            core: self,
            chunk,
            mutex,
            guard: Some(guard),
        }
    }

    /// Runs a valid, non-empty change on the inner store, keeping the
    /// allocation map and (in power-loss mode) the undo log.
    async fn change(&self, chunk: ChunkRef, change: Change) -> Result<()> {
        self.ensure_init().await?;
        let _gate = self.gate.read().await;
        let _chunk = self.lock_chunk(chunk).await;
        // The blocks this change may alter, and whether each holds data.
        let (affected, tracking): (Vec<(u64, bool)>, bool) = {
            let t = lock(&self.track);
            let empty = BTreeSet::new();
            let alloc = t.alloc.get(&chunk).unwrap_or(&empty);
            let affected = match &change {
                Change::Write { offset, data } => blocks_touched(*offset, data.len() as u64)
                    .map(|b| (b, alloc.contains(&b)))
                    .collect(),
                Change::Zero { offset, len } => blocks_touched(*offset, *len)
                    .filter(|b| alloc.contains(b))
                    .map(|b| (b, true))
                    .collect(),
                Change::Delete => alloc.iter().map(|&b| (b, true)).collect(),
            };
            (affected, t.drop_unflushed)
        };
        let saved = if tracking {
            self.save(chunk, &affected).await?
        } else {
            Vec::new()
        };
        match &change {
            Change::Write { offset, data } => self.inner.write(chunk, *offset, data.clone()).await,
            Change::Zero { offset, len } => self.inner.zero(chunk, *offset, *len).await,
            Change::Delete => self.inner.delete_chunk(chunk).await,
        }?;
        let mut t = lock(&self.track);
        match &change {
            Change::Write { offset, data } => {
                let blocks = blocks_touched(*offset, data.len() as u64);
                t.alloc.entry(chunk).or_default().extend(blocks);
            }
            Change::Zero { offset, len } => {
                if let Some(alloc) = t.alloc.get_mut(&chunk) {
                    for b in blocks_inside(*offset, *len) {
                        alloc.remove(&b);
                    }
                    if alloc.is_empty() {
                        t.alloc.remove(&chunk);
                    }
                }
            }
            Change::Delete => {
                t.alloc.remove(&chunk);
            }
        }
        let seq = t.next_seq;
        t.next_seq += 1;
        if tracking && t.drop_unflushed && !saved.is_empty() {
            t.logs
                .entry(chunk)
                .or_default()
                .push_back(Undo { seq, blocks: saved });
        }
        Ok(())
    }

    /// Reads the current content of `affected` blocks that hold data.
    async fn save(
        &self,
        chunk: ChunkRef,
        affected: &[(u64, bool)],
    ) -> Result<Vec<(u64, Option<Bytes>)>> {
        let held: Vec<u64> = affected.iter().filter(|a| a.1).map(|a| a.0).collect();
        let (Some(&first), Some(&last)) = (held.first(), held.last()) else {
            return Ok(affected.iter().map(|&(b, _)| (b, None)).collect());
        };
        let span = self
            .inner
            .read(chunk, first * SECTOR, (last + 1 - first) * SECTOR)
            .await?;
        Ok(affected
            .iter()
            .map(|&(b, has)| {
                let at = ((b.saturating_sub(first)) * SECTOR) as usize;
                (b, has.then(|| span.slice(at..at + SECTOR as usize)))
            })
            .collect())
    }

    async fn power_cut(&self) -> Result<()> {
        self.ensure_init().await?;
        let _gate = self.gate.write().await;
        let (logs, mut alloc) = {
            let mut t = lock(&self.track);
            t.generation += 1;
            let logs = std::mem::take(&mut t.logs);
            // The chunks to restore and their allocation now.
            let alloc: BTreeMap<ChunkRef, BTreeSet<u64>> = logs
                .keys()
                .map(|c| (*c, t.alloc.get(c).cloned().unwrap_or_default()))
                .collect();
            (logs, alloc)
        };
        // The durable state of each changed block: its image before the
        // oldest unflushed change to it.
        let mut images: BTreeMap<ChunkRef, BTreeMap<u64, Option<Bytes>>> = BTreeMap::new();
        for (chunk, log) in logs {
            let image = images.entry(chunk).or_default();
            for undo in log {
                for (b, saved) in undo.blocks {
                    image.entry(b).or_insert(saved);
                }
            }
        }
        let mut reverted = 0u64;
        // Free first, then write, so the store never holds more than it
        // does before or after.
        for (chunk, image) in &images {
            let held = alloc.entry(*chunk).or_default();
            let free: Vec<u64> = image
                .iter()
                .filter(|(b, saved)| saved.is_none() && held.contains(b))
                .map(|(b, _)| *b)
                .collect();
            for run in runs(free) {
                let len = (run.end - run.start) * SECTOR;
                self.inner.zero(*chunk, run.start * SECTOR, len).await?;
                for b in run {
                    held.remove(&b);
                    reverted += 1;
                }
            }
        }
        for (chunk, image) in &images {
            let held = alloc.entry(*chunk).or_default();
            let write: Vec<u64> = image
                .iter()
                .filter(|(_, saved)| saved.is_some())
                .map(|(b, _)| *b)
                .collect();
            for run in runs(write) {
                let mut buf = Vec::with_capacity(((run.end - run.start) * SECTOR) as usize);
                for b in run.clone() {
                    if let Some(Some(saved)) = image.get(&b) {
                        buf.extend_from_slice(saved);
                    }
                }
                self.inner
                    .write(*chunk, run.start * SECTOR, Bytes::from(buf))
                    .await?;
                held.extend(run.clone());
                reverted += run.end - run.start;
            }
        }
        {
            let mut t = lock(&self.track);
            for (chunk, held) in alloc {
                if held.is_empty() {
                    t.alloc.remove(&chunk);
                } else {
                    t.alloc.insert(chunk, held);
                }
            }
        }
        let mut f = lock(&self.faults);
        f.stats.power_cuts += 1;
        f.stats.reverted_blocks += reverted;
        Ok(())
    }

    async fn rot(&self, chunk: ChunkRef, offset: u64) -> Result<()> {
        check_range(chunk, offset, 1, self.inner.chunk_size())?;
        self.ensure_init().await?;
        let _gate = self.gate.read().await;
        let _chunk = self.lock_chunk(chunk).await;
        let held = lock(&self.track)
            .alloc
            .get(&chunk)
            .is_some_and(|a| a.contains(&(offset / SECTOR)));
        if !held {
            return Err(Error::InvalidArgument(format!(
                "cannot rot byte {offset} of chunk {chunk}: its block holds no data"
            )));
        }
        let byte = self.inner.read(chunk, offset, 1).await?;
        let flipped = byte.first().copied().unwrap_or(0) ^ 0x01;
        self.inner
            .write(chunk, offset, Bytes::copy_from_slice(&[flipped]))
            .await
    }
}

#[async_trait]
impl BlockStore for FaultyBlockStore {
    fn chunk_size(&self) -> u64 {
        self.core.inner.chunk_size()
    }

    fn capacity(&self) -> u64 {
        self.core.inner.capacity()
    }

    async fn used(&self) -> Result<u64> {
        self.core.before(Op::Used, None).await?;
        self.core.inner.used().await
    }

    async fn read(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<Bytes> {
        self.core.before(Op::Read, Some(chunk)).await?;
        let data = self.core.inner.read(chunk, offset, len).await?;
        Ok(self.core.corrupt(chunk, offset, data))
    }

    async fn write(&self, chunk: ChunkRef, offset: u64, data: Bytes) -> Result<()> {
        self.core.before(Op::Write, Some(chunk)).await?;
        let len = data.len() as u64;
        if len == 0 || check_range(chunk, offset, len, self.chunk_size()).is_err() {
            // Changes nothing: the inner store answers.
            return self.core.inner.write(chunk, offset, data).await;
        }
        self.core
            .change(chunk, Change::Write { offset, data })
            .await
    }

    async fn zero(&self, chunk: ChunkRef, offset: u64, len: u64) -> Result<()> {
        self.core.before(Op::Zero, Some(chunk)).await?;
        if len == 0 || check_range(chunk, offset, len, self.chunk_size()).is_err() {
            return self.core.inner.zero(chunk, offset, len).await;
        }
        self.core.change(chunk, Change::Zero { offset, len }).await
    }

    async fn flush(&self) -> Result<()> {
        // Only changes recorded before this point become durable.
        let (start, generation) = {
            let t = lock(&self.core.track);
            (t.next_seq, t.generation)
        };
        self.core.before(Op::Flush, None).await?;
        self.core.inner.flush().await?;
        let mut t = lock(&self.core.track);
        if t.generation != generation {
            return Err(Error::Unavailable(
                "the power was cut while flushing".into(),
            ));
        }
        for log in t.logs.values_mut() {
            while log.front().is_some_and(|u| u.seq < start) {
                log.pop_front();
            }
        }
        t.logs.retain(|_, log| !log.is_empty());
        Ok(())
    }

    async fn scan_chunk(&self, chunk: ChunkRef) -> Result<ChunkScan> {
        // A scan is a read of the whole chunk, as far as faults go.
        self.core.before(Op::Read, Some(chunk)).await?;
        let scan = self.core.inner.scan_chunk(chunk).await?;
        Ok(self.core.corrupt_scan(chunk, scan))
    }

    async fn delete_chunk(&self, chunk: ChunkRef) -> Result<()> {
        self.core.before(Op::Delete, Some(chunk)).await?;
        self.core.change(chunk, Change::Delete).await
    }

    async fn list_chunks(&self) -> Result<Vec<ChunkRef>> {
        self.core.before(Op::List, None).await?;
        self.core.inner.list_chunks().await
    }

    async fn delete_volume(&self, volume: VolumeId) -> Result<()> {
        for chunk in self.list_chunks().await? {
            if chunk.volume == volume {
                self.delete_chunk(chunk).await?;
            }
        }
        Ok(())
    }
}
