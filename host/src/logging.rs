//! The host's log: every line carries the time, the level, the pid and the role — `master` or
//! the worker's pool — so a grep for a pool or a pid shows one process's story:
//!
//! `2026-11-23T01:02:03.456Z INFO  jobhost[4242] echo: worker started (gen 1)`
//!
//! Owns the global `log` logger for every jobhost process (a forked worker inherits it and
//! only changes its role). Plugins' records arrive here through plugin-api's forwarding.
//! It never blocks on anything but its own write, and a failed write is dropped, not fatal.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use log::{LevelFilter, Log, Metadata, Record};

/// Where lines go.
enum Sink {
    Stderr,
    File {
        path: PathBuf,
        file: File,
    },
    /// syslog(3), facility daemon, ident `jobhost`, with the pid (LOG_PID).
    Syslog,
}

struct HostLogger {
    state: Mutex<State>,
}

struct State {
    sink: Sink,
    role: String,
}

static LOGGER: HostLogger = HostLogger {
    state: Mutex::new(State {
        sink: Sink::Stderr,
        role: String::new(),
    }),
};

impl Log for HostLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let role = if state.role.is_empty() {
            "jobhost"
        } else {
            state.role.as_str()
        };
        if let Sink::Syslog = state.sink {
            use nix::syslog::Severity;
            let severity = match record.level() {
                log::Level::Error => Severity::LOG_ERR,
                log::Level::Warn => Severity::LOG_WARNING,
                log::Level::Info => Severity::LOG_INFO,
                _ => Severity::LOG_DEBUG,
            };
            let priority = nix::syslog::Priority::new(severity, nix::syslog::Facility::LOG_DAEMON);
            let _ = nix::syslog::syslog(priority, &format!("{role}: {}", record.args()));
            return;
        }
        let time = humantime::format_rfc3339_millis(SystemTime::now());
        let line = format!(
            "{time} {:<5} jobhost[{}] {role}: {}\n",
            record.level(),
            std::process::id(),
            record.args()
        );
        let _ = match &mut state.sink {
            Sink::Stderr | Sink::Syslog => io::stderr().write_all(line.as_bytes()),
            Sink::File { file, .. } => file.write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {
        if let Ok(mut state) = self.state.lock() {
            let _ = match &mut state.sink {
                Sink::Stderr | Sink::Syslog => io::stderr().flush(),
                Sink::File { file, .. } => file.flush(),
            };
        }
    }
}

/// Opens the log file for appending, never through a symbolic link: the master may run as
/// root, and a link planted at the log's path must not make it append to (or create) a file
/// of the link's choosing.
fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => io::Error::new(
                e.kind(),
                format!(
                    "{} is a symbolic link; jobhost never follows a link for a file it writes",
                    path.display()
                ),
            ),
            _ => e,
        })
}

/// Installs the logger (once per process; later calls only change the level) writing to
/// stderr, or appending to `file`.
pub fn init(level: LevelFilter, file: Option<&Path>, role: &str) -> io::Result<()> {
    let sink = match file {
        None => Sink::Stderr,
        Some(path) => Sink::File {
            path: path.to_owned(),
            file: open_append(path)?,
        },
    };
    if let Ok(mut state) = LOGGER.state.lock() {
        state.sink = sink;
        state.role = role.to_owned();
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
    Ok(())
}

/// Sends every line to syslog (facility daemon, ident `jobhost[pid]`), like the PHP job
/// servers that sent their workers' errors there.
pub fn init_syslog(level: LevelFilter, role: &str) {
    let _ = nix::syslog::openlog(
        Some(c"jobhost"),
        nix::syslog::LogFlags::LOG_PID,
        nix::syslog::Facility::LOG_DAEMON,
    );
    if let Ok(mut state) = LOGGER.state.lock() {
        state.sink = Sink::Syslog;
        state.role = role.to_owned();
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Names this process in every following line: `master`, or a worker's pool name.
pub fn set_role(role: &str) {
    if let Ok(mut state) = LOGGER.state.lock() {
        state.role = role.to_owned();
    }
}

/// Reopens the log file (after logrotate moved it); a no-op on stderr.
pub fn reopen() -> io::Result<()> {
    let Ok(mut state) = LOGGER.state.lock() else {
        return Ok(());
    };
    if let Sink::File { path, file } = &mut state.sink {
        *file = open_append(path)?;
    }
    Ok(())
}
