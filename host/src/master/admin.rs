//! The master's side of the admin interface: the admin listeners (a Unix socket, mode 0600 by
//! default or 0660 for its `socket_group`, and an optional TCP port that requires
//! `auth <token>` first, its token read from a file only its owner can read), their
//! connections, and what each command does to the running master.
//!
//! Parsing and rendering live in `crate::admin` (pure); this module owns the effects. It never
//! blocks: connections are non-blocking and driven by the master's epoll loop, and a bad line
//! costs only its own connection. Nothing a client does makes it spin or flood the log: a
//! full fd table pauses accepting (like the job listener), and wrong tokens and timed-out
//! sessions are logged at most once a second, with a count. Nor can a session starve jobs or
//! other sessions, or hold much memory: sessions take turns of a few lines per pass of the
//! loop (`resume_admins`), one that does not read its replies is neither served nor read until
//! it does, and what is read ahead is bounded (`crate::admin::SessionFlow`). Its timers —
//! `admin.auth_timeout`, `admin.idle_timeout` — are `admin_deadline` / `admin_timers`, which
//! the master loop calls with its own.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::supervisor::{CommandError, Event, Origin, Reply, SessionId};
use super::token::Token;
use super::{Master, MasterError};
use crate::admin::{
    self, CloseReason, Command, LineBuffer, LineError, PassBudget, PoolSnapshot, ReloadReport,
    Request, SessionCloses, SessionFlow, Snapshot, WorkerSnapshot, WrongTokens,
};
use crate::config::PoolMode;

/// Longest admin line accepted.
const MAX_LINE: usize = admin::MAX_LINE;

pub(super) enum AdminStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AdminStream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            AdminStream::Unix(s) => s.as_fd(),
            AdminStream::Tcp(s) => s.as_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            AdminStream::Unix(s) => s.read(buf),
            AdminStream::Tcp(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            AdminStream::Unix(s) => s.write(buf),
            AdminStream::Tcp(s) => s.write(buf),
        }
    }
}

pub(super) struct AdminConn {
    stream: AdminStream,
    lines: LineBuffer,
    out: Vec<u8>,
    /// TCP sessions must `auth` first; Unix ones are trusted by the socket's permissions.
    authed: bool,
    /// The HTTP child's session (a socketpair): no idle timeout, it asks when it is asked.
    internal: bool,
    /// Close once the output is written (quit, bad input).
    closing: bool,
    /// Waiting for the outcome of its `reload`: its next lines wait, unread.
    awaiting: bool,
    /// It closed its end: close once its lines are handled and answered.
    closing_after_lines: bool,
    interest: EpollFlags,
    /// In `admin_resume`, for a turn (so it is there once).
    queued: bool,
    /// When it connected (for `admin.auth_timeout`).
    opened: Instant,
    /// When it last sent a byte or took one of its output (for `admin.idle_timeout`).
    active: Instant,
}

impl AdminConn {
    fn flow(&self) -> SessionFlow {
        SessionFlow {
            closing: self.closing,
            awaiting: self.awaiting,
            unread_output: self.out.len(),
            held_input: self.lines.held(),
            has_line: self.lines.has_line(),
        }
    }

    /// It has lines to be handled now, or closed its end and is to be closed once they are.
    fn wants_turn(&self) -> bool {
        let flow = self.flow();
        flow.wants_turn() || (self.closing_after_lines && flow.may_handle())
    }
}

/// The admin listeners, bound at start-up.
pub(super) struct AdminListeners {
    pub unix: UnixListener,
    pub tcp: Option<TcpListener>,
    /// The token a TCP session must offer, read from `admin.token_file` at start-up.
    pub token: Option<Vec<u8>>,
    /// Not accepting (out of file descriptors) until then: the listeners are out of epoll.
    accept_paused_until: Option<Instant>,
    /// Wrong tokens, logged at most once a second.
    wrong_tokens: WrongTokens,
    /// When the earliest session deadline (auth, idle) may be due: never later than it, maybe
    /// earlier (activity only moves deadlines later, and is not tracked here). At it, every
    /// session is looked at once and this is set to the true earliest.
    sweep_at: Option<Instant>,
    /// `(admin.auth_timeout, admin.idle_timeout)` when `sweep_at` was worked out: a reload that
    /// changes them asks for a sweep at once.
    swept_with: (Duration, Duration),
    /// Sessions closed for not authenticating in time, and for idling, logged at most once a
    /// second each.
    closed_unauthenticated: SessionCloses,
    closed_idle: SessionCloses,
    /// Sessions refused at accept for being one too many, logged at most once a second.
    /// (index: refused for the unauthenticated TCP sessions' cap, not the total's).
    refused_too_many: [SessionCloses; 2],
    /// The last `status` / `workers` view built in this pass (the pass's time), reused by
    /// every line of the pass that asks again until a command changes something: reading each
    /// worker's /proc files once per line let pipelined `workers` lines stall dispatch for
    /// seconds with a thousand workers; once per pass bounds it.
    snapshot_memo: Option<(Memory, Instant, Snapshot)>,
    /// Commands logged at info in the current second, so that a session repeating one (even
    /// a refused one) cannot flood the log: past [`COMMANDS_LOGGED_PER_SECOND`] they are
    /// counted and the count is logged once the second is over.
    commands_logged: (Option<Instant>, u32, u64),
}

/// Admin sessions open at once, at most; one more is refused at accept (its fd and buffers
/// would be the master's: a flood of sessions must not take the fd table or the heap).
pub(super) const MAX_SESSIONS: usize = 256;
/// TCP sessions not authenticated yet, at most (a stranger's sessions cannot crowd out the
/// operator's: the rest of [`MAX_SESSIONS`] stays for authenticated and Unix ones).
pub(super) const MAX_UNAUTHENTICATED: usize = 64;
/// Commands logged at info per second, at most.
const COMMANDS_LOGGED_PER_SECOND: u32 = 20;

