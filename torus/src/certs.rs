//! `torusctl certs`: a cluster CA and node certificates for peer TLS, so that
//! turning TLS on takes two commands. Files are PEM, keys readable by their
//! owner only, and nothing existing is ever overwritten.
//!
//! - `certs init --dir D` writes `D/ca.crt` and `D/ca.key` (the CA key signs
//!   node certificates; keep it off the nodes).
//! - `certs node NAME --dir D` writes `D/NAME.crt` and `D/NAME.key`, signed
//!   by `D/ca.crt` and `D/ca.key`, valid for the fixed peer name
//!   `torus-peer` (what peers verify, see `torus_transports::tls`), `NAME`
//!   and any `--name`/`--ip` given.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use torus_traits::{Error, Result};
use torus_transports::tls::{self, CertPem};

/// File names under the certificate directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

/// Create the cluster CA in `dir` (created if missing); returns what was written.
pub fn init(dir: &Path, days: u64) -> Result<String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let ca = tls::new_cluster_ca("Torus cluster CA", days)?;
    tls::write_cert_files(&ca, &cert, &key)?;
    Ok(format!(
        "wrote the cluster CA {} and its key {} (valid {days} days; keep the key off the nodes)\n",
        cert.display(),
        key.display()
    ))
}

/// Whether `name` is usable as a file name and a DNS name.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "node name {name:?}: use letters, digits, '-' and '.' (it becomes a DNS name and a file name)"
        )))
    }
}

/// Create `dir/NAME.crt` and `dir/NAME.key`, signed by the CA in `dir`.
pub fn node(dir: &Path, name: &str, extra_names: &[String], days: u64) -> Result<String> {
    check_name(name)?;
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| {
            Error::io(
                format!("reading {} (run `torusctl certs init` first)", p.display()),
                e,
            )
        })
    };
    let ca = CertPem {
        cert: read(dir.join(CA_CERT))?,
        key: read(dir.join(CA_KEY))?,
    };
    let now = SystemTime::now();
    let pem = tls::new_node_cert(
        &ca,
        name,
        extra_names,
        now - Duration::from_secs(3600),
        now + Duration::from_secs(days * 86_400),
    )?;
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    tls::write_cert_files(&pem, &cert, &key)?;
    Ok(format!(
        "wrote {} and {} (valid {days} days). On node {name}:\n\
         [transport.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        cert.display(),
        key.display(),
        cert.display(),
        key.display(),
        dir.join(CA_CERT).display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_node_gives_loadable_peer_certificates() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 10).unwrap();
        let out = node(dir.path(), "node-1", &["10.0.0.5".into()], 10).unwrap();
        assert!(out.contains("[transport.tls]"), "{out}");
        let files = torus_transports::TlsFiles {
            cert: dir.path().join("node-1.crt"),
            key: dir.path().join("node-1.key"),
            ca: dir.path().join(CA_CERT),
        };
        torus_transports::PeerTls::load(files).expect("generated files load");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("node-1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "a key must be private to its owner");
        // Nothing is overwritten.
        let e = init(dir.path(), 10).unwrap_err().to_string();
        assert!(e.contains("ca.key"), "{e}");
        let e = node(dir.path(), "node-1", &[], 10).unwrap_err().to_string();
        assert!(e.contains("node-1.key"), "{e}");
    }

    #[test]
    fn node_needs_the_ca_and_a_sane_name() {
        let dir = tempfile::tempdir().unwrap();
        let e = node(dir.path(), "n", &[], 1).unwrap_err().to_string();
        assert!(e.contains("certs init"), "{e}");
        init(dir.path(), 1).unwrap();
        for bad in ["", "../x", "a/b", "-x", "x."] {
            assert!(node(dir.path(), bad, &[], 1).is_err(), "{bad:?}");
        }
    }
}
