//! What the `put_*` functions encode, `FrameReader` + `decode` give back — one frame or many,
//! the stream cut anywhere.
//!
//! Owns the property "encode, then decode, is the identity" for every frame kind, with
//! arbitrary ids, pool names (up to the u16 length's cut), payloads and statuses, and a
//! stream of such frames split at arbitrary points. It never feeds bytes no encoder makes
//! (`frame_stream` does).
#![no_main]

use jobhost::protocol::{self, kind, Frame, FrameReader, Status};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// An owned frame, as the fuzzer makes it.
#[derive(Debug, Clone, PartialEq)]
enum Owned {
    Submit {
        id: u64,
        pool: String,
        payload: Vec<u8>,
        watch: bool,
    },
    Result {
        id: u64,
        status: Status,
        body: Vec<u8>,
    },
    Job {
        key: u64,
        payload: Vec<u8>,
    },
    Outcome {
        key: u64,
        ok: bool,
        body: Vec<u8>,
    },
    Hold {
        paused: bool,
    },
    Leaving {
        code: u8,
        jobs_done: u64,
    },
    WorkProgress {
        key: u64,
        numerator: u64,
        denominator: u64,
    },
    Progress {
        id: u64,
        numerator: u64,
        denominator: u64,
    },
    WorkData {
        key: u64,
        data: Vec<u8>,
    },
    Data {
        id: u64,
        data: Vec<u8>,
    },
}

fn bytes(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=600usize)?;
    let mut out = u.bytes(n.min(u.len()))?.to_vec();
    // Now and then a large payload, without making the input large.
    if u.ratio(1, 200)? {
        out.resize(u.int_in_range(60_000..=300_000usize)?, u.arbitrary()?);
    }
    Ok(out)
}

fn frame(u: &mut Unstructured<'_>) -> Result<Owned> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 => Owned::Submit {
            id: u.arbitrary()?,
            pool: u.arbitrary()?,
            payload: bytes(u)?,
            watch: u.arbitrary()?,
        },
        1 => Owned::Result {
            id: u.arbitrary()?,
            status: *u.choose(&[Status::Ok, Status::Failed, Status::Rejected])?,
            body: bytes(u)?,
        },
        2 => Owned::Job {
            key: u.arbitrary()?,
            payload: bytes(u)?,
        },
        3 => Owned::Outcome {
            key: u.arbitrary()?,
            ok: u.arbitrary()?,
            body: bytes(u)?,
        },
        4 => Owned::Hold {
            paused: u.arbitrary()?,
        },
        5 => Owned::Leaving {
            code: u.arbitrary()?,
            jobs_done: u.arbitrary()?,
        },
        6 => Owned::WorkProgress {
            key: u.arbitrary()?,
            numerator: u.arbitrary()?,
            denominator: u.arbitrary()?,
        },
        7 => Owned::Progress {
            id: u.arbitrary()?,
            numerator: u.arbitrary()?,
            denominator: u.arbitrary()?,
        },
        8 => Owned::WorkData {
            key: u.arbitrary()?,
            data: bytes(u)?,
        },
        _ => Owned::Data {
            id: u.arbitrary()?,
            data: bytes(u)?,
        },
    })
}

fn put(out: &mut Vec<u8>, f: &Owned) {
    match f {
        Owned::Submit {
            id,
            pool,
            payload,
            watch,
        } => {
            let k = if *watch {
                kind::SUBMIT_WATCH
            } else {
                kind::SUBMIT
            };
            protocol::put_submit_head_as(out, k, *id, pool, payload.len());
            out.extend_from_slice(payload);
        }
        Owned::Result { id, status, body } => protocol::put_result(out, *id, *status, body),
        Owned::Job { key, payload } => {
            out.extend_from_slice(&protocol::job_head(*key, payload.len()));
            out.extend_from_slice(payload);
        }
        Owned::Outcome { key, ok, body } => protocol::put_outcome(out, *key, *ok, body),
        Owned::Hold { paused } => protocol::put_hold(out, *paused),
        Owned::Leaving { code, jobs_done } => protocol::put_leaving(out, *code, *jobs_done),
        Owned::WorkProgress {
            key,
            numerator,
            denominator,
        } => protocol::put_progress(out, kind::WORK_PROGRESS, *key, *numerator, *denominator),
        Owned::Progress {
            id,
            numerator,
            denominator,
        } => protocol::put_progress(out, kind::PROGRESS, *id, *numerator, *denominator),
        Owned::WorkData { key, data } => protocol::put_data(out, kind::WORK_DATA, *key, data),
        Owned::Data { id, data } => protocol::put_data(out, kind::DATA, *id, data),
    }
}

