// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A minimal VMM for the tests of this workspace: it boots small x86-64 guest programs
//! on real KVM, with their memory in guest_memfd; and, with [`linux`], a stock Linux
//! kernel on private memory (in the nested lab, where guest kernels run natively).
//!
//! Guest programs live in `fixtures/guest/*.S` and are assembled by this crate's build
//! script; [`programs`] holds the results. Each starts at CPL3 in 64-bit mode (guest
//! CPL0 code is emulated on our hosts, CPL3 runs natively) with its arguments in `rdi`,
//! `rsi`, `rdx`, `rcx`, `r8`, `r9`, and talks to the host by writing to ports: see
//! `fixtures/guest/ports.inc` and [`TestVm::run`].
//!
//! ```no_run
//! use integration::{programs, TestVm};
//!
//! // The round-trip program checks that 16 bytes at 0x180000 are 0xaa; they are not.
//! let mut vm = TestVm::new(programs::ROUND_TRIP, &[0x18_0000, 16]).unwrap();
//! assert!(vm.run_to_done().is_err());
//! ```

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod cpu;
mod driver;
mod error;
mod footprint;
mod guest;
mod host;
pub mod layout;
pub mod linux;
mod vm;

pub use cpu::{enter_long_mode, enter_user_mode, Privilege};
pub use driver::Driver;
pub use error::{Error, Result};
pub use footprint::resident_guest_memfd_bytes;
pub use guest::{
    private_memory_vm, Device, GuestConfig, GuestVcpu, NoDevice, PrivateGuest, Served, SumDevice,
    DATA_ADDR, SERVED_LOG, STACK_STRIDE, STRATEGY_VAR,
};
pub use host::{host_lacks, lacking, Need, LAB_BENCH, LAB_DEMO};
pub use vm::{
    BoundMemory, Stop, StopReason, TestVm, BOOT_SLOT, PORT_CONSOLE, PORT_DEVICE, PORT_DONE,
    PORT_FAIL, PORT_HCALL, PORT_NOP, PORT_PAUSE,
};

/// The guest programs of `fixtures/guest`, assembled.
pub mod programs {
    include!(concat!(env!("OUT_DIR"), "/programs.rs"));
}
