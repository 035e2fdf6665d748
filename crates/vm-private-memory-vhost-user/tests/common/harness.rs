// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The frontend and the guest driver.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use guest_memfd::PageRange;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::PrivateMemoryManager;
use vm_private_memory_vhost_user::{VhostUserAttachment, VhostUserMapper};
use vmm_sys_util::eventfd::EventFd;

use super::*;

/// What the device answered to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub used_len: u32,
    pub status: u8,
}

/// How a [`Harness`] is made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// The mapper's slot budget (the backend's if `None`).
    pub budget: Option<usize>,
    /// A second region at [`HIGH`], with its first page shared; the mapper is attached
    /// to both.
    pub high_region: bool,
    /// The mapper's reply deadline (the default if `None`).
    pub reply_timeout: Option<Duration>,
    /// Gives the mapper the backend's pid (`with_backend_pid`), rather than leave it to
    /// the socket's peer (the same process here).
    pub give_backend_pid: bool,
}

/// A VMM's frontend with the mapper attached, and a guest driver for the queue.
pub struct Harness {
    pub memory: PrivateMemoryManager,
    /// (device, inode) of the memory's guest_memfd.
    pub guest_memfd: (u64, u64),
    /// (device, inode) of each region's sealed memfd of shared pages.
    pub memfds: BTreeSet<(u64, u64)>,
    options: Options,
    attachment: Option<VhostUserAttachment>,
    pub frontend: Frontend,
    pub backend: BackendProcess,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
}

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Acknowledges the features the mapper needs and `CONFIG` (the device's statistics and
/// control); returns the protocol features acknowledged.
pub fn negotiate(frontend: &mut Frontend) -> VhostUserProtocolFeatures {
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    let offered = frontend.get_protocol_features().unwrap();
    let acked = offered
        & (VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG);
    frontend.set_protocol_features(acked).unwrap();
    frontend.set_owner().unwrap();
    acked
}

impl Harness {
    /// Dual memory, a backend process, the mapper attached to the whole memory (with
    /// `budget` slots, or the backend's), and the queue set up.
    pub fn new(budget: Option<usize>) -> Self {
        Self::with(Options {
            budget,
            ..Options::default()
        })
    }

    /// As [`Harness::new`], made as `options` say.
    pub fn with(options: Options) -> Self {
        let (memory, guest_memfd) = dual_memory_with(options.high_region);
        let mut memfds: BTreeSet<_> = [memfd_id(&memory)].into();
        if options.high_region {
            memfds.insert(memfd_of(&memory, HIGH));
        }
        let backend = BackendProcess::spawn();
        let frontend = backend.connect();
        let mut h = Harness {
            memory,
            guest_memfd,
            memfds,
            options,
            attachment: None,
            frontend,
            backend,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
            avail_idx: 0,
        };
        h.attach();
        h
    }

    /// What the mapper is attached to.
    pub fn attached_range(&self) -> PageRange {
        if self.options.high_region {
            pr(0, HIGH + HIGH_SIZE)
        } else {
            pr(0, MEMORY)
        }
    }

    /// Negotiates with the backend behind `self.frontend`, attaches a mapper, and sets
    /// the queue up where the guest driver is.
    fn attach(&mut self) {
        let acked = negotiate(&mut self.frontend);
        let mut mapper = VhostUserMapper::new(self.frontend.clone(), acked, &self.memory).unwrap();
        if let Some(budget) = self.options.budget {
            mapper = mapper.with_slot_budget(budget);
        }
        if let Some(timeout) = self.options.reply_timeout {
            mapper = mapper.with_reply_timeout(timeout);
        }
        if self.options.give_backend_pid {
            mapper = mapper.with_backend_pid(self.backend.pid()).unwrap();
        }
        let range = self.attached_range();
        self.attachment = Some(mapper.attach(&self.memory, range).unwrap());

        // The queue, at the frontend's host addresses of the ring pages.
        let frontend = &mut self.frontend;
        frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: host_address(&self.memory, DESC),
            used_ring_addr: host_address(&self.memory, USED),
            avail_ring_addr: host_address(&self.memory, AVAIL),
            log_addr: None,
        };
        frontend.set_vring_addr(0, &config).unwrap();
        frontend.set_vring_base(0, self.avail_idx).unwrap();
        self.kick = EventFd::new(0).unwrap();
        self.call = EventFd::new(0).unwrap();
        frontend.set_vring_call(0, &self.call).unwrap();
        frontend.set_vring_kick(0, &self.kick).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
    }

    /// Starts a new backend process (the old one is killed and reaped) and attaches a new
    /// mapper to it, as a VMM does for a reconnected backend. The old attachment must be
    /// gone.
    pub fn reconnect(&mut self) {
        assert!(
            self.attachment.is_none(),
            "the old attachment is still there"
        );
        self.backend = BackendProcess::spawn();
        self.frontend = self.backend.connect();
        self.attach();
    }

    /// Takes the attachment away (to detach it, or declare its backend exited).
    pub fn take_attachment(&mut self) -> VhostUserAttachment {
        self.attachment.take().unwrap()
    }

    /// Tells the backend's relay how to answer removals (`REM_MEM_REG`) from now on,
    /// after passing `first` more through.
    pub fn set_removals(&mut self, answer: Answer, first: u8) {
        self.set_answer(answer, Of::Removals, first);
    }

    /// As [`Harness::set_removals`], for additions (`ADD_MEM_REG`).
    pub fn set_additions(&mut self, answer: Answer, first: u8) {
        self.set_answer(answer, Of::Additions, first);
    }

    /// As [`Harness::set_removals`], for the requests `of` says.
    pub fn set_answer(&mut self, answer: Answer, of: Of, first: u8) {
        self.frontend
            .set_config(
                CONTROL_OFFSET,
                VhostUserConfigFlags::empty(),
                &answer.control(of, first),
            )
            .unwrap();
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
        let view = self.memory.guest_memory();
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
        let view = self.memory.guest_memory();
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
    /// mappings of the memfds are the same pages of the same files.
    pub fn assert_backend_maps_the_table(&self) {
        let table: BTreeSet<((u64, u64), u64)> = self
            .attachment
            .iter()
            .flat_map(VhostUserAttachment::regions)
            .flat_map(|r| {
                let file = memfd_of(&self.memory, r.guest.start());
                pages(r.guest).map(move |p| (file, p - r.guest.start() + r.mmap_offset))
            })
            .collect();
        let mapped: BTreeSet<((u64, u64), u64)> = self
            .memfds
            .iter()
            .flat_map(|f| {
                self.backend
                    .mapped_file_pages(*f)
                    .into_iter()
                    .map(move |o| (*f, o))
            })
            .collect();
        assert_eq!(mapped, table);
    }

    pub fn read_output(&self, len: usize) -> Vec<u8> {
        self.read(OUTPUT, len)
    }

    /// `len` bytes of guest memory at `gpa`, read by the frontend.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let view = self.memory.guest_memory();
        let mut buf = vec![0; len];
        view.memory()
            .read_slice(&mut buf, GuestAddress(gpa))
            .unwrap();
        buf
    }
}
