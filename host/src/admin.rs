//! The admin protocol, pure: parsing command lines, rendering replies, cutting a byte stream
//! into lines, comparing tokens.
//!
//! The admin interface is a telnet-friendly line protocol (usable with `nc -U` and `socat`):
//! one command per line, ended by LF or CRLF; the reply is zero or more lines, then a last line
//! `OK` or `ERR <reason>`, each ended by LF. This module owns the grammar of the commands
//! ([`parse`], [`help`]), the form of every reply ([`render_status`], [`render_workers`],
//! [`err_reply`]), the view of the master those replies are built from ([`Snapshot`]),
//! splitting the incoming bytes into lines with a length limit ([`LineBuffer`]), the
//! constant-time token check ([`token_matches`]) and the rate limit on logging wrong tokens
//! ([`WrongTokens`], which is given the time, never reads a clock).
//!
//! It never does I/O, never holds or changes master state (the master builds a [`Snapshot`]
//! for each `status`/`workers` and hands each [`Command`] to its supervisor), and never lets a reply
//! line other than the last one read as `OK` or `ERR ...`: text that comes from elsewhere
//! (a reload message, a plugin's name) is rendered on one line with control characters
//! escaped.

use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::human::{self, duration, job_age, size, Align};

/// The longest command line the master accepts, in bytes (without the line ending).
pub const MAX_LINE: usize = 4096;

/// The most workers `scale` can ask for in one pool (the config's limit too).
pub const MAX_WORKERS: usize = 1024;

/// One admin line, as [`parse`] reads it: a question about the master, a matter of the
/// session, or a [`Command`] for the master.
///
/// `Debug` never shows an [`Request::Auth`] token, so logging a request cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub enum Request {
    /// `help`: list the commands.
    Help,
    /// `status [json]`: the master and its pools.
    Status { json: bool },
    /// `workers [json]`: every worker.
    Workers { json: bool },
    /// `metrics [prometheus]`: the figures in OpenMetrics text (or the Prometheus text
    /// format 0.0.4).
    Metrics { format: crate::metrics::Format },
    /// `quit`: close this connection.
    Quit,
    /// `auth TOKEN`: the token the admin TCP listener asks for.
    Auth { token: String },
    /// Something for the master to do.
    Do(Command),
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Help => f.write_str("Help"),
            Request::Status { json } => f.debug_struct("Status").field("json", json).finish(),
            Request::Workers { json } => f.debug_struct("Workers").field("json", json).finish(),
            Request::Metrics { format } => {
                f.debug_struct("Metrics").field("format", format).finish()
            }
            Request::Quit => f.write_str("Quit"),
            Request::Auth { .. } => f
                .debug_struct("Auth")
                .field("token", &format_args!("<redacted>"))
                .finish(),
            Request::Do(command) => command.fmt(f),
        }
    }
}

/// What the master is told to do — by an admin line or by a signal: one vocabulary for both,
/// as nginx's `signals[]` table serves both its signal handlers and `nginx -s`. The master's
/// supervisor decides what each means; the signal table is in `master/mod.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `shutdown [graceful]`, SIGTERM, SIGINT: stop after running jobs end. `escalate`
    /// (SIGINT): a second one means "now" (Ctrl-C twice).
    Stop { escalate: bool },
    /// `shutdown now`, SIGQUIT: stop now, without waiting for running jobs.
    StopNow,
    /// `scale POOL N`: run `workers` workers in `pool` (0 to [`MAX_WORKERS`]).
    Scale { pool: String, workers: usize },
    /// SIGTTIN, `times` of them: one worker more in every pool each.
    AddWorkers(u32),
    /// SIGTTOU, `times` of them: one worker fewer in every pool each.
    RemoveWorkers(u32),
    /// `restart POOL|all`: replace the workers of one pool or of every pool.
    Restart { target: Target },
    /// `stop POOL`: stop a pool's workers and keep them stopped.
    StopPool { pool: String },
    /// `start POOL`: start a stopped pool again.
    StartPool { pool: String },
    /// `reload`, SIGHUP: reread the config and the plugins.
    Reload,
    /// `reopen`, SIGUSR1: reopen the log file (logrotate), in the master and every worker.
    ReopenLogs,
}

/// What `restart` applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One pool, by name.
    Pool(String),
    /// `all` (any case): every pool.
    All,
}

/// The commands, their arguments and what they do: the body of [`help`].
const COMMANDS: &[(&str, &str)] = &[
    ("help", "this list"),
    ("status [json]", "the master, its pools and their counters"),
    (
        "workers [json]",
        "every worker: pid, pool, generation, state, job, own memory",
    ),
    (
        "metrics [prometheus]",
        "the figures in OpenMetrics text (or Prometheus text 0.0.4)",
    ),
    ("scale POOL N", "run N workers in POOL (0 to 1024)"),
    (
        "restart POOL|all",
        "replace the workers of POOL, or of every pool",
    ),
    (
        "stop POOL",
        "stop the workers of POOL and keep them stopped",
    ),
    ("start POOL", "start a stopped POOL again"),
    ("reload", "reread the config and the plugins (like SIGHUP)"),
    (
        "reopen",
        "reopen the log file, in the master and every worker (like SIGUSR1)",
    ),
    (
        "shutdown [graceful|now]",
        "stop the master: after running jobs end (default), or now",
    ),
    ("quit", "close this connection"),
    (
        "auth TOKEN",
        "authenticate (needed first on a TCP connection)",
    ),
];

/// Parses one command line (already without its line ending).
///
/// Command names and keywords (`json`, `all`, `graceful`, `now`) are case-insensitive; pool
/// names are taken as written. Words are separated by spaces and tabs; leading and trailing
/// ones are ignored. `auth` takes the rest of the line as the token (spaces and tabs around
/// it trimmed). An error is the text to send after `ERR `, e.g. `usage: scale POOL N`; it
/// never contains the token.
pub fn parse(line: &str) -> Result<Request, String> {
    const SEPARATORS: [char; 2] = [' ', '\t'];
    let trimmed = line.trim_start_matches(SEPARATORS);
    let mut words = trimmed.split(SEPARATORS).filter(|w| !w.is_empty());
    let Some(name) = words.next() else {
        return Err("empty line".to_owned());
    };
    let args: Vec<&str> = words.collect();
    let usage = |form: &str| Err(format!("usage: {form}"));
    match name.to_ascii_lowercase().as_str() {
        "help" => match args[..] {
            [] => Ok(Request::Help),
            _ => usage("help"),
        },
        "status" => match json_flag(&args) {
            Some(json) => Ok(Request::Status { json }),
            None => usage("status [json]"),
        },
        "workers" => match json_flag(&args) {
            Some(json) => Ok(Request::Workers { json }),
            None => usage("workers [json]"),
        },
        "metrics" => match args[..] {
            [] => Ok(Request::Metrics {
                format: crate::metrics::Format::OpenMetrics,
            }),
            [word] if word.eq_ignore_ascii_case("prometheus") => Ok(Request::Metrics {
                format: crate::metrics::Format::Prometheus,
            }),
            _ => usage("metrics [prometheus]"),
        },
        "scale" => match args[..] {
            [pool, n] => Ok(Request::Do(Command::Scale {
                pool: pool.to_owned(),
                workers: parse_count(n)?,
            })),
            _ => usage("scale POOL N"),
        },
        "restart" => match args[..] {
            [target] if target.eq_ignore_ascii_case("all") => Ok(Request::Do(Command::Restart {
                target: Target::All,
            })),
            [pool] => Ok(Request::Do(Command::Restart {
                target: Target::Pool(pool.to_owned()),
            })),
            _ => usage("restart POOL|all"),
        },
        "stop" => match args[..] {
            [pool] => Ok(Request::Do(Command::StopPool {
                pool: pool.to_owned(),
            })),
            _ => usage("stop POOL"),
        },
        "start" => match args[..] {
            [pool] => Ok(Request::Do(Command::StartPool {
                pool: pool.to_owned(),
            })),
            _ => usage("start POOL"),
        },
        "reload" => match args[..] {
            [] => Ok(Request::Do(Command::Reload)),
            _ => usage("reload"),
        },
        "reopen" => match args[..] {
            [] => Ok(Request::Do(Command::ReopenLogs)),
            _ => usage("reopen"),
        },
        "shutdown" => match args[..] {
            [] => Ok(Request::Do(Command::Stop { escalate: false })),
            [how] if how.eq_ignore_ascii_case("graceful") => {
                Ok(Request::Do(Command::Stop { escalate: false }))
            }
            [how] if how.eq_ignore_ascii_case("now") => Ok(Request::Do(Command::StopNow)),
            _ => usage("shutdown [graceful|now]"),
        },
        "quit" => match args[..] {
            [] => Ok(Request::Quit),
            _ => usage("quit"),
        },
        "auth" => {
            // `name` is a prefix of `trimmed`: the token is everything after it.
            let token = trimmed
                .get(name.len()..)
                .unwrap_or("")
                .trim_matches(SEPARATORS);
            if token.is_empty() {
                usage("auth TOKEN")
            } else {
                Ok(Request::Auth {
                    token: token.to_owned(),
                })
            }
        }
        _ => Err(format!("unknown command {} (try help)", quoted(name))),
    }
}

