//! `jobhost http-serve`: the status child. The master binds `[admin] http`, and runs this
//! (`/proc/self/exe http-serve`) in its own process group with the listening socket on stdin,
//! an already authenticated admin session on stdout (whose first line is the token), and its
//! own stderr. The child serves `/metrics` (OpenMetrics or Prometheus text, by
//! `Accept`), the status page `/` with its `/page.js` and `/page.css`, and `/status.json`, all
//! from what the master answers on that session ([`link`]).
//!
//! Every route wants the token: `Authorization: Bearer TOKEN`, or `Basic` with the token as
//! the password (any user name), so that a browser's login prompt, or a URL like
//! `http://u:TOKEN@host:port/`, works; otherwise 401 with a `Basic` challenge. A page loaded
//! with the token sets an `HttpOnly; SameSite=Strict` session cookie (derived from the token,
//! [`request::session_cookie`]) that the page's script's fetches authenticate with: a page
//! whose URL holds credentials cannot `fetch()` by a relative URL at all in Chromium, and an
//! absolute URL without them gets no `Authorization` header.
//!
//! It exists so that HTTP stays out of the master's way: a malformed request meets this
//! process, never the master's loop. So everything here is bounded: a request head of at most
//! [`request::MAX_HEAD`] bytes read within [`HEAD_DEADLINE`], a reply written within
//! [`WRITE_DEADLINE`], at most [`MAX_CONNECTIONS`] connections at a time (one thread each;
//! beyond them a 503 at once, nothing queued), one admin exchange at a time with replies
//! cached for a second; every reply closes its connection.
//!
//! It never writes to stdout (the admin session: fd 1 is `/dev/null` once taken), never writes
//! more than a rate-limited line now and then to stderr, never exits or panics because of a
//! request, and exits 0 when the admin session ends (the master is gone or closed it) and 1
//! when it cannot start.

mod link;
mod page;
mod request;

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use link::{Answer, Closed, Command, LinkError, MasterLink};
use request::{Auth, Head, HeadError, Method, Route};

/// The most connections served at once (a thread each).
pub const MAX_CONNECTIONS: usize = 32;

/// How long a client has to send its whole request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);

/// How long a client has to take the whole reply.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// After the reply, how long (and how many bytes) the child reads what the client still sends,
/// so that closing with unread input (which resets the connection) does not destroy the reply
/// before the client read it. A client that reads its reply closes at once; one that does not
/// holds its slot this long at most (a client too slow to send its head is not lingered for).
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;

/// A connection thread's stack: it parses one head and renders one page.
const THREAD_STACK: usize = 512 * 1024;

/// How often a line goes to the master's stderr at most.
const COMPLAIN_EVERY: Duration = Duration::from_secs(10);

/// The longest token line the master may send first on the session.
const MAX_TOKEN_LINE: usize = 64 * 1024;

/// Served with every reply: nothing from elsewhere, no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Why the child could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("stdin is not a listening TCP socket: {0}")]
    Listener(io::Error),
    #[error("stdout is not the admin session (a Unix socket): {0}")]
    Session(io::Error),
    #[error("the admin session did not start with the token line")]
    NoToken,
    #[error("cannot start: {0}")]
    Start(io::Error),
    #[error("cannot accept connections: {0}")]
    Accept(io::Error),
}

/// `jobhost http-serve`. Returns only if it cannot start or serve (exit status 1); at the end
/// of the admin session the reader thread exits the process with status 0.
pub fn serve() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&e);
            ExitCode::from(crate::cli::EXIT_ERROR)
        }
    }
}

fn run() -> Result<(), HttpError> {
    confine()?;
    let listener = take_listener()?;
    let session = take_session()?;
    let token = read_token(&session)?;
    let link = MasterLink::start(session, |closed| match closed {
        // Exiting from the reader thread is the point: nothing else of this process matters
        // once the master stopped listening.
        Closed::Eof => std::process::exit(0),
        other => {
            say(&format_args!("{other}; exiting"));
            std::process::exit(1)
        }
    })
    .map_err(HttpError::Start)?;
    accept_loop(&listener, &Arc::new(Server::new(link, token)))
}

