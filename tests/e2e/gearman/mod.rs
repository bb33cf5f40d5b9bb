//! Pools fed by gearmand: a real `gearmand` (Debian's gearman-job-server) that each test
//! starts on a free loopback port with its files in the test's temp folder, driven by
//! Debian's own `gearman` and `gearadmin` clients — clients nobody here wrote. Skipped with
//! a message when they are not installed (CI installs them).
//!
//! This module holds the private server and the helpers; the tests are in its submodules.

mod abuse;
mod failures;
mod figures;
mod review;
mod serving;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use jobhost_e2e::{config_with, run, wait_until, Env, Run, SOON};

/// A private gearmand, killed on drop.
pub(crate) struct Gearmand {
    child: Option<Child>,
    pub(crate) port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

pub(crate) fn have_gearman() -> bool {
    let found = ["gearmand", "gearman", "gearadmin"].iter().all(|tool| {
        Command::new(tool)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    jobhost_e2e::prerequisite(
        found,
        "gearmand, gearman and gearadmin are not installed (gearman-job-server, gearman-tools)",
    )
}

/// A loopback port nobody listens on now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Gearmand {
    /// Starts one on a free port; `args` are extra gearmand options (`--job-retries=2`).
    pub(crate) fn start(env: &Env, name: &str, args: &[&str]) -> Gearmand {
        let dir = env.path().join(name);
        std::fs::create_dir_all(&dir).expect("gearmand's folder");
        let mut g = Gearmand {
            child: None,
            port: free_port(),
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        g.restart();
        g
    }

    /// (Re)starts it on its port (gearmand 1.1.20 runs as root too; its pid and log files go
    /// to the temp folder, never /var).
    pub(crate) fn restart(&mut self) {
        self.stop();
        let child = Command::new("gearmand")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .arg("--threads=1")
            .arg(format!(
                "--log-file={}",
                self.dir.join("gearmand.log").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("gearmand.pid").display()
            ))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gearmand");
        let pid = child.id();
        self.child = Some(child);
        // It answers once it listens; the pid it reports is ours, not whatever else might
        // hold the port (it retries bind for 21 s when the port is taken).
        wait_until("gearmand answers", SOON, || {
            let out = self.admin(&["--getpid"]);
            out.trim() == pid.to_string()
        });
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `gearadmin -h 127.0.0.1 -p PORT ARGS…`'s output ("" when it cannot connect).
    pub(crate) fn admin(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["10", "gearadmin", "-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run gearadmin");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `gearman -h 127.0.0.1 -p PORT ARGS…`, bounded (the CLI waits forever for a job
    /// nobody answers): exit status 124 when it did not finish within 60 s.
    pub(crate) fn cli(&self, args: &[&str]) -> Run {
        run(Command::new("timeout")
            .args(["60", "gearman", "-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(args))
    }

    /// The same, started and left running (for load), output piped.
    pub(crate) fn spawn_cli(&self, args: &[&str]) -> Child {
        Command::new("timeout")
            .args(["60", "gearman", "-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run gearman")
    }

    /// `--status`'s line for `function`: (jobs queued or running, running, workers).
    pub(crate) fn status(&self, function: &str) -> Option<(u64, u64, u64)> {
        self.admin(&["--status"]).lines().find_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            match f[..] {
                [name, total, running, workers] if name == function => Some((
                    total.parse().ok()?,
                    running.parse().ok()?,
                    workers.parse().ok()?,
                )),
                _ => None,
            }
        })
    }

    /// Waits until `n` workers are registered for `function`.
    pub(crate) fn wait_for_workers(&self, function: &str, n: u64) {
        wait_until(
            &format!("{n} workers of {function} on gearmand"),
            SOON,
            || self.status(function).is_some_and(|(_, _, w)| w == n),
        );
    }
}

impl Drop for Gearmand {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A config with one gearman pool `q` of `plugin`, serving `servers`.
pub(crate) fn pool(
    plugin: &str,
    workers: usize,
    servers: &[String],
    extra: &str,
    table: &str,
) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
    config_with(&format!(
        "[[pool]]\nname = \"q\"\nplugin = \"{plugin}\"\nworkers = {workers}\nsource = \"gearman\"\n{extra}\n[pool.gearman]\nservers = [{}]\n{table}\n",
        servers.join(", ")
    ))
}

/// Waits for a spawned CLI and returns (exit code, stdout, stderr).
pub(crate) fn finish(child: Child) -> (i32, String, String) {
    let out = child.wait_with_output().expect("wait for gearman");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Long enough for anything a healthy pool does while the machine is loaded.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);
