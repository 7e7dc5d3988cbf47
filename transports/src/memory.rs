//! In-process transport: peers of one process reach each other through a
//! shared [`MemoryNetwork`], for fast, deterministic cluster tests.
//!
//! Each call runs the handler in its own task, so many requests are in flight
//! at once and replies complete in any order, as over a real network. A
//! listener that is dropped (or a peer that was never started) answers
//! `Unavailable`, like a dead host.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use torus_traits::{
    Error, PeerHandler, PeerListener, PeerRequest, PeerResponse, PeerTransport, Result,
};

type Registry = Mutex<HashMap<String, Weak<dyn PeerHandler>>>;

/// The shared "network": listening addresses and their handlers.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    peers: Arc<Registry>,
}

impl MemoryNetwork {
    pub fn new() -> Self {
        MemoryNetwork::default()
    }

    /// A transport attached to this network.
    pub fn transport(&self) -> MemoryTransport {
        MemoryTransport { net: self.clone() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<dyn PeerHandler>>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A [`PeerTransport`] over a [`MemoryNetwork`].
#[derive(Clone)]
pub struct MemoryTransport {
    net: MemoryNetwork,
}

struct MemoryListener {
    addr: String,
    net: MemoryNetwork,
    // Keeps the handler alive; the registry holds only a weak reference.
    _handler: Arc<dyn PeerHandler>,
}

impl PeerListener for MemoryListener {
    fn local_addr(&self) -> String {
        self.addr.clone()
    }
}

impl Drop for MemoryListener {
    fn drop(&mut self) {
        self.net.lock().remove(&self.addr);
    }
}

#[async_trait]
impl PeerTransport for MemoryTransport {
    async fn listen(
        &self,
        addr: &str,
        handler: Arc<dyn PeerHandler>,
    ) -> Result<Box<dyn PeerListener>> {
        let mut peers = self.net.lock();
        if peers.get(addr).and_then(Weak::upgrade).is_some() {
            return Err(Error::AlreadyExists(format!("address {addr} is in use")));
        }
        peers.insert(addr.to_string(), Arc::downgrade(&handler));
        Ok(Box::new(MemoryListener {
            addr: addr.to_string(),
            net: self.net.clone(),
            _handler: handler,
        }))
    }

    async fn call(&self, addr: &str, request: PeerRequest) -> Result<PeerResponse> {
        let handler = self
            .net
            .lock()
            .get(addr)
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::Unavailable(format!("no peer listening at {addr}")))?;
        tokio::spawn(async move { handler.handle(request).await })
            .await
            .map_err(|e| Error::Unavailable(format!("peer {addr} failed while handling: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use torus_traits::conformance::transport;

    #[tokio::test]
    async fn passes_the_transport_conformance_suite() {
        let net = MemoryNetwork::new();
        let a = net.transport();
        transport::all(&a, &|i| format!("mem-{i}")).await;
    }
}
