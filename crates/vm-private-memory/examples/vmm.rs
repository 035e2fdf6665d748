// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small VMM on private memory, end to end, for a new VMM author:
//!
//! 1. build guest memory whose pages start private (as a TDX or SEV-SNP guest's do);
//! 2. load the guest's code into pages that end private (`load_private`);
//! 3. run a vCPU, and serve its conversion requests with the crate's helpers: the guest
//!    shares a window for a virtio device, and takes it back when done;
//! 4. drive a `virtio-queue` device through the shared window, and see a descriptor
//!    into a private page refused.
//!
//! ```text
//! cargo run -p vm-private-memory --example vmm
//! ```
//!
//! The guest asks for conversions with `KVM_HC_MAP_GPA_RANGE`'s registers (rax = 12,
//! rbx = address, rcx = pages, rdx = attributes). On hosts whose hypercall exits reach
//! userspace (`enable_map_gpa_range_exits`), a guest issues them with `vmcall` and
//! `serve_vcpu_exit` answers; on ours they never arrive, so this guest carries the same
//! registers over port I/O (`out 0x80`), served by `handle_hypercall`. The VMM loop
//! handles both. It runs on the in-place strategy (Linux 6.18+), where KVM runs the
//! guest's code from the guest_memfd; the host's view refuses its private pages.

use std::error::Error;
use std::io::{Read, Write};
use std::sync::Arc;

use guest_memfd::{Capabilities, PageRange, PAGE_SIZE};
use kvm_ioctls::{Kvm, VcpuExit};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{private_page_refusal, MemoryBuilder, PageState, Strategy};

/// Where the guest's code goes.
const CODE: u64 = 0x1000;
/// The window the guest shares with the device: the virtqueue and its buffers.
const WINDOW: u64 = 0x10_0000;
const WINDOW_PAGES: u64 = 16;
const REQUEST: u64 = WINDOW + 0x8000;
const RESPONSE: u64 = WINDOW + 0x9000;
/// The port this guest carries its conversion requests on.
const HYPERCALL_PORT: u16 = 0x80;

/// The guest, in 16-bit real mode: share the window, halt (the device works), take the
/// window back, halt.
#[rustfmt::skip]
const GUEST: [u8; 42] = [
    0x66, 0xb8, 0x0c, 0x00, 0x00, 0x00, // mov eax, 12 (KVM_HC_MAP_GPA_RANGE)
    0x66, 0xbb, 0x00, 0x00, 0x10, 0x00, // mov ebx, WINDOW
    0x66, 0xb9, 0x10, 0x00, 0x00, 0x00, // mov ecx, WINDOW_PAGES
    0x66, 0xba, 0x00, 0x00, 0x00, 0x00, // mov edx, 0 (shared)
    0xe6, 0x80,                         // out 0x80, al: the request (answer in eax)
    0xf4,                               // hlt: the device works on the window
    0x66, 0xb8, 0x0c, 0x00, 0x00, 0x00, // mov eax, 12
    0x66, 0xba, 0x10, 0x00, 0x00, 0x00, // mov edx, 0x10 (private: ENCRYPTED)
    0xe6, 0x80,                         // out 0x80, al
    0xf4,                               // hlt: done
];

