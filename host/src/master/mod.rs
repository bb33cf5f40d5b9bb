//! The master: loads and `init`s every plugin, binds its sockets, forks the workers, then runs
//! one epoll loop — no threads — that reads top to bottom:
//!
//! ```text
//! loop {
//!     wait      epoll: signal pipe, job socket, clients, workers' socketpairs; the timeout is the
//!               next deadline (job timeout, kill grace, back-off, shutdown), or none when idle
//!     reap      waitpid every dead worker; requeue or fail its jobs; decide on a replacement
//!     signals   TERM/INT graceful · QUIT now · TTIN/TTOU ± one worker per pool · USR1 reopen log
//!     io        accept clients, read submits, read workers' outcomes, route results back
//!     timeouts  a job past job_timeout: SIGTERM its worker, SIGKILL after a grace
//!     workers   fork up to each pool's wanted count, honouring crash back-off
//!     dispatch  queued jobs to the least-loaded workers of their pool
//!     flush     buffered frames to workers and clients
//! }
//! ```
//!
//! The master never runs plugin job code (`handle`, `run_once`) and never forks from any thread
//! but its only one. A job it accepted is answered exactly once: with its result, or failed
//! with the reason once its attempts are used up or the master shuts down.

mod admin;
mod pool;
mod reload;
mod token;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::config::{Config, PoolConfig, PoolMode};
use crate::plugins::{PluginError, Registry};
use crate::protocol::{self, Frame, FrameReader, Status};
use crate::scoreboard::Slot;
use crate::server::{self, Connection, ReadOutcome};
use crate::signals::{self, SignalPipe};
use crate::worker::{self, Limit, WorkerExit};
pub use pool::{ExitKind, PoolState, PoolStats};
use pool::{Pool, SpawnPace};
use token::Token;

/// After SIGTERM for a job timeout, how long a worker has before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// How often the master reads redis workers' scoreboards to time their jobs (at most; see
/// `watch_scoreboards`). `config::CLAIM_IDLE_MARGIN` allows for it and for KILL_GRACE.
const WATCH_EVERY: Duration = Duration::from_secs(1);
const WATCH_MIN: Duration = Duration::from_millis(100);
/// How many outcome bytes one wake-up reads from a worker, so one worker cannot starve others.
const OUTCOME_READ_BUDGET: usize = 4 << 20;
/// Job frames one writev to a worker carries at most.
const WRITE_BATCH: usize = 32;
/// How long a shutting-down master keeps trying to deliver the last results.
const FINAL_FLUSH: Duration = Duration::from_secs(2);
/// After accept() fails for lack of file descriptors, stop accepting for this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(200);
/// After a worker could not be started for want of the master's own resources (socketpair or
/// fork failing: a full fd table, the process limit), start none for this long. Not a crash
/// of the pool: its plugin did nothing wrong.
const SPAWN_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Bind(#[from] server::BindError),
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Os {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn os(context: impl Into<String>) -> impl FnOnce(nix::Error) -> MasterError {
    let context = context.into();
    move |e| MasterError::Os {
        context,
        source: io::Error::from(e),
    }
}

/// How a worker left, as the master logs and counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Stopped,
    Recycled(Limit),
    PluginStopped,
    BootFailed,
    /// Died on its own: the job-facing reason ("killed by SIGSEGV"), and for the log only
    /// whether a core was dumped (it depends on the machine's settings, not on what went
    /// wrong) and what else is known.
    Crashed {
        how: String,
        core: bool,
        note: &'static str,
    },
    KilledOnTimeout(Duration),
}

impl Ending {
    /// How `status` counts it.
    fn kind(&self) -> ExitKind {
        match self {
            Ending::Crashed { .. } | Ending::BootFailed => ExitKind::Crash,
            Ending::KilledOnTimeout(_) => ExitKind::Timeout,
            Ending::Recycled(_) => ExitKind::Recycle,
            Ending::Stopped | Ending::PluginStopped => ExitKind::Stop,
        }
    }

    /// Counts against the pool's back-off and the job's attempts: a crash or a timeout.
    fn is_crash(&self) -> bool {
        matches!(self.kind(), ExitKind::Crash | ExitKind::Timeout)
    }

    fn describe(&self) -> String {
        match self {
            Ending::Stopped => "stopped".into(),
            Ending::Recycled(limit) => format!("recycled ({} reached)", limit.as_str()),
            Ending::PluginStopped => "stopped by its plugin (loop mode said Stop)".into(),
            Ending::BootFailed => "failed to start (worker_start failed)".into(),
            Ending::Crashed { how, core, note } => {
                format!(
                    "crashed: {how}{}{note}",
                    if *core { " (core dumped)" } else { "" }
                )
            }
            Ending::KilledOnTimeout(t) => format!("killed: its job ran past job_timeout {t:?}"),
        }
    }
}

/// Why the master is signalling a worker, which decides how its exit is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    /// Scale down, restart, shutdown: finish the current job, then exit.
    Stop,
    Timeout,
}

struct Kill {
    reason: KillReason,
    sigkill_at: Instant,
    sigkill_sent: bool,
    /// The master asked it to go (stop, timeout, shutdown) — not a worker that said LEAVING
    /// on its own and is given until `sigkill_at` to be gone.
    asked: bool,
}

/// What a worker said in its LEAVING frame, right before exiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Leaving {
    code: u8,
    jobs_done: u64,
}

struct Worker {
    id: u64,
    pid: Pid,
    pool: usize,
    generation: u64,
    /// The plugin build it was forked with (its private copy is kept while it lives).
    hash: crate::plugins::ContentHash,
    channel: UnixStream,
    reader: FrameReader,
    /// Jobs whose frames are still (partly) to be written, in order: each frame is written
    /// from the job's own payload (writev), never copied into a buffer.
    out: VecDeque<u64>,
    /// Bytes of the front frame already written.
    out_pos: usize,
    wants_write: bool,
    /// Jobs sent, in order; the head is the one running.
    in_flight: VecDeque<u64>,
    head_started: Option<Instant>,
    /// Holding back for lack of memory (it said so): sent no jobs, its head not timed.
    holding: bool,
    started: Instant,
    jobs_done: u64,
    kill: Option<Kill>,
    /// It said why it is about to exit (its last frame).
    leaving: Option<Leaving>,
    /// It broke the protocol (it was SIGKILLed for it): what it did.
    violation: Option<String>,
    /// The job that ran past job_timeout: answered as timed out (or retried) once the worker is
    /// gone, whatever outcome it may still send for it.
    overdue: Option<u64>,
    /// A redis pool: the ended workers it was given to take over (handed on if it dies too).
    inherited: Vec<worker::redis::Predecessor>,
    /// What the worker publishes about itself (a redis worker: its counts, running entry,
    /// connection and the stream's figures).
    slot: Slot,
}

impl Worker {
    /// Takes no more jobs: told to stop, leaving of its own accord, or killed.
    fn draining(&self) -> bool {
        self.kill.is_some() || self.leaving.is_some() || self.violation.is_some()
    }

    /// A redis worker: `head_started` from what its scoreboard slot says runs since when.
    fn time_from_slot(&mut self, now: Instant, now_ms: u64) {
        let report = self.slot.read();
        self.head_started = report.running.as_ref().map(|_| {
            // The worker's word, bounded: a start in the future is now.
            let age = Duration::from_millis(now_ms.saturating_sub(report.running_since_ms));
            now.checked_sub(age).unwrap_or(now)
        });
    }

    /// Whether the master sent it this job whole (so it may answer it).
    fn holds(&self, key: u64) -> bool {
        self.in_flight.contains(&key) && !self.out.contains(&key)
    }

    /// Its running job is past `timeout` and nobody has acted on that yet.
    fn past_job_timeout(&self, now: Instant, timeout: Option<Duration>) -> bool {
        let judged = self
            .kill
            .as_ref()
            .is_some_and(|k| k.reason == KillReason::Timeout);
        match (self.head_started, timeout) {
            (Some(started), Some(timeout)) if !judged && self.violation.is_none() => {
                now.saturating_duration_since(started) >= timeout
            }
            _ => false,
        }
    }
}

/// An accepted job.
struct Job {
    pool: usize,
    /// The submitting connection and the client's id for the job; `None` once it has gone.
    client: Option<(u64, u64)>,
    payload: Vec<u8>,
    failures: u32,
    /// The crash back-off entry its last crash added to its pool (a fresh worker died running
    /// it): taken back if it crashes another worker, which makes it the job's fault.
    blamed_crash: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Graceful stop: no new work; workers finish their job; answer everything; exit.
    Stopping {
        deadline: Instant,
    },
}

