//! A client-only node: how `torusblk` reaches volumes.
//!
//! It connects to the cluster's etcd, takes a lease and a peer identity (a
//! volume's writer lock is bound to the holder's lease), and reads and writes
//! chunks on the storage peers over the cluster's peer transport (TCP, TCP
//! with mutual TLS, or QUIC; [`PeerOptions`]). It contributes no pool (an empty,
//! zero-capacity store), never joins the ring and does not listen for peers.
//! It is built from the engine's public parts, so `torusd` is unchanged.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use torus::node::{Node, NodeOptions};
use torus_backends::metadata::{EtcdConfig, EtcdMetadata, EtcdTls};
use torus_backends::storage::MemoryBlockStore;
use torus_frontends::nbd::{NbdFrontend, NbdOptions};
use torus_traits::{
    BlockDevice, Error, ExportInfo, Frontend, MetadataStore, PeerId, PeerTransport, Result,
    VolumeProvider,
};

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// etcd endpoints, `HOST:PORT[,HOST:PORT…]`.
    pub etcd: String,
    /// Lease TTL: after a crash of this process, its volume locks lapse after this.
    pub lease_ttl: Duration,
    /// What other nodes and `torusctl` show as the lock holder's address.
    pub address: String,
    /// TLS towards etcd.
    pub tls: Option<EtcdTls>,
    /// How to reach the storage peers.
    pub peer: PeerOptions,
}

/// How a client reaches the storage peers: the cluster's transport, and a
/// certificate signed by the cluster CA when peers use TLS (QUIC always
/// does). Same meaning as torusd's `[transport] kind` and `[transport.tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOptions {
    /// `tcp` or `quic`.
    pub kind: torus::config::TransportKind,
    pub tls: Option<torus_transports::TlsFiles>,
}

impl Default for PeerOptions {
    fn default() -> Self {
        PeerOptions {
            kind: torus::config::TransportKind::Tcp,
            tls: None,
        }
    }
}

/// Peer options from their textual forms (flags or FlexVolume options):
/// `kind` is `tcp` (default) or `quic`; the certificate, key and CA go
/// together; QUIC needs them.
pub fn peer_options(
    kind: Option<&str>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> std::result::Result<PeerOptions, String> {
    use torus::config::TransportKind;
    let kind = match kind.map(str::trim) {
        None | Some("") | Some("tcp") => TransportKind::Tcp,
        Some("quic") => TransportKind::Quic,
        Some(other) => {
            return Err(format!(
                "peer transport {other:?} is not one of tcp, quic (use the storage nodes' [transport] kind)"
            ))
        }
    };
    let tls = match (cert, key, ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), Some(ca)) => Some(torus_transports::TlsFiles { cert, key, ca }),
        _ => return Err(
            "the peer certificate, its key and the cluster CA go together: give all three or none"
                .into(),
        ),
    };
    if kind == TransportKind::Quic && tls.is_none() {
        return Err(
            "peer transport quic needs a certificate from the cluster CA: the peer certificate, key and CA files (see `torusctl certs node`)"
                .into(),
        );
    }
    Ok(PeerOptions { kind, tls })
}

/// TLS towards etcd from the three file options: a CA alone (server
/// verified), or a CA with a client certificate and its key.
pub fn etcd_tls(
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> std::result::Result<Option<EtcdTls>, String> {
    match (ca_file, cert_file, key_file) {
        (None, None, None) => Ok(None),
        (Some(ca_file), cert_file, key_file) if cert_file.is_some() == key_file.is_some() => {
            Ok(Some(EtcdTls {
                ca_file,
                cert_file,
                key_file,
            }))
        }
        (None, _, _) => Err(
            "an etcd client certificate needs the CA that signed etcd's certificate too (etcd CA file)"
                .into(),
        ),
        _ => Err("the etcd client certificate and key go together: give both or neither".into()),
    }
}

impl ClientOptions {
    pub fn new(etcd: &str, tls: Option<EtcdTls>) -> ClientOptions {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        ClientOptions {
            etcd: etcd.to_string(),
            lease_ttl: Duration::from_secs(10),
            address: format!("torusblk@{host}"),
            tls,
            peer: PeerOptions::default(),
        }
    }
}

/// Connect to the cluster's etcd.
async fn open_meta(opts: &ClientOptions) -> Result<Arc<dyn MetadataStore>> {
    let endpoints: Vec<String> = opts
        .etcd
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(Error::InvalidArgument("no etcd endpoint given".into()));
    }
    let cfg = EtcdConfig {
        endpoints,
        dial_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        tls: opts.tls.clone(),
    };
    let meta = EtcdMetadata::connect(cfg)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach etcd at {}: {e}", opts.etcd)))?;
    Ok(Arc::new(meta))
}

