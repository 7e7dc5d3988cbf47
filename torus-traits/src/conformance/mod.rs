//! Conformance suites: one module per trait, each a set of plain async
//! functions taking the implementation as `&dyn Trait`. Every implementation's
//! tests call every function of its trait's suite (see `all` in each module).
//! The functions panic with a message saying what broke, like assertions.

pub mod block_device;
pub mod block_store;
pub mod frontend;
pub mod metadata;
pub mod transport;
