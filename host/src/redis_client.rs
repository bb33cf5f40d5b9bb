//! The blocking client side of a Redis-fed pool, used by `jobhost submit`: XADD jobs to the
//! pool's stream with a private reply stream, read their results back from it, delete it.
//!
//! This module owns what a submitter writes and reads (entry fields `payload`, `id`,
//! `reply_to`, `reply_ttl`; result fields `id`, `status`, `body`: docs/PROTOCOL.md, "Redis
//! Streams"), the name of the reply stream (`jobhost:reply:<hostname>:<pid>:<nanos>`), the
//! creation of the pool's consumer group if it is missing (at 0, as a worker creates it, so that
//! nothing added before any worker ran is skipped), two connections (one
//! pipelines XADDs, one waits in XREAD BLOCK, so that a sending thread and a receiving thread
//! never wait for each other), trimming what was read off the reply stream, and deleting it at
//! the end ([`RedisSender::finish`]) or when SIGINT/SIGTERM/SIGHUP ends the process
//! ([`ReplyStream::delete_on_signals`]).
//!
//! It never reads or acks the pool's stream as a consumer, never retries an XADD (after a lost reply nobody knows whether it was added),
//! never logs or shows a password (only `shown_url`), and never sends a command without a
//! read timeout: waiting for results is a loop of short XREAD BLOCKs, so a pool whose workers
//! are busy or gone is waited for (as `submit` waits for a master), while a Redis that stops
//! answering is an error.
//!
//! A result that a worker writes after the reply stream was deleted (its submitter stopped
//! early) creates the stream again; `reply_ttl` asks the worker to PEXPIRE it after each
//! result, so that such a stream goes away by itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Connection, Value};

use crate::client::JobResult;
use crate::config::RedisConfig;
use crate::protocol::Status;

/// How long a reply stream may outlive the last result written to it (`reply_ttl`).
pub const REPLY_TTL: Duration = Duration::from_secs(3600);

/// One XREAD BLOCK: how soon a receiver notices that the sender gave up.
const SLICE: Duration = Duration::from_millis(1000);
/// Read and write timeout for every command (beyond the BLOCK of an XREAD).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeouts for the last-ditch delete when a signal ends the process.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Queued XADDs are sent once their payloads pass this many bytes...
const FLUSH_ABOVE: usize = 64 << 10;
/// ...or once this many are queued.
const MAX_PIPELINE: usize = 1000;
/// Entries per XREAD.
const READ_COUNT: usize = 1000;
/// Trim the reply stream once this many results were read since the last trim.
const TRIM_AFTER: usize = 256;

/// Why a submit to a Redis pool stopped.
#[derive(Debug, thiserror::Error)]
pub enum RedisSubmitError {
    /// No connection (refused, no such socket, wrong password, timed out).
    #[error("cannot reach Redis at {url}: {}", describe(error))]
    Connect {
        url: String,
        error: redis::RedisError,
    },
    /// A command failed (the connection broke, timed out, or Redis answered an error).
    #[error("Redis at {url}: {doing}: {}", describe(error))]
    Command {
        url: String,
        doing: &'static str,
        error: redis::RedisError,
    },
    /// Something on the reply stream that is not a result of ours.
    #[error("Redis at {url}: entry {entry} on reply stream {reply} is not a result: {problem}")]
    BadResult {
        url: String,
        reply: String,
        entry: String,
        problem: String,
    },
    /// [`RedisSender::abort`] was called: the sending side gave up.
    #[error("the sending side gave up")]
    Aborted,
}

/// A Redis error in words: a read timeout shows as EAGAIN otherwise.
fn describe(error: &redis::RedisError) -> String {
    if error.is_timeout() {
        format!("no answer in time ({error})")
    } else {
        error.to_string()
    }
}

/// The reply stream of one submit, and how to delete it from a connection of its own.
#[derive(Debug, Clone)]
pub struct ReplyStream {
    cfg: RedisConfig,
    name: String,
}