/// `[]` → plain, `["json"]` → JSON, anything else → a usage error.
fn json_flag(args: &[&str]) -> Option<bool> {
    match args {
        [] => Some(false),
        [word] if word.eq_ignore_ascii_case("json") => Some(true),
        _ => None,
    }
}

/// `scale`'s N: ASCII digits only, 0 to [`MAX_WORKERS`].
fn parse_count(word: &str) -> Result<usize, String> {
    word.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| word.parse::<usize>().ok())
        .flatten()
        .filter(|&n| n <= MAX_WORKERS)
        .ok_or_else(|| {
            format!(
                "scale: N must be a whole number from 0 to {MAX_WORKERS}, not {}",
                quoted(word)
            )
        })
}

/// A word from the client, quoted for an error message: escaped, and cut after 40 characters.
fn quoted(word: &str) -> String {
    const KEEP: usize = 40;
    match word.char_indices().nth(KEEP) {
        Some((cut, _)) => format!("{:?}…", &word[..cut]),
        None => format!("{word:?}"),
    }
}

/// The reply to `help`: one line per command with a short description, then `OK`.
pub fn help() -> String {
    let width = COMMANDS
        .iter()
        .map(|(form, _)| form.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (form, what) in COMMANDS {
        let _ = writeln!(out, "{form:<width$}  {what}");
    }
    out.push_str("OK\n");
    out
}

/// The reply for a failed command: `ERR <reason>` and a newline. The reason is put on one line
/// (control characters escaped), so it cannot end the reply early or forge another one.
pub fn err_reply(reason: &str) -> String {
    format!("ERR {}\n", one_line(reason))
}

/// True for the line that ends a reply: exactly `OK`, or `ERR` alone or followed by a space
/// and the reason. (A client reads reply lines until this is true.)
pub fn is_final_line(line: &str) -> bool {
    line == "OK" || line == "ERR" || line.starts_with("ERR ")
}

/// A consistent view of the master, built by the master for each `status` / `workers`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub pid: u32,
    /// The jobhost version.
    pub version: String,
    pub uptime_secs: f64,
    /// The config file's path.
    pub config: String,
    /// The current generation (counts successful reloads).
    pub generation: u64,
    /// Plugin builds mapped in the master (each stays mapped for the life of the process).
    pub generations_loaded: usize,
    /// The last reload, if any was tried.
    pub last_reload: Option<ReloadReport>,
    pub pools: Vec<PoolSnapshot>,
    pub workers: Vec<WorkerSnapshot>,
    /// The last crashes, timeouts and failed reloads (at most 20), newest first.
    pub recent: Vec<RecentEvent>,
}

/// A crash, a timeout or a failed reload, for `status`'s `recent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentEvent {
    /// When, RFC 3339.
    pub at: String,
    /// `crash`, `boot-failed`, `timeout` or `reload-failed`.
    pub kind: String,
    pub pool: Option<String>,
    pub pid: Option<i32>,
    /// What the log said: how the worker ended, or why the reload failed.
    pub reason: String,
}

/// How the last reload went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// When it happened, RFC 3339.
    pub at: String,
    pub ok: bool,
    /// What changed, or why it failed.
    pub message: String,
}

/// One pool's counters.
#[derive(Debug, Clone, Serialize)]
pub struct PoolSnapshot {
    pub name: String,
    pub plugin: String,
    pub plugin_version: String,
    /// `"jobs"` or `"loop"`.
    pub mode: String,
    pub workers_wanted: usize,
    pub workers_running: usize,
    pub workers_busy: usize,
    pub jobs_queued: usize,
    /// Jobs running now (busy workers).
    pub jobs_running: usize,
    /// Jobs sent to workers and not answered yet: the running ones and those sent ahead
    /// (prefetched) to wait in a worker; an engine-fed pool's are its running ones.
    pub jobs_in_flight: usize,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub jobs_retried: u64,
    /// Queued jobs dropped unrun because their client went away without detaching them.
    pub jobs_dropped: u64,
    /// Workers that died unasked: killed by a signal nobody sent them for a reason, exited
    /// without a matching LEAVING, failed `worker_start`, or broke the protocol.
    pub crashes: u64,
    /// Workers killed because their job ran past `job_timeout`.
    pub timeouts: u64,
    /// Workers that left at `max_jobs`, `max_lifetime` or `max_rss`.
    pub recycled: u64,
    /// Workers that left because they were asked to (scale-down, TTOU, restart, reload,
    /// `stop`, shutdown) or because their loop-mode plugin said Stop.
    pub stopped: u64,
    /// `ok`, `backing-off`, `failing`, `stopped`, or `removed` (by a reload; draining its queue).
    pub state: String,
    /// Where its jobs come from, for a pool fed by an engine (Redis).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceSnapshot>,
}

/// A pool's engine as its workers see it.
#[derive(Debug, Clone, Serialize)]
pub struct SourceSnapshot {
    /// `redis` or `gearman`.
    pub kind: String,
    /// The server (any password hidden), or the servers, comma-separated.
    pub address: String,
    /// Redis: the stream and the consumer group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Gearman: the function the workers registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// `connected`, `disconnected`, `partly disconnected`, or `connecting` (no worker has
    /// reached it yet).
    pub state: String,
    /// Why a worker cannot reach it.
    pub reason: Option<String>,
    pub workers_connected: usize,
    /// Redis: XLEN of the stream, the group's pending count and lag (entries not yet
    /// delivered to it). Gearman: the function's jobs queued or running, running, and
    /// waiting for a worker (gearmand's `status`), summed over the servers that answered.
    /// As a worker last read them.
    pub stream_length: Option<u64>,
    pub pending: Option<u64>,
    pub lag: Option<u64>,
    pub figures_age_secs: Option<f64>,
}

/// One worker.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerSnapshot {
    pub pid: i32,
    pub pool: String,
    pub generation: u64,
    /// `idle`, `busy`, `draining`, or `holding` (short of memory: starts no job until it recovers).
    pub state: String,
    /// How long the current job has been running, when there is one.
    pub job_age_secs: Option<f64>,
    pub jobs_done: u64,
    /// Resident memory, when it could be read (shared pages included).
    pub rss_bytes: Option<u64>,
    /// Its own memory: the pages no other process maps (`Private_Clean + Private_Dirty`), the
    /// figure `max_rss` is compared with. Measured for `workers` only (it walks the worker's
    /// page tables), so `null` in `status json`, and when it could not be read.
    pub own_bytes: Option<u64>,
    /// When it was forked, RFC 3339.
    pub started: String,
    pub age_secs: f64,
}

/// The full reply to `status` (a header and a table of pools) or `status json` (the
/// [`Snapshot`] as one line of JSON), ending with `OK` and a newline.
pub fn render_status(s: &Snapshot, json: bool) -> String {
    if json {
        return json_reply(s);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "jobhost {}, pid {}, up {}",
        one_line(&s.version),
        s.pid,
        duration(s.uptime_secs)
    );
    let _ = writeln!(out, "config: {}", one_line(&s.config));
    let _ = writeln!(
        out,
        "generation: {} ({} plugin build{} loaded)",
        s.generation,
        s.generations_loaded,
        if s.generations_loaded == 1 { "" } else { "s" }
    );
    match &s.last_reload {
        None => out.push_str("last reload: none\n"),
        Some(r) => {
            let _ = write!(out, "last reload: {} ", one_line(&r.at));
            out.push_str(if r.ok { "ok" } else { "FAILED" });
            if !r.message.is_empty() {
                let _ = write!(out, ": {}", one_line(&r.message));
            }
            out.push('\n');
        }
    }
    out.push('\n');
    use Align::{Left, Right};
    let columns = [
        ("POOL", Left),
        ("STATE", Left),
        ("WORKERS", Right),
        ("BUSY", Right),
        ("QUEUED", Right),
        ("RUNNING", Right),
        ("DONE", Right),
        ("FAILED", Right),
        ("RETRIED", Right),
        ("CRASHES", Right),
        ("PLUGIN", Left),
    ];
    let rows = s
        .pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.state.clone(),
                format!("{}/{}", p.workers_running, p.workers_wanted),
                p.workers_busy.to_string(),
                p.jobs_queued.to_string(),
                p.jobs_running.to_string(),
                p.jobs_done.to_string(),
                p.jobs_failed.to_string(),
                p.jobs_retried.to_string(),
                p.crashes.to_string(),
                format!("{} {}", p.plugin, p.plugin_version),
            ]
        })
        .collect();
    table(&mut out, &columns, rows);
    let sources: Vec<_> = s
        .pools
        .iter()
        .filter_map(|p| Some((p, p.source.as_ref()?)))
        .collect();
    if !sources.is_empty() {
        out.push_str("\nsources:\n");
        for (p, src) in sources {
            let _ = write!(
                out,
                "  {}: {} {}",
                one_line(&p.name),
                src.kind,
                one_line(&src.address)
            );
            for (label, value) in [
                ("stream", &src.stream),
                ("group", &src.group),
                ("function", &src.function),
            ] {
                if let Some(value) = value {
                    let _ = write!(out, " {label} {}", one_line(value));
                }
            }
            let _ = write!(out, ": {}", src.state);
            if let Some(reason) = &src.reason {
                let _ = write!(out, " ({})", one_line(reason));
            }
            if let (Some(len), Some(pending)) = (src.stream_length, src.pending) {
                let lag = src.lag.map_or("?".to_string(), |l| l.to_string());
                let _ = write!(out, "; length {len}, pending {pending}, lag {lag}");
                if let Some(age) = src.figures_age_secs {
                    let _ = write!(out, " (read {} ago)", duration(age));
                }
            }
            out.push('\n');
        }
    }
    if !s.recent.is_empty() {
        out.push_str("\nrecent problems (newest first):\n");
        for e in s.recent.iter().take(RECENT_SHOWN) {
            let _ = write!(out, "  {} {}", one_line(&e.at), e.kind);
            if let Some(pool) = &e.pool {
                let _ = write!(out, " pool {}", one_line(pool));
            }
            if let Some(pid) = e.pid {
                let _ = write!(out, " worker {pid}");
            }
            let _ = writeln!(out, ": {}", one_line(&e.reason));
        }
    }
    out.push_str("OK\n");
    out
}

