//! The binary frames jobhost speaks on its Unix sockets: clients ↔ master (submit / result,
//! and a watched job's progress / data) and master ↔ worker (job / outcome, progress / data). `docs/PROTOCOL.md` is the user-facing description.
//!
//! A frame is `u32 length (big-endian, of what follows) | u8 kind | body`. This module owns
//! encoding, incremental decoding with a size limit, and nothing else: it never does I/O
//! itself, so the master (non-blocking) and a worker or client (blocking) share it.
//!
//! A malformed frame — unknown kind, short body, a length over the limit — is a
//! [`FrameError`]; the owner of that connection closes it. Nothing here panics on input.

use std::fmt;

/// Bytes before the body: the length and the kind.
pub const HEADER: usize = 5;

/// The frame kinds.
pub mod kind {
    /// client → master: `u64 id | u16 pool length | pool (UTF-8) | payload`.
    pub const SUBMIT: u8 = 1;
    /// master → client: `u64 id | u8 status | body` (status: see [`super::Status`]).
    pub const RESULT: u8 = 2;
    /// master → worker: `u64 key | payload`.
    pub const JOB: u8 = 3;
    /// worker → master: `u64 key | u8 status (0 ok, 1 failed) | body`.
    pub const OUTCOME: u8 = 4;
    /// worker → master: `u8 (1: holding back — the system is short of memory, no job is
    /// started until it says 0; 0: taking jobs again)`.
    pub const HOLD: u8 = 5;
    /// worker → master, its last frame: `u8 exit status it is about to exit with | u64 jobs
    /// it finished`. Why it leaves: an exit without this frame is a crash, whatever its status.
    pub const LEAVING: u8 = 6;
    /// worker → master, while it runs the job `key`: `u64 key | u64 numerator | u64
    /// denominator` (exactly 24 bytes). How far the plugin says it got (a denominator of 0:
    /// unknown). The worker may coalesce them (at most one per [`super::PROGRESS_EVERY`], the
    /// last one before the OUTCOME always sent).
    pub const WORK_PROGRESS: u8 = 7;
    /// worker → master, while it runs the job `key`: `u64 key | data` — partial result
    /// bytes, in order, before the OUTCOME; at most [`super::MAX_JOB_DATA`] per job in all.
    pub const WORK_DATA: u8 = 8;
    /// master → client, for a job submitted with SUBMIT_WATCH: `u64 id | u64 numerator | u64
    /// denominator` (exactly 24 bytes). Coalesced (latest wins) while the client does not read.
    pub const PROGRESS: u8 = 9;
    /// master → client, for a job submitted with SUBMIT_WATCH: `u64 id | data`, in order,
    /// before the job's RESULT.
    pub const DATA: u8 = 10;
    /// client → master: a SUBMIT (same body) whose client wants the job's PROGRESS and DATA
    /// frames. A plain SUBMIT gets none, so a client that knows only RESULT never sees them.
    pub const SUBMIT_WATCH: u8 = 11;
    /// client → master: `u8 flags | u64 id | u16 pool length | pool | payload` — a SUBMIT with
    /// [`super::submit_flags`] (watch, detach). A flag the master does not know is an error.
    pub const SUBMIT_FLAGS: u8 = 12;
}

/// The flags byte of SUBMIT_FLAGS.
pub mod submit_flags {
    /// As SUBMIT_WATCH: the client wants the job's PROGRESS and DATA frames.
    pub const WATCH: u8 = 1;
    /// The job runs even if its client goes away before it reaches a worker. Without it, the
    /// jobs still queued when their connection closes are dropped: nobody would hear of them.
    pub const DETACH: u8 = 2;
    /// Every flag this build knows.
    pub const KNOWN: u8 = WATCH | DETACH;
}

/// The most partial data (WORK_DATA bytes) one job may send: the worker cuts what its plugin
/// reports beyond it (and logs that once per job); the master takes a worker that sends more
/// for a failing one.
pub const MAX_JOB_DATA: usize = 16 << 20;

/// A worker sends at most one WORK_PROGRESS per this long for a job (the latest wins), and
/// always the last one before the job's OUTCOME.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// How a job ended, as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// The plugin returned a result; the body is its bytes.
    Ok = 0,
    /// The plugin returned an error, or the job's attempts ran out; the body is the message.
    Failed = 1,
    /// The job was not accepted (unknown pool, queue full, too large, shutting down).
    Rejected = 2,
}

impl Status {
    pub fn from_u8(b: u8) -> Option<Status> {
        match b {
            0 => Some(Status::Ok),
            1 => Some(Status::Failed),
            2 => Some(Status::Rejected),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
        }
    }
}

