// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Hotplug arguments (`add_region`, `add_region_with_shared`, `remove_region`,
//! `remove_unbound_region`) and launch population (`launch_private`) with arbitrary
//! arguments, on four memories (one VM each, built once per process):
//!
//! | memory | strategy | memslots bound by | `.x86_mmio_hole()` | memslot numbers |
//! |---|---|---|---|---|
//! | 0 | in-place | the memory | yes | all the host's |
//! | 1 | in-place | the VMM | no | 0..=5 |
//! | 2 | dual | the memory | no | 0..=5 |
//! | 3 | dual | the VMM | yes | all the host's |
//!
//! Each input picks one memory and starts it from its baseline: a private region of 16
//! pages at 0 and two shared ones of 16 pages at 4 GiB, touching (a launch may span
//! them), nothing else; then it runs up to 16 operations: create a guest_memfd (flags
//! none, `MMAP`, `INIT_SHARED` or both) or a sealed memfd for shared sides, add a region
//! (anywhere: over other regions, in and around the MMIO hole, at and past
//! `GUEST_PHYS_LIMIT`, past the physical address width; on a file of the pool, a new one,
//! or a removed region's file, at any offset, also ones past the file's end or over
//! another region's bytes), remove one (at a region's start or not;
//! `remove_unbound_region` on the VMM-bound memories, whose slots this target never
//! binds), convert a range, set the faults of the two listeners subscribed over all of
//! guest-physical space (refuse every `populate`, panic in every `discard`; on memories
//! that bind their own memslots only, since an addition a listener refuses after a
//! VMM-bound region was listed is leaked for good, by design), or launch a range.
//!
//! The model of an addition (`hotplug_model::expect_add`) is the list of rules the crate documents:
//! inside `GUEST_PHYS_LIMIT`, clear of reserved ranges and regions, a guest_memfd whose
//! flags fit the strategy (in place: `MMAP | INIT_SHARED`; dual: neither), a file range
//! inside the file and backing no live region, a shared-side range inside its file and
//! used by no other region (dual only), a free memslot number; then what the listeners'
//! faults make of a shared addition. Memory that binds its own memslots may also be
//! refused by KVM past the address width (taken as above 64 GiB here).
//!
//! Invariants, after every operation:
//! - no panic; a call the model refuses is refused, for one of the rules it found broken;
//!   one it accepts is accepted (additions: below 64 GiB or VMM-bound);
//! - a refused call changes nothing: `regions()`, `state()` (layout, files, offsets, the
//!   map), the state of every page of every region and, by `state_of`, of the range asked
//!   for and around it, `memslots()` on VMM-bound memory;
//! - an accepted addition has the pages, file, offset (and memslot) it was given; a new
//!   file when none was given; a removal hands back the region's file and offset;
//! - regions are in order, apart, inside `GUEST_PHYS_LIMIT` and clear of the hole; no two
//!   share bytes of a guest_memfd (`backing()`'s `gmem_inode`, offsets, sizes), each lies
//!   inside its file; VMM-bound memory describes one memslot per region, numbers apart
//!   and inside the builder's range; memory that binds its own hands out none;
//! - listeners hold only shared pages, and (until a `RollbackFailed`) all of them; dual:
//!   what the memory told KVM (the attribute stand-in) is each page's state.
//!
//! Launch: the step, driven by the input, checks what it is given (a piece of one region
//! inside the range, in order, private in the bits and in KVM's view, its content at
//! `host_address` the bytes written there before), calls back into the memory (convert,
//! discard, add, remove, `subscribe_with_replay`, `launch_private`, a guest request,
//! `restore_state`: each must fail with `Error::Reentrant`; `state()` must answer, with the
//! pieces private), then succeeds or fails. On `Ok` every page of the range is private,
//! in KVM's view too, and every step succeeded; an error before any step (in-place memory,
//! a range outside memory or with a private page, a listener that cannot let go) changes
//! nothing; a failed step rolls the launch back, the pages shared with their content;
//! only `RollbackFailed` may leave pages changed, inside what it names.

//!
//! The parts live in the fuzz crate: `hotplug_model` (the rules and the input's shapes),
//! `hotplug_subject` (the memories, their baseline, one operation), `hotplug_calls`
//! (additions and removals against the model), `launch_script` (the launch and its
//! steps), `hotplug_invariants` (what holds after every operation).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_private_memory_fuzz::hotplug_model::Op;
use vm_private_memory_fuzz::hotplug_subject::{subjects, OPS};

#[derive(Arbitrary, Debug)]
struct Input {
    memory: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mut subjects = subjects().lock().unwrap_or_else(|p| p.into_inner());
    let count = subjects.len();
    let subject = &mut subjects[usize::from(input.memory) % count];
    subject.reset();
    subject.check("after reset");
    for op in input.ops.into_iter().take(OPS) {
        subject.apply(op);
    }
});
