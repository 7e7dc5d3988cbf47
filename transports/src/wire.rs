//! The peer wire protocol: pure encode/decode functions over bytes, no I/O.
//!
//! Everything a network peer can send us is parsed here, so this module is
//! where fuzzing and property tests aim. Nothing in it panics on input:
//! every malformed byte sequence comes back as a typed [`WireError`].
//!
//! # Handshake
//!
//! Each side sends one handshake message when a connection opens: the client
//! a `Hello`, the server an `Accept` (or a `Refuse` with a reason, after which
//! it closes the connection). Integers are big-endian.
//!
//! ```text
//! magic    4  "TRSP"
//! version  2  major << 8 | minor          (this code speaks 1.0)
//! kind     1  1 = Hello, 2 = Accept, 3 = Refuse
//! len      2  length of the body that follows
//! body     len
//!   Hello / Accept:  max_frame u32   largest frame (length-prefix value) the sender accepts
//!                    flags     u8    bit 0: cluster follows, bit 1: peer id follows
//!                    [cluster  u16 length + UTF-8]
//!                    [peer id  16 bytes, a UUID]
//!                    (bytes after these are ignored: later minor versions may append fields)
//!   Refuse:          UTF-8 reason
//! ```
//!
//! The preamble (magic, version, kind, len) and the `Refuse` body are the same
//! in every version, so a peer can always read why it was refused. Peers with a
//! different major version refuse each other; a minor version may append
//! handshake fields and add message kinds that it only sends to peers that
//! announced that minor version.
//!
//! # Frames
//!
//! After the handshake both directions carry frames:
//!
//! ```text
//! len   u32  number of bytes that follow (header + body), at most the receiver's max_frame
//! id    u64  request id, chosen by the caller; the reply carries the same id
//! kind  u8   message kind (below)
//! body       kind-specific fields, then the payload if the kind has one
//! ```
//!
//! | kind | message        | body                                                    |
//! |------|----------------|---------------------------------------------------------|
//! | 0x01 | Ping           | —                                                       |
//! | 0x02 | Read           | volume u64, index u64, offset u64, len u64              |
//! | 0x03 | Write          | volume u64, index u64, offset u64, epoch u64, payload   |
//! | 0x04 | Zero           | volume u64, index u64, offset u64, len u64, epoch u64   |
//! | 0x05 | Flush          | volume u64, epoch u64                                   |
//! | 0x06 | DeleteChunk    | volume u64, index u64, epoch u64                        |
//! | 0x07 | ListChunks     | volume u64                                              |
//! | 0x08 | ScanChunk      | volume u64, index u64                                   |
//! | 0x81 | Pong           | —                                                       |
//! | 0x82 | Data           | payload                                                 |
//! | 0x83 | Done           | —                                                       |
//! | 0x85 | Chunks         | count u32, then count × index u64                       |
//! | 0x86 | Scan           | count u32, count × crc u32, bad u32, bad × block u32    |
//! | 0x84 | Error          | code u8, then per code (see [`error_code`])             |
//!
//! An error body is the code, then for `LeaseNotFound` the lease id (i64), for
//! `Io` the context (u16 length + UTF-8) and the OS error's message (rest), and
//! for every other kind the message (rest). Messages are cut to
//! [`MAX_ERROR_TEXT`] bytes so an error reply always fits a frame.
//!
//! Payloads are the rest of the frame and are decoded as slices of the
//! received frame buffer: no copy between the socket read and the handler.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;
use std::sync::Arc;
use torus_traits::{ChunkRef, Epoch, Error, PeerId, PeerRequest, PeerResponse, Result, VolumeId};

/// First four bytes of every connection.
pub const MAGIC: [u8; 4] = *b"TRSP";
/// Bytes of the handshake preamble: magic, version, kind, body length.
pub const HANDSHAKE_PREAMBLE_LEN: usize = 4 + 2 + 1 + 2;
/// Bytes of the frame length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes of the frame header after the prefix: request id and kind.
pub const FRAME_HEADER_LEN: usize = 8 + 1;
/// Largest block of fixed fields in a message that has a payload (Write: four u64s),
/// with room to spare.
const MAX_FIXED_FIELDS: usize = 5 * 8;
/// Largest payload the default frame limit admits.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024 * 1024;
/// Default limit on a frame's length-prefix value: a 64 MiB payload plus its header.
pub const DEFAULT_MAX_FRAME: u32 =
    (DEFAULT_MAX_PAYLOAD + FRAME_HEADER_LEN + MAX_FIXED_FIELDS) as u32;
/// Smallest frame limit a peer may announce: every error reply fits in it.
pub const MIN_MAX_FRAME: u32 = 16 * 1024;
/// Error messages (and an I/O error's context) are cut to this many bytes.
pub const MAX_ERROR_TEXT: usize = 4096;

/// A protocol version. Peers talk when their major versions are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
}

impl Version {
    /// The version this code speaks.
    pub const CURRENT: Version = Version { major: 1, minor: 0 };

