//! The Torus engine.
