//! `jobhost top`: a live terminal view of a running master's pools and workers, for a person
//! on the machine without a browser; refreshes every `--interval` and quits on `q`.
//!
//! This module owns the command's arguments, the one admin connection it keeps open (asking
//! `status json` and `workers json` each refresh, with a short reply deadline, reconnecting
//! when it breaks), reading those two documents into its own lenient structs (only the
//! fields it shows; unknown fields are ignored and missing ones take defaults, so the master
//! may add fields), the screen as a pure function ([`render`]: unit-tested without a
//! terminal), and the terminal: raw mode through `nix::sys::termios`, the alternate screen and
//! the hidden cursor through plain ANSI escapes, restored on every way out — `q`, an error, a
//! signal (every catchable signal whose default is to end the process, [`ENDING_SIGNALS`],
//! comes through [`crate::signals`]' self-pipe and ends the loop), and a panic (a hook restores
//! the terminal before the message is printed). SIGTSTP (`kill -TSTP`; in raw mode Ctrl-Z is a
//! key, not a signal) gives the terminal back, stops, and takes it again on SIGCONT, as a
//! shell's job control expects; a SIGCONT after a plain SIGSTOP takes the terminal again too.
//!
//! One `poll` waits for the keyboard, the signal pipe and the admin socket, with a timeout to
//! the next refresh or the reply deadline: idle, it costs nothing, and `q` is read at once even
//! while the master does not answer. With `--once`, or when stdout is not a terminal, it
//! prints one frame as plain text (no escapes, nothing cut to a screen's size) and exits.
//!
//! Dependencies: the terminal's size comes from `console` (already built for `indicatif`'s
//! progress bars), whose `Term::size_checked` is the `TIOCGWINSZ` ioctl without an `unsafe`
//! block here; and its width functions count wide characters when cutting lines to the
//! screen. crossterm would do raw mode, the alternate screen and the size too, but what is
//! needed of it is a dozen lines of termios and four escape sequences, against a new crate
//! tree in the binary.
//!
//! It never sends the master anything but `status json` and `workers json` (it changes
//! nothing), never blocks on the master (the socket is non-blocking, connect included),
//! never writes a control character that came from the master to the terminal, and never
//! leaves the terminal raw or on the alternate screen when it exits.

use std::error::Error;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::termios::{self, SetArg, Termios};
use serde::Deserialize;

use crate::admin;
use crate::cli::EXIT_ERROR;
use crate::human::{self, duration, job_age, Align};
use crate::signals::SignalPipe;
use crate::view::{Pool, Status, Worker, WorkerList};

/// How long the master has to answer both questions of a refresh (a master that takes longer
/// is shown as not answering; the next refresh asks again on a new connection).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The shortest `--interval`.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The longest reply line accepted (as `jobhost ctl`: a `workers json` with many workers is
/// one long line), and the most bytes of lines one refresh's replies may hold together.
const MAX_REPLY_LINE: usize = 64 << 20;

/// The most lines one refresh's replies may hold (each of the two is one line of JSON and its
/// `OK`): a peer that keeps sending short lines is cut off, not kept in memory.
const MAX_REPLY_LINES: usize = 1024;

/// The most read from the socket before going back to `poll`: a peer that writes faster than
/// this reads does not keep the keyboard, the signals and the deadline waiting.
const READ_BURST: usize = 1 << 20;

/// The catchable signals whose default action ends the process: each ends the view with the
/// terminal restored (exit status 128 + its number). SIGPIPE is not among them: a closed
/// terminal is a failed write.
const ENDING_SIGNALS: [Signal; 13] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGVTALRM,
    Signal::SIGPROF,
    Signal::SIGIO,
    Signal::SIGPWR,
    Signal::SIGXCPU,
    Signal::SIGXFSZ,
];

/// What a refresh asks, in this order.
const QUESTIONS: &[u8] = b"status json\nworkers json\n";

/// A live view of a running master's pools and workers (q quits).
#[derive(clap::Args, Debug)]
#[command(
    group(clap::ArgGroup::new("master").required(true).args(["config", "socket"])),
    after_help = AFTER_HELP
)]
pub struct TopArgs {
    /// The master's config file: use its `[admin] socket`.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The master's admin socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// How often to refresh, e.g. `500ms`, `2s` (at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Print one frame as plain text to stdout and exit (what happens anyway when stdout is
    /// not a terminal).
    #[arg(long)]
    pub once: bool,
}

/// What `jobhost top --help` says after the options.
pub const AFTER_HELP: &str = "\
Keys: q, Q, Esc or Ctrl-C quit. The pools' JOBS/S is the change of done + failed between two
refreshes. A master that does not answer within 2s is shown as not answering (its last
figures dimmed) and asked again every interval.
With --once or a stdout that is not a terminal: one frame as plain text; exit status 1 if the
master did not answer.";

fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < MIN_INTERVAL {
        return Err(format!("must be at least 100ms, got {text}"));
    }
    Ok(d)
}

/// Why `jobhost top` stopped with an error (a master that does not answer is not one: it is
/// shown on the screen).
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("cannot catch signals: {0}")]
    Signals(Errno),
    #[error("cannot put the terminal in raw mode: {0}")]
    RawMode(Errno),
    #[error("cannot write to the terminal: {0}")]
    Output(io::Error),
    #[error("poll: {0}")]
    Poll(Errno),
}

/// Why a refresh got no figures: shown as "master not answering: …".
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no master at {} ({source})", path.display())]
    Connect { path: PathBuf, source: Errno },
    #[error("permission denied on {} (admin.socket_mode and admin.socket_group say who may)", path.display())]
    Denied { path: PathBuf },
    #[error("its admin socket takes no more connections")]
    Backlog,
    #[error("no reply within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("the master closed the connection")]
    Closed,
    #[error("a reply line over {MAX_REPLY_LINE} bytes")]
    LineTooLong,
    #[error("replies over {MAX_REPLY_LINES} lines or {MAX_REPLY_LINE} bytes")]
    TooMuch,
    #[error("admin socket: {0}")]
    Io(io::Error),
    #[error("`{command}` refused: {reason}")]
    Refused {
        command: &'static str,
        reason: String,
    },
    #[error("cannot read the reply to `{command}`: {detail}")]
    BadReply {
        command: &'static str,
        detail: String,
    },
}

/// One refresh's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub status: Status,
    pub workers: Vec<Worker>,
}

/// What one screen shows.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    /// The last figures the master gave, if it ever answered.
    pub figures: Option<Figures>,
    /// Why the last refresh got no figures (the figures above are then old).
    pub trouble: Option<String>,
    /// The wall-clock time to show, e.g. `18:04:48 UTC`.
    pub clock: String,
}

