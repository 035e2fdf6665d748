// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `hotplug_and_launch` target's memories under test ([`Subject`], one per
//! configuration, built once per process by [`subjects`]): building one, resetting it
//! to its baseline, and applying an operation ([`Subject::apply`]).

use std::sync::{Arc, Mutex, OnceLock};

use guest_memfd::{GuestMemfd, GuestMemfdFlags, PageRange, SealedMemfd, SharedBacking, PAGE_SIZE};
use vm_private_memory::{
    Error, MemoryBuilder, PageState, PrivateMemoryManager, Strategy, Subscription, GUEST_PHYS_LIMIT,
};

use crate::hotplug_model::{inode, range_of, Backing, Config, Known, Modes, Op, CONFIGS};
use crate::{
    check_all_or_nothing, dual_builder, shared_set, vm, AttributesRecord, Fault, ModelListener,
};

/// Each memory's baseline regions: `(gpa, pages, initial state)`; the last two touch,
/// so that a launch may span regions.
pub(crate) const BASELINE: [(u64, u64, PageState); 3] = [
    (0, 16, PageState::Private),
    (4 << 30, 16, PageState::Shared),
    ((4 << 30) + 16 * PAGE_SIZE, 16, PageState::Shared),
];
/// Pages from 0 whose KVM view the dual memories record: the low 4.5 GiB, where most
/// places the input picks lie.
pub(crate) const WINDOW_PAGES: usize = ((4 << 30) + (512 << 20)) / PAGE_SIZE as usize;
/// Past this end, a memory that binds its own memslots may be refused by KVM (the
/// physical address width: 40 bits on the stand-in for KVM, CPU-dependent on real KVM).
pub(crate) const SURELY_BINDABLE: u64 = 1 << 36;
/// Additions the model accepts are made only up to this many pages (page maps stay
/// cheap); larger ones are tried only where they should be refused.
pub(crate) const MAX_ACCEPTED_PAGES: u64 = 512;
/// Launches look at most this many pages one by one.
pub(crate) const MAX_RANGE_PAGES: u64 = 512;
/// Files the pools keep (newest kept).
pub(crate) const POOL: usize = 6;
/// Operations per input.
pub const OPS: usize = 16;

/// One memory under test.
pub struct Subject {
    pub(crate) config: Config,
    pub(crate) memory: PrivateMemoryManager,
    pub(crate) record: Option<Arc<AttributesRecord>>,
    pub(crate) listeners: [Arc<ModelListener>; 2],
    pub(crate) _subscriptions: Vec<Subscription>,
    pub(crate) files: Vec<GuestMemfd>,
    pub(crate) shared_files: Vec<SharedBacking>,
    pub(crate) known: Vec<Known>,
    pub(crate) modes: Modes,
    /// No `RollbackFailed` since the reset: listeners hold exactly the shared pages.
    pub(crate) exact: bool,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("config", &self.config)
            .field("known", &self.known)
            .field("modes", &self.modes)
            .field("exact", &self.exact)
            .finish_non_exhaustive()
    }
}

/// All of guest-physical space: what the listeners subscribe to.
pub(crate) fn whole_space() -> PageRange {
    PageRange::new(0, GUEST_PHYS_LIMIT).unwrap()
}

/// The memories under test, one per configuration, built on first use.
pub fn subjects() -> &'static Mutex<Vec<Subject>> {
    static SUBJECTS: OnceLock<Mutex<Vec<Subject>>> = OnceLock::new();
    SUBJECTS.get_or_init(|| Mutex::new(CONFIGS.iter().map(|&c| Subject::new(c)).collect()))
}

