// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The test's two sides: a vhost-user backend device that runs in another process (this
//! test binary, started again with [`BACKEND_ENV`] set), and a frontend that drives its
//! one virtio queue as a guest driver would, on dual-strategy guest memory of a real VM
//! whose memory attributes a stand-in records (so it runs on hosts without them).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use guest_memfd::{Capabilities, PageRange, VmOps, PAGE_SIZE};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use kvm_ioctls::{Kvm, VmFd};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vm_private_memory::{MemoryBuilder, PageState, PrivateMemory, Strategy};
use vm_private_memory_vhost_user::{VhostUserAttachment, VhostUserMapper};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::errno;
use vmm_sys_util::eventfd::EventFd;

pub fn pr(start: u64, len: u64) -> PageRange {
    PageRange::new(start, len).unwrap()
}

// ---------------------------------------------------------------------------------------
// Guest memory.

/// A VM that stands in for KVM's memory attributes where the host has none, so the dual
/// strategy runs there too: it forwards every call to a real VM, except that (unless the
/// VM has real attributes) it reports `KVM_CAP_MEMORY_ATTRIBUTES` = PRIVATE and accepts
/// `KVM_SET_MEMORY_ATTRIBUTES` without making it.
pub struct AttributesStandIn {
    inner: VmFd,
    /// The VM has memory attributes of its own (a `KVM_X86_SW_PROTECTED_VM` in the lab):
    /// forward those calls too.
    real: bool,
    /// (device, inode) of every guest_memfd created through it.
    guest_memfds: Mutex<Vec<(u64, u64)>>,
}

impl VmOps for AttributesStandIn {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        if cap == KVM_CAP_MEMORY_ATTRIBUTES && !self.real {
            return KVM_MEMORY_ATTRIBUTE_PRIVATE as i32;
        }
        VmOps::check_extension_raw(&self.inner, cap)
    }

    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error> {
        let fd = VmOps::create_guest_memfd(&self.inner, request)?;
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        self.guest_memfds
            .lock()
            .unwrap()
            .push((meta.dev(), meta.ino()));
        Ok(fd)
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error> {
        // SAFETY: the caller upholds the trait's contract, which is the same for the VM
        // this forwards to.
        unsafe { VmOps::set_user_memory_region2(&self.inner, region) }
    }

    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<(), errno::Error> {
        if self.real {
            return VmOps::set_memory_attributes(&self.inner, attributes);
        }
        Ok(())
    }
}

/// Guest memory size: one region at 0.
pub const MEMORY: u64 = 4 << 20;
/// The split virtqueue: descriptor table, available ring, used ring (one page each).
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
/// The request's buffers: what the device reads, what it writes, its status byte.
pub const INPUT: u64 = 0x10000;
pub const OUTPUT: u64 = 0x11000;
pub const STATUS: u64 = 0x12000;
pub const QUEUE_SIZE: u16 = 16;

/// A VM of the first type with memory attributes of its own, if the host has one.
fn vm_with_memory_attributes(kvm: &Kvm) -> Option<VmFd> {
    let system = Capabilities::of_system(kvm);
    (0..64)
        .filter(|t| system.supports_vm_type(*t))
        .filter_map(|t| kvm.create_vm_with_type(t.into()).ok())
        .find(|vm| Capabilities::of_vm(vm).dual_capable())
}

