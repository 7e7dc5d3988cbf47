//! PeerTransport implementations.
