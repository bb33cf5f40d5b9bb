//! The master: loads and `init`s every plugin, binds its sockets, forks the workers, then runs
//! one epoll loop — no threads. This module is the shell: it owns every file descriptor,
//! process and buffer, turns each input into one [`Event`] for the pure [`Supervisor`], and
//! performs the [`Effect`]s it returns. It decides nothing about jobs or workers itself.
//!
//! ```text
//! tick        fork the workers (Event::Tick), then flush
//! while the supervisor is not finished {
//!     wait        epoll: signal pipe, job socket, clients, admin, workers' socketpairs and
//!                 probes, until the earliest deadline (the supervisor's, the accept pause,
//!                 admin timers, a reload's probes, a hung-up worker), or none when idle
//!     reap        waitpid every dead worker: read what it left, then Event::Exited
//!     signals     each signal → its Command (`command_for`) → Event::Command
//!     io          accept; SUBMIT → Event::Submit; workers' frames → Event::Said / Broke,
//!                 their progress and data → Event::Reported (with their claim word);
//!                 admin lines → a reply, or Event::Command; probes' reports
//!     timers      accept pause over, admin timers, hung-up workers → Event::Hangup, a
//!                 reload's probes done → Event::ReloadReady / ReloadFailed
//!     resume      admin sessions answered since: go on with their lines
//!     refresh     the workers the supervisor suspects (`to_refresh`): read their sockets and
//!                 slots first, so that a deadline is judged on fresh facts
//!     tick        Event::Tick: deadlines, drained pools, spawn (a new worker gets its jobs at
//!                 once), dispatch and take-back
//!     flush       buffered frames to workers and clients
//! }
//! ```
//!
//! The master never runs plugin job code (`handle`, `run_once`) and never forks from any thread
//! but its only one.

mod admin;
mod channel;
mod clients;
mod http;
mod life;
mod pool;
mod reload;
mod supervisor;
mod token;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jobhost_plugin_api::PluginInstance;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
// Every map of the shell is keyed by the master's own ids (and pids): a fast, unkeyed hash.
use rustc_hash::FxHashMap;

use crate::admin::Command;
use crate::config::{Config, PoolMode};
use crate::plugins::{PluginError, Registry};
use crate::protocol::{self, Frame};
use crate::scoreboard::{Recall, Slot};
use crate::server::{self, Connection, ReadOutcome};
use crate::signals::{self, SignalPipe};
use crate::worker::{self, WorkerExit};
use channel::{OutJob, WorkerChannel, OUTCOME_READ_BUDGET};
use pool::Pool;
pub use pool::{ExitKind, PoolState, PoolStats};
use supervisor::{
    ClientId, Effect, Event, Origin, Reported, Settings, Supervisor, WorkerId, WorkerSaid,
};
use token::Token;

/// How long a shutting-down master keeps trying to deliver the last results.
const FINAL_FLUSH: Duration = Duration::from_secs(2);
/// A worker whose socketpair closed and that is still alive this much later closed it itself.
const HANGUP_GRACE: Duration = Duration::from_secs(1);
/// After accept() fails for lack of file descriptors, stop accepting for this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(200);

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

/// A live worker's process, as the shell holds it.
struct Proc {
    pid: Pid,
    channel: WorkerChannel,
    /// What the worker publishes about itself (counts, running entry, its claim on jobs).
    slot: Slot,
    /// It broke the protocol: nothing more is read from it or written to it.
    forgotten: bool,
    /// Its socketpair reached end of file then: it is no longer watched. A worker that dies
    /// is reaped at once; one still there after [`HANGUP_GRACE`] is reported (it closed its
    /// channel and stayed: it could hold its jobs forever).
    hung_up: Option<Instant>,
    hangup_reported: bool,
}

/// Every descriptor and buffer of the master: what a forked worker drops in one move.
#[derive(Default)]
struct Io {
    epoll: Option<Epoll>,
    signals: Option<SignalPipe>,
    listener: Option<std::os::unix::net::UnixListener>,
    admin: Option<admin::AdminListeners>,
    /// `admin.http`: its listener and the child that serves it.
    http: Option<http::HttpChild>,
    admins: FxHashMap<u64, admin::AdminConn>,
    next_admin_id: u64,
    /// Admin sessions whose `reload` was answered: to go on with their next lines.
    admin_resume: Vec<u64>,
    clients: FxHashMap<u64, Connection>,
    next_client_id: u64,
    /// What clients hold of the master's memory, and their read deadlines.
    client_limits: clients::ClientLimits,
    procs: FxHashMap<WorkerId, Proc>,
    by_pid: FxHashMap<Pid, WorkerId>,
    /// A reload waiting for its probes.
    reloading: Option<reload::Reloading>,
    /// Held (locked) while the master runs; removed on a clean exit.
    pidfile: Option<crate::daemon::Pidfile>,
    accept_paused_until: Option<Instant>,
    /// Jobs came in after this pass's Tick (a client let out of back-pressure): the next wait
    /// only looks.
    tick_again: bool,
    scratch: Vec<u8>,
    /// Each worker's own memory as last measured, and when (`Master::own_memory`).
    own_memory: std::cell::RefCell<FxHashMap<Pid, (Instant, Option<u64>)>>,
    /// Connections and workers with output to write at the end of this pass.
    dirty_clients: Vec<u64>,
    dirty_workers: Vec<WorkerId>,
}

