//! The threads NBD connections run on: one single-threaded runtime per
//! core, shared by every [`NbdFrontend`](super::NbdFrontend) of the
//! process, each connection placed whole on the one serving the fewest.
//!
//! Why not the node's multi-threaded runtime: there a connection's tasks
//! (the reader, its requests, the reply writer) are stolen back and forth
//! between worker threads, so one busy client keeps every core of the node
//! awake. A storage node shares its cores with the clients it serves (the
//! kernel's NBD client, the application, here fio), and a client that
//! loses its core to our second worker sends its next request late. With
//! a thread per core and each connection kept whole on one of them, one
//! connection leaves the other cores to its client, and several spread
//! out. Interleaved runs on a 2-core VM, against the shared runtime:
//! 1 MiB writes at QD8 4.0–5.1 GB/s against 3.5–4.4 (nbdkit 3.9–5.0 in
//! the same rounds), 1 MiB reads 4.2–4.4 against 3.4, 4 KiB random
//! writes at QD32 +13–16 %, QD1 writes 47–54 µs against 53–61, and four
//! connections 107–114k against 105–109k IOPS. (The whole node on one
//! worker did as well for one connection, but cost four connections 15 %:
//! they need both cores.)
//!
//! The price: one connection's requests share one core, where on the
//! shared runtime a single busy connection could spread them over
//! several (`NbdOptions::connection_threads` turns this off).
//!
//! The server moves a connection's socket to its shard's own reactor, so
//! its readiness wakes that thread directly. What outlives a connection
//! stays off these threads: the server opens volumes on the node's runtime
//! (a volume's background work, its heal loop and the peer connections it
//! dials, start there). Tasks a request spawns run on its shard, and the
//! TCP peer transport gives each shard peer connections of its own, made
//! on it, so a replicated write does not cross threads (`torus_transports`'
//! `TcpTransport::connection`).
//!
//! A call that blocks its thread (a write the kernel throttles, say)
//! holds up every connection on that shard until it returns, where on the
//! shared runtime another worker would take their tasks over; the stores
//! bound that (large writes that were slow go to the blocking pool for a
//! while, see `torus_backends`).
//!
//! The threads are made on first use and live as long as the process, so
//! that a task spawned from a connection (a volume's close, say) is not
//! dropped half done with the frontend that started it; at exit they end
//! with the process, as the node's runtime's tasks do.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;
use tracing::warn;

/// One thread and its runtime, and how many connections it serves now.
struct Shard {
    handle: Handle,
    connections: AtomicUsize,
}

/// Where a connection runs, held by the connection for its whole life: it
/// counts towards its shard's load until dropped.
pub(crate) struct Placed {
    pub(crate) handle: Handle,
    connections: &'static AtomicUsize,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The process's shards; `None` if not even one thread could be started
/// (then connections run on the caller's runtime, see `place`).
fn shards() -> Option<&'static [Shard]> {
    static SHARDS: OnceLock<Vec<Shard>> = OnceLock::new();
    let shards = SHARDS.get_or_init(|| {
        let wanted = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut shards = Vec::with_capacity(wanted);
        for i in 0..wanted {
            match start(i) {
                Ok(handle) => shards.push(Shard {
                    handle,
                    connections: AtomicUsize::new(0),
                }),
                Err(e) => {
                    warn!("NBD: cannot start connection thread {i}: {e}");
                    break;
                }
            }
        }
        shards
    });
    (!shards.is_empty()).then_some(shards.as_slice())
}

/// Starts shard thread `i`; its runtime runs until the process ends. The
/// runtime is built on the new thread itself: one that failed to start
/// must not leave a runtime to be dropped here, inside the caller's.
fn start(i: usize) -> std::io::Result<Handle> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("nbd-conn-{i}"))
        .spawn(move || {
            let built = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("nbd-conn-{i}-blk"))
                .build();
            match built {
                Ok(runtime) => {
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(std::future::pending::<()>())
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the thread ended before its runtime started"))?
}

/// The shard serving the fewest connections, now counting one more; `None`
/// when there are no shards (run the connection where you are).
pub(crate) fn place() -> Option<Placed> {
    let shard = shards()?
        .iter()
        .min_by_key(|s| s.connections.load(Ordering::Relaxed))?;
    shard.connections.fetch_add(1, Ordering::Relaxed);
    Some(Placed {
        handle: shard.handle.clone(),
        connections: &shard.connections,
    })
}

/// How many connections each shard serves now (for tests).
pub fn connections_per_thread() -> Vec<usize> {
    shards().map_or_else(Vec::new, |s| {
        s.iter()
            .map(|s| s.connections.load(Ordering::Relaxed))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_busy_thread_and_leave_when_done() {
        let before = connections_per_thread();
        assert!(!before.is_empty(), "no connection threads started");
        let threads = before.len();
        let placed: Vec<Placed> = (0..threads * 2).filter_map(|_| place()).collect();
        assert_eq!(placed.len(), threads * 2);
        let now = connections_per_thread();
        // Other tests of this binary may hold connections too; what this
        // test added is spread evenly.
        let added: Vec<usize> = now.iter().zip(&before).map(|(n, b)| n - b).collect();
        let (min, max) = (added.iter().min(), added.iter().max());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 2),
            "{added:?}"
        );
        drop(placed);
        let after = connections_per_thread();
        assert_eq!(after.iter().sum::<usize>(), before.iter().sum::<usize>());
    }
}
