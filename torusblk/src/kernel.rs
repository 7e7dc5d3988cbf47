//! Attaching a volume to a kernel NBD device (`/dev/nbdN`) with the classic
//! ioctl interface, as `nbd-client` does: the NBD handshake runs in user
//! space over a TCP connection to a local NBD server, then the connected
//! socket is handed to the kernel (`NBD_SET_SOCK`) and `NBD_DO_IT` serves the
//! device until it is disconnected.
//!
//! Device discovery reads sysfs under an injectable root, so "module not
//! loaded", "no free device" and "device busy" are tested without a kernel
//! module.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ioctl numbers: _IO(0xab, n) from <linux/nbd.h>.
const NBD_SET_SOCK: u64 = 0xab00;
const NBD_SET_BLKSIZE: u64 = 0xab01;
const NBD_DO_IT: u64 = 0xab03;
const NBD_CLEAR_SOCK: u64 = 0xab04;
const NBD_SET_SIZE_BLOCKS: u64 = 0xab07;
const NBD_DISCONNECT: u64 = 0xab08;
const NBD_SET_TIMEOUT: u64 = 0xab09;
const NBD_SET_FLAGS: u64 = 0xab0a;

/// Transmission flags (NBD protocol).
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;

const BLOCK_SIZE: u64 = 4096;

