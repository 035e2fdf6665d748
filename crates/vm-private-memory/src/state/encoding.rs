// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! How a region's private pages are written: runs when they are few, a bitmap when they
//! are many, whichever is shorter; and the checksum over a whole state.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use guest_memfd::PageRange;
use serde::{Deserialize, Serialize};

use super::{MemoryState, PageRun, StateError};
use crate::attributes::{PageAttributes, PageState};
use crate::strategy::Strategy;

/// A region's private pages, in whichever form is shorter.
///
/// Serialized untagged: runs as a list of `{"first", "count"}` objects, a bitmap as one
/// base64 string. The form is chosen when the state is taken so that the map never costs
/// more than the base64 bitmap, 4/3 of a byte per 8 pages (see [`MemoryState`] for the
/// whole bound), while a sparse map stays a few runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum PrivatePages {
    /// Runs of private pages, in order, not empty, not overlapping, inside the region.
    Runs(Vec<PageRun>),
    /// One bit per page, page `8 * i + b` at bit `b` (least significant first) of byte
    /// `i`, set when private; exactly `ceil(pages / 8)` bytes, bits past the region
    /// clear. Written as standard base64 with padding.
    Bitmap(#[serde(with = "base64_bytes")] Vec<u8>),
}

/// Serde for a bitmap: standard base64 with padding.
mod base64_bytes {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("the private bitmap is not base64: {e}")))
    }
}

/// Decimal digits of `n`, as JSON writes it.
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |l| l as usize + 1)
}

/// The JSON length of one run and the comma before it: `{"first":N,"count":M},`.
fn run_json_len(run: &PageRun) -> usize {
    r#"{"first":,"count":},"#.len() + digits(run.first) + digits(run.count)
}

/// Bytes of a bitmap for `pages` pages.
fn bitmap_len(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(8)).unwrap_or(usize::MAX)
}

impl PrivatePages {
    /// The private pages of `attributes`, as runs while the runs' JSON would be no
    /// longer than the bitmap's, as a bitmap otherwise.
    pub(super) fn of(attributes: &PageAttributes) -> Self {
        let pages = attributes.pages();
        // The bitmap's JSON: its base64 and two quotes.
        let budget = bitmap_len(pages).div_ceil(3).saturating_mul(4) + 2;
        let mut runs = Vec::new();
        let mut spent = 2;
        for crate::attributes::Run {
            first,
            count,
            state,
        } in attributes.runs(0, pages)
        {
            if state != PageState::Private {
                continue;
            }
            let run = PageRun { first, count };
            spent += run_json_len(&run);
            if spent > budget {
                return PrivatePages::Bitmap(bitmap_of(attributes));
            }
            runs.push(run);
        }
        PrivatePages::Runs(runs)
    }

    /// The runs of private pages of a region `region` of `pages` pages, after checking
    /// that they are in order, not empty, not overlapping and inside the region (or that
    /// the bitmap has the region's length and nothing past its end).
    pub(super) fn runs(&self, region: PageRange) -> Result<Vec<PageRun>, StateError> {
        let pages = region.page_count();
        match self {
            PrivatePages::Runs(runs) => {
                let mut next_free = 0u64;
                for run in runs {
                    let end = run.first.checked_add(run.count);
                    if run.count == 0 || run.first < next_free || end.is_none_or(|e| e > pages) {
                        return Err(StateError::BadRun {
                            region,
                            run: *run,
                            pages,
                        });
                    }
                    next_free = run.first + run.count;
                }
                Ok(runs.clone())
            }
            PrivatePages::Bitmap(bytes) => {
                let expected = bitmap_len(pages);
                if bytes.len() != expected {
                    return Err(StateError::BitmapLength {
                        region,
                        len: bytes.len(),
                        expected,
                        pages,
                    });
                }
                let tail_bits = pages % 8;
                if tail_bits != 0 && bytes.last().is_some_and(|b| b >> tail_bits != 0) {
                    return Err(StateError::BitmapPadding { region, pages });
                }
                Ok(bitmap_runs(bytes))
            }
        }
    }
}

