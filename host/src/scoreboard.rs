//! A worker's scoreboard slot: one page of memory shared by the master and one worker, in
//! which the worker publishes what only it knows and the master reads whenever it likes —
//! without a frame, a wake-up or a syscall per job (Apache httpd's and PHP-FPM's scoreboards
//! do the same). A worker that takes its jobs from an engine of its own (Redis) publishes its
//! job counts, the entry it is running (so that after a crash only that entry is charged an
//! attempt), its source's connection state, and the stream's figures for `status`.
//!
//! The master maps a slot before forking the worker and marks it MADV_DONTFORK right after,
//! so no later child — another worker, a reload probe — inherits it: each worker sees only
//! its own slot. The master reads with a sequence lock (the writer makes the count odd while
//! it writes); everything in the page is atomics, so a torn or hostile write is at worst
//! garbage, never undefined behaviour, and every field is validated when read: the worker is
//! untrusted, like everything outside the master.
//!
//! Two words carry a handshake the other way, for a worker fed by the master: the master may
//! **take back** jobs it sent a worker that the worker has not started (to give them to an
//! idle worker: a job stuck behind a long one, or in a stopped worker, runs elsewhere), and
//! a job must then never run twice. Each JOB frame the master writes on a worker's socketpair
//! has a sequence number, `seq` = 1, 2, 3… in the order written (the worker counts the frames
//! it reads; the master removes from its output only frames of which no byte was written, a
//! suffix, so the two counts stay in step).
//!
//! - `CLAIM`: the highest seq that is started or taken back, as far as the worker knows; bit
//!   63 (`FENCE`) set by the master = "I took back what follows, up to `RECALL_TO`".
//! - `RECALL_TO`: the highest seq the last recall covers. Written by the master only while
//!   `CLAIM` is unfenced, read by the worker only while it is fenced, so it never changes
//!   under a worker that reads it.
//!
//! The worker, before running frame `n`, moves `CLAIM` to `n` by compare-and-swap
//! ([`Slot::claim`]); the master fences by compare-and-swap ([`Slot::recall`]). Exactly one of
//! the two swaps wins, so a job is either started (`n <= started_through`, the master leaves it
//! with the worker) or taken back (the worker sees the fence and skips it), never both and
//! never neither. The worker clears the fence when it next claims, which is when it learns.
//!
//! Owns the layout and the two sides' access to it; never blocks, never allocates in the
//! worker's write path, and never trusts what it reads: the master's side of the handshake
//! never panics, never loops without bound, and clamps what it reads.

use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags};

/// Words in a slot: 512 bytes (the mapping is one page).
const WORDS: usize = 64;
const PAGE: usize = 4096;

// Word indexes.
const SEQ: usize = 0;
const DONE: usize = 1;
const FAILED: usize = 2;
/// Low byte: the source's state; next byte: the running entry's length; next two: the
/// reason's length.
const HEADER: usize = 3;
const STATS_AT: usize = 4;
const LENGTH: usize = 5;
const PENDING: usize = 6;
const LAG: usize = 7;
/// CLOCK_MONOTONIC milliseconds when the running entry started.
const RUNNING_SINCE: usize = 63;
const RUNNING: usize = 8;
/// The running entry's id: up to 48 bytes (a stream id is at most 41).
const RUNNING_WORDS: usize = 6;
const REASON: usize = RUNNING + RUNNING_WORDS;
/// The reason for a lost connection: up to 240 bytes.
const REASON_WORDS: usize = 30;
const _: () = assert!(REASON + REASON_WORDS <= RUNNING_SINCE && RUNNING_SINCE < WORDS);
/// The taking-back handshake (see the module doc): the highest seq started or taken back, and
/// [`FENCE`].
const CLAIM: usize = 44;
/// The highest seq the master's last recall covers.
const RECALL_TO: usize = 45;
const _: () = assert!(REASON + REASON_WORDS <= CLAIM && RECALL_TO < RUNNING_SINCE);

