//! `torus-bench`: what `torusd` delivers over NBD, next to reference servers.
//!
//! One run measures, one server after another, the same fio workloads
//! (`fio --ioengine=nbd`, loopback TCP) against:
//!
//! - `torusd R1`: one `torusd` on the embedded default (sled metadata, file
//!   pool), replication 1;
//! - `cluster R3`: three `torusd` nodes on a real etcd
//!   (`torusctl --etcd E init --replication 3`), fio against node A, peers
//!   over plain TCP; `cluster R3 tcp+tls` and `cluster R3 quic`: the same
//!   with mutual TLS between peers over TCP, and over QUIC (certificates from
//!   `torusctl certs`), so the cost of TLS and of QUIC shows side by side;
//! - `nbdkit file`: `nbdkit file` on a sparse file (reference);
//! - `qemu-nbd raw`: `qemu-nbd -f raw` on a sparse file (reference);
//! - `torusd R1 large`: the same single node with a large sparse volume
//!   (`--large-size`, 16 GiB by default), to show that throughput does not
//!   depend on the volume's size (its prefill writes the whole volume, so
//!   the disk needs that much free space).
//!
//! Then the rebuild run: four nodes on etcd at replication 3 (lease 3 s,
//! down-out interval 5 s), the volume written in full through node A, node
//! D killed with SIGKILL; it prints the time until D is taken out of the
//! ring, the time from there to `Balanced: true`, the bytes re-replicated
//! and their rate, and 4 KiB random-write IOPS through A before and during
//! the rebuild (`--skip-rebuild` leaves it out).
//!
//! Then the metadata operations on the embedded default: a fresh `torusd`,
//! `--volumes` (1,000) runs of `torusctl volume create-block`, then
//! `torusctl volume list` with that many volumes, each timed as a user sees
//! it (the whole `torusctl` process).
//!
//! Every server keeps its data under one work directory (same disk) and
//! serves a volume of the same size. Workloads: 1 MiB sequential write and
//! read at QD8 (MB/s), 4 KiB random write and read at QD32 (IOPS), 4 KiB
//! random write at QD1 (mean and p99 completion latency, µs), and 4 KiB
//! random write at QD32 over four connections (`--numjobs=4`, only where the
//! server advertises `CAN_MULTI_CONN`). The volume is filled by a sequential
//! write pass before the read workloads. Every workload starts after a
//! `sync`, so none pays for the write-back of the one before.
//!
//! Output: a Markdown table on stdout (rows = workloads, columns = servers,
//! plus the ratios torusd/nbdkit, cluster-R3/torusd-R1, TLS/TCP and
//! QUIC/TLS between the clusters), then the peak RSS
//! (`VmHWM`) of every server process; `--json FILE` writes the same figures
//! as JSON. Progress goes to stderr.
//!
//! Nothing outlives the program: every child has a guard that kills it on
//! drop (errors, panics), SIGINT, SIGTERM or SIGHUP stop the run and clean
//! up, and the children this program spawns itself get `PR_SET_PDEATHSIG`
//! (so even a SIGKILL of the benchmark takes them along; etcd, started by
//! the harness's `EtcdServer`, is only covered by the guard).
//!
//! Run it with `scripts/bench [ARGS]` (installs the tools when missing and
//! builds release), or `cargo run --release --bin torus-bench -- --help`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use torus_integration::etcd::EtcdServer;

type Res<T> = Result<T, String>;
/// Peak RSS in MiB per process name.
type Rss = Vec<(String, f64)>;

const MIB: u64 = 1 << 20;
/// The volume's name on every server (the NBD export name).
const VOLUME: &str = "bench";
/// Where `EtcdServer` runs etcd from.
const ETCD_BIN: &str = "/usr/bin/etcd";

#[derive(Parser, Debug)]
#[command(
    name = "torus-bench",
    about = "fio over NBD against torusd (R1 and a 3-node R3 cluster), nbdkit and qemu-nbd; prints a Markdown table"
)]
struct Args {
    /// Volume size (KiB/MiB/GiB/TiB are powers of 1024, K/M/G/T of 1000);
    /// a whole number of MiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Seconds each workload is measured.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    runtime: u64,
    /// Seconds of warm-up before each measurement (fio --ramp_time).
    #[arg(long, default_value_t = 2)]
    ramp: u64,
    /// Directory for the servers' data (a fresh subdirectory is made and
    /// removed); default /var/tmp, else the current directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Servers to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "torusd,cluster,cluster-tls,cluster-quic,nbdkit,qemu-nbd,torusd-large"
    )]
    only: Vec<Kind>,
    /// Volume size of the `torusd-large` run.
    #[arg(long, default_value = "16GiB", value_parser = parse_size)]
    large_size: u64,
    /// Volumes created for the metadata timings (0: skip them).
    #[arg(long, default_value_t = 1000)]
    volumes: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Take torusd/torusctl from target/release even when this program is a
    /// debug build.
    #[arg(long, conflicts_with = "bin_dir")]
    release: bool,
    /// Directory holding torusd and torusctl (default: next to this program).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Keep the work directory (server logs) after the run.
    #[arg(long)]
    keep: bool,
    /// Leave out the rebuild run (four nodes, one killed; --size of data).
    #[arg(long)]
    skip_rebuild: bool,
    /// Measure every server this many times, in alternating order (as
    /// listed, then reversed, ...); the table shows each figure's median
    /// and each ratio's median over the rounds, with its range.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

fn parse_size(s: &str) -> Res<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        u => return Err(format!("bad size unit {u:?} in {s:?}")),
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))?;
    if bytes == 0 || bytes % MIB != 0 {
        return Err(format!("size {s:?} must be a positive whole number of MiB"));
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------
// Servers and workloads

#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
enum Kind {
    Torusd,
    Cluster,
    ClusterTls,
    ClusterQuic,
    Nbdkit,
    QemuNbd,
    TorusdLarge,
}

impl Kind {
    fn id(self) -> &'static str {
        match self {
            Kind::Torusd => "torusd",
            Kind::Cluster => "cluster",
            Kind::ClusterTls => "cluster-tls",
            Kind::ClusterQuic => "cluster-quic",
            Kind::Nbdkit => "nbdkit",
            Kind::QemuNbd => "qemu-nbd",
            Kind::TorusdLarge => "torusd-large",
        }
    }
    fn is_cluster(self) -> bool {
        matches!(self, Kind::Cluster | Kind::ClusterTls | Kind::ClusterQuic)
    }
    fn label(self) -> &'static str {
        match self {
            Kind::Torusd => "torusd R1",
            Kind::Cluster => "cluster R3",
            Kind::ClusterTls => "cluster R3 tcp+tls",
            Kind::ClusterQuic => "cluster R3 quic",
            Kind::Nbdkit => "nbdkit file",
            Kind::QemuNbd => "qemu-nbd raw",
            Kind::TorusdLarge => "torusd R1 large",
        }
    }
}

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
enum Metric {
    /// MB/s (10^6 bytes per second).
    Bandwidth,
    Iops,
    /// Mean and p99 completion latency, µs.
    Latency,
}

struct Workload {
    id: &'static str,
    title: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    numjobs: u32,
    metric: Metric,
}

impl Workload {
    fn is_read(&self) -> bool {
        self.rw.contains("read")
    }
}

