//! NBD (Network Block Device) frontend.
//!
//! - [`proto`]: the wire format as pure encode/decode functions (no I/O),
//!   property-tested on its own.
//! - `server`: the tokio server, [`NbdFrontend`], configured by [`NbdOptions`].
//! - `replies`: the reply stream, batched, with large payloads sent in the
//!   same `writev` as their header.
//! - `splice`: large `READ` payloads that are file pages, sent by reference.
//! - `shards`: the per-core threads connections run on.
//!
//! The export name is the volume name; the protocol followed is the
//! canonical NetworkBlockDevice `doc/proto.md` (fixed newstyle handshake,
//! simple replies only).

mod congestion;
pub mod proto;
mod replies;
mod server;
mod shards;
mod splice;

pub use congestion::{
    apply as use_loopback_congestion, check_name as check_congestion_name,
    current as congestion_of, DEFAULT as DEFAULT_LOOPBACK_CONGESTION,
};
pub use server::{
    busy_poll_hits, busy_polling_now, check_busy_poll, NbdFrontend, NbdOptions, DEFAULT_BUSY_POLL,
    MAX_BUSY_POLL,
};
pub use shards::connections_per_thread;
