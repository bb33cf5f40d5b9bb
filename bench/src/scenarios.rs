//! The measurements, one function per section of the table (a–f; g, Redis, is in
//! `streams.rs`; h, Gearman, in `gearman.rs`), and the notes on how each figure is taken (a–h). Each starts its own
//! master(s), drives them with real clients, and returns its rows; none asserts a target
//! (these machines are too noisy for a time to be a pass/fail criterion) — the table shows
//! the target next to the figure.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jobhost::client::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

use crate::master::{cpu_split, Master};
use crate::{median, Opts, Row};
use jobhost_e2e::in_sleep_job;

/// How each figure was taken; appended to RESULTS.md under the table.
pub const NOTES: &str = "\
## How each figure is taken

- **a** One master, pool `echo` with 2 workers (`max_jobs = 0`). Each client is one
  connection that keeps `--window` jobs in flight (refilled when half are answered), ids
  unique, every result checked (status ok, body = the 64-byte payload, each id exactly once).
  jobs/s = all jobs / (first submit to last result); latency = submit to result of each job.
- **b** Pool `hash`, 1 and then 2 workers, one client keeping 64 jobs of 64 KiB in flight;
  every digest checked. Efficiency = jobs/s with 2 workers / (2 × jobs/s with 1 worker), both
  taken in the same run. The CPU row says where the time goes: with SHA-NI, hashing 64 KiB
  costs about as much as moving it through the master (two kernel copies) and the client, so
  on a 2-core machine one worker plus the master and the client already keep both cores busy,
  and a second worker has no core to run on. Efficiency needs jobs that cost more than their
  transport, or more cores than workers.
- **c** Pool `lookup`, `table_mib = 256`, 4 workers; PSS from `/proc/PID/smaps_rollup`
  summed over the master and its workers once every worker's RSS holds the table and the sum
  has settled. `build_in = \"worker_start\"` builds the same table in each worker instead.
  Limit = 1.25 × 256 MiB + 8 MiB × 5 processes.
- **d** Pool `sleep`, 1 worker, `max_attempts = 1`. The worker finishes a job, starts a 60 s
  one, a 0 ms job is queued behind it, then the worker is `kill -9`ed: the figure is the time
  from the kill to the result of the 0 ms job, which only the replacement can run. The crash
  loop is pool `faulty` with `worker_start = \"segv\"` (2 workers, defaults: back-off from
  100 ms doubling to 10 s, failing after 10 crashes in 60 s, then one try per 30 s); forks
  are counted from the master's log.
- **e** Pool `echo`, 2 workers, 2 clients submitting continuously (window 256 each); 5
  reloads in a row, each changing the pool's settings (so every reload replaces both
  workers) and waiting for the new generation. jobs/s is taken from the first HUP to the
  last reload's completion; failed counts failed, rejected and unanswered jobs.
- **f** `bench/mp_pool_peer.py` (a copy of `shared/bench/mp_pool_peer.py`):
  `multiprocessing.Pool(2)`, `imap` with chunksize 1, the same number of 64-byte no-op jobs,
  run right after section a in the same run; the ratio is jobhost / peer within that run.
- **g** A private `redis-server` (Unix socket in a temp folder, `--save '' --appendonly no`)
  shared by both sides in the same run. jobhost: pool `echo`, 2 workers, `source = \"redis\"`,
  `batch = 64`, a `results` stream. The producer in the bench process is shaped like the
  peer's: pipelined XADDs (1000 per round trip) of 64-byte payloads with an `id` field, then
  XREAD of the results stream (COUNT 10000, BLOCK) until all are seen; every id checked
  exactly once, status ok, body = payload, nothing left pending. jobs/s = all jobs / (first
  XADD to last result read); latency = from the send of a job's XADD pipeline to the read of
  its result, so it includes waiting behind the whole burst (a throughput run, not a latency
  one); the one-at-a-time row is the latency of a lone job: 2,000 jobs, each XADDed once the
  previous one's result was read (XREAD BLOCK), workers idle in their blocking read. The peer is `../shared/bench/redis_stream_peer.py` (redis-py, 2 forked consumers,
  batch 64, one pipelined MULTI/EXEC of results + XACK per batch; its own producer, same
  shape and timer) run right after, on the same server; the ratio is taken within the run.
  Server CPU per job = utime + stime of the redis-server process (`/proc/PID/stat`) over
  the run / jobs; the ceiling is 1 s / that, the jobs/s a single-threaded Redis could serve
  at that cost. Skipped with a row saying why when redis-server, the peer script or the
  python `redis` package is missing.
