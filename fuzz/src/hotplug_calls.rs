// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `hotplug_and_launch` target's hotplug calls: an addition (`add_region`,
//! `add_region_with_shared`) checked against the model of the rules
//! (`hotplug_model::expect_add`), and a removal (`remove_region`,
//! `remove_unbound_region`) checked against the listeners' modes.

use guest_memfd::PageRange;
use vm_private_memory::{Error, PageState};

use crate::hotplug_model::{
    expect_add, inode, listeners_on_add, range_of, why, Backing, Outcome, Place, Size,
};
use crate::hotplug_subject::{Subject, MAX_ACCEPTED_PAGES, SURELY_BINDABLE};
use crate::{page_map, pages_of, shared_set};

impl Subject {
    /// Adds a region as the input says and checks the result against the model.
    pub(crate) fn add(
        &mut self,
        what: &str,
        at: Place,
        size: Size,
        backing: Option<Backing>,
        side: Option<Backing>,
        shared: bool,
    ) {
        let Some(guest) = range_of(at.gpa(&self.known), size) else {
            return;
        };
        let initial = if shared {
            PageState::Shared
        } else {
            PageState::Private
        };
        let file = backing.and_then(|b| self.pick_file(b));
        let side_file = match side {
            Some(b) => match self.pick_shared(b) {
                Some(picked) => Some(picked),
                // No such shared file: nothing to try.
                None => return,
            },
            None => None,
        };
        let broken = expect_add(
            &self.config,
            &self.known,
            guest,
            file.as_ref().map(|(f, o)| (f, *o)),
            side_file.as_ref().map(|(f, o)| (f, *o)),
        );
        if broken.is_empty() && guest.page_count() > MAX_ACCEPTED_PAGES {
            return;
        }
        let what = format!(
            "{what} (region {guest}, file at {:?})",
            file.as_ref().map(|f| f.1)
        );
        let before = self.snapshot(Some(guest));
        let file_id = file.as_ref().map(|(f, _)| inode(f.file()));
        let side_id = side_file
            .as_ref()
            .and_then(|(f, o)| Some((inode(f.file()), PageRange::new(*o, guest.len()).ok()?)));
        let result = match side_file {
            Some((shared_file, offset)) => self.memory.add_region_with_shared(
                guest,
                file.clone(),
                shared_file,
                offset,
                initial,
            ),
            None => self.memory.add_region(guest, file.clone(), initial),
        };
        self.note(result.as_ref().err());
        if !broken.is_empty() {
            match &result {
                Err(e) if why(e).is_some_and(|w| broken.contains(&w)) => {}
                other => panic!("{what}: breaks {broken:?}, got {other:?}"),
            }
            self.check_unchanged(&what, &before, Some(guest));
            return;
        }
        let outcome = listeners_on_add(self.modes, initial);
        match (&result, outcome) {
            (Ok(()), Outcome::Added) => {}
            (Err(Error::File(_)), _) if !self.config.vmm_binds && guest.end() > SURELY_BINDABLE => {
                // KVM refused the memslot past its address width.
                self.check_unchanged(&what, &before, Some(guest));
                return;
            }
            (Err(Error::ListenerRefused { .. }), Outcome::Refused) => {
                self.check_unchanged(&what, &before, Some(guest));
                return;
            }
            (
                Err(Error::RollbackFailed {
                    cause, kept_shared, ..
                }),
                Outcome::Kept,
            ) if matches!(**cause, Error::ListenerRefused { .. }) => {
                let named: Vec<_> = kept_shared.iter().map(|r| (r.start, r.len)).collect();
                assert_eq!(named, [(guest.start(), guest.len())], "{what}: kept_shared");
            }
            (other, outcome) => panic!("{what}: expected {outcome:?}, got {other:?}"),
        }
        // The region is in: with the file, offset and pages it was given.
        let known = self.known_of(guest, side_id);
        match (&file, file_id) {
            (Some((f, offset)), Some((_, ino))) => {
                assert_eq!(
                    (known.inode, known.offset, known.size),
                    (ino, *offset, f.size()),
                    "{what}: backing"
                );
            }
            _ => {
                assert_eq!(
                    (known.offset, known.size),
                    (0, guest.len()),
                    "{what}: new file"
                );
                let others = self.known.iter().map(|k| k.inode);
                let pool = self.files.iter().map(|f| inode(f.file()).1);
                assert!(
                    !others.chain(pool).any(|i| i == known.inode),
                    "{what}: the new file is not new (inode {})",
                    known.inode
                );
            }
        }
        let expected = match outcome {
            Outcome::Kept => PageState::Shared,
            _ => initial,
        };
        for (gpa, state) in page_map(&self.memory, pages_of(&[guest])) {
            assert_eq!(
                state,
                Some(expected),
                "{what}: page {gpa:#x} of the new region"
            );
        }
        let after = self.snapshot(Some(guest));
        let old: Vec<_> = before
            .pages
            .iter()
            .filter(|(gpa, _)| !guest.contains_addr(*gpa))
            .collect();
        let new: Vec<_> = after
            .pages
            .iter()
            .filter(|(gpa, _)| !guest.contains_addr(*gpa))
            .collect();
        assert_eq!(new, old, "{what}: other pages changed");
        if let (Some(old), Some(new)) = (&before.memslots, &after.memslots) {
            let added: Vec<_> = new.iter().filter(|s| !old.contains(s)).collect();
            assert!(
                old.iter().all(|s| new.contains(s)) && added.len() == 1,
                "{what}: memslots before {old:?}, after {new:?}"
            );
            let slot = added[0];
            assert_eq!(
                (
                    slot.guest_phys_addr,
                    slot.memory_size,
                    slot.guest_memfd_offset
                ),
                (guest.start(), guest.len(), known.offset),
                "{what}: the new region's memslot"
            );
        }
        let at = self
            .known
            .partition_point(|k| k.guest.start() < guest.start());
        self.known.insert(at, known);
    }

