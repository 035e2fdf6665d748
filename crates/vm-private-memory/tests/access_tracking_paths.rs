// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The less travelled paths of the host access tracker: an access made from a
//! thread-local destructor after its thread gave its slot back, accesses past a thread's
//! eight entries (the spill), and a conversion whose barrier the kernel refuses. Each
//! runs on whatever VM the logic tests get (the stand-in where the host lacks in-place
//! guest_memfd): the tracker is userspace.

mod common;

use std::cell::RefCell;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::{pr, vm};
use guest_memfd::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vm_private_memory::{
    Error, MemoryBuilder, PageState, PrivateMemoryManager, Strategy, KVM_EFAULT,
};

const SIZE: u64 = 4 << 20;
const PAGE: u64 = 1 << 20;

/// One test of this file at a time: an access counted without a slot holds every
/// conversion to private of the process, whatever its pages, while it lasts.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn shared_memory(patience: Duration) -> Arc<PrivateMemoryManager> {
    Arc::new(
        MemoryBuilder::new(vm())
            .region_at(0, SIZE)
            .strategy(Strategy::InPlace)
            .initial_state(PageState::Shared)
            .access_patience(patience)
            .build()
            .unwrap(),
    )
}

/// Takes a slice of `PAGE` in its destructor, says so, and holds it until told.
struct LateAccess {
    memory: Arc<PrivateMemoryManager>,
    taken: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}

impl Drop for LateAccess {
    fn drop(&mut self) {
        let view = self.memory.guest_memory();
        let mem = view.memory();
        let slice = mem.get_slice(GuestAddress(PAGE), 8).unwrap();
        self.taken.send(()).unwrap();
        self.release.recv().unwrap();
        slice.write_obj(1u64, 0).unwrap();
    }
}

thread_local! {
    static LATE: RefCell<Option<LateAccess>> = const { RefCell::new(None) };
}

#[test]
fn an_access_from_a_thread_local_destructor_after_the_slot_went_is_waited_for() {
    let _one = one_at_a_time();
    let memory = shared_memory(Duration::from_millis(50));
    let (taken_tx, taken_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let m = Arc::clone(&memory);
    let thread = std::thread::spawn(move || {
        LATE.with(|late| {
            *late.borrow_mut() = Some(LateAccess {
                memory: Arc::clone(&m),
                taken: taken_tx,
                release: release_rx,
            })
        });
        // The thread's first access registers its slot, whose owner is destroyed before
        // LATE (thread-locals go in reverse order of first use).
        m.guest_memory()
            .memory()
            .read_obj::<u64>(GuestAddress(0))
            .unwrap();
    });
    taken_rx.recv().unwrap();
    let refused = memory.convert(pr(PAGE, PAGE_SIZE), PageState::Private);
    assert!(
        matches!(refused, Err(Error::HostAccessInFlight { .. })),
        "{refused:?}"
    );
    assert_eq!(memory.state_of(PAGE), Some(PageState::Shared));
    // Counted without a slot (its slot went with the thread's other thread-locals), the
    // access holds conversions of any page, not only its own.
    let elsewhere = memory.convert(pr(2 * PAGE, PAGE_SIZE), PageState::Private);
    assert!(
        matches!(elsewhere, Err(Error::HostAccessInFlight { .. })),
        "the late access was not counted without a slot: {elsewhere:?}"
    );
    release_tx.send(()).unwrap();
    thread.join().unwrap();
    memory
        .convert(pr(PAGE, PAGE_SIZE), PageState::Private)
        .unwrap();
}

#[test]
fn accesses_past_a_thread_s_entries_hold_their_pages_until_the_last_goes() {
    let _one = one_at_a_time();
    let memory = shared_memory(Duration::from_millis(20));
    let view = memory.guest_memory();
    let mem = view.memory();
    // Eight slices of page 0 fill the thread's entries.
    let entries: Vec<_> = (0..8)
        .map(|i| mem.get_slice(GuestAddress(i * 8), 8).unwrap())
        .collect();
    // Past them: a slice of PAGE, a sub-slice and a clone of that, and a slice of the
    // page after PAGE, all in the spill.
    let a = mem.get_slice(GuestAddress(PAGE), 64).unwrap();
    let sub = a.subslice(8, 8).unwrap();
    let clone = sub.clone();
    let b = mem.get_slice(GuestAddress(PAGE + PAGE_SIZE), 8).unwrap();
    let busy = |memory: &PrivateMemoryManager| {
        matches!(
            memory.convert(pr(PAGE, PAGE_SIZE), PageState::Private),
            Err(Error::HostAccessInFlight { .. })
        )
    };
    drop(a);
    assert!(
        busy(&memory),
        "PAGE released with the slice it was published for"
    );
    drop(b);
    assert!(busy(&memory), "PAGE released with another spilled slice");
    drop(sub);
    assert!(
        busy(&memory),
        "PAGE released while a clone of the sub-slice is held"
    );
    drop(entries);
    assert!(busy(&memory), "PAGE released with the thread's entries");
    drop(clone);
    memory
        .convert(pr(PAGE, PAGE_SIZE), PageState::Private)
        .unwrap();
}

/// Installs, on the calling thread only, a seccomp filter that answers `membarrier`
/// with `EPERM` (as a VMM's filter that does not allow it would) and allows the rest.
fn refuse_membarrier_on_this_thread() {
    let filter = [
        // seccomp_data.nr
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_membarrier as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl takes integers here; PR_SET_NO_NEW_PRIVS changes only this thread's
    // (and its children's) privileges, which the filter below requires.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `program` points to `filter`, both alive for the call, which copies them;
    // without SECCOMP_FILTER_FLAG_TSYNC the filter applies to this thread only.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            std::ptr::from_ref(&program),
        )
    };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
}

