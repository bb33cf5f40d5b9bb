//! Plugin loading: private copies, the probe child, and the registry of loaded libraries.
//!
//! Owns the path from a user's `lib<name>.so` to an initialised [`PluginInstance`]:
//! 1. **copy** the user's file, by content hash, to `runtime_dir/plugins/<name>-<hash>.so`
//!    (written as `.tmp`, then renamed) — dlopen caches by path and a file overwritten in place
//!    under a process that maps it crashes that process, so the user's file is never mapped;
//! 2. **probe** the copy in a throw-away child: load, check the ABI, optionally `init` — a
//!    truncated `.so` kills whoever dlopens it with SIGBUS, and a plugin may crash or hang in
//!    `init`, so only the child can take that risk;
//! 3. **load** the copy in this process (never unloaded: abi_stable leaks every library), and
//!    `init` instances from it.
//!
//! It never loads into this process a file that has not passed a probe, never maps the user's
//! file in place, and never runs a plugin's job code (`handle`, `run_once`): workers do that.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::std_types::{RResult, RStr};
use jobhost_plugin_api::{HostContext, Modes, PluginInfo, PluginInstance, PluginModRef};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The host's plugin-api version: what every plugin must be compatible with.
pub const HOST_API_VERSION: &str = jobhost_plugin_api::API_VERSION;

/// Why a plugin file was refused. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("plugin {path} is not a loadable shared library: {detail}")]
    NotALibrary { path: PathBuf, detail: String },
    #[error("{path} is not a jobhost plugin: it does not export a plugin root module (build it with `jobhost_plugin_api::export_plugin!`)")]
    NotAPlugin { path: PathBuf },
    #[error("plugin {path} was built against plugin-api {found}, which this jobhost (plugin-api {expected}) cannot load: rebuild the plugin against plugin-api {expected}")]
    IncompatibleVersion {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("plugin {path} has an incompatible plugin-api layout (built against a different plugin-api than {expected}; rebuild it): {detail}")]
    IncompatibleAbi {
        path: PathBuf,
        expected: String,
        detail: String,
    },
    #[error("plugin {path} could not be loaded: {detail}")]
    LoadFailed { path: PathBuf, detail: String },
    #[error("plugin {path} killed the probe process with {signal} while {stage}{hint}")]
    ProbeCrashed {
        path: PathBuf,
        stage: ProbeStage,
        signal: String,
        hint: &'static str,
    },
    #[error("plugin {path} made the probe process exit with status {code} while {stage}")]
    ProbeExited {
        path: PathBuf,
        stage: ProbeStage,
        code: i32,
    },
    #[error("plugin {path} took longer than {timeout:?} while {stage}; the probe was killed")]
    ProbeTimeout {
        path: PathBuf,
        stage: ProbeStage,
        timeout: Duration,
    },
    #[error("plugin {path} refused to start: init failed: {message}")]
    InitFailed { path: PathBuf, message: String },
    #[error("plugin {path} does not provide {mode} mode (it provides: {provides})")]
    ModeUnsupported {
        path: PathBuf,
        mode: &'static str,
        provides: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("probing plugin {path}: {detail}")]
    Probe { path: PathBuf, detail: String },
    #[error("the private plugin folder {dir} is on a filesystem mounted noexec, so no plugin copied there could be loaded; set host.runtime_dir to a folder on another filesystem")]
    NoExec { dir: PathBuf },
    #[error("refusing to load plugins: {what} {path} {why}, so someone else could replace the code jobhost runs; fix its owner and mode (chmod go-w), or set host.insecure_plugins_dir = true")]
    Untrusted {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// Refuses a plugin that a user other than its owner or root could have replaced (like sshd's
/// StrictModes): the plugins dir and the plugin file must not be writable by group or others,
/// and must belong to root or to the user jobhost runs as.
pub fn check_trusted(plugins_dir: &Path, file: &Path) -> Result<(), PluginError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    for (what, path) in [("plugins dir", plugins_dir), ("plugin", file)] {
        let meta = fs::metadata(path).map_err(|source| PluginError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.mode() & 0o7777;
        let why = if mode & 0o022 != 0 {
            let who = if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            };
            format!("is writable by {who} (mode {mode:04o})")
        } else if meta.uid() != 0 && meta.uid() != me {
            format!(
                "belongs to uid {}, neither root nor the user jobhost runs as (uid {me})",
                meta.uid()
            )
        } else {
            continue;
        };
        return Err(PluginError::Untrusted {
            what,
            path: path.to_owned(),
            why,
        });
    }
    Ok(())
}

