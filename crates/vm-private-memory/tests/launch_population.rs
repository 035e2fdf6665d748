// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Launch population (`launch_private`) on dual-strategy memory of a real VM, with KVM's
//! attribute call stood in: the vendor call (`SNP_LAUNCH_UPDATE`, TDX's
//! `KVM_TDX_INIT_MEM_REGION`) is a recording step, since our hosts have none.

mod common;

use std::sync::{Arc, Mutex};

use common::{dual, in_place, pr, shared_side_bytes, Heard, Recorder};
use guest_memfd::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{Error, LaunchSource, PageState, UnavailableReason};

const SIZE: u64 = 2 << 20;

fn image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn a_launch_populates_from_intact_shared_content_and_leaves_the_pages_private() {
    let (m, vm) = dual(SIZE, PageState::Shared);
    let listener = Arc::new(Recorder::default());
    let _s = m.subscribe(pr(0, SIZE), listener.clone());
    let range = pr(4 * PAGE_SIZE, 4 * PAGE_SIZE);
    let content = image(range.len() as usize);
    m.guest_memory()
        .memory()
        .write_slice(&content, GuestAddress(range.start()))
        .unwrap();
    let held_before = shared_side_bytes(&m);

    let seen: Mutex<Vec<(LaunchSource, Vec<u8>, PageState)>> = Mutex::default();
    m.launch_private(range, |source| {
        // SAFETY: `host_address` is the shared side's mapping of `source.guest`, which the
        // memory keeps mapped; the launch holds the content intact while the step runs.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                source.host_address as *const u8,
                source.guest.len() as usize,
            )
        }
        .to_vec();
        let kvm_view = vm.calls.lock().unwrap().last().unwrap().1;
        seen.lock().unwrap().push((source, bytes, kvm_view));
        Ok(())
    })
    .unwrap();

    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 1);
    let (source, bytes, kvm_view) = &seen[0];
    assert_eq!(source.guest, range);
    assert_eq!(bytes, &content, "the step read the content the VMM wrote");
    assert_eq!(
        *kvm_view,
        PageState::Private,
        "KVM's view was private for the step"
    );
    // Listeners let go first; the pages are private now and the shared side freed.
    assert_eq!(listener.heard.lock().unwrap()[..], [Heard::Discard(range)]);
    assert_eq!(m.state_of(range.start()), Some(PageState::Private));
    assert!(m
        .guest_memory()
        .memory()
        .read_obj::<u8>(GuestAddress(range.start()))
        .is_err());
    assert_eq!(shared_side_bytes(&m), held_before - range.len());
}

#[test]
fn a_refused_launch_step_rolls_back_with_the_content_intact() {
    let (m, vm) = dual(SIZE, PageState::Shared);
    let range = pr(0, 2 * PAGE_SIZE);
    let content = image(range.len() as usize);
    m.guest_memory()
        .memory()
        .write_slice(&content, GuestAddress(0))
        .unwrap();
    let err = m
        .launch_private(range, |_| Err("SNP_LAUNCH_UPDATE: EINVAL".into()))
        .unwrap_err();
    match &err {
        Error::LaunchStep { range: r, source } => {
            assert_eq!((r.start, r.len), (0, range.len()));
            assert!(source.to_string().contains("SNP_LAUNCH_UPDATE"));
        }
        other => panic!("{other}"),
    }
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    assert_eq!(
        vm.calls.lock().unwrap().last(),
        Some(&(range, PageState::Shared)),
        "KVM's view went back to shared"
    );
    let mut back = vec![0u8; content.len()];
    m.guest_memory()
        .memory()
        .read_slice(&mut back, GuestAddress(0))
        .unwrap();
    assert_eq!(back, content, "the content is intact");
}

