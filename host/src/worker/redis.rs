//! Redis Streams as a worker's job source: each worker of a `source = "redis"` pool is one
//! consumer (`<hostname>:<pool>:<pid>`) of the pool's consumer group. It reads entries with
//! XREADGROUP, runs the plugin on each, and writes the result (XADD to `reply_to` or the pool's
//! `results`) together with the XACK in one MULTI/EXEC, so no entry is acked without its result
//! and none is answered twice. Entries that cannot be run (no `payload`, or out of attempts)
//! go to the dead-letter stream, acked in the same MULTI/EXEC.
//!
//! Takeover: the master hands a new worker the consumer names of the pool's ended workers and
//! why they ended; it XCLAIMs their pending entries first (a kill -9 is retried at once, not
//! after `claim_idle`), dead-letters those out of `max_attempts`, and deletes a predecessor
//! from the group only once its pending list is empty. Entries idle past `claim_idle` (a whole
//! host died) are XAUTOCLAIMed on start and every `claim_idle / 2` while idle.
//!
//! Waiting: the `redis` crate's blocking `Connection` neither exposes its socket (so it cannot
//! be poll(2)ed together with the signal pipe) nor survives a reply that is not read within
//! its read timeout (it then skips the next reply as the late one). So an idle worker sends
//! `XREADGROUP … BLOCK 100` again and again, with the worker's signals blocked during each
//! (with SO_RCVTIMEO set, a signal would make recv(2) fail with EINTR even under SA_RESTART);
//! they are delivered right after it, so SIGTERM/SIGUSR1 are acted on within ~100 ms. Redis
//! sees only blocking reads, ten a second per idle worker (~0 CPU on both sides); entries
//! are taken the moment they arrive. Entries XAUTOCLAIMed past `claim_idle` are looked for
//! on start and every `claim_idle / 2` while idle, not per job.
//!
//! Outages: a lost or refused connection is retried with capped exponential back-off
//! (100 ms → 5 s), logged once when it starts and once when it ends; signals are still
//! handled while waiting. A group missing after a reconnect (Redis came back empty) is
//! recreated, and the log says so.
//!
//! Never connects in the master (only in the worker, after fork), never trims streams, never
//! logs a password (only `shown_url`).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use jobhost_plugin_api::PluginInstance;
use redis::{Connection, Value};

use super::source::{JobSource, Next, Wake};
use crate::config::{PoolConfig, RedisConfig};
use crate::scoreboard::{Slot, SourceState, StreamFigures};

/// A dead predecessor handed over by the master: its consumer name, why it ended, and the
/// entry it was running then (from its scoreboard slot): only that one used up an attempt.
#[derive(Debug, Clone)]
pub struct Predecessor {
    pub consumer: String,
    pub why: String,
    pub running: Option<String>,
}

/// How long one slice of waiting for a blocking read lasts (the signal latency).
const SLICE: Duration = Duration::from_millis(100);
/// Read timeout for ordinary commands.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The longest a computed result waits to be written with others (one MULTI/EXEC per batch
/// of fast jobs; a slow job's result is written at once).
const FLUSH_AFTER: Duration = Duration::from_millis(2);
/// How often a busy worker reads the stream's figures for `status`.
const FIGURES_EVERY: Duration = Duration::from_secs(1);
/// Bounds of an entry's `reply_ttl` (milliseconds).
const REPLY_TTL: std::ops::RangeInclusive<u64> = 1_000..=30 * 24 * 3_600_000;

/// The consumer name of worker `pid` of `pool` on this host.
pub fn consumer_name(pool: &str, pid: u32) -> String {
    format!("{}:{pool}:{pid}", crate::sys::hostname())
}

/// One stream entry: its id and its fields, as sent (binary-safe).
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// Delivered before (taken over, claimed, or read again from this consumer's history):
    /// it may be the entry that killed a worker, so it runs on its own.
    suspect: bool,
    /// When, and on which of this worker's connections, it was read.
    read_at: Instant,
    conn: u64,
}

impl Entry {
    fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

#[derive(Debug, thiserror::Error)]
enum RedisFault {
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply to {0}: {1}")]
    Reply(&'static str, String),
}

impl RedisFault {
    /// The group or stream went away (Redis restarted empty, or someone deleted them; a
    /// read blocked on a stream that is deleted ends UNBLOCKED).
    fn no_group(&self) -> bool {
        match self {
            RedisFault::Redis(e) => matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")),
            RedisFault::Reply(_, text) => text.contains("NOGROUP") || text.contains("UNBLOCKED"),
        }
    }
}

type Fault<T> = Result<T, RedisFault>;

/// An outage in progress: since when, and when to try again.
struct Outage {
    since: Instant,
    next_try: Instant,
    delay: Duration,
}

pub struct RedisSource {
    channel: OwnedFd,
    cfg: RedisConfig,
    max_attempts: u32,
    consumer: String,
    conn: Option<Connection>,
    /// Read this consumer's own pending entries (id 0) before new ones: after a reconnect,
    /// a reply lost on the way may have delivered entries this worker never saw.
    own_history: bool,
    /// Entries delivered to this consumer, not run yet; the front is next.
    ready: VecDeque<Entry>,
    takeover: VecDeque<Predecessor>,
    /// Results computed and not written yet (with their XACKs): written together, before the
    /// next read, before a suspect entry runs, and at the latest `FLUSH_AFTER` after the
    /// first of them was computed.
    answers: Vec<Answer>,
    first_answer_at: Option<Instant>,
    outage: Option<Outage>,
    connected_once: bool,
    next_autoclaim: Instant,
    /// This worker's scoreboard slot: counts, the running entry, the connection, figures.
    slot: Slot,
    ran: u64,
    failed: u64,
    /// When the stream's figures may be read again, and whether they changed since.
    next_figures: Instant,
    figures_stale: bool,
    /// SETTLE's SHA on this connection.
    settle_sha: Option<String>,
    /// Which connection this is (counted from 1): entries read on an earlier one are settled
    /// with their owner checked.
    conn_gen: u64,
    /// The scoreboard says "connected" (after the first step that went through).
    said_connected: bool,
    /// A sweep failed (no permission for scripts?): said once.
    sweep_failed: bool,
}

/// A computed result not yet written.
struct Answer {
    entry: Entry,
    ok: bool,
    body: Vec<u8>,
}

impl RedisSource {
    pub fn new(
        channel: OwnedFd,
        pool: &PoolConfig,
        cfg: RedisConfig,
        takeover: Vec<Predecessor>,
        slot: Slot,
    ) -> RedisSource {
        let consumer = consumer_name(&pool.name, std::process::id());
        log::debug!(
            "redis consumer {consumer} of group {} on {}",
            cfg.group,
            cfg.stream
        );
        let now = Instant::now();
        RedisSource {
            channel,
            cfg,
            max_attempts: pool.max_attempts,
            consumer,
            conn: None,
            own_history: true,
            ready: VecDeque::new(),
            takeover: takeover.into(),
            answers: Vec::new(),
            first_answer_at: None,
            outage: None,
            connected_once: false,
            next_autoclaim: now,
            slot,
            ran: 0,
            failed: 0,
            next_figures: now,
            figures_stale: true,
            settle_sha: None,
            conn_gen: 0,
            said_connected: false,
            sweep_failed: false,
        }
    }

