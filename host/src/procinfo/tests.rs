//! The parsers on literal lines as the kernel writes them, then real threads and processes
//! blocked in real calls on real descriptors, described through their `/proc` entries.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::gettid;

use super::*;

/// One description with a whole budget of its own (the master's go through an allowance).
fn doing(pid: Pid) -> Doing {
    doing_with_budget(pid, &mut { NET_TABLES_BUDGET })
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn syscall_lines_are_parsed() {
    assert_eq!(parse_syscall_line("running\n"), Some(Call::Running));
    assert_eq!(
        parse_syscall_line("-1 0x7ffe162bfe38 0x7fb3475dd2ad\n"),
        Some(Call::NotInCall)
    );
    let line = "0 0x3 0x7fb347462000 0x20000 0x7fb3474f4b60 0xffffffff 0x0 0x7ffe162bfe38 0x7fb3475dd2ad\n";
    assert_eq!(
        parse_syscall_line(line),
        Some(Call::In {
            nr: 0,
            args: [3, 0x7fb347462000, 0x20000, 0x7fb3474f4b60, 0xffffffff, 0],
            fd: None,
        })
    );
    // Odd contents: nothing, a word, too few arguments, arguments without 0x, a huge number.
    for odd in [
        "",
        "\n",
        "sleeping",
        "0 0x3 0x4",
        "0 3 4 5 6 7 8 9 10",
        "0 0x3 0x4 0x5 0x6 0x7 0xfffffffffffffffff",
        "99999999999999999999 0x0 0x0 0x0 0x0 0x0 0x0 0x0 0x0",
    ] {
        assert_eq!(parse_syscall_line(odd), None, "{odd:?}");
    }
}

#[test]
fn stat_state_is_the_letter_after_the_last_parenthesis() {
    let stat = "10561 (sleep) S 10560 10558 7316 0 -1 4194304 127 0 0 0 0 0 0 0 20 0 1 0\n";
    assert_eq!(parse_stat_state(stat), Some('S'));
    // A command name may hold spaces and parentheses: "a) b) (c".
    assert_eq!(parse_stat_state("42 (a) b) (c) D 1 1 1"), Some('D'));
    assert_eq!(parse_stat_state("42 (x"), None);
    assert_eq!(parse_stat_state("42 (x)"), None);
    assert_eq!(parse_stat_state(""), None);
}

#[test]
fn wchan_is_a_kernel_symbol_or_nothing() {
    assert_eq!(
        parse_wchan("hrtimer_nanosleep"),
        Some("hrtimer_nanosleep".into())
    );
    assert_eq!(
        parse_wchan("do_epoll_wait.part.0\n"),
        Some("do_epoll_wait.part.0".into())
    );
    assert_eq!(parse_wchan("0"), None);
    assert_eq!(parse_wchan(""), None);
    assert_eq!(parse_wchan("not a\nsymbol"), None);
    assert_eq!(parse_wchan(&"x".repeat(65)), None);
}

/// The kernel's form of an address: each 32-bit word of the network-order bytes printed as a
/// native-endian number (what `decode_addr` must undo on either endianness).
fn kernel_hex(address: SocketAddr) -> String {
    let bytes: Vec<u8> = match address.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let words: String = bytes
        .chunks_exact(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    format!("{words}:{:04X}", address.port())
}

#[test]
#[cfg(target_endian = "little")]
fn addresses_decode_from_the_kernels_byte_order() {
    // Lines as x86_64 and aarch64 (little-endian) kernels print them.
    assert_eq!(decode_addr("0100007F:0CEA"), Some(addr("127.0.0.1:3306")));
    assert_eq!(decode_addr("0500000A:01BB"), Some(addr("10.0.0.5:443")));
    assert_eq!(decode_addr("00000000:0000"), Some(addr("0.0.0.0:0")));
    assert_eq!(
        decode_addr("00000000000000000000000001000000:1F90"),
        Some(addr("[::1]:8080"))
    );
    assert_eq!(
        decode_addr("B80D0120000000000000000001000000:01BB"),
        Some(addr("[2001:db8::1]:443"))
    );
    assert_eq!(
        decode_addr("B80D01200000000000000000010000FE:01BB"),
        Some(addr("[2001:db8::fe00:1]:443"))
    );
    // A dual-stack socket's IPv4 peer (::ffff:10.0.0.5) reads as IPv4.
    assert_eq!(
        decode_addr("0000000000000000FFFF00000500000A:01BB"),
        Some(addr("10.0.0.5:443"))
    );
}

#[test]
fn addresses_round_trip_through_the_kernels_form() {
    for text in [
        "127.0.0.1:1",
        "10.0.0.5:443",
        "192.168.200.17:65535",
        "[::1]:8080",
        "[2001:db8:1:2:3:4:5:6]:443",
        "[fe80::1]:22",
    ] {
        let address = addr(text);
        assert_eq!(decode_addr(&kernel_hex(address)), Some(address), "{text}");
    }
    for odd in [
        "",
        "0100007F",
        "0100007F:",
        "0100007:0CEA",
        "0100007F:XYZ",
        "0100007F:10000",
        "zz00007F:0CEA",
        "0000000000000000000000000100000:1F90",
        "0000000000000000000000000100000é:1F90",
    ] {
        assert_eq!(decode_addr(odd), None, "{odd:?}");
    }
}

#[test]
#[cfg(target_endian = "little")]
fn tcp_and_udp_table_lines_are_found_by_inode() {
    let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
    let listener = "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1589 1 000000007937a9b2 100 0 0 10 0";
    let connected = "   1: 0100007F:A1B2 0500000A:01BB 01 00000000:00000000 02:000A7D1B 00000000  1000        0 4242 2 0000000000000000 20 4 30 10 -1";
    let udp = "  123: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 5353 2 0000000000000000 0";
    assert_eq!(parse_net_tcp_line(header, 1589), None);
    assert_eq!(parse_net_tcp_line(listener, 1590), None);
    let found = parse_net_tcp_line(listener, 1589).unwrap();
    assert_eq!(
        found.tcp_target(),
        Target::TcpListening {
            local: addr("0.0.0.0:2024")
        }
    );
    let found = parse_net_tcp_line(connected, 4242).unwrap();
    assert_eq!(found.local, addr("127.0.0.1:41394"));
    assert_eq!(
        found.tcp_target(),
        Target::Tcp {
            remote: addr("10.0.0.5:443"),
            state: TcpState::Established
        }
    );
    let found = parse_net_tcp_line(udp, 5353).unwrap();
    assert_eq!(
        found.udp_target(),
        Target::Udp {
            local: addr("0.0.0.0:5353"),
            remote: None
        }
    );
    // Cut short, or a bad address: not this socket.
    assert_eq!(parse_net_tcp_line(&listener[..60], 1589), None);
    assert_eq!(
        parse_net_tcp_line(&listener.replace("00000000:07E8", "0000:07E8"), 1589),
        None
    );
    let connecting = connected.replace(" 01 ", " 02 ");
    assert_eq!(
        parse_net_tcp_line(&connecting, 4242).unwrap().tcp_target(),
        Target::Tcp {
            remote: addr("10.0.0.5:443"),
            state: TcpState::Connecting
        }
    );
    let tcp6 = "   2: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:1F90 08 00000000:00000000 00:00000000 00000000  1000        0 777 1 0000000000000000 20 4 0 10 -1";
    assert_eq!(
        parse_net_tcp_line(tcp6, 777).unwrap().tcp_target(),
        Target::Tcp {
            remote: addr("[::1]:8080"),
            state: TcpState::ClosedByPeer
        }
    );
}

#[test]
fn unix_table_lines_are_found_by_inode() {
    let header = "Num       RefCount Protocol Flags    Type St Inode Path";
    let listening =
        "0000000000000000: 00000002 00000000 00010000 0001 01 35677 /run/job host/api.sock\n";
    let unnamed = "00000000e3355072: 00000003 00000000 00000000 0001 03 14742\n";
    let abstract_name =
        "0000000016f0d9a5: 00000002 00000000 00010000 0001 01  9012 @/tmp/.X11-unix/X0\n";
    assert_eq!(parse_net_unix_line(header, 35677), None);
    assert_eq!(parse_net_unix_line(listening, 35678), None);
    assert_eq!(
        parse_net_unix_line(listening, 35677),
        Some(Target::Unix {
            path: Some("/run/job host/api.sock".into()),
            listening: true
        })
    );
    assert_eq!(
        parse_net_unix_line(unnamed, 14742),
        Some(Target::Unix {
            path: None,
            listening: false
        })
    );
    assert_eq!(
        parse_net_unix_line(abstract_name, 9012),
        Some(Target::Unix {
            path: Some("@/tmp/.X11-unix/X0".into()),
            listening: true
        })
    );
    // A worker names its sockets: a control character cannot reach the log line raw.
    let hostile = "0000000000000000: 00000003 00000000 00000000 0001 03 5 /tmp/a\u{1b}[31m\rfake\n";
    let Some(Target::Unix {
        path: Some(path), ..
    }) = parse_net_unix_line(hostile, 5)
    else {
        panic!("not found");
    };
    assert_eq!(path, "/tmp/a\\u{1b}[31m\\rfake");
    // Nor one that reorders or hides what follows it.
    let hostile =
        "0000000000000000: 00000003 00000000 00000000 0001 03 5 /tmp/\u{202e}gpj.exe\u{200b}\n";
    let Some(Target::Unix {
        path: Some(path), ..
    }) = parse_net_unix_line(hostile, 5)
    else {
        panic!("not found");
    };
    assert_eq!(path, "/tmp/\\u{202e}gpj.exe\\u{200b}");
    assert_eq!(parse_net_unix_line("0000: 1 2", 2), None);
}

#[test]
fn fd_links_name_what_the_descriptor_is() {
    let target = |link: &str| match parse_fd_link(link) {
        Link::Socket(inode) => Target::Socket { inode },
        Link::Target(target) => target,
    };
    assert_eq!(target("socket:[35677]"), Target::Socket { inode: 35677 });
    assert_eq!(target("pipe:[1234]"), Target::Pipe);
    assert_eq!(target("anon_inode:[eventpoll]"), Target::Epoll);
    assert_eq!(
        target("anon_inode:[eventfd]"),
        Target::Anon("eventfd".into())
    );
    assert_eq!(target("anon_inode:inotify"), Target::Anon("inotify".into()));
    assert_eq!(
        target("/var/lib/jobs/a.db (deleted)"),
        Target::Path("/var/lib/jobs/a.db (deleted)".into())
    );
    assert_eq!(
        target("net:[4026531840]"),
        Target::Other("net:[4026531840]".into())
    );
    assert_eq!(
        target("socket:[oops]"),
        Target::Other("socket:[oops]".into())
    );
    let long = format!("/{}", "d".repeat(5000));
    let Target::Path(cut) = target(&long) else {
        panic!("not a path");
    };
    assert_eq!(cut.chars().count(), NAME_MAX_CHARS + 1);
    assert!(cut.ends_with('…'));
}

#[test]
#[cfg(target_arch = "x86_64")]
fn syscall_numbers_are_x86_64s() {
    for (nr, name) in [
        (0, "read"),
        (1, "write"),
        (7, "poll"),
        (23, "select"),
        (35, "nanosleep"),
        (42, "connect"),
        (45, "recvfrom"),
        (61, "wait4"),
        (202, "futex"),
        (230, "clock_nanosleep"),
        (232, "epoll_wait"),
        (257, "openat"),
        (288, "accept4"),
        (426, "io_uring_enter"),
        (441, "epoll_pwait2"),
    ] {
        assert_eq!(syscall_name(nr), Some(name), "{nr}");
    }
}

#[test]
#[cfg(target_arch = "aarch64")]
fn syscall_numbers_are_aarch64s() {
    for (nr, name) in [
        (63, "read"),
        (64, "write"),
        (73, "ppoll"),
        (101, "nanosleep"),
        (203, "connect"),
        (207, "recvfrom"),
        (260, "wait4"),
        (98, "futex"),
        (115, "clock_nanosleep"),
        (56, "openat"),
        (242, "accept4"),
        (426, "io_uring_enter"),
        (441, "epoll_pwait2"),
    ] {
        assert_eq!(syscall_name(nr), Some(name), "{nr}");
    }
}

#[test]
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn the_table_names_every_call_a_job_blocks_in() {
    let named: BTreeSet<&str> = (0..1024).filter_map(syscall_name).collect();
    let mut wanted = vec![
        "read",
        "write",
        "pread64",
        "pwrite64",
        "readv",
        "writev",
        "recvfrom",
        "sendto",
        "recvmsg",
        "sendmsg",
        "recvmmsg",
        "connect",
        "accept",
        "accept4",
        "ppoll",
        "pselect6",
        "epoll_pwait",
        "epoll_pwait2",
        "nanosleep",
        "clock_nanosleep",
        "futex",
        "wait4",
        "waitid",
        "openat",
        "fsync",
        "fdatasync",
        "flock",
        "fcntl",
        "sync",
        "io_getevents",
        "io_uring_enter",
        "msgrcv",
        "semop",
        "semtimedop",
        "rt_sigsuspend",
        "rt_sigtimedwait",
        "splice",
        "sendfile",
        "copy_file_range",
        "getrandom",
        "mmap",
        "munmap",
        "madvise",
        "msync",
    ];
    if cfg!(target_arch = "x86_64") {
        wanted.extend(["open", "poll", "select", "epoll_wait", "pause"]);
    }
    for name in wanted {
        assert!(named.contains(name), "{name} is missing");
    }
    // Each number has one name.
    let count = (0..1024).filter_map(syscall_name).count();
    assert_eq!(count, named.len());
    assert_eq!(syscall_name(-1), None);
    assert_eq!(syscall_name(99_999), None);
}

#[test]
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn lines_read_as_an_operator_wants() {
    let call = |nr: i64, fd: Option<(i32, Target)>| Call::In {
        nr,
        args: [0; 6],
        fd,
    };
    let line = |state, call, kernel: Option<&str>| {
        Doing {
            state,
            call,
            kernel_function: kernel.map(String::from),
        }
        .to_string()
    };
    let peer = Target::Tcp {
        remote: addr("10.0.0.5:443"),
        state: TcpState::Established,
    };
    use nix::libc as c;
    assert_eq!(
        line(
            State::Sleeping,
            call(c::SYS_read, Some((7, peer.clone()))),
            Some("wait_woken")
        ),
        "blocked in read on socket 10.0.0.5:443 (kernel: wait_woken)"
    );
    assert_eq!(
        line(
            State::Sleeping,
            call(c::SYS_clock_nanosleep, None),
            Some("hrtimer_nanosleep")
        ),
        "sleeping in clock_nanosleep (kernel: hrtimer_nanosleep)"
    );
    assert_eq!(
        line(State::Sleeping, call(c::SYS_futex, None), None),
        "waiting on a futex (a lock or a condition)"
    );
    assert_eq!(
        line(State::Sleeping, call(c::SYS_ppoll, None), None),
        "waiting in ppoll"
    );
    assert_eq!(
        line(
            State::Uninterruptible,
            call(
                c::SYS_fsync,
                Some((4, Target::Path("/data/jobs.db".into())))
            ),
            Some("jbd2_log_wait_commit")
        ),
        "blocked in fsync on /data/jobs.db, uninterruptible (kernel: jbd2_log_wait_commit)"
    );
    assert_eq!(
        line(
            State::Sleeping,
            call(c::SYS_write, Some((9, Target::Unknown))),
            None
        ),
        "blocked in write on fd 9"
    );
    assert_eq!(
        line(
            State::Sleeping,
            call(
                c::SYS_accept4,
                Some((
                    3,
                    Target::TcpListening {
                        local: addr("[::]:8080")
                    }
                ))
            ),
            None
        ),
        "waiting in accept4 on socket listening on [::]:8080"
    );
    assert_eq!(
        line(State::Sleeping, call(999, None), None),
        "in syscall 999"
    );
    assert_eq!(
        line(State::Running, Call::Running, None),
        "running on a CPU"
    );
    assert_eq!(
        line(State::Sleeping, Call::NotInCall, None),
        "in user space (not in a system call)"
    );
    assert_eq!(
        line(
            State::Stopped,
            call(c::SYS_read, Some((7, peer))),
            Some("do_signal_stop")
        ),
        "stopped (SIGSTOP or another stop signal) while blocked in read on socket 10.0.0.5:443 (kernel: do_signal_stop)"
    );
    assert_eq!(line(State::Gone, Call::Unknown, None), "gone");
    assert_eq!(
        line(State::Zombie, Call::Unknown, None),
        "exited, not yet reaped (zombie)"
    );
    assert_eq!(
        line(State::Uninterruptible, Call::Unknown, None),
        "blocked, uninterruptible"
    );
}

// ---- real threads and processes ----

/// The description of `pid` once `wanted` holds, or the last one when 30 s have passed (the
/// thread may not have entered its call yet; a loaded machine may take its time).
fn described_soon(pid: Pid, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = doing(pid).to_string();
        if wanted(&line) || Instant::now() >= deadline {
            println!("procinfo: {line}");
            return line;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A thread of this process blocked in `read(2)` on `source` (a `File` over the descriptor, so
/// the call is `read` itself, not std's `recv` for sockets); its thread id and its end (which
/// comes with one byte written to the other side).
fn reader(source: OwnedFd) -> (Pid, thread::JoinHandle<io::Result<usize>>) {
    let (tid_tx, tid_rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        let mut file = File::from(source);
        tid_tx.send(gettid()).unwrap();
        let mut byte = [0u8; 1];
        file.read(&mut byte)
    });
    (tid_rx.recv().unwrap(), thread)
}

fn ends_with_one_byte(thread: thread::JoinHandle<io::Result<usize>>) {
    assert_eq!(thread.join().unwrap().unwrap(), 1);
}

/// `line` is `expected`, with or without the kernel function after it.
fn is(line: &str, expected: &str) -> bool {
    line == expected
        || line
            .strip_prefix(expected)
            .is_some_and(|rest| rest.starts_with(" (kernel: ") && rest.ends_with(')'))
}

#[test]
fn a_thread_reading_a_tcp_socket_names_its_peer() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, client_addr) = listener.accept().unwrap();
    let (tid, thread) = reader(client.try_clone().unwrap().into());
    let expected = format!("blocked in read on socket 127.0.0.1:{port}");
    let line = described_soon(tid, |line| is(line, &expected));
    assert!(is(&line, &expected), "{line}");
    server.write_all(b"x").unwrap();
    ends_with_one_byte(thread);

    // The other end, read by std (which calls recvfrom on a socket): the client's port.
    let (tid_tx, tid_rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        let mut byte = [0u8; 1];
        server.read(&mut byte)
    });
    let tid = tid_rx.recv().unwrap();
    let expected = format!("blocked in recvfrom on socket {client_addr}");
    let line = described_soon(tid, |line| is(line, &expected));
    assert!(is(&line, &expected), "{line}");
    client.write_all(b"x").unwrap();
    ends_with_one_byte(thread);
}

#[test]
fn a_thread_accepting_names_the_listening_address() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (tid_tx, tid_rx) = mpsc::channel();
    let thread = thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        listener.accept().map(|_| ())
    });
    let tid = tid_rx.recv().unwrap();
    let expected = format!("waiting in accept4 on socket listening on {address}");
    let line = described_soon(tid, |line| is(line, &expected));
    assert!(is(&line, &expected), "{line}");
    let _client = TcpStream::connect(address).unwrap();
    thread.join().unwrap().unwrap();
}