/// What is wrong with the bytes a peer sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame kind {kind} is too short ({len} bytes)")]
    Truncated { kind: u8, len: usize },
    #[error("pool name is not UTF-8")]
    BadPoolName,
    #[error("unknown status {0}")]
    BadStatus(u8),
    #[error("empty frame (a frame has at least a kind byte)")]
    Empty,
    #[error("unknown submit flags {0:#04x}")]
    UnknownFlags(u8),
}

/// A decoded frame, borrowing from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Submit {
        id: u64,
        pool: &'a str,
        payload: &'a [u8],
        /// Sent as SUBMIT_WATCH: the client wants the job's PROGRESS and DATA frames.
        watch: bool,
        /// Sent detached (SUBMIT_FLAGS): it runs even if the client goes away first.
        detach: bool,
    },
    Result {
        id: u64,
        status: Status,
        body: &'a [u8],
    },
    Job {
        key: u64,
        payload: &'a [u8],
    },
    Outcome {
        key: u64,
        ok: bool,
        body: &'a [u8],
    },
    Hold {
        paused: bool,
    },
    Leaving {
        /// The exit status the worker is about to exit with (a `WorkerExit` code).
        code: u8,
        /// How many outcomes it wrote before this frame.
        jobs_done: u64,
    },
    WorkProgress {
        key: u64,
        numerator: u64,
        denominator: u64,
    },
    WorkData {
        key: u64,
        data: &'a [u8],
    },
    Progress {
        id: u64,
        numerator: u64,
        denominator: u64,
    },
    Data {
        id: u64,
        data: &'a [u8],
    },
}

impl fmt::Display for Frame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Submit {
                id,
                pool,
                payload,
                watch,
                detach,
            } => {
                let what = match (*watch, *detach) {
                    (false, false) => "submit",
                    (true, false) => "submit (watched)",
                    (false, true) => "submit (detached)",
                    (true, true) => "submit (watched, detached)",
                };
                write!(f, "{what} #{id} to {pool} ({} bytes)", payload.len())
            }
            Frame::Result { id, status, body } => {
                write!(f, "result #{id} {} ({} bytes)", status.as_str(), body.len())
            }
            Frame::Job { key, payload } => write!(f, "job {key} ({} bytes)", payload.len()),
            Frame::Outcome { key, ok, body } => {
                write!(f, "outcome {key} ok={ok} ({} bytes)", body.len())
            }
            Frame::Hold { paused } => write!(f, "hold paused={paused}"),
            Frame::Leaving { code, jobs_done } => {
                write!(f, "leaving status={code} after {jobs_done} jobs")
            }
            Frame::WorkProgress {
                key,
                numerator,
                denominator,
            } => write!(f, "progress of job {key}: {numerator}/{denominator}"),
            Frame::WorkData { key, data } => {
                write!(f, "data of job {key} ({} bytes)", data.len())
            }
            Frame::Progress {
                id,
                numerator,
                denominator,
            } => write!(f, "progress #{id} {numerator}/{denominator}"),
            Frame::Data { id, data } => write!(f, "data #{id} ({} bytes)", data.len()),
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
}