impl Io {
    /// In a forked child, on its way into the worker: give signals back their defaults and
    /// close everything of the master's. Other workers' scoreboard slots are not mapped here
    /// (MADV_DONTFORK): they are forgotten rather than unmapped (the address may be something
    /// else by now). The pidfile's lock stays the master's (closing our copy unlocks nothing).
    fn leave_for_worker(mut self) {
        if let Some(signals) = self.signals.take() {
            signals.reset_in_child();
        }
        for (_, other) in self.procs.drain() {
            std::mem::forget(other.slot);
        }
    }
}

pub struct Master {
    config: Config,
    /// Every plugin build loaded (they stay mapped); `status` counts them.
    registry: Registry,
    /// The decisions.
    sup: Supervisor,
    /// Each pool's plugin instance, `init`ed in the master (by pool index); workers fork with a
    /// copy of it. `None` once its pool is gone.
    instances: Vec<Option<PluginInstance>>,
    /// Who workers become (host.user/host.group), if anyone.
    identity: Option<crate::daemon::Identity>,
    started: Instant,
    /// The clock, read once when a wait returns: every decision of the pass is taken at this
    /// time (a clock read per frame cost the master a few percent of its dispatch rate).
    now: Instant,
    pid: Pid,
    io: Io,
    /// What slow-job lines may read of the socket tables, a second, all together: on the loop,
    /// so bounded ([`crate::procinfo::TABLES_PER_SECOND`]).
    proc_tables: crate::procinfo::TablesAllowance,
}

/// The signals the master answers, and what each asks: the same [`Command`]s admin lines give
/// (`times`: how many came since the last look). SIGCHLD asks nothing: `reap` runs anyway.
fn command_for(signal: Signal, times: u32) -> Option<Command> {
    Some(match signal {
        Signal::SIGTERM => Command::Stop { escalate: false },
        Signal::SIGINT => Command::Stop { escalate: true },
        Signal::SIGQUIT => Command::StopNow,
        Signal::SIGHUP => Command::Reload,
        Signal::SIGTTIN => Command::AddWorkers(times),
        Signal::SIGTTOU => Command::RemoveWorkers(times),
        Signal::SIGUSR1 => Command::ReopenLogs,
        _ => return None,
    })
}

