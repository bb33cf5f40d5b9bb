//! Where a worker's work comes from. The batch-runner loop asks a [`JobSource`] for the next
//! unit of work; job mode reads jobs from the master, loop mode lets the plugin pull its own.
//! A later source (an external engine consumed by each worker directly) is one more impl.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use jobhost_plugin_api::abi_stable::std_types::{RResult, RSlice};
use jobhost_plugin_api::{PluginInstance, Step};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::protocol::{self, Frame, FrameReader};

/// What one step of a source produced.
pub enum Next {
    /// One unit of work was done (and reported, in job mode).
    Worked,
    /// Nothing to do now: sleep until woken, or at most `timeout`.
    Idle(Wake),
    /// The plugin asked this worker to stop for good.
    Stop,
    /// The master closed the channel.
    Closed,
}

pub struct Wake {
    pub timeout: Option<Duration>,
}

pub trait JobSource {
    /// Does at most one unit of work. Never blocks waiting for work: returns `Idle` instead.
    fn next(&mut self, plugin: &mut PluginInstance) -> io::Result<Next>;
    /// An fd whose readability means "work may be there" (job mode's channel).
    fn wake_fd(&self) -> Option<BorrowedFd<'_>>;
    /// The worker's socketpair with the master (for its LEAVING frame).
    fn channel(&self) -> BorrowedFd<'_>;
    /// The worker holds back (the system is short of memory) or takes work again: job mode
    /// tells the master, so it sends no more jobs meanwhile and does not count the wait
    /// against `job_timeout`.
    fn hold(&mut self, _paused: bool) -> io::Result<()> {
        Ok(())
    }
    /// The worker is leaving between two jobs: write what is computed, give back what was
    /// taken but not started (an engine's source).
    fn retire(&mut self) {}
}

/// The most a single job frame may be: the master enforces `max_payload` on clients; this
/// only guards the worker against a corrupt stream.
const MAX_JOB_FRAME: usize = 1 << 30;

/// What an idle worker keeps of its receive buffer.
const KEEP_BUFFER: usize = 4 << 20;

/// Job mode: jobs arrive on the socketpair; outcomes go back on it.
pub struct MasterSource {
    channel: UnixStream,
    reader: FrameReader,
    out: Vec<u8>,
    /// The master closed its end; serve what is buffered, then stop.
    closed: bool,
}

impl MasterSource {
    pub fn new(channel: OwnedFd) -> MasterSource {
        let channel = UnixStream::from(channel);
        // Non-blocking reads let the loop ask "is there a job?" without sleeping in read(2).
        let _ = channel.set_nonblocking(true);
        MasterSource {
            channel,
            reader: FrameReader::new(MAX_JOB_FRAME),
            out: Vec::new(),
            closed: false,
        }
    }

    /// Reads what is there, straight into the frame buffer. Ok(false) = the master closed
    /// the channel.
    fn fill(&mut self) -> io::Result<bool> {
        loop {
            match self.reader.read_from(&mut self.channel) {
                Ok(0) => return Ok(false),
                Ok(_) => {
                    if self.reader.has_frame().unwrap_or(true) {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes all pending outcomes, waiting for room if the master is slow to read.
    fn flush(&mut self) -> io::Result<()> {
        let mut written = 0;
        while written < self.out.len() {
            match self.channel.write(&self.out[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(self.channel.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::NONE);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        Ok(())
    }
}

fn bad_frame(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad frame from the master: {e}"),
    )
}

impl JobSource for MasterSource {
    fn next(&mut self, plugin: &mut PluginInstance) -> io::Result<Next> {
        if !self.reader.has_frame().map_err(bad_frame)? && !self.closed {
            self.closed = !self.fill()?;
        }
        let Some(frame) = self.reader.next().map_err(bad_frame)? else {
            if self.closed {
                return Ok(Next::Closed);
            }
            // Busy again soon, most likely: keep a buffer the size of an ordinary burst.
            self.reader.shrink_to(KEEP_BUFFER);
            return Ok(Next::Idle(Wake { timeout: None }));
        };
        let (key, payload) = match protocol::decode(frame).map_err(bad_frame)? {
            Frame::Job { key, payload } => (key, payload),
            other => return Err(bad_frame(format!("unexpected {other}"))),
        };
        match plugin.handle(RSlice::from_slice(payload)) {
            RResult::ROk(result) => protocol::put_outcome(&mut self.out, key, true, &result),
            RResult::RErr(message) => {
                protocol::put_outcome(&mut self.out, key, false, message.as_bytes())
            }
        }
        // Report at once: the master times jobs by their outcomes, and a client waits for it.
        self.flush()?;
        Ok(Next::Worked)
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.channel.as_fd())
    }

    fn channel(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    fn hold(&mut self, paused: bool) -> io::Result<()> {
        protocol::put_hold(&mut self.out, paused);
        self.flush()
    }
}

/// Loop mode: the plugin fetches its own work in `run_once`.
pub struct LoopSource {
    /// Held open so the master sees this worker alive; only LEAVING is sent on it.
    channel: OwnedFd,
    idle_sleep: Duration,
}

impl LoopSource {
    pub fn new(channel: OwnedFd, idle_sleep: Duration) -> LoopSource {
        LoopSource {
            channel,
            idle_sleep,
        }
    }
}

impl JobSource for LoopSource {
    fn next(&mut self, plugin: &mut PluginInstance) -> io::Result<Next> {
        Ok(match plugin.run_once() {
            RResult::ROk(Step::More) => Next::Worked,
            RResult::ROk(Step::Idle) => Next::Idle(Wake {
                timeout: Some(self.idle_sleep),
            }),
            RResult::ROk(Step::Stop) => Next::Stop,
            RResult::RErr(message) => {
                // Sleep like Idle, so a plugin that keeps failing does not spin.
                log::error!("run_once failed: {message}");
                Next::Idle(Wake {
                    timeout: Some(self.idle_sleep),
                })
            }
        })
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn channel(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }
}