/// Whether the kernel offers `MEMBARRIER_CMD_PRIVATE_EXPEDITED`, the barrier whose
/// failure this tests (without it both sides use full fences, which cannot fail).
fn private_expedited_membarrier() -> bool {
    // SAFETY: membarrier takes integers only; QUERY changes nothing.
    let commands = unsafe { libc::syscall(libc::SYS_membarrier, libc::MEMBARRIER_CMD_QUERY, 0, 0) };
    commands > 0 && commands & i64::from(libc::MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0
}

#[test]
fn a_conversion_whose_barrier_the_kernel_refuses_is_rolled_back() {
    if !private_expedited_membarrier() {
        println!(
            "SKIPPED a_conversion_whose_barrier_the_kernel_refuses_is_rolled_back: \
             membarrier(MEMBARRIER_CMD_QUERY) offers no PRIVATE_EXPEDITED here"
        );
        return;
    }
    let _one = one_at_a_time();
    let memory = shared_memory(Duration::from_millis(20));
    // This thread owns a slot (and stays alive): a conversion on another thread then
    // needs the barrier.
    memory
        .guest_memory()
        .memory()
        .write_obj(7u64, GuestAddress(PAGE))
        .unwrap();
    let m = Arc::clone(&memory);
    let refused = std::thread::spawn(move || {
        refuse_membarrier_on_this_thread();
        m.convert(pr(PAGE, PAGE_SIZE), PageState::Private)
    })
    .join()
    .unwrap();
    let err = refused.expect_err("converted without its barrier");
    assert_eq!(err.errno(), Some(libc::EPERM), "{err}");
    // A refusal that will not pass: a guest's request is answered as failed, not
    // "retry".
    assert_eq!(err.hypercall_code(), KVM_EFAULT.wrapping_neg(), "{err}");
    match err {
        Error::HostAccessBarrier { range, .. } => assert_eq!(range.start, PAGE),
        other => panic!("not refused for its barrier: {other}"),
    }
    // Nothing changed: the page is shared, with its content.
    assert_eq!(memory.state_of(PAGE), Some(PageState::Shared));
    let view = memory.guest_memory();
    assert_eq!(
        view.memory().read_obj::<u64>(GuestAddress(PAGE)).unwrap(),
        7
    );
    // With the barrier allowed, the same conversion goes through.
    memory
        .convert(pr(PAGE, PAGE_SIZE), PageState::Private)
        .unwrap();
}
