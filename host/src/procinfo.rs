//! What a process (or one thread of it) is doing right now, told in one line for an operator
//! reading a log: "blocked in read on socket 10.0.0.5:443 (kernel: wait_woken)". It reads
//! `/proc/PID/stat` (the scheduler state), `/proc/PID/syscall` (the system call it is in and
//! its arguments), `/proc/PID/wchan` (the kernel function it sleeps in) and, when the call's
//! first argument is a descriptor, `/proc/PID/fd/N` and — only for a socket — the socket tables
//! of the process's network namespace (`/proc/PID/net/{tcp,tcp6,udp,udp6,unix}`). Any PID is a
//! thread id too: `/proc/TID/...` describes that thread.
//!
//! Owns: reading and parsing those files (pure parsers, unit-tested on literal lines) and the
//! table of system call numbers for x86_64 and aarch64 (the numbers are libc's, per target).
//!
//! Never: panics, blocks or costs more than a bounded read on whatever it finds — the process
//! is an untrusted worker, and although the kernel writes these files, the names in them (file
//! paths, unix socket paths) are the worker's choice, so they are made printable and cut short.
//! Every failure (the process gone, EACCES on a restricted kernel, an odd line) leaves out
//! detail, nothing more. It never reads another process's memory (`/proc/PID/mem`), never
//! attaches to it and never signals it.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// The most read of the socket tables for one description: with many sockets in the namespace
/// they run to megabytes; a socket past this is described as "socket (inode N)".
const NET_TABLES_BUDGET: u64 = 4 << 20;

/// The most read of the socket tables a second by one [`TablesAllowance`], all descriptions
/// together: a worker can fill its namespace's tables (tens of thousands of unix sockets make
/// `/proc/net/unix` megabytes, some 15 ms a MiB to read) and many workers can turn slow at once,
/// so the master's loop spends at most about this on them a second; past it, a socket is
/// described by its inode.
pub const TABLES_PER_SECOND: u64 = 2 << 20;

/// The most read of a small file (`stat`, `syscall`, `wchan`): each is one short line.
const SMALL_FILE_MAX: u64 = 4096;

/// The longest name (file path, unix socket path) put in a description, in characters.
const NAME_MAX_CHARS: usize = 160;

/// What a process or thread is doing, from its `/proc` entry; [`Display`](fmt::Display) gives
/// the one line for a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doing {
    /// The scheduler's state (`/proc/PID/stat`).
    pub state: State,
    /// The system call it is in, if it is in one (`/proc/PID/syscall`).
    pub call: Call,
    /// The kernel function it sleeps in (`/proc/PID/wchan`); `None` when running, or on a
    /// kernel that hides it (which shows `0`).
    pub kernel_function: Option<String>,
}

/// A process's state, the third field of `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No such process (never was, exited and reaped, or `X`: being torn down).
    Gone,
    /// `R`: running on a CPU or ready to.
    Running,
    /// `S`: waiting, woken by a signal.
    Sleeping,
    /// `D`: waiting uninterruptibly (disk, a network file system, a page fault); even SIGKILL
    /// takes effect only once the wait ends.
    Uninterruptible,
    /// `T`: stopped by a signal (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU).
    Stopped,
    /// `t`: stopped by a tracer (a debugger).
    Traced,
    /// `Z`: exited, not yet reaped by its parent.
    Zombie,
    /// Another letter (`I` idle, `P` parked: kernel threads' states).
    Other(char),
    /// The entry exists but its state could not be read.
    Unknown,
}

/// Where a process is, as `/proc/PID/syscall` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// The file could not be read (not allowed, or the process went meanwhile) or made no sense.
    Unknown,
    /// `running`: on a CPU (or ready for one), so the kernel cannot say.
    Running,
    /// `-1 …`: blocked, but not in a system call (in a page fault, or stopped from user space).
    NotInCall,
    /// In system call `nr`.
    In {
        /// The call's number (decoded by [`syscall_name`]).
        nr: i64,
        /// Its six argument registers.
        args: [u64; 6],
        /// For a call whose first argument is a descriptor: that descriptor and what it is.
        fd: Option<(i32, Target)>,
    },
}

