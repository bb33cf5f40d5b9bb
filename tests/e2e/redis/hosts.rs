//! Many masters on one stream: split work, a whole host killed, no entry worked on twice.
//!
//! Each "host" is a master in its own [`Env`] (its own config, runtime dir and log), all of
//! them consumers of one group on one private redis-server. Jobs run the `faulty` plugin's
//! `pid` and `trace` payloads: a result's body is the pid of the worker that ran it, and
//! `trace` appends each job's start and end (pid, CLOCK_MONOTONIC) to a file, from which a
//! test reads whether two workers ever ran one entry at the same time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use jobhost_e2e::{
    children_of, in_sleep_job, is_alive, prerequisite, wait_until, Env, Master, SOON,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use redis::Value;

use super::{assert_runs_never_overlap, counts, have_redis, pool, text, Redis, Span};

/// The stream every entry here asks its result to go to (`reply_to`).
const RESULTS: &str = "r";

/// A deadline for a whole run of slow jobs, takeovers after `claim_idle` included.
const RUN: Duration = Duration::from_secs(60);

/// A private redis-server and the trace file the `trace` jobs append to.
struct Stage {
    redis: Redis,
    trace: PathBuf,
    _env: Env,
}

impl Stage {
    /// `None` (the test is skipped) when redis-server is not installed.
    fn new() -> Option<Stage> {
        if !prerequisite(have_redis(), "redis-server is not installed") {
            return None;
        }
        let env = Env::new();
        let redis = Redis::at(&env).start();
        let trace = env.path().join("trace.log");
        Some(Stage {
            redis,
            trace,
            _env: env,
        })
    }

    /// A `trace` payload: runs `ms` milliseconds, noting its start and end under `tag`.
    fn trace_job(&self, ms: u64, tag: &str) -> String {
        format!("trace {ms} {tag} {}", self.trace.display())
    }

    /// XADDs one entry per `(id, payload)` to `jobs`, answered to [`RESULTS`], in one
    /// pipeline. Returns the ids the stream gave them, in order.
    fn enqueue(&self, jobs: &[(String, String)]) -> Vec<String> {
        let mut pipe = redis::pipe();
        for (id, payload) in jobs {
            pipe.cmd("XADD")
                .arg("jobs")
                .arg("*")
                .arg("payload")
                .arg(payload)
                .arg("id")
                .arg(id)
                .arg("reply_to")
                .arg(RESULTS);
        }
        pipe.query(&mut self.redis.conn()).expect("XADD the jobs")
    }

    /// Entries of the group not acked yet, from XPENDING's summary form.
    fn pending(&self) -> i64 {
        match redis::cmd("XPENDING")
            .arg("jobs")
            .arg("jobhost")
            .query::<Value>(&mut self.redis.conn())
        {
            Ok(Value::Array(parts)) => match parts.first() {
                Some(Value::Int(n)) => *n,
                other => panic!("XPENDING's count: {other:?}"),
            },
            other => panic!("XPENDING: {other:?}"),
        }
    }

    /// The group's consumers: name → pending count (none before the first worker made the
    /// stream and the group).
    fn consumers(&self) -> HashMap<String, i64> {
        let reply: Value = match redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg("jobs")
            .arg("jobhost")
            .query(&mut self.redis.conn())
        {
            Err(e) if e.code() == Some("NOGROUP") || e.to_string().contains("no such key") => {
                return HashMap::new()
            }
            other => other.expect("XINFO CONSUMERS"),
        };
        let Value::Array(consumers) = reply else {
            panic!("XINFO CONSUMERS: {reply:?}");
        };
        consumers
            .iter()
            .map(|c| {
                let fields: HashMap<String, &Value> = match c {
                    Value::Array(kv) => kv.chunks(2).map(|p| (text(&p[0]), &p[1])).collect(),
                    Value::Map(kv) => kv.iter().map(|(k, v)| (text(k), v)).collect(),
                    other => panic!("a consumer: {other:?}"),
                };
                let pending = match fields.get("pending") {
                    Some(Value::Int(n)) => *n,
                    other => panic!("a consumer's pending count: {other:?}"),
                };
                (text(fields["name"]), pending)
            })
            .collect()
    }

    /// The consumer names of these worker pids (`<hostname>:q:<pid>`) that the group has.
    fn consumers_of(&self, pids: &[i32]) -> Vec<String> {
        let mut names: Vec<String> = self
            .consumers()
            .into_keys()
            .filter(|name| pids.iter().any(|pid| name.ends_with(&format!(":q:{pid}"))))
            .collect();
        names.sort();
        names
    }

