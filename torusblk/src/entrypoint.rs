//! The container entrypoint: the original image's environment variables,
//! mapped to `torusd` flags by a pure function (tested per variable), plus
//! the FlexVolume driver install (`DROP_MOUNT_BIN`).
//!
//! | variable | flag / effect | default |
//! |---|---|---|
//! | `ETCD_HOST`, `ETCD_PORT` | `--etcd HOST:PORT` | `127.0.0.1`, `2379` |
//! | `STORAGE_SIZE` | `--size` | `2GiB` (torusd's) |
//! | `LISTEN_HOST` | `--host` (admin) and the host of `--nbd-listen` | `0.0.0.0` |
//! | `LISTEN_HTTP_PORT` | `--port` | `4321` |
//! | `LISTEN_NBD_PORT` | the port of `--nbd-listen` | `10809` |
//! | `PEER_ADDRESS` | `--peer-address` | `LISTEN_HOST:40000` |
//! | `AUTO_JOIN` | `--auto-join` | off |
//! | `DEBUG_INIT` | `--debug-init` | off |
//! | `DEBUG` | `--debug` | off |
//! | `DATA_DIR` | `--data-dir` | `/data` |
//! | `DROP_MOUNT_BIN` | copy `torusblk` to `PLUGIN_DIR/coreos.com~torus/torus` | off |
//! | `PLUGIN_DIR` | where kubelet looks for FlexVolume drivers | `/plugin` |

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Every variable the entrypoint reads.
pub const VARIABLES: &[&str] = &[
    "ETCD_HOST",
    "ETCD_PORT",
    "STORAGE_SIZE",
    "LISTEN_HOST",
    "LISTEN_HTTP_PORT",
    "LISTEN_NBD_PORT",
    "PEER_ADDRESS",
    "AUTO_JOIN",
    "DEBUG_INIT",
    "DEBUG",
    "DATA_DIR",
    "DROP_MOUNT_BIN",
    "PLUGIN_DIR",
];

/// What the entrypoint does: the torusd arguments, and the driver install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub args: Vec<String>,
    /// Where to copy `torusblk` (the FlexVolume driver), when asked to.
    pub install_driver: Option<PathBuf>,
}

/// The driver's path under kubelet's plugin directory (vendor~driver/driver).
pub fn driver_path(plugin_dir: &Path) -> PathBuf {
    plugin_dir.join("coreos.com~torus").join("torus")
}

fn flag(env: &HashMap<String, String>, name: &str) -> Result<bool, String> {
    match env
        .get(name)
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("0") | Some("false") | Some("no") | Some("off") => Ok(false),
        Some("1") | Some("true") | Some("yes") | Some("on") => Ok(true),
        Some(other) => Err(format!(
            "{name}={other:?}: use 1/true/yes/on or 0/false/no/off"
        )),
    }
}

fn value<'a>(env: &'a HashMap<String, String>, name: &str, default: &'a str) -> &'a str {
    env.get(name)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .unwrap_or(default)
}

fn port(env: &HashMap<String, String>, name: &str, default: &str) -> Result<String, String> {
    let v = value(env, name, default);
    v.parse::<u16>()
        .map(|p| p.to_string())
        .map_err(|_| format!("{name}={v:?} is not a port number"))
}

