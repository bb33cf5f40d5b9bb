//! Running as a daemon: `--daemon` detaches after start-up (errors still reach the terminal),
//! the pidfile is locked so a second master refuses to start, a stale one is taken over, a
//! clean exit removes it; SIGUSR1 reopens the log file after logrotate moved it.

use std::fs;
use std::time::Duration;

use jobhost_e2e::{children_of, config_with, is_alive, wait_until, Env, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn daemon_config(env: &Env) -> std::path::PathBuf {
    env.install("echo");
    env.config(
        &config_with("[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n")
            .replace("[host]\n", "[host]\nlog = \"master.log\"\n"),
    )
}

fn pid_in(file: &std::path::Path) -> i32 {
    fs::read_to_string(file).unwrap().trim().parse().unwrap()
}

/// Stops the daemon (if alive) and waits for it to go.
fn stop(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    wait_until("the daemon to exit", SOON, || !is_alive(pid));
}

#[test]
fn daemon_detaches_writes_a_locked_pidfile_refuses_a_second_start_and_cleans_up() {
    let env = Env::new();
    let config = daemon_config(&env);
    let config = config.to_str().unwrap();
    let pidfile = env.path().join("run/jobhost.pid");
    env.jobhost(&["run", "--daemon", "-c", config])
        .assert_code(0);
    let pid = pid_in(&pidfile);
    assert!(is_alive(pid));
    // Detached: its own session, not ours; its workers are its children.
    let sid = nix::unistd::getsid(Some(Pid::from_raw(pid))).unwrap();
    assert_ne!(sid, nix::unistd::getsid(None).unwrap());
    wait_until("two workers", SOON, || children_of(pid).len() == 2);
    let submit = env.jobhost(&["submit", "-c", config, "echo", "from a daemon"]);
    submit.assert_code(0).assert_stdout_has("from a daemon");

    env.jobhost(&["run", "--daemon", "-c", config])
        .assert_code(1)
        .assert_stderr_has(&format!("already running as pid {pid}"));
    env.jobhost(&["run", "-c", config])
        .assert_code(1)
        .assert_stderr_has(&format!("already running as pid {pid}"));

    stop(pid);
    assert!(!pidfile.exists(), "a clean exit removes the pidfile");
}

#[test]
fn a_stale_pidfile_left_by_a_killed_master_is_taken_over() {
    let env = Env::new();
    let config = daemon_config(&env);
    let config = config.to_str().unwrap();
    let pidfile = env.path().join("run/jobhost.pid");
    env.jobhost(&["run", "--daemon", "-c", config])
        .assert_code(0);
    let first = pid_in(&pidfile);
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    wait_until("the killed master to go", SOON, || !is_alive(first));
    assert!(pidfile.exists(), "a killed master leaves its pidfile");
    env.jobhost(&["run", "--daemon", "-c", config])
        .assert_code(0);
    let second = pid_in(&pidfile);
    assert_ne!(first, second);
    assert!(fs::read_to_string(env.path().join("master.log"))
        .unwrap()
        .contains("taking over the stale pidfile"));
    stop(second);
}

#[test]
fn a_start_up_error_reaches_the_terminal_and_the_exit_status() {
    let env = Env::new();
    env.install("faulty");
    let config = env.config(&config_with(
        "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\n[pool.settings]\ninit = \"fail\"\n",
    ));
    env.jobhost(&["run", "--daemon", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has("init failed: faulty: asked to fail in init");
    assert!(!env.path().join("run/jobhost.pid").exists());
}

#[test]
fn sigusr1_reopens_the_log_file_after_it_was_moved() {
    let env = Env::new();
    let config = daemon_config(&env);
    let config = config.to_str().unwrap();
    env.jobhost(&["run", "--daemon", "-c", config])
        .assert_code(0);
    let pid = pid_in(&env.path().join("run/jobhost.pid"));
    wait_until("two workers", SOON, || children_of(pid).len() == 2);
    let log = env.path().join("master.log");
    fs::rename(&log, env.path().join("master.log.1")).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    wait_until("a new log file", SOON, || log.exists());
    // New lines go to the new file: the master's, and a worker's (it reopened too).
    env.jobhost(&["ctl", "-c", config, "restart", "echo"])
        .assert_code(0);
    wait_until("lines in the new log", SOON, || {
        fs::read_to_string(&log).is_ok_and(|t| {
            t.contains("master: SIGUSR1: log reopened") && t.contains("admin: Restart")
        })
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(fs::read_to_string(env.path().join("master.log.1"))
        .unwrap()
        .contains("running as a daemon"));
    stop(pid);
}
