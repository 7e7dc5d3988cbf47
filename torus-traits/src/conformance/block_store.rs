//! Conformance suite for [`BlockStore`]: the semantics in the
//! [`storage`](crate::storage) module docs, checked one function each.
//!
//! # What a store under test must be
//!
//! Every function takes a store that is **empty** (no chunks, `used() == 0`)
//! with a **chunk size of 1 MiB** and a **capacity of 8 MiB** (2048 blocks of
//! 4 KiB); each checks that first. Every function deletes the chunks it made
//! before returning, so they can run one after another on the same store, as
//! [`all`] does. Each uses its own volume ids (1001 upwards), so a failure
//! names the function that broke.
//!
//! # Semantics pinned down here
//!
//! Beyond the plain reading of the trait docs, the suite fixes these:
//!
//! - `list_chunks` lists a chunk while it has at least one block holding data:
//!   a chunk is absent until its first (non-empty) write, and again once
//!   every block has been zeroed or it was deleted. Reading or zeroing a
//!   chunk never creates it.
//! - A range is valid when `offset + len <= chunk_size` (computed without
//!   overflow), so zero-length ranges at `chunk_size` are fine and an
//!   offset near `u64::MAX` is `InvalidArgument`, not a panic.
//! - Writing at full capacity into blocks that already hold data succeeds:
//!   only newly allocated blocks count against the capacity.
//! - `scan_chunk` of a healthy store reports, for every 4 KiB block, the
//!   crc32c of what a read of it returns (zero blocks for an absent chunk)
//!   and nothing bad; scanning does not create a chunk.
//!
//! The functions panic, like assertions, with `block_store::<function>:` and
//! what differed.

use crate::{BlockStore, ChunkRef, ChunkScan, Error, VolumeId, SECTOR};
use bytes::Bytes;
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const MIB: u64 = 1 << 20;
/// Chunk size the store under test must have.
pub const CHUNK_SIZE: u64 = MIB;
/// Capacity the store under test must have.
pub const CAPACITY: u64 = 8 * MIB;
const BLOCK: u64 = SECTOR;

/// Runs every function of the suite in turn on one store.
pub async fn all(store: &dyn BlockStore) {
    read_write_roundtrip(store).await;
    unwritten_ranges_read_zeros(store).await;
    list_chunks_only_written(store).await;
    out_of_range_is_invalid_argument(store).await;
    space_accounting(store).await;
    capacity_enforced(store).await;
    concurrent_writes(store).await;
    concurrent_allocation_respects_capacity(store).await;
    flush_succeeds(store).await;
    delete_absent_chunk_is_ok(store).await;
    delete_volume_removes_only_that_volume(store).await;
    random_ops_match_model(store).await;
    scan_chunk_absent_reads_as_zeros(store).await;
    scan_chunk_matches_data(store).await;
}

// ---------------------------------------------------------------------------
// Helpers: each panics with the function's name and the operation on error.

fn c(volume: u64, index: u64) -> ChunkRef {
    ChunkRef::new(VolumeId(volume), index)
}

/// Deterministic non-zero bytes, different for each `seed`.
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i.wrapping_mul(31).wrapping_add(seed.wrapping_mul(97))) % 251 + 1) as u8)
        .collect()
}

fn assert_bytes(test: &str, what: &str, got: &[u8], expected: &[u8]) {
    assert_eq!(
        got.len(),
        expected.len(),
        "block_store::{test}: {what}: returned {} bytes, expected {}",
        got.len(),
        expected.len()
    );
    if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "block_store::{test}: {what}: first difference at byte {i}: got {:#04x}, expected {:#04x}",
            got[i], expected[i]
        );
    }
}

async fn expect_fresh(store: &dyn BlockStore, test: &str) {
    assert_eq!(
        store.chunk_size(),
        CHUNK_SIZE,
        "block_store::{test}: the suite needs a store with 1 MiB chunks"
    );
    assert_eq!(
        store.capacity(),
        CAPACITY,
        "block_store::{test}: the suite needs a store with a capacity of 8 MiB"
    );
    let listed = list(store, test).await;
    assert!(
        listed.is_empty(),
        "block_store::{test}: the suite needs an empty store, but it lists {listed:?} \
         (did an earlier function fail to clean up?)"
    );
    expect_used(store, test, "on an empty store", 0).await;
}

async fn read(store: &dyn BlockStore, test: &str, chunk: ChunkRef, offset: u64, len: u64) -> Bytes {
    let data = store
        .read(chunk, offset, len)
        .await
        .unwrap_or_else(|e| panic!("block_store::{test}: read {chunk} at {offset}+{len}: {e}"));
    assert_eq!(
        data.len() as u64,
        len,
        "block_store::{test}: read {chunk} at {offset}+{len} returned {} bytes",
        data.len()
    );
    data
}

async fn expect_read(
    store: &dyn BlockStore,
    test: &str,
    chunk: ChunkRef,
    offset: u64,
    expected: &[u8],
) {
    let got = read(store, test, chunk, offset, expected.len() as u64).await;
    assert_bytes(
        test,
        &format!("read {chunk} at {offset}+{}", expected.len()),
        &got,
        expected,
    );
}

async fn expect_zeros(store: &dyn BlockStore, test: &str, chunk: ChunkRef, offset: u64, len: u64) {
    let got = read(store, test, chunk, offset, len).await;
    if let Some(i) = got.iter().position(|&b| b != 0) {
        panic!(
            "block_store::{test}: read {chunk} at {offset}+{len}: expected zeros, \
             byte {i} (offset {}) is {:#04x}",
            offset + i as u64,
            got[i]
        );
    }
}

