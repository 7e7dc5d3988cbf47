//! The NBD wire format: constants and pure encode/decode functions over bytes.
//!
//! Written against the canonical protocol document (NetworkBlockDevice
//! `doc/proto.md`). Nothing here does I/O, so every decoder can be fed
//! arbitrary bytes by property tests: a decoder returns a typed
//! [`ProtoError`] for any input it cannot accept (wrong magic, too short,
//! unknown command, an option payload over the caps) and never panics.
//!
//! Only the parts Torus speaks are typed: the fixed newstyle handshake,
//! options and their replies, requests and simple replies. Structured replies
//! are not negotiated (the server answers `NBD_OPT_STRUCTURED_REPLY` with
//! `NBD_REP_ERR_UNSUP`), so only their magic is listed.
//!
//! Encoders for the client side (options, requests) exist for round-trip
//! tests and for test clients; the server only decodes them.

use torus_traits::Error;

/// `NBDMAGIC`: first 8 bytes the server sends (`INIT_PASSWD`).
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply in fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (never sent: structured replies are not negotiated).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Bytes of the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Bytes of the client flags field.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Bytes of an option header: magic, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of the reply to `NBD_OPT_EXPORT_NAME` before the zero padding.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const ZERO_PAD_LEN: usize = 124;

/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Cap on an option's payload. The longest option we understand is
/// `NBD_OPT_GO` (4 + 4096 + 2 + 2·n); 64 KiB leaves room for unknown ones
/// while keeping a hostile client from making us buffer gigabytes.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Handshake flags (server → client, 16 bits).
pub mod handshake {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client → server, 32 bits).
pub mod client {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (per export, 16 bits).
pub mod transmission {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`). Errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    /// Bit set in every error reply type.
    pub const ERR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Information types in `NBD_REP_INFO` replies and `NBD_OPT_INFO`/`GO` requests.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags (per request, 16 bits).
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Every flag the protocol defines.
    pub const ALL: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;
}

/// Error values of a reply (`NBD_E*`).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("truncated {what}: need {needed} bytes, have {have}")]
    Truncated {
        what: &'static str,
        needed: usize,
        have: usize,
    },
    #[error("bad magic in {what}: {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("{what} too long: {len} bytes (max {max})")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// A request with a command type we do not know. The handle is kept so the
    /// server can answer `EINVAL` and go on.
    #[error("unknown command {command} (handle {handle:#x})")]
    UnknownCommand { command: u16, handle: u64 },
    #[error("invalid {what}: {why}")]
    Invalid {
        what: &'static str,
        why: &'static str,
    },
}

type PResult<T> = Result<T, ProtoError>;

// --- little readers over a byte slice -------------------------------------

/// A cursor over a slice whose reads fail with `Truncated` instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated {
                what: self.what,
                needed: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u16(&mut self) -> PResult<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> PResult<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// A protocol string: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
fn decode_string(bytes: &[u8], what: &'static str) -> PResult<String> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(ProtoError::TooLong {
            what,
            len: bytes.len() as u64,
            max: MAX_STRING_LEN as u64,
        });
    }
    if bytes.contains(&0) {
        return Err(ProtoError::Invalid {
            what,
            why: "contains NUL",
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(ProtoError::Invalid {
            what,
            why: "not UTF-8",
        }),
    }
}

/// Cut `s` to at most [`MAX_STRING_LEN`] bytes on a character boundary.
pub fn truncate_string(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn len_u32(n: usize) -> u32 {
    // Everything we encode is capped far below 4 GiB; saturate rather than wrap.
    u32::try_from(n).unwrap_or(u32::MAX)
}

// --- handshake -------------------------------------------------------------

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Decode the greeting (client side); returns the handshake flags.
pub fn decode_greeting(buf: &[u8]) -> PResult<u16> {
    let mut r = Reader::new(buf, "greeting");
    let magic = r.u64()?;
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            found: magic,
        });
    }
    let opt_magic = r.u64()?;
    if opt_magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            found: opt_magic,
        });
    }
    r.u16()
}

/// The client's flags, checked against what the server advertised: the
/// server MUST drop the connection on an unknown flag or one it did not offer.
pub fn decode_client_flags(buf: &[u8], advertised: u16) -> PResult<u32> {
    let flags = Reader::new(buf, "client flags").u32()?;
    let mut allowed = 0u32;
    if advertised & handshake::FIXED_NEWSTYLE != 0 {
        allowed |= client::FIXED_NEWSTYLE;
    }
    if advertised & handshake::NO_ZEROES != 0 {
        allowed |= client::NO_ZEROES;
    }
    if flags & !allowed != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(flags)
}

/// Header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    /// Decode and check the magic and the length cap ([`MAX_OPTION_LEN`]).
    pub fn decode(buf: &[u8]) -> PResult<OptionHeader> {
        let mut r = Reader::new(buf, "option header");
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option header",
                found: magic,
            });
        }
        let option = r.u32()?;
        let len = r.u32()?;
        if len > MAX_OPTION_LEN {
            return Err(ProtoError::TooLong {
                what: "option",
                len: len.into(),
                max: MAX_OPTION_LEN.into(),
            });
        }
        Ok(OptionHeader { option, len })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name; empty means the default export.
    pub name: String,
    /// `NBD_INFO_*` items the client asks for.
    pub requests: Vec<u16>,
}

/// A client option, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    /// Any option we do not implement; its payload is skipped.
    Unknown(u32),
}

impl ClientOption {
    /// Parse the payload of option `option`. An error here means "known
    /// option, malformed payload" (answer `NBD_REP_ERR_INVALID`).
    pub fn parse(option: u32, data: &[u8]) -> PResult<ClientOption> {
        match option {
            opt::EXPORT_NAME => Ok(ClientOption::ExportName(decode_string(
                data,
                "export name",
            )?)),
            // The spec asks servers to ignore any data sent with ABORT.
            opt::ABORT => Ok(ClientOption::Abort),
            opt::LIST => no_data(data, "NBD_OPT_LIST").map(|_| ClientOption::List),
            opt::STARTTLS => no_data(data, "NBD_OPT_STARTTLS").map(|_| ClientOption::StartTls),
            opt::STRUCTURED_REPLY => {
                no_data(data, "NBD_OPT_STRUCTURED_REPLY").map(|_| ClientOption::StructuredReply)
            }
            opt::INFO => Ok(ClientOption::Info(parse_info_request(data)?)),
            opt::GO => Ok(ClientOption::Go(parse_info_request(data)?)),
            other => Ok(ClientOption::Unknown(other)),
        }
    }

    /// The option code.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => opt::EXPORT_NAME,
            ClientOption::Abort => opt::ABORT,
            ClientOption::List => opt::LIST,
            ClientOption::StartTls => opt::STARTTLS,
            ClientOption::Info(_) => opt::INFO,
            ClientOption::Go(_) => opt::GO,
            ClientOption::StructuredReply => opt::STRUCTURED_REPLY,
            ClientOption::Unknown(code) => *code,
        }
    }

    /// Append header and payload (client side; `Unknown` is sent with no data).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            ClientOption::ExportName(name) => data.extend_from_slice(name.as_bytes()),
            ClientOption::Info(req) | ClientOption::Go(req) => {
                data.extend_from_slice(&len_u32(req.name.len()).to_be_bytes());
                data.extend_from_slice(req.name.as_bytes());
                let n = u16::try_from(req.requests.len()).unwrap_or(u16::MAX);
                data.extend_from_slice(&n.to_be_bytes());
                for item in req.requests.iter().take(n.into()) {
                    data.extend_from_slice(&item.to_be_bytes());
                }
            }
            ClientOption::Abort
            | ClientOption::List
            | ClientOption::StartTls
            | ClientOption::StructuredReply
            | ClientOption::Unknown(_) => {}
        }
        let header = OptionHeader {
            option: self.code(),
            len: len_u32(data.len()),
        };
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&data);
    }
}

fn no_data(data: &[u8], what: &'static str) -> PResult<()> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(ProtoError::Invalid {
            what,
            why: "carries data",
        })
    }
}

fn parse_info_request(data: &[u8]) -> PResult<InfoRequest> {
    let mut r = Reader::new(data, "NBD_OPT_INFO/GO");
    let name_len = r.u32()? as usize;
    if name_len > MAX_STRING_LEN {
        return Err(ProtoError::TooLong {
            what: "export name",
            len: name_len as u64,
            max: MAX_STRING_LEN as u64,
        });
    }
    let name = decode_string(r.take(name_len)?, "export name")?;
    let count = r.u16()?;
    let mut requests = Vec::with_capacity(count.into());
    for _ in 0..count {
        requests.push(r.u16()?);
    }
    if !r.rest().is_empty() {
        return Err(ProtoError::Invalid {
            what: "NBD_OPT_INFO/GO",
            why: "trailing bytes after the information requests",
        });
    }
    Ok(InfoRequest { name, requests })
}

/// Decode one whole option (header and payload) from the front of `buf`;
/// returns it with the number of bytes it took.
pub fn decode_option(buf: &[u8]) -> PResult<(ClientOption, usize)> {
    let header = OptionHeader::decode(buf)?;
    let len = header.len as usize;
    let total = OPTION_HEADER_LEN + len;
    if buf.len() < total {
        return Err(ProtoError::Truncated {
            what: "option data",
            needed: total,
            have: buf.len(),
        });
    }
    let option = ClientOption::parse(header.option, &buf[OPTION_HEADER_LEN..total])?;
    Ok((option, total))
}

/// One piece of information in an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// An information type we do not know (client side must ignore it).
    Unknown {
        kind: u16,
        data: Vec<u8>,
    },
}

/// A server reply to an option (fixed newstyle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    /// One export in the answer to `NBD_OPT_LIST`.
    Server {
        name: String,
        description: String,
    },
    Info(Info),
    /// An `NBD_REP_ERR_*` (bit 31 set) with a message for people.
    Error {
        code: u32,
        message: String,
    },
}

impl OptionReply {
    /// Append the reply to `option`, header and payload.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        let kind = match self {
            OptionReply::Ack => rep::ACK,
            OptionReply::Server { .. } => rep::SERVER,
            OptionReply::Info(_) => rep::INFO,
            OptionReply::Error { code, .. } => *code | rep::ERR_BIT,
        };
        out.extend_from_slice(&kind.to_be_bytes());
        let len_at = out.len();
        out.extend_from_slice(&[0u8; 4]);
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, description } => {
                let name = truncate_string(name);
                out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(truncate_string(description).as_bytes());
            }
            OptionReply::Info(info) => match info {
                Info::Export { size, flags } => {
                    out.extend_from_slice(&info::EXPORT.to_be_bytes());
                    out.extend_from_slice(&size.to_be_bytes());
                    out.extend_from_slice(&flags.to_be_bytes());
                }
                Info::Name(name) => {
                    out.extend_from_slice(&info::NAME.to_be_bytes());
                    out.extend_from_slice(truncate_string(name).as_bytes());
                }
                Info::Description(text) => {
                    out.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
                    out.extend_from_slice(truncate_string(text).as_bytes());
                }
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                    out.extend_from_slice(&min.to_be_bytes());
                    out.extend_from_slice(&preferred.to_be_bytes());
                    out.extend_from_slice(&max.to_be_bytes());
                }
                Info::Unknown { kind, data } => {
                    out.extend_from_slice(&kind.to_be_bytes());
                    out.extend_from_slice(data);
                }
            },
            OptionReply::Error { message, .. } => {
                out.extend_from_slice(truncate_string(message).as_bytes());
            }
        }
        let payload_len = len_u32(out.len() - len_at - 4);
        out[len_at..len_at + 4].copy_from_slice(&payload_len.to_be_bytes());
        debug_assert!(out.len() - start >= OPTION_REPLY_HEADER_LEN);
    }

    /// Decode one reply (client side); returns the option it answers, the
    /// reply, and the bytes it took.
    pub fn decode(buf: &[u8]) -> PResult<(u32, OptionReply, usize)> {
        let mut r = Reader::new(buf, "option reply");
        let magic = r.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                found: magic,
            });
        }
        let option = r.u32()?;
        let kind = r.u32()?;
        let len = r.u32()?;
        if len > MAX_OPTION_LEN {
            return Err(ProtoError::TooLong {
                what: "option reply",
                len: len.into(),
                max: MAX_OPTION_LEN.into(),
            });
        }
        let data = r.take(len as usize)?;
        let mut d = Reader::new(data, "option reply data");
        let reply = match kind {
            rep::ACK => {
                no_data(data, "NBD_REP_ACK")?;
                OptionReply::Ack
            }
            rep::SERVER => {
                let name_len = d.u32()? as usize;
                let name = decode_string(d.take(name_len)?, "export name")?;
                let description = decode_string(d.rest(), "export description")?;
                OptionReply::Server { name, description }
            }
            rep::INFO => OptionReply::Info(decode_info(&mut d)?),
            code if code & rep::ERR_BIT != 0 => OptionReply::Error {
                code,
                message: decode_string(data, "error message")?,
            },
            _ => {
                return Err(ProtoError::Invalid {
                    what: "option reply",
                    why: "unknown reply type",
                })
            }
        };
        Ok((option, reply, OPTION_REPLY_HEADER_LEN + len as usize))
    }
}

fn decode_info(d: &mut Reader<'_>) -> PResult<Info> {
    let kind = d.u16()?;
    let info = match kind {
        info::EXPORT => Info::Export {
            size: d.u64()?,
            flags: d.u16()?,
        },
        info::NAME => Info::Name(decode_string(d.rest(), "export name")?),
        info::DESCRIPTION => Info::Description(decode_string(d.rest(), "export description")?),
        info::BLOCK_SIZE => Info::BlockSize {
            min: d.u32()?,
            preferred: d.u32()?,
            max: d.u32()?,
        },
        kind => Info::Unknown {
            kind,
            data: d.rest().to_vec(),
        },
    };
    if !d.rest().is_empty() {
        return Err(ProtoError::Invalid {
            what: "NBD_REP_INFO",
            why: "trailing bytes",
        });
    }
    Ok(info)
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and the 124
/// zero bytes unless the client negotiated `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; ZERO_PAD_LEN]);
    }
}

