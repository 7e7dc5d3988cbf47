//! The few Linux calls std does not expose: finding data and holes in a
//! sparse file (`lseek` `SEEK_DATA`/`SEEK_HOLE`), allocating and punching
//! blocks (`fallocate`), starting writeback early (`sync_file_range`),
//! reading only what the page cache holds (`preadv2` with `RWF_NOWAIT`),
//! dropping cached pages (`posix_fadvise`), not updating access times
//! (`fcntl` `O_NOATIME`), the descriptor limit
//! (`getrlimit`) and a range of a file mapped and locked in memory
//! ([`Pinned`], `mmap` + `mlock`). Each wrapper takes a borrowed `File`, so
//! the descriptor is valid for the duration of the call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Whether an error means "this file system cannot do that".
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

/// The first offset at or after `from` that holds data, or `None` when only
/// holes follow.
pub(crate) fn seek_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    seek(file, from, libc::SEEK_DATA)
}

/// The first hole at or after `from` (the end of the file counts as one).
pub(crate) fn seek_hole(file: &File, from: u64) -> io::Result<Option<u64>> {
    seek(file, from, libc::SEEK_HOLE)
}

fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from = off_t(from)?;
    // SAFETY: lseek on a descriptor kept open by the borrowed `file`; it
    // touches no memory of ours. Moving the file position is harmless: all
    // I/O in these stores is positional.
    let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    u64::try_from(r)
        .map(Some)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Deallocates `[offset, offset+len)`: it reads as zeros afterwards and whole
/// file-system blocks inside it are freed. The file size is unchanged.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Whether every page of `[offset, offset+len)` is in the page cache now
/// (`cachestat`, Linux 6.5). `false` when that cannot be asked: an older
/// kernel or a filter refusing the call (after the first such answer it is
/// not asked again), or any other error. A hint: pages can come and go
/// right after.
pub(crate) fn all_cached(file: &File, offset: u64, len: u64) -> bool {
    static UNSUPPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    /// The syscall's number, the same on every architecture.
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    if len == 0 || UNSUPPORTED.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: cachestat on a descriptor kept open by the borrowed `file`,
    // reading `range` and writing `stat`, both ours and of the layout the
    // kernel's `struct cachestat_range` and `struct cachestat` have.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0 as libc::c_uint,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) {
            UNSUPPORTED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        return false;
    }
    // Counted in pages: those the range touches, partly or whole.
    let page = page_size();
    let touched = offset.saturating_add(len - 1) / page - offset / page + 1;
    stat.nr_cache >= touched
}

/// The system's page size (4 KiB when it cannot be read).
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// Allocates `[offset, offset+len)` without changing the file size or data,
/// so that later stores through a mapping cannot fail for lack of space.
pub(crate) fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, libc::FALLOC_FL_KEEP_SIZE, offset, len)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (off_t(offset)?, off_t(len)?);
    loop {
        // SAFETY: fallocate on a descriptor kept open by the borrowed `file`;
        // it touches no memory of ours.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Starts writeback of all of `file`'s dirty pages without waiting, so that a
/// flush covering many files waits for their I/O together rather than one
/// file after another. Errors are ignored: the `fdatasync` that follows
/// reports them.
pub(crate) fn start_writeback(file: &File) {
    // SAFETY: sync_file_range on a descriptor kept open by the borrowed
    // `file`; it touches no memory of ours.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Stops reads through `file` from updating its access time (best effort:
/// only the file's owner or a privileged process may). Nobody reads a
/// chunk file's atime, and checking whether to update it cost 1.8 % of a
/// node's CPU on 4 KiB random reads.
pub(crate) fn no_atime(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor kept open by the borrowed `file`; it
    // touches no memory of ours.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            let _ = libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NOATIME);
        }
    }
}

/// Asks the kernel to drop `file`'s clean cached pages (best effort).
pub(crate) fn drop_cached_pages(file: &File) {
    // SAFETY: posix_fadvise on a descriptor kept open by the borrowed `file`;
    // it touches no memory of ours.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// The soft limit on open descriptors of this process, if known.
pub(crate) fn open_files_soft_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (r == 0).then_some(lim.rlim_cur)
}

/// Reads at `offset` only if that needs no disk I/O (`preadv2` with
/// `RWF_NOWAIT`): `Some(n)` bytes read (0 at the end of the file), or `None`
/// when the data is not all cached or the file system cannot tell.
pub(crate) fn pread_cached(file: &File, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which
    // is valid and exclusively borrowed for the call.
    unsafe { preadv2_nowait(file, buf.as_mut_ptr(), buf.len(), offset) }
}