    fn connect(&mut self) -> Fault<()> {
        let mut conn = open(&self.cfg)?;
        conn.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        let created = ensure_group(&mut conn, &self.cfg)?;
        if created && self.connected_once {
            log::warn!(
                "redis: group {} on stream {} was missing (Redis came back empty?); created it again",
                self.cfg.group,
                self.cfg.stream
            );
        } else if created {
            log::info!(
                "redis: created group {} on stream {}",
                self.cfg.group,
                self.cfg.stream
            );
        }
        if self.outage.is_some() {
            // After an outage every pending entry may look idle past claim_idle (Redis keeps
            // delivery times across a restart): give their owners, reconnecting too, that long
            // to go on with them before anyone claims them.
            self.next_autoclaim = Instant::now() + self.cfg.claim_idle;
        }
        // Loaded now, not at the first retry: a user that may not run scripts cannot settle
        // retries safely, so such a server is an outage with its reason, from the start.
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SETTLE)
            .query(&mut conn)?;
        self.settle_sha = Some(sha);
        self.connected_once = true;
        self.conn_gen += 1;
        // Answers computed before the connection broke are written first; SETTLE skips those
        // whose entries are no longer pending here (their write went through after all).
        self.conn = Some(conn);
        // What was delivered before is in this consumer's pending list: read it from there
        // (after the answers still to write, whose entries are skipped there).
        self.ready.clear();
        self.own_history = true;
        self.figures_stale = true;
        Ok(())
    }

    /// A step went through: an outage, if there was one, is over.
    fn working(&mut self) {
        if let Some(outage) = self.outage.take() {
            log::warn!(
                "redis: reconnected to {} after {:.1?}",
                self.cfg.shown_url,
                outage.since.elapsed()
            );
            self.slot.publish(|w| w.source(&SourceState::Connected));
        } else if !self.said_connected {
            self.slot.publish(|w| w.source(&SourceState::Connected));
        }
        self.said_connected = true;
    }

    /// The connection failed: drop it, start (or go on with) the outage back-off. The outage
    /// lasts until a step goes through, not merely until a connect does: a server that
    /// accepts the connection and then refuses every command (an ACL, OOM, a read-only
    /// replica) is backed off from and logged once too.
    fn lost(&mut self, fault: &RedisFault) {
        self.conn = None;
        let now = Instant::now();
        match &mut self.outage {
            None => {
                log::warn!(
                    "redis: cannot reach {}: {fault}; retrying",
                    self.cfg.shown_url
                );
                let reason = fault.to_string();
                self.slot
                    .publish(|w| w.source(&SourceState::Disconnected { reason }));
                self.outage = Some(Outage {
                    since: now,
                    next_try: now + BACKOFF_FIRST,
                    delay: BACKOFF_FIRST,
                });
            }
            Some(outage) => {
                log::debug!("redis: still cannot reach {}: {fault}", self.cfg.shown_url);
                outage.delay = (outage.delay * 2).min(BACKOFF_CAP);
                outage.next_try = now + outage.delay;
            }
        }
    }

    /// Whether the computed answers must be written before anything else happens: unless
    /// the next entry is a fresh one and they are younger than FLUSH_AFTER.
    fn answers_due(&self) -> bool {
        if self.answers.is_empty() {
            return false;
        }
        let young = self
            .first_answer_at
            .is_some_and(|t| t.elapsed() < FLUSH_AFTER);
        !(young && self.ready.front().is_some_and(|e| !e.suspect))
    }

