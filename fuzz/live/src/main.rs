//! `jobhost-live-fuzz`: abuse a real master for a while and check that it keeps serving.
//!
//! It starts a master (the release `jobhost` with a generated config in a temp dir and the
//! echo plugin) or attaches to a running one, then for `--seconds` throws random and mutated
//! frames at the job socket from many connections (valid-looking heads with lying lengths,
//! half-sent frames, floods, random kinds, huge lengths, worker-only kinds, valid SUBMITs to
//! unknown pools, clients that never read) and random and mutated lines at the admin socket
//! (long lines, binary, telnet bytes, floods, readers that never read). Meanwhile checkers
//! submit real echo jobs to the pool `check` and verify every answer: its content, that each
//! job gets exactly one, in any order; and a monitor watches the master's RSS in /proc.
//!
//! It exits 1 on a lost, wrong, duplicated or refused answer to a real job, a dead master, a
//! stall (a real job unanswered for `--stall` seconds), an RSS over `--max-rss-mib`, or a
//! panic in the master's log; 2 on a usage or set-up error; 0 otherwise.
//!
//! It judges only what any correct master does (real jobs answered, alive, bounded): it never
//! asserts what a master does with garbage (answer it, skip it, close the connection).
//! It encodes and decodes frames itself, from `docs/PROTOCOL.md`, rather than with the host's
//! `protocol` module, so a bug there cannot hide itself.
//!
//! It never sends a line that would stop the master or a pool the checkers use (`shutdown`,
//! `stop`, `scale … 0`): those are correct commands, not abuse. `reload` and `restart` are
//! sent now and then on purpose (no job may be lost across them); `--calm` leaves them out.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const SUBMIT: u8 = 1;
const RESULT: u8 = 2;
const SUBMIT_WATCH: u8 = 11;
/// The pool the checkers use; the abusers never submit valid jobs to it.
const CHECK_POOL: &str = "check";
/// The pool the abusers flood with valid jobs.
const FLOOD_POOL: &str = "echo";

/// A small xorshift generator: reproducible from `--seed`, no dependency.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    /// Random bytes of a [`Rng::len`].
    fn some_bytes(&mut self) -> Vec<u8> {
        let n = self.len();
        self.bytes(n)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// A length, mostly small, now and then large.
    fn len(&mut self) -> usize {
        match self.below(10) {
            0..=5 => self.below(64) as usize,
            6..=8 => self.below(4096) as usize,
            _ => self.below(64 << 10) as usize,
        }
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = ((1 + body.len()) as u32).to_be_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(body);
    out
}

fn submit(kind: u8, id: u64, pool: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    body.extend_from_slice(&(pool.len() as u16).to_be_bytes());
    body.extend_from_slice(pool);
    body.extend_from_slice(payload);
    frame(kind, &body)
}

/// Flips, inserts, deletes or overwrites a few bytes.
fn mutate(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        let at = rng.below(bytes.len() as u64 + 1) as usize;
        match rng.below(5) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
            1 => bytes.insert(at, rng.next() as u8),
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            3 if at < bytes.len() => {
                bytes[at] = *[0, 0xff, 0x7f, 0x80, b'\n']
                    .get(rng.below(5) as usize)
                    .unwrap_or(&0)
            }
            _ => bytes.truncate(at),
        }
    }
    bytes
}

