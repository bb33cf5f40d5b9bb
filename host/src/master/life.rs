//! A worker's life as the master sees it — one enum, [`Life`], with the one [`Life::deadline`]
//! that both the timer pass and the loop's wait read, the one [`Life::step`] that moves it on
//! when that deadline passes — and how its exit is read ([`classify`]) into an [`Ending`].
//!
//! Pure: no processes, no clock reads (`now` is passed in), no I/O. What a step must do to the
//! process (SIGTERM, SIGKILL) comes back as a [`Kill`] for the supervisor to turn into an
//! effect. Never decides anything about jobs or pools: that is the supervisor's.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

use super::pool::ExitKind;
use crate::config::{PoolConfig, PoolMode};
use crate::worker::{Limit, WorkerExit};

/// After SIGTERM for a job timeout (or a LEAVING frame), how long a worker has before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(3);

/// Where a worker is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Life {
    /// Takes jobs. `holding`: it said it is short of memory, so it is sent none and the job at
    /// the head of its queue (not started) is not timed.
    Serving { holding: bool },
    /// Takes no more jobs; finishes the one it runs, then exits, or is SIGKILLed at
    /// `sigkill_at`. `asked`: the master told it to (SIGTERM: scale-down, restart, reload,
    /// shutdown); otherwise it said LEAVING on its own and must be gone by then. Its job still
    /// answers to job_timeout: a hung job must not hold a reload or a shutdown for the whole
    /// grace, nor go back to the queue as if it had never run.
    Draining { asked: bool, sigkill_at: Instant },
    /// Its job (`overdue`) ran past job_timeout: SIGTERMed (unless it was draining already),
    /// SIGKILL at `sigkill_at`. Whatever it still says of that job, the job counts as timed
    /// out once the worker is gone.
    TimedOut {
        overdue: Option<u64>,
        sigkill_at: Instant,
    },
    /// SIGKILL sent: nothing more it says counts; waiting to reap it.
    Killed { cause: KillCause },
}

/// Why the master SIGKILLed a worker, which decides how its death is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillCause {
    /// Asked to go (a stop past its grace, `shutdown now`, SIGQUIT).
    Stop,
    /// It said LEAVING, then stayed past its grace.
    StayedAfterLeaving,
    /// Its job ran past job_timeout and it did not leave within the grace.
    Timeout { overdue: Option<u64> },
    /// It broke the protocol: what it sent; and the job that had passed its timeout, if one
    /// had (still answered as timed out).
    Violation { what: String, overdue: Option<u64> },
}

/// What a step of [`Life`] does to the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    Term,
    Kill,
}

impl Kill {
    pub fn signal(self) -> Signal {
        match self {
            Kill::Term => Signal::SIGTERM,
            Kill::Kill => Signal::SIGKILL,
        }
    }
}

/// What a timer step did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stepped {
    /// Its job passed job_timeout (`draining`: it had been told to stop already).
    TimedOut { draining: bool },
    /// It was still there at its SIGKILL deadline.
    KilledLate,
}

impl Life {
    pub fn serving(&self) -> bool {
        matches!(self, Life::Serving { .. })
    }

    /// Takes jobs now.
    pub fn takes_jobs(&self) -> bool {
        matches!(self, Life::Serving { holding: false })
    }

    pub fn holding(&self) -> bool {
        matches!(self, Life::Serving { holding: true })
    }

    /// The master asked it to go, or took it down for its job's timeout.
    pub fn asked(&self) -> bool {
        match self {
            Life::Serving { .. } => false,
            Life::Draining { asked, .. } => *asked,
            Life::TimedOut { .. } => true,
            Life::Killed { cause } => {
                matches!(cause, KillCause::Stop | KillCause::Timeout { .. })
            }
        }
    }

    /// The job that passed its timeout, if one did.
    pub fn overdue(&self) -> Option<u64> {
        match self {
            Life::TimedOut { overdue, .. }
            | Life::Killed {
                cause: KillCause::Timeout { overdue } | KillCause::Violation { overdue, .. },
            } => *overdue,
            _ => None,
        }
    }