/// Parses one frame's kind + body (the bytes after the length).
pub fn decode(frame: &[u8]) -> Result<Frame<'_>, FrameError> {
    let (&kind, body) = frame.split_first().ok_or(FrameError::Empty)?;
    let short = || FrameError::Truncated {
        kind,
        len: frame.len(),
    };
    // `u64 | u64 | u64`, nothing more: a progress frame.
    let three = |body: &[u8]| match body.len() {
        24 => Some((u64_at(body, 0)?, u64_at(body, 8)?, u64_at(body, 16)?)),
        _ => None,
    };
    match kind {
        kind::SUBMIT | kind::SUBMIT_WATCH | kind::SUBMIT_FLAGS => {
            let (flags, body) = match kind {
                kind::SUBMIT => (0, body),
                kind::SUBMIT_WATCH => (submit_flags::WATCH, body),
                _ => body.split_first().map(|(&f, b)| (f, b)).ok_or_else(short)?,
            };
            if flags & !submit_flags::KNOWN != 0 {
                return Err(FrameError::UnknownFlags(flags));
            }
            let id = u64_at(body, 0).ok_or_else(short)?;
            let pool_len = body
                .get(8..10)
                .map(|s| u16::from_be_bytes([s[0], s[1]]))
                .ok_or_else(short)? as usize;
            let pool = body.get(10..10 + pool_len).ok_or_else(short)?;
            let pool = std::str::from_utf8(pool).map_err(|_| FrameError::BadPoolName)?;
            Ok(Frame::Submit {
                id,
                pool,
                payload: &body[10 + pool_len..],
                watch: flags & submit_flags::WATCH != 0,
                detach: flags & submit_flags::DETACH != 0,
            })
        }
        kind::RESULT => {
            let id = u64_at(body, 0).ok_or_else(short)?;
            let status = *body.get(8).ok_or_else(short)?;
            let status = Status::from_u8(status).ok_or(FrameError::BadStatus(status))?;
            Ok(Frame::Result {
                id,
                status,
                body: &body[9..],
            })
        }
        kind::JOB => {
            let key = u64_at(body, 0).ok_or_else(short)?;
            Ok(Frame::Job {
                key,
                payload: &body[8..],
            })
        }
        kind::OUTCOME => {
            let key = u64_at(body, 0).ok_or_else(short)?;
            let ok = match *body.get(8).ok_or_else(short)? {
                0 => true,
                1 => false,
                other => return Err(FrameError::BadStatus(other)),
            };
            Ok(Frame::Outcome {
                key,
                ok,
                body: &body[9..],
            })
        }
        kind::HOLD => match body {
            [0] => Ok(Frame::Hold { paused: false }),
            [1] => Ok(Frame::Hold { paused: true }),
            [other] => Err(FrameError::BadStatus(*other)),
            _ => Err(short()),
        },
        kind::LEAVING => match body {
            [code, rest @ ..] if rest.len() == 8 => Ok(Frame::Leaving {
                code: *code,
                jobs_done: u64_at(rest, 0).ok_or_else(short)?,
            }),
            _ => Err(short()),
        },
        kind::WORK_PROGRESS => {
            let (key, numerator, denominator) = three(body).ok_or_else(short)?;
            Ok(Frame::WorkProgress {
                key,
                numerator,
                denominator,
            })
        }
        kind::PROGRESS => {
            let (id, numerator, denominator) = three(body).ok_or_else(short)?;
            Ok(Frame::Progress {
                id,
                numerator,
                denominator,
            })
        }
        kind::WORK_DATA => Ok(Frame::WorkData {
            key: u64_at(body, 0).ok_or_else(short)?,
            data: &body[8..],
        }),
        kind::DATA => Ok(Frame::Data {
            id: u64_at(body, 0).ok_or_else(short)?,
            data: &body[8..],
        }),
        other => Err(FrameError::UnknownKind(other)),
    }
}

fn put_header(out: &mut Vec<u8>, kind: u8, body_len: usize) {
    // Callers bound bodies by max_payload (≤ 1 GiB), so the length fits in a u32.
    let len = u32::try_from(1 + body_len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind);
}

/// Appends a submit frame. `pool` longer than 65535 bytes is cut (no real pool name is).
pub fn put_submit(out: &mut Vec<u8>, id: u64, pool: &str, payload: &[u8]) {
    put_submit_head(out, id, pool, payload.len());
    out.extend_from_slice(payload);
}

/// Appends a submit frame up to its payload, which the caller sends right after it (a large
/// payload need not be copied into the buffer).
pub fn put_submit_head(out: &mut Vec<u8>, id: u64, pool: &str, payload_len: usize) {
    put_submit_head_as(out, kind::SUBMIT, id, pool, payload_len)
}

/// [`put_submit_head`] with the kind: SUBMIT, or SUBMIT_WATCH for a job whose progress and
/// data the client wants.
pub fn put_submit_head_as(out: &mut Vec<u8>, kind: u8, id: u64, pool: &str, payload_len: usize) {
    let flags = match kind {
        kind::SUBMIT_WATCH => submit_flags::WATCH,
        _ => 0,
    };
    put_submit_head_flagged(out, flags, id, pool, payload_len)
}

/// [`put_submit_head`] with [`submit_flags`]: as SUBMIT or SUBMIT_WATCH when those say it
/// (a master older than SUBMIT_FLAGS takes them), else as SUBMIT_FLAGS.
pub fn put_submit_head_flagged(
    out: &mut Vec<u8>,
    flags: u8,
    id: u64,
    pool: &str,
    payload_len: usize,
) {
    let pool = &pool.as_bytes()[..pool.len().min(u16::MAX as usize)];
    let body_len = 8 + 2 + pool.len() + payload_len;
    match flags {
        0 => put_header(out, kind::SUBMIT, body_len),
        submit_flags::WATCH => put_header(out, kind::SUBMIT_WATCH, body_len),
        _ => {
            put_header(out, kind::SUBMIT_FLAGS, 1 + body_len);
            out.push(flags);
        }
    }
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(pool.len() as u16).to_be_bytes());
    out.extend_from_slice(pool);
}

/// The bytes of a job frame before its payload.
pub const JOB_HEAD: usize = HEADER + 8;