/// What a descriptor is, from `/proc/PID/fd/N` and the socket tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A TCP socket with a peer (its state if not yet or no longer established).
    Tcp { remote: SocketAddr, state: TcpState },
    /// A listening TCP socket.
    TcpListening { local: SocketAddr },
    /// A TCP socket neither listening nor connected (fresh, or bound only).
    TcpUnconnected { local: SocketAddr },
    /// A UDP socket: connected to `remote`, or only bound to `local`.
    Udp {
        local: SocketAddr,
        remote: Option<SocketAddr>,
    },
    /// A unix socket, named by its path (or the path of the listener it was accepted from).
    Unix {
        path: Option<String>,
        listening: bool,
    },
    /// A unix socket whose line in the table cannot be told from a forged one (see
    /// `find_unix_socket`).
    UnixNameUncertain,
    /// A socket not found in the tables (another family, or past the read budget).
    Socket { inode: u64 },
    /// A pipe (`pipe:[N]`).
    Pipe,
    /// An epoll instance (`anon_inode:[eventpoll]`).
    Epoll,
    /// Another anonymous inode: `eventfd`, `timerfd`, `signalfd`, `io_uring`, `inotify`, …
    Anon(String),
    /// A file, FIFO or device by its path (` (deleted)` kept as the kernel says it).
    Path(String),
    /// The link could not be read (closed meanwhile, not allowed): the number only.
    Unknown,
    /// Anything else the kernel names (`net:[…]`, `mnt:[…]`, …), as it names it.
    Other(String),
}

/// TCP's states as the kernel numbers them in `/proc/net/tcp`'s `st` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    /// `connect` sent its SYN, no answer yet.
    Connecting,
    /// The peer closed its side; this side has not.
    ClosedByPeer,
    /// Any state on the way to closed after a close on this side.
    Closing,
    Other(u8),
}

/// How much of the socket tables a caller's descriptions may still read this second
/// ([`TABLES_PER_SECOND`]).
#[derive(Debug)]
pub struct TablesAllowance {
    left: u64,
    since: Instant,
}

impl TablesAllowance {
    pub fn new(now: Instant) -> TablesAllowance {
        TablesAllowance {
            left: TABLES_PER_SECOND,
            since: now,
        }
    }

    /// What one description may read now: [`NET_TABLES_BUDGET`] or what is left of the second.
    fn grant(&mut self, now: Instant) -> u64 {
        if now.saturating_duration_since(self.since) >= Duration::from_secs(1) {
            self.left = TABLES_PER_SECOND;
            self.since = now;
        }
        self.left.min(NET_TABLES_BUDGET)
    }
}

/// What `pid` is doing, reading no more of the socket tables than `allowance` has left.
pub fn doing_within(pid: Pid, allowance: &mut TablesAllowance, now: Instant) -> Doing {
    let granted = allowance.grant(now);
    let mut budget = granted;
    let doing = doing_with_budget(pid, &mut budget);
    allowance.left = allowance.left.saturating_sub(granted - budget);
    doing
}

/// What `pid` (a process id or a thread id) is doing, reading at most `budget` bytes of the
/// socket tables (it spends them); never fails: what cannot be read is left out.
fn doing_with_budget(pid: Pid, budget: &mut u64) -> Doing {
    let state = read_state(pid);
    if matches!(state, State::Gone | State::Zombie) {
        return Doing {
            state,
            call: Call::Unknown,
            kernel_function: None,
        };
    }
    let mut call = read_small(&format!("/proc/{pid}/syscall"))
        .ok()
        .and_then(|text| parse_syscall_line(&text))
        .unwrap_or(Call::Unknown);
    if let Call::In { nr, args, fd } = &mut call {
        if kind_of(*nr).is_some_and(Kind::first_arg_is_fd) {
            // An int argument: the kernel reads the register's low 32 bits.
            let number = args[0] as u32 as i32;
            if number >= 0 {
                *fd = Some((number, describe_fd(pid, number, budget)));
            }
        }
    }
    let kernel_function = read_small(&format!("/proc/{pid}/wchan"))
        .ok()
        .and_then(|text| parse_wchan(&text));
    Doing {
        state,
        call,
        kernel_function,
    }
}

fn read_state(pid: Pid) -> State {
    if pid.as_raw() <= 0 {
        return State::Gone;
    }
    match read_small(&format!("/proc/{pid}/stat")) {
        Ok(text) => match parse_stat_state(&text) {
            Some('R') => State::Running,
            Some('S') => State::Sleeping,
            Some('D') => State::Uninterruptible,
            Some('T') => State::Stopped,
            Some('t') => State::Traced,
            Some('Z') => State::Zombie,
            Some('X') | Some('x') => State::Gone,
            Some(other) => State::Other(other),
            None => State::Unknown,
        },
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(nix::libc::ESRCH) =>
        {
            State::Gone
        }
        Err(_) => State::Unknown,
    }
}

