// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest memory for the tests that watches one address: it counts the lookups that
//! start there and can refuse them from a chosen one on. A status byte writable when a
//! request starts and refused when it ends is what a page turning private meanwhile
//! does; the count tells how often the device looked a buffer up.

use std::cell::Cell;
use std::rc::Rc;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryResult, Permissions,
};

use crate::linux::virtio::test_driver::RAM_SIZE;

/// Anonymous RAM of [`RAM_SIZE`] bytes at 0, with one watched address.
#[derive(Debug)]
pub(super) struct FlakyMemory {
    ram: GuestMemoryMmap,
    watched: Cell<Option<GuestAddress>>,
    /// Lookups of the watched address since it was chosen.
    lookups: Cell<usize>,
    /// How many lookups of it succeed before the rest are refused (`None`: all do).
    allowed: Cell<Option<usize>>,
}

impl FlakyMemory {
    /// Fresh zeroed memory, nothing watched.
    pub fn new() -> Rc<Self> {
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)])
            .expect("anonymous guest memory");
        Rc::new(FlakyMemory {
            ram,
            watched: Cell::new(None),
            lookups: Cell::new(0),
            allowed: Cell::new(None),
        })
    }

    /// Watches `addr` from now on, counting from zero; after `allowed` lookups (if
    /// given), the next ones are refused.
    pub fn watch(&self, addr: u64, allowed: Option<usize>) {
        self.watched.set(Some(GuestAddress(addr)));
        self.lookups.set(0);
        self.allowed.set(allowed);
    }

    /// Stops watching: every lookup succeeds again.
    pub fn unwatch(&self) {
        self.watched.set(None);
        self.allowed.set(None);
    }

    /// The lookups of the watched address since [`FlakyMemory::watch`].
    pub fn lookups(&self) -> usize {
        self.lookups.get()
    }
}

impl GuestMemory for FlakyMemory {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        GuestMemory::check_range(&self.ram, addr, count, access)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        if self.watched.get() == Some(addr) {
            let lookup = self.lookups.get();
            self.lookups.set(lookup + 1);
            if self.allowed.get().is_some_and(|allowed| lookup >= allowed) {
                return Err(GuestMemoryError::InvalidGuestAddress(addr));
            }
        }
        GuestMemory::get_slices(&self.ram, addr, count, access)
    }
}