/// How far the probe child got; names the step a crash or hang happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeStage {
    Loading,
    Initialising,
}

impl fmt::Display for ProbeStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeStage::Loading => "loading it",
            ProbeStage::Initialising => "running its init",
        })
    }
}

/// A plugin's metadata, owned (it crosses the probe pipe and outlives nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    pub version: String,
    pub description: String,
    pub api_version: String,
    pub jobs: bool,
    pub looped: bool,
}

impl Info {
    fn from_ffi(info: PluginInfo) -> Info {
        let Modes { jobs, looped } = info.modes;
        Info {
            name: info.name.as_str().to_owned(),
            version: info.version.as_str().to_owned(),
            description: info.description.as_str().to_owned(),
            api_version: info.api_version.as_str().to_owned(),
            jobs,
            looped,
        }
    }

    /// "jobs", "loop" or "jobs, loop".
    pub fn modes(&self) -> String {
        match (self.jobs, self.looped) {
            (true, true) => "jobs, loop".into(),
            (true, false) => "jobs".into(),
            (false, true) => "loop".into(),
            (false, false) => "none".into(),
        }
    }

    /// Refuses a pool mode the plugin does not implement.
    pub fn check_mode(&self, path: &Path, looped: bool) -> Result<(), PluginError> {
        let ok = if looped { self.looped } else { self.jobs };
        if ok {
            return Ok(());
        }
        Err(PluginError::ModeUnsupported {
            path: path.to_owned(),
            mode: if looped { "loop" } else { "jobs" },
            provides: self.modes(),
        })
    }
}

