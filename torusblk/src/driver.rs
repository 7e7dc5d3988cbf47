//! The FlexVolume driver's `mount` and `unmount`, without systemd or D-Bus.
//!
//! `mount` starts a detached attach process (`torusblk attach-daemon`, in its
//! own process group so kubelet's call can return), waits for its one-line
//! report, records its pid in the state directory, then creates the
//! filesystem if the device is blank and mounts it. `unmount` finds the
//! record by mount directory, unmounts, sends SIGTERM to the attach process
//! and waits (bounded) until it has detached, flushed and released the lock.
//!
//! State lives in `TORUSBLK_STATE_DIR` (default `/run/torus/flexvolume`):
//! `<key>.json` (the record), `<key>.log` (the attach process's log),
//! `<key>.d/` (its private directory).

use crate::attach::{AttacherKind, Ready};
use crate::flex::{MountOptions, Reply};
use crate::fs;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable overriding the state directory.
pub const STATE_DIR_ENV: &str = "TORUSBLK_STATE_DIR";
pub const DEFAULT_STATE_DIR: &str = "/run/torus/flexvolume";

/// How long `mount` waits for the attach process to report.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a call waits for another call on the same directory.
const LOCK_TIMEOUT: Duration = Duration::from_secs(150);
/// How long `unmount` waits for the attach process to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(90);

/// What `mount` leaves behind for `unmount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub dir: PathBuf,
    pub volume: String,
    pub pid: u32,
    pub device: PathBuf,
    pub attacher: AttacherKind,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

/// A file-name-safe key for a mount directory: readable, and unique through
/// a hash of the full path.
pub fn key_for(dir: &Path) -> String {
    let text = dir.to_string_lossy();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let tail: String = text
        .rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("root")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{tail}-{h:016x}")
}

