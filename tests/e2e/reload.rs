//! Hot reload: `cp` a new build over a running plugin, signal the master, and the new code
//! runs — with jobs flowing and none lost or failed. A bad config or plugin changes nothing.

use std::collections::HashSet;
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use jobhost::protocol::Status;
use jobhost_e2e::{
    config_with, demo_plugin, fixture_plugin, is_alive, wait_until, Env, Master, SOON,
};
use nix::sys::signal::Signal;

const ECHO: &str = "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n";

#[test]
fn a_build_copied_over_a_running_plugin_takes_over_on_hup_and_no_job_is_lost_or_failed() {
    let env = Env::new();
    let v2 = fixture_plugin("echo");
    let plugin = env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    master.wait_for_workers(2);

    // A client submitting continuously, checking every result; it notes which build answered.
    let stop = Arc::new(AtomicBool::new(false));
    let seen_version = Arc::new(AtomicU8::new(0));
    let client = {
        let (stop, seen_version) = (stop.clone(), seen_version.clone());
        let mut client = master.client();
        std::thread::spawn(move || {
            let mut next = 0u64;
            let mut answered = HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                for i in next..next + 200 {
                    client
                        .send(i, "echo", format!("job {i}").as_bytes())
                        .unwrap();
                }
                for _ in 0..200 {
                    let r = client.recv().unwrap();
                    assert_eq!(
                        r.status,
                        Status::Ok,
                        "job {} failed during a reload: {}",
                        r.id,
                        r.text()
                    );
                    let text = r.text();
                    let version = if text.starts_with("v2:") { 2 } else { 1 };
                    assert_eq!(text.trim_start_matches("v2:"), format!("job {}", r.id));
                    assert!(answered.insert(r.id), "job {} answered twice", r.id);
                    seen_version.store(version, Ordering::Relaxed);
                }
                next += 200;
            }
            (next, answered.len() as u64)
        })
    };

    for round in 0..4 {
        let (build, version) = if round % 2 == 0 {
            (v2.clone(), 2)
        } else {
            (demo_plugin("echo"), 1)
        };
        // In place, as `cp` does: the same inode is rewritten while workers run its old copy.
        fs::copy(&build, &plugin).unwrap();
        master.signal(Signal::SIGHUP);
        wait_until(&format!("reload {}", round + 1), SOON, || {
            master.log_count("reload ok") == round + 1
        });
        wait_until(&format!("results from build v{version}"), SOON, || {
            seen_version.load(Ordering::Relaxed) == version
        });
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, answered) = client.join().unwrap();
    assert_eq!(sent, answered, "every job sent was answered exactly once");
    assert!(sent >= 800);
    assert_eq!(master.log_count("reload failed"), 0);
}

fn reload(env: &Env) -> jobhost_e2e::Run {
    let config = env.path().join("jobhost.toml");
    env.jobhost(&["reload", "-c", config.to_str().unwrap()])
}

fn serves(master: &Master) {
    assert_eq!(
        master
            .client()
            .call("echo", b"old generation")
            .unwrap()
            .body,
        b"old generation"
    );
}

