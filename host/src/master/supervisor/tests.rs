//! The supervisor's decisions, driven with events and no processes at all.
//!
//! [`Sim`] plays the shell: it hands each event to [`Supervisor::on`] at a chosen instant of a
//! timeline (`t0 + offset`), performs `Effect::Spawn` at once by answering `Event::Spawned`
//! (as the real shell does), and keeps what the effects said (answers, signals, sends) for the
//! assertions. Each test pins one decision, named by its title.

use super::*;
use crate::config::Config;
use crate::master::pool::PoolState;
use crate::worker::WorkerExit;
use std::collections::HashMap;

const GRACE: Duration = Duration::from_secs(10);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How long a job runs before the jobs behind it may be taken back, while nothing is known
/// of the pool's jobs.
fn patience() -> Duration {
    super::super::pool::JobTimes::default().patience()
}

/// A pool's config: `name`, plugin `p`, then the TOML lines `extra`.
fn config(name: &str, extra: &str) -> PoolConfig {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libp.so"), b"").unwrap();
    let text = format!(
        "[host]\nplugins_dir = {:?}\n[[pool]]\nname = {name:?}\nplugin = \"p\"\n{extra}",
        dir.path()
    );
    let mut config = Config::parse(&text, &dir.path().join("jobhost.toml")).unwrap();
    config.pools.remove(0)
}

fn pool(name: &str, extra: &str) -> Pool {
    Pool::new(
        config(name, extra),
        "p".into(),
        "1.0".into(),
        ContentHash::of(name.as_bytes()),
    )
}

fn settings(graceful_timeout: Duration) -> Settings {
    Settings {
        graceful_timeout,
        max_payload: 1024,
        max_result: 1024,
    }
}

fn build(plugin: &str, version: &str) -> Build {
    Build {
        plugin: plugin.into(),
        version: version.into(),
        hash: ContentHash::of(format!("{plugin} {version}").as_bytes()),
    }
}

/// A reload plan with the default settings.
fn plan(pools: Vec<PlanEntry>) -> ReloadPlan {
    ReloadPlan {
        settings: settings(GRACE),
        pools,
        at: "T".into(),
    }
}

/// What one event came to, the follow-ups of its spawns included, in order.
struct Out {
    effects: Vec<Effect>,
    /// Job keys to the clients' ids.
    ids: HashMap<u64, u64>,
}

impl Out {
    fn and(mut self, more: Out) -> Out {
        self.effects.extend(more.effects);
        self.ids = more.ids;
        self
    }

    fn id(&self, key: u64) -> u64 {
        self.ids[&key]
    }

    /// What `f` picks out of the effects, in order.
    fn pick<'a, T>(&'a self, f: impl Fn(&'a Effect) -> Option<T>) -> Vec<T> {
        self.effects.iter().filter_map(f).collect()
    }

    fn spawns(&self) -> Vec<(WorkerId, usize)> {
        self.pick(|e| match e {
            Effect::Spawn { worker, pool, .. } => Some((*worker, *pool)),
            _ => None,
        })
    }

    /// (worker, client id) of each job sent.
    fn sends(&self) -> Vec<(WorkerId, u64)> {
        self.pick(|e| match e {
            Effect::Send { worker, key, .. } => Some((*worker, self.id(*key))),
            _ => None,
        })
    }

    /// (worker, seq) of each job sent.
    fn seqs(&self) -> Vec<(WorkerId, u64)> {
        self.pick(|e| match e {
            Effect::Send { worker, seq, .. } => Some((*worker, *seq)),
            _ => None,
        })
    }

    fn signals(&self) -> Vec<(WorkerId, Signal)> {
        self.pick(|e| match e {
            Effect::Signal { worker, signal } => Some((*worker, *signal)),
            _ => None,
        })
    }

    /// (client id, status, body) of each answer.
    fn answers(&self) -> Vec<(u64, Status, String)> {
        self.pick(|e| match e {
            Effect::Answer {
                id, status, body, ..
            } => Some((*id, *status, String::from_utf8_lossy(body).into_owned())),
            _ => None,
        })
    }

    /// (client, client id, report) of each report forwarded.
    fn reports(&self) -> Vec<(ClientId, u64, Reported)> {
        self.pick(|e| match e {
            Effect::Report { client, id, report } => Some((*client, *id, report.clone())),
            _ => None,
        })
    }

    fn recalls(&self) -> Vec<WorkerId> {
        self.pick(|e| match e {
            Effect::Recall { worker } => Some(*worker),
            _ => None,
        })
    }

    fn replies(&self) -> Vec<(SessionId, Reply)> {
        self.pick(|e| match e {
            Effect::Reply { session, reply } => Some((*session, reply.clone())),
            _ => None,
        })
    }

    fn notes(&self) -> Vec<&str> {
        self.pick(|e| match e {
            Effect::Notify(text) => Some(text.as_str()),
            _ => None,
        })
    }

    fn logs(&self) -> Vec<&str> {
        self.pick(|e| match e {
            Effect::Log { text, .. } => Some(text.as_str()),
            _ => None,
        })
    }

    /// Some log line contains `text`.
    fn logged(&self, text: &str) -> bool {
        self.logs().iter().any(|l| l.contains(text))
    }

    fn count(&self, what: impl Fn(&Effect) -> bool) -> usize {
        self.effects.iter().filter(|e| what(e)).count()
    }
}

/// The supervisor and a fake shell around it.
struct Sim {
    sup: Supervisor,
    t0: Instant,
    now: Instant,
    /// Job keys to the clients' ids.
    ids: HashMap<u64, u64>,
    /// The highest seq sent to each worker (what `Exited` reports as written).
    written: HashMap<WorkerId, u64>,
    /// Answers each client id got (every client).
    answered: HashMap<u64, u32>,
    /// The last signal each worker was sent.
    signaled: HashMap<WorkerId, Signal>,
    /// Workers the shell no longer reads (`Effect::Forget`).
    forgotten: Vec<WorkerId>,
    /// Answer `Effect::Spawn` with `SpawnFailed`.
    fail_spawns: bool,
    /// Answer `Effect::Recall` at once: the head started, the rest taken back.
    auto_recall: bool,
}

impl Sim {
    fn new(pools: Vec<Pool>) -> Sim {
        Sim::with(settings(GRACE), pools)
    }

    fn with(settings: Settings, pools: Vec<Pool>) -> Sim {
        let t0 = Instant::now();
        Sim {
            sup: Supervisor::new(settings, pools),
            t0,
            now: t0,
            ids: HashMap::new(),
            written: HashMap::new(),
            answered: HashMap::new(),
            signaled: HashMap::new(),
            forgotten: Vec::new(),
            fail_spawns: false,
            auto_recall: false,
        }
    }

    /// Moves the clock to `t0 + offset`.
    fn at(&mut self, offset: Duration) {
        self.now = self.t0 + offset;
    }

    fn t(&self, offset: Duration) -> Instant {
        self.t0 + offset
    }

    fn on(&mut self, event: Event<'_>) -> Out {
        let mut queue: VecDeque<Effect> = self.sup.on(event, self.now).into();
        let mut effects = Vec::new();
        while let Some(effect) = queue.pop_front() {
            let follow_up = match &effect {
                Effect::Spawn {
                    worker,
                    pool,
                    predecessors,
                    ..
                } => Some(if self.fail_spawns {
                    Event::SpawnFailed {
                        pool: *pool,
                        predecessors: predecessors.clone(),
                        error: "fork: EAGAIN".into(),
                    }
                } else {
                    Event::Spawned {
                        worker: *worker,
                        pool: *pool,
                        pid: Pid::from_raw(1000 + worker.0 as i32),
                        predecessors: predecessors.clone(),
                    }
                }),
                Effect::Send { worker, seq, .. } => {
                    let w = self.written.entry(*worker).or_default();
                    *w = (*w).max(*seq);
                    None
                }
                Effect::Answer { id, .. } => {
                    *self.answered.entry(*id).or_default() += 1;
                    None
                }
                Effect::Signal { worker, signal } => {
                    let last = self.signaled.entry(*worker).or_insert(*signal);
                    if *last != Signal::SIGKILL {
                        *last = *signal;
                    }
                    None
                }
                Effect::Forget { worker } => {
                    self.forgotten.push(*worker);
                    None
                }
                Effect::Recall { worker } if self.auto_recall => {
                    self.sup.worker(*worker).map(|w| Event::Recalled {
                        worker: *worker,
                        started_through: w.in_flight.front().map_or(0, |s| s.seq),
                        written_through: w.last_seq,
                    })
                }
                _ => None,
            };
            effects.push(effect);
            if let Some(event) = follow_up {
                queue.extend(self.sup.on(event, self.now));
            }
        }
        Out {
            effects,
            ids: self.ids.clone(),
        }
    }

    fn tick(&mut self) -> Out {
        self.on(Event::Tick)
    }

    /// The first tick: forks the workers; returns them.
    fn start(&mut self) -> Vec<WorkerId> {
        self.tick().spawns().into_iter().map(|(w, _)| w).collect()
    }

    fn submit(&mut self, id: u64) -> Out {
        self.submit_to(ClientId(1), id, "p", b"job")
    }

    fn submit_to(&mut self, client: ClientId, id: u64, pool: &str, payload: &[u8]) -> Out {
        self.submit_as(client, id, pool, payload, false)
    }

    /// A SUBMIT_WATCH of client id `id` to pool "p", from client 1.
    fn submit_watched(&mut self, id: u64) -> Out {
        self.submit_as(ClientId(1), id, "p", b"job", true)
    }

    fn submit_as(
        &mut self,
        client: ClientId,
        id: u64,
        pool: &str,
        payload: &[u8],
        watch: bool,
    ) -> Out {
        self.submit_flagged(client, id, pool, payload, watch, false)
    }

    /// A detached submit of client id `id` to pool "p", from `client`.
    fn submit_detached(&mut self, client: ClientId, id: u64) -> Out {
        self.submit_flagged(client, id, "p", b"job", false, true)
    }

    fn submit_flagged(
        &mut self,
        client: ClientId,
        id: u64,
        pool: &str,
        payload: &[u8],
        watch: bool,
        detach: bool,
    ) -> Out {
        let key = self.sup.next_job_key;
        let mut out = self.on(Event::Submit {
            client,
            id,
            pool,
            payload,
            watch,
            detach,
        });
        if self.sup.next_job_key > key {
            self.ids.insert(key, id);
            out.ids = self.ids.clone();
        }
        out
    }

    fn key(&self, id: u64) -> u64 {
        *self.ids.iter().find(|(_, i)| **i == id).unwrap().0
    }

    fn w(&self, id: WorkerId) -> &Worker {
        self.sup.worker(id).expect("a known worker")
    }

    /// The client ids of the jobs worker `id` holds, in order.
    fn held(&self, id: WorkerId) -> Vec<u64> {
        self.w(id)
            .in_flight
            .iter()
            .map(|s| self.ids[&s.key])
            .collect()
    }

    /// The client ids of the jobs queued for pool `idx`, in order.
    fn queued(&self, idx: usize) -> Vec<u64> {
        self.sup.pools()[idx]
            .queue
            .iter()
            .map(|k| self.ids[&k])
            .collect()
    }

    fn said(&mut self, worker: WorkerId, said: WorkerSaid) -> Out {
        self.on(Event::Said { worker, said })
    }

    /// The worker reports on the job of client id `id`, having started jobs up to seq
    /// `started` (its claim).
    fn report(&mut self, worker: WorkerId, id: u64, report: Reported, started: u64) -> Out {
        let key = self.key(id);
        self.on(Event::Reported {
            worker,
            key,
            report,
            started,
        })
    }

    /// The worker's outcome for the job of client id `id`.
    fn outcome(&mut self, worker: WorkerId, id: u64, ok: bool) -> Out {
        let key = self.key(id);
        let body = format!("r{id}").into_bytes();
        self.said(worker, WorkerSaid::Outcome { key, ok, body })
    }

    /// The worker answers its head job, ok.
    fn finish(&mut self, worker: WorkerId) -> Out {
        let id = self.held(worker)[0];
        self.outcome(worker, id, true)
    }

    fn reap(&mut self, worker: WorkerId, status: WaitStatus) -> Out {
        let written = self.written.get(&worker).copied().unwrap_or(0);
        self.reap_written(worker, status, written)
    }

    fn reap_written(&mut self, worker: WorkerId, status: WaitStatus, written: u64) -> Out {
        self.on(Event::Exited {
            worker,
            status,
            board: Report::default(),
            written,
            claimed: written,
        })
    }

    fn pid(&self, worker: WorkerId) -> Pid {
        Pid::from_raw(1000 + worker.0 as i32)
    }

    /// It dies of SIGSEGV.
    fn crash(&mut self, worker: WorkerId) -> Out {
        let pid = self.pid(worker);
        self.reap(worker, WaitStatus::Signaled(pid, Signal::SIGSEGV, false))
    }

    /// It dies of the SIGKILL it was sent.
    fn killed(&mut self, worker: WorkerId) -> Out {
        let pid = self.pid(worker);
        self.reap(worker, WaitStatus::Signaled(pid, Signal::SIGKILL, false))
    }

    /// It says LEAVING with `code` and the jobs the master counted, then exits with `code`.
    fn leave(&mut self, worker: WorkerId, code: i32) -> Out {
        let jobs_done = self.w(worker).jobs_done;
        let said = self.said(
            worker,
            WorkerSaid::Leaving {
                code: code as u8,
                jobs_done,
            },
        );
        let pid = self.pid(worker);
        said.and(self.reap(worker, WaitStatus::Exited(pid, code)))
    }