impl StateDir {
    pub fn from_env() -> StateDir {
        StateDir {
            root: std::env::var_os(STATE_DIR_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        }
    }
    fn path(&self, dir: &Path, ext: &str) -> PathBuf {
        self.root.join(format!("{}{ext}", key_for(dir)))
    }
    pub fn record_path(&self, dir: &Path) -> PathBuf {
        self.path(dir, ".json")
    }
    pub fn log_path(&self, dir: &Path) -> PathBuf {
        self.path(dir, ".log")
    }
    pub fn work_dir(&self, dir: &Path) -> PathBuf {
        self.path(dir, ".d")
    }
    pub fn load(&self, dir: &Path) -> Result<Option<Record>, String> {
        let p = self.record_path(dir);
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t).map(Some).map_err(|e| {
                format!(
                    "the state file {} is damaged ({e}): remove it after checking `mount` and `ps`",
                    p.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
        }
    }
    pub fn save(&self, r: &Record) -> Result<(), String> {
        let p = self.record_path(&r.dir);
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_string(r).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &p).map_err(|e| format!("cannot write {}: {e}", p.display()))
    }
    /// Serialise calls on one mount directory (kubelet may retry a call
    /// that timed out while the first is still running). Held until the
    /// returned lock is dropped; an unmount that finishes removes the lock
    /// file with [`DirLock::remove`].
    pub fn lock(&self, dir: &Path) -> Result<DirLock, String> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        std::fs::create_dir_all(&self.root).map_err(|e| {
            format!(
                "cannot create the state directory {}: {e}",
                self.root.display()
            )
        })?;
        let p = self.path(dir, ".lock");
        let deadline = Instant::now() + LOCK_TIMEOUT;
        loop {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
                .map_err(|e| format!("cannot open {}: {e}", p.display()))?;
            // SAFETY: flock on a descriptor owned by `f`, which outlives the call.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                // The holder before us may have removed the file after we
                // opened it: then we hold a lock nobody else will look at,
                // and must lock the file now at the path instead.
                let ours = f.metadata().map(|m| (m.dev(), m.ino()));
                let at_path = std::fs::metadata(&p).map(|m| (m.dev(), m.ino()));
                match (ours, at_path) {
                    (Ok(a), Ok(b)) if a == b => return Ok(DirLock { _file: f, path: p }),
                    _ => continue,
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "another mount or unmount of {} has been running for over {LOCK_TIMEOUT:?}",
                    dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn remove(&self, dir: &Path) {
        let _ = std::fs::remove_file(self.record_path(dir));
        let _ = std::fs::remove_dir_all(self.work_dir(dir));
        let _ = std::fs::remove_file(self.log_path(dir));
    }
}

/// The lock serialising calls on one mount directory ([`StateDir::lock`]).
pub struct DirLock {
    /// Held for its flock, which closing it releases.
    _file: std::fs::File,
    path: PathBuf,
}

impl DirLock {
    /// Removes the lock file, then releases the lock: for a directory whose
    /// volume is gone, so that lock files do not pile up in the state
    /// directory. A call waiting on the old file notices it was removed and
    /// locks a new one.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// Whether `pid` is the attach process of `record` (not a reused pid).
fn is_ours(record: &Record, state: &StateDir) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", record.pid)) else {
        return false;
    };
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let work = state.work_dir(&record.dir).to_string_lossy().into_owned();
    args.iter().any(|a| a == "attach-daemon") && args.contains(&work)
}

/// SIGTERM the attach process and wait (bounded) until it is gone.
fn stop_attach_process(record: &Record, state: &StateDir) -> Result<(), String> {
    if !alive(record.pid) || !is_ours(record, state) {
        return Ok(());
    }
    // SAFETY: kill(2) with a pid checked above to be our attach process.
    unsafe { libc::kill(record.pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while alive(record.pid) {
        if Instant::now() > deadline {
            return Err(format!(
                "the attach process (pid {}) of volume {:?} did not exit within {EXIT_TIMEOUT:?} after SIGTERM; see {}",
                record.pid,
                record.volume,
                state.log_path(&record.dir).display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The path of this program, to start the attach process with.
fn self_exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find the torusblk executable: {e}"))
}

/// FlexVolume `mount DIR JSON`.
pub fn mount(dir: &Path, opts: &MountOptions) -> Reply {
    let kind = match AttacherKind::from_env() {
        Ok(k) => k,
        Err(e) => return Reply::failure(e),
    };
    let state = StateDir::from_env();
    let _serial = match state.lock(dir) {
        Ok(f) => f,
        Err(e) => return Reply::failure(e),
    };
    match state.load(dir) {
        Err(e) => return Reply::failure(e),
        Ok(Some(r))
            if r.volume == opts.volume
                && alive(r.pid)
                && is_ours(&r, &state)
                && fs::is_mounted(dir) =>
        {
            return Reply::success_with(format!(
                "volume {:?} is already mounted on {}",
                r.volume,
                dir.display()
            ));
        }
        Ok(Some(r)) => {
            // A record from an earlier mount that did not finish or was not
            // unmounted: clean up what is left of it before starting over.
            if fs::is_mounted(dir) {
                return Reply::failure(format!(
                    "{} is already mounted (volume {:?} from an earlier mount): unmount it first",
                    dir.display(),
                    r.volume
                ));
            }
            if let Err(e) = stop_attach_process(&r, &state) {
                return Reply::failure(e);
            }
            state.remove(dir);
        }
        Ok(None) => {}
    }
    if fs::is_mounted(dir) {
        return Reply::failure(format!(
            "{} is already a mount point: refusing to mount volume {:?} over it",
            dir.display(),
            opts.volume
        ));
    }
    let record = match start_attach_process(dir, opts, kind, &state) {
        Ok(r) => r,
        Err(e) => return Reply::failure(e),
    };
    let undo = |e: String| {
        let _ = stop_attach_process(&record, &state);
        state.remove(dir);
        Reply::failure(e)
    };
    if let Err(e) = state.save(&record) {
        return undo(e);
    }
    if let Err(e) = fs::ensure_filesystem(&record.device, &opts.fs_type, opts.read_only) {
        return undo(format!("volume {:?}: {e}", opts.volume));
    }
    if let Err(e) = fs::mount(
        &record.device,
        dir,
        &opts.fs_type,
        opts.read_only,
        opts.trim,
    ) {
        return undo(format!("mounting volume {:?}: {e}", opts.volume));
    }
    Reply::success()
}

fn start_attach_process(
    dir: &Path,
    opts: &MountOptions,
    kind: AttacherKind,
    state: &StateDir,
) -> Result<Record, String> {
    let exe = self_exe()?;
    let work = state.work_dir(dir);
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let log_path = state.log_path(dir);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("attach-daemon")
        .args([
            "--volume",
            &opts.volume,
            "--etcd",
            &opts.etcd,
            "--attacher",
            kind.name(),
        ])
        .arg("--work-dir")
        .arg(&work);
    if let Some(tls) = &opts.etcd_tls {
        cmd.arg("--etcd-ca-file").arg(&tls.ca_file);
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            cmd.arg("--etcd-cert-file").arg(cert);
            cmd.arg("--etcd-key-file").arg(key);
        }
    }
    if opts.peer.kind == torus::config::TransportKind::Quic {
        cmd.args(["--peer-transport", "quic"]);
    }
    if let Some(tls) = &opts.peer.tls {
        cmd.arg("--peer-cert-file").arg(&tls.cert);
        cmd.arg("--peer-key-file").arg(&tls.key);
        cmd.arg("--peer-ca-file").arg(&tls.ca);
    }
    if opts.read_only {
        cmd.arg("--read-only");
    }
    if opts.trim {
        cmd.arg("--trim");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: kubelet's timeout or Ctrl-C on the caller
        // must not take the attached device down with it.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the attach process: {e}"))?;
    let pid = child.id();
    let stdout = child
        .stdout
        .take()
        .ok_or("no stdout from the attach process")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line);
        let _ = tx.send(r);
    });
    let log_hint = || format!("(log: {})", log_path.display());
    let line = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(l)) if !l.trim().is_empty() => l,
        Ok(_) => {
            let _ = child.wait();
            return Err(format!(
                "the attach process exited without reporting {}",
                log_hint()
            ));
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the attach process did not report within {READY_TIMEOUT:?} {}",
                log_hint()
            ));
        }
    };
    let ready: Ready = serde_json::from_str(line.trim())
        .map_err(|e| format!("the attach process reported {line:?}: {e} {}", log_hint()))?;
    match (ready.device, ready.error) {
        (Some(device), None) => Ok(Record {
            dir: dir.to_path_buf(),
            volume: opts.volume.clone(),
            pid,
            device,
            attacher: kind,
        }),
        (_, Some(e)) => {
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
        (None, None) => Err(format!(
            "the attach process reported no device {}",
            log_hint()
        )),
    }
}

/// FlexVolume `unmount DIR`.
pub fn unmount(dir: &Path) -> Reply {
    let state = StateDir::from_env();
    let serial = match state.lock(dir) {
        Ok(f) => f,
        Err(e) => return Reply::failure(e),
    };
    let record = match state.load(dir) {
        Ok(r) => r,
        Err(e) => return Reply::failure(e),
    };
    if fs::is_mounted(dir) {
        if let Err(e) = fs::umount(dir) {
            return Reply::failure(format!("cannot unmount {}: {e}", dir.display()));
        }
    }
    let Some(record) = record else {
        serial.remove();
        return Reply::success_with(format!(
            "{} was not mounted by torus: nothing to detach",
            dir.display()
        ));
    };
    if let Err(e) = stop_attach_process(&record, &state) {
        return Reply::failure(e);
    }
    state.remove(dir);
    serial.remove();
    Reply::success()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_safe_and_distinct() {
        let a = key_for(Path::new(
            "/var/lib/kubelet/pods/1/volumes/coreos.com~torus/pad",
        ));
        let b = key_for(Path::new(
            "/var/lib/kubelet/pods/2/volumes/coreos.com~torus/pad",
        ));
        assert_ne!(a, b);
        assert!(a.starts_with("pad-"));
        assert!(key_for(Path::new("/a b/../c"))
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert!(key_for(Path::new("/")).starts_with("root-"));
    }

    #[test]
    fn records_round_trip_and_missing_is_none() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir {
            root: d.path().to_path_buf(),
        };
        let dir = Path::new("/mnt/x");
        assert_eq!(s.load(dir).unwrap(), None);
        let r = Record {
            dir: dir.into(),
            volume: "v".into(),
            pid: 42,
            device: "/dev/nbd0".into(),
            attacher: AttacherKind::Kernel,
        };
        s.save(&r).unwrap();
        assert_eq!(s.load(dir).unwrap(), Some(r));
        std::fs::write(s.record_path(dir), "{").unwrap();
        assert!(s.load(dir).unwrap_err().contains("damaged"));
        s.remove(dir);
        assert_eq!(s.load(dir).unwrap(), None);
    }

    #[test]
    fn calls_on_one_directory_are_serialised() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir {
            root: d.path().join("state"),
        };
        let held = s.lock(Path::new("/mnt/x")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            let _l = s2.lock(Path::new("/mnt/x"));
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "second call waits"
        );
        s.lock(Path::new("/mnt/y")).unwrap();
        drop(held);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn a_removed_lock_file_is_not_locked_twice() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir {
            root: d.path().join("state"),
        };
        let dir = Path::new("/mnt/x");
        let held = s.lock(dir).unwrap();
        // A second call opens the file and waits for its lock.
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            let l = s2.lock(dir).unwrap();
            let _ = tx.send(());
            std::thread::sleep(Duration::from_millis(500));
            drop(l);
        });
        std::thread::sleep(Duration::from_millis(200));
        // The holder finishes an unmount: the file goes, then the lock.
        held.remove();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // The waiter holds a lock on a new file at the path, so a third
        // call waits for it rather than locking the file just removed.
        assert!(s.path(dir, ".lock").exists(), "the waiter made a new file");
        let third = std::time::Instant::now();
        let l = s.lock(dir).unwrap();
        assert!(
            third.elapsed() >= Duration::from_millis(100),
            "third call waited"
        );
        l.remove();
        assert!(!s.path(dir, ".lock").exists(), "no lock file left behind");
    }

    #[test]
    fn liveness_reads_proc() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
    }
}