/// A `/proc` file of one short line, read up to [`SMALL_FILE_MAX`] bytes.
fn read_small(path: &str) -> io::Result<String> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(SMALL_FILE_MAX)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The state letter of a `/proc/PID/stat` line: the first field after the command name, which
/// is in parentheses and may itself hold spaces and parentheses (so: after the last `)`).
fn parse_stat_state(stat: &str) -> Option<char> {
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.trim_start().chars().next()
}

/// A `/proc/PID/syscall` line: `running`; `-1 SP PC` (not in a call); or
/// `NR ARG1 … ARG6 SP PC` with NR in decimal and the rest in `0x` hex.
fn parse_syscall_line(line: &str) -> Option<Call> {
    let mut words = line.split_whitespace();
    let first = words.next()?;
    if first == "running" {
        return Some(Call::Running);
    }
    let nr: i64 = first.parse().ok()?;
    if nr < 0 {
        return Some(Call::NotInCall);
    }
    let mut args = [0u64; 6];
    for arg in &mut args {
        let word = words.next()?;
        *arg = u64::from_str_radix(word.strip_prefix("0x")?, 16).ok()?;
    }
    Some(Call::In { nr, args, fd: None })
}

/// `/proc/PID/wchan`: a kernel symbol, or `0` (running, or hidden by the kernel).
fn parse_wchan(text: &str) -> Option<String> {
    let name = text.trim();
    let symbol_like = name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    (symbol_like && !name.is_empty() && name != "0").then(|| name.to_string())
}

/// What the descriptor `fd` of `pid` is.
fn describe_fd(pid: Pid, fd: i32, budget: &mut u64) -> Target {
    let Ok(link) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) else {
        return Target::Unknown;
    };
    let link = link.to_string_lossy();
    match parse_fd_link(&link) {
        Link::Socket(inode) => find_socket(pid, inode, budget),
        Link::Target(target) => target,
    }
}

enum Link {
    Socket(u64),
    Target(Target),
}

/// A `/proc/PID/fd/N` link: `socket:[INODE]`, `pipe:[INODE]`, `anon_inode:[eventpoll]`
/// (or `anon_inode:inotify`), a path, or another `kind:[…]`.
fn parse_fd_link(link: &str) -> Link {
    if let Some(inode) = link
        .strip_prefix("socket:[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
    {
        return Link::Socket(inode);
    }
    let target = if link.starts_with("pipe:[") {
        Target::Pipe
    } else if let Some(kind) = link.strip_prefix("anon_inode:") {
        let kind = kind.trim_start_matches('[').trim_end_matches(']');
        if kind == "eventpoll" {
            Target::Epoll
        } else {
            Target::Anon(printable(kind))
        }
    } else if link.starts_with('/') {
        Target::Path(printable(link))
    } else {
        Target::Other(printable(link))
    };
    Link::Target(target)
}

/// The socket with `inode` in `pid`'s network namespace, looked up in its TCP, UDP and unix
/// tables in turn, reading at most `budget` bytes of them together (which it spends).
fn find_socket(pid: Pid, inode: u64, budget: &mut u64) -> Target {
    for (table, tcp) in [
        ("tcp", true),
        ("tcp6", true),
        ("udp", false),
        ("udp6", false),
    ] {
        let path = format!("/proc/{pid}/net/{table}");
        if let Some(entry) = scan_table(&path, budget, |line| parse_net_tcp_line(line, inode)) {
            return if tcp {
                entry.tcp_target()
            } else {
                entry.udp_target()
            };
        }
    }
    let path = format!("/proc/{pid}/net/unix");
    find_unix_socket(&path, budget, inode).unwrap_or(Target::Socket { inode })
}

/// The unix socket with `inode` in the table at `path`. Unlike the TCP and UDP tables, this
/// one holds text a process chose: a socket's path is printed as it is, newlines and all, so a
/// process can bind a path that reads as a whole line of its own claiming any inode. The real
/// line for the inode is always there too, so the whole table is read: one line claiming the
/// inode names it; two or more, or a table cut short by the budget after a match, give
/// [`Target::UnixNameUncertain`] rather than a name that may be forged.
fn find_unix_socket(path: &str, budget: &mut u64, inode: u64) -> Option<Target> {
    let mut found: Option<Target> = None;
    let mut claims = 0u32;
    let complete = for_each_line(path, budget, |line| {
        if let Some(target) = parse_net_unix_line(line, inode) {
            claims += 1;
            found.get_or_insert(target);
        }
        claims < 2
    })?;
    match (found, claims, complete) {
        (None, _, _) => None,
        (Some(target), 1, true) => Some(target),
        (Some(_), _, _) => Some(Target::UnixNameUncertain),
    }
}

/// The first line of the table at `path` that `found` matches, reading line by line and at most
/// `budget` bytes (which it spends).
fn scan_table<T>(
    path: &str,
    budget: &mut u64,
    mut found: impl FnMut(&str) -> Option<T>,
) -> Option<T> {
    let mut hit = None;
    for_each_line(path, budget, |line| {
        hit = found(line);
        hit.is_none()
    })?;
    hit
}

/// Calls `each` on the lines of the file at `path` until it returns false, reading at most
/// `budget` bytes (which it spends). `Some(true)` if it read to the end of the file, `Some(false)`
/// if it stopped early (`each` or the budget), `None` if the file could not be read.
fn for_each_line(path: &str, budget: &mut u64, mut each: impl FnMut(&str) -> bool) -> Option<bool> {
    let file = File::open(path).ok()?;
    let mut reader = BufReader::with_capacity(64 << 10, file.take(*budget));
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).ok()?;
        if read == 0 {
            // The end of the file, or of the budget: only the first is the whole table.
            return Some(*budget > 0);
        }
        *budget = budget.saturating_sub(read as u64);
        if !each(&String::from_utf8_lossy(&line)) {
            return Some(false);
        }
    }
}

