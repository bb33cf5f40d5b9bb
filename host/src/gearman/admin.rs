//! gearmand's line-based admin protocol, the one question a worker asks in it: `status`, for
//! the figures of its pool's function (jobs queued and running) that `status` and the metrics
//! show. [`STATUS_REQUEST`] is what to send; [`StatusReader`] takes the answer's bytes as
//! they come and gives the function's [`FunctionStatus`] once the answer is complete.
//!
//! This module owns the answer's format and its limits, and nothing else: it never does I/O
//! (the caller reads the socket and feeds the bytes) and keeps at most one line of
//! [`MAX_LINE`] bytes. The server is untrusted: nothing here panics on input, an answer is
//! bounded in bytes ([`MAX_ANSWER`]) and lines ([`MAX_LINES`]), and anything that is not a
//! `status` answer is a [`StatusError`] (the caller drops the figures and the connection).
//!
//! # The format (gearmand 1.1.20, as shipped by Debian 12)
//!
//! From `libgearman-server/text.cc` (`server_run_text`) at 1.1.20, and checked against a
//! running gearmand 1.1.20 (`printf 'status\n' | nc`, and `gearadmin --status`, which
//! prints the same lines):
//! - A connection's first byte decides, per request, binary packet (`\0`) or text line
//!   (anything else); the command is matched case-insensitively, extra words are ignored.
//! - `status` is answered with one line per function the server knows (one a worker
//!   registered or a job was submitted for), `FUNCTION\tTOTAL\tRUNNING\tAVAILABLE_WORKERS\n`
//!   (`"%.*s\t%u\t%u\t%u\n"`), then `.\n`. TOTAL counts the function's jobs queued or running,
//!   RUNNING those a worker took, AVAILABLE_WORKERS the workers that registered it. A
//!   function the server does not list has no jobs.
//! - An unknown command is answered `ERR UNKNOWN_COMMAND Unknown+server+command…\r\n`.
//! - The answer goes into the same per-connection output queue as binary packets, so on a
//!   worker's own connection it could come between two of them; jobhost asks on a
//!   connection of its own (see `worker/gearman.rs`).
//!
//! A function name may hold tabs in the binary protocol: a line is split at its last three
//! tabs. The pool's function (at most 255 printable bytes, see `config.rs`) always fits in
//! [`MAX_LINE`]; a longer line is another function's and is skipped.

use std::fmt;

/// The request: one line.
pub const STATUS_REQUEST: &[u8] = b"status\n";
/// The longest line read as a line: the pool's function (at most 255 bytes), three tabs and
/// three numbers fit many times over. A longer one cannot be the pool's and is skipped.
pub const MAX_LINE: usize = 1024;
/// The most lines an answer may have (one per function the server knows).
pub const MAX_LINES: usize = 65_536;
/// The most bytes an answer may have.
pub const MAX_ANSWER: usize = 4 << 20;

/// One function's line of a `status` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FunctionStatus {
    /// Jobs queued or running.
    pub total: u64,
    /// Jobs a worker took (never more than `total`: checked when read).
    pub running: u64,
    /// Workers that registered the function.
    pub workers: u64,
}

impl FunctionStatus {
    /// Jobs waiting at the server for a worker.
    pub fn waiting(&self) -> u64 {
        self.total.saturating_sub(self.running)
    }
}

/// Why bytes are not an answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("the answer to `status` is longer than {MAX_ANSWER} bytes")]
    TooLong,
    #[error("the answer to `status` has more than {MAX_LINES} lines")]
    TooManyLines,
    #[error("the server refuses `status`: {0}")]
    Refused(Shown),
    #[error("not a line of a `status` answer: {0}")]
    BadLine(Shown),
    #[error("function {0} is listed twice")]
    Twice(Shown),
    #[error("function {function}: {running} jobs running of {total}")]
    MoreRunningThanTotal {
        function: Shown,
        total: u64,
        running: u64,
    },
    #[error("bytes after the end of the answer to `status` (nothing else was asked)")]
    Trailing,
}

