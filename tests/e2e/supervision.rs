//! The master supervises real forked workers: preload then fork, replace what dies (with
//! back-off when it keeps dying), kill what hangs, recycle what grows — and stays up.

use std::time::{Duration, Instant};

use jobhost::protocol::Status;
use jobhost_e2e::{
    children_of, config_with, in_sleep_job, is_alive, recv_n, wait_until, Env, Master, SOON,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn sigkill(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill -9");
}

#[test]
fn preloads_then_forks_the_configured_workers_which_answer_jobs() {
    let env = Env::new();
    env.install("echo");
    env.install("hash");
    env.install("lookup");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n\n[[pool]]\nname = \"hash\"\nplugin = \"hash\"\nworkers = 3\n\n\
         [[pool]]\nname = \"lookup\"\nplugin = \"lookup\"\nworkers = 2\n[pool.settings]\ntable_mib = 1\n",
    ));
    let workers = master.wait_for_workers(7);
    // Each worker is a direct child of the master, in its own process group.
    for pid in &workers {
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(*pid))).unwrap();
        assert_eq!(
            pgid.as_raw(),
            *pid,
            "worker {pid} leads its own process group"
        );
    }
    let mut client = master.client();
    assert_eq!(client.call("echo", b"hello").unwrap().body, b"hello");
    let hashed = client.call("hash", b"abc").unwrap();
    assert_eq!(hashed.status, Status::Ok);
    assert_eq!(
        hashed.text(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // The plugins were initialised in the master, before the fork: once each, in its log.
    assert_eq!(master.log_count("pool echo: plugin echo 0.1.0"), 1);
    // And `init` ran in the master only (after its probe): lookup builds its table in init and
    // logs it, with the pid of whoever ran it. Every worker answers from that one table.
    for pid in &workers {
        master.wait_for_log(&format!("jobhost[{pid}] "), SOON);
    }
    for key in 0..20u32 {
        let r = client.call("lookup", key.to_string().as_bytes()).unwrap();
        assert!(
            r.text().starts_with(&format!("key={key} index={key} ")),
            "{}",
            r.text()
        );
    }
    let built: Vec<String> = master
        .log_text()
        .lines()
        .filter(|l| l.contains("lookup: built a 1 MiB table"))
        .map(str::to_owned)
        .collect();
    let in_master = format!("jobhost[{}] master: ", master.pid());
    assert_eq!(
        built.iter().filter(|l| l.contains(&in_master)).count(),
        1,
        "init in the master once: {built:#?}"
    );
    for pid in &workers {
        assert!(
            !built
                .iter()
                .any(|l| l.contains(&format!("jobhost[{pid}] "))),
            "init ran again in worker {pid}: {built:#?}"
        );
    }
    assert_eq!(
        built.len(),
        2,
        "the probe's init and the master's: {built:#?}"
    );
}

/// What each fd of `pid` points at, e.g. `socket:[1234]`, by fd number.
fn fds_of(pid: &str) -> Vec<(u32, String)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, std::fs::read_link(e.path()).ok()?.display().to_string()))
        })
        .collect()
}

#[test]
fn workers_hold_none_of_the_masters_fds() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 3\n",
    ));
    let workers = master.wait_for_workers(3);
    // Past fork, each closes the master's fds before worker_start; it logs once it has.
    for pid in &workers {
        master.wait_for_log(&format!("jobhost[{pid}] echo: worker started"), SOON);
    }
    // What the master opened itself: everything but stdio and what it inherited from us.
    let inherited: Vec<String> = fds_of("self").into_iter().map(|(_, t)| t).collect();
    let masters_own: Vec<String> = fds_of(&master.pid().to_string())
        .into_iter()
        .filter(|(fd, target)| *fd > 2 && !inherited.contains(target))
        .map(|(_, t)| t)
        .collect();
    assert!(
        masters_own.contains(&"anon_inode:[eventpoll]".to_string()),
        "{masters_own:?}"
    );
    assert!(
        masters_own
            .iter()
            .filter(|t| t.starts_with("socket:"))
            .count()
            >= 4,
        "listener + 3 channels: {masters_own:?}"
    );
    for pid in workers {
        let fds = fds_of(&pid.to_string());
        let leaked: Vec<&String> = fds
            .iter()
            .map(|(_, t)| t)
            .filter(|t| masters_own.contains(t))
            .collect();
        assert!(
            leaked.is_empty(),
            "worker {pid} holds the master's {leaked:?}"
        );
        let sockets = fds.iter().filter(|(_, t)| t.starts_with("socket:")).count();
        assert_eq!(
            sockets, 1,
            "worker {pid} holds only its own channel: {fds:?}"
        );
    }
}

