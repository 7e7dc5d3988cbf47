//! The TCP congestion control of connections from clients on this host
//! (`NbdOptions::loopback_congestion`, "cubic" by default).
//!
//! Why: BBR, the system default on many hosts, paces every send. Without
//! the `fq` queueing discipline (and loopback has no queue at all) TCP
//! paces by itself, with a high-resolution timer per burst: a 1 MiB reply
//! leaves in timer-driven pieces, each a timer interrupt, a softirq and
//! often a wake-up of the other core. On a link whose round trip is a few
//! microseconds there is nothing for pacing to protect. Measured on a
//! 2-core VM, 1 MiB reads at queue depth 1: 5-6 timer interrupts and
//! 11 context switches per read with BBR, 0.2 and 5.7 with cubic; at queue
//! depth 8, 2.4-2.6 GB/s with BBR and 3.5-3.6 GB/s with cubic, and 0.43
//! against 0.31 s of server CPU per GB.
//!
//! Loopback clients are the common case in production too: `torusblk`
//! attaches the kernel's NBD client to the torusd on the same host (and
//! switches that socket too, since for writes the kernel is the sender).
//! Connections from other hosts keep the system's choice, which is the
//! administrator's to make for the real network.
//!
//! The option is per socket (`TCP_CONGESTION`) and an unprivileged process
//! may pick any algorithm in `net.ipv4.tcp_allowed_congestion_control`
//! (cubic and reno, on every stock kernel). The server checks the name
//! once when it binds and, if this host cannot use it, says so and leaves
//! every socket alone.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use torus_traits::{Error, Result};

/// Longest algorithm name the kernel takes (`TCP_CA_NAME_MAX` less the NUL).
const NAME_MAX: usize = 15;

/// Checks that `name` looks like a TCP congestion control algorithm's
/// name (whether this host has it is only known when the server binds).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "loopback_congestion {name:?} is not a TCP congestion control name \
             (1 to {NAME_MAX} letters, digits, '_' or '-', such as \"cubic\")"
        )))
    }
}

/// Whether this host lets us use `name`: tried on a socket of our own.
pub(crate) fn usable(name: &str) -> io::Result<()> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    probe.set_tcp_congestion(name.as_bytes())
}

/// The algorithm loopback connections get unless configured otherwise.
pub const DEFAULT: &str = "cubic";

/// Switches the TCP socket `stream` to `name` when its peer is on this
/// host. Used on both ends that torus owns: the server's accepted sockets
/// and the socket `torusblk` hands to the kernel's NBD client.
pub fn apply(stream: &impl AsFd, peer: SocketAddr, name: &str) {
    if !peer.ip().to_canonical().is_loopback() {
        return;
    }
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_congestion(name.as_bytes()) {
        // Checked at bind, so only a changed sysctl gets here; the
        // connection works as well with the system's algorithm.
        tracing::debug!(%peer, "TCP congestion control {name}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    fn algorithm(stream: &TcpStream) -> String {
        let name = socket2::SockRef::from(stream)
            .tcp_congestion()
            .expect("getsockopt TCP_CONGESTION");
        String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_string()
    }

    #[tokio::test]
    async fn loopback_connections_get_the_algorithm_others_keep_theirs() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let _client = client.expect("connect");
        let (server, peer) = accepted.expect("accept");
        // Whatever the system default is, reno differs from it or equals
        // it; ask for the one that is not the default to see a change.
        let before = algorithm(&server);
        let want = if before == "reno" { "cubic" } else { "reno" };
        usable(want).expect("reno and cubic are allowed on every stock kernel");

        // A peer on another host: left alone.
        let remote: SocketAddr = "192.0.2.7:40000".parse().expect("addr");
        apply(&server, remote, want);
        assert_eq!(algorithm(&server), before);

        apply(&server, peer, want);
        assert_eq!(algorithm(&server), want);
        // IPv4-mapped loopback counts as loopback.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().expect("addr");
        apply(&server, mapped, &before);
        assert_eq!(algorithm(&server), before);
    }

    #[test]
    fn names_are_checked_and_unknown_algorithms_are_not_usable() {
        for good in ["cubic", "reno", "bbr", "dctcp", "h-tcp_2"] {
            check_name(good).expect(good);
        }
        for bad in ["", "cubic\0", "no such", "a-name-far-too-long", "cubïc"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        let e = usable("nosuchcc").expect_err("no kernel has it");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
}