/// Bytes from the server as shown in a message: at most 64 of them, escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown(String);

impl Shown {
    fn of(bytes: &[u8]) -> Shown {
        let mut text: String = bytes
            .iter()
            .take(64)
            .flat_map(|b| b.escape_ascii())
            .map(char::from)
            .collect();
        if bytes.len() > 64 {
            text.push('…');
        }
        Shown(format!("\"{text}\""))
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads one answer to `status` for one function, fed in pieces as they arrive.
#[derive(Debug)]
pub struct StatusReader {
    function: Box<[u8]>,
    /// The line so far (without its newline), at most [`MAX_LINE`] bytes.
    line: Vec<u8>,
    /// The current line is too long to be the function's: skipped up to its newline.
    skipping: bool,
    lines: usize,
    bytes: usize,
    found: Option<FunctionStatus>,
    /// The closing `.` came: any further byte is an error.
    done: bool,
}

impl StatusReader {
    pub fn new(function: &[u8]) -> StatusReader {
        StatusReader {
            function: function.into(),
            line: Vec::new(),
            skipping: false,
            lines: 0,
            bytes: 0,
            found: None,
            done: false,
        }
    }

    /// Takes the next bytes of the answer. `Ok(Some(_))` once its closing `.` line came:
    /// the function's figures (all zero when it is not listed); `Ok(None)`: more to come.
    /// An error is final (the answer, and the connection's stream, cannot be trusted).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Option<FunctionStatus>, StatusError> {
        if self.done {
            return if bytes.is_empty() {
                Ok(self.found.or(Some(FunctionStatus::default())))
            } else {
                Err(StatusError::Trailing)
            };
        }
        self.bytes = self.bytes.saturating_add(bytes.len());
        if self.bytes > MAX_ANSWER {
            return Err(StatusError::TooLong);
        }
        while !bytes.is_empty() {
            let (part, rest, ended) = match bytes.iter().position(|&b| b == b'\n') {
                Some(at) => (&bytes[..at], &bytes[at + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if !self.skipping {
                if self.line.len() + part.len() > MAX_LINE {
                    self.skipping = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            if !ended {
                break;
            }
            self.lines += 1;
            if self.lines > MAX_LINES {
                return Err(StatusError::TooManyLines);
            }
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            let line = std::mem::take(&mut self.line);
            if self.take_line(&line)? {
                self.done = true;
                if !bytes.is_empty() {
                    return Err(StatusError::Trailing);
                }
                return Ok(Some(self.found.unwrap_or_default()));
            }
            // Keep the buffer (its capacity is at most MAX_LINE).
            self.line = line;
            self.line.clear();
        }
        Ok(None)
    }

    /// One whole line (without its newline): `true` if it is the closing `.`.
    fn take_line(&mut self, line: &[u8]) -> Result<bool, StatusError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line == b"." {
            return Ok(true);
        }
        if line == b"ERR" || line.starts_with(b"ERR ") {
            return Err(StatusError::Refused(Shown::of(line)));
        }
        let bad = || StatusError::BadLine(Shown::of(line));
        let mut fields = line.rsplitn(4, |&b| b == b'\t');
        let (Some(workers), Some(running), Some(total), Some(name)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad());
        };
        let (Some(workers), Some(running), Some(total)) =
            (number(workers), number(running), number(total))
        else {
            return Err(bad());
        };
        if name.is_empty() {
            return Err(bad());
        }
        if name != &*self.function {
            return Ok(false);
        }
        if self.found.is_some() {
            return Err(StatusError::Twice(Shown::of(name)));
        }
        if running > total {
            return Err(StatusError::MoreRunningThanTotal {
                function: Shown::of(name),
                total,
                running,
            });
        }
        self.found = Some(FunctionStatus {
            total,
            running,
            workers,
        });
        Ok(false)
    }
}

/// A decimal count: 1 to 20 ASCII digits that fit in a `u64` (gearmand prints `u32`s).
fn number(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 20 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(function: &str, answer: &[u8]) -> Result<Option<FunctionStatus>, StatusError> {
        StatusReader::new(function.as_bytes()).feed(answer)
    }

    fn status(total: u64, running: u64, workers: u64) -> Option<FunctionStatus> {
        Some(FunctionStatus {
            total,
            running,
            workers,
        })
    }

    #[test]
    fn reads_the_functions_line_among_others() {
        let answer = b"other\t9\t9\t1\nq\t5\t2\t3\nq.x\t7\t0\t0\n.\n";
        assert_eq!(read_all("q", answer), Ok(status(5, 2, 3)));
        assert_eq!(status(5, 2, 3).map(|s| s.waiting()), Some(3));
        // What gearmand 1.1.20 answered with nothing registered: just the end.
        assert_eq!(read_all("q", b".\n"), Ok(status(0, 0, 0)));
        // Not listed: no jobs.
        assert_eq!(read_all("q", b"other\t1\t0\t0\n.\n"), Ok(status(0, 0, 0)));
        // CRLF endings are taken too.
        assert_eq!(read_all("q", b"q\t1\t1\t1\r\n.\r\n"), Ok(status(1, 1, 1)));
    }

    #[test]
    fn takes_the_answer_in_any_pieces() {
        let answer = b"abc\t1\t0\t2\nq\t40\t4\t4\n.\n";
        for cut in 0..answer.len() {
            let mut reader = StatusReader::new(b"q");
            let first = reader.feed(&answer[..cut]);
            assert_eq!(first, Ok(None), "cut at {cut}");
            assert_eq!(
                reader.feed(&answer[cut..]),
                Ok(status(40, 4, 4)),
                "cut at {cut}"
            );
        }
        // A byte at a time.
        let mut reader = StatusReader::new(b"q");
        let mut got = None;
        for (i, b) in answer.iter().enumerate() {
            let step = reader.feed(&[*b]).expect("a good answer");
            if i + 1 < answer.len() {
                assert_eq!(step, None);
            } else {
                got = step;
            }
        }
        assert_eq!(got, status(40, 4, 4));
    }

    #[test]
    fn is_not_done_without_the_closing_dot() {
        let mut reader = StatusReader::new(b"q");
        assert_eq!(reader.feed(b"q\t1\t0\t1\n"), Ok(None));
        // A dot that is not a line of its own is not the end.
        assert_eq!(reader.feed(b"."), Ok(None));
        assert_eq!(reader.feed(b"\n"), Ok(status(1, 0, 1)));
        let mut reader = StatusReader::new(b"q");
        assert_eq!(
            reader.feed(b"q\t1\t0\t1\n. \n"),
            Err(StatusError::BadLine(Shown::of(b". ")))
        );
    }

    #[test]
    fn splits_at_the_last_three_tabs() {
        // A function name with a tab (the binary protocol allows it): its line still parses.
        assert_eq!(
            read_all("q", b"a\tb\t1\t0\t0\nq\t2\t1\t1\n.\n"),
            Ok(status(2, 1, 1))
        );
        // The pool's function is matched whole, not as a prefix or suffix of another.
        assert_eq!(
            read_all("q", b"xq\t2\t1\t1\nqx\t3\t0\t0\n.\n"),
            Ok(status(0, 0, 0))
        );
    }

    #[test]
    fn garbage_is_an_error() {
        for answer in [
            &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
            b"q\t1\t0\n.\n",
            b"q 1 0 1\n.\n",
            b"q\t1\t0\t1\t\n.\n",
            b"q\t-1\t0\t1\n.\n",
            b"q\t1\tx\t1\n.\n",
            b"q\t1\t0\t\n.\n",
            b"\t1\t0\t1\n.\n",
            b"\n.\n",
            b"q\t99999999999999999999\t0\t1\n.\n",
            b"q\t123456789012345678901\t0\t1\n.\n",
            b"q\t\x001\t0\t1\n.\n",
        ] {
            let got = read_all("q", answer);
            assert!(
                matches!(got, Err(StatusError::BadLine(_))),
                "{:?}: {got:?}",
                answer.escape_ascii().to_string()
            );
        }
        // Another function's bad line spoils the answer too: whoever sent it is no gearmand.
        assert!(matches!(
            read_all("q", b"q\t1\t0\t1\nother\tx\t0\t0\n.\n"),
            Err(StatusError::BadLine(_))
        ));
    }

    #[test]
    fn an_err_line_is_a_refusal() {
        let got = read_all("q", b"ERR UNKNOWN_COMMAND Unknown+server+commandstatus\r\n");
        assert!(matches!(&got, Err(StatusError::Refused(s)) if s.0.contains("UNKNOWN_COMMAND")));
    }

    #[test]
    fn lies_are_errors() {
        assert!(matches!(
            read_all("q", b"q\t1\t2\t1\n.\n"),
            Err(StatusError::MoreRunningThanTotal {
                total: 1,
                running: 2,
                ..
            })
        ));
        assert!(matches!(
            read_all("q", b"q\t1\t0\t1\nq\t2\t0\t1\n.\n"),
            Err(StatusError::Twice(_))
        ));
        // Bytes after the end: nothing else was asked.
        assert_eq!(
            read_all("q", b".\nq\t1\t0\t1\n"),
            Err(StatusError::Trailing)
        );
        let mut reader = StatusReader::new(b"q");
        assert_eq!(reader.feed(b".\n"), Ok(status(0, 0, 0)));
        assert_eq!(reader.feed(b"x"), Err(StatusError::Trailing));
    }

    #[test]
    fn long_lines_are_skipped_and_answers_bounded() {
        // Another function's name longer than a line: skipped, even across pieces.
        let long = vec![b'f'; MAX_LINE * 3];
        let mut reader = StatusReader::new(b"q");
        assert_eq!(reader.feed(&long[..MAX_LINE * 2]), Ok(None));
        assert!(reader.line.capacity() <= MAX_LINE * 2);
        assert_eq!(reader.feed(&long[MAX_LINE * 2..]), Ok(None));
        assert_eq!(
            reader.feed(b"\t1\t0\t0\nq\t3\t1\t1\n.\n"),
            Ok(status(3, 1, 1))
        );
        // A line of exactly MAX_LINE bytes is read as a line (and checked).
        let mut line = vec![b'g'; MAX_LINE - 6];
        line.extend_from_slice(b"\t1\t0\t");
        assert_eq!(line.len(), MAX_LINE - 1);
        line.extend_from_slice(b"x\n.\n");
        assert!(matches!(read_all("q", &line), Err(StatusError::BadLine(_))));

        // An endless line, or endless lines, end in an error, never in memory.
        let mut reader = StatusReader::new(b"q");
        let chunk = vec![b'z'; 64 << 10];
        let mut fed = 0;
        let error = loop {
            match reader.feed(&chunk) {
                Ok(None) => fed += chunk.len(),
                other => break other,
            }
            assert!(reader.line.len() <= MAX_LINE);
            assert!(fed <= MAX_ANSWER);
        };
        assert_eq!(error, Err(StatusError::TooLong));
        let mut reader = StatusReader::new(b"q");
        let lines = b"f\t0\t0\t0\n".repeat(MAX_LINES + 1);
        assert_eq!(reader.feed(&lines), Err(StatusError::TooManyLines));
    }

    #[test]
    fn messages_show_bytes_escaped_and_short() {
        let shown = Shown::of(&[b'\x1b'; 100]);
        assert!(shown.0.starts_with("\"\\x1b"), "{shown}");
        assert!(shown.0.ends_with("…\""), "{shown}");
        assert!(shown.0.chars().all(|c| !c.is_control()));
    }
}