    fn signal(&mut self, command: Command, signal: Signal) -> Out {
        self.on(Event::Command {
            command,
            from: Origin::Signal(signal),
        })
    }

    fn admin(&mut self, command: Command, session: u64) -> Out {
        self.on(Event::Command {
            command,
            from: Origin::Admin(SessionId(session)),
        })
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.sup.next_deadline(self.now)
    }

    fn stop(&mut self) -> Out {
        self.signal(Command::Stop { escalate: false }, Signal::SIGTERM)
    }

    /// Pool `idx`'s state now, as `status` shows it.
    fn state(&self, idx: usize) -> PoolState {
        self.sup.pools()[idx].state(self.now)
    }
}

fn is_stop_accepting(e: &Effect) -> bool {
    matches!(e, Effect::StopAccepting)
}

fn is_prepare_reload(e: &Effect) -> bool {
    matches!(e, Effect::PrepareReload)
}

fn scale(pool: &str, workers: usize) -> Command {
    Command::Scale {
        pool: pool.into(),
        workers,
    }
}

// ---- crashes ----------------------------------------------------------------------------------

/// A worker that dies before its first result says nothing good of the pool: the next fork
/// waits 100 ms, and the job it ran is retried (attempt 1 of 3).
#[test]
fn a_crash_before_the_first_result_backs_off_the_pool() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    assert_eq!(s.tick().sends(), vec![(w1, 1)]);
    s.at(ms(10));
    let out = s.crash(w1);
    assert!(out.logged("worker 1001 (pool p, generation 1, 0 jobs in"));
    assert!(out.logged("crashed: killed by SIGSEGV"));
    assert!(
        out.logged("retrying job 1 on another worker (worker killed by SIGSEGV, attempt 1 of 3)")
    );
    assert!(out.logged("pool p: next worker in 100ms (crash back-off)"));
    assert_eq!(s.state(0), PoolState::BackingOff);
    assert!(s.tick().spawns().is_empty(), "no fork during the back-off");
    assert_eq!(s.next_deadline(), Some(s.t(ms(110))));
    s.at(ms(110));
    let out = s.tick();
    let w2 = out.spawns()[0].0;
    assert_eq!(
        out.sends(),
        vec![(w2, 1)],
        "the retry goes to the new worker"
    );
    assert_eq!(s.sup.pools()[0].stats.crashes, 1);
    assert_eq!(s.sup.pools()[0].stats.retried, 1);
}

/// A worker that had produced results died of a job (or an outside kill): its replacement
/// is forked at once, and the job is retried there.
#[test]
fn a_crash_after_the_first_result_replaces_the_worker_at_once() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    assert_eq!(
        s.finish(w1).answers(),
        vec![(1, Status::Ok, "r1".to_string())]
    );
    s.submit(2);
    assert_eq!(s.tick().sends(), vec![(w1, 2)]);
    s.at(secs(1));
    let out = s.crash(w1);
    assert!(
        out.logged("retrying job 2 on another worker (worker killed by SIGSEGV, attempt 1 of 3)")
    );
    assert!(!out.logged("back-off"), "{:?}", out.logs());
    assert_eq!(s.state(0), PoolState::Ok);
    let out = s.tick();
    let w2 = out.spawns()[0].0;
    assert_eq!(out.sends(), vec![(w2, 2)]);
}

/// A job whose workers keep dying is tried max_attempts times in all, then failed with the
/// reason and the count.
#[test]
fn a_job_whose_workers_die_is_failed_after_max_attempts_with_the_reason() {
    let mut s = Sim::new(vec![pool("p", "max_attempts = 2\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    let out = s.crash(w1);
    assert!(out.logged("attempt 1 of 2"));
    assert!(out.answers().is_empty());
    s.at(ms(100));
    let w2 = s.tick().sends()[0].0;
    assert_ne!(w1, w2);
    let out = s.crash(w2);
    assert_eq!(
        out.answers(),
        vec![(
            1,
            Status::Failed,
            "worker killed by SIGSEGV, attempt 2 of 2".to_string()
        )]
    );
    let stats = s.sup.pools()[0].stats;
    assert_eq!((stats.failed, stats.retried, stats.crashes), (1, 1, 2));
}

/// A worker that died before the job's frame reached it whole did not run the job: the job
/// goes back to the queue without using up an attempt.
#[test]
fn a_crash_before_its_job_reached_the_worker_costs_the_job_no_attempt() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    let pid = s.pid(w1);
    let out = s.reap_written(w1, WaitStatus::Signaled(pid, Signal::SIGSEGV, false), 0);
    assert!(!out.logged("retrying"), "{:?}", out.logs());
    assert_eq!(s.queued(0), vec![1]);
    assert_eq!(s.sup.jobs[&s.key(1)].failures, 0);
}

/// A job that crashes a second fresh worker of a pool known to work is to blame: the crash
/// back-off the first crash added is taken back, and the next worker is forked at once.
#[test]
fn a_job_that_crashes_two_fresh_workers_is_the_jobs_fault() {
    let mut s = Sim::new(vec![pool("p", "max_jobs = 1\n")]);
    let w1 = s.start()[0];
    // The pool works: a result, then a clean recycle at max_jobs.
    s.submit(1);
    s.tick();
    s.finish(w1);
    assert!(s.leave(w1, 200).logged("recycled (max_jobs reached)"));
    s.submit(2); // the poison job
    let out = s.tick();
    let w2 = out.spawns()[0].0;
    assert_eq!(out.sends(), vec![(w2, 2)]);
    s.at(secs(1));
    let out = s.crash(w2);
    assert!(
        out.logged("next worker in 100ms (crash back-off)"),
        "{:?}",
        out.logs()
    );
    assert_eq!(s.state(0), PoolState::BackingOff);
    s.at(ms(1100));
    let out = s.tick();
    let w3 = out.spawns()[0].0;
    assert_eq!(out.sends(), vec![(w3, 2)]);
    s.at(secs(2));
    let out = s.crash(w3);
    assert!(out.logged("pool p: the crash is its job's (it crashed a worker before); no back-off"));
    assert!(out.logged("attempt 2 of 3"));
    assert_eq!(s.state(0), PoolState::Ok, "the first crash was forgiven");
    assert_eq!(s.sup.pools()[0].backoff.next_spawn, None);
    let out = s.tick();
    assert_eq!(out.spawns().len(), 1, "forked at once");
    assert_eq!(out.sends().len(), 1);
}

// ---- timeouts ---------------------------------------------------------------------------------

/// A job past job_timeout: SIGTERM (and a replacement forked at once), then SIGKILL after
/// KILL_GRACE; once the worker is gone the job is retried, counted a timeout.
#[test]
fn a_job_past_its_timeout_is_sigtermed_then_sigkilled_after_the_grace() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.at(ms(4999));
    assert!(s.tick().signals().is_empty());
    s.at(secs(5));
    let out = s.tick();
    assert_eq!(out.signals(), vec![(w1, Signal::SIGTERM)]);
    assert!(out.logged("worker 1001 (pool p): job ran past job_timeout 5s; SIGTERM, SIGKILL in 3s"));
    assert_eq!(out.spawns().len(), 1, "its replacement starts at once");
    let w2 = out.spawns()[0].0;
    assert_eq!(s.next_deadline(), Some(s.t(secs(5) + KILL_GRACE)));
    s.at(ms(7999));
    assert!(s.tick().signals().is_empty());
    s.at(secs(8));
    let out = s.tick();
    assert_eq!(out.signals(), vec![(w1, Signal::SIGKILL)]);
    assert!(out.logged("worker 1001 did not exit in time; SIGKILL"));
    let out = s.killed(w1);
    assert!(out.logged("killed: its job ran past job_timeout 5s"));
    assert!(out.logged("retrying job 1 on another worker (job timed out after 5s, attempt 1 of 3)"));
    assert_eq!(s.sup.pools()[0].stats.timeouts, 1);
    assert_eq!(s.tick().sends(), vec![(w2, 1)]);
}

/// Its attempts used up, a timed-out job is answered "job timed out after …" once its worker
/// is gone, however the worker ended.
#[test]
fn a_timed_out_job_is_answered_timed_out_once_its_worker_exits() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\nmax_attempts = 1\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.at(secs(5));
    s.tick();
    s.at(secs(6));
    let pid = s.pid(w1);
    let out = s.reap(w1, WaitStatus::Signaled(pid, Signal::SIGTERM, false));
    assert_eq!(
        out.answers(),
        vec![(
            1,
            Status::Failed,
            "job timed out after 5s, attempt 1 of 1".to_string()
        )]
    );
}

/// An outcome that arrives after the timeout was declared does not count: it is discarded,
/// and the job is answered as timed out when the worker is gone.
#[test]
fn an_outcome_after_the_timeout_is_discarded() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\nmax_attempts = 1\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.at(secs(5));
    s.tick();
    s.at(ms(5500));
    let out = s.finish(w1);
    assert!(out.answers().is_empty());
    assert!(
        out.logged("worker 1001: job 1 ended after passing job_timeout; its outcome is discarded")
    );
    let out = s.leave(w1, 0);
    assert_eq!(
        out.answers(),
        vec![(
            1,
            Status::Failed,
            "job timed out after 5s, attempt 1 of 1".to_string()
        )]
    );
    assert_eq!(s.answered[&1], 1);
    assert_eq!(s.sup.pools()[0].stats.done, 0);
}

/// A worker told to stop whose job then passes job_timeout: no second SIGTERM, and SIGKILL
/// no later than the grace it was given (here 6 s, before the 8 s a timeout allows).
#[test]
fn a_timeout_while_draining_sends_no_second_sigterm_and_keeps_its_grace() {
    let mut s = Sim::with(settings(secs(5)), vec![pool("p", "job_timeout = \"5s\"\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.at(secs(1));
    let out = s.admin(scale("p", 0), 1);
    assert_eq!(out.signals(), vec![(w1, Signal::SIGTERM)]);
    assert_eq!(
        out.replies(),
        vec![(
            SessionId(1),
            Reply::Scaled {
                pool: "p".into(),
                from: 1,
                to: 0
            }
        )]
    );
    assert_eq!(s.next_deadline(), Some(s.t(secs(5))), "its job's timeout");
    s.at(secs(5));
    let out = s.tick();
    assert!(out.signals().is_empty(), "no second SIGTERM");
    assert!(
        out.logged("worker 1001 (pool p, draining): job ran past job_timeout 5s; SIGKILL in 3s")
    );
    assert_eq!(s.next_deadline(), Some(s.t(secs(6))), "its grace, not 8 s");
    s.at(secs(6));
    assert_eq!(s.tick().signals(), vec![(w1, Signal::SIGKILL)]);
    let out = s.killed(w1);
    assert!(out.logged("job timed out after 5s, attempt 1 of 3"));
}

/// With a long grace, a draining worker's timed-out job gets KILL_GRACE, not the rest of it.
#[test]
fn a_timeout_while_draining_with_a_long_grace_kills_after_kill_grace() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.at(secs(1));
    s.admin(scale("p", 0), 1);
    s.at(secs(5));
    assert!(s.tick().signals().is_empty());
    assert_eq!(s.next_deadline(), Some(s.t(secs(8))));
    s.at(secs(8));
    assert_eq!(s.tick().signals(), vec![(w1, Signal::SIGKILL)]);
}

/// The shell reads a worker whose job looks past its timeout before the tick judges it.
#[test]
fn to_refresh_lists_a_worker_whose_job_looks_past_its_timeout() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\nworkers = 2\n")]);
    let ws = s.start();
    s.submit(1);
    s.tick();
    assert!(s.sup.to_refresh(s.t(ms(4999))).is_empty());
    assert_eq!(s.sup.to_refresh(s.t(secs(5))), vec![ws[0]]);
    assert_eq!(
        s.sup.to_refresh(s.t(secs(60))),
        vec![ws[0]],
        "not the idle one"
    );
}

/// Fresh facts: an outcome read just before the tick ends the job in time — no timeout.
#[test]
fn a_fresh_outcome_before_the_tick_prevents_the_timeout() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.at(secs(6));
    assert_eq!(s.sup.to_refresh(s.now), vec![w1]);
    let out = s.finish(w1);
    assert_eq!(out.answers(), vec![(1, Status::Ok, "r1".to_string())]);
    assert!(s.sup.to_refresh(s.now).is_empty());
    let out = s.tick();
    assert!(out.signals().is_empty());
    assert!(s.w(w1).life.takes_jobs());
}

// ---- deadlines --------------------------------------------------------------------------------

/// An idle master sleeps: no deadline while nothing runs and nothing waits.
#[test]
fn next_deadline_is_none_when_idle() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\nworkers = 2\n")]);
    let w1 = s.start()[0];
    assert_eq!(s.next_deadline(), None);
    s.submit(1);
    s.tick();
    s.at(secs(1));
    s.finish(w1);
    s.tick();
    assert_eq!(s.next_deadline(), None);
}

/// The loop wakes for a job's timeout, then for the SIGKILL after the grace.
#[test]
fn next_deadline_is_the_job_timeout_then_the_kill_grace() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\n")]);
    s.start();
    s.at(secs(1));
    s.submit(1);
    s.tick();
    assert_eq!(s.next_deadline(), Some(s.t(secs(6))));
    s.at(secs(6));
    s.tick();
    assert_eq!(s.next_deadline(), Some(s.t(secs(9))));
}

