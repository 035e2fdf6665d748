// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Page-aligned ranges.
//!
//! The seed's guest seal allows truncate and punch only on page boundaries. [`PageRange`]
//! makes that a property of the type: a value exists only if its start and length are
//! multiples of [`PAGE_SIZE`], its length is not zero and its end does not overflow `u64`.
//! Every offset-and-length argument of this crate is a `PageRange`, so no call can reach
//! the kernel with a range the kernel would refuse for its alignment.

use std::fmt;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The page size of guest_memfd and of KVM memslots on x86_64, in bytes.
pub const PAGE_SIZE: u64 = 4096;

/// A non-empty, page-aligned, non-overflowing range `[start, start + len)`.
///
/// It describes an offset range in a file or a guest-physical range, depending on where it
/// is used.
///
/// ```
/// use guest_memfd::{PageRange, PAGE_SIZE};
///
/// let range = PageRange::new(2 * PAGE_SIZE, 3 * PAGE_SIZE).unwrap();
/// assert_eq!(range.end(), 5 * PAGE_SIZE);
/// assert_eq!(range.page_count(), 3);
/// assert!(PageRange::new(1, PAGE_SIZE).is_err()); // unaligned start
/// assert!(PageRange::new(0, 0).is_err()); // empty
/// assert!(PageRange::new(u64::MAX - PAGE_SIZE + 1, 2 * PAGE_SIZE).is_err()); // overflow
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "RawPageRange", into = "RawPageRange")]
pub struct PageRange {
    start: u64,
    len: u64,
}

/// The unchecked serialized form of a [`PageRange`]; deserialization checks it.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct RawPageRange {
    start: u64,
    len: u64,
}

impl TryFrom<RawPageRange> for PageRange {
    type Error = Error;

    fn try_from(raw: RawPageRange) -> Result<Self> {
        PageRange::new(raw.start, raw.len)
    }
}

impl From<PageRange> for RawPageRange {
    fn from(range: PageRange) -> Self {
        RawPageRange {
            start: range.start,
            len: range.len,
        }
    }
}

/// Whether `value` is a multiple of [`PAGE_SIZE`].
pub const fn is_page_aligned(value: u64) -> bool {
    value % PAGE_SIZE == 0
}

impl PageRange {
    /// Checks `start` and `len` and makes a range of them.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyRange`] if `len` is zero, [`Error::UnalignedRange`] if `start` or
    /// `len` is not a multiple of [`PAGE_SIZE`], [`Error::RangeOverflow`] if the range
    /// ends past `u64::MAX`.
    #[inline]
    pub fn new(start: u64, len: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::EmptyRange { start });
        }
        if !is_page_aligned(start) || !is_page_aligned(len) {
            return Err(Error::UnalignedRange { start, len });
        }
        if start.checked_add(len).is_none() {
            return Err(Error::RangeOverflow { start, len });
        }
        Ok(PageRange { start, len })
    }

    /// The range of `count` pages starting at page number `first_page`.
    ///
    /// # Errors
    ///
    /// [`Error::RangeOverflow`] if the range in bytes does not fit in 64 bits;
    /// [`Error::EmptyRange`] if `count` is zero.
    #[inline]
    pub fn from_pages(first_page: u64, count: u64) -> Result<Self> {
        let start = first_page
            .checked_mul(PAGE_SIZE)
            .ok_or(Error::RangeOverflow {
                start: first_page,
                len: count,
            })?;
        let len = count
            .checked_mul(PAGE_SIZE)
            .ok_or(Error::RangeOverflow { start, len: count })?;
        Self::new(start, len)
    }

    /// The first byte of the range.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// The length of the range in bytes, never zero.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: a `PageRange` has at least one page. Present for API symmetry.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// The first byte after the range. It may equal `u64::MAX + 1` only in theory: the
    /// constructor guarantees `start + len` does not overflow.
    pub const fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The page number of the first page.
    pub const fn first_page(&self) -> u64 {
        self.start / PAGE_SIZE
    }

    /// The number of pages in the range, at least one.
    pub const fn page_count(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// Whether `other` lies wholly inside this range.
    pub const fn contains(&self, other: &PageRange) -> bool {
        other.start >= self.start && other.end() <= self.end()
    }

    /// Whether the byte at `addr` lies inside this range.
    pub const fn contains_addr(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }

    /// The pages both ranges cover, if any.
    pub fn intersection(&self, other: &PageRange) -> Option<PageRange> {
        let start = self.start.max(other.start);
        let end = self.end().min(other.end());
        (start < end).then(|| PageRange {
            start,
            len: end - start,
        })
    }

    /// This range moved by `delta` bytes down (for example from guest-physical addresses
    /// to file offsets).
    ///
    /// # Errors
    ///
    /// [`Error::RangeOverflow`] if `delta` is larger than the start;
    /// [`Error::UnalignedRange`] if `delta` is not a multiple of [`PAGE_SIZE`].
    #[inline]
    pub fn checked_sub(&self, delta: u64) -> Result<PageRange> {
        let start = self.start.checked_sub(delta).ok_or(Error::RangeOverflow {
            start: self.start,
            len: self.len,
        })?;
        PageRange::new(start, self.len)
    }

    /// This range moved by `delta` bytes up.
    ///
    /// # Errors
    ///
    /// [`Error::RangeOverflow`] if the moved range would end past `u64::MAX`;
    /// [`Error::UnalignedRange`] if `delta` is not a multiple of [`PAGE_SIZE`].
    #[inline]
    pub fn checked_add(&self, delta: u64) -> Result<PageRange> {
        let start = self.start.checked_add(delta).ok_or(Error::RangeOverflow {
            start: self.start,
            len: self.len,
        })?;
        PageRange::new(start, self.len)
    }

    /// Splits the range into consecutive pieces of at most `pages_per_chunk` pages.
    ///
    /// ```
    /// use std::num::NonZeroU64;
    /// use guest_memfd::{PageRange, PAGE_SIZE};
    ///
    /// let range = PageRange::new(0, 5 * PAGE_SIZE).unwrap();
    /// let pieces: Vec<_> = range.chunks(NonZeroU64::new(2).unwrap()).collect();
    /// assert_eq!(pieces.len(), 3);
    /// assert_eq!(pieces[2], PageRange::new(4 * PAGE_SIZE, PAGE_SIZE).unwrap());
    /// ```
    pub fn chunks(&self, pages_per_chunk: NonZeroU64) -> Chunks {
        Chunks {
            next: self.start,
            end: self.end(),
            step: pages_per_chunk.get().saturating_mul(PAGE_SIZE),
        }
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end())
    }
}

