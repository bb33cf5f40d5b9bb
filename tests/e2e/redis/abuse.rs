//! Redis pools under abuse: pauses, permissions, server errors, restarts with persistence, keys of the wrong type.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobhost_e2e::{config_with, cpu_ticks, in_sleep_job, wait_until, Env, Master, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use redis::Value;

use super::{assert_runs_never_overlap, counts, have_redis, pool, spans, text, Redis};

/// A deadline for a whole run of jobs with an outage in it (back-off included).
const RUN: Duration = Duration::from_secs(60);

/// A pool `q` of `plugin` on the stream `jobs` at the Redis address `url` (which may name a
/// user and a password).
fn pool_at(plugin: &str, workers: usize, url: &str, extra: &str, table: &str) -> String {
    config_with(&format!(
        "[[pool]]\nname = \"q\"\nplugin = \"{plugin}\"\nworkers = {workers}\nsource = \"redis\"\n{extra}\n[pool.redis]\nurl = \"{url}\"\nstream = \"jobs\"\n{table}\n"
    ))
}

/// Starts a redis-server that keeps its data in an append-only file in `redis.dir`, fsynced
/// at every write: stopped with SIGTERM ([`terminate`]) and started again on the same
/// folder, it comes back with every stream, group and pending list it had.
fn start_persistent(mut redis: Redis) -> Redis {
    assert!(redis.child.is_none(), "the server already runs");
    let _ = std::fs::remove_file(&redis.socket);
    let child = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(&redis.socket)
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
        ])
        .arg(&redis.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    redis.child = Some(child);
    wait_until("redis-server answers", SOON, || {
        redis
            .try_conn()
            .is_some_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok())
    });
    redis
}

