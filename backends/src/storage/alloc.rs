//! Allocation accounting shared by the block stores: the pool's block counter
//! with its capacity ([`Space`]) and per-chunk allocation bitmaps
//! ([`Bitmap`]), both counted in [`SECTOR`]-sized blocks.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use torus_traits::{ChunkRef, Error, SECTOR};

/// The pool: how many blocks it may hold and how many are in use.
///
/// Writers reserve the blocks they are about to allocate before doing any
/// I/O, so concurrent writers can never together overshoot the capacity; the
/// counter is a single atomic, updated by compare-and-swap.
pub(crate) struct Space {
    capacity_blocks: u64,
    used_blocks: AtomicU64,
}

impl Space {
    /// A pool of `capacity` bytes (whole blocks only) with `used_blocks` in
    /// use. `used_blocks` may exceed the capacity (a store reopened with a
    /// smaller size): then every allocation fails until enough is freed.
    pub(crate) fn new(capacity: u64, used_blocks: u64) -> Self {
        Space {
            capacity_blocks: capacity / SECTOR,
            used_blocks: AtomicU64::new(used_blocks),
        }
    }

    pub(crate) fn used_bytes(&self) -> u64 {
        self.used_blocks.load(Ordering::Relaxed) * SECTOR
    }

    /// Takes `blocks` more blocks from the pool, or fails with `NoSpace`
    /// without taking any.
    pub(crate) fn reserve(&self, blocks: u64, chunk: ChunkRef) -> Result<(), Error> {
        if blocks == 0 {
            return Ok(());
        }
        let cap = self.capacity_blocks;
        self.used_blocks
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(blocks).filter(|&total| total <= cap)
            })
            .map(drop)
            .map_err(|used| {
                Error::NoSpace(format!(
                    "writing chunk {chunk} needs {blocks} more 4 KiB blocks; \
                     {used} of {cap} blocks are in use"
                ))
            })
    }

    /// Counts `blocks` as used regardless of the capacity (they are already
    /// allocated on disk; only a race between overlapping writes and zeros
    /// gets here).
    pub(crate) fn force_add(&self, blocks: u64) {
        if blocks > 0 {
            self.used_blocks.fetch_add(blocks, Ordering::Relaxed);
        }
    }

    /// Returns `blocks` to the pool.
    pub(crate) fn release(&self, blocks: u64) {
        if blocks > 0 {
            // Saturating, so an accounting bug can never wrap into a huge
            // "used" figure that would refuse every write.
            let _ = self
                .used_blocks
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                    Some(used.saturating_sub(blocks))
                });
        }
    }
}

/// One bit per block of a chunk: set while the block holds data.
///
/// Bits are atomics so that readers can consult the map while writers to
/// other parts of the chunk update it. Every update is made under the owning
/// chunk's lock (which makes read-count-then-set sequences consistent), and
/// readers take that lock before looking, so relaxed ordering suffices.
pub(crate) struct Bitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

impl Bitmap {
    pub(crate) fn new(bits: u64) -> Self {
        let words = (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Bitmap { words, bits }
    }

    pub(crate) fn get(&self, bit: u64) -> bool {
        bit < self.bits
            && self
                .words
                .get((bit / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }

    /// Number of set bits in `range`.
    pub(crate) fn count_set(&self, range: Range<u64>) -> u64 {
        let mut n = 0;
        self.for_words(range, |word, mask| {
            n += u64::from((word.load(Ordering::Relaxed) & mask).count_ones());
        });
        n
    }

    /// Sets every bit in `range`; returns how many were clear before.
    pub(crate) fn set(&self, range: Range<u64>) -> u64 {
        let mut n = 0;
        self.for_words(range, |word, mask| {
            let old = word.fetch_or(mask, Ordering::Relaxed);
            n += u64::from((!old & mask).count_ones());
        });
        n
    }

    /// Clears every bit in `range`; returns how many were set before.
    pub(crate) fn clear(&self, range: Range<u64>) -> u64 {
        let mut n = 0;
        self.for_words(range, |word, mask| {
            let old = word.fetch_and(!mask, Ordering::Relaxed);
            n += u64::from((old & mask).count_ones());
        });
        n
    }

    /// Calls `f` with each word overlapping `range` and the mask of the
    /// range's bits in it. Bits past the map are ignored.
    fn for_words(&self, range: Range<u64>, mut f: impl FnMut(&AtomicU64, u64)) {
        let end = range.end.min(self.bits);
        let mut bit = range.start;
        while bit < end {
            let idx = bit / 64;
            let lo = bit % 64;
            let hi = (end - idx * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(&self.words[idx as usize], mask);
            bit = (idx + 1) * 64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use torus_traits::VolumeId;

    #[test]
    fn bitmap_ranges() {
        let b = Bitmap::new(300);
        assert_eq!(b.set(3..5), 2);
        assert_eq!(b.set(0..130), 128);
        assert_eq!(b.count_set(0..300), 130);
        assert_eq!(b.count_set(60..70), 10);
        assert!(b.get(129) && !b.get(130));
        assert_eq!(b.clear(64..128), 64);
        assert_eq!(b.count_set(0..300), 66);
        assert_eq!(b.set(250..400), 50);
        assert_eq!(b.count_set(0..1000), 116);
        assert_eq!(b.clear(0..0), 0);
    }

    #[test]
    fn space_reserve_release() {
        let c = ChunkRef::new(VolumeId(1), 0);
        let s = Space::new(3 * SECTOR + 100, 0);
        assert!(s.reserve(2, c).is_ok());
        assert!(matches!(s.reserve(2, c), Err(Error::NoSpace(_))));
        assert!(s.reserve(1, c).is_ok());
        assert_eq!(s.used_bytes(), 3 * SECTOR);
        s.release(5);
        assert_eq!(s.used_bytes(), 0);
        let over = Space::new(SECTOR, 4);
        assert!(over.reserve(1, c).is_err());
        assert!(over.reserve(0, c).is_ok());
    }
}
