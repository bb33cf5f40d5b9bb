//! What the job socket's clients may cost the master, all together: memory
//! (`server.max_memory`: their partial frames, their unanswered payloads, their unwritten
//! output) and time (`server.read_timeout`: a frame started must be finished).
//!
//! Owns the running total, who is held back, who may finish a frame over its share, and the
//! heap of read deadlines. It never reads or writes a socket itself and never decides anything
//! about a job; it only says whether a client is read, and closes one whose frame is too slow.
//!
//! Fairness: past the budget, a client under its fair share (max_memory / clients holding
//! memory) keeps reading; one client at a time may finish the frame it has started even over
//! its share, so a budget full of partial frames always drains into jobs, which are answered.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::token::Token;
use super::Master;
use crate::server::Connection;
use std::os::fd::AsFd;

/// Closes for a slow frame are logged at most this often (with a count).
const TIMEOUT_LOG_EVERY: Duration = Duration::from_secs(1);
/// Past the budget, a fair-share allowance smaller than this is no reason to wake: the client
/// waits for more room instead of reading a few bytes per pass.
const MIN_READ: usize = 64 << 10;

#[derive(Default)]
pub(super) struct ClientLimits {
    /// The sum of every client's [`Connection::accounted`].
    memory: usize,
    /// Clients whose `accounted` is not zero.
    holders: usize,
    /// Clients not read because the budget is spent (some may have been let go since).
    held_back: Vec<u64>,
    /// The one client allowed to finish its frame over its share.
    finisher: Option<u64>,
    /// Memory was given back since held-back clients were last looked at.
    freed: bool,
    /// (deadline, client): at most one live entry per client, stale ones skipped when popped.
    read_deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    /// What clients that left held, since the heap was last trimmed ([`give_back_freed_heap`]).
    freed_since_trim: usize,
    /// Closed for a slow frame and not yet logged.
    timed_out: usize,
    timeout_logged: Option<Instant>,
}

impl ClientLimits {
    /// A client is gone: what it held is free.
    pub(super) fn forget(&mut self, id: u64, conn: &Connection) {
        self.memory = self.memory.saturating_sub(conn.accounted);
        if conn.accounted > 0 {
            self.holders = self.holders.saturating_sub(1);
        }
        if self.finisher == Some(id) {
            self.finisher = None;
        }
        self.freed = true;
        self.freed_since_trim = self.freed_since_trim.saturating_add(conn.accounted);
    }

    /// After a client is gone (and its queued jobs dropped): once clients that left have freed
    /// [`TRIM_AFTER`] since the last time, or the last one left, the heap's free pages go back
    /// to the OS.
    /// (`last`: no client is left, so anything freed is worth giving back.)
    pub(super) fn trim_if_worth_it(&mut self, last: bool) {
        if self.freed_since_trim >= TRIM_AFTER || (last && self.freed_since_trim >= 1 << 20) {
            self.freed_since_trim = 0;
            give_back_freed_heap();
        }
    }
}

/// Freed by departed clients before the heap is trimmed: a trim walks the heap (milliseconds
/// for hundreds of MiB), so it runs once per this much freed, never per small client.
const TRIM_AFTER: usize = 32 << 20;

impl Master {
    fn max_memory(&self) -> usize {
        usize::try_from(self.config.server.max_memory).unwrap_or(usize::MAX)
    }

    /// How much client `id` may read now, or None: it waits for memory to be freed. May make
    /// it the client that finishes its frame over its share.
    pub(super) fn read_allowance(&mut self, id: u64) -> Option<usize> {
        let max = self.max_memory();
        let limits = &mut self.io.client_limits;
        let conn = self.io.clients.get(&id)?;
        let mine = conn.accounted;
        let room = max.saturating_sub(limits.memory);
        let holders = limits.holders + usize::from(mine == 0);
        let share = max / holders.max(1);
        // A client under its share reads even past the budget — but never past twice it: each
        // newcomer's share is taken anew, and a stream of them would add up without bound.
        let ceiling = max.saturating_mul(2).saturating_sub(limits.memory);
        let allowance = room.max(share.saturating_sub(mine).min(ceiling));
        if allowance >= MIN_READ.min(max / 64).max(1) {
            return Some(allowance);
        }
        if conn.reader.has_partial() && limits.finisher.is_none_or(|f| f == id) {
            limits.finisher = Some(id);
            return Some(conn.reader.frame_missing().max(16));
        }
        None
    }

    /// Stops reading client `id` until memory is freed ([`Master::release_held_back`]).
    pub(super) fn hold_back(&mut self, id: u64) {
        let Some(conn) = self.io.clients.get_mut(&id) else {
            return;
        };
        if !conn.held_back {
            conn.held_back = true;
            self.io.client_limits.held_back.push(id);
            self.set_interest(id);
        }
        self.read_done(id, false);
    }

    /// Lets held-back clients read again once memory was freed and they may.
    pub(super) fn release_held_back(&mut self) {
        let limits = &mut self.io.client_limits;
        if limits.held_back.is_empty() || !(limits.freed || limits.finisher.is_none()) {
            return;
        }
        limits.freed = false;
        let mut held = std::mem::take(&mut limits.held_back);
        held.retain(|&id| {
            if !self.io.clients.get(&id).is_some_and(|c| c.held_back) {
                return false;
            }
            if self.read_allowance(id).is_none() {
                return true;
            }
            if let Some(conn) = self.io.clients.get_mut(&id) {
                conn.held_back = false;
            }
            self.set_interest(id);
            self.read_done(id, false);
            // Frames already in its buffer are taken when it is flushed.
            self.io.dirty_clients.push(id);
            false
        });
        held.append(&mut self.io.client_limits.held_back);
        self.io.client_limits.held_back = held;
    }