/// Where the kernel's view lives: `/sys` and `/dev`, replaceable in tests.
#[derive(Debug, Clone)]
pub struct Roots {
    pub sys: PathBuf,
    pub dev: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// The message when the `nbd` module is absent.
pub const MODULE_NOT_LOADED: &str = "the nbd kernel module is not loaded (no /sys/block/nbd*): run `modprobe nbd` on the host (in a container, on the node itself), or mount through nbdfuse";

fn nbd_index(name: &str) -> Option<u32> {
    name.strip_prefix("nbd")?.parse().ok()
}

/// The pid serving `nbdN`, when it is in use.
fn device_pid(roots: &Roots, name: &str) -> Option<String> {
    std::fs::read_to_string(roots.sys.join("block").join(name).join("pid"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Choose the device: `wanted` if given and free, else the first free
/// `/dev/nbdN` (lowest N) whose `/sys/block/nbdN/pid` is absent.
pub fn find_device(roots: &Roots, wanted: Option<&Path>) -> Result<PathBuf, String> {
    let block = roots.sys.join("block");
    let mut devices: Vec<u32> = std::fs::read_dir(&block)
        .map_err(|e| format!("cannot read {}: {e}", block.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| nbd_index(&e.file_name().to_string_lossy()))
        .collect();
    if devices.is_empty() {
        return Err(MODULE_NOT_LOADED.to_string());
    }
    devices.sort_unstable();
    if let Some(w) = wanted {
        let name = w
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(i) = nbd_index(&name) else {
            return Err(format!(
                "{} is not an NBD device (expected /dev/nbdN)",
                w.display()
            ));
        };
        if !devices.contains(&i) {
            return Err(format!(
                "{} does not exist: the nbd module has {} devices (load it with nbds_max=N for more)",
                w.display(),
                devices.len()
            ));
        }
        if let Some(pid) = device_pid(roots, &name) {
            return Err(format!(
                "{} is in use (served by pid {pid}): detach it with `torusblk nbd --detach {}` or pick another",
                w.display(),
                w.display()
            ));
        }
        return Ok(roots.dev.join(name));
    }
    for i in &devices {
        let name = format!("nbd{i}");
        if device_pid(roots, &name).is_none() {
            return Ok(roots.dev.join(name));
        }
    }
    Err(format!(
        "no free NBD device: all {} /dev/nbd* are in use (detach one with `torusblk nbd --detach /dev/nbdN`, or load the module with a larger nbds_max)",
        devices.len()
    ))
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
}

/// Fixed-newstyle handshake for `name` (`NBD_OPT_EXPORT_NAME`), leaving
/// `stream` at the start of the transmission phase.
pub fn handshake(stream: &mut (impl Read + Write), name: &str) -> Result<Export, String> {
    const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    const FLAG_FIXED_NEWSTYLE: u16 = 1;
    const FLAG_NO_ZEROES: u16 = 2;
    const OPT_EXPORT_NAME: u32 = 1;
    let io = |e: std::io::Error| format!("NBD handshake: {e}");
    let mut hello = [0u8; 18];
    stream.read_exact(&mut hello).map_err(io)?;
    if &hello[..8] != b"NBDMAGIC"
        || u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default()) != IHAVEOPT
    {
        return Err("NBD handshake: the server is not a newstyle NBD server".into());
    }
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("NBD handshake: the server does not speak fixed newstyle".into());
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 });
    let mut out = Vec::with_capacity(20 + name.len());
    out.extend_from_slice(&client_flags.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    stream.write_all(&out).map_err(io)?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).map_err(|e| {
        format!("NBD handshake: the server closed the connection on export {name:?} (unknown or locked volume? see the log): {e}")
    })?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        stream.read_exact(&mut zeroes).map_err(io)?;
    }
    let size = u64::from_be_bytes(reply[..8].try_into().unwrap_or_default());
    let flags = u16::from_be_bytes([reply[8], reply[9]]);
    Ok(Export { size, flags })
}

fn ioctl(fd: i32, request: u64, arg: u64, what: &str) -> Result<(), String> {
    // SAFETY: the NBD ioctls used here take an integer argument (not a
    // pointer), and `fd` is an open descriptor owned by the caller.
    let r = unsafe { libc::ioctl(fd, request as _, arg as libc::c_ulong) };
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A device attached to a volume; `NBD_DO_IT` runs in its own thread.
pub struct KernelAttachment {
    pub device: PathBuf,
    serving: Option<std::thread::JoinHandle<Result<(), String>>>,
}

/// Connects to the NBD server that will serve the device. A server on
/// this host gets the socket switched to `congestion`, the algorithm
/// torusd gives loopback clients by default: for writes the kernel is the
/// sender, and BBR's pacing only costs timer interrupts on loopback (see
/// the `congestion` module of `torus_frontends::nbd`). A host that does
/// not allow it keeps its own.
fn connect(server: SocketAddr, congestion: &str) -> Result<TcpStream, String> {
    let sock = TcpStream::connect(server)
        .map_err(|e| format!("cannot reach the local NBD server at {server}: {e}"))?;
    torus_frontends::nbd::use_loopback_congestion(&sock, congestion);
    Ok(sock)
}

/// Attach `volume` served at `server` to `device` (from [`find_device`]).
pub fn attach(
    roots: &Roots,
    device: &Path,
    server: SocketAddr,
    volume: &str,
    read_only: bool,
    trim: bool,
) -> Result<KernelAttachment, String> {
    let mut sock = connect(server, torus_frontends::nbd::DEFAULT_LOOPBACK_CONGESTION)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let export = handshake(&mut sock, volume)?;
    sock.set_read_timeout(None).map_err(|e| e.to_string())?;
    let _ = sock.set_nodelay(true);
    let mut flags = export.flags;
    if read_only {
        flags |= FLAG_READ_ONLY;
    }
    if !trim {
        flags &= !FLAG_SEND_TRIM;
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|e| format!("cannot open {}: {e}", device.display()))?;
    let fd = dev.as_raw_fd();
    let d = device.display();
    // The socket first: the kernel gives the device to the first task that
    // sets a socket and answers EBUSY to any other, so nothing below can
    // touch a device another attach is setting up or serving.
    ioctl(
        fd,
        NBD_SET_SOCK,
        sock.as_raw_fd() as u64,
        &format!("{d}: NBD_SET_SOCK"),
    )?;
    let setup = [
        (NBD_SET_BLKSIZE, BLOCK_SIZE, "NBD_SET_BLKSIZE"),
        (
            NBD_SET_SIZE_BLOCKS,
            export.size / BLOCK_SIZE,
            "NBD_SET_SIZE_BLOCKS",
        ),
        (NBD_SET_FLAGS, u64::from(flags), "NBD_SET_FLAGS"),
        (NBD_SET_TIMEOUT, 60, "NBD_SET_TIMEOUT"),
    ];
    for (request, arg, what) in setup {
        if let Err(e) = ioctl(fd, request, arg, &format!("{d}: {what}")) {
            // Give back the socket this call set.
            let _ = ioctl(fd, NBD_CLEAR_SOCK, 0, "NBD_CLEAR_SOCK");
            return Err(e);
        }
    }
    let name = format!("{d}");
    let serving = std::thread::spawn(move || {
        // Blocks until the device is disconnected; the socket and device
        // stay open for that long.
        let r = ioctl(dev.as_raw_fd(), NBD_DO_IT, 0, &format!("{name}: NBD_DO_IT"));
        let _ = ioctl(dev.as_raw_fd(), NBD_CLEAR_SOCK, 0, "NBD_CLEAR_SOCK");
        drop(sock);
        r
    });
    // The device is usable once the kernel records the serving pid.
    let dev_name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while device_pid(roots, &dev_name).is_none() {
        if serving.is_finished() {
            let r = serving
                .join()
                .unwrap_or_else(|_| Err("NBD_DO_IT panicked".into()));
            return Err(format!(
                "{d} stopped at once: {}",
                r.err().unwrap_or_default()
            ));
        }
        if Instant::now() > deadline {
            let _ = detach(device);
            return Err(format!("{d} did not come up within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(KernelAttachment {
        device: device.to_path_buf(),
        serving: Some(serving),
    })
}

impl KernelAttachment {
    /// Whether the device is still served (false once disconnected).
    pub fn is_attached(&self) -> bool {
        self.serving.as_ref().is_some_and(|s| !s.is_finished())
    }

    /// Disconnect and wait (bounded) for `NBD_DO_IT` to return.
    pub fn detach(mut self) -> Result<(), String> {
        // Already disconnected (`torusblk nbd --detach`): nothing to undo.
        let r = if self.is_attached() {
            detach(&self.device)
        } else {
            Ok(())
        };
        if let Some(s) = self.serving.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !s.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !s.is_finished() {
                return Err(format!(
                    "{} did not disconnect within 30 s",
                    self.device.display()
                ));
            }
            let _ = s.join();
        }
        r
    }
}

/// `NBD_DISCONNECT` then `NBD_CLEAR_SOCK` on `device` (`torusblk nbd --detach`).
pub fn detach(device: &Path) -> Result<(), String> {
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if nbd_index(&name).is_none() {
        return Err(format!(
            "{} is not an NBD device (expected /dev/nbdN)",
            device.display()
        ));
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("{} does not exist: {MODULE_NOT_LOADED}", device.display())
            }
            _ => format!("cannot open {}: {e}", device.display()),
        })?;
    let d = device.display();
    ioctl(
        dev.as_raw_fd(),
        NBD_DISCONNECT,
        0,
        &format!("{d}: NBD_DISCONNECT"),
    )?;
    ioctl(
        dev.as_raw_fd(),
        NBD_CLEAR_SOCK,
        0,
        &format!("{d}: NBD_CLEAR_SOCK"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn congestion_of(sock: &TcpStream) -> String {
        torus_frontends::nbd::congestion_of(sock).expect("getsockopt TCP_CONGESTION")
    }

    #[test]
    fn the_socket_to_a_local_server_gets_the_loopback_congestion_control() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let default = torus_frontends::nbd::DEFAULT_LOOPBACK_CONGESTION;
        let sock = connect(addr, default).unwrap();
        assert_eq!(congestion_of(&sock), default);
        // One the system does not default to, so the switch is seen
        // whatever the default is.
        let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .expect("read the system's congestion control");
        let other = if system.trim() == "reno" {
            "cubic"
        } else {
            "reno"
        };
        assert_eq!(congestion_of(&connect(addr, other).unwrap()), other);
        drop((sock, listener));
        let e = connect(addr, default).unwrap_err();
        assert!(e.contains("cannot reach the local NBD server"), "{e}");
    }

    fn roots(devices: &[(&str, Option<&str>)]) -> (tempfile::TempDir, Roots) {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        std::fs::create_dir_all(sys.join("block/sda")).unwrap();
        std::fs::create_dir_all(sys.join("block/loop0")).unwrap();
        for (name, pid) in devices {
            let d = sys.join("block").join(name);
            std::fs::create_dir_all(&d).unwrap();
            if let Some(p) = pid {
                std::fs::write(d.join("pid"), format!("{p}\n")).unwrap();
            }
        }
        let r = Roots {
            sys,
            dev: PathBuf::from("/dev"),
        };
        (dir, r)
    }

    #[test]
    fn no_nbd_devices_means_the_module_is_not_loaded() {
        let (_d, r) = roots(&[]);
        let e = find_device(&r, None).unwrap_err();
        assert!(
            e.contains("nbd kernel module is not loaded") && e.contains("modprobe nbd"),
            "{e}"
        );
        let e = find_device(&r, Some(Path::new("/dev/nbd0"))).unwrap_err();
        assert!(e.contains("modprobe nbd"), "{e}");
    }

    #[test]
    fn picks_the_lowest_free_device() {
        let (_d, r) = roots(&[
            ("nbd0", Some("12")),
            ("nbd1", None),
            ("nbd10", None),
            ("nbd2", Some("7")),
        ]);
        assert_eq!(find_device(&r, None).unwrap(), PathBuf::from("/dev/nbd1"));
        let (_d, r) = roots(&[("nbd10", None), ("nbd9", None)]);
        assert_eq!(find_device(&r, None).unwrap(), PathBuf::from("/dev/nbd9"));
    }

    #[test]
    fn all_busy_and_busy_device_errors_name_the_way_out() {
        let (_d, r) = roots(&[("nbd0", Some("12")), ("nbd1", Some("13"))]);
        let e = find_device(&r, None).unwrap_err();
        assert!(
            e.contains("no free NBD device") && e.contains("all 2"),
            "{e}"
        );
        let e = find_device(&r, Some(Path::new("/dev/nbd1"))).unwrap_err();
        assert!(
            e.contains("in use (served by pid 13)") && e.contains("--detach /dev/nbd1"),
            "{e}"
        );
        let e = find_device(&r, Some(Path::new("/dev/nbd7"))).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let e = find_device(&r, Some(Path::new("/dev/sda"))).unwrap_err();
        assert!(e.contains("not an NBD device"), "{e}");
        let (_d, r) = roots(&[("nbd0", Some("12")), ("nbd1", None)]);
        assert_eq!(
            find_device(&r, Some(Path::new("/dev/nbd1"))).unwrap(),
            PathBuf::from("/dev/nbd1")
        );
    }

    /// A scripted server side of the handshake, in memory.
    struct Script {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn handshake_sends_export_name_and_reads_size_and_flags() {
        let mut input = b"NBDMAGIC".to_vec();
        input.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
        input.extend_from_slice(&3u16.to_be_bytes());
        input.extend_from_slice(&(64u64 << 20).to_be_bytes());
        input.extend_from_slice(&0x2du16.to_be_bytes());
        let mut s = Script {
            input: std::io::Cursor::new(input),
            output: Vec::new(),
        };
        let e = handshake(&mut s, "pad").unwrap();
        assert_eq!(e.size, 64 << 20);
        assert_eq!(e.flags, 0x2d);
        assert_eq!(&s.output[..4], &3u32.to_be_bytes());
        assert_eq!(&s.output[4..12], b"IHAVEOPT");
        assert_eq!(&s.output[12..16], &1u32.to_be_bytes());
        assert_eq!(&s.output[16..20], &3u32.to_be_bytes());
        assert_eq!(&s.output[20..], b"pad");
        let mut bad = Script {
            input: std::io::Cursor::new(b"NBDMAGIC\0\0\0\0\0\0\0\0\0\0".to_vec()),
            output: Vec::new(),
        };
        assert!(handshake(&mut bad, "pad")
            .unwrap_err()
            .contains("not a newstyle"));
    }

    #[test]
    fn detach_refuses_what_is_not_an_nbd_device() {
        assert!(detach(Path::new("/dev/sda"))
            .unwrap_err()
            .contains("not an NBD device"));
    }

    /// The real attach boundary: where the kernel has no nbd module (as in
    /// CI) the ioctl path must say so; where `/dev/nbd0` exists, opening it
    /// and a disconnect ioctl on an idle device must work.
    #[test]
    fn kernel_boundary_is_clear_about_a_missing_module() {
        let r = Roots::default();
        if Path::new("/sys/block/nbd0").exists() {
            // An idle device accepts NBD_DISCONNECT/NBD_CLEAR_SOCK (or reports
            // it is not connected); either way the device opens.
            let _ = detach(Path::new("/dev/nbd0"));
            assert!(
                find_device(&r, None).is_ok()
                    || find_device(&r, None).unwrap_err().contains("no free")
            );
        } else {
            assert_eq!(find_device(&r, None).unwrap_err(), MODULE_NOT_LOADED);
            let e = detach(Path::new("/dev/nbd0")).unwrap_err();
            assert!(
                e.contains("modprobe nbd") || e.contains("cannot open"),
                "{e}"
            );
        }
    }
}