/// The earliest wins: a back-off that ends before a running job's timeout.
#[test]
fn next_deadline_is_the_earliest_of_back_off_and_job_timeout() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\nworkers = 2\n")]);
    let ws = s.start();
    s.submit(1);
    assert_eq!(s.tick().sends(), vec![(ws[0], 1)]);
    s.at(secs(1));
    s.crash(ws[1]);
    s.tick();
    assert_eq!(s.next_deadline(), Some(s.t(ms(1100))), "the back-off");
    s.at(ms(1100));
    assert_eq!(s.tick().spawns().len(), 1);
    assert_eq!(s.next_deadline(), Some(s.t(secs(5))), "then the job");
}

/// Stopping, with only a killed worker left to reap: the stopping deadline; once it has
/// passed, nothing (SIGCHLD wakes the loop for the reaping).
#[test]
fn next_deadline_is_the_stopping_deadline_while_reaping_and_none_after() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.on(Event::Broke {
        worker: w1,
        what: "a malformed frame".into(),
    });
    assert_eq!(s.next_deadline(), None, "a killed worker has no deadline");
    s.at(secs(1));
    s.stop();
    assert_eq!(s.next_deadline(), Some(s.t(secs(11))));
    s.at(secs(11));
    assert!(s.tick().signals().is_empty(), "killed already");
    assert_eq!(s.next_deadline(), None);
    let out = s.killed(w1);
    assert_eq!(out.answers().len(), 1);
    assert!(s.sup.finished());
}

// ---- holding back under low memory ------------------------------------------------------------

/// A worker holding back (short of memory) is sent nothing, and its head job — not started —
/// is not timed, however long it holds; it takes jobs again (and is timed) once it says so.
#[test]
fn a_holding_worker_is_sent_no_jobs_and_its_head_is_not_timed() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.submit(2);
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w1, 2)]);
    s.said(w1, WorkerSaid::Hold { paused: true });
    assert_eq!(s.w(w1).life.as_str(true), "holding");
    s.submit(3);
    assert!(s.tick().sends().is_empty());
    assert_eq!(s.next_deadline(), None);
    s.at(secs(1000));
    assert!(s.sup.to_refresh(s.now).is_empty());
    let out = s.tick();
    assert!(out.signals().is_empty() && out.sends().is_empty());
    // A second HOLD does not start a clock either.
    s.said(w1, WorkerSaid::Hold { paused: true });
    s.at(secs(2000));
    s.said(w1, WorkerSaid::Hold { paused: false });
    assert_eq!(s.tick().sends(), vec![(w1, 3)]);
    assert_eq!(s.next_deadline(), Some(s.t(secs(2005))));
}

/// What a holding worker holds goes, all of it, to a worker that is idle.
#[test]
fn a_holding_workers_jobs_are_recalled_for_an_idle_worker() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    let (w1, w2) = (ws[0], ws[1]);
    for id in 1..=4 {
        s.submit(id);
    }
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w2, 2), (w1, 3), (w2, 4)]);
    s.said(w1, WorkerSaid::Hold { paused: true });
    s.finish(w2);
    s.finish(w2);
    assert_eq!(s.tick().recalls(), vec![w1]);
    let out = s.on(Event::Recalled {
        worker: w1,
        started_through: 0,
        written_through: 2,
    });
    assert!(out.logged("worker 1001: took back 2 job(s) it had not started, for an idle worker"));
    assert_eq!(out.sends(), vec![(w2, 1), (w2, 3)]);
    assert!(s.held(w1).is_empty());
}

// ---- reloads ----------------------------------------------------------------------------------

/// A reload asked for while the master stops is answered "shutting down"; nothing starts.
#[test]
fn a_reload_during_a_stop_is_refused() {
    let mut s = Sim::new(vec![pool("p", "")]);
    s.start();
    s.stop();
    let out = s.admin(Command::Reload, 7);
    assert_eq!(
        out.replies(),
        vec![(
            SessionId(7),
            Reply::Reloaded(ReloadReport {
                at: String::new(),
                ok: false,
                message: "the master is shutting down".into()
            })
        )]
    );
    assert_eq!(out.count(is_prepare_reload), 0);
    let out = s.signal(Command::Reload, Signal::SIGHUP);
    assert_eq!(out.count(is_prepare_reload), 0);
}

/// A reload asked for during another runs once more when the first ends (the config as it is
/// then); each session hears the outcome of the reload that covers its request.
#[test]
fn a_hup_during_a_reload_runs_one_more_reload_after_it() {
    let mut s = Sim::new(vec![pool("p", "")]);
    s.start();
    let out = s.admin(Command::Reload, 1);
    assert_eq!(out.count(is_prepare_reload), 1);
    assert_eq!(out.notes(), vec!["RELOADING=1"]);
    assert_eq!(
        s.signal(Command::Reload, Signal::SIGHUP)
            .count(is_prepare_reload),
        0
    );
    assert!(s.admin(Command::Reload, 2).effects.is_empty());
    let out = s.on(Event::ReloadFailed {
        error: ReloadError::RestartOnly {
            key: "server.socket",
        },
        at: "T1".into(),
    });
    let failed = ReloadReport {
        at: "T1".into(),
        ok: false,
        message: "server.socket changed: that takes a restart of the master, not a reload".into(),
    };
    assert_eq!(out.replies(), vec![(SessionId(1), Reply::Reloaded(failed))]);
    assert_eq!(
        out.count(is_prepare_reload),
        1,
        "the one asked for meanwhile"
    );
    let out = s.on(Event::ReloadReady(plan(vec![PlanEntry::Keep {
        pool: 0,
        config: config("p", ""),
    }])));
    assert_eq!(
        out.replies(),
        vec![(
            SessionId(2),
            Reply::Reloaded(ReloadReport {
                at: "T".into(),
                ok: true,
                message: "generation 2: kept p; replaced -; added -; removed -".into()
            })
        )]
    );
    assert_eq!(out.count(is_prepare_reload), 0, "nothing more was asked");
    assert_eq!(s.sup.generation(), 2);
}

/// A failed reload changes nothing, is logged and recorded for `status` with ok = false, and
/// the master tells systemd it serves again.
#[test]
fn a_failed_reload_is_recorded_and_changes_nothing() {
    let mut s = Sim::new(vec![pool("p", "")]);
    s.start();
    s.signal(Command::Reload, Signal::SIGHUP);
    let out = s.on(Event::ReloadFailed {
        error: ReloadError::ShuttingDown,
        at: "T1".into(),
    });
    assert!(out.logged("reload failed, nothing changed: the master is shutting down"));
    assert_eq!(out.notes(), vec!["READY=1"]);
    assert!(out.replies().is_empty(), "a SIGHUP waits for nobody");
    let report = s.sup.last_reload().unwrap();
    assert!(!report.ok);
    assert_eq!(report.at, "T1");
    assert_eq!(s.sup.generation(), 1);
}

/// Phase 2: kept pools keep their workers (and take the new worker count), replaced pools get
/// new-generation workers while the old ones are told to stop, added pools start, removed
/// pools retire; the generation goes up.
#[test]
fn a_reload_plan_keeps_replaces_adds_and_removes_pools() {
    let mut s = Sim::new(vec![pool("a", ""), pool("b", ""), pool("c", "")]);
    let ws = s.start();
    let (wa, wb, wc) = (ws[0], ws[1], ws[2]);
    s.admin(Command::Reload, 1);
    let out = s.on(Event::ReloadReady(plan(vec![
        PlanEntry::Keep {
            pool: 0,
            config: config("a", "workers = 2\n"),
        },
        PlanEntry::Replace {
            pool: 1,
            config: config("b", ""),
            build: build("b2", "2.0"),
        },
        PlanEntry::Add {
            config: config("e", ""),
            build: build("e", "1.0"),
        },
    ])));
    assert_eq!(out.signals(), vec![(wb, Signal::SIGTERM)]);
    assert_eq!(
        out.replies(),
        vec![(
            SessionId(1),
            Reply::Reloaded(ReloadReport {
                at: "T".into(),
                ok: true,
                message: "generation 2: kept a; replaced b (b2 2.0); added e; removed c".into()
            })
        )]
    );
    assert_eq!(s.sup.generation(), 2);
    assert_eq!(s.sup.last_reload().map(|r| r.ok), Some(true));
    let pools = s.sup.pools();
    assert_eq!(pools.len(), 4);
    assert_eq!(
        (pools[1].plugin.as_str(), pools[1].plugin_version.as_str()),
        ("b2", "2.0")
    );
    assert!(pools[2].retiring);
    assert_eq!(pools[3].config.name, "e");
    assert_eq!(s.sup.pool_named("c"), None);
    assert_eq!(s.sup.pool_named("e"), Some(3));

    let out = s.tick();
    assert_eq!(
        out.signals(),
        vec![(wc, Signal::SIGTERM)],
        "c is idle: it stops"
    );
    assert!(out.logged("pool c (removed from the config) has drained; stopping its workers"));
    let mut spawned: Vec<usize> = out.spawns().iter().map(|(_, p)| *p).collect();
    spawned.sort_unstable();
    assert_eq!(spawned, vec![0, 1, 3], "a's second, b's new one, e's");
    for (w, _) in out.spawns() {
        assert_eq!(s.w(w).generation, 2);
    }
    assert_eq!(s.w(wa).generation, 1, "kept");
    assert_eq!(s.sup.live_workers(1), 1, "the old b worker drains");
    s.leave(wb, 0);
    s.leave(wc, 0);
    let out = s.tick();
    assert_eq!(
        out.count(|e| matches!(e, Effect::DropInstance { pool: 2 })),
        1
    );
    assert!(out.logged("pool c (removed from the config) is gone"));
    assert!(s.sup.pools()[2].gone());
}

/// A removed pool runs what it holds to the end: its worker stays until its jobs are done,
/// then is stopped, then the pool is gone; it takes no new job meanwhile.
#[test]
fn a_removed_pool_drains_its_jobs_then_stops_then_is_gone() {
    let mut s = Sim::new(vec![pool("p", ""), pool("q", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.submit(2);
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w1, 2)]);
    s.signal(Command::Reload, Signal::SIGHUP);
    let out = s.on(Event::ReloadReady(plan(vec![PlanEntry::Keep {
        pool: 1,
        config: config("q", ""),
    }])));
    assert!(out.logged("removed p"), "{:?}", out.logs());
    assert_eq!(
        s.submit(3).answers(),
        vec![(3, Status::Rejected, "unknown pool \"p\"".to_string())]
    );
    assert!(s.tick().signals().is_empty(), "it holds jobs");
    s.finish(w1);
    assert!(s.tick().signals().is_empty(), "it holds a job");
    s.finish(w1);
    let out = s.tick();
    assert_eq!(out.signals(), vec![(w1, Signal::SIGTERM)]);
    assert!(out.logged("pool p (removed from the config) has drained; stopping its workers"));
    s.leave(w1, 0);
    let out = s.tick();
    assert_eq!(
        out.count(|e| matches!(e, Effect::DropInstance { pool: 0 })),
        1
    );
    assert!(out.logged("pool p (removed from the config) is gone"));
    assert_eq!(
        s.tick().count(|e| matches!(e, Effect::DropInstance { .. })),
        0,
        "once"
    );
}

/// A removed pool with jobs queued and no worker (scaled to 0) gets one to run them.
#[test]
fn a_removed_pool_with_queued_jobs_and_no_worker_gets_one_to_drain_them() {
    let mut s = Sim::new(vec![pool("p", ""), pool("q", "")]);
    let w1 = s.start()[0];
    s.admin(scale("p", 0), 1);
    s.leave(w1, 0);
    s.submit(1);
    assert!(s.tick().spawns().is_empty());
    s.signal(Command::Reload, Signal::SIGHUP);
    s.on(Event::ReloadReady(plan(vec![PlanEntry::Keep {
        pool: 1,
        config: config("q", ""),
    }])));
    let out = s.tick();
    assert_eq!(out.spawns().len(), 1);
    let w3 = out.spawns()[0].0;
    assert_eq!(out.sends(), vec![(w3, 1)]);
    s.finish(w3);
    assert_eq!(s.tick().signals(), vec![(w3, Signal::SIGTERM)]);
    s.leave(w3, 0);
    assert_eq!(
        s.tick()
            .count(|e| matches!(e, Effect::DropInstance { pool: 0 })),
        1
    );
}

/// A pool stopped by an operator and then removed will never run its queue: it is answered
/// at once.
#[test]
fn a_removed_stopped_pools_queue_is_answered_at_once() {
    let mut s = Sim::new(vec![pool("p", ""), pool("q", "")]);
    let w1 = s.start()[0];
    let out = s.admin(Command::StopPool { pool: "p".into() }, 1);
    assert_eq!(out.signals(), vec![(w1, Signal::SIGTERM)]);
    s.leave(w1, 0);
    s.submit(1);
    s.signal(Command::Reload, Signal::SIGHUP);
    let out = s.on(Event::ReloadReady(plan(vec![PlanEntry::Keep {
        pool: 1,
        config: config("q", ""),
    }])));
    assert_eq!(
        out.answers(),
        vec![(
            1,
            Status::Failed,
            "pool p was removed from the config while stopped".to_string()
        )]
    );
    let out = s.tick().and(s.tick());
    assert_eq!(
        out.count(|e| matches!(e, Effect::DropInstance { pool: 0 })),
        1
    );
}

