//! The master's decisions, as a pure state machine: it owns the pools, the workers' lives, the
//! accepted jobs, the phase (running, stopping) and the reload in progress, and turns every
//! input into effects. One entry point, [`Supervisor::on`]`(event, now) -> effects`, and one
//! [`Supervisor::next_deadline`] for the loop's wait.
//!
//! ```text
//! Event::Command   a signal or an admin line, as one Command (stop, scale, reload, …)
//! Event::Submit    a client's job          Event::ClientGone  its connection closed
//! Event::Said      a worker's frame        Event::Broke       a frame no worker may send
//! Event::Reported  a worker's progress or data for the job it runs (with its claim)
//! Event::Hangup    a worker that closed its socketpair and stayed
//! Event::Exited    a reaped worker         Event::Spawned / SpawnFailed  a fork's outcome
//! Event::Running   an engine-fed worker's slot Event::Recalled    jobs taken back from a worker
//! Event::ReloadFailed / ReloadReady        phase 1 of a reload, done by the shell
//! Event::Tick      once per pass of the loop: deadlines, retired pools, spawns, dispatch
//! ```
//!
//! It never touches a file descriptor, a process, a clock or the log: `now` is passed in, and
//! what is to be done comes back as plain [`Effect`]s (fork a worker of pool P, signal worker
//! W, send it job J, answer client C, reply to admin session A, tell systemd, log a line) that
//! the shell in `master/mod.rs` performs. So every decision is unit-tested without a fork
//! (`supervisor/tests.rs`).
//!
//! A job it accepted is answered exactly once: with its result, or failed with the reason once
//! its attempts are used up or the master shuts down.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use rustc_hash::{FxHashMap, FxHashSet};

use super::life::{self, Ending, Leaving, Life, Stepped, KILL_GRACE};
use super::pool::{Pool, SpawnPace};
use super::reload::ReloadError;
use crate::admin::{Command, ReloadReport, Target, MAX_WORKERS};
use crate::config::{PoolConfig, PoolMode};
use crate::metrics::{ExitReason, Rejection};
use crate::plugins::ContentHash;
use crate::protocol::Status;
use crate::scoreboard::Report;
use crate::worker::redis::Predecessor;
use crate::worker::Limit;

#[cfg(test)]
mod tests;

/// How often the master reads engine-fed workers' scoreboards to time their jobs (at most; a
/// quarter of the pool's job_timeout when that is shorter). `config::CLAIM_IDLE_MARGIN` allows
/// for it and for KILL_GRACE.
const WATCH_EVERY: Duration = Duration::from_secs(1);
const WATCH_MIN: Duration = Duration::from_millis(100);
/// Two starts of an engine-fed worker's job read this close together are the same start.
const SAME_START: Duration = Duration::from_millis(5);
/// After a worker could not be started for want of the master's own resources (socketpair or
/// fork failing: a full fd table, the process limit), start none for this long. Not a crash
/// of the pool: its plugin did nothing wrong.
const SPAWN_PAUSE: Duration = Duration::from_secs(1);

/// Crashes, timeouts and failed reloads kept for `status`'s `recent` (newest last).
const RECENT_KEPT: usize = 20;

/// A worker, as the supervisor names it (the shell maps it to a pid and a socketpair).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

/// A client connection of the job socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

/// An admin session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// Who gave a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Signal(Signal),
    /// An admin session, which is answered.
    Admin(SessionId),
}

/// What a worker said, decoded from its frames by the shell.
pub use super::channel::{Reported, WorkerSaid};

/// Every input of the master.
#[derive(Debug)]
pub enum Event<'a> {
    Command {
        command: Command,
        from: Origin,
    },
    /// A client's SUBMIT frame (`watch`: SUBMIT_WATCH, it wants the job's reports; `detach`:
    /// the job is to run even if its client goes away before it is sent to a worker).
    Submit {
        client: ClientId,
        id: u64,
        pool: &'a str,
        payload: &'a [u8],
        watch: bool,
        detach: bool,
    },
    /// Its connection closed: its queued jobs that are not detached are dropped.
    ClientGone(ClientId),
    Said {
        worker: WorkerId,
        said: WorkerSaid,
    },
    /// Its WORK_PROGRESS or WORK_DATA frame for job `key`; `started`: the highest job seq it
    /// can have started (sent whole, and claimed on its slot), read when the frame was taken.
    /// (A `WorkerSaid::Reported` that comes as `Event::Said` counts as started by no claim.)
    Reported {
        worker: WorkerId,
        key: u64,
        report: Reported,
        started: u64,
    },
    /// Its socketpair reached end of file a while ago, and it is still running: it closed its
    /// end itself.
    Hangup(WorkerId),
    /// It sent bytes no honest worker sends (`what`).
    Broke {
        worker: WorkerId,
        what: String,
    },
    /// Reaped, after everything it wrote was read. `board`: its scoreboard slot; `written`:
    /// the highest job seq whose frame it was sent whole; `claimed`: the highest it claimed
    /// (started), as its slot says.
    Exited {
        worker: WorkerId,
        status: WaitStatus,
        board: Report,
        written: u64,
        claimed: u64,
    },
    Spawned {
        worker: WorkerId,
        pool: usize,
        pid: Pid,
        predecessors: Vec<Predecessor>,
    },
    SpawnFailed {
        pool: usize,
        predecessors: Vec<Predecessor>,
        error: String,
    },
    /// A engine-fed worker's slot says its job runs since then (or none runs).
    Running {
        worker: WorkerId,
        since: Option<Instant>,
    },
    /// Jobs taken back from a worker (see `scoreboard`'s claim words): every job sent to it
    /// with a seq above `started_through` is the master's again; `written_through` is the
    /// highest seq any byte of which reached it (the next one sent is numbered after it).
    Recalled {
        worker: WorkerId,
        started_through: u64,
        written_through: u64,
    },
    /// Phase 1 failed, or was abandoned (`AbandonReload`); `at`: the wall-clock time, as
    /// `status` shows it.
    ReloadFailed {
        error: ReloadError,
        at: String,
    },
    ReloadReady(ReloadPlan),
    /// Once per pass of the loop, after the inputs: enforce deadlines, retire drained pools,
    /// fork missing workers, dispatch queued jobs.
    Tick,
}

/// Everything the shell is asked to do.
#[derive(Debug)]
pub enum Effect {
    /// Fork a worker of `pool` (generation `generation`), known as `worker`; report back with
    /// `Spawned` or `SpawnFailed`.
    Spawn {
        worker: WorkerId,
        pool: usize,
        generation: u64,
        predecessors: Vec<Predecessor>,
    },
    /// Signal the worker's process, unless it has been reaped already.
    Signal {
        worker: WorkerId,
        signal: Signal,
    },
    /// Write a JOB frame (numbered `seq` for this worker) to its socketpair.
    Send {
        worker: WorkerId,
        seq: u64,
        key: u64,
        payload: Rc<[u8]>,
    },
    /// Take back the jobs it holds but has not started; report with `Recalled`.
    Recall {
        worker: WorkerId,
    },
    /// Nothing more is read from it or written to it (it broke the protocol; it is killed).
    Forget {
        worker: WorkerId,
    },
    /// Nothing more is written to it (it is killed now; its jobs are answered).
    DiscardOutput {
        worker: WorkerId,
    },
    /// Forward a watched job's progress or data to its client (PROGRESS / DATA), before its
    /// answer.
    Report {
        client: ClientId,
        id: u64,
        report: Reported,
    },
    /// A job's one answer; `payload_len` is what the client's back-pressure budget gets back.
    Answer {
        client: ClientId,
        id: u64,
        status: Status,
        body: Vec<u8>,
        payload_len: usize,
    },
    Reply {
        session: SessionId,
        reply: Reply,
    },
    /// Close the job socket (shutting down).
    StopAccepting,
    /// Start phase 1 of a reload (read the config, stage and probe the builds); report with
    /// `ReloadFailed` or `ReloadReady`.
    PrepareReload,
    /// Kill a reload's probes (shutting down); report with `ReloadFailed`.
    AbandonReload,
    /// Reopen the master's log file.
    ReopenLogs,
    /// Delete private plugin copies no pool and no worker uses.
    DeleteUnusedCopies {
        in_use: Vec<ContentHash>,
    },
    /// Free the plugin instance of a pool that is gone.
    DropInstance {
        pool: usize,
    },
    /// A line for systemd (sd_notify).
    Notify(String),
    /// Log that a job has run past its pool's `slow_job` (`timeout: None`) or is being killed
    /// for passing `job_timeout`, with what its worker is doing now (the shell reads that
    /// from the worker's /proc before it performs the kill that follows this effect).
    SlowJob(SlowJob),
    Log {
        level: log::Level,
        text: String,
    },
}

/// A job that runs long, for [`Effect::SlowJob`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowJob {
    pub worker: WorkerId,
    pub pid: Pid,
    pub pool: String,
    /// The job, when it came through the master (an engine-fed worker's is on its slot).
    pub job: Option<SlowJobOf>,
    pub elapsed: Duration,
    /// Killed for passing this job_timeout.
    pub timeout: Option<Duration>,
}

/// The job of a [`SlowJob`]: the master's key, its client and the client's id, its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowJobOf {
    pub key: u64,
    pub client: u64,
    pub id: u64,
    pub payload_len: usize,
}

/// A crash, a timeout or a failed reload, for `status`'s `recent` (the shell gives it its
/// wall-clock time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recent {
    pub at: Instant,
    /// `crash`, `boot-failed`, `timeout`, `reload-failed`.
    pub kind: &'static str,
    pub pool: Option<String>,
    pub pid: Option<i32>,
    pub reason: String,
}

/// The answer to an admin session's command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Ok,
    Scaled {
        pool: String,
        from: usize,
        to: usize,
    },
    Restarting {
        workers: usize,
        pools: usize,
    },
    StoppingPool {
        pool: String,
        workers: usize,
    },
    StartingPool {
        pool: String,
        wanted: usize,
    },
    Reloaded(ReloadReport),
    Refused(CommandError),
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no pool {name:?} (pools: {})", pools.join(", "))]
    NoPool { name: String, pools: Vec<String> },
    #[error("the master is shutting down")]
    ShuttingDown,
}

