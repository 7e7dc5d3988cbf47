//! The `torusblk` binary run exactly as kubelet runs a FlexVolume driver
//! (argv, JSON in, one JSON object out, exit status), against real etcd and a
//! real `torusd`; plus `torusblk nbd`, `torusblk nbdserve` and the container
//! entrypoint.
//!
//! The mount path attaches through `nbdfuse` and a loop device
//! (`TORUSBLK_ATTACHER=nbdfuse`, test-only) because this machine has no `nbd`
//! kernel module; everything after the attach (blkid, mkfs, mount, unmount,
//! the attach process, the lock) is the production path.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use torus_integration::etcd::EtcdServer;
use torus_integration::{
    bin, checksum, ctl_etcd, pattern, require, run_ok, run_with_timeout, Torusd,
};

/// etcd, one storage node, and a 64 MiB volume `pad`.
struct Cluster {
    etcd: EtcdServer,
    node: Torusd,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let etcd = EtcdServer::start();
        let dir = tempfile::tempdir().unwrap();
        ctl_etcd(&etcd.endpoint(), &["init", "--block-size", "1MiB"]);
        let node = Torusd::start_cluster(
            &dir.path().join("n0"),
            &etcd.endpoint(),
            &["--size", "512MiB"],
        );
        ctl_etcd(
            &etcd.endpoint(),
            &["volume", "create-block", "pad", "64MiB"],
        );
        Cluster {
            etcd,
            node,
            _dir: dir,
        }
    }
    fn etcd(&self) -> String {
        self.etcd.endpoint()
    }
}

/// One kubelet host: its state directory.
struct Host {
    state: PathBuf,
    attacher: &'static str,
}

struct Called {
    reply: Value,
    code: i32,
    raw: String,
}

impl Host {
    fn new(root: &Path, name: &str) -> Host {
        Host {
            state: root.join(name).join("state"),
            attacher: "nbdfuse",
        }
    }

    /// Run one driver call as kubelet does; the whole output must be one JSON object.
    fn call(&self, args: &[&str]) -> Called {
        let out = run_with_timeout(
            Command::new(bin("torusblk"))
                .args(args)
                .env("TORUSBLK_ATTACHER", self.attacher)
                .env("TORUSBLK_STATE_DIR", &self.state)
                // Leave this machine's cgroups alone (unit-tested on a fake root).
                .env("TORUSBLK_CGROUP_ROOT", "")
                .env_remove("TORUS_ETCD"),
            Duration::from_secs(180),
        );
        // kubelet parses stdout and stderr together.
        let mut raw = String::from_utf8_lossy(&out.stdout).into_owned();
        raw.push_str(&String::from_utf8_lossy(&out.stderr));
        let reply: Value = serde_json::from_str(raw.trim()).unwrap_or_else(|e| {
            panic!("torusblk {args:?} printed something that is not one JSON object ({e}): {raw:?}")
        });
        Called {
            reply,
            code: out.status.code().unwrap_or(-1),
            raw,
        }
    }

    fn mount(&self, dir: &Path, opts: &Value) -> Called {
        self.call(&["mount", &dir.to_string_lossy(), &opts.to_string()])
    }

    fn unmount(&self, dir: &Path) -> Called {
        self.call(&["unmount", &dir.to_string_lossy()])
    }
}

fn assert_success(c: &Called, what: &str) {
    assert_eq!(c.reply["status"], "Success", "{what}: {}", c.raw);
    assert_eq!(c.code, 0, "{what}: {}", c.raw);
}

fn assert_failure(c: &Called, what: &str, needle: &str) {
    assert_eq!(c.reply["status"], "Failure", "{what}: {}", c.raw);
    assert_eq!(c.code, 1, "{what}: {}", c.raw);
    let msg = c.reply["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "{what}: expected {needle:?} in {msg:?}"
    );
}

fn is_mounted(dir: &Path) -> bool {
    let want = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*want.to_string_lossy()))
}

fn mount_options_of(dir: &Path) -> String {
    let want = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&want))
        .and_then(|l| l.split(' ').nth(5))
        .unwrap_or_default()
        .to_string()
}

