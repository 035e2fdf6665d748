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
    m.memory()
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
        .memory()
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
    m.memory()
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
    m.memory()
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
