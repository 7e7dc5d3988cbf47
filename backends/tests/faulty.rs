//! `FaultyBlockStore`: transparent with no fault set (the conformance suite,
//! with and without the power-loss log), each fault mode on and off again,
//! power cuts checked against a model over seeded random operations, and
//! writes racing with flushes.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_backends::storage::faulty::{Op, OpSet};
use torus_backends::storage::{FaultControl, FaultyBlockStore, FileBlockStore, MemoryBlockStore};
use torus_traits::conformance::block_store as suite;
use torus_traits::{BlockStore, ChunkRef, ChunkScan, Error, VolumeId, SECTOR};

const CHUNK: u64 = suite::CHUNK_SIZE;
const CAPACITY: u64 = suite::CAPACITY;

fn c(volume: u64, index: u64) -> ChunkRef {
    ChunkRef::new(VolumeId(volume), index)
}

fn faulty(capacity: u64) -> (Arc<FaultyBlockStore>, FaultControl) {
    let store = Arc::new(FaultyBlockStore::new(Arc::new(MemoryBlockStore::new(
        CHUNK, capacity,
    ))));
    let control = store.control();
    (store, control)
}

fn bytes(fill: u8, len: usize) -> Bytes {
    Bytes::from(vec![fill; len])
}

#[tokio::test]
async fn conformance_with_no_fault() {
    let (store, _) = faulty(CAPACITY);
    suite::all(store.as_ref()).await;
}