/// Recent problems the text `status` lists (the JSON has them all).
const RECENT_SHOWN: usize = 5;

/// The full reply to `workers` (a table) or `workers json` (`{"workers": [...]}` on one
/// line), ending with `OK` and a newline.
pub fn render_workers(s: &Snapshot, json: bool) -> String {
    if json {
        #[derive(Serialize)]
        struct Workers<'a> {
            workers: &'a [WorkerSnapshot],
        }
        return json_reply(&Workers {
            workers: &s.workers,
        });
    }
    use Align::{Left, Right};
    let columns = [
        ("PID", Right),
        ("POOL", Left),
        ("GEN", Right),
        ("STATE", Left),
        ("JOB-AGE", Right),
        ("JOBS", Right),
        ("OWN", Right),
        ("STARTED", Left),
        ("AGE", Right),
    ];
    let rows = s
        .workers
        .iter()
        .map(|w| {
            vec![
                w.pid.to_string(),
                w.pool.clone(),
                w.generation.to_string(),
                w.state.clone(),
                w.job_age_secs.map_or_else(|| "-".to_owned(), job_age),
                w.jobs_done.to_string(),
                w.own_bytes.map_or_else(|| "-".to_owned(), size),
                w.started.clone(),
                duration(w.age_secs),
            ]
        })
        .collect();
    let mut out = String::new();
    table(&mut out, &columns, rows);
    out.push_str("OK\n");
    out
}

/// One line of JSON, then `OK`. (serde_json escapes every control character, so the document
/// cannot span lines.)
fn json_reply<T: Serialize>(value: &T) -> String {
    match serde_json::to_string(value) {
        Ok(mut out) => {
            out.push_str("\nOK\n");
            out
        }
        Err(e) => err_reply(&format!("cannot encode the reply as JSON: {e}")),
    }
}

/// Writes a header line and one line per row ([`human::table`]), cells put on one line first
/// ([`one_line`]). If a line would read as the end of the reply (a pool named `OK` or
/// `ERR`...), every line of the table is indented by one space, so the columns stay aligned.
fn table(out: &mut String, columns: &[(&str, Align)], rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| one_line(cell)).collect())
        .collect();
    let rendered = human::table(columns, &rows, usize::MAX);
    let indent = if rendered
        .iter()
        .any(|l| l.starts_with("OK") || l.starts_with("ERR"))
    {
        " "
    } else {
        ""
    };
    for line in rendered {
        out.push_str(indent);
        out.push_str(&line);
        out.push('\n');
    }
}

/// True for a character that must not reach a log line or a terminal as it is: a control
/// character, and the invisible ones that change how the rest reads — bidi embeddings,
/// overrides and isolates (U+202A–202E, U+2066–2069; "Trojan Source"), the line and paragraph
/// separators (U+2028, U+2029), zero-width characters and marks (U+200B–200F, U+2060–2064,
/// U+FEFF).
pub fn is_unsafe_to_show(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}'
        )
}

/// `text` with every control or invisible character ([`is_unsafe_to_show`]) escaped (`\n`,
/// `\u{1b}`, `\u{202e}`...), so it stays on one line and reads as it is.
pub fn one_line(text: &str) -> String {
    if !text.chars().any(is_unsafe_to_show) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe_to_show(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits an incoming byte stream into lines (ended by LF or CRLF), with a length limit.
///
/// Call [`LineBuffer::next_line`] until it gives `Ok(None)` after each [`LineBuffer::push`].
/// A line that fails (too long, not text) is dropped — an over-long one up to its end, however
/// much more of it arrives — and the lines after it come out as usual: the caller may answer
/// `ERR` and carry on, or close the connection. What is held is bounded by `max_line` plus one
/// push.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// The first byte not given out yet.
    start: usize,
    /// `buf[start..scanned]` holds no LF (so each byte is searched once).
    scanned: usize,
    max_line: usize,
    /// Dropping the rest of an over-long line, up to its LF.
    skipping: bool,
}

/// Why a line was refused by [`LineBuffer::next_line`].
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LineError {
    #[error("line over {0} bytes")]
    TooLong(usize),
    #[error("not a text line")]
    NotText,
}

impl LineBuffer {
    /// A buffer for lines of at most `max_line` bytes, not counting the line ending. (The
    /// master uses [`MAX_LINE`].)
    pub fn new(max_line: usize) -> LineBuffer {
        LineBuffer {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max_line,
            skipping: false,
        }
    }

    /// Adds bytes read from the connection.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.skipping {
            match bytes.iter().position(|&b| b == b'\n') {
                None => return,
                Some(lf) => {
                    self.skipping = false;
                    bytes = &bytes[lf + 1..];
                }
            }
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held: read, not given out yet.
    pub fn held(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True when [`LineBuffer::next_line`] has something to give now: a complete line, or an
    /// error for one already over the limit.
    pub fn has_line(&self) -> bool {
        let from = self.scanned.max(self.start);
        if self.buf[from..].contains(&b'\n') {
            return true;
        }
        let pending = &self.buf[self.start..];
        let allowed = self
            .max_line
            .saturating_add(usize::from(pending.last() == Some(&b'\r')));
        pending.len() > allowed
    }

    /// The next complete line without its ending, or `Ok(None)` until one is complete.
    /// `Err(LineError::TooLong)` if a line, complete or not, passes `max_line` bytes;
    /// `Err(LineError::NotText)` if a line is not UTF-8 or holds a control character other
    /// than tab (binary garbage, telnet negotiation).
    pub fn next_line(&mut self) -> Result<Option<String>, LineError> {
        let from = self.scanned.max(self.start);
        let Some(lf) = self.buf[from..].iter().position(|&b| b == b'\n') else {
            self.scanned = self.buf.len();
            let pending = &self.buf[self.start..];
            // A line of exactly max_line bytes may be waiting for the LF after its CR.
            let allowed = self
                .max_line
                .saturating_add(usize::from(pending.last() == Some(&b'\r')));
            if pending.len() > allowed {
                self.buf.clear();
                self.start = 0;
                self.scanned = 0;
                self.skipping = true;
                return Err(LineError::TooLong(self.max_line));
            }
            return Ok(None);
        };
        let begin = self.start;
        let mut end = from + lf;
        self.start = end + 1;
        self.scanned = self.start;
        if end > begin && self.buf[end - 1] == b'\r' {
            end -= 1;
        }
        let line = &self.buf[begin..end];
        if line.len() > self.max_line {
            return Err(LineError::TooLong(self.max_line));
        }
        let text = std::str::from_utf8(line).map_err(|_| LineError::NotText)?;
        if text.chars().any(|c| c.is_control() && c != '\t') {
            return Err(LineError::NotText);
        }
        Ok(Some(text.to_owned()))
    }
}

/// Compares an offered token with the expected one in time that depends only on their
/// lengths: every byte up to the longer length is compared, with no early exit, and a length
/// difference makes the result false. An empty expected token matches nothing.
pub fn token_matches(offered: &[u8], expected: &[u8]) -> bool {
    let n = offered.len().max(expected.len());
    let mut diff = offered.len() ^ expected.len();
    for i in 0..n {
        let a = offered.get(i).copied().unwrap_or(0);
        let b = expected.get(i).copied().unwrap_or(0);
        diff |= usize::from(a ^ b);
        diff = std::hint::black_box(diff);
    }
    std::hint::black_box(diff) == 0 && !expected.is_empty()
}

/// How often wrong tokens are logged at most.
pub const WRONG_TOKEN_LOG_EVERY: Duration = Duration::from_secs(1);

/// Counts TCP sessions that offered a wrong token, so that they are logged at most once per
/// [`WRONG_TOKEN_LOG_EVERY`] with a count: an unauthenticated client cannot flood the log.
///
/// The first one after a quiet spell is logged at once and opens a window; those within the
/// window are only counted, and logged as one line when it ends ([`WrongTokens::flush`] at
/// [`WrongTokens::next_deadline`]), which opens the next window. Pure: every call is given
/// `now`.
#[derive(Debug, Default)]
pub struct WrongTokens {
    counted: CountedEvents,
}

impl WrongTokens {
    pub fn new() -> WrongTokens {
        WrongTokens::default()
    }

    /// One more wrong token at `now`; the line to log now, if any.
    pub fn record(&mut self, now: Instant) -> Option<String> {
        let (count, over) = self.counted.record(now)?;
        Some(wrong_tokens_line(count, over))
    }

    /// The line to log at `now` for the sessions counted in a window that has ended.
    pub fn flush(&mut self, now: Instant) -> Option<String> {
        let (count, over) = self.counted.flush(now)?;
        Some(wrong_tokens_line(count, over))
    }

    /// When [`WrongTokens::flush`] has a line to log; None while nothing is pending (so an
    /// idle master need not wake for it).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.counted.next_deadline()
    }
}

/// Events of one kind, to be logged at most once per [`WRONG_TOKEN_LOG_EVERY`] with a count:
/// the first after a quiet spell at once (a count of 1 over no time), the rest as one count
/// when the window they came in ends. The logic behind [`WrongTokens`] and [`SessionCloses`].
#[derive(Debug, Default)]
struct CountedEvents {
    /// The window in which nothing more is logged: (its start, its end).
    window: Option<(Instant, Instant)>,
    /// Counted in the window, not logged yet.
    pending: u64,
}

impl CountedEvents {
    /// One more event at `now`; (how many, over how long) to log now, if any.
    fn record(&mut self, now: Instant) -> Option<(u64, Duration)> {
        match self.window {
            Some((_, end)) if now < end => {
                self.pending += 1;
                None
            }
            // A window past its end whose count was not flushed yet: this one goes with it.
            Some((start, _)) if self.pending > 0 => {
                let count = self.pending + 1;
                self.open(now);
                Some((count, now.saturating_duration_since(start)))
            }
            _ => {
                self.open(now);
                Some((1, Duration::ZERO))
            }
        }
    }

    /// What to log at `now` for the events counted in a window that has ended.
    fn flush(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let (start, end) = self.window?;
        if now < end {
            return None;
        }
        if self.pending == 0 {
            self.window = None;
            return None;
        }
        let count = self.pending;
        self.open(now);
        Some((count, now.saturating_duration_since(start)))
    }

    fn next_deadline(&self) -> Option<Instant> {
        match self.window {
            Some((_, end)) if self.pending > 0 => Some(end),
            _ => None,
        }
    }

    fn open(&mut self, now: Instant) {
        self.window = Some((now, now + WRONG_TOKEN_LOG_EVERY));
        self.pending = 0;
    }
}

/// Why the master closed an admin session on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A TCP session that did not `auth` within `admin.auth_timeout`.
    NotAuthenticated(Duration),
    /// No input (and none of its output taken) for `admin.idle_timeout`.
    Idle(Duration),
    /// Refused at accept: this many sessions (or unauthenticated TCP sessions) are open.
    TooMany { limit: usize, unauthenticated: bool },
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::NotAuthenticated(d) => write!(
                f,
                "not authenticated within {}",
                humantime::format_duration(*d)
            ),
            CloseReason::Idle(d) => write!(f, "idle for {}", humantime::format_duration(*d)),
            CloseReason::TooMany {
                limit,
                unauthenticated: false,
            } => write!(f, "{limit} admin sessions are open already"),
            CloseReason::TooMany {
                limit,
                unauthenticated: true,
            } => write!(
                f,
                "{limit} unauthenticated TCP admin sessions are open already"
            ),
        }
    }
}

