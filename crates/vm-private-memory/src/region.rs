// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A guest memory region backed by guest_memfd, with per-page host access control.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_memfd::{GuestMemfd, Memslot, PageRange, SharedBacking, PAGE_SIZE};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    AtomicAccess, Bytes, FileOffset, GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestUsize,
    MemoryRegionAddress, ReadVolatile, VolatileSlice, WriteVolatile,
};

use crate::attributes::{PageAttributes, PageState};
use crate::error::{ByteRange, Error};
use crate::guard::{AccessGuard, HostAccess};
use crate::strategy::Strategy;
use vm_memory::bitmap::{Bitmap, NewBitmap, BS};

type GuestResult<T> = std::result::Result<T, GuestMemoryError>;

/// One region of guest RAM: a page-aligned guest-physical range backed by a guest_memfd
/// (and, in the dual strategy, a file for its shared pages), with one
/// private/shared bit per page.
///
/// It implements vm-memory's [`GuestMemoryRegion`] and [`Bytes`], so a
/// `GuestRegionCollection<GuestRegionPrivate>` is a [`vm_memory::GuestMemory`]. Every host
/// access path (`Bytes`, `get_slice`, `get_host_address`, and through them
/// `GuestMemory::get_slices`) checks the pages it would touch and refuses, without
/// touching memory, if any of them is private. The error is a
/// `GuestMemoryError::IOError` of kind `PermissionDenied` that wraps
/// [`Error::PrivatePage`]; [`private_page_refusal`] reads it back.
///
/// Whoever holds the vm-memory view reaches a `&GuestRegionPrivate`, so nothing here hands
/// out the files or the memslot: a safe `GuestMemfd::map` of the region's file would
/// reach every private page, and a safe unbind would leave KVM and this crate
/// disagreeing. None of these compile (the owner's view of its files is
/// [`crate::PrivateMemoryManager::backing`]):
///
/// ```compile_fail
/// # fn f(region: &vm_private_memory::GuestRegionPrivate) {
/// let file = region.gmem(); // the guest_memfd, private pages and all
/// # }
/// ```
///
/// ```compile_fail
/// # fn f(region: &vm_private_memory::GuestRegionPrivate) {
/// let shared = region.shared_memfd();
/// # }
/// ```
///
/// ```compile_fail
/// # fn f(region: &vm_private_memory::GuestRegionPrivate) {
/// let slot = region.memslot();
/// # }
/// ```
///
/// # Dirty tracking
///
/// `B` is the region's dirty bitmap, as in vm-memory's `GuestRegionMmap<B>`: `()` (the
/// default) tracks nothing; vm-memory's `AtomicBitmap` records every host write made
/// through the vm-memory view (`Bytes`, slices, `GuestMemory` helpers), for a live
/// migration's pass over shared memory. Build such memory with
/// [`crate::MemoryBuilder::build_with_bitmap`] and read the bitmap with
/// [`GuestRegionPrivate::dirty_bitmap`]. It records host writes only: KVM refuses dirty
/// logging on guest_memfd memslots (`KVM_MEM_LOG_DIRTY_PAGES` with `KVM_MEM_GUEST_MEMFD`
/// is `EINVAL`), so what the guest writes is not tracked. What changes the bytes the host
/// sees is marked too: a conversion to shared (the page's bytes are new to the host) and a
/// balloon's [`crate::PrivateMemoryManager::discard`] of shared pages (they read as zeros).
/// A page marked dirty may have gone private since: reading it for a migration pass is
/// refused as any host access to a private page is.
#[derive(Debug)]
pub struct GuestRegionPrivate<B = ()> {
    guest: PageRange,
    strategy: Strategy,
    gmem: GuestMemfd,
    gmem_offset: u64,
    shared: Option<SharedSide>,
    host: MmapRegion,
    attributes: PageAttributes,
    /// How many pages are private: kept by the conversion engine with the bits, so that
    /// "is the whole region shared" costs one load.
    private_pages: AtomicU64,
    slot: u32,
    /// Its bytes of the guest_memfd: no other region, of this memory or another, may use
    /// them while it holds them (released when it leaves its memory, kept if leaked).
    claim: guest_memfd::RangeClaim,
    /// The dirty bitmap, whose slices carry the access guards.
    access: HostAccess<B>,
}

