//! `faulty`: a job-mode plugin that misbehaves on command, for testing jobhost.
//!
//! It exists so tests can check that the host survives each way a plugin can fail: a panic
//! becomes an error and the worker lives on; a crash, abort, exit or hang costs one worker,
//! which the master replaces; a leak grows a worker's memory until a limit recycles it.
//!
//! Setting `init` (optional): misbehave in `init` itself, which runs in the master before any
//! fork — `"panic"`, `"segv"`, `"abort"`, `"exit"`, `"hang"` do what the payloads below do,
//! `"fail"` returns an error. jobhost runs `init` in a probe child first, so none of these may
//! take the master (or `jobhost check`) down.
//!
//! Setting `worker_start` (optional): the same modes in `worker_start`, which runs in every
//! freshly forked worker — `"segv"` there makes a real crash loop — and also `"exit <N>"`
//! (exit with status N, e.g. one of jobhost's own) and `"close-fds"` (close every descriptor
//! from 3 up, the worker's channel to the master among them).
//!
//! Payload (ASCII, surrounding whitespace allowed):
//! - `ok`: returns `ok`.
//! - `panic`: panics with "faulty: asked to panic".
//! - `segv`: the process dies of SIGSEGV.
//! - `abort`: the process dies of SIGABRT (`std::process::abort`).
//! - `exit`: the process exits with status [`EXIT_CODE`] (42); `exit <N>`: with status N.
//! - `forge <FROM> <TO>`: writes OUTCOME frames ("FORGED") for job keys FROM..=TO on every
//!   socket the process has — what a hostile plugin would do to answer other clients' jobs;
//!   returns `forged`.
//! - `forge-reports <FROM> <TO>`: the same with a WORK_PROGRESS (1 of 2) and a WORK_DATA
//!   ("FORGED") frame for each key — what a hostile plugin would do to feed other clients'
//!   watched jobs; returns `forged`.
//! - `hang`: never returns.
//! - `hang-read <HOST:PORT>`: connects to HOST:PORT over TCP and blocks in `read(2)` on the
//!   socket (what a job stuck on a silent server does), reading and dropping whatever comes;
//!   returns `closed after <N> bytes` once the peer closes, an error if the connect fails.
//! - `leak <MiB>`: allocates that many MiB, writes every page, keeps it for the life of the
//!   worker; returns `leaked <N> MiB`.
//! - `big <MiB>`: returns a result of that many MiB (a small job with a large result, to
//!   measure what the master holds for results and test `max_result`).
//! - `pid` or `pid <MS>`: sleeps MS milliseconds (default 0); returns the process id, so a
//!   test can tell which worker ran a job.
//! - `trace <MS> <TAG> <FILE>`: appends `start <TAG> <PID> <NS>` to FILE (created if need be;
//!   the rest of the payload, so it may hold spaces), sleeps MS milliseconds, appends
//!   `end <TAG> <PID> <NS>`, and returns the process id. NS is CLOCK_MONOTONIC in
//!   nanoseconds, one clock for every process on the machine; each line is one O_APPEND
//!   write, so lines from many workers never interleave. A test reads from it when each job
//!   ran, and in which worker.
//!
//! Anything else is an error: `faulty: unknown command ...`.

use std::time::Duration;

use jobhost_plugin_api::{export_plugin, Plugin, Settings};

/// The exit status of the process after the `exit` command.
pub const EXIT_CODE: i32 = 42;

pub struct Faulty {
    /// What `leak` allocated: kept until the worker exits.
    leaked: Vec<Vec<u8>>,
    /// How to misbehave in `worker_start`, if at all.
    worker_start: Option<String>,
}

/// The ways `init` and `worker_start` can be told to misbehave.
const MODES: [&str; 6] = ["panic", "segv", "abort", "exit", "hang", "fail"];

fn unknown_mode(setting: &str, mode: &str) -> String {
    format!(
        "setting `{setting}`: unknown value {mode:?} (expected one of {})",
        MODES.join(", ")
    )
}

