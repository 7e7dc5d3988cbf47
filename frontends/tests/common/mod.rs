//! A minimal NBD client over raw bytes, written from the protocol document
//! independently of `torus_frontends::nbd::proto` (so a bug in the codec
//! cannot cancel itself out), and a test server over `MemoryVolumes`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use torus_frontends::{MemoryVolumes, NbdFrontend, NbdOptions};
use torus_traits::Frontend;

pub const MIB: u64 = 1 << 20;

// Values from the protocol document, spelled out here on purpose.
pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
pub const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const FLAG_HAS_FLAGS: u16 = 1;
pub const FLAG_READ_ONLY: u16 = 2;
pub const FLAG_SEND_FLUSH: u16 = 4;
pub const FLAG_SEND_FUA: u16 = 8;
pub const FLAG_SEND_TRIM: u16 = 32;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 64;
pub const FLAG_CAN_MULTI_CONN: u16 = 256;
pub const FLAG_SEND_FAST_ZERO: u16 = 2048;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;
pub const CMD_FLAG_DF: u16 = 4;
pub const CMD_FLAG_FAST_ZERO: u16 = 16;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// A server on 127.0.0.1 over in-memory volumes.
pub struct TestServer {
    pub addr: SocketAddr,
    pub vols: Arc<MemoryVolumes>,
    pub stop: watch::Sender<bool>,
    pub task: JoinHandle<torus_traits::Result<()>>,
}

impl TestServer {
    /// Volumes "alpha" (16 MiB, described) and "beta" (8 MiB).
    pub async fn start(options: NbdOptions) -> TestServer {
        let vols = Arc::new(MemoryVolumes::new());
        vols.create("alpha", 16 * MIB).unwrap();
        vols.set_description("alpha", "the first volume").unwrap();
        vols.create("beta", 8 * MIB).unwrap();
        Self::with_volumes(vols, options).await
    }

    pub async fn with_volumes(vols: Arc<MemoryVolumes>, options: NbdOptions) -> TestServer {
        let frontend = NbdFrontend::bind("127.0.0.1:0".parse().unwrap(), vols.clone(), options)
            .await
            .expect("bind");
        let addr = frontend.local_addr().expect("local addr");
        assert_ne!(addr.port(), 0, "local_addr must report the bound port");
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move { frontend.serve(rx).await });
        TestServer {
            addr,
            vols,
            stop,
            task,
        }
    }

    /// Stop serving and wait for `serve` to return.
    pub async fn shutdown(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve did not return after shutdown")
            .expect("serve task panicked")
            .expect("serve failed");
    }

    /// Wait until no handle of `volume` is open (the server dropped them).
    pub async fn wait_handles_released(&self, volume: &str) {
        for _ in 0..500 {
            if self.vols.stats(volume).unwrap().handles == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "handles of {volume} never released: {:?}",
            self.vols.stats(volume).unwrap()
        );
    }
}

/// Run a test body with a deadline so a hang fails instead of blocking CI.
pub async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test timed out")
}

pub struct Client {
    pub s: TcpStream,
}

/// What a successful NBD_OPT_GO / NBD_OPT_INFO reported.
#[derive(Debug, Default)]
pub struct ExportDetails {
    pub size: u64,
    pub flags: u16,
    pub block_size: Option<(u32, u32, u32)>,
    pub name: Option<String>,
    pub description: Option<String>,
}