/// Bit 63 of `CLAIM`: the master took jobs back and the worker has not seen it yet.
pub const FENCE: u64 = 1 << 63;
/// How often [`Slot::recall`] tries its swap against a worker that keeps claiming: an honest
/// worker claims once per job, so a second try nearly always wins; a worker that writes the
/// word all the time must not hold the master.
const RECALL_TRIES: usize = 16;

pub const MAX_RUNNING: usize = RUNNING_WORDS * 8;
pub const MAX_REASON: usize = REASON_WORDS * 8;

/// The worker's source, as it last said.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SourceState {
    /// It has not said (not connected yet, or a source without a connection of its own).
    #[default]
    Unknown,
    Connected,
    Disconnected {
        reason: String,
    },
    /// Some of its servers answer, others not (a Gearman pool with several servers).
    Partial {
        reason: String,
    },
}

/// The source's figures as the worker last read them: a stream's (`XINFO GROUPS` and `XLEN`),
/// or a Gearman function's (gearmand's `status`: queued + running, running, queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamFigures {
    /// CLOCK_MONOTONIC milliseconds when they were read.
    pub at_ms: u64,
    pub length: u64,
    pub pending: u64,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell.
    pub lag: Option<u64>,
}

/// One consistent read of a slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub source: SourceState,
    /// The stream entry or Gearman job being run, if any (printable ASCII, else `None`).
    pub running: Option<String>,
    /// When it started (CLOCK_MONOTONIC milliseconds, as the worker says).
    pub running_since_ms: u64,
    pub figures: Option<StreamFigures>,
}

/// What the worker may do with the JOB frame it just read ([`Slot::claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// It is this worker's: run it and report its outcome.
    Run,
    /// The master took it back: skip it, without an outcome.
    Recalled,
}

/// What a [`Slot::recall`] took back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recall {
    /// Every job with a seq above `started_through` (and up to the `written_through` given) is
    /// the master's again: the worker will never run it. The ones at or below it are started
    /// (or were taken back by an earlier recall).
    Done { started_through: u64 },
    /// An earlier recall is not yet seen by the worker (it has not claimed since): nothing
    /// written since may be taken back now. Frames never written may, as always.
    Pending,
    /// The worker claimed again and again while the master tried: nothing was taken back.
    Busy,
}

/// The worker's side of the handshake: counts the JOB frames it reads (the n-th has seq n)
/// and remembers how far the master took back.
#[derive(Debug, Default)]
pub struct Claimer {
    read: u64,
    skip_to: u64,
    /// A take-back was seen and not yet told to the master.
    saw_recall: bool,
}

impl Claimer {
    pub fn new() -> Claimer {
        Claimer::default()
    }

    /// The next JOB frame of the stream was read: whether to run it.
    pub fn next_frame(&mut self, slot: &Slot) -> Claim {
        self.read = self.read.saturating_add(1);
        let before = self.skip_to;
        let claim = slot.claim(self.read, &mut self.skip_to);
        self.saw_recall |= self.skip_to > before;
        claim
    }

    /// Whether a take-back was seen since the last call: the worker then tells the master it
    /// is there and taking jobs (the master sends it none until it speaks).
    pub fn take_saw_recall(&mut self) -> bool {
        std::mem::take(&mut self.saw_recall)
    }

    /// JOB frames read so far (the seq of the last one).
    pub fn frames_read(&self) -> u64 {
        self.read
    }
}

/// One worker's slot (see the module doc). Dropping it unmaps it.
pub struct Slot {
    words: NonNull<AtomicU64>,
}

// SAFETY: a slot is a pointer to atomics that live as long as the slot itself; any thread may
// use them through `&Slot` (which the master's tests of the handshake do; the processes share
// it the same way).
unsafe impl Sync for Slot {}

