//! The admin interface: a telnet-friendly line protocol on `admin.sock` (and optionally TCP
//! with a token), and `jobhost ctl`. Every command's effect is checked on real workers.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use jobhost::protocol::Status;
use jobhost_e2e::{config_with, in_sleep_job, wait_until, Env, Master, SOON};

fn two_pools(env: &Env) -> Master {
    env.install("echo");
    env.install("sleep");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n\n[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 1\n",
    ));
    master.wait_for_workers(3);
    master
}

/// The pids of one pool's workers, from `workers json`.
fn pids_of_pool(master: &Master, pool: &str) -> Vec<i32> {
    let doc: serde_json::Value =
        serde_json::from_str(master.admin("workers json").lines().next().unwrap()).unwrap();
    doc["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["pool"] == pool)
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

#[test]
fn status_and_workers_describe_the_running_master() {
    let env = Env::new();
    let master = two_pools(&env);
    assert_eq!(master.client().call("echo", b"x").unwrap().body, b"x");
    let mode = std::fs::metadata(master.admin_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the admin socket is for its owner only");

    let status = master.admin("status");
    assert!(status.ends_with("OK\n"), "{status}");
    assert!(
        status.contains(&format!("pid {}", master.pid())),
        "{status}"
    );
    let echo_row = status
        .lines()
        .find(|l| l.starts_with("echo "))
        .expect("a row for pool echo");
    assert!(
        echo_row.contains(" ok ") && echo_row.contains("2/2"),
        "{echo_row}"
    );

    let json: serde_json::Value =
        serde_json::from_str(master.admin("status json").lines().next().unwrap()).unwrap();
    let echo = &json["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "echo")
        .unwrap()
        .clone();
    assert_eq!(echo["workers_wanted"], 2);
    assert_eq!(echo["workers_running"], 2);
    assert_eq!(echo["jobs_done"], 1);
    assert_eq!(echo["state"], "ok");

    let workers: serde_json::Value =
        serde_json::from_str(master.admin("workers json").lines().next().unwrap()).unwrap();
    let mut pids: Vec<i64> = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    pids.sort_unstable();
    let real: Vec<i64> = master.workers().into_iter().map(i64::from).collect();
    assert_eq!(pids, real, "workers json lists exactly the real workers");
    let table = master.admin("workers");
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .trim_start()
            .starts_with("PID"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 1 + 3 + 1, "{table}");
    assert!(master.admin("help").contains("scale POOL N"));
}

#[test]
fn scale_changes_the_number_of_worker_processes() {
    let env = Env::new();
    let master = two_pools(&env);
    assert!(master.admin("scale echo 5").ends_with("OK\n"));
    master.wait_for_workers(6);
    assert!(master.admin("scale echo 0").ends_with("OK\n"));
    master.wait_for_workers(1);
    assert_eq!(
        master.admin("scale nosuch 1"),
        "ERR no pool \"nosuch\" (pools: echo, sleep)\n"
    );
}

#[test]
fn restart_replaces_every_pid_without_failing_a_running_job() {
    let env = Env::new();
    let master = two_pools(&env);
    let before = master.workers();
    let sleeper = pids_of_pool(&master, "sleep");
    assert_eq!(sleeper.len(), 1, "{sleeper:?}");
    let mut client = master.client();
    client.send(1, "sleep", b"1200").unwrap();
    client.flush().unwrap();
    // The restart must come while the job runs: wait until its worker sleeps in it.
    wait_until("the sleep job to be running", SOON, || {
        in_sleep_job(sleeper[0])
    });
    assert!(master
        .admin("restart all")
        .contains("restarting 3 worker(s) in 2 pool(s)"));
    let result = client.recv().unwrap();
    assert_eq!(
        (result.status, result.text().as_str()),
        (Status::Ok, "slept 1200")
    );
    wait_until("three new workers", SOON, || {
        let now = master.workers();
        now.len() == 3 && now.iter().all(|p| !before.contains(p))
    });
    assert_eq!(
        master.client().call("echo", b"after").unwrap().body,
        b"after"
    );
}

#[test]
fn stop_keeps_the_queue_and_start_runs_it() {
    let env = Env::new();
    let master = two_pools(&env);
    assert!(master
        .admin("stop echo")
        .contains("pool echo: stopping 2 worker(s)"));
    master.wait_for_workers(1);
    let status = master.admin("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("echo ") && l.contains(" stopped ")),
        "{status}"
    );
    let mut client = master.client();
    client.send(5, "echo", b"waits for start").unwrap();
    client.flush().unwrap();
    // Taken in, and kept: queued, not run, while the pool is stopped.
    wait_until("the job to be queued", SOON, || {
        let status = master.admin("status json");
        let json: serde_json::Value = serde_json::from_str(status.lines().next().unwrap()).unwrap();
        let echo = json["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "echo")
            .unwrap()
            .clone();
        echo["jobs_queued"] == 1 && echo["jobs_done"] == 0
    });
    assert!(master.admin("start echo").ends_with("OK\n"));
    let result = client.recv().unwrap();
    assert_eq!((result.id, result.text().as_str()), (5, "waits for start"));
    master.wait_for_workers(3);
}

#[test]
fn shutdown_stops_the_master_and_quit_ends_the_session() {
    let env = Env::new();
    let mut master = two_pools(&env);
    let mut session = master.admin_session();
    assert_eq!(session.command("quit"), "OK\n");
    assert!(session.is_closed(), "the session is still open after quit");
    assert_eq!(master.admin("shutdown graceful"), "OK\n");
    assert_eq!(master.wait_exit(SOON), 0);
    assert!(!master.admin_socket().exists());
}

#[test]
fn shutdown_now_stops_at_once() {
    let env = Env::new();
    let mut master = two_pools(&env);
    let sleeper = pids_of_pool(&master, "sleep");
    let mut client = master.client();
    client.send(1, "sleep", b"60000").unwrap();
    client.flush().unwrap();
    wait_until("the sleep job to be running", SOON, || {
        in_sleep_job(sleeper[0])
    });
    assert_eq!(master.admin("shutdown now"), "OK\n");
    assert_eq!(client.recv().unwrap().text(), "shutting down");
    assert_eq!(master.wait_exit(SOON), 0);
}

#[test]
fn bad_lines_get_err_and_never_disturb_other_sessions() {
    let env = Env::new();
    let master = two_pools(&env);
    let mut other = master.admin_session();
    assert!(other.command("status").ends_with("OK\n"));

    let mut s = master.admin_session();
    assert_eq!(
        s.command("frobnicate"),
        "ERR unknown command \"frobnicate\" (try help)\n"
    );
    assert!(s
        .command("scale echo")
        .starts_with("ERR usage: scale POOL N"));
    assert!(s
        .command("scale echo many")
        .starts_with("ERR scale: N must be a whole number"));
    // CRLF works, as telnet sends it.
    s.stream.write_all(b"status\r\n").unwrap();
    assert!(s.read_reply().ends_with("OK\n"));

    let mut long = master.admin_session();
    // In one write: the master closes as soon as it has read 4096 bytes of one line.
    let mut line = vec![b'a'; 5000];
    line.push(b'\n');
    long.stream.write_all(&line).unwrap();
    assert_eq!(long.read_reply(), "ERR line over 4096 bytes; closing\n");
    assert!(
        long.is_closed(),
        "a session with an over-long line stays open"
    );

    let mut garbage = master.admin_session();
    garbage
        .stream
        .write_all(&[0xff, 0x00, 0x13, 0x37, 0x01, b'\n'])
        .unwrap();
    assert_eq!(garbage.read_reply(), "ERR not a text line; closing\n");
    assert!(garbage.is_closed(), "a session that sent binary stays open");

    let idle: Vec<_> = (0..1000).map(|_| master.admin_session()).collect();
    assert!(
        other.command("workers").ends_with("OK\n"),
        "the first session still works"
    );
    drop(idle);
    assert!(master.admin("status").ends_with("OK\n"));
}

#[test]
fn the_tcp_port_wants_the_token_first() {
    let env = Env::new();
    env.install("echo");
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    std::fs::write(env.path().join("admin.token"), "s3cret-token-0123456789\n").unwrap();
    // Only its owner may read it: the master refuses it otherwise (see access.rs).
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(env.path().join("admin.token"), private).unwrap();
    let master = env.start_master(&config_with(&format!(
        "[admin]\ntcp = \"127.0.0.1:{port}\"\ntoken_file = \"admin.token\"\n\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n"
    )));
    let session = |lines: &[&str]| -> Vec<String> {
        use std::io::{BufRead, BufReader};
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(SOON)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        lines
            .iter()
            .map(|l| {
                if stream.write_all(format!("{l}\r\n").as_bytes()).is_err() {
                    return String::new();
                }
                let mut reply = String::new();
                loop {
                    let mut line = String::new();
                    // EOF, or a reset when the master closed with our next line unread.
                    if !matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                        return reply;
                    }
                    reply.push_str(&line);
                    if line == "OK\n" || line.starts_with("ERR") {
                        return reply;
                    }
                }
            })
            .collect()
    };
    assert_eq!(
        session(&["status"])[0],
        "ERR authenticate first: auth <token>\n"
    );
    let wrong = session(&["auth nope", "status"]);
    assert_eq!(wrong[0], "ERR wrong token\n");
    assert_eq!(wrong[1], "", "a wrong token closes the session");
    let right = session(&["auth s3cret-token-0123456789", "status"]);
    assert_eq!(right[0], "OK\n");
    assert!(
        right[1].contains(&format!("pid {}", master.pid())),
        "{}",
        right[1]
    );
}

#[test]
fn ctl_prints_replies_and_exits_1_on_err_or_no_master() {
    let env = Env::new();
    let master = two_pools(&env);
    let config = env.path().join("jobhost.toml");
    let config = config.to_str().unwrap();
    env.jobhost(&["ctl", "-c", config, "status"])
        .assert_code(0)
        .assert_stdout_has("echo ");
    env.jobhost(&["ctl", "-c", config, "scale", "echo", "3"])
        .assert_code(0);
    master.wait_for_workers(4);
    let json = env.jobhost(&["ctl", "--json", "-c", config, "workers"]);
    json.assert_code(0);
    let doc: serde_json::Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(doc["workers"].as_array().unwrap().len(), 4);
    env.jobhost(&["ctl", "-c", config, "scale", "nosuch", "1"])
        .assert_code(1)
        .assert_stderr_has("no pool \"nosuch\"");
    env.jobhost(&["ctl", "--socket", "run/nothere.sock", "status"])
        .assert_code(1)
        .assert_stderr_has("no jobhost master at run/nothere.sock — is it running?");
}
