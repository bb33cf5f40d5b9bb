//! Found in review: a server that answers ECHO but never a GRAB, a job longer than the answer
//! timeout, a server that resets the connection in the middle of a job, a worker recycled by
//! max_jobs, a JOB_ASSIGN of a function the worker never registered. Each test failed before
//! its fix in `host/src/worker/gearman.rs`.
//!
//! The fake servers here speak just enough of the protocol (through the codec's own
//! `Decoder::next_raw` and `encode_raw`) and log what they were sent.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobhost::gearman::packet::{code, encode_raw, Decoder, Fill, Magic};
use jobhost_e2e::{wait_until, Env, SOON};

use super::{finish, have_gearman, pool, Gearmand, PATIENCE};

/// What a fake server's handler does after a packet.
enum Then {
    Go,
    /// Close the connection with a reset (SO_LINGER 0), as a crashed peer does.
    Reset,
}

type Handler = dyn Fn(usize, u32, &[u8], &mut TcpStream) -> Then + Send + Sync;

/// A fake gearmand: each connection in a thread of its own, each packet it receives logged
/// as (connection number, type) and handed to the handler.
struct Fake {
    addr: String,
    accepted: Arc<AtomicUsize>,
    got: Arc<Mutex<Vec<(usize, u32)>>>,
    stop: Arc<AtomicBool>,
}