    /// Writes every computed answer and its XACK in one script (see SETTLE).
    fn flush(&mut self) -> Fault<()> {
        if self.answers.is_empty() {
            return Ok(());
        }
        let conn = self.conn.as_mut().ok_or_else(gone)?;
        // Fresh entries, read on this connection less than claim_idle / 2 ago, cannot have
        // been claimed by anyone (XAUTOCLAIM waits for claim_idle; a restarted Redis broke
        // this connection): one MULTI/EXEC, the fast way. Any other entry may belong to
        // someone else by now: the script settles only what is still ours.
        let fresh = self.answers.iter().all(|a| {
            !a.entry.suspect
                && a.entry.conn == self.conn_gen
                && a.entry.read_at.elapsed() < self.cfg.claim_idle / 2
        });
        if fresh {
            let outcome = answer_all(conn, &self.cfg, &self.answers);
            if let Err(e) = &outcome {
                if e.no_group() {
                    self.answers.clear();
                    self.first_answer_at = None;
                }
            }
            let refused = outcome?;
            let answers = std::mem::take(&mut self.answers);
            self.first_answer_at = None;
            for (index, why) in refused {
                let Some(a) = answers.get(index) else {
                    continue;
                };
                // MULTI does not roll back: the entry is acked already; record where.
                log::error!(
                    "redis: cannot write the result of entry {} of {}: {why}",
                    a.entry.id,
                    self.cfg.stream
                );
                let reason = format!("cannot write its result: {why}");
                let mut dead = redis::cmd("XADD");
                dead.arg(&self.cfg.dead_letter)
                    .arg("*")
                    .arg("reason")
                    .arg(&reason)
                    .arg("stream")
                    .arg(&self.cfg.stream)
                    .arg("entry")
                    .arg(&a.entry.id);
                for (k, v) in &a.entry.fields {
                    dead.arg(k.as_slice()).arg(v.as_slice());
                }
                if let Err(e) = dead.query::<Value>(conn) {
                    log::error!("redis: cannot dead-letter entry {}: {e}", a.entry.id);
                }
            }
            return Ok(());
        }
        let items: Vec<Settle<'_>> = self
            .answers
            .iter()
            .map(|a| Settle {
                entry: &a.entry,
                result: Some((a.ok, &a.body)),
                dead: None,
            })
            .collect();
        let outcome = settle(
            conn,
            &self.cfg,
            &self.consumer,
            Some(&mut self.settle_sha),
            &items,
        );
        drop(items);
        match outcome {
            Ok(unsettled) => {
                let answers = std::mem::take(&mut self.answers);
                self.first_answer_at = None;
                for (index, why) in unsettled {
                    let Some(a) = answers.get(index) else {
                        continue;
                    };
                    report_unsettled(&self.cfg, &a.entry, &why);
                    if let Unsettled::Refused(e) = why {
                        // Where a person looks, and acked only once it is there.
                        let reason = format!("cannot write its result: {e}");
                        dead_letter(conn, &self.cfg, &self.consumer, &a.entry, &reason, false)?;
                    }
                }
                Ok(())
            }
            Err(e) if e.no_group() => {
                // Redis lost the group (and so the entries): nothing left to answer.
                self.answers.clear();
                self.first_answer_at = None;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// One step with a live connection.
    fn step(&mut self, plugin: &mut PluginInstance) -> Fault<Next> {
        if self.answers_due() {
            self.flush()?;
        }
        // Taken over only when nothing else is ready, `batch` at a time: a worker never holds
        // more entries than claim_idle allows for (batch × job_timeout).
        if let Some(predecessor) = self
            .takeover
            .front()
            .filter(|_| self.ready.is_empty())
            .cloned()
        {
            let conn = self.conn.as_mut().ok_or_else(gone)?;
            let (claimed, done) = take_over(
                conn,
                &self.cfg,
                &self.consumer,
                &predecessor,
                self.max_attempts,
            )?;
            if done {
                self.takeover.pop_front();
            }
            // Retries go first: they waited longest.
            for entry in claimed.into_iter().rev() {
                self.ready.push_front(entry);
            }
            if self.answers_due() {
                self.flush()?;
            }
        }
        if let Some(entry) = self.ready.pop_front() {
            self.run(plugin, entry)?;
            return Ok(Next::Worked);
        }
        if !self.takeover.is_empty() {
            return Ok(again());
        }
        self.flush()?;
        let now = Instant::now();
        if now >= self.next_autoclaim && !self.own_history {
            self.next_autoclaim = now + self.cfg.claim_idle / 2;
            let conn = self.conn.as_mut().ok_or_else(gone)?;
            let claimed = autoclaim(conn, &self.cfg, &self.consumer, self.max_attempts)?;
            // Tidying only: a sweep that fails (a user without scripting) claims nothing less.
            match sweep(conn, &self.cfg, &self.consumer) {
                Ok(()) => self.sweep_failed = false,
                Err(e) if e.no_group() => return Err(e),
                Err(e) => {
                    if !std::mem::replace(&mut self.sweep_failed, true) {
                        log::warn!(
                            "redis: cannot remove dead consumers from group {}: {e}",
                            self.cfg.group
                        );
                    }
                }
            }
            if !claimed.is_empty() {
                self.ready.extend(claimed);
                return Ok(again());
            }
        }
        let entries = self.read()?;
        if entries.is_empty() {
            if std::mem::take(&mut self.figures_stale) {
                self.read_figures()?;
            }
        } else {
            self.figures_stale = true;
            if now >= self.next_figures {
                self.read_figures()?;
            }
        }
        self.ready.extend(entries);
        // Run the first entry read before the batch loop looks at signals again: a stop that
        // came during the read then never leaves a read entry pending (with batch = 1, none;
        // with more, the rest are handed back on the way out).
        if let Some(entry) = self.ready.pop_front() {
            self.run(plugin, entry)?;
            return Ok(Next::Worked);
        }
        Ok(again())
    }

    /// One XREADGROUP: this consumer's history first (after a (re)connect), then new entries
    /// with BLOCK. The worker's signals are held for the read (see the module doc).
    fn read(&mut self) -> Fault<Vec<Entry>> {
        let conn = self.conn.as_mut().ok_or_else(gone)?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.cfg.batch);
        if !self.own_history {
            cmd.arg("BLOCK").arg(SLICE.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(&self.cfg.stream)
            .arg(if self.own_history { "0" } else { ">" });
        // With SO_RCVTIMEO set, a signal makes recv(2) fail with EINTR even under SA_RESTART
        // (signal(7)), which would break the connection: the worker's signals are held for
        // the read (at most one BLOCK slice) and delivered right after it.
        let held = hold_signals();
        let reply: redis::RedisResult<Value> = cmd.query(conn);
        if let Some(old) = held {
            let _ = old.thread_set_mask();
        }
        let value = reply?;
        if let Value::ServerError(e) = &value {
            return Err(redis::RedisError::from(e.clone()).into());
        }
        let mut entries = read_reply(value)?;
        for entry in &mut entries {
            entry.conn = self.conn_gen;
        }
        if !self.own_history {
            return Ok(entries);
        }
        if entries.is_empty() {
            self.own_history = false;
            return Ok(entries);
        }
        // History: delivered before, so each may be the one that killed a worker.
        let mut gone_ids = Vec::new();
        entries.retain_mut(|entry| {
            entry.suspect = true;
            if entry.fields.is_empty() {
                gone_ids.push(entry.id.clone()); // deleted from the stream while pending
                return false;
            }
            true
        });
        if !gone_ids.is_empty() {
            let _: Value = redis::cmd("XACK")
                .arg(&self.cfg.stream)
                .arg(&self.cfg.group)
                .arg(&gone_ids)
                .query(conn)?;
        }
        // COUNT bounds a history read too: the next read goes on after the last one seen.
        if entries.len() < self.cfg.batch && gone_ids.is_empty() {
            self.own_history = false;
        }
        Ok(entries)
    }

    /// XLEN and the group's line of XINFO GROUPS, into the scoreboard (for `status`).
    fn read_figures(&mut self) -> Fault<()> {
        let conn = self.conn.as_mut().ok_or_else(gone)?;
        let (length, groups): (u64, Value) = redis::pipe()
            .cmd("XLEN")
            .arg(&self.cfg.stream)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.cfg.stream)
            .query(conn)?;
        self.next_figures = Instant::now() + FIGURES_EVERY;
        if let Some((pending, lag)) = group_figures(&groups, &self.cfg.group) {
            let figures = StreamFigures {
                at_ms: crate::scoreboard::monotonic_ms(),
                length,
                pending,
                lag,
            };
            self.slot.publish(|w| w.figures(&figures));
        }
        Ok(())
    }

    fn run(&mut self, plugin: &mut PluginInstance, entry: Entry) -> Fault<()> {
        let Some(payload) = entry.field("payload") else {
            let conn = self.conn.as_mut().ok_or_else(gone)?;
            return dead_letter(
                conn,
                &self.cfg,
                &self.consumer,
                &entry,
                "the entry has no payload field",
                false,
            );
        };
        let started = Instant::now();
        self.slot.publish(|w| w.running(Some(entry.id.as_bytes())));
        // A Redis result has no place for progress or partial data: they are dropped.
        let (ok, body) = match super::job::handle(plugin, payload, &mut |_| {}) {
            Ok(result) => (true, result),
            Err(message) => (false, message.into_bytes()),
        };
        self.ran += 1;
        if !ok {
            self.failed += 1;
        }
        let (ran, failed) = (self.ran, self.failed);
        self.slot.publish(|w| {
            w.running(None);
            w.jobs(ran, failed);
        });
        let suspect = entry.suspect;
        self.answers.push(Answer { entry, ok, body });
        self.first_answer_at.get_or_insert(started);
        // A retry runs on its own (its result is written before the next entry runs), and so
        // does the result of a job that took long: both are written at once.
        if suspect || started.elapsed() >= FLUSH_AFTER {
            // The job ran: a failure to write is the connection's, handled like any other
            // (its answer is kept and written after the reconnect).
            if let Err(fault) = self.flush() {
                self.fault(&fault);
            }
        }
        Ok(())
    }

    /// On the way out: write what was computed, and hand the entries read but not started
    /// back to the group (added again, the originals acked, in one MULTI/EXEC), so that none
    /// waits for `claim_idle`; then leave the group if nothing is pending here any more.
    fn hand_back(&mut self) -> Fault<()> {
        if self.conn.is_none() {
            self.connect()?;
        }
        self.flush()?;
        let conn = self.conn.as_mut().ok_or_else(gone)?;
        if !self.ready.is_empty() {
            let keys = vec![self.cfg.stream.as_bytes().to_vec()];
            let mut args = vec![
                self.cfg.group.as_bytes().to_vec(),
                self.consumer.as_bytes().to_vec(),
            ];
            for entry in &self.ready {
                let keep_id = entry.field("id").is_none();
                args.push(entry.id.as_bytes().to_vec());
                args.push(
                    (entry.fields.len() + usize::from(keep_id))
                        .to_string()
                        .into_bytes(),
                );
                if keep_id {
                    // The submitter knows it by its first id: keep it.
                    args.push(b"id".to_vec());
                    args.push(entry.id.as_bytes().to_vec());
                }
                for (k, v) in &entry.fields {
                    args.push(k.clone());
                    args.push(v.clone());
                }
            }
            let handed: i64 = match script(conn, None, HAND_BACK, &keys, &args)? {
                Value::Int(n) => n,
                other => {
                    return Err(RedisFault::Reply(
                        "the hand-back script",
                        format!("{other:?}"),
                    ))
                }
            };
            log::info!(
                "redis: handed {handed} entr{} read but not started back to {}",
                if handed == 1 { "y" } else { "ies" },
                self.cfg.stream
            );
            self.ready.clear();
        }
        if pending(conn, &self.cfg, "-", "+", 1, Some(&self.consumer))?.is_empty() {
            let _: Value = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&self.cfg.stream)
                .arg(&self.cfg.group)
                .arg(&self.consumer)
                .query(conn)?;
        }
        Ok(())
    }
}

fn again() -> Next {
    Next::Idle(Wake {
        timeout: Some(Duration::ZERO),
    })
}

/// Blocks the worker's signals; returns the mask to restore.
fn hold_signals() -> Option<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
    ] {
        set.add(signal);
    }
    let mut old = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old)).ok()?;
    Some(old)
}

