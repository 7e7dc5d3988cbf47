//! [`SledMetadata`]: the shared metadata engine over an embedded sled
//! database, for single-node and development setups.
//!
//! Everything lives in one sled tree (`torus-metadata`), so a write — data
//! records, the revision counter, lease records — is one `apply_batch`, which
//! sled applies atomically; the tree is then flushed (fsync) before the write
//! is acknowledged. sled locks its directory, so a second open of a directory
//! that is in use fails with a clear error instead of corrupting it.

use super::local::{Batch, KvBackend, LocalMetadata};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use torus_traits::{Error, Result};

/// A `MetadataStore` persisted in a sled database. See [`LocalMetadata`]
/// for how it works.
pub type SledMetadata = LocalMetadata<SledBackend>;

/// The sled tree holding all metadata.
const TREE: &str = "torus-metadata";
/// sled's page cache; metadata is small.
const CACHE_BYTES: u64 = 64 << 20;

impl LocalMetadata<SledBackend> {
    /// Opens (creating if needed) the store in directory `path`.
    ///
    /// Synchronous: it reads the whole store once (to rebuild the lease
    /// table), which is quick for metadata-sized data. It may be called inside
    /// or outside a tokio runtime. Leases found on disk get a fresh full TTL.
    ///
    /// Fails with [`Error::Io`] naming the path when the directory cannot be
    /// used, including when it is already open (by this process or another),
    /// and with [`Error::Corrupt`] when a stored record cannot be decoded.
    pub fn open(path: &Path) -> Result<Self> {
        let db = ::sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            // Every commit is flushed already (`KvBackend::flush`); without
            // the background flusher thread, which held the directory lock
            // for up to its period after the store was dropped, `close`
            // releases the directory at once.
            .flush_every_ms(None)
            .open()
            .map_err(|e| sled_error(path, "opening sled metadata store", e))?;
        let tree = db
            .open_tree(TREE)
            .map_err(|e| sled_error(path, "opening sled tree", e))?;
        let backend = SledBackend {
            db,
            tree,
            path: path.to_path_buf(),
        };
        LocalMetadata::load(backend, &path.display().to_string())
    }
}

/// A sled tree as a [`KvBackend`].
pub struct SledBackend {
    /// Kept so the database (and its directory lock) lives as long as the store.
    #[allow(dead_code)]
    db: ::sled::Db,
    tree: ::sled::Tree,
    path: PathBuf,
}

impl std::fmt::Debug for SledBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KvBackend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.tree
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| sled_error(&self.path, "reading sled metadata", e))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.tree
            .scan_prefix(prefix)
            .map(|entry| {
                entry
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| sled_error(&self.path, "scanning sled metadata", e))
            })
            .collect()
    }

    fn apply(&mut self, batch: Batch) -> Result<()> {
        let mut sled_batch = ::sled::Batch::default();
        for (key, value) in batch {
            match value {
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        self.tree
            .apply_batch(sled_batch)
            .map_err(|e| sled_error(&self.path, "writing sled metadata", e))
    }

    fn release(self) -> impl Future<Output = ()> + Send {
        let lock_file = self.path.join("db");
        drop(self);
        async move {
            // sled's own threads drop their handles, and with the last one
            // the directory lock, a moment after ours are gone: wait
            // (bounded) until the lock is free.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline && locked(&lock_file) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    }

    fn flush(&self) -> impl Future<Output = Result<()>> + Send {
        let tree = self.tree.clone();
        let path = self.path.clone();
        async move {
            // fsync blocks: keep it off the async worker threads.
            match tokio::task::spawn_blocking(move || tree.flush()).await {
                Ok(Ok(_bytes)) => Ok(()),
                Ok(Err(e)) => Err(sled_error(&path, "flushing sled metadata", e)),
                Err(e) => Err(Error::Other(format!(
                    "flushing sled metadata at {}: flush task failed: {e}",
                    path.display()
                ))),
            }
        }
    }
}

/// A sled error as a Torus error that names the path.
/// Whether another open file holds the exclusive `flock` sled takes on its
/// `db` file.
fn locked(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock on a descriptor owned by `file`, alive for the call.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    // The lock, if taken, goes with `file` when it is closed here.
    r != 0
}

fn sled_error(path: &Path, doing: &str, error: ::sled::Error) -> Error {
    let at = path.display();
    match error {
        // sled reports its directory lock as an `Other` I/O error with this text.
        ::sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => Error::io(
            format!(
                "{doing} at {at}: the directory is already in use by another open store \
                 (in this process or another one)"
            ),
            e,
        ),
        ::sled::Error::Io(e) => Error::io(format!("{doing} at {at}"), e),
        ::sled::Error::Corruption { .. } => {
            Error::Corrupt(format!("{doing} at {at}: sled reports corruption"))
        }
        ::sled::Error::CollectionNotFound(name) => Error::io(
            format!("{doing} at {at}"),
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("sled tree {:?} not found", String::from_utf8_lossy(&name)),
            ),
        ),
        other => Error::Other(format!("{doing} at {at}: {other}")),
    }
}
