//! Section g: pool `echo` fed from Redis Streams (2 workers, batch 64) against the redis-py
//! peer (`../shared/bench/redis_stream_peer.py` from the project root), both on one private
//! redis-server in the same run, and that server's own CPU per job.
//!
//! It owns the private redis-server (a Unix socket in a temp folder, `--save '' --appendonly
//! no`, killed when dropped), the producer (shaped like the peer's: pipelined XADDs, 1000 per
//! round trip, then XREAD of the results stream until all are seen, every result checked), the
//! peer's run and the section's rows. When redis-server, the peer script or the python `redis`
//! package is missing it returns a row saying so instead of failing the whole bench.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use redis::{Connection, Value};

use crate::master::{cpu_seconds, cpu_split, Master};
use crate::scenarios::{echo_payload, ms, thousands};
use crate::{median, Opts, Row};

/// The jobs stream, its group and the results stream of the jobhost pool.
const STREAM: &str = "jobs";
const GROUP: &str = "jobhost";
const RESULTS: &str = "results";
/// XADDs per round trip (as the peer's producer).
const PIPELINE: usize = 1000;
/// Entries per XREADGROUP, for jobhost's workers and the peer's alike.
const BATCH: usize = 64;
const WORKERS: usize = 2;
/// How long the producer's XREAD blocks before it calls the run stalled.
const BLOCK: Duration = Duration::from_secs(5);

/// A private redis-server on a Unix socket; killed when dropped.
struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    child: Child,
}

