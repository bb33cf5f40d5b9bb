//! Section h: no-op jobs through one private gearmand, served by a jobhost pool of 2 workers
//! (`source = "gearman"`, plugin `echo`) and then by 2 libgearman C workers (the peer,
//! `../shared/bench/gearman/worker.c` from the project root), driven by the peer's C client
//! (`client.c`) in the same run, with the CPU per job of gearmand and of each side's workers.
//!
//! It owns building the peer (`cc -O2 … -lgearman` into a temp folder), the private gearmand
//! (a free loopback port, its pid confirmed over the admin protocol, pid and log files in a temp
//! folder, stopped when dropped), the C workers and client processes (killed when dropped, the
//! client also when it overruns), and the section's rows. When `cc`, libgearman's header or
//! library, gearmand or the peer's sources are missing it returns a row saying so instead of
//! failing the whole bench.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::master::{cpu_seconds, cpu_split, Master};
use crate::scenarios::thousands;
use crate::streams::children_cpu;
use crate::{median, Opts, Row};

/// The peer's function name, and so the jobhost pool's name (the function defaults to it).
const FUNCTION: &str = "noop";
const WORKERS: usize = 2;
/// Jobs the C client keeps in flight in `pipe` mode.
const WINDOW: usize = 200;
/// gearmand's I/O threads, as in the peer's README.
const THREADS: usize = 2;
/// How long gearmand may take to answer an admin command, and to start.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long workers may take to register with gearmand or to leave it.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A prerequisite found, or why it is missing (the section is then skipped).
enum Have<T> {
    Yes(T),
    Missing(String),
}

/// Child processes, killed (SIGKILL) and reaped when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// The peer's worker and client, built for this run.
struct Peer {
    dir: tempfile::TempDir,
    worker: PathBuf,
    client: PathBuf,
}

impl Peer {
    /// Builds `worker.c` and `client.c` from `../shared/bench/gearman` (from the project root).
    fn build() -> Result<Have<Peer>, String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")));
        let src = root.join("../shared/bench/gearman");
        for file in ["worker.c", "client.c"] {
            if !src.join(file).is_file() {
                return Ok(Have::Missing(format!(
                    "peer source not found: {} (../shared/bench/gearman from the project root)",
                    src.join(file).display()
                )));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("jobhost-bench-gearman-peer.")
            .tempdir()
            .map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let worker = dir.path().join("worker");
        let client = dir.path().join("client");
        for (file, out) in [("worker.c", &worker), ("client.c", &client)] {
            let built = Command::new("cc")
                .arg("-O2")
                .arg(src.join(file))
                .arg("-o")
                .arg(out)
                .arg("-lgearman")
                .stdin(Stdio::null())
                .output();
            let built = match built {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(Have::Missing("cc not installed".into()))
                }
                Err(e) => return Err(format!("cannot run cc: {e}")),
                Ok(built) => built,
            };
            if built.status.success() {
                continue;
            }
            let errors = String::from_utf8_lossy(&built.stderr);
            if errors.contains("gearman.h") {
                return Ok(Have::Missing(
                    "libgearman's header (libgearman/gearman.h) not found: apt-get install libgearman-dev"
                        .into(),
                ));
            }
            if errors.contains("-lgearman") {
                return Ok(Have::Missing(
                    "libgearman not found by the linker (-lgearman): apt-get install libgearman-dev"
                        .into(),
                ));
            }
            return Err(format!(
                "cannot build the Gearman peer's {file} ({}): {errors}",
                built.status
            ));
        }
        Ok(Have::Yes(Peer {
            dir,
            worker,
            client,
        }))
    }

    /// Starts `n` C workers on gearmand at `port`; each one's stderr goes to a file in the
    /// peer's folder.
    fn start_workers(&self, port: u16, n: usize) -> Result<Children, String> {
        let mut children = Children(Vec::with_capacity(n));
        for i in 0..n {
            let err = self.dir.path().join(format!("worker-{i}.err"));
            let err =
                File::create(&err).map_err(|e| format!("cannot create {}: {e}", err.display()))?;
            let child = Command::new(&self.worker)
                .arg("127.0.0.1")
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(err)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", self.worker.display()))?;
            children.0.push(child);
        }
        Ok(children)
    }