impl Client {
    /// Connect and check the greeting; returns the handshake flags too.
    pub async fn connect(addr: SocketAddr) -> (Client, u16) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.expect("greeting");
        assert_eq!(&greeting[0..8], NBDMAGIC);
        assert_eq!(&greeting[8..16], IHAVEOPT);
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        (Client { s }, flags)
    }

    /// Connect and send client flags.
    pub async fn greet(addr: SocketAddr, client_flags: u32) -> Client {
        let (mut c, server_flags) = Client::connect(addr).await;
        assert_eq!(
            server_flags, 3,
            "server must offer FIXED_NEWSTYLE|NO_ZEROES"
        );
        c.s.write_all(&client_flags.to_be_bytes()).await.unwrap();
        c
    }

    /// Connect, negotiate NO_ZEROES and NBD_OPT_GO `name`.
    pub async fn attach(addr: SocketAddr, name: &str) -> (Client, ExportDetails) {
        let mut c = Client::greet(addr, 3).await;
        let details = c
            .go(OPT_GO, name, &[INFO_BLOCK_SIZE])
            .await
            .unwrap_or_else(|(code, msg)| panic!("GO {name} failed: {code:#x} {msg}"));
        (c, details)
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut buf = IHAVEOPT.to_vec();
        buf.extend_from_slice(&option.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.s.write_all(&buf).await.unwrap();
    }

    /// (option, reply type, data)
    pub async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s
            .read_exact(&mut h)
            .await
            .expect("option reply header");
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), REPLY_MAGIC);
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s
            .read_exact(&mut data)
            .await
            .expect("option reply data");
        (option, kind, data)
    }

    /// Send INFO or GO and read replies to the end: details on ACK, or the
    /// error code and message.
    pub async fn go(
        &mut self,
        option: u32,
        name: &str,
        infos: &[u16],
    ) -> Result<ExportDetails, (u32, String)> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            data.extend_from_slice(&i.to_be_bytes());
        }
        self.send_option(option, &data).await;
        let mut details = ExportDetails::default();
        let mut saw_export = false;
        loop {
            let (opt, kind, data) = self.option_reply().await;
            assert_eq!(opt, option, "reply to the wrong option");
            match kind {
                REP_INFO => {
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    let rest = &data[2..];
                    match info {
                        INFO_EXPORT => {
                            assert_eq!(rest.len(), 10, "NBD_INFO_EXPORT length");
                            details.size = u64::from_be_bytes(rest[0..8].try_into().unwrap());
                            details.flags = u16::from_be_bytes([rest[8], rest[9]]);
                            saw_export = true;
                        }
                        INFO_BLOCK_SIZE => {
                            assert_eq!(rest.len(), 12, "NBD_INFO_BLOCK_SIZE length");
                            let w =
                                |i: usize| u32::from_be_bytes(rest[i..i + 4].try_into().unwrap());
                            details.block_size = Some((w(0), w(4), w(8)));
                        }
                        INFO_NAME => details.name = Some(String::from_utf8(rest.to_vec()).unwrap()),
                        INFO_DESCRIPTION => {
                            details.description = Some(String::from_utf8(rest.to_vec()).unwrap())
                        }
                        other => panic!("unexpected info type {other}"),
                    }
                }
                REP_ACK => {
                    assert!(data.is_empty());
                    assert!(saw_export, "ACK without NBD_INFO_EXPORT");
                    return Ok(details);
                }
                code if code & 0x8000_0000 != 0 => {
                    return Err((code, String::from_utf8(data).unwrap()));
                }
                other => panic!("unexpected reply type {other:#x}"),
            }
        }
    }

    pub async fn send_request(
        &mut self,
        flags: u16,
        cmd: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut buf = Vec::with_capacity(28 + payload.len());
        buf.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&cmd.to_be_bytes());
        buf.extend_from_slice(&handle.to_be_bytes());
        buf.extend_from_slice(&offset.to_be_bytes());
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(payload);
        self.s.write_all(&buf).await.unwrap();
    }

    /// (error, handle) of a simple reply.
    pub async fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.expect("simple reply");
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut data = vec![0u8; n];
        self.s.read_exact(&mut data).await.expect("reply payload");
        data
    }

    /// One request, one reply, handle checked; `Ok(data)` for reads.
    pub async fn cmd(
        &mut self,
        flags: u16,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, u32> {
        let handle = offset
            .wrapping_mul(31)
            .wrapping_add(u64::from(cmd) * 7 + 0x1000);
        self.send_request(flags, cmd, handle, offset, len, payload)
            .await;
        let (error, got) = self.reply().await;
        assert_eq!(got, handle, "reply handle");
        if error != 0 {
            return Err(error);
        }
        if cmd == CMD_READ {
            Ok(self.read_bytes(len as usize).await)
        } else {
            Ok(Vec::new())
        }
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.cmd(0, CMD_READ, offset, len, &[]).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), u32> {
        self.cmd(flags, CMD_WRITE, offset, data.len() as u32, data)
            .await
            .map(|_| ())
    }

    pub async fn disconnect(&mut self) {
        self.send_request(0, CMD_DISC, 0, 0, 0, &[]).await;
    }

    /// The server closes the connection (EOF or reset) within 5 s.
    pub async fn expect_closed(&mut self) {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut buf))
            .await
            .expect("server did not close the connection");
        match r {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("expected the connection closed, got {n} more bytes"),
        }
    }
}

/// A recognisable byte pattern.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ ((i >> 9) as u8))
        .collect()
}
