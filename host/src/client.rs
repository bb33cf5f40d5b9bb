//! The blocking Rust client of the job socket, used by `jobhost submit`, the tests and the
//! benchmarks: connect, send SUBMIT frames (buffered, pipelined), receive RESULT frames —
//! and, for jobs sent with [`Client::send_watched`] (SUBMIT_WATCH), their PROGRESS and DATA
//! frames, as [`Received`] items from [`Client::recv_any`]. [`Client::recv`] and
//! [`Client::call`] skip those: existing callers see results only.
//!
//! This module owns one client connection: its socket, its output buffer (written out when it
//! passes [`FLUSH_ABOVE`], or on [`Client::flush`] / [`Client::recv`]), its [`FrameReader`]
//! with a size limit on results, and the matching of a [`Client::call`] to its own result.
//! [`Client::split`] gives a [`ClientSender`] and a [`ClientReceiver`] that work from two
//! threads at once, which is how a client keeps many jobs in flight without deadlocking
//! against the master's back-pressure.
//!
//! It never panics on what the master sends (a malformed or oversized frame is a
//! [`ClientError::Protocol`]), never retries or reconnects, never half-closes the socket (the
//! master takes end-of-file as the client leaving and drops its results), and never spawns a
//! thread: concurrency is the caller's choice.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::protocol::{self, Frame, FrameError, FrameReader, Status};

/// The largest result body accepted by [`Client::connect`]; see [`Client::connect_with_limit`].
pub const DEFAULT_MAX_RESULT: usize = 1 << 30;

/// Buffered submits are written out once they pass this many bytes.
pub const FLUSH_ABOVE: usize = 64 << 10;

/// Payloads this large are written from the caller's buffer instead of being copied.
const LARGE_PAYLOAD: usize = 16 << 10;

/// Writes both slices whole with writev(2), blocking while the socket is full.
fn write_all_vectored(mut stream: &UnixStream, parts: [&[u8]; 2]) -> io::Result<()> {
    let mut skip = 0;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    while skip < total {
        let (a, b) = if skip < parts[0].len() {
            (&parts[0][skip..], parts[1])
        } else {
            (&parts[1][skip - parts[0].len()..], &[][..])
        };
        match stream.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => skip += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How much one read(2) asks for.
const READ_CHUNK: usize = 64 << 10;

/// After a result body this large, give the receive buffer back when it is empty.
const SHRINK_AFTER: usize = 1 << 20;

/// RESULT bytes before the body: kind, id, status.
const RESULT_OVERHEAD: usize = 1 + 8 + 1;

/// One job's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResult {
    /// The id the job was submitted with.
    pub id: u64,
    pub status: Status,
    /// The result bytes (ok), the error message (failed) or the reason (rejected).
    pub body: Vec<u8>,
}

impl JobResult {
    /// True when the plugin returned a result.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// The body as UTF-8, invalid sequences replaced by U+FFFD.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Anything the master sends a client: a watched job's progress or partial data (before its
/// result), or a job's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// The job `id` is `numerator` of `denominator` done (the plugin's units; 0 as denominator:
    /// unknown). Coalesced by the master while the client does not read.
    Progress {
        id: u64,
        numerator: u64,
        denominator: u64,
    },
    /// Partial result bytes of the job `id`, in order.
    Data {
        id: u64,
        data: Vec<u8>,
    },
    Result(JobResult),
}

/// Why a client call did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepted the connection at `path`.
    #[error("no jobhost master at {} — is it running? ({source})", path.display())]
    Connect { path: PathBuf, source: io::Error },
    /// A read or write on the socket failed (other than the master going away).
    #[error("job socket: {0}")]
    Io(io::Error),
    /// The master sent bytes that are not a RESULT frame, or a result over the size limit.
    #[error("bad frame from the master: {0}")]
    Protocol(FrameError),
    /// End of file, or a reset or broken pipe: the master is gone or dropped this client.
    #[error("the master closed the connection")]
    Closed,
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => ClientError::Closed,
            _ => ClientError::Io(e),
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> ClientError {
        ClientError::Protocol(e)
    }
}

