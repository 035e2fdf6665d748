// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A one-vCPU test VM whose boot memory is itself a guest_memfd.

use std::sync::Arc;

use guest_memfd::{GuestMemfd, GuestMemfdFlags, Memslot, PageRange};
use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, MmapRegion, VolatileMemory};

use crate::cpu::enter_user_mode;
use crate::error::{Error, Result};
use crate::layout::{
    gdt_entries, page_table_entries, BOOT_SIZE, CODE_ADDR, CODE_MAX, GDT_ADDR, STACK_TOP,
};

/// The memslot the boot region uses; tests use the others.
pub const BOOT_SLOT: u32 = 0;

/// Port a guest writes to when it has finished (`rax` holds the result).
pub const PORT_DONE: u16 = 0x10;
/// Port a guest writes to when the host should act before the guest goes on.
pub const PORT_PAUSE: u16 = 0x11;
/// Port a guest writes to when one of its checks failed.
pub const PORT_FAIL: u16 = 0x12;
/// Port a guest writes to for a hypercall by KVM's register ABI (rax = number, rbx, rcx,
/// rdx = arguments, answer in rax): the transport of `KVM_HC_MAP_GPA_RANGE` on hosts
/// whose hypercall exits do not reach userspace.
pub const PORT_HCALL: u16 = 0x13;
/// Port a guest writes to to kick the test device (rbx = request address, rcx = length).
pub const PORT_DEVICE: u16 = 0x14;
/// Port a guest writes to for nothing: the harness resumes it at once (a bare exit).
pub const PORT_NOP: u16 = 0x15;
/// The debug console (Bochs' port 0xe9): each byte written is appended to the vCPU's
/// console text, and the guest resumes at once.
pub const PORT_CONSOLE: u16 = 0xe9;

/// What a write to protocol port `port` with registers `regs` means: a stop, a guest
/// failure, or an unknown port.
pub(crate) fn stop_at(port: u16, regs: kvm_regs) -> Result<Stop> {
    let reason = match port {
        PORT_DONE => StopReason::Done,
        PORT_PAUSE => StopReason::Pause,
        PORT_FAIL => {
            return Err(Error::GuestFailed {
                rax: regs.rax,
                rbx: regs.rbx,
            })
        }
        other => {
            return Err(Error::UnexpectedExit {
                exit: format!("port write to {other:#x}"),
                rip: regs.rip,
            })
        }
    };
    Ok(Stop { reason, regs })
}

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `PORT_DONE`.
    Done,
    /// `PORT_PAUSE`: call [`TestVm::run`] again to resume.
    Pause,
}

/// The guest stopped at a protocol port, with its registers.
#[derive(Clone, Copy, Debug)]
pub struct Stop {
    /// Why.
    pub reason: StopReason,
    /// The general registers then.
    pub regs: kvm_regs,
}

/// A VM with one vCPU that runs one guest program at CPL3.
///
/// Guest-physical `[0, 2 MiB)` is the boot region (GDT, page tables, the program, its
/// stack), a guest_memfd mapped by the host (`MMAP | INIT_SHARED`), bound at slot 0 with
/// its own mapping as `userspace_addr`. The first 64 GiB are identity-mapped.
#[derive(Debug)]
pub struct TestVm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    vcpu: VcpuFd,
    _boot: GuestMemfd,
    // Host mappings bound as `userspace_addr` (the boot region's first); `Drop` deletes
    // the slots in `slots` before they are unmapped.
    maps: Vec<Arc<MmapRegion>>,
    slots: Vec<u32>,
    console: Vec<u8>,
}

impl Drop for TestVm {
    /// Deletes every memslot this VM bound before its mappings go: another vCPU of the VM
    /// (made through `vm()`) could otherwise still reach them. If a slot cannot be
    /// deleted, the mappings are leaked rather than unmapped.
    fn drop(&mut self) {
        let mut all_deleted = true;
        for &slot in &self.slots {
            let delete = kvm_bindings::kvm_userspace_memory_region {
                slot,
                ..Default::default()
            };
            // SAFETY: deleting a slot makes KVM stop using its memory.
            all_deleted &= unsafe { self.vm.set_user_memory_region(delete) }.is_ok();
        }
        if !all_deleted {
            for map in &self.maps {
                std::mem::forget(Arc::clone(map));
            }
        }
    }
}

/// Test memory bound into a [`TestVm`]: a mappable guest_memfd and its host mapping.
#[derive(Debug)]
pub struct BoundMemory {
    gmem: GuestMemfd,
    map: Arc<MmapRegion>,
}

impl BoundMemory {
    /// The guest_memfd behind the memory.
    pub fn gmem(&self) -> &GuestMemfd {
        &self.gmem
    }

    /// Sets every byte to `byte`, through the host mapping.
    pub fn fill(&self, byte: u8) {
        let slice = self.map.as_volatile_slice();
        let chunk = [byte; 4096];
        for offset in (0..slice.len()).step_by(chunk.len()) {
            let len = chunk.len().min(slice.len() - offset);
            slice
                .write_slice(&chunk[..len], offset)
                .expect("inside the mapping");
        }
    }

    /// Writes `bytes` at `offset`, through the host mapping.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        self.map
            .as_volatile_slice()
            .write_slice(bytes, offset)
            .map_err(Error::BootWrite)
    }

    /// Reads `len` bytes at `offset`, through the host mapping.
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.map
            .as_volatile_slice()
            .read_slice(&mut buf, offset)
            .map_err(Error::BootWrite)?;
        Ok(buf)
    }
}