/// The attach processes recorded in a state directory.
fn recorded_pids(state: &Path) -> Vec<u32> {
    std::fs::read_dir(state)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
                .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().next() != Some("Z"))
        })
        .unwrap_or(false)
}

/// Unmounts through the driver (and then by force) on drop, so a failing
/// test leaves no mounts, loop devices, FUSE mounts or attach processes.
struct Cleanup(Vec<(PathBuf, PathBuf, &'static str)>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (state, dir, attacher) in &self.0 {
            let _ = Command::new(bin("torusblk"))
                .args(["unmount", &dir.to_string_lossy()])
                .env("TORUSBLK_ATTACHER", attacher)
                .env("TORUSBLK_STATE_DIR", state)
                .output();
            let _ = Command::new("umount").arg("-l").arg(dir).output();
            for pid in recorded_pids(state) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .output();
            }
        }
    }
}

fn require_mount_tools() {
    for p in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "blkid",
        "mkfs.ext4",
        "mkfs.ext3",
        "mount",
        "umount",
    ] {
        require(p);
    }
}

fn opts(volume: &str, etcd: &str, extra: &[(&str, &str)]) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("volume".into(), volume.into());
    m.insert("etcd".into(), etcd.into());
    m.insert("kubernetes.io/fsType".into(), "ext4".into());
    m.insert("kubernetes.io/readwrite".into(), "rw".into());
    m.insert("kubernetes.io/pod.name".into(), "etherpad-0".into());
    for (k, v) in extra {
        m.insert(k.to_string(), Value::String(v.to_string()));
    }
    Value::Object(m)
}

#[test]
fn init_and_the_calls_this_driver_does_not_make() {
    let root = tempfile::tempdir().unwrap();
    let host = Host::new(root.path(), "a");
    let c = host.call(&["init"]);
    assert_eq!(
        c.raw.trim(),
        r#"{"status":"Success","capabilities":{"attach":false}}"#
    );
    assert_eq!(c.code, 0);
    for call in [
        "attach",
        "detach",
        "waitforattach",
        "isattached",
        "mountdevice",
        "unmountdevice",
        "getvolumename",
        "expandvolume",
        "expandfs",
    ] {
        let c = host.call(&[call, "{}"]);
        assert_eq!(c.reply["status"], "Not supported", "{call}: {}", c.raw);
        assert_eq!(c.code, 1, "{call}");
    }
}

#[test]
fn mount_failures_are_one_json_object_with_a_reason() {
    let cluster = Cluster::start();
    let root = tempfile::tempdir().unwrap();
    let host = Host::new(root.path(), "a");
    let dir = root.path().join("mnt");
    let d = dir.to_string_lossy().into_owned();
    let e = cluster.etcd();
    assert_failure(
        &host.call(&["mount", &d, r#"{"etcd":"x"}"#]),
        "no volume",
        "\"volume\" option is missing",
    );
    assert_failure(
        &host.call(&["mount", &d, "{volume: pad"]),
        "bad JSON",
        "not valid JSON",
    );
    assert_failure(&host.call(&["mount", &d]), "no JSON", "two arguments");
    assert_failure(&host.call(&["unmount"]), "no dir", "one argument");
    assert_failure(
        &host.mount(&dir, &opts("pad", &e, &[("kubernetes.io/fsType", "vfat")])),
        "fsType",
        "fsType \"vfat\" is not supported",
    );
    assert_failure(
        &host.mount(&dir, &opts("pad", &e, &[("kubernetes.io/readwrite", "rx")])),
        "readwrite",
        "\"rw\" or \"ro\"",
    );
    assert_failure(
        &host.mount(&dir, &opts("pad", &e, &[("writeLevel", "local")])),
        "writeLevel",
        "writeLevel \"local\" is not supported",
    );
    require_mount_tools();
    assert_failure(
        &host.mount(&dir, &opts("nope", &e, &[])),
        "unknown volume",
        "volume \"nope\" does not exist",
    );
    assert_failure(
        &host.mount(&dir, &opts("pad", "127.0.0.1:1", &[])),
        "etcd unreachable",
        "127.0.0.1:1",
    );
    // The kernel attacher where the nbd module is absent says so.
    if !Path::new("/sys/block/nbd0").exists() {
        let kernel = Host {
            attacher: "kernel",
            ..Host::new(root.path(), "k")
        };
        assert_failure(
            &kernel.mount(&dir, &opts("pad", &e, &[])),
            "no nbd module",
            "modprobe nbd",
        );
    }
    assert!(!is_mounted(&dir));
    // Nothing is left running or recorded after failures.
    assert!(recorded_pids(&host.state).is_empty());
    // Unmounting what was never mounted succeeds (kubelet retries unmounts).
    assert_success(&host.unmount(&dir), "unmount of nothing");
}

fn write_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("file{i}"),
                pattern(7 + i, (i as usize + 1) * 256 * 1024 + 17),
            )
        })
        .collect();
    std::fs::create_dir_all(dir.join("pad")).unwrap();
    for (name, data) in &files {
        std::fs::write(dir.join("pad").join(name), data).unwrap();
    }
    files
}

