//! The FlexVolume protocol, as kubelet speaks it: the call (argv), the
//! options (one JSON object of strings), and the reply (one JSON object on
//! stdout). Pure: no I/O here, so every parse and reply is unit-tested.
//!
//! kubelet runs `<driver> <call> [args…]` and reads the combined stdout and
//! stderr as one JSON object, so nothing else may ever be printed.

use serde::Serialize;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Filesystems `mount` can create and mount (the mkfs program must exist).
pub const FS_TYPES: &[&str] = &["ext4", "ext3", "ext2", "xfs"];

/// The default etcd when the `etcd` option is absent (the original's default).
pub const DEFAULT_ETCD: &str = "127.0.0.1:2379";

/// One driver call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Init,
    Mount {
        dir: PathBuf,
        /// Boxed: much larger than the other calls.
        options: Box<MountOptions>,
    },
    Unmount {
        dir: PathBuf,
    },
    /// A call this driver does not implement, answered `Not supported`
    /// (`attach`, `detach`, `waitforattach`, `isattached`, `mountdevice`,
    /// `unmountdevice`, `getvolumename`: kubelet only makes them for drivers
    /// that report `attach: true`, and `getvolumename` is deprecated;
    /// `expandvolume`, `expandfs`: torus volumes cannot grow yet).
    NotSupported(String),
}

/// Calls of the FlexVolume protocol this driver answers `Not supported`.
pub const NOT_SUPPORTED: &[&str] = &[
    "attach",
    "detach",
    "waitforattach",
    "isattached",
    "mountdevice",
    "unmountdevice",
    "getvolumename",
    "expandvolume",
    "expandfs",
];

/// Why a call is answered `Not supported`.
pub fn not_supported_reason(call: &str) -> String {
    match call {
        "expandvolume" | "expandfs" => format!("{call}: torus volumes cannot be resized yet"),
        _ => format!(
            "{call} is not used by this driver: it reports attach: false, and mount does the work on the node"
        ),
    }
}

/// Whether `name` is a FlexVolume call (as opposed to another torusblk command).
pub fn is_flex_call(name: &str) -> bool {
    matches!(name, "init" | "mount" | "unmount") || NOT_SUPPORTED.contains(&name)
}

/// The options of a `mount` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub volume: String,
    pub etcd: String,
    pub fs_type: String,
    pub read_only: bool,
    /// Pass discards to the volume (TRIM on the device, `discard` mount option).
    pub trim: bool,
    /// TLS towards etcd (`etcdCAFile`, `etcdCertFile`, `etcdKeyFile`).
    pub etcd_tls: Option<torus_backends::metadata::EtcdTls>,
    /// The storage peers' transport (`peerTransport`) and this client's
    /// certificate from the cluster CA (`peerCertFile`, `peerKeyFile`,
    /// `peerCAFile`).
    pub peer: crate::client::PeerOptions,
}

/// Parse `args` (after the program name) into a call, or a failure reply.
pub fn parse_call(args: &[String]) -> Result<Call, Reply> {
    let Some(name) = args.first() else {
        return Err(Reply::failure(
            "no call given: expected init, mount DIR JSON or unmount DIR",
        ));
    };
    let rest = &args[1..];
    match name.as_str() {
        "init" => Ok(Call::Init),
        "mount" => {
            let (Some(dir), Some(json)) = (rest.first(), rest.get(1)) else {
                return Err(Reply::failure(
                    "mount needs two arguments: the mount directory and the options as JSON",
                ));
            };
            let options = MountOptions::from_json(json).map_err(Reply::failure)?;
            Ok(Call::Mount {
                dir: PathBuf::from(dir),
                options: Box::new(options),
            })
        }
        "unmount" => match rest.first() {
            Some(dir) => Ok(Call::Unmount {
                dir: PathBuf::from(dir),
            }),
            None => Err(Reply::failure(
                "unmount needs one argument: the mount directory",
            )),
        },
        other if NOT_SUPPORTED.contains(&other) => Ok(Call::NotSupported(other.to_string())),
        other => Err(Reply::not_supported(format!("unknown call {other:?}"))),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        other => Err(format!(
            "option {key:?} must be true or false, not {other:?}"
        )),
    }
}