impl TestVm {
    /// Creates the VM, loads `program` and points the vCPU at it with `args` in the
    /// argument registers (`rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`).
    pub fn new(program: &[u8], args: &[u64]) -> Result<Self> {
        if program.len() as u64 > CODE_MAX {
            return Err(Error::ProgramTooLarge(program.len()));
        }
        let kvm = Kvm::new().map_err(|e| Error::Kvm("open /dev/kvm", e))?;
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?,
        );
        let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
        let boot = GuestMemfd::create(&vm, BOOT_SIZE, flags)?;
        let boot_map = Arc::new(boot.map()?);
        let slot = Memslot::new(BOOT_SLOT, PageRange::new(0, BOOT_SIZE)?, &boot, 0)?
            .with_userspace_mapping(&boot_map)?;
        // SAFETY: the mapping is owned by the returned `TestVm`, whose `Drop` deletes the
        // slot before the mapping goes (or leaks the mapping). Should an error return
        // early below, the VM, which no vCPU has run, is dropped with it.
        unsafe { slot.bind(&vm) }?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        let test_vm = TestVm {
            kvm,
            vm,
            vcpu,
            _boot: boot,
            maps: vec![boot_map],
            slots: vec![BOOT_SLOT],
            console: Vec::new(),
        };
        test_vm.write_boot_tables()?;
        test_vm.write_boot(CODE_ADDR, program)?;
        enter_user_mode(&test_vm.kvm, &test_vm.vcpu, CODE_ADDR, STACK_TOP, args)?;
        Ok(test_vm)
    }

    fn write_boot(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        let slice = self.maps[0]
            .get_slice(addr as usize, bytes.len())
            .map_err(Error::BootWrite)?;
        slice.copy_from(bytes);
        Ok(())
    }

    fn write_boot_tables(&self) -> Result<()> {
        let region = self.maps[0].as_volatile_slice();
        for (i, entry) in gdt_entries().iter().enumerate() {
            region
                .write_obj(*entry, GDT_ADDR as usize + i * 8)
                .map_err(Error::BootWrite)?;
        }
        for (addr, entry) in page_table_entries() {
            region
                .write_obj(entry, addr as usize)
                .map_err(Error::BootWrite)?;
        }
        Ok(())
    }

    /// Creates a guest_memfd (`MMAP | INIT_SHARED`) of `guest.len()` bytes, maps it, and
    /// binds it at `slot` over `guest` with the mapping as `userspace_addr`.
    pub fn add_memory(&mut self, slot: u32, guest: PageRange) -> Result<BoundMemory> {
        let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
        let gmem = GuestMemfd::create(&self.vm, guest.len(), flags)?;
        let map = Arc::new(gmem.map()?);
        let memslot = Memslot::new(slot, guest, &gmem, 0)?.with_userspace_mapping(&map)?;
        // SAFETY: `self.maps` keeps the mapping alive until `Drop` has deleted the slot.
        unsafe { memslot.bind(&self.vm) }?;
        self.maps.push(Arc::clone(&map));
        self.slots.push(slot);
        Ok(BoundMemory { gmem, map })
    }

    /// Binds anonymous host memory (the peer of guest_memfd in benchmarks) at `slot` over
    /// `guest`, with `KVM_SET_USER_MEMORY_REGION`. The mapping lives as long as the VM.
    pub fn add_anonymous_memory(&mut self, slot: u32, guest: PageRange) -> Result<()> {
        let len = usize::try_from(guest.len()).map_err(|_| Error::TooManyArguments(0))?;
        let map = Arc::new(MmapRegion::new(len).map_err(|e| {
            Error::Memory(guest_memfd::Error::Map {
                range: guest,
                source: e,
            })
        })?);
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest.start(),
            memory_size: guest.len(),
            userspace_addr: map.as_ptr() as u64,
        };
        // SAFETY: `self.maps` keeps the mapping alive until `Drop` has deleted the slot.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        self.maps.push(map);
        self.slots.push(slot);
        Ok(())
    }

    /// What the guest printed on the debug console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console).into_owned()
    }

    /// The VM, to bind further memory.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The VM, shared: for a `vm_private_memory::MemoryBuilder`. Its memslots must avoid
    /// [`BOOT_SLOT`] and guest-physical `[0, 2 MiB)`.
    pub fn shared_vm(&self) -> Arc<VmFd> {
        Arc::clone(&self.vm)
    }

    /// The vCPU.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// Runs the guest until it writes to a protocol port. `PORT_FAIL` becomes
    /// [`Error::GuestFailed`]; any other exit becomes [`Error::UnexpectedExit`].
    pub fn run(&mut self) -> Result<Stop> {
        let port = loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(PORT_NOP, _)) => continue,
                Ok(VcpuExit::IoOut(PORT_CONSOLE, data)) => {
                    self.console.extend_from_slice(data);
                    continue;
                }
                Ok(VcpuExit::IoOut(port, _)) => break port,
                Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                    return Err(Error::MemoryFault { flags, gpa, size })
                }
                Ok(exit) => {
                    let exit = format!("{exit:?}");
                    let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(Error::UnexpectedExit { exit, rip });
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
            }
        };
        let regs = self
            .vcpu
            .get_regs()
            .map_err(|e| Error::Kvm("KVM_GET_REGS", e))?;
        stop_at(port, regs)
    }

    /// Runs until the guest reports `PORT_DONE`; a pause is an error here.
    pub fn run_to_done(&mut self) -> Result<kvm_regs> {
        let stop = self.run()?;
        match stop.reason {
            StopReason::Done => Ok(stop.regs),
            StopReason::Pause => Err(Error::UnexpectedExit {
                exit: "PORT_PAUSE where PORT_DONE was expected".into(),
                rip: stop.regs.rip,
            }),
        }
    }
}