async fn write(store: &dyn BlockStore, test: &str, chunk: ChunkRef, offset: u64, data: &[u8]) {
    let len = data.len();
    store
        .write(chunk, offset, Bytes::copy_from_slice(data))
        .await
        .unwrap_or_else(|e| panic!("block_store::{test}: write {chunk} at {offset}+{len}: {e}"));
}

async fn zero(store: &dyn BlockStore, test: &str, chunk: ChunkRef, offset: u64, len: u64) {
    store
        .zero(chunk, offset, len)
        .await
        .unwrap_or_else(|e| panic!("block_store::{test}: zero {chunk} at {offset}+{len}: {e}"));
}

async fn delete(store: &dyn BlockStore, test: &str, chunk: ChunkRef) {
    store
        .delete_chunk(chunk)
        .await
        .unwrap_or_else(|e| panic!("block_store::{test}: delete_chunk {chunk}: {e}"));
}

async fn flush(store: &dyn BlockStore, test: &str) {
    store
        .flush()
        .await
        .unwrap_or_else(|e| panic!("block_store::{test}: flush: {e}"));
}

async fn list(store: &dyn BlockStore, test: &str) -> Vec<ChunkRef> {
    store
        .list_chunks()
        .await
        .unwrap_or_else(|e| panic!("block_store::{test}: list_chunks: {e}"))
}

async fn expect_list(store: &dyn BlockStore, test: &str, when: &str, expected: &[ChunkRef]) {
    let got = list(store, test).await;
    assert_eq!(
        got, expected,
        "block_store::{test}: list_chunks {when}: got {got:?}, expected {expected:?} (in order)"
    );
}

async fn used(store: &dyn BlockStore, test: &str) -> u64 {
    store
        .used()
        .await
        .unwrap_or_else(|e| panic!("block_store::{test}: used: {e}"))
}

async fn expect_used(store: &dyn BlockStore, test: &str, when: &str, expected: u64) {
    let got = used(store, test).await;
    assert_eq!(
        got,
        expected,
        "block_store::{test}: used() {when}: got {got} ({} blocks), expected {expected} ({} blocks)",
        got / BLOCK,
        expected / BLOCK
    );
}

async fn scan(store: &dyn BlockStore, test: &str, chunk: ChunkRef) -> ChunkScan {
    let scan = store
        .scan_chunk(chunk)
        .await
        .unwrap_or_else(|e| panic!("block_store::{test}: scan_chunk {chunk}: {e}"));
    assert_eq!(
        scan.crcs.len() as u64,
        CHUNK_SIZE / BLOCK,
        "block_store::{test}: scan_chunk {chunk}: {} checksums, expected one per 4 KiB block",
        scan.crcs.len()
    );
    scan
}

/// `scan_chunk` agrees with a read of the whole chunk and finds nothing bad.
async fn expect_scan_matches(store: &dyn BlockStore, test: &str, chunk: ChunkRef, when: &str) {
    let data = read(store, test, chunk, 0, CHUNK_SIZE).await;
    let expected = ChunkScan::of(&data);
    let got = scan(store, test, chunk).await;
    if let Some(b) = (0..expected.crcs.len()).find(|&b| got.crcs[b] != expected.crcs[b]) {
        panic!(
            "block_store::{test}: scan_chunk {chunk} {when}: block {b} scans as {:#010x}, \
             its data read back checks {:#010x}",
            got.crcs[b], expected.crcs[b]
        );
    }
    assert!(
        got.bad.is_empty(),
        "block_store::{test}: scan_chunk {chunk} {when}: blocks {:?} reported bad",
        got.bad
    );
}

fn expect_invalid<T: std::fmt::Debug>(test: &str, what: &str, r: crate::Result<T>) {
    match r {
        Err(Error::InvalidArgument(_)) => {}
        other => panic!("block_store::{test}: {what}: expected InvalidArgument, got {other:?}"),
    }
}

fn expect_no_space<T: std::fmt::Debug>(test: &str, what: &str, r: crate::Result<T>) {
    match r {
        Err(Error::NoSpace(_)) => {}
        other => panic!("block_store::{test}: {what}: expected NoSpace, got {other:?}"),
    }
}

async fn cleanup(store: &dyn BlockStore, test: &str, chunks: &[ChunkRef]) {
    for &chunk in chunks {
        delete(store, test, chunk).await;
    }
    expect_list(store, test, "after deleting every chunk", &[]).await;
    expect_used(store, test, "after deleting every chunk", 0).await;
}

// ---------------------------------------------------------------------------
// The suite.