#[test]
fn a_launch_refuses_private_pages_outside_ranges_and_in_place_memory_before_any_step() {
    let (m, _vm) = dual(SIZE, PageState::Shared);
    m.convert(pr(3 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    let mut steps = 0;
    let mut count = |_: LaunchSource| {
        steps += 1;
        Ok(())
    };
    match m.launch_private(pr(0, 8 * PAGE_SIZE), &mut count) {
        Err(Error::LaunchNeedsShared { first_private, .. }) => {
            assert_eq!(first_private, 3 * PAGE_SIZE)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    assert!(matches!(
        m.launch_private(pr(SIZE - PAGE_SIZE, 2 * PAGE_SIZE), &mut count),
        Err(Error::OutsideGuestMemory { .. })
    ));
    assert_eq!(m.state_of(SIZE - PAGE_SIZE), Some(PageState::Shared));
    if common::in_place_or_skip("a_launch_refuses_in_place_memory") {
        let m = in_place(SIZE, PageState::Shared);
        assert!(matches!(
            m.launch_private(pr(0, PAGE_SIZE), &mut count),
            Err(Error::StrategyUnavailable {
                reason: UnavailableReason::LaunchNeedsDual,
                ..
            })
        ));
    }
    assert_eq!(steps, 0);
}

/// A launch step that calls back into the memory (as a VMM's vendor call might, through
/// a device mapper's `attach` or a state query) is refused with `Reentrant` instead of
/// waiting for the lock its own thread holds. On a deadlock the test fails after 20 s.
#[test]
fn a_launch_step_that_calls_back_into_the_memory_is_refused_not_deadlocked() {
    let (m, _vm) = dual(SIZE, PageState::Shared);
    let m = Arc::new(m);
    let (tx, rx) = std::sync::mpsc::channel();
    let launching = Arc::clone(&m);
    std::thread::spawn(move || {
        let mut answers = Vec::new();
        let result = launching.launch_private(pr(0, 4 * PAGE_SIZE), |_| {
            let reentrant = |r: Result<(), Error>| matches!(r, Err(Error::Reentrant { .. }));
            answers.push((
                "convert",
                reentrant(
                    launching
                        .convert(pr(8 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
                        .map(drop),
                ),
            ));
            answers.push((
                "discard",
                reentrant(launching.discard(pr(8 * PAGE_SIZE, PAGE_SIZE)).map(drop)),
            ));
            answers.push((
                "add_region",
                reentrant(launching.add_region(pr(16 << 20, SIZE), None, PageState::Shared)),
            ));
            answers.push((
                "subscribe_with_replay",
                reentrant(
                    launching
                        .subscribe_with_replay(pr(0, SIZE), Arc::new(Recorder::default()))
                        .map(drop),
                ),
            ));
            // A query answers with the map being changed.
            let state = launching.state();
            answers.push(("state", state.regions.len() == 1));
            Ok(())
        });
        tx.send((result.map_err(|e| e.to_string()), answers))
            .unwrap();
    });
    let (result, answers) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the launch step deadlocked on the conversion lock");
    result.unwrap();
    for (call, refused) in answers {
        assert!(refused, "{call} from a launch step");
    }
    assert_eq!(m.state_of(0), Some(PageState::Private));
    assert_eq!(m.state_of(8 * PAGE_SIZE), Some(PageState::Shared));
    assert_eq!(m.regions(), [pr(0, SIZE)]);
    // Outside the step, calls work again (the mark is gone).
    m.convert(pr(8 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
}

/// A launch step that panics is a refusal: rolled back (the pages shared again, with
/// their content), and the thread is left free to call again.
#[test]
fn a_panicking_launch_step_is_rolled_back_as_a_refusal() {
    let (m, _vm) = dual(SIZE, PageState::Shared);
    let range = pr(0, 2 * PAGE_SIZE);
    let content = image(range.len() as usize);
    m.guest_memory()
        .memory()
        .write_slice(&content, GuestAddress(0))
        .unwrap();
    let err = m
        .launch_private(range, |_| panic!("vendor call failed"))
        .expect_err("the step panicked");
    assert!(
        matches!(&err, Error::LaunchStep { range: r, .. } if r.start == 0),
        "{err}"
    );
    assert!(err.to_string().contains("vendor call failed"), "{err}");
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    let mut back = vec![0u8; content.len()];
    m.guest_memory()
        .memory()
        .read_slice(&mut back, GuestAddress(0))
        .unwrap();
    assert_eq!(back, content);
    m.convert(pr(8 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
}
