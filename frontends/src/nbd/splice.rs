//! Sending file pages to the client by reference: a `READ` payload that is a
//! view of a chunk file's pages ([`torus_traits::pagecache`]) goes through a
//! pipe with `vmsplice` and `splice`, so the socket takes the page-cache
//! pages themselves and the server never copies them. On 1 MiB reads that
//! copy was about a third of the server's CPU (the client still copies them
//! once, out of its socket, as it does from any server).
//!
//! Used only with `NbdOptions::splice_reads`: the client's copy then reads
//! page-cache pages in 4 KiB fragments instead of the socket buffers the
//! server just wrote, and on some machines that costs the client more than
//! the server saves (1 MiB reads at half the throughput on one, +35 % on
//! another).
//!
//! Safe because only file pages are spliced: the socket keeps references to
//! them until the client has read them, after the mapping is gone, and a
//! file page only ever holds the file's data (see the registry's docs).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// A pipe kept for one connection's replies, empty between payloads.
pub(crate) struct Splicer {
    rd: OwnedFd,
    wr: OwnedFd,
}

/// Pipe size asked for: a 1 MiB payload in one pass (the default is 64 KiB,
/// which still works, in more passes).
const PIPE_SIZE: libc::c_int = 1 << 20;

impl Splicer {
    pub(crate) fn new() -> io::Result<Splicer> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by no one
        // else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Best effort: a smaller pipe only means more passes.
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Splicer { rd, wr })
    }

    /// Sends all of `data`, which must be a registered file view, to `sock`.
    /// `Ok(false)` when this kernel or socket cannot splice and nothing was
    /// sent: the caller writes `data` the usual way.
    pub(crate) async fn send(&self, sock: &TcpStream, data: &[u8]) -> io::Result<bool> {
        let (mut queued, mut sent) = (0usize, 0usize);
        while sent < data.len() {
            if queued < data.len() {
                match self.vmsplice(&data[queued..]) {
                    Ok(n) => queued += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if sent == 0 && queued == 0 && unsupported(&e) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            if queued == sent {
                // The pipe was empty and still took nothing: never loop on it.
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "vmsplice moved no data",
                ));
            }
            let n = loop {
                sock.writable().await?;
                match sock.try_io(Interest::WRITABLE, || self.splice_to(sock, queued - sent)) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if sent == 0 && unsupported(&e) => {
                        // Nothing reached the socket; empty the pipe so the
                        // caller can write the payload itself.
                        self.discard(queued)?;
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            sent += n;
        }
        Ok(true)
    }

    /// Puts references to the pages of `data` into the pipe; how many bytes
    /// it took (at most what the pipe has room for).
    fn vmsplice(&self, data: &[u8]) -> io::Result<usize> {
        let iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        };
        // SAFETY: one iovec describing memory borrowed for the call. The
        // kernel only reads it (takes references to its pages); it does not
        // write through the pointer despite the type.
        let r = unsafe { libc::vmsplice(self.wr.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    /// Moves up to `len` bytes from the pipe into the socket.
    fn splice_to(&self, sock: &TcpStream, len: usize) -> io::Result<usize> {
        // SAFETY: splice between two descriptors kept open by `self` and
        // `sock`, with no offsets (both are streams); no memory is passed.
        let r = unsafe {
            libc::splice(
                self.rd.as_raw_fd(),
                std::ptr::null_mut(),
                sock.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    /// Reads `len` bytes out of the pipe and drops them.
    fn discard(&self, mut len: usize) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        while len > 0 {
            let want = len.min(buf.len());
            // SAFETY: reads at most `want` bytes into a buffer we own.
            let r = unsafe { libc::read(self.rd.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
            match usize::try_from(r) {
                Ok(0) => break,
                Ok(n) => len -= n,
                Err(_) => return Err(io::Error::last_os_error()),
            }
        }
        Ok(())
    }
}

/// Errors that mean "splicing is not possible here", not "the socket broke".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A payload larger than the pipe arrives whole and in order, through
    /// several passes, while the reader is slower than the writer.
    #[tokio::test]
    async fn a_payload_larger_than_the_pipe_arrives_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 7000];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break got;
                }
                got.extend_from_slice(&buf[..n]);
                tokio::task::yield_now().await;
            }
        });
        let (sock, _) = listener.accept().await.unwrap();
        let data: Vec<u8> = (0..3 * (1usize << 20) + 123)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let splicer = Splicer::new().unwrap();
        assert!(splicer.send(&sock, &data[5..]).await.unwrap());
        assert!(splicer.send(&sock, &data[..5]).await.unwrap());
        drop(sock);
        let got = client.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got[..data.len() - 5] == data[5..], "first payload differs");
        assert!(got[data.len() - 5..] == data[..5], "second payload differs");
    }
}
