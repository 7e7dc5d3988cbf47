//! The Torus engine and node.
//!
//! - [`config`]: the [`Config`](config::Config) and how it is loaded.
//! - [`compose`]: config → running node (the only place implementations are picked).
//! - [`node`]: a running node — lease, heartbeat, volume provider, garbage collection.
//! - [`catalog`], [`cluster`], [`peers`], [`keys`]: cluster state on top of `MetadataStore`.
//! - [`volume`]: byte ranges onto chunks; [`replica`]: a node's chunks with epoch fencing.
//! - [`control`], [`admin`]: what `torusctl` does, directly or over the admin endpoint.
//! - [`cli`]: output formatting shared by the binaries.

pub mod admin;
pub mod catalog;
pub mod certs;
pub mod cli;
pub mod cluster;
mod codec;
pub mod compose;
pub mod config;
pub mod control;
pub mod keys;
pub mod node;
pub mod peers;
pub mod placement;
pub mod rebalance;
pub mod replica;
pub mod replication;
pub mod scrub;
pub mod volume;
