//! `jobhost submit` to a Redis-fed pool: same output, order and exit status as a socket pool.
//!
//! Each test runs one real master with a socket pool `s` and a redis pool `q` of the same
//! plugin (2 workers each) against the test's private redis-server, and runs the real
//! `jobhost submit -c CONFIG POOL` binary against both, comparing what a user sees. This file
//! owns its helpers (running submit with a deadline, the two-pool config, looking for reply
//! streams); it never sleeps a fixed time before asserting that something did not happen.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use jobhost_e2e::{bin_dir, config_with, wait_until, Env, Master, COMMAND_TIMEOUT, SOON};
use redis::Value;

use super::{have_redis, Redis};

/// What one `jobhost submit` did.
struct Submitted {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
    took: Duration,
}

impl Submitted {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// `jobhost submit ARGS…` in `env`'s folder with `input` on stdin (written from a thread, so
/// results stream out while input goes in); killed, failing the test, after COMMAND_TIMEOUT.
fn submit(env: &Env, args: &[&str], input: &[u8]) -> Submitted {
    let started = Instant::now();
    let mut child = spawn_submit(env, args, Stdio::piped());
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // A submit that stopped early (an error) closes its stdin: not the test's concern.
        let _ = stdin.write_all(&input);
    });
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let status = wait_with_deadline(&mut child, COMMAND_TIMEOUT);
    writer.join().unwrap();
    let stdout = stdout.join().unwrap();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
    let Some(status) = status else {
        panic!(
            "jobhost submit {args:?} still ran after {COMMAND_TIMEOUT:?}; killed\nstderr:\n{stderr}"
        );
    };
    Submitted {
        status,
        stdout,
        stderr,
        took: started.elapsed(),
    }
}

fn spawn_submit(env: &Env, args: &[&str], stdout: Stdio) -> Child {
    Command::new(bin_dir().join("jobhost"))
        .arg("submit")
        .args(args)
        .current_dir(env.path())
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = pipe.read_to_end(&mut all);
        all
    })
}

/// The child's status, or None (and the child killed) once `within` has passed.
fn wait_with_deadline(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A socket pool `s` and a redis pool `q` (stream `jobs`) of `plugin`, 2 workers each.
fn two_pools(plugin: &str, redis_url: &str, extra: &str) -> String {
    config_with(&format!(
        "[[pool]]\nname = \"s\"\nplugin = \"{plugin}\"\nworkers = 2\n{extra}\n\
         [[pool]]\nname = \"q\"\nplugin = \"{plugin}\"\nworkers = 2\nsource = \"redis\"\n{extra}\n\
         [pool.redis]\nurl = \"{redis_url}\"\nstream = \"jobs\"\n"
    ))
}

/// A master with [`two_pools`] whose redis pool's group exists (its workers made it).
fn start(env: &Env, plugin: &str, redis: &Redis, extra: &str) -> (Master, PathBuf) {
    env.install(plugin);
    let master = env.start_master(&two_pools(plugin, &redis.url(), extra));
    master.wait_for_workers(4);
    // XGROUP CREATE … MKSTREAM makes the stream and the group at once.
    wait_until("the redis pool's group", SOON, || {
        redis::cmd("EXISTS")
            .arg("jobs")
            .query::<i64>(&mut redis.conn())
            .is_ok_and(|n| n == 1)
    });
    (master, env.path().join("jobhost.toml"))
}

/// Every `jobhost:reply:*` key in the test's Redis.
fn reply_streams(redis: &Redis) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("jobhost:reply:*")
        .query(&mut redis.conn())
        .unwrap()
}