/// `host:port`, bracketing an IPv6 host.
fn join_host_port(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Map the environment to torusd's arguments.
pub fn plan(env: &HashMap<String, String>) -> Result<Plan, String> {
    let mut args = Vec::new();
    let data_dir = value(env, "DATA_DIR", "/data");
    args.extend(["--data-dir".to_string(), data_dir.to_string()]);

    let etcd_host = value(env, "ETCD_HOST", "127.0.0.1");
    let etcd_port = port(env, "ETCD_PORT", "2379")?;
    // ETCD_HOST may already carry ports or list several endpoints.
    let etcd = if etcd_host.contains(',') || etcd_host.matches(':').count() == 1 {
        etcd_host.to_string()
    } else {
        join_host_port(etcd_host, &etcd_port)
    };
    args.extend(["--etcd".to_string(), etcd]);

    if let Some(size) = env
        .get("STORAGE_SIZE")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        size.parse::<torus_traits::ByteSize>()
            .map_err(|e| format!("STORAGE_SIZE={size:?}: {e}"))?;
        args.extend(["--size".to_string(), size.to_string()]);
    }

    let host = value(env, "LISTEN_HOST", "0.0.0.0");
    let http_port = port(env, "LISTEN_HTTP_PORT", "4321")?;
    let nbd_port = port(env, "LISTEN_NBD_PORT", "10809")?;
    args.extend(["--host".to_string(), host.to_string()]);
    args.extend(["--port".to_string(), http_port]);
    args.extend(["--nbd-listen".to_string(), join_host_port(host, &nbd_port)]);

    let peer = match env
        .get("PEER_ADDRESS")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        Some(p) => p.to_string(),
        None => join_host_port(host, "40000"),
    };
    args.extend(["--peer-address".to_string(), peer]);

    if flag(env, "AUTO_JOIN")? {
        args.push("--auto-join".into());
    }
    if flag(env, "DEBUG_INIT")? {
        args.push("--debug-init".into());
    }
    if flag(env, "DEBUG")? {
        args.push("--debug".into());
    }
    let install_driver = if flag(env, "DROP_MOUNT_BIN")? {
        Some(driver_path(Path::new(value(env, "PLUGIN_DIR", "/plugin"))))
    } else {
        None
    };
    Ok(Plan {
        args,
        install_driver,
    })
}