/// A job frame up to its payload.
pub fn job_head(key: u64, payload_len: usize) -> [u8; JOB_HEAD] {
    let mut head = [0u8; JOB_HEAD];
    // Payloads are bounded by max_payload (≤ 1 GiB), so the length fits in a u32.
    let len = u32::try_from(1 + 8 + payload_len).unwrap_or(u32::MAX);
    head[..4].copy_from_slice(&len.to_be_bytes());
    head[4] = kind::JOB;
    head[5..].copy_from_slice(&key.to_be_bytes());
    head
}

pub fn put_result(out: &mut Vec<u8>, id: u64, status: Status, body: &[u8]) {
    put_result_head(out, id, status, body.len());
    out.extend_from_slice(body);
}

/// A RESULT frame's bytes before its body of `body_len` bytes, which the caller writes after
/// them (a large body in place, not copied behind its head).
pub fn put_result_head(out: &mut Vec<u8>, id: u64, status: Status, body_len: usize) {
    put_header(out, kind::RESULT, 8 + 1 + body_len);
    out.extend_from_slice(&id.to_be_bytes());
    out.push(status as u8);
}

/// A whole job frame in a buffer. (The master writes job frames with [`job_head`] and the
/// payload in place; this is for tests.)
#[cfg(test)]
pub fn put_job(out: &mut Vec<u8>, key: u64, payload: &[u8]) {
    out.extend_from_slice(&job_head(key, payload.len()));
    out.extend_from_slice(payload);
}

pub fn put_outcome(out: &mut Vec<u8>, key: u64, ok: bool, body: &[u8]) {
    put_header(out, kind::OUTCOME, 8 + 1 + body.len());
    out.extend_from_slice(&key.to_be_bytes());
    out.push(u8::from(!ok));
    out.extend_from_slice(body);
}

pub fn put_hold(out: &mut Vec<u8>, paused: bool) {
    put_header(out, kind::HOLD, 1);
    out.push(u8::from(paused));
}

pub fn put_leaving(out: &mut Vec<u8>, code: u8, jobs_done: u64) {
    put_header(out, kind::LEAVING, 1 + 8);
    out.push(code);
    out.extend_from_slice(&jobs_done.to_be_bytes());
}

/// A progress frame: WORK_PROGRESS (`who` is the job's key) or PROGRESS (the client's id).
pub fn put_progress(out: &mut Vec<u8>, kind: u8, who: u64, numerator: u64, denominator: u64) {
    put_header(out, kind, 24);
    out.extend_from_slice(&who.to_be_bytes());
    out.extend_from_slice(&numerator.to_be_bytes());
    out.extend_from_slice(&denominator.to_be_bytes());
}

/// A data frame: WORK_DATA (`who` is the job's key) or DATA (the client's id).
pub fn put_data(out: &mut Vec<u8>, kind: u8, who: u64, data: &[u8]) {
    put_data_head(out, kind, who, data.len());
    out.extend_from_slice(data);
}

/// A DATA or WORK_DATA frame's bytes before its `data_len` bytes of data.
pub fn put_data_head(out: &mut Vec<u8>, kind: u8, who: u64, data_len: usize) {
    put_header(out, kind, 8 + data_len);
    out.extend_from_slice(&who.to_be_bytes());
}

/// An incoming byte stream cut into frames, with a size limit checked on the length prefix —
/// before any of the body is buffered.
///
/// Bytes come in through [`FrameReader::push`] (from a scratch buffer shared by many
/// connections, so an idle connection holds no buffer) or [`FrameReader::read_from`] (straight
/// from a socket into the buffer, no copy; for a busy channel, such as a worker's). Whole
/// frames are handed out as slices of the buffer.
#[derive(Debug)]
pub struct FrameReader {
    /// `buf[start..end]` is unread; `buf[end..]` is initialised room for the next read.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
    /// Whether an oversized SUBMIT is skipped ([`Next::Oversized`]) rather than an error.
    skip_oversized: bool,
    /// Bytes of an oversized frame still to arrive, to be dropped as they do.
    skipping: usize,
}

/// What [`FrameReader::next_frame`] found at the front of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// A whole frame: kind and body.
    Frame(&'a [u8]),
    /// A SUBMIT or SUBMIT_WATCH over the size limit: its id and its announced length (kind
    /// and body). Its other bytes are dropped as they arrive, never buffered.
    Oversized { id: u64, len: usize },
}

/// What [`FrameReader::read_from`] asks one read for, at least.
const READ_CHUNK: usize = 64 << 10;

