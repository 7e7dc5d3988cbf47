//! Several NBD connections hammer one replicated volume with overlapping
//! writes, FUA writes and flushes; the result is checked against a model of
//! what the protocol promises.
//!
//! Setup: three in-process nodes (memory metadata, memory transport), each
//! chunk store wrapped in a [`FaultyBlockStore`] that can simulate a power
//! loss, replication 3, the NBD server on node 0, four pipelined clients.
//!
//! Every write stamps each 512-byte sector with its write id and the
//! sector's number, so any sector read back names the write it came from. A
//! global logical clock orders events: a request takes a tick when it is
//! sent and another when its reply arrives.
//!
//! The model, per sector (`W` a write covering it, `D` the writes that must
//! be durable):
//! - the sector holds zeros, or a whole sector of one write that covers it
//!   (no torn or misplaced sectors);
//! - it does not hold `W` if some write in `D` covering it was sent after
//!   `W` was acknowledged (that later write must have won);
//! - it holds zeros only if no write in `D` covers it.
//!
//! Without a crash `D` is every acknowledged write. With a power cut on all
//! three replicas mid-run, `D` is every write acknowledged before a
//! successful flush was sent (on any connection: the server advertises
//! CAN_MULTI_CONN) plus every acknowledged FUA write, counting only replies
//! seen before the cut. The nodes are then restarted over the surviving
//! stores and the volume is read back.
//!
//! Seeded and bounded; a failing seed is printed.

use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use torus::catalog;
use torus::node::Node;
use torus_backends::storage::faulty::OpSet;
use torus_backends::storage::{FaultControl, FaultyBlockStore, MemoryBlockStore};
use torus_frontends::nbd::proto::{self, Command, Request, SimpleReply};
use torus_frontends::nbd::{NbdFrontend, NbdOptions};
use torus_traits::{BlockStore, Error, Frontend, MetadataStore, VolumeProvider};
use torus_transports::MemoryNetwork;

mod common;

const CHUNK: u64 = 256 << 10;
const VOLUME: &str = "hammered";
const VOLUME_SIZE: u64 = 1 << 20;
const SECTOR: usize = 512;
const BLOCK: u64 = 4096;
const CONNECTIONS: usize = 4;
const IN_FLIGHT: usize = 4;
const OPS_PER_CONNECTION: usize = 120;

/// splitmix64: small, seedable, good enough to pick ops.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Write { fua: bool },
    Flush,
}

/// One request as the model sees it.
#[derive(Debug, Clone)]
struct Op {
    kind: Kind,
    /// Write id (stamped in the data); unique across connections.
    id: u32,
    offset: u64,
    len: u64,
    sent: u64,
    /// Tick of the reply and whether it was success; `None`: no reply seen.
    done: Option<(u64, bool)>,
}

struct Cluster {
    meta: Arc<dyn MetadataStore>,
    net: MemoryNetwork,
    stores: Vec<Arc<dyn BlockStore>>,
    controls: Vec<FaultControl>,
    nodes: Vec<Node>,
}

async fn start_node(c: &Cluster, i: usize) -> Node {
    common::start_node(&c.meta, &c.net, i, c.stores[i].clone()).await
}

async fn cluster() -> Cluster {
    let meta = common::init(CHUNK, 3).await;
    let mut c = Cluster {
        meta,
        net: MemoryNetwork::new(),
        stores: Vec::new(),
        controls: Vec::new(),
        nodes: Vec::new(),
    };
    for _ in 0..3 {
        let faulty = FaultyBlockStore::new(Arc::new(MemoryBlockStore::new(CHUNK, 64 << 20)));
        let control = faulty.control();
        control.set_drop_unflushed(true);
        c.controls.push(control);
        c.stores.push(Arc::new(faulty));
    }
    for i in 0..3 {
        let n = start_node(&c, i).await;
        c.nodes.push(n);
    }
    for n in &c.nodes {
        n.refresh_cluster_view().await.unwrap();
    }
    catalog::create(&*c.meta, VOLUME, VOLUME_SIZE, 3)
        .await
        .unwrap();
    c
}

/// A minimal pipelined NBD client: fixed newstyle, NBD_OPT_GO, simple replies.
async fn attach(addr: SocketAddr) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut greeting = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut greeting).await.unwrap();
    proto::decode_greeting(&greeting).unwrap();
    // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    let mut data = (VOLUME.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(VOLUME.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = proto::IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&proto::opt::GO.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt).await.unwrap();
    let mut flags = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        match kind {
            proto::rep::ACK => break,
            proto::rep::INFO if len == 12 && body[..2] == proto::info::EXPORT.to_be_bytes() => {
                flags = Some(u16::from_be_bytes([body[10], body[11]]));
            }
            proto::rep::INFO => {}
            other => panic!("GO refused: {other:#x} {}", String::from_utf8_lossy(&body)),
        }
    }
    (s, flags.expect("NBD_INFO_EXPORT"))
}