/// Does what `mode` says, in the callback named `callback`; `None` does nothing.
fn misbehave(callback: &str, mode: Option<&str>) -> Result<(), String> {
    if let Some(code) = mode.and_then(|m| m.strip_prefix("exit ")) {
        let code: i32 = code
            .trim()
            .parse()
            .map_err(|_| format!("setting `{callback}`: exit needs a status, got {code:?}"))?;
        log::warn!("faulty: exiting with status {code} in {callback} as asked");
        std::process::exit(code);
    }
    match mode {
        Some("close-fds") => {
            log::warn!("faulty: closing every fd from 3 up in {callback} as asked");
            // SAFETY: closing descriptors is what this test plugin is for.
            for fd in 3..1024 {
                unsafe { libc::close(fd) };
            }
            Ok(())
        }
        None => Ok(()),
        Some("panic") => panic!("faulty: asked to panic in {callback}"),
        Some("segv") => segv(),
        Some("abort") => std::process::abort(),
        Some("exit") => std::process::exit(EXIT_CODE),
        Some("hang") => hang(),
        Some("fail") => Err(format!("faulty: asked to fail in {callback}")),
        Some(other) => Err(unknown_mode(callback, other)),
    }
}

impl Plugin for Faulty {
    fn init(settings: &Settings) -> Result<Self, String> {
        misbehave("init", settings.get::<String>("init")?.as_deref())?;
        let worker_start = settings.get::<String>("worker_start")?;
        // Refuse a bad value now, in the master, rather than in every worker.
        if let Some(mode) = worker_start.as_deref() {
            if !MODES.contains(&mode) && !mode.starts_with("exit ") && mode != "close-fds" {
                return Err(unknown_mode("worker_start", mode));
            }
        }
        Ok(Faulty {
            leaked: Vec::new(),
            worker_start,
        })
    }

    fn worker_start(&mut self) -> Result<(), String> {
        misbehave("worker_start", self.worker_start.as_deref())
    }

    fn handle(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let text = String::from_utf8_lossy(payload);
        if let Some(rest) = text.trim().strip_prefix("trace ") {
            return trace(rest);
        }
        let mut words = text.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("ok"), None, _) => Ok(b"ok".to_vec()),
            (Some("panic"), None, _) => panic!("faulty: asked to panic"),
            (Some("segv"), None, _) => segv(),
            (Some("abort"), None, _) => {
                log::warn!("faulty: aborting as asked");
                std::process::abort()
            }
            (Some("exit"), None, _) => {
                log::warn!("faulty: exiting with status {EXIT_CODE} as asked");
                std::process::exit(EXIT_CODE)
            }
            (Some("exit"), Some(code), None) => {
                let code: i32 = code
                    .parse()
                    .map_err(|_| format!("faulty: exit needs a status, got {code:?}"))?;
                log::warn!("faulty: exiting with status {code} as asked");
                std::process::exit(code)
            }
            (Some("forge"), Some(from), Some(to)) => forge(from, to, outcome_frame),
            (Some("forge-reports"), Some(from), Some(to)) => forge(from, to, report_frames),
            (Some("hang"), None, _) => hang(),
            (Some("hang-read"), Some(address), None) => hang_read(address),
            (Some("leak"), Some(mib), None) => self.leak(mib),
            (Some("big"), Some(mib), None) => big(mib),
            (Some("pid"), ms, None) => {
                std::thread::sleep(millis(ms.unwrap_or("0"))?);
                Ok(std::process::id().to_string().into_bytes())
            }
            _ => Err(format!(
                "faulty: unknown command {text:?} (expected ok, panic, segv, abort, exit, hang, hang-read <HOST:PORT>, leak <MiB>, big <MiB>, pid [<MS>] or trace <MS> <TAG> <FILE>)"
            )),
        }
    }
}

/// `hang-read <HOST:PORT>`: reads a TCP connection to HOST:PORT until the peer closes it.
fn hang_read(address: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let stream = std::net::TcpStream::connect(address)
        .map_err(|e| format!("faulty: hang-read: cannot connect to {address}: {e}"))?;
    log::warn!("faulty: reading {address} until it closes, as asked");
    // Through a File, so each read is read(2) itself (std reads a socket with recvfrom): the
    // call a slow-job diagnosis is tested to name.
    let mut socket = std::fs::File::from(std::os::fd::OwnedFd::from(stream));
    let mut total = 0u64;
    let mut buffer = [0u8; 4096];
    loop {
        match socket.read(&mut buffer) {
            Ok(0) => return Ok(format!("closed after {total} bytes").into_bytes()),
            Ok(count) => total += count as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("faulty: hang-read: reading {address}: {e}")),
        }
    }
}