#[tokio::test]
async fn conformance_with_power_loss_log() {
    let (store, control) = faulty(CAPACITY);
    control.set_drop_unflushed(true);
    suite::all(store.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_power_loss_log_multi_thread() {
    let (store, control) = faulty(CAPACITY);
    control.set_drop_unflushed(true);
    suite::all(store.as_ref()).await;
}

#[tokio::test]
async fn fail_all_then_clear() {
    let (s, control) = faulty(CAPACITY);
    let a = c(1, 0);
    s.write(a, 0, bytes(7, 100)).await.unwrap();
    control.fail(OpSet::ALL, Error::Unavailable("disk gone".into()));
    assert!(matches!(s.read(a, 0, 1).await, Err(Error::Unavailable(_))));
    assert!(matches!(
        s.write(a, 0, bytes(1, 1)).await,
        Err(Error::Unavailable(_))
    ));
    assert!(s.zero(a, 0, 10).await.is_err());
    assert!(s.flush().await.is_err());
    assert!(s.delete_chunk(a).await.is_err());
    assert!(s.delete_volume(VolumeId(1)).await.is_err());
    assert!(s.list_chunks().await.is_err());
    assert!(s.used().await.is_err());
    assert_eq!(s.chunk_size(), CHUNK);
    assert_eq!(control.stats().failed, 8);
    control.clear_fail();
    // Nothing changed underneath.
    assert_eq!(s.read(a, 0, 100).await.unwrap(), bytes(7, 100));
    assert_eq!(s.list_chunks().await.unwrap(), vec![a]);
    s.write(a, 0, bytes(1, 1)).await.unwrap();
    s.flush().await.unwrap();
}

#[tokio::test]
async fn fail_only_reads_writes_or_flush() {
    let (s, control) = faulty(CAPACITY);
    let a = c(1, 0);
    s.write(a, 0, bytes(7, 100)).await.unwrap();

    control.fail(
        OpSet::READS,
        Error::io("read", std::io::Error::other("EIO")),
    );
    assert!(matches!(s.read(a, 0, 1).await, Err(Error::Io { .. })));
    s.write(a, 100, bytes(8, 100)).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(s.list_chunks().await.unwrap(), vec![a]);

    control.fail(OpSet::WRITES, Error::ReadOnly("worn out".into()));
    assert!(matches!(
        s.write(a, 0, bytes(1, 10)).await,
        Err(Error::ReadOnly(_))
    ));
    assert!(matches!(s.zero(a, 0, 10).await, Err(Error::ReadOnly(_))));
    assert!(matches!(s.delete_chunk(a).await, Err(Error::ReadOnly(_))));
    s.flush().await.unwrap();
    let mut expected = vec![7u8; 100];
    expected.extend(vec![8u8; 100]);
    assert_eq!(s.read(a, 0, 200).await.unwrap(), Bytes::from(expected));

    control.fail(OpSet::FLUSH, Error::Timeout("fsync".into()));
    assert!(matches!(s.flush().await, Err(Error::Timeout(_))));
    s.write(a, 0, bytes(2, 1)).await.unwrap();
    assert_eq!(s.read(a, 0, 1).await.unwrap(), bytes(2, 1));

    control.fail(
        OpSet::only(Op::Zero).union(Op::Used.into()),
        Error::Other("x".into()),
    );
    assert!(s.zero(a, 0, 1).await.is_err());
    assert!(s.used().await.is_err());
    s.write(a, 0, bytes(3, 1)).await.unwrap();

    control.clear_fail();
    s.zero(a, 0, 1).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(s.used().await.unwrap(), SECTOR);
}

#[tokio::test]
async fn fail_next_counts_down() {
    let (s, control) = faulty(CAPACITY);
    let a = c(1, 0);
    control.fail_next(OpSet::WRITES, Error::Unavailable("blip".into()), 2);
    // Reads do not use up the count.
    s.read(a, 0, 1).await.unwrap();
    assert!(s.write(a, 0, bytes(1, 1)).await.is_err());
    assert!(s.zero(a, 0, 1).await.is_err());
    s.write(a, 0, bytes(1, 1)).await.unwrap();
    s.write(a, 1, bytes(1, 1)).await.unwrap();
    assert_eq!(control.stats().failed, 2);
    control.fail_next(OpSet::ALL, Error::Unavailable("none".into()), 0);
    s.flush().await.unwrap();
}

#[tokio::test]
async fn fail_one_chunk() {
    let (s, control) = faulty(CAPACITY);
    let (a, b) = (c(1, 0), c(1, 1));
    s.write(a, 0, bytes(1, 10)).await.unwrap();
    control.fail_chunk(a, Error::Corrupt("bad sector".into()));
    assert!(matches!(s.read(a, 0, 10).await, Err(Error::Corrupt(_))));
    assert!(s.write(a, 0, bytes(1, 10)).await.is_err());
    assert!(s.delete_chunk(a).await.is_err());
    s.write(b, 0, bytes(2, 10)).await.unwrap();
    assert_eq!(s.read(b, 0, 10).await.unwrap(), bytes(2, 10));
    s.flush().await.unwrap();
    assert_eq!(s.list_chunks().await.unwrap(), vec![a, b]);
    control.clear_fail();
    assert_eq!(s.read(a, 0, 10).await.unwrap(), bytes(1, 10));
}

#[tokio::test]
async fn delay_slows_the_chosen_ops() {
    let (s, control) = faulty(CAPACITY);
    let a = c(1, 0);
    control.delay(OpSet::WRITES, Duration::from_millis(400));
    let t = Instant::now();
    s.read(a, 0, 10).await.unwrap();
    s.flush().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "reads not delayed"
    );
    let t = Instant::now();
    s.write(a, 0, bytes(1, 10)).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(400), "write delayed");
    // Delayed ops run concurrently, each delayed once.
    let t = Instant::now();
    let writes = (0..8u64).map(|i| s.write(c(1, i), 0, bytes(1, 10)));
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_millis(2000));
    assert_eq!(control.stats().delayed, 9);
    control.clear_delay();
    let t = Instant::now();
    s.write(a, 0, bytes(1, 10)).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn delay_then_fail() {
    let (s, control) = faulty(CAPACITY);
    control.delay(OpSet::ALL, Duration::from_millis(300));
    control.fail(OpSet::FLUSH, Error::Timeout("slow disk".into()));
    let t = Instant::now();
    assert!(matches!(s.flush().await, Err(Error::Timeout(_))));
    assert!(t.elapsed() >= Duration::from_millis(300));
    control.heal();
    let t = Instant::now();
    s.flush().await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(250));
}

