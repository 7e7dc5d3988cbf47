//! Attaching an open volume to a local block device, and the process that
//! keeps it attached.
//!
//! Two attachers, behind one interface:
//! - [`AttacherKind::Kernel`]: the kernel's NBD driver (`/dev/nbdN`), for
//!   production;
//! - [`AttacherKind::Nbdfuse`]: `nbdfuse` exposes the volume as a file and
//!   `losetup` turns that into `/dev/loopN`. **Test-only**: it lets the whole
//!   mount path run where the `nbd` module cannot be loaded (containers, CI).
//!   Selected with `TORUSBLK_ATTACHER=nbdfuse`.
//!
//! Both are fed by an NBD server on loopback in the same process, serving only
//! the one volume from a client-only node (or, with `torusblk nbd --server`,
//! by an existing NBD server such as the embedded single node). [`run`] is the body of the attach
//! process (`torusblk nbd`, and the daemon a FlexVolume `mount` leaves
//! behind): it reports one JSON line on stdout when the device is ready (or
//! why it is not), then serves until SIGTERM/SIGINT or until the device is
//! detached, and finally detaches, flushes and releases the volume's lock.

use crate::client::{self, ClientOptions, OneVolume};
use crate::fs::run_ok;
use crate::kernel::{self, Roots};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_traits::{Error, VolumeProvider};

/// Environment variable selecting the attacher (`kernel` or, for tests, `nbdfuse`).
pub const ATTACHER_ENV: &str = "TORUSBLK_ATTACHER";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttacherKind {
    Kernel,
    Nbdfuse,
}