/// In table order.
const WORKLOADS: [Workload; 6] = [
    Workload {
        id: "seq-write-1m-qd8",
        title: "1 MiB seq write QD8 (MB/s)",
        rw: "write",
        bs: "1m",
        iodepth: 8,
        numjobs: 1,
        metric: Metric::Bandwidth,
    },
    Workload {
        id: "seq-read-1m-qd8",
        title: "1 MiB seq read QD8 (MB/s)",
        rw: "read",
        bs: "1m",
        iodepth: 8,
        numjobs: 1,
        metric: Metric::Bandwidth,
    },
    Workload {
        id: "rand-write-4k-qd32",
        title: "4 KiB rand write QD32 (IOPS)",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        numjobs: 1,
        metric: Metric::Iops,
    },
    Workload {
        id: "rand-read-4k-qd32",
        title: "4 KiB rand read QD32 (IOPS)",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        numjobs: 1,
        metric: Metric::Iops,
    },
    Workload {
        id: "rand-write-4k-qd1",
        title: "4 KiB rand write QD1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        numjobs: 1,
        metric: Metric::Latency,
    },
    Workload {
        id: "rand-write-4k-qd32-4conn",
        title: "4 KiB rand write QD32 × 4 conns (IOPS)",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        numjobs: 4,
        metric: Metric::Iops,
    },
];

/// Execution order (indices into `WORKLOADS`): writes that fill the volume
/// first, then reads, then random writes on allocated data.
const RUN_ORDER: [usize; 6] = [0, 1, 3, 2, 4, 5];

/// What fio reported for one workload (the read or the write side).
#[derive(Clone, Debug)]
struct Figures {
    bw_bytes: f64,
    iops: f64,
    io_bytes: u64,
    clat_mean_us: f64,
    clat_p99_us: f64,
}

impl Figures {
    fn json(&self) -> Value {
        json!({
            "mb_per_s": self.bw_bytes / 1e6,
            "iops": self.iops,
            "io_bytes": self.io_bytes,
            "clat_mean_us": self.clat_mean_us,
            "clat_p99_us": self.clat_p99_us,
        })
    }
}

#[derive(Clone, Debug)]
enum Outcome {
    Done(Figures),
    /// Not run, with the reason (e.g. no multi-conn).
    Skipped(String),
    Failed(String),
}

impl Outcome {
    fn json(&self) -> Value {
        match self {
            Outcome::Done(f) => f.json(),
            Outcome::Skipped(why) => json!({ "skipped": why }),
            Outcome::Failed(why) => json!({ "error": why }),
        }
    }
}

/// Everything measured on one server.
#[derive(Clone)]
struct ServerResult {
    kind: Kind,
    outcomes: BTreeMap<&'static str, Outcome>,
    prefill: Option<Outcome>,
    multi_conn: Option<bool>,
    /// Peak RSS (MiB) of each serving process.
    rss: Rss,
    /// Peak RSS of helpers that are not the server itself (etcd).
    helper_rss: Rss,
    /// Why the server could not be benchmarked at all.
    error: Option<String>,
    /// Problems that do not void the figures (e.g. an unclean stop).
    warnings: Vec<String>,
}

impl ServerResult {
    fn new(kind: Kind) -> ServerResult {
        ServerResult {
            kind,
            outcomes: BTreeMap::new(),
            prefill: None,
            multi_conn: None,
            rss: Vec::new(),
            helper_rss: Vec::new(),
            error: None,
            warnings: Vec::new(),
        }
    }

    fn figures(&self, workload: &str) -> Option<&Figures> {
        match self.outcomes.get(workload) {
            Some(Outcome::Done(f)) => Some(f),
            _ => None,
        }
    }

    fn failed(&self) -> bool {
        self.error.is_some()
            || self
                .outcomes
                .values()
                .chain(self.prefill.iter())
                .any(|o| matches!(o, Outcome::Failed(_)))
    }

    fn json(&self) -> Value {
        let workloads: serde_json::Map<String, Value> = self
            .outcomes
            .iter()
            .map(|(k, o)| (k.to_string(), o.json()))
            .collect();
        let rss: serde_json::Map<String, Value> = self
            .rss
            .iter()
            .map(|(k, v)| (k.clone(), json!(round2(*v))))
            .collect();
        let helper: serde_json::Map<String, Value> = self
            .helper_rss
            .iter()
            .map(|(k, v)| (k.clone(), json!(round2(*v))))
            .collect();
        json!({
            "id": self.kind.id(),
            "label": self.kind.label(),
            "multi_conn": self.multi_conn,
            "workloads": workloads,
            "prefill": self.prefill.as_ref().map(Outcome::json),
            "peak_rss_mib": rss,
            "helper_peak_rss_mib": helper,
            "error": self.error,
            "warnings": self.warnings,
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------
// Child processes: guards, signals, bounded runs

/// Set by the signal thread; every wait loop checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Pids of running children, killed by the signal thread if the main thread
/// does not clean up in time.
static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn interrupted() -> Res<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

fn register(pid: u32) {
    PIDS.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
}

fn unregister(pid: u32) {
    PIDS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pid);
}

/// Signals received (SIGINT, SIGTERM, SIGHUP).
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    // Async-signal-safe: atomics only.
    SIGNALS.fetch_add(1, Ordering::SeqCst);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catch SIGINT, SIGTERM and SIGHUP: the first asks the main thread to stop
/// (its guards kill the children and remove the work directory); a second
/// one, or 20 s without the main thread finishing, kills the children and
/// exits. (A handler, not a blocked mask: children inherit a signal mask but
/// not handlers, so they stay killable.)
fn install_signal_guard() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs an async-signal-safe handler with an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    std::thread::spawn(|| {
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("torus-bench: interrupted: stopping (again to kill at once)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while SIGNALS.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in PIDS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // SAFETY: kill(2) on a pid this program spawned.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        std::process::exit(130);
    });
}

/// The child gets SIGKILL when this program dies (even by SIGKILL).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook calls only async-signal-safe functions and allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// A running child process, killed when dropped.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Res<Proc> {
        let desc = format!("{cmd:?}");
        let child = die_with_parent(cmd)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {desc}: {e}"))?;
        register(child.id());
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `Some(status)` once the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Peak resident set size (VmHWM) in MiB.
    fn peak_rss_mib(&self) -> Res<f64> {
        vm_hwm_mib(self.pid())
    }

    /// SIGTERM, then SIGKILL after `grace`; an error when it did not exit 0
    /// by itself.
    fn stop(&mut self, grace: Duration) -> Res<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let pid = c.id();
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        let result = loop {
            match c.try_wait() {
                Ok(Some(st)) if st.success() => break Ok(()),
                Ok(Some(st)) => break Err(format!("{} exited with {st} after SIGTERM", self.name)),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break Err(format!(
                        "{} did not exit within {grace:?} of SIGTERM; killed",
                        self.name
                    ));
                }
            }
        };
        unregister(pid);
        result
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            unregister(c.id());
        }
    }
}

/// Keeps etcd's pid in the registry while it runs.
struct PidGuard(u32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        unregister(self.0);
    }
}

fn vm_hwm_mib(pid: u32) -> Res<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| format!("no VmHWM in /proc/{pid}/status"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("bad line {line:?}"))?;
    Ok(kib / 1024.0)
}

/// Run a command to completion within `limit` (killed after it, or on a
/// signal); stdout and stderr are collected.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Res<Output> {
    let desc = format!("{cmd:?}");
    let mut child = die_with_parent(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {desc}: {e}"))?;
    let pid = child.id();
    register(pid);
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + limit;
    let waited = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if INTERRUPTED.load(Ordering::SeqCst) => break Err("interrupted".to_string()),
            Ok(None) if Instant::now() >= deadline => {
                break Err(format!("{desc} did not finish within {limit:?}; killed"))
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("waiting for {desc}: {e}")),
        }
    };
    if waited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    unregister(pid);
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Output {
        status: waited?,
        stdout,
        stderr,
    })
}

