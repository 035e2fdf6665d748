// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The harness's errors.

use vmm_sys_util::errno;

/// Everything that can stop a test guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] errno::Error),
    /// The file layer refused something.
    #[error(transparent)]
    Memory(#[from] guest_memfd::Error),
    /// The backend refused something.
    #[error(transparent)]
    Backend(#[from] vm_private_memory::Error),
    /// Loading the guest through the backend failed.
    #[error("loading the guest failed: {0}")]
    Load(#[source] vm_memory::GuestMemoryError),
    /// Host access to the harness's own mappings failed.
    #[error("host access to test memory failed: {0}")]
    BootWrite(#[source] vm_memory::VolatileMemoryError),
    /// The guest program does not fit its slot.
    #[error("the guest program has {0} bytes, more than the {max} the layout reserves", max = crate::layout::CODE_MAX)]
    ProgramTooLarge(usize),
    /// More vCPUs than the layout has stacks for, or a vCPU index that does not exist.
    #[error("{0} vCPUs asked for: the guest layout has stacks for {max}", max = crate::guest::MAX_VCPUS)]
    TooManyVcpus(usize),
    /// More arguments than the six argument registers.
    #[error("{0} arguments given, the guest takes at most six")]
    TooManyArguments(usize),
    /// The vCPU stopped in a way the protocol does not allow.
    #[error("the guest stopped unexpectedly: {exit} at rip {rip:#x}")]
    UnexpectedExit {
        /// The exit, described.
        exit: String,
        /// The guest's instruction pointer then.
        rip: u64,
    },
    /// KVM could not serve a guest access from the memslot's memory and exited with
    /// `KVM_EXIT_MEMORY_FAULT` (`KVM_RUN` answered EFAULT).
    #[error("KVM_EXIT_MEMORY_FAULT at gpa {gpa:#x}, {size:#x} bytes, flags {flags:#x}")]
    MemoryFault {
        /// `KVM_MEMORY_EXIT_FLAG_PRIVATE` (8) when the access was private.
        flags: u64,
        /// The guest-physical address.
        gpa: u64,
        /// The size of the access's page.
        size: u64,
    },
    /// The guest reported a failed check (`PORT_FAIL`).
    #[error("the guest reported a failure: rax = {rax:#x}, rbx = {rbx:#x}")]
    GuestFailed {
        /// What failed (program-defined).
        rax: u64,
        /// Where or what was found (program-defined).
        rbx: u64,
    },
    /// A system call outside KVM failed.
    #[error("{0} failed: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// A kernel or initramfs file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    BootFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something to load does not fit the guest's layout.
    #[error("{0} ({1} bytes or entries) does not fit the guest's memory layout; give the guest more RAM or a smaller image")]
    DoesNotFit(&'static str, u64),
    /// The kernel image has no 64-bit entry point this loader can use.
    #[error("{} is not a 64-bit bzImage: boot protocol {version:#06x}, xloadflags {xloadflags:#x} (needs 2.12 or later with XLF_KERNEL_64)", path.display())]
    NotA64BitKernel {
        /// The file.
        path: std::path::PathBuf,
        /// Its boot protocol version.
        version: u16,
        /// Its `xloadflags`.
        xloadflags: u16,
    },
    /// The initramfs file is empty.
    #[error("the initramfs {} is empty", .0.display())]
    EmptyInitramfs(std::path::PathBuf),
    /// Copying a file into guest memory failed.
    #[error("loading {} into guest memory [{start:#x}, {end:#x}) failed: {source}", what.display(), end = start + len)]
    LoadInto {
        /// The file.
        what: std::path::PathBuf,
        /// Where it goes.
        start: u64,
        /// How long it is.
        len: u64,
        /// Why it failed (a private page, a short file, an I/O error).
        source: vm_memory::GuestMemoryError,
    },
    /// linux-loader refused the kernel.
    #[error("loading the kernel failed: {0}")]
    KernelLoad(#[source] linux_loader::loader::Error),
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The boot parameters could not be written.
    #[error("writing the boot parameters failed: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// The guest did not stop before its deadline.
    #[error("the guest was still running after {deadline:?} ({exits} exits, rip {rip:#x}); its console ended with:\n{console_tail}")]
    Timeout {
        /// The deadline.
        deadline: std::time::Duration,
        /// How many exits the vCPU had taken.
        exits: u64,
        /// Where the guest was when it was stopped.
        rip: u64,
        /// The last part of its console.
        console_tail: String,
    },
    /// `PRIVMEM_STRATEGY` set to something the harness does not know.
    #[error("PRIVMEM_STRATEGY={0:?}: the harness knows only \"in-place\" (unset: its own choice)")]
    BadStrategyVar(String),
    /// Guest RAM of a size the machine cannot have.
    #[error("guest RAM of {size:#x} bytes: {why}")]
    RamSize {
        /// The size asked for.
        size: u64,
        /// What is wrong with it, and the limit.
        why: &'static str,
    },
    /// KVM's paravirtual structures asked for on the dual strategy's private RAM.
    #[error("KVM's paravirtual structures (LinuxConfig::paravirt) need in-place memory: with the dual strategy KVM writes them into the shared side of private pages, where the guest never reads")]
    ParavirtNeedsInPlace,
    /// [`crate::linux::LinuxVm::new_anonymous`] asked for private memory or a strategy:
    /// an ordinary VM's anonymous RAM is all the host's.
    #[error("an ordinary VM's anonymous RAM has no private pages and no strategy, but the config asks for ram {ram:?}, strategy {strategy:?}: give Ram::Shared and no strategy, or use LinuxVm::new for private memory")]
    NotAnonymous {
        /// The `ram` the config gave.
        ram: crate::linux::Ram,
        /// The `strategy` the config gave.
        strategy: Option<vm_private_memory::Strategy>,
    },
    /// A second disk for a [`crate::linux::LinuxVm`], which has one place for it.
    #[error("the VM already has a disk: one virtio-blk device at DISK_MMIO_BASE")]
    DiskAttached,
    /// The disk could not be made.
    #[error("the virtio-blk disk: {0}")]
    Disk(#[source] crate::linux::virtio::VirtioError),
}

/// The harness's result type.
pub type Result<T> = std::result::Result<T, Error>;