impl ReplyStream {
    /// A fresh name for this process: `jobhost:reply:<hostname>:<pid>:<nanos since 1970>`.
    fn new(cfg: &RedisConfig) -> ReplyStream {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        ReplyStream {
            cfg: cfg.clone(),
            name: format!(
                "jobhost:reply:{}:{}:{nanos}",
                hostname(),
                std::process::id()
            ),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// DEL on a new connection (for when the usual one broke), each step within `timeout`.
    pub fn delete(&self, timeout: Duration) -> Result<(), RedisSubmitError> {
        let mut conn = connect(&self.cfg, timeout)?;
        del(&mut conn, &self.cfg.shown_url, &self.name)
    }

    /// Makes SIGINT, SIGTERM and SIGHUP (those not ignored) delete the reply stream before
    /// they end the process as they would have: blocks them in this thread, so call it before
    /// any other thread starts (threads inherit the mask), and waits for them on a thread of
    /// its own. The process still dies of the signal, as a socket `submit` does.
    pub fn delete_on_signals(&self) -> std::io::Result<()> {
        use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
        let mut set = SigSet::empty();
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            if !ignored(signal) {
                set.add(signal);
            }
        }
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        let stream = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let Ok(signal) = set.wait() else { return };
                // Best effort: the user wants out, so only briefly.
                let _ = stream.delete(SIGNAL_TIMEOUT);
                die_of(signal);
            })?;
        Ok(())
    }
}

/// Whether `signal` is ignored (e.g. SIGINT for a `&` job of a non-interactive shell).
fn ignored(signal: nix::sys::signal::Signal) -> bool {
    let mut old = std::mem::MaybeUninit::<nix::libc::sigaction>::zeroed();
    // SAFETY: a null new action only reads the current one into `old`.
    let read = unsafe {
        nix::libc::sigaction(
            signal as nix::libc::c_int,
            std::ptr::null(),
            old.as_mut_ptr(),
        )
    };
    // SAFETY: sigaction filled `old` when it returned 0; it was zeroed before in any case.
    read == 0 && unsafe { old.assume_init() }.sa_sigaction == nix::libc::SIG_IGN
}

/// Ends the process with `signal`'s default action, from the thread that waited for it.
fn die_of(signal: nix::sys::signal::Signal) -> ! {
    use nix::sys::signal::{pthread_sigmask, sigaction, SaFlags, SigAction, SigHandler, SigSet};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing the default disposition installs no handler.
    let _ = unsafe { sigaction(signal, &default) };
    let mut one = SigSet::empty();
    one.add(signal);
    let _ = pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_UNBLOCK, Some(&one), None);
    let _ = nix::sys::signal::raise(signal);
    // Not reached: the default action of these three is to terminate.
    std::process::exit(128 + signal as i32)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Connects with read and write timeouts of `timeout`.
fn connect(cfg: &RedisConfig, timeout: Duration) -> Result<Connection, RedisSubmitError> {
    let failed = |error| RedisSubmitError::Connect {
        url: cfg.shown_url.clone(),
        error,
    };
    let conn = crate::worker::redis::open(cfg).map_err(failed)?;
    conn.set_read_timeout(Some(timeout)).map_err(failed)?;
    conn.set_write_timeout(Some(timeout)).map_err(failed)?;
    Ok(conn)
}

fn del(conn: &mut Connection, url: &str, name: &str) -> Result<(), RedisSubmitError> {
    redis::cmd("DEL")
        .arg(name)
        .exec(conn)
        .map_err(|error| RedisSubmitError::Command {
            url: url.to_string(),
            doing: "deleting the reply stream",
            error,
        })
}

/// A connected submitter to one Redis pool; [`RedisSubmit::split`] it for two threads.
pub struct RedisSubmit {
    sender: RedisSender,
    receiver: RedisReceiver,
}