/// Stops the server as an operator would (SIGTERM: it writes what it has, then exits).
fn terminate(redis: &mut Redis) {
    let mut child = redis.child.take().expect("a running server");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM redis-server");
    let deadline = Instant::now() + SOON;
    loop {
        if let Some(status) = child.try_wait().expect("wait for redis-server") {
            assert!(status.success(), "redis-server stopped with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server still ran {SOON:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The group's consumers of pool `q` (`<hostname>:q:<pid>`) in `XINFO CONSUMERS`.
fn consumer_count(redis: &Redis) -> usize {
    redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg("jobs")
        .arg("jobhost")
        .query::<Value>(&mut redis.conn())
        .map(|v| format!("{v:?}").matches(":q:").count())
        .unwrap_or(0)
}

/// Waits until `n` workers are consumers of the group (so each has read at least once).
fn wait_for_consumers(redis: &Redis, n: usize) {
    wait_until(&format!("{n} consumers in the group"), SOON, || {
        consumer_count(redis) == n
    });
}

/// Entries of the group not acked yet, from XPENDING's summary form.
fn pending(redis: &Redis) -> i64 {
    match redis::cmd("XPENDING")
        .arg("jobs")
        .arg("jobhost")
        .query::<Value>(&mut redis.conn())
    {
        Ok(Value::Array(parts)) => match parts.first() {
            Some(Value::Int(n)) => *n,
            other => panic!("XPENDING's count: {other:?}"),
        },
        other => panic!("XPENDING: {other:?}"),
    }
}

/// The ids of the group's pending entries.
fn pending_ids(redis: &Redis) -> Vec<String> {
    let reply: Value = redis::cmd("XPENDING")
        .arg("jobs")
        .arg("jobhost")
        .arg("-")
        .arg("+")
        .arg(1000)
        .query(&mut redis.conn())
        .expect("XPENDING - +");
    let Value::Array(rows) = reply else {
        panic!("XPENDING - +: {reply:?}");
    };
    rows.iter()
        .map(|row| match row {
            Value::Array(r) => text(&r[0]),
            other => panic!("an XPENDING row: {other:?}"),
        })
        .collect()
}

/// XADDs one entry per field list to `jobs` in one MULTI/EXEC, so that a worker blocked in
/// its read gets them in one batch. Returns the entry ids.
fn add_at_once(redis: &Redis, entries: &[&[(&str, &str)]]) -> Vec<String> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for fields in entries {
        let cmd = pipe.cmd("XADD").arg("jobs").arg("*");
        for (k, v) in *fields {
            cmd.arg(*k).arg(*v);
        }
    }
    pipe.query(&mut redis.conn()).expect("XADD in MULTI/EXEC")
}

/// `INFO commandstats` as command → calls (`cmdstat_xreadgroup` → 12).
fn command_calls(conn: &mut redis::Connection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.trim().split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// [`wait_until`], failing with the master's log (and what `show` says) if `condition` never
/// holds.
fn wait_showing(
    master: &Master,
    what: &str,
    mut condition: impl FnMut() -> bool,
    show: impl Fn() -> String,
) {
    let deadline = Instant::now() + SOON;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {SOON:?} waiting for {what}; {}\nlog:\n{}",
            show(),
            master.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The status line of the pool's source, once it says it is disconnected with a reason that
/// holds `needle` (in any case: the `redis` crate writes NOPERM as `NoPerm`).
fn wait_for_disconnected_with(master: &Master, needle: &str) -> String {
    let needle = needle.to_lowercase();
    let line = std::cell::RefCell::new(String::new());
    wait_showing(
        master,
        &format!("status to show the source disconnected with {needle}"),
        || {
            let status = master.admin("status");
            let found = status.lines().find(|l| {
                l.contains("group jobhost: disconnected (") && l.to_lowercase().contains(&needle)
            });
            if let Some(l) = found {
                *line.borrow_mut() = l.to_string();
            } else if let Some(l) = status.lines().find(|l| l.contains("group jobhost:")) {
                *line.borrow_mut() = l.to_string();
            }
            found.is_some()
        },
        || format!("last source line: {}", line.borrow()),
    );
    line.into_inner()
}

/// True while `pid` is blocked in a read from a socket (recvfrom/read/poll…): not running a
/// `sleep` job, not on a CPU.
fn blocked_not_sleeping(pid: i32) -> bool {
    let Ok(syscall) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) else {
        return false;
    };
    let Some(n) = syscall
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<nix::libc::c_long>().ok())
    else {
        return false; // "running"
    };
    !in_sleep_job(pid)
        && [
            nix::libc::SYS_read,
            nix::libc::SYS_recvfrom,
            nix::libc::SYS_recvmsg,
            nix::libc::SYS_poll,
            nix::libc::SYS_ppoll,
        ]
        .contains(&n)
}

#[test]
fn a_kill_while_a_result_is_being_written_uses_up_no_attempt() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("sleep");
    let redis = Redis::at(&env).start();
    let master = env.start_master(&pool(
        "sleep",
        1,
        &redis,
        "max_attempts = 1\n",
        "batch = 1\n",
    ));
    let worker = master.wait_for_workers(1)[0];
    wait_for_consumers(&redis, 1);
    redis.cli(&[
        "XADD", "jobs", "*", "payload", "1500", "id", "slow", "reply_to", "r",
    ]);
    wait_until("the job running", SOON, || in_sleep_job(worker));
    // Writes wait while the job runs on; its result (MULTI … EXEC) then blocks on the server.
    let pause_ms = 8000;
    redis.cli(&["CLIENT", "PAUSE", &pause_ms.to_string(), "WRITE"]);
    let paused = Instant::now();
    wait_until("the job to end", SOON, || !in_sleep_job(worker));
    // It ended and waits for the server's answer to its result: blocked in a read.
    let mut since: Option<Instant> = None;
    wait_until("the worker blocked writing its result", SOON, || {
        if blocked_not_sleeping(worker) {
            since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_millis(300)
        } else {
            since = None;
            false
        }
    });
    assert_eq!(
        redis.xlen("r"),
        0,
        "the result was written before the pause"
    );
    assert!(
        paused.elapsed() < Duration::from_millis(pause_ms - 2000),
        "too slow to kill the worker within the pause ({:?})",
        paused.elapsed()
    );
    kill(Pid::from_raw(worker), Signal::SIGKILL).expect("kill the worker");
    wait_until("its replacement", SOON, || {
        let now = master.workers();
        now.len() == 1 && now[0] != worker
    });
    // The job had ended: the entry is retried without using up its one attempt.
    wait_until("a result", SOON, || redis.xlen("r") >= 1);
    wait_until("nothing pending", SOON, || pending(&redis) == 0);
    std::thread::sleep(Duration::from_millis(500)); // room for a duplicate to show up
    let results = redis.entries("r");
    assert_eq!(results.len(), 1, "answered once: {results:?}");
    assert_eq!(results[0]["id"], "slow", "{results:?}");
    assert_eq!(
        results[0]["status"],
        "ok",
        "{results:?}\n{}",
        master.log_text()
    );
    assert_eq!(
        redis.xlen("jobs:dead"),
        0,
        "dead-lettered: {:?}",
        redis.entries("jobs:dead")
    );
}

#[test]
fn an_idle_pool_sends_nothing_but_its_blocking_reads() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let redis = Redis::at(&env).start();
    let master = env.start_master(&pool("echo", 2, &redis, "", ""));
    let workers = master.wait_for_workers(2);
    wait_for_consumers(&redis, 2);
    let mut conn = redis.conn();
    // Settled: both read in their idle loop for a while.
    let start = Instant::now();
    wait_until("the pool settled", SOON, || {
        start.elapsed() >= Duration::from_secs(2)
            && command_calls(&mut conn)
                .get("cmdstat_xreadgroup")
                .is_some_and(|n| *n >= 2)
    });
    let before = command_calls(&mut conn);
    let cpu_before: u64 = workers.iter().map(|p| cpu_ticks(*p)).sum();
    std::thread::sleep(Duration::from_secs(3));
    let cpu_after: u64 = workers.iter().map(|p| cpu_ticks(*p)).sum();
    let after = command_calls(&mut conn);
    let grew: Vec<String> = after
        .iter()
        .filter(|(name, calls)| before.get(*name).copied().unwrap_or(0) < **calls)
        .map(|(name, calls)| format!("{name} +{}", calls - before.get(name).copied().unwrap_or(0)))
        .filter(|g| !g.starts_with("cmdstat_xreadgroup ") && !g.starts_with("cmdstat_info "))
        .collect();
    assert!(
        grew.is_empty(),
        "an idle pool sent more than blocking reads in 3 s: {grew:?}"
    );
    assert_eq!(master.workers(), workers, "{}", master.log_text());
    assert!(
        cpu_after - cpu_before <= 5,
        "2 idle workers used {} ticks of CPU in 3 s",
        cpu_after - cpu_before
    );
}

#[test]
fn a_redis_user_that_may_not_run_scripts_is_refused_by_check_and_backed_off_by_workers() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let redis = Redis::at(&env).start();
    redis.cli(&[
        "ACL",
        "SETUSER",
        "jh",
        "on",
        ">jh-secret",
        "~*",
        "&*",
        "+@all",
        "-@scripting",
    ]);
    // The `redis` crate takes a Unix socket's user and password from the query.
    let url = format!("unix://{}?user=jh&pass=jh-secret", redis.url());
    let config = pool_at("echo", 2, &url, "", "");
    // The user is good enough to connect, but not to run the workers' Lua (EVAL).
    let mut whoami = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .expect("connect as jh");
    let me: String = redis::cmd("ACL").arg("WHOAMI").query(&mut whoami).unwrap();
    assert_eq!(me, "jh");
    env.config(&config);
    let check = env.jobhost(&["check", "-c", "jobhost.toml"]);
    let said = format!("{}{}", check.stdout, check.stderr);
    assert_ne!(
        check.code(),
        0,
        "check passed a user that may not run scripts:\n{said}"
    );
    let lower = said.to_lowercase();
    assert!(
        lower.contains("eval") || lower.contains("scripting"),
        "check does not name the missing permission:\n{said}"
    );
    assert!(
        !said.contains("jh-secret"),
        "check showed the password:\n{said}"
    );

    let master = env.start_master(&config);
    let workers = master.wait_for_workers(2);
    let line = wait_for_disconnected_with(&master, "noperm");
    assert!(
        !line.contains("jh-secret"),
        "status showed the password: {line}"
    );
    // Back-off, and one log line per outage per worker: not one per attempt.
    std::thread::sleep(Duration::from_secs(5));
    let lost = master.log_count("redis: cannot reach");
    assert!(
        lost <= 2 * workers.len(),
        "{lost} lines 'redis: cannot reach' in 5 s:\n{}",
        master.log_text()
    );
    // The permission is still missing: still disconnected, not "connected" between tries.
    wait_for_disconnected_with(&master, "noperm");
    assert_eq!(master.workers(), workers, "{}", master.log_text());
    assert!(
        !master.log_text().contains("jh-secret"),
        "the log showed the password"
    );
}

