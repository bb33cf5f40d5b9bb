//! The master's `status json` and `workers json` as their readers take them: the status page
//! (`http`) and `jobhost top`. The master writes [`crate::admin::Snapshot`]; these are the
//! other side, kept apart so that a reader built from another version still reads what it can.
//!
//! Lenient on purpose: `#[serde(default)]` on every struct, so a field a master drops one day
//! (or an older master never had) reads as its default instead of failing the whole view, an
//! unknown field is ignored, and a `null` number (a NaN or an unmeasured figure the master
//! could not encode) reads as absent. It never renders or cleans anything: the text in here
//! comes from the config and from plugins, and each reader escapes it for where it shows it.

use serde::Deserialize;

/// `status json`: the master and its pools.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub uptime_secs: Option<f64>,
    pub config: String,
    pub generation: u64,
    pub last_reload: Option<Reload>,
    pub pools: Vec<Pool>,
    /// Crashes, timeouts, failed boots and reloads, newest first (none from a master older
    /// than the list).
    pub recent: Vec<Recent>,
}

/// How the master's last reload went.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Reload {
    pub at: String,
    pub ok: bool,
    pub message: String,
}

/// One pool: its plugin, state and counters.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Pool {
    pub name: String,
    pub plugin: String,
    pub plugin_version: String,
    pub mode: String,
    pub state: String,
    pub workers_wanted: u64,
    pub workers_running: u64,
    pub workers_busy: u64,
    pub jobs_queued: u64,
    pub jobs_running: u64,
    pub jobs_in_flight: u64,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub jobs_retried: u64,
    pub jobs_dropped: u64,
    pub crashes: u64,
    pub timeouts: u64,
    /// Where a Redis- or Gearman-fed pool takes its jobs from.
    pub source: Option<Source>,
}

/// A pool's job source (Redis or Gearman).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Source {
    pub kind: String,
    pub address: String,
    pub state: String,
    pub reason: Option<String>,
    pub lag: Option<u64>,
}

/// A recent problem: a crash, a timeout, a failed boot or reload.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Recent {
    pub at: String,
    pub kind: String,
    pub pool: Option<String>,
    pub pid: Option<i64>,
    pub reason: String,
}

/// `workers json`: `{"workers": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct WorkerList {
    pub workers: Vec<Worker>,
}

/// One worker (`workers json` measures its own memory; `status json` does not).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Worker {
    pub pid: i64,
    pub pool: String,
    pub generation: u64,
    pub state: String,
    pub job_age_secs: Option<f64>,
    pub jobs_done: u64,
    pub rss_bytes: Option<u64>,
    pub own_bytes: Option<u64>,
    pub age_secs: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_master_leaves_out_or_cannot_measure_reads_as_absent() {
        let s: Status = serde_json::from_str(
            r#"{"pid": 7, "uptime_secs": null, "pools": [{"name": "echo", "future": [1]}],
                "something_new": {"a": 1}}"#,
        )
        .expect("lenient");
        assert_eq!((s.pid, s.uptime_secs, s.pools.len()), (7, None, 1));
        assert_eq!(s.pools[0].name, "echo");
        assert_eq!(s.pools[0].source, None);
        assert!(s.recent.is_empty() && s.last_reload.is_none());

        let w: WorkerList =
            serde_json::from_str(r#"{"workers": [{"pid": 12, "own_bytes": null}]}"#)
                .expect("lenient");
        assert_eq!(w.workers[0].pid, 12);
        assert_eq!(
            (w.workers[0].own_bytes, w.workers[0].age_secs),
            (None, None)
        );
    }
}