impl Slot {
    /// Maps a fresh, zeroed slot (in the master, before the fork).
    pub fn new() -> nix::Result<Slot> {
        let len = NonZeroUsize::new(PAGE).ok_or(nix::Error::EINVAL)?;
        // SAFETY: a fresh anonymous mapping (no address asked for) aliases nothing; it is
        // page-aligned and zero-filled, which is a valid [AtomicU64; WORDS].
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?
        };
        Ok(Slot { words: ptr.cast() })
    }

    /// In the master, once the worker is forked: no later child inherits this slot.
    pub fn keep_from_later_children(&self) -> nix::Result<()> {
        // SAFETY: the range is exactly our own mapping; DONTFORK changes no memory.
        unsafe {
            nix::sys::mman::madvise(self.words.cast::<c_void>(), PAGE, MmapAdvise::MADV_DONTFORK)
        }
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < WORDS);
        // SAFETY: `i < WORDS` and the mapping lives as long as `self`; shared access to
        // atomics is always sound, whoever else writes the page.
        unsafe { &*self.words.as_ptr().add(i.min(WORDS - 1)) }
    }

    /// The worker's side: one consistent update of its fields.
    pub fn publish(&self, update: impl FnOnce(&mut Writer<'_>)) {
        let seq = self.word(SEQ);
        seq.fetch_add(1, Ordering::Relaxed); // odd: writing
        fence(Ordering::Release);
        update(&mut Writer { slot: self });
        seq.fetch_add(1, Ordering::Release); // even: done
    }

    /// The master's side: a consistent copy (a few tries, then the last one whatever it is —
    /// only a misbehaving worker writes all the time), validated.
    pub fn read(&self) -> Report {
        let mut copy = [0u64; WORDS];
        for _ in 0..8 {
            let before = self.word(SEQ).load(Ordering::Acquire);
            for (i, w) in copy.iter_mut().enumerate() {
                *w = self.word(i).load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            let after = self.word(SEQ).load(Ordering::Relaxed);
            if before == after && before.is_multiple_of(2) {
                break;
            }
        }
        decode(&copy)
    }

    /// The worker's side, before it runs the JOB frame with seq `seq`: [`Claim::Run`] once
    /// `CLAIM` says `seq` (so a recall from now on leaves it to this worker), or
    /// [`Claim::Recalled`] if the master took it back. `skip_to` is the worker's own memory of
    /// the highest seq taken back ([`Claimer`] keeps it).
    pub fn claim(&self, seq: u64, skip_to: &mut u64) -> Claim {
        let seq = seq.min(!FENCE);
        if seq <= *skip_to {
            return Claim::Recalled;
        }
        let claim = self.word(CLAIM);
        // It turns again only after a swap failed because the master fenced meanwhile (once
        // per recall, never while fenced) or after clearing a fence: a turn or two for each
        // recall the master makes meanwhile.
        loop {
            let w = claim.load(Ordering::Acquire);
            if w & FENCE != 0 {
                // Acquire on CLAIM made the master's RECALL_TO, stored before it fenced, visible.
                let through = self.word(RECALL_TO).load(Ordering::Acquire) & !FENCE;
                *skip_to = (*skip_to).max(through);
                // Unfenced, the word again means "everything up to here is started or taken
                // back", so the next recall's `started_through` covers what this one took. If
                // the swap fails the word changed: the next turn looks again.
                let _ = claim.compare_exchange(
                    w,
                    through.max(w & !FENCE),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                if seq <= *skip_to {
                    return Claim::Recalled;
                }
            } else if claim
                .compare_exchange(w, seq, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Claim::Run;
            }
        }
    }

    /// The master's side: the highest seq the worker claimed (its word: bounded by the
    /// caller).
    pub fn claimed(&self) -> u64 {
        self.word(CLAIM).load(Ordering::Acquire) & !FENCE
    }

    /// The master's side: takes back the jobs of this worker that it has not started.
    /// `written_through` is the highest seq of which any byte was written to the worker (a
    /// frame written in part is taken back too: the worker will read it whole and skip it).
    /// The master is the only one that recalls on a slot. What it reads is the worker's word,
    /// so it is clamped: `started_through` never exceeds `written_through`.
    pub fn recall(&self, written_through: u64) -> Recall {
        let through = written_through.min(!FENCE);
        let claim = self.word(CLAIM);
        for _ in 0..RECALL_TRIES {
            let w = claim.load(Ordering::Acquire);
            if w & FENCE != 0 {
                // RECALL_TO must not change now: the worker may be reading it this very
                // moment, and a higher value would make it skip frames the master (told
                // Pending) still counts as the worker's — jobs nobody would run.
                return Recall::Pending;
            }
            if w >= through {
                // It started everything written: nothing to take back, and no fence (a fence
                // it would not see until its next job would make the next recall Pending).
                return Recall::Done {
                    started_through: through,
                };
            }
            // Unfenced: the worker reads RECALL_TO only after it sees a fence, so it is not
            // reading it now; the Release of the swap below publishes it with the fence.
            self.word(RECALL_TO).store(through, Ordering::Release);
            if claim
                .compare_exchange(w, w | FENCE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Recall::Done {
                    started_through: w.min(through),
                };
            }
            // The worker claimed meanwhile: look again.
        }
        Recall::Busy
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; nothing borrows it past `self`.
        unsafe {
            let _ = nix::sys::mman::munmap(self.words.cast::<c_void>(), PAGE);
        }
    }
}

/// Writes a slot's fields (inside [`Slot::publish`]).
pub struct Writer<'a> {
    slot: &'a Slot,
}

impl Writer<'_> {
    pub fn jobs(&mut self, done: u64, failed: u64) {
        self.slot.word(DONE).store(done, Ordering::Relaxed);
        self.slot.word(FAILED).store(failed, Ordering::Relaxed);
    }

    fn header(&mut self, change: impl FnOnce(u64) -> u64) {
        let h = self.slot.word(HEADER);
        h.store(change(h.load(Ordering::Relaxed)), Ordering::Relaxed);
    }

    /// The entry about to run (`None` between entries); longer ids are not stream ids.
    pub fn running(&mut self, id: Option<&[u8]>) {
        let id = id.filter(|id| id.len() <= MAX_RUNNING).unwrap_or(&[]);
        put_bytes(self.slot, RUNNING, RUNNING_WORDS, id);
        let since = if id.is_empty() { 0 } else { monotonic_ms() };
        self.slot
            .word(RUNNING_SINCE)
            .store(since, Ordering::Relaxed);
        self.header(|h| (h & !0xff00) | ((id.len() as u64) << 8));
    }

    pub fn source(&mut self, state: &SourceState) {
        let (code, reason): (u64, &[u8]) = match state {
            SourceState::Unknown => (0, b""),
            SourceState::Connected => (1, b""),
            SourceState::Disconnected { reason } => (2, reason.as_bytes()),
            SourceState::Partial { reason } => (3, reason.as_bytes()),
        };
        let reason = &reason[..reason.len().min(MAX_REASON)];
        put_bytes(self.slot, REASON, REASON_WORDS, reason);
        self.header(|h| (h & !0xffff_00ff) | code | ((reason.len() as u64) << 16));
    }

    pub fn figures(&mut self, f: &StreamFigures) {
        self.slot
            .word(STATS_AT)
            .store(f.at_ms.max(1), Ordering::Relaxed);
        self.slot.word(LENGTH).store(f.length, Ordering::Relaxed);
        self.slot.word(PENDING).store(f.pending, Ordering::Relaxed);
        self.slot.word(LAG).store(
            f.lag.map_or(u64::MAX, |l| l.min(u64::MAX - 1)),
            Ordering::Relaxed,
        );
    }
}

