//! A hostile or broken server costs only its own connection: garbage, a huge announced
//! packet, a flood of NOOPs and ERRORs, a job nobody asked for, half a packet then a close.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobhost::gearman::packet::{code, encode_raw, Magic};
use jobhost_e2e::{wait_until, Env, SOON};

use super::{have_gearman, pool, Gearmand, PATIENCE};

/// What the hostile server does to its n-th connection.
fn abuse(n: usize, mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 << 10];
    let mut out = Vec::new();
    match n % 6 {
        // Not the binary protocol at all (a text line, as gearmand's admin port speaks).
        0 => out.extend_from_slice(b"OK 1.1.20\r\n"),
        // A packet announcing a body of 3 GiB, and then a trickle of it.
        1 => {
            out.extend_from_slice(b"\0RES");
            out.extend_from_slice(&code::JOB_ASSIGN_UNIQ.to_be_bytes());
            out.extend_from_slice(&(3u32 << 30).to_be_bytes());
            out.extend_from_slice(&[b'x'; 1000]);
        }
        // A flood of NOOPs and ERRORs, for as long as the worker reads.
        2 => {
            let mut flood = Vec::new();
            for i in 0..2000 {
                if i % 2 == 0 {
                    encode_raw(Magic::Res, code::NOOP, &[], &mut flood);
                } else {
                    encode_raw(Magic::Res, code::ERROR, &[b"BOGUS", b"flood"], &mut flood);
                }
            }
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                let _ = conn.read(&mut buf);
                if conn.write_all(&flood).is_err() {
                    return;
                }
            }
            return;
        }
        // A job nobody grabbed (before any GRAB: the worker only ECHOed).
        3 => encode_raw(
            Magic::Res,
            code::JOB_ASSIGN_UNIQ,
            &[b"H:evil:1", b"q", b"u", b"ok"],
            &mut out,
        ),
        // A request magic from a server.
        4 => encode_raw(Magic::Req, code::NOOP, &[], &mut out),
        // Half a header, then a close.
        _ => out.extend_from_slice(b"\0RES\0\0"),
    }
    let _ = conn.write_all(&out);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        if let Ok(0) = conn.read(&mut buf) {
            return;
        }
    }
}

#[test]
fn a_hostile_server_costs_only_its_own_connection() {
    if !have_gearman() {
        return;
    }
    let env = Env::new();
    env.install("faulty");
    let gm = Gearmand::start(&env, "gm", &[]);
    let hostile = TcpListener::bind("127.0.0.1:0").expect("a hostile server");
    let hostile_addr = hostile.local_addr().expect("its address").to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let server = {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || {
            let _ = hostile.set_nonblocking(true);
            let mut handlers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match hostile.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let n = accepted.fetch_add(1, Ordering::Relaxed);
                        let stop = stop.clone();
                        handlers.push(std::thread::spawn(move || abuse(n, conn, &stop)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for h in handlers {
                let _ = h.join();
            }
        })
    };
    let master = env.start_master(&pool(
        "faulty",
        2,
        &[hostile_addr.clone(), gm.address()],
        "",
        "",
    ));
    let workers = master.wait_for_workers(2);
    gm.wait_for_workers("q", 2);
    // Every kind of abuse, more than once per worker.
    wait_until("the workers went through every abuse", PATIENCE, || {
        accepted.load(Ordering::Relaxed) >= 12
    });
    // Meanwhile the real server's jobs are answered, by the same workers.
    for _ in 0..20 {
        let out = gm.cli(&["-f", "q", "ok"]);
        assert_eq!(
            (out.code(), out.stdout.as_str()),
            (0, "ok"),
            "{}",
            out.stderr
        );
    }
    assert_eq!(master.workers(), workers, "no worker died of it");
    for needle in [
        "bad packet from the server",
        "unexpected JOB_ASSIGN from the server",
    ] {
        wait_until(needle, SOON, || master.log_count(needle) > 0);
    }
    // Logged once per outage, not once per connection; the server's ERRORs at most once a
    // second per connection.
    let log = master.log_text();
    let about: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("gearman {hostile_addr}: ")))
        .collect();
    let outages = about
        .iter()
        .filter(|l| l.contains("once per outage"))
        .count();
    assert_eq!(outages, 2, "one outage per worker:\n{}", about.join("\n"));
    let errors = about
        .iter()
        .filter(|l| l.contains("the server says"))
        .count();
    assert!(
        errors <= 2 * 12,
        "{errors} ERROR lines:\n{}",
        about.join("\n")
    );
    // No worker's memory took the 3 GiB the server announced.
    for pid in &workers {
        let rss = jobhost::sys::rss_of(nix::unistd::Pid::from_raw(*pid)).unwrap_or(0);
        assert!(rss < 512 << 20, "worker {pid} holds {} MiB", rss >> 20);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
}