    /// Tells epoll what client `id` waits for: reading unless paused or held back, writing
    /// while output is pending.
    pub(super) fn set_interest(&self, id: u64) {
        let Some(conn) = self.io.clients.get(&id) else {
            return;
        };
        let mut flags = EpollFlags::empty();
        if conn.reading() {
            flags |= EpollFlags::EPOLLIN;
        }
        if conn.wants_write {
            flags |= EpollFlags::EPOLLOUT;
        }
        let mut event = EpollEvent::new(flags, Token::Client(id).encode());
        if let Some(epoll) = &self.io.epoll {
            let _ = epoll.modify(conn.stream.as_fd(), &mut event);
        }
    }

    /// After reading, answering or pausing client `id`: counts what it holds now, and starts,
    /// stops or resumes the clock on its frame (`frame_done`: at least one frame was taken).
    pub(super) fn read_done(&mut self, id: u64, frame_done: bool) {
        let timeout = self.config.server.read_timeout;
        let now = self.now;
        let limits = &mut self.io.client_limits;
        let Some(conn) = self.io.clients.get_mut(&id) else {
            return;
        };
        let memory = conn.memory();
        limits.memory = (limits.memory + memory).saturating_sub(conn.accounted);
        match (conn.accounted > 0, memory > 0) {
            (false, true) => limits.holders += 1,
            (true, false) => limits.holders = limits.holders.saturating_sub(1),
            _ => {}
        }
        if memory < conn.accounted {
            limits.freed = true;
        }
        conn.accounted = memory;
        let partial = conn.reader.has_partial();
        if limits.finisher == Some(id) && (frame_done || !partial || conn.paused) {
            limits.finisher = None;
            limits.freed = true;
        }
        if frame_done || !partial {
            conn.read_deadline = None;
            conn.read_time_left = None;
        }
        if !partial {
            return;
        }
        if conn.paused {
            // Time the master does not read this client because it does not read its own
            // results is not counted against its frame. Held back for the budget, its clock
            // runs: a frame left unfinished holds memory others wait for, and the budget must
            // drain (a client under its share is not held back).
            if let Some(deadline) = conn.read_deadline.take() {
                conn.read_time_left = Some(deadline.saturating_duration_since(now));
            } else if conn.read_time_left.is_none() {
                conn.read_time_left = Some(timeout);
            }
        } else if conn.read_deadline.is_none() {
            let at = now + conn.read_time_left.take().unwrap_or(timeout);
            conn.read_deadline = Some(at);
            if conn.read_timer_queued.is_none_or(|queued| queued > at) {
                limits.read_deadlines.push(Reverse((at, id)));
                conn.read_timer_queued = Some(at);
            }
        }
    }

    /// The earliest read deadline, or when closes are next to be logged.
    pub(super) fn clients_deadline(&self) -> Option<Instant> {
        let limits = &self.io.client_limits;
        let log_due = match (limits.timed_out, limits.timeout_logged) {
            (0, _) | (_, None) => None,
            (_, Some(at)) => Some(at + TIMEOUT_LOG_EVERY),
        };
        let read = limits.read_deadlines.peek().map(|Reverse((at, _))| *at);
        read.into_iter().chain(log_due).min()
    }

    /// Closes the clients whose frame is past its read deadline, and logs them (counted).
    pub(super) fn client_timers(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let limits = &mut self.io.client_limits;
        while let Some(&Reverse((at, id))) = limits.read_deadlines.peek() {
            if at > now {
                break;
            }
            limits.read_deadlines.pop();
            let Some(conn) = self.io.clients.get_mut(&id) else {
                continue;
            };
            if conn.read_timer_queued == Some(at) {
                conn.read_timer_queued = None;
            }
            match conn.read_deadline {
                Some(deadline) if deadline <= now && !conn.paused => expired.push(id),
                // Its frame's clock moved on since: queue the new deadline instead.
                Some(deadline) if conn.read_timer_queued.is_none() => {
                    limits.read_deadlines.push(Reverse((deadline, id)));
                    conn.read_timer_queued = Some(deadline);
                }
                _ => {}
            }
        }
        self.io.client_limits.timed_out += expired.len();
        for id in expired {
            self.drop_client(id);
        }
        let limits = &mut self.io.client_limits;
        let due = limits
            .timeout_logged
            .is_none_or(|at| now >= at + TIMEOUT_LOG_EVERY);
        if limits.timed_out > 0 && due {
            let n = std::mem::take(&mut limits.timed_out);
            limits.timeout_logged = Some(now);
            log::warn!(
                "closed {n} client connection{} in the last second: a frame not finished within read_timeout ({:?})",
                if n == 1 { "" } else { "s" },
                self.config.server.read_timeout
            );
        }
    }
}

/// Client buffers are large and short-lived. glibc raises its mmap threshold each time a large
/// mapped block is freed, after which such buffers come from the heap, whose freed middle is
/// never given back: 40 clients' partial frames kept ~50 MiB resident after they closed. A
/// fixed threshold keeps every buffer over it in its own mapping, returned when freed.
pub(super) fn return_freed_buffers_to_the_os() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called once, before any client.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// Payloads under the mmap threshold live in the heap; a flood's worth of them, freed when its
/// clients leave, stays resident (20 clients flooding a full queue left 83 MiB after they
/// closed) unless the free pages in the middle of the heap are given back: `malloc_trim`.
fn give_back_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator; single-threaded master.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