/// Writes at unaligned offsets and odd lengths (inside a block, across 4 KiB
/// boundaries, overlapping earlier writes, at the end of the chunk) read back
/// exactly, in the written ranges and in windows across them.
pub async fn read_write_roundtrip(store: &dyn BlockStore) {
    const T: &str = "read_write_roundtrip";
    expect_fresh(store, T).await;
    let a = c(1001, 0);
    let b = c(1001, 3);
    let mut model = vec![0u8; CHUNK_SIZE as usize];
    let writes: &[(u64, u64)] = &[
        (0, 1),
        (1, 3),
        (4095, 2),
        (4097, 12345),
        (4000, 300),
        (65536, 4096),
        (8191, 8194),
        (300_001, 70_001),
        (CHUNK_SIZE - 5000, 5000),
        (CHUNK_SIZE - 1, 1),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        write(store, T, a, off, &data).await;
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        expect_read(store, T, a, off, &data).await;
    }
    let windows: &[(u64, u64)] = &[
        (0, 8),
        (4090, 20),
        (4000, 9000),
        (65530, 4200),
        (299_999, 70_010),
        (CHUNK_SIZE - 4097, 4097),
        (0, CHUNK_SIZE),
    ];
    for &(off, len) in windows {
        expect_read(store, T, a, off, &model[off as usize..(off + len) as usize]).await;
    }
    // Another chunk of the same volume is independent of the first.
    let other = pattern(99, 5555);
    write(store, T, b, 12_345, &other).await;
    expect_read(store, T, b, 12_345, &other).await;
    expect_zeros(store, T, b, 0, 12_345).await;
    expect_read(store, T, a, 0, &model).await;
    cleanup(store, T, &[a, b]).await;
}

/// Never-written chunks and never-written ranges of written chunks read as
/// zeros, including at the chunk's end; zero-length reads return nothing.
pub async fn unwritten_ranges_read_zeros(store: &dyn BlockStore) {
    const T: &str = "unwritten_ranges_read_zeros";
    expect_fresh(store, T).await;
    let never = c(1002, 0);
    expect_zeros(store, T, never, 0, BLOCK).await;
    expect_zeros(store, T, never, 12_345, 777).await;
    expect_zeros(store, T, never, CHUNK_SIZE - 1, 1).await;
    expect_zeros(store, T, never, 0, CHUNK_SIZE).await;
    assert!(read(store, T, never, 0, 0).await.is_empty());
    assert!(read(store, T, never, CHUNK_SIZE, 0).await.is_empty());

    let some = c(1002, 1);
    let data = pattern(7, 100);
    write(store, T, some, 10_000, &data).await;
    expect_zeros(store, T, some, 0, 10_000).await;
    expect_zeros(store, T, some, 10_100, 5000).await;
    let mut window = vec![0u8; 120];
    window[10..110].copy_from_slice(&data);
    expect_read(store, T, some, 9990, &window).await;
    expect_zeros(store, T, some, CHUNK_SIZE - BLOCK, BLOCK).await;
    expect_zeros(store, T, some, 10_100, CHUNK_SIZE - 10_100).await;
    expect_list(
        store,
        T,
        "after reading two chunks and writing one",
        &[some],
    )
    .await;
    cleanup(store, T, &[some]).await;
}

/// A chunk is listed once written and while it holds data; reads and zeros
/// do not create chunks; the list is ordered by (volume, index).
pub async fn list_chunks_only_written(store: &dyn BlockStore) {
    const T: &str = "list_chunks_only_written";
    expect_fresh(store, T).await;
    let ghost = c(1003, 5);
    read(store, T, ghost, 0, BLOCK).await;
    zero(store, T, ghost, 0, CHUNK_SIZE).await;
    zero(store, T, ghost, 17, 100).await;
    expect_list(store, T, "after reading and zeroing an absent chunk", &[]).await;
    expect_used(store, T, "after reading and zeroing an absent chunk", 0).await;

    let order = [c(1004, 2), c(1003, 7), c(1003, 0), c(1004, 0), c(1003, 10)];
    for (i, &chunk) in order.iter().enumerate() {
        write(store, T, chunk, 1000 * i as u64 + 1, &pattern(i as u64, 10)).await;
    }
    let mut sorted = order.to_vec();
    sorted.sort();
    expect_list(store, T, "after writing five chunks", &sorted).await;
    store
        .write(c(1003, 99), 0, Bytes::new())
        .await
        .unwrap_or_else(|e| panic!("block_store::{T}: empty write: {e}"));
    expect_used(store, T, "after an empty write", 5 * BLOCK).await;

    // Zeroing every block of a chunk leaves nothing to list.
    zero(store, T, c(1003, 7), 0, CHUNK_SIZE).await;
    sorted.retain(|&x| x != c(1003, 7));
    expect_list(store, T, "after zeroing all of 1003/7", &sorted).await;
    delete(store, T, c(1004, 2)).await;
    sorted.retain(|&x| x != c(1004, 2));
    expect_list(store, T, "after deleting 1004/2", &sorted).await;
    cleanup(store, T, &order).await;
}

/// Reads, writes and zeros past the chunk size fail with `InvalidArgument`
/// (even when `offset + len` overflows) and change nothing; ranges ending
/// exactly at the chunk size are fine.
pub async fn out_of_range_is_invalid_argument(store: &dyn BlockStore) {
    const T: &str = "out_of_range_is_invalid_argument";
    expect_fresh(store, T).await;
    let fresh = c(1005, 0);
    let held = c(1005, 1);
    let data = pattern(5, BLOCK);
    write(store, T, held, 0, &data).await;
    let bad: &[(u64, u64)] = &[
        (CHUNK_SIZE, 1),
        (CHUNK_SIZE - 1, 2),
        (0, CHUNK_SIZE + 1),
        (CHUNK_SIZE + BLOCK, BLOCK),
        (u64::MAX, 1),
        (u64::MAX - 10, 20),
    ];
    for &chunk in &[fresh, held] {
        for &(off, len) in bad {
            let what = format!("{chunk} at {off}+{len}");
            expect_invalid(
                T,
                &format!("read {what}"),
                store.read(chunk, off, len).await,
            );
            expect_invalid(
                T,
                &format!("zero {what}"),
                store.zero(chunk, off, len).await,
            );
            // Writes carry real bytes; keep them small for the huge offsets.
            let wlen = len.min(CHUNK_SIZE + 1);
            let payload = Bytes::from(vec![0xAB; wlen as usize]);
            let what = format!("{chunk} at {off}+{wlen}");
            expect_invalid(
                T,
                &format!("write {what}"),
                store.write(chunk, off, payload).await,
            );
        }
    }
    expect_list(store, T, "after rejected operations", &[held]).await;
    expect_used(store, T, "after rejected operations", BLOCK).await;
    expect_read(store, T, held, 0, &data).await;
    expect_zeros(store, T, held, CHUNK_SIZE - BLOCK, BLOCK).await;

    // Ranges ending exactly at the chunk size are valid.
    expect_zeros(store, T, fresh, CHUNK_SIZE - 1, 1).await;
    assert!(read(store, T, fresh, CHUNK_SIZE, 0).await.is_empty());
    zero(store, T, held, CHUNK_SIZE, 0).await;
    write(store, T, held, CHUNK_SIZE - 3, &[1, 2, 3]).await;
    expect_read(store, T, held, CHUNK_SIZE - 3, &[1, 2, 3]).await;
    cleanup(store, T, &[fresh, held]).await;
}