    /// The ids of the entries pending for `consumer`.
    fn pending_of(&self, consumer: &str) -> Vec<String> {
        let reply: Value = redis::cmd("XPENDING")
            .arg("jobs")
            .arg("jobhost")
            .arg("-")
            .arg("+")
            .arg(10_000)
            .arg(consumer)
            .query(&mut self.redis.conn())
            .expect("XPENDING of a consumer");
        let Value::Array(rows) = reply else {
            panic!("XPENDING of {consumer}: {reply:?}");
        };
        rows.iter()
            .map(|row| match row {
                Value::Array(r) => text(&r[0]),
                other => panic!("an XPENDING row: {other:?}"),
            })
            .collect()
    }

    /// The results so far.
    fn results(&self) -> Vec<HashMap<String, String>> {
        self.redis.entries(RESULTS)
    }

    /// Waits until every one of `n` entries has a result and none is pending, then until the
    /// hosts are quiet: no live worker of theirs in a job and no new result, on polls over
    /// 300 ms. Only then can no late result (a duplicate) still come. Returns the results.
    fn settle(&self, n: usize, hosts: &[&Host]) -> Vec<HashMap<String, String>> {
        wait_until(&format!("{n} results, nothing pending"), RUN, || {
            self.redis.xlen(RESULTS) >= n && self.pending() == 0
        });
        let mut quiet_since: Option<(Instant, usize)> = None;
        wait_until("the hosts to go quiet", SOON, || {
            let busy = hosts
                .iter()
                .flat_map(|h| h.master.workers())
                .any(in_sleep_job);
            let len = self.redis.xlen(RESULTS);
            match quiet_since {
                Some((since, was)) if !busy && was == len => {
                    since.elapsed() >= Duration::from_millis(300)
                }
                _ => {
                    quiet_since = (!busy).then(|| (Instant::now(), len));
                    false
                }
            }
        });
        self.results()
    }

    /// The trace file's jobs.
    fn spans(&self) -> Vec<Span> {
        super::spans(&self.trace)
    }

    /// Fails if two workers ever ran one entry at the same time, showing what the `hosts`
    /// logged of takeovers. A job left unfinished may only be one of `dead`'s workers', which
    /// ran to `dead.at` at most.
    fn assert_no_entry_ran_twice_at_once(&self, dead: Option<&Dead>, hosts: &[&Host]) {
        let end_of = |span: &Span| match (span.end, dead) {
            (Some(end), _) => end,
            (None, Some(dead)) if dead.workers.contains(&span.pid) => dead.at.max(span.start),
            (None, _) => panic!(
                "job {} never ended in worker {}, which no test killed",
                span.tag, span.pid
            ),
        };
        assert_runs_never_overlap(self.spans(), end_of, || {
            format!("takeovers:\n{}", takeovers(hosts))
        });
    }
}

