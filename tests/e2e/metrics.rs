//! `metrics` on the admin socket: the figures a real master shows in OpenMetrics and in the
//! Prometheus text format, checked against `status json` and `workers json`, and linted by
//! Debian's `promtool`; and the `slow_job` / `job_timeout` line that says what a worker is
//! doing.

use jobhost::protocol::Status;
use jobhost_e2e::{config_with, have, prerequisite, promtool_check, wait_until, Env, Master, SOON};

/// One line of JSON from an admin command.
fn json(master: &Master, command: &str) -> serde_json::Value {
    let reply = master.admin(command);
    serde_json::from_str(reply.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{command}: {e}: {reply}"))
}

/// The value of the sample written exactly `series` (name and labels) in an exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

fn must(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// A pool's figure from `status json`.
fn pool_figure(status: &serde_json::Value, pool: &str, key: &str) -> u64 {
    status["pools"]
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["name"] == pool))
        .and_then(|p| p[key].as_u64())
        .unwrap_or_else(|| panic!("{pool}.{key} in {status}"))
}

const POOLS: &str = "[server]\nmax_payload = 1024\n\n\
[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n\n\
[[pool]]\nname = \"faulty\"\nplugin = \"faulty\"\nworkers = 1\nmax_jobs = 2\nmax_attempts = 1\n";