impl RedisSubmit {
    /// Connects twice (sending, receiving) and checks that `pool`'s group exists on its
    /// stream. Adds nothing yet.
    pub fn connect(cfg: &RedisConfig) -> Result<RedisSubmit, RedisSubmitError> {
        let url = cfg.shown_url.clone();
        let mut send = connect(cfg, COMMAND_TIMEOUT)?;
        // As a worker would: at 0, so the entries added now are read by the first worker that
        // comes, whenever it comes (a queue outlives its consumers).
        if let Err(error) = crate::worker::redis::ensure_group(&mut send, cfg) {
            return Err(RedisSubmitError::Command {
                url,
                doing: "creating the pool's consumer group",
                error,
            });
        }
        let receive = connect(cfg, SLICE + COMMAND_TIMEOUT)?;
        let reply = ReplyStream::new(cfg);
        let aborted = Arc::new(AtomicBool::new(false));
        Ok(RedisSubmit {
            sender: RedisSender {
                conn: Some(send),
                entries: Entries::new(&cfg.stream, reply.name()),
                url: url.clone(),
                reply: reply.clone(),
                aborted: Arc::clone(&aborted),
            },
            receiver: RedisReceiver {
                conn: Some(receive),
                cfg: cfg.clone(),
                reply: reply.name,
                last: "0-0".into(),
                since_trim: 0,
                ready: VecDeque::new(),
                aborted,
            },
        })
    }

    pub fn reply_stream(&self) -> &ReplyStream {
        &self.sender.reply
    }

    pub fn split(self) -> (RedisSender, RedisReceiver) {
        (self.sender, self.receiver)
    }
}

/// XADDs queued for one round trip.
struct Entries {
    pipe: redis::Pipeline,
    bytes: usize,
    stream: String,
    reply_to: String,
    reply_ttl: String,
}

impl Entries {
    fn new(stream: &str, reply_to: &str) -> Entries {
        Entries {
            pipe: redis::pipe(),
            bytes: 0,
            stream: stream.to_string(),
            reply_to: reply_to.to_string(),
            reply_ttl: REPLY_TTL.as_millis().to_string(),
        }
    }

    /// Queues `XADD stream * payload P id ID reply_to R reply_ttl MS`; true when it is time to
    /// send what is queued.
    fn push(&mut self, id: u64, payload: &[u8]) -> bool {
        self.pipe
            .cmd("XADD")
            .arg(&self.stream)
            .arg("*")
            .arg("payload")
            .arg(payload)
            .arg("id")
            .arg(id)
            .arg("reply_to")
            .arg(&self.reply_to)
            .arg("reply_ttl")
            .arg(&self.reply_ttl)
            .ignore();
        self.bytes += payload.len() + 64;
        self.bytes >= FLUSH_ABOVE || self.pipe.len() >= MAX_PIPELINE
    }

    fn is_empty(&self) -> bool {
        self.pipe.is_empty()
    }

    fn clear(&mut self) {
        self.pipe.clear();
        self.bytes = 0;
    }
}

/// The sending half: XADDs, pipelined, and the reply stream's deletion at the end.
pub struct RedisSender {
    /// `None` after a command failed: the connection may be out of step.
    conn: Option<Connection>,
    entries: Entries,
    url: String,
    reply: ReplyStream,
    aborted: Arc<AtomicBool>,
}

