// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The deadline of a guest run: a thread that interrupts `KVM_RUN` once it passes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Interrupts `KVM_RUN` on the thread that started it once a deadline passes: it sends a
/// real-time signal (with an empty handler, so the ioctl returns EINTR) every few
/// milliseconds until the run loop notices, since a signal that lands between two
/// `KVM_RUN`s is lost. vmm-sys-util registers the handler.
pub(super) struct Watchdog {
    expired: Arc<AtomicBool>,
    /// Where the run loop is: what it serves and how many exits it has taken, for the
    /// one line the watchdog prints if the loop never comes back to notice the deadline.
    progress: Arc<Progress>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Not `Send`: the signals go to the thread that started it, which must also be the
    /// one that drops it (joining the signalling thread before it can exit).
    _on_its_thread: std::marker::PhantomData<*const ()>,
}

/// What the run loop is doing, as the watchdog sees it from its own thread.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Exits taken so far.
    exits: AtomicU64,
    /// What the current exit is: [`Progress::IN_KVM_RUN`] or the exit's address (an
    /// MMIO write's, say), set before it is served.
    serving: AtomicU64,
}

impl Progress {
    /// The loop is inside `KVM_RUN` (or between exits).
    pub(super) const IN_KVM_RUN: u64 = u64::MAX;

    /// The loop took an exit and serves what is at `what` (an address, or a port).
    pub(super) fn serving(&self, what: u64) {
        self.serving.store(what, Ordering::Relaxed);
    }

    /// The loop is back, about to enter `KVM_RUN` again.
    pub(super) fn back(&self) {
        self.serving.store(Self::IN_KVM_RUN, Ordering::Relaxed);
        self.exits.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long past the deadline the loop may stay away before the watchdog says where it
/// is: a device that never returns would otherwise leave a run hung without a word.
const STUCK_REPORT_AFTER: Duration = Duration::from_secs(10);

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Watchdog {
    pub(super) fn start(deadline: Duration) -> Result<Self> {
        let signal = vmm_sys_util::signal::SIGRTMIN();
        vmm_sys_util::signal::register_signal_handler(signal, ignore_signal)
            .map_err(|e| Error::Io("sigaction", std::io::Error::from_raw_os_error(e.errno())))?;
        // SAFETY: pthread_self has no preconditions and returns the calling thread's id.
        let target = unsafe { libc::pthread_self() };
        let expired = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        progress.back();
        let thread = {
            let (expired, done) = (Arc::clone(&expired), Arc::clone(&done));
            let progress = Arc::clone(&progress);
            std::thread::spawn(move || {
                let end = Instant::now() + deadline;
                let mut reported = false;
                while !done.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < end {
                        // Woken early by Drop, or spuriously: the loop checks again.
                        std::thread::park_timeout(end - now);
                        continue;
                    }
                    expired.store(true, Ordering::Release);
                    if !reported && now >= end + STUCK_REPORT_AFTER {
                        reported = true;
                        let serving = progress.serving.load(Ordering::Relaxed);
                        let place = if serving == Progress::IN_KVM_RUN {
                            "inside KVM_RUN".to_owned()
                        } else {
                            format!("serving an exit at {serving:#x}")
                        };
                        eprintln!(
                            "watchdog: {STUCK_REPORT_AFTER:?} past the deadline the vCPU's loop \
                             has not come back: {place}, after {} exits",
                            progress.exits.load(Ordering::Relaxed)
                        );
                    }
                    // SAFETY: `target` is the thread that owns this watchdog; it joins
                    // this thread before it can exit (Drop), so the id is valid, and the
                    // signal has a handler that does nothing.
                    unsafe { libc::pthread_kill(target, signal) };
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Ok(Watchdog {
            expired,
            progress,
            done,
            thread: Some(thread),
            _on_its_thread: std::marker::PhantomData,
        })
    }

    /// Where the run loop reports what it is doing.
    pub(super) fn progress(&self) -> &Progress {
        &self.progress
    }

    pub(super) fn expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            // The thread only sleeps and signals; it cannot panic.
            let _ = thread.join();
        }
    }
}
