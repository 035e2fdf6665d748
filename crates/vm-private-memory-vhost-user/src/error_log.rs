// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The errors no conversion could carry, kept until the VMM takes them.

use crate::error::Error;

/// How many errors an attachment keeps until they are taken
/// ([`crate::VhostUserAttachment::take_errors`]); later ones are only counted.
pub(crate) const KEPT_ERRORS: usize = 64;

/// The first [`KEPT_ERRORS`] errors since they were last taken, and how many came after.
#[derive(Debug, Default)]
pub(crate) struct ErrorLog {
    kept: Vec<Error>,
    dropped: usize,
}

impl ErrorLog {
    pub(crate) fn push(&mut self, error: Error) {
        if self.kept.len() < KEPT_ERRORS {
            self.kept.push(error);
        } else {
            self.dropped += 1;
        }
    }

    /// How many errors were pushed since they were last taken.
    pub(crate) fn count(&self) -> usize {
        self.kept.len() + self.dropped
    }

    /// The errors kept, then [`Error::ErrorsDropped`] if some were only counted.
    pub(crate) fn take(&mut self) -> Vec<Error> {
        let mut errors = std::mem::take(&mut self.kept);
        let dropped = std::mem::take(&mut self.dropped);
        if dropped > 0 {
            errors.push(Error::ErrorsDropped {
                kept: KEPT_ERRORS,
                dropped,
            });
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_errors_are_kept_and_the_rest_counted_until_taken() {
        let mut log = ErrorLog::default();
        let error = || Error::Deadline(std::io::Error::from_raw_os_error(libc::EAGAIN));
        for _ in 0..KEPT_ERRORS + 3 {
            log.push(error());
        }
        assert_eq!(log.count(), KEPT_ERRORS + 3);
        let taken = log.take();
        assert_eq!(taken.len(), KEPT_ERRORS + 1);
        assert!(matches!(
            taken.last(),
            Some(Error::ErrorsDropped {
                kept: KEPT_ERRORS,
                dropped: 3
            })
        ));
        let text = taken.last().unwrap().to_string();
        assert!(text.contains("3 more errors"), "{text}");
        // Taken: the log starts over.
        assert_eq!(log.count(), 0);
        log.push(error());
        assert_eq!(log.take().len(), 1);
    }
}