    /// Whether a peer speaking `other` can talk to one speaking `self`.
    pub fn is_compatible(self, other: Version) -> bool {
        self.major == other.major
    }

    fn to_u16(self) -> u16 {
        (u16::from(self.major) << 8) | u16::from(self.minor)
    }

    fn from_u16(v: u16) -> Self {
        Version {
            major: (v >> 8) as u8,
            minor: (v & 0xff) as u8,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why bytes could not be encoded or decoded. Decoding never panics; it
/// returns one of these, and the connection that sent the bytes is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The connection does not start with [`MAGIC`]: not a Torus peer.
    #[error("bad magic \"{}\": not a Torus peer connection", found.escape_ascii())]
    BadMagic { found: Vec<u8> },
    /// The peer speaks a different major protocol version.
    #[error("incompatible protocol version {theirs} (this peer speaks {ours})")]
    IncompatibleVersion { ours: Version, theirs: Version },
    /// A message ended before a field it must contain.
    #[error("truncated {what}: needed {needed} bytes, {available} left")]
    Truncated {
        what: &'static str,
        needed: usize,
        available: usize,
    },
    /// A frame is longer than the receiver accepts (or than fits a u32).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversize { len: u64, max: u32 },
    /// A frame's kind byte is not a known message.
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    /// A handshake's kind byte is not Hello, Accept or Refuse.
    #[error("unknown handshake kind {0:#04x}")]
    UnknownHandshakeKind(u8),
    /// A fixed-size message carried bytes after its last field.
    #[error("{extra} unexpected trailing bytes after message kind {kind:#04x}")]
    TrailingBytes { kind: u8, extra: usize },
    /// A text field was not UTF-8.
    #[error("{0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// A handshake field is too long to encode.
    #[error("{0} is too long to encode")]
    FieldTooLong(&'static str),
}

// ---------------------------------------------------------------------------
// Handshake

/// What a peer says about itself when a connection opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: Version,
    /// The largest frame (length-prefix value) the sender accepts.
    pub max_frame: u32,
    /// The sender's cluster name, when it has one; peers of different clusters refuse each other.
    pub cluster: Option<String>,
    /// The sender's peer id, when it has one.
    pub peer: Option<PeerId>,
}

/// One handshake message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Client to server: who is calling.
    Hello(Hello),
    /// Server to client: accepted, and who answers.
    Accept(Hello),
    /// Server to client: refused, and why; the server closes the connection after it.
    Refuse { version: Version, reason: String },
}

const HS_HELLO: u8 = 1;
const HS_ACCEPT: u8 = 2;
const HS_REFUSE: u8 = 3;
const HELLO_HAS_CLUSTER: u8 = 1;
const HELLO_HAS_PEER: u8 = 2;

/// Encode a handshake message, preamble included.
pub fn encode_handshake(h: &Handshake) -> Result<Bytes, WireError> {
    let mut body = BytesMut::new();
    let (kind, version) = match h {
        Handshake::Hello(hello) | Handshake::Accept(hello) => {
            body.put_u32(hello.max_frame);
            let mut flags = 0;
            if hello.cluster.is_some() {
                flags |= HELLO_HAS_CLUSTER;
            }
            if hello.peer.is_some() {
                flags |= HELLO_HAS_PEER;
            }
            body.put_u8(flags);
            if let Some(cluster) = &hello.cluster {
                let len =
                    u16::try_from(cluster.len()).map_err(|_| WireError::FieldTooLong("cluster"))?;
                body.put_u16(len);
                body.put_slice(cluster.as_bytes());
            }
            if let Some(peer) = &hello.peer {
                body.put_slice(peer.0.as_bytes());
            }
            let kind = if matches!(h, Handshake::Hello(_)) {
                HS_HELLO
            } else {
                HS_ACCEPT
            };
            (kind, hello.version)
        }
        Handshake::Refuse { version, reason } => {
            body.put_slice(truncate_text(reason).as_bytes());
            (HS_REFUSE, *version)
        }
    };
    let len = u16::try_from(body.len()).map_err(|_| WireError::FieldTooLong("handshake"))?;
    let mut out = BytesMut::with_capacity(HANDSHAKE_PREAMBLE_LEN + body.len());
    out.put_slice(&MAGIC);
    out.put_u16(version.to_u16());
    out.put_u8(kind);
    out.put_u16(len);
    out.put_slice(&body);
    Ok(out.freeze())
}

/// Decode one handshake message from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the message and how many
/// bytes it used. A wrong magic is reported as soon as the first differing
/// byte arrives. A `Refuse` is decoded whatever its version; a `Hello` or
/// `Accept` from another major version is [`WireError::IncompatibleVersion`].
pub fn decode_handshake(buf: &[u8]) -> Result<Option<(Handshake, usize)>, WireError> {
    let seen = buf.len().min(MAGIC.len());
    if buf[..seen] != MAGIC[..seen] {
        return Err(WireError::BadMagic {
            found: buf[..seen].to_vec(),
        });
    }
    if buf.len() < HANDSHAKE_PREAMBLE_LEN {
        return Ok(None);
    }
    let version = Version::from_u16(u16::from_be_bytes([buf[4], buf[5]]));
    let kind = buf[6];
    let body_len = usize::from(u16::from_be_bytes([buf[7], buf[8]]));
    let total = HANDSHAKE_PREAMBLE_LEN + body_len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[HANDSHAKE_PREAMBLE_LEN..total];
    let message = match kind {
        HS_REFUSE => Handshake::Refuse {
            version,
            reason: utf8(body, "refusal reason")?,
        },
        HS_HELLO | HS_ACCEPT => {
            if !Version::CURRENT.is_compatible(version) {
                return Err(WireError::IncompatibleVersion {
                    ours: Version::CURRENT,
                    theirs: version,
                });
            }
            let hello = decode_hello(version, body)?;
            if kind == HS_HELLO {
                Handshake::Hello(hello)
            } else {
                Handshake::Accept(hello)
            }
        }
        other => return Err(WireError::UnknownHandshakeKind(other)),
    };
    Ok(Some((message, total)))
}

fn decode_hello(version: Version, body: &[u8]) -> Result<Hello, WireError> {
    let mut r = Fields::new(Bytes::copy_from_slice(body));
    let max_frame = r.u32("hello max_frame")?;
    let flags = r.u8("hello flags")?;
    let cluster = if flags & HELLO_HAS_CLUSTER != 0 {
        let len = usize::from(r.u16("hello cluster length")?);
        Some(utf8(&r.bytes(len, "hello cluster")?, "hello cluster")?)
    } else {
        None
    };
    let peer = if flags & HELLO_HAS_PEER != 0 {
        let raw = r.bytes(16, "hello peer id")?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&raw);
        Some(PeerId(uuid::Uuid::from_bytes(id)))
    } else {
        None
    };
    // Trailing bytes are fields of a later minor version: ignored on purpose.
    Ok(Hello {
        version,
        max_frame,
        cluster,
        peer,
    })
}