/// A connection to the master's job socket.
///
/// `send` only buffers; the buffer is written when it passes [`FLUSH_ABOVE`], on `flush`, and
/// before `recv` blocks. A single thread may `send` many jobs and then `recv` their results,
/// as long as what it sends stays within the master's flow control: the master stops reading a
/// client once the payloads of its unanswered jobs plus its unread results pass 16 MiB (see
/// `docs/PROTOCOL.md`), and a client that only writes then never gets to read. For an
/// unbounded stream, [`Client::split`] and receive on another thread.
#[derive(Debug)]
pub struct Client {
    sender: ClientSender,
    receiver: ClientReceiver,
    /// The id the next [`Client::call`] uses: above every id sent so far.
    next_id: u64,
}

impl Client {
    /// Connects to the job socket at `path`, accepting results up to [`DEFAULT_MAX_RESULT`].
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        Client::connect_with_limit(path, DEFAULT_MAX_RESULT)
    }

    /// Connects, refusing any result body over `max_result` bytes (as a
    /// [`ClientError::Protocol`] error, before the body is read).
    pub fn connect_with_limit(path: &Path, max_result: usize) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Client::from_stream(stream, max_result))
    }

    /// Wraps an already connected stream (e.g. one end of a socketpair).
    pub fn from_stream(stream: UnixStream, max_result: usize) -> Client {
        let stream = Arc::new(stream);
        Client {
            sender: ClientSender {
                stream: Arc::clone(&stream),
                out: Vec::new(),
            },
            receiver: ClientReceiver {
                stream,
                reader: FrameReader::new(max_result.saturating_add(RESULT_OVERHEAD)),
                scratch: Vec::new(),
                stash: VecDeque::new(),
            },
            next_id: 0,
        }
    }

    /// Buffers one SUBMIT frame; writes the buffer out when it passes [`FLUSH_ABOVE`].
    /// Ids are the caller's: the master answers with the same id and never checks them.
    pub fn send(&mut self, id: u64, pool: &str, payload: &[u8]) -> Result<(), ClientError> {
        self.next_id = self.next_id.max(id.wrapping_add(1));
        self.sender.send(id, pool, payload)
    }

    /// Like [`Client::send`], as SUBMIT_WATCH: the master also sends the job's progress and
    /// partial data, which [`Client::recv_any`] returns ([`Client::recv`] skips them).
    pub fn send_watched(&mut self, id: u64, pool: &str, payload: &[u8]) -> Result<(), ClientError> {
        self.next_id = self.next_id.max(id.wrapping_add(1));
        self.sender.send_watched(id, pool, payload)
    }

    /// Like [`Client::send`], with [`protocol::submit_flags`]: `WATCH` as
    /// [`Client::send_watched`]; `DETACH`, the job runs even if this client goes away before
    /// it reaches a worker (else such a job is dropped).
    pub fn send_flagged(
        &mut self,
        flags: u8,
        id: u64,
        pool: &str,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.next_id = self.next_id.max(id.wrapping_add(1));
        self.sender.send_flagged(flags, id, pool, payload)
    }

    /// Flushes, then returns the next thing the master sent: a result [`Client::call`] set
    /// aside, else the next frame — a watched job's progress or data, or a result.
    pub fn recv_any(&mut self) -> Result<Received, ClientError> {
        self.sender.flush()?;
        self.receiver.recv_any()
    }

    /// Writes out every buffered submit.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.sender.flush()
    }

    /// Flushes, then returns the next result: one that [`Client::call`] set aside first, else
    /// the next RESULT frame, blocking until it arrives. Results come in completion order.
    pub fn recv(&mut self) -> Result<JobResult, ClientError> {
        self.sender.flush()?;
        self.receiver.recv()
    }

    /// Submits one job with an id of its own (greater than any id sent before on this client)
    /// and waits for its result. Results of other jobs that arrive meanwhile are kept, in
    /// order, for later [`Client::recv`] calls (watched jobs' progress and data are dropped).
    pub fn call(&mut self, pool: &str, payload: &[u8]) -> Result<JobResult, ClientError> {
        let id = self.next_id;
        self.next_id = id.wrapping_add(1);
        self.sender.send(id, pool, payload)?;
        self.sender.flush()?;
        loop {
            let result = self.receiver.read_result()?;
            if result.id == id {
                return Ok(result);
            }
            self.receiver.stash.push_back(result);
        }
    }

    /// Splits into a sending half and a receiving half for two threads (no system call; both
    /// share the socket). Buffered submits stay with the sender; results set aside by `call`
    /// go to the receiver. The connection closes when both halves are dropped.
    pub fn split(self) -> (ClientSender, ClientReceiver) {
        (self.sender, self.receiver)
    }
}

