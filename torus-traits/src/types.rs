//! Plain-data types shared by every layer: identifiers, peers, the ring.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A volume's numeric identity, allocated once by the catalog and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeId(pub u64);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One chunk of one volume: the unit of placement and replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkRef {
    pub volume: VolumeId,
    pub index: u64,
}

impl ChunkRef {
    pub fn new(volume: VolumeId, index: u64) -> Self {
        ChunkRef { volume, index }
    }
}

impl fmt::Display for ChunkRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume.0, self.index)
    }
}

/// A peer's persistent identity (kept in its data directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerId(pub uuid::Uuid);

impl PeerId {
    pub fn random() -> Self {
        PeerId(uuid::Uuid::new_v4())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for PeerId {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        uuid::Uuid::parse_str(s)
            .map(PeerId)
            .map_err(|e| crate::Error::InvalidArgument(format!("bad peer UUID {s:?}: {e}")))
    }
}

/// A volume's write epoch. Opening a volume for writing increments it; replicas
/// refuse writes that carry an older epoch than the newest they have seen.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

/// What a peer reports about itself with every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: PeerId,
    /// Address other peers reach it at (e.g. `http://10.2.55.2:40000`).
    pub address: String,
    /// Size of its storage pool in bytes.
    pub capacity: u64,
    /// Bytes used in its pool.
    pub used: u64,
    /// Bytes per second currently moved by rebuild or rebalance.
    pub rebalance_rate: u64,
    /// When this record was written, in milliseconds since the Unix epoch.
    pub updated_unix_ms: u64,
    /// How often the peer rewrites its live record, in milliseconds (a third
    /// of its lease's TTL); 0 when unknown (a record written before this
    /// field existed).
    #[serde(default)]
    pub heartbeat_ms: u64,
}

/// Ring membership: which peers hold data, and how many copies of each chunk.
/// Versioned; changed only by compare-and-swap in metadata. Placement is a
/// pure function of the ring, so every node computes the same answer from
/// the same version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    pub version: u64,
    pub replication: u32,
    pub members: Vec<RingMember>,
}

/// A peer in the ring with its placement weight (its pool size when it joined).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingMember {
    pub id: PeerId,
    pub weight: u64,
}

impl Ring {
    pub fn contains(&self, id: PeerId) -> bool {
        self.members.iter().any(|m| m.id == id)
    }
}