// ---------------------------------------------------------------------------
// Frames

/// What a frame carries.
#[derive(Debug, Clone)]
pub enum Message {
    Request(PeerRequest),
    Response(Result<PeerResponse>),
}

/// One decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: u64,
    pub message: Message,
}

mod kind {
    pub const PING: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE: u8 = 0x03;
    pub const ZERO: u8 = 0x04;
    pub const FLUSH: u8 = 0x05;
    pub const DELETE_CHUNK: u8 = 0x06;
    pub const LIST_CHUNKS: u8 = 0x07;
    pub const SCAN_CHUNK: u8 = 0x08;
    pub const PONG: u8 = 0x81;
    pub const DATA: u8 = 0x82;
    pub const DONE: u8 = 0x83;
    pub const ERROR: u8 = 0x84;
    pub const CHUNKS: u8 = 0x85;
    pub const SCAN: u8 = 0x86;
}

/// An encoded frame: the length prefix, header and fixed fields in `head`,
/// and the payload (possibly empty) kept as the caller's own `Bytes` so a
/// writer can send it without copying it into a new buffer.
#[derive(Debug, Clone)]
pub struct Encoded {
    head: Bytes,
    payload: Bytes,
}

impl Encoded {
    /// Length prefix, header and fixed fields.
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    /// The payload, sent right after the head.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Bytes on the wire, length prefix included.
    pub fn wire_len(&self) -> usize {
        self.head.len() + self.payload.len()
    }

    /// The whole frame in one buffer (copies the payload; for tests and tools).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.wire_len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.payload);
        v
    }
}

/// Encode a request frame that must fit in `max_frame`.
pub fn encode_request(
    id: u64,
    request: &PeerRequest,
    max_frame: u32,
) -> Result<Encoded, WireError> {
    let mut head = start_frame(id);
    let mut payload = Bytes::new();
    match request {
        PeerRequest::Ping => head.put_u8(kind::PING),
        PeerRequest::Read { chunk, offset, len } => {
            head.put_u8(kind::READ);
            put_chunk(&mut head, chunk);
            head.put_u64(*offset);
            head.put_u64(*len);
        }
        PeerRequest::Write {
            chunk,
            offset,
            data,
            epoch,
        } => {
            head.put_u8(kind::WRITE);
            put_chunk(&mut head, chunk);
            head.put_u64(*offset);
            head.put_u64(epoch.0);
            payload = data.clone();
        }
        PeerRequest::Zero {
            chunk,
            offset,
            len,
            epoch,
        } => {
            head.put_u8(kind::ZERO);
            put_chunk(&mut head, chunk);
            head.put_u64(*offset);
            head.put_u64(*len);
            head.put_u64(epoch.0);
        }
        PeerRequest::Flush { volume, epoch } => {
            head.put_u8(kind::FLUSH);
            head.put_u64(volume.0);
            head.put_u64(epoch.0);
        }
        PeerRequest::DeleteChunk { chunk, epoch } => {
            head.put_u8(kind::DELETE_CHUNK);
            put_chunk(&mut head, chunk);
            head.put_u64(epoch.0);
        }
        PeerRequest::ListChunks { volume } => {
            head.put_u8(kind::LIST_CHUNKS);
            head.put_u64(volume.0);
        }
        PeerRequest::ScanChunk { chunk } => {
            head.put_u8(kind::SCAN_CHUNK);
            put_chunk(&mut head, chunk);
        }
    }
    finish_frame(head, payload, max_frame)
}