#[test]
fn a_repeated_server_error_backs_off_and_work_resumes_once_it_is_gone() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let redis = Redis::at(&env).start();
    let master = env.start_master(&pool("echo", 2, &redis, "", ""));
    let workers = master.wait_for_workers(2);
    wait_for_consumers(&redis, 2);
    redis.cli(&["ACL", "SETUSER", "default", "-xreadgroup"]);
    wait_for_disconnected_with(&master, "noperm");
    std::thread::sleep(Duration::from_secs(5));
    let lost = master.log_count("redis: cannot reach");
    assert!(
        lost <= 2 * workers.len(),
        "{lost} lines 'redis: cannot reach' in 5 s of one refused command:\n{}",
        master.log_text()
    );
    wait_for_disconnected_with(&master, "noperm");
    redis.cli(&["ACL", "SETUSER", "default", "+xreadgroup"]);
    redis.cli(&[
        "XADD", "jobs", "*", "payload", "back", "id", "after", "reply_to", "r",
    ]);
    wait_until("a result once XREADGROUP is allowed again", SOON, || {
        redis.xlen("r") == 1
    });
    let r = redis.entries("r");
    assert_eq!(
        (r[0]["id"].as_str(), r[0]["body"].as_str()),
        ("after", "back")
    );
    wait_until("status connected again", SOON, || {
        master.admin("status").contains("group jobhost: connected")
    });
    assert_eq!(master.workers(), workers, "{}", master.log_text());
}