impl RedisSender {
    /// Queues job `id`; sends the queue when it is big enough.
    pub fn send(&mut self, id: u64, payload: &[u8]) -> Result<(), RedisSubmitError> {
        if self.entries.push(id, payload) {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends every queued XADD in one round trip.
    pub fn flush(&mut self) -> Result<(), RedisSubmitError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let Some(conn) = self.conn.as_mut() else {
            self.entries.clear();
            return Err(self.command_error(
                "adding entries",
                redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::NotConnected)),
            ));
        };
        let sent = self.entries.pipe.exec(conn);
        self.entries.clear();
        sent.map_err(|error| {
            self.conn = None;
            self.command_error("adding entries", error)
        })
    }

    /// Makes a [`RedisReceiver::recv`] on another thread return [`RedisSubmitError::Aborted`]
    /// within one XREAD BLOCK.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }

    /// Deletes the reply stream (on a new connection if this one failed). Call it once the
    /// receiver is done, whatever the outcome.
    pub fn finish(&mut self) -> Result<(), RedisSubmitError> {
        match self.conn.as_mut() {
            Some(conn) => del(conn, &self.url, &self.reply.name),
            None => self.reply.delete(COMMAND_TIMEOUT),
        }
    }

    fn command_error(&self, doing: &'static str, error: redis::RedisError) -> RedisSubmitError {
        RedisSubmitError::Command {
            url: self.url.clone(),
            doing,
            error,
        }
    }
}

/// The receiving half: XREAD BLOCK on the reply stream from the last id seen.
pub struct RedisReceiver {
    /// `None` after an I/O error, until the next read reconnects.
    conn: Option<Connection>,
    cfg: RedisConfig,
    reply: String,
    /// The id of the last entry read.
    last: String,
    /// Entries read since the last XTRIM.
    since_trim: usize,
    ready: VecDeque<JobResult>,
    aborted: Arc<AtomicBool>,
}

impl RedisReceiver {
    /// The next result, in the order the workers wrote them; blocks until one arrives (or the
    /// sender aborts).
    pub fn recv(&mut self) -> Result<JobResult, RedisSubmitError> {
        loop {
            if let Some(result) = self.ready.pop_front() {
                return Ok(result);
            }
            if self.aborted.load(Ordering::SeqCst) {
                return Err(RedisSubmitError::Aborted);
            }
            if self.since_trim >= TRIM_AFTER {
                // What was read is not needed again: keep the stream as short as the window.
                let trim = redis::cmd("XTRIM")
                    .arg(&self.reply)
                    .arg("MINID")
                    .arg(&self.last)
                    .clone();
                self.query(&trim, "trimming the reply stream")?;
                self.since_trim = 0;
            }
            let read = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(SLICE.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.reply)
                .arg(&self.last)
                .clone();
            let value = self.query(&read, "reading results")?;
            let entries = read_reply(value).map_err(|problem| self.bad("(reply)", problem))?;
            for (id, fields) in entries {
                let result = parse_result(&fields).map_err(|problem| self.bad(&id, problem))?;
                self.ready.push_back(result);
                self.last = id;
                self.since_trim += 1;
            }
        }
    }

