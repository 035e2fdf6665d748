// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The deadline of a guest run: a thread that interrupts `KVM_RUN` once it passes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Interrupts `KVM_RUN` on the thread that started it once a deadline passes: it sends a
/// real-time signal (with an empty handler, so the ioctl returns EINTR) every few
/// milliseconds until the run loop notices, since a signal that lands between two
/// `KVM_RUN`s is lost. vmm-sys-util registers the handler.
pub(super) struct Watchdog {
    expired: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Not `Send`: the signals go to the thread that started it, which must also be the
    /// one that drops it (joining the signalling thread before it can exit).
    _on_its_thread: std::marker::PhantomData<*const ()>,
}

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
        let thread = {
            let (expired, done) = (Arc::clone(&expired), Arc::clone(&done));
            std::thread::spawn(move || {
                let end = Instant::now() + deadline;
                while !done.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < end {
                        // Woken early by Drop, or spuriously: the loop checks again.
                        std::thread::park_timeout(end - now);
                        continue;
                    }
                    expired.store(true, Ordering::Release);
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
            done,
            thread: Some(thread),
            _on_its_thread: std::marker::PhantomData,
        })
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