    /// Removes the region at `gpa` (if any) and checks the result.
    pub(crate) fn remove_op(&mut self, what: &str, gpa: u64, unbound: bool) {
        let index = self.known.iter().position(|k| k.guest.start() == gpa);
        let before = self.snapshot(None);
        if self.config.vmm_binds {
            let refused = self.memory.remove_region(gpa);
            assert!(
                matches!(refused, Err(Error::VmmBindsMemslots { .. })),
                "{what}: remove_region of VMM-bound memory gave {refused:?}"
            );
            self.check_unchanged(what, &before, None);
            if !unbound {
                return;
            }
        }
        let result = self.remove(gpa);
        self.note(result.as_ref().err());
        let Some(index) = index else {
            assert!(
                matches!(result, Err(Error::NoSuchRegion(_))),
                "{what}: no region starts at {gpa:#x}, got {result:?}"
            );
            self.check_unchanged(what, &before, None);
            return;
        };
        let known = self.known[index].clone();
        let shared = shared_set(&self.memory);
        let tells = shared.intersects(known.guest);
        let m = self.modes;
        // Told in order: the first listener, then the second; one that could not let go
        // stops the removal, and the first takes its pages back (or refuses them).
        let stopped = tells && (m.panic[0] || m.panic[1]);
        let refused_back = tells && !m.panic[0] && m.panic[1] && m.refuse[0];
        match result {
            Err(Error::ListenerRefused { .. }) if stopped && !refused_back => {
                self.check_unchanged(what, &before, None);
            }
            Err(Error::RollbackFailed {
                cause,
                listeners_refused,
                kept_shared,
                kept_private,
                ..
            }) if refused_back => {
                assert!(
                    matches!(*cause, Error::ListenerRefused { .. })
                        && !listeners_refused.is_empty()
                        && kept_shared.is_empty()
                        && kept_private.is_empty(),
                    "{what}: {cause}"
                );
                self.check_unchanged(what, &before, None);
            }
            Ok((guest, gmem, offset)) if !stopped => {
                assert_eq!(guest, known.guest, "{what}: the range handed back");
                assert_eq!(
                    (inode(gmem.file()).1, offset, gmem.size()),
                    (known.inode, known.offset, known.size),
                    "{what}: the file handed back"
                );
                self.known.remove(index);
                let after = self.snapshot(None);
                let old: Vec<_> = before
                    .pages
                    .iter()
                    .filter(|(gpa, _)| !guest.contains_addr(*gpa))
                    .collect();
                assert_eq!(after.pages.iter().collect::<Vec<_>>(), old, "{what}: pages");
                if let (Some(old), Some(new)) = (&before.memslots, &after.memslots) {
                    let gone: Vec<_> = old.iter().filter(|s| !new.contains(s)).collect();
                    assert!(
                        new.iter().all(|s| old.contains(s))
                            && gone.len() == 1
                            && gone[0].guest_phys_addr == guest.start(),
                        "{what}: memslots before {old:?}, after {new:?}"
                    );
                }
                self.pool_push(gmem);
            }
            other => panic!(
                "{what}: removing {} (shared pages: {tells}, listeners {m:?}) gave {other:?}",
                known.guest
            ),
        }
    }
}