impl MountOptions {
    /// Parse and validate the JSON kubelet passes to `mount`.
    pub fn from_json(json: &str) -> Result<MountOptions, String> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| format!("the mount options are not valid JSON ({e}): {json:?}"))?;
        let Value::Object(map) = value else {
            return Err(format!(
                "the mount options must be a JSON object, not {json}"
            ));
        };
        MountOptions::from_map(&map)
    }

    fn from_map(map: &Map<String, Value>) -> Result<MountOptions, String> {
        let get = |key: &str| -> Result<Option<String>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Bool(b)) => Ok(Some(b.to_string())),
                Some(Value::Number(n)) => Ok(Some(n.to_string())),
                Some(other) => Err(format!("option {key:?} must be a string, not {other}")),
            }
        };
        let volume = get("volume")?.filter(|v| !v.is_empty()).ok_or_else(|| {
            "the \"volume\" option is missing: set options.volume to the torus volume name in the pod's flexVolume".to_string()
        })?;
        let etcd = get("etcd")?
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_ETCD.to_string());
        let fs_type = get("kubernetes.io/fsType")?
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "ext4".to_string());
        if !FS_TYPES.contains(&fs_type.as_str()) {
            return Err(format!(
                "fsType {fs_type:?} is not supported: use one of {}",
                FS_TYPES.join(", ")
            ));
        }
        let read_only = match get("kubernetes.io/readwrite")?.as_deref() {
            None | Some("") | Some("rw") => false,
            Some("ro") => true,
            Some(other) => {
                return Err(format!(
                    "kubernetes.io/readwrite must be \"rw\" or \"ro\", not {other:?}"
                ))
            }
        };
        let trim = match get("trim")? {
            Some(v) => parse_bool("trim", &v)?,
            None => false,
        };
        // Writes are acknowledged when every replica has them; the original's
        // weaker levels ("one", "local") would trade that away, so they are
        // refused rather than silently ignored.
        match get("writeLevel")?.as_deref() {
            None | Some("") | Some("all") => {}
            Some(other) => {
                return Err(format!(
                    "writeLevel {other:?} is not supported: torus acknowledges a write when every replica has it (writeLevel \"all\")"
                ))
            }
        }
        let path = |key: &str| get(key).map(|v| v.filter(|p| !p.is_empty()).map(PathBuf::from));
        let etcd_tls = crate::client::etcd_tls(
            path("etcdCAFile")?,
            path("etcdCertFile")?,
            path("etcdKeyFile")?,
        )?;
        let peer = crate::client::peer_options(
            get("peerTransport")?.as_deref(),
            path("peerCertFile")?,
            path("peerKeyFile")?,
            path("peerCAFile")?,
        )?;
        Ok(MountOptions {
            volume,
            etcd,
            fs_type,
            read_only,
            trim,
            etcd_tls,
            peer,
        })
    }
}

/// The reply to one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reply {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    pub attach: bool,
}