/// `used()` counts 4 KiB blocks holding data: a one-byte write takes a block,
/// overwriting takes nothing more, a write across a boundary takes both
/// blocks, zeroing whole blocks frees them, zeroing part of a block keeps it
/// (reading zeros there), and delete frees everything.
pub async fn space_accounting(store: &dyn BlockStore) {
    const T: &str = "space_accounting";
    expect_fresh(store, T).await;
    let a = c(1006, 0);
    let b = c(1006, 1);
    write(store, T, a, 0, &[1]).await;
    expect_used(store, T, "after a one-byte write", BLOCK).await;
    write(store, T, a, 10, &pattern(1, 100)).await;
    write(store, T, a, 4095, &[2]).await;
    expect_used(store, T, "after more writes into the same block", BLOCK).await;
    write(store, T, a, 8191, &[3, 4]).await;
    expect_used(
        store,
        T,
        "after a two-byte write across blocks 1|2",
        3 * BLOCK,
    )
    .await;
    write(store, T, a, 20_480, &pattern(2, 10_000)).await; // blocks 5, 6, 7
    expect_used(store, T, "after writing blocks 5..=7", 6 * BLOCK).await;
    write(store, T, b, CHUNK_SIZE - 1, &[5]).await;
    expect_used(store, T, "after a byte in a second chunk", 7 * BLOCK).await;

    zero(store, T, a, 0, 100).await;
    expect_used(store, T, "after zeroing part of block 0", 7 * BLOCK).await;
    expect_zeros(store, T, a, 0, 100).await;
    expect_read(store, T, a, 4095, &[2]).await;

    zero(store, T, a, BLOCK, BLOCK).await;
    expect_used(store, T, "after zeroing all of block 1", 6 * BLOCK).await;
    expect_zeros(store, T, a, BLOCK, BLOCK).await;
    expect_read(store, T, a, 2 * BLOCK, &[4]).await;

    zero(store, T, a, 10 * BLOCK, BLOCK).await;
    expect_used(
        store,
        T,
        "after zeroing a block that held nothing",
        6 * BLOCK,
    )
    .await;

    // 20000..32000: part of block 4 (empty), all of 5 and 6, part of 7.
    zero(store, T, a, 20_000, 12_000).await;
    expect_used(
        store,
        T,
        "after zeroing blocks 5 and 6 and part of 7",
        4 * BLOCK,
    )
    .await;
    expect_zeros(store, T, a, 16_384, 16_384).await;

    zero(store, T, b, 0, CHUNK_SIZE).await;
    expect_used(store, T, "after zeroing all of the second chunk", 3 * BLOCK).await;
    zero(store, T, a, 0, CHUNK_SIZE).await;
    expect_used(store, T, "after zeroing all of the first chunk", 0).await;
    expect_zeros(store, T, a, 0, CHUNK_SIZE).await;

    write(store, T, a, 0, &pattern(3, 3 * BLOCK + 1)).await;
    expect_used(store, T, "after writing 3 blocks and a byte", 4 * BLOCK).await;
    delete(store, T, a).await;
    expect_used(store, T, "after delete_chunk", 0).await;
    expect_zeros(store, T, a, 0, 4 * BLOCK).await;
    cleanup(store, T, &[a, b]).await;
}