/// `big <MiB>`: a result of that many MiB.
fn big(mib: &str) -> Result<Vec<u8>, String> {
    let count: usize = mib
        .parse()
        .map_err(|_| format!("faulty: big needs a whole number of MiB, got {mib:?}"))?;
    let bytes = count
        .checked_mul(1 << 20)
        .ok_or_else(|| format!("faulty: cannot return {count} MiB: too large"))?;
    let mut block = Vec::new();
    block
        .try_reserve_exact(bytes)
        .map_err(|e| format!("faulty: cannot allocate {count} MiB: {e}"))?;
    block.resize(bytes, b'Z');
    Ok(block)
}

impl Faulty {
    fn leak(&mut self, mib: &str) -> Result<Vec<u8>, String> {
        let count: usize = mib
            .parse()
            .map_err(|_| format!("faulty: leak needs a whole number of MiB, got {mib:?}"))?;
        let bytes = count
            .checked_mul(1 << 20)
            .ok_or_else(|| format!("faulty: cannot leak {count} MiB: too large"))?;
        let mut block = Vec::new();
        block
            .try_reserve_exact(bytes)
            .map_err(|e| format!("faulty: cannot allocate {count} MiB: {e}"))?;
        // A non-zero fill writes every byte, so every page is really backed (not just reserved).
        block.resize(bytes, 0xa5);
        self.leaked.push(block);
        log::info!("faulty: leaked {count} MiB as asked");
        Ok(format!("leaked {count} MiB").into_bytes())
    }
}

fn millis(ms: &str) -> Result<Duration, String> {
    ms.parse()
        .map(Duration::from_millis)
        .map_err(|_| format!("faulty: expected a number of milliseconds, got {ms:?}"))
}

/// `trace <MS> <TAG> <FILE>`: the job's start and end, with this process's id and the
/// monotonic clock, appended to FILE around a sleep of MS milliseconds.
fn trace(args: &str) -> Result<Vec<u8>, String> {
    let mut parts = args.trim().splitn(3, char::is_whitespace);
    let (Some(ms), Some(tag), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "faulty: trace needs <MS> <TAG> <FILE>, got {args:?}"
        ));
    };
    let pause = millis(ms)?;
    let file = file.trim();
    let pid = std::process::id();
    let note = |what: &str| -> Result<(), String> {
        use std::io::Write;
        let line = format!("{what} {tag} {pid} {}\n", monotonic_ns());
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| format!("faulty: trace: cannot append to {file}: {e}"))
    };
    note("start")?;
    std::thread::sleep(pause);
    note("end")?;
    Ok(pid.to_string().into_bytes())
}

/// CLOCK_MONOTONIC in nanoseconds.
fn monotonic_ns() -> u128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128
}

/// An OUTCOME frame (jobhost's wire format: `u32 length | u8 kind 4 | u64 key | u8 0 | body`)
/// claiming "FORGED" for job `key`.
fn outcome_frame(frames: &mut Vec<u8>, key: u64) {
    let body = b"FORGED";
    frames.extend_from_slice(&(1u32 + 8 + 1 + body.len() as u32).to_be_bytes());
    frames.push(4);
    frames.extend_from_slice(&key.to_be_bytes());
    frames.push(0);
    frames.extend_from_slice(body);
}

/// A WORK_PROGRESS frame (`u32 25 | u8 kind 7 | u64 key | u64 1 | u64 2`) and a WORK_DATA
/// frame (`u32 length | u8 kind 8 | u64 key | "FORGED"`) for job `key`.
fn report_frames(frames: &mut Vec<u8>, key: u64) {
    frames.extend_from_slice(&25u32.to_be_bytes());
    frames.push(7);
    frames.extend_from_slice(&key.to_be_bytes());
    frames.extend_from_slice(&1u64.to_be_bytes());
    frames.extend_from_slice(&2u64.to_be_bytes());
    let body = b"FORGED";
    frames.extend_from_slice(&(1u32 + 8 + body.len() as u32).to_be_bytes());
    frames.push(8);
    frames.extend_from_slice(&key.to_be_bytes());
    frames.extend_from_slice(body);
}