    pub fn timed_out(&self) -> bool {
        matches!(
            self,
            Life::TimedOut { .. }
                | Life::Killed {
                    cause: KillCause::Timeout { .. }
                }
        )
    }

    /// When something must next happen to this worker, if ever: its running job's timeout
    /// (`job_due`, while that still counts) or its SIGKILL. The timer pass calls [`Life::step`]
    /// once it has passed; the loop's wait sleeps until the earliest one.
    pub fn deadline(&self, job_due: Option<Instant>) -> Option<Instant> {
        match self {
            Life::Serving { .. } => job_due,
            Life::Draining { sigkill_at, .. } => {
                Some(job_due.map_or(*sigkill_at, |due| due.min(*sigkill_at)))
            }
            Life::TimedOut { sigkill_at, .. } => Some(*sigkill_at),
            Life::Killed { .. } => None,
        }
    }

    /// Moves on once [`Life::deadline`] has passed (`now`); `head` is the job it runs. Returns
    /// what to do to the process and what happened, or `None` when nothing was due.
    pub fn step(
        &mut self,
        now: Instant,
        job_due: Option<Instant>,
        head: Option<u64>,
    ) -> Option<(Option<Kill>, Stepped)> {
        let job_overdue = job_due.is_some_and(|due| now >= due);
        match *self {
            Life::Serving { .. } if job_overdue => {
                *self = Life::TimedOut {
                    overdue: head,
                    sigkill_at: now + KILL_GRACE,
                };
                Some((Some(Kill::Term), Stepped::TimedOut { draining: false }))
            }
            Life::Serving { .. } => None,
            Life::Draining { asked, sigkill_at } if now >= sigkill_at => {
                *self = Life::Killed {
                    cause: if asked {
                        KillCause::Stop
                    } else {
                        KillCause::StayedAfterLeaving
                    },
                };
                Some((Some(Kill::Kill), Stepped::KilledLate))
            }
            // Told to stop already (or leaving): no second SIGTERM, but no longer grace than
            // a timed-out job gets.
            Life::Draining { sigkill_at, .. } if job_overdue => {
                *self = Life::TimedOut {
                    overdue: head,
                    sigkill_at: sigkill_at.min(now + KILL_GRACE),
                };
                Some((None, Stepped::TimedOut { draining: true }))
            }
            Life::Draining { .. } => None,
            Life::TimedOut {
                overdue,
                sigkill_at,
            } if now >= sigkill_at => {
                *self = Life::Killed {
                    cause: KillCause::Timeout { overdue },
                };
                Some((Some(Kill::Kill), Stepped::KilledLate))
            }
            Life::TimedOut { .. } | Life::Killed { .. } => None,
        }
    }

    /// The master asks it to finish its job and go, SIGKILL at `deadline`. False (and no
    /// change) if it is on its way out already.
    pub fn ask_to_stop(&mut self, deadline: Instant) -> bool {
        match self {
            Life::Serving { .. } => {
                *self = Life::Draining {
                    asked: true,
                    sigkill_at: deadline,
                };
                true
            }
            _ => false,
        }
    }

    /// It said LEAVING: no more jobs; gone within the grace, or killed.
    pub fn leaving(&mut self, now: Instant) {
        if self.serving() {
            *self = Life::Draining {
                asked: false,
                sigkill_at: now + KILL_GRACE,
            };
        }
    }

    /// SIGKILL now (shutdown now, a shutdown's deadline). True if it was not killed already.
    pub fn kill_now(&mut self) -> bool {
        let cause = match self {
            Life::Killed { .. } => return false,
            Life::TimedOut { overdue, .. } => KillCause::Timeout { overdue: *overdue },
            // The master's own decision, before any grace ran out: a stop.
            Life::Serving { .. } | Life::Draining { .. } => KillCause::Stop,
        };
        *self = Life::Killed { cause };
        true
    }