/// A screen's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub rows: usize,
    pub cols: usize,
}

impl Size {
    /// No limit: `--once`'s plain text is not cut.
    pub const UNLIMITED: Size = Size {
        rows: usize::MAX,
        cols: usize::MAX,
    };
}

/// How a frame is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Text only: `--once`, a pipe.
    Plain,
    /// For a terminal: bold headings, old figures dimmed, each line erased to its end.
    Ansi,
}

/// How a line looks on a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    Normal,
    Bold,
    Heading,
    Alert,
}

// The escapes used, all of them.
const ENTER_SCREEN: &str = "\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J";
const LEAVE_SCREEN: &str = "\x1b[?25h\x1b[?1049l";
const HOME: &str = "\x1b[H";
const ERASE_LINE_END: &str = "\x1b[K";
const ERASE_BELOW: &str = "\x1b[J";
const RESET: &str = "\x1b[0m";

/// The screen for `frame`, cut to `size`: lines separated by `\n` (no `\n` after the last).
/// `previous` is the status of the refresh before, for each pool's jobs per second.
pub fn render(frame: &Frame, previous: Option<&Status>, size: Size, style: Style) -> String {
    let stale = frame.trouble.is_some();
    let mut lines: Vec<(String, Look)> = Vec::new();
    let status = frame.figures.as_ref().map(|f| &f.status);
    let mut head = match status {
        Some(s) => format!(
            "jobhost {}  master pid {}  up {}  generation {}  {}",
            s.version,
            s.pid,
            s.uptime_secs.map_or_else(|| "?".to_owned(), duration),
            s.generation,
            frame.clock
        ),
        None => format!("jobhost top  {}", frame.clock),
    };
    if style == Style::Ansi {
        head.push_str("  (q quits)");
    }
    lines.push((head, Look::Bold));
    if let Some(trouble) = &frame.trouble {
        lines.push((format!("master not answering: {trouble}"), Look::Alert));
    }
    let Some(figures) = &frame.figures else {
        if !stale {
            lines.push(("asking the master…".to_owned(), Look::Normal));
        }
        return finish(lines, size, style, false);
    };
    let s = &figures.status;
    lines.push(match &s.last_reload {
        None => ("last reload: none".to_owned(), Look::Normal),
        Some(r) if r.ok => (
            with_message(format!("last reload: {} ok", r.at), &r.message),
            Look::Normal,
        ),
        Some(r) => (
            with_message(format!("last reload: {} FAILED", r.at), &r.message),
            Look::Alert,
        ),
    });

    use Align::{Left, Right};
    let pool_columns = [
        ("POOL", Left),
        ("STATE", Left),
        ("WORKERS", Right),
        ("BUSY", Right),
        ("QUEUED", Right),
        ("RUNNING", Right),
        ("DONE", Right),
        ("FAILED", Right),
        ("RETRIED", Right),
        ("JOBS/S", Right),
        ("CRASHES", Right),
        ("TIMEOUTS", Right),
    ];
    let pool_rows = s
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
                jobs_per_sec(p, s, previous).map_or_else(|| "-".to_owned(), rate),
                p.crashes.to_string(),
                p.timeouts.to_string(),
            ]
        })
        .collect();
    let mut workers: Vec<&Worker> = figures.workers.iter().collect();
    workers.sort_by(|a, b| a.pool.cmp(&b.pool).then(a.pid.cmp(&b.pid)));
    let worker_columns = [
        ("PID", Right),
        ("POOL", Left),
        ("GEN", Right),
        ("STATE", Left),
        ("JOB-AGE", Right),
        ("JOBS", Right),
        ("RSS-MiB", Right),
        ("OWN-MiB", Right),
        ("AGE", Right),
    ];
    let worker_rows = workers
        .iter()
        .map(|w| {
            vec![
                w.pid.to_string(),
                w.pool.clone(),
                w.generation.to_string(),
                w.state.clone(),
                w.job_age_secs.map_or_else(|| "-".to_owned(), job_age),
                w.jobs_done.to_string(),
                w.rss_bytes.map_or_else(|| "-".to_owned(), mib),
                w.own_bytes.map_or_else(|| "-".to_owned(), mib),
                w.age_secs.map_or_else(|| "-".to_owned(), duration),
            ]
        })
        .collect();

    // The pools come first; the workers get the rows left, and say how many did not fit.
    let pools = table(&pool_columns, pool_rows, size.cols);
    let room = size.rows.saturating_sub(lines.len() + 2); // a blank line, the header
    lines.push((String::new(), Look::Normal));
    lines.extend(section(pools, room, "pools"));
    let workers = table(&worker_columns, worker_rows, size.cols);
    let room = size.rows.saturating_sub(lines.len() + 2);
    if room > 0 {
        lines.push((String::new(), Look::Normal));
        lines.extend(section(workers, room, "workers"));
    } else if size.rows > lines.len() && workers.len() > 1 {
        lines.push((format!("… {} workers", workers.len() - 1), Look::Normal));
    }
    finish(lines, size, style, stale)
}

/// A table's header (first) and as many of its rows as `room` holds, the last one then
/// saying how many more there are.
fn section(table: Vec<String>, room: usize, what: &str) -> Vec<(String, Look)> {
    let mut lines = table.into_iter();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let rows: Vec<String> = lines.collect();
    let mut out = vec![(header, Look::Heading)];
    if rows.len() <= room {
        out.extend(rows.into_iter().map(|r| (r, Look::Normal)));
    } else if room > 0 {
        let shown = room - 1;
        let more = rows.len() - shown;
        out.extend(rows.into_iter().take(shown).map(|r| (r, Look::Normal)));
        let label = if shown == 0 { what } else { "more" };
        out.push((format!("… {more} {label}"), Look::Normal));
    }
    out
}

fn with_message(mut line: String, message: &str) -> String {
    if !message.is_empty() {
        line.push_str(": ");
        line.push_str(message);
    }
    line
}