impl Reply {
    pub fn success() -> Reply {
        Reply {
            status: "Success",
            message: None,
            capabilities: None,
        }
    }
    pub fn success_with(message: impl Into<String>) -> Reply {
        Reply {
            message: Some(message.into()),
            ..Reply::success()
        }
    }
    /// `init`: no attach/detach phase; mount does everything on the node.
    pub fn init() -> Reply {
        Reply {
            capabilities: Some(Capabilities { attach: false }),
            ..Reply::success()
        }
    }
    pub fn failure(message: impl Into<String>) -> Reply {
        Reply {
            status: "Failure",
            message: Some(message.into()),
            capabilities: None,
        }
    }
    pub fn not_supported(message: impl Into<String>) -> Reply {
        Reply {
            status: "Not supported",
            message: Some(message.into()),
            capabilities: None,
        }
    }
    /// The one line printed on stdout.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"status":"Failure","message":"cannot encode the reply"}"#.into()
        })
    }
    /// The exit status: 0 for success, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.status == "Success" {
            0
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn init_reports_no_attach() {
        assert_eq!(parse_call(&args(&["init"])), Ok(Call::Init));
        assert_eq!(
            Reply::init().to_json(),
            r#"{"status":"Success","capabilities":{"attach":false}}"#
        );
        assert_eq!(Reply::init().exit_code(), 0);
    }

    #[test]
    fn mount_options_take_kubelet_keys_and_defaults() {
        let json = r#"{"volume":"pad","etcd":"10.3.0.100:2379","kubernetes.io/fsType":"ext4",
            "kubernetes.io/readwrite":"rw","kubernetes.io/pod.name":"etherpad-1",
            "kubernetes.io/pvOrVolumeName":"pad"}"#;
        let call = parse_call(&args(&["mount", "/var/lib/kubelet/x", json])).unwrap();
        assert_eq!(
            call,
            Call::Mount {
                dir: "/var/lib/kubelet/x".into(),
                options: Box::new(MountOptions {
                    volume: "pad".into(),
                    etcd: "10.3.0.100:2379".into(),
                    fs_type: "ext4".into(),
                    read_only: false,
                    trim: false,
                    etcd_tls: None,
                    peer: Default::default(),
                })
            }
        );
        let o = MountOptions::from_json(r#"{"volume":"v"}"#).unwrap();
        assert_eq!(o.etcd, DEFAULT_ETCD);
        assert_eq!(o.fs_type, "ext4");
        assert!(!o.read_only && !o.trim);
        let o = MountOptions::from_json(
            r#"{"volume":"v","kubernetes.io/readwrite":"ro","trim":"true","writeLevel":"all","kubernetes.io/fsType":"xfs"}"#,
        )
        .unwrap();
        assert!(o.read_only && o.trim);
        assert_eq!(o.fs_type, "xfs");
        let o = MountOptions::from_json(
            r#"{"volume":"v","etcdCAFile":"/ca.pem","etcdCertFile":"/c.pem","etcdKeyFile":"/c.key"}"#,
        )
        .unwrap();
        let tls = o.etcd_tls.unwrap();
        assert_eq!(tls.ca_file, PathBuf::from("/ca.pem"));
        assert_eq!(tls.key_file, Some(PathBuf::from("/c.key")));
        assert_eq!(
            o.peer,
            crate::client::PeerOptions::default(),
            "plain TCP by default"
        );
        let o = MountOptions::from_json(
            r#"{"volume":"v","peerTransport":"quic","peerCertFile":"/n.crt","peerKeyFile":"/n.key","peerCAFile":"/ca.crt"}"#,
        )
        .unwrap();
        assert_eq!(o.peer.kind, torus::config::TransportKind::Quic);
        let files = o.peer.tls.unwrap();
        assert_eq!(
            (files.cert, files.key, files.ca),
            ("/n.crt".into(), "/n.key".into(), "/ca.crt".into())
        );
    }

    #[test]
    fn bad_options_say_what_to_fix() {
        let err = |j: &str| MountOptions::from_json(j).unwrap_err();
        assert!(err("{}").contains("\"volume\" option is missing"));
        assert!(err(r#"{"volume":""}"#).contains("\"volume\" option is missing"));
        assert!(err("{not json").contains("not valid JSON"));
        assert!(err("[1]").contains("must be a JSON object"));
        assert!(err(r#"{"volume":"v","kubernetes.io/fsType":"ntfs"}"#).contains("ntfs"));
        assert!(
            err(r#"{"volume":"v","kubernetes.io/readwrite":"rx"}"#).contains("\"rw\" or \"ro\"")
        );
        assert!(err(r#"{"volume":"v","trim":"maybe"}"#).contains("true or false"));
        assert!(err(r#"{"volume":"v","writeLevel":"one"}"#).contains("writeLevel"));
        assert!(err(r#"{"volume":["v"]}"#).contains("must be a string"));
        assert!(err(r#"{"volume":"v","etcdCertFile":"/c.pem","etcdKeyFile":"/k"}"#).contains("CA"));
        assert!(
            err(r#"{"volume":"v","etcdCAFile":"/ca","etcdCertFile":"/c.pem"}"#)
                .contains("give both or neither")
        );
        assert!(err(r#"{"volume":"v","peerTransport":"udp"}"#).contains("tcp, quic"));
        assert!(err(r#"{"volume":"v","peerTransport":"quic"}"#).contains("torusctl certs"));
        assert!(
            err(r#"{"volume":"v","peerCertFile":"/n.crt","peerCAFile":"/ca"}"#)
                .contains("all three or none")
        );
    }

    #[test]
    fn calls_and_their_failures() {
        assert!(parse_call(&[])
            .unwrap_err()
            .message
            .unwrap()
            .contains("no call"));
        let r = parse_call(&args(&["mount", "/d"])).unwrap_err();
        assert_eq!(r.status, "Failure");
        assert_eq!(
            parse_call(&args(&["unmount", "/d"])),
            Ok(Call::Unmount { dir: "/d".into() })
        );
        assert!(parse_call(&args(&["unmount"])).is_err());
        for c in NOT_SUPPORTED {
            assert_eq!(
                parse_call(&args(&[c, "x"])),
                Ok(Call::NotSupported(c.to_string()))
            );
            assert!(is_flex_call(c));
        }
        let r = parse_call(&args(&["frobnicate"])).unwrap_err();
        assert_eq!(r.status, "Not supported");
        assert!(!is_flex_call("nbd"));
    }

    #[test]
    fn replies_are_one_json_object() {
        let f = Reply::failure("x \"y\"");
        assert_eq!(f.to_json(), r#"{"status":"Failure","message":"x \"y\""}"#);
        assert_eq!(f.exit_code(), 1);
        assert_eq!(Reply::success().to_json(), r#"{"status":"Success"}"#);
        assert_eq!(Reply::not_supported("n").exit_code(), 1);
    }
}
