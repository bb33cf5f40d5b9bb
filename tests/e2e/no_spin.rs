//! Connections in odd states must not make the master spin: epoll reports some conditions
//! (a hang-up, unread input) on every wait until they are dealt with, so each one is either
//! handled or no longer asked for. Measured in real CPU time of the real master.

use std::io::Write;
use std::time::Duration;

use jobhost_e2e::{config_with, cpu_ticks, wait_until, wait_until_quiet, Env, SOON};

/// `jobs_queued` of the first pool in a `status json` reply.
fn queued(reply: &str) -> u64 {
    let json: serde_json::Value = serde_json::from_str(reply.lines().next().unwrap_or("")).unwrap();
    json["pools"][0]["jobs_queued"].as_u64().unwrap()
}

/// CPU ticks (1/100 s) the master uses over the next two seconds.
fn ticks_over_two_seconds(pid: i32) -> u64 {
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    cpu_ticks(pid).saturating_sub(before)
}

#[test]
fn a_client_paused_by_back_pressure_that_hangs_up_is_dropped_not_spun_on() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 1\n",
    ));
    master.wait_for_workers(1);
    assert!(master.admin("stop echo").ends_with("OK\n"));
    {
        // 18 MiB of accepted, unanswered jobs: over the 16 MiB a client may hold, so the
        // master stops reading it; then it goes away.
        let mut client = master.client();
        let big = vec![b'x'; 6 << 20];
        for id in 0..3 {
            client.send(id, "echo", &big).unwrap();
        }
        client.flush().unwrap();
        wait_until("the jobs to be queued", SOON, || {
            queued(&master.admin("status json")) == 3
        });
    }
    wait_until_quiet(master.pid(), "the master, after the paused client left");
    let used = ticks_over_two_seconds(master.pid());
    assert!(
        used <= 5,
        "the master used {used} ticks in 2 s after a paused client left"
    );
    // Its queued jobs went with it (dropped); the pool runs the next client's job.
    assert!(master.admin("start echo").ends_with("OK\n"));
    assert_eq!(
        master.client().call("echo", b"after").unwrap().body,
        b"after"
    );
}

#[test]
fn a_closing_admin_session_that_keeps_sending_is_not_spun_on() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 1\n",
    ));
    master.wait_for_workers(1);
    let mut session = master.admin_session();
    // Far more replies than the socket holds, never read; then quit, then more input.
    let mut lines = "status\n".repeat(2000);
    lines.push_str("quit\nstatus\n");
    session.stream.write_all(lines.as_bytes()).unwrap();
    // The window starts once the master is done with those lines (it answered them all, up to
    // what the socket holds, and took the quit) — not after a guess at how long that takes.
    wait_until_quiet(
        master.pid(),
        "the master, after 2,000 status lines and a quit",
    );
    session.stream.write_all(b"status\n").unwrap();
    wait_until_quiet(
        master.pid(),
        "the master, after one more line on a closing session",
    );
    let used = ticks_over_two_seconds(master.pid());
    assert!(
        used <= 5,
        "the master used {used} ticks in 2 s on a closing session"
    );
    // Other sessions are served.
    assert!(master.admin("status").ends_with("OK\n"));
    // Once the client reads, the session ends after its replies.
    assert!(
        session.is_closed(),
        "the session stayed open after its quit"
    );
}
