//! Signals as counted events on a self-pipe, for the master's poll loop and a worker's loop.
//!
//! Owns the only code that runs in signal context: [`on_signal`], which increments a counter
//! for the signal and writes one byte to a non-blocking pipe — nothing else (no allocation, no
//! locks, no logging; gunicorn once deadlocked by logging in its SIGCHLD handler). Everything a
//! signal *means* happens later, on the loop, after [`SignalPipe::take`] drained the pipe.
//!
//! Why not signal-hook: a forked worker inherits signal-hook's process-global registry (whose
//! actions write to the master's pipe) while its OS-level handlers stay installed, and
//! re-registering in the child does not re-install a handler it believes is there. The worker
//! must start from a clean slate, so this module owns its ~20 lines of `sigaction` and
//! [`reset_in_child`] restores every disposition it set to the default.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Signals 1..=31, counted since the last [`SignalPipe::take`].
static PENDING: [AtomicU32; 32] = [const { AtomicU32::new(0) }; 32];
/// The write end of the pipe that wakes the loop (-1: none).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// Set (after the counter and the pipe byte) by every delivery: lets [`SignalPipe::take`]
/// skip its system calls when nothing came — a worker calls it before every job.
static ANY: AtomicBool = AtomicBool::new(false);
/// Which signals (bit = number) have the counting handler installed in this process.
static INSTALLED: AtomicU32 = AtomicU32::new(0);

/// The handler: count, wake, restore errno. Async-signal-safe by construction.
extern "C" fn on_signal(signo: nix::libc::c_int) {
    let saved = Errno::last_raw();
    if let Some(slot) = usize::try_from(signo).ok().and_then(|i| PENDING.get(i)) {
        slot.fetch_add(1, Ordering::SeqCst);
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; a full pipe (EAGAIN) already means "wake up".
        unsafe { nix::libc::write(fd, [0u8].as_ptr().cast(), 1) };
    }
    // Last: a `take` that sees it set finds the counter (and drains the byte).
    ANY.store(true, Ordering::SeqCst);
    Errno::set_raw(saved);
}

/// In a child forked from a process that installed handlers (a worker, a plugin probe): give
/// every such signal its default action back, so a signal sent to the child is not counted
/// and written to the parent's pipe as if the parent had received it.
pub fn reset_after_fork() {
    WAKE_FD.store(-1, Ordering::SeqCst);
    let installed = INSTALLED.swap(0, Ordering::SeqCst);
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for signo in 1..32 {
        if installed & (1 << signo) == 0 {
            continue;
        }
        if let Ok(signal) = Signal::try_from(signo) {
            // SAFETY: restoring the default disposition installs no handler.
            let _ = unsafe { sigaction(signal, &default) };
        }
        PENDING[signo as usize].store(0, Ordering::SeqCst);
    }
    ANY.store(false, Ordering::SeqCst);
}

/// Signals delivered since the last look, each with how often it came.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivered(Vec<(Signal, u32)>);

impl Delivered {
    pub fn iter(&self) -> impl Iterator<Item = (Signal, u32)> + '_ {
        self.0.iter().copied()
    }

    pub fn count(&self, signal: Signal) -> u32 {
        self.0
            .iter()
            .find(|(s, _)| *s == signal)
            .map_or(0, |(_, n)| *n)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The self-pipe and the set of signals routed to it. One per process.
pub struct SignalPipe {
    read: OwnedFd,
    _write: OwnedFd,
    signals: Vec<Signal>,
}

impl SignalPipe {
    /// Installs the counting handler for `signals` (with SA_RESTART, so plugin code rarely sees
    /// EINTR) and returns the pipe to poll. Call it once, from the process's only thread.
    pub fn install(signals: &[Signal]) -> nix::Result<SignalPipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        WAKE_FD.store(write.as_raw_fd(), Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for &signal in signals {
            // SAFETY: `on_signal` is async-signal-safe (atomics and write(2) only).
            unsafe { sigaction(signal, &action) }?;
            INSTALLED.fetch_or(1 << signal as u32, Ordering::SeqCst);
        }
        let mut mask = SigSet::empty();
        signals.iter().for_each(|s| mask.add(*s));
        mask.thread_unblock()?;
        Ok(SignalPipe {
            read,
            _write: write,
            signals: signals.to_vec(),
        })
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Drains the pipe, then takes the counters — in that order, so a signal that arrives in
    /// between leaves a byte behind and wakes the next poll instead of being lost.
    pub fn take(&self) -> Delivered {
        // Nothing came since the last look: no system call. (A byte written by a handler that
        // has not set ANY yet stays in the pipe and wakes the next poll, which then finds ANY.)
        if !ANY.swap(false, Ordering::SeqCst) {
            return Delivered::default();
        }
        self.take_all()
    }

    /// Like [`take`](Self::take), but drains the pipe whatever [`ANY`] says. For a caller
    /// that was told the pipe is readable: a byte there may come from another process that
    /// shares the pipe but not this process's memory (a daemon's launcher, which inherited the
    /// handler and gets a SIGCHLD while it waits), and left in the pipe it would keep a
    /// level-triggered poll waking forever.
    pub fn take_all(&self) -> Delivered {
        ANY.store(false, Ordering::SeqCst);
        let mut buf = [0u8; 256];
        while matches!(nix::unistd::read(&self.read, &mut buf), Ok(n) if n > 0) {}
        let mut delivered = Vec::new();
        for &signal in &self.signals {
            let n = PENDING[signal as usize].swap(0, Ordering::SeqCst);
            if n > 0 {
                delivered.push((signal, n));
            }
        }
        Delivered(delivered)
    }

    /// In a freshly forked child: give every signal this pipe handled back its default
    /// action and forget the pipe (dropping it closes the child's copies of its fds). The child
    /// then installs its own.
    pub fn reset_in_child(self) {
        reset_after_fork();
    }
}

/// SIGPIPE → ignored, so a peer that went away is an EPIPE on
/// the socket that wrote to it, never the death of the writer.
pub fn ignore_sigpipe() -> nix::Result<()> {
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: SIG_IGN installs no handler.
    unsafe { sigaction(Signal::SIGPIPE, &ignore) }.map(drop)
}

/// Sets `signals` to be ignored (a worker ignores HUP/TTIN/TTOU meant for the master).
pub fn ignore(signals: &[Signal]) -> nix::Result<()> {
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    for &signal in signals {
        // SAFETY: SIG_IGN installs no handler.
        unsafe { sigaction(signal, &ignore) }?;
    }
    Ok(())
}
