//! `jobhost submit`: send one job, or one job per line of stdin, to a pool and print the
//! results.
//!
//! This module owns the command's arguments, choosing the transport (`--socket`, or a config
//! file: the master's `[server] socket`, or Redis directly when POOL is a `source = "redis"`
//! pool of that file), the output forms (plain and `--json`), the streaming pipeline (a window
//! of jobs in flight, a reorder buffer that prints results in input order as soon as they can
//! be, flushing as it goes), the progress bars (only on a terminal: jobs done for a stream,
//! the job's own progress for a single job), a single job's partial data (written to stdout
//! before its result) and the exit status (1 if any job failed or was rejected).
//!
//! It never loads a plugin or starts a master, never retries a job, never buffers more than
//! `--window` results, and never treats a closed stdout (`| head`) as an error. The wire
//! formats are the transports' business: [`crate::client`] (the job socket, framed as in
//! [`crate::protocol`]) and [`crate::redis_client`] (entries on the pool's stream, results on a
//! private reply stream). Both are driven through [`Transport`], so every output form, the
//! ordering, the window and the exit status are the same code for both.
//!
//! Streaming, in two threads, each with its half of the transport:
//! - the calling thread reads stdin, sends job `n` for line `n`, and writes its buffered
//!   submits out whenever it is about to block (on stdin, or on a full window);
//! - a receiver thread reads results as they complete, holds early ones in a reorder buffer,
//!   prints every result whose predecessors are all printed, and flushes stdout whenever it
//!   is about to wait (for the results, or for more input to be sent). If it stops early (a
//!   closed stdout, an error), it aborts its half so that a sender blocked against the
//!   master's back-pressure wakes up.
//!
//! Once both are done, whatever the outcome, the sender's half is finished (for Redis: the
//! reply stream is deleted).
//!
//! The window counts jobs sent whose results are not printed yet (waiting at the master or in
//! Redis, or held for ordering), so memory stays bounded even when one slow job holds up the
//! output.

use std::borrow::Cow;
use std::error::Error;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::num::NonZeroUsize;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

use crate::cli::EXIT_ERROR;
use crate::client::{Client, ClientError, ClientReceiver, ClientSender, JobResult, Received};
use crate::config::Config;
use crate::protocol::Status;
use crate::redis_client::{RedisReceiver, RedisSender, RedisSubmit, RedisSubmitError};

/// Buffer sizes for stdin and stdout.
const IO_BUFFER: usize = 64 << 10;

/// Submit jobs to a pool and print their results (see [`AFTER_HELP`]).
#[derive(clap::Args, Debug)]
#[command(
    group(clap::ArgGroup::new("master").required(true).args(["config", "socket"])),
    after_help = AFTER_HELP
)]
pub struct SubmitArgs {
    /// The config file: submit to its `[server] socket`, or, for a redis pool, to its stream.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The master's job socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The pool to submit to.
    #[arg(value_name = "POOL")]
    pub pool: String,
    /// One job's payload. Without it, every line of stdin is a job.
    #[arg(value_name = "PAYLOAD")]
    pub payload: Option<OsString>,
    /// One JSON object per result: {"id":N,"status":"ok","result":"..."} or
    /// {"id":N,"status":"failed"|"rejected","error":"..."}; always one line per result.
    #[arg(long)]
    pub json: bool,
    /// The most jobs sent whose results are not printed yet.
    #[arg(long, value_name = "N", default_value = "10000")]
    pub window: NonZeroUsize,
    /// The jobs run even if this command ends (is interrupted, killed, loses its connection)
    /// before they reach a worker; without it the master drops a gone client's queued jobs.
    /// Results are still printed while it runs. (A redis pool's jobs always outlive it.)
    #[arg(long)]
    pub detach: bool,
}

