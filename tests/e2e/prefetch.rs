//! Jobs a worker was sent ahead but has not started are not stuck there: the master takes
//! them back for an idle worker (a long job or a stopped worker holds nothing behind it), a
//! job so taken back runs once, and a master that was itself off the CPU judges `job_timeout`
//! on what its workers did meanwhile, not on how long it was away.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jobhost::protocol::Status;
use jobhost_e2e::{config_with, recv_n, wait_until, Env, Master, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Two `faulty` workers: `pid <MS>` sleeps MS milliseconds and answers with the worker's pid.
fn pool(extra: &str) -> String {
    config_with(&format!(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 2\n{extra}"
    ))
}

/// Starts the master and waits for both workers to be serving; returns their pids.
fn start(env: &Env, extra: &str) -> (Master, [i32; 2]) {
    env.install("faulty");
    let master = env.start_master(&pool(extra));
    let workers = master.wait_for_workers(2);
    for pid in &workers {
        master.wait_for_log(&format!("jobhost[{pid}] f: worker started"), SOON);
    }
    (master, [workers[0], workers[1]])
}

fn signal(pid: i32, signal: Signal) {
    kill(Pid::from_raw(pid), signal).unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
}

/// The master's log has no worker that broke the protocol (answered a job it was not
/// holding, as one that ran a job taken back from it would).
fn assert_no_violation(master: &Master) {
    assert_eq!(
        master.log_count("broke the protocol"),
        0,
        "{}",
        master.log_text()
    );
}

#[test]
fn a_long_job_does_not_hold_short_ones_behind_it() {
    let env = Env::new();
    let (master, _) = start(&env, "");
    let mut client = master.client();
    // One 8 s job, then six of 10 ms: sent together, each worker is sent some ahead, and
    // the short ones sent to the long job's worker must not wait for it.
    client.send(0, "f", b"pid 8000").unwrap();
    for id in 1..=6 {
        client.send(id, "f", b"pid 10").unwrap();
    }
    client.flush().unwrap();
    let results = recv_n(&mut client, 7);
    let order: Vec<u64> = results.iter().map(|r| r.id).collect();
    for r in &results {
        assert_eq!(r.status, Status::Ok, "job {}: {}", r.id, r.text());
    }
    // The long one started first and ran all along: six answers before it means none of the
    // short ones waited behind it.
    assert_eq!(
        order.last(),
        Some(&0),
        "results in the order {order:?}: the short jobs after 0 waited for it"
    );
    // So the other worker ran them all (the long one's worker was in its sleep meanwhile).
    let long_pid = results[6].text();
    for r in &results[..6] {
        assert_ne!(
            r.text(),
            long_pid,
            "job {} ran in the long job's worker",
            r.id
        );
    }
    assert_no_violation(&master);
}

#[test]
fn jobs_sent_to_a_stopped_worker_go_to_another() {
    let env = Env::new();
    // No job_timeout: nothing would ever free the jobs the stopped worker was sent.
    let (mut master, [stopped, running]) = start(&env, "job_timeout = \"0\"\n");
    signal(stopped, Signal::SIGSTOP);
    // Less patience than the harness's default: a job held by the stopped worker is never
    // answered, and 20 jobs of 10 ms take far less than this even on a loaded machine.
    let mut client = master.client_with_timeout(SOON);
    for id in 0..20 {
        client.send(id, "f", b"pid 10").unwrap();
    }
    client.flush().unwrap();
    let results = recv_n(&mut client, 20);
    for r in &results {
        assert_eq!(r.status, Status::Ok, "job {}: {}", r.id, r.text());
        assert_eq!(
            r.text(),
            running.to_string(),
            "job {} ran in the stopped worker {stopped}",
            r.id
        );
    }
    // Later, still stopped: it is sent nothing again (it has not seen the take-back), so a
    // second batch is all answered too — whatever time passed.
    std::thread::sleep(Duration::from_millis(1500));
    for id in 100..120 {
        client.send(id, "f", b"pid 10").unwrap();
    }
    client.flush().unwrap();
    for r in recv_n(&mut client, 20) {
        assert_eq!(r.text(), running.to_string(), "job {}", r.id);
    }
    // Let it go on: it finds the jobs it was sent taken back and runs none of them (one it
    // ran would be answered twice, and its outcome is a protocol violation to the master),
    // says it is there, and is sent jobs again.
    signal(stopped, Signal::SIGCONT);
    let mut batch = 1000;
    wait_until("the resumed worker running jobs again", SOON, || {
        for id in batch..batch + 10 {
            client.send(id, "f", b"pid 20").unwrap();
        }
        client.flush().unwrap();
        let ran_there = recv_n(&mut client, 10)
            .iter()
            .inspect(|r| assert_eq!(r.status, Status::Ok, "{}", r.text()))
            .any(|r| r.text() == stopped.to_string());
        batch += 10;
        ran_there
    });
    // A clean stop: each worker's LEAVING count of outcomes matches what the master received.
    master.signal(Signal::SIGTERM);
    assert_eq!(master.wait_exit(SOON), 0, "{}", master.log_text());
    for pid in [stopped, running] {
        let line = master
            .log_text()
            .lines()
            .find(|l| l.contains(&format!("worker {pid} (pool f,")))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no exit of worker {pid}:\n{}", master.log_text()));
        assert!(line.ends_with(") stopped"), "{line}");
    }
    assert_no_violation(&master);
}

/// `timeouts` and `crashes` of pool `f` from `status json`.
fn timeouts_and_crashes(master: &Master) -> (u64, u64) {
    let reply = master.admin("status json");
    let status: serde_json::Value = serde_json::from_str(reply.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("status json: {e}: {reply}"));
    let pool = status["pools"]
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["name"] == "f"))
        .unwrap_or_else(|| panic!("no pool f: {reply}"));
    let count = |key: &str| {
        pool[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {pool}"))
    };
    (count("timeouts"), count("crashes"))
}

