//! Admin sessions are bounded in work, memory and time (issue 17): one that pipelines
//! thousands of `workers json` and never reads does not stop jobs being answered nor grow the
//! master, and is still served every reply in order once it reads; a TCP session that does
//! not authenticate within `admin.auth_timeout`, and any session idle for `admin.idle_timeout`,
//! is closed — each kind logged at most once a second with a count — but not one waiting for
//! its `reload`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobhost_e2e::{config_with, is_reset, is_timeout, wait_until, Env, Master, SOON};

const TOKEN: &str = "s3cret-token-0123456789";

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: i32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// True once the peer has closed `stream`: end of file or a reset. False while it is still
/// open after [`SOON`].
fn closed_by_master(stream: &mut impl Read) -> bool {
    let deadline = Instant::now() + SOON;
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_reset(&e) => return true,
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("reading a session: {e}"),
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// Sessions the log says were closed for `reason`, and in how many lines: "closed an admin
/// session: …" is one, "closed N admin sessions in the last …: …" is N.
fn closes_logged(master: &Master, reason: &str) -> (u64, usize) {
    let text = master.log_text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("admin: closed ") && l.ends_with(reason))
        .collect();
    let total = lines
        .iter()
        .map(|l| {
            let after = l.split_once("admin: closed ").map_or("", |(_, a)| a);
            after
                .split(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(1)
        })
        .sum();
    (total, lines.len())
}

/// Each kind of close is one line at once, then at most one a second, and accounts for every
/// session.
fn assert_closes_logged(master: &Master, reason: &str, sessions: u64, since: Instant) {
    wait_until(
        &format!("{sessions} sessions logged as closed: {reason}"),
        SOON,
        || closes_logged(master, reason).0 == sessions,
    );
    let (total, lines) = closes_logged(master, reason);
    let allowed = 2 + since.elapsed().as_secs() as usize;
    assert_eq!(total, sessions, "{}", master.log_text());
    assert!(
        lines <= allowed && (lines as u64) < sessions,
        "{lines} log lines for {sessions} closed sessions (allowed {allowed}):\n{}",
        master.log_text()
    );
    assert!(
        master.log_count("admin sessions in the last") >= 1,
        "no line with a count:\n{}",
        master.log_text()
    );
}

#[test]
fn a_session_pipelining_workers_json_without_reading_starves_nothing_and_gets_every_reply() {
    const GROUPS: usize = 500;
    const PER_GROUP: usize = 100;
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n",
    ));
    master.wait_for_workers(2);
    // Warm up the paths a job and a `workers json` take, then note the master's peak memory.
    assert!(master.admin("workers json").ends_with("OK\n"));
    let mut client = master.client();
    assert_eq!(client.call("echo", b"warm").unwrap().body, b"warm");
    let peak_before = status_kib(master.pid(), "VmHWM:");

    // 50,000 `workers json`, each hundred followed by a line that names its group (answered
    // `ERR unknown command "group-N"`), sent as fast as the master takes them; never read
    // until the end.
    let abuser = UnixStream::connect(master.admin_socket()).expect("connect the admin socket");
    abuser.set_read_timeout(Some(SOON)).unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = std::thread::spawn({
        let mut stream = abuser.try_clone().unwrap();
        let sent = Arc::clone(&sent);
        move || {
            for group in 0..GROUPS {
                let mut chunk = "workers json\n".repeat(PER_GROUP);
                chunk.push_str(&format!("group-{group}\n"));
                stream
                    .write_all(chunk.as_bytes())
                    .expect("send admin lines");
                sent.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        }
    });
    wait_until("the session to have sent 64 KiB of lines", SOON, || {
        sent.load(Ordering::Relaxed) >= 64 << 10
    });

    // Jobs are answered while it is connected with lines left and replies unread.
    for round in 0..5u64 {
        for i in 0..200u64 {
            client
                .send(round * 1000 + i, "echo", format!("job {i}").as_bytes())
                .unwrap();
        }
        let results = jobhost_e2e::recv_n(&mut client, 200);
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    }
    // Another session is answered too.
    let status = master.admin("status");
    assert!(status.ends_with("OK\n"), "{status}");
    let peak_meanwhile = status_kib(master.pid(), "VmHWM:");

    // Now it reads: every reply, in order, the session open throughout.
    let mut reader = BufReader::new(abuser.try_clone().unwrap());
    let mut line = String::new();
    let mut read_line = |what: &str| -> String {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading {what}: {e}"));
        assert!(n > 0, "the master closed the session before {what}");
        line.clone()
    };
    for group in 0..GROUPS {
        for i in 0..PER_GROUP {
            let json = read_line(&format!("reply {i} of group {group}"));
            assert!(
                json.starts_with("{\"workers\":["),
                "group {group} reply {i}: {json}"
            );
            assert_eq!(read_line("its OK"), "OK\n", "group {group} reply {i}");
        }
        assert_eq!(
            read_line(&format!("the reply to group-{group}")),
            format!("ERR unknown command \"group-{group}\" (try help)\n")
        );
    }
    writer.join().unwrap();
    // The session still works.
    (&abuser).write_all(b"status\n").unwrap();
    while read_line("the reply to status") != "OK\n" {}
    let peak_after = status_kib(master.pid(), "VmHWM:");
    eprintln!(
        "master VmHWM: {peak_before} KiB before, {peak_meanwhile} KiB while the session held \
         its replies, {peak_after} KiB after {} of them",
        GROUPS * (PER_GROUP + 1)
    );
    // Replying to every line as it came would hold ~30 MB of replies.
    assert!(
        peak_after < peak_before + 8 * 1024,
        "the master's peak RSS grew from {peak_before} KiB to {peak_after} KiB"
    );
    assert_eq!(client.call("echo", b"after").unwrap().body, b"after");
}

