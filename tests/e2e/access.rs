//! Who may reach the master, and what an unauthenticated or resource-starving client can make
//! it do: the admin token file must be private, wrong tokens cannot flood the log, a full fd
//! table does not make the admin listener spin, and `socket_group` lets one group (and no one
//! else) use the sockets. Tests that change users or owners run only as root.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jobhost_e2e::{bin_dir, config_with, cpu_ticks, run, wait_until, Env, Master, SOON};

const TOKEN: &str = "s3cret-token-0123456789";
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// `daemon` on Debian: a group `nobody` is not in.
const OTHER_GROUP: u32 = 1;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

fn tcp_config(port: u16) -> String {
    config_with(&format!(
        "[admin]\ntcp = \"127.0.0.1:{port}\"\ntoken_file = \"admin.token\"\n\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n"
    ))
}

/// One TCP admin session: sends `line`, returns the reply ("" if the master closed first).
fn tcp_line(port: u16, line: &str) -> String {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(SOON)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    (&stream).write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    loop {
        let mut got = String::new();
        if !matches!(reader.read_line(&mut got), Ok(n) if n > 0) {
            return reply;
        }
        reply.push_str(&got);
        if got == "OK\n" || got.starts_with("ERR") {
            return reply;
        }
    }
}

/// Runs a `jobhost run` that must refuse to start: returns its exit code and stderr, or
/// kills it and panics if it is still running after [`SOON`] (it started).
fn refused_start(command: &mut Command, dir: &Path) -> (i32, String) {
    let err = dir.join("refused.err");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + SOON;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = fs::read_to_string(&err).unwrap_or_default();
            let code = status
                .code()
                .unwrap_or_else(|| panic!("died of {status}: {stderr}"));
            return (code, stderr);
        }
        if Instant::now() > deadline {
            let workers = jobhost_e2e::children_of(child.id() as i32);
            let _ = child.kill();
            let _ = child.wait();
            for pid in workers {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            panic!(
                "the master started instead of refusing:\n{}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that `jobhost run -c CONFIG` (as `as_user`: uid, gid) refuses to start, saying
/// each of `needles`.
fn assert_refused(env: &Env, config: &str, as_user: Option<(u32, u32)>, needles: &[&str]) {
    let mut command = Command::new(bin_dir().join("jobhost"));
    command.args(["run", "-c", config]).current_dir(env.path());
    if let Some((uid, gid)) = as_user {
        command.uid(uid).gid(gid);
    }
    let (code, stderr) = refused_start(&mut command, env.path());
    assert_eq!(code, 1, "exit code; stderr:\n{stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr lacks {needle:?}:\n{stderr}"
        );
    }
}

#[test]
fn a_token_file_others_could_read_or_write_is_refused_at_start() {
    let env = Env::new();
    env.install("echo");
    let token = env.path().join("admin.token");
    fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let config = env.config(&tcp_config(free_port()));
    let config = config.to_str().unwrap();
    for (mode, what) in [
        (0o644, "readable by others"),
        (0o602, "writable by others"),
        (0o640, "readable by its group"),
        (0o620, "writable by its group"),
        (0o610, "open to its group or others"),
    ] {
        chmod(&token, mode);
        assert_refused(
            &env,
            config,
            None,
            &[&format!(
                "admin.token_file {} is {what} (mode {mode:04o}); chmod 600 it",
                token.display()
            )],
        );
        assert!(
            !env.path().join("run/admin.sock").exists(),
            "a refused token file leaves no admin socket"
        );
    }
    // A symlink is followed: its target is what must be private.
    let secret = env.path().join("secret.token");
    fs::rename(&token, &secret).unwrap();
    std::os::unix::fs::symlink(&secret, &token).unwrap();
    chmod(&secret, 0o644);
    assert_refused(
        &env,
        config,
        None,
        &["is readable by others (mode 0644); chmod 600 it"],
    );
    if is_root() {
        // Private, but someone else's: they could rewrite it.
        chmod(&secret, 0o600);
        std::os::unix::fs::chown(&secret, Some(NOBODY), None).unwrap();
        assert_refused(
            &env,
            config,
            None,
            &[&format!(
                "admin.token_file {} belongs to uid {NOBODY}, neither root nor the user jobhost runs as (uid 0); chown it",
                token.display()
            )],
        );
    }
}

/// Sum of the wrong tokens the log reports: "a TCP session offered…" is one, "N TCP
/// sessions offered…" is N.
fn wrong_tokens_logged(master: &Master) -> (u64, usize) {
    let text = master.log_text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("offered a wrong token"))
        .collect();
    let total = lines
        .iter()
        .map(|l| {
            let after = l.split_once("admin: ").map_or("", |(_, a)| a);
            after
                .split(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(1)
        })
        .sum();
    (total, lines.len())
}

#[test]
fn wrong_tokens_are_logged_at_most_once_a_second_with_a_count() {
    const WRONG: u64 = 150;
    let env = Env::new();
    env.install("echo");
    let port = free_port();
    // Through a symlink to a private file: fine.
    let secret = env.path().join("secret.token");
    fs::write(&secret, format!("{TOKEN}\n")).unwrap();
    chmod(&secret, 0o600);
    std::os::unix::fs::symlink(&secret, env.path().join("admin.token")).unwrap();
    let master = env.start_master(&tcp_config(port));
    master.wait_for_log("admin interface also on tcp", SOON);
    let started = Instant::now();
    for i in 0..WRONG {
        assert_eq!(
            tcp_line(port, &format!("auth wrong-{i}")),
            "ERR wrong token\n"
        );
    }
    let sent_in = started.elapsed();
    // Every one is accounted for — the last burst too, with nothing else happening on the
    // master (its timer flushes the count).
    wait_until("every wrong token in the log", SOON, || {
        wrong_tokens_logged(&master).0 == WRONG
    });
    let elapsed = started.elapsed();
    let (total, lines) = wrong_tokens_logged(&master);
    eprintln!("{WRONG} wrong tokens sent in {sent_in:?}: {lines} log lines within {elapsed:?}");
    assert_eq!(total, WRONG);
    // One line when the first came, then at most one a second.
    let allowed = 2 + elapsed.as_secs() as usize;
    assert!(
        lines <= allowed,
        "{lines} log lines for {WRONG} wrong tokens sent in {sent_in:?} (allowed {allowed}):\n{}",
        master.log_text()
    );
    assert!(
        master.log_count("TCP sessions offered a wrong token in the last") >= 1,
        "{}",
        master.log_text()
    );
    // The right token still works.
    let ok = tcp_line(port, &format!("auth {TOKEN}"));
    assert_eq!(ok, "OK\n");
}

#[test]
fn a_full_fd_table_pauses_the_admin_listener_instead_of_spinning() {
    const LIMIT: u64 = 64;
    let env = Env::new();
    env.install("echo");
    let master = env.start_master_with_nofile(
        &config_with("[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n"),
        Some(LIMIT),
    );
    master.wait_for_workers(1);
    let admin = master.admin_socket();
    assert!(master.admin("status").ends_with("OK\n"));
    // More connections than the master has descriptors: it accepts what it can; the rest
    // wait in the listen backlog, so the listener stays readable.
    let held: Vec<UnixStream> = (0..LIMIT + 30)
        .map(|_| UnixStream::connect(&admin).unwrap())
        .collect();
    master.wait_for_log("admin accept: ", SOON);
    let before_ticks = cpu_ticks(master.pid());
    let before_log = fs::metadata(&master.log).unwrap().len();
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(master.pid()) - before_ticks;
    let grown = fs::metadata(&master.log).unwrap().len() - before_log;
    eprintln!("full fd table: {ticks} ticks and {grown} bytes of log in 2 s");
    // A spin is ~200 ticks in 2 s and megabytes of log; a pause every 200 ms is a few ticks
    // and ten lines.
    assert!(
        ticks < 40,
        "the master used {ticks} ticks in 2 s with a full fd table"
    );
    assert!(
        grown < 16 << 10,
        "the log grew {grown} bytes in 2 s with a full fd table"
    );
    // Once descriptors are free again, the admin socket answers.
    drop(held);
    wait_until("the admin socket to answer again", SOON, || {
        let Ok(mut stream) = UnixStream::connect(&admin) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream.write_all(b"status\n").is_err() {
            return false;
        }
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        reply.contains(&format!("pid {}", master.pid()))
    });
}

/// `jobhost ARGS` as `uid`/`gid` (and no supplementary groups: std drops them when root sets
/// a uid).
fn jobhost_as(env: &Env, uid: u32, gid: u32, args: &[&str]) -> jobhost_e2e::Run {
    run(Command::new(bin_dir().join("jobhost"))
        .args(args)
        .current_dir(env.path())
        .uid(uid)
        .gid(gid))
}

#[test]
fn socket_group_lets_its_members_submit_and_no_one_else() {
    if !is_root() {
        eprintln!("skipped: needs root (to run clients as other users)");
        return;
    }
    let env = Env::new();
    env.install("echo");
    // Clients must be able to reach the sockets' folder.
    chmod(env.path(), 0o755);
    fs::create_dir(env.path().join("run")).unwrap();
    chmod(&env.path().join("run"), 0o755);
    let master = env.start_master(&config_with(
        "[server]\nsocket_group = \"nogroup\"\n\n[admin]\nsocket_group = \"nogroup\"\n\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n",
    ));
    master.wait_for_workers(1);
    let jobs = master.socket.to_str().unwrap().to_owned();
    let admin = master.admin_socket().to_str().unwrap().to_owned();
    for socket in [&jobs, &admin] {
        let meta = fs::symlink_metadata(socket).unwrap();
        assert_eq!(meta.gid(), NOGROUP, "{socket}");
        assert_eq!(meta.uid(), 0, "{socket}");
        assert_eq!(meta.mode() & 0o777, 0o660, "{socket}");
    }
    // nobody, in group nogroup: may submit and use the admin socket.
    let submitted = jobhost_as(
        &env,
        NOBODY,
        NOGROUP,
        &["submit", "--socket", &jobs, "echo", "hi"],
    );
    submitted.assert_code(0);
    assert_eq!(submitted.stdout, "hi\n");
    jobhost_as(
        &env,
        NOBODY,
        NOGROUP,
        &["ctl", "--socket", &admin, "status"],
    )
    .assert_code(0)
    .assert_stdout_has(&format!("pid {}", master.pid()));
    // nobody, in another group: refused by the kernel (EACCES), before the master sees it.
    jobhost_as(
        &env,
        NOBODY,
        OTHER_GROUP,
        &["submit", "--socket", &jobs, "echo", "hi"],
    )
    .assert_code(1)
    .assert_stderr_has("Permission denied");
    jobhost_as(
        &env,
        NOBODY,
        OTHER_GROUP,
        &["ctl", "--socket", &admin, "status"],
    )
    .assert_code(1)
    .assert_stderr_has("permission denied");
}

#[test]
fn without_a_group_the_admin_socket_is_private() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[server]\nsocket_mode = \"0666\"\n\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n",
    ));
    let me = nix::unistd::getegid().as_raw();
    let jobs = fs::symlink_metadata(&master.socket).unwrap();
    assert_eq!((jobs.mode() & 0o777, jobs.gid()), (0o666, me));
    let admin = fs::symlink_metadata(master.admin_socket()).unwrap();
    assert_eq!((admin.mode() & 0o777, admin.gid()), (0o600, me));
}