/// Why `admin.token_file` is refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read admin.token_file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("admin.token_file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// As sshd refuses a private key others can read.
    #[error("admin.token_file {} is {what} (mode {mode:04o}); chmod 600 it", path.display())]
    Open {
        path: PathBuf,
        what: &'static str,
        mode: u32,
    },
    #[error(
        "admin.token_file {} belongs to uid {owner}, neither root nor the user jobhost runs as (uid {me}); chown it",
        path.display()
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("admin.token_file {} is over {MAX_TOKEN_FILE} bytes; it should hold one token", path.display())]
    TooLarge { path: PathBuf },
    #[error("admin.token_file {} holds a token under {MIN_TOKEN} bytes", path.display())]
    TooShort { path: PathBuf },
    /// `auth TOKEN` is one line of text: a token with a line break or a control character in
    /// it could never match.
    #[error("admin.token_file {} must hold one line of text (the token)", path.display())]
    NotOneLine { path: PathBuf },
}

/// Why the master refused an admin line or command. Rendered as the `ERR …` line by
/// [`AdminError::reply`] (through [`admin::err_reply`]), nowhere else.
#[derive(Debug, thiserror::Error)]
pub(super) enum AdminError {
    /// The line is not a command (the parser's reason).
    #[error("{0}")]
    Parse(String),
    #[error("line over {0} bytes; closing")]
    LineTooLong(usize),
    #[error("not a text line; closing")]
    NotText,
    #[error("wrong token")]
    WrongToken,
    #[error("authenticate first: auth <token>")]
    NotAuthenticated,
    /// A command on the HTTP child's session.
    #[error("this session may only ask (status, workers, metrics)")]
    ReadOnly,
    /// The supervisor refused the command.
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("reload failed, nothing changed: {0}")]
    ReloadFailed(String),
}

impl AdminError {
    pub(super) fn reply(&self) -> String {
        admin::err_reply(&self.to_string())
    }
}

const MIN_TOKEN: usize = 16;
const MAX_TOKEN_FILE: u64 = 64 << 10;

