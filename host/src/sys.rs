//! Facts about processes and the machine, read from /proc: a process's RSS and PSS, the
//! system's available memory. Owns parsing those files; it never changes anything.

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

/// This process's own memory in bytes: the pages no other process maps (`Private_Clean` +
/// `Private_Dirty` of `/proc/self/smaps_rollup`, the "USS"). Pages a worker still shares
/// copy-on-write with the master — a preloaded table — do not count until it writes them.
pub fn own_private() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/self/smaps_rollup")?;
    let clean = kib_field(&text, "Private_Clean:").ok_or_else(|| bad("smaps_rollup"))?;
    let dirty = kib_field(&text, "Private_Dirty:").ok_or_else(|| bad("smaps_rollup"))?;
    Ok(clean + dirty)
}

/// The system's `MemAvailable` in bytes.
pub fn mem_available() -> io::Result<u64> {
    kib_field(&fs::read_to_string("/proc/meminfo")?, "MemAvailable:").ok_or_else(|| bad("meminfo"))
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let rss = rss_of(Pid::this()).unwrap();
        assert!(rss > 1 << 20, "rss {rss}");
        assert!(pss_of(Pid::this()).unwrap() > 0);
        let own = own_private().unwrap();
        assert!(own > 0 && own <= rss, "private {own} of rss {rss}");
        assert!(mem_available().unwrap() > 0);
        assert_eq!(kib_field("Pss:   12 kB\n", "Pss:"), Some(12 * 1024));
    }
}