/// A line of `/proc/net/tcp`, `tcp6`, `udp` or `udp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InetSocket {
    local: SocketAddr,
    remote: SocketAddr,
    /// The `st` column: TCP's state numbers (UDP uses 1 for connected, 7 for not).
    state: u8,
}

impl InetSocket {
    fn has_peer(&self) -> bool {
        !(self.remote.ip().is_unspecified() && self.remote.port() == 0)
    }

    fn tcp_target(self) -> Target {
        match self.state {
            0x0A => Target::TcpListening { local: self.local },
            _ if !self.has_peer() => Target::TcpUnconnected { local: self.local },
            state => Target::Tcp {
                remote: self.remote,
                state: match state {
                    0x01 => TcpState::Established,
                    0x02 => TcpState::Connecting,
                    0x08 => TcpState::ClosedByPeer,
                    0x04..=0x07 | 0x09 | 0x0B => TcpState::Closing,
                    other => TcpState::Other(other),
                },
            },
        }
    }

    fn udp_target(self) -> Target {
        Target::Udp {
            local: self.local,
            remote: self.has_peer().then_some(self.remote),
        }
    }
}

/// The socket of a `/proc/net/tcp`-format line (tcp, tcp6, udp, udp6) if its inode is `inode`:
/// `sl: LOCAL REMOTE st tx:rx tr:when retrnsmt uid timeout INODE …`.
fn parse_net_tcp_line(line: &str, inode: u64) -> Option<InetSocket> {
    let fields: Vec<&str> = line.split_whitespace().take(10).collect();
    let [slot, local, remote, state, _, _, _, _, _, line_inode] = fields[..] else {
        return None;
    };
    if !slot.ends_with(':') || line_inode.parse::<u64>().ok()? != inode {
        return None;
    }
    Some(InetSocket {
        local: decode_addr(local)?,
        remote: decode_addr(remote)?,
        state: u8::from_str_radix(state, 16).ok()?,
    })
}

