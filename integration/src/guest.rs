// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A guest whose every page (code, tables, stack, data) lives in `vm-private-memory`,
//! with any number of vCPUs, a hypercall transport and a test device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memfd::Capabilities;
use guest_memfd::PageRange;
use kvm_bindings::kvm_regs;
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{
    ContentMode, GuestMemoryPrivate, MemoryBuilder, PageState, PrivateMemoryManager, Strategy,
};

use crate::cpu::{enter_long_mode, Privilege};
use crate::error::{Error, Result};
use crate::layout::{
    gdt_entries, page_table_entries, BOOT_SIZE, CODE_ADDR, CODE_MAX, GDT_ADDR, STACK_TOP,
};
use crate::vm::{stop_at, Stop, PORT_CONSOLE, PORT_DEVICE, PORT_HCALL, PORT_NOP};

/// Where the guest's data region starts: 4 GiB, above the MMIO hole.
pub const DATA_ADDR: u64 = 4 << 30;
/// How many served hypercalls a vCPU remembers ([`GuestVcpu::served`]).
pub const SERVED_LOG: usize = 1024;
/// Each vCPU's stack is this far below the previous one's.
pub const STACK_STRIDE: u64 = 64 << 10;
/// The most vCPUs whose stacks fit between the program and the end of the boot region.
pub const MAX_VCPUS: usize = ((STACK_TOP - CODE_ADDR - CODE_MAX) / STACK_STRIDE) as usize;

/// A device model on the host side: it sees the guest only through the backend's `Bytes`
/// (so only through shared pages), as a virtio device sees a TDX guest's SWIOTLB.
pub trait Device: Send {
    /// The guest kicked the device with a request of `len` bytes at `addr`; the answer
    /// goes into the guest's `rax` (0 for success).
    fn kick(&mut self, memory: &GuestMemoryPrivate, addr: u64, len: u64) -> u64;
}

/// A device that answers a request with the sum of its bytes, written as a little-endian
/// u64 right after the request. Answers 1 if it cannot read or write (a private page).
#[derive(Debug, Default)]
pub struct SumDevice {
    /// Requests served.
    pub served: u64,
    /// Requests it could not serve because the backend refused the access.
    pub refused: u64,
}

impl Device for SumDevice {
    fn kick(&mut self, memory: &GuestMemoryPrivate, addr: u64, len: u64) -> u64 {
        let Ok(len) = usize::try_from(len) else {
            self.refused += 1;
            return 1;
        };
        let mut request = vec![0u8; len];
        let answer = memory
            .read_slice(&mut request, GuestAddress(addr))
            .map(|()| request.iter().map(|&b| u64::from(b)).sum::<u64>())
            .and_then(|sum| memory.write_obj(sum, GuestAddress(addr.wrapping_add(len as u64))));
        match answer {
            Ok(()) => {
                self.served += 1;
                0
            }
            Err(_) => {
                self.refused += 1;
                1
            }
        }
    }
}

/// A device for guests that have none.
#[derive(Debug)]
pub struct NoDevice;

impl Device for NoDevice {
    fn kick(&mut self, _: &GuestMemoryPrivate, _: u64, _: u64) -> u64 {
        u64::MAX
    }
}

/// How to build a [`PrivateGuest`].
#[derive(Clone, Copy, Debug)]
pub struct GuestConfig {
    /// The size of the data region at [`DATA_ADDR`].
    pub data_size: u64,
    /// How many vCPUs.
    pub vcpus: usize,
    /// Whether every page is private once the guest is loaded: the boot region too with
    /// the in-place strategy, the data region only with the dual strategy (its host
    /// cannot load content into private pages).
    pub all_private: bool,
    /// The NUMA policy of the data region's memory, if any (in-place strategy, Linux
    /// 6.19+: [`MemoryBuilder::region_at_with_policy`]).
    pub data_policy: Option<guest_memfd::NumaPolicy>,
}

