//! Attacks on progress and partial data (plugin-api 0.1.1's `JobContext`, WORK_PROGRESS /
//! WORK_DATA, PROGRESS / DATA), each a bug found in review: the test shows it, the fix keeps it
//! shown.

use jobhost::client::Received;
use jobhost::protocol::Status;
use jobhost_e2e::{config_with, fixture_plugin, in_sleep_job, wait_until, Env, SOON};

/// The 0.1.0 fallback loads a plugin with our types unchecked once it passes plugin-api
/// 0.1.0's layout check. abi_stable's check takes a prefix type with more fields than the
/// caller's: a plugin whose `PluginObject` has 0.1.0's four methods and then a fifth that is
/// not 0.1.1's `handle_with` passed it, was loaded, and every job called that fifth method as
/// `handle_with` (here: with the context's address as a number). It must be refused, with the
/// layout check's reason.
#[test]
fn a_plugin_that_matches_0_1_0_only_in_part_is_refused_not_loaded_unchecked() {
    let env = Env::new();
    let run = env.jobhost(&[
        "plugin",
        "inspect",
        fixture_plugin("forked").to_str().unwrap(),
    ]);
    run.assert_code(1)
        .assert_stderr_has("libforked.so has an incompatible plugin-api layout")
        .assert_stderr_has("expected `handle_with: ")
        .assert_stderr_has("found `handle_tagged: ")
        .assert_stderr_has("(the plugin's types come from plugin-api 0.1.3)");

    // The genuine 0.1.0 plugin still loads.
    let run = env.jobhost(&[
        "plugin",
        "inspect",
        fixture_plugin("echo_old").to_str().unwrap(),
    ]);
    run.assert_code(0);
}

/// A plugin writes WORK_PROGRESS and WORK_DATA frames for every job key it can guess — a
/// watched job of another client, running on another worker, first among them. The forger is
/// killed as a protocol violation (its own job fails, saying so); the watching client gets no
/// forged byte, only its own job's reports and result.
#[test]
fn forged_progress_and_data_for_another_clients_job_kill_the_forger_and_reach_no_one() {
    let env = Env::new();
    env.install("sleep");
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"s\"\nplugin = \"sleep\"\nworkers = 1\n\n\
         [[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 1\nmax_attempts = 1\n",
    ));
    let workers = master.wait_for_workers(2);
    // Job 1, watched: a sleep job with data, held by the sleep worker.
    let mut victim = master.client();
    victim.send_watched(1, "s", b"1500 data").unwrap();
    victim.flush().unwrap();
    wait_until("the sleep job to run", SOON, || {
        workers.iter().any(|p| in_sleep_job(*p))
    });
    // Job 2: the faulty worker writes reports for jobs 1..=200 — job 1 first.
    let forged = master.client().call("f", b"forge-reports 1 200").unwrap();
    assert_eq!(forged.status, Status::Failed, "{}", forged.text());
    assert!(
        forged.text().contains("breaking the protocol")
            && forged
                .text()
                .contains("a report for job 1, which it does not hold"),
        "{}",
        forged.text()
    );
    let mut data = Vec::new();
    let result = loop {
        match victim.recv_any().unwrap() {
            Received::Progress {
                id, denominator, ..
            } => {
                assert_eq!((id, denominator), (1, 1500), "a forged progress reached it");
            }
            Received::Data { id, data: d } => {
                assert_eq!(id, 1);
                data.push(String::from_utf8(d).unwrap());
            }
            Received::Result(r) => break r,
        }
    };
    assert_eq!(result.text(), "slept 1500");
    assert!(!data.is_empty(), "its own data came");
    assert!(
        data.iter().all(|d| !d.contains("FORGED")),
        "forged data reached the client: {data:?}"
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
