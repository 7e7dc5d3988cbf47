//! Thrashing a real cluster: etcd, four `torusd` at replication 3, and
//! `fio --ioengine=nbd --verify=crc32c` writing through node A while other
//! nodes are killed with SIGKILL and restarted, one at a time — mostly
//! briefly (they come back before the down-out interval and are resynced),
//! once for longer than it (the node is taken out of the ring, its chunks
//! re-replicated, and it rejoins). fio must see no verify error, and afterwards the cluster must
//! return to `Balanced: true` with exactly three copies of every block, and a
//! scrub must find every copy equal.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_integration::etcd::EtcdServer;
use torus_integration::{ctl_etcd, peers_json, require, run_with_timeout, wait_for, Torusd};

const MIB: u64 = 1 << 20;

fn ring_version(etcd: &str) -> u64 {
    let out = ctl_etcd(etcd, &["ring", "get"]);
    out.split_whitespace()
        .nth(2)
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no ring version in {out:?}"))
}

/// One fio job: 32 MiB of 4 KiB random writes, every block verified.
fn fio_verify(uri: &str, seed: u64) -> Result<(), String> {
    let out = run_with_timeout(
        Command::new("fio").args([
            "--name=thrash",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=8",
            &format!("--randseed={seed}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_backlog=1024",
            "--verify_state_save=0",
            "--output-format=json",
        ]),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let json = text.find('{').map(|i| &text[i..]).unwrap_or("{}");
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("fio json: {e}: {text}"))?;
    let job = &v["jobs"][0];
    if job["error"] != 0 {
        return Err(format!("fio reported an error: {text}"));
    }
    if job["read"]["io_bytes"].as_u64().unwrap_or(0) < 32 * MIB {
        return Err(format!("fio verified too little: {text}"));
    }
    Ok(())
}

/// Every WARN and ERROR line the nodes logged, for a failure's message.
fn warnings(nodes: &[Torusd]) -> String {
    let mut lines = Vec::new();
    for n in nodes {
        let log = n.log_text();
        lines.extend(
            log.lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .map(str::to_string),
        );
    }
    lines.join("\n")
}

#[test]
fn fio_verify_survives_killed_and_restarted_peers_and_the_cluster_heals() {
    require("fio");
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    ctl_etcd(&e, &["init", "--replication", "3", "--block-size", "1MiB"]);
    let mut nodes: Vec<Torusd> = (0..4)
        .map(|i| {
            Torusd::start_cluster(
                &dir.path().join(format!("n{i}")),
                &e,
                &["--size", "512MiB", "--down-out-interval", "5s"],
            )
        })
        .collect();
    wait_for("four OK peers", Duration::from_secs(20), || {
        let p = peers_json(&e);
        p.len() == 4 && p.iter().all(|p| p["member"] == "OK")
    });
    ctl_etcd(&e, &["volume", "create-block", "t", "32MiB"]);
    let uri = nodes[0].uri("t");
    let version_before = ring_version(&e);

    // Node A serves fio; the others are killed, one at a time: (node, how
    // long it stays dead). The long one outlives the lease (3 s) plus the
    // down-out interval (5 s), so it is taken out and rejoins.
    let schedule = [(1, 2), (2, 3), (3, 12), (1, 2), (2, 2)];
    let done = Arc::new(AtomicBool::new(false));
    let mut others: Vec<Torusd> = nodes.drain(1..).collect();
    let killer = {
        let done = done.clone();
        let e = e.clone();
        std::thread::spawn(move || {
            for (node, secs) in schedule {
                std::thread::sleep(Duration::from_secs(2));
                let n = &mut others[node - 1];
                n.kill9();
                std::thread::sleep(Duration::from_secs(secs));
                n.restart();
                // One fault at a time: the next kill waits (bounded) until
                // the writer has brought the restarted node up to date. A
                // chunk whose other copies are stale and whose current copy
                // is on the next node killed has no replica to take a
                // write, and failing it is right, but it is not what this
                // test is about.
                let deadline = Instant::now() + Duration::from_secs(60);
                while !ctl_etcd(&e, &["volume", "list"]).contains("healthy") {
                    assert!(
                        Instant::now() < deadline,
                        "node {node} was not brought up to date within 60 s of its restart: {}",
                        ctl_etcd(&e, &["volume", "list"])
                    );
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
            done.store(true, Ordering::SeqCst);
            others
        })
    };
    // fio jobs back to back until the schedule is over; bounded in count.
    let mut jobs = 0;
    for seed in 1..=40u64 {
        if let Err(why) = fio_verify(&uri, seed) {
            done.store(true, Ordering::SeqCst);
            panic!(
                "fio job {seed} while peers were killed: {why}\nnode A's warnings:\n{}",
                warnings(&nodes)
            );
        }
        jobs += 1;
        // (Finished without `done`: the killer failed; its join says why.)
        if done.load(Ordering::SeqCst) || killer.is_finished() {
            break;
        }
    }
    let others = match killer.join() {
        Ok(others) => others,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    // The long outage took the node out of the ring and its restart put it
    // back: at least two ring changes.
    assert!(
        ring_version(&e) >= version_before + 2,
        "the ring did not change: the long outage was not taken out"
    );
    assert!(
        done.load(Ordering::SeqCst),
        "fio ran out of jobs before the schedule ended"
    );
    nodes.extend(others);
    eprintln!("{jobs} fio jobs verified while peers were killed");

    // The cluster heals: every member OK, nothing left to move or rebuild,
    // and exactly three copies of every written block.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ctl_etcd(&e, &["list-peers"]).contains("Balanced: true") {
        if Instant::now() >= deadline {
            panic!(
                "not Balanced after 120 s:\n{}\n{}\n{}",
                ctl_etcd(&e, &["list-peers"]),
                ctl_etcd(&e, &["volume", "list", "--json"]),
                warnings(&nodes)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let table = ctl_etcd(&e, &["list-peers"]);
    assert_eq!(table.matches(" OK ").count(), 4, "{table}");
    let list = ctl_etcd(&e, &["volume", "list"]);
    assert!(list.contains("healthy"), "{list}");
    wait_for("three copies of 32 MiB", Duration::from_secs(30), || {
        let used: u64 = peers_json(&e)
            .iter()
            .map(|p| p["info"]["used"].as_u64().unwrap_or(0))
            .sum();
        used == 3 * 32 * MIB
    });
    // A scrub compares every copy of every block: all equal.
    let scrub = ctl_etcd(&e, &["volume", "scrub", "t", "--timeout", "2m"]);
    assert!(scrub.contains(" 0 mismatched"), "{scrub}");
    assert!(scrub.contains("32 chunks"), "{scrub}");
    // Every node reads the same bytes (each prefers its own copy).
    require("nbdcopy");
    let mut sums = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let out = dir.path().join(format!("read-{i}.raw"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = run_with_timeout(
                Command::new("nbdcopy").arg(n.uri("t")).arg(&out),
                Duration::from_secs(60),
            );
            if o.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "reading through node {i}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        sums.push(torus_integration::checksum(&std::fs::read(&out).unwrap()));
    }
    assert!(
        sums.windows(2).all(|w| w[0] == w[1]),
        "nodes read different data: {sums:?}"
    );
}