/// A guest on private memory: the boot region `[0, 2 MiB)` and a data region at
/// [`DATA_ADDR`], both in one [`PrivateMemoryManager`] (in-place strategy), with vCPUs that
/// all start at the same program, at CPL3, each with its own stack.
#[derive(Debug)]
pub struct PrivateGuest {
    kvm: Kvm,
    memory: Arc<PrivateMemoryManager>,
    vcpus: Vec<GuestVcpu>,
}

/// One vCPU of a [`PrivateGuest`]; it can be moved to its own thread.
#[derive(Debug)]
pub struct GuestVcpu {
    index: usize,
    fd: VcpuFd,
    sync_regs: bool,
    console: Vec<u8>,
    memory: Arc<PrivateMemoryManager>,
    served: Vec<Served>,
}

/// A hypercall the harness served for a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// Whether it arrived as a real `KVM_EXIT_HYPERCALL` (else over port I/O).
    pub exit: bool,
    /// The hypercall number (rax).
    pub nr: u64,
    /// Its arguments (rbx, rcx, rdx).
    pub args: [u64; 3],
    /// The answer put in rax.
    pub answer: u64,
    /// How long serving it took (the conversion, not the exit).
    pub elapsed: Duration,
}

/// The environment variable that makes [`private_memory_vm`] choose the in-place
/// strategy where it would choose dual: `PRIVMEM_STRATEGY=in-place` (the nested lab's
/// second pass on kernels that have both).
pub const STRATEGY_VAR: &str = "PRIVMEM_STRATEGY";

/// A VM for private memory: `KVM_X86_SW_PROTECTED_VM` if this host offers it with memory
/// attributes (the dual strategy: the nested lab), else the default type (the in-place
/// strategy where guest_memfd is mappable: our hosts). With `PRIVMEM_STRATEGY=in-place`
/// ([`STRATEGY_VAR`]), always the default type. SEV-SNP and TDX VM types are not used:
/// this plain harness cannot launch their guests.
///
/// # Errors
///
/// [`Error::BadStrategyVar`] if `PRIVMEM_STRATEGY` is set to anything but `in-place`
/// (a misspelling would otherwise run the other strategy's pass silently); KVM's error
/// if the VM cannot be created.
pub fn private_memory_vm(kvm: &Kvm) -> Result<VmFd> {
    let create = |vm_type: u32| {
        kvm.create_vm_with_type(vm_type.into())
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))
    };
    let sw_protected = kvm_bindings::KVM_X86_SW_PROTECTED_VM;
    let in_place_asked = match std::env::var_os(STRATEGY_VAR) {
        None => false,
        Some(v) if v == "in-place" => true,
        Some(v) => return Err(Error::BadStrategyVar(v.to_string_lossy().into_owned())),
    };
    if !in_place_asked && Capabilities::of_system(kvm).supports_vm_type(sw_protected) {
        let vm = create(sw_protected)?;
        if Capabilities::of_vm(&vm).dual_capable() {
            return Ok(vm);
        }
    }
    create(0)
}