    /// It broke the protocol: killed; its exit is a crash.
    pub fn violated(&mut self, what: String) {
        let overdue = self.overdue();
        *self = Life::Killed {
            cause: KillCause::Violation { what, overdue },
        };
    }

    /// As `workers` shows it; `busy`: it runs a job. Timed out or killed, a worker is on its
    /// way out too: "draining".
    pub fn as_str(&self, busy: bool) -> &'static str {
        match self {
            Life::Serving { holding: true } => "holding",
            Life::Serving { holding: false } if busy => "busy",
            Life::Serving { holding: false } => "idle",
            Life::Draining { .. } | Life::TimedOut { .. } | Life::Killed { .. } => "draining",
        }
    }
}

/// What a worker said in its LEAVING frame, right before exiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaving {
    pub code: u8,
    pub jobs_done: u64,
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
    pub fn kind(&self) -> ExitKind {
        match self {
            Ending::Crashed { .. } | Ending::BootFailed => ExitKind::Crash,
            Ending::KilledOnTimeout(_) => ExitKind::Timeout,
            Ending::Recycled(_) => ExitKind::Recycle,
            Ending::Stopped | Ending::PluginStopped => ExitKind::Stop,
        }
    }

    /// Counts against the pool's back-off and the job's attempts: a crash or a timeout.
    pub fn is_crash(&self) -> bool {
        matches!(self.kind(), ExitKind::Crash | ExitKind::Timeout)
    }

    pub fn describe(&self) -> String {
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

    /// The reason a job it ran is given (failed, or retried).
    pub fn job_reason(&self) -> String {
        match self {
            Ending::Crashed { how, .. } => format!("worker {how}"),
            Ending::KilledOnTimeout(t) => format!("job timed out after {t:?}"),
            other => other.describe(),
        }
    }
}

