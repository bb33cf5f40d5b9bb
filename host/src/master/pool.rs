//! A pool as the master supervises it: how many workers it wants, its queue of jobs, its
//! counters, and the crash back-off that keeps a broken plugin from making the master fork in
//! a tight loop. Pure state and decisions — no processes, no I/O — so it is unit-tested.

mod fair_queue;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::PoolConfig;

pub use fair_queue::FairQueue;

/// The first delay after a crash; doubles with each crash in the window.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The longest delay while backing off (before the pool counts as failing).
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Jobs a worker holds at least: the one it runs. Jobs of a few milliseconds or more are
/// not sent ahead — one waiting behind a running job would wait longer than in the queue,
/// where the first worker to finish takes it; the master's round trip between two such jobs
/// costs a few percent at most ...
const PREFETCH_MIN: usize = 1;
/// ... and at most, for jobs so short that the master's round trip would dominate.
const PREFETCH_MAX: usize = 64;
/// While nothing is known of the pool's jobs: a few, in case they are short (a job that
/// turns out long does not hold the others: they are taken back for an idle worker).
const PREFETCH_UNKNOWN: usize = 4;
/// A worker is sent about this much work ahead (by the pool's recent job durations).
const PREFETCH_AHEAD: Duration = Duration::from_millis(2);
/// A job that has run this long (at least; see [`JobTimes::patience`]) is taking longer than
/// the pool's jobs usually do: the jobs queued behind it in its worker may be taken back.
/// Well above a scheduler's time slice: on a busy machine a worker (or the master) is often
/// off the CPU for a few milliseconds, and that is no reason to move its jobs.
const PATIENCE_MIN: Duration = Duration::from_millis(50);

/// What an operator sees for a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolState {
    Ok,
    /// Recent crashes: replacements are delayed.
    BackingOff,
    /// `crash_limit` crashes within `crash_window`: one retry per `failing_retry`.
    Failing,
    /// Stopped by the plugin (loop mode) or an operator: not refilled.
    Stopped,
    /// Removed from the config by a reload: runs its queue to the end, takes no new jobs.
    Removed,
}

impl PoolState {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolState::Ok => "ok",
            PoolState::BackingOff => "backing-off",
            PoolState::Failing => "failing",
            PoolState::Stopped => "stopped",
            PoolState::Removed => "removed",
        }
    }
}

/// How a worker's exit counts in `status`: whether something went wrong, and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Died unasked: killed by a signal nobody sent it for a reason, an exit without a
    /// matching LEAVING, a failed `worker_start`, a protocol violation.
    Crash,
    /// Killed because its job ran past `job_timeout`.
    Timeout,
    /// Left at a limit: `max_jobs`, `max_lifetime`, `max_rss`.
    Recycle,
    /// Left because it was asked to (scale-down, TTOU, restart, reload, `stop POOL`,
    /// shutdown) or because its loop-mode plugin said Stop.
    Stop,
}

/// Counters shown by `status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub done: u64,
    pub failed: u64,
    pub retried: u64,
    /// Queued jobs dropped unrun because their client went away (and had not detached them).
    pub dropped: u64,
    /// Worker exits, by [`ExitKind`].
    pub crashes: u64,
    pub timeouts: u64,
    pub recycled: u64,
    pub stopped: u64,
}

impl PoolStats {
    /// Counts one worker's exit.
    pub fn count_exit(&mut self, kind: ExitKind) {
        let counter = match kind {
            ExitKind::Crash => &mut self.crashes,
            ExitKind::Timeout => &mut self.timeouts,
            ExitKind::Recycle => &mut self.recycled,
            ExitKind::Stop => &mut self.stopped,
        };
        *counter = counter.saturating_add(1);
    }
}

