//! Durability of a single `torusd`: what a FLUSH acknowledged survives
//! `kill -9`; a clean stop (SIGTERM) keeps everything and exits 0.

use torus_integration::nbd::Client;
use torus_integration::{pattern, Torusd};

const MIB: u64 = 1 << 20;

fn node(dir: &tempfile::TempDir) -> Torusd {
    Torusd::start(&dir.path().join("node"), &["--size", "256MiB"])
}

/// Offsets spread over several chunks, unaligned, some crossing a chunk boundary.
fn offset(i: u64) -> u64 {
    (i * 3 * MIB + i * 4096 * 7 + (i % 3) * 513) % (60 * MIB)
}

#[test]
fn flushed_writes_survive_kill9_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = node(&dir);
    t.ctl_ok(&["volume", "create-block", "d", "64MiB"]);
    let mut c = Client::connect(t.nbd, "d").expect("connect");
    let mut flushed = Vec::new();
    for i in 0..40u64 {
        let data = pattern(i, 64 * 1024 + (i as usize % 5) * 1000);
        c.write(offset(i), &data).expect("write");
        flushed.push((offset(i), data));
    }
    c.flush().expect("flush");
    // A few writes after the barrier: these may or may not survive.
    for i in 40..44u64 {
        c.write(offset(i), &pattern(i, 8192)).expect("write");
    }
    // The worst moment: right after the FLUSH reply, with writes in flight.
    t.kill9();
    drop(c);
    t.restart();
    let mut c = Client::connect(t.nbd, "d").expect("reconnect after kill -9");
    // Later writes may overlap earlier ones; compare against the last writer of each byte.
    let mut model = vec![None::<u8>; 64 * MIB as usize];
    for (off, data) in &flushed {
        for (k, b) in data.iter().enumerate() {
            model[*off as usize + k] = Some(*b);
        }
    }
    for (off, data) in &flushed {
        let back = c.read(*off, data.len() as u32).expect("read back");
        for (k, b) in back.iter().enumerate() {
            if let Some(want) = model[*off as usize + k] {
                let unflushed_overlap = (40..44u64).any(|j| {
                    let o = offset(j) as usize;
                    (o..o + 8192).contains(&(*off as usize + k))
                });
                if !unflushed_overlap {
                    assert_eq!(
                        *b,
                        want,
                        "flushed byte at {} lost after kill -9",
                        off + k as u64
                    );
                }
            }
        }
    }
    // The volume stays fully readable.
    for i in 0..64u64 {
        c.read(i * MIB, MIB as u32)
            .expect("volume readable after crash");
    }
}

#[test]
fn clean_stop_keeps_everything_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = node(&dir);
    t.ctl_ok(&["volume", "create-block", "keep", "32MiB"]);
    t.ctl_ok(&["volume", "create-block", "second", "16MiB"]);
    let mut c = Client::connect(t.nbd, "keep").expect("connect");
    let data = pattern(7, 3 * MIB as usize + 777);
    c.write(12345, &data).expect("write");
    // No FLUSH, no disconnect: SIGTERM itself must flush everything.
    let status = t.stop();
    assert!(
        status.success(),
        "torusd must exit 0 on SIGTERM, got {status}; log:\n{}",
        t.log_text()
    );
    drop(c);
    t.restart();
    let list = t.ctl_ok(&["volume", "list"]);
    assert!(list.contains("keep") && list.contains("second"), "{list}");
    let mut c = Client::connect(t.nbd, "keep").expect("reconnect");
    assert_eq!(c.read(12345, data.len() as u32).expect("read"), data);
    c.disconnect().expect("disc");
    let status = t.stop();
    assert!(status.success());
}

#[test]
fn lock_of_a_killed_node_is_taken_over_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = node(&dir);
    t.ctl_ok(&["volume", "create-block", "v", "8MiB"]);
    let mut c = Client::connect(t.nbd, "v").expect("connect");
    c.write(0, b"before crash").expect("write");
    c.flush().expect("flush");
    t.kill9();
    drop(c);
    t.restart();
    // The same node (same identity) opens its volume at once, without
    // waiting for the dead process's lease to lapse.
    let mut c = Client::connect(t.nbd, "v").expect("reopen after crash");
    assert_eq!(c.read(0, 12).unwrap(), b"before crash");
    c.write(0, b"after  crash").expect("write after restart");
    c.flush().expect("flush");
}