/// BUG: a stopped pool is removed while its draining worker still holds a job it has not
/// started; when that worker leaves, the job goes back to the removed pool's queue — which no
/// worker will ever run (the pool is stopped, and `start` cannot name it any more). It must be
/// answered like the rest of the queue was.
#[test]
fn a_removed_stopped_pool_answers_the_jobs_its_draining_worker_gives_back() {
    let mut s = Sim::new(vec![pool("p", ""), pool("q", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.submit(2);
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w1, 2)]);
    s.admin(Command::StopPool { pool: "p".into() }, 1);
    s.signal(Command::Reload, Signal::SIGHUP);
    s.on(Event::ReloadReady(plan(vec![PlanEntry::Keep {
        pool: 1,
        config: config("q", ""),
    }])));
    s.finish(w1);
    s.leave(w1, 0); // between jobs: job 2 never started
    for n in 1..=5 {
        s.at(secs(n * 10));
        s.tick();
    }
    assert_eq!(
        s.answered.get(&2),
        Some(&1),
        "job 2 is stranded in the queue of a removed, stopped pool: {:?}",
        s.queued(0)
    );
    assert!(s.sup.pools()[0].gone());
}

// ---- scaling ----------------------------------------------------------------------------------

/// Scaling down stops idle workers first; workers that drain do not count as live, so
/// scaling up again forks new ones at once.
#[test]
fn scale_down_stops_idle_workers_first_and_draining_ones_do_not_count() {
    let mut s = Sim::new(vec![pool("p", "workers = 3\n")]);
    let ws = s.start();
    s.submit(1);
    assert_eq!(s.tick().sends(), vec![(ws[0], 1)]);
    let out = s.admin(scale("p", 1), 1);
    assert_eq!(
        out.signals(),
        vec![(ws[1], Signal::SIGTERM), (ws[2], Signal::SIGTERM)],
        "the idle ones"
    );
    assert_eq!(s.sup.live_workers(0), 1);
    assert!(s.tick().spawns().is_empty());
    s.admin(scale("p", 2), 1);
    let out = s.tick();
    assert_eq!(out.spawns().len(), 1, "the two draining do not count");
    let w4 = out.spawns()[0].0;
    assert_eq!(s.sup.live_workers(0), 2);
    // Down again while two drain: the idle new one goes, not the busy one.
    let out = s.admin(scale("p", 1), 1);
    assert_eq!(out.signals(), vec![(w4, Signal::SIGTERM)]);
}

/// Scaling up forks the missing workers in the next tick.
#[test]
fn scale_up_forks_the_missing_workers() {
    let mut s = Sim::new(vec![pool("p", "")]);
    s.start();
    let out = s.admin(scale("p", 3), 1);
    assert_eq!(
        out.replies(),
        vec![(
            SessionId(1),
            Reply::Scaled {
                pool: "p".into(),
                from: 1,
                to: 3
            }
        )]
    );
    assert_eq!(s.tick().spawns().len(), 2);
    assert_eq!(s.sup.live_workers(0), 3);
}

/// Commands naming no pool are refused with the pools there are; during a stop, with
/// "shutting down".
#[test]
fn commands_naming_an_unknown_pool_or_sent_while_stopping_are_refused() {
    let mut s = Sim::new(vec![pool("q", ""), pool("p", "")]);
    s.start();
    let out = s.admin(scale("zz", 1), 1);
    let refused = CommandError::NoPool {
        name: "zz".into(),
        pools: vec!["p".into(), "q".into()],
    };
    assert_eq!(refused.to_string(), "no pool \"zz\" (pools: p, q)");
    assert_eq!(out.replies(), vec![(SessionId(1), Reply::Refused(refused))]);
    s.stop();
    for command in [
        scale("p", 2),
        Command::Restart {
            target: Target::All,
        },
        Command::StopPool { pool: "p".into() },
        Command::StartPool { pool: "p".into() },
    ] {
        assert_eq!(
            s.admin(command, 2).replies(),
            vec![(SessionId(2), Reply::Refused(CommandError::ShuttingDown))]
        );
    }
}

/// TTIN: one worker more per pool and signal, capped at MAX_WORKERS, which the log says.
#[test]
fn ttin_adds_a_worker_per_pool_capped_at_max_workers() {
    let mut s = Sim::new(vec![pool("p", "")]);
    s.start();
    let out = s.signal(Command::AddWorkers(1), Signal::SIGTTIN);
    assert_eq!(out.logs(), vec!["SIGTTIN: pool p now wants 2 worker(s)"]);
    assert_eq!(s.tick().spawns().len(), 1);
    let out = s.signal(Command::AddWorkers(5000), Signal::SIGTTIN);
    assert_eq!(
        out.logs(),
        vec![format!(
            "SIGTTIN: pool p now wants {MAX_WORKERS} worker(s) (capped: a pool has at most {MAX_WORKERS})"
        )]
    );
    assert_eq!(s.sup.pools()[0].wanted, MAX_WORKERS);
}

/// TTOU: one worker fewer per pool and signal (an idle one first), never below zero.
#[test]
fn ttou_removes_a_worker_per_pool_idle_first_never_below_zero() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    s.submit(1);
    s.tick();
    let out = s.signal(Command::RemoveWorkers(1), Signal::SIGTTOU);
    assert_eq!(out.logs(), vec!["SIGTTOU: pool p now wants 1 worker(s)"]);
    assert_eq!(
        out.signals(),
        vec![(ws[1], Signal::SIGTERM)],
        "the idle one"
    );
    let out = s.signal(Command::RemoveWorkers(5), Signal::SIGTTOU);
    assert_eq!(out.logs(), vec!["SIGTTOU: pool p now wants 0 worker(s)"]);
    assert_eq!(out.signals(), vec![(ws[0], Signal::SIGTERM)]);
    assert_eq!(s.sup.pools()[0].wanted, 0);
}

// ---- back-off and failing ---------------------------------------------------------------------

/// Crashes of fresh workers: 100 ms, then 200 ms; the crash_limit-th within the window makes
/// the pool failing: one worker per failing_retry.
fn failing_pool() -> Sim {
    let mut s = Sim::new(vec![pool(
        "p",
        "crash_limit = 3\ncrash_window = \"60s\"\nfailing_retry = \"30s\"\n",
    )]);
    let w1 = s.start()[0];
    assert!(s
        .crash(w1)
        .logged("pool p: next worker in 100ms (crash back-off)"));
    s.at(ms(100));
    let w2 = s.tick().spawns()[0].0;
    assert!(s
        .crash(w2)
        .logged("pool p: next worker in 200ms (crash back-off)"));
    s.at(ms(299));
    assert!(s.tick().spawns().is_empty());
    s.at(ms(300));
    let w3 = s.tick().spawns()[0].0;
    let out = s.crash(w3);
    assert!(out.logged("pool p is failing: 3 crashes within 60s; trying one worker every 30s"));
    assert_eq!(s.state(0), PoolState::Failing);
    s
}

/// The back-off doubles with each crash, then the pool is failing and tries one worker
/// every failing_retry.
#[test]
fn back_off_doubles_then_the_pool_is_failing() {
    let mut s = failing_pool();
    assert!(s.tick().spawns().is_empty());
    assert_eq!(s.next_deadline(), Some(s.t(ms(30_300))));
    s.at(ms(30_299));
    assert!(s.tick().spawns().is_empty());
    s.at(ms(30_300));
    assert_eq!(s.tick().spawns().len(), 1);
}

/// `start` forgets the crash history: the pool forks at once.
#[test]
fn start_clears_the_failing_state() {
    let mut s = failing_pool();
    let out = s.admin(Command::StartPool { pool: "p".into() }, 1);
    assert_eq!(
        out.replies(),
        vec![(
            SessionId(1),
            Reply::StartingPool {
                pool: "p".into(),
                wanted: 1
            }
        )]
    );
    assert_eq!(s.state(0), PoolState::Ok);
    assert_eq!(s.tick().spawns().len(), 1);
}

/// `restart` forgets the crash history too.
#[test]
fn restart_clears_the_failing_state() {
    let mut s = failing_pool();
    let out = s.admin(
        Command::Restart {
            target: Target::Pool("p".into()),
        },
        1,
    );
    assert_eq!(
        out.replies(),
        vec![(
            SessionId(1),
            Reply::Restarting {
                workers: 0,
                pools: 1
            }
        )]
    );
    assert_eq!(s.state(0), PoolState::Ok);
    assert_eq!(s.tick().spawns().len(), 1);
}

/// `restart all`: every serving worker is told to stop, and replacements start at once.
#[test]
fn restart_all_replaces_every_worker_at_once() {
    let mut s = Sim::new(vec![pool("p", ""), pool("q", "")]);
    let ws = s.start();
    let out = s.admin(
        Command::Restart {
            target: Target::All,
        },
        1,
    );
    assert_eq!(
        out.signals(),
        vec![(ws[0], Signal::SIGTERM), (ws[1], Signal::SIGTERM)]
    );
    assert_eq!(
        out.replies(),
        vec![(
            SessionId(1),
            Reply::Restarting {
                workers: 2,
                pools: 2
            }
        )]
    );
    assert_eq!(s.tick().spawns().len(), 2);
}

/// `stop POOL` keeps its queue; `start POOL` runs it.
#[test]
fn a_stopped_pool_keeps_its_queue_until_started() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.admin(Command::StopPool { pool: "p".into() }, 1);
    s.leave(w1, 0);
    s.submit(1);
    assert!(s.tick().spawns().is_empty());
    assert_eq!(s.state(0), PoolState::Stopped);
    s.admin(Command::StartPool { pool: "p".into() }, 1);
    let out = s.tick();
    let w2 = out.spawns()[0].0;
    assert_eq!(out.sends(), vec![(w2, 1)]);
}

/// A loop plugin that says Stop stops its pool (no back-off, no replacement) until `start`.
#[test]
fn a_loop_plugins_stop_stops_the_pool_until_started() {
    let mut s = Sim::new(vec![pool("l", "mode = \"loop\"\n")]);
    let w1 = s.start()[0];
    let out = s.leave(w1, WorkerExit::PluginStopped.code());
    assert!(out.logged("pool l stopped by its plugin; `restart` it to start it again"));
    assert!(s.tick().spawns().is_empty());
    assert_eq!(s.sup.pools()[0].state(s.now), PoolState::Stopped);
    s.admin(Command::StartPool { pool: "l".into() }, 1);
    assert_eq!(s.tick().spawns().len(), 1);
}

/// A fork that fails for want of the master's own resources pauses every fork for a second,
/// said once; it is no crash of the pool.
#[test]
fn a_failed_fork_pauses_every_fork_for_a_moment() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    s.fail_spawns = true;
    let out = s.tick();
    assert_eq!(out.spawns().len(), 2);
    assert_eq!(
        out.logs()
            .iter()
            .filter(|l| l
                .contains("cannot start a worker for pool p: fork: EAGAIN; trying again in 1s"))
            .count(),
        1
    );
    s.fail_spawns = false;
    s.at(ms(999));
    assert!(s.tick().spawns().is_empty());
    assert_eq!(s.next_deadline(), Some(s.t(secs(1))));
    s.at(secs(1));
    assert_eq!(s.tick().spawns().len(), 2);
    assert_eq!(s.state(0), PoolState::Ok);
}

/// READY=1 once every pool has its workers, and only once.
#[test]
fn ready_is_notified_once_every_pool_is_up() {
    let mut s = Sim::new(vec![pool("p", ""), pool("q", "workers = 2\n")]);
    let out = s.tick();
    assert_eq!(out.notes(), vec!["READY=1\nSTATUS=serving 2 pool(s)"]);
    assert!(s.tick().notes().is_empty());
}

/// SIGUSR1: the master's log is reopened and every worker is told to reopen its own.
#[test]
fn reopening_logs_signals_every_worker() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    let out = s.admin(Command::ReopenLogs, 3);
    assert_eq!(out.count(|e| matches!(e, Effect::ReopenLogs)), 1);
    assert_eq!(
        out.signals(),
        vec![(ws[0], Signal::SIGUSR1), (ws[1], Signal::SIGUSR1)]
    );
    assert_eq!(out.replies(), vec![(SessionId(3), Reply::Ok)]);
}

// ---- stopping ---------------------------------------------------------------------------------

/// A graceful stop: queued jobs are answered "shutting down", no job is accepted any more,
/// every worker is told to finish its job and go; the master is finished once all are gone.
#[test]
fn a_graceful_stop_answers_the_queue_and_waits_for_running_jobs() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.at(secs(1));
    s.submit(2);
    s.submit(3);
    assert!(s.tick().sends().is_empty(), "behind a long job, they wait");
    let out = s.stop();
    assert_eq!(
        out.answers(),
        vec![
            (2, Status::Failed, "shutting down".to_string()),
            (3, Status::Failed, "shutting down".to_string())
        ]
    );
    assert_eq!(out.signals(), vec![(w1, Signal::SIGTERM)]);
    assert_eq!(out.count(is_stop_accepting), 1);
    assert_eq!(out.notes(), vec!["STOPPING=1"]);
    assert!(out.logged("SIGTERM: graceful stop; in-flight jobs have 10s to finish"));
    assert_eq!(
        s.submit(4).answers(),
        vec![(4, Status::Rejected, "shutting down".to_string())]
    );
    assert_eq!(
        s.finish(w1).answers(),
        vec![(1, Status::Ok, "r1".to_string())]
    );
    assert!(!s.sup.finished());
    assert!(s.tick().spawns().is_empty(), "no fork while stopping");
    s.leave(w1, 0);
    assert!(s.sup.finished());
}