#[test]
fn redis_restarted_with_persistence_under_load_answers_each_entry_once_and_never_twice_at_once() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    let trace = env.path().join("trace.log");
    let mut redis = start_persistent(Redis::at(&env));
    // claim_idle at the least the config allows for batch 1 × job_timeout 1s: an entry
    // claimed from a live worker after the restart would run twice at once.
    let (extra, table) = ("job_timeout = \"1s\"\n", "claim_idle = \"6001ms\"\n");
    let hosts: Vec<(Env, Master)> = (0..2)
        .map(|_| {
            let host = Env::new();
            host.install("faulty");
            let master = host.start_master(&pool("faulty", 2, &redis, extra, table));
            master.wait_for_workers(2);
            (host, master)
        })
        .collect();
    wait_for_consumers(&redis, 4);
    let workers: Vec<Vec<i32>> = hosts.iter().map(|(_, m)| m.workers()).collect();
    let n = 60;
    let ids: Vec<String> = (0..n).map(|i| format!("j{i}")).collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("XADD")
            .arg("jobs")
            .arg("*")
            .arg("payload")
            .arg(format!("trace 200 {id} {}", trace.display()))
            .arg("id")
            .arg(id)
            .arg("reply_to")
            .arg("r")
            .ignore();
    }
    pipe.query::<()>(&mut redis.conn()).expect("XADD the jobs");
    wait_until("some results", SOON, || redis.xlen("r") >= 6);
    let before = redis.xlen("r");
    assert!(before < n / 2, "{before} of {n} done before the restart");
    terminate(&mut redis);
    for (_, master) in &hosts {
        master.wait_for_log("redis: cannot reach", SOON);
    }
    // Down long enough for the workers' back-off to grow, short enough that no entry a live
    // worker holds gets idle past claim_idle (back-off 0.1 + 0.2 + … + 1.6 s < 6 s).
    std::thread::sleep(Duration::from_secs(1));
    let redis = start_persistent(redis);
    // It came back with what it had: the stream, and the results written before.
    assert_eq!(redis.xlen("jobs"), n, "the stream did not persist");
    let after = redis.xlen("r");
    assert!(
        after >= before,
        "{after} results after the restart, {before} before"
    );
    assert!(after < n, "the restart came after the work");
    wait_until(&format!("{n} results, nothing pending"), RUN, || {
        redis.xlen("r") >= n && pending(&redis) == 0
    });
    // Quiet: no worker in a job, no new result, for 500 ms.
    let mut quiet: Option<(Instant, usize)> = None;
    wait_until("the hosts to go quiet", SOON, || {
        let busy = hosts
            .iter()
            .flat_map(|(_, m)| m.workers())
            .any(in_sleep_job);
        let len = redis.xlen("r");
        match quiet {
            Some((since, was)) if !busy && was == len => {
                since.elapsed() >= Duration::from_millis(500)
            }
            _ => {
                quiet = (!busy).then(|| (Instant::now(), len));
                false
            }
        }
    });
    let logs = || {
        hosts
            .iter()
            .map(|(_, m)| m.log_text())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let results = redis.entries("r");
    let counts = counts(&results);
    for id in &ids {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} answered {:?} times; all: {counts:?}",
            counts.get(id)
        );
    }
    assert_eq!(results.len(), n, "no other results: {counts:?}");
    assert!(
        results.iter().all(|r| r["status"] == "ok"),
        "{results:?}\n{}",
        logs()
    );
    assert_eq!(
        redis.xlen("jobs:dead"),
        0,
        "dead-lettered: {:?}",
        redis.entries("jobs:dead")
    );
    assert_runs_never_overlap(
        spans(&trace),
        |span| {
            span.end.unwrap_or_else(|| {
                panic!(
                    "job {} never ended in worker {}, which no one killed",
                    span.tag, span.pid
                )
            })
        },
        logs,
    );
    // The outage was waited out, not crashed through.
    for ((_, master), pids) in hosts.iter().zip(&workers) {
        assert_eq!(&master.workers(), pids, "{}", master.log_text());
    }
}