#[test]
fn a_worker_killed_with_sigkill_is_replaced() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n",
    ));
    let before = master.wait_for_workers(2);
    sigkill(before[0]);
    wait_until("a replacement worker", SOON, || {
        let now = master.workers();
        now.len() == 2 && !now.contains(&before[0])
    });
    master.wait_for_log(
        &format!("worker {} (pool echo, generation 1", before[0]),
        SOON,
    );
    assert!(
        master.log_text().contains("crashed: killed by SIGKILL"),
        "{}",
        master.log_text()
    );
    assert_eq!(
        master.client().call("echo", b"still here").unwrap().body,
        b"still here"
    );
}

#[test]
fn a_panic_is_an_error_and_the_worker_lives_on() {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 1\n",
    ));
    let before = master.wait_for_workers(1);
    let mut client = master.client();
    let result = client.call("f", b"panic").unwrap();
    assert_eq!(result.status, Status::Failed);
    assert!(
        result.text().starts_with("plugin panicked in handle at "),
        "{}",
        result.text()
    );
    assert_eq!(client.call("f", b"ok").unwrap().body, b"ok");
    assert_eq!(master.workers(), before, "the same worker serves on");
}

/// Sends `payload` to a 2-worker `faulty` pool with max_attempts 3: the job must come back
/// failed with `reason`, each crashed worker replaced, the master up.
fn crashing_job(payload: &str, reason: &str) {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 2\nmax_attempts = 3\n",
    ));
    master.wait_for_workers(2);
    let result = master.client().call("f", payload.as_bytes()).unwrap();
    assert_eq!(result.status, Status::Failed, "{}", result.text());
    assert_eq!(result.text(), format!("{reason}, attempt 3 of 3"));
    assert_eq!(master.log_count("retrying job"), 2, "{}", master.log_text());
    master.wait_for_workers(2);
    assert_eq!(master.client().call("f", b"ok").unwrap().body, b"ok");
}

#[test]
fn a_segfault_costs_the_worker_and_the_job_is_retried_then_failed() {
    crashing_job("segv", "worker killed by SIGSEGV");
}

#[test]
fn an_abort_costs_the_worker_and_the_job_is_retried_then_failed() {
    crashing_job("abort", "worker killed by SIGABRT");
}

#[test]
fn an_exit_costs_the_worker_and_the_job_is_retried_then_failed() {
    crashing_job("exit", "worker exited with status 42");
}

/// The grace a worker gets between SIGTERM and SIGKILL once its job passed job_timeout.
pub const KILL_GRACE: Duration = Duration::from_secs(3);
/// What a loaded machine may add to that before the answer reaches the client.
pub const TIMEOUT_SLACK: Duration = Duration::from_secs(2);

