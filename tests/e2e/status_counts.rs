//! What `status` counts and what `workers` measures: a worker's exits by kind (a crash apart
//! from a scale-down, a reload or a recycle), and each worker's own memory — the figure
//! `max_rss` is compared with.

use jobhost::protocol::Status;
use jobhost_e2e::{config_with, in_sleep_job, wait_until, Env, Master, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const FAULTY: &str = "[[pool]]\nname = \"faulty\"\nplugin = \"faulty\"\nworkers = 2\n";

/// One line of JSON from an admin command.
fn json(master: &Master, command: &str) -> serde_json::Value {
    let reply = master.admin(command);
    serde_json::from_str(reply.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{command}: {e}: {reply}"))
}

/// Pool `faulty`'s exits from `status json`: crashes, timeouts, recycled, stopped.
fn exits(master: &Master) -> [u64; 4] {
    let status = json(master, "status json");
    let pool = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "faulty")
        .expect("pool faulty in status json")
        .clone();
    ["crashes", "timeouts", "recycled", "stopped"].map(|key| {
        pool[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {pool}"))
    })
}

/// The cell under `column` in the row of a `status` or `workers` table that starts with
/// `first` (a pool's name, a worker's pid).
fn cell(table: &str, first: &str, column: &str) -> String {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let at = header
        .iter()
        .position(|h| *h == column)
        .unwrap_or_else(|| panic!("no column {column}: {table}"));
    let row = lines
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first}: {table}"));
    row.split_whitespace().nth(at).unwrap().to_owned()
}

/// The `CRASHES` cell of pool `faulty` in `status`.
fn crashes_cell(master: &Master) -> String {
    let status = master.admin("status");
    // The pool table starts at its header, after the master's lines.
    let table = &status[status.find("POOL").expect("a pool table")..];
    cell(table, "faulty", "CRASHES")
}

#[test]
fn a_ttou_and_a_reload_are_no_crash_and_a_kill_9_of_a_busy_worker_is_one() {
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(FAULTY));
    master.wait_for_workers(2);
    assert_eq!(exits(&master), [0, 0, 0, 0]);
    assert_eq!(crashes_cell(&master), "0");
    assert!(!master.admin("status").contains("RESTARTS"));

    // TTOU: one worker fewer. An ordinary stop.
    master.signal(Signal::SIGTTOU);
    master.wait_for_workers(1);
    wait_until("the stop to be counted", SOON, || {
        exits(&master) == [0, 0, 0, 1]
    });

    // A reload that changes a worker-side setting replaces the worker (and scales back to 2).
    env.config(&config_with(&format!("{FAULTY}max_jobs = 100000\n")));
    let old = master.workers();
    let reply = master.admin("reload");
    assert!(reply.ends_with("OK\n"), "{reply}");
    wait_until("the old worker to be replaced", SOON, || {
        let now = master.workers();
        now.len() == 2 && old.iter().all(|p| !now.contains(p))
    });
    wait_until("the reload's stop to be counted", SOON, || {
        exits(&master) == [0, 0, 0, 2]
    });
    assert_eq!(crashes_cell(&master), "0");

    // kill -9 of a worker running a job: a crash. Its job is retried on the other worker.
    let workers = master.workers();
    let mut client = master.client();
    client.send(1, "faulty", b"pid 1500").unwrap();
    client.flush().unwrap();
    let mut busy = None;
    wait_until("the job to be running", SOON, || {
        busy = workers.iter().copied().find(|p| in_sleep_job(*p));
        busy.is_some()
    });
    let busy = busy.unwrap();
    kill(Pid::from_raw(busy), Signal::SIGKILL).expect("kill -9");
    wait_until("the crash to be counted", SOON, || {
        exits(&master) == [1, 0, 0, 2]
    });
    assert_eq!(crashes_cell(&master), "1");
    let retried = client.recv().unwrap();
    assert_eq!(retried.status, Status::Ok, "{}", retried.text());
    assert_ne!(retried.text(), busy.to_string(), "ran again elsewhere");
    master.wait_for_workers(2);
    assert_eq!(exits(&master), [1, 0, 0, 2], "the replacement is no exit");
}

/// `size()` from `workers` (`812.0K`, `64.3M`, `1.2G`) in MiB.
fn mib(cell: &str) -> f64 {
    let (number, unit) = cell.split_at(cell.len() - 1);
    let n: f64 = number.parse().unwrap_or_else(|e| panic!("{cell:?}: {e}"));
    match unit {
        "B" => n / (1024.0 * 1024.0),
        "K" => n / 1024.0,
        "M" => n,
        "G" => n * 1024.0,
        _ => panic!("unit of {cell:?}"),
    }
}

#[test]
fn workers_shows_each_workers_own_memory_and_status_does_not_measure_it() {
    const LEAK_MIB: u64 = 64;
    let env = Env::new();
    env.install("faulty");
    let master = env.start_master(&config_with(FAULTY));
    let pids = master.wait_for_workers(2);

    // Fresh workers share nearly everything with the master they were forked from.
    let fresh = json(&master, "workers json");
    for w in fresh["workers"].as_array().unwrap() {
        let own = w["own_bytes"].as_u64().expect("own_bytes measured");
        let rss = w["rss_bytes"].as_u64().expect("rss_bytes measured");
        eprintln!(
            "fresh worker {}: own {} KiB, rss {} KiB",
            w["pid"],
            own >> 10,
            rss >> 10
        );
        assert!(own < 16 << 20, "a fresh worker's own memory: {w}");
        assert!(own <= rss, "{w}");
    }

    let leaked = master
        .client()
        .call("faulty", format!("leak {LEAK_MIB}").as_bytes())
        .unwrap();
    assert_eq!(leaked.text(), format!("leaked {LEAK_MIB} MiB"));

    let doc = json(&master, "workers json");
    let own: Vec<(i64, u64)> = doc["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["pid"].as_i64().unwrap(), w["own_bytes"].as_u64().unwrap()))
        .collect();
    let (big, small): (Vec<&(i64, u64)>, Vec<_>) =
        own.iter().partition(|(_, b)| *b >= LEAK_MIB << 20);
    assert_eq!(
        (big.len(), small.len()),
        (1, 1),
        "one worker leaked: {own:?}"
    );
    assert!(small[0].1 < 16 << 20, "the other is still small: {own:?}");

    // The table's OWN column says the same.
    let table = master.admin("workers");
    assert!(table.ends_with("OK\n"), "{table}");
    let big_cell = cell(&table, &big[0].0.to_string(), "OWN");
    let small_cell = cell(&table, &small[0].0.to_string(), "OWN");
    assert!(mib(&big_cell) >= LEAK_MIB as f64, "{table}");
    assert!(mib(&small_cell) < 16.0, "{table}");
    assert!(!table.contains(" RSS "), "{table}");

    // `status json` lists the workers without walking their page tables.
    let status = json(&master, "status json");
    let listed = status["workers"].as_array().unwrap();
    assert_eq!(listed.len(), pids.len());
    for w in listed {
        assert!(w["own_bytes"].is_null(), "{w}");
        assert!(w["rss_bytes"].as_u64().is_some(), "{w}");
    }
}