/// The socket of a `/proc/net/unix` line if its inode is `inode`:
/// `Num: RefCount Protocol Flags Type St INODE [PATH]` (a path may hold spaces; an abstract
/// name starts with `@`).
fn parse_net_unix_line(line: &str, inode: u64) -> Option<Target> {
    let (fields, rest) = split_fields(line, 7)?;
    // The kernel's format, strictly ("%pK: %08X %08X %08X %04X %02X %5lu"): the tail of a path
    // with a newline in it is not taken for a line.
    let hex =
        |text: &str, len: usize| text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit());
    let slot = fields[0].strip_suffix(':')?;
    let shaped = !slot.is_empty()
        && slot.len() <= 16
        && slot.bytes().all(|b| b.is_ascii_hexdigit())
        && hex(fields[1], 8)
        && hex(fields[2], 8)
        && hex(fields[3], 8)
        && hex(fields[4], 4)
        && hex(fields[5], 2)
        && fields[6].bytes().all(|b| b.is_ascii_digit());
    if !shaped || fields[6].parse::<u64>().ok()? != inode {
        return None;
    }
    /// `__SO_ACCEPTCON`: the socket is listening.
    const ACCEPTS: u32 = 1 << 16;
    let flags = u32::from_str_radix(fields[3], 16).ok()?;
    let path = rest.trim_end_matches(['\n', '\r']);
    Some(Target::Unix {
        path: (!path.is_empty()).then(|| printable(path)),
        listening: flags & ACCEPTS != 0,
    })
}

/// The first `n` whitespace-separated fields of `line` and the rest after them (less the one
/// space that separates it).
fn split_fields(line: &str, n: usize) -> Option<(Vec<&str>, &str)> {
    let mut fields = Vec::with_capacity(n);
    let mut rest = line;
    for _ in 0..n {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        fields.push(&rest[..end]);
        rest = &rest[end..];
    }
    Some((fields, rest.strip_prefix(' ').unwrap_or(rest)))
}

/// An address of `/proc/net/tcp` and the like: `HEX_IP:HEX_PORT`. The IP is the address's
/// network-order bytes printed as native-endian 32-bit words (one for IPv4, four for IPv6), so
/// each word's bytes are recovered with `to_ne_bytes`; the port is a plain number. An
/// IPv4-mapped IPv6 address (a dual-stack socket's IPv4 peer) is given as the IPv4 address.
fn decode_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &[u8]| -> Option<[u8; 4]> {
        let hex = std::str::from_utf8(hex).ok()?;
        let value = u32::from_str_radix(hex, 16).ok()?;
        Some(value.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip.as_bytes())?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (slot, hex) in bytes.chunks_exact_mut(4).zip(ip.as_bytes().chunks_exact(8)) {
                slot.copy_from_slice(&word(hex)?);
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// `text` safe for one log line: control and invisible characters escaped
/// ([`crate::admin::is_unsafe_to_show`]), at most [`NAME_MAX_CHARS`].
fn printable(text: &str) -> String {
    match text.char_indices().nth(NAME_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", crate::admin::one_line(&text[..cut])),
        None => crate::admin::one_line(text),
    }
}

/// How a system call is described, and whether its first argument is a descriptor worth naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// I/O on its first argument: "blocked in read on socket 10.0.0.5:443".
    BlockedOnFd,
    /// Waiting for a connection on its first argument: "waiting in accept4 on socket
    /// listening on 0.0.0.0:8080".
    WaitingOnFd,
    /// "blocked in openat".
    Blocked,
    /// "waiting in poll": its descriptors are in the process's memory, not read.
    Waiting,
    Futex,
    Sleep,
    Child,
    Signal,
    SysvIpc,
    Entropy,
    /// `restart_syscall`: a sleep or wait the kernel resumes after a signal (a stop, say).
    Resumed,
}

impl Kind {
    fn first_arg_is_fd(self) -> bool {
        matches!(self, Kind::BlockedOnFd | Kind::WaitingOnFd)
    }
}

/// The name of system call `nr` on this machine's architecture (x86_64 or aarch64), for the
/// calls a job blocks in and a few more; `None` for the rest (and on other architectures).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    call_of(nr).map(|(name, _)| name)
}

fn kind_of(nr: i64) -> Option<Kind> {
    call_of(nr).map(|(_, kind)| kind)
}

