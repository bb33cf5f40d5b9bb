//! The master's figures in the Prometheus exposition formats, pure: the histograms the
//! supervisor keeps per pool ([`Histogram`]), the figures a scrape is rendered from
//! ([`Figures`]), and [`render`] in OpenMetrics 1.0 text or in the Prometheus text format
//! 0.0.4.
//!
//! Why two formats: OpenMetrics is what the issue asks for and what a Prometheus server asks
//! for first (its `Accept` header); but the two differ in how a counter's family is named (a
//! family `x` with the sample `x_total` in OpenMetrics, the family `x_total` in 0.0.4), and
//! Debian's `promtool check metrics` (2.42) reads only 0.0.4 — a conformant OpenMetrics
//! counter is "no help text" to it. The HTTP child negotiates, as client_golang does; the
//! admin command `metrics` gives OpenMetrics and `metrics prometheus` the older format.
//!
//! Written by hand rather than with the `prometheus` or `prometheus-client` crates: those keep
//! their own registry of atomics updated as things happen, while the master already has every
//! figure in one place (the supervisor's pools, the snapshot `status` is built from) and must
//! not pay per job for a second bookkeeping; what is left is a few dozen lines of text
//! formatting with the label escaping below.
//!
//! It never reads a clock or a file, and never renders a label value unescaped (pool and
//! plugin names come from the config and plugins).

use std::fmt::Write as _;

use crate::admin::{PoolSnapshot, Snapshot};

/// Bucket bounds of both histograms (job duration and queue wait), in seconds: from a
/// millisecond job to a five-minute one. Fixed, so that every pool's series line up.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

/// A histogram of durations, by [`BUCKETS`]. Observing is a few comparisons and two adds:
/// it runs once or twice per job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last slot is past the last bound (+Inf).
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let i = BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[i] = self.counts[i].saturating_add(1);
        self.sum += seconds;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, &c| a.saturating_add(c))
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }
}

/// Why a job was refused at its SUBMIT (the `reason` label of
/// `jobhost_pool_jobs_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    QueueFull,
    TooLarge,
    ShuttingDown,
    /// A loop-mode or engine-fed pool: it takes no jobs from the socket.
    NotSubmittable,
}

impl Rejection {
    pub const ALL: [Rejection; 4] = [
        Rejection::QueueFull,
        Rejection::TooLarge,
        Rejection::ShuttingDown,
        Rejection::NotSubmittable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::TooLarge => "too_large",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::NotSubmittable => "not_submittable",
        }
    }
}

/// How a worker left (the `reason` label of `jobhost_pool_worker_exits_total`): finer than
/// `status`'s four counters — a recycle by each limit, a failed start apart from a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    Crash,
    BootFailed,
    Timeout,
    RecycleMaxJobs,
    RecycleMaxLifetime,
    RecycleMaxRss,
    Stop,
    PluginStop,
}

