//! Conformance suite for [`BlockDevice`] (semantics in `crate::device`).
//!
//! Every function takes a writable device of at least [`MIN_SIZE`] bytes.
//! [`unwritten_reads_zeros`] needs a device nobody has written yet, so
//! [`all`] runs it first; every other function sets up the state it relies
//! on (zeroing its range first), so they can run in any order on one device.
//! Functions panic with a message saying what broke.
//!
//! Offsets deliberately cross 4 KiB sector boundaries and the 4 MiB mark (the
//! default chunk size), where implementations split I/O.

use crate::{BlockDevice, Error};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Smallest device the suite accepts.
pub const MIN_SIZE: u64 = 8 * 1024 * 1024;

const MIB: u64 = 1024 * 1024;

/// Run every check; `dev` must be fresh (never written) and writable.
pub async fn all(dev: &dyn BlockDevice) {
    unwritten_reads_zeros(dev).await;
    roundtrip_unaligned(dev).await;
    past_end_is_invalid(dev).await;
    write_zeroes_reads_zeros(dev).await;
    trim_reads_zeros(dev).await;
    flush_ok(dev).await;
    fua_write_ok(dev).await;
    concurrent_disjoint_writes(dev).await;
    random_ops_match_model(dev, 0x7075_7275_7321).await;
}

/// A recognisable pattern: depends on the seed and the absolute offset.
fn pattern(seed: u8, offset: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|i| {
            let x = offset + i;
            (x as u8) ^ ((x >> 8) as u8).rotate_left(3) ^ seed.wrapping_mul(31) ^ 0x5a
        })
        .collect::<Vec<u8>>()
        .into()
}

async fn read(dev: &dyn BlockDevice, offset: u64, len: u64) -> Bytes {
    let data = dev
        .read(offset, len)
        .await
        .unwrap_or_else(|e| panic!("read {offset}+{len} failed: {e}"));
    assert_eq!(
        data.len() as u64,
        len,
        "read {offset}+{len} returned {} bytes",
        data.len()
    );
    data
}

async fn write(dev: &dyn BlockDevice, offset: u64, data: Bytes, fua: bool) {
    let len = data.len();
    dev.write(offset, data, fua)
        .await
        .unwrap_or_else(|e| panic!("write {offset}+{len} (fua {fua}) failed: {e}"));
}

async fn zero(dev: &dyn BlockDevice, offset: u64, len: u64) {
    dev.write_zeroes(offset, len, true, false)
        .await
        .unwrap_or_else(|e| panic!("write_zeroes {offset}+{len} failed: {e}"));
}

fn assert_zeros(data: &[u8], what: &str) {
    if let Some(i) = data.iter().position(|b| *b != 0) {
        panic!("{what}: byte {i} is {:#x}, expected zero", data[i]);
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#x}, expected {:#x}",
            got[i], want[i]
        );
    }
}

fn check_size(dev: &dyn BlockDevice) {
    assert!(
        dev.size() >= MIN_SIZE,
        "the block device suite needs at least {MIN_SIZE} bytes, got {}",
        dev.size()
    );
    assert!(
        !dev.read_only(),
        "the block device suite needs a writable device"
    );
}

/// A device nobody wrote reads as zeros everywhere, including its last byte.
pub async fn unwritten_reads_zeros(dev: &dyn BlockDevice) {
    check_size(dev);
    let size = dev.size();
    for (offset, len) in [
        (0, 4096),
        (1, 10),
        (4 * MIB - 100, 200),
        (size - 4096, 4096),
        (size - 1, 1),
        (0, MIN_SIZE),
    ] {
        assert_zeros(
            &read(dev, offset, len).await,
            &format!("unwritten read {offset}+{len}"),
        );
    }
}

/// Writes at unaligned offsets and lengths read back exactly, and do not
/// touch their neighbours.
pub async fn roundtrip_unaligned(dev: &dyn BlockDevice) {
    check_size(dev);
    let size = dev.size();
    let cases: [(u64, usize); 7] = [
        (0, 1),
        (4095, 2),              // across a sector boundary
        (12_345, 100_000),      // many sectors, unaligned both ends
        (4 * MIB - 3000, 7000), // across the 4 MiB mark
        (6 * MIB + 512, 512),
        (7 * MIB + 1, 65_537),
        (size - 777, 777), // the very end
    ];
    for (i, (offset, len)) in cases.into_iter().enumerate() {
        // Zero a margin around the range so neighbours are known.
        let lo = offset.saturating_sub(64);
        let hi = (offset + len as u64 + 64).min(size);
        zero(dev, lo, hi - lo).await;
        let data = pattern(i as u8 + 1, offset, len);
        write(dev, offset, data.clone(), false).await;
        let back = read(dev, offset, len as u64).await;
        assert_same(&back, &data, &format!("roundtrip {offset}+{len}"));
        let around = read(dev, lo, hi - lo).await;
        let before = (offset - lo) as usize;
        assert_zeros(
            &around[..before],
            &format!("bytes before write {offset}+{len}"),
        );
        assert_zeros(
            &around[before + len..],
            &format!("bytes after write {offset}+{len}"),
        );
        assert_same(
            &around[before..before + len],
            &data,
            &format!("write {offset}+{len} read with its margins"),
        );
    }
    // Overwrite part of a written range.
    zero(dev, 0, 64 * 1024).await;
    write(dev, 100, pattern(9, 100, 20_000), false).await;
    write(dev, 5_000, pattern(10, 5_000, 3), false).await;
    let mut want = pattern(9, 100, 20_000).to_vec();
    want[4_900..4_903].copy_from_slice(&pattern(10, 5_000, 3));
    assert_same(
        &read(dev, 100, 20_000).await,
        &want,
        "partially overwritten range",
    );
}