pub struct Master {
    config: Config,
    /// Every plugin build loaded (they stay mapped); `status` counts them.
    registry: Registry,
    pools: Vec<Pool>,
    pool_index: HashMap<String, usize>,
    workers: HashMap<u64, Worker>,
    worker_by_pid: HashMap<Pid, u64>,
    next_worker_id: u64,
    jobs: HashMap<u64, Job>,
    next_job_key: u64,
    clients: HashMap<u64, Connection>,
    next_client_id: u64,
    listener: Option<std::os::unix::net::UnixListener>,
    admin: Option<admin::AdminListeners>,
    admins: HashMap<u64, admin::AdminConn>,
    started: Instant,
    last_reload: Option<crate::admin::ReloadReport>,
    /// A reload waiting for its probes.
    reloading: Option<reload::Reloading>,
    /// Another reload was asked for while one ran (with the admin sessions waiting for it).
    next_reload: Option<Vec<u64>>,
    /// Admin sessions whose `reload` was answered: to go on with their next lines.
    admin_resume: Vec<u64>,
    /// Who workers become (host.user/host.group), if anyone.
    identity: Option<crate::daemon::Identity>,
    /// READY=1 has been sent to systemd.
    ready_notified: bool,
    /// Held (locked) while the master runs; removed on a clean exit.
    pidfile: Option<crate::daemon::Pidfile>,
    accept_paused_until: Option<Instant>,
    /// No worker is forked before this (the master itself was short of fds or processes).
    spawn_paused_until: Option<Instant>,
    /// When to read the redis workers' scoreboards again, to time their jobs (see
    /// `watch_scoreboards`); `None` while no such worker lives.
    next_watch: Option<Instant>,
    epoll: Option<Epoll>,
    signals: Option<SignalPipe>,
    phase: Phase,
    generation: u64,
    pid: Pid,
    scratch: Vec<u8>,
    /// Connections and workers with output to write at the end of this pass.
    dirty_clients: Vec<u64>,
    dirty_workers: Vec<u64>,
}

