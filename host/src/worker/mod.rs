//! A worker process, from the moment after `fork` to its `_exit`: after-fork setup, the
//! batch-runner loop, and the exit status that tells the master why it left.
//!
//! ```text
//! worker_start()
//! loop {
//!     dispatch pending signals      // callbacks run here, between jobs: TERM stops only here
//!     check limits                  // max_jobs, max_lifetime, own RSS → exit Recycled
//!     check MemAvailable            // under min_available_memory: take no job, wait
//!     source.next()                 // a job from the master, or one run_once of the plugin
//! }
//! worker_stop()
//! ```
//!
//! Owns everything a worker does; it never returns into the master's code (it ends with
//! `_exit`), never touches the master's sockets (the master closed them in the child before
//! calling [`run`]), and talks to the master only through its own socketpair.

pub mod gearman;
pub mod job;
pub mod redis;
mod source;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use jobhost_plugin_api::PluginInstance;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::config::{PoolConfig, PoolMode};
use crate::protocol;
use crate::signals::{self, SignalPipe};
use source::{JobSource, LoopSource, MasterSource, Next};

/// Why a worker ended, as told by its exit status. The codes are documented in README.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Asked to stop (SIGTERM/SIGINT/SIGQUIT), between two jobs.
    Stopped,
    /// A limit was reached; the master replaces the worker at once.
    Recycled(Limit),
    /// The loop-mode plugin said Stop: the pool is not refilled until restarted.
    PluginStopped,
    /// `worker_start` failed: counted as a crash, so the master backs off.
    BootFailed,
    /// The master went away (its end of the socketpair closed).
    MasterGone,
}

/// The limit that recycled a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MaxJobs,
    MaxLifetime,
    MaxRss,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxJobs => "max_jobs",
            Limit::MaxLifetime => "max_lifetime",
            Limit::MaxRss => "max_rss",
        }
    }
}

// Exit statuses. High and unusual, so a plugin's own `exit(1)` is never mistaken for one.
const EXIT_STOPPED: i32 = 0;
const EXIT_MAX_JOBS: i32 = 200;
const EXIT_MAX_LIFETIME: i32 = 201;
const EXIT_MAX_RSS: i32 = 202;
const EXIT_PLUGIN_STOPPED: i32 = 203;
const EXIT_BOOT_FAILED: i32 = 204;
const EXIT_MASTER_GONE: i32 = 205;

impl WorkerExit {
    pub fn code(self) -> i32 {
        match self {
            WorkerExit::Stopped => EXIT_STOPPED,
            WorkerExit::Recycled(Limit::MaxJobs) => EXIT_MAX_JOBS,
            WorkerExit::Recycled(Limit::MaxLifetime) => EXIT_MAX_LIFETIME,
            WorkerExit::Recycled(Limit::MaxRss) => EXIT_MAX_RSS,
            WorkerExit::PluginStopped => EXIT_PLUGIN_STOPPED,
            WorkerExit::BootFailed => EXIT_BOOT_FAILED,
            WorkerExit::MasterGone => EXIT_MASTER_GONE,
        }
    }

    /// The reason behind an exit status; `None` for a status jobhost does not use (a crash).
    pub fn from_code(code: i32) -> Option<WorkerExit> {
        Some(match code {
            EXIT_STOPPED => WorkerExit::Stopped,
            EXIT_MAX_JOBS => WorkerExit::Recycled(Limit::MaxJobs),
            EXIT_MAX_LIFETIME => WorkerExit::Recycled(Limit::MaxLifetime),
            EXIT_MAX_RSS => WorkerExit::Recycled(Limit::MaxRss),
            EXIT_PLUGIN_STOPPED => WorkerExit::PluginStopped,
            EXIT_BOOT_FAILED => WorkerExit::BootFailed,
            EXIT_MASTER_GONE => WorkerExit::MasterGone,
            _ => return None,
        })
    }
}

/// What the master hands a worker at fork.
pub struct Assignment {
    pub pool: PoolConfig,
    pub generation: u64,
    /// The worker's end of its socketpair with the master.
    pub channel: OwnedFd,
    /// The master's pid, to notice a master that died before PR_SET_PDEATHSIG was set.
    pub master: Pid,
    /// The signal mask to restore once this worker's handlers are installed (the master
    /// blocks every signal across fork).
    pub sigmask: nix::sys::signal::SigSet,
    /// host.user/host.group: dropped to before any plugin worker code runs.
    pub identity: Option<crate::daemon::Identity>,
    /// A redis pool: ended workers whose pending entries this one takes over first.
    pub predecessors: Vec<redis::Predecessor>,
    /// This worker's scoreboard slot (see [`crate::scoreboard`]): a redis worker publishes
    /// on it; a job-mode worker claims each job on it, so the master can take back the rest.
    pub slot: crate::scoreboard::Slot,
    /// `server.max_result`: a larger result is the job's failure, never sent.
    pub max_result: usize,
}

