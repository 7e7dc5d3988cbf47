//! MetadataStore implementations.
