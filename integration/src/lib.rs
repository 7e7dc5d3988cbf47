//! Harness for multi-process tests.
