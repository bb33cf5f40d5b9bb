//! A plugin's progress and partial data on their way to the client: a watched job's PROGRESS
//! frames grow, its DATA frames come in order before its RESULT, an unwatched job gets neither,
//! `jobhost submit` writes the data before the result (and no bar when stderr is a pipe), and a
//! plugin built against plugin-api 0.1.0 (no `handle_with`) still loads and answers.

use jobhost::client::{Client, JobResult, Received};
use jobhost_e2e::{config_with, fixture_plugin, Env};

/// Everything the master sends about job `id` up to its result: (progress numerators, data in
/// order, the result). Fails on a report of another job.
fn watch(client: &mut Client, id: u64) -> (Vec<(u64, u64)>, Vec<Vec<u8>>, JobResult) {
    let mut progress = Vec::new();
    let mut data = Vec::new();
    loop {
        match client
            .recv_any()
            .expect("the master answers within the client's timeout")
        {
            Received::Progress {
                id: of,
                numerator,
                denominator,
            } => {
                assert_eq!(of, id, "progress of another job");
                progress.push((numerator, denominator));
            }
            Received::Data { id: of, data: d } => {
                assert_eq!(of, id, "data of another job");
                data.push(d);
            }
            Received::Result(result) => {
                assert_eq!(result.id, id);
                return (progress, data, result);
            }
        }
    }
}

fn sleep_master(env: &Env) -> jobhost_e2e::Master {
    env.install("sleep");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 1\n",
    ));
    master.wait_for_workers(1);
    master
}

#[test]
fn a_long_job_reports_growing_progress_then_its_result() {
    let env = Env::new();
    let master = sleep_master(&env);
    let mut client = master.client();
    client.send_watched(7, "sleep", b"600").unwrap();
    let (progress, data, result) = watch(&mut client, 7);
    assert_eq!(result.text(), "slept 600");
    assert!(data.is_empty(), "{data:?}");
    assert!(progress.len() >= 3, "{progress:?}");
    assert!(
        progress.windows(2).all(|w| w[0].0 < w[1].0),
        "numerators grow: {progress:?}"
    );
    assert!(progress.iter().all(|p| p.1 == 600), "{progress:?}");
    assert_eq!(
        progress.last(),
        Some(&(600, 600)),
        "the last one is always sent"
    );

    // The same job, not watched: its result only.
    client.send(8, "sleep", b"300").unwrap();
    match client.recv_any().unwrap() {
        Received::Result(r) => assert_eq!((r.id, r.text().as_str()), (8, "slept 300")),
        other => panic!("an unwatched job got {other:?}"),
    }
}

#[test]
fn a_jobs_data_arrives_in_order_before_its_result() {
    let env = Env::new();
    let master = sleep_master(&env);
    let mut client = master.client();
    client.send_watched(1, "sleep", b"500 data").unwrap();
    let (progress, data, result) = watch(&mut client, 1);
    assert_eq!(result.text(), "slept 500");
    let steps: Vec<u64> = data
        .iter()
        .map(|d| {
            let text = String::from_utf8(d.clone()).unwrap();
            text.strip_suffix('\n').unwrap().parse().unwrap()
        })
        .collect();
    assert!(steps.len() >= 3, "{steps:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "in order: {steps:?}");
    assert_eq!(steps.last(), Some(&500));
    assert!(progress.len() >= 3, "{progress:?}");

    // `jobhost submit`, piped: the data, then the result; nothing on stderr.
    let run = env.jobhost(&[
        "submit",
        "--socket",
        master.socket.to_str().unwrap(),
        "sleep",
        "300 data",
    ]);
    run.assert_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.last(), Some(&"slept 300"), "{:?}", run.stdout);
    let data: Vec<u64> = lines[..lines.len() - 1]
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        data.len() >= 2 && data.last() == Some(&300),
        "{:?}",
        run.stdout
    );
    assert!(run.stderr.is_empty(), "stderr is a pipe: {:?}", run.stderr);
}

#[test]
fn a_plugin_built_against_plugin_api_0_1_0_still_loads_and_answers_without_progress() {
    let env = Env::new();
    env.install_file(&fixture_plugin("echo_old"), "echo_old");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"old\"\nplugin = \"echo_old\"\nworkers = 1\n",
    ));
    master.wait_for_workers(1);
    let mut client = master.client();
    for i in 0..3u64 {
        client
            .send_watched(i, "old", format!("hi {i}").as_bytes())
            .unwrap();
        let (progress, data, result) = watch(&mut client, i);
        assert!(progress.is_empty() && data.is_empty());
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(result.text(), format!("old:hi {i}"));
    }
    assert_eq!(client.call("old", b"plain").unwrap().text(), "old:plain");
    let log = master.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        master.workers().len(),
        1,
        "its worker is still the one: {log}"
    );
}