#[test]
fn a_bad_config_or_plugin_changes_nothing_and_says_why() {
    let env = Env::new();
    let plugin = env.install("echo");
    env.install("faulty");
    let master = env.start_master(&config_with(ECHO));
    let pids = master.wait_for_workers(2);

    env.config(&config_with(&format!("{ECHO}workrs = 3\n")));
    // `jobhost reload` checks the file first and says where it is wrong ...
    reload(&env)
        .assert_code(1)
        .assert_stderr_has("jobhost.toml:11:1: pool[0].workrs: unknown key");
    // ... and the master, asked anyway (HUP, `ctl reload`), refuses it and records why.
    let reply = master.admin("reload");
    assert!(
        reply.starts_with("ERR reload failed, nothing changed: ")
            && reply.contains("pool[0].workrs"),
        "{reply}"
    );
    let status = master.admin("status");
    assert!(
        status.contains("FAILED: ") && status.contains("pool[0].workrs"),
        "{status}"
    );
    serves(&master);

    env.config(&config_with(&format!(
        "{ECHO}\n[[pool]]\nname = \"f\"\nplugin = \"faulty\"\n[pool.settings]\ninit = \"segv\"\n"
    )));
    reload(&env).assert_code(1).assert_stderr_has(
        "libfaulty.so killed the probe process with SIGSEGV while running its init",
    );
    serves(&master);

    env.config(&config_with(ECHO));
    fs::copy(fixture_plugin("wrongabi"), &plugin).unwrap();
    reload(&env)
        .assert_code(1)
        .assert_stderr_has("libecho.so has an incompatible plugin-api layout");
    serves(&master);

    let half = fs::read(demo_plugin("echo")).unwrap();
    fs::write(&plugin, &half[..64 * 1024]).unwrap();
    reload(&env)
        .assert_code(1)
        .assert_stderr_has("killed the probe process with SIGBUS while loading it");
    serves(&master);

    assert_eq!(
        master.workers(),
        pids,
        "through all of it, the same workers serve"
    );
    // And a good reload after the bad ones works.
    fs::copy(fixture_plugin("echo"), &plugin).unwrap();
    reload(&env)
        .assert_code(0)
        .assert_stdout_has("replaced echo (echo 0.2.0)");
    wait_until("v2 answers", SOON, || {
        master.client().call("echo", b"x").unwrap().body == b"v2:x"
    });
}