/// The shared side of a dual-strategy region: a file (the workspace's sealed memfd, or
/// the VMM's own) and where the region's first page is in it.
#[derive(Debug)]
pub(crate) struct SharedSide {
    pub(crate) backing: SharedBacking,
    pub(crate) offset: u64,
}

impl SharedSide {
    /// The file range of `in_region`, a range of the region's pages.
    pub(crate) fn in_file(&self, in_region: PageRange) -> guest_memfd::Result<PageRange> {
        in_region.checked_add(self.offset)
    }

    /// Punches `in_region`, a range of the region's pages, from the file.
    pub(crate) fn discard(&self, in_region: PageRange) -> guest_memfd::Result<()> {
        self.backing.discard(self.in_file(in_region)?)
    }
}

/// The parts a region is made of (see [`crate::MemoryBuilder`]).
pub(crate) struct RegionParts {
    pub guest: PageRange,
    pub strategy: Strategy,
    pub gmem: GuestMemfd,
    pub gmem_offset: u64,
    pub shared: Option<SharedSide>,
    pub host: MmapRegion,
    pub initial: PageState,
    pub slot: u32,
    /// The region's bytes of `gmem`, held while it is in a memory.
    pub claim: guest_memfd::RangeClaim,
}

impl<B: NewBitmap> GuestRegionPrivate<B> {
    pub(crate) fn new(parts: RegionParts) -> Self {
        GuestRegionPrivate {
            // A region's length fits its host mapping, so it fits in usize.
            access: HostAccess::new(B::with_len(parts.host.size())),
            attributes: PageAttributes::new(parts.guest.page_count(), parts.initial),
            private_pages: AtomicU64::new(match parts.initial {
                PageState::Private => parts.guest.page_count(),
                PageState::Shared => 0,
            }),
            guest: parts.guest,
            strategy: parts.strategy,
            gmem: parts.gmem,
            gmem_offset: parts.gmem_offset,
            shared: parts.shared,
            host: parts.host,
            slot: parts.slot,
            claim: parts.claim,
        }
    }
}

impl<B> GuestRegionPrivate<B> {
    /// Gives the region's bytes of its guest_memfd back once it left its memory for
    /// good (not when it is leaked: KVM may still map them).
    pub(crate) fn release_file_range(&self) {
        self.claim.release();
    }
}

impl<B: Bitmap> GuestRegionPrivate<B> {
    /// The region's dirty bitmap (see "Dirty tracking" above): offsets are region
    /// offsets, as in `GuestRegionMmap`.
    pub fn dirty_bitmap(&self) -> &B {
        self.access.dirty_bitmap()
    }

    /// The guest-physical range.
    pub fn guest_range(&self) -> PageRange {
        self.guest
    }

    /// The backing strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The per-page bits.
    pub fn attributes(&self) -> &PageAttributes {
        &self.attributes
    }

    /// The guest_memfd holding the region's (private) pages. Crate-internal: a safe
    /// `GuestMemfd::map` of it would reach private pages (see [`crate::PrivateMemoryManager`]
    /// for what the owner may learn of its files).
    pub(crate) fn gmem(&self) -> &GuestMemfd {
        &self.gmem
    }

    /// Where in the guest_memfd the region starts.
    pub fn gmem_offset(&self) -> u64 {
        self.gmem_offset
    }

    /// The file holding the shared pages (dual strategy only).
    pub(crate) fn shared_side(&self) -> Option<&SharedSide> {
        self.shared.as_ref()
    }

