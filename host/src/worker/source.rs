//! Where a worker's work comes from. The batch-runner loop asks a [`JobSource`] for the next
//! unit of work; job mode reads jobs from the master, loop mode lets the plugin pull its own.
//! A later source (an external engine consumed by each worker directly) is one more impl.
//!
//! In job mode the master sends a worker several jobs ahead, and may take back the ones it
//! has not started (to give them to an idle worker). So before running each JOB frame the
//! worker claims it on its scoreboard slot (see [`crate::scoreboard`]), and skips, without
//! an outcome, one the master took back. It must never run a frame it did not claim, never
//! answer a skipped one, and never sleep while a frame is buffered.
//!
//! While a job runs, what its plugin reports goes to the master as WORK_PROGRESS and
//! WORK_DATA frames naming the job's key ([`Reports`]): at most one progress frame per
//! [`protocol::PROGRESS_EVERY`] (the latest wins, and the last one is always sent before the
//! OUTCOME), and at most [`protocol::MAX_JOB_DATA`] bytes of data per job (what is beyond is
//! cut, logged once per job).

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use jobhost_plugin_api::abi_stable::std_types::RResult;
use jobhost_plugin_api::{PluginInstance, Step};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::job::{self, Report};
use crate::protocol::{self, kind, Frame, FrameReader};
use crate::scoreboard::{Claim, Claimer, Slot};

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
    /// Every fd whose readiness means "something to do" (several servers' connections):
    /// `wake_fd`'s, readable, unless a source says more.
    fn wake_fds<'a>(&'a self, fds: &mut Vec<PollFd<'a>>) {
        if let Some(fd) = self.wake_fd() {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
    }
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
    /// This worker's scoreboard slot, where it claims each job before running it.
    slot: Slot,
    /// Counts the JOB frames read and remembers what the master took back.
    claimer: Claimer,
    /// `server.max_result`: a larger result is sent as the job's failure instead (the master
    /// would take it as a broken protocol).
    max_result: usize,
}

impl MasterSource {
    pub fn new(channel: OwnedFd, slot: Slot) -> MasterSource {
        let channel = UnixStream::from(channel);
        // Non-blocking reads let the loop ask "is there a job?" without sleeping in read(2).
        let _ = channel.set_nonblocking(true);
        MasterSource {
            channel,
            reader: FrameReader::new(MAX_JOB_FRAME),
            out: Vec::new(),
            closed: false,
            slot,
            claimer: Claimer::new(),
            max_result: usize::MAX,
        }
    }

    pub fn with_max_result(self, max_result: usize) -> MasterSource {
        MasterSource { max_result, ..self }
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
        flush_to(&mut self.channel, &mut self.out)
    }
}

/// Writes `out` whole to `channel` (waiting for room if the master is slow to read), then
/// empties it.
fn flush_to(channel: &mut UnixStream, out: &mut Vec<u8>) -> io::Result<()> {
    let mut written = 0;
    while written < out.len() {
        match channel.write(&out[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLOUT)];
                let _ = poll(&mut fds, PollTimeout::NONE);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    out.clear();
    Ok(())
}

/// One running job's reports on their way to the master: WORK_PROGRESS at most once per
/// [`protocol::PROGRESS_EVERY`] (a newer one replaces one held back; the held one goes out
/// before the next data frame and before the outcome), WORK_DATA in order up to
/// [`protocol::MAX_JOB_DATA`] bytes in all.
struct Reports<'a> {
    channel: &'a mut UnixStream,
    out: &'a mut Vec<u8>,
    key: u64,
    last_progress: Option<Instant>,
    held: Option<(u64, u64)>,
    data_left: usize,
    /// Data was cut (and that logged).
    cut: bool,
    /// A write failed: nothing more is sent; the error is the job's caller's.
    failed: Option<io::Error>,
}

