//! `MemoryVolumes`' device against the shared BlockDevice conformance suite.

use std::sync::Arc;
use torus_frontends::{MemoryVolumes, NbdFrontend, NbdOptions};
use torus_traits::conformance::{block_device, frontend};
use torus_traits::{Frontend, VolumeProvider};

#[tokio::test]
async fn memory_device_passes_the_block_device_suite() {
    let vols = MemoryVolumes::new();
    vols.create("v", 12 * 1024 * 1024 + 4567).unwrap();
    let dev = vols.open("v", false).await.unwrap();
    block_device::all(dev.as_ref()).await;
}

#[tokio::test]
async fn suite_functions_run_alone_in_any_order() {
    let vols = MemoryVolumes::new();
    vols.create("v", block_device::MIN_SIZE).unwrap();
    let dev = vols.open("v", false).await.unwrap();
    let dev = dev.as_ref();
    block_device::unwritten_reads_zeros(dev).await;
    block_device::random_ops_match_model(dev, 1).await;
    block_device::concurrent_disjoint_writes(dev).await;
    block_device::fua_write_ok(dev).await;
    block_device::flush_ok(dev).await;
    block_device::trim_reads_zeros(dev).await;
    block_device::write_zeroes_reads_zeros(dev).await;
    block_device::past_end_is_invalid(dev).await;
    block_device::roundtrip_unaligned(dev).await;
    block_device::random_ops_match_model(dev, 2).await;
}

#[tokio::test]
async fn second_handle_sees_the_same_data() {
    let vols = MemoryVolumes::new();
    vols.create("v", block_device::MIN_SIZE).unwrap();
    let a = vols.open("v", false).await.unwrap();
    let b = vols.open("v", false).await.unwrap();
    a.write(10, bytes::Bytes::from_static(b"hello"), false)
        .await
        .unwrap();
    assert_eq!(&b.read(10, 5).await.unwrap()[..], b"hello");
    assert!(a.multi_conn_safe());
}

#[tokio::test]
async fn nbd_frontend_passes_the_frontend_suite() {
    let vols = Arc::new(MemoryVolumes::new());
    vols.create("v", 1 << 20).unwrap();
    let nbd = NbdFrontend::bind("127.0.0.1:0".parse().unwrap(), vols, NbdOptions::default())
        .await
        .unwrap();
    let nbd: Arc<dyn Frontend> = Arc::new(nbd);
    frontend::all(nbd.clone()).await;
    // serve runs once; a second call says so instead of hanging.
    let (_tx, rx) = tokio::sync::watch::channel(false);
    assert!(nbd.serve(rx).await.is_err());
}