/// What one abusing connection sends next: a burst of bytes, and whether to close after it.
fn job_garbage(rng: &mut Rng, next_id: &mut u64) -> (Vec<u8>, bool) {
    *next_id += 1;
    let id = if rng.chance(10) { 7 } else { *next_id };
    let out = match rng.below(14) {
        // A valid job to the flood pool (answered; maybe never read).
        0 | 1 => submit(SUBMIT, id, FLOOD_POOL.as_bytes(), &rng.some_bytes()),
        // A flood of valid jobs in one write.
        2 => (0..rng.below(200))
            .flat_map(|i| {
                submit(SUBMIT, id + i, FLOOD_POOL.as_bytes(), &{
                    let n = rng.len() % 256;
                    rng.bytes(n)
                })
            })
            .collect(),
        // A valid job, or a watched one, to a pool that does not exist.
        3 => {
            let pool = {
                let n = rng.below(40) as usize;
                rng.bytes(n)
            };
            let kind = if rng.chance(2) { SUBMIT } else { SUBMIT_WATCH };
            submit(kind, id, &pool, &rng.some_bytes())
        }
        // Any kind, any body, the length right.
        4 => frame(rng.next() as u8, &rng.some_bytes()),
        // A frame only a worker or the master sends (JOB, OUTCOME, HOLD, LEAVING, …, RESULT).
        5 => frame(2 + rng.below(9) as u8, &{
            let n = rng.below(30) as usize;
            rng.bytes(n)
        }),
        // A head that lies: longer than what follows (the next frames become its body).
        6 => {
            let mut f = submit(SUBMIT, id, FLOOD_POOL.as_bytes(), &rng.some_bytes());
            let claimed = (f.len() as u32).wrapping_add(rng.below(100_000) as u32);
            f[..4].copy_from_slice(&claimed.to_be_bytes());
            f
        }
        // A head that lies: shorter than what follows (the rest reads as the next frame).
        7 => {
            let mut f = submit(SUBMIT, id, FLOOD_POOL.as_bytes(), &{
                let n = rng.len() + 20;
                rng.bytes(n)
            });
            let claimed = rng.below(f.len() as u64 - 4) as u32;
            f[..4].copy_from_slice(&claimed.to_be_bytes());
            f
        }
        // A huge length: over every limit, or just over the payload limit, then a little.
        8 => {
            let len = *[
                u32::MAX,
                1 << 30,
                (1 << 20) + 1036,
                (1 << 20) + 1024 + 10,
                0x7fff_ffff,
            ]
            .get(rng.below(5) as usize)
            .unwrap_or(&u32::MAX);
            let mut f = len.to_be_bytes().to_vec();
            f.push(if rng.chance(2) {
                SUBMIT
            } else {
                rng.next() as u8
            });
            f.extend(rng.some_bytes());
            f
        }
        // A zero length, or a length with no kind.
        9 => vec![0, 0, 0, if rng.chance(2) { 0 } else { 1 }],
        // A mutated valid frame.
        10 => {
            let valid = submit(SUBMIT, id, FLOOD_POOL.as_bytes(), &rng.some_bytes());
            mutate(rng, valid)
        }
        // A SUBMIT whose pool length passes its end, or whose pool is not UTF-8.
        11 => {
            let mut body = id.to_be_bytes().to_vec();
            if rng.chance(2) {
                body.extend_from_slice(&(1000u16).to_be_bytes());
                body.extend_from_slice(b"echo");
            } else {
                body.extend_from_slice(&2u16.to_be_bytes());
                body.extend_from_slice(&[0xff, 0xfe]);
                body.extend(rng.bytes(10));
            }
            frame(SUBMIT, &body)
        }
        // Pure noise.
        12 => rng.some_bytes(),
        // Half a valid frame: the connection then closes or goes quiet.
        _ => {
            let f = submit(SUBMIT, id, FLOOD_POOL.as_bytes(), &{
                let n = rng.len() + 1;
                rng.bytes(n)
            });
            let cut = 1 + rng.below(f.len() as u64 - 1) as usize;
            return (f[..cut].to_vec(), true);
        }
    };
    (out, rng.chance(30))
}