/// The pool fills to exactly its capacity; a write needing more blocks than
/// are free fails with `NoSpace` and changes nothing (old data intact, no
/// new chunk, `used()` unchanged); overwrites still work when full; freeing
/// space lets writes succeed again.
pub async fn capacity_enforced(store: &dyn BlockStore) {
    const T: &str = "capacity_enforced";
    expect_fresh(store, T).await;
    let chunk = |i| c(1007, i);
    let half = CHUNK_SIZE / 2;
    let quarter = CHUNK_SIZE / 4;
    for i in 0..7 {
        write(store, T, chunk(i), 0, &pattern(i, CHUNK_SIZE)).await;
    }
    let seven = pattern(7, half);
    write(store, T, chunk(7), 0, &seven).await;
    let eight = pattern(8, quarter);
    write(store, T, chunk(8), 0, &eight).await;
    let free = CAPACITY - 7 * CHUNK_SIZE - half - quarter;
    expect_used(store, T, "after writing 7.75 MiB", CAPACITY - free).await;

    // Chunk 7 from 256 KiB: 64 blocks holding data, then one block more
    // than is free.
    let off = quarter;
    let too_big = pattern(70, quarter + free + BLOCK);
    let r = store.write(chunk(7), off, Bytes::from(too_big)).await;
    expect_no_space(T, "a write needing one block more than is free", r);
    expect_used(store, T, "after a refused write", CAPACITY - free).await;
    expect_read(store, T, chunk(7), 0, &seven).await;
    expect_zeros(store, T, chunk(7), half, half).await;
    let r = store
        .write(chunk(9), 0, Bytes::from(pattern(90, free + BLOCK)))
        .await;
    expect_no_space(T, "a write to a new chunk needing more than is free", r);
    expect_zeros(store, T, chunk(9), 0, free + BLOCK).await;
    let all: Vec<ChunkRef> = (0..9).map(chunk).collect();
    expect_list(store, T, "after refused writes", &all).await;

    // Exactly filling the pool works.
    let fill = pattern(71, quarter + free);
    write(store, T, chunk(7), off, &fill).await;
    expect_used(store, T, "after filling to capacity", CAPACITY).await;
    expect_read(store, T, chunk(7), 0, &seven[..off as usize]).await;
    expect_read(store, T, chunk(7), off, &fill).await;

    // Full: overwrites and partial zeros work, one new block does not.
    let over = pattern(72, 10_000);
    write(store, T, chunk(2), 5000, &over).await;
    expect_read(store, T, chunk(2), 5000, &over).await;
    zero(store, T, chunk(3), 10, 10).await;
    expect_used(store, T, "after overwriting when full", CAPACITY).await;
    let r = store.write(chunk(9), 0, Bytes::from_static(&[9])).await;
    expect_no_space(T, "a one-byte write to a new chunk when full", r);
    let r = store.write(chunk(8), half, Bytes::from_static(&[9])).await;
    expect_no_space(T, "a one-byte write to a new block when full", r);
    expect_used(store, T, "after refused one-byte writes", CAPACITY).await;
    expect_list(store, T, "after refused one-byte writes", &all).await;
    expect_read(store, T, chunk(8), 0, &eight).await;
    expect_zeros(store, T, chunk(8), quarter, CHUNK_SIZE - quarter).await;

    // Freeing a block lets exactly one block be written again.
    zero(store, T, chunk(0), 0, BLOCK).await;
    expect_used(
        store,
        T,
        "after freeing a block when full",
        CAPACITY - BLOCK,
    )
    .await;
    write(store, T, chunk(9), 0, &[9]).await;
    expect_used(store, T, "after using the freed block", CAPACITY).await;
    let r = store
        .write(chunk(9), 2 * BLOCK, Bytes::from_static(&[9]))
        .await;
    expect_no_space(T, "a write to a second new block", r);
    delete(store, T, chunk(1)).await;
    expect_used(
        store,
        T,
        "after deleting a full chunk",
        CAPACITY - CHUNK_SIZE,
    )
    .await;
    let ten = pattern(100, CHUNK_SIZE);
    write(store, T, chunk(10), 0, &ten).await;
    expect_read(store, T, chunk(10), 0, &ten).await;
    expect_used(store, T, "after refilling", CAPACITY).await;
    let every: Vec<ChunkRef> = (0..11).map(chunk).collect();
    cleanup(store, T, &every).await;
}

/// 32 concurrent writers, to four chunks, each writing 16 disjoint
/// unaligned slots (neighbouring slots share 4 KiB blocks): every byte
/// lands, and `used()` counts each block once.
pub async fn concurrent_writes(store: &dyn BlockStore) {
    const T: &str = "concurrent_writes";
    expect_fresh(store, T).await;
    const TASKS: u64 = 32;
    const CHUNKS: u64 = 4;
    const PER_CHUNK: u64 = TASKS / CHUNKS;
    const ROUNDS: u64 = 16;
    const SLOT: u64 = 1000;
    const BASE: u64 = 7;
    // Task t writes slots (round * PER_CHUNK + t / CHUNKS) of chunk t % CHUNKS.
    let slot_offset = |task: u64, round: u64| BASE + (round * PER_CHUNK + task / CHUNKS) * SLOT;
    let tasks = (0..TASKS).map(|task| async move {
        for round in 0..ROUNDS {
            let data = pattern(task * 100 + round, SLOT);
            write(
                store,
                T,
                c(1008, task % CHUNKS),
                slot_offset(task, round),
                &data,
            )
            .await;
        }
    });
    join_all(tasks).await;

    let mut blocks = 0;
    for i in 0..CHUNKS {
        let mut expected = vec![0u8; (BASE + ROUNDS * PER_CHUNK * SLOT) as usize];
        for task in (0..TASKS).filter(|t| t % CHUNKS == i) {
            for round in 0..ROUNDS {
                let off = slot_offset(task, round) as usize;
                expected[off..off + SLOT as usize]
                    .copy_from_slice(&pattern(task * 100 + round, SLOT));
            }
        }
        expect_read(store, T, c(1008, i), 0, &expected).await;
        blocks += (expected.len() as u64).div_ceil(BLOCK);
    }
    expect_used(store, T, "after concurrent writes", blocks * BLOCK).await;
    let chunks: Vec<ChunkRef> = (0..CHUNKS).map(|i| c(1008, i)).collect();
    expect_list(store, T, "after concurrent writes", &chunks).await;
    cleanup(store, T, &chunks).await;
}