fn check_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let back =
            std::fs::read(dir.join("pad").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(checksum(&back), checksum(data), "{name} changed");
    }
}

/// The seed demo's path: mount on one host, write, unmount; the volume is
/// locked while mounted; mount on another host and the files are there.
#[test]
fn mount_write_unmount_then_mount_on_another_host_keeps_the_files() {
    require_mount_tools();
    let cluster = Cluster::start();
    let e = cluster.etcd();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (Host::new(root.path(), "a"), Host::new(root.path(), "b"));
    let (dir_a, dir_b) = (
        root.path().join("a/pod/volume"),
        root.path().join("b/pod/volume"),
    );
    let _cleanup = Cleanup(vec![
        (a.state.clone(), dir_a.clone(), "nbdfuse"),
        (b.state.clone(), dir_b.clone(), "nbdfuse"),
    ]);

    assert_success(&a.mount(&dir_a, &opts("pad", &e, &[])), "mount on a");
    assert!(is_mounted(&dir_a));
    let pids = recorded_pids(&a.state);
    assert_eq!(pids.len(), 1, "one attach process recorded");
    assert!(alive(pids[0]));
    let files = write_files(&dir_a);
    // A second mount of the same volume on the same dir is a no-op success.
    assert_success(&a.mount(&dir_a, &opts("pad", &e, &[])), "mount again");
    // Another host cannot mount it while a holds it.
    assert_failure(
        &b.mount(&dir_b, &opts("pad", &e, &[])),
        "locked",
        "is in use elsewhere",
    );
    assert!(!is_mounted(&dir_b));
    assert!(recorded_pids(&b.state).is_empty());

    assert_success(&a.unmount(&dir_a), "unmount on a");
    assert!(!is_mounted(&dir_a));
    assert!(!alive(pids[0]), "the attach process exited");
    assert!(recorded_pids(&a.state).is_empty(), "the record is gone");
    let left: Vec<_> = std::fs::read_dir(&a.state)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "nothing left in the state directory: {left:?}"
    );

    assert_success(&b.mount(&dir_b, &opts("pad", &e, &[])), "mount on b");
    check_files(&dir_b, &files);
    assert_success(&b.unmount(&dir_b), "unmount on b");
    assert!(!is_mounted(&dir_b));
    // The lock was released: a mounts it again, read-only.
    assert_success(
        &a.mount(
            &dir_a,
            &opts("pad", &e, &[("kubernetes.io/readwrite", "ro")]),
        ),
        "read-only mount",
    );
    assert!(
        mount_options_of(&dir_a).split(',').any(|o| o == "ro"),
        "{}",
        mount_options_of(&dir_a)
    );
    check_files(&dir_a, &files);
    assert!(
        std::fs::write(dir_a.join("pad/new"), b"x").is_err(),
        "a read-only mount refuses writes"
    );
    assert_success(&a.unmount(&dir_a), "unmount read-only");
    // The attach processes left the peer registry with their leases.
    let peers: Value = serde_json::from_str(&ctl_etcd(&e, &["list-peers", "--json"])).unwrap();
    assert_eq!(peers.as_array().map(Vec::len), Some(1), "{peers}");
}