/// Stamp of sector `sector` (absolute) written by write `id`.
fn stamp(id: u32, sector: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    for (i, word) in s.chunks_mut(16).enumerate() {
        word[..4].copy_from_slice(&id.to_le_bytes());
        word[4..12].copy_from_slice(&sector.to_le_bytes());
        word[12..16].copy_from_slice(&(i as u32 ^ id).to_le_bytes());
    }
    s
}

fn payload(id: u32, offset: u64, len: u64) -> Vec<u8> {
    let first = offset / SECTOR as u64;
    (0..len / SECTOR as u64)
        .flat_map(|i| stamp(id, first + i))
        .collect()
}

/// Runs one connection's ops; records them in `log`. Stops early when
/// `stop` turns true (the power was cut).
async fn client(
    addr: SocketAddr,
    conn: usize,
    seed: u64,
    clock: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Op>>>,
    stop: watch::Receiver<bool>,
) {
    let (s, flags) = attach(addr).await;
    assert_ne!(
        flags & proto::transmission::CAN_MULTI_CONN,
        0,
        "a replicated volume must advertise CAN_MULTI_CONN"
    );
    let (mut rd, mut wr) = s.into_split();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    // handle → index in `log`
    let pending: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    let reader = {
        let (clock, log, pending, permits) =
            (clock.clone(), log.clone(), pending.clone(), permits.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; proto::SIMPLE_REPLY_LEN];
            // Replies carry no payload: no reads are issued while hammering.
            while rd.read_exact(&mut buf).await.is_ok() {
                let reply = SimpleReply::decode(&buf).expect("simple reply");
                let tick = clock.fetch_add(1, Ordering::SeqCst);
                let Some(i) = pending.lock().unwrap().remove(&reply.handle) else {
                    panic!("reply for unknown handle {}", reply.handle);
                };
                log.lock().unwrap()[i].done = Some((tick, reply.error == 0));
                permits.add_permits(1);
            }
        })
    };
    let mut rng = Rng(seed ^ (conn as u64).wrapping_mul(0x1234_5678_9abc_def1));
    let blocks = VOLUME_SIZE / BLOCK;
    for n in 0..OPS_PER_CONNECTION {
        if *stop.borrow() {
            break;
        }
        let permit = permits.clone().acquire_owned().await.unwrap();
        permit.forget();
        let roll = rng.below(100);
        let kind = match roll {
            0..=11 => Kind::Flush,
            12..=21 => Kind::Write { fua: true },
            _ => Kind::Write { fua: false },
        };
        // Few blocks, small volume: writes overlap often, across chunks too.
        let nblocks = 1 + rng.below(6);
        let start = rng.below(blocks - nblocks + 1);
        let (offset, len) = match kind {
            Kind::Flush => (0, 0),
            Kind::Write { .. } => (start * BLOCK, nblocks * BLOCK),
        };
        let id = (conn * OPS_PER_CONNECTION + n + 1) as u32;
        let handle = id as u64;
        let header = Request {
            flags: if kind == (Kind::Write { fua: true }) {
                proto::cmd_flag::FUA
            } else {
                0
            },
            command: match kind {
                Kind::Flush => Command::Flush,
                Kind::Write { .. } => Command::Write,
            },
            handle,
            offset,
            len: len as u32,
        }
        .encode();
        let mut frame = header.to_vec();
        if let Kind::Write { .. } = kind {
            frame.extend_from_slice(&payload(id, offset, len));
        }
        {
            // Register and take the send tick before the bytes leave.
            let mut log = log.lock().unwrap();
            let sent = clock.fetch_add(1, Ordering::SeqCst);
            log.push(Op {
                kind,
                id,
                offset,
                len,
                sent,
                done: None,
            });
            pending.lock().unwrap().insert(handle, log.len() - 1);
        }
        if wr.write_all(&frame).await.is_err() {
            break;
        }
    }
    // Wait (bounded) for the replies still due, unless the power is out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !pending.lock().unwrap().is_empty()
        && !*stop.borrow()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if !*stop.borrow() {
        assert!(
            pending.lock().unwrap().is_empty(),
            "connection {conn}: replies missing after 20 s"
        );
    }
    reader.abort();
}