/// A SHA-256 of a plugin file's bytes: the identity of one build of a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentHash([u8; 32]);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(Sha256::digest(bytes).into())
    }

    /// The first 16 hex digits: enough to tell builds apart in file names and logs.
    pub fn short(&self) -> String {
        self.0[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// One build of a plugin, loaded into this process. Cheap to copy; lives forever.
#[derive(Clone, Copy)]
pub struct Library {
    module: PluginModRef,
    pub hash: ContentHash,
}

impl Library {
    pub fn info(&self) -> Info {
        Info::from_ffi((self.module.info())())
    }

    /// Runs the plugin's `init` in this process. In the master this happens before any fork,
    /// so what `init` builds is shared copy-on-write by the workers.
    pub fn instantiate(
        &self,
        path: &Path,
        settings_toml: &str,
    ) -> Result<PluginInstance, PluginError> {
        match (self.module.init())(RStr::from_str(settings_toml), host_context()) {
            RResult::ROk(instance) => Ok(instance),
            RResult::RErr(message) => Err(PluginError::InitFailed {
                path: path.to_owned(),
                message: message.into_string(),
            }),
        }
    }
}

/// A library loaded from a private copy, with where it came from.
#[derive(Clone)]
pub struct Loaded {
    pub library: Library,
    pub info: Info,
    /// The user's file it was copied from.
    pub source: PathBuf,
    /// The private copy that is mapped.
    pub private: PathBuf,
}

/// A build on its way in: its private copy is written, it is not loaded yet (see
/// [`Registry::stage`]).
#[derive(Clone)]
pub struct Staged {
    pub hash: ContentHash,
    /// The user's file.
    pub source: PathBuf,
    /// The private copy, which probes load.
    pub private: PathBuf,
    /// The same build, if this process loaded it before.
    pub loaded: Option<Loaded>,
}

impl Staged {
    /// Makes an error about the private copy name the user's file instead.
    pub fn rename(&self, e: PluginError) -> PluginError {
        rename_path(e, &self.private, &self.source)
    }
}

/// Every plugin build this process has loaded, by content hash.
///
/// The same bytes are loaded once, however many pools use them; a changed file (new hash)
/// gets a new private copy and so new code, while the old build stays mapped for the workers
/// that still run it.
pub struct Registry {
    private_dir: PathBuf,
    loaded: HashMap<ContentHash, Loaded>,
}

impl Registry {
    /// A registry whose private copies live in `private_dir` (created, mode 0700).
    pub fn new(private_dir: &Path) -> Result<Registry, PluginError> {
        fs::create_dir_all(private_dir).map_err(|source| PluginError::Io {
            context: format!(
                "cannot create the private plugin folder {}",
                private_dir.display()
            ),
            source,
        })?;
        fs::set_permissions(private_dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            PluginError::Io {
                context: format!("cannot set permissions of {}", private_dir.display()),
                source,
            }
        })?;
        // Libraries are mapped executable from here: on a noexec mount every load would fail
        // with a message about the plugin ("failed to map segment"), not about the mount.
        if let Ok(stat) = nix::sys::statvfs::statvfs(private_dir) {
            if stat.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC) {
                return Err(PluginError::NoExec {
                    dir: private_dir.to_owned(),
                });
            }
        }
        Ok(Registry {
            private_dir: private_dir.to_owned(),
            loaded: HashMap::new(),
        })
    }

    /// Loads the current content of `source`: copies it privately, probes the copy in a child
    /// (with `init` for each of `probe_settings`, bounded by `init_timeout`), then loads it here.
    /// Loading unchanged bytes again returns the library already loaded; it is probed only to
    /// try `init` with `probe_settings`.
    pub fn load(
        &mut self,
        source: &Path,
        probe_settings: &[String],
        init_timeout: Duration,
    ) -> Result<Loaded, PluginError> {
        let staged = self.stage(source)?;
        if staged.loaded.is_none() || !probe_settings.is_empty() {
            probe(&staged.private, probe_settings, init_timeout).map_err(|e| staged.rename(e))?;
        }
        self.commit(&staged)
    }

    /// The first step of loading, cheap and safe: reads `source`, hashes it, and makes sure
    /// its private copy exists. The copy must pass a probe before [`Registry::commit`].
    pub fn stage(&mut self, source: &Path) -> Result<Staged, PluginError> {
        let bytes = fs::read(source).map_err(|e| PluginError::Unreadable {
            path: source.to_owned(),
            source: e,
        })?;
        let hash = ContentHash::of(&bytes);
        let loaded = self.loaded.get(&hash).cloned();
        let private = match &loaded {
            // Already mapped; its private copy may have been deleted when nothing used it, but
            // a probe and new workers' bookkeeping need the file: write it again.
            Some(l) if l.private.exists() => l.private.clone(),
            _ => write_private_copy(&self.private_dir, source, &bytes, &hash)?,
        };
        if let Some(l) = self.loaded.get_mut(&hash) {
            l.private = private.clone();
        }
        Ok(Staged {
            hash,
            source: source.to_owned(),
            private,
            loaded,
        })
    }

    /// The last step: loads a staged build into this process (once per build; a build loaded
    /// before is returned as it is). Only for a build whose private copy passed a probe.
    pub fn commit(&mut self, staged: &Staged) -> Result<Loaded, PluginError> {
        if let Some(loaded) = self.loaded.get(&staged.hash) {
            return Ok(Loaded {
                source: staged.source.clone(),
                ..loaded.clone()
            });
        }
        let module = load_in_process(&staged.private).map_err(|e| staged.rename(e))?;
        let library = Library {
            module,
            hash: staged.hash,
        };
        let loaded = Loaded {
            library,
            info: library.info(),
            source: staged.source.clone(),
            private: staged.private.clone(),
        };
        self.loaded.insert(staged.hash, loaded.clone());
        Ok(loaded)
    }

    pub fn delete_unused(&self, in_use: &[ContentHash]) -> Vec<PathBuf> {
        let mut deleted = Vec::new();
        for (hash, loaded) in &self.loaded {
            if !in_use.contains(hash) && fs::remove_file(&loaded.private).is_ok() {
                deleted.push(loaded.private.clone());
            }
        }
        deleted
    }

    /// Every build loaded so far (they stay mapped for the life of the process).
    pub fn loaded(&self) -> impl Iterator<Item = &Loaded> {
        self.loaded.values()
    }
}