#[test]
fn added_pools_start_removed_pools_drain_and_unchanged_pools_keep_their_workers() {
    let env = Env::new();
    env.install("echo");
    env.install("sleep");
    env.install("hash");
    let master = env.start_master(&config_with(&format!(
        "{ECHO}\n[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 1\n"
    )));
    master.wait_for_workers(3);
    let echo_pids: Vec<i64> = worker_pids(&master, "echo");
    let mut client = master.client();
    for i in 0..6u64 {
        client.send(i, "sleep", b"200").unwrap();
    }
    client.flush().unwrap();

    env.config(&config_with(&format!(
        "{ECHO}\n[[pool]]\nname = \"hash\"\nplugin = \"hash\"\nworkers = 1\n"
    )));
    reload(&env)
        .assert_code(0)
        .assert_stdout_has("generation 2: kept echo; replaced -; added hash; removed sleep");
    // The removed pool's queued jobs are answered (run to the end), not dropped.
    let mut done: Vec<u64> = (0..6)
        .map(|_| client.recv().unwrap())
        .inspect(|r| assert!(r.is_ok(), "{}", r.text()))
        .map(|r| r.id)
        .collect();
    done.sort_unstable();
    assert_eq!(done, [0, 1, 2, 3, 4, 5]);
    let late = client.call("sleep", b"1").unwrap();
    assert_eq!(
        (late.status, late.text().as_str()),
        (Status::Rejected, "unknown pool \"sleep\"")
    );
    assert_eq!(
        client.call("hash", b"abc").unwrap().text(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    wait_until("the sleep worker to leave", SOON, || {
        master.workers().len() == 3
    });
    assert_eq!(
        worker_pids(&master, "echo"),
        echo_pids,
        "an unchanged pool keeps its workers"
    );
    let status: serde_json::Value =
        serde_json::from_str(master.admin("status json").lines().next().unwrap()).unwrap();
    assert_eq!(status["generation"], 2);
    assert_eq!(status["last_reload"]["ok"], true);
}

fn worker_pids(master: &Master, pool: &str) -> Vec<i64> {
    let doc: serde_json::Value =
        serde_json::from_str(master.admin("workers json").lines().next().unwrap()).unwrap();
    let mut pids: Vec<i64> = doc["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["pool"] == pool)
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn old_private_copies_are_deleted_once_no_worker_uses_them_and_stay_mapped() {
    let env = Env::new();
    let plugin = env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    master.wait_for_workers(2);
    let copies = || -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(env.path().join("run/plugins"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let first = copies();
    assert_eq!(first.len(), 1);
    fs::copy(fixture_plugin("echo"), &plugin).unwrap();
    master.signal(Signal::SIGHUP);
    master.wait_for_log("reload ok", SOON);
    wait_until("the old copy deleted", SOON, || {
        let now = copies();
        now.len() == 1 && now != first
    });
    let status: serde_json::Value =
        serde_json::from_str(master.admin("status json").lines().next().unwrap()).unwrap();
    assert_eq!(
        status["generations_loaded"], 2,
        "both builds stay mapped in the master"
    );
    master.wait_for_log(
        &format!(
            "deleted private plugin copy {}",
            env.path().join("run/plugins").join(&first[0]).display()
        ),
        SOON,
    );
    // Going back to the first build works although its copy was deleted.
    fs::copy(demo_plugin("echo"), &plugin).unwrap();
    master.signal(Signal::SIGHUP);
    wait_until("the second reload", SOON, || {
        master.log_count("reload ok") == 2
    });
    wait_until("v1 answers", SOON, || {
        master.client().call("echo", b"x").unwrap().body == b"x"
    });
}

/// `jobhost ctl reload` on the admin socket (not through the config file, which may be the
/// broken thing).
fn ctl_reload(env: &Env) -> jobhost_e2e::Run {
    env.jobhost(&["ctl", "--socket", "run/admin.sock", "reload"])
}

fn status_json(master: &Master) -> serde_json::Value {
    serde_json::from_str(master.admin("status json").lines().next().unwrap()).unwrap()
}

/// Checks that the last reload failed for `reason` and changed nothing: the log says so (once
/// per attempt), `status` and `status json` show it, the same generation-1 workers serve.
fn failed_for(master: &Master, reason: &str, attempts: usize, pids: &[i32]) {
    let logged = format!("master: reload failed, nothing changed: {reason}");
    wait_until(&format!("{attempts} x {logged:?}"), SOON, || {
        master.log_count(&logged) == attempts
    });
    let status = master.admin("status");
    let last = status
        .lines()
        .find(|l| l.starts_with("last reload: "))
        .unwrap_or_else(|| panic!("no last reload line:\n{status}"));
    assert!(
        last.contains(&format!(" FAILED: {reason}")),
        "{last}\n{status}"
    );
    let json = status_json(master);
    assert_eq!(json["last_reload"]["ok"], false, "{json}");
    assert_eq!(json["last_reload"]["message"], reason, "{json}");
    assert_eq!(json["generation"], 1, "{json}");
    assert_eq!(master.workers(), pids, "the same workers serve");
    serves(master);
}

#[test]
fn jobhost_reload_with_an_unparsable_file_still_asks_the_master_which_records_why() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    let pids = master.wait_for_workers(2);
    env.config(&config_with(&format!("{ECHO}workrs = 3\n")));
    let reason_part = "pool[0].workrs: unknown key";
    // Only `jobhost reload -c FILE`: no admin command, no signal from the test.
    reload(&env)
        .assert_code(1)
        .assert_stderr_has(&format!("jobhost.toml:11:1: {reason_part}"));
    // The master was asked, and says so itself: in its log, in `status`, generation 1.
    wait_until("the master's own log line", SOON, || {
        master.log_text().lines().any(|l| {
            l.contains("master: reload failed, nothing changed: ") && l.contains(reason_part)
        })
    });
    let json = status_json(&master);
    assert_eq!(json["last_reload"]["ok"], false, "{json}");
    assert!(
        json["last_reload"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(reason_part)),
        "{json}"
    );
    assert_eq!(json["generation"], 1, "{json}");
    assert_eq!(master.workers(), pids);
    serves(&master);
}

#[test]
fn a_reload_that_changes_a_restart_only_key_is_refused_and_changes_nothing() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    let pids = master.wait_for_workers(2);
    // A second pool too: a reload that went ahead would add it.
    env.config(&config_with(&format!(
        "[admin]\nsocket = \"other-admin.sock\"\n\n{ECHO}\n[[pool]]\nname = \"echo2\"\nplugin = \"echo\"\nworkers = 1\n"
    )));
    let reason = "admin.socket changed: that takes a restart of the master, not a reload";
    // Asked on the socket it has (`jobhost reload -c` would look for the new one).
    ctl_reload(&env)
        .assert_code(1)
        .assert_stderr_has(&format!("reload failed, nothing changed: {reason}"));
    failed_for(&master, reason, 1, &pids);
    assert!(!env.path().join("run/other-admin.sock").exists());
    let late = master.client().call("echo2", b"x").unwrap();
    assert_eq!(
        (late.status, late.text().as_str()),
        (Status::Rejected, "unknown pool \"echo2\"")
    );
}

#[test]
fn a_toml_syntax_error_fails_the_reload_changes_nothing_and_says_why() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    let pids = master.wait_for_workers(2);
    // An unclosed array-of-tables header.
    env.config(&format!("{}\n[[pool\nname = \"two\"\n", config_with(ECHO)));
    // The reason is the one `jobhost check` gives for the same file (the master was started
    // with the config's full path, so ask check with it too).
    let config = env.path().join("jobhost.toml");
    let check = env.jobhost(&["check", "-c", config.to_str().unwrap()]);
    check.assert_code(1);
    let reason = check
        .stderr
        .trim_end()
        .strip_prefix("jobhost: error: ")
        .unwrap_or_else(|| panic!("check's error: {:?}", check.stderr))
        .to_owned();
    assert_eq!(
        reason,
        format!(
            "{}:12:7: unclosed array table, expected `]]`",
            config.display()
        )
    );

    let ctl = ctl_reload(&env);
    ctl.assert_code(1)
        .assert_stderr_has(&format!("reload failed, nothing changed: {reason}"));
    failed_for(&master, &reason, 1, &pids);
    master.signal(Signal::SIGHUP);
    failed_for(&master, &reason, 2, &pids);

    // Fixed, it reloads.
    env.config(&config_with(ECHO));
    ctl_reload(&env)
        .assert_code(0)
        .assert_stdout_has("generation 2: kept echo; replaced -; added -; removed -");
    assert_eq!(status_json(&master)["last_reload"]["ok"], true);
    assert_eq!(master.workers(), pids);
}

#[test]
fn a_pool_naming_a_missing_plugin_fails_the_reload_changes_nothing_and_says_why() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    let pids = master.wait_for_workers(2);
    let missing = env.plugins_dir().join("libghost.so");
    env.config(&config_with(&format!(
        "{ECHO}\n[[pool]]\nname = \"ghost\"\nplugin = \"ghost\"\nworkers = 1\n"
    )));

    let reason = format!(
        "{}:14:10: pool[1].plugin: no plugin \"ghost\" in {} (there is no {}); available: echo",
        env.path().join("jobhost.toml").display(),
        env.plugins_dir().display(),
        missing.display()
    );
    master.signal(Signal::SIGHUP);
    failed_for(&master, &reason, 1, &pids);
    let ctl = ctl_reload(&env);
    ctl.assert_code(1)
        .assert_stderr_has(&format!("reload failed, nothing changed: {reason}"));
    failed_for(&master, &reason, 2, &pids);
    let late = master.client().call("ghost", b"x").unwrap();
    assert_eq!(
        (late.status, late.text().as_str()),
        (Status::Rejected, "unknown pool \"ghost\"")
    );

    // The plugin arrives: the same config now reloads, and the pool starts.
    fs::copy(demo_plugin("echo"), &missing).unwrap();
    ctl_reload(&env)
        .assert_code(0)
        .assert_stdout_has("generation 2: kept echo; replaced -; added ghost; removed -");
    assert_eq!(master.client().call("ghost", b"x").unwrap().body, b"x");
    assert_eq!(
        worker_pids(&master, "echo"),
        pids.iter().map(|&p| i64::from(p)).collect::<Vec<_>>()
    );
}

#[test]
fn changed_settings_replace_that_pools_workers_and_an_untouched_pool_keeps_its_own() {
    let env = Env::new();
    env.install("echo");
    env.install("lookup");
    let lookup = |mib: u32| {
        config_with(&format!(
            "{ECHO}\n[[pool]]\nname = \"lookup\"\nplugin = \"lookup\"\nworkers = 2\n\
             [pool.settings]\ntable_mib = {mib}\n"
        ))
    };
    let master = env.start_master(&lookup(1));
    master.wait_for_workers(4);
    let echo_before = worker_pids(&master, "echo");
    let lookup_before = worker_pids(&master, "lookup");
    assert_eq!((echo_before.len(), lookup_before.len()), (2, 2));
    // Key 200000 picks entry 200000 % entries: 131072 entries in 1 MiB, 262144 in 2 MiB.
    let index = || {
        let r = master.client().call("lookup", b"200000").unwrap();
        assert_eq!(r.status, Status::Ok, "{}", r.text());
        r.text()
            .split_whitespace()
            .find_map(|w| w.strip_prefix("index="))
            .unwrap()
            .to_owned()
    };
    assert_eq!(index(), "68928");

    env.config(&lookup(2));
    ctl_reload(&env).assert_code(0).assert_stdout_has(
        "generation 2: kept echo; replaced lookup (lookup 0.1.0); added -; removed -",
    );
    wait_until("two new lookup workers, the old ones gone", SOON, || {
        let now = worker_pids(&master, "lookup");
        now.len() == 2
            && now.iter().all(|p| !lookup_before.contains(p))
            && lookup_before.iter().all(|p| !is_alive(*p as i32))
    });
    assert_eq!(
        index(),
        "200000",
        "the new workers run with the new settings"
    );
    assert_eq!(
        worker_pids(&master, "echo"),
        echo_before,
        "the untouched pool keeps its workers"
    );
    let doc: serde_json::Value =
        serde_json::from_str(master.admin("workers json").lines().next().unwrap()).unwrap();
    for w in doc["workers"].as_array().unwrap() {
        let want = if w["pool"] == "lookup" { 2 } else { 1 };
        assert_eq!(w["generation"], want, "{w}");
    }
    serves(&master);
}

#[test]
fn a_plugin_that_hangs_in_init_fails_the_reload_while_the_master_keeps_serving() {
    let env = Env::new();
    env.install("echo");
    env.install("faulty");
    let header =
        "[host]\nplugins_dir = \"plugins\"\nruntime_dir = \"run\"\ninit_timeout = \"4s\"\n\n";
    let master = env.start_master(&format!("{header}{ECHO}"));
    let pids = master.wait_for_workers(2);
    let hangs = "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\n[pool.settings]\ninit = \"hang\"\n";
    env.config(&format!("{header}{ECHO}\n{hangs}"));
    let asked = std::time::Instant::now();
    let waiting = std::thread::spawn({
        let config = env.path().join("jobhost.toml");
        let bin = jobhost_e2e::bin_dir().join("jobhost");
        move || {
            std::process::Command::new(bin)
                .args(["reload", "-c", config.to_str().unwrap()])
                .output()
                .unwrap()
        }
    });
    wait_until("the probe to hang in init", SOON, || {
        master.log_text().contains("reloading")
    });
    // The probe hangs; the master does not: jobs keep being answered at once, and a second
    // HUP meanwhile is taken up after this reload.
    let mut client = master.client();
    for i in 0..20u32 {
        let started = std::time::Instant::now();
        assert_eq!(
            client.call("echo", &i.to_be_bytes()).unwrap().body,
            i.to_be_bytes()
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "a job took {:?} during the reload",
            started.elapsed()
        );
    }
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(4),
        "served while the probe hung"
    );
    master.signal(Signal::SIGHUP);
    let out = waiting.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("took longer than 4s while running its init"),
        "{stderr}"
    );
    let json = status_json(&master);
    assert_eq!(json["last_reload"]["ok"], false, "{json}");
    let message = json["last_reload"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("pool f: plugin ")
            && message.contains("libfaulty.so took longer than 4s while running its init"),
        "{json}"
    );
    assert_eq!(json["generation"], 1, "{json}");
    // The HUP sent meanwhile ran as a reload of its own once the first was over (and failed
    // the same way: the config still names the hanging plugin).
    wait_until("the second reload", SOON, || {
        master.log_count("reload failed, nothing changed: pool f") == 2
    });
    assert_eq!(master.workers(), pids);
}

