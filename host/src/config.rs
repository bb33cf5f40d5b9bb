//! The config file: its TOML schema, its defaults, its validation, and where its errors are.
//!
//! This module owns everything between the bytes of `jobhost.toml` and a [`Config`] that the
//! rest of the host can trust: the sections (`[host]`, `[server]`, `[admin]`, `[[pool]]` with
//! `[pool.settings]`), their defaults, the duration and size syntaxes ([`parse_duration`],
//! [`parse_size`]), resolving relative paths (against the config file's folder, or against
//! `runtime_dir` for sockets and the pidfile), and validation. Every error names the file, the
//! line and column and the key it is about: `FILE:LINE:COL: KEY: MESSAGE` (see [`ConfigError`]).
//!
//! It never loads a plugin (it only checks that `plugins_dir/lib<plugin>.so` exists and lists
//! the ones that do), never creates, opens or writes anything (the runtime dir, sockets, the
//! pidfile, the log file, the token file are the business of their users), and never resolves
//! user names. It only reads the config file, looks into `plugins_dir`, and looks up the group
//! names of `server.socket_group` / `admin.socket_group` (so that a typo there is an error at
//! its line, like any other bad value; `host.user`/`host.group` are resolved by the master).

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// The whole config, validated, every path absolute or resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file, absolute (canonicalized when it exists).
    pub path: PathBuf,
    pub host: HostConfig,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    /// At least one; names unique.
    pub pools: Vec<PoolConfig>,
}

/// `[host]`: where things are, logging, timeouts, the workers' identity.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where users drop `lib<name>.so` (default `plugins`, relative to the config folder).
    pub plugins_dir: PathBuf,
    /// Sockets, pidfile, private plugin copies (default `run`, relative to the config folder).
    pub runtime_dir: PathBuf,
    /// Default `jobhost.pid`, relative to `runtime_dir`.
    pub pidfile: PathBuf,
    /// Default [`LogTarget::Stderr`].
    pub log: LogTarget,
    /// Default `info`.
    pub log_level: log::LevelFilter,
    /// How long a graceful stop waits for workers before killing them (default 30s).
    pub graceful_timeout: Duration,
    /// How long a plugin's `init` may take in the probe child (default 60s, never 0).
    pub init_timeout: Duration,
    /// Workers drop to this user, if set.
    pub user: Option<String>,
    /// Workers drop to this group, if set.
    pub group: Option<String>,
    /// Accept a `plugins_dir` that others can write to (default false).
    pub insecure_plugins_dir: bool,
}

/// `host.log`: `"stderr"`, `"syslog"` or a file path (relative to the config folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    Syslog,
    File(PathBuf),
}

/// `[server]`: the job socket.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Default `jobs.sock`, relative to `runtime_dir`.
    pub socket: PathBuf,
    /// TOML `socket_mode`, an octal string like `"0660"` (default `0o660`).
    pub socket_mode: u32,
    /// The group the socket file is given to after bind (PHP-FPM's `listen.group`).
    pub socket_group: Option<SocketGroup>,
    /// Largest job payload accepted, in bytes (default 16 MiB; 1 byte ..= 1 GiB).
    pub max_payload: u64,
    /// Largest job result (or data report) a worker may send, in bytes (default 16 MiB;
    /// 1 byte ..= 1 GiB). The worker turns a larger one into the job's failure.
    pub max_result: u64,
    /// What the master holds for all clients together: their partial frames, the payloads of
    /// their unanswered jobs, their unwritten output (default 256 MiB, at least 2 ×
    /// max_payload). Past it, clients over their fair share are not read.
    pub max_memory: u64,
    /// A client frame must be whole this long after its first byte, not counting the time
    /// the master was not reading that client (default 30s, at least 1ms).
    pub read_timeout: Duration,
}

/// `[admin]`: the admin socket and the optional TCP listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Default `admin.sock`, relative to `runtime_dir`.
    pub socket: PathBuf,
    /// Default `0o600`, or `0o660` when `socket_group` is set.
    pub socket_mode: u32,
    /// The group the admin socket file is given to after bind.
    pub socket_group: Option<SocketGroup>,
    /// A TCP listener; needs `token_file`, and `allow_remote` unless it is a loopback address.
    pub tcp: Option<SocketAddr>,
    /// Relative to the config folder. Not read here.
    pub token_file: Option<PathBuf>,
    /// An HTTP listener for `/metrics` and the status page, served by a supervised child
    /// (`crate::http`); needs `token_file`, and `allow_remote` unless it is a loopback address.
    pub http: Option<SocketAddr>,
    /// Default false.
    pub allow_remote: bool,
    /// A TCP session that has not authenticated within this is closed. Default 10s.
    pub auth_timeout: Duration,
    /// A session with no input (and none of its output taken) for this long is closed, unless
    /// it waits for a command it sent (a `reload`). Default 10m.
    pub idle_timeout: Duration,
}

/// `server.socket_group` / `admin.socket_group`: a group name or a numeric gid, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    /// As written in the config (a name, or the gid's digits), for messages.
    pub name: String,
    pub gid: u32,
}

/// `pool.mode`: where a pool's work comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PoolMode {
    /// `"jobs"`: jobs submitted to the job server (the default).
    Jobs,
    /// `"loop"`: the plugin pulls its own work (`run_once`).
    Loop,
}

/// One `[[pool]]`.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Jobs are addressed to a pool by this name: `[A-Za-z0-9_.-]+`, unique.
    pub name: String,
    /// The plugin `plugins_dir/lib<plugin>.so`: `[A-Za-z0-9_-]+`.
    pub plugin: String,
    /// Default 1, at most 1024.
    pub workers: usize,
    /// Default [`PoolMode::Jobs`].
    pub mode: PoolMode,
    /// Default 100 000, at least 1. The queue's bound while one client has the pool to itself;
    /// past it a client under its fair share still gets in, up to twice this in all (see
    /// `master/supervisor.rs`, `queue_room`).
    pub max_queue: usize,
    /// How many times in all a job is tried when its worker dies (default 3, at least 1).
    pub max_attempts: u32,
    /// Default 60s; `"0"` means no timeout (`None`).
    pub job_timeout: Option<Duration>,
    /// A job running this long is logged once, with what its worker is doing (`/proc`); none
    /// by default (`None`, also `"0"`).
    pub slow_job: Option<Duration>,
    /// Loop mode: sleep after the plugin says Idle (default 1s).
    pub idle_sleep: Duration,
    /// Recycle a worker after this many jobs; 0 (the default) means never (`None`).
    pub max_jobs: Option<u64>,
    /// Recycle a worker after this long; absent or 0 means never (`None`).
    pub max_lifetime: Option<Duration>,
    /// Recycle a worker whose own memory (private pages: not what it still shares with the
    /// master copy-on-write) passes this many bytes; absent or 0 means no limit.
    pub max_rss: Option<u64>,
    /// Pause taking jobs while the system has fewer bytes available; absent or 0: no check.
    pub min_available_memory: Option<u64>,
    /// This many worker crashes within `crash_window` mark the pool failing (default 10).
    pub crash_limit: u32,
    /// The window crashes are counted in (default 60s).
    pub crash_window: Duration,
    /// A failing pool tries one new worker this often (default 30s).
    pub failing_retry: Duration,
    /// `[pool.settings]`, handed to the plugin's `init` (default empty).
    pub settings: toml::Table,
    /// `source = "redis"`: the `[pool.redis]` table. `None`: the pool is fed from the job
    /// socket (`source = "socket"`, the default).
    pub redis: Option<RedisConfig>,
    /// `source = "gearman"`: the `[pool.gearman]` table. Each worker is a Gearman worker of
    /// every server in it.
    pub gearman: Option<GearmanConfig>,
    /// 1-based line of this pool's `name`, for later error messages.
    pub line: usize,
}

/// `[pool.redis]`: where a `source = "redis"` pool takes its entries from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// What the `redis` crate is given: `redis://…`, `redis+unix://…` or `unix://…` (a plain
    /// socket path in the file becomes `unix://PATH`). May hold a password: never log it.
    pub url: String,
    /// `url` with any password replaced by `***`: for logs and messages.
    pub shown_url: String,
    /// From `password_file` (its first line); overrides a password in the URL.
    pub password: Option<String>,
    pub stream: String,
    /// Default `"jobhost"`.
    pub group: String,
    /// Pending entries idle this long are taken over by any worker (their consumer's master
    /// died). Default max(2 × batch × job_timeout, 60s); always more than batch × job_timeout.
    pub claim_idle: Duration,
    /// Default `<stream>:dead`.
    pub dead_letter: String,
    /// Where results go for entries without `reply_to`; `None`: they are only acked.
    pub results: Option<String>,
    /// Entries per XREADGROUP (default 1, 1..=1000).
    pub batch: usize,
}

/// `[pool.gearman]`: the gearmand servers a `source = "gearman"` pool's workers serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GearmanConfig {
    /// `host:port` (port 4730 when left out), as written; resolved by each worker when it
    /// connects, so a name that resolves later (a server not up yet) is retried, not refused.
    pub servers: Vec<GearmanServer>,
    /// The function registered with CAN_DO (default: the pool's name).
    pub function: String,
    /// Each worker's client id is `<client_id>:<pool>:<pid>` (default: the host name).
    pub client_id: Option<String>,
    /// Sent as CAN_DO_TIMEOUT: gearmand itself takes back a job that runs longer and gives it
    /// to another worker (at least 1 s, in whole milliseconds: gearmand 1.1.20's unit).
    pub timeout: Option<Duration>,
    /// What a plugin error is sent as.
    pub failure: GearmanFailure,
}

/// One `servers` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GearmanServer {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for GearmanServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `[pool.gearman] failure`: clients tell the two apart, and not all of them handle both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GearmanFailure {
    /// `"fail"` (the default): WORK_FAIL, which every client understands; the plugin's
    /// message is only logged.
    Fail,
    /// `"exception"`: WORK_EXCEPTION with the plugin's message (gearmand passes it on to
    /// clients that asked for exceptions, and turns it into a failure for the others).
    Exception,
}

/// The Gearman protocol's default port.
pub const GEARMAN_PORT: u16 = 4730;
/// At most this many servers per pool (a worker holds a connection to each).
pub const MAX_GEARMAN_SERVERS: usize = 32;

/// The margin `claim_idle` must leave beyond `batch × job_timeout`: the master notices a redis
/// job past its time within a second (it watches the workers' scoreboards), and SIGKILLs its
/// worker 3 s after telling it to stop (KILL_GRACE); one more second for the takeover.
pub const CLAIM_IDLE_MARGIN: Duration = Duration::from_secs(5);

/// Why a config file was refused. Each displays as one line:
/// `FILE:LINE:COL: KEY: MESSAGE` (`KEY: ` left out when there is none), or `FILE: MESSAGE`
/// when the file could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8, a directory...).
    #[error("{}: cannot read the config file: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    /// Not valid TOML; `message` is the TOML parser's.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Valid TOML, but an unknown key, a wrong type, a bad value or a failed check.
    #[error("{}:{line}:{column}: {}{message}", file.display(), key_prefix(key))]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        /// Like `pool[1].workers`, `host.log_level`.
        key: Option<String>,
        message: String,
    },
}

fn key_prefix(key: &Option<String>) -> String {
    match key {
        Some(key) => format!("{key}: "),
        None => String::new(),
    }
}

impl ConfigError {
    /// `(line, column)`, 1-based, when the error is about a place in the file.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, column, .. }
            | ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
        }
    }

    /// The key the error is about, like `pool[0].workers`.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => key.as_deref(),
            _ => None,
        }
    }
}

impl Config {
    /// Reads, parses and validates the config file at `path`. Relative paths in it resolve
    /// against the folder of the file (after following symlinks); errors name `path` as given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_error = |error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        };
        let text = fs::read_to_string(path).map_err(read_error)?;
        let absolute = fs::canonicalize(path).map_err(read_error)?;
        parse_config(&text, path, absolute)
    }

    /// Parses and validates `text` as if it were the file at `path`: `path` is used in error
    /// messages and its parent folder for resolving relative paths. Still checks that each
    /// pool's plugin file exists in `plugins_dir`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let absolute = fs::canonicalize(path)
            .or_else(|_| std::path::absolute(path))
            .unwrap_or_else(|_| path.to_path_buf());
        parse_config(text, path, absolute)
    }
}