/// Every signal the master catches.
const SIGNALS: [Signal; 8] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR1,
    Signal::SIGCHLD,
];

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
        let mut instances = Vec::new();
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
                loaded.info.name.clone(),
                loaded.info.version.clone(),
                loaded.library.hash,
            ));
            instances.push(Some(instance));
        }
        let listener = server::bind(
            &config.server.socket,
            config.server.socket_mode,
            config.server.socket_group.as_ref(),
        )?;
        let admin = admin::AdminListeners::bind(&config.admin)?;
        let http = match (config.admin.http, &admin.token) {
            (Some(addr), Some(token)) => Some(http::HttpChild::bind(
                addr,
                token.clone(),
                identity.as_ref().map(|i| (i.uid.as_raw(), i.gid.as_raw())),
            )?),
            (Some(_), None) => {
                return Err(MasterError::Refused(
                    "admin.http needs admin.token_file".into(),
                ))
            }
            (None, _) => None,
        };
        signals::ignore_sigpipe().map_err(os("cannot ignore SIGPIPE"))?;
        let signals =
            SignalPipe::install(&SIGNALS).map_err(os("cannot install signal handlers"))?;
        let epoll =
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(os("cannot create epoll"))?;
        let watch = |fd: std::os::fd::BorrowedFd<'_>, token: Token| {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token.encode()))
                .map_err(os("epoll"))
        };
        watch(signals.fd(), Token::Signals)?;
        watch(listener.as_fd(), Token::Listener)?;
        watch(admin.unix.as_fd(), Token::AdminListener { tcp: false })?;
        if let Some(tcp) = &admin.tcp {
            watch(tcp.as_fd(), Token::AdminListener { tcp: true })?;
        }
        log::info!("listening for jobs on {}", config.server.socket.display());
        let settings = Settings {
            graceful_timeout: config.host.graceful_timeout,
            max_payload: config.server.max_payload,
            max_result: config.server.max_result,
        };
        Ok(Master {
            config,
            registry,
            sup: Supervisor::new(settings, pools),
            instances,
            identity,
            started: Instant::now(),
            proc_tables: crate::procinfo::TablesAllowance::new(Instant::now()),
            now: Instant::now(),
            pid: Pid::this(),
            io: Io {
                epoll: Some(epoll),
                signals: Some(signals),
                listener: Some(listener),
                admin: Some(admin),
                http,
                next_admin_id: 1,
                next_client_id: 1,
                scratch: vec![0; 256 * 1024],
                ..Io::default()
            },
        })
    }

    /// The loop (see the module doc, which it matches line for line). Returns when the master
    /// has stopped; every accepted job has been answered.
    pub fn run(&mut self) -> Result<(), MasterError> {
        let mut events = vec![EpollEvent::empty(); 256];
        clients::return_freed_buffers_to_the_os();
        self.now = Instant::now();
        self.apply(Event::Tick);
        self.flush();
        while !self.sup.finished() {
            let n = self.wait(&mut events)?;
            self.now = Instant::now();
            self.reap();
            self.take_signals(&events[..n]);
            self.handle_io(&events[..n]);
            self.timers();
            self.resume_admins();
            self.refresh();
            self.apply(Event::Tick);
            self.flush();
        }
        self.final_flush();
        self.stop_http_child();
        self.remove_socket_file();
        let _ = std::fs::remove_file(&self.config.admin.socket);
        log::info!("master exiting");
        Ok(())
    }

    /// Hands `event` to the supervisor and performs what it decides — and what the outcome of
    /// those effects (a fork, a take-back, a reload's phase 1) decides in turn, in order.
    fn apply(&mut self, event: Event<'_>) {
        self.apply_at(event, self.now);
    }

    /// [`Master::apply`] with the time already read (one clock read for a batch of frames).
    fn apply_at(&mut self, event: Event<'_>, now: Instant) {
        let mut effects = self.sup.on(event, now);
        let mut follow_ups = Vec::new();
        while !effects.is_empty() {
            for effect in effects.drain(..) {
                if let Some(follow_up) = self.perform(effect) {
                    follow_ups.extend(self.sup.on(follow_up, now));
                }
            }
            // What came of them runs after everything asked before it, in order.
            std::mem::swap(&mut effects, &mut follow_ups);
        }
        // The larger of the two buffers serves the next event.
        self.sup.recycle(effects);
        self.sup.recycle(follow_ups);
    }

    /// Performs one effect; returns what came of it when the supervisor must hear that.
    fn perform(&mut self, effect: Effect) -> Option<Event<'static>> {
        match effect {
            Effect::Spawn {
                worker,
                pool,
                generation,
                predecessors,
            } => Some(match self.spawn(worker, pool, generation, &predecessors) {
                Ok(pid) => Event::Spawned {
                    worker,
                    pool,
                    pid,
                    predecessors,
                },
                Err(e) => Event::SpawnFailed {
                    pool,
                    predecessors,
                    error: e.to_string(),
                },
            }),
            Effect::Signal { worker, signal } => {
                // Only a worker not reaped yet: its pid may be someone else's after.
                if let Some(p) = self.io.procs.get(&worker) {
                    if self.io.by_pid.contains_key(&p.pid) {
                        // A SIGKILL takes what the worker forked with it: its group is its own
                        // (it leads it) and, while not reaped, cannot be anyone else's.
                        if signal == Signal::SIGKILL {
                            let _ = nix::sys::signal::killpg(p.pid, signal);
                        }
                        let _ = kill(p.pid, signal);
                    }
                }
                None
            }
            Effect::Send {
                worker,
                seq,
                key,
                payload,
            } => {
                if let Some(p) = self.io.procs.get_mut(&worker) {
                    p.channel.push(OutJob { seq, key, payload });
                    self.io.dirty_workers.push(worker);
                }
                None
            }
            Effect::Recall { worker } => self.recall(worker),
            Effect::Forget { worker } => {
                if let Some(p) = self.io.procs.get_mut(&worker) {
                    p.forgotten = true;
                    p.channel.discard_output();
                    if let Some(epoll) = &self.io.epoll {
                        let _ = epoll.delete(p.channel.stream().as_fd());
                    }
                }
                None
            }
            Effect::DiscardOutput { worker } => {
                if let Some(p) = self.io.procs.get_mut(&worker) {
                    p.channel.discard_output();
                }
                None
            }
            Effect::Report { client, id, report } => {
                // Progress waits, coalesced, while the client's output is over its budget;
                // data is appended and counts against the client's back-pressure like results.
                if let Some(conn) = self.io.clients.get_mut(&client.0) {
                    match report {
                        Reported::Progress {
                            numerator,
                            denominator,
                        } => conn.put_progress(id, numerator, denominator),
                        Reported::Data(data) => conn.put_data(id, data),
                    }
                    self.io.dirty_clients.push(client.0);
                }
                None
            }
            Effect::Answer {
                client,
                id,
                status,
                body,
                payload_len,
            } => {
                if let Some(conn) = self.io.clients.get_mut(&client.0) {
                    conn.outstanding = conn.outstanding.saturating_sub(payload_len);
                    conn.forget_progress(id);
                    conn.put_result(id, status, body);
                    self.io.dirty_clients.push(client.0);
                }
                None
            }
            Effect::Reply { session, reply } => {
                let text = admin::render_reply(&reply);
                self.answer_admin(session.0, &text);
                None
            }
            Effect::StopAccepting => {
                self.close_listener();
                None
            }
            Effect::PrepareReload => self.begin_reload(),
            Effect::AbandonReload => Some(self.abandon_reload()),
            Effect::ReopenLogs => {
                if let Err(e) = crate::logging::reopen() {
                    log::error!("cannot reopen the log file: {e}");
                }
                self.give_log_file_to_workers();
                None
            }
            Effect::DeleteUnusedCopies { in_use } => {
                for path in self.registry.delete_unused(&in_use) {
                    log::info!(
                        "deleted private plugin copy {} (no worker uses it; it stays mapped in the master)",
                        path.display()
                    );
                }
                None
            }
            Effect::DropInstance { pool } => {
                if let Some(slot) = self.instances.get_mut(pool) {
                    drop(slot.take());
                }
                None
            }
            Effect::Notify(text) => {
                let text = match text.strip_prefix("READY=1\n") {
                    // The first READY says which process is the master (a daemon forked).
                    Some(rest) => format!("READY=1\nMAINPID={}\n{rest}", std::process::id()),
                    None => text,
                };
                crate::daemon::notify(&text);
                None
            }
            Effect::Log { level, text } => {
                log::log!(level, "{text}");
                None
            }
            Effect::SlowJob(slow) => {
                self.log_slow_job(&slow);
                None
            }
        }
    }

    /// epoll_wait until an event or the next deadline. No deadline: sleep until something
    /// happens — an idle master uses no CPU.
    fn wait(&mut self, events: &mut [EpollEvent]) -> Result<usize, MasterError> {
        let now = Instant::now();
        let deadlines = [
            self.sup.next_deadline(now),
            self.io.accept_paused_until,
            self.admin_deadline(),
            self.io.http.as_ref().and_then(|h| h.deadline()),
            self.probe_deadline(),
            self.hangup_deadline(),
            self.clients_deadline(),
        ];
        let timeout = match deadlines.into_iter().flatten().min() {
            // Admin sessions to resume, or jobs to dispatch: look at new events, but do not
            // sleep.
            _ if !self.io.admin_resume.is_empty() || std::mem::take(&mut self.io.tick_again) => {
                EpollTimeout::ZERO
            }
            None => EpollTimeout::NONE,
            Some(at) => {
                let ms = at.saturating_duration_since(now).as_millis() + 1;
                EpollTimeout::try_from(ms.min(60_000) as u64).unwrap_or(EpollTimeout::NONE)
            }
        };
        let Some(epoll) = &self.io.epoll else {
            return Ok(0);
        };
        match epoll.wait(events, timeout) {
            Ok(n) => Ok(n),
            Err(nix::Error::EINTR) => Ok(0),
            Err(e) => Err(os("epoll_wait")(e)),
        }
    }

    /// The slow-job line (`slow_job`, and a kill at `job_timeout`): the pool, the worker, the
    /// job and what the worker is doing right now, from its /proc — so that a hang can be told
    /// after the fact (uWSGI's harakiri log). Read before the kill that may follow.
    fn log_slow_job(&mut self, slow: &supervisor::SlowJob) {
        let job = match &slow.job {
            Some(job) => format!(
                "job {} (client {}'s id {}), {} bytes",
                job.key, job.client, job.id, job.payload_len
            ),
            // An engine-fed worker's job is on its slot (the stream entry, the job handle).
            None => match self
                .io
                .procs
                .get(&slow.worker)
                .and_then(|p| p.slot.read().running)
            {
                Some(entry) => format!("job {entry}"),
                None => "its job".to_string(),
            },
        };
        let doing = crate::procinfo::doing_within(slow.pid, &mut self.proc_tables, self.now);
        match slow.timeout {
            None => log::warn!(
                "slow job: pool {}, worker {}, {job}, running for {:.1?}: {doing}",
                slow.pool,
                slow.pid,
                slow.elapsed
            ),
            Some(timeout) => log::warn!(
                "job past job_timeout {timeout:?}: pool {}, worker {}, {job}, running for {:.1?}: {doing}",
                slow.pool,
                slow.pid,
                slow.elapsed
            ),
        }
    }

    // ---- reap ------------------------------------------------------------------------------

    /// Every child the master forks (worker, probe) leads its own process group, and what it
    /// leaves in that group (a job's or a plugin's forked process) dies with it: the group is
    /// SIGKILLed after the child exited and *before* it is reaped. Until it is reaped the
    /// zombie holds its pid, so no new process can get that number, nor lead a group of that
    /// number: the group signalled is certainly the dead child's own. (After reaping, a group
    /// left empty frees the number for anyone.) This covers every way a worker leaves: exit,
    /// recycle, SIGKILL from the master or from outside, and SIGQUIT's kill of them all.
    fn reap(&mut self) {
        use nix::sys::wait::{waitid, Id};
        loop {
            let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            match waitid(Id::All, peek) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(peeked) => {
                    let Some(pid) = peeked.pid() else { return };
                    let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
                    let status = loop {
                        match waitpid(pid, None) {
                            Err(nix::Error::EINTR) => continue,
                            other => break other,
                        }
                    };
                    match status {
                        Ok(status) => self.reaped(pid, status),
                        Err(e) => {
                            log::error!("waitpid {pid}: {e}");
                            return;
                        }
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

    fn reaped(&mut self, pid: Pid, status: WaitStatus) {
        let Some(id) = self.io.by_pid.remove(&pid) else {
            if !self.probe_reaped(pid, status) && !self.http_reaped(pid, status) {
                log::debug!("reaped pid {pid}, not a worker ({status:?})");
            }
            return;
        };
        // Take in the outcomes it wrote before it died, so finished jobs count as finished.
        self.read_worker(id);
        let Some(p) = self.io.procs.remove(&id) else {
            return;
        };
        if let Some(epoll) = &self.io.epoll {
            let _ = epoll.delete(p.channel.stream().as_fd());
        }
        self.apply(Event::Exited {
            worker: id,
            status,
            board: p.slot.read(),
            written: p.channel.written_whole(),
            claimed: p.slot.claimed(),
        });
    }

    // ---- signals ---------------------------------------------------------------------------

    /// Each signal that came, as its command. When epoll said the signal pipe is readable it
    /// is drained whatever this process's own flags say: a byte may come from a process that
    /// shares the pipe without sharing our memory (the launcher a daemon forked from, while it
    /// waits), and a byte left there would keep epoll waking us forever.
    fn take_signals(&mut self, events: &[EpollEvent]) {
        let woken = events
            .iter()
            .any(|e| Token::decode(e.data()) == Some(Token::Signals));
        let Some(signals) = self.io.signals.as_ref() else {
            return;
        };
        let delivered = if woken {
            signals.take_all()
        } else {
            signals.take()
        };
        for (signal, times) in delivered.iter() {
            if let Some(command) = command_for(signal, times) {
                self.apply(Event::Command {
                    command,
                    from: Origin::Signal(signal),
                });
            }
        }
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

    fn close_listener(&mut self) {
        if let Some(listener) = self.io.listener.take() {
            if let Some(epoll) = &self.io.epoll {
                let _ = epoll.delete(listener.as_fd());
            }
            self.remove_socket_file();
        }
    }

    fn remove_socket_file(&self) {
        let _ = std::fs::remove_file(&self.config.server.socket);
    }

    // ---- io --------------------------------------------------------------------------------

    fn handle_io(&mut self, events: &[EpollEvent]) {
        for event in events {
            self.handle_event(event.data(), event.events());
        }
    }

    fn handle_event(&mut self, token: u64, flags: EpollFlags) {
        let Some(token) = Token::decode(token) else {
            return;
        };
        match token {
            Token::Signals => {} // take_signals
            Token::Listener => self.accept(),
            Token::AdminListener { tcp } => self.admin_accept(tcp),
            Token::Client(id) => self.client_event(id, flags),
            Token::Admin(id) => self.admin_event(id, flags),
            Token::Probe(id) => self.probe_event(id),
            Token::Worker(id) => {
                let id = WorkerId(id);
                if flags
                    .intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR)
                {
                    self.read_worker(id);
                }
                if flags.contains(EpollFlags::EPOLLOUT) {
                    self.io.dirty_workers.push(id);
                }
            }
        }
    }

    fn accept(&mut self) {
        if self.io.accept_paused_until.is_some() {
            return;
        }
        let max_frame = self.max_frame();
        loop {
            let Some(listener) = &self.io.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    let id = self.io.next_client_id;
                    self.io.next_client_id += 1;
                    let conn = match Connection::new(stream, max_frame) {
                        Ok(c) => c,
                        Err(e) => {
                            log::warn!("dropping a new client: {e}");
                            continue;
                        }
                    };
                    let token = Token::Client(id).encode();
                    let watched = match &self.io.epoll {
                        Some(epoll) => epoll.add(
                            conn.stream.as_fd(),
                            EpollEvent::new(EpollFlags::EPOLLIN, token),
                        ),
                        None => Err(nix::Error::EBADF),
                    };
                    if let Err(e) = watched {
                        log::warn!("dropping a new client: epoll: {e}");
                        continue;
                    }
                    self.io.clients.insert(id, conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE/ENFILE: the listener stays readable; pause it instead of spinning.
                    log::error!("accept: {e}; not accepting for {ACCEPT_PAUSE:?}");
                    self.io.accept_paused_until = Some(self.now + ACCEPT_PAUSE);
                    if let (Some(listener), Some(epoll)) = (&self.io.listener, &self.io.epoll) {
                        let _ = epoll.delete(listener.as_fd());
                    }
                    return;
                }
            }
        }
    }

    /// The shell's own timers: the accept pause, the admin interface's, hung-up workers, a
    /// reload's probes.
    fn timers(&mut self) {
        let now = self.now;
        if self.io.accept_paused_until.is_some_and(|t| now >= t) {
            self.io.accept_paused_until = None;
            if let (Some(listener), Some(epoll)) = (&self.io.listener, &self.io.epoll) {
                let _ = epoll.add(
                    listener.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, Token::Listener.encode()),
                );
            }
        }
        self.admin_timers(now);
        self.http_timers(now);
        self.client_timers(now);
        let hung_up: Vec<WorkerId> = self
            .io
            .procs
            .iter_mut()
            .filter(|(_, p)| {
                !p.hangup_reported && p.hung_up.is_some_and(|t| now >= t + HANGUP_GRACE)
            })
            .map(|(id, p)| {
                p.hangup_reported = true;
                *id
            })
            .collect();
        for id in hung_up {
            self.apply(Event::Hangup(id));
        }
        if let Some(outcome) = self.advance_reload() {
            self.apply(outcome);
        }
    }

    /// `server.max_result`: the largest result a worker may send.
    fn max_result(&self) -> usize {
        usize::try_from(self.config.server.max_result).unwrap_or(usize::MAX)
    }

    /// The largest submit frame: the payload limit plus the id and the longest pool name.
    fn max_frame(&self) -> usize {
        usize::try_from(self.config.server.max_payload)
            .unwrap_or(usize::MAX)
            .saturating_add(1 + 8 + 2 + 1024)
    }

    fn client_event(&mut self, id: u64, flags: EpollFlags) {
        if flags.contains(EpollFlags::EPOLLOUT) {
            self.io.dirty_clients.push(id);
        }
        if !flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            return;
        }
        let Some(conn) = self.io.clients.get_mut(&id) else {
            return;
        };
        if !conn.reading() {
            // Not reading it (it holds too much), but a hang-up still ends it: epoll reports
            // HUP/ERR even with no events asked for, and would do so on every wait.
            if flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                self.drop_client(id);
            }
            return;
        }
        // The master's budget for all clients: past it, this one may read its fair share, or
        // finish the frame it started if no other client is doing so; else it waits.
        let Some(budget) = self.read_allowance(id) else {
            return self.hold_back(id);
        };
        let Some(conn) = self.io.clients.get_mut(&id) else {
            return;
        };
        let closed = matches!(conn.read(&mut self.io.scratch, budget), ReadOutcome::Closed);
        let taken = match self.take_submits(id) {
            Ok(taken) => taken,
            Err(reason) => {
                log::info!("closing client {id}: {reason}");
                return self.drop_client(id);
            }
        };
        if closed {
            return self.drop_client(id);
        }
        self.read_done(id, taken > 0);
    }

    /// Hands every whole frame a client sent to the supervisor as a submit; an oversized
    /// SUBMIT is answered `rejected` here (its bytes are skipped). Returns how many frames it
    /// took.
    fn take_submits(&mut self, client: u64) -> Result<usize, server::ClientError> {
        let now = self.now;
        let max_payload = self.config.server.max_payload;
        let mut taken = 0;
        loop {
            let Some(conn) = self.io.clients.get_mut(&client) else {
                return Ok(taken);
            };
            if conn.over_budget() {
                // Leave the rest in its buffer; flush_client pauses reading and resumes later.
                self.io.dirty_clients.push(client);
                return Ok(taken);
            }
            let frame = match conn.reader.next_frame() {
                Ok(Some(protocol::Next::Frame(frame))) => frame,
                Ok(Some(protocol::Next::Oversized { id, len })) => {
                    // Refused before any of it is buffered; the connection and its other
                    // jobs go on.
                    let reason = format!("too large ({len} bytes, max_payload is {max_payload})");
                    conn.put_result(id, protocol::Status::Rejected, reason.into_bytes());
                    self.io.dirty_clients.push(client);
                    taken += 1;
                    continue;
                }
                Ok(None) => {
                    conn.reader.shrink();
                    return Ok(taken);
                }
                Err(e) => return Err(e.into()),
            };
            taken += 1;
            let (id, pool, payload, watch, detach) = match protocol::decode(frame) {
                Ok(Frame::Submit {
                    id,
                    pool,
                    payload,
                    watch,
                    detach,
                }) => (id, pool, payload, watch, detach),
                Ok(other) => return Err(server::ClientError::Unexpected(other.to_string())),
                Err(e) => return Err(e.into()),
            };
            // Counted until it is answered (accepted or not): the client's back-pressure.
            conn.outstanding += payload.len();
            // (Not `apply`: the frame borrows the connection's buffer; a submit's effects are
            // answers, which have no follow-ups.)
            let mut effects = self.sup.on(
                Event::Submit {
                    client: ClientId(client),
                    id,
                    pool,
                    payload,
                    watch,
                    detach,
                },
                now,
            );
            for effect in effects.drain(..) {
                if let Some(follow_up) = self.perform(effect) {
                    self.apply(follow_up);
                }
            }
            self.sup.recycle(effects);
        }
    }

    fn drop_client(&mut self, id: u64) {
        if let Some(conn) = self.io.clients.remove(&id) {
            if let Some(epoll) = &self.io.epoll {
                let _ = epoll.delete(conn.stream.as_fd());
            }
            self.io.client_limits.forget(id, &conn);
            self.apply(Event::ClientGone(ClientId(id)));
            drop(conn);
            let last = self.io.clients.is_empty();
            self.io.client_limits.trim_if_worth_it(last);
        }
    }

    /// Reads what a worker wrote and hands each frame to the supervisor.
    fn read_worker(&mut self, id: WorkerId) {
        let Some(p) = self.io.procs.get_mut(&id) else {
            return;
        };
        if p.forgotten {
            return;
        }
        // Straight into the worker's frame buffer, up to what one wake-up may take.
        let open = p.hung_up.is_some() || p.channel.read(OUTCOME_READ_BUDGET);
        // When these frames arrived, for all of them.
        let now = self.now;
        loop {
            let Some(p) = self.io.procs.get_mut(&id) else {
                return;
            };
            if p.forgotten {
                return; // being killed: nothing more it says counts
            }
            match p.channel.next_said() {
                Ok(None) => break,
                Ok(Some(WorkerSaid::Reported { key, report })) => {
                    // It claims a job before it runs it: its claim word now says what it can
                    // have started (bounded by what it was written whole).
                    let started = p.channel.written_whole().min(p.slot.claimed());
                    self.apply_at(
                        Event::Reported {
                            worker: id,
                            key,
                            report,
                            started,
                        },
                        now,
                    )
                }
                Ok(Some(said)) => self.apply_at(Event::Said { worker: id, said }, now),
                Err(e) => {
                    let what = e.to_string();
                    return self.apply(Event::Broke { worker: id, what });
                }
            }
        }
        // The end of its channel: it is dying (reap() will say how) or it closed it. Stop
        // watching it: a closed socket is readable on every wait.
        let Some(p) = self.io.procs.get_mut(&id) else {
            return;
        };
        if !open && p.hung_up.is_none() {
            p.hung_up = Some(self.now);
            if let Some(epoll) = &self.io.epoll {
                let _ = epoll.delete(p.channel.stream().as_fd());
            }
        }
    }

    /// When a hung-up worker that is still there is to be reported.
    fn hangup_deadline(&self) -> Option<Instant> {
        self.io
            .procs
            .values()
            .filter(|p| !p.hangup_reported)
            .filter_map(|p| p.hung_up.map(|t| t + HANGUP_GRACE))
            .min()
    }

    /// Before the timer pass judges deadlines: what the suspects have to say. Outcomes
    /// waiting on a worker's socket (the master itself may have been off the CPU) are read,
    /// and a redis worker's slot tells which entry it runs since when.
    fn refresh(&mut self) {
        let now = self.now;
        let now_ms = crate::scoreboard::monotonic_ms();
        for id in self.sup.to_refresh(now) {
            self.read_worker(id);
            let redis = self
                .sup
                .worker(id)
                .is_some_and(|w| self.sup.pools()[w.pool].config.engine().is_some());
            let Some(p) = self.io.procs.get(&id) else {
                continue;
            };
            if redis {
                let report = p.slot.read();
                let since = report.running.as_ref().map(|_| {
                    // The worker's word, bounded: a start in the future is now.
                    let age = Duration::from_millis(now_ms.saturating_sub(report.running_since_ms));
                    now.checked_sub(age).unwrap_or(now)
                });
                self.apply(Event::Running { worker: id, since });
            }
        }
    }

    /// `Effect::Recall`: takes back from the worker every job it has not started — the frames
    /// never written, and (through its scoreboard claim) those written but not started.
    fn recall(&mut self, id: WorkerId) -> Option<Event<'static>> {
        let p = self.io.procs.get_mut(&id)?;
        let (unwritten, written_through) = p.channel.take_unwritten();
        drop(unwritten); // the supervisor holds the jobs; these were only its frames
        let started_through = match p.slot.recall(written_through) {
            Recall::Done { started_through } => started_through,
            // An earlier take-back it has not seen yet, or a worker too busy to catch: only
            // what was never written comes back.
            Recall::Pending | Recall::Busy => written_through,
        };
        Some(Event::Recalled {
            worker: id,
            started_through,
            written_through,
        })
    }

    // ---- workers ---------------------------------------------------------------------------

    /// Forks worker `id` for pool `idx`; returns its pid.
    fn spawn(
        &mut self,
        id: WorkerId,
        idx: usize,
        generation: u64,
        predecessors: &[worker::redis::Predecessor],
    ) -> Result<Pid, MasterError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(os("socketpair"))?;
        let slot = Slot::new().map_err(os("mmap (scoreboard slot)"))?;
        // Block every signal across fork: a signal that reached the child before it installed
        // its own handlers would run the master's (inherited) one and be lost. The child
        // unblocks once its handlers are in place, so such a signal is delivered, not lost.
        let mask = nix::sys::signal::SigSet::all()
            .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
            .map_err(os("sigprocmask"))?;
        // SAFETY: the master has one thread; the child only runs `become_worker`, which never
        // returns into the master's code.
        let forked = unsafe { fork() };
        if let Ok(ForkResult::Parent { .. }) | Err(_) = forked {
            let _ = mask.thread_set_mask();
        }
        match forked.map_err(os("fork"))? {
            ForkResult::Child => {
                drop(ours);
                self.become_worker(idx, generation, theirs, mask, predecessors.to_vec(), slot)
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                // Only this worker gets the slot: no later child (worker, probe) inherits it.
                if let Err(e) = slot.keep_from_later_children() {
                    log::warn!("scoreboard slot of worker {child}: madvise: {e}");
                }
                // The worker leads its own process group (a terminal's Ctrl-C reaches the
                // master only). It says so itself too; doing it on both sides, as shells do,
                // leaves no moment at which it is still in ours.
                let _ = nix::unistd::setpgid(child, child);
                // Known as a child before anything can fail: reap() must find it.
                self.io.by_pid.insert(child, id);
                let channel = UnixStream::from(ours);
                let watched = match (channel.set_nonblocking(true), &self.io.epoll) {
                    (Err(e), _) => Err(nix::Error::try_from(e).unwrap_or(nix::Error::EIO)),
                    (Ok(()), None) => Err(nix::Error::EBADF),
                    (Ok(()), Some(epoll)) => epoll.add(
                        channel.as_fd(),
                        EpollEvent::new(EpollFlags::EPOLLIN, Token::Worker(id.0).encode()),
                    ),
                };
                if let Err(e) = watched {
                    // A worker the master cannot hear must not live; reap() finds it gone.
                    let _ = kill(child, Signal::SIGKILL);
                    return Err(os("socketpair")(e));
                }
                self.io.procs.insert(
                    id,
                    Proc {
                        pid: child,
                        channel: WorkerChannel::new(channel).with_max_body(self.max_result()),
                        slot,
                        forgotten: false,
                        hung_up: None,
                        hangup_reported: false,
                    },
                );
                Ok(child)
            }
        }
    }

    /// In the forked child: close everything that belongs to the master and to other workers,
    /// give signals back their defaults, and run the worker. Never returns.
    fn become_worker(
        &mut self,
        idx: usize,
        generation: u64,
        channel: OwnedFd,
        sigmask: nix::sys::signal::SigSet,
        predecessors: Vec<worker::redis::Predecessor>,
        slot: Slot,
    ) -> ! {
        std::mem::take(&mut self.io).leave_for_worker();
        let mut instance = self.instances.get_mut(idx).and_then(Option::take);
        // Other pools' plugin instances are the master's: never run their destructors here.
        for other in self.instances.drain(..).flatten() {
            std::mem::forget(other);
        }
        let pool = self.sup.pools()[idx].config.clone();
        let assignment = worker::Assignment {
            pool,
            generation,
            channel,
            master: self.pid,
            sigmask,
            identity: self.identity.clone(),
            predecessors,
            slot,
            max_result: self.max_result(),
        };
        match instance.as_mut() {
            Some(plugin) => worker::run(plugin, assignment),
            None => {
                log::error!("internal: pool {idx} has no plugin instance");
                // SAFETY: see worker::run.
                unsafe { nix::libc::_exit(WorkerExit::BootFailed.code()) }
            }
        }
    }

    // ---- flush -----------------------------------------------------------------------------

    fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.io.dirty_workers);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty.drain(..) {
            self.flush_worker(id);
        }
        self.io.dirty_workers = dirty;
        let mut dirty = std::mem::take(&mut self.io.dirty_clients);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty.drain(..) {
            self.flush_client(id);
        }
        self.io.dirty_clients = dirty;
        self.release_held_back();
    }

    fn flush_worker(&mut self, id: WorkerId) {
        let Some(p) = self.io.procs.get_mut(&id) else {
            return;
        };
        if p.forgotten {
            return;
        }
        // A channel that cannot be written is a dying or hostile worker: nothing more goes to
        // it (a socket that fails is still writable to epoll, and would wake us on every
        // wait). It is treated as hung up: reaped if it is dying, else reported after
        // HANGUP_GRACE, and then given no job and killed if it stays.
        if p.channel.flush().is_err() {
            p.channel.discard_output();
            if p.hung_up.is_none() {
                p.hung_up = Some(self.now);
                if let Some(epoll) = &self.io.epoll {
                    let _ = epoll.delete(p.channel.stream().as_fd());
                }
            }
            return;
        }
        if let Some(wants_write) = p.channel.write_interest_changed() {
            let flags = if wants_write {
                EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT
            } else {
                EpollFlags::EPOLLIN
            };
            let mut event = EpollEvent::new(flags, Token::Worker(id.0).encode());
            if let Some(epoll) = &self.io.epoll {
                let _ = epoll.modify(p.channel.stream().as_fd(), &mut event);
            }
        }
    }

    fn flush_client(&mut self, id: u64) {
        let Some(conn) = self.io.clients.get_mut(&id) else {
            return;
        };
        if conn.flush().is_err() {
            return self.drop_client(id);
        }
        // Back-pressure: a client holding too much of the master's memory is not read from.
        let paused = conn.over_budget();
        let wants_write = conn.pending_out() > 0;
        let resumed = conn.paused && !paused;
        // Whole frames left in its buffer when `take_submits` stopped at its budget (a frame
        // that took it over): now that it is under it again they are taken, paused or not
        // before — no EPOLLIN will come for bytes already read, and a whole frame left there
        // is no slow frame.
        let waiting = !paused && !matches!(conn.reader.has_frame(), Ok(false));
        if paused != conn.paused || wants_write != conn.wants_write {
            conn.paused = paused;
            conn.wants_write = wants_write;
            self.set_interest(id);
        }
        if resumed || waiting {
            match self.take_submits(id) {
                Ok(taken) => {
                    // Dispatch them on a pass that does not wait.
                    if taken > 0 {
                        self.io.tick_again = true;
                    }
                    return self.read_done(id, taken > 0);
                }
                Err(reason) => {
                    log::info!("closing client {id}: {reason}");
                    return self.drop_client(id);
                }
            }
        }
        self.read_done(id, false);
    }

    /// Shutting down: give clients a moment to receive their last results.
    fn final_flush(&mut self) {
        let until = Instant::now() + FINAL_FLUSH;
        while Instant::now() < until {
            let ids: Vec<u64> = self
                .io
                .clients
                .iter()
                .filter(|(_, c)| c.pending_out() > 0)
                .map(|(id, _)| *id)
                .collect();
            if ids.is_empty() {
                return;
            }
            for id in ids {
                if let Some(conn) = self.io.clients.get_mut(&id) {
                    if conn.flush().is_err() {
                        self.io.clients.remove(&id);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
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
        Some(crate::daemon::detach(&pidfile)?)
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
    master.io.pidfile = Some(pidfile);
    master.run()?;
    if let Some(pidfile) = master.io.pidfile.take() {
        pidfile.remove();
    }
    Ok(())
}