#[test]
fn a_thread_reading_an_ipv6_socket_names_its_peer_in_brackets() {
    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        eprintln!("skipped: this machine has no ::1");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let (tid, thread) = reader(client.into());
    let expected = format!("blocked in read on socket [::1]:{port}");
    let line = described_soon(tid, |line| is(line, &expected));
    assert!(is(&line, &expected), "{line}");
    server.write_all(b"x").unwrap();
    ends_with_one_byte(thread);
}

#[test]
fn a_thread_reading_a_connected_udp_socket_names_its_peer() {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(peer.local_addr().unwrap()).unwrap();
    let own = socket.local_addr().unwrap();
    let (tid, thread) = reader(socket.into());
    let expected = format!(
        "blocked in read on UDP socket {}",
        peer.local_addr().unwrap()
    );
    let line = described_soon(tid, |line| is(line, &expected));
    assert!(is(&line, &expected), "{line}");
    peer.send_to(b"x", own).unwrap();
    ends_with_one_byte(thread);
}

#[test]
fn a_thread_reading_a_pipe() {
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let (tid, thread) = reader(read_end);
    let line = described_soon(tid, |line| is(line, "blocked in read on pipe"));
    assert!(is(&line, "blocked in read on pipe"), "{line}");
    File::from(write_end).write_all(b"x").unwrap();
    ends_with_one_byte(thread);
}