impl Subject {
    fn new(config: Config) -> Self {
        // A VM of its own: each memory numbers its memslots from 0.
        let (builder, record) = if config.dual {
            let (builder, record) = dual_builder(vm(), 0, WINDOW_PAGES);
            (builder, Some(record))
        } else {
            (MemoryBuilder::new(vm()).strategy(Strategy::InPlace), None)
        };
        let mut builder = builder.initial_state(PageState::Private);
        for (gpa, pages, _) in BASELINE {
            builder = builder.region_at(gpa, pages * PAGE_SIZE);
        }
        if config.hole {
            builder = builder.x86_mmio_hole();
        }
        if config.vmm_binds {
            builder = builder.vmm_binds_memslots();
        }
        if let Some(slots) = config.slots {
            builder = builder.slots(0, slots - 1);
        }
        let memory = builder.build().expect("the target's memory on this host");
        let listeners = [
            Arc::new(ModelListener::default()),
            Arc::new(ModelListener::default()),
        ];
        let subscriptions = listeners
            .iter()
            .map(|l| memory.subscribe(whole_space(), l.clone()))
            .collect();
        Subject {
            config,
            memory,
            record,
            listeners,
            _subscriptions: subscriptions,
            files: Vec::new(),
            shared_files: Vec::new(),
            known: Vec::new(),
            modes: Modes::default(),
            exact: true,
        }
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "{} memory (memslots bound by {}, hole: {}, slots: {:?})",
            self.memory.strategy(),
            if self.config.vmm_binds {
                "the VMM"
            } else {
                "the memory"
            },
            self.config.hole,
            self.config.slots
        )
    }

    fn set_modes(&mut self, modes: Modes) {
        // A listener's refusal of a VMM-bound addition leaks it for good (by design).
        let modes = if self.config.vmm_binds {
            Modes::default()
        } else {
            modes
        };
        let fault = |on: bool| if on { Fault::From(0) } else { Fault::Never };
        for (i, l) in self.listeners.iter().enumerate() {
            l.arm(fault(modes.refuse[i]), fault(modes.panic[i]));
        }
        self.modes = modes;
    }

    /// Removes a region: `remove_region`, or on VMM-bound memory `remove_unbound_region`.
    pub(crate) fn remove(&self, start: u64) -> Result<(PageRange, GuestMemfd, u64), Error> {
        if self.config.vmm_binds {
            // SAFETY: this target never binds the memslots `memslots()` describes, so
            // none of this region's is bound in the VM, now or later.
            unsafe { self.memory.remove_unbound_region(start) }
        } else {
            self.memory.remove_region(start)
        }
    }

    /// Back to the baseline: its two regions only, the first private, the second shared.
    pub fn reset(&mut self) {
        self.set_modes(Modes::default());
        let baseline: Vec<PageRange> = BASELINE
            .iter()
            .map(|&(gpa, pages, _)| PageRange::new(gpa, pages * PAGE_SIZE).unwrap())
            .collect();
        for region in self.memory.regions() {
            if !baseline.contains(&region) {
                self.remove(region.start()).unwrap_or_else(|e| {
                    panic!("{}: reset, removing {region}: {e}", self.describe())
                });
            }
        }
        for (&(_, _, initial), &range) in BASELINE.iter().zip(&baseline) {
            if !self.memory.regions().contains(&range) {
                self.memory
                    .add_region(range, None, initial)
                    .unwrap_or_else(|e| panic!("{}: reset, adding {range}: {e}", self.describe()));
            }
            self.memory
                .convert(range, initial)
                .unwrap_or_else(|e| panic!("{}: reset, converting {range}: {e}", self.describe()));
        }
        assert_eq!(
            self.memory.regions(),
            baseline,
            "{}: reset",
            self.describe()
        );
        self.known = baseline.iter().map(|r| self.known_of(*r, None)).collect();
        self.files.clear();
        self.shared_files.clear();
        let shared = shared_set(&self.memory);
        for l in &self.listeners {
            l.set_held(shared.clone());
        }
        self.exact = true;
    }

    pub(crate) fn known_of(
        &self,
        guest: PageRange,
        side: Option<((u64, u64), PageRange)>,
    ) -> Known {
        let b = self
            .memory
            .backing(guest.start())
            .unwrap_or_else(|e| panic!("{}: backing({guest}): {e}", self.describe()));
        assert_eq!(b.guest, guest, "{}: backing of {guest}", self.describe());
        Known {
            guest,
            inode: b.gmem_inode,
            offset: b.gmem_offset,
            size: b.gmem_size,
            side,
        }
    }

    fn region(&self, index: u8) -> Option<&Known> {
        self.known.get(usize::from(index) % self.known.len().max(1))
    }

    /// The guest_memfd and offset `backing` names, if the pool has that file.
    pub(crate) fn pick_file(&self, backing: Backing) -> Option<(GuestMemfd, u64)> {
        let (file, offset) = match backing {
            Backing::Pool { file, offset } => {
                let file = self
                    .files
                    .get(usize::from(file) % self.files.len().max(1))?;
                (file, offset.get(file.size(), &self.known))
            }
            Backing::OfRegion { region, delta } => {
                let region = self.region(region)?;
                let file = self
                    .files
                    .iter()
                    .find(|f| inode(f.file()).1 == region.inode)?;
                let delta = (i64::from(delta) * PAGE_SIZE as i64) as u64;
                (file, region.offset.wrapping_add(delta))
            }
        };
        Some((file.clone(), offset))
    }

    /// The shared file and offset `backing` names, if the pool has that file.
    pub(crate) fn pick_shared(&self, backing: Backing) -> Option<(SharedBacking, u64)> {
        let files = &self.shared_files;
        let (file, offset) = match backing {
            Backing::Pool { file, offset } => {
                let file = files.get(usize::from(file) % files.len().max(1))?;
                (file, offset.get(file.size(), &self.known))
            }
            Backing::OfRegion { region, delta } => {
                let (id, range) = self.region(region)?.side?;
                let file = files.iter().find(|f| inode(f.file()) == id)?;
                let delta = (i64::from(delta) * PAGE_SIZE as i64) as u64;
                (file, range.start().wrapping_add(delta))
            }
        };
        Some((file.clone(), offset))
    }

    /// Applies `op` and checks the invariants that hold after every operation.
    pub fn apply(&mut self, op: Op) {
        let what = format!("{}, {op:?}", self.describe());
        match op {
            Op::NewFile { size, flags } => {
                let pages = size.pages().clamp(1, MAX_ACCEPTED_PAGES);
                let flags = [
                    GuestMemfdFlags::empty(),
                    GuestMemfdFlags::MMAP,
                    GuestMemfdFlags::INIT_SHARED,
                    GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
                ][usize::from(flags % 4)];
                // A host without one of the flags cannot make this file: nothing to try.
                if let Ok(file) = GuestMemfd::create(&**self.memory.vm(), pages * PAGE_SIZE, flags)
                {
                    self.pool_push(file);
                }
            }
            Op::NewSharedFile { size } => {
                let pages = size.pages().clamp(1, MAX_ACCEPTED_PAGES);
                let file =
                    SealedMemfd::create("fuzz-shared", pages * PAGE_SIZE).expect("a sealed memfd");
                if self.shared_files.len() == POOL {
                    self.shared_files.remove(0);
                }
                self.shared_files.push(SharedBacking::from(file));
            }
            Op::Add {
                at,
                size,
                backing,
                shared,
            } => self.add(&what, at, size, backing, None, shared),
            Op::AddWithShared {
                at,
                size,
                backing,
                side,
                shared,
            } => self.add(&what, at, size, backing, Some(side), shared),
            Op::Remove { at, unbound } => self.remove_op(&what, at.gpa(&self.known), unbound),
            Op::Convert { at, size, private } => {
                let Some(range) = range_of(at.gpa(&self.known), size) else {
                    return;
                };
                let to = if private {
                    PageState::Private
                } else {
                    PageState::Shared
                };
                let before = self.snapshot(Some(range));
                let result = self.memory.convert(range, to);
                let after = self.snapshot(Some(range));
                self.note(result.as_ref().err());
                check_all_or_nothing(
                    &what,
                    Some(range),
                    to,
                    &before.pages,
                    &after.pages,
                    result.as_ref().map(drop),
                );
                assert_eq!(after.regions, before.regions, "{what}: regions changed");
            }
            Op::Listeners { refuse, panic } => self.set_modes(Modes { refuse, panic }),
            Op::Launch {
                at,
                size,
                fill,
                steps,
            } => {
                let Some(range) = range_of(at.gpa(&self.known), size) else {
                    return;
                };
                if range.page_count() <= MAX_RANGE_PAGES {
                    self.launch(&what, range, fill, steps);
                }
            }
        }
        self.check(&what);
    }

    pub(crate) fn pool_push(&mut self, file: GuestMemfd) {
        if self.files.len() == POOL {
            self.files.remove(0);
        }
        self.files.push(file);
    }

    /// Notes what an error says of the listeners' view.
    pub(crate) fn note(&mut self, error: Option<&Error>) {
        if matches!(error, Some(Error::RollbackFailed { .. })) {
            self.exact = false;
        }
    }
}