- **h** A private `gearmand` (`--threads=2`, on a free loopback port whose answer to the
  admin `getpid` is checked to be that gearmand's pid; pid and log files in a temp folder)
  shared by both sides in the same run. The peer is `../shared/bench/gearman/`, built by the
  bench with `cc -O2 … -lgearman`: libgearman's C worker (function `noop`, answers WORK_DATA
  \"ok\" and an empty WORK_COMPLETE) and C client. Each run: a jobhost master with pool
  `noop` (plugin `echo`, 2 workers, `source = \"gearman\"`; it answers with one WORK_COMPLETE
  holding the 15-byte payload), waited for until gearmand's `status` shows 2 workers of
  `noop`; a warm-up (`client pipe 5000 PORT 200`), then `client pipe 100000 PORT 200`
  (foreground tasks, 200 in flight) and `client seq 20000 PORT` (one blocking job at a time);
  the master is stopped and gearmand shows 0 workers; then 2 C workers, the same warm-up
  and the same two commands. jobs/s is the client's own figure (its clock, first submit to
  last result; every job must be counted complete); the ratios are jobhost / peer within a
  run, then the median. CPU per job = utime + stime (`/proc/PID/stat`) over the client's run
  / jobs, of gearmand, of the workers (both together; jobhost's master is added to its
  workers), and of the C client (`getrusage(RUSAGE_CHILDREN)`); the busy row is that CPU ×
  jobs/s, next to the whole machine's from `/proc/stat` (other processes included: when it
  reads about 200 and ours much less, something else shared the cores and the run is noisy).
  Where the time goes: gearmand takes about half of all the CPU a job costs, on both sides,
  and the same system calls per job either way (strace, once by hand: about 2 epoll_wait,
  2 recvfrom, 1.6 sendto and 1.8 futex in `--threads=2`), so it does not notice which worker
  it serves. The workers switch context about 1.2 times per job in `pipe` and 5.5 in `seq` (every
  sleeping worker is woken for each job) on both sides. A jobhost worker makes one writev per
  job (its WORK_COMPLETE and the next GRAB_JOB_UNIQ together; strace -c of one worker over
  50,000 jobs: 50,502 writev, 73,507 recvfrom of which 23,005 EAGAIN, 23,004 poll); the C
  worker three sends (WORK_DATA, WORK_COMPLETE, GRAB_JOB_ALL). An earlier build gave back its
  64 KiB read buffer on every EAGAIN and zero-filled a fresh one for the next read (perf: the
  largest user-space cost of a worker), and wrote header and payload apart; both fixed before
  these figures. What is left of a worker's user-space time is mostly the plugin call and
  clock_gettime. Skipped with a row saying why when gearmand, `cc`, libgearman's header or
  library, or the peer's sources are missing.
- **i** Section a's 1-client load (pool `echo`, 2 workers; 2,000,000 jobs a run) on one
  master with `admin.http`: runs with a thread scraping `/metrics` (OpenMetrics, bearer token,
  a new connection each time) once a second — then, in a second series, ten times a second —
  and runs without, in pairs ordered ABBA (at least 4 pairs) so that a drift of the machine
  falls on both. The figure is the ratio of the medians of jobs/s (with / without), with the
  range of the pairs' own ratios (on 2 cores shared by the master, 2 workers and the client a
  single run varies by ±15 %: the range says how much), and the medians of the master's CPU
  per job (utime + stime over the run / jobs), the steadier measure of its cost.
  Every scrape must answer 200 and end in `# EOF`. The per-job bookkeeping the metrics need
  (two histogram observations and a few counters per job) is in every run: it is measured
  against the build before it with `bench/master_cost.sh OLD NEW` (master CPU per job, ABBA;
  and, under callgrind, its exact instructions per job: 3,454 → 3,637 for issue 18), not here.
";

/// A load to push through one pool.
struct Load<'a> {
    pool: &'a str,
    clients: usize,
    /// Jobs in all, split evenly over the clients.
    total: usize,
    window: usize,
    payload: Payloads<'a>,
    /// Whether `body` is the right answer to job `i`.
    expect: &'a (dyn Fn(usize, &[u8]) -> bool + Sync),
}

/// Where a job's payload comes from.
#[derive(Clone, Copy)]
enum Payloads<'a> {
    /// Written into the client's buffer for job `i`.
    Fill(&'a (dyn Fn(usize, &mut Vec<u8>) + Sync)),
    /// Job `i` sends `set[i % len]` from where it is (large payloads: no copy in the client).
    Cycle(&'a [Vec<u8>]),
}

/// What a load measured.
struct Measured {
    jobs_per_s: f64,
    /// Sorted.
    latencies: Vec<Duration>,
}

impl Measured {
    fn percentile(&self, p: usize) -> Duration {
        let n = self.latencies.len();
        if n == 0 {
            return Duration::ZERO;
        }
        self.latencies[(n * p / 100).min(n - 1)]
    }
}

/// One client's run: when it started, when its last result came, and each job's latency.
type ClientRun = (Instant, Instant, Vec<Duration>);

/// Runs `load` with its clients on threads; an error if any job failed, came twice or never.
fn drive(socket: &Path, load: &Load) -> Result<Measured, String> {
    let per = load.total / load.clients;
    let outcomes: Vec<Result<ClientRun, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..load.clients)
            .map(|c| s.spawn(move || one_client(socket, load, c * per, per)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a client thread panicked".into()))
            })
            .collect()
    });
    let mut first = None::<Instant>;
    let mut last = None::<Instant>;
    let mut latencies = Vec::with_capacity(load.total);
    for outcome in outcomes {
        let (start, end, lat) = outcome?;
        first = Some(first.map_or(start, |f| f.min(start)));
        last = Some(last.map_or(end, |l| l.max(end)));
        latencies.extend(lat);
    }
    let elapsed = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => return Err("no client ran".into()),
    };
    latencies.sort_unstable();
    Ok(Measured {
        jobs_per_s: (per * load.clients) as f64 / elapsed,
        latencies,
    })
}