#[test]
fn a_hung_job_gets_its_worker_killed_after_job_timeout() {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 1\nmax_attempts = 1\njob_timeout = \"1s\"\n",
    ));
    let before = master.wait_for_workers(1);
    let mut client = master.client();
    let sent = Instant::now();
    let result = client.call("f", b"hang").unwrap();
    let took = sent.elapsed();
    // Failed, never "ok"; at its timeout (plus the kill grace), not whenever the master
    // next happens to look.
    assert_eq!(result.status, Status::Failed, "{}", result.text());
    assert!(
        result.text().starts_with("job timed out after 1s"),
        "{}",
        result.text()
    );
    assert!(
        took >= Duration::from_secs(1)
            && took <= Duration::from_secs(1) + KILL_GRACE + TIMEOUT_SLACK,
        "a hung job with job_timeout 1s was answered after {took:?}"
    );
    assert!(master
        .log_text()
        .contains("job ran past job_timeout 1s; SIGTERM, SIGKILL in 3s"));
    wait_until("a replacement worker", SOON, || {
        master.workers().len() == 1 && master.workers() != before
    });
    assert!(!is_alive(before[0]));
}

#[test]
fn a_worker_whose_rss_passes_max_rss_is_recycled() {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 1\nmax_rss = \"64MiB\"\n",
    ));
    let before = master.wait_for_workers(1);
    let mut client = master.client();
    assert_eq!(
        client.call("f", b"leak 100").unwrap().text(),
        "leaked 100 MiB"
    );
    // The next job finds a fresh worker: the old one recycled itself before taking it.
    assert_eq!(client.call("f", b"ok").unwrap().body, b"ok");
    master.wait_for_log("recycled (max_rss reached)", SOON);
    assert!(
        master
            .log_text()
            .contains("recycling after 1 jobs: max_rss: its own memory 1"),
        "{}",
        master.log_text()
    );
    wait_until("a replacement worker", SOON, || {
        master.workers().len() == 1 && master.workers() != before
    });
}

#[test]
fn a_worker_is_recycled_after_max_jobs_and_no_job_is_lost() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 2\nmax_jobs = 5\n",
    ));
    master.wait_for_workers(2);
    let mut client = master.client();
    for i in 0..40u64 {
        client.send(i, "e", format!("job {i}").as_bytes()).unwrap();
    }
    let mut seen: Vec<u64> = (0..40)
        .map(|_| client.recv().unwrap())
        .inspect(|r| assert!(r.is_ok()))
        .map(|r| r.id)
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..40).collect::<Vec<_>>());
    // Each recycled worker ran exactly 5 jobs; the last two may hold up to 4 each.
    wait_until("6 recycles", SOON, || {
        master.log_count("recycled (max_jobs reached)") >= 6
    });
}