/// Ctrl-C twice means now; a second SIGTERM (timeout, kill of the group, systemd) does not.
#[test]
fn a_second_sigint_stops_now_a_second_sigterm_does_not() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    let out = s.signal(Command::Stop { escalate: true }, Signal::SIGINT);
    assert_eq!(out.signals(), vec![(w1, Signal::SIGTERM)]);
    let out = s.signal(Command::Stop { escalate: false }, Signal::SIGTERM);
    assert!(out.signals().is_empty());
    assert!(out.answers().is_empty());
    assert!(out.logged("SIGTERM: already stopping"));
    let out = s.signal(Command::Stop { escalate: true }, Signal::SIGINT);
    assert!(out.logged("SIGINT again: stopping now"));
    assert_eq!(out.signals(), vec![(w1, Signal::SIGKILL)]);
    assert_eq!(
        out.count(|e| matches!(e, Effect::DiscardOutput { worker } if *worker == w1)),
        1
    );
    assert_eq!(
        out.answers(),
        vec![(1, Status::Failed, "shutting down".to_string())]
    );
}

/// Stop now: every job is answered at once, every worker SIGKILLed with nothing more written
/// to it; their deaths count as stops, and nothing is answered twice.
#[test]
fn stop_now_answers_every_job_and_kills_every_worker() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    s.submit(1);
    s.submit(2);
    s.tick();
    s.at(secs(1));
    s.submit(3);
    assert!(s.tick().sends().is_empty());
    let out = s.signal(Command::StopNow, Signal::SIGQUIT);
    let mut answered: Vec<u64> = out.answers().iter().map(|a| a.0).collect();
    answered.sort_unstable();
    assert_eq!(answered, vec![1, 2, 3]);
    assert!(out
        .answers()
        .iter()
        .all(|a| a.1 == Status::Failed && a.2 == "shutting down"));
    assert_eq!(
        out.signals(),
        vec![(ws[0], Signal::SIGKILL), (ws[1], Signal::SIGKILL)]
    );
    assert_eq!(out.count(|e| matches!(e, Effect::DiscardOutput { .. })), 2);
    assert_eq!(out.count(is_stop_accepting), 1);
    let out = s.killed(ws[0]).and(s.killed(ws[1]));
    assert!(out.answers().is_empty());
    assert_eq!(s.sup.pools()[0].stats.stopped, 2);
    assert!(s.sup.finished());
}

/// A worker still running at the stop's deadline is SIGKILLed; its job is answered
/// "shutting down" once it is reaped.
#[test]
fn a_stop_past_its_grace_kills_the_workers_and_answers_their_jobs() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"0\"\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.stop();
    assert_eq!(s.next_deadline(), Some(s.t(GRACE)));
    s.at(GRACE);
    assert_eq!(s.tick().signals(), vec![(w1, Signal::SIGKILL)]);
    let out = s.killed(w1);
    assert_eq!(
        out.answers(),
        vec![(1, Status::Failed, "shutting down".to_string())]
    );
    assert!(out.logged("stopped"));
    assert!(s.sup.finished());
}

/// BUG: a pool that crashed lately has a back-off instant in the past; during a graceful stop
/// its workers drain, so it looks short of workers, and `next_deadline` returns that past
/// instant: the loop would wake every millisecond until the workers are gone — though
/// nothing is forked while stopping.
#[test]
fn a_stopping_master_does_not_wake_for_a_pools_back_off() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.crash(w1);
    s.at(ms(100));
    let w2 = s.tick().spawns()[0].0;
    s.submit(1);
    assert_eq!(s.tick().sends(), vec![(w2, 1)]);
    s.at(secs(1));
    s.stop();
    assert_eq!(
        s.next_deadline(),
        Some(s.t(secs(11))),
        "the stop's deadline (and its worker's), not the back-off of a pool that forks nothing"
    );
}

// ---- jobs in ----------------------------------------------------------------------------------

/// Submits the master cannot take are rejected at once, with why.
#[test]
fn submits_are_rejected_with_their_reason() {
    let redis = "source = \"redis\"\n[pool.redis]\nurl = \"/tmp/r.sock\"\nstream = \"s\"\n";
    let mut s = Sim::new(vec![
        pool("p", ""),
        pool("l", "mode = \"loop\"\n"),
        pool("r", redis),
    ]);
    let cases: [(&str, usize, &str); 4] = [
        ("zz", 3, "unknown pool \"zz\""),
        ("l", 3, "pool \"l\" is a loop-mode pool; it takes no jobs"),
        (
            "r",
            3,
            "pool \"r\" is fed from Redis: use `jobhost submit -c CONFIG r`, or XADD to its stream",
        ),
        (
            "p",
            2000,
            "payload too large (2000 bytes, max_payload is 1024)",
        ),
    ];
    for (n, (pool, size, why)) in cases.into_iter().enumerate() {
        let out = s.submit_to(ClientId(1), n as u64, pool, &vec![b'x'; size]);
        assert_eq!(
            out.answers(),
            vec![(n as u64, Status::Rejected, why.to_string())],
            "{pool}"
        );
        assert_eq!(
            out.count(|e| matches!(e, Effect::Answer { payload_len, .. } if *payload_len == size)),
            1,
            "the client's budget gets the payload back"
        );
    }
    assert!(s.sup.jobs.is_empty());
    // Counted by reason for `jobhost_pool_jobs_rejected_total` (an unknown pool on its own).
    let rejected = |s: &Sim, pool: usize| s.sup.pools()[pool].metrics.rejected;
    let mut want = [0u64; Rejection::ALL.len()];
    want[Rejection::TooLarge as usize] = 1;
    assert_eq!(rejected(&s, 0), want);
    let mut want = [0u64; Rejection::ALL.len()];
    want[Rejection::NotSubmittable as usize] = 1;
    assert_eq!((rejected(&s, 1), rejected(&s, 2)), (want, want));
    assert_eq!(s.sup.unknown_pool_submits(), 1);
    let ok = s.submit_to(ClientId(1), 9, "p", &[b'x'; 1024]);
    assert!(ok.answers().is_empty(), "max_payload itself is fine");
    // While the master stops.
    s.start();
    s.stop();
    let out = s.submit_to(ClientId(1), 10, "p", b"x");
    assert_eq!(out.answers()[0].1, Status::Rejected);
    assert_eq!(rejected(&s, 0)[Rejection::ShuttingDown as usize], 1);
}

/// A pool whose queue holds max_queue jobs rejects the next one.
#[test]
fn a_full_queue_rejects_the_next_submit() {
    let mut s = Sim::new(vec![pool("p", "max_queue = 2\n")]);
    assert!(s.submit(1).answers().is_empty());
    assert!(s.submit(2).answers().is_empty());
    assert_eq!(
        s.submit(3).answers(),
        vec![(
            3,
            Status::Rejected,
            "queue full (2 jobs queued for pool \"p\")".to_string()
        )]
    );
}

/// A client gone: its jobs already sent to a worker run on (they may have started), their
/// answers go nowhere; its queued jobs are dropped, counted and logged once; the other
/// client's jobs are untouched.
#[test]
fn a_gone_clients_queued_jobs_are_dropped_and_its_running_ones_finish() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    for id in 1..=10 {
        s.submit_to(ClientId(2), id, "p", b"job");
    }
    assert_eq!(s.tick().sends().len(), 4, "a worker holds a few ahead");
    s.submit_to(ClientId(3), 100, "p", b"job");
    let gone = s.on(Event::ClientGone(ClientId(2)));
    assert_eq!(
        gone.logs(),
        vec!["client 2 went away: dropped its queued jobs nobody will answer (6 in pool p)"]
    );
    assert!(gone.answers().is_empty());
    assert_eq!(
        s.queued(0),
        vec![100],
        "only the other client's job is left"
    );
    assert_eq!(s.sup.pools()[0].stats.dropped, 6);
    for _ in 0..4 {
        assert!(s.finish(w1).answers().is_empty(), "answered nowhere");
    }
    assert_eq!(s.tick().sends(), vec![(w1, 100)]);
    assert_eq!(s.finish(w1).answers().len(), 1, "the other client's");
    assert_eq!(s.sup.pools()[0].stats.done, 5);
    assert!(s.sup.jobs.is_empty());
    assert!(
        s.on(Event::ClientGone(ClientId(3))).logs().is_empty(),
        "nothing of it was queued"
    );
    assert_eq!(s.sup.pools()[0].stats.dropped, 6);
}

/// Detached jobs outlive their client: they stay queued and run, answered nowhere; its other
/// jobs are dropped.
#[test]
fn detached_jobs_run_after_their_client_has_gone() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit_detached(ClientId(2), 1);
    s.submit_to(ClientId(2), 2, "p", b"job");
    s.submit_detached(ClientId(2), 3);
    s.on(Event::ClientGone(ClientId(2)));
    assert_eq!(s.queued(0), vec![1, 3]);
    assert_eq!(s.sup.pools()[0].stats.dropped, 1);
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w1, 3)]);
    assert!(s.finish(w1).answers().is_empty());
    assert!(s.finish(w1).answers().is_empty());
    assert_eq!(s.sup.pools()[0].stats.done, 2);
    assert!(s.sup.jobs.is_empty());
}

/// Jobs a worker gave back (its crash) go to the front of the queue; if their client has gone
/// meanwhile they are dropped like its other queued jobs, not run for nobody.
#[test]
fn given_back_jobs_of_a_gone_client_are_dropped_too() {
    let mut s = Sim::new(vec![pool("p", "max_attempts = 3\n")]);
    let w1 = s.start()[0];
    for id in 1..=3 {
        s.submit_to(ClientId(2), id, "p", b"job");
    }
    s.submit_detached(ClientId(2), 4);
    s.tick();
    s.crash(w1);
    assert_eq!(s.queued(0), vec![1, 2, 3, 4], "given back, in order");
    s.on(Event::ClientGone(ClientId(2)));
    assert_eq!(s.queued(0), vec![4], "the detached one stays");
    assert_eq!(s.sup.pools()[0].stats.dropped, 3);
}

/// One client's flood does not hold up another client's job: the lanes take turns, so the
/// other's job goes out with the next job sent, not after the flood.
#[test]
fn a_flood_from_one_client_does_not_hold_up_another_clients_job() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    for id in 1..=1000 {
        s.submit_to(ClientId(1), id, "p", b"job");
    }
    s.submit_to(ClientId(2), 5000, "p", b"job");
    assert_eq!(
        s.tick().sends(),
        vec![(w1, 1), (w1, 5000), (w1, 2), (w1, 3)],
        "the second client's job is sent second, not 1001st"
    );
    // With the worker full of the flood: among the next two jobs sent once one finishes.
    s.submit_to(ClientId(3), 6000, "p", b"job");
    s.finish(w1);
    let sends = s.tick().sends();
    assert_eq!(sends[..2], [(w1, 4), (w1, 6000)], "{sends:?}");
}

/// A pool whose queue one client filled to max_queue still takes jobs of other clients, up to
/// each one's fair share of max_queue, and twice max_queue in all; the flooder gets no more.
#[test]
fn a_flooder_cannot_make_another_clients_job_queue_full() {
    let mut s = Sim::new(vec![pool("p", "max_queue = 4\nworkers = 0\n")]);
    let flooder = ClientId(1);
    for id in 1..=4 {
        assert!(s.submit_to(flooder, id, "p", b"job").answers().is_empty());
    }
    assert_eq!(
        s.submit_to(flooder, 5, "p", b"job").answers(),
        vec![(
            5,
            Status::Rejected,
            "queue full (4 jobs queued for pool \"p\")".to_string()
        )]
    );
    let other = ClientId(2);
    assert!(s.submit_to(other, 10, "p", b"job").answers().is_empty());
    assert!(s.submit_to(other, 11, "p", b"job").answers().is_empty());
    assert_eq!(
        s.submit_to(other, 12, "p", b"job").answers(),
        vec![(
            12,
            Status::Rejected,
            "queue full (6 jobs queued, 2 of them this connection's; its fair share is 2 for pool \"p\")"
                .to_string()
        )],
        "its share: max_queue over the two clients"
    );
    assert_eq!(s.submit_to(flooder, 6, "p", b"job").answers().len(), 1);
    // Two more clients get one job each (a share of 4/3, then 4/4); then the queue holds
    // twice max_queue and takes nothing more.
    assert!(s
        .submit_to(ClientId(3), 20, "p", b"job")
        .answers()
        .is_empty());
    assert!(s
        .submit_to(ClientId(4), 30, "p", b"job")
        .answers()
        .is_empty());
    assert_eq!(s.sup.pools()[0].queue.len(), 8);
    assert_eq!(s.submit_to(ClientId(5), 40, "p", b"job").answers().len(), 1);
    assert_eq!(s.sup.pools()[0].queue.len(), 8);
}

// ---- protocol violations ----------------------------------------------------------------------

/// Bytes no worker sends: SIGKILL, nothing more read from it, its exit a crash; the job it
/// ran is retried (an attempt used), the others go back to the front of the queue.
#[test]
fn a_broken_frame_kills_and_forgets_the_worker_and_requeues_its_jobs() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.submit(2);
    s.tick();
    let out = s.on(Event::Broke {
        worker: w1,
        what: "a malformed frame: zero length".into(),
    });
    assert_eq!(out.signals(), vec![(w1, Signal::SIGKILL)]);
    assert_eq!(
        out.count(|e| matches!(e, Effect::Forget { worker } if *worker == w1)),
        1
    );
    assert!(out.logged(
        "worker 1001 (pool p) broke the protocol: it sent a malformed frame: zero length; killing it"
    ));
    assert_eq!(s.sup.live_workers(0), 0);
    assert!(s.finish(w1).effects.is_empty(), "nothing it says counts");
    let out = s.killed(w1);
    assert!(out.logged(
        "crashed: killed for breaking the protocol (it sent a malformed frame: zero length)"
    ));
    assert!(out.logged("attempt 1 of 3"));
    assert_eq!(s.queued(0), vec![1, 2]);
    assert_eq!(s.sup.jobs[&s.key(2)].failures, 0);
    assert_eq!(s.sup.pools()[0].stats.crashes, 1);
}

