// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A vhost-user backend's memory table kept equal to the shared pages of confidential
//! guest memory.
//!
//! A vhost-user backend is another process (a rust-vmm `vhost-user-backend` daemon, a
//! virtiofsd, a DPDK switch) that serves virtio queues straight out of guest memory: the
//! frontend (the VMM) hands it file descriptors and offsets, and it maps them. The usual
//! idiom (`SET_MEM_TABLE` with every region's file) would give it the file of private
//! pages too. [`VhostUserMapper`] gives it only the shared side, and follows
//! conversions:
//!
//! - the backend gets the dual strategy's sealed memfd of shared pages, never the
//!   guest_memfd, and only the runs that are shared: its table is one region per shared
//!   run (or part of one);
//! - once a conversion to private returns, the backend no longer maps the page: it can
//!   neither read what the page held nor write to it, which would allocate the page again
//!   on the shared side and hold the guest's memory twice;
//! - a conversion to shared gives the range back.
//!
//! A read-only copy of the page bits in the backend could not give the second point: the
//! backend's check-then-copy races the punch. What does is the frontend revoking the
//! backend's mapping and waiting for the backend to confirm before the punch.
//!
//! # Protocol
//!
//! What the frontend ([`VhostUserMapper`], on the converting thread) sends:
//!
//! 1. **Negotiation** (the VMM): the virtio feature `VHOST_USER_F_PROTOCOL_FEATURES`,
//!    then the protocol features `CONFIGURE_MEM_SLOTS` and `REPLY_ACK`
//!    ([`REQUIRED_PROTOCOL_FEATURES`]). [`VhostUserMapper::new`] checks that both were
//!    acknowledged and that the backend offers them (`GET_PROTOCOL_FEATURES`), reads the
//!    backend's slot count (`GET_MAX_MEM_SLOTS`), and sets `NEED_REPLY` on every
//!    message from then on (and again right before each message of its own). That
//!    flag lives in the header flags the frontend's clones share: the VMM's own
//!    messages on its clones ask for an acknowledgement too from then on, and each
//!    waits for it (with `REPLY_ACK`, the backend answers every message that asks). No
//!    `SET_MEM_TABLE`: the table is built region by region.
//! 2. **Attach** ([`VhostUserMapper::attach`]): `ADD_MEM_REG` for each run shared now
//!    (through `subscribe_with_replay`, so no conversion slips in between), each
//!    acknowledged: `fd` = the region's sealed memfd, `mmap_offset` = the run's offset
//!    in it, `guest_phys_addr` = the run's guest address, `userspace_addr` = the
//!    frontend's host address of the run (the backend translates vring addresses with
//!    it), `memory_size` = the run's length. If the backend stops answering part way,
//!    attach still returns the attachment, broken (the runs after that are not sent):
//!    the VMM checks [`VhostUserAttachment::is_broken`] on what attach returns.
//! 3. **Conversion to shared** (`populate`, after the bits changed): `ADD_MEM_REG` for
//!    the parts of the new runs not in the table. Adjacent regions are not merged, so
//!    adding never removes anything. Over the slot budget it sends nothing and refuses;
//!    if the backend refuses a region, the regions this conversion added are removed
//!    again and the conversion is rolled back. When another listener refuses the
//!    conversion, vm-private-memory takes back what this mapper added (a `discard`, as
//!    in 4); a removal the backend does not acknowledge there keeps those pages shared,
//!    and the conversion's error names them (`RollbackFailed`'s `kept_shared`).
//! 4. **Conversion to private, discard, region removal** (`discard`, before the bits
//!    change): first the budget (removing part of a region leaves up to two parts); over
//!    it, it refuses before any message, which stops the conversion with nothing
//!    changed. Then, for each region overlapping the range: `REM_MEM_REG` of the whole
//!    region (exact guest address and size), waiting for the backend's acknowledgement;
//!    then `ADD_MEM_REG` of the parts that stay shared. A removal that is not
//!    acknowledged (or is refused, or not sent for want of time: see 7) is refused in
//!    turn: the backend may still map the region, so the conversion stops and the range
//!    stays shared. Before it refuses, the parts of the range that earlier removals of
//!    the same `discard` took out are added back (they stay shared too), as long as the
//!    call has time left; one that cannot be is reported by
//!    [`VhostUserAttachment::take_errors`]. A refusal in `discard` is an unwind that
//!    vm-private-memory catches ("cannot let go"), raised with
//!    `std::panic::resume_unwind`: the process's panic hook does not run for it (no
//!    message on stderr, no backtrace, however often a guest causes it), and its message
//!    becomes the conversion's `ListenerRefusal::Panicked`.
//! 5. Only when every removal was acknowledged does `discard` return, and only then does
//!    vm-private-memory punch the page out of the memfd and mark it private.
//! 6. **Detach** ([`VhostUserAttachment::detach`], or dropping the attachment):
//!    `REM_MEM_REG` of every region, each acknowledged, and only then the subscription
//!    goes; a region the backend does not let go keeps it subscribed, so that its pages
//!    cannot turn private unnoticed. `detach` then hands the attachment back
//!    ([`DetachError`]), to try again or to declare the backend exited.
//! 7. **A deadline on the answers** ([`VhostUserMapper::with_reply_timeout`],
//!    [`DEFAULT_REPLY_TIMEOUT`] = 10 s). Each `ADD_MEM_REG` and `REM_MEM_REG` waits for
//!    its acknowledgement at most the timeout from its sending; one that is not answered
//!    by then breaks the backend (below). And each listener call (one call of the
//!    memory's into the mapper: one changed run of a conversion step, revoked or added;
//!    one run added by attach; a detach) sends messages only until the timeout from its
//!    start has passed: a message that would go out later is not sent
//!    ([`Error::OutOfTime`]), which leaves the protocol in step and the backend not
//!    broken, and the call refuses (a revocation stops with the range shared, an
//!    addition is refused, a detach hands the attachment back). So one call holds the
//!    conversion lock for less than twice the timeout, however many messages it needs,
//!    and a backend that answers every message, if slowly, is never broken for it.
//!    vhost's `Frontend` reads a reply until it is whole and retries on `EAGAIN`, so a
//!    receive timeout (`SO_RCVTIMEO`) would only make it wait again: a watchdog thread
//!    of the attachment's shuts the socket down instead, which ends the wait at once.
//!
//! What the backend must guarantee **before it acknowledges a `REM_MEM_REG`** (sends the
//! `REPLY_ACK` with 0): no thread of it accesses the region through the removed mapping
//! any more, now or later. With rust-vmm's `vhost-user-backend`, the daemon replaces its
//! `GuestMemoryAtomic` and calls `VhostUserBackend::update_memory` before it acks, and
//! the old mapping is unmapped once the last snapshot of the old memory is dropped; so
//! the backend's `update_memory` must wait until every worker that may hold a snapshot
//! (a `GuestMemoryLoadGuard`, a cloned `GuestMemoryMmap`, a `VolatileSlice`) has let go
//! of it, for example by taking for writing an `RwLock` that its `handle_event` holds
//! for reading. The daemon does not do this by itself. The backend must not wait for the
//! frontend while doing so (a request on the backend channel that needs a reply would
//! deadlock with the frontend waiting for the ack), and must not keep the memfd's
//! descriptor to map other offsets of it: the descriptor reaches the whole file, and
//! mapping an offset the frontend did not give (or no longer gives) would allocate
//! pages there. The file never holds a private page's content (such pages are punched).
//!
//! One cost of region-granular removal: when a conversion to private splits a region,
//! the parts that stay shared are absent from the backend's table between the removal's
//! acknowledgement and their re-addition. A backend access to them in that window fails
//! like an access to a private page (the backend reports it on the request). Memory
//! slots are limited (`vhost-user-backend` allows 509): a guest that shares memory in
//! many small pieces, or splits runs by converting pages in their middle, gets an error
//! ([`Error::SlotBudget`] on sharing, a refused conversion on splitting), never a
//! half-revoked state. How many slots a given set of shared pages takes depends on the
//! history of conversions, not only on the pages: adjacent regions are never merged (a
//! run shared page by page holds one slot per page until it goes private), while
//! detaching and attaching a new mapper ([`VhostUserMapper::attach`], on the same
//! connection or a new one) adds one region per shared run, the fewest there can be.
//!
//! # A backend that stops answering
//!
//! Once a message goes unanswered (the deadline passes, the connection closes or breaks,
//! or the answer is not the message's), the protocol is out of step: a late answer would
//! be read as the answer to the next message. The mapper then takes the backend as
//! **broken** ([`VhostUserAttachment::is_broken`]): it shuts the socket down in both
//! directions (the VMM's clones of the frontend fail from then on too) and sends nothing
//! more. The unanswered message counts as done where that is the safe side: a region
//! whose `ADD_MEM_REG` went unanswered is kept in the table (the backend may have mapped
//! it), one whose `REM_MEM_REG` went unanswered stays there.
//!
//! An answer can also come when no message asked for it: a buggy backend that
//! acknowledges a message twice leaves the second copy on the socket, where it would be
//! read as the next message's answer (a removal taken as done that the backend never
//! did). So before each message the mapper peeks at the header of what waits on the
//! socket (`recv` with `MSG_PEEK | MSG_DONTWAIT`, which takes nothing off it). A reply to
//! `ADD_MEM_REG` or `REM_MEM_REG` there answers no message (none of the mapper's is out,
//! and the VMM does not send these on this frontend): it breaks the backend the same
//! way, at once, and the message is not sent (a region that was not sent is not counted
//! as mapped). A reply to any other request is left alone: it answers a message of one of
//! the VMM's clones of the frontend (a `GET_CONFIG` at run time, say), whose thread may
//! not have run yet to read it, and vhost's `Frontend` holds the frontend from a
//! message's sending to its reply's reading, so the mapper's message waits for that
//! read (under the reply deadline) and never sleeps on a guess. A reply to another
//! request that nobody reads fails the next message of whoever sends next (vhost checks
//! that a reply names its request), which breaks the backend if that message is the
//! mapper's. A copy that arrives after the look, or waits behind a clone's reply, is not
//! caught. From then on:
//!
//! - a conversion to shared in the attached range is refused ([`Error::Broken`]);
//! - a conversion to private, or a discard, of a range that overlaps the table is
//!   refused in `discard`: the backend may still map it, so the conversion stops, the
//!   range stays shared, and the refusal's message says what to do;
//! - a range with no region of the table goes private as usual;
//! - the conversion to shared whose `ADD_MEM_REG` went unanswered goes on (its pages must
//!   stay shared while the backend may map them), with the error in
//!   [`VhostUserAttachment::take_errors`].
//!
//! The way out is the VMM's: make sure the backend's process is gone (kill it with
//! `SIGKILL` if it still runs, and wait until it has exited), then call
//! [`VhostUserAttachment::backend_exited`], which forgets the table without a message and
//! stops following conversions. It refuses ([`StillRunning`]) while the backend's
//! process is known to run: the pid the VMM gave ([`VhostUserMapper::with_backend_pid`],
//! best: the VMM that spawned the backend knows it), or else the process at the other
//! end of the socket. When the VMM connected, that is the process that made the
//! backend's listening socket, maybe a supervisor (systemd socket activation, a daemon
//! that passed the descriptor), which must not be killed for this: then
//! [`VhostUserAttachment::assume_backend_exited`] takes the VMM's word; when the VMM
//! listened and accepted (Cloud Hypervisor's `vhost_mode=server`), it is the process
//! that connected, usually the backend. What it cannot check is in its documentation. A
//! [`VhostUserAttachment::detach`] that leaves regions hands the attachment back for
//! this ([`DetachError`]). Dropping an attachment of a broken backend lets go of the
//! table only if the VMM gave the backend's pid and that process has exited: the
//! socket's peer may be a supervisor, or a daemon's parent, that exited while the
//! backend runs on. A new backend gets a new attachment ([`VhostUserMapper::new`], then
//! [`VhostUserMapper::attach`], which gives it the runs shared by then).
//!
//! rust-vmm's `vhost-user-backend` daemon ends the connection after any request its
//! handler fails: a removal its `update_memory` refuses is answered (the conversion
//! stops, the range stays shared), but the next message finds the connection closed
//! and breaks the backend.
//!
//! # System calls, by thread
//!
//! For a VMM that confines its threads with seccomp (Cloud Hypervisor's vCPU threads
//! allow `ioctl` only for KVM's, VFIO's and vDPA's numbers, and conversions run on vCPU
//! exits), here is every system call the mapper makes, on which thread. The
//! allocator's own (`brk`, `mmap`, `munmap`, `madvise`, as the allocator has it) come
//! on every thread that builds a table entry or an error message, and `clock_gettime`
//! (`Instant::now`, usually through the vDSO without a system call) on every thread
//! that keeps time.
//!
//! - **The converting thread**, in every listener call (a conversion's `discard` or
//!   `populate`, a region added or removed, a balloon's discard, and the same on the
//!   thread that calls [`VhostUserMapper::attach`] for the runs shared then, or
//!   [`VhostUserAttachment::detach`]): `sendmsg` and `recvmsg` (vhost's `Frontend`:
//!   each `ADD_MEM_REG`, with the memfd as `SCM_RIGHTS`, and `REM_MEM_REG`, and its
//!   acknowledgement), `recvfrom` (libc's `recv` with `MSG_PEEK | MSG_DONTWAIT`: the look
//!   at the socket before each message), `futex` (the mapper's and the frontend's locks,
//!   waking the watchdog), and `shutdown` when the mapper breaks the backend itself (a
//!   stray reply, a lost answer). A refusal is an unwind (`resume_unwind`), with no
//!   system call of its own but `futex`. No `ioctl`.
//! - **The VMM's thread that makes the mapper** ([`VhostUserMapper::new`],
//!   [`VhostUserMapper::with_backend_pid`], [`VhostUserMapper::attach`]): `getsockopt`
//!   (`SO_PEERCRED`, `SO_PEERPIDFD`), `pidfd_open` (a pid given, or on a kernel
//!   without `SO_PEERPIDFD`), `sendmsg` and `recvmsg` (`GET_PROTOCOL_FEATURES`,
//!   `GET_MAX_MEM_SLOTS`), `fcntl` (`F_DUPFD_CLOEXEC`: the watchdog's duplicate of the
//!   socket), `poll` (`Debug`), and what starting the watchdog thread takes (`clone3`
//!   or `clone`, `mmap`, `mprotect`, `rt_sigprocmask`).
//! - **The VMM's thread that asks the attachment** ([`VhostUserAttachment::backend_exited`],
//!   [`VhostUserAttachment::backend_pid`], `Debug`, `Drop`): `poll` on the pidfd, with a
//!   zero timeout (if it fails, the process counts as not known: `backend_exited` then
//!   takes the caller's word); and where the attachment lets go, `close` and `futex`
//!   (joining the watchdog thread).
//! - **The watchdog thread** (`vhost-user-deadline`, one per attachment): `futex` (its
//!   timed wait) and `shutdown` (a reply that is late); at its start what the C library
//!   and Rust's runtime do for a new thread (`rseq`, `set_robust_list`,
//!   `rt_sigprocmask`, `mmap`, `mprotect`, `sigaltstack`, `gettid`,
//!   `sched_getaffinity`, `prctl(PR_SET_NAME)`), at its end `munmap`, `sigaltstack`,
//!   `madvise` and `exit`.
//!
//! # What this does not give
//!
//! - **A security boundary.** The acknowledgement is a correctness protocol with a
//!   cooperating backend. A hostile backend holds the whole memfd and may map any
//!   offset, allocating pages there (memory held twice) or keep a removed mapping. It
//!   never sees a private page's content either way: that content lives in the
//!   guest_memfd, which it never receives.
//! - **Conversions that never wait on the backend.** Each message still waits on the
//!   converting thread, under the memory's conversion lock: a backend that answers
//!   slowly, or not at all, stalls every conversion of the memory (and the vCPUs asking
//!   for them). The deadline is per listener call, not per hold of the lock:
//!   vm-private-memory calls the mapper once per changed run, and one hold of the lock
//!   may change many runs (a guest's request, [`PrivateMemoryManager::serve_request`], up to
//!   [`vm_private_memory::GUEST_RUNS_PER_STEP`] = 1,024 in each of its steps; a VMM's own
//!   [`PrivateMemoryManager::convert`], however many its range holds), and a rollback makes
//!   calls of its own. A backend that stops answering costs one timeout (it is broken
//!   then, and later calls send nothing and return at once); one that answers each
//!   message just inside the timeout can hold the lock for up to twice the timeout per
//!   changed run. Choose the timeout with that in mind. The deadline covers the
//!   mapper's own messages, not the queries of [`VhostUserMapper::new`] nor the VMM's
//!   negotiation.
//!
//!   [`PrivateMemoryManager::serve_request`]: vm_private_memory::PrivateMemoryManager::serve_request
//!   [`PrivateMemoryManager::convert`]: vm_private_memory::PrivateMemoryManager::convert
//! - **Telling a stuck backend from a dead one.** A broken backend keeps the ranges of
//!   its table shared until the VMM calls [`VhostUserAttachment::backend_exited`]: the
//!   mapper never decides by itself that a backend has let go of its mappings.
//! - **Trust in the negotiation.** `acked` is the caller's word, and vhost's `Frontend`
//!   waits for an acknowledgement only if its own record of the features acknowledged
//!   holds `REPLY_ACK` (which it does not let the mapper read): if `REPLY_ACK` was not
//!   really acknowledged on this connection, removals are not waited for. `NEED_REPLY`
//!   lives in the header flags the frontend's clones share; the mapper sets it right
//!   before each message, so a clone that cleared the flags earlier does no harm, but
//!   setting the flag and sending are two calls: a clone that changes the flags on
//!   another thread in between sends that one message without it. Do not change the
//!   header flags of this frontend's clones while conversions run.
//! - **Without unwinding.** A refusal in `discard` is an unwind that vm-private-memory
//!   catches: build with `panic = "unwind"` (a VMM built with `panic = "abort"` would
//!   abort on a refused revocation).
//! - **A queue across a split.** With `vhost-user-backend`, a ring access that fails
//!   ends its worker thread: a ring whose region is split by a conversion may stop.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use guest_memfd::PageRange;
//! use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
//! use vhost::vhost_user::{Frontend, VhostUserFrontend};
//! use vhost::VhostBackend;
//! use vm_private_memory::{MemoryBuilder, PageState, Strategy};
//! use vm_private_memory_vhost_user::{VhostUserMapper, REQUIRED_PROTOCOL_FEATURES};
//!
//! // A TDX or SEV-SNP VM: the dual strategy.
//! // Needs /dev/kvm: without it, the example says so and stops.
//! let Ok(kvm) = kvm_ioctls::Kvm::new() else {
//!     println!("SKIPPED: this example needs /dev/kvm");
//!     return;
//! };
//! let vm = Arc::new(kvm.create_vm().unwrap());
//! let memory = MemoryBuilder::new(vm)
//!     .region_at(0, 1 << 30)
//!     .strategy(Strategy::Dual)
//!     .initial_state(PageState::Private)
//!     .build()
//!     .unwrap();
//!
//! // Connect and negotiate as a VMM does, with the two protocol features the mapper needs.
//! let mut frontend = Frontend::connect("/run/backend.sock", 1).unwrap();
//! let features = frontend.get_features().unwrap();
//! frontend.set_features(features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()).unwrap();
//! let acked = frontend.get_protocol_features().unwrap() & REQUIRED_PROTOCOL_FEATURES;
//! frontend.set_protocol_features(acked).unwrap();
//! frontend.set_owner().unwrap();
//!
//! // Give the backend the shared runs, and follow every conversion from here on. Keep
//! // the attachment for as long as the backend serves the guest.
//! let attachment = VhostUserMapper::new(frontend.clone(), acked, &memory)
//!     .unwrap()
//!     .attach(&memory, PageRange::new(0, 1 << 30).unwrap())
//!     .unwrap();
//!
//! // The guest shares a bounce buffer: the backend maps it before `convert` returns ...
//! let window = PageRange::new(0x10_0000, 0x20_0000).unwrap();
//! memory.convert(window, PageState::Shared).unwrap();
//! assert!(attachment.is_mapped(0x10_0000));
//! // ... then the vrings are set up with the frontend's host addresses (set_vring_addr)
//! // ... and when the guest takes it back, the backend has let go before the punch.
//! memory.convert(window, PageState::Private).unwrap();
//! assert!(!attachment.is_mapped(0x10_0000));
//!
//! // The device goes: its regions are removed before conversions stop being followed.
//! attachment.detach().unwrap();
//! ```

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(clippy::missing_errors_doc, clippy::missing_panics_doc)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "vm-private-memory-vhost-user needs a 64-bit target: it casts host addresses to u64"
);

mod attachment;
mod deadline;
mod error;
mod error_log;
mod exchange;
mod kept;
mod listener;
mod mapper;
mod peer;
mod region;

pub use attachment::VhostUserAttachment;
pub use error::{DetachError, Error, StillRunning};
pub use mapper::{VhostUserMapper, DEFAULT_REPLY_TIMEOUT, MAX_SLOTS, REQUIRED_PROTOCOL_FEATURES};
pub use peer::PidSource;
pub use region::BackendRegion;