    /// What the C workers wrote on stderr (for an error message).
    fn workers_stderr(&self) -> String {
        (0..WORKERS)
            .map(|i| {
                fs::read_to_string(self.dir.path().join(format!("worker-{i}.err")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Runs the C client with `args`; its last line. Killed if it takes longer than `within`.
    fn client(&self, args: &[String], within: Duration) -> Result<String, String> {
        let what = format!("`client {}`", args.join(" "));
        let child = Command::new(&self.client)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let mut guard = Children(vec![child]);
        let child = &mut guard.0[0];
        let deadline = Instant::now() + within;
        let status: ExitStatus = loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| format!("cannot wait for {what}: {e}"))?
            {
                break status;
            }
            if Instant::now() > deadline {
                return Err(format!("{what} did not finish within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // It has exited: its pipes hold everything it wrote (one line, far below a pipe's size).
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut s) = child.stdout.take() {
            s.read_to_string(&mut out)
                .map_err(|e| format!("cannot read {what}'s output: {e}"))?;
        }
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        if !status.success() {
            return Err(format!("{what} failed ({status}): {out}{err}"));
        }
        out.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("{what} printed nothing; stderr: {err}"))
    }
}

/// A private gearmand on a free loopback port; stopped (SIGTERM, then SIGKILL) when dropped.
struct Gearmand {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Gearmand {
    /// Starts one and waits until it answers `getpid` with its own pid. `Have::Missing`:
    /// gearmand is not installed.
    fn start() -> Result<Have<Gearmand>, String> {
        match Command::new("gearmand")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Have::Missing(
                    "gearmand not installed: apt-get install gearman-job-server".into(),
                ))
            }
            Err(e) => return Err(format!("cannot run gearmand --version: {e}")),
            Ok(s) if !s.success() => return Err(format!("gearmand --version: {s}")),
            Ok(_) => {}
        }
        // The port is free when picked but may be taken before gearmand binds it (gearmand then
        // retries bind() for about 21 s while whoever took it answers): try another one.
        for _ in 0..3 {
            if let Some(server) = Gearmand::start_on(free_port()?)? {
                return Ok(Have::Yes(server));
            }
        }
        Err("three free ports in a row were taken before gearmand could bind them".into())
    }

    /// `None`: another process answers on `port`.
    fn start_on(port: u16) -> Result<Option<Gearmand>, String> {
        let dir = tempfile::Builder::new()
            .prefix("jobhost-bench-gearmand.")
            .tempdir()
            .map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let stderr = dir.path().join("gearmand.err");
        let stderr = File::create(&stderr)
            .map_err(|e| format!("cannot create {}: {e}", stderr.display()))?;
        let child = Command::new("gearmand")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--threads={THREADS}"))
            .arg(format!(
                "--log-file={}",
                dir.path().join("gearmand.log").display()
            ))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("gearmand.pid").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start gearmand: {e}"))?;
        let mut server = Gearmand { dir, port, child };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server
                .child
                .try_wait()
                .map_err(|e| format!("cannot wait for gearmand: {e}"))?
            {
                return Err(format!(
                    "gearmand on port {port} exited ({status}) before it answered: {}",
                    server.log()
                ));
            }
            match admin(port, "getpid") {
                Ok(reply) if reply.trim() == format!("OK {}", server.pid()) => {
                    return Ok(Some(server))
                }
                Ok(reply) => {
                    eprintln!(
                        "h: port {port} is answered by someone else ({:?}): another port",
                        reply.trim()
                    );
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    eprintln!("h: port {port} is held by someone else ({e}): another port");
                    return Ok(None);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "gearmand on port {port} did not answer within {START_TIMEOUT:?}: {}",
                    server.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its log and stderr, for an error message.
    fn log(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("gearmand.log"), read("gearmand.err"))
            .trim()
            .to_string()
    }

    /// Workers registered for [`FUNCTION`] (the last column of the admin `status`).
    fn workers(&self) -> Result<usize, String> {
        let status = admin(self.port, "status")
            .map_err(|e| format!("gearmand admin `status` on port {}: {e}", self.port))?;
        Ok(status
            .lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split('\t').collect();
                (cols.len() == 4 && cols[0] == FUNCTION).then(|| cols[3].parse::<usize>().ok())
            })
            .flatten()
            .sum())
    }

    /// Waits until exactly `n` workers are registered for [`FUNCTION`]; `why_not` adds to the
    /// error.
    fn wait_workers(&self, n: usize, why_not: &dyn Fn() -> String) -> Result<(), String> {
        let deadline = Instant::now() + REGISTER_TIMEOUT;
        loop {
            let now = self.workers()?;
            if now == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "waited {REGISTER_TIMEOUT:?} for {n} workers of {FUNCTION} on gearmand, \
                     it has {now}; {}",
                    why_not()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gearmand {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
}

/// One gearmand admin (text protocol) command: `getpid` answers one line (`OK <pid>`), the
/// others (`status`, `workers`) lines up to one holding `.`.
fn admin(port: u16, command: &str) -> io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, ADMIN_TIMEOUT)?;
    stream.set_read_timeout(Some(ADMIN_TIMEOUT))?;
    stream.set_write_timeout(Some(ADMIN_TIMEOUT))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the server closed the connection after {reply:?}"),
            ));
        }
        let single = reply.is_empty() && (line.starts_with("OK") || line.starts_with("ERR"));
        let end = line.trim_end() == ".";
        reply.push_str(&line);
        if single || end {
            return Ok(reply);
        }
    }
}