    /// The memslot number this memory gave the region (from
    /// [`crate::MemoryBuilder::slots`]). With [`crate::MemoryBuilder::vmm_binds_memslots`]
    /// the VMM may bind it under a number of its own, which this memory never sees.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The region's memslot, with the host mapping as `userspace_addr`. Crate-internal:
    /// unbinding it is the owner's job.
    pub(crate) fn memslot(&self) -> guest_memfd::Result<Memslot<'_>> {
        Memslot::new(self.slot, self.guest, &self.gmem, self.gmem_offset)?
            .with_userspace_mapping(&self.host)
    }

    /// Puts pages `[first, first + count)` of the region, all now in `state.flipped()`,
    /// in `state`: the bits and the private-page count. Conversion engine only.
    #[inline]
    pub(crate) fn flip(&self, first: u64, count: u64, state: PageState) {
        self.set_states(first, count, state);
        // A page that turns shared shows the host new bytes (zeros, or the content the
        // guest kept): a migration pass that sent the page before must send it again.
        if state == PageState::Shared {
            self.access.dirty_bitmap().mark_dirty(
                (first * guest_memfd::PAGE_SIZE) as usize,
                (count * guest_memfd::PAGE_SIZE) as usize,
            );
        }
    }

    /// [`GuestRegionPrivate::flip`], not counted as a conversion of the file's pages: for
    /// a region leaving its memory, locked out of old views.
    #[inline]
    pub(crate) fn set_states(&self, first: u64, count: u64, state: PageState) {
        // The count goes first towards private and last towards shared, so that it is
        // never zero while a page is private: every host access of a region whose count
        // is zero skips the bits (`checked_slice`). It stays exact only if every page of
        // the range is in the other state, which every caller ensures.
        debug_assert!(
            self.attributes.all(first, count, state.flipped()),
            "set_states({first}, {count}, {state:?}) over pages not all {:?}",
            state.flipped()
        );
        match state {
            PageState::Private => {
                self.private_pages.fetch_add(count, Ordering::AcqRel);
                self.attributes.set(first, count, state);
            }
            PageState::Shared => {
                self.attributes.set(first, count, state);
                self.private_pages.fetch_sub(count, Ordering::AcqRel);
            }
        }
    }

    /// Whether every page of the region is shared.
    pub fn all_shared(&self) -> bool {
        self.private_pages.load(Ordering::Acquire) == 0
    }

    /// The host addresses of the region's mapping: `[start, end)`.
    pub(crate) fn host_range(&self) -> (usize, usize) {
        let start = self.host.as_ptr() as usize;
        (start, start + self.host.size())
    }

    /// Whether host addresses `[start, end)` overlap a private page of this region.
    pub(crate) fn host_range_touches_private(&self, start: usize, end: usize) -> bool {
        let (base, limit) = self.host_range();
        let (lo, hi) = (start.max(base), end.min(limit));
        if lo >= hi {
            return false;
        }
        let first = ((lo - base) as u64) / PAGE_SIZE;
        let last = ((hi - 1 - base) as u64) / PAGE_SIZE;
        self.attributes.first_private(first, last).is_some()
    }

    /// The state of the page holding region offset `offset`.
    pub fn state_at(&self, offset: u64) -> Option<PageState> {
        self.attributes.get(offset / PAGE_SIZE)
    }

    /// Refuses `[offset, offset + count)` (inside the region) if it touches a private page.
    /// Deliberately not `#[inline]`: kept out of line, it leaves the access path small
    /// enough for vm-memory's generic code around it to be inlined (measured: 16 ns for
    /// `read_obj::<u64>` out of line, 35 ns inlined).
    fn check_shared(&self, offset: u64, count: usize) -> GuestResult<()> {
        if count == 0 {
            return Ok(());
        }
        let first = offset / PAGE_SIZE;
        let last = (offset + count as u64 - 1) / PAGE_SIZE;
        match self.attributes.first_private(first, last) {
            None => Ok(()),
            Some(page) => Err(refusal(
                ByteRange {
                    start: self.guest.start() + offset,
                    len: count as u64,
                },
                self.guest.start() + page * PAGE_SIZE,
            )),
        }
    }

    /// The checked slice `[offset, offset + count)`: inside the region and all shared.
    /// The slice's guard publishes the access before the bits are checked, so a
    /// conversion to private waits for the slice to be dropped (see `guard`).
    #[inline]
    fn checked_slice(
        &self,
        offset: u64,
        count: usize,
    ) -> GuestResult<VolatileSlice<'_, AccessGuard<BS<'_, B>>>> {
        let end = offset
            .checked_add(count as u64)
            .ok_or(GuestMemoryError::GuestAddressOverflow)?;
        if end > self.guest.len() {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        // The region's length fits its mapping, so `offset` and `end` fit in usize.
        let ptr = self.host.as_ptr().wrapping_add(offset as usize);
        // `offset` fits in usize (above).
        let dirty = self.access.dirty_bitmap().slice_at(offset as usize);
        let guard = if count == 0 {
            AccessGuard::nothing(dirty)
        } else {
            AccessGuard::publish(ptr as usize, ptr as usize + count, dirty)
        };
        // Every page shared (the count of private pages rises before any bit is set, and
        // falls only after the last is cleared: see `set_states`): nothing to look up. A
        // zero read while a conversion raises the count is harmless for the same reason
        // a stale bit is: the access published before it read, and the conversion's
        // barrier pairs with that (see `inflight`). Otherwise an access
        // within one 64-page word of the map is checked here, with one load; the rest
        // (and every refusal) out of line.
        if count != 0
            && self.private_pages.load(Ordering::Acquire) != 0
            && self
                .attributes
                .shared_within_word(offset / PAGE_SIZE, (offset + count as u64 - 1) / PAGE_SIZE)
                != Some(true)
        {
            self.check_shared(offset, count)?;
        }
        // SAFETY: `[offset, end)` lies inside the region, whose mapping is `guest.len()`
        // bytes long and lives as long as `self`, which the slice borrows; guest memory
        // is only ever accessed volatile (by the guest, KVM and vm-memory's slices).
        Ok(unsafe { VolatileSlice::with_bitmap(ptr, count, guard, None) })
    }

    /// The bytes from `offset` to the end of the region, at most `want`.
    fn clamp(&self, offset: MemoryRegionAddress, want: usize) -> GuestResult<usize> {
        let left = self
            .guest
            .len()
            .checked_sub(offset.0)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        Ok(want.min(usize::try_from(left).unwrap_or(usize::MAX)))
    }
}