/// Lines that make a plain output tricky: empty, CRLF, invalid UTF-8, quotes, backslashes.
fn tricky_input(n: usize) -> Vec<u8> {
    let mut input = Vec::new();
    for i in 0..n {
        match i % 7 {
            0 => input.extend_from_slice(b"\n"),
            1 => input.extend_from_slice(format!("crlf {i}\r\n").as_bytes()),
            2 => input.extend_from_slice(b"bytes \xff\xfe\x00 end\n"),
            3 => input.extend_from_slice("quote \" back \\ tab \t é\n".as_bytes()),
            _ => input.extend_from_slice(format!("line {i}\n").as_bytes()),
        }
    }
    input.extend_from_slice(b"last, no newline");
    input
}

fn c(config: &Path) -> &str {
    config.to_str().unwrap()
}

#[test]
fn a_redis_pool_prints_byte_for_byte_what_a_socket_pool_prints() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    let redis = Redis::at(&env).start();
    let (_master, config) = start(&env, "echo", &redis, "");
    let input = tricky_input(2000);
    for json in [false, true] {
        let mut args = vec!["-c", c(&config)];
        if json {
            args.push("--json");
        }
        let socket = submit(&env, &[&args[..], &["s"][..]].concat(), &input);
        let redis_run = submit(&env, &[&args[..], &["q"][..]].concat(), &input);
        assert_eq!(socket.code(), Some(0), "{}", socket.stderr);
        assert_eq!(redis_run.code(), socket.code(), "{}", redis_run.stderr);
        assert_eq!(redis_run.stderr, "");
        assert_eq!(socket.text().lines().count(), 2001);
        assert!(
            redis_run.stdout == socket.stdout,
            "json={json}: the outputs differ\nsocket:\n{}\nredis:\n{}",
            socket.text(),
            redis_run.text()
        );
    }
    // One job from the command line, both forms.
    for json in [&[][..], &["--json"][..]] {
        let one = |pool| {
            let args = [&["-c", c(&config)][..], json, &[pool, "hello"][..]].concat();
            submit(&env, &args, b"")
        };
        let (socket, redis_run) = (one("s"), one("q"));
        assert_eq!((socket.code(), redis_run.code()), (Some(0), Some(0)));
        assert_eq!(redis_run.stdout, socket.stdout);
    }
    assert_eq!(reply_streams(&redis), Vec::<String>::new());
    assert_eq!(redis.xlen("jobs"), 2 * 2001 + 2, "one entry per job");
}

#[test]
fn results_come_out_in_input_order_whatever_order_the_jobs_end_in() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    let redis = Redis::at(&env).start();
    let (_master, config) = start(&env, "sleep", &redis, "");
    // With 2 workers, job 0 (600 ms) is still running while the short ones after it finish.
    let millis = [600, 5, 0, 200, 10, 0, 400, 1, 50, 0, 300, 0];
    let input: String = millis.iter().map(|ms| format!("{ms}\n")).collect();
    let expect: String = millis.iter().map(|ms| format!("slept {ms}\n")).collect();
    let redis_run = submit(&env, &["-c", c(&config), "q"], input.as_bytes());
    assert_eq!(redis_run.code(), Some(0), "{}", redis_run.stderr);
    assert_eq!(redis_run.text(), expect);
    let socket = submit(&env, &["-c", c(&config), "s"], input.as_bytes());
    assert_eq!(redis_run.stdout, socket.stdout);
    assert_eq!(reply_streams(&redis), Vec::<String>::new());
}