/// What the signals received since the last job ask of the worker.
#[derive(Default)]
struct State {
    stop: Option<Signal>,
    reopen_log: bool,
}

/// Runs a worker to its end. Called in the child right after fork; never returns.
pub fn run(plugin: &mut PluginInstance, assignment: Assignment) -> ! {
    let exit = match setup(&assignment) {
        Ok(signals) => serve(plugin, assignment, signals),
        Err(e) => {
            log::error!("worker setup failed: {e}");
            say_leaving(assignment.channel.as_fd(), WorkerExit::BootFailed, 0);
            WorkerExit::BootFailed
        }
    };
    log::logger().flush();
    // SAFETY: `_exit` ends the process without running the master's atexit handlers or
    // destructors of the master's state, which this child inherited but does not own.
    unsafe { nix::libc::_exit(exit.code()) }
}

/// Tells the master why this worker leaves (a LEAVING frame), right before it exits: after
/// every outcome (the same stream carries them, in order), after `worker_stop`. Without that
/// frame the master reads the exit as a crash, whatever its status: a plugin's own `exit(0)`
/// or `exit(203)` cannot pass for a clean stop, and one that closed this descriptor leaves as
/// a crash too.
fn say_leaving(channel: BorrowedFd<'_>, exit: WorkerExit, jobs_done: u64) {
    if exit == WorkerExit::MasterGone {
        return; // nobody to tell
    }
    let mut frame = Vec::with_capacity(16);
    protocol::put_leaving(&mut frame, exit.code() as u8, jobs_done);
    let mut sent = 0;
    // Bounded: a master that does not read within a second is stuck or gone.
    let until = Instant::now() + Duration::from_secs(1);
    while sent < frame.len() {
        match nix::unistd::write(channel, &frame[sent..]) {
            Ok(n) => sent += n,
            Err(nix::Error::EINTR) => {}
            Err(nix::Error::EAGAIN) if Instant::now() < until => {
                let mut fds = [PollFd::new(channel, PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::from(100u8));
            }
            Err(e) => {
                log::warn!("could not tell the master why this worker leaves: {e}");
                return;
            }
        }
    }
}

/// After-fork setup: die with the master, own process group, own signal dispositions.
fn setup(assignment: &Assignment) -> Result<SignalPipe, String> {
    crate::logging::set_role(&assignment.pool.name);
    // First, because changing credentials clears PR_SET_PDEATHSIG (see prctl(2)). A worker
    // that cannot drop must not run plugin code as root: the error ends it before any.
    if let Some(identity) = &assignment.identity {
        identity
            .drop_to()
            .map_err(|e| format!("cannot drop privileges to {:?}: {e}", identity.name))?;
    }
    fn os(what: &'static str) -> impl Fn(nix::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    // The kernel kills us when the master dies — even by SIGKILL — so no worker is orphaned.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(os("PR_SET_PDEATHSIG"))?;
    // The master may have died between fork and prctl: then our parent is already someone else.
    if nix::unistd::getppid() != assignment.master {
        // SAFETY: see `run`.
        unsafe { nix::libc::_exit(WorkerExit::MasterGone.code()) }
    }
    // A terminal's Ctrl-C reaches the master only; the master decides what workers do.
    nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)).map_err(os("setpgid"))?;
    signals::ignore(&[Signal::SIGHUP, Signal::SIGTTIN, Signal::SIGTTOU])
        .map_err(os("ignoring signals"))?;
    let pipe = SignalPipe::install(&[
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
    ])
    .map_err(os("installing signal handlers"))?;
    // Handlers in place: whatever arrived since the fork is delivered to them now.
    assignment
        .sigmask
        .thread_set_mask()
        .map_err(os("sigprocmask"))?;
    Ok(pipe)
}