/// Connect to the cluster and start a client-only node.
pub async fn connect(opts: &ClientOptions) -> Result<Node> {
    let meta = open_meta(opts).await?;
    let cluster = torus::cluster::get(&*meta).await?.ok_or_else(|| {
        Error::NotFound(format!(
            "no torus cluster on etcd {}: run `torusctl --etcd {} init` and start torusd nodes first",
            opts.etcd, opts.etcd
        ))
    })?;
    // The same construction as torusd's, from the same settings.
    let mut cfg = torus::config::Config::default();
    cfg.transport.kind = Some(opts.peer.kind);
    if let Some(files) = &opts.peer.tls {
        cfg.transport.tls.cert = Some(files.cert.clone());
        cfg.transport.tls.key = Some(files.key.clone());
        cfg.transport.tls.ca = Some(files.ca.clone());
    }
    let (transport, _tls) = torus::compose::open_transport(&cfg)?;
    let transport: Option<Arc<dyn PeerTransport>> = transport;
    let node_opts = NodeOptions {
        id: PeerId::random(),
        address: opts.address.clone(),
        transport,
        peer_listen: None,
        peer_advertise: None,
        lease_ttl: opts.lease_ttl,
        auto_join: false,
        // A client never holds data, so it never takes peers out of the ring.
        healing: torus::node::Healing {
            down_out_interval: None,
            ..Default::default()
        },
    };
    let store = Arc::new(MemoryBlockStore::new(cluster.chunk_size, 0));
    Node::start(node_opts, meta, store, cluster).await
}

/// Shut the client-only node down (flush, release its locks and lease),
/// then delete the peer record it leaves behind: each attach has an identity
/// of its own, and its record would otherwise stay in etcd for good.
pub async fn leave(node: Node, opts: &ClientOptions) -> Result<()> {
    let id = node.id();
    let shutdown = node.shutdown().await;
    // A fresh connection: the node closed its own.
    match open_meta(opts).await {
        Ok(meta) => {
            if let Err(e) = torus::peers::forget(&*meta, id).await {
                tracing::warn!("cannot delete this client's peer record: {e}");
            }
            let _ = meta.close().await;
        }
        Err(e) => tracing::warn!("cannot delete this client's peer record: {e}"),
    }
    shutdown
}

/// A provider exposing only one volume of a node: the attach daemon's local
/// NBD server must not hand other volumes to whoever connects to it.
pub struct OneVolume {
    pub node: Node,
    pub name: String,
}

impl OneVolume {
    fn check(&self, name: &str) -> Result<()> {
        if name == self.name {
            Ok(())
        } else {
            Err(Error::NotFound(format!(
                "volume {name:?} is not served here (only {:?})",
                self.name
            )))
        }
    }
}

#[async_trait::async_trait]
impl VolumeProvider for OneVolume {
    async fn list(&self) -> Result<Vec<ExportInfo>> {
        Ok(vec![self.node.info(&self.name).await?])
    }
    async fn info(&self, name: &str) -> Result<ExportInfo> {
        self.check(name)?;
        self.node.info(name).await
    }
    async fn open(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        self.check(name)?;
        self.node.open(name, read_only).await
    }
}

/// An NBD server running in the background until stopped.
pub struct Server {
    pub addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// Serve `provider` over NBD on `listen`.
pub async fn serve(
    provider: Arc<dyn VolumeProvider>,
    listen: SocketAddr,
    read_only: bool,
) -> Result<Server> {
    let options = NbdOptions {
        read_only,
        ..NbdOptions::default()
    };
    let nbd = NbdFrontend::bind(listen, provider, options).await?;
    let addr = nbd
        .local_addr()
        .ok_or_else(|| Error::Other("the NBD server has no address".into()))?;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move { nbd.serve(rx).await });
    Ok(Server { addr, stop, task })
}

impl Server {
    /// Stop accepting, let in-flight requests finish (bounded), return.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("NBD server stopped with an error: {e}"),
            Ok(Err(e)) => tracing::warn!("NBD server task failed: {e}"),
            Err(_) => tracing::warn!("NBD server did not stop within 30 s"),
        }
    }

    /// Whether the server task ended on its own.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}