/// Where the admin socket of the config file at `path` is, read leniently — for a config that
/// does not load any more (edited since the master started), so that `jobhost reload` can still
/// ask the running master, which then says why the new config fails. Takes what it can from
/// the file (`host.runtime_dir`, `admin.socket`) and the defaults for the rest.
pub fn admin_socket_lenient(path: &Path) -> PathBuf {
    let absolute = fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf());
    let base = absolute.parent().unwrap_or(Path::new("/")).to_path_buf();
    let table = fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .unwrap_or_default();
    let get = |section: &str, key: &str| -> Option<String> {
        Some(table.get(section)?.get(key)?.as_str()?.to_owned())
    };
    let runtime = base.join(get("host", "runtime_dir").unwrap_or_else(|| "run".into()));
    runtime.join(get("admin", "socket").unwrap_or_else(|| "admin.sock".into()))
}

/// An engine a pool's workers take their jobs from themselves (none: the master feeds them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Redis,
    Gearman,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Redis => "redis",
            Engine::Gearman => "gearman",
        }
    }
}

impl PoolConfig {
    /// The engine its workers take jobs from; `None`: jobs come through the master.
    pub fn engine(&self) -> Option<Engine> {
        match (&self.redis, &self.gearman) {
            (Some(_), _) => Some(Engine::Redis),
            (None, Some(_)) => Some(Engine::Gearman),
            (None, None) => None,
        }
    }

    /// `plugins_dir/lib<plugin>.so`.
    pub fn plugin_path(&self, host: &HostConfig) -> PathBuf {
        host.plugins_dir.join(format!("lib{}.so", self.plugin))
    }

    /// `[pool.settings]` as TOML text, for the plugin's `init`.
    pub fn settings_toml(&self) -> String {
        // Checked to succeed when the config was parsed.
        toml::to_string(&self.settings).unwrap_or_else(|e| {
            log::error!("pool {}: cannot serialize [pool.settings]: {e}", self.name);
            String::new()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Durations and sizes

const DURATION_UNITS: &str = "ms, s, m, h or d";
const DURATION_EXAMPLES: &str = "e.g. \"500ms\", \"30s\", \"1h30m\"";

/// Parses a duration: one or more `<number><unit>` parts (`"500ms"`, `"30s"`, `"5m"`, `"1h"`,
/// `"1d"`, `"1h30m"`, `"1.5s"`), units `ms`, `s`, `m`, `h`, `d`; or `"0"`. A number without a
/// unit is refused (except 0), since it is ambiguous. The error message quotes the input.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: String| format!("invalid duration {s:?}: {why}");
    let text = s.trim();
    if text.is_empty() {
        return Err(bad(format!("empty ({DURATION_EXAMPLES})")));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return if text.bytes().all(|b| b == b'0') {
            Ok(Duration::ZERO)
        } else {
            Err(bad(format!(
                "missing unit (use {DURATION_UNITS}: \"{text}s\" is {text} seconds)"
            )))
        };
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let (number, after) = split_number(rest);
        if number.is_empty() {
            return Err(bad(format!(
                "expected a number at {rest:?} ({DURATION_EXAMPLES})"
            )));
        }
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let per_unit: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "" => {
                return Err(bad(format!(
                    "missing unit after {number} (use {DURATION_UNITS})"
                )))
            }
            other => {
                return Err(bad(format!(
                    "unknown unit {other:?} (use {DURATION_UNITS}; {DURATION_EXAMPLES})"
                )))
            }
        };
        let part = scale_decimal(number, per_unit).ok_or_else(|| bad("too large".to_string()))?;
        nanos = nanos
            .checked_add(part)
            .ok_or_else(|| bad("too large".to_string()))?;
        rest = after.trim_start();
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| bad("too large".to_string()))?;
    // The remainder is below 10^9, so it fits.
    let sub = (nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, sub))
}

const SIZE_UNITS: &str = "B, KB, MB, GB, TB, KiB, MiB, GiB or TiB";

/// Parses a size in bytes: `"4096"`, `"512KiB"`, `"16MiB"`, `"1.5GiB"`, `"100MB"`, `"256 MiB"`.
/// `KB`/`MB`/`GB`/`TB` are powers of 1000, `KiB`/`MiB`/`GiB`/`TiB` powers of 1024; units are
/// matched without regard to case; a fraction is rounded down to a whole byte. The error
/// message quotes the input.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = |why: String| format!("invalid size {s:?}: {why}");
    let text = s.trim();
    let (number, after) = split_number(text);
    if number.is_empty() {
        return Err(bad(format!(
            "expected a number of bytes, optionally followed by a unit ({SIZE_UNITS}), e.g. \"256MiB\""
        )));
    }
    let unit = after.trim_start();
    let per_unit: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(bad(format!("unknown unit {unit:?} (use {SIZE_UNITS})"))),
    };
    if per_unit == 1 && number.contains('.') {
        return Err(bad("a number of bytes must be whole".to_string()));
    }
    let bytes = scale_decimal(number, per_unit).ok_or_else(|| bad("too large".to_string()))?;
    u64::try_from(bytes).map_err(|_| bad("too large".to_string()))
}

/// Splits `"12.5MiB"` into `("12.5", "MiB")`. The number is digits with at most one `.`
/// followed by at least one digit; an empty number means there was none.
fn split_number(s: &str) -> (&str, &str) {
    let int_len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if int_len == 0 {
        return ("", s);
    }
    let after_int = &s[int_len..];
    if let Some(fraction) = after_int.strip_prefix('.') {
        let frac_len = fraction
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(fraction.len());
        if frac_len > 0 {
            return s.split_at(int_len + 1 + frac_len);
        }
    }
    s.split_at(int_len)
}

/// `number` (like `"1.5"`, from [`split_number`]) times `unit`, rounded down; None on overflow.
fn scale_decimal(number: &str, unit: u128) -> Option<u128> {
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let mut value: u128 = 0;
    for digit in int_part.bytes() {
        value = value
            .checked_mul(10)?
            .checked_add(u128::from(digit - b'0'))?;
    }
    let mut total = value.checked_mul(unit)?;
    // At most 18 fraction digits matter for units up to 10^14 ns or 2^40 bytes.
    let mut numerator: u128 = 0;
    let mut denominator: u128 = 1;
    for digit in frac_part.bytes().take(18) {
        numerator = numerator * 10 + u128::from(digit - b'0');
        denominator *= 10;
    }
    total = total.checked_add(numerator.checked_mul(unit)? / denominator)?;
    Some(total)
}