/// The bitmap of the private pages of `attributes`.
fn bitmap_of(attributes: &PageAttributes) -> Vec<u8> {
    let mut bytes = vec![0u8; bitmap_len(attributes.pages())];
    for crate::attributes::Run {
        first,
        count,
        state,
    } in attributes.runs(0, attributes.pages())
    {
        if state != PageState::Private {
            continue;
        }
        for page in first..first + count {
            if let Some(byte) = bytes.get_mut((page / 8) as usize) {
                *byte |= 1 << (page % 8);
            }
        }
    }
    bytes
}

/// The runs of set bits of `bytes`, 64 pages at a time.
fn bitmap_runs(bytes: &[u8]) -> Vec<PageRun> {
    let mut runs = Vec::new();
    let mut open: Option<u64> = None;
    for (index, chunk) in bytes.chunks(8).enumerate() {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let base = index as u64 * 64;
        let mut bit = 0u32;
        while bit < 64 {
            // Inside a run, look for the next clear bit; outside, for the next set one.
            let looking_at = if open.is_some() { !word } else { word } >> bit;
            if looking_at == 0 {
                break;
            }
            bit += looking_at.trailing_zeros();
            let page = base + u64::from(bit);
            match open.take() {
                Some(first) => runs.push(PageRun {
                    first,
                    count: page - first,
                }),
                None => open = Some(page),
            }
        }
    }
    if let Some(first) = open {
        runs.push(PageRun {
            first,
            count: bytes.len() as u64 * 8 - first,
        });
    }
    runs
}

/// The CRC-32 of everything a state says, in a fixed byte order.
pub(super) fn checksum(state: &MemoryState) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    let u64s = |crc: &mut crc32fast::Hasher, values: &[u64]| {
        for v in values {
            crc.update(&v.to_le_bytes());
        }
    };
    let strategy = match state.strategy {
        Strategy::InPlace => 0,
        Strategy::Dual => 1,
    };
    u64s(
        &mut crc,
        &[
            u64::from(state.version),
            strategy,
            state.regions.len() as u64,
        ],
    );
    for region in &state.regions {
        u64s(
            &mut crc,
            &[
                region.guest.start(),
                region.guest.len(),
                region.gmem_offset,
                region.gmem_size,
                region.gmem_file.device,
                region.gmem_file.inode,
                region.gmem_conversions,
            ],
        );
        match &region.private {
            PrivatePages::Runs(runs) => {
                u64s(&mut crc, &[0, runs.len() as u64]);
                for run in runs {
                    u64s(&mut crc, &[run.first, run.count]);
                }
            }
            PrivatePages::Bitmap(bytes) => {
                u64s(&mut crc, &[1, bytes.len() as u64]);
                crc.update(bytes);
            }
        }
    }
    crc.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs_find_runs_across_words_and_at_the_end() {
        let a = PageAttributes::new(200, PageState::Shared);
        for (first, count) in [(0, 1), (7, 2), (62, 70), (199, 1)] {
            a.set(first, count, PageState::Private);
        }
        let bytes = bitmap_of(&a);
        assert_eq!(bytes.len(), 25);
        let runs: Vec<_> = bitmap_runs(&bytes)
            .iter()
            .map(|r| (r.first, r.count))
            .collect();
        assert_eq!(runs, vec![(0, 1), (7, 2), (62, 70), (199, 1)]);
        let full = PageAttributes::new(128, PageState::Private);
        assert_eq!(
            bitmap_runs(&bitmap_of(&full)),
            vec![PageRun {
                first: 0,
                count: 128
            }]
        );
    }

    #[test]
    fn json_length_of_a_run_is_exact() {
        let run = PageRun {
            first: 0,
            count: 262_144,
        };
        assert_eq!(run_json_len(&run), r#"{"first":0,"count":262144},"#.len());
        assert_eq!(digits(u64::MAX), 20);
        assert_eq!(digits(9), 1);
        assert_eq!(digits(10), 2);
    }
}