/// The sending half of a [`Client`].
#[derive(Debug)]
pub struct ClientSender {
    stream: Arc<UnixStream>,
    out: Vec<u8>,
}

impl ClientSender {
    /// Buffers one SUBMIT frame; writes the buffer out when it passes [`FLUSH_ABOVE`].
    pub fn send(&mut self, id: u64, pool: &str, payload: &[u8]) -> Result<(), ClientError> {
        self.send_flagged(0, id, pool, payload)
    }

    /// Buffers one SUBMIT_WATCH frame (see [`Client::send_watched`]).
    pub fn send_watched(&mut self, id: u64, pool: &str, payload: &[u8]) -> Result<(), ClientError> {
        self.send_flagged(protocol::submit_flags::WATCH, id, pool, payload)
    }

    /// Buffers one submit with [`protocol::submit_flags`] (see [`Client::send_flagged`]).
    pub fn send_flagged(
        &mut self,
        flags: u8,
        id: u64,
        pool: &str,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        // Kind, the flags byte, id, pool length, pool, payload.
        let frame_len = 2 + 8 + 2 + pool.len().min(usize::from(u16::MAX)) + payload.len();
        if u32::try_from(frame_len).is_err() {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "job {id}: a payload of {} bytes does not fit in a frame",
                    payload.len()
                ),
            )));
        }
        if payload.len() < LARGE_PAYLOAD {
            protocol::put_submit_head_flagged(&mut self.out, flags, id, pool, payload.len());
            self.out.extend_from_slice(payload);
            if self.out.len() >= FLUSH_ABOVE {
                self.flush()?;
            }
            return Ok(());
        }
        // A large payload goes out from where it is, after what is buffered: no copy.
        protocol::put_submit_head_flagged(&mut self.out, flags, id, pool, payload.len());
        let written = write_all_vectored(&self.stream, [&self.out[..], payload]);
        self.out.clear();
        written.map_err(ClientError::from)
    }

    /// Writes out every buffered submit, blocking while the socket is full.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = (&*self.stream).write_all(&self.out);
        // After a failed write the stream is out of step anyway: never resend a partial frame.
        self.out.clear();
        if self.out.capacity() > 4 * FLUSH_ABOVE {
            self.out = Vec::new();
        }
        written.map_err(ClientError::from)
    }

    /// Bytes buffered and not yet written.
    pub fn buffered(&self) -> usize {
        self.out.len()
    }

    /// Shuts the connection down both ways, which wakes a [`ClientReceiver::recv`] blocked on
    /// another thread (it returns [`ClientError::Closed`]). For giving up, not for finishing:
    /// the master drops the results of a client that closed.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        shutdown(&self.stream)
    }
}

/// A frame of a kind that is not for clients.
fn unexpected(kind: u8) -> ClientError {
    ClientError::Protocol(FrameError::UnknownKind(kind))
}

fn shutdown(stream: &UnixStream) -> Result<(), ClientError> {
    match stream.shutdown(Shutdown::Both) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(ClientError::from(e)),
        _ => Ok(()),
    }
}

/// The receiving half of a [`Client`].
#[derive(Debug)]
pub struct ClientReceiver {
    stream: Arc<UnixStream>,
    reader: FrameReader,
    scratch: Vec<u8>,
    /// Results that arrived while [`Client::call`] waited for its own.
    stash: VecDeque<JobResult>,
}

impl ClientReceiver {
    /// The next result, blocking until one arrives (progress and data on the way are
    /// skipped). Does not flush anything: the sender must.
    pub fn recv(&mut self) -> Result<JobResult, ClientError> {
        match self.stash.pop_front() {
            Some(result) => Ok(result),
            None => self.read_result(),
        }
    }

    /// The next thing the master sent (see [`Received`]), blocking until it arrives. Does not
    /// flush anything: the sender must.
    pub fn recv_any(&mut self) -> Result<Received, ClientError> {
        match self.stash.pop_front() {
            Some(result) => Ok(Received::Result(result)),
            None => self.read_any(),
        }
    }

