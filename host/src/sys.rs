//! Facts about processes and the machine, read from /proc: a process's RSS, PSS and own
//! (private) memory, the system's available memory, the master's own descriptors and CPU time. Owns parsing those files; it never
//! changes anything.

use std::fs;
use std::io;

use nix::unistd::Pid;

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(4096)
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {what}"))
}

/// Another process's resident set size in bytes.
pub fn rss_of(pid: Pid) -> io::Result<u64> {
    rss_from_statm(&fs::read_to_string(format!("/proc/{pid}/statm"))?)
}

fn rss_from_statm(statm: &str) -> io::Result<u64> {
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("statm"))?;
    Ok(pages * page_size())
}

/// A process's proportional set size in bytes (`/proc/PID/smaps_rollup`): shared pages count
/// divided by the number of processes sharing them, so PSS sums to real memory use.
pub fn pss_of(pid: Pid) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    kib_field(&text, "Pss:").ok_or_else(|| bad("smaps_rollup"))
}

/// A process's own memory in bytes: the pages no other process maps (`Private_Clean` +
/// `Private_Dirty` of `/proc/PID/smaps_rollup`, the "USS"). Pages a worker still shares
/// copy-on-write with the master — a preloaded table — do not count until it writes them.
/// This is the figure `max_rss` is compared with (by the worker, of itself) and what
/// `workers` shows (read by the master). Reading it walks the process's page tables: slow
/// for a process that maps a large table, so it is read on demand, never on a hot path.
pub fn own_of(pid: Pid) -> io::Result<u64> {
    own_from_smaps_rollup(&fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?)
}

fn own_from_smaps_rollup(text: &str) -> io::Result<u64> {
    let clean = kib_field(text, "Private_Clean:").ok_or_else(|| bad("smaps_rollup"))?;
    let dirty = kib_field(text, "Private_Dirty:").ok_or_else(|| bad("smaps_rollup"))?;
    Ok(clean.saturating_add(dirty))
}

/// The system's `MemAvailable` in bytes.
pub fn mem_available() -> io::Result<u64> {
    kib_field(&fs::read_to_string("/proc/meminfo")?, "MemAvailable:").ok_or_else(|| bad("meminfo"))
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

/// This machine's host name (for names other hosts see: consumers, client ids); `localhost`
/// when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// This process's descriptors and CPU time, for `metrics`; `None` where it cannot be read.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnProcess {
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

/// Reads [`OwnProcess`]: `/proc/self/fd` (less the descriptor that reads it), RLIMIT_NOFILE's
/// soft limit, and getrusage's user and system time.
pub fn own_process() -> OwnProcess {
    use nix::sys::resource::{getrlimit, getrusage, Resource, UsageWho};
    let open_fds = fs::read_dir("/proc/self/fd")
        .ok()
        .map(|dir| (dir.count() as u64).saturating_sub(1));
    let max_fds = getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft);
    let cpu_seconds = getrusage(UsageWho::RUSAGE_SELF).ok().map(|u| {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        secs(u.user_time()) + secs(u.system_time())
    });
    OwnProcess {
        open_fds,
        max_fds,
        cpu_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let rss = rss_of(Pid::this()).unwrap();
        assert!(rss > 1 << 20, "rss {rss}");
        assert!(pss_of(Pid::this()).unwrap() > 0);
        let own = own_of(Pid::this()).unwrap();
        assert!(own > 0 && own <= rss, "private {own} of rss {rss}");
        assert!(mem_available().unwrap() > 0);
        assert_eq!(kib_field("Pss:   12 kB\n", "Pss:"), Some(12 * 1024));
        assert_eq!(kib_field("Pss:   huge kB\n", "Pss:"), None);
        assert_eq!(kib_field(&format!("Pss: {} kB\n", u64::MAX), "Pss:"), None);
    }

    #[test]
    fn own_memory_is_the_private_pages() {
        let rollup = "55d0c0a00000-7ffd1f5ff000 ---p 00000000 00:00 0                  [rollup]\n\
            Rss:              204800 kB\n\
            Pss:              110000 kB\n\
            Shared_Clean:     102400 kB\n\
            Shared_Dirty:       8192 kB\n\
            Private_Clean:      1024 kB\n\
            Private_Dirty:     65536 kB\n\
            Referenced:       204800 kB\n";
        assert_eq!(
            own_from_smaps_rollup(rollup).unwrap(),
            (1024 + 65536) * 1024
        );
        let err = own_from_smaps_rollup("Rss: 4 kB\nPrivate_Clean: 4 kB\n").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(own_from_smaps_rollup("").is_err());
    }

    #[test]
    fn another_process_can_be_measured_and_a_gone_one_cannot() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let own = own_of(pid).unwrap();
        assert!(own > 0 && own <= rss_of(pid).unwrap(), "own {own}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(own_of(pid).is_err(), "reaped: no /proc entry");
    }
}
