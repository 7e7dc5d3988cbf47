//! The original Torus demo, as a test: a file system on a replicated volume
//! served by node A; files written and synced; node A killed with SIGKILL;
//! the volume opened on node B; `fsck.ext4 -n` is clean and every synced
//! file is there with its content.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};
use torus_integration::blockdev::{self, FuseLoop};
use torus_integration::etcd::EtcdServer;
use torus_integration::nbd::Client;
use torus_integration::{checksum, ctl_etcd, pattern, require, run_ok, Torusd};

#[test]
fn ext4_survives_the_serving_node_being_killed_and_opens_on_another() {
    for p in blockdev::PROGRAMS {
        require(p);
    }
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    ctl_etcd(&e, &["init", "--replication", "3", "--block-size", "1MiB"]);
    let mut nodes: Vec<Torusd> = (0..3)
        .map(|i| {
            Torusd::start_cluster(&dir.path().join(format!("n{i}")), &e, &["--size", "256MiB"])
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctl_etcd(&e, &["list-peers"]).matches(" OK ").count() < 3 {
        assert!(Instant::now() < deadline, "three OK peers not seen");
        std::thread::sleep(Duration::from_millis(250));
    }
    ctl_etcd(&e, &["volume", "create-block", "pad", "128MiB"]);

    // Node A serves the file system; files are written and synced.
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("pad{i}.txt"),
                pattern(700 + i, 300_000 * (i as usize + 1)),
            )
        })
        .collect();
    let mnt = dir.path().join("mnt");
    {
        let mut a = FuseLoop::attach(&nodes[0].uri("pad"), &dir.path().join("on-a"));
        a.mkfs_ext4();
        a.mount(&mnt);
        for (name, data) in &files {
            let mut f = std::fs::File::create(mnt.join(name)).unwrap();
            f.write_all(data).unwrap();
        }
        run_ok(&mut Command::new("sync"), Duration::from_secs(60));
        // The node dies with the file system still mounted; the mount and
        // the loop device are then torn down (lazily: the server is gone).
        nodes[0].kill9();
    }

    // Node B opens the volume once A's lease has lapsed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(nodes[1].nbd, "pad") {
            Ok(c) => {
                c.disconnect().expect("disconnect");
                break;
            }
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "node B could not open the volume after A died: {err}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
    let mut b = FuseLoop::attach(&nodes[1].uri("pad"), &dir.path().join("on-b"));
    let (clean, report) = b.fsck();
    assert!(
        clean,
        "fsck.ext4 -n after failover found problems: {report}"
    );
    b.mount(&mnt);
    for (name, data) in &files {
        let back = std::fs::read(mnt.join(name))
            .unwrap_or_else(|err| panic!("{name} missing after failover: {err}"));
        assert_eq!(
            checksum(&back),
            checksum(data),
            "{name} differs after failover"
        );
    }
    b.umount();
}
