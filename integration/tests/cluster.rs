//! A real cluster: etcd plus three `torusd` processes on loopback, driven by
//! `torusctl --etcd` and real NBD clients. The replication test runs over
//! plain TCP and over QUIC with mutual TLS (certificates from `torusctl certs`).

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};
use torus_integration::etcd::{EtcdServer, TestCertificates};
use torus_integration::nbd::Client;
use torus_integration::{
    checksum, ctl_etcd, pattern, peers_json, require, run_ok, run_with_timeout, wait_for, Torusd,
};

const MIB: u64 = 1 << 20;

fn start_three(dir: &tempfile::TempDir, etcd: &str) -> Vec<Torusd> {
    start_three_with(dir, etcd, &|_| Vec::new())
}

/// Three nodes; node `i` gets the extra flags `extra(i)`.
fn start_three_with(
    dir: &tempfile::TempDir,
    etcd: &str,
    extra: &dyn Fn(usize) -> Vec<String>,
) -> Vec<Torusd> {
    ctl_etcd(
        etcd,
        &["init", "--replication", "3", "--block-size", "1MiB"],
    );
    let nodes: Vec<Torusd> = (0..3)
        .map(|i| {
            let more = extra(i);
            let mut args = vec!["--size", "512MiB"];
            args.extend(more.iter().map(String::as_str));
            Torusd::start_cluster(&dir.path().join(format!("n{i}")), etcd, &args)
        })
        .collect();
    wait_for("three OK peers", Duration::from_secs(20), || {
        let p = peers_json(etcd);
        p.len() == 3 && p.iter().all(|p| p["member"] == "OK")
    });
    nodes
}

#[test]
fn replicated_volume_survives_a_killed_peer() {
    let dir = tempfile::tempdir().unwrap();
    replicated_volume_survives_a_killed_peer_on(&dir, &|_| Vec::new(), &|_, _| {});
}

#[test]
fn replicated_volume_survives_a_killed_peer_over_quic_with_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let certs_arg = certs.display().to_string();
    let ctl = |args: &[&str]| {
        run_ok(
            Command::new(torus_integration::bin("torusctl")).args(args),
            Duration::from_secs(30),
        )
    };
    ctl(&["certs", "init", "--dir", &certs_arg]);
    for i in 0..3 {
        let out = ctl(&[
            "certs",
            "node",
            &format!("n{i}"),
            "--dir",
            &certs_arg,
            "--ip",
            "127.0.0.1",
        ]);
        assert!(out.contains("[transport.tls]"), "{out}");
    }
    let flags = |i: usize| -> Vec<String> {
        let file = |ext: &str| certs.join(format!("n{i}.{ext}")).display().to_string();
        vec![
            "--peer-transport".into(),
            "quic".into(),
            "--peer-cert-file".into(),
            file("crt"),
            "--peer-key-file".into(),
            file("key"),
            "--peer-ca-file".into(),
            certs.join("ca.crt").display().to_string(),
        ]
    };
    // After the data is written: SIGHUP reloads A's certificates, and the
    // volume carries on over the connections already open.
    let reload = |nodes: &mut Vec<Torusd>, etcd: &str| {
        // The peer port is UDP: nothing answers TCP there.
        for n in nodes.iter() {
            let peer = n.peer.clone().expect("peer address");
            assert!(
                std::net::TcpStream::connect(&peer).is_err(),
                "{peer} accepts TCP: the node is not on QUIC"
            );
        }
        run_ok(
            Command::new("kill").args(["-HUP", &nodes[0].pid().to_string()]),
            Duration::from_secs(5),
        );
        wait_for(
            "A to reload its certificates",
            Duration::from_secs(10),
            || {
                nodes[0]
                    .log_text()
                    .contains("peer TLS certificates reloaded")
            },
        );
        // A client-only torusblk, with a certificate of its own from the
        // cluster CA, reads the volume from the peers over QUIC.
        ctl(&["certs", "node", "client", "--dir", &certs_arg]);
        let file = |name: &str| certs.join(name).display().to_string();
        let mut serve = Command::new(torus_integration::bin("torusblk"))
            .args(["--etcd", etcd, "--peer-transport", "quic"])
            .args(["--peer-cert-file", &file("client.crt")])
            .args(["--peer-key-file", &file("client.key")])
            .args(["--peer-ca-file", &file("ca.crt")])
            .args(["nbdserve", "--listen", "127.0.0.1:0", "--read-only"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start torusblk nbdserve");
        let stdout = serve.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("torusblk nbdserve did not say it was ready");
        let addr = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("nbd="))
            .unwrap_or_else(|| panic!("no nbd= in {ready:?}"))
            .to_string();
        let out = dir.path().join("via-torusblk.raw");
        let copied = run_with_timeout(
            Command::new("nbdcopy")
                .arg(format!("nbd://{addr}/r3"))
                .arg(&out),
            Duration::from_secs(180),
        );
        let _ = Command::new("kill")
            .args(["-TERM", &serve.id().to_string()])
            .status();
        let _ = serve.wait();
        assert!(
            copied.status.success(),
            "nbdcopy through torusblk over QUIC failed: {}",
            String::from_utf8_lossy(&copied.stderr)
        );
        assert_eq!(
            checksum(&std::fs::read(&out).unwrap()),
            checksum(&pattern(42, 64 * MIB as usize)),
            "read through torusblk over QUIC differs"
        );
    };
    replicated_volume_survives_a_killed_peer_on(&dir, &flags, &reload);
}