fn tcp_admin_env(extra_admin: &str) -> (Env, u16) {
    let env = Env::new();
    env.install("echo");
    let token = env.path().join("admin.token");
    fs::write(&token, format!("{TOKEN}\n")).unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    env.config(&config_with(&format!(
        "[admin]\ntcp = \"127.0.0.1:{port}\"\ntoken_file = \"admin.token\"\n{extra_admin}\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n"
    )));
    (env, port)
}

fn tcp_session(port: u16) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect admin.tcp");
    stream.set_read_timeout(Some(SOON)).unwrap();
    stream
}

/// Sends `line` and reads its reply up to the OK / ERR line.
fn tcp_command(reader: &mut BufReader<std::net::TcpStream>, line: &str) -> String {
    reader
        .get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .unwrap();
    let mut reply = String::new();
    loop {
        let mut got = String::new();
        let n = reader.read_line(&mut got).expect("read the reply");
        assert!(n > 0, "closed mid-reply; so far {reply:?}");
        reply.push_str(&got);
        if got == "OK\n" || got.starts_with("ERR") {
            return reply;
        }
    }
}

#[test]
fn tcp_sessions_that_do_not_authenticate_in_time_are_closed_and_counted_once_a_second() {
    const SESSIONS: u64 = 40;
    let (env, port) = tcp_admin_env("auth_timeout = \"1s\"\nidle_timeout = \"1h\"\n");
    let master = env.start_master(&fs::read_to_string(env.path().join("jobhost.toml")).unwrap());
    master.wait_for_log("admin interface also on tcp", SOON);
    // One authenticates at once; it stays.
    let mut authed = BufReader::new(tcp_session(port));
    assert_eq!(tcp_command(&mut authed, &format!("auth {TOKEN}")), "OK\n");
    let mut unix = master.admin_session();
    let started = Instant::now();
    let mut silent: Vec<_> = (0..SESSIONS).map(|_| tcp_session(port)).collect();
    // One that talks but never authenticates is closed too.
    let mut chatty = BufReader::new(tcp_session(port));
    assert_eq!(
        tcp_command(&mut chatty, "status"),
        "ERR authenticate first: auth <token>\n"
    );
    for (i, stream) in silent.iter_mut().enumerate() {
        assert!(
            closed_by_master(stream),
            "unauthenticated session {i} still open"
        );
    }
    assert!(
        closed_by_master(chatty.get_mut()),
        "the chatty session still open"
    );
    assert_closes_logged(
        &master,
        "not authenticated within 1s",
        SESSIONS + 1,
        started,
    );
    // Past its auth timeout, the authenticated session was not closed, nor the one on the
    // Unix socket, which needs no auth.
    assert!(started.elapsed() > Duration::from_secs(1));
    assert!(tcp_command(&mut authed, "status").ends_with("OK\n"));
    assert!(unix.command("status").ends_with("OK\n"));
}

#[test]
fn idle_sessions_are_closed_and_counted_but_not_one_waiting_for_its_reload() {
    const SESSIONS: u64 = 30;
    let env = Env::new();
    env.install("echo");
    env.install("faulty");
    let header = "[host]\nplugins_dir = \"plugins\"\nruntime_dir = \"run\"\nlog_level = \"debug\"\ninit_timeout = \"5s\"\n\n[admin]\nidle_timeout = \"1s\"\n\n";
    let echo = "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n";
    let master = env.start_master(&format!("{header}{echo}"));
    master.wait_for_workers(2);
    // A reload that waits for a plugin hanging in its init (until init_timeout, 5s).
    env.config(&format!(
        "{header}{echo}\n[[pool]]\nname = \"f\"\nplugin = \"faulty\"\n[pool.settings]\ninit = \"hang\"\n"
    ));
    let started = Instant::now();
    let mut idle: Vec<_> = (0..SESSIONS)
        .map(|_| UnixStream::connect(master.admin_socket()).unwrap())
        .collect();
    let mut waiting = master.admin_session();
    waiting.stream.write_all(b"reload\n").unwrap();
    for (i, stream) in idle.iter_mut().enumerate() {
        stream.set_read_timeout(Some(SOON)).unwrap();
        assert!(closed_by_master(stream), "idle session {i} still open");
    }
    // The waiting session outlived its idle timeout many times over, and gets its answer.
    let reply = waiting.read_reply();
    assert!(
        reply.starts_with("ERR reload failed, nothing changed: ")
            && reply.contains("took longer than 5s while running its init"),
        "{reply}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "the reload was answered before init_timeout"
    );
    // From its answer on it is idle like any other.
    assert!(
        waiting.is_closed(),
        "the session stayed open after its reload"
    );
    assert_closes_logged(&master, "idle for 1s", SESSIONS + 1, started);
}