/// Cuts the lines to the screen and styles them; `stale`: the figures are old (dimmed).
fn finish(lines: Vec<(String, Look)>, size: Size, style: Style, stale: bool) -> String {
    let mut out = String::new();
    for (i, (text, look)) in lines.into_iter().take(size.rows).enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let text = clean(&text);
        let text = console::truncate_str(&text, size.cols, "");
        if style == Style::Plain {
            out.push_str(text.trim_end());
            continue;
        }
        // The first line (the time, "q quits") and the alerts are not dimmed.
        let code = match (look, stale) {
            (Look::Alert | Look::Bold, _) => "\x1b[1m",
            (Look::Heading, false) => "\x1b[7m",
            (Look::Heading, true) => "\x1b[2;7m",
            (Look::Normal, false) => "",
            (Look::Normal, true) => "\x1b[2m",
        };
        out.push_str(code);
        out.push_str(&text);
        if !code.is_empty() {
            out.push_str(RESET);
        }
        // Erase what the last frame left to the right; not on a full line, where the cursor
        // waits past the last column and some terminals would erase that column instead.
        if console::measure_text_width(&text) < size.cols {
            out.push_str(ERASE_LINE_END);
        }
    }
    out
}

/// Text from the master with every control or invisible character shown as `?`
/// ([`admin::is_unsafe_to_show`]): a name or a reload
/// message cannot move the cursor or change the terminal.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if admin::is_unsafe_to_show(c) { '?' } else { c })
        .collect()
}

/// A table as lines (the header first), its cells shown with [`clean`], fitting `cols` if
/// one space between columns makes it fit.
fn table(columns: &[(&str, Align)], rows: Vec<Vec<String>>, cols: usize) -> Vec<String> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| clean(cell)).collect())
        .collect();
    human::table(columns, &rows, cols)
}

/// A pool's jobs finished (done or failed) per second since `previous`, by the master's own
/// uptime; none without a previous refresh of the same master, or if its counters went back.
fn jobs_per_sec(pool: &Pool, now: &Status, previous: Option<&Status>) -> Option<f64> {
    let before = previous?;
    if before.pid != now.pid {
        return None;
    }
    // Not positive, or NaN: no time to divide by.
    let elapsed = Some(now.uptime_secs? - before.uptime_secs?).filter(|e| *e > 0.0)?;
    let old = before.pools.iter().find(|p| p.name == pool.name)?;
    let finished = (pool.jobs_done.saturating_add(pool.jobs_failed))
        .checked_sub(old.jobs_done.saturating_add(old.jobs_failed))?;
    Some(finished as f64 / elapsed)
}

/// A rate: tenths under 10, whole numbers from there.
fn rate(per_sec: f64) -> String {
    if per_sec < 9.95 {
        format!("{per_sec:.1}")
    } else {
        format!("{per_sec:.0}")
    }
}

/// Bytes in MiB, with tenths.
fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// The time of day now, in UTC (no time zone database is read).
fn clock() -> String {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    // `2026-12-02T18:04:48Z`
    match now.get(11..19) {
        Some(time) => format!("{time} UTC"),
        None => now,
    }
}

// The admin connection.

/// The one admin connection, and the refresh being asked on it.
struct Fetcher {
    path: PathBuf,
    conn: Option<Conn>,
}

struct Conn {
    stream: UnixStream,
    /// Bytes read and not yet a whole line.
    unread: Vec<u8>,
    /// How much of `unread` holds no LF.
    scanned: usize,
    /// Bytes of the questions not written yet.
    unsent: Vec<u8>,
    asked: Option<Asked>,
}

/// A refresh waiting for its two replies.
struct Asked {
    deadline: Instant,
    /// The finished replies: their lines, or the `ERR` reason.
    replies: Vec<Result<Vec<String>, String>>,
    /// The lines of the reply being read.
    lines: Vec<String>,
    /// Lines and bytes taken so far, both replies together.
    taken_lines: usize,
    taken_bytes: usize,
}

impl Fetcher {
    fn new(path: PathBuf) -> Fetcher {
        Fetcher { path, conn: None }
    }

    /// True while a refresh waits for its replies.
    fn asking(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.asked.is_some())
    }

    fn deadline(&self) -> Option<Instant> {
        self.conn.as_ref()?.asked.as_ref().map(|a| a.deadline)
    }

    /// Asks for a refresh, connecting first if there is no connection.
    fn ask(&mut self, now: Instant) -> Result<(), FetchError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => Conn {
                stream: connect(&self.path)?,
                unread: Vec::new(),
                scanned: 0,
                unsent: Vec::new(),
                asked: None,
            },
        };
        conn.unsent.extend_from_slice(QUESTIONS);
        conn.asked = Some(Asked {
            deadline: now + REPLY_TIMEOUT,
            replies: Vec::new(),
            lines: Vec::new(),
            taken_lines: 0,
            taken_bytes: 0,
        });
        write_some(&mut conn)?;
        self.conn = Some(conn);
        Ok(())
    }

    /// What to poll the socket for, if there is one.
    fn interest(&self) -> Option<(BorrowedFd<'_>, PollFlags)> {
        let conn = self.conn.as_ref()?;
        let mut flags = PollFlags::POLLIN;
        if !conn.unsent.is_empty() {
            flags |= PollFlags::POLLOUT;
        }
        Some((conn.stream.as_fd(), flags))
    }

    /// The socket is ready: writes, reads, and gives the refresh's outcome once it has one.
    /// A broken connection is dropped (the next refresh connects again).
    fn on_ready(&mut self, ready: PollFlags) -> Option<Result<Figures, FetchError>> {
        let conn = self.conn.as_mut()?;
        let mut broken = None;
        if ready.contains(PollFlags::POLLOUT) {
            broken = write_some(conn).err();
        }
        if broken.is_none()
            && ready.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
        {
            broken = read_some(conn).err();
        }
        // Replies that came whole before a close still count.
        let replies = take_replies(conn);
        let asked = conn.asked.is_some();
        if let Some(e) = broken {
            self.conn = None;
            // Between refreshes, a close is the master ending an idle session: nothing to
            // report, the next refresh connects again.
            if replies.is_none() && asked {
                return Some(Err(e));
            }
        }
        replies.map(figures)
    }

    /// Past the reply deadline: gives up on this connection.
    fn on_time(&mut self, now: Instant) -> Option<Result<Figures, FetchError>> {
        if self.deadline().is_some_and(|d| now >= d) {
            // A late reply on this connection would be taken for the next refresh's.
            self.conn = None;
            return Some(Err(FetchError::Timeout(REPLY_TIMEOUT)));
        }
        None
    }

    /// One refresh, waiting for it (for `--once`).
    fn fetch(&mut self) -> Result<Figures, FetchError> {
        self.ask(Instant::now())?;
        loop {
            if let Some(outcome) = self.on_time(Instant::now()) {
                return outcome;
            }
            let ready = {
                // Asked and not answered: there is a connection and a deadline.
                let (Some(deadline), Some((fd, flags))) = (self.deadline(), self.interest()) else {
                    return Err(FetchError::Closed);
                };
                let mut fds = [PollFd::new(fd, flags)];
                match nix::poll::poll(&mut fds, timeout_until(deadline)) {
                    Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
                    Err(Errno::EINTR) => PollFlags::empty(),
                    Err(e) => return Err(FetchError::Io(e.into())),
                }
            };
            if !ready.is_empty() {
                if let Some(outcome) = self.on_ready(ready) {
                    return outcome;
                }
            }
        }
    }
}