#[test]
fn a_crash_loop_backs_off_and_marks_the_pool_failing() {
    let env = Env::new();
    let master = crash_looping_pool(&env, "3s");
    let started = Instant::now();
    master.wait_for_log(
        "pool f is failing: 5 crashes within 60s; trying one worker every 3s",
        SOON,
    );
    let took = started.elapsed();
    // One worker: 100 + 200 + 400 + 800 ms between forks before the 5th crash.
    assert!(
        took >= Duration::from_millis(1400),
        "5 crashes in {took:?}: no back-off"
    );
    for delay in ["100ms", "200ms", "400ms", "800ms"] {
        assert!(
            master
                .log_text()
                .contains(&format!("next worker in {delay} (crash back-off)")),
            "{}",
            master.log_text()
        );
    }
    // Failing: no new fork in the second and a half after it said so (the window starts once
    // the 5th crash is in; the retry is 3 s away) ...
    let failing_since = Instant::now();
    let crashes = master.log_count("crashed: killed by SIGSEGV");
    let window_end = failing_since + Duration::from_millis(1500);
    while Instant::now() < window_end {
        assert_eq!(
            master.log_count("crashed: killed by SIGSEGV"),
            crashes,
            "forked while failing, {:?} after it said so",
            failing_since.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(crashes <= 6, "{crashes} crashes");
    let status = master.admin("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("f ") && l.contains(" failing ")),
        "{status}"
    );
    // ... and then failing_retry does try one worker, once per failing_retry.
    wait_until("the failing pool's retry", SOON, || {
        master.log_count("crashed: killed by SIGSEGV") > crashes
    });
    let retried_after = failing_since.elapsed();
    assert!(
        retried_after >= Duration::from_millis(2500),
        "retried {retried_after:?} after failing, not after failing_retry 3s"
    );
    assert_eq!(master.log_count("crashed: killed by SIGSEGV"), crashes + 1);
}

/// A pool whose every worker segfaults in worker_start (a crash loop) becomes failing.
fn crash_looping_pool(env: &Env, failing_retry: &str) -> Master {
    env.install("faulty");
    env.start_master(&config_with(&format!(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 1\ncrash_limit = 5\ncrash_window = \"60s\"\nfailing_retry = \"{failing_retry}\"\n[pool.settings]\nworker_start = \"segv\"\n"
    )))
}

#[test]
fn start_and_restart_clear_a_failing_pools_crash_history() {
    let env = Env::new();
    // failing_retry is far away: only a cleared history can fork again soon.
    let master = crash_looping_pool(&env, "300s");
    let failing = "pool f is failing: 5 crashes within 60s";
    let first_backoff = "pool f: next worker in 100ms (crash back-off)";
    master.wait_for_log(failing, SOON);
    assert_eq!(master.log_count(first_backoff), 1);
    // `start`: the crashes are forgotten, a worker is forked at once, and its crash is the
    // first of a new history (100 ms again, then failing again after five).
    assert!(master.admin("start f").ends_with("OK\n"));
    wait_until("a fork at once after start", Duration::from_secs(5), || {
        master.log_count(first_backoff) == 2
    });
    wait_until("failing again", SOON, || master.log_count(failing) == 2);
    // `restart` clears it too.
    let reply = master.admin("restart f");
    assert!(reply.ends_with("OK\n"), "{reply}");
    wait_until(
        "a fork at once after restart",
        Duration::from_secs(5),
        || master.log_count(first_backoff) == 3,
    );
}

#[test]
fn killing_workers_that_already_finished_jobs_is_not_a_crash_loop() {
    // crash_limit 3: were these kills counted as crash-loop evidence, the pool would be
    // backing off after the first and failing (a 30 s wait) after the third.
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 1\ncrash_limit = 3\ncrash_window = \"60s\"\nfailing_retry = \"30s\"\n",
    ));
    let mut worker = master.wait_for_workers(1)[0];
    let mut client = master.client();
    for round in 0..5 {
        // The worker has finished a job: whatever kills it now is not a start-up crash.
        let payload = format!("round {round}");
        assert_eq!(
            client.call("e", payload.as_bytes()).unwrap().text(),
            payload
        );
        sigkill(worker);
        let killed = Instant::now();
        wait_until(
            &format!("a replacement within 1 s of kill {}", round + 1),
            Duration::from_secs(1),
            || {
                let now = master.workers();
                now.len() == 1 && now[0] != worker
            },
        );
        eprintln!("kill {}: replaced in {:?}", round + 1, killed.elapsed());
        worker = master.workers()[0];
        let status = master.admin("status");
        let row = status.lines().find(|l| l.starts_with("e ")).unwrap();
        assert!(row.contains(" ok "), "after kill {}: {row}", round + 1);
    }
    assert_eq!(
        master.log_count("crash back-off"),
        0,
        "{}",
        master.log_text()
    );
}

