//! Real NBD clients against a real `torusd`: nbdinfo, qemu-img, nbdcopy, fio,
//! and ext4 on nbdfuse + a loop device.

use std::io::Write;
use std::process::Command;
use std::time::Duration;
use torus_integration::blockdev::{self, FuseLoop};
use torus_integration::{checksum, pattern, require, run_ok, run_with_timeout, Torusd};

const MIB: u64 = 1 << 20;

fn node(dir: &tempfile::TempDir) -> Torusd {
    Torusd::start(&dir.path().join("node"), &["--size", "1GiB"])
}

/// A node that splices large reads into the socket (`nbd.splice_reads`).
fn splicing_node(dir: &tempfile::TempDir) -> Torusd {
    Torusd::start_env(
        &dir.path().join("node"),
        &["--size", "1GiB"],
        &[("TORUS_NBD__SPLICE_READS", "true")],
    )
}

/// A node whose pool is in an object store: a `file://` bucket under `dir`.
fn object_node(dir: &tempfile::TempDir) -> Torusd {
    let bucket = dir.path().join("bucket");
    std::fs::create_dir_all(&bucket).unwrap();
    let config = dir.path().join("torus.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nbackend = \"object\"\nurl = \"file://{}\"\nsize = \"512MiB\"\n",
            bucket.display()
        ),
    )
    .unwrap();
    Torusd::start(
        &dir.path().join("node"),
        &["--config", &config.display().to_string()],
    )
}

fn write_file(path: &std::path::Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(data).expect("write");
}

#[test]
fn nbdinfo_reports_size_flags_and_lists_volumes() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let t = node(&dir);
    t.ctl_ok(&["volume", "create-block", "pad", "64MiB"]);
    t.ctl_ok(&["volume", "create-block", "other", "1GiB"]);
    let out = run_ok(
        Command::new("nbdinfo").arg("--json").arg(t.uri("pad")),
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 64 * MIB, "{out}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} should be advertised: {out}");
    }
    assert_eq!(e["is_read_only"], false, "{out}");
    assert_eq!(e["block_size_preferred"], 4096, "{out}");
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg("--json")
            .arg(format!("nbd://{}", t.nbd)),
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo --list json");
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["other", "pad"]);
    // A missing volume is a clean error, and the server goes on serving.
    let out = run_with_timeout(
        Command::new("nbdinfo").arg(t.uri("nope")),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    run_ok(
        Command::new("nbdinfo").arg(t.uri("pad")),
        Duration::from_secs(30),
    );
}

#[test]
fn qemu_img_convert_in_and_compare_out() {
    qemu_img_convert_in_and_compare_out_on(node);
}

#[test]
fn qemu_img_convert_in_and_compare_out_on_a_pool_in_an_object_store() {
    qemu_img_convert_in_and_compare_out_on(object_node);
}

fn qemu_img_convert_in_and_compare_out_on(start: fn(&tempfile::TempDir) -> Torusd) {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let t = start(&dir);
    t.ctl_ok(&["volume", "create-block", "img", "64MiB"]);
    let src = dir.path().join("src.raw");
    write_file(&src, &pattern(1, 64 * MIB as usize));
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(t.uri("img")),
        Duration::from_secs(120),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(t.uri("img")),
        Duration::from_secs(120),
    );
    let out = dir.path().join("out.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(t.uri("img"))
            .arg(&out),
        Duration::from_secs(120),
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn nbdcopy_round_trip_and_several_clients_on_several_volumes() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let t = node(&dir);
    let size = 32 * MIB as usize;
    let mut copies = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        t.ctl_ok(&["volume", "create-block", name, "32MiB"]);
        let src = dir.path().join(format!("{name}.in"));
        write_file(&src, &pattern(10 + i as u64, size));
        // Three clients at once, each on its own volume.
        let child = Command::new("nbdcopy")
            .arg("--flush")
            .arg(&src)
            .arg(t.uri(name))
            .spawn()
            .expect("nbdcopy");
        copies.push((name, src, child));
    }
    for (name, src, mut child) in copies {
        assert!(
            child.wait().unwrap().success(),
            "nbdcopy into {name} failed"
        );
        let out = dir.path().join(format!("{name}.out"));
        run_ok(
            Command::new("nbdcopy").arg(t.uri(name)).arg(&out),
            Duration::from_secs(60),
        );
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&out).unwrap());
        assert_eq!(
            checksum(&a),
            checksum(&b),
            "volume {name} came back different"
        );
    }
}

#[test]
fn fio_random_writes_verify_crc32c() {
    fio_random_writes_verify_crc32c_on(node);
}

#[test]
fn fio_random_writes_verify_crc32c_on_a_pool_in_an_object_store() {
    fio_random_writes_verify_crc32c_on(object_node);
}