/// What `jobhost submit --help` says after the options.
pub const AFTER_HELP: &str = "\
With PAYLOAD: one job; its result is printed to stdout, or the error to stderr.
Without PAYLOAD: one job per line of stdin (the line without its \\n or \\r\\n; any bytes),
numbered 0, 1, 2, ...; one result per line of stdout, in input order, each printed as soon as
it and all before it are in. Plain output prints a result as it is (`ERROR: <message>` for a
failed job, `REJECTED: <reason>` for a rejected one), followed by a newline unless it already
ends with one: a result that contains newlines spans several lines. --json is the safe form.
A progress bar is drawn on stderr when it is a terminal: jobs done for a stream; for one job,
how far its plugin says it got (if it reports progress). One job's partial data, if its plugin
hands out any, is written to stdout as it comes, in order, before its result (with --json,
one {\"id\":0,\"data\":\"...\"} line each); nothing is added when stderr is not a terminal.
With -c FILE and a pool that has source = \"redis\" there, the jobs go to the pool's stream
directly (no master needed on this host); the results come back on a reply stream of this
process's own, deleted at the end.
Jobs still queued in the master when this command ends early (Ctrl-C, a kill, a lost
connection) are dropped there, unless they were sent with --detach.
Exit status: 1 if any job failed or was rejected (or on an error), 0 otherwise.";

/// Runs `jobhost submit`.
pub fn run(args: SubmitArgs) -> Result<ExitCode, Box<dyn Error>> {
    enum Target {
        Socket(PathBuf),
        Redis(Box<crate::config::RedisConfig>),
    }
    let target = match (&args.socket, &args.config) {
        (Some(socket), _) => Target::Socket(socket.clone()),
        (None, Some(config)) => {
            let config = Config::load(config)?;
            match config
                .pools
                .iter()
                .find(|p| p.name == args.pool)
                .and_then(|p| p.redis.clone())
            {
                Some(redis) => Target::Redis(Box::new(redis)),
                // A socket pool, or one the master does not know: it says so.
                None => Target::Socket(config.server.socket),
            }
        }
        (None, None) => return Err("give --config FILE or --socket PATH".into()),
    };
    let any_failed = match target {
        Target::Socket(path) => {
            // The message already names the cause: report it as one line.
            let client = Client::connect(&path).map_err(|e| e.to_string())?;
            submit(
                Socket {
                    client,
                    pool: args.pool.clone(),
                    detach: args.detach,
                },
                &args,
            )?
        }
        Target::Redis(cfg) => {
            let redis = RedisSubmit::connect(&cfg).map_err(|e| e.to_string())?;
            // Before any thread starts: Ctrl-C deletes the reply stream, then ends us as usual.
            redis
                .reply_stream()
                .delete_on_signals()
                .map_err(|e| format!("setting up signal handling: {e}"))?;
            submit(redis, &args)?
        }
    };
    Ok(if any_failed {
        ExitCode::from(EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// One job or a stream of them, per the arguments; whether any failed.
fn submit(transport: impl Transport, args: &SubmitArgs) -> Result<bool, Box<dyn Error>> {
    match &args.payload {
        Some(payload) => one_job(
            transport,
            payload.as_bytes(),
            args.json,
            io::stderr().is_terminal().then(job_bar),
            &mut io::stdout().lock(),
            &mut io::stderr().lock(),
        ),
        None => {
            let progress = io::stderr().is_terminal().then(progress_bar);
            let options = StreamOptions {
                json: args.json,
                window: args.window.get(),
                progress: progress.clone(),
            };
            let summary = stream_jobs(transport, io::stdin(), io::stdout(), &options);
            if let Some(progress) = &progress {
                match &summary {
                    Ok(s) if s.complete => progress.finish(),
                    _ => progress.abandon(),
                }
            }
            // A closed stdout (`| head`) is not an error: the reader went away on purpose.
            Ok(summary?.any_failed)
        }
    }
}

/// Why a transport could not send a job or deliver a result.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error(transparent)]
    Socket(#[from] ClientError),
    #[error(transparent)]
    Redis(#[from] RedisSubmitError),
}

impl TransportError {
    /// The far end closed on its own: the other half sees that too, no need to wake it.
    fn is_closed(&self) -> bool {
        matches!(self, TransportError::Socket(ClientError::Closed))
    }

    /// The receiving half stopped only because the sending half aborted it: the sender's
    /// error is the one to report.
    fn is_aborted(&self) -> bool {
        matches!(self, TransportError::Redis(RedisSubmitError::Aborted))
    }
}

/// How jobs reach a pool and results come back, in two halves for two threads.
pub(crate) trait Transport {
    type Sender: JobSender;
    type Receiver: JobReceiver + Send;
    fn split(self) -> (Self::Sender, Self::Receiver);
}

/// The sending half of a [`Transport`].
pub(crate) trait JobSender {
    /// Buffers job `id`; may write out what is buffered.
    fn send(&mut self, id: u64, payload: &[u8]) -> Result<(), TransportError>;
    /// Like `send`, asking for the job's progress and partial data where the transport can
    /// carry them (the job socket; Redis cannot: a plain send).
    fn send_watched(&mut self, id: u64, payload: &[u8]) -> Result<(), TransportError> {
        self.send(id, payload)
    }
    /// Writes out every buffered job.
    fn flush(&mut self) -> Result<(), TransportError>;
    /// Giving up: makes a [`JobReceiver::recv`] blocked on another thread return.
    fn abort(&self);
    /// Once the receiver is done, whatever the outcome: releases what the submit holds at the
    /// far end.
    fn finish(&mut self) -> Result<(), TransportError>;
}

/// The receiving half of a [`Transport`].
pub(crate) trait JobReceiver {
    /// The next result, in completion order; blocks until one arrives.
    fn recv(&mut self) -> Result<JobResult, TransportError>;
    /// The next result, or a watched job's progress or data; blocks until one arrives.
    fn recv_any(&mut self) -> Result<Received, TransportError> {
        self.recv().map(Received::Result)
    }
    /// True when `recv` would return without waiting.
    fn has_buffered(&self) -> bool;
    /// Giving up: makes a [`JobSender`] blocked on another thread return.
    fn abort(&self);
}

/// The master's job socket, submitting to `pool`.
pub(crate) struct Socket {
    pub client: Client,
    pub pool: String,
    /// `--detach`: every submit carries the DETACH flag.
    pub detach: bool,
}

pub(crate) struct SocketSender {
    sender: ClientSender,
    pool: String,
    /// The DETACH flag, or 0.
    flags: u8,
}

impl Transport for Socket {
    type Sender = SocketSender;
    type Receiver = ClientReceiver;
    fn split(self) -> (SocketSender, ClientReceiver) {
        let (sender, receiver) = self.client.split();
        (
            SocketSender {
                sender,
                pool: self.pool,
                flags: if self.detach {
                    crate::protocol::submit_flags::DETACH
                } else {
                    0
                },
            },
            receiver,
        )
    }
}

impl JobSender for SocketSender {
    fn send(&mut self, id: u64, payload: &[u8]) -> Result<(), TransportError> {
        Ok(self
            .sender
            .send_flagged(self.flags, id, &self.pool, payload)?)
    }
    fn send_watched(&mut self, id: u64, payload: &[u8]) -> Result<(), TransportError> {
        let flags = self.flags | crate::protocol::submit_flags::WATCH;
        Ok(self.sender.send_flagged(flags, id, &self.pool, payload)?)
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(self.sender.flush()?)
    }
    fn abort(&self) {
        let _ = self.sender.shutdown();
    }
    fn finish(&mut self) -> Result<(), TransportError> {
        // The master forgets a client when it closes: nothing to release.
        Ok(())
    }
}

impl JobReceiver for ClientReceiver {
    fn recv(&mut self) -> Result<JobResult, TransportError> {
        Ok(ClientReceiver::recv(self)?)
    }
    fn recv_any(&mut self) -> Result<Received, TransportError> {
        Ok(ClientReceiver::recv_any(self)?)
    }
    fn has_buffered(&self) -> bool {
        ClientReceiver::has_buffered(self)
    }
    fn abort(&self) {
        // Nobody reads results any more, so the master will stop reading our submits: wake
        // the sender if it is blocked writing them.
        let _ = self.shutdown();
    }
}

impl Transport for RedisSubmit {
    type Sender = RedisSender;
    type Receiver = RedisReceiver;
    fn split(self) -> (RedisSender, RedisReceiver) {
        RedisSubmit::split(self)
    }
}

impl JobSender for RedisSender {
    fn send(&mut self, id: u64, payload: &[u8]) -> Result<(), TransportError> {
        Ok(RedisSender::send(self, id, payload)?)
    }
    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(RedisSender::flush(self)?)
    }
    fn abort(&self) {
        RedisSender::abort(self)
    }
    fn finish(&mut self) -> Result<(), TransportError> {
        Ok(RedisSender::finish(self)?)
    }
}

impl JobReceiver for RedisReceiver {
    fn recv(&mut self) -> Result<JobResult, TransportError> {
        Ok(RedisReceiver::recv(self)?)
    }
    fn has_buffered(&self) -> bool {
        RedisReceiver::has_buffered(self)
    }
    fn abort(&self) {
        // Redis reads every XADD at once: a sender never waits for our reading.
    }
}

/// One job from the command line: its partial data, then its result to `out`, or the error
/// to `err` (with `--json`, either to `out`); its progress on `bar` (a terminal's). Returns
/// whether it failed or was rejected.
fn one_job(
    transport: impl Transport,
    payload: &[u8],
    json: bool,
    bar: Option<ProgressBar>,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<bool, Box<dyn Error>> {
    let (mut sender, mut receiver) = transport.split();
    // A closed stdout stops the data, not the job: its result (and exit status) still count.
    let mut out_closed = false;
    let mut call = || -> Result<JobResult, Box<dyn Error>> {
        sender.send_watched(0, payload)?;
        sender.flush()?;
        loop {
            match receiver.recv_any()? {
                Received::Result(result) if result.id == 0 => return Ok(result),
                Received::Progress {
                    id: 0,
                    numerator,
                    denominator,
                } => {
                    if let Some(bar) = &bar {
                        bar.set_length(denominator.max(numerator));
                        bar.set_position(numerator);
                    }
                }
                Received::Data { id: 0, data } if !out_closed => {
                    // Out of the bar's way, when both are on the terminal.
                    let mut write =
                        || write_data(&mut *out, &data, json).and_then(|()| out.flush());
                    let written = match &bar {
                        Some(bar) => bar.suspend(write),
                        None => write(),
                    };
                    match written {
                        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => out_closed = true,
                        Err(e) => return Err(format!("writing the job's data: {e}").into()),
                        Ok(()) => {}
                    }
                }
                _ => {}
            }
        }
    };
    let result = call();
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let finished = sender.finish();
    let result = result?;
    finished?;
    let written = match (json, result.status) {
        (true, _) | (false, Status::Ok) => {
            write_result(out, &result, json).and_then(|()| out.flush())
        }
        (false, Status::Failed) => {
            writeln!(err, "jobhost: job failed: {}", result.text().trim_end())
        }
        (false, Status::Rejected) => {
            writeln!(err, "jobhost: job rejected: {}", result.text().trim_end())
        }
    };
    match written {
        // A closed stdout (`| head -c 0`) is the reader's choice, not an error.
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(format!("writing the result: {e}").into())
        }
        _ => Ok(!result.is_ok()),
    }
}
/// Writes one result as one output record: plain (`ERROR: `/`REJECTED: ` before the body of a
/// failed/rejected job, a newline unless the body ends with one) or one line of JSON.
fn write_result(out: &mut impl Write, result: &JobResult, json: bool) -> io::Result<()> {
    if json {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            id: u64,
            status: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            result: Option<Cow<'a, str>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<Cow<'a, str>>,
        }
        let text = String::from_utf8_lossy(&result.body);
        let (result_text, error) = match result.status {
            Status::Ok => (Some(text), None),
            Status::Failed | Status::Rejected => (None, Some(text)),
        };
        let line = Line {
            id: result.id,
            status: result.status.as_str(),
            result: result_text,
            error,
        };
        serde_json::to_writer(&mut *out, &line).map_err(io::Error::from)?;
        return out.write_all(b"\n");
    }
    match result.status {
        Status::Ok => {}
        Status::Failed => out.write_all(b"ERROR: ")?,
        Status::Rejected => out.write_all(b"REJECTED: ")?,
    }
    out.write_all(&result.body)?;
    if !result.body.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// One piece of a job's partial data: as it is (plain), or one JSON line.
fn write_data(out: &mut impl Write, data: &[u8], json: bool) -> io::Result<()> {
    if json {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            id: u64,
            data: Cow<'a, str>,
        }
        let line = Line {
            id: 0,
            data: String::from_utf8_lossy(data),
        };
        serde_json::to_writer(&mut *out, &line).map_err(io::Error::from)?;
        return out.write_all(b"\n");
    }
    out.write_all(data)
}

/// A single job's bar, fed by its PROGRESS frames (a spinner until the first one).
fn job_bar() -> ProgressBar {
    let style = ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len}  {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::new(0);
    bar.set_style(style);
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

fn progress_bar() -> ProgressBar {
    let style = ProgressStyle::with_template("{spinner} {pos}/{len} jobs done  {rate}  {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} jobs/s", state.per_sec());
            },
        );
    let bar = ProgressBar::new(0);
    bar.set_style(style);
    bar
}

/// How to stream.
pub(crate) struct StreamOptions {
    pub json: bool,
    /// At least 1.
    pub window: usize,
    pub progress: Option<ProgressBar>,
}

/// How a stream ended (when it did not end with an error).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct StreamSummary {
    /// Jobs sent.
    pub submitted: u64,
    /// Results written out.
    pub printed: u64,
    /// A job failed or was rejected.
    pub any_failed: bool,
    /// The output was closed (EPIPE): the stream stopped early, quietly.
    pub stdout_closed: bool,
    /// Every line of input got its result printed.
    pub complete: bool,
}

/// Why a stream stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("{error} ({unanswered} of {submitted} jobs sent got no result)")]
    Transport {
        error: TransportError,
        unanswered: u64,
        submitted: u64,
    },
    #[error("reading stdin: {0}")]
    Input(io::Error),
    #[error("writing stdout: {0}")]
    Output(io::Error),
    #[error("got a result for job {0}, which was not waiting for one")]
    Unexpected(u64),
    /// Every result was handled, but what the submit held at the far end was not released.
    #[error("{0}")]
    Finish(TransportError),
}

/// What the two threads share.
#[derive(Debug, Default)]
struct Counts {
    /// Jobs handed to the sender (counted before the send, so a result never outruns it).
    submitted: u64,
    /// Results written to the output.
    printed: u64,
    /// The input is exhausted: `submitted` is final.
    input_done: bool,
    /// The receiver has stopped (finished, failed, or the output closed): stop sending.
    receiver_done: bool,
}

struct Shared {
    state: Mutex<Counts>,
    /// Signalled on every change of `state`.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // A panic in the other thread is re-raised at join; the counters stay meaningful.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Counts>) -> MutexGuard<'a, Counts> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// Results that arrived ahead of an earlier one, until they can be printed in order.
#[derive(Debug, Default)]
pub(crate) struct Reorder {
    /// The id printed next.
    next: u64,
    held: std::collections::HashMap<u64, JobResult>,
}

impl Reorder {
    /// Takes a result; Err(id) if that id was already printed or is already held.
    pub fn insert(&mut self, result: JobResult) -> Result<(), u64> {
        let id = result.id;
        if id < self.next || self.held.contains_key(&id) {
            return Err(id);
        }
        self.held.insert(id, result);
        Ok(())
    }

    /// The next result in order, if it is here.
    pub fn pop_ready(&mut self) -> Option<JobResult> {
        let result = self.held.remove(&self.next)?;
        self.next += 1;
        Some(result)
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// One job per line of `input`, results to `output` in input order. See the module doc.
pub(crate) fn stream_jobs<T: Transport, R: Read, W: Write + Send>(
    transport: T,
    input: R,
    output: W,
    options: &StreamOptions,
) -> Result<StreamSummary, StreamError> {
    let (mut sender, receiver) = transport.split();
    let shared = Shared {
        state: Mutex::new(Counts::default()),
        changed: Condvar::new(),
    };
    let shared = &shared;
    let mut input = BufReader::with_capacity(IO_BUFFER, input);
    let streamed = std::thread::scope(|scope| {
        let receiving = scope.spawn(move || {
            let mut receiver = receiver;
            let output = io::BufWriter::with_capacity(IO_BUFFER, output);
            let received = receive(&mut receiver, output, shared, options);
            if !matches!(&received, Ok(summary) if !summary.stdout_closed) {
                receiver.abort();
            }
            shared.update(|p| p.receiver_done = true);
            received
        });
        let sent = send_lines(&mut sender, &mut input, shared, options);
        let sent = match sent {
            // What was read before the bad read still gets its results.
            Err(SendError::Input(e)) => match sender.flush() {
                Ok(()) => Err(SendError::Input(e)),
                Err(error) => Err(SendError::Transport(error)),
            },
            other => other,
        };
        if let Err(SendError::Transport(e)) = &sent {
            if !e.is_closed() {
                // Wake the receiver: it may wait for results of jobs that were never sent.
                sender.abort();
            }
        }
        shared.update(|p| p.input_done = true);
        let received = match receiving.join() {
            Ok(received) => received,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let (submitted, printed) = {
            let p = shared.lock();
            (p.submitted, p.printed)
        };
        let transport_error = |error| StreamError::Transport {
            error,
            unanswered: submitted - printed,
            submitted,
        };
        match (sent, received) {
            // Results of the lines before a bad read were all printed: now report it.
            (Err(SendError::Input(e)), Ok(_)) => Err(StreamError::Input(e)),
            (_, Ok(mut summary)) if summary.stdout_closed => {
                summary.submitted = submitted;
                Ok(summary)
            }
            (Err(SendError::Transport(e)), Ok(_)) => Err(transport_error(e)),
            (Ok(()), Ok(mut summary)) => {
                summary.submitted = submitted;
                summary.complete = summary.printed == submitted;
                Ok(summary)
            }
            // The receiver stopped because the sender gave up: the sender's error is the cause.
            (Err(SendError::Transport(e)), Err(ReceiveError::Transport(r))) if r.is_aborted() => {
                Err(transport_error(e))
            }
            // Otherwise the receiver's error says more than the sender's broken pipe.
            (_, Err(ReceiveError::Transport(e))) => Err(transport_error(e)),
            (_, Err(ReceiveError::Output(e))) => Err(StreamError::Output(e)),
            (_, Err(ReceiveError::Unexpected(id))) => Err(StreamError::Unexpected(id)),
        }
    });
    // Both halves are done: nothing is sent or read after this.
    let finished = sender.finish();
    match (streamed, finished) {
        (Ok(_), Err(e)) => Err(StreamError::Finish(e)),
        (streamed, _) => streamed,
    }
}

enum SendError {
    Input(io::Error),
    Transport(TransportError),
}

/// The calling thread: lines in, submits out, within the window.
fn send_lines<R: Read>(
    sender: &mut impl JobSender,
    input: &mut BufReader<R>,
    shared: &Shared,
    options: &StreamOptions,
) -> Result<(), SendError> {
    let window = options.window.max(1) as u64;
    let mut line = Vec::new();
    let mut id = 0u64;
    loop {
        let more = read_line(input, &mut line, || sender.flush()).map_err(|e| match e {
            LineError::Input(e) => SendError::Input(e),
            LineError::Transport(e) => SendError::Transport(e),
        })?;
        if !more {
            return sender.flush().map_err(SendError::Transport);
        }
        {
            let mut p = shared.lock();
            if p.submitted - p.printed >= window && !p.receiver_done {
                drop(p);
                sender.flush().map_err(SendError::Transport)?;
                p = shared.lock();
                while p.submitted - p.printed >= window && !p.receiver_done {
                    p = shared.wait(p);
                }
            }
            if p.receiver_done {
                return Ok(());
            }
            p.submitted += 1;
        }
        shared.changed.notify_all();
        sender.send(id, &line).map_err(SendError::Transport)?;
        if let Some(progress) = &options.progress {
            progress.inc_length(1);
        }
        id += 1;
    }
}

enum LineError {
    Input(io::Error),
    Transport(TransportError),
}

/// Reads the next line into `line` (without "\n" or "\r\n"); false at the end of the input.
/// Calls `before_blocking` whenever the next read may block, i.e. nothing is buffered.
fn read_line<R: Read>(
    input: &mut BufReader<R>,
    line: &mut Vec<u8>,
    mut before_blocking: impl FnMut() -> Result<(), TransportError>,
) -> Result<bool, LineError> {
    line.clear();
    loop {
        if input.buffer().is_empty() {
            before_blocking().map_err(LineError::Transport)?;
        }
        let available = match input.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Input(e)),
        };
        if available.is_empty() {
            return Ok(!line.is_empty());
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(at) => {
                line.extend_from_slice(&available[..at]);
                input.consume(at + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(true);
            }
            None => {
                let n = available.len();
                line.extend_from_slice(available);
                input.consume(n);
            }
        }
    }
}

enum ReceiveError {
    Transport(TransportError),
    Output(io::Error),
    Unexpected(u64),
}

/// The receiver thread: results in, in-order output out. Stops when every submitted job has
/// its result printed and the input is done, or the output is closed.
fn receive<W: Write>(
    receiver: &mut impl JobReceiver,
    mut output: io::BufWriter<W>,
    shared: &Shared,
    options: &StreamOptions,
) -> Result<StreamSummary, ReceiveError> {
    let mut summary = StreamSummary::default();
    let mut reorder = Reorder::default();
    let mut received = 0u64;
    let output_error = |e: io::Error, summary: StreamSummary| {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Ok(StreamSummary {
                stdout_closed: true,
                ..summary
            })
        } else {
            Err(ReceiveError::Output(e))
        }
    };
    loop {
        if !receiver.has_buffered() {
            // About to block (for a line of input, or on the socket): let the reader of our
            // output see everything that is ready.
            if let Err(e) = flush(&mut output, options) {
                return output_error(e, summary);
            }
        }
        // Wait until a result is owed; finish when none is and none will be.
        {
            let mut p = shared.lock();
            while received == p.submitted && !p.input_done {
                p = shared.wait(p);
            }
            if received == p.submitted {
                break;
            }
        }
        let result = match receiver.recv() {
            Ok(result) => result,
            Err(e) => {
                // Keep what was printed before reporting the failure.
                let _ = flush(&mut output, options);
                return Err(ReceiveError::Transport(e));
            }
        };
        received += 1;
        if let Some(progress) = &options.progress {
            progress.set_position(received);
        }
        reorder.insert(result).map_err(ReceiveError::Unexpected)?;
        let before = summary.printed;
        while let Some(result) = reorder.pop_ready() {
            summary.any_failed |= !result.is_ok();
            if let Err(e) = write_result(&mut output, &result, options.json) {
                return output_error(e, summary);
            }
            summary.printed += 1;
        }
        if summary.printed != before {
            let printed = summary.printed;
            shared.update(|p| p.printed = printed);
        }
    }
    if let Err(e) = flush(&mut output, options) {
        return output_error(e, summary);
    }
    if reorder.held() > 0 {
        // Every job got an answer, yet some are not printable: ids the far end made up.
        return Err(ReceiveError::Unexpected(reorder.next));
    }
    Ok(summary)
}

/// Flushes the output, with the progress bar out of the way if one is drawn.
fn flush<W: Write>(output: &mut io::BufWriter<W>, options: &StreamOptions) -> io::Result<()> {
    match &options.progress {
        Some(progress) if !output.buffer().is_empty() => progress.suspend(|| output.flush()),
        _ => output.flush(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Read, Write};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::client::fake::{self, Server};

    fn options(window: usize, json: bool) -> StreamOptions {
        StreamOptions {
            json,
            window,
            progress: None,
        }
    }

    /// The socket transport to pool "p" of a fake master.
    fn socket(client: Client) -> Socket {
        Socket {
            client,
            pool: "p".into(),
            detach: false,
        }
    }

    fn result(id: u64) -> JobResult {
        JobResult {
            id,
            status: Status::Ok,
            body: id.to_string().into_bytes(),
        }
    }

    /// Answers in reversed batches of `batch`, and whatever it holds when the client pauses.
    fn reversed_batches(batch: usize) -> impl FnOnce(fake::Peer) + Send + 'static {
        move |mut peer| {
            peer.stream
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut held = Vec::new();
            loop {
                let event = peer.next_event();
                let end = matches!(event, fake::Event::End);
                let idle = matches!(event, fake::Event::Idle);
                if let fake::Event::Job(job) = event {
                    held.push(job);
                }
                if held.len() == batch || idle || end {
                    for job in held.drain(..).rev() {
                        peer.answer_echo(&job);
                    }
                }
                if end {
                    return;
                }
            }
        }
    }

    /// Answers whatever it holds (reversed) whenever the client pauses for 20 ms; records the
    /// most it held at once.
    fn answer_when_idle(
        max_seen: std::sync::Arc<Mutex<usize>>,
    ) -> impl FnOnce(fake::Peer) + Send + 'static {
        move |mut peer| {
            peer.stream
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut held = Vec::new();
            loop {
                let event = peer.next_event();
                if let fake::Event::Job(job) = event {
                    held.push(job);
                    let mut max = max_seen.lock().unwrap();
                    *max = (*max).max(held.len());
                    continue;
                }
                for job in held.drain(..).rev() {
                    peer.answer_echo(&job);
                }
                if let fake::Event::End = event {
                    return;
                }
            }
        }
    }

    #[test]
    fn reorder_releases_results_in_id_order() {
        let mut reorder = Reorder::default();
        reorder.insert(result(2)).unwrap();
        reorder.insert(result(1)).unwrap();
        assert_eq!(reorder.pop_ready(), None);
        reorder.insert(result(0)).unwrap();
        assert_eq!(reorder.insert(result(2)), Err(2), "a duplicate is refused");
        let ids: Vec<u64> = std::iter::from_fn(|| reorder.pop_ready())
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, [0, 1, 2]);
        assert_eq!(
            reorder.insert(result(1)),
            Err(1),
            "an id already printed is refused"
        );
        assert_eq!(reorder.held(), 0);
    }

    #[test]
    fn lines_become_jobs_and_results_come_out_in_input_order() {
        let server = Server::start(reversed_batches(7));
        let client = Client::connect(&server.path).unwrap();
        let mut input = Vec::new();
        for i in 0..100 {
            match i {
                10 => input.extend_from_slice(b"bad\n"),
                20 => input.extend_from_slice(b"rej\r\n"),
                30 => input.extend_from_slice(b"\n"),
                40 => input.extend_from_slice(b"bytes \xff\xfe\n"),
                _ => input.extend_from_slice(format!("line {i}\n").as_bytes()),
            }
        }
        input.extend_from_slice(b"last, no newline");
        let mut output = Vec::new();
        let summary = stream_jobs(
            socket(client),
            &input[..],
            &mut output,
            &options(1000, false),
        )
        .unwrap();
        server.join();
        assert_eq!(
            summary,
            StreamSummary {
                submitted: 101,
                printed: 101,
                any_failed: true,
                stdout_closed: false,
                complete: true
            }
        );
        let lines: Vec<&[u8]> = output.split(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), 102, "101 lines and the empty tail");
        assert_eq!(lines[0], b"line 0");
        assert_eq!(lines[9], b"line 9");
        assert_eq!(lines[10], b"ERROR: it was bad");
        assert_eq!(lines[20], b"REJECTED: queue full");
        assert_eq!(lines[30], b"");
        assert_eq!(lines[40], b"bytes \xff\xfe");
        assert_eq!(lines[99], b"line 99");
        assert_eq!(lines[100], b"last, no newline");
    }

    #[test]
    fn json_output_is_one_object_per_line() {
        let server = Server::start(reversed_batches(2));
        let client = Client::connect(&server.path).unwrap();
        let input = b"a\nbad\nrej\ntwo\\nlines \"quoted\"\n\xff\n";
        let mut output = Vec::new();
        let summary =
            stream_jobs(socket(client), &input[..], &mut output, &options(10, true)).unwrap();
        server.join();
        assert!(summary.any_failed && summary.complete);
        let text = String::from_utf8(output).unwrap();
        assert_eq!(
            text,
            concat!(
                "{\"id\":0,\"status\":\"ok\",\"result\":\"a\"}\n",
                "{\"id\":1,\"status\":\"failed\",\"error\":\"it was bad\"}\n",
                "{\"id\":2,\"status\":\"rejected\",\"error\":\"queue full\"}\n",
                "{\"id\":3,\"status\":\"ok\",\"result\":\"two\\\\nlines \\\"quoted\\\"\"}\n",
                "{\"id\":4,\"status\":\"ok\",\"result\":\"\u{fffd}\"}\n",
            )
        );
    }

    #[test]
    fn a_result_with_newlines_is_written_as_is_in_plain_output() {
        let mut out = Vec::new();
        let r = |status, body: &[u8]| JobResult {
            id: 0,
            status,
            body: body.to_vec(),
        };
        write_result(&mut out, &r(Status::Ok, b"a\nb"), false).unwrap();
        write_result(&mut out, &r(Status::Ok, b"ends\n"), false).unwrap();
        write_result(&mut out, &r(Status::Ok, b""), false).unwrap();
        write_result(&mut out, &r(Status::Failed, b"boom"), false).unwrap();
        assert_eq!(out, b"a\nb\nends\n\nERROR: boom\n");
        out.clear();
        write_result(&mut out, &r(Status::Ok, b"a\nb"), true).unwrap();
        assert_eq!(out, b"{\"id\":0,\"status\":\"ok\",\"result\":\"a\\nb\"}\n");
    }

    #[test]
    fn the_window_bounds_jobs_in_flight() {
        let max_seen = std::sync::Arc::new(Mutex::new(0));
        let server = Server::start(answer_when_idle(max_seen.clone()));
        let client = Client::connect(&server.path).unwrap();
        let input: Vec<u8> = (0..60)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let mut output = Vec::new();
        let summary =
            stream_jobs(socket(client), &input[..], &mut output, &options(5, false)).unwrap();
        server.join();
        assert_eq!(summary.printed, 60);
        let expect: Vec<u8> = (0..60)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        assert_eq!(output, expect);
        assert_eq!(
            *max_seen.lock().unwrap(),
            5,
            "the server held at most the window"
        );
    }

    /// Input from a channel: each received chunk is one read; a dropped sender is end of file.
    struct ChannelInput(mpsc::Receiver<Vec<u8>>, Vec<u8>);

    impl Read for ChannelInput {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1.is_empty() {
                match self.0.recv() {
                    Ok(chunk) => self.1 = chunk,
                    Err(_) => return Ok(0),
                }
            }
            let n = self.1.len().min(buf.len());
            buf[..n].copy_from_slice(&self.1[..n]);
            self.1.drain(..n);
            Ok(n)
        }
    }

    /// Output to a channel, one message per write.
    struct ChannelOutput(mpsc::Sender<Vec<u8>>);

    impl Write for ChannelOutput {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn collect_until(rx: &mpsc::Receiver<Vec<u8>>, want: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.len() < want.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => got.extend_from_slice(&chunk),
                Err(_) => panic!(
                    "waited for {:?}, got {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        got
    }

    #[test]
    fn results_stream_out_while_the_input_is_still_open() {
        let server = Server::start(fake::echo);
        let client = Client::connect(&server.path).unwrap();
        let (lines, input) = mpsc::channel();
        let (output, printed) = mpsc::channel();
        let running = std::thread::spawn(move || {
            stream_jobs(
                socket(client),
                ChannelInput(input, Vec::new()),
                ChannelOutput(output),
                &options(100, false),
            )
        });
        // A half line is held back; whole lines are sent and answered at once.
        lines.send(b"one\ntw".to_vec()).unwrap();
        assert_eq!(collect_until(&printed, b"one\n"), b"one\n");
        lines.send(b"o\nthree\n".to_vec()).unwrap();
        assert_eq!(collect_until(&printed, b"two\nthree\n"), b"two\nthree\n");
        drop(lines);
        let summary = running.join().unwrap().unwrap();
        assert_eq!((summary.printed, summary.complete), (3, true));
        server.join();
    }

    /// An output that takes `left` bytes, then fails with EPIPE.
    struct ClosingOutput {
        left: usize,
    }

    impl Write for ClosingOutput {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Endless input: "x\n" forever.
    struct Endless;

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            for pair in buf.chunks_mut(2) {
                pair[0] = b'x';
                if let Some(b) = pair.get_mut(1) {
                    *b = b'\n';
                }
            }
            Ok(buf.len() - buf.len() % 2)
        }
    }

    #[test]
    fn a_closed_output_ends_an_endless_stream_quietly() {
        let server = Server::start(fake::echo);
        let client = Client::connect(&server.path).unwrap();
        let summary = stream_jobs(
            socket(client),
            Endless,
            ClosingOutput { left: 10 },
            &options(50, false),
        )
        .unwrap();
        assert!(summary.stdout_closed);
        assert!(!summary.complete);
        assert!(summary.submitted <= summary.printed + 50, "{summary:?}");
        server.join();
    }

    /// An output that is slow to take its first write, then closed.
    struct SlowThenClosed(Duration);

    impl Write for SlowThenClosed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            std::thread::sleep(self.0);
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Endless input of long lines.
    struct EndlessLong;

    impl Read for EndlessLong {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(b'y');
            if let Some(last) = buf.last_mut() {
                *last = b'\n';
            }
            Ok(buf.len())
        }
    }

    #[test]
    fn a_closed_output_does_not_leave_the_sender_blocked_on_a_master_that_stopped_reading() {
        // While the output is slow, results pile up, the server blocks writing them and stops
        // reading, and the sender blocks writing submits (what the real master does past
        // 16 MiB of unread results). Then the output closes: the sender must be woken.
        let server = Server::start(fake::echo);
        let client = Client::connect(&server.path).unwrap();
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let output = SlowThenClosed(Duration::from_millis(300));
            let _ = done.send(stream_jobs(
                socket(client),
                EndlessLong,
                output,
                &options(1 << 20, false),
            ));
        });
        let summary = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the stream ended")
            .unwrap();
        assert!(summary.stdout_closed, "{summary:?}");
        server.join();
    }

    #[test]
    fn a_master_that_closes_midway_is_an_error_after_the_results_it_sent() {
        let server = Server::start(|mut peer| {
            for _ in 0..3 {
                let job = peer.next_submit().unwrap();
                peer.answer_echo(&job);
            }
        });
        let client = Client::connect(&server.path).unwrap();
        let input: Vec<u8> = (0..10)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        let mut output = Vec::new();
        let error = stream_jobs(
            socket(client),
            &input[..],
            &mut output,
            &options(100, false),
        )
        .unwrap_err();
        server.join();
        assert_eq!(output, b"0\n1\n2\n");
        assert_eq!(
            error.to_string(),
            "the master closed the connection (7 of 10 jobs sent got no result)"
        );
    }

    #[test]
    fn a_duplicate_answer_is_an_error() {
        let server = Server::start(|mut peer| {
            let job = peer.next_submit().unwrap();
            peer.answer_echo(&job);
            peer.answer_echo(&job);
            fake::echo(peer);
        });
        let client = Client::connect(&server.path).unwrap();
        let input = b"a\nb\n";
        let mut output = Vec::new();
        let error = stream_jobs(
            socket(client),
            &input[..],
            &mut output,
            &options(100, false),
        )
        .unwrap_err();
        assert!(matches!(error, StreamError::Unexpected(0)), "{error:?}");
        server.join();
    }

    #[test]
    fn one_job_prints_its_result_or_its_error() {
        let run = |payload: &[u8], json: bool| {
            let server = Server::start(fake::echo);
            let client = Client::connect(&server.path).unwrap();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let failed = one_job(socket(client), payload, json, None, &mut out, &mut err).unwrap();
            server.join();
            (
                failed,
                String::from_utf8(out).unwrap(),
                String::from_utf8(err).unwrap(),
            )
        };
        assert_eq!(run(b"hello", false), (false, "hello\n".into(), "".into()));
        assert_eq!(run(b"line\n", false), (false, "line\n".into(), "".into()));
        assert_eq!(
            run(b"bad", false),
            (true, "".into(), "jobhost: job failed: it was bad\n".into())
        );
        assert_eq!(
            run(b"rej", false),
            (
                true,
                "".into(),
                "jobhost: job rejected: queue full\n".into()
            )
        );
        assert_eq!(
            run(b"bad", true),
            (
                true,
                "{\"id\":0,\"status\":\"failed\",\"error\":\"it was bad\"}\n".into(),
                "".into()
            )
        );
    }

    #[test]
    fn a_hundred_thousand_lines_in_a_small_window() {
        let server = Server::start(reversed_batches(1000));
        let client = Client::connect(&server.path).unwrap();
        let n = 100_000;
        let input: Vec<u8> = (0..n).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        let mut output = Vec::new();
        let started = Instant::now();
        let summary = stream_jobs(
            socket(client),
            &input[..],
            &mut output,
            &options(3000, false),
        )
        .unwrap();
        let took = started.elapsed();
        server.join();
        assert_eq!(
            (summary.printed, summary.complete, summary.any_failed),
            (n, true, false)
        );
        assert_eq!(output, input);
        assert!(took < Duration::from_secs(20), "{n} jobs took {took:?}");
    }

    #[test]
    fn submit_args_need_exactly_one_of_config_and_socket() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            args: SubmitArgs,
        }
        let parsed =
            Cli::try_parse_from(["x", "--socket", "/s", "echo", "hi", "--window", "3"]).unwrap();
        assert_eq!(
            parsed.args.socket.as_deref(),
            Some(std::path::Path::new("/s"))
        );
        assert_eq!(
            parsed.args.payload.as_deref(),
            Some(std::ffi::OsStr::new("hi"))
        );
        assert_eq!(parsed.args.window.get(), 3);
        let parsed = Cli::try_parse_from(["x", "-c", "/c.toml", "echo"]).unwrap();
        assert_eq!(parsed.args.window.get(), 10000);
        assert!(parsed.args.payload.is_none() && !parsed.args.json);
        assert!(Cli::try_parse_from(["x", "echo"]).is_err(), "neither");
        assert!(
            Cli::try_parse_from(["x", "-c", "c", "--socket", "s", "echo"]).is_err(),
            "both"
        );
        assert!(Cli::try_parse_from(["x", "--socket", "s", "echo", "--window", "0"]).is_err());
    }

    /// An in-memory transport that echoes, like the Redis one in how it ends: a sender error
    /// aborts a receiver that would otherwise wait, and `finish` is counted (and may fail).
    mod memory {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{mpsc, Arc};
        use std::time::Duration;

        use super::*;

        pub struct Memory {
            pub finished: Arc<AtomicUsize>,
            pub finish_fails: bool,
        }

        pub struct Sender {
            jobs: mpsc::Sender<(u64, Vec<u8>)>,
            aborted: Arc<AtomicBool>,
            finished: Arc<AtomicUsize>,
            finish_fails: bool,
        }

        pub struct Receiver {
            jobs: mpsc::Receiver<(u64, Vec<u8>)>,
            aborted: Arc<AtomicBool>,
        }

        fn redis_error(doing: &'static str) -> TransportError {
            TransportError::Redis(RedisSubmitError::Command {
                url: "unix:///r.sock".into(),
                doing,
                error: redis::RedisError::from(io::Error::from(io::ErrorKind::BrokenPipe)),
            })
        }

        impl Transport for Memory {
            type Sender = Sender;
            type Receiver = Receiver;
            fn split(self) -> (Sender, Receiver) {
                let (tx, rx) = mpsc::channel();
                let aborted = Arc::new(AtomicBool::new(false));
                (
                    Sender {
                        jobs: tx,
                        aborted: aborted.clone(),
                        finished: self.finished,
                        finish_fails: self.finish_fails,
                    },
                    Receiver { jobs: rx, aborted },
                )
            }
        }

        impl JobSender for Sender {
            fn send(&mut self, id: u64, payload: &[u8]) -> Result<(), TransportError> {
                if payload == b"fail" {
                    return Err(redis_error("adding entries"));
                }
                let _ = self.jobs.send((id, payload.to_vec()));
                Ok(())
            }
            fn flush(&mut self) -> Result<(), TransportError> {
                Ok(())
            }
            fn abort(&self) {
                self.aborted.store(true, Ordering::SeqCst);
            }
            fn finish(&mut self) -> Result<(), TransportError> {
                self.finished.fetch_add(1, Ordering::SeqCst);
                if self.finish_fails {
                    return Err(redis_error("deleting the reply stream"));
                }
                Ok(())
            }
        }

        impl JobReceiver for Receiver {
            fn recv(&mut self) -> Result<JobResult, TransportError> {
                loop {
                    if let Ok((id, body)) = self.jobs.recv_timeout(Duration::from_millis(5)) {
                        return Ok(JobResult {
                            id,
                            status: Status::Ok,
                            body,
                        });
                    }
                    if self.aborted.load(Ordering::SeqCst) {
                        return Err(TransportError::Redis(RedisSubmitError::Aborted));
                    }
                }
            }
            fn has_buffered(&self) -> bool {
                false
            }
            fn abort(&self) {}
        }
    }

    fn memory(
        finish_fails: bool,
    ) -> (
        memory::Memory,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (
            memory::Memory {
                finished: finished.clone(),
                finish_fails,
            },
            finished,
        )
    }

    fn finishes(counter: &std::sync::atomic::AtomicUsize) -> usize {
        counter.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn a_failed_send_is_the_error_reported_not_the_receiver_it_woke() {
        let (transport, finished) = memory(false);
        let mut output = Vec::new();
        let error = stream_jobs(
            transport,
            &b"a\nb\nfail\nc\n"[..],
            &mut output,
            &options(100, false),
        )
        .unwrap_err();
        assert_eq!(output, b"a\nb\n");
        assert_eq!(
            error.to_string(),
            "Redis at unix:///r.sock: adding entries: broken pipe (1 of 3 jobs sent got no result)"
        );
        assert_eq!(finishes(&finished), 1, "finished once, after the error");
    }

    #[test]
    fn the_transport_is_finished_once_whatever_the_end() {
        // A complete stream.
        let (transport, finished) = memory(false);
        let mut output = Vec::new();
        let summary =
            stream_jobs(transport, &b"a\nb\n"[..], &mut output, &options(1, false)).unwrap();
        assert!(summary.complete);
        assert_eq!(finishes(&finished), 1);
        // A closed stdout.
        let (transport, finished) = memory(false);
        let summary = stream_jobs(
            transport,
            Endless,
            ClosingOutput { left: 4 },
            &options(10, false),
        )
        .unwrap();
        assert!(summary.stdout_closed);
        assert_eq!(finishes(&finished), 1);
        // One job from the command line.
        let (transport, finished) = memory(false);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(!one_job(transport, b"x", false, None, &mut out, &mut err).unwrap());
        assert_eq!((out.as_slice(), finishes(&finished)), (&b"x\n"[..], 1));
        let (transport, finished) = memory(false);
        assert!(one_job(transport, b"fail", false, None, &mut out, &mut err).is_err());
        assert_eq!(finishes(&finished), 1, "also when the send failed");
    }

    #[test]
    fn a_failed_finish_after_a_good_stream_is_an_error_with_every_result_printed() {
        let (transport, finished) = memory(true);
        let mut output = Vec::new();
        let error =
            stream_jobs(transport, &b"a\nb\n"[..], &mut output, &options(10, false)).unwrap_err();
        assert_eq!(output, b"a\nb\n");
        assert!(matches!(error, StreamError::Finish(_)), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with("Redis at unix:///r.sock: deleting the reply stream: "),
            "{error}"
        );
        assert_eq!(finishes(&finished), 1);
    }
}