/// Before anything else: no descriptor but 0, 1 and 2 (the master's are close-on-exec, but
/// whatever the master itself inherited without that flag would be here too); not dumpable,
/// so that a process of the same user — a worker runs plugin code as the same `host.user` —
/// can neither read this one's memory (the token) nor ptrace it; and killed with the master.
fn confine() -> Result<(), HttpError> {
    // SAFETY: close_range(2) on every descriptor from 3 up, first thing in a freshly exec'd,
    // single-threaded process: nothing in it holds or will use any of them (the listener and
    // the session are fds 0 and 1, taken only after this).
    let closed = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if closed != 0 {
        return Err(HttpError::Start(io::Error::last_os_error()));
    }
    nix::sys::prctl::set_dumpable(false).map_err(|e| HttpError::Start(e.into()))?;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| HttpError::Start(e.into()))?;
    // (Had the master died before that, the session's end of file ends this process.)
    Ok(())
}

/// The token: the first line the master writes on the session, before any reply (never in
/// the environment or the arguments, which other processes of the same user could read).
fn read_token(mut session: &UnixStream) -> Result<Vec<u8>, HttpError> {
    use std::io::Read;
    session
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(HttpError::Session)?;
    let mut token = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match session.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) if token.len() < MAX_TOKEN_LINE => token.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => return Err(HttpError::NoToken),
        }
    }
    session.set_read_timeout(None).map_err(HttpError::Session)?;
    if token.is_empty() {
        return Err(HttpError::NoToken);
    }
    Ok(token)
}

/// The listener from stdin (fd 0 is `/dev/null` afterwards).
fn take_listener() -> Result<TcpListener, HttpError> {
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(HttpError::Listener)?;
    let listener = TcpListener::from(fd);
    listener.local_addr().map_err(HttpError::Listener)?;
    listener
        .set_nonblocking(false)
        .map_err(HttpError::Listener)?;
    let null = std::fs::File::open("/dev/null").map_err(HttpError::Start)?;
    nix::unistd::dup2_stdin(&null).map_err(|e| HttpError::Start(e.into()))?;
    Ok(listener)
}

/// The admin session from stdout (fd 1 is `/dev/null` afterwards, so that no stray print
/// can reach the master as a command).
fn take_session() -> Result<UnixStream, HttpError> {
    let fd = io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(HttpError::Session)?;
    let session = UnixStream::from(fd);
    session.local_addr().map_err(HttpError::Session)?;
    session.set_nonblocking(false).map_err(HttpError::Session)?;
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(HttpError::Start)?;
    nix::unistd::dup2_stdout(&null).map_err(|e| HttpError::Start(e.into()))?;
    Ok(session)
}

/// One line to stderr, prefixed; a failed write is ignored (stderr is the master's).
fn say(what: &dyn Display) {
    let _ = writeln!(io::stderr().lock(), "jobhost http: {what}");
}

/// What every connection thread shares.
struct Server {
    link: MasterLink,
    token: Vec<u8>,
    cookie: String,
    active: AtomicUsize,
    /// The connections still reading their head, or lingering after their reply, oldest
    /// first: when every slot is taken, a new connection ends the oldest of them ([`admit`]).
    reading: Mutex<Reading>,
    complaints: Complaints,
}

#[derive(Default)]
struct Reading {
    next_id: u64,
    /// Id and a handle to shut the connection down with.
    heads: std::collections::VecDeque<(u64, TcpStream)>,
}

impl Server {
    fn new(link: MasterLink, token: Vec<u8>) -> Server {
        Server {
            link,
            cookie: request::session_cookie(&token),
            token,
            active: AtomicUsize::new(0),
            reading: Mutex::new(Reading::default()),
            complaints: Complaints::default(),
        }
    }