/// Encode a reply frame (success or error) that must fit in `max_frame`.
pub fn encode_response(
    id: u64,
    response: &Result<PeerResponse>,
    max_frame: u32,
) -> Result<Encoded, WireError> {
    let mut head = start_frame(id);
    let mut payload = Bytes::new();
    match response {
        Ok(PeerResponse::Pong) => head.put_u8(kind::PONG),
        Ok(PeerResponse::Done) => head.put_u8(kind::DONE),
        Ok(PeerResponse::Data(data)) => {
            head.put_u8(kind::DATA);
            payload = data.clone();
        }
        Ok(PeerResponse::Chunks(indices)) => {
            head.put_u8(kind::CHUNKS);
            let mut body = BytesMut::with_capacity(4 + 8 * indices.len());
            put_count(&mut body, indices.len())?;
            indices.iter().for_each(|&i| body.put_u64(i));
            payload = body.freeze();
        }
        Ok(PeerResponse::Scan(scan)) => {
            head.put_u8(kind::SCAN);
            let mut body = BytesMut::with_capacity(8 + 4 * (scan.crcs.len() + scan.bad.len()));
            put_count(&mut body, scan.crcs.len())?;
            scan.crcs.iter().for_each(|&c| body.put_u32(c));
            put_count(&mut body, scan.bad.len())?;
            scan.bad.iter().for_each(|&b| body.put_u32(b));
            payload = body.freeze();
        }
        Err(e) => {
            head.put_u8(kind::ERROR);
            put_error(&mut head, e);
        }
    }
    finish_frame(head, payload, max_frame)
}

/// Encode any frame.
pub fn encode_frame(frame: &Frame, max_frame: u32) -> Result<Encoded, WireError> {
    match &frame.message {
        Message::Request(r) => encode_request(frame.id, r, max_frame),
        Message::Response(r) => encode_response(frame.id, r, max_frame),
    }
}

/// A u32 element count.
fn put_count(buf: &mut BytesMut, n: usize) -> Result<(), WireError> {
    let n = u32::try_from(n).map_err(|_| WireError::FieldTooLong("element count"))?;
    buf.put_u32(n);
    Ok(())
}

fn start_frame(id: u64) -> BytesMut {
    let mut head = BytesMut::with_capacity(LEN_PREFIX + FRAME_HEADER_LEN + MAX_FIXED_FIELDS);
    head.put_u32(0); // length, filled in by finish_frame
    head.put_u64(id);
    head
}

fn finish_frame(mut head: BytesMut, payload: Bytes, max_frame: u32) -> Result<Encoded, WireError> {
    let len = (head.len() - LEN_PREFIX) as u64 + payload.len() as u64;
    if len > u64::from(max_frame) {
        return Err(WireError::Oversize {
            len,
            max: max_frame,
        });
    }
    // len <= max_frame, a u32, so the cast is exact.
    head[..LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(Encoded {
        head: head.freeze(),
        payload,
    })
}

fn put_chunk(buf: &mut BytesMut, chunk: &ChunkRef) {
    buf.put_u64(chunk.volume.0);
    buf.put_u64(chunk.index);
}

/// The wire code of each error kind. Codes are never reused.
pub fn error_code(e: &Error) -> u8 {
    match e {
        Error::NotFound(_) => 1,
        Error::AlreadyExists(_) => 2,
        Error::NoSpace(_) => 3,
        Error::InvalidArgument(_) => 4,
        Error::Fenced(_) => 5,
        Error::Locked(_) => 6,
        Error::LeaseNotFound(_) => 7,
        Error::ReadOnly(_) => 8,
        Error::Unavailable(_) => 9,
        Error::Timeout(_) => 10,
        Error::Corrupt(_) => 11,
        Error::Unsupported(_) => 12,
        Error::Closed(_) => 13,
        Error::Io { .. } => 14,
        Error::Other(_) => 15,
    }
}

fn put_error(buf: &mut BytesMut, e: &Error) {
    buf.put_u8(error_code(e));
    match e {
        Error::LeaseNotFound(lease) => buf.put_i64(*lease),
        Error::Io { context, source } => {
            let context = truncate_text(context);
            // truncate_text keeps it under MAX_ERROR_TEXT, well below u16::MAX.
            buf.put_u16(context.len() as u16);
            buf.put_slice(context.as_bytes());
            buf.put_slice(truncate_text(&source.to_string()).as_bytes());
        }
        other => {
            let text = other.message().unwrap_or_default();
            buf.put_slice(truncate_text(text).as_bytes());
        }
    }
}

/// Cut `s` to at most [`MAX_ERROR_TEXT`] bytes on a character boundary.
fn truncate_text(s: &str) -> &str {
    if s.len() <= MAX_ERROR_TEXT {
        return s;
    }
    let mut end = MAX_ERROR_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Incremental frame decoding from a connection's read buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame: u32,
}

impl FrameDecoder {
    /// A decoder refusing frames whose length prefix exceeds `max_frame`.
    pub fn new(max_frame: u32) -> Self {
        FrameDecoder { max_frame }
    }

    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Take one frame off the front of `buf`, or `Ok(None)` when it holds only
    /// part of one. The length is checked against the limit before any room is
    /// reserved for the frame, so a hostile prefix cannot make us allocate.
    /// The frame's payload shares `buf`'s memory (no copy).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if len > self.max_frame {
            return Err(WireError::Oversize {
                len: u64::from(len),
                max: self.max_frame,
            });
        }
        let total = LEN_PREFIX + len as usize;
        if buf.len() < total {
            // Within the limit: make room for the whole frame so it is read in one piece.
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total).freeze();
        frame.advance(LEN_PREFIX);
        decode_frame(frame).map(Some)
    }
}