impl ExitReason {
    pub const ALL: [ExitReason; 8] = [
        ExitReason::Crash,
        ExitReason::BootFailed,
        ExitReason::Timeout,
        ExitReason::RecycleMaxJobs,
        ExitReason::RecycleMaxLifetime,
        ExitReason::RecycleMaxRss,
        ExitReason::Stop,
        ExitReason::PluginStop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Crash => "crash",
            ExitReason::BootFailed => "boot_failed",
            ExitReason::Timeout => "timeout",
            ExitReason::RecycleMaxJobs => "recycle_max_jobs",
            ExitReason::RecycleMaxLifetime => "recycle_max_lifetime",
            ExitReason::RecycleMaxRss => "recycle_max_rss",
            ExitReason::Stop => "stop",
            ExitReason::PluginStop => "plugin_stop",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the supervisor counts per pool for the metrics (beyond `status`'s counters).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolMetrics {
    /// Jobs accepted from the job socket.
    pub submitted: u64,
    /// Refused at SUBMIT, by [`Rejection`] (indexed as `Rejection::ALL`).
    pub rejected: [u64; 4],
    /// Worker exits by [`ExitReason`] (indexed as `ExitReason::ALL`).
    pub exits: [u64; 8],
    /// From a job's start on its worker to its outcome (answered jobs only).
    pub duration: Histogram,
    /// From a job's acceptance (or its return to the queue) to its dispatch to a worker.
    pub queue_wait: Histogram,
    /// Seconds workers spent on jobs that have ended (answered, or lost with their worker);
    /// the running jobs' time so far is added when rendered.
    pub busy_seconds: f64,
}

impl PoolMetrics {
    pub fn reject(&mut self, why: Rejection) {
        let i = why as usize;
        self.rejected[i] = self.rejected[i].saturating_add(1);
    }

    pub fn exit(&mut self, why: ExitReason) {
        let i = why.index();
        self.exits[i] = self.exits[i].saturating_add(1);
    }
}

/// One pool's figures that `status`'s snapshot does not carry.
#[derive(Debug, Clone, Default)]
pub struct PoolFigures {
    pub name: String,
    /// Fed by the job socket (not a loop-mode or engine-fed pool): submit, queue and
    /// duration figures exist.
    pub socket_fed: bool,
    pub metrics: PoolMetrics,
    /// `metrics.busy_seconds` plus the running jobs' time so far.
    pub busy_seconds: f64,
}

/// The master process's own figures (its `/proc/self`, its connections, its reloads).
#[derive(Debug, Clone, Default)]
pub struct MasterFigures {
    pub rss_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
    /// Unix time the master started at.
    pub start_time: f64,
    pub clients: usize,
    pub admin_sessions: usize,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Unix time of the last reload's end, and whether it succeeded.
    pub last_reload: Option<(f64, bool)>,
    /// Times the HTTP child was started again after it died.
    pub http_restarts: u64,
    /// SUBMITs that named no pool.
    pub unknown_pool_submits: u64,
}

/// Everything one scrape shows.
pub struct Figures<'a> {
    pub snapshot: &'a Snapshot,
    pub pools: Vec<PoolFigures>,
    pub master: MasterFigures,
}

/// The two text formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text; version=1.0.0`).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Prometheus,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Writes families in one format.
struct Out {
    text: String,
    format: Format,
}

impl Out {
    /// The HELP/TYPE (and UNIT) lines of family `name` (a counter's name without `_total`);
    /// returns the name its samples take (a counter's with `_total`).
    fn family(&mut self, name: &str, kind: Kind, unit: Option<&str>, help: &str) -> String {
        let (type_name, shown) = match kind {
            Kind::Counter => ("counter", true),
            Kind::Gauge => ("gauge", false),
            Kind::Histogram => ("histogram", false),
        };
        let family = match (kind, self.format) {
            (Kind::Counter, Format::Prometheus) => format!("{name}_total"),
            _ => name.to_string(),
        };
        let _ = writeln!(self.text, "# HELP {family} {help}");
        let _ = writeln!(self.text, "# TYPE {family} {type_name}");
        if let (Some(unit), Format::OpenMetrics) = (unit, self.format) {
            let _ = writeln!(self.text, "# UNIT {family} {unit}");
        }
        if shown {
            format!("{name}_total")
        } else {
            name.to_string()
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(key);
                self.text.push_str("=\"");
                escape_label(&mut self.text, value);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        push_number(&mut self.text, value);
        self.text.push('\n');
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0u64;
        let bucket = format!("{name}_bucket");
        for (i, count) in h.counts.iter().enumerate() {
            cumulative = cumulative.saturating_add(*count);
            let le = match BUCKETS.get(i) {
                Some(bound) => number(*bound),
                None => "+Inf".to_string(),
            };
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, cumulative as f64);
    }
}

/// A label value with `\`, `"` and line feeds escaped, as both formats want.
fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn number(value: f64) -> String {
    let mut s = String::new();
    push_number(&mut s, value);
    s
}

/// Integers without a fraction (counts read better, and are exact), other values as Rust
/// prints them (shortest round-trip form); NaN and infinities as both formats spell them.
fn push_number(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        let _ = write!(out, "{}", value as i64);
    } else {
        let _ = write!(out, "{value}");
    }
}

/// A family of per-pool figures: its name, its help, and how to read it off a pool.
type PoolFamily = (
    &'static str,
    &'static str,
    fn(&crate::admin::PoolSnapshot) -> u64,
);
/// A family of per-source figures, which a source may not have.
type SourceFamily = (
    &'static str,
    &'static str,
    fn(&crate::admin::SourceSnapshot) -> Option<f64>,
);

/// The worker states `jobhost_pool_workers` always shows (a series per state, zero or not).
const WORKER_STATES: [&str; 4] = ["idle", "busy", "holding", "draining"];
/// The pool states `jobhost_pool_state` shows, one of them 1.
const POOL_STATES: [&str; 5] = ["ok", "backing-off", "failing", "stopped", "removed"];
/// The source states `jobhost_source_state` shows, one of them 1.
const SOURCE_STATES: [&str; 4] = [
    "connected",
    "partly disconnected",
    "disconnected",
    "connecting",
];

/// The whole exposition.
pub fn render(f: &Figures<'_>, format: Format) -> String {
    let mut out = Out {
        text: String::with_capacity(8192),
        format,
    };
    let s = f.snapshot;
    // `f.pools` goes with `s.pools` index by index. A pool removed by a reload drains under its
    // name while a new pool of that name may already serve: one name is one series, the
    // newest pool's (the pools are in the order they were added).
    let entries: Vec<(&PoolSnapshot, Option<&PoolFigures>)> = s
        .pools
        .iter()
        .enumerate()
        .filter(|(i, p)| !s.pools[i + 1..].iter().any(|later| later.name == p.name))
        .map(|(i, p)| (p, f.pools.get(i).filter(|pf| pf.name == p.name)))
        .collect();
    let pools: Vec<&PoolSnapshot> = entries.iter().map(|(p, _)| *p).collect();
    let figures_of = |p: &PoolSnapshot| {
        entries
            .iter()
            .find(|(q, _)| std::ptr::eq(*q, p))
            .and_then(|(_, pf)| *pf)
    };

    // ---- the master ----
    let m = &f.master;
    let name = out.family(
        "jobhost_build_info",
        Kind::Gauge,
        None,
        "The jobhost version.",
    );
    out.sample(&name, &[("version", &s.version)], 1.0);
    if let Some(rss) = m.rss_bytes {
        let name = out.family(
            "process_resident_memory_bytes",
            Kind::Gauge,
            Some("bytes"),
            "The master's resident memory.",
        );
        out.sample(&name, &[], rss as f64);
    }
    if let Some(fds) = m.open_fds {
        let name = out.family(
            "process_open_fds",
            Kind::Gauge,
            None,
            "File descriptors the master has open.",
        );
        out.sample(&name, &[], fds as f64);
    }
    if let Some(max) = m.max_fds {
        let name = out.family(
            "process_max_fds",
            Kind::Gauge,
            None,
            "The master's limit on open file descriptors.",
        );
        out.sample(&name, &[], max as f64);
    }
    if let Some(cpu) = m.cpu_seconds {
        let name = out.family(
            "process_cpu_seconds",
            Kind::Counter,
            Some("seconds"),
            "CPU time the master used (user and system).",
        );
        out.sample(&name, &[], cpu);
    }
    let name = out.family(
        "process_start_time_seconds",
        Kind::Gauge,
        Some("seconds"),
        "When the master started (Unix time).",
    );
    out.sample(&name, &[], m.start_time);
    let name = out.family(
        "jobhost_clients",
        Kind::Gauge,
        None,
        "Connections to the job socket.",
    );
    out.sample(&name, &[], m.clients as f64);
    let name = out.family(
        "jobhost_admin_sessions",
        Kind::Gauge,
        None,
        "Admin sessions open (the HTTP child's included).",
    );
    out.sample(&name, &[], m.admin_sessions as f64);
    let name = out.family(
        "jobhost_generation",
        Kind::Gauge,
        None,
        "The config generation: 1 at start, one more per successful reload.",
    );
    out.sample(&name, &[], s.generation as f64);
    let name = out.family(
        "jobhost_reloads",
        Kind::Counter,
        None,
        "Reloads since start, by result.",
    );
    out.sample(&name, &[("result", "ok")], m.reloads_ok as f64);
    out.sample(&name, &[("result", "failed")], m.reloads_failed as f64);
    if let Some((at, ok)) = m.last_reload {
        let name = out.family(
            "jobhost_last_reload_timestamp_seconds",
            Kind::Gauge,
            Some("seconds"),
            "When the last reload ended (Unix time).",
        );
        out.sample(&name, &[], at);
        let name = out.family(
            "jobhost_last_reload_success",
            Kind::Gauge,
            None,
            "1 if the last reload succeeded, 0 if it failed.",
        );
        out.sample(&name, &[], if ok { 1.0 } else { 0.0 });
    }
    let name = out.family(
        "jobhost_http_restarts",
        Kind::Counter,
        None,
        "Times the HTTP child was started again after it ended.",
    );
    out.sample(&name, &[], m.http_restarts as f64);
    let name = out.family(
        "jobhost_jobs_rejected_unknown_pool",
        Kind::Counter,
        None,
        "Jobs refused because they named no pool.",
    );
    out.sample(&name, &[], m.unknown_pool_submits as f64);

    // ---- per pool ----
    let counters: [PoolFamily; 4] = [
        (
            "jobhost_pool_jobs_completed",
            "Jobs that ended with a result.",
            |p| p.jobs_done,
        ),
        (
            "jobhost_pool_jobs_failed",
            "Jobs that ended failed (by the plugin, or out of attempts).",
            |p| p.jobs_failed,
        ),
        (
            "jobhost_pool_jobs_retried",
            "Jobs tried again after their worker died.",
            |p| p.jobs_retried,
        ),
        (
            "jobhost_pool_jobs_dropped",
            "Queued jobs dropped unrun because their client went away.",
            |p| p.jobs_dropped,
        ),
    ];
    let name = out.family(
        "jobhost_pool_jobs_submitted",
        Kind::Counter,
        None,
        "Jobs accepted from the job socket.",
    );
    for &p in &pools {
        if let Some(pf) = figures_of(p).filter(|pf| pf.socket_fed) {
            out.sample(&name, &[("pool", &p.name)], pf.metrics.submitted as f64);
        }
    }
    for (family, help, value) in counters {
        let name = out.family(family, Kind::Counter, None, help);
        for &p in &pools {
            out.sample(&name, &[("pool", &p.name)], value(p) as f64);
        }
    }
    let name = out.family(
        "jobhost_pool_jobs_rejected",
        Kind::Counter,
        None,
        "Jobs refused at submission, by reason.",
    );
    for &p in &pools {
        if let Some(pf) = figures_of(p) {
            for why in Rejection::ALL {
                let n = pf.metrics.rejected[why as usize];
                out.sample(
                    &name,
                    &[("pool", &p.name), ("reason", why.as_str())],
                    n as f64,
                );
            }
        }
    }
    let name = out.family(
        "jobhost_pool_jobs_queued",
        Kind::Gauge,
        None,
        "Jobs accepted and not yet sent to a worker.",
    );
    for &p in &pools {
        out.sample(&name, &[("pool", &p.name)], p.jobs_queued as f64);
    }
    let name = out.family(
        "jobhost_pool_jobs_in_flight",
        Kind::Gauge,
        None,
        "Jobs sent to workers and not yet answered (for an engine-fed pool: jobs running).",
    );
    for &p in &pools {
        out.sample(&name, &[("pool", &p.name)], p.jobs_in_flight as f64);
    }
    let name = out.family(
        "jobhost_pool_workers",
        Kind::Gauge,
        None,
        "Workers by state.",
    );
    for &p in &pools {
        for state in WORKER_STATES {
            let n = s
                .workers
                .iter()
                .filter(|w| w.pool == p.name && w.state == state)
                .count();
            out.sample(&name, &[("pool", &p.name), ("state", state)], n as f64);
        }
    }
    let name = out.family(
        "jobhost_pool_workers_wanted",
        Kind::Gauge,
        None,
        "Workers the pool is to run.",
    );
    for &p in &pools {
        out.sample(&name, &[("pool", &p.name)], p.workers_wanted as f64);
    }
    let name = out.family(
        "jobhost_pool_busy_ratio",
        Kind::Gauge,
        None,
        "Busy workers over serving workers, now (0 with none); for a rate over time use jobhost_pool_busy_seconds_total.",
    );
    for &p in &pools {
        let ratio = if p.workers_running == 0 {
            0.0
        } else {
            (p.workers_busy as f64 / p.workers_running as f64).min(1.0)
        };
        out.sample(&name, &[("pool", &p.name)], ratio);
    }
    let name = out.family(
        "jobhost_pool_busy_seconds",
        Kind::Counter,
        Some("seconds"),
        "Worker time spent on jobs (pools fed by the job socket); rate() over workers gives the busy ratio.",
    );
    for &p in &pools {
        if let Some(pf) = figures_of(p).filter(|pf| pf.socket_fed) {
            out.sample(&name, &[("pool", &p.name)], pf.busy_seconds);
        }
    }
    let name = out.family(
        "jobhost_pool_worker_exits",
        Kind::Counter,
        None,
        "Worker exits by reason.",
    );
    for &p in &pools {
        if let Some(pf) = figures_of(p) {
            for why in ExitReason::ALL {
                let n = pf.metrics.exits[why.index()];
                out.sample(
                    &name,
                    &[("pool", &p.name), ("reason", why.as_str())],
                    n as f64,
                );
            }
        }
    }
    let name = out.family(
        "jobhost_pool_state",
        Kind::Gauge,
        None,
        "The pool's state: 1 for the state it is in.",
    );
    for &p in &pools {
        for state in POOL_STATES {
            let on = if p.state == state { 1.0 } else { 0.0 };
            out.sample(&name, &[("pool", &p.name), ("state", state)], on);
        }
    }
    let name = out.family(
        "jobhost_job_duration_seconds",
        Kind::Histogram,
        Some("seconds"),
        "From a job's start on its worker to its outcome (pools fed by the job socket).",
    );
    for &p in &pools {
        if let Some(pf) = figures_of(p).filter(|pf| pf.socket_fed) {
            out.histogram(&name, &[("pool", &p.name)], &pf.metrics.duration);
        }
    }
    let name = out.family(
        "jobhost_job_queue_wait_seconds",
        Kind::Histogram,
        Some("seconds"),
        "From a job's acceptance (or its return to the queue) to its dispatch to a worker.",
    );
    for &p in &pools {
        if let Some(pf) = figures_of(p).filter(|pf| pf.socket_fed) {
            out.histogram(&name, &[("pool", &p.name)], &pf.metrics.queue_wait);
        }
    }

    // ---- per worker ----
    let name = out.family(
        "jobhost_worker_memory_bytes",
        Kind::Gauge,
        Some("bytes"),
        "Each worker's memory: resident (rss), and its own (own: not shared with the master, copy-on-write pages it wrote).",
    );
    for w in &s.workers {
        let pid = w.pid.to_string();
        if let Some(rss) = w.rss_bytes {
            let labels = [("pool", w.pool.as_str()), ("pid", &pid), ("kind", "rss")];
            out.sample(&name, &labels, rss as f64);
        }
        if let Some(own) = w.own_bytes {
            let labels = [("pool", w.pool.as_str()), ("pid", &pid), ("kind", "own")];
            out.sample(&name, &labels, own as f64);
        }
    }
    let name = out.family(
        "jobhost_worker_jobs",
        Kind::Gauge,
        None,
        "Jobs each worker has done.",
    );
    for w in &s.workers {
        let pid = w.pid.to_string();
        out.sample(
            &name,
            &[("pool", w.pool.as_str()), ("pid", &pid)],
            w.jobs_done as f64,
        );
    }

    // ---- per source ----
    let sources: Vec<_> = pools
        .iter()
        .filter_map(|p| p.source.as_ref().map(|src| (p, src)))
        .collect();
    if !sources.is_empty() {
        let name = out.family(
            "jobhost_source_up",
            Kind::Gauge,
            None,
            "1 if every worker of the pool is connected to its source (Redis, gearmand).",
        );
        for (p, src) in &sources {
            let up = if src.state == "connected" { 1.0 } else { 0.0 };
            out.sample(&name, &[("pool", &p.name), ("kind", &src.kind)], up);
        }
        let name = out.family(
            "jobhost_source_state",
            Kind::Gauge,
            None,
            "The source connection's state: 1 for the state it is in.",
        );
        for (p, src) in &sources {
            for state in SOURCE_STATES {
                let on = if src.state == state { 1.0 } else { 0.0 };
                out.sample(
                    &name,
                    &[("pool", &p.name), ("kind", &src.kind), ("state", state)],
                    on,
                );
            }
        }
        let name = out.family(
            "jobhost_source_workers_connected",
            Kind::Gauge,
            None,
            "Workers connected to the source.",
        );
        for (p, src) in &sources {
            out.sample(&name, &[("pool", &p.name)], src.workers_connected as f64);
        }
        let figures: [SourceFamily; 4] = [
            (
                "jobhost_source_lag",
                "Work waiting at the source, not yet taken by any worker (Redis: entries not delivered to the group; gearmand: jobs queued, not running).",
                |s| s.lag.map(|v| v as f64),
            ),
            (
                "jobhost_source_pending",
                "Work taken and not finished (Redis: the group's pending entries; gearmand: jobs running).",
                |s| s.pending.map(|v| v as f64),
            ),
            (
                "jobhost_source_length",
                "The source's length (Redis: XLEN; gearmand: jobs queued and running).",
                |s| s.stream_length.map(|v| v as f64),
            ),
            (
                "jobhost_source_figures_age_seconds",
                "How old the source figures above are.",
                |s| s.figures_age_secs,
            ),
        ];
        for (family, help, value) in figures {
            let unit = family.ends_with("_seconds").then_some("seconds");
            let kind = Kind::Gauge;
            let mut name = None;
            for (p, src) in &sources {
                if let Some(v) = value(src) {
                    let n = name.get_or_insert_with(|| out.family(family, kind, unit, help));
                    let n = n.clone();
                    out.sample(&n, &[("pool", &p.name), ("kind", &src.kind)], v);
                }
            }
        }
    }
    if format == Format::OpenMetrics {
        out.text.push_str("# EOF\n");
    }
    out.text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{PoolSnapshot, SourceSnapshot, WorkerSnapshot};

    fn pool(name: &str) -> PoolSnapshot {
        PoolSnapshot {
            name: name.into(),
            plugin: "echo".into(),
            plugin_version: "0.1.0".into(),
            mode: "jobs".into(),
            workers_wanted: 2,
            workers_running: 2,
            workers_busy: 1,
            jobs_queued: 3,
            jobs_running: 1,
            jobs_in_flight: 2,
            jobs_done: 10,
            jobs_failed: 1,
            jobs_retried: 0,
            jobs_dropped: 0,
            crashes: 0,
            timeouts: 0,
            recycled: 0,
            stopped: 0,
            state: "ok".into(),
            source: None,
        }
    }

    fn snapshot() -> Snapshot {
        let mut redis = pool("q");
        redis.source = Some(SourceSnapshot {
            kind: "redis".into(),
            address: "/r.sock".into(),
            stream: Some("s".into()),
            group: Some("g".into()),
            function: None,
            state: "connected".into(),
            reason: None,
            workers_connected: 2,
            stream_length: Some(7),
            pending: Some(1),
            lag: Some(4),
            figures_age_secs: Some(0.5),
        });
        Snapshot {
            pid: 1,
            version: "0.1.0".into(),
            uptime_secs: 1.0,
            config: "x.toml".into(),
            generation: 1,
            generations_loaded: 1,
            last_reload: None,
            pools: vec![pool("echo"), pool("we\"ird\\name"), redis],
            workers: vec![WorkerSnapshot {
                pid: 42,
                pool: "echo".into(),
                generation: 1,
                state: "busy".into(),
                job_age_secs: Some(0.1),
                jobs_done: 5,
                rss_bytes: Some(1 << 20),
                own_bytes: Some(1 << 16),
                started: "2026-12-02T00:00:00Z".into(),
                age_secs: 3.0,
            }],
            recent: Vec::new(),
        }
    }

    fn figures(s: &Snapshot) -> Figures<'_> {
        let mut m = PoolMetrics {
            submitted: 12,
            ..Default::default()
        };
        m.reject(Rejection::QueueFull);
        m.exit(ExitReason::RecycleMaxJobs);
        m.duration.observe(0.003);
        m.duration.observe(0.2);
        m.duration.observe(1000.0);
        m.queue_wait.observe(0.0);
        Figures {
            snapshot: s,
            pools: vec![
                PoolFigures {
                    name: "echo".into(),
                    socket_fed: true,
                    metrics: m,
                    busy_seconds: 1.5,
                },
                PoolFigures {
                    name: "we\"ird\\name".into(),
                    socket_fed: true,
                    ..Default::default()
                },
                PoolFigures {
                    name: "q".into(),
                    socket_fed: false,
                    ..Default::default()
                },
            ],
            master: MasterFigures {
                rss_bytes: Some(5 << 20),
                open_fds: Some(12),
                last_reload: Some((1.7e9, false)),
                reloads_failed: 1,
                ..Default::default()
            },
        }
    }