/// [`pread_cached`] into memory not yet initialised; the `n` bytes read
/// are then initialised.
pub(crate) fn pread_cached_uninit(
    file: &File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    offset: u64,
) -> io::Result<Option<usize>> {
    // SAFETY: as in `pread_cached`; writing to uninitialised memory is fine.
    unsafe { preadv2_nowait(file, buf.as_mut_ptr().cast(), buf.len(), offset) }
}

/// `preadv2(RWF_NOWAIT)` of `len` bytes into `ptr`.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes, and not otherwise
/// accessed during the call.
unsafe fn preadv2_nowait(
    file: &File,
    ptr: *mut u8,
    len: usize,
    offset: u64,
) -> io::Result<Option<usize>> {
    let iov = libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    };
    let offset = off_t(offset)?;
    // SAFETY: one iovec describing memory the caller vouches for; the
    // descriptor is kept open by `file`.
    let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // Interrupted too: the caller then reads the usual way.
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::EINTR) => {
                Ok(None)
            }
            _ => Err(e),
        };
    }
    usize::try_from(r)
        .map(Some)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// `pread` into memory not yet initialised; returns the bytes read (0 at the
/// end of the file), which are then initialised.
pub(crate) fn pread_uninit(
    file: &File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    offset: u64,
) -> io::Result<usize> {
    let offset = off_t(offset)?;
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which
    // is valid and exclusively borrowed for the call; writing to
    // uninitialised memory is fine. The descriptor is kept open by `file`.
    let r = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// A range of a file mapped read-only and locked in memory (`mmap` with
/// `MAP_SHARED`, then `mlock`), readable as a byte slice until dropped.
///
/// This is how large reads avoid copying into a buffer while someone wants
/// file views (`torus_traits::pagecache::views_wanted`: the NBD server with
/// splicing on): the checksums are computed over the mapping and the
/// socket takes its pages by reference (a QUIC peer connection in the same
/// process keeps such a mapping until the peer acknowledges it, and reads
/// it again for a resend, so it stays locked that long). Locking is what makes reading the mapping
/// safe: `mlock` faults every page in first (an I/O error makes it fail, so
/// the caller falls back to `pread`, which reports it) and keeps the pages
/// resident, so no later access can fault on the disk and raise `SIGBUS`.
/// Only a range inside the file's size is ever mapped, and the stores never
/// truncate a chunk file, so no access lies past its end either. A concurrent
/// write into the range may be seen part-way, as with any read that overlaps
/// a write in flight.
///
/// While it lives, the mapping is registered as a file view
/// ([`torus_traits::pagecache`]), so the NBD server may splice its pages
/// into the socket instead of copying them.
pub(crate) struct Pinned {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
    view: Option<torus_traits::pagecache::FileView>,
}

// SAFETY: the mapping is plain read-only memory owned by this value; any
// thread may read it or unmap it.
unsafe impl Send for Pinned {}
// SAFETY: as above; `&Pinned` only gives out shared slices.
unsafe impl Sync for Pinned {}

impl Pinned {
    /// Maps and locks `[offset, offset+len)` of `file`. `None` when that
    /// cannot be done (the range is not page-aligned or not inside the
    /// file, `mmap` or `mlock` fails: not supported, over the locked-memory
    /// limit, or an I/O error); the caller then reads with `pread`.
    pub(crate) fn map(file: &File, offset: u64, len: usize) -> Option<Pinned> {
        let page = page_size();
        let end = offset.checked_add(len as u64)?;
        if len == 0 || !offset.is_multiple_of(page) || end > file.metadata().ok()?.len() {
            return None;
        }
        let at = off_t(offset).ok()?;
        // SAFETY: a new read-only shared mapping of a descriptor kept open
        // by `file` for the call (the mapping outlives it, as mappings do);
        // the kernel chooses the address, so no memory of ours is replaced.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                at,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let mut pinned = Pinned {
            ptr: std::ptr::NonNull::new(ptr)?,
            len,
            view: None,
        };
        // SAFETY: locks the pages of the mapping just made, `len` bytes long.
        if unsafe { libc::mlock(ptr, len) } != 0 {
            return None; // unmapped by the drop
        }
        pinned.view = Some(torus_traits::pagecache::register_file_view(
            ptr.cast::<u8>(),
            len,
        ));
        Some(pinned)
    }
}

impl AsRef<[u8]> for Pinned {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped readable at `ptr` and locked, so every
        // page is resident; they stay mapped until `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Unregistered first: the address range may be reused once unmapped.
        self.view = None;
        // SAFETY: unmaps (and so unlocks) exactly the mapping made in `map`;
        // no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}