/// The lines of the hosts' logs about entries taken over from other consumers.
fn takeovers(hosts: &[&Host]) -> String {
    hosts
        .iter()
        .flat_map(|h| {
            h.master
                .log_text()
                .lines()
                .filter(|l| l.contains("redis: claimed") || l.contains("redis: retrying"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the `trace` lines.
fn monotonic_ns() -> u128 {
    let mut now = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128
}

/// One master of the pool `q` on the stage's stream, in its own folder.
struct Host {
    master: Master,
    _env: Env,
}

impl Host {
    /// Starts a master with `workers` workers of `faulty` (pool keys `extra`, `[pool.redis]`
    /// keys `table`), and waits until every worker is a consumer of the group.
    fn start(stage: &Stage, workers: usize, extra: &str, table: &str) -> Host {
        let env = Env::new();
        env.install("faulty");
        let master = env.start_master(&pool("faulty", workers, &stage.redis, extra, table));
        let pids = master.wait_for_workers(workers);
        wait_until("every worker a consumer of the group", SOON, || {
            stage.consumers_of(&pids).len() == workers
        });
        Host { master, _env: env }
    }

    fn owns(&self, pid: &str) -> bool {
        self.master.workers().iter().any(|w| w.to_string() == pid)
    }
}

/// What a host held when it died.
struct Dead {
    /// Its workers.
    workers: Vec<i32>,
    /// When they were all stopped (CLOCK_MONOTONIC ns): none did anything after.
    at: u128,
    /// The entries pending for its consumers once it was dead: left to the others.
    held: Vec<String>,
    /// Its consumers' names.
    consumers: Vec<String>,
}

/// True once `pid` is stopped (by SIGSTOP): state `T` in /proc/PID/stat.
fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
    })
}

/// Kills `host` as a power cut would, once its consumers hold at least `min_held` entries:
/// stops the master and then its workers (SIGSTOP; if they hold too few, they go on and it
/// tries again), then SIGKILLs them all.
fn cut_power(stage: &Stage, host: &mut Host, min_held: usize) -> Dead {
    let signal = |pid: i32, signal: Signal| {
        let _ = kill(Pid::from_raw(pid), signal);
    };
    let deadline = Instant::now() + SOON;
    let master = host.master.pid();
    let (workers, consumers, at) = loop {
        signal(master, Signal::SIGSTOP);
        wait_until("the master stopped", SOON, || is_stopped(master));
        // A stopped master forks no one: its children are now all it has.
        let workers = children_of(master);
        for &pid in &workers {
            signal(pid, Signal::SIGSTOP);
        }
        wait_until("its workers stopped", SOON, || {
            workers.iter().all(|p| is_stopped(*p))
        });
        let at = monotonic_ns();
        let consumers = stage.consumers_of(&workers);
        let held: usize = consumers.iter().map(|c| stage.pending_of(c).len()).sum();
        if held >= min_held {
            break (workers, consumers, at);
        }
        assert!(
            Instant::now() < deadline,
            "the host never held {min_held} entries (it held {held})"
        );
        for &pid in workers.iter().chain([&master]) {
            signal(pid, Signal::SIGCONT);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for &pid in workers.iter().chain([&master]) {
        signal(pid, Signal::SIGKILL);
    }
    wait_until("the killed host gone", SOON, || {
        host.master.exited() && !workers.iter().any(|p| is_alive(*p))
    });
    // Read now, not while they were stopped: a result they sent just before may have reached
    // Redis after that read. Nobody claims their entries before claim_idle.
    let held = consumers.iter().flat_map(|c| stage.pending_of(c)).collect();
    Dead {
        workers,
        at,
        held,
        consumers,
    }
}

/// Asserts each of `ids` was answered exactly once, and nothing else was; returns each id's
/// result body (the pid that ran it).
fn assert_each_answered_once(
    results: &[HashMap<String, String>],
    ids: &[String],
) -> HashMap<String, String> {
    let counts = counts(results);
    for id in ids {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} answered {:?} times; all counts: {counts:?}",
            counts.get(id)
        );
    }
    assert_eq!(results.len(), ids.len(), "no other results: {counts:?}");
    for r in results {
        assert_eq!(r["status"], "ok", "{r:?}");
    }
    results
        .iter()
        .map(|r| (r["id"].clone(), r["body"].clone()))
        .collect()
}

/// `n` jobs `j0`, `j1`, … with the payload `payload(tag)`.
fn jobs(n: usize, payload: impl Fn(&str) -> String) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let id = format!("j{i}");
            let p = payload(&id);
            (id, p)
        })
        .collect()
}

#[test]
fn two_masters_on_one_stream_split_the_work_and_answer_each_entry_once() {
    let Some(stage) = Stage::new() else { return };
    let a = Host::start(&stage, 2, "", "");
    let b = Host::start(&stage, 2, "", "");
    let (a_workers, b_workers) = (a.master.workers(), b.master.workers());
    let jobs = jobs(200, |_| "pid 2".into());
    stage.enqueue(&jobs);
    let ids: Vec<String> = jobs.into_iter().map(|(id, _)| id).collect();
    let results = stage.settle(ids.len(), &[&a, &b]);
    let ran_by = assert_each_answered_once(&results, &ids);
    let by_a = ran_by.values().filter(|pid| a.owns(pid)).count();
    let by_b = ran_by.values().filter(|pid| b.owns(pid)).count();
    assert_eq!(
        by_a + by_b,
        ids.len(),
        "every job ran in a worker of one of the two masters: {ran_by:?}"
    );
    assert!(by_a > 0 && by_b > 0, "both did some: {by_a} and {by_b}");
    // Nobody died: the split was the group's doing, not a takeover.
    assert_eq!(a.master.workers(), a_workers, "{}", a.master.log_text());
    assert_eq!(b.master.workers(), b_workers, "{}", b.master.log_text());
}