/// Admin sessions the master closed for one kind of reason, logged at most once a second
/// with a count (`closed 37 admin sessions in the last 1.0s: idle for 10m`): many sessions
/// timing out together cost one log line. Pure, like [`WrongTokens`].
#[derive(Debug, Default)]
pub struct SessionCloses {
    counted: CountedEvents,
}

impl SessionCloses {
    pub fn new() -> SessionCloses {
        SessionCloses::default()
    }

    /// One more session closed at `now` for `reason`; the line to log now, if any.
    pub fn record(&mut self, now: Instant, reason: CloseReason) -> Option<String> {
        let (count, over) = self.counted.record(now)?;
        Some(closes_line(count, over, reason))
    }

    /// The line to log at `now` for the sessions counted in a window that has ended.
    pub fn flush(&mut self, now: Instant, reason: CloseReason) -> Option<String> {
        let (count, over) = self.counted.flush(now)?;
        Some(closes_line(count, over, reason))
    }

    /// When [`SessionCloses::flush`] has a line to log; None while nothing is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.counted.next_deadline()
    }
}

/// `closed an admin session: idle for 10m`, or `closed 37 admin sessions in the last 1.0s:
/// idle for 10m`.
fn closes_line(count: u64, over: Duration, reason: CloseReason) -> String {
    if count == 1 && over.is_zero() {
        return format!("closed an admin session: {reason}");
    }
    let sessions = if count == 1 { "session" } else { "sessions" };
    format!(
        "closed {count} admin {sessions} in the last {:.1}s: {reason}",
        over.as_secs_f64()
    )
}

/// When an admin session is to be closed, and why: `auth_timeout` after it opened while it
/// has not authenticated, and `idle_timeout` after its last input or output, unless a
/// command it sent is still running (`busy`: it waits for a `reload`). None: never, as
/// things stand (a deadline past `Instant`'s range is none).
pub fn session_deadline(
    opened: Instant,
    active: Instant,
    authed: bool,
    busy: bool,
    auth_timeout: Duration,
    idle_timeout: Duration,
) -> Option<(Instant, CloseReason)> {
    let auth = (!authed)
        .then(|| opened.checked_add(auth_timeout))
        .flatten()
        .map(|at| (at, CloseReason::NotAuthenticated(auth_timeout)));
    let idle = (!busy)
        .then(|| active.checked_add(idle_timeout))
        .flatten()
        .map(|at| (at, CloseReason::Idle(idle_timeout)));
    [auth, idle].into_iter().flatten().min_by_key(|(at, _)| *at)
}

/// Unread admin input held per session at most: past it the master reads no more from that
/// session until its lines are handled (a few lines' worth; what is past it waits in the
/// kernel's socket buffer, and then in the client).
pub const MAX_HELD_INPUT: usize = 4 * MAX_LINE;

/// Unwritten admin output per session at most before the master handles no more of its lines:
/// a session that does not read its replies stops being served (and read) until it does, so
/// what it costs is this plus one reply — never a reply per line it sent.
pub const MAX_UNREAD_OUTPUT: usize = 64 << 10;

/// Admin lines handled for one session in one pass of the master's loop, and in all: the rest
/// wait for the next pass (which does not sleep), so sessions take turns, and jobs are
/// dispatched between turns.
pub const LINES_PER_SESSION: usize = 4;
pub const LINES_PER_PASS: usize = 32;

/// What one session is owed on the master's loop, from its state: whether to read it, and
/// whether it has lines to be handled now. The master asks epoll for input only when
/// [`SessionFlow::wants_input`] (so a session it will not read never wakes it), and keeps the
/// session in its turns while [`SessionFlow::wants_turn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionFlow {
    /// Closing (after `quit`, bad input, a wrong token): neither read nor handled.
    pub closing: bool,
    /// Waiting for the outcome of its `reload`: its next lines wait.
    pub awaiting: bool,
    /// Its output not written yet (the client is not reading it fast enough).
    pub unread_output: usize,
    /// Its input read but not handled yet.
    pub held_input: usize,
    /// A complete line (or a line already over the limit) is held.
    pub has_line: bool,
}

impl SessionFlow {
    /// Handling its lines may go on: it is not closing or waiting, and its client has taken
    /// what was said so far (back-pressure, before any more output is produced).
    pub fn may_handle(&self) -> bool {
        !self.closing && !self.awaiting && self.unread_output < MAX_UNREAD_OUTPUT
    }

    /// It has a line to handle now.
    pub fn wants_turn(&self) -> bool {
        self.may_handle() && self.has_line
    }

    /// Reading more of it would be handled soon: what it holds is under the limit.
    pub fn wants_input(&self) -> bool {
        self.may_handle() && self.held_input < MAX_HELD_INPUT
    }
}

/// The admin lines the master may still handle in this pass of its loop: at most
/// [`LINES_PER_SESSION`] for one session's turn, [`LINES_PER_PASS`] in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassBudget {
    left: usize,
}

impl Default for PassBudget {
    fn default() -> PassBudget {
        PassBudget {
            left: LINES_PER_PASS,
        }
    }
}

impl PassBudget {
    pub fn new() -> PassBudget {
        PassBudget::default()
    }

