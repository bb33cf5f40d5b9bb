//! Hot reload: `cp` a new build over a running plugin, signal the master, and the new code
//! runs — with jobs flowing and none lost or failed. A bad config or plugin changes nothing.

use std::collections::HashSet;
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use jobhost::protocol::Status;
use jobhost_e2e::{config_with, demo_plugin, fixture_plugin, wait_until, Env, Master, SOON};
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