    fn reading(&self) -> std::sync::MutexGuard<'_, Reading> {
        self.reading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes a connection as one that may be ended to make room, until the guard is dropped;
    /// `None` if its handle cannot be cloned (then it is not ended early).
    fn may_end(&self, stream: &TcpStream) -> Option<MayEnd<'_>> {
        let handle = stream.try_clone().ok()?;
        let mut reading = self.reading();
        let id = reading.next_id;
        reading.next_id += 1;
        reading.heads.push_back((id, handle));
        Some(MayEnd { server: self, id })
    }

    /// Ends the connection that has been reading its head longest: its thread's read returns
    /// at once and the thread gives its slot back. False if none is reading.
    fn end_oldest_reading(&self) -> bool {
        let Some((_, oldest)) = self.reading().heads.pop_front() else {
            return false;
        };
        let _ = oldest.shutdown(Shutdown::Both);
        true
    }
}

/// A connection [`Server::end_oldest_reading`] may end, while this lives.
struct MayEnd<'a> {
    server: &'a Server,
    id: u64,
}

impl Drop for MayEnd<'_> {
    fn drop(&mut self) {
        self.server
            .reading()
            .heads
            .retain(|(each, _)| *each != self.id);
    }
}

/// Accepts until the listener fails for good; running out of descriptors or memory only
/// pauses it.
fn accept_loop(listener: &TcpListener, server: &Arc<Server>) -> Result<(), HttpError> {
    use nix::libc;
    loop {
        match listener.accept() {
            Ok((stream, _)) => admit(server, stream),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
                Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP) => {
                    return Err(HttpError::Accept(e));
                }
                _ => {
                    server
                        .complaints
                        .complain(&format_args!("accept failed: {e}; pausing"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            },
        }
    }
}

/// A connection gets a thread of its own. When [`MAX_CONNECTIONS`] are busy, the one that has
/// been reading its head longest is ended to make room: a client that sends its request at
/// once (a scraper, a browser) is then not starved by ones that trickle heads they never
/// finish (slowloris), which each new connection pushes out oldest first, while it takes a
/// scraper a moment to send its head. Threads whose connection was ended may not have given
/// their slot back yet: up to twice [`MAX_CONNECTIONS`] are allowed meanwhile. Only with every
/// connection past its head (being answered) is a new one refused, a 503 at once.
fn admit(server: &Arc<Server>, stream: TcpStream) {
    let slot = match Slot::take(server, MAX_CONNECTIONS) {
        Some(slot) => Some(slot),
        None if server.end_oldest_reading() => {
            server.complaints.complain(&format_args!(
                "{MAX_CONNECTIONS} connections busy: ended the one reading its request head longest"
            ));
            Slot::take(server, 2 * MAX_CONNECTIONS)
        }
        None => None,
    };
    let Some(slot) = slot else {
        server.complaints.complain(&format_args!(
            "{MAX_CONNECTIONS} connections busy being answered: refused one (503)"
        ));
        refuse(stream);
        return;
    };
    let shared = Arc::clone(server);
    let spawned = std::thread::Builder::new()
        .name("http".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let _slot = slot;
            serve_connection(&shared, stream);
        });
    // The closure (its slot and stream) is dropped with the error: the connection closes.
    if let Err(e) = spawned {
        server
            .complaints
            .complain(&format_args!("cannot start a connection thread: {e}"));
    }
}

/// One of the [`MAX_CONNECTIONS`], given back when dropped (also when its thread panics).
struct Slot(Arc<Server>);

