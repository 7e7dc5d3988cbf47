//! Composition: the one place where a [`Config`] picks implementations and
//! turns into a running node with its frontends and admin endpoint.
//!
//! Order matters: metadata first (it holds the cluster record, which fixes the
//! chunk size), then the block store, then the node, then the listeners — all
//! listeners are bound before anything is served, so a port in use fails the
//! start with a clear error instead of a half-running node.

use crate::admin;
use crate::cluster::{self, ClusterRecord, InitParams};
use crate::config::{Config, MetadataBackend, StorageBackend, TransportKind};
use crate::control::MetaControl;
use crate::node::{Healing, Node, NodeOptions};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use torus_backends::metadata::{EtcdConfig, EtcdMetadata, EtcdTls, MemoryMetadata, SledMetadata};
use torus_backends::storage::{FileBlockStore, MemoryBlockStore, MmapBlockStore, ObjectBlockStore};
use torus_frontends::nbd::{NbdFrontend, NbdOptions};
use torus_traits::{
    BlockStore, Error, Frontend, MetadataStore, PeerId, PeerTransport, Result, VolumeProvider,
};
use torus_transports::{PeerTls, QuicOptions, QuicTransport, TcpOptions, TcpTransport};

/// A node with its services running.
pub struct RunningNode {
    pub node: Node,
    pub nbd_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// Peer TLS certificates, when configured: [`PeerTls::reload`] on SIGHUP.
    pub peer_tls: Option<Arc<PeerTls>>,
    stop: tokio::sync::watch::Sender<bool>,
    services: Vec<(&'static str, JoinHandle<Result<()>>)>,
}

impl RunningNode {
    /// Stop serving (frontends finish in-flight requests and flush), then
    /// flush the node, release its locks and lease, and close metadata.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        for (name, task) in self.services {
            match tokio::time::timeout(Duration::from_secs(15), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("{name} stopped with an error: {e}"),
                Ok(Err(e)) => tracing::warn!("{name} task failed: {e}"),
                Err(_) => tracing::warn!("{name} did not stop within 15 s"),
            }
        }
        self.node.shutdown().await
    }

    /// Wait until a service ends on its own (an error), returning it.
    pub fn services_mut(&mut self) -> &mut Vec<(&'static str, JoinHandle<Result<()>>)> {
        &mut self.services
    }
}

/// Read or create the node's persistent identity in `data_dir/peer-id`.
pub fn load_or_create_id(data_dir: &Path) -> Result<PeerId> {
    let path = data_dir.join("peer-id");
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = PeerId::random();
            let tmp = data_dir.join("peer-id.tmp");
            std::fs::write(&tmp, format!("{id}\n"))
                .map_err(|e| Error::io(tmp.display().to_string(), e))?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(path.display().to_string(), e))?;
            Ok(id)
        }
        Err(e) => Err(Error::io(path.display().to_string(), e)),
    }
}

/// Open the configured metadata store.
pub async fn open_metadata(cfg: &Config) -> Result<Arc<dyn MetadataStore>> {
    Ok(match cfg.metadata.backend {
        MetadataBackend::Memory => Arc::new(MemoryMetadata::new()),
        MetadataBackend::Sled => Arc::new(SledMetadata::open(&cfg.data_dir.join("metadata"))?),
        MetadataBackend::Etcd => {
            let m = &cfg.metadata;
            let tls = m.ca_file.clone().map(|ca_file| EtcdTls {
                ca_file,
                cert_file: m.cert_file.clone(),
                key_file: m.key_file.clone(),
            });
            let ecfg = EtcdConfig {
                endpoints: m.endpoints.clone(),
                dial_timeout: m.dial_timeout,
                request_timeout: m.request_timeout,
                tls,
            };
            Arc::new(EtcdMetadata::connect(ecfg).await?)
        }
    })
}

