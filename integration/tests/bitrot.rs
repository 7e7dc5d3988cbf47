//! Bit rot on a real cluster: bytes of one replica's chunk file change on
//! disk behind the store's back (three `torusd` on etcd, replication 3).
//! Reads still return the right data (the copy fails its checksum and
//! another serves), and `torusctl volume scrub` finds and rewrites the rotten
//! copies, so the files on disk are right again.

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::Command;
use std::time::{Duration, Instant};
use torus_integration::etcd::EtcdServer;
use torus_integration::{
    checksum, ctl_etcd, pattern, require, run_ok, run_with_timeout, wait_for, Torusd,
};

const MIB: u64 = 1 << 20;

/// Chunk `index` of the first volume in a node's pool.
fn chunk_file(node: &Torusd, index: u64) -> std::path::PathBuf {
    node.data_dir
        .join("blocks")
        .join("1")
        .join(index.to_string())
}

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("chunk file");
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn rot(path: &std::path::Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("chunk file");
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(b"bit rot!").unwrap();
    f.sync_data().unwrap();
}

fn read_all(node: &Torusd, out: &std::path::Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = run_with_timeout(
            Command::new("nbdcopy").arg(node.uri("rot")).arg(out),
            Duration::from_secs(60),
        );
        if o.status.success() {
            return checksum(&std::fs::read(out).unwrap());
        }
        // Another node may still hold the volume for a moment.
        assert!(
            Instant::now() < deadline,
            "nbdcopy: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `torusctl volume scrub rot`; on failure, the nodes' logs say why.
fn scrub(etcd: &str, nodes: &[Torusd]) -> String {
    let out = run_with_timeout(
        Command::new(torus_integration::bin("torusctl")).args([
            "--etcd",
            etcd,
            "volume",
            "scrub",
            "rot",
            "--timeout",
            "90s",
        ]),
        Duration::from_secs(120),
    );
    let logs = || {
        nodes
            .iter()
            .map(|n| n.log_text())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    assert!(
        out.status.success(),
        "scrub failed: {}\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctl_etcd(etcd, &["volume", "list", "--json"]),
        ctl_etcd(etcd, &["list-peers"]),
        logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rotten_copies_are_read_around_and_repaired_by_scrub() {
    require("nbdcopy");
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    ctl_etcd(&e, &["init", "--replication", "3", "--block-size", "1MiB"]);
    let nodes: Vec<Torusd> = (0..3)
        .map(|i| {
            Torusd::start_cluster(&dir.path().join(format!("n{i}")), &e, &["--size", "256MiB"])
        })
        .collect();
    wait_for("three members", Duration::from_secs(20), || {
        ctl_etcd(&e, &["list-peers"]).matches(" OK ").count() == 3
    });
    ctl_etcd(&e, &["volume", "create-block", "rot", "8MiB"]);
    let data = pattern(7, 8 * MIB as usize);
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &data).unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&src)
            .arg(nodes[0].uri("rot")),
        Duration::from_secs(120),
    );

    // Node B's copy of chunk 2, C's of chunk 5 and A's of chunk 6 rot on
    // disk. Reads find the first two; only a scrub finds the third.
    rot(&chunk_file(&nodes[1], 2), 8192 + 100);
    rot(&chunk_file(&nodes[2], 5), 4096 * 7);
    rot(&chunk_file(&nodes[0], 6), 3 * 4096 + 4000);

    // Reads through B (it prefers its own, rotten, copy) and C are right.
    let want = checksum(&data);
    assert_eq!(read_all(&nodes[1], &dir.path().join("b.raw")), want);
    assert_eq!(read_all(&nodes[2], &dir.path().join("c.raw")), want);

    // A scrub finds what is still rotten (at least A's copy: the copies a
    // read skipped may already be rewritten by the writer's resync) and
    // rewrites it; a second finds nothing.
    let first = scrub(&e, &nodes);
    assert!(first.contains("8 chunks"), "{first}");
    assert!(
        !first.contains(" 0 repaired"),
        "the scrub repaired nothing: {first}"
    );
    let second = scrub(&e, &nodes);
    assert!(second.contains(" 0 mismatched"), "{second}");
    // The files on disk hold the right bytes again.
    let at = |i: u64, off: u64| &data[(i * MIB + off) as usize..][..8];
    assert_eq!(
        read_at(&chunk_file(&nodes[1], 2), 8192 + 100, 8),
        at(2, 8192 + 100)
    );
    assert_eq!(
        read_at(&chunk_file(&nodes[2], 5), 4096 * 7, 8),
        at(5, 4096 * 7)
    );
    assert_eq!(
        read_at(&chunk_file(&nodes[0], 6), 3 * 4096 + 4000, 8),
        at(6, 3 * 4096 + 4000)
    );
    assert_eq!(read_all(&nodes[0], &dir.path().join("a.raw")), want);
}