/// The table: libc's `SYS_*` numbers are per target, so one table serves both architectures;
/// aarch64 (the generic syscall table) lacks the legacy calls marked x86_64.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn call_of(nr: i64) -> Option<(&'static str, Kind)> {
    use nix::libc as c;
    use Kind::*;
    let call = match nr {
        c::SYS_read => ("read", BlockedOnFd),
        c::SYS_write => ("write", BlockedOnFd),
        c::SYS_pread64 => ("pread64", BlockedOnFd),
        c::SYS_pwrite64 => ("pwrite64", BlockedOnFd),
        c::SYS_readv => ("readv", BlockedOnFd),
        c::SYS_writev => ("writev", BlockedOnFd),
        c::SYS_preadv => ("preadv", BlockedOnFd),
        c::SYS_pwritev => ("pwritev", BlockedOnFd),
        c::SYS_preadv2 => ("preadv2", BlockedOnFd),
        c::SYS_pwritev2 => ("pwritev2", BlockedOnFd),
        c::SYS_recvfrom => ("recvfrom", BlockedOnFd),
        c::SYS_sendto => ("sendto", BlockedOnFd),
        c::SYS_recvmsg => ("recvmsg", BlockedOnFd),
        c::SYS_sendmsg => ("sendmsg", BlockedOnFd),
        c::SYS_recvmmsg => ("recvmmsg", BlockedOnFd),
        c::SYS_sendmmsg => ("sendmmsg", BlockedOnFd),
        c::SYS_connect => ("connect", BlockedOnFd),
        c::SYS_accept => ("accept", WaitingOnFd),
        c::SYS_accept4 => ("accept4", WaitingOnFd),
        c::SYS_fsync => ("fsync", BlockedOnFd),
        c::SYS_fdatasync => ("fdatasync", BlockedOnFd),
        c::SYS_flock => ("flock", BlockedOnFd),
        c::SYS_fcntl => ("fcntl", BlockedOnFd),
        c::SYS_ioctl => ("ioctl", BlockedOnFd),
        c::SYS_close => ("close", BlockedOnFd),
        c::SYS_splice => ("splice", BlockedOnFd),
        c::SYS_tee => ("tee", BlockedOnFd),
        c::SYS_sendfile => ("sendfile", BlockedOnFd),
        c::SYS_copy_file_range => ("copy_file_range", BlockedOnFd),
        c::SYS_ppoll => ("ppoll", Waiting),
        c::SYS_pselect6 => ("pselect6", Waiting),
        c::SYS_epoll_pwait => ("epoll_pwait", Waiting),
        c::SYS_epoll_pwait2 => ("epoll_pwait2", Waiting),
        c::SYS_io_getevents => ("io_getevents", Waiting),
        c::SYS_io_uring_enter => ("io_uring_enter", Waiting),
        c::SYS_futex => ("futex", Futex),
        c::SYS_nanosleep => ("nanosleep", Sleep),
        c::SYS_clock_nanosleep => ("clock_nanosleep", Sleep),
        c::SYS_wait4 => ("wait4", Child),
        c::SYS_waitid => ("waitid", Child),
        c::SYS_rt_sigsuspend => ("rt_sigsuspend", Signal),
        c::SYS_rt_sigtimedwait => ("rt_sigtimedwait", Signal),
        c::SYS_msgrcv => ("msgrcv", SysvIpc),
        c::SYS_msgsnd => ("msgsnd", SysvIpc),
        c::SYS_semop => ("semop", SysvIpc),
        c::SYS_semtimedop => ("semtimedop", SysvIpc),
        c::SYS_openat => ("openat", Blocked),
        c::SYS_sync => ("sync", Blocked),
        c::SYS_mmap => ("mmap", Blocked),
        c::SYS_munmap => ("munmap", Blocked),
        c::SYS_madvise => ("madvise", Blocked),
        c::SYS_msync => ("msync", Blocked),
        c::SYS_getrandom => ("getrandom", Entropy),
        c::SYS_restart_syscall => ("restart_syscall", Resumed),
        #[cfg(target_arch = "x86_64")]
        c::SYS_open => ("open", Blocked),
        #[cfg(target_arch = "x86_64")]
        c::SYS_poll => ("poll", Waiting),
        #[cfg(target_arch = "x86_64")]
        c::SYS_select => ("select", Waiting),
        #[cfg(target_arch = "x86_64")]
        c::SYS_epoll_wait => ("epoll_wait", Waiting),
        #[cfg(target_arch = "x86_64")]
        c::SYS_pause => ("pause", Signal),
        _ => return None,
    };
    Some(call)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn call_of(_nr: i64) -> Option<(&'static str, Kind)> {
    None
}

