//! Which bytes are read-only views of a file's pages, so that a frontend may
//! hand those pages to its socket by reference (`vmsplice` + `splice`)
//! instead of copying them.
//!
//! Data travels between the layers as plain [`bytes::Bytes`], which cannot
//! say where its memory comes from. A store that returns a mapping of a file
//! (the file store's large reads, mapped and locked) registers the mapping
//! here for as long as it stays mapped; the NBD server asks before it sends a
//! large payload. Splicing pages by reference is only right for file pages:
//! the socket may still hold them after the `Bytes` is dropped, and a heap
//! buffer would be reused by then, while a file page only ever holds the
//! file's data (a later write to that range can show through, which is the
//! same as a read overlapping that write). So nothing unregistered is ever
//! spliced.
//!
//! Mapping and locking pages costs more than the copy it saves unless
//! someone splices them, so stores make views only while a consumer has
//! said it wants them ([`want_views`]; the NBD server with splicing on).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock};

/// How many [`ViewsWanted`] are alive.
static CONSUMERS: AtomicUsize = AtomicUsize::new(0);

/// Held by a consumer of file views (one that can send them by reference);
/// dropping it withdraws the wish.
#[derive(Debug)]
pub struct ViewsWanted(());

/// Says that file views are wanted, until the returned value is dropped.
pub fn want_views() -> ViewsWanted {
    CONSUMERS.fetch_add(1, Ordering::Relaxed);
    ViewsWanted(())
}

impl Drop for ViewsWanted {
    fn drop(&mut self) {
        CONSUMERS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether any consumer wants file views: a store that can read either way
/// makes a view only then, and otherwise copies.
pub fn views_wanted() -> bool {
    CONSUMERS.load(Ordering::Relaxed) > 0
}

/// Registered views: start address → end address (exclusive).
static VIEWS: RwLock<BTreeMap<usize, usize>> = RwLock::new(BTreeMap::new());

/// A registered view; dropping it unregisters the view. Drop it before the
/// memory is unmapped.
#[derive(Debug)]
pub struct FileView {
    start: usize,
}

/// Registers `[ptr, ptr + len)` as a read-only, shared mapping of a file's
/// pages, which must stay mapped until the returned value is dropped.
/// Ranges must not overlap a view already registered (mappings never do).
pub fn register_file_view(ptr: *const u8, len: usize) -> FileView {
    let start = ptr as usize;
    let end = start.saturating_add(len);
    VIEWS
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(start, end);
    FileView { start }
}

impl Drop for FileView {
    fn drop(&mut self) {
        VIEWS
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.start);
    }
}

/// Whether all of `data` lies inside one registered file view. The answer
/// holds for as long as the caller keeps the owner of `data` (whose drop
/// unregisters the view) alive.
pub fn is_file_view(data: &[u8]) -> bool {
    let start = data.as_ptr() as usize;
    let Some(end) = start.checked_add(data.len()) else {
        return false;
    };
    let views = VIEWS.read().unwrap_or_else(PoisonError::into_inner);
    views
        .range(..=start)
        .next_back()
        .is_some_and(|(_, &view_end)| end <= view_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_registered_ranges_are_views_and_only_while_registered() {
        let buf = vec![0u8; 12288];
        let other = vec![0u8; 4096];
        let (a, _) = buf.split_at(8192);
        assert!(!is_file_view(a));
        let view = register_file_view(a.as_ptr(), a.len());
        assert!(is_file_view(a));
        assert!(is_file_view(&a[100..5000]));
        assert!(is_file_view(&a[8191..]));
        assert!(!is_file_view(&other), "another buffer is not a view");
        assert!(!is_file_view(&buf[4096..]), "runs past the view's end");
        assert!(!is_file_view(&buf[8192..]), "starts at the view's end");
        drop(view);
        assert!(!is_file_view(&a[100..5000]));
    }
}
