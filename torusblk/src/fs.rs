//! Filesystems on an attached device: detect what is on it (`blkid -p`),
//! create one only on a blank device, mount and unmount.
//!
//! The rule that protects users' data: a device with any signature on it (a
//! filesystem of another type, a partition table, RAID or LVM metadata) is
//! never formatted; mount fails and says what it found.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What `blkid -p` found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature at all.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// Something that is not a filesystem (partition table, raid member…).
    Other(String),
}

/// Parse `blkid -p -o export DEV` output (`KEY=value` lines).
pub fn parse_blkid_export(text: &str) -> Probe {
    let mut fs_type = None;
    let mut usage = None;
    let mut pt_type = None;
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "TYPE" => fs_type = Some(v.trim().to_string()),
                "USAGE" => usage = Some(v.trim().to_string()),
                "PTTYPE" => pt_type = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    match (fs_type, usage, pt_type) {
        (Some(t), Some(u), _) if u != "filesystem" => Probe::Other(format!("{t} ({u})")),
        (Some(t), _, _) => Probe::Filesystem(t),
        (None, _, Some(pt)) => Probe::Other(format!("a {pt} partition table")),
        (None, _, None) => Probe::Blank,
    }
}

/// Run a program with a time limit; stdout on success, or a message with its stderr.
pub fn run(cmd: &mut Command, limit: Duration) -> Result<std::process::Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("{desc}: the program is not installed"),
            _ => format!("cannot run {desc}: {e}"),
        })?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{desc} did not finish within {limit:?}"));
            }
            Err(e) => return Err(format!("waiting for {desc}: {e}")),
        }
    }
    child.wait_with_output().map_err(|e| format!("{desc}: {e}"))
}

/// Run a program that must succeed.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let desc = format!("{cmd:?}");
    let out = run(cmd, limit)?;
    if !out.status.success() {
        return Err(format!(
            "{desc} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Probe `device` for any signature.
pub fn probe(device: &Path) -> Result<Probe, String> {
    let out = run(
        Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(device),
        Duration::from_secs(30),
    )?;
    match out.status.code() {
        Some(0) => Ok(parse_blkid_export(&String::from_utf8_lossy(&out.stdout))),
        // 2: nothing found.
        Some(2) => Ok(Probe::Blank),
        _ => Err(format!(
            "blkid -p {} failed ({}): {}",
            device.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Make sure `device` holds a `fs_type` filesystem: create it on a blank
/// device, accept it when it is there, refuse anything else. Returns whether
/// it was created.
pub fn ensure_filesystem(device: &Path, fs_type: &str, read_only: bool) -> Result<bool, String> {
    match probe(device)? {
        Probe::Filesystem(t) if t == fs_type => Ok(false),
        Probe::Filesystem(t) => Err(format!(
            "the volume already holds a {t} filesystem, not {fs_type}: refusing to reformat it; set fsType: {t} in the pod spec, or copy the data off and wipe the volume"
        )),
        Probe::Other(what) => Err(format!(
            "the volume holds {what}, not a {fs_type} filesystem: refusing to format it"
        )),
        Probe::Blank if read_only => Err(format!(
            "the volume has no filesystem and the mount is read-only: mount it read-write once to create the {fs_type} filesystem"
        )),
        Probe::Blank => {
            let mkfs = format!("mkfs.{fs_type}");
            let mut cmd = Command::new(&mkfs);
            if fs_type.starts_with("ext") {
                // Lazy init keeps mkfs fast on a thin volume.
                cmd.args(["-q", "-E", "lazy_itable_init=1,lazy_journal_init=1"]);
            } else {
                cmd.arg("-q");
            }
            run_ok(cmd.arg(device), Duration::from_secs(300))
                .map_err(|e| format!("creating the {fs_type} filesystem: {e}"))?;
            Ok(true)
        }
    }
}

/// Mount `device` on `dir` (created if missing).
pub fn mount(
    device: &Path,
    dir: &Path,
    fs_type: &str,
    read_only: bool,
    discard: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut opts = vec![if read_only { "ro" } else { "rw" }];
    if discard {
        opts.push("discard");
    }
    run_ok(
        Command::new("mount")
            .args(["-t", fs_type, "-o", &opts.join(",")])
            .arg(device)
            .arg(dir),
        Duration::from_secs(60),
    )
    .map(|_| ())
}

/// Unmount `dir`.
pub fn umount(dir: &Path) -> Result<(), String> {
    run_ok(Command::new("umount").arg(dir), Duration::from_secs(120)).map(|_| ())
}

/// Decode the octal escapes (`\040` for a space) of /proc/self/mountinfo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `dir` is a mount point according to `mountinfo` text.
pub fn is_mounted_in(mountinfo: &str, dir: &Path) -> bool {
    let want = dir.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| unescape_mountinfo(p) == want)
}

/// Whether `dir` is a mount point now.
pub fn is_mounted(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| is_mounted_in(&t, &dir))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_output_is_classified() {
        assert_eq!(parse_blkid_export(""), Probe::Blank);
        assert_eq!(
            parse_blkid_export(
                "DEVNAME=/dev/loop0\nUUID=x\nVERSION=1.0\nTYPE=ext4\nUSAGE=filesystem\n"
            ),
            Probe::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid_export("TYPE=xfs\nUSAGE=filesystem"),
            Probe::Filesystem("xfs".into())
        );
        assert_eq!(
            parse_blkid_export("PTUUID=abc\nPTTYPE=gpt\n"),
            Probe::Other("a gpt partition table".into())
        );
        assert_eq!(
            parse_blkid_export("TYPE=LVM2_member\nUSAGE=raid\n"),
            Probe::Other("LVM2_member (raid)".into())
        );
    }

    #[test]
    fn mountinfo_is_matched_with_escapes() {
        let info = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 7:0 / /var/lib/kubelet/pods/x/volumes/coreos.com~torus/pad rw - ext4 /dev/loop0 rw\n";
        assert!(is_mounted_in(info, Path::new("/mnt/a b")));
        assert!(is_mounted_in(
            info,
            Path::new("/var/lib/kubelet/pods/x/volumes/coreos.com~torus/pad")
        ));
        assert!(!is_mounted_in(info, Path::new("/mnt")));
    }
}