// --- transmission ----------------------------------------------------------

/// Request types (`NBD_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    Read = 0,
    Write = 1,
    Disc = 2,
    Flush = 3,
    Trim = 4,
    Cache = 5,
    WriteZeroes = 6,
    BlockStatus = 7,
    Resize = 8,
}

impl Command {
    pub fn from_u16(v: u16) -> Option<Command> {
        Some(match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            8 => Command::Resize,
            _ => return None,
        })
    }

    /// Command flags the protocol documents for this command (FUA is valid
    /// on every command). Anything else earns `EINVAL`.
    pub fn allowed_flags(self) -> u16 {
        cmd_flag::FUA
            | match self {
                Command::Read => cmd_flag::DF,
                Command::WriteZeroes => cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO,
                Command::BlockStatus => cmd_flag::REQ_ONE,
                _ => 0,
            }
    }
}

/// A transmission request header. A `Write` is followed on the wire by
/// `len` bytes of payload, which the caller reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Raw command flags (`cmd_flag::*`); unknown bits are kept for validation.
    pub flags: u16,
    pub command: Command,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn decode(buf: &[u8]) -> PResult<Request> {
        let mut r = Reader::new(buf, "request header");
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request header",
                found: magic.into(),
            });
        }
        let flags = r.u16()?;
        let kind = r.u16()?;
        let handle = r.u64()?;
        let offset = r.u64()?;
        let len = r.u32()?;
        let command = Command::from_u16(kind).ok_or(ProtoError::UnknownCommand {
            command: kind,
            handle,
        })?;
        Ok(Request {
            flags,
            command,
            handle,
            offset,
            len,
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        encode_request_raw(
            self.flags,
            self.command as u16,
            self.handle,
            self.offset,
            self.len,
        )
    }

    pub fn fua(&self) -> bool {
        self.flags & cmd_flag::FUA != 0
    }
    pub fn no_hole(&self) -> bool {
        self.flags & cmd_flag::NO_HOLE != 0
    }
    pub fn fast_zero(&self) -> bool {
        self.flags & cmd_flag::FAST_ZERO != 0
    }
    /// True when the flags are all documented for this command.
    pub fn flags_valid(&self) -> bool {
        self.flags & !self.command.allowed_flags() == 0
    }
}

