//! Serving: results through the `gearman` CLI, background jobs, gearadmin's view, several
//! servers, a server that never answers, `jobhost check`.

use std::collections::HashSet;
use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use jobhost_e2e::{wait_until, Env, SOON};

use super::{finish, have_gearman, pool, Gearmand, PATIENCE};

#[test]
fn foreground_jobs_return_the_plugins_result_and_an_error_fails_the_job() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let gm = Gearmand::start(&env, "gm", &[]);
    let master = env.start_master(&pool("faulty", 3, &[gm.address()], "", ""));
    let workers = master.wait_for_workers(3);
    gm.wait_for_workers("q", 3);

    // gearadmin lists each worker under its client id: <host>:<pool>:<pid>.
    let listed = gm.admin(&["--workers"]);
    for pid in &workers {
        assert!(
            listed.lines().any(|l| l.contains(&format!(":q:{pid} : q"))),
            "worker {pid} in gearadmin --workers:\n{listed}"
        );
    }

    let ok = gm.cli(&["-f", "q", "ok"]);
    assert_eq!((ok.code(), ok.stdout.as_str()), (0, "ok"), "{}", ok.stderr);
    // The result is the plugin's bytes: `pid` answers with the worker's pid.
    let pid = gm.cli(&["-f", "q", "pid"]);
    assert_eq!(pid.code(), 0);
    let ran_in: i32 = pid.stdout.trim().parse().expect("a pid");
    assert!(workers.contains(&ran_in), "{ran_in} not in {workers:?}");

    // A plugin error is WORK_FAIL: the CLI says so and exits 1 (and does not hang).
    let failed = gm.cli(&["-f", "q", "nonsense"]);
    assert_eq!(failed.code(), 1, "{} / {}", failed.stdout, failed.stderr);
    assert!(failed.stderr.contains("Job failed"), "{}", failed.stderr);
    // So is a panic; the worker lives on.
    let panicked = gm.cli(&["-f", "q", "panic"]);
    assert_eq!(panicked.code(), 1);
    assert_eq!(master.workers().len(), 3);
    assert!(workers.iter().all(|pid| master.workers().contains(pid)));
    master.wait_for_log("faulty: unknown command", SOON);

    // The status shows the source and the jobs the workers counted.
    wait_until("status counts 4 jobs, 2 failed", SOON, || {
        let status = master.admin("status json");
        status.contains("\"jobs_done\":2") && status.contains("\"jobs_failed\":2")
    });
    let status = master.admin("status");
    assert!(
        status.contains(&format!(
            "q: gearman {} function q: connected",
            gm.address()
        )),
        "{status}"
    );

    // The job socket does not take jobs for a gearman pool, and says where they go.
    let refused = master.client().call("q", b"ok").unwrap();
    assert!(
        String::from_utf8_lossy(&refused.body).contains("fed by gearmand"),
        "{:?}",
        String::from_utf8_lossy(&refused.body)
    );
}

#[test]
fn with_failure_exception_a_client_that_asks_gets_the_message() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    // gearmand --exceptions: clients get WORK_EXCEPTION (the CLI prints it).
    let gm = Gearmand::start(&env, "gm", &["--exceptions"]);
    let master = env.start_master(&pool(
        "faulty",
        1,
        &[gm.address()],
        "",
        "failure = \"exception\"\n",
    ));
    master.wait_for_workers(1);
    gm.wait_for_workers("q", 1);
    let out = gm.cli(&["-f", "q", "nonsense"]);
    assert_ne!(out.code(), 124, "the CLI hung");
    assert!(
        out.stderr.contains("faulty: unknown command"),
        "{} / {}",
        out.stdout,
        out.stderr
    );
    let ok = gm.cli(&["-f", "q", "ok"]);
    assert_eq!(ok.stdout, "ok");
}

#[test]
fn background_jobs_all_run() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let gm = Gearmand::start(&env, "gm", &[]);
    let master = env.start_master(&pool("faulty", 2, &[gm.address()], "", ""));
    master.wait_for_workers(2);
    gm.wait_for_workers("q", 2);
    let trace = env.path().join("trace");
    // One background job per line (-N: each line is a job, without its newline).
    let lines: String = (0..300)
        .map(|i| format!("trace 0 job-{i} {}\n", trace.display()))
        .collect();
    let mut cli = std::process::Command::new("timeout")
        .args(["60", "gearman", "-h", "127.0.0.1", "-p"])
        .arg(gm.port.to_string())
        .args(["-b", "-N", "-f", "q"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run gearman -b");
    {
        use std::io::Write;
        let mut stdin = cli.stdin.take().expect("stdin");
        stdin.write_all(lines.as_bytes()).expect("write the jobs");
    }
    assert!(cli.wait().expect("gearman -b").success());
    wait_until("300 background jobs ran", PATIENCE, || {
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        text.lines().filter(|l| l.starts_with("end ")).count() >= 300
    });
    let text = std::fs::read_to_string(&trace).unwrap_or_default();
    let ended: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("end "))
        .filter_map(|l| l.split(' ').nth(1))
        .collect();
    let distinct: HashSet<&str> = ended.iter().copied().collect();
    assert_eq!(ended.len(), 300, "each job ran once");
    assert_eq!(distinct.len(), 300);
    wait_until("the queue is empty", SOON, || {
        gm.status("q").is_some_and(|(total, _, _)| total == 0)
    });
}

