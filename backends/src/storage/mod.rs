//! BlockStore implementations.