/// Twelve concurrent 1 MiB writes to new chunks on an 8 MiB pool: exactly
/// eight succeed, the others fail with `NoSpace` and leave nothing behind.
pub async fn concurrent_allocation_respects_capacity(store: &dyn BlockStore) {
    const T: &str = "concurrent_allocation_respects_capacity";
    expect_fresh(store, T).await;
    let data = Bytes::from(pattern(11, CHUNK_SIZE));
    let results = join_all((0..12).map(|i| {
        let data = data.clone();
        async move { (i, store.write(c(1009, i), 0, data).await) }
    }))
    .await;
    let mut ok = Vec::new();
    for (i, r) in results {
        match r {
            Ok(()) => ok.push(c(1009, i)),
            Err(Error::NoSpace(_)) => expect_zeros(store, T, c(1009, i), 0, CHUNK_SIZE).await,
            Err(e) => {
                panic!("block_store::{T}: write 1009/{i}: expected success or NoSpace, got {e}")
            }
        }
    }
    assert_eq!(
        ok.len(),
        8,
        "block_store::{T}: {} of 12 concurrent 1 MiB writes succeeded on an 8 MiB pool",
        ok.len()
    );
    expect_used(store, T, "after concurrent allocation", CAPACITY).await;
    expect_list(store, T, "after concurrent allocation", &ok).await;
    for &chunk in &ok {
        expect_read(store, T, chunk, 0, &data).await;
    }
    let every: Vec<ChunkRef> = (0..12).map(|i| c(1009, i)).collect();
    cleanup(store, T, &every).await;
}

/// `flush` succeeds on an empty store, after writes, zeros and deletes, and
/// concurrently with writes; data reads back unchanged afterwards.
pub async fn flush_succeeds(store: &dyn BlockStore) {
    const T: &str = "flush_succeeds";
    expect_fresh(store, T).await;
    flush(store, T).await;
    let a = c(1010, 0);
    let b = c(1010, 1);
    let data = pattern(10, 3 * BLOCK + 5);
    write(store, T, a, 100, &data).await;
    flush(store, T).await;
    expect_read(store, T, a, 100, &data).await;
    zero(store, T, a, BLOCK, BLOCK).await;
    write(store, T, b, 0, &[1]).await;
    flush(store, T).await;
    expect_zeros(store, T, a, BLOCK, BLOCK).await;
    delete(store, T, b).await;
    flush(store, T).await;
    flush(store, T).await;

    let writes = (0..8u64).map(|i| async move {
        write(
            store,
            T,
            c(1010, 2 + i % 2),
            i * 3 * BLOCK + 1,
            &pattern(i, 2 * BLOCK),
        )
        .await;
        flush(store, T).await;
    });
    join_all(writes).await;
    for i in 0..8u64 {
        expect_read(
            store,
            T,
            c(1010, 2 + i % 2),
            i * 3 * BLOCK + 1,
            &pattern(i, 2 * BLOCK),
        )
        .await;
    }
    cleanup(store, T, &[a, b, c(1010, 2), c(1010, 3)]).await;
}

/// Deleting an absent chunk, or a chunk twice, is not an error; a deleted
/// chunk reads as zeros, and writing it again starts from zeros.
pub async fn delete_absent_chunk_is_ok(store: &dyn BlockStore) {
    const T: &str = "delete_absent_chunk_is_ok";
    expect_fresh(store, T).await;
    let a = c(1011, 0);
    delete(store, T, c(1011, 42)).await;
    write(store, T, a, 0, &pattern(1, 3 * BLOCK)).await;
    delete(store, T, a).await;
    delete(store, T, a).await;
    expect_zeros(store, T, a, 0, 3 * BLOCK).await;
    expect_used(store, T, "after deleting a chunk twice", 0).await;
    expect_list(store, T, "after deleting a chunk twice", &[]).await;
    write(store, T, a, 0, &[7]).await;
    expect_read(store, T, a, 0, &[7]).await;
    expect_zeros(store, T, a, 1, 3 * BLOCK).await;
    expect_used(store, T, "after writing a deleted chunk again", BLOCK).await;
    cleanup(store, T, &[a]).await;
}

/// `delete_volume` removes every chunk of that volume and nothing else.
pub async fn delete_volume_removes_only_that_volume(store: &dyn BlockStore) {
    const T: &str = "delete_volume_removes_only_that_volume";
    expect_fresh(store, T).await;
    let gone = [c(1012, 0), c(1012, 1), c(1012, 5)];
    let kept = [c(1013, 0), c(1013, 2)];
    for (i, &chunk) in gone.iter().chain(&kept).enumerate() {
        write(store, T, chunk, 5, &pattern(i as u64, 2 * BLOCK)).await;
    }
    store
        .delete_volume(VolumeId(1012))
        .await
        .unwrap_or_else(|e| panic!("block_store::{T}: delete_volume 1012: {e}"));
    expect_list(store, T, "after delete_volume(1012)", &kept).await;
    expect_used(store, T, "after delete_volume(1012)", 2 * 3 * BLOCK).await;
    for &chunk in &gone {
        expect_zeros(store, T, chunk, 0, 3 * BLOCK).await;
    }
    for (i, &chunk) in kept.iter().enumerate() {
        expect_read(store, T, chunk, 5, &pattern(3 + i as u64, 2 * BLOCK)).await;
    }
    store
        .delete_volume(VolumeId(1012))
        .await
        .unwrap_or_else(|e| panic!("block_store::{T}: delete_volume 1012 again: {e}"));
    store
        .delete_volume(VolumeId(1013))
        .await
        .unwrap_or_else(|e| panic!("block_store::{T}: delete_volume 1013: {e}"));
    cleanup(store, T, &[]).await;
}

