//! Running for months: the pidfile (exclusively locked, written atomically) and detaching from
//! the terminal (`--daemon`).
//!
//! The lock is a POSIX record lock (`fcntl(F_SETLK)`) on `<pidfile>.lock`, taken before
//! anything else starts: a second master on the same pidfile is refused with the pid of the
//! first; a pidfile left by a killed master is not locked by anyone and is taken over. A record
//! lock belongs to the process, not to the open file: no forked child (a worker, a probe, or a
//! process a plugin's `init` forked) ever holds it, so none can outlive the master and wedge
//! the next start — an `flock` did exactly that, being shared by every copy of the descriptor a
//! fork made (`O_CLOEXEC` closes it only on exec, and a plugin need not exec). The pid itself is written to `<pidfile>` through
//! a temporary file and a rename, so a reader never sees half of it. Every file it opens is
//! opened with `O_NOFOLLOW` (a symlink planted at the lock, the pidfile or its temporary is
//! refused or unlinked, never followed), and the temporary with `O_EXCL`.
//!
//! Detaching happens after the plugins are loaded and the sockets bound, so start-up errors
//! still reach the terminal and the exit status: the launching process waits on a pipe until
//! the daemon says it is up (or why it is not). This module never removes the pidfile of a
//! master that did not exit cleanly, never writes through a symlink, and never opens the lock
//! file a second time in the master (closing any descriptor of it would drop the record lock).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("already running as pid {pid} (pidfile {path} is locked)")]
    AlreadyRunning { pid: String, path: PathBuf },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Startup(String),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Io { context, source }
}

/// The held pidfile lock.
///
/// A master holds byte [`LAUNCHER_BYTE`] or [`DAEMON_BYTE`] of the lock file, or both; a master
/// starting asks for both at once ([`Pidfile::acquire`]), so it is refused while any other
/// holds either. The two bytes let `--daemon` hand the lock from the launcher to the daemon
/// with no moment at which nobody holds it (a record lock is not inherited across fork): the
/// launcher gives up the daemon's byte before forking and keeps its own until it exits, which
/// is after the daemon took its byte ([`detach`]).
pub struct Pidfile {
    path: PathBuf,
    /// The lock file. Closing it (or any other descriptor of that file) in the master would
    /// drop the lock; a forked child closing its copy drops nothing, as it holds no lock.
    lock: File,
}

/// The byte a launcher holds until it exits.
const LAUNCHER_BYTE: i64 = 0;
/// The byte the running master holds (taken over by the daemon with `--daemon`).
const DAEMON_BYTE: i64 = 1;

/// Sets a POSIX record lock on `len` bytes from `start` of `file` (`F_WRLCK` or `F_UNLCK`),
/// without waiting.
fn record_lock(file: &File, kind: i32, start: i64, len: i64) -> io::Result<()> {
    let lock = nix::libc::flock {
        l_type: kind as _,
        l_whence: nix::libc::SEEK_SET as _,
        l_start: start,
        l_len: len,
        l_pid: 0,
    };
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_SETLK(&lock))
        .map(|_| ())
        .map_err(io::Error::from)
}

impl Pidfile {
    /// Takes the lock, or says who holds it.
    pub fn acquire(path: &Path) -> Result<Pidfile, DaemonError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(io_err(format!("cannot create {}", dir.display())))?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(NO_FOLLOW)
            .open(&lock_path)
            .map_err(|e| refuse_link(&lock_path, "the pidfile lock", e))?;
        regular(&lock, &lock_path, "the pidfile lock")?;
        // Both bytes at once: refused while another master holds either (see [`Pidfile`]).
        match record_lock(&lock, nix::libc::F_WRLCK, LAUNCHER_BYTE, 2) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EAGAIN) | Some(nix::libc::EACCES)
                ) =>
            {
                let pid = read_pid(path).unwrap_or_default();
                let pid = if pid.is_empty() {
                    "unknown (it is still starting)".to_string()
                } else {
                    pid
                };
                return Err(DaemonError::AlreadyRunning {
                    pid,
                    path: path.to_owned(),
                });
            }
            Err(e) => {
                return Err(io_err(format!("cannot lock {}", lock_path.display()))(e));
            }
        }
        if let Some(old) = read_pid(path) {
            log::warn!(
                "taking over the stale pidfile {} (pid {} is gone)",
                path.display(),
                old
            );
        }
        Ok(Pidfile {
            path: path.to_owned(),
            lock,
        })
    }

    /// The lock file, for the handoff in [`detach`].
    fn lock_file(&self) -> &File {
        &self.lock
    }

    /// Writes `pid` to the pidfile atomically: a temporary created with `O_EXCL | O_NOFOLLOW`
    /// (a stale one — a crashed master's, or a symlink someone planted — is unlinked, never
    /// followed; we hold the lock, so no other master is writing it), then renamed over the
    /// pidfile (which replaces a symlink there instead of following it).
    pub fn write(&self, pid: u32) -> Result<(), DaemonError> {
        let tmp = PathBuf::from(format!("{}.tmp", self.path.display()));
        let context = format!("cannot write the pidfile {}", self.path.display());
        let create = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(NO_FOLLOW)
                .open(&tmp)
        };
        let mut file = match create() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                log::warn!("removing the stale {} (not following it)", tmp.display());
                fs::remove_file(&tmp).map_err(io_err(format!(
                    "{context}: cannot remove the stale {}",
                    tmp.display()
                )))?;
                create().map_err(io_err(context.clone()))?
            }
            other => other.map_err(io_err(context.clone()))?,
        };
        if let Err(e) = file.write_all(format!("{pid}\n").as_bytes()) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(context)(e));
        }
        fs::rename(&tmp, &self.path).map_err(io_err(context))
    }

    /// A clean exit: remove the pidfile. The lock file stays: unlinking it while a second
    /// master has it open and waits for the lock would let a third lock a new file of the
    /// same name, and two masters would run.
    pub fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Flags for every file this module opens: never through a symlink at the final name.