#[test]
fn threads_on_unix_sockets_name_the_path_where_the_kernel_knows_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let accepting = listener.try_clone().unwrap();
    let (tid_tx, tid_rx) = mpsc::channel();
    let acceptor = thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        accepting.accept().map(|(stream, _)| stream)
    });
    let tid = tid_rx.recv().unwrap();
    let expected = format!(
        "waiting in accept4 on unix socket listening on {}",
        path.display()
    );
    let line = described_soon(tid, |line| is(line, &expected));
    assert!(is(&line, &expected), "{line}");

    let mut client = UnixStream::connect(&path).unwrap();
    let server = acceptor.join().unwrap().unwrap();
    // The accepted side carries the listener's name; the connecting side is unnamed.
    let (tid, thread) = reader(server.into());
    let expected = format!("blocked in read on unix socket {}", path.display());
    let line = described_soon(tid, |line| is(line, &expected));
    assert!(is(&line, &expected), "{line}");
    client.write_all(b"x").unwrap();
    ends_with_one_byte(thread);

    let client = UnixStream::connect(&path).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let (tid, thread) = reader(client.into());
    let line = described_soon(tid, |line| is(line, "blocked in read on unix socket"));
    assert!(is(&line, "blocked in read on unix socket"), "{line}");
    server.write_all(b"x").unwrap();
    ends_with_one_byte(thread);
}