    /// True when [`RedisReceiver::recv`] would return without asking Redis.
    pub fn has_buffered(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Runs an idempotent command. After an I/O error (a timeout, a dropped connection, a
    /// read interrupted by a stop and continue) the connection cannot be trusted to be in step:
    /// reconnect and run it once more.
    fn query(&mut self, cmd: &redis::Cmd, doing: &'static str) -> Result<Value, RedisSubmitError> {
        let mut retried = false;
        loop {
            let conn = match self.conn.as_mut() {
                Some(conn) => conn,
                None => self
                    .conn
                    .insert(connect(&self.cfg, SLICE + COMMAND_TIMEOUT)?),
            };
            match cmd.query::<Value>(conn) {
                Ok(Value::ServerError(e)) => {
                    return Err(self.command_error(doing, redis::RedisError::from(e)))
                }
                Ok(value) => return Ok(value),
                Err(error) if error.is_io_error() && !retried => {
                    self.conn = None;
                    retried = true;
                }
                Err(error) => {
                    if error.is_io_error() {
                        self.conn = None;
                    }
                    return Err(self.command_error(doing, error));
                }
            }
        }
    }

    fn command_error(&self, doing: &'static str, error: redis::RedisError) -> RedisSubmitError {
        RedisSubmitError::Command {
            url: self.cfg.shown_url.clone(),
            doing,
            error,
        }
    }

    fn bad(&self, entry: &str, problem: String) -> RedisSubmitError {
        RedisSubmitError::BadResult {
            url: self.cfg.shown_url.clone(),
            reply: self.reply.clone(),
            entry: entry.to_string(),
            problem,
        }
    }
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// `[id, [field, value, …]]` → the id and the fields.
fn parse_entry(v: &Value) -> Result<(String, Fields), String> {
    let Value::Array(parts) = v else {
        return Err(format!("an entry that is not an array: {v:?}"));
    };
    let id = parts
        .first()
        .and_then(bytes)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| format!("an entry without an id: {v:?}"))?;
    let fields = match parts.get(1) {
        Some(Value::Array(kv)) => kv
            .chunks(2)
            .filter_map(|c| Some((bytes(c.first()?)?, bytes(c.get(1)?)?)))
            .collect(),
        _ => Vec::new(),
    };
    Ok((id, fields))
}

fn parse_entries(v: &Value) -> Result<Vec<(String, Fields)>, String> {
    match v {
        Value::Array(items) => items.iter().map(parse_entry).collect(),
        other => Err(format!("entries that are not an array: {other:?}")),
    }
}

/// XREAD's reply: nil (nothing within BLOCK), or `[[stream, [entry, …]]]` (a map in RESP3).
fn read_reply(v: Value) -> Result<Vec<(String, Fields)>, String> {
    let mut all = Vec::new();
    match &v {
        Value::Nil => {}
        Value::Array(streams) => {
            for s in streams {
                match s {
                    Value::Array(pair) if pair.len() == 2 => all.extend(parse_entries(&pair[1])?),
                    other => return Err(format!("unexpected XREAD reply: {other:?}")),
                }
            }
        }
        Value::Map(streams) => {
            for (_, entries) in streams {
                all.extend(parse_entries(entries)?);
            }
        }
        other => return Err(format!("unexpected XREAD reply: {other:?}")),
    }
    Ok(all)
}

/// A result entry's fields → the result: `id` (decimal, as we sent it), `status` (`ok` or
/// `failed`), `body`.
fn parse_result(fields: &Fields) -> Result<JobResult, String> {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    };
    let id = field("id")
        .and_then(|id| std::str::from_utf8(id).ok())
        .and_then(|id| id.parse::<u64>().ok())
        .ok_or_else(|| {
            format!(
                "no job number in its id field ({:?})",
                field("id").map(String::from_utf8_lossy)
            )
        })?;
    let status = match field("status") {
        Some(b"ok") => Status::Ok,
        Some(b"failed") => Status::Failed,
        other => {
            return Err(format!(
                "status {:?} is neither ok nor failed",
                other.map(String::from_utf8_lossy)
            ))
        }
    };
    let body = field("body")
        .ok_or_else(|| "it has no body field".to_string())?
        .to_vec();
    Ok(JobResult { id, status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    fn entry(id: &str, kv: &[(&str, &[u8])]) -> Value {
        Value::Array(vec![
            bulk(id.as_bytes()),
            Value::Array(
                kv.iter()
                    .flat_map(|(k, v)| [bulk(k.as_bytes()), bulk(v)])
                    .collect(),
            ),
        ])
    }

    #[test]
    fn an_xadd_carries_payload_id_reply_to_and_reply_ttl() {
        let mut entries = Entries::new("jobs", "jobhost:reply:h:1:2");
        assert!(!entries.push(7, b"bin\xff\x00ary"));
        let cmds: Vec<Vec<Vec<u8>>> = entries
            .pipe
            .cmd_iter()
            .map(|c| {
                c.args_iter()
                    .map(|a| match a {
                        redis::Arg::Simple(b) => b.to_vec(),
                        _ => b"(not a plain argument)".to_vec(),
                    })
                    .collect()
            })
            .collect();
        let expect: Vec<&[u8]> = vec![
            b"XADD",
            b"jobs",
            b"*",
            b"payload",
            b"bin\xff\x00ary",
            b"id",
            b"7",
            b"reply_to",
            b"jobhost:reply:h:1:2",
            b"reply_ttl",
            b"3600000",
        ];
        assert_eq!(
            cmds,
            vec![expect.iter().map(|a| a.to_vec()).collect::<Vec<_>>()]
        );
    }

    #[test]
    fn the_queue_is_sent_by_size_or_by_count() {
        let mut entries = Entries::new("s", "r");
        assert!(entries.push(0, &vec![b'x'; FLUSH_ABOVE]), "one big payload");
        entries.clear();
        assert!(entries.is_empty());
        let due: Vec<bool> = (0..MAX_PIPELINE as u64)
            .map(|i| entries.push(i, b""))
            .collect();
        assert_eq!(due.iter().filter(|&&d| d).count(), 1);
        assert!(due[MAX_PIPELINE - 1]);
    }

    #[test]
    fn reply_stream_names_are_private_to_the_host_process_and_moment() {
        let cfg = RedisConfig {
            url: "unix:///r.sock".into(),
            shown_url: "unix:///r.sock".into(),
            password: None,
            stream: "jobs".into(),
            group: "jobhost".into(),
            claim_idle: Duration::from_secs(60),
            dead_letter: "jobs:dead".into(),
            results: None,
            batch: 1,
        };
        let a = ReplyStream::new(&cfg);
        std::thread::sleep(Duration::from_millis(1));
        let b = ReplyStream::new(&cfg);
        let prefix = format!("jobhost:reply:{}:{}:", hostname(), std::process::id());
        assert!(a.name().starts_with(&prefix), "{}", a.name());
        assert!(a.name()[prefix.len()..].parse::<u128>().is_ok());
        assert_ne!(a.name(), b.name());
    }

    #[test]
    fn xread_replies_become_results() {
        assert_eq!(read_reply(Value::Nil).unwrap(), vec![]);
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"jobhost:reply:x"),
            Value::Array(vec![
                entry(
                    "1-0",
                    &[("id", b"3"), ("status", b"ok"), ("body", b"a\nb\xff")],
                ),
                entry(
                    "1-1",
                    &[("id", b"0"), ("status", b"failed"), ("body", b"boom")],
                ),
            ]),
        ])]);
        let entries = read_reply(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].0, "1-1");
        assert_eq!(
            parse_result(&entries[0].1).unwrap(),
            JobResult {
                id: 3,
                status: Status::Ok,
                body: b"a\nb\xff".to_vec()
            }
        );
        assert_eq!(parse_result(&entries[1].1).unwrap().status, Status::Failed);
        // RESP3 answers with a map.
        let map = Value::Map(vec![(
            bulk(b"r"),
            Value::Array(vec![entry(
                "2-0",
                &[("id", b"1"), ("status", b"ok"), ("body", b"")],
            )]),
        )]);
        assert_eq!(read_reply(map).unwrap()[0].0, "2-0");
        assert!(read_reply(Value::Int(1)).is_err());
    }

    #[test]
    fn entries_that_are_not_our_results_are_refused() {
        let fields = |kv: &[(&str, &[u8])]| {
            let Ok((_, f)) = parse_entry(&entry("1-0", kv)) else {
                panic!()
            };
            f
        };
        let no_id = parse_result(&fields(&[("status", b"ok"), ("body", b"")])).unwrap_err();
        assert!(no_id.contains("no job number"), "{no_id}");
        let foreign = parse_result(&fields(&[
            ("id", b"job-1"),
            ("status", b"ok"),
            ("body", b""),
        ]));
        assert!(foreign.is_err());
        let status = parse_result(&fields(&[
            ("id", b"1"),
            ("status", b"rejected"),
            ("body", b""),
        ]))
        .unwrap_err();
        assert!(status.contains("neither ok nor failed"), "{status}");
        let body = parse_result(&fields(&[("id", b"1"), ("status", b"ok")])).unwrap_err();
        assert!(body.contains("no body"), "{body}");
    }
}