/// `run_bounded` that must exit 0; returns stdout.
fn run_ok(cmd: &mut Command, limit: Duration) -> Res<String> {
    let desc = format!("{cmd:?}");
    let out = run_bounded(cmd, limit)?;
    if !out.status.success() {
        return Err(format!(
            "{desc} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(15);
    format!("{} (tail):\n{}", path.display(), lines[from..].join("\n"))
}

fn free_port() -> Res<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

// ---------------------------------------------------------------------------
// Starting the servers

/// Settings shared by every server run.
#[derive(Clone)]
struct Ctx {
    size: u64,
    large_size: u64,
    runtime: u64,
    ramp: u64,
    torusd: PathBuf,
    torusctl: PathBuf,
    logs: PathBuf,
}

impl Ctx {
    /// The pool each torusd node contributes: room for one full copy.
    fn pool_bytes(&self) -> u64 {
        self.size + (self.size / 4).max(256 * MIB)
    }

    fn ctl(&self, target: &[&str], args: &[&str]) -> Res<String> {
        run_ok(
            Command::new(&self.torusctl).args(target).args(args),
            Duration::from_secs(30),
        )
    }
}

/// A server under test and the processes behind it.
struct Running {
    uri: String,
    /// The serving processes (peak RSS reported), stopped in reverse order.
    procs: Vec<Proc>,
    /// etcd for the cluster: a helper, reported separately.
    etcd: Option<(EtcdServer, PidGuard)>,
}

impl Running {
    fn peak_rss(&self) -> (Rss, Rss, Vec<String>) {
        let mut warnings = Vec::new();
        let mut read = |name: &str, r: Res<f64>| match r {
            Ok(v) => Some((name.to_string(), v)),
            Err(e) => {
                warnings.push(format!("peak RSS of {name}: {e}"));
                None
            }
        };
        let main: Vec<_> = self
            .procs
            .iter()
            .filter_map(|p| read(&p.name, p.peak_rss_mib()))
            .collect();
        let helpers: Vec<_> = self
            .etcd
            .iter()
            .filter_map(|(_, g)| read("etcd", vm_hwm_mib(g.0)))
            .collect();
        (main, helpers, warnings)
    }

    /// Stop everything gracefully; returns what did not stop cleanly.
    fn stop(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        while let Some(mut p) = self.procs.pop() {
            if let Err(e) = p.stop(Duration::from_secs(30)) {
                problems.push(e);
            }
        }
        if let Some((mut etcd, _guard)) = self.etcd.take() {
            etcd.stop();
        }
        problems
    }
}

/// Start one torusd and wait for its `torusd ready:` line; returns the
/// process, its NBD address and its admin URL.
fn start_torusd(
    ctx: &Ctx,
    name: &str,
    data_dir: &Path,
    extra: &[&str],
) -> Res<(Proc, SocketAddr, String)> {
    std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let log = ctx.logs.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let pool = ctx.pool_bytes().to_string();
    let mut proc = Proc::spawn(
        name,
        Command::new(&ctx.torusd)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--nbd-listen", "127.0.0.1:0", "--host", "127.0.0.1"])
            .args(["--port", "0", "--size", &pool])
            .args(extra)
            .env_remove("TORUS_LOG")
            .stdout(Stdio::piped())
            .stderr(log_file),
        &log,
    )?;
    let stdout = proc
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("torusd ready:") {
                let _ = tx.send(line);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = loop {
        interrupted()?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => break line,
            Err(_) if Instant::now() >= deadline => {
                return Err(format!(
                    "{name} not ready within 60 s; {}",
                    log_tail(&proc.log)
                ))
            }
            Err(_) => {
                if let Some(st) = proc.exited() {
                    return Err(format!("{name} exited ({st}); {}", log_tail(&proc.log)));
                }
            }
        }
    };
    // torusd ready: nbd=127.0.0.1:PORT admin=http://127.0.0.1:PORT [peer=…] id=UUID
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
            .ok_or_else(|| format!("no {key} in {line:?}"))
    };
    let nbd = field("nbd=")?
        .parse()
        .map_err(|e| format!("bad nbd address in {line:?}: {e}"))?;
    let admin = field("admin=")?;
    Ok((proc, nbd, admin))
}

fn start_single(ctx: &Ctx, dir: &Path) -> Res<Running> {
    let (proc, nbd, admin) = start_torusd(ctx, "torusd", &dir.join("torusd"), &[])?;
    ctx.ctl(
        &["--server", &admin],
        &["volume", "create-block", VOLUME, &ctx.size.to_string()],
    )?;
    Ok(Running {
        uri: format!("nbd://{nbd}/{VOLUME}"),
        procs: vec![proc],
        etcd: None,
    })
}

/// Flags for node `name` of a `kind` cluster: none for plain TCP; for the
/// TLS kinds, certificates made with `torusctl certs` under `dir/certs`.
fn peer_flags(ctx: &Ctx, kind: Kind, dir: &Path, name: &str) -> Res<Vec<String>> {
    let transport = match kind {
        Kind::ClusterTls => "tcp",
        Kind::ClusterQuic => "quic",
        _ => return Ok(Vec::new()),
    };
    let certs = dir.join("certs");
    let d = certs.display().to_string();
    if !certs.join("ca.crt").exists() {
        ctx.ctl(&[], &["certs", "init", "--dir", &d])?;
    }
    ctx.ctl(&[], &["certs", "node", name, "--dir", &d])?;
    let file = |f: String| certs.join(f).display().to_string();
    Ok(vec![
        "--peer-transport".into(),
        transport.into(),
        "--peer-cert-file".into(),
        file(format!("{name}.crt")),
        "--peer-key-file".into(),
        file(format!("{name}.key")),
        "--peer-ca-file".into(),
        file("ca.crt".into()),
    ])
}

fn start_cluster(ctx: &Ctx, kind: Kind, dir: &Path) -> Res<Running> {
    start_nodes(ctx, kind, dir, &["A", "B", "C"], &[]).map(|(r, _)| r)
}

/// etcd and a `torusd` per name in `names` (with `extra` flags), every one
/// a ring member, and the volume at replication 3; returns them and the
/// etcd endpoint.
fn start_nodes(
    ctx: &Ctx,
    kind: Kind,
    dir: &Path,
    names: &[&str],
    extra: &[&str],
) -> Res<(Running, String)> {
    // EtcdServer panics on failure (with etcd's log); turn that into an error.
    let etcd = std::panic::catch_unwind(EtcdServer::start).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "etcd did not start".into())
    })?;
    let guard = PidGuard(etcd.pid().unwrap_or(0));
    register(guard.0);
    let e = etcd.endpoint();
    let mut running = Running {
        uri: String::new(),
        procs: Vec::new(),
        etcd: Some((etcd, guard)),
    };
    ctx.ctl(&["--etcd", &e], &["init", "--replication", "3"])?;
    for name in names {
        let node = format!("node-{name}");
        let mut flags: Vec<String> = ["--etcd", &e, "--peer-address", "127.0.0.1:0", "--auto-join"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        flags.extend(peer_flags(ctx, kind, dir, &node)?);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (proc, nbd, _admin) = start_torusd(
            ctx,
            &format!("{}-{name}", kind.id()),
            &dir.join(&node),
            &flags,
        )?;
        if running.procs.is_empty() {
            running.uri = format!("nbd://{nbd}/{VOLUME}");
        }
        running.procs.push(proc);
    }
    // All must be members before the volume is placed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        interrupted()?;
        let out = ctx.ctl(&["--etcd", &e], &["list-peers", "--json"])?;
        let peers: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let ok = peers
            .as_array()
            .map(|p| p.len() == names.len() && p.iter().all(|p| p["member"] == "OK"))
            .unwrap_or(false);
        if ok {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} OK peers not seen within 30 s: {out}",
                names.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    ctx.ctl(
        &["--etcd", &e],
        &["volume", "create-block", VOLUME, &ctx.size.to_string()],
    )?;
    // The volume takes the ring's replication; check it when listed.
    let list = ctx.ctl(&["--etcd", &e], &["volume", "list", "--json"])?;
    if let Ok(v) = serde_json::from_str::<Value>(&list) {
        let vols = v.as_array().cloned().unwrap_or_default();
        if let Some(r) = vols
            .iter()
            .find(|x| x["name"] == VOLUME)
            .and_then(|x| x["replication"].as_u64())
        {
            if r != 3 {
                return Err(format!("volume has replication {r}, not 3: {list}"));
            }
        }
    }
    Ok((running, e))
}