#[test]
fn a_sleeping_thread_sleeps() {
    let (tid_tx, tid_rx) = mpsc::channel();
    // Detached: it sleeps on, harmlessly, until the test process exits.
    thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        thread::sleep(Duration::from_secs(3600));
    });
    let tid = tid_rx.recv().unwrap();
    let sleeping =
        |line: &str| is(line, "sleeping in clock_nanosleep") || is(line, "sleeping in nanosleep");
    let line = described_soon(tid, sleeping);
    assert!(sleeping(&line), "{line}");
}

#[test]
fn a_spinning_thread_runs() {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tid_tx, tid_rx) = mpsc::channel();
    let spinning = stop.clone();
    let thread = thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        while !spinning.load(std::sync::atomic::Ordering::Relaxed) {
            std::hint::spin_loop();
        }
    });
    let tid = tid_rx.recv().unwrap();
    let line = described_soon(tid, |line| line == "running on a CPU");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    thread.join().unwrap();
    assert_eq!(line, "running on a CPU");
}

#[test]
fn a_child_process_sleeps_stops_dies_and_goes() {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let sleeping =
        |line: &str| is(line, "sleeping in clock_nanosleep") || is(line, "sleeping in nanosleep");
    let line = described_soon(pid, sleeping);
    assert!(sleeping(&line), "{line}");

    kill(pid, Signal::SIGSTOP).unwrap();
    let line = described_soon(pid, |line| line.starts_with("stopped (SIGSTOP"));
    assert!(
        line.starts_with("stopped (SIGSTOP or another stop signal)"),
        "{line}"
    );
    kill(pid, Signal::SIGCONT).unwrap();
    // The kernel resumes the interrupted clock_nanosleep as restart_syscall.
    let resumed = |line: &str| {
        sleeping(line)
            || is(
                line,
                "waiting in restart_syscall (a sleep or wait resumed after a signal)",
            )
    };
    let line = described_soon(pid, resumed);
    assert!(resumed(&line), "{line}");

    child.kill().unwrap();
    let line = described_soon(pid, |line| line.contains("zombie"));
    assert_eq!(line, "exited, not yet reaped (zombie)");
    child.wait().unwrap();
    assert_eq!(doing(pid).to_string(), "gone");
}