/// How the C client submits.
#[derive(Clone, Copy)]
enum Mode {
    /// Foreground tasks, [`WINDOW`] in flight.
    Pipe,
    /// One blocking job at a time.
    Seq,
}

/// What one client run measured.
struct Take {
    /// As the client printed it (its own clock, first submit to last result).
    jobs_per_s: f64,
    /// CPU per job, µs: gearmand, the workers (jobhost's: with its master), the C client.
    gearmand_us: f64,
    workers_us: f64,
    client_us: f64,
    /// The whole machine over the client's run (every process, this bench's and others'),
    /// percent of one core.
    machine_busy: f64,
}

impl Take {
    /// Percent of one core busy at this rate for `us` of CPU per job.
    fn busy(&self, us: f64) -> f64 {
        us * self.jobs_per_s / 1e4
    }

    fn describe(&self) -> String {
        format!(
            "{:.0} jobs/s; CPU per job (µs): gearmand {:.1}, workers {:.1}, client {:.1} \
             (sum {:.1}); busy (% of one core): gearmand {:.0}, workers {:.0}, client {:.0}, \
             whole machine {:.0}",
            self.jobs_per_s,
            self.gearmand_us,
            self.workers_us,
            self.client_us,
            self.gearmand_us + self.workers_us + self.client_us,
            self.busy(self.gearmand_us),
            self.busy(self.workers_us),
            self.busy(self.client_us),
            self.machine_busy,
        )
    }
}

/// One side's figures in one run.
struct Side {
    pipe: Take,
    seq: Take,
}

/// The sizes of the runs.
struct Sizes {
    warm_up: usize,
    pipe: usize,
    seq: usize,
}

/// Runs the client in `mode` over `jobs` jobs and takes the CPU of gearmand, of the workers
/// (`workers_cpu`: their CPU seconds so far) and of the client around it.
fn take(
    peer: &Peer,
    server: &Gearmand,
    mode: Mode,
    jobs: usize,
    workers_cpu: &dyn Fn() -> f64,
) -> Result<Take, String> {
    let port = server.port.to_string();
    let args: Vec<String> = match mode {
        Mode::Pipe => vec!["pipe".into(), jobs.to_string(), port, WINDOW.to_string()],
        Mode::Seq => vec!["seq".into(), jobs.to_string(), port],
    };
    // Far more than either side needs (both do thousands of jobs a second): only a guard
    // against a client left waiting for a job that never completes.
    let within = Duration::from_secs(60) + Duration::from_millis(2) * jobs as u32;
    let gearmand_before = cpu_seconds(server.pid());
    let workers_before = workers_cpu();
    let client_before = children_cpu();
    let machine_before = machine_ticks();
    let line = peer.client(&args, within)?;
    let machine_after = machine_ticks();
    let per_job = |seconds: f64| seconds * 1e6 / jobs as f64;
    let gearmand_us = per_job(cpu_seconds(server.pid()) - gearmand_before);
    let workers_us = per_job(workers_cpu() - workers_before);
    let client_us = per_job(children_cpu() - client_before);
    // `mode=pipe n=100000 window=200 done=100000  5.123 s  19520 jobs/s`
    let words: Vec<&str> = line.split_whitespace().collect();
    let done = words
        .iter()
        .find_map(|w| w.strip_prefix("done="))
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or_else(|| format!("`client {}` printed no done=: {line}", args.join(" ")))?;
    if done != jobs {
        return Err(format!(
            "`client {}` completed {done} jobs of {jobs}: {line}",
            args.join(" ")
        ));
    }
    let jobs_per_s = words
        .iter()
        .position(|&w| w == "jobs/s")
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| words[i].parse::<f64>().ok())
        .ok_or_else(|| format!("`client {}` printed no jobs/s: {line}", args.join(" ")))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let machine_busy = match (machine_before, machine_after) {
        (Some((busy0, all0)), Some((busy1, all1))) if all1 > all0 => {
            (busy1 - busy0) as f64 / (all1 - all0) as f64 * cores * 100.0
        }
        _ => f64::NAN,
    };
    Ok(Take {
        jobs_per_s,
        gearmand_us,
        workers_us,
        client_us,
        machine_busy,
    })
}