fn differing_bits(a: &[u8], b: &[u8]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

#[tokio::test]
async fn corrupt_chunk_flips_a_bit_in_every_block_read() {
    let (s, control) = faulty(CAPACITY);
    let (a, b) = (c(1, 0), c(1, 1));
    let data: Vec<u8> = (0..5 * SECTOR).map(|i| (i % 251) as u8).collect();
    s.write(a, 0, Bytes::from(data.clone())).await.unwrap();
    s.write(b, 0, Bytes::from(data.clone())).await.unwrap();
    control.corrupt_chunk(a);
    // A read across blocks: one flipped bit in each block it touches.
    let got = s.read(a, 1000, 3 * SECTOR).await.unwrap();
    let want = &data[1000..1000 + 3 * SECTOR as usize];
    assert_eq!(differing_bits(&got, want), 4);
    for (start, end) in [
        (1000u64, SECTOR),
        (SECTOR, 2 * SECTOR),
        (2 * SECTOR, 3 * SECTOR),
        (3 * SECTOR, 1000 + 3 * SECTOR),
    ] {
        let r = (start - 1000) as usize..(end - 1000) as usize;
        assert_eq!(differing_bits(&got[r.clone()], &want[r]), 1);
    }
    // Unwritten parts of the chunk are corrupted too; other chunks are not.
    let z = s.read(a, 100 * SECTOR, 10).await.unwrap();
    assert_eq!(differing_bits(&z, &[0; 10]), 1);
    assert_eq!(s.read(b, 0, 5 * SECTOR).await.unwrap(), data);
    assert!(s.read(a, 0, 0).await.unwrap().is_empty());
    assert_eq!(control.stats().corrupted_reads, 2);
    // The stored data is intact.
    assert_eq!(s.inner().read(a, 0, 5 * SECTOR).await.unwrap(), data);
    control.clear_corruption();
    assert_eq!(s.read(a, 0, 5 * SECTOR).await.unwrap(), data);
}

#[tokio::test]
async fn corrupt_reads_at_a_rate_is_seeded() {
    async fn run(seed: u64, p: f64) -> (Vec<Bytes>, u64) {
        let (s, control) = faulty(CAPACITY);
        let a = c(1, 0);
        s.write(a, 0, bytes(0x55, 2 * SECTOR as usize))
            .await
            .unwrap();
        control.corrupt_reads(p, seed);
        let mut out = Vec::new();
        for i in 0..200u64 {
            let got = s.read(a, i, 100 + i).await.unwrap();
            let bits = differing_bits(&got, &vec![0x55; got.len()]);
            assert!(bits <= 1, "at most one bit flipped per read");
            out.push(got);
        }
        (out, control.stats().corrupted_reads)
    }
    let (first, n) = run(7, 0.25).await;
    assert!((20..=80).contains(&n), "about a quarter corrupted, got {n}");
    let (again, m) = run(7, 0.25).await;
    assert_eq!(n, m);
    assert_eq!(first, again, "same seed, same corruption");
    let (_, n) = run(7, 1.0).await;
    assert_eq!(n, 200);
    let (_, n) = run(7, 0.0).await;
    assert_eq!(n, 0);
    let (_, n) = run(7, f64::NAN).await;
    assert_eq!(n, 0);
}

#[tokio::test]
async fn rot_damages_stored_data_until_rewritten() {
    let (s, control) = faulty(CAPACITY);
    let a = c(1, 0);
    s.write(a, 0, bytes(0x10, 100)).await.unwrap();
    control.rot(a, 42).await.unwrap();
    for _ in 0..2 {
        let got = s.read(a, 0, 100).await.unwrap();
        assert_eq!(got[42], 0x11);
        assert_eq!(differing_bits(&got, &[0x10; 100]), 1);
    }
    assert!(matches!(
        control.rot(a, 5 * SECTOR).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        control.rot(a, CHUNK).await,
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(s.used().await.unwrap(), SECTOR);
    s.write(a, 0, bytes(0x10, 100)).await.unwrap();
    assert_eq!(s.read(a, 0, 100).await.unwrap(), bytes(0x10, 100));
}

/// `scan_chunk` is forwarded to the inner store and treated as a read of
/// the whole chunk: read failure rules apply, and read corruption makes the
/// blocks it hits scan as the corrupted data and be listed as bad.
#[tokio::test]
async fn scan_chunk_follows_the_read_faults() {
    let (s, control) = faulty(CAPACITY);
    let a = c(1, 0);
    s.write(a, 0, bytes(0x10, 3 * SECTOR as usize))
        .await
        .unwrap();
    let clean = s.scan_chunk(a).await.unwrap();
    assert_eq!(clean, ChunkScan::of(&s.read(a, 0, CHUNK).await.unwrap()));

    control.fail(OpSet::READS, Error::Unavailable("dead disk".into()));
    assert!(matches!(s.scan_chunk(a).await, Err(Error::Unavailable(_))));
    control.clear_fail();
    control.fail_chunk(a, Error::Unavailable("bad spot".into()));
    assert!(matches!(s.scan_chunk(a).await, Err(Error::Unavailable(_))));
    assert!(s.scan_chunk(c(1, 1)).await.is_ok());
    control.clear_fail();

    control.corrupt_chunk(a);
    let scan = s.scan_chunk(a).await.unwrap();
    let read = s.read(a, 0, CHUNK).await.unwrap();
    assert_eq!(
        scan.crcs,
        ChunkScan::of(&read).crcs,
        "as the corrupted read"
    );
    let every: Vec<u32> = (0..(CHUNK / SECTOR) as u32).collect();
    assert_eq!(scan.bad, every);
    control.clear_corruption();

    control.corrupt_reads(1.0, 3);
    let scan = s.scan_chunk(a).await.unwrap();
    assert_eq!(scan.bad.len(), 1);
    let hit = scan.bad[0] as usize;
    for (b, (got, was)) in scan.crcs.iter().zip(&clean.crcs).enumerate() {
        assert_eq!(got != was, b == hit, "block {b}");
    }
    control.clear_corruption();
    assert_eq!(s.scan_chunk(a).await.unwrap(), clean);
}

/// Over a store that keeps checksums, the bad blocks it finds come through.
#[tokio::test]
async fn scan_chunk_reports_what_the_inner_store_finds() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let inner = FileBlockStore::open(dir.path(), CHUNK, CAPACITY).unwrap();
    let s = FaultyBlockStore::new(Arc::new(inner));
    let a = c(3, 1);
    s.write(a, 0, bytes(0x20, 4 * SECTOR as usize))
        .await
        .unwrap();
    s.flush().await.unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("3").join("1"))
        .unwrap();
    file.write_all_at(&[0x21], 2 * SECTOR + 9).unwrap();
    let scan = s.scan_chunk(a).await.unwrap();
    assert_eq!(scan.bad, vec![2]);
    assert!(matches!(
        s.read(a, 2 * SECTOR, 10).await,
        Err(Error::Corrupt(_))
    ));
}

// ---------------------------------------------------------------------------
// Power loss against a model.

/// Every change of the power-loss runs falls in the first `REGION` bytes of
/// its chunk (the rest stays unwritten), which keeps the model small.
const REGION: u64 = 32 * SECTOR;

/// The model of a store: content of each chunk's first `REGION` bytes and
/// allocated blocks per chunk.
#[derive(Clone, Default, Debug)]
struct Model {
    chunks: BTreeMap<ChunkRef, (Vec<u8>, BTreeSet<u64>)>,
}

impl Model {
    fn used_blocks(&self) -> u64 {
        self.chunks.values().map(|(_, a)| a.len() as u64).sum()
    }

    fn entry(&mut self, chunk: ChunkRef) -> &mut (Vec<u8>, BTreeSet<u64>) {
        self.chunks
            .entry(chunk)
            .or_insert_with(|| (vec![0; REGION as usize], BTreeSet::new()))
    }

    /// Applies a write; false when it needs more space than `capacity`.
    fn write(&mut self, chunk: ChunkRef, offset: u64, data: &[u8], capacity: u64) -> bool {
        let len = data.len() as u64;
        let blocks = offset / SECTOR..(offset + len).div_ceil(SECTOR);
        let used = self.used_blocks();
        let e = self.entry(chunk);
        let new = blocks.clone().filter(|b| !e.1.contains(b)).count() as u64;
        if (used + new) * SECTOR > capacity {
            return false;
        }
        e.0[offset as usize..(offset + len) as usize].copy_from_slice(data);
        e.1.extend(blocks);
        true
    }

    fn zero(&mut self, chunk: ChunkRef, offset: u64, len: u64) {
        let e = self.entry(chunk);
        e.0[offset as usize..(offset + len) as usize].fill(0);
        let first = offset.div_ceil(SECTOR);
        let end = (offset + len) / SECTOR;
        for b in first..end.max(first) {
            e.1.remove(&b);
        }
    }

    fn delete(&mut self, chunk: ChunkRef) {
        self.chunks.remove(&chunk);
    }

    fn listed(&self) -> Vec<ChunkRef> {
        self.chunks
            .iter()
            .filter(|(_, (_, a))| !a.is_empty())
            .map(|(c, _)| *c)
            .collect()
    }
}

async fn expect_model(s: &dyn BlockStore, model: &Model, all: &[ChunkRef], when: &str) {
    assert_eq!(
        s.used().await.unwrap(),
        model.used_blocks() * SECTOR,
        "used() {when}"
    );
    assert_eq!(
        s.list_chunks().await.unwrap(),
        model.listed(),
        "list {when}"
    );
    let zeros = vec![0u8; REGION as usize];
    for &chunk in all {
        let got = s.read(chunk, 0, REGION).await.unwrap();
        let want = model.chunks.get(&chunk).map_or(&zeros, |e| &e.0);
        if got[..] == want[..] {
            continue;
        }
        if let Some(i) = got.iter().zip(want.iter()).position(|(a, b)| a != b) {
            panic!(
                "{when}: chunk {chunk} byte {i}: got {:#04x}, want {:#04x}",
                got[i], want[i]
            );
        }
    }
}

/// Returns how many writes were refused for lack of space.
async fn power_loss_run(seed: u64) -> u64 {
    // A small pool, so some writes are refused for lack of space.
    const CAP: u64 = 64 * SECTOR;
    let (s, control) = faulty(CAP);
    control.set_drop_unflushed(true);
    let chunks = [c(1, 0), c(1, 1), c(2, 0), c(2, 5)];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut current = Model::default();
    let mut durable = Model::default();
    let (mut cuts, mut flushes, mut refused) = (0, 0, 0);
    for step in 0..200 {
        let chunk = chunks[rng.gen_range(0..chunks.len())];
        let at = format!("seed {seed} step {step}");
        match rng.gen_range(0..100) {
            0..=44 => {
                let offset = rng.gen_range(0..24 * SECTOR);
                let len = rng.gen_range(1..6 * SECTOR);
                // Sometimes zeros, which still allocate.
                let fill = if rng.gen_bool(0.15) {
                    0
                } else {
                    rng.gen_range(1..=255u8)
                };
                let data = vec![fill; len as usize];
                let r = s.write(chunk, offset, Bytes::from(data.clone())).await;
                if current.write(chunk, offset, &data, CAP) {
                    r.unwrap_or_else(|e| panic!("{at}: write: {e}"));
                } else {
                    refused += 1;
                    assert!(matches!(r, Err(Error::NoSpace(_))), "{at}: {r:?}");
                }
            }
            45..=59 => {
                let offset = rng.gen_range(0..24 * SECTOR);
                let len = if rng.gen_bool(0.5) {
                    rng.gen_range(1..3 * SECTOR)
                } else {
                    rng.gen_range(1..12) * SECTOR
                }
                .min(REGION - offset);
                s.zero(chunk, offset, len).await.unwrap();
                current.zero(chunk, offset, len);
            }
            60..=66 => {
                s.delete_chunk(chunk).await.unwrap();
                current.delete(chunk);
            }
            67..=69 => {
                // A failed change changes nothing.
                control.fail_next(OpSet::WRITES, Error::Unavailable("blip".into()), 1);
                assert!(s.write(chunk, 0, bytes(9, 10)).await.is_err());
            }
            70..=84 => {
                if rng.gen_bool(0.2) {
                    // A failed flush makes nothing durable.
                    control.fail_next(OpSet::FLUSH, Error::Timeout("fsync".into()), 1);
                    assert!(s.flush().await.is_err());
                } else {
                    s.flush().await.unwrap();
                    durable = current.clone();
                    flushes += 1;
                }
            }
            85..=89 => {
                control.power_cut().await.unwrap();
                current = durable.clone();
                cuts += 1;
                expect_model(s.as_ref(), &current, &chunks, &format!("{at} after cut")).await;
            }
            _ => {
                expect_model(s.as_ref(), &current, &chunks, &at).await;
            }
        }
    }
    control.power_cut().await.unwrap();
    expect_model(
        s.as_ref(),
        &durable,
        &chunks,
        &format!("seed {seed} at the end"),
    )
    .await;
    assert_eq!(control.unflushed_blocks(), 0);
    assert!(
        control.stats().reverted_blocks > 0,
        "seed {seed}: nothing reverted"
    );
    assert!(
        cuts > 3 && flushes > 5,
        "seed {seed}: {cuts} cuts, {flushes} flushes"
    );
    refused
}

#[tokio::test]
async fn power_cut_restores_the_flushed_state() {
    let mut refused = 0;
    for seed in 1..=8 {
        refused += power_loss_run(seed).await;
    }
    assert!(refused > 0, "no write was refused for lack of space");
}

#[tokio::test]
async fn power_cut_simple_cases() {
    let (s, control) = faulty(CAPACITY);
    let (a, b) = (c(1, 0), c(1, 1));
    // Mode off: a cut loses nothing.
    s.write(a, 0, bytes(1, 10)).await.unwrap();
    control.power_cut().await.unwrap();
    assert_eq!(s.read(a, 0, 10).await.unwrap(), bytes(1, 10));
    // Turning the mode on counts as a flush.
    control.set_drop_unflushed(true);
    assert!(control.drop_unflushed());
    s.write(a, 0, bytes(2, 10)).await.unwrap();
    s.write(b, 0, bytes(2, 10)).await.unwrap();
    assert!(control.unflushed_blocks() > 0);
    control.power_cut().await.unwrap();
    assert_eq!(s.read(a, 0, 10).await.unwrap(), bytes(1, 10));
    assert_eq!(s.list_chunks().await.unwrap(), vec![a]);
    assert_eq!(s.used().await.unwrap(), SECTOR);
    // A flushed delete stays deleted; an unflushed one comes back.
    s.delete_chunk(a).await.unwrap();
    control.power_cut().await.unwrap();
    assert_eq!(s.read(a, 0, 10).await.unwrap(), bytes(1, 10));
    s.delete_chunk(a).await.unwrap();
    s.flush().await.unwrap();
    s.write(a, 0, bytes(3, 10)).await.unwrap();
    control.power_cut().await.unwrap();
    assert!(s.list_chunks().await.unwrap().is_empty());
    assert_eq!(s.used().await.unwrap(), 0);
    assert_eq!(control.stats().power_cuts, 4);
    // Turning it off forgets the log.
    s.write(a, 0, bytes(4, 10)).await.unwrap();
    control.set_drop_unflushed(false);
    control.power_cut().await.unwrap();
    assert_eq!(s.read(a, 0, 10).await.unwrap(), bytes(4, 10));
}

#[tokio::test]
async fn power_cut_during_flush_fails_the_flush() {
    let (s, control) = faulty(CAPACITY);
    control.set_drop_unflushed(true);
    let a = c(1, 0);
    s.write(a, 0, bytes(1, 10)).await.unwrap();
    control.delay(OpSet::FLUSH, Duration::from_millis(200));
    let flushing = {
        let s = s.clone();
        tokio::spawn(async move { s.flush().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    control.power_cut().await.unwrap();
    assert!(matches!(
        flushing.await.unwrap(),
        Err(Error::Unavailable(_))
    ));
    assert!(s.list_chunks().await.unwrap().is_empty());
    // The store works after the cut, as after a reboot.
    control.clear_delay();
    s.write(a, 0, bytes(2, 10)).await.unwrap();
    s.flush().await.unwrap();
    control.power_cut().await.unwrap();
    assert_eq!(s.read(a, 0, 10).await.unwrap(), bytes(2, 10));
}

/// Writers rewrite their own block with rising versions while the test
/// flushes once and then cuts the power. A write that completed before flush
/// was called must survive; a write that started after flush returned must
/// be lost; the rest may go either way, but each block ends at one whole
/// version between those bounds.
async fn writes_racing_flush(flush_delay: Duration) {
    const WRITERS: u64 = 16;
    let (s, control) = faulty(CAPACITY);
    control.set_drop_unflushed(true);
    control.delay(OpSet::FLUSH, flush_delay);
    let chunk = c(1, 0);
    let called = Arc::new(AtomicBool::new(false));
    let returned = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (s, called, returned, stop) =
                (s.clone(), called.clone(), returned.clone(), stop.clone());
            tokio::spawn(async move {
                // (last version known durable, first version known lost)
                let mut durable = 0u64;
                let mut lost = u64::MAX;
                let mut version = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    version += 1;
                    let started_after = returned.load(Ordering::SeqCst);
                    let data = Bytes::from(version.to_le_bytes().repeat(SECTOR as usize / 8));
                    s.write(chunk, w * SECTOR, data).await.unwrap();
                    if started_after {
                        lost = lost.min(version);
                    } else if !called.load(Ordering::SeqCst) {
                        durable = version;
                    }
                    tokio::task::yield_now().await;
                }
                (w, durable, lost)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    called.store(true, Ordering::SeqCst);
    s.flush().await.unwrap();
    returned.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(30)).await;
    stop.store(true, Ordering::SeqCst);
    let mut bounds = Vec::new();
    for w in writers {
        bounds.push(w.await.unwrap());
    }
    control.power_cut().await.unwrap();
    let checked = AtomicU64::new(0);
    for (w, durable, lost) in bounds {
        let got = s.read(chunk, w * SECTOR, SECTOR).await.unwrap();
        let v = u64::from_le_bytes(got[..8].try_into().unwrap());
        assert_eq!(
            got,
            Bytes::from(v.to_le_bytes().repeat(SECTOR as usize / 8)),
            "block {w} holds one whole version"
        );
        assert!(
            durable <= v && v < lost,
            "block {w}: version {v} after the cut, durable up to {durable}, lost from {lost}"
        );
        if durable > 0 && lost != u64::MAX {
            checked.fetch_add(1, Ordering::SeqCst);
        }
    }
    assert!(
        checked.load(Ordering::SeqCst) > 0,
        "no writer saw both sides of the flush"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_during_flush() {
    writes_racing_flush(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_during_slow_flush() {
    writes_racing_flush(Duration::from_millis(20)).await;
}

/// A write that starts and completes while a (slow) flush runs is not made
/// durable by it.
#[tokio::test]
async fn write_completed_during_flush_is_not_durable() {
    let (s, control) = faulty(CAPACITY);
    control.set_drop_unflushed(true);
    let (a, b) = (c(1, 0), c(1, 1));
    s.write(a, 0, bytes(1, 10)).await.unwrap();
    control.delay(OpSet::FLUSH, Duration::from_millis(300));
    let flushing = {
        let s = s.clone();
        tokio::spawn(async move { s.flush().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write(a, 0, bytes(2, 10)).await.unwrap();
    s.write(b, 0, bytes(2, 10)).await.unwrap();
    flushing.await.unwrap().unwrap();
    control.power_cut().await.unwrap();
    assert_eq!(s.read(a, 0, 10).await.unwrap(), bytes(1, 10));
    assert_eq!(s.list_chunks().await.unwrap(), vec![a]);
    assert_eq!(s.used().await.unwrap(), SECTOR);
}
