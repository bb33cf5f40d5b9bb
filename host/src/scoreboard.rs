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
//! Owns the layout and the two sides' access to it; never blocks, never allocates in the
//! worker's write path, and never trusts what it reads.

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
}

/// The stream's figures as the worker last read them (`XINFO GROUPS` and `XLEN`).
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
    /// The stream entry being run, if any (a well-formed stream id, else `None`).
    pub running: Option<String>,
    /// When it started (CLOCK_MONOTONIC milliseconds, as the worker says).
    pub running_since_ms: u64,
    pub figures: Option<StreamFigures>,
}

/// One worker's slot (see the module doc). Dropping it unmaps it.
pub struct Slot {
    words: NonNull<AtomicU64>,
}

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
    let running = String::from_utf8(get_bytes(copy, RUNNING, RUNNING_WORDS, running_len))
        .ok()
        .filter(|id| is_stream_id(id));
    let source = match header & 0xff {
        1 => SourceState::Connected,
        2 => SourceState::Disconnected {
            reason: String::from_utf8_lossy(&get_bytes(copy, REASON, REASON_WORDS, reason_len))
                .chars()
                .filter(|c| !c.is_control())
                .collect(),
        },
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
        assert_eq!(slot.read().running, None);
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

    #[test]
    fn stream_ids() {
        assert!(is_stream_id("0-1") && is_stream_id("1700000000000-12"));
        for bad in ["-1", "1-", "a-1", "1-2-3", "", "1"] {
            assert!(!is_stream_id(bad), "{bad}");
        }
    }
}