impl fmt::Display for Doing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            State::Gone => return f.write_str("gone"),
            State::Zombie => return f.write_str("exited, not yet reaped (zombie)"),
            State::Stopped | State::Traced => {
                f.write_str(if self.state == State::Stopped {
                    "stopped (SIGSTOP or another stop signal)"
                } else {
                    "stopped by a tracer (a debugger)"
                })?;
                if let Call::In { .. } = self.call {
                    write!(f, " while {}", self.call)?;
                }
            }
            state => match (&self.call, state) {
                (Call::In { .. }, _) => write!(f, "{}", self.call)?,
                (Call::Running, _) => f.write_str("running on a CPU")?,
                (Call::NotInCall, State::Uninterruptible) => {
                    f.write_str("blocked outside a system call (in a page fault?)")?
                }
                (Call::NotInCall, _) => f.write_str("in user space (not in a system call)")?,
                (Call::Unknown, State::Running) => f.write_str("running on a CPU")?,
                (Call::Unknown, State::Sleeping) => {
                    f.write_str("sleeping (its system call is not readable)")?
                }
                (Call::Unknown, State::Uninterruptible) => f.write_str("blocked")?,
                (Call::Unknown, State::Other(letter)) => write!(f, "in state {letter}")?,
                (Call::Unknown, _) => f.write_str("unknown (its /proc entry is not readable)")?,
            },
        }
        if self.state == State::Uninterruptible {
            f.write_str(", uninterruptible")?;
        }
        if let Some(function) = &self.kernel_function {
            write!(f, " (kernel: {function})")?;
        }
        Ok(())
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Call::In { nr, fd, .. } = self else {
            return match self {
                Call::Running => f.write_str("running"),
                Call::NotInCall => f.write_str("not in a system call"),
                _ => f.write_str("in an unknown place"),
            };
        };
        let Some((name, kind)) = call_of(*nr) else {
            return write!(f, "in syscall {nr}");
        };
        match kind {
            Kind::BlockedOnFd | Kind::WaitingOnFd => {
                let verb = if kind == Kind::BlockedOnFd {
                    "blocked"
                } else {
                    "waiting"
                };
                write!(f, "{verb} in {name}")?;
                match fd {
                    Some((number, Target::Unknown)) => write!(f, " on fd {number}"),
                    Some((_, target)) => write!(f, " on {target}"),
                    None => Ok(()),
                }
            }
            Kind::Blocked => write!(f, "blocked in {name}"),
            Kind::Waiting => write!(f, "waiting in {name}"),
            Kind::Futex => f.write_str("waiting on a futex (a lock or a condition)"),
            Kind::Sleep => write!(f, "sleeping in {name}"),
            Kind::Child => write!(f, "waiting for a child process in {name}"),
            Kind::Signal => write!(f, "waiting for a signal in {name}"),
            Kind::SysvIpc => write!(f, "waiting in {name} (System V IPC)"),
            Kind::Entropy => write!(f, "waiting for entropy in {name}"),
            Kind::Resumed => write!(
                f,
                "waiting in {name} (a sleep or wait resumed after a signal)"
            ),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { remote, state } => {
                write!(f, "socket {remote}")?;
                match state {
                    TcpState::Established => Ok(()),
                    TcpState::Connecting => f.write_str(" (connecting)"),
                    TcpState::ClosedByPeer => f.write_str(" (closed by the peer)"),
                    TcpState::Closing => f.write_str(" (closing)"),
                    TcpState::Other(st) => write!(f, " (TCP state {st})"),
                }
            }
            Target::TcpListening { local } => write!(f, "socket listening on {local}"),
            Target::TcpUnconnected { local } if local.port() == 0 => {
                f.write_str("socket (not connected)")
            }
            Target::TcpUnconnected { local } => {
                write!(f, "socket bound to {local} (not connected)")
            }
            Target::Udp {
                remote: Some(remote),
                ..
            } => write!(f, "UDP socket {remote}"),
            Target::Udp {
                local,
                remote: None,
            } => write!(f, "UDP socket on {local}"),
            Target::Unix {
                path: Some(path),
                listening: true,
            } => write!(f, "unix socket listening on {path}"),
            Target::Unix {
                path: Some(path),
                listening: false,
            } => write!(f, "unix socket {path}"),
            Target::Unix { path: None, .. } => f.write_str("unix socket"),
            Target::UnixNameUncertain => f.write_str("unix socket (name not certain)"),
            Target::Socket { inode } => write!(f, "socket (inode {inode})"),
            Target::Pipe => f.write_str("pipe"),
            Target::Epoll => f.write_str("epoll"),
            Target::Anon(kind) => f.write_str(kind),
            Target::Path(path) | Target::Other(path) => f.write_str(path),
            Target::Unknown => f.write_str("an unknown descriptor"),
        }
    }
}

#[cfg(test)]
mod tests;
