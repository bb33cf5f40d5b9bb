//! The Gearman packet decoder (`gearman::packet::Decoder`, what a gearman pool's worker reads
//! its servers with) against arbitrary bytes cut into arbitrary chunks.
//!
//! Owns these properties:
//! - the packets and the first error come out the same however the stream is cut into feeds,
//!   with `shrink` anywhere in between; an error stays (every later call returns it again);
//! - never more than `limit()` bytes are buffered, and `feed` takes no more than fit;
//! - a packet that decodes is encoded back by `encode_raw` to exactly its bytes (the NUL
//!   splitting is canonical);
//! - `decode_raw` agrees with the decoder on where the first packet ends.
#![no_main]

use jobhost::gearman::packet::{self, Decoder, FromServer, Magic, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

/// A decoded server packet, encoded again.
fn encode(p: &FromServer<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    let args: Vec<&[u8]> = match *p {
        FromServer::Noop | FromServer::NoJob => vec![],
        FromServer::JobAssign {
            handle,
            function,
            unique,
            reducer,
            workload,
        } => {
            let mut a = vec![handle, function];
            a.extend(unique);
            a.extend(reducer);
            a.push(workload);
            a
        }
        FromServer::EchoRes(data) | FromServer::OptionRes(data) => vec![data],
        FromServer::Error { code, text } => vec![code, text],
    };
    packet::encode_raw(Magic::Res, p.code(), &args, &mut out);
    out
}

#[derive(Debug, PartialEq)]
struct Outcome {
    /// Each packet, encoded back.
    packets: Vec<Vec<u8>>,
    error: Option<String>,
}

fn run(stream: &[u8], cuts: &[u8], max_body: usize) -> Outcome {
    let mut decoder = Decoder::new(max_body);
    let mut packets = Vec::new();
    let mut rest = stream;
    let mut turn = 0;
    loop {
        let cut = cuts.get(turn % cuts.len().max(1)).copied().unwrap_or(255);
        turn += 1;
        let want = if cuts.is_empty() {
            rest.len()
        } else {
            (usize::from(cut) * 5 + 1).min(rest.len())
        };
        let before = decoder.buffered();
        let took = decoder.feed(&rest[..want]);
        assert!(took <= want);
        assert_eq!(decoder.buffered(), before + took);
        assert!(decoder.buffered() <= decoder.limit());
        rest = &rest[took..];
        loop {
            match decoder.next() {
                Ok(Some(p)) => packets.push(encode(&p)),
                Ok(None) => break,
                Err(e) => {
                    let shown = e.to_string();
                    // The bad packet stays at the front: the same error again.
                    let again = decoder.next().map(|_| ()).map_err(|e| e.to_string());
                    assert_eq!(again, Err(shown.clone()));
                    return Outcome {
                        packets,
                        error: Some(shown),
                    };
                }
            }
        }
        if cut % 5 == 0 {
            decoder.shrink();
        }
        if took == 0 && rest.is_empty() {
            return Outcome {
                packets,
                error: None,
            };
        }
        // Nothing taken with bytes left: the buffer is full of a packet that is not whole,
        // which the limit rules out (a whole packet fits, and next() took it).
        assert!(took > 0 || rest.is_empty(), "the decoder stalled");
    }
}

fuzz_target!(|data: &[u8]| {
    let [limit, ncuts, rest @ ..] = data else {
        return;
    };
    let (cuts, stream) = rest.split_at(usize::from(*ncuts).min(rest.len()));
    let max_body = match limit % 3 {
        0 => 0,
        1 => 40,
        _ => 1 << 20,
    };
    let whole = run(stream, &[], max_body);
    let cut = run(stream, cuts, max_body);
    assert_eq!(cut, whole);
    // The first packet, whole, re-encodes to exactly its bytes.
    if let Some(first) = whole.packets.first() {
        assert_eq!(first.as_slice(), &stream[..first.len()]);
        match packet::decode_raw(stream, max_body) {
            Ok(Some((raw, len))) => {
                assert_eq!(len, first.len());
                assert_eq!(raw.magic, Magic::Res);
                assert_eq!(HEADER_LEN + raw.body.len(), len);
            }
            other => panic!("decode_raw disagrees: {other:?}"),
        }
    }
    // Every packet re-encodes to its place in the stream.
    let joined: Vec<u8> = whole.packets.concat();
    assert_eq!(joined.as_slice(), &stream[..joined.len()]);
});
