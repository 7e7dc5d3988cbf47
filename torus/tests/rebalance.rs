//! Rebalancing and re-replication, in process: chunks move to their new
//! owners when a peer joins, a live peer taken out of the ring is drained,
//! a peer that stays down is taken out automatically and its chunks copied
//! again from the other replicas — all while the volume stays readable and
//! writable. A seeded random workload with a reference model runs while peers
//! fail, return, join and leave; afterwards every replica of every chunk is
//! identical and equals the model. A scrub finds a copy that diverged
//! behind the store's back and rewrites it from the majority.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus::catalog;
use torus::cluster;
use torus::control::{Control, MetaControl};
use torus::node::{Healing, Node};
use torus::placement;
use torus_backends::storage::MemoryBlockStore;
use torus_traits::{
    BlockDevice, BlockStore, ChunkRef, MetadataStore, PeerId, VolumeId, VolumeProvider,
};
use torus_transports::MemoryNetwork;

mod common;
use common::pid;

const CHUNK: u64 = 256 << 10;
const CHUNKS: u64 = 16;
const SIZE: u64 = CHUNKS * CHUNK;

/// An in-process cluster whose stores the test can inspect.
struct Cluster {
    meta: Arc<dyn MetadataStore>,
    net: MemoryNetwork,
    stores: BTreeMap<usize, Arc<MemoryBlockStore>>,
    nodes: BTreeMap<usize, Node>,
    healing: Healing,
    ttl: Duration,
    /// Faults on node 0's calls to its peers.
    faults: torus_transports::faulty::TransportFaultControl,
    /// Node 0's transport (through the fault injector).
    node0: Option<Arc<dyn torus_traits::PeerTransport>>,
}

impl Cluster {
    async fn new(n: usize, replication: u32, healing: Healing, ttl: Duration) -> Cluster {
        let net = MemoryNetwork::new();
        let faulty = torus_transports::faulty::FaultyTransport::new(Arc::new(net.transport()));
        let faults = faulty.control();
        let mut c = Cluster {
            meta: common::init(CHUNK, replication).await,
            net,
            stores: BTreeMap::new(),
            nodes: BTreeMap::new(),
            healing,
            ttl,
            faults,
            node0: None,
        };
        c.node0 = Some(Arc::new(faulty));
        for i in 0..n {
            c.start(i).await;
        }
        c.refresh().await;
        c
    }

    /// Start node `i` (again, on the same store, if it ran before).
    async fn start(&mut self, i: usize) {
        let store = self
            .stores
            .entry(i)
            .or_insert_with(|| Arc::new(MemoryBlockStore::new(CHUNK, 256 << 20)))
            .clone();
        let transport = match (i, &self.node0) {
            (0, Some(t)) => t.clone(),
            _ => Arc::new(self.net.transport()),
        };
        let node = common::start_node_on(
            &self.meta,
            transport,
            i,
            store,
            self.ttl,
            self.healing.clone(),
        )
        .await;
        self.nodes.insert(i, node);
        self.refresh().await;
    }

    /// Kill node `i` as a crash would.
    fn crash(&mut self, i: usize) {
        if let Some(n) = self.nodes.remove(&i) {
            n.abandon();
        }
    }

    async fn refresh(&self) {
        for n in self.nodes.values() {
            n.refresh_cluster_view().await.unwrap();
        }
    }

    fn control(&self) -> MetaControl {
        MetaControl::new(self.meta.clone())
    }