fn fio_random_writes_verify_crc32c_on(start: fn(&tempfile::TempDir) -> Torusd) {
    fio_verify_on(start, "randwrite", "4k", 16);
}

/// Requests of 1 MiB + 512 bytes, so that nearly every one starts inside a
/// page and some span two chunks: the large reads, over the 1 MiB that is
/// read on the request's own task and so (but for those split between two
/// chunks) read on the blocking pool, must come back whole and in order.
#[test]
fn large_unaligned_reads_verify_crc32c() {
    fio_verify_on(node, "write", "1049088", 8);
}

/// The same with requests of 1 MiB - 3.5 KiB, which the store serves from
/// the page cache on the request's task (`RWF_NOWAIT`).
#[test]
fn large_unaligned_cached_reads_verify_crc32c() {
    fio_verify_on(node, "write", "1044992", 8);
}

/// The same with `nbd.splice_reads`: the large reads are mapped, locked
/// and spliced into the socket by reference.
#[test]
fn large_unaligned_spliced_reads_verify_crc32c() {
    fio_verify_on(splicing_node, "write", "1049088", 8);
}

/// fio writes 32 MiB with `rw` in requests of `bs` and reads it all back,
/// checking a crc32c in every request.
fn fio_verify_on(start: fn(&tempfile::TempDir) -> Torusd, rw: &str, bs: &str, depth: u32) {
    require("fio");
    let dir = tempfile::tempdir().unwrap();
    let t = start(&dir);
    t.ctl_ok(&["volume", "create-block", "fio", "64MiB"]);
    let out = run_ok(
        Command::new("fio").args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", t.uri("fio")),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            "--size=32M",
            &format!("--iodepth={depth}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // Keep fio from writing verify state files into the source tree.
            "--verify_state_save=0",
            "--output-format=json",
        ]),
        Duration::from_secs(300),
    );
    let json_start = out.find('{').expect("fio json");
    let v: serde_json::Value = serde_json::from_str(&out[json_start..]).expect("fio json output");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {out}");
    assert!(
        // Whole requests only: 31 of 1 MiB + 512 fit in 32 MiB.
        job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 31 * MIB,
        "fio wrote too little: {out}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 31 * MIB,
        "fio verified too little: {out}"
    );
}

/// Unmounts, detaches and unmounts FUSE on drop, so a failing test leaves no mounts.
#[test]
fn ext4_on_nbdfuse_and_loop_survives_remount_and_fsck() {
    for p in blockdev::PROGRAMS {
        require(p);
    }
    let dir = tempfile::tempdir().unwrap();
    let t = node(&dir);
    t.ctl_ok(&["volume", "create-block", "fs", "256MiB"]);
    let mnt = dir.path().join("mnt");
    let mut dev = FuseLoop::attach(&t.uri("fs"), dir.path());
    dev.mkfs_ext4();
    dev.mount(&mnt);
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            (
                format!("file{i}"),
                pattern(100 + i, (i as usize + 1) * 512 * 1024 + 123),
            )
        })
        .collect();
    std::fs::create_dir_all(mnt.join("dir")).unwrap();
    for (name, data) in &files {
        write_file(&mnt.join("dir").join(name), data);
    }
    run_ok(&mut Command::new("sync"), Duration::from_secs(60));
    dev.umount();
    let (clean, report) = dev.fsck();
    assert!(clean, "fsck.ext4 -n found problems: {report}");
    dev.mount(&mnt);
    for (name, data) in &files {
        let back = std::fs::read(mnt.join("dir").join(name)).expect("read back");
        assert_eq!(
            checksum(&back),
            checksum(data),
            "{name} changed across remount"
        );
    }
}

/// A node whose pool lives in an object store (here `file://`): data copied
/// in and flushed comes back through a restart, from the objects alone.
#[test]
fn a_pool_in_an_object_store_round_trips_through_a_restart() {
    require("nbdcopy");
    let dir = tempfile::tempdir().unwrap();
    let bucket = dir.path().join("bucket");
    let mut t = object_node(&dir);
    t.ctl_ok(&["volume", "create-block", "obj", "32MiB"]);
    let src = dir.path().join("obj.in");
    write_file(&src, &pattern(77, 32 * MIB as usize));
    run_ok(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&src)
            .arg(t.uri("obj")),
        Duration::from_secs(120),
    );
    assert!(
        std::fs::read_dir(&bucket).unwrap().next().is_some(),
        "flushed chunks must be objects in the bucket"
    );
    t.kill9();
    // The write-back cache is discarded on restart: what reads back came from the objects.
    t.restart();
    let out = dir.path().join("obj.out");
    run_ok(
        Command::new("nbdcopy").arg(t.uri("obj")).arg(&out),
        Duration::from_secs(120),
    );
    assert_eq!(
        checksum(&std::fs::read(&out).unwrap()),
        checksum(&std::fs::read(&src).unwrap())
    );
}
