//! In-memory volumes for tests: [`MemoryVolumes`] is a [`VolumeProvider`]
//! whose devices keep their bytes in RAM.
//!
//! It implements the [`BlockDevice`] contract exactly (the conformance suite
//! `torus_traits::conformance::block_device` runs on it) and adds knobs a
//! test needs to drive a frontend into its corners: a volume can be made
//! read-only, locked "by another node", made to fail every operation with a
//! chosen error, or slowed down; counters show flushes, FUA operations,
//! allocated bytes and live handles (so a test can check that a frontend
//! drops its handles).
//!
//! Storage is sparse: 4 KiB pages allocated on first write, freed by
//! `trim` and by `write_zeroes` with `may_trim`, so large volumes cost
//! nothing until written.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use torus_traits::{BlockDevice, Error, ExportInfo, Result, VolumeProvider};

/// Allocation granule of the in-memory store.
const PAGE: u64 = 4096;

/// Named in-memory volumes (see the module docs).
#[derive(Default)]
pub struct MemoryVolumes {
    volumes: Mutex<BTreeMap<String, Arc<Volume>>>,
}

/// What a test can observe about one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Device handles currently alive (opened and not yet dropped).
    pub handles: usize,
    /// Calls to `flush` that succeeded.
    pub flushes: u64,
    /// Writes, zeroes and trims made with `fua` that succeeded.
    pub fua_ops: u64,
    /// Bytes of allocated pages.
    pub allocated: u64,
}

struct Volume {
    name: String,
    size: u64,
    settings: Mutex<Settings>,
    /// Page index → page contents; an absent page reads as zeros.
    pages: RwLock<HashMap<u64, Box<[u8]>>>,
    handles: AtomicUsize,
    flushes: AtomicU64,
    fua_ops: AtomicU64,
}

#[derive(Default, Clone)]
struct Settings {
    description: String,
    read_only: bool,
    locked_by: Option<String>,
    fail_with: Option<Error>,
    /// Every request panics (tests of the callers' panic handling).
    panic: bool,
    latency: Option<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another test thread must not cascade into every later call.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryVolumes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Create a zero-filled volume of `size` bytes.
    pub fn create(&self, name: &str, size: u64) -> Result<()> {
        let mut volumes = lock(&self.volumes);
        if volumes.contains_key(name) {
            return Err(Error::AlreadyExists(format!("volume {name}")));
        }
        volumes.insert(
            name.to_owned(),
            Arc::new(Volume {
                name: name.to_owned(),
                size,
                settings: Mutex::new(Settings::default()),
                pages: RwLock::new(HashMap::new()),
                handles: AtomicUsize::new(0),
                flushes: AtomicU64::new(0),
                fua_ops: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    /// Remove a volume from the catalog (open handles keep working).
    pub fn remove(&self, name: &str) -> Result<()> {
        lock(&self.volumes)
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::NotFound(format!("volume {name}")))
    }

    /// The description listed for the volume.
    pub fn set_description(&self, name: &str, description: &str) -> Result<()> {
        self.update(name, |s| s.description = description.to_owned())
    }

    /// A read-only volume refuses writable opens with `ReadOnly`; read-only
    /// opens work. Handles already open keep their mode.
    pub fn set_read_only(&self, name: &str, read_only: bool) -> Result<()> {
        self.update(name, |s| s.read_only = read_only)
    }

    /// Pretend another node holds the writer lock: writable opens fail with
    /// `Locked("held by node <holder>")`. `None` releases it.
    pub fn set_locked_by(&self, name: &str, holder: Option<&str>) -> Result<()> {
        self.update(name, |s| s.locked_by = holder.map(str::to_owned))
    }

    /// Make every I/O of every handle (read, write, zero, trim, flush) fail
    /// with `error` until cleared with `None`.
    pub fn set_fail_with(&self, name: &str, error: Option<Error>) -> Result<()> {
        self.update(name, |s| s.fail_with = error)
    }

    /// Make every I/O of every handle panic (until set back to `false`).
    pub fn set_panic(&self, name: &str, panic: bool) -> Result<()> {
        self.update(name, |s| s.panic = panic)
    }

    /// Delay every I/O by `latency` (to keep requests in flight).
    pub fn set_latency(&self, name: &str, latency: Option<Duration>) -> Result<()> {
        self.update(name, |s| s.latency = latency)
    }

    /// Counters of one volume.
    pub fn stats(&self, name: &str) -> Result<VolumeStats> {
        let v = self.volume(name)?;
        let allocated = v.read_pages().len() as u64 * PAGE;
        Ok(VolumeStats {
            handles: v.handles.load(Ordering::SeqCst),
            flushes: v.flushes.load(Ordering::SeqCst),
            fua_ops: v.fua_ops.load(Ordering::SeqCst),
            allocated,
        })
    }

    fn volume(&self, name: &str) -> Result<Arc<Volume>> {
        lock(&self.volumes)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("volume {name}")))
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Settings)) -> Result<()> {
        let v = self.volume(name)?;
        f(&mut lock(&v.settings));
        Ok(())
    }
}

