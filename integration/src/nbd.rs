//! A minimal blocking NBD client for tests that need exact control over
//! requests (write, flush, then kill the server at once). Fixed newstyle
//! handshake with `NBD_OPT_GO`, simple replies only. Independent of the
//! server's own codec on purpose: it checks the server against the protocol
//! document, not against itself.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;

/// An open NBD session on one export.
pub struct Client {
    s: TcpStream,
    pub size: u64,
    pub flags: u16,
    next: u64,
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(s: &mut TcpStream) -> io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut TcpStream) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut TcpStream) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Client {
    /// Connect and open `export` with `NBD_OPT_GO`. An option error comes back
    /// as `Err` whose message holds the server's reply type and text.
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<Client> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_nodelay(true)?;
        if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
            return Err(proto("bad server greeting"));
        }
        let _server_flags = read_u16(&mut s)?;
        // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        let data_len = 4 + export.len() + 2;
        opt.extend_from_slice(&(data_len as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0);
        loop {
            if read_u64(&mut s)? != REPLY_MAGIC {
                return Err(proto("bad option reply magic"));
            }
            let _opt = read_u32(&mut s)?;
            let typ = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            if len > 1 << 20 {
                return Err(proto("option reply too long"));
            }
            let mut data = vec![0; len];
            s.read_exact(&mut data)?;
            match typ {
                REP_ACK => break,
                REP_INFO if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(
                        data[2..10].try_into().map_err(|_| proto("info"))?,
                    ));
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                t if t & 0x8000_0000 != 0 => {
                    return Err(io::Error::other(format!(
                        "option error {t:#x}: {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
                t => return Err(proto(format!("unexpected option reply {t:#x}"))),
            }
        }
        let size = size.ok_or_else(|| proto("server sent no NBD_INFO_EXPORT"))?;
        Ok(Client {
            s,
            size,
            flags,
            next: 1,
        })
    }

    /// Send one request (with payload for WRITE) and read its simple reply.
    /// Returns the NBD error value (0 = success) and the READ payload.
    pub fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<(u32, Vec<u8>)> {
        let handle = self.next;
        self.next += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.s.write_all(&req)?;
        if cmd == CMD_DISC {
            return Ok((0, vec![]));
        }
        if read_u32(&mut self.s)? != SIMPLE_REPLY_MAGIC {
            return Err(proto("bad reply magic"));
        }
        let err = read_u32(&mut self.s)?;
        if read_u64(&mut self.s)? != handle {
            return Err(proto("reply for another handle"));
        }
        let mut data = Vec::new();
        if cmd == CMD_READ && err == 0 {
            data.resize(len as usize, 0);
            self.s.read_exact(&mut data)?;
        }
        Ok((err, data))
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.ok(CMD_WRITE, 0, offset, data.len() as u32, data)
            .map(|_| ())
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.ok(CMD_READ, 0, offset, len, &[])
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.ok(CMD_FLUSH, 0, 0, 0, &[]).map(|_| ())
    }

    fn ok(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        match self.request(cmd, flags, offset, len, payload)? {
            (0, data) => Ok(data),
            (e, _) => Err(io::Error::other(format!("NBD error {e} for command {cmd}"))),
        }
    }

    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[]).map(|_| ())
    }
}