/// A device holding another filesystem is never reformatted; a blank one
/// mounted read-only is not formatted either.
#[test]
fn never_reformats_and_never_formats_read_only() {
    require_mount_tools();
    let cluster = Cluster::start();
    let e = cluster.etcd();
    ctl_etcd(&e, &["volume", "create-block", "blank", "64MiB"]);
    let root = tempfile::tempdir().unwrap();
    let a = Host::new(root.path(), "a");
    let dir = root.path().join("mnt");
    let _cleanup = Cleanup(vec![(a.state.clone(), dir.clone(), "nbdfuse")]);

    assert_failure(
        &a.mount(
            &dir,
            &opts("blank", &e, &[("kubernetes.io/readwrite", "ro")]),
        ),
        "blank read-only",
        "no filesystem and the mount is read-only",
    );
    assert!(recorded_pids(&a.state).is_empty());

    assert_success(
        &a.mount(&dir, &opts("pad", &e, &[("kubernetes.io/fsType", "ext3")])),
        "ext3",
    );
    let files = write_files(&dir);
    assert_success(&a.unmount(&dir), "unmount ext3");
    assert_failure(
        &a.mount(&dir, &opts("pad", &e, &[])),
        "ext3 as ext4",
        "already holds a ext3 filesystem, not ext4: refusing to reformat",
    );
    assert!(!is_mounted(&dir));
    assert!(
        recorded_pids(&a.state).is_empty(),
        "the failed mount cleaned up"
    );
    // The lock was released by the failed mount, and the data is intact.
    assert_success(
        &a.mount(&dir, &opts("pad", &e, &[("kubernetes.io/fsType", "ext3")])),
        "ext3 again",
    );
    check_files(&dir, &files);
    assert_success(&a.unmount(&dir), "unmount");
}

