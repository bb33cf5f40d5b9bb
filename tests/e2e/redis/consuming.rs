//! Consuming: results, retries, dead letters, outages, stop and reload.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jobhost_e2e::{config_with, in_sleep_job, wait_until, Env, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{counts, have_redis, pool, Redis};

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

/// XADDs `entries` (`(id, payload)`) to `jobs` in one MULTI/EXEC, so that a worker blocked in
/// its read gets them in one batch.
fn add_at_once(redis: &Redis, entries: &[(&str, &str)], extra: &[(&str, &str)]) {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (id, payload) in entries {
        let cmd = pipe.cmd("XADD").arg("jobs").arg("*");
        cmd.arg("id").arg(*id).arg("payload").arg(*payload);
        for (k, v) in extra {
            cmd.arg(*k).arg(*v);
        }
        cmd.ignore();
    }
    pipe.query::<()>(&mut redis.conn()).unwrap();
}

#[test]
fn in_a_batch_only_the_entry_that_crashes_workers_uses_up_attempts() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let redis = Redis::at(&env).start();
    let master = env.start_master(&pool(
        "faulty",
        1,
        &redis,
        "max_attempts = 2\n",
        "batch = 5\nresults = \"out\"\n",
    ));
    master.wait_for_workers(1);
    master.wait_for_log("redis: created group", SOON);
    // The poison sits in the middle of one batch: the entries before it ran (their results
    // not yet written when it crashed the worker), those after it never started.
    let batch = [
        ("a0", "ok"),
        ("a1", "ok"),
        ("poison", "segv"),
        ("a3", "ok"),
        ("a4", "ok"),
    ];
    add_at_once(&redis, &batch, &[]);
    wait_until("the poison dead-lettered", SOON, || {
        redis.xlen("jobs:dead") == 1
    });
    wait_until("4 results and the poison's", SOON, || {
        redis.xlen("out") >= 5
    });
    std::thread::sleep(Duration::from_millis(500)); // room for a duplicate to show up
    let dead = redis.entries("jobs:dead");
    assert_eq!(dead.len(), 1, "only the poison: {dead:?}");
    assert_eq!(dead[0]["id"], "poison");
    assert!(
        dead[0]["reason"].contains("SIGSEGV, attempt 2 of 2"),
        "{dead:?}"
    );
    let out = redis.entries("out");
    let counts = counts(&out);
    for id in ["a0", "a1", "a3", "a4", "poison"] {
        assert_eq!(counts.get(id), Some(&1), "{id}: {out:?}");
    }
    for r in &out {
        let ok = r["id"] != "poison";
        assert_eq!(r["status"] == "ok", ok, "{r:?}");
    }
    wait_until("nothing pending", SOON, || {
        redis
            .cli(&["XPENDING", "jobs", "jobhost"])
            .starts_with("0\n")
    });
}

#[test]
fn a_stopping_worker_hands_back_the_entries_it_read_but_did_not_start() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("sleep");
    let redis = Redis::at(&env).start();
    let config = pool("sleep", 1, &redis, "", "batch = 10\nresults = \"out\"\n");
    let mut master = env.start_master(&config);
    let worker = master.wait_for_workers(1)[0];
    master.wait_for_log("redis: created group", SOON);
    let ids: Vec<String> = (0..10).map(|i| format!("j{i}")).collect();
    let batch: Vec<(&str, &str)> = ids.iter().map(|id| (id.as_str(), "400")).collect();
    add_at_once(&redis, &batch, &[]);
    wait_until("the first job running", SOON, || in_sleep_job(worker));
    master.signal(Signal::SIGTERM);
    assert_eq!(master.wait_exit(SOON), 0, "{}", master.log_text());
    // It finished what it was running, wrote that result, and gave the rest back at once:
    // nothing is left pending for claim_idle, and it left the group.
    let done = redis.xlen("out");
    assert!((1..10).contains(&done), "{done} results");
    let log = master.log_text();
    assert!(
        log.contains(&format!(
            "handed {} entries read but not started back",
            10 - done
        )),
        "{log}"
    );
    assert!(redis
        .cli(&["XPENDING", "jobs", "jobhost"])
        .starts_with("0\n"));
    assert_eq!(
        redis.cli(&["XINFO", "CONSUMERS", "jobs", "jobhost"]).trim(),
        "",
        "the worker removed itself from the group"
    );
    // The next master runs the rest: every entry answered once, under its own id.
    let _again = env.start_master(&config);
    wait_until("every result", SOON, || redis.xlen("out") >= 10);
    std::thread::sleep(Duration::from_millis(500));
    let out = redis.entries("out");
    let counts = counts(&out);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id}: {out:?}");
    }
}