    /// Wait until nothing is left to move or rebuild and every volume is
    /// healthy.
    async fn wait_balanced(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let balance = self.control().balance().await.unwrap();
            let volumes = self.control().list_volumes().await.unwrap();
            if balance.balanced() && volumes.iter().all(|v| v.status == "healthy") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not balanced after {within:?}: {balance:?}, {:?}",
                volumes.iter().map(|v| &v.status).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every chunk of volume `id` is on exactly the replicas the current
    /// ring places it on, each copy equal to `model`; no other live node
    /// keeps a copy.
    async fn check_placement(&self, id: VolumeId, replication: u32, model: &[u8]) {
        let (ring, _) = cluster::ring(&*self.meta).await.unwrap();
        for index in 0..CHUNKS {
            let chunk = ChunkRef::new(id, index);
            let want = &model[(index * CHUNK) as usize..((index + 1) * CHUNK) as usize];
            let owners = placement::replicas(&ring, chunk, replication);
            assert_eq!(owners.len(), replication as usize);
            let written = want.iter().any(|&b| b != 0);
            for (&i, store) in &self.stores {
                let held = store.list_chunks().await.unwrap().contains(&chunk);
                if owners.contains(&pid(i as u128 + 1)) {
                    let got = store.read(chunk, 0, CHUNK).await.unwrap();
                    assert!(
                        got[..] == want[..],
                        "chunk {index} on its owner node {i} differs from the model"
                    );
                    if written {
                        assert!(held, "chunk {index} missing on its owner node {i}");
                    }
                } else if self.nodes.contains_key(&i) {
                    assert!(
                        !held,
                        "node {i} still keeps chunk {index} it no longer owns"
                    );
                }
            }
        }
    }
}

fn pattern(seed: u64, len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(131).wrapping_add(seed * 7) as u8)
        .collect()
}

/// Write `data` at `offset` through `dev` and into `model`.
async fn write(dev: &Arc<dyn BlockDevice>, model: &mut [u8], offset: u64, data: Bytes) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    dev.write(offset, data, false).await.unwrap();
}

