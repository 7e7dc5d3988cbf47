//! Harness for multi-process tests: real `torusd` processes, `torusctl`, and
//! real NBD clients (`nbdinfo`, `nbdcopy`, `qemu-img`, `fio`, `nbdfuse`).
//!
//! Tests never pass by skipping: a missing program is a failure whose message
//! says what to install (`scripts/deps.sh test` installs everything).

pub mod blockdev;
pub mod etcd;
pub mod nbd;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; fails clearly when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which scripts/test does)",
        p.display()
    );
    p
}

/// Run `torusctl --etcd ENDPOINT ARGS` that must succeed; returns stdout.
pub fn ctl_etcd(etcd: &str, args: &[&str]) -> String {
    run_ok(
        Command::new(bin("torusctl"))
            .args(["--etcd", etcd])
            .args(args),
        Duration::from_secs(30),
    )
}

/// `torusctl --etcd ENDPOINT list-peers --json`, parsed: one value per peer.
pub fn peers_json(etcd: &str) -> Vec<serde_json::Value> {
    let out = ctl_etcd(etcd, &["list-peers", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .expect("list-peers json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Poll `ok` every 250 ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Fail with an install hint when an external program is missing.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    let pkg = match program {
        "nbdinfo" | "nbdcopy" | "nbdfuse" | "nbdsh" => "libnbd-bin",
        "qemu-img" | "qemu-nbd" => "qemu-utils",
        "mkfs.ext4" | "fsck.ext4" => "e2fsprogs",
        "fusermount3" => "fuse3",
        "etcd" => "etcd-server",
        other => other,
    };
    assert!(
        found,
        "`{program}` is not installed: install the Debian package `{pkg}` (scripts/deps.sh test does it)"
    );
}

/// Run a command to completion with a time limit; returns its output.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let out = child.wait_with_output().ok();
                panic!(
                    "{desc} did not finish within {limit:?}; stderr: {}",
                    out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                        .unwrap_or_default()
                );
            }
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
    }
    child.wait_with_output().expect("collect output")
}

/// Run a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run_with_timeout(cmd, limit);
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `torusd` process on loopback with its own data directory and free ports.
pub struct Torusd {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub nbd: SocketAddr,
    pub admin: String,
    /// Peer address (`IP:PORT`) when the node listens for peers.
    pub peer: Option<String>,
    /// The node's persistent UUID.
    pub id: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
}

impl Torusd {
    /// Start a node on `data_dir` with extra flags; waits until it serves.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Torusd {
        Torusd::start_env(data_dir, extra, &[])
    }

    /// Start a node with extra flags and environment variables.
    pub fn start_env(data_dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Torusd {
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut t = Torusd {
            child: None,
            data_dir: data_dir.to_path_buf(),
            nbd: "127.0.0.1:0".parse().expect("addr"),
            admin: String::new(),
            peer: None,
            id: String::new(),
            args,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: data_dir.with_extension("log"),
        };
        t.spawn("127.0.0.1:0", "0");
        t
    }

    /// Start a cluster node on etcd at `etcd` (`HOST:PORT`), listening for
    /// peers on a free loopback port, with a short lease so failures show fast.
    pub fn start_cluster(data_dir: &Path, etcd: &str, extra: &[&str]) -> Torusd {
        let mut args = vec![
            "--etcd",
            etcd,
            "--peer-address",
            "127.0.0.1:0",
            "--auto-join",
        ];
        args.extend_from_slice(extra);
        Torusd::start_env(data_dir, &args, &[("TORUS_NODE__LEASE_TTL", "3s")])
    }

    fn spawn(&mut self, nbd: &str, port: &str) {
        std::fs::create_dir_all(&self.data_dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut child = Command::new(bin("torusd"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--nbd-listen", nbd, "--host", "127.0.0.1", "--port", port])
            .args(&self.args)
            .env_remove("TORUS_LOG")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn torusd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("torusd ready:") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "torusd did not become ready in 60 s; its log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
        };
        // "torusd ready: nbd=127.0.0.1:PORT admin=http://127.0.0.1:PORT id=UUID"
        for word in line.split_whitespace() {
            if let Some(a) = word.strip_prefix("nbd=") {
                self.nbd = a.parse().expect("nbd addr in ready line");
            } else if let Some(a) = word.strip_prefix("admin=") {
                self.admin = a.to_string();
            } else if let Some(a) = word.strip_prefix("peer=") {
                self.peer = (a != "off").then(|| a.to_string());
            } else if let Some(a) = word.strip_prefix("id=") {
                self.id = a.to_string();
            }
        }
        self.child = Some(child);
    }

    /// `nbd://HOST:PORT/VOLUME`
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{}", self.nbd, volume)
    }

    /// Run `torusctl --server <this node> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new(bin("torusctl"))
                .arg("--server")
                .arg(&self.admin)
                .args(args),
            Duration::from_secs(30),
        )
    }

    /// `torusctl` that must succeed; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "torusctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// SIGKILL, as a crash or power cut of the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY-free: use the kill command rather than libc.
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "torusd did not exit within 30 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start again on the same data directory and the same ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        let nbd = self.nbd.to_string();
        let port = self.admin.rsplit(':').next().unwrap_or("0").to_string();
        if let Some(peer) = &self.peer {
            // Come back on the same peer address, as a rebooted host would.
            self.args
                .extend(["--peer-address".to_string(), peer.clone()]);
        }
        // The old ports may linger briefly in TIME_WAIT; retry for a while.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.spawn(&nbd, &port)));
            match r {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => std::panic::resume_unwind(e),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Torusd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so no test depends on /dev/urandom timing.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// crc32-free checksum for comparing files in tests (FNV-1a 64).
pub fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
