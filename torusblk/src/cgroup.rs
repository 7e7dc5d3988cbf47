//! Keeping the attach process alive when kubelet restarts.
//!
//! kubelet runs the driver, so the attach process starts in kubelet's
//! cgroup; a service manager that stops kubelet by killing its whole cgroup
//! (systemd's default `KillMode=control-group`) would take every attached
//! volume down with it. The original driver used `systemd-run` to escape;
//! this moves the process into a `torusblk` cgroup of its own by writing
//! its pid to `cgroup.procs` — no systemd or D-Bus involved. Best effort:
//! where cgroups are not writable (most containers) nothing changes.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Environment variable naming the cgroup mount (default `/sys/fs/cgroup`;
/// empty disables the move).
pub const CGROUP_ROOT_ENV: &str = "TORUSBLK_CGROUP_ROOT";

/// The hierarchies a service manager tracks processes in: the unified
/// (v2) root itself, or, on hybrid/v1 hosts, `systemd` and `unified`.
fn hierarchies(root: &Path) -> Vec<PathBuf> {
    [
        root.to_path_buf(),
        root.join("systemd"),
        root.join("unified"),
    ]
    .into_iter()
    .filter(|h| h.join("cgroup.procs").exists())
    .collect()
}

/// Move `pid` into `<hierarchy>/torusblk` in every hierarchy under `root`.
/// Returns the cgroups it joined, and the failures.
pub fn escape(root: &Path, pid: u32) -> (Vec<PathBuf>, Vec<String>) {
    let mut joined = Vec::new();
    let mut failed = Vec::new();
    for h in hierarchies(root) {
        let group = h.join("torusblk");
        let r = std::fs::create_dir_all(&group).and_then(|_| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(group.join("cgroup.procs"))?;
            f.write_all(format!("{pid}\n").as_bytes())
        });
        match r {
            Ok(()) => joined.push(group),
            Err(e) => failed.push(format!("{}: {e}", group.display())),
        }
    }
    (joined, failed)
}

/// [`escape`] for this process, from the environment; logs the outcome.
pub fn escape_from_env() {
    let root = match std::env::var_os(CGROUP_ROOT_ENV) {
        Some(v) if v.is_empty() => return,
        Some(v) => PathBuf::from(v),
        None => PathBuf::from("/sys/fs/cgroup"),
    };
    let (joined, failed) = escape(&root, std::process::id());
    for g in joined {
        tracing::info!(cgroup = %g.display(), "moved out of the caller's cgroup");
    }
    for f in failed {
        tracing::warn!("cannot leave the caller's cgroup ({f}): a restart of kubelet that kills its cgroup would detach this volume");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_a_torusblk_group_in_each_tracked_hierarchy() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("cgroup.procs"), "").unwrap();
        std::fs::create_dir_all(root.join("systemd")).unwrap();
        std::fs::write(root.join("systemd/cgroup.procs"), "").unwrap();
        std::fs::create_dir_all(root.join("memory")).unwrap();
        let (joined, failed) = escape(root, 4242);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            joined,
            vec![root.join("torusblk"), root.join("systemd/torusblk")]
        );
        for g in joined {
            assert_eq!(
                std::fs::read_to_string(g.join("cgroup.procs")).unwrap(),
                "4242\n"
            );
        }
        assert!(!root.join("memory/torusblk").exists());
    }

    #[test]
    fn nothing_to_do_without_cgroups() {
        let d = tempfile::tempdir().unwrap();
        let (joined, failed) = escape(d.path(), 1);
        assert!(joined.is_empty() && failed.is_empty());
    }
}