/// The machine's busy and total CPU ticks so far, all cores (`/proc/stat`'s `cpu` line; busy
/// is user, nice, system, irq and softirq; total adds idle, iowait and steal).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq;
    Some((busy, busy + idle + iowait + steal))
}

/// A warm-up, then `pipe` and `seq`, on whichever workers are registered now.
fn both_modes(
    peer: &Peer,
    server: &Gearmand,
    sizes: &Sizes,
    workers_cpu: &dyn Fn() -> f64,
) -> Result<Side, String> {
    take(peer, server, Mode::Pipe, sizes.warm_up, workers_cpu)?;
    Ok(Side {
        pipe: take(peer, server, Mode::Pipe, sizes.pipe, workers_cpu)?,
        seq: take(peer, server, Mode::Seq, sizes.seq, workers_cpu)?,
    })
}

/// h: jobhost's `echo` pool fed by gearmand against libgearman's C workers, same gearmand,
/// same C client, same run; with where the CPU goes.
pub fn gearman(opts: &Opts, runs: usize) -> Result<Vec<Row>, String> {
    let sizes = if opts.quick {
        Sizes {
            warm_up: 1_000,
            pipe: 10_000,
            seq: 2_000,
        }
    } else {
        Sizes {
            warm_up: 5_000,
            pipe: 100_000,
            seq: 20_000,
        }
    };
    let skip = |why: &str| {
        eprintln!("h: skipped: {why}");
        vec![Row {
            section: 'h',
            what: "no-op jobs via gearmand: jobhost against libgearman's C workers".into(),
            value: format!("skipped: {why}"),
            target: String::new(),
        }]
    };
    let server = match Gearmand::start()? {
        Have::Yes(server) => server,
        Have::Missing(why) => return Ok(skip(&why)),
    };
    let peer = match Peer::build()? {
        Have::Yes(peer) => peer,
        Have::Missing(why) => return Ok(skip(&why)),
    };
    let pool = format!(
        "[[pool]]\nname = \"{FUNCTION}\"\nplugin = \"echo\"\nworkers = {WORKERS}\nmax_jobs = 0\n\
         source = \"gearman\"\n[pool.gearman]\nservers = [\"127.0.0.1:{}\"]\n",
        server.port
    );
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..runs {
        // jobhost: its master and workers, then gone before the C workers come.
        let master = Master::start(&pool, true)?;
        server.wait_workers(WORKERS, &|| {
            let log = master.log();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            format!(
                "the master's log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })?;
        let jobhost_cpu = || {
            let [master, workers, _] = cpu_split(&master);
            master + workers
        };
        let split_before = cpu_split(&master);
        let side = both_modes(&peer, &server, &sizes, &jobhost_cpu)?;
        let split_after = cpu_split(&master);
        drop(master);
        server.wait_workers(0, &|| "jobhost's workers did not leave".into())?;
        eprintln!(
            "h run {}: jobhost pipe {}\nh run {}: jobhost seq {}\nh run {}: jobhost master CPU \
             over the run {:.2} s, workers {:.2} s",
            run + 1,
            side.pipe.describe(),
            run + 1,
            side.seq.describe(),
            run + 1,
            split_after[0] - split_before[0],
            split_after[1] - split_before[1],
        );
        ours.push(side);

        // The peer: 2 C workers on the same gearmand.
        let workers = peer.start_workers(server.port, WORKERS)?;
        server.wait_workers(WORKERS, &|| {
            format!("the C workers' stderr: {}", peer.workers_stderr())
        })?;
        let pids: Vec<i32> = workers.0.iter().map(|c| c.id() as i32).collect();
        let peer_cpu = || pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
        let side = both_modes(&peer, &server, &sizes, &peer_cpu)?;
        drop(workers);
        server.wait_workers(0, &|| "the C workers did not leave".into())?;
        eprintln!(
            "h run {}: peer pipe {}\nh run {}: peer seq {}",
            run + 1,
            side.pipe.describe(),
            run + 1,
            side.seq.describe(),
        );
        theirs.push(side);
    }
    drop(server);

    let med = |sides: &[Side], f: &dyn Fn(&Side) -> f64| {
        median(&mut sides.iter().map(f).collect::<Vec<_>>())
    };
    let ratio = |f: &dyn Fn(&Side) -> f64| {
        median(
            &mut ours
                .iter()
                .zip(&theirs)
                .map(|(o, t)| f(o) / f(t))
                .collect::<Vec<_>>(),
        )
    };
    let pipe_rate = |s: &Side| s.pipe.jobs_per_s;
    let seq_rate = |s: &Side| s.seq.jobs_per_s;
    let both = |f: &dyn Fn(&Take) -> f64| {
        format!(
            "pipe {:.1} µs / {:.1} µs; seq {:.1} µs / {:.1} µs",
            med(&ours, &|s| f(&s.pipe)),
            med(&theirs, &|s| f(&s.pipe)),
            med(&ours, &|s| f(&s.seq)),
            med(&theirs, &|s| f(&s.seq)),
        )
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy = |sides: &[Side]| {
        let of = |f: &dyn Fn(&Take) -> f64| med(sides, &|s| f(&s.pipe));
        let g = of(&|t| t.busy(t.gearmand_us));
        let w = of(&|t| t.busy(t.workers_us));
        let c = of(&|t| t.busy(t.client_us));
        format!(
            "{g:.0} + {w:.0} + {c:.0} = {:.0}, machine {:.0}",
            g + w + c,
            of(&|t| t.machine_busy)
        )
    };
    let rows = vec![
        Row {
            section: 'h',
            what: format!(
                "`echo` via gearmand (`--threads={THREADS}`), {WORKERS} jobhost workers, \
                 libgearman C client `pipe {}` ({WINDOW} in flight, 15 B payloads)",
                thousands(sizes.pipe as f64)
            ),
            value: format!("{} jobs/s", thousands(med(&ours, &pipe_rate))),
            target: String::new(),
        },
        Row {
            section: 'h',
            what: format!(
                "peer: {WORKERS} libgearman C workers (`worker.c`), same gearmand, same client"
            ),
            value: format!("{} jobs/s", thousands(med(&theirs, &pipe_rate))),
            target: String::new(),
        },
        Row {
            section: 'h',
            what: "jobhost via gearmand / peer, pipe".into(),
            value: format!("{:.2}×", ratio(&pipe_rate)),
            target: "≥ 1.0×".into(),
        },
        Row {
            section: 'h',
            what: format!(
                "the same, client `seq {}` (one job at a time): jobhost / peer",
                thousands(sizes.seq as f64)
            ),
            value: format!(
                "{} jobs/s / {} jobs/s",
                thousands(med(&ours, &seq_rate)),
                thousands(med(&theirs, &seq_rate))
            ),
            target: String::new(),
        },
        Row {
            section: 'h',
            what: "jobhost via gearmand / peer, seq".into(),
            value: format!("{:.2}×", ratio(&seq_rate)),
            target: "≥ 1.0×".into(),
        },
        Row {
            section: 'h',
            what: "gearmand CPU per job, jobhost / peer (jobhost answers with one WORK_COMPLETE \
                   holding the payload; the C worker with WORK_DATA \"ok\" and an empty \
                   WORK_COMPLETE)"
                .into(),
            value: both(&|t| t.gearmand_us),
            target: String::new(),
        },
        Row {
            section: 'h',
            what: format!(
                "workers' CPU per job ({WORKERS} together; jobhost's with its master), jobhost / peer"
            ),
            value: both(&|t| t.workers_us),
            target: String::new(),
        },
        Row {
            section: 'h',
            what: "the C client's CPU per job, in jobhost's runs / the peer's".into(),
            value: both(&|t| t.client_us),
            target: String::new(),
        },
        Row {
            section: 'h',
            what: format!(
                "busy during pipe, % of one core ({cores} cores = {}): gearmand + workers + \
                 client, and the whole machine",
                cores * 100
            ),
            value: format!(
                "jobhost {}; peer {}",
                busy(&ours),
                busy(&theirs)
            ),
            target: String::new(),
        },
    ];
    Ok(rows)
}