/// The parts of the config the supervisor decides with (the rest is the shell's).
#[derive(Debug, Clone)]
pub struct Settings {
    pub graceful_timeout: Duration,
    pub max_payload: u64,
    /// The largest result (or failure message) a client is given (`server.max_result`).
    pub max_result: u64,
}

/// Phase 1 of a reload, done: what each pool of the new config becomes.
#[derive(Debug)]
pub struct ReloadPlan {
    pub settings: Settings,
    pub pools: Vec<PlanEntry>,
    /// The report's clock text (the supervisor reads no clock).
    pub at: String,
}

#[derive(Debug)]
pub enum PlanEntry {
    /// Same build, same worker-side config: keep the workers, update the rest.
    Keep { pool: usize, config: PoolConfig },
    /// A new build or a new worker-side config: new workers (the shell has the new instance).
    Replace {
        pool: usize,
        config: PoolConfig,
        build: Build,
    },
    /// A new pool, appended (its index is the number of pools before it).
    Add { config: PoolConfig, build: Build },
}

/// A plugin build as pools show it.
#[derive(Debug, Clone)]
pub struct Build {
    pub plugin: String,
    pub version: String,
    pub hash: ContentHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Graceful stop: no new work; workers finish their job; answer everything; exit.
    Stopping {
        deadline: Instant,
    },
}

/// A job sent to a worker: its number on that worker's socketpair, and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    seq: u64,
    key: u64,
}

/// A worker as the supervisor knows it.
#[derive(Debug)]
pub struct Worker {
    pub pid: Pid,
    pub pool: usize,
    pub generation: u64,
    /// The plugin build it was forked with (its private copy is kept while it lives).
    pub hash: ContentHash,
    pub started: Instant,
    pub life: Life,
    /// Jobs sent, in order; the head is the one it runs (or runs next).
    in_flight: VecDeque<Sent>,
    /// The seq of the last job frame sent to it.
    last_seq: u64,
    /// When its head job started: `None` with no job, or while it holds back.
    pub head_started: Option<Instant>,
    pub jobs_done: u64,
    /// What it said in its LEAVING frame.
    leaving: Option<Leaving>,
    /// A redis pool: the ended workers it was given to take over (handed on if it dies too).
    inherited: Vec<Predecessor>,
    /// Jobs were taken back from it past its claim (a fence it has not seen yet): it is sent
    /// none until it says it has (HOLD, not holding, which it sends when it next looks for a
    /// job) — it may be stopped (SIGSTOP) or stuck, and would only hold them again.
    stalled: bool,
    /// The last take-back took nothing: none is asked again until it says something.
    recall_futile: bool,
    /// Its head job (this seq) is known to be started (its claim said so): only the jobs
    /// behind it may be taken back.
    head_claimed: Option<u64>,
    /// A take-back was asked for and not yet reported.
    recalling: bool,
    /// WORK_DATA bytes it sent for its head job (reset when that job ends).
    head_data: usize,
    /// The `head_started` of the job logged as slow (each job is logged once).
    slow_logged: Option<Instant>,
}

impl Worker {
    pub fn busy(&self) -> bool {
        !self.in_flight.is_empty()
    }

    pub fn queued(&self) -> usize {
        self.in_flight.len()
    }

    fn holds(&self, key: u64) -> bool {
        self.in_flight.iter().any(|s| s.key == key)
    }

    /// When its head job passes its pool's job_timeout (while that counts).
    fn job_due(&self, timeout: Option<Duration>) -> Option<Instant> {
        Some(self.head_started? + timeout?)
    }

    /// When its head job passes its pool's slow_job, unless that job was logged already.
    fn slow_due(&self, slow_job: Option<Duration>) -> Option<Instant> {
        let started = self.head_started?;
        if self.slow_logged == Some(started) || !self.life.serving() {
            return None;
        }
        Some(started + slow_job?)
    }

    fn stalled(&self) -> bool {
        self.stalled
    }

    /// Jobs it holds that may not have started: behind its head, and its head too unless its
    /// claim said it started.
    fn maybe_unstarted(&self) -> usize {
        let head = self.in_flight.front().map(|s| s.seq);
        if head.is_some() && head == self.head_claimed {
            self.queued() - 1
        } else {
            self.queued()
        }
    }
}

/// Whether pool `pool`'s queue takes one more job of `client`, or why not. `max_queue` bounds
/// the queue while one client has it to itself. Once it is full, a client whose lane holds
/// less than its fair share — `max_queue` over the clients with jobs queued, counting itself,
/// at least 1 — still gets in, up to twice `max_queue` in all: so one flooding connection
/// cannot make another's job "queue full", and the queue stays bounded.
fn queue_room(pool: &Pool, client: ClientId) -> Result<(), String> {
    let max = pool.config.max_queue;
    let queued = pool.queue.len();
    if queued < max {
        return Ok(());
    }
    let own = pool.queue.lane_len(client);
    let lanes = pool.queue.lanes() + usize::from(own == 0);
    let share = (max / lanes.max(1)).max(1);
    if own < share && queued < max.saturating_mul(2) {
        return Ok(());
    }
    if lanes <= 1 {
        Err(format!("{queued} jobs queued"))
    } else {
        Err(format!(
            "{queued} jobs queued, {own} of them this connection's; its fair share is {share}"
        ))
    }
}

/// A head job's time so far, into its pool's busy seconds, as its clock stops (the rendered
/// counter adds the running jobs' time: dropping it unsaved would make it go back).
fn settle_busy(metrics: &mut crate::metrics::PoolMetrics, started: Option<Instant>, now: Instant) {
    if let Some(started) = started {
        metrics.busy_seconds += now.saturating_duration_since(started).as_secs_f64();
    }
}

/// The [`SlowJob`] of worker `w`'s head job (`timeout`: it is being killed for passing it).
fn slow_job(
    id: WorkerId,
    w: &Worker,
    pool: &PoolConfig,
    jobs: &FxHashMap<u64, Job>,
    now: Instant,
    timeout: Option<Duration>,
) -> SlowJob {
    let job = w.in_flight.front().and_then(|sent| {
        let job = jobs.get(&sent.key)?;
        Some(SlowJobOf {
            key: sent.key,
            client: job.client.0 .0,
            id: job.client.1,
            payload_len: job.payload.len(),
        })
    });
    SlowJob {
        worker: id,
        pid: w.pid,
        pool: pool.name.clone(),
        job,
        elapsed: w
            .head_started
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
        timeout,
    }
}

/// An accepted job.
#[derive(Debug)]
struct Job {
    pool: usize,
    /// The submitting connection (answered only while in `Supervisor::connected`) and the
    /// client's id for the job.
    client: (ClientId, u64),
    /// Submitted detached: it runs even if its client has gone before it is dispatched.
    detach: bool,
    payload: Rc<[u8]>,
    failures: u32,
    /// The crash back-off entry its last crash added to its pool (a fresh worker died running
    /// it): taken back if it crashes another worker, which makes it the job's fault.
    blamed_crash: Option<Instant>,
    /// Taken back once as a worker's head that had not started (perhaps still on its way
    /// there): never again as a head, so it cannot bounce between workers.
    taken_as_head: bool,
    /// Submitted with SUBMIT_WATCH: its progress and data go to its client.
    watch: bool,
    /// When it entered the queue (accepted, or given back): its queue wait runs from here.
    queued_at: Instant,
}

/// A reload between its request and its outcome.
#[derive(Debug, Default)]
struct Reloading {
    /// Sessions waiting for its outcome (SIGHUP waits for nobody).
    waiters: Vec<SessionId>,
    /// Asked again meanwhile (by these sessions): run once more when it ends.
    again: Option<Vec<SessionId>>,
}

pub struct Supervisor {
    settings: Settings,
    pools: Vec<Pool>,
    pool_index: FxHashMap<String, usize>,
    workers: BTreeMap<WorkerId, Worker>,
    next_worker: u64,
    /// Keyed by the master's own sequence (no client picks a key): a fast, unkeyed hash.
    jobs: FxHashMap<u64, Job>,
    next_job_key: u64,
    /// The clients with a job accepted that are still connected: answers and reports go only
    /// to these. (The shell never reuses a client's id.)
    connected: FxHashSet<ClientId>,
    phase: Phase,
    generation: u64,
    reloading: Option<Reloading>,
    last_reload: Option<ReloadReport>,
    /// READY=1 has been sent to systemd.
    ready_notified: bool,
    /// No worker is forked before this (the master itself was short of fds or processes).
    spawn_paused_until: Option<Instant>,
    /// When to read the engine-fed workers' scoreboards again, to time their jobs; `None` while no
    /// such worker lives.
    next_watch: Option<Instant>,
    out: Vec<Effect>,
    /// `dispatch_pool`'s workers with room for jobs (kept between calls).
    room: Vec<(usize, WorkerId, usize)>,
    /// Reloads that ended, by outcome, and when the last one did.
    reloads: (u64, u64),
    last_reload_at: Option<Instant>,
    /// SUBMITs naming no pool.
    unknown_pool: u64,
    /// The last crashes, timeouts and failed reloads (at most [`RECENT_KEPT`]).
    recent: VecDeque<Recent>,
}

