//! gearmand as a worker's job source: each worker of a `source = "gearman"` pool is a Gearman
//! worker connected to every server of `[pool.gearman] servers`, registered for the pool's
//! function, woken by whichever server has work. The packets are [`crate::gearman::packet`]'s;
//! this module owns the connections and the worker's side of the conversation:
//!
//! ```text
//! connect ─► SET_CLIENT_ID, CAN_DO[_TIMEOUT], ECHO_REQ ─► ECHO_RES: the server answers
//! GRAB_JOB_UNIQ ─► NO_JOB ─► PRE_SLEEP ─► … NOOP ─► GRAB_JOB_UNIQ ─► JOB_ASSIGN_UNIQ
//! run the plugin (WORK_STATUS / WORK_DATA as it reports) ─► WORK_COMPLETE | WORK_FAIL | WORK_EXCEPTION
//! ```
//!
//! - **One job at a time.** At most one GRAB is outstanding over all servers that answer
//!   (see the next point), so a worker never holds a job it has not started (a job held is a
//!   job gearmand cannot give to an idle worker). Servers that may have work (just
//!   connected, woke us with NOOP, or gave us the last job) are grabbed from in turn.
//!   gearmand 1.1.20 re-arms a sleeper's NOOP only after a GRAB, so every NOOP is followed by
//!   a GRAB, and a worker sleeps on a server only after its NO_JOB. A worker about to leave
//!   for `max_jobs` or `max_lifetime` sends no GRAB after its last job: a job it took on its
//!   way out would go back to gearmand as a dropped one (which `--job-retries` counts).
//! - **A server that never answers does not hold the others up.** A server is grabbed from
//!   only once it answered the ECHO sent right after connecting; a GRAB has the worker to
//!   itself for at most [`GRAB_PATIENCE`] (and not at all from a server in an outage, one
//!   that has not answered a GRAB since it went down), after which the others are grabbed
//!   from too; a GRAB or ECHO unanswered for [`REPLY_TIMEOUT`] closes that connection; an
//!   idle connection is ECHOed every [`PING_EVERY`], so a half-open one (a server that
//!   vanished) is noticed. Connecting is non-blocking, so a server that drops SYNs costs
//!   nothing either. Those deadlines are checked only right after that server's socket was
//!   read dry: an answer that came while a job ran (longer than the deadline) is an answer.
//! - **Failures.** A lost or refused connection is retried with capped exponential back-off
//!   (100 ms → 5 s), logged once when the outage starts and once when it ends — when the
//!   server answers a GRAB or a liveness ECHO again, not merely its greeting ECHO, so a
//!   server that greets and then fails stays one outage with a growing back-off; the
//!   worker's scoreboard slot says which servers are down and why, for `status`. A bad
//!   packet closes that connection (and is reconnected), never the worker loop; so does a
//!   JOB_ASSIGN of a function the worker did not register. A worker that dies with a job
//!   drops its connection: gearmand gives the job to another worker. A job whose result
//!   cannot be written (the server went away) counts as run and failed.
//! - **Results.** A plugin error is WORK_FAIL (body: the handle only; a trailing NUL makes
//!   libgearman clients hang) or WORK_EXCEPTION with the message (`failure = "exception"`).
//! - **Queue figures** for `status` ([`Figures`]): each server's `status` line for the
//!   function, asked in gearmand's text admin protocol ([`crate::gearman::admin`]) on a
//!   second connection per server, kept between rounds; summed over the servers that
//!   answered and published on the slot (length = queued + running, pending = running,
//!   lag = waiting for a worker). Asked once after connecting, then only around jobs, at
//!   most every [`FIGURES_EVERY`]: an idle worker asks once more and then sleeps. Every
//!   worker asks for itself (no worker knows the others); the master shows the freshest.
//!
//! Never connects in the master (only in the worker, after fork); never buffers more than
//! one packet of [`MAX_BODY`] per server (and one `status` line per admin connection);
//! never blocks on one server longer than [`REPLY_TIMEOUT`] (writing a result to a server
//! that stopped reading ends that connection), nor on the figures longer than
//! [`FIGURES_WAIT`] at a job's start.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use jobhost_plugin_api::PluginInstance;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6};

use super::job::{self, Report};
use super::source::{JobSource, Next, Wake};
use crate::config::{GearmanConfig, GearmanFailure, GearmanServer, PoolConfig};
use crate::gearman::admin::{FunctionStatus, StatusError, StatusReader, STATUS_REQUEST};
use crate::gearman::packet::{Decoder, Fill, FromServer, PacketError, ToServer};
use crate::scoreboard::{Slot, SourceState, StreamFigures, MAX_RUNNING};