#[test]
fn a_master_stalled_under_load_kills_no_worker_whose_job_ended_in_time() {
    let env = Env::new();
    let (master, workers) = start(&env, "job_timeout = \"3s\"\n");
    // A client keeps eight 50 ms jobs outstanding (so each worker always holds some) until
    // told to stop, then collects what it is owed.
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut client = master.client();
    let load = std::thread::spawn({
        let (answered, stop) = (answered.clone(), stop.clone());
        move || {
            let mut results = Vec::new();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                while sent < results.len() as u64 + 8 {
                    client.send(sent, "f", b"pid 50").unwrap();
                    sent += 1;
                }
                client.flush().unwrap();
                results.push(client.recv().unwrap());
                answered.fetch_add(1, Ordering::Relaxed);
            }
            while (results.len() as u64) < sent {
                results.push(client.recv().unwrap());
            }
            results
        }
    });
    wait_until("the load to run", SOON, || {
        answered.load(Ordering::Relaxed) >= 10
    });
    // The master off the CPU for three times job_timeout: its workers finish what they hold
    // in 50 ms each and write their outcomes, which it reads only once it runs again.
    master.signal(Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(9));
    master.signal(Signal::SIGCONT);
    let before = answered.load(Ordering::Relaxed);
    wait_until("the load to go on", SOON, || {
        answered.load(Ordering::Relaxed) >= before + 20
    });
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("the load thread");
    for r in &results {
        assert_eq!(r.status, Status::Ok, "job {}: {}", r.id, r.text());
    }
    assert_eq!(
        master.log_count("ran past job_timeout"),
        0,
        "{}",
        master.log_text()
    );
    assert_eq!(timeouts_and_crashes(&master), (0, 0));
    assert_eq!(master.workers(), workers.to_vec(), "the same two workers");
}
