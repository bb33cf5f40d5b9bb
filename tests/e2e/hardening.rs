//! What a hostile or broken worker, a signal flood or the master's own shortage of fds cannot
//! do (issue 12): a worker speaks only for its own jobs; a plugin's `exit(N)` is a crash
//! whatever N is; exits before a first result back off; a poison job does not throttle its
//! pool; TTIN stops at the worker cap; a failed socketpair is not the pool's crash; a job past
//! its timeout is never a success; an idle daemon idles.

use std::fs;
use std::time::{Duration, Instant};

use jobhost::protocol::Status;
use jobhost_e2e::{config_with, cpu_ticks, in_sleep_job, is_alive, wait_until, Env, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The row of pool `name` in `status json`.
fn pool_status(master: &jobhost_e2e::Master, name: &str) -> serde_json::Value {
    let reply = master.admin("status json");
    let doc: serde_json::Value = serde_json::from_str(reply.lines().next().unwrap()).unwrap();
    doc["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no pool {name} in {reply}"))
}

#[test]
fn an_idle_daemon_uses_no_cpu() {
    let env = Env::new();
    env.install("echo");
    let config = env.config(
        &config_with("[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n")
            .replace("[host]\n", "[host]\nlog = \"master.log\"\n"),
    );
    env.jobhost(&["run", "--daemon", "-c", config.to_str().unwrap()])
        .assert_code(0);
    let pid: i32 = fs::read_to_string(env.path().join("run/jobhost.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    struct Stop(i32);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
    let _stop = Stop(pid);
    wait_until("two workers", SOON, || {
        jobhost_e2e::children_of(pid).len() == 2
    });
    let mut pids = jobhost_e2e::children_of(pid);
    pids.push(pid);
    let total = || -> u64 { pids.iter().map(|p| cpu_ticks(*p)).sum() };
    let before = total();
    std::thread::sleep(Duration::from_secs(3));
    let used = total().saturating_sub(before);
    // A level-triggered wake-up that is never drained is ~300 ticks in 3 s.
    assert!(
        used <= 3,
        "an idle daemon and its workers used {used} clock ticks in 3 s"
    );
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    wait_until("the daemon to exit", SOON, || !is_alive(pid));
}

#[test]
fn a_worker_cannot_answer_a_job_it_does_not_hold() {
    let env = Env::new();
    env.install("sleep");
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\n\n\
         [[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 1\nmax_attempts = 1\n",
    ));
    let workers = master.wait_for_workers(2);
    // Job 1: a sleep job, held by the sleep worker.
    let mut victim = master.client();
    victim.send(1, "s", b"1500").unwrap();
    victim.flush().unwrap();
    wait_until("the sleep job to run", SOON, || {
        workers.iter().any(|p| in_sleep_job(*p))
    });
    // Job 2: the faulty worker writes outcomes for jobs 1..=200 — job 1 first.
    let forged = master.client().call("f", b"forge 1 200").unwrap();
    assert_eq!(forged.status, Status::Failed, "{}", forged.text());
    assert!(
        forged.text().contains("breaking the protocol")
            && forged
                .text()
                .contains("an outcome for job 1, which it does not hold"),
        "{}",
        forged.text()
    );
    let real = victim.recv().unwrap();
    assert_eq!(real.status, Status::Ok, "{}", real.text());
    assert_eq!(
        real.text(),
        "slept 1500",
        "the real worker's result, not a forged one"
    );
    assert_eq!(
        master.log_count("broke the protocol"),
        1,
        "{}",
        master.log_text()
    );
    // The forger was replaced; the pool serves on.
    assert_eq!(master.client().call("f", b"ok").unwrap().body, b"ok");
}

#[test]
fn a_plugin_exit_inside_a_job_is_a_crash_whatever_its_status() {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 2\nmax_attempts = 2\n",
    ));
    master.wait_for_workers(2);
    let mut client = master.client();
    // 0 = stopped, 200-202 = recycled, 203 = loop plugin said Stop, 204 = worker_start failed,
    // 205 = master gone: none of them may be taken at its word from plugin code.
    for code in [0, 200, 201, 202, 203, 204, 205] {
        let result = client.call("f", format!("exit {code}").as_bytes()).unwrap();
        assert_eq!(
            result.status,
            Status::Failed,
            "exit {code}: {}",
            result.text()
        );
        assert_eq!(
            result.text(),
            format!("worker exited with status {code}, attempt 2 of 2"),
            "exit {code}"
        );
        assert_eq!(
            client.call("f", b"ok").unwrap().body,
            b"ok",
            "after exit {code}"
        );
    }
    let pool = pool_status(&master, "f");
    assert_ne!(
        pool["state"], "stopped",
        "exit 203 did not stop a jobs pool: {pool}"
    );
    assert!(
        master.log_count("without saying why") >= 14,
        "{}",
        master.log_text()
    );
}