    /// Lines the next session may handle in its turn (0: the pass is over for admin work).
    pub fn turn(&self) -> usize {
        self.left.min(LINES_PER_SESSION)
    }

    /// A turn handled `lines` lines.
    pub fn spend(&mut self, lines: usize) {
        self.left = self.left.saturating_sub(lines);
    }
}

/// `a TCP session offered a wrong token`, or `57 TCP sessions offered a wrong token in the
/// last 1.0s`.
fn wrong_tokens_line(count: u64, over: Duration) -> String {
    if count == 1 && over.is_zero() {
        return "a TCP session offered a wrong token; closed it".into();
    }
    let (sessions, them) = if count == 1 {
        ("session", "it")
    } else {
        ("sessions", "them")
    };
    format!(
        "{count} TCP {sessions} offered a wrong token in the last {:.1}s; closed {them}",
        over.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str) -> String {
        name.to_owned()
    }

    #[test]
    fn parse_every_command() {
        let cases: Vec<(&str, Request)> = vec![
            ("help", Request::Help),
            ("status", Request::Status { json: false }),
            ("status json", Request::Status { json: true }),
            ("STATUS JSON", Request::Status { json: true }),
            ("workers", Request::Workers { json: false }),
            ("Workers Json", Request::Workers { json: true }),
            (
                "scale echo 3",
                Request::Do(Command::Scale {
                    pool: pool("echo"),
                    workers: 3,
                }),
            ),
            (
                "scale echo 0",
                Request::Do(Command::Scale {
                    pool: pool("echo"),
                    workers: 0,
                }),
            ),
            (
                "scale Echo 1024",
                Request::Do(Command::Scale {
                    pool: pool("Echo"),
                    workers: 1024,
                }),
            ),
            (
                "scale echo 007",
                Request::Do(Command::Scale {
                    pool: pool("echo"),
                    workers: 7,
                }),
            ),
            (
                "restart echo",
                Request::Do(Command::Restart {
                    target: Target::Pool(pool("echo")),
                }),
            ),
            (
                "restart all",
                Request::Do(Command::Restart {
                    target: Target::All,
                }),
            ),
            (
                "RESTART ALL",
                Request::Do(Command::Restart {
                    target: Target::All,
                }),
            ),
            (
                "stop hash",
                Request::Do(Command::StopPool { pool: pool("hash") }),
            ),
            (
                "start hash",
                Request::Do(Command::StartPool { pool: pool("hash") }),
            ),
            ("reload", Request::Do(Command::Reload)),
            ("reopen", Request::Do(Command::ReopenLogs)),
            ("shutdown", Request::Do(Command::Stop { escalate: false })),
            (
                "shutdown graceful",
                Request::Do(Command::Stop { escalate: false }),
            ),
            ("shutdown NOW", Request::Do(Command::StopNow)),
            ("quit", Request::Quit),
            (
                "auth s3cret",
                Request::Auth {
                    token: "s3cret".to_owned(),
                },
            ),
            (
                "AUTH \t two words \t",
                Request::Auth {
                    token: "two words".to_owned(),
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), Ok(want), "{line:?}");
        }
    }

    #[test]
    fn parse_separators() {
        assert_eq!(
            parse("  \tscale\t\techo   2 \t"),
            Ok(Request::Do(Command::Scale {
                pool: pool("echo"),
                workers: 2
            }))
        );
        assert_eq!(parse(" help "), Ok(Request::Help));
    }

    #[test]
    fn parse_errors() {
        let cases = [
            ("", "empty line"),
            (" \t ", "empty line"),
            ("foo", r#"unknown command "foo" (try help)"#),
            ("foo bar", r#"unknown command "foo" (try help)"#),
            ("stat\"us", r#"unknown command "stat\"us" (try help)"#),
            ("help me", "usage: help"),
            ("status yaml", "usage: status [json]"),
            ("status json json", "usage: status [json]"),
            ("workers x", "usage: workers [json]"),
            ("scale", "usage: scale POOL N"),
            ("scale echo", "usage: scale POOL N"),
            ("scale echo 1 2", "usage: scale POOL N"),
            (
                "scale echo x",
                r#"scale: N must be a whole number from 0 to 1024, not "x""#,
            ),
            (
                "scale echo -1",
                r#"scale: N must be a whole number from 0 to 1024, not "-1""#,
            ),
            (
                "scale echo +1",
                r#"scale: N must be a whole number from 0 to 1024, not "+1""#,
            ),
            (
                "scale echo 1.5",
                r#"scale: N must be a whole number from 0 to 1024, not "1.5""#,
            ),
            (
                "scale echo 1025",
                r#"scale: N must be a whole number from 0 to 1024, not "1025""#,
            ),
            (
                "scale echo 99999999999999999999999",
                r#"scale: N must be a whole number from 0 to 1024, not "99999999999999999999999""#,
            ),
            ("restart", "usage: restart POOL|all"),
            ("restart a b", "usage: restart POOL|all"),
            ("stop", "usage: stop POOL"),
            ("stop a b", "usage: stop POOL"),
            ("start", "usage: start POOL"),
            ("start a b", "usage: start POOL"),
            ("reload now", "usage: reload"),
            ("reopen logs", "usage: reopen"),
            ("shutdown later", "usage: shutdown [graceful|now]"),
            ("shutdown now now", "usage: shutdown [graceful|now]"),
            ("quit now", "usage: quit"),
            ("auth", "usage: auth TOKEN"),
            ("auth \t ", "usage: auth TOKEN"),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line), Err(want.to_owned()), "{line:?}");
        }
    }

    #[test]
    fn unknown_command_is_cut_short() {
        let long = "x".repeat(500);
        let err = parse(&long).unwrap_err();
        assert_eq!(
            err,
            format!("unknown command \"{}\"… (try help)", "x".repeat(40))
        );
        let err = parse("ééééééééééééééééééééééééééééééééééééééééééé").unwrap_err();
        assert!(err.starts_with("unknown command \"éééé"), "{err}");
    }

    #[test]
    fn debug_hides_the_token() {
        let cmd = parse("auth hunter2").unwrap();
        let shown = format!("{cmd:?} {cmd:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
        assert_eq!(
            format!("{:?}", parse("scale echo 2").unwrap()),
            r#"Scale { pool: "echo", workers: 2 }"#
        );
        assert_eq!(format!("{:?}", Request::Help), "Help");
    }

    #[test]
    fn help_lists_every_command() {
        let h = help();
        assert!(h.ends_with("\nOK\n"), "{h}");
        let lines: Vec<&str> = h.lines().collect();
        assert_eq!(lines.len(), COMMANDS.len() + 1);
        for word in [
            "help", "status", "workers", "metrics", "scale", "restart", "stop", "start", "reload",
            "shutdown", "quit", "auth",
        ] {
            assert!(
                lines.iter().any(|l| l.starts_with(word)),
                "{word} missing:\n{h}"
            );
        }
        // Every command listed parses (with its placeholders filled in).
        for (form, _) in COMMANDS {
            let line = form
                .replace("[json]", "json")
                .replace("[prometheus]", "prometheus")
                .replace("[graceful|now]", "now")
                .replace("POOL|all", "all")
                .replace("POOL", "p")
                .replace(" N", " 1");
            assert!(parse(&line).is_ok(), "{line}");
        }
        // The descriptions line up.
        let column = lines[0].find("this list").unwrap();
        for line in &lines[..lines.len() - 1] {
            assert_eq!(line.as_bytes()[column - 1], b' ', "{line}");
            assert_ne!(line.as_bytes()[column], b' ', "{line}");
        }
    }

    #[test]
    fn one_line_escapes_controls_and_invisible_characters() {
        assert_eq!(one_line("plain text, ünïcode"), "plain text, ünïcode");
        assert_eq!(one_line("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J");
        assert_eq!(
            one_line("x\u{202e}y\u{2066}z\u{200b}w\u{2028}v\u{feff}"),
            "x\\u{202e}y\\u{2066}z\\u{200b}w\\u{2028}v\\u{feff}"
        );
        // Every character it must not show comes out escaped, none as itself.
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            if is_unsafe_to_show(c) {
                let shown = one_line(&c.to_string());
                assert!(shown.starts_with('\\') && !shown.contains(c), "{shown:?}");
            }
        }
    }

    #[test]
    fn err_reply_is_one_line() {
        assert_eq!(err_reply("unknown pool \"x\""), "ERR unknown pool \"x\"\n");
        assert_eq!(err_reply("a\nOK\r\nb"), "ERR a\\nOK\\r\\nb\n");
    }

    #[test]
    fn final_lines() {
        assert!(is_final_line("OK"));
        assert!(is_final_line("ERR"));
        assert!(is_final_line("ERR usage: quit"));
        assert!(!is_final_line("OK "));
        assert!(!is_final_line("ok"));
        assert!(!is_final_line("ERRORS  ok  1/1"));
        assert!(!is_final_line(""));
    }

    // LineBuffer

    fn lines_of(buf: &mut LineBuffer) -> Vec<Result<String, LineError>> {
        let mut out = Vec::new();
        loop {
            match buf.next_line() {
                Ok(None) => return out,
                Ok(Some(line)) => out.push(Ok(line)),
                Err(e) => out.push(Err(e)),
            }
        }
    }

    fn ok(lines: &[&str]) -> Vec<Result<String, LineError>> {
        lines.iter().map(|l| Ok((*l).to_owned())).collect()
    }

    #[test]
    fn lines_lf_and_crlf() {
        let mut b = LineBuffer::new(MAX_LINE);
        b.push(b"status\nworkers json\r\n\r\nscale echo\t2\n");
        assert_eq!(
            lines_of(&mut b),
            ok(&["status", "workers json", "", "scale echo\t2"])
        );
        assert_eq!(b.next_line(), Ok(None));
    }

    #[test]
    fn lines_split_across_pushes() {
        let mut b = LineBuffer::new(MAX_LINE);
        b.push(b"sta");
        assert_eq!(b.next_line(), Ok(None));
        b.push(b"tus\r");
        assert_eq!(b.next_line(), Ok(None));
        b.push(b"\nhe");
        assert_eq!(lines_of(&mut b), ok(&["status"]));
        b.push(b"lp\nquit");
        assert_eq!(lines_of(&mut b), ok(&["help"]));
        b.push(b"\n");
        assert_eq!(lines_of(&mut b), ok(&["quit"]));

        // Byte by byte, including a multi-byte character cut in half.
        let mut b = LineBuffer::new(MAX_LINE);
        let mut got = Vec::new();
        for byte in "scale é 1\r\nreload\n".bytes() {
            b.push(&[byte]);
            got.extend(lines_of(&mut b));
        }
        assert_eq!(got, ok(&["scale é 1", "reload"]));
    }

    #[test]
    fn lines_too_long() {
        // Exactly the limit is fine, with LF or CRLF, complete or waiting for its LF.
        let mut b = LineBuffer::new(8);
        b.push(b"12345678\n12345678\r");
        assert_eq!(lines_of(&mut b), ok(&["12345678"]));
        b.push(b"\n");
        assert_eq!(lines_of(&mut b), ok(&["12345678"]));

        // One over, complete: that line is refused, the next one comes out.
        b.push(b"123456789\nhelp\n");
        assert_eq!(
            lines_of(&mut b),
            vec![Err(LineError::TooLong(8)), Ok("help".to_owned())]
        );

        // One over, incomplete: refused at once; the rest of it is dropped as it arrives.
        b.push(b"123456789");
        assert_eq!(lines_of(&mut b), vec![Err(LineError::TooLong(8))]);
        b.push(b"more of the same line");
        assert_eq!(lines_of(&mut b), vec![]);
        b.push(b"and more\nstatus\n");
        assert_eq!(lines_of(&mut b), ok(&["status"]));

        // A CR that is not before the LF counts.
        b.push(b"12345678\rx");
        assert_eq!(lines_of(&mut b), vec![Err(LineError::TooLong(8))]);
        b.push(b"\nquit\n");
        assert_eq!(lines_of(&mut b), ok(&["quit"]));
        assert_eq!(LineError::TooLong(8).to_string(), "line over 8 bytes");
    }

    #[test]
    fn lines_not_text() {
        let mut b = LineBuffer::new(MAX_LINE);
        b.push(b"\xff\xfb\x01status\r\n"); // telnet negotiation
        b.push(b"sta\x00tus\n");
        b.push(b"a\rb\n");
        b.push(b"esc \x1b[A\n");
        b.push(b"\xc3(\n"); // invalid UTF-8
        b.push(b"del\x7f\n");
        b.push("c1 \u{85}\n".as_bytes());
        b.push(b"tab\tok\n");
        let mut want = vec![Err(LineError::NotText); 7];
        want.push(Ok("tab\tok".to_owned()));
        assert_eq!(lines_of(&mut b), want);
        assert_eq!(LineError::NotText.to_string(), "not a text line");
    }

    #[test]
    fn lines_many_in_one_push() {
        let mut b = LineBuffer::new(16);
        let text = "status\n".repeat(10_000);
        b.push(text.as_bytes());
        let got = lines_of(&mut b);
        assert_eq!(got.len(), 10_000);
        assert!(got.iter().all(|l| l.as_deref() == Ok("status")));
        // Given-out lines are not kept.
        b.push(b"x");
        assert_eq!(b.buf.len(), 1);
    }

    #[test]
    fn tokens() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(!token_matches(b"s3creT", b"s3cret"));
        assert!(!token_matches(b"s3cre", b"s3cret"));
        assert!(!token_matches(b"s3crett", b"s3cret"));
        assert!(!token_matches(b"", b"s3cret"));
        assert!(!token_matches(b"s3cret\0", b"s3cret"));
        assert!(!token_matches(b"", b""));
        assert!(!token_matches(b"x", b""));
    }

    // Rendering

    fn snapshot() -> Snapshot {
        Snapshot {
            pid: 4242,
            version: "0.1.0".to_owned(),
            uptime_secs: 3725.4,
            config: "/etc/jobhost/jobhost.toml".to_owned(),
            generation: 3,
            generations_loaded: 2,
            last_reload: Some(ReloadReport {
                at: "2026-11-23T01:02:03Z".to_owned(),
                ok: true,
                message: String::new(),
            }),
            pools: vec![
                PoolSnapshot {
                    name: "echo".to_owned(),
                    plugin: "echo".to_owned(),
                    plugin_version: "0.1.0".to_owned(),
                    mode: "jobs".to_owned(),
                    workers_wanted: 2,
                    workers_running: 2,
                    workers_busy: 1,
                    jobs_queued: 17,
                    jobs_running: 1,
                    jobs_in_flight: 1,
                    jobs_done: 123456,
                    jobs_failed: 7,
                    jobs_retried: 3,
                    jobs_dropped: 0,
                    crashes: 1,
                    timeouts: 2,
                    recycled: 40,
                    stopped: 6,
                    state: "ok".to_owned(),
                    source: None,
                },
                PoolSnapshot {
                    name: "wordcount-long-name".to_owned(),
                    plugin: "wordcount".to_owned(),
                    plugin_version: "1.2.3".to_owned(),
                    mode: "loop".to_owned(),
                    workers_wanted: 4,
                    workers_running: 0,
                    workers_busy: 0,
                    jobs_queued: 0,
                    jobs_running: 0,
                    jobs_in_flight: 0,
                    jobs_done: 0,
                    jobs_failed: 0,
                    jobs_retried: 0,
                    jobs_dropped: 0,
                    crashes: 12,
                    timeouts: 0,
                    recycled: 0,
                    stopped: 3,
                    state: "backing-off".to_owned(),
                    source: None,
                },
            ],
            workers: vec![
                WorkerSnapshot {
                    pid: 4250,
                    pool: "echo".to_owned(),
                    generation: 3,
                    state: "busy".to_owned(),
                    job_age_secs: Some(1.23),
                    jobs_done: 61000,
                    rss_bytes: Some(112_900_000),
                    own_bytes: Some(12_900_000),
                    started: "2026-11-23T01:00:00Z".to_owned(),
                    age_secs: 302.0,
                },
                WorkerSnapshot {
                    pid: 4251,
                    pool: "echo".to_owned(),
                    generation: 2,
                    state: "draining".to_owned(),
                    job_age_secs: None,
                    jobs_done: 5,
                    rss_bytes: None,
                    own_bytes: None,
                    started: "2026-11-22T23:00:00Z".to_owned(),
                    age_secs: 7322.0,
                },
            ],
            recent: Vec::new(),
        }
    }

    /// The cells of a table line.
    fn cells(line: &str) -> Vec<&str> {
        line.split_whitespace().collect()
    }

    /// Checks that every column starts (left-aligned) or ends (right-aligned) at the same
    /// place on every line: the header's words are the columns.
    fn assert_aligned(lines: &[&str], right: &[bool]) {
        let header = lines[0];
        let mut spans = Vec::new();
        let mut at = 0;
        for word in header.split_whitespace() {
            let start = header[at..].find(word).unwrap() + at;
            spans.push((start, start + word.len()));
            at = start + word.len();
        }
        for line in lines {
            let mut at = 0;
            for (i, cell) in line.split_whitespace().enumerate() {
                let start = line[at..].find(cell).unwrap() + at;
                let end = start + cell.chars().count();
                if right[i] {
                    assert_eq!(end, spans[i].1, "column {i} in {line:?}");
                } else {
                    assert_eq!(start, spans[i].0, "column {i} in {line:?}");
                }
                at = start + cell.len();
            }
        }
    }

    #[test]
    fn status_human() {
        let out = render_status(&snapshot(), false);
        assert!(out.ends_with("\nOK\n"), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "jobhost 0.1.0, pid 4242, up 1h02m");
        assert_eq!(lines[1], "config: /etc/jobhost/jobhost.toml");
        assert_eq!(lines[2], "generation: 3 (2 plugin builds loaded)");
        assert_eq!(lines[3], "last reload: 2026-11-23T01:02:03Z ok");
        assert_eq!(lines[4], "");
        assert_eq!(
            cells(lines[5]),
            [
                "POOL", "STATE", "WORKERS", "BUSY", "QUEUED", "RUNNING", "DONE", "FAILED",
                "RETRIED", "CRASHES", "PLUGIN"
            ]
        );
        assert_eq!(
            cells(lines[6]),
            ["echo", "ok", "2/2", "1", "17", "1", "123456", "7", "3", "1", "echo", "0.1.0"]
        );
        assert_eq!(
            cells(lines[7]),
            [
                "wordcount-long-name",
                "backing-off",
                "0/4",
                "0",
                "0",
                "0",
                "0",
                "0",
                "0",
                "12",
                "wordcount",
                "1.2.3"
            ]
        );
        assert_eq!(lines.len(), 9);
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{out}");
        // The plugin column is "name version": check alignment on the first word only.
        let table: Vec<String> = lines[5..8]
            .iter()
            .map(|l| l.rsplit_once(' ').map_or(*l, |(a, _)| a).to_owned())
            .collect();
        let mut table: Vec<&str> = table.iter().map(String::as_str).collect();
        table[0] = lines[5];
        let right = [
            false, false, true, true, true, true, true, true, true, true, false,
        ];
        assert_aligned(&table, &right);
    }

    #[test]
    fn status_header_variants() {
        let mut s = snapshot();
        s.generations_loaded = 1;
        s.uptime_secs = 42.9;
        s.last_reload = None;
        s.pools.clear();
        let out = render_status(&s, false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "jobhost 0.1.0, pid 4242, up 42s");
        assert_eq!(lines[2], "generation: 3 (1 plugin build loaded)");
        assert_eq!(lines[3], "last reload: none");
        assert_eq!(cells(lines[5])[0], "POOL");
        assert_eq!(&lines[6..], ["OK"]);

        s.last_reload = Some(ReloadReport {
            at: "2026-11-23T01:02:03Z".to_owned(),
            ok: false,
            message: "pool echo: init failed:\nOK\nboom".to_owned(),
        });
        let out = render_status(&s, false);
        assert!(
            out.contains(
                "\nlast reload: 2026-11-23T01:02:03Z FAILED: pool echo: init failed:\\nOK\\nboom\n"
            ),
            "{out}"
        );
        // Only the last line is a final line.
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.iter().filter(|l| is_final_line(l)).count(),
            1,
            "{out}"
        );
    }

    #[test]
    fn status_pool_named_like_the_end_of_a_reply() {
        let mut s = snapshot();
        s.pools[0].name = "OK".to_owned();
        s.pools[1].name = "ERR".to_owned();
        s.pools[1].plugin = "evil\nOK".to_owned();
        let out = render_status(&s, false);
        let lines: Vec<&str> = out.lines().collect();
        let finals: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("OK") || l.starts_with("ERR"))
            .collect();
        assert_eq!(finals, [&"OK"], "{out}");
        assert!(out.contains("evil\\nOK"), "{out}");
        assert!(lines[5].starts_with(" POOL"), "{out}");
        assert!(lines[6].starts_with(" OK "), "{out}");
    }

    #[test]
    fn status_shows_a_redis_source_and_why_it_is_disconnected() {
        let mut s = snapshot();
        s.pools[0].source = Some(SourceSnapshot {
            kind: "redis".into(),
            address: "redis://:***@10.0.0.5:6379/0".into(),
            stream: Some("jobs".into()),
            group: Some("jobhost".into()),
            function: None,
            state: "connected".into(),
            reason: None,
            workers_connected: 2,
            stream_length: Some(1200),
            pending: Some(4),
            lag: Some(1100),
            figures_age_secs: Some(0.4),
        });
        let out = render_status(&s, false);
        assert!(
            out.contains("\nsources:\n  echo: redis redis://:***@10.0.0.5:6379/0 stream jobs group jobhost: connected; length 1200, pending 4, lag 1100 (read "),
            "{out}"
        );
        let src = s.pools[0].source.as_mut().unwrap();
        src.state = "disconnected".into();
        src.reason = Some("Connection refused\n(os error 111)".into());
        src.lag = None;
        let out = render_status(&s, false);
        assert!(
            out.contains("jobhost: disconnected (Connection refused\\n(os error 111)); length 1200, pending 4, lag ?"),
            "{out}"
        );
        assert!(out.ends_with("OK\n"));
        let json = render_status(&s, true);
        assert!(json.contains("\"source\":{\"kind\":\"redis\""), "{json}");
        assert!(json.contains("\"state\":\"disconnected\""), "{json}");
    }

    #[test]
    fn status_json() {
        let s = snapshot();
        let out = render_status(&s, true);
        let (doc, rest) = out.split_once('\n').unwrap();
        assert_eq!(rest, "OK\n");
        let v: serde_json::Value = serde_json::from_str(doc).unwrap();
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["version"], "0.1.0");
        assert_eq!(v["uptime_secs"], 3725.4);
        assert_eq!(v["config"], "/etc/jobhost/jobhost.toml");
        assert_eq!(v["generation"], 3);
        assert_eq!(v["generations_loaded"], 2);
        assert_eq!(v["last_reload"]["at"], "2026-11-23T01:02:03Z");
        assert_eq!(v["last_reload"]["ok"], true);
        assert_eq!(v["last_reload"]["message"], "");
        let p = &v["pools"][1];
        for (key, want) in [
            ("name", serde_json::json!("wordcount-long-name")),
            ("plugin", serde_json::json!("wordcount")),
            ("plugin_version", serde_json::json!("1.2.3")),
            ("mode", serde_json::json!("loop")),
            ("workers_wanted", serde_json::json!(4)),
            ("workers_running", serde_json::json!(0)),
            ("workers_busy", serde_json::json!(0)),
            ("jobs_queued", serde_json::json!(0)),
            ("jobs_running", serde_json::json!(0)),
            ("jobs_done", serde_json::json!(0)),
            ("jobs_failed", serde_json::json!(0)),
            ("jobs_retried", serde_json::json!(0)),
            ("jobs_dropped", serde_json::json!(0)),
            ("crashes", serde_json::json!(12)),
            ("timeouts", serde_json::json!(0)),
            ("recycled", serde_json::json!(0)),
            ("stopped", serde_json::json!(3)),
            ("state", serde_json::json!("backing-off")),
        ] {
            assert_eq!(p[key], want, "{key}");
        }
        assert_eq!(v["pools"][0]["jobs_done"], 123456);
        let p = &v["pools"][0];
        assert_eq!(
            [&p["crashes"], &p["timeouts"], &p["recycled"], &p["stopped"]],
            [1, 2, 40, 6]
        );
        assert!(p.get("restarts").is_none(), "gone: it counted every exit");
        assert_eq!(v["workers"].as_array().unwrap().len(), 2);

        // No reload yet, odd text, non-finite numbers: still one line of valid JSON.
        let mut s = snapshot();
        s.last_reload = None;
        s.config = "/tmp/a\nb\u{1b}.toml".to_owned();
        s.uptime_secs = f64::NAN;
        let out = render_status(&s, true);
        assert_eq!(out.lines().count(), 2, "{out}");
        let (doc, _) = out.split_once('\n').unwrap();
        let v: serde_json::Value = serde_json::from_str(doc).unwrap();
        assert!(v["last_reload"].is_null());
        assert_eq!(v["config"], "/tmp/a\nb\u{1b}.toml");
        assert!(v["uptime_secs"].is_null());
    }

    #[test]
    fn workers_human() {
        let out = render_workers(&snapshot(), false);
        assert!(out.ends_with("\nOK\n"), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            cells(lines[0]),
            ["PID", "POOL", "GEN", "STATE", "JOB-AGE", "JOBS", "OWN", "STARTED", "AGE"]
        );
        assert_eq!(
            cells(lines[1]),
            [
                "4250",
                "echo",
                "3",
                "busy",
                "1.2s",
                "61000",
                "12.3M",
                "2026-11-23T01:00:00Z",
                "5m02s"
            ]
        );
        assert_eq!(
            cells(lines[2]),
            [
                "4251",
                "echo",
                "2",
                "draining",
                "-",
                "5",
                "-",
                "2026-11-22T23:00:00Z",
                "2h02m"
            ]
        );
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{out}");
        assert_aligned(
            &lines[..3],
            &[true, false, true, false, true, true, true, false, true],
        );

        let mut s = snapshot();
        s.workers.clear();
        assert_eq!(
            render_workers(&s, false),
            "PID  POOL  GEN  STATE  JOB-AGE  JOBS  OWN  STARTED  AGE\nOK\n"
        );
    }

    #[test]
    fn workers_json() {
        let out = render_workers(&snapshot(), true);
        let (doc, rest) = out.split_once('\n').unwrap();
        assert_eq!(rest, "OK\n");
        let v: serde_json::Value = serde_json::from_str(doc).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.keys().collect::<Vec<_>>(), ["workers"]);
        let w = &v["workers"][0];
        assert_eq!(w["pid"], 4250);
        assert_eq!(w["pool"], "echo");
        assert_eq!(w["generation"], 3);
        assert_eq!(w["state"], "busy");
        assert_eq!(w["job_age_secs"], 1.23);
        assert_eq!(w["jobs_done"], 61000);
        assert_eq!(w["rss_bytes"], 112_900_000);
        assert_eq!(w["own_bytes"], 12_900_000);
        assert_eq!(w["started"], "2026-11-23T01:00:00Z");
        assert_eq!(w["age_secs"], 302.0);
        assert!(v["workers"][1]["job_age_secs"].is_null());
        assert!(v["workers"][1]["rss_bytes"].is_null());
        assert!(v["workers"][1]["own_bytes"].is_null());
    }

    #[test]
    fn wrong_tokens_are_logged_at_most_once_per_second_with_a_count() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = WrongTokens::new();
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.flush(at(0)), None);
        // The first is logged at once; nothing to wake up for yet.
        assert_eq!(
            w.record(at(0)).as_deref(),
            Some("a TCP session offered a wrong token; closed it")
        );
        assert_eq!(w.next_deadline(), None);
        // 57 more within the second: counted, not logged.
        for i in 0..57 {
            assert_eq!(w.record(at(10 + i * 10)), None);
        }
        assert_eq!(w.next_deadline(), Some(at(1000)));
        assert_eq!(w.flush(at(999)), None);
        assert_eq!(
            w.flush(at(1000)).as_deref(),
            Some("57 TCP sessions offered a wrong token in the last 1.0s; closed them")
        );
        // The flush opened the next window: one more inside it waits for its end.
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.record(at(1500)), None);
        assert_eq!(w.next_deadline(), Some(at(2000)));
        assert_eq!(
            w.flush(at(2003)).as_deref(),
            Some("1 TCP session offered a wrong token in the last 1.0s; closed it")
        );
        // A window that ends with nothing counted closes; the next one is logged at once.
        assert_eq!(w.flush(at(3003)), None);
        assert_eq!(w.next_deadline(), None);
        assert_eq!(
            w.record(at(9000)).as_deref(),
            Some("a TCP session offered a wrong token; closed it")
        );
    }

    #[test]
    fn a_late_flush_is_taken_by_the_next_wrong_token() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = WrongTokens::new();
        assert!(w.record(at(0)).is_some());
        assert_eq!(w.record(at(100)), None);
        assert_eq!(w.record(at(200)), None);
        // Nobody flushed at 1000: the next one logs the three of them.
        assert_eq!(
            w.record(at(2500)).as_deref(),
            Some("3 TCP sessions offered a wrong token in the last 2.5s; closed them")
        );
        assert_eq!(w.next_deadline(), None);
        assert_eq!(w.record(at(2600)), None);
        assert_eq!(w.next_deadline(), Some(at(3500)));
    }

    #[test]
    fn a_flood_logs_one_line_per_second() {
        let t0 = Instant::now();
        let mut w = WrongTokens::new();
        let mut lines = Vec::new();
        let mut total = 0;
        // 10,000 wrong tokens over 10 s, the master flushing whenever its deadline passed.
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            if w.next_deadline().is_some_and(|t| now >= t) {
                lines.extend(w.flush(now));
            }
            lines.extend(w.record(now));
        }
        lines.extend(w.flush(t0 + Duration::from_secs(11)));
        for line in &lines {
            total += line
                .split(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(1);
        }
        assert_eq!(total, 10_000);
        assert!(lines.len() <= 11, "{} lines: {lines:?}", lines.len());
    }

    #[test]
    fn a_line_buffer_says_what_it_holds_and_whether_a_line_is_ready() {
        let mut b = LineBuffer::new(8);
        assert_eq!((b.held(), b.has_line()), (0, false));
        b.push(b"stat");
        assert_eq!((b.held(), b.has_line()), (4, false));
        b.push(b"us\nhelp\n");
        assert_eq!((b.held(), b.has_line()), (12, true));
        assert_eq!(b.next_line(), Ok(Some("status".into())));
        assert_eq!((b.held(), b.has_line()), (5, true));
        assert_eq!(b.next_line(), Ok(Some("help".into())));
        assert_eq!((b.held(), b.has_line()), (0, false));
        // A line already past the limit has something to give: its error.
        b.push(b"123456789");
        assert!(b.has_line());
        assert_eq!(b.next_line(), Err(LineError::TooLong(8)));
        assert!(!b.has_line());
        // Exactly the limit and a CR may still be waiting for its LF.
        b.push(b"\n12345678\r");
        assert!(!b.has_line());
        b.push(b"\n");
        assert_eq!(b.next_line(), Ok(Some("12345678".into())));
    }

    #[test]
    fn a_session_is_read_and_served_only_while_its_client_keeps_up() {
        let flow = SessionFlow {
            closing: false,
            awaiting: false,
            unread_output: 0,
            held_input: 0,
            has_line: false,
        };
        assert!(flow.wants_input() && !flow.wants_turn());
        let ready = SessionFlow {
            has_line: true,
            held_input: 100,
            ..flow
        };
        assert!(ready.wants_input() && ready.wants_turn());
        // Holding enough unhandled input: served, not read.
        let full = SessionFlow {
            held_input: MAX_HELD_INPUT,
            ..ready
        };
        assert!(!full.wants_input() && full.wants_turn());
        // Not reading its replies: neither read nor served until they drain.
        let deaf = SessionFlow {
            unread_output: MAX_UNREAD_OUTPUT,
            ..ready
        };
        assert!(!deaf.wants_input() && !deaf.wants_turn());
        let drained = SessionFlow {
            unread_output: MAX_UNREAD_OUTPUT - 1,
            ..deaf
        };
        assert!(drained.wants_input() && drained.wants_turn());
        for stopped in [
            SessionFlow {
                closing: true,
                ..ready
            },
            SessionFlow {
                awaiting: true,
                ..ready
            },
        ] {
            assert!(
                !stopped.wants_input() && !stopped.wants_turn(),
                "{stopped:?}"
            );
        }
    }

    #[test]
    fn a_pass_gives_each_session_a_few_lines_and_all_of_them_a_bounded_number() {
        let mut budget = PassBudget::new();
        let mut turns = Vec::new();
        // Sessions that always use their whole turn.
        loop {
            let lines = budget.turn();
            if lines == 0 {
                break;
            }
            turns.push(lines);
            budget.spend(lines);
        }
        assert!(turns.iter().all(|&n| n <= LINES_PER_SESSION), "{turns:?}");
        assert_eq!(turns.iter().sum::<usize>(), LINES_PER_PASS);
        assert_eq!(turns.len(), LINES_PER_PASS.div_ceil(LINES_PER_SESSION));
        // A turn that used fewer leaves them to the next session.
        let mut budget = PassBudget::new();
        budget.spend(1);
        assert_eq!(budget.turn(), LINES_PER_SESSION);
        budget.spend(LINES_PER_PASS);
        assert_eq!(budget.turn(), 0);
    }

    #[test]
    fn a_session_times_out_unauthenticated_or_idle_but_not_while_it_waits() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let auth = CloseReason::NotAuthenticated(s(10));
        let idle = CloseReason::Idle(s(600));
        let deadline = |opened, active, authed, busy| {
            session_deadline(t0 + opened, t0 + active, authed, busy, s(10), s(600))
        };
        // Not authenticated: the sooner of the two.
        assert_eq!(deadline(s(0), s(5), false, false), Some((t0 + s(10), auth)));
        // Authenticated (or a Unix session): idle counts from its last activity.
        assert_eq!(deadline(s(0), s(5), true, false), Some((t0 + s(605), idle)));
        // Waiting for its reload: never idle; still bound to authenticate (it cannot be
        // waiting without having authenticated, but the rule does not depend on that).
        assert_eq!(deadline(s(0), s(5), true, true), None);
        assert_eq!(deadline(s(0), s(5), false, true), Some((t0 + s(10), auth)));
        // A timeout past Instant's range is no deadline rather than a panic.
        assert_eq!(
            session_deadline(t0, t0, true, false, s(10), Duration::MAX),
            None
        );
    }

    #[test]
    fn session_closes_are_logged_once_a_second_with_a_count() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let idle = CloseReason::Idle(Duration::from_secs(600));
        let mut c = SessionCloses::new();
        assert_eq!(
            c.record(at(0), idle).as_deref(),
            Some("closed an admin session: idle for 10m")
        );
        for i in 0..37 {
            assert_eq!(c.record(at(1 + i), idle), None);
        }
        assert_eq!(c.next_deadline(), Some(at(1000)));
        assert_eq!(
            c.flush(at(1000), idle).as_deref(),
            Some("closed 37 admin sessions in the last 1.0s: idle for 10m")
        );
        let auth = CloseReason::NotAuthenticated(Duration::from_millis(1500));
        let mut c = SessionCloses::new();
        assert_eq!(
            c.record(at(0), auth).as_deref(),
            Some("closed an admin session: not authenticated within 1s 500ms")
        );
    }
}