/// The first word of an admin line as the master reads it (case aside).
fn first_word(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r').trim_start_matches([' ', '\t']);
    text.split([' ', '\t'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Lines that would stop what the checkers need: a correct command, not abuse.
fn stops_service(line: &[u8]) -> bool {
    matches!(
        first_word(line).as_str(),
        "shutdown" | "stop" | "scale" | "reload" | "restart"
    )
}

const ADMIN_LINES: &[&str] = &[
    "help",
    "status",
    "status json",
    "workers",
    "workers json",
    "STATUS",
    "start echo",
    "start check",
    "auth secret",
    "auth",
    "quit",
    "reopen",
    "scale",
    "scale echo x",
    "scale echo 99999",
    "restart",
    "stop",
    "help me",
    "status json json",
    "  workers\t json  ",
    "\u{1b}[A",
    "ünïcödé",
];

/// What one abusing admin session sends next (its lines, each checked by [`stops_service`]).
fn admin_garbage(rng: &mut Rng, calm: bool) -> (Vec<u8>, bool) {
    let pick = |rng: &mut Rng| ADMIN_LINES[rng.below(ADMIN_LINES.len() as u64) as usize];
    let mut out = match rng.below(10) {
        0..=2 => format!("{}\n", pick(rng)).into_bytes(),
        3 | 4 => {
            let base = pick(rng).as_bytes().to_vec();
            let mut line = mutate(rng, base);
            line.push(b'\n');
            line
        }
        // A flood of lines in one write.
        5 => (0..rng.below(500))
            .flat_map(|_| format!("{}\r\n", pick(rng)).into_bytes())
            .collect(),
        // A long line, maybe without its end.
        6 => {
            let mut line = vec![b'a' + rng.below(26) as u8; 4000 + rng.below(100_000) as usize];
            if rng.chance(2) {
                line.push(b'\n');
            }
            line
        }
        // Binary, telnet negotiation (IAC DO ECHO …).
        7 => {
            let mut b = rng.some_bytes();
            b.extend_from_slice(&[0xff, 0xfd, 0x01, 0xff, 0xfb, 0x03, b'\r', b'\n']);
            b
        }
        // The controlled disruptive ones: replace the check pool's workers, reload the
        // config, scale the flood pool (never to 0).
        8 if !calm && rng.chance(40) => match rng.below(3) {
            0 => b"restart check\n".to_vec(),
            1 => b"reload\n".to_vec(),
            _ => format!("scale {FLOOD_POOL} {}\n", 1 + rng.below(4)).into_bytes(),
        },
        _ => {
            let line = pick(rng);
            let cut = rng.below(line.len() as u64 + 1) as usize;
            return (line.as_bytes()[..cut].to_vec(), true);
        }
    };
    let controlled = out.starts_with(b"restart check\n")
        || out.starts_with(b"reload\n")
        || out.starts_with(b"scale echo ");
    if !controlled {
        // Drop every line that would stop service (mutation may make one).
        let lines: Vec<Vec<u8>> = out.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
        let last = lines.len() - 1;
        out = lines
            .into_iter()
            .enumerate()
            .filter(|(_, l)| !stops_service(l))
            .flat_map(|(i, mut l)| {
                if i != last {
                    l.push(b'\n');
                }
                l
            })
            .collect();
    }
    (out, rng.chance(20))
}

/// Counters shared by every thread.
#[derive(Default)]
struct Stats {
    job_bytes: AtomicU64,
    job_connections: AtomicU64,
    job_closed_by_master: AtomicU64,
    admin_bytes: AtomicU64,
    admin_sessions: AtomicU64,
    checked: AtomicU64,
    rejected: AtomicU64,
    /// Milliseconds since start of the last correct answer to a real job.
    last_answer_ms: AtomicU64,
}

/// The first failure, which ends the run.
struct Verdict {
    failed: AtomicBool,
    why: Mutex<Vec<String>>,
}

impl Verdict {
    fn fail(&self, why: String) {
        eprintln!("FAIL: {why}");
        if let Ok(mut all) = self.why.lock() {
            all.push(why);
        }
        self.failed.store(true, Ordering::SeqCst);
    }
}

struct Ctx {
    jobs: PathBuf,
    admin: PathBuf,
    stop: AtomicBool,
    stats: Stats,
    verdict: Verdict,
    start: Instant,
    calm: bool,
}

impl Ctx {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst) && !self.verdict.failed.load(Ordering::SeqCst)
    }
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Reads and throws away what the master sends, without blocking long.
fn drain(stream: &mut UnixStream) -> std::io::Result<usize> {
    let mut scratch = [0u8; 64 << 10];
    match stream.read(&mut scratch) {
        Ok(n) => Ok(n),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(1)
        }
        Err(e) => Err(e),
    }
}

/// One abusing client of the job socket: connects, sends bursts, reads or not, reconnects.
fn abuse_jobs(ctx: &Ctx, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut next_id = seed << 32;
    while ctx.running() {
        let Ok(mut stream) = UnixStream::connect(&ctx.jobs) else {
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        ctx.stats.job_connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
        let _ = stream.set_read_timeout(Some(Duration::from_millis(1)));
        // Some clients never read what they are sent.
        let reads = !rng.chance(4);
        let bursts = 1 + rng.below(300);
        for _ in 0..bursts {
            if !ctx.running() {
                return;
            }
            let (bytes, close) = job_garbage(&mut rng, &mut next_id);
            match stream.write_all(&bytes) {
                Ok(()) => {
                    ctx.stats
                        .job_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    // Closed by the master, or it is not reading (back-pressure): both fine.
                    ctx.stats
                        .job_closed_by_master
                        .fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            if reads && matches!(drain(&mut stream), Ok(0) | Err(_)) {
                ctx.stats
                    .job_closed_by_master
                    .fetch_add(1, Ordering::Relaxed);
                break;
            }
            if close {
                // Now and then stay quiet a while with a half-sent frame.
                if rng.chance(3) {
                    thread::sleep(Duration::from_millis(rng.below(3000)));
                }
                break;
            }
        }
    }
}

/// One abusing admin session.
fn abuse_admin(ctx: &Ctx, seed: u64) {
    let mut rng = Rng::new(seed);
    while ctx.running() {
        let Ok(mut stream) = UnixStream::connect(&ctx.admin) else {
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        ctx.stats.admin_sessions.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
        let _ = stream.set_read_timeout(Some(Duration::from_millis(1)));
        let reads = !rng.chance(4);
        for _ in 0..1 + rng.below(100) {
            if !ctx.running() {
                return;
            }
            let (bytes, close) = admin_garbage(&mut rng, ctx.calm);
            if stream.write_all(&bytes).is_err() {
                break;
            }
            ctx.stats
                .admin_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if reads && matches!(drain(&mut stream), Ok(0) | Err(_)) {
                break;
            }
            if close {
                if rng.chance(3) {
                    thread::sleep(Duration::from_millis(rng.below(2000)));
                }
                break;
            }
        }
    }
}

/// A reader of RESULT frames (and PROGRESS/DATA, which a plain SUBMIT never gets).
struct Results {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Results {
    /// The next RESULT: `(id, status, body)`; `Ok(None)` on a read timeout.
    fn next(&mut self) -> Result<Option<(u64, u8, Vec<u8>)>, String> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > (64 << 20) {
                    return Err(format!("the master sent a frame of {len} bytes"));
                }
                if self.buf.len() >= 4 + len {
                    let frame: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
                    return match frame.as_slice() {
                        [RESULT, rest @ ..] if rest.len() >= 9 => {
                            let id = u64::from_be_bytes(rest[..8].try_into().unwrap_or([0; 8]));
                            Ok(Some((id, rest[8], rest[9..].to_vec())))
                        }
                        _ => Err(format!(
                            "the master sent a frame that is not a RESULT: {:02x?}",
                            &frame[..frame.len().min(16)]
                        )),
                    };
                }
            }
            let mut scratch = [0u8; 64 << 10];
            match self.stream.read(&mut scratch) {
                Ok(0) => return Err("the master closed a checker's connection".into()),
                Ok(n) => self.buf.extend_from_slice(&scratch[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(format!("reading a checker's connection: {e}")),
            }
        }
    }
}

/// Judges one answer to a real job.
fn judge(
    ctx: &Ctx,
    outstanding: &mut HashMap<u64, (Vec<u8>, Instant)>,
    id: u64,
    status: u8,
    body: Vec<u8>,
) {
    let Some((payload, _)) = outstanding.remove(&id) else {
        ctx.verdict.fail(format!(
            "an answer to job #{id}, which is not outstanding (duplicate or unknown)"
        ));
        return;
    };
    match status {
        0 if body == payload => {
            ctx.stats.checked.fetch_add(1, Ordering::Relaxed);
            ctx.stats
                .last_answer_ms
                .store(ctx.now_ms(), Ordering::Relaxed);
        }
        0 => ctx.verdict.fail(format!(
            "job #{id}: wrong answer ({} bytes for a {}-byte payload)",
            body.len(),
            payload.len()
        )),
        // Refused under load (a queue or memory budget): a correct answer, counted.
        2 => {
            ctx.stats.rejected.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "note: job #{id} rejected: {}",
                String::from_utf8_lossy(&body)
            );
        }
        other => ctx.verdict.fail(format!(
            "job #{id}: status {other}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// The pipelined checker: one connection, up to `depth` real jobs in flight, each answer
/// checked; runs until told to stop, then waits for every outstanding answer.
fn check_pipelined(ctx: &Ctx, seed: u64, depth: usize, stall: Duration) {
    let mut rng = Rng::new(seed);
    let stream = match UnixStream::connect(&ctx.jobs) {
        Ok(s) => s,
        Err(e) => return ctx.verdict.fail(format!("checker cannot connect: {e}")),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = stream.set_write_timeout(Some(stall));
    let mut writer = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => return ctx.verdict.fail(format!("checker: {e}")),
    };
    let mut results = Results {
        stream,
        buf: Vec::new(),
    };
    let mut outstanding: HashMap<u64, (Vec<u8>, Instant)> = HashMap::new();
    let mut id = 0u64;
    loop {
        let sending = ctx.running();
        if !sending && (outstanding.is_empty() || ctx.verdict.failed.load(Ordering::SeqCst)) {
            return;
        }
        while sending && outstanding.len() < depth {
            id += 1;
            let mut payload = format!("check #{id} ").into_bytes();
            let n = rng.len();
            payload.extend(rng.bytes(n));
            if let Err(e) = writer.write_all(&submit(SUBMIT, id, CHECK_POOL.as_bytes(), &payload)) {
                return ctx.verdict.fail(format!("checker: sending job #{id}: {e}"));
            }
            outstanding.insert(id, (payload, Instant::now()));
        }
        match results.next() {
            Ok(Some((id, status, body))) => judge(ctx, &mut outstanding, id, status, body),
            Ok(None) => {}
            Err(e) => return ctx.verdict.fail(format!("checker: {e}")),
        }
        if let Some((oldest, (_, since))) = outstanding.iter().min_by_key(|(_, (_, t))| *t) {
            if since.elapsed() > stall {
                return ctx
                    .verdict
                    .fail(format!("stall: job #{oldest} unanswered after {stall:?}"));
            }
        }
    }
}

/// The fresh-connection checker: a new client every so often, one job, its answer — so a
/// master too busy with the abusers to accept a new client shows as a stall.
fn check_fresh(ctx: &Ctx, seed: u64, stall: Duration) {
    let mut rng = Rng::new(seed);
    let mut id = 1u64 << 40;
    while ctx.running() {
        id += 1;
        let started = Instant::now();
        let stream = match UnixStream::connect(&ctx.jobs) {
            Ok(s) => s,
            Err(e) => {
                return ctx
                    .verdict
                    .fail(format!("fresh checker cannot connect: {e}"))
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let _ = stream.set_write_timeout(Some(stall));
        let mut payload = format!("fresh #{id} ").into_bytes();
        let n = rng.len();
        payload.extend(rng.bytes(n));
        let mut writer = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => return ctx.verdict.fail(format!("fresh checker: {e}")),
        };
        if let Err(e) = writer.write_all(&submit(SUBMIT, id, CHECK_POOL.as_bytes(), &payload)) {
            return ctx
                .verdict
                .fail(format!("fresh checker: sending job #{id}: {e}"));
        }
        let mut outstanding = HashMap::from([(id, (payload, started))]);
        let mut results = Results {
            stream,
            buf: Vec::new(),
        };
        while !outstanding.is_empty() {
            match results.next() {
                Ok(Some((id, status, body))) => judge(ctx, &mut outstanding, id, status, body),
                Ok(None) if started.elapsed() > stall => {
                    return ctx
                        .verdict
                        .fail(format!("stall: fresh job #{id} unanswered after {stall:?}"))
                }
                Ok(None) => {}
                Err(e) => return ctx.verdict.fail(format!("fresh checker: {e}")),
            }
            if ctx.verdict.failed.load(Ordering::SeqCst) {
                return;
            }
        }
        thread::sleep(Duration::from_millis(100 + rng.below(200)));
    }
}

/// The master's resident set in KiB, or `None` once it is gone (or a zombie).
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    if status
        .lines()
        .any(|l| l.starts_with("State:") && l.contains('Z'))
    {
        return None;
    }
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let at = |i: usize| {
        fields
            .get(i)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(11) + at(12)
}

struct Options {
    seconds: u64,
    connections: u64,
    admins: u64,
    stall: Duration,
    max_rss_mib: u64,
    seed: u64,
    calm: bool,
    attach: Option<(PathBuf, PathBuf, i32)>,
    jobhost: PathBuf,
    plugins: PathBuf,
    keep: bool,
}

const USAGE: &str =
    "usage: jobhost-live-fuzz [--seconds N] [--connections N] [--admins N] [--stall SECS]
    [--max-rss-mib N] [--seed N] [--calm] [--keep] [--jobhost PATH] [--plugins DIR]
    [--attach JOB_SOCKET ADMIN_SOCKET MASTER_PID]
  Without --attach it starts a master: --jobhost (default target/release/jobhost) with the
  echo plugin from --plugins (default target/release), in a temp dir (kept with --keep or
  on failure).";

fn options() -> Result<Options, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut o = Options {
        seconds: 60,
        connections: 24,
        admins: 6,
        stall: Duration::from_secs(15),
        max_rss_mib: 512,
        seed: std::process::id() as u64,
        calm: false,
        attach: None,
        jobhost: repo.join("target/release/jobhost"),
        plugins: repo.join("target/release"),
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>, name: &str| -> Result<u64, String> {
        v.and_then(|s| s.parse().ok())
            .ok_or(format!("{name} takes a number"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => o.seconds = num(args.next(), &arg)?,
            "--connections" => o.connections = num(args.next(), &arg)?,
            "--admins" => o.admins = num(args.next(), &arg)?,
            "--stall" => o.stall = Duration::from_secs(num(args.next(), &arg)?),
            "--max-rss-mib" => o.max_rss_mib = num(args.next(), &arg)?,
            "--seed" => o.seed = num(args.next(), &arg)?,
            "--calm" => o.calm = true,
            "--keep" => o.keep = true,
            "--jobhost" => o.jobhost = args.next().ok_or("--jobhost takes a path")?.into(),
            "--plugins" => o.plugins = args.next().ok_or("--plugins takes a folder")?.into(),
            "--attach" => {
                let jobs = args.next().ok_or("--attach takes 3 values")?;
                let admin = args.next().ok_or("--attach takes 3 values")?;
                let pid = num(args.next(), "--attach's pid")? as i32;
                o.attach = Some((jobs.into(), admin.into(), pid));
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// A master this program started, in its own temp dir.
struct Started {
    child: Child,
    dir: PathBuf,
}

fn start_master(o: &Options) -> Result<Started, String> {
    let dir = std::env::temp_dir().join(format!("jobhost-live-fuzz-{}", std::process::id()));
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).map_err(|e| format!("{}: {e}", plugins.display()))?;
    let echo = o.plugins.join("libecho.so");
    std::fs::copy(&echo, plugins.join("libecho.so"))
        .map_err(|e| format!("{}: {e} (cargo build --release -p echo)", echo.display()))?;
    // A flood pool with a short queue, so that abusers' valid jobs cost bounded memory.
    let config = format!(
        "[host]\nplugins_dir = \"plugins\"\nruntime_dir = \"run\"\nlog_level = \"info\"\n\
         graceful_timeout = \"10s\"\n\n[server]\nsocket = \"jobs.sock\"\nmax_payload = \"1MiB\"\n\n\
         [admin]\nsocket = \"admin.sock\"\n\n\
         [[pool]]\nname = \"{CHECK_POOL}\"\nplugin = \"echo\"\nworkers = 2\n\n\
         [[pool]]\nname = \"{FLOOD_POOL}\"\nplugin = \"echo\"\nworkers = 2\nmax_queue = 2000\n"
    );
    let path = dir.join("jobhost.toml");
    std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
    let log = std::fs::File::create(dir.join("master.log")).map_err(|e| e.to_string())?;
    let child = Command::new(&o.jobhost)
        .args(["run", "-c"])
        .arg(&path)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| {
            format!(
                "{}: {e} (cargo build --release -p jobhost)",
                o.jobhost.display()
            )
        })?;
    Ok(Started { child, dir })
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !ok() {
        if Instant::now() > deadline {
            return Err(format!("{what} not there after {within:?}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn main() -> ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut started = None;
    let (jobs, admin, pid) = match &o.attach {
        Some((jobs, admin, pid)) => (jobs.clone(), admin.clone(), *pid),
        None => match start_master(&o) {
            Ok(s) => {
                let run = s.dir.join("run");
                let pid = s.child.id() as i32;
                started = Some(s);
                (run.join("jobs.sock"), run.join("admin.sock"), pid)
            }
            Err(e) => {
                eprintln!("cannot start a master: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let up = wait_for("the job socket", Duration::from_secs(30), || {
        UnixStream::connect(&jobs).is_ok() && UnixStream::connect(&admin).is_ok()
    });
    if let Err(e) = up {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    println!(
        "live fuzz: master pid {pid}, {} s, {} job connections, {} admin sessions, seed {}{}",
        o.seconds,
        o.connections,
        o.admins,
        o.seed,
        if o.calm { ", calm" } else { "" }
    );
    let ctx = Arc::new(Ctx {
        jobs,
        admin,
        stop: AtomicBool::new(false),
        stats: Stats::default(),
        verdict: Verdict {
            failed: AtomicBool::new(false),
            why: Mutex::new(Vec::new()),
        },
        start: Instant::now(),
        calm: o.calm,
    });
    let rss_start = rss_kib(pid).unwrap_or(0);
    let ticks_start = cpu_ticks(pid);
    let mut threads = Vec::new();
    for i in 0..o.connections {
        let ctx = ctx.clone();
        let seed = o.seed ^ (i + 1).wrapping_mul(0x1000_0001);
        threads.push(thread::spawn(move || abuse_jobs(&ctx, seed)));
    }
    for i in 0..o.admins {
        let ctx = ctx.clone();
        let seed = o.seed ^ (i + 1).wrapping_mul(0x2000_0003);
        threads.push(thread::spawn(move || abuse_admin(&ctx, seed)));
    }
    let mut checkers = Vec::new();
    for (i, depth) in [1usize, 8, 64].into_iter().enumerate() {
        let ctx = ctx.clone();
        let stall = o.stall;
        let seed = o.seed ^ (i as u64 + 7);
        checkers.push(thread::spawn(move || {
            check_pipelined(&ctx, seed, depth, stall)
        }));
    }
    {
        let ctx = ctx.clone();
        let stall = o.stall;
        let seed = o.seed ^ 99;
        checkers.push(thread::spawn(move || check_fresh(&ctx, seed, stall)));
    }
    // The monitor: alive, RSS bounded, someone answered lately.
    let until = Instant::now() + Duration::from_secs(o.seconds);
    let mut rss_peak = rss_start;
    let mut last_report = Instant::now();
    while Instant::now() < until && ctx.running() {
        thread::sleep(Duration::from_millis(100));
        match rss_kib(pid) {
            Some(kib) => {
                rss_peak = rss_peak.max(kib);
                if kib > o.max_rss_mib << 10 {
                    ctx.verdict.fail(format!(
                        "master RSS {} MiB is over --max-rss-mib {}",
                        kib >> 10,
                        o.max_rss_mib
                    ));
                }
            }
            None => ctx.verdict.fail(format!("the master (pid {pid}) is gone")),
        }
        let quiet = ctx
            .now_ms()
            .saturating_sub(ctx.stats.last_answer_ms.load(Ordering::Relaxed));
        if quiet > o.stall.as_millis() as u64 {
            ctx.verdict.fail(format!(
                "stall: no real job answered correctly for {quiet} ms"
            ));
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            println!(
                "  {:>3} s: {} real jobs checked, {} rejected; RSS {} MiB (peak {} MiB)",
                ctx.start.elapsed().as_secs(),
                ctx.stats.checked.load(Ordering::Relaxed),
                ctx.stats.rejected.load(Ordering::Relaxed),
                rss_kib(pid).unwrap_or(0) >> 10,
                rss_peak >> 10
            );
        }
    }
    ctx.stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    // The checkers wait for their outstanding answers (each bounded by --stall).
    for t in checkers {
        let _ = t.join();
    }
    let ticks_fuzz = cpu_ticks(pid).saturating_sub(ticks_start);
    // Idle again: the master's CPU over 3 s with every abuser gone (reported, not judged).
    let idle_from = cpu_ticks(pid);
    thread::sleep(Duration::from_secs(3));
    let idle_ticks = cpu_ticks(pid).saturating_sub(idle_from);
    let rss_end = rss_kib(pid);
    if rss_end.is_none() {
        ctx.verdict.fail(format!("the master (pid {pid}) is gone"));
    }
    let s = &ctx.stats;
    println!(
        "sent {} MiB on {} job connections ({} ended by the master or back-pressure), {} KiB on {} admin sessions",
        s.job_bytes.load(Ordering::Relaxed) >> 20,
        s.job_connections.load(Ordering::Relaxed),
        s.job_closed_by_master.load(Ordering::Relaxed),
        s.admin_bytes.load(Ordering::Relaxed) >> 10,
        s.admin_sessions.load(Ordering::Relaxed),
    );
    println!(
        "real jobs: {} answered correctly, {} rejected; master RSS {} MiB at start, peak {} MiB, {} MiB at the end",
        s.checked.load(Ordering::Relaxed),
        s.rejected.load(Ordering::Relaxed),
        rss_start >> 10,
        rss_peak >> 10,
        rss_end.unwrap_or(0) >> 10
    );
    println!(
        "master CPU: {:.1} s during the run, {:.2} s in the 3 s after it",
        ticks_fuzz as f64 / 100.0,
        idle_ticks as f64 / 100.0
    );
    if let Some(mut s) = started {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match s.child.try_wait() {
                Ok(Some(status)) => {
                    println!("master exited: {status}");
                    break;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                _ => {
                    ctx.verdict
                        .fail("the master did not stop within 20 s of SIGTERM".into());
                    let _ = s.child.kill();
                    let _ = s.child.wait();
                    break;
                }
            }
        }
        let log = std::fs::read_to_string(s.dir.join("master.log")).unwrap_or_default();
        println!(
            "master log: {} lines, {} at ERROR",
            log.lines().count(),
            log.matches("ERROR").count()
        );
        let noted = |l: &&str| l.contains("panicked") || l.contains("ERROR");
        for line in log.lines().filter(noted).take(20) {
            println!("  master log: {line}");
            if line.contains("panicked") {
                ctx.verdict
                    .fail(format!("a panic in the master's log: {line}"));
            }
        }
        if o.keep || ctx.verdict.failed.load(Ordering::SeqCst) {
            println!("kept {}", s.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&s.dir);
        }
    }
    if ctx.verdict.failed.load(Ordering::SeqCst) {
        let why = ctx
            .verdict
            .why
            .lock()
            .map(|w| w.join("\n  "))
            .unwrap_or_default();
        println!("FAILED:\n  {why}");
        ExitCode::from(1)
    } else {
        println!("OK");
        ExitCode::SUCCESS
    }
}