fn gone() -> RedisFault {
    RedisFault::Reply("(none)", "not connected".into())
}

/// Connects (with the password from `password_file`, if any, over the URL's).
pub fn open(cfg: &RedisConfig) -> Result<Connection, redis::RedisError> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())?;
    if let Some(password) = &cfg.password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    redis::Client::open(info)?.get_connection_with_timeout(CONNECT_TIMEOUT)
}

/// XGROUP CREATE … 0 MKSTREAM. Ok(true): it was created; Ok(false): it was there. At 0, not
/// `$`: entries added before the group existed (a producer that started first, a Redis that
/// came back empty and was written to again before a worker reconnected) are run, not skipped.
pub fn ensure_group(conn: &mut Connection, cfg: &RedisConfig) -> Result<bool, redis::RedisError> {
    let result: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&cfg.stream)
        .arg(&cfg.group)
        .arg("0")
        .arg("MKSTREAM")
        .query(conn);
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the group exists (for `jobhost check`): `Ok(None)` when the stream does not.
pub fn group_exists(
    conn: &mut Connection,
    cfg: &RedisConfig,
) -> Result<Option<bool>, redis::RedisError> {
    let exists: i64 = redis::cmd("EXISTS").arg(&cfg.stream).query(conn)?;
    if exists == 0 {
        return Ok(None);
    }
    let groups: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&cfg.stream)
        .query(conn)?;
    let Value::Array(groups) = groups else {
        return Ok(Some(false));
    };
    Ok(Some(groups.iter().any(|g| {
        let pairs: Vec<&Value> = match g {
            Value::Array(items) => items.iter().collect(),
            _ => return false,
        };
        pairs.chunks(2).any(|kv| {
            kv.len() == 2
                && bytes(kv[0]).as_deref() == Some(b"name".as_slice())
                && bytes(kv[1]).as_deref() == Some(cfg.group.as_bytes())
        })
    })))
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other).and_then(|t| t.parse().ok()),
    }
}