/// A non-blocking connection to the admin socket (connect included: a master that accepts
/// nothing must not hold up the keyboard).
fn connect(path: &Path) -> Result<UnixStream, FetchError> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| FetchError::Io(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|source| FetchError::Connect {
        path: path.to_owned(),
        source,
    })?;
    match nix::sys::socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(UnixStream::from(fd)),
        Err(Errno::EACCES | Errno::EPERM) => Err(FetchError::Denied {
            path: path.to_owned(),
        }),
        // A Unix socket's non-blocking connect fails this way when its backlog is full.
        Err(Errno::EAGAIN) => Err(FetchError::Backlog),
        Err(source) => Err(FetchError::Connect {
            path: path.to_owned(),
            source,
        }),
    }
}

fn io_error(e: io::Error) -> FetchError {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => FetchError::Closed,
        _ => FetchError::Io(e),
    }
}

fn write_some(conn: &mut Conn) -> Result<(), FetchError> {
    while !conn.unsent.is_empty() {
        match (&conn.stream).write(&conn.unsent) {
            Ok(0) => return Err(FetchError::Closed),
            Ok(n) => {
                conn.unsent.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    Ok(())
}

/// Reads what is there (at most [`READ_BURST`] bytes; `poll` says when there is more), and
/// takes the whole lines into the refresh being asked.
fn read_some(conn: &mut Conn) -> Result<(), FetchError> {
    let mut buf = [0u8; 64 * 1024];
    let mut burst = 0;
    while burst < READ_BURST {
        match (&conn.stream).read(&mut buf) {
            Ok(0) => {
                take_lines(conn)?;
                return Err(FetchError::Closed);
            }
            Ok(n) => {
                burst += n;
                conn.unread.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
        take_lines(conn)?;
        if conn.unread.len() > MAX_REPLY_LINE {
            return Err(FetchError::LineTooLong);
        }
    }
    take_lines(conn)
}

fn take_lines(conn: &mut Conn) -> Result<(), FetchError> {
    while let Some(at) = conn.unread[conn.scanned..].iter().position(|&b| b == b'\n') {
        let end = conn.scanned + at;
        let mut raw: Vec<u8> = conn.unread.drain(..=end).collect();
        conn.scanned = 0;
        // Nothing asked (a master does not speak first): the line is dropped.
        let Some(asked) = conn.asked.as_mut() else {
            continue;
        };
        asked.taken_lines += 1;
        asked.taken_bytes += raw.len();
        if asked.taken_lines > MAX_REPLY_LINES || asked.taken_bytes > MAX_REPLY_LINE {
            return Err(FetchError::TooMuch);
        }
        raw.pop();
        if raw.last() == Some(&b'\r') {
            raw.pop();
        }
        let line = String::from_utf8_lossy(&raw).into_owned();
        if admin::is_final_line(&line) {
            let lines = std::mem::take(&mut asked.lines);
            asked.replies.push(match line.strip_prefix("ERR") {
                None => Ok(lines),
                Some(reason) => Err(reason.trim_start_matches(' ').to_owned()),
            });
        } else {
            asked.lines.push(line);
        }
    }
    conn.scanned = conn.unread.len();
    Ok(())
}

/// Both replies, once they are in (the refresh is then over).
fn take_replies(conn: &mut Conn) -> Option<Vec<Result<Vec<String>, String>>> {
    if conn.asked.as_ref()?.replies.len() < 2 {
        return None;
    }
    conn.asked.take().map(|a| a.replies)
}

/// The figures from the replies to `status json` and `workers json`.
fn figures(mut replies: Vec<Result<Vec<String>, String>>) -> Result<Figures, FetchError> {
    let workers = replies.pop();
    let status = replies.pop();
    let (Some(status), Some(workers)) = (status, workers) else {
        return Err(FetchError::Closed);
    };
    let status: Status = document(status, "status json")?;
    let list: WorkerList = document(workers, "workers json")?;
    Ok(Figures {
        status,
        workers: list.workers,
    })
}

fn document<T: for<'de> Deserialize<'de>>(
    reply: Result<Vec<String>, String>,
    command: &'static str,
) -> Result<T, FetchError> {
    let lines = reply.map_err(|reason| FetchError::Refused { command, reason })?;
    match lines.as_slice() {
        [doc] => serde_json::from_str(doc).map_err(|e| FetchError::BadReply {
            command,
            detail: e.to_string(),
        }),
        _ => Err(FetchError::BadReply {
            command,
            detail: format!("{} lines, not one line of JSON", lines.len()),
        }),
    }
}

/// A poll timeout reaching `deadline` (rounded up, so the wait does not end just before it
/// and spin).
fn timeout_until(deadline: Instant) -> PollTimeout {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_micros().div_ceil(1000);
    PollTimeout::try_from(ms.min(i32::MAX as u128)).unwrap_or(PollTimeout::MAX)
}

// The terminal.

/// The terminal's settings before raw mode, while `top` has it; taken back by whoever
/// restores first (the screen's drop, or the panic hook).
static SAVED: Mutex<Option<Saved>> = Mutex::new(None);

struct Saved {
    /// Before raw mode (none when stdin is not a terminal).
    termios: Option<Termios>,
}

/// Leaves the alternate screen, shows the cursor, and gives stdin its settings back. Once:
/// a second call finds nothing to restore.
fn restore_terminal() {
    let saved = match SAVED.lock() {
        Ok(mut saved) => saved.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    let Some(saved) = saved else {
        return;
    };
    let mut out = io::stdout();
    let _ = out.write_all(LEAVE_SCREEN.as_bytes());
    let _ = out.flush();
    if let Some(termios) = saved.termios {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &termios);
    }
}

/// The terminal while `top` draws on it; restored on drop.
struct Screen {
    out: io::Stdout,
    /// The settings before raw mode and the raw ones (none when stdin is not a terminal).
    termios: Option<(Termios, Termios)>,
}

impl Screen {
    fn enter(raw: bool) -> Result<Screen, TopError> {
        let termios = if raw {
            let before = termios::tcgetattr(io::stdin().as_fd()).map_err(TopError::RawMode)?;
            let mut settings = before.clone();
            // No echo, no line editing, bytes as they come (VMIN 1), Ctrl-C a byte like `q`,
            // and no output processing (frames end their lines with CR LF).
            termios::cfmakeraw(&mut settings);
            // TCSANOW, not TCSAFLUSH: a `q` typed before this is not thrown away.
            termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &settings)
                .map_err(TopError::RawMode)?;
            Some((before, settings))
        } else {
            None
        };
        let mut screen = Screen {
            out: io::stdout(),
            termios,
        };
        screen.save();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // First, so the message is printed on the normal screen, not on the one that is
            // about to be left.
            restore_terminal();
            previous(info);
        }));
        screen.write(ENTER_SCREEN)?;
        Ok(screen)
    }

    /// Leaves what [`restore_terminal`] needs to give the terminal back.
    fn save(&self) {
        let termios = self.termios.as_ref().map(|(before, _)| before.clone());
        match SAVED.lock() {
            Ok(mut saved) => *saved = Some(Saved { termios }),
            Err(poisoned) => *poisoned.into_inner() = Some(Saved { termios }),
        }
    }

    /// SIGTSTP: gives the terminal back and stops until SIGCONT, then takes it again.
    fn stop(&mut self) -> Result<(), TopError> {
        restore_terminal();
        // Stops here; SIGSTOP cannot be caught, so this returns once continued.
        let _ = nix::sys::signal::raise(Signal::SIGSTOP);
        self.take_again()
    }

    /// After a stop: the shell may have set the terminal back to cooked mode and drawn on it,
    /// so raw mode and the alternate screen are set again (from the settings of the start,
    /// never from what the terminal holds now) and the next paint draws the whole screen.
    fn take_again(&mut self) -> Result<(), TopError> {
        if let Some((_, raw)) = &self.termios {
            termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, raw)
                .map_err(TopError::RawMode)?;
        }
        self.save();
        self.write(ENTER_SCREEN)
    }

    fn write(&mut self, text: &str) -> Result<(), TopError> {
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(TopError::Output)
    }

    fn paint(&mut self, frame: &str) -> Result<(), TopError> {
        let mut text = String::with_capacity(frame.len() + 64);
        text.push_str(HOME);
        text.push_str(&frame.replace('\n', "\r\n"));
        text.push_str(ERASE_BELOW);
        self.write(&text)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// The size of the terminal on stdout; else `LINES` and `COLUMNS`; else 24×80.
fn screen_size() -> Size {
    if let Some((rows, cols)) = console::Term::stdout().size_checked() {
        return Size {
            rows: rows.into(),
            cols: cols.into(),
        };
    }
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
    };
    Size {
        rows: env("LINES").unwrap_or(24),
        cols: env("COLUMNS").unwrap_or(80),
    }
}

/// What the keys read mean.
#[derive(Debug, PartialEq, Eq)]
enum Keys {
    Quit,
    Nothing,
}

/// `q`, `Q`, Ctrl-C, or an Esc on its own (an Esc followed by more in the same read is a
/// key's escape sequence, such as an arrow's).
fn keys(bytes: &[u8]) -> Keys {
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'q' | b'Q' | 0x03 => return Keys::Quit,
            0x1b if i + 1 == bytes.len() => return Keys::Quit,
            _ => {}
        }
    }
    Keys::Nothing
}

