//! The NBD server over real TCP, driven by a raw-bytes client: the happy
//! paths, then every bad input with the exact reply (or disconnect) expected,
//! each followed by a check that the server still serves.

mod common;

use common::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use torus_frontends::{MemoryVolumes, NbdOptions};
use torus_traits::Error;

/// A fresh client can still attach and do I/O on `alpha`.
async fn still_serves(srv: &TestServer) {
    let (mut c, _) = Client::attach(srv.addr, "alpha").await;
    c.write(4096, b"still alive", 0).await.unwrap();
    assert_eq!(c.read(4096, 11).await.unwrap(), b"still alive");
    c.disconnect().await;
    c.expect_closed().await;
}

#[tokio::test]
async fn go_then_read_write_flush_trim_zeroes() {
    every_command(NbdOptions::default()).await
}

/// The same session with each connection on the caller's runtime instead
/// of the per-core connection threads.
#[tokio::test]
async fn every_command_on_the_callers_runtime() {
    every_command(NbdOptions {
        connection_threads: false,
        ..NbdOptions::default()
    })
    .await
}

/// Connections are spread over the per-core threads, each whole on one,
/// and leave their thread's count when they end.
#[tokio::test]
async fn connections_spread_over_the_connection_threads() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let threads = torus_frontends::nbd::connections_per_thread().len();
        assert!(threads >= 1, "no connection threads");
        let mut clients = Vec::new();
        for _ in 0..threads * 2 {
            let (c, _) = Client::attach(srv.addr, "alpha").await;
            clients.push(c);
        }
        // Every connection counts from its accept: all are counted by now.
        assert_eq!(
            torus_frontends::nbd::connections_per_thread(),
            vec![2; threads]
        );
        for c in &mut clients {
            c.write(0, b"each", 0).await.unwrap();
            c.disconnect().await;
            c.expect_closed().await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while torus_frontends::nbd::connections_per_thread() != vec![0; threads] {
            assert!(
                Instant::now() < deadline,
                "connections still counted: {:?}",
                torus_frontends::nbd::connections_per_thread()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        srv.shutdown().await;
    })
    .await
}

/// Opening a volume starts what outlives the connection (a volume's
/// background work, peer connections), so connections on the connection
/// threads open volumes on the server's own runtime, not on their thread.
#[tokio::test]
async fn volumes_are_opened_on_the_servers_runtime() {
    struct Recording {
        inner: Arc<MemoryVolumes>,
        opened_on: std::sync::Mutex<Vec<String>>,
    }
    #[async_trait::async_trait]
    impl torus_traits::VolumeProvider for Recording {
        async fn list(&self) -> torus_traits::Result<Vec<torus_traits::ExportInfo>> {
            self.inner.list().await
        }
        async fn info(&self, name: &str) -> torus_traits::Result<torus_traits::ExportInfo> {
            self.inner.info(name).await
        }
        async fn open(
            &self,
            name: &str,
            read_only: bool,
        ) -> torus_traits::Result<Arc<dyn torus_traits::BlockDevice>> {
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            self.opened_on.lock().unwrap().push(thread);
            self.inner.open(name, read_only).await
        }
    }
    within(30, async {
        let vols = Arc::new(MemoryVolumes::new());
        vols.create("alpha", 16 * MIB).unwrap();
        let provider = Arc::new(Recording {
            inner: vols,
            opened_on: Default::default(),
        });
        let frontend = torus_frontends::NbdFrontend::bind(
            "127.0.0.1:0".parse().unwrap(),
            provider.clone(),
            NbdOptions::default(),
        )
        .await
        .unwrap();
        let addr = torus_traits::Frontend::local_addr(&frontend).unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move { torus_traits::Frontend::serve(&frontend, rx).await });
        let here = std::thread::current().name().unwrap_or("").to_owned();
        let (mut c, _) = Client::attach(addr, "alpha").await;
        c.write(0, b"data", 0).await.unwrap();
        assert_eq!(c.read(0, 4).await.unwrap(), b"data");
        c.disconnect().await;
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        let opened_on = provider.opened_on.lock().unwrap().clone();
        assert_eq!(opened_on, vec![here], "opened on the wrong thread");
    })
    .await
}