impl AttacherKind {
    /// From `TORUSBLK_ATTACHER` (default `kernel`).
    pub fn from_env() -> Result<AttacherKind, String> {
        match std::env::var(ATTACHER_ENV).ok().as_deref() {
            None | Some("") | Some("kernel") => Ok(AttacherKind::Kernel),
            Some("nbdfuse") => Ok(AttacherKind::Nbdfuse),
            Some(other) => Err(format!(
                "{ATTACHER_ENV}={other:?} is not an attacher: use kernel (default) or nbdfuse (tests only)"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            AttacherKind::Kernel => "kernel",
            AttacherKind::Nbdfuse => "nbdfuse",
        }
    }
}

/// What the attach process needs.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub volume: String,
    pub etcd: String,
    pub etcd_tls: Option<torus_backends::metadata::EtcdTls>,
    /// How to reach the storage peers.
    pub peer: client::PeerOptions,
    pub kind: AttacherKind,
    /// Kernel: the `/dev/nbdN` to use (else the first free one).
    pub device: Option<PathBuf>,
    /// Nbdfuse: a private directory for the FUSE mount.
    pub work_dir: PathBuf,
    pub read_only: bool,
    pub trim: bool,
    /// Attach to this NBD server's export instead of serving the volume from
    /// a client-only node on etcd (single-node development: the embedded
    /// `torusd`, which then holds the volume's lock).
    pub server: Option<std::net::SocketAddr>,
}

/// The one line the attach process prints when it is ready or has failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// An attached device.
enum Attached {
    Kernel(kernel::KernelAttachment),
    Fuse(FuseAttachment),
}

struct FuseAttachment {
    dir: PathBuf,
    loopdev: Option<String>,
    child: Option<Child>,
}

impl FuseAttachment {
    fn attach(
        work_dir: &Path,
        server: std::net::SocketAddr,
        volume: &str,
        read_only: bool,
    ) -> Result<FuseAttachment, String> {
        let dir = work_dir.join("fuse");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let pidfile = work_dir.join("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("nbdfuse");
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .arg("-P")
            .arg(&pidfile)
            .arg(dir.join("disk"))
            .arg(format!("nbd://{server}/{volume}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run nbdfuse (install libnbd-bin): {e}"))?;
        let mut att = FuseAttachment {
            dir,
            loopdev: None,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pidfile.exists() {
            if let Some(Ok(Some(st))) = att.child.as_mut().map(|c| c.try_wait()) {
                att.child = None;
                let _ = att.cleanup();
                return Err(format!("nbdfuse exited ({st}) before it was ready"));
            }
            if Instant::now() > deadline {
                let _ = att.cleanup();
                return Err("nbdfuse did not come up within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut losetup = Command::new("losetup");
        losetup.args(["--find", "--show"]);
        if read_only {
            losetup.arg("--read-only");
        }
        match run_ok(losetup.arg(att.dir.join("disk")), Duration::from_secs(30)) {
            Ok(out) => att.loopdev = Some(out.trim().to_string()),
            Err(e) => {
                let _ = att.cleanup();
                return Err(e);
            }
        }
        Ok(att)
    }

    fn is_attached(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Detach the loop device, unmount FUSE, wait (bounded) for nbdfuse.
    fn cleanup(&mut self) -> Result<(), String> {
        let mut first_err = None;
        if let Some(l) = self.loopdev.take() {
            if let Err(e) = run_ok(
                Command::new("losetup").arg("-d").arg(&l),
                Duration::from_secs(30),
            ) {
                first_err.get_or_insert(e);
            }
        }
        let _ = run_ok(
            Command::new("fusermount3").arg("-u").arg(&self.dir),
            Duration::from_secs(30),
        );
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for FuseAttachment {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

impl Attached {
    fn device(&self) -> PathBuf {
        match self {
            Attached::Kernel(k) => k.device.clone(),
            Attached::Fuse(f) => PathBuf::from(f.loopdev.clone().unwrap_or_default()),
        }
    }
    fn is_attached(&mut self) -> bool {
        match self {
            Attached::Kernel(k) => k.is_attached(),
            Attached::Fuse(f) => f.is_attached(),
        }
    }
    fn detach(self) -> Result<(), String> {
        match self {
            Attached::Kernel(k) => k.detach(),
            Attached::Fuse(mut f) => f.cleanup(),
        }
    }
}

fn print_ready(r: &Ready) {
    use std::io::Write;
    let line = serde_json::to_string(r).unwrap_or_else(|_| "{}".into());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Explain a failure to open a volume in words a person can act on.
fn open_error(volume: &str, etcd: &str, e: Error) -> String {
    match e {
        Error::NotFound(_) => format!(
            "volume {volume:?} does not exist in the cluster at etcd {etcd}: create it with `torusctl --etcd {etcd} volume create-block {volume} SIZE`"
        ),
        Error::Locked(why) => format!(
            "volume {volume:?} is in use elsewhere ({why}): unmount it there first, or wait for that node's lease to lapse if it died"
        ),
        other => format!("cannot open volume {volume:?}: {other}"),
    }
}

/// The attach process: connect, open, attach, report, serve, detach, release.
/// Returns the process exit status.
pub async fn run(req: AttachRequest) -> i32 {
    let fail = |e: String| {
        tracing::error!("{e}");
        print_ready(&Ready {
            device: None,
            error: Some(e),
        });
        1
    };
    // Fail fast on the device before touching the cluster.
    let roots = Roots::default();
    let device = match req.kind {
        AttacherKind::Kernel => match kernel::find_device(&roots, req.device.as_deref()) {
            Ok(d) => Some(d),
            Err(e) => return fail(e),
        },
        AttacherKind::Nbdfuse => None,
    };
    let (addr, local) = match req.server {
        Some(addr) => (addr, None),
        None => match Local::open(&req).await {
            Ok(l) => (l.server.addr, Some(l)),
            Err(e) => return fail(e),
        },
    };
    let (volume, read_only, trim, work_dir) = (
        req.volume.clone(),
        req.read_only,
        req.trim,
        req.work_dir.clone(),
    );
    let chosen = req.device.is_some();
    let attached = tokio::task::spawn_blocking(move || match device {
        Some(mut dev) => {
            // Another attach may take the same free device between the
            // sysfs check and NBD_SET_SOCK (EBUSY): pick again, a few times.
            let mut attempts = 0;
            loop {
                match kernel::attach(&roots, &dev, addr, &volume, read_only, trim) {
                    Ok(k) => return Ok(Attached::Kernel(k)),
                    Err(e) if !chosen && attempts < 3 && e.contains("busy") => {
                        attempts += 1;
                        tracing::warn!("{e}: trying another device");
                        dev = kernel::find_device(&roots, None)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        None => FuseAttachment::attach(&work_dir, addr, &volume, read_only).map(Attached::Fuse),
    })
    .await
    .unwrap_or_else(|e| Err(format!("attach task failed: {e}")));
    let mut attached = match attached {
        Ok(a) => a,
        Err(e) => {
            if let Some(l) = local {
                let _ = l.close().await;
            }
            return fail(e);
        }
    };
    let dev = attached.device();
    tracing::info!(volume = %req.volume, device = %dev.display(), attacher = req.kind.name(), "attached");
    print_ready(&Ready {
        device: Some(dev.clone()),
        error: None,
    });

    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers: detaching");
            return finish(attached, local).await;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: detaching"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: detaching"); break; }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if !attached.is_attached() {
                    tracing::info!(device = %dev.display(), "the device was detached");
                    break;
                }
                if local.as_ref().is_some_and(|l| l.server.is_finished()) {
                    tracing::error!("the local NBD server stopped: detaching");
                    break;
                }
            }
        }
    }
    finish(attached, local).await
}

/// The volume served from a client-only node on etcd, on loopback.
struct Local {
    node: torus::node::Node,
    opts: ClientOptions,
    /// Held open (the writer lock) for the process's life: the NBD
    /// connections share this open, and a lock conflict shows at once.
    handle: Arc<dyn torus_traits::BlockDevice>,
    server: client::Server,
}

impl Local {
    async fn open(req: &AttachRequest) -> Result<Local, String> {
        let mut opts = ClientOptions::new(&req.etcd, req.etcd_tls.clone());
        opts.peer = req.peer.clone();
        let node = client::connect(&opts).await.map_err(|e| e.to_string())?;
        let provider = Arc::new(OneVolume {
            node: node.clone(),
            name: req.volume.clone(),
        });
        let handle = match provider.open(&req.volume, req.read_only).await {
            Ok(h) => h,
            Err(e) => {
                let _ = client::leave(node, &opts).await;
                return Err(open_error(&req.volume, &req.etcd, e));
            }
        };
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        match client::serve(provider, loopback, req.read_only).await {
            Ok(server) => Ok(Local {
                node,
                opts,
                handle,
                server,
            }),
            Err(e) => {
                let _ = client::leave(node, &opts).await;
                drop(handle);
                Err(format!("cannot start the local NBD server: {e}"))
            }
        }
    }

    /// Stop serving, flush, release the lock and the lease.
    async fn close(self) -> Result<(), String> {
        let mut first_err = None;
        self.server.stop().await;
        if let Err(e) = self.handle.flush().await {
            first_err.get_or_insert(format!("flushing the volume: {e}"));
        }
        // Shut down with the handle still open, so the node flushes, fences
        // and releases the lock itself (dropping it first would leave that to
        // a background task racing with the shutdown).
        if let Err(e) = client::leave(self.node, &self.opts).await {
            first_err.get_or_insert(format!("releasing the volume: {e}"));
        }
        drop(self.handle);
        first_err.map_or(Ok(()), Err)
    }
}

async fn finish(attached: Attached, local: Option<Local>) -> i32 {
    let mut status = 0;
    if let Err(e) = tokio::task::spawn_blocking(move || attached.detach())
        .await
        .unwrap_or_else(|e| Err(format!("detach task failed: {e}")))
    {
        tracing::error!("detaching: {e}");
        status = 1;
    }
    if let Some(l) = local {
        if let Err(e) = l.close().await {
            tracing::error!("{e}");
            status = 1;
        }
    }
    tracing::info!("detached and released");
    status
}
