//! The admin line protocol against arbitrary bytes: `admin::LineBuffer` cutting a stream into
//! lines, and `admin::parse` reading each.
//!
//! Owns these properties:
//! - the lines and errors come out the same however the stream is cut into pushes;
//! - a line handed out holds no LF, no control character but tab, at most `max_line` bytes;
//! - `parse` never panics; an error is one line of text (it goes after `ERR `) and never holds
//!   the token of an `auth` line;
//! - a parsed request, written back in its canonical form, parses to the same request, and
//!   the command word's case does not matter.
#![no_main]

use jobhost::admin::{self, Command, LineBuffer, LineError, Request, Target};
use libfuzzer_sys::fuzz_target;

/// A request as a line `parse` must read back as the same request.
fn canonical(request: &Request) -> String {
    match request {
        Request::Help => "help".into(),
        Request::Status { json } => format!("status{}", if *json { " json" } else { "" }),
        Request::Workers { json } => format!("workers{}", if *json { " JSON" } else { "" }),
        Request::Quit => "quit".into(),
        Request::Auth { token } => format!("auth\t{token}"),
        Request::Do(command) => match command {
            Command::Stop { escalate: false } => "shutdown".into(),
            Command::StopNow => "shutdown now".into(),
            Command::Scale { pool, workers } => format!("scale {pool} {workers}"),
            Command::Restart {
                target: Target::All,
            } => "restart ALL".into(),
            Command::Restart {
                target: Target::Pool(pool),
            } => format!("restart  {pool}"),
            Command::StopPool { pool } => format!("stop {pool}"),
            Command::StartPool { pool } => format!("start {pool}"),
            Command::Reload => "reload".into(),
            Command::ReopenLogs => "reopen".into(),
            other => panic!("parse gave {other:?}, which only a signal means"),
        },
    }
}

fn check_line(line: &str) {
    let parsed = admin::parse(line);
    match &parsed {
        Ok(request) => {
            let again = canonical(request);
            assert_eq!(admin::parse(&again).as_ref(), Ok(request), "{again:?}");
            if let Request::Do(Command::Scale { workers, .. }) = request {
                assert!(*workers <= admin::MAX_WORKERS);
            }
            if let Request::Do(
                Command::Scale { pool, .. }
                | Command::StopPool { pool }
                | Command::StartPool { pool }
                | Command::Restart {
                    target: Target::Pool(pool),
                },
            ) = request
            {
                assert!(!pool.is_empty() && !pool.contains([' ', '\t']));
            }
            if let Request::Auth { token } = request {
                assert!(!token.is_empty());
                assert_eq!(format!("{request:?}"), "Auth { token: <redacted> }");
            }
        }
        Err(reason) => {
            assert!(!reason.is_empty());
            assert!(!reason.contains(['\n', '\r']), "{reason:?}");
            let reply = admin::err_reply(reason);
            assert!(reply.starts_with("ERR ") && reply.ends_with('\n'));
            assert_eq!(reply.matches('\n').count(), 1, "{reply:?}");
        }
    }
    // The command word's case does not matter (pool names and tokens keep theirs).
    let trimmed = line.trim_start_matches([' ', '\t']);
    let word_end = trimmed.find([' ', '\t']).unwrap_or(trimmed.len());
    let (word, rest) = trimmed.split_at(word_end);
    let upper = format!("{}{rest}", word.to_ascii_uppercase());
    match (&parsed, admin::parse(&upper)) {
        (Ok(a), Ok(b)) => assert_eq!(*a, b, "{upper:?}"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("{line:?} gave {a:?}, {upper:?} gave {b:?}"),
    }
}

#[derive(Debug, PartialEq)]
enum Got {
    Line(String),
    Error(LineError),
}

fn drain(buffer: &mut LineBuffer, out: &mut Vec<Got>, max_line: usize) {
    loop {
        match buffer.next_line() {
            Ok(Some(line)) => {
                assert!(line.len() <= max_line);
                assert!(
                    !line.chars().any(|c| c.is_control() && c != '\t'),
                    "{line:?}"
                );
                out.push(Got::Line(line));
            }
            Ok(None) => return,
            Err(e) => out.push(Got::Error(e)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // [max_line selector][cut][stream…]
    let [limit, cut, stream @ ..] = data else {
        return;
    };
    let max_line = match limit % 3 {
        0 => 8,
        1 => 64,
        _ => admin::MAX_LINE,
    };
    // Every line of the input as `parse` would see it, whatever the buffer says of it.
    for line in stream.split(|&b| b == b'\n') {
        if let Ok(text) = std::str::from_utf8(line.strip_suffix(b"\r").unwrap_or(line)) {
            check_line(text);
        }
    }
    let mut whole = LineBuffer::new(max_line);
    whole.push(stream);
    let mut reference = Vec::new();
    drain(&mut whole, &mut reference, max_line);

    let step = usize::from(*cut % 17) + 1;
    let mut pieces = LineBuffer::new(max_line);
    let mut got = Vec::new();
    for piece in stream.chunks(step) {
        pieces.push(piece);
        drain(&mut pieces, &mut got, max_line);
    }
    assert_eq!(got, reference, "cut every {step} bytes");
    for g in &reference {
        if let Got::Line(line) = g {
            check_line(line);
        }
    }
});
