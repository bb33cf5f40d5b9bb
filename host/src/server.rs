//! The job server's sockets: binding a Unix listener safely (with its mode and, if
//! configured, its group — for the admin socket too), and one [`Connection`] per client — non-blocking reads cut into frames, a bounded output buffer, back-pressure.
//!
//! Owns bytes and sockets only. It never decides what a submit means (the master does) and
//! never blocks: every read and write is non-blocking and driven by the master's epoll loop.
//! A connection that sends garbage is closed; nothing a client sends can stop the master.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::config::SocketGroup;
use crate::protocol::{self, kind, FrameError, FrameReader};

/// Flow control: stop reading a client while what it has made the master hold — payloads of
/// its accepted, unanswered jobs plus its unread results — passes this; resume under
/// [`RESUME_BELOW`]. A client that never reads, or floods a slow pool, waits; the master's
/// memory does not grow with it. (One job over the budget is still taken: it is never stuck.)
pub const PAUSE_ABOVE: usize = 16 << 20;
pub const RESUME_BELOW: usize = 8 << 20;
/// Above this much unwritten output, a client's PROGRESS frames wait (coalesced: the latest
/// per job id wins) until its output drains; DATA and RESULT frames are never held back (they
/// count against [`PAUSE_ABOVE`] like results).
pub const PROGRESS_ABOVE: usize = 256 << 10;
/// How much one connection may read per wake-up, so one busy client cannot starve others.
pub const READ_BUDGET: usize = 1 << 20;
/// A result or data body at least this large is queued as its own output chunk, moved in and
/// written in place (writev), never copied behind its head.
pub const OWN_CHUNK: usize = 64 << 10;
/// Output chunks one writev carries at most.
const WRITE_SLICES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another jobhost master is already listening on {0}")]
    InUse(PathBuf),
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot give {path} to group {group} (gid {gid}): {source}; the master must run as root or be a member of that group")]
    Group {
        path: PathBuf,
        group: String,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds a Unix socket at `path` with permissions `mode` (and, with `group`, owned by that
/// group: `socket_group`), replacing a stale socket file left by a dead master — but never one
/// a live master still answers on.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<&SocketGroup>,
) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.to_owned()));
            }
            fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io)?;
    }
    // Create the socket with no permissions for anyone, give it to its group, then open it up
    // to `mode`: there is no moment at which it is more open than configured, nor open to
    // the wrong group. It is made under a temporary name and renamed into place once it
    // listens, so that whoever sees the file can connect (bind and listen are two steps).
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{file_name}.{}.new", std::process::id()));
    match fs::symlink_metadata(&temporary) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(&temporary).map_err(io)?,
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: temporary.clone(),
            })
        }
        Err(_) => {}
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o777));
    let bound = UnixListener::bind(&temporary);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io)?;
    let placed = (|| {
        if let Some(group) = group {
            // The path, not the fd: fchown on a socket changes the socket, not its file.
            // lchown: what we just bound is no symlink, and a swapped-in one is not followed.
            std::os::unix::fs::lchown(&temporary, None, Some(group.gid)).map_err(|source| {
                BindError::Group {
                    path: path.to_owned(),
                    group: group.name.clone(),
                    gid: group.gid,
                    source,
                }
            })?;
        }
        fs::set_permissions(&temporary, fs::Permissions::from_mode(mode)).map_err(io)?;
        fs::rename(&temporary, path).map_err(io)
    })();
    if let Err(e) = placed {
        let _ = fs::remove_file(&temporary);
        return Err(e);
    }
    listener.set_nonblocking(true).map_err(io)?;
    Ok(listener)
}

/// What reading a connection produced.
pub enum ReadOutcome {
    /// More may come later.
    Open,
    /// The peer closed its end (or the connection failed): drop it.
    Closed,
}

/// One client of the job server.
pub struct Connection {
    pub stream: UnixStream,
    pub reader: FrameReader,
    /// Output in order: small frames gathered into chunks, large bodies as their own.
    out: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already written.
    out_pos: usize,
    /// Bytes of every chunk in `out`, the written part of the front one included.
    out_len: usize,
    /// Not reading: the client holds too much of the master's memory (see [`PAUSE_ABOVE`]).
    pub paused: bool,
    /// Not reading: the master's budget for all clients is spent and this one is over its
    /// fair share (the master's [`crate::config::ServerConfig::max_memory`]).
    pub held_back: bool,
    /// Payload bytes of this client's accepted jobs that are not answered yet.
    pub outstanding: usize,
    /// What this client was last counted as holding in the master's total.
    pub accounted: usize,
    /// Whether epoll should report writability (output is pending).
    pub wants_write: bool,
    /// The frame being received must be whole by then (`server.read_timeout`); None while no
    /// frame is started, or while the master is not reading this client.
    pub read_deadline: Option<std::time::Instant>,
    /// While not reading: what was left of the read timeout when reading stopped.
    pub read_time_left: Option<std::time::Duration>,
    /// The time of this client's entry in the master's heap of read deadlines, if it has one
    /// (at most one is live: a later deadline is queued when that one comes up).
    pub read_timer_queued: Option<std::time::Instant>,
    /// PROGRESS frames held back while its output is over [`PROGRESS_ABOVE`]: (id, numerator,
    /// denominator), one per id, the latest. Bounded by its unanswered watched jobs.
    deferred_progress: Vec<(u64, u64, u64)>,
}