impl Fake {
    fn start(
        handler: impl Fn(usize, u32, &[u8], &mut TcpStream) -> Then + Send + Sync + 'static,
    ) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a fake server");
        let addr = listener.local_addr().expect("its address").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        {
            let (accepted, got, stop) = (accepted.clone(), got.clone(), stop.clone());
            std::thread::spawn(move || {
                let _ = listener.set_nonblocking(true);
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (accepted, got, stop, handler) =
                                (accepted.clone(), got.clone(), stop.clone(), handler.clone());
                            std::thread::spawn(move || {
                                serve(conn, &accepted, &got, &stop, &*handler)
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        Fake {
            addr,
            accepted,
            got,
            stop,
        }
    }

    /// Connections that spoke the binary protocol (a worker's; not its admin connection,
    /// whose text `status` a fake closes unanswered).
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    fn got(&self, packet: u32) -> usize {
        self.got
            .lock()
            .map(|g| g.iter().filter(|(_, c)| *c == packet).count())
            .unwrap_or(0)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serves one connection, numbered (from 0, in `accepted`) at its first binary packet; one
/// that starts with anything else (the text `status` of a worker's admin connection) is
/// closed, unnumbered.
fn serve(
    mut conn: TcpStream,
    accepted: &AtomicUsize,
    got: &Mutex<Vec<(usize, u32)>>,
    stop: &AtomicBool,
    handler: &Handler,
) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut decoder = Decoder::new(1 << 20);
    let mut number = None;
    while !stop.load(Ordering::Relaxed) {
        let packet = match decoder.next_raw(Magic::Req) {
            Ok(Some(p)) => Some((p.code, p.body.to_vec())),
            Ok(None) => None,
            Err(_) => return,
        };
        let Some((packet, body)) = packet else {
            match decoder.read_from(&mut conn) {
                Ok(Fill::Read(_)) | Ok(Fill::WouldBlock) => continue,
                _ => return,
            }
        };
        let n = *number.get_or_insert_with(|| accepted.fetch_add(1, Ordering::Relaxed));
        if let Ok(mut g) = got.lock() {
            g.push((n, packet));
        }
        match handler(n, packet, &body, &mut conn) {
            Then::Go => {}
            Then::Reset => {
                let linger = nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                let _ =
                    nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::Linger, &linger);
                return;
            }
        }
    }
}

fn reply(conn: &mut TcpStream, packet: u32, args: &[&[u8]]) {
    use std::io::Write;
    let mut out = Vec::new();
    encode_raw(Magic::Res, packet, args, &mut out);
    let _ = conn.write_all(&out);
}

/// `n` foreground jobs of `ok`, one after the other: the longest one took; each must
/// succeed.
fn sequential_jobs(gm: &Gearmand, n: usize) -> Duration {
    let mut longest = Duration::ZERO;
    for _ in 0..n {
        let started = Instant::now();
        let out = gm.cli(&["-f", "q", "ok"]);
        longest = longest.max(started.elapsed());
        assert_eq!(
            (out.code(), out.stdout.as_str()),
            (0, "ok"),
            "{}",
            out.stderr
        );
    }
    longest
}

#[test]
fn a_server_that_answers_echo_but_never_a_grab_holds_up_no_other_server() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let gm = Gearmand::start(&env, "gm", &[]);
    // Answers every ECHO at once, and no GRAB ever.
    let mute = Fake::start(|_, packet, body, conn| {
        if packet == code::ECHO_REQ {
            reply(conn, code::ECHO_RES, &[body]);
        }
        Then::Go
    });
    let master = env.start_master(&pool(
        "faulty",
        1,
        &[mute.addr.clone(), gm.address()],
        "",
        "",
    ));
    master.wait_for_workers(1);
    gm.wait_for_workers("q", 1);
    // Before the fix the one worker waited the whole answer timeout (10 s) on each of that
    // server's GRABs, and grabbed from it again 100 ms after giving up: jobs went through
    // only in those 100 ms, the others waited up to 10 s. Now a GRAB holds the worker for
    // at most a second, and not at all once the server is in an outage.
    let took = sequential_jobs(&gm, 20);
    assert!(took < Duration::from_secs(6), "a job took {took:?}");
    // It is given up on and reconnected, more than once: one outage, logged once, never
    // "connected again" (answering an ECHO is not serving), and the back-off grows.
    wait_until("the mute server reconnected twice", PATIENCE, || {
        mute.accepted() >= 3
    });
    let took = sequential_jobs(&gm, 20);
    assert!(took < Duration::from_secs(6), "a job took {took:?}");
    let log = master.log_text();
    let about: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("gearman {}: ", mute.addr)))
        .collect();
    let outages = about
        .iter()
        .filter(|l| l.contains("once per outage"))
        .count();
    let back = about
        .iter()
        .filter(|l| l.contains("connected again"))
        .count();
    assert_eq!((outages, back), (1, 0), "\n{}", about.join("\n"));
}

#[test]
fn a_job_longer_than_the_answer_timeout_costs_no_other_server_its_connection() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let gm = Gearmand::start(&env, "gm", &[]);
    // A job of 12 s (longer than the 10 s answer timeout) waits for the first worker.
    let queued = gm.cli(&["-b", "-f", "q", "pid 12000"]);
    assert_eq!(queued.code(), 0, "{}", queued.stderr);
    // Answers ECHO after 3 s (while the job runs), GRAB with NO_JOB.
    let slow = Fake::start(|_, packet, body, conn| {
        match packet {
            code::ECHO_REQ => {
                std::thread::sleep(Duration::from_secs(3));
                reply(conn, code::ECHO_RES, &[body]);
            }
            code::GRAB_JOB_UNIQ => reply(conn, code::NO_JOB, &[]),
            _ => {}
        }
        Then::Go
    });
    let master = env.start_master(&pool(
        "faulty",
        1,
        &[slow.addr.clone(), gm.address()],
        "",
        "",
    ));
    master.wait_for_workers(1);
    wait_until("the long job ran", PATIENCE, || {
        gm.status("q").is_some_and(|(total, _, _)| total == 0)
    });
    // Its answer came long ago (it waited, unread, while the job ran): no reason to drop it.
    wait_until("the slow server is grabbed from", SOON, || {
        slow.got(code::GRAB_JOB_UNIQ) >= 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        slow.accepted(),
        1,
        "the slow server was dropped and reconnected"
    );
    assert_eq!(master.log_count("no answer to"), 0, "{}", master.log_text());
}

#[test]
fn a_server_that_resets_in_the_middle_of_a_job_costs_no_job_of_another_server() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    // With --job-retries=1 gearmand fails a job the first time its worker drops it.
    let gm = Gearmand::start(&env, "gm", &["--job-retries=1"]);
    let (grabbed, assigned) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    // Its first GRAB gets a job of 11 s, and a second later the connection is reset: the
    // result cannot be written. Later connections get NO_JOB.
    let crashing = {
        let (grabbed, assigned) = (grabbed.clone(), assigned.clone());
        Fake::start(move |n, packet, body, conn| match packet {
            code::ECHO_REQ => {
                reply(conn, code::ECHO_RES, &[body]);
                Then::Go
            }
            code::GRAB_JOB_UNIQ if n == 0 => {
                // The job comes 2 s after the GRAB (meanwhile the other server has work).
                grabbed.store(true, Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(2));
                reply(
                    conn,
                    code::JOB_ASSIGN_UNIQ,
                    &[b"H:fake:1", b"q", b"u1", b"pid 11000"],
                );
                assigned.store(true, Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(1));
                Then::Reset
            }
            code::GRAB_JOB_UNIQ => {
                reply(conn, code::NO_JOB, &[]);
                Then::Go
            }
            _ => Then::Go,
        })
    };
    let master = env.start_master(&pool(
        "faulty",
        1,
        &[crashing.addr.clone(), gm.address()],
        "",
        "",
    ));
    master.wait_for_workers(1);
    gm.wait_for_workers("q", 1);
    wait_until("the fake server was grabbed from", PATIENCE, || {
        grabbed.load(Ordering::Relaxed)
    });
    // Sent while that GRAB is out: the worker learns of it before the long job, and grabs
    // it after the job. (Before the fix that GRAB was dated from before the job, judged
    // unanswered at once, and its connection dropped with the job: gearmand failed it.)
    let client = gm.spawn_cli(&["-f", "q", "ok"]);
    wait_until("the long job was assigned", PATIENCE, || {
        assigned.load(Ordering::Relaxed)
    });
    let (code, out, err) = finish(client);
    assert_eq!(
        (code, out.as_str()),
        (0, "ok"),
        "{err}\n{}",
        master.log_text()
    );
    assert_eq!(
        master.log_count("no answer to GRAB"),
        0,
        "{}",
        master.log_text()
    );
}