const NO_FOLLOW: i32 = nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK;

/// A clear error for a symlink where jobhost writes a file.
fn refuse_link(path: &Path, what: &str, e: io::Error) -> DaemonError {
    if e.raw_os_error() == Some(nix::libc::ELOOP) {
        DaemonError::Startup(format!(
            "{what} {} is a symbolic link; jobhost never follows a link for a file it writes: remove it",
            path.display()
        ))
    } else {
        io_err(format!("cannot open {what} {}", path.display()))(e)
    }
}

/// Refuses anything but a regular file (a FIFO, a device) where jobhost writes a file.
fn regular(file: &File, path: &Path, what: &str) -> Result<(), DaemonError> {
    let meta = file
        .metadata()
        .map_err(io_err(format!("cannot stat {what} {}", path.display())))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(DaemonError::Startup(format!(
            "{what} {} is not a regular file: remove it",
            path.display()
        )))
    }
}

/// The pid in a pidfile, read without following a symlink or blocking on a FIFO.
fn read_pid(path: &Path) -> Option<String> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(NO_FOLLOW)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    (&mut file).take(64).read_to_string(&mut text).ok()?;
    Some(text.trim().to_string())
}

/// The daemon's end of the ready pipe: tells the waiting launcher how start-up ended.
pub struct Ready {
    pipe: File,
}

impl Ready {
    /// Start-up succeeded: the launcher exits 0.
    pub fn ok(mut self) {
        let _ = self.pipe.write_all(b"ok");
    }

    /// Start-up failed after detaching: the launcher prints `message` and exits 1.
    pub fn fail(mut self, message: &str) {
        let _ = self.pipe.write_all(format!("err {message}").as_bytes());
    }
}

/// Detaches from the terminal: fork (the launcher waits for the daemon's word, then exits),
/// setsid, fork again (so the daemon can never reacquire a terminal), chdir /, stdio to
/// /dev/null. Returns in the daemon only. Call it from a single-threaded process.
///
/// The pidfile lock goes with it (a record lock is not inherited by fork): the launcher gives
/// up the daemon's byte before forking, keeping its own, so a master starting meanwhile is
/// still refused; the daemon takes that byte before it says it is up, and the launcher keeps
/// its byte until it hears so and exits.
pub fn detach(pidfile: &Pidfile) -> Result<Ready, DaemonError> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| io_err("cannot create the ready pipe")(io::Error::from(e)))?;
    record_lock(pidfile.lock_file(), nix::libc::F_UNLCK, DAEMON_BYTE, 1)
        .map_err(io_err("cannot hand the pidfile lock over to the daemon"))?;
    // SAFETY: single-threaded caller; the launcher only waits and exits.
    match unsafe { fork() }.map_err(|e| io_err("cannot fork")(io::Error::from(e)))? {
        ForkResult::Parent { child } => {
            drop(write_end);
            let _ = waitpid(child, None); // the intermediate child exits at once
            std::process::exit(wait_for_word(read_end));
        }
        ForkResult::Child => {}
    }
    drop(read_end);
    nix::unistd::setsid().map_err(|e| io_err("setsid")(io::Error::from(e)))?;
    // SAFETY: as above; the intermediate child only exits.
    match unsafe { fork() }.map_err(|e| io_err("cannot fork")(io::Error::from(e)))? {
        // SAFETY: `_exit` skips the destructors and atexit handlers the daemon still needs.
        ForkResult::Parent { .. } => unsafe { nix::libc::_exit(0) },
        ForkResult::Child => {}
    }
    // Nobody else can hold it: a starting master asks for both bytes, and the launcher holds
    // the other one until we say we are up.
    record_lock(pidfile.lock_file(), nix::libc::F_WRLCK, DAEMON_BYTE, 1)
        .map_err(io_err("cannot take over the pidfile lock in the daemon"))?;
    nix::unistd::chdir("/").map_err(|e| io_err("chdir /")(io::Error::from(e)))?;
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_err("open /dev/null"))?;
    let dup = |r: nix::Result<()>| {
        r.map_err(|e| io_err("redirect stdio to /dev/null")(io::Error::from(e)))
    };
    dup(nix::unistd::dup2_stdin(&null))?;
    dup(nix::unistd::dup2_stdout(&null))?;
    dup(nix::unistd::dup2_stderr(&null))?;
    Ok(Ready {
        pipe: File::from(write_end),
    })
}