#[test]
fn a_failed_job_exits_1_and_reads_as_it_does_from_a_socket_pool() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    let redis = Redis::at(&env).start();
    let (_master, config) = start(&env, "faulty", &redis, "max_attempts = 2\n");
    let input = b"ok\npanic\nnonsense\nok\n";
    for json in [&[][..], &["--json"][..]] {
        let run = |pool| {
            let args = [&["-c", c(&config)][..], json, &[pool][..]].concat();
            submit(&env, &args, input)
        };
        let (socket, redis_run) = (run("s"), run("q"));
        assert_eq!(socket.code(), Some(1));
        assert_eq!(redis_run.code(), Some(1), "{}", redis_run.stderr);
        assert_eq!(redis_run.stdout, socket.stdout, "{}", redis_run.text());
        assert_eq!(redis_run.stderr, "");
    }
    let plain = submit(&env, &["-c", c(&config), "q"], input).text();
    assert!(
        plain.starts_with("ok\nERROR: plugin panicked in handle at "),
        "{plain}"
    );
    assert!(
        plain.contains("\nERROR: faulty: unknown command \"nonsense\" (expected ok, ")
            && plain.ends_with(")\nok\n"),
        "{plain}"
    );
    // One failing job from the command line: the error on stderr, as for a socket pool.
    let socket = submit(&env, &["-c", c(&config), "s", "panic"], b"");
    let redis_run = submit(&env, &["-c", c(&config), "q", "panic"], b"");
    assert_eq!((socket.code(), redis_run.code()), (Some(1), Some(1)));
    assert!(redis_run.stdout.is_empty());
    assert_eq!(redis_run.stderr, socket.stderr);
    assert!(redis_run
        .stderr
        .starts_with("jobhost: job failed: plugin panicked in handle at "));
    // An entry whose workers keep dying runs out of attempts and is answered failed.
    let crash = submit(&env, &["-c", c(&config), "q"], b"ok\nsegv\nok\n");
    assert_eq!(crash.code(), Some(1), "{}", crash.stderr);
    assert_eq!(
        crash.text(),
        "ok\nERROR: worker killed by SIGSEGV, attempt 2 of 2\nok\n"
    );
    assert_eq!(reply_streams(&redis), Vec::<String>::new());
}

#[test]
fn the_reply_stream_is_deleted_at_the_end_also_when_stdout_closes_early() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    let redis = Redis::at(&env).start();
    let (_master, config) = start(&env, "echo", &redis, "");
    let done = submit(&env, &["-c", c(&config), "q"], b"a\nb\n");
    assert_eq!((done.code(), done.text().as_str()), (Some(0), "a\nb\n"));
    assert_eq!(reply_streams(&redis), Vec::<String>::new());

    // `jobhost submit … | head -1`, for both pools. Line 1 is answered and `head` exits;
    // then line 2 is sent: its result meets the closed pipe. Every job sent was answered by
    // then, so no late result can bring the reply stream back.
    let mut statuses = Vec::new();
    for pool in ["s", "q"] {
        let mut child = spawn_submit(&env, &["-c", c(&config), pool], Stdio::piped());
        let mut head = Command::new("head")
            .arg("-1")
            .stdin(Stdio::from(child.stdout.take().unwrap()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"first\n").unwrap();
        stdin.flush().unwrap();
        let head_status = wait_with_deadline(&mut head, SOON).expect("head -1 ends");
        assert!(head_status.success());
        let mut first = String::new();
        head.stdout
            .take()
            .unwrap()
            .read_to_string(&mut first)
            .unwrap();
        assert_eq!(first, "first\n");
        if pool == "q" {
            assert_eq!(
                reply_streams(&redis).len(),
                1,
                "the stream exists meanwhile"
            );
        }
        // The submit may already have stopped reading: then this write fails, which is fine.
        let _ = stdin.write_all(b"second\n");
        drop(stdin);
        let status = wait_with_deadline(&mut child, SOON).expect("submit ends after head");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(stderr, "", "a closed stdout is not an error");
        statuses.push(status.code());
    }
    assert_eq!(statuses, [Some(0), Some(0)]);
    assert_eq!(reply_streams(&redis), Vec::<String>::new());
}