impl Connection {
    pub fn new(stream: UnixStream, max_frame: usize) -> io::Result<Connection> {
        stream.set_nonblocking(true)?;
        Ok(Connection {
            stream,
            reader: FrameReader::skipping_oversized_submits(max_frame),
            out: VecDeque::new(),
            out_pos: 0,
            out_len: 0,
            paused: false,
            held_back: false,
            outstanding: 0,
            accounted: 0,
            wants_write: false,
            read_deadline: None,
            read_time_left: None,
            read_timer_queued: None,
            deferred_progress: Vec::new(),
        })
    }

    /// Reads what the socket has, up to about `budget` bytes (at most [`READ_BUDGET`]), into
    /// the frame reader.
    pub fn read(&mut self, scratch: &mut [u8], budget: usize) -> ReadOutcome {
        let mut budget = budget.min(READ_BUDGET);
        while budget > 0 {
            let want = scratch.len().min(budget);
            match self.stream.read(&mut scratch[..want]) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => {
                    self.reader.push(&scratch[..n]);
                    budget = budget.saturating_sub(n);
                    if n < want {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadOutcome::Closed,
            }
        }
        ReadOutcome::Open
    }

    /// Appends small frames with `put` to the last chunk, unless it is full or a large body
    /// of its own.
    fn append(&mut self, put: impl FnOnce(&mut Vec<u8>)) {
        if self.out.back().is_none_or(|last| last.len() >= OWN_CHUNK) {
            self.out.push_back(Vec::new());
        }
        if let Some(last) = self.out.back_mut() {
            let before = last.len();
            put(last);
            self.out_len += last.len() - before;
        }
    }

    /// Queues a large body as its own chunk (after its head).
    fn append_chunk(&mut self, body: Vec<u8>) {
        self.out_len += body.len();
        self.out.push_back(body);
    }

    /// Appends a RESULT frame; a large body is moved in as its own chunk, not copied.
    pub fn put_result(&mut self, id: u64, status: protocol::Status, body: Vec<u8>) {
        if body.len() < OWN_CHUNK {
            self.append(|out| protocol::put_result(out, id, status, &body));
        } else {
            self.append(|out| protocol::put_result_head(out, id, status, body.len()));
            self.append_chunk(body);
        }
    }

    /// Appends a DATA frame; large data is moved in as its own chunk, not copied.
    pub fn put_data(&mut self, id: u64, data: Vec<u8>) {
        if data.len() < OWN_CHUNK {
            self.append(|out| protocol::put_data(out, kind::DATA, id, &data));
        } else {
            self.append(|out| protocol::put_data_head(out, kind::DATA, id, data.len()));
            self.append_chunk(data);
        }
    }

    /// Appends a PROGRESS frame for the job the client calls `id`, or, while its output is
    /// over [`PROGRESS_ABOVE`], holds it back in place of the one held for that id.
    pub fn put_progress(&mut self, id: u64, numerator: u64, denominator: u64) {
        if self.pending_out() <= PROGRESS_ABOVE && self.deferred_progress.is_empty() {
            self.append(|out| {
                protocol::put_progress(out, kind::PROGRESS, id, numerator, denominator)
            });
            return;
        }
        match self.deferred_progress.iter_mut().find(|(i, _, _)| *i == id) {
            Some(held) => *held = (id, numerator, denominator),
            None => self.deferred_progress.push((id, numerator, denominator)),
        }
    }

    /// The job `id` is answered: progress held back for it is moot.
    pub fn forget_progress(&mut self, id: u64) {
        self.deferred_progress.retain(|(i, _, _)| *i != id);
    }

    /// Progress frames held back (for tests and the log).
    pub fn deferred_progress(&self) -> usize {
        self.deferred_progress.len()
    }

    pub fn pending_out(&self) -> usize {
        self.out_len - self.out_pos
    }

    /// What this client makes the master hold: unanswered payloads and unread results.
    pub fn held(&self) -> usize {
        self.outstanding + self.pending_out()
    }

    /// What this client costs the master's memory in all: [`Connection::held`] and its
    /// partial frame's buffer (`server.max_memory` counts this).
    pub fn memory(&self) -> usize {
        self.held() + self.reader.allocated()
    }

    /// Whether reading should pause, with hysteresis between the two marks.
    pub fn over_budget(&self) -> bool {
        if self.paused {
            self.held() > RESUME_BELOW
        } else {
            self.held() > PAUSE_ABOVE
        }
    }

    /// Whether the master is reading this client now (neither pause applies).
    pub fn reading(&self) -> bool {
        !self.paused && !self.held_back
    }

    /// Writes what it can, then the progress held back once there is room for it. Err = the
    /// peer is gone.
    pub fn flush(&mut self) -> io::Result<()> {
        self.write_out()?;
        if !self.deferred_progress.is_empty() && self.pending_out() <= PROGRESS_ABOVE {
            for (id, numerator, denominator) in std::mem::take(&mut self.deferred_progress) {
                self.append(|out| {
                    protocol::put_progress(out, kind::PROGRESS, id, numerator, denominator)
                });
            }
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> io::Result<()> {
        while self.pending_out() > 0 {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let mut count = 0;
            for (i, chunk) in self.out.iter().take(WRITE_SLICES).enumerate() {
                let from = if i == 0 { self.out_pos } else { 0 };
                slices[i] = IoSlice::new(&chunk[from..]);
                count = i + 1;
            }
            match self.stream.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `n` more bytes were written: drop the chunks written whole (their memory goes back).
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.out.front() else {
                return;
            };
            let left = front.len() - self.out_pos;
            if n < left {
                self.out_pos += n;
                return;
            }
            n -= left;
            self.out_len -= front.len();
            self.out_pos = 0;
            self.out.pop_front();
        }
    }
}

/// Why a connection is being closed, for the log.
/// Why the master closes a client's connection (its accepted jobs still run).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("malformed frame: {0}")]
    Malformed(#[from] FrameError),
    #[error("unexpected frame from a client: {0}")]
    Unexpected(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_waits_coalesced_while_the_client_does_not_read_and_follows_when_it_does() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut conn = Connection::new(ours, 1 << 20).unwrap();
        // Fill the socket, then more than PROGRESS_ABOVE of results the client does not read.
        while conn.pending_out() <= PROGRESS_ABOVE {
            conn.put_result(1, protocol::Status::Ok, vec![0; 64 << 10]);
            conn.flush().unwrap();
        }
        let held = conn.pending_out();
        for n in 0..1000 {
            conn.put_progress(7, n, 1000);
            conn.put_progress(8, n, 1000);
        }
        assert_eq!(conn.deferred_progress(), 2, "one per job, the latest");
        assert_eq!(conn.pending_out(), held, "nothing buffered for them");
        conn.forget_progress(8);
        // The client reads everything: the latest progress of job 7 follows.
        theirs.set_nonblocking(true).unwrap();
        let mut reader = FrameReader::new(1 << 20);
        let mut buf = vec![0; 1 << 16];
        let mut progress = Vec::new();
        for _ in 0..10_000 {
            conn.flush().unwrap();
            match theirs.read(&mut buf) {
                Ok(n) => reader.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if conn.pending_out() == 0 && conn.deferred_progress() == 0 {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
            while let Some(frame) = reader.next().unwrap() {
                if let protocol::Frame::Progress { id, numerator, .. } =
                    protocol::decode(frame).unwrap()
                {
                    progress.push((id, numerator));
                }
            }
        }
        assert_eq!(progress, [(7, 999)]);
    }
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn bind_sets_mode_and_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // Root may give the socket any group; anyone else only one of their own.
        let gid = if nix::unistd::geteuid().is_root() {
            4242
        } else {
            nix::unistd::getegid().as_raw()
        };
        let group = SocketGroup {
            name: gid.to_string(),
            gid,
        };
        let _listener = bind(&path, 0o640, Some(&group)).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.gid(), gid);
        assert_eq!(meta.mode() & 0o7777, 0o640);
        // Without a group: the mode only, the group is the creator's.
        let other = dir.path().join("t.sock");
        let _listener = bind(&other, 0o600, None).unwrap();
        let meta = fs::symlink_metadata(&other).unwrap();
        assert_eq!(meta.gid(), nix::unistd::getegid().as_raw());
        assert_eq!(meta.mode() & 0o7777, 0o600);
    }
}