/// Two hosts on the stream with slow-ish jobs; host A is killed whole while it holds entries.
/// Returns the survivor, what A held, and the jobs' ids by their entry ids.
fn a_host_dies_under_load(stage: &Stage) -> (Host, Dead, HashMap<String, String>) {
    let config = ("job_timeout = \"1s\"\n", "claim_idle = \"6001ms\"\n");
    let mut a = Host::start(stage, 2, config.0, config.1);
    let b = Host::start(stage, 2, config.0, config.1);
    let jobs = jobs(40, |tag| stage.trace_job(300, tag));
    let entries = stage.enqueue(&jobs);
    wait_until("host A answered some", SOON, || {
        stage
            .results()
            .iter()
            .filter(|r| a.owns(&r["body"]))
            .count()
            >= 2
    });
    let dead = cut_power(stage, &mut a, 1);
    let ids = entries.into_iter().zip(jobs.into_iter().map(|(id, _)| id));
    (b, dead, ids.collect())
}

#[test]
fn a_host_killed_under_load_leaves_its_pending_entries_to_the_other_host() {
    let Some(stage) = Stage::new() else { return };
    let (b, dead, id_of) = a_host_dies_under_load(&stage);
    let ids: Vec<String> = id_of.values().cloned().collect();
    let results = stage.settle(ids.len(), &[&b]);
    let ran_by = assert_each_answered_once(&results, &ids);
    assert_eq!(stage.redis.xlen("jobs:dead"), 0, "nothing dead-lettered");
    // What the dead host held went to the survivor's workers, by XAUTOCLAIM.
    assert!(!dead.held.is_empty(), "the host died holding entries");
    for entry in &dead.held {
        let id = &id_of[entry];
        assert!(
            b.owns(&ran_by[id]),
            "{id} (entry {entry}), held by the dead host, was run by {}",
            ran_by[id]
        );
        let claimed = format!("redis: claimed entry {entry} idle past claim_idle");
        assert_eq!(b.master.log_count(&claimed), 1, "{}", b.master.log_text());
    }
    stage.assert_no_entry_ran_twice_at_once(Some(&dead), &[&b]);
}

#[test]
fn a_dead_host_s_consumers_are_removed_once_their_pending_lists_are_empty() {
    let Some(stage) = Stage::new() else { return };
    let (b, dead, ids) = a_host_dies_under_load(&stage);
    stage.settle(ids.len(), &[&b]);
    let left = stage.consumers();
    for name in &dead.consumers {
        assert_eq!(left.get(name).copied().unwrap_or(0), 0, "{name}: {left:?}");
    }
    wait_until(
        "the dead host's consumers removed from the group",
        SOON,
        || {
            let left = stage.consumers();
            dead.consumers.iter().all(|c| !left.contains_key(c))
        },
    );
    // The live ones stay.
    assert_eq!(
        stage.consumers_of(&b.master.workers()).len(),
        2,
        "{:?}",
        stage.consumers()
    );
}

#[test]
fn no_entry_is_worked_on_by_two_live_workers_at_once_when_a_host_dies() {
    let Some(stage) = Stage::new() else { return };
    // The smallest claim_idle the config allows for batch 3 × job_timeout 1s (+ 5 s).
    let extra = "job_timeout = \"1s\"\n";
    let table = |claim_idle: &str| format!("batch = 3\nclaim_idle = \"{claim_idle}\"\n");
    let check = Env::new();
    check.install("faulty");
    check.config(&pool("faulty", 1, &stage.redis, extra, &table("8000ms")));
    check
        .jobhost(&["check", "-c", "jobhost.toml"])
        .assert_code(1);
    let mut a = Host::start(&stage, 3, extra, &table("8001ms"));
    let b = Host::start(&stage, 3, extra, &table("8001ms"));
    // Jobs near job_timeout: a worker holds its third entry for ~2.4 s of the 4 s.
    let jobs = jobs(30, |tag| stage.trace_job(800, tag));
    stage.enqueue(&jobs);
    wait_until("host A answered some", SOON, || {
        stage.results().iter().any(|r| a.owns(&r["body"]))
    });
    // It dies holding two entries a worker or more, which the survivor's workers claim.
    let dead = cut_power(&stage, &mut a, 6);
    let ids: Vec<String> = jobs.into_iter().map(|(id, _)| id).collect();
    let results = stage.settle(ids.len(), &[&b]);
    stage.assert_no_entry_ran_twice_at_once(Some(&dead), &[&b]);
    assert_each_answered_once(&results, &ids);
}