fn assert_invalid<T: std::fmt::Debug>(r: crate::Result<T>, what: &str) {
    match r {
        Err(Error::InvalidArgument(_)) => {}
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    }
}

/// Every operation on a range past the end fails with `InvalidArgument`
/// (including offsets that overflow when the length is added).
pub async fn past_end_is_invalid(dev: &dyn BlockDevice) {
    check_size(dev);
    let size = dev.size();
    let ranges = [
        (size - 1, 2u64),
        (size, 1),
        (size + 4096, 4096),
        (u64::MAX - 10, 20),
        (u64::MAX, 1),
    ];
    for (offset, len) in ranges {
        let what = |op: &str| format!("{op} {offset}+{len} on a {size} byte device");
        assert_invalid(dev.read(offset, len).await, &what("read"));
        let data = Bytes::from(vec![0xa5u8; len as usize]);
        assert_invalid(dev.write(offset, data, false).await, &what("write"));
        assert_invalid(
            dev.write_zeroes(offset, len, true, false).await,
            &what("write_zeroes"),
        );
        assert_invalid(
            dev.write_zeroes(offset, len, false, false).await,
            &what("write_zeroes(no trim)"),
        );
        assert_invalid(dev.trim(offset, len, false).await, &what("trim"));
    }
    // A refused write past the end changes nothing before the end.
    zero(dev, size - 8192, 8192).await;
    let _ = dev
        .write(size - 10, Bytes::from(vec![0xffu8; 20]), false)
        .await;
    assert_zeros(
        &read(dev, size - 8192, 8192).await,
        "tail after a refused write past the end",
    );
}

/// `write_zeroes` makes a written range read as zeros, with `may_trim` true
/// and false, at unaligned edges, leaving the neighbours intact.
pub async fn write_zeroes_reads_zeros(dev: &dyn BlockDevice) {
    check_size(dev);
    for may_trim in [true, false] {
        for (offset, len) in [
            (4 * MIB - 10_000, 20_000u64),
            (1000, 3000),
            (65_536, 131_072),
        ] {
            let lo = offset - 500;
            let span = len + 1000;
            write(dev, lo, pattern(3, lo, span as usize), false).await;
            dev.write_zeroes(offset, len, may_trim, false)
                .await
                .unwrap_or_else(|e| panic!("write_zeroes {offset}+{len} may_trim={may_trim}: {e}"));
            let back = read(dev, lo, span).await;
            let want = pattern(3, lo, span as usize);
            let what = format!("write_zeroes {offset}+{len} may_trim={may_trim}");
            assert_same(&back[..500], &want[..500], &format!("{what}: before"));
            assert_zeros(&back[500..500 + len as usize], &what);
            assert_same(
                &back[500 + len as usize..],
                &want[500 + len as usize..],
                &format!("{what}: after"),
            );
        }
    }
    // With fua too.
    write(dev, 0, pattern(4, 0, 4096), false).await;
    dev.write_zeroes(0, 4096, true, true)
        .await
        .unwrap_or_else(|e| panic!("write_zeroes with fua: {e}"));
    assert_zeros(&read(dev, 0, 4096).await, "write_zeroes with fua");
}

/// `trim` makes a range read as zeros (whole and partial sectors), leaving
/// the neighbours intact.
pub async fn trim_reads_zeros(dev: &dyn BlockDevice) {
    check_size(dev);
    for (offset, len, fua) in [
        (2 * MIB, MIB, false),
        (4 * MIB - 6000, 12_000, true),
        (123, 4500, false),
    ] {
        let lo = offset - 100;
        let span = len + 200;
        write(dev, lo, pattern(5, lo, span as usize), false).await;
        dev.trim(offset, len, fua)
            .await
            .unwrap_or_else(|e| panic!("trim {offset}+{len}: {e}"));
        let back = read(dev, lo, span).await;
        let want = pattern(5, lo, span as usize);
        let what = format!("trim {offset}+{len}");
        assert_same(&back[..100], &want[..100], &format!("{what}: before"));
        assert_zeros(&back[100..100 + len as usize], &what);
        assert_same(
            &back[100 + len as usize..],
            &want[100 + len as usize..],
            &format!("{what}: after"),
        );
    }
}

