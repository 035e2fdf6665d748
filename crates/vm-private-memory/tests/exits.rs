// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Conversion requests from guests: hostile input gets KVM's error codes, valid input
//! converts real memory on `/dev/kvm`.

mod common;

use std::sync::Arc;

use common::{in_place, in_place_or_skip, pr, Recorder};
use guest_memfd::PAGE_SIZE;
use proptest::prelude::*;
use vm_private_memory::{
    ConversionRequest, PageState, RequestError, KVM_EFAULT, KVM_EINVAL, KVM_ENOSYS,
    MAP_GPA_RANGE_ENCRYPTED, MAP_GPA_RANGE_PAGE_SZ_1G, MAP_GPA_RANGE_PAGE_SZ_2M,
};

const MIB2: u64 = 2 << 20;
const EINVAL: u64 = KVM_EINVAL.wrapping_neg();
const EFAULT: u64 = KVM_EFAULT.wrapping_neg();

#[test]
fn malformed_map_gpa_range_requests_get_einval() {
    let cases = [
        ((0x1001, 1, 0), RequestError::Unaligned(0x1001)),
        ((0x1000, 0, 0), RequestError::Empty),
        (
            (u64::MAX - PAGE_SIZE + 1, 2, 0),
            RequestError::Overflow {
                gpa: u64::MAX - PAGE_SIZE + 1,
                pages: 2,
            },
        ),
        (
            (0, u64::MAX, 0),
            RequestError::Overflow {
                gpa: 0,
                pages: u64::MAX,
            },
        ),
        ((0, 1, 1 << 5), RequestError::BadAttributes(1 << 5)),
        ((0, 1, 1 << 63), RequestError::BadAttributes(1 << 63)),
        (
            (0, 1, MAP_GPA_RANGE_PAGE_SZ_2M | MAP_GPA_RANGE_PAGE_SZ_1G),
            RequestError::BadAttributes(3),
        ),
    ];
    for ((gpa, pages, attrs), expected) in cases {
        assert_eq!(
            ConversionRequest::from_map_gpa_range(gpa, pages, attrs),
            Err(expected),
            "({gpa:#x}, {pages:#x}, {attrs:#x})"
        );
        assert_eq!(expected.hypercall_code(), EINVAL);
    }
    let ok = ConversionRequest::from_map_gpa_range(
        MIB2,
        512,
        MAP_GPA_RANGE_ENCRYPTED | MAP_GPA_RANGE_PAGE_SZ_2M,
    )
    .unwrap();
    assert_eq!(ok.range, pr(MIB2, MIB2));
    assert_eq!(ok.to, PageState::Private);
}

#[test]
fn memory_fault_exits_are_checked() {
    assert_eq!(
        ConversionRequest::from_memory_fault(8, 0x3000, PAGE_SIZE),
        Ok(ConversionRequest {
            range: pr(0x3000, PAGE_SIZE),
            to: PageState::Private
        })
    );
    assert_eq!(
        ConversionRequest::from_memory_fault(0, 0x3000, 1)
            .unwrap()
            .range,
        pr(0x3000, PAGE_SIZE),
        "sizes round up to whole pages"
    );
    assert_eq!(
        ConversionRequest::from_memory_fault(1, 0, PAGE_SIZE),
        Err(RequestError::BadFlags(1))
    );
    assert_eq!(
        ConversionRequest::from_memory_fault(0, 0x10, PAGE_SIZE),
        Err(RequestError::Unaligned(0x10))
    );
    assert_eq!(
        ConversionRequest::from_memory_fault(0, 0, 0),
        Err(RequestError::Empty)
    );
    assert!(ConversionRequest::from_memory_fault(0, u64::MAX - 4095, u64::MAX).is_err());
}

#[test]
fn hypercalls_convert_real_memory_and_answer_the_guest() {
    if !in_place_or_skip("hypercalls_convert_real_memory_and_answer_the_guest") {
        return;
    }
    let m = in_place(2 * MIB2, PageState::Private);
    assert_eq!(m.handle_map_gpa_range(0, 512, MAP_GPA_RANGE_PAGE_SZ_2M), 0);
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    assert_eq!(m.state_of(MIB2), Some(PageState::Private));
    assert_eq!(m.handle_map_gpa_range(0, 1, MAP_GPA_RANGE_ENCRYPTED), 0);
    assert_eq!(m.state_of(0), Some(PageState::Private));
    // Outside guest memory, or straddling its end: EINVAL, nothing changes.
    let before = m.private_pages();
    assert_eq!(m.handle_map_gpa_range(2 * MIB2, 1, 0), EINVAL);
    assert_eq!(m.handle_map_gpa_range(2 * MIB2 - PAGE_SIZE, 2, 0), EINVAL);
    assert_eq!(m.handle_map_gpa_range(1 << 50, 1 << 20, 0), EINVAL);
    assert_eq!(m.private_pages(), before);
    // A conversion that fails (a listener refuses) answers EFAULT and is rolled back.
    let refusing = Arc::new(Recorder::default());
    *refusing.refuse.lock().unwrap() = true;
    let _s = m.subscribe(pr(MIB2, PAGE_SIZE), refusing);
    assert_eq!(m.handle_map_gpa_range(MIB2, 1, 0), EFAULT);
    assert_eq!(m.state_of(MIB2), Some(PageState::Private));
    // The hypercall entry point: MAP_GPA_RANGE by number, anything else ENOSYS.
    assert_eq!(m.handle_hypercall(12, [0, 1, 0]), 0);
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    assert_eq!(m.handle_hypercall(11, [0, 1, 0]), KVM_ENOSYS.wrapping_neg());
    assert_eq!(
        m.handle_hypercall(u64::MAX, [u64::MAX; 3]),
        KVM_ENOSYS.wrapping_neg()
    );
    // A memory fault converts to what the guest used.
    m.serve_memory_fault(0, 3 * PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(m.state_of(3 * PAGE_SIZE), Some(PageState::Shared));
    assert!(m.serve_memory_fault(0xff, 0, PAGE_SIZE).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Whatever a guest puts in the three registers, the answer is 0 or an error code,
    /// and only a request the parser accepted can succeed.
    #[test]
    fn any_register_values_get_an_answer(gpa in any::<u64>(), pages in any::<u64>(), attrs in any::<u64>()) {
        let parsed = ConversionRequest::from_map_gpa_range(gpa, pages, attrs);
        if let Ok(request) = parsed {
            prop_assert_eq!(request.range.start(), gpa);
            prop_assert_eq!(request.range.len(), pages * PAGE_SIZE);
        }
        let fault = ConversionRequest::from_memory_fault(attrs, gpa, pages);
        if let Ok(request) = fault {
            prop_assert!(request.range.start() == gpa);
        }
    }
}