#[test]
fn status_shows_the_stream_and_a_lost_connection_with_its_reason() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let mut redis = Redis::at(&env).start();
    let master = env.start_master(&config_with(&format!(
        "[[pool]]\nname = \"local\"\nplugin = \"echo\"\nworkers = 1\n\n[[pool]]\nname = \"q\"\nplugin = \"echo\"\nworkers = 2\nsource = \"redis\"\n[pool.redis]\nurl = \"{}\"\nstream = \"jobs\"\nresults = \"out\"\nbatch = 8\n",
        redis.url()
    )));
    master.wait_for_workers(3);
    let entries: Vec<(String, String)> = (0..40)
        .map(|i| (format!("e{i}"), format!("p{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = entries
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    add_at_once(&redis, &refs, &[]);
    wait_until("40 results", SOON, || redis.xlen("out") == 40);
    let want = "q: redis ";
    wait_until("status shows the stream at rest", SOON, || {
        let status = master.admin("status");
        status.contains(want)
            && status.contains("stream jobs group jobhost: connected; length 40, pending 0, lag 0")
    });
    let status = master.admin("status");
    let row = status
        .lines()
        .find(|l| l.starts_with("q "))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(
        row.split_whitespace().any(|c| c == "40"),
        "40 done: {status}"
    );
    let json = master.admin("status json");
    assert!(json.contains("\"stream_length\":40"), "{json}");
    // The same figures in `metrics`, per source.
    let metrics = master.admin("metrics");
    for line in [
        "jobhost_source_up{pool=\"q\",kind=\"redis\"} 1\n",
        "jobhost_source_state{pool=\"q\",kind=\"redis\",state=\"connected\"} 1\n",
        "jobhost_source_length{pool=\"q\",kind=\"redis\"} 40\n",
        "jobhost_source_lag{pool=\"q\",kind=\"redis\"} 0\n",
        "jobhost_source_pending{pool=\"q\",kind=\"redis\"} 0\n",
        "jobhost_source_workers_connected{pool=\"q\"} 2\n",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    assert!(
        !metrics.contains("jobhost_pool_jobs_submitted_total{pool=\"q\"}"),
        "a redis pool's jobs are not submitted to the master"
    );

    redis.stop();
    wait_until("status says disconnected, with the reason", SOON, || {
        let status = master.admin("status");
        status.contains("group jobhost: disconnected (")
    });
    let metrics = master.admin("metrics");
    assert!(
        metrics.contains("jobhost_source_up{pool=\"q\",kind=\"redis\"} 0\n")
            && metrics.contains(
                "jobhost_source_state{pool=\"q\",kind=\"redis\",state=\"disconnected\"} 1\n"
            ),
        "{metrics}"
    );
    // The other pool is not affected.
    let mut client = master.client();
    let result = client.call("local", b"still here").unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(result.text(), "still here");
    // Once per outage per worker, not once per attempt (the back-off retries many times).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        master.log_count("redis: cannot reach"),
        2,
        "{}",
        master.log_text()
    );

    let redis = Redis::at(&env).start();
    wait_until("connected again", SOON, || {
        master.admin("status").contains("group jobhost: connected")
    });
    add_at_once(
        &redis,
        &[("after", "back")],
        &[("reply_to", "mine"), ("reply_ttl", "5000")],
    );
    wait_until("a result after the outage", SOON, || {
        redis.xlen("mine") == 1
    });
    // The reply stream expires by itself (its submitter may be gone).
    let ttl: i64 = redis::cmd("PTTL")
        .arg("mine")
        .query(&mut redis.conn())
        .unwrap();
    assert!((1..=5000).contains(&ttl), "PTTL {ttl}");
}

/// `slow_job` on a Redis-fed pool: the job runs in the worker, unseen by the master but for its
/// slot; it is logged once, not at every look at the slot (whose time is in milliseconds).
#[test]
fn a_slow_stream_entry_is_logged_once_with_what_its_worker_does() {
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
        "slow_job = \"500ms\"\njob_timeout = \"60s\"",
        "results = \"out\"",
    ));
    master.wait_for_workers(1);
    add_at_once(&redis, &[("e1", "3000")], &[]);
    wait_until("its result", SOON, || redis.xlen("out") == 1);
    let log = master.log_text();
    let slow: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("slow job: pool q"))
        .collect();
    assert_eq!(slow.len(), 1, "once:\n{log}");
    // The entry's id, and what the worker was doing at that moment (mostly sleeping; it may
    // be caught reporting progress, or reading the stream's figures).
    assert!(slow[0].contains(", job 1"), "{}", slow[0]);
    let doing = slow[0]
        .split_once("running for ")
        .map_or("", |(_, rest)| rest);
    assert!(
        [
            "sleeping in",
            "running on a CPU",
            "blocked in",
            "waiting",
            "in user space"
        ]
        .iter()
        .any(|w| doing.contains(&format!(": {w}"))),
        "{}",
        slow[0]
    );
}