/// Iterator over the pieces of a [`PageRange`], made by [`PageRange::chunks`].
#[derive(Clone, Debug)]
pub struct Chunks {
    next: u64,
    end: u64,
    step: u64,
}

impl Iterator for Chunks {
    type Item = PageRange;

    fn next(&mut self) -> Option<PageRange> {
        if self.next >= self.end {
            return None;
        }
        let len = self.step.min(self.end - self.next);
        let piece = PageRange {
            start: self.next,
            len,
        };
        self.next += len;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_every_bad_shape() {
        assert!(matches!(
            PageRange::new(0, 0),
            Err(Error::EmptyRange { start: 0 })
        ));
        for (start, len) in [
            (1, PAGE_SIZE),
            (0, 1),
            (0, PAGE_SIZE + 1),
            (PAGE_SIZE - 1, 1),
        ] {
            assert!(
                matches!(
                    PageRange::new(start, len),
                    Err(Error::UnalignedRange { .. })
                ),
                "({start:#x}, {len:#x})"
            );
        }
        let top = u64::MAX - PAGE_SIZE + 1;
        assert!(PageRange::new(top, PAGE_SIZE).is_err());
        assert!(matches!(
            PageRange::new(top - PAGE_SIZE + 1, 2 * PAGE_SIZE),
            Err(Error::UnalignedRange { .. })
        ));
        assert!(matches!(
            PageRange::new(top - PAGE_SIZE, 3 * PAGE_SIZE),
            Err(Error::RangeOverflow { .. })
        ));
        assert!(PageRange::from_pages(u64::MAX / 2, 1).is_err());
        assert!(PageRange::from_pages(0, u64::MAX / 2).is_err());
    }

    #[test]
    fn the_last_page_of_the_address_space_is_not_representable_but_the_one_before_is() {
        // start + len must fit in u64, so the topmost page cannot be expressed.
        let before_last = u64::MAX - 2 * PAGE_SIZE + 1;
        let r = PageRange::new(before_last, PAGE_SIZE).unwrap();
        assert_eq!(r.end(), u64::MAX - PAGE_SIZE + 1);
    }

    #[test]
    fn intersection_and_containment() {
        let a = PageRange::new(0, 4 * PAGE_SIZE).unwrap();
        let b = PageRange::new(2 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap();
        assert_eq!(
            a.intersection(&b),
            Some(PageRange::new(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap())
        );
        let c = PageRange::new(4 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(a.intersection(&c), None);
        assert!(a.contains(&PageRange::new(PAGE_SIZE, PAGE_SIZE).unwrap()));
        assert!(!a.contains(&b));
        assert!(a.contains_addr(4 * PAGE_SIZE - 1));
        assert!(!a.contains_addr(4 * PAGE_SIZE));
    }

    #[test]
    fn chunks_cover_the_range_exactly() {
        let r = PageRange::new(PAGE_SIZE, 7 * PAGE_SIZE).unwrap();
        let pieces: Vec<_> = r.chunks(NonZeroU64::new(3).unwrap()).collect();
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[0].start(), PAGE_SIZE);
        assert_eq!(pieces.iter().map(PageRange::len).sum::<u64>(), r.len());
        assert_eq!(pieces.last().unwrap().end(), r.end());
        let huge: Vec<_> = r.chunks(NonZeroU64::new(u64::MAX).unwrap()).collect();
        assert_eq!(huge, vec![r]);
    }

    #[test]
    fn shifting_checks_bounds() {
        let r = PageRange::new(2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(r.checked_sub(PAGE_SIZE).unwrap().start(), PAGE_SIZE);
        assert!(r.checked_sub(3 * PAGE_SIZE).is_err());
        assert!(r.checked_sub(1).is_err());
        assert!(r.checked_add(u64::MAX - PAGE_SIZE + 1).is_err());
    }

    #[test]
    fn deserialization_checks_the_range() {
        let ok: PageRange = serde_json::from_str(r#"{"start":4096,"len":8192}"#).unwrap();
        assert_eq!(ok, PageRange::new(4096, 8192).unwrap());
        for bad in [
            r#"{"start":1,"len":4096}"#,
            r#"{"start":0,"len":0}"#,
            r#"{"start":18446744073709547520,"len":8192}"#,
        ] {
            assert!(serde_json::from_str::<PageRange>(bad).is_err(), "{bad}");
        }
        let text = serde_json::to_string(&ok).unwrap();
        assert_eq!(serde_json::from_str::<PageRange>(&text).unwrap(), ok);
    }
}