/// The cluster record: read it, create it (`auto_init`), or wait for
/// `torusctl init`.
pub async fn cluster_record(cfg: &Config, meta: &dyn MetadataStore) -> Result<ClusterRecord> {
    let mut waited = false;
    loop {
        if let Some(c) = cluster::get(meta).await? {
            return Ok(c);
        }
        if cfg.auto_init() {
            let params = InitParams {
                chunk_size: cfg.cluster.block_size.0,
                replication: cfg.cluster.replication,
            };
            match cluster::init(meta, params).await {
                Ok(c) => {
                    tracing::info!(
                        chunk_size = c.chunk_size,
                        replication = c.replication,
                        "initialised a new cluster"
                    );
                    return Ok(c);
                }
                Err(Error::AlreadyExists(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        if !waited {
            tracing::warn!("the cluster is not initialised: waiting for `torusctl init`");
            waited = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Open the configured block store for `chunk_size`.
pub async fn open_store(cfg: &Config, chunk_size: u64) -> Result<Arc<dyn BlockStore>> {
    let cap = cfg.storage.size.0;
    let dir = cfg.data_dir.join("blocks");
    Ok(match cfg.storage.backend {
        StorageBackend::Memory => Arc::new(MemoryBlockStore::new(chunk_size, cap)),
        StorageBackend::File => Arc::new(FileBlockStore::open(&dir, chunk_size, cap)?),
        StorageBackend::Mmap => Arc::new(MmapBlockStore::open(&dir, chunk_size, cap)?),
        StorageBackend::Object => {
            let url = cfg.storage.url.as_deref().ok_or_else(|| {
                Error::InvalidArgument("storage.url is required for the object backend".into())
            })?;
            let cache = cfg.data_dir.join("object-cache");
            Arc::new(ObjectBlockStore::from_url(url, &cache, chunk_size, cap).await?)
        }
    })
}

/// A node's peer transport (none without peers) and its TLS certificates.
pub type PeerSetup = (Option<Arc<dyn PeerTransport>>, Option<Arc<PeerTls>>);

/// The configured peer transport (none for a node without peers), with its
/// TLS certificates when `[transport.tls]` is set. Certificates are checked
/// for changes every `reload_interval` for as long as they are in use.
pub fn open_transport(cfg: &Config) -> Result<PeerSetup> {
    let kind = cfg.transport_kind();
    let tls = match (kind, cfg.transport.tls.files()) {
        (TransportKind::None, _) | (_, None) => None,
        (_, Some(files)) => {
            let tls = PeerTls::load(files)?;
            let every = cfg.transport.tls.reload_interval;
            if !every.is_zero() {
                tls.watch(every);
            }
            Some(tls)
        }
    };
    let transport: Option<Arc<dyn PeerTransport>> = match kind {
        TransportKind::None => None,
        TransportKind::Tcp => Some(Arc::new(TcpTransport::new(TcpOptions {
            tls: tls.clone(),
            ..TcpOptions::default()
        }))),
        TransportKind::Quic => {
            let tls = tls.clone().ok_or_else(|| {
                Error::InvalidArgument("transport kind \"quic\" needs [transport.tls]".into())
            })?;
            Some(Arc::new(QuicTransport::new(QuicOptions::new(tls))))
        }
    };
    Ok((transport, tls))
}

async fn bind(what: &str, addr: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("cannot listen for {what} on {addr}"), e))
}

/// Build and start everything `cfg` describes.
pub async fn start(cfg: &Config) -> Result<RunningNode> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        Error::io(
            format!("cannot create data dir {}", cfg.data_dir.display()),
            e,
        )
    })?;
    let admin_addr = cfg.admin_addr();
    // Bind first: a port in use must fail before anything else starts.
    let admin_listener = bind("the admin endpoint", &admin_addr).await?;
    let nbd_addr: Option<SocketAddr> = if cfg.nbd.enabled {
        Some(cfg.nbd.listen.parse().map_err(|_| {
            Error::InvalidArgument(format!("nbd.listen {:?} is not an address", cfg.nbd.listen))
        })?)
    } else {
        None
    };
    let id = load_or_create_id(&cfg.data_dir)?;
    let meta = open_metadata(cfg).await?;
    let cluster = cluster_record(cfg, &*meta).await?;
    let store = open_store(cfg, cluster.chunk_size).await?;
    let address = cfg
        .node
        .address
        .clone()
        .unwrap_or_else(|| format!("nbd://{}", cfg.nbd.listen));
    let (transport, peer_tls) = open_transport(cfg)?;
    let peer_listen = transport.is_some().then(|| cfg.transport.listen.clone());
    let opts = NodeOptions {
        id,
        address,
        transport,
        peer_listen,
        peer_advertise: cfg.transport.advertise.clone(),
        lease_ttl: cfg.node.lease_ttl,
        auto_join: cfg.auto_join(),
        healing: Healing {
            down_out_interval: (!cfg.cluster.down_out_interval.is_zero())
                .then_some(cfg.cluster.down_out_interval),
            rebalance_rate: cfg.cluster.rebalance_rate.0,
            scrub_interval: (!cfg.cluster.scrub_interval.is_zero())
                .then_some(cfg.cluster.scrub_interval),
            scrub_rate: cfg.cluster.scrub_rate.0,
        },
    };
    let node = Node::start(opts, meta.clone(), store, cluster).await?;

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut services: Vec<(&'static str, JoinHandle<Result<()>>)> = Vec::new();
    let mut nbd_bound = None;
    if let Some(addr) = nbd_addr {
        let options = NbdOptions {
            max_request: cfg.nbd.max_request.0 as u32,
            max_in_flight: cfg.nbd.max_in_flight,
            read_only: cfg.nbd.read_only,
            splice_reads: cfg.nbd.splice_reads,
            loopback_congestion: Some(cfg.nbd.loopback_congestion.clone())
                .filter(|name| !name.is_empty()),
            busy_poll: cfg.nbd.busy_poll,
            connection_threads: cfg.nbd.connection_threads,
            ..NbdOptions::default()
        };
        let provider: Arc<dyn VolumeProvider> = Arc::new(node.clone());
        let nbd = match NbdFrontend::bind(addr, provider, options).await {
            Ok(f) => f,
            Err(e) => {
                let _ = node.shutdown().await;
                return Err(Error::Other(format!(
                    "cannot listen for NBD on {addr}: {e}"
                )));
            }
        };
        nbd_bound = nbd.local_addr();
        if let (None, None, Some(bound)) = (&cfg.node.address, node.peer_address(), nbd_bound) {
            node.set_address(format!("nbd://{bound}")).await?;
        }
        let rx = stop_rx.clone();
        services.push(("nbd", tokio::spawn(async move { nbd.serve(rx).await })));
    }
    let admin_bound = admin_listener
        .local_addr()
        .map_err(|e| Error::io("admin endpoint address", e))?;
    let app = admin::router(Arc::new(MetaControl::new(meta)), Some(node.clone()));
    services.push((
        "admin",
        tokio::spawn(admin::serve(admin_listener, app, stop_rx)),
    ));
    tracing::info!(nbd = ?nbd_bound, admin = %admin_bound, "torusd is serving");
    Ok(RunningNode {
        node,
        nbd_addr: nbd_bound,
        admin_addr: admin_bound,
        peer_tls,
        stop,
        services,
    })
}
