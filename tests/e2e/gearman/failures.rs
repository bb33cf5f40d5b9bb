//! Failures: workers killed under load, gearmand restarted under load, a hot reload under
//! load, a job that hangs past job_timeout.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobhost_e2e::{demo_plugin, fixture_plugin, wait_until, Env, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{finish, have_gearman, pool, Gearmand, PATIENCE};

/// Keeps `clients` foreground `gearman` jobs of `payload` in flight until `stop`; returns how
/// many were answered and the ones that were not (exit code, stdout, stderr).
fn load(
    gm: &Gearmand,
    clients: usize,
    payload: &'static str,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    check: fn(&str) -> bool,
) -> std::thread::JoinHandle<Vec<(i32, String, String)>> {
    let port = gm.port;
    std::thread::spawn(move || {
        let mut bad = Vec::new();
        let spawn = || {
            std::process::Command::new("timeout")
                .args(["60", "gearman", "-h", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["-f", "q", payload])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run gearman")
        };
        let mut running: Vec<std::process::Child> = (0..clients).map(|_| spawn()).collect();
        while !running.is_empty() {
            let mut next = Vec::new();
            for mut child in running {
                match child.try_wait() {
                    Ok(Some(_)) => {
                        let (code, out, err) = finish(child);
                        if code == 0 && check(&out) {
                            answered.fetch_add(1, Ordering::Relaxed);
                        } else {
                            bad.push((code, out, err));
                        }
                        if !stop.load(Ordering::Relaxed) {
                            next.push(spawn());
                        }
                    }
                    _ => next.push(child),
                }
            }
            running = next;
            std::thread::sleep(Duration::from_millis(5));
        }
        bad
    })
}

#[test]
fn kill_9_of_workers_under_load_every_foreground_job_still_completes() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let gm = Gearmand::start(&env, "gm", &[]);
    let master = env.start_master(&pool("faulty", 3, &[gm.address()], "", ""));
    master.wait_for_workers(3);
    gm.wait_for_workers("q", 3);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    // Jobs of 30 ms, so a kill lands in the middle of one most of the time.
    let clients = load(&gm, 8, "pid 30", stop.clone(), answered.clone(), |out| {
        out.trim().parse::<i32>().is_ok()
    });
    wait_until("jobs flowing", PATIENCE, || {
        answered.load(Ordering::Relaxed) >= 20
    });
    let mut killed = 0;
    let until = Instant::now() + Duration::from_secs(60);
    while killed < 12 && Instant::now() < until {
        let workers = master.workers();
        if let Some(&victim) = workers.get(killed % workers.len().max(1)) {
            let _ = kill(Pid::from_raw(victim), Signal::SIGKILL);
            killed += 1;
            // The replacement registers with gearmand at once.
            wait_until("replacement registered", SOON, || {
                master.workers().len() == 3 && !master.workers().contains(&victim)
            });
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(killed, 12);
    let before = answered.load(Ordering::Relaxed);
    wait_until("jobs flowing after the kills", PATIENCE, || {
        answered.load(Ordering::Relaxed) >= before + 20
    });
    stop.store(true, Ordering::Relaxed);
    let bad = clients.join().expect("the load thread");
    assert!(bad.is_empty(), "jobs not answered well: {bad:?}");
    assert!(answered.load(Ordering::Relaxed) >= 60);
    gm.wait_for_workers("q", 3);
    assert!(master.log_count("crash") >= 1 || master.log_count("killed by") >= 1);
}

#[test]
fn gearmand_restarted_under_load_the_pool_reconnects_and_goes_on() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let mut gm = Gearmand::start(&env, "gm", &[]);
    let master = env.start_master(&pool("faulty", 2, &[gm.address()], "", ""));
    let workers = master.wait_for_workers(2);
    gm.wait_for_workers("q", 2);
    for _ in 0..5 {
        assert_eq!(gm.cli(&["-f", "q", "ok"]).stdout, "ok");
    }
    gm.stop();
    // Each worker says so once, however long the outage.
    wait_until("both workers saw the outage", SOON, || {
        master.log_count("reconnecting (logged once per outage)") == 2
    });
    wait_until("status shows it", SOON, || {
        let status = master.admin("status");
        status.contains("q: gearman") && status.contains(": disconnected")
    });
    std::thread::sleep(Duration::from_secs(2)); // several retries, each logged at debug only
    assert_eq!(master.log_count("reconnecting (logged once per outage)"), 2);
    gm.restart();
    gm.wait_for_workers("q", 2);
    wait_until("both workers say they are back", SOON, || {
        master.log_count("connected again after") == 2
    });
    // Under load now: jobs flow, then the server goes away and comes back in the middle.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients = load(&gm, 4, "ok", stop.clone(), answered.clone(), |out| {
        out == "ok"
    });
    wait_until("jobs flowing", PATIENCE, || {
        answered.load(Ordering::Relaxed) >= 10
    });
    gm.restart();
    gm.wait_for_workers("q", 2);
    let before = answered.load(Ordering::Relaxed);
    wait_until("jobs flowing after the restart", PATIENCE, || {
        answered.load(Ordering::Relaxed) >= before + 10
    });
    stop.store(true, Ordering::Relaxed);
    let _ = clients.join(); // jobs in flight at the restart were lost with gearmand's queue
                            // The same workers throughout: an outage costs no worker.
    assert_eq!(master.workers(), workers);
    wait_until("status connected again", SOON, || {
        master.admin("status").contains(&format!(
            "q: gearman {} function q: connected",
            gm.address()
        ))
    });
}