#[test]
fn an_entry_whose_reply_to_is_not_a_stream_is_dead_lettered_and_its_batch_answered() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let redis = Redis::at(&env).start();
    redis.cli(&["SET", "bad", "x"]);
    let master = env.start_master(&pool("faulty", 1, &redis, "", "batch = 4\n"));
    master.wait_for_workers(1);
    wait_for_consumers(&redis, 1);
    let entry = |id: &'static str, to: &'static str| -> [(&'static str, &'static str); 3] {
        [("payload", "ok"), ("id", id), ("reply_to", to)]
    };
    let (e0, e1, e2, e3) = (
        entry("e0", "r"),
        entry("e1", "bad"),
        entry("e2", "r"),
        entry("e3", "r"),
    );
    add_at_once(&redis, &[&e0, &e1, &e2, &e3]);
    wait_until("the other 3 answered", SOON, || redis.xlen("r") >= 3);
    wait_until("e1 dead-lettered", SOON, || redis.xlen("jobs:dead") >= 1);
    wait_until("nothing pending", SOON, || pending(&redis) == 0);
    std::thread::sleep(Duration::from_millis(300)); // room for a duplicate to show up
    let r = redis.entries("r");
    let counts = counts(&r);
    for id in ["e0", "e2", "e3"] {
        assert_eq!(counts.get(id), Some(&1), "{id}: {r:?}");
    }
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(r.iter().all(|e| e["status"] == "ok"), "{r:?}");
    let dead = redis.entries("jobs:dead");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["id"], "e1", "{dead:?}");
    assert!(
        dead[0]["reason"].contains("cannot write its result"),
        "{dead:?}"
    );
    assert_eq!(redis.cli(&["GET", "bad"]).trim(), "x", "the key left alone");
}

#[test]
fn a_dead_letter_key_that_is_not_a_stream_keeps_the_entry_pending_and_the_worker_serving() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let redis = Redis::at(&env).start();
    redis.cli(&["SET", "jobs:dead", "x"]);
    let master = env.start_master(&pool("faulty", 1, &redis, "", ""));
    let workers = master.wait_for_workers(1);
    wait_for_consumers(&redis, 1);
    let stray = redis
        .cli(&["XADD", "jobs", "*", "id", "nopayload"])
        .trim()
        .to_string();
    for id in ["a", "b"] {
        redis.cli(&[
            "XADD", "jobs", "*", "payload", "ok", "id", id, "reply_to", "r",
        ]);
    }
    wait_showing(
        &master,
        "the entries after it answered",
        || redis.xlen("r") >= 2,
        || format!("results: {:?}", redis.entries("r")),
    );
    let r = redis.entries("r");
    assert!(
        r.iter().all(|e| e["status"] == "ok"),
        "{r:?}\n{}",
        master.log_text()
    );
    assert_eq!(counts(&r).len(), 2, "{r:?}");
    // With batch 1 it was read and handled before them. Not acked and lost: it waits,
    // pending, for the dead-letter stream to be writable.
    assert_eq!(
        pending_ids(&redis),
        vec![stray.clone()],
        "the entry that could not be dead-lettered is not pending\n{}",
        master.log_text()
    );
    assert_eq!(pending(&redis), 1);
    // And the log says so, naming it.
    let says_so = |l: &&str| {
        let l = l.to_lowercase();
        l.contains(&stray)
            && l.contains("dead")
            && (l.contains("cannot") || l.contains("could not"))
    };
    wait_showing(
        &master,
        "the log to say it cannot dead-letter the entry",
        || master.log_text().lines().any(|l| says_so(&l)),
        String::new,
    );
    assert_eq!(redis.cli(&["GET", "jobs:dead"]).trim(), "x");
    assert_eq!(master.workers(), workers, "{}", master.log_text());
}
