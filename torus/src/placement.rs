//! Placement: which peers hold each chunk.
//!
//! Weighted rendezvous hashing (highest random weight): for a chunk, every
//! ring member gets the score `-weight / ln(u)`, where `u` in (0, 1) is a
//! stable hash of (chunk, member); the R highest scores are the replicas, in
//! order. It is deterministic (every node computes the same list from the same
//! ring), spreads chunks in proportion to weight, and moves only the chunks a
//! joining or leaving member must take or give up — about 1/N of them —
//! which keeps rebalancing small. The hash is fixed here (splitmix64 over
//! the ids), never `std`'s randomised hasher, so it is stable across
//! processes and versions.

use torus_traits::{ChunkRef, PeerId, Ring};

fn mix(mut z: u64) -> u64 {
    // splitmix64 finaliser: a well-tested bijective 64-bit mixer.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash(chunk: ChunkRef, peer: PeerId) -> u64 {
    let (hi, lo) = peer.0.as_u64_pair();
    let mut h = mix(chunk.volume.0 ^ 0x9e37_79b9_7f4a_7c15);
    h = mix(h ^ chunk.index);
    h = mix(h ^ hi);
    mix(h ^ lo)
}

/// Score of `peer` (with `weight`) for `chunk`; higher wins.
fn score(chunk: ChunkRef, peer: PeerId, weight: u64) -> f64 {
    // 53 random bits mapped into (0, 1), never exactly 0 or 1.
    let u = ((hash(chunk, peer) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(weight.max(1) as f64) / u.ln()
}

/// Every ring member ordered by preference for `chunk`; the first
/// `replication` are its replicas, the rest are the fallbacks in order.
pub fn ranked(ring: &Ring, chunk: ChunkRef) -> Vec<PeerId> {
    let mut scored: Vec<(f64, PeerId)> = ring
        .members
        .iter()
        .map(|m| (score(chunk, m.id, m.weight), m.id))
        .collect();
    // Ties are astronomically unlikely; break them by id to stay deterministic.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, p)| p).collect()
}

/// The replicas of `chunk` under `ring`: the `replication` best-ranked
/// distinct members (fewer when the ring is smaller).
pub fn replicas(ring: &Ring, chunk: ChunkRef, replication: u32) -> Vec<PeerId> {
    let mut r = ranked(ring, chunk);
    r.truncate(replication as usize);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use torus_traits::{RingMember, VolumeId};

    fn ring(weights: &[u64]) -> Ring {
        Ring {
            version: 1,
            replication: 3,
            members: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| RingMember {
                    id: PeerId(uuid::Uuid::from_u128(0x1000 + i as u128)),
                    weight: w,
                })
                .collect(),
        }
    }

    fn c(v: u64, i: u64) -> ChunkRef {
        ChunkRef::new(VolumeId(v), i)
    }

    #[test]
    fn spreads_in_proportion_to_weight() {
        let r = ring(&[1, 1, 2, 4]);
        let mut count: HashMap<PeerId, u32> = HashMap::new();
        let n = 40_000;
        for i in 0..n {
            *count.entry(replicas(&r, c(1, i), 1)[0]).or_default() += 1;
        }
        let share = |k: usize| count[&r.members[k].id] as f64 / n as f64;
        for (k, want) in [(0, 0.125), (1, 0.125), (2, 0.25), (3, 0.5)] {
            assert!(
                (share(k) - want).abs() < 0.02,
                "member {k}: {} vs {want}",
                share(k)
            );
        }
    }

    #[test]
    fn a_join_moves_about_one_nth() {
        let before = ring(&[1; 4]);
        let after = ring(&[1; 5]);
        let n = 20_000;
        let moved = (0..n)
            .filter(|&i| replicas(&before, c(2, i), 1) != replicas(&after, c(2, i), 1))
            .count() as f64
            / n as f64;
        assert!((moved - 0.2).abs() < 0.03, "moved {moved}");
    }

    proptest! {
        #[test]
        fn replicas_are_distinct_deterministic_and_sized(
            weights in proptest::collection::vec(1u64..1000, 1..12),
            v in any::<u64>(), i in any::<u64>(), r in 1u32..6,
        ) {
            let ring = ring(&weights);
            let a = replicas(&ring, c(v, i), r);
            let b = replicas(&ring.clone(), c(v, i), r);
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.len(), (r as usize).min(weights.len()));
            let mut d = a.clone();
            d.sort();
            d.dedup();
            prop_assert_eq!(d.len(), a.len());
            // Order of members in the ring does not matter.
            let mut rev = ring.clone();
            rev.members.reverse();
            prop_assert_eq!(replicas(&rev, c(v, i), r), a);
        }
    }
}