#[test]
fn no_such_process_is_gone() {
    // Above the largest pid_max Linux allows (2^22).
    assert_eq!(doing(Pid::from_raw(i32::MAX)).to_string(), "gone");
    assert_eq!(doing(Pid::from_raw(0)).state, State::Gone);
    assert_eq!(doing(Pid::from_raw(-5)).state, State::Gone);
}

#[test]
fn socket_tables_are_read_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tcp");
    let mut table = String::from("header\n");
    for inode in 1..=1000 {
        table.push_str(&format!("line {inode}\n"));
    }
    std::fs::write(&path, &table).unwrap();
    let path = path.to_str().unwrap();
    let wanted =
        |inode: u32| move |line: &str| (line == format!("line {inode}\n")).then_some(inode);
    let mut budget = 1 << 20;
    assert_eq!(scan_table(path, &mut budget, wanted(10)), Some(10));
    assert_eq!(
        budget,
        (1 << 20) - 7 - 9 * 7 - 8,
        "spent: the lines read, no more"
    );
    // The 1000th line lies past a budget of 100 bytes: not found, the budget spent.
    let mut budget = 100;
    assert_eq!(scan_table(path, &mut budget, wanted(1000)), None);
    assert_eq!(budget, 0);
    let mut budget = 1 << 20;
    assert_eq!(scan_table("/nonexistent/tcp", &mut budget, wanted(1)), None);
}