/// Reads the token of `admin.token_file`, refusing a file that anyone but its owner could read
/// or write, or whose owner is neither root nor the master's user. The file is opened once
/// (a symlink is followed: its target is what is checked) and checked with `fstat` on that
/// descriptor, and the token is read from it: a file swapped after the check is never read.
pub fn read_token_file(path: &Path) -> Result<Vec<u8>, TokenFileError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let read = |source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK: a FIFO put there must not hang the start (it is refused below).
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits())
        .open(path)
        .map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(TokenFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o7777;
    let what = if mode & 0o004 != 0 {
        Some("readable by others")
    } else if mode & 0o002 != 0 {
        Some("writable by others")
    } else if mode & 0o040 != 0 {
        Some("readable by its group")
    } else if mode & 0o020 != 0 {
        Some("writable by its group")
    } else if mode & 0o077 != 0 {
        Some("open to its group or others")
    } else {
        None
    };
    if let Some(what) = what {
        return Err(TokenFileError::Open {
            path: path.to_owned(),
            what,
            mode,
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(TokenFileError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        return Err(TokenFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let token = bytes.trim_ascii().to_vec();
    if token.len() < MIN_TOKEN {
        return Err(TokenFileError::TooShort {
            path: path.to_owned(),
        });
    }
    let one_line = std::str::from_utf8(&token)
        .is_ok_and(|text| !text.chars().any(|c| c.is_control() && c != '\t'));
    if !one_line {
        return Err(TokenFileError::NotOneLine {
            path: path.to_owned(),
        });
    }
    Ok(token)
}

impl AdminListeners {
    pub fn bind(config: &crate::config::AdminConfig) -> Result<AdminListeners, MasterError> {
        // The token first: a refused token file leaves no socket behind.
        let listens = config.tcp.is_some() || config.http.is_some();
        let token = match (listens, &config.token_file) {
            (false, _) => None,
            (true, None) => {
                return Err(MasterError::Refused(
                    "admin.tcp and admin.http need admin.token_file".into(),
                ))
            }
            (true, Some(file)) => {
                Some(read_token_file(file).map_err(|e| MasterError::Refused(e.to_string()))?)
            }
        };
        let unix = crate::server::bind(
            &config.socket,
            config.socket_mode,
            config.socket_group.as_ref(),
        )?;
        let tcp = match config.tcp {
            None => None,
            Some(addr) => {
                let listener = TcpListener::bind(addr).map_err(|source| MasterError::Os {
                    context: format!("cannot listen on admin.tcp {addr}"),
                    source,
                })?;
                listener
                    .set_nonblocking(true)
                    .map_err(|source| MasterError::Os {
                        context: "admin.tcp".into(),
                        source,
                    })?;
                log::info!("admin interface also on tcp {addr} (auth required)");
                Some(listener)
            }
        };
        log::info!("admin interface on {}", config.socket.display());
        Ok(AdminListeners {
            unix,
            tcp,
            token,
            accept_paused_until: None,
            wrong_tokens: WrongTokens::new(),
            sweep_at: None,
            swept_with: (config.auth_timeout, config.idle_timeout),
            closed_unauthenticated: SessionCloses::new(),
            closed_idle: SessionCloses::new(),
            refused_too_many: [SessionCloses::new(), SessionCloses::new()],
            snapshot_memo: None,
            commands_logged: (None, 0, 0),
        })
    }

    /// Takes the listeners out of epoll (paused) or puts them back.
    fn watch(&self, epoll: &nix::sys::epoll::Epoll, on: bool) {
        let listeners = [
            (
                Some(self.unix.as_fd()),
                Token::AdminListener { tcp: false }.encode(),
            ),
            (
                self.tcp.as_ref().map(|l| l.as_fd()),
                Token::AdminListener { tcp: true }.encode(),
            ),
        ];
        for (fd, token) in listeners {
            let Some(fd) = fd else { continue };
            let done = if on {
                epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
            } else {
                epoll.delete(fd)
            };
            if let Err(e) = done {
                log::warn!("admin listener: epoll: {e}");
            }
        }
    }
}

impl Master {
    pub(super) fn admin_accept(&mut self, tcp: bool) {
        loop {
            let Some(listeners) = &self.io.admin else {
                return;
            };
            // (Its event may have come in the same wait as the failure that paused it.)
            if listeners.accept_paused_until.is_some() {
                return;
            }
            let accepted = if tcp {
                match &listeners.tcp {
                    Some(l) => l.accept().map(|(s, _)| AdminStream::Tcp(s)),
                    None => return,
                }
            } else {
                listeners.unix.accept().map(|(s, _)| AdminStream::Unix(s))
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // EMFILE/ENFILE: the listener stays readable, so retrying would spin (and
                    // log every time): pause both listeners, as the job listener does.
                    self.pause_admin_accept(&e);
                    return;
                }
            };
            let nonblocking = match &stream {
                AdminStream::Unix(s) => s.set_nonblocking(true),
                AdminStream::Tcp(s) => s.set_nonblocking(true),
            };
            if nonblocking.is_err() {
                continue;
            }
            let unauthenticated = self.io.admins.values().filter(|c| !c.authed).count();
            let limit = if self.io.admins.len() >= MAX_SESSIONS {
                Some((MAX_SESSIONS, false))
            } else if tcp && unauthenticated >= MAX_UNAUTHENTICATED {
                Some((MAX_UNAUTHENTICATED, true))
            } else {
                None
            };
            if let Some((limit, unauthenticated)) = limit {
                // One best-effort line, then closed (dropped here): it costs nothing more.
                let mut stream = stream;
                let _ = match &mut stream {
                    AdminStream::Unix(s) => {
                        s.write(b"ERR too many admin sessions; try again later\n")
                    }
                    AdminStream::Tcp(s) => {
                        s.write(b"ERR too many admin sessions; try again later\n")
                    }
                };
                let now = self.now;
                if let Some(listeners) = &mut self.io.admin {
                    let reason = CloseReason::TooMany {
                        limit,
                        unauthenticated,
                    };
                    let refused = &mut listeners.refused_too_many[usize::from(unauthenticated)];
                    if let Some(line) = refused.record(now, reason) {
                        log::warn!("admin: {line}");
                    }
                }
                continue;
            }
            if let Some(id) = self.admin_register(stream, !tcp, false) {
                self.admin_schedule(id);
            }
        }
    }

    /// Takes the HTTP child's end of its socketpair as an authenticated admin session with no
    /// idle timeout (it counts against [`MAX_SESSIONS`] like any other). False if it could not
    /// be watched.
    pub(super) fn admin_adopt(&mut self, stream: UnixStream) -> bool {
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        self.admin_register(AdminStream::Unix(stream), true, true)
            .is_some()
    }

    /// Watches a new session's (non-blocking) stream and adds it; its id, or none if it could
    /// not be watched (it is dropped, so closed). `internal`: the HTTP child's, with no idle
    /// deadline.
    fn admin_register(&mut self, stream: AdminStream, authed: bool, internal: bool) -> Option<u64> {
        let id = self.io.next_admin_id;
        self.io.next_admin_id += 1;
        let token = Token::Admin(id).encode();
        let epoll = self.io.epoll.as_ref()?;
        epoll
            .add(stream.fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
            .ok()?;
        let now = Instant::now();
        let conn = AdminConn {
            stream,
            lines: LineBuffer::new(MAX_LINE),
            out: Vec::new(),
            authed,
            internal,
            closing: false,
            awaiting: false,
            closing_after_lines: false,
            interest: EpollFlags::EPOLLIN,
            queued: false,
            opened: now,
            active: now,
        };
        self.io.admins.insert(id, conn);
        Some(id)
    }

    /// Makes sure the loop wakes by session `id`'s deadline (it may be the earliest).
    fn admin_schedule(&mut self, id: u64) {
        let admin = &self.config.admin;
        let Some(conn) = self.io.admins.get(&id).filter(|c| !c.internal) else {
            return;
        };
        let Some((at, _)) = admin::session_deadline(
            conn.opened,
            conn.active,
            conn.authed,
            conn.awaiting,
            admin.auth_timeout,
            admin.idle_timeout,
        ) else {
            return;
        };
        if let Some(listeners) = &mut self.io.admin {
            listeners.sweep_at = Some(listeners.sweep_at.map_or(at, |t| t.min(at)));
        }
    }

    /// Closes the sessions whose deadline has passed (each close counted for the log), and
    /// finds the next deadline.
    fn admin_sweep(&mut self, now: Instant) {
        let admin = &self.config.admin;
        let mut next: Option<Instant> = None;
        let mut expired = Vec::new();
        for (&id, conn) in self.io.admins.iter().filter(|(_, c)| !c.internal) {
            match admin::session_deadline(
                conn.opened,
                conn.active,
                conn.authed,
                conn.awaiting,
                admin.auth_timeout,
                admin.idle_timeout,
            ) {
                Some((at, reason)) if at <= now => expired.push((id, reason)),
                Some((at, _)) => next = Some(next.map_or(at, |t| t.min(at))),
                None => {}
            }
        }
        if let Some(listeners) = &mut self.io.admin {
            listeners.sweep_at = next;
        }
        for (id, reason) in expired {
            self.drop_admin(id);
            let Some(listeners) = &mut self.io.admin else {
                continue;
            };
            let closes = match reason {
                CloseReason::NotAuthenticated(_) => &mut listeners.closed_unauthenticated,
                CloseReason::Idle(_) => &mut listeners.closed_idle,
                CloseReason::TooMany {
                    unauthenticated, ..
                } => &mut listeners.refused_too_many[usize::from(unauthenticated)],
            };
            if let Some(line) = closes.record(now, reason) {
                log::info!("admin: {line}");
            }
        }
    }

    fn pause_admin_accept(&mut self, error: &io::Error) {
        let (Some(listeners), Some(epoll)) = (&mut self.io.admin, &self.io.epoll) else {
            return;
        };
        log::error!(
            "admin accept: {error}; not accepting admin connections for {:?}",
            super::ACCEPT_PAUSE
        );
        listeners.accept_paused_until = Some(Instant::now() + super::ACCEPT_PAUSE);
        listeners.watch(epoll, false);
    }

    /// When the admin side next needs the loop to wake: the end of an accept pause, a
    /// session's auth or idle deadline, or a count of wrong tokens or closed sessions to log.
    /// (For the master loop's `next_deadline`.)
    pub(super) fn admin_deadline(&self) -> Option<Instant> {
        let listeners = self.io.admin.as_ref()?;
        [
            listeners.accept_paused_until,
            listeners.sweep_at,
            listeners.wrong_tokens.next_deadline(),
            listeners.closed_unauthenticated.next_deadline(),
            listeners.closed_idle.next_deadline(),
            listeners.refused_too_many[0].next_deadline(),
            listeners.refused_too_many[1].next_deadline(),
            listeners
                .commands_logged
                .0
                .filter(|_| listeners.commands_logged.2 > 0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// What is due at `now` on the admin side: resume accepting after a pause, close the
    /// sessions past their auth or idle deadline, log the wrong tokens and closes counted in
    /// the last second. (Called with the master loop's other timeouts.)
    pub(super) fn admin_timers(&mut self, now: Instant) {
        let timeouts = (
            self.config.admin.auth_timeout,
            self.config.admin.idle_timeout,
        );
        if let Some(listeners) = &mut self.io.admin {
            if listeners.swept_with != timeouts {
                listeners.swept_with = timeouts;
                listeners.sweep_at = Some(now);
            }
        }
        if self
            .io
            .admin
            .as_ref()
            .and_then(|l| l.sweep_at)
            .is_some_and(|t| now >= t)
        {
            self.admin_sweep(now);
        }
        let (Some(listeners), Some(epoll)) = (&mut self.io.admin, &self.io.epoll) else {
            return;
        };
        if listeners.accept_paused_until.is_some_and(|t| now >= t) {
            listeners.accept_paused_until = None;
            listeners.watch(epoll, true);
        }
        if let Some(line) = listeners.wrong_tokens.flush(now) {
            log::warn!("admin: {line}");
        }
        let admin = &self.config.admin;
        let closes = [
            (
                &mut listeners.closed_unauthenticated,
                CloseReason::NotAuthenticated(admin.auth_timeout),
            ),
            (
                &mut listeners.closed_idle,
                CloseReason::Idle(admin.idle_timeout),
            ),
        ];
        for (closes, reason) in closes {
            if let Some(line) = closes.flush(now, reason) {
                log::info!("admin: {line}");
            }
        }
        let [total, unauthenticated] = &mut listeners.refused_too_many;
        let refused = [
            (total, MAX_SESSIONS, false),
            (unauthenticated, MAX_UNAUTHENTICATED, true),
        ];
        for (refused, limit, unauthenticated) in refused {
            let reason = CloseReason::TooMany {
                limit,
                unauthenticated,
            };
            if let Some(line) = refused.flush(now, reason) {
                log::warn!("admin: {line}");
            }
        }
        Self::commands_logged_flush(&mut listeners.commands_logged, now);
    }

    /// Whether the command about to run may be logged at info (see
    /// [`AdminListeners::commands_logged`]); says how many were not, once their second is over.
    fn command_may_be_logged(&mut self) -> bool {
        let now = self.now;
        let Some(listeners) = &mut self.io.admin else {
            return true;
        };
        Self::commands_logged_flush(&mut listeners.commands_logged, now);
        let (window_ends, logged, unlogged) = &mut listeners.commands_logged;
        if window_ends.is_none() {
            *window_ends = Some(now + Duration::from_secs(1));
            *logged = 0;
        }
        if *logged < COMMANDS_LOGGED_PER_SECOND {
            *logged += 1;
            true
        } else {
            *unlogged += 1;
            false
        }
    }

    /// Ends the logging window of commands once it is over, logging how many went unlogged.
    fn commands_logged_flush(window: &mut (Option<Instant>, u32, u64), now: Instant) {
        let (window_ends, logged, unlogged) = window;
        if window_ends.is_some_and(|t| now >= t) {
            if *unlogged > 0 {
                log::info!(
                    "admin: {unlogged} more command(s) in the last second, not logged one by one"
                );
            }
            *window_ends = None;
            *logged = 0;
            *unlogged = 0;
        }
    }

    pub(super) fn admin_event(&mut self, id: u64, flags: EpollFlags) {
        let Some(conn) = self.io.admins.get_mut(&id) else {
            return;
        };
        if !conn.flow().wants_input() {
            // Not read now (it waits for its `reload`, is closing, holds enough unhandled
            // lines, or is not reading its replies), so that it cannot pile up lines; a
            // hang-up still ends it (epoll reports one whether asked or not, so ignoring it
            // would spin), and its replies still go out.
            if flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                self.drop_admin(id);
            } else if flags.contains(EpollFlags::EPOLLOUT) {
                self.admin_flush(id);
            }
            return;
        }
        let mut closed = false;
        if flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            // Read ahead only so much: the rest waits in the socket (and then in the client)
            // until these lines are handled.
            while conn.lines.held() < admin::MAX_HELD_INPUT {
                match conn.stream.read(&mut self.io.scratch[..MAX_LINE * 2]) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        conn.lines.push(&self.io.scratch[..n]);
                        conn.active = self.now;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        if closed {
            conn.closing_after_lines = true;
        }
        // Its lines are handled in its turn, later in this pass (`resume_admins`).
        self.admin_flush(id);
    }

    /// Puts session `id` in line for a turn, once.
    fn admin_queue(&mut self, id: u64) {
        if let Some(conn) = self.io.admins.get_mut(&id) {
            if !conn.queued {
                conn.queued = true;
                self.io.admin_resume.push(id);
            }
        }
    }

    /// Handles up to `max` of the session's complete lines, in order — up to a `reload`, whose
    /// answer its next lines wait for, or until its client has too much output unread — then
    /// writes the replies. Returns how many lines it handled.
    fn admin_lines(&mut self, id: u64, max: usize) -> usize {
        let mut handled = 0;
        while handled < max {
            let Some(conn) = self.io.admins.get_mut(&id) else {
                return handled;
            };
            if !conn.flow().wants_turn() {
                break;
            }
            let line = match conn.lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => {
                    let refused = match e {
                        LineError::TooLong(max) => AdminError::LineTooLong(max),
                        LineError::NotText => AdminError::NotText,
                    };
                    conn.out.extend_from_slice(refused.reply().as_bytes());
                    conn.closing = true;
                    break;
                }
            };
            handled += 1;
            // A reload ends the turn, answered at once or not: a session sending many gets
            // one per pass.
            if self.admin_line(id, &line) {
                break;
            }
        }
        if let Some(conn) = self.io.admins.get_mut(&id) {
            if conn.closing_after_lines && !conn.awaiting && !conn.queued && !conn.lines.has_line()
            {
                conn.closing = true;
            }
        }
        self.admin_flush(id);
        handled
    }

    /// Runs one admin line. Questions and the session's own matters are answered here; a
    /// command goes to the supervisor, whose reply comes back as an effect (at once, or — for
    /// `reload` — when it is over). True if it was a `reload`.
    fn admin_line(&mut self, id: u64, line: &str) -> bool {
        let request = match admin::parse(line) {
            Ok(request) => request,
            Err(reason) => {
                self.admin_say(id, &AdminError::Parse(reason).reply());
                return false;
            }
        };
        let authed = self.io.admins.get(&id).is_some_and(|c| c.authed);
        if !authed {
            let reply = match request {
                Request::Auth { token } => self.admin_auth(id, &token),
                Request::Quit => self.admin_quit(id),
                _ => AdminError::NotAuthenticated.reply(),
            };
            self.admin_say(id, &reply);
            return false;
        }
        // The HTTP child faces the network: should it ever be subverted, its session can still
        // only ask (status, workers, metrics), never stop or reconfigure the master.
        let internal = self.io.admins.get(&id).is_some_and(|c| c.internal);
        if internal && matches!(request, Request::Do(_)) {
            self.admin_say(id, &AdminError::ReadOnly.reply());
            return false;
        }
        // The parsed request, not the raw line: its Debug hides an `auth` token. Questions
        // change nothing and may come by the thousand: only at debug level.
        match request {
            // Past the second's share, only counted (not even at debug: that is the flood).
            Request::Do(_) => {
                if self.command_may_be_logged() {
                    log::info!("admin: {request:?}")
                }
            }
            _ => log::debug!("admin: {request:?}"),
        }
        let reply = match request {
            Request::Help => admin::help(),
            Request::Auth { .. } => "OK\n".into(),
            Request::Status { json } => {
                self.with_snapshot(Memory::Resident, |s| admin::render_status(s, json))
            }
            Request::Workers { json } => {
                self.with_snapshot(Memory::Own, |s| admin::render_workers(s, json))
            }
            Request::Metrics { format } => {
                let (pools, master) = (self.pool_figures(), self.master_figures());
                let mut text = self.with_snapshot(Memory::OwnRecent, |snapshot| {
                    let figures = crate::metrics::Figures {
                        snapshot,
                        pools,
                        master,
                    };
                    crate::metrics::render(&figures, format)
                });
                text.push_str("OK\n");
                text
            }
            Request::Quit => self.admin_quit(id),
            Request::Do(command) => {
                // It may change what a view shows: the next `status` builds a new one.
                if let Some(listeners) = &mut self.io.admin {
                    listeners.snapshot_memo = None;
                }
                let reload = command == Command::Reload;
                if reload {
                    // Answered when the reload is over (its probes run while the master
                    // serves); this session's next lines wait for that answer.
                    if let Some(conn) = self.io.admins.get_mut(&id) {
                        conn.awaiting = true;
                    }
                }
                self.apply(Event::Command {
                    command,
                    from: Origin::Admin(SessionId(id)),
                });
                return reload;
            }
        };
        self.admin_say(id, &reply);
        false
    }

    fn admin_auth(&mut self, id: u64, token: &str) -> String {
        let expected = self
            .io
            .admin
            .as_ref()
            .and_then(|a| a.token.clone())
            .unwrap_or_default();
        if admin::token_matches(token.as_bytes(), &expected) {
            if let Some(conn) = self.io.admins.get_mut(&id) {
                conn.authed = true;
            }
            return "OK\n".into();
        }
        if let Some(line) = self
            .io
            .admin
            .as_mut()
            .and_then(|a| a.wrong_tokens.record(Instant::now()))
        {
            log::warn!("admin: {line}");
        }
        if let Some(conn) = self.io.admins.get_mut(&id) {
            conn.closing = true;
        }
        AdminError::WrongToken.reply()
    }

    fn admin_quit(&mut self, id: u64) -> String {
        if let Some(conn) = self.io.admins.get_mut(&id) {
            conn.closing = true;
        }
        "OK\n".into()
    }

    /// Queues a reply to the session. (Only called in its turn, which it gets only while its
    /// unread output is under `admin::MAX_UNREAD_OUTPUT`: what it holds is that plus one
    /// reply, and a reply's size is bounded by the config — its pools and workers.)
    fn admin_say(&mut self, id: u64, reply: &str) {
        if let Some(conn) = self.io.admins.get_mut(&id) {
            conn.out.extend_from_slice(reply.as_bytes());
        }
    }

    pub(super) fn admin_flush(&mut self, id: u64) {
        let Some(conn) = self.io.admins.get_mut(&id) else {
            return;
        };
        let mut written = 0;
        let mut dead = false;
        while written < conn.out.len() {
            match conn.stream.write(&conn.out[written..]) {
                Ok(0) => {
                    dead = true;
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    dead = true;
                    break;
                }
            }
        }
        conn.out.drain(..written);
        if written > 0 {
            conn.active = self.now;
        }
        // A session that half-closed after `reload` (`echo reload | socat …`) still waits
        // for that reply.
        let done = conn.closing && conn.out.is_empty() && !conn.awaiting;
        if dead || done {
            return self.drop_admin(id);
        }
        // A session not to be read now (closing, waiting, holding enough, not reading its
        // replies) is out of EPOLLIN: asking for it would report the same unread bytes on
        // every wait (a spin).
        let mut flags = EpollFlags::empty();
        if conn.flow().wants_input() {
            flags |= EpollFlags::EPOLLIN;
        }
        if !conn.out.is_empty() {
            flags |= EpollFlags::EPOLLOUT;
        }
        if flags != conn.interest {
            conn.interest = flags;
            let mut event = EpollEvent::new(flags, Token::Admin(id).encode());
            if let Some(epoll) = &self.io.epoll {
                let _ = epoll.modify(conn.stream.fd(), &mut event);
            }
        }
        // Lines left (its turn ran out, or its client just took enough of its output): on
        // with them in a turn of this pass or the next, which does not sleep.
        if conn.wants_turn() {
            self.admin_queue(id);
        }
    }

    /// `Effect::Reply`: the supervisor's answer to a session's command. One that waited (for
    /// its `reload`) goes on with its next lines on the loop's next pass (`resume_admins`), not
    /// from here: a reload that completes at once would otherwise recurse once per buffered
    /// `reload`.
    pub(super) fn answer_admin(&mut self, id: u64, reply: &str) {
        let Some(conn) = self.io.admins.get_mut(&id) else {
            return;
        };
        conn.out.extend_from_slice(reply.as_bytes());
        if conn.awaiting {
            conn.awaiting = false;
            // It was not idle while it waited: its idle time starts now.
            conn.active = self.now;
            // Queued even with no lines left: the turn closes one that closed its end.
            self.admin_queue(id);
            self.admin_schedule(id);
        }
        self.admin_flush(id);
    }

    /// Sessions with lines to handle (read this pass, left over from the last, or answered
    /// since): each gets a turn of a few lines, in order, within a budget for the whole pass
    /// (`admin::PassBudget`); those left when it runs out go first next pass, and a session
    /// with lines left after its turn goes to the back. A session gets one `reload` per turn.
    /// So admin work per pass is bounded whatever the sessions send, and jobs are dispatched
    /// between passes; the loop's next wait does not sleep while any session is in line.
    pub(super) fn resume_admins(&mut self) {
        let queue = std::mem::take(&mut self.io.admin_resume);
        let mut budget = PassBudget::new();
        let mut waiting = Vec::new();
        for (i, &id) in queue.iter().enumerate() {
            let lines = budget.turn();
            if lines == 0 {
                waiting.extend_from_slice(&queue[i..]);
                break;
            }
            let Some(conn) = self.io.admins.get_mut(&id) else {
                continue;
            };
            conn.queued = false;
            // A turn costs at least one line, so that many sessions cost a bounded pass too.
            budget.spend(self.admin_lines(id, lines).max(1));
        }
        waiting.append(&mut self.io.admin_resume);
        self.io.admin_resume = waiting;
    }

    pub(super) fn drop_admin(&mut self, id: u64) {
        if let Some(conn) = self.io.admins.remove(&id) {
            if let Some(epoll) = &self.io.epoll {
                let _ = epoll.delete(conn.stream.fd());
            }
        }
    }

    /// `render` of this pass's view (see [`AdminListeners::snapshot_memo`]), built if need be.
    fn with_snapshot(
        &mut self,
        memory: Memory,
        render: impl FnOnce(&Snapshot) -> String,
    ) -> String {
        let now = self.now;
        let memo = self
            .io
            .admin
            .as_mut()
            .and_then(|l| l.snapshot_memo.take())
            .filter(|(kind, at, _)| *kind == memory && *at == now);
        let snapshot = match memo {
            Some((_, _, snapshot)) => snapshot,
            None => self.snapshot(memory),
        };
        let text = render(&snapshot);
        if let Some(listeners) = &mut self.io.admin {
            listeners.snapshot_memo = Some((memory, now, snapshot));
        }
        text
    }

    /// A consistent view of the master for `status` and `workers`; `memory` says how much of
    /// each worker's memory to measure.
    pub(super) fn snapshot(&self, memory: Memory) -> Snapshot {
        let now = Instant::now();
        let wall = SystemTime::now();
        let rfc3339 = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let board = |id| {
            self.io
                .procs
                .get(&id)
                .map(|p| p.slot.read())
                .unwrap_or_default()
        };
        let pools = self
            .sup
            .pools()
            .iter()
            .enumerate()
            .filter(|(_, pool)| !pool.gone())
            .map(|(idx, pool)| {
                let of_pool = || self.sup.workers().filter(move |(_, w)| w.pool == idx);
                let running = of_pool().filter(|(_, w)| w.life.serving()).count();
                let mut busy = of_pool().filter(|(_, w)| w.busy()).count();
                let (mut done, mut failed) = (pool.stats.done, pool.stats.failed);
                let source = pool.config.engine().map(|_| {
                    // Its workers say what they did and see on their scoreboard slots.
                    let boards: Vec<_> = of_pool().map(|(id, _)| board(id)).collect();
                    busy = boards.iter().filter(|b| b.running.is_some()).count();
                    for b in &boards {
                        done = done.saturating_add(b.jobs_done.saturating_sub(b.jobs_failed));
                        failed = failed.saturating_add(b.jobs_failed.min(b.jobs_done));
                    }
                    engine_source(&pool.config, &boards)
                });
                PoolSnapshot {
                    name: pool.config.name.clone(),
                    plugin: pool.plugin.clone(),
                    plugin_version: pool.plugin_version.clone(),
                    mode: if pool.config.mode == PoolMode::Loop {
                        "loop"
                    } else {
                        "jobs"
                    }
                    .into(),
                    workers_wanted: pool.wanted,
                    workers_running: running,
                    workers_busy: busy,
                    jobs_queued: pool.queue.len(),
                    jobs_running: busy,
                    jobs_in_flight: if pool.config.engine().is_some() {
                        busy
                    } else {
                        self.sup.in_flight(idx)
                    },
                    jobs_done: done,
                    jobs_failed: failed,
                    jobs_retried: pool.stats.retried,
                    jobs_dropped: pool.stats.dropped,
                    crashes: pool.stats.crashes,
                    timeouts: pool.stats.timeouts,
                    recycled: pool.stats.recycled,
                    stopped: pool.stats.stopped,
                    state: pool.state(now).as_str().into(),
                    source,
                }
            })
            .collect();
        let mut workers: Vec<WorkerSnapshot> = self
            .sup
            .workers()
            .map(|(id, w)| {
                let age = now.saturating_duration_since(w.started);
                let pool = &self.sup.pools()[w.pool];
                let board = pool.config.engine().is_some().then(|| board(id));
                let busy = match &board {
                    Some(b) => b.running.is_some(),
                    None => w.busy(),
                };
                WorkerSnapshot {
                    pid: w.pid.as_raw(),
                    pool: pool.config.name.clone(),
                    generation: w.generation,
                    state: w.life.as_str(busy).into(),
                    job_age_secs: w
                        .head_started
                        .map(|t| now.saturating_duration_since(t).as_secs_f64()),
                    jobs_done: board.map_or(w.jobs_done, |b| b.jobs_done),
                    rss_bytes: crate::sys::rss_of(w.pid).ok(),
                    own_bytes: match memory {
                        Memory::Resident => None,
                        Memory::Own => crate::sys::own_of(w.pid).ok(),
                        Memory::OwnRecent => self.own_memory(w.pid, now),
                    },
                    started: rfc3339(wall.checked_sub(age).unwrap_or(wall)),
                    age_secs: age.as_secs_f64(),
                }
            })
            .collect();
        workers.sort_by(|a, b| (&a.pool, a.pid).cmp(&(&b.pool, b.pid)));
        Snapshot {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: now.saturating_duration_since(self.started).as_secs_f64(),
            config: self.config.path.display().to_string(),
            generation: self.sup.generation(),
            generations_loaded: self.registry.loaded().count(),
            last_reload: self.sup.last_reload().cloned(),
            pools,
            workers,
            recent: self
                .sup
                .recent()
                .rev()
                .map(|r| crate::admin::RecentEvent {
                    at: rfc3339(wall_at(r.at, now, wall)),
                    kind: r.kind.into(),
                    pool: r.pool.clone(),
                    pid: r.pid,
                    reason: r.reason.clone(),
                })
                .collect(),
        }
    }

    /// A worker's own memory, measured at most once per [`OWN_MEMORY_FOR`]: it walks the
    /// worker's page tables (`smaps_rollup`), milliseconds each with a large table, and
    /// `workers` and `metrics` may be asked for every pass (a scraper, a flood of lines whose
    /// replies fill the session's output, so that each pass handles one).
    fn own_memory(&self, pid: nix::unistd::Pid, now: Instant) -> Option<u64> {
        let mut cache = self.io.own_memory.borrow_mut();
        if let Some((at, bytes)) = cache.get(&pid) {
            if now.saturating_duration_since(*at) < OWN_MEMORY_FOR {
                return *bytes;
            }
        }
        let bytes = crate::sys::own_of(pid).ok();
        if cache.len() > 2 * self.io.procs.len() + 16 {
            // Pids of workers that are gone.
            let live = &self.io.by_pid;
            cache.retain(|pid, _| live.contains_key(pid));
        }
        cache.insert(pid, (now, bytes));
        bytes
    }

    /// Each pool's figures for `metrics` beyond its snapshot.
    fn pool_figures(&self) -> Vec<crate::metrics::PoolFigures> {
        let now = self.now;
        self.sup
            .pools()
            .iter()
            .enumerate()
            .filter(|(_, pool)| !pool.gone())
            .map(|(idx, pool)| crate::metrics::PoolFigures {
                name: pool.config.name.clone(),
                socket_fed: pool.config.mode == PoolMode::Jobs && pool.config.engine().is_none(),
                metrics: pool.metrics.clone(),
                busy_seconds: self.sup.busy_seconds(idx, now),
            })
            .collect()
    }

    /// The master process's own figures for `metrics`.
    fn master_figures(&self) -> crate::metrics::MasterFigures {
        let now = Instant::now();
        let wall = SystemTime::now();
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let ((ok, failed), last_at) = self.sup.reloads();
        let last_reload = match (last_at, self.sup.last_reload()) {
            (Some(at), Some(report)) => Some((unix(wall_at(at, now, wall)), report.ok)),
            _ => None,
        };
        let me = crate::sys::own_process();
        crate::metrics::MasterFigures {
            rss_bytes: crate::sys::rss_of(self.pid).ok(),
            open_fds: me.open_fds,
            max_fds: me.max_fds,
            cpu_seconds: me.cpu_seconds,
            start_time: unix(wall_at(self.started, now, wall)),
            clients: self.io.clients.len(),
            admin_sessions: self.io.admins.len(),
            reloads_ok: ok,
            reloads_failed: failed,
            last_reload,
            http_restarts: self.io.http.as_ref().map_or(0, |h| h.restarts),
            unknown_pool_submits: self.sup.unknown_pool_submits(),
        }
    }
}

/// The wall-clock time of `at`, given that `now` is `wall`.
fn wall_at(at: Instant, now: Instant, wall: SystemTime) -> SystemTime {
    wall.checked_sub(now.saturating_duration_since(at))
        .unwrap_or(wall)
}

/// The text of the supervisor's reply to a command: what happened, then `OK` — or one
/// `ERR …` line.
pub(super) fn render_reply(reply: &Reply) -> String {
    match reply {
        Reply::Ok => "OK\n".into(),
        Reply::Scaled { pool, from, to } => format!("pool {pool}: {from} -> {to} workers\nOK\n"),
        Reply::Restarting { workers, pools } => {
            format!("restarting {workers} worker(s) in {pools} pool(s)\nOK\n")
        }
        Reply::StoppingPool { pool, workers } => {
            format!("pool {pool}: stopping {workers} worker(s)\nOK\n")
        }
        Reply::StartingPool { pool, wanted } => {
            format!("pool {pool}: starting, {wanted} worker(s) wanted\nOK\n")
        }
        Reply::Reloaded(report) => reload_reply(report),
        Reply::Refused(e) => AdminError::Command(e.clone()).reply(),
    }
}

/// The reply to `reload`.
fn reload_reply(report: &ReloadReport) -> String {
    if report.ok {
        format!("{}\nOK\n", admin::one_line(&report.message))
    } else {
        AdminError::ReloadFailed(report.message.clone()).reply()
    }
}

/// How long a worker's own memory, once measured, is shown before it is measured again.
const OWN_MEMORY_FOR: Duration = Duration::from_secs(1);

/// How much of each worker's memory a [`Master::snapshot`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Memory {
    /// The RSS only (`/proc/PID/statm`, a few µs): for `status`, which may be asked often.
    Resident,
    /// The RSS and its own memory (`/proc/PID/smaps_rollup`, a walk of its page tables): for
    /// `workers`.
    Own,
    /// The same, but the own memory as measured within the last [`OWN_MEMORY_FOR`]: for
    /// `metrics`, which a scraper (or a flood) asks for again and again.
    OwnRecent,
}

/// An engine-fed pool's source as its workers' slots tell it.
fn engine_source(
    pool: &crate::config::PoolConfig,
    boards: &[crate::scoreboard::Report],
) -> crate::admin::SourceSnapshot {
    use crate::scoreboard::SourceState;
    let connected = boards
        .iter()
        .filter(|b| b.source == SourceState::Connected)
        .count();
    let reason = boards.iter().find_map(|b| match &b.source {
        SourceState::Disconnected { reason } | SourceState::Partial { reason } => {
            Some(reason.clone())
        }
        _ => None,
    });
    let partial = boards
        .iter()
        .any(|b| matches!(b.source, SourceState::Partial { .. }));
    let state = match (connected, &reason) {
        (0, Some(_)) if !partial => "disconnected",
        (_, Some(_)) => "partly disconnected",
        (0, None) => "connecting",
        _ => "connected",
    };
    let now_ms = crate::scoreboard::monotonic_ms();
    let figures = boards
        .iter()
        .filter_map(|b| b.figures)
        .filter(|f| f.at_ms <= now_ms)
        .max_by_key(|f| f.at_ms);
    let (kind, address, stream, group, function) = match (&pool.redis, &pool.gearman) {
        (Some(cfg), _) => (
            "redis",
            cfg.shown_url.clone(),
            Some(cfg.stream.clone()),
            Some(cfg.group.clone()),
            None,
        ),
        (None, Some(cfg)) => (
            "gearman",
            cfg.servers
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            None,
            None,
            Some(cfg.function.clone()),
        ),
        (None, None) => ("none", String::new(), None, None, None),
    };
    crate::admin::SourceSnapshot {
        kind: kind.into(),
        address,
        stream,
        group,
        function,
        state: state.into(),
        reason,
        workers_connected: connected,
        stream_length: figures.map(|f| f.length),
        pending: figures.map(|f| f.pending),
        lag: figures.and_then(|f| f.lag),
        figures_age_secs: figures.map(|f| (now_ms - f.at_ms) as f64 / 1000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn admin_errors_render_as_one_err_line() {
        let cases = [
            (
                AdminError::Command(CommandError::NoPool {
                    name: "nope\nOK".into(),
                    pools: vec!["echo".into(), "hash".into()],
                }),
                "ERR no pool \"nope\\nOK\" (pools: echo, hash)\n",
            ),
            (
                AdminError::Command(CommandError::ShuttingDown),
                "ERR the master is shutting down\n",
            ),
            (
                AdminError::ReloadFailed("pool f: bad\nOK".into()),
                "ERR reload failed, nothing changed: pool f: bad\\nOK\n",
            ),
            (AdminError::WrongToken, "ERR wrong token\n"),
            (
                AdminError::NotAuthenticated,
                "ERR authenticate first: auth <token>\n",
            ),
            (
                AdminError::LineTooLong(4096),
                "ERR line over 4096 bytes; closing\n",
            ),
            (AdminError::NotText, "ERR not a text line; closing\n"),
            (
                AdminError::Parse("unknown command \"x\"\r".into()),
                "ERR unknown command \"x\"\\r\n",
            ),
        ];
        for (error, want) in cases {
            assert_eq!(error.reply(), want, "{error:?}");
            assert!(crate::admin::is_final_line(want.trim_end_matches('\n')));
        }
    }

    fn token_file(dir: &Path, text: &[u8], mode: u32) -> PathBuf {
        let path = dir.join("admin.token");
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_token_file_gives_its_trimmed_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = token_file(dir.path(), b"  s3cret-token-0123456789\n", 0o600);
        assert_eq!(read_token_file(&path).unwrap(), b"s3cret-token-0123456789");
        let path = token_file(dir.path(), b"s3cret-token-0123456789", 0o400);
        assert_eq!(read_token_file(&path).unwrap(), b"s3cret-token-0123456789");
    }

    #[test]
    fn token_files_that_are_refused_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let good = b"s3cret-token-0123456789\n";
        let cases: &[(&[u8], u32, &str)] = &[
            (
                good,
                0o644,
                "is readable by others (mode 0644); chmod 600 it",
            ),
            (good, 0o606, "is readable by others (mode 0606)"),
            (good, 0o602, "is writable by others (mode 0602)"),
            (good, 0o640, "is readable by its group (mode 0640)"),
            (good, 0o620, "is writable by its group (mode 0620)"),
            (good, 0o601, "is open to its group or others (mode 0601)"),
            (b"short\n", 0o600, "holds a token under 16 bytes"),
            (b"  \n", 0o600, "holds a token under 16 bytes"),
            (
                b"first-line-0123456\nsecond-line-0123\n",
                0o600,
                "must hold one line of text",
            ),
            (
                b"s3cret-token-\xff0123456789",
                0o600,
                "must hold one line of text",
            ),
        ];
        for (text, mode, want) in cases {
            let path = token_file(dir.path(), text, *mode);
            let e = read_token_file(&path).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("admin.token_file {} ", path.display())),
                "{e}"
            );
            assert!(e.contains(want), "mode {mode:o}: want {want:?} in {e}");
        }
        let big = vec![b'x'; (MAX_TOKEN_FILE + 1) as usize];
        let path = token_file(dir.path(), &big, 0o600);
        let e = read_token_file(&path).unwrap_err().to_string();
        assert!(e.contains("is over 65536 bytes"), "{e}");
    }

    #[test]
    fn a_missing_token_file_or_a_fifo_is_refused_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.token");
        let e = read_token_file(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "cannot read admin.token_file {}: ",
                missing.display()
            )),
            "{e}"
        );
        let fifo = dir.path().join("fifo.token");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_token_file(&fifo).unwrap_err().to_string();
        assert!(e.contains("is not a regular file"), "{e}");
        let e = read_token_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is not a regular file"), "{e}");
    }
}
