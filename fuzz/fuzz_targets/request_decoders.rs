// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `ConversionRequest::from_map_gpa_range` and `ConversionRequest::from_memory_fault`
//! against an independent oracle (`vm_private_memory_fuzz::oracle`, written from KVM's
//! ABI).
//!
//! Invariant: for every register triple, the crate and the oracle agree on accept or
//! refuse; when both accept, on the range (start and length) and the state asked for;
//! when both refuse, the crate's reason is one of the rules the oracle found broken, and
//! the hypercall answer is `-KVM_EINVAL`. No input panics.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_private_memory::{ConversionRequest, PageState, RequestError, KVM_EINVAL};
use vm_private_memory_fuzz::oracle::{self, Rule, Verdict};
use vm_private_memory_fuzz::Num;

#[derive(Arbitrary, Debug)]
enum Input {
    MapGpaRange {
        gpa: Num,
        pages: Num,
        attributes: Num,
    },
    MemoryFault {
        flags: Num,
        gpa: Num,
        size: Num,
    },
}

fn rule_of(error: &RequestError) -> Rule {
    match error {
        RequestError::Unaligned(_) => Rule::Aligned,
        RequestError::Empty => Rule::NotEmpty,
        RequestError::Overflow { .. } => Rule::NoOverflow,
        RequestError::BadAttributes(_) => Rule::Attributes,
        RequestError::BadFlags(_) => Rule::Flags,
        // A rule added to the crate must be added to the oracle too.
        other => panic!("a refusal the oracle does not know: {other:?}"),
    }
}

fn compare(
    what: &str,
    got: Result<ConversionRequest, RequestError>,
    expected: Result<Verdict, Vec<Rule>>,
) {
    match (got, expected) {
        (Ok(request), Ok(verdict)) => {
            assert_eq!(
                (request.range.start(), request.range.len()),
                (verdict.start, verdict.len),
                "{what}: range"
            );
            let to = if verdict.private {
                PageState::Private
            } else {
                PageState::Shared
            };
            assert_eq!(request.to, to, "{what}: state");
        }
        (Err(error), Err(broken)) => {
            assert!(
                broken.contains(&rule_of(&error)),
                "{what}: refused with {error:?}, but the oracle found only {broken:?} broken"
            );
            assert_eq!(error.hypercall_code(), KVM_EINVAL.wrapping_neg(), "{what}");
        }
        (got, expected) => panic!("{what}: the crate says {got:?}, the oracle {expected:?}"),
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::MapGpaRange {
            gpa,
            pages,
            attributes,
        } => {
            let (gpa, pages, attributes) = (gpa.get(), pages.get(), attributes.get());
            compare(
                &format!("MAP_GPA_RANGE({gpa:#x}, {pages:#x}, {attributes:#x})"),
                ConversionRequest::from_map_gpa_range(gpa, pages, attributes),
                oracle::map_gpa_range(gpa, pages, attributes),
            );
        }
        Input::MemoryFault { flags, gpa, size } => {
            let (flags, gpa, size) = (flags.get(), gpa.get(), size.get());
            compare(
                &format!("MEMORY_FAULT({flags:#x}, {gpa:#x}, {size:#x})"),
                ConversionRequest::from_memory_fault(flags, gpa, size),
                oracle::memory_fault(flags, gpa, size),
            );
        }
    }
});