/// One connection submitting jobs `base .. base + count` with `load.window` in flight.
fn one_client(
    socket: &Path,
    load: &Load,
    base: usize,
    count: usize,
) -> Result<(Instant, Instant, Vec<Duration>), String> {
    let mut client = Client::connect(socket).map_err(|e| e.to_string())?;
    let mut sent_at = Vec::with_capacity(count);
    let mut answered = vec![false; count];
    let mut latencies = Vec::with_capacity(count);
    let mut payload = Vec::new();
    let (mut next, mut done) = (0usize, 0usize);
    let start = Instant::now();
    while done < count {
        if next - done <= load.window / 2 {
            while next < count && next - done < load.window {
                let bytes = match load.payload {
                    Payloads::Fill(fill) => {
                        payload.clear();
                        fill(base + next, &mut payload);
                        &payload[..]
                    }
                    Payloads::Cycle(set) => &set[(base + next) % set.len()][..],
                };
                client
                    .send((base + next) as u64, load.pool, bytes)
                    .map_err(|e| e.to_string())?;
                sent_at.push(Instant::now());
                next += 1;
            }
        }
        let result = client.recv().map_err(|e| e.to_string())?;
        let now = Instant::now();
        let k = (result.id as usize)
            .checked_sub(base)
            .filter(|&k| k < next)
            .ok_or_else(|| {
                format!(
                    "a result for job {} that this client did not send",
                    result.id
                )
            })?;
        if std::mem::replace(&mut answered[k], true) {
            return Err(format!("job {} answered twice", result.id));
        }
        if !result.is_ok() {
            return Err(format!(
                "job {} {:?}: {}",
                result.id,
                result.status,
                result.text()
            ));
        }
        if !(load.expect)(base + k, &result.body) {
            return Err(format!(
                "job {}: wrong result {:?}",
                result.id,
                result.text()
            ));
        }
        latencies.push(now - sent_at[k]);
        done += 1;
    }
    Ok((start, Instant::now(), latencies))
}

pub(crate) fn echo_payload(i: usize, buf: &mut Vec<u8>) {
    // 64 bytes, different for every job, so a misrouted result is caught: the id in 16 hex
    // digits, four times (cheap: the client shares the machine with what it measures).
    let mut hex = [0u8; 16];
    for (k, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[(i >> ((15 - k) * 4)) & 0xf];
    }
    for _ in 0..4 {
        buf.extend_from_slice(&hex);
    }
}