/// Copies a plugin's bytes to `dir/<name>-<hash>.so` (via `.tmp` and a rename), unless that
/// file is already there: same name means same content.
fn write_private_copy(
    dir: &Path,
    source: &Path,
    bytes: &[u8],
    hash: &ContentHash,
) -> Result<PathBuf, PluginError> {
    let stem = source
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".so"))
        .map(|n| n.strip_prefix("lib").unwrap_or(n))
        .unwrap_or("plugin");
    let private = dir.join(format!("{stem}-{}.so", hash.short()));
    if private.exists() {
        // Same name means same content hash: a copy from an earlier load or run.
        return Ok(private);
    }
    let tmp = dir.join(format!("{stem}-{}.so.tmp", hash.short()));
    let io = |source| PluginError::Io {
        context: format!("cannot write private plugin copy {}", tmp.display()),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, &private).map_err(io)?;
    Ok(private)
}

/// Replaces `from` by `to` in an error's path, so messages name the file the user knows.
fn rename_path(mut error: PluginError, from: &Path, to: &Path) -> PluginError {
    use PluginError::*;
    match &mut error {
        Unreadable { path, .. }
        | NotALibrary { path, .. }
        | NotAPlugin { path }
        | IncompatibleVersion { path, .. }
        | IncompatibleAbi { path, .. }
        | LoadFailed { path, .. }
        | ProbeCrashed { path, .. }
        | ProbeExited { path, .. }
        | ProbeTimeout { path, .. }
        | InitFailed { path, .. }
        | ModeUnsupported { path, .. }
        | Probe { path, .. }
        | Untrusted { path, .. } => {
            if path == from {
                *path = to.to_owned();
            }
        }
        Io { .. } | NoExec { .. } => {}
    }
    error
}

/// Loads a library into this process. Only call it on a file that passed [`probe`].
fn load_in_process(path: &Path) -> Result<PluginModRef, PluginError> {
    // dlopen looks a name without a slash up in the library search path (and could load a
    // system library of that name): always hand it a path with one.
    let with_slash;
    let file = if path.components().count() > 1 || path.is_absolute() {
        path
    } else {
        with_slash = Path::new(".").join(path);
        &with_slash
    };
    let header = lib_header_from_path(file).map_err(|e| classify(path, e))?;
    header
        .init_root_module::<PluginModRef>()
        .map_err(|e| classify(path, e))
}

/// Turns abi_stable's error into ours: the variant, and only the lines that say what is wrong.
fn classify(path: &Path, error: LibraryError) -> PluginError {
    let path = path.to_owned();
    match error {
        LibraryError::OpenError { err, .. } => PluginError::NotALibrary {
            path,
            detail: strip_path(&err.to_string()),
        },
        LibraryError::GetSymbolError { .. } => PluginError::NotAPlugin { path },
        LibraryError::IncompatibleVersionNumber { actual_version, .. } => {
            PluginError::IncompatibleVersion {
                path,
                expected: HOST_API_VERSION.to_owned(),
                found: actual_version.to_string(),
            }
        }
        LibraryError::AbiInstability(err) => PluginError::IncompatibleAbi {
            path,
            expected: HOST_API_VERSION.to_owned(),
            detail: summarize_abi_error(&err.to_string()),
        },
        other => PluginError::LoadFailed {
            path,
            detail: one_line(&other.to_string()),
        },
    }
}

/// dlopen messages start with the path we already print; keep the reason.
fn strip_path(message: &str) -> String {
    let message = one_line(message);
    match message.rsplit_once(": ") {
        Some((_, reason)) if !reason.is_empty() => reason.to_owned(),
        _ => message,
    }
}

/// abi_stable's layout report is ~240 lines. Keep what tells the operator what is wrong: the
/// `Error:` verdicts, the innermost expected/found layout pair, and the plugin-api version the
/// plugin's types carry when it differs from ours.
fn summarize_abi_error(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim).collect();
    let mut verdicts: Vec<&str> = Vec::new();
    for line in &lines {
        if let Some(v) = line.strip_prefix("Error:") {
            if !verdicts.contains(&v) {
                verdicts.push(v);
            }
        }
    }
    if verdicts.is_empty() {
        return one_line(report);
    }
    let after = |heading: &str| {
        // The innermost (most specific) mismatch comes last.
        lines
            .iter()
            .rposition(|l| *l == heading)
            .and_then(|i| lines.get(i + 1))
            .copied()
    };
    let mut summary = verdicts.join(", ");
    if let (Some(expected), Some(found)) = (
        after("Layout of expected type:"),
        after("Layout of found type:"),
    ) {
        summary.push_str(&format!("; expected `{expected}`, found `{found}`"));
    }
    // Lines look like `package:'jobhost-plugin-api' version:'0.1.1'`, sometimes with more after.
    let theirs = lines.iter().find_map(|l| {
        let version = l.strip_prefix("package:'jobhost-plugin-api' version:'")?;
        let version = &version[..version.find('\'')?];
        (version != HOST_API_VERSION).then_some(version)
    });
    if let Some(theirs) = theirs {
        summary.push_str(&format!(
            " (the plugin's types come from plugin-api {theirs})"
        ));
    }
    summary
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What the probe child reports through its pipe, one line each.
#[derive(Debug, Serialize, Deserialize)]
enum ProbeLine {
    Stage(ProbeStage),
    Loaded(Info),
    Failed(ProbeFailure),
}

