//! Scrub: compare a volume's replicas block by block and repair them.
//!
//! Each store keeps a crc32c per 4 KiB block and reports blocks whose data no
//! longer matches it (`ScanChunk`). A scrub pass, run by the volume's writer
//! (it holds the chunk locks and the epoch), takes every existing chunk in
//! turn under its lock and scans it on each current replica. For each block:
//! the replicas whose copy passes its own checksum are candidates; the value
//! most of them agree on wins (ties go to the first in placement order,
//! which prefers this node's copy); every replica holding something else,
//! or a copy failing its checksum, gets the winning block rewritten from a
//! candidate and made durable. A block with no passing copy anywhere is
//! counted as unrecoverable and left alone.
//!
//! Runs come from `torusctl volume scrub NAME` (a request record the
//! volume's writer, or a rebalancer if nobody has it open, picks up; the
//! result is recorded for the command to read) and from a background
//! schedule (`cluster.scrub_interval`), paced to `cluster.scrub_rate` bytes
//! scanned per second so foreground I/O keeps its share.

use crate::codec::{decode, encode};
use crate::keys;
use crate::replication::ReplicatedChunks;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use torus_traits::{
    ChunkRef, ChunkScan, Epoch, Error, MetadataStore, PeerId, PeerRequest, PeerResponse, Result,
    VolumeId, SECTOR,
};

/// What one scrub pass found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Chunks scanned (on every current replica).
    pub chunks: u64,
    /// 4 KiB blocks compared (per chunk, across its replicas).
    pub blocks: u64,
    /// Blocks where some replica differed or failed its checksum.
    pub mismatches: u64,
    /// Block copies rewritten.
    pub repaired: u64,
    /// Blocks with no copy passing its checksum.
    pub unrecoverable: u64,
}

/// A scrub asked for by an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubRequest {
    pub id: u64,
}

/// The last scrub of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubResult {
    /// The request it answered (0 for a scheduled scrub).
    pub request: u64,
    pub finished_unix_ms: u64,
    pub report: ScrubReport,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

pub fn request_key(volume: VolumeId) -> Vec<u8> {
    format!("{}request", keys::scrub_of(volume)).into_bytes()
}

pub fn result_key(volume: VolumeId) -> Vec<u8> {
    format!("{}result", keys::scrub_of(volume)).into_bytes()
}

/// Ask for a scrub of `volume`; returns the request id to wait for.
pub async fn request(meta: &dyn MetadataStore, volume: VolumeId) -> Result<u64> {
    let id = crate::catalog::now_ms().max(1);
    meta.put(&request_key(volume), &encode(&ScrubRequest { id })?, None)
        .await?;
    Ok(id)
}

pub async fn pending_request(
    meta: &dyn MetadataStore,
    volume: VolumeId,
) -> Result<Option<ScrubRequest>> {
    match meta.get(&request_key(volume)).await? {
        Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
        None => Ok(None),
    }
}

pub async fn last_result(
    meta: &dyn MetadataStore,
    volume: VolumeId,
) -> Result<Option<ScrubResult>> {
    match meta.get(&result_key(volume)).await? {
        Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
        None => Ok(None),
    }
}

/// Record a finished scrub, and drop the request it answered.
pub async fn record(
    meta: &dyn MetadataStore,
    volume: VolumeId,
    result: &ScrubResult,
) -> Result<()> {
    meta.put(&result_key(volume), &encode(result)?, None)
        .await?;
    if result.request != 0 {
        if let Some(req) = pending_request(meta, volume).await? {
            if req.id == result.request {
                meta.delete(&request_key(volume)).await?;
            }
        }
    }
    Ok(())
}

/// How long a replica may take to scan or take one chunk's repairs.
const SCRUB_TIMEOUT: Duration = Duration::from_secs(30);