    /// Shuts the connection down both ways, which wakes a [`ClientSender`] blocked writing on
    /// another thread (it gets [`ClientError::Closed`]): a receiver that stops reading must,
    /// since the master stops reading a client whose results pile up.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        shutdown(&self.stream)
    }

    /// True when [`ClientReceiver::recv`] would return without reading the socket (a result,
    /// or a frame error, is already buffered). For batching work between blocking reads.
    pub fn has_buffered(&self) -> bool {
        !self.stash.is_empty() || self.reader.has_frame().unwrap_or(true)
    }

    /// The next RESULT frame from the socket (the stash aside), skipping progress and data.
    fn read_result(&mut self) -> Result<JobResult, ClientError> {
        loop {
            if let Received::Result(result) = self.read_any()? {
                return Ok(result);
            }
        }
    }

    /// The next frame from the socket (the stash aside).
    fn read_any(&mut self) -> Result<Received, ClientError> {
        loop {
            if let Some(frame) = self.reader.next()? {
                let result = match protocol::decode(frame)? {
                    Frame::Result { id, status, body } => JobResult {
                        id,
                        status,
                        body: body.to_vec(),
                    },
                    Frame::Progress {
                        id,
                        numerator,
                        denominator,
                    } => {
                        return Ok(Received::Progress {
                            id,
                            numerator,
                            denominator,
                        })
                    }
                    Frame::Data { id, data } => {
                        return Ok(Received::Data {
                            id,
                            data: data.to_vec(),
                        })
                    }
                    // Any other kind is one a client never expects.
                    Frame::Submit { .. } => return Err(unexpected(protocol::kind::SUBMIT)),
                    Frame::Job { .. } => return Err(unexpected(protocol::kind::JOB)),
                    Frame::Outcome { .. } => return Err(unexpected(protocol::kind::OUTCOME)),
                    Frame::Hold { .. } => return Err(unexpected(protocol::kind::HOLD)),
                    Frame::Leaving { .. } => return Err(unexpected(protocol::kind::LEAVING)),
                    Frame::WorkProgress { .. } => {
                        return Err(unexpected(protocol::kind::WORK_PROGRESS))
                    }
                    Frame::WorkData { .. } => return Err(unexpected(protocol::kind::WORK_DATA)),
                };
                if result.body.len() >= SHRINK_AFTER {
                    self.reader.shrink();
                }
                return Ok(Received::Result(result));
            }
            if self.scratch.is_empty() {
                self.scratch = vec![0; READ_CHUNK];
            }
            match (&*self.stream).read(&mut self.scratch) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.reader.push(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::from(e)),
            }
        }
    }
}

/// A fake master for unit tests: a thread serving one connection on a socket in a tempdir.
#[cfg(test)]
pub(crate) mod fake {
    use std::io::{self, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::thread::JoinHandle;

    use crate::protocol::{self, Frame, FrameReader, Status};

    /// One decoded submit.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Submit {
        pub id: u64,
        pub pool: String,
        pub payload: Vec<u8>,
    }

    /// The server side of one connection.
    pub struct Peer {
        pub stream: UnixStream,
        reader: FrameReader,
        scratch: Vec<u8>,
    }

    /// What [`Peer::next_event`] saw.
    pub enum Event {
        Job(Submit),
        /// The read timeout passed with no whole frame.
        Idle,
        /// End of file, or the connection failed.
        End,
    }

    impl Peer {
        /// The next submit; None at end of file, or after a read timeout when one is set.
        pub fn next_submit(&mut self) -> Option<Submit> {
            match self.next_event() {
                Event::Job(job) => Some(job),
                Event::Idle | Event::End => None,
            }
        }

        pub fn next_event(&mut self) -> Event {
            loop {
                if let Some(frame) = self.reader.next().expect("good frame") {
                    match protocol::decode(frame).expect("decodes") {
                        Frame::Submit {
                            id, pool, payload, ..
                        } => {
                            return Event::Job(Submit {
                                id,
                                pool: pool.to_string(),
                                payload: payload.to_vec(),
                            })
                        }
                        other => panic!("a client sent {other}"),
                    }
                }
                match self.stream.read(&mut self.scratch) {
                    Ok(0) => return Event::End,
                    Ok(n) => self.reader.push(&self.scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        return Event::Idle
                    }
                    Err(_) => return Event::End,
                }
            }
        }