/// The `GuestMemoryError` for a refused access, wrapping [`Error::PrivatePage`].
#[cold]
fn refusal(range: ByteRange, page: u64) -> GuestMemoryError {
    GuestMemoryError::IOError(io::Error::new(
        io::ErrorKind::PermissionDenied,
        Error::PrivatePage { range, page },
    ))
}

/// If `err` is this crate's refusal of a private page, the range accessed and the first
/// private page.
pub fn private_page_refusal(err: &GuestMemoryError) -> Option<(ByteRange, u64)> {
    match err {
        GuestMemoryError::IOError(e) => match e.get_ref()?.downcast_ref::<Error>()? {
            Error::PrivatePage { range, page } => Some((*range, *page)),
            _ => None,
        },
        _ => None,
    }
}

impl<B: Bitmap> GuestMemoryRegion for GuestRegionPrivate<B> {
    type B = HostAccess<B>;

    #[inline]
    fn len(&self) -> GuestUsize {
        self.guest.len()
    }

    #[inline]
    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.guest.start())
    }

    fn bitmap(&self) -> AccessGuard<BS<'_, B>> {
        self.access.slice_at(0)
    }

    /// The host address of `addr`, only while *every* page of the region is shared.
    ///
    /// rust-vmm code takes `get_host_address(0)` plus the region's length to map a whole
    /// region (vfio-ioctls' `vfio_map_guest_memory`, vhost-user memory tables), so an
    /// address is only handed out when that whole span is shared; a region with any
    /// private page refuses, naming its first private page. Device code that needs the
    /// shared parts of a partly private region takes slices (`get_slice`) instead. The
    /// pointer stays valid while the pages stay shared: subscribe a listener to hear
    /// `discard` before they stop being so.
    fn get_host_address(&self, addr: MemoryRegionAddress) -> GuestResult<*mut u8> {
        if addr.0 >= self.guest.len() {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        if !self.all_shared() {
            let page = self
                .attributes
                .find(0, self.attributes.pages(), PageState::Private);
            return Err(refusal(
                ByteRange {
                    start: self.guest.start(),
                    len: self.guest.len(),
                },
                self.guest.start() + page.unwrap_or(0) * PAGE_SIZE,
            ));
        }
        Ok(self.host.as_ptr().wrapping_add(addr.0 as usize))
    }

    /// `None`, whatever the strategy: the vm-memory view alone reaches no file. In place
    /// the file is the guest_memfd, whose private pages no other mapping may reach; with
    /// the dual strategy vm-memory's safe `MmapRegion::from_file` would map the shared
    /// side with no access guard (writes untracked, pages held twice across
    /// conversions). Device code the owner trusts with files gets them, shared runs
    /// only, from [`crate::PrivateMemoryManager::shared_pages`].
    fn file_offset(&self) -> Option<&FileOffset> {
        None
    }

    #[inline]
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> GuestResult<VolatileSlice<'_, AccessGuard<BS<'_, B>>>> {
        self.checked_slice(offset.0, count)
    }
}

