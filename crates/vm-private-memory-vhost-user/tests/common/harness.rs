// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The frontend and the guest driver.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::PrivateMemory;
use vm_private_memory_vhost_user::{VhostUserAttachment, VhostUserMapper};
use vmm_sys_util::eventfd::EventFd;

use super::*;

/// What the device answered to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub used_len: u32,
    pub status: u8,
}

/// A VMM's frontend with the mapper attached, and a guest driver for the queue.
pub struct Harness {
    pub memory: PrivateMemory,
    /// (device, inode) of the memory's guest_memfd.
    pub guest_memfd: (u64, u64),
    attachment: Option<VhostUserAttachment>,
    pub frontend: Frontend,
    pub backend: BackendProcess,
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
}

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

impl Harness {
    /// Dual memory, a backend process, the mapper attached to the whole memory (with
    /// `budget` slots, or the backend's), and the queue set up.
    pub fn new(budget: Option<usize>) -> Self {
        let (memory, guest_memfd) = dual_memory();
        let backend = BackendProcess::spawn();
        let mut frontend = backend.connect();
        let features = frontend.get_features().unwrap();
        frontend.set_features(features).unwrap();
        let offered = frontend.get_protocol_features().unwrap();
        let acked = offered
            & (VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG);
        frontend.set_protocol_features(acked).unwrap();
        frontend.set_owner().unwrap();
        let mut mapper = VhostUserMapper::new(frontend.clone(), acked, &memory).unwrap();
        if let Some(budget) = budget {
            mapper = mapper.with_slot_budget(budget);
        }
        let attachment = mapper.attach(&memory, pr(0, MEMORY)).unwrap();

        // The queue, at the frontend's host addresses of the ring pages.
        frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: host_address(&memory, DESC),
            used_ring_addr: host_address(&memory, USED),
            avail_ring_addr: host_address(&memory, AVAIL),
            log_addr: None,
        };
        frontend.set_vring_addr(0, &config).unwrap();
        frontend.set_vring_base(0, 0).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        frontend.set_vring_call(0, &call).unwrap();
        frontend.set_vring_kick(0, &kick).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
        Harness {
            memory,
            guest_memfd,
            attachment: Some(attachment),
            frontend,
            backend,
            kick,
            _call: call,
            avail_idx: 0,
        }
    }

    /// The mapper, attached.
    pub fn mapper(&self) -> &VhostUserAttachment {
        self.attachment.as_ref().unwrap()
    }

    /// Detaches the mapper.
    pub fn detach(&mut self) {
        self.attachment.take().unwrap().detach().unwrap();
    }

    /// Puts a request in the queue (as a guest driver: descriptors, then the available
    /// ring, then its index) and kicks the device: `input` at [`INPUT`], `output_len`
    /// bytes at `output`, the status byte at [`STATUS`] (set to 0xff first).
    pub fn submit(&mut self, input: &[u8], output: u64, output_len: u32) {
        let view = self.memory.memory();
        let mem = view.memory();
        mem.write_slice(input, GuestAddress(INPUT)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let chain = [
            (INPUT, input.len() as u32, VIRTQ_DESC_F_NEXT),
            (output, output_len, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE),
            (STATUS, 1, VIRTQ_DESC_F_WRITE),
        ];
        for (i, (addr, len, flags)) in chain.into_iter().enumerate() {
            let at = DESC + 16 * i as u64;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(i as u16 + 1, GuestAddress(at + 14)).unwrap();
        }
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();
    }

    /// Waits (at most 10 s) for the device to use the last request, and reads its answer.
    pub fn complete(&self) -> Completion {
        let view = self.memory.memory();
        let mem = view.memory();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != self.avail_idx {
            assert!(Instant::now() < deadline, "the device did not answer");
            std::thread::sleep(Duration::from_millis(1));
        }
        let slot = u64::from(self.avail_idx.wrapping_sub(1) % QUEUE_SIZE);
        let used_len = mem
            .read_obj::<u32>(GuestAddress(USED + 4 + 8 * slot + 4))
            .unwrap();
        let status = mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
        Completion { used_len, status }
    }

    /// One request, start to end.
    pub fn request(&mut self, input: &[u8], output: u64, output_len: u32) -> Completion {
        self.submit(input, output, output_len);
        self.complete()
    }

    /// What the device reports (its config space, read with `GET_CONFIG`).
    pub fn stats(&mut self) -> Stats {
        let buf = [0u8; 24];
        let (_, bytes) = self
            .frontend
            .get_config(0, 24, VhostUserConfigFlags::empty(), &buf)
            .unwrap();
        Stats::from_bytes(&bytes)
    }

    /// Checks that the backend's table (as the mapper made it) and the backend's own
    /// mappings of the memfd are the same pages.
    pub fn assert_backend_maps_the_table(&self) {
        let memfd = memfd_id(&self.memory);
        let table: BTreeSet<u64> = self
            .attachment
            .iter()
            .flat_map(VhostUserAttachment::regions)
            .flat_map(|r| pages(r.guest).map(move |p| p - r.guest.start() + r.mmap_offset))
            .collect();
        assert_eq!(self.backend.mapped_file_pages(memfd), table);
    }

    pub fn read_output(&self, len: usize) -> Vec<u8> {
        let view = self.memory.memory();
        let mut buf = vec![0; len];
        view.memory()
            .read_slice(&mut buf, GuestAddress(OUTPUT))
            .unwrap();
        buf
    }
}