#[test]
fn two_servers_both_serve() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let a = Gearmand::start(&env, "a", &[]);
    let b = Gearmand::start(&env, "b", &[]);
    let master = env.start_master(&pool("faulty", 2, &[a.address(), b.address()], "", ""));
    let workers = master.wait_for_workers(2);
    a.wait_for_workers("q", 2);
    b.wait_for_workers("q", 2);
    // Jobs on both at once, from several clients each: every one answered.
    let mut clients = Vec::new();
    for i in 0..16 {
        let server = if i % 2 == 0 { &a } else { &b };
        clients.push(server.spawn_cli(&["-f", "q", "pid 20"]));
    }
    let mut ran_in = HashSet::new();
    for cli in clients {
        let (code, out, err) = finish(cli);
        assert_eq!(code, 0, "{out} / {err}");
        ran_in.insert(out.trim().parse::<i32>().expect("a pid"));
    }
    assert!(ran_in.iter().all(|pid| workers.contains(pid)), "{ran_in:?}");
    // Each worker serves both: stop one, the other still takes the jobs of both servers.
    master.admin("scale q 1");
    a.wait_for_workers("q", 1);
    b.wait_for_workers("q", 1);
    for server in [&a, &b] {
        let out = server.cli(&["-f", "q", "ok"]);
        assert_eq!(out.stdout, "ok");
    }
}

#[test]
fn a_server_that_never_answers_does_not_stop_the_others() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let gm = Gearmand::start(&env, "gm", &[]);
    // Accepts connections and never says a word (nor reads much).
    let silent = TcpListener::bind("127.0.0.1:0").expect("a silent server");
    let silent_addr = silent.local_addr().expect("its address").to_string();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        silent.set_nonblocking(true).ok();
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until {
            match silent.accept() {
                Ok((mut c, _)) => {
                    let mut buf = [0u8; 16];
                    let _ = c.set_nonblocking(true);
                    let _ = c.read(&mut buf);
                    conns.push(c);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            if conns.len() > 100 {
                break;
            }
        }
    });
    let master = env.start_master(&pool(
        "faulty",
        2,
        &[silent_addr.clone(), gm.address()],
        "",
        "",
    ));
    master.wait_for_workers(2);
    gm.wait_for_workers("q", 2);
    // The live server's jobs are served at once, over and over.
    let started = Instant::now();
    for _ in 0..20 {
        let out = gm.cli(&["-f", "q", "ok"]);
        assert_eq!((out.code(), out.stdout.as_str()), (0, "ok"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "20 jobs took {:?} next to a silent server",
        started.elapsed()
    );
    // And status says which server is not answering, once the workers gave up on it.
    wait_until("status names the silent server", PATIENCE, || {
        let status = master.admin("status");
        status.contains(&format!(
            "function q: partly disconnected (1 of 2 servers up; {silent_addr}: "
        ))
    });
    // Given up on within the answer timeout, and retried.
    wait_until("the silent server is given up on", PATIENCE, || {
        master
            .admin("status")
            .contains(&format!("{silent_addr}: no answer to ECHO_REQ within 10s"))
    });
    drop(held);
}

#[test]
fn check_says_which_servers_answer() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let gm = Gearmand::start(&env, "gm", &[]);
    let nobody = format!("127.0.0.1:{}", super::free_port());
    let config = env.config(&pool("faulty", 1, &[gm.address(), nobody.clone()], "", ""));
    let out = env.jobhost(&["check", "-c", config.to_str().unwrap()]);
    out.assert_code(0);
    out.assert_stdout_has(&format!("ok   gearman {} answers", gm.address()));
    out.assert_stdout_has(&format!("warn gearman {nobody}: "));
    out.assert_stdout_has("workers will retry until it answers");
}

#[test]
fn a_plugins_progress_and_data_reach_the_client_as_work_status_and_work_data() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("sleep");
    let gm = Gearmand::start(&env, "gm", &[]);
    let master = env.start_master(&pool("sleep", 1, &[gm.address()], "", ""));
    master.wait_for_workers(1);
    gm.wait_for_workers("q", 1);
    // The CLI prints each WORK_STATUS as "NN% Complete" (after the result, as it buffers).
    let out = gm.cli(&["-f", "q", "600"]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let percents: Vec<u32> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_suffix("% Complete"))
        .filter_map(|p| p.trim_start_matches("slept 600").trim().parse().ok())
        .collect();
    assert!(percents.len() >= 3, "{:?}", out.stdout);
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");
    assert_eq!(percents.last(), Some(&100), "{:?}", out.stdout);
    assert!(out.stdout.starts_with("slept 600"), "{:?}", out.stdout);
    // WORK_DATA chunks come before the result, which the CLI concatenates.
    let out = gm.cli(&["-f", "q", "300 data"]);
    assert_eq!(out.code(), 0, "{}", out.stderr);
    let (data, _) = out
        .stdout
        .split_once("slept 300")
        .unwrap_or_else(|| panic!("{:?}", out.stdout));
    let steps: Vec<u64> = data.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(steps.len() >= 2, "{data:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
}