/// Runs the plugin's worker side; returns why the worker leaves, once it told the master.
fn serve(plugin: &mut PluginInstance, assignment: Assignment, signals: SignalPipe) -> WorkerExit {
    let pool = &assignment.pool;
    let mut source: Box<dyn JobSource> = match (&pool.redis, pool.mode) {
        (None, _) if pool.gearman.is_some() => Box::new(gearman::GearmanSource::new(
            assignment.channel,
            pool,
            pool.gearman.clone().unwrap_or_else(|| unreachable!()),
            assignment.slot,
        )),
        (Some(cfg), _) => Box::new(redis::RedisSource::new(
            assignment.channel,
            pool,
            cfg.clone(),
            assignment.predecessors,
            assignment.slot,
        )),
        (None, PoolMode::Jobs) => Box::new(
            MasterSource::new(assignment.channel, assignment.slot)
                .with_max_result(assignment.max_result),
        ),
        (None, PoolMode::Loop) => Box::new(LoopSource::new(assignment.channel, pool.idle_sleep)),
    };
    if let Err(message) = plugin.worker_start().into_result() {
        log::error!("worker_start failed: {message}");
        say_leaving(source.channel(), WorkerExit::BootFailed, 0);
        return WorkerExit::BootFailed;
    }
    log::debug!("worker started (generation {})", assignment.generation);
    let (exit, jobs_done) = batch_loop(plugin, pool, &signals, source.as_mut());
    source.retire();
    if let Err(message) = plugin.worker_stop().into_result() {
        log::warn!("worker_stop failed: {message}");
    }
    say_leaving(source.channel(), exit, jobs_done);
    exit
}

/// The batch-runner loop. Returns why the worker leaves, and the jobs it finished.
fn batch_loop(
    plugin: &mut PluginInstance,
    pool: &PoolConfig,
    signals: &SignalPipe,
    source: &mut dyn JobSource,
) -> (WorkerExit, u64) {
    let mut state = State::default();
    let mut limits = Limits::new(pool);
    let mut memory = MemoryGate::new(pool.min_available_memory);
    let mut jobs_done: u64 = 0;
    let mut last_job = Duration::ZERO;
    // The master has been told this worker holds back for lack of memory.
    let mut holding = false;

    loop {
        // What came since the last job, and what each means: handled here, between two jobs.
        for (signal, _) in signals.take().iter() {
            match signal {
                Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => state.stop = Some(signal),
                Signal::SIGUSR1 => state.reopen_log = true,
                _ => {}
            }
        }
        // Reopen first: a worker told to reopen and to stop at once logs its last line to the
        // new file.
        if std::mem::take(&mut state.reopen_log) {
            if let Err(e) = crate::logging::reopen() {
                log::error!("cannot reopen the log file: {e}");
            }
        }
        if let Some(signal) = state.stop {
            log::debug!("stopping on {signal} after {jobs_done} jobs");
            return (WorkerExit::Stopped, jobs_done);
        }
        if let Some(limit) = limits.exceeded(jobs_done, last_job) {
            log::info!(
                "recycling after {jobs_done} jobs: {}",
                limits.describe(limit)
            );
            return (WorkerExit::Recycled(limit), jobs_done);
        }
        last_job = Duration::ZERO;
        let low = memory.low();
        if low != holding {
            holding = low;
            if let Err(e) = source.hold(low) {
                log::error!("talking to the master failed: {e}; exiting");
                return (WorkerExit::MasterGone, jobs_done);
            }
        }
        if low {
            wait(signals, Vec::new(), Some(Duration::from_secs(1)));
            continue;
        }
        let job_started = Instant::now();
        match source.next(plugin) {
            Ok(Next::Worked) => {
                jobs_done += 1;
                last_job = job_started.elapsed();
            }
            Ok(Next::Idle(wake)) => {
                let timeout = [wake.timeout, limits.time_left()]
                    .into_iter()
                    .flatten()
                    .min();
                let mut fds = Vec::new();
                source.wake_fds(&mut fds);
                wait(signals, fds, timeout);
            }
            Ok(Next::Stop) => {
                log::info!("the plugin said stop after {jobs_done} jobs");
                return (WorkerExit::PluginStopped, jobs_done);
            }
            Ok(Next::Closed) => {
                log::warn!("the master closed this worker's channel; exiting");
                return (WorkerExit::MasterGone, jobs_done);
            }
            Err(e) => {
                log::error!("talking to the master failed: {e}; exiting");
                return (WorkerExit::MasterGone, jobs_done);
            }
        }
    }
}

/// Sleeps until a signal, one of the source's `fds` is ready, or the timeout (None = no
/// timeout).
fn wait<'a>(signals: &'a SignalPipe, mut fds: Vec<PollFd<'a>>, timeout: Option<Duration>) {
    fds.push(PollFd::new(signals.fd(), PollFlags::POLLIN));
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => {
            PollTimeout::try_from(t.as_millis().clamp(1, 60_000) as i32).unwrap_or(PollTimeout::MAX)
        }
    };
    // EINTR just means a signal came: the loop looks at it next.
    let _ = poll(&mut fds, timeout);
}