#[test]
fn hot_reload_of_the_plugin_under_load_fails_no_job() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    let plugin = env.install("echo");
    let gm = Gearmand::start(&env, "gm", &[]);
    let master = env.start_master(&pool("echo", 2, &[gm.address()], "", ""));
    master.wait_for_workers(2);
    gm.wait_for_workers("q", 2);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    // Either build's answer is right; anything else (a failure, a hang) is not.
    let clients = load(&gm, 6, "x", stop.clone(), answered.clone(), |out| {
        out == "x" || out == "v2:x"
    });
    wait_until("jobs flowing", PATIENCE, || {
        answered.load(Ordering::Relaxed) >= 10
    });
    let v2 = fixture_plugin("echo"); // tests/fixtures/echo-v2: answers "v2:" + payload
    for round in 0..4 {
        let build = if round % 2 == 0 {
            v2.clone()
        } else {
            demo_plugin("echo")
        };
        std::fs::copy(&build, &plugin).expect("install the new build");
        master.signal(Signal::SIGHUP);
        wait_until(&format!("reload {}", round + 1), SOON, || {
            master.log_count("reload ok") == round + 1
        });
        let before = answered.load(Ordering::Relaxed);
        wait_until("jobs flowing after the reload", PATIENCE, || {
            answered.load(Ordering::Relaxed) >= before + 5
        });
    }
    let v2_answers = gm.cli(&["-f", "q", "x"]);
    assert_eq!(
        v2_answers.stdout, "x",
        "the last build installed is echo's own"
    );
    stop.store(true, Ordering::Relaxed);
    let bad = clients.join().expect("the load thread");
    assert!(
        bad.is_empty(),
        "jobs that failed across the reloads: {bad:?}"
    );
    assert_eq!(master.log_count("reload failed"), 0);
    gm.wait_for_workers("q", 2);
}

#[test]
fn a_job_that_hangs_past_job_timeout_is_killed_and_gearmand_retries_then_fails_it() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    // gearmand gives a job whose worker died to another, twice in all here, then fails it.
    let gm = Gearmand::start(&env, "gm", &["--job-retries=2"]);
    let master = env.start_master(&pool(
        "faulty",
        2,
        &[gm.address()],
        "job_timeout = \"1s\"\n",
        "",
    ));
    master.wait_for_workers(2);
    gm.wait_for_workers("q", 2);
    let started = Instant::now();
    let out = gm.cli(&["-f", "q", "hang"]);
    assert_eq!(out.code(), 1, "{} / {}", out.stdout, out.stderr);
    assert!(out.stderr.contains("Job failed"), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(50));
    wait_until("two timeouts logged", SOON, || {
        master.log_count("job_timeout") >= 2
    });
    // The pool is whole again and serves.
    gm.wait_for_workers("q", 2);
    assert_eq!(gm.cli(&["-f", "q", "ok"]).stdout, "ok");
}