/// A refusal, in a form that crosses the pipe.
#[derive(Debug, Serialize, Deserialize)]
enum ProbeFailure {
    NotALibrary(String),
    NotAPlugin,
    IncompatibleVersion(String),
    IncompatibleAbi(String),
    LoadFailed(String),
    InitFailed(String),
}

impl ProbeFailure {
    fn from_error(e: PluginError) -> ProbeFailure {
        match e {
            PluginError::NotALibrary { detail, .. } => ProbeFailure::NotALibrary(detail),
            PluginError::NotAPlugin { .. } => ProbeFailure::NotAPlugin,
            PluginError::IncompatibleVersion { found, .. } => {
                ProbeFailure::IncompatibleVersion(found)
            }
            PluginError::IncompatibleAbi { detail, .. } => ProbeFailure::IncompatibleAbi(detail),
            PluginError::InitFailed { message, .. } => ProbeFailure::InitFailed(message),
            other => ProbeFailure::LoadFailed(other.to_string()),
        }
    }

    fn into_error(self, path: &Path) -> PluginError {
        let path = path.to_owned();
        let expected = HOST_API_VERSION.to_owned();
        match self {
            ProbeFailure::NotALibrary(detail) => PluginError::NotALibrary { path, detail },
            ProbeFailure::NotAPlugin => PluginError::NotAPlugin { path },
            ProbeFailure::IncompatibleVersion(found) => PluginError::IncompatibleVersion {
                path,
                expected,
                found,
            },
            ProbeFailure::IncompatibleAbi(detail) => PluginError::IncompatibleAbi {
                path,
                expected,
                detail,
            },
            ProbeFailure::LoadFailed(detail) => PluginError::LoadFailed { path, detail },
            ProbeFailure::InitFailed(message) => PluginError::InitFailed { path, message },
        }
    }
}

/// Loads `path` in a throw-away child, checks it, and runs `init` once per entry of
/// `init_settings`; returns the plugin's metadata. Nothing is loaded in this process. Waits
/// for the child (at most `init_timeout`); the master, which must not stop for that long, uses
/// a [`ProbeRun`] in its poll loop instead.
///
/// The caller must be single-threaded (the master, the CLI): the child is forked, not exec'd.
pub fn probe(
    path: &Path,
    init_settings: &[String],
    init_timeout: Duration,
) -> Result<Info, PluginError> {
    let mut run = ProbeRun::start(path, init_settings, init_timeout)?;
    loop {
        let left = run.deadline().saturating_duration_since(Instant::now());
        if left.is_zero() {
            return run.finish(true);
        }
        let millis =
            u16::try_from(left.as_millis().min(u128::from(u16::MAX - 1))).unwrap_or(u16::MAX - 1);
        let mut fds = [PollFd::new(run.fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis.max(1))) {
            Ok(0) | Err(nix::Error::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                run.kill();
                return Err(PluginError::Probe {
                    path: path.to_owned(),
                    detail: format!("poll: {e}"),
                });
            }
        }
        if run.read_report() {
            return run.finish(false);
        }
    }
}

/// A probe child at work. [`ProbeRun::start`] forks it; the caller watches [`ProbeRun::fd`]
/// (readable: call [`ProbeRun::read_report`]), hands over the exit status if it reaps children
/// itself ([`ProbeRun::reaped`]), and gets the verdict from [`ProbeRun::finish`] once the
/// child closed its end of the pipe — or at [`ProbeRun::deadline`], which kills it.
pub struct ProbeRun {
    path: PathBuf,
    child: Pid,
    pipe: fs::File,
    report: Vec<u8>,
    eof: bool,
    status: Option<WaitStatus>,
    started: Instant,
    timeout: Duration,
}