fn put_bytes(slot: &Slot, first: usize, words: usize, bytes: &[u8]) {
    for i in 0..words {
        let mut word = [0u8; 8];
        let start = (i * 8).min(bytes.len());
        let end = (i * 8 + 8).min(bytes.len());
        word[..end - start].copy_from_slice(&bytes[start..end]);
        slot.word(first + i)
            .store(u64::from_le_bytes(word), Ordering::Relaxed);
    }
}

fn get_bytes(copy: &[u64; WORDS], first: usize, words: usize, len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = copy[first..first + words]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    out.truncate(len.min(words * 8));
    out
}

/// A stream id: `<ms>-<seq>`, both decimal.
pub fn is_stream_id(id: &str) -> bool {
    let Some((ms, seq)) = id.split_once('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    digits(ms) && digits(seq)
}

fn decode(copy: &[u64; WORDS]) -> Report {
    let header = copy[HEADER];
    let running_len = ((header >> 8) & 0xff) as usize;
    let reason_len = ((header >> 16) & 0xffff) as usize;
    // A stream id or a Gearman job handle: printable ASCII, else nothing (the worker's word).
    let running = String::from_utf8(get_bytes(copy, RUNNING, RUNNING_WORDS, running_len))
        .ok()
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_graphic()));
    let source = match header & 0xff {
        1 => SourceState::Connected,
        code @ (2 | 3) => {
            let reason: String =
                String::from_utf8_lossy(&get_bytes(copy, REASON, REASON_WORDS, reason_len))
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect();
            if code == 2 {
                SourceState::Disconnected { reason }
            } else {
                SourceState::Partial { reason }
            }
        }
        _ => SourceState::Unknown,
    };
    let figures = (copy[STATS_AT] != 0).then(|| StreamFigures {
        at_ms: copy[STATS_AT],
        length: copy[LENGTH],
        pending: copy[PENDING],
        lag: (copy[LAG] != u64::MAX).then_some(copy[LAG]),
    });
    Report {
        jobs_done: copy[DONE],
        jobs_failed: copy[FAILED],
        source,
        running_since_ms: copy[RUNNING_SINCE],
        running,
        figures,
    }
}

