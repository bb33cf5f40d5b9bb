//! Bad input on the job socket costs at most the one connection that sent it: the master stays
//! up, keeps serving everyone else, and its memory stays bounded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use jobhost_e2e::{config_with, is_reset, is_timeout, Env, Master, SOON};
use nix::unistd::Pid;

fn echo_master(env: &Env) -> Master {
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 1\n",
    ));
    master.wait_for_workers(1);
    master
}

/// The master closed `stream`: a read gets end of file (or a reset) within the deadline. A
/// read that times out means the connection is still open: that fails.
fn assert_closed_by_master(stream: &mut UnixStream) {
    stream.set_read_timeout(Some(SOON)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if is_reset(&e) => {}
        Err(e) if is_timeout(&e) => {
            panic!("the master left the connection open for {SOON:?}")
        }
        Err(e) => panic!("reading the connection: {e}"),
        Ok(n) => panic!("expected the connection closed, got {n} bytes"),
    }
}

fn assert_serves_others(master: &Master) {
    assert_eq!(
        master.client().call("e", b"still serving").unwrap().body,
        b"still serving"
    );
}

fn master_rss_mib(master: &Master) -> u64 {
    jobhost::sys::rss_of(Pid::from_raw(master.pid())).unwrap() >> 20
}

#[test]
fn garbage_bytes_close_that_connection_only() {
    let env = Env::new();
    let master = echo_master(&env);
    let mut bad = UnixStream::connect(&master.socket).unwrap();
    // A plausible length, then a frame kind that does not exist.
    bad.write_all(&[0, 0, 0, 3, 0xEE, 0x13, 0x37]).unwrap();
    assert_closed_by_master(&mut bad);
    master.wait_for_log("malformed frame: unknown frame kind 238", SOON);
    assert_serves_others(&master);
}

#[test]
fn a_truncated_frame_costs_nothing_but_its_connection() {
    let env = Env::new();
    let master = echo_master(&env);
    let mut half = UnixStream::connect(&master.socket).unwrap();
    let mut frame = Vec::new();
    jobhost::protocol::put_submit(&mut frame, 1, "e", b"never finished");
    half.write_all(&frame[..frame.len() / 2]).unwrap();
    // While it dangles, everyone else is served.
    assert_serves_others(&master);
    drop(half); // and when it goes, nothing happens
    assert_serves_others(&master);
    assert_eq!(master.log_count("ERROR"), 0);
}

#[test]
fn a_length_prefix_over_max_payload_closes_the_connection_before_any_body() {
    let env = Env::new();
    let master = echo_master(&env);
    let mut huge = UnixStream::connect(&master.socket).unwrap();
    // Not a SUBMIT (an oversized one is rejected instead, its connection kept).
    huge.write_all(&u32::MAX.to_be_bytes()).unwrap();
    huge.write_all(&[jobhost::protocol::kind::RESULT]).unwrap();
    assert_closed_by_master(&mut huge);
    master.wait_for_log(
        "malformed frame: frame of 4294967295 bytes is over the limit",
        SOON,
    );
    assert_serves_others(&master);
}

#[test]
fn a_client_that_never_reads_its_results_is_back_pressured() {
    let env = Env::new();
    let master = echo_master(&env);
    let rss_before = master_rss_mib(&master);
    let mut greedy = UnixStream::connect(&master.socket).unwrap();
    greedy
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut frame = Vec::new();
    let payload = vec![b'p'; 4096];
    let mut sent = 0u64;
    // Push jobs, never read: at some point the master stops reading us and our writes block.
    loop {
        frame.clear();
        jobhost::protocol::put_submit(&mut frame, sent, "e", &payload);
        match greedy.write_all(&frame) {
            Ok(()) => sent += 1,
            Err(_) => break, // timed out: back-pressure reached us
        }
        assert!(
            sent < 200_000,
            "the master kept reading a client that never reads"
        );
    }
    // Everyone else is served promptly, and the master did not buffer without bound.
    assert_serves_others(&master);
    let grown = master_rss_mib(&master).saturating_sub(rss_before);
    eprintln!("greedy client stopped after {sent} jobs; master RSS grew {grown} MiB");
    assert!(
        grown < 64,
        "master RSS grew {grown} MiB for one client that does not read"
    );
}

#[test]
fn thousands_of_silent_connections_cost_little_and_block_no_one() {
    let env = Env::new();
    let master = echo_master(&env);
    // Room for our side of the connections.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    let n = 3000.min(hard.saturating_sub(200)) as usize;
    let rss_before = master_rss_mib(&master);
    let idle: Vec<UnixStream> = (0..n)
        .map(|_| UnixStream::connect(&master.socket).unwrap())
        .collect();
    assert_serves_others(&master);
    let grown = master_rss_mib(&master).saturating_sub(rss_before);
    eprintln!("{n} idle connections: master RSS grew {grown} MiB");
    assert!(
        grown < 32,
        "{n} idle connections cost the master {grown} MiB"
    );
    drop(idle);
    assert_serves_others(&master);
}

#[test]
fn clients_that_announce_a_huge_frame_and_send_a_byte_cost_the_master_what_they_sent() {
    use std::io::Write;
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 1\n",
    ));
    master.wait_for_workers(1);
    let rss = || jobhost::sys::rss_of(nix::unistd::Pid::from_raw(master.pid())).unwrap();
    let before = rss();
    // The largest frame the default max_payload allows, announced; one byte of it sent.
    let announced: u32 = (16 << 20) + 1035;
    let mut conns = Vec::new();
    for _ in 0..20 {
        let mut s = std::os::unix::net::UnixStream::connect(&master.socket).unwrap();
        s.write_all(&announced.to_be_bytes()).unwrap();
        s.write_all(&[1]).unwrap();
        conns.push(s);
    }
    // The master has read them all once it answers a job sent after them.
    assert_eq!(master.client().call("echo", b"x").unwrap().body, b"x");
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 20 << 20,
        "20 clients sent 5 bytes each; the master grew by {} MiB",
        grown >> 20
    );
}