/// Where the CPU went during a measurement (stderr only: a diagnostic, not a figure).
/// Returns the shares (% of one core) of master, workers and clients.
fn report_cpu(what: &str, before: &[f64; 3], after: &[f64; 3], wall: Duration) -> [f64; 3] {
    let share = |i: usize| (after[i] - before[i]) / wall.as_secs_f64() * 100.0;
    let shares = [share(0), share(1), share(2)];
    eprintln!(
        "{what}: CPU busy (% of one core): master {:.0}, workers {:.0}, clients {:.0}",
        shares[0], shares[1], shares[2]
    );
    shares
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// a (dispatch throughput, 1 and 4 clients) and f (the peer), interleaved run by run.
pub fn dispatch_and_peer(opts: &Opts, runs: usize, with_peer: bool) -> Result<Vec<Row>, String> {
    let total = if opts.quick { 50_000 } else { 200_000 };
    let master = Master::start(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\nmax_jobs = 0\nmax_queue = 1000000\n",
        true,
    )?;
    let socket = master.job_socket();
    let expect = |i: usize, body: &[u8]| {
        let mut want = [0u8; 64];
        let mut v = Vec::with_capacity(64);
        echo_payload(i, &mut v);
        want.copy_from_slice(&v);
        body == want
    };
    let load = |clients, total| Load {
        pool: "echo",
        clients,
        total,
        window: opts.window,
        payload: Payloads::Fill(&echo_payload),
        expect: &expect,
    };
    drive(&socket, &load(1, 5_000))?; // warm up
    let (mut one, mut four, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let m1 = drive(&socket, &load(1, total))?;
        let before = cpu_split(&master);
        let started = Instant::now();
        let m4 = drive(&socket, &load(4, total))?;
        report_cpu(
            "a: 4 clients",
            &before,
            &cpu_split(&master),
            started.elapsed(),
        );
        eprintln!(
            "a run {}: 1 client {:.0} jobs/s, 4 clients {:.0} jobs/s",
            run + 1,
            m1.jobs_per_s,
            m4.jobs_per_s
        );
        let p = if with_peer {
            Some(run_peer(total)?)
        } else {
            None
        };
        if let Some(p) = p {
            eprintln!("f run {}: multiprocessing.Pool(2) {p:.0} jobs/s", run + 1);
        }
        one.push((m1, p));
        four.push((m4, p));
        peer.extend(p);
    }
    drop(master);
    let mut rows = Vec::new();
    for (clients, results) in [(1, &one), (4, &four)] {
        let rate = median(
            &mut results
                .iter()
                .map(|(m, _)| m.jobs_per_s)
                .collect::<Vec<_>>(),
        );
        let p50 = median(
            &mut results
                .iter()
                .map(|(m, _)| m.percentile(50).as_secs_f64())
                .collect::<Vec<_>>(),
        );
        let p99 = median(
            &mut results
                .iter()
                .map(|(m, _)| m.percentile(99).as_secs_f64())
                .collect::<Vec<_>>(),
        );
        rows.push(Row {
            section: 'a',
            what: format!(
                "`echo`, {} jobs of 64 B, 2 workers, {clients} client{} (window {})",
                thousands(total as f64),
                if clients == 1 { "" } else { "s" },
                opts.window
            ),
            value: format!(
                "{} jobs/s; p50 {}, p99 {}",
                thousands(rate),
                ms(Duration::from_secs_f64(p50)),
                ms(Duration::from_secs_f64(p99))
            ),
            target: if clients == 4 {
                "≥ 200,000 jobs/s".into()
            } else {
                String::new()
            },
        });
    }
    if with_peer {
        rows.push(Row {
            section: 'f',
            what: format!(
                "peer: `multiprocessing.Pool(2)`, chunksize 1, {} no-op jobs of 64 B",
                thousands(total as f64)
            ),
            value: format!("{} jobs/s", thousands(median(&mut peer.clone()))),
            target: String::new(),
        });
        for (clients, results) in [(1, &one), (4, &four)] {
            let mut ratios: Vec<f64> = results
                .iter()
                .filter_map(|(m, p)| p.map(|p| m.jobs_per_s / p))
                .collect();
            rows.push(Row {
                section: 'f',
                what: format!(
                    "jobhost ({clients} client{}) / peer",
                    if clients == 1 { "" } else { "s" }
                ),
                value: format!("{:.1}×", median(&mut ratios)),
                target: if clients == 4 {
                    "≥ 5×".into()
                } else {
                    String::new()
                },
            });
        }
    }
    Ok(rows)
}

/// Runs the multiprocessing peer and returns its jobs/s.
fn run_peer(jobs: usize) -> Result<f64, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/mp_pool_peer.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args([
            "--jobs",
            &jobs.to_string(),
            "--workers",
            "2",
            "--payload",
            "64",
            "--chunksize",
            "1",
        ])
        .output()
        .map_err(|e| format!("cannot run the peer (python3 {script}): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "the peer failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("jobs_per_s="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("the peer printed no jobs_per_s: {text}"))
}

/// b: `hash` on 64 KiB payloads with 1 and 2 workers.
pub fn cpu_scaling(opts: &Opts, runs: usize) -> Result<Vec<Row>, String> {
    const DISTINCT: usize = 16;
    let jobs = if opts.quick { 2_000 } else { 10_000 };
    let payloads: Vec<Vec<u8>> = (0..DISTINCT)
        .map(|p| {
            (0..64 * 1024)
                .map(|j| ((j * 31 + p * 7) % 251) as u8)
                .collect()
        })
        .collect();
    let digests: Vec<Vec<u8>> = payloads
        .iter()
        .map(|p| {
            Sha256::digest(p)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes()
        })
        .collect();
    let expect = |i: usize, body: &[u8]| body == digests[i % DISTINCT];
    let (mut rate1, mut rate2, mut eff) = (Vec::new(), Vec::new(), Vec::new());
    // Per worker count: CPU shares of master, workers, client, summed over the runs.
    let mut cpu = [[0.0f64; 3]; 2];
    for run in 0..runs {
        let mut rates = [0.0; 2];
        for (slot, workers) in [1, 2].into_iter().enumerate() {
            let master = Master::start(
                &format!("[[pool]]\nname = \"hash\"\nplugin = \"hash\"\nworkers = {workers}\nmax_jobs = 0\n"),
                true,
            )?;
            let load = Load {
                pool: "hash",
                clients: 1,
                total: jobs,
                window: 64,
                payload: Payloads::Cycle(&payloads),
                expect: &expect,
            };
            drive(&master.job_socket(), &Load { total: 200, ..load })?; // warm up
            let before = cpu_split(&master);
            let started = Instant::now();
            rates[slot] = drive(&master.job_socket(), &load)?.jobs_per_s;
            let shares = report_cpu(
                &format!("b: {workers} worker(s)"),
                &before,
                &cpu_split(&master),
                started.elapsed(),
            );
            for (sum, share) in cpu[slot].iter_mut().zip(shares) {
                *sum += share / runs as f64;
            }
        }
        eprintln!(
            "b run {}: 1 worker {:.0} jobs/s, 2 workers {:.0} jobs/s",
            run + 1,
            rates[0],
            rates[1]
        );
        rate1.push(rates[0]);
        rate2.push(rates[1]);
        eff.push(rates[1] / (2.0 * rates[0]));
    }
    let mib_s = |jobs_s: f64| jobs_s * 64.0 / 1024.0;
    let (r1, r2) = (median(&mut rate1), median(&mut rate2));
    Ok(vec![
        Row {
            section: 'b',
            what: format!(
                "`hash`, {} jobs of 64 KiB, 1 worker",
                thousands(jobs as f64)
            ),
            value: format!("{} jobs/s ({:.0} MiB/s)", thousands(r1), mib_s(r1)),
            target: String::new(),
        },
        Row {
            section: 'b',
            what: format!(
                "`hash`, {} jobs of 64 KiB, 2 workers",
                thousands(jobs as f64)
            ),
            value: format!("{} jobs/s ({:.0} MiB/s)", thousands(r2), mib_s(r2)),
            target: String::new(),
        },
        Row {
            section: 'b',
            what: "parallel efficiency, 2 workers against 1".into(),
            value: format!("{:.0} %", median(&mut eff) * 100.0),
            target: "≥ 90 %".into(),
        },
        Row {
            section: 'b',
            what: "CPU busy, % of one core (mean of the runs): master / workers / client".into(),
            value: format!(
                "1 worker: {:.0} / {:.0} / {:.0}; 2 workers: {:.0} / {:.0} / {:.0}",
                cpu[0][0], cpu[0][1], cpu[0][2], cpu[1][0], cpu[1][1], cpu[1][2]
            ),
            target: String::new(),
        },
    ])
}

/// Summed PSS of a master and its workers, in bytes, with the per-process figures.
fn summed_pss(master: &Master) -> Result<(u64, Vec<u64>), String> {
    let mut pids = vec![master.pid()];
    pids.extend(master.workers());
    let mut each = Vec::new();
    for pid in pids {
        each.push(
            jobhost::sys::pss_of(Pid::from_raw(pid)).map_err(|e| format!("PSS of {pid}: {e}"))?,
        );
    }
    Ok((each.iter().sum(), each))
}

/// c: `lookup` with a 256 MiB table and 4 workers, preloaded against built per worker.
pub fn memory(runs: usize) -> Result<Vec<Row>, String> {
    const TABLE_MIB: u64 = 256;
    const WORKERS: usize = 4;
    let mut rows = Vec::new();
    let mut totals = [Vec::new(), Vec::new()];
    let mut detail = [String::new(), String::new()];
    for run in 0..runs {
        for (slot, build_in) in ["init", "worker_start"].into_iter().enumerate() {
            let master = Master::start(
                &format!(
                    "[[pool]]\nname = \"lookup\"\nplugin = \"lookup\"\nworkers = {WORKERS}\nmax_rss = \"1GiB\"\n\
                     [pool.settings]\ntable_mib = {TABLE_MIB}\nbuild_in = \"{build_in}\"\n"
                ),
                true,
            )?;
            let table = TABLE_MIB << 20;
            master.wait_until(
                "every worker to hold the table",
                Duration::from_secs(180),
                || {
                    let workers = master.workers();
                    workers.len() == WORKERS
                        && workers.iter().all(|&w| {
                            jobhost::sys::rss_of(Pid::from_raw(w))
                                .is_ok_and(|rss| rss >= table * 9 / 10)
                        })
                },
            )?;
            // Some real lookups, so the workers have run the plugin's code.
            let mut client = Client::connect(&master.job_socket()).map_err(|e| e.to_string())?;
            for key in 0..200u64 {
                let r = client
                    .call("lookup", key.to_string().as_bytes())
                    .map_err(|e| e.to_string())?;
                if !r.is_ok() {
                    return Err(format!("lookup {key}: {}", r.text()));
                }
            }
            // Settle: the sum stops moving.
            let mut last = summed_pss(&master)?.0;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                std::thread::sleep(Duration::from_millis(300));
                let now = summed_pss(&master)?.0;
                if now.abs_diff(last) < (1 << 20) || Instant::now() > deadline {
                    break;
                }
                last = now;
            }
            let (total, each) = summed_pss(&master)?;
            eprintln!(
                "c run {}: build_in {build_in}: summed PSS {} MiB (each: {:?} MiB)",
                run + 1,
                total >> 20,
                each.iter().map(|b| b >> 20).collect::<Vec<_>>()
            );
            totals[slot].push(total as f64);
            detail[slot] = format!(
                "master {} MiB, workers {} MiB",
                each[0] >> 20,
                each[1..]
                    .iter()
                    .map(|b| (b >> 20).to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            );
        }
    }
    let limit = 1.25 * (TABLE_MIB as f64) + 8.0 * (WORKERS as f64 + 1.0);
    let mib = |b: f64| b / f64::from(1 << 20);
    let (pre, own) = (mib(median(&mut totals[0])), mib(median(&mut totals[1])));
    rows.push(Row {
        section: 'c',
        what: format!(
            "`lookup` {TABLE_MIB} MiB table, {WORKERS} workers, preloaded in `init`: summed PSS"
        ),
        value: format!("{pre:.0} MiB ({})", detail[0]),
        target: format!("≤ {limit:.0} MiB"),
    });
    rows.push(Row {
        section: 'c',
        what: "the same, table built in each worker's `worker_start`".into(),
        value: format!(
            "{own:.0} MiB ({}); preloading saves {:.0} %",
            detail[1],
            (1.0 - pre / own) * 100.0
        ),
        target: String::new(),
    });
    Ok(rows)
}

/// d: kill -9 of a busy worker to its replacement's first job; fork rate under a crash loop.
pub fn recovery(opts: &Opts, runs: usize) -> Result<Vec<Row>, String> {
    let samples = if opts.quick { 5 } else { 20 };
    let mut medians = Vec::new();
    let mut all = Vec::new();
    for run in 0..runs {
        let master = Master::start(
            "[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 1\nmax_attempts = 1\njob_timeout = \"120s\"\n",
            true,
        )?;
        let mut client = Client::connect(&master.job_socket()).map_err(|e| e.to_string())?;
        let mut times = Vec::new();
        let mut id = 0u64;
        let call = |client: &mut Client, id: &mut u64, payload: &[u8]| -> Result<u64, String> {
            *id += 1;
            client
                .send(*id, "sleep", payload)
                .map_err(|e| e.to_string())?;
            client.flush().map_err(|e| e.to_string())?;
            Ok(*id)
        };
        for _ in 0..samples {
            // The worker completes a job first: a worker that dies before its first result
            // looks like a crash loop and is replaced with back-off.
            let warm = call(&mut client, &mut id, b"0")?;
            let r = client.recv().map_err(|e| e.to_string())?;
            if r.id != warm || !r.is_ok() {
                return Err(format!("warm-up job: {:?} {}", r.status, r.text()));
            }
            let workers = master.workers();
            let [worker] = workers[..] else {
                return Err(format!("expected one worker, found {workers:?}"));
            };
            let long = call(&mut client, &mut id, b"60000")?;
            master.wait_until(
                "the worker to run the 60 s job",
                Duration::from_secs(30),
                || in_sleep_job(worker),
            )?;
            let short = call(&mut client, &mut id, b"0")?;
            std::thread::sleep(Duration::from_millis(5)); // the short job reaches the master
            let killed = Instant::now();
            kill(Pid::from_raw(worker), Signal::SIGKILL)
                .map_err(|e| format!("kill -9 {worker}: {e}"))?;
            let mut got = 0;
            while got < 2 {
                let r = client.recv().map_err(|e| e.to_string())?;
                if r.id == short {
                    if !r.is_ok() {
                        return Err(format!("the queued job failed: {}", r.text()));
                    }
                    times.push(killed.elapsed().as_secs_f64());
                } else if r.id == long && r.is_ok() {
                    return Err("the killed job succeeded".into());
                }
                got += 1;
            }
        }
        let mut t = times.clone();
        let m = median(&mut t);
        eprintln!(
            "d run {}: kill -9 to first job of the replacement: median {:.1} ms",
            run + 1,
            m * 1000.0
        );
        medians.push(m);
        all.extend(times);
    }
    all.sort_by(f64::total_cmp);
    let worst = all.last().copied().unwrap_or(f64::NAN);

    // The crash loop: every worker dies in worker_start.
    let watch = if opts.quick {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(30)
    };
    let master = Master::start_logging(
        "[[pool]]\nname = \"faulty\"\nplugin = \"faulty\"\nworkers = 2\n[pool.settings]\nworker_start = \"segv\"\n",
        false,
        "debug",
    )?;
    let started = Instant::now();
    let forks_at = |master: &Master| master.log().matches("started for pool faulty").count();
    let before = forks_at(&master);
    std::thread::sleep(watch);
    let forks = forks_at(&master) - before;
    let seconds = started.elapsed().as_secs_f64();
    let failing = master.log().contains("pool faulty is failing");
    eprintln!("d crash loop: {forks} forks in {seconds:.1} s");
    drop(master);
    Ok(vec![
        Row {
            section: 'd',
            what: format!(
                "kill -9 of a busy worker → its replacement's first job (median of {samples})"
            ),
            value: format!(
                "{} (worst of all runs {})",
                ms(Duration::from_secs_f64(median(&mut medians))),
                ms(Duration::from_secs_f64(worst))
            ),
            target: "≤ 20 ms".into(),
        },
        Row {
            section: 'd',
            what: format!(
                "crash loop (`worker_start` segfaults, 2 workers): forks in the first {:.0} s",
                watch.as_secs_f64()
            ),
            value: format!(
                "{forks} forks, {:.2} per second{}",
                forks as f64 / seconds,
                if failing { "; pool marked failing" } else { "" }
            ),
            target: "bounded by back-off".into(),
        },
    ])
}

/// e: jobs/s and failed jobs while 5 reloads in a row replace the workers under load.
pub fn reload_under_load(opts: &Opts, runs: usize) -> Result<Vec<Row>, String> {
    const RELOADS: usize = 5;
    let pool = |round: usize| {
        format!("[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\nmax_jobs = 0\n[pool.settings]\nround = {round}\n")
    };
    let master = Master::start(&pool(0), true)?;
    let socket = master.job_socket();
    let mut round = 0;
    let (mut steady, mut during, mut failed_total, mut answered_total) =
        (Vec::new(), Vec::new(), 0u64, 0u64);
    for run in 0..runs {
        let stop = AtomicBool::new(false);
        let answered = AtomicU64::new(0);
        let outcome: Result<(f64, f64, u64, u64), String> = std::thread::scope(|s| {
            let clients: Vec<_> = (0..2usize)
                .map(|c| {
                    let (stop, answered, socket) = (&stop, &answered, &socket);
                    s.spawn(move || continuous_client(socket, c, stop, answered))
                })
                .collect();
            let mut measure = || -> Result<(f64, f64), String> {
                std::thread::sleep(Duration::from_millis(300));
                let (c0, t0) = (answered.load(Ordering::Relaxed), Instant::now());
                std::thread::sleep(Duration::from_secs(if opts.quick { 1 } else { 2 }));
                let (c1, t1) = (answered.load(Ordering::Relaxed), Instant::now());
                let steady = (c1 - c0) as f64 / (t1 - t0).as_secs_f64();
                for _ in 0..RELOADS {
                    let one = Instant::now();
                    round += 1;
                    let generation = master.status()?["generation"].as_u64().unwrap_or(0);
                    master.rewrite_pools(&pool(round))?;
                    kill(Pid::from_raw(master.pid()), Signal::SIGHUP)
                        .map_err(|e| format!("kill -HUP: {e}"))?;
                    master.wait_until("the reload", Duration::from_secs(60), || {
                        master
                            .status()
                            .is_ok_and(|s| s["generation"].as_u64().unwrap_or(0) > generation)
                    })?;
                    eprintln!(
                        "e: reload {round} took {:.1} ms",
                        one.elapsed().as_secs_f64() * 1000.0
                    );
                }
                let (c2, t2) = (answered.load(Ordering::Relaxed), Instant::now());
                Ok((steady, (c2 - c1) as f64 / (t2 - t1).as_secs_f64()))
            };
            let measured = measure();
            stop.store(true, Ordering::Relaxed);
            let mut failed = 0;
            let mut total = 0;
            for client in clients {
                let (ok, bad) = client
                    .join()
                    .unwrap_or_else(|_| Err("a client thread panicked".into()))?;
                failed += bad;
                total += ok + bad;
            }
            let (steady, during) = measured?;
            Ok((steady, during, failed, total))
        });
        let (s, d, failed, total) = outcome?;
        eprintln!(
            "e run {}: {s:.0} jobs/s steady, {d:.0} jobs/s during {RELOADS} reloads; {failed} failed of {total}",
            run + 1
        );
        steady.push(s);
        during.push(d);
        failed_total += failed;
        answered_total += total;
    }
    let reloads_ok = master.log().matches("reload ok").count();
    drop(master);
    Ok(vec![
        Row {
            section: 'e',
            what: format!(
                "`echo`, 2 workers, 2 clients submitting continuously, {RELOADS} reloads in a row"
            ),
            value: format!(
                "{} jobs/s during the reloads ({} jobs/s before them)",
                thousands(median(&mut during)),
                thousands(median(&mut steady))
            ),
            target: String::new(),
        },
        Row {
            section: 'e',
            what: format!("failed or lost jobs over all runs ({reloads_ok} reloads)"),
            value: format!("{failed_total} of {}", thousands(answered_total as f64)),
            target: "0".into(),
        },
    ])
}

/// Submits echo jobs (256 in flight) until `stop`, then collects every outstanding answer.
/// Returns (ok, failed or rejected or unanswered).
fn continuous_client(
    socket: &Path,
    c: usize,
    stop: &AtomicBool,
    answered: &AtomicU64,
) -> Result<(u64, u64), String> {
    const WINDOW: u64 = 256;
    let mut client = Client::connect(socket).map_err(|e| e.to_string())?;
    let base = (c as u64) << 40;
    let (mut next, mut done, mut ok, mut bad) = (0u64, 0u64, 0u64, 0u64);
    let mut payload = Vec::new();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping && next - done <= WINDOW / 2 {
            while next - done < WINDOW {
                payload.clear();
                echo_payload((base + next) as usize, &mut payload);
                client
                    .send(base + next, "echo", &payload)
                    .map_err(|e| e.to_string())?;
                next += 1;
            }
        }
        if done == next {
            break;
        }
        match client.recv() {
            Ok(r) => {
                let mut want = Vec::new();
                echo_payload(r.id as usize, &mut want);
                if r.is_ok() && r.body == want {
                    ok += 1;
                } else {
                    eprintln!("e: job {} {:?}: {}", r.id, r.status, r.text());
                    bad += 1;
                }
                done += 1;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("e: client {c}: {e}; {} jobs unanswered", next - done);
                return Ok((ok, bad + (next - done)));
            }
        }
    }
    Ok((ok, bad))
}

/// i: what serving `/metrics` costs the dispatch loop: section a's 1-client load on one master
/// with `admin.http`, runs with a scraper (once, then ten times a second) and runs without
/// alternating, in the order ABBA so that a drift of the machine falls on both.
pub fn metrics_cost(opts: &Opts, runs: usize) -> Result<Vec<Row>, String> {
    // Long enough that a run sees several scrapes at one a second.
    let total = if opts.quick { 200_000 } else { 2_000_000 };
    let pools =
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\nmax_jobs = 0\nmax_queue = 1000000\n";
    let master = Master::start_with_http(pools)?;
    let (addr, token) = master.http.clone().ok_or("the master has no admin.http")?;
    let expect = |i: usize, body: &[u8]| {
        let mut v = Vec::with_capacity(64);
        echo_payload(i, &mut v);
        body == v.as_slice()
    };
    let load = |total| Load {
        pool: "echo",
        clients: 1,
        total,
        window: opts.window,
        payload: Payloads::Fill(&echo_payload),
        expect: &expect,
    };
    // The scraper must work before anything is measured.
    scrape(addr, &token)?;
    drive(&master.job_socket(), &load(5_000))?;
    // One run: jobs/s, and the master's CPU per job in µs; with a scraper every `every`.
    let run = |every: Option<Duration>, scrapes: &AtomicU64| -> Result<(f64, f64), String> {
        let stop = AtomicBool::new(false);
        let cpu_before = crate::master::cpu_seconds(master.pid());
        let (measured, scraped) = std::thread::scope(|s| {
            let (stop, addr, token) = (&stop, addr, &token);
            let scraper = every.map(|every| {
                s.spawn(move || -> Result<(), String> {
                    while !stop.load(Ordering::Relaxed) {
                        scrape(addr, token)?;
                        scrapes.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(every);
                    }
                    Ok(())
                })
            });
            let measured = drive(&master.job_socket(), &load(total));
            stop.store(true, Ordering::Relaxed);
            let scraped = scraper.map_or(Ok(()), |t| {
                t.join().unwrap_or(Err("the scraper panicked".into()))
            });
            (measured, scraped)
        });
        scraped?;
        let cpu = crate::master::cpu_seconds(master.pid()) - cpu_before;
        Ok((measured?.jobs_per_s, cpu / total as f64 * 1e6))
    };
    let mut rows = Vec::new();
    for every in [Duration::from_secs(1), Duration::from_millis(100)] {
        let (mut ratios, mut off_rates, mut on_rates, mut off_cpu, mut on_cpu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let scrapes = AtomicU64::new(0);
        for i in 0..runs.max(4) {
            let (off, on) = if i % 2 == 0 {
                let off = run(None, &scrapes)?;
                (off, run(Some(every), &scrapes)?)
            } else {
                let on = run(Some(every), &scrapes)?;
                (run(None, &scrapes)?, on)
            };
            eprintln!(
                "i run {} (scrape every {every:?}): off {:.0} jobs/s ({:.2} µs master CPU/job), on {:.0} jobs/s ({:.2} µs)",
                i + 1, off.0, off.1, on.0, on.1
            );
            ratios.push(on.0 / off.0);
            off_rates.push(off.0);
            on_rates.push(on.0);
            off_cpu.push(off.1);
            on_cpu.push(on.1);
        }
        let every_text = if every >= Duration::from_secs(1) {
            "every second".to_string()
        } else {
            format!("every {} ms", every.as_millis())
        };
        rows.push(Row {
            section: 'i',
            what: format!(
                "`echo`, {} jobs a run, 1 client, admin.http on: runs without a scraper / with `/metrics` scraped {every_text} ({} scrapes)",
                thousands(total as f64),
                scrapes.load(Ordering::Relaxed)
            ),
            value: {
                let (off, on) = (median(&mut off_rates), median(&mut on_rates));
                ratios.sort_by(f64::total_cmp);
                format!(
                    "{} / {} jobs/s: {:.1} % (pairs {:.0}–{:.0} %); master CPU per job {:.2} / {:.2} µs",
                    thousands(off),
                    thousands(on),
                    on / off * 100.0,
                    ratios.first().copied().unwrap_or(0.0) * 100.0,
                    ratios.last().copied().unwrap_or(0.0) * 100.0,
                    median(&mut off_cpu),
                    median(&mut on_cpu)
                )
            },
            target: if every >= Duration::from_secs(1) {
                "≥ 95 %".into()
            } else {
                String::new()
            },
        });
    }
    Ok(rows)
}

/// One GET of `/metrics` on a new connection; an error unless it is a 200 ending in `# EOF`.
fn scrape(addr: std::net::SocketAddr, token: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Accept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&reply);
    if !text.starts_with("HTTP/1.1 200") || !text.trim_end().ends_with("# EOF") {
        let head: String = text.chars().take(300).collect();
        return Err(format!("/metrics answered: {head}"));
    }
    Ok(())
}