/// Decode one complete frame: the bytes after the length prefix. Payloads are
/// slices of `frame`.
pub fn decode_frame(frame: Bytes) -> Result<Frame, WireError> {
    let mut r = Fields::new(frame);
    let id = r.u64("frame id")?;
    let kind = r.u8("frame kind")?;
    let message = match kind {
        kind::PING => Message::Request(PeerRequest::Ping),
        kind::READ => Message::Request(PeerRequest::Read {
            chunk: r.chunk()?,
            offset: r.u64("read offset")?,
            len: r.u64("read length")?,
        }),
        kind::WRITE => {
            let chunk = r.chunk()?;
            let offset = r.u64("write offset")?;
            let epoch = Epoch(r.u64("write epoch")?);
            Message::Request(PeerRequest::Write {
                chunk,
                offset,
                data: r.rest(),
                epoch,
            })
        }
        kind::ZERO => Message::Request(PeerRequest::Zero {
            chunk: r.chunk()?,
            offset: r.u64("zero offset")?,
            len: r.u64("zero length")?,
            epoch: Epoch(r.u64("zero epoch")?),
        }),
        kind::FLUSH => Message::Request(PeerRequest::Flush {
            volume: VolumeId(r.u64("flush volume")?),
            epoch: Epoch(r.u64("flush epoch")?),
        }),
        kind::DELETE_CHUNK => Message::Request(PeerRequest::DeleteChunk {
            chunk: r.chunk()?,
            epoch: Epoch(r.u64("delete epoch")?),
        }),
        kind::LIST_CHUNKS => Message::Request(PeerRequest::ListChunks {
            volume: VolumeId(r.u64("list volume")?),
        }),
        kind::SCAN_CHUNK => Message::Request(PeerRequest::ScanChunk { chunk: r.chunk()? }),
        kind::CHUNKS => {
            let n = r.count(8, "chunk count")?;
            let indices = (0..n)
                .map(|_| r.u64("chunk index"))
                .collect::<Result<_, _>>()?;
            Message::Response(Ok(PeerResponse::Chunks(indices)))
        }
        kind::SCAN => {
            let n = r.count(4, "checksum count")?;
            let crcs = (0..n)
                .map(|_| r.u32("checksum"))
                .collect::<Result<_, _>>()?;
            let n = r.count(4, "bad block count")?;
            let bad = (0..n)
                .map(|_| r.u32("bad block"))
                .collect::<Result<_, _>>()?;
            Message::Response(Ok(PeerResponse::Scan(torus_traits::ChunkScan {
                crcs,
                bad,
            })))
        }
        kind::PONG => Message::Response(Ok(PeerResponse::Pong)),
        kind::DATA => Message::Response(Ok(PeerResponse::Data(r.rest()))),
        kind::DONE => Message::Response(Ok(PeerResponse::Done)),
        kind::ERROR => Message::Response(Err(r.error()?)),
        other => return Err(WireError::UnknownKind(other)),
    };
    r.finish(kind)?;
    Ok(Frame { id, message })
}

/// A cursor over a frame's fields.
struct Fields {
    buf: Bytes,
}

impl Fields {
    fn new(buf: Bytes) -> Self {
        Fields { buf }
    }

