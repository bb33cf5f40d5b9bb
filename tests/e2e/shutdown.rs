//! Stopping the master: SIGTERM lets running jobs finish and answers every accepted job;
//! SIGQUIT stops at once. Either way no worker outlives the master.

use std::time::Duration;

use jobhost::protocol::Status;
use jobhost_e2e::{config_with, in_sleep_job, is_alive, wait_until, Env, SOON};
use nix::sys::signal::Signal;

#[test]
fn sigterm_lets_the_running_job_finish_answers_the_queue_and_exits_0() {
    let env = Env::new();
    env.install("sleep");
    let mut master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\n",
    ));
    let workers = master.wait_for_workers(1);
    let mut client = master.client();
    client.send(1, "s", b"1500").unwrap();
    client.send(2, "s", b"10").unwrap(); // queued behind the first: never started
    client.flush().unwrap();
    wait_until("the job to be running", SOON, || in_sleep_job(workers[0]));
    master.signal(Signal::SIGTERM);
    let mut results = [client.recv().unwrap(), client.recv().unwrap()];
    results.sort_by_key(|r| r.id);
    assert_eq!(
        (results[0].status, results[0].text().as_str()),
        (Status::Ok, "slept 1500")
    );
    assert_eq!(
        (results[1].status, results[1].text().as_str()),
        (Status::Failed, "shutting down")
    );
    assert_eq!(master.wait_exit(SOON), 0);
    assert!(!is_alive(workers[0]));
    assert!(
        !master.socket.exists(),
        "the socket file is removed on a clean exit"
    );
    let log = master.log_text();
    assert!(log.contains("SIGTERM: graceful stop"), "{log}");
    assert!(
        log.contains(&format!(
            "worker {} (pool s, generation 1, 1 jobs in",
            workers[0]
        )),
        "{log}"
    );
}

#[test]
fn a_job_submitted_while_stopping_is_rejected() {
    let env = Env::new();
    env.install("sleep");
    let mut master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\n",
    ));
    let workers = master.wait_for_workers(1);
    let mut client = master.client();
    client.send(1, "s", b"1500").unwrap();
    client.flush().unwrap();
    wait_until("the job to be running", SOON, || in_sleep_job(workers[0]));
    master.signal(Signal::SIGTERM);
    master.wait_for_log("SIGTERM: graceful stop", SOON);
    let late = client.call("s", b"1").unwrap();
    assert_eq!(
        (late.status, late.text().as_str()),
        (Status::Rejected, "shutting down")
    );
    assert_eq!(client.recv().unwrap().text(), "slept 1500");
    assert_eq!(master.wait_exit(SOON), 0);
}

#[test]
fn sigquit_stops_at_once_and_fails_the_running_job() {
    let env = Env::new();
    env.install("sleep");
    let mut master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 2\n",
    ));
    let workers = master.wait_for_workers(2);
    let mut client = master.client();
    client.send(1, "s", b"60000").unwrap();
    client.flush().unwrap();
    wait_until("the job to be running", SOON, || {
        workers.iter().any(|w| in_sleep_job(*w))
    });
    master.signal(Signal::SIGQUIT);
    let result = client.recv().unwrap();
    assert_eq!(
        (result.status, result.text().as_str()),
        (Status::Failed, "shutting down")
    );
    assert_eq!(master.wait_exit(Duration::from_secs(10)), 0);
    wait_until("workers gone", SOON, || {
        workers.iter().all(|w| !is_alive(*w))
    });
}
