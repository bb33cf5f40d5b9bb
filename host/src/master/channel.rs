//! One worker's socketpair as the master sees it: a [`WorkerChannel`] — the worker-side
//! counterpart of [`crate::server::Connection`]. It queues JOB frames and writes them with
//! writev, each payload in place (shared through an `Rc`, never copied into a buffer), resumes a
//! frame cut by a partial write, and cuts what the worker sends into owned [`WorkerSaid`]s.
//!
//! Owns bytes, their order and the write/read bookkeeping only. It never decides what a frame
//! means for a job or a worker (the master does: timing, answering, killing), never touches
//! epoll (it only says when write interest changes) and never blocks: the stream is expected
//! to be non-blocking, and `WouldBlock` just ends a flush or a read.
//!
//! The one rule it does keep is the stream's: once any byte of a frame is written, the rest of
//! that frame follows before anything else, or nothing at all ([`WorkerChannel::discard_output`]).
//! Likewise, once the worker sent bytes that are refused, or a frame after LEAVING, everything
//! later is refused too: the stream is out of step.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use crate::protocol::{self, Frame, FrameError, FrameReader};

/// How many outcome bytes one wake-up reads from a worker, so one worker cannot starve others.
pub(super) const OUTCOME_READ_BUDGET: usize = 4 << 20;
/// Job frames one writev to a worker carries at most (two slices each: head and payload).
pub(super) const WRITE_BATCH: usize = 32;
/// The largest frame accepted from a worker unless [`WorkerChannel::with_max_body`] says
/// otherwise (the master does: `server.max_result`).
const MAX_FRAME: usize = usize::MAX / 2;
/// An OUTCOME head: kind, key, ok.
const OUTCOME_HEAD: usize = 1 + 8 + 1;
/// An outcome body at least this large is moved out of the frame buffer, not copied.
const MOVE_BODY: usize = 64 << 10;

/// One JOB frame waiting to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutJob {
    /// The master's dispatch order: [`WorkerChannel::take_unwritten`] reports how far the
    /// writing got in these terms. Expected to increase along the queue.
    pub seq: u64,
    /// The job's key, as the worker will name it in its OUTCOME.
    pub key: u64,
    /// Shared with the master's job table: written from here, never copied.
    pub payload: Rc<[u8]>,
}

/// What a worker said, owned (decoded from its frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerSaid {
    /// A job ended: `ok` with the plugin's result, or failed with its message.
    Outcome { key: u64, ok: bool, body: Vec<u8> },
    /// Short of memory it starts no job (`paused`), or takes jobs again.
    Hold { paused: bool },
    /// Its last frame: the exit status it is about to exit with and the jobs it finished.
    Leaving { code: u8, jobs_done: u64 },
    /// While it runs job `key`: how far it got, or partial data (WORK_PROGRESS, WORK_DATA).
    Reported { key: u64, report: Reported },
}

/// What a worker reports about the job it runs, before its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    Progress { numerator: u64, denominator: u64 },
    Data(Vec<u8>),
}

/// Why a worker's bytes are refused. Rendered as what the worker "sent", for the master's log
/// line ("it sent {error}"), so the wording matches the master's protocol-violation messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Bytes that are no frame: an unknown kind, a short body, a zero length.
    #[error("a malformed frame: {0}")]
    Malformed(#[from] FrameError),
    /// A well-formed frame no worker sends (JOB, SUBMIT, RESULT, a client's PROGRESS or DATA);
    /// the frame as shown.
    #[error("an unexpected {0}")]
    Unexpected(String),
    /// Any frame after LEAVING, which is a worker's last.
    #[error("a frame after LEAVING")]
    AfterLeaving,
}

/// A queued frame: the job and its head, built once when queued.
struct Queued {
    job: OutJob,
    head: [u8; protocol::JOB_HEAD],
}

impl Queued {
    fn len(&self) -> usize {
        protocol::JOB_HEAD + self.job.payload.len()
    }
}

/// One worker's socketpair: queued JOB frames out, frames in.
pub struct WorkerChannel<S = UnixStream> {
    stream: S,
    reader: FrameReader,
    /// Frames still (partly) to be written, in order.
    out: VecDeque<Queued>,
    /// Bytes of the front frame already written.
    out_pos: usize,
    /// The highest seq of which any byte was written (0: none yet).
    started: u64,
    /// The highest seq whose frame was written whole (0: none yet).
    whole: u64,
    /// Output was discarded: nothing more is written (the stream may be cut mid-frame).
    closed: bool,
    /// The write interest last reported by [`WorkerChannel::write_interest_changed`].
    wants_write: bool,
    /// It sent LEAVING: any later frame is refused.
    left: bool,
    /// Bytes were refused: every later call refuses again (the stream is out of step).
    refused: Option<ChannelError>,
}