impl ReplicatedChunks {
    /// One scrub pass over every existing chunk, paced to `rate` bytes
    /// scanned per second (0: unlimited). See the module docs.
    pub async fn scrub(&self, epoch: Epoch, rate: u64) -> Result<ScrubReport> {
        let started = Instant::now();
        let mut report = ScrubReport::default();
        let chunk_size = self.link.local.store().chunk_size();
        for index in self.list_held(self.members(), SCRUB_TIMEOUT).await.0 {
            self.scrub_chunk(index, epoch, &mut report).await?;
            if rate > 0 {
                let scanned = report.chunks * chunk_size;
                let due = Duration::from_secs_f64(scanned as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        if report.mismatches > 0 {
            tracing::warn!(volume = %self.volume, ?report, "scrub found mismatches");
        }
        Ok(report)
    }

    async fn scrub_chunk(&self, index: u64, epoch: Epoch, report: &mut ScrubReport) -> Result<()> {
        let chunk = ChunkRef::new(self.volume, index);
        // No write may change the chunk between the scans and the repairs.
        let _exclusive = self.stripe(index).write().await;
        let mut replicas = self.healthy_replicas(chunk)?;
        if let Some(pos) = replicas.iter().position(|&p| p == self.link.me) {
            replicas[..=pos].rotate_right(1);
        }
        let mut scans: Vec<(PeerId, ChunkScan)> = Vec::new();
        for &peer in &replicas {
            let scan = PeerRequest::ScanChunk { chunk };
            match self.link.call_within(peer, scan, SCRUB_TIMEOUT).await {
                Ok(PeerResponse::Scan(s)) => scans.push((peer, s)),
                other => {
                    tracing::info!(%chunk, %peer, "scrub could not scan this copy: {other:?}")
                }
            }
        }
        let Some(blocks) = scans.first().map(|(_, s)| s.crcs.len()) else {
            return Ok(());
        };
        if scans.iter().any(|(_, s)| s.crcs.len() != blocks) {
            return Err(Error::Corrupt(format!(
                "chunk {chunk}: replicas report different chunk sizes"
            )));
        }
        report.chunks += 1;
        report.blocks += blocks as u64;
        let bad: Vec<BTreeSet<u32>> = scans
            .iter()
            .map(|(_, s)| s.bad.iter().copied().collect())
            .collect();
        // (source replica, target replica, block) for every repair.
        let mut repairs: Vec<(usize, usize, u32)> = Vec::new();
        for b in 0..blocks {
            let good: Vec<usize> = (0..scans.len())
                .filter(|&r| !bad[r].contains(&(b as u32)))
                .collect();
            let differs = scans.iter().any(|(_, s)| s.crcs[b] != scans[0].1.crcs[b]);
            if good.len() == scans.len() && !differs {
                continue;
            }
            report.mismatches += 1;
            let Some(winner) = good.iter().copied().max_by_key(|&r| {
                let votes = good
                    .iter()
                    .filter(|&&o| scans[o].1.crcs[b] == scans[r].1.crcs[b])
                    .count();
                // Ties: the earliest replica (max_by_key keeps the last max).
                (votes, usize::MAX - r)
            }) else {
                report.unrecoverable += 1;
                continue;
            };
            let want = scans[winner].1.crcs[b];
            for r in 0..scans.len() {
                if scans[r].1.crcs[b] != want || bad[r].contains(&(b as u32)) {
                    repairs.push((winner, r, b as u32));
                }
            }
        }
        let mut touched: BTreeSet<usize> = BTreeSet::new();
        for (source, target, b) in repairs {
            let offset = u64::from(b) * SECTOR;
            let read = PeerRequest::Read {
                chunk,
                offset,
                len: SECTOR,
            };
            let data = match self.link.call(scans[source].0, read).await? {
                PeerResponse::Data(d) if d.len() as u64 == SECTOR => d,
                other => {
                    return Err(Error::Corrupt(format!(
                        "chunk {chunk}: scrub source answered {other:?}"
                    )))
                }
            };
            let write = PeerRequest::Write {
                chunk,
                offset,
                data,
                epoch,
            };
            self.link.call(scans[target].0, write).await?;
            touched.insert(target);
            report.repaired += 1;
        }
        for target in touched {
            let flush = PeerRequest::Flush {
                volume: self.volume,
                epoch,
            };
            self.link.call(scans[target].0, flush).await?;
        }
        Ok(())
    }
}
