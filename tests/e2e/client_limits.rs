//! What the job socket's clients may cost the master, against a real master: an oversized
//! SUBMIT costs its sender that job, not its connection; a frame sent too slowly costs its
//! connection (`server.read_timeout`); partial frames of many clients stay within
//! `server.max_memory` while clients under their share are served; a result over
//! `server.max_result` is the job's failure.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use jobhost::protocol::Status;
use jobhost_e2e::{config_with, is_reset, recv_n, wait_until, Env, Master, SOON};
use nix::unistd::Pid;

fn echo_master(env: &Env, server: &str) -> Master {
    env.install("echo");
    let master = env.start_master(&config_with(&format!(
        "[server]\n{server}\n[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 1\n"
    )));
    master.wait_for_workers(1);
    master
}

fn rss_mib(master: &Master) -> u64 {
    jobhost::sys::rss_of(Pid::from_raw(master.pid())).unwrap() >> 20
}

/// Whether the master closed `stream` (end of file or a reset), without waiting.
fn closed_by_master(stream: &mut UnixStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let closed = match stream.read(&mut buf) {
        Ok(0) => true,
        Err(e) if is_reset(&e) => true,
        _ => false,
    };
    stream.set_nonblocking(false).unwrap();
    closed
}

#[test]
fn an_oversized_submit_is_rejected_and_its_connection_keeps_its_other_jobs() {
    let env = Env::new();
    let master = echo_master(&env, "max_payload = \"1KiB\"");
    let mut client = master.client();
    client.send(1, "e", b"before").unwrap();
    // Over max_payload and over the frame limit: refused by its head, its body skipped.
    client.send(2, "e", &vec![b'x'; 300_000]).unwrap();
    client.send(3, "e", b"after").unwrap();
    client.send_watched(4, "e", &vec![b'y'; 5000]).unwrap();
    client.send(5, "e", b"last").unwrap();
    let mut got = recv_n(&mut client, 5);
    got.sort_by_key(|r| r.id);
    let summary: Vec<(u64, Status, String)> =
        got.iter().map(|r| (r.id, r.status, r.text())).collect();
    assert_eq!(summary[0], (1, Status::Ok, "before".into()));
    assert_eq!(summary[2], (3, Status::Ok, "after".into()));
    assert_eq!(summary[4], (5, Status::Ok, "last".into()));
    for (id, status, text) in [&summary[1], &summary[3]] {
        assert_eq!(*status, Status::Rejected, "job {id}: {text}");
        assert!(
            text.starts_with("too large (") && text.ends_with("bytes, max_payload is 1024)"),
            "job {id}: {text}"
        );
    }
    // The same connection goes on.
    assert_eq!(client.call("e", b"more").unwrap().body, b"more");
}