impl ProbeRun {
    /// Forks the probe child for `path`. The caller must be single-threaded.
    pub fn start(
        path: &Path,
        init_settings: &[String],
        init_timeout: Duration,
    ) -> Result<ProbeRun, PluginError> {
        // A plain message for the commonest mistake, before dlopen words it its own way.
        fs::File::open(path).map_err(|source| PluginError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        let io = |context: &str| {
            let context = format!("{context} for probing {}", path.display());
            move |e: nix::Error| PluginError::Io {
                context,
                source: io::Error::from(e),
            }
        };
        let (read_end, write_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io("cannot create a pipe"))?;
        let parent = nix::unistd::getpid();
        // SAFETY: the child only loads the library, runs init, writes to the pipe and
        // `_exit`s; the callers (the master, the CLI) hold no other threads whose locks it
        // could need.
        match unsafe { fork() }.map_err(io("cannot fork"))? {
            ForkResult::Child => {
                drop(read_end);
                // A signal for the probe is the probe's, not the master's; and a probe hung
                // in `init` dies with whoever started it.
                crate::signals::reset_after_fork();
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
                if nix::unistd::getppid() != parent {
                    // SAFETY: as below.
                    unsafe { nix::libc::_exit(4) }
                }
                let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    probe_child(path, init_settings, write_end)
                }))
                .map_or(3, |()| 0);
                // SAFETY: `_exit` skips atexit handlers and stdio flushing that belong to the
                // parent.
                unsafe { nix::libc::_exit(status) }
            }
            ForkResult::Parent { child } => {
                drop(write_end);
                let pipe = fs::File::from(read_end);
                let nonblocking = nix::fcntl::fcntl(
                    &pipe,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                );
                let run = ProbeRun {
                    path: path.to_owned(),
                    child,
                    pipe,
                    report: Vec::new(),
                    eof: false,
                    status: None,
                    started: Instant::now(),
                    timeout: init_timeout,
                };
                if let Err(e) = nonblocking {
                    run.kill();
                    return Err(io("cannot set up the pipe")(e));
                }
                Ok(run)
            }
        }
    }

    /// Readable when the child reported something or closed the pipe.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.pipe.as_fd()
    }

    pub fn pid(&self) -> Pid {
        self.child
    }

    /// When the probe has run out of time.
    pub fn deadline(&self) -> Instant {
        self.started + self.timeout
    }

    /// Reads what the child wrote; true once it closed its end (it finished, or died).
    pub fn read_report(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        while !self.eof {
            match self.pipe.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.report.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
        true
    }

    /// The child's exit status, for a caller that reaps every child itself (the master).
    pub fn reaped(&mut self, status: WaitStatus) {
        self.status = Some(status);
    }

    /// The child closed its pipe and has been reaped: [`ProbeRun::finish`] will not wait.
    pub fn is_done(&self) -> bool {
        self.eof && self.status.is_some()
    }

    fn kill(&self) {
        let _ = kill(self.child, Signal::SIGKILL);
    }

    /// Gives up on the probe: kills it without waiting (a caller that reaps every child, the
    /// master, reaps it later).
    pub fn abandon(self) {
        self.kill();
    }

    /// The verdict. `out_of_time`: the deadline passed first — the child is killed and the
    /// probe fails with [`PluginError::ProbeTimeout`]. Waits for the child if not reaped yet.
    pub fn finish(mut self, out_of_time: bool) -> Result<Info, PluginError> {
        if out_of_time {
            self.kill();
        }
        let status = match self.status {
            Some(status) => status,
            None => loop {
                match waitpid(self.child, None) {
                    Err(nix::Error::EINTR) => continue,
                    Ok(status) => break status,
                    Err(e) => {
                        return Err(PluginError::Probe {
                            path: self.path.clone(),
                            detail: format!("cannot wait for the probe child: {e}"),
                        })
                    }
                }
            },
        };
        // Whatever it wrote before it died places the failure.
        if !out_of_time {
            self.read_report();
        }
        let lines = parse_lines(&self.report);
        let path = self.path.as_path();
        let stage = lines
            .iter()
            .rev()
            .find_map(|l| match l {
                ProbeLine::Stage(s) => Some(*s),
                _ => None,
            })
            .unwrap_or(ProbeStage::Loading);
        if out_of_time {
            return Err(PluginError::ProbeTimeout {
                path: path.to_owned(),
                stage,
                timeout: self.timeout,
            });
        }
        for line in lines {
            match line {
                ProbeLine::Loaded(info) if status == WaitStatus::Exited(self.child, 0) => {
                    return Ok(info)
                }
                ProbeLine::Failed(failure) => return Err(failure.into_error(path)),
                _ => {}
            }
        }
        Err(probe_death(path, stage, status, self.child))
    }
}