#[test]
fn ctrl_c_deletes_the_reply_stream_and_ends_submit_as_it_would_a_socket_submit() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    let redis = Redis::at(&env).start();
    let (_master, config) = start(&env, "sleep", &redis, "");
    for (pool, signal) in [
        ("s", nix::sys::signal::Signal::SIGINT),
        ("q", nix::sys::signal::Signal::SIGINT),
        ("q", nix::sys::signal::Signal::SIGTERM),
    ] {
        let mut child = spawn_submit(&env, &["-c", c(&config), pool], Stdio::piped());
        let mut stdin = child.stdin.take().unwrap();
        // One job answered, one still running when the signal comes.
        stdin.write_all(b"0\n").unwrap();
        stdin.flush().unwrap();
        let (lines, printed) = std::sync::mpsc::channel();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            let mut line = String::new();
            while matches!(std::io::BufRead::read_line(&mut stdout, &mut line), Ok(n) if n > 0) {
                let _ = lines.send(std::mem::take(&mut line));
            }
        });
        assert_eq!(printed.recv_timeout(SOON).as_deref(), Ok("slept 0\n"));
        stdin.write_all(b"2000\n").unwrap();
        stdin.flush().unwrap();
        if pool == "q" {
            wait_until("the long job taken", SOON, || {
                redis
                    .cli(&["XPENDING", "jobs", "jobhost"])
                    .starts_with("1\n")
            });
            assert_eq!(reply_streams(&redis).len(), 1);
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let status = wait_with_deadline(&mut child, SOON).expect("submit ends on the signal");
        assert_eq!(status.signal(), Some(signal as i32), "{status:?}");
        assert_eq!(reply_streams(&redis), Vec::<String>::new(), "{pool}");
        if pool == "q" {
            // The job still ran and answered after the stream was deleted: until the workers
            // honour reply_ttl, that late result's stream stays. Clear it for the next round.
            wait_until("the late result", SOON, || {
                redis
                    .cli(&["XPENDING", "jobs", "jobhost"])
                    .starts_with("0\n")
            });
            for key in reply_streams(&redis) {
                redis.cli(&["DEL", &key]);
            }
        }
    }
}

#[test]
fn an_unreachable_redis_is_a_clear_error_and_a_pool_no_master_serves_yet_is_waited_for() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let redis = Redis::at(&env);
    let pool_at = |url: &str| {
        env.config(&config_with(&format!(
            "[[pool]]\nname = \"q\"\nplugin = \"echo\"\nsource = \"redis\"\n[pool.redis]\nurl = \"{url}\"\nstream = \"jobs\"\n"
        )))
    };
    let quick = Duration::from_secs(30);

    // Nothing listens on the socket. No master runs either: submit to a redis pool needs none.
    let config = pool_at(&redis.url());
    for input in [&b""[..], b"a\nb\n"] {
        let args: &[&str] = if input.is_empty() {
            &["-c", c(&config), "q", "x"]
        } else {
            &["-c", c(&config), "q"]
        };
        let run = submit(&env, args, input);
        assert_eq!(run.code(), Some(1), "{}", run.stderr);
        assert!(
            run.stderr.starts_with(&format!(
                "jobhost: error: cannot reach Redis at unix://{}: ",
                redis.url()
            )),
            "{}",
            run.stderr
        );
        assert!(run.stdout.is_empty());
        assert!(run.took < quick, "{:?}", run.took);
    }

    // Something accepts connections but never answers.
    let mute_path = env.path().join("mute.sock");
    let _mute = std::os::unix::net::UnixListener::bind(&mute_path).unwrap();
    let config = pool_at(mute_path.to_str().unwrap());
    let run = submit(&env, &["-c", c(&config), "q", "x"], b"");
    assert_eq!(run.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot reach Redis at") && run.stderr.contains("no answer in time"),
        "{}",
        run.stderr
    );
    assert!(run.took < quick, "{:?}", run.took);

    // Redis answers, but no master has run this pool there yet: submit makes the group (at 0,
    // as a worker would) and waits; the first master that comes runs what was added before it.
    let redis = redis.start();
    let config = pool_at(&redis.url());
    let mut child = spawn_submit(
        &env,
        &["-c", c(&config), "q", "before any master"],
        Stdio::piped(),
    );
    let stdout = drain(child.stdout.take().unwrap());
    wait_until("the entry added", SOON, || redis.xlen("jobs") == 1);
    let master = env.start_master(&std::fs::read_to_string(&config).unwrap());
    master.wait_for_workers(1);
    let status = wait_with_deadline(&mut child, SOON).expect("submit ends once a master runs");
    assert!(status.success(), "{status:?}");
    assert_eq!(stdout.join().unwrap(), b"before any master\n");
    assert_eq!(reply_streams(&redis), Vec::<String>::new());
}

