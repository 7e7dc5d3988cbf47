//! A real single-member etcd server for tests.
//!
//! [`EtcdServer::start`] runs the `etcd` binary (Debian `etcd-server`) on free
//! loopback ports with its own temporary data directory and returns once the
//! server reports itself healthy. The process is killed when the value is
//! dropped, so a failing test never leaves an etcd behind.
//!
//! The server runs with a 50 ms heartbeat and a 500 ms election timeout, so
//! its minimum lease TTL is 1 s (etcd's minimum is 1.5 × the election
//! timeout, rounded up to whole seconds) and short test leases expire close
//! to their TTL.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `etcd-server` installs the server.
const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long a start or restart may take before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits for the process to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh port pairs tried by `start` when another process grabbed a port
/// between our probe and etcd's bind.
const PORT_ATTEMPTS: usize = 5;
/// The member name (also in `--initial-cluster`).
const NAME: &str = "torus-test";

/// Certificate files for an etcd serving its clients over TLS (PEM).
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// The server certificate (valid for `127.0.0.1`).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, etcd requires client certificates signed by this CA
    /// (`--client-cert-auth`).
    pub client_ca_file: Option<PathBuf>,
}

/// A throw-away CA with a server certificate for `127.0.0.1`/`localhost`
/// and a client certificate, made by the `openssl` command.
#[derive(Debug, Clone)]
pub struct TestCertificates {
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestCertificates {
    /// Generate into `dir` (EC P-256 keys, valid for a day).
    pub fn generate(dir: &Path) -> TestCertificates {
        crate::require("openssl");
        std::fs::create_dir_all(dir).expect("certificate directory");
        let p = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| {
            crate::run_ok(
                Command::new("openssl").current_dir(dir).args(args),
                Duration::from_secs(30),
            );
        };
        // EC P-256 keys: fast to make, accepted by etcd (Go) and rustls.
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let run = |line: String| {
            let args: Vec<&str> = line.split(' ').collect();
            openssl(&args);
        };
        run(format!(
            "req -x509 {ec} -keyout ca.key -out ca.pem -days 1 -subj /CN=torus-test-ca"
        ));
        std::fs::write(
            p("leaf.ext"),
            "basicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("write leaf.ext");
        for (name, cn) in [("server", "127.0.0.1"), ("client", "torus-test-client")] {
            run(format!(
                "req {ec} -keyout {name}.key -out {name}.csr -subj /CN={cn}"
            ));
            run(format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                 -out {name}.pem -days 1 -extfile leaf.ext"
            ));
        }
        TestCertificates {
            ca_file: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
        }
    }

    /// Server-side files: this server certificate, client certificates
    /// required and checked against this CA.
    pub fn server_tls(&self) -> EtcdServerTls {
        EtcdServerTls {
            cert_file: self.server_cert.clone(),
            key_file: self.server_key.clone(),
            client_ca_file: Some(self.ca_file.clone()),
        }
    }
}

/// A running (or stopped) etcd process with fixed ports and data directory.
pub struct EtcdServer {
    child: Option<Child>,
    /// Holds the data directory and the log; removed on drop.
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` (and `/metrics`), also when clients use TLS.
    metrics_port: u16,
    tls: Option<EtcdServerTls>,
}

impl EtcdServer {
    /// Start etcd on free loopback ports and wait until it is healthy.
    ///
    /// Panics (with the server's log) when it does not become healthy within
    /// 30 s, and with an install hint when the binary is missing.
    pub fn start() -> EtcdServer {
        Self::start_with(None)
    }

    /// Like [`start`](Self::start), serving clients over TLS only
    /// (`https://`); [`endpoint`](Self::endpoint) stays `127.0.0.1:PORT`.
    pub fn start_tls(tls: EtcdServerTls) -> EtcdServer {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdServerTls>) -> EtcdServer {
        assert!(
            Path::new(ETCD_BIN).is_file(),
            "{ETCD_BIN} is missing: install etcd-server (scripts/deps.sh test does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("torus-etcd-")
            .tempdir()
            .expect("create a temporary directory for etcd");
        let mut server = EtcdServer {
            child: None,
            dir,
            client_port: 0,
            peer_port: 0,
            metrics_port: 0,
            tls,
        };
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            [server.client_port, server.peer_port, server.metrics_port] = free_ports();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => {
                    // A fresh member directory for the next attempt: etcd
                    // records its peer URL in the data directory.
                    let _ = std::fs::remove_dir_all(server.data_dir());
                    last_error = e;
                }
            }
        }
        panic!("etcd did not start after {PORT_ATTEMPTS} attempts; last: {last_error}");
    }

    /// The client address, `127.0.0.1:PORT` (no scheme).
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The client URL, `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.endpoint())
    }

    /// The member's data directory (kept across `stop`/`kill` and `restart`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL and reap, as a crash. Does nothing when not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after 10 s). Does nothing
    /// when not running.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .stdin(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// SIGSTOP: the process stays, its sockets accept connections, but it
    /// answers nothing — a hung server. [`resume`](Self::resume) undoes it;
    /// `kill` and drop work on a paused server too.
    pub fn pause(&mut self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.pid().expect("etcd is not running");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid} failed: {status}");
    }

    /// Start again on the same ports and data directory (keys, revisions
    /// and leases survive) and wait until healthy. Stops a running server
    /// first.
    pub fn restart(&mut self) {
        self.stop();
        // The old listening sockets may need a moment to be released.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("etcd did not restart on {}: {e}", self.endpoint())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The server's log (stdout and stderr of every run).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Run the binary and wait for `/health`; on failure the process is
    /// killed and the reason (with the log's tail) returned.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open the etcd log: {e}"))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open the etcd log: {e}"))?;
        let log_start = std::fs::metadata(self.log_path())
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let client_url = self.url();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let metrics_url = format!("http://127.0.0.1:{}", self.metrics_port);
        let mut cmd = Command::new(ETCD_BIN);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.cert_file);
            cmd.arg("--key-file").arg(&tls.key_file);
            if let Some(ca) = &tls.client_ca_file {
                cmd.arg("--trusted-ca-file").arg(ca);
                cmd.arg("--client-cert-auth");
            }
        }
        let child = cmd
            .arg("--name")
            .arg(NAME)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("{NAME}={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--listen-metrics-urls", &metrics_url])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            // The environment must not reconfigure the test server.
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("cannot run {ETCD_BIN}: {e}"))?;
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "etcd exited during start-up ({status}); log:\n{}",
                        tail(&self.log_text(), log_start)
                    ));
                }
            }
            if healthy(self.metrics_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "etcd was not healthy on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.endpoint(),
                    tail(&self.log_text(), log_start)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Distinct free loopback ports: all are held until every one is chosen,
/// then released for etcd to bind.
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free loopback port for etcd")
        })
        .collect();
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&listeners) {
        *port = l.local_addr().expect("local addr").port();
    }
    ports
}

/// `GET /health` on the (plain HTTP) metrics port answers `"health":"true"`.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.contains("\"health\":\"true\"")
}

/// The log written since `start` (at most the last 4 KiB of it).
fn tail(log: &str, start: usize) -> String {
    let run = log.get(start..).unwrap_or(log);
    let mut from = run.len().saturating_sub(4096);
    while !run.is_char_boundary(from) {
        from += 1;
    }
    run[from..].to_string()
}
