//! A real jobhost master for one measurement: a private folder, a config, the `jobhost`
//! binary built next to this one, its job and admin sockets, and its worker processes.
//!
//! It owns starting the master, waiting until every pool has its workers, and stopping it
//! (SIGTERM, then SIGKILL) when dropped; it never measures anything itself.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jobhost_e2e::children_of;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `target/release`: where this binary, `jobhost` and the demo plugins are.
pub fn bin_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let dir = exe.parent().ok_or("this binary has no folder")?.to_owned();
    if !dir.join("jobhost").exists() {
        return Err(format!(
            "{} has no jobhost binary: run `cargo build --release --workspace` first",
            dir.display()
        ));
    }
    Ok(dir)
}

pub struct Master {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// The config file up to its pools.
    header: String,
    child: Child,
    /// `admin.http`'s address and token, when it was started with one.
    pub http: Option<(std::net::SocketAddr, String)>,
}

impl Master {
    /// Starts a master with `pools` (TOML `[[pool]]` tables) and waits until every pool has
    /// the workers it wants (a pool that cannot get them — a crash loop — is not waited for
    /// when `wait_for_workers` is false).
    pub fn start(pools: &str, wait_for_workers: bool) -> Result<Master, String> {
        Master::start_logging(pools, wait_for_workers, "info")
    }

    /// [`Master::start`] with another `log_level`.
    pub fn start_logging(
        pools: &str,
        wait_for_workers: bool,
        log_level: &str,
    ) -> Result<Master, String> {
        Master::start_full(pools, wait_for_workers, log_level, false)
    }

    /// [`Master::start`] with `admin.http` on a free loopback port (and a token file).
    pub fn start_with_http(pools: &str) -> Result<Master, String> {
        Master::start_full(pools, true, "info", true)
    }

    fn start_full(
        pools: &str,
        wait_for_workers: bool,
        log_level: &str,
        http: bool,
    ) -> Result<Master, String> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("jobhost-bench.")
            .tempdir()
            .map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let config = dir.path().join("jobhost.toml");
        let mut header = format!(
            "[host]\nplugins_dir = {:?}\nruntime_dir = \"run\"\nlog = \"master.log\"\nlog_level = \"{log_level}\"\n\
             graceful_timeout = \"30s\"\ninit_timeout = \"120s\"\n\n[server]\nmax_payload = \"1MiB\"\n\n",
            bin.display().to_string()
        );
        let http = if http {
            use std::os::unix::fs::OpenOptionsExt;
            let token = format!("bench-token-{:x}", std::process::id() as u64 * 0x9e37_79b9);
            let path = dir.path().join("admin.token");
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            std::io::Write::write_all(&mut file, token.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            // A free port: bound and let go (the master binds it a moment later).
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("cannot find a free port: {e}"))?;
            header.push_str(&format!(
                "[admin]\nhttp = \"{addr}\"\ntoken_file = \"admin.token\"\n\n"
            ));
            Some((addr, token))
        } else {
            None
        };
        fs::write(&config, format!("{header}{pools}"))
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let child = Command::new(bin.join("jobhost"))
            .args(["run", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start jobhost: {e}"))?;
        let master = Master {
            dir,
            config,
            header,
            child,
            http,
        };
        master.wait_until(
            "the master to answer on its admin socket",
            Duration::from_secs(180),
            || master.status().is_ok(),
        )?;
        if wait_for_workers {
            master.wait_until(
                "every pool to have its workers",
                Duration::from_secs(180),
                || {
                    master.status().is_ok_and(|s| {
                        s["pools"].as_array().is_some_and(|pools| {
                            pools
                                .iter()
                                .all(|p| p["workers_running"] == p["workers_wanted"])
                        })
                    })
                },
            )?;
        }
        Ok(master)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Replaces the pools in the config file (for a reload).
    pub fn rewrite_pools(&self, pools: &str) -> Result<(), String> {
        fs::write(&self.config, format!("{}{pools}", self.header))
            .map_err(|e| format!("cannot write {}: {e}", self.config.display()))
    }

    pub fn job_socket(&self) -> PathBuf {
        self.dir.path().join("run/jobs.sock")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
    }

    /// `status json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value, String> {
        let socket = self.dir.path().join("run/admin.sock");
        let reply = jobhost::ctl::exchange(&socket, "status json", Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        reply.outcome?;
        serde_json::from_str(&reply.lines.concat()).map_err(|e| format!("status json: {e}"))
    }

    /// The master's live worker processes.
    pub fn workers(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    /// Polls `ready` every 10 ms until it holds; an error after `within`, naming `what`, with
    /// the end of the master's log.
    pub fn wait_until(
        &self,
        what: &str,
        within: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while !ready() {
            if Instant::now() > deadline {
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                return Err(format!(
                    "waited {within:?} for {what}; the master's log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.pid());
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) `pid` has used, in seconds.
pub fn cpu_seconds(pid: i32) -> f64 {
    // /proc counts in USER_HZ ticks, 100 a second on Linux.
    jobhost_e2e::cpu_ticks(pid) as f64 / 100.0
}

/// CPU seconds of the master, of its workers together, and of this process, so far.
pub fn cpu_split(master: &Master) -> [f64; 3] {
    [
        cpu_seconds(master.pid()),
        master.workers().iter().map(|&w| cpu_seconds(w)).sum(),
        cpu_seconds(std::process::id() as i32),
    ]
}