#[test]
fn redis_going_away_midway_is_an_error_after_the_results_already_in() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    let mut redis = Redis::at(&env).start();
    let (_master, config) = start(&env, "sleep", &redis, "");
    let mut child = spawn_submit(&env, &["-c", c(&config), "q"], Stdio::piped());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"0\n30000\n0\n").unwrap();
    drop(stdin);
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    wait_until("the long job taken", SOON, || {
        redis
            .cli(&["XPENDING", "jobs", "jobhost"])
            .starts_with("1\n")
            && redis::cmd("XLEN")
                .arg(reply_streams(&redis).first().map_or("none", |s| s.as_str()))
                .query::<usize>(&mut redis.conn())
                .is_ok_and(|n| n >= 1)
    });
    redis.stop();
    let status = wait_with_deadline(&mut child, SOON).expect("submit gives up");
    let stdout = String::from_utf8(stdout.join().unwrap()).unwrap();
    let stderr = String::from_utf8(stderr.join().unwrap()).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stdout, "slept 0\n", "what was in before is printed");
    assert!(
        stderr.starts_with("jobhost: error: ")
            && stderr.contains(&format!("Redis at unix://{}: ", redis.url()))
            && stderr.ends_with("(2 of 3 jobs sent got no result)\n"),
        "{stderr}"
    );
}

#[test]
fn twenty_thousand_lines_in_a_small_window_get_every_result_once() {
    if !have_redis() {
        return;
    }
    let env = Env::new();
    let redis = Redis::at(&env).start();
    let (_master, config) = start(&env, "echo", &redis, "");
    let n = 20_000;
    let window = 50;
    let input: String = (0..n).map(|i| format!("{i}\n")).collect();
    // Meanwhile, entries not yet answered (pending + never delivered) stay within the window.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let mut conn = redis.conn();
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(unanswered(&mut conn));
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        })
    };
    let run = submit(
        &env,
        &["-c", c(&config), "--window", &window.to_string(), "q"],
        input.as_bytes(),
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = watcher.join().unwrap();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert!(
        run.stdout == input.as_bytes(),
        "out of order, missing or doubled"
    );
    assert!(most <= window, "{most} entries unanswered at once");
    assert_eq!(redis.xlen("jobs"), n, "each line added once");
    assert_eq!(unanswered(&mut redis.conn()), 0);
    assert_eq!(reply_streams(&redis), Vec::<String>::new());
    eprintln!("{n} lines through Redis in {:?}", run.took);
}

/// Entries of the pool's group not acked yet: pending plus never delivered (`lag`).
fn unanswered(conn: &mut redis::Connection) -> usize {
    let Ok(Value::Array(groups)) = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg("jobs")
        .query::<Value>(conn)
    else {
        return 0;
    };
    let mut total = 0;
    for group in groups {
        let pairs: Vec<(String, Value)> = match group {
            Value::Array(kv) => kv
                .chunks(2)
                .map(|p| (super::text(&p[0]), p[1].clone()))
                .collect(),
            Value::Map(kv) => kv.into_iter().map(|(k, v)| (super::text(&k), v)).collect(),
            _ => continue,
        };
        for (key, value) in pairs {
            if key == "pending" || key == "lag" {
                if let Value::Int(n) = value {
                    total += n as usize;
                }
            }
        }
    }
    total
}