/// `[id, [field, value, …] | nil]` → an entry (no fields for a deleted one).
fn parse_entry(v: &Value) -> Option<Entry> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first()?)?;
    let fields = match parts.get(1) {
        Some(Value::Array(kv)) => kv
            .chunks(2)
            .filter_map(|c| Some((bytes(c.first()?)?, bytes(c.get(1)?)?)))
            .collect(),
        _ => Vec::new(),
    };
    Some(Entry {
        id,
        fields,
        suspect: false,
        read_at: Instant::now(),
        conn: 0,
    })
}

fn parse_entries(v: &Value) -> Vec<Entry> {
    match v {
        Value::Array(items) => items.iter().filter_map(parse_entry).collect(),
        _ => Vec::new(),
    }
}

/// XREADGROUP's reply: nil, or `[[stream, [entry, …]]]`.
fn read_reply(v: Value) -> Fault<Vec<Entry>> {
    match &v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => Ok(streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(pair) => pair.get(1).map(parse_entries),
                _ => None,
            })
            .flatten()
            .collect()),
        Value::Map(streams) => Ok(streams.iter().flat_map(|(_, e)| parse_entries(e)).collect()),
        other => Err(RedisFault::Reply("XREADGROUP", format!("{other:?}"))),
    }
}

/// Where an entry's result goes: its `reply_to`, else the pool's `results`, else nowhere.
fn reply_target(cfg: &RedisConfig, entry: &Entry) -> Option<Vec<u8>> {
    match entry.field("reply_to") {
        Some(to) if !to.is_empty() => Some(to.to_vec()),
        _ => cfg.results.as_ref().map(|r| r.as_bytes().to_vec()),
    }
}

fn add_result(pipe: &mut redis::Pipeline, target: &[u8], entry: &Entry, ok: bool, body: &[u8]) {
    let id: &[u8] = entry.field("id").unwrap_or(entry.id.as_bytes());
    pipe.cmd("XADD")
        .arg(target)
        .arg("*")
        .arg("id")
        .arg(id)
        .arg("status")
        .arg(if ok { "ok" } else { "failed" })
        .arg("body")
        .arg(body);
}

/// The results of `answers` and their XACKs, in one MULTI/EXEC. Returns the answers whose
/// result Redis refused (a `reply_to` that is not a stream), with its error: those entries
/// are acked all the same (MULTI does not roll back).
fn answer_all(
    conn: &mut Connection,
    cfg: &RedisConfig,
    answers: &[Answer],
) -> Fault<Vec<(usize, String)>> {
    let mut pipe = redis::pipe();
    pipe.atomic().ignore_errors();
    // Which reply in EXEC's array is each answer's XADD.
    let mut xadds = Vec::with_capacity(answers.len());
    let mut replies = 0;
    for (index, a) in answers.iter().enumerate() {
        let Some(target) = reply_target(cfg, &a.entry) else {
            continue;
        };
        add_result(&mut pipe, &target, &a.entry, a.ok, &a.body);
        xadds.push((index, replies));
        replies += 1;
        if let (Some(ttl), Some(_)) = (reply_ttl(&a.entry), a.entry.field("reply_to")) {
            pipe.cmd("PEXPIRE").arg(&target).arg(ttl);
            replies += 1;
        }
    }
    pipe.cmd("XACK").arg(&cfg.stream).arg(&cfg.group).arg(
        answers
            .iter()
            .map(|a| a.entry.id.as_str())
            .collect::<Vec<_>>(),
    );
    let results: Vec<redis::RedisResult<Value>> = pipe.query(conn)?;
    if let Some(Err(e)) = results.last() {
        return Err(RedisFault::Reply("XACK", e.to_string()));
    }
    Ok(xadds
        .into_iter()
        .filter_map(|(index, reply)| match results.get(reply) {
            Some(Err(e)) => Some((index, e.to_string())),
            _ => None,
        })
        .collect())
}

/// Hands entries read but not started back to the stream: each one still pending to this
/// consumer is added again (same fields) and the original acked, atomically. KEYS: stream.
/// ARGV: group, consumer, then per entry: id, field count, fields. Returns how many.
const HAND_BACK: &str = r#"
local group, me = ARGV[1], ARGV[2]
local handed = 0
local i = 3
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  local first = i + 2
  i = first + 2 * n
  if #redis.call('XPENDING', KEYS[1], group, id, id, 1, me) > 0 then
    local args = {'XADD', KEYS[1], '*'}
    for j = first, first + 2 * n - 1 do table.insert(args, ARGV[j]) end
    redis.call(unpack(args))
    redis.call('XACK', KEYS[1], group, id)
    handed = handed + 1
  end
end
return handed
"#;

/// The entry's `reply_ttl`: how long its reply stream is kept after this result (ms).
fn reply_ttl(entry: &Entry) -> Option<u64> {
    let ttl: u64 = std::str::from_utf8(entry.field("reply_ttl")?)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(ttl.clamp(*REPLY_TTL.start(), *REPLY_TTL.end()))
}

/// Writes results, dead letters and XACKs for entries still pending to this consumer, in one
/// script (atomic, as MULTI/EXEC is, but it can look before it writes). An entry that is no
/// longer this consumer's — claimed by another after an outage longer than claim_idle — is
/// left alone: its new owner answers it, and answering it here too would answer it twice. A
/// result Redis refuses (its reply_to is not a stream) or a dead letter it refuses (the
/// dead-letter key is not a stream) leaves the entry pending rather than acked and lost.
///
/// KEYS: stream, dead-letter stream, reply streams. ARGV: group, consumer, the lowest and the
/// highest id, how many of this consumer's pending entries to look at between them, then per
/// entry:
/// id, reply stream (index into KEYS; 0: none), status, body, result id, reply_ttl (0: none),
/// dead-letter reason ('': not dead), field count, the entry's fields (for a dead letter).
/// Returns `{id, what, error}` for each entry not settled.
const SETTLE: &str = r#"
local group, me = ARGV[1], ARGV[2]
local mine = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], group, ARGV[3], ARGV[4], tonumber(ARGV[5]), me)) do
  mine[p[1]] = true