impl PrivateGuest {
    /// Builds the memory, loads `program`, and creates the vCPUs (not yet started).
    pub fn new(program: &[u8], config: GuestConfig) -> Result<Self> {
        if program.len() as u64 > CODE_MAX {
            return Err(Error::ProgramTooLarge(program.len()));
        }
        if config.vcpus > MAX_VCPUS {
            return Err(Error::TooManyVcpus(config.vcpus));
        }
        let kvm = Kvm::new().map_err(|e| Error::Kvm("open /dev/kvm", e))?;
        let vm = Arc::new(private_memory_vm(&kvm)?);
        let builder = MemoryBuilder::new(vm.clone())
            .x86_mmio_hole()
            .region_at(0, BOOT_SIZE);
        let builder = match config.data_policy {
            Some(policy) => builder.region_at_with_policy(DATA_ADDR, config.data_size, policy),
            None => builder.region_at(DATA_ADDR, config.data_size),
        };
        let memory = builder.initial_state(PageState::Shared).build()?;
        let ram = memory.guest_memory();
        let ram = ram.memory();
        for (i, entry) in gdt_entries().iter().enumerate() {
            ram.write_obj(*entry, GuestAddress(GDT_ADDR + i as u64 * 8))
                .map_err(Error::Load)?;
        }
        for (addr, entry) in page_table_entries() {
            ram.write_obj(entry, GuestAddress(addr))
                .map_err(Error::Load)?;
        }
        ram.write_slice(program, GuestAddress(CODE_ADDR))
            .map_err(Error::Load)?;
        if config.all_private {
            match memory.strategy() {
                Strategy::InPlace => {
                    for region in memory.regions() {
                        memory.convert_with(region, PageState::Private, ContentMode::Preserve)?;
                    }
                }
                // The host cannot put content into private pages of a dual-strategy VM
                // (that is what a TDX or SNP launch does): only the data goes private.
                // So for any other strategy.
                _ => {
                    memory.convert(memory.regions()[1], PageState::Private)?;
                }
            }
        }
        let memory = Arc::new(memory);
        let vcpus = (0..config.vcpus)
            .map(|index| {
                let mut fd = vm
                    .create_vcpu(index as u64)
                    .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
                // With KVM_CAP_SYNC_REGS the registers travel in kvm_run on every exit,
                // sparing the hypercall transport a KVM_GET_REGS and a KVM_SET_REGS.
                let sync_regs = vm.check_extension(Cap::SyncRegs);
                if sync_regs {
                    fd.set_sync_valid_reg(SyncReg::Register);
                }
                Ok(GuestVcpu {
                    index,
                    fd,
                    sync_regs,
                    console: Vec::new(),
                    memory: Arc::clone(&memory),
                    served: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PrivateGuest { kvm, memory, vcpus })
    }

    /// The guest's memory.
    pub fn memory(&self) -> &Arc<PrivateMemoryManager> {
        &self.memory
    }

    /// Points vCPU `index` at the program, at CPL3, with `args` in its argument registers.
    pub fn start(&mut self, index: usize, args: &[u64]) -> Result<()> {
        self.start_at(index, Privilege::User, args)
    }

    /// Points vCPU `index` at the program at `privilege`, with `args`.
    pub fn start_at(&mut self, index: usize, privilege: Privilege, args: &[u64]) -> Result<()> {
        let vcpu = self
            .vcpus
            .get(index)
            .ok_or(Error::TooManyVcpus(index + 1))?;
        let stack = STACK_TOP - index as u64 * STACK_STRIDE;
        enter_long_mode(&self.kvm, &vcpu.fd, privilege, CODE_ADDR, stack, args)
    }

    /// Asks KVM to let the guest's `KVM_HC_MAP_GPA_RANGE` hypercalls exit to us, through
    /// the memory ([`PrivateMemoryManager::enable_map_gpa_range_exits`]); returns whether the
    /// host offers it.
    pub fn enable_map_gpa_range_exits(&self) -> Result<bool> {
        Ok(self.memory.enable_map_gpa_range_exits()?)
    }

    /// vCPU `index`.
    pub fn vcpu(&mut self, index: usize) -> &mut GuestVcpu {
        &mut self.vcpus[index]
    }

    /// Takes the vCPUs out, to run them on threads of their own.
    pub fn take_vcpus(&mut self) -> Vec<GuestVcpu> {
        std::mem::take(&mut self.vcpus)
    }

    /// The guest-physical range of the data region.
    pub fn data(&self) -> PageRange {
        self.memory.regions()[1]
    }
}

impl GuestVcpu {
    /// Its index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Runs until the guest stops at `PORT_DONE` or `PORT_PAUSE`, serving on the way:
    /// hypercalls by the register ABI over `PORT_HCALL`, real `KVM_EXIT_HYPERCALL` and
    /// `KVM_EXIT_MEMORY_FAULT` exits (all three through `vm-private-memory`'s one
    /// handler), and device kicks.
    pub fn run(&mut self, device: &mut dyn Device) -> Result<Stop> {
        loop {
            let port = match self.fd.run() {
                Ok(VcpuExit::IoOut(PORT_NOP, _)) => continue,
                Ok(VcpuExit::IoOut(PORT_CONSOLE, data)) => {
                    self.console.extend_from_slice(data);
                    continue;
                }
                // A CPL3 guest cannot halt (hlt faults); a guest that does reaches here
                // only if it runs kernel code: a clean stop.
                Ok(VcpuExit::Hlt) => {
                    return Ok(Stop {
                        reason: crate::StopReason::Done,
                        regs: self.regs()?,
                    })
                }
                Ok(VcpuExit::IoOut(port, _)) => port,
                Ok(VcpuExit::Hypercall(exit)) => {
                    let args = [exit.args[0], exit.args[1], exit.args[2]];
                    *exit.ret = serve(&self.memory, &mut self.served, exit.nr, args, true);
                    continue;
                }
                Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                    self.memory.serve_memory_fault(flags, gpa, size)?;
                    continue;
                }
                Ok(exit) => {
                    let exit = format!("{exit:?}");
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(Error::UnexpectedExit { exit, rip });
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
            };
            if port != PORT_HCALL && port != PORT_DEVICE {
                return stop_at(port, self.regs()?);
            }
            let mut regs = if self.sync_regs {
                self.fd.sync_regs().regs
            } else {
                self.regs()?
            };
            regs.rax = if port == PORT_HCALL {
                let args = [regs.rbx, regs.rcx, regs.rdx];
                serve(&self.memory, &mut self.served, regs.rax, args, false)
            } else {
                let ram = self.memory.guest_memory();
                device.kick(&ram.memory(), regs.rbx, regs.rcx)
            };
            if self.sync_regs {
                self.fd.sync_regs_mut().regs.rax = regs.rax;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
            } else {
                self.fd
                    .set_regs(&regs)
                    .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
            }
        }
    }

    /// Runs until `PORT_DONE`; a pause is an error here.
    pub fn run_to_done(&mut self, device: &mut dyn Device) -> Result<kvm_regs> {
        let stop = self.run(device)?;
        match stop.reason {
            crate::StopReason::Done => Ok(stop.regs),
            crate::StopReason::Pause => Err(Error::UnexpectedExit {
                exit: "PORT_PAUSE where PORT_DONE was expected".into(),
                rip: stop.regs.rip,
            }),
        }
    }

    /// What the guest printed on the debug console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console).into_owned()
    }

    /// Changes the vCPU's general registers (while it is stopped).
    pub fn update_regs(&mut self, change: impl FnOnce(&mut kvm_regs)) -> Result<()> {
        let mut regs = self.regs()?;
        change(&mut regs);
        self.fd
            .set_regs(&regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
    }

    /// The first hypercalls served (at most [`SERVED_LOG`]), in order.
    pub fn served(&self) -> &[Served] {
        &self.served
    }

    fn regs(&self) -> Result<kvm_regs> {
        self.fd
            .get_regs()
            .map_err(|e| Error::Kvm("KVM_GET_REGS", e))
    }
}

/// Serves one hypercall through the memory's one entry point and logs it in `log`.
fn serve(
    memory: &PrivateMemoryManager,
    log: &mut Vec<Served>,
    nr: u64,
    args: [u64; 3],
    exit: bool,
) -> u64 {
    let start = Instant::now();
    let answer = memory.handle_hypercall(nr, args);
    if log.len() < SERVED_LOG {
        log.push(Served {
            exit,
            nr,
            args,
            answer,
            elapsed: start.elapsed(),
        });
    }
    answer
}