/// Checks the volume's content against the model; `cut` is the clock value
/// at the power cut (`None`: no crash, every acknowledged write counts).
fn check(seed: u64, content: &[u8], log: &[Op], cut: Option<u64>) {
    let acked = |op: &Op| match (op.done, cut) {
        (Some((t, true)), Some(c)) => t < c,
        (Some((_, true)), None) => true,
        _ => false,
    };
    let writes: Vec<&Op> = log
        .iter()
        .filter(|o| matches!(o.kind, Kind::Write { .. }))
        .collect();
    let durable: Vec<&Op> = match cut {
        None => writes.iter().copied().filter(|w| acked(w)).collect(),
        Some(_) => {
            // The latest send tick of a successful flush acknowledged before
            // the cut: every write acknowledged before it is durable.
            let barrier = log
                .iter()
                .filter(|o| o.kind == Kind::Flush && acked(o))
                .map(|o| o.sent)
                .max();
            writes
                .iter()
                .copied()
                .filter(|w| {
                    acked(w)
                        && (w.kind == Kind::Write { fua: true }
                            || barrier.is_some_and(|b| w.done.is_some_and(|(t, _)| t < b)))
                })
                .collect()
        }
    };
    let by_id: HashMap<u32, &Op> = writes.iter().map(|w| (w.id, *w)).collect();
    let covers = |w: &Op, sector: u64| {
        let at = sector * SECTOR as u64;
        w.offset <= at && at < w.offset + w.len
    };
    let mut checked_nonzero = 0;
    for (sector, bytes) in content.chunks(SECTOR).enumerate() {
        let sector = sector as u64;
        let must: Vec<&&Op> = durable.iter().filter(|w| covers(w, sector)).collect();
        if bytes.iter().all(|&b| b == 0) {
            assert!(
                must.is_empty(),
                "seed {seed}: sector {sector} reads as zeros, but write {} covering it was durable",
                must[0].id
            );
            continue;
        }
        let id = u32::from_le_bytes(bytes[..4].try_into().unwrap());
        let w = by_id.get(&id).unwrap_or_else(|| {
            panic!("seed {seed}: sector {sector} holds data of no write (id {id})")
        });
        assert!(
            covers(w, sector) && bytes == stamp(id, sector),
            "seed {seed}: sector {sector} holds a torn or misplaced sector of write {id}"
        );
        if let Some((end, _)) = w.done {
            if let Some(later) = must.iter().find(|d| d.sent > end) {
                panic!(
                    "seed {seed}: sector {sector} holds write {id} (acknowledged at tick {end}), \
                     but durable write {} was sent after it (tick {}) and was lost",
                    later.id, later.sent
                );
            }
        }
        checked_nonzero += 1;
    }
    eprintln!(
        "seed {seed}: {} requests, {} writes ({} acknowledged), {} had to be durable, {checked_nonzero} sectors hold data",
        log.len(),
        writes.len(),
        writes.iter().filter(|w| acked(w)).count(),
        durable.len()
    );
    assert!(
        checked_nonzero > 0 || durable.is_empty(),
        "seed {seed}: nothing written survived"
    );
}

async fn read_volume(node: &Node) -> Vec<u8> {
    let dev = node.open(VOLUME, true).await.expect("open for reading");
    let data: Bytes = dev.read(0, VOLUME_SIZE).await.expect("read the volume");
    data.to_vec()
}

async fn run(seed: u64, crash_after: Option<usize>) {
    let mut c = cluster().await;
    let nbd = NbdFrontend::bind(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(c.nodes[0].clone()) as Arc<dyn VolumeProvider>,
        NbdOptions::default(),
    )
    .await
    .unwrap();
    let addr = nbd.local_addr().unwrap();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let nbd = Arc::new(nbd);
    let server = {
        let nbd = nbd.clone();
        tokio::spawn(async move { nbd.serve(shutdown).await })
    };
    let clock = Arc::new(AtomicU64::new(1));
    let log: Arc<Mutex<Vec<Op>>> = Arc::default();
    let (stop_tx, stop) = watch::channel(false);
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|conn| {
            tokio::spawn(client(
                addr,
                conn,
                seed,
                clock.clone(),
                log.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut cut = None;
    if let Some(after) = crash_after {
        // Cut the power once `after` requests have been sent (bounded wait).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while log.lock().unwrap().len() < after && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        cut = Some(clock.fetch_add(1, Ordering::SeqCst));
        let _ = stop_tx.send(true);
        // Nothing reaches any disk from now on, then every disk loses what
        // was not flushed.
        for ctl in &c.controls {
            ctl.fail(OpSet::ALL, Error::Unavailable("power cut".into()));
        }
        for ctl in &c.controls {
            ctl.power_cut().await.expect("power cut");
        }
    }
    for cl in clients {
        cl.await.expect("client task");
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    if cut.is_some() {
        // Reboot: new nodes (same ids) over what the disks kept.
        for n in c.nodes.drain(..) {
            n.abandon();
        }
        for ctl in &c.controls {
            ctl.clear_fail();
        }
        for i in 0..3 {
            let n = start_node(&c, i).await;
            c.nodes.push(n);
        }
        for n in &c.nodes {
            n.refresh_cluster_view().await.unwrap();
        }
    }
    let content = read_volume(&c.nodes[0]).await;
    let log = log.lock().unwrap().clone();
    check(seed, &content, &log, cut);
    for n in &c.nodes {
        n.abandon();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_and_flushes_from_four_connections_match_the_model() {
    for seed in [1, 2, 3] {
        run(seed, None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_mid_run_keeps_every_flushed_and_fua_write() {
    for (seed, after) in [(11, 40), (12, 150), (13, 300), (14, 420)] {
        run(seed, Some(after)).await;
    }
}