#[test]
fn a_crashed_workers_prefetched_jobs_are_requeued_untouched() {
    // One worker holds all four jobs (a worker is sent at least 4 ahead); it is killed in the
    // first. The first is retried (one attempt used), the three it held but never started
    // go back to the queue as they were: all four answered ok, one retry, none failed.
    let env = Env::new();
    env.install("sleep");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\nmax_attempts = 3\n",
    ));
    let worker = master.wait_for_workers(1)[0];
    let mut client = master.client_with_timeout(SOON);
    client.send(0, "s", b"3000").unwrap();
    for id in 1..4u64 {
        client.send(id, "s", b"10").unwrap();
    }
    client.flush().unwrap();
    wait_until(
        "the first job running, the rest held by its worker",
        SOON,
        || {
            let pool = &pool_json(&master)[0];
            in_sleep_job(worker) && pool["jobs_queued"] == 0 && pool["jobs_done"] == 0
        },
    );
    sigkill(worker);
    let mut results = recv_n(&mut client, 4);
    results.sort_by_key(|r| r.id);
    let answers: Vec<(u64, Status, String)> =
        results.iter().map(|r| (r.id, r.status, r.text())).collect();
    assert_eq!(
        answers,
        [
            (0, Status::Ok, "slept 3000".to_string()),
            (1, Status::Ok, "slept 10".to_string()),
            (2, Status::Ok, "slept 10".to_string()),
            (3, Status::Ok, "slept 10".to_string()),
        ]
    );
    let pool = &pool_json(&master)[0];
    assert_eq!(
        (
            pool["jobs_done"].as_u64(),
            pool["jobs_retried"].as_u64(),
            pool["jobs_failed"].as_u64()
        ),
        (Some(4), Some(1), Some(0)),
        "{pool}"
    );
    assert_eq!(master.log_count("retrying job"), 1, "{}", master.log_text());
}

/// The pool rows of `status json`.
fn pool_json(master: &Master) -> Vec<serde_json::Value> {
    let doc: serde_json::Value =
        serde_json::from_str(master.admin("status json").lines().next().unwrap()).unwrap();
    doc["pools"].as_array().unwrap().clone()
}

#[test]
fn scale_down_and_ttou_stop_idle_workers_before_busy_ones() {
    let env = Env::new();
    env.install("sleep");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 3\n",
    ));
    let workers = master.wait_for_workers(3);
    let mut client = master.client();
    client.send(1, "s", b"6000").unwrap();
    client.flush().unwrap();
    let mut busy = None;
    wait_until("the job to be running", SOON, || {
        busy = workers.iter().copied().find(|p| in_sleep_job(*p));
        busy.is_some()
    });
    let busy = busy.unwrap();
    let idle: Vec<i32> = workers.iter().copied().filter(|p| *p != busy).collect();
    // `scale` to 2: an idle worker leaves, the busy one keeps running its job.
    assert!(master.admin("scale s 2").ends_with("OK\n"));
    wait_until("an idle worker to leave after scale", SOON, || {
        idle.iter().filter(|p| is_alive(**p)).count() == 1
    });
    assert!(in_sleep_job(busy), "scale stopped the busy worker");
    // TTOU: the other idle one.
    master.signal(Signal::SIGTTOU);
    wait_until("the other idle worker to leave after TTOU", SOON, || {
        idle.iter().all(|p| !is_alive(*p))
    });
    assert!(in_sleep_job(busy), "TTOU stopped the busy worker");
    let r = client.recv().unwrap();
    assert_eq!((r.status, r.text().as_str()), (Status::Ok, "slept 6000"));
    assert_eq!(master.workers(), [busy], "the busy worker serves on");
}

#[test]
fn dispatch_never_hands_a_worker_more_jobs_than_max_jobs_lets_it_run() {
    // max_jobs 2: the worker may hold two jobs; a third stays queued (a worker would
    // otherwise recycle holding it), and runs on the replacement.
    let env = Env::new();
    env.install("sleep");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\nmax_jobs = 2\n",
    ));
    let first = master.wait_for_workers(1)[0];
    let mut client = master.client();
    client.send(0, "s", b"1500").unwrap();
    client.send(1, "s", b"10").unwrap();
    client.send(2, "s", b"10").unwrap();
    client.flush().unwrap();
    wait_until("the first job running", SOON, || in_sleep_job(first));
    // The submits were taken in (one write, read before the worker got its first job);
    // what was dispatched was dispatched in the same pass.
    let pool = &pool_json(&master)[0];
    assert_eq!(
        (pool["jobs_queued"].as_u64(), pool["jobs_done"].as_u64()),
        (Some(1), Some(0)),
        "the worker was handed more than its max_jobs: {pool}"
    );
    let mut results = recv_n(&mut client, 3);
    results.sort_by_key(|r| r.id);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    master.wait_for_log(
        &format!("worker {first} (pool s, generation 1, 2 jobs in"),
        SOON,
    );
    assert!(
        master.log_text().contains("recycled (max_jobs reached)"),
        "{}",
        master.log_text()
    );
}

