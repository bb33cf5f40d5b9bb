//! The job server's sockets: binding a Unix listener safely (with its mode and, if
//! configured, its group — for the admin socket too), and one [`Connection`] per client — non-blocking reads cut into frames, a bounded output buffer, back-pressure.
//!
//! Owns bytes and sockets only. It never decides what a submit means (the master does) and
//! never blocks: every read and write is non-blocking and driven by the master's epoll loop.
//! A connection that sends garbage is closed; nothing a client sends can stop the master.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::config::SocketGroup;
use crate::protocol::{FrameError, FrameReader};

/// Flow control: stop reading a client while what it has made the master hold — payloads of
/// its accepted, unanswered jobs plus its unread results — passes this; resume under
/// [`RESUME_BELOW`]. A client that never reads, or floods a slow pool, waits; the master's
/// memory does not grow with it. (One job over the budget is still taken: it is never stuck.)
pub const PAUSE_ABOVE: usize = 16 << 20;
pub const RESUME_BELOW: usize = 8 << 20;
/// How much one connection may read per wake-up, so one busy client cannot starve others.
const READ_BUDGET: usize = 1 << 20;

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
    out: Vec<u8>,
    out_pos: usize,
    /// Not reading: the client holds too much of the master's memory (see [`PAUSE_ABOVE`]).
    pub paused: bool,
    /// Payload bytes of this client's accepted jobs that are not answered yet.
    pub outstanding: usize,
    /// Whether epoll should report writability (output is pending).
    pub wants_write: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, max_frame: usize) -> io::Result<Connection> {
        stream.set_nonblocking(true)?;
        Ok(Connection {
            stream,
            reader: FrameReader::new(max_frame),
            out: Vec::new(),
            out_pos: 0,
            paused: false,
            outstanding: 0,
            wants_write: false,
        })
    }

    /// Reads what the socket has (up to a budget) into the frame reader.
    pub fn read(&mut self, scratch: &mut [u8]) -> ReadOutcome {
        let mut budget = READ_BUDGET;
        while budget > 0 {
            match self.stream.read(scratch) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => {
                    self.reader.push(&scratch[..n]);
                    budget = budget.saturating_sub(n);
                    if n < scratch.len() {
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

    /// The buffer results are appended to.
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    pub fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// What this client makes the master hold: unanswered payloads and unread results.
    pub fn held(&self) -> usize {
        self.outstanding + self.pending_out()
    }

    /// Whether reading should pause, with hysteresis between the two marks.
    pub fn over_budget(&self) -> bool {
        if self.paused {
            self.held() > RESUME_BELOW
        } else {
            self.held() > PAUSE_ABOVE
        }
    }

    /// Writes what it can. Err = the peer is gone.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > RESUME_BELOW {
                self.out = Vec::new();
            }
        } else if self.out_pos > RESUME_BELOW {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
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
