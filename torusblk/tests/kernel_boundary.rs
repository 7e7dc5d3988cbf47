//! The kernel attacher against the real NBD server, up to the ioctl
//! boundary: the handshake learns the volume's size and flags, an unknown
//! volume is named, and the first ioctl on something that is not an NBD
//! device fails with the ioctl's name and the OS error (the full attach runs
//! in integration/tests/flexvolume.rs wherever /dev/nbd0 exists).

use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use torus_frontends::MemoryVolumes;
use torusblk::{client, kernel};

#[test]
fn handshake_and_ioctl_boundary_against_the_real_server() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let volumes = Arc::new(MemoryVolumes::new());
    volumes.create("v", 64 << 20).unwrap();
    let server = rt
        .block_on(client::serve(
            volumes,
            "127.0.0.1:0".parse().unwrap(),
            false,
        ))
        .unwrap();

    let mut s = TcpStream::connect(server.addr).unwrap();
    let export = kernel::handshake(&mut s, "v").unwrap();
    assert_eq!(export.size, 64 << 20);
    assert_ne!(
        export.flags & kernel::FLAG_SEND_TRIM,
        0,
        "the server offers TRIM"
    );
    assert_eq!(export.flags & kernel::FLAG_READ_ONLY, 0);
    drop(s);

    let roots = kernel::Roots::default();
    let e = kernel::attach(
        &roots,
        Path::new("/dev/nbd0"),
        server.addr,
        "missing",
        false,
        false,
    )
    .err()
    .expect("an unknown export fails");
    assert!(e.contains("\"missing\""), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let not_nbd = dir.path().join("nbd0");
    std::fs::write(&not_nbd, b"").unwrap();
    let e = kernel::attach(&roots, &not_nbd, server.addr, "v", false, true)
        .err()
        .expect("a regular file is not an NBD device");
    assert!(e.contains("NBD_SET_SOCK"), "{e}");
    rt.block_on(server.stop());
}