/// CLOCK_MONOTONIC in milliseconds: the same clock in the master and its workers.
pub fn monotonic_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1000) + (t.tv_nsec() as u64) / 1_000_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_worker_publishes_the_master_reads() {
        let slot = Slot::new().unwrap();
        assert_eq!(slot.read(), Report::default());
        slot.publish(|w| {
            w.jobs(7, 2);
            w.running(Some(b"1700000000000-12"));
            w.source(&SourceState::Disconnected {
                reason: "connection refused".into(),
            });
            w.figures(&StreamFigures {
                at_ms: 5,
                length: 10,
                pending: 3,
                lag: None,
            });
        });
        let r = slot.read();
        assert_eq!((r.jobs_done, r.jobs_failed), (7, 2));
        assert_eq!(r.running.as_deref(), Some("1700000000000-12"));
        assert_eq!(
            r.source,
            SourceState::Disconnected {
                reason: "connection refused".into()
            }
        );
        assert_eq!(
            r.figures.map(|f| (f.length, f.pending, f.lag)),
            Some((10, 3, None))
        );
        slot.publish(|w| {
            w.running(None);
            w.source(&SourceState::Partial {
                reason: "1 of 2 servers up".into(),
            });
        });
        assert_eq!(
            slot.read().source,
            SourceState::Partial {
                reason: "1 of 2 servers up".into()
            }
        );
        slot.publish(|w| {
            w.running(None);
            w.source(&SourceState::Connected);
        });
        let r = slot.read();
        assert_eq!(r.running, None);
        assert_eq!(r.source, SourceState::Connected);
    }

    #[test]
    fn garbage_reads_as_nothing_harmful() {
        let slot = Slot::new().unwrap();
        for i in 0..WORDS {
            slot.word(i).store(u64::MAX - i as u64, Ordering::Relaxed);
        }
        let r = slot.read(); // odd sequence forever: read anyway, validated
        assert_eq!(r.running, None);
        assert!(matches!(r.source, SourceState::Unknown));
        slot.publish(|w| w.running(Some(b"not an id")));
        assert_eq!(slot.read().running, None, "a space is not printable here");
        slot.publish(|w| w.running(Some(b"H:\x01:1")));
        assert_eq!(slot.read().running, None);
        slot.publish(|w| w.running(Some(b"H:gm1:42")));
        assert_eq!(
            slot.read().running.as_deref(),
            Some("H:gm1:42"),
            "a Gearman handle"
        );
        let long = "x".repeat(1000);
        slot.publish(|w| w.source(&SourceState::Disconnected { reason: long }));
        match slot.read().source {
            SourceState::Disconnected { reason } => assert_eq!(reason.len(), MAX_REASON),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_slot_is_marked_not_to_be_copied_into_later_children() {
        // The property the master relies on, as the kernel reports it: VmFlags `dc`.
        let slot = Slot::new().unwrap();
        let start = format!("{:x}-", slot.words.as_ptr() as usize);
        let flags = || {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let at = smaps.find(&start).expect("the slot is mapped");
            let flags = smaps[at..]
                .lines()
                .find(|l| l.starts_with("VmFlags:"))
                .unwrap()
                .to_string();
            flags.split_whitespace().any(|f| f == "dc")
        };
        assert!(!flags());
        slot.keep_from_later_children().unwrap();
        assert!(flags());
    }

    /// The worker reads `frames` more JOB frames: what it may do with each.
    fn claim_all(slot: &Slot, claimer: &mut Claimer, frames: u64) -> Vec<Claim> {
        (0..frames).map(|_| claimer.next_frame(slot)).collect()
    }

    use Claim::{Recalled, Run};

    #[test]
    fn a_recall_before_the_worker_claims_takes_back_everything_written() {
        let slot = Slot::new().unwrap();
        let mut worker = Claimer::new();
        // Frames 1..=3 written, none read yet.
        assert_eq!(slot.recall(3), Recall::Done { started_through: 0 });
        assert_eq!(claim_all(&slot, &mut worker, 3), [Recalled; 3]);
        // What the master sends next (the jobs it took back, or others) runs.
        assert_eq!(claim_all(&slot, &mut worker, 2), [Run, Run]);
        assert_eq!(worker.frames_read(), 5);
        // A second recall, once the worker cleared the fence, sees seq 5 as started.
        assert_eq!(slot.recall(7), Recall::Done { started_through: 5 });
        assert_eq!(claim_all(&slot, &mut worker, 3), [Recalled, Recalled, Run]);
    }

    #[test]
    fn a_recall_with_nothing_unstarted_leaves_no_fence() {
        let slot = Slot::new().unwrap();
        let mut skip_to = 0;
        assert_eq!(slot.claim(1, &mut skip_to), Claim::Run);
        assert_eq!(slot.claim(2, &mut skip_to), Claim::Run);
        assert_eq!(slot.recall(2), Recall::Done { started_through: 2 });
        assert_eq!(slot.claimed(), 2);
        // Not fenced: the next recall, with a frame more written, takes it at once.
        assert_eq!(slot.recall(3), Recall::Done { started_through: 2 });
        assert_eq!(slot.claim(3, &mut skip_to), Claim::Recalled);
    }

    #[test]
    fn a_job_claimed_before_the_recall_stays_with_the_worker() {
        let slot = Slot::new().unwrap();
        let mut worker = Claimer::new();
        assert_eq!(claim_all(&slot, &mut worker, 2), [Run, Run]);
        assert_eq!(slot.recall(4), Recall::Done { started_through: 2 });
        assert_eq!(claim_all(&slot, &mut worker, 3), [Recalled, Recalled, Run]);
    }

    #[test]
    fn a_second_recall_before_the_worker_saw_the_first_takes_nothing_written() {
        let slot = Slot::new().unwrap();
        let mut worker = Claimer::new();
        assert_eq!(claim_all(&slot, &mut worker, 1), [Run]); // a long job, say
        assert_eq!(slot.recall(3), Recall::Done { started_through: 1 });
        // The master wrote frames 4 and 5 since; the worker is still in job 1.
        assert_eq!(slot.recall(5), Recall::Pending);
        assert_eq!(slot.recall(5), Recall::Pending);
        // 2 and 3 were taken back; 4 and 5 were not, so the worker must run them: had the
        // pending recall raised RECALL_TO, they would be skipped and nobody would run them.
        assert_eq!(
            claim_all(&slot, &mut worker, 4),
            [Recalled, Recalled, Run, Run]
        );
        assert_eq!(slot.recall(6), Recall::Done { started_through: 5 });
    }

    #[test]
    fn a_worker_holding_back_has_all_its_unstarted_jobs_taken_back() {
        // A HOLD worker (short of memory) claims nothing: everything after its last started
        // job goes back, the one it finished stays its own (its outcome is in, or coming).
        let slot = Slot::new().unwrap();
        let mut worker = Claimer::new();
        assert_eq!(claim_all(&slot, &mut worker, 1), [Run]);
        assert_eq!(slot.recall(4), Recall::Done { started_through: 1 });
        assert_eq!(claim_all(&slot, &mut worker, 3), [Recalled; 3]);
    }

    #[test]
    fn garbage_in_the_claim_words_never_panics_nor_claims_more_than_was_written() {
        let slot = Slot::new().unwrap();
        for garbage in [u64::MAX, FENCE, FENCE | 7] {
            slot.word(CLAIM).store(garbage, Ordering::Relaxed);
            assert_eq!(slot.recall(3), Recall::Pending);
        }
        for garbage in [FENCE - 1, 1 << 40, 12] {
            slot.word(CLAIM).store(garbage, Ordering::Relaxed);
            assert_eq!(slot.recall(3), Recall::Done { started_through: 3 });
        }
        // Seqs past the fence bit are clamped below it, on both sides.
        slot.word(CLAIM).store(0, Ordering::Relaxed);
        assert_eq!(slot.recall(u64::MAX), Recall::Done { started_through: 0 });
        let mut skip_to = 0;
        assert_eq!(slot.claim(u64::MAX, &mut skip_to), Recalled);
        assert_eq!(skip_to, !FENCE);
        // A worker whose words are garbage: it skips what the garbage says, and returns.
        let slot = Slot::new().unwrap();
        slot.word(CLAIM).store(u64::MAX, Ordering::Relaxed);
        slot.word(RECALL_TO).store(u64::MAX, Ordering::Relaxed);
        assert_eq!(Claimer::new().next_frame(&slot), Recalled);
    }

    /// A small deterministic generator (xorshift64*): no dependency for a test's dice.
    struct Dice(u64);

    impl Dice {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
        }
    }

    /// Two workers (threads) claim the frames they receive as they arrive, while a master
    /// (this thread) recalls at random moments and sends what it took back again, with new
    /// seqs, to whichever worker holds fewest. Every job runs exactly once, every answer comes
    /// from the worker the master says holds it, and in order. A swap lost in the race is a
    /// window of nanoseconds, so a few rounds on fresh slots (a round takes some 20 ms).
    #[test]
    fn racing_recalls_run_every_job_exactly_once() {
        for round in 0..5 {
            race(round);
        }
    }

    fn race(round: u64) {
        use std::collections::VecDeque;
        use std::sync::mpsc;
        use std::time::{Duration, Instant};

        const JOBS: usize = 20_000;
        const PREFETCH: usize = 8;
        enum Frame {
            Job { seq: u64, key: usize },
            Close,
        }
        let slots = [Slot::new().unwrap(), Slot::new().unwrap()];
        let runs: Vec<AtomicU64> = (0..JOBS).map(|_| AtomicU64::new(0)).collect();
        let (outcome_tx, outcomes) = mpsc::channel::<(usize, usize)>();
        let mut counts = [0u64; 3]; // Done, Pending, Busy
        let mut taken_back = 0usize;
        std::thread::scope(|scope| {
            let mut channels = Vec::new();
            for (me, slot) in slots.iter().enumerate() {
                let (tx, rx) = mpsc::channel::<Frame>();
                channels.push(tx);
                let outcome_tx = outcome_tx.clone();
                let runs = &runs;
                scope.spawn(move || {
                    let mut claimer = Claimer::new();
                    let mut dice = Dice(0x9e37_79b9 + me as u64 + 2 * round);
                    while let Ok(Frame::Job { seq, key }) = rx.recv() {
                        let claim = claimer.next_frame(slot);
                        assert_eq!(claimer.frames_read(), seq, "frame numbering in step");
                        if claim == Run {
                            runs[key].fetch_add(1, Ordering::Relaxed);
                            // A job of a few instructions to some microseconds.
                            for _ in 0..dice.below(16) {
                                std::hint::spin_loop();
                            }
                            if dice.below(8) == 0 {
                                std::thread::yield_now();
                            }
                            let _ = outcome_tx.send((me, key));
                        }
                    }
                });
            }

            // The master's books: jobs not sent, and per worker what it holds by seq.
            let mut queue: VecDeque<usize> = (0..JOBS).collect();
            let mut holds: [VecDeque<(u64, usize)>; 2] = Default::default();
            let mut written = [0u64; 2];
            let mut answered = 0;
            let mut dice = Dice(0x2545_f491 + round);
            let deadline = Instant::now() + Duration::from_secs(30);
            while answered < JOBS {
                assert!(
                    Instant::now() < deadline,
                    "jobs never answered: {answered} of {JOBS}; held {:?}",
                    holds
                );
                while let Some(&key) = queue.front() {
                    let Some(to) = (0..2)
                        .filter(|&w| holds[w].len() < PREFETCH)
                        .min_by_key(|&w| holds[w].len())
                    else {
                        break;
                    };
                    queue.pop_front();
                    written[to] += 1;
                    holds[to].push_back((written[to], key));
                    let seq = written[to];
                    channels[to].send(Frame::Job { seq, key }).unwrap();
                }
                if dice.below(2) == 0 {
                    let from = dice.below(2) as usize;
                    match slots[from].recall(written[from]) {
                        Recall::Done { started_through } => {
                            counts[0] += 1;
                            // Back to the front of the queue, in their order.
                            while holds[from]
                                .back()
                                .is_some_and(|&(seq, _)| seq > started_through)
                            {
                                let (_, key) = holds[from].pop_back().unwrap();
                                queue.push_front(key);
                                taken_back += 1;
                            }
                        }
                        Recall::Pending => counts[1] += 1,
                        Recall::Busy => counts[2] += 1,
                    }
                }
                let mut any = false;
                while let Ok((from, key)) = outcomes.try_recv() {
                    any = true;
                    let front = holds[from].pop_front();
                    assert_eq!(
                        front.map(|(_, k)| k),
                        Some(key),
                        "worker {from} answered job {key}: the master says it holds {front:?} first"
                    );
                    answered += 1;
                }
                if !any {
                    std::thread::yield_now();
                }
            }
            for channel in &channels {
                let _ = channel.send(Frame::Close);
            }
        });
        let twice: Vec<usize> = (0..JOBS)
            .filter(|&k| runs[k].load(Ordering::Relaxed) != 1)
            .collect();
        assert!(twice.is_empty(), "jobs not run exactly once: {twice:?}");
        // The race was run: jobs were taken back, some while the worker had not seen a fence.
        assert!(counts[0] > 0 && taken_back > 0, "{counts:?} {taken_back}");
        eprintln!(
            "round {round}: recalls done/pending/busy {counts:?}; jobs taken back {taken_back}"
        );
    }

    #[test]
    fn stream_ids() {
        assert!(is_stream_id("0-1") && is_stream_id("1700000000000-12"));
        for bad in ["-1", "1-", "a-1", "1-2-3", "", "1"] {
            assert!(!is_stream_id(bad), "{bad}");
        }
    }
}