        pub fn answer(&mut self, id: u64, status: Status, body: &[u8]) {
            let mut out = Vec::new();
            protocol::put_result(&mut out, id, status, body);
            self.write_raw(&out);
        }

        /// Echoes the payload; "bad" fails, "rej" is rejected.
        pub fn answer_echo(&mut self, job: &Submit) {
            match job.payload.as_slice() {
                b"bad" => self.answer(job.id, Status::Failed, b"it was bad"),
                b"rej" => self.answer(job.id, Status::Rejected, b"queue full"),
                payload => self.answer(job.id, Status::Ok, payload),
            }
        }

        pub fn write_raw(&mut self, bytes: &[u8]) {
            // The client may be gone already (a test of an early exit): ignore.
            let _ = self.stream.write_all(bytes);
        }
    }

    /// A socket in a fresh tempdir and a thread that accepts one client and runs `serve`.
    pub struct Server {
        /// Holds the socket's folder for the life of the server.
        pub _dir: tempfile::TempDir,
        pub path: PathBuf,
        pub thread: Option<JoinHandle<()>>,
    }

    impl Server {
        pub fn start(serve: impl FnOnce(Peer) + Send + 'static) -> Server {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("jobs.sock");
            let listener = UnixListener::bind(&path).expect("bind");
            let thread = std::thread::spawn(move || {
                let (stream, _) = listener.accept().expect("accept");
                serve(Peer {
                    stream,
                    reader: FrameReader::new(1 << 30),
                    scratch: vec![0; 64 << 10],
                });
            });
            Server {
                _dir: dir,
                path,
                thread: Some(thread),
            }
        }

