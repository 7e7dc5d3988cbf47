//! NBD (Network Block Device) frontend.
//!
//! - [`proto`]: the wire format as pure encode/decode functions (no I/O),
//!   property-tested on its own.
//! - `server`: the tokio server, [`NbdFrontend`], configured by [`NbdOptions`].
//!
//! The export name is the volume name; the protocol followed is the
//! canonical NetworkBlockDevice `doc/proto.md` (fixed newstyle handshake,
//! simple replies only).

pub mod proto;
mod server;

pub use server::{NbdFrontend, NbdOptions};
