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

use jobhost_plugin_api::abi_stable::std_types::{RResult, RSlice};
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
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{pool}:{pid}")
}

/// One stream entry: its id and its fields, as sent (binary-safe).
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// Delivered before (taken over, claimed, or read again from this consumer's history):
    /// it may be the entry that killed a worker, so it runs on its own.
    suspect: bool,
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
        if let Some(outage) = self.outage.take() {
            log::warn!(
                "redis: reconnected to {} after {:.1?}",
                self.cfg.shown_url,
                outage.since.elapsed()
            );
        }
        self.slot.publish(|w| w.source(&SourceState::Connected));
        self.connected_once = true;
        if !self.answers.is_empty() {
            // The reply to their MULTI/EXEC may be what was lost: if it ran, their entries are
            // acked (all or none: it is one transaction) and writing them again would answer
            // them twice.
            let first = &self.answers[0].entry.id;
            if pending(&mut conn, &self.cfg, first, first, 1, Some(&self.consumer))?.is_empty() {
                log::info!(
                    "redis: {} result(s) were written before the connection broke",
                    self.answers.len()
                );
                self.answers.clear();
                self.first_answer_at = None;
            }
        }
        self.conn = Some(conn);
        // What was delivered before is in this consumer's pending list: read it from there
        // (after the answers still to write, whose entries are skipped there).
        self.ready.clear();
        self.own_history = true;
        self.figures_stale = true;
        Ok(())
    }

    /// The connection failed: drop it, start (or go on with) the outage back-off.
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

    /// Writes every computed answer and its XACK in one MULTI/EXEC.
    fn flush(&mut self) -> Fault<()> {
        if self.answers.is_empty() {
            return Ok(());
        }
        let conn = self.conn.as_mut().ok_or_else(gone)?;
        let outcome = answer_all(conn, &self.cfg, &self.answers);
        match outcome {
            Ok(refused) => {
                // A result Redis would not store (its reply_to is not a stream): the entry is
                // acked all the same, so say so where a person looks.
                let answers = std::mem::take(&mut self.answers);
                self.first_answer_at = None;
                for (index, why) in refused {
                    if let Some(a) = answers.get(index) {
                        let reason = format!("cannot write its result: {why}");
                        dead_letter(conn, &self.cfg, &a.entry, &reason, false)?;
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
            sweep(conn, &self.cfg, &self.consumer)?;
            let claimed = autoclaim(conn, &self.cfg, &self.consumer, self.max_attempts)?;
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
                &entry,
                "the entry has no payload field",
                false,
            );
        };
        let started = Instant::now();
        self.slot.publish(|w| w.running(Some(entry.id.as_bytes())));
        let (ok, body) = match plugin.handle(RSlice::from_slice(payload)) {
            RResult::ROk(result) => (true, result.to_vec()),
            RResult::RErr(message) => (false, message.as_bytes().to_vec()),
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
            let mut pipe = redis::pipe();
            pipe.atomic();
            for entry in &self.ready {
                let again = pipe.cmd("XADD").arg(&self.cfg.stream).arg("*");
                if entry.field("id").is_none() {
                    // The submitter knows it by its first id: keep it.
                    again.arg("id").arg(&entry.id);
                }
                for (k, v) in &entry.fields {
                    again.arg(k.as_slice()).arg(v.as_slice());
                }
                again.ignore();
            }
            pipe.cmd("XACK")
                .arg(&self.cfg.stream)
                .arg(&self.cfg.group)
                .arg(self.ready.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
                .ignore();
            pipe.query::<()>(conn)?;
            log::info!(
                "redis: handed {} entr{} read but not started back to {}",
                self.ready.len(),
                if self.ready.len() == 1 { "y" } else { "ies" },
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

/// The entry's `reply_ttl`: how long its reply stream is kept after this result (ms).
fn reply_ttl(entry: &Entry) -> Option<u64> {
    let ttl: u64 = std::str::from_utf8(entry.field("reply_ttl")?)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(ttl.clamp(*REPLY_TTL.start(), *REPLY_TTL.end()))
}

fn exec(conn: &mut Connection, pipe: &redis::Pipeline) -> Fault<()> {
    pipe.query::<()>(conn)?;
    Ok(())
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

/// Moves an entry to the dead-letter stream with `reason` and acks it, in one MULTI/EXEC;
/// `answer_failed`: its submitter is told too (it was a job that ran out of attempts).
fn dead_letter(
    conn: &mut Connection,
    cfg: &RedisConfig,
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
    let mut pipe = redis::pipe();
    pipe.atomic();
    if answer_failed {
        if let Some(target) = reply_target(cfg, entry) {
            add_result(&mut pipe, &target, entry, false, reason.as_bytes());
            pipe.ignore();
        }
    }
    let dead = pipe.cmd("XADD").arg(&cfg.dead_letter).arg("*");
    dead.arg("reason")
        .arg(reason)
        .arg("stream")
        .arg(&cfg.stream)
        .arg("entry")
        .arg(&entry.id);
    for (k, v) in &entry.fields {
        dead.arg(k.as_slice()).arg(v.as_slice());
    }
    dead.ignore();
    pipe.cmd("XACK")
        .arg(&cfg.stream)
        .arg(&cfg.group)
        .arg(&entry.id)
        .ignore();
    exec(conn, &pipe)
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
    let blamed = |id: &str| dead.running.as_deref().is_none_or(|r| r == id);
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
            dead_letter(conn, cfg, &entry, &reason, true)?;
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
                dead_letter(conn, cfg, &entry, &reason, true)?;
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
            Ok(next) => Ok(next),
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
