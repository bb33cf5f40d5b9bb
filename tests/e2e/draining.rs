//! Workers and pools on their way out: a draining worker still answers to `job_timeout`, and
//! a stopped pool removed by a reload answers its queue instead of keeping it forever.

use std::time::Duration;

use jobhost::protocol::Status;
use jobhost_e2e::{config_with, in_sleep_job, wait_until, Env, SOON};

#[test]
fn a_draining_worker_whose_job_hangs_is_killed_at_job_timeout_and_the_job_counts_as_an_attempt() {
    let env = Env::new();
    env.install("sleep");
    // graceful_timeout (20 s in config_with) is far longer than job_timeout: the job's own
    // limit must end it, not the restart's grace.
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 1\njob_timeout = \"2s\"\nmax_attempts = 1\n",
    ));
    let [worker] = master.wait_for_workers(1)[..] else {
        unreachable!()
    };
    let mut client = master.client();
    client.send(1, "sleep", b"600000").unwrap();
    client.flush().unwrap();
    wait_until("the job to run", SOON, || in_sleep_job(worker));
    // Restart: the worker drains (finishes its job, then leaves) — but its job hangs.
    assert!(master.admin("restart sleep").ends_with("OK\n"));
    let started = std::time::Instant::now();
    let r = client.recv().unwrap();
    assert_eq!(r.status, Status::Failed, "{}", r.text());
    assert!(r.text().contains("timed out after 2s"), "{}", r.text());
    // The job started before the restart, so its 2 s ran out at the latest 2 s after it; then
    // 3 s of grace before SIGKILL, and some slack for a loaded machine.
    let bound = Duration::from_secs(2 + 3 + 2);
    assert!(
        started.elapsed() <= bound,
        "ended by job_timeout (2 s + 3 s grace), not later ({:?} > {bound:?}) nor by graceful_timeout (20 s)",
        started.elapsed()
    );
    // The replacement serves.
    assert_eq!(client.call("sleep", b"1").unwrap().text(), "slept 1");
}

#[test]
fn a_stopped_pool_removed_by_a_reload_answers_its_queued_jobs() {
    let env = Env::new();
    env.install("echo");
    env.install("sleep");
    let echo = "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 1\n";
    let sleep = "[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 1\n";
    let master = env.start_master(&config_with(&format!("{echo}\n{sleep}")));
    master.wait_for_workers(2);
    assert!(master.admin("stop sleep").ends_with("OK\n"));
    let mut client = master.client();
    client.send(7, "sleep", b"1").unwrap();
    client.flush().unwrap();
    wait_until("the job to be queued", SOON, || {
        master
            .admin("status")
            .lines()
            .any(|l| l.starts_with("sleep") && l.contains("stopped"))
    });
    env.config(&config_with(echo));
    let reply = master.admin("reload");
    assert!(reply.ends_with("OK\n"), "{reply}");
    let r = client.recv().unwrap();
    assert_eq!(r.id, 7);
    assert_eq!(r.status, Status::Failed);
    assert_eq!(
        r.text(),
        "pool sleep was removed from the config while stopped"
    );
    // Once gone it is not listed any more; the other pool serves on.
    wait_until("the removed pool to be gone", SOON, || {
        !master
            .admin("status")
            .lines()
            .any(|l| l.starts_with("sleep"))
    });
    assert_eq!(
        client.call("echo", b"still here").unwrap().body,
        b"still here"
    );
}