    fn need(&self, n: usize, what: &'static str) -> Result<(), WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                what,
                needed: n,
                available: self.buf.len(),
            });
        }
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, WireError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, WireError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }

    /// A u32 element count, checked against the bytes left (each element
    /// `size` bytes) so a hostile count cannot make us allocate.
    fn count(&mut self, size: usize, what: &'static str) -> Result<usize, WireError> {
        let n = self.u32(what)? as usize;
        self.need(n.saturating_mul(size), what)?;
        Ok(n)
    }

    fn chunk(&mut self) -> Result<ChunkRef, WireError> {
        Ok(ChunkRef::new(
            VolumeId(self.u64("chunk volume")?),
            self.u64("chunk index")?,
        ))
    }

    /// The rest of the frame, zero-copy.
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn text(&mut self, what: &'static str) -> Result<String, WireError> {
        let rest = self.rest();
        utf8(&rest, what)
    }

    fn error(&mut self) -> Result<Error, WireError> {
        let code = self.u8("error code")?;
        Ok(match code {
            1 => Error::NotFound(self.text("error message")?),
            2 => Error::AlreadyExists(self.text("error message")?),
            3 => Error::NoSpace(self.text("error message")?),
            4 => Error::InvalidArgument(self.text("error message")?),
            5 => Error::Fenced(self.text("error message")?),
            6 => Error::Locked(self.text("error message")?),
            7 => Error::LeaseNotFound(self.i64("lease id")?),
            8 => Error::ReadOnly(self.text("error message")?),
            9 => Error::Unavailable(self.text("error message")?),
            10 => Error::Timeout(self.text("error message")?),
            11 => Error::Corrupt(self.text("error message")?),
            12 => Error::Unsupported(self.text("error message")?),
            13 => Error::Closed(self.text("error message")?),
            14 => {
                let len = usize::from(self.u16("I/O error context length")?);
                let context = utf8(&self.bytes(len, "I/O error context")?, "I/O error context")?;
                let message = self.text("I/O error message")?;
                // The OS error cannot cross the wire; its message does.
                Error::Io {
                    context,
                    source: Arc::new(std::io::Error::other(message)),
                }
            }
            15 => Error::Other(self.text("error message")?),
            // A kind added by a later minor version: still an error, with its text.
            unknown => Error::Other(format!(
                "remote error (kind {unknown}): {}",
                self.text("error message")?
            )),
        })
    }

    fn finish(&self, kind: u8) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                kind,
                extra: self.buf.len(),
            })
        }
    }
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, WireError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| WireError::InvalidUtf8(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8], max: u32) -> Result<Option<Frame>, WireError> {
        let mut buf = BytesMut::from(bytes);
        FrameDecoder::new(max).decode(&mut buf)
    }

    fn same_error(a: &Error, b: &Error) -> bool {
        a.kind_name() == b.kind_name() && a.to_string() == b.to_string()
    }

    fn same_frame(a: &Frame, b: &Frame) -> bool {
        a.id == b.id
            && match (&a.message, &b.message) {
                (Message::Request(x), Message::Request(y)) => x == y,
                (Message::Response(Ok(x)), Message::Response(Ok(y))) => x == y,
                (Message::Response(Err(x)), Message::Response(Err(y))) => same_error(x, y),
                _ => false,
            }
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
    }

    fn arb_chunk() -> impl Strategy<Value = ChunkRef> {
        (any::<u64>(), any::<u64>()).prop_map(|(v, i)| ChunkRef::new(VolumeId(v), i))
    }

    fn arb_request() -> impl Strategy<Value = PeerRequest> {
        prop_oneof![
            Just(PeerRequest::Ping),
            (arb_chunk(), any::<u64>(), any::<u64>())
                .prop_map(|(chunk, offset, len)| PeerRequest::Read { chunk, offset, len }),
            (arb_chunk(), any::<u64>(), arb_bytes(), any::<u64>()).prop_map(
                |(chunk, offset, data, e)| PeerRequest::Write {
                    chunk,
                    offset,
                    data,
                    epoch: Epoch(e)
                }
            ),
            (arb_chunk(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(chunk, offset, len, e)| PeerRequest::Zero {
                    chunk,
                    offset,
                    len,
                    epoch: Epoch(e)
                }
            ),
            (any::<u64>(), any::<u64>()).prop_map(|(v, e)| PeerRequest::Flush {
                volume: VolumeId(v),
                epoch: Epoch(e)
            }),
            (arb_chunk(), any::<u64>()).prop_map(|(chunk, e)| PeerRequest::DeleteChunk {
                chunk,
                epoch: Epoch(e)
            }),
            any::<u64>().prop_map(|v| PeerRequest::ListChunks {
                volume: VolumeId(v)
            }),
            arb_chunk().prop_map(|chunk| PeerRequest::ScanChunk { chunk }),
        ]
    }

    fn arb_error() -> impl Strategy<Value = Error> {
        let s = ".{0,40}";
        prop_oneof![
            s.prop_map(Error::NotFound),
            s.prop_map(Error::AlreadyExists),
            s.prop_map(Error::NoSpace),
            s.prop_map(Error::InvalidArgument),
            s.prop_map(Error::Fenced),
            s.prop_map(Error::Locked),
            any::<i64>().prop_map(Error::LeaseNotFound),
            s.prop_map(Error::ReadOnly),
            s.prop_map(Error::Unavailable),
            s.prop_map(Error::Timeout),
            s.prop_map(Error::Corrupt),
            s.prop_map(Error::Unsupported),
            s.prop_map(Error::Closed),
            (s, s).prop_map(|(c, m)| Error::Io {
                context: c,
                source: Arc::new(std::io::Error::other(m)),
            }),
            s.prop_map(Error::Other),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Result<PeerResponse>> {
        prop_oneof![
            Just(Ok(PeerResponse::Pong)),
            Just(Ok(PeerResponse::Done)),
            arb_bytes().prop_map(|b| Ok(PeerResponse::Data(b))),
            proptest::collection::vec(any::<u64>(), 0..40)
                .prop_map(|v| Ok(PeerResponse::Chunks(v))),
            (
                proptest::collection::vec(any::<u32>(), 0..40),
                proptest::collection::vec(any::<u32>(), 0..8)
            )
                .prop_map(|(crcs, bad)| Ok(PeerResponse::Scan(
                    torus_traits::ChunkScan { crcs, bad }
                ))),
            arb_error().prop_map(Err),
        ]
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            any::<u64>(),
            prop_oneof![
                arb_request().prop_map(Message::Request),
                arb_response().prop_map(Message::Response),
            ],
        )
            .prop_map(|(id, message)| Frame { id, message })
    }

    fn arb_hello() -> impl Strategy<Value = Hello> {
        (
            any::<u8>(),
            any::<u32>(),
            proptest::option::of(".{0,30}"),
            proptest::option::of(any::<u128>()),
        )
            .prop_map(|(minor, max_frame, cluster, peer)| Hello {
                version: Version {
                    major: Version::CURRENT.major,
                    minor,
                },
                max_frame,
                cluster,
                peer: peer.map(|p| PeerId(uuid::Uuid::from_u128(p))),
            })
    }

    fn arb_handshake() -> impl Strategy<Value = Handshake> {
        prop_oneof![
            arb_hello().prop_map(Handshake::Hello),
            arb_hello().prop_map(Handshake::Accept),
            (any::<u16>(), ".{0,60}").prop_map(|(v, reason)| Handshake::Refuse {
                version: Version::from_u16(v),
                reason
            }),
        ]
    }

    proptest! {
        #[test]
        fn frames_roundtrip(frame in arb_frame()) {
            let enc = encode_frame(&frame, DEFAULT_MAX_FRAME).unwrap();
            let mut buf = BytesMut::from(&enc.to_vec()[..]);
            let back = FrameDecoder::new(DEFAULT_MAX_FRAME).decode(&mut buf).unwrap().unwrap();
            prop_assert!(buf.is_empty());
            prop_assert!(same_frame(&frame, &back), "{frame:?} came back as {back:?}");
        }

        #[test]
        fn errors_roundtrip(id in any::<u64>(), e in arb_error()) {
            let enc = encode_response(id, &Err(e.clone()), MIN_MAX_FRAME).unwrap();
            let back = decode_frame(Bytes::from(enc.to_vec()).slice(LEN_PREFIX..)).unwrap();
            match back.message {
                Message::Response(Err(b)) => prop_assert!(same_error(&e, &b), "{e:?} came back as {b:?}"),
                other => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn handshakes_roundtrip(h in arb_handshake()) {
            let enc = encode_handshake(&h).unwrap();
            let (back, used) = decode_handshake(&enc).unwrap().unwrap();
            prop_assert_eq!(used, enc.len());
            prop_assert_eq!(back, h);
        }

        #[test]
        fn any_prefix_of_a_frame_asks_for_more(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
            let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME).unwrap().to_vec();
            let cut = cut.index(bytes.len());
            prop_assert!(decode_all(&bytes[..cut], DEFAULT_MAX_FRAME).unwrap().is_none());
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), max in any::<u32>()) {
            let mut buf = BytesMut::from(&bytes[..]);
            let decoder = FrameDecoder::new(max);
            // Decode until the buffer is exhausted or an error stops it.
            while let Ok(Some(_)) = decoder.decode(&mut buf) {}
            let _ = decode_frame(Bytes::from(bytes.clone()));
            let _ = decode_handshake(&bytes);
        }

        #[test]
        fn frames_with_a_valid_prefix_and_random_body_never_panic(body in prop::collection::vec(any::<u8>(), 0..128)) {
            let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let _ = decode_all(&bytes, DEFAULT_MAX_FRAME);
        }

        #[test]
        fn handshakes_with_valid_magic_and_random_rest_never_panic(rest in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&rest);
            let _ = decode_handshake(&bytes);
        }
    }

    #[test]
    fn payload_is_a_slice_of_the_received_buffer() {
        let data = Bytes::from(vec![7u8; 10_000]);
        let enc = encode_request(
            5,
            &PeerRequest::Write {
                chunk: ChunkRef::new(VolumeId(1), 2),
                offset: 3,
                data: data.clone(),
                epoch: Epoch(4),
            },
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        // The encoder keeps the caller's payload instead of copying it.
        assert_eq!(enc.payload().as_ptr(), data.as_ptr());
        let mut buf = BytesMut::from(&enc.to_vec()[..]);
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let frame = FrameDecoder::new(DEFAULT_MAX_FRAME)
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        let Message::Request(PeerRequest::Write { data: got, .. }) = frame.message else {
            panic!("not a write: {frame:?}");
        };
        assert_eq!(got, data);
        let p = got.as_ptr() as usize;
        assert!(p >= start && p + got.len() <= end, "payload was copied");
    }

    #[test]
    fn oversize_is_refused_before_allocating() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xf0, 0, 0][..]);
        let cap = buf.capacity();
        let err = FrameDecoder::new(DEFAULT_MAX_FRAME)
            .decode(&mut buf)
            .unwrap_err();
        assert!(matches!(err, WireError::Oversize { .. }), "{err}");
        assert_eq!(
            buf.capacity(),
            cap,
            "no room may be reserved for an oversize frame"
        );
        // Encoding refuses too.
        let big = Bytes::from(vec![0u8; MIN_MAX_FRAME as usize]);
        let err = encode_response(1, &Ok(PeerResponse::Data(big)), MIN_MAX_FRAME).unwrap_err();
        assert!(matches!(err, WireError::Oversize { .. }), "{err}");
    }

    #[test]
    fn default_limit_fits_a_64_mib_write() {
        let head = encode_request(
            1,
            &PeerRequest::Write {
                chunk: ChunkRef::new(VolumeId(1), 1),
                offset: 0,
                data: Bytes::new(),
                epoch: Epoch(1),
            },
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        let header = head.wire_len() - LEN_PREFIX;
        assert!(header + DEFAULT_MAX_PAYLOAD <= DEFAULT_MAX_FRAME as usize);
    }

    #[test]
    fn typed_errors_for_bad_frames() {
        // Shorter than a header.
        let err = decode_all(&[0, 0, 0, 3, 1, 2, 3], 1024).unwrap_err();
        assert!(matches!(err, WireError::Truncated { .. }), "{err}");
        // Unknown kind.
        let mut f = vec![0, 0, 0, 9];
        f.extend_from_slice(&[0; 8]);
        f.push(0x7f);
        let err = decode_all(&f, 1024).unwrap_err();
        assert_eq!(err, WireError::UnknownKind(0x7f));
        // Ping with trailing bytes.
        let mut f = vec![0, 0, 0, 10];
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&[kind::PING, 1]);
        let err = decode_all(&f, 1024).unwrap_err();
        assert!(matches!(err, WireError::TrailingBytes { .. }), "{err}");
        // Read missing its length.
        let mut f = vec![0, 0, 0, 33];
        f.extend_from_slice(&[0; 8]);
        f.push(kind::READ);
        f.extend_from_slice(&[0; 24]);
        let err = decode_all(&f, 1024).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Truncated {
                    what: "read length",
                    ..
                }
            ),
            "{err}"
        );
        // Error message that is not UTF-8.
        let mut f = vec![0, 0, 0, 11];
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&[kind::ERROR, 1, 0xff]);
        let err = decode_all(&f, 1024).unwrap_err();
        assert!(matches!(err, WireError::InvalidUtf8(_)), "{err}");
    }

    #[test]
    fn typed_errors_for_bad_handshakes() {
        assert!(matches!(
            decode_handshake(b"GET / HTTP/1.1\r\n"),
            Err(WireError::BadMagic { .. })
        ));
        // Wrong magic is seen from the first differing byte.
        assert!(matches!(
            decode_handshake(b"TX"),
            Err(WireError::BadMagic { .. })
        ));
        assert_eq!(decode_handshake(b"TR").unwrap(), None);
        let hello = Hello {
            version: Version { major: 2, minor: 0 },
            max_frame: DEFAULT_MAX_FRAME,
            cluster: None,
            peer: None,
        };
        let enc = encode_handshake(&Handshake::Hello(hello)).unwrap();
        assert_eq!(
            decode_handshake(&enc).unwrap_err(),
            WireError::IncompatibleVersion {
                ours: Version::CURRENT,
                theirs: Version { major: 2, minor: 0 }
            }
        );
        // A refusal is readable whatever its version.
        let enc = encode_handshake(&Handshake::Refuse {
            version: Version { major: 9, minor: 9 },
            reason: "go away".into(),
        })
        .unwrap();
        let (h, _) = decode_handshake(&enc).unwrap().unwrap();
        assert!(matches!(h, Handshake::Refuse { reason, .. } if reason == "go away"));
        let mut enc = enc.to_vec();
        enc[6] = 42;
        assert_eq!(
            decode_handshake(&enc).unwrap_err(),
            WireError::UnknownHandshakeKind(42)
        );
    }

    #[test]
    fn long_error_messages_are_cut_to_fit() {
        let e = Error::Io {
            context: "é".repeat(MAX_ERROR_TEXT),
            source: Arc::new(std::io::Error::other("x".repeat(3 * MAX_ERROR_TEXT))),
        };
        let enc = encode_response(1, &Err(e), MIN_MAX_FRAME).unwrap();
        let frame = decode_frame(Bytes::from(enc.to_vec()).slice(LEN_PREFIX..)).unwrap();
        let Message::Response(Err(Error::Io { context, source })) = frame.message else {
            panic!("{frame:?}");
        };
        assert!(context.len() <= MAX_ERROR_TEXT);
        assert_eq!(source.to_string().len(), MAX_ERROR_TEXT);
    }
}