// ---------------------------------------------------------------------------------------------
// The raw schema, as serde sees it. Spanned where a later check needs the position.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    host: RawHost,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    pool: Vec<RawPool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table ([host])")]
struct RawHost {
    plugins_dir: Option<Spanned<String>>,
    runtime_dir: Option<Spanned<String>>,
    pidfile: Option<Spanned<String>>,
    log: Option<Spanned<String>>,
    log_level: Option<Level>,
    graceful_timeout: Option<Dur>,
    init_timeout: Option<Spanned<Dur>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    insecure_plugins_dir: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table ([server])")]
struct RawServer {
    socket: Option<Spanned<String>>,
    socket_mode: Option<Mode>,
    socket_group: Option<Spanned<GroupSpec>>,
    max_payload: Option<Spanned<Size>>,
    max_result: Option<Spanned<Size>>,
    max_memory: Option<Spanned<Size>>,
    read_timeout: Option<Spanned<Dur>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table ([admin])")]
struct RawAdmin {
    socket: Option<Spanned<String>>,
    socket_mode: Option<Mode>,
    socket_group: Option<Spanned<GroupSpec>>,
    tcp: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    allow_remote: Option<bool>,
    auth_timeout: Option<Spanned<Dur>>,
    idle_timeout: Option<Spanned<Dur>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table ([[pool]])")]
struct RawPool {
    name: Spanned<String>,
    plugin: Spanned<String>,
    workers: Option<Spanned<Int>>,
    mode: Option<RawMode>,
    max_queue: Option<Spanned<Int>>,
    max_attempts: Option<Spanned<Int>>,
    job_timeout: Option<Dur>,
    slow_job: Option<Dur>,
    idle_sleep: Option<Spanned<Dur>>,
    max_jobs: Option<Spanned<Int>>,
    max_lifetime: Option<Dur>,
    max_rss: Option<Size>,
    min_available_memory: Option<Size>,
    crash_limit: Option<Spanned<Int>>,
    crash_window: Option<Dur>,
    failing_retry: Option<Dur>,
    settings: Option<Spanned<toml::Table>>,
    source: Option<Spanned<RawSource>>,
    redis: Option<Spanned<RawRedis>>,
    gearman: Option<Spanned<RawGearman>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawSource {
    Socket,
    Redis,
    Gearman,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table ([pool.gearman])")]
struct RawGearman {
    servers: Option<Spanned<Vec<Spanned<String>>>>,
    function: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    timeout: Option<Spanned<Dur>>,
    failure: Option<RawFailure>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawFailure {
    Fail,
    Exception,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table ([pool.redis])")]
struct RawRedis {
    url: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    stream: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    claim_idle: Option<Spanned<Dur>>,
    dead_letter: Option<Spanned<String>>,
    results: Option<Spanned<String>>,
    batch: Option<Spanned<Int>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawMode {
    Jobs,
    Loop,
}

/// A TOML integer, with a message that does not talk about Rust types.
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                i64::try_from(v)
                    .map(Int)
                    .map_err(|_| E::custom("number too large"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration: a string for [`parse_duration`] or a whole number of seconds.
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a duration like \"30s\", \"500ms\", \"1h30m\", or a whole number of seconds",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(|secs| Dur(Duration::from_secs(secs)))
                    .map_err(|_| E::custom(format!("invalid duration {v}: must not be negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur(Duration::from_secs(v)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size in bytes: a string for [`parse_size`] or a whole number of bytes.
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size like \"256MiB\", \"100MB\", or a whole number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A Unix file mode, given as an octal string (`"0660"`, `"660"`, `"0o660"`).
struct Mode(u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Mode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an octal mode string like \"0660\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mode, E> {
                let digits = v.strip_prefix("0o").unwrap_or(v);
                let ok = !digits.is_empty()
                    && digits.len() <= 4
                    && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
                match u32::from_str_radix(digits, 8) {
                    Ok(mode) if ok && mode <= 0o777 => Ok(Mode(mode)),
                    _ => Err(E::custom(format!(
                        "invalid mode {v:?}: expected octal permission bits from \"0000\" to \"0777\", like \"0660\""
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mode, E> {
                Err(E::custom(format!(
                    "invalid mode {v}: write the mode as an octal string, like \"0660\" (a TOML number loses its base)"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A group: a name (`"jobs"`), or a numeric gid as a string (`"1001"`) or a number (`1001`).
enum GroupSpec {
    Name(String),
    Gid(u32),
}

impl<'de> Deserialize<'de> for GroupSpec {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = GroupSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a group name like \"jobs\" or a numeric gid")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GroupSpec, E> {
                if v.is_empty() {
                    return Err(E::custom("must not be empty"));
                }
                if v.bytes().all(|b| b.is_ascii_digit()) {
                    return self.visit_u64(
                        v.parse()
                            .map_err(|_| E::custom(format!("invalid gid {v}: too large")))?,
                    );
                }
                Ok(GroupSpec::Name(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<GroupSpec, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("invalid gid {v}: must not be negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GroupSpec, E> {
                // (gid_t)-1 means "unchanged" to chown: not a group.
                match u32::try_from(v) {
                    Ok(gid) if gid != u32::MAX => Ok(GroupSpec::Gid(gid)),
                    _ => Err(E::custom(format!("invalid gid {v}: too large"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A log level name.
struct Level(log::LevelFilter);

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Level;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a log level: off, error, warn, info, debug or trace")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Level, E> {
                v.parse().map(Level).map_err(|_| {
                    E::custom(format!(
                        "invalid log level {v:?}: use off, error, warn, info, debug or trace"
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing and validation

const MAX_WORKERS: i64 = 1024;
const MAX_PAYLOAD_LIMIT: u64 = 1 << 30;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The text being parsed and the name to put in messages.
struct Source<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Source<'_> {
    fn error(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line,
            column,
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn parse_config(text: &str, file: &Path, absolute: PathBuf) -> Result<Config, ConfigError> {
    let src = Source { text, file };
    let deserializer = toml::Deserializer::parse(text).map_err(|e| {
        let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
        ConfigError::Syntax {
            file: file.to_path_buf(),
            line,
            column,
            message: one_line(e.message()),
        }
    })?;
    let raw: RawConfig =
        serde_path_to_error::deserialize(deserializer).map_err(|e| serde_error(&src, e))?;
    let base = absolute
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    build(&src, raw, &base, absolute)
}

fn one_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Turns a serde error (with its path and toml's span) into a positioned [`ConfigError`].
fn serde_error(src: &Source, error: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let mut key = key_path(error.path());
    let inner = error.into_inner();
    let (line, column) = line_column(src.text, inner.span().map_or(0, |s| s.start));
    let raw = one_line(inner.message());
    let message = if let Some(rest) = raw.strip_prefix("unknown field `") {
        // "unknown field `workrs`, expected one of `name`, `plugin`, ..." (the path ends
        // with the unknown key already).
        let (unknown, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        unknown_key_message(unknown, &known)
    } else if let Some(rest) = raw.strip_prefix("missing field `") {
        let missing = rest.trim_end_matches('`');
        key = Some(match key {
            Some(parent) => format!("{parent}.{missing}"),
            None => missing.to_string(),
        });
        "required key is missing".to_string()
    } else {
        raw
    };
    ConfigError::Invalid {
        file: src.file.to_path_buf(),
        line,
        column,
        key,
        message,
    }
}

fn unknown_key_message(unknown: &str, known: &[&str]) -> String {
    let mut message = match known {
        [] => "unknown key; this table takes no keys".to_string(),
        [one] => format!("unknown key, expected {one}"),
        _ => format!("unknown key, expected one of {}", known.join(", ")),
    };
    if let Some(close) = known
        .iter()
        .filter(|k| edit_distance(unknown, k) <= 2)
        .min_by_key(|k| edit_distance(unknown, k))
    {
        let _ = write!(message, " (did you mean {close}?)");
    }
    message
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}

/// `pool[1].settings.x`, leaving out toml's internal Spanned fields.
fn key_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } if key.starts_with("$__serde_spanned_private") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                if !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    out.push_str(key);
                } else {
                    let _ = write!(out, "{key:?}");
                }
            }
            Segment::Unknown => {}
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A non-empty path string, resolved against `base` when relative.
fn resolve(
    src: &Source,
    value: Option<Spanned<String>>,
    key: &str,
    default: &str,
    base: &Path,
) -> Result<PathBuf, ConfigError> {
    match value {
        None => Ok(base.join(default)),
        Some(v) if v.get_ref().is_empty() => Err(src.error(v.span(), key, "must not be empty")),
        Some(v) => Ok(base.join(v.into_inner())),
    }
}

fn socket_path(
    src: &Source,
    value: Option<Spanned<String>>,
    key: &str,
    default: &str,
    runtime_dir: &Path,
) -> Result<PathBuf, ConfigError> {
    let span = value.as_ref().map_or(0..0, Spanned::span);
    let path = resolve(src, value, key, default, runtime_dir)?;
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(src.error(
            span,
            key,
            format!(
                "socket path {} is {len} bytes long; Unix socket paths may have at most {MAX_SOCKET_PATH} (use a shorter runtime_dir or socket name)",
                path.display()
            ),
        ));
    }
    Ok(path)
}

fn non_empty(
    src: &Source,
    value: Option<Spanned<String>>,
    key: &str,
) -> Result<Option<String>, ConfigError> {
    match value {
        Some(v) if v.get_ref().is_empty() => Err(src.error(v.span(), key, "must not be empty")),
        v => Ok(v.map(Spanned::into_inner)),
    }
}

/// An integer key in `min..=max`, or `default` when absent.
/// The shortest `idle_sleep`.
const MIN_IDLE_SLEEP: Duration = Duration::from_millis(10);

fn int_in(
    src: &Source,
    value: Option<Spanned<Int>>,
    key: &str,
    min: i64,
    max: i64,
    default: i64,
) -> Result<i64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => {
            let n = v.get_ref().0;
            if (min..=max).contains(&n) {
                Ok(n)
            } else if max == i64::MAX {
                Err(src.error(v.span(), key, format!("must be at least {min}, got {n}")))
            } else {
                Err(src.error(
                    v.span(),
                    key,
                    format!("must be between {min} and {max}, got {n}"),
                ))
            }
        }
    }
}

/// Resolves a `socket_group` value: a name through the group database, a gid as it is (chown
/// takes any gid).
fn socket_group(
    src: &Source,
    value: Option<Spanned<GroupSpec>>,
    key: &str,
) -> Result<Option<SocketGroup>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let span = value.span();
    match value.into_inner() {
        GroupSpec::Gid(gid) => Ok(Some(SocketGroup {
            name: gid.to_string(),
            gid,
        })),
        GroupSpec::Name(name) => match nix::unistd::Group::from_name(&name) {
            Ok(Some(group)) => Ok(Some(SocketGroup {
                name,
                gid: group.gid.as_raw(),
            })),
            Ok(None) => Err(src.error(
                span,
                key,
                format!("no group {name:?} on this system (give a group name from /etc/group or a numeric gid)"),
            )),
            Err(e) => Err(src.error(
                span,
                key,
                format!("cannot look up group {name:?}: {e}"),
            )),
        },
    }
}

fn nonzero<T: PartialEq + Default>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

fn build(src: &Source, raw: RawConfig, base: &Path, path: PathBuf) -> Result<Config, ConfigError> {
    // [host]
    let h = raw.host;
    let plugins_dir = resolve(src, h.plugins_dir, "host.plugins_dir", "plugins", base)?;
    let runtime_dir = resolve(src, h.runtime_dir, "host.runtime_dir", "run", base)?;
    let pidfile = resolve(src, h.pidfile, "host.pidfile", "jobhost.pid", &runtime_dir)?;
    let log = match h.log {
        None => LogTarget::Stderr,
        Some(v) => match v.get_ref().as_str() {
            "stderr" => LogTarget::Stderr,
            "syslog" => LogTarget::Syslog,
            "" => {
                return Err(src.error(
                    v.span(),
                    "host.log",
                    "must not be empty: use \"stderr\", \"syslog\" or a file path",
                ))
            }
            file => LogTarget::File(base.join(file)),
        },
    };
    let init_timeout = match h.init_timeout {
        None => Duration::from_secs(60),
        Some(v) if v.get_ref().0.is_zero() => {
            return Err(src.error(v.span(), "host.init_timeout", "must be longer than 0"));
        }
        Some(v) => v.into_inner().0,
    };
    let host = HostConfig {
        plugins_dir,
        runtime_dir,
        pidfile,
        log,
        log_level: h.log_level.map_or(log::LevelFilter::Info, |l| l.0),
        graceful_timeout: h.graceful_timeout.map_or(Duration::from_secs(30), |d| d.0),
        init_timeout,
        user: non_empty(src, h.user, "host.user")?,
        group: non_empty(src, h.group, "host.group")?,
        insecure_plugins_dir: h.insecure_plugins_dir.unwrap_or(false),
    };

    // [server]
    let s = raw.server;
    let server_socket_span = s.socket.as_ref().map(Spanned::span);
    // A payload or a result: 1 byte ..= 1 GiB, default 16 MiB.
    let frame_size = |v: Option<Spanned<Size>>, key: &str| match v {
        None => Ok(16 << 20),
        Some(v) => {
            let n = v.get_ref().0;
            if !(1..=MAX_PAYLOAD_LIMIT).contains(&n) {
                return Err(src.error(
                    v.span(),
                    key,
                    format!("must be between 1 byte and 1GiB, got {n} bytes"),
                ));
            }
            Ok(n)
        }
    };
    let max_payload = frame_size(s.max_payload, "server.max_payload")?;
    let max_result = frame_size(s.max_result, "server.max_result")?;
    // Room for two whole frames at once, so that one client finishing a frame over its fair
    // share never has to wait for another's.
    let min_memory = 2 * max_payload + 2 * 1035;
    let max_memory = match s.max_memory {
        None => (256 << 20).max(min_memory),
        Some(v) => {
            let n = v.get_ref().0;
            if n < min_memory {
                return Err(src.error(
                    v.span(),
                    "server.max_memory",
                    format!("must be at least twice max_payload plus 2070 bytes ({min_memory} bytes), got {n} bytes"),
                ));
            }
            n
        }
    };
    let read_timeout = match s.read_timeout {
        None => Duration::from_secs(30),
        Some(d) if d.get_ref().0 < Duration::from_millis(1) => {
            return Err(src.error(
                d.span(),
                "server.read_timeout",
                format!("must be at least 1ms, got {:?}", d.get_ref().0),
            ))
        }
        Some(d) => d.into_inner().0,
    };
    let server = ServerConfig {
        socket: socket_path(
            src,
            s.socket,
            "server.socket",
            "jobs.sock",
            &host.runtime_dir,
        )?,
        socket_mode: s.socket_mode.map_or(0o660, |m| m.0),
        socket_group: socket_group(src, s.socket_group, "server.socket_group")?,
        max_payload,
        max_result,
        max_memory,
        read_timeout,
    };

    // [admin]
    let a = raw.admin;
    let admin_socket_span = a.socket.as_ref().map(Spanned::span);
    let admin_socket = socket_path(
        src,
        a.socket,
        "admin.socket",
        "admin.sock",
        &host.runtime_dir,
    )?;
    if admin_socket == server.socket {
        let span = admin_socket_span.or(server_socket_span).unwrap_or(0..0);
        return Err(src.error(
            span,
            "admin.socket",
            format!(
                "{} is also server.socket; the two sockets need different paths",
                admin_socket.display()
            ),
        ));
    }
    let allow_remote = a.allow_remote.unwrap_or(false);
    let token_file = match a.token_file {
        None => None,
        Some(v) if v.get_ref().is_empty() => {
            return Err(src.error(v.span(), "admin.token_file", "must not be empty"))
        }
        Some(v) => Some(base.join(v.into_inner())),
    };
    // admin.tcp and admin.http: the same rules (a token; loopback unless allow_remote).
    let listener = |v: Option<Spanned<String>>,
                    key: &str,
                    name: &str,
                    why: &str|
     -> Result<Option<SocketAddr>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let addr: SocketAddr = v.get_ref().parse().map_err(|_| {
            src.error(
                v.span(),
                key,
                format!(
                    "invalid address {:?}: expected IP:PORT, like \"127.0.0.1:7070\" or \"[::1]:7070\" (host names are not resolved)",
                    v.get_ref()
                ),
            )
        })?;
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(src.error(
                v.span(),
                key,
                format!(
                    "{addr} is not a loopback address; {why}, so listening beyond this machine needs admin.allow_remote = true"
                ),
            ));
        }
        if token_file.is_none() {
            return Err(src.error(
                v.span(),
                key,
                format!(
                    "{name} needs admin.token_file (a file holding the token clients must send)"
                ),
            ));
        }
        Ok(Some(addr))
    };
    let tcp = listener(
        a.tcp,
        "admin.tcp",
        "a TCP admin listener",
        "the admin port can stop and reconfigure the host",
    )?;
    let http_span = a.http.as_ref().map(|v| v.span());
    let http = listener(
        a.http,
        "admin.http",
        "an HTTP listener",
        "the HTTP listener shows the host's pools, workers and figures",
    )?;
    if let (Some(t), Some(h), Some(span)) = (tcp, http, http_span) {
        if t == h && t.port() != 0 {
            return Err(src.error(
                span,
                "admin.http",
                format!("{h} is also admin.tcp; the two listeners need different ports"),
            ));
        }
    }
    let admin_group = socket_group(src, a.socket_group, "admin.socket_group")?;
    // With a group, the socket is for that group: 0660 unless socket_mode says otherwise.
    let admin_mode = match (&a.socket_mode, &admin_group) {
        (Some(m), _) => m.0,
        (None, Some(_)) => 0o660,
        (None, None) => 0o600,
    };
    // Zero would close every session before its first line: refused, not taken as "never".
    let admin_timeout = |v: Option<Spanned<Dur>>, key: &str, default: Duration| match v {
        None => Ok(default),
        Some(v) if v.get_ref().0.is_zero() => Err(src.error(
            v.span(),
            key,
            "must be longer than 0 (sessions would be closed before their first line)",
        )),
        Some(v) => Ok(v.into_inner().0),
    };
    let auth_timeout = admin_timeout(
        a.auth_timeout,
        "admin.auth_timeout",
        Duration::from_secs(10),
    )?;
    let idle_timeout = admin_timeout(
        a.idle_timeout,
        "admin.idle_timeout",
        Duration::from_secs(600),
    )?;
    let admin = AdminConfig {
        socket: admin_socket,
        socket_mode: admin_mode,
        socket_group: admin_group,
        tcp,
        http,
        token_file,
        allow_remote,
        auth_timeout,
        idle_timeout,
    };

    // [[pool]]
    if raw.pool.is_empty() {
        return Err(src.error(
            0..0,
            "pool",
            "no pools: add at least one [[pool]] with a name and a plugin",
        ));
    }
    let mut pools: Vec<PoolConfig> = Vec::with_capacity(raw.pool.len());
    for (i, p) in raw.pool.into_iter().enumerate() {
        pools.push(build_pool(src, i, p, &pools, &host.plugins_dir, base)?);
    }

    Ok(Config {
        path,
        host,
        server,
        admin,
        pools,
    })
}

fn build_pool(
    src: &Source,
    i: usize,
    p: RawPool,
    earlier: &[PoolConfig],
    plugins_dir: &Path,
    base: &Path,
) -> Result<PoolConfig, ConfigError> {
    let key = |k: &str| format!("pool[{i}].{k}");

    let name = p.name.get_ref();
    if name.is_empty() {
        return Err(src.error(p.name.span(), key("name"), "must not be empty"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(src.error(
            p.name.span(),
            key("name"),
            format!("invalid pool name {name:?}: {bad:?} is not allowed (use letters, digits, '_', '.', '-')"),
        ));
    }
    let (line, _) = line_column(src.text, p.name.span().start);
    if let Some(first) = earlier.iter().find(|e| e.name == *name) {
        return Err(src.error(
            p.name.span(),
            key("name"),
            format!(
                "duplicate pool name {name:?} (first defined at line {})",
                first.line
            ),
        ));
    }

    let plugin = p.plugin.get_ref();
    if plugin.is_empty() {
        return Err(src.error(p.plugin.span(), key("plugin"), "must not be empty"));
    }
    if let Some(bad) = plugin
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        return Err(src.error(
            p.plugin.span(),
            key("plugin"),
            format!(
                "invalid plugin name {plugin:?}: {bad:?} is not allowed (use letters, digits, '_', '-'; the file is {}/lib<plugin>.so)",
                plugins_dir.display()
            ),
        ));
    }
    check_plugin_exists(plugins_dir, plugin)
        .map_err(|message| src.error(p.plugin.span(), key("plugin"), message))?;

    let settings = match p.settings {
        None => toml::Table::new(),
        Some(v) => {
            if let Err(e) = toml::to_string(v.get_ref()) {
                return Err(src.error(
                    v.span(),
                    key("settings"),
                    format!("cannot be handed to the plugin as TOML: {e}"),
                ));
            }
            v.into_inner()
        }
    };

    // Range checks keep every value within its field's type.
    let workers = int_in(src, p.workers, &key("workers"), 0, MAX_WORKERS, 1)? as usize;
    let usize_max = i64::try_from(usize::MAX).unwrap_or(i64::MAX);
    let max_queue = int_in(src, p.max_queue, &key("max_queue"), 1, usize_max, 100_000)? as usize;
    let max_attempts = int_in(
        src,
        p.max_attempts,
        &key("max_attempts"),
        1,
        i64::from(u32::MAX),
        3,
    )? as u32;
    let max_jobs = int_in(src, p.max_jobs, &key("max_jobs"), 0, i64::MAX, 0)? as u64;
    let crash_limit = int_in(src, p.crash_limit, &key("crash_limit"), 1, 1_000_000, 10)? as u32;
    let idle_sleep = match p.idle_sleep {
        None => Duration::from_secs(1),
        // A loop-mode worker sleeps this long whenever its plugin says Idle: under 10 ms it
        // would poll its source in a busy loop.
        Some(d) if d.get_ref().0 < MIN_IDLE_SLEEP => {
            return Err(src.error(
                d.span(),
                key("idle_sleep"),
                format!(
                    "must be at least {MIN_IDLE_SLEEP:?}, got {:?}",
                    d.get_ref().0
                ),
            ))
        }
        Some(d) => d.into_inner().0,
    };

    let mode = match p.mode {
        None | Some(RawMode::Jobs) => PoolMode::Jobs,
        Some(RawMode::Loop) => PoolMode::Loop,
    };
    let job_timeout = nonzero(p.job_timeout.map_or(Duration::from_secs(60), |d| d.0));
    let source = p.source.as_ref().map(|s| (*s.get_ref(), s.span()));
    let external = |what: &str, from: &str| {
        if mode == PoolMode::Loop {
            Some(format!(
                "a {what} pool takes its work from {from}; mode = \"loop\" cannot go with it"
            ))
        } else {
            None
        }
    };
    let (redis, gearman) = match (source, p.redis, p.gearman) {
        (_, Some(r), Some(_)) => {
            return Err(src.error(
                r.span(),
                key("redis"),
                "a pool has one source: [pool.redis] and [pool.gearman] cannot both be there",
            ))
        }
        (None | Some((RawSource::Socket, _)), None, None) => (None, None),
        (None | Some((RawSource::Socket, _)) | Some((RawSource::Gearman, _)), Some(r), None) => {
            return Err(src.error(
                r.span(),
                key("redis"),
                "a [pool.redis] table needs source = \"redis\" in its pool",
            ))
        }
        (None | Some((RawSource::Socket, _)) | Some((RawSource::Redis, _)), None, Some(g)) => {
            return Err(src.error(
                g.span(),
                key("gearman"),
                "a [pool.gearman] table needs source = \"gearman\" in its pool",
            ))
        }
        (Some((RawSource::Redis, span)), None, None) => {
            return Err(src.error(
                span,
                key("source"),
                "source = \"redis\" needs a [pool.redis] table with at least url and stream",
            ))
        }
        (Some((RawSource::Gearman, span)), None, None) => {
            return Err(src.error(
                span,
                key("source"),
                "source = \"gearman\" needs a [pool.gearman] table with at least servers",
            ))
        }
        (Some((RawSource::Redis, span)), Some(r), None) => {
            if let Some(message) = external("redis", "the stream") {
                return Err(src.error(span, key("source"), message));
            }
            let Some(job_timeout) = job_timeout else {
                return Err(src.error(
                    span,
                    key("source"),
                    "a redis pool needs a job_timeout (not 0): without one, no claim_idle is long enough to tell a dead consumer from a slow one",
                ));
            };
            (Some(build_redis(src, i, r, job_timeout, base)?), None)
        }
        (Some((RawSource::Gearman, span)), None, Some(g)) => {
            if let Some(message) = external("gearman", "gearmand") {
                return Err(src.error(span, key("source"), message));
            }
            (None, Some(build_gearman(src, i, g, p.name.get_ref())?))
        }
    };

    Ok(PoolConfig {
        name: p.name.into_inner(),
        plugin: p.plugin.into_inner(),
        workers,
        mode,
        max_queue,
        max_attempts,
        job_timeout,
        slow_job: p.slow_job.and_then(|d| nonzero(d.0)),
        idle_sleep,
        max_jobs: nonzero(max_jobs),
        max_lifetime: p.max_lifetime.and_then(|d| nonzero(d.0)),
        max_rss: p.max_rss.and_then(|s| nonzero(s.0)),
        min_available_memory: p.min_available_memory.and_then(|s| nonzero(s.0)),
        crash_limit,
        crash_window: p.crash_window.map_or(Duration::from_secs(60), |d| d.0),
        failing_retry: p.failing_retry.map_or(Duration::from_secs(30), |d| d.0),
        settings,
        redis,
        gearman,
        line,
    })
}

/// Stream, group and consumer names: printable, no spaces (they are shown in logs and typed
/// into redis-cli).
fn redis_name(
    src: &Source,
    value: Option<Spanned<String>>,
    key: &str,
) -> Result<Option<String>, ConfigError> {
    let Some(v) = value else { return Ok(None) };
    let name = v.get_ref();
    if name.is_empty() {
        return Err(src.error(v.span(), key, "must not be empty"));
    }
    if let Some(bad) = name.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(src.error(
            v.span(),
            key,
            format!("{name:?}: {bad:?} is not allowed in a Redis key or group name here"),
        ));
    }
    Ok(Some(v.into_inner()))
}

/// Reads a file that holds a secret, refusing one that its group or others may read or write
/// (checked with `fstat` on the descriptor the text is read from).
fn read_private(file: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", file.display());
    // O_NONBLOCK: a FIFO put there must not hang the start (it is refused below).
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits())
        .open(file)
        .map_err(cannot)?;
    let meta = f.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", file.display()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is open to its group or others (mode {mode:04o}): it holds a password; chmod 600 it",
            file.display()
        ));
    }
    let mut text = String::new();
    f.take(64 << 10).read_to_string(&mut text).map_err(cannot)?;
    Ok(text)
}

/// `url` as the `redis` crate takes it, and as it may be shown (password hidden).
fn redis_url(text: &str) -> Result<(String, String), String> {
    let url = if text.starts_with('/') {
        format!("unix://{text}")
    } else if text.starts_with("redis://")
        || text.starts_with("redis+unix://")
        || text.starts_with("unix://")
    {
        text.to_string()
    } else if text.starts_with("rediss://") {
        return Err("TLS (rediss://) is not supported by this build".into());
    } else {
        return Err(format!(
            "{text:?} is not a Redis address: use redis://HOST:PORT/DB, redis+unix:///PATH, unix:///PATH?db=N or an absolute socket path"
        ));
    };
    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
        .map_err(|e| format!("invalid Redis URL: {e}"))?;
    let shown = match info.redis_settings().password() {
        Some(password) if !password.is_empty() => url.replacen(password, "***", 1),
        _ => url.clone(),
    };
    Ok((url, shown))
}

fn build_redis(
    src: &Source,
    i: usize,
    r: Spanned<RawRedis>,
    job_timeout: Duration,
    base: &Path,
) -> Result<RedisConfig, ConfigError> {
    let key = |k: &str| format!("pool[{i}].redis.{k}");
    let table_span = r.span();
    let r = r.into_inner();
    let Some(url_value) = r.url else {
        return Err(src.error(table_span, key("url"), "required key is missing"));
    };
    let (url, shown_url) = redis_url(url_value.get_ref())
        .map_err(|message| src.error(url_value.span(), key("url"), message))?;
    let password = match r.password_file {
        None => None,
        Some(v) if v.get_ref().is_empty() => {
            return Err(src.error(v.span(), key("password_file"), "must not be empty"))
        }
        Some(v) => {
            let file = base.join(v.get_ref());
            let text = read_private(&file)
                .map_err(|message| src.error(v.span(), key("password_file"), message))?;
            let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
            if line.is_empty() {
                return Err(src.error(
                    v.span(),
                    key("password_file"),
                    format!(
                        "{} is empty: its first line is the password",
                        file.display()
                    ),
                ));
            }
            Some(line.to_string())
        }
    };
    let Some(stream) = redis_name(src, r.stream, &key("stream"))? else {
        return Err(src.error(table_span, key("stream"), "required key is missing"));
    };
    let group = redis_name(src, r.group, &key("group"))?.unwrap_or_else(|| "jobhost".into());
    let dead_letter = redis_name(src, r.dead_letter, &key("dead_letter"))?
        .unwrap_or_else(|| format!("{stream}:dead"));
    if dead_letter == stream {
        return Err(src.error(
            table_span,
            key("dead_letter"),
            "must not be the stream itself (dead entries would be read again)",
        ));
    }
    let results = redis_name(src, r.results, &key("results"))?;
    if results.as_deref() == Some(stream.as_str()) {
        return Err(src.error(
            table_span,
            key("results"),
            "must not be the stream itself (results would be read as jobs)",
        ));
    }
    let batch = int_in(src, r.batch, &key("batch"), 1, 1000, 1)? as usize;
    // The longest a live worker may hold an entry: it may wait behind batch - 1 others, each
    // running up to job_timeout, and then run up to job_timeout itself.
    let longest_hold = job_timeout.saturating_mul(batch as u32);
    let claim_idle = match r.claim_idle {
        None => longest_hold.saturating_mul(2).max(Duration::from_secs(60)),
        Some(v) => {
            let d = v.get_ref().0;
            if d <= longest_hold + CLAIM_IDLE_MARGIN {
                return Err(src.error(
                    v.span(),
                    key("claim_idle"),
                    format!(
                        "{d:?} is too short: a live worker may hold an entry for batch × job_timeout = {batch} × {job_timeout:?} = {longest_hold:?}, and an entry idle for less than that may still be worked on; claiming it then would have two workers on one entry (make it more than {:?}: that plus {CLAIM_IDLE_MARGIN:?} for the master to notice an overrunning job and kill its worker)",
                        longest_hold + CLAIM_IDLE_MARGIN
                    ),
                ));
            }
            d
        }
    };
    Ok(RedisConfig {
        url,
        shown_url,
        password,
        stream,
        group,
        claim_idle,
        dead_letter,
        results,
        batch,
    })
}

/// A name sent to gearmand (a function, a client id): printable, no spaces (gearmand's text
/// admin protocol, which `gearadmin` reads, separates fields with spaces and tabs).
fn gearman_name(src: &Source, v: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
    let name = v.get_ref();
    if name.is_empty() {
        return Err(src.error(v.span(), key, "must not be empty"));
    }
    if name.len() > 255 {
        return Err(src.error(
            v.span(),
            key,
            format!("is {} bytes long; at most 255", name.len()),
        ));
    }
    if let Some(bad) = name.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(src.error(
            v.span(),
            key,
            format!("{name:?}: {bad:?} is not allowed in a Gearman name"),
        ));
    }
    Ok(())
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn gearman_server(text: &str) -> Result<GearmanServer, String> {
    let bad = || format!("{text:?} is not a server address: use HOST, HOST:PORT or [IPv6]:PORT");
    if text.contains("://") {
        return Err(bad());
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else if text.matches(':').count() > 1 {
        return Err(format!(
            "{text:?}: write an IPv6 address in brackets, as [{text}]:PORT"
        ));
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')))
    {
        return Err(bad());
    }
    let port = match port {
        None => GEARMAN_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => {
                return Err(format!(
                    "{text:?}: the port must be a number from 1 to 65535"
                ))
            }
        },
    };
    Ok(GearmanServer {
        host: host.to_string(),
        port,
    })
}

fn build_gearman(
    src: &Source,
    i: usize,
    g: Spanned<RawGearman>,
    pool: &str,
) -> Result<GearmanConfig, ConfigError> {
    let key = |k: &str| format!("pool[{i}].gearman.{k}");
    let table_span = g.span();
    let g = g.into_inner();
    let Some(list) = g.servers else {
        return Err(src.error(table_span, key("servers"), "required key is missing"));
    };
    let list_span = list.span();
    let list = list.into_inner();
    if list.is_empty() {
        return Err(src.error(list_span, key("servers"), "must name at least one server"));
    }
    if list.len() > MAX_GEARMAN_SERVERS {
        return Err(src.error(
            list_span,
            key("servers"),
            format!("{} servers; at most {MAX_GEARMAN_SERVERS}", list.len()),
        ));
    }
    let mut servers: Vec<GearmanServer> = Vec::with_capacity(list.len());
    for v in &list {
        let server = gearman_server(v.get_ref())
            .map_err(|message| src.error(v.span(), key("servers"), message))?;
        if servers.contains(&server) {
            return Err(src.error(
                v.span(),
                key("servers"),
                format!("{server} is listed twice"),
            ));
        }
        servers.push(server);
    }
    let function = match g.function {
        None => pool.to_string(),
        Some(v) => {
            gearman_name(src, &v, &key("function"))?;
            v.into_inner()
        }
    };
    let client_id = match g.client_id {
        None => None,
        Some(v) => {
            gearman_name(src, &v, &key("client_id"))?;
            Some(v.into_inner())
        }
    };
    let timeout = match g.timeout {
        None => None,
        Some(v) => {
            let d = v.get_ref().0;
            // gearmand 1.1.20 reads CAN_DO_TIMEOUT as milliseconds and raises 1..=999 to 1 s.
            if d < Duration::from_secs(1)
                || d.subsec_nanos() % 1_000_000 != 0
                || d.as_millis() > u128::from(u32::MAX)
            {
                return Err(src.error(
                    v.span(),
                    key("timeout"),
                    format!(
                        "must be at least 1s and under 49 days, in whole milliseconds: got {d:?}"
                    ),
                ));
            }
            Some(d)
        }
    };
    let failure = match g.failure {
        None | Some(RawFailure::Fail) => GearmanFailure::Fail,
        Some(RawFailure::Exception) => GearmanFailure::Exception,
    };
    Ok(GearmanConfig {
        servers,
        function,
        client_id,
        timeout,
        failure,
    })
}

/// Ok if `plugins_dir/lib<plugin>.so` is a file; else a message saying what is there instead.
fn check_plugin_exists(plugins_dir: &Path, plugin: &str) -> Result<(), String> {
    let file = plugins_dir.join(format!("lib{plugin}.so"));
    match fs::metadata(&file) {
        Ok(meta) if meta.is_file() => return Ok(()),
        Ok(_) => {
            return Err(format!(
                "no plugin {plugin:?}: {} is not a regular file",
                file.display()
            ))
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(format!(
                "no plugin {plugin:?}: cannot read {}: {e}",
                file.display()
            ))
        }
        Err(_) => {}
    }
    let entries = match fs::read_dir(plugins_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "no plugin {plugin:?}: the plugins directory {} does not exist (see host.plugins_dir)",
                plugins_dir.display()
            ))
        }
        Err(e) => {
            return Err(format!(
                "no plugin {plugin:?}: cannot list the plugins directory {}: {e} (see host.plugins_dir)",
                plugins_dir.display()
            ))
        }
    };
    let mut available: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let stem = name.strip_prefix("lib")?.strip_suffix(".so")?;
            (!stem.is_empty()).then(|| stem.to_string())
        })
        .collect();
    available.sort();
    available.dedup();
    let listing = if available.is_empty() {
        "none (no lib*.so files there)".to_string()
    } else {
        available.join(", ")
    };
    Err(format!(
        "no plugin {plugin:?} in {} (there is no {}); available: {listing}",
        plugins_dir.display(),
        file.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temp folder with `plugins/libecho.so`, `libhash.so`, `libsleep.so` (empty files) and a
    /// config written into it.
    struct Env {
        dir: tempfile::TempDir,
    }

    impl Env {
        fn new() -> Env {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir(dir.path().join("plugins")).unwrap();
            for name in ["echo", "hash", "sleep"] {
                fs::write(dir.path().join(format!("plugins/lib{name}.so")), b"").unwrap();
            }
            // Not plugins: must not be listed.
            fs::write(dir.path().join("plugins/README.txt"), b"").unwrap();
            fs::write(dir.path().join("plugins/libnotes.so.txt"), b"").unwrap();
            Env { dir }
        }

        fn file(&self) -> PathBuf {
            self.dir.path().join("jobhost.toml")
        }

        fn parse(&self, text: &str) -> Result<Config, ConfigError> {
            Config::parse(text, &self.file())
        }

        fn ok(&self, text: &str) -> Config {
            match self.parse(text) {
                Ok(config) => config,
                Err(e) => panic!("expected ok, got: {e}"),
            }
        }

        /// The error's Display, which must start with `FILE:LINE:` and contain `needle`.
        fn err(&self, text: &str, line: usize, needle: &str) -> ConfigError {
            let e = match self.parse(text) {
                Ok(_) => panic!("expected an error containing {needle:?}"),
                Err(e) => e,
            };
            let shown = e.to_string();
            let prefix = format!("{}:{line}:", self.file().display());
            assert!(
                shown.starts_with(&prefix),
                "want prefix {prefix:?}, got: {shown}"
            );
            assert!(shown.contains(needle), "want {needle:?} in: {shown}");
            assert!(!shown.contains('\n'), "not one line: {shown}");
            e
        }
    }

    const POOL: &str = "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n";

    #[test]
    fn defaults_from_a_minimal_config() {
        let env = Env::new();
        let c = env.ok(POOL);
        let dir = fs::canonicalize(env.dir.path()).unwrap();
        assert_eq!(c.path, dir.join("jobhost.toml"));
        assert_eq!(c.host.plugins_dir, dir.join("plugins"));
        assert_eq!(c.host.runtime_dir, dir.join("run"));
        assert_eq!(c.host.pidfile, dir.join("run/jobhost.pid"));
        assert_eq!(c.host.log, LogTarget::Stderr);
        assert_eq!(c.host.log_level, log::LevelFilter::Info);
        assert_eq!(c.host.graceful_timeout, Duration::from_secs(30));
        assert_eq!(c.host.init_timeout, Duration::from_secs(60));
        assert_eq!(c.host.user, None);
        assert_eq!(c.host.group, None);
        assert!(!c.host.insecure_plugins_dir);
        assert_eq!(c.server.socket, dir.join("run/jobs.sock"));
        assert_eq!(c.server.socket_mode, 0o660);
        assert_eq!(c.server.max_payload, 16 * 1024 * 1024);
        assert_eq!(c.server.max_result, 16 * 1024 * 1024);
        assert_eq!(c.server.max_memory, 256 * 1024 * 1024);
        assert_eq!(c.server.read_timeout, Duration::from_secs(30));
        assert_eq!(c.admin.socket, dir.join("run/admin.sock"));
        assert_eq!(c.admin.socket_mode, 0o600);
        assert_eq!(c.admin.tcp, None);
        assert_eq!(c.admin.token_file, None);
        assert!(!c.admin.allow_remote);
        assert_eq!(c.admin.auth_timeout, Duration::from_secs(10));
        assert_eq!(c.admin.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.pools.len(), 1);
        let p = &c.pools[0];
        assert_eq!(p.name, "echo");
        assert_eq!(p.plugin, "echo");
        assert_eq!(p.workers, 1);
        assert_eq!(p.mode, PoolMode::Jobs);
        assert_eq!(p.max_queue, 100_000);
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.job_timeout, Some(Duration::from_secs(60)));
        assert_eq!(p.idle_sleep, Duration::from_secs(1));
        assert_eq!(p.max_jobs, None);
        assert_eq!(p.max_lifetime, None);
        assert_eq!(p.max_rss, None);
        assert_eq!(p.min_available_memory, None);
        assert!(p.settings.is_empty());
        assert_eq!(p.line, 2);
        assert_eq!(p.plugin_path(&c.host), dir.join("plugins/libecho.so"));
        assert_eq!(p.settings_toml(), "");
    }

    #[test]
    fn reads_every_key() {
        let env = Env::new();
        let text = r#"
[host]
plugins_dir = "plugins"
runtime_dir = "/var/run/jobhost"
pidfile = "/tmp/jh.pid"
log = "syslog"
log_level = "debug"
graceful_timeout = "10s"
init_timeout = 5
user = "jobs"
group = "jobs"
insecure_plugins_dir = true

[server]
socket = "j.sock"
socket_mode = "0666"
max_payload = "1MiB"

[admin]
socket = "/tmp/a.sock"
socket_mode = "0o640"
tcp = "10.0.0.1:7070"
http = "10.0.0.1:9120"
token_file = "secret/admin.token"
allow_remote = true

[[pool]]
name = "h.a-sh_1"
plugin = "hash"
workers = 1024
mode = "loop"
max_queue = 1
max_attempts = 1
job_timeout = "0"
slow_job = "5s"
idle_sleep = "250ms"
max_jobs = 10000
max_lifetime = "1h"
max_rss = "512MiB"
min_available_memory = 134217728
[pool.settings]
table_mib = 64
name = "x"
[pool.settings.nested]
a = [1, 2]

[[pool]]
name = "e"
plugin = "echo"
job_timeout = 0
max_lifetime = "0s"
max_rss = "0"
max_jobs = 0
"#;
        let c = env.ok(text);
        let dir = fs::canonicalize(env.dir.path()).unwrap();
        assert_eq!(c.host.runtime_dir, PathBuf::from("/var/run/jobhost"));
        assert_eq!(c.host.pidfile, PathBuf::from("/tmp/jh.pid"));
        assert_eq!(c.host.log, LogTarget::Syslog);
        assert_eq!(c.host.log_level, log::LevelFilter::Debug);
        assert_eq!(c.host.graceful_timeout, Duration::from_secs(10));
        assert_eq!(c.host.init_timeout, Duration::from_secs(5));
        assert_eq!(c.host.user.as_deref(), Some("jobs"));
        assert_eq!(c.host.group.as_deref(), Some("jobs"));
        assert!(c.host.insecure_plugins_dir);
        assert_eq!(c.server.socket, PathBuf::from("/var/run/jobhost/j.sock"));
        assert_eq!(c.server.socket_mode, 0o666);
        assert_eq!(c.server.max_payload, 1 << 20);
        assert_eq!(c.admin.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.admin.socket_mode, 0o640);
        assert_eq!(c.admin.tcp, Some("10.0.0.1:7070".parse().unwrap()));
        assert_eq!(c.admin.token_file, Some(dir.join("secret/admin.token")));
        assert_eq!(c.admin.http, Some("10.0.0.1:9120".parse().unwrap()));
        assert!(c.admin.allow_remote);
        let p = &c.pools[0];
        assert_eq!(p.name, "h.a-sh_1");
        assert_eq!(p.workers, 1024);
        assert_eq!(p.mode, PoolMode::Loop);
        assert_eq!((p.max_queue, p.max_attempts), (1, 1));
        assert_eq!(p.job_timeout, None);
        assert_eq!(p.slow_job, Some(Duration::from_secs(5)));
        assert_eq!(p.idle_sleep, Duration::from_millis(250));
        assert_eq!(p.max_jobs, Some(10000));
        assert_eq!(p.max_lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(p.max_rss, Some(512 << 20));
        assert_eq!(p.min_available_memory, Some(128 << 20));
        assert_eq!(p.line, 28);
        let settings: toml::Table = toml::from_str(&p.settings_toml()).unwrap();
        assert_eq!(settings, p.settings);
        assert_eq!(settings["table_mib"].as_integer(), Some(64));
        assert_eq!(settings["nested"]["a"].as_array().map(Vec::len), Some(2));
        let q = &c.pools[1];
        assert_eq!(
            (q.job_timeout, q.max_lifetime, q.max_rss, q.max_jobs),
            (None, None, None, None)
        );
        assert_eq!(q.line, 48);
    }

    #[test]
    fn durations_in_every_form() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        for (text, want) in [
            ("0", s(0)),
            ("000", s(0)),
            ("0s", s(0)),
            ("0ms", s(0)),
            ("500ms", ms(500)),
            ("30s", s(30)),
            ("5m", s(300)),
            ("1h", s(3600)),
            ("1d", s(86400)),
            ("1h30m", s(5400)),
            ("1h 30m 15s", s(5415)),
            ("1d2h3m4s5ms", s(93784) + ms(5)),
            ("1.5s", ms(1500)),
            ("0.25h", s(900)),
            ("  30s  ", s(30)),
            ("2s500ms", ms(2500)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn bad_durations_are_refused_with_a_reason() {
        for (text, why) in [
            ("30x", "unknown unit \"x\""),
            ("30", "missing unit"),
            ("", "empty"),
            ("   ", "empty"),
            ("s", "expected a number"),
            ("-5s", "expected a number"),
            ("1h30", "missing unit after 30"),
            ("5 minutes", "unknown unit \"minutes\""),
            ("1.s", "missing unit after 1"),
            ("30S", "unknown unit \"S\""),
            ("1e3s", "unknown unit \"e\""),
            ("99999999999999999999999999999d", "too large"),
            ("213503982334602d", "too large"),
        ] {
            match parse_duration(text) {
                Ok(d) => panic!("{text:?} parsed as {d:?}"),
                Err(e) => {
                    assert!(
                        e.starts_with(&format!("invalid duration {text:?}: ")),
                        "{e}"
                    );
                    assert!(e.contains(why), "{text:?}: want {why:?} in {e:?}");
                }
            }
        }
    }

    #[test]
    fn sizes_in_every_form() {
        for (text, want) in [
            ("4096", 4096),
            ("0", 0),
            ("12B", 12),
            ("512KiB", 512 << 10),
            ("16MiB", 16 << 20),
            ("256MiB", 256 << 20),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("1.5GiB", 3 << 29),
            ("100MB", 100_000_000),
            ("1KB", 1000),
            ("1GB", 1_000_000_000),
            ("1TB", 1_000_000_000_000),
            ("256 MiB", 256 << 20),
            ("1mib", 1 << 20),
            ("0.5KiB", 512),
            ("1.1KiB", 1126),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        for (text, why) in [
            ("", "expected a number"),
            ("MiB", "expected a number"),
            ("-1", "expected a number"),
            ("12 apples", "unknown unit \"apples\""),
            ("16M", "unknown unit \"M\""),
            ("16MiBs", "unknown unit \"MiBs\""),
            ("1.5", "must be whole"),
            ("1.5B", "must be whole"),
            ("18446744073709551616", "too large"),
            ("17179869184GiB", "too large"),
            ("1,000", "unknown unit \",000\""),
        ] {
            match parse_size(text) {
                Ok(n) => panic!("{text:?} parsed as {n}"),
                Err(e) => {
                    assert!(e.starts_with(&format!("invalid size {text:?}: ")), "{e}");
                    assert!(e.contains(why), "{text:?}: want {why:?} in {e:?}");
                }
            }
        }
    }

    #[test]
    fn durations_and_sizes_in_the_file_accept_integers() {
        let env = Env::new();
        let c = env.ok(&format!("[host]\ngraceful_timeout = 7\n[server]\nmax_payload = 1024\n{POOL}job_timeout = 90\nmax_rss = 1048576\n"));
        assert_eq!(c.host.graceful_timeout, Duration::from_secs(7));
        assert_eq!(c.server.max_payload, 1024);
        assert_eq!(c.pools[0].job_timeout, Some(Duration::from_secs(90)));
        assert_eq!(c.pools[0].max_rss, Some(1 << 20));
        env.err(
            &format!("{POOL}job_timeout = -1\n"),
            4,
            "pool[0].job_timeout: invalid duration -1: must not be negative",
        );
        env.err(
            &format!("{POOL}max_rss = -1\n"),
            4,
            "pool[0].max_rss: invalid size -1: must not be negative",
        );
        env.err(
            &format!("{POOL}max_rss = 1.5\n"),
            4,
            "pool[0].max_rss: invalid type: floating point `1.5`, expected a size",
        );
        env.err(
            &format!("{POOL}job_timeout = true\n"),
            4,
            "pool[0].job_timeout: invalid type: boolean `true`, expected a duration",
        );
        env.err(
            &format!("{POOL}idle_sleep = \"0\"\n"),
            4,
            ":4:14: pool[0].idle_sleep: must be at least 10ms, got 0ns",
        );
    }

    #[test]
    fn unknown_key_at_top_level() {
        let env = Env::new();
        // A key after a [[pool]] header belongs to the pool; a top-level key must come first.
        env.err(
            &format!("{POOL}\nverbose = true\n"),
            5,
            ":5:1: pool[0].verbose: unknown key",
        );
        let e = env.err(
            &format!("verbose = true\n{POOL}"),
            1,
            ":1:1: verbose: unknown key, expected one of host, server, admin, pool",
        );
        assert_eq!(e.key(), Some("verbose"));
        env.err(&format!("[hosts]\nlog = \"stderr\"\n{POOL}"), 1, ":1:2: hosts: unknown key, expected one of host, server, admin, pool (did you mean host?)");
    }

    #[test]
    fn unknown_key_in_host() {
        let env = Env::new();
        let e = env.err(&format!("[host]\nlog_level = \"info\"\nplugin_dir = \"p\"\n\n{POOL}"), 3, ":3:1: host.plugin_dir: unknown key, expected one of plugins_dir, runtime_dir, pidfile, log, log_level, graceful_timeout, init_timeout, user, group, insecure_plugins_dir (did you mean plugins_dir?)");
        assert_eq!(e.key(), Some("host.plugin_dir"));
        assert_eq!(e.position(), Some((3, 1)));
    }

    #[test]
    fn unknown_key_in_a_pool() {
        let env = Env::new();
        let text = format!("{POOL}\n[[pool]]\nname = \"h\"\nplugin = \"hash\"\n  workrs = 2\n");
        let e = env.err(&text, 8, ":8:3: pool[1].workrs: unknown key, expected one of name, plugin, workers, mode, max_queue, max_attempts, job_timeout, slow_job, idle_sleep, max_jobs, max_lifetime, max_rss, min_available_memory, crash_limit, crash_window, failing_retry, settings, source, redis, gearman (did you mean workers?)");
        assert_eq!(e.key(), Some("pool[1].workrs"));
        // The message from the brief's e2e test: line 8, column 1.
        let host = "[host]\nplugins_dir = \"plugins\"\ninit_timeout = \"3s\"\n\n";
        env.err(
            &format!("{host}[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkrs = 2\n"),
            8,
            ":8:1: pool[0].workrs: unknown key",
        );
    }

    #[test]
    fn unknown_key_in_a_nested_section() {
        let env = Env::new();
        // A sub-table of a pool that is not `settings`.
        env.err(
            &format!("{POOL}[pool.limits]\nmax_rss = \"1GiB\"\n"),
            4,
            ":4:7: pool[0].limits: unknown key",
        );
        // A sub-table of [host].
        env.err(
            &format!("[host.paths]\nplugins = \"p\"\n{POOL}"),
            1,
            ":1:7: host.paths: unknown key",
        );
        // A dotted key inside [admin].
        env.err(
            &format!("[admin]\ntcp.port = 7070\n{POOL}"),
            2,
            ":2:1: admin.tcp: invalid type: map, expected a string",
        );
        // An unknown key in [server], further down the file.
        env.err(
            &format!("{POOL}[server]\nsocket = \"s.sock\"\nbacklog = 5\n"),
            6,
            ":6:1: server.backlog: unknown key, expected one of socket, socket_mode, socket_group, max_payload, max_result, max_memory, read_timeout",
        );
        // [pool.settings] is free-form: anything goes.
        let c = env.ok(&format!(
            "{POOL}[pool.settings]\nanything = {{ goes = [1, \"two\"] }}\n"
        ));
        assert!(c.pools[0].settings.contains_key("anything"));
    }

    #[test]
    fn wrong_types_and_bad_values() {
        let env = Env::new();
        env.err(
            &format!("{POOL}workers = \"two\"\n"),
            4,
            ":4:11: pool[0].workers: invalid type: string \"two\", expected a whole number",
        );
        env.err(
            &format!("{POOL}job_timeout = \"30x\"\n"),
            4,
            ":4:15: pool[0].job_timeout: invalid duration \"30x\": unknown unit \"x\"",
        );
        env.err(
            &format!("{POOL}mode = \"batch\"\n"),
            4,
            "pool[0].mode: unknown variant `batch`, expected `jobs` or `loop`",
        );
        env.err(
            &format!("[host]\nlog_level = \"loud\"\n{POOL}"),
            2,
            ":2:13: host.log_level: invalid log level \"loud\"",
        );
        env.err(
            &format!("[host]\ninsecure_plugins_dir = \"yes\"\n{POOL}"),
            2,
            "host.insecure_plugins_dir: invalid type: string \"yes\", expected a boolean",
        );
        env.err(
            &format!("host = 3\n{POOL}"),
            1,
            ":1:8: host: invalid type: integer `3`, expected a table ([host])",
        );
        env.err(
            &format!("[server]\nsocket_mode = 660\n{POOL}"),
            2,
            "server.socket_mode: invalid mode 660: write the mode as an octal string",
        );
        env.err(
            &format!("[server]\nsocket_mode = \"0668\"\n{POOL}"),
            2,
            "server.socket_mode: invalid mode \"0668\"",
        );
        env.err(
            &format!("[server]\nsocket_mode = \"01777\"\n{POOL}"),
            2,
            "server.socket_mode: invalid mode \"01777\"",
        );
        env.err(
            &format!("{POOL}settings = 3\n"),
            4,
            "pool[0].settings: invalid type: integer `3`",
        );
        env.err(
            "[[pool]]\nplugin = \"echo\"\n",
            1,
            ":1:1: pool[0].name: required key is missing",
        );
        env.err(
            "[[pool]]\nname = \"e\"\n",
            1,
            ":1:1: pool[0].plugin: required key is missing",
        );
    }

    #[test]
    fn range_checks() {
        let env = Env::new();
        env.err(
            &format!("{POOL}workers = 1025\n"),
            4,
            ":4:11: pool[0].workers: must be between 0 and 1024, got 1025",
        );
        env.err(
            &format!("{POOL}workers = -1\n"),
            4,
            "pool[0].workers: must be between 0 and 1024, got -1",
        );
        env.err(
            &format!("{POOL}max_attempts = 0\n"),
            4,
            "pool[0].max_attempts: must be between 1 and 4294967295, got 0",
        );
        env.err(
            &format!("{POOL}max_queue = 0\n"),
            4,
            "pool[0].max_queue: must be at least 1, got 0",
        );
        env.err(
            &format!("{POOL}max_jobs = -3\n"),
            4,
            "pool[0].max_jobs: must be at least 0, got -3",
        );
        env.err(
            &format!("[server]\nmax_payload = 0\n{POOL}"),
            2,
            ":2:15: server.max_payload: must be between 1 byte and 1GiB, got 0 bytes",
        );
        env.err(
            &format!("[server]\nmax_payload = \"2GiB\"\n{POOL}"),
            2,
            "server.max_payload: must be between 1 byte and 1GiB, got 2147483648 bytes",
        );
        assert_eq!(
            env.ok(&format!("[server]\nmax_payload = \"1GiB\"\n{POOL}"))
                .server
                .max_payload,
            1 << 30
        );
        env.err(
            &format!("[server]\nmax_payload = \"1MiB\"\nmax_memory = \"2MiB\"\n{POOL}"),
            3,
            "server.max_memory: must be at least twice max_payload plus 2070 bytes (2099222 bytes), got 2097152 bytes",
        );
        env.err(
            &format!("[server]\nmax_result = 0\n{POOL}"),
            2,
            "server.max_result: must be between 1 byte and 1GiB, got 0 bytes",
        );
        env.err(
            &format!("[server]\nread_timeout = \"0s\"\n{POOL}"),
            2,
            "server.read_timeout: must be at least 1ms, got 0ns",
        );
        let c = env.ok(&format!(
            "[server]\nmax_result = \"1GiB\"\nmax_memory = \"64MiB\"\nread_timeout = \"2s\"\n{POOL}"
        ));
        assert_eq!(c.server.max_result, 1 << 30);
        assert_eq!(c.server.max_memory, 64 << 20);
        assert_eq!(c.server.read_timeout, Duration::from_secs(2));
        assert_eq!(env.ok(&format!("{POOL}workers = 0\n")).pools[0].workers, 0);
        env.err(
            &format!("[host]\ninit_timeout = \"0s\"\n{POOL}"),
            2,
            "host.init_timeout: must be longer than 0",
        );
    }

    #[test]
    fn pool_names_and_plugin_names() {
        let env = Env::new();
        let text = format!("{POOL}\n[[pool]]\nname = \"hash\"\nplugin = \"hash\"\n\n[[pool]]\nname = \"echo\"\nplugin = \"sleep\"\n");
        let e = env.err(
            &text,
            10,
            ":10:8: pool[2].name: duplicate pool name \"echo\" (first defined at line 2)",
        );
        assert_eq!(e.key(), Some("pool[2].name"));
        env.err(
            "[[pool]]\nname = \"\"\nplugin = \"echo\"\n",
            2,
            "pool[0].name: must not be empty",
        );
        env.err(
            "[[pool]]\nname = \"a b\"\nplugin = \"echo\"\n",
            2,
            "pool[0].name: invalid pool name \"a b\": ' ' is not allowed",
        );
        env.err(
            "[[pool]]\nname = \"a/b\"\nplugin = \"echo\"\n",
            2,
            "invalid pool name \"a/b\": '/' is not allowed",
        );
        env.err(
            "[[pool]]\nname = \"e\"\nplugin = \"../echo\"\n",
            3,
            "pool[0].plugin: invalid plugin name \"../echo\": '.' is not allowed",
        );
        env.err(
            "[[pool]]\nname = \"e\"\nplugin = \"\"\n",
            3,
            "pool[0].plugin: must not be empty",
        );
    }

    #[test]
    fn at_least_one_pool() {
        let env = Env::new();
        env.err(
            "[host]\nlog_level = \"info\"\n",
            1,
            ":1:1: pool: no pools: add at least one [[pool]]",
        );
        env.err("", 1, "pool: no pools");
    }

    #[test]
    fn a_missing_plugin_lists_the_available_ones() {
        let env = Env::new();
        let text = format!("{POOL}\n[[pool]]\nname = \"e2\"\nplugin = \"ecoh\"\n");
        let plugins = fs::canonicalize(env.dir.path()).unwrap().join("plugins");
        let want = format!(
            ":7:10: pool[1].plugin: no plugin \"ecoh\" in {} (there is no {}/libecoh.so); available: echo, hash, sleep",
            plugins.display(),
            plugins.display()
        );
        env.err(&text, 7, &want);
        // An empty plugins dir says so.
        let empty = tempfile::tempdir().unwrap();
        let text = format!(
            "[host]\nplugins_dir = {:?}\n{POOL}",
            empty.path().display().to_string()
        );
        env.err(&text, 5, "pool[0].plugin: no plugin \"echo\" in ");
        env.err(&text, 5, "available: none (no lib*.so files there)");
        // A plugins dir that does not exist says that.
        env.err(&format!("[host]\nplugins_dir = \"nowhere\"\n{POOL}"), 5, &format!("pool[0].plugin: no plugin \"echo\": the plugins directory {}/nowhere does not exist", fs::canonicalize(env.dir.path()).unwrap().display()));
        // A directory named like a plugin is not one.
        fs::create_dir(env.dir.path().join("plugins/libdir.so")).unwrap();
        env.err(
            "[[pool]]\nname = \"d\"\nplugin = \"dir\"\n",
            3,
            "libdir.so is not a regular file",
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder_and_runtime_dir() {
        let env = Env::new();
        fs::create_dir(env.dir.path().join("etc")).unwrap();
        fs::create_dir(env.dir.path().join("etc/plugs")).unwrap();
        fs::write(env.dir.path().join("etc/plugs/libecho.so"), b"").unwrap();
        let file = env.dir.path().join("etc/jobhost.toml");
        let text = format!(
            "[host]\nplugins_dir = \"plugs\"\nruntime_dir = \"../var/run\"\npidfile = \"sub/jh.pid\"\nlog = \"log/jobhost.log\"\n\
             [server]\nsocket = \"/abs/jobs.sock\"\n[admin]\nsocket = \"a.sock\"\ntcp = \"127.0.0.1:7070\"\ntoken_file = \"admin.token\"\n{POOL}"
        );
        fs::write(&file, &text).unwrap();
        let c = Config::load(&file).unwrap();
        let etc = fs::canonicalize(env.dir.path()).unwrap().join("etc");
        assert_eq!(c.path, etc.join("jobhost.toml"));
        assert_eq!(c.host.plugins_dir, etc.join("plugs"));
        assert_eq!(c.host.runtime_dir, etc.join("../var/run"));
        assert_eq!(c.host.pidfile, etc.join("../var/run/sub/jh.pid"));
        assert_eq!(c.host.log, LogTarget::File(etc.join("log/jobhost.log")));
        assert_eq!(c.server.socket, PathBuf::from("/abs/jobs.sock"));
        assert_eq!(c.admin.socket, etc.join("../var/run/a.sock"));
        assert_eq!(c.admin.token_file, Some(etc.join("admin.token")));
        assert_eq!(
            c.pools[0].plugin_path(&c.host),
            etc.join("plugs/libecho.so")
        );
        // Absolute paths stay as they are.
        let text = format!("[host]\nplugins_dir = {:?}\nruntime_dir = \"/srv/run\"\nlog = \"/var/log/jh.log\"\n{POOL}", etc.join("plugs").display().to_string());
        let c = Config::parse(&text, &file).unwrap();
        assert_eq!(c.host.plugins_dir, etc.join("plugs"));
        assert_eq!(c.host.runtime_dir, PathBuf::from("/srv/run"));
        assert_eq!(
            c.host.log,
            LogTarget::File(PathBuf::from("/var/log/jh.log"))
        );
        assert_eq!(c.server.socket, PathBuf::from("/srv/run/jobs.sock"));
    }

    #[test]
    fn admin_timeouts_must_be_longer_than_zero() {
        let env = Env::new();
        for key in ["auth_timeout", "idle_timeout"] {
            env.err(
                &format!("[admin]\n{key} = \"0s\"\n{POOL}"),
                2,
                &format!("admin.{key}: must be longer than 0"),
            );
            env.err(
                &format!("[admin]\n{key} = \"soon\"\n{POOL}"),
                2,
                &format!("admin.{key}"),
            );
        }
        let c = env.ok(&format!(
            "[admin]\nauth_timeout = \"3s\"\nidle_timeout = \"1h\"\n{POOL}"
        ));
        assert_eq!(c.admin.auth_timeout, Duration::from_secs(3));
        assert_eq!(c.admin.idle_timeout, Duration::from_secs(3600));
        let c = env.ok(&format!("[admin]\nidle_timeout = 2\n{POOL}"));
        assert_eq!(c.admin.idle_timeout, Duration::from_secs(2));
    }

    #[test]
    fn admin_tcp_rules() {
        let env = Env::new();
        let e = env.err(
            &format!("[admin]\ntcp = \"0.0.0.0:7070\"\ntoken_file = \"t\"\n{POOL}"),
            2,
            ":2:7: admin.tcp: 0.0.0.0:7070 is not a loopback address",
        );
        assert!(e.to_string().contains("admin.allow_remote = true"));
        env.err(
            &format!("[admin]\ntcp = \"192.168.1.5:7070\"\ntoken_file = \"t\"\n{POOL}"),
            2,
            "admin.tcp: 192.168.1.5:7070 is not a loopback address",
        );
        env.err(
            &format!("[admin]\ntcp = \"127.0.0.1:7070\"\n{POOL}"),
            2,
            "admin.tcp: a TCP admin listener needs admin.token_file",
        );
        env.err(
            &format!("[admin]\ntcp = \"10.0.0.1:7070\"\nallow_remote = true\n{POOL}"),
            2,
            "admin.tcp: a TCP admin listener needs admin.token_file",
        );
        env.err(
            &format!("[admin]\ntcp = \"localhost:7070\"\ntoken_file = \"t\"\n{POOL}"),
            2,
            "admin.tcp: invalid address \"localhost:7070\"",
        );
        let c = env.ok(&format!(
            "[admin]\ntcp = \"[::1]:7070\"\ntoken_file = \"t\"\n{POOL}"
        ));
        assert_eq!(c.admin.tcp, Some("[::1]:7070".parse().unwrap()));
        let c = env.ok(&format!(
            "[admin]\ntcp = \"0.0.0.0:7070\"\ntoken_file = \"t\"\nallow_remote = true\n{POOL}"
        ));
        assert_eq!(c.admin.tcp, Some("0.0.0.0:7070".parse().unwrap()));
    }

    #[test]
    fn sockets_and_paths() {
        let env = Env::new();
        env.err(
            &format!("[server]\nsocket = \"x.sock\"\n[admin]\nsocket = \"x.sock\"\n{POOL}"),
            4,
            "admin.socket: ",
        );
        let long = "s".repeat(120);
        env.err(
            &format!("[server]\nsocket = \"{long}\"\n{POOL}"),
            2,
            "server.socket: socket path ",
        );
        env.err(
            &format!("[host]\nruntime_dir = \"\"\n{POOL}"),
            2,
            "host.runtime_dir: must not be empty",
        );
        env.err(
            &format!("[host]\nlog = \"\"\n{POOL}"),
            2,
            "host.log: must not be empty",
        );
        env.err(
            &format!("[host]\nuser = \"\"\n{POOL}"),
            2,
            "host.user: must not be empty",
        );
        env.err(
            &format!("[admin]\ntoken_file = \"\"\n{POOL}"),
            2,
            "admin.token_file: must not be empty",
        );
    }

    #[test]
    fn socket_groups_resolve_names_and_take_gids() {
        let env = Env::new();
        let root = Some(SocketGroup {
            name: "root".into(),
            gid: 0,
        });
        let c = env.ok(&format!(
            "[server]\nsocket_group = \"root\"\n[admin]\nsocket_group = 1234\n{POOL}"
        ));
        assert_eq!(c.server.socket_group, root);
        assert_eq!(c.server.socket_mode, 0o660);
        assert_eq!(
            c.admin.socket_group,
            Some(SocketGroup {
                name: "1234".into(),
                gid: 1234
            })
        );
        // A group opens the admin socket to it, unless socket_mode says otherwise.
        assert_eq!(c.admin.socket_mode, 0o660);
        let c = env.ok(&format!(
            "[admin]\nsocket_group = \"4321\"\nsocket_mode = \"0640\"\n{POOL}"
        ));
        assert_eq!(c.admin.socket_group.map(|g| g.gid), Some(4321));
        assert_eq!(c.admin.socket_mode, 0o640);
        let c = env.ok(&format!("[server]\nsocket_group = \"root\"\n{POOL}"));
        assert_eq!(c.admin.socket_group, None);
        assert_eq!(c.admin.socket_mode, 0o600);
        let c = env.ok(&format!(
            "[server]\nsocket_group = \"root\"\nsocket_mode = \"0666\"\n{POOL}"
        ));
        assert_eq!(c.server.socket_mode, 0o666);
    }

    #[test]
    fn bad_socket_groups_name_their_key_and_line() {
        let env = Env::new();
        let e = env.err(
            &format!("{POOL}[server]\nsocket_group = \"no-such-group-jh\"\n"),
            5,
            ":5:16: server.socket_group: no group \"no-such-group-jh\" on this system",
        );
        assert_eq!(e.key(), Some("server.socket_group"));
        env.err(
            &format!("[admin]\nsocket_group = \"nope-jh\"\n{POOL}"),
            2,
            ":2:16: admin.socket_group: no group \"nope-jh\"",
        );
        env.err(
            &format!("[admin]\nsocket_group = \"\"\n{POOL}"),
            2,
            "admin.socket_group: must not be empty",
        );
        env.err(
            &format!("[admin]\nsocket_group = -1\n{POOL}"),
            2,
            "admin.socket_group: invalid gid -1: must not be negative",
        );
        env.err(
            &format!("[server]\nsocket_group = 4294967295\n{POOL}"),
            2,
            "server.socket_group: invalid gid 4294967295: too large",
        );
        env.err(
            &format!("[server]\nsocket_group = \"99999999999\"\n{POOL}"),
            2,
            "server.socket_group: invalid gid 99999999999: too large",
        );
        env.err(
            &format!("[server]\nsocket_group = true\n{POOL}"),
            2,
            "server.socket_group: invalid type: boolean `true`, expected a group name",
        );
    }

    #[test]
    fn toml_syntax_errors_name_file_line_and_column() {
        let env = Env::new();
        let e = env.err(
            &format!("{POOL}workers = \n"),
            4,
            ":4:11: string values must be quoted",
        );
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        let e = env.err(&format!("{POOL}name = \"again\"\n"), 4, "duplicate key");
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
        env.err("[[pool]\nname = \"x\"\n", 1, ":1:");
    }

    #[test]
    fn a_missing_file_names_the_path_and_the_os_error() {
        let env = Env::new();
        let path = env.dir.path().join("absent.toml");
        let e = Config::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert_eq!(
            e.to_string(),
            format!(
                "{}: cannot read the config file: No such file or directory (os error 2)",
                path.display()
            )
        );
        let e = Config::load(env.dir.path()).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "{}: cannot read the config file: ",
                env.dir.path().display()
            )),
            "{e}"
        );
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_column("", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("é = 1\nx", 2), (1, 2));
        assert_eq!(line_column("é = 1\nx", 3), (1, 3));
        assert_eq!(line_column("é = 1\nx", 1), (1, 1));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    const REDIS: &str =
        "[[pool]]\nname = \"q\"\nplugin = \"echo\"\nsource = \"redis\"\n[pool.redis]\n";

    #[test]
    fn redis_pool_defaults_and_every_key() {
        let env = Env::new();
        let c = env.ok(&format!(
            "{POOL}{REDIS}url = \"/tmp/r.sock\"\nstream = \"jobs\"\n"
        ));
        assert!(
            c.pools[0].redis.is_none(),
            "a socket pool has no redis table"
        );
        let r = c.pools[1].redis.as_ref().expect("redis pool");
        assert_eq!(r.url, "unix:///tmp/r.sock");
        assert_eq!(r.stream, "jobs");
        assert_eq!(r.group, "jobhost");
        assert_eq!(r.dead_letter, "jobs:dead");
        assert_eq!(r.results, None);
        assert_eq!(r.batch, 1);
        assert_eq!(r.password, None);
        // max(2 × 1 × 60s, 60s)
        assert_eq!(r.claim_idle, Duration::from_secs(120));

        fs::write(env.dir.path().join("pw"), "s3cret\nignored\n").unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let pw = env.dir.path().join("pw");
            fs::set_permissions(&pw, fs::Permissions::from_mode(0o640)).unwrap();
            let e = env.err(
                &format!("{REDIS}url = \"/r\"\nstream = \"s\"\npassword_file = \"pw\"\n"),
                8,
                "pool[0].redis.password_file: ",
            );
            assert!(e.to_string().contains("(mode 0640)"), "{e}");
            fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let c = env.ok(&format!(
            "{REDIS}url = \"redis://:urlpw@127.0.0.1:6380/2\"\npassword_file = \"pw\"\nstream = \"s\"\ngroup = \"g\"\nclaim_idle = \"15m\"\ndead_letter = \"dl\"\nresults = \"out\"\nbatch = 10\n"
        ));
        let r = c.pools[0].redis.as_ref().unwrap();
        assert_eq!(r.url, "redis://:urlpw@127.0.0.1:6380/2");
        assert_eq!(r.shown_url, "redis://:***@127.0.0.1:6380/2");
        assert_eq!(r.password.as_deref(), Some("s3cret"));
        assert_eq!((r.group.as_str(), r.dead_letter.as_str()), ("g", "dl"));
        assert_eq!(r.results.as_deref(), Some("out"));
        assert_eq!(r.batch, 10);
        assert_eq!(r.claim_idle, Duration::from_secs(900));
        // A default claim_idle follows the batch: 2 × 10 × 60s.
        let c = env.ok(&format!(
            "{REDIS}url = \"unix:///r.sock?db=3\"\nstream = \"s\"\nbatch = 10\n"
        ));
        assert_eq!(
            c.pools[0].redis.as_ref().unwrap().claim_idle,
            Duration::from_secs(1200)
        );
        assert_eq!(
            c.pools[0].redis.as_ref().unwrap().url,
            "unix:///r.sock?db=3"
        );
    }

    const GEARMAN: &str =
        "[[pool]]\nname = \"resize\"\nplugin = \"echo\"\nsource = \"gearman\"\n[pool.gearman]\n";

    #[test]
    fn gearman_pool_defaults_and_every_key() {
        let env = Env::new();
        let c = env.ok(&format!("{GEARMAN}servers = [\"127.0.0.1\"]\n"));
        let g = c.pools[0].gearman.clone().expect("a gearman pool");
        assert_eq!(c.pools[0].redis, None);
        assert_eq!(
            g,
            GearmanConfig {
                servers: vec![GearmanServer {
                    host: "127.0.0.1".into(),
                    port: 4730
                }],
                function: "resize".into(),
                client_id: None,
                timeout: None,
                failure: GearmanFailure::Fail,
            }
        );
        let c = env.ok(&format!(
            "{GEARMAN}servers = [\"10.0.0.1:4731\", \"gm.example.com\", \"[::1]:4732\", \"[fe80::1]\"]\nfunction = \"img.resize\"\nclient_id = \"web1\"\ntimeout = \"30s\"\nfailure = \"exception\"\n"
        ));
        let g = c.pools[0].gearman.clone().expect("a gearman pool");
        let shown: Vec<String> = g.servers.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.1:4731",
                "gm.example.com:4730",
                "[::1]:4732",
                "[fe80::1]:4730"
            ]
        );
        assert_eq!(g.function, "img.resize");
        assert_eq!(g.client_id.as_deref(), Some("web1"));
        assert_eq!(g.timeout, Some(Duration::from_secs(30)));
        assert_eq!(g.failure, GearmanFailure::Exception);
    }

    #[test]
    fn gearman_pool_errors_name_line_and_key() {
        let env = Env::new();
        let e = env.err(
            GEARMAN,
            5,
            "pool[0].gearman.servers: required key is missing",
        );
        assert_eq!(e.key(), Some("pool[0].gearman.servers"));
        env.err(
            &format!("{GEARMAN}servers = []\n"),
            6,
            "pool[0].gearman.servers: must name at least one server",
        );
        for (bad, needle) in [
            ("a:b:c", "write an IPv6 address in brackets"),
            ("h:0", "the port must be a number from 1 to 65535"),
            ("h:99999", "the port must be a number"),
            ("h:", "the port must be a number"),
            (":4730", "is not a server address"),
            ("[::1", "is not a server address"),
            ("[::1]x", "is not a server address"),
            ("h st", "is not a server address"),
            ("gearman://h", "is not a server address"),
        ] {
            env.err(
                &format!("{GEARMAN}servers = [\"ok\", \"{bad}\"]\n"),
                6,
                &format!("pool[0].gearman.servers: {bad:?}"),
            );
            env.err(&format!("{GEARMAN}servers = [\"{bad}\"]\n"), 6, needle);
        }
        env.err(
            &format!("{GEARMAN}servers = [\"h\", \"h:4730\"]\n"),
            6,
            "pool[0].gearman.servers: h:4730 is listed twice",
        );
        let many: Vec<String> = (0..33).map(|i| format!("\"h{i}\"")).collect();
        env.err(
            &format!("{GEARMAN}servers = [{}]\n", many.join(", ")),
            6,
            "33 servers; at most 32",
        );
        env.err(
            &format!("{GEARMAN}servers = \"h\"\n"),
            6,
            "pool[0].gearman.servers",
        );
        env.err(
            &format!("{GEARMAN}servers = [\"h\"]\nfunction = \"a b\"\n"),
            7,
            "pool[0].gearman.function: \"a b\": ' ' is not allowed in a Gearman name",
        );
        env.err(
            &format!("{GEARMAN}servers = [\"h\"]\nfunction = \"\"\n"),
            7,
            "pool[0].gearman.function: must not be empty",
        );
        env.err(
            &format!("{GEARMAN}servers = [\"h\"]\nclient_id = \"x\\ty\"\n"),
            7,
            "pool[0].gearman.client_id",
        );
        env.err(
            &format!("{GEARMAN}servers = [\"h\"]\ntimeout = \"0.5s\"\n"),
            7,
            "pool[0].gearman.timeout: must be at least 1s and under 49 days, in whole milliseconds: got 500ms",
        );
        env.err(
            &format!("{GEARMAN}servers = [\"h\"]\ntimeout = \"0s\"\n"),
            7,
            "pool[0].gearman.timeout",
        );
        env.err(
            &format!("{GEARMAN}servers = [\"h\"]\nfailure = \"warn\"\n"),
            7,
            "pool[0].gearman.failure",
        );
        env.err(
            &format!("{GEARMAN}servers = [\"h\"]\nbogus = 1\n"),
            7,
            "pool[0].gearman.bogus: unknown key",
        );
        // Pairings.
        env.err(
            &format!("{POOL}[pool.gearman]\nservers = [\"h\"]\n"),
            4,
            "pool[0].gearman: a [pool.gearman] table needs source = \"gearman\"",
        );
        env.err(
            &format!("{GEARMAN}servers = [\"h\"]\n[pool.redis]\nurl = \"/r\"\nstream = \"s\"\n"),
            7,
            "pool[0].redis: a pool has one source",
        );
        env.err(
            "[[pool]]\nname = \"q\"\nplugin = \"echo\"\nmode = \"loop\"\nsource = \"gearman\"\n[pool.gearman]\nservers = [\"h\"]\n",
            5,
            "pool[0].source: a gearman pool takes its work from gearmand; mode = \"loop\" cannot go with it",
        );
    }

    #[test]
    fn redis_pool_errors_name_line_and_key() {
        let env = Env::new();
        let e = env.err(
            &format!("{REDIS}stream = \"s\"\n"),
            5,
            "pool[0].redis.url: required key is missing",
        );
        assert_eq!(e.key(), Some("pool[0].redis.url"));
        env.err(
            &format!("{REDIS}url = \"/r.sock\"\n"),
            5,
            "pool[0].redis.stream: required key",
        );
        env.err(
            &format!("{REDIS}url = \"localhost:6379\"\nstream = \"s\"\n"),
            6,
            "pool[0].redis.url: \"localhost:6379\" is not a Redis address",
        );
        env.err(
            &format!("{REDIS}url = \"redis://\"\nstream = \"s\"\n"),
            6,
            "pool[0].redis.url: invalid Redis URL",
        );
        env.err(
            &format!("{REDIS}url = \"/r\"\nstream = \"a b\"\n"),
            7,
            "pool[0].redis.stream: \"a b\"",
        );
        env.err(
            &format!("{REDIS}url = \"/r\"\nstream = \"s\"\nbatch = 0\n"),
            8,
            "pool[0].redis.batch: must be between 1 and 1000, got 0",
        );
        env.err(
            &format!("{REDIS}url = \"/r\"\nstream = \"s\"\nbatch = 1001\n"),
            8,
            "pool[0].redis.batch",
        );
        env.err(
            &format!("{REDIS}url = \"/r\"\nstream = \"s\"\nbogus = 1\n"),
            8,
            "pool[0].redis.bogus: unknown key",
        );
        env.err(
            &format!("{REDIS}url = \"/r\"\nstream = \"s\"\npassword_file = \"nope\"\n"),
            8,
            "pool[0].redis.password_file: cannot read",
        );
        env.err(
            &format!("{REDIS}url = \"/r\"\nstream = \"s\"\nclaim_idle = \"bogus\"\n"),
            8,
            "pool[0].redis.claim_idle",
        );
        // claim_idle must exceed batch × job_timeout plus the margin.
        let e = env.err(
            "[[pool]]\nname = \"q\"\nplugin = \"echo\"\njob_timeout = \"10s\"\nsource = \"redis\"\n[pool.redis]\nurl = \"/r\"\nstream = \"s\"\nbatch = 3\nclaim_idle = \"30s\"\n",
            10,
            "pool[0].redis.claim_idle: 30s is too short",
        );
        assert!(e.to_string().contains("two workers on one entry"), "{e}");
        env.ok("[[pool]]\nname = \"q\"\nplugin = \"echo\"\njob_timeout = \"10s\"\nsource = \"redis\"\n[pool.redis]\nurl = \"/r\"\nstream = \"s\"\nbatch = 3\nclaim_idle = \"36s\"\n");
        // Pairings.
        env.err(
            "[[pool]]\nname = \"q\"\nplugin = \"echo\"\nsource = \"redis\"\n",
            4,
            "pool[0].source: source = \"redis\" needs a [pool.redis] table",
        );
        env.err(
            "[[pool]]\nname = \"q\"\nplugin = \"echo\"\nsource = \"gearman\"\n",
            4,
            "pool[0].source: source = \"gearman\" needs a [pool.gearman] table",
        );
        env.err(
            &format!("{POOL}[pool.redis]\nurl = \"/r\"\nstream = \"s\"\n"),
            4,
            "pool[0].redis: a [pool.redis] table needs source = \"redis\"",
        );
        env.err("[[pool]]\nname = \"q\"\nplugin = \"echo\"\nmode = \"loop\"\nsource = \"redis\"\n[pool.redis]\nurl = \"/r\"\nstream = \"s\"\n", 5, "mode = \"loop\" cannot go with it");
        env.err("[[pool]]\nname = \"q\"\nplugin = \"echo\"\njob_timeout = 0\nsource = \"redis\"\n[pool.redis]\nurl = \"/r\"\nstream = \"s\"\n", 5, "needs a job_timeout");
    }
}