/// Dual-strategy memory, all private but for the ring pages and the three buffer pages,
/// and the (device, inode) of its guest_memfd. On a VM type with memory attributes where
/// the host has one (the lab), else on a default VM with the stand-in.
pub fn dual_memory() -> (PrivateMemory, (u64, u64)) {
    let kvm = Kvm::new().unwrap();
    let (inner, real) = match vm_with_memory_attributes(&kvm) {
        Some(vm) => (vm, true),
        None => (kvm.create_vm().unwrap(), false),
    };
    println!(
        "dual memory with {} memory attributes",
        if real { "real" } else { "stand-in" }
    );
    let vm = Arc::new(AttributesStandIn {
        inner,
        real,
        guest_memfds: Mutex::default(),
    });
    let memory = MemoryBuilder::new(vm.clone())
        .region_at(0, MEMORY)
        .strategy(Strategy::Dual)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    memory
        .convert(pr(DESC, 3 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    memory
        .convert(pr(INPUT, 3 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    let guest_memfd = vm.guest_memfds.lock().unwrap()[0];
    (memory, guest_memfd)
}

/// The pages of `range` that are shared now.
pub fn shared_pages(memory: &PrivateMemory, range: PageRange) -> BTreeSet<u64> {
    let snapshot = memory.shared_pages().snapshot();
    snapshot
        .runs(range)
        .flat_map(|run| pages(run.guest_range()))
        .collect()
}

pub fn pages(range: PageRange) -> impl Iterator<Item = u64> {
    (0..range.page_count()).map(move |p| range.start() + p * PAGE_SIZE)
}

/// The frontend's host address of shared guest page `gpa`.
pub fn host_address(memory: &PrivateMemory, gpa: u64) -> u64 {
    let snapshot = memory.shared_pages().snapshot();
    let run = snapshot.runs(pr(gpa, PAGE_SIZE)).next().unwrap();
    run.host_address() as u64
}

/// Bytes the sealed memfd of shared pages holds.
pub fn shared_bytes_held(memory: &PrivateMemory) -> u64 {
    memory.backing(0).unwrap().shared_bytes_held.unwrap()
}

/// (device, inode) of the sealed memfd of shared pages.
pub fn memfd_id(memory: &PrivateMemory) -> (u64, u64) {
    let snapshot = memory.shared_pages().snapshot();
    let run = snapshot.runs(pr(DESC, PAGE_SIZE)).next().unwrap();
    let fd = run.file().unwrap().fd.try_clone_to_owned().unwrap();
    let memfd = std::fs::File::from(fd).metadata().unwrap();
    (memfd.dev(), memfd.ino())
}

// ---------------------------------------------------------------------------------------
// The backend device, in its own process.

/// Set (to the socket's path) in the environment of the backend's process.
pub const BACKEND_ENV: &str = "VM_PRIVATE_MEMORY_VHOST_USER_TEST_BACKEND";
/// The test that serves as the backend's `main` when [`BACKEND_ENV`] is set.
pub const BACKEND_TEST: &str = "backend_process";
/// An input whose first byte is this makes the device hold the request for
/// [`SLOW_FOR`] between reading its input and writing its output.
pub const SLOW: u8 = b'S';
pub const SLOW_FOR: Duration = Duration::from_millis(400);

/// What the device reports through its config space: failed requests, the guest address
/// of the last access that failed, requests served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub failed: u64,
    pub last_failed: u64,
    pub served: u64,
}

impl Stats {
    fn to_bytes(self) -> [u8; 24] {
        let mut b = [0; 24];
        b[..8].copy_from_slice(&self.failed.to_le_bytes());
        b[8..16].copy_from_slice(&self.last_failed.to_le_bytes());
        b[16..].copy_from_slice(&self.served.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Self {
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        Stats {
            failed: word(0),
            last_failed: word(8),
            served: word(16),
        }
    }
}

/// A copy device: it reads the chain's device-readable buffers, writes them into its
/// first device-writable buffer, and sets the last (one byte) to 0, or to 1 if an access
/// failed (an address not in its memory table), which it also counts.
#[derive(Clone, Default)]
struct CopyDevice {
    inner: Arc<DeviceState>,
}

#[derive(Default)]
struct DeviceState {
    /// Held for reading while a worker processes the queue, for writing by
    /// `update_memory`: once the daemon acks a memory-table change, no worker still
    /// accesses memory through a mapping the change removed.
    busy: RwLock<()>,
    memory: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    stats: Mutex<Stats>,
}

/// A failed access: the guest address.
struct Failed(u64);

impl CopyDevice {
    fn serve(&self, vring: &VringRwLock) -> io::Result<()> {
        let _busy = self.inner.busy.read().unwrap();
        let Some(atomic) = self.inner.memory.lock().unwrap().clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.collect();
            let (readable, writable): (Vec<&Descriptor>, Vec<&Descriptor>) =
                descriptors.iter().partition(|d| !d.is_write_only());
            let Some((status, outputs)) = writable.split_last() else {
                vring.add_used(head, 0).map_err(io::Error::other)?;
                continue;
            };
            let result = (|| {
                let mut input = Vec::new();
                for d in &readable {
                    let mut part = vec![0; d.len() as usize];
                    mem.read_slice(&mut part, d.addr())
                        .map_err(|_| Failed(d.addr().0))?;
                    input.extend(part);
                }
                if input.first() == Some(&SLOW) {
                    std::thread::sleep(SLOW_FOR);
                }
                let mut written = 0usize;
                for d in outputs {
                    let n = (d.len() as usize).min(input.len() - written);
                    mem.write_slice(&input[written..written + n], d.addr())
                        .map_err(|_| Failed(d.addr().0))?;
                    written += n;
                }
                Ok::<_, Failed>(written)
            })();
            let used = match result {
                Ok(written) => {
                    self.inner.stats.lock().unwrap().served += 1;
                    let ok = mem.write_obj(0u8, status.addr()).is_ok();
                    if ok {
                        written as u32 + 1
                    } else {
                        0
                    }
                }
                Err(Failed(gpa)) => {
                    let mut stats = self.inner.stats.lock().unwrap();
                    stats.failed += 1;
                    stats.last_failed = gpa;
                    let _ = mem.write_obj(1u8, status.addr());
                    0
                }
            };
            vring.add_used(head, used).map_err(io::Error::other)?;
        }
        vring.signal_used_queue()
    }
}

impl VhostUserBackend for CopyDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE as usize
    }

    fn features(&self) -> u64 {
        (1 << virtio_bindings_version_1()) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.inner.stats.lock().unwrap().to_bytes();
        let mut out = vec![0; size as usize];
        for (i, b) in out.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // Wait for every worker: after this, none holds a snapshot of the old memory,
        // whose removed regions are then unmapped, and the daemon may ack.
        let _quiet = self.inner.busy.write().unwrap();
        *self.inner.memory.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.serve(vring),
            None => Ok(()),
        }
    }
}

/// VIRTIO_F_VERSION_1's bit.
fn virtio_bindings_version_1() -> u32 {
    32
}

/// The backend's `main`: serves one frontend on the socket named by [`BACKEND_ENV`], if
/// set, then exits the process.
pub fn serve_if_asked() {
    let Ok(socket) = std::env::var(BACKEND_ENV) else {
        return;
    };
    let mut daemon = VhostUserDaemon::new(
        "copy-device".to_owned(),
        CopyDevice::default(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let result = daemon.serve(&socket);
    std::process::exit(i32::from(result.is_err()));
}

/// The backend's process; killed and reaped when dropped.
pub struct BackendProcess {
    child: Child,
    socket: PathBuf,
}

impl BackendProcess {
    pub fn spawn() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // The lab's L1 has no /tmp until someone makes it.
        std::fs::create_dir_all(std::env::temp_dir()).unwrap();
        let socket = std::env::temp_dir().join(format!(
            "vm-private-memory-vhost-user-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(std::env::current_exe().unwrap())
            .args([BACKEND_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(BACKEND_ENV, &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        BackendProcess { child, socket }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects to the backend, waiting (at most 10 s) for its socket.
    pub fn connect(&self) -> Frontend {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.socket.exists() {
                if let Ok(frontend) = Frontend::connect(&self.socket, 1) {
                    return frontend;
                }
            }
            assert!(Instant::now() < deadline, "the backend did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The pages of the file `(dev, ino)` the backend maps now, by offset in the file.
    pub fn mapped_file_pages(&self, file: (u64, u64)) -> BTreeSet<u64> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap();
        let mut out = BTreeSet::new();
        for line in maps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (range, offset, dev, ino) = (fields[0], fields[2], fields[3], fields[4]);
            if ino.parse::<u64>().unwrap() != file.1 || parse_dev(dev) != file.0 {
                continue;
            }
            let (start, end) = range.split_once('-').unwrap();
            let len =
                u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap();
            let offset = u64::from_str_radix(offset, 16).unwrap();
            out.extend((0..len / PAGE_SIZE).map(|p| offset + p * PAGE_SIZE));
        }
        out
    }

    /// (device, inode) of the files the backend holds open or maps.
    pub fn files_held(&self) -> BTreeSet<(u64, u64)> {
        let mut out = BTreeSet::new();
        for entry in std::fs::read_dir(format!("/proc/{}/fd", self.pid())).unwrap() {
            if let Ok(meta) = std::fs::metadata(entry.unwrap().path()) {
                out.insert((meta.dev(), meta.ino()));
            }
        }
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap();
        for line in maps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            out.insert((parse_dev(fields[3]), fields[4].parse().unwrap()));
        }
        out
    }
}

/// `major:minor` of /proc/PID/maps (hex) as `st_dev`.
fn parse_dev(dev: &str) -> u64 {
    let (major, minor) = dev.split_once(':').unwrap();
    let major = u64::from_str_radix(major, 16).unwrap();
    let minor = u64::from_str_radix(minor, 16).unwrap();
    libc::makedev(major as u32, minor as u32)
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

// ---------------------------------------------------------------------------------------
// The frontend and the guest driver.

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
