//! Node configuration: one [`Config`], loaded in layers with the `config` crate.
//!
//! Order (later wins): built-in defaults (the embedded single node: sled
//! metadata and file storage under `./torus-data`, NBD on 127.0.0.1:10809,
//! admin HTTP on 127.0.0.1:4321), an optional TOML file (`--config FILE`),
//! environment variables (`TORUS_` prefix, `__` between section and key, e.g.
//! `TORUS_STORAGE__SIZE=10GiB`, `TORUS_DATA_DIR=/var/lib/torus`), then
//! command-line flags. Unknown keys and bad values are errors that name the
//! key and where it came from.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use torus_traits::ByteSize;

/// Which metadata store a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetadataBackend {
    /// Embedded, persistent, single node (under `data_dir/metadata`).
    Sled,
    /// In memory; everything is lost on exit. For tests.
    Memory,
    /// An etcd v3 cluster: the production, multi-node setup.
    Etcd,
}

/// How peers talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Length-prefixed binary frames over TCP (TLS when `[transport.tls]` is set).
    Tcp,
    /// QUIC: one stream per request, always mutual TLS (`[transport.tls]` required).
    Quic,
    /// No peer port: the node holds every replica itself (single node).
    None,
}

/// Which block store holds the node's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// One sparse file per chunk under `data_dir/blocks`, positional I/O.
    File,
    /// The same files, accessed through memory mappings.
    Mmap,
    /// In memory; everything is lost on exit. For tests.
    Memory,
    /// Chunks as objects in an object store (`storage.url`), behind a local
    /// write-back cache under `data_dir/object-cache`; FLUSH uploads.
    Object,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetadataConfig {
    pub backend: MetadataBackend,
    /// etcd endpoints (`HOST:PORT`), for `backend = "etcd"`.
    pub endpoints: Vec<String>,
    /// How long to wait for a connection to etcd.
    #[serde(with = "torus_backends::duration_text")]
    pub dial_timeout: Duration,
    /// How long one etcd request may take before it fails.
    #[serde(with = "torus_backends::duration_text")]
    pub request_timeout: Duration,
    /// CA certificate to verify etcd with (turns on TLS).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for etcd's client-certificate auth.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// `tcp`, `quic` or `none`; unset means `tcp` with etcd and `none`
    /// otherwise (an embedded node has no peers to talk to).
    pub kind: Option<TransportKind>,
    /// Address to listen on for peers (a UDP port for QUIC).
    pub listen: String,
    /// Address other peers should dial, when it differs from `listen`.
    pub advertise: Option<String>,
    /// Mutual TLS between peers: all of `cert`, `key` and `ca`, or none.
    pub tls: PeerTlsConfig,
}

/// `[transport.tls]`: this node's certificate and key, and the cluster CA
/// that every peer's certificate must be signed by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerTlsConfig {
    /// This node's certificate (PEM), signed by the cluster CA.
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub key: Option<PathBuf>,
    /// The cluster CA certificate (PEM).
    pub ca: Option<PathBuf>,
    /// How often to check the three files for changes and reload them
    /// (SIGHUP reloads at once); `0s` turns the polling off.
    #[serde(with = "torus_backends::duration_text")]
    pub reload_interval: Duration,
}