impl Supervisor {
    pub fn new(settings: Settings, pools: Vec<Pool>) -> Supervisor {
        let pool_index = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.config.name.clone(), i))
            .collect();
        Supervisor {
            settings,
            pools,
            pool_index,
            workers: BTreeMap::new(),
            next_worker: 1,
            jobs: FxHashMap::default(),
            next_job_key: 1,
            connected: FxHashSet::default(),
            phase: Phase::Running,
            generation: 1,
            reloading: None,
            last_reload: None,
            ready_notified: false,
            spawn_paused_until: None,
            next_watch: None,
            out: Vec::new(),
            room: Vec::new(),
            reloads: (0, 0),
            last_reload_at: None,
            unknown_pool: 0,
            recent: VecDeque::new(),
        }
    }

    /// Decides what `event` means; returns what the shell is to do, in order.
    pub fn on(&mut self, event: Event<'_>, now: Instant) -> Vec<Effect> {
        match event {
            Event::Command { command, from } => self.command(command, from, now),
            Event::Submit {
                client,
                id,
                pool,
                payload,
                watch,
                detach,
            } => self.submit(client, id, pool, payload, watch, detach, now),
            Event::ClientGone(client) => self.client_gone(client),
            Event::Said { worker, said } => self.said(worker, said, 0, now),
            Event::Reported {
                worker,
                key,
                report,
                started,
            } => self.said(worker, WorkerSaid::Reported { key, report }, started, now),
            Event::Broke { worker, what } => self.violation(worker, what),
            Event::Exited {
                worker,
                status,
                board,
                written,
                claimed,
            } => self.exited(worker, status, board, written.min(claimed), now),
            Event::Spawned {
                worker,
                pool,
                pid,
                predecessors,
            } => self.spawned(worker, pool, pid, predecessors, now),
            Event::SpawnFailed {
                pool,
                predecessors,
                error,
            } => self.spawn_failed(pool, predecessors, error, now),
            Event::Hangup(worker) => {
                // Its end of the socketpair is closed: it is leaving (or dying), and must be
                // gone soon — one that closed its channel and stayed could hold its jobs
                // forever.
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.life.leaving(now);
                }
            }
            Event::Running { worker, since } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    // The slot says when in whole milliseconds, read against the clock anew
                    // each time: within a few of the start known, it is that same job (one
                    // that ended that soon was never slow or timed out), whose slow_job line
                    // must not come again.
                    let same = matches!((w.head_started, since), (Some(a), Some(b))
                        if a.max(b).saturating_duration_since(a.min(b)) < SAME_START);
                    if !same {
                        w.head_started = since;
                    }
                }
            }
            Event::Recalled {
                worker,
                started_through,
                written_through,
            } => self.recalled(worker, started_through, written_through, now),
            Event::ReloadFailed { error, at } => {
                self.reload_finished(Err(error.to_string()), at, now)
            }
            Event::ReloadReady(plan) => {
                let at = plan.at.clone();
                let outcome = self.apply_reload(plan, now);
                self.reload_finished(outcome, at, now);
            }
            Event::Tick => {
                self.enforce_deadlines(now);
                self.retire_pools(now);
                self.spawn_missing(now);
                self.dispatch(now);
                self.notify_ready_once();
            }
        }
        std::mem::take(&mut self.out)
    }

    /// Hands back an effects buffer `on` returned, emptied, so the next event's effects reuse
    /// its memory (an outcome a microsecond allocates nothing).
    pub fn recycle(&mut self, mut buffer: Vec<Effect>) {
        buffer.clear();
        if self.out.capacity() < buffer.capacity() {
            self.out = buffer;
        }
    }

    /// When the loop must look again at the latest, with nothing else happening; `None`: not
    /// until something happens (an idle master sleeps).
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for w in self.workers.values() {
            let config = &self.pools[w.pool].config;
            if let Some(t) = w.life.deadline(w.job_due(config.job_timeout)) {
                consider(t);
            }
            if let Some(t) = w.slow_due(config.slow_job) {
                consider(t);
            }
        }
        for (idx, pool) in self.pools.iter().enumerate() {
            if let Some(t) = pool.backoff.next_spawn {
                // No fork before the master's own pause ends, back-off or not.
                let t = self.spawn_paused_until.map_or(t, |p| t.max(p));
                // Nothing is forked while stopping: no waking for it either.
                let running = matches!(self.phase, Phase::Running);
                if running && !pool.stopped && self.live_workers(idx) < pool.wanted {
                    consider(t);
                }
            }
            if let Some(t) = self.recall_due(idx, now).1 {
                consider(t);
            }
        }
        if let Phase::Stopping { deadline } = self.phase {
            // Once passed, every worker has been SIGKILLed: what is left is reaping, which
            // SIGCHLD wakes us for (no 1 ms spin meanwhile).
            if deadline > now {
                consider(deadline);
            }
        }
        if let Some(t) = self.next_watch {
            consider(t);
        }
        if let (Some(t), Phase::Running) = (self.spawn_paused_until, self.phase) {
            consider(t);
        }
        next
    }

    /// Stopping, and every worker is gone: the master may exit.
    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. }) && self.workers.is_empty()
    }

    /// Workers whose facts the shell must read before the next `Tick` judges their deadlines:
    /// those whose job looks past its timeout (outcomes may be waiting on their socket, or a
    /// engine-fed worker's slot may say its job ended), and — when it is time to look — every
    /// engine-fed worker with a job_timeout (its jobs never pass through the master).
    pub fn to_refresh(&self, now: Instant) -> Vec<WorkerId> {
        let watch = self.next_watch.is_some_and(|t| now >= t);
        self.workers
            .iter()
            .filter(|(_, w)| {
                let pool = &self.pools[w.pool].config;
                let overdue = matches!(w.life, Life::Serving { .. } | Life::Draining { .. })
                    && w.job_due(pool.job_timeout).is_some_and(|due| now >= due);
                let timed = pool.job_timeout.is_some() || pool.slow_job.is_some();
                overdue || (watch && pool.engine().is_some() && timed)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    // ---- views, for status and the shell ----------------------------------------------------

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    pub fn workers(&self) -> impl Iterator<Item = (WorkerId, &Worker)> {
        self.workers.iter().map(|(id, w)| (*id, w))
    }

    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    pub fn pool_named(&self, name: &str) -> Option<usize> {
        self.pool_index.get(name).copied()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn last_reload(&self) -> Option<&ReloadReport> {
        self.last_reload.as_ref()
    }

    /// Reloads that ended `(ok, failed)`, and when the last one ended.
    pub fn reloads(&self) -> ((u64, u64), Option<Instant>) {
        (self.reloads, self.last_reload_at)
    }

    /// SUBMITs that named no pool.
    pub fn unknown_pool_submits(&self) -> u64 {
        self.unknown_pool
    }

    /// The last crashes, timeouts and failed reloads, oldest first.
    pub fn recent(&self) -> impl DoubleEndedIterator<Item = &Recent> {
        self.recent.iter()
    }

    /// Jobs sent to the workers of pool `idx` and not answered yet.
    pub fn in_flight(&self, idx: usize) -> usize {
        self.workers
            .values()
            .filter(|w| w.pool == idx)
            .map(Worker::queued)
            .sum()
    }

    /// Pool `idx`'s busy seconds: its ended jobs' and the running ones' so far.
    pub fn busy_seconds(&self, idx: usize, now: Instant) -> f64 {
        let running: f64 = self
            .workers
            .values()
            .filter(|w| w.pool == idx)
            .filter_map(|w| w.head_started)
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .sum();
        self.pools.get(idx).map_or(0.0, |p| p.metrics.busy_seconds) + running
    }

    fn remember(&mut self, recent: Recent) {
        if self.recent.len() >= RECENT_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(recent);
    }

    /// Workers that serve (not leaving) in pool `idx`.
    pub fn live_workers(&self, idx: usize) -> usize {
        self.workers
            .values()
            .filter(|w| w.pool == idx && w.life.serving())
            .count()
    }

    // ---- effects ------------------------------------------------------------------------------

    fn log(&mut self, level: log::Level, text: String) {
        self.out.push(Effect::Log { level, text });
    }

    fn signal(&mut self, worker: WorkerId, signal: Signal) {
        self.out.push(Effect::Signal { worker, signal });
    }

    fn reply(&mut self, from: Origin, reply: Reply) {
        if let Origin::Admin(session) = from {
            self.out.push(Effect::Reply { session, reply });
        }
    }

    /// Sends a job's one answer to its client (if still connected) and forgets the job.
    fn answer(&mut self, key: u64, status: Status, body: Vec<u8>) {
        let Some(job) = self.jobs.remove(&key) else {
            return;
        };
        let (client, id) = job.client;
        if self.connected.contains(&client) {
            self.out.push(Effect::Answer {
                client,
                id,
                status,
                body,
                payload_len: job.payload.len(),
            });
        }
    }

    // ---- commands -----------------------------------------------------------------------------

    fn command(&mut self, command: Command, from: Origin, now: Instant) {
        match command {
            Command::Stop { escalate } => {
                self.stop(from, escalate, now);
                self.reply(from, Reply::Ok);
            }
            Command::StopNow => {
                self.stop_now(from, now);
                self.reply(from, Reply::Ok);
            }
            Command::AddWorkers(times) => self.add_workers(times),
            Command::RemoveWorkers(times) => (0..times).for_each(|_| self.remove_worker(now)),
            Command::ReopenLogs => {
                self.out.push(Effect::ReopenLogs);
                let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
                for id in ids {
                    self.signal(id, Signal::SIGUSR1);
                }
                self.log(log::Level::Info, "SIGUSR1: log reopened".into());
                self.reply(from, Reply::Ok);
            }
            Command::Reload => self.request_reload(from),
            Command::Scale { pool, workers } => {
                let reply = self.scale(&pool, workers, now);
                self.reply(from, reply);
            }
            Command::Restart { target } => {
                let reply = self.restart(target, now);
                self.reply(from, reply);
            }
            Command::StopPool { pool } => {
                let reply = self.stop_pool(&pool, now);
                self.reply(from, reply);
            }
            Command::StartPool { pool } => {
                let reply = self.start_pool(&pool);
                self.reply(from, reply);
            }
        }
    }

    fn origin_name(from: Origin) -> String {
        match from {
            Origin::Signal(signal) => signal.as_str().to_string(),
            Origin::Admin(_) => "admin shutdown".to_string(),
        }
    }

    /// Graceful stop: stop taking work, answer queued jobs "shutting down", let each worker
    /// finish its current job within graceful_timeout, then exit. `escalate` (SIGINT): a
    /// second one means "now" (Ctrl-C twice); a second TERM changes nothing — `timeout`,
    /// `kill -- -PGID` and systemd's control-group kill all deliver more than one.
    fn stop(&mut self, from: Origin, escalate: bool, now: Instant) {
        let who = Self::origin_name(from);
        if matches!(self.phase, Phase::Stopping { .. }) {
            if escalate {
                self.log(log::Level::Warn, format!("{who} again: stopping now"));
                return self.stop_now(from, now);
            }
            self.log(log::Level::Info, format!("{who}: already stopping"));
            return;
        }
        let grace = self.settings.graceful_timeout;
        self.log(
            log::Level::Info,
            format!("{who}: graceful stop; in-flight jobs have {grace:?} to finish"),
        );
        self.out.push(Effect::Notify("STOPPING=1".into()));
        let deadline = now + grace;
        self.phase = Phase::Stopping { deadline };
        self.abandon_reload();
        self.out.push(Effect::StopAccepting);
        for idx in 0..self.pools.len() {
            while let Some(key) = self.pools[idx].queue.pop_front() {
                self.answer(key, Status::Failed, b"shutting down".to_vec());
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop_worker(id, deadline);
        }
    }

    /// Stop now (SIGQUIT, `shutdown now`, a second SIGINT): kill every worker, answer every
    /// job "shutting down", exit.
    fn stop_now(&mut self, from: Origin, now: Instant) {
        let who = match from {
            Origin::Signal(Signal::SIGINT) => "SIGINT".to_string(),
            Origin::Signal(signal) => signal.as_str().to_string(),
            Origin::Admin(_) => "admin shutdown now".to_string(),
        };
        self.log(log::Level::Info, format!("{who}: stopping now"));
        self.out.push(Effect::Notify("STOPPING=1".into()));
        self.phase = Phase::Stopping { deadline: now };
        self.abandon_reload();
        self.out.push(Effect::StopAccepting);
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            if let Some(w) = self.workers.get_mut(&id) {
                if w.life.kill_now() {
                    // Its jobs are answered below: nothing more goes to it.
                    self.out.push(Effect::DiscardOutput { worker: id });
                    self.signal(id, Signal::SIGKILL);
                }
            }
        }
        let mut keys: Vec<u64> = self.jobs.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            self.answer(key, Status::Failed, b"shutting down".to_vec());
        }
        for pool in &mut self.pools {
            pool.queue.clear();
        }
    }

    /// TTIN (`times` of them): one worker more in every pool per signal, up to the most
    /// `scale` and the config allow. One log line per pool, however many came.
    fn add_workers(&mut self, times: u32) {
        for idx in 0..self.pools.len() {
            let pool = &mut self.pools[idx];
            let before = pool.wanted;
            pool.wanted = before
                .saturating_add(times as usize)
                .min(MAX_WORKERS.max(before));
            let capped = if pool.wanted < before.saturating_add(times as usize) {
                format!(" (capped: a pool has at most {MAX_WORKERS})")
            } else {
                String::new()
            };
            let text = format!(
                "SIGTTIN: pool {} now wants {} worker(s){capped}",
                pool.config.name, pool.wanted
            );
            self.log(log::Level::Info, text);
        }
    }

    /// TTOU: one worker fewer in every pool (never below zero); an idle one leaves first.
    fn remove_worker(&mut self, now: Instant) {
        for idx in 0..self.pools.len() {
            if self.pools[idx].wanted == 0 {
                continue;
            }
            self.pools[idx].wanted -= 1;
            let text = format!(
                "SIGTTOU: pool {} now wants {} worker(s)",
                self.pools[idx].config.name, self.pools[idx].wanted
            );
            self.log(log::Level::Info, text);
            let victim = self
                .workers
                .iter()
                .filter(|(_, w)| w.pool == idx && w.life.serving())
                .min_by_key(|(id, w)| (w.queued(), std::cmp::Reverse(w.started), **id))
                .map(|(id, _)| *id);
            if let Some(id) = victim {
                self.stop_worker(id, now + self.settings.graceful_timeout);
            }
        }
    }

    fn pool_or_refuse(&self, name: &str) -> Result<usize, CommandError> {
        if let Phase::Stopping { .. } = self.phase {
            return Err(CommandError::ShuttingDown);
        }
        self.pool_named(name).ok_or_else(|| {
            let mut pools: Vec<String> = self.pool_index.keys().cloned().collect();
            pools.sort_unstable();
            CommandError::NoPool {
                name: name.to_string(),
                pools,
            }
        })
    }

    /// `scale POOL N`: want N workers; extra ones finish their job and leave, idle ones first.
    fn scale(&mut self, name: &str, workers: usize, now: Instant) -> Reply {
        let idx = match self.pool_or_refuse(name) {
            Ok(idx) => idx,
            Err(e) => return Reply::Refused(e),
        };
        let pool = &mut self.pools[idx];
        if pool.config.mode == PoolMode::Loop && pool.stopped && workers > 0 {
            pool.stopped = false;
        }
        let before = pool.wanted;
        pool.wanted = workers;
        self.trim_pool(idx, now);
        Reply::Scaled {
            pool: name.to_string(),
            from: before,
            to: workers,
        }
    }

    /// Stops (gracefully) the workers of pool `idx` beyond its wanted count, idle ones first.
    fn trim_pool(&mut self, idx: usize, now: Instant) {
        let mut live: Vec<(usize, std::cmp::Reverse<Instant>, WorkerId)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.pool == idx && w.life.serving())
            .map(|(id, w)| (w.queued(), std::cmp::Reverse(w.started), *id))
            .collect();
        let extra = live.len().saturating_sub(self.pools[idx].wanted);
        live.sort();
        let deadline = now + self.settings.graceful_timeout;
        for (_, _, id) in live.into_iter().take(extra) {
            self.stop_worker(id, deadline);
        }
    }

    /// `restart POOL|all`: every current worker finishes its job and is replaced; the
    /// replacements start at once (draining workers do not count), so jobs keep flowing.
    fn restart(&mut self, target: Target, now: Instant) -> Reply {
        let pools: Vec<usize> = match &target {
            _ if matches!(self.phase, Phase::Stopping { .. }) => {
                return Reply::Refused(CommandError::ShuttingDown)
            }
            Target::All => (0..self.pools.len()).collect(),
            Target::Pool(name) => match self.pool_or_refuse(name) {
                Ok(idx) => vec![idx],
                Err(e) => return Reply::Refused(e),
            },
        };
        let deadline = now + self.settings.graceful_timeout;
        let mut replaced = 0;
        for &idx in &pools {
            let pool = &mut self.pools[idx];
            pool.stopped = false;
            pool.backoff.reset();
            let ids: Vec<WorkerId> = self
                .workers
                .iter()
                .filter(|(_, w)| w.pool == idx && w.life.serving())
                .map(|(id, _)| *id)
                .collect();
            replaced += ids.len();
            for id in ids {
                self.stop_worker(id, deadline);
            }
        }
        Reply::Restarting {
            workers: replaced,
            pools: pools.len(),
        }
    }

    /// `stop POOL`: its workers finish their job and leave; none are started until `start`.
    /// Its queue is kept (bounded by max_queue): the jobs run after `start`.
    fn stop_pool(&mut self, name: &str, now: Instant) -> Reply {
        let idx = match self.pool_or_refuse(name) {
            Ok(idx) => idx,
            Err(e) => return Reply::Refused(e),
        };
        self.pools[idx].stopped = true;
        let deadline = now + self.settings.graceful_timeout;
        let ids: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.pool == idx)
            .map(|(id, _)| *id)
            .collect();
        let n = ids.len();
        for id in ids {
            self.stop_worker(id, deadline);
        }
        Reply::StoppingPool {
            pool: name.to_string(),
            workers: n,
        }
    }

    /// `start POOL`: undo `stop` (or a loop plugin's Stop, or a failing state).
    fn start_pool(&mut self, name: &str) -> Reply {
        let idx = match self.pool_or_refuse(name) {
            Ok(idx) => idx,
            Err(e) => return Reply::Refused(e),
        };
        let pool = &mut self.pools[idx];
        pool.stopped = false;
        pool.backoff.reset();
        Reply::StartingPool {
            pool: name.to_string(),
            wanted: pool.wanted,
        }
    }

    /// Asks a worker to finish its current job and exit; SIGKILL at `deadline` if it has not.
    /// Jobs it holds but has not started go back to the queue when it exits.
    fn stop_worker(&mut self, id: WorkerId, deadline: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.life.ask_to_stop(deadline) {
            self.signal(id, Signal::SIGTERM);
        }
    }

    // ---- jobs in ------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)] // one SUBMIT's fields, as the event has them
    fn submit(
        &mut self,
        client: ClientId,
        id: u64,
        pool: &str,
        payload: &[u8],
        watch: bool,
        detach: bool,
        now: Instant,
    ) {
        let Some(&idx) = self.pool_index.get(pool) else {
            self.unknown_pool = self.unknown_pool.saturating_add(1);
            let reason = if matches!(self.phase, Phase::Stopping { .. }) {
                "shutting down".to_string()
            } else {
                format!("unknown pool {pool:?}")
            };
            return self.reject(client, id, reason, payload.len());
        };
        let config = &self.pools[idx].config;
        let verdict = if matches!(self.phase, Phase::Stopping { .. }) {
            Err((Rejection::ShuttingDown, "shutting down".to_string()))
        } else if config.mode == PoolMode::Loop {
            Err((
                Rejection::NotSubmittable,
                format!("pool {pool:?} is a loop-mode pool; it takes no jobs"),
            ))
        } else if config.redis.is_some() {
            Err((
                Rejection::NotSubmittable,
                format!("pool {pool:?} is fed from Redis: use `jobhost submit -c CONFIG {pool}`, or XADD to its stream"),
            ))
        } else if config.gearman.is_some() {
            Err((
                Rejection::NotSubmittable,
                format!("pool {pool:?} is fed by gearmand: submit to its function with a Gearman client (e.g. `gearman -f FUNCTION`)"),
            ))
        } else if payload.len() as u64 > self.settings.max_payload {
            Err((
                Rejection::TooLarge,
                format!(
                    "payload too large ({} bytes, max_payload is {})",
                    payload.len(),
                    self.settings.max_payload
                ),
            ))
        } else {
            queue_room(&self.pools[idx], client).map_err(|why| {
                (
                    Rejection::QueueFull,
                    format!("queue full ({why} for pool {pool:?})"),
                )
            })
        };
        if let Err((why, reason)) = verdict {
            self.pools[idx].metrics.reject(why);
            return self.reject(client, id, reason, payload.len());
        }
        let key = self.next_job_key;
        self.next_job_key += 1;
        self.jobs.insert(
            key,
            Job {
                pool: idx,
                client: (client, id),
                detach,
                payload: Rc::from(payload),
                failures: 0,
                blamed_crash: None,
                taken_as_head: false,
                watch,
                queued_at: now,
            },
        );
        let pool = &mut self.pools[idx];
        pool.queue.push_back(client, key);
        pool.metrics.submitted = pool.metrics.submitted.saturating_add(1);
        self.connected.insert(client);
    }

    fn reject(&mut self, client: ClientId, id: u64, reason: String, payload_len: usize) {
        self.out.push(Effect::Answer {
            client,
            id,
            status: Status::Rejected,
            body: reason.into_bytes(),
            payload_len,
        });
    }

    /// A client's connection closed. Its queued jobs nobody will answer are dropped (counted in
    /// their pool's `dropped`, logged once); detached ones stay queued, in its lane. Jobs sent
    /// to a worker run on (taking them back would race with their start), answered nowhere.
    /// O(its queued jobs, and what the workers gave back), never a scan of every job.
    fn client_gone(&mut self, client: ClientId) {
        if !self.connected.remove(&client) {
            return; // No job of its was ever accepted.
        }
        let mut dropped_in = Vec::new();
        for pool in &mut self.pools {
            let jobs = &mut self.jobs;
            let mut dropped = 0u64;
            let mut drop_unless_detached = |key: u64| match jobs.get(&key) {
                Some(job) if job.client.0 == client && !job.detach => {
                    jobs.remove(&key);
                    dropped += 1;
                    false
                }
                _ => true,
            };
            pool.queue.retain_lane(client, &mut drop_unless_detached);
            pool.queue.retain_front(&mut drop_unless_detached);
            if dropped > 0 {
                pool.stats.dropped = pool.stats.dropped.saturating_add(dropped);
                dropped_in.push(format!("{dropped} in pool {}", pool.config.name));
            }
        }
        if !dropped_in.is_empty() {
            let text = format!(
                "client {} went away: dropped its queued jobs nobody will answer ({})",
                client.0,
                dropped_in.join(", ")
            );
            self.log(log::Level::Info, text);
        }
    }

    // ---- workers' words -----------------------------------------------------------------------

    /// `started`: for a report, the highest seq it can have started (see `Event::Reported`).
    fn said(&mut self, id: WorkerId, said: WorkerSaid, started: u64, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if let Life::Killed {
            cause: life::KillCause::Violation { .. },
        } = worker.life
        {
            return; // being killed for it: nothing more it says counts
        }
        if worker.leaving.is_some() {
            return self.violation(id, "a frame after LEAVING".into());
        }
        // It speaks: a take-back may be worth asking again.
        worker.recall_futile = false;
        match said {
            WorkerSaid::Hold { paused } => {
                // Short of memory, the worker starts no job: the one at the head of its queue
                // has not started, so its job_timeout does not run meanwhile. A repeated HOLD
                // must not restart a job's clock.
                if let Life::Serving { holding } = &mut worker.life {
                    *holding = paused;
                }
                if !paused {
                    // Taking jobs: it has seen any take-back (it looked for a job since).
                    worker.stalled = false;
                }
                if paused {
                    let pool = &mut self.pools[worker.pool];
                    settle_busy(&mut pool.metrics, worker.head_started.take(), now);
                } else if worker.head_started.is_none() && worker.busy() {
                    worker.head_started = Some(now);
                }
            }
            WorkerSaid::Leaving { code, jobs_done } => {
                // Read when it exits (classify); meanwhile it gets no more jobs and is
                // replaced. It must then be gone soon: one that says LEAVING and stays would
                // otherwise let the pool fork without end.
                worker.leaving = Some(Leaving { code, jobs_done });
                worker.life.leaving(now);
            }
            WorkerSaid::Outcome { key, ok, body } => self.outcome(id, key, ok, body, now),
            WorkerSaid::Reported { key, report } => self.reported(id, key, report, started),
        }
    }

    /// A worker's progress or data for job `key`: taken only for the job it runs — its head,
    /// sent whole and claimed (it claims a job before it runs it) — and forwarded to the job's
    /// client if that watches it. Anything else is forged, like an outcome for a job it does not
    /// hold: the worker is killed, the job named left alone.
    fn reported(&mut self, id: WorkerId, key: u64, report: Reported, started: u64) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.life.overdue() == Some(key) {
            // Past its timeout, the job counts as timed out: nothing more of it goes out.
            return;
        }
        let runs = worker
            .in_flight
            .front()
            .is_some_and(|s| s.key == key && s.seq <= started);
        if !runs {
            let what = if worker.holds(key) {
                format!("a report for job {key} before it started it")
            } else {
                format!("a report for job {key}, which it does not hold")
            };
            return self.violation(id, what);
        }
        if let Reported::Data(data) = &report {
            worker.head_data = worker.head_data.saturating_add(data.len());
            if worker.head_data > crate::protocol::MAX_JOB_DATA {
                let what = format!(
                    "more than {} bytes of data for job {key}",
                    crate::protocol::MAX_JOB_DATA
                );
                return self.violation(id, what);
            }
        }
        let Some(job) = self.jobs.get(&key) else {
            return;
        };
        let (client, id) = job.client;
        if job.watch && self.connected.contains(&client) {
            self.out.push(Effect::Report { client, id, report });
        }
    }

    fn outcome(&mut self, id: WorkerId, key: u64, ok: bool, body: Vec<u8>, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.life.overdue() == Some(key) {
            // It finished after its timeout was declared: the job counts as timed out
            // (answered or retried when the worker is gone), never as a success.
            let text = format!(
                "worker {}: job {key} ended after passing job_timeout; its outcome is discarded",
                worker.pid
            );
            worker.in_flight.retain(|s| s.key != key);
            let pool = &mut self.pools[worker.pool];
            settle_busy(&mut pool.metrics, worker.head_started.take(), now);
            worker.head_data = 0;
            return self.log(log::Level::Info, text);
        }
        if !worker.holds(key) {
            // A worker speaks only for its own jobs: another's result must not reach the
            // other's client. That job is left as it is, for the worker that holds it.
            let what = format!("an outcome for job {key}, which it does not hold");
            return self.violation(id, what);
        }
        if worker.in_flight.front().map(|s| s.key) != Some(key) {
            // An honest worker runs its jobs in order: answering a later one first would
            // restart the clock of the one it runs (and hide a hung job from job_timeout).
            let what = format!("an outcome for job {key} before the job it runs");
            return self.violation(id, what);
        }
        worker.in_flight.pop_front();
        worker.head_data = 0;
        worker.jobs_done += 1;
        let pool = worker.pool;
        if let Some(started) = worker.head_started {
            let took = now.saturating_duration_since(started);
            let pool = &mut self.pools[pool];
            pool.job_times.note(took);
            pool.metrics.duration.observe(took.as_secs_f64());
            pool.metrics.busy_seconds += took.as_secs_f64();
        }
        worker.head_started = worker.busy().then_some(now);
        self.pools[pool].last_result = Some(now);
        // An honest worker turns a larger result into the job's failure itself; the master's
        // channel lets through a frame of up to 16 MiB (a job's data), so it checks too.
        let (ok, body) = if body.len() as u64 > self.settings.max_result {
            let text = format!(
                "result too large ({} bytes, max_result is {})",
                body.len(),
                self.settings.max_result
            );
            (false, text.into_bytes())
        } else {
            (ok, body)
        };
        let stats = &mut self.pools[pool].stats;
        if ok {
            stats.done += 1;
        } else {
            stats.failed += 1;
        }
        self.answer(key, if ok { Status::Ok } else { Status::Failed }, body);
    }

    /// A worker wrote what no honest worker writes: it runs plugin code, so it may write
    /// anything. Kill it; nothing more it sends is read; its exit is a crash.
    fn violation(&mut self, id: WorkerId, what: String) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let text = format!(
            "worker {} (pool {}) broke the protocol: it sent {what}; killing it",
            worker.pid, self.pools[worker.pool].config.name
        );
        worker.life.violated(format!("it sent {what}"));
        self.signal(id, Signal::SIGKILL);
        self.out.push(Effect::Forget { worker: id });
        self.log(log::Level::Error, text);
    }

    // ---- workers' ends ------------------------------------------------------------------------

    /// `started`: the highest seq the worker can have started (sent whole, and claimed).
    fn exited(
        &mut self,
        id: WorkerId,
        status: WaitStatus,
        board: Report,
        started: u64,
        now: Instant,
    ) {
        let Some(mut worker) = self.workers.remove(&id) else {
            return;
        };
        let pool_idx = worker.pool;
        let redis = self.pools[pool_idx].config.redis.is_some();
        if self.pools[pool_idx].config.engine().is_some() {
            // An engine's jobs never pass through the master: only the worker can count them.
            let said = worker.leaving.map_or(0, |l| l.jobs_done);
            worker.jobs_done = board.jobs_done.max(said);
            let stats = &mut self.pools[pool_idx].stats;
            // The worker's word: bounded, never an overflow.
            stats.done = stats
                .done
                .saturating_add(board.jobs_done.saturating_sub(board.jobs_failed));
            stats.failed = stats
                .failed
                .saturating_add(board.jobs_failed.min(board.jobs_done));
        }
        let lived = now.saturating_duration_since(worker.started);
        let ending = life::classify(
            status,
            &worker.life,
            worker.leaving,
            worker.jobs_done,
            &self.pools[pool_idx].config,
            lived,
        );
        let name = self.pools[pool_idx].config.name.clone();
        let text = format!(
            "worker {} (pool {name}, generation {}, {} jobs in {lived:.1?}) {}",
            worker.pid,
            worker.generation,
            worker.jobs_done,
            ending.describe()
        );
        let level = if ending.is_crash() {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        self.log(level, text);

        // Its jobs. The one it ran failed with it (a crash) or ran past its timeout; the rest
        // never started and go back to the front of the queue as they were. A worker that
        // left cleanly said so between two jobs: none of its jobs had started.
        let overdue = worker.life.overdue();
        let ran = match &ending {
            // A job past its timeout is lost whatever else the worker did afterwards.
            _ if overdue.is_some_and(|k| self.jobs.contains_key(&k)) => overdue,
            Ending::KilledOnTimeout(_) => None,
            Ending::BootFailed => None,
            // The head ran if the worker had it whole and claimed it.
            e if e.is_crash() => worker
                .in_flight
                .front()
                .filter(|s| s.seq <= started)
                .map(|s| s.key),
            _ => None,
        };
        // A crash while running a job that already took another worker down is that job's
        // doing, not a sign the pool cannot start: it uses up the job's attempts only. Only a
        // pool whose workers produced a result lately can be said to start workers fine:
        // otherwise a crash in worker_start, with a job already sent, would pass for the
        // job's fault.
        let pool = &self.pools[pool_idx];
        let pool_works = pool
            .last_result
            .is_some_and(|t| now.saturating_duration_since(t) < pool.config.crash_window);
        let (job_to_blame, earlier_blame) = ran
            .and_then(|key| self.jobs.get(&key))
            .map_or((false, None), |j| {
                (pool_works && j.failures > 0, j.blamed_crash)
            });
        let mut jobs: Vec<u64> = worker.in_flight.iter().map(|s| s.key).collect();
        if let Some(key) = ran {
            jobs.retain(|k| *k != key);
        }
        while let Some(key) = jobs.pop() {
            self.requeue_front(key, now);
        }
        // The retry goes first: it waited longest, and a fresh worker then meets a job that
        // crashed before (which tells poison from a crash loop) rather than an untried one.
        if let Some(key) = ran {
            // A job past its timeout is a timed-out job, however its worker then ended.
            let timed_out = Ending::KilledOnTimeout(
                self.pools[pool_idx].config.job_timeout.unwrap_or_default(),
            );
            let why = if overdue == Some(key) {
                &timed_out
            } else {
                &ending
            };
            self.job_lost(key, why, now);
        }
        if let (true, Some(at)) = (job_to_blame, earlier_blame) {
            // The crash it caused before, counted against the pool, was its doing too.
            self.pools[pool_idx].backoff.forgive(at, now);
        }

        // A worker that leaves before its first result, unasked, cannot get going — crashing,
        // or exiting cleanly at once (a max_rss under what it starts with, worker_start
        // failing): forking it again at once would be a loop. So is one that crashes before
        // its first result, unless the job it ran is to blame.
        let unasked_early = worker.jobs_done == 0
            && !worker.life.asked()
            && ending != Ending::Recycled(Limit::MaxLifetime);
        if redis {
            // Its pending entries (and those it was still to take over) go to the next worker.
            let pool = &mut self.pools[pool_idx];
            pool.predecessors.append(&mut worker.inherited);
            pool.predecessors.push(Predecessor {
                consumer: crate::worker::redis::consumer_name(&name, worker.pid.as_raw() as u32),
                why: ending.job_reason(),
                // What it was running then: only that entry used up an attempt (the
                // worker's word: a stream id or nothing).
                running: board
                    .running
                    .filter(|id| crate::scoreboard::is_stream_id(id)),
            });
        }
        match &ending {
            Ending::PluginStopped => {
                self.pools[pool_idx].stopped = true;
                self.log(
                    log::Level::Info,
                    format!("pool {name} stopped by its plugin; `restart` it to start it again"),
                );
            }
            e if e.is_crash() && job_to_blame => {
                self.log(
                    log::Level::Info,
                    format!(
                        "pool {name}: the crash is its job's (it crashed a worker before); no back-off"
                    ),
                );
            }
            // A worker that had finished jobs died of a job (or of an outside kill): replace it
            // at once.
            e if e.is_crash() && worker.jobs_done > 0 => {}
            e if e.is_crash() || unasked_early => {
                let pool = &mut self.pools[pool_idx];
                let was_failing = pool.backoff.is_failing(now);
                let delay = pool.backoff.crashed(now);
                let failing = pool.backoff.is_failing(now);
                let (limit, window, retry) = (
                    pool.config.crash_limit,
                    pool.config.crash_window,
                    pool.config.failing_retry,
                );
                if let Some(job) = ran.and_then(|key| self.jobs.get_mut(&key)) {
                    job.blamed_crash = Some(now); // forgiven if the job crashes another
                }
                if failing && !was_failing {
                    self.log(
                        log::Level::Error,
                        format!(
                            "pool {name} is failing: {limit} crashes within {window:?}; trying one worker every {retry:?}"
                        ),
                    );
                } else if !delay.is_zero() {
                    self.log(
                        log::Level::Info,
                        format!("pool {name}: next worker in {delay:?} (crash back-off)"),
                    );
                }
            }
            _ => {}
        }
        self.pools[pool_idx].stats.count_exit(ending.kind());
        // The job it was on ended with it: its time was busy time.
        settle_busy(&mut self.pools[pool_idx].metrics, worker.head_started, now);
        let reason = match &ending {
            Ending::Crashed { .. } => ExitReason::Crash,
            Ending::BootFailed => ExitReason::BootFailed,
            Ending::KilledOnTimeout(_) => ExitReason::Timeout,
            Ending::Recycled(Limit::MaxJobs) => ExitReason::RecycleMaxJobs,
            Ending::Recycled(Limit::MaxLifetime) => ExitReason::RecycleMaxLifetime,
            Ending::Recycled(Limit::MaxRss) => ExitReason::RecycleMaxRss,
            Ending::Stopped => ExitReason::Stop,
            Ending::PluginStopped => ExitReason::PluginStop,
        };
        self.pools[pool_idx].metrics.exit(reason);
        let kind = match reason {
            ExitReason::Crash => Some("crash"),
            ExitReason::BootFailed => Some("boot-failed"),
            ExitReason::Timeout => Some("timeout"),
            _ => None,
        };
        if let Some(kind) = kind {
            self.remember(Recent {
                at: now,
                kind,
                pool: Some(name.clone()),
                pid: Some(worker.pid.as_raw()),
                reason: ending.describe(),
            });
        }
        self.delete_unused_copies();
    }

    /// The job's worker died while running it: retry it elsewhere, or fail it for good.
    fn job_lost(&mut self, key: u64, ending: &Ending, now: Instant) {
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        job.failures += 1;
        let failures = job.failures;
        let pool = &mut self.pools[job.pool];
        let max = pool.config.max_attempts;
        let why = ending.job_reason();
        if failures >= max || stopping {
            pool.stats.failed += 1;
            let message = format!("{why}, attempt {failures} of {max}");
            self.answer(key, Status::Failed, message.into_bytes());
        } else if !job.detach && !self.connected.contains(&job.client.0) {
            // Its client has gone: a retry would run for nobody.
            pool.stats.dropped = pool.stats.dropped.saturating_add(1);
            self.jobs.remove(&key);
        } else {
            pool.stats.retried += 1;
            job.queued_at = now;
            pool.queue.push_front(key);
            self.log(
                log::Level::Info,
                format!(
                    "retrying job {key} on another worker ({why}, attempt {failures} of {max})"
                ),
            );
        }
    }

    fn requeue_front(&mut self, key: u64, now: Instant) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        job.queued_at = now;
        if matches!(self.phase, Phase::Stopping { .. }) {
            self.answer(key, Status::Failed, b"shutting down".to_vec());
        } else if !job.detach && !self.connected.contains(&job.client.0) {
            // Given back after its client went away: nobody would hear of it.
            let pool = &mut self.pools[job.pool];
            pool.stats.dropped = pool.stats.dropped.saturating_add(1);
            self.jobs.remove(&key);
        } else {
            self.pools[job.pool].queue.push_front(key);
        }
    }

    // ---- spawning -----------------------------------------------------------------------------

    fn spawn_missing(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
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
                let worker = WorkerId(self.next_worker);
                self.next_worker += 1;
                // The first one forked takes over what ended workers left (a redis pool).
                let predecessors = std::mem::take(&mut self.pools[idx].predecessors);
                self.out.push(Effect::Spawn {
                    worker,
                    pool: idx,
                    generation: self.generation,
                    predecessors,
                });
            }
        }
    }

    fn spawned(
        &mut self,
        id: WorkerId,
        pool: usize,
        pid: Pid,
        predecessors: Vec<Predecessor>,
        now: Instant,
    ) {
        let Some(p) = self.pools.get(pool) else {
            return;
        };
        let (hash, text) = (
            p.hash,
            format!("worker {pid} started for pool {}", p.config.name),
        );
        if p.config.engine().is_some() && self.next_watch.is_none() {
            self.next_watch = Some(now + WATCH_MIN);
        }
        self.log(log::Level::Debug, text);
        self.workers.insert(
            id,
            Worker {
                pid,
                pool,
                generation: self.generation,
                hash,
                started: now,
                life: Life::Serving { holding: false },
                in_flight: VecDeque::new(),
                last_seq: 0,
                head_started: None,
                jobs_done: 0,
                leaving: None,
                inherited: predecessors,
                stalled: false,
                recall_futile: false,
                head_claimed: None,
                head_data: 0,
                recalling: false,
                slow_logged: None,
            },
        );
        // Forked in this pass's Tick, after its dispatch: its jobs now, not at the next wake.
        self.dispatch_pool(pool, now);
        self.notify_ready_once();
    }

    /// The master's own shortage (fds, processes), not the pool's crash: pause every fork for
    /// a moment, and say so once per pause.
    fn spawn_failed(
        &mut self,
        pool: usize,
        mut predecessors: Vec<Predecessor>,
        error: String,
        now: Instant,
    ) {
        let Some(p) = self.pools.get_mut(pool) else {
            return;
        };
        predecessors.append(&mut p.predecessors);
        p.predecessors = predecessors;
        if self.spawn_paused_until.is_some_and(|t| now < t) {
            return;
        }
        let text = format!(
            "cannot start a worker for pool {}: {error}; trying again in {SPAWN_PAUSE:?}",
            p.config.name
        );
        self.spawn_paused_until = Some(now + SPAWN_PAUSE);
        self.log(log::Level::Error, text);
    }

    // ---- deadlines ----------------------------------------------------------------------------

    /// The timer pass: every worker whose deadline has passed moves on in its life. The shell
    /// has read what the suspects had to say first ([`Supervisor::to_refresh`]): a timeout is
    /// declared only when no outcome was waiting.
    fn enforce_deadlines(&mut self, now: Instant) {
        if self.next_watch.is_some_and(|t| now >= t) {
            self.next_watch = self.watch_interval().map(|every| now + every);
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            let Some(w) = self.workers.get_mut(&id) else {
                continue;
            };
            let pool = &self.pools[w.pool].config;
            if w.slow_due(pool.slow_job).is_some_and(|t| now >= t) {
                w.slow_logged = w.head_started;
                let slow = slow_job(id, w, pool, &self.jobs, now, None);
                self.out.push(Effect::SlowJob(slow));
            }
            let timeout = pool.job_timeout;
            let due = w.job_due(timeout);
            if w.life.deadline(due).is_none_or(|d| now < d) {
                continue;
            }
            let head = w.in_flight.front().map(|s| s.key);
            // What it is doing, read before it is signalled (the effect goes first).
            let dying = slow_job(id, w, pool, &self.jobs, now, timeout);
            let Some((kill, stepped)) = w.life.step(now, due, head) else {
                continue;
            };
            if matches!(stepped, Stepped::TimedOut { .. }) {
                self.out.push(Effect::SlowJob(dying));
            }
            let text = match stepped {
                Stepped::TimedOut { draining } => format!(
                    "worker {} (pool {}{}): job ran past job_timeout {:?}; {}SIGKILL in {KILL_GRACE:?}",
                    w.pid,
                    pool.name,
                    if draining { ", draining" } else { "" },
                    timeout.unwrap_or_default(),
                    if draining { "" } else { "SIGTERM, " }
                ),
                Stepped::KilledLate => format!("worker {} did not exit in time; SIGKILL", w.pid),
            };
            self.log(log::Level::Warn, text);
            if let Some(kill) = kill {
                self.signal(id, kill.signal());
            }
        }
        if let Phase::Stopping { deadline } = self.phase {
            if now >= deadline {
                let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
                for id in ids {
                    if let Some(w) = self.workers.get_mut(&id) {
                        if w.life.kill_now() {
                            self.signal(id, Signal::SIGKILL);
                        }
                    }
                }
            }
        }
    }

    /// How often to read the engine-fed workers' slots: `WATCH_EVERY`, or a quarter of the
    /// shortest job_timeout among them; `None` with no such worker.
    fn watch_interval(&self) -> Option<Duration> {
        self.workers
            .values()
            .filter_map(|w| {
                let pool = &self.pools[w.pool].config;
                pool.engine()?;
                let shortest = match (pool.job_timeout, pool.slow_job) {
                    (Some(a), Some(b)) => a.min(b),
                    (a, b) => a.or(b)?,
                };
                Some((shortest / 4).clamp(WATCH_MIN, WATCH_EVERY))
            })
            .min()
    }

    fn notify_ready_once(&mut self) {
        if self.ready_notified || !matches!(self.phase, Phase::Running) {
            return;
        }
        let all_up = (0..self.pools.len())
            .all(|i| self.pools[i].stopped || self.live_workers(i) >= self.pools[i].wanted);
        if all_up {
            self.ready_notified = true;
            self.out.push(Effect::Notify(format!(
                "READY=1\nSTATUS=serving {} pool(s)",
                self.pools.len()
            )));
        }
    }

    // ---- dispatch -----------------------------------------------------------------------------

    /// Queued jobs to the least-loaded workers of their pool — ahead of time (prefetch) only
    /// to a worker whose running job is not taking longer than the pool's jobs usually do:
    /// prefetch never holds a job longer than it would wait in the queue. And when a worker
    /// of the pool is idle while another holds jobs it has not started behind a long one,
    /// those are taken back (see [`Effect::Recall`]) for the idle one.
    fn dispatch(&mut self, now: Instant) {
        for idx in 0..self.pools.len() {
            self.dispatch_pool(idx, now);
            if let (Some(id), _) = self.recall_due(idx, now) {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.recalling = true;
                    self.out.push(Effect::Recall { worker: id });
                }
            }
        }
    }

    fn dispatch_pool(&mut self, idx: usize, now: Instant) {
        if self.pools[idx].queue.is_empty() {
            return;
        }
        let max_jobs = self.pools[idx].config.max_jobs;
        let prefetch = self.pools[idx].job_times.prefetch();
        let patience = self.pools[idx].job_times.patience();
        // The workers that may take jobs now, with how many more each may take: what it holds
        // against the prefetch, and never more than it will run before max_jobs recycles it.
        // (Into a kept buffer: this runs on every pass with jobs queued.)
        let mut room = std::mem::take(&mut self.room);
        room.extend(
            self.workers
                .iter()
                .filter(|(_, w)| {
                    w.pool == idx
                    && w.life.takes_jobs()
                    && !w.recalling
                    && !w.stalled()
                    // Behind a job that takes long, a job waits less in the queue.
                    && w.head_started.is_none_or(|t| now.saturating_duration_since(t) < patience)
                })
                .filter_map(|(id, w)| {
                    let by_prefetch = prefetch.saturating_sub(w.queued());
                    let by_max_jobs = max_jobs.map_or(usize::MAX, |max| {
                        usize::try_from(max.saturating_sub(w.jobs_done + w.queued() as u64))
                            .unwrap_or(usize::MAX)
                    });
                    let room = by_prefetch.min(by_max_jobs);
                    (room > 0).then_some((w.queued(), *id, room))
                }),
        );
        while !room.is_empty() {
            // The least loaded first (the lowest id among equals).
            let Some(best) = (0..room.len()).min_by_key(|&i| (room[i].0, room[i].1)) else {
                break;
            };
            let target = room[best].1;
            let Some(key) = self.pools[idx].queue.pop_front() else {
                break;
            };
            let Some(job) = self.jobs.get(&key) else {
                continue;
            };
            let payload = Rc::clone(&job.payload);
            let waited = now.saturating_duration_since(job.queued_at);
            self.pools[idx]
                .metrics
                .queue_wait
                .observe(waited.as_secs_f64());
            let Some(worker) = self.workers.get_mut(&target) else {
                break;
            };
            worker.last_seq += 1;
            let seq = worker.last_seq;
            worker.in_flight.push_back(Sent { seq, key });
            if worker.in_flight.len() == 1 {
                worker.head_started = Some(now);
            }
            self.out.push(Effect::Send {
                worker: target,
                seq,
                key,
                payload,
            });
            room[best].0 += 1;
            room[best].2 -= 1;
            if room[best].2 == 0 {
                room.swap_remove(best);
            }
        }
        room.clear();
        self.room = room;
    }

    /// Pool `idx`: the worker to take jobs back from now, if any (a worker of the pool is idle,
    /// the queue is empty, and another holds jobs it has not started behind a job running past
    /// the pool's patience, or while it holds back); and otherwise when that may next be so.
    fn recall_due(&self, idx: usize, now: Instant) -> (Option<WorkerId>, Option<Instant>) {
        if !self.pools[idx].queue.is_empty() || self.pools[idx].config.engine().is_some() {
            return (None, None);
        }
        let max_jobs = self.pools[idx].config.max_jobs;
        let idle = self.workers.values().any(|w| {
            w.pool == idx
                && w.life.takes_jobs()
                && !w.busy()
                && !w.recalling
                && !w.stalled()
                && max_jobs.is_none_or(|max| w.jobs_done < max)
        });
        if !idle {
            return (None, None);
        }
        let patience = self.pools[idx].job_times.patience();
        let mut best: Option<(usize, WorkerId)> = None;
        let mut next: Option<Instant> = None;
        for (id, w) in &self.workers {
            if w.pool != idx
                || w.recalling
                || w.recall_futile
                || !matches!(w.life, Life::Serving { .. } | Life::Draining { .. })
            {
                continue;
            }
            // Holding back, it starts nothing: all it holds may go, now. Else what may not have
            // started (its claim decides), once its head has waited or run past patience.
            let head_once_taken = w
                .in_flight
                .front()
                .and_then(|s| self.jobs.get(&s.key))
                .is_some_and(|j| j.taken_as_head);
            let (waiting, since) = if w.life.holding() {
                (w.queued(), Some(now))
            } else if head_once_taken {
                (w.queued() - 1, w.head_started.map(|t| t + patience))
            } else {
                (w.maybe_unstarted(), w.head_started.map(|t| t + patience))
            };
            let Some(due) = since else { continue };
            if waiting == 0 {
                continue;
            }
            if due <= now {
                if best.is_none_or(|(n, _)| waiting > n) {
                    best = Some((waiting, *id));
                }
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        match best {
            Some((_, id)) => (Some(id), None),
            None => (None, next),
        }
    }

    /// The shell took back from `id` every job numbered above `started_through`.
    fn recalled(&mut self, id: WorkerId, started_through: u64, written_through: u64, now: Instant) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        // The worker's word (its claim) is bounded by what reached it: frames above
        // `written_through` never did, and the shell took them back.
        let started_through = started_through.min(written_through);
        let mut taken = Vec::new();
        while w.in_flight.back().is_some_and(|s| s.seq > started_through) {
            if let Some(sent) = w.in_flight.pop_back() {
                taken.push(sent.key);
            }
        }
        // Frames never written are gone from its socketpair: the next is numbered after the
        // last one it may have seen.
        w.last_seq = written_through.max(w.in_flight.back().map_or(0, |s| s.seq));
        // What is left has started (its head, if anything): not asked for again.
        let old_head = w.in_flight.front().map(|s| s.seq);
        w.head_claimed = old_head;
        if taken.is_empty() {
            w.recall_futile = true;
            w.recalling = false;
            return;
        }
        if w.in_flight.is_empty() {
            // Nothing it holds has started: it runs nothing. (The time since it was sent its
            // head counted as busy, and a counter never goes back.)
            let pool = &mut self.pools[w.pool];
            settle_busy(&mut pool.metrics, w.head_started.take(), now);
        }
        // Fenced (frames it was written are taken back): it is sent nothing until it has seen
        // that. Only never-written frames taken: it has shown nothing wrong.
        if started_through < written_through {
            w.stalled = true;
        }
        let text = format!(
            "worker {}: took back {} job(s) it had not started, for an idle worker",
            w.pid,
            taken.len()
        );
        // The job it had at its head, if taken: never again as a head (it may only have been
        // slow to arrive — a large payload — and must not bounce between workers).
        if old_head.is_none() {
            if let Some(&head) = taken.last() {
                if let Some(job) = self.jobs.get_mut(&head) {
                    job.taken_as_head = true;
                }
            }
        }
        // In their order, at the front: they waited longest.
        for key in taken {
            self.requeue_front(key, now);
        }
        self.log(log::Level::Debug, text);
        // To the others first: it is still `recalling` here, so not a candidate.
        self.dispatch(now);
        if let Some(w) = self.workers.get_mut(&id) {
            w.recalling = false;
        }
    }

    // ---- reload -------------------------------------------------------------------------------

    /// SIGHUP or `reload`: starts a reload, or — while one runs — queues another, so the config
    /// as it is now is what gets loaded. An admin session is answered with the outcome.
    fn request_reload(&mut self, from: Origin) {
        let waiter = match from {
            Origin::Admin(session) => Some(session),
            Origin::Signal(_) => None,
        };
        if let Some(reloading) = &mut self.reloading {
            reloading.again.get_or_insert_with(Vec::new).extend(waiter);
            return;
        }
        if let Phase::Stopping { .. } = self.phase {
            let report = ReloadReport {
                at: String::new(),
                ok: false,
                message: CommandError::ShuttingDown.to_string(),
            };
            if let Some(session) = waiter {
                self.out.push(Effect::Reply {
                    session,
                    reply: Reply::Reloaded(report),
                });
            }
            return;
        }
        self.out.push(Effect::Notify("RELOADING=1".into()));
        self.reloading = Some(Reloading {
            waiters: waiter.into_iter().collect(),
            again: None,
        });
        self.out.push(Effect::PrepareReload);
    }

    /// A shutdown while a reload runs: its probes go (the shell reports `ReloadFailed`), its
    /// waiters hear why.
    fn abandon_reload(&mut self) {
        if self.reloading.is_some() {
            self.out.push(Effect::AbandonReload);
        }
    }

    /// Records the outcome for `status`, logs it, tells systemd and the waiting sessions; runs
    /// the reload asked for meanwhile.
    fn reload_finished(&mut self, outcome: Result<String, String>, at: String, now: Instant) {
        let Some(reloading) = self.reloading.take() else {
            return;
        };
        self.last_reload_at = Some(now);
        match &outcome {
            Ok(_) => self.reloads.0 = self.reloads.0.saturating_add(1),
            Err(reason) => {
                self.reloads.1 = self.reloads.1.saturating_add(1);
                self.remember(Recent {
                    at: now,
                    kind: "reload-failed",
                    pool: None,
                    pid: None,
                    reason: reason.clone(),
                });
            }
        }
        // Whether or not it worked, the master serves again (systemd waits for this) — if it
        // had said it was ready in the first place.
        if self.ready_notified {
            self.out.push(Effect::Notify("READY=1".into()));
        }
        let report = match outcome {
            Ok(summary) => {
                self.log(
                    log::Level::Info,
                    format!("reload ok (generation {}): {summary}", self.generation),
                );
                ReloadReport {
                    at,
                    ok: true,
                    message: summary,
                }
            }
            Err(reason) => {
                self.log(
                    log::Level::Error,
                    format!("reload failed, nothing changed: {reason}"),
                );
                ReloadReport {
                    at,
                    ok: false,
                    message: reason,
                }
            }
        };
        self.last_reload = Some(report.clone());
        for session in reloading.waiters {
            self.out.push(Effect::Reply {
                session,
                reply: Reply::Reloaded(report.clone()),
            });
        }
        if let Some(again) = reloading.again {
            // Asked again meanwhile: load the config as it is now.
            if let Phase::Stopping { .. } = self.phase {
                for session in again {
                    self.out.push(Effect::Reply {
                        session,
                        reply: Reply::Reloaded(report.clone()),
                    });
                }
                return;
            }
            self.out.push(Effect::Notify("RELOADING=1".into()));
            self.reloading = Some(Reloading {
                waiters: again,
                again: None,
            });
            self.out.push(Effect::PrepareReload);
        }
    }

    /// Phase 2 of a reload: every new build loaded and `init`ed. Nothing here can fail.
    /// Unchanged pools keep their workers; changed pools get new-generation workers while
    /// the old ones finish their job and leave; removed pools drain their queue and stop;
    /// added pools start.
    fn apply_reload(&mut self, plan: ReloadPlan, now: Instant) -> Result<String, String> {
        if let Phase::Stopping { .. } = self.phase {
            return Err(CommandError::ShuttingDown.to_string());
        }
        self.generation += 1;
        let generation = self.generation;
        self.settings = plan.settings;
        let (mut kept, mut replaced, mut added) = (Vec::new(), Vec::new(), Vec::new());
        let mut still_here = Vec::new();
        for entry in plan.pools {
            match entry {
                PlanEntry::Keep { pool: idx, config } => {
                    kept.push(config.name.clone());
                    let pool = &mut self.pools[idx];
                    pool.wanted = config.workers;
                    pool.config = config;
                    self.trim_pool(idx, now);
                    still_here.push(idx);
                }
                PlanEntry::Replace {
                    pool: idx,
                    config,
                    build,
                } => {
                    replaced.push(format!(
                        "{} ({} {})",
                        config.name, build.plugin, build.version
                    ));
                    let pool = &mut self.pools[idx];
                    pool.hash = build.hash;
                    pool.plugin = build.plugin;
                    pool.plugin_version = build.version;
                    pool.wanted = config.workers;
                    pool.config = config;
                    pool.stopped = false;
                    pool.retiring = false;
                    pool.backoff.reset();
                    // Its old workers finish their job and leave; the wanted count forks
                    // new-generation ones at once.
                    let deadline = now + self.settings.graceful_timeout;
                    let old: Vec<WorkerId> = self
                        .workers
                        .iter()
                        .filter(|(_, w)| w.pool == idx && w.generation < generation)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in old {
                        self.stop_worker(id, deadline);
                    }
                    still_here.push(idx);
                }
                PlanEntry::Add { config, build } => {
                    added.push(config.name.clone());
                    self.pools
                        .push(Pool::new(config, build.plugin, build.version, build.hash));
                    still_here.push(self.pools.len() - 1);
                }
            }
        }
        // Pools no longer in the config: no new jobs; they drain their queue, then stop.
        let mut removed = Vec::new();
        for idx in 0..self.pools.len() {
            if still_here.contains(&idx) || self.pools[idx].retiring {
                continue;
            }
            self.pools[idx].retiring = true;
            let name = self.pools[idx].config.name.clone();
            if self.pools[idx].stopped {
                // Stopped by an operator: its queue will not run; answer it now.
                let reason = format!("pool {name} was removed from the config while stopped");
                while let Some(key) = self.pools[idx].queue.pop_front() {
                    self.answer(key, Status::Failed, reason.clone().into_bytes());
                }
            }
            removed.push(name);
        }
        self.pool_index = still_here
            .iter()
            .map(|&i| (self.pools[i].config.name.clone(), i))
            .collect();
        self.delete_unused_copies();
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        Ok(format!(
            "generation {generation}: kept {}; replaced {}; added {}; removed {}",
            list(&kept),
            list(&replaced),
            list(&added),
            list(&removed)
        ))
    }

    /// Retiring pools: once nothing is queued or in flight, their workers go. Jobs that come
    /// back to the queue afterwards (a worker died) bring a worker back to finish them.
    fn retire_pools(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        for idx in 0..self.pools.len() {
            if !self.pools[idx].retiring {
                continue;
            }
            if self.pools[idx].stopped {
                // Removed while stopped by an operator: its queue will not run (no `start`
                // can name it now), including jobs its draining workers gave back.
                let reason = format!(
                    "pool {} was removed from the config while stopped",
                    self.pools[idx].config.name
                );
                while let Some(key) = self.pools[idx].queue.pop_front() {
                    self.answer(key, Status::Failed, reason.clone().into_bytes());
                }
            }
            let pool = &self.pools[idx];
            let in_flight = self.workers.values().any(|w| w.pool == idx && w.busy());
            let drained = pool.queue.is_empty() && !in_flight;
            if drained && pool.wanted == 0 && !pool.ended {
                if !self.workers.values().any(|w| w.pool == idx) {
                    // Gone for good: free what its init built in the master (the build stays
                    // mapped; its private copy is deleted once unused).
                    let text = format!(
                        "pool {} (removed from the config) is gone",
                        pool.config.name
                    );
                    self.pools[idx].ended = true;
                    self.out.push(Effect::DropInstance { pool: idx });
                    self.log(log::Level::Info, text);
                }
            } else if drained && pool.wanted > 0 {
                let text = format!(
                    "pool {} (removed from the config) has drained; stopping its workers",
                    pool.config.name
                );
                self.log(log::Level::Info, text);
                self.pools[idx].wanted = 0;
                self.trim_pool(idx, now);
            } else if !pool.queue.is_empty() && pool.wanted == 0 {
                self.pools[idx].wanted = pool.config.workers.max(1);
            }
        }
    }

    /// Asks the shell to delete the private copies of builds that no pool and no live worker
    /// uses.
    fn delete_unused_copies(&mut self) {
        let mut in_use: Vec<ContentHash> = self
            .pools
            .iter()
            .filter(|p| !p.retiring || p.wanted > 0)
            .map(|p| p.hash)
            .collect();
        in_use.extend(self.workers.values().map(|w| w.hash));
        self.out.push(Effect::DeleteUnusedCopies { in_use });
    }
}
