//! The end-to-end test harness: finds the built `jobhost` binary and plugins, builds the
//! fixture plugins once, and gives each test a private folder with its own plugins dir and
//! config, so that a test reads as a few lines of "set up, run, look".
//!
//! The binary and the demo plugins come from `cargo build --release --workspace`, which the
//! test command in README.md runs first; the harness never runs cargo on the main workspace
//! (cargo holds its build lock while tests run).

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// `target/release` (or whichever profile built this test binary).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/e2e-<hash>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        dir.join("jobhost").exists(),
        "{} has no jobhost binary: run `cargo build --release --workspace` before the tests",
        dir.display()
    );
    dir.to_owned()
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A demo plugin built by the workspace: `target/<profile>/lib<name>.so`.
pub fn demo_plugin(name: &str) -> PathBuf {
    let path = bin_dir().join(format!("lib{name}.so"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --workspace`",
        path.display()
    );
    path
}

/// A fixture plugin from `tests/fixtures`, built (once per test run) into `target/fixtures`.
pub fn fixture_plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = repo_root();
        let target = root.join("target").join("fixtures");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--manifest-path"])
            .arg(root.join("tests/fixtures/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .status()
            .expect("run cargo to build the fixture plugins");
        assert!(status.success(), "building tests/fixtures failed: {status}");
        target.join("debug")
    });
    dir.join(format!("lib{name}.so"))
}

/// One test's world: a temp folder with `plugins/`, `run/` and a config file.
pub struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("jobhost-e2e-")
            .tempdir()
            .expect("tempdir");
        fs::create_dir(dir.path().join("plugins")).expect("mkdir plugins");
        Env { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.path().join("plugins")
    }

    /// Copies a demo plugin into this env's plugins dir.
    pub fn install(&self, name: &str) -> PathBuf {
        self.install_file(&demo_plugin(name), name)
    }

    /// Copies any `.so` into the plugins dir as `lib<as_name>.so`.
    pub fn install_file(&self, file: &Path, as_name: &str) -> PathBuf {
        let dest = self.plugins_dir().join(format!("lib{as_name}.so"));
        fs::copy(file, &dest)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", file.display(), dest.display()));
        dest
    }

    /// Writes `jobhost.toml` with the given text and returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.path().join("jobhost.toml");
        fs::write(&path, text).expect("write config");
        path
    }

    /// Runs `jobhost ARGS...` with this env as the working directory.
    pub fn jobhost(&self, args: &[&str]) -> Run {
        run(Command::new(bin_dir().join("jobhost"))
            .args(args)
            .current_dir(self.path()))
    }
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

/// A finished command, with its output as text.
pub struct Run {
    pub output: Output,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Exit code; panics (showing the output) if the process died of a signal.
    pub fn code(&self) -> i32 {
        match self.output.status.code() {
            Some(code) => code,
            None => panic!(
                "jobhost died of signal {:?}\nstdout:\n{}\nstderr:\n{}",
                self.output.status.signal(),
                self.stdout,
                self.stderr
            ),
        }
    }

    pub fn assert_code(&self, expected: i32) -> &Run {
        assert_eq!(
            self.code(),
            expected,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn assert_stderr_has(&self, needle: &str) -> &Run {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        self
    }

    pub fn assert_stdout_has(&self, needle: &str) -> &Run {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}:\n{}",
            self.stdout
        );
        self
    }
}

pub fn run(command: &mut Command) -> Run {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    Run {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        output,
    }
}

/// Polls `condition` every 20 ms until it holds or `within` passes; panics with `what` then.
/// Tests wait for state this way instead of sleeping fixed amounts: fast when the machine is
/// fast, patient when it is loaded.
pub fn wait_until(what: &str, within: std::time::Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The generous deadline for anything a healthy master does "at once".
pub const SOON: std::time::Duration = std::time::Duration::from_secs(20);

/// A running `jobhost run` master in an [`Env`], killed (SIGKILL, with its workers) on drop.
pub struct Master {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub socket: PathBuf,
}

impl Env {
    /// Writes `config_text` (with `[host] runtime_dir = "run"` added if absent) and starts a
    /// master on it; returns once its job socket exists.
    pub fn start_master(&self, config_text: &str) -> Master {
        let config = self.config(config_text);
        let log = self.path().join("master.log");
        let log_file = fs::File::create(&log).expect("create master.log");
        let child = Command::new(bin_dir().join("jobhost"))
            .args(["run", "-c"])
            .arg(&config)
            .current_dir(self.path())
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn jobhost run");
        let mut master = Master {
            child,
            log,
            socket: self.path().join("run/jobs.sock"),
        };
        let deadline = std::time::Instant::now() + SOON;
        while !master.socket.exists() {
            assert!(
                !master.exited(),
                "master exited at start:\n{}",
                master.log_text()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no job socket after {SOON:?}:\n{}",
                master.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        master
    }
}

impl Master {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn wait_for_log(&self, needle: &str, within: std::time::Duration) {
        wait_until(&format!("log line {needle:?}"), within, || {
            self.log_count(needle) > 0
        });
    }

    /// True once the master has exited (std caches the status for a later wait).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The master's live children (its workers), from /proc.
    pub fn workers(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    /// Waits until the master has exactly `n` workers, and returns their pids.
    pub fn wait_for_workers(&self, n: usize) -> Vec<i32> {
        wait_until(&format!("{n} workers"), SOON, || self.workers().len() == n);
        self.workers()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .expect("signal the master");
    }

    /// Waits for the master to exit; returns its exit code (panics on a signal death).
    pub fn wait_exit(&mut self, within: std::time::Duration) -> i32 {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status
                    .code()
                    .unwrap_or_else(|| panic!("master died of {status}:\n{}", self.log_text()));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "master did not exit within {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A connected job client.
    pub fn client(&self) -> jobhost::client::Client {
        jobhost::client::Client::connect(&self.socket).expect("connect to the master")
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        // Only an unreaped master's pid is still its own: a reaped one may have been reused.
        let workers = if self.exited() {
            Vec::new()
        } else {
            self.workers()
        };
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in workers {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Live (not zombie) children of `pid`, from /proc/PID/task/*/children.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse::<i32>().ok()),
            );
        }
    }
    out.retain(|child| is_alive(*child));
    out.sort_unstable();
    out
}

/// True while `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// A minimal config: plugins from this env, sockets in `run/`, with `pools` appended.
pub fn config_with(pools: &str) -> String {
    format!("[host]\nplugins_dir = \"plugins\"\nruntime_dir = \"run\"\nlog_level = \"debug\"\ngraceful_timeout = \"20s\"\n\n{pools}")
}

/// CPU time (user + system) a process has used, in clock ticks (1/100 s), from /proc/PID/stat.
pub fn cpu_ticks(pid: i32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11).and_then(|s| s.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    utime + stime
}

impl Master {
    /// The admin socket next to the job socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.socket.with_file_name("admin.sock")
    }

    /// A new admin session.
    pub fn admin_session(&self) -> AdminSession {
        let stream = std::os::unix::net::UnixStream::connect(self.admin_socket())
            .expect("connect to the admin socket");
        stream.set_read_timeout(Some(SOON)).expect("timeout");
        AdminSession {
            reader: std::io::BufReader::new(stream.try_clone().expect("clone")),
            stream,
        }
    }

    /// Sends one admin command on a fresh session; returns the reply, final OK/ERR line included.
    pub fn admin(&self, line: &str) -> String {
        self.admin_session().command(line)
    }
}

/// A connected admin session (a line protocol, as with `nc -U`).
pub struct AdminSession {
    pub stream: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl AdminSession {
    /// Sends `line` and reads the reply up to and including its `OK` / `ERR …` line.
    pub fn command(&mut self, line: &str) -> String {
        use std::io::Write;
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .expect("send admin line");
        self.read_reply()
    }

    pub fn read_reply(&mut self) -> String {
        use std::io::BufRead;
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read admin reply");
            assert!(
                n > 0,
                "admin connection closed mid-reply; so far: {reply:?}"
            );
            reply.push_str(&line);
            if line == "OK\n" || line.starts_with("ERR") {
                return reply;
            }
        }
    }

    /// True once the master has closed this session.
    pub fn is_closed(&mut self) -> bool {
        use std::io::Read;
        let mut buf = [0u8; 256];
        loop {
            match self.reader.get_mut().read(&mut buf) {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    }
}

/// True while `pid` is blocked in nanosleep/clock_nanosleep — a `sleep` job is running in it
/// (an idle worker blocks in poll instead). From /proc/PID/syscall.
pub fn in_sleep_job(pid: i32) -> bool {
    const NANOSLEEP: &str = "35 ";
    const CLOCK_NANOSLEEP: &str = "230 ";
    fs::read_to_string(format!("/proc/{pid}/syscall"))
        .is_ok_and(|s| s.starts_with(NANOSLEEP) || s.starts_with(CLOCK_NANOSLEEP))
}