fn own(f: Frame<'_>) -> Owned {
    match f {
        Frame::Submit {
            id,
            pool,
            payload,
            watch,
        } => Owned::Submit {
            id,
            pool: pool.to_owned(),
            payload: payload.to_vec(),
            watch,
        },
        Frame::Result { id, status, body } => Owned::Result {
            id,
            status,
            body: body.to_vec(),
        },
        Frame::Job { key, payload } => Owned::Job {
            key,
            payload: payload.to_vec(),
        },
        Frame::Outcome { key, ok, body } => Owned::Outcome {
            key,
            ok,
            body: body.to_vec(),
        },
        Frame::Hold { paused } => Owned::Hold { paused },
        Frame::Leaving { code, jobs_done } => Owned::Leaving { code, jobs_done },
        Frame::WorkProgress {
            key,
            numerator,
            denominator,
        } => Owned::WorkProgress {
            key,
            numerator,
            denominator,
        },
        Frame::Progress {
            id,
            numerator,
            denominator,
        } => Owned::Progress {
            id,
            numerator,
            denominator,
        },
        Frame::WorkData { key, data } => Owned::WorkData {
            key,
            data: data.to_vec(),
        },
        Frame::Data { id, data } => Owned::Data {
            id,
            data: data.to_vec(),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut sent = Vec::new();
    let mut wire = Vec::new();
    let mut ends = Vec::new();
    while !u.is_empty() && sent.len() < 32 {
        let Ok(f) = frame(&mut u) else { break };
        put(&mut wire, &f);
        ends.push(wire.len());
        sent.push(f);
    }
    // A pool name is cut to what its u16 length can say (at a char boundary or not: the
    // decoder then refuses it as not UTF-8, which is also what it must do).
    let expect_ok = sent.iter().all(|f| match f {
        Owned::Submit { pool, .. } => pool.len() <= u16::MAX as usize,
        _ => true,
    });
    let mut reader = FrameReader::new(1 << 30);
    let mut got = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        // An input used up sends the rest at once (not byte by byte: that only costs time).
        let pick = if u.is_empty() {
            3
        } else {
            u.int_in_range(0..=3u8).unwrap_or(3)
        };
        let n = match pick {
            0 => 1,
            1 => u.int_in_range(1..=16usize).unwrap_or(1),
            2 => u.int_in_range(1..=70_000usize).unwrap_or(1),
            _ => wire.len(),
        }
        // Pushes of at least 1/64 of the stream: a 300 KB frame byte by byte costs
        // 300,000 `next` calls per execution and says nothing a short one does not.
        .max(wire.len() / 64)
        .min(wire.len() - at);
        reader.push(&wire[at..at + n]);
        at += n;
        while let Some(bytes) = reader.next().expect("an encoded stream is well formed") {
            // Whole frames come out exactly when their last byte is in.
            assert!(ends[got.len()] <= at);
            match protocol::decode(bytes) {
                Ok(f) => got.push(own(f)),
                Err(e) => {
                    assert!(!expect_ok, "{e}");
                    return;
                }
            }
        }
        if got.len() < ends.len() {
            assert!(ends[got.len()] > at, "a whole frame was not handed out");
        }
    }
    assert_eq!(got, sent);
    assert!(!reader.has_partial());
});