#[test]
fn a_unix_socket_claimed_by_two_lines_is_not_named() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("unix");
    let real = "0000000000000000: 00000002 00000000 00010000 0001 01 35677 /run/jobs.sock\n";
    // A path with a newline that reads as a whole line claiming the same inode.
    let forging = "0000000000000000: 00000002 00000000 00000000 0001 01 35680 /tmp/x\n\
                   0000000000000000: 00000002 00000000 00000000 0001 03 35677 /etc/forged\n";
    let other = "0000000000000000: 00000003 00000000 00000000 0001 03 14742\n";
    let find = |text: &str, budget: u64| {
        std::fs::write(&table, text).unwrap();
        let mut budget = budget;
        find_unix_socket(table.to_str().unwrap(), &mut budget, 35677)
    };
    let named = Some(Target::Unix {
        path: Some("/run/jobs.sock".into()),
        listening: true,
    });
    assert_eq!(find(&format!("{real}{other}"), 1 << 20), named);
    assert_eq!(find(other, 1 << 20), None);
    for text in [format!("{real}{forging}"), format!("{forging}{real}")] {
        assert_eq!(find(&text, 1 << 20), Some(Target::UnixNameUncertain));
    }
    // The rest of a path is not a line unless it has the kernel's shape.
    let tail = "0000000000000000: 2 0 0 1 1 35677 /etc/forged\n";
    assert_eq!(find(&format!("{real}{tail}"), 1 << 20), named);
    // A match with the rest of the table unread cannot be known to be the only one.
    let budget = (real.len() + 10) as u64;
    assert_eq!(
        find(&format!("{real}{other}{other}"), budget),
        Some(Target::UnixNameUncertain)
    );
    assert_eq!(
        Target::UnixNameUncertain.to_string(),
        "unix socket (name not certain)"
    );
}

