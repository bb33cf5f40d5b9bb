//! The job frame reader and decoder against arbitrary bytes, cut into arbitrary chunks.
//!
//! Owns the properties of `protocol::FrameReader` + `protocol::decode` on any input (the
//! master's client and worker channels and a worker's channel all read through these two):
//! - the frames and the first error come out the same however the stream is cut into pushes
//!   or reads (`push`, `read_from`), with `shrink`/`shrink_to` called anywhere in between;
//! - `has_frame` agrees with `next`; a length over the limit is refused before its body;
//! - what is buffered is never more than what was fed minus what was handed out;
//! - a frame that decodes is encoded back by the `put_*` functions to exactly its bytes
//!   (the encoding is canonical), and one that does not decode is a typed error, not a panic.
//!
//! It never asserts anything of how the master *reacts* to a frame (that is the live fuzzer's).
#![no_main]

use jobhost::protocol::{self, kind, Frame, FrameError, FrameReader};
use libfuzzer_sys::fuzz_target;

/// What came out of a stream: every whole frame, then the first error if one came.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Vec<u8>>,
    error: Option<FrameError>,
}

/// The stream pushed whole, then drained: the reference.
fn whole(stream: &[u8], max_frame: usize) -> Outcome {
    let mut reader = FrameReader::new(max_frame);
    reader.push(stream);
    let mut frames = Vec::new();
    loop {
        match reader.next() {
            Ok(Some(frame)) => frames.push(frame.to_vec()),
            Ok(None) => {
                return Outcome {
                    frames,
                    error: None,
                }
            }
            Err(e) => {
                return Outcome {
                    frames,
                    error: Some(e),
                }
            }
        }
    }
}

/// A `Read` that hands out the stream in pieces of the given sizes.
struct Pieces<'a> {
    stream: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
}

impl std::io::Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let size = self.sizes.get(self.turn % self.sizes.len().max(1)).copied();
        self.turn += 1;
        let n = (usize::from(size.unwrap_or(255)) * 37 + 1)
            .min(buf.len())
            .min(self.stream.len());
        buf[..n].copy_from_slice(&self.stream[..n]);
        self.stream = &self.stream[n..];
        Ok(n)
    }
}

/// The stream cut at the points `cuts` says, through `push` or `read_from` as it says.
fn chunked(stream: &[u8], cuts: &[u8], max_frame: usize) -> Outcome {
    let mut reader = FrameReader::new(max_frame);
    let mut frames = Vec::new();
    let mut fed = 0usize;
    let mut taken = 0usize;
    let mut rest = stream;
    let mut turn = 0usize;
    let mut source = Pieces {
        stream,
        sizes: cuts,
        turn: 0,
    };
    let use_reads = cuts.first().is_some_and(|c| c & 1 == 1);
    loop {
        // Drain what is whole; `has_frame` must say what `next` then does.
        loop {
            let said = reader.has_frame();
            match reader.next() {
                Ok(Some(frame)) => {
                    assert_eq!(said, Ok(true));
                    taken += 4 + frame.len();
                    frames.push(frame.to_vec());
                }
                Ok(None) => {
                    assert_eq!(said, Ok(false));
                    break;
                }
                Err(e) => {
                    assert_eq!(said, Err(e.clone()));
                    if let FrameError::TooLarge { len, max } = e {
                        assert!(len > max && max == max_frame);
                    }
                    return Outcome {
                        frames,
                        error: Some(e),
                    };
                }
            }
        }
        assert_eq!(reader.buffered(), fed - taken);
        assert_eq!(reader.has_partial(), fed > taken);
        let cut = cuts.get(turn % cuts.len().max(1)).copied().unwrap_or(0);
        turn += 1;
        match cut % 7 {
            0 => reader.shrink(),
            1 => reader.shrink_to(usize::from(cut) << 8),
            _ => {}
        }
        if use_reads {
            let before = reader.buffered();
            match reader.read_from(&mut source) {
                Ok(0) => {
                    return Outcome {
                        frames,
                        error: None,
                    }
                }
                Ok(n) => {
                    assert_eq!(reader.buffered(), before + n);
                    fed += n;
                }
                Err(e) => panic!("a slice reader failed: {e}"),
            }
        } else {
            if rest.is_empty() {
                return Outcome {
                    frames,
                    error: None,
                };
            }
            let n = (usize::from(cut) * 3 + 1).min(rest.len());
            reader.push(&rest[..n]);
            fed += n;
            rest = &rest[n..];
        }
    }
}

/// A decoded frame encoded again with the `put_*` functions (length prefix included).
fn encode(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    match *frame {
        Frame::Submit {
            id,
            pool,
            payload,
            watch,
        } => {
            let k = if watch {
                kind::SUBMIT_WATCH
            } else {
                kind::SUBMIT
            };
            protocol::put_submit_head_as(&mut out, k, id, pool, payload.len());
            out.extend_from_slice(payload);
        }
        Frame::Result { id, status, body } => protocol::put_result(&mut out, id, status, body),
        Frame::Job { key, payload } => {
            out.extend_from_slice(&protocol::job_head(key, payload.len()));
            out.extend_from_slice(payload);
        }
        Frame::Outcome { key, ok, body } => protocol::put_outcome(&mut out, key, ok, body),
        Frame::Hold { paused } => protocol::put_hold(&mut out, paused),
        Frame::Leaving { code, jobs_done } => protocol::put_leaving(&mut out, code, jobs_done),
        Frame::WorkProgress {
            key,
            numerator,
            denominator,
        } => protocol::put_progress(&mut out, kind::WORK_PROGRESS, key, numerator, denominator),
        Frame::Progress {
            id,
            numerator,
            denominator,
        } => protocol::put_progress(&mut out, kind::PROGRESS, id, numerator, denominator),
        Frame::WorkData { key, data } => protocol::put_data(&mut out, kind::WORK_DATA, key, data),
        Frame::Data { id, data } => protocol::put_data(&mut out, kind::DATA, id, data),
    }
    out
}

fn check_decode(frame: &[u8]) {
    match protocol::decode(frame) {
        Ok(decoded) => {
            let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
            wire.extend_from_slice(frame);
            assert_eq!(encode(&decoded), wire, "{decoded} does not encode back");
            let _ = decoded.to_string();
        }
        Err(e) => {
            match e {
                FrameError::Empty => assert!(frame.is_empty()),
                FrameError::UnknownKind(k) => assert_eq!(Some(&k), frame.first()),
                FrameError::Truncated { kind, len } => {
                    assert_eq!((Some(&kind), len), (frame.first(), frame.len()))
                }
                _ => {}
            }
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // [limit selector][cut count][cuts…][stream…]
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let Some((&ncuts, rest)) = rest.split_first() else {
        return;
    };
    let (cuts, stream) = rest.split_at(usize::from(ncuts).min(rest.len()));
    let max_frame = match limit % 4 {
        0 => 16,
        1 => 300,
        2 => 70_000,
        _ => 1 << 30,
    };
    let reference = whole(stream, max_frame);
    for frame in &reference.frames {
        assert!(!frame.is_empty() && frame.len() <= max_frame);
        check_decode(frame);
    }
    assert_eq!(chunked(stream, cuts, max_frame), reference);
    // Any bytes as a frame body, not only the ones the reader cut out.
    check_decode(stream);
});
