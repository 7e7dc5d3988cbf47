//! A volume as a local block device without the kernel's `nbd` module:
//! `nbdfuse` exposes the NBD export as a file, `losetup` turns the file into
//! a loop device, and a file system can be made and mounted on it.
//!
//! Everything set up is torn down on drop, in reverse order, even when a
//! test fails halfway (a lazy unmount, so a dead server cannot hang it).

use crate::run_ok;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Programs the fuse-and-loop path needs (for `require`).
pub const PROGRAMS: [&str; 7] = [
    "nbdfuse",
    "fusermount3",
    "losetup",
    "mkfs.ext4",
    "fsck.ext4",
    "mount",
    "umount",
];

pub struct FuseLoop {
    fuse_dir: PathBuf,
    fuse: Option<Child>,
    /// `/dev/loopN`.
    pub loopdev: String,
    mounted: Option<PathBuf>,
}

impl FuseLoop {
    /// Attach `uri` (an `nbd://` URI) under `work` (a fresh directory per
    /// attachment) and return its loop device.
    pub fn attach(uri: &str, work: &Path) -> FuseLoop {
        let fuse_dir = work.join("fuse");
        std::fs::create_dir_all(&fuse_dir).expect("fuse dir");
        let pidfile = work.join("nbdfuse.pid");
        let fuse = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(fuse_dir.join("disk"))
            .arg(uri)
            .spawn()
            .expect("start nbdfuse");
        let mut me = FuseLoop {
            fuse_dir,
            fuse: Some(fuse),
            loopdev: String::new(),
            mounted: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pidfile.exists() {
            if let Some(Ok(Some(st))) = me.fuse.as_mut().map(|c| c.try_wait()) {
                panic!("nbdfuse exited ({st}) before serving {uri}");
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not come up for {uri}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me.loopdev = run_ok(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(me.fuse_dir.join("disk")),
            Duration::from_secs(30),
        )
        .trim()
        .to_string();
        me
    }

    /// `mkfs.ext4` on the device.
    pub fn mkfs_ext4(&self) {
        run_ok(
            // Inode tables and journal initialised now, not by ext4's lazy
            // init thread after the mount: that thread keeps group
            // descriptors in a running journal transaction, so a crash test's
            // `fsck -n` (which cannot replay the journal) would see their
            // on-disk copies lag behind the synced directory entries.
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&self.loopdev),
            Duration::from_secs(120),
        );
    }

    /// `fsck.ext4 -n -f`: its output, and whether it found nothing wrong.
    pub fn fsck(&self) -> (bool, String) {
        let o = crate::run_with_timeout(
            Command::new("fsck.ext4")
                .args(["-n", "-f"])
                .arg(&self.loopdev),
            Duration::from_secs(120),
        );
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    }

    pub fn mount(&mut self, mnt: &Path) {
        std::fs::create_dir_all(mnt).expect("mount point");
        run_ok(
            Command::new("mount").arg(&self.loopdev).arg(mnt),
            Duration::from_secs(30),
        );
        self.mounted = Some(mnt.to_path_buf());
    }

    pub fn umount(&mut self) {
        if let Some(m) = self.mounted.take() {
            run_ok(Command::new("umount").arg(&m), Duration::from_secs(60));
        }
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg("-l").arg(&m).output();
        }
        if !self.loopdev.is_empty() {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&self.loopdev)
                .output();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .output();
        if let Some(mut c) = self.fuse.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