/// Ask for a scrub of `name` and wait for its report.
async fn scrub_now(ctl: &MetaControl, name: &str) -> torus::scrub::ScrubReport {
    let id = ctl.request_scrub(name).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = ctl.scrub_result(name).await.unwrap() {
            if r.request == id {
                assert_eq!(r.error, None);
                return r.report;
            }
        }
        assert!(Instant::now() < deadline, "no scrub result for {name}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn fast_healing() -> Healing {
    Healing {
        down_out_interval: Some(Duration::from_millis(1500)),
        rebalance_rate: 0,
        ..Healing::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_moves_chunks_to_their_new_owners_while_writes_go_on() {
    let mut c = Cluster::new(3, 2, Healing::default(), Duration::from_secs(2)).await;
    let vol = catalog::create(&*c.meta, "vol", SIZE, 2).await.unwrap();
    let dev = c.nodes[&0].open("vol", false).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for index in 0..CHUNKS - 2 {
        let data = pattern(index, 64 << 10);
        write(&dev, &mut model, index * CHUNK + 4096, data).await;
    }
    dev.flush().await.unwrap();

    c.start(3).await;
    assert_eq!(cluster::ring(&*c.meta).await.unwrap().0.members.len(), 4);
    // Writes keep going while chunks move, including to chunks that did not
    // exist before the move started.
    for round in 0..40u64 {
        let index = round % CHUNKS;
        let data = pattern(100 + round, 4096);
        write(&dev, &mut model, index * CHUNK + (round % 8) * 4096, data).await;
        let got = dev.read(index * CHUNK, CHUNK).await.unwrap();
        assert!(
            got[..] == model[(index * CHUNK) as usize..((index + 1) * CHUNK) as usize],
            "chunk {index} read back wrong during the move"
        );
    }
    dev.flush().await.unwrap();
    c.wait_balanced(Duration::from_secs(30)).await;
    c.check_placement(vol.id, 2, &model).await;
    let moved_to_new = c.stores[&3].list_chunks().await.unwrap().len();
    assert!(moved_to_new > 0, "the new node received no chunk");
    let got = dev.read(0, SIZE).await.unwrap();
    assert!(got[..] == model[..], "the volume reads back wrong");
    drop(dev);
    for n in c.nodes.values() {
        n.abandon();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_live_peer_drains_it_and_a_volume_nobody_has_open_still_moves() {
    let c = Cluster::new(4, 2, Healing::default(), Duration::from_secs(2)).await;
    let vol = catalog::create(&*c.meta, "vol", SIZE, 2).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    {
        let dev = c.nodes[&0].open("vol", false).await.unwrap();
        for index in 0..CHUNKS {
            write(
                &dev,
                &mut model,
                index * CHUNK,
                pattern(index, CHUNK as usize),
            )
            .await;
        }
        dev.flush().await.unwrap();
    }
    // Let the close release the lock: the volume is moved by a rebalancer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while catalog::get_lock(&*c.meta, vol.id).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the closed volume stays locked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leaving = pid(3);
    assert!(!c.stores[&2].list_chunks().await.unwrap().is_empty());
    c.control()
        .remove_peers(&[leaving.to_string()])
        .await
        .unwrap();
    c.wait_balanced(Duration::from_secs(30)).await;
    assert!(
        c.stores[&2].list_chunks().await.unwrap().is_empty(),
        "the removed peer still holds chunks"
    );
    // Only live members hold copies now, each equal to the model.
    let mut c = c;
    c.crash(2);
    c.check_placement(vol.id, 2, &model).await;
    // Reads through another node see every byte.
    let dev = c.nodes[&1].open("vol", true).await.unwrap();
    let got = dev.read(0, SIZE).await.unwrap();
    assert!(got[..] == model[..]);
    drop(dev);
    for n in c.nodes.values() {
        n.abandon();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_down_too_long_is_taken_out_and_its_chunks_copied_again() {
    let mut c = Cluster::new(4, 3, fast_healing(), Duration::from_secs(1)).await;
    let vol = catalog::create(&*c.meta, "vol", SIZE, 3).await.unwrap();
    let dev = c.nodes[&0].open("vol", false).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for index in 0..CHUNKS {
        write(&dev, &mut model, index * CHUNK, pattern(index, 128 << 10)).await;
    }
    dev.flush().await.unwrap();

    c.crash(3);
    let dead: PeerId = pid(4);
    // Writes while it is down are acknowledged without it (recorded stale).
    for index in 0..CHUNKS {
        write(
            &dev,
            &mut model,
            index * CHUNK + (128 << 10),
            pattern(50 + index, 4096),
        )
        .await;
    }
    dev.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster::ring(&*c.meta).await.unwrap().0.contains(dead) {
        assert!(
            Instant::now() < deadline,
            "the dead peer is still in the ring"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.wait_balanced(Duration::from_secs(30)).await;
    c.check_placement(vol.id, 3, &model).await;
    let got = dev.read(0, SIZE).await.unwrap();
    assert!(got[..] == model[..]);
    // list-peers says so.
    let peers = c.control().list_peers().await.unwrap();
    let table = torus::cli::peer_table(&peers, 0, &c.control().balance().await.unwrap());
    assert!(!table.contains("DOWN"), "{table}");
    drop(dev);
    for n in c.nodes.values() {
        n.abandon();
    }
}

/// One seeded run: writes with a model while peers crash, return, join and
/// leave; then every replica equals the model.
async fn thrash(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = Cluster::new(4, 2, fast_healing(), Duration::from_secs(1)).await;
    let vol = catalog::create(&*c.meta, "vol", SIZE, 2).await.unwrap();
    let dev = c.nodes[&0].open("vol", false).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut next_node = 4;
    let mut down: Option<usize> = None;
    let mut cut: Option<usize> = None;
    let (mut crashes, mut joins, mut removals, mut partitions) = (0, 0, 0, 0);
    let started = Instant::now();
    // Bounded in count and time.
    for step in 0..300u64 {
        if started.elapsed() > Duration::from_secs(12) {
            break;
        }
        // A peer fails (crashes, or loses its link to the writer) one at a
        // time, and only while every copy is current: with two copies,
        // losing the only current one makes a chunk unavailable, rightly.
        let quiet = down.is_none()
            && cut.is_none()
            && c.meta
                .range(torus::replication::DEGRADED.as_bytes())
                .await
                .unwrap()
                .is_empty();
        let others: Vec<usize> = c.nodes.keys().copied().filter(|&i| i != 0).collect();
        match rng.gen_range(0..100) {
            // The writer loses its link to one peer (the peer lives on).
            15..17 if quiet => {
                let i = others[rng.gen_range(0..others.len())];
                c.faults.partition([format!("node{i}")]);
                cut = Some(i);
                partitions += 1;
            }
            17..20 if cut.is_some() => {
                c.faults.heal();
                cut = None;
            }
            // A peer other than the writer crashes.
            0..3 if quiet => {
                if others.len() > 2 {
                    let i = others[rng.gen_range(0..others.len())];
                    c.crash(i);
                    down = Some(i);
                    crashes += 1;
                }
            }
            // It returns, with its disk.
            3..6 if down.is_some() => {
                if let Some(i) = down.take() {
                    c.start(i).await;
                }
            }
            // A new peer joins.
            6..8 if next_node < 7 => {
                c.start(next_node).await;
                next_node += 1;
                joins += 1;
            }
            // A live peer other than the writer is taken out of the ring.
            8..10 => {
                let (ring, _) = cluster::ring(&*c.meta).await.unwrap();
                let candidates: Vec<PeerId> = ring
                    .members
                    .iter()
                    .map(|m| m.id)
                    .filter(|&p| p != pid(1) && c.nodes.contains_key(&(p.0.as_u128() as usize - 1)))
                    .collect();
                if ring.members.len() > 3 && !candidates.is_empty() {
                    let p = candidates[rng.gen_range(0..candidates.len())];
                    c.control().remove_peers(&[p.to_string()]).await.unwrap();
                    removals += 1;
                }
            }
            10..15 => dev.flush().await.unwrap(),
            _ => {
                let blocks = rng.gen_range(1..=16u64);
                let offset = rng.gen_range(0..SIZE / 4096 - blocks) * 4096;
                let data = pattern(seed * 1000 + step, (blocks * 4096) as usize);
                write(&dev, &mut model, offset, data).await;
                if rng.gen_bool(0.2) {
                    let at = rng.gen_range(0..SIZE / 4096) * 4096;
                    let got = dev.read(at, 4096).await.unwrap();
                    assert!(
                        got[..] == model[at as usize..at as usize + 4096],
                        "seed {seed} step {step}: read at {at} differs from the model"
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(i) = down.take() {
        c.start(i).await;
    }
    c.faults.heal();
    eprintln!(
        "seed {seed}: {crashes} crashes, {partitions} partitions, {joins} joins, {removals} removals"
    );
    assert!(
        crashes + joins + removals + partitions > 0,
        "seed {seed}: the run changed nothing"
    );
    dev.flush().await.unwrap();
    c.wait_balanced(Duration::from_secs(60)).await;
    c.check_placement(vol.id, 2, &model).await;
    let got = dev.read(0, SIZE).await.unwrap();
    assert!(
        got[..] == model[..],
        "seed {seed}: the volume differs from the model"
    );
    drop(dev);
    for n in c.nodes.values() {
        n.abandon();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thrash_seed_1() {
    thrash(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thrash_seed_2() {
    thrash(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thrash_seed_3() {
    thrash(3).await;
}

/// Any seed reproduces: `TORUS_THRASH_SEED=1234 cargo nextest run thrash_seed_from_env`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thrash_seed_from_env() {
    let seed = std::env::var("TORUS_THRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    thrash(seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_finds_a_diverged_copy_and_rewrites_it_from_the_majority() {
    let c = Cluster::new(3, 3, Healing::default(), Duration::from_secs(2)).await;
    let vol = catalog::create(&*c.meta, "vol", SIZE, 3).await.unwrap();
    let dev = c.nodes[&0].open("vol", false).await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for index in 0..4 {
        write(&dev, &mut model, index * CHUNK, pattern(index, 64 << 10)).await;
    }
    dev.flush().await.unwrap();
    // Three blocks of node 2's copy change behind the store's back.
    let rot = &c.stores[&2];
    for (index, block) in [(0u64, 1u64), (1, 0), (3, 5)] {
        rot.write(
            ChunkRef::new(vol.id, index),
            block * 4096,
            Bytes::from(vec![0xEE; 4096]),
        )
        .await
        .unwrap();
    }
    let report = scrub_now(&c.control(), "vol").await;
    assert_eq!(report.chunks, 4, "{report:?}");
    assert_eq!(report.mismatches, 3, "{report:?}");
    assert_eq!(report.repaired, 3, "{report:?}");
    assert_eq!(report.unrecoverable, 0, "{report:?}");
    for index in 0..4 {
        let chunk = ChunkRef::new(vol.id, index);
        let want = &model[(index * CHUNK) as usize..((index + 1) * CHUNK) as usize];
        for store in c.stores.values() {
            assert!(store.read(chunk, 0, CHUNK).await.unwrap()[..] == want[..]);
        }
    }
    let again = scrub_now(&c.control(), "vol").await;
    assert_eq!(again.mismatches, 0, "{again:?}");
    // The table torusctl prints.
    let r = c.control().scrub_result("vol").await.unwrap().unwrap();
    let text = torus::cli::scrub_text("vol", &r).unwrap();
    assert!(text.contains("0 mismatched"), "{text}");
    drop(dev);
    for n in c.nodes.values() {
        n.abandon();
    }
}
