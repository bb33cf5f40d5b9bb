//! The end-to-end test harness: finds (building it first if need be) the `jobhost` binary and
//! the demo plugins of the profile this test binary was built with, builds the fixture plugins
//! once in that profile too, and gives each test a private folder with its own plugins dir and
//! config, so that a test reads as a few lines of "set up, run, look".
//!
//! It owns the tests' view of processes: every wait here has a deadline (clients time out
//! after [`CLIENT_TIMEOUT`], commands after [`COMMAND_TIMEOUT`], polls after what they are
//! given), so a lost job or a hung command fails the test that met it instead of hanging the
//! run. It must never treat a timeout as a success (a session still open after the deadline
//! is not "closed"), never sleep a fixed time before asserting that nothing happened, and
//! never leave a process it started running.
//!
//! `cargo test --workspace` (debug) and README's `cargo build --release --workspace && cargo
//! test --release --workspace` both work from a fresh clone: the first time a test asks for a
//! binary, the harness runs `cargo build --workspace` in the test binary's own profile (a
//! no-op when README's build ran first).

use std::fs;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a job client waits for a result (or to write) before the test fails: far longer
/// than any test job takes, so only a job that is never answered meets it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a `jobhost` command run by [`run`] may take before it is killed and the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Where cargo put this test binary, and so where the binaries of its profile are.
struct Layout {
    /// The target dir (`target`, or `CARGO_TARGET_DIR`).
    target_dir: PathBuf,
    /// `debug`, `release` or a custom profile's folder name.
    profile: String,
    /// `--target TRIPLE`, when the build was for an explicit target.
    triple: Option<String>,
}

impl Layout {
    fn of_this_test() -> Layout {
        let exe = std::env::current_exe().expect("current_exe");
        // target[/<triple>]/<profile>/deps/e2e-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in target/<profile>/deps");
        let profile = profile_dir
            .file_name()
            .expect("a profile folder")
            .to_string_lossy()
            .into_owned();
        let above = profile_dir.parent().expect("a target dir");
        // Cargo marks the root of a target dir with CACHEDIR.TAG; one level up means the
        // profile folder is inside a target triple's folder.
        let (target_dir, triple) = match above.parent() {
            Some(root)
                if !above.join("CACHEDIR.TAG").exists() && root.join("CACHEDIR.TAG").exists() =>
            {
                (
                    root.to_owned(),
                    above.file_name().map(|t| t.to_string_lossy().into_owned()),
                )
            }
            _ => (above.to_owned(), None),
        };
        Layout {
            target_dir,
            profile,
            triple,
        }
    }

    /// The cargo arguments that select this profile (and target).
    fn profile_args(&self) -> Vec<String> {
        let mut args = match self.profile.as_str() {
            "debug" => Vec::new(),
            "release" => vec!["--release".to_string()],
            other => vec!["--profile".to_string(), other.to_string()],
        };
        if let Some(triple) = &self.triple {
            args.extend(["--target".to_string(), triple.clone()]);
        }
        args
    }

    /// Where `cargo build --target-dir DIR` with these arguments puts the binaries.
    fn bin_dir_in(&self, target_dir: &Path) -> PathBuf {
        let mut dir = target_dir.to_owned();
        if let Some(triple) = &self.triple {
            dir.push(triple);
        }
        dir.join(&self.profile)
    }
}

fn layout() -> &'static Layout {
    static LAYOUT: OnceLock<Layout> = OnceLock::new();
    LAYOUT.get_or_init(Layout::of_this_test)
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs a cargo build, showing its output only when it fails. Returns false (having killed
/// it) if cargo blocks on the build directory's lock: an older cargo holds it while tests run.
fn cargo_build(command: &mut Command, what: &str) -> bool {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run cargo to build {what}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&chunk[..n]);
            let _ = lines_tx.send(String::from_utf8_lossy(&all).into_owned());
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    // A cold build of the workspace takes minutes on a small machine.
    let deadline = Instant::now() + Duration::from_secs(30 * 60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for cargo") {
            break status;
        }
        let so_far = lines_rx.try_iter().last().unwrap_or_default();
        if so_far.contains("Blocking waiting for file lock on build directory") {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "building {what} took over 30 minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap_or_default();
    let stdout = stdout.join().unwrap_or_default();
    assert!(
        status.success(),
        "building {what} failed ({status}):\n{}\n{stderr}",
        String::from_utf8_lossy(&stdout)
    );
    true
}

/// Reads a pipe to its end on a thread.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = pipe.read_to_end(&mut all);
        all
    })
}