/// A worker speaks only for its own jobs: an outcome for another's is a violation, and the
/// other's job is left alone for the worker that holds it.
#[test]
fn an_outcome_for_another_workers_job_is_a_violation_and_leaves_that_job_alone() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    s.submit(1);
    s.submit(2);
    assert_eq!(s.tick().sends(), vec![(ws[0], 1), (ws[1], 2)]);
    let out = s.outcome(ws[0], 2, true);
    assert!(out.answers().is_empty());
    assert_eq!(out.signals(), vec![(ws[0], Signal::SIGKILL)]);
    assert!(out.logged("it sent an outcome for job 2, which it does not hold"));
    assert_eq!(
        s.finish(ws[1]).answers(),
        vec![(2, Status::Ok, "r2".to_string())]
    );
    s.killed(ws[0]);
    assert_eq!(s.queued(0), vec![1], "retried");
}

fn progress(numerator: u64, denominator: u64) -> Reported {
    Reported::Progress {
        numerator,
        denominator,
    }
}

/// A watched job's progress and data go to its client, in order, before its answer; an
/// unwatched job's are dropped.
#[test]
fn reports_of_a_watched_job_reach_its_client_in_order_and_unwatched_ones_do_not() {
    let mut s = Sim::new(vec![pool(
        "p",
        "workers = 2
",
    )]);
    let ws = s.start();
    s.submit_watched(1);
    s.submit(2);
    assert_eq!(s.tick().sends(), vec![(ws[0], 1), (ws[1], 2)]);
    let mut reports = Vec::new();
    for report in [
        progress(1, 3),
        Reported::Data(b"part".to_vec()),
        progress(2, 3),
    ] {
        let out = s.report(ws[0], 1, report, 1);
        assert!(out.signals().is_empty());
        reports.extend(out.reports());
    }
    assert_eq!(
        reports,
        vec![
            (ClientId(1), 1, progress(1, 3)),
            (ClientId(1), 1, Reported::Data(b"part".to_vec())),
            (ClientId(1), 1, progress(2, 3)),
        ]
    );
    let out = s.report(ws[1], 2, progress(1, 2), 1);
    assert!(out.effects.is_empty(), "not watched: {:?}", out.effects);
    assert_eq!(
        s.finish(ws[0]).answers(),
        vec![(1, Status::Ok, "r1".into())]
    );
    // Its client gone, a watched job's reports go nowhere.
    s.submit_watched(3);
    assert_eq!(s.tick().sends(), vec![(ws[0], 3)]);
    s.on(Event::ClientGone(ClientId(1)));
    assert!(s.report(ws[0], 3, progress(1, 2), 2).effects.is_empty());
}

/// A report for a job the worker does not run (another's, one it holds but has not claimed,
/// one behind its head) is forged, like an outcome for a job it does not hold: the worker is
/// killed, nothing reaches a client, and the job named is left alone.
#[test]
fn a_forged_report_is_a_violation_like_a_forged_outcome() {
    let mut s = Sim::new(vec![pool(
        "p",
        "workers = 2
",
    )]);
    let ws = s.start();
    s.submit_watched(1);
    s.submit_watched(2);
    assert_eq!(s.tick().sends(), vec![(ws[0], 1), (ws[1], 2)]);
    let out = s.report(ws[0], 2, progress(1, 2), 1);
    assert!(out.reports().is_empty());
    assert_eq!(out.signals(), vec![(ws[0], Signal::SIGKILL)]);
    assert!(out.logged("it sent a report for job 2, which it does not hold"));
    assert!(
        s.report(ws[0], 1, progress(1, 2), 1).effects.is_empty(),
        "nothing it says counts"
    );
    assert_eq!(
        s.finish(ws[1]).answers(),
        vec![(2, Status::Ok, "r2".to_string())]
    );
    s.killed(ws[0]);
    assert_eq!(s.queued(0), vec![1], "retried");

    // Its own head, but not claimed (seq 1 not started): forged too.
    let mut s = Sim::new(vec![pool("p", "")]);
    let w = s.start()[0];
    s.submit_watched(1);
    s.tick();
    let out = s.report(w, 1, progress(1, 2), 0);
    assert!(out.reports().is_empty());
    assert_eq!(out.signals(), vec![(w, Signal::SIGKILL)]);
    assert!(out.logged("it sent a report for job 1 before it started it"));
}

/// A worker that sends more data for one job than a worker ever writes is killed; the limit
/// counts per job run, so the next job starts afresh.
#[test]
fn data_past_the_per_job_limit_is_a_violation() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w = s.start()[0];
    s.submit_watched(1);
    s.submit_watched(2);
    s.tick();
    let half = crate::protocol::MAX_JOB_DATA / 2;
    for _ in 0..2 {
        let out = s.report(w, 1, Reported::Data(vec![0; half]), 1);
        assert_eq!(out.reports().len(), 1);
    }
    s.finish(w);
    let out = s.report(w, 2, Reported::Data(vec![0; half]), 2);
    assert_eq!(out.reports().len(), 1, "a new job, a new allowance");
    let out = s.report(w, 2, Reported::Data(vec![0; half + 1]), 2);
    assert!(out.reports().is_empty());
    assert_eq!(out.signals(), vec![(w, Signal::SIGKILL)]);
    assert!(out.logged("more than 16777216 bytes of data for job"));
}

/// An outcome for a later job before the one it runs is a violation.
#[test]
fn an_outcome_out_of_order_is_a_violation() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.submit(2);
    s.tick();
    let out = s.outcome(w1, 2, true);
    assert!(out.answers().is_empty());
    assert_eq!(out.signals(), vec![(w1, Signal::SIGKILL)]);
    assert!(out.logged("it sent an outcome for job 2 before the job it runs"));
}

/// LEAVING is a worker's last frame: anything after it is a violation.
#[test]
fn a_frame_after_leaving_is_a_violation() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.said(
        w1,
        WorkerSaid::Leaving {
            code: 0,
            jobs_done: 0,
        },
    );
    let out = s.finish(w1);
    assert!(out.answers().is_empty());
    assert_eq!(out.signals(), vec![(w1, Signal::SIGKILL)]);
    assert!(out.logged("it sent a frame after LEAVING"));
    assert!(s
        .killed(w1)
        .logged("crashed: killed for breaking the protocol"));
}

/// BUG: a timed-out worker whose late outcome was discarded, then breaks the protocol: the
/// violation overwrites the overdue job in its life, so at its exit the timed-out job is
/// nowhere (not held, not queued, not answered: its client waits forever, and a graceful
/// stop never answers it), while the next job, which never started, is charged an attempt.
#[test]
fn a_violation_after_a_discarded_outcome_still_answers_the_timed_out_job() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\nmax_attempts = 1\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.submit(2);
    s.tick();
    s.at(secs(5));
    assert_eq!(s.tick().signals(), vec![(w1, Signal::SIGTERM)]);
    assert!(s.finish(w1).logged("its outcome is discarded"));
    s.on(Event::Broke {
        worker: w1,
        what: "a malformed frame".into(),
    });
    let out = s.killed(w1);
    assert_eq!(
        out.answers()
            .iter()
            .filter(|a| a.0 == 1)
            .cloned()
            .collect::<Vec<_>>(),
        vec![(
            1,
            Status::Failed,
            "job timed out after 5s, attempt 1 of 1".to_string()
        )],
        "job 1 (timed out) is answered; all answers: {:?}",
        out.answers()
    );
    assert_eq!(s.answered.get(&2), None, "job 2 never started");
    assert_eq!(s.queued(0), vec![2]);
}

// ---- leaving ----------------------------------------------------------------------------------

/// A worker that says LEAVING is replaced at once, and must be gone within KILL_GRACE: one
/// that stays is SIGKILLed, and its death counts as a crash.
#[test]
fn leaving_then_staying_past_the_grace_is_killed_and_counted_a_crash() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.said(
        w1,
        WorkerSaid::Leaving {
            code: 0,
            jobs_done: 0,
        },
    );
    assert_eq!(s.sup.live_workers(0), 0);
    assert_eq!(s.tick().spawns().len(), 1);
    assert_eq!(s.next_deadline(), Some(s.t(KILL_GRACE)));
    s.at(KILL_GRACE);
    let out = s.tick();
    assert_eq!(out.signals(), vec![(w1, Signal::SIGKILL)]);
    assert!(out.logged("worker 1001 did not exit in time; SIGKILL"));
    assert!(s.killed(w1).logged("crashed: killed by SIGKILL"));
    assert_eq!(s.sup.pools()[0].stats.crashes, 1);
}

/// LEAVING at max_jobs, with the jobs the master counted: a recycle, no back-off; the
/// replacement gets the queue.
#[test]
fn leaving_at_max_jobs_is_counted_recycled() {
    let mut s = Sim::new(vec![pool("p", "max_jobs = 2\n")]);
    let w1 = s.start()[0];
    for id in 1..=3 {
        s.submit(id);
    }
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w1, 2)]);
    s.finish(w1);
    s.finish(w1);
    let out = s.leave(w1, WorkerExit::Recycled(Limit::MaxJobs).code());
    assert!(out.logged("recycled (max_jobs reached)"));
    let stats = s.sup.pools()[0].stats;
    assert_eq!((stats.recycled, stats.crashes), (1, 0));
    assert_eq!(s.state(0), PoolState::Ok);
    let out = s.tick();
    let w2 = out.spawns()[0].0;
    assert_eq!(out.sends(), vec![(w2, 3)]);
}

/// A worker whose socketpair closed drains (it is no longer live: replaced at once) and is
/// SIGKILLed if it stays past KILL_GRACE.
#[test]
fn a_hangup_drains_the_worker_and_kills_it_if_it_stays() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.at(secs(1));
    s.on(Event::Hangup(w1));
    assert_eq!(s.sup.live_workers(0), 0);
    assert!(!s.w(w1).life.serving());
    assert_eq!(s.tick().spawns().len(), 1);
    s.at(secs(1) + KILL_GRACE);
    assert_eq!(s.tick().signals(), vec![(w1, Signal::SIGKILL)]);
}

// ---- prefetch ---------------------------------------------------------------------------------

/// Nothing known of the pool's jobs: a worker is sent up to 4 ahead; the rest wait.
#[test]
fn with_no_history_a_worker_is_sent_up_to_four_jobs() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    for id in 1..=6 {
        s.submit(id);
    }
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w1, 2), (w1, 3), (w1, 4)]);
    assert_eq!(s.queued(0), vec![5, 6]);
}

/// A worker is never sent more than it will run before max_jobs recycles it.
#[test]
fn max_jobs_is_never_exceeded_by_what_is_in_flight() {
    let mut s = Sim::new(vec![pool("p", "max_jobs = 3\n")]);
    let w1 = s.start()[0];
    for id in 1..=6 {
        s.submit(id);
    }
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w1, 2), (w1, 3)]);
    s.finish(w1);
    assert!(s.tick().sends().is_empty(), "1 done + 2 held = max_jobs");
}

/// A worker whose running job has taken longer than the pool's patience is sent no more:
/// the jobs go to the free worker (they would otherwise alternate).
#[test]
fn a_worker_whose_head_ran_past_patience_is_sent_no_more() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    s.submit(1);
    assert_eq!(s.tick().sends(), vec![(ws[0], 1)]);
    s.at(secs(1));
    for id in 2..=4 {
        s.submit(id);
    }
    assert_eq!(s.tick().sends(), vec![(ws[1], 2), (ws[1], 3), (ws[1], 4)]);
}

// ---- take-back --------------------------------------------------------------------------------

/// Two workers: the first runs a long job 1 with jobs 3 and 5 queued behind it, the second
/// has finished its own and is idle. Returns the sim once the take-back has been asked for
/// (past the pool's patience).
fn head_of_line() -> (Sim, WorkerId, WorkerId) {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    let (w1, w2) = (ws[0], ws[1]);
    for id in 1..=6 {
        s.submit(id);
    }
    assert_eq!(
        s.tick().sends(),
        vec![(w1, 1), (w2, 2), (w1, 3), (w2, 4), (w1, 5), (w2, 6)]
    );
    for _ in 0..3 {
        s.finish(w2);
    }
    assert!(s.tick().recalls().is_empty(), "within its patience");
    assert_eq!(
        s.next_deadline(),
        Some(s.t(patience())),
        "when patience runs out"
    );
    s.at(patience());
    assert_eq!(s.tick().recalls(), vec![w1]);
    assert!(s.w(w1).recalling);
    (s, w1, w2)
}

