//! Pools fed from Redis Streams through a consumer group, against a real `redis-server` that
//! each test starts on a Unix socket in its own temp folder (no fixed port) and stops. Skipped
//! with a message when redis-server is not installed (CI installs it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jobhost_e2e::{config_with, in_sleep_job, wait_until, Env, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use redis::Value;

/// A private redis-server, killed on drop.
struct Redis {
    child: Option<Child>,
    socket: PathBuf,
    dir: PathBuf,
}

fn have_redis() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("redis-server is not installed: skipping this Redis test");
    }
    found
}

impl Redis {
    /// Where a server for `env` listens (it need not run yet).
    fn at(env: &Env) -> Redis {
        let dir = env.path().join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        Redis {
            child: None,
            socket: dir.join("redis.sock"),
            dir,
        }
    }

    fn start(mut self) -> Redis {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_until("redis-server answers", SOON, || {
            self.try_conn()
                .is_some_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok())
        });
        self
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        self.socket.display().to_string()
    }

    fn try_conn(&self) -> Option<redis::Connection> {
        redis::Client::open(format!("unix://{}", self.socket.display()))
            .ok()?
            .get_connection()
            .ok()
    }

    fn conn(&self) -> redis::Connection {
        self.try_conn().expect("connect to the test redis-server")
    }

    /// `redis-cli -s SOCKET ARGS…`, as a person would enqueue.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every entry of `stream` as field maps.
    fn entries(&self, stream: &str) -> Vec<HashMap<String, String>> {
        let v: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.conn())
            .unwrap();
        let Value::Array(rows) = v else {
            return Vec::new();
        };
        rows.iter()
            .filter_map(|row| {
                let Value::Array(parts) = row else {
                    return None;
                };
                let Some(Value::Array(kv)) = parts.get(1) else {
                    return None;
                };
                Some(kv.chunks(2).map(|c| (text(&c[0]), text(&c[1]))).collect())
            })
            .collect()
    }

    fn xlen(&self, stream: &str) -> usize {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.conn())
            .unwrap_or(0)
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pool(plugin: &str, workers: usize, redis: &Redis, extra: &str, table: &str) -> String {
    config_with(&format!(
        "[[pool]]\nname = \"q\"\nplugin = \"{plugin}\"\nworkers = {workers}\nsource = \"redis\"\n{extra}\n[pool.redis]\nurl = \"{}\"\nstream = \"jobs\"\n{table}\n",
        redis.url()
    ))
}