impl<S: Read + Write> WorkerChannel<S> {
    /// A channel over `stream`, which the caller has made non-blocking (a socketpair created
    /// with `SOCK_NONBLOCK`). Write interest starts as not wanted: register for EPOLLIN only.
    pub fn new(stream: S) -> Self {
        WorkerChannel {
            stream,
            reader: FrameReader::new(MAX_FRAME),
            out: VecDeque::new(),
            out_pos: 0,
            started: 0,
            whole: 0,
            closed: false,
            wants_write: false,
            left: false,
            refused: None,
        }
    }

    /// The stream, for epoll registration (`AsFd`).
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Queues a JOB frame; the payload is shared (Rc), never copied. After
    /// [`WorkerChannel::discard_output`] the job is dropped: nothing more goes to this worker.
    pub fn push(&mut self, job: OutJob) {
        if self.closed {
            return;
        }
        let head = protocol::job_head(job.key, job.payload.len());
        self.out.push_back(Queued { job, head });
    }

    /// Writes queued frames (writev, at most [`WRITE_BATCH`] frames per call) until all are
    /// written or the stream would block. `WouldBlock` is not an error; `EINTR` is retried.
    /// Err: the stream is broken (the worker is gone or going); what is queued stays queued.
    pub fn flush(&mut self) -> io::Result<()> {
        let WorkerChannel {
            stream,
            out,
            out_pos,
            started,
            whole,
            ..
        } = self;
        while !out.is_empty() {
            // Each frame is its head, then its payload in place; the front one resumes where
            // the last partial write stopped.
            let mut slices = [IoSlice::new(&[]); 2 * WRITE_BATCH];
            let mut used = 0;
            let mut skip = *out_pos;
            let count = out.len().min(WRITE_BATCH);
            for queued in out.iter().take(count) {
                for part in [&queued.head[..], &queued.job.payload[..]] {
                    if skip >= part.len() {
                        // Written already, or empty (a 0-byte payload adds no slice).
                        skip -= part.len();
                    } else {
                        slices[used] = IoSlice::new(&part[skip..]);
                        used += 1;
                        skip = 0;
                    }
                }
            }
            let mut written = match stream.write_vectored(&slices[..used]) {
                // Never for a socket with room; were it to happen, retrying would spin.
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            // Drop the frames written whole; remember how far into the next one we got.
            let mut frames = 0;
            while written > 0 && frames < count {
                let Some(front) = out.front() else { break };
                *started = (*started).max(front.job.seq);
                let left = front.len() - *out_pos;
                if written >= left {
                    written -= left;
                    *out_pos = 0;
                    *whole = (*whole).max(front.job.seq);
                    out.pop_front();
                    frames += 1;
                } else {
                    *out_pos += written;
                    written = 0;
                }
            }
        }
        Ok(())
    }

    /// Frames (or parts of one) still to write: the master wants EPOLLOUT while true.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The highest seq whose frame was written whole (0: none yet): the jobs the worker can
    /// have read, and so run.
    pub fn written_whole(&self) -> u64 {
        self.whole
    }

    /// Whether EPOLLOUT interest must change: `Some(wants_write)` when it differs from what was
    /// last reported (and it is remembered), so the master calls `epoll.modify` only on change.
    pub fn write_interest_changed(&mut self) -> Option<bool> {
        let wants_write = self.has_output();
        if wants_write == self.wants_write {
            return None;
        }
        self.wants_write = wants_write;
        Some(wants_write)
    }

    /// Takes back every queued frame of which no byte was written yet (always a suffix of the
    /// queue), in order, with the highest seq of which any byte has been written (0 if none
    /// ever). A partly written frame stays and will be completed: the worker reads frames
    /// whole, so the stream must stay in step.
    pub fn take_unwritten(&mut self) -> (Vec<OutJob>, u64) {
        let keep = usize::from(self.out_pos > 0).min(self.out.len());
        let taken = self.out.drain(keep..).map(|q| q.job).collect();
        (taken, self.started)
    }

    /// Drops all queued output, a partly written frame too: the worker is being killed and
    /// nothing more goes to it (later pushes are dropped).
    /// Refuses (as a broken protocol) any frame whose body is over `max_body` (an outcome's
    /// result, or a data report over [`protocol::MAX_JOB_DATA`]): an honest worker never
    /// sends one, and a hostile one cannot make the master hold more.
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        let max_body = max_body.max(protocol::MAX_JOB_DATA);
        self.reader = FrameReader::new(max_body.saturating_add(OUTCOME_HEAD));
        self
    }

    pub fn discard_output(&mut self) {
        self.out.clear();
        self.out_pos = 0;
        self.closed = true;
    }