/// `torusblk nbd`: the kernel path. Without the nbd module (as here) it
/// fails at once with the reason; where `/dev/nbd0` exists it attaches for
/// real, and `--detach` ends it.
#[test]
fn nbd_attach_says_why_it_cannot_run_or_attaches() {
    let cluster = Cluster::start();
    let e = cluster.etcd();
    if !Path::new("/sys/block/nbd0").exists() {
        let out = run_with_timeout(
            Command::new(bin("torusblk")).args(["--etcd", &e, "nbd", "pad"]),
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(1));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("modprobe nbd"), "{stdout}");
        let out = run_with_timeout(
            Command::new(bin("torusblk")).args(["nbd", "--detach", "/dev/nbd0"]),
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("modprobe nbd"));
        return;
    }
    let mut child = Command::new(bin("torusblk"))
        .args(["--etcd", &e, "nbd", "pad"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: Value = serde_json::from_str(line.trim()).unwrap();
    let dev = ready["device"]
        .as_str()
        .unwrap_or_else(|| panic!("attach failed: {line}"))
        .to_string();
    let data = pattern(3, 1 << 20);
    std::fs::write(&dev, &data).unwrap();
    let back = std::fs::read(&dev).unwrap();
    assert_eq!(checksum(&back[..data.len()]), checksum(&data));
    run_ok(
        Command::new(bin("torusblk")).args(["nbd", "--detach", &dev]),
        Duration::from_secs(30),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "torusblk nbd did not exit after --detach"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `torusblk nbdserve`: a client machine serves every volume without a pool.
#[test]
fn nbdserve_serves_every_volume_without_a_pool() {
    require("nbdcopy");
    require("nbdinfo");
    let cluster = Cluster::start();
    let e = cluster.etcd();
    ctl_etcd(&e, &["volume", "create-block", "other", "8MiB"]);
    let mut child = Command::new(bin("torusblk"))
        .args(["--etcd", &e, "nbdserve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nbd="))
        .unwrap_or_else(|| panic!("no ready line: {line:?}"))
        .to_string();
    let list = run_ok(
        Command::new("nbdinfo").args(["--list", &format!("nbd://{addr}")]),
        Duration::from_secs(30),
    );
    assert!(list.contains("pad") && list.contains("other"), "{list}");
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("in"), tmp.path().join("out"));
    std::fs::write(&src, pattern(9, 8 << 20)).unwrap();
    let uri = format!("nbd://{addr}/other");
    run_ok(
        Command::new("nbdcopy").arg("--flush").arg(&src).arg(&uri),
        Duration::from_secs(60),
    );
    run_ok(
        Command::new("nbdcopy").arg(&uri).arg(&dst),
        Duration::from_secs(60),
    );
    assert_eq!(
        checksum(&std::fs::read(&dst).unwrap()),
        checksum(&std::fs::read(&src).unwrap())
    );
    // It contributes no pool and is not in the ring.
    let peers: Value = serde_json::from_str(&ctl_etcd(&e, &["list-peers", "--json"])).unwrap();
    let members = peers
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["member"] == "OK")
        .count();
    assert_eq!(
        members, 1,
        "only the storage node is a ring member: {peers}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "nbdserve did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    let peers: Value = serde_json::from_str(&ctl_etcd(&e, &["list-peers", "--json"])).unwrap();
    assert_eq!(peers.as_array().map(Vec::len), Some(1), "it left: {peers}");
}

/// The container entrypoint maps the environment to flags torusd accepts:
/// it starts a real node on etcd and installs the FlexVolume driver.
#[test]
fn entrypoint_starts_torusd_from_the_environment_and_installs_the_driver() {
    let etcd = EtcdServer::start();
    ctl_etcd(&etcd.endpoint(), &["init"]);
    let tmp = tempfile::tempdir().unwrap();
    let (host, port) = etcd
        .endpoint()
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap();
    let plugin = tmp.path().join("plugin");
    let mut child = Command::new(bin("torus-entrypoint"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs([
            ("ETCD_HOST", host.as_str()),
            ("ETCD_PORT", port.as_str()),
            ("STORAGE_SIZE", "256MiB"),
            ("LISTEN_HOST", "127.0.0.1"),
            ("LISTEN_HTTP_PORT", "0"),
            ("LISTEN_NBD_PORT", "0"),
            ("PEER_ADDRESS", "127.0.0.1:0"),
            ("AUTO_JOIN", "1"),
            ("DEBUG_INIT", "0"),
            ("DEBUG", "1"),
            ("DROP_MOUNT_BIN", "1"),
        ])
        .env("DATA_DIR", tmp.path().join("data"))
        .env("PLUGIN_DIR", &plugin)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("torusd ready:"),
        "torusd did not start from the environment: {line:?}"
    );
    let driver = plugin.join("coreos.com~torus/torus");
    let init = run_ok(Command::new(&driver).arg("init"), Duration::from_secs(10));
    assert_eq!(
        init.trim(),
        r#"{"status":"Success","capabilities":{"attach":false}}"#
    );
    let peers: Value =
        serde_json::from_str(&ctl_etcd(&etcd.endpoint(), &["list-peers", "--json"])).unwrap();
    assert_eq!(peers.as_array().map(|p| p.len()), Some(1), "{peers}");
    // A bad value stops it with the variable's name.
    let out = run_with_timeout(
        Command::new(bin("torus-entrypoint")).env("STORAGE_SIZE", "lots"),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("STORAGE_SIZE"));
}

/// Run `torusblk ARGS` (an `nbd` attach through the test-only nbdfuse
/// attacher), write through the device, check `node` refuses the volume
/// while it is attached, SIGTERM it, and check what was written is on the
/// volume (read back through `node`).
fn nbd_attach_write_sigterm(node: &Torusd, args: &[&str]) {
    for p in ["nbdfuse", "fusermount3", "losetup", "nbdcopy"] {
        require(p);
    }
    let mut child = Command::new(bin("torusblk"))
        .args(args)
        .env("TORUSBLK_ATTACHER", "nbdfuse")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: Value = serde_json::from_str(line.trim()).unwrap_or_default();
    let Some(dev) = ready["device"].as_str().map(str::to_string) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("attach failed: {line}");
    };
    let data = pattern(11, 4 << 20);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &data));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Through etcd the volume is locked by torusblk while attached.
    let second_open = run_with_timeout(
        Command::new("nbdcopy").arg(node.uri("pad")).arg(&out),
        Duration::from_secs(30),
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("torusblk nbd did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    written.unwrap();
    if !args.contains(&"--server") {
        assert!(
            !second_open.status.success(),
            "the volume is locked while attached"
        );
    }
    assert!(status.success(), "{status}");
    run_ok(
        Command::new("nbdcopy").arg(node.uri("pad")).arg(&out),
        Duration::from_secs(60),
    );
    let back = std::fs::read(&out).unwrap();
    assert_eq!(checksum(&back[..data.len()]), checksum(&data));
}

/// `torusblk nbd` through etcd serves until SIGTERM, holds the lock, then
/// flushes and releases: the storage node reads what it wrote.
#[test]
fn nbd_serves_until_sigterm_then_flushes_and_releases() {
    let cluster = Cluster::start();
    let e = cluster.etcd();
    nbd_attach_write_sigterm(&cluster.node, &["--etcd", &e, "nbd", "pad"]);
}

/// `torusblk nbd --server`: the embedded single node, no etcd.
#[test]
fn nbd_attaches_an_export_of_the_embedded_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Torusd::start(&dir.path().join("n"), &["--size", "256MiB"]);
    node.ctl_ok(&["volume", "create-block", "pad", "64MiB"]);
    let server = node.nbd.to_string();
    nbd_attach_write_sigterm(&node, &["nbd", "pad", "--server", &server]);
}

/// etcd over TLS with client certificates: the mount options carry the
/// files, and without them the failure names etcd.
#[test]
fn mount_through_etcd_with_tls() {
    require_mount_tools();
    use torus_integration::etcd::TestCertificates;
    let root = tempfile::tempdir().unwrap();
    let certs = TestCertificates::generate(&root.path().join("certs"));
    let etcd = EtcdServer::start_tls(certs.server_tls());
    let e = etcd.endpoint();
    let (ca, cert, key) = (
        certs.ca_file.to_string_lossy().into_owned(),
        certs.client_cert.to_string_lossy().into_owned(),
        certs.client_key.to_string_lossy().into_owned(),
    );
    let tls = [
        "--etcd-ca-file",
        ca.as_str(),
        "--etcd-cert-file",
        cert.as_str(),
        "--etcd-key-file",
        key.as_str(),
    ];
    let ctl = |args: &[&str]| {
        run_ok(
            Command::new(bin("torusctl"))
                .args(["--etcd", &e])
                .args(tls)
                .args(args),
            Duration::from_secs(30),
        )
    };
    ctl(&["init", "--block-size", "1MiB"]);
    let mut node_args = vec!["--size", "256MiB"];
    node_args.extend(tls);
    let _node = Torusd::start_cluster(&root.path().join("n0"), &e, &node_args);
    ctl(&["volume", "create-block", "pad", "64MiB"]);

    let host = Host::new(root.path(), "a");
    let dir = root.path().join("mnt");
    let _cleanup = Cleanup(vec![(host.state.clone(), dir.clone(), "nbdfuse")]);
    let c = host.mount(&dir, &opts("pad", &e, &[("etcdCAFile", &ca)]));
    assert_failure(&c, "no client certificate", &e);
    let with_tls = opts(
        "pad",
        &e,
        &[
            ("etcdCAFile", &ca),
            ("etcdCertFile", &cert),
            ("etcdKeyFile", &key),
        ],
    );
    assert_success(&host.mount(&dir, &with_tls), "mount over TLS");
    let files = write_files(&dir);
    check_files(&dir, &files);
    assert_success(&host.unmount(&dir), "unmount");
    assert!(!is_mounted(&dir));
}