/// `flush` succeeds, with and without writes before it, and keeps the data.
pub async fn flush_ok(dev: &dyn BlockDevice) {
    check_size(dev);
    dev.flush()
        .await
        .unwrap_or_else(|e| panic!("flush failed: {e}"));
    write(dev, 3 * MIB + 7, pattern(6, 3 * MIB + 7, 10_000), false).await;
    dev.flush()
        .await
        .unwrap_or_else(|e| panic!("flush after a write failed: {e}"));
    dev.flush()
        .await
        .unwrap_or_else(|e| panic!("second flush failed: {e}"));
    assert_same(
        &read(dev, 3 * MIB + 7, 10_000).await,
        &pattern(6, 3 * MIB + 7, 10_000),
        "data after flush",
    );
}

/// A write with `fua` succeeds and reads back.
pub async fn fua_write_ok(dev: &dyn BlockDevice) {
    check_size(dev);
    let offset = 5 * MIB - 2048;
    let data = pattern(7, offset, 8192);
    write(dev, offset, data.clone(), true).await;
    assert_same(&read(dev, offset, 8192).await, &data, "fua write");
    dev.trim(offset, 8192, true)
        .await
        .unwrap_or_else(|e| panic!("trim with fua: {e}"));
    assert_zeros(&read(dev, offset, 8192).await, "trim with fua");
}

/// Many writes in flight at once to disjoint (unaligned, sector-sharing)
/// ranges all land.
pub async fn concurrent_disjoint_writes(dev: &dyn BlockDevice) {
    check_size(dev);
    const N: u64 = 32;
    const LEN: u64 = 3000; // ranges share sectors with their neighbours
    let base = 4 * MIB - N * LEN / 2; // and straddle the 4 MiB mark
    zero(dev, base, N * LEN).await;
    let writes = (0..N).map(|i| {
        let offset = base + i * LEN;
        let data = pattern(i as u8, offset, LEN as usize);
        async move {
            dev.write(offset, data, i % 4 == 0)
                .await
                .unwrap_or_else(|e| panic!("concurrent write {i} at {offset}: {e}"))
        }
    });
    futures::future::join_all(writes).await;
    let back = read(dev, base, N * LEN).await;
    for i in 0..N {
        let at = (i * LEN) as usize;
        assert_same(
            &back[at..at + LEN as usize],
            &pattern(i as u8, base + i * LEN, LEN as usize),
            &format!("concurrent write {i}"),
        );
    }
    // Concurrent reads of what was written agree too.
    let reads = (0..N).map(|i| async move { (i, read(dev, base + i * LEN, LEN).await) });
    for (i, data) in futures::future::join_all(reads).await {
        assert_same(
            &data,
            &pattern(i as u8, base + i * LEN, LEN as usize),
            &format!("concurrent read {i}"),
        );
    }
}

/// A seeded random sequence of ~300 writes, reads, zeroes, trims and flushes
/// over the first [`MIN_SIZE`] bytes, checked against a `Vec<u8>` model.
pub async fn random_ops_match_model(dev: &dyn BlockDevice, seed: u64) {
    check_size(dev);
    let span = MIN_SIZE;
    let mut model = vec![0u8; span as usize];
    zero(dev, 0, span).await;
    let mut rng = StdRng::seed_from_u64(seed);
    // Interesting places: sector and chunk boundaries, the ends.
    let hot = [0, 4096, 65_536, MIB, 4 * MIB, span];
    for step in 0..300u32 {
        let len: u64 = match rng.gen_range(0..10) {
            0 => rng.gen_range(1..16),
            1..=5 => rng.gen_range(1..16_384),
            6..=8 => rng.gen_range(1..262_144),
            _ => rng.gen_range(1..MIB),
        };
        let offset: u64 = if rng.gen_bool(0.3) {
            let h = hot[rng.gen_range(0..hot.len())];
            let jitter: i64 = rng.gen_range(-5000..5000);
            (h as i64 + jitter).clamp(0, (span - len) as i64) as u64
        } else {
            rng.gen_range(0..=span - len)
        };
        let (o, l) = (offset as usize, len as usize);
        let what = format!("seed {seed:#x} step {step}");
        match rng.gen_range(0..100) {
            0..=39 => {
                let data = pattern(step as u8, offset, l);
                model[o..o + l].copy_from_slice(&data);
                write(dev, offset, data, rng.gen_bool(0.1)).await;
            }
            40..=69 => {
                let got = read(dev, offset, len).await;
                assert_same(
                    &got,
                    &model[o..o + l],
                    &format!("{what}: read {offset}+{len}"),
                );
            }
            70..=81 => {
                let may_trim = rng.gen_bool(0.5);
                dev.write_zeroes(offset, len, may_trim, false)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: write_zeroes {offset}+{len}: {e}"));
                model[o..o + l].fill(0);
            }
            82..=93 => {
                dev.trim(offset, len, false)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: trim {offset}+{len}: {e}"));
                model[o..o + l].fill(0);
            }
            _ => dev
                .flush()
                .await
                .unwrap_or_else(|e| panic!("{what}: flush: {e}")),
        }
    }
    // Final full comparison, 1 MiB at a time.
    for at in (0..span).step_by(MIB as usize) {
        let got = read(dev, at, MIB).await;
        assert_same(
            &got,
            &model[at as usize..(at + MIB) as usize],
            &format!("seed {seed:#x} final state at {at}"),
        );
    }
}