/// `scan_chunk` of a chunk never written, or deleted, reports one checksum
/// per 4 KiB block, each that of a zero block, and nothing bad; scanning
/// creates no chunk.
pub async fn scan_chunk_absent_reads_as_zeros(store: &dyn BlockStore) {
    const T: &str = "scan_chunk_absent_reads_as_zeros";
    expect_fresh(store, T).await;
    let never = c(1016, 0);
    let gone = c(1016, 1);
    write(store, T, gone, 5000, &pattern(1, 3 * BLOCK)).await;
    delete(store, T, gone).await;
    let zero_block = crate::storage::crc32c(&[0u8; BLOCK as usize]);
    for chunk in [never, gone] {
        let got = scan(store, T, chunk).await;
        if let Some(b) = got.crcs.iter().position(|&crc| crc != zero_block) {
            panic!(
                "block_store::{T}: scan_chunk {chunk}: block {b} scans as {:#010x}, \
                 not as a zero block ({zero_block:#010x})",
                got.crcs[b]
            );
        }
        assert!(
            got.bad.is_empty(),
            "block_store::{T}: scan_chunk {chunk}: blocks {:?} reported bad",
            got.bad
        );
    }
    expect_list(store, T, "after scanning absent chunks", &[]).await;
    cleanup(store, T, &[]).await;
}

/// After writes (whole blocks, unaligned ranges, parts of blocks, the end
/// of the chunk) and zeros (whole blocks, part of a block, a range across
/// blocks), the checksums `scan_chunk` reports are those of the data read
/// back and nothing is bad, before and after a flush; zeroed blocks scan as
/// zero blocks.
pub async fn scan_chunk_matches_data(store: &dyn BlockStore) {
    const T: &str = "scan_chunk_matches_data";
    expect_fresh(store, T).await;
    let a = c(1017, 0);
    let b = c(1017, 1);
    let writes: &[(u64, u64)] = &[
        (0, BLOCK),
        (BLOCK + 100, 5000),
        (10 * BLOCK, 8 * BLOCK),
        (300_001, 70_001),
        (CHUNK_SIZE - 10, 10),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        write(store, T, a, off, &pattern(i as u64 + 1, len)).await;
    }
    expect_scan_matches(store, T, a, "after writes").await;
    zero(store, T, a, 10 * BLOCK, 4 * BLOCK).await;
    zero(store, T, a, BLOCK + 200, 100).await;
    zero(store, T, a, 300_000, 10_000).await;
    expect_scan_matches(store, T, a, "after zeros").await;
    let zero_block = crate::storage::crc32c(&[0u8; BLOCK as usize]);
    let got = scan(store, T, a).await;
    for blk in 10..14 {
        assert_eq!(
            got.crcs[blk], zero_block,
            "block_store::{T}: scan_chunk {a}: zeroed block {blk} does not scan as zeros"
        );
    }
    flush(store, T).await;
    expect_scan_matches(store, T, a, "after a flush").await;
    write(store, T, b, 0, &pattern(9, 2 * BLOCK)).await;
    zero(store, T, b, 0, CHUNK_SIZE).await;
    expect_scan_matches(store, T, b, "after zeroing all of it").await;
    cleanup(store, T, &[a, b]).await;
}

/// A reference model of a store: bytes and allocated blocks of each chunk.
#[derive(Default)]
struct Model {
    chunks: BTreeMap<ChunkRef, (Vec<u8>, Vec<bool>)>,
    used_blocks: u64,
}

impl Model {
    fn chunk(&mut self, chunk: ChunkRef) -> &mut (Vec<u8>, Vec<bool>) {
        self.chunks.entry(chunk).or_insert_with(|| {
            (
                vec![0; CHUNK_SIZE as usize],
                vec![false; (CHUNK_SIZE / BLOCK) as usize],
            )
        })
    }

    /// Applies a write if it fits; returns whether it did.
    fn write(&mut self, chunk: ChunkRef, off: u64, data: &[u8]) -> bool {
        let end = off + data.len() as u64;
        let blocks = off / BLOCK..end.div_ceil(BLOCK);
        let used = self.used_blocks;
        let (bytes, alloc) = self.chunk(chunk);
        let new = blocks.clone().filter(|&b| !alloc[b as usize]).count() as u64;
        if used + new > CAPACITY / BLOCK {
            return false;
        }
        for b in blocks {
            alloc[b as usize] = true;
        }
        bytes[off as usize..end as usize].copy_from_slice(data);
        self.used_blocks += new;
        true
    }

    fn zero(&mut self, chunk: ChunkRef, off: u64, len: u64) {
        let end = off + len;
        let (bytes, alloc) = self.chunk(chunk);
        bytes[off as usize..end as usize].fill(0);
        let mut freed = 0;
        for b in off.div_ceil(BLOCK)..end / BLOCK {
            freed += u64::from(std::mem::take(&mut alloc[b as usize]));
        }
        self.used_blocks -= freed;
    }

    fn delete(&mut self, chunk: ChunkRef) {
        if let Some((_, alloc)) = self.chunks.remove(&chunk) {
            self.used_blocks -= alloc.iter().filter(|&&a| a).count() as u64;
        }
    }

    fn read(&mut self, chunk: ChunkRef, off: u64, len: u64) -> &[u8] {
        &self.chunk(chunk).0[off as usize..(off + len) as usize]
    }