fn main() -> Result<(), Box<dyn Error>> {
    let Ok(kvm) = Kvm::new() else {
        println!("SKIPPED: this example needs /dev/kvm");
        return Ok(());
    };
    let vm = Arc::new(kvm.create_vm()?);
    if !Capabilities::of_vm(&*vm).in_place_capable() {
        println!("SKIPPED: this example needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244), Linux 6.18+)");
        return Ok(());
    }

    // 1. Guest memory, all private. `memory()` is the vm-memory view devices use.
    let memory = MemoryBuilder::new(vm.clone())
        .region_at(0, 4 << 20)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build()?;
    let exits = memory.enable_map_gpa_range_exits()?;
    println!("guest memory: 4 MiB, all private; hypercall exits offered: {exits}");

    // 2. The code, in pages that end private: the host cannot read it back.
    memory.load_private(CODE, &GUEST)?;
    let view = memory.guest_memory();
    assert!(view.memory().read_obj::<u8>(GuestAddress(CODE)).is_err());
    println!("guest code loaded at {CODE:#x}, private: the host's read is refused");

    // 3. A vCPU in real mode at the code.
    let mut vcpu = vm.create_vcpu(0)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;

    let mut halts = 0;
    loop {
        // Decide inside the match, act after it: the exit borrows the vCPU.
        enum Next {
            PortRequest,
            Halted,
            Served,
        }
        let next = match vcpu.run()? {
            VcpuExit::IoOut(HYPERCALL_PORT, _) => Next::PortRequest,
            VcpuExit::Hlt => Next::Halted,
            mut exit => match memory.serve_vcpu_exit(&mut exit) {
                // A real KVM_EXIT_HYPERCALL or memory fault: answered already.
                Some(served) => {
                    served?;
                    Next::Served
                }
                None => return Err(format!("unexpected exit: {exit:?}").into()),
            },
        };
        match next {
            Next::PortRequest => {
                let mut regs = vcpu.get_regs()?;
                let (nr, args) = (regs.rax, [regs.rbx, regs.rcx, regs.rdx]);
                regs.rax = memory.handle_hypercall(nr, args);
                vcpu.set_regs(&regs)?;
                let to = if args[2] == 0 { "shared" } else { "private" };
                println!(
                    "guest asked for [{:#x}, +{} pages) {to}: answered {}",
                    args[0], args[1], regs.rax as i64
                );
            }
            Next::Halted if halts == 0 => {
                halts += 1;
                serve_the_device(&memory)?;
            }
            Next::Halted => break,
            Next::Served => {}
        }
    }

    // The window is private again: the device cannot reach it any more.
    let refused = view
        .memory()
        .read_obj::<u8>(GuestAddress(RESPONSE))
        .is_err();
    println!("guest took the window back; the host's read of it is refused: {refused}");
    assert!(refused);
    Ok(())
}

/// Step 4, the device side, on the window the guest shared: a virtqueue whose
/// descriptors and buffers are in shared pages. The driver's part (placing a chain) is
/// played here by virtio-queue's mock, as a guest driver would write it.
fn serve_the_device(
    memory: &vm_private_memory::PrivateMemoryManager,
) -> Result<(), Box<dyn Error>> {
    let window = PageRange::new(WINDOW, WINDOW_PAGES * PAGE_SIZE)?;
    assert_eq!(memory.state_of(window.start()), Some(PageState::Shared));
    let view = memory.guest_memory();
    let mem = view.memory();
    mem.write_slice(b"ping from guest!", GuestAddress(REQUEST))?;
    let driver = MockSplitQueue::create(&*mem, GuestAddress(WINDOW), 16);
    driver.build_desc_chain(&[
        RawDescriptor::from(Descriptor::new(REQUEST, 16, 0, 0)),
        RawDescriptor::from(Descriptor::new(RESPONSE, 16, 2, 0)), // VRING_DESC_F_WRITE
    ])?;
    let mut queue: Queue = driver.create_queue()?;

    let chain = queue.pop_descriptor_chain(&*mem).ok_or("no chain")?;
    let head = chain.head_index();
    let mut request = [0u8; 16];
    Reader::new(&*mem, chain.clone())?.read_exact(&mut request)?;
    Writer::new(&*mem, chain)?.write_all(b"pong from device")?;
    queue.add_used(&*mem, head, 16)?;
    println!(
        "device read {:?}, answered in the shared window",
        String::from_utf8_lossy(&request)
    );

    // A chain pointing into the guest's private code is refused, naming the page.
    driver.add_desc_chains(&[RawDescriptor::from(Descriptor::new(CODE, 16, 0, 0))], 2)?;
    let chain = queue.pop_descriptor_chain(&*mem).ok_or("no chain")?;
    match Reader::new(&*mem, chain) {
        Err(virtio_queue::Error::GuestMemoryError(e)) => {
            let (_, page) = private_page_refusal(&e).ok_or("another refusal")?;
            println!("a descriptor into private page {page:#x} was refused");
        }
        _ => return Err("a private buffer reached the device".into()),
    }
    Ok(())
}
