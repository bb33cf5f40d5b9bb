//! Pools fed from Redis Streams through a consumer group, against a real `redis-server` that
//! each test starts on a Unix socket in its own temp folder (no fixed port) and stops. Skipped
//! with a message when redis-server is not installed (CI installs it).
//!
//! This module holds the private server and the helpers; the tests are in its submodules.

mod abuse;
mod consuming;
mod hosts;
mod submit;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use jobhost_e2e::{config_with, wait_until, Env, SOON};
use redis::Value;

/// A private redis-server, killed on drop.
pub(crate) struct Redis {
    child: Option<Child>,
    pub(crate) socket: PathBuf,
    pub(crate) dir: PathBuf,
}

pub(crate) fn have_redis() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    jobhost_e2e::prerequisite(found, "redis-server is not installed")
}

impl Redis {
    /// Where a server for `env` listens (it need not run yet).
    pub(crate) fn at(env: &Env) -> Redis {
        let dir = env.path().join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        Redis {
            child: None,
            socket: dir.join("redis.sock"),
            dir,
        }
    }

    pub(crate) fn start(mut self) -> Redis {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_until("redis-server answers", SOON, || {
            self.try_conn()
                .is_some_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok())
        });
        self
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn url(&self) -> String {
        self.socket.display().to_string()
    }

    pub(crate) fn try_conn(&self) -> Option<redis::Connection> {
        redis::Client::open(format!("unix://{}", self.socket.display()))
            .ok()?
            .get_connection()
            .ok()
    }

    pub(crate) fn conn(&self) -> redis::Connection {
        self.try_conn().expect("connect to the test redis-server")
    }

    /// `redis-cli -s SOCKET ARGS…`, as a person would enqueue.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every entry of `stream` as field maps.
    pub(crate) fn entries(&self, stream: &str) -> Vec<HashMap<String, String>> {
        let v: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.conn())
            .unwrap();
        let Value::Array(rows) = v else {
            return Vec::new();
        };
        rows.iter()
            .filter_map(|row| {
                let Value::Array(parts) = row else {
                    return None;
                };
                let Some(Value::Array(kv)) = parts.get(1) else {
                    return None;
                };
                Some(kv.chunks(2).map(|c| (text(&c[0]), text(&c[1]))).collect())
            })
            .collect()
    }

    pub(crate) fn xlen(&self, stream: &str) -> usize {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.conn())
            .unwrap_or(0)
    }
}

pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn pool(
    plugin: &str,
    workers: usize,
    redis: &Redis,
    extra: &str,
    table: &str,
) -> String {
    config_with(&format!(
        "[[pool]]\nname = \"q\"\nplugin = \"{plugin}\"\nworkers = {workers}\nsource = \"redis\"\n{extra}\n[pool.redis]\nurl = \"{}\"\nstream = \"jobs\"\n{table}\n",
        redis.url()
    ))
}

/// The results on `stream`, counted per id.
pub(crate) fn counts(entries: &[HashMap<String, String>]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for e in entries {
        *counts.entry(e["id"].clone()).or_insert(0) += 1;
    }
    counts
}

/// One job as the faulty plugin's `trace` payload wrote it: tag, pid, start and end
/// (CLOCK_MONOTONIC ns; no end: its worker died in it).
pub(crate) struct Span {
    pub(crate) tag: String,
    pub(crate) pid: i32,
    pub(crate) start: u128,
    pub(crate) end: Option<u128>,
}

/// The jobs of a trace file, in the order they started.
pub(crate) fn spans(trace: &Path) -> Vec<Span> {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    let mut spans: Vec<Span> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        let [what, tag, pid, ns] = words[..] else {
            panic!("a trace line: {line:?}");
        };
        let pid: i32 = pid.parse().expect("a pid");
        let ns: u128 = ns.parse().expect("a time");
        match what {
            "start" => spans.push(Span {
                tag: tag.to_string(),
                pid,
                start: ns,
                end: None,
            }),
            "end" => {
                let span = spans
                    .iter_mut()
                    .rev()
                    .find(|s| s.tag == tag && s.pid == pid && s.end.is_none())
                    .unwrap_or_else(|| panic!("an end without a start: {line:?}"));
                span.end = Some(ns);
            }
            _ => panic!("a trace line: {line:?}"),
        }
    }
    spans
}

/// Fails if two runs of one entry (spans of one tag) ever overlapped in time. `end_of` gives a
/// span's end (it may decide for one that never ended); `context` is shown on failure.
pub(crate) fn assert_runs_never_overlap(
    spans: Vec<Span>,
    end_of: impl Fn(&Span) -> u128,
    context: impl Fn() -> String,
) {
    let mut by_tag: HashMap<String, Vec<(u128, u128, i32)>> = HashMap::new();
    for span in spans {
        let end = end_of(&span);
        by_tag
            .entry(span.tag)
            .or_default()
            .push((span.start, end, span.pid));
    }
    for (tag, mut runs) in by_tag {
        runs.sort_unstable();
        for pair in runs.windows(2) {
            let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
            assert!(
                start >= end,
                "entry {tag} ran in worker {second} while worker {first} still ran it (for {:.0?} more); runs (start, end, pid): {runs:?}\n{}",
                std::time::Duration::from_nanos((end - start) as u64),
                context()
            );
        }
    }
}