    #[test]
    fn openmetrics_names_counters_without_total_and_ends_with_eof() {
        let s = snapshot();
        let text = render(&figures(&s), Format::OpenMetrics);
        assert!(text.contains("# TYPE jobhost_pool_jobs_submitted counter\n"));
        assert!(text.contains("jobhost_pool_jobs_submitted_total{pool=\"echo\"} 12\n"));
        assert!(text.contains("# UNIT jobhost_job_duration_seconds seconds\n"));
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
        let p = render(&figures(&s), Format::Prometheus);
        assert!(p.contains("# TYPE jobhost_pool_jobs_submitted_total counter\n"));
        assert!(!p.contains("# EOF") && !p.contains("# UNIT"));
    }

    #[test]
    fn histograms_are_cumulative_and_end_at_inf() {
        let s = snapshot();
        let text = render(&figures(&s), Format::Prometheus);
        assert!(
            text.contains("jobhost_job_duration_seconds_bucket{pool=\"echo\",le=\"0.001\"} 0\n")
        );
        assert!(
            text.contains("jobhost_job_duration_seconds_bucket{pool=\"echo\",le=\"0.005\"} 1\n")
        );
        assert!(text.contains("jobhost_job_duration_seconds_bucket{pool=\"echo\",le=\"300\"} 2\n"));
        assert!(text.contains("jobhost_job_duration_seconds_bucket{pool=\"echo\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("jobhost_job_duration_seconds_count{pool=\"echo\"} 3\n"));
        assert!(text.contains("jobhost_job_duration_seconds_sum{pool=\"echo\"} 1000.203\n"));
    }

    #[test]
    fn label_values_are_escaped_and_engine_pools_have_no_submit_figures() {
        let s = snapshot();
        let text = render(&figures(&s), Format::OpenMetrics);
        assert!(text.contains("jobhost_pool_jobs_queued{pool=\"we\\\"ird\\\\name\"} 3\n"));
        assert!(!text.contains("jobhost_pool_jobs_submitted_total{pool=\"q\"}"));
        assert!(text.contains("jobhost_source_lag{pool=\"q\",kind=\"redis\"} 4\n"));
        assert!(text.contains("jobhost_source_up{pool=\"q\",kind=\"redis\"} 1\n"));
        assert!(text.contains(
            "jobhost_pool_worker_exits_total{pool=\"echo\",reason=\"recycle_max_jobs\"} 1\n"
        ));
        assert!(text.contains("jobhost_pool_workers{pool=\"echo\",state=\"busy\"} 1\n"));
        assert!(text.contains("jobhost_pool_busy_ratio{pool=\"echo\"} 0.5\n"));
        assert!(text.contains("jobhost_last_reload_success 0\n"));
        assert!(text.contains(
            "jobhost_worker_memory_bytes{pool=\"echo\",pid=\"42\",kind=\"own\"} 65536\n"
        ));
    }

    /// A pool removed by a reload, draining, and a new pool of the same name: one series per
    /// name, the new pool's.
    #[test]
    fn a_draining_pool_and_its_successor_of_the_same_name_are_one_series() {
        let mut s = snapshot();
        let mut old = pool("echo");
        old.state = "removed".into();
        old.jobs_queued = 99;
        s.pools.insert(0, old);
        let mut f = figures(&s);
        f.pools.insert(
            0,
            PoolFigures {
                name: "echo".into(),
                socket_fed: true,
                ..Default::default()
            },
        );
        let text = render(&f, Format::OpenMetrics);
        assert_eq!(
            text.matches("jobhost_pool_jobs_queued{pool=\"echo\"}")
                .count(),
            1
        );
        assert!(text.contains("jobhost_pool_jobs_queued{pool=\"echo\"} 3\n"));
        assert!(text.contains("jobhost_pool_jobs_submitted_total{pool=\"echo\"} 12\n"));
        assert_eq!(
            text.matches("jobhost_pool_state{pool=\"echo\",state=\"ok\"}")
                .count(),
            1
        );
    }

    #[test]
    fn every_family_is_declared_once_and_every_sample_belongs_to_the_family_above_it() {
        let s = snapshot();
        for format in [Format::OpenMetrics, Format::Prometheus] {
            let text = render(&figures(&s), format);
            let mut families = std::collections::HashSet::new();
            let mut current: Option<(String, String)> = None;
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# TYPE ") {
                    let (name, kind) = rest.split_once(' ').unwrap();
                    assert!(families.insert(name.to_string()), "{name} twice");
                    current = Some((name.to_string(), kind.to_string()));
                } else if !line.starts_with('#') {
                    let (family, kind) = current.clone().unwrap();
                    let sample = line.split(['{', ' ']).next().unwrap();
                    let ok = match (kind.as_str(), format) {
                        ("counter", Format::OpenMetrics) => sample == format!("{family}_total"),
                        ("histogram", _) => ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| sample == format!("{family}{s}")),
                        _ => sample == family,
                    };
                    assert!(ok, "{sample} under {family} ({kind}, {format:?})");
                }
            }
        }
    }
}