#[test]
fn a_worker_recycled_at_max_lifetime_while_holding_jobs_hands_them_back() {
    // The worker holds four 600 ms jobs; its lifetime (1 s) runs out after the second, with
    // two it never started: they run on its replacement, none retried, none lost.
    let env = Env::new();
    env.install("sleep");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\nmax_lifetime = \"1s\"\n",
    ));
    let first = master.wait_for_workers(1)[0];
    let mut client = master.client_with_timeout(SOON);
    for id in 0..4u64 {
        client.send(id, "s", b"600").unwrap();
    }
    client.flush().unwrap();
    let mut results = recv_n(&mut client, 4);
    results.sort_by_key(|r| r.id);
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    // It did leave holding jobs it had not started (else this test proved nothing).
    let left = format!("worker {first} (pool s, generation 1, ");
    master.wait_for_log(&left, SOON);
    let log = master.log_text();
    let line = log.lines().find(|l| l.contains(&left)).unwrap();
    let ran: u64 = line
        .split(&left)
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        ran < 4 && line.contains("recycled (max_lifetime reached)"),
        "{line}"
    );
    let pool = &pool_json(&master)[0];
    assert_eq!(
        (
            pool["jobs_done"].as_u64(),
            pool["jobs_retried"].as_u64(),
            pool["jobs_failed"].as_u64()
        ),
        (Some(4), Some(0), Some(0)),
        "{pool}"
    );
}

#[test]
fn killing_the_master_with_sigkill_leaves_no_worker_behind() {
    let env = Env::new();
    env.install("echo");
    env.install("sleep");
    let mut master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n\n[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 2\n",
    ));
    let workers = master.wait_for_workers(4);
    for pid in &workers {
        // Past fork and set up (PR_SET_PDEATHSIG included): it logs once it is.
        wait_until(&format!("worker {pid} started"), SOON, || {
            master
                .log_text()
                .lines()
                .any(|l| l.contains(&format!("jobhost[{pid}] ")) && l.contains(": worker started"))
        });
    }
    // One worker busy in a long job: it must die too, not finish first.
    let mut client = master.client();
    client.send(1, "sleep", b"60000").unwrap();
    client.flush().unwrap();
    wait_until("the sleep job to be running", SOON, || {
        workers.iter().any(|p| jobhost_e2e::in_sleep_job(*p))
    });
    master.child.kill().expect("kill -9 the master");
    // Reaped: the master is gone for good, and the clock starts.
    master.child.wait().unwrap();
    let gone = Instant::now();
    // PR_SET_PDEATHSIG is sent as the master exits: every worker must be gone within a second
    // (a zombie waiting for init to reap it counts as gone; it runs no code).
    wait_until(
        "every worker gone within 1s of the master's death",
        Duration::from_secs(1),
        || workers.iter().all(|p| !is_alive(*p)),
    );
    eprintln!(
        "workers gone {:?} after the master was reaped",
        gone.elapsed()
    );
}

