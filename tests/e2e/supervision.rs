//! The master supervises real forked workers: preload then fork, replace what dies (with
//! back-off when it keeps dying), kill what hangs, recycle what grows — and stays up.

use std::time::{Duration, Instant};

use jobhost::protocol::Status;
use jobhost_e2e::{children_of, config_with, is_alive, wait_until, Env, SOON};
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
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n\n[[pool]]\nname = \"hash\"\nplugin = \"hash\"\nworkers = 3\n",
    ));
    let workers = master.wait_for_workers(5);
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

#[test]
fn a_hung_job_gets_its_worker_killed_after_job_timeout() {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 1\nmax_attempts = 1\njob_timeout = \"1s\"\n",
    ));
    let before = master.wait_for_workers(1);
    let result = master.client().call("f", b"hang").unwrap();
    assert_eq!(result.status, Status::Failed);
    assert_eq!(result.text(), "job timed out after 1s, attempt 1 of 1");
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
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 1\ncrash_limit = 5\ncrash_window = \"60s\"\nfailing_retry = \"30s\"\n[pool.settings]\nworker_start = \"segv\"\n",
    ));
    let started = Instant::now();
    master.wait_for_log(
        "pool f is failing: 5 crashes within 60s; trying one worker every 30s",
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
    // Failing: no new fork for the next second and a half (the retry is 30 s away).
    let crashes = master.log_count("crashed: killed by SIGSEGV");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        master.log_count("crashed: killed by SIGSEGV"),
        crashes,
        "forked while failing"
    );
    assert!(crashes <= 6, "{crashes} crashes");
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

#[test]
fn ttin_and_ttou_add_and_remove_a_worker_in_every_pool() {
    let env = Env::new();
    env.install("echo");
    env.install("hash");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 1\n\n[[pool]]\nname = \"hash\"\nplugin = \"hash\"\nworkers = 1\n",
    ));
    master.wait_for_workers(2);
    master.signal(Signal::SIGTTIN);
    master.wait_for_workers(4);
    // One at a time: two signals of one kind sent back to back may merge into one (Unix).
    master.signal(Signal::SIGTTOU);
    master.wait_for_workers(2);
    master.signal(Signal::SIGTTOU);
    master.wait_for_workers(0);
    master.signal(Signal::SIGTTIN);
    master.wait_for_workers(2);
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
