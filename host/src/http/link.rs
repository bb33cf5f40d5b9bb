//! The status child's one admin session with the master: one exchange at a time, each reply
//! kept for [`CACHE_FOR`] so that however many HTTP requests come in, the master is asked a
//! few commands a second at most.
//!
//! A reader thread owns the reading half: it cuts the master's bytes into replies (lines up
//! to a final `OK` / `ERR ...` line, see [`crate::admin::is_final_line`]), numbers them and
//! hands them over; it is also the one that notices the session end (the master gone, or
//! closing it) and says so through the `on_close` callback. Replies are numbered because a
//! request may stop waiting (the master answering slowly under its admin budgets): the next
//! exchange then skips the late reply instead of taking it for its own.
//!
//! It never sends anything but the fixed commands the routes ask ([`Command`]), never holds
//! more than [`MAX_REPLY`] bytes of a reply, and never waits longer than [`REPLY_TIMEOUT`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::admin::is_final_line;

/// How long a reply is served from the cache.
pub const CACHE_FOR: Duration = Duration::from_secs(1);

/// How long a request waits for the master's reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest reply read (a `status json` with many workers is one long line).
pub const MAX_REPLY: usize = 64 << 20;

/// The admin commands the child sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    StatusJson,
    WorkersJson,
    /// OpenMetrics 1.0 text.
    Metrics,
    /// Prometheus text format 0.0.4.
    MetricsPrometheus,
}

impl Command {
    const ALL: [Command; 4] = [
        Command::StatusJson,
        Command::WorkersJson,
        Command::Metrics,
        Command::MetricsPrometheus,
    ];

    /// The admin line.
    pub fn line(self) -> &'static str {
        match self {
            Command::StatusJson => "status json",
            Command::WorkersJson => "workers json",
            Command::Metrics => "metrics",
            Command::MetricsPrometheus => "metrics prometheus",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The master's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `OK`: the lines before it, each with its LF.
    Ok(String),
    /// `ERR reason`: the reason.
    Err(String),
}

/// Why there is no answer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the master did not answer within {}s", REPLY_TIMEOUT.as_secs())]
    Timeout,
    #[error("cannot send to the master: {0}")]
    Send(io::Error),
    #[error("the admin session is closed")]
    Closed,
}

/// How the admin session ended, as the reader thread saw it.
#[derive(Debug, thiserror::Error)]
pub enum Closed {
    /// End of file: the master is gone or closed the session.
    #[error("the master closed the admin session")]
    Eof,
    #[error("admin session lost: {0}")]
    Read(io::Error),
    #[error("the master sent a reply over {MAX_REPLY} bytes")]
    TooLong,
    #[error("the master sent a reply that is not UTF-8")]
    NotText,
}

/// The session, shared by the request threads.
pub struct MasterLink {
    exchange: Mutex<Exchange>,
}

struct Exchange {
    writer: UnixStream,
    /// Commands sent so far; the reply to the n-th is numbered n.
    sent: u64,
    replies: Receiver<(u64, Answer)>,
    cache: [Option<(Instant, Answer)>; Command::ALL.len()],
}

impl MasterLink {
    /// Starts the reader thread on `session` (an authenticated admin session). `on_close` is
    /// called once, on the reader thread, when the session ends.
    pub fn start(
        session: UnixStream,
        on_close: impl FnOnce(Closed) + Send + 'static,
    ) -> io::Result<MasterLink> {
        // A master that stops reading (it never should) fails the exchange, not the thread.
        session.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let reader = session.try_clone()?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("admin-reader".into())
            .spawn(move || on_close(read_replies(reader, &tx)))?;
        Ok(MasterLink {
            exchange: Mutex::new(Exchange {
                writer: session,
                sent: 0,
                replies: rx,
                cache: Default::default(),
            }),
        })
    }

