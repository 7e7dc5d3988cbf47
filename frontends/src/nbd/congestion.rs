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
//! The option is per socket (`TCP_CONGESTION`). A process without
//! `CAP_NET_ADMIN` may pick only what `net.ipv4.tcp_allowed_congestion_control`
//! lists (the default algorithm and those added there; most distributions
//! list cubic and reno). The server tries the name once when it binds and,
//! if this host cannot use it, says so and leaves every socket alone.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

/// Longest algorithm name the kernel takes (`TCP_CA_NAME_MAX` less the NUL).
const NAME_MAX: usize = 15;

/// Checks that `name` looks like a TCP congestion control algorithm's
/// name (whether this host has it is only known when it is tried); the
/// error is the reason, for the caller to put in context.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a TCP congestion control name \
             (1 to {NAME_MAX} letters, digits, '_' or '-', such as \"cubic\")"
        ))
    }
}

/// Whether this host lets us use `name`: tried on a socket of our own of
/// the listening address's family.
pub(crate) fn usable(name: &str, listen: SocketAddr) -> io::Result<()> {
    let domain = socket2::Domain::for_address(listen);
    let probe = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    probe.set_tcp_congestion(name.as_bytes())
}

/// The algorithm loopback connections get unless configured otherwise.
pub const DEFAULT: &str = "cubic";

/// The algorithm a TCP socket uses now.
pub fn current(stream: &impl AsFd) -> io::Result<String> {
    let name = socket2::SockRef::from(stream).tcp_congestion()?;
    Ok(String::from_utf8_lossy(&name)
        .trim_end_matches('\0')
        .to_string())
}

/// Whether a connected socket's two ends are on this host: a loopback
/// peer, or a peer with the socket's own address (a client that dialled
/// one of the host's addresses, which the kernel routes over loopback).
fn is_local(sock: &socket2::SockRef<'_>) -> bool {
    let addr = |a: io::Result<socket2::SockAddr>| a.ok().and_then(|a| a.as_socket());
    match (addr(sock.peer_addr()), addr(sock.local_addr())) {
        (Some(peer), Some(local)) => same_host(peer.ip(), local.ip()),
        _ => false,
    }
}

fn same_host(peer: IpAddr, local: IpAddr) -> bool {
    let peer = peer.to_canonical();
    peer.is_loopback() || peer == local.to_canonical()
}

/// Switches the connected TCP socket `stream` to `name` when both its ends
/// are on this host. Used on both ends that torus owns: the server's
/// accepted sockets and the socket `torusblk` hands to the kernel's NBD
/// client.
pub fn apply(stream: &impl AsFd, name: &str) {
    let sock = socket2::SockRef::from(stream);
    if !is_local(&sock) {
        return;
    }
    if let Err(e) = sock.set_tcp_congestion(name.as_bytes()) {
        // Checked at bind, so only a changed sysctl gets here; the
        // connection works as well with the system's algorithm.
        tracing::debug!("TCP congestion control {name}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    fn algorithm(stream: &TcpStream) -> String {
        current(stream).expect("getsockopt TCP_CONGESTION")
    }

    #[tokio::test]
    async fn loopback_connections_get_the_algorithm() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = client.expect("connect");
        let (server, _) = accepted.expect("accept");
        // Ask for one the socket does not have yet, to see a change.
        let before = algorithm(&server);
        let want = if before == "reno" { "cubic" } else { "reno" };
        usable(want, addr).expect("reno is always allowed; cubic is the default if reno is");
        apply(&server, want);
        assert_eq!(algorithm(&server), want);
        apply(&client, want);
        assert_eq!(algorithm(&client), want);
    }

    #[test]
    fn only_peers_on_this_host_count_as_local() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        assert!(same_host(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(same_host(ip("127.0.0.2"), ip("127.0.0.1")));
        assert!(same_host(ip("::1"), ip("::1")));
        assert!(same_host(ip("::ffff:127.0.0.1"), ip("::ffff:127.0.0.1")));
        // The host's own address, dialled from the host.
        assert!(same_host(ip("10.0.0.5"), ip("10.0.0.5")));
        assert!(same_host(ip("::ffff:10.0.0.5"), ip("10.0.0.5")));
        // Another host.
        assert!(!same_host(ip("192.0.2.7"), ip("10.0.0.5")));
        assert!(!same_host(ip("2001:db8::7"), ip("2001:db8::5")));
    }

    #[test]
    fn names_are_checked_and_unknown_algorithms_are_not_usable() {
        for good in ["cubic", "reno", "bbr", "dctcp", "h-tcp_2"] {
            check_name(good).expect(good);
        }
        for bad in ["", "cubic\0", "no such", "a-name-far-too-long", "cubïc"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let e = usable("nosuchcc", listen).expect_err("no kernel has it");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }
}