    /// Reads what is there, up to about `budget` bytes (the last read may pass it), straight
    /// into the frame buffer. Returns false when the peer closed (EOF) or the read failed with
    /// anything but `WouldBlock`/`EINTR`; frames read before that are still to be taken with
    /// [`WorkerChannel::next_said`].
    pub fn read(&mut self, budget: usize) -> bool {
        let mut budget = budget;
        while budget > 0 {
            match self.reader.read_from(&mut self.stream) {
                Ok(0) => return false,
                Ok(n) => budget = budget.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// The next whole frame the worker sent, decoded and owned; `Ok(None)` when no whole frame
    /// is buffered. A JOB, SUBMIT, RESULT, PROGRESS or DATA frame is
    /// [`ChannelError::Unexpected`], bytes that
    /// are no frame [`ChannelError::Malformed`], any frame after LEAVING
    /// [`ChannelError::AfterLeaving`]; after an error, every call returns it again.
    pub fn next_said(&mut self) -> Result<Option<WorkerSaid>, ChannelError> {
        if let Some(refused) = &self.refused {
            return Err(refused.clone());
        }
        let said = self.decode_next();
        if let Err(e) = &said {
            self.refused = Some(e.clone());
        }
        said
    }

    fn decode_next(&mut self) -> Result<Option<WorkerSaid>, ChannelError> {
        // A large outcome: the frame buffer itself becomes its body, so it is never held twice.
        if let Some(mut frame) = self.reader.take_large(MOVE_BODY)? {
            if let Frame::Outcome { key, ok, .. } = protocol::decode(&frame)? {
                if self.left {
                    return Err(ChannelError::AfterLeaving);
                }
                frame.drain(..OUTCOME_HEAD);
                return Ok(Some(WorkerSaid::Outcome {
                    key,
                    ok,
                    body: frame,
                }));
            }
            return said(&mut self.left, &frame).map(Some);
        }
        let Some(frame) = self.reader.next()? else {
            return Ok(None);
        };
        said(&mut self.left, frame).map(Some)
    }
}

/// One frame a worker sent, decoded and owned; `left`: it sent LEAVING (then and after).
fn said(left: &mut bool, frame: &[u8]) -> Result<WorkerSaid, ChannelError> {
    let frame = protocol::decode(frame)?;
    if *left {
        return Err(ChannelError::AfterLeaving);
    }
    Ok(match frame {
        Frame::Outcome { key, ok, body } => WorkerSaid::Outcome {
            key,
            ok,
            body: body.to_vec(),
        },
        Frame::Hold { paused } => WorkerSaid::Hold { paused },
        Frame::Leaving { code, jobs_done } => {
            *left = true;
            WorkerSaid::Leaving { code, jobs_done }
        }
        Frame::WorkProgress {
            key,
            numerator,
            denominator,
        } => WorkerSaid::Reported {
            key,
            report: Reported::Progress {
                numerator,
                denominator,
            },
        },
        Frame::WorkData { key, data } => WorkerSaid::Reported {
            key,
            report: Reported::Data(data.to_vec()),
        },
        other @ (Frame::Job { .. }
        | Frame::Submit { .. }
        | Frame::Result { .. }
        | Frame::Progress { .. }
        | Frame::Data { .. }) => {
            return Err(ChannelError::Unexpected(other.to_string()));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{kind, put_hold, put_job, put_leaving, put_outcome, put_result};

    /// What the test stream does on one write (or read) call.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// Accept (or hand out) at most this many bytes.
        Take(usize),
        Block,
        Intr,
        /// Fail with this errno.
        Fail(i32),
    }
    use Step::*;

    /// A stream whose writes and reads follow cycling patterns of [`Step`]s, recording what was
    /// written and how.
    struct Wire {
        write_steps: Vec<Step>,
        write_at: usize,
        written: Vec<u8>,
        /// write_vectored calls that wrote something, and the most slices one was given.
        writes: usize,
        max_slices: usize,
        /// Start addresses of every slice handed to write_vectored.
        slice_ptrs: Vec<usize>,
        read_steps: Vec<Step>,
        read_at: usize,
        input: Vec<u8>,
        read_pos: usize,
        /// When the input is used up: end of file (else WouldBlock).
        eof: bool,
    }

    impl Wire {
        fn new(write_steps: Vec<Step>) -> Wire {
            Wire {
                write_steps,
                write_at: 0,
                written: Vec::new(),
                writes: 0,
                max_slices: 0,
                slice_ptrs: Vec::new(),
                read_steps: vec![Take(usize::MAX)],
                read_at: 0,
                input: Vec::new(),
                read_pos: 0,
                eof: false,
            }
        }

        /// Accepts everything.
        fn greedy() -> Wire {
            Wire::new(vec![Take(usize::MAX)])
        }

        fn reading(input: Vec<u8>, read_steps: Vec<Step>) -> Wire {
            Wire {
                input,
                read_steps,
                ..Wire::greedy()
            }
        }
    }

    fn step(steps: &[Step], at: &mut usize) -> Step {
        let s = steps[*at % steps.len()];
        *at += 1;
        s
    }

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            match step(&self.write_steps, &mut self.write_at) {
                Block => Err(io::ErrorKind::WouldBlock.into()),
                Intr => Err(io::ErrorKind::Interrupted.into()),
                Fail(errno) => Err(io::Error::from_raw_os_error(errno)),
                Take(mut room) => {
                    self.max_slices = self.max_slices.max(bufs.len());
                    self.slice_ptrs
                        .extend(bufs.iter().map(|b| b.as_ptr() as usize));
                    let mut n = 0;
                    for buf in bufs {
                        let take = buf.len().min(room);
                        self.written.extend_from_slice(&buf[..take]);
                        room -= take;
                        n += take;
                        if room == 0 {
                            break;
                        }
                    }
                    self.writes += usize::from(n > 0);
                    Ok(n)
                }
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Read for Wire {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match step(&self.read_steps, &mut self.read_at) {
                Block => Err(io::ErrorKind::WouldBlock.into()),
                Intr => Err(io::ErrorKind::Interrupted.into()),
                Fail(errno) => Err(io::Error::from_raw_os_error(errno)),
                Take(most) => {
                    let left = self.input.len() - self.read_pos;
                    if left == 0 {
                        return match self.eof {
                            true => Ok(0),
                            false => Err(io::ErrorKind::WouldBlock.into()),
                        };
                    }
                    let n = most.min(left).min(buf.len());
                    buf[..n].copy_from_slice(&self.input[self.read_pos..self.read_pos + n]);
                    self.read_pos += n;
                    Ok(n)
                }
            }
        }
    }

    fn job(seq: u64, len: usize) -> OutJob {
        let key = 1000 + seq * 7;
        OutJob {
            seq,
            key,
            payload: (0..len).map(|i| (i as u64 ^ key) as u8).collect(),
        }
    }

    /// Jobs with payloads of 0, 1, 13, 4 KiB and 100 KiB bytes, cycling.
    fn jobs(count: u64) -> Vec<OutJob> {
        const SIZES: [usize; 5] = [0, 1, 13, 4 << 10, 100 << 10];
        (1..=count)
            .map(|seq| job(seq, SIZES[seq as usize % 5]))
            .collect()
    }

    /// The job frames in `wire`, as (key, payload), checking that nothing else is there.
    fn frames_on(wire: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut reader = FrameReader::new(MAX_FRAME);
        reader.push(wire);
        let mut got = Vec::new();
        while let Some(frame) = reader.next().unwrap() {
            match protocol::decode(frame).unwrap() {
                Frame::Job { key, payload } => got.push((key, payload.to_vec())),
                other => panic!("not a job frame: {other}"),
            }
        }
        assert!(!reader.has_partial(), "a frame is cut short");
        got
    }

    fn expected(jobs: &[OutJob]) -> Vec<(u64, Vec<u8>)> {
        jobs.iter().map(|j| (j.key, j.payload.to_vec())).collect()
    }

    /// Flushes until nothing is left, with a bound so a bug cannot hang the test.
    fn flush_all(ch: &mut WorkerChannel<Wire>) {
        for _ in 0..10_000_000 {
            ch.flush().unwrap();
            if !ch.has_output() {
                return;
            }
        }
        panic!("output never drained");
    }

    #[test]
    fn frames_written_a_few_bytes_at_a_time_arrive_whole_and_in_order() {
        // A few bytes per write, WouldBlock every other call, an EINTR now and then.
        let trickle = vec![
            Take(1),
            Block,
            Take(3),
            Block,
            Take(7),
            Intr,
            Take(2),
            Block,
            Take(13),
            Block,
            Take(5),
            Block,
        ];
        let sent = jobs(40);
        let mut ch = WorkerChannel::new(Wire::new(trickle));
        for j in &sent {
            ch.push(j.clone());
        }
        flush_all(&mut ch);
        assert_eq!(frames_on(&ch.stream().written), expected(&sent));
        assert!(ch.stream().max_slices <= 2 * WRITE_BATCH);
        assert_eq!(ch.take_unwritten(), (vec![], 40));
    }

    #[test]
    fn frames_written_in_varied_chunks_while_more_are_queued_arrive_in_order() {
        // Larger and odd chunks: cuts fall inside heads, inside payloads, and on boundaries.
        let chunky = vec![
            Take(13),
            Block,
            Take(4096 + 13),
            Take(1),
            Block,
            Take(70_000),
            Block,
            Take(26),
            Take(100_000),
            Block,
            Take(9),
        ];
        let sent = jobs(75);
        let mut ch = WorkerChannel::new(Wire::new(chunky));
        // Pushed in three rounds, each between flushes that leave output behind.
        for round in sent.chunks(25) {
            for j in round {
                ch.push(j.clone());
            }
            for _ in 0..3 {
                ch.flush().unwrap();
            }
        }
        flush_all(&mut ch);
        assert_eq!(frames_on(&ch.stream.written), expected(&sent));
    }

    #[test]
    fn a_stream_that_takes_everything_gets_at_most_write_batch_frames_per_writev() {
        // No empty payload here: each frame is two slices.
        let sent: Vec<OutJob> = (1..=2 * WRITE_BATCH as u64 + 1)
            .map(|seq| job(seq, seq as usize))
            .collect();
        let mut ch = WorkerChannel::new(Wire::greedy());
        for j in &sent {
            ch.push(j.clone());
        }
        ch.flush().unwrap();
        assert!(!ch.has_output());
        assert_eq!(frames_on(&ch.stream.written), expected(&sent));
        assert_eq!(ch.stream.writes, 3, "65 frames in batches of 32");
        assert_eq!(ch.stream.max_slices, 2 * WRITE_BATCH);
    }

    #[test]
    fn payloads_are_written_from_the_shared_buffer_not_a_copy() {
        let sent = jobs(10);
        let mut ch = WorkerChannel::new(Wire::greedy());
        for j in &sent {
            ch.push(j.clone());
        }
        ch.flush().unwrap();
        for j in sent.iter().filter(|j| !j.payload.is_empty()) {
            let at = j.payload.as_ptr() as usize;
            assert!(
                ch.stream.slice_ptrs.contains(&at),
                "job {} was not written from its payload",
                j.key
            );
        }
    }

    #[test]
    fn take_unwritten_keeps_a_partly_written_frame_and_returns_the_untouched_rest() {
        // Frames of 13 + 10 bytes.
        let sent: Vec<OutJob> = (1..=5).map(|seq| job(seq, 10)).collect();
        let mut ch = WorkerChannel::new(Wire::new(vec![Block]));
        for j in &sent {
            ch.push(j.clone());
        }

        // Nothing written yet: everything comes back, and no seq was started.
        ch.flush().unwrap();
        assert_eq!(ch.take_unwritten(), (sent.clone(), 0));
        assert!(!ch.has_output());
        for j in &sent {
            ch.push(j.clone());
        }

        // 30 bytes: the first frame whole, 7 bytes of the second.
        ch.stream.write_steps = vec![Take(30), Block];
        ch.stream.write_at = 0;
        ch.flush().unwrap();
        assert_eq!(ch.take_unwritten(), (sent[2..].to_vec(), 2));
        assert!(ch.has_output(), "the cut frame is still to be completed");
        assert_eq!(
            ch.written_whole(),
            1,
            "the first frame whole, the second cut"
        );

        // Asking again takes nothing more: the cut frame stays.
        assert_eq!(ch.take_unwritten(), (vec![], 2));

        // The cut frame is completed, and only it: the stream stays in step.
        ch.stream.write_steps = vec![Take(usize::MAX)];
        ch.flush().unwrap();
        assert_eq!(frames_on(&ch.stream.written), expected(&sent[..2]));
        assert!(!ch.has_output());
        assert_eq!(ch.written_whole(), 2);

        // A frame written whole: its seq is reported, nothing comes back.
        ch.push(sent[2].clone());
        ch.flush().unwrap();
        assert_eq!(ch.take_unwritten(), (vec![], 3));

        // A write that ends exactly on a frame boundary leaves no partial frame.
        for j in &sent[3..] {
            ch.push(j.clone());
        }
        ch.stream.write_steps = vec![Take(23), Block];
        ch.stream.write_at = 0;
        ch.flush().unwrap();
        assert_eq!(ch.take_unwritten(), (sent[4..].to_vec(), 4));
        assert!(!ch.has_output());
        assert_eq!(frames_on(&ch.stream.written), expected(&sent[..4]));
    }

    #[test]
    fn write_interest_is_reported_only_when_it_changes() {
        let mut ch = WorkerChannel::new(Wire::new(vec![Take(5), Block]));
        assert_eq!(
            ch.write_interest_changed(),
            None,
            "registered for EPOLLIN only"
        );
        ch.push(job(1, 100));
        assert_eq!(ch.write_interest_changed(), Some(true));
        assert_eq!(ch.write_interest_changed(), None);
        ch.push(job(2, 100));
        ch.flush().unwrap();
        assert_eq!(ch.write_interest_changed(), None, "still output left");
        ch.stream.write_steps = vec![Take(usize::MAX)];
        ch.flush().unwrap();
        assert_eq!(ch.write_interest_changed(), Some(false));
        assert_eq!(ch.write_interest_changed(), None);
        ch.push(job(3, 0));
        ch.discard_output();
        assert_eq!(
            ch.write_interest_changed(),
            None,
            "nothing was ever reported for it"
        );
    }

    #[test]
    fn discarded_output_is_never_written_and_later_pushes_are_dropped() {
        let mut ch = WorkerChannel::new(Wire::new(vec![Take(20), Block]));
        ch.push(job(1, 100));
        ch.push(job(2, 100));
        ch.flush().unwrap();
        ch.discard_output();
        assert!(!ch.has_output());
        ch.push(job(3, 100));
        assert!(!ch.has_output());
        ch.stream.write_steps = vec![Take(usize::MAX)];
        ch.flush().unwrap();
        assert_eq!(ch.stream.written.len(), 20);
        assert_eq!(ch.take_unwritten(), (vec![], 1));
    }

    #[test]
    fn a_broken_stream_makes_flush_fail() {
        let mut ch = WorkerChannel::new(Wire::new(vec![Take(3), Fail(nix::libc::EPIPE)]));
        ch.push(job(1, 100));
        let e = ch.flush().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::EPIPE));
        assert!(ch.has_output(), "what is queued stays queued");

        // A write that accepts nothing is broken too (retrying it would spin).
        let mut ch = WorkerChannel::new(Wire::new(vec![Take(0)]));
        ch.push(job(1, 100));
        assert_eq!(ch.flush().unwrap_err().kind(), io::ErrorKind::WriteZero);
    }

    /// OUTCOME, HOLD and LEAVING frames, and what they mean.
    fn worker_frames() -> (Vec<u8>, Vec<WorkerSaid>) {
        let mut wire = Vec::new();
        put_hold(&mut wire, true);
        put_outcome(&mut wire, 7, true, b"result");
        put_hold(&mut wire, false);
        put_outcome(&mut wire, 8, false, b"");
        let big = vec![0xa5; 300 << 10];
        put_outcome(&mut wire, 9, true, &big);
        protocol::put_progress(&mut wire, kind::WORK_PROGRESS, 10, 1, 2);
        protocol::put_data(&mut wire, kind::WORK_DATA, 10, b"part");
        put_leaving(&mut wire, 201, 3);
        let said = vec![
            WorkerSaid::Hold { paused: true },
            WorkerSaid::Outcome {
                key: 7,
                ok: true,
                body: b"result".to_vec(),
            },
            WorkerSaid::Hold { paused: false },
            WorkerSaid::Outcome {
                key: 8,
                ok: false,
                body: vec![],
            },
            WorkerSaid::Outcome {
                key: 9,
                ok: true,
                body: big,
            },
            WorkerSaid::Reported {
                key: 10,
                report: Reported::Progress {
                    numerator: 1,
                    denominator: 2,
                },
            },
            WorkerSaid::Reported {
                key: 10,
                report: Reported::Data(b"part".to_vec()),
            },
            WorkerSaid::Leaving {
                code: 201,
                jobs_done: 3,
            },
        ];
        (wire, said)
    }

    fn drain(ch: &mut WorkerChannel<Wire>, into: &mut Vec<WorkerSaid>) {
        while let Some(said) = ch.next_said().unwrap() {
            into.push(said);
        }
    }

    #[test]
    fn frames_read_in_one_go_are_decoded_in_order() {
        let (wire, said) = worker_frames();
        let mut ch = WorkerChannel::new(Wire::reading(wire, vec![Take(usize::MAX)]));
        assert!(ch.read(OUTCOME_READ_BUDGET));
        let mut got = Vec::new();
        drain(&mut ch, &mut got);
        assert_eq!(got, said);
    }

    #[test]
    fn frames_read_a_byte_at_a_time_are_decoded_once_whole() {
        let (wire, said) = worker_frames();
        let total = wire.len();
        let mut ch = WorkerChannel::new(Wire::reading(wire, vec![Take(1), Block, Intr, Take(1)]));
        let mut got = Vec::new();
        let mut calls = 0;
        while ch.stream.read_pos < total {
            assert!(ch.read(OUTCOME_READ_BUDGET));
            let before = got.len();
            drain(&mut ch, &mut got);
            // A frame is handed out exactly when its last byte is in, never before.
            let whole = said
                .iter()
                .zip(frame_ends(&ch.stream.input))
                .filter(|(_, end)| *end <= ch.stream.read_pos)
                .count();
            assert_eq!(got.len(), whole, "after {} bytes", ch.stream.read_pos);
            assert!(got.len() - before <= 1);
            calls += 1;
        }
        assert_eq!(got, said);
        assert!(calls >= total / 2);
        assert_eq!(ch.next_said(), Ok(None));
    }

    /// Where each frame in `wire` ends.
    fn frame_ends(wire: &[u8]) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut at = 0;
        while at + 4 <= wire.len() {
            let len = u32::from_be_bytes(wire[at..at + 4].try_into().unwrap()) as usize;
            at += 4 + len;
            ends.push(at);
        }
        ends
    }

    #[test]
    fn a_half_frame_yields_nothing_until_it_is_completed() {
        let mut wire = Vec::new();
        put_outcome(&mut wire, 5, true, b"hello");
        let (first, rest) = wire.split_at(9);
        let mut ch = WorkerChannel::new(Wire::reading(first.to_vec(), vec![Take(usize::MAX)]));
        assert!(ch.read(OUTCOME_READ_BUDGET));
        assert_eq!(ch.next_said(), Ok(None));
        assert_eq!(ch.next_said(), Ok(None));
        ch.stream.input.extend_from_slice(rest);
        assert!(ch.read(OUTCOME_READ_BUDGET));
        assert_eq!(
            ch.next_said(),
            Ok(Some(WorkerSaid::Outcome {
                key: 5,
                ok: true,
                body: b"hello".to_vec()
            }))
        );
        assert_eq!(ch.next_said(), Ok(None));
    }

    /// What `next_said` says to `wire` after any frames that are fine.
    fn refusal(wire: Vec<u8>) -> ChannelError {
        let mut ch = WorkerChannel::new(Wire::reading(wire, vec![Take(usize::MAX)]));
        assert!(ch.read(OUTCOME_READ_BUDGET));
        let refused = loop {
            match ch.next_said() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("nothing refused"),
                Err(e) => break e,
            }
        };
        // And it stays refused: the stream is out of step.
        assert_eq!(ch.next_said(), Err(refused.clone()));
        refused
    }

    #[test]
    fn frames_no_worker_sends_are_unexpected() {
        let mut wire = Vec::new();
        put_hold(&mut wire, true);
        put_job(&mut wire, 3, b"abc");
        put_outcome(&mut wire, 4, true, b"never read");
        let e = refusal(wire);
        assert_eq!(e, ChannelError::Unexpected("job 3 (3 bytes)".into()));
        assert_eq!(e.to_string(), "an unexpected job 3 (3 bytes)");

        let mut wire = Vec::new();
        put_result(&mut wire, 1, protocol::Status::Ok, b"");
        assert!(matches!(refusal(wire), ChannelError::Unexpected(_)));
        let mut wire = Vec::new();
        protocol::put_submit(&mut wire, 1, "pool", b"x");
        assert!(matches!(refusal(wire), ChannelError::Unexpected(_)));
        // A client's progress and data are no worker's.
        let mut wire = Vec::new();
        protocol::put_progress(&mut wire, kind::PROGRESS, 1, 1, 2);
        assert!(matches!(refusal(wire), ChannelError::Unexpected(_)));
        let mut wire = Vec::new();
        protocol::put_data(&mut wire, kind::DATA, 1, b"x");
        assert!(matches!(refusal(wire), ChannelError::Unexpected(_)));
    }

    #[test]
    fn a_malformed_progress_frame_is_refused() {
        // 16 bytes of body instead of 24.
        let mut wire = vec![0, 0, 0, 17, kind::WORK_PROGRESS];
        wire.extend_from_slice(&[0; 16]);
        assert!(matches!(
            refusal(wire),
            ChannelError::Malformed(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        // An unknown kind.
        let e = refusal(vec![0, 0, 0, 2, 99, 0]);
        assert_eq!(e, ChannelError::Malformed(FrameError::UnknownKind(99)));
        assert_eq!(e.to_string(), "a malformed frame: unknown frame kind 99");
        // A zero length.
        assert_eq!(
            refusal(vec![0, 0, 0, 0, 1, 2, 3]),
            ChannelError::Malformed(FrameError::Empty)
        );
        // An outcome too short for its key.
        assert!(matches!(
            refusal(vec![0, 0, 0, 3, kind::OUTCOME, 0, 0]),
            ChannelError::Malformed(FrameError::Truncated { .. })
        ));
        // An outcome with a status that is neither ok nor failed.
        let mut wire = Vec::new();
        put_outcome(&mut wire, 1, true, b"");
        *wire.last_mut().unwrap() = 7;
        assert_eq!(
            refusal(wire),
            ChannelError::Malformed(FrameError::BadStatus(7))
        );
    }

    #[test]
    fn any_frame_after_leaving_is_refused() {
        let mut wire = Vec::new();
        put_leaving(&mut wire, 0, 1);
        put_hold(&mut wire, false);
        let mut ch = WorkerChannel::new(Wire::reading(wire, vec![Take(usize::MAX)]));
        assert!(ch.read(OUTCOME_READ_BUDGET));
        assert_eq!(
            ch.next_said(),
            Ok(Some(WorkerSaid::Leaving {
                code: 0,
                jobs_done: 1
            }))
        );
        assert_eq!(ch.next_said(), Err(ChannelError::AfterLeaving));
        assert_eq!(
            ChannelError::AfterLeaving.to_string(),
            "a frame after LEAVING"
        );
    }

    #[test]
    fn read_is_false_at_end_of_file_or_on_an_error_but_not_on_would_block() {
        let (wire, said) = worker_frames();
        let mut ch = WorkerChannel::new(Wire::reading(wire, vec![Take(1000), Block]));
        ch.stream.eof = true;
        let mut got = Vec::new();
        let mut reads = 0;
        while ch.read(OUTCOME_READ_BUDGET) {
            drain(&mut ch, &mut got);
            reads += 1;
            assert!(reads < 1_000_000);
        }
        // What came before the end is still there to take.
        drain(&mut ch, &mut got);
        assert_eq!(got, said);

        let mut ch = WorkerChannel::new(Wire::reading(vec![], vec![Intr, Block]));
        assert!(
            ch.read(OUTCOME_READ_BUDGET),
            "EINTR and WouldBlock are no end"
        );
        ch.stream.read_steps = vec![Fail(nix::libc::ECONNRESET)];
        assert!(!ch.read(OUTCOME_READ_BUDGET));
    }

    #[test]
    fn a_read_takes_about_its_budget_and_leaves_the_rest_for_the_next() {
        const BUDGET: usize = 1 << 20;
        // 10 MB of small outcomes, all available at once.
        let mut wire = Vec::new();
        let mut count = 0;
        while wire.len() < 10_000_000 {
            put_outcome(&mut wire, count, true, &[count as u8; 1000]);
            count += 1;
        }
        let total = wire.len();
        let mut ch = WorkerChannel::new(Wire::reading(wire, vec![Take(usize::MAX)]));
        assert!(ch.read(BUDGET));
        let taken = ch.stream.read_pos;
        assert!(
            (BUDGET..BUDGET + (64 << 10)).contains(&taken),
            "one read took {taken} bytes"
        );
        let mut got = Vec::new();
        drain(&mut ch, &mut got);
        while ch.stream.read_pos < total {
            assert!(ch.read(BUDGET));
            drain(&mut ch, &mut got);
        }
        assert_eq!(got.len() as u64, count);
        assert!(got.iter().enumerate().all(|(i, s)| matches!(
            s,
            WorkerSaid::Outcome { key, ok: true, body } if *key == i as u64 && body.len() == 1000
        )));

        // One 10 MB outcome: reads grow with what arrived, so one wake-up may take up to about
        // twice the budget, never the whole frame.
        let mut wire = Vec::new();
        put_outcome(&mut wire, 1, true, &vec![1; 10_000_000]);
        let mut ch = WorkerChannel::new(Wire::reading(wire, vec![Take(usize::MAX)]));
        assert!(ch.read(BUDGET));
        let taken = ch.stream.read_pos;
        assert!(
            (BUDGET..2 * BUDGET + (64 << 10)).contains(&taken),
            "one read took {taken} bytes"
        );
        assert_eq!(ch.next_said(), Ok(None));
        // A zero budget reads nothing.
        assert!(ch.read(0));
        assert_eq!(ch.stream.read_pos, taken);
    }

    /// The default stream: a non-blocking socketpair whose buffer fills long before the
    /// queue is written, so writev stops at WouldBlock and resumes inside a frame.
    #[test]
    fn over_a_real_socketpair_frames_cross_whole_and_the_end_is_seen() {
        use std::os::fd::AsFd;
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let mut ch = WorkerChannel::new(ours);
        let _registrable = ch.stream().as_fd();
        let sent = jobs(60);
        for j in &sent {
            ch.push(j.clone());
        }
        ch.flush().unwrap();
        assert!(ch.has_output(), "the socket buffer cannot hold 2.5 MB");
        let mut peer = FrameReader::new(MAX_FRAME);
        let mut got = Vec::new();
        for _ in 0..1_000_000 {
            let _ = peer.read_from(&mut theirs);
            while let Some(frame) = peer.next().unwrap() {
                match protocol::decode(frame).unwrap() {
                    Frame::Job { key, payload } => got.push((key, payload.to_vec())),
                    other => panic!("{other}"),
                }
            }
            ch.flush().unwrap();
            if !ch.has_output() && got.len() == sent.len() {
                break;
            }
        }
        assert_eq!(got, expected(&sent));

        // The worker's side: an outcome, then it closes.
        let mut wire = Vec::new();
        put_outcome(&mut wire, 1, true, b"done");
        theirs.write_all(&wire).unwrap();
        drop(theirs);
        assert!(!ch.read(OUTCOME_READ_BUDGET), "the end is seen");
        assert_eq!(
            ch.next_said(),
            Ok(Some(WorkerSaid::Outcome {
                key: 1,
                ok: true,
                body: b"done".to_vec()
            }))
        );
        // Writing to a closed peer fails.
        ch.push(job(61, 10));
        assert!(ch.flush().is_err());
    }
}