    /// The master's answer to `command`: from the cache if it is younger than [`CACHE_FOR`],
    /// otherwise asked (one exchange at a time: callers wait their turn, then most find the
    /// answer their predecessor cached).
    pub fn ask(&self, command: Command) -> Result<Answer, LinkError> {
        let mut exchange = self.lock();
        if let Some((at, answer)) = &exchange.cache[command.index()] {
            if at.elapsed() < CACHE_FOR {
                return Ok(answer.clone());
            }
        }
        exchange
            .writer
            .write_all(format!("{}\n", command.line()).as_bytes())
            .map_err(LinkError::Send)?;
        exchange.sent += 1;
        let wanted = exchange.sent;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match exchange.replies.recv_timeout(left) {
                // A late reply to a request that stopped waiting.
                Ok((n, _)) if n < wanted => continue,
                Ok((_, answer)) => {
                    exchange.cache[command.index()] = Some((Instant::now(), answer.clone()));
                    return Ok(answer);
                }
                Err(RecvTimeoutError::Timeout) => return Err(LinkError::Timeout),
                Err(RecvTimeoutError::Disconnected) => return Err(LinkError::Closed),
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Exchange> {
        // A request thread that panicked mid-exchange leaves nothing half-done that matters:
        // the numbering skips its reply.
        self.exchange
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The reader thread's loop: replies to `tx`, numbered from 1, until the session ends.
fn read_replies(session: UnixStream, tx: &Sender<(u64, Answer)>) -> Closed {
    let mut reader = BufReader::new(session);
    let mut reply = String::new();
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        let limit = (MAX_REPLY - reply.len()) as u64 + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) => return Closed::Eof,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Closed::Read(e),
        }
        if line.last() != Some(&b'\n') {
            // The limit, or the session ended mid-line.
            return if reply.len() + line.len() > MAX_REPLY {
                Closed::TooLong
            } else {
                Closed::Eof
            };
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            return Closed::NotText;
        };
        let bare = text.trim_end_matches('\n').trim_end_matches('\r');
        if is_final_line(bare) {
            number += 1;
            let answer = match bare.strip_prefix("ERR") {
                Some(reason) => Answer::Err(reason.trim_start().to_owned()),
                None => Answer::Ok(std::mem::take(&mut reply)),
            };
            // No receiver: the link is gone, and so is everyone who could ask.
            if tx.send((number, answer)).is_err() {
                return Closed::Eof;
            }
        } else {
            reply.push_str(bare);
            reply.push('\n');
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A fake master on the other end of a socketpair: answers each line with `answer(line)`
    /// (lines of the reply, final line included), counting the lines it was sent.
    pub(crate) fn fake_master(
        answer: impl Fn(&str) -> String + Send + 'static,
    ) -> (UnixStream, Arc<AtomicUsize>) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        std::thread::spawn(move || {
            let mut writer = theirs.try_clone().expect("clone");
            for line in BufReader::new(theirs).lines() {
                let Ok(line) = line else { return };
                count.fetch_add(1, Ordering::SeqCst);
                if writer.write_all(answer(&line).as_bytes()).is_err() {
                    return;
                }
            }
        });
        (ours, asked)
    }

    #[test]
    fn answers_come_back_and_are_cached_for_a_second() {
        let (session, asked) = fake_master(|line| match line {
            "status json" => "{\"pid\":1}\nOK\n".to_owned(),
            "metrics" => "# EOF\nOK\n".to_owned(),
            _ => "ERR unknown command\n".to_owned(),
        });
        let link = MasterLink::start(session, |_| {}).expect("start");
        let status = link.ask(Command::StatusJson).expect("answer");
        assert_eq!(status, Answer::Ok("{\"pid\":1}\n".into()));
        assert_eq!(
            link.ask(Command::Metrics).expect("answer"),
            Answer::Ok("# EOF\n".into())
        );
        assert_eq!(
            link.ask(Command::WorkersJson).expect("answer"),
            Answer::Err("unknown command".into())
        );
        assert_eq!(asked.load(Ordering::SeqCst), 3);
        // Within the second: from the cache, the master is not asked again.
        for _ in 0..100 {
            assert_eq!(link.ask(Command::StatusJson).expect("cached"), status);
        }
        assert_eq!(asked.load(Ordering::SeqCst), 3);
        std::thread::sleep(CACHE_FOR + Duration::from_millis(50));
        assert_eq!(link.ask(Command::StatusJson).expect("answer"), status);
        assert_eq!(asked.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn many_threads_cost_the_master_one_command() {
        let (session, asked) = fake_master(|_| {
            std::thread::sleep(Duration::from_millis(100));
            "x\nOK\n".to_owned()
        });
        let link = Arc::new(MasterLink::start(session, |_| {}).expect("start"));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let link = link.clone();
                std::thread::spawn(move || link.ask(Command::Metrics).expect("answer"))
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("join"), Answer::Ok("x\n".into()));
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_end_of_the_session_is_reported_once() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let (tx, rx) = mpsc::channel();
        let link = MasterLink::start(ours, move |closed| {
            let _ = tx.send(matches!(closed, Closed::Eof));
        })
        .expect("start");
        drop(theirs);
        assert_eq!(rx.recv_timeout(Duration::from_secs(20)), Ok(true));
        assert!(matches!(
            link.ask(Command::StatusJson),
            Err(LinkError::Send(_) | LinkError::Closed)
        ));
    }

    #[test]
    fn an_over_long_reply_ends_the_session() {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        let (tx, rx) = mpsc::channel();
        let _link = MasterLink::start(ours, move |closed| {
            let _ = tx.send(matches!(closed, Closed::TooLong));
        })
        .expect("start");
        std::thread::spawn(move || {
            let chunk = vec![b'a'; 1 << 20];
            while theirs.write_all(&chunk).is_ok() {}
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(true));
    }
}