impl Volume {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            size: self.size,
            description: lock(&self.settings).description.clone(),
        }
    }

    fn read_pages(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Box<[u8]>>> {
        self.pages.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_pages(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Box<[u8]>>> {
        self.pages.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl VolumeProvider for MemoryVolumes {
    async fn list(&self) -> Result<Vec<ExportInfo>> {
        let volumes: Vec<Arc<Volume>> = lock(&self.volumes).values().cloned().collect();
        Ok(volumes.iter().map(|v| v.info()).collect())
    }

    async fn info(&self, name: &str) -> Result<ExportInfo> {
        Ok(self.volume(name)?.info())
    }

    async fn open(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        let volume = self.volume(name)?;
        if !read_only {
            let settings = lock(&volume.settings).clone();
            if settings.read_only {
                return Err(Error::ReadOnly(format!("volume {name} is read-only")));
            }
            if let Some(holder) = settings.locked_by {
                return Err(Error::Locked(format!("held by node {holder}")));
            }
        }
        volume.handles.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(MemoryDevice { volume, read_only }))
    }
}

/// One open handle on an in-memory volume.
pub struct MemoryDevice {
    volume: Arc<Volume>,
    read_only: bool,
}

impl Drop for MemoryDevice {
    fn drop(&mut self) {
        self.volume.handles.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemoryDevice {
    /// Apply injected latency and failure, then check the range.
    async fn begin(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        let (latency, fail, panic) = {
            let s = lock(&self.volume.settings);
            (s.latency, s.fail_with.clone(), s.panic)
        };
        assert!(!panic, "injected panic in volume {}", self.volume.name);
        if let Some(d) = latency {
            tokio::time::sleep(d).await;
        }
        if let Some(e) = fail {
            return Err(e);
        }
        if write && self.read_only {
            return Err(Error::ReadOnly(format!(
                "volume {} opened read-only",
                self.volume.name
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.volume.size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "range {offset}+{len} past the end of volume {} ({} bytes)",
                self.volume.name, self.volume.size
            ))),
        }
    }

    fn count_fua(&self, fua: bool) {
        if fua {
            self.volume.fua_ops.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Zero `[offset, offset+len)`; whole pages are freed when `free` is set,
    /// otherwise they are allocated (zeroed) so the space stays reserved.
    fn zero_range(&self, offset: u64, len: u64, free: bool) {
        let mut pages = self.volume.write_pages();
        for_each_page(offset, len, |index, start, end| {
            let whole = start == 0 && end == PAGE as usize;
            if whole && free {
                pages.remove(&index);
            } else if let Some(page) = pages.get_mut(&index) {
                page[start..end].fill(0);
            } else if !free {
                pages.insert(index, vec![0u8; PAGE as usize].into_boxed_slice());
            }
        });
    }
}

/// Call `f(page_index, start_in_page, end_in_page)` for each page the range touches.
fn for_each_page(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize)) {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let index = pos / PAGE;
        let page_start = index * PAGE;
        let start = (pos - page_start) as usize;
        let stop = (end.min(page_start + PAGE) - page_start) as usize;
        f(index, start, stop);
        pos = page_start + stop as u64;
    }
}

#[async_trait]
impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.volume.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn multi_conn_safe(&self) -> bool {
        // Every handle shares one page map and there is no cache.
        true
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.begin(offset, len, false).await?;
        let len_usize = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("read of {len} bytes")))?;
        let mut out = BytesMut::zeroed(len_usize);
        let pages = self.volume.read_pages();
        let mut at = 0usize;
        for_each_page(offset, len, |index, start, end| {
            if let Some(page) = pages.get(&index) {
                out[at..at + end - start].copy_from_slice(&page[start..end]);
            }
            at += end - start;
        });
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.begin(offset, data.len() as u64, true).await?;
        {
            let mut pages = self.volume.write_pages();
            let mut at = 0usize;
            for_each_page(offset, data.len() as u64, |index, start, end| {
                let page = pages
                    .entry(index)
                    .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
                page[start..end].copy_from_slice(&data[at..at + end - start]);
                at += end - start;
            });
        }
        self.count_fua(fua);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<()> {
        self.begin(offset, len, true).await?;
        self.zero_range(offset, len, may_trim);
        self.count_fua(fua);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.begin(offset, len, true).await?;
        self.zero_range(offset, len, true);
        self.count_fua(fua);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.begin(0, 0, false).await?;
        self.volume.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sparse_pages_are_allocated_and_freed() {
        let vols = MemoryVolumes::new();
        vols.create("v", 1 << 20).unwrap();
        let dev = vols.open("v", false).await.unwrap();
        dev.write(100, Bytes::from(vec![1u8; 8000]), false)
            .await
            .unwrap();
        assert_eq!(vols.stats("v").unwrap().allocated, 2 * PAGE);
        dev.write_zeroes(0, 3 * PAGE, false, false).await.unwrap();
        assert_eq!(vols.stats("v").unwrap().allocated, 3 * PAGE);
        dev.trim(0, 3 * PAGE, true).await.unwrap();
        assert_eq!(vols.stats("v").unwrap().allocated, 0);
        assert_eq!(vols.stats("v").unwrap().fua_ops, 1);
    }

    #[tokio::test]
    async fn knobs() {
        let vols = MemoryVolumes::new();
        vols.create("v", 1 << 20).unwrap();
        assert!(matches!(vols.create("v", 1), Err(Error::AlreadyExists(_))));
        vols.set_locked_by("v", Some("n2")).unwrap();
        let err = vols.open("v", false).await.err().unwrap();
        assert_eq!(err.to_string(), "locked: held by node n2");
        vols.open("v", true).await.unwrap();
        vols.set_locked_by("v", None).unwrap();
        vols.set_read_only("v", true).unwrap();
        assert!(matches!(
            vols.open("v", false).await.err(),
            Some(Error::ReadOnly(_))
        ));
        let ro = vols.open("v", true).await.unwrap();
        assert!(matches!(
            ro.write(0, Bytes::from_static(b"x"), false).await,
            Err(Error::ReadOnly(_))
        ));
        assert_eq!(vols.stats("v").unwrap().handles, 1);
        drop(ro);
        assert_eq!(vols.stats("v").unwrap().handles, 0);
        assert!(matches!(
            vols.open("nope", true).await.err(),
            Some(Error::NotFound(_))
        ));
    }
}
