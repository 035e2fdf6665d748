// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A supervisor that makes the backend's listening socket and hands it to the backend,
//! as systemd's socket activation or a management daemon passing a descriptor does: the
//! frontend's peer credentials then name the supervisor, which outlives the backend.
//! It is this test binary too, started with [`SUPERVISOR_ENV`] set.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

use vhost::vhost_user::Frontend;

use super::{connect, socket_path, BACKEND_ENV, BACKEND_TEST, LISTEN_FD_ENV};

/// Set (to the socket's path) in the environment of the supervisor's process.
pub const SUPERVISOR_ENV: &str = "VM_PRIVATE_MEMORY_VHOST_USER_TEST_SUPERVISOR";
/// Set in the environment of a supervisor that exits once it has started the backend
/// (a daemon's parent that forks and exits), and of that backend, which then lives on
/// without it.
pub const DAEMONIZE_ENV: &str = "VM_PRIVATE_MEMORY_VHOST_USER_TEST_DAEMONIZE";
/// What the supervisor prints before the backend's pid.
const BACKEND_PID: &str = "supervisor: backend pid ";
/// What the supervisor prints once it has reaped the backend.
const REAPED: &str = "supervisor: backend reaped";

/// The supervisor's `main`: makes the listening socket at `socket`, starts a backend
/// that serves it, prints its pid, reaps it when it exits, says so, and lives on until
/// killed; or, with [`DAEMONIZE_ENV`] set, exits once it has printed the pid.
pub fn supervise(socket: &str) -> ! {
    let listener = UnixListener::bind(socket).unwrap();
    // The backend inherits a duplicate of it: not close-on-exec, unlike the original.
    // SAFETY: F_DUPFD makes a new descriptor of the listening socket this process owns;
    // it touches no memory.
    let inherited = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_DUPFD, 3) };
    assert!(inherited >= 0, "{}", std::io::Error::last_os_error());
    let mut backend = Command::new(std::env::current_exe().unwrap())
        .args([BACKEND_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env_remove(SUPERVISOR_ENV)
        .env(BACKEND_ENV, socket)
        .env(LISTEN_FD_ENV, inherited.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // SAFETY: `inherited` is this process's own descriptor, which nothing else here
    // uses; the backend has its copy.
    unsafe { libc::close(inherited) };
    println!("{BACKEND_PID}{}", backend.id());
    if std::env::var_os(DAEMONIZE_ENV).is_some() {
        // The backend lives on without its parent (and without its listening socket's
        // maker), as a daemon's child does.
        std::process::exit(0);
    }
    backend.wait().unwrap();
    println!("{REAPED}");
    // The supervisor lives on, holding its listening socket.
    loop {
        std::thread::park();
    }
}

/// A supervisor process and the backend it started; both killed when dropped (the
/// backend goes with the supervisor, `PR_SET_PDEATHSIG`, or, once the supervisor has
/// exited, is killed through a pidfd of it).
pub struct Supervised {
    supervisor: Child,
    said: BufReader<ChildStdout>,
    socket: PathBuf,
    /// The backend's pid.
    pub backend_pid: u32,
    /// A pidfd of the backend, once its supervisor has exited: this process is not its
    /// parent and cannot reap it, and its pid could be reused once it exits.
    orphan: Option<OwnedFd>,
}

impl Supervised {
    /// Starts a supervisor, and waits for it to start the backend.
    pub fn spawn() -> Self {
        Self::start(false)
    }

    /// Starts a supervisor that exits once it has started the backend, as a daemon's
    /// parent does; waits for it to exit and reaps it. The backend runs on.
    pub fn spawn_and_exit() -> Self {
        let mut supervised = Self::start(true);
        let status = supervised.supervisor.wait().unwrap();
        assert!(status.success(), "the supervisor failed: {status}");
        supervised
    }

    fn start(daemonize: bool) -> Self {
        let socket = socket_path();
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([BACKEND_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(SUPERVISOR_ENV, &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if daemonize {
            command.env(DAEMONIZE_ENV, "1");
        }
        let mut supervisor = command.spawn().unwrap();
        let mut said = BufReader::new(supervisor.stdout.take().unwrap());
        let backend_pid: u32 = Self::wait_for(&mut said, BACKEND_PID).parse().unwrap();
        let orphan = daemonize.then(|| {
            // SAFETY: pidfd_open takes a pid and flags and touches no memory; the backend
            // waits for a connection, so its pid is still its own.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, backend_pid, 0) };
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            // SAFETY: the kernel just made this descriptor for this process.
            unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
        });
        Supervised {
            supervisor,
            said,
            socket,
            backend_pid,
            orphan,
        }
    }

    /// Reads what the supervisor says until a line with `prefix` in it (libtest may
    /// have begun the line); the rest of that line.
    fn wait_for(said: &mut BufReader<ChildStdout>, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                said.read_line(&mut line).unwrap() > 0,
                "the supervisor exited"
            );
            if let Some((_, rest)) = line.trim_end().split_once(prefix) {
                return rest.to_owned();
            }
        }
    }

    pub fn supervisor_pid(&self) -> u32 {
        self.supervisor.id()
    }

    /// Connects to the backend through the supervisor's socket.
    pub fn connect(&self) -> Frontend {
        connect(&self.socket)
    }

    /// Kills the backend (SIGKILL), and waits for the supervisor to reap it.
    pub fn kill_backend(&mut self) {
        // SAFETY: kill takes a pid and a signal and touches no memory; the backend is
        // not reaped yet, so its pid is still its own.
        let killed = unsafe { libc::kill(self.backend_pid as libc::pid_t, libc::SIGKILL) };
        assert_eq!(killed, 0, "{}", std::io::Error::last_os_error());
        Self::wait_for(&mut self.said, REAPED);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(pidfd) = &self.orphan {
            // SAFETY: pidfd_send_signal takes a pidfd this owns, a signal, no siginfo
            // and no flags; it touches no memory of this process.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