impl Server {
    /// Starts one and waits until it answers PING. `Ok(None)`: redis-server is not installed.
    fn start() -> Result<Option<Server>, String> {
        match Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot run redis-server --version: {e}")),
            Ok(s) if !s.success() => return Err(format!("redis-server --version: {s}")),
            Ok(_) => {}
        }
        let dir = tempfile::Builder::new()
            .prefix("jobhost-bench-redis.")
            .tempdir()
            .map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let socket = dir.path().join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        let server = Server {
            _dir: dir,
            socket,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answered = server
                .conn()
                .and_then(|mut c| {
                    redis::cmd("PING")
                        .query::<String>(&mut c)
                        .map_err(|e| e.to_string())
                })
                .is_ok();
            if answered {
                return Ok(Some(server));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on {} did not answer PING within 10 s",
                    server.socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn conn(&self) -> Result<Connection, String> {
        let conn = redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .map_err(|e| format!("cannot connect to {}: {e}", self.url()))?;
        conn.set_read_timeout(Some(BLOCK * 3))
            .map_err(|e| format!("cannot set a read timeout on {}: {e}", self.url()))?;
        Ok(conn)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one jobhost run measured.
struct Measured {
    jobs_per_s: f64,
    /// Sorted.
    latencies: Vec<Duration>,
    /// redis-server CPU per job, µs.
    server_us: f64,
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

/// What one peer run measured.
struct PeerRun {
    jobs_per_s: f64,
    /// redis-server CPU per job, µs.
    server_us: f64,
    /// The peer's processes (producer and consumers) together, CPU per job, µs.
    client_us: f64,
}

/// g: jobhost's `echo` through Redis against the redis-py peer, with the server's CPU per job.
pub fn redis_streams(opts: &Opts, runs: usize) -> Result<Vec<Row>, String> {
    let jobs = if opts.quick { 20_000 } else { 200_000 };
    let skip = |why: &str| {
        vec![Row {
            section: 'g',
            what: "`echo` via Redis Streams against the redis-py peer".into(),
            value: format!("skipped: {why}"),
            target: String::new(),
        }]
    };
    let Some(server) = Server::start()? else {
        eprintln!("g: skipped: redis-server not installed");
        return Ok(skip("redis-server not installed"));
    };
    let peer = peer_script();
    let peer_missing = match &peer {
        Err(why) => Some(why.clone()),
        Ok(_) if !python_has_redis() => {
            Some("python redis package missing: pip install redis".to_string())
        }
        Ok(_) => None,
    };
    if let Some(why) = &peer_missing {
        eprintln!("g: the peer is skipped: {why}");
    }

    let mut conn = server.conn()?;
    // The group exists before the first XADD.
    let _: Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut conn)
        .map_err(|e| format!("XGROUP CREATE {STREAM} {GROUP}: {e}"))?;
    let master = Master::start(
        &format!(
            "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = {WORKERS}\nmax_jobs = 0\nsource = \"redis\"\n\
             [pool.redis]\nurl = {:?}\nstream = \"{STREAM}\"\ngroup = \"{GROUP}\"\nresults = \"{RESULTS}\"\nbatch = {BATCH}\n",
            server.socket.display().to_string()
        ),
        true,
    )?;
    produce(&mut conn, 2_000, server.pid())?; // warm up: both consumers connected
    let mut single = one_at_a_time(&mut conn, if opts.quick { 200 } else { 2_000 })?;
    single.sort_unstable();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run in 0..runs {
        let before = cpu_split(&master);
        let started = Instant::now();
        let m = produce(&mut conn, jobs, server.pid())?;
        let wall = started.elapsed().as_secs_f64();
        let after = cpu_split(&master);
        let per_job = |i: usize| (after[i] - before[i]) * 1e6 / jobs as f64;
        eprintln!(
            "g run {}: jobhost {:.0} jobs/s, p50 {}, p99 {}; CPU per job (µs): redis-server {:.1}, \
             master {:.1}, workers {:.1}, producer {:.1}; busy (% of one core): redis-server {:.0}, \
             workers {:.0}",
            run + 1,
            m.jobs_per_s,
            ms(m.percentile(50)),
            ms(m.percentile(99)),
            m.server_us,
            per_job(0),
            per_job(1),
            per_job(2),
            m.server_us * jobs as f64 / 1e4 / wall,
            (after[1] - before[1]) / wall * 100.0,
        );
        let p = match (&peer, &peer_missing) {
            (Ok(script), None) => Some(run_peer(script, &server, jobs)?),
            _ => None,
        };
        if let Some(p) = &p {
            eprintln!(
                "g run {}: peer {:.0} jobs/s; CPU per job (µs): redis-server {:.1}, python processes {:.1}",
                run + 1,
                p.jobs_per_s,
                p.server_us,
                p.client_us
            );
        }
        ours.push(m);
        theirs.push(p);
    }
    drop(master);

    let med = |f: &dyn Fn(&Measured) -> f64| median(&mut ours.iter().map(f).collect::<Vec<_>>());
    let rate = med(&|m| m.jobs_per_s);
    let p50 = med(&|m| m.percentile(50).as_secs_f64());
    let p99 = med(&|m| m.percentile(99).as_secs_f64());
    let our_cpu = med(&|m| m.server_us);
    let mut rows = vec![Row {
        section: 'g',
        what: format!(
            "`echo` via Redis Streams, {} entries of 64 B, {WORKERS} workers, batch {BATCH}, 1 producer",
            thousands(jobs as f64)
        ),
        value: format!(
            "{} jobs/s; p50 {}, p99 {}",
            thousands(rate),
            ms(Duration::from_secs_f64(p50)),
            ms(Duration::from_secs_f64(p99))
        ),
        target: String::new(),
    }];
    let pct = |p: usize| single[(single.len() * p / 100).min(single.len().saturating_sub(1))];
    rows.push(Row {
        section: 'g',
        what: format!(
            "the same, one job at a time ({} jobs: XADD, then XREAD of its result)",
            thousands(single.len() as f64)
        ),
        value: format!("p50 {}, p99 {}", ms(pct(50)), ms(pct(99))),
        target: String::new(),
    });
    let ceiling = |us: f64| format!("{} jobs/s", thousands(1e6 / us));
    if let Some(why) = peer_missing {
        rows.push(Row {
            section: 'g',
            what: "peer: `redis_stream_peer.py` (redis-py)".into(),
            value: format!("skipped: {why}"),
            target: String::new(),
        });
        rows.push(Row {
            section: 'g',
            what: "redis-server CPU per job: jobhost (single-threaded ceiling)".into(),
            value: format!("{our_cpu:.1} µs ({})", ceiling(our_cpu)),
            target: String::new(),
        });
        return Ok(rows);
    }
    let peer_runs: Vec<&PeerRun> = theirs.iter().flatten().collect();
    let peer_rate = median(&mut peer_runs.iter().map(|p| p.jobs_per_s).collect::<Vec<_>>());
    let peer_cpu = median(&mut peer_runs.iter().map(|p| p.server_us).collect::<Vec<_>>());
    let mut ratios: Vec<f64> = ours
        .iter()
        .zip(&theirs)
        .filter_map(|(m, p)| p.as_ref().map(|p| m.jobs_per_s / p.jobs_per_s))
        .collect();
    rows.push(Row {
        section: 'g',
        what: format!(
            "peer: `redis_stream_peer.py` (redis-py, {WORKERS} forked consumers, batch {BATCH}), same server"
        ),
        value: format!("{} jobs/s", thousands(peer_rate)),
        target: String::new(),
    });
    rows.push(Row {
        section: 'g',
        what: "jobhost via Redis / peer".into(),
        value: format!("{:.1}×", median(&mut ratios)),
        target: "≥ 3×".into(),
    });
    rows.push(Row {
        section: 'g',
        what: "redis-server CPU per job: jobhost / peer (single-threaded ceiling)".into(),
        value: format!(
            "{our_cpu:.1} µs / {peer_cpu:.1} µs ({} / {})",
            ceiling(our_cpu),
            ceiling(peer_cpu)
        ),
        target: String::new(),
    });
    Ok(rows)
}

/// Pushes `jobs` echo entries (pipelined, PIPELINE per round trip), then reads the results
/// stream until every job's result came, checking each; deletes both streams' entries after.
fn produce(conn: &mut Connection, jobs: usize, server: i32) -> Result<Measured, String> {
    let cpu_before = cpu_seconds(server);
    let mut sent_at = Vec::with_capacity(jobs.div_ceil(PIPELINE));
    let mut payload = Vec::with_capacity(64);
    let start = Instant::now();
    let mut next = 0;
    while next < jobs {
        let end = (next + PIPELINE).min(jobs);
        let mut pipe = redis::pipe();
        for i in next..end {
            payload.clear();
            echo_payload(i, &mut payload);
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("*")
                .arg("id")
                .arg(i)
                .arg("payload")
                .arg(&payload[..])
                .ignore();
        }
        sent_at.push(Instant::now());
        pipe.query::<()>(conn)
            .map_err(|e| format!("XADD of jobs {next}..{end}: {e}"))?;
        next = end;
    }
    let mut seen = vec![false; jobs];
    let mut latencies = Vec::with_capacity(jobs);
    let mut last = "0-0".to_string();
    let mut want = Vec::with_capacity(64);
    while latencies.len() < jobs {
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(10_000)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(RESULTS)
            .arg(&last)
            .query(conn)
            .map_err(|e| format!("XREAD {RESULTS}: {e}"))?;
        let now = Instant::now();
        let entries = stream_entries(&reply)?;
        if entries.is_empty() {
            return Err(format!(
                "no result for {BLOCK:?}: stalled at {} of {jobs} results",
                latencies.len()
            ));
        }
        for (entry_id, fields) in entries {
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name.as_bytes())
                    .map(|(_, v)| v.as_slice())
            };
            let id = field("id")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&id| id < jobs)
                .ok_or_else(|| format!("result {entry_id} has no id of a job sent: {fields:?}"))?;
            if std::mem::replace(&mut seen[id], true) {
                return Err(format!("job {id} answered twice"));
            }
            if field("status") != Some(b"ok".as_slice()) {
                return Err(format!(
                    "job {id}: status {:?}, body {:?}",
                    field("status").map(String::from_utf8_lossy),
                    field("body").map(String::from_utf8_lossy)
                ));
            }
            want.clear();
            echo_payload(id, &mut want);
            if field("body") != Some(want.as_slice()) {
                return Err(format!(
                    "job {id}: wrong body {:?}",
                    field("body").map(String::from_utf8_lossy)
                ));
            }
            latencies.push(now - sent_at[id / PIPELINE]);
            last = entry_id;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let server_us = (cpu_seconds(server) - cpu_before) * 1e6 / jobs as f64;
    // Every entry acked (its result and its XACK are one MULTI/EXEC): nothing pending.
    let pending: Value = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .query(conn)
        .map_err(|e| format!("XPENDING {STREAM} {GROUP}: {e}"))?;
    if let Value::Array(parts) = &pending {
        if let Some(Value::Int(n)) = parts.first() {
            if *n != 0 {
                return Err(format!("{n} entries still pending after all results came"));
            }
        }
    }
    // Each run starts from empty streams (all entries are acked: trimming loses nothing).
    let mut pipe = redis::pipe();
    pipe.cmd("XTRIM")
        .arg(STREAM)
        .arg("MAXLEN")
        .arg(0)
        .ignore()
        .cmd("DEL")
        .arg(RESULTS)
        .ignore();
    pipe.query::<()>(conn)
        .map_err(|e| format!("XTRIM {STREAM} / DEL {RESULTS}: {e}"))?;
    latencies.sort_unstable();
    Ok(Measured {
        jobs_per_s: jobs as f64 / elapsed,
        latencies,
        server_us,
    })
}

/// `n` jobs one after the other, each XADDed once the previous one's result was read: the
/// latency of a lone job through Redis and an idle worker (the burst's figures above measure
/// the queue behind 200,000 entries instead).
fn one_at_a_time(conn: &mut Connection, n: usize) -> Result<Vec<Duration>, String> {
    let mut latencies = Vec::with_capacity(n);
    let mut last = "0-0".to_string();
    let mut payload = Vec::with_capacity(64);
    for i in 0..n {
        payload.clear();
        echo_payload(i, &mut payload);
        let sent = Instant::now();
        let _: Value = redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("id")
            .arg(i)
            .arg("payload")
            .arg(&payload[..])
            .query(conn)
            .map_err(|e| format!("XADD of job {i}: {e}"))?;
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(RESULTS)
            .arg(&last)
            .query(conn)
            .map_err(|e| format!("XREAD {RESULTS}: {e}"))?;
        let elapsed = sent.elapsed();
        let Some((entry_id, fields)) = stream_entries(&reply)?.into_iter().next() else {
            return Err(format!("no result for job {i} within {BLOCK:?}"));
        };
        let id = i.to_string();
        if !fields.iter().any(|(k, v)| k == b"id" && v == id.as_bytes()) {
            return Err(format!("result {entry_id} is not job {i}'s: {fields:?}"));
        }
        last = entry_id;
        latencies.push(elapsed);
    }
    let _: Value = redis::cmd("DEL")
        .arg(RESULTS)
        .query(conn)
        .map_err(|e| format!("DEL {RESULTS}: {e}"))?;
    Ok(latencies)
}

/// One stream entry: its id and its fields.
type StreamEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// XREAD's reply: nil, or `[[stream, [[id, [field, value, …]], …]]]` (a map in RESP3).
fn stream_entries(reply: &Value) -> Result<Vec<StreamEntry>, String> {
    let streams: Vec<&Value> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(pair) => pair.get(1),
                _ => None,
            })
            .collect(),
        Value::Map(streams) => streams.iter().map(|(_, entries)| entries).collect(),
        other => return Err(format!("unexpected reply to XREAD: {other:?}")),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            return Err(format!("unexpected entries in XREAD's reply: {entries:?}"));
        };
        for entry in entries {
            let Value::Array(parts) = entry else {
                return Err(format!("unexpected entry in XREAD's reply: {entry:?}"));
            };
            let id = match parts.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                other => return Err(format!("unexpected entry id in XREAD's reply: {other:?}")),
            };
            let mut fields = Vec::new();
            if let Some(Value::Array(kv)) = parts.get(1) {
                for pair in kv.chunks(2) {
                    if let [Value::BulkString(k), Value::BulkString(v)] = pair {
                        fields.push((k.clone(), v.clone()));
                    }
                }
            }
            out.push((id, fields));
        }
    }
    Ok(out)
}

