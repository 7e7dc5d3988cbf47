//! Frontends: how clients reach Torus volumes.
//!
//! - [`nbd`]: the NBD server ([`NbdFrontend`]) and its wire protocol.
//! - [`memory`]: [`MemoryVolumes`], an in-memory [`torus_traits::VolumeProvider`]
//!   for tests of frontends and of anything that consumes block devices.
//!
//! Frontends see volumes only as `BlockDevice`s handed out by a
//! `VolumeProvider` (see `torus_traits::device`).

pub mod memory;
pub mod nbd;

pub use memory::{MemoryDevice, MemoryVolumes, VolumeStats};
pub use nbd::{NbdFrontend, NbdOptions};