#[test]
fn frames_sent_too_slowly_are_closed_after_read_timeout_and_logged_with_a_count() {
    let env = Env::new();
    let master = echo_master(&env, "read_timeout = \"1s\"");
    let mut frame = Vec::new();
    jobhost::protocol::put_submit(&mut frame, 1, "e", &[b's'; 200]);
    let mut slow: Vec<UnixStream> = (0..50)
        .map(|_| UnixStream::connect(&master.socket).unwrap())
        .collect();
    // One byte each every 100 ms: each frame would take 20 s.
    let started = Instant::now();
    let mut sent = 0;
    let mut open = slow.len();
    while open > 0 && started.elapsed() < SOON {
        open = 0;
        for s in &mut slow {
            if !closed_by_master(s) && s.write_all(&frame[sent..sent + 1]).is_ok() {
                open += 1;
            }
        }
        sent = (sent + 1).min(frame.len() - 2);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(open, 0, "{open} slow connections still open after {SOON:?}");
    // A prompt client is served throughout.
    assert_eq!(
        master.client().call("e", b"prompt").unwrap().body,
        b"prompt"
    );
    let needle = "in the last second: a frame not finished within read_timeout (1s)";
    master.wait_for_log(needle, SOON);
    let lines = master.log_count(needle);
    assert!(
        lines < 10,
        "{lines} log lines for 50 closes:\n{}",
        master.log_text()
    );
}

#[test]
fn partial_frames_of_many_clients_stay_within_max_memory_while_others_are_served() {
    let env = Env::new();
    let master = echo_master(&env, "max_payload = \"4MiB\"\nmax_memory = \"16MiB\"");
    let before = rss_mib(&master);
    // 20 floods: each announces a 4 MiB frame and sends all of it but its last byte.
    let announced = (4 << 20) + 1035u32;
    let flooders: Vec<std::thread::JoinHandle<UnixStream>> = (0..20)
        .map(|_| {
            let mut s = UnixStream::connect(&master.socket).unwrap();
            std::thread::spawn(move || {
                s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
                let _ = s.write_all(&announced.to_be_bytes());
                let _ = s.write_all(&[jobhost::protocol::kind::SUBMIT]);
                let _ = s.write_all(&vec![0; announced as usize - 2]);
                s
            })
        })
        .collect();
    // Two clients keep getting their jobs answered meanwhile.
    let honest: Vec<std::thread::JoinHandle<usize>> = (0..2)
        .map(|n| {
            let socket = master.socket.clone();
            std::thread::spawn(move || {
                let mut client = jobhost::client::Client::connect(&socket).unwrap();
                let payload = vec![b'0' + n; 100_000];
                let mut answered = 0;
                let until = Instant::now() + Duration::from_secs(6);
                while Instant::now() < until {
                    let r = client.call("e", &payload).unwrap();
                    assert_eq!(r.body, payload);
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let held: Vec<UnixStream> = flooders.into_iter().map(|t| t.join().unwrap()).collect();
    for (n, t) in honest.into_iter().enumerate() {
        let answered = t.join().unwrap();
        assert!(answered > 0, "honest client {n} got nothing answered");
    }
    let grown = rss_mib(&master).saturating_sub(before);
    eprintln!("20 clients × 4 MiB partial frames, max_memory 16 MiB: master RSS grew {grown} MiB");
    assert!(
        grown < 40,
        "the master grew by {grown} MiB for partial frames (max_memory is 16 MiB)"
    );
    drop(held);
    wait_until("the master serves after the floods are gone", SOON, || {
        master.client().call("e", b"x").is_ok()
    });
}

#[test]
fn a_result_over_max_result_is_the_jobs_failure_and_costs_nothing_else() {
    let env = Env::new();
    let master = echo_master(&env, "max_payload = \"1MiB\"\nmax_result = \"64KiB\"");
    let workers = master.workers();
    let mut client = master.client();
    let r = client.call("e", &vec![b'r'; 100_000]).unwrap();
    assert_eq!(
        r.status,
        Status::Failed,
        "a result of {} bytes",
        r.body.len()
    );
    assert_eq!(
        r.text(),
        "result too large (100000 bytes, max_result is 65536)"
    );
    // Just under the limit is a result; the worker was not replaced for it.
    let r = client.call("e", &vec![b'r'; 65536]).unwrap();
    assert_eq!((r.status, r.body.len()), (Status::Ok, 65536));
    assert_eq!(master.workers(), workers);
}

#[test]
fn whole_frames_left_behind_by_the_budget_are_taken_once_the_client_reads() {
    // A client with 16 MiB of results it has not read sends two jobs in one write: the first
    // takes it over its own budget, so the second — whole, in the master's buffer — waits.
    // As the client reads, the second is taken: it is answered, and is no "slow frame"
    // closed by read_timeout (no EPOLLIN ever comes for bytes already read).
    let env = Env::new();
    env.install("echo");
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[server]\nread_timeout = \"2s\"\n[[pool]]\nname = \"e\"\nplugin = \"echo\"\n\n[[pool]]\nname = \"f\"\nplugin = \"faulty\"\nworkers = 4\n",
    ));
    master.wait_for_workers(5);
    let mut stream = UnixStream::connect(env.path().join("run/jobs.sock")).unwrap();
    stream.set_read_timeout(Some(SOON)).unwrap();
    let mut wire = Vec::new();
    for id in 0..16 {
        jobhost::protocol::put_submit(&mut wire, id, "f", b"big 1");
    }
    stream.write_all(&wire).unwrap();
    wait_until("16 MiB of results held for the client", SOON, || {
        let status: serde_json::Value =
            serde_json::from_str(master.admin("status json").lines().next().unwrap()).unwrap();
        status["pools"]
            .as_array()
            .and_then(|pools| pools.iter().find(|p| p["name"] == "f"))
            .is_some_and(|p| p["jobs_done"] == 16)
    });
    wire.clear();
    jobhost::protocol::put_submit(&mut wire, 100, "e", &vec![b'p'; 400_000]);
    jobhost::protocol::put_submit(&mut wire, 101, "e", b"x");
    stream.write_all(&wire).unwrap();
    // It reads at once: the master writes some of its results in the same pass that took the
    // first job, so the client is under its budget again without ever having been paused.
    let mut reader = jobhost::protocol::FrameReader::new(64 << 20);
    let mut answered = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while !answered.contains(&101) {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("reading results (answered so far: {answered:?}): {e}"),
        };
        assert!(
            n > 0,
            "the master closed the connection; answered: {answered:?}"
        );
        reader.push(&buf[..n]);
        while let Some(frame) = reader.next().unwrap() {
            if let Ok(jobhost::protocol::Frame::Result { id, status, .. }) =
                jobhost::protocol::decode(frame)
            {
                assert_eq!(status, Status::Ok, "job {id}");
                answered.push(id);
            }
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, (0..16).chain([100, 101]).collect::<Vec<_>>());
    assert_eq!(
        master.log_count("read_timeout"),
        0,
        "a client closed for a slow frame"
    );
}
