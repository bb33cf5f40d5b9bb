//! Running as a daemon: `--daemon` detaches after start-up (errors still reach the terminal),
//! the pidfile is locked so a second master refuses to start, a stale one is taken over, a
//! clean exit removes it; SIGUSR1 reopens the log file after logrotate moved it.

use std::fs;

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

/// Kills a daemon (not our child, so no `Child` does it) if its test fails before stopping it;
/// its workers follow it (PR_SET_PDEATHSIG). After a normal stop it does nothing: the pid may
/// be reused by then.
struct KillDaemonOnPanic(i32);

impl Drop for KillDaemonOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() && is_alive(self.0) {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
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
    let _guard = KillDaemonOnPanic(pid);
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
    let _first = KillDaemonOnPanic(first);
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    wait_until("the killed master to go", SOON, || !is_alive(first));
    // Its workers follow it (PR_SET_PDEATHSIG); on a loaded machine one forked just before
    // the kill may not have run yet to close its copy of the job socket's listener, which
    // still answers a connect (the next master would rightly refuse to replace it).
    let jobs = env.path().join("run/jobs.sock");
    wait_until("the killed master's job socket to go quiet", SOON, || {
        std::os::unix::net::UnixStream::connect(&jobs).is_err()
    });
    assert!(pidfile.exists(), "a killed master leaves its pidfile");
    env.jobhost(&["run", "--daemon", "-c", config])
        .assert_code(0);
    let second = pid_in(&pidfile);
    let _second = KillDaemonOnPanic(second);
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

/// The files `pid` has open, by the path the kernel shows (a moved file shows its new name).
fn open_files(pid: i32) -> Vec<std::path::PathBuf> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigusr1_reopens_the_log_file_after_it_was_moved() {
    let env = Env::new();
    let config = daemon_config(&env);
    let config = config.to_str().unwrap();
    env.jobhost(&["run", "--daemon", "-c", config])
        .assert_code(0);
    let pid = pid_in(&env.path().join("run/jobhost.pid"));
    let _guard = KillDaemonOnPanic(pid);
    wait_until("two workers", SOON, || children_of(pid).len() == 2);
    let workers = children_of(pid);
    let log = env.path().join("master.log");
    let moved = env.path().join("master.log.1");
    for worker in &workers {
        // Booted (it logs once it is past fork and worker_start), with the log file open.
        wait_until(&format!("worker {worker} started"), SOON, || {
            fs::read_to_string(&log)
                .is_ok_and(|t| t.contains(&format!("jobhost[{worker}] echo: worker started")))
        });
    }
    fs::rename(&log, &moved).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
    wait_until("a new log file", SOON, || log.exists());
    // The master and each worker that was running drop the moved file and open the new one.
    for process in std::iter::once(pid).chain(workers.iter().copied()) {
        wait_until(&format!("pid {process} to reopen the log"), SOON, || {
            let files = open_files(process);
            files.contains(&log) && !files.contains(&moved)
        });
    }
    // New lines go to the new file: the master's, and those of the workers that were running
    // before the SIGUSR1 — `restart` has each of them log its stop (a debug line) as it goes.
    env.jobhost(&["ctl", "-c", config, "restart", "echo"])
        .assert_code(0);
    wait_until("lines in the new log", SOON, || {
        fs::read_to_string(&log).is_ok_and(|t| {
            t.contains("master: SIGUSR1: log reopened")
                && t.contains("admin: Restart")
                && workers
                    .iter()
                    .all(|w| t.contains(&format!("jobhost[{w}] echo: stopping on SIGTERM")))
        })
    });
    wait_until("two new workers", SOON, || {
        let now = children_of(pid);
        now.len() == 2 && now.iter().all(|p| !workers.contains(p))
    });
    let old = fs::read_to_string(&moved).unwrap();
    assert!(old.contains("running as a daemon"), "{old}");
    assert!(
        !old.contains("SIGUSR1: log reopened") && !old.contains("stopping on SIGTERM"),
        "a line written after the SIGUSR1 went to the moved file:\n{old}"
    );
    stop(pid);
}

#[test]
fn a_plugins_dir_writable_by_others_is_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    env.install("echo");
    let pools = "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n";
    let config = env.config(&config_with(pools));
    fs::set_permissions(env.plugins_dir(), fs::Permissions::from_mode(0o777)).unwrap();
    let expected = format!(
        "refusing to load plugins: plugins dir {} is writable by everyone (mode 0777)",
        env.plugins_dir().display()
    );
    env.jobhost(&["check", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has(&expected);
    env.jobhost(&["run", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has(&expected);
    // A group-writable plugin file in a safe dir is refused too.
    fs::set_permissions(env.plugins_dir(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(
        env.plugins_dir().join("libecho.so"),
        fs::Permissions::from_mode(0o775),
    )
    .unwrap();
    env.jobhost(&["check", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has("libecho.so is writable by its group (mode 0775)");
    // The operator may say it is fine.
    let insecure = env
        .config(&config_with(pools).replace("[host]\n", "[host]\ninsecure_plugins_dir = true\n"));
    env.jobhost(&["check", "-c", insecure.to_str().unwrap()])
        .assert_code(0);
}

#[test]
fn workers_drop_to_host_user_and_cannot_regain_root() {
    if !jobhost_e2e::prerequisite(
        nix::unistd::geteuid().is_root(),
        "privilege drop needs the tests to run as root",
    ) {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a user named nobody");
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(
        &config_with("[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n")
            .replace("[host]\n", "[host]\nuser = \"nobody\"\n"),
    );
    let workers = master.wait_for_workers(2);
    for pid in &workers {
        master.wait_for_log(&format!("jobhost[{pid}] echo: worker started"), SOON);
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let want = nobody.uid.as_raw();
        // real, effective, saved and filesystem uid all dropped: no way back to root.
        assert_eq!(
            uids.split_whitespace()
                .skip(1)
                .map(|u| u.parse::<u32>().unwrap())
                .collect::<Vec<_>>(),
            [want; 4],
            "{uids}"
        );
    }
    let master_uid = fs::read_to_string(format!("/proc/{}/status", master.pid())).unwrap();
    assert!(
        master_uid.lines().any(|l| l.starts_with("Uid:\t0\t")),
        "the master stays root"
    );
    assert_eq!(
        master.client().call("echo", b"as nobody").unwrap().body,
        b"as nobody"
    );
    // PR_SET_PDEATHSIG survives the drop (it is set after it): kill -9 the master, workers go.
    drop(master);
    wait_until("workers gone", SOON, || {
        workers.iter().all(|p| !is_alive(*p))
    });
}

/// A child process killed (SIGKILL, with its own children) and reaped when dropped — also
/// when a failed assertion unwinds past it, so a failing test leaves no master behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Only while it is unreaped: a reaped child's pid may already belong to someone else.
        if let Ok(None) = self.0.try_wait() {
            let workers = children_of(self.0.id() as i32);
            let _ = self.0.kill();
            let _ = self.0.wait();
            // PR_SET_PDEATHSIG takes them too; this is for a master that never set it up.
            for pid in workers {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let env = Env::new();
    env.install("echo");
    let notify = env.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    socket.set_read_timeout(Some(SOON)).unwrap();
    let config = env.config(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n",
    ));
    let mut child = KillOnDrop(
        std::process::Command::new(jobhost_e2e::bin_dir().join("jobhost"))
            .args(["run", "-c", config.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &notify)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id() as i32;
    let next = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(
        ready.starts_with(&format!("READY=1\nMAINPID={pid}\n")),
        "{ready}"
    );
    assert_eq!(children_of(pid).len(), 2, "READY=1 once every pool is up");
    kill(Pid::from_raw(pid), Signal::SIGHUP).unwrap();
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    assert_eq!(next(), "STOPPING=1");
    assert!(child.0.wait().unwrap().success());
}
