//! Plugins that break the rules are caught (issue 17): an `init` that starts a thread or leaves
//! a process running is refused at start and on reload, and leaves nothing behind (no process,
//! no pidfile lock); a process a job forks dies with its worker, however it leaves; a plugin
//! built with `panic = "abort"` is refused; and a reload that changes nothing reads and hashes
//! no plugin again.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobhost_e2e::{bin_dir, config_with, fixture_plugin, is_alive, wait_until, Env, Master, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const ECHO: &str = "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 1\n";

/// Runs `jobhost run` on `config_text` and expects it to refuse to start: returns its output.
/// A master that starts instead (its job socket appears) is killed and the test fails — at
/// once, rather than after the harness's command timeout.
fn refused_start(env: &Env, config_text: &str) -> String {
    let config = env.config(config_text);
    let out = env.path().join("refused.log");
    let log = fs::File::create(&out).unwrap();
    let mut child = Command::new(bin_dir().join("jobhost"))
        .args(["run", "-c"])
        .arg(&config)
        .current_dir(env.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let started = env.path().join("run/jobs.sock").exists();
        if started || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the master started (or hung) instead of refusing:\n{}",
                fs::read_to_string(&out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{text}");
    text
}

fn ctl_reload(env: &Env) -> jobhost_e2e::Run {
    env.jobhost(&["ctl", "--socket", "run/admin.sock", "reload"])
}

fn serves(master: &Master) {
    let reply = master.client().call("echo", b"still here").unwrap();
    assert_eq!(reply.body, b"still here");
}

/// The pids the `initfork` fixture wrote into `dir`, one file each.
fn forked_pids(dir: &Path) -> Vec<i32> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills the given pids at the end of a test, whatever happened (a failing test must not leave
/// sleepers behind).
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}

#[test]
fn a_plugin_whose_init_starts_a_thread_is_refused_at_start_and_on_reload() {
    let env = Env::new();
    env.install_file(&fixture_plugin("initthread"), "initthread");
    let pool = "[[pool]]\nname = \"t\"\nplugin = \"initthread\"\nworkers = 1\n";
    let reason = "libinitthread.so started 1 thread(s) in init; jobhost forks after init, and threads do not survive fork";
    let text = refused_start(&env, &config_with(pool));
    assert!(text.contains(reason), "{text}");

    // On reload: refused with the same reason, and the running pool goes on serving.
    env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    let pids = master.wait_for_workers(1);
    env.config(&config_with(&format!("{ECHO}\n{pool}")));
    ctl_reload(&env)
        .assert_code(1)
        .assert_stderr_has("pool t: plugin ")
        .assert_stderr_has(reason);
    assert_eq!(master.workers(), pids);
    serves(&master);
}

#[test]
fn a_plugin_whose_init_forks_is_refused_and_leaves_no_process_and_no_lock_behind() {
    let env = Env::new();
    env.install_file(&fixture_plugin("initfork"), "initfork");
    let pids_dir = env.path().join("pids");
    fs::create_dir(&pids_dir).unwrap();
    let pool = format!(
        "[[pool]]\nname = \"f\"\nplugin = \"initfork\"\nworkers = 1\n[pool.settings]\npid_dir = \"{}\"\n",
        pids_dir.display()
    );
    let text = refused_start(&env, &config_with(&pool));
    let _cleanup = KillOnDrop(forked_pids(&pids_dir));
    assert!(
        text.contains("left 1 child process(es) running after init"),
        "{text}"
    );
    // `jobhost check` probes it too, and refuses it the same way.
    env.jobhost(&["check", "-c", "jobhost.toml"])
        .assert_code(1)
        .assert_stderr_has("left 1 child process(es) running after init");
    let forked = forked_pids(&pids_dir);
    let _cleanup = KillOnDrop(forked.clone());
    assert_eq!(forked.len(), 2, "one per probe: {forked:?}");
    for pid in &forked {
        wait_until(&format!("the forked {pid} to be gone"), SOON, || {
            !is_alive(*pid)
        });
    }

    // Nothing holds the pidfile lock: the next start, on the same pidfile, works.
    env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    master.wait_for_workers(1);
    serves(&master);
}

/// The pid a `jobfork` job answered with: its forked child.
fn forked_by_job(master: &Master) -> i32 {
    let reply = master.client().call("fork", b"").unwrap();
    reply
        .text()
        .parse()
        .unwrap_or_else(|_| panic!("{}", reply.text()))
}

#[test]
fn a_process_a_job_forks_dies_with_its_worker_however_it_leaves() {
    let env = Env::new();
    env.install_file(&fixture_plugin("jobfork"), "jobfork");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"fork\"\nplugin = \"jobfork\"\nworkers = 1\nmax_jobs = 2\n",
    ));
    let mut all = Vec::new();

    // Recycled (max_jobs): the worker exits on its own after its second job (and may be gone
    // before the reply is read).
    master.wait_for_workers(1);
    let first = forked_by_job(&master);
    assert!(is_alive(first), "the job's child {first} is not running");
    let second = forked_by_job(&master);
    all.extend([first, second]);
    let _cleanup = KillOnDrop(all.clone());
    for pid in [first, second] {
        wait_until(
            &format!("the job's child {pid} to go with its recycled worker"),
            SOON,
            || !is_alive(pid),
        );
    }

    // Killed from outside.
    let worker = master.wait_for_workers(1)[0];
    let third = forked_by_job(&master);
    assert!(is_alive(third), "the job's child {third} is not running");
    let _cleanup = KillOnDrop(vec![third]);
    kill(Pid::from_raw(worker), Signal::SIGKILL).unwrap();
    wait_until("the job's child to go with its killed worker", SOON, || {
        !is_alive(third)
    });

    // SIGQUIT: the master kills every worker and leaves at once; their children go too.
    wait_until("a new worker", SOON, || {
        master.workers().first().is_some_and(|w| *w != worker)
    });
    let fourth = forked_by_job(&master);
    assert!(is_alive(fourth), "the job's child {fourth} is not running");
    let _cleanup = KillOnDrop(vec![fourth]);
    let mut master = master;
    master.signal(Signal::SIGQUIT);
    master.wait_exit(SOON);
    wait_until("the job's child to go on SIGQUIT", SOON, || {
        !is_alive(fourth)
    });
}