impl<'a> Reports<'a> {
    fn new(channel: &'a mut UnixStream, out: &'a mut Vec<u8>, key: u64) -> Reports<'a> {
        Reports {
            channel,
            out,
            key,
            last_progress: None,
            held: None,
            data_left: protocol::MAX_JOB_DATA,
            cut: false,
            failed: None,
        }
    }

    fn on(&mut self, report: Report<'_>) {
        if self.failed.is_some() {
            return;
        }
        match report {
            Report::Progress {
                numerator,
                denominator,
            } => {
                let now = Instant::now();
                let due = self
                    .last_progress
                    .is_none_or(|t| now.saturating_duration_since(t) >= protocol::PROGRESS_EVERY);
                if !due {
                    self.held = Some((numerator, denominator));
                    return;
                }
                self.held = None;
                self.last_progress = Some(now);
                protocol::put_progress(
                    self.out,
                    kind::WORK_PROGRESS,
                    self.key,
                    numerator,
                    denominator,
                );
            }
            Report::Data(data) => {
                self.put_held();
                if data.len() > self.data_left {
                    if !std::mem::replace(&mut self.cut, true) {
                        log::warn!(
                            "job {}: its plugin reported more than {} bytes of data; the rest is dropped",
                            self.key,
                            protocol::MAX_JOB_DATA
                        );
                    }
                    let keep = self.data_left;
                    self.data_left = 0;
                    if keep == 0 {
                        return;
                    }
                    protocol::put_data(self.out, kind::WORK_DATA, self.key, &data[..keep]);
                } else {
                    self.data_left -= data.len();
                    protocol::put_data(self.out, kind::WORK_DATA, self.key, data);
                }
            }
        }
        if let Err(e) = flush_to(self.channel, self.out) {
            self.failed = Some(e);
        }
    }

    /// Queues the progress held back, if any (it goes out with what follows).
    fn put_held(&mut self) {
        if let Some((numerator, denominator)) = self.held.take() {
            protocol::put_progress(
                self.out,
                kind::WORK_PROGRESS,
                self.key,
                numerator,
                denominator,
            );
        }
    }

    /// The job ended: the progress held back goes before its outcome (queued, not written).
    fn finish(mut self) -> io::Result<()> {
        match self.failed.take() {
            Some(e) => Err(e),
            None => {
                self.put_held();
                Ok(())
            }
        }
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
        // Frames the master took back are skipped here, as many as there are: each was sent
        // once, so this ends, and it returns Idle only once nothing is buffered or readable
        // (poll then wakes it for the next byte; a buffered frame would not wake it).
        let (key, payload) = loop {
            if !self.reader.has_frame().map_err(bad_frame)? && !self.closed {
                self.closed = !self.fill()?;
            }
            let Some(frame) = self.reader.next().map_err(bad_frame)? else {
                if self.closed {
                    return Ok(Next::Closed);
                }
                if self.claimer.take_saw_recall() {
                    // It skipped what the master took back: say it is here and takes jobs.
                    protocol::put_hold(&mut self.out, false);
                    self.flush()?;
                }
                // Busy again soon, most likely: keep a buffer the size of an ordinary burst.
                self.reader.shrink_to(KEEP_BUFFER);
                return Ok(Next::Idle(Wake { timeout: None }));
            };
            let (key, payload) = match protocol::decode(frame).map_err(bad_frame)? {
                Frame::Job { key, payload } => (key, payload),
                other => return Err(bad_frame(format!("unexpected {other}"))),
            };
            // Every JOB frame counts, so the worker's numbering stays the master's.
            match self.claimer.next_frame(&self.slot) {
                Claim::Run => {
                    if self.claimer.take_saw_recall() {
                        // The master sends a worker it took jobs back from nothing until it
                        // speaks: this says it is here and takes jobs (sent with the outcome).
                        protocol::put_hold(&mut self.out, false);
                    }
                    break (key, payload);
                }
                Claim::Recalled => log::debug!(
                    "job {key} (frame {}) was taken back by the master; skipped",
                    self.claimer.frames_read()
                ),
            }
        };
        let mut reports = Reports::new(&mut self.channel, &mut self.out, key);
        let outcome = job::handle(plugin, payload, &mut |r| reports.on(r));
        reports.finish()?;
        match outcome {
            Ok(result) if result.len() > self.max_result => {
                let message = format!(
                    "result too large ({} bytes, max_result is {})",
                    result.len(),
                    self.max_result
                );
                protocol::put_outcome(&mut self.out, key, false, message.as_bytes())
            }
            Ok(result) => protocol::put_outcome(&mut self.out, key, true, &result),
            Err(message) => {
                // A failure's message is bounded like a result.
                let message = &message.as_bytes()[..message.len().min(self.max_result)];
                protocol::put_outcome(&mut self.out, key, false, message)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::{Arc, Mutex};

    use jobhost_plugin_api::abi_stable::sabi_trait::TD_Opaque;
    use jobhost_plugin_api::abi_stable::std_types::{RSlice, RString, RVec};
    use jobhost_plugin_api::{JobContext, PluginObject, PluginObject_TO};

    use crate::scoreboard::Recall;

    /// A job-mode plugin that answers each payload with itself and notes what it ran.
    struct Recorder(Ran);

    impl PluginObject for Recorder {
        fn worker_start(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn worker_stop(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn handle(&mut self, payload: RSlice<'_, u8>) -> RResult<RVec<u8>, RString> {
            self.0.lock().unwrap().push(payload.to_vec());
            RResult::ROk(payload.to_vec().into())
        }
        fn run_once(&mut self) -> RResult<Step, RString> {
            RResult::RErr("job mode only".into())
        }
    }

    /// What the test plugin ran, payload by payload.
    type Ran = Arc<Mutex<Vec<Vec<u8>>>>;

    /// A worker's source on one end of a socketpair, the master's end, and what the plugin
    /// ran.
    fn setup() -> (MasterSource, UnixStream, PluginInstance, Ran) {
        let (master, worker) = UnixStream::pair().unwrap();
        master.set_nonblocking(true).unwrap();
        let ran = Ran::default();
        let plugin = PluginObject_TO::from_value(Recorder(ran.clone()), TD_Opaque);
        let source = MasterSource::new(OwnedFd::from(worker), Slot::new().unwrap());
        (source, master, plugin, ran)
    }

    fn send_jobs(master: &mut UnixStream, keys: impl IntoIterator<Item = u64>) {
        let mut bytes = Vec::new();
        for key in keys {
            protocol::put_job(&mut bytes, key, key.to_string().as_bytes());
        }
        master.write_all(&bytes).unwrap();
    }

    /// The keys of the outcomes the worker wrote so far (a HOLD, not holding — what it says
    /// after skipping what the master took back — shows as key 0).
    fn outcomes(master: &mut UnixStream) -> Vec<u64> {
        let mut reader = FrameReader::new(1 << 20);
        let mut buf = [0u8; 4096];
        loop {
            match master.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => reader.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let mut keys = Vec::new();
        while let Some(frame) = reader.next().unwrap() {
            match protocol::decode(frame).unwrap() {
                Frame::Outcome { key, ok: true, .. } => keys.push(key),
                Frame::Hold { paused: false } => keys.push(0),
                other => panic!("unexpected {other}"),
            }
        }
        keys
    }

    fn ran(log: &Mutex<Vec<Vec<u8>>>) -> Vec<String> {
        log.lock()
            .unwrap()
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    /// Reports a burst of progress, a little data, then more data than a job may send.
    struct Chatty;

    impl PluginObject for Chatty {
        fn worker_start(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn worker_stop(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn handle(&mut self, _: RSlice<'_, u8>) -> RResult<RVec<u8>, RString> {
            RResult::RErr("handle_with is the one to call".into())
        }
        fn run_once(&mut self) -> RResult<Step, RString> {
            RResult::RErr("job mode only".into())
        }
        fn handle_with(
            &mut self,
            _: RSlice<'_, u8>,
            ctx: &mut JobContext<'_>,
        ) -> RResult<RVec<u8>, RString> {
            for i in 0..1000 {
                ctx.progress(i, 1000);
            }
            ctx.data(b"a");
            ctx.data(&vec![b'x'; protocol::MAX_JOB_DATA]);
            ctx.data(b"dropped");
            ctx.progress(1000, 1000);
            RResult::ROk(b"done".to_vec().into())
        }
    }

    #[test]
    fn reports_are_framed_with_the_key_coalesced_and_bounded() {
        let (master, worker) = UnixStream::pair().unwrap();
        let mut plugin = PluginObject_TO::from_value(Chatty, TD_Opaque);
        let mut source = MasterSource::new(OwnedFd::from(worker), Slot::new().unwrap());
        let mut master_w = master.try_clone().unwrap();
        send_jobs(&mut master_w, [42]);
        // The master's end is read on a thread: 16 MiB do not fit in a socket buffer.
        let reader = std::thread::spawn(move || {
            let mut master = master;
            let mut reader = FrameReader::new(64 << 20);
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = master.read(&mut buf).unwrap();
                assert!(n > 0, "the worker closed before its outcome");
                reader.push(&buf[..n]);
                while let Some(frame) = reader.next().unwrap() {
                    let shown = match protocol::decode(frame).unwrap() {
                        Frame::WorkProgress { key, numerator, .. } => {
                            format!("{key} progress {numerator}")
                        }
                        Frame::WorkData { key, data } => format!("{key} data {}", data.len()),
                        Frame::Outcome { key, ok, body } => {
                            let body = String::from_utf8_lossy(body).into_owned();
                            frames.push(format!("{key} outcome {ok} {body}"));
                            return frames;
                        }
                        other => panic!("unexpected {other}"),
                    };
                    frames.push(shown);
                }
            }
        });
        assert!(matches!(source.next(&mut plugin), Ok(Next::Worked)));
        let frames = reader.join().unwrap();
        let progress: Vec<u64> = frames
            .iter()
            .filter_map(|f| f.strip_prefix("42 progress ")?.parse().ok())
            .collect();
        assert_eq!(progress.first(), Some(&0), "{frames:?}");
        assert!(progress.len() < 20, "coalesced: {progress:?}");
        assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
        let at = |f: &str| frames.iter().position(|x| x == f).unwrap();
        // The progress held back goes before the data that follows it; the last one before
        // the outcome.
        assert_eq!(frames[at("42 data 1") - 1], "42 progress 999", "{frames:?}");
        assert_eq!(
            frames[at("42 data 1") + 1],
            format!("42 data {}", protocol::MAX_JOB_DATA - 1),
            "cut at the limit"
        );
        assert_eq!(
            frames[frames.len() - 2..],
            [
                "42 progress 1000".to_string(),
                "42 outcome true done".into()
            ]
        );
        assert_eq!(frames.iter().filter(|f| f.contains(" data ")).count(), 2);
    }

    #[test]
    fn jobs_the_master_took_back_are_skipped_without_an_outcome() {
        let (mut source, mut master, mut plugin, log) = setup();
        send_jobs(&mut master, 1..=4);
        assert!(matches!(source.next(&mut plugin), Ok(Next::Worked)));
        assert_eq!(outcomes(&mut master), [1]);
        // Frames 2..=4 are written, unread: all the master's again.
        assert_eq!(source.slot.recall(4), Recall::Done { started_through: 1 });
        // They go; 5 and 6 (jobs 2 and 3 sent again, say) run.
        send_jobs(&mut master, [2, 3]);
        assert!(matches!(source.next(&mut plugin), Ok(Next::Worked)));
        assert!(matches!(source.next(&mut plugin), Ok(Next::Worked)));
        assert!(matches!(source.next(&mut plugin), Ok(Next::Idle(_))));
        // It says it saw the take-back (a HOLD, not holding: 0), with the next outcome.
        assert_eq!(outcomes(&mut master), [0, 2, 3]);
        assert_eq!(ran(&log), ["1", "2", "3"]);
    }

    #[test]
    fn a_worker_that_skipped_everything_says_so_before_it_sleeps() {
        let (mut source, mut master, mut plugin, log) = setup();
        send_jobs(&mut master, 1..=3);
        assert_eq!(source.slot.recall(3), Recall::Done { started_through: 0 });
        assert!(matches!(source.next(&mut plugin), Ok(Next::Idle(_))));
        assert_eq!(outcomes(&mut master), [0]);
        assert!(ran(&log).is_empty());
        // Nothing more to say while nothing happens.
        assert!(matches!(source.next(&mut plugin), Ok(Next::Idle(_))));
        assert_eq!(outcomes(&mut master), Vec::<u64>::new());
    }

    #[test]
    fn many_skipped_frames_in_a_row_are_no_reason_to_sleep() {
        // Frames left in the buffer do not wake poll: once it skipped what was taken back, the
        // source must go on to the next frame, buffered or readable, and say Idle only when
        // there is none.
        let (mut source, mut master, mut plugin, log) = setup();
        send_jobs(&mut master, 1..=500);
        assert_eq!(source.slot.recall(500), Recall::Done { started_through: 0 });
        send_jobs(&mut master, [7]);
        assert!(matches!(source.next(&mut plugin), Ok(Next::Worked)));
        assert_eq!(
            outcomes(&mut master),
            [0, 7],
            "once, however many it skipped"
        );
        assert!(matches!(source.next(&mut plugin), Ok(Next::Idle(_))));
        assert_eq!(ran(&log), ["7"]);
        // All taken back and nothing after: Idle, with no outcome — only that it saw it.
        send_jobs(&mut master, 8..=20);
        assert_eq!(
            source.slot.recall(514),
            Recall::Done {
                started_through: 501
            }
        );
        assert!(matches!(source.next(&mut plugin), Ok(Next::Idle(_))));
        assert_eq!(outcomes(&mut master), [0]);
        assert_eq!(source.claimer.frames_read(), 514);
    }
}