/// The recycle limits of one worker.
struct Limits {
    max_jobs: Option<u64>,
    started: Instant,
    max_lifetime: Option<Duration>,
    max_rss: Option<u64>,
    /// The worker's own memory when last measured (for the log).
    last_own: u64,
    next_rss_check: Instant,
    next_own_check: Instant,
}

/// `max_rss` is about the worker's *own* memory (private pages), which only
/// /proc/self/smaps_rollup tells — a page-table walk, slow for a worker that maps a large
/// preloaded table. So the cheap RSS (/proc/self/statm, a few µs, and never below the private
/// part) is read first, before the next job after any job that took `RSS_CHECK_AFTER_JOB` (a
/// job that grew the heap by much took that long) and otherwise every `RSS_CHECK_EVERY`; only
/// an RSS over the limit has the private part measured, at most every `RSS_CHECK_EVERY`.
const RSS_CHECK_EVERY: Duration = Duration::from_millis(100);
const RSS_CHECK_AFTER_JOB: Duration = Duration::from_millis(1);

impl Limits {
    fn new(pool: &PoolConfig) -> Limits {
        let now = Instant::now();
        Limits {
            max_jobs: pool.max_jobs,
            started: now,
            max_lifetime: pool.max_lifetime,
            max_rss: pool.max_rss,
            last_own: 0,
            next_rss_check: now,
            next_own_check: now,
        }
    }

    fn exceeded(&mut self, jobs_done: u64, last_job: Duration) -> Option<Limit> {
        if self.max_jobs.is_some_and(|max| jobs_done >= max) {
            return Some(Limit::MaxJobs);
        }
        if self
            .max_lifetime
            .is_some_and(|max| self.started.elapsed() >= max)
        {
            return Some(Limit::MaxLifetime);
        }
        if let Some(max) = self.max_rss {
            let now = Instant::now();
            if now >= self.next_rss_check || last_job >= RSS_CHECK_AFTER_JOB {
                self.next_rss_check = now + RSS_CHECK_EVERY;
                let rss = crate::sys::rss_of(nix::unistd::Pid::this()).unwrap_or(0);
                if rss > max && now >= self.next_own_check {
                    self.next_own_check = now + RSS_CHECK_EVERY;
                    self.last_own = crate::sys::own_of(nix::unistd::Pid::this()).unwrap_or(0);
                    if self.last_own > max {
                        return Some(Limit::MaxRss);
                    }
                }
            }
        }
        None
    }

    /// How long until max_lifetime: bounds an idle wait so an idle worker still recycles.
    fn time_left(&self) -> Option<Duration> {
        self.max_lifetime
            .map(|max| max.saturating_sub(self.started.elapsed()))
    }

    fn describe(&self, limit: Limit) -> String {
        match limit {
            Limit::MaxJobs => format!("max_jobs {} reached", self.max_jobs.unwrap_or(0)),
            Limit::MaxLifetime => format!(
                "max_lifetime {:?} reached",
                self.max_lifetime.unwrap_or_default()
            ),
            Limit::MaxRss => format!(
                "max_rss: its own memory {} MiB is over {} MiB",
                self.last_own >> 20,
                self.max_rss.unwrap_or(0) >> 20
            ),
        }
    }
}

/// Holds the worker back while the system is short of memory; says so once per episode.
struct MemoryGate {
    min: Option<u64>,
    low_since: Option<Instant>,
    next_check: Instant,
}

impl MemoryGate {
    fn new(min: Option<u64>) -> MemoryGate {
        MemoryGate {
            min,
            low_since: None,
            next_check: Instant::now(),
        }
    }

    fn low(&mut self) -> bool {
        let Some(min) = self.min else { return false };
        let now = Instant::now();
        if self.low_since.is_none() && now < self.next_check {
            return false;
        }
        self.next_check = now + RSS_CHECK_EVERY;
        let available = match crate::sys::mem_available() {
            Ok(bytes) => bytes,
            Err(_) => return false,
        };
        match (available < min, self.low_since) {
            (true, None) => {
                log::warn!(
                    "system MemAvailable {} MiB is under min_available_memory {} MiB: taking no jobs until it recovers",
                    available >> 20,
                    min >> 20
                );
                self.low_since = Some(now);
                true
            }
            (true, Some(_)) => true,
            (false, Some(since)) => {
                log::info!(
                    "memory recovered ({} MiB available) after {:.1?}; taking jobs again",
                    available >> 20,
                    since.elapsed()
                );
                self.low_since = None;
                false
            }
            (false, None) => false,
        }
    }
}
