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