/// `../shared/bench/redis_stream_peer.py` from the project root, or why there is none.
fn peer_script() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")));
    let script = root.join("../shared/bench/redis_stream_peer.py");
    if script.is_file() {
        Ok(script)
    } else {
        Err(format!(
            "peer script not found: {} (../shared/bench from the project root)",
            script.display()
        ))
    }
}

fn python_has_redis() -> bool {
    Command::new("python3")
        .args(["-c", "import redis"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CPU seconds (user + system) of this process's waited-for children, so far.
pub(crate) fn children_cpu() -> f64 {
    getrusage(UsageWho::RUSAGE_CHILDREN).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Runs the peer against `server` and returns its jobs/s and CPU figures.
fn run_peer(script: &Path, server: &Server, jobs: usize) -> Result<PeerRun, String> {
    let cpu_before = cpu_seconds(server.pid());
    let children_before = children_cpu();
    let out = Command::new("python3")
        .arg(script)
        .args(["--url", &server.url()])
        .args(["--jobs", &jobs.to_string()])
        .args(["--workers", &WORKERS.to_string()])
        .args(["--batch", &BATCH.to_string()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the peer (python3 {}): {e}", script.display()))?;
    let server_us = (cpu_seconds(server.pid()) - cpu_before) * 1e6 / jobs as f64;
    let client_us = (children_cpu() - children_before) * 1e6 / jobs as f64;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "the Redis peer failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let value = |key: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let done = value("jobs=").ok_or_else(|| format!("the Redis peer printed no jobs=: {text}"))?;
    if done as usize != jobs {
        return Err(format!("the Redis peer did {done} jobs of {jobs}: {text}"));
    }
    let jobs_per_s = value("jobs_per_s=")
        .ok_or_else(|| format!("the Redis peer printed no jobs_per_s=: {text}"))?;
    Ok(PeerRun {
        jobs_per_s,
        server_us,
        client_us,
    })
}
