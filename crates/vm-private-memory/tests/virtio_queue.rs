// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! rust-vmm's `virtio-queue` on private memory (real `/dev/kvm`, in-place strategy): a
//! device processes descriptor chains whose ring and buffers are in shared pages, with
//! the queue's own `Reader` and `Writer`, and a chain that points into a private page is
//! refused with the cause recoverable. The region holds private pages, so
//! `get_host_address` refuses it: the queue must work through slices alone.

mod common;

use std::io::{Read, Write};

use common::{in_place, in_place_or_skip, pr};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vm_private_memory::{private_page_refusal, PageState};

const SIZE: u64 = 4 << 20;
const REQUEST: u64 = 0x10_0000;
const RESPONSE: u64 = 0x10_1000;
const PRIVATE: u64 = 0x30_0000;
/// `VRING_DESC_F_WRITE` (virtio 1.2, 2.7.5): the device writes this buffer.
const WRITE: u16 = 2;

#[test]
fn virtio_queue_serves_chains_in_shared_pages_and_refuses_private_buffers() {
    if !in_place_or_skip("virtio_queue_serves_chains_in_shared_pages_and_refuses_private_buffers") {
        return;
    }
    let memory = in_place(SIZE, PageState::Private);
    // The ring and both buffers are shared, as a guest's driver would make them.
    memory.convert(pr(0, 2 << 20), PageState::Shared).unwrap();
    let view = memory.guest_memory();
    let mem = view.memory();
    assert!(mem.get_host_address(GuestAddress(0)).is_err());
    mem.write_slice(b"ping from guest!", GuestAddress(REQUEST))
        .unwrap();

    let mock = MockSplitQueue::new(&*mem, 16);
    let chain = [
        RawDescriptor::from(SplitDescriptor::new(REQUEST, 16, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(RESPONSE, 16, WRITE, 0)),
    ];
    mock.build_desc_chain(&chain).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();

    let chain = queue.pop_descriptor_chain(&*mem).expect("a chain");
    let head = chain.head_index();
    let mut request = [0u8; 16];
    Reader::new(&*mem, chain.clone())
        .unwrap()
        .read_exact(&mut request)
        .unwrap();
    assert_eq!(&request, b"ping from guest!");
    let mut writer = Writer::new(&*mem, chain).unwrap();
    writer.write_all(b"pong from device").unwrap();
    drop(writer);
    queue.add_used(&*mem, head, 16).unwrap();
    let mut response = [0u8; 16];
    mem.read_slice(&mut response, GuestAddress(RESPONSE))
        .unwrap();
    assert_eq!(&response, b"pong from device");
    assert_eq!(queue.next_used(), 1);

    // A chain whose buffer is private: refused, and the cause says which page.
    let bad = [RawDescriptor::from(SplitDescriptor::new(PRIVATE, 16, 0, 0))];
    mock.add_desc_chains(&bad, 2).unwrap();
    let chain = queue.pop_descriptor_chain(&*mem).expect("a chain");
    match Reader::new(&*mem, chain) {
        Err(virtio_queue::Error::GuestMemoryError(e)) => {
            let (_, page) = private_page_refusal(&e).expect("a private-page refusal");
            assert_eq!(page, PRIVATE);
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a private buffer was handed to the device"),
    }
}