/// A worker_start that leaves at once — whatever its status, even after closing the channel —
/// must go through back-off: the pool ends up failing, forking about once per failing_retry.
fn early_exits_back_off(worker_start: &str) {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(&format!(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 2\ncrash_limit = 4\n\
         crash_window = \"60s\"\nfailing_retry = \"30s\"\n[pool.settings]\nworker_start = \"{worker_start}\"\n"
    )));
    wait_until(&format!("pool failing ({worker_start})"), SOON, || {
        pool_status(&master, "f")["state"] == "failing"
    });
    let forks = || master.log_count("crashed:") + master.log_count("failed to start");
    let before = forks();
    std::thread::sleep(Duration::from_secs(2));
    let during = forks() - before;
    assert!(
        during <= 2,
        "{worker_start}: {during} forks in 2 s while failing:\n{}",
        master.log_text()
    );
    assert!(before <= 8, "{worker_start}: {before} exits before failing");
}

#[test]
fn worker_start_exiting_with_a_recycle_status_backs_off() {
    early_exits_back_off("exit 201");
}

#[test]
fn worker_start_exiting_with_the_master_gone_status_backs_off() {
    early_exits_back_off("exit 205");
}

#[test]
fn worker_start_exiting_zero_backs_off() {
    early_exits_back_off("exit 0");
}

#[test]
fn worker_start_closing_every_fd_backs_off() {
    early_exits_back_off("close-fds");
}

#[test]
fn poison_jobs_do_not_throttle_their_pool() {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 2\nmax_attempts = 3\ncrash_limit = 10\n",
    ));
    master.wait_for_workers(2);
    let mut client = master.client();
    for i in 0..20 {
        client.send(i, "f", b"ok").unwrap();
    }
    for _ in 0..20 {
        assert!(client.recv().unwrap().is_ok());
    }
    let started = Instant::now();
    for i in 0..5 {
        client.send(100 + i, "f", b"segv").unwrap();
    }
    for _ in 0..5 {
        let r = client.recv().unwrap();
        assert_eq!(r.text(), "worker killed by SIGSEGV, attempt 3 of 3");
    }
    let took = started.elapsed();
    // Before: the retries on fresh workers counted as a crash loop (10 s back-off, failing).
    assert!(
        took < Duration::from_secs(10),
        "5 poison jobs took {took:?}:\n{}",
        master.log_text()
    );
    assert_eq!(
        pool_status(&master, "f")["state"],
        "ok",
        "{}",
        master.log_text()
    );
    assert_eq!(master.log_count("is failing"), 0, "{}", master.log_text());
    assert_eq!(client.call("f", b"ok").unwrap().body, b"ok");
}

#[test]
fn a_sigttin_flood_stops_at_the_worker_cap() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 1\n",
    ));
    master.wait_for_workers(1);
    // Stopped, the pool counts what it wants without forking a thousand processes.
    assert!(master.admin("stop e").ends_with("OK\n"));
    master.wait_for_workers(0);
    // Signals of one kind merge while one is pending, so send until the cap is reached, then
    // a few hundred more; each status is answered after the signals before it were taken.
    let wanted = || {
        pool_status(&master, "e")["workers_wanted"]
            .as_u64()
            .unwrap()
    };
    // Each round adds at least one (a loaded master may take a round's 200 as one, merged):
    // at most 1024 rounds reach the cap, and no round adds nothing.
    let mut rounds = 0;
    let mut before = wanted();
    while before < 1024 {
        assert!(
            rounds < 1100,
            "{rounds} rounds of TTINs, the pool wants {before}"
        );
        for _ in 0..200 {
            master.signal(Signal::SIGTTIN);
        }
        rounds += 1;
        let now = wanted();
        assert!(now > before, "a round of 200 TTINs added nothing ({now})");
        before = now;
    }
    // At the cap, any TTIN taken says so: the flood below adds at least one such line (its
    // signals may merge into one).
    let capped_before = master.log_count("capped: a pool has at most 1024");
    for _ in 0..500 {
        master.signal(Signal::SIGTTIN);
    }
    wait_until("the last TTINs to be taken", SOON, || {
        master.log_count("capped: a pool has at most 1024") > capped_before
    });
    assert_eq!(wanted(), 1024, "and not beyond");
    assert!(
        master
            .log_text()
            .contains("(capped: a pool has at most 1024)"),
        "{}",
        master.log_text()
    );
}