/// The launcher: print what the daemon reported; exit 0 only on "ok".
fn wait_for_word(pipe: OwnedFd) -> i32 {
    let mut word = String::new();
    let _ = File::from(pipe).read_to_string(&mut word);
    if word == "ok" {
        0
    } else {
        let message = word
            .strip_prefix("err ")
            .unwrap_or("the daemon exited during start-up");
        eprintln!("jobhost: error: {message}");
        1
    }
}

/// systemd's readiness protocol: a datagram to `$NOTIFY_SOCKET` (`READY=1`, `RELOADING=1`,
/// `STOPPING=1`). Does nothing when not started by systemd with `Type=notify`.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = target.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket name.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), Path::new(&target))
    };
    if let Err(e) = sent {
        log::warn!("sd_notify {state:?}: {e}");
    }
}

/// The identity workers drop to (`host.user` / `host.group`), resolved at start-up.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: std::ffi::CString,
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
}

impl Identity {
    /// Resolves `user` (and `group`, default: the user's primary group). Needs root.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>, String> {
        let Some(user) = user else {
            return match group {
                Some(_) => Err("host.group needs host.user".into()),
                None => Ok(None),
            };
        };
        if !nix::unistd::geteuid().is_root() {
            return Err(format!(
                "host.user = {user:?} needs the master to start as root (to drop workers to it)"
            ));
        }
        let account = nix::unistd::User::from_name(user)
            .map_err(|e| format!("cannot look up host.user {user:?}: {e}"))?
            .ok_or_else(|| format!("host.user: no user {user:?} on this system"))?;
        let gid = match group {
            None => account.gid,
            Some(group) => {
                nix::unistd::Group::from_name(group)
                    .map_err(|e| format!("cannot look up host.group {group:?}: {e}"))?
                    .ok_or_else(|| format!("host.group: no group {group:?} on this system"))?
                    .gid
            }
        };
        let name = std::ffi::CString::new(user)
            .map_err(|_| "host.user contains a NUL byte".to_string())?;
        Ok(Some(Identity {
            name,
            uid: account.uid,
            gid,
        }))
    }

    /// In a worker, before any plugin worker code: supplementary groups, group, user — then
    /// prove the change cannot be undone.
    pub fn drop_to(&self) -> Result<(), String> {
        let step = |what: &str, r: nix::Result<()>| r.map_err(|e| format!("{what}: {e}"));
        step("initgroups", nix::unistd::initgroups(&self.name, self.gid))?;
        step("setgid", nix::unistd::setgid(self.gid))?;
        step("setuid", nix::unistd::setuid(self.uid))?;
        if !self.uid.is_root() && nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok() {
            return Err("setuid(0) still succeeds after dropping privileges".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a plugin's forked grandchild wedged the next start: it held a copy of the lock's
    /// descriptor, and an flock belongs to the open file, so it stayed locked after the master
    /// let go. A record lock belongs to the process: the child holds nothing.
    #[test]
    fn a_forked_child_does_not_keep_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobhost.pid");
        let pidfile = Pidfile::acquire(&path).unwrap();
        // SAFETY: the child only sleeps (async-signal-safe) until it is killed.
        let child = match unsafe { fork() }.unwrap() {
            ForkResult::Child => unsafe {
                nix::libc::sleep(60);
                nix::libc::_exit(0)
            },
            ForkResult::Parent { child } => child,
        };
        // The master goes (its descriptor closes); the child, with its copy, lives on.
        drop(pidfile);
        let again = Pidfile::acquire(&path);
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(child, None);
        assert!(again.is_ok(), "{:?}", again.err());
    }
}