impl Slot {
    /// A slot if fewer than `limit` are taken.
    fn take(server: &Arc<Server>, limit: usize) -> Option<Slot> {
        server
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(server)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The 503 for a connection over the limit: one non-blocking write, then what the client sent
/// already is read (closing with it unread would reset the connection, and the client might
/// lose the 503), never waiting for more. A request that arrives later meets a reset.
fn refuse(mut stream: TcpStream) {
    let reply = Response::text(503, "too many connections; try again\n")
        .header("Retry-After", "1".to_owned())
        .to_bytes(false);
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let _ = stream.write(&reply);
    let _ = stream.shutdown(Shutdown::Write);
    let mut chunk = [0u8; 4096];
    for _ in 0..4 {
        match stream.read(&mut chunk) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

fn serve_connection(server: &Server, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let reading = server.may_end(&stream);
    let head = read_head(&mut stream);
    drop(reading);
    let response = match head {
        Ok(head) => {
            let response = respond(server, &head);
            send(server, &mut stream, &response, head.method == Method::Head);
            return;
        }
        Err(ReadFailure::Closed) => return,
        Err(ReadFailure::Answer(response)) => response,
    };
    send(server, &mut stream, &response, false);
}

enum ReadFailure {
    /// The client closed or failed: nobody to answer.
    Closed,
    /// A head that cannot be served, or none in time: answer this, then close.
    Answer(Response),
}

/// Reads until a whole head has come, within [`HEAD_DEADLINE`] and [`request::MAX_HEAD`].
fn read_head(stream: &mut TcpStream) -> Result<Head, ReadFailure> {
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match request::parse_head(&buf) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(HeadError::TooLarge) => {
                return Err(ReadFailure::Answer(Response::text(
                    431,
                    "request head too large\n",
                )))
            }
            Err(e @ HeadError::Malformed(_)) => {
                return Err(ReadFailure::Answer(Response::text(400, &format!("{e}\n"))))
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(ReadFailure::Answer(Response::text(
                408,
                "request timeout\n",
            )));
        }
        // parse_head refuses a partial head of MAX_HEAD bytes: there is room for one more.
        let room = (request::MAX_HEAD + 1 - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Err(ReadFailure::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadFailure::Answer(Response::text(
                    408,
                    "request timeout\n",
                )))
            }
            Err(_) => return Err(ReadFailure::Closed),
        }
    }
}

/// Writes the reply within [`WRITE_DEADLINE`], ends the connection, lingers briefly (not after
/// a 408: that client is still sending its head, if anything). Lingering, the connection may be
/// ended to make room, as one reading its head may.
fn send(server: &Server, stream: &mut TcpStream, response: &Response, head_only: bool) {
    let bytes = response.to_bytes(head_only);
    let deadline = Instant::now() + WRITE_DEADLINE;
    let mut written = 0;
    while written < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match stream.write(&bytes[written..]) {
            Ok(0) => return,
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    if stream.shutdown(Shutdown::Write).is_err() || response.status == 408 {
        return;
    }
    let _lingering = server.may_end(stream);
    linger(stream);
}

/// Reads what the client still sends, for [`LINGER`] and [`LINGER_BYTES`] at most.
fn linger(stream: &mut TcpStream) {
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut chunk = [0u8; 4096];
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The reply to a whole head.
fn respond(server: &Server, head: &Head) -> Response {
    if head.method == Method::Other {
        return Response::text(405, "only GET and HEAD\n").header("Allow", "GET, HEAD".to_owned());
    }
    let auth = request::authenticate(head, &server.token, &server.cookie);
    if auth == Auth::Denied {
        return Response::text(401, "the token is needed: Authorization: Bearer TOKEN, or Basic with TOKEN as the password\n")
            .header("WWW-Authenticate", "Basic realm=\"jobhost\", charset=\"UTF-8\"".to_owned());
    }
    if head.has_body {
        return Response::text(400, "a request body is not accepted\n");
    }
    let Some(route) = request::route(&head.path) else {
        return Response::text(404, "not found\n");
    };
    match route {
        Route::Page => {
            let response = status_page(server);
            if auth == Auth::Header && response.status == 200 {
                // What the page's script authenticates with (see the module doc).
                let cookie = format!(
                    "{}={}; Path=/; HttpOnly; SameSite=Strict",
                    request::SESSION_COOKIE,
                    server.cookie
                );
                response.header("Set-Cookie", cookie)
            } else {
                response
            }
        }
        Route::Script => Response::new(
            200,
            "text/javascript; charset=utf-8",
            page::SCRIPT.as_bytes().to_vec(),
        ),
        Route::Style => Response::new(
            200,
            "text/css; charset=utf-8",
            page::STYLE.as_bytes().to_vec(),
        ),
        Route::StatusJson => status_json(server),
        Route::Metrics => {
            let (command, content_type) = if request::wants_openmetrics(&head.accept) {
                (Command::Metrics, OPENMETRICS)
            } else {
                (Command::MetricsPrometheus, PROMETHEUS_TEXT)
            };
            match ask(server, command) {
                Ok(text) => Response::new(200, content_type, text.into_bytes()),
                Err(response) => response,
            }
        }
    }
}

/// The master's `OK` answer to `command`, or the reply that says why there is none.
fn ask(server: &Server, command: Command) -> Result<String, Response> {
    match server.link.ask(command) {
        Ok(Answer::Ok(text)) => Ok(text),
        Ok(Answer::Err(reason)) => Err(Response::text(
            502,
            &format!("the master refused `{}`: {reason}\n", command.line()),
        )),
        Err(e) => {
            server.complaints.complain(&e);
            let status = if matches!(e, LinkError::Timeout) {
                504
            } else {
                502
            };
            Err(Response::text(
                status,
                &format!("master not answering: {e}\n"),
            ))
        }
    }
}

/// `status json` and `workers json`, parsed as `T` and `W`.
fn snapshot<T, W>(server: &Server) -> Result<(T, W), Response>
where
    T: serde::de::DeserializeOwned,
    W: serde::de::DeserializeOwned,
{
    let status = ask(server, Command::StatusJson)?;
    let workers = ask(server, Command::WorkersJson)?;
    Ok((
        parse(Command::StatusJson, &status)?,
        parse(Command::WorkersJson, &workers)?,
    ))
}

/// A JSON answer as `T`, or the 502 that says it is not one.
fn parse<T: serde::de::DeserializeOwned>(command: Command, text: &str) -> Result<T, Response> {
    serde_json::from_str(text).map_err(|e| {
        Response::text(
            502,
            &format!(
                "the master's `{}` is not what was expected: {e}\n",
                command.line()
            ),
        )
    })
}

fn status_page(server: &Server) -> Response {
    let (status, workers) = match snapshot::<crate::view::Status, crate::view::WorkerList>(server) {
        Ok(views) => views,
        Err(response) => return response,
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let html = page::render(&status, &workers.workers, &page::time_of_day(now));
    Response::new(200, "text/html; charset=utf-8", html.into_bytes())
        .header("X-Frame-Options", "DENY".to_owned())
        .header("Referrer-Policy", "no-referrer".to_owned())
}

/// `{"status": <status json>, "workers": <the list of workers json>}`.
fn status_json(server: &Server) -> Response {
    let (status, mut workers) = match snapshot::<serde_json::Value, serde_json::Value>(server) {
        Ok(values) => values,
        Err(response) => return response,
    };
    let list = workers
        .get_mut("workers")
        .map(serde_json::Value::take)
        .unwrap_or_else(|| serde_json::Value::Array(Vec::new()));
    let document = serde_json::json!({"status": status, "workers": list});
    match serde_json::to_vec(&document) {
        Ok(body) => Response::new(200, "application/json", body),
        Err(e) => Response::text(500, &format!("cannot encode the status: {e}\n")),
    }
}

/// A whole reply; every one closes its connection.
#[derive(Debug)]
struct Response {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }

    fn text(status: u16, text: &str) -> Response {
        Response::new(status, TEXT, text.as_bytes().to_vec())
    }

    fn header(mut self, name: &'static str, value: String) -> Response {
        self.headers.push((name, value));
        self
    }

    /// The bytes on the wire; for `HEAD`, the same head without the body.
    fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 + self.body.len());
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
             Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
             Content-Security-Policy: {CSP}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Lines for the master's stderr, at most one per [`COMPLAIN_EVERY`], with a count of those
/// left out.
#[derive(Default)]
struct Complaints {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Complaints {
    fn complain(&self, what: &dyn Display) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (last, left_out) = &mut *state;
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < COMPLAIN_EVERY) {
            *left_out += 1;
            return;
        }
        match *left_out {
            0 => say(what),
            n => say(&format_args!(
                "{what} (and {n} more problems since the last line)"
            )),
        }
        *last = Some(now);
        *left_out = 0;
    }
}

#[cfg(test)]
mod tests;