fn probe_death(path: &Path, stage: ProbeStage, status: WaitStatus, child: Pid) -> PluginError {
    match status {
        WaitStatus::Signaled(_, signal, _) => PluginError::ProbeCrashed {
            path: path.to_owned(),
            stage,
            signal: signal.as_str().to_owned(),
            hint: match (signal, stage) {
                (Signal::SIGBUS, ProbeStage::Loading) => {
                    " — is the file truncated, or still being copied?"
                }
                _ => "",
            },
        },
        WaitStatus::Exited(_, code) => PluginError::ProbeExited {
            path: path.to_owned(),
            stage,
            code,
        },
        other => PluginError::Probe {
            path: path.to_owned(),
            detail: format!("probe child {child} ended oddly: {other:?}"),
        },
    }
}

fn parse_lines(buf: &[u8]) -> Vec<ProbeLine> {
    buf.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect()
}

/// The probe child's work. Reports each stage before entering it, so a crash can be placed.
fn probe_child(path: &Path, init_settings: &[String], pipe: OwnedFd) {
    crate::logging::set_role("probe");
    let mut out = fs::File::from(pipe);
    let mut send = |line: &ProbeLine| {
        if let Ok(mut bytes) = serde_json::to_vec(line) {
            bytes.push(b'\n');
            let _ = out.write_all(&bytes);
        }
    };
    send(&ProbeLine::Stage(ProbeStage::Loading));
    let library = match load_in_process(path) {
        Ok(module) => Library {
            module,
            hash: ContentHash::of(&[]),
        },
        Err(e) => return send(&ProbeLine::Failed(ProbeFailure::from_error(e))),
    };
    let info = library.info();
    send(&ProbeLine::Stage(ProbeStage::Initialising));
    for settings in init_settings {
        if let Err(e) = library.instantiate(path, settings) {
            return send(&ProbeLine::Failed(ProbeFailure::from_error(e)));
        }
    }
    send(&ProbeLine::Loaded(info));
}

/// What the host hands every plugin: a log callback into the host's logger.
pub fn host_context() -> HostContext {
    let max_level = match log::max_level() {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Trace => 5,
    };
    HostContext {
        log: log_from_plugin,
        max_level,
    }
}

/// Receives a plugin's log record and passes it to the host's logger.
extern "C" fn log_from_plugin(level: u8, target: RStr<'_>, message: RStr<'_>) {
    let level = match level {
        1 => log::Level::Error,
        2 => log::Level::Warn,
        3 => log::Level::Info,
        4 => log::Level::Debug,
        _ => log::Level::Trace,
    };
    // A logger that panics must not unwind into the plugin.
    let _ = std::panic::catch_unwind(|| {
        log::logger().log(
            &log::Record::builder()
                .level(level)
                .target(target.as_str())
                .args(format_args!("{}", message.as_str()))
                .build(),
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_report_keeps_the_verdicts_the_layouts_and_the_plugins_api_version() {
        let report = "\nlots of layout\n  package:'jobhost-plugin-api' version:'0.1.9'Tag:\n\
            Layout of expected type:\n    fn(a: u8)\n   lifetimes\nLayout of found type:\n    fn()\n\
            Error:too many fields\n more\n  Error:too many fields\n Error:unexpected field\n";
        assert_eq!(
            summarize_abi_error(report),
            "too many fields, unexpected field; expected `fn(a: u8)`, found `fn()` \
             (the plugin's types come from plugin-api 0.1.9)"
        );
        assert_eq!(summarize_abi_error("no\nverdict here"), "no verdict here");
    }

    #[test]
    fn hashes_name_builds() {
        let a = ContentHash::of(b"a");
        assert_eq!(a.short().len(), 16);
        assert_eq!(a.to_string().len(), 64);
        assert_ne!(a, ContentHash::of(b"b"));
    }
}