impl FrameReader {
    /// `max_frame`: the largest kind + body accepted.
    pub fn new(max_frame: usize) -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_frame,
            skip_oversized: false,
            skipping: 0,
        }
    }

    /// A reader that answers an oversized SUBMIT with [`Next::Oversized`] and skips its body,
    /// so that one too-large job costs its sender that job, not its connection.
    pub fn skipping_oversized_submits(max_frame: usize) -> FrameReader {
        FrameReader {
            skip_oversized: true,
            ..FrameReader::new(max_frame)
        }
    }

    /// Appends received bytes (the skipped ones of an oversized frame are dropped here).
    pub fn push(&mut self, bytes: &[u8]) {
        let skipped = self.skipping.min(bytes.len());
        self.skipping -= skipped;
        let bytes = &bytes[skipped..];
        if bytes.is_empty() {
            return;
        }
        self.make_room(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Reads once from `source` straight into the buffer; `Ok(0)` is end of file. Asks for
    /// the rest of the frame being received when its length is known — bounded by what has
    /// arrived so far, so a peer that announces a large frame and sends nothing makes us hold
    /// no more than twice what it sent — and at least [`READ_CHUNK`].
    pub fn read_from(&mut self, source: &mut impl std::io::Read) -> std::io::Result<usize> {
        let want = self
            .missing()
            .clamp(READ_CHUNK, READ_CHUNK.max(self.buffered()));
        self.make_room(want);
        let n = source.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Bytes still missing of the frame at the front, when its length prefix is in (else 0).
    /// The announced length is only a hint for sizing reads.
    fn missing(&self) -> usize {
        let avail = &self.buf[self.start..self.end];
        match avail.get(..4) {
            Some(prefix) => {
                let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
                (4 + len.min(self.max_frame)).saturating_sub(avail.len())
            }
            None => 0,
        }
    }

    /// Makes `want` bytes of room after the unread ones: moves them to the front or grows the
    /// buffer (zero-filling only memory it never had).
    fn make_room(&mut self, want: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            // Never the whole announced frame: a peer that announces 16 MiB and sends 5 bytes
            // must not cost 16 MiB (read_from grows by doubling what has arrived).
            self.buf.resize(self.end + want, 0);
        }
    }

    /// Gives back memory after a burst: called when the connection goes quiet.
    pub fn shrink(&mut self) {
        if self.start == self.end {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }

    /// Like [`FrameReader::shrink`], but keeps a buffer of up to `keep` bytes for a channel
    /// that is busy again soon.
    pub fn shrink_to(&mut self, keep: usize) {
        if self.start == self.end && self.buf.len() > keep {
            self.shrink();
        }
    }

    /// The next whole frame (kind + body), or `None` if more bytes are needed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let max = self.max_frame;
        match self.next_frame()? {
            None => Ok(None),
            Some(Next::Frame(frame)) => Ok(Some(frame)),
            Some(Next::Oversized { len, .. }) => Err(FrameError::TooLarge { len, max }),
        }
    }

    /// Like [`FrameReader::next`], but with [`FrameReader::skipping_oversized_submits`] an
    /// oversized SUBMIT is [`Next::Oversized`] once its kind and id are in; its remaining bytes
    /// are then skipped. Any other oversized frame is still [`FrameError::TooLarge`].
    pub fn next_frame(&mut self) -> Result<Option<Next<'_>>, FrameError> {
        // Bytes of a skipped frame that came in through read_from.
        let skipped = self.skipping.min(self.buffered());
        self.skipping -= skipped;
        self.start += skipped;
        if self.skipping > 0 {
            return Ok(None);
        }
        let avail = &self.buf[self.start..self.end];
        if self.skip_oversized && avail.len() == 4 {
            let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
            if len > self.max_frame {
                // Whether it is a SUBMIT (skipped) or not (refused) is told by its kind byte.
                return Ok(None);
            }
        }
        if self.skip_oversized && avail.len() >= 5 {
            let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
            // The job's id follows the kind (and, in SUBMIT_FLAGS, its flags byte).
            let id_at = match avail[4] {
                kind::SUBMIT | kind::SUBMIT_WATCH => Some(5),
                kind::SUBMIT_FLAGS => Some(6),
                _ => None,
            };
            if let Some(id_at) = id_at.filter(|_| len > self.max_frame) {
                let Some(id) = avail.get(id_at..id_at + 8) else {
                    return Ok(None);
                };
                let id = u64::from_be_bytes(id.try_into().unwrap_or_default());
                let here = avail.len().min(4 + len);
                self.start += here;
                self.skipping = 4 + len - here;
                return Ok(Some(Next::Oversized { id, len }));
            }
        }
        if !self.has_frame()? {
            return Ok(None);
        }
        let avail = &self.buf[self.start..self.end];
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        let from = self.start + 4;
        self.start = from + len;
        Ok(Some(Next::Frame(&self.buf[from..from + len])))
    }

    /// The whole frame at the front (kind and body), owned, when it is at least `min_len`
    /// bytes: the buffer itself is handed over (the frame moved to its front), so a large
    /// frame is never held twice. What follows the frame stays in a new buffer.
    pub fn take_large(&mut self, min_len: usize) -> Result<Option<Vec<u8>>, FrameError> {
        if !self.has_frame()? {
            return Ok(None);
        }
        let avail = &self.buf[self.start..self.end];
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        let from = self.start + 4;
        let after = self.end - (from + len);
        // Only a frame that is most of the buffer, with little after it: the buffer handed
        // over keeps its capacity (a small frame in a large buffer would pin all of it), and
        // what follows is copied.
        if len < min_len || len < self.buf.capacity() / 2 || after > len / 4 {
            return Ok(None);
        }
        let rest = self.buf[from + len..self.end].to_vec();
        let mut frame = std::mem::replace(&mut self.buf, rest);
        self.start = 0;
        self.end = self.buf.len();
        frame.truncate(from + len);
        frame.drain(..from);
        // (A large buffer is its own mapping: giving back its tail costs no copy.)
        frame.shrink_to_fit();
        Ok(Some(frame))
    }

    /// True when a whole frame is buffered (checks the size limit like [`FrameReader::next`]).
    pub fn has_frame(&self) -> Result<bool, FrameError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 4 {
            return Ok(false);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        Ok(avail.len() >= 4 + len)
    }

    /// Bytes held: for bounding what a slow peer can make us buffer.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// True when a partial frame is waiting for more bytes (or one is being skipped).
    pub fn has_partial(&self) -> bool {
        self.buffered() > 0 || self.skipping > 0
    }

    /// The memory the buffer holds (what is unread and the room after it): what a client's
    /// partial frames cost the master.
    pub fn allocated(&self) -> usize {
        self.buf.len()
    }

    /// Bytes still missing of the frame at the front: what finishing it takes.
    pub fn frame_missing(&self) -> usize {
        self.skipping.max(self.missing())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(reader: &mut FrameReader, bytes: &[u8]) {
        reader.push(bytes);
    }

    #[test]
    fn progress_data_and_watched_submits_round_trip() {
        let mut wire = Vec::new();
        put_progress(&mut wire, kind::WORK_PROGRESS, 9, 3, 10);
        put_data(&mut wire, kind::WORK_DATA, 9, b"part");
        put_progress(&mut wire, kind::PROGRESS, 7, u64::MAX, 0);
        put_data(&mut wire, kind::DATA, 7, b"");
        put_submit_head_as(&mut wire, kind::SUBMIT_WATCH, 5, "sleep", 3);
        wire.extend_from_slice(b"600");
        let mut reader = FrameReader::new(1 << 20);
        reader.push(&wire);
        let mut got = Vec::new();
        while let Some(frame) = reader.next().unwrap() {
            got.push(decode(frame).unwrap().to_string());
        }
        assert_eq!(
            got,
            [
                "progress of job 9: 3/10",
                "data of job 9 (4 bytes)",
                format!("progress #7 {}/0", u64::MAX).as_str(),
                "data #7 (0 bytes)",
                "submit (watched) #5 to sleep (3 bytes)",
            ]
        );
        let mut one = Vec::new();
        put_progress(&mut one, kind::PROGRESS, 1, 2, 3);
        assert_eq!(
            decode(&one[4..]).unwrap(),
            Frame::Progress {
                id: 1,
                numerator: 2,
                denominator: 3
            }
        );
        let mut plain = Vec::new();
        put_submit(&mut plain, 1, "p", b"x");
        assert!(matches!(
            decode(&plain[4..]).unwrap(),
            Frame::Submit { watch: false, .. }
        ));
    }

    #[test]
    fn flagged_submits_round_trip_and_unknown_flags_are_errors() {
        use submit_flags::{DETACH, WATCH};
        for (flags, kind, watch, detach) in [
            (0, kind::SUBMIT, false, false),
            (WATCH, kind::SUBMIT_WATCH, true, false),
            (DETACH, kind::SUBMIT_FLAGS, false, true),
            (WATCH | DETACH, kind::SUBMIT_FLAGS, true, true),
        ] {
            let mut wire = Vec::new();
            put_submit_head_flagged(&mut wire, flags, 7, "pool", 2);
            wire.extend_from_slice(b"hi");
            assert_eq!(wire[4], kind, "flags {flags}");
            assert_eq!(
                decode(&wire[4..]).unwrap(),
                Frame::Submit {
                    id: 7,
                    pool: "pool",
                    payload: b"hi",
                    watch,
                    detach
                }
            );
        }
        let mut wire = Vec::new();
        put_submit_head_flagged(&mut wire, DETACH, 1, "p", 0);
        assert_eq!(
            decode(&wire[4..]).unwrap().to_string(),
            "submit (detached) #1 to p (0 bytes)"
        );
        wire[5] = 0x80 | DETACH;
        assert_eq!(decode(&wire[4..]), Err(FrameError::UnknownFlags(0x82)));
        assert_eq!(
            decode(&[kind::SUBMIT_FLAGS]),
            Err(FrameError::Truncated {
                kind: kind::SUBMIT_FLAGS,
                len: 1
            })
        );
        assert!(matches!(
            decode(&[kind::SUBMIT_FLAGS, DETACH, 0, 0]),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn malformed_progress_and_data_frames_are_errors() {
        for k in [kind::WORK_PROGRESS, kind::PROGRESS] {
            // One byte short, one byte long, empty.
            let mut body = vec![k];
            body.extend_from_slice(&[0; 23]);
            assert_eq!(
                decode(&body),
                Err(FrameError::Truncated { kind: k, len: 24 })
            );
            body.extend_from_slice(&[0; 2]);
            assert_eq!(
                decode(&body),
                Err(FrameError::Truncated { kind: k, len: 26 })
            );
            assert_eq!(decode(&[k]), Err(FrameError::Truncated { kind: k, len: 1 }));
        }
        for k in [kind::WORK_DATA, kind::DATA] {
            assert_eq!(
                decode(&[k, 0, 0, 0, 0, 0, 0, 0]),
                Err(FrameError::Truncated { kind: k, len: 8 })
            );
            assert!(decode(&[k, 0, 0, 0, 0, 0, 0, 0, 1]).is_ok());
        }
        assert_eq!(decode(&[13]), Err(FrameError::UnknownKind(13)));
    }

    #[test]
    fn frames_round_trip_even_when_split_byte_by_byte() {
        let mut wire = Vec::new();
        put_submit(&mut wire, 7, "echo", b"hello");
        put_result(&mut wire, 7, Status::Failed, b"boom");
        put_job(&mut wire, 9, b"");
        put_outcome(&mut wire, 9, true, b"x");
        let mut reader = FrameReader::new(1 << 20);
        let mut got = Vec::new();
        for b in &wire {
            feed(&mut reader, &[*b]);
            while let Some(frame) = reader.next().unwrap() {
                got.push(format!("{}", decode(frame).unwrap()));
            }
        }
        assert_eq!(
            got,
            [
                "submit #7 to echo (5 bytes)",
                "result #7 failed (4 bytes)",
                "job 9 (0 bytes)",
                "outcome 9 ok=true (1 bytes)"
            ]
        );
        assert!(!reader.has_partial());
    }

    #[test]
    fn leaving_round_trips_and_rejects_a_wrong_size() {
        let mut wire = Vec::new();
        put_leaving(&mut wire, 201, 42);
        let mut reader = FrameReader::new(1 << 20);
        reader.push(&wire);
        let frame = reader.next().unwrap().unwrap();
        assert_eq!(
            decode(frame),
            Ok(Frame::Leaving {
                code: 201,
                jobs_done: 42
            })
        );
        assert!(decode(&[kind::LEAVING, 0]).is_err());
        assert!(decode(&[kind::LEAVING, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut reader = FrameReader::new(100);
        feed(&mut reader, &1000u32.to_be_bytes());
        assert_eq!(
            reader.next(),
            Err(FrameError::TooLarge {
                len: 1000,
                max: 100
            })
        );
    }

    #[test]
    fn an_oversized_submit_is_named_and_skipped_as_it_arrives_and_the_next_frame_follows() {
        let mut wire = Vec::new();
        put_submit(&mut wire, 42, "p", &[7; 5000]);
        let oversized = wire.len();
        // A flagged one too: its id follows the flags byte.
        put_submit_head_flagged(&mut wire, submit_flags::DETACH, 44, "p", 5000);
        wire.extend_from_slice(&[7; 5000]);
        let flagged = wire.len() - oversized;
        put_submit(&mut wire, 43, "p", b"ok");
        let mut reader = FrameReader::skipping_oversized_submits(100);
        let mut got = Vec::new();
        for piece in wire.chunks(7) {
            reader.push(piece);
            assert!(
                reader.allocated() <= 64,
                "{} bytes held",
                reader.allocated()
            );
            while let Some(next) = reader.next_frame().unwrap() {
                got.push(match next {
                    Next::Frame(frame) => decode(frame).unwrap().to_string(),
                    Next::Oversized { id, len } => format!("oversized #{id} ({len} bytes)"),
                });
            }
        }
        assert_eq!(
            got,
            [
                format!("oversized #42 ({} bytes)", oversized - 4),
                format!("oversized #44 ({} bytes)", flagged - 4),
                "submit #43 to p (2 bytes)".into()
            ]
        );
        assert!(!reader.has_partial());
        // Its length alone (4 bytes, the kind not in yet) decides nothing.
        let mut reader = FrameReader::skipping_oversized_submits(100);
        reader.push(&wire[..4]);
        assert!(matches!(reader.next_frame(), Ok(None)));
        reader.push(&wire[4..oversized]);
        assert!(matches!(
            reader.next_frame(),
            Ok(Some(Next::Oversized { id: 42, .. }))
        ));
        // Any other kind over the limit is still an error, as is an oversized SUBMIT for a
        // reader that does not skip.
        let mut reader = FrameReader::skipping_oversized_submits(100);
        reader.push(&[0, 0, 1, 0, kind::RESULT]);
        assert!(matches!(
            reader.next_frame(),
            Err(FrameError::TooLarge { .. })
        ));
        let mut reader = FrameReader::new(100);
        reader.push(&wire[..20]);
        assert!(matches!(reader.next(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        assert_eq!(decode(&[]), Err(FrameError::Empty));
        assert_eq!(decode(&[99]), Err(FrameError::UnknownKind(99)));
        assert!(matches!(
            decode(&[kind::SUBMIT, 0, 0]),
            Err(FrameError::Truncated { .. })
        ));
        let mut wire = Vec::new();
        put_submit(&mut wire, 1, "p", b"");
        wire[4 + 1 + 8 + 1] = 200; // pool length beyond the frame
        assert!(matches!(
            decode(&wire[4..]),
            Err(FrameError::Truncated { .. })
        ));
        assert_eq!(
            decode(&[kind::RESULT, 0, 0, 0, 0, 0, 0, 0, 1, 9]),
            Err(FrameError::BadStatus(9))
        );
    }
}

/// The frame reader against streams cut at random places, and against peers that announce
/// more than they send.
#[cfg(test)]
mod chunked_reads {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A reader that hands out a byte stream in random-sized pieces.
    struct Chunked<'a> {
        data: &'a [u8],
        pos: usize,
        rng: Rng,
    }
    impl std::io::Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.pos == self.data.len() {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = (1 + self.rng.below(200_000) as usize)
                .min(buf.len())
                .min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn frames_round_trip_with_random_sizes_and_chunking() {
        for seed in 1..200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut wire = Vec::new();
            let mut sent = Vec::new();
            for key in 0..(1 + rng.below(40)) {
                let len = match rng.below(4) {
                    0 => 0,
                    1 => rng.below(100),
                    2 => rng.below(70_000),
                    _ => rng.below(400_000),
                } as usize;
                let payload: Vec<u8> = (0..len).map(|i| (i as u64 ^ key) as u8).collect();
                put_job(&mut wire, key, &payload);
                sent.push((key, payload));
            }
            let use_push = seed % 2 == 0;
            let mut reader = FrameReader::new(1 << 30);
            let mut source = Chunked {
                data: &wire,
                pos: 0,
                rng: Rng(seed + 7),
            };
            let mut got = Vec::new();
            loop {
                let progressed = if use_push {
                    let mut scratch = vec![0u8; 1 + source.rng.below(100_000) as usize];
                    match std::io::Read::read(&mut source, &mut scratch) {
                        Ok(n) => {
                            reader.push(&scratch[..n]);
                            true
                        }
                        Err(_) => false,
                    }
                } else {
                    reader.read_from(&mut source).is_ok()
                };
                while let Some(frame) = reader.next().unwrap() {
                    match decode(frame).unwrap() {
                        Frame::Job { key, payload } => got.push((key, payload.to_vec())),
                        other => panic!("{other}"),
                    }
                }
                if rng.below(5) == 0 {
                    reader.shrink_to(rng.below(300_000) as usize);
                }
                if !progressed {
                    break;
                }
            }
            assert_eq!(got, sent, "seed {seed}");
            assert!(!reader.has_partial());
        }
    }

    /// A peer that announces a large frame and sends one more byte.
    #[test]
    fn an_announced_frame_does_not_make_the_reader_allocate_it_before_it_arrives() {
        let max = (16 << 20) + 1035; // the master's client max_frame with the default max_payload
        let mut reader = FrameReader::new(max);
        reader.push(&(max as u32).to_be_bytes());
        reader.push(&[kind::SUBMIT]);
        assert!(
            reader.buf.len() <= 2 * 64 * 1024,
            "5 bytes received, {} bytes allocated and zero-filled",
            reader.buf.len()
        );
    }

    #[test]
    fn read_from_is_bounded_too() {
        let max = 1 << 30;
        let mut reader = FrameReader::new(max);
        let mut head: &[u8] = &[0x3f, 0xff, 0xff, 0xff, kind::SUBMIT];
        reader.read_from(&mut head).unwrap();
        let mut more: &[u8] = &[0];
        reader.read_from(&mut more).unwrap();
        assert!(
            reader.buf.len() <= 2 * 64 * 1024,
            "{} bytes allocated",
            reader.buf.len()
        );
    }
}