/// Implemented by hand rather than through `GuestMemoryRegionBytes`: that trait's
/// methods go through `as_volatile_slice()`, a slice of the whole region, so one private
/// page anywhere would refuse every access. Here each access checks exactly its bytes.
impl<B: Bitmap> Bytes<MemoryRegionAddress> for GuestRegionPrivate<B> {
    type E = GuestMemoryError;

    fn write(&self, buf: &[u8], addr: MemoryRegionAddress) -> GuestResult<usize> {
        let count = self.clamp(addr, buf.len())?;
        Ok(self.checked_slice(addr.0, count)?.write(&buf[..count], 0)?)
    }

    fn read(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> GuestResult<usize> {
        let count = self.clamp(addr, buf.len())?;
        Ok(self
            .checked_slice(addr.0, count)?
            .read(&mut buf[..count], 0)?)
    }

    fn write_slice(&self, buf: &[u8], addr: MemoryRegionAddress) -> GuestResult<()> {
        Ok(self.checked_slice(addr.0, buf.len())?.write_slice(buf, 0)?)
    }

    fn read_slice(&self, buf: &mut [u8], addr: MemoryRegionAddress) -> GuestResult<()> {
        Ok(self.checked_slice(addr.0, buf.len())?.read_slice(buf, 0)?)
    }

    fn read_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> GuestResult<usize> {
        let count = self.clamp(addr, count)?;
        Ok(self
            .checked_slice(addr.0, count)?
            .read_volatile_from(0, src, count)?)
    }

    fn read_exact_volatile_from<F: ReadVolatile>(
        &self,
        addr: MemoryRegionAddress,
        src: &mut F,
        count: usize,
    ) -> GuestResult<()> {
        Ok(self
            .checked_slice(addr.0, count)?
            .read_exact_volatile_from(0, src, count)?)
    }

    fn write_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> GuestResult<usize> {
        let count = self.clamp(addr, count)?;
        Ok(self
            .checked_slice(addr.0, count)?
            .write_volatile_to(0, dst, count)?)
    }

    fn write_all_volatile_to<F: WriteVolatile>(
        &self,
        addr: MemoryRegionAddress,
        dst: &mut F,
        count: usize,
    ) -> GuestResult<()> {
        Ok(self
            .checked_slice(addr.0, count)?
            .write_all_volatile_to(0, dst, count)?)
    }

    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: MemoryRegionAddress,
        order: Ordering,
    ) -> GuestResult<()> {
        Ok(self
            .checked_slice(addr.0, std::mem::size_of::<T>())?
            .store(val, 0, order)?)
    }

    fn load<T: AtomicAccess>(&self, addr: MemoryRegionAddress, order: Ordering) -> GuestResult<T> {
        Ok(self
            .checked_slice(addr.0, std::mem::size_of::<T>())?
            .load(0, order)?)
    }
}