#[test]
fn a_forged_line_in_the_real_unix_table_does_not_name_a_socket() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let inode = File::from(OwnedFd::from(listener.try_clone().unwrap()))
        .metadata()
        .unwrap()
        .ino();
    // A second socket whose path holds a newline and then a line claiming the first's inode.
    let forger = dir.path().join(format!(
        "b\n0000000000000000: 00000002 00000000 00010000 0001 01 {inode} forged"
    ));
    let _forger = UnixListener::bind(&forger).unwrap();
    let (tid_tx, tid_rx) = mpsc::channel();
    let accepting = listener.try_clone().unwrap();
    thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        // Ends when the test process does.
        let _ = accepting.accept();
    });
    let tid = tid_rx.recv().unwrap();
    let expected = "waiting in accept4 on unix socket (name not certain)";
    let line = described_soon(tid, |line| is(line, expected));
    assert!(is(&line, expected), "{line}");
    assert!(!line.contains("forged"), "{line}");
}

#[test]
fn the_socket_tables_cost_at_most_the_allowance_a_second() {
    let start = Instant::now();
    let mut allowance = TablesAllowance::new(start);
    assert_eq!(
        allowance.grant(start),
        NET_TABLES_BUDGET.min(TABLES_PER_SECOND)
    );
    allowance.left = 0;
    assert_eq!(allowance.grant(start + Duration::from_millis(999)), 0);
    // Spent for this second: a socket is only its inode.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let accepting = listener.try_clone().unwrap();
    let (tid_tx, tid_rx) = mpsc::channel();
    thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        // Ends when the test process does.
        let _ = accepting.accept();
    });
    let tid = tid_rx.recv().unwrap();
    let named = format!(
        "waiting in accept4 on socket listening on {}",
        listener.local_addr().unwrap()
    );
    described_soon(tid, |line| is(line, &named));
    let later = start + Duration::from_millis(999);
    let line = doing_within(tid, &mut allowance, later).to_string();
    assert!(
        line.starts_with("waiting in accept4 on socket (inode "),
        "{line}"
    );
    // A second later it is named again, and what the tables cost is taken off.
    let next = start + Duration::from_secs(1);
    let line = doing_within(tid, &mut allowance, next).to_string();
    assert!(is(&line, &named), "{line}");
    assert!(allowance.left < TABLES_PER_SECOND, "{allowance:?}");
}