impl Master {
    /// Everything before the loop: plugins loaded and initialised, sockets bound, signals
    /// routed. An error here is a start-up error: nothing was forked.
    pub fn start(config: Config) -> Result<Master, MasterError> {
        // Created by the master, or refused unless only the master's user can write it.
        let mut registry =
            Registry::open(&config.host.runtime_dir, config.host.insecure_plugins_dir)?;
        raise_fd_limit();
        let identity = crate::daemon::Identity::resolve(
            config.host.user.as_deref(),
            config.host.group.as_deref(),
        )
        .map_err(MasterError::Refused)?;
        let mut pools = Vec::new();
        for pool in &config.pools {
            let file = pool.plugin_path(&config.host);
            if !config.host.insecure_plugins_dir {
                crate::plugins::check_trusted(&config.host.plugins_dir, &file)?;
            }
            let loaded = registry.load(&file, &[pool.settings_toml()], config.host.init_timeout)?;
            loaded.info.check_mode(&file, pool.mode == PoolMode::Loop)?;
            // init in the master, before any fork: what it builds is shared by the workers.
            let instance = loaded.library.instantiate(&file, &pool.settings_toml())?;
            log::info!(
                "pool {}: plugin {} {} ({}), {} worker(s), mode {}",
                pool.name,
                loaded.info.name,
                loaded.info.version,
                loaded.private.display(),
                pool.workers,
                if pool.mode == PoolMode::Loop {
                    "loop"
                } else {
                    "jobs"
                }
            );
            pools.push(Pool::new(
                pool.clone(),
                instance,
                &loaded.info,
                loaded.library.hash,
            ));
        }
        let pool_index = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.config.name.clone(), i))
            .collect();
        let listener = server::bind(
            &config.server.socket,
            config.server.socket_mode,
            config.server.socket_group.as_ref(),
        )?;
        let admin = admin::AdminListeners::bind(&config.admin)?;
        signals::ignore_sigpipe().map_err(os("cannot ignore SIGPIPE"))?;
        let signals = SignalPipe::install(&[
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGQUIT,
            Signal::SIGHUP,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
            Signal::SIGUSR1,
            Signal::SIGCHLD,
        ])
        .map_err(os("cannot install signal handlers"))?;
        let epoll =
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(os("cannot create epoll"))?;
        epoll
            .add(
                signals.fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, Token::Signals.encode()),
            )
            .map_err(os("epoll"))?;
        epoll
            .add(
                listener.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, Token::Listener.encode()),
            )
            .map_err(os("epoll"))?;
        epoll
            .add(
                admin.unix.as_fd(),
                EpollEvent::new(
                    EpollFlags::EPOLLIN,
                    Token::AdminListener { tcp: false }.encode(),
                ),
            )
            .map_err(os("epoll"))?;
        if let Some(tcp) = &admin.tcp {
            epoll
                .add(
                    tcp.as_fd(),
                    EpollEvent::new(
                        EpollFlags::EPOLLIN,
                        Token::AdminListener { tcp: true }.encode(),
                    ),
                )
                .map_err(os("epoll"))?;
        }
        log::info!("listening for jobs on {}", config.server.socket.display());
        Ok(Master {
            config,
            registry,
            pools,
            pool_index,
            workers: HashMap::new(),
            worker_by_pid: HashMap::new(),
            next_worker_id: 1,
            jobs: HashMap::new(),
            next_job_key: 1,
            clients: HashMap::new(),
            next_client_id: 1,
            listener: Some(listener),
            admin: Some(admin),
            admins: HashMap::new(),
            started: Instant::now(),
            last_reload: None,
            reloading: None,
            next_reload: None,
            admin_resume: Vec::new(),
            identity,
            ready_notified: false,
            pidfile: None,
            accept_paused_until: None,
            spawn_paused_until: None,
            next_watch: None,
            epoll: Some(epoll),
            signals: Some(signals),
            phase: Phase::Running,
            generation: 1,
            pid: Pid::this(),
            scratch: vec![0; 256 * 1024],
            dirty_clients: Vec::new(),
            dirty_workers: Vec::new(),
        })
    }

    /// The loop. Returns when the master has stopped; every accepted job has been answered.
    pub fn run(&mut self) -> Result<(), MasterError> {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            self.maintain_workers();
            self.notify_ready_once();
            self.dispatch();
            self.flush();
            if self.finished() {
                break;
            }
            let n = self.wait(&mut events)?;
            self.reap();
            let woken = events[..n]
                .iter()
                .any(|e| Token::decode(e.data()) == Some(Token::Signals));
            self.handle_signals(woken);
            for event in &events[..n] {
                self.handle_io(event.data(), event.events());
            }
            self.enforce_timeouts();
            self.advance_reload();
            self.resume_admins();
        }
        self.final_flush();
        self.remove_socket_file();
        let _ = std::fs::remove_file(&self.config.admin.socket);
        log::info!("master exiting");
        Ok(())
    }

    /// Tells systemd (Type=notify) the master is up, once every pool has its workers.
    fn notify_ready_once(&mut self) {
        if self.ready_notified || !matches!(self.phase, Phase::Running) {
            return;
        }
        let all_up = (0..self.pools.len())
            .all(|i| self.pools[i].stopped || self.live_workers(i) >= self.pools[i].wanted);
        if all_up {
            self.ready_notified = true;
            crate::daemon::notify(&format!(
                "READY=1\nMAINPID={}\nSTATUS=serving {} pool(s)",
                std::process::id(),
                self.pools.len()
            ));
        }
    }

    fn epoll(&self) -> &Epoll {
        // Present from start() until a forked child drops it on its way into the worker.
        self.epoll.as_ref().expect("epoll exists in the master")
    }

    /// epoll_wait until an event or the next deadline. No deadline: sleep until something
    /// happens — an idle master uses no CPU.
    fn wait(&mut self, events: &mut [EpollEvent]) -> Result<usize, MasterError> {
        let timeout = match self.next_deadline() {
            // Admin sessions to resume: look at new events, but do not sleep.
            _ if !self.admin_resume.is_empty() => EpollTimeout::ZERO,
            None => EpollTimeout::NONE,
            Some(at) => {
                let ms = at.saturating_duration_since(Instant::now()).as_millis() + 1;
                EpollTimeout::try_from(ms.min(60_000) as u64).unwrap_or(EpollTimeout::NONE)
            }
        };
        match self.epoll().wait(events, timeout) {
            Ok(n) => Ok(n),
            Err(nix::Error::EINTR) => Ok(0),
            Err(e) => Err(os("epoll_wait")(e)),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for w in self.workers.values() {
            if w.kill.as_ref().is_some_and(|k| k.sigkill_sent) || w.violation.is_some() {
                continue;
            }
            if let Some(kill) = &w.kill {
                consider(kill.sigkill_at);
            }
            // Also while draining after a stop (see enforce_timeouts), not after a timeout.
            if w.kill.as_ref().is_none_or(|k| k.reason == KillReason::Stop) {
                if let (Some(started), Some(timeout)) =
                    (w.head_started, self.pools[w.pool].config.job_timeout)
                {
                    consider(started + timeout);
                }
            }
        }
        for (idx, pool) in self.pools.iter().enumerate() {
            if let Some(t) = pool.backoff.next_spawn {
                // No fork before the master's own pause ends, back-off or not.
                let t = self.spawn_paused_until.map_or(t, |p| t.max(p));
                if !pool.stopped && self.live_workers(idx) < pool.wanted {
                    consider(t);
                }
            }
        }
        if let Phase::Stopping { deadline } = self.phase {
            // Once passed, enforce_timeouts has SIGKILLed every worker: what is left is
            // reaping, which SIGCHLD wakes us for (no 1 ms spin meanwhile).
            if deadline > Instant::now() {
                consider(deadline);
            }
        }
        if let Some(t) = self.accept_paused_until {
            consider(t);
        }
        if let Some(t) = self.next_watch {
            consider(t);
        }
        if let (Some(t), Phase::Running) = (self.spawn_paused_until, self.phase) {
            consider(t);
        }
        if let Some(t) = self.admin_deadline() {
            consider(t);
        }
        if let Some(t) = self.probe_deadline() {
            consider(t);
        }
        next
    }

    fn finished(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. }) && self.workers.is_empty()
    }

    // ---- reap ------------------------------------------------------------------------------

    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        self.worker_exited(pid, status);
                    }
                }
                Err(nix::Error::EINTR) => {}
                Err(nix::Error::ECHILD) => return,
                Err(e) => {
                    log::error!("waitpid: {e}");
                    return;
                }
            }
        }
    }

    fn worker_exited(&mut self, pid: Pid, status: WaitStatus) {
        let Some(id) = self.worker_by_pid.remove(&pid) else {
            if !self.probe_reaped(pid, status) {
                log::debug!("reaped pid {pid}, not a worker ({status:?})");
            }
            return;
        };
        // Take in the outcomes it wrote before it died, so finished jobs count as finished.
        self.read_worker(id);
        let Some(mut worker) = self.workers.remove(&id) else {
            return;
        };
        if let Some(epoll) = &self.epoll {
            let _ = epoll.delete(worker.channel.as_fd());
        }
        // A redis worker's entries never pass through the master: only it can count them.
        let board = self.pools[worker.pool]
            .config
            .redis
            .is_some()
            .then(|| worker.slot.read());
        if let Some(board) = &board {
            let said = worker.leaving.map_or(0, |l| l.jobs_done);
            worker.jobs_done = board.jobs_done.max(said);
            let stats = &mut self.pools[worker.pool].stats;
            // The worker's word: bounded, never an overflow.
            stats.done = stats
                .done
                .saturating_add(board.jobs_done.saturating_sub(board.jobs_failed));
            stats.failed = stats
                .failed
                .saturating_add(board.jobs_failed.min(board.jobs_done));
        }
        let ending = classify(
            status,
            &worker,
            &self.pools[worker.pool].config,
            worker.started.elapsed(),
        );
        let now = Instant::now();
        let pool_idx = worker.pool;
        let name = self.pools[pool_idx].config.name.clone();
        let message = format!(
            "worker {pid} (pool {name}, generation {}, {} jobs in {:.1?}) {}",
            worker.generation,
            worker.jobs_done,
            worker.started.elapsed(),
            ending.describe()
        );
        if ending.is_crash() {
            log::warn!("{message}");
        } else {
            log::info!("{message}");
        }

        // Its jobs. The one it ran failed with it (a crash) or ran past its timeout; the rest
        // never started and go back to the front of the queue as they were. A worker that
        // left cleanly said so between two jobs: none of its jobs had started.
        let ran = match &ending {
            // A job past its timeout is lost whatever else the worker did afterwards.
            _ if worker.overdue.is_some_and(|k| self.jobs.contains_key(&k)) => worker.overdue,
            Ending::KilledOnTimeout(_) => None,
            Ending::BootFailed => None,
            // The head ran if the worker had it whole.
            e if e.is_crash() => worker
                .in_flight
                .front()
                .copied()
                .filter(|k| worker.holds(*k)),
            _ => None,
        };
        let mut jobs = std::mem::take(&mut worker.in_flight);
        // A crash while running a job that already took another worker down is that job's
        // doing, not a sign the pool cannot start: it uses up the job's attempts only.
        // Only a pool whose workers produced a result lately can be said to start workers
        // fine: otherwise a crash in worker_start, with a job already sent, would pass for the
        // job's fault.
        let pool_cfg = &self.pools[pool_idx];
        let pool_works = pool_cfg
            .last_result
            .is_some_and(|t| now.saturating_duration_since(t) < pool_cfg.config.crash_window);
        let job_to_blame = ran
            .and_then(|key| self.jobs.get(&key))
            .map(|j| (pool_works && j.failures > 0, j.blamed_crash));
        if let Some(key) = ran {
            jobs.retain(|k| *k != key);
        }
        while let Some(key) = jobs.pop_back() {
            self.requeue_front(key);
        }
        // The retry goes first: it waited longest, and a fresh worker then meets a job that
        // crashed before (which tells poison from a crash loop) rather than an untried one.
        if let Some(key) = ran {
            self.job_lost(key, &ending);
        }
        let (job_to_blame, earlier_blame) = job_to_blame.unwrap_or((false, None));
        if let (true, Some(at)) = (job_to_blame, earlier_blame) {
            // The crash it caused before, counted against the pool, was its doing too.
            self.pools[pool_idx].backoff.forgive(at, now);
        }

        // A worker that leaves before its first result, unasked, cannot get going — crashing,
        // or exiting cleanly at once (a max_rss under what it starts with, worker_start
        // failing): forking it again at once would be a loop. So is one that crashes before
        // its first result, unless the job it ran is to blame.
        let unasked_early = worker.jobs_done == 0
            && worker.kill.as_ref().is_none_or(|k| !k.asked)
            && ending != Ending::Recycled(Limit::MaxLifetime);
        let pool = &mut self.pools[pool_idx];
        if pool.config.redis.is_some() {
            // Its pending entries (and those it was still to take over) go to the next worker.
            let why = match &ending {
                Ending::Crashed { how, .. } => format!("worker {how}"),
                Ending::KilledOnTimeout(t) => format!("job timed out after {t:?}"),
                other => format!("worker {}", other.describe()),
            };
            pool.predecessors.append(&mut worker.inherited);
            pool.predecessors.push(worker::redis::Predecessor {
                consumer: worker::redis::consumer_name(&name, pid.as_raw() as u32),
                why,
                // What it was running then: only that entry used up an attempt.
                running: board.and_then(|b| b.running),
            });
        }
        match &ending {
            Ending::PluginStopped => {
                pool.stopped = true;
                log::info!("pool {name} stopped by its plugin; `restart` it to start it again");
            }
            e if e.is_crash() && job_to_blame => {
                log::info!(
                    "pool {name}: the crash is its job's (it crashed a worker before); no back-off"
                );
            }
            // A worker that had finished jobs died of a job (or of an outside kill): replace it
            // at once.
            e if e.is_crash() && worker.jobs_done > 0 => {}
            e if e.is_crash() || unasked_early => {
                let was_failing = pool.backoff.is_failing(now);
                let delay = pool.backoff.crashed(now);
                if let Some(job) = ran.and_then(|key| self.jobs.get_mut(&key)) {
                    job.blamed_crash = Some(now); // forgiven if the job crashes another
                }
                if pool.backoff.is_failing(now) && !was_failing {
                    log::error!(
                        "pool {name} is failing: {} crashes within {:?}; trying one worker every {:?}",
                        pool.config.crash_limit,
                        pool.config.crash_window,
                        pool.config.failing_retry
                    );
                } else if !delay.is_zero() {
                    log::info!("pool {name}: next worker in {delay:?} (crash back-off)");
                }
            }
            _ => {}
        }
        pool.stats.count_exit(ending.kind());
        self.delete_unused_copies();
    }

    /// The job's worker died while running it: retry it elsewhere, or fail it for good.
    fn job_lost(&mut self, key: u64, ending: &Ending) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        job.failures += 1;
        let pool = &mut self.pools[job.pool];
        let max = pool.config.max_attempts;
        let why = match ending {
            Ending::Crashed { how, .. } => format!("worker {how}"),
            Ending::KilledOnTimeout(t) => format!("job timed out after {t:?}"),
            other => other.describe(),
        };
        if job.failures >= max || matches!(self.phase, Phase::Stopping { .. }) {
            pool.stats.failed += 1;
            let message = format!("{why}, attempt {} of {max}", job.failures);
            self.answer(key, Status::Failed, message.as_bytes());
        } else {
            pool.stats.retried += 1;
            log::info!(
                "retrying job {key} on another worker ({why}, attempt {} of {max})",
                job.failures
            );
            pool.queue.push_front(key);
        }
    }

    fn requeue_front(&mut self, key: u64) {
        let Some(job) = self.jobs.get(&key) else {
            return;
        };
        if matches!(self.phase, Phase::Stopping { .. }) {
            self.answer(key, Status::Failed, b"shutting down");
        } else {
            self.pools[job.pool].queue.push_front(key);
        }
    }

    // ---- signals ---------------------------------------------------------------------------

    /// `woken`: epoll said the signal pipe is readable. Then it is drained whatever this
    /// process's own flags say: a byte may come from a process that shares the pipe without
    /// sharing our memory (the launcher a daemon forked from, while it waits), and a byte
    /// left there would keep epoll waking us forever.
    fn handle_signals(&mut self, woken: bool) {
        let Some(signals) = self.signals.as_ref() else {
            return;
        };
        let delivered = if woken {
            signals.take_all()
        } else {
            signals.take()
        };
        for (signal, times) in delivered.iter() {
            match signal {
                Signal::SIGTERM | Signal::SIGINT => self.handle_stop(signal),
                Signal::SIGQUIT => self.handle_quit(),
                Signal::SIGTTIN => self.handle_ttin(times),
                Signal::SIGTTOU => (0..times).for_each(|_| self.handle_ttou()),
                Signal::SIGUSR1 => self.handle_usr1(),
                Signal::SIGHUP => self.request_reload(None),
                Signal::SIGCHLD => {} // reap() already ran
                _ => {}
            }
        }
    }

    /// TERM/INT: graceful stop. Stop taking work, answer queued jobs "shutting down", let
    /// each worker finish its current job within graceful_timeout, then exit. A second INT
    /// (Ctrl-C twice) means "now"; a second TERM changes nothing — `timeout`, `kill -- -PGID`
    /// and systemd's control-group kill all deliver more than one.
    fn handle_stop(&mut self, signal: Signal) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            if signal == Signal::SIGINT {
                log::warn!("SIGINT again: stopping now");
                return self.handle_quit();
            }
            log::info!("{signal}: already stopping");
            return;
        }
        let grace = self.config.host.graceful_timeout;
        log::info!("{signal}: graceful stop; in-flight jobs have {grace:?} to finish");
        crate::daemon::notify("STOPPING=1");
        let deadline = Instant::now() + grace;
        self.phase = Phase::Stopping { deadline };
        self.abandon_reload();
        self.close_listener();
        for idx in 0..self.pools.len() {
            while let Some(key) = self.pools[idx].queue.pop_front() {
                self.answer(key, Status::Failed, b"shutting down");
            }
        }
        let ids: Vec<u64> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop_worker(id, deadline);
        }
    }

    /// QUIT: kill every worker now, answer every job "shutting down", exit.
    fn handle_quit(&mut self) {
        log::info!("SIGQUIT: stopping now");
        crate::daemon::notify("STOPPING=1");
        let now = Instant::now();
        self.phase = Phase::Stopping { deadline: now };
        self.abandon_reload();
        self.close_listener();
        for worker in self.workers.values_mut() {
            let _ = kill(worker.pid, Signal::SIGKILL);
            // Its jobs are answered below: nothing more goes to it.
            worker.out.clear();
            worker.out_pos = 0;
            worker.kill = Some(Kill {
                reason: KillReason::Stop,
                sigkill_at: now,
                sigkill_sent: true,
                asked: true,
            });
        }
        let keys: Vec<u64> = self.jobs.keys().copied().collect();
        for key in keys {
            self.answer(key, Status::Failed, b"shutting down");
        }
        for pool in &mut self.pools {
            pool.queue.clear();
        }
    }

    /// TTIN (`times` of them): one worker more in every pool per signal, up to the most
    /// `scale` and the config allow. One log line per pool, however many came.
    fn handle_ttin(&mut self, times: u32) {
        for pool in &mut self.pools {
            let before = pool.wanted;
            pool.wanted = before
                .saturating_add(times as usize)
                .min(crate::admin::MAX_WORKERS.max(before));
            let capped = if pool.wanted < before.saturating_add(times as usize) {
                format!(
                    " (capped: a pool has at most {})",
                    crate::admin::MAX_WORKERS
                )
            } else {
                String::new()
            };
            log::info!(
                "SIGTTIN: pool {} now wants {} worker(s){capped}",
                pool.config.name,
                pool.wanted
            );
        }
    }

    /// TTOU: one worker fewer in every pool (never below zero); an idle one leaves first.
    fn handle_ttou(&mut self) {
        for idx in 0..self.pools.len() {
            if self.pools[idx].wanted == 0 {
                continue;
            }
            self.pools[idx].wanted -= 1;
            log::info!(
                "SIGTTOU: pool {} now wants {} worker(s)",
                self.pools[idx].config.name,
                self.pools[idx].wanted
            );
            let victim = self
                .workers
                .values()
                .filter(|w| w.pool == idx && !w.draining())
                .min_by_key(|w| (w.in_flight.len(), std::cmp::Reverse(w.started)))
                .map(|w| w.id);
            if let Some(id) = victim {
                let deadline = Instant::now() + self.config.host.graceful_timeout;
                self.stop_worker(id, deadline);
            }
        }
    }

    /// USR1: reopen the log file, and have every worker do the same.
    fn handle_usr1(&mut self) {
        if let Err(e) = crate::logging::reopen() {
            log::error!("cannot reopen the log file: {e}");
        }
        self.give_log_file_to_workers();
        for w in self.workers.values() {
            let _ = kill(w.pid, Signal::SIGUSR1);
        }
        log::info!("SIGUSR1: log reopened");
    }

    /// Workers that dropped to `host.user` reopen the log file by name on SIGUSR1: it must be
    /// theirs to open. (They write to it anyway, through the descriptor they inherit.)
    fn give_log_file_to_workers(&self) {
        let (Some(identity), crate::config::LogTarget::File(path)) =
            (&self.identity, &self.config.host.log)
        else {
            return;
        };
        if let Err(e) = nix::unistd::chown(path, Some(identity.uid), Some(identity.gid)) {
            log::warn!(
                "cannot give the log file {} to {:?}: {e}; workers cannot reopen it on SIGUSR1",
                path.display(),
                identity.name
            );
        }
    }

    /// Asks a worker to finish its current job and exit; SIGKILL at `deadline` if it has not.
    /// Jobs it holds but has not started go back to the queue when it exits.
    fn stop_worker(&mut self, id: u64, deadline: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.kill.is_some() {
            return;
        }
        let _ = kill(worker.pid, Signal::SIGTERM);
        worker.kill = Some(Kill {
            reason: KillReason::Stop,
            sigkill_at: deadline,
            sigkill_sent: false,
            asked: true,
        });
    }

    fn close_listener(&mut self) {
        if let Some(listener) = self.listener.take() {
            if let Some(epoll) = &self.epoll {
                let _ = epoll.delete(listener.as_fd());
            }
            self.remove_socket_file();
        }
    }

    fn remove_socket_file(&self) {
        let _ = std::fs::remove_file(&self.config.server.socket);
    }

    // ---- io --------------------------------------------------------------------------------

    fn handle_io(&mut self, token: u64, flags: EpollFlags) {
        let Some(token) = Token::decode(token) else {
            return;
        };
        match token {
            Token::Signals => {} // handled in handle_signals
            Token::Listener => self.accept(),
            Token::AdminListener { tcp } => self.admin_accept(tcp),
            Token::Client(id) => self.client_event(id, flags),
            Token::Admin(id) => self.admin_event(id, flags),
            Token::Probe(id) => self.probe_event(id),
            Token::Worker(id) => {
                if flags
                    .intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR)
                {
                    self.read_worker(id);
                }
                if flags.contains(EpollFlags::EPOLLOUT) {
                    self.dirty_workers.push(id);
                }
            }
        }
    }

    fn accept(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        let max_frame = self.max_frame();
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    let id = self.next_client_id;
                    self.next_client_id += 1;
                    let conn = match Connection::new(stream, max_frame) {
                        Ok(c) => c,
                        Err(e) => {
                            log::warn!("dropping a new client: {e}");
                            continue;
                        }
                    };
                    let token = Token::Client(id).encode();
                    if let Err(e) = self.epoll().add(
                        conn.stream.as_fd(),
                        EpollEvent::new(EpollFlags::EPOLLIN, token),
                    ) {
                        log::warn!("dropping a new client: epoll: {e}");
                        continue;
                    }
                    self.clients.insert(id, conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE/ENFILE: the listener stays readable; pause it instead of spinning.
                    log::error!("accept: {e}; not accepting for {ACCEPT_PAUSE:?}");
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    if let (Some(listener), Some(epoll)) = (&self.listener, &self.epoll) {
                        let _ = epoll.delete(listener.as_fd());
                    }
                    return;
                }
            }
        }
    }

    fn resume_accept_if_due(&mut self) {
        if self
            .accept_paused_until
            .is_some_and(|t| Instant::now() >= t)
        {
            self.accept_paused_until = None;
            if let (Some(listener), Some(epoll)) = (&self.listener, &self.epoll) {
                let _ = epoll.add(
                    listener.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, Token::Listener.encode()),
                );
            }
        }
    }

    /// The largest submit frame: the payload limit plus the id and the longest pool name.
    fn max_frame(&self) -> usize {
        usize::try_from(self.config.server.max_payload)
            .unwrap_or(usize::MAX)
            .saturating_add(1 + 8 + 2 + 1024)
    }

    fn client_event(&mut self, id: u64, flags: EpollFlags) {
        if flags.contains(EpollFlags::EPOLLOUT) {
            self.dirty_clients.push(id);
        }
        if !flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            return;
        }
        let Some(conn) = self.clients.get_mut(&id) else {
            return;
        };
        if conn.paused {
            // Not reading it (it holds too much), but a hang-up still ends it: epoll reports
            // HUP/ERR even with no events asked for, and would do so on every wait.
            if flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                self.drop_client(id);
            }
            return;
        }
        let closed = matches!(conn.read(&mut self.scratch), ReadOutcome::Closed);
        if let Err(reason) = self.take_submits(id) {
            log::info!("closing client {id}: {reason}");
            return self.drop_client(id);
        }
        if closed {
            self.drop_client(id);
        }
    }

    /// Turns every whole frame a client sent into an accepted or rejected job.
    fn take_submits(&mut self, client: u64) -> Result<(), String> {
        loop {
            let Some(conn) = self.clients.get_mut(&client) else {
                return Ok(());
            };
            if conn.over_budget() {
                // Leave the rest in its buffer; flush_client pauses reading and resumes later.
                self.dirty_clients.push(client);
                return Ok(());
            }
            let frame = match conn.reader.next() {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    conn.reader.shrink();
                    return Ok(());
                }
                Err(e) => return Err(server::describe_frame_error(&e)),
            };
            let (id, pool, payload) = match protocol::decode(frame) {
                Ok(Frame::Submit { id, pool, payload }) => (id, pool, payload),
                Ok(other) => return Err(format!("unexpected frame from a client: {other}")),
                Err(e) => return Err(server::describe_frame_error(&e)),
            };
            let verdict = match self.pool_index.get(pool) {
                _ if matches!(self.phase, Phase::Stopping { .. }) => {
                    Err("shutting down".to_string())
                }
                None => Err(format!("unknown pool {pool:?}")),
                Some(&idx) if self.pools[idx].config.mode == PoolMode::Loop => Err(format!(
                    "pool {pool:?} is a loop-mode pool; it takes no jobs"
                )),
                Some(&idx) if self.pools[idx].config.redis.is_some() => Err(format!(
                    "pool {pool:?} is fed from Redis: use `jobhost submit -c CONFIG {pool}`, or XADD to its stream"
                )),
                Some(&idx) if payload.len() as u64 > self.config.server.max_payload => {
                    let _ = idx;
                    Err(format!(
                        "payload too large ({} bytes, max_payload is {})",
                        payload.len(),
                        self.config.server.max_payload
                    ))
                }
                Some(&idx) if self.pools[idx].queue.len() >= self.pools[idx].config.max_queue => {
                    Err(format!(
                        "queue full ({} jobs queued for pool {pool:?})",
                        self.pools[idx].queue.len()
                    ))
                }
                Some(&idx) => Ok(idx),
            };
            match verdict {
                Ok(idx) => {
                    let key = self.next_job_key;
                    self.next_job_key += 1;
                    conn.outstanding += payload.len();
                    let job = Job {
                        pool: idx,
                        client: Some((client, id)),
                        payload: payload.to_vec(),
                        failures: 0,
                        blamed_crash: None,
                    };
                    self.jobs.insert(key, job);
                    self.pools[idx].queue.push_back(key);
                }
                Err(reason) => {
                    protocol::put_result(conn.out(), id, Status::Rejected, reason.as_bytes());
                    self.dirty_clients.push(client);
                }
            }
        }
    }

    fn drop_client(&mut self, id: u64) {
        if let Some(conn) = self.clients.remove(&id) {
            if let Some(epoll) = &self.epoll {
                let _ = epoll.delete(conn.stream.as_fd());
            }
            // Its jobs still run (they were accepted); their results have nowhere to go.
            for job in self.jobs.values_mut() {
                if job.client.is_some_and(|(c, _)| c == id) {
                    job.client = None;
                }
            }
        }
    }

    fn read_worker(&mut self, id: u64) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        // Straight into the worker's frame buffer (a worker's channel is busy: no shared
        // scratch buffer and copy), up to what one wake-up may take.
        let mut budget = OUTCOME_READ_BUDGET;
        while budget > 0 {
            match worker.reader.read_from(&mut worker.channel) {
                Ok(0) => break,
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        loop {
            let Some(worker) = self.workers.get_mut(&id) else {
                return;
            };
            if worker.violation.is_some() {
                return; // being killed: nothing more it says counts
            }
            let (key, ok, body) = match worker.reader.next().map(|f| f.map(protocol::decode)) {
                Ok(None) => return,
                Ok(Some(Ok(_))) if worker.leaving.is_some() => {
                    return self.protocol_violation(id, "a frame after LEAVING".into());
                }
                Ok(Some(Ok(Frame::Outcome { key, ok, body }))) => (key, ok, body.to_vec()),
                Ok(Some(Ok(Frame::Hold { paused }))) if paused == worker.holding => {
                    continue; // nothing changes: a repeated HOLD must not restart a job's clock
                }
                Ok(Some(Ok(Frame::Hold { paused }))) => {
                    // Short of memory, the worker starts no job: the one at the head of its
                    // queue has not started, so its job_timeout does not run meanwhile.
                    worker.holding = paused;
                    worker.head_started = match paused || worker.in_flight.is_empty() {
                        true => None,
                        false => Some(Instant::now()),
                    };
                    continue;
                }
                Ok(Some(Ok(Frame::Leaving { code, jobs_done }))) => {
                    // Read when it exits (classify); meanwhile it gets no more jobs and is
                    // replaced. It must then be gone soon: one that says LEAVING and stays
                    // would otherwise let the pool fork without end.
                    worker.leaving = Some(Leaving { code, jobs_done });
                    if worker.kill.is_none() {
                        worker.kill = Some(Kill {
                            reason: KillReason::Stop,
                            sigkill_at: Instant::now() + KILL_GRACE,
                            sigkill_sent: false,
                            asked: false,
                        });
                    }
                    continue;
                }
                Ok(Some(Ok(other))) => {
                    let what = format!("an unexpected {other}");
                    return self.protocol_violation(id, what);
                }
                Ok(Some(Err(e))) | Err(e) => {
                    return self.protocol_violation(id, format!("a malformed frame: {e}"));
                }
            };
            if worker.overdue == Some(key) {
                // It finished after its timeout was declared: the job counts as timed out
                // (answered or retried when the worker is gone), never as a success.
                log::info!(
                    "worker {}: job {key} ended after passing job_timeout; its outcome is discarded",
                    worker.pid
                );
                worker.in_flight.retain(|k| *k != key);
                worker.head_started = None;
                continue;
            }
            if !worker.holds(key) {
                // A worker speaks only for its own jobs: another's result must not reach the
                // other's client. That job is left as it is, for the worker that holds it.
                let what = format!("an outcome for job {key}, which it does not hold");
                return self.protocol_violation(id, what);
            }
            if worker.in_flight.front() != Some(&key) {
                // An honest worker runs its jobs in order: answering a later one first would
                // restart the clock of the one it runs (and hide a hung job from job_timeout).
                let what = format!("an outcome for job {key} before the job it runs");
                return self.protocol_violation(id, what);
            }
            worker.in_flight.pop_front();
            worker.jobs_done += 1;
            let now = Instant::now();
            if let Some(started) = worker.head_started {
                self.pools[worker.pool].job_times.note(now - started);
            }
            worker.head_started = if worker.in_flight.is_empty() {
                None
            } else {
                Some(now)
            };
            let pool = worker.pool;
            self.pools[pool].last_result = Some(now);
            let stats = &mut self.pools[pool].stats;
            if ok {
                stats.done += 1;
            } else {
                stats.failed += 1;
            }
            self.answer(key, if ok { Status::Ok } else { Status::Failed }, &body);
        }
    }

    /// A worker wrote what no honest worker writes: it runs plugin code, so it may write
    /// anything. Kill it; nothing more it sends is read; its exit is a crash.
    fn protocol_violation(&mut self, id: u64, what: String) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        // Found while reading what a reaped worker left: its pid may be someone else's now.
        if self.worker_by_pid.contains_key(&worker.pid) {
            let _ = kill(worker.pid, Signal::SIGKILL);
        }
        log::error!(
            "worker {} (pool {}) broke the protocol: it sent {what}; killing it",
            worker.pid,
            self.pools[worker.pool].config.name
        );
        // Nothing more is read from it or written to it; reap() finds it gone.
        if let Some(epoll) = &self.epoll {
            let _ = epoll.delete(worker.channel.as_fd());
        }
        worker.violation = Some(format!("it sent {what}"));
    }

    /// Sends a job's one answer to its client (if still connected) and forgets the job.
    fn answer(&mut self, key: u64, status: Status, body: &[u8]) {
        let Some(job) = self.jobs.remove(&key) else {
            return;
        };
        if let Some((client, id)) = job.client {
            if let Some(conn) = self.clients.get_mut(&client) {
                conn.outstanding = conn.outstanding.saturating_sub(job.payload.len());
                protocol::put_result(conn.out(), id, status, body);
                self.dirty_clients.push(client);
            }
        }
    }

    // ---- timeouts --------------------------------------------------------------------------

    /// A redis worker's entries never pass through the master, so its scoreboard slot says
    /// which one runs and since when: read every `WATCH_EVERY` (at most; a quarter of the
    /// pool's job_timeout when that is shorter), it sets the worker's `head_started`, which the
    /// timer pass below judges as for any worker. An idle master with redis pools wakes that
    /// often to look, and does nothing else.
    fn watch_scoreboards(&mut self, now: Instant) {
        let now_ms = crate::scoreboard::monotonic_ms();
        let mut every: Option<Duration> = None;
        for w in self.workers.values_mut() {
            let pool = &self.pools[w.pool].config;
            let (Some(_), Some(timeout)) = (&pool.redis, pool.job_timeout) else {
                continue;
            };
            w.time_from_slot(now, now_ms);
            let mine = (timeout / 4).clamp(WATCH_MIN, WATCH_EVERY);
            every = Some(every.map_or(mine, |e| e.min(mine)));
        }
        self.next_watch = every.map(|e| now + e);
    }

    fn enforce_timeouts(&mut self) {
        let now = Instant::now();
        self.resume_accept_if_due();
        self.admin_timers(now);
        if self.next_watch.is_some_and(|t| now >= t) {
            self.watch_scoreboards(now);
        }
        // Judge on fresh facts: after the master itself was off the CPU (stopped, starved),
        // outcomes may be waiting on a worker's socket for jobs that ended in time. Read them
        // before declaring anything overdue.
        let suspects: Vec<u64> = self
            .workers
            .values()
            .filter(|w| w.past_job_timeout(now, self.pools[w.pool].config.job_timeout))
            .map(|w| w.id)
            .collect();
        let now_ms = crate::scoreboard::monotonic_ms();
        for id in suspects {
            self.read_worker(id);
            // A redis worker's slot may say its job ended (and another began) since the watch.
            if let Some(w) = self.workers.get_mut(&id) {
                if self.pools[w.pool].config.redis.is_some() {
                    w.time_from_slot(now, now_ms);
                }
            }
        }
        for worker in self.workers.values_mut() {
            let pool = &self.pools[worker.pool];
            let job_timeout = pool.config.job_timeout;
            let timed_out = worker.past_job_timeout(now, job_timeout);
            // The job it runs is past its time: whatever the worker still says of it, it is
            // answered as timed out (or retried) once the worker is gone.
            let overdue = worker.in_flight.front().copied();
            match &mut worker.kill {
                Some(kill_state) if kill_state.sigkill_sent => {}
                Some(kill_state) if now >= kill_state.sigkill_at => {
                    log::warn!("worker {} did not exit in time; SIGKILL", worker.pid);
                    let _ = kill(worker.pid, Signal::SIGKILL);
                    kill_state.sigkill_sent = true;
                }
                // A draining worker (told to stop after its job) still answers to job_timeout:
                // a hung job must not hold a reload or a shutdown until its grace runs out, nor
                // go back to the queue as if it had never run.
                Some(kill_state) if timed_out => {
                    log::warn!(
                        "worker {} (pool {}, draining): job ran past job_timeout {:?}; SIGKILL in {KILL_GRACE:?}",
                        worker.pid,
                        pool.config.name,
                        job_timeout.unwrap_or_default()
                    );
                    kill_state.reason = KillReason::Timeout;
                    kill_state.sigkill_at = kill_state.sigkill_at.min(now + KILL_GRACE);
                    worker.overdue = overdue;
                }
                Some(_) => {}
                None if timed_out => {
                    log::warn!(
                        "worker {} (pool {}): job ran past job_timeout {:?}; SIGTERM, SIGKILL in {KILL_GRACE:?}",
                        worker.pid,
                        pool.config.name,
                        job_timeout.unwrap_or_default()
                    );
                    let _ = kill(worker.pid, Signal::SIGTERM);
                    worker.kill = Some(Kill {
                        reason: KillReason::Timeout,
                        sigkill_at: now + KILL_GRACE,
                        sigkill_sent: false,
                        asked: true,
                    });
                    worker.overdue = overdue;
                }
                None => {}
            }
        }
        if let Phase::Stopping { deadline } = self.phase {
            if now >= deadline {
                for worker in self.workers.values_mut() {
                    if let Some(k) = &mut worker.kill {
                        if !k.sigkill_sent {
                            let _ = kill(worker.pid, Signal::SIGKILL);
                            k.sigkill_sent = true;
                        }
                    }
                }
            }
        }
    }

    // ---- workers ---------------------------------------------------------------------------

    fn live_workers(&self, pool: usize) -> usize {
        self.workers
            .values()
            .filter(|w| w.pool == pool && !w.draining())
            .count()
    }

    fn maintain_workers(&mut self) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        self.retire_pools();
        let now = Instant::now();
        match self.spawn_paused_until {
            Some(until) if now < until => return,
            _ => self.spawn_paused_until = None,
        }
        for idx in 0..self.pools.len() {
            if self.pools[idx].stopped {
                continue;
            }
            let missing = self.pools[idx]
                .wanted
                .saturating_sub(self.live_workers(idx));
            if missing == 0 {
                continue;
            }
            let count = match self.pools[idx].backoff.may_spawn(now) {
                None => continue,
                Some(SpawnPace::All) => missing,
                Some(SpawnPace::One) => 1,
            };
            for _ in 0..count {
                if let Err(e) = self.spawn(idx) {
                    // The master's own shortage (fds, processes), not the pool's crash: pause
                    // every fork for a moment, and say so once per pause.
                    log::error!(
                        "cannot start a worker for pool {}: {e}; trying again in {SPAWN_PAUSE:?}",
                        self.pools[idx].config.name
                    );
                    self.spawn_paused_until = Some(now + SPAWN_PAUSE);
                    return;
                }
            }
        }
    }

    /// Forks one worker for pool `idx`.
    fn spawn(&mut self, idx: usize) -> Result<(), MasterError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(os("socketpair"))?;
        let slot = Slot::new().map_err(os("mmap (scoreboard slot)"))?;
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        // Block every signal across fork: a signal that reached the child before it installed
        // its own handlers would run the master's (inherited) one and be lost. The child
        // unblocks once its handlers are in place, so such a signal is delivered, not lost.
        let mask = nix::sys::signal::SigSet::all()
            .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
            .map_err(os("sigprocmask"))?;
        // SAFETY: the master has one thread; the child only runs `become_worker`, which never
        // returns into the master's code.
        let handed = std::mem::take(&mut self.pools[idx].predecessors);
        let forked = unsafe { fork() };
        if let Ok(ForkResult::Parent { .. }) | Err(_) = forked {
            let _ = mask.thread_set_mask();
        }
        if forked.is_err() {
            self.pools[idx].predecessors = handed.clone();
        }
        match forked.map_err(os("fork"))? {
            ForkResult::Child => {
                drop(ours);
                self.become_worker(idx, theirs, mask, handed, slot)
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                // Only this worker gets the slot: no later child (worker, probe) inherits it.
                if let Err(e) = slot.keep_from_later_children() {
                    log::warn!("scoreboard slot of worker {child}: madvise: {e}");
                }
                if self.pools[idx].config.redis.is_some() && self.next_watch.is_none() {
                    self.next_watch = Some(Instant::now() + WATCH_MIN);
                }
                // The worker leads its own process group (a terminal's Ctrl-C reaches the
                // master only). It says so itself too; doing it on both sides, as shells do,
                // leaves no moment at which it is still in ours.
                let _ = nix::unistd::setpgid(child, child);
                let channel = UnixStream::from(ours);
                channel
                    .set_nonblocking(true)
                    .map_err(|source| MasterError::Os {
                        context: "socketpair".into(),
                        source,
                    })?;
                let token = Token::Worker(id).encode();
                self.epoll()
                    .add(channel.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
                    .map_err(os("epoll"))?;
                log::debug!(
                    "worker {child} started for pool {}",
                    self.pools[idx].config.name
                );
                self.worker_by_pid.insert(child, id);
                self.workers.insert(
                    id,
                    Worker {
                        id,
                        pid: child,
                        pool: idx,
                        generation: self.generation,
                        hash: self.pools[idx].hash,
                        channel,
                        reader: FrameReader::new(usize::MAX / 2),
                        out: VecDeque::new(),
                        out_pos: 0,
                        wants_write: false,
                        in_flight: VecDeque::new(),
                        head_started: None,
                        holding: false,
                        started: Instant::now(),
                        jobs_done: 0,
                        kill: None,
                        leaving: None,
                        violation: None,
                        overdue: None,
                        inherited: handed,
                        slot,
                    },
                );
                Ok(())
            }
        }
    }

    /// In the forked child: close everything that belongs to the master and to other workers,
    /// give signals back their defaults, and run the worker. Never returns.
    fn become_worker(
        &mut self,
        idx: usize,
        channel: OwnedFd,
        sigmask: nix::sys::signal::SigSet,
        predecessors: Vec<worker::redis::Predecessor>,
        slot: Slot,
    ) -> ! {
        if let Some(signals) = self.signals.take() {
            signals.reset_in_child();
        }
        self.epoll = None;
        self.listener = None;
        self.admin = None;
        self.admins.clear();
        // Closes our copy of the lock fd; the master's lock stays (no unlock here).
        self.pidfile = None;
        self.clients.clear();
        // Other workers' socketpairs. Their scoreboard slots are not mapped here
        // (MADV_DONTFORK): forget them rather than unmap what may be something else by now.
        for (_, other) in self.workers.drain() {
            std::mem::forget(other.slot);
        }
        let mut instance = self.pools[idx].instance.take();
        // Other pools' plugin instances are the master's: never run their destructors here.
        for pool in &mut self.pools {
            if let Some(other) = pool.instance.take() {
                std::mem::forget(other);
            }
        }
        let assignment = worker::Assignment {
            pool: self.pools[idx].config.clone(),
            generation: self.generation,
            channel,
            master: self.pid,
            sigmask,
            identity: self.identity.clone(),
            predecessors,
            slot,
        };
        match instance.as_mut() {
            Some(plugin) => worker::run(plugin, assignment),
            None => {
                log::error!(
                    "internal: pool {} has no plugin instance",
                    self.pools[idx].config.name
                );
                // SAFETY: see worker::run.
                unsafe { nix::libc::_exit(WorkerExit::BootFailed.code()) }
            }
        }
    }

    // ---- dispatch --------------------------------------------------------------------------

    fn dispatch(&mut self) {
        let now = Instant::now();
        for idx in 0..self.pools.len() {
            while !self.pools[idx].queue.is_empty() {
                let max_jobs = self.pools[idx].config.max_jobs;
                let prefetch = self.pools[idx].job_times.prefetch();
                let target = self
                    .workers
                    .values()
                    .filter(|w| {
                        w.pool == idx && !w.draining() && !w.holding && w.in_flight.len() < prefetch
                    })
                    // Never send a worker more jobs than it will run before max_jobs recycles it.
                    .filter(|w| {
                        max_jobs.is_none_or(|max| w.jobs_done + (w.in_flight.len() as u64) < max)
                    })
                    .min_by_key(|w| (w.in_flight.len(), w.id))
                    .map(|w| w.id);
                let Some(target) = target else { break };
                let Some(key) = self.pools[idx].queue.pop_front() else {
                    break;
                };
                if !self.jobs.contains_key(&key) {
                    continue;
                }
                let Some(worker) = self.workers.get_mut(&target) else {
                    break;
                };
                worker.out.push_back(key);
                worker.in_flight.push_back(key);
                if worker.in_flight.len() == 1 {
                    worker.head_started = Some(now);
                }
                self.dirty_workers.push(target);
            }
        }
    }

    fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty_workers);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty.drain(..) {
            self.flush_worker(id);
        }
        self.dirty_workers = dirty;
        let mut dirty = std::mem::take(&mut self.dirty_clients);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty.drain(..) {
            self.flush_client(id);
        }
        self.dirty_clients = dirty;
    }

    fn flush_worker(&mut self, id: u64) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.violation.is_some() {
            return;
        }
        while !w.out.is_empty() {
            // Up to WRITE_BATCH frames per writev: each its head, then its payload in place.
            let mut heads = [[0u8; protocol::JOB_HEAD]; WRITE_BATCH];
            let mut sizes = [0usize; WRITE_BATCH];
            let mut count = 0;
            for (slot, &key) in w.out.iter().take(WRITE_BATCH).enumerate() {
                let Some(job) = self.jobs.get(&key) else {
                    // Cannot happen (a job is answered only after its worker read it); if it
                    // did, the stream would be out of step: the worker must go.
                    log::error!(
                        "worker {}: job {key} vanished before it was sent; killing the worker",
                        w.pid
                    );
                    let _ = kill(w.pid, Signal::SIGKILL);
                    w.out.clear();
                    w.out_pos = 0;
                    break;
                };
                heads[slot] = protocol::job_head(key, job.payload.len());
                sizes[slot] = protocol::JOB_HEAD + job.payload.len();
                count = slot + 1;
            }
            let mut slices = Vec::with_capacity(2 * count);
            let mut skip = w.out_pos;
            for (slot, &key) in w.out.iter().take(count).enumerate() {
                let payload = self.jobs.get(&key).map_or(&[][..], |j| &j.payload[..]);
                for part in [&heads[slot][..], payload] {
                    if skip >= part.len() {
                        skip -= part.len();
                    } else {
                        slices.push(io::IoSlice::new(&part[skip..]));
                        skip = 0;
                    }
                }
            }
            if slices.is_empty() {
                break;
            }
            let mut written = match (&w.channel).write_vectored(&slices) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break, // WouldBlock: wait for EPOLLOUT; a dead worker: reap handles it
            };
            // Drop the frames written whole; remember how far into the next one we got.
            let mut slot = 0;
            while written > 0 && slot < count {
                let left = sizes[slot] - w.out_pos;
                if written >= left {
                    written -= left;
                    w.out_pos = 0;
                    w.out.pop_front();
                    slot += 1;
                } else {
                    w.out_pos += written;
                    written = 0;
                }
            }
        }
        let wants_write = !w.out.is_empty();
        if wants_write != w.wants_write {
            w.wants_write = wants_write;
            let flags = if wants_write {
                EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT
            } else {
                EpollFlags::EPOLLIN
            };
            let mut event = EpollEvent::new(flags, Token::Worker(id).encode());
            if let Some(epoll) = &self.epoll {
                let _ = epoll.modify(w.channel.as_fd(), &mut event);
            }
        }
    }

    fn flush_client(&mut self, id: u64) {
        let Some(conn) = self.clients.get_mut(&id) else {
            return;
        };
        if conn.flush().is_err() {
            return self.drop_client(id);
        }
        // Back-pressure: a client holding too much of the master's memory is not read from.
        let paused = conn.over_budget();
        let wants_write = conn.pending_out() > 0;
        if paused != conn.paused || wants_write != conn.wants_write {
            conn.paused = paused;
            conn.wants_write = wants_write;
            let mut flags = EpollFlags::empty();
            if !paused {
                flags |= EpollFlags::EPOLLIN;
            }
            if wants_write {
                flags |= EpollFlags::EPOLLOUT;
            }
            let mut event = EpollEvent::new(flags, Token::Client(id).encode());
            if let Some(epoll) = &self.epoll {
                let _ = epoll.modify(conn.stream.as_fd(), &mut event);
            }
            if !paused {
                // Frames may have arrived while paused; take them now.
                if let Err(reason) = self.take_submits(id) {
                    log::info!("closing client {id}: {reason}");
                    self.drop_client(id);
                }
            }
        }
    }

    /// Shutting down: give clients a moment to receive their last results.
    fn final_flush(&mut self) {
        let until = Instant::now() + FINAL_FLUSH;
        while Instant::now() < until {
            let ids: Vec<u64> = self
                .clients
                .iter()
                .filter(|(_, c)| c.pending_out() > 0)
                .map(|(id, _)| *id)
                .collect();
            if ids.is_empty() {
                return;
            }
            for id in ids {
                if let Some(conn) = self.clients.get_mut(&id) {
                    if conn.flush().is_err() {
                        self.clients.remove(&id);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Reads a wait status in the light of what the master did to the worker and what the worker
/// said before it left. Only a worker that said why (LEAVING, with the status it then exited
/// with) and whose reason squares with what the master knows left cleanly; any other exit is
/// a crash — a plugin can call `exit(0)` or `exit(203)` itself, but it cannot make that a stop.
fn classify(status: WaitStatus, w: &Worker, pool: &PoolConfig, lived: Duration) -> Ending {
    if let Some(what) = &w.violation {
        return Ending::Crashed {
            how: format!("killed for breaking the protocol ({what})"),
            core: false,
            note: "",
        };
    }
    if w.kill
        .as_ref()
        .is_some_and(|k| k.reason == KillReason::Timeout)
    {
        return Ending::KilledOnTimeout(pool.job_timeout.unwrap_or_default());
    }
    match status {
        WaitStatus::Exited(_, code) => match w.leaving {
            Some(said) if i32::from(said.code) == code => {
                match check_leaving(said, w.jobs_done, pool, lived) {
                    Ok(ending) => ending,
                    Err(why) => Ending::Crashed {
                        how: format!("exited with status {code}, claiming {why}"),
                        core: false,
                        note: "",
                    },
                }
            }
            Some(said) => Ending::Crashed {
                how: format!(
                    "exited with status {code} after saying it would exit with {}",
                    said.code
                ),
                core: false,
                note: "",
            },
            None => Ending::Crashed {
                how: format!("exited with status {code}"),
                core: false,
                note: " without saying why (an exit from plugin code?)",
            },
        },
        // Killed by the master after it asked it to go; one that said LEAVING and then stayed
        // until its SIGKILL is a crash.
        WaitStatus::Signaled(_, Signal::SIGKILL, _)
            if w.kill.as_ref().is_some_and(|k| k.sigkill_sent && k.asked) =>
        {
            Ending::Stopped
        }
        WaitStatus::Signaled(_, signal, core) => Ending::Crashed {
            how: format!("killed by {}", signal.as_str()),
            core,
            note: "",
        },
        other => Ending::Crashed {
            how: format!("ended with {other:?}"),
            core: false,
            note: "",
        },
    }
}

/// A worker's stated reason for leaving, checked against what the master knows of it: a
/// worker runs plugin code, so what it says is a claim. `Err` says what does not add up.
fn check_leaving(
    said: Leaving,
    jobs_done: u64,
    pool: &PoolConfig,
    lived: Duration,
) -> Result<Ending, String> {
    let exit = WorkerExit::from_code(i32::from(said.code))
        .ok_or_else(|| format!("status {} means nothing to jobhost", said.code))?;
    if said.jobs_done != jobs_done {
        return Err(format!(
            "{} jobs done where the master received {jobs_done} outcomes",
            said.jobs_done
        ));
    }
    match exit {
        WorkerExit::Stopped => Ok(Ending::Stopped),
        WorkerExit::Recycled(Limit::MaxJobs) if pool.max_jobs.is_some_and(|m| jobs_done >= m) => {
            Ok(Ending::Recycled(Limit::MaxJobs))
        }
        // The master's clock for the worker started at fork, before the worker's own.
        WorkerExit::Recycled(Limit::MaxLifetime)
            if pool.max_lifetime.is_some_and(|m| lived >= m) =>
        {
            Ok(Ending::Recycled(Limit::MaxLifetime))
        }
        WorkerExit::Recycled(Limit::MaxRss) if pool.max_rss.is_some() => {
            Ok(Ending::Recycled(Limit::MaxRss))
        }
        WorkerExit::PluginStopped if pool.mode == PoolMode::Loop => Ok(Ending::PluginStopped),
        WorkerExit::BootFailed if jobs_done == 0 => Ok(Ending::BootFailed),
        WorkerExit::MasterGone => Err("its master is gone, which it is not".into()),
        WorkerExit::Recycled(limit) => Err(format!("{} reached, which it was not", limit.as_str())),
        WorkerExit::PluginStopped => Err("its plugin said Stop, in a jobs-mode pool".into()),
        WorkerExit::BootFailed => Err("worker_start failed, after finishing jobs".into()),
    }
}

/// Thousands of clients need thousands of fds: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// `jobhost run -c FILE`: start, serve until stopped.
/// How `jobhost run` was asked to run.
pub struct RunOptions {
    /// Detach from the terminal once started.
    pub daemon: bool,
    /// Overrides `host.pidfile`.
    pub pidfile: Option<PathBuf>,
}

/// `jobhost run -c FILE [--daemon] [--pidfile P]`: start, serve until stopped.
pub fn run(config_path: &Path, options: RunOptions) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(config_path)?;
    let log_file: Option<PathBuf> = match &config.host.log {
        crate::config::LogTarget::File(path) => Some(path.clone()),
        _ => None,
    };
    if config.host.log == crate::config::LogTarget::Syslog {
        crate::logging::init_syslog(config.host.log_level, "master");
    } else {
        crate::logging::init(config.host.log_level, log_file.as_deref(), "master")?;
    }
    if options.daemon && config.host.log == crate::config::LogTarget::Stderr {
        eprintln!("jobhost: warning: --daemon sends stderr to /dev/null: set host.log to a file to keep the log");
    }
    // Before anything else: a second master on the same pidfile stops here.
    let pidfile_path = options
        .pidfile
        .clone()
        .unwrap_or_else(|| config.host.pidfile.clone());
    let pidfile = crate::daemon::Pidfile::acquire(&pidfile_path)?;
    log::info!(
        "jobhost {} starting with {}",
        env!("CARGO_PKG_VERSION"),
        config.path.display()
    );
    // Plugins loaded and sockets bound while still attached: errors reach the terminal.
    let mut master = Master::start(config)?;
    master.give_log_file_to_workers();
    let ready = if options.daemon {
        Some(crate::daemon::detach()?)
    } else {
        None
    };
    master.pid = Pid::this();
    if let Err(e) = pidfile.write(std::process::id()) {
        if let Some(ready) = ready {
            ready.fail(&e.to_string());
        }
        return Err(e.into());
    }
    if let Some(ready) = ready {
        log::info!("running as a daemon, pid {}", std::process::id());
        ready.ok();
    }
    master.pidfile = Some(pidfile);
    master.run()?;
    if let Some(pidfile) = master.pidfile.take() {
        pidfile.remove();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(extra: &str) -> PoolConfig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libp.so"), b"").unwrap();
        let text = format!(
            "[host]\nplugins_dir = {:?}\n[[pool]]\nname = \"p\"\nplugin = \"p\"\n{extra}",
            dir.path()
        );
        let config = Config::parse(&text, &dir.path().join("jobhost.toml")).unwrap();
        config.pools[0].clone()
    }

    fn said(code: i32, jobs_done: u64) -> Leaving {
        Leaving {
            code: code as u8,
            jobs_done,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// A worker as the master knows it, with no process behind it.
    fn worker(jobs_done: u64) -> Worker {
        let (channel, _peer) = UnixStream::pair().unwrap();
        Worker {
            id: 1,
            pid: Pid::from_raw(4242),
            pool: 0,
            generation: 1,
            hash: crate::plugins::ContentHash::of(b""),
            channel,
            reader: FrameReader::new(1 << 20),
            out: VecDeque::new(),
            out_pos: 0,
            wants_write: false,
            in_flight: VecDeque::new(),
            head_started: None,
            holding: false,
            started: Instant::now(),
            jobs_done,
            kill: None,
            leaving: None,
            violation: None,
            overdue: None,
            inherited: Vec::new(),
            slot: Slot::new().unwrap(),
        }
    }

    fn kill_of(reason: KillReason, asked: bool, sigkill_sent: bool) -> Option<Kill> {
        Some(Kill {
            reason,
            sigkill_at: Instant::now(),
            sigkill_sent,
            asked,
        })
    }

    #[test]
    fn every_ending_counts_as_a_crash_a_timeout_a_recycle_or_a_stop() {
        let jobs = pool("max_jobs = 10\nmax_rss = \"1GiB\"\njob_timeout = \"5s\"\n");
        let looping = pool("mode = \"loop\"\n");
        let pid = Pid::from_raw(4242);
        let exited = |code| WaitStatus::Exited(pid, code);
        let signaled = |signal| WaitStatus::Signaled(pid, signal, false);
        let stop = |sigkill| kill_of(KillReason::Stop, true, sigkill);
        let timeout = kill_of(KillReason::Timeout, true, true);
        let leaving = |code, done| Some(said(code, done));
        type Case<'a> = (
            &'a str,
            Option<Kill>,
            Option<Leaving>,
            Option<&'a str>,
            u64,
            WaitStatus,
            &'a PoolConfig,
            ExitKind,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // Asked to go: scale-down, TTOU, restart, reload, stop POOL, shutdown.
            ("stopped between jobs", stop(false), leaving(0, 3), None, 3, exited(0), &jobs, ExitKind::Stop),
            ("SIGKILLed past the grace", stop(true), None, None, 3, signaled(Signal::SIGKILL), &jobs, ExitKind::Stop),
            ("shutdown now", stop(true), None, None, 0, signaled(Signal::SIGKILL), &jobs, ExitKind::Stop),
            ("loop plugin said Stop", None, leaving(203, 0), None, 0, exited(203), &looping, ExitKind::Stop),
            ("an outside SIGTERM, taken between jobs", None, leaving(0, 2), None, 2, exited(0), &jobs, ExitKind::Stop),
            // Limits.
            ("max_jobs", None, leaving(200, 10), None, 10, exited(200), &jobs, ExitKind::Recycle),
            ("max_rss", None, leaving(202, 3), None, 3, exited(202), &jobs, ExitKind::Recycle),
            // Past job_timeout, however it then ended.
            ("timed out, SIGKILLed", timeout, None, None, 1, signaled(Signal::SIGKILL), &jobs, ExitKind::Timeout),
            ("timed out, left on SIGTERM", kill_of(KillReason::Timeout, true, false), leaving(0, 1), None, 1, exited(0), &jobs, ExitKind::Timeout),
            // Crashes.
            ("kill -9 from outside", None, None, None, 5, signaled(Signal::SIGKILL), &jobs, ExitKind::Crash),
            ("SIGSEGV", None, None, None, 5, signaled(Signal::SIGSEGV), &jobs, ExitKind::Crash),
            ("SIGSEGV while draining", stop(false), None, None, 5, signaled(Signal::SIGSEGV), &jobs, ExitKind::Crash),
            ("exit without LEAVING", None, None, None, 5, exited(0), &jobs, ExitKind::Crash),
            ("exit unlike its LEAVING", None, leaving(0, 5), None, 5, exited(1), &jobs, ExitKind::Crash),
            ("a claim that does not add up", None, leaving(200, 3), None, 3, exited(200), &jobs, ExitKind::Crash),
            ("worker_start failed", None, leaving(204, 0), None, 0, exited(204), &jobs, ExitKind::Crash),
            ("said LEAVING, then stayed", kill_of(KillReason::Stop, false, true), leaving(0, 2), None, 2, signaled(Signal::SIGKILL), &jobs, ExitKind::Crash),
            ("broke the protocol", stop(true), None, Some("an OUTCOME for job 9"), 2, signaled(Signal::SIGKILL), &jobs, ExitKind::Crash),
        ];
        for (what, kill, leaving, violation, done, status, cfg, want) in cases {
            let mut w = worker(done);
            w.kill = kill;
            w.leaving = leaving;
            w.violation = violation.map(str::to_owned);
            let ending = classify(status, &w, cfg, HOUR);
            assert_eq!(ending.kind(), want, "{what}: {}", ending.describe());
            assert_eq!(
                ending.is_crash(),
                matches!(want, ExitKind::Crash | ExitKind::Timeout),
                "{what}"
            );
        }
    }

    #[test]
    fn a_stated_reason_is_taken_only_when_it_squares_with_what_the_master_knows() {
        let jobs = pool("max_jobs = 10\nmax_lifetime = \"1h\"\nmax_rss = \"1GiB\"\n");
        let code = |e: WorkerExit| e.code();
        let ok = |s, done, p: &PoolConfig, lived| check_leaving(s, done, p, lived);
        assert_eq!(ok(said(0, 3), 3, &jobs, HOUR), Ok(Ending::Stopped));
        assert_eq!(
            ok(
                said(code(WorkerExit::Recycled(Limit::MaxJobs)), 10),
                10,
                &jobs,
                HOUR
            ),
            Ok(Ending::Recycled(Limit::MaxJobs))
        );
        // max_jobs claimed after 3 jobs of 10; max_lifetime claimed after a minute of an hour.
        assert!(ok(
            said(code(WorkerExit::Recycled(Limit::MaxJobs)), 3),
            3,
            &jobs,
            HOUR
        )
        .is_err());
        let minute = Duration::from_secs(60);
        assert!(ok(said(201, 3), 3, &jobs, minute).is_err());
        assert_eq!(
            ok(said(201, 3), 3, &jobs, HOUR),
            Ok(Ending::Recycled(Limit::MaxLifetime))
        );
        assert_eq!(
            ok(said(202, 0), 0, &jobs, minute),
            Ok(Ending::Recycled(Limit::MaxRss))
        );
        // Loop mode's Stop in a jobs pool; the master "gone" while it reads; a job count off.
        assert!(ok(said(203, 0), 0, &jobs, minute).is_err());
        assert!(ok(said(205, 0), 0, &jobs, minute).is_err());
        assert!(ok(said(0, 4), 3, &jobs, minute).is_err());
        assert!(ok(said(42, 0), 0, &jobs, minute).is_err());
        assert!(
            ok(said(204, 1), 1, &jobs, minute).is_err(),
            "boot failed after a job"
        );
        assert_eq!(ok(said(204, 0), 0, &jobs, minute), Ok(Ending::BootFailed));
        let bare = pool("");
        assert!(ok(said(202, 0), 0, &bare, HOUR).is_err(), "max_rss unset");
        let looping = pool("mode = \"loop\"\n");
        assert_eq!(
            ok(said(203, 0), 0, &looping, minute),
            Ok(Ending::PluginStopped)
        );
    }
}