        /// Waits for the server thread, re-raising its panic.
        pub fn join(mut self) {
            if let Some(thread) = self.thread.take() {
                if let Err(panic) = thread.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }

    /// Answers every submit with [`Peer::answer_echo`], in order, until end of file.
    pub fn echo(mut peer: Peer) {
        while let Some(job) = peer.next_submit() {
            peer.answer_echo(&job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{self, Server};
    use super::*;

    #[test]
    fn call_returns_the_result_and_its_status() {
        let server = Server::start(fake::echo);
        let mut client = Client::connect(&server.path).unwrap();
        let ok = client.call("echo", b"hello").unwrap();
        assert_eq!(
            ok,
            JobResult {
                id: 0,
                status: Status::Ok,
                body: b"hello".to_vec()
            }
        );
        assert!(ok.is_ok());
        let failed = client.call("echo", b"bad").unwrap();
        assert_eq!((failed.id, failed.status), (1, Status::Failed));
        assert_eq!(failed.text(), "it was bad");
        assert!(!failed.is_ok());
        let rejected = client.call("echo", b"rej").unwrap();
        assert_eq!(
            (rejected.status, rejected.text().as_str()),
            (Status::Rejected, "queue full")
        );
        assert_eq!(
            client.call("echo", &[0xff, b'a']).unwrap().text(),
            "\u{fffd}a"
        );
        drop(client);
        server.join();
    }

    #[test]
    fn progress_and_data_reach_recv_any_and_recv_skips_them() {
        let server = Server::start(|mut peer| {
            while let Some(job) = peer.next_submit() {
                let mut out = Vec::new();
                protocol::put_progress(&mut out, protocol::kind::PROGRESS, job.id, 1, 2);
                protocol::put_data(&mut out, protocol::kind::DATA, job.id, b"part");
                protocol::put_progress(&mut out, protocol::kind::PROGRESS, job.id, 2, 2);
                peer.write_raw(&out);
                peer.answer_echo(&job);
            }
        });
        let mut client = Client::connect(&server.path).unwrap();
        client.send_watched(5, "echo", b"x").unwrap();
        let mut got = Vec::new();
        loop {
            let item = client.recv_any().unwrap();
            let done = matches!(item, Received::Result(_));
            got.push(item);
            if done {
                break;
            }
        }
        assert_eq!(
            got,
            [
                Received::Progress {
                    id: 5,
                    numerator: 1,
                    denominator: 2
                },
                Received::Data {
                    id: 5,
                    data: b"part".to_vec()
                },
                Received::Progress {
                    id: 5,
                    numerator: 2,
                    denominator: 2
                },
                Received::Result(JobResult {
                    id: 5,
                    status: Status::Ok,
                    body: b"x".to_vec()
                }),
            ]
        );
        // Existing callers see results only.
        assert_eq!(client.call("echo", b"y").unwrap().text(), "y");
        client.send(9, "echo", b"z").unwrap();
        assert_eq!(client.recv().unwrap().id, 9);
        drop(client);
        server.join();
    }

    #[test]
    fn pipelined_results_come_back_in_completion_order() {
        // ~600 KiB of submits, so the buffer is written out on its own several times before
        // the first recv. The server reads them all, then answers each batch of 100 in
        // reverse. (Answering while the client still only sends would deadlock both: the
        // real master holds up to 16 MiB for a client before it stops reading; this one
        // holds nothing.)
        let server = Server::start(|mut peer| {
            let jobs: Vec<_> = (0..1000).map(|_| peer.next_submit().unwrap()).collect();
            assert!(jobs.iter().all(|job| job.pool == "p"));
            for batch in jobs.chunks(100) {
                for job in batch.iter().rev() {
                    peer.answer_echo(job);
                }
            }
            fake::echo(peer);
        });
        let mut client = Client::connect(&server.path).unwrap();
        let payload = vec![b'x'; 600];
        for id in 0..1000u64 {
            let mut p = payload.clone();
            p.extend_from_slice(id.to_string().as_bytes());
            client.send(id, "p", &p).unwrap();
        }
        let mut ids = Vec::new();
        for _ in 0..1000 {
            let r = client.recv().unwrap();
            assert!(r.body.ends_with(r.id.to_string().as_bytes()));
            ids.push(r.id);
        }
        assert_eq!(&ids[..3], &[99, 98, 97]);
        ids.sort_unstable();
        assert_eq!(ids, (0..1000).collect::<Vec<_>>());
        drop(client);
        server.join();
    }

    #[test]
    fn call_keeps_other_results_for_recv() {
        // Job 5 is answered only after the call's job, and after it another earlier result.
        let server = Server::start(|mut peer| {
            let first = peer.next_submit().unwrap();
            let second = peer.next_submit().unwrap();
            assert_eq!(
                (first.id, second.id),
                (5, 6),
                "call's id is above every id sent"
            );
            peer.answer_echo(&first);
            peer.answer(99, Status::Ok, b"stray");
            peer.answer_echo(&second);
            fake::echo(peer);
        });
        let mut client = Client::connect(&server.path).unwrap();
        client.send(5, "p", b"five").unwrap();
        let mine = client.call("p", b"six").unwrap();
        assert_eq!((mine.id, mine.text().as_str()), (6, "six"));
        assert_eq!(client.recv().unwrap().text(), "five");
        assert_eq!(client.recv().unwrap().text(), "stray");
        drop(client);
        server.join();
    }

    #[test]
    fn a_result_over_the_limit_is_a_protocol_error() {
        let server = Server::start(|mut peer| {
            let job = peer.next_submit().unwrap();
            peer.answer(job.id, Status::Ok, &[b'x'; 100]);
        });
        let mut client = Client::connect_with_limit(&server.path, 99).unwrap();
        match client.call("p", b"") {
            Err(ClientError::Protocol(FrameError::TooLarge { len, max })) => {
                assert_eq!((len, max), (110, 109))
            }
            other => panic!("{other:?}"),
        }
        drop(client);
        server.join();

        // Exactly at the limit is fine.
        let server = Server::start(|mut peer| {
            let job = peer.next_submit().unwrap();
            peer.answer(job.id, Status::Ok, &[b'x'; 100]);
        });
        let mut client = Client::connect_with_limit(&server.path, 100).unwrap();
        assert_eq!(client.call("p", b"").unwrap().body.len(), 100);
        drop(client);
        server.join();
    }

    #[test]
    fn malformed_frames_are_protocol_errors() {
        for (wire, expect) in [
            // A SUBMIT frame: not something a master sends to a client.
            (
                {
                    let mut w = Vec::new();
                    protocol::put_submit(&mut w, 1, "p", b"x");
                    w
                },
                FrameError::UnknownKind(protocol::kind::SUBMIT),
            ),
            (vec![0, 0, 0, 2, 42, 0], FrameError::UnknownKind(42)),
            (vec![0, 0, 0, 0], FrameError::Empty),
            (
                vec![
                    0,
                    0,
                    0,
                    10,
                    protocol::kind::RESULT,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    7,
                ],
                FrameError::BadStatus(7),
            ),
        ] {
            let server = Server::start(move |mut peer| {
                peer.next_submit().unwrap();
                peer.write_raw(&wire);
            });
            let mut client = Client::connect(&server.path).unwrap();
            match client.call("p", b"") {
                Err(ClientError::Protocol(e)) => assert_eq!(e, expect),
                other => panic!("{other:?}"),
            }
            drop(client);
            server.join();
        }
    }

    #[test]
    fn a_master_that_goes_away_is_closed_even_mid_frame() {
        let server = Server::start(|mut peer| {
            peer.next_submit().unwrap();
            peer.write_raw(&[0, 0, 0, 20, protocol::kind::RESULT, 0, 0]);
        });
        let mut client = Client::connect(&server.path).unwrap();
        let error = client.call("p", b"").unwrap_err();
        assert!(matches!(error, ClientError::Closed), "{error:?}");
        assert_eq!(error.to_string(), "the master closed the connection");
        drop(client);
        server.join();
    }

    #[test]
    fn no_master_is_a_connect_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        let error = Client::connect(&path).unwrap_err();
        assert!(matches!(error, ClientError::Connect { .. }));
        let message = error.to_string();
        assert!(
            message.starts_with(&format!(
                "no jobhost master at {} — is it running? (",
                path.display()
            )),
            "{message}"
        );
        assert!(message.contains("No such file or directory"), "{message}");
    }

    #[test]
    fn split_halves_send_and_receive_from_two_threads() {
        // More results than the socket buffers hold: a single thread sending all of them
        // first would block against a server that blocks writing its answers.
        let server = Server::start(fake::echo);
        let client = Client::connect(&server.path).unwrap();
        let (mut sender, mut receiver) = client.split();
        let big = vec![b'y'; 4096];
        let n = 5000u64;
        let reading = std::thread::spawn(move || {
            let mut seen = 0u64;
            for expect in 0..n {
                let r = receiver.recv().unwrap();
                assert_eq!(r.id, expect);
                assert_eq!(r.body.len(), 4096);
                seen += 1;
                if seen == n {
                    assert!(!receiver.has_buffered());
                }
            }
            seen
        });
        for id in 0..n {
            sender.send(id, "p", &big).unwrap();
        }
        sender.flush().unwrap();
        assert_eq!(sender.buffered(), 0);
        assert_eq!(reading.join().unwrap(), n);
        drop(sender);
        server.join();
    }

    #[test]
    fn shutdown_wakes_a_blocked_sender() {
        // A server that never reads: the sender's writes fill the socket, then block.
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let server = Server::start(move |_peer| {
            let _ = stopped.recv();
        });
        let client = Client::connect(&server.path).unwrap();
        let (mut sender, receiver) = client.split();
        let payload = vec![0u8; 1 << 20];
        let sending = std::thread::spawn(move || loop {
            if let Err(e) = sender.send(0, "p", &payload) {
                return e;
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        receiver.shutdown().unwrap();
        assert!(matches!(sending.join().unwrap(), ClientError::Closed));
        drop(stop);
        server.join();
    }

    #[test]
    fn shutdown_wakes_a_blocked_receiver() {
        let server = Server::start(|mut peer| while peer.next_submit().is_some() {});
        let client = Client::connect(&server.path).unwrap();
        let (mut sender, mut receiver) = client.split();
        sender.send(1, "p", b"never answered").unwrap();
        sender.flush().unwrap();
        let reading = std::thread::spawn(move || receiver.recv());
        std::thread::sleep(std::time::Duration::from_millis(50));
        sender.shutdown().unwrap();
        assert!(matches!(reading.join().unwrap(), Err(ClientError::Closed)));
        drop(sender);
        server.join();
    }
}