/// Past patience, the jobs behind the long one are taken back: exactly those numbered after
/// what the worker started, in their order, at the front of the queue, and sent to the idle
/// worker.
#[test]
fn jobs_behind_a_long_job_are_taken_back_for_an_idle_worker() {
    let (mut s, w1, w2) = head_of_line();
    s.submit(7); // arrived meanwhile: it waited less
    let out = s.on(Event::Recalled {
        worker: w1,
        started_through: 1,
        written_through: 3,
    });
    assert!(out.logged("worker 1001: took back 2 job(s) it had not started, for an idle worker"));
    assert_eq!(out.sends(), vec![(w2, 3), (w2, 5), (w2, 7)]);
    assert_eq!(s.held(w1), vec![1]);
    assert!(!s.w(w1).recalling);
    assert_eq!(
        s.w(w1).last_seq,
        3,
        "the next frame is numbered after what it saw"
    );
}

/// A failed fence (started_through = written_through): only the frames never written come
/// back; the next frame to that worker is numbered right after what it was written.
#[test]
fn a_failed_fence_takes_back_only_never_written_jobs() {
    let (mut s, w1, w2) = head_of_line();
    let out = s.on(Event::Recalled {
        worker: w1,
        started_through: 2,
        written_through: 2,
    });
    assert_eq!(out.sends(), vec![(w2, 5)]);
    assert_eq!(s.held(w1), vec![1, 3]);
    assert_eq!(s.w(w1).last_seq, 2);
    s.finish(w1); // it speaks: no longer stalled
    s.finish(w1); // and idle (its jobs took long: the pool now sends none ahead)
    s.submit(8);
    let out = s.tick();
    assert_eq!(out.sends(), vec![(w1, 8)]);
    assert_eq!(out.seqs(), vec![(w1, 3)]);
}

/// A worker jobs were taken back from (all of them: it had started none) is sent nothing
/// until it speaks — it may be stopped — however idle it looks, and however long.
#[test]
fn a_recalled_worker_gets_no_jobs_until_it_speaks() {
    let (mut s, w1, w2) = head_of_line();
    let out = s.on(Event::Recalled {
        worker: w1,
        started_through: 0,
        written_through: 3,
    });
    assert_eq!(out.sends(), vec![(w2, 1), (w2, 3), (w2, 5)]);
    assert!(s.held(w1).is_empty());
    assert_eq!(s.w(w1).head_started, None);
    s.at(patience() + ms(1));
    s.submit(7);
    assert_eq!(s.tick().sends(), vec![(w2, 7)], "not to the stalled one");
    s.at(Duration::from_secs(3600));
    s.submit(8);
    let out = s.tick();
    assert!(
        out.sends().iter().all(|(w, _)| *w != w1),
        "an hour later, still not"
    );
    assert!(
        out.recalls().is_empty(),
        "a stalled worker is not idle: it asks for nothing"
    );
}

/// ... and is sent jobs again once it speaks (a worker that skips a taken-back frame says
/// HOLD, not holding).
#[test]
fn a_recalled_worker_that_speaks_gets_jobs_again() {
    let (mut s, w1, _) = head_of_line();
    s.on(Event::Recalled {
        worker: w1,
        started_through: 0,
        written_through: 3,
    });
    s.at(patience() + ms(1));
    s.said(w1, WorkerSaid::Hold { paused: false });
    s.submit(7);
    assert_eq!(s.tick().sends(), vec![(w1, 7)]);
}

/// A claim beyond anything sent (the worker's word) takes nothing back, and panics nowhere.
#[test]
fn a_bogus_claim_takes_nothing_and_does_not_panic() {
    let (mut s, w1, _) = head_of_line();
    let out = s.on(Event::Recalled {
        worker: w1,
        started_through: u64::MAX,
        written_through: 3,
    });
    assert!(out.sends().is_empty());
    assert_eq!(s.held(w1), vec![1, 3, 5]);
    assert_eq!(s.w(w1).last_seq, 3);
    s.tick();
}

/// BUG: a claim above `written_through` is bounded by what the worker was *sent*
/// (`last_seq`), not by what reached it: frames never written are gone from its socketpair
/// (the shell took them back), yet a bogus claim keeps them counted as the worker's — jobs
/// it will never see, never answer, and that only a job_timeout (charging an attempt) or
/// nothing at all ends.
#[test]
fn a_bogus_claim_still_takes_back_what_was_never_written() {
    let (mut s, w1, w2) = head_of_line();
    let out = s.on(Event::Recalled {
        worker: w1,
        started_through: u64::MAX,
        written_through: 2,
    });
    assert_eq!(out.sends(), vec![(w2, 5)], "frame 3 never reached it");
    assert_eq!(s.held(w1), vec![1, 3]);
}

// ---- redis ------------------------------------------------------------------------------------

/// A redis worker's jobs never pass through the master: its slot is read on a watch interval
/// (to_refresh), and the job it says it runs is timed from when it started.
#[test]
fn a_redis_workers_job_is_timed_from_its_slot() {
    let redis = "source = \"redis\"\njob_timeout = \"2s\"\n[pool.redis]\nurl = \"/tmp/r.sock\"\nstream = \"s\"\n";
    let mut s = Sim::new(vec![pool("r", redis)]);
    let w1 = s.start()[0];
    assert_eq!(s.next_deadline(), Some(s.t(ms(100))), "the first watch");
    assert!(s.sup.to_refresh(s.t(ms(50))).is_empty());
    s.at(ms(100));
    assert_eq!(s.sup.to_refresh(s.now), vec![w1]);
    s.on(Event::Running {
        worker: w1,
        since: Some(s.t(ms(100))),
    });
    s.tick();
    assert_eq!(
        s.next_deadline(),
        Some(s.t(ms(600))),
        "a quarter of job_timeout"
    );
    s.at(ms(2100));
    assert_eq!(s.tick().signals(), vec![(w1, Signal::SIGTERM)]);
}

// ---- every job answered once ------------------------------------------------------------------

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        (!v.is_empty()).then(|| v[self.below(v.len() as u64) as usize])
    }
}

/// Across a random mix of submits, outcomes, holds, crashes, violations, hangups, scaling,
/// stop/start/restart, take-backs and ticks at advancing times, then a graceful stop: every accepted job is
/// answered exactly once, every rejected one only by its rejection, and the master finishes
/// holding no job.
#[test]
fn every_accepted_job_is_answered_exactly_once() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut s = Sim::new(vec![pool(
            "p",
            "workers = 3\nmax_attempts = 2\njob_timeout = \"2s\"\nmax_queue = 8\nmax_jobs = 6\n",
        )]);
        s.auto_recall = true;
        s.start();
        let mut offset = Duration::ZERO;
        let mut rejected = Vec::new();
        let mut accepted = Vec::new();
        let mut next_id = 0;
        // The workers the shell still reads.
        let readable = |s: &Sim| -> Vec<WorkerId> {
            s.sup
                .workers()
                .map(|(id, _)| id)
                .filter(|id| !s.forgotten.contains(id))
                .collect()
        };
        for _ in 0..400 {
            let alive: Vec<WorkerId> = s.sup.workers().map(|(id, _)| id).collect();
            let roll = rng.below(100);
            match roll {
                0..=24 => {
                    next_id += 1;
                    let pool = if rng.chance(5) { "zz" } else { "p" };
                    let size = if rng.chance(5) { 2000 } else { 3 };
                    let out = s.submit_to(ClientId(1), next_id, pool, &vec![b'j'; size]);
                    if out.answers().is_empty() {
                        accepted.push(next_id);
                    } else {
                        assert_eq!(out.answers()[0].1, Status::Rejected);
                        rejected.push(next_id);
                    }
                }
                25..=49 => {
                    let busy: Vec<WorkerId> = readable(&s)
                        .into_iter()
                        .filter(|id| s.w(*id).busy() && !s.w(*id).life.holding())
                        .collect();
                    if let Some(w) = rng.pick(&busy) {
                        let id = s.held(w)[0];
                        let ok = rng.chance(80);
                        s.outcome(w, id, ok);
                        let max_jobs = s.w(w).jobs_done >= 6;
                        if max_jobs && !s.w(w).busy() && s.sup.worker(w).is_some() {
                            s.leave(w, WorkerExit::Recycled(Limit::MaxJobs).code());
                        }
                    }
                }
                50..=56 => {
                    if let Some(w) = rng.pick(&alive) {
                        s.crash(w);
                    }
                }
                57..=61 => {
                    if let Some(w) = rng.pick(&readable(&s)) {
                        let paused = !s.w(w).life.holding();
                        s.said(w, WorkerSaid::Hold { paused });
                    }
                }
                62..=63 => {
                    if let Some(w) = rng.pick(&readable(&s)) {
                        s.on(Event::Broke {
                            worker: w,
                            what: "garbage".into(),
                        });
                    }
                }
                64 => {
                    if let Some(w) = rng.pick(&readable(&s)) {
                        s.on(Event::Hangup(w));
                    }
                }
                65..=66 => {
                    let n = rng.below(5) as usize;
                    s.admin(scale("p", n), 1);
                }
                99 => {
                    let c = match rng.below(4) {
                        0 => Command::StopPool { pool: "p".into() },
                        1 => Command::StartPool { pool: "p".into() },
                        2 => Command::Restart {
                            target: Target::All,
                        },
                        _ => Command::AddWorkers(1),
                    };
                    s.admin(c, 1);
                }
                67..=74 => {
                    // The signalled ones go: SIGKILL kills, SIGTERM makes it leave.
                    let signaled: Vec<WorkerId> = alive
                        .iter()
                        .copied()
                        .filter(|w| s.signaled.contains_key(w))
                        .collect();
                    if let Some(w) = rng.pick(&signaled) {
                        if s.signaled[&w] == Signal::SIGKILL || s.forgotten.contains(&w) {
                            s.killed(w);
                        } else {
                            s.leave(w, 0);
                        }
                    }
                }
                _ => {
                    offset += ms(rng.below(1500));
                    s.at(offset);
                    s.tick();
                }
            }
            for (id, n) in &s.answered {
                assert!(*n <= 1, "seed {seed}: job {id} answered {n} times");
            }
        }
        s.tick();
        s.stop();
        for _ in 0..100 {
            if s.sup.finished() {
                break;
            }
            offset += ms(500);
            s.at(offset);
            let alive: Vec<WorkerId> = s.sup.workers().map(|(id, _)| id).collect();
            for w in alive {
                let heard = !s.forgotten.contains(&w);
                if heard && s.w(w).busy() && !s.w(w).life.holding() && rng.chance(50) {
                    s.finish(w);
                }
                match s.signaled.get(&w) {
                    Some(Signal::SIGKILL) => {
                        s.killed(w);
                    }
                    Some(_) if rng.chance(30) && heard => {
                        s.leave(w, 0);
                    }
                    _ => {}
                }
            }
            s.tick();
        }
        assert!(s.sup.finished(), "seed {seed}: not finished");
        for id in &accepted {
            assert_eq!(
                s.answered.get(id),
                Some(&1),
                "seed {seed}: accepted job {id}"
            );
        }
        for id in &rejected {
            assert_eq!(
                s.answered.get(id),
                Some(&1),
                "seed {seed}: rejected job {id}"
            );
        }
        assert!(s.sup.jobs.is_empty(), "seed {seed}: jobs left");
    }
}

// ---- review of b1c0e7d: failing tests -----------------------------------------------------------

/// REVIEW: a head whose frame takes longer than the pool's patience to reach its worker (a
/// large payload, a busy machine) is taken back, sent to the idle worker, taken back from
/// that one at its patience, and so on: it never runs. Before b1c0e7d the head was never
/// taken back.
#[test]
fn a_slow_to_arrive_head_is_not_bounced_between_two_workers_forever() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    let (w1, w2) = (ws[0], ws[1]);
    s.submit(1);
    assert_eq!(s.tick().sends(), vec![(w1, 1)]);
    let mut holder = w1;
    let mut other = w2;
    let mut bounces = 0;
    for round in 1..=5u32 {
        s.at(patience() * round);
        // The holder has not claimed (still reading the frame): the head looks unstarted.
        if s.tick().recalls() != vec![holder] {
            break;
        }
        bounces += 1;
        let written = s.w(holder).last_seq;
        let out = s.on(Event::Recalled {
            worker: holder,
            started_through: written - 1, // fenced before the worker read the frame whole
            written_through: written,
        });
        assert_eq!(out.sends(), vec![(other, 1)]);
        // The first holder reads the rest of the frame, skips it, says it is there.
        s.said(holder, WorkerSaid::Hold { paused: false });
        std::mem::swap(&mut holder, &mut other);
    }
    assert!(
        bounces <= 1,
        "job 1 was taken back {bounces} times in a row and never ran"
    );
}

/// REVIEW: a holding worker whose take-back comes back Pending (a fence of an earlier
/// take-back it has not seen: it spoke — an outcome — then held before reading the next
/// frame) keeps its jobs, and is asked again on every pass of the loop for as long as it
/// holds: a Recall effect per Tick, and jobs stuck while a worker idles.
#[test]
fn a_pending_take_back_from_a_holding_worker_is_not_asked_every_tick() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    let (w1, w2) = (ws[0], ws[1]);
    for id in 1..=4 {
        s.submit(id);
    }
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w2, 2), (w1, 3), (w2, 4)]);
    s.said(w1, WorkerSaid::Hold { paused: true });
    s.finish(w2);
    s.finish(w2);
    let mut recalls = 0;
    for pass in 0..10u64 {
        s.at(ms(pass));
        if s.tick().recalls() == vec![w1] {
            recalls += 1;
            // Pending: only never-written frames come back (none here).
            s.on(Event::Recalled {
                worker: w1,
                started_through: 2,
                written_through: 2,
            });
        }
    }
    assert_eq!(s.held(w1), vec![1, 3], "still held (Pending)");
    assert!(recalls <= 1, "{recalls} Recall effects in 10 passes");
}