async fn every_command(options: NbdOptions) {
    within(30, async {
        let srv = TestServer::start(options).await;
        let (mut c, d) = Client::attach(srv.addr, "alpha").await;
        assert_eq!(d.size, 16 * MIB);
        let want = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO
            | FLAG_CAN_MULTI_CONN;
        assert_eq!(d.flags, want, "transmission flags {:#x}", d.flags);
        assert_eq!(d.block_size, Some((1, 4096, 32 * 1024 * 1024)));

        // Unaligned write and read back, across the 4 MiB mark.
        let data = pattern(1, 100_000);
        let off = 4 * MIB - 50_001;
        c.write(off, &data, 0).await.unwrap();
        assert_eq!(c.read(off, 100_000).await.unwrap(), data);
        assert_eq!(c.read(off - 10, 10).await.unwrap(), vec![0; 10]);

        // FUA write reaches the device as FUA.
        c.write(0, b"fua!", CMD_FLAG_FUA).await.unwrap();
        assert_eq!(srv.vols.stats("alpha").unwrap().fua_ops, 1);

        // FLUSH.
        let flushes = srv.vols.stats("alpha").unwrap().flushes;
        c.cmd(0, CMD_FLUSH, 0, 0, &[]).await.unwrap();
        assert_eq!(srv.vols.stats("alpha").unwrap().flushes, flushes + 1);

        // TRIM reads back zeros and frees pages.
        c.cmd(0, CMD_TRIM, off, 100_000, &[]).await.unwrap();
        assert_eq!(c.read(off, 100_000).await.unwrap(), vec![0; 100_000]);

        // WRITE_ZEROES, with and without NO_HOLE.
        c.write(MIB, &pattern(2, 8192), 0).await.unwrap();
        c.cmd(0, CMD_WRITE_ZEROES, MIB, 8192, &[]).await.unwrap();
        assert_eq!(c.read(MIB, 8192).await.unwrap(), vec![0; 8192]);
        let before = srv.vols.stats("alpha").unwrap().allocated;
        c.cmd(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 2 * MIB, 8192, &[])
            .await
            .unwrap();
        assert_eq!(c.read(2 * MIB, 8192).await.unwrap(), vec![0; 8192]);
        assert_eq!(
            srv.vols.stats("alpha").unwrap().allocated,
            before + 8192,
            "NO_HOLE must keep the range allocated"
        );
        // FAST_ZERO alone is fine.
        c.cmd(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 3 * MIB, 4096, &[])
            .await
            .unwrap();

        // Zero-length requests succeed.
        assert_eq!(c.read(0, 0).await.unwrap(), Vec::<u8>::new());
        c.write(0, &[], 0).await.unwrap();

        // The last byte of the export.
        c.write(16 * MIB - 1, b"z", 0).await.unwrap();
        assert_eq!(c.read(16 * MIB - 1, 1).await.unwrap(), b"z");

        // DISC: the server flushes, closes, and drops the device handle.
        let flushes = srv.vols.stats("alpha").unwrap().flushes;
        c.disconnect().await;
        c.expect_closed().await;
        srv.wait_handles_released("alpha").await;
        assert!(srv.vols.stats("alpha").unwrap().flushes > flushes);
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn export_name_with_and_without_no_zeroes() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        for (client_flags, pad) in [(1u32, 124usize), (3, 0)] {
            let mut c = Client::greet(srv.addr, client_flags).await;
            c.send_option(OPT_EXPORT_NAME, b"beta").await;
            let reply = c.read_bytes(10 + pad).await;
            assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), 8 * MIB);
            let flags = u16::from_be_bytes([reply[8], reply[9]]);
            assert_eq!(flags & FLAG_HAS_FLAGS, FLAG_HAS_FLAGS);
            assert!(reply[10..].iter().all(|b| *b == 0));
            // The next bytes are exactly the reply to our first request.
            c.write(0, b"hi", 0).await.unwrap();
            assert_eq!(c.read(0, 2).await.unwrap(), b"hi");
            c.disconnect().await;
            c.expect_closed().await;
        }
        // EXPORT_NAME of a missing volume: no way to answer, so a hard close.
        let mut c = Client::greet(srv.addr, 3).await;
        c.send_option(OPT_EXPORT_NAME, b"missing").await;
        c.expect_closed().await;
        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn opt_list_lists_volumes() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let mut c = Client::greet(srv.addr, 3).await;
        c.send_option(OPT_LIST, &[]).await;
        let mut listed = Vec::new();
        loop {
            let (opt, kind, data) = c.option_reply().await;
            assert_eq!(opt, OPT_LIST);
            if kind == REP_ACK {
                assert!(data.is_empty());
                break;
            }
            assert_eq!(kind, REP_SERVER);
            let n = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
            let name = String::from_utf8(data[4..4 + n].to_vec()).unwrap();
            let desc = String::from_utf8(data[4 + n..].to_vec()).unwrap();
            listed.push((name, desc));
        }
        assert_eq!(
            listed,
            vec![
                ("alpha".to_string(), "the first volume".to_string()),
                ("beta".to_string(), String::new())
            ]
        );
        // LIST with data is malformed: ERR_INVALID, and the session goes on.
        c.send_option(OPT_LIST, b"junk").await;
        let (opt, kind, _) = c.option_reply().await;
        assert_eq!((opt, kind), (OPT_LIST, REP_ERR_INVALID));
        c.go(OPT_GO, "beta", &[]).await.unwrap();
        c.write(0, b"x", 0).await.unwrap();
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn opt_info_reports_size_flags_name_description() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let mut c = Client::greet(srv.addr, 3).await;
        let d = c
            .go(
                OPT_INFO,
                "alpha",
                &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
            )
            .await
            .unwrap();
        assert_eq!(d.size, 16 * MIB);
        assert_eq!(d.flags & FLAG_READ_ONLY, 0);
        assert_ne!(d.flags & FLAG_SEND_FLUSH, 0);
        assert_eq!(d.name.as_deref(), Some("alpha"));
        assert_eq!(d.description.as_deref(), Some("the first volume"));
        assert_eq!(d.block_size, Some((1, 4096, 32 * 1024 * 1024)));
        // INFO does not keep the volume open.
        srv.wait_handles_released("alpha").await;

        // Missing volume: ERR_UNKNOWN for INFO and GO, session continues.
        let (code, msg) = c.go(OPT_INFO, "nope", &[]).await.unwrap_err();
        assert_eq!(code, REP_ERR_UNKNOWN);
        assert!(msg.contains("nope"), "{msg}");
        let (code, _) = c.go(OPT_GO, "nope", &[]).await.unwrap_err();
        assert_eq!(code, REP_ERR_UNKNOWN);

        // Empty name with two volumes: no default.
        let (code, _) = c.go(OPT_GO, "", &[]).await.unwrap_err();
        assert_eq!(code, REP_ERR_UNKNOWN);

        // Locked by another node: INFO still describes it (it takes no
        // lock), GO fails with POLICY and the reason as the message.
        srv.vols.set_locked_by("beta", Some("node-7")).unwrap();
        let d = c.go(OPT_INFO, "beta", &[]).await.unwrap();
        assert_eq!(d.size, 8 * MIB);
        assert_eq!(d.flags & FLAG_READ_ONLY, 0);
        let (code, msg) = c.go(OPT_GO, "beta", &[]).await.unwrap_err();
        assert_eq!(code, REP_ERR_POLICY);
        assert_eq!(msg, "locked: held by node node-7");

        // Malformed GO (name length past the data): ERR_INVALID.
        c.send_option(OPT_GO, &[0, 0, 0, 200, b'a']).await;
        let (opt, kind, _) = c.option_reply().await;
        assert_eq!((opt, kind), (OPT_GO, REP_ERR_INVALID));

        // Then a good GO still works on the same session.
        let d = c.go(OPT_GO, "alpha", &[]).await.unwrap();
        assert_eq!(d.size, 16 * MIB);
        c.write(0, b"ok", 0).await.unwrap();
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn empty_name_picks_the_only_volume() {
    within(30, async {
        let vols = Arc::new(MemoryVolumes::new());
        vols.create("solo", 9 * MIB).unwrap();
        let srv = TestServer::with_volumes(vols, NbdOptions::default()).await;
        let mut c = Client::greet(srv.addr, 3).await;
        let d = c.go(OPT_GO, "", &[INFO_NAME]).await.unwrap();
        assert_eq!(d.size, 9 * MIB);
        assert_eq!(d.name.as_deref(), Some("solo"));
        c.write(0, b"x", 0).await.unwrap();
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn unknown_options_get_unsup_and_the_session_continues() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let mut c = Client::greet(srv.addr, 3).await;
        for (option, data) in [
            (OPT_STRUCTURED_REPLY, &b""[..]),
            (OPT_STARTTLS, b""),
            (9, b"\0\0\0\0\0\0\0\0"), // LIST_META_CONTEXT
            (1000, b"some payload to skip"),
        ] {
            c.send_option(option, data).await;
            let (opt, kind, _) = c.option_reply().await;
            assert_eq!((opt, kind), (option, REP_ERR_UNSUP), "option {option}");
        }
        let d = c.go(OPT_GO, "alpha", &[]).await.unwrap();
        assert_eq!(d.size, 16 * MIB);
        assert_eq!(c.read(0, 3).await.unwrap(), vec![0; 3]);
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn opt_abort_acks_then_closes() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let mut c = Client::greet(srv.addr, 3).await;
        c.send_option(OPT_ABORT, &[]).await;
        let (opt, kind, data) = c.option_reply().await;
        assert_eq!((opt, kind, data.len()), (OPT_ABORT, REP_ACK, 0));
        c.expect_closed().await;
        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn bad_handshakes_close_only_that_connection() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        // A bystander attached before the bad clients, served after them.
        let (mut bystander, _) = Client::attach(srv.addr, "beta").await;

        // Unknown client flag.
        let mut c = Client::greet(srv.addr, 0x4).await;
        c.expect_closed().await;

        // Wrong option magic.
        let mut c = Client::greet(srv.addr, 3).await;
        c.s.write_all(b"IHAVEOPX\0\0\0\x07\0\0\0\0").await.unwrap();
        c.expect_closed().await;

        // Option length over the cap (64 KiB).
        let mut c = Client::greet(srv.addr, 3).await;
        c.s.write_all(b"IHAVEOPT\0\0\0\x07\x7f\xff\xff\xff")
            .await
            .unwrap();
        c.expect_closed().await;

        // Garbage instead of a handshake.
        let (mut c, _) = Client::connect(srv.addr).await;
        c.s.write_all(&[0xff; 64]).await.unwrap();
        c.expect_closed().await;

        // Half the client flags, then gone.
        let (mut c, _) = Client::connect(srv.addr).await;
        c.s.write_all(&[0, 0]).await.unwrap();
        drop(c);

        bystander.write(0, b"bystander", 0).await.unwrap();
        assert_eq!(bystander.read(0, 9).await.unwrap(), b"bystander");
        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn handshake_timeout_closes_idle_clients() {
    within(30, async {
        let srv = TestServer::start(NbdOptions {
            handshake_timeout: Duration::from_millis(300),
            ..NbdOptions::default()
        })
        .await;
        let mut c = Client::greet(srv.addr, 3).await;
        c.expect_closed().await;
        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn unknown_command_and_bad_flags_get_einval() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        // Unknown command type.
        assert_eq!(c.cmd(0, 42, 0, 0, &[]).await, Err(EINVAL));
        // CACHE is known but not advertised.
        assert_eq!(c.cmd(0, CMD_CACHE, 0, 4096, &[]).await, Err(EINVAL));
        // An unknown flag bit on READ.
        assert_eq!(c.cmd(1 << 9, CMD_READ, 0, 16, &[]).await, Err(EINVAL));
        // DF without structured replies.
        assert_eq!(c.cmd(CMD_FLAG_DF, CMD_READ, 0, 16, &[]).await, Err(EINVAL));
        // NO_HOLE on a WRITE: refused, and its payload is drained.
        assert_eq!(
            c.cmd(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 5, b"hello").await,
            Err(EINVAL)
        );
        assert_eq!(c.read(0, 5).await.unwrap(), vec![0; 5]);
        // FAST_ZERO with NO_HOLE cannot be fast.
        assert_eq!(
            c.cmd(
                CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                CMD_WRITE_ZEROES,
                0,
                4096,
                &[]
            )
            .await,
            Err(ENOTSUP)
        );
        c.write(0, b"fine", 0).await.unwrap();
        assert_eq!(c.read(0, 4).await.unwrap(), b"fine");
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn ranges_past_the_end() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut c, _) = Client::attach(srv.addr, "beta").await;
        let size = 8 * MIB;
        assert_eq!(c.read(size - 1, 2).await, Err(EINVAL));
        assert_eq!(c.read(u64::MAX, 1).await, Err(EINVAL));
        assert_eq!(c.cmd(0, CMD_TRIM, size, 1, &[]).await, Err(EINVAL));
        // Writes past the end: ENOSPC (what the spec asks for writes), and
        // the payload is drained so the next request is read correctly.
        assert_eq!(c.write(size - 2, &pattern(3, 10_000), 0).await, Err(ENOSPC));
        assert_eq!(
            c.cmd(0, CMD_WRITE_ZEROES, u64::MAX - 5, 10, &[]).await,
            Err(ENOSPC)
        );
        assert_eq!(c.read(size - 2, 2).await.unwrap(), vec![0, 0]);
        c.write(size - 4, b"tail", 0).await.unwrap();
        assert_eq!(c.read(size - 4, 4).await.unwrap(), b"tail");
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn request_length_over_the_maximum() {
    within(30, async {
        let srv = TestServer::start(NbdOptions {
            max_request: 1 << 20,
            max_in_flight_bytes: 4 << 20,
            ..NbdOptions::default()
        })
        .await;
        let (mut c, d) = Client::attach(srv.addr, "alpha").await;
        assert_eq!(d.block_size, Some((1, 4096, 1 << 20)));
        // READ over the maximum: EINVAL, connection goes on.
        assert_eq!(c.read(0, (1 << 20) + 1).await, Err(EINVAL));
        // TRIM and WRITE_ZEROES carry no payload: not limited.
        c.cmd(0, CMD_TRIM, 0, 4 << 20, &[]).await.unwrap();
        c.cmd(0, CMD_WRITE_ZEROES, 0, 4 << 20, &[]).await.unwrap();
        // Exactly the maximum works.
        let big = pattern(4, 1 << 20);
        c.write(0, &big, 0).await.unwrap();
        assert_eq!(c.read(0, 1 << 20).await.unwrap(), big);
        // WRITE over the maximum: EINVAL, then the server hangs up (it will
        // not drain a payload that large).
        c.send_request(0, CMD_WRITE, 77, 0, 64 << 20, &[]).await;
        assert_eq!(c.reply().await, (EINVAL, 77));
        c.expect_closed().await;
        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn read_only_exports_refuse_writes() {
    within(30, async {
        // The frontend-wide read_only option.
        let srv = TestServer::start(NbdOptions {
            read_only: true,
            ..NbdOptions::default()
        })
        .await;
        srv.vols.set_locked_by("alpha", Some("n9")).unwrap(); // read-only opens take no lock
        let (mut c, d) = Client::attach(srv.addr, "alpha").await;
        assert_ne!(d.flags & FLAG_READ_ONLY, 0);
        assert_eq!(d.flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
        assert_eq!(c.write(0, b"nope", 0).await, Err(EPERM));
        assert_eq!(c.cmd(0, CMD_TRIM, 0, 4096, &[]).await, Err(EPERM));
        assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 0, 4096, &[]).await, Err(EPERM));
        assert_eq!(c.read(0, 4).await.unwrap(), vec![0; 4]);
        c.cmd(0, CMD_FLUSH, 0, 0, &[]).await.unwrap();
        srv.shutdown().await;

        // A volume only the provider knows is read-only: exported read-only.
        let srv = TestServer::start(NbdOptions::default()).await;
        srv.vols.set_read_only("beta", true).unwrap();
        let (mut c, d) = Client::attach(srv.addr, "beta").await;
        assert_ne!(d.flags & FLAG_READ_ONLY, 0);
        assert_eq!(c.write(0, &pattern(1, 9000), 0).await, Err(EPERM));
        assert_eq!(c.read(0, 4).await.unwrap(), vec![0; 4]);
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn device_errors_map_to_nbd_errors() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        let cases = [
            (Error::NoSpace("pool full".into()), ENOSPC),
            (Error::ReadOnly("x".into()), EPERM),
            (Error::Unsupported("x".into()), ENOTSUP),
            (Error::InvalidArgument("x".into()), EINVAL),
            (Error::Corrupt("bad checksum".into()), EIO),
            (Error::Unavailable("peers down".into()), EIO),
        ];
        for (err, code) in cases {
            srv.vols.set_fail_with("alpha", Some(err.clone())).unwrap();
            assert_eq!(c.write(0, b"data", 0).await, Err(code), "{err}");
            // A failed READ sends no payload: the next reply parses.
            assert_eq!(c.read(0, 4096).await, Err(code), "{err}");
            assert_eq!(c.cmd(0, CMD_FLUSH, 0, 0, &[]).await, Err(code), "{err}");
        }
        srv.vols.set_fail_with("alpha", None).unwrap();
        assert_eq!(c.read(0, 4).await.unwrap(), vec![0; 4]);
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_request_that_panics_gets_eio_and_the_connection_goes_on() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        c.write(0, b"kept", 0).await.unwrap();
        srv.vols.set_panic("alpha", true).unwrap();
        assert_eq!(c.write(0, b"lost", 0).await, Err(EIO));
        assert_eq!(c.read(0, 4).await, Err(EIO));
        srv.vols.set_panic("alpha", false).unwrap();
        assert_eq!(c.read(0, 4).await.unwrap(), b"kept");
        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

/// Large writes run on the reader until they first wait (the server's
/// `INLINE_WRITE_MIN`): a panic there still fails only that request.
#[tokio::test]
async fn a_large_write_that_panics_gets_eio_and_the_connection_goes_on() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        let kept = pattern(1, MIB as usize);
        c.write(0, &kept, 0).await.unwrap();
        srv.vols.set_panic("alpha", true).unwrap();
        assert_eq!(c.write(0, &pattern(2, MIB as usize), 0).await, Err(EIO));
        srv.vols.set_panic("alpha", false).unwrap();
        assert_eq!(c.read(0, MIB as u32).await.unwrap(), kept);
        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

/// A large write whose device call waits is handed to a task of its own:
/// the reader goes on reading and later requests are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_that_wait_do_not_hold_the_reader() {
    within(60, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        srv.vols
            .set_latency("alpha", Some(Duration::from_millis(200)))
            .unwrap();
        let start = Instant::now();
        let mut expected: Expected = HashMap::new();
        for i in 0..8u64 {
            let h = 100 + i;
            let data = pattern(10 + i as u8, MIB as usize);
            c.send_request(0, CMD_WRITE, h, i * MIB, MIB as u32, &data)
                .await;
            expected.insert(h, None);
            let h = 200 + i;
            c.send_request(0, CMD_READ, h, 8 * MIB + i * 4096, 4096, &[])
                .await;
            expected.insert(h, Some(vec![0; 4096]));
        }
        expect_replies(&mut c, expected).await;
        let elapsed = start.elapsed();
        // One after another, these would take 16 × 200 ms.
        assert!(
            elapsed < Duration::from_millis(1600),
            "large writes held the reader: {elapsed:?}"
        );
        srv.vols.set_latency("alpha", None).unwrap();
        for i in 0..8u64 {
            let got = c.read(i * MIB, MIB as u32).await.unwrap();
            assert!(got == pattern(10 + i as u8, MIB as usize), "write {i}");
        }
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn wrong_request_magic_closes_the_connection() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        c.s.write_all(&[0xde; 28]).await.unwrap();
        c.expect_closed().await;
        srv.wait_handles_released("alpha").await;
        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn clients_vanishing_mid_request() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;

        // Half a request header.
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
        c.s.write_all(&[0, 0, 0, 1, 0, 0]).await.unwrap();
        drop(c);
        srv.wait_handles_released("alpha").await;

        // Half a WRITE payload.
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        c.send_request(0, CMD_WRITE, 1, 0, 100_000, &pattern(1, 30_000))
            .await;
        drop(c);
        srv.wait_handles_released("alpha").await;

        // Requests in flight (slow device) when the client goes away: they
        // finish, the device is flushed, the handle is dropped.
        srv.vols
            .set_latency("alpha", Some(Duration::from_millis(200)))
            .unwrap();
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        let flushes = srv.vols.stats("alpha").unwrap().flushes;
        for i in 0..8u64 {
            c.send_request(0, CMD_WRITE, i, i * 4096, 4, b"gone").await;
        }
        c.send_request(0, CMD_READ, 99, 0, 1 << 20, &[]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(c);
        srv.wait_handles_released("alpha").await;
        assert!(srv.vols.stats("alpha").unwrap().flushes > flushes);
        srv.vols.set_latency("alpha", None).unwrap();
        // The writes completed even though nobody got the replies.
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        assert_eq!(c.read(7 * 4096, 4).await.unwrap(), b"gone");

        // Vanishing between the handshake's messages.
        let mut h = Client::greet(srv.addr, 3).await;
        h.s.write_all(b"IHAVEOPT\0\0\0\x07\0\0\0\x40abc")
            .await
            .unwrap();
        drop(h);

        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

/// Replies still to come, by handle: a `READ`'s data, or `None`.
type Expected = HashMap<u64, Option<Vec<u8>>>;

/// Reads one successful reply for each request in `expected`, in any
/// order, each once, checking `READ` data.
async fn expect_replies(c: &mut Client, mut expected: Expected) {
    while !expected.is_empty() {
        let (error, handle) = c.reply().await;
        assert_eq!(error, 0, "handle {handle}");
        let want = expected
            .remove(&handle)
            .unwrap_or_else(|| panic!("unexpected or duplicate handle {handle}"));
        if let Some(data) = want {
            assert_eq!(c.read_bytes(data.len()).await, data, "handle {handle}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_requests_in_flight_on_one_connection() {
    within(60, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        // Seed data to read back.
        for i in 0..32u64 {
            c.write(i * 65_536, &pattern(i as u8, 65_536), 0)
                .await
                .unwrap();
        }
        srv.vols
            .set_latency("alpha", Some(Duration::from_millis(100)))
            .unwrap();
        // 32 reads and 32 writes, sent back to back before reading any reply.
        let start = Instant::now();
        let mut expected: Expected = HashMap::new();
        for i in 0..32u64 {
            let h = 1_000 + i;
            c.send_request(0, CMD_READ, h, i * 65_536, 65_536, &[])
                .await;
            expected.insert(h, Some(pattern(i as u8, 65_536)));
            let h = 2_000 + i;
            let data = pattern(100 + i as u8, 4096);
            c.send_request(0, CMD_WRITE, h, 4 * MIB + i * 4096, 4096, &data)
                .await;
            expected.insert(h, None);
        }
        expect_replies(&mut c, expected).await;
        let elapsed = start.elapsed();
        // Serially this would take 64 × 100 ms.
        assert!(
            elapsed < Duration::from_millis(3200),
            "requests were not processed concurrently: {elapsed:?}"
        );
        srv.vols.set_latency("alpha", None).unwrap();
        for i in 0..32u64 {
            assert_eq!(
                c.read(4 * MIB + i * 4096, 4096).await.unwrap(),
                pattern(100 + i as u8, 4096)
            );
        }
        srv.shutdown().await;
    })
    .await
}

/// Large read replies are sent by their own request tasks, small ones by
/// the writer task: pipelined together, every reply still arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_small_replies_pipelined_arrive_whole() {
    within(60, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        for i in 0..4u64 {
            c.write(i * MIB, &pattern(i as u8, MIB as usize), 0)
                .await
                .unwrap();
        }
        for i in 0..16u64 {
            c.write(8 * MIB + i * 4096, &pattern(50 + i as u8, 4096), 0)
                .await
                .unwrap();
        }
        // Many finish together, so direct sends meet each other and the
        // writer's batches.
        srv.vols
            .set_latency("alpha", Some(Duration::from_millis(2)))
            .unwrap();
        for round in 0..4u64 {
            let mut expected: Expected = HashMap::new();
            for i in 0..16u64 {
                let h = round * 1_000 + i;
                if i % 4 == 0 {
                    let at = (i / 4) % 4;
                    c.send_request(0, CMD_READ, h, at * MIB, MIB as u32, &[])
                        .await;
                    expected.insert(h, Some(pattern(at as u8, MIB as usize)));
                } else {
                    c.send_request(0, CMD_READ, h, 8 * MIB + i * 4096, 4096, &[])
                        .await;
                    expected.insert(h, Some(pattern(50 + i as u8, 4096)));
                }
                let h = round * 1_000 + 500 + i;
                c.send_request(0, CMD_WRITE, h, 12 * MIB + i * 4096, 8, b"smallone")
                    .await;
                expected.insert(h, None);
            }
            expect_replies(&mut c, expected).await;
        }
        srv.vols.set_latency("alpha", None).unwrap();
        assert_eq!(c.read(12 * MIB + 15 * 4096, 8).await.unwrap(), b"smallone");
        srv.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_in_flight_limit_still_completes_everything() {
    within(60, async {
        let srv = TestServer::start(NbdOptions {
            max_in_flight: 2,
            max_request: 64 * 1024,
            max_in_flight_bytes: 64 * 1024,
            ..NbdOptions::default()
        })
        .await;
        let (c, _) = Client::attach(srv.addr, "alpha").await;
        srv.vols
            .set_latency("alpha", Some(Duration::from_millis(2)))
            .unwrap();
        // Far more requests than slots and byte budget, pipelined from one
        // task while this one reads replies, so neither socket buffer is the
        // limit: only the server's back-pressure is.
        const N: u64 = 200;
        const LEN: usize = 48 * 1024;
        let (mut rd, mut wr) = c.s.into_split();
        let sender = tokio::spawn(async move {
            for i in 0..N {
                let mut req = Vec::new();
                let (cmd, offset) = if i % 2 == 0 {
                    (CMD_WRITE, (i / 2) * LEN as u64)
                } else {
                    (CMD_READ, (i / 2) * LEN as u64)
                };
                req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                req.extend_from_slice(&0u16.to_be_bytes());
                req.extend_from_slice(&cmd.to_be_bytes());
                req.extend_from_slice(&i.to_be_bytes());
                req.extend_from_slice(&offset.to_be_bytes());
                req.extend_from_slice(&(LEN as u32).to_be_bytes());
                if cmd == CMD_WRITE {
                    req.extend_from_slice(&pattern(i as u8, LEN));
                }
                wr.write_all(&req).await.unwrap();
            }
            wr
        });
        let mut seen = std::collections::HashSet::new();
        for _ in 0..N {
            let mut h = [0u8; 16];
            tokio::io::AsyncReadExt::read_exact(&mut rd, &mut h)
                .await
                .unwrap();
            assert_eq!(
                u32::from_be_bytes(h[0..4].try_into().unwrap()),
                SIMPLE_REPLY_MAGIC
            );
            assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
            let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
            assert!(seen.insert(handle), "duplicate handle {handle}");
            if handle % 2 == 1 {
                // Reads run concurrently with the write of the same range, so
                // only the length is certain here.
                let mut data = vec![0u8; LEN];
                tokio::io::AsyncReadExt::read_exact(&mut rd, &mut data)
                    .await
                    .unwrap();
            }
        }
        let wr = sender.await.unwrap();
        srv.vols.set_latency("alpha", None).unwrap();
        let mut c = Client {
            s: rd.reunite(wr).unwrap(),
        };
        for i in (0..N).step_by(2) {
            assert_eq!(
                c.read((i / 2) * LEN as u64, LEN as u32).await.unwrap(),
                pattern(i as u8, LEN),
                "write {i}"
            );
        }
        srv.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_returns() {
    within(30, async {
        let srv = TestServer::start(NbdOptions::default()).await;
        let (mut idle, _) = Client::attach(srv.addr, "beta").await;
        let (mut busy, _) = Client::attach(srv.addr, "alpha").await;
        srv.vols
            .set_latency("alpha", Some(Duration::from_millis(300)))
            .unwrap();
        busy.send_request(0, CMD_WRITE, 5, 0, 4, b"last").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let vols = srv.vols.clone();
        let flushes = vols.stats("alpha").unwrap().flushes;
        srv.shutdown().await;
        // The in-flight write was answered before the connection closed.
        assert_eq!(busy.reply().await, (0, 5));
        busy.expect_closed().await;
        idle.expect_closed().await;
        assert!(vols.stats("alpha").unwrap().flushes > flushes);
        assert_eq!(vols.stats("alpha").unwrap().handles, 0);
        assert_eq!(vols.stats("beta").unwrap().handles, 0);
        vols.set_latency("alpha", None).unwrap();
        let dev = torus_traits::VolumeProvider::open(vols.as_ref(), "alpha", true)
            .await
            .unwrap();
        assert_eq!(&dev.read(0, 4).await.unwrap()[..], b"last");
    })
    .await
}

#[tokio::test]
async fn a_client_that_stops_reading_replies_is_disconnected() {
    within(60, async {
        let options = NbdOptions {
            reply_timeout: Duration::from_secs(1),
            ..NbdOptions::default()
        };
        let srv = TestServer::start(options).await;
        let (mut c, _) = Client::attach(srv.addr, "alpha").await;
        // Ask for far more reply data than socket buffers hold, never read it.
        for h in 0..96u64 {
            c.send_request(0, 0, h, (h % 16) * MIB, MIB as u32, &[])
                .await;
        }
        // The writer gives up, the connection ends, the handle is released.
        srv.wait_handles_released("alpha").await;
        still_serves(&srv).await;
        srv.shutdown().await;
    })
    .await
}

/// The congestion control of this process's own socket connected from
/// `peer` to `local` (the server's end of a test connection).
fn congestion_of(local: SocketAddr, peer: SocketAddr) -> String {
    use std::os::fd::BorrowedFd;
    let dir = std::fs::read_dir("/proc/self/fd").expect("list /proc/self/fd");
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
        {
            continue;
        }
        // SAFETY: only borrowed for the reads below. Nothing closes it
        // meanwhile: nextest runs each test in a process of its own, and
        // this test's descriptors stay open while it looks.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let ends = (sock.local_addr(), sock.peer_addr());
        let (Ok(l), Ok(p)) = ends else { continue };
        if l.as_socket() == Some(local) && p.as_socket() == Some(peer) {
            return torus_frontends::nbd::congestion_of(&fd).expect("getsockopt TCP_CONGESTION");
        }
    }
    panic!("no socket from {peer} to {local} in this process");
}

#[tokio::test]
async fn loopback_clients_get_the_configured_congestion_control() {
    within(30, async {
        let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .expect("read the system's congestion control");
        let system = system.trim();
        // Ask for one the system does not default to, to see it applied.
        let want = if system == "reno" { "cubic" } else { "reno" };
        for (option, expect) in [(Some(want), want), (None, system)] {
            let srv = TestServer::start(NbdOptions {
                loopback_congestion: option.map(String::from),
                ..NbdOptions::default()
            })
            .await;
            let (mut c, _) = Client::attach(srv.addr, "alpha").await;
            let client = c.s.local_addr().expect("client address");
            assert_eq!(congestion_of(srv.addr, client), expect, "option {option:?}");
            c.write(0, b"still speaks NBD", 0).await.unwrap();
            assert_eq!(c.read(0, 16).await.unwrap(), b"still speaks NBD");
            c.disconnect().await;
            srv.shutdown().await;
        }
        // A name this host does not have is reported and then ignored.
        let srv = TestServer::start(NbdOptions {
            loopback_congestion: Some("nosuchcc".into()),
            ..NbdOptions::default()
        })
        .await;
        let (c, _) = Client::attach(srv.addr, "alpha").await;
        let client = c.s.local_addr().expect("client address");
        assert_eq!(congestion_of(srv.addr, client), system);
        srv.shutdown().await;
    })
    .await;
}

/// A client that sends one request at a time, `rounds` write-then-read
/// pairs in the 512 KiB of `alpha` from `base`, with a pause every tenth
/// round longer than any busy poll; every answer checked.
async fn one_at_a_time(srv: &TestServer, rounds: u64, base: u64) {
    let (mut c, _) = Client::attach(srv.addr, "alpha").await;
    for i in 0..rounds {
        let data = pattern(i as u8, 4096);
        let off = base + (i % 64) * 8192;
        c.write(off, &data, 0).await.unwrap();
        assert_eq!(c.read(off, 4096).await.unwrap(), data, "round {i}");
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    c.disconnect().await;
    c.expect_closed().await;
}

/// Busy polling for the next request yields to the runtime between polls:
/// even on a single-threaded runtime, where the client, the request tasks
/// and the polling reader share one thread, with the longest poll allowed,
/// and with a second connection served meanwhile, it takes about as long
/// as without polling (a poll that held the thread would cost up to 10 ms
/// per request: about 4 s more here). The connections run on the test's
/// runtime, not on the connection threads, which would put them on
/// different threads wherever there are two cores; each connection
/// thread is such a single-threaded runtime too.
#[tokio::test(flavor = "current_thread")]
async fn busy_polling_for_the_next_request_starves_nothing() {
    within(120, async {
        let mut took = Vec::new();
        for poll in [Duration::ZERO, torus_frontends::nbd::MAX_BUSY_POLL] {
            let options = NbdOptions {
                busy_poll: poll,
                connection_threads: false,
                ..NbdOptions::default()
            };
            let srv = TestServer::start(options).await;
            let started = Instant::now();
            tokio::join!(one_at_a_time(&srv, 400, 0), async {
                // The other connection: served while the first one polls.
                for _ in 0..20 {
                    still_serves(&srv).await;
                }
            });
            took.push(started.elapsed());
            srv.shutdown().await;
        }
        let (without, with) = (took[0], took[1]);
        assert!(
            with < without * 2 + Duration::from_secs(1),
            "880 requests took {with:?} polling, {without:?} not: the poll held the thread"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_at_a_time_with_and_without_busy_polling() {
    within(60, async {
        for poll in [Duration::ZERO, Duration::from_micros(200)] {
            let options = NbdOptions {
                busy_poll: poll,
                ..NbdOptions::default()
            };
            let srv = TestServer::start(options).await;
            let hits = torus_frontends::nbd::busy_poll_hits();
            one_at_a_time(&srv, 300, 0).await;
            if !poll.is_zero() {
                // The poll ran, and caught requests (most of them, on a
                // machine that is not overloaded).
                let caught = torus_frontends::nbd::busy_poll_hits() - hits;
                assert!(caught > 0, "no request was caught by the poll");
            }
            srv.shutdown().await;
        }
    })
    .await
}

/// Several clients sending one request at a time: every one is served, and
/// only one connection polls at any moment (polling costs one core at most).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_polls_at_a_time() {
    within(60, async {
        let options = NbdOptions {
            busy_poll: Duration::from_millis(1),
            ..NbdOptions::default()
        };
        let srv = TestServer::start(options).await;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut most = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    most = most.max(torus_frontends::nbd::busy_polling_now());
                    tokio::task::yield_now().await;
                }
                most
            })
        };
        tokio::join!(
            one_at_a_time(&srv, 150, 0),
            one_at_a_time(&srv, 150, MIB),
            one_at_a_time(&srv, 150, 2 * MIB)
        );
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let most = sampler.await.unwrap();
        assert!(most <= 1, "{most} connections polled at once");
        srv.shutdown().await;
        assert_eq!(
            torus_frontends::nbd::busy_polling_now(),
            0,
            "a slot was kept"
        );
    })
    .await
}