/// `echo reload | socat - UNIX-CONNECT:run/admin.sock`: the client half-closes after its line
/// and waits for the reply, which comes once the probe of the new pool is done.
#[test]
fn a_half_closed_admin_session_still_gets_its_reload_reply() {
    use std::io::{Read, Write};
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    master.wait_for_workers(2);
    env.config(&config_with(&format!(
        "{ECHO}\n[[pool]]\nname = \"echo2\"\nplugin = \"echo\"\nworkers = 1\n"
    )));
    let mut s = std::os::unix::net::UnixStream::connect(master.admin_socket()).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    s.write_all(b"reload\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(
        reply.contains("added echo2") && reply.ends_with("OK\n"),
        "reply: {reply:?}"
    );
}

/// A flood of `reload` lines, each done at once (nothing to probe): answered one per pass of
/// the master's loop — no recursion, jobs keep flowing in between.
#[test]
fn many_reload_lines_in_one_write_are_answered_in_turn_while_jobs_flow() {
    use std::io::{BufRead, Write};
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(ECHO));
    master.wait_for_workers(2);
    let s = std::os::unix::net::UnixStream::connect(master.admin_socket()).unwrap();
    s.set_read_timeout(Some(SOON)).unwrap();
    const RELOADS: usize = 1300; // each reply once took a stack frame: ~1200 overflowed
    let mut writer = s.try_clone().unwrap();
    let feeder =
        std::thread::spawn(move || writer.write_all("reload\n".repeat(RELOADS).as_bytes()));
    wait_until("reloads under way", SOON, || {
        master.log_count("reload ok") > 10
    });
    let started = std::time::Instant::now();
    assert_eq!(
        master.client().call("echo", b"meanwhile").unwrap().body,
        b"meanwhile"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "a job waited {:?}",
        started.elapsed()
    );
    let mut replies = std::io::BufReader::new(s);
    let mut oks = 0;
    let mut line = String::new();
    while oks < RELOADS {
        line.clear();
        assert!(
            replies.read_line(&mut line).unwrap() > 0,
            "closed after {oks} replies"
        );
        oks += usize::from(line == "OK\n");
    }
    feeder.join().unwrap().unwrap();
    assert!(is_alive(master.pid()));
}