/// The folder with the `jobhost` binary and the demo plugins of this test binary's profile
/// (`target/debug` for `cargo test`, `target/release` for `cargo test --release`). The first
/// call runs `cargo build --workspace` in that profile, so that the binary is never missing
/// nor older than the sources; after README's build that is a no-op of a second or so.
pub fn bin_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let layout = layout();
            let build = |target_dir: &Path| {
                cargo_build(
                    cargo()
                        .args(["build", "--workspace", "--manifest-path"])
                        .arg(repo_root().join("Cargo.toml"))
                        .args(layout.profile_args())
                        .arg("--target-dir")
                        .arg(target_dir),
                    &format!("the workspace ({} profile)", layout.profile),
                )
            };
            let dir = if build(&layout.target_dir) {
                layout.bin_dir_in(&layout.target_dir)
            } else {
                // This cargo keeps the build directory locked while the tests run: build
                // into a folder of our own instead.
                let own = layout.target_dir.join("e2e-build");
                assert!(
                    build(&own),
                    "cargo blocked on the lock of {}",
                    own.display()
                );
                layout.bin_dir_in(&own)
            };
            assert!(
                dir.join("jobhost").exists(),
                "{} has no jobhost binary after building the workspace",
                dir.display()
            );
            dir
        })
        .clone()
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
        "{} is missing: the workspace has no plugin {name:?}",
        path.display()
    );
    path
}

/// A fixture plugin from `tests/fixtures`, built (once per test run, in this test binary's
/// profile) into `target/fixtures/<profile>`.
pub fn fixture_plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let layout = layout();
        let target = layout.target_dir.join("fixtures");
        // The fixtures' own workspace knows the two standard profiles only.
        let (args, profile): (&[&str], &str) = match layout.profile.as_str() {
            "debug" => (&[], "debug"),
            _ => (&["--release"], "release"),
        };
        let built = cargo_build(
            cargo()
                .args(["build", "--manifest-path"])
                .arg(repo_root().join("tests/fixtures/Cargo.toml"))
                .args(args)
                .arg("--target-dir")
                .arg(&target),
            "tests/fixtures",
        );
        assert!(built, "cargo blocked on the lock of {}", target.display());
        // `panic-abort` needs a profile of its own: it is a workspace of its own.
        let built = cargo_build(
            cargo()
                .args(["build", "--manifest-path"])
                .arg(repo_root().join("tests/fixtures/panic-abort/Cargo.toml"))
                .args(args)
                .arg("--target-dir")
                .arg(&target),
            "tests/fixtures/panic-abort",
        );
        assert!(built, "cargo blocked on the lock of {}", target.display());
        target.join(profile)
    });
    let path = dir.join(format!("lib{name}.so"));
    assert!(path.exists(), "{} is missing", path.display());
    path
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