#[test]
fn an_unknown_socket_group_is_a_config_error_at_its_line() {
    let env = Env::new();
    env.install("echo");
    let config = env.config(&config_with(
        "[server]\nsocket_group = \"no-such-group-jh\"\n\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n",
    ));
    let want = format!(
        "{}:8:16: server.socket_group: no group \"no-such-group-jh\" on this system",
        config.display()
    );
    env.jobhost(&["check", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has(&want);
    assert_refused(&env, config.to_str().unwrap(), None, &[&want]);
}

#[test]
fn a_master_that_cannot_give_its_socket_to_the_group_says_why() {
    if !is_root() {
        eprintln!("skipped: needs root (to start a master as another user)");
        return;
    }
    let env = Env::new();
    env.install("echo");
    chmod(env.path(), 0o755);
    let run_dir = env.path().join("run");
    fs::create_dir(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(NOBODY), Some(NOGROUP)).unwrap();
    let config = env.config(&config_with(
        "[server]\nsocket_group = \"root\"\n\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n",
    ));
    // A master running as nobody, not in group root: chown is not allowed (EPERM).
    assert_refused(
        &env,
        config.to_str().unwrap(),
        Some((NOBODY, NOGROUP)),
        &[
            &format!(
                "cannot give {}/jobs.sock to group root (gid 0): Operation not permitted",
                run_dir.display()
            ),
            "the master must run as root or be a member of that group",
        ],
    );
    assert!(!run_dir.join("jobs.sock").exists());
}
