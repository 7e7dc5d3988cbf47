//! `torusctl` end to end against a real `torusd`, and `torusd`'s refusal of
//! bad configuration.

use std::io::Write;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};
use torus_integration::nbd::Client;
use torus_integration::{bin, pattern, run_with_timeout, Torusd};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fails_with(t: &Torusd, args: &[&str], needle: &str) {
    let o = t.ctl(args);
    assert!(!o.status.success(), "torusctl {args:?} should fail");
    let e = stderr(&o);
    assert!(
        e.contains(needle),
        "torusctl {args:?}: expected {needle:?} in {e:?}"
    );
    assert_eq!(e.trim().lines().count(), 1, "error must be one line: {e:?}");
}

fn used_bytes(t: &Torusd) -> u64 {
    let out = t.ctl_ok(&["list-peers", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v[0]["info"]["used"].as_u64().expect("used")
}

#[test]
fn create_list_delete_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let t = Torusd::start(&dir.path().join("n"), &["--size", "512MiB"]);
    // The embedded node initialised itself; a second init says so.
    fails_with(&t, &["init"], "already initialised");
    let out = t.ctl_ok(&["volume", "create-block", "pad", "1GiB"]);
    assert!(out.contains("pad"), "{out}");
    t.ctl_ok(&["volume", "create-block", "small", "10M"]);
    let list = t.ctl_ok(&["volume", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(
        lines[0].starts_with("VOLUME NAME")
            && lines[0].contains("SIZE")
            && lines[0].contains("TYPE")
            && lines[0].contains("STATUS"),
        "{list}"
    );
    assert!(
        list.contains("pad") && list.contains("1.0 GiB") && list.contains("block"),
        "{list}"
    );
    assert!(list.contains("small") && list.contains("9.5 MiB"), "{list}");
    fails_with(
        &t,
        &["volume", "create-block", "pad", "1GiB"],
        "already exists",
    );
    fails_with(&t, &["volume", "delete", "nope"], "does not exist");
    fails_with(
        &t,
        &["volume", "create-block", "bad", "12 parsecs"],
        "bad size",
    );
    fails_with(
        &t,
        &["volume", "create-block", "bad/name", "1GiB"],
        "bad volume name",
    );
    fails_with(
        &t,
        &["volume", "create-block", "empty", "0"],
        "bad volume size",
    );
    // Sizes are rounded up to whole 4 KiB blocks.
    let out = t.ctl_ok(&["volume", "create-block", "odd", "1000"]);
    assert!(out.contains("4.0 KiB"), "{out}");

    let peers = t.ctl_ok(&["list-peers"]);
    let header = peers.lines().next().unwrap_or_default();
    for col in [
        "ADDRESS",
        "UUID",
        "SIZE",
        "USED",
        "MEMBER",
        "UPDATED",
        "REB/REP DATA",
    ] {
        assert!(header.contains(col), "{peers}");
    }
    assert!(
        peers.contains("512.0 MiB") && peers.contains(" OK "),
        "{peers}"
    );
    assert!(peers.contains("Balanced: true Usage:  0.00%"), "{peers}");

    // Data written takes pool space; deleting the volume frees it.
    assert_eq!(used_bytes(&t), 0);
    let mut c = Client::connect(t.nbd, "small").expect("connect");
    c.write(0, &pattern(3, 1 << 20)).expect("write");
    c.flush().expect("flush");
    assert_eq!(used_bytes(&t), 1 << 20);
    // While open for writing the volume cannot be deleted.
    fails_with(&t, &["volume", "delete", "small"], "open for writing");
    c.disconnect().expect("disconnect");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = t.ctl(&["volume", "delete", "small"]);
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delete still refused after close: {}",
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_bytes(&t) != 0 {
        assert!(
            Instant::now() < deadline,
            "space of a deleted volume was not freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let list = t.ctl_ok(&["volume", "list"]);
    assert!(
        !list.contains("small") && list.contains("pad") && list.contains("odd"),
        "{list}"
    );
}

#[test]
fn torusctl_without_a_node_says_so() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = run_with_timeout(
        Command::new(bin("torusctl")).args([
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "volume",
            "list",
        ]),
        Duration::from_secs(30),
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("cannot reach") && e.contains("torusd running"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

fn torusd_fails(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let o = run_with_timeout(
        Command::new(bin("torusd"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--nbd-listen", "127.0.0.1:0", "--port", "0"])
            .args(args)
            .env_remove("TORUS_LOG"),
        Duration::from_secs(30),
    );
    assert!(!o.status.success(), "torusd {args:?} should fail");
    let e = stderr(&o);
    let last = e.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("torusd: ") && last.contains(needle),
        "expected {needle:?} in last line of {e:?}"
    );
}

#[test]
fn torusd_refuses_bad_configuration_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        p.display().to_string()
    };
    let unknown = file("unknown.toml", "[storage]\nsise = \"1GiB\"\n");
    torusd_fails(&["--config", &unknown], "sise");
    torusd_fails(&["--config", &unknown], "unknown.toml");
    let garbage = file("garbage.toml", "[storage\nsize=");
    torusd_fails(&["--config", &garbage], "garbage.toml");
    let badsize = file("badsize.toml", "[storage]\nsize = \"huge\"\n");
    torusd_fails(&["--config", &badsize], "huge");
    torusd_fails(
        &["--config", "/nonexistent/torus.toml"],
        "/nonexistent/torus.toml",
    );
    torusd_fails(&["--size", "12 parsecs"], "--size");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    torusd_fails(&["--port", &port], "cannot listen");
    torusd_fails(
        &["--nbd-listen", &busy.local_addr().unwrap().to_string()],
        "cannot listen for NBD",
    );
}
