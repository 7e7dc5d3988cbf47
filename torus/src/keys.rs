//! The metadata key layout, in one place.
//!
//! Every key lives under `/torus/`. The layout is versioned by
//! [`LAYOUT_VERSION`] in the cluster record so a later layout can migrate.
//! Volumes have a by-name index and a by-id record; locks and peers live under
//! their own prefixes so a prefix range or watch never mixes kinds.

use torus_traits::{PeerId, VolumeId};

/// Version of this key layout, stored in the cluster record.
pub const LAYOUT_VERSION: u32 = 1;

pub const ROOT: &str = "/torus/";
/// The cluster record (chunk size, default replication, layout version).
pub const CLUSTER: &str = "/torus/meta/cluster";
/// Counter from which volume ids are allocated.
pub const NEXT_VOLUME_ID: &str = "/torus/meta/next-volume-id";
/// The ring (membership and replication), versioned, changed by compare-and-swap.
pub const RING: &str = "/torus/ring";
pub const VOLUMES_BY_NAME: &str = "/torus/volumes/by-name/";
pub const VOLUMES_BY_ID: &str = "/torus/volumes/by-id/";
pub const LOCKS: &str = "/torus/locks/";
pub const PEERS: &str = "/torus/peers/";
/// Past ring versions still needed by a volume being rebalanced.
pub const RINGS: &str = "/torus/rings/";
/// Per-volume placement state (which ring versions its chunks follow).
pub const PLACEMENT: &str = "/torus/placement/";

pub fn volume_by_name(name: &str) -> Vec<u8> {
    format!("{VOLUMES_BY_NAME}{name}").into_bytes()
}

/// Ids are zero-padded so key order is numeric order.
pub fn volume_by_id(id: VolumeId) -> Vec<u8> {
    format!("{VOLUMES_BY_ID}{:020}", id.0).into_bytes()
}

pub fn volume_id_from_key(key: &[u8]) -> Option<VolumeId> {
    volume_id_after(VOLUMES_BY_ID, key)
}

/// The volume id that follows `prefix` in `key` (up to the next `/`), for
/// every per-volume key family: records, locks, degraded replicas.
pub fn volume_id_after(prefix: &str, key: &[u8]) -> Option<VolumeId> {
    let rest = key.strip_prefix(prefix.as_bytes())?;
    let id = rest.split(|&b| b == b'/').next()?;
    std::str::from_utf8(id).ok()?.parse().ok().map(VolumeId)
}

pub fn lock(id: VolumeId) -> Vec<u8> {
    format!("{LOCKS}{:020}", id.0).into_bytes()
}

pub fn ring_version(version: u64) -> Vec<u8> {
    format!("{RINGS}{version:020}").into_bytes()
}

pub fn placement(id: VolumeId) -> Vec<u8> {
    format!("{PLACEMENT}{:020}", id.0).into_bytes()
}

/// Copies a finished move could not delete (the peer was unreachable):
/// `orphans/<volume>/<index>/<peer>`.
pub const ORPHANS: &str = "/torus/orphans/";

pub fn orphans_of(volume: VolumeId) -> String {
    format!("{ORPHANS}{:020}/", volume.0)
}

pub fn orphan(volume: VolumeId, index: u64, peer: PeerId) -> Vec<u8> {
    format!("{}{index:020}/{peer}", orphans_of(volume)).into_bytes()
}

/// Scrub requests and results: `scrub/<volume>/request|result`.
pub const SCRUB: &str = "/torus/scrub/";

pub fn scrub_of(volume: VolumeId) -> String {
    format!("{SCRUB}{:020}/", volume.0)
}

pub fn peer(id: PeerId) -> Vec<u8> {
    format!("{PEERS}{id}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_keys_roundtrip_and_sort_numerically() {
        let a = volume_by_id(VolumeId(9));
        let b = volume_by_id(VolumeId(10));
        assert!(a < b);
        assert_eq!(volume_id_from_key(&b), Some(VolumeId(10)));
        assert_eq!(volume_id_from_key(b"/torus/other"), None);
        assert_eq!(
            volume_id_after(LOCKS, &lock(VolumeId(42))),
            Some(VolumeId(42))
        );
        let degraded = format!("/torus/degraded/{:020}/{:020}/peer", 7, 3);
        assert_eq!(
            volume_id_after("/torus/degraded/", degraded.as_bytes()),
            Some(VolumeId(7))
        );
    }
}