#[test]
fn a_plugin_built_with_panic_abort_is_refused_at_load_with_the_reason() {
    let env = Env::new();
    let plugin = env.install_file(&fixture_plugin("panicabort"), "panicabort");
    let reason = "libpanicabort.so was built with panic = \"abort\": a panic in it would kill the master (init runs there) or its worker with SIGABRT and no message";
    env.jobhost(&["plugin", "inspect", plugin.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has(reason);
    let text = refused_start(
        &env,
        &config_with("[[pool]]\nname = \"a\"\nplugin = \"panicabort\"\nworkers = 1\n"),
    );
    assert!(text.contains(reason), "{text}");
    // The same code built to unwind (every other plugin) still loads.
    env.jobhost(&[
        "plugin",
        "inspect",
        fixture_plugin("echo").to_str().unwrap(),
    ])
    .assert_code(0);
}

#[test]
fn a_no_op_reload_reads_and_hashes_no_plugin_again() {
    let env = Env::new();
    let plugin: PathBuf = env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    master.wait_for_workers(1);
    let hashed = || master.log_count("hashed plugin ");
    let unchanged = || master.log_count("is unchanged since it was hashed");
    assert_eq!(hashed(), 1, "{}", master.log_text());
    // A file is vouched for by its stamp only once it had settled when it was read (it was
    // copied just now): reload until it has.
    wait_until("a reload that skips the unchanged plugin", SOON, || {
        ctl_reload(&env).assert_code(0);
        unchanged() > 0
    });
    let (hashed_before, unchanged_before) = (hashed(), unchanged());
    for _ in 0..5 {
        ctl_reload(&env).assert_code(0);
    }
    assert_eq!(hashed(), hashed_before, "{}", master.log_text());
    assert_eq!(unchanged(), unchanged_before + 5);
    serves(&master);

    // A changed file is read and hashed again, and its new build serves.
    fs::copy(fixture_plugin("echo"), &plugin).unwrap();
    ctl_reload(&env)
        .assert_code(0)
        .assert_stdout_has("replaced echo");
    assert_eq!(hashed(), hashed_before + 1);
    wait_until("the new build to serve", SOON, || {
        master.client().call("echo", b"x").unwrap().body == b"v2:x"
    });
}