/// The largest packet body taken from a server: a workload of up to 1 GiB with its handle,
/// function and unique id. gearmand's own limit is the protocol's (4 GiB).
pub const MAX_BODY: usize = (1 << 30) + (64 << 10);
/// The longest a server may take to answer a GRAB or an ECHO, or to take a packet we write.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection is ECHOed this often.
pub const PING_EVERY: Duration = Duration::from_secs(30);
/// How long a GRAB keeps the others from being grabbed: a server slower than this to answer
/// one (a healthy gearmand takes well under a millisecond) no longer holds the worker to
/// itself, at the price of perhaps two jobs assigned at once (the second runs next).
pub const GRAB_PATIENCE: Duration = Duration::from_secs(1);
/// A connect still under way after this long is given up (and retried).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Progress sent more often than this is coalesced (the latest wins; the last one before the
/// result is always sent).
const STATUS_EVERY: Duration = Duration::from_millis(50);
/// What the liveness ECHO carries.
const PING: &[u8] = b"jobhost";
/// The most packets taken from one server per look: a server that floods (NOOPs, ERRORs)
/// cannot keep the worker from its other servers and its signals.
const PACKET_BUDGET: usize = 1024;
/// ERROR packets are logged at most this often per server (with a count of the others).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(1);
/// A busy worker asks its servers for the function's figures at most this often (as a redis
/// worker reads its stream's).
const FIGURES_EVERY: Duration = Duration::from_secs(1);
/// How long a server may take to accept the admin connection, and then to answer `status`:
/// a server slower than that is left out of the round (and its admin connection closed).
const FIGURES_PATIENCE: Duration = Duration::from_secs(2);
/// How long a job's start waits for the answers to the `status` just asked, so that the
/// figures are seen while the job runs, not after it (a healthy gearmand answers in well
/// under a millisecond). At most once per [`FIGURES_EVERY`]: a worker whose servers are
/// slow loses at most 2% of its time to it. Answers later than this are read after the job.
const FIGURES_WAIT: Duration = Duration::from_millis(20);
/// A server whose admin connection failed is asked again after this, doubling to the cap.
const ADMIN_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const ADMIN_BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Why a connection to a server ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("cannot resolve: {0}")]
    Resolve(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Os(#[from] nix::Error),
    #[error("connecting timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("the server closed the connection")]
    Closed,
    #[error("bad packet from the server: {0}")]
    Packet(#[from] PacketError),
    #[error("unexpected {0} from the server")]
    Unexpected(&'static str),
    #[error("a JOB_ASSIGN for function {0:?}, which this worker did not register")]
    OtherFunction(String),
    #[error("no answer to {what} within {REPLY_TIMEOUT:?}")]
    NoAnswer { what: &'static str },
    #[error("the server takes no more data (a write blocked for {REPLY_TIMEOUT:?})")]
    WriteTimeout,
}

/// Where a connection is in its conversation with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No connection; the next try is at `retry_at`.
    Down { retry_at: Instant },
    /// A non-blocking connect is under way since `since`.
    Connecting { since: Instant },
    /// Registered; the ECHO sent after registering is not answered yet.
    Greeting { since: Instant },
    /// Answering, nothing asked: GRAB when it may have work.
    Ready,
    /// A GRAB is out (the one of all servers), since then.
    Grabbing { since: Instant },
    /// PRE_SLEEP sent after NO_JOB: a NOOP will say when a job comes.
    Sleeping,
}

struct Outage {
    since: Instant,
    delay: Duration,
    reason: String,
}

/// One server.
struct Conn {
    server: GearmanServer,
    /// The address it was last connected at (the admin connection uses it too).
    addr: Option<SocketAddr>,
    stream: Option<TcpStream>,
    decoder: Decoder,
    state: State,
    /// It said NOOP, just connected, or gave us the last job: GRAB it when it is our turn.
    may_have_work: bool,
    /// An ECHO is out since then (a liveness check of an idle connection).
    ping_since: Option<Instant>,
    /// When we last heard from it.
    heard: Instant,
    outage: Option<Outage>,
    /// Packets being written (kept only while a write would block).
    out: Vec<u8>,
    /// When an ERROR from it was last logged, and how many came since.
    error_logged: Option<Instant>,
    errors_unlogged: u64,
}

impl Conn {
    fn new(server: GearmanServer, now: Instant) -> Conn {
        Conn {
            server,
            addr: None,
            stream: None,
            decoder: Decoder::new(MAX_BODY),
            state: State::Down { retry_at: now },
            may_have_work: false,
            ping_since: None,
            heard: now,
            outage: None,
            out: Vec::new(),
            error_logged: None,
            errors_unlogged: 0,
        }
    }

    fn up(&self) -> bool {
        matches!(
            self.state,
            State::Ready | State::Grabbing { .. } | State::Sleeping
        )
    }

    /// Its GRAB keeps the others from being grabbed: it is out, not for long, and the server
    /// has answered one since it was last down.
    fn holds_grab(&self, now: Instant) -> bool {
        match self.state {
            State::Grabbing { since } => {
                self.outage.is_none() && now.saturating_duration_since(since) < GRAB_PATIENCE
            }
            _ => false,
        }
    }

    /// Is to be grabbed from when its turn comes.
    fn wants_grab(&self) -> bool {
        self.may_have_work && matches!(self.state, State::Ready | State::Sleeping)
    }

    /// The deadline it missed, checked right after its socket was read dry (so that an
    /// answer that came while a job ran is read before its lateness is judged).
    fn overdue(&self, now: Instant) -> Option<ConnError> {
        let late = |since: Instant, limit: Duration| now.saturating_duration_since(since) >= limit;
        match self.state {
            State::Connecting { since } if late(since, CONNECT_TIMEOUT) => {
                Some(ConnError::ConnectTimeout(CONNECT_TIMEOUT))
            }
            State::Greeting { since } if late(since, REPLY_TIMEOUT) => {
                Some(ConnError::NoAnswer { what: "ECHO_REQ" })
            }
            State::Grabbing { since } if late(since, REPLY_TIMEOUT) => Some(ConnError::NoAnswer {
                what: "GRAB_JOB_UNIQ",
            }),
            State::Ready | State::Sleeping | State::Grabbing { .. } => match self.ping_since {
                Some(since) if late(since, REPLY_TIMEOUT) => {
                    Some(ConnError::NoAnswer { what: "ECHO_REQ" })
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Writes `packet` now, waiting at most [`REPLY_TIMEOUT`] for the server to take it.
    fn send(&mut self, packet: ToServer<'_>) -> Result<(), ConnError> {
        self.out.clear();
        let tail = packet.encode_head(&mut self.out);
        let stream = self.stream.as_ref().ok_or(ConnError::Closed)?;
        write_all(stream, &[&self.out, tail])?;
        self.out.clear();
        if self.out.capacity() > 64 << 10 {
            self.out = Vec::new();
        }
        Ok(())
    }
}

/// Writes every byte of `parts` to a non-blocking socket (one writev for all of them when
/// the socket takes them), polling while it is full, for at most [`REPLY_TIMEOUT`] without
/// progress.
fn write_all(mut stream: &TcpStream, parts: &[&[u8]]) -> Result<(), ConnError> {
    let mut slices: Vec<io::IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| io::IoSlice::new(p))
        .collect();
    let mut left: &mut [io::IoSlice<'_>] = &mut slices;
    let mut deadline = Instant::now() + REPLY_TIMEOUT;
    {
        while !left.is_empty() {
            match stream.write_vectored(left) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => {
                    io::IoSlice::advance_slices(&mut left, n);
                    deadline = Instant::now() + REPLY_TIMEOUT;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ConnError::WriteTimeout);
                    }
                    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
                    let ms = left.as_millis().clamp(1, 60_000) as i32;
                    let _ = poll(
                        &mut fds,
                        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// The first address of `server` (a literal, or a name resolved now).
fn resolve(server: &GearmanServer) -> Result<SocketAddr, ConnError> {
    (server.host.as_str(), server.port)
        .to_socket_addrs()
        .map_err(ConnError::Resolve)?
        .next()
        .ok_or_else(|| {
            ConnError::Resolve(io::Error::new(
                io::ErrorKind::NotFound,
                "no address for this name",
            ))
        })
}

/// Starts a non-blocking connect to `addr`: the socket, once writable, tells how it went.
fn start_connect(addr: SocketAddr) -> Result<TcpStream, ConnError> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let connect = |fd: &OwnedFd| match addr {
        SocketAddr::V4(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let _ = socket::setsockopt(&fd, sockopt::TcpNoDelay, &true);
    // A server that vanishes without a FIN is noticed by the ECHOs; keepalive helps the
    // kernel notice too while a long job runs.
    let _ = socket::setsockopt(&fd, sockopt::KeepAlive, &true);
    match connect(&fd) {
        Ok(()) | Err(nix::Error::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from(fd))
}

/// Why a server gave no figures this round (its admin connection is closed).
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Os(#[from] nix::Error),
    #[error("{0}")]
    Connect(ConnError),
    #[error("the server closed the connection")]
    Closed,
    #[error("the server did not take the request at once")]
    Unwritten,
    #[error("no answer within {FIGURES_PATIENCE:?}")]
    NoAnswer,
    #[error("{0}")]
    Answer(#[from] StatusError),
    #[error("the server sent bytes nobody asked for")]
    Unasked,
}

/// Where a server's admin connection is.
#[derive(Debug)]
enum AdminState {
    Closed,
    /// A non-blocking connect is under way since then (for the round out).
    Connecting {
        since: Instant,
    },
    /// Connected, nothing asked: kept for the next round.
    Idle,
    /// `status` is out (in the round out) since then, its answer read as it comes.
    Asked {
        since: Instant,
        reader: StatusReader,
    },
}

/// A server's part in the round out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    NotAsked,
    Out,
    Answered(FunctionStatus),
    Failed,
}

/// One server's admin connection (its worker connection's text-protocol twin), kept between
/// rounds: one connect per server and worker, not one per round.
struct Admin {
    server: GearmanServer,
    /// Its worker connection answers, at this address: it is asked in a round.
    up: Option<SocketAddr>,
    stream: Option<TcpStream>,
    state: AdminState,
    part: Part,
    /// After a failure, not asked before then.
    retry_at: Instant,
    delay: Duration,
    /// A failure was logged; the next success says so.
    failing: bool,
}

/// A round of `status` questions: asked of every server that answers, at once.
#[derive(Clone, Copy)]
struct Round {
    /// When asked (CLOCK_MONOTONIC ms): the figures' time.
    at_ms: u64,
}

/// The function's figures for `status` (issue 18's lag): what each server says in its admin
/// protocol's `status` — TOTAL (queued or running), RUNNING — summed over the servers that
/// answered, published on the slot as [`StreamFigures`]: length = TOTAL, pending = RUNNING,
/// lag = TOTAL − RUNNING (jobs no worker has taken).
///
/// Asked on a connection of its own per server (gearmand would take the text command on
/// the worker connection too, but its answer, unframed text, could then come between two
/// binary packets, and an answer that is garbage would cost the worker connection and its
/// job). Asked only when something changed (the worker connected, a job started or ended)
/// and at most every [`FIGURES_EVERY`]: at a job's start (the job is then running at the
/// server, the others waiting; the answer is read after it), or when the worker is quiet
/// (no GRAB out). An idle worker asks once and then sleeps: no timer of its own after that.
/// Never blocks: connects and reads are non-blocking in the worker's poll loop, the request
/// is one short write that must go at once, and a round lasts at most [`FIGURES_PATIENCE`].
struct Figures {
    function: Vec<u8>,
    admins: Vec<Admin>,
    round: Option<Round>,
    /// Something changed since the last round started.
    stale: bool,
    next_at: Instant,
}

impl Figures {
    fn new(servers: &[GearmanServer], function: &str, now: Instant) -> Figures {
        Figures {
            function: function.as_bytes().to_vec(),
            admins: servers
                .iter()
                .map(|server| Admin {
                    server: server.clone(),
                    up: None,
                    stream: None,
                    state: AdminState::Closed,
                    part: Part::NotAsked,
                    retry_at: now,
                    delay: ADMIN_BACKOFF_FIRST,
                    failing: false,
                })
                .collect(),
            round: None,
            stale: false,
            next_at: now,
        }
    }

    /// Server `i`'s worker connection answers (at `addr`), or no longer does.
    fn set_up(&mut self, i: usize, addr: Option<SocketAddr>) {
        if addr.is_some() {
            self.stale = true;
        }
        self.admins[i].up = addr;
    }

    /// When a round may start: `None` while one is out, nothing changed, or no server
    /// answers.
    fn due_at(&self) -> Option<Instant> {
        if !self.stale || self.round.is_some() {
            return None;
        }
        self.admins
            .iter()
            .filter(|a| a.up.is_some())
            .map(|a| a.retry_at)
            .min()
            .map(|t| t.max(self.next_at))
    }

    fn due(&self, now: Instant) -> bool {
        self.due_at().is_some_and(|t| now >= t)
    }

    /// Asks every server that answers (and is not backing off) for `status`.
    fn start_round(&mut self, now: Instant) {
        self.stale = false;
        self.next_at = now + FIGURES_EVERY;
        self.round = Some(Round {
            at_ms: crate::scoreboard::monotonic_ms(),
        });
        for i in 0..self.admins.len() {
            let admin = &mut self.admins[i];
            let Some(addr) = admin.up.filter(|_| now >= admin.retry_at) else {
                admin.part = Part::NotAsked;
                continue;
            };
            admin.part = Part::Out;
            let asked = match admin.state {
                AdminState::Idle => admin.ask(&self.function, now),
                AdminState::Closed => start_connect(addr)
                    .map(|stream| {
                        admin.stream = Some(stream);
                        admin.state = AdminState::Connecting { since: now };
                    })
                    .map_err(AdminError::Connect),
                // (Not outside a round: a round's end closes or answers them.)
                AdminState::Connecting { .. } | AdminState::Asked { .. } => Ok(()),
            };
            if let Err(e) = asked {
                self.fail(i, &e, now);
            }
        }
    }

    /// Server `i`'s admin connection failed, or its answer did: close it, back off, log
    /// once until it answers again.
    fn fail(&mut self, i: usize, error: &AdminError, now: Instant) {
        let admin = &mut self.admins[i];
        admin.stream = None;
        admin.state = AdminState::Closed;
        if admin.part == Part::Out {
            admin.part = Part::Failed;
        }
        admin.retry_at = now + admin.delay;
        admin.delay = (admin.delay * 2).min(ADMIN_BACKOFF_CAP);
        if std::mem::replace(&mut admin.failing, true) {
            log::debug!("gearman {}: no figures: {error}", admin.server);
        } else {
            log::warn!(
                "gearman {}: no queue figures from its admin protocol (`status`): {error} \
                 (logged once until it answers)",
                admin.server
            );
        }
    }

    /// Reads what the admin connections say, judges their deadlines (only now that what
    /// came is read: an answer that came while a job ran is an answer; and counted from
    /// the request, which may have gone out only after a job, once its connect was done),
    /// and publishes the round's figures once every server asked answered or failed.
    fn look(&mut self, slot: &Slot, now: Instant) {
        for i in 0..self.admins.len() {
            if let Err(e) = self.admins[i].read(&self.function, now) {
                self.fail(i, &e, now);
            }
        }
        let Some(&Round { at_ms }) = self.round.as_ref() else {
            return;
        };
        for i in 0..self.admins.len() {
            let admin = &self.admins[i];
            if admin.part == Part::Out && admin.deadline().is_none_or(|due| now >= due) {
                self.fail(i, &AdminError::NoAnswer, now);
            }
        }
        if self.admins.iter().any(|a| a.part == Part::Out) {
            return;
        }
        self.round = None;
        let mut answered: Option<StreamFigures> = None;
        for admin in &mut self.admins {
            if let Part::Answered(status) = std::mem::replace(&mut admin.part, Part::NotAsked) {
                let sum = answered.get_or_insert(StreamFigures {
                    at_ms,
                    length: 0,
                    pending: 0,
                    lag: Some(0),
                });
                sum.length = sum.length.saturating_add(status.total);
                sum.pending = sum.pending.saturating_add(status.running);
                sum.lag = sum.lag.map(|l| l.saturating_add(status.waiting()));
            }
        }
        if let Some(figures) = answered {
            slot.publish(|w| w.figures(&figures));
        }
    }

    /// Waits up to `wait` for the round out to end (at a job's start, see [`FIGURES_WAIT`]).
    fn settle(&mut self, slot: &Slot, wait: Duration) {
        let until = Instant::now() + wait;
        loop {
            let now = Instant::now();
            self.look(slot, now);
            let left = until.saturating_duration_since(now);
            if self.round.is_none() || left.is_zero() {
                return;
            }
            let mut fds = Vec::new();
            self.wake_fds(&mut fds);
            let ms = left.as_millis().clamp(1, 1000) as i32;
            // (EINTR: a signal, which the worker loop handles after the job.)
            if poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            )
            .is_err()
            {
                return;
            }
        }
    }

    /// When the worker must wake for the figures: the round's next deadline, or (when
    /// quiet: no GRAB out, whose answer wakes it anyway) the next round that is due.
    fn next_timer(&self, quiet: bool) -> Option<Instant> {
        match &self.round {
            Some(_) => self
                .admins
                .iter()
                .filter(|a| a.part == Part::Out)
                .filter_map(Admin::deadline)
                .min(),
            None if quiet => self.due_at(),
            None => None,
        }
    }

    fn wake_fds<'a>(&'a self, fds: &mut Vec<PollFd<'a>>) {
        for admin in &self.admins {
            if let Some(stream) = &admin.stream {
                let flags = match admin.state {
                    AdminState::Connecting { .. } => PollFlags::POLLOUT,
                    _ => PollFlags::POLLIN,
                };
                fds.push(PollFd::new(stream.as_fd(), flags));
            }
        }
    }

    fn close(&mut self) {
        for admin in &mut self.admins {
            admin.stream = None;
            admin.state = AdminState::Closed;
        }
    }
}

impl Admin {
    /// When its connect or its question is overdue (`None`: nothing under way).
    fn deadline(&self) -> Option<Instant> {
        match self.state {
            AdminState::Connecting { since } | AdminState::Asked { since, .. } => {
                Some(since + FIGURES_PATIENCE)
            }
            AdminState::Closed | AdminState::Idle => None,
        }
    }

    /// Sends `status`: one short write, which a connection with nothing out takes at once.
    fn ask(&mut self, function: &[u8], now: Instant) -> Result<(), AdminError> {
        let mut stream = self.stream.as_ref().ok_or(AdminError::Closed)?;
        loop {
            match stream.write(STATUS_REQUEST) {
                Ok(n) if n == STATUS_REQUEST.len() => break,
                Ok(_) => return Err(AdminError::Unwritten),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(AdminError::Unwritten)
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.state = AdminState::Asked {
            since: now,
            reader: StatusReader::new(function),
        };
        Ok(())
    }

    /// Moves its connection on with what the socket has: a finished connect asks, an
    /// answer is read (all of it there is: an answer is bounded), an idle connection the
    /// server closed is closed.
    fn read(&mut self, function: &[u8], now: Instant) -> Result<(), AdminError> {
        use std::io::Read;
        let Some(mut stream) = self.stream.as_ref() else {
            return Ok(());
        };
        if matches!(self.state, AdminState::Connecting { .. }) {
            let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
            if poll(&mut fds, PollTimeout::ZERO)? == 0 {
                return Ok(()); // still under way
            }
            if let Some(error) = stream.take_error()? {
                return Err(error.into());
            }
            self.state = AdminState::Idle;
            if self.part == Part::Out {
                self.ask(function, now)?;
            }
            return Ok(());
        }
        let mut buf = [0u8; 16 << 10];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match &mut self.state {
                AdminState::Asked { reader, .. } => {
                    if n == 0 {
                        return Err(AdminError::Closed);
                    }
                    if let Some(status) = reader.feed(&buf[..n])? {
                        self.state = AdminState::Idle;
                        self.part = Part::Answered(status);
                        self.delay = ADMIN_BACKOFF_FIRST;
                        if std::mem::take(&mut self.failing) {
                            log::info!("gearman {}: queue figures again", self.server);
                        }
                    }
                }
                // Closed by the server between rounds (a restart, an idle timeout): quietly
                // reconnected at the next round.
                AdminState::Idle if n == 0 => {
                    log::debug!("gearman {}: the admin connection closed", self.server);
                    self.stream = None;
                    self.state = AdminState::Closed;
                    return Ok(());
                }
                AdminState::Idle => return Err(AdminError::Unasked),
                AdminState::Connecting { .. } | AdminState::Closed => return Ok(()),
            }
        }
    }
}

/// The worker's source: every server of the pool, one job at a time.
pub struct GearmanSource {
    channel: OwnedFd,
    slot: Slot,
    cfg: GearmanConfig,
    client_id: String,
    conns: Vec<Conn>,
    /// Where the next GRAB round starts (servers take turns).
    turn: usize,
    ran: u64,
    failed: u64,
    /// What the slot last said of the servers (published when it changes).
    said: Option<SourceState>,
    /// Holding back (short of memory): no GRAB.
    paused: bool,
    /// The pool's `max_jobs` and `max_lifetime`: the worker leaves when it reaches either,
    /// so it grabs nothing it would not run.
    max_jobs: Option<u64>,
    max_lifetime: Option<Duration>,
    /// When the worker loop first asked for work (its lifetime is counted from about then).
    started: Option<Instant>,
    /// The function's queue figures, for `status`.
    figures: Figures,
}

impl GearmanSource {
    pub fn new(
        channel: OwnedFd,
        pool: &PoolConfig,
        cfg: GearmanConfig,
        slot: Slot,
    ) -> GearmanSource {
        let now = Instant::now();
        let prefix = cfg.client_id.clone().unwrap_or_else(crate::sys::hostname);
        let client_id = format!("{prefix}:{}:{}", pool.name, std::process::id());
        let conns = cfg
            .servers
            .iter()
            .map(|s| Conn::new(s.clone(), now))
            .collect();
        let figures = Figures::new(&cfg.servers, &cfg.function, now);
        GearmanSource {
            channel,
            slot,
            cfg,
            client_id,
            conns,
            turn: 0,
            ran: 0,
            failed: 0,
            said: None,
            paused: false,
            max_jobs: pool.max_jobs,
            max_lifetime: pool.max_lifetime,
            started: None,
            figures,
        }
    }

    /// The worker leaves before its next job (`max_jobs` or `max_lifetime` reached): no GRAB.
    fn leaving(&self) -> bool {
        self.max_jobs.is_some_and(|max| self.ran >= max)
            || self
                .max_lifetime
                .zip(self.started)
                .is_some_and(|(max, started)| started.elapsed() >= max)
    }

    /// Connection `i` failed: close it, back off, log once per outage.
    fn lost(&mut self, i: usize, error: &ConnError, now: Instant) {
        let conn = &mut self.conns[i];
        let was_grabbing = matches!(conn.state, State::Grabbing { .. });
        conn.stream = None;
        conn.decoder = Decoder::new(MAX_BODY);
        conn.may_have_work = false;
        conn.ping_since = None;
        let reason = error.to_string();
        let delay = match &mut conn.outage {
            None => {
                log::warn!(
                    "gearman {}: {reason}; reconnecting (logged once per outage)",
                    conn.server
                );
                conn.outage = Some(Outage {
                    since: now,
                    delay: BACKOFF_FIRST,
                    reason,
                });
                BACKOFF_FIRST
            }
            Some(outage) => {
                log::debug!("gearman {}: still down: {reason}", conn.server);
                outage.delay = (outage.delay * 2).min(BACKOFF_CAP);
                outage.reason = reason;
                outage.delay
            }
        };
        conn.state = State::Down {
            retry_at: now + delay,
        };
        self.figures.set_up(i, None);
        if was_grabbing {
            self.grab_next(now);
        }
        self.publish_state();
    }

    /// Connection `i` answered its first ECHO: it may be grabbed from.
    fn answered(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        log::debug!("gearman {}: connected", conn.server);
        conn.state = State::Ready;
        conn.may_have_work = true;
        self.figures.set_up(i, conn.addr);
        self.publish_state();
    }

    /// Connection `i` answered a GRAB or a liveness ECHO: an outage, if there was one, is
    /// over. (Not its greeting ECHO: a server that greets and then fails every GRAB is one
    /// outage, logged once, retried with a growing back-off.)
    fn recovered(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if let Some(outage) = conn.outage.take() {
            log::warn!(
                "gearman {}: connected again after {:.1?}",
                conn.server,
                outage.since.elapsed()
            );
        }
    }

    /// What `status` shows: connected when every server answers, else which do not and why.
    fn publish_state(&mut self) {
        let down: Vec<String> = self
            .conns
            .iter()
            .filter(|c| !c.up())
            .map(|c| match &c.outage {
                Some(o) => format!("{}: {}", c.server, o.reason),
                None => format!("{}: connecting", c.server),
            })
            .collect();
        let up = self.conns.len() - down.len();
        let reason = format!(
            "{up} of {} servers up; {}",
            self.conns.len(),
            down.join("; ")
        );
        let state = match (up, down.len()) {
            (_, 0) => SourceState::Connected,
            (0, _) => SourceState::Disconnected { reason },
            _ => SourceState::Partial { reason },
        };
        if self.said.as_ref() != Some(&state) {
            self.slot.publish(|w| w.source(&state));
            self.said = Some(state);
        }
    }

    /// Starts or finishes connects, and sends the ECHOs that are due.
    fn tend(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            let step = self.tend_one(i, now);
            if let Err(e) = step {
                self.lost(i, &e, now);
            }
        }
    }

    fn tend_one(&mut self, i: usize, now: Instant) -> Result<(), ConnError> {
        let conn = &mut self.conns[i];
        match conn.state {
            State::Down { retry_at } if now >= retry_at => {
                let addr = resolve(&conn.server)?;
                conn.addr = Some(addr);
                conn.stream = Some(start_connect(addr)?);
                conn.state = State::Connecting { since: now };
                self.finish_connect(i, now)
            }
            // (Its deadline is judged by `overdue`, after its socket is read.)
            State::Connecting { .. } => self.finish_connect(i, now),
            State::Ready | State::Sleeping
                if conn.ping_since.is_none()
                    && now.saturating_duration_since(conn.heard) >= PING_EVERY =>
            {
                conn.send(ToServer::EchoReq(PING))?;
                conn.ping_since = Some(now);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A connect under way: if it is done, register.
    fn finish_connect(&mut self, i: usize, now: Instant) -> Result<(), ConnError> {
        let conn = &mut self.conns[i];
        let Some(stream) = &conn.stream else {
            return Err(ConnError::Closed);
        };
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
        if poll(&mut fds, PollTimeout::ZERO)? == 0 {
            return Ok(()); // still under way
        }
        if let Some(error) = stream.take_error()? {
            return Err(error.into());
        }
        conn.heard = now;
        conn.send(ToServer::SetClientId(self.client_id.as_bytes()))?;
        let function = self.cfg.function.as_bytes();
        match self.cfg.timeout {
            // gearmand 1.1.20 reads CAN_DO_TIMEOUT's value as milliseconds (1..=999 as 1000).
            Some(timeout) => conn.send(ToServer::CanDoTimeout {
                function,
                timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            })?,
            None => conn.send(ToServer::CanDo(function))?,
        }
        conn.send(ToServer::EchoReq(PING))?;
        conn.state = State::Greeting { since: now };
        Ok(())
    }

    /// Sends the one GRAB, to the next server that may have work (in turn), unless one is out.
    fn grab_next(&mut self, now: Instant) {
        if self.paused || self.leaving() || self.conns.iter().any(|c| c.holds_grab(now)) {
            return;
        }
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.turn + k) % n;
            let conn = &mut self.conns[i];
            if !conn.wants_grab() {
                continue;
            }
            conn.may_have_work = false;
            match conn.send(ToServer::GrabJobUniq) {
                Ok(()) => {
                    conn.state = State::Grabbing { since: now };
                    self.turn = (i + 1) % n;
                    return;
                }
                Err(e) => self.lost(i, &e, now),
            }
        }
    }

    /// Reads what server `i` sent and acts on each packet; runs a job it assigned.
    fn read_one(
        &mut self,
        i: usize,
        plugin: &mut PluginInstance,
        now: Instant,
    ) -> Result<Looked, ConnError> {
        // Whether, after a job of this server, it is again its turn at once (no other server
        // said it has work): then the next GRAB goes out with the result, in one write. (No
        // other server changes this while one reads this one: only one GRAB is ever out.)
        // Decided before the job, so the ran count it sees is one short.
        let grab_again = !self.paused
            && self.max_jobs.is_none_or(|max| self.ran + 1 < max)
            && self
                .conns
                .iter()
                .enumerate()
                .all(|(j, c)| j == i || !(c.wants_grab() || c.holds_grab(now)));
        for _ in 0..PACKET_BUDGET {
            let conn = &mut self.conns[i];
            let Some(stream) = &conn.stream else {
                return Ok(Looked::Drained);
            };
            // Packets already buffered first; then one read.
            let packet = conn.decoder.next()?;
            let Some(packet) = packet else {
                match conn.decoder.read_from(&mut &*stream)? {
                    Fill::Read(_) => continue,
                    Fill::WouldBlock => {
                        conn.decoder.shrink();
                        return Ok(Looked::Drained);
                    }
                    Fill::Closed => return Err(ConnError::Closed),
                }
            };
            conn.heard = now;
            match packet {
                FromServer::Noop => {
                    conn.may_have_work = true;
                    if conn.state == State::Sleeping {
                        conn.state = State::Ready;
                    }
                }
                FromServer::NoJob => {
                    if !matches!(conn.state, State::Grabbing { .. }) {
                        return Err(ConnError::Unexpected("NO_JOB"));
                    }
                    conn.send(ToServer::PreSleep)?;
                    conn.state = State::Sleeping;
                    self.recovered(i);
                    self.grab_next(now);
                }
                FromServer::EchoRes(_) => {
                    let pinged = conn.ping_since.take().is_some();
                    if matches!(conn.state, State::Greeting { .. }) {
                        self.answered(i);
                        self.grab_next(now);
                    } else if pinged {
                        self.recovered(i);
                    }
                }
                FromServer::Error { code, text } => {
                    // JOB_NOT_FOUND: a result for a job gearmand took back (its
                    // CAN_DO_TIMEOUT ran out) — it runs elsewhere; nothing to do here.
                    if conn
                        .error_logged
                        .is_some_and(|t| now.saturating_duration_since(t) < ERROR_LOG_EVERY)
                    {
                        conn.errors_unlogged += 1;
                        continue;
                    }
                    let more = match std::mem::take(&mut conn.errors_unlogged) {
                        0 => String::new(),
                        n => format!(" ({n} more errors since the last one logged)"),
                    };
                    conn.error_logged = Some(now);
                    log::warn!(
                        "gearman {}: the server says {}: {}{more}",
                        conn.server,
                        String::from_utf8_lossy(code),
                        String::from_utf8_lossy(text)
                    );
                }
                FromServer::OptionRes(_) => {}
                FromServer::JobAssign {
                    handle,
                    function,
                    workload,
                    ..
                } => {
                    if !matches!(conn.state, State::Grabbing { .. }) {
                        return Err(ConnError::Unexpected("JOB_ASSIGN"));
                    }
                    // Not ours to run (a server that mixes up workers): closing the
                    // connection gives it back.
                    if function != self.cfg.function.as_bytes() {
                        let shown = function.iter().take(64).copied().collect::<Vec<u8>>();
                        return Err(ConnError::OtherFunction(
                            String::from_utf8_lossy(&shown).into_owned(),
                        ));
                    }
                    // The workload stays in the decoder's buffer (the plugin reads it in
                    // place); the replies go out on the same socket.
                    let stream = conn.stream.as_ref().ok_or(ConnError::Closed)?;
                    let job = Assigned {
                        stream,
                        server: &conn.server,
                        handle,
                        workload,
                    };
                    // The GRAB goes with the result unless the worker leaves after this job:
                    // max_jobs is known now, max_lifetime once the job is done.
                    let lifetime_end = self
                        .max_lifetime
                        .zip(self.started)
                        .and_then(|(max, started)| started.checked_add(max));
                    let then_grab =
                        || grab_again && lifetime_end.is_none_or(|end| Instant::now() < end);
                    // The figures as the job starts (when due): it is running at the server,
                    // the function's other jobs wait. Asked now, the answer read after it.
                    self.figures.stale = true;
                    if self.figures.due(now) {
                        self.figures.start_round(now);
                        self.figures.settle(&self.slot, FIGURES_WAIT);
                    }
                    let outcome = run_job(plugin, &self.slot, job, self.cfg.failure, &then_grab);
                    self.ran += 1;
                    // Its end changes them too.
                    self.figures.stale = true;
                    let failed_job = !matches!(outcome, Ok((true, _)));
                    if failed_job {
                        self.failed += 1;
                    }
                    let (ran, failed) = (self.ran, self.failed);
                    self.slot.publish(|w| {
                        w.running(None);
                        w.jobs(ran, failed);
                    });
                    // The time now: the job may have taken long.
                    let now = Instant::now();
                    if let Err(e) = outcome {
                        // The job ran (and counts, for max_jobs too); its server is gone.
                        self.lost(i, &e, now);
                        return Ok(Looked::Ran);
                    }
                    let grabbed = matches!(outcome, Ok((_, true)));
                    self.recovered(i);
                    let conn = &mut self.conns[i];
                    if grabbed {
                        conn.state = State::Grabbing { since: now };
                    } else {
                        // It gave us work: it may have more (its turn comes again in order).
                        conn.state = State::Ready;
                        conn.may_have_work = true;
                        self.grab_next(now);
                    }
                    return Ok(Looked::Ran);
                }
            }
        }
        Ok(Looked::MoreLater)
    }
}

/// What one look at a server did.
enum Looked {
    /// It assigned a job, which ran.
    Ran,
    /// Everything it sent is handled.
    Drained,
    /// It sent more than one look takes: look again soon (its bytes may all be buffered
    /// here already, so its socket would not wake the worker).
    MoreLater,
}

/// A job a server assigned, on that server's connection.
struct Assigned<'a> {
    stream: &'a TcpStream,
    server: &'a GearmanServer,
    handle: &'a [u8],
    workload: &'a [u8],
}

/// Runs one job and writes its outcome to the server, with the next GRAB if `then_grab`
/// says so once the job is done. `Ok((succeeded, grabbed))`: whether the plugin succeeded
/// (else it failed, and the server was told) and whether a GRAB went out; `Err`: the
/// connection failed.
fn run_job(
    plugin: &mut PluginInstance,
    slot: &Slot,
    job: Assigned<'_>,
    failure: GearmanFailure,
    then_grab: &dyn Fn() -> bool,
) -> Result<(bool, bool), ConnError> {
    let Assigned {
        stream,
        server,
        handle,
        workload,
    } = job;
    // The scoreboard shows a printable handle (the master times the job by it).
    let shown: Vec<u8> = handle
        .iter()
        .take(MAX_RUNNING)
        .map(|&b| if b.is_ascii_graphic() { b } else { b'?' })
        .collect();
    slot.publish(|w| w.running(Some(&shown)));
    let mut head = Vec::with_capacity(64);
    let mut broken: Option<ConnError> = None;
    let mut last_status: Option<Instant> = None;
    let mut pending_status: Option<(u32, u32)> = None;
    let mut send = |packet: ToServer<'_>, broken: &mut Option<ConnError>| {
        if broken.is_some() {
            return;
        }
        head.clear();
        let tail = packet.encode_head(&mut head);
        if let Err(e) = write_all(stream, &[&head, tail]) {
            *broken = Some(e);
        }
    };
    let result = job::handle(plugin, workload, &mut |report| match report {
        Report::Progress {
            numerator,
            denominator,
        } => {
            let status = scale(numerator, denominator);
            let now = Instant::now();
            if last_status.is_some_and(|t| now.saturating_duration_since(t) < STATUS_EVERY) {
                pending_status = Some(status);
                return;
            }
            last_status = Some(now);
            pending_status = None;
            send(
                ToServer::WorkStatus {
                    handle,
                    numerator: status.0,
                    denominator: status.1,
                },
                &mut broken,
            );
        }
        Report::Data(data) => send(ToServer::WorkData { handle, data }, &mut broken),
    });
    if let Some((numerator, denominator)) = pending_status {
        send(
            ToServer::WorkStatus {
                handle,
                numerator,
                denominator,
            },
            &mut broken,
        );
    }
    if let Some(e) = broken {
        return Err(e);
    }
    let outcome = match &result {
        Ok(data) => ToServer::WorkComplete { handle, data },
        Err(message) => {
            log::info!(
                "gearman {server}: job {} failed: {message}",
                String::from_utf8_lossy(&shown)
            );
            match failure {
                GearmanFailure::Fail => ToServer::WorkFail { handle },
                GearmanFailure::Exception => ToServer::WorkException {
                    handle,
                    data: message.as_bytes(),
                },
            }
        }
    };
    // The outcome, and the next GRAB when it goes to the same server: one writev.
    head.clear();
    let tail = outcome.encode_head(&mut head);
    let mut grab = Vec::new();
    let grabbed = then_grab();
    if grabbed {
        ToServer::GrabJobUniq.encode(&mut grab);
    }
    write_all(stream, &[&head, tail, &grab])?;
    Ok((result.is_ok(), grabbed))
}

/// A progress fraction in WORK_STATUS's 32-bit fields, scaled down together when too large.
fn scale(numerator: u64, denominator: u64) -> (u32, u32) {
    let top = numerator.max(denominator);
    if top <= u64::from(u32::MAX) {
        return (numerator as u32, denominator as u32);
    }
    let shift = 64 - top.leading_zeros() - 32;
    ((numerator >> shift) as u32, (denominator >> shift) as u32)
}

impl JobSource for GearmanSource {
    fn next(&mut self, plugin: &mut PluginInstance) -> io::Result<Next> {
        let now = Instant::now();
        self.started.get_or_insert(now);
        self.tend(now);
        self.grab_next(now);
        // Answers to `status` first: a job assigned in this pass may start a new round.
        self.figures.look(&self.slot, now);
        // Servers in turn, so one that keeps sending cannot starve the others.
        let n = self.conns.len();
        let start = self.turn;
        let mut more = false;
        for k in 0..n {
            let i = (start + k) % n;
            let looked = match self.read_one(i, plugin, now) {
                Ok(Looked::Ran) => return Ok(Next::Worked),
                Ok(Looked::Drained) => Ok(()),
                Ok(Looked::MoreLater) => {
                    more = true;
                    Ok(())
                }
                Err(e) => Err(e),
            };
            // Its deadlines only now that what it sent is read.
            match looked.map(|()| self.conns[i].overdue(now)) {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => self.lost(i, &e, now),
            }
        }
        self.grab_next(now);
        // Quiet (no GRAB out): a round that is due starts now, with nothing in flux.
        if self.quiet() && self.figures.due(now) {
            self.figures.start_round(now);
            // (A round whose every question failed at once ends here.)
            self.figures.look(&self.slot, now);
        }
        Ok(Next::Idle(Wake {
            timeout: if more {
                Some(Duration::from_millis(1))
            } else {
                self.next_timer(now)
            },
        }))
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn wake_fds<'a>(&'a self, fds: &mut Vec<PollFd<'a>>) {
        for conn in &self.conns {
            if let Some(stream) = &conn.stream {
                let flags = match conn.state {
                    State::Connecting { .. } => PollFlags::POLLOUT,
                    _ => PollFlags::POLLIN,
                };
                fds.push(PollFd::new(stream.as_fd(), flags));
            }
        }
        self.figures.wake_fds(fds);
    }

    fn channel(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    fn hold(&mut self, paused: bool) -> io::Result<()> {
        self.paused = paused;
        Ok(())
    }

    fn retire(&mut self) {
        // Nothing is held unstarted: closing the connections is all (gearmand forgets us).
        for conn in &mut self.conns {
            conn.stream = None;
        }
        self.figures.close();
    }
}

impl GearmanSource {
    /// No GRAB is out: nothing about to change at a server because of this worker.
    fn quiet(&self) -> bool {
        !self
            .conns
            .iter()
            .any(|c| matches!(c.state, State::Grabbing { .. }))
    }

    /// How long the worker may sleep: until the next connect try, connect or answer
    /// deadline, ECHO, or figures round (or its deadline).
    fn next_timer(&self, now: Instant) -> Option<Duration> {
        self.conns
            .iter()
            .map(|c| match c.state {
                State::Down { retry_at } => retry_at,
                State::Connecting { since } => since + CONNECT_TIMEOUT,
                State::Greeting { since } => since + REPLY_TIMEOUT,
                // While it holds the worker, wake when it stops doing so (others may wait).
                State::Grabbing { since } if c.holds_grab(now) => since + GRAB_PATIENCE,
                State::Grabbing { since } => match c.ping_since {
                    Some(ping) => (since + REPLY_TIMEOUT).min(ping + REPLY_TIMEOUT),
                    None => since + REPLY_TIMEOUT,
                },
                State::Ready | State::Sleeping => match c.ping_since {
                    Some(since) => since + REPLY_TIMEOUT,
                    None => c.heard + PING_EVERY,
                },
            })
            .chain(self.figures.next_timer(self.quiet()))
            .min()
            .map(|t| {
                t.saturating_duration_since(now)
                    .max(Duration::from_millis(1))
            })
    }
}

/// Says whether each server answers an ECHO within `timeout` (for `jobhost check`, run from
/// the CLI, never the master): one line per server. The servers are asked at once, each in
/// a thread of its own, so the check takes about `timeout` however many are silent.
pub fn check_servers(cfg: &GearmanConfig, timeout: Duration) -> Vec<Result<String, String>> {
    let ask = |server: &GearmanServer| {
        echo(server, timeout)
            .map(|rtt| {
                format!(
                    "gearman {server} answers ({:.1} ms)",
                    rtt.as_secs_f64() * 1e3
                )
            })
            .map_err(|e| format!("gearman {server}: {e}"))
    };
    std::thread::scope(|scope| {
        let asking: Vec<_> = cfg
            .servers
            .iter()
            .map(|server| (server, scope.spawn(move || ask(server))))
            .collect();
        asking
            .into_iter()
            .map(|(server, asked)| {
                asked
                    .join()
                    .unwrap_or_else(|_| Err(format!("gearman {server}: the check failed")))
            })
            .collect()
    })
}

/// One blocking ECHO round trip, all of it within `timeout` (a server that trickles its
/// answer a byte at a time does not stretch it: each read waits only for what is left).
fn echo(server: &GearmanServer, timeout: Duration) -> Result<Duration, ConnError> {
    use std::io::Read;
    let started = Instant::now();
    let deadline = started + timeout;
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        // (A zero timeout would mean none at all to the socket.)
        (!left.is_zero())
            .then_some(left)
            .ok_or(ConnError::NoAnswer { what: "ECHO_REQ" })
    };
    let addr = resolve(server)?;
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    let mut out = Vec::new();
    ToServer::EchoReq(PING).encode(&mut out);
    stream.write_all(&out)?;
    let mut decoder = Decoder::new(1 << 16);
    loop {
        if let Some(packet) = decoder.next()? {
            return match packet {
                FromServer::EchoRes(data) if data == PING => Ok(started.elapsed()),
                _ => Err(ConnError::Unexpected("answer to ECHO_REQ")),
            };
        }
        let mut buf = [0u8; 4096];
        stream.set_read_timeout(Some(left()?))?;
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err(ConnError::Closed),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ConnError::NoAnswer { what: "ECHO_REQ" })
            }
            Err(e) => return Err(e.into()),
        };
        if decoder.feed(&buf[..n]) < n {
            return Err(ConnError::Unexpected("oversized answer to ECHO_REQ"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_fractions_fit_work_status() {
        assert_eq!(scale(3, 4), (3, 4));
        assert_eq!(scale(u64::from(u32::MAX), 1), (u32::MAX, 1));
        // Both shifted by the same 10 bits, so the fraction stays one half.
        assert_eq!(scale(1 << 40, 1 << 41), (1 << 30, 1 << 31));
        let (n, d) = scale(3 << 40, 1 << 42);
        assert_eq!(u64::from(n) * 4, u64::from(d) * 3);
        let (n, d) = scale(u64::MAX, u64::MAX);
        assert_eq!(n, d);
    }

    fn config(servers: Vec<GearmanServer>) -> GearmanConfig {
        GearmanConfig {
            servers,
            function: "q".into(),
            client_id: None,
            timeout: None,
            failure: GearmanFailure::Fail,
        }
    }

    /// A server on a loopback port that accepts, and then does `then` with each connection
    /// (in a thread of its own, for as long as it wants).
    fn fake(then: fn(TcpStream)) -> GearmanServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a fake server");
        let port = listener.local_addr().expect("its address").port();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || then(conn));
            }
        });
        GearmanServer {
            host: "127.0.0.1".into(),
            port,
        }
    }

    /// Reads one `status` request from `conn` (false if there is none).
    fn read_request(conn: &mut TcpStream) -> bool {
        use std::io::Read;
        let mut request = [0u8; STATUS_REQUEST.len()];
        conn.read_exact(&mut request).is_ok() && request == STATUS_REQUEST
    }

    /// Figures for `servers`, each of which answers: a round asks them all.
    fn figures_of(servers: &[GearmanServer]) -> Figures {
        let now = Instant::now();
        let mut figures = Figures::new(servers, "q", now);
        for (i, server) in servers.iter().enumerate() {
            figures.set_up(i, Some(resolve(server).expect("a loopback address")));
        }
        figures
    }

    fn finish_round(figures: &mut Figures, slot: &Slot) {
        let until = Instant::now() + Duration::from_secs(20);
        while figures.round.is_some() {
            assert!(Instant::now() < until, "the round did not end");
            figures.settle(slot, Duration::from_millis(100));
        }
    }

    #[test]
    fn figures_are_the_sum_of_the_servers_that_answer() {
        let good = fake(|mut conn| {
            while read_request(&mut conn) {
                let _ = conn.write_all(b"other\t9\t9\t9\nq\t5\t2\t1\n.\n");
            }
        });
        // Its answer in pieces.
        let slow = fake(|mut conn| {
            while read_request(&mut conn) {
                for piece in [&b"q\t3"[..], b"\t0\t1\n", b".", b"\n"] {
                    std::thread::sleep(Duration::from_millis(5));
                    let _ = conn.write_all(piece);
                }
            }
        });
        let garbage = fake(|mut conn| {
            if read_request(&mut conn) {
                let _ = conn.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n");
            }
            std::thread::sleep(Duration::from_secs(30));
        });
        let silent = fake(|conn| {
            std::thread::sleep(Duration::from_secs(30));
            drop(conn);
        });
        // Floods one endless line: the answer's size limit ends it, not the deadline.
        let flood = fake(|mut conn| {
            let chunk = vec![b'z'; 64 << 10];
            while conn.write_all(&chunk).is_ok() {}
        });
        let slot = Slot::new().expect("a slot");
        let mut figures = figures_of(&[good, slow, garbage, silent, flood]);
        let started = Instant::now();
        figures.start_round(started);
        finish_round(&mut figures, &slot);
        let took = started.elapsed();
        // The silent one was waited for, as long as the patience and not much longer.
        assert!(
            took >= FIGURES_PATIENCE && took < FIGURES_PATIENCE * 3,
            "the round took {took:?}"
        );
        let got = slot.read().figures.expect("figures published");
        assert_eq!((got.length, got.pending, got.lag), (8, 2, Some(6)));
        for (i, admin) in figures.admins.iter().enumerate() {
            let failed = i >= 2;
            assert_eq!(admin.failing, failed, "server {i}");
            assert_eq!(admin.retry_at > started, failed, "server {i} backs off");
            assert_eq!(
                admin.stream.is_some(),
                !failed,
                "server {i}: kept if it answered"
            );
            assert_eq!(admin.part, Part::NotAsked);
        }
        // Nothing changed since: no round is due, no timer (an idle worker sleeps).
        assert_eq!(figures.due_at(), None);
        assert_eq!(figures.next_timer(true), None);

        // The next round (something changed) asks the good ones again, on the same
        // connections, and not the ones backing off.
        figures.stale = true;
        figures.next_at = Instant::now();
        assert!(figures.due(Instant::now()));
        for admin in &mut figures.admins[2..] {
            admin.retry_at = Instant::now() + Duration::from_secs(60);
        }
        figures.start_round(Instant::now());
        let asked: Vec<bool> = figures.admins.iter().map(|a| a.part == Part::Out).collect();
        assert_eq!(asked, [true, true, false, false, false]);
        finish_round(&mut figures, &slot);
        let again = slot.read().figures.expect("figures published");
        assert_eq!((again.length, again.pending, again.lag), (8, 2, Some(6)));
        assert!(again.at_ms >= got.at_ms);
    }

    #[test]
    fn an_admin_connection_the_server_closed_is_reconnected_quietly() {
        static ACCEPTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        // Answers one question per connection, then closes it.
        let once = fake(|mut conn| {
            ACCEPTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if read_request(&mut conn) {
                let _ = conn.write_all(b"q\t1\t1\t1\n.\n");
            }
        });
        let slot = Slot::new().expect("a slot");
        let mut figures = figures_of(&[once]);
        figures.start_round(Instant::now());
        finish_round(&mut figures, &slot);
        let got = slot.read().figures.expect("figures published");
        assert_eq!((got.length, got.pending, got.lag), (1, 1, Some(0)));
        // Its close wakes the worker, which closes its end (no failure, no back-off).
        let until = Instant::now() + Duration::from_secs(20);
        while figures.admins[0].stream.is_some() {
            assert!(Instant::now() < until, "the close was not noticed");
            let mut fds = Vec::new();
            figures.wake_fds(&mut fds);
            assert_eq!(fds.len(), 1, "an idle admin connection is watched");
            let _ = poll(&mut fds, PollTimeout::from(100u8));
            drop(fds);
            figures.look(&slot, Instant::now());
        }
        assert!(!figures.admins[0].failing);
        assert!(figures.admins[0].retry_at <= Instant::now());
        figures.stale = true;
        figures.next_at = Instant::now();
        figures.start_round(Instant::now());
        finish_round(&mut figures, &slot);
        assert!(!figures.admins[0].failing);
        assert_eq!(ACCEPTED.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_server_that_is_down_is_not_asked() {
        let good = fake(|mut conn| {
            while read_request(&mut conn) {
                let _ = conn.write_all(b"q\t2\t0\t0\n.\n");
            }
        });
        let slot = Slot::new().expect("a slot");
        let mut figures = figures_of(&[good.clone(), good]);
        figures.set_up(1, None);
        figures.start_round(Instant::now());
        assert_eq!(figures.admins[1].part, Part::NotAsked);
        finish_round(&mut figures, &slot);
        assert_eq!(slot.read().figures.map(|f| f.length), Some(2));
        // None up: nothing to ask, nothing due.
        figures.set_up(0, None);
        figures.stale = true;
        assert_eq!(figures.due_at(), None);
    }

    #[test]
    fn check_gives_up_on_a_server_that_trickles_its_answer_within_the_timeout() {
        // An ECHO_RES announcing 1000 bytes, sent a byte every 100 ms: 100 s in all. Before
        // the fix each read had the whole timeout again, and the check waited all of it.
        let trickler = fake(|mut conn| {
            let mut answer = Vec::new();
            ToServer::EchoReq(&[b'x'; 1000]).encode(&mut answer);
            answer[..4].copy_from_slice(b"\0RES");
            answer[4..8].copy_from_slice(&17u32.to_be_bytes());
            for byte in answer {
                std::thread::sleep(Duration::from_millis(100));
                if conn.write_all(&[byte]).is_err() {
                    return;
                }
            }
        });
        let started = Instant::now();
        let answers = check_servers(&config(vec![trickler]), Duration::from_secs(1));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "the check took {took:?}");
        assert_eq!(answers.len(), 1);
        let said = answers[0].as_ref().expect_err("no answer in time");
        assert!(said.contains("no answer to ECHO_REQ"), "{said}");
    }

    #[test]
    fn check_asks_every_server_at_once() {
        // Silent servers: they accept and never answer. One after the other, 8 of them took
        // 8 timeouts.
        let silent: Vec<GearmanServer> = (0..8)
            .map(|_| {
                fake(|conn| {
                    std::thread::sleep(Duration::from_secs(30));
                    drop(conn);
                })
            })
            .collect();
        let started = Instant::now();
        let answers = check_servers(&config(silent), Duration::from_secs(1));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "the check took {took:?}");
        assert_eq!(answers.len(), 8);
        assert!(answers.iter().all(|a| a.is_err()), "{answers:?}");
    }
}