#[test]
fn a_job_past_its_timeout_is_answered_timed_out_never_ok() {
    let env = Env::new();
    env.install("sleep");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\njob_timeout = \"1s\"\nmax_attempts = 1\n",
    ));
    master.wait_for_workers(1);
    // The sleep finishes in the SIGTERM grace (the worker stops only between jobs): its
    // result comes too late to count.
    let result = master.client().call("s", b"2500").unwrap();
    assert_eq!(result.status, Status::Failed, "{}", result.text());
    assert_eq!(result.text(), "job timed out after 1s, attempt 1 of 1");
    master.wait_for_log("its outcome is discarded", SOON);
    assert_eq!(master.client().call("s", b"10").unwrap().text(), "slept 10");
}

#[test]
fn a_full_fd_table_pauses_forks_without_failing_the_pool() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master_with_nofile(
        &config_with("[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 2\n"),
        Some(48),
    );
    let workers = master.wait_for_workers(2);
    assert_eq!(master.client().call("e", b"x").unwrap().body, b"x");
    // Fill the master's fd table with idle clients.
    let mut clients = Vec::new();
    while master.log_count("accept:") == 0 && clients.len() < 200 {
        if let Ok(c) = std::os::unix::net::UnixStream::connect(&master.socket) {
            clients.push(c);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    master.wait_for_log("accept:", SOON);
    // A worker dies: its replacement cannot get a socketpair.
    kill(Pid::from_raw(workers[0]), Signal::SIGKILL).unwrap();
    master.wait_for_log("cannot start a worker", SOON);
    std::thread::sleep(Duration::from_millis(2500));
    let attempts = master.log_count("cannot start a worker");
    assert!(
        attempts <= 5,
        "{attempts} fork attempts in about 2.5 s:\n{}",
        master.log_text()
    );
    drop(clients);
    master.wait_for_workers(2);
    assert_eq!(
        pool_status(&master, "e")["state"],
        "ok",
        "{}",
        master.log_text()
    );
    assert_eq!(
        master.log_count("crash back-off"),
        0,
        "{}",
        master.log_text()
    );
    assert_eq!(master.client().call("e", b"y").unwrap().body, b"y");
}

#[test]
fn idle_workers_recycled_by_max_lifetime_are_not_a_crash_loop() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 4\nmax_lifetime = \"1s\"\ncrash_limit = 3\n",
    ));
    master.wait_for_workers(4);
    wait_until("a dozen recycles", SOON, || {
        master.log_count("recycled (max_lifetime") >= 12
    });
    assert_eq!(
        pool_status(&master, "e")["state"],
        "ok",
        "{}",
        master.log_text()
    );
    assert_eq!(
        master.log_count("crash back-off"),
        0,
        "{}",
        master.log_text()
    );
}

#[test]
fn a_crash_in_worker_start_is_a_crash_loop_even_with_jobs_waiting() {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 2\nmax_attempts = 10\ncrash_limit = 4\n\
         failing_retry = \"30s\"\n[pool.settings]\nworker_start = \"segv\"\n",
    ));
    // Jobs are sent to fresh workers before worker_start runs: their retries must not pass
    // for poison and hide the crash loop.
    let mut client = master.client();
    for i in 0..3 {
        client.send(i, "f", b"ok").unwrap();
    }
    client.flush().unwrap();
    wait_until("the pool to be failing", SOON, || {
        pool_status(&master, "f")["state"] == "failing"
    });
    assert_eq!(
        master.log_count("the crash is its job's"),
        0,
        "{}",
        master.log_text()
    );
}