/// nbdkit or qemu-nbd on a sparse file of the volume's size.
fn start_reference(ctx: &Ctx, kind: Kind, dir: &Path) -> Res<Running> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let image = dir.join("volume.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(ctx.size))
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let mut last = String::new();
    // A free port may be taken between the probe and the server's bind: retry.
    for _ in 0..3 {
        interrupted()?;
        let port = free_port()?;
        let log = ctx.logs.join(format!("{}.log", kind.id()));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let log_err = log_file.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = match kind {
            Kind::Nbdkit => {
                let mut c = Command::new("nbdkit");
                c.args([
                    "--foreground",
                    "--exit-with-parent",
                    "--ipaddr",
                    "127.0.0.1",
                ])
                .args(["--port", &port.to_string(), "file"])
                .arg(format!("file={}", image.display()));
                c
            }
            _ => {
                let mut c = Command::new("qemu-nbd");
                c.args([
                    "-f",
                    "raw",
                    "--persistent",
                    "--shared=8",
                    "--bind",
                    "127.0.0.1",
                ])
                .args(["--port", &port.to_string(), "--export-name", VOLUME])
                .arg(&image);
                c
            }
        };
        let mut proc = Proc::spawn(kind.id(), cmd.stdout(log_file).stderr(log_err), &log)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            interrupted()?;
            if let Some(st) = proc.exited() {
                last = format!("{} exited ({st}); {}", kind.id(), log_tail(&log));
                break;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(Running {
                    uri: format!("nbd://{addr}/{VOLUME}"),
                    procs: vec![proc],
                    etcd: None,
                });
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} not listening within 15 s; {}",
                    kind.id(),
                    log_tail(&log)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Err(last)
}

// ---------------------------------------------------------------------------
// Measuring

/// `CAN_MULTI_CONN` of the export, from `nbdinfo --json`.
fn multi_conn(uri: &str) -> Res<bool> {
    let out = run_ok(
        Command::new("nbdinfo").args(["--json", uri]),
        Duration::from_secs(30),
    )?;
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("nbdinfo json: {e}"))?;
    v["exports"][0]["can_multi_conn"]
        .as_bool()
        .ok_or_else(|| format!("no can_multi_conn in nbdinfo output: {out}"))
}

/// One fio run; `timed` = Some((runtime, ramp)) for a time-based run, None
/// for one pass over the volume.
fn fio(ctx: &Ctx, uri: &str, name: &str, w: &Workload, timed: Option<(u64, u64)>) -> Res<Figures> {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}"))
        .args(["--ioengine=nbd", &format!("--uri={uri}")])
        .arg(format!("--rw={}", w.rw))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.iodepth))
        .arg(format!("--numjobs={}", w.numjobs))
        .arg(format!("--size={}", ctx.size))
        .args(["--group_reporting", "--output-format=json"]);
    if w.rw.starts_with("rand") {
        // No map of written blocks: less fio CPU, offsets stay uniform.
        cmd.arg("--norandommap");
    }
    let limit = match timed {
        Some((runtime, ramp)) => {
            cmd.args(["--time_based", &format!("--runtime={runtime}")]);
            if ramp > 0 {
                cmd.arg(format!("--ramp_time={ramp}"));
            }
            Duration::from_secs(runtime + ramp + 60)
        }
        // One pass: allow down to ~5 MB/s.
        None => Duration::from_secs(120 + ctx.size / 5_000_000),
    };
    let out = run_bounded(&mut cmd, limit)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let parsed = stdout
        .find('{')
        .and_then(|i| serde_json::from_str::<Value>(&stdout[i..]).ok());
    let Some(v) = parsed.filter(|_| out.status.success()) else {
        return Err(format!(
            "fio {name} failed ({}): {} {}",
            out.status,
            stderr.trim(),
            stdout.trim()
        ));
    };
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!(
            "fio {name} reported error {}: {}",
            job["error"],
            stderr.trim()
        ));
    }
    let side = &job[if w.is_read() { "read" } else { "write" }];
    let f = |p: &Value| p.as_f64().unwrap_or(0.0);
    let figures = Figures {
        bw_bytes: f(&side["bw_bytes"]),
        iops: f(&side["iops"]),
        io_bytes: side["io_bytes"].as_u64().unwrap_or(0),
        clat_mean_us: f(&side["clat_ns"]["mean"]) / 1e3,
        clat_p99_us: f(&side["clat_ns"]["percentile"]["99.000000"]) / 1e3,
    };
    if figures.io_bytes == 0 {
        return Err(format!("fio {name} moved no data: {}", stderr.trim()));
    }
    Ok(figures)
}

fn describe(w: &Workload, f: &Figures) -> String {
    match w.metric {
        Metric::Bandwidth => format!("{:.1} MB/s", f.bw_bytes / 1e6),
        Metric::Iops => format!("{:.0} IOPS", f.iops),
        Metric::Latency => format!(
            "mean {:.1} µs, p99 {:.1} µs ({:.0} IOPS)",
            f.clat_mean_us, f.clat_p99_us, f.iops
        ),
    }
}

