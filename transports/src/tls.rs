//! TLS for peer connections: mutual authentication against a cluster CA,
//! shared by the TCP transport (tokio-rustls) and QUIC (quinn), plus the
//! certificate generation behind `torusctl certs`.
//!
//! **Trust model.** One cluster CA signs every node certificate. Both ends of
//! a peer connection present their certificate and accept the other's only if
//! it chains to that CA and is within its validity period; nothing else
//! (self-signed, another CA, expired, none at all) completes the handshake,
//! so a refused peer never gets a request read. Peers are dialled by address,
//! and addresses change (NAT, DHCP, `--peer-address 127.0.0.1:0`), so instead
//! of checking the dialled host name every node certificate carries the fixed
//! DNS name [`PEER_SERVER_NAME`] and the client verifies that name: holding a
//! certificate from the cluster CA is what makes a node a peer. The CA key is
//! the secret that matters; keep it off the nodes.
//!
//! **Crypto.** rustls with the `ring` provider, passed explicitly to every
//! builder (no process-wide default), TLS 1.3 only.
//!
//! **Reload.** [`PeerTls`] holds the current configurations behind a lock.
//! [`PeerTls::reload`] (on SIGHUP) or [`PeerTls::watch`] (polling the files'
//! modification times) rebuilds them; new connections use the new
//! certificates and connections already open keep running, so volumes are
//! not dropped. A reload that fails (a half-written file) keeps the old
//! certificates and logs why.

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};
use torus_traits::{Error, Result};
use tracing::{info, warn};

/// The DNS name every node certificate carries and every client verifies.
pub const PEER_SERVER_NAME: &str = "torus-peer";
/// ALPN protocol id of the peer protocol (QUIC requires one; TCP+TLS sends it too).
pub const ALPN: &[u8] = b"torus-peer/1";

/// Where a node's certificate, key and cluster CA are, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The node's certificate (chain), signed by the cluster CA.
    pub cert: PathBuf,
    /// The node's private key.
    pub key: PathBuf,
    /// The cluster CA certificate(s) peers' certificates must chain to.
    pub ca: PathBuf,
}

/// One consistent set of configurations built from the files.
struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// A node's peer TLS settings, reloadable. Shared by its listeners and clients.
pub struct PeerTls {
    files: TlsFiles,
    current: RwLock<Arc<Configs>>,
    /// The files' modification times and sizes at the last (attempted) load.
    stamp: Mutex<Option<Vec<(SystemTime, u64)>>>,
    reloads: AtomicU64,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("files", &self.files)
            .finish()
    }
}

/// ring's suites with TLS 1.3's AES-128-GCM first. Every peer runs this
/// code, so that is the suite peers agree on (a client's order decides, and
/// the server picks the first it also supports): AES-128 takes 10 rounds per
/// block against AES-256's 14, and peer traffic is all bulk encryption.
/// 128-bit keys are TLS 1.3's mandatory suite and what Go and QUIC's initial
/// packets use; nothing else is weakened.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn bad(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{what} {}: {e}", path.display()))
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(path, what, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(path, what, e))?;
    if certs.is_empty() {
        return Err(bad(path, what, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<Configs> {
    let certs = read_certs(&files.cert, "peer certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| bad(&files.key, "peer private key", e))?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.ca, "cluster CA")? {
        roots.add(ca).map_err(|e| bad(&files.ca, "cluster CA", e))?;
    }
    let roots = Arc::new(roots);
    let provider = provider();
    let tls13 = &[&rustls::version::TLS13];
    let config_err = |e: rustls::Error| {
        Error::InvalidArgument(format!(
            "peer TLS with {} and {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    };

    let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| bad(&files.ca, "cluster CA", e))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(tls13)
        .map_err(config_err)?
        .with_client_cert_verifier(clients)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(config_err)?;
    server.alpn_protocols = vec![ALPN.to_vec()];

    let servers = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| bad(&files.ca, "cluster CA", e))?;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(tls13)
        .map_err(config_err)?
        .with_webpki_verifier(servers)
        .with_client_auth_cert(certs, key)
        .map_err(config_err)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

fn stamp(files: &TlsFiles) -> Option<Vec<(SystemTime, u64)>> {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

impl PeerTls {
    /// Load the files; any problem is an error naming the file.
    pub fn load(files: TlsFiles) -> Result<Arc<PeerTls>> {
        let stamp_now = stamp(&files);
        let configs = build(&files)?;
        Ok(Arc::new(PeerTls {
            files,
            current: RwLock::new(Arc::new(configs)),
            stamp: Mutex::new(stamp_now),
            reloads: AtomicU64::new(0),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn current(&self) -> Arc<Configs> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The configuration for accepting peers (client certificate required).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// The configuration for dialling peers (presents this node's certificate).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// The name to verify on a peer's certificate (see the module docs).
    pub fn server_name() -> ServerName<'static> {
        ServerName::DnsName(
            rustls::pki_types::DnsName::try_from(PEER_SERVER_NAME)
                .expect("PEER_SERVER_NAME is a valid DNS name")
                .to_owned(),
        )
    }

    /// Successful reloads since the start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Re-read the files. On error the current certificates stay in use.
    pub fn reload(&self) -> Result<()> {
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp(&self.files);
        let configs = build(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(configs);
        self.reloads.fetch_add(1, Ordering::Relaxed);
        info!(cert = %self.files.cert.display(), "peer TLS certificates reloaded");
        Ok(())
    }

    /// Reload when a file's modification time or size changed since the last load.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let now = stamp(&self.files);
        let changed = {
            let last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            now.is_some() && *last != now
        };
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }

    /// Poll the files every `every` and reload on change, for as long as
    /// this `PeerTls` is alive.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<PeerTls> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(tls) = weak.upgrade() else { return };
                if let Err(e) = tls.reload_if_changed() {
                    warn!(error = %e, "peer TLS certificates changed but cannot be loaded; keeping the previous ones");
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------
// Certificate generation (`torusctl certs`)

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct CertPem {
    pub cert: String,
    pub key: String,
}

fn gen_err(e: rcgen::Error) -> Error {
    Error::InvalidArgument(format!("certificate generation: {e}"))
}

/// A new cluster CA named `name`, valid for `days`.
pub fn new_cluster_ca(name: &str, days: u64) -> Result<CertPem> {
    let key = rcgen::KeyPair::generate().map_err(gen_err)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(days * 86_400)).into();
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok(CertPem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A node certificate for `name` signed by `ca`, valid from `not_before`
/// to `not_after`. Its names are [`PEER_SERVER_NAME`], `name` and
/// `extra_names` (host names or IP addresses).
pub fn new_node_cert(
    ca: &CertPem,
    name: &str,
    extra_names: &[String],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertPem> {
    let ca_key = rcgen::KeyPair::from_pem(&ca.key).map_err(gen_err)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(gen_err)?;
    let mut names = vec![PEER_SERVER_NAME.to_string()];
    for n in std::iter::once(name).chain(extra_names.iter().map(String::as_str)) {
        if !names.iter().any(|have| have == n) {
            names.push(n.to_string());
        }
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(gen_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    // Every node is both a server and a client of its peers.
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let key = rcgen::KeyPair::generate().map_err(gen_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    Ok(CertPem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Write `pem` to `cert_path` and `key_path` (the key readable by its owner
/// only). Refuses to overwrite existing files.
pub fn write_cert_files(pem: &CertPem, cert_path: &Path, key_path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    for (path, text, mode) in [(key_path, &pem.key, 0o600), (cert_path, &pem.cert, 0o644)] {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    Ok(())
}