#[test]
fn metrics_count_what_status_counts_and_promtool_accepts_them() {
    let env = Env::new();
    env.install("echo");
    env.install("faulty");
    let master = env.start_master(&config_with(POOLS));
    master.wait_for_workers(3);

    let mut client = master.client();
    for i in 0..20u64 {
        client
            .send(i, "echo", format!("job {i}").as_bytes())
            .unwrap();
    }
    client.send(100, "echo", &[b'x'; 2000]).unwrap(); // over max_payload
    client.send(101, "nope", b"x").unwrap();
    // Two jobs recycle the faulty worker (max_jobs 2); a third crashes its successor.
    client.send(200, "faulty", b"ok").unwrap();
    client.send(201, "faulty", b"ok").unwrap();
    client.send(202, "faulty", b"segv").unwrap();
    client.flush().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..25 {
        statuses.push(client.recv().unwrap().status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == Status::Rejected).count(),
        2
    );
    assert_eq!(statuses.iter().filter(|s| **s == Status::Failed).count(), 1);
    wait_until("the crash to be counted", SOON, || {
        pool_figure(&json(&master, "status json"), "faulty", "crashes") == 1
    });
    master.wait_for_workers(3);

    let reply = master.admin("metrics");
    assert!(reply.ends_with("# EOF\nOK\n"), "{reply}");
    let om = reply.trim_end_matches("OK\n");
    let status = json(&master, "status json");
    let workers = json(&master, "workers json");

    // Per pool, as status counts.
    assert_eq!(
        must(om, "jobhost_pool_jobs_submitted_total{pool=\"echo\"}"),
        20.0
    );
    for (family, key) in [
        ("jobhost_pool_jobs_completed_total", "jobs_done"),
        ("jobhost_pool_jobs_failed_total", "jobs_failed"),
        ("jobhost_pool_jobs_retried_total", "jobs_retried"),
        ("jobhost_pool_jobs_queued", "jobs_queued"),
        ("jobhost_pool_workers_wanted", "workers_wanted"),
    ] {
        for pool in ["echo", "faulty"] {
            let series = format!("{family}{{pool=\"{pool}\"}}");
            assert_eq!(
                must(om, &series),
                pool_figure(&status, pool, key) as f64,
                "{series}"
            );
        }
    }
    assert_eq!(
        must(om, "jobhost_pool_jobs_completed_total{pool=\"echo\"}"),
        20.0
    );
    assert_eq!(
        must(
            om,
            "jobhost_pool_jobs_rejected_total{pool=\"echo\",reason=\"too_large\"}"
        ),
        1.0
    );
    assert_eq!(must(om, "jobhost_jobs_rejected_unknown_pool_total"), 1.0);
    assert_eq!(
        must(om, "jobhost_job_duration_seconds_count{pool=\"echo\"}"),
        20.0
    );
    assert_eq!(
        must(
            om,
            "jobhost_job_duration_seconds_bucket{pool=\"echo\",le=\"+Inf\"}"
        ),
        20.0
    );
    assert_eq!(
        must(om, "jobhost_job_queue_wait_seconds_count{pool=\"echo\"}"),
        20.0
    );
    assert!(must(om, "jobhost_pool_busy_seconds_total{pool=\"echo\"}") > 0.0);
    assert_eq!(
        must(
            om,
            "jobhost_pool_worker_exits_total{pool=\"faulty\",reason=\"recycle_max_jobs\"}"
        ),
        1.0
    );
    assert_eq!(
        must(
            om,
            "jobhost_pool_worker_exits_total{pool=\"faulty\",reason=\"crash\"}"
        ),
        1.0
    );
    assert_eq!(
        must(om, "jobhost_pool_workers{pool=\"echo\",state=\"idle\"}"),
        2.0
    );
    assert_eq!(
        must(om, "jobhost_pool_state{pool=\"echo\",state=\"ok\"}"),
        1.0
    );
    assert_eq!(must(om, "jobhost_pool_busy_ratio{pool=\"echo\"}"), 0.0);
    // Per worker: its own memory, as `workers json` measures it (both read /proc; close).
    for w in workers["workers"].as_array().expect("workers") {
        let (pid, pool) = (w["pid"].as_i64().unwrap(), w["pool"].as_str().unwrap());
        let series =
            format!("jobhost_worker_memory_bytes{{pool=\"{pool}\",pid=\"{pid}\",kind=\"own\"}}");
        let shown = must(om, &series);
        let measured = w["own_bytes"].as_f64().unwrap();
        assert!(
            (shown - measured).abs() <= measured * 0.5 + 1e6,
            "{series}: {shown} vs {measured}"
        );
    }
    // The master.
    assert!(must(om, "process_resident_memory_bytes") > 1e6);
    assert!(must(om, "process_open_fds") >= 5.0);
    assert_eq!(must(om, "jobhost_clients"), 1.0);
    assert_eq!(must(om, "jobhost_reloads_total{result=\"ok\"}"), 0.0);
    // The crash is among status's recent problems, with its reason.
    let recent = status["recent"].as_array().expect("recent");
    assert!(
        recent.iter().any(|e| e["kind"] == "crash"
            && e["pool"] == "faulty"
            && e["reason"].as_str().unwrap_or("").contains("SIGSEGV")),
        "{status}"
    );

    // A failed reload: counted, timed, remembered.
    env.config(&config_with(
        &POOLS.replace("workers = 2", "workers = many"),
    ));
    let reply = master.admin("reload");
    assert!(reply.starts_with("ERR reload failed"), "{reply}");
    let om = master.admin("metrics");
    assert_eq!(must(&om, "jobhost_reloads_total{result=\"failed\"}"), 1.0);
    assert_eq!(must(&om, "jobhost_last_reload_success"), 0.0);
    let at = must(&om, "jobhost_last_reload_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - at).abs() < 120.0, "{at} vs {now}");
    let status = json(&master, "status json");
    assert_eq!(status["recent"][0]["kind"], "reload-failed", "{status}");

    // The older text format passes Debian's linter (it reads only that one).
    if prerequisite(
        have("promtool"),
        "promtool (Debian's prometheus package) is not installed",
    ) {
        let text = master.admin("metrics prometheus");
        let text = text.strip_suffix("OK\n").expect("ends with OK");
        assert!(!text.contains("# EOF"));
        let (ok, said) = promtool_check(text);
        assert!(ok, "promtool check metrics: {said}\n{text}");
        // And it is a linter that can fail: a counter without its help is refused.
        let (ok, _) = promtool_check("# TYPE jobhost_x_total counter\njobhost_x_total 1\n");
        assert!(!ok);
    }
}

/// `slow_job`: one line per job once it runs that long, saying what its worker is doing;
/// the same line when `job_timeout` kills it.
#[test]
fn a_slow_job_and_a_job_killed_at_its_timeout_are_logged_with_what_the_worker_does() {
    let env = Env::new();
    env.install("sleep");
    let pools = "[[pool]]\nname = \"slow\"\nplugin = \"sleep\"\nworkers = 1\nslow_job = \"1s\"\n\n\
        [[pool]]\nname = \"hung\"\nplugin = \"sleep\"\nworkers = 1\njob_timeout = \"1s\"\nmax_attempts = 1\n";
    let master = env.start_master(&config_with(pools));
    master.wait_for_workers(2);
    let mut client = master.client();
    client.send(7, "slow", b"3000").unwrap();
    client.send(8, "hung", b"60000").unwrap();
    client.flush().unwrap();
    let mut answers: Vec<_> = (0..2).map(|_| client.recv().unwrap()).collect();
    answers.sort_by_key(|r| r.id);
    assert_eq!(answers[0].status, Status::Ok, "{}", answers[0].text());
    assert_eq!(answers[1].status, Status::Failed, "{}", answers[1].text());
    let log = master.log_text();
    let slow: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("slow job: pool slow"))
        .collect();
    assert_eq!(slow.len(), 1, "once per job:\n{log}");
    assert!(slow[0].contains("job 1 (client "), "{}", slow[0]);
    assert!(
        slow[0].contains("'s id 7), 4 bytes, running for 1."),
        "{}",
        slow[0]
    );
    assert!(slow[0].contains(": sleeping in "), "{}", slow[0]);
    let killed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("job past job_timeout 1s: pool hung"))
        .collect();
    assert_eq!(killed.len(), 1, "{log}");
    assert!(
        killed[0].contains("'s id 8), 5 bytes, running for 1."),
        "{}",
        killed[0]
    );
    assert!(killed[0].contains(": sleeping in "), "{}", killed[0]);
}

/// A job blocked reading a socket is logged as such, with the peer's address — the line that
/// tells a hung crawl from a slow one.
#[test]
fn a_job_blocked_in_read_on_a_socket_is_logged_with_the_peer_address() {
    let env = Env::new();
    env.install("faulty");
    let pools =
        "[[pool]]\nname = \"faulty\"\nplugin = \"faulty\"\nworkers = 1\nslow_job = \"500ms\"\n";
    let master = env.start_master(&config_with(pools));
    master.wait_for_workers(1);
    // A peer that accepts and says nothing until told to hang up.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = peer.local_addr().unwrap();
    let mut client = master.client();
    client
        .send(3, "faulty", format!("hang-read {addr}").as_bytes())
        .unwrap();
    client.flush().unwrap();
    let (conn, _) = peer.accept().unwrap();
    let wanted = format!("blocked in read on socket {addr}");
    wait_until("the slow-job line", SOON, || {
        master
            .log_text()
            .lines()
            .any(|l| l.contains("slow job: pool faulty") && l.contains(&wanted))
    });
    drop(conn);
    let result = client.recv().unwrap();
    assert_eq!(result.status, Status::Ok, "{}", result.text());
    assert_eq!(master.log_count("slow job: pool faulty"), 1);
}