end
local out, acks, ttls = {}, {'XACK', KEYS[1], group}, {}
local i = 6
while i <= #ARGV do
  local id, target, status, body, rid = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local ttl, reason, n = tonumber(ARGV[i + 5]), ARGV[i + 6], tonumber(ARGV[i + 7])
  local first = i + 8
  i = first + 2 * n
  if not mine[id] then
    table.insert(out, {id, 'gone', ''})
  else
    local ok = true
    if target > 0 then
      local r = redis.pcall('XADD', KEYS[target], '*', 'id', rid, 'status', status, 'body', body)
      if type(r) == 'table' and r.err then
        ok = false
        table.insert(out, {id, 'refused', r.err})
      elseif ttl > 0 then
        ttls[target] = math.max(ttls[target] or 0, ttl)
      end
    end
    if ok and reason ~= '' then
      local args = {'XADD', KEYS[2], '*', 'reason', reason, 'stream', KEYS[1], 'entry', id}
      for j = first, first + 2 * n - 1 do table.insert(args, ARGV[j]) end
      local r = redis.pcall(unpack(args))
      if type(r) == 'table' and r.err then
        ok = false
        table.insert(out, {id, 'dead', r.err})
      end
    end
    if ok then table.insert(acks, id) end
  end
end
if #acks > 3 then redis.call(unpack(acks)) end
for target, ttl in pairs(ttls) do redis.pcall('PEXPIRE', KEYS[target], ttl) end
return out
"#;

/// One entry to settle: its result (to its reply stream, if it has one) and/or its move to
/// the dead-letter stream with a reason.
struct Settle<'a> {
    entry: &'a Entry,
    result: Option<(bool, &'a [u8])>,
    dead: Option<&'a str>,
}

/// An entry the script did not settle, and why.
#[derive(Debug)]
enum Unsettled {
    /// No longer pending to this consumer: someone else owns it now.
    Gone,
    /// Its result could not be written (the error): it stays pending.
    Refused(String),
    /// Its dead letter could not be written (the error): it stays pending.
    DeadRefused(String),
}

/// Runs SETTLE over `items`; returns, by index, those not settled. `sha`: the script's cached
/// SHA on this connection (loaded when missing or when Redis forgot it); `None` sends the
/// script itself (for the rare callers).
fn settle(
    conn: &mut Connection,
    cfg: &RedisConfig,
    me: &str,
    sha: Option<&mut Option<String>>,
    items: &[Settle<'_>],
) -> Fault<Vec<(usize, Unsettled)>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let mut keys: Vec<Vec<u8>> = vec![
        cfg.stream.as_bytes().to_vec(),
        cfg.dead_letter.as_bytes().to_vec(),
    ];
    let ids = || items.iter().map(|i| i.entry.id.as_str());
    let (Some(lo), Some(hi)) = (
        ids().min_by_key(|id| stream_id_key(id)),
        ids().max_by_key(|id| stream_id_key(id)),
    ) else {
        return Ok(Vec::new());
    };
    // This consumer holds the entries settled, those read and not run, and perhaps a few
    // left unsettled before: all of them lie within this bound.
    let look_at = 2 * items.len() + cfg.batch + 64;
    let mut args: Vec<Vec<u8>> = vec![
        cfg.group.as_bytes().to_vec(),
        me.as_bytes().to_vec(),
        lo.as_bytes().to_vec(),
        hi.as_bytes().to_vec(),
        look_at.to_string().into_bytes(),
    ];
    for item in items {
        let e = item.entry;
        let target = match (item.result, reply_target(cfg, e)) {
            (Some(_), Some(t)) => match keys.iter().skip(2).position(|k| *k == t) {
                Some(at) => at + 3,
                None => {
                    keys.push(t);
                    keys.len()
                }
            },
            _ => 0,
        };
        let (ok, body) = item.result.unwrap_or((false, b""));
        let ttl = e.field("reply_to").and(reply_ttl(e)).unwrap_or(0);
        args.push(e.id.as_bytes().to_vec());
        args.push(target.to_string().into_bytes());
        args.push(if ok {
            b"ok".to_vec()
        } else {
            b"failed".to_vec()
        });
        args.push(body.to_vec());
        args.push(e.field("id").unwrap_or(e.id.as_bytes()).to_vec());
        args.push(ttl.to_string().into_bytes());
        match item.dead {
            Some(reason) => {
                args.push(reason.as_bytes().to_vec());
                args.push(e.fields.len().to_string().into_bytes());
                for (k, v) in &e.fields {
                    args.push(k.clone());
                    args.push(v.clone());
                }
            }
            None => {
                args.push(Vec::new());
                args.push(b"0".to_vec());
            }
        }
    }
    let reply = script(conn, sha, SETTLE, &keys, &args)?;
    let Value::Array(rows) = reply else {
        return Err(RedisFault::Reply("the settle script", format!("{reply:?}")));
    };
    Ok(rows
        .iter()
        .filter_map(|row| {
            let Value::Array(parts) = row else {
                return None;
            };
            let id = text(parts.first()?)?;
            let what = text(parts.get(1)?)?;
            let error = parts.get(2).and_then(text).unwrap_or_default();
            let index = items.iter().position(|i| i.entry.id == id)?;
            let why = match what.as_str() {
                "gone" => Unsettled::Gone,
                "refused" => Unsettled::Refused(error),
                _ => Unsettled::DeadRefused(error),
            };
            Some((index, why))
        })
        .collect())
}

/// Runs a Lua script: EVALSHA with the cached SHA (loaded first when there is none, and again
/// when Redis answers NOSCRIPT: it restarted or was flushed), or EVAL when there is no cache.
fn script(
    conn: &mut Connection,
    sha: Option<&mut Option<String>>,
    body: &str,
    keys: &[Vec<u8>],
    args: &[Vec<u8>],
) -> Fault<Value> {
    let call = |conn: &mut Connection, how: &str, what: &str| -> redis::RedisResult<Value> {
        redis::cmd(how)
            .arg(what)
            .arg(keys.len())
            .arg(keys)
            .arg(args)
            .query(conn)
    };
    let Some(sha) = sha else {
        return Ok(call(conn, "EVAL", body)?);
    };
    for _ in 0..2 {
        if sha.is_none() {
            let loaded: String = redis::cmd("SCRIPT").arg("LOAD").arg(body).query(conn)?;
            *sha = Some(loaded);
        }
        let Some(digest) = sha.as_deref() else {
            continue;
        };
        match call(conn, "EVALSHA", digest) {
            Err(e) if e.code() == Some("NOSCRIPT") => *sha = None,
            other => return Ok(other?),
        }
    }
    Err(RedisFault::Reply(
        "EVALSHA",
        "the script is not kept (NOSCRIPT)".into(),
    ))
}

