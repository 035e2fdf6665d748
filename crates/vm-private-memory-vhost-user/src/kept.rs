// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A subscription that ends only when told to.
//!
//! An attachment's subscription is what keeps the pages of the backend's table from
//! turning private unnoticed: it may end only once the table is empty (or the backend's
//! process is gone). Held in a plain field, it would end by drop glue whenever the
//! attachment is dropped, also by an unwind through a half-done detach with regions
//! still mapped. Held in a [`Kept`], it ends only through [`Kept::end`]; dropped any
//! other way, it is forgotten (leaked), and the regions stay followed.

/// Holds a `T` that is dropped only through [`Kept::end`], and forgotten otherwise.
pub(crate) struct Kept<T>(Option<T>);

impl<T> Kept<T> {
    pub(crate) fn new(value: T) -> Self {
        Kept(Some(value))
    }

    /// Drops the value now.
    pub(crate) fn end(&mut self) {
        drop(self.0.take());
    }
}

impl<T> Drop for Kept<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            std::mem::forget(value);
        }
    }
}

impl<T> std::fmt::Debug for Kept<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("ended", &self.0.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts its drops.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn an_unwind_through_its_holder_forgets_the_value_and_only_end_drops_it() {
        let drops = Arc::new(AtomicUsize::new(0));
        // As in an attachment whose detach unwinds part way.
        let kept = Kept::new(Counted(Arc::clone(&drops)));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _in_the_attachment = kept;
            std::panic::resume_unwind(Box::new("a removal panicked"));
        }));
        assert!(unwound.is_err());
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        // A plain drop forgets it too.
        drop(Kept::new(Counted(Arc::clone(&drops))));
        assert_eq!(drops.load(Ordering::SeqCst), 0);

        let mut kept = Kept::new(Counted(Arc::clone(&drops)));
        kept.end();
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        kept.end();
        drop(kept);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}
