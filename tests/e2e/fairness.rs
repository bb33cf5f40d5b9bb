//! A pool's queue is shared fairly between client connections (issue 17): one client's batch
//! does not hold up another's job, nor make it "queue full"; a client that goes away takes its
//! queued jobs with it, unless it sent them with `jobhost submit --detach`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use jobhost::protocol::Status;
use jobhost_e2e::{bin_dir, config_with, wait_until, Env, Master, SOON};

/// The row of pool `name` in `status json`.
fn pool_status(master: &Master, name: &str) -> serde_json::Value {
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

fn counter(master: &Master, name: &str, key: &str) -> u64 {
    pool_status(master, name)[key].as_u64().unwrap_or(0)
}

/// One worker of the `sleep` plugin, pool "s".
fn sleep_master(env: &Env, extra: &str) -> Master {
    env.install("sleep");
    let master = env.start_master(&config_with(&format!(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\n{extra}"
    )));
    master.wait_for_workers(1);
    master
}

/// 20,000 jobs of 1 ms from one client are queued (some 20 s of work for the one worker);
/// another client's single job is answered while most of them are still waiting, not after.
#[test]
fn a_large_batch_does_not_hold_up_another_clients_job() {
    let env = Env::new();
    let master = sleep_master(&env, "");
    const BATCH: u64 = 20_000;
    let mut flooder = master.client();
    for id in 0..BATCH {
        flooder.send(id, "s", b"1").unwrap();
    }
    flooder.flush().unwrap();
    wait_until("most of the batch to be queued", SOON, || {
        counter(&master, "s", "jobs_queued") >= BATCH * 3 / 4
    });
    let mut other = master.client_with_timeout(Duration::from_secs(120));
    let answer = other.call("s", b"0").unwrap();
    assert_eq!(answer.status, Status::Ok, "{}", answer.text());
    let done = counter(&master, "s", "jobs_done");
    assert!(
        done < BATCH / 2,
        "the other client's job was answered only after {done} of the batch's {BATCH} jobs"
    );
}

/// A client with many jobs queued disconnects: they are dropped (counted as such, logged once
/// with the count), not run; the one its worker had started still finishes.
#[test]
fn a_gone_clients_queued_jobs_do_not_run() {
    let env = Env::new();
    let master = sleep_master(&env, "");
    const JOBS: u64 = 1_000;
    let mut client = master.client();
    for id in 0..JOBS {
        // 50 s of work in all.
        client.send(id, "s", b"50").unwrap();
    }
    client.flush().unwrap();
    // (A margin of 100 jobs, 5 s of work: a loaded machine may be slow to look.)
    wait_until("the jobs to be queued", SOON, || {
        counter(&master, "s", "jobs_queued") >= JOBS - 100
    });
    drop(client);
    wait_until("the gone client's jobs to leave the queue", SOON, || {
        counter(&master, "s", "jobs_queued") == 0
    });
    let dropped = counter(&master, "s", "jobs_dropped");
    assert!(dropped >= JOBS - 110, "{dropped} dropped");
    master.wait_for_log("dropped its queued jobs nobody will answer", SOON);
    assert_eq!(
        master.log_count("dropped its queued jobs nobody will answer"),
        1
    );
    // What the worker held runs out; nothing more is started for nobody.
    wait_until("the worker to be idle", SOON, || {
        counter(&master, "s", "workers_busy") == 0
    });
    let done = counter(&master, "s", "jobs_done");
    assert!(done + dropped == JOBS, "{done} done, {dropped} dropped");
    assert!(done <= 110, "{done} jobs ran for a client long gone");
}

/// `jobhost submit --detach`: its jobs run to the end after it has been killed.
#[test]
fn detached_jobs_run_after_their_client_has_gone() {
    let env = Env::new();
    let master = sleep_master(&env, "");
    const JOBS: u64 = 200;
    let mut submit = Command::new(bin_dir().join("jobhost"))
        .args(["submit", "--detach", "--socket"])
        .arg(&master.socket)
        .arg("s")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = submit.stdin.take().unwrap();
    // 4 s of work in all; stdin stays open, so the command is still there when killed.
    stdin.write_all(&b"20\n".repeat(JOBS as usize)).unwrap();
    stdin.flush().unwrap();
    wait_until("the jobs to be queued", SOON, || {
        if let Ok(Some(status)) = submit.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(submit.stderr.as_mut().unwrap(), &mut err);
            panic!("jobhost submit --detach ended ({status}): {err}");
        }
        counter(&master, "s", "jobs_queued") >= JOBS / 2
    });
    submit.kill().unwrap();
    submit.wait().unwrap();
    wait_until(
        "every detached job to run",
        Duration::from_secs(120),
        || counter(&master, "s", "jobs_done") == JOBS,
    );
    assert_eq!(counter(&master, "s", "jobs_dropped"), 0);
    drop(stdin);
}

/// One client fills max_queue: it gets "queue full", another client's job does not.
#[test]
fn a_flooder_does_not_make_another_clients_job_queue_full() {
    let env = Env::new();
    let master = sleep_master(&env, "max_queue = 100\n");
    // Nothing is dispatched while the pool is stopped: the queue stays full.
    assert!(master.admin("stop s").ends_with("OK\n"));
    let mut flooder = master.client();
    for id in 0..150 {
        flooder.send(id, "s", b"0").unwrap();
    }
    flooder.flush().unwrap();
    for _ in 0..50 {
        let r = flooder.recv().unwrap();
        assert_eq!(r.status, Status::Rejected, "{}", r.text());
        assert!(r.text().starts_with("queue full"), "{}", r.text());
    }
    wait_until("the flood to be queued", SOON, || {
        counter(&master, "s", "jobs_queued") == 100
    });
    let mut other = master.client();
    other.send(7, "s", b"0").unwrap();
    other.flush().unwrap();
    wait_until("the other client's job to be queued", SOON, || {
        counter(&master, "s", "jobs_queued") == 101
    });
    // The flooder still gets no more than it had.
    let more = flooder.call("s", b"0").unwrap();
    assert_eq!(more.status, Status::Rejected, "{}", more.text());
    assert!(master.admin("start s").ends_with("OK\n"));
    let answer = other.recv().unwrap();
    assert_eq!(
        (answer.id, answer.status),
        (7, Status::Ok),
        "{}",
        answer.text()
    );
}