/// Write back every dirty page before a workload, so no workload pays for
/// the one before it (a prefill of 16 GiB is still being written back long
/// after fio returns) and every server starts from the same state.
fn settle() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn bench_server(ctx: &Ctx, work: &Path, kind: Kind) -> ServerResult {
    let mut result = ServerResult::new(kind);
    let label = kind.label();
    eprintln!("== {label}: starting");
    let dir = work.join(kind.id());
    let large;
    let ctx = if kind == Kind::TorusdLarge {
        large = Ctx {
            size: ctx.large_size,
            ..ctx.clone()
        };
        &large
    } else {
        ctx
    };
    let started = match kind {
        Kind::Torusd | Kind::TorusdLarge => start_single(ctx, &dir),
        Kind::Cluster | Kind::ClusterTls | Kind::ClusterQuic => start_cluster(ctx, kind, &dir),
        Kind::Nbdkit | Kind::QemuNbd => start_reference(ctx, kind, &dir),
    };
    let running = match started {
        Ok(r) => r,
        Err(e) => {
            eprintln!("== {label}: could not start: {e}");
            result.error = Some(e);
            let _ = std::fs::remove_dir_all(&dir);
            return result;
        }
    };
    eprintln!("== {label}: serving {}", running.uri);
    match multi_conn(&running.uri) {
        Ok(m) => result.multi_conn = Some(m),
        Err(e) => result.warnings.push(format!("multi-conn check: {e}")),
    }
    let timed = Some((ctx.runtime, ctx.ramp));
    for &i in &RUN_ORDER {
        let w = &WORKLOADS[i];
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        // Reads must hit data: fill the volume unless the sequential write
        // already covered it.
        if w.is_read() && result.prefill.is_none() {
            let covered = result
                .figures(WORKLOADS[0].id)
                .is_some_and(|f| f.io_bytes >= ctx.size);
            result.prefill = Some(if covered {
                eprintln!("   prefill: skipped, the sequential write covered the volume");
                Outcome::Skipped("sequential write covered the volume".into())
            } else {
                eprintln!("   prefill: one sequential write pass");
                settle();
                match fio(ctx, &running.uri, "prefill", &WORKLOADS[0], None) {
                    Ok(f) => {
                        eprintln!("   prefill: {:.1} MB/s", f.bw_bytes / 1e6);
                        Outcome::Done(f)
                    }
                    Err(e) => {
                        eprintln!("   prefill: FAILED: {e}");
                        Outcome::Failed(e)
                    }
                }
            });
        }
        settle();
        let outcome = if w.numjobs > 1 && result.multi_conn != Some(true) {
            let why = match result.multi_conn {
                Some(false) => "server does not advertise multi-conn",
                _ => "multi-conn unknown",
            };
            eprintln!("   {}: skipped ({why})", w.id);
            Outcome::Skipped(why.into())
        } else {
            match fio(ctx, &running.uri, w.id, w, timed) {
                Ok(f) => {
                    eprintln!("   {}: {}", w.id, describe(w, &f));
                    Outcome::Done(f)
                }
                Err(e) => {
                    eprintln!("   {}: FAILED: {e}", w.id);
                    Outcome::Failed(e)
                }
            }
        };
        result.outcomes.insert(w.id, outcome);
    }
    let (rss, helpers, warnings) = running.peak_rss();
    result.rss = rss;
    result.helper_rss = helpers;
    result.warnings.extend(warnings);
    result.warnings.extend(running.stop());
    for w in &result.warnings {
        eprintln!("   warning: {w}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

// ---------------------------------------------------------------------------
// Metadata operations

/// Wall times of `torusctl` runs against the embedded default, in ms.
struct MetaFigures {
    volumes: usize,
    create: Vec<f64>,
    list: Vec<f64>,
    /// `torusctl --version`: what starting the program alone costs.
    start: Vec<f64>,
}

/// What the rebuild run measured.
struct RebuildFigures {
    data_mib: u64,
    /// From the kill to the dead node's removal from the ring (lease lapse
    /// plus the down-out interval).
    detect_s: f64,
    /// From the removal to `Balanced: true`.
    rebuild_s: f64,
    /// Bytes the survivors gained (the re-replicated copies).
    copied: u64,
    iops_before: f64,
    /// Foreground runs overlapping the rebuild: their mean IOPS.
    iops_during: Option<f64>,
}

/// Four nodes at replication 3 with the volume written in full; node D is
/// killed with SIGKILL. Measures the time to take it out of the ring, the
/// rebuild rate after that, and 4 KiB random-write IOPS through node A
/// before and during the rebuild.
fn rebuild_bench(ctx: &Ctx, work: &Path) -> Res<RebuildFigures> {
    let dir = work.join("rebuild");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config = dir.join("node.toml");
    std::fs::write(&config, "[node]\nlease_ttl = \"3s\"\n")
        .map_err(|e| format!("{}: {e}", config.display()))?;
    let config_arg = config.display().to_string();
    let extra = ["--config", &config_arg, "--down-out-interval", "5s"];
    let (mut running, e) = start_nodes(ctx, Kind::Cluster, &dir, &["A", "B", "C", "D"], &extra)?;
    let etcd = ["--etcd", e.as_str()];
    let uri = running.uri.clone();
    let [fill, _, rand_write, ..] = &WORKLOADS;
    eprintln!("== rebuild: writing {} MiB", ctx.size / MIB);
    fio(ctx, &uri, "rebuild-fill", fill, None)?;
    let before = fio(ctx, &uri, "rebuild-before", rand_write, Some((5, 1)))?;
    let used = |ctx: &Ctx| -> Res<(u64, usize)> {
        let out = ctx.ctl(&etcd, &["list-peers", "--json"])?;
        let peers: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let live: Vec<&Value> = peers
            .as_array()
            .map(|p| p.iter().filter(|p| p["member"] == "OK").collect())
            .unwrap_or_default();
        let sum = live
            .iter()
            .map(|p| p["info"]["used"].as_u64().unwrap_or(0))
            .sum();
        Ok((sum, live.len()))
    };
    let d = running.procs.pop().ok_or("no node D")?;
    eprintln!("== rebuild: killing node D");
    let killed = Instant::now();
    drop(d);
    // The survivors' usage before D's share is copied to them (D's record
    // lingers until its lease lapses).
    let before_survivors = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            interrupted()?;
            let (sum, live) = used(ctx)?;
            if live == 3 {
                break sum;
            }
            if Instant::now() >= deadline {
                return Err("node D still shown alive 30 s after SIGKILL".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Watch for the ring change and the return to balance while fio runs.
    let (tx, rx) = mpsc::channel::<(Duration, Duration)>();
    let watcher = {
        let torusctl = ctx.torusctl.clone();
        let e = e.clone();
        std::thread::spawn(move || -> Res<()> {
            let ctl = |args: &[&str]| {
                run_ok(
                    Command::new(&torusctl).args(["--etcd", &e]).args(args),
                    Duration::from_secs(30),
                )
            };
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut removed = None;
            loop {
                interrupted()?;
                if Instant::now() >= deadline {
                    return Err("not balanced within 10 minutes of the kill".into());
                }
                if removed.is_none() {
                    // Out of the ring and dead: no longer listed at all.
                    let out = ctl(&["list-peers", "--json"])?;
                    let peers: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
                    if peers.as_array().is_some_and(|p| p.len() == 3) {
                        removed = Some(killed.elapsed());
                    }
                }
                if let Some(r) = removed {
                    if ctl(&["list-peers"])?.contains("Balanced: true") {
                        let _ = tx.send((r, killed.elapsed()));
                        return Ok(());
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut runs = Vec::new();
    let (removed, balanced) = loop {
        interrupted()?;
        let start = killed.elapsed();
        let f = fio(ctx, &uri, "rebuild-during", rand_write, Some((2, 0)))?;
        runs.push((start, killed.elapsed(), f.iops));
        if let Ok(done) = rx.try_recv() {
            break done;
        }
        if watcher.is_finished() {
            return match watcher.join() {
                Ok(Err(e)) => Err(e),
                _ => Err("the rebuild watcher stopped".into()),
            };
        }
    };
    let _ = watcher.join();
    let (after, _) = used(ctx)?;
    let during: Vec<f64> = runs
        .iter()
        .filter(|(s, e, _)| *e > removed && *s < balanced)
        .map(|r| r.2)
        .collect();
    let figures = RebuildFigures {
        data_mib: ctx.size / MIB,
        detect_s: removed.as_secs_f64(),
        rebuild_s: (balanced - removed).as_secs_f64(),
        copied: after.saturating_sub(before_survivors),
        iops_before: before.iops,
        iops_during: (!during.is_empty()).then(|| mean(&during)),
    };
    for p in running.stop() {
        eprintln!("torus-bench: rebuild: {p}");
    }
    Ok(figures)
}

fn rebuild_markdown(f: &RebuildFigures) -> String {
    let rate = f.copied as f64 / f.rebuild_s.max(1e-3) / 1e6;
    let during = f
        .iops_during
        .map_or("n/a (the rebuild ended between runs)".to_string(), |d| {
            format!(
                "{} ({:.0} % of before)",
                fmt_num(d),
                d * 100.0 / f.iops_before.max(1.0)
            )
        });
    format!(
        "\nRebuild: four nodes, replication 3, {} MiB written, node D killed (lease 3 s, down-out 5 s)\n\n\
         | figure | value |\n|---|---|\n\
         | kill → taken out of the ring | {:.1} s |\n\
         | taken out → `Balanced: true` | {:.1} s |\n\
         | re-replicated | {} MiB |\n\
         | rebuild rate | {:.0} MB/s |\n\
         | 4 KiB rand write QD32 before (IOPS) | {} |\n\
         | same, during the rebuild (IOPS) | {} |\n",
        f.data_mib,
        f.detect_s,
        f.rebuild_s,
        f.copied / MIB,
        rate,
        fmt_num(f.iops_before),
        during,
    )
}

fn rebuild_json(f: &RebuildFigures) -> Value {
    json!({
        "data_mib": f.data_mib,
        "detect_s": round2(f.detect_s),
        "rebuild_s": round2(f.rebuild_s),
        "copied_bytes": f.copied,
        "rebuild_mb_per_s": round2(f.copied as f64 / f.rebuild_s.max(1e-3) / 1e6),
        "iops_before": round2(f.iops_before),
        "iops_during": f.iops_during.map(round2),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The value at quantile `q` (0..=1) of `v`, sorted in place.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// A fresh single node; `volumes` runs of `volume create-block`, then five of
/// `volume list`, each timed as a whole `torusctl` process.
fn metadata_bench(ctx: &Ctx, work: &Path, volumes: usize) -> Res<MetaFigures> {
    let dir = work.join("metadata");
    let (proc, _nbd, admin) = start_torusd(ctx, "torusd-metadata", &dir, &[])?;
    let running = Running {
        uri: String::new(),
        procs: vec![proc],
        etcd: None,
    };
    let target = ["--server", admin.as_str()];
    let timed = |args: &[&str]| -> Res<(f64, String)> {
        interrupted()?;
        let t = Instant::now();
        let out = ctx.ctl(&target, args)?;
        Ok((ms(t.elapsed()), out))
    };
    let result = (|| {
        let mut f = MetaFigures {
            volumes,
            create: Vec::with_capacity(volumes),
            list: Vec::new(),
            start: Vec::new(),
        };
        for _ in 0..5 {
            f.start.push(timed(&["--version"])?.0);
        }
        for i in 0..volumes {
            let name = format!("meta{i:05}");
            f.create
                .push(timed(&["volume", "create-block", &name, "1GiB"])?.0);
        }
        for _ in 0..5 {
            let (t, out) = timed(&["volume", "list"])?;
            let listed = out.lines().filter(|l| l.starts_with("meta")).count();
            if listed != volumes {
                return Err(format!("volume list showed {listed} of {volumes} volumes"));
            }
            f.list.push(t);
        }
        Ok(f)
    })();
    let problems = running.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let f = result?;
    if let Some(p) = problems.first() {
        return Err(p.clone());
    }
    Ok(f)
}

fn metadata_markdown(f: &MetaFigures) -> String {
    let (mut c, mut l, mut st) = (f.create.clone(), f.list.clone(), f.start.clone());
    format!(
        "\nMetadata operations (embedded default, wall time of each `torusctl` run, ms; target < 100):\n\n\
         - `volume create-block` ×{}: mean {:.1}, p99 {:.1}, max {:.1}\n\
         - `volume list` with {} volumes (5 runs): median {:.1}, max {:.1}\n\
         - `torusctl --version` alone (process start, 5 runs): median {:.1}\n",
        f.volumes,
        mean(&c),
        quantile(&mut c, 0.99),
        quantile(&mut c, 1.0),
        f.volumes,
        quantile(&mut l, 0.5),
        quantile(&mut l, 1.0),
        quantile(&mut st, 0.5),
    )
}

fn metadata_json(f: &MetaFigures) -> Value {
    let (mut c, mut l, mut st) = (f.create.clone(), f.list.clone(), f.start.clone());
    json!({
        "volumes": f.volumes,
        "create_block_ms": {"mean": mean(&c), "p99": quantile(&mut c, 0.99), "max": quantile(&mut c, 1.0)},
        "list_ms": {"median": quantile(&mut l, 0.5), "max": quantile(&mut l, 1.0)},
        "torusctl_start_ms": {"median": quantile(&mut st, 0.5)},
    })
}

// ---------------------------------------------------------------------------
// Report

fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn cell(r: &ServerResult, w: &Workload, p99: bool) -> (String, Option<f64>) {
    match r.outcomes.get(w.id) {
        Some(Outcome::Done(f)) => {
            let v = match w.metric {
                Metric::Bandwidth => f.bw_bytes / 1e6,
                Metric::Iops => f.iops,
                Metric::Latency if p99 => f.clat_p99_us,
                Metric::Latency => f.clat_mean_us,
            };
            (fmt_num(v), Some(v))
        }
        Some(Outcome::Failed(_)) => ("error".into(), None),
        Some(Outcome::Skipped(_)) | None if r.error.is_some() => ("error".into(), None),
        Some(Outcome::Skipped(_)) | None => ("n/a".into(), None),
    }
}

/// Rows of the table: (label, workload, p99?).
fn rows() -> Vec<(String, &'static Workload, bool)> {
    let mut rows = Vec::new();
    for w in &WORKLOADS {
        if w.metric == Metric::Latency {
            rows.push((format!("{} mean lat (µs)", w.title), w, false));
            rows.push((format!("{} p99 lat (µs)", w.title), w, true));
        } else {
            rows.push((w.title.to_string(), w, false));
        }
    }
    rows
}

const RATIOS: [(Kind, Kind, &str); 5] = [
    (Kind::Torusd, Kind::Nbdkit, "torusd/nbdkit"),
    (Kind::Cluster, Kind::Torusd, "R3/R1"),
    (Kind::ClusterTls, Kind::Cluster, "TLS/TCP"),
    (Kind::ClusterQuic, Kind::ClusterTls, "QUIC/TLS"),
    (Kind::TorusdLarge, Kind::Torusd, "large/R1"),
];

/// The header's sentence on rounds (none for a single round).
fn rounds_note(rounds: usize) -> String {
    if rounds > 1 {
        format!(
            " {rounds} rounds, servers in alternating order: each figure is the median over \
             the rounds, each ratio the median of the rounds' own ratios, with their range."
        )
    } else {
        String::new()
    }
}

/// The servers' results over all rounds, one per server: a workload's
/// figures are medians over the rounds that measured it (each field on its
/// own); a failure in any round stays a failure.
fn merge_rounds(rounds: &[Vec<ServerResult>]) -> Vec<ServerResult> {
    let mut kinds: Vec<Kind> = rounds.iter().flatten().map(|r| r.kind).collect();
    kinds.sort();
    kinds.dedup();
    kinds
        .into_iter()
        .map(|kind| {
            let runs: Vec<(usize, &ServerResult)> = rounds
                .iter()
                .enumerate()
                .filter_map(|(i, round)| round.iter().find(|r| r.kind == kind).map(|r| (i, r)))
                .collect();
            if let [(_, only)] = runs[..] {
                return only.clone();
            }
            let mut merged = ServerResult::new(kind);
            for (i, r) in &runs {
                let round = i + 1;
                if merged.error.is_none() {
                    merged.error = r.error.as_ref().map(|e| format!("round {round}: {e}"));
                }
                merged.multi_conn = merged.multi_conn.or(r.multi_conn);
                if merged.prefill.is_none() {
                    merged.prefill = r.prefill.clone();
                }
                for (rss, theirs) in [
                    (&mut merged.rss, &r.rss),
                    (&mut merged.helper_rss, &r.helper_rss),
                ] {
                    for (name, mib) in theirs {
                        match rss.iter_mut().find(|(n, _)| n == name) {
                            Some((_, peak)) => *peak = peak.max(*mib),
                            None => rss.push((name.clone(), *mib)),
                        }
                    }
                }
                let warnings = r.warnings.iter().map(|w| format!("round {round}: {w}"));
                merged.warnings.extend(warnings);
            }
            for w in &WORKLOADS {
                let outcomes: Vec<&Outcome> = runs
                    .iter()
                    .filter_map(|(_, r)| r.outcomes.get(w.id))
                    .collect();
                let failed = outcomes.iter().find(|o| matches!(o, Outcome::Failed(_)));
                let done: Vec<&Figures> = outcomes
                    .iter()
                    .filter_map(|o| match o {
                        Outcome::Done(f) => Some(f),
                        _ => None,
                    })
                    .collect();
                let outcome = if let Some(&failed) = failed {
                    failed.clone()
                } else if !done.is_empty() {
                    Outcome::Done(median_figures(&done))
                } else if let Some(&first) = outcomes.first() {
                    first.clone() // skipped in every round
                } else {
                    continue;
                };
                merged.outcomes.insert(w.id, outcome);
            }
            merged
        })
        .collect()
}

/// Each field's median over several measurements of one workload.
fn median_figures(runs: &[&Figures]) -> Figures {
    let median = |f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
        quantile(&mut v, 0.5)
    };
    Figures {
        bw_bytes: median(|f| f.bw_bytes),
        iops: median(|f| f.iops),
        io_bytes: median(|f| f.io_bytes as f64) as u64,
        clat_mean_us: median(|f| f.clat_mean_us),
        clat_p99_us: median(|f| f.clat_p99_us),
    }
}

/// Server `a`'s figure over server `b`'s in each round that measured both.
fn round_ratios(
    rounds: &[Vec<ServerResult>],
    a: Kind,
    b: Kind,
    w: &Workload,
    p99: bool,
) -> Vec<f64> {
    rounds
        .iter()
        .filter_map(|round| {
            let value = |k: Kind| {
                round
                    .iter()
                    .find(|r| r.kind == k)
                    .and_then(|r| cell(r, w, p99).1)
            };
            match (value(a), value(b)) {
                (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                _ => None,
            }
        })
        .collect()
}

fn markdown(results: &[ServerResult], rounds: &[Vec<ServerResult>], header: &str) -> String {
    let find = |k: Kind| results.iter().find(|r| r.kind == k);
    let ratios: Vec<_> = RATIOS
        .iter()
        .filter(|(a, b, _)| find(*a).is_some() && find(*b).is_some())
        .collect();
    let mut s = format!("{header}\n\n| Workload |");
    for r in results {
        s += &format!(" {} |", r.kind.label());
    }
    for (_, _, name) in &ratios {
        s += &format!(" {name} |");
    }
    s += "\n|---|";
    s += &"---:|".repeat(results.len() + ratios.len());
    s += "\n";
    for (label, w, p99) in rows() {
        s += &format!("| {label} |");
        for r in results {
            s += &format!(" {} |", cell(r, w, p99).0);
        }
        for (a, b, _) in &ratios {
            let mut v = round_ratios(rounds, *a, *b, w, p99);
            s += &match v.len() {
                0 => " n/a |".to_string(),
                1 => format!(" {:.2}× |", v[0]),
                _ => format!(
                    " {:.2}× ({:.2}–{:.2}) |",
                    quantile(&mut v, 0.5),
                    quantile(&mut v, 0.0),
                    quantile(&mut v, 1.0)
                ),
            };
        }
        s += "\n";
    }
    s += "\nPeak RSS (VmHWM, MiB):\n\n";
    for r in results {
        let procs: Vec<String> = r.rss.iter().map(|(n, v)| format!("{n} {v:.1}")).collect();
        let mut line = format!("- {}: ", r.kind.label());
        if procs.is_empty() {
            line += "n/a";
        } else if procs.len() == 1 {
            line += &format!("{:.1}", r.rss[0].1);
        } else {
            let total: f64 = r.rss.iter().map(|(_, v)| v).sum();
            line += &format!("{} (total {total:.1})", procs.join(", "));
        }
        for (n, v) in &r.helper_rss {
            line += &format!("; {n} {v:.1} (not counted)");
        }
        s += &line;
        s += "\n";
    }
    s
}

fn json_report(results: &[ServerResult], rounds: &[Vec<ServerResult>], config: Value) -> Value {
    let find = |k: Kind| results.iter().find(|r| r.kind == k);
    let mut ratios = serde_json::Map::new();
    for (a, b, name) in RATIOS {
        let (Some(ra), Some(rb)) = (find(a), find(b)) else {
            continue;
        };
        let mut m = serde_json::Map::new();
        for (_, w, p99) in rows() {
            let key = if w.metric == Metric::Latency {
                format!("{}.{}", w.id, if p99 { "p99_us" } else { "mean_us" })
            } else {
                w.id.to_string()
            };
            let v = round_ratios(rounds, ra.kind, rb.kind, w, p99);
            let median = if v.is_empty() {
                Value::Null
            } else {
                json!(quantile(&mut v.clone(), 0.5))
            };
            m.insert(key.clone(), median);
            if v.len() > 1 {
                m.insert(format!("{key}.rounds"), json!(v));
            }
        }
        ratios.insert(name.to_string(), Value::Object(m));
    }
    let workloads: Vec<Value> = WORKLOADS
        .iter()
        .map(|w| {
            json!({
                "id": w.id, "title": w.title, "rw": w.rw, "bs": w.bs,
                "iodepth": w.iodepth, "numjobs": w.numjobs,
                "unit": match w.metric {
                    Metric::Bandwidth => "MB/s",
                    Metric::Iops => "IOPS",
                    Metric::Latency => "us",
                },
            })
        })
        .collect();
    let mut report = json!({
        "tool": "torus-bench",
        "config": config,
        "workloads": workloads,
        "servers": results.iter().map(ServerResult::json).collect::<Vec<_>>(),
        "ratios": ratios,
    });
    if let (true, Some(obj)) = (rounds.len() > 1, report.as_object_mut()) {
        let each: Vec<Vec<Value>> = rounds
            .iter()
            .map(|round| round.iter().map(ServerResult::json).collect())
            .collect();
        obj.insert("rounds".into(), json!(each));
    }
    report
}

// ---------------------------------------------------------------------------
// Main

/// Programs needed for the chosen servers, with their Debian packages.
fn preflight(args: &Args, kinds: &[Kind]) -> Res<(PathBuf, PathBuf)> {
    let on_path = |p: &str| {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file()))
            .unwrap_or(false)
    };
    let mut need = vec![("fio", "fio"), ("nbdinfo", "libnbd-bin")];
    if kinds.contains(&Kind::Nbdkit) {
        need.push(("nbdkit", "nbdkit"));
    }
    if kinds.contains(&Kind::QemuNbd) {
        need.push(("qemu-nbd", "qemu-utils"));
    }
    let mut missing: Vec<String> = need
        .iter()
        .filter(|(p, _)| !on_path(p))
        .map(|(p, pkg)| format!("`{p}` is not installed: install the Debian package `{pkg}`"))
        .collect();
    if kinds.iter().any(|k| k.is_cluster()) && !Path::new(ETCD_BIN).is_file() {
        missing.push(format!(
            "`{ETCD_BIN}` is not installed: install the Debian package `etcd-server`"
        ));
    }
    if !missing.is_empty() {
        missing.push("(scripts/bench installs them all: it runs scripts/deps.sh test)".into());
        return Err(missing.join("\n"));
    }
    if on_path("fio") {
        let ok = Command::new("fio")
            .arg("--enghelp=nbd")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err("this fio has no nbd engine (`fio --enghelp=nbd` fails): install Debian's `fio`, built with libnbd".into());
        }
    }
    let dir = match (&args.bin_dir, args.release) {
        (Some(d), _) => d.clone(),
        (None, true) => {
            let own = torus_integration::bin_dir();
            own.parent().map(|p| p.join("release")).unwrap_or(own)
        }
        (None, false) => torus_integration::bin_dir(),
    };
    let torus_bins = kinds
        .iter()
        .any(|k| matches!(k, Kind::Torusd | Kind::TorusdLarge) || k.is_cluster())
        || args.volumes > 0;
    let (torusd, torusctl) = (dir.join("torusd"), dir.join("torusctl"));
    if torus_bins && !(torusd.is_file() && torusctl.is_file()) {
        return Err(format!(
            "torusd/torusctl not found in {}: build them (`cargo build --release --bin torusd --bin torusctl`) or pass --bin-dir",
            dir.display()
        ));
    }
    Ok((torusd, torusctl))
}

/// Bytes available to this user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Res<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: statvfs writes only into `st`, a properly sized local; `path`
    // is a valid NUL-terminated string for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The 1-minute load average: other work on the machine skews the figures.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut kinds = args.only.clone();
    kinds.sort();
    kinds.dedup();
    let (torusd, torusctl) = match preflight(&args, &kinds) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("torus-bench: {e}");
            return ExitCode::from(1);
        }
    };
    let base = args.dir.clone().unwrap_or_else(|| {
        let vt = PathBuf::from("/var/tmp");
        if vt.is_dir() {
            vt
        } else {
            PathBuf::from(".")
        }
    });
    if kinds.contains(&Kind::TorusdLarge) {
        // The large run's prefill writes the whole volume; fail before
        // starting rather than fill the disk halfway through.
        let need = args.large_size + 2 * args.size + (2 << 30);
        match free_bytes(&base) {
            Ok(free) if free < need => {
                eprintln!(
                    "torus-bench: {} has {} MiB free; the torusd-large run needs about {} MiB \
                     (use --large-size, --dir elsewhere, or leave torusd-large out of --only)",
                    base.display(),
                    free / MIB,
                    need / MIB
                );
                return ExitCode::from(1);
            }
            Ok(_) => {}
            Err(e) => eprintln!(
                "torus-bench: warning: free space of {}: {e}",
                base.display()
            ),
        }
    }
    let work = match tempfile::Builder::new()
        .prefix("torus-bench-")
        .tempdir_in(&base)
    {
        Ok(w) => w,
        Err(e) => {
            eprintln!(
                "torus-bench: cannot make a work directory in {}: {e}",
                base.display()
            );
            return ExitCode::from(1);
        }
    };
    let logs = work.path().join("logs");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        eprintln!("torus-bench: {}: {e}", logs.display());
        return ExitCode::from(1);
    }
    // etcd's data directory (EtcdServer makes a tempdir) on the same disk.
    // Set before any thread starts (reads of the environment race with it).
    std::env::set_var("TMPDIR", work.path());
    install_signal_guard();

    let ctx = Ctx {
        size: args.size,
        large_size: args.large_size,
        runtime: args.runtime,
        ramp: args.ramp,
        torusd: torusd.clone(),
        torusctl,
        logs,
    };
    let fio_version = Command::new("fio")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    eprintln!(
        "torus-bench: volume {} MiB, {} s per workload (+{} s ramp), work dir {}, torusd {}",
        ctx.size / MIB,
        ctx.runtime,
        ctx.ramp,
        work.path().display(),
        torusd.display()
    );
    let load_start = loadavg();
    let started = Instant::now();
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        if args.rounds > 1 {
            eprintln!("== round {} of {}", round + 1, args.rounds);
        }
        // Alternate the order so that drift in the machine's speed during
        // the run does not favour the servers measured first.
        let mut order = kinds.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut this = Vec::new();
        for k in order {
            if INTERRUPTED.load(Ordering::SeqCst) {
                break;
            }
            this.push(bench_server(&ctx, work.path(), k));
        }
        this.sort_by_key(|r| r.kind);
        rounds.push(this);
    }
    let results = merge_rounds(&rounds);
    let mut meta_error = None;
    let meta = if args.volumes > 0 && !INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("== metadata: {} volumes", args.volumes);
        match metadata_bench(&ctx, work.path(), args.volumes) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("== metadata: FAILED: {e}");
                meta_error = Some(e);
                None
            }
        }
    } else {
        None
    };
    let mut rebuild_error = None;
    let rebuild = if !args.skip_rebuild && !INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("== rebuild");
        match rebuild_bench(&ctx, work.path()) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("== rebuild: FAILED: {e}");
                rebuild_error = Some(e);
                None
            }
        }
    } else {
        None
    };
    let elapsed = started.elapsed().as_secs();
    let load_end = loadavg();

    let header = format!(
        "fio {} `--ioengine=nbd` over 127.0.0.1, volume {} MiB (large: {} MiB), {} s per workload after {} s ramp, \
         no flushes during runs (writes are write-back cached by every server), `sync` before each; data under {}. \
         Ratios: value/value (for latency rows, >1 = slower).{} Total {} s; \
         1-min load average {} at start, {} at end ({} CPUs).",
        fio_version.trim_start_matches("fio-"),
        ctx.size / MIB,
        ctx.large_size / MIB,
        ctx.runtime,
        ctx.ramp,
        base.display(),
        rounds_note(rounds.len()),
        elapsed,
        load_start,
        load_end,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    print!("{}", markdown(&results, &rounds, &header));
    if let Some(f) = &meta {
        print!("{}", metadata_markdown(f));
    }
    if let Some(f) = &rebuild {
        print!("{}", rebuild_markdown(f));
    }

    let mut failed = INTERRUPTED.load(Ordering::SeqCst);
    if let Some(path) = &args.json {
        let config = json!({
            "size_bytes": ctx.size,
            "runtime_s": ctx.runtime,
            "ramp_s": ctx.ramp,
            "dir": base.display().to_string(),
            "fio": fio_version,
            "torusd": ctx.torusd.display().to_string(),
            "rounds": rounds.len(),
            "elapsed_s": elapsed,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
        });
        let mut report = json_report(&results, &rounds, config);
        if let (Some(f), Some(obj)) = (&meta, report.as_object_mut()) {
            obj.insert("metadata".into(), metadata_json(f));
        }
        if let (Some(f), Some(obj)) = (&rebuild, report.as_object_mut()) {
            obj.insert("rebuild".into(), rebuild_json(f));
        }
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("torus-bench: cannot write {}: {e}", path.display());
            failed = true;
        }
    }
    for r in &results {
        if let Some(e) = &r.error {
            eprintln!("torus-bench: {} failed: {e}", r.kind.label());
        }
        for (id, o) in &r.outcomes {
            if let Outcome::Failed(e) = o {
                eprintln!("torus-bench: {} {id} failed: {e}", r.kind.label());
            }
        }
    }
    failed |= results.iter().any(ServerResult::failed);
    if let Some(e) = &meta_error {
        eprintln!("torus-bench: metadata timings failed: {e}");
        failed = true;
    }
    if let Some(e) = &rebuild_error {
        eprintln!("torus-bench: rebuild run failed: {e}");
        failed = true;
    }
    if failed || args.keep {
        let kept = work.keep();
        eprintln!("torus-bench: logs kept in {}", kept.join("logs").display());
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        ExitCode::from(130)
    } else if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(kind: Kind, iops: f64, failed: bool) -> ServerResult {
        let mut r = ServerResult::new(kind);
        let id = WORKLOADS[2].id;
        let outcome = if failed {
            Outcome::Failed("fio died".into())
        } else {
            Outcome::Done(Figures {
                bw_bytes: iops * 4096.0,
                iops,
                io_bytes: 1 << 30,
                clat_mean_us: 1e6 / iops,
                clat_p99_us: 2e6 / iops,
            })
        };
        r.outcomes.insert(id, outcome);
        r.rss = vec![(kind.id().to_string(), iops / 1000.0)];
        r
    }

    #[test]
    fn rounds_give_median_figures_paired_ratios_and_keep_failures() {
        let w = &WORKLOADS[2];
        let (a, b) = (Kind::ClusterQuic, Kind::ClusterTls);
        // The machine slows down in the second round; each round's ratio
        // is what the pair measured side by side.
        let rounds = vec![
            vec![result(b, 20_000.0, false), result(a, 18_000.0, false)],
            vec![result(b, 10_000.0, false), result(a, 9_000.0, false)],
            vec![result(b, 22_000.0, false), result(a, 17_600.0, false)],
        ];
        let merged = merge_rounds(&rounds);
        assert_eq!(merged.len(), 2);
        let tls = merged.iter().find(|r| r.kind == b).expect("tls merged");
        assert_eq!(cell(tls, w, false).1, Some(20_000.0), "median IOPS");
        assert_eq!(
            tls.rss,
            vec![(b.id().to_string(), 22.0)],
            "peak RSS is the max"
        );
        let mut ratios = round_ratios(&rounds, a, b, w, false);
        assert_eq!(ratios.len(), 3);
        assert!((quantile(&mut ratios, 0.5) - 0.9).abs() < 1e-9);
        assert!((quantile(&mut ratios, 0.0) - 0.8).abs() < 1e-9);
        let table = markdown(&merged, &rounds, "header");
        assert!(table.contains("0.90× (0.80–0.90)"), "{table}");

        // A failure in any round is not hidden by the others' medians.
        let rounds = vec![vec![result(b, 20_000.0, false)], vec![result(b, 0.0, true)]];
        let merged = merge_rounds(&rounds);
        assert!(merged[0].failed());
        // One round is that round's result unchanged.
        let one = merge_rounds(&[vec![result(a, 5.0, false)]]);
        assert_eq!(cell(&one[0], w, false).1, Some(5.0));
    }
}