#[test]
fn workers_killed_at_random_under_load_lose_and_duplicate_nothing() {
    let Some(stage) = Stage::new() else { return };
    // Each kill here is an outside kill of a busy worker, to be replaced at once; a redis
    // pool counts it as a crash and backs off (see the test below), so a 1 ms crash window
    // keeps 25 of them from leaving the pool without workers.
    let host = Host::start(
        &stage,
        4,
        "max_attempts = 100\ncrash_window = \"1ms\"\n",
        "batch = 5\n",
    );
    let jobs = jobs(3000, |_| "pid 1".into());
    stage.enqueue(&jobs);
    let seed = monotonic_ns() as u64 | 1;
    let mut rng = seed;
    let kills = 25;
    // Spread over the run: kill number k once k / (kills + 1) of the jobs are answered.
    for k in 1..=kills {
        let due = k * jobs.len() / (kills + 1);
        let mut workers = Vec::new();
        wait_until(
            &format!("{due} results and a worker (seed {seed})"),
            SOON,
            || {
                workers = host.master.workers();
                stage.redis.xlen(RESULTS) >= due && !workers.is_empty()
            },
        );
        // xorshift64
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let pid = workers[rng as usize % workers.len()];
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill a worker");
    }
    let ids: Vec<String> = jobs.into_iter().map(|(id, _)| id).collect();
    let results = stage.settle(ids.len(), &[&host]);
    assert_each_answered_once(&results, &ids);
    assert_eq!(stage.redis.xlen("jobs:dead"), 0, "nothing dead-lettered");
    wait_until("every kill reaped", SOON, || {
        host.master.log_count("crashed: killed by SIGKILL") >= kills
    });
    let log = host.master.log_text();
    assert_eq!(
        log.matches("crashed: killed by SIGKILL").count(),
        kills,
        "no other worker died (seed {seed}):\n{log}"
    );
    // Most kills caught a worker holding entries (up to a batch of 5), which its
    // replacement took over.
    assert!(
        log.matches("redis: retrying entry").count() >= kills / 2,
        "the kills left entries to take over (seed {seed}):\n{log}"
    );
}

#[test]
fn a_busy_worker_killed_from_outside_is_replaced_without_crash_back_off() {
    let Some(stage) = Stage::new() else { return };
    let host = Host::start(&stage, 1, "", "");
    stage.enqueue(&jobs(1000, |_| "pid 20".into()));
    for _ in 0..6 {
        let mut worker = 0;
        wait_until("a worker that answered an entry", SOON, || {
            let results = stage.results();
            worker = match host.master.workers()[..] {
                [pid] if results.iter().any(|r| r["body"] == pid.to_string()) => pid,
                _ => 0,
            };
            worker != 0
        });
        kill(Pid::from_raw(worker), Signal::SIGKILL).expect("kill the worker");
        wait_until("its replacement", SOON, || {
            host.master.workers().iter().any(|p| *p != worker)
        });
    }
    // As in a job-mode pool: a worker that had done jobs died of an outside kill, not of a
    // broken plugin.
    let log = host.master.log_text();
    assert_eq!(log.matches("crash back-off").count(), 0, "{log}");
}

#[test]
fn a_job_past_job_timeout_is_never_run_by_a_second_worker_while_the_first_lives() {
    let Some(stage) = Stage::new() else { return };
    let host = Host::start(
        &stage,
        2,
        "job_timeout = \"1s\"\n",
        "claim_idle = \"6001ms\"\n",
    );
    stage.enqueue(&[("slow".into(), stage.trace_job(8000, "slow"))]);
    let deadline = Instant::now() + SOON;
    let first = loop {
        if let Some(span) = stage.spans().first() {
            break span.pid;
        }
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Read the trace before asking whether the first worker lives: a second start seen while
    // it still lives ran while it did.
    loop {
        let others: Vec<i32> = stage
            .spans()
            .iter()
            .map(|s| s.pid)
            .filter(|p| *p != first)
            .collect();
        let alive = is_alive(first);
        assert!(
            others.is_empty() || !alive,
            "worker {others:?} ran the entry while worker {first}, past job_timeout, still ran it:\n{}",
            host.master.log_text()
        );
        if !alive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker {first} still ran its job {SOON:?} on, past job_timeout 1s:\n{}",
            host.master.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    host.master.wait_for_log("ran past job_timeout", SOON);
}