/// Three nodes started with `extra(i)`: write 64 MiB at replication 3, call
/// `between` (nodes running, data written), kill B, then A and C still read
/// and write everything.
fn replicated_volume_survives_a_killed_peer_on(
    dir: &tempfile::TempDir,
    extra: &dyn Fn(usize) -> Vec<String>,
    between: &dyn Fn(&mut Vec<Torusd>, &str),
) {
    require("nbdcopy");
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let mut nodes = start_three_with(dir, &e, extra);
    let table = ctl_etcd(&e, &["list-peers"]);
    assert_eq!(table.matches(" OK ").count(), 3, "{table}");
    assert!(table.contains("Balanced: true"), "{table}");
    ctl_etcd(&e, &["volume", "create-block", "r3", "64MiB"]);

    // 64 MiB through node A's NBD server.
    let src = dir.path().join("src.raw");
    let data = pattern(42, 64 * MIB as usize);
    std::fs::File::create(&src)
        .unwrap()
        .write_all(&data)
        .unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&src)
            .arg(nodes[0].uri("r3")),
        Duration::from_secs(180),
    );
    // Every node holds a full copy.
    wait_for("a full copy on every node", Duration::from_secs(20), || {
        let p = peers_json(&e);
        p.len() == 3
            && p.iter()
                .all(|p| p["info"]["used"].as_u64() == Some(64 * MIB))
    });

    between(&mut nodes, &e);

    // Kill B; A still reads and writes.
    nodes[1].kill9();
    let out = dir.path().join("via-a.raw");
    run_ok(
        Command::new("nbdcopy").arg(nodes[0].uri("r3")).arg(&out),
        Duration::from_secs(180),
    );
    assert_eq!(
        checksum(&std::fs::read(&out).unwrap()),
        checksum(&data),
        "read through A after B died"
    );
    let mut expect = data.clone();
    let patch = pattern(43, 3 * MIB as usize);
    {
        let mut c = Client::connect(nodes[0].nbd, "r3").expect("connect to A");
        c.write(5 * MIB + 4096, &patch).expect("write with B dead");
        c.flush().expect("flush with B dead");
        c.disconnect().expect("disconnect");
    }
    expect[(5 * MIB + 4096) as usize..][..patch.len()].copy_from_slice(&patch);
    wait_for("B shown DOWN", Duration::from_secs(20), || {
        peers_json(&e)
            .iter()
            .any(|p| p["member"] == "DOWN" && p["info"]["id"] == nodes[1].id.as_str())
    });
    let table = ctl_etcd(&e, &["list-peers"]);
    assert!(
        table.contains("DOWN") && table.contains("Balanced: false"),
        "{table}"
    );

    // A has released the volume (its client disconnected): read it through C.
    let out = dir.path().join("via-c.raw");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = Command::new("nbdcopy")
            .arg(nodes[2].uri("r3"))
            .arg(&out)
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C could not open the volume: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        checksum(&std::fs::read(&out).unwrap()),
        checksum(&expect),
        "read through C differs"
    );
}