/// The results on `stream`, counted per id.
fn counts(entries: &[HashMap<String, String>]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for e in entries {
        *counts.entry(e["id"].clone()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn entries_added_with_redis_cli_come_back_as_results() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let redis = Redis::at(&env).start();
    let master = env.start_master(&pool("faulty", 2, &redis, "", "results = \"out\"\n"));
    let workers = master.wait_for_workers(2);
    master.wait_for_log("redis: created group jobhost on stream jobs", SOON);
    // The consumers are named so a person can find them.
    for pid in &workers {
        wait_until("consumer registered", SOON, || {
            redis
                .cli(&["XINFO", "CONSUMERS", "jobs", "jobhost"])
                .contains(&format!(":q:{pid}"))
        });
    }
    redis.cli(&[
        "XADD", "jobs", "*", "payload", "ok", "id", "job-1", "reply_to", "mine",
    ]);
    redis.cli(&[
        "XADD", "jobs", "*", "payload", "nonsense", "id", "job-2", "reply_to", "mine",
    ]);
    redis.cli(&["XADD", "jobs", "*", "payload", "ok"]); // to `results`, under its entry id
    redis.cli(&["XADD", "jobs", "*", "id", "nopayload"]);
    wait_until("2 replies", SOON, || redis.xlen("mine") == 2);
    let mine = redis.entries("mine");
    let by_id: HashMap<&str, &HashMap<String, String>> =
        mine.iter().map(|e| (e["id"].as_str(), e)).collect();
    assert_eq!(by_id["job-1"]["status"], "ok");
    assert_eq!(by_id["job-1"]["body"], "ok");
    assert_eq!(by_id["job-2"]["status"], "failed");
    assert!(
        by_id["job-2"]["body"].contains("faulty: unknown command"),
        "{mine:?}"
    );
    wait_until("1 result on the pool's stream", SOON, || {
        redis.xlen("out") == 1
    });
    let out = redis.entries("out");
    assert!(
        out[0]["id"].contains('-'),
        "the entry id stands in for a missing id: {out:?}"
    );
    wait_until("dead letter", SOON, || redis.xlen("jobs:dead") == 1);
    let dead = redis.entries("jobs:dead");
    assert_eq!(dead[0]["reason"], "the entry has no payload field");
    assert_eq!(dead[0]["id"], "nopayload");
    // Everything acked: nothing pending.
    wait_until("no pending entries", SOON, || {
        redis
            .cli(&["XPENDING", "jobs", "jobhost"])
            .starts_with("0\n")
    });
}

#[test]
fn a_killed_worker_s_entry_is_retried_by_its_replacement_exactly_once() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("sleep");
    let redis = Redis::at(&env).start();
    let master = env.start_master(&pool("sleep", 2, &redis, "", ""));
    master.wait_for_workers(2);
    master.wait_for_log("redis: created group", SOON);
    let n = 12;
    for i in 0..n {
        redis.cli(&[
            "XADD",
            "jobs",
            "*",
            "payload",
            "300",
            "id",
            &format!("j{i}"),
            "reply_to",
            "r",
        ]);
    }
    let mut killed = 0;
    let deadline = Instant::now() + SOON;
    while killed < 2 && Instant::now() < deadline {
        if let Some(pid) = master.workers().into_iter().find(|p| in_sleep_job(*p)) {
            kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
            killed += 1;
            wait_until("replacement", SOON, || {
                master.workers().len() == 2 && !master.workers().contains(&pid)
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(killed, 2, "no busy worker to kill");
    wait_until("every result", SOON, || redis.xlen("r") >= n);
    std::thread::sleep(Duration::from_millis(500)); // room for a duplicate to show up
    let results = redis.entries("r");
    let counts = counts(&results);
    for i in 0..n {
        assert_eq!(counts.get(&format!("j{i}")), Some(&1), "j{i}: {results:?}");
    }
    assert_eq!(results.len(), n, "no duplicates: {results:?}");
    assert!(results.iter().all(|r| r["status"] == "ok"), "{results:?}");
    assert!(
        master.log_count("redis: retrying entry") >= 2,
        "{}",
        master.log_text()
    );
}

#[test]
fn an_entry_that_keeps_crashing_workers_goes_to_the_dead_letter_stream() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let redis = Redis::at(&env).start();
    let master = env.start_master(&pool("faulty", 1, &redis, "max_attempts = 3\n", ""));
    master.wait_for_workers(1);
    master.wait_for_log("redis: created group", SOON);
    redis.cli(&[
        "XADD", "jobs", "*", "payload", "segv", "id", "bad", "reply_to", "r",
    ]);
    redis.cli(&[
        "XADD", "jobs", "*", "payload", "ok", "id", "good", "reply_to", "r",
    ]);
    wait_until("dead letter", SOON, || redis.xlen("jobs:dead") == 1);
    let dead = redis.entries("jobs:dead");
    assert_eq!(
        dead[0]["reason"], "worker killed by SIGSEGV, attempt 3 of 3",
        "{dead:?}"
    );
    assert_eq!(dead[0]["payload"], "segv");
    wait_until("both answered", SOON, || redis.xlen("r") == 2);
    let r = redis.entries("r");
    let bad = r.iter().find(|e| e["id"] == "bad").unwrap();
    assert_eq!(bad["status"], "failed");
    assert_eq!(bad["body"], "worker killed by SIGSEGV, attempt 3 of 3");
    assert_eq!(
        r.iter().find(|e| e["id"] == "good").unwrap()["status"],
        "ok"
    );
    // Dead predecessors are removed from the group once their pending lists are empty.
    wait_until("only live consumers left", SOON, || {
        redis
            .cli(&["XINFO", "CONSUMERS", "jobs", "jobhost"])
            .matches(":q:")
            .count()
            <= 2
    });
}

#[test]
fn redis_down_at_start_is_retried_with_back_off_and_work_resumes_when_it_starts() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let redis = Redis::at(&env);
    let master = env.start_master(&pool("echo", 2, &redis, "", ""));
    let workers = master.wait_for_workers(2);
    master.wait_for_log(&format!("redis: cannot reach unix://{}", redis.url()), SOON);
    // Back-off, logged once per outage per worker, and no crash loop: the same two workers.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(master.workers(), workers, "{}", master.log_text());
    assert_eq!(
        master.log_count("redis: cannot reach"),
        2,
        "{}",
        master.log_text()
    );
    assert_eq!(
        master.log_count("worker started"),
        2,
        "{}",
        master.log_text()
    );
    let redis = redis.start();
    master.wait_for_log("redis: reconnected to", SOON);
    redis.cli(&[
        "XADD", "jobs", "*", "payload", "hello", "id", "x", "reply_to", "r",
    ]);
    wait_until("result", SOON, || redis.xlen("r") == 1);
    assert_eq!(redis.entries("r")[0]["body"], "hello");
    assert_eq!(master.workers(), workers);
}

#[test]
fn a_worker_stops_promptly_while_blocked_in_its_read() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let redis = Redis::at(&env).start();
    let mut master = env.start_master(&pool("echo", 2, &redis, "", ""));
    master.wait_for_workers(2);
    master.wait_for_log("redis: created group", SOON);
    std::thread::sleep(Duration::from_millis(300)); // let both block in XREADGROUP
                                                    // SIGUSR1 (reopen the log) wakes them in their read; they read on, no outage.
    master.signal(Signal::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    redis.cli(&[
        "XADD",
        "jobs",
        "*",
        "payload",
        "after-usr1",
        "reply_to",
        "r",
    ]);
    let deadline = Instant::now() + SOON;
    while redis.xlen("r") != 1 {
        assert!(
            Instant::now() < deadline,
            "no result after SIGUSR1:\n{}",
            master.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = Instant::now();
    master.signal(Signal::SIGTERM);
    assert_eq!(master.wait_exit(SOON), 0, "{}", master.log_text());
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        asked.elapsed()
    );
}

#[test]
fn a_wrong_url_is_a_clear_config_error() {
    let env = Env::new();
    env.install("echo");
    env.config(&config_with(
        "[[pool]]\nname = \"q\"\nplugin = \"echo\"\nsource = \"redis\"\n[pool.redis]\nurl = \"localhost:6379\"\nstream = \"jobs\"\n",
    ));
    env.jobhost(&["check", "-c", "jobhost.toml"])
        .assert_code(1)
        .assert_stderr_has("pool[0].redis.url: \"localhost:6379\" is not a Redis address");
}

#[test]
fn check_says_whether_redis_answers_and_the_group_exists() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let redis = Redis::at(&env);
    env.config(&pool("echo", 1, &redis, "", ""));
    env.jobhost(&["check", "-c", "jobhost.toml"])
        .assert_code(0)
        .assert_stdout_has("does not answer");
    let redis = redis.start();
    env.jobhost(&["check", "-c", "jobhost.toml"])
        .assert_code(0)
        .assert_stdout_has("answers; no stream jobs yet");
    redis.cli(&["XGROUP", "CREATE", "jobs", "jobhost", "$", "MKSTREAM"]);
    env.jobhost(&["check", "-c", "jobhost.toml"])
        .assert_code(0)
        .assert_stdout_has("answers; group jobhost on stream jobs exists");
}

#[test]
fn redis_restarted_empty_under_load_gets_its_group_back_and_every_job_is_done() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let redis = Redis::at(&env).start();
    let master = env.start_master(&pool("echo", 2, &redis, "", ""));
    let workers = master.wait_for_workers(2);
    master.wait_for_log("redis: created group", SOON);
    for i in 0..20 {
        redis.cli(&[
            "XADD",
            "jobs",
            "*",
            "payload",
            "a",
            "id",
            &format!("a{i}"),
            "reply_to",
            "r",
        ]);
    }
    wait_until("first results", SOON, || redis.xlen("r") == 20);
    let mut redis = redis;
    redis.stop();
    master.wait_for_log("redis: cannot reach", SOON);
    let redis = Redis::at(&env).start(); // empty: no persistence
    master.wait_for_log(
        "was missing (Redis came back empty?); created it again",
        SOON,
    );
    for i in 0..20 {
        redis.cli(&[
            "XADD",
            "jobs",
            "*",
            "payload",
            "b",
            "id",
            &format!("b{i}"),
            "reply_to",
            "r",
        ]);
    }
    wait_until("every result after the restart", SOON, || {
        redis.xlen("r") == 20
    });
    let counts = counts(&redis.entries("r"));
    assert!(
        (0..20).all(|i| counts.get(&format!("b{i}")) == Some(&1)),
        "{counts:?}"
    );
    assert_eq!(
        master.workers(),
        workers,
        "the workers waited, none crashed"
    );
}

#[test]
fn a_reload_under_load_fails_nothing_and_answers_each_entry_once() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("sleep");
    let redis = Redis::at(&env).start();
    let master = env.start_master(&pool("sleep", 2, &redis, "", ""));
    let old = master.wait_for_workers(2);
    master.wait_for_log("redis: created group", SOON);
    let n = 30;
    for i in 0..n {
        redis.cli(&[
            "XADD",
            "jobs",
            "*",
            "payload",
            "50",
            "id",
            &format!("j{i}"),
            "reply_to",
            "r",
        ]);
    }
    wait_until("some done", SOON, || redis.xlen("r") >= 5);
    // A changed setting makes every worker a new one.
    env.config(&pool("sleep", 2, &redis, "max_jobs = 1000", ""));
    master.signal(Signal::SIGHUP);
    wait_until("new workers", SOON, || {
        let now = master.workers();
        now.len() == 2 && now.iter().all(|p| !old.contains(p))
    });
    wait_until("every result", SOON, || redis.xlen("r") >= n);
    std::thread::sleep(Duration::from_millis(300));
    let results = redis.entries("r");
    let counts = counts(&results);
    assert!(
        (0..n).all(|i| counts.get(&format!("j{i}")) == Some(&1)),
        "{results:?}"
    );
    assert!(results.iter().all(|r| r["status"] == "ok"), "{results:?}");
}
