//! The master's side of `admin.http`: the listener, bound at start-up, and the child process
//! that serves it (`jobhost http-serve`, `crate::http`), started from the master's loop and
//! started again with a back-off whenever it ends.
//!
//! Why a child and not `httparse` in the loop: HTTP is spoken to browsers and scrapers, maybe
//! across a network, and a request can be anything. In a child, a malformed or malicious
//! request meets only the child's code and memory; what reaches the master is what any admin
//! session sends — `status json`, `workers json`, `metrics` — over one already-authenticated
//! session on a socketpair, under the admin sessions' budgets. The child is exec'd (not just
//! forked): it holds no plugin, no copy of the master's heap, no other descriptor. It runs as
//! `host.user` when one is set: it is what faces the network.
//!
//! This module never reads or writes HTTP, never blocks (the child is reaped by the loop's
//! `reap`), and never lets the child's death touch anything but the child: its session closes
//! like any other.

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{Master, MasterError};

/// The first restart waits this long; each quick death doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A child that served this long before it ended was fine: the back-off starts over.
const LIVED_LONG: Duration = Duration::from_secs(60);

pub(super) struct HttpChild {
    listener: TcpListener,
    token: Vec<u8>,
    /// Who the child runs as.
    identity: Option<(u32, u32)>,
    /// The running child: its pid and when it started.
    running: Option<(Pid, Instant)>,
    /// When to start it (again); `None` while it runs.
    start_at: Option<Instant>,
    backoff: Duration,
    /// Times it was started again after it ended (for `metrics`).
    pub restarts: u64,
}

impl HttpChild {
    /// Binds `admin.http` (the config has checked the token rule and the address).
    pub fn bind(
        addr: std::net::SocketAddr,
        token: Vec<u8>,
        identity: Option<(u32, u32)>,
    ) -> Result<HttpChild, MasterError> {
        let listener = TcpListener::bind(addr).map_err(|source| MasterError::Os {
            context: format!("cannot listen on admin.http {addr}"),
            source,
        })?;
        let bound = listener.local_addr().unwrap_or(addr);
        // It faces the network: never as root. Without host.user, a root master runs it as
        // `nobody` (it needs nothing: it is handed its listener and its session).
        let identity = match identity {
            None if nix::unistd::geteuid().is_root() => {
                let nobody = nix::unistd::User::from_name("nobody").ok().flatten();
                let ids = nobody.map_or((65534, 65534), |u| (u.uid.as_raw(), u.gid.as_raw()));
                log::info!(
                    "http child runs as nobody (uid {}): host.user is not set",
                    ids.0
                );
                Some(ids)
            }
            other => other,
        };
        log::info!("http interface on {bound} (/metrics and the status page; token required)");
        Ok(HttpChild {
            listener,
            token,
            identity,
            running: None,
            start_at: Some(Instant::now()),
            backoff: FIRST_BACKOFF,
            restarts: 0,
        })
    }

    /// When the loop must wake to start the child.
    pub fn deadline(&self) -> Option<Instant> {
        self.start_at
    }

    /// Starts the child: the listener as its stdin, one end of a fresh socketpair as its
    /// stdout; the other end is returned, to become its admin session.
    fn spawn(&self) -> std::io::Result<(Pid, UnixStream)> {
        let (ours, theirs) = UnixStream::pair()?;
        let listener = OwnedFd::from(self.listener.try_clone()?);
        let mut command = Command::new("/proc/self/exe");
        command
            .arg0("jobhost")
            .arg("http-serve")
            .stdin(Stdio::from(listener))
            .stdout(Stdio::from(OwnedFd::from(theirs)))
            .stderr(Stdio::inherit())
            // Its own group: the loop's reap kills the group of a dead child, as for workers.
            .process_group(0);
        if let Some((uid, gid)) = self.identity {
            command.uid(uid).gid(gid);
        }
        let child = command.spawn()?;
        // Reaped by the loop's `reap` (waitid on every child), never by `Child::wait`.
        let pid = Pid::from_raw(child.id() as i32);
        // Its token, as the session's first line: not in its environment or arguments, which
        // any process of its user (the workers', if host.user is shared) could read. The
        // socketpair is new and empty: this write does not block.
        let mut line = self.token.clone();
        line.push(b'\n');
        if let Err(e) = (&ours).write_all(&line) {
            let _ = killpg(pid, Signal::SIGKILL);
            return Err(e);
        }
        Ok((pid, ours))
    }
}

impl Master {
    /// Starts the HTTP child if it is time (called with the loop's timers).
    pub(super) fn http_timers(&mut self, now: Instant) {
        let Some(http) = &mut self.io.http else {
            return;
        };
        if http.start_at.is_none_or(|t| now < t) {
            return;
        }
        http.start_at = None;
        match http.spawn() {
            Ok((pid, session)) => {
                http.running = Some((pid, now));
                log::info!("http child {pid} started");
                if !self.admin_adopt(session) {
                    // No session for it: it will see end of file and exit; started again then.
                    log::warn!("http child {pid}: no admin session for it");
                }
            }
            Err(e) => {
                let delay = http.backoff;
                http.backoff = (http.backoff * 2).min(MAX_BACKOFF);
                http.start_at = Some(now + delay);
                log::error!("cannot start the http child: {e}; trying again in {delay:?}");
            }
        }
    }

    /// Whether `pid` was the HTTP child; if so, schedule its restart.
    pub(super) fn http_reaped(&mut self, pid: Pid, status: WaitStatus) -> bool {
        let now = self.now;
        let stopping = self.sup.finished();
        let Some(http) = &mut self.io.http else {
            return false;
        };
        let Some((running, since)) = http.running else {
            return false;
        };
        if running != pid {
            return false;
        }
        http.running = None;
        if now.saturating_duration_since(since) >= LIVED_LONG {
            http.backoff = FIRST_BACKOFF;
        }
        let delay = http.backoff;
        http.backoff = (http.backoff * 2).min(MAX_BACKOFF);
        if stopping {
            return true;
        }
        http.start_at = Some(now + delay);
        http.restarts = http.restarts.saturating_add(1);
        log::warn!(
            "http child {pid} ended ({}); starting another in {delay:?}",
            describe(status)
        );
        true
    }

    /// At the master's exit: the child goes too (it would see end of file on its session and
    /// leave anyway; this does not leave it behind for a moment, nor holding the port).
    pub(super) fn stop_http_child(&mut self) {
        let Some(http) = &mut self.io.http else {
            return;
        };
        http.start_at = None;
        let Some((pid, _)) = http.running.take() else {
            return;
        };
        let _ = killpg(pid, Signal::SIGKILL);
        // SIGKILLed: it is gone in a moment; not waited for longer than that.
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::Error::EINTR) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return,
            }
        }
    }
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit status {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("killed by {signal:?}"),
        other => format!("{other:?}"),
    }
}