/// Runs `command` to its end (stdin from /dev/null), collecting its output. A command still
/// running after [`COMMAND_TIMEOUT`] is killed and the test fails, showing what it wrote.
pub fn run(command: &mut Command) -> Run {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the command") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A daemon's launcher has exited by now; its pipes close once it did.
    let stdout = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    let Some(status) = status else {
        panic!("{command:?} still ran after {COMMAND_TIMEOUT:?}; killed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    };
    Run {
        output: Output {
            status,
            stdout: stdout.clone().into_bytes(),
            stderr: stderr.clone().into_bytes(),
        },
        stdout,
        stderr,
    }
}

/// Polls `condition` every 20 ms until it holds or `within` passes; panics with `what` then.
/// Tests wait for state this way instead of sleeping fixed amounts: fast when the machine is
/// fast, patient when it is loaded.
pub fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The generous deadline for anything a healthy master does "at once".
pub const SOON: Duration = Duration::from_secs(20);

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
        self.start_master_with_nofile(config_text, None)
    }

    /// [`Env::start_master`], with the master's hard RLIMIT_NOFILE set to `nofile` (the master
    /// raises its soft limit to the hard one at start), to fill its fd table in a test.
    pub fn start_master_with_nofile(&self, config_text: &str, nofile: Option<u64>) -> Master {
        use std::os::unix::process::CommandExt;
        let config = self.config(config_text);
        let log = self.path().join("master.log");
        let log_file = fs::File::create(&log).expect("create master.log");
        let mut command = Command::new(bin_dir().join("jobhost"));
        command
            .args(["run", "-c"])
            .arg(&config)
            .current_dir(self.path())
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file);
        if let Some(limit) = nofile {
            // SAFETY: setrlimit between fork and exec, as prlimit(1) would.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        limit,
                        limit,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let child = command.spawn().expect("spawn jobhost run");
        let mut master = Master {
            child,
            log,
            socket: self.path().join("run/jobs.sock"),
        };
        let deadline = Instant::now() + SOON;
        while !master.socket.exists() {
            assert!(
                !master.exited(),
                "master exited at start:\n{}",
                master.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "no job socket after {SOON:?}:\n{}",
                master.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
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

    pub fn wait_for_log(&self, needle: &str, within: Duration) {
        wait_until(&format!("log line {needle:?}"), within, || {
            self.log_count(needle) > 0
        });
    }

    /// True once the master has exited (std caches the status for a later wait).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The master's live workers, from /proc: its children less the HTTP child (`jobhost
    /// http-serve`, exec'd; a worker or a probe is a fork with the master's command line).
    pub fn workers(&self) -> Vec<i32> {
        let mut children = children_of(self.pid());
        children.retain(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            !cmdline.split(|b| *b == 0).any(|arg| arg == b"http-serve")
        });
        children
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
    pub fn wait_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status
                    .code()
                    .unwrap_or_else(|| panic!("master died of {status}:\n{}", self.log_text()));
            }
            assert!(
                Instant::now() < deadline,
                "master did not exit within {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A connected job client whose reads and writes fail after [`CLIENT_TIMEOUT`], so a job
    /// that is never answered fails the test that sent it instead of hanging the run.
    pub fn client(&self) -> jobhost::client::Client {
        self.client_with_timeout(CLIENT_TIMEOUT)
    }

    /// A job client that gives up on a read or a write after `timeout`.
    pub fn client_with_timeout(&self, timeout: Duration) -> jobhost::client::Client {
        let stream = std::os::unix::net::UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect to the master at {}: {e}", self.socket.display()));
        stream
            .set_read_timeout(Some(timeout))
            .expect("set a read timeout");
        stream
            .set_write_timeout(Some(timeout))
            .expect("set a write timeout");
        jobhost::client::Client::from_stream(stream, jobhost::client::DEFAULT_MAX_RESULT)
    }
}

/// Receives `n` results, failing (with the ones that did arrive) if any read fails — a read
/// timeout included: a job that is never answered is a failure here, not a hang.
pub fn recv_n(client: &mut jobhost::client::Client, n: usize) -> Vec<jobhost::client::JobResult> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match client.recv() {
            Ok(result) => got.push(result),
            Err(e) => panic!(
                "only {} of {n} results arrived ({e}); they were: {:?}",
                got.len(),
                got.iter()
                    .map(|r| (r.id, r.status, r.text()))
                    .collect::<Vec<_>>()
            ),
        }
    }
    got
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

/// Waits until `pid` uses at most one CPU tick (1/100 s) in a quarter of a second: until it
/// has done the work it was given. One that spins never gets there, so this fails on a spin
/// too (after [`SOON`]); a slow (debug, loaded) one only takes longer.
pub fn wait_until_quiet(pid: i32, what: &str) {
    let mut samples = Vec::new();
    let deadline = Instant::now() + SOON;
    loop {
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_millis(250));
        let used = cpu_ticks(pid).saturating_sub(before);
        if used <= 1 {
            return;
        }
        samples.push(used);
        assert!(
            Instant::now() < deadline,
            "{what}: never went quiet; ticks per 250 ms: {samples:?}"
        );
    }
}

/// Whether `command` is on the PATH.
pub fn have(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v '{command}'")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `promtool check metrics` (Debian's prometheus package) of `text`: whether it passed, and
/// what it said.
pub fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool's output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
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
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .expect("set a read timeout");
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

    /// True once the master has closed this session: reads (and discards) what is left until
    /// end of file or a reset. False if the session is still open after [`SOON`]: a read
    /// timeout is not a close.
    pub fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + SOON;
        self.reader
            .get_ref()
            .set_read_timeout(Some(SOON))
            .expect("set a read timeout");
        loop {
            match self.reader.get_mut().read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return false,
                Err(e) if is_reset(&e) => return true,
                Err(e) => panic!("reading the admin session: {e}"),
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

/// A read that gave up waiting (a socket's read timeout).
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The peer closed with our data unread (the kernel resets such a connection).
pub fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// True while `pid` is blocked in nanosleep/clock_nanosleep — a `sleep` job is running in it
/// (an idle worker blocks in poll instead). From /proc/PID/syscall, whose first field is the
/// number of the system call the process is blocked in (this machine's numbering).
pub fn in_sleep_job(pid: i32) -> bool {
    let sleeping = [nix::libc::SYS_nanosleep, nix::libc::SYS_clock_nanosleep];
    fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| {
        s.split_whitespace()
            .next()
            .and_then(|n| n.parse::<nix::libc::c_long>().ok())
            .is_some_and(|n| sleeping.contains(&n))
    })
}

/// Whether a test that needs `what` must run: true when it is there. When it is not, the test
/// is skipped with a line on stderr saying so — unless `JOBHOST_E2E_NO_SKIP` is set (CI sets
/// it), where a missing prerequisite fails the test instead of passing it silently.
pub fn prerequisite(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        std::env::var_os("JOBHOST_E2E_NO_SKIP").is_none(),
        "JOBHOST_E2E_NO_SKIP is set, but this test cannot run: {what}"
    );
    eprintln!("skipped: {what}");
    false
}