/// A session whose earlier replies are still being written when its `reload` starts waiting
/// (for a probe that hangs): the master neither spins on it nor withholds those replies.
#[test]
fn a_waiting_session_with_replies_still_to_send_does_not_spin_the_master() {
    use std::io::{Read, Write};
    let env = Env::new();
    env.install("echo");
    env.install("faulty");
    let header =
        "[host]\nplugins_dir = \"plugins\"\nruntime_dir = \"run\"\ninit_timeout = \"8s\"\n\n";
    let master = env.start_master(&format!("{header}{ECHO}"));
    master.wait_for_workers(2);
    let hangs = "[[pool]]\nname = \"f\"\nplugin = \"faulty\"\n[pool.settings]\ninit = \"hang\"\n";
    env.config(&format!("{header}{ECHO}\n{hangs}"));
    let mut s = std::os::unix::net::UnixStream::connect(master.admin_socket()).unwrap();
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = r.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    });
    let mut lines = "status\n".repeat(3000);
    lines.push_str("reload\nquit\n");
    s.write_all(lines.as_bytes()).unwrap();
    // The window starts once the reload waits: its probe (a third child of the master, after
    // the two workers) is hanging in init; the staging before it (reading and hashing the
    // plugins) is done.
    wait_until("the probe to hang in init", SOON, || {
        master.log_count("reloading") == 1 && master.workers().len() == 3
    });
    let before = jobhost_e2e::cpu_ticks(master.pid());
    std::thread::sleep(std::time::Duration::from_secs(3));
    let used = jobhost_e2e::cpu_ticks(master.pid()) - before;
    assert!(
        used < 50,
        "the master used {used} ticks of CPU in 3 s while the reload waited"
    );
    let replies = reader.join().unwrap();
    assert_eq!(
        replies.matches("\nOK\n").count(),
        3000 + 1,
        "every status and the quit"
    );
    assert!(
        replies.contains("ERR reload failed, nothing changed: pool f"),
        "the reload's answer"
    );
}
