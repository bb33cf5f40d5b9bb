//! Queue figures: what gearmand's `status` says of the pool's function (jobs queued or
//! running, running, and the difference: the lag), in `status json` and `status`, as a
//! busy worker reads them at a job's start and an idle one once after its last job.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobhost_e2e::{cpu_ticks, wait_until, Master, SOON};

use super::{have_gearman, pool, Gearmand, PATIENCE};

/// The `q` pool's source figures in `status json`: (stream_length, pending, lag, age).
fn figures(master: &Master) -> Option<(u64, u64, u64, f64)> {
    let reply = master.admin("status json");
    let json: serde_json::Value = serde_json::from_str(reply.lines().next()?).ok()?;
    let pool = json["pools"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "q")?;
    let source = &pool["source"];
    assert_eq!(source["kind"], "gearman", "{source}");
    Some((
        source["stream_length"].as_u64()?,
        source["pending"].as_u64()?,
        source["lag"].as_u64()?,
        source["figures_age_secs"].as_f64()?,
    ))
}

/// Waits until the figures are (length, pending, lag), and returns their age.
fn wait_for_figures(master: &Master, want: (u64, u64, u64), within: Duration) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let seen = figures(master);
        if let Some((length, pending, lag, age)) = seen {
            if (length, pending, lag) == want {
                return age;
            }
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(&master.log).unwrap_or_default();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("master: admin: "))
                .rev()
                .take(40)
                .collect();
            panic!(
                "timed out after {within:?} waiting for figures {want:?}; last seen {seen:?}; \
                 the master's log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Background jobs, one per line of `payloads`, submitted by one `gearman -b -N` (fast: the
/// worker, busy, takes none of them meanwhile).
fn submit_background(gm: &Gearmand, payloads: &[&str]) {
    let mut cli = Command::new("timeout")
        .args(["60", "gearman", "-h", "127.0.0.1", "-p"])
        .arg(gm.port.to_string())
        .args(["-b", "-N", "-f", "q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run gearman -b");
    {
        let mut stdin = cli.stdin.take().expect("stdin");
        let lines: String = payloads.iter().map(|p| format!("{p}\n")).collect();
        stdin.write_all(lines.as_bytes()).expect("write the jobs");
    }
    assert!(cli.wait().expect("gearman -b").success());
}

#[test]
fn status_shows_the_jobs_waiting_at_gearmand_and_zero_once_they_ran() {
    if !have_gearman() {
        return;
    }
    let env = jobhost_e2e::Env::new();
    env.install("sleep");
    let gm = Gearmand::start(&env, "gm", &[]);
    let master = env.start_master(&pool("sleep", 1, &[gm.address()], "", ""));
    master.wait_for_workers(1);
    gm.wait_for_workers("q", 1);
    // Read once after connecting: nothing queued.
    wait_for_figures(&master, (0, 0, 0), SOON);

    // The one worker busy for a while…
    submit_background(&gm, &["5000"]);
    wait_until("the worker took the long job", SOON, || {
        gm.status("q")
            .is_some_and(|(total, running, _)| (total, running) == (1, 1))
    });
    // …while four more come: the first of them long enough to be seen, the rest short.
    submit_background(&gm, &["3000", "100", "100", "100"]);
    assert_eq!(
        gm.status("q").map(|(total, running, _)| (total, running)),
        Some((5, 1)),
        "all four submitted while the long job ran"
    );
    // As the first of the four starts: it runs, three wait (gearadmin says the same).
    wait_for_figures(&master, (4, 1, 3), PATIENCE);
    let text = master.admin("status");
    assert!(
        text.contains(&format!(
            "q: gearman {} function q: connected; length 4, pending 1, lag 3 (read ",
            gm.address()
        )),
        "{text}"
    );
    // The same figures in `metrics`, per source (read from the same snapshot as `status`; the
    // 3 s job still runs, so they have not changed since).
    let metrics = master.admin("metrics");
    for line in [
        "jobhost_source_up{pool=\"q\",kind=\"gearman\"} 1\n",
        "jobhost_source_state{pool=\"q\",kind=\"gearman\",state=\"connected\"} 1\n",
        "jobhost_source_length{pool=\"q\",kind=\"gearman\"} 4\n",
        "jobhost_source_pending{pool=\"q\",kind=\"gearman\"} 1\n",
        "jobhost_source_lag{pool=\"q\",kind=\"gearman\"} 3\n",
        "jobhost_source_workers_connected{pool=\"q\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // Once they all ran (the last round comes up to a second after the last job).
    wait_for_figures(&master, (0, 0, 0), PATIENCE);
    assert_eq!(
        gm.status("q").map(|(total, running, _)| (total, running)),
        Some((0, 0))
    );
    // And then the idle worker asks no more: the figures only age, and it sleeps.
    wait_until("the idle worker's figures age", SOON, || {
        figures(&master).is_some_and(|(l, p, g, age)| (l, p, g) == (0, 0, 0) && age >= 3.0)
    });
    let worker = master.workers()[0];
    let before = cpu_ticks(worker);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(worker).saturating_sub(before);
    assert!(used <= 2, "the idle worker used {used} ticks in 2 s");
}

#[test]
fn the_figures_are_summed_over_the_servers() {
    if !have_gearman() {
        return;
    }
    let env = jobhost_e2e::Env::new();
    env.install("sleep");
    let a = Gearmand::start(&env, "a", &[]);
    let b = Gearmand::start(&env, "b", &[]);
    let master = env.start_master(&pool("sleep", 1, &[a.address(), b.address()], "", ""));
    master.wait_for_workers(1);
    a.wait_for_workers("q", 1);
    b.wait_for_workers("q", 1);
    wait_for_figures(&master, (0, 0, 0), SOON);

    submit_background(&a, &["5000"]);
    wait_until("the worker took the long job", SOON, || {
        a.status("q")
            .is_some_and(|(total, running, _)| (total, running) == (1, 1))
    });
    submit_background(&a, &["2500"]);
    submit_background(&b, &["2500", "2500"]);
    // Whichever server's job comes next: it runs, the two others wait, one at a and one at b
    // or both at b.
    wait_for_figures(&master, (3, 1, 2), PATIENCE);
    wait_for_figures(&master, (0, 0, 0), PATIENCE);
    for server in [&a, &b] {
        assert_eq!(
            server
                .status("q")
                .map(|(total, running, _)| (total, running)),
            Some((0, 0))
        );
    }
}