/// Moves an entry to the dead-letter stream with `reason` and acks it, in one script;
/// `answer_failed`: its submitter is told too (it was a job that ran out of attempts). A dead
/// letter Redis refuses leaves the entry pending (said in the log) rather than lost.
fn dead_letter(
    conn: &mut Connection,
    cfg: &RedisConfig,
    me: &str,
    entry: &Entry,
    reason: &str,
    answer_failed: bool,
) -> Fault<()> {
    log::warn!(
        "redis: entry {} of {} to {}: {reason}",
        entry.id,
        cfg.stream,
        cfg.dead_letter
    );
    let item = Settle {
        entry,
        result: answer_failed.then_some((false, reason.as_bytes())),
        dead: Some(reason),
    };
    for (_, why) in settle(conn, cfg, me, None, &[item])? {
        report_unsettled(cfg, entry, &why);
    }
    Ok(())
}

fn report_unsettled(cfg: &RedisConfig, entry: &Entry, why: &Unsettled) {
    match why {
        Unsettled::Gone => log::info!(
            "redis: entry {} of {} is no longer pending here (answered before the connection broke, or claimed by another consumer): not answered again",
            entry.id,
            cfg.stream
        ),
        Unsettled::Refused(e) => log::error!(
            "redis: cannot write the result of entry {} of {}: {e}",
            entry.id,
            cfg.stream
        ),
        Unsettled::DeadRefused(e) => log::error!(
            "redis: cannot dead-letter entry {} of {} to {}: {e}; it stays pending",
            entry.id,
            cfg.stream,
            cfg.dead_letter
        ),
    }
}

/// XPENDING's extended form for `consumer` (or everyone): `(id, deliveries)`.
fn pending(
    conn: &mut Connection,
    cfg: &RedisConfig,
    start: &str,
    end: &str,
    count: usize,
    consumer: Option<&str>,
) -> Fault<Vec<(String, i64)>> {
    let mut cmd = redis::cmd("XPENDING");
    cmd.arg(&cfg.stream)
        .arg(&cfg.group)
        .arg(start)
        .arg(end)
        .arg(count);
    if let Some(consumer) = consumer {
        cmd.arg(consumer);
    }
    let value: Value = cmd.query(conn)?;
    let Value::Array(rows) = value else {
        return Err(RedisFault::Reply("XPENDING", format!("{value:?}")));
    };
    Ok(rows
        .iter()
        .filter_map(|row| match row {
            Value::Array(r) => Some((text(r.first()?)?, int(r.get(3)?)?)),
            _ => None,
        })
        .collect())
}

/// Takes over up to `batch` pending entries of a dead predecessor. Returns the entries to
/// run, and whether its pending list is now empty (it was then deleted from the group).
fn take_over(
    conn: &mut Connection,
    cfg: &RedisConfig,
    me: &str,
    dead: &Predecessor,
    max_attempts: u32,
) -> Fault<(Vec<Entry>, bool)> {
    let rows = match pending(conn, cfg, "-", "+", cfg.batch, Some(&dead.consumer)) {
        Err(e) if e.no_group() => return Ok((Vec::new(), true)),
        other => other?,
    };
    if rows.is_empty() {
        let _: Value = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(&cfg.stream)
            .arg(&cfg.group)
            .arg(&dead.consumer)
            .query(conn)?;
        log::debug!(
            "redis: consumer {} removed from group {}",
            dead.consumer,
            cfg.group
        );
        return Ok((Vec::new(), true));
    }
    // Only the entry it was running used up an attempt (XCLAIM counts one more delivery);
    // the others are claimed with their count as it was (RETRYCOUNT), grouped by count.
    let blamed = |id: &str| dead.running.as_deref() == Some(id);
    let mut counts: Vec<i64> = rows
        .iter()
        .filter(|(id, _)| !blamed(id))
        .map(|(_, n)| *n)
        .collect();
    counts.sort_unstable();
    counts.dedup();
    let mut pipe = redis::pipe();
    let claim = |pipe: &mut redis::Pipeline, ids: Vec<&String>, keep: Option<i64>| {
        let cmd = pipe.cmd("XCLAIM");
        cmd.arg(&cfg.stream).arg(&cfg.group).arg(me).arg(0).arg(ids);
        if let Some(count) = keep {
            cmd.arg("RETRYCOUNT").arg(count);
        }
    };
    claim(
        &mut pipe,
        rows.iter()
            .filter(|(id, _)| blamed(id))
            .map(|(id, _)| id)
            .collect(),
        None,
    );
    for &count in &counts {
        claim(
            &mut pipe,
            rows.iter()
                .filter(|(id, n)| !blamed(id) && *n == count)
                .map(|(id, _)| id)
                .collect(),
            Some(count),
        );
    }
    let replies: Vec<Value> = pipe.query(conn)?;
    let mut claimed: Vec<Entry> = replies.iter().flat_map(parse_entries).collect();
    claimed.sort_by_key(|e| stream_id_key(&e.id));
    if claimed.is_empty() {
        // All of them were deleted from the stream meanwhile: nothing to run; ack them so
        // the list empties (Redis 7 drops them from it on XCLAIM already).
        let mut ack = redis::cmd("XACK");
        ack.arg(&cfg.stream).arg(&cfg.group);
        for (id, _) in &rows {
            ack.arg(id);
        }
        let _: Value = ack.query(conn)?;
    }
    let mut run = Vec::new();
    for mut entry in claimed {
        entry.suspect = true;
        let deliveries = rows
            .iter()
            .find(|(id, _)| *id == entry.id)
            .map_or(1, |(_, n)| *n);
        if !blamed(&entry.id) {
            log::debug!(
                "redis: taking over entry {} of {} (not started there)",
                entry.id,
                dead.consumer
            );
            run.push(entry);
        } else if deliveries >= i64::from(max_attempts) {
            let reason = format!("{}, attempt {deliveries} of {max_attempts}", dead.why);
            dead_letter(conn, cfg, me, &entry, &reason, true)?;
        } else {
            log::info!(
                "redis: retrying entry {} of {} ({}, attempt {deliveries} of {max_attempts})",
                entry.id,
                dead.consumer,
                dead.why
            );
            run.push(entry);
        }
    }
    Ok((run, false))
}

/// Sorts stream ids as Redis does (`ms-seq`, numerically); a malformed one sorts last.
fn stream_id_key(id: &str) -> (u64, u64) {
    id.split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .unwrap_or((u64::MAX, u64::MAX))
}

