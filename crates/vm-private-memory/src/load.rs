// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Loading guest images: checking that a loader's ranges are open to the host, and
//! putting bytes into pages that end up private.
//!
//! Loaders (linux-loader, firmware loaders) write through vm-memory's `Bytes`, which
//! refuses private pages; linux-loader then reports its own error
//! (`ReadKernelImage`, `CommandLineCopy`) and the range is lost. Check the ranges with
//! [`PrivateMemoryManager::check_host_access`] first, and the error names the first private page.

use guest_memfd::{PageRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

use crate::attributes::PageState;
use crate::convert::ContentMode;
use crate::error::{ByteRange, Error, Result};
use crate::guard::DirtyBitmap;
use crate::memory::PrivateMemoryManager;
use crate::strategy::{Strategy, UnavailableReason};

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Checks that the host may access `[gpa, gpa + len)`: every byte inside guest
    /// memory and every page shared. Call it before handing ranges to a loader.
    ///
    /// # Errors
    ///
    /// [`Error::PrivatePage`] naming the range and its first private page;
    /// [`Error::OutsideGuestMemory`] naming the first address outside every region;
    /// [`Error::File`] if the range overflows.
    pub fn check_host_access(&self, gpa: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let whole = page_span(gpa, len)?;
        let asked = ByteRange { start: gpa, len };
        let snapshot = self.listed();
        for piece in Self::split(&snapshot, whole) {
            let (region, offset, piece_len) = piece.map_err(|e| match e {
                Error::OutsideGuestMemory { first_outside, .. } => Error::OutsideGuestMemory {
                    range: asked,
                    first_outside: first_outside.max(gpa),
                },
                other => other,
            })?;
            let first = offset / PAGE_SIZE;
            if let Some(page) =
                region
                    .attributes()
                    .find(first, piece_len / PAGE_SIZE, PageState::Private)
            {
                return Err(Error::PrivatePage {
                    range: asked,
                    page: region.guest_range().start() + page * PAGE_SIZE,
                });
            }
        }
        Ok(())
    }

    /// Writes `bytes` at `gpa` into pages that end up private, as a loader of an
    /// in-place guest needs: the pages covering the bytes are made shared, written, and
    /// made private again with their content. Pages that were private arrive empty, so
    /// the parts of them the bytes do not cover (at the start of the first page, the end
    /// of the last) read as zeros; pages that were shared already keep their other
    /// bytes. Call it before the guest runs (the pages are briefly shared).
    ///
    /// # Errors
    ///
    /// [`Error::StrategyUnavailable`] with the dual strategy, where the host cannot put
    /// content into private pages (a vendor launch measures and encrypts them instead:
    /// [`PrivateMemoryManager::launch_private`]); [`Error::OutsideGuestMemory`] and
    /// conversion errors as [`PrivateMemoryManager::convert`]. Whatever fails after the
    /// pages were made shared, they end up private (emptied) and the first error is
    /// returned (pages that were shared before the call end private and empty too); if
    /// even that fails, [`Error::RollbackFailed`] names in `kept_shared` the runs still
    /// shared. The pages are never left shared without saying so.
    pub fn load_private(&self, gpa: u64, bytes: &[u8]) -> Result<()> {
        if self.strategy != Strategy::InPlace {
            return Err(Error::StrategyUnavailable {
                strategy: self.strategy,
                reason: UnavailableReason::LoadNeedsInPlace,
            });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let pages = page_span(gpa, bytes.len() as u64)?;
        self.convert(pages, PageState::Shared)?;
        let loaded = self
            .listed()
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|source| Error::Load {
                range: gpa_of(gpa, bytes.len()),
                source,
            })
            .and_then(|()| {
                self.convert_with(pages, PageState::Private, ContentMode::Preserve)
                    .map(drop)
            });
        let Err(e) = loaded else {
            return Ok(());
        };
        // Back to private, content dropped: never leave the pages open to the host. Should
        // that fail too, say which runs are still shared.
        if self.convert(pages, PageState::Private).is_ok() {
            return Err(e);
        }
        let kept_shared = crate::shared_runs::shared_runs(&*self.listed(), pages)
            .map(|run| crate::memory::gpa(run.guest_range()))
            .collect::<Box<[_]>>();
        if kept_shared.is_empty() {
            return Err(e);
        }
        Err(Error::RollbackFailed {
            cause: Box::new(e),
            unknown: Box::default(),
            listeners_refused: Box::default(),
            kept_shared,
            kept_private: Box::default(),
        })
    }
}

fn gpa_of(start: u64, len: usize) -> ByteRange {
    ByteRange {
        start,
        len: len as u64,
    }
}

/// The whole pages covering `[start, start + len)`, `len > 0`.
fn page_span(start: u64, len: u64) -> Result<PageRange> {
    let overflow = || Error::File(guest_memfd::Error::RangeOverflow { start, len });
    let first = start - start % PAGE_SIZE;
    let end = start
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
        .ok_or_else(overflow)?;
    Ok(PageRange::new(first, end - first)?)
}