    fn listed(&self) -> Vec<ChunkRef> {
        self.chunks
            .iter()
            .filter(|(_, (_, alloc))| alloc.contains(&true))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// A valid random range: mostly small and unaligned, some block-aligned, some
/// at the end of the chunk, some large.
fn random_range(rng: &mut StdRng) -> (u64, u64) {
    let (off, len) = match rng.gen_range(0..10) {
        0..=4 => (rng.gen_range(0..CHUNK_SIZE), rng.gen_range(1..=9000)),
        5..=6 => (
            rng.gen_range(0..CHUNK_SIZE / BLOCK) * BLOCK,
            rng.gen_range(1..=16) * BLOCK,
        ),
        7..=8 => {
            let len = rng.gen_range(1..=10_000);
            (
                CHUNK_SIZE - len - rng.gen_range(0..=100).min(CHUNK_SIZE - len),
                len,
            )
        }
        _ => (rng.gen_range(0..CHUNK_SIZE), rng.gen_range(1..=256 * 1024)),
    };
    (off, len.min(CHUNK_SIZE - off))
}

/// 300 seeded random reads, writes (a quarter of them of a whole chunk, so
/// the 8 MiB pool fills and some writes are refused), zeros, deletes,
/// flushes and invalid ranges over ten chunks of two volumes, checked after
/// every step against a reference model: read data, `used()` after every
/// step, `NoSpace` exactly when the model has no room, and the chunk list
/// every ten steps and at the end.
pub async fn random_ops_match_model(store: &dyn BlockStore) {
    const T: &str = "random_ops_match_model";
    const SEED: u64 = 0x7025_b10c;
    const OPS: usize = 300;
    expect_fresh(store, T).await;
    let mut rng = StdRng::seed_from_u64(SEED);
    let chunks: Vec<ChunkRef> = (0..10).map(|i| c(1014 + i % 2, i / 2)).collect();
    let mut model = Model::default();
    let mut ok_writes = 0;
    let mut refused_writes = 0;
    for step in 0..OPS {
        let chunk = chunks[rng.gen_range(0..chunks.len())];
        let at = format!("step {step} (seed {SEED:#x})");
        match rng.gen_range(0..100) {
            0..=39 | 90..=93 => {
                let (off, len) = if rng.gen_range(0..100) >= 75 {
                    (0, CHUNK_SIZE)
                } else {
                    random_range(&mut rng)
                };
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                let fits = model.write(chunk, off, &data);
                let r = store.write(chunk, off, Bytes::from(data)).await;
                match (fits, r) {
                    (true, Ok(())) => ok_writes += 1,
                    (false, Err(Error::NoSpace(_))) => refused_writes += 1,
                    (fits, r) => panic!(
                        "block_store::{T}: {at}: write {chunk} at {off}+{len}: got {r:?}, \
                         expected {}",
                        if fits { "Ok" } else { "NoSpace" }
                    ),
                }
            }
            40..=64 => {
                let (off, len) = random_range(&mut rng);
                let got = read(store, T, chunk, off, len).await;
                let what = format!("{at}: read {chunk} at {off}+{len}");
                assert_bytes(T, &what, &got, model.read(chunk, off, len));
            }
            65..=79 => {
                let (off, len) = if rng.gen_range(0..20) == 0 {
                    (0, CHUNK_SIZE)
                } else {
                    random_range(&mut rng)
                };
                zero(store, T, chunk, off, len).await;
                model.zero(chunk, off, len);
            }
            80..=82 => {
                delete(store, T, chunk).await;
                model.delete(chunk);
            }
            83..=89 => flush(store, T).await,
            94..=96 => {
                let off = rng.gen_range(CHUNK_SIZE - 100..=CHUNK_SIZE);
                let len = CHUNK_SIZE - off + rng.gen_range(1..5000);
                let what = format!("{at}: {chunk} at {off}+{len}");
                match rng.gen_range(0..3) {
                    0 => expect_invalid(
                        T,
                        &format!("read {what}"),
                        store.read(chunk, off, len).await,
                    ),
                    1 => expect_invalid(
                        T,
                        &format!("zero {what}"),
                        store.zero(chunk, off, len).await,
                    ),
                    _ => {
                        let data = Bytes::from(vec![1u8; len as usize]);
                        expect_invalid(
                            T,
                            &format!("write {what}"),
                            store.write(chunk, off, data).await,
                        )
                    }
                }
            }
            _ => {
                let got = read(store, T, chunk, 0, CHUNK_SIZE).await;
                let what = format!("{at}: read all of {chunk}");
                assert_bytes(T, &what, &got, model.read(chunk, 0, CHUNK_SIZE));
            }
        }
        expect_used(store, T, &at, model.used_blocks * BLOCK).await;
        if step % 10 == 0 {
            expect_list(store, T, &at, &model.listed()).await;
        }
    }
    expect_list(store, T, "at the end", &model.listed()).await;
    for &chunk in &chunks {
        let got = read(store, T, chunk, 0, CHUNK_SIZE).await;
        assert_bytes(
            T,
            &format!("final read of {chunk}"),
            &got,
            model.read(chunk, 0, CHUNK_SIZE),
        );
    }
    // The sequence is fixed by the seed; make sure it still covers both
    // outcomes of a write if the mix above is changed.
    assert!(
        ok_writes > 50 && refused_writes > 0,
        "block_store::{T}: the sequence made {ok_writes} writes and had {refused_writes} refused \
         for lack of space; adjust the mix so both happen"
    );
    cleanup(store, T, &chunks).await;
}