#[test]
fn a_worker_recycled_by_max_jobs_takes_no_job_it_will_not_run() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let gm = Gearmand::start(&env, "gm", &["--job-retries=1"]);
    // Queued before any worker: each worker runs one and leaves. A job it grabbed on its way
    // out would be dropped, and with --job-retries=1 failed without ever running.
    let clients: Vec<_> = (0..4).map(|_| gm.spawn_cli(&["-f", "q", "ok"])).collect();
    wait_until("4 jobs queued", SOON, || {
        gm.status("q").is_some_and(|(total, _, _)| total == 4)
    });
    let master = env.start_master(&pool("faulty", 1, &[gm.address()], "max_jobs = 1\n", ""));
    for client in clients {
        let (code, out, err) = finish(client);
        assert_eq!((code, out.as_str()), (0, "ok"), "{err}");
    }
    wait_until("recycled after each job", SOON, || {
        master.log_count("recycling after 1 jobs") >= 4
    });
}

#[test]
fn a_job_of_a_function_never_registered_is_not_run() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    // Answers each GRAB with a job of function `other` (the worker registered only `q`).
    let wrong = Fake::start(|_, packet, body, conn| {
        match packet {
            code::ECHO_REQ => reply(conn, code::ECHO_RES, &[body]),
            code::GRAB_JOB_UNIQ => reply(
                conn,
                code::JOB_ASSIGN_UNIQ,
                &[b"H:fake:1", b"other", b"u1", b"ok"],
            ),
            _ => {}
        }
        Then::Go
    });
    let master = env.start_master(&pool(
        "faulty",
        1,
        std::slice::from_ref(&wrong.addr),
        "",
        "",
    ));
    master.wait_for_workers(1);
    wait_until("the worker reconnected", PATIENCE, || wrong.accepted() >= 2);
    assert!(wrong.got(code::GRAB_JOB_UNIQ) >= 1);
    assert_eq!(
        wrong.got(code::WORK_COMPLETE),
        0,
        "it ran the other function's job"
    );
    master.wait_for_log("JOB_ASSIGN", SOON);
}