#[test]
fn a_reload_that_shortens_idle_timeout_applies_to_open_sessions() {
    let env = Env::new();
    env.install("echo");
    let pool = "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n";
    let master = env.start_master(&config_with(pool));
    let mut open = master.admin_session();
    assert!(open.command("status").ends_with("OK\n"));
    // With the default (10m) it would stay open far longer than this test waits. A HUP, not
    // an admin `reload`: no other session opens meanwhile.
    env.config(&config_with(&format!(
        "[admin]\nidle_timeout = \"1s\"\n\n{pool}"
    )));
    master.signal(nix::sys::signal::Signal::SIGHUP);
    master.wait_for_log("reload ok", SOON);
    assert!(
        open.is_closed(),
        "the session stayed open past the new idle_timeout"
    );
    wait_until("the close in the log", SOON, || {
        closes_logged(&master, "idle for 1s").0 >= 1
    });
}

/// Reads what the master said before closing `stream` (a refused session gets one line).
fn refused_line(stream: &mut impl Read) -> String {
    let mut said = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => said.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_reset(&e) => break,
            Err(e) => panic!("reading a refused session: {e}"),
        }
    }
    String::from_utf8_lossy(&said).into_owned()
}

#[test]
fn sessions_past_the_caps_are_refused_at_once_and_the_operators_still_get_in() {
    // The caps of host/src/master/admin.rs: 256 sessions in all, 64 unauthenticated TCP ones.
    const MAX_SESSIONS: usize = 256;
    const MAX_UNAUTHENTICATED: usize = 64;
    let (env, port) = tcp_admin_env("auth_timeout = \"1h\"\nidle_timeout = \"1h\"\n");
    let master = env.start_master(&fs::read_to_string(env.path().join("jobhost.toml")).unwrap());
    master.wait_for_log("admin interface also on tcp", SOON);
    // Strangers fill their share; the next stranger is refused with a reason, once.
    let mut strangers: Vec<_> = (0..MAX_UNAUTHENTICATED)
        .map(|_| tcp_session(port))
        .collect();
    let mut operator = master.admin_session();
    assert!(operator.command("status").ends_with("OK\n"));
    let mut one_more = tcp_session(port);
    assert_eq!(
        refused_line(&mut one_more),
        "ERR too many admin sessions; try again later\n"
    );
    master.wait_for_log(
        "admin: closed an admin session: 64 unauthenticated TCP admin sessions are open already",
        SOON,
    );
    // The operator on the Unix socket still gets in, up to the total cap.
    let mut unix: Vec<_> = (MAX_UNAUTHENTICATED + 1..MAX_SESSIONS)
        .map(|_| master.admin_session())
        .collect();
    assert!(unix
        .last_mut()
        .expect("a session")
        .command("status")
        .ends_with("OK\n"));
    let mut past_total = UnixStream::connect(master.admin_socket()).unwrap();
    past_total.set_read_timeout(Some(SOON)).unwrap();
    assert_eq!(
        refused_line(&mut past_total),
        "ERR too many admin sessions; try again later\n"
    );
    // A session that closes makes room again.
    drop(strangers.pop());
    wait_until("a closed session's place to be free", SOON, || {
        let mut s = master.admin_session();
        s.stream.write_all(b"help\n").is_ok() && s.read_reply().ends_with("OK\n")
    });
    drop(strangers);
}

#[test]
fn a_session_repeating_a_command_cannot_flood_the_log() {
    const LINES: usize = 5_000;
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n",
    ));
    master.wait_for_workers(1);
    let mut session = master.admin_session();
    let flood = "stop nope\n".repeat(LINES);
    session.stream.write_all(flood.as_bytes()).unwrap();
    for i in 0..LINES {
        let reply = session.read_reply();
        assert!(reply.starts_with("ERR"), "reply {i}: {reply}");
    }
    master.wait_for_log(
        "more command(s) in the last second, not logged one by one",
        SOON,
    );
    let logged = master
        .log_text()
        .lines()
        .filter(|l| l.contains("nope"))
        .count();
    assert!(
        logged < LINES / 10,
        "{logged} of {LINES} refused commands logged one by one"
    );
}