/// Reads a wait status in the light of what the master did to the worker (`life`) and what
/// the worker said before it left. Only a worker that said why (LEAVING, with the status it
/// then exited with) and whose reason squares with what the master knows left cleanly; any
/// other exit is a crash — a plugin can call `exit(0)` or `exit(203)` itself, but it cannot
/// make that a stop.
pub fn classify(
    status: WaitStatus,
    life: &Life,
    leaving: Option<Leaving>,
    jobs_done: u64,
    pool: &PoolConfig,
    lived: Duration,
) -> Ending {
    if let Life::Killed {
        cause: KillCause::Violation { what, .. },
    } = life
    {
        return Ending::Crashed {
            how: format!("killed for breaking the protocol ({what})"),
            core: false,
            note: "",
        };
    }
    if life.timed_out() {
        return Ending::KilledOnTimeout(pool.job_timeout.unwrap_or_default());
    }
    match status {
        WaitStatus::Exited(_, code) => match leaving {
            Some(said) if i32::from(said.code) == code => {
                match check_leaving(said, jobs_done, pool, lived) {
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
            if matches!(
                life,
                Life::Killed {
                    cause: KillCause::Stop
                }
            ) =>
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
pub fn check_leaving(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use nix::unistd::Pid;

    pub(crate) fn pool(extra: &str) -> PoolConfig {
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
    const SEC: Duration = Duration::from_secs(1);

    /// Every transition of a worker's life, as a table: where it is, what happens, where it
    /// ends, and what is done to the process.
    #[test]
    fn every_transition_of_a_workers_life() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let serving = Life::Serving { holding: false };
        let holding = Life::Serving { holding: true };
        let draining = |asked| Life::Draining {
            asked,
            sigkill_at: at(30),
        };
        let timed_out = |sigkill| Life::TimedOut {
            overdue: Some(7),
            sigkill_at: at(sigkill),
        };
        // (what, before, now, job due, after, what is done to it)
        type Row = (
            &'static str,
            Life,
            Instant,
            Option<Instant>,
            Life,
            Option<Option<Kill>>,
        );
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("serving, job in time", serving.clone(), at(5), Some(at(10)), serving.clone(), None),
            ("serving, no job", serving.clone(), at(5), None, serving.clone(), None),
            ("serving, job past its timeout", serving.clone(), at(10), Some(at(10)),
                Life::TimedOut { overdue: Some(7), sigkill_at: at(10) + KILL_GRACE }, Some(Some(Kill::Term))),
            ("holding: its head is not timed", holding.clone(), at(100), None, holding.clone(), None),
            ("draining, job in time", draining(true), at(5), Some(at(10)), draining(true), None),
            ("draining, job past its timeout: no second SIGTERM", draining(true), at(10), Some(at(10)),
                Life::TimedOut { overdue: Some(7), sigkill_at: at(10) + KILL_GRACE }, Some(None)),
            ("draining, job past its timeout near its SIGKILL: no longer grace", draining(true), at(29), Some(at(29)),
                Life::TimedOut { overdue: Some(7), sigkill_at: at(30) }, Some(None)),
            ("draining past its grace", draining(true), at(30), None,
                Life::Killed { cause: KillCause::Stop }, Some(Some(Kill::Kill))),
            ("said LEAVING, stayed past its grace", draining(false), at(30), None,
                Life::Killed { cause: KillCause::StayedAfterLeaving }, Some(Some(Kill::Kill))),
            ("timed out, within its grace", timed_out(13), at(12), Some(at(10)), timed_out(13), None),
            ("timed out, past its grace", timed_out(13), at(13), Some(at(10)),
                Life::Killed { cause: KillCause::Timeout { overdue: Some(7) } }, Some(Some(Kill::Kill))),
            ("killed: nothing more", Life::Killed { cause: KillCause::Stop }, at(99), Some(at(1)),
                Life::Killed { cause: KillCause::Stop }, None),
        ];
        for (what, before, now, due, after, done) in rows {
            let mut life = before.clone();
            // The deadline says when the step is due: never later than a step that acts.
            let deadline = life.deadline(due);
            let stepped = life.step(now, due, Some(7));
            assert_eq!(life, after, "{what}");
            assert_eq!(stepped.as_ref().map(|(k, _)| *k), done, "{what}");
            if stepped.is_some() {
                assert!(
                    deadline.is_some_and(|d| d <= now),
                    "{what}: due at {deadline:?}"
                );
            } else if let Some(d) = deadline {
                assert!(d > now || before == after, "{what}: due but nothing done");
            }
        }
    }

    #[test]
    fn asking_leaving_killing_and_violations() {
        let now = Instant::now();
        let mut life = Life::Serving { holding: false };
        assert!(life.ask_to_stop(now + SEC));
        assert!(!life.ask_to_stop(now + HOUR), "the first deadline holds");
        assert_eq!(
            life,
            Life::Draining {
                asked: true,
                sigkill_at: now + SEC
            }
        );
        assert!(life.asked() && !life.serving() && !life.takes_jobs());

        let mut leaving = Life::Serving { holding: true };
        leaving.leaving(now);
        assert!(!leaving.asked());
        assert!(!leaving.ask_to_stop(now), "leaving already");
        assert!(leaving.kill_now());
        assert_eq!(
            leaving,
            Life::Killed {
                cause: KillCause::Stop
            },
            "killed by the master before its grace ran out"
        );
        assert!(!leaving.kill_now(), "killed once");

        let mut timed = Life::TimedOut {
            overdue: Some(3),
            sigkill_at: now,
        };
        assert!(timed.kill_now());
        assert_eq!(timed.overdue(), Some(3), "a kill keeps the overdue job");
        assert!(timed.timed_out());

        let mut late = Life::TimedOut {
            overdue: Some(4),
            sigkill_at: now,
        };
        late.violated("garbage".into());
        assert_eq!(
            late.overdue(),
            Some(4),
            "its timed-out job is still answered as such"
        );
        let mut bad = Life::Serving { holding: false };
        bad.violated("garbage".into());
        assert_eq!(
            bad.deadline(Some(now)),
            None,
            "nothing to time: it is killed"
        );
        assert!(!bad.asked());
    }

    #[test]
    fn every_ending_counts_as_a_crash_a_timeout_a_recycle_or_a_stop() {
        let jobs = pool("max_jobs = 10\nmax_rss = \"1GiB\"\njob_timeout = \"5s\"\n");
        let looping = pool("mode = \"loop\"\n");
        let pid = Pid::from_raw(4242);
        let exited = |code| WaitStatus::Exited(pid, code);
        let signaled = |signal| WaitStatus::Signaled(pid, signal, false);
        let later = Instant::now() + HOUR;
        let draining = Life::Draining {
            asked: true,
            sigkill_at: later,
        };
        let stopped_late = Life::Killed {
            cause: KillCause::Stop,
        };
        let serving = Life::Serving { holding: false };
        let leaving = |code, done| Some(said(code, done));
        type Case<'a> = (
            &'a str,
            Life,
            Option<Leaving>,
            u64,
            WaitStatus,
            &'a PoolConfig,
            ExitKind,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            // Asked to go: scale-down, TTOU, restart, reload, stop POOL, shutdown.
            ("stopped between jobs", draining.clone(), leaving(0, 3), 3, exited(0), &jobs, ExitKind::Stop),
            ("SIGKILLed past the grace", stopped_late.clone(), None, 3, signaled(Signal::SIGKILL), &jobs, ExitKind::Stop),
            ("shutdown now", stopped_late.clone(), None, 0, signaled(Signal::SIGKILL), &jobs, ExitKind::Stop),
            ("loop plugin said Stop", serving.clone(), leaving(203, 0), 0, exited(203), &looping, ExitKind::Stop),
            ("an outside SIGTERM, taken between jobs", serving.clone(), leaving(0, 2), 2, exited(0), &jobs, ExitKind::Stop),
            // Limits.
            ("max_jobs", serving.clone(), leaving(200, 10), 10, exited(200), &jobs, ExitKind::Recycle),
            ("max_rss", serving.clone(), leaving(202, 3), 3, exited(202), &jobs, ExitKind::Recycle),
            // Past job_timeout, however it then ended.
            ("timed out, SIGKILLed", Life::Killed { cause: KillCause::Timeout { overdue: Some(1) } }, None, 1, signaled(Signal::SIGKILL), &jobs, ExitKind::Timeout),
            ("timed out, left on SIGTERM", Life::TimedOut { overdue: Some(1), sigkill_at: later }, leaving(0, 1), 1, exited(0), &jobs, ExitKind::Timeout),
            // Crashes.
            ("kill -9 from outside", serving.clone(), None, 5, signaled(Signal::SIGKILL), &jobs, ExitKind::Crash),
            ("kill -9 from outside while draining", draining.clone(), None, 5, signaled(Signal::SIGKILL), &jobs, ExitKind::Crash),
            ("SIGSEGV", serving.clone(), None, 5, signaled(Signal::SIGSEGV), &jobs, ExitKind::Crash),
            ("SIGSEGV while draining", draining.clone(), None, 5, signaled(Signal::SIGSEGV), &jobs, ExitKind::Crash),
            ("exit without LEAVING", serving.clone(), None, 5, exited(0), &jobs, ExitKind::Crash),
            ("exit unlike its LEAVING", serving.clone(), leaving(0, 5), 5, exited(1), &jobs, ExitKind::Crash),
            ("a claim that does not add up", serving.clone(), leaving(200, 3), 3, exited(200), &jobs, ExitKind::Crash),
            ("worker_start failed", serving.clone(), leaving(204, 0), 0, exited(204), &jobs, ExitKind::Crash),
            ("said LEAVING, then stayed", Life::Killed { cause: KillCause::StayedAfterLeaving }, leaving(0, 2), 2, signaled(Signal::SIGKILL), &jobs, ExitKind::Crash),
            ("broke the protocol", Life::Killed { cause: KillCause::Violation { what: "an OUTCOME for job 9".into(), overdue: None } }, None, 2, signaled(Signal::SIGKILL), &jobs, ExitKind::Crash),
        ];
        for (what, life, leaving, done, status, cfg, want) in cases {
            let ending = classify(status, &life, leaving, done, cfg, HOUR);
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