/// Encode a request header with any command number (tests send unknown ones).
pub fn encode_request_raw(
    flags: u16,
    command: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_HEADER_LEN] {
    let mut out = [0u8; REQUEST_HEADER_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&command.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&len.to_be_bytes());
    out
}

/// A simple reply header; a successful `READ` is followed by its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out
    }

    pub fn decode(buf: &[u8]) -> PResult<SimpleReply> {
        let mut r = Reader::new(buf, "simple reply");
        let magic = r.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "simple reply",
                found: magic.into(),
            });
        }
        Ok(SimpleReply {
            error: r.u32()?,
            handle: r.u64()?,
        })
    }
}

/// The NBD error value for a Torus error.
pub fn errno_for(err: &Error) -> u32 {
    match err {
        Error::InvalidArgument(_) => errno::EINVAL,
        Error::NoSpace(_) => errno::ENOSPC,
        Error::ReadOnly(_) => errno::EPERM,
        Error::Unsupported(_) => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constants_match_the_spec() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(rep::ERR_UNSUP, 0x8000_0001);
        assert_eq!(rep::ERR_UNKNOWN, 0x8000_0006);
        assert_eq!(transmission::SEND_FAST_ZERO, 0x0800);
        assert_eq!(transmission::CAN_MULTI_CONN, 0x0100);
    }

    #[test]
    fn greeting_roundtrip() {
        let g = encode_greeting(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES);
        assert_eq!(decode_greeting(&g), Ok(3));
    }

    #[test]
    fn client_flags_checked_against_advertised() {
        let both = handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES;
        assert_eq!(decode_client_flags(&3u32.to_be_bytes(), both), Ok(3));
        assert_eq!(decode_client_flags(&0u32.to_be_bytes(), both), Ok(0));
        assert_eq!(
            decode_client_flags(&4u32.to_be_bytes(), both),
            Err(ProtoError::UnknownClientFlags(4))
        );
        assert_eq!(
            decode_client_flags(&2u32.to_be_bytes(), handshake::FIXED_NEWSTYLE),
            Err(ProtoError::UnknownClientFlags(2))
        );
        assert!(matches!(
            decode_client_flags(&[0, 0], both),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn option_errors_are_typed() {
        let mut buf = Vec::new();
        ClientOption::List.encode(&mut buf);
        buf[0] ^= 0xff;
        assert!(matches!(
            decode_option(&buf),
            Err(ProtoError::BadMagic { .. })
        ));

        let big = OptionHeader {
            option: opt::GO,
            len: MAX_OPTION_LEN + 1,
        };
        assert!(matches!(
            decode_option(&big.encode()),
            Err(ProtoError::TooLong { .. })
        ));

        let short = OptionHeader {
            option: opt::GO,
            len: 10,
        };
        assert!(matches!(
            decode_option(&short.encode()),
            Err(ProtoError::Truncated { .. })
        ));

        // LIST must carry no data.
        assert!(matches!(
            ClientOption::parse(opt::LIST, b"x"),
            Err(ProtoError::Invalid { .. })
        ));
        // GO name length past the payload.
        let mut data = 100u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc\0\0");
        assert!(matches!(
            ClientOption::parse(opt::GO, &data),
            Err(ProtoError::Truncated { .. })
        ));
        // An export name over 4 KiB.
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        assert!(matches!(
            ClientOption::parse(opt::EXPORT_NAME, &long),
            Err(ProtoError::TooLong { .. })
        ));
        // NUL and bad UTF-8 in names.
        assert!(ClientOption::parse(opt::EXPORT_NAME, b"a\0b").is_err());
        assert!(ClientOption::parse(opt::EXPORT_NAME, &[0xff, 0xfe]).is_err());
        // Unknown options decode, whatever their payload.
        assert_eq!(
            ClientOption::parse(1234, b"whatever"),
            Ok(ClientOption::Unknown(1234))
        );
        // ABORT ignores data.
        assert_eq!(
            ClientOption::parse(opt::ABORT, b"x"),
            Ok(ClientOption::Abort)
        );
    }

    #[test]
    fn request_errors_are_typed() {
        let req = encode_request_raw(0, 0, 7, 0, 512);
        assert!(Request::decode(&req).is_ok());
        assert!(matches!(
            Request::decode(&req[..27]),
            Err(ProtoError::Truncated { .. })
        ));
        let mut bad = req;
        bad[0] = 0;
        assert!(matches!(
            Request::decode(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
        let unknown = encode_request_raw(0, 99, 0xabc, 0, 0);
        assert_eq!(
            Request::decode(&unknown),
            Err(ProtoError::UnknownCommand {
                command: 99,
                handle: 0xabc
            })
        );
    }

    #[test]
    fn flag_validation() {
        let mk = |flags, command| Request {
            flags,
            command,
            handle: 0,
            offset: 0,
            len: 0,
        };
        assert!(mk(cmd_flag::FUA, Command::Write).flags_valid());
        assert!(mk(cmd_flag::FUA, Command::Flush).flags_valid());
        assert!(mk(
            cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO,
            Command::WriteZeroes
        )
        .flags_valid());
        assert!(!mk(cmd_flag::NO_HOLE, Command::Write).flags_valid());
        assert!(!mk(1 << 9, Command::Read).flags_valid());
    }

    #[test]
    fn export_name_reply_layout() {
        let mut out = Vec::new();
        encode_export_name_reply(1 << 20, 0x1234, false, &mut out);
        assert_eq!(out.len(), EXPORT_NAME_REPLY_LEN + ZERO_PAD_LEN);
        out.clear();
        encode_export_name_reply(1 << 20, 0x1234, true, &mut out);
        assert_eq!(out, [0, 0, 0, 0, 0, 0x10, 0, 0, 0x12, 0x34]);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = "é".repeat(MAX_STRING_LEN); // 2 bytes each
        let cut = truncate_string(&s);
        assert!(cut.len() <= MAX_STRING_LEN);
        assert!(cut.len() >= MAX_STRING_LEN - 1);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            errno_for(&Error::InvalidArgument("x".into())),
            errno::EINVAL
        );
        assert_eq!(errno_for(&Error::NoSpace("x".into())), errno::ENOSPC);
        assert_eq!(errno_for(&Error::ReadOnly("x".into())), errno::EPERM);
        assert_eq!(errno_for(&Error::Unsupported("x".into())), errno::ENOTSUP);
        assert_eq!(errno_for(&Error::Corrupt("x".into())), errno::EIO);
        assert_eq!(errno_for(&Error::Locked("x".into())), errno::EIO);
    }

    // --- property tests ----------------------------------------------------

    fn name() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,40}"
    }

    fn client_option() -> impl Strategy<Value = ClientOption> {
        let info = || {
            (name(), prop::collection::vec(any::<u16>(), 0..8))
                .prop_map(|(name, requests)| InfoRequest { name, requests })
        };
        prop_oneof![
            name().prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StartTls),
            Just(ClientOption::StructuredReply),
            info().prop_map(ClientOption::Info),
            info().prop_map(ClientOption::Go),
            (12u32..).prop_map(ClientOption::Unknown),
            Just(ClientOption::Unknown(opt::PEEK_EXPORT)),
            Just(ClientOption::Unknown(opt::SET_META_CONTEXT)),
        ]
    }

    fn option_reply() -> impl Strategy<Value = OptionReply> {
        let info = prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| Info::Export { size, flags }),
            name().prop_map(Info::Name),
            name().prop_map(Info::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max)| {
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                }
            }),
            (4u16.., prop::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(kind, data)| Info::Unknown { kind, data }),
        ];
        prop_oneof![
            Just(OptionReply::Ack),
            (name(), name())
                .prop_map(|(name, description)| OptionReply::Server { name, description }),
            info.prop_map(OptionReply::Info),
            (1u32..10, name()).prop_map(|(c, message)| OptionReply::Error {
                code: rep::ERR_BIT | c,
                message
            }),
        ]
    }

    fn command() -> impl Strategy<Value = Command> {
        (0u16..=8).prop_map(|c| Command::from_u16(c).unwrap_or(Command::Read))
    }

    proptest! {
        #[test]
        fn option_roundtrip(o in client_option(), tail in prop::collection::vec(any::<u8>(), 0..8)) {
            let mut buf = Vec::new();
            o.encode(&mut buf);
            let len = buf.len();
            buf.extend_from_slice(&tail);
            let (back, used) = decode_option(&buf).unwrap();
            prop_assert_eq!(back, o);
            prop_assert_eq!(used, len);
        }

        #[test]
        fn option_reply_roundtrip(option in any::<u32>(), r in option_reply()) {
            let mut buf = Vec::new();
            r.encode(option, &mut buf);
            let (o, back, used) = OptionReply::decode(&buf).unwrap();
            prop_assert_eq!(o, option);
            prop_assert_eq!(back, r);
            prop_assert_eq!(used, buf.len());
        }

        #[test]
        fn request_roundtrip(flags in any::<u16>(), command in command(), handle in any::<u64>(),
                             offset in any::<u64>(), len in any::<u32>()) {
            let req = Request { flags, command, handle, offset, len };
            prop_assert_eq!(Request::decode(&req.encode()), Ok(req));
        }

        #[test]
        fn simple_reply_roundtrip(error in any::<u32>(), handle in any::<u64>()) {
            let r = SimpleReply { error, handle };
            prop_assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_greeting(&bytes);
            let _ = decode_client_flags(&bytes, 3);
            let _ = OptionHeader::decode(&bytes);
            let _ = decode_option(&bytes);
            let _ = OptionReply::decode(&bytes);
            let _ = Request::decode(&bytes);
            let _ = SimpleReply::decode(&bytes);
            for code in 0..12 {
                let _ = ClientOption::parse(code, &bytes);
            }
        }

        // Random bytes rarely get past a magic check, so also feed payloads
        // behind valid headers to reach the inner parsers.
        #[test]
        fn decoders_never_panic_behind_valid_headers(
            option in 0u32..12,
            kind in prop_oneof![0u32..5, (rep::ERR_BIT)..(rep::ERR_BIT + 10)],
            declared in prop_oneof![0u32..64, any::<u32>()],
            data in prop::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut buf = OptionHeader { option, len: declared }.encode().to_vec();
            buf.extend_from_slice(&data);
            let _ = decode_option(&buf);

            let mut buf = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            buf.extend_from_slice(&option.to_be_bytes());
            buf.extend_from_slice(&kind.to_be_bytes());
            buf.extend_from_slice(&declared.to_be_bytes());
            buf.extend_from_slice(&data);
            let _ = OptionReply::decode(&buf);

            let mut buf = REQUEST_MAGIC.to_be_bytes().to_vec();
            buf.extend_from_slice(&data);
            let _ = Request::decode(&buf);
        }
    }
}