/// How many live workers each pool has, by `workers json` (draining ones included), sorted by
/// pool name; checked against the real children of the master.
fn workers_per_pool(master: &Master) -> Vec<(String, usize)> {
    let doc: serde_json::Value =
        serde_json::from_str(master.admin("workers json").lines().next().unwrap()).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for w in doc["workers"].as_array().unwrap() {
        *counts
            .entry(w["pool"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

fn wait_for_pools(master: &Master, want: &[(&str, usize)]) {
    let want: Vec<(String, usize)> = want
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(p, n)| (p.to_string(), *n))
        .collect();
    let total: usize = want.iter().map(|(_, n)| n).sum();
    let deadline = Instant::now() + SOON;
    loop {
        let last = workers_per_pool(master);
        if last == want && master.workers().len() == total {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "wanted {want:?} workers per pool, have {last:?} ({} processes)",
            master.workers().len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ttin_and_ttou_add_and_remove_a_worker_in_every_pool() {
    let env = Env::new();
    env.install("echo");
    env.install("hash");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 1\n\n[[pool]]\nname = \"hash\"\nplugin = \"hash\"\nworkers = 2\n",
    ));
    wait_for_pools(&master, &[("echo", 1), ("hash", 2)]);
    master.signal(Signal::SIGTTIN);
    wait_for_pools(&master, &[("echo", 2), ("hash", 3)]);
    // One at a time: two signals of one kind sent back to back may merge into one (Unix).
    master.signal(Signal::SIGTTOU);
    wait_for_pools(&master, &[("echo", 1), ("hash", 2)]);
    master.signal(Signal::SIGTTOU);
    wait_for_pools(&master, &[("echo", 0), ("hash", 1)]);
    // Never below zero: echo stays at none, hash loses its last.
    master.signal(Signal::SIGTTOU);
    wait_for_pools(&master, &[("echo", 0), ("hash", 0)]);
    master.signal(Signal::SIGTTIN);
    wait_for_pools(&master, &[("echo", 1), ("hash", 1)]);
    assert_eq!(children_of(master.pid()).len(), 2);
}

#[test]
fn the_master_holds_no_threads() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 2\n",
    ));
    master.wait_for_workers(2);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", master.pid()))
        .unwrap()
        .count();
    assert_eq!(tasks, 1, "the master forks, so it must be single-threaded");
}

#[test]
fn sigterm_to_a_busy_worker_stops_it_only_after_its_job() {
    let env = Env::new();
    env.install("sleep");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\n",
    ));
    let before = master.wait_for_workers(1);
    let mut client = master.client();
    client.send(1, "s", b"1000").unwrap();
    client.flush().unwrap();
    wait_until("the job to be running", SOON, || {
        jobhost_e2e::in_sleep_job(before[0])
    });
    kill(Pid::from_raw(before[0]), Signal::SIGTERM).unwrap();
    let result = client.recv().unwrap();
    assert_eq!(
        (result.status, result.text().as_str()),
        (Status::Ok, "slept 1000")
    );
    master.wait_for_log(
        &format!("worker {} (pool s, generation 1, 1 jobs in", before[0]),
        SOON,
    );
    assert!(
        master.log_text().contains(") stopped\n"),
        "{}",
        master.log_text()
    );
    wait_until("a replacement", SOON, || {
        master.workers().len() == 1 && master.workers() != before
    });
}

#[test]
fn an_idle_worker_is_recycled_at_max_lifetime() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 1\nmax_lifetime = \"1s\"\n",
    ));
    let before = master.wait_for_workers(1);
    master.wait_for_log("recycled (max_lifetime reached)", SOON);
    wait_until("a replacement", SOON, || {
        master.workers().len() == 1 && master.workers() != before
    });
    assert_eq!(master.client().call("e", b"x").unwrap().body, b"x");
}

#[test]
fn a_worker_takes_no_job_while_memory_is_short() {
    let env = Env::new();
    env.install("echo");
    // More than any machine has: the worker must wait, and say so once.
    let mut master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 1\nmin_available_memory = \"1000000GiB\"\n",
    ));
    master.wait_for_workers(1);
    let mut client = master.client();
    client.send(7, "e", b"waits").unwrap();
    client.flush().unwrap();
    master.wait_for_log("is under min_available_memory", SOON);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        master.log_count("is under min_available_memory"),
        1,
        "logged once per episode"
    );
    // The job was never run; a graceful stop answers it.
    master.signal(Signal::SIGTERM);
    let result = client.recv().unwrap();
    assert_eq!(
        (result.id, result.status, result.text().as_str()),
        (7, Status::Failed, "shutting down")
    );
    assert_eq!(master.wait_exit(SOON), 0);
}