/// REVIEW: a take-back that needed no fence (the worker had claimed all that was written;
/// only never-written frames came back — e.g. a channel closed by a write error) stalls the
/// worker; with nothing left in flight, and no fence to see, it never speaks again: a
/// healthy, idle worker that is never sent anything, and never replaced.
#[test]
fn a_take_back_without_a_fence_does_not_stall_an_emptied_worker_forever() {
    let mut s = Sim::new(vec![pool("p", "workers = 2\n")]);
    let ws = s.start();
    let (w1, w2) = (ws[0], ws[1]);
    for id in 1..=2 {
        s.submit(id);
    }
    assert_eq!(s.tick().sends(), vec![(w1, 1), (w2, 2)]);
    s.finish(w2);
    s.at(patience());
    assert_eq!(s.tick().recalls(), vec![w1]);
    // Frame 1 was never written: Done without a fence; it comes back.
    let out = s.on(Event::Recalled {
        worker: w1,
        started_through: 0,
        written_through: 0,
    });
    assert_eq!(out.sends(), vec![(w2, 1)]);
    assert!(s.held(w1).is_empty());
    s.finish(w2);
    s.at(secs(3600));
    s.submit(3);
    s.submit(4);
    let out = s.tick();
    assert!(
        out.sends().iter().any(|(w, _)| *w == w1),
        "w1 (idle, no fence to see, nothing to answer) is never sent a job again: {:?}",
        out.sends()
    );
}

/// A job of a client that has gone, lost with the worker that ran it, is not retried for
/// nobody: it is dropped. A detached one, given back unstarted, is queued again.
#[test]
fn a_gone_clients_job_lost_with_its_worker_is_dropped_not_retried() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit_to(ClientId(2), 1, "p", b"job");
    s.submit_detached(ClientId(2), 2);
    assert_eq!(s.tick().sends().len(), 2);
    s.on(Event::ClientGone(ClientId(2)));
    let crashed = s.crash(w1);
    assert!(crashed.answers().is_empty());
    assert_eq!(
        s.queued(0),
        vec![2],
        "only the detached one is queued again"
    );
    assert_eq!(s.sup.pools()[0].stats.dropped, 1);
    assert_eq!(s.sup.pools()[0].stats.retried, 0);
}

/// An outcome over `max_result` (which an honest worker never sends) is the job's failure.
#[test]
fn an_outcome_over_max_result_is_the_jobs_failure() {
    let mut s = Sim::new(vec![pool("p", "")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    let key = s.key(1);
    let body = vec![b'x'; 1025];
    let out = s.said(
        w1,
        WorkerSaid::Outcome {
            key,
            ok: true,
            body,
        },
    );
    assert_eq!(
        out.answers(),
        vec![(
            1,
            Status::Failed,
            "result too large (1025 bytes, max_result is 1024)".to_string()
        )]
    );
}

// ---- metrics --------------------------------------------------------------------------------

/// The figures `metrics` shows: jobs submitted and rejected by reason, how long they waited
/// in the queue and ran, worker time spent on them, and worker exits by each reason.
#[test]
fn metrics_count_submits_rejections_waits_durations_and_exits_by_reason() {
    let mut s = Sim::with(
        settings(GRACE),
        vec![pool("p", "max_queue = 1\nmax_jobs = 1\n")],
    );
    s.submit(1); // queued: no worker yet
    let out = s.submit(2);
    assert_eq!(out.answers()[0].1, Status::Rejected, "queue full");
    let out = s.submit_to(ClientId(1), 3, "p", &[0u8; 2000]);
    assert_eq!(out.answers()[0].1, Status::Rejected, "too large");
    s.submit_to(ClientId(1), 4, "nope", b"x");
    let m = &s.sup.pools()[0].metrics;
    assert_eq!(m.submitted, 1);
    assert_eq!(m.rejected[Rejection::QueueFull as usize], 1);
    assert_eq!(m.rejected[Rejection::TooLarge as usize], 1);
    assert_eq!(s.sup.unknown_pool_submits(), 1);

    s.at(ms(300));
    let w1 = s.start()[0];
    assert_eq!(s.sup.pools()[0].metrics.queue_wait.count(), 1);
    assert!((s.sup.pools()[0].metrics.queue_wait.sum() - 0.3).abs() < 1e-9);
    s.at(ms(500));
    assert!(
        (s.sup.busy_seconds(0, s.t(ms(500))) - 0.2).abs() < 1e-9,
        "running job counts"
    );
    assert_eq!(s.sup.in_flight(0), 1);
    s.finish(w1);
    let m = &s.sup.pools()[0].metrics;
    assert_eq!(m.duration.count(), 1);
    assert!((m.duration.sum() - 0.2).abs() < 1e-9);
    assert!((m.busy_seconds - 0.2).abs() < 1e-9);
    s.leave(w1, 200); // max_jobs
    let w2 = s.tick().spawns()[0].0;
    s.crash(w2);
    let exits = &s.sup.pools()[0].metrics.exits;
    assert_eq!(exits[ExitReason::RecycleMaxJobs as usize], 1);
    assert_eq!(exits[ExitReason::Crash as usize], 1);
    assert_eq!(exits.iter().sum::<u64>(), 2);
    // The crash is remembered for `status`'s recent; the recycle is not a problem.
    let recent: Vec<_> = s.sup.recent().collect();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].kind, "crash");
    assert_eq!(recent[0].pid, Some(s.pid(w2).as_raw()));
    assert!(recent[0].reason.contains("SIGSEGV"), "{}", recent[0].reason);
}

/// A failed reload is counted and remembered with its reason; a good one only counted.
#[test]
fn reloads_are_counted_by_outcome_and_failures_remembered() {
    let mut s = Sim::new(vec![pool("p", "")]);
    s.start();
    s.admin(Command::Reload, 1);
    s.on(Event::ReloadFailed {
        error: ReloadError::RestartOnly { key: "host.user" },
        at: "2026-12-02T00:00:00Z".into(),
    });
    let ((ok, failed), at) = s.sup.reloads();
    assert_eq!((ok, failed), (0, 1));
    assert_eq!(at, Some(s.now));
    let recent: Vec<_> = s.sup.recent().collect();
    assert_eq!(recent[0].kind, "reload-failed");
    assert!(
        recent[0].reason.contains("host.user"),
        "{}",
        recent[0].reason
    );
}

/// Only the last RECENT_KEPT problems are kept.
#[test]
fn recent_problems_are_bounded() {
    let mut s = Sim::new(vec![pool("p", "crash_limit = 1000\n")]);
    s.start();
    for i in 0..(RECENT_KEPT as u64 + 5) {
        s.at(secs(i * 100));
        let w = s.tick().spawns().first().map(|(w, _)| *w);
        let w = w
            .or_else(|| s.sup.workers().next().map(|(id, _)| id))
            .unwrap();
        s.crash(w);
    }
    assert_eq!(s.sup.recent().count(), RECENT_KEPT);
}

fn slow_jobs(out: &Out) -> Vec<SlowJob> {
    out.pick(|e| match e {
        Effect::SlowJob(slow) => Some(slow.clone()),
        _ => None,
    })
}

/// `slow_job`: a job running past it is reported once, with its job; the loop wakes for it.
#[test]
fn a_slow_job_is_reported_once_when_it_crosses_the_threshold() {
    let mut s = Sim::new(vec![pool("p", "slow_job = \"5s\"\njob_timeout = 0\n")]);
    let w1 = s.start()[0];
    s.submit_to(ClientId(7), 1, "p", b"12345");
    s.tick();
    assert_eq!(s.next_deadline(), Some(s.t(secs(5))));
    s.at(ms(4999));
    assert!(slow_jobs(&s.tick()).is_empty());
    s.at(secs(5));
    let slow = slow_jobs(&s.tick());
    assert_eq!(slow.len(), 1);
    let job = slow[0].job.unwrap();
    assert_eq!((job.client, job.id, job.payload_len), (7, 1, 5));
    assert_eq!((slow[0].elapsed, slow[0].timeout), (secs(5), None));
    assert_eq!(slow[0].pid, s.pid(w1));
    s.at(secs(50));
    assert!(slow_jobs(&s.tick()).is_empty(), "once per job");
    assert_eq!(s.next_deadline(), None, "nothing more to wake for");
    // The next job is a new one.
    s.submit_to(ClientId(7), 2, "p", b"x");
    s.finish(w1);
    s.tick(); // job 2 starts
    s.at(secs(56));
    let slow = slow_jobs(&s.tick());
    assert_eq!(slow.len(), 1);
    assert_eq!(slow[0].job.unwrap().id, 2);
}

/// A job killed at job_timeout gets the same report, before its worker is signalled.
#[test]
fn a_job_killed_at_its_timeout_is_reported_before_the_signal() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.at(secs(5));
    let out = s.tick();
    let slow_at = out
        .effects
        .iter()
        .position(|e| matches!(e, Effect::SlowJob(_)))
        .expect("a slow-job report");
    let signal_at = out
        .effects
        .iter()
        .position(|e| matches!(e, Effect::Signal { worker, .. } if *worker == w1))
        .expect("a signal");
    assert!(slow_at < signal_at);
    let slow = slow_jobs(&out);
    assert_eq!(slow[0].timeout, Some(secs(5)));
    assert_eq!(slow[0].elapsed, secs(5));
}

/// jobhost_pool_busy_seconds_total never goes back: a job's time counts when its clock stops
/// without an answer (an outcome after its timeout, a HOLD, a take-back of everything).
#[test]
fn busy_seconds_never_go_back_when_a_job_clock_stops_unanswered() {
    let mut s = Sim::new(vec![pool("p", "job_timeout = \"5s\"\n")]);
    let w1 = s.start()[0];
    s.submit(1);
    s.tick();
    s.at(secs(5));
    s.tick(); // past its timeout: SIGTERM
    let before = s.sup.busy_seconds(0, s.t(secs(6)));
    s.at(secs(6));
    s.outcome(w1, 1, true); // too late: discarded
    let after = s.sup.busy_seconds(0, s.t(secs(6)));
    assert!(after >= before - 1e-9, "{before} -> {after}");
    assert!((after - 6.0).abs() < 1e-9, "{after}");
}

/// Every way a worker ends is counted under its own reason, once: the `reason` label of
/// `jobhost_pool_worker_exits_total`.
#[test]
fn every_worker_exit_is_counted_by_its_reason() {
    let exits = |s: &Sim| s.sup.pools()[0].metrics.exits;
    let mut s = Sim::new(vec![pool(
        "p",
        "job_timeout = \"5s\"\nmax_attempts = 1\nmax_jobs = 1\nmax_lifetime = \"1h\"\nmax_rss = \"512MiB\"\n",
    )]);
    let mut want = [0u64; ExitReason::ALL.len()];
    let mut w = s.start()[0];
    let mut id = 0;
    let mut t = 0;
    // Each worker runs one job first, so that none looks like one that cannot get going.
    let next = |s: &mut Sim, w: WorkerId, id: &mut u64, t: &mut u64| -> WorkerId {
        *t += 3600;
        s.at(secs(*t));
        let spawned = s.tick().spawns();
        let fresh = spawned.first().map_or(w, |(fresh, _)| *fresh);
        *id += 1;
        s.submit(*id);
        s.tick();
        s.finish(fresh);
        fresh
    };
    w = next(&mut s, w, &mut id, &mut t);
    for (code, reason) in [
        (
            WorkerExit::Recycled(Limit::MaxJobs).code(),
            ExitReason::RecycleMaxJobs,
        ),
        (
            WorkerExit::Recycled(Limit::MaxLifetime).code(),
            ExitReason::RecycleMaxLifetime,
        ),
        (
            WorkerExit::Recycled(Limit::MaxRss).code(),
            ExitReason::RecycleMaxRss,
        ),
        (WorkerExit::Stopped.code(), ExitReason::Stop),
    ] {
        s.at(secs(t + 3600));
        s.leave(w, code);
        want[reason as usize] += 1;
        assert_eq!(exits(&s), want, "{reason:?}");
        w = next(&mut s, w, &mut id, &mut t);
    }
    s.crash(w);
    want[ExitReason::Crash as usize] += 1;
    assert_eq!(exits(&s), want, "a crash");
    // The next one fails in worker_start.
    t += 3600;
    s.at(secs(t));
    w = s.tick().spawns()[0].0;
    s.leave(w, WorkerExit::BootFailed.code());
    want[ExitReason::BootFailed as usize] += 1;
    assert_eq!(exits(&s), want, "a failed boot");
    // And the next one is killed at its job_timeout.
    t += 3600;
    s.at(secs(t));
    w = s.tick().spawns()[0].0;
    id += 1;
    s.submit(id);
    s.tick();
    s.at(secs(t + 6));
    s.tick();
    let pid = s.pid(w);
    s.reap(w, WaitStatus::Signaled(pid, Signal::SIGTERM, false));
    want[ExitReason::Timeout as usize] += 1;
    assert_eq!(exits(&s), want, "killed at its job_timeout");
    assert_eq!(want.iter().filter(|&&n| n == 1).count(), 7);

    let mut s = Sim::new(vec![pool("l", "mode = \"loop\"\n")]);
    let w = s.start()[0];
    s.leave(w, WorkerExit::PluginStopped.code());
    let mut want = [0u64; ExitReason::ALL.len()];
    want[ExitReason::PluginStop as usize] = 1;
    assert_eq!(exits(&s), want, "its plugin said stop");
}