/// Writes `frame`'s frames for each key in FROM..=TO on every socket in /proc/self/fd.
fn forge(from: &str, to: &str, frame: fn(&mut Vec<u8>, u64)) -> Result<Vec<u8>, String> {
    let parse = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("faulty: forge needs keys, got {s:?}"))
    };
    let (from, to) = (parse(from)?, parse(to)?);
    let mut frames = Vec::new();
    for key in from..=to.min(from.saturating_add(100_000)) {
        frame(&mut frames, key);
    }
    let fds = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("faulty: {e}"))?;
    for entry in fds.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let fd: Option<i32> = entry.file_name().to_str().and_then(|n| n.parse().ok());
        if let (true, Some(fd)) = (is_socket, fd) {
            log::warn!("faulty: forging frames for jobs {from}..={to} on fd {fd} as asked");
            // SAFETY: writing a buffer we own to a descriptor; errors are ignored on purpose.
            unsafe { libc::write(fd, frames.as_ptr().cast(), frames.len()) };
        }
    }
    Ok(b"forged".to_vec())
}

/// Sleeps forever (an hour at a time).
fn hang() -> ! {
    log::warn!("faulty: hanging forever as asked");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Kills the process with SIGSEGV, even if a handler was installed (Rust's own stack-overflow
/// handler, for one, would otherwise swallow a raised signal).
fn segv() -> ! {
    log::warn!("faulty: raising SIGSEGV as asked");
    // SAFETY: plain libc calls with valid arguments; the default action ends the process.
    unsafe {
        libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSEGV);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(libc::SIGSEGV);
    }
    // Not reached; if it were, still die rather than return.
    std::process::abort()
}

export_plugin!(Faulty);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> Faulty {
        Faulty::init(&Settings::from_toml("").unwrap()).unwrap()
    }

    #[test]
    fn ok_returns_ok() {
        assert_eq!(plugin().handle(b"ok").unwrap(), b"ok");
        assert_eq!(plugin().handle(b" ok\n").unwrap(), b"ok");
    }

    #[test]
    fn leak_keeps_written_memory() {
        let mut faulty = plugin();
        assert_eq!(faulty.handle(b"leak 1").unwrap(), b"leaked 1 MiB");
        assert_eq!(faulty.leaked.len(), 1);
        assert_eq!(faulty.leaked[0].len(), 1 << 20);
        assert!(faulty.leaked[0].iter().step_by(4096).all(|&b| b == 0xa5));
        let err = faulty.handle(b"leak lots").unwrap_err();
        assert!(err.contains("\"lots\""), "{err}");
    }

    #[test]
    fn pid_and_trace_name_the_process() {
        let pid = std::process::id().to_string().into_bytes();
        assert_eq!(plugin().handle(b"pid").unwrap(), pid);
        assert_eq!(plugin().handle(b"pid 1").unwrap(), pid);
        assert!(plugin().handle(b"pid soon").is_err());
        let dir = std::env::temp_dir().join(format!("faulty-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a trace");
        let payload = format!("trace 5 job-1 {}", file.display());
        assert_eq!(plugin().handle(payload.as_bytes()).unwrap(), pid);
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        let me = std::process::id().to_string();
        assert_eq!(lines[0][..3], ["start", "job-1", me.as_str()]);
        assert_eq!(lines[1][..3], ["end", "job-1", me.as_str()]);
        let ns = |l: &[&str]| l[3].parse::<u128>().unwrap();
        assert!(ns(&lines[1]) - ns(&lines[0]) >= 5_000_000, "{text}");
        assert!(plugin().handle(b"trace 5 job-1").is_err());
    }

    #[test]
    fn hang_read_reads_until_the_peer_closes() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"abc").unwrap();
        });
        let payload = format!("hang-read {address}");
        assert_eq!(
            plugin().handle(payload.as_bytes()).unwrap(),
            b"closed after 3 bytes"
        );
        server.join().unwrap();
        // Nothing listens there any more: the connect fails, and the job with it.
        let err = plugin().handle(payload.as_bytes()).unwrap_err();
        assert!(
            err.starts_with("faulty: hang-read: cannot connect to "),
            "{err}"
        );
        assert!(plugin().handle(b"hang-read").is_err());
        assert!(plugin().handle(b"hang-read nowhere").is_err());
    }

    #[test]
    fn unknown_commands_are_errors() {
        let err = plugin().handle(b"explode").unwrap_err();
        assert!(
            err.starts_with("faulty: unknown command \"explode\""),
            "{err}"
        );
        assert!(plugin().handle(b"ok please").is_err());
        assert!(plugin().handle(b"leak").is_err());
        assert!(plugin().handle(b"").is_err());
    }
}