/// Copy the driver into place atomically (write aside, then rename), executable.
pub fn install_driver(from: &Path, to: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", to.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = dir.join(".torus.tmp");
    std::fs::copy(from, &tmp)
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("cannot make {} executable: {e}", tmp.display()))?;
    // Rename, so kubelet never runs a half-written driver.
    std::fs::rename(&tmp, to).map_err(|e| format!("cannot install {}: {e}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn arg_of(p: &Plan, flag: &str) -> Option<String> {
        p.args
            .iter()
            .position(|a| a == flag)
            .and_then(|i| p.args.get(i + 1))
            .cloned()
    }

    #[test]
    fn defaults() {
        let p = plan(&env(&[])).unwrap();
        assert_eq!(
            p.args,
            [
                "--data-dir",
                "/data",
                "--etcd",
                "127.0.0.1:2379",
                "--host",
                "0.0.0.0",
                "--port",
                "4321",
                "--nbd-listen",
                "0.0.0.0:10809",
                "--peer-address",
                "0.0.0.0:40000"
            ]
        );
        assert_eq!(p.install_driver, None);
    }

    #[test]
    fn etcd_host_and_port() {
        let p = plan(&env(&[("ETCD_HOST", "10.3.0.100")])).unwrap();
        assert_eq!(arg_of(&p, "--etcd").unwrap(), "10.3.0.100:2379");
        let p = plan(&env(&[("ETCD_HOST", "etcd"), ("ETCD_PORT", "12379")])).unwrap();
        assert_eq!(arg_of(&p, "--etcd").unwrap(), "etcd:12379");
        let p = plan(&env(&[("ETCD_HOST", "a:1,b:2")])).unwrap();
        assert_eq!(arg_of(&p, "--etcd").unwrap(), "a:1,b:2");
        let p = plan(&env(&[("ETCD_HOST", "fd00::1")])).unwrap();
        assert_eq!(arg_of(&p, "--etcd").unwrap(), "[fd00::1]:2379");
        assert!(plan(&env(&[("ETCD_PORT", "x")]))
            .unwrap_err()
            .contains("ETCD_PORT"));
    }

    #[test]
    fn storage_size() {
        let p = plan(&env(&[("STORAGE_SIZE", "5GiB")])).unwrap();
        assert_eq!(arg_of(&p, "--size").unwrap(), "5GiB");
        assert!(plan(&env(&[("STORAGE_SIZE", "lots")]))
            .unwrap_err()
            .contains("STORAGE_SIZE"));
    }

    #[test]
    fn listen_host_and_ports() {
        let p = plan(&env(&[
            ("LISTEN_HOST", "10.2.0.7"),
            ("LISTEN_HTTP_PORT", "4400"),
            ("LISTEN_NBD_PORT", "10900"),
        ]))
        .unwrap();
        assert_eq!(arg_of(&p, "--host").unwrap(), "10.2.0.7");
        assert_eq!(arg_of(&p, "--port").unwrap(), "4400");
        assert_eq!(arg_of(&p, "--nbd-listen").unwrap(), "10.2.0.7:10900");
        assert_eq!(arg_of(&p, "--peer-address").unwrap(), "10.2.0.7:40000");
        assert!(plan(&env(&[("LISTEN_HTTP_PORT", "70000")]))
            .unwrap_err()
            .contains("LISTEN_HTTP_PORT"));
        assert!(plan(&env(&[("LISTEN_NBD_PORT", "-1")]))
            .unwrap_err()
            .contains("LISTEN_NBD_PORT"));
    }

    #[test]
    fn peer_address() {
        let p = plan(&env(&[("PEER_ADDRESS", "http://10.2.0.7:40000")])).unwrap();
        assert_eq!(
            arg_of(&p, "--peer-address").unwrap(),
            "http://10.2.0.7:40000"
        );
    }

    #[test]
    fn switches() {
        for (var, flag_name) in [
            ("AUTO_JOIN", "--auto-join"),
            ("DEBUG_INIT", "--debug-init"),
            ("DEBUG", "--debug"),
        ] {
            for on in ["1", "true", "YES", "on"] {
                let p = plan(&env(&[(var, on)])).unwrap();
                assert!(p.args.iter().any(|a| a == flag_name), "{var}={on}");
            }
            for off in ["0", "false", "", "no"] {
                let p = plan(&env(&[(var, off)])).unwrap();
                assert!(!p.args.iter().any(|a| a == flag_name), "{var}={off}");
            }
            assert!(plan(&env(&[(var, "maybe")])).unwrap_err().contains(var));
        }
    }

    #[test]
    fn data_dir_and_driver_install() {
        let p = plan(&env(&[("DATA_DIR", "/var/lib/torus")])).unwrap();
        assert_eq!(arg_of(&p, "--data-dir").unwrap(), "/var/lib/torus");
        let p = plan(&env(&[("DROP_MOUNT_BIN", "1")])).unwrap();
        assert_eq!(
            p.install_driver,
            Some(PathBuf::from("/plugin/coreos.com~torus/torus"))
        );
        let p = plan(&env(&[("DROP_MOUNT_BIN", "1"), ("PLUGIN_DIR", "/x")])).unwrap();
        assert_eq!(
            p.install_driver,
            Some(PathBuf::from("/x/coreos.com~torus/torus"))
        );
        assert_eq!(
            plan(&env(&[("DROP_MOUNT_BIN", "0")]))
                .unwrap()
                .install_driver,
            None
        );
    }

    #[test]
    fn install_copies_an_executable_atomically() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let from = d.path().join("torusblk");
        std::fs::write(&from, b"#!/bin/sh\n").unwrap();
        let to = driver_path(&d.path().join("plugin"));
        install_driver(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"#!/bin/sh\n");
        assert_eq!(
            std::fs::metadata(&to).unwrap().permissions().mode() & 0o777,
            0o755
        );
        install_driver(&from, &to).unwrap();
        assert!(install_driver(&d.path().join("missing"), &to)
            .unwrap_err()
            .contains("cannot copy"));
    }
}