impl Default for PeerTlsConfig {
    fn default() -> Self {
        PeerTlsConfig {
            cert: None,
            key: None,
            ca: None,
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl PeerTlsConfig {
    /// The files, when TLS is configured (validated: all three or none).
    pub fn files(&self) -> Option<torus_transports::TlsFiles> {
        Some(torus_transports::TlsFiles {
            cert: self.cert.clone()?,
            key: self.key.clone()?,
            ca: self.ca.clone()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// Size of the storage pool this node contributes.
    pub size: ByteSize,
    /// For `backend = "object"`: `s3://bucket/prefix`, `file:///dir` or
    /// `memory://`. S3 credentials come from the environment (`AWS_*`).
    pub url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Serve NBD at all.
    pub enabled: bool,
    /// Address the NBD server listens on.
    pub listen: String,
    /// Largest single read or write a client may send.
    pub max_request: ByteSize,
    /// Requests processed at once per connection (back-pressure beyond).
    pub max_in_flight: usize,
    /// Serve every volume read-only.
    pub read_only: bool,
    /// Splice large reads from the page cache into the socket instead of
    /// copying them (see the README's Performance section: a gain on some
    /// machines, a loss on others).
    pub splice_reads: bool,
    /// TCP congestion control for NBD clients on this host (the kernel
    /// client `torusblk` attaches, local tools); "" keeps the system's.
    /// Cubic by default: BBR's pacing costs a timer interrupt per burst on
    /// a link that needs none (README, Performance).
    pub loopback_congestion: String,
    /// How long a connection whose client waits for each reply busy-polls
    /// for its next request before sleeping ("0s" never): lower latency
    /// at one request in flight, for a core spinning between requests.
    #[serde(with = "torus_backends::duration_text")]
    pub busy_poll: Duration,
    /// Run each NBD connection whole on one of a set of threads, one per
    /// core, instead of spreading its work over the node's runtime: one
    /// busy client then leaves the other cores to the workloads (README,
    /// Performance).
    pub connection_threads: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Host the HTTP admin endpoint (used by `torusctl`) listens on.
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Initialise an empty cluster on start with the values below
    /// (`--debug-init` in the original). Unset means yes for the embedded
    /// backends and no for etcd, where `torusctl init` does it.
    pub auto_init: Option<bool>,
    /// Chunk size used when this node initialises the cluster.
    pub block_size: ByteSize,
    /// Default replication used when this node initialises the cluster.
    pub replication: u32,
    /// Join the ring on start. Unset means yes for the embedded backends
    /// and no for etcd, where `torusctl peer add` (or `--auto-join`) does it.
    pub auto_join: Option<bool>,
    /// How long a ring member may stay down before it is taken out of the
    /// ring automatically and its chunks re-replicated; `0s` never.
    #[serde(with = "torus_backends::duration_text")]
    pub down_out_interval: Duration,
    /// Most bytes per second this node copies to move or rebuild chunks
    /// (`0` unlimited), so foreground I/O keeps its share.
    pub rebalance_rate: ByteSize,
    /// Scrub each open volume this often (compare replicas, repair); `0s`
    /// only when asked (`torusctl volume scrub`).
    #[serde(with = "torus_backends::duration_text")]
    pub scrub_interval: Duration,
    /// Most bytes per second a scheduled scrub scans (`0` unlimited).
    pub scrub_rate: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Time to live of the node's lease: how long after it dies its volume
    /// locks are released and it shows as DOWN.
    #[serde(with = "torus_backends::duration_text")]
    pub lease_ttl: Duration,
    /// Address advertised to operators and peers (defaults to the NBD address).
    pub address: Option<String>,
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the node keeps its metadata, chunks and identity.
    pub data_dir: PathBuf,
    /// Log at debug level.
    pub debug: bool,
    pub metadata: MetadataConfig,
    pub transport: TransportConfig,
    pub storage: StorageConfig,
    pub nbd: NbdConfig,
    pub admin: AdminConfig,
    pub cluster: ClusterConfig,
    pub node: NodeConfig,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        MetadataConfig {
            backend: MetadataBackend::Sled,
            endpoints: vec!["127.0.0.1:2379".into()],
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            kind: None,
            listen: "127.0.0.1:40000".into(),
            advertise: None,
            tls: PeerTlsConfig::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::File,
            size: ByteSize(2 << 30),
            url: None,
        }
    }
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            enabled: true,
            listen: "127.0.0.1:10809".into(),
            max_request: ByteSize(32 << 20),
            max_in_flight: 128,
            read_only: false,
            splice_reads: false,
            loopback_congestion: torus_frontends::nbd::DEFAULT_LOOPBACK_CONGESTION.into(),
            busy_poll: torus_frontends::nbd::DEFAULT_BUSY_POLL,
            connection_threads: true,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            host: "127.0.0.1".into(),
            port: 4321,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            auto_init: None,
            block_size: ByteSize(crate::cluster::DEFAULT_CHUNK_SIZE),
            replication: 1,
            auto_join: None,
            down_out_interval: Duration::from_secs(300),
            rebalance_rate: ByteSize(512 << 20),
            scrub_interval: Duration::from_secs(7 * 24 * 3600),
            scrub_rate: ByteSize(64 << 20),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            lease_ttl: Duration::from_secs(10),
            address: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./torus-data"),
            debug: false,
            metadata: MetadataConfig::default(),
            transport: TransportConfig::default(),
            storage: StorageConfig::default(),
            nbd: NbdConfig::default(),
            admin: AdminConfig::default(),
            cluster: ClusterConfig::default(),
            node: NodeConfig::default(),
        }
    }
}

/// `http://10.0.0.1:40000` → `10.0.0.1:40000` (the original's flags took URLs).
pub fn strip_scheme(addr: &str) -> &str {
    addr.split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(addr)
        .trim_end_matches('/')
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub size: Option<String>,
    pub nbd_listen: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub debug: bool,
    pub debug_init: bool,
    pub auto_join: bool,
    /// `--etcd HOST:PORT[,HOST:PORT…]`: use etcd at these endpoints.
    pub etcd: Option<String>,
    /// `--peer-address`: listen for peers here (`http://` is accepted and dropped).
    pub peer_address: Option<String>,
    pub etcd_ca_file: Option<PathBuf>,
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
    /// `--peer-transport tcp|quic`.
    pub peer_transport: Option<String>,
    /// `--peer-cert-file`, `--peer-key-file`, `--peer-ca-file`: `[transport.tls]`.
    pub peer_cert_file: Option<PathBuf>,
    pub peer_key_file: Option<PathBuf>,
    pub peer_ca_file: Option<PathBuf>,
    /// `--down-out-interval`: `cluster.down_out_interval`.
    pub down_out_interval: Option<String>,
}

/// A configuration error: one line naming the key and its source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Load defaults, then `file`, then `TORUS_*` from `env`, then `flags`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let defaults = config::Config::try_from(&Config::default())
            .map_err(|e| ConfigError(format!("built-in defaults: {e}")))?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            check_file(&text)
                .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TORUS_"))
            .collect();
        if !env.is_empty() {
            builder = builder.add_source(
                config::Environment::with_prefix("TORUS")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env.clone())),
            );
        }
        let set =
            |b: config::ConfigBuilder<config::builder::DefaultState>, k: &str, v: config::Value| {
                b.set_override(k, v)
                    .map_err(|e| ConfigError(format!("flag for {k}: {e}")))
            };
        if let Some(d) = &flags.data_dir {
            builder = set(builder, "data_dir", d.display().to_string().into())?;
        }
        if let Some(s) = &flags.size {
            s.parse::<ByteSize>()
                .map_err(|e| ConfigError(format!("--size: {e}")))?;
            builder = set(builder, "storage.size", s.clone().into())?;
        }
        if let Some(l) = &flags.nbd_listen {
            builder = set(builder, "nbd.listen", l.clone().into())?;
        }
        if let Some(h) = &flags.host {
            builder = set(builder, "admin.host", h.clone().into())?;
        }
        if let Some(p) = flags.port {
            builder = set(builder, "admin.port", (p as i64).into())?;
        }
        if flags.debug {
            builder = set(builder, "debug", true.into())?;
        }
        if flags.debug_init {
            builder = set(builder, "cluster.auto_init", true.into())?;
        }
        if flags.auto_join {
            builder = set(builder, "cluster.auto_join", true.into())?;
        }
        if let Some(d) = &flags.down_out_interval {
            builder = set(builder, "cluster.down_out_interval", d.clone().into())?;
        }
        if let Some(e) = &flags.etcd {
            let endpoints: Vec<config::Value> = e
                .split(',')
                .map(|s| strip_scheme(s.trim()).to_string().into())
                .collect();
            builder = set(builder, "metadata.backend", "etcd".into())?;
            builder = set(builder, "metadata.endpoints", endpoints.into())?;
        }
        if let Some(p) = &flags.peer_address {
            builder = set(
                builder,
                "transport.listen",
                strip_scheme(p).to_string().into(),
            )?;
            // Listening for peers needs a transport: TCP, unless the file or
            // the environment already chose one.
            let chosen = builder
                .build_cloned()
                .ok()
                .and_then(|c| c.get_string("transport.kind").ok())
                .is_some_and(|k| !k.is_empty());
            if !chosen {
                builder = set(builder, "transport.kind", "tcp".into())?;
            }
        }
        if let Some(kind) = &flags.peer_transport {
            builder = set(builder, "transport.kind", kind.clone().into())?;
        }
        for (key, value) in [
            ("metadata.ca_file", &flags.etcd_ca_file),
            ("metadata.cert_file", &flags.etcd_cert_file),
            ("metadata.key_file", &flags.etcd_key_file),
            ("transport.tls.cert", &flags.peer_cert_file),
            ("transport.tls.key", &flags.peer_key_file),
            ("transport.tls.ca", &flags.peer_ca_file),
        ] {
            if let Some(v) = value {
                builder = set(builder, key, v.display().to_string().into())?;
            }
        }
        let merged = builder
            .build()
            .map_err(|e| ConfigError(format!("configuration: {e}")))?;
        let cfg: Config = merged.try_deserialize().map_err(|e| {
            let origin = if env.is_empty() {
                String::new()
            } else {
                format!(
                    " (set vars: {})",
                    env.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            ConfigError(format!("configuration: {e}{origin}"))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |k: &str, why: String| Err(ConfigError(format!("{k}: {why}")));
        if self.nbd.enabled && self.nbd.listen.parse::<SocketAddr>().is_err() {
            return bad(
                "nbd.listen",
                format!(
                    "{:?} is not an address such as 127.0.0.1:10809",
                    self.nbd.listen
                ),
            );
        }
        if self.storage.size.0 < (1 << 20) {
            return bad(
                "storage.size",
                format!("{} is too small (at least 1 MiB)", self.storage.size),
            );
        }
        let mr = self.nbd.max_request.0;
        if !(4096..=(256 << 20)).contains(&mr) {
            return bad(
                "nbd.max_request",
                format!("{} must be between 4 KiB and 256 MiB", self.nbd.max_request),
            );
        }
        if !self.nbd.loopback_congestion.is_empty() {
            if let Err(why) =
                torus_frontends::nbd::check_congestion_name(&self.nbd.loopback_congestion)
            {
                return bad("nbd.loopback_congestion", why);
            }
        }
        if let Err(why) = torus_frontends::nbd::check_busy_poll(self.nbd.busy_poll) {
            return bad("nbd.busy_poll", why);
        }
        if self.nbd.max_in_flight == 0 || self.nbd.max_in_flight > 4096 {
            return bad(
                "nbd.max_in_flight",
                format!("{} must be between 1 and 4096", self.nbd.max_in_flight),
            );
        }
        if self.metadata.backend == MetadataBackend::Etcd && self.metadata.endpoints.is_empty() {
            return bad(
                "metadata.endpoints",
                "etcd needs at least one endpoint".into(),
            );
        }
        if self.metadata.backend == MetadataBackend::Etcd
            && self.metadata.ca_file.is_none()
            && (self.metadata.cert_file.is_some() || self.metadata.key_file.is_some())
        {
            return bad(
                "metadata.ca_file",
                "a client certificate for etcd needs the CA file too".into(),
            );
        }
        if self.metadata.cert_file.is_some() != self.metadata.key_file.is_some() {
            return bad(
                "metadata.cert_file",
                "cert_file and key_file go together".into(),
            );
        }
        if self.storage.backend == StorageBackend::Object && self.storage.url.is_none() {
            return bad(
                "storage.url",
                "backend \"object\" needs a url such as s3://bucket/prefix or file:///dir".into(),
            );
        }
        let tls = &self.transport.tls;
        let given = [("cert", &tls.cert), ("key", &tls.key), ("ca", &tls.ca)];
        if given.iter().any(|(_, v)| v.is_some()) {
            if let Some((missing, _)) = given.iter().find(|(_, v)| v.is_none()) {
                return bad(
                    &format!("transport.tls.{missing}"),
                    "peer TLS needs cert, key and ca together (create them with `torusctl certs init` and `torusctl certs node NAME`)".into(),
                );
            }
        }
        if self.transport_kind() == TransportKind::Quic && tls.files().is_none() {
            return bad(
                "transport.tls",
                "kind \"quic\" is always TLS: set cert, key and ca (create them with `torusctl certs init` and `torusctl certs node NAME`)".into(),
            );
        }
        if self.node.lease_ttl < Duration::from_secs(1) {
            return bad("node.lease_ttl", "must be at least 1s".into());
        }
        crate::cluster::InitParams {
            chunk_size: self.cluster.block_size.0,
            replication: self.cluster.replication,
        }
        .validate()
        .or_else(|e| bad("cluster", e.to_string()))?;
        Ok(())
    }

    /// Whether this node initialises an empty cluster itself.
    pub fn auto_init(&self) -> bool {
        self.cluster
            .auto_init
            .unwrap_or(self.metadata.backend != MetadataBackend::Etcd)
    }

    /// Whether this node joins the ring on start.
    pub fn auto_join(&self) -> bool {
        self.cluster
            .auto_join
            .unwrap_or(self.metadata.backend != MetadataBackend::Etcd)
    }

    /// Whether this node listens for and talks to peers.
    pub fn transport_kind(&self) -> TransportKind {
        self.transport.kind.unwrap_or(match self.metadata.backend {
            MetadataBackend::Etcd => TransportKind::Tcp,
            _ => TransportKind::None,
        })
    }

    /// The admin endpoint's socket address.
    pub fn admin_addr(&self) -> String {
        if self.admin.host.contains(':') && !self.admin.host.starts_with('[') {
            format!("[{}]:{}", self.admin.host, self.admin.port)
        } else {
            format!("{}:{}", self.admin.host, self.admin.port)
        }
    }
}

/// Deserialize the file's text on its own, so an unknown key or bad value is
/// reported in one line with the file's line number and the key's name.
fn check_file(text: &str) -> Result<(), String> {
    toml::from_str::<Config>(text).map(|_| ()).map_err(|e| {
        let line = e
            .span()
            .map(|s| {
                format!(
                    "line {}: ",
                    text[..s.start.min(text.len())].matches('\n').count() + 1
                )
            })
            .unwrap_or_default();
        // toml's messages may span lines; the error must stay one line.
        let msg: Vec<&str> = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        format!("{line}{}", msg.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_text(text: &str) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        Config::load(Some(f.path()), Vec::new(), &Overrides::default())
    }

    #[test]
    fn healing_settings_from_file_and_flag() {
        let c = load_text("[cluster]\ndown_out_interval = \"0s\"\nrebalance_rate = \"64MiB\"\n")
            .unwrap();
        assert_eq!(c.cluster.down_out_interval, Duration::ZERO);
        assert_eq!(c.cluster.rebalance_rate, ByteSize(64 << 20));
        assert_eq!(c.cluster.scrub_interval, Duration::from_secs(7 * 86400));
        let d = Config::load(None, Vec::new(), &Overrides::default()).unwrap();
        assert_eq!(d.cluster.down_out_interval, Duration::from_secs(300));
        let flags = Overrides {
            down_out_interval: Some("90s".into()),
            ..Default::default()
        };
        let f = Config::load(None, Vec::new(), &flags).unwrap();
        assert_eq!(f.cluster.down_out_interval, Duration::from_secs(90));
        assert!(load_text("[cluster]\ndown_out_interval = \"soon\"\n").is_err());
    }

    #[test]
    fn defaults_are_the_embedded_single_node() {
        let c = Config::load(None, Vec::new(), &Overrides::default()).unwrap();
        assert_eq!(c.metadata.backend, MetadataBackend::Sled);
        assert_eq!(c.storage.backend, StorageBackend::File);
        assert_eq!(c.nbd.listen, "127.0.0.1:10809");
        assert_eq!(c.admin_addr(), "127.0.0.1:4321");
        assert_eq!(c.data_dir, PathBuf::from("./torus-data"));
        // Copying large reads is the default; splicing them is asked for.
        assert!(!c.nbd.splice_reads);
        assert!(
            load_text("[nbd]\nsplice_reads = true\n")
                .unwrap()
                .nbd
                .splice_reads
        );
        assert!(load_text("[nbd]\nsplice_reads = 3\n").is_err());
        // Loopback clients get cubic unless told otherwise ("" = the
        // system's algorithm); a name that cannot be one is refused.
        assert_eq!(c.nbd.loopback_congestion, "cubic");
        assert_eq!(c.nbd.busy_poll, Duration::from_micros(200));
        let off = load_text("[nbd]\nbusy_poll = \"0s\"\n").unwrap();
        assert_eq!(off.nbd.busy_poll, Duration::ZERO);
        let us = load_text("[nbd]\nbusy_poll = \"50us\"\n").unwrap();
        assert_eq!(us.nbd.busy_poll, Duration::from_micros(50));
        let e = load_text("[nbd]\nbusy_poll = \"1s\"\n").unwrap_err();
        assert!(e.to_string().contains("nbd.busy_poll"), "{e}");
        let keep = load_text("[nbd]\nloopback_congestion = \"\"\n").unwrap();
        assert_eq!(keep.nbd.loopback_congestion, "");
        let e = load_text("[nbd]\nloopback_congestion = \"no such\"\n").unwrap_err();
        assert!(e.to_string().contains("nbd.loopback_congestion"), "{e}");
    }

    #[test]
    fn file_then_env_then_flags() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "[storage]\nsize = \"3GiB\"\nbackend = \"mmap\"\n[nbd]\nlisten = \"127.0.0.1:1\""
        )
        .unwrap();
        let env = vec![
            ("TORUS_STORAGE__SIZE".to_string(), "4GiB".to_string()),
            ("TORUS_NODE__LEASE_TTL".to_string(), "3s".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let flags = Overrides {
            nbd_listen: Some("127.0.0.1:2".into()),
            port: Some(9999),
            ..Default::default()
        };
        let c = Config::load(Some(f.path()), env, &flags).unwrap();
        assert_eq!(c.storage.size, ByteSize(4 << 30));
        assert_eq!(c.storage.backend, StorageBackend::Mmap);
        assert_eq!(c.nbd.listen, "127.0.0.1:2");
        assert_eq!(c.admin.port, 9999);
        assert_eq!(c.node.lease_ttl, Duration::from_secs(3));
    }

    #[test]
    fn peer_tls_and_quic_from_file_env_and_flags() {
        let c = load_text(
            "[metadata]\nbackend = \"etcd\"\n[transport]\nkind = \"quic\"\n[transport.tls]\ncert = \"/c/n.crt\"\nkey = \"/c/n.key\"\nca = \"/c/ca.crt\"\nreload_interval = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(c.transport_kind(), TransportKind::Quic);
        let files = c.transport.tls.files().expect("tls files");
        assert_eq!(files.ca, PathBuf::from("/c/ca.crt"));
        assert_eq!(c.transport.tls.reload_interval, Duration::from_secs(2));

        // --peer-address keeps the file's kind; --peer-transport overrides it.
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "[transport]\nkind = \"quic\"\n[transport.tls]\ncert = \"a\"\nkey = \"b\"\nca = \"c\""
        )
        .unwrap();
        let flags = Overrides {
            peer_address: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let c = Config::load(Some(f.path()), Vec::new(), &flags).unwrap();
        assert_eq!(c.transport_kind(), TransportKind::Quic);
        let flags = Overrides {
            peer_address: Some("127.0.0.1:0".into()),
            peer_transport: Some("tcp".into()),
            ..Default::default()
        };
        let c = Config::load(Some(f.path()), Vec::new(), &flags).unwrap();
        assert_eq!(c.transport_kind(), TransportKind::Tcp);
        assert!(c.transport.tls.files().is_some());

        // Flags and environment variables.
        let flags = Overrides {
            etcd: Some("127.0.0.1:2379".into()),
            peer_transport: Some("quic".into()),
            peer_cert_file: Some("/f/n.crt".into()),
            peer_key_file: Some("/f/n.key".into()),
            ..Default::default()
        };
        let env = vec![(
            "TORUS_TRANSPORT__TLS__CA".to_string(),
            "/e/ca.crt".to_string(),
        )];
        let c = Config::load(None, env, &flags).unwrap();
        let files = c.transport.tls.files().expect("tls files");
        assert_eq!(
            (files.cert, files.ca),
            (PathBuf::from("/f/n.crt"), PathBuf::from("/e/ca.crt"))
        );
    }

    #[test]
    fn peer_tls_needs_all_three_files_and_quic_needs_tls() {
        let e = load_text("[transport.tls]\ncert = \"a\"\nca = \"c\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("transport.tls.key"), "{e}");
        let e = load_text("[metadata]\nbackend = \"etcd\"\n[transport]\nkind = \"quic\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("transport.tls") && e.contains("quic"), "{e}");
        let e = load_text("[transport.tls]\ncrt = \"a\"\n").unwrap_err().0;
        assert!(e.contains("crt"), "{e}");
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let e = load_text("[storage]\nsise = \"1GiB\"\n").unwrap_err().0;
        assert!(e.contains("sise"), "{e}");
        assert!(e.contains("config file"), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        let e = load_text("[storage]\nsize = \"lots\"\n").unwrap_err().0;
        assert!(e.contains("lots"), "{e}");
        let e = load_text("[metadata]\nbackend = \"zookeeper\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("zookeeper"), "{e}");
        let e = load_text("this is not toml").unwrap_err().0;
        assert!(e.contains("config file"), "{e}");
        let e = load_text("[nbd]\nlisten = \"nowhere\"\n").unwrap_err().0;
        assert!(e.contains("nbd.listen"), "{e}");
        let e = Config::load(
            None,
            vec![("TORUS_BOGUS".to_string(), "1".to_string())],
            &Overrides::default(),
        )
        .unwrap_err()
        .0;
        assert!(e.contains("bogus") && e.contains("TORUS_BOGUS"), "{e}");
        let flags = Overrides {
            size: Some("12 parsecs".into()),
            ..Default::default()
        };
        let e = Config::load(None, Vec::new(), &flags).unwrap_err().0;
        assert!(e.contains("--size"), "{e}");
    }
}