/// Open `volume` at `nbd`, retrying for up to 30 s while it is still
/// locked by a writer that died (its lease lapsing); any other refusal, or
/// still locked after that, fails with `what`.
fn connect_once_unlocked(nbd: std::net::SocketAddr, volume: &str, what: &str) -> Client {
    let start = Instant::now();
    loop {
        match Client::connect(nbd, volume) {
            Ok(c) => return c,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                assert!(e.to_string().contains("locked"), "unexpected error: {e}");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[test]
fn a_second_writer_is_refused_until_the_holder_dies() {
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_three(&dir, &e);
    ctl_etcd(&e, &["volume", "create-block", "f", "16MiB"]);
    let mut a = Client::connect(nodes[0].nbd, "f").expect("A opens");
    let flushed = pattern(5, 2 * MIB as usize);
    a.write(MIB, &flushed).expect("write on A");
    a.flush().expect("flush on A");
    // B is refused, with a message naming the holder.
    let err = Client::connect(nodes[1].nbd, "f")
        .err()
        .expect("B must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains("locked") && msg.contains(&nodes[0].id),
        "{msg}"
    );
    let list = ctl_etcd(&e, &["volume", "list", "--json"]);
    assert!(
        list.contains(nodes[0].peer.as_deref().unwrap_or("?")),
        "{list}"
    );

    // A dies holding the lock; once its lease lapses B takes over and sees every flushed write.
    nodes[0].kill9();
    drop(a);
    let mut b = connect_once_unlocked(nodes[1].nbd, "f", "B never took over");
    assert_eq!(
        b.read(MIB, flushed.len() as u32).expect("read on B"),
        flushed
    );
    b.write(0, b"B writes now").expect("write on B");
    b.flush().expect("flush on B");
}

/// A node started on a copy of a live node's data directory (a cloned VM)
/// carries that node's peer id: it must refuse to start, naming the live
/// node, and leave it serving. The live node itself, killed, starts again
/// under its id on a new peer port while its dead run's record still
/// stands (that record is not mistaken for a live one).
#[test]
fn a_copied_data_directory_does_not_start_beside_its_original() {
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_three(&dir, &e);
    let copy = dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(nodes[0].data_dir.join("peer-id"), copy.join("peer-id")).unwrap();
    let out = run_with_timeout(
        Command::new(torus_integration::bin("torusd"))
            .arg("--data-dir")
            .arg(&copy)
            .args([
                "--nbd-listen",
                "127.0.0.1:0",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .args([
                "--etcd",
                &e,
                "--peer-address",
                "127.0.0.1:0",
                "--size",
                "256MiB",
            ])
            .env_remove("TORUS_LOG")
            .env("TORUS_NODE__LEASE_TTL", "3s"),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the copy started: {stderr}");
    assert!(
        stderr.contains("in use by a live node") && stderr.contains(&nodes[0].id),
        "{stderr}"
    );
    let peer = nodes[0].peer.clone().unwrap_or_default();
    assert!(
        stderr.contains(&peer),
        "names the live node's address: {stderr}"
    );
    // The original still serves, and is still the one registered.
    ctl_etcd(&e, &["volume", "create-block", "c", "8MiB"]);
    let mut a = Client::connect(nodes[0].nbd, "c").expect("A still serves");
    a.write(0, b"still A").expect("write on A");
    a.flush().expect("flush on A");
    drop(a);
    assert!(
        peers_json(&e)
            .iter()
            .any(|p| p["info"]["address"] == peer.as_str()),
        "A's record stays"
    );
    // Killed, A starts again at once on a new peer port, within its dead
    // run's lease (3 s), and comes back under its own id.
    nodes[0].kill9();
    let started = Instant::now();
    let again = Torusd::start_cluster(&nodes[0].data_dir, &e, &["--size", "512MiB"]);
    assert_eq!(again.id, nodes[0].id);
    assert_ne!(again.peer, nodes[0].peer, "a new peer port");
    eprintln!("restarted on a new port in {:?}", started.elapsed());
    wait_for(
        "A registered at its new address",
        Duration::from_secs(10),
        || {
            let want = again.peer.clone().unwrap_or_default();
            peers_json(&e)
                .iter()
                .any(|p| p["info"]["address"] == want.as_str())
        },
    );
    // Its volume lock lapses with the dead run's lease before A may write.
    let mut a = connect_once_unlocked(again.nbd, "c", "A never served again");
    assert_eq!(a.read(0, 7).expect("read on A"), b"still A");
}

#[test]
fn garbage_on_the_peer_port_leaves_the_node_serving() {
    require("nbdcopy");
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_three(&dir, &e);
    ctl_etcd(&e, &["volume", "create-block", "g", "8MiB"]);
    for n in &nodes {
        let peer = n.peer.clone().expect("peer address");
        for junk in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            &pattern(9, 4096)[..],
            &b"TRSP\x07\x00"[..],
        ] {
            let mut s = std::net::TcpStream::connect(&peer).expect("peer port");
            let _ = s.write_all(junk);
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 256];
            // The node answers at most a refusal, then closes.
            loop {
                match std::io::Read::read(&mut s, &mut buf) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => panic!("peer port kept a garbage connection open: {e}"),
                }
            }
        }
    }
    let src = dir.path().join("g.raw");
    std::fs::File::create(&src)
        .unwrap()
        .write_all(&pattern(8, 8 * MIB as usize))
        .unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&src)
            .arg(nodes[1].uri("g")),
        Duration::from_secs(60),
    );
    let out = dir.path().join("g.out");
    run_ok(
        Command::new("nbdcopy").arg(nodes[2].uri("g")).arg(&out),
        Duration::from_secs(60),
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    let logs: String = nodes.iter().map(|n| n.log_text()).collect();
    assert!(
        logs.contains("closing peer connection"),
        "bad peer input must be logged with a reason"
    );
}

#[test]
fn ring_membership_is_explicit_without_auto_join() {
    let etcd = EtcdServer::start();
    let e = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    ctl_etcd(&e, &["init", "--replication", "2"]);
    let a = Torusd::start_cluster(&dir.path().join("a"), &e, &["--size", "256MiB"]);
    // Without --auto-join a node registers but holds no data until added.
    let b = Torusd::start_env(
        &dir.path().join("b"),
        &[
            "--etcd",
            &e,
            "--peer-address",
            "127.0.0.1:0",
            "--size",
            "128MiB",
        ],
        &[("TORUS_NODE__LEASE_TTL", "3s")],
    );
    wait_for("B registered", Duration::from_secs(20), || {
        peers_json(&e).len() == 2
    });
    let table = ctl_etcd(&e, &["list-peers"]);
    assert!(table.contains("Avail"), "{table}");
    let ring = ctl_etcd(&e, &["ring", "get"]);
    assert!(
        ring.contains("replication 2") && ring.contains(&a.id) && !ring.contains(&b.id),
        "{ring}"
    );
    // Add by address (the original's form, with a scheme), remove by UUID.
    let peer_b = format!("http://{}", b.peer.clone().expect("B's peer address"));
    let ring = ctl_etcd(&e, &["peer", "add", &peer_b]);
    assert!(ring.contains(&b.id) && ring.contains("128.0 MiB"), "{ring}");
    wait_for("both OK", Duration::from_secs(10), || {
        peers_json(&e).iter().all(|p| p["member"] == "OK")
    });
    let ring = ctl_etcd(&e, &["ring", "set-replication", "1"]);
    assert!(ring.contains("replication 1"), "{ring}");
    let ring = ctl_etcd(&e, &["peer", "remove", &b.id]);
    assert!(!ring.contains(&b.id), "{ring}");
    let out = std::process::Command::new(torus_integration::bin("torusctl"))
        .args(["--etcd", &e, "peer", "add", "10.9.9.9:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no peer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `torusctl` and `torusd` on an etcd that requires client certificates,
/// with the original's flag names; without the client certificate `torusd`
/// stops with a one-line error naming etcd.
#[test]
fn torusd_and_torusctl_use_etcd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCertificates::generate(&dir.path().join("etcd-certs"));
    let etcd = EtcdServer::start_tls(certs.server_tls());
    let e = etcd.endpoint();
    let (ca, cert, key) = (
        certs.ca_file.display().to_string(),
        certs.client_cert.display().to_string(),
        certs.client_key.display().to_string(),
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
            Command::new(torus_integration::bin("torusctl"))
                .args(["--etcd", &e])
                .args(tls)
                .args(args),
            Duration::from_secs(30),
        )
    };
    ctl(&["init", "--replication", "1"]);
    let mut args = vec!["--size", "256MiB"];
    args.extend(tls);
    let node = Torusd::start_cluster(&dir.path().join("n"), &e, &args);
    wait_for(
        "the node registered over TLS",
        Duration::from_secs(20),
        || ctl(&["list-peers"]).contains(" OK "),
    );
    ctl(&["volume", "create-block", "t", "8MiB"]);
    let mut c = Client::connect(node.nbd, "t").expect("open the volume");
    c.write(0, b"over etcd with TLS").expect("write");
    c.flush().expect("flush");
    assert_eq!(c.read(0, 18).expect("read"), b"over etcd with TLS");

    // The same node without its client certificate is refused by etcd.
    let out = torus_integration::run_with_timeout(
        Command::new(torus_integration::bin("torusd"))
            .arg("--data-dir")
            .arg(dir.path().join("no-cert"))
            .args(["--etcd", &e, "--etcd-ca-file", &ca])
            .args(["--nbd-listen", "127.0.0.1:0", "--port", "0"])
            .env("TORUS_METADATA__DIAL_TIMEOUT", "2s"),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "torusd started without a client certificate"
    );
    assert!(stderr.contains(&e), "the error must name etcd: {stderr}");
}