/// Removes, in one atomic script, the group's consumers (other than `me`) that have nothing
/// pending and have not read for longer than `claim_idle`: those of a host that died, once
/// their entries were claimed. A live consumer that is only resting (a worker held back for
/// lack of memory) loses nothing by it: its next read makes it again.
fn sweep(conn: &mut Connection, cfg: &RedisConfig, me: &str) -> Fault<()> {
    const SWEEP: &str = r#"
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) and f['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    table.insert(removed, f['name'])
  end
end
return removed
"#;
    // Sent as EVAL (rarely: every claim_idle / 2), so the crate's script cache is not needed.
    let removed: Vec<String> = redis::cmd("EVAL")
        .arg(SWEEP)
        .arg(1)
        .arg(&cfg.stream)
        .arg(&cfg.group)
        .arg(cfg.claim_idle.as_millis() as u64)
        .arg(me)
        .query(conn)?;
    for name in removed {
        log::info!(
            "redis: removed consumer {name} from group {} (nothing pending, idle past claim_idle {:?})",
            cfg.group,
            cfg.claim_idle
        );
    }
    Ok(())
}

/// The group's `pending` and `lag` from XINFO GROUPS (RESP2 pairs or a RESP3 map).
fn group_figures(groups: &Value, group: &str) -> Option<(u64, Option<u64>)> {
    let Value::Array(groups) = groups else {
        return None;
    };
    groups.iter().find_map(|g| {
        let pairs: Vec<(&Value, &Value)> = match g {
            Value::Array(items) => items
                .chunks(2)
                .filter_map(|kv| Some((kv.first()?, kv.get(1)?)))
                .collect(),
            Value::Map(items) => items.iter().map(|(k, v)| (k, v)).collect(),
            _ => return None,
        };
        let field = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| bytes(k).as_deref() == Some(name.as_bytes()))
                .map(|(_, v)| *v)
        };
        if field("name").and_then(bytes).as_deref() != Some(group.as_bytes()) {
            return None;
        }
        let pending = field("pending").and_then(int)?.max(0) as u64;
        let lag = field("lag").and_then(int).map(|l| l.max(0) as u64);
        Some((pending, lag))
    })
}

/// XAUTOCLAIM of entries idle past claim_idle (their consumer's host died), until the cursor
/// comes back to 0-0 or a batch was claimed.
fn autoclaim(
    conn: &mut Connection,
    cfg: &RedisConfig,
    me: &str,
    max_attempts: u32,
) -> Fault<Vec<Entry>> {
    let mut cursor = "0-0".to_string();
    let mut run = Vec::new();
    for _ in 0..100 {
        let reply: Value = match redis::cmd("XAUTOCLAIM")
            .arg(&cfg.stream)
            .arg(&cfg.group)
            .arg(me)
            .arg(cfg.claim_idle.as_millis() as u64)
            .arg(&cursor)
            .arg("COUNT")
            .arg(cfg.batch)
            .query(conn)
        {
            Err(e) if e.code() == Some("NOGROUP") => return Err(e.into()),
            other => other?,
        };
        let Value::Array(parts) = &reply else {
            return Err(RedisFault::Reply("XAUTOCLAIM", format!("{reply:?}")));
        };
        cursor = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        for mut entry in parts.get(1).map(parse_entries).unwrap_or_default() {
            entry.suspect = true;
            // The claim counted one more delivery: the ones before it were attempts.
            let deliveries = pending(conn, cfg, &entry.id, &entry.id, 1, None)?
                .first()
                .map_or(1, |(_, n)| *n)
                - 1;
            if deliveries >= i64::from(max_attempts) {
                let reason = format!(
                    "its consumer stopped answering (idle past claim_idle {:?}), attempt {deliveries} of {max_attempts}",
                    cfg.claim_idle
                );
                dead_letter(conn, cfg, me, &entry, &reason, true)?;
            } else {
                log::info!(
                    "redis: claimed entry {} idle past claim_idle {:?}",
                    entry.id,
                    cfg.claim_idle
                );
                run.push(entry);
            }
        }
        if cursor == "0-0" || !run.is_empty() {
            break;
        }
    }
    Ok(run)
}

impl RedisSource {
    /// A command failed: a lost group reconnects at once (which recreates it); anything else
    /// is an outage, retried with back-off.
    fn fault(&mut self, fault: &RedisFault) {
        if fault.no_group() {
            self.conn = None;
        } else {
            self.lost(fault);
        }
    }
}

impl JobSource for RedisSource {
    fn next(&mut self, plugin: &mut PluginInstance) -> io::Result<Next> {
        if self.conn.is_none() {
            let now = Instant::now();
            if let Some(outage) = &self.outage {
                if now < outage.next_try {
                    let wait = (outage.next_try - now).min(SLICE);
                    return Ok(Next::Idle(Wake {
                        timeout: Some(wait),
                    }));
                }
            }
            if let Err(fault) = self.connect() {
                self.lost(&fault);
                return Ok(again());
            }
        }
        match self.step(plugin) {
            Ok(next) => {
                self.working();
                Ok(next)
            }
            Err(fault) => {
                self.fault(&fault);
                Ok(again())
            }
        }
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn channel(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Short of memory, the worker takes no entry until it recovers, which may take longer
    /// than claim_idle: what it computed is written and what it read is handed back now, so
    /// nothing waits on it (or is claimed and run twice meanwhile).
    fn hold(&mut self, paused: bool) -> io::Result<()> {
        if paused && !(self.answers.is_empty() && self.ready.is_empty()) {
            if let Err(fault) = self.hand_back() {
                log::warn!(
                    "redis: could not hand back {} entr{} while holding back: {fault}",
                    self.ready.len(),
                    if self.ready.len() == 1 { "y" } else { "ies" }
                );
                self.fault(&fault);
            }
        }
        Ok(())
    }

    fn retire(&mut self) {
        if self.answers.is_empty() && self.ready.is_empty() && self.conn.is_none() {
            return;
        }
        if let Err(fault) = self.hand_back() {
            // Redis is away: what was read stays pending here, for the next worker's takeover
            // (or, past claim_idle, anyone's).
            log::warn!(
                "redis: could not hand back {} entr{} on the way out ({} results unwritten): {fault}",
                self.ready.len(),
                if self.ready.len() == 1 { "y" } else { "ies" },
                self.answers.len()
            );
        }
    }
}