pub struct Pool {
    pub config: PoolConfig,
    /// The plugin's name and version, for `status`.
    pub plugin: String,
    pub plugin_version: String,
    /// The plugin build its instance comes from.
    pub hash: crate::plugins::ContentHash,
    /// Removed from the config by a reload: takes no new jobs, drains its queue, then stops.
    pub retiring: bool,
    /// Removed and drained: its plugin instance in the master is freed; only its counters
    /// are left.
    pub ended: bool,
    pub wanted: usize,
    /// Jobs accepted and not yet sent to a worker, shared fairly between clients.
    pub queue: FairQueue,
    pub stats: PoolStats,
    /// The finer counts and histograms of `metrics` (`crate::metrics`).
    pub metrics: crate::metrics::PoolMetrics,
    pub stopped: bool,
    pub backoff: Backoff,
    /// Recent job durations: how many jobs a worker is sent ahead.
    pub job_times: JobTimes,
    /// A redis pool: ended workers whose pending entries the next worker forked takes over.
    pub predecessors: Vec<crate::worker::redis::Predecessor>,
    /// When a worker of this pool last produced a result: evidence that it starts workers
    /// fine, which lets a crash be blamed on its job.
    pub last_result: Option<Instant>,
}

impl Pool {
    pub fn new(
        config: PoolConfig,
        plugin: String,
        plugin_version: String,
        hash: crate::plugins::ContentHash,
    ) -> Pool {
        Pool {
            hash,
            retiring: false,
            plugin,
            plugin_version,
            wanted: config.workers,
            backoff: Backoff::new(
                config.crash_limit,
                config.crash_window,
                config.failing_retry,
            ),
            config,
            ended: false,
            queue: FairQueue::default(),
            stats: PoolStats::default(),
            metrics: crate::metrics::PoolMetrics::default(),
            stopped: false,
            job_times: JobTimes::default(),
            last_result: None,
            predecessors: Vec::new(),
        }
    }

    /// Removed from the config and drained: nothing of it is left but its counters.
    pub fn gone(&self) -> bool {
        self.retiring && self.ended
    }

    pub fn state(&self, now: Instant) -> PoolState {
        if self.retiring {
            return PoolState::Removed;
        }
        if self.stopped {
            return PoolState::Stopped;
        }
        self.backoff.state(now)
    }
}

/// A pool's recent job durations (exponentially weighted), which set how many jobs a worker
/// is sent ahead.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobTimes {
    nanos: Option<u64>,
}

impl JobTimes {
    /// Records how long a job took in a worker (from its start to its outcome's arrival).
    pub fn note(&mut self, took: Duration) {
        let sample = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.nanos = Some(match self.nanos {
            None => sample,
            Some(avg) => avg - avg / 8 + sample / 8,
        });
    }

    /// How many jobs one worker may hold: the one it runs, and as many more as make about
    /// [`PREFETCH_AHEAD`] of work, up to [`PREFETCH_MAX`]. Short jobs then cross the socketpair
    /// in batches, and a worker does not idle while the master is off the CPU; long jobs do
    /// not pile up behind one busy worker. Nothing known yet: [`PREFETCH_UNKNOWN`].
    pub fn prefetch(&self) -> usize {
        let Some(avg) = self.nanos else {
            return PREFETCH_UNKNOWN;
        };
        let ahead = u64::try_from(PREFETCH_AHEAD.as_nanos()).unwrap_or(u64::MAX) / avg.max(1);
        usize::try_from(ahead)
            .unwrap_or(usize::MAX)
            .saturating_add(1)
            .clamp(PREFETCH_MIN, PREFETCH_MAX)
    }
}

impl JobTimes {
    /// How long a worker's running job may take before the jobs it holds behind it are better
    /// off with an idle worker: four times the pool's recent average, at least
    /// [`PATIENCE_MIN`]. Short jobs never wait on this; a job far longer than usual (or a
    /// stopped worker) does not hold the others.
    pub fn patience(&self) -> Duration {
        let avg = Duration::from_nanos(self.nanos.unwrap_or(0));
        avg.saturating_mul(4).max(PATIENCE_MIN)
    }
}

