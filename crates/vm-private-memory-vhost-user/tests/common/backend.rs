// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The backend device, in its own process.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use guest_memfd::PAGE_SIZE;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Frontend;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::QUEUE_SIZE;

/// Set (to the socket's path) in the environment of the backend's process.
pub const BACKEND_ENV: &str = "VM_PRIVATE_MEMORY_VHOST_USER_TEST_BACKEND";
/// Set, in the backend's environment, to a listening socket's descriptor that it
/// inherited (from a [`supervise`](super::supervisor) process): it serves that instead
/// of making its own.
pub const LISTEN_FD_ENV: &str = "VM_PRIVATE_MEMORY_VHOST_USER_TEST_LISTEN_FD";
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

    pub fn from_bytes(b: &[u8]) -> Self {
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
/// set, then exits the process. The daemon talks to the frontend through the relay
/// ([`relay`](super::relay)), which the frontend can tell to refuse, or never answer,
/// removals and additions.
pub fn serve_if_asked() {
    if let Ok(socket) = std::env::var(super::SUPERVISOR_ENV) {
        super::supervisor::supervise(&socket);
    }
    let Ok(socket) = std::env::var(BACKEND_ENV) else {
        return;
    };
    let mut daemon = VhostUserDaemon::new(
        "copy-device".to_owned(),
        CopyDevice::default(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    // The daemon connects to the relay as a client; then the relay listens for the
    // frontend on the socket the test named.
    let inner = PathBuf::from(format!("{socket}.daemon"));
    let _ = std::fs::remove_file(&inner);
    let listener = UnixListener::bind(&inner).unwrap();
    daemon.start_client(inner.to_str().unwrap()).unwrap();
    let (daemon_side, _) = listener.accept().unwrap();
    let _ = std::fs::remove_file(&inner);
    let listener = match std::env::var(LISTEN_FD_ENV) {
        Ok(fd) => {
            // Started by a supervisor: this process goes with it, unless the supervisor
            // exits at once, as a daemon's parent does.
            if std::env::var_os(super::DAEMONIZE_ENV).is_none() {
                // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no
                // memory.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            }
            // SAFETY: the supervisor passed this descriptor, a listening socket, for
            // this process to own; nothing else in it uses the descriptor.
            unsafe { UnixListener::from_raw_fd(fd.parse().unwrap()) }
        }
        Err(_) => UnixListener::bind(&socket).unwrap(),
    };
    let (frontend_side, _) = listener.accept().unwrap();
    super::relay::relay(frontend_side, daemon_side);
    std::process::exit(0);
}

/// The backend's process; killed and reaped when dropped.
pub struct BackendProcess {
    child: Child,
    socket: PathBuf,
}

impl BackendProcess {
    pub fn spawn() -> Self {
        let socket = socket_path();
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

    /// Kills the backend (SIGKILL) and leaves it unreaped: a zombie, whose mappings are
    /// gone, until [`BackendProcess::reap`].
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
    }

    /// Waits for the backend to exit, and reaps it.
    pub fn reap(&mut self) {
        self.child.wait().unwrap();
    }

    /// Connects to the backend, waiting (at most 10 s) for its socket.
    pub fn connect(&self) -> Frontend {
        connect(&self.socket)
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

/// A new path for a backend's socket, nothing there yet.
pub fn socket_path() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // The lab's L1 has no /tmp until someone makes it.
    std::fs::create_dir_all(std::env::temp_dir()).unwrap();
    let socket = std::env::temp_dir().join(format!(
        "vm-private-memory-vhost-user-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&socket);
    socket
}

/// Connects to the backend's socket at `socket`, waiting (at most 10 s) for it.
pub fn connect(socket: &Path) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if socket.exists() {
            if let Ok(frontend) = Frontend::connect(socket, 1) {
                return frontend;
            }
        }
        assert!(Instant::now() < deadline, "the backend did not listen");
        std::thread::sleep(Duration::from_millis(10));
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