// The command.

/// Runs `jobhost top`.
pub fn run(args: TopArgs) -> Result<ExitCode, Box<dyn Error>> {
    // `jobhost ctl`'s rules for finding the socket, from the same two options.
    let socket = crate::ctl::admin_socket(&crate::ctl::CtlArgs {
        config: args.config.clone(),
        socket: args.socket.clone(),
        json: false,
        command: Vec::new(),
    })?;
    let fetcher = Fetcher::new(socket);
    if args.once || !io::stdout().is_terminal() {
        return Ok(once(fetcher)?);
    }
    Ok(live(fetcher, args.interval)?)
}

/// One frame as plain text on stdout; exit status 1 if the master did not answer.
fn once(mut fetcher: Fetcher) -> Result<ExitCode, TopError> {
    let (figures, trouble) = match fetcher.fetch() {
        Ok(figures) => (Some(figures), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let failed = trouble.is_some();
    let frame = Frame {
        figures,
        trouble,
        clock: clock(),
    };
    let mut text = render(&frame, None, Size::UNLIMITED, Style::Plain);
    text.push('\n');
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `| head` closed it: the reader left on purpose.
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(TopError::Output(e)),
        _ => {}
    }
    Ok(if failed {
        ExitCode::from(EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// The live view, until a quit key (exit status 0) or one of [`ENDING_SIGNALS`] (128 + the
/// signal's number, as a shell reports a process killed by it).
fn live(mut fetcher: Fetcher, interval: Duration) -> Result<ExitCode, TopError> {
    let mut caught = ENDING_SIGNALS.to_vec();
    caught.extend([Signal::SIGWINCH, Signal::SIGTSTP, Signal::SIGCONT]);
    let signals = SignalPipe::install(&caught).map_err(TopError::Signals)?;
    let stdin = io::stdin();
    let keyboard_is_terminal = stdin.is_terminal();
    let mut screen = Screen::enter(keyboard_is_terminal)?;
    // False once stdin (not a terminal) reached its end: it is not polled any more.
    let mut stdin_open = true;
    let mut frame = Frame::default();
    let mut previous: Option<Status> = None;
    let mut next_refresh = Instant::now();
    let mut repaint = true;
    loop {
        let now = Instant::now();
        if !fetcher.asking() && now >= next_refresh {
            next_refresh = now + interval;
            if let Err(e) = fetcher.ask(now) {
                frame.trouble = Some(e.to_string());
                repaint = true;
            }
        }
        if let Some(outcome) = fetcher.on_time(now) {
            update(&mut frame, &mut previous, outcome);
            repaint = true;
        }
        if repaint {
            frame.clock = clock();
            let text = render(&frame, previous.as_ref(), screen_size(), Style::Ansi);
            screen.paint(&text)?;
            repaint = false;
        }

        let wake = fetcher.deadline().unwrap_or(next_refresh);
        let (signal_ready, stdin_ready, socket_ready) = {
            let mut fds = vec![PollFd::new(signals.fd(), PollFlags::POLLIN)];
            let stdin_at = stdin_open.then(|| {
                fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let socket_at = fetcher.interest().map(|(fd, flags)| {
                fds.push(PollFd::new(fd, flags));
                fds.len() - 1
            });
            match nix::poll::poll(&mut fds, timeout_until(wake)) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(TopError::Poll(e)),
            }
            let ready = |at: Option<usize>| {
                at.and_then(|i| fds[i].revents())
                    .unwrap_or(PollFlags::empty())
            };
            (ready(Some(0)), ready(stdin_at), ready(socket_at))
        };

        if !signal_ready.is_empty() {
            let delivered = signals.take_all();
            if let Some(code) = ended_by(&delivered) {
                return Ok(code);
            }
            if delivered.count(Signal::SIGTSTP) > 0 {
                screen.stop()?;
                // The SIGCONT that continued it is in the pipe (taken now, not again), and
                // maybe a SIGTERM sent while it was stopped.
                if let Some(code) = ended_by(&signals.take_all()) {
                    return Ok(code);
                }
                repaint = true;
            } else if delivered.count(Signal::SIGCONT) > 0 {
                screen.take_again()?;
                repaint = true;
            }
            if delivered.count(Signal::SIGWINCH) > 0 {
                repaint = true;
            }
        }
        if !stdin_ready.is_empty() {
            let mut buf = [0u8; 64];
            match stdin.lock().read(&mut buf) {
                Ok(n) if n > 0 => {
                    if keys(&buf[..n]) == Keys::Quit {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The terminal itself is gone (hung up): nobody is watching.
                _ if keyboard_is_terminal => return Ok(ExitCode::SUCCESS),
                // The end of a file or a pipe: no more keys, but SIGINT and SIGTERM still end
                // the view.
                _ => stdin_open = false,
            }
        }
        if !socket_ready.is_empty() {
            if let Some(outcome) = fetcher.on_ready(socket_ready) {
                update(&mut frame, &mut previous, outcome);
                repaint = true;
            }
        }
    }
}

/// The exit status for the first of [`ENDING_SIGNALS`] among `delivered`, if any.
fn ended_by(delivered: &crate::signals::Delivered) -> Option<ExitCode> {
    ENDING_SIGNALS
        .into_iter()
        .find(|&signal| delivered.count(signal) > 0)
        .map(|signal| ExitCode::from(128 + signal as u8))
}

/// A refresh's outcome into the frame: new figures (the old ones become `previous`, for the
/// rates), or the trouble (the old figures stay, shown as old).
fn update(frame: &mut Frame, previous: &mut Option<Status>, outcome: Result<Figures, FetchError>) {
    match outcome {
        Ok(figures) => {
            *previous = frame.figures.take().map(|f| f.status);
            frame.figures = Some(figures);
            frame.trouble = None;
        }
        Err(e) => frame.trouble = Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{PoolSnapshot, ReloadReport, Snapshot, WorkerSnapshot};
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn pool(name: &str, done: u64) -> PoolSnapshot {
        PoolSnapshot {
            name: name.to_owned(),
            plugin: "echo".to_owned(),
            plugin_version: "0.1.0".to_owned(),
            mode: "jobs".to_owned(),
            workers_wanted: 2,
            workers_running: 2,
            workers_busy: 1,
            jobs_queued: 17,
            jobs_running: 1,
            jobs_in_flight: 1,
            jobs_done: done,
            jobs_failed: 7,
            jobs_retried: 3,
            jobs_dropped: 0,
            crashes: 1,
            timeouts: 2,
            recycled: 40,
            stopped: 6,
            state: "ok".to_owned(),
            source: None,
        }
    }

    fn worker(pid: i32, pool: &str) -> WorkerSnapshot {
        WorkerSnapshot {
            pid,
            pool: pool.to_owned(),
            generation: 3,
            state: "busy".to_owned(),
            job_age_secs: Some(1.23),
            jobs_done: 61000,
            rss_bytes: Some(112 << 20),
            own_bytes: Some(13 << 20),
            started: "2026-11-23T01:00:00Z".to_owned(),
            age_secs: 302.0,
        }
    }

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
                ok: false,
                message: "pool echo: cannot load".to_owned(),
            }),
            pools: vec![pool("echo", 123456), pool("sleep", 0)],
            workers: vec![
                worker(4252, "sleep"),
                worker(4251, "echo"),
                worker(4250, "echo"),
            ],
            recent: Vec::new(),
        }
    }

    /// The master's own replies, as the fetcher reads them.
    fn figures_of(s: &Snapshot) -> Figures {
        let replies = [
            admin::render_status(s, true),
            admin::render_workers(s, true),
        ]
        .map(|reply| {
            let mut lines: Vec<String> = reply.lines().map(str::to_owned).collect();
            assert_eq!(lines.pop().as_deref(), Some("OK"));
            Ok(lines)
        });
        figures(replies.into()).unwrap()
    }

    fn plain(frame: &Frame, previous: Option<&Status>, size: Size) -> String {
        render(frame, previous, size, Style::Plain)
    }

    fn frame(figures: Figures) -> Frame {
        Frame {
            figures: Some(figures),
            trouble: None,
            clock: "18:04:48 UTC".to_owned(),
        }
    }

    /// The cells of the row starting with `first` in the table whose header starts with
    /// `header`.
    fn row<'a>(screen: &'a str, header: &str, first: &str) -> Vec<&'a str> {
        let mut lines = screen
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(header));
        lines.next().expect("the table");
        lines
            .take_while(|l| !l.is_empty())
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.first() == Some(&first))
            .unwrap_or_else(|| panic!("no row {first} in {screen}"))
    }

    #[test]
    fn reads_the_masters_documents() {
        let f = figures_of(&snapshot());
        assert_eq!(f.status.pid, 4242);
        assert_eq!(f.status.uptime_secs, Some(3725.4));
        assert_eq!(f.status.generation, 3);
        let reload = f.status.last_reload.as_ref().unwrap();
        assert!(!reload.ok);
        assert_eq!(reload.message, "pool echo: cannot load");
        let p = &f.status.pools[0];
        assert_eq!(
            (
                p.name.as_str(),
                p.state.as_str(),
                p.workers_running,
                p.workers_wanted
            ),
            ("echo", "ok", 2, 2)
        );
        assert_eq!(
            [
                p.workers_busy,
                p.jobs_queued,
                p.jobs_running,
                p.jobs_done,
                p.jobs_failed,
                p.jobs_retried,
                p.crashes,
                p.timeouts
            ],
            [1, 17, 1, 123456, 7, 3, 1, 2]
        );
        assert_eq!(f.workers.len(), 3);
        let w = &f.workers[0];
        assert_eq!((w.pid, w.pool.as_str(), w.generation), (4252, "sleep", 3));
        assert_eq!(w.own_bytes, Some(13 << 20), "workers json measures it");
        assert_eq!((w.job_age_secs, w.age_secs), (Some(1.23), Some(302.0)));

        // A NaN the master could not encode, fields it may add or drop.
        let mut s = snapshot();
        s.uptime_secs = f64::NAN;
        assert_eq!(figures_of(&s).status.uptime_secs, None);
        let status: Status =
            serde_json::from_str(r#"{"pid":7,"new_field":[1,2],"pools":[{"name":"a","x":1}]}"#)
                .unwrap();
        assert_eq!((status.pid, status.pools[0].name.as_str()), (7, "a"));
        assert_eq!(status.pools[0].jobs_done, 0);
    }

    #[test]
    fn bad_replies_are_named() {
        let e = figures(vec![Err("unknown command".into()), Ok(vec![])]).unwrap_err();
        assert_eq!(e.to_string(), "`status json` refused: unknown command");
        let e = figures(vec![Ok(vec!["{".into()]), Ok(vec![])]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read the reply to `status json`: "),
            "{e}"
        );
        let e = figures(vec![Ok(vec!["{}".into()]), Ok(vec![])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot read the reply to `workers json`: 0 lines, not one line of JSON"
        );
    }

    #[test]
    fn a_whole_frame_in_plain_text() {
        let screen = plain(&frame(figures_of(&snapshot())), None, Size::UNLIMITED);
        assert!(!screen.contains('\x1b'), "{screen}");
        let mut lines = screen.lines();
        assert_eq!(
            lines.next(),
            Some("jobhost 0.1.0  master pid 4242  up 1h02m  generation 3  18:04:48 UTC")
        );
        assert_eq!(
            lines.next(),
            Some("last reload: 2026-11-23T01:02:03Z FAILED: pool echo: cannot load")
        );
        assert_eq!(lines.next(), Some(""));
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            [
                "POOL", "STATE", "WORKERS", "BUSY", "QUEUED", "RUNNING", "DONE", "FAILED",
                "RETRIED", "JOBS/S", "CRASHES", "TIMEOUTS"
            ]
        );
        assert_eq!(
            row(&screen, "POOL", "echo"),
            ["echo", "ok", "2/2", "1", "17", "1", "123456", "7", "3", "-", "1", "2"]
        );
        assert_eq!(row(&screen, "POOL", "sleep")[6], "0");
        assert_eq!(
            row(&screen, "PID", "4250"),
            ["4250", "echo", "3", "busy", "1.2s", "61000", "112.0", "13.0", "5m02s"]
        );
        // By pool, then by pid.
        let pids: Vec<&str> = screen
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("PID"))
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(pids, ["4250", "4251", "4252"]);
        assert!(!screen.ends_with('\n'));
    }

    #[test]
    fn jobs_per_second_from_the_refresh_before() {
        let before = figures_of(&snapshot());
        let mut s = snapshot();
        s.uptime_secs += 2.0;
        s.pools[0].jobs_done += 99;
        s.pools[0].jobs_failed += 1;
        s.pools[1].jobs_done += 1;
        let now = figures_of(&s);
        let screen = plain(&frame(now.clone()), Some(&before.status), Size::UNLIMITED);
        assert_eq!(row(&screen, "POOL", "echo")[9], "50");
        assert_eq!(row(&screen, "POOL", "sleep")[9], "0.5");

        // Another master (restarted), no time passed, no uptime: no rate.
        let restarted = Status {
            pid: 1,
            ..before.status.clone()
        };
        let same_time = Status {
            uptime_secs: now.status.uptime_secs,
            ..before.status.clone()
        };
        let no_uptime = Status {
            uptime_secs: None,
            ..before.status.clone()
        };
        for earlier in [restarted, same_time, no_uptime] {
            let screen = plain(&frame(now.clone()), Some(&earlier), Size::UNLIMITED);
            assert_eq!(row(&screen, "POOL", "echo")[9], "-", "{earlier:?}");
        }
        // A counter that went back: no rate for that pool only.
        let mut gone_back = before.status.clone();
        gone_back.pools[0].jobs_done = u64::MAX / 2;
        let screen = plain(&frame(now.clone()), Some(&gone_back), Size::UNLIMITED);
        assert_eq!(row(&screen, "POOL", "echo")[9], "-");
        assert_eq!(row(&screen, "POOL", "sleep")[9], "0.5");
    }

    #[test]
    fn fits_the_screen() {
        let mut s = snapshot();
        s.workers = (0..50).map(|i| worker(5000 + i, "echo")).collect();
        let f = frame(figures_of(&s));
        let size = Size { rows: 12, cols: 40 };
        let screen = plain(&f, None, size);
        let lines: Vec<&str> = screen.lines().collect();
        assert_eq!(lines.len(), 12, "{screen}");
        assert!(lines.iter().all(|l| l.chars().count() <= 40), "{screen}");
        // 2 lines, a blank, the pools' header and 2 pools, a blank, the workers' header,
        // 3 workers and the rest counted.
        assert_eq!(lines[11], "… 47 more");
        assert!(lines[10].trim_start().starts_with("5002"), "{screen}");

        // Too few rows for any worker: they are counted on one line.
        let screen = plain(&f, None, Size { rows: 8, cols: 200 });
        assert_eq!(screen.lines().last(), Some("… 50 workers"), "{screen}");
        let screen = plain(&f, None, Size { rows: 9, cols: 200 });
        assert_eq!(screen.lines().count(), 9, "{screen}");

        // Wide enough: everything, columns two spaces apart; else one.
        let screen = plain(
            &f,
            None,
            Size {
                rows: 100,
                cols: 200,
            },
        );
        assert_eq!(screen.lines().count(), 58, "{screen}");
        assert!(screen.contains("WORKERS  BUSY"), "{screen}");
        let screen = plain(
            &f,
            None,
            Size {
                rows: 100,
                cols: 80,
            },
        );
        assert!(screen.contains("WORKERS BUSY"), "{screen}");
        assert!(screen.lines().all(|l| l.chars().count() <= 80));

        // A tiny screen still draws something, and nothing past it.
        let screen = plain(&f, None, Size { rows: 1, cols: 10 });
        assert_eq!(screen, "jobhost 0.");
    }

    #[test]
    fn not_answering() {
        // Never answered: the reason alone.
        let f = Frame {
            figures: None,
            trouble: Some("no master at /run/a.sock (ECONNREFUSED)".into()),
            clock: "18:04:48 UTC".into(),
        };
        assert_eq!(
            plain(&f, None, Size::UNLIMITED),
            "jobhost top  18:04:48 UTC\nmaster not answering: no master at /run/a.sock (ECONNREFUSED)"
        );
        // Answered before: the old figures stay, dimmed on a terminal.
        let mut f = frame(figures_of(&snapshot()));
        f.trouble = Some("no reply within 2s".into());
        let screen = render(
            &f,
            None,
            Size {
                rows: 40,
                cols: 120,
            },
            Style::Ansi,
        );
        let lines: Vec<&str> = screen.split('\n').collect();
        assert!(lines[0].starts_with("\x1b[1mjobhost 0.1.0"), "{screen:?}");
        assert!(lines[0].contains("(q quits)"));
        assert_eq!(
            lines[1],
            "\x1b[1mmaster not answering: no reply within 2s\x1b[0m\x1b[K"
        );
        let echo = lines.iter().find(|l| l.contains("2/2")).unwrap();
        assert!(echo.starts_with("\x1b[2m"), "{echo:?}");
        assert!(screen.contains("\x1b[2;7mPOOL"), "{screen:?}");
        // Fresh again: not dimmed.
        f.trouble = None;
        let screen = render(
            &f,
            None,
            Size {
                rows: 40,
                cols: 120,
            },
            Style::Ansi,
        );
        assert!(
            !screen.contains("\x1b[2m") && !screen.contains("\x1b[2;"),
            "{screen:?}"
        );
        assert!(screen.contains("\x1b[7mPOOL"), "{screen:?}");
    }

    #[test]
    fn nothing_from_the_master_reaches_the_terminal_as_a_control() {
        let mut s = snapshot();
        s.pools[0].name = "ev\x1b[2Jil".into();
        s.last_reload.as_mut().unwrap().message = "line\none\x07".into();
        let screen = render(&frame(figures_of(&s)), None, Size::UNLIMITED, Style::Ansi);
        assert!(screen.contains("ev?[2Jil"), "{screen:?}");
        assert!(screen.contains("line?one?"), "{screen:?}");
        assert!(!screen.contains("\x1b[2J") && !screen.contains('\x07'));
        // Invisible characters that reorder or hide text are not shown as they are either.
        s.pools[0].name = "a\u{202e}b\u{200b}c\u{2028}d".into();
        let screen = render(&frame(figures_of(&s)), None, Size::UNLIMITED, Style::Ansi);
        assert!(screen.contains("a?b?c?d"), "{screen:?}");
    }

    #[test]
    fn quit_keys() {
        for quit in [&b"q"[..], b"Q", b"\x03", b"\x1b", b"xq", b"\x1b[A\x1b"] {
            assert_eq!(keys(quit), Keys::Quit, "{quit:?}");
        }
        for other in [&b"x"[..], b"\x1b[A", b"\x1bOB", b" ", b"\r"] {
            assert_eq!(keys(other), Keys::Nothing, "{other:?}");
        }
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("100ms"), Ok(Duration::from_millis(100)));
        assert!(parse_interval("99ms")
            .unwrap_err()
            .contains("at least 100ms"));
        assert!(parse_interval("soon").is_err());
    }

    /// A fake master answering each line it reads with `answer(line)`, until `lines` were read.
    fn fake_master(
        path: &Path,
        lines: usize,
        answer: fn(&str) -> Option<String>,
    ) -> thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(&stream);
            let mut got = Vec::new();
            for _ in 0..lines {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                let line = line.trim_end().to_owned();
                if let Some(reply) = answer(&line) {
                    (&stream).write_all(reply.as_bytes()).unwrap();
                }
                got.push(line);
            }
            // Hold the connection until the client has read what it wanted.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            got
        })
    }

    #[test]
    fn one_refresh_on_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let master = fake_master(&path, 4, |line| {
            Some(match line {
                "status json" => admin::render_status(&snapshot(), true),
                // CRLF ends a line too.
                "workers json" => admin::render_workers(&snapshot(), true).replace('\n', "\r\n"),
                _ => admin::err_reply("unexpected"),
            })
        });
        let mut fetcher = Fetcher::new(path);
        let f = fetcher.fetch().unwrap();
        assert_eq!(f, figures_of(&snapshot()));
        // The next refresh asks on the same connection.
        assert_eq!(fetcher.fetch().unwrap(), f);
        drop(fetcher);
        assert_eq!(
            master.join().unwrap(),
            ["status json", "workers json", "status json", "workers json"]
        );
    }

    #[test]
    fn refusal_silence_and_a_close() {
        let dir = tempfile::tempdir().unwrap();

        let path = dir.path().join("refuses.sock");
        let master = fake_master(&path, 2, |_| Some(admin::err_reply("not today")));
        let e = Fetcher::new(path).fetch().unwrap_err();
        assert_eq!(e.to_string(), "`status json` refused: not today");
        master.join().unwrap();

        // Answers one of the two, then nothing: the deadline, not a hang.
        let path = dir.path().join("silent.sock");
        let master = fake_master(&path, 2, |line| {
            (line == "status json").then(|| admin::render_status(&snapshot(), true))
        });
        let started = Instant::now();
        let e = Fetcher::new(path).fetch().unwrap_err();
        assert!(matches!(e, FetchError::Timeout(_)), "{e:?}");
        assert_eq!(e.to_string(), "no reply within 2s");
        assert!(started.elapsed() >= REPLY_TIMEOUT);
        master.join().unwrap();

        // Closes in the middle of a reply.
        let path = dir.path().join("closes.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let master = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"{\"pid\":1}\nO").unwrap();
        });
        let e = Fetcher::new(path.clone()).fetch().unwrap_err();
        assert!(matches!(e, FetchError::Closed), "{e:?}");
        master.join().unwrap();

        // The socket file of a master that died: nothing listens on it.
        std::fs::remove_file(&path).unwrap();
        drop(UnixListener::bind(&path).unwrap());
        let e = Fetcher::new(path.clone()).fetch().unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("no master at {} (", path.display())),
            "{shown}"
        );
    }

    #[test]
    fn a_flood_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        // Endless short lines: cut off by the line count, not kept.
        let path = dir.path().join("lines.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let master = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let lines = "x\n".repeat(4096);
            while stream.write_all(lines.as_bytes()).is_ok() {}
        });
        let e = Fetcher::new(path).fetch().unwrap_err();
        assert!(matches!(e, FetchError::TooMuch), "{e:?}");
        master.join().unwrap();

        // One endless line, written as fast as it can be: cut off by its length.
        let path = dir.path().join("line.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let master = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let chunk = vec![b'x'; 1 << 16];
            while stream.write_all(&chunk).is_ok() {}
        });
        let e = Fetcher::new(path).fetch().unwrap_err();
        assert!(
            matches!(e, FetchError::LineTooLong | FetchError::Timeout(_)),
            "{e:?}"
        );
        master.join().unwrap();
    }
}