/// Crash history of a pool and the delay it imposes on the next fork.
#[derive(Debug, Clone)]
pub struct Backoff {
    crashes: VecDeque<Instant>,
    limit: u32,
    window: Duration,
    failing_retry: Duration,
    /// No fork for this pool before this instant.
    pub next_spawn: Option<Instant>,
}

impl Backoff {
    pub fn new(limit: u32, window: Duration, failing_retry: Duration) -> Backoff {
        Backoff {
            crashes: VecDeque::new(),
            limit: limit.max(1),
            window,
            failing_retry,
            next_spawn: None,
        }
    }

    fn recent(&self, now: Instant) -> usize {
        self.crashes
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < self.window)
            .count()
    }

    /// Records a crash; returns the delay before the next fork of this pool.
    pub fn crashed(&mut self, now: Instant) -> Duration {
        self.crashes.push_back(now);
        while self.crashes.len() > self.limit as usize {
            self.crashes.pop_front();
        }
        let delay = self.delay(now);
        self.next_spawn = Some(now + delay);
        delay
    }

    /// The delay the current crash history asks for: 0 with no recent crash, doubling from
    /// 100 ms to 10 s, and `failing_retry` once `crash_limit` crashes fall in the window.
    pub fn delay(&self, now: Instant) -> Duration {
        let n = self.recent(now);
        if n == 0 {
            Duration::ZERO
        } else if n >= self.limit as usize {
            self.failing_retry
        } else {
            BACKOFF_BASE
                .saturating_mul(1 << (n - 1).min(16))
                .min(BACKOFF_CAP)
        }
    }

    /// May the pool fork now? And if so, how many at once: all missing workers when there is
    /// no recent crash, one at a time (each spacing the next) while backing off.
    pub fn may_spawn(&mut self, now: Instant) -> Option<SpawnPace> {
        if self.next_spawn.is_some_and(|t| now < t) {
            return None;
        }
        let delay = self.delay(now);
        if delay.is_zero() {
            self.next_spawn = None;
            Some(SpawnPace::All)
        } else {
            self.next_spawn = Some(now + delay);
            Some(SpawnPace::One)
        }
    }

    pub fn state(&self, now: Instant) -> PoolState {
        match self.recent(now) {
            0 => PoolState::Ok,
            n if n >= self.limit as usize => PoolState::Failing,
            _ => PoolState::BackingOff,
        }
    }

    /// Takes back the crash recorded at `at`: it turned out to be its job's doing (the job then
    /// crashed another worker too), not a sign that the pool cannot start workers. The delay
    /// it imposed shrinks to what the remaining history asks for.
    pub fn forgive(&mut self, at: Instant, now: Instant) {
        let Some(i) = self.crashes.iter().position(|t| *t == at) else {
            return;
        };
        self.crashes.remove(i);
        let delay = self.delay(now);
        self.next_spawn = match self.next_spawn {
            _ if delay.is_zero() => None,
            Some(t) => Some(t.min(now + delay)),
            None => None,
        };
    }

    /// Forget the crash history (an operator's `start` or `restart`).
    pub fn reset(&mut self) {
        self.crashes.clear();
        self.next_spawn = None;
    }

    pub fn is_failing(&self, now: Instant) -> bool {
        self.state(now) == PoolState::Failing
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnPace {
    All,
    One,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_jobs_are_sent_further_ahead_than_long_ones() {
        let mut t = JobTimes::default();
        assert_eq!(t.prefetch(), PREFETCH_UNKNOWN, "nothing known yet");
        for _ in 0..50 {
            t.note(Duration::from_micros(5));
        }
        assert_eq!(t.prefetch(), PREFETCH_MAX);
        for _ in 0..50 {
            t.note(Duration::from_micros(100));
        }
        let mid = t.prefetch();
        assert!((15..=25).contains(&mid), "about 2 ms of 100 µs jobs: {mid}");
        for _ in 0..50 {
            t.note(Duration::from_millis(10));
        }
        assert_eq!(t.prefetch(), 1, "10 ms jobs: none sent ahead");
        for _ in 0..50 {
            t.note(Duration::from_secs(3));
        }
        assert_eq!(t.prefetch(), PREFETCH_MIN);
    }

    #[test]
    fn patience_is_a_few_times_the_usual_job_and_never_under_the_minimum() {
        let mut t = JobTimes::default();
        assert_eq!(t.patience(), PATIENCE_MIN, "nothing known yet");
        for _ in 0..50 {
            t.note(Duration::from_micros(5));
        }
        assert_eq!(t.patience(), PATIENCE_MIN);
        for _ in 0..100 {
            t.note(Duration::from_millis(20));
        }
        let p = t.patience();
        assert!(
            (Duration::from_millis(79)..=Duration::from_millis(80)).contains(&p),
            "{p:?}"
        );
    }

    #[test]
    fn back_off_doubles_then_fails_then_forgives() {
        let t0 = Instant::now();
        let mut b = Backoff::new(4, Duration::from_secs(60), Duration::from_secs(30));
        assert_eq!(b.may_spawn(t0), Some(SpawnPace::All));
        assert_eq!(b.crashed(t0), Duration::from_millis(100));
        assert_eq!(b.may_spawn(t0), None, "no fork during the back-off");
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.may_spawn(t1), Some(SpawnPace::One));
        assert_eq!(b.crashed(t1), Duration::from_millis(200));
        assert_eq!(b.crashed(t1), Duration::from_millis(400));
        assert_eq!(b.state(t1), PoolState::BackingOff);
        assert_eq!(
            b.crashed(t1),
            Duration::from_secs(30),
            "the 4th crash in the window: failing"
        );
        assert_eq!(b.state(t1), PoolState::Failing);
        // A minute later the crashes have aged out of the window.
        let later = t1 + Duration::from_secs(61);
        assert_eq!(b.state(later), PoolState::Ok);
        assert_eq!(b.may_spawn(later), Some(SpawnPace::All));
    }

    #[test]
    fn a_forgiven_crash_no_longer_delays_the_pool() {
        let t0 = Instant::now();
        let mut b = Backoff::new(3, Duration::from_secs(60), Duration::from_secs(30));
        b.crashed(t0);
        let t1 = t0 + Duration::from_millis(1);
        assert_eq!(b.crashed(t1), Duration::from_millis(200));
        b.forgive(t1, t1);
        assert_eq!(b.delay(t1), Duration::from_millis(100), "one crash left");
        assert_eq!(b.next_spawn, Some(t1 + Duration::from_millis(100)));
        b.forgive(t0, t1);
        assert_eq!(b.state(t1), PoolState::Ok);
        assert_eq!(b.may_spawn(t1), Some(SpawnPace::All), "no delay left");
        b.forgive(t0, t1); // twice: nothing to take back
        assert_eq!(b.state(t1), PoolState::Ok);
    }

    #[test]
    fn each_kind_of_exit_has_its_own_counter() {
        let mut stats = PoolStats::default();
        for kind in [
            ExitKind::Crash,
            ExitKind::Stop,
            ExitKind::Stop,
            ExitKind::Recycle,
            ExitKind::Timeout,
            ExitKind::Stop,
            ExitKind::Crash,
        ] {
            stats.count_exit(kind);
        }
        let want = PoolStats {
            crashes: 2,
            timeouts: 1,
            recycled: 1,
            stopped: 3,
            ..PoolStats::default()
        };
        assert_eq!(stats, want);
        stats.crashes = u64::MAX;
        stats.count_exit(ExitKind::Crash);
        assert_eq!(stats.crashes, u64::MAX, "saturates");
    }

    #[test]
    fn the_delay_is_capped() {
        let t = Instant::now();
        let mut b = Backoff::new(100, Duration::from_secs(600), Duration::from_secs(30));
        let mut last = Duration::ZERO;
        for _ in 0..40 {
            last = b.crashed(t);
        }
        assert_eq!(last, BACKOFF_CAP);
    }
}
