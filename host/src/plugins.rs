//! Plugin loading: private copies, the probe child, and the registry of loaded libraries.
//!
//! Owns the path from a user's `lib<name>.so` to an initialised [`PluginInstance`]:
//! 0. **trust** ([`PluginFile::open`]): only code root or the master's own user controls runs
//!    in the master (sshd's StrictModes). The file is opened once; the descriptor (`fstat`) and
//!    every folder up the configured path and up the real path it resolved to must belong to
//!    root or the master's euid and be writable by neither group nor others; the bytes used are
//!    read from that descriptor, so a file renamed into place after the checks is never used.
//!    `jobhost check`, start-up and reload all go through it;
//! 1. **copy** the bytes, by content hash, to `runtime_dir/plugins/<name>-<hash>.so` — dlopen
//!    caches by path and a file overwritten in place under a process that maps it crashes that
//!    process, so the user's file is never mapped. The folder is the master's own (created
//!    0700, or refused unless it is; emptied of earlier runs' copies at start), and a copy is
//!    **always written afresh** (an `O_EXCL|O_NOFOLLOW` temporary, fsync, rename over the
//!    name), never trusted because a file of that name exists. Written afresh rather than
//!    re-hashed: the bytes are in hand already, and a re-hash by name followed by a dlopen by
//!    name would be one more check-then-use. Renaming over a copy this process maps keeps the
//!    mapped inode intact, and a dlopen of that path then returns the loaded build — the same
//!    hash, so the same bytes. One exception, for reloads: a file whose device, inode, size,
//!    mtime and ctime are what they were when it was hashed (and had settled then) is not read
//!    again; its build, loaded already, is used as it is (see [`Registry::stage`]);
//! 2. **probe** the copy in a throw-away child that leads its own process group: load, check
//!    the ABI (and refuse a `panic = "abort"` build), optionally `init` — a truncated `.so`
//!    kills whoever dlopens it with SIGBUS, and a plugin may crash or hang in `init`, so only
//!    the child can take that risk. An `init` that leaves a thread or a child process behind
//!    is refused (the master forks after `init`), and the probe's group is killed when it is
//!    done, so nothing it forked survives it;
//! 3. **load** the copy in this process (never unloaded: abi_stable leaks every library), and
//!    `init` instances from it.
//!
//! It never loads into this process a file that has not passed a probe, never maps the user's
//! file in place, never reads a plugin by name after checking it, never trusts a file in the
//! runtime folder by its name, never follows a symlink at a file it writes, and never runs a
//! plugin's job code (`handle`, `run_once`): workers do that.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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
    #[error("plugin {path} started {threads} thread(s) in init; jobhost forks after init, and threads do not survive fork (a forked worker gets only the forking thread, and any lock another thread held stays locked): start threads in worker_start")]
    StartedThreads { path: PathBuf, threads: usize },
    #[error("plugin {path} left {children} child process(es) running after init; jobhost runs init in throw-away probes and in the master, so such a process would be started again each time and outlive its probe: start processes in worker_start")]
    LeftChildren { path: PathBuf, children: usize },
    #[error("plugin {path} was built with panic = \"abort\": a panic in it would kill the master (init runs there) or its worker with SIGABRT and no message; build it with panic = \"unwind\" (in the [profile.release] of its workspace)")]
    PanicAbort { path: PathBuf },
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
        what: String,
        path: PathBuf,
        why: String,
    },
    #[error("refusing to use {what} {path}: it {why}; jobhost keeps its sockets, pidfile and private plugin copies there, so only the user it runs as may write it (chown it, chmod go-w it, or remove it and let jobhost create it)")]
    UnsafeRuntime {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// Refuses a plugin that a user other than root or the master's own could have replaced (like
/// sshd's StrictModes), by the same checks [`Registry::stage`] makes: see [`PluginFile::open`].
/// `plugins_dir` is checked too when it is not the file's own folder.
pub fn check_trusted(plugins_dir: &Path, file: &Path) -> Result<(), PluginError> {
    if file.parent() != Some(plugins_dir) {
        check_dir_chain(plugins_dir, "plugins dir", &[])?;
    }
    PluginFile::open(file, true).map(|_| ())
}

/// A user's plugin file, opened once. What is hashed, copied or probed is read from this
/// descriptor, never from the name again, so a file renamed into place after the checks is
/// never the one used.
pub struct PluginFile {
    /// The open descriptor, checked (unless the checks were off).
    pub file: fs::File,
    /// The path the config names.
    pub path: PathBuf,
}

impl PluginFile {
    /// Opens `path` (following symlinks) and, with `check`, refuses it unless:
    /// - the open descriptor (`fstat`) is a regular file owned by root or the master's euid,
    ///   writable by neither group nor others;
    /// - every folder on the configured path, and every folder on the real path of the open
    ///   file (where its symlinks lead), belongs to root or the master's euid and is writable
    ///   by neither group nor others. A world-writable folder with the sticky bit (`/tmp`) is
    ///   accepted only on the way to an entry in it that belongs to root or the master's euid
    ///   (the sticky bit keeps everyone else from renaming or removing that entry); it is
    ///   refused as the folder that holds the plugin, where anyone may create files.
    ///
    /// Without `check` (`host.insecure_plugins_dir = true`) it only opens the file.
    pub fn open(path: &Path, check: bool) -> Result<PluginFile, PluginError> {
        let abs = absolute(path)?;
        if check {
            check_dir_chain(&abs, "plugin", &[])?;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            // A FIFO planted at the path must not block the master: it is refused below.
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| PluginError::Unreadable {
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| PluginError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(PluginError::Untrusted {
                what: "plugin".into(),
                path: path.to_owned(),
                why: "is not a regular file".into(),
            });
        }
        if check {
            use std::os::unix::fs::MetadataExt;
            let me = nix::unistd::geteuid().as_raw();
            if let Some(why) = distrust(meta.mode(), meta.uid(), me, false) {
                return Err(PluginError::Untrusted {
                    what: "plugin".into(),
                    path: path.to_owned(),
                    why,
                });
            }
            // Where the open file really is: the kernel's name for this descriptor, and the
            // configured name resolved now. Both must lead to this very file, through folders
            // nobody else can change.
            let by_fd = fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok();
            let canonical = fs::canonicalize(path).map_err(|source| PluginError::Unreadable {
                path: path.to_owned(),
                source,
            })?;
            let mut reals = vec![canonical];
            if let Some(by_fd) = by_fd.filter(|p| *p != reals[0]) {
                reals.push(by_fd);
            }
            for real in &reals {
                // The folders first: when someone else can write one, that is the reason.
                if *real != abs {
                    check_dir_chain(real, "symlink target", &[("the plugin", path)])?;
                }
                let same = fs::metadata(real)
                    .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
                if !same {
                    return Err(PluginError::Untrusted {
                        what: "plugin".into(),
                        path: path.to_owned(),
                        why: format!(
                            "was replaced while it was being checked (it resolved to {})",
                            real.display()
                        ),
                    });
                }
            }
        }
        Ok(PluginFile {
            file,
            path: path.to_owned(),
        })
    }

    /// Reads the whole file from the open descriptor.
    pub fn read_all(&mut self) -> Result<Vec<u8>, PluginError> {
        let mut bytes = Vec::new();
        self.file
            .read_to_end(&mut bytes)
            .map_err(|source| PluginError::Unreadable {
                path: self.path.clone(),
                source,
            })?;
        Ok(bytes)
    }

    /// A name for the open descriptor that a probe child (forked, so it holds the same
    /// descriptor) can dlopen: the opened file itself, whatever happened to its name since.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Makes an error about [`PluginFile::fd_path`] name the configured path instead.
    pub fn rename(&self, e: PluginError) -> PluginError {
        rename_path(e, &self.fd_path(), &self.path)
    }
}

/// `path` made absolute against the current folder (without resolving symlinks).
fn absolute(path: &Path) -> Result<PathBuf, PluginError> {
    std::path::absolute(path).map_err(|source| PluginError::Unreadable {
        path: path.to_owned(),
        source,
    })
}

/// Checks every folder above `leaf` (an absolute path), from `/` down: each must belong to
/// root or the master's euid and be writable by neither group nor others (a sticky
/// world-writable folder: see [`PluginFile::open`]). `leaf_what` names what `leaf` is (for a
/// "plugin", its folder is the "plugins dir"); `via` says which configured path led
/// there, for an error about a symlink's target.
fn check_dir_chain(leaf: &Path, leaf_what: &str, via: &[(&str, &Path)]) -> Result<(), PluginError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let leaf = absolute(leaf)?;
    let mut chain: Vec<&Path> = leaf.ancestors().skip(1).collect();
    chain.reverse();
    let suffix = via
        .iter()
        .map(|(what, p)| {
            format!(
                " (on the way to {what} {}, a symlink to {})",
                p.display(),
                leaf.display()
            )
        })
        .collect::<String>();
    for (i, dir) in chain.iter().enumerate() {
        let next: &Path = chain.get(i + 1).copied().unwrap_or(&leaf);
        let is_parent = i + 1 == chain.len();
        let what = if is_parent && leaf_what == "plugin" {
            "plugins dir".to_string()
        } else {
            "folder".to_string()
        };
        let refuse = |why: String| PluginError::Untrusted {
            what: what.clone(),
            path: dir.to_path_buf(),
            why: format!("{why}{suffix}"),
        };
        let meta = fs::metadata(dir).map_err(|source| PluginError::Unreadable {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(refuse("is not a folder".into()));
        }
        let Some(why) = distrust(meta.mode(), meta.uid(), me, true) else {
            continue;
        };
        let sticky = meta.mode() & 0o1000 != 0;
        if sticky && !is_parent && trusted_owner(meta.uid(), me) {
            // Like /tmp: others may create entries here but not rename or remove ours.
            let entry = fs::symlink_metadata(next).map_err(|source| PluginError::Unreadable {
                path: next.to_path_buf(),
                source,
            })?;
            if trusted_owner(entry.uid(), me) {
                continue;
            }
            return Err(refuse(format!(
                "{why}, and {} in it belongs to uid {}, neither root nor the user jobhost runs as (uid {me})",
                next.display(),
                entry.uid()
            )));
        }
        return Err(refuse(why));
    }
    Ok(())
}

fn trusted_owner(uid: u32, me: u32) -> bool {
    uid == 0 || uid == me
}

/// Why a file or folder with this mode and owner is not to be trusted, or `None`.
fn distrust(mode: u32, uid: u32, me: u32, is_dir: bool) -> Option<String> {
    let mode = mode & 0o7777;
    if mode & 0o002 != 0 {
        return Some(if is_dir && mode & 0o1000 != 0 {
            format!("is writable by everyone (mode {mode:04o}; its sticky bit still lets anyone create files in it, and sshd refuses such a folder too)")
        } else {
            format!("is writable by everyone (mode {mode:04o})")
        });
    }
    if mode & 0o020 != 0 {
        return Some(format!("is writable by its group (mode {mode:04o})"));
    }
    if !trusted_owner(uid, me) {
        return Some(format!(
            "belongs to uid {uid}, neither root nor the user jobhost runs as (uid {me})"
        ));
    }
    None
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
    /// so what `init` builds is shared copy-on-write by the workers — which is why an `init`
    /// that leaves a thread behind is refused ([`PluginError::StartedThreads`]): the threads
    /// of this process are counted before and after. (The instance is dropped; the thread
    /// cannot be: in the master that is for the probe, which runs first, to prevent.)
    pub fn instantiate(
        &self,
        path: &Path,
        settings_toml: &str,
    ) -> Result<PluginInstance, PluginError> {
        let before = thread_count();
        let instance = match (self.module.init())(RStr::from_str(settings_toml), host_context()) {
            RResult::ROk(instance) => instance,
            RResult::RErr(message) => {
                return Err(PluginError::InitFailed {
                    path: path.to_owned(),
                    message: message.into_string(),
                })
            }
        };
        match (before, thread_count()) {
            (Some(before), Some(after)) if after > before => Err(PluginError::StartedThreads {
                path: path.to_owned(),
                threads: after - before,
            }),
            _ => Ok(instance),
        }
    }
}

/// The threads of this process (`/proc/self/task`), or `None` when /proc cannot say.
fn thread_count() -> Option<usize> {
    Some(fs::read_dir("/proc/self/task").ok()?.count())
}

/// The child processes this (single-threaded) process has, zombies included
/// (`/proc/thread-self/children`), or `None` when /proc cannot say.
fn child_count() -> Option<usize> {
    let text = fs::read_to_string("/proc/thread-self/children").ok()?;
    Some(text.split_whitespace().count())
}

/// The name of the function [`jobhost_plugin_api::export_plugin!`] exports since plugin-api
/// 0.1.2 to say whether the plugin was built with `panic = "unwind"`.
const PANIC_UNWIND_SYMBOL: &[u8] = b"jobhost_plugin_panic_unwind";

/// Whether the library at `path` (loaded already) was built to unwind: `None` for a plugin
/// built against plugin-api 0.1.0 or 0.1.1, which do not say.
fn panics_unwind(path: &Path) -> Option<bool> {
    let library = abi_stable::library::RawLibrary::load_at(path).ok()?;
    // SAFETY: the symbol is the `extern "C" fn() -> bool` that `export_plugin!` defines; a
    // library that defines something else under that name is not built with plugin-api.
    let answer = unsafe { library.get::<extern "C" fn() -> bool>(PANIC_UNWIND_SYMBOL) }.ok()?;
    Some((*answer)())
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
    /// `host.insecure_plugins_dir`: skip the ownership and mode checks of plugin files.
    insecure: bool,
    /// Names this process's temporary files apart.
    next_tmp: u64,
    /// What each user's file was when it was last hashed, by its configured path: a reload
    /// that finds it unchanged does not read and hash it again (see [`Registry::stage`]).
    seen: HashMap<PathBuf, Seen>,
}

/// A user's file as it was when its bytes were hashed.
struct Seen {
    stamp: FileStamp,
    hash: ContentHash,
}

/// What tells that a file is the one read before, unchanged: the same file (device, inode)
/// with the same size, mtime and ctime. A writer can set mtime back, but not ctime: any write,
/// rename onto the name or `utimes` sets ctime to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How long after its last change a file must have been read for its stamp to vouch for
/// its bytes: a write in the same tick of the file system's clock as the read (and so as the
/// change before it) would leave ctime as it was. As git does for its index ("racy git").
const SETTLED: Duration = Duration::from_secs(2);

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file had stopped changing well before `now`, when it was read.
    fn settled(&self, now: std::time::SystemTime) -> bool {
        let secs = |(s, ns): (i64, i64)| {
            u64::try_from(s)
                .ok()
                .map(|s| std::time::UNIX_EPOCH + Duration::new(s, u32::try_from(ns).unwrap_or(0)))
        };
        [self.mtime, self.ctime].into_iter().all(|t| {
            secs(t)
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= SETTLED)
        })
    }
}

impl Registry {
    /// The registry of a master whose runtime folder is `runtime_dir`; private copies live in
    /// `runtime_dir/plugins`. Both folders are the master's own: created by it (`runtime_dir`
    /// mode 0755, `plugins` 0700), or, if they exist, refused unless they belong to the
    /// master's euid and are writable by neither group nor others (`plugins` must not be a
    /// symlink). Every file already in `plugins` is a copy from an earlier run, never trusted:
    /// it is removed. `insecure` is `host.insecure_plugins_dir` (see [`Registry::stage`]).
    pub fn open(runtime_dir: &Path, insecure: bool) -> Result<Registry, PluginError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(runtime_dir)
            .map_err(|source| PluginError::Io {
                context: format!("cannot create runtime_dir {}", runtime_dir.display()),
                source,
            })?;
        let meta = fs::metadata(runtime_dir).map_err(|source| PluginError::Io {
            context: format!("cannot stat runtime_dir {}", runtime_dir.display()),
            source,
        })?;
        own_folder("runtime_dir", runtime_dir, &meta)?;
        let mut registry = Registry::new(&runtime_dir.join("plugins"))?;
        registry.insecure = insecure;
        Ok(registry)
    }

    /// A registry whose private copies live in `private_dir` (the master's
    /// `runtime_dir/plugins`), with every check on: the folder is created (mode 0700, its
    /// parents 0755) or refused unless it is the master's own, and emptied of earlier copies.
    /// [`Registry::open`] checks `runtime_dir` too.
    pub fn new(private_dir: &Path) -> Result<Registry, PluginError> {
        use std::os::unix::fs::DirBuilderExt;
        let private_dir = private_dir.to_owned();
        if let Some(parent) = private_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|source| PluginError::Io {
                    context: format!("cannot create {}", parent.display()),
                    source,
                })?;
        }
        match fs::DirBuilder::new().mode(0o700).create(&private_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(PluginError::Io {
                    context: format!(
                        "cannot create the private plugin folder {}",
                        private_dir.display()
                    ),
                    source,
                })
            }
        }
        // Checked (and tightened to 0700) through a descriptor opened without following a
        // symlink, so the folder checked is the folder used.
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&private_dir)
            .map_err(|source| {
                let symlink = source.raw_os_error() == Some(nix::libc::ELOOP)
                    || source.raw_os_error() == Some(nix::libc::ENOTDIR);
                if symlink {
                    PluginError::UnsafeRuntime {
                        what: "the private plugin folder",
                        path: private_dir.clone(),
                        why: "is not a folder (a symlink or a file); jobhost follows no symlink there".into(),
                    }
                } else {
                    PluginError::Io {
                        context: format!("cannot open {}", private_dir.display()),
                        source,
                    }
                }
            })?;
        let meta = dir.metadata().map_err(|source| PluginError::Io {
            context: format!("cannot stat {}", private_dir.display()),
            source,
        })?;
        own_folder("the private plugin folder", &private_dir, &meta)?;
        dir.set_permissions(fs::Permissions::from_mode(0o700))
            .map_err(|source| PluginError::Io {
                context: format!("cannot set permissions of {}", private_dir.display()),
                source,
            })?;
        // Libraries are mapped executable from here: on a noexec mount every load would fail
        // with a message about the plugin ("failed to map segment"), not about the mount.
        if let Ok(stat) = nix::sys::statvfs::fstatvfs(&dir) {
            if stat.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC) {
                return Err(PluginError::NoExec { dir: private_dir });
            }
        }
        remove_earlier_copies(&private_dir);
        Ok(Registry {
            private_dir,
            loaded: HashMap::new(),
            insecure: false,
            next_tmp: 0,
            seen: HashMap::new(),
        })
    }

    /// Follows a reload's `host.insecure_plugins_dir`.
    pub fn set_insecure(&mut self, insecure: bool) {
        self.insecure = insecure;
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

    /// The first step of loading, cheap and safe: opens `source` once and checks it (unless
    /// `host.insecure_plugins_dir`; see [`PluginFile::open`]), hashes the bytes read from that
    /// descriptor, and writes them afresh as the private copy. The copy must pass a probe
    /// before [`Registry::commit`].
    ///
    /// A file whose [`FileStamp`] (taken from the open descriptor) is what it was when it was
    /// last hashed — and had settled then — is not read again: it is the build loaded from it,
    /// whose private copy is what this process maps (a probe forked from here that dlopens
    /// that path gets the mapped library, not the file). A no-op reload so costs an `open`
    /// and an `fstat` per plugin in the master's loop, instead of reading and hashing it.
    pub fn stage(&mut self, source: &Path) -> Result<Staged, PluginError> {
        let mut file = PluginFile::open(source, !self.insecure)?;
        let stamp = file.file.metadata().ok().map(|m| FileStamp::of(&m));
        let unchanged = self
            .seen
            .get(source)
            .filter(|seen| Some(seen.stamp) == stamp)
            .and_then(|seen| self.loaded.get(&seen.hash))
            .filter(|loaded| fs::symlink_metadata(&loaded.private).is_ok_and(|m| m.is_file()));
        if let Some(loaded) = unchanged {
            log::debug!(
                "plugin {} is unchanged since it was hashed (same device, inode, size, mtime and ctime): not read again",
                source.display()
            );
            return Ok(Staged {
                hash: loaded.library.hash,
                source: source.to_owned(),
                private: loaded.private.clone(),
                loaded: Some(loaded.clone()),
            });
        }
        let read_at = std::time::SystemTime::now();
        let bytes = file.read_all()?;
        let hash = ContentHash::of(&bytes);
        log::debug!(
            "hashed plugin {} ({} bytes): {}",
            source.display(),
            bytes.len(),
            hash.short()
        );
        match stamp.filter(|s| s.settled(read_at)) {
            Some(stamp) => {
                self.seen.insert(source.to_owned(), Seen { stamp, hash });
            }
            None => {
                self.seen.remove(source);
            }
        }
        let loaded = self.loaded.get(&hash).cloned();
        self.next_tmp += 1;
        let private = write_private_copy(&self.private_dir, source, &bytes, &hash, self.next_tmp)?;
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

/// Writes a plugin's bytes to `dir/<name>-<hash>.so`, always afresh: a temporary file created
/// with `O_EXCL | O_NOFOLLOW` (so nothing planted at its name is followed or reused), written,
/// fsynced, then renamed over the final name. Renaming over a copy this process maps is safe:
/// the mapped inode stays as it was (writing into it would crash whoever maps it).
fn write_private_copy(
    dir: &Path,
    source: &Path,
    bytes: &[u8],
    hash: &ContentHash,
    seq: u64,
) -> Result<PathBuf, PluginError> {
    let stem = source
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".so"))
        .map(|n| n.strip_prefix("lib").unwrap_or(n))
        .unwrap_or("plugin");
    let private = dir.join(format!("{stem}-{}.so", hash.short()));
    let tmp = dir.join(format!(
        ".{stem}-{}.so.{}.{seq}.tmp",
        hash.short(),
        std::process::id()
    ));
    let io = |source| PluginError::Io {
        context: format!("cannot write private plugin copy {}", tmp.display()),
        source,
    };
    let open = || {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .mode(0o600)
            .open(&tmp)
    };
    let mut file = match open() {
        // Left by a crash of a process with this pid: remove the name itself (never
        // following it), then create it anew.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp).map_err(io)?;
            open().map_err(io)?
        }
        other => other.map_err(io)?,
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, &private));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(private)
}

/// Removes every entry of the private folder at start: copies (and temporaries) of earlier
/// runs, which nothing vouches for. Unlinking never follows a symlink.
fn remove_earlier_copies(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) => log::warn!(
                "cannot remove {} left by an earlier run: {e}",
                path.display()
            ),
        }
    }
    if removed > 0 {
        log::info!(
            "removed {removed} private plugin cop{} left by an earlier run in {}",
            if removed == 1 { "y" } else { "ies" },
            dir.display()
        );
    }
}

/// Refuses a runtime folder the master does not own alone.
fn own_folder(what: &'static str, path: &Path, meta: &fs::Metadata) -> Result<(), PluginError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let why = if !meta.is_dir() {
        "is not a folder".to_string()
    } else if meta.uid() != me {
        format!(
            "belongs to uid {}, not to the user jobhost runs as (uid {me})",
            meta.uid()
        )
    } else if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 {
            "everyone"
        } else {
            "its group"
        };
        format!("is writable by {who} (mode {mode:04o})")
    } else {
        return Ok(());
    };
    Err(PluginError::UnsafeRuntime {
        what,
        path: path.to_owned(),
        why,
    })
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
        | StartedThreads { path, .. }
        | LeftChildren { path, .. }
        | PanicAbort { path }
        | ModeUnsupported { path, .. }
        | Probe { path, .. }
        | Untrusted { path, .. } => {
            if path == from {
                *path = to.to_owned();
            }
        }
        Io { .. } | NoExec { .. } | UnsafeRuntime { .. } => {}
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
    // Refused rather than warned about: `init` runs in the master, where an abort would take
    // the master down, and in a worker a panic would show only as SIGABRT, with no message.
    match panics_unwind(file) {
        Some(false) => {
            return Err(PluginError::PanicAbort {
                path: path.to_owned(),
            })
        }
        Some(true) => {}
        None => log::debug!(
            "{} does not say how it panics (built against plugin-api before 0.1.2)",
            path.display()
        ),
    }
    match header.init_root_module::<PluginModRef>() {
        Ok(module) => Ok(module),
        // abi_stable takes a prefix type with fewer fields than ours for a different layout:
        // a plugin built against plugin-api 0.1.0 (whose `PluginObject` vtable ends at
        // `run_once`) fails our check. It has 0.1.0's own layout, exactly.
        Err(LibraryError::AbiInstability(report)) if has_plugin_api_0_1_0_layout(header) => {
            log::debug!(
                "{} was built against plugin-api 0.1.0 (no handle_with): {}",
                path.display(),
                summarize_abi_error(&report.to_string())
            );
            // SAFETY: the root module's layout was just checked equal to plugin-api 0.1.0's
            // (compatible with it both ways: no method more).
            // Ours (0.1.1) differs from it only by a method appended to the `PluginObject`
            // vtable after its last prefix field (`run_once`); that method's accessor reads the
            // plugin's own vtable metadata, finds it missing, and runs the default body
            // (`handle`). Nothing else of 0.1.1 is in the root module's type graph.
            unsafe { header.init_root_module_with_unchecked_layout::<PluginModRef>() }
                .map_err(|e| classify(path, e))
        }
        Err(e) => Err(classify(path, e)),
    }
}

/// Whether the library's root module has plugin-api 0.1.0's layout, exactly — what makes it
/// safe to load with our (0.1.1) types unchecked. abi_stable's check alone does not say so: it
/// takes a prefix type with *more* fields than the caller's, so a library whose `PluginObject`
/// has 0.1.0's four methods and then a fifth that is not 0.1.1's `handle_with` (a fork, a
/// pre-release) passes it, and we would call that method as `handle_with`. The same check the
/// other way round (the library's layout as the one expected) refuses any field beyond 0.1.0's.
fn has_plugin_api_0_1_0_layout(header: &abi_stable::library::LibHeader) -> bool {
    use abi_stable::abi_stability::abi_checking::check_layout_compatibility;
    use abi_stable::StableAbi;
    let old = <plugin_api_0_1_0::PluginModRef as StableAbi>::LAYOUT;
    // No layout in the library: nothing to compare (and our own check did not run either).
    let Some(theirs) = header.layout() else {
        return false;
    };
    header
        .ensure_layout::<plugin_api_0_1_0::PluginModRef>()
        .is_ok()
        && check_layout_compatibility(theirs, old).is_ok()
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
            // A struct's layout (a vtable's) opens with a banner that says nothing.
            .filter(|l| !l.starts_with("---"))
    };
    // A field that differs (a vtable's method): its name, and its signature if it has one.
    let field = |heading: &str| {
        let i = lines.iter().rposition(|l| *l == heading)?;
        let name = lines.get(i + 1)?.strip_prefix("field_name:")?;
        let block = lines[i + 1..]
            .iter()
            .take_while(|l| **l != "Found:" && !l.starts_with("Error:"));
        Some(match block.skip_while(|l| **l != "fn pointer(s):").nth(1) {
            Some(signature) => format!("{name}: {signature}"),
            None => name.to_owned(),
        })
    };
    let mut summary = verdicts.join(", ");
    if let (Some(expected), Some(found)) = (
        after("Layout of expected type:"),
        after("Layout of found type:"),
    ) {
        summary.push_str(&format!("; expected `{expected}`, found `{found}`"));
    } else if let (Some(expected), Some(found)) = (field("Expected:"), field("Found:")) {
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
    StartedThreads(usize),
    LeftChildren(usize),
    PanicAbort,
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
            PluginError::StartedThreads { threads, .. } => ProbeFailure::StartedThreads(threads),
            PluginError::LeftChildren { children, .. } => ProbeFailure::LeftChildren(children),
            PluginError::PanicAbort { .. } => ProbeFailure::PanicAbort,
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
            ProbeFailure::StartedThreads(threads) => PluginError::StartedThreads { path, threads },
            ProbeFailure::LeftChildren(children) => PluginError::LeftChildren { path, children },
            ProbeFailure::PanicAbort => PluginError::PanicAbort { path },
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
        let parent_group = nix::unistd::getpgrp();
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
                // The probe leads its own process group, so that whatever its plugin forks
                // dies with it (see below, and `ProbeRun::reap_child`). Set here only, first
                // thing: the parent setting it too could, late, pull the probe back into the
                // group after it left it below.
                let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
                if nix::unistd::getppid() != parent {
                    // SAFETY: as below.
                    unsafe { nix::libc::_exit(4) }
                }
                let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    probe_child(path, init_settings, write_end)
                }))
                .map_or(3, |()| 0);
                // What `init` forked holds the probe's pipe open (so the verdict would wait
                // for the timeout), and would outlive the probe: kill its group — from outside
                // it, back in the parent's group, as a SIGKILL to a group the probe is in
                // would kill the probe too and read as a crash. The group's number is the
                // probe's own pid, so it cannot be anyone else's.
                let me = nix::unistd::getpid();
                if nix::unistd::setpgid(me, parent_group).is_ok() {
                    let _ = nix::sys::signal::killpg(me, Signal::SIGKILL);
                }
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

    /// Kills the probe and its process group — only while it is not reaped: until then its
    /// pid, and so the number of its group, cannot be anyone else's.
    fn kill(&self) {
        if self.status.is_none() {
            let _ = nix::sys::signal::killpg(self.child, Signal::SIGKILL);
            let _ = kill(self.child, Signal::SIGKILL);
        }
    }

    /// Waits for the probe to exit, kills what is left in its process group (what its plugin
    /// forked: it would hold the probe's pipe open, and outlive it) before reaping it — while
    /// the probe is a zombie its pid is not reused, so the group is certainly its own — then
    /// reaps it. (A caller that reaps every child itself, the master, does the same.)
    fn reap_child(&self) -> nix::Result<WaitStatus> {
        use nix::sys::wait::{waitid, Id, WaitPidFlag};
        loop {
            match waitid(
                Id::Pid(self.child),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
            ) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => break,
            }
        }
        let _ = nix::sys::signal::killpg(self.child, Signal::SIGKILL);
        loop {
            match waitpid(self.child, None) {
                Err(nix::Error::EINTR) => continue,
                other => return other,
            }
        }
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
            None => match self.reap_child() {
                Ok(status) => status,
                Err(e) => {
                    return Err(PluginError::Probe {
                        path: self.path.clone(),
                        detail: format!("cannot wait for the probe child: {e}"),
                    })
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
    // A process `init` forked and left running: the probe's group is killed once it is done,
    // but the master's own `init` would fork another, in the master's group, beyond reach.
    if let Some(children) = child_count().filter(|n| *n > 0) {
        return send(&ProbeLine::Failed(ProbeFailure::LeftChildren(children)));
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

    use std::os::unix::fs::{symlink, MetadataExt};

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A folder with a plugin file in it, under a fresh tempdir.
    fn world() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        fs::create_dir(&plugins).unwrap();
        chmod(&plugins, 0o755);
        fs::write(plugins.join("libx.so"), b"x").unwrap();
        chmod(&plugins.join("libx.so"), 0o644);
        (dir, plugins)
    }

    fn refusal(path: &Path) -> (String, PathBuf, String) {
        match PluginFile::open(path, true) {
            Err(PluginError::Untrusted { what, path, why }) => (what, path, why),
            Err(other) => panic!("expected a refusal, got {other}"),
            Ok(_) => panic!("{} was accepted", path.display()),
        }
    }

    #[test]
    fn distrust_names_the_reason() {
        assert_eq!(distrust(0o40755, 0, 1000, true), None);
        assert_eq!(distrust(0o40755, 1000, 1000, true), None);
        assert!(distrust(0o40777, 0, 0, true)
            .unwrap()
            .contains("everyone (mode 0777)"));
        assert!(distrust(0o41777, 0, 0, true)
            .unwrap()
            .contains("sticky bit"));
        assert!(distrust(0o40775, 0, 0, true)
            .unwrap()
            .contains("its group (mode 0775)"));
        assert!(distrust(0o100644, 65534, 0, false)
            .unwrap()
            .contains("uid 65534"));
    }

    #[test]
    fn a_trusted_plugin_opens_and_reads_from_its_descriptor() {
        let (_dir, plugins) = world();
        let mut file = PluginFile::open(&plugins.join("libx.so"), true).unwrap();
        // Replaced by name after the open: the descriptor still reads what was checked.
        fs::write(plugins.join("evil"), b"evil").unwrap();
        fs::rename(plugins.join("evil"), plugins.join("libx.so")).unwrap();
        assert_eq!(file.read_all().unwrap(), b"x");
    }

    #[test]
    fn a_world_or_group_writable_plugins_dir_is_refused() {
        let (_dir, plugins) = world();
        chmod(&plugins, 0o777);
        let (what, path, why) = refusal(&plugins.join("libx.so"));
        assert_eq!(
            (what.as_str(), path.as_path()),
            ("plugins dir", plugins.as_path())
        );
        assert!(why.contains("writable by everyone (mode 0777)"), "{why}");
        chmod(&plugins, 0o775);
        assert!(refusal(&plugins.join("libx.so")).2.contains("its group"));
        // Insecure mode opens it anyway.
        assert!(PluginFile::open(&plugins.join("libx.so"), false).is_ok());
    }

    #[test]
    fn a_farther_writable_folder_is_refused_and_named() {
        let (dir, plugins) = world();
        chmod(dir.path(), 0o777);
        let (what, path, _) = refusal(&plugins.join("libx.so"));
        assert_eq!((what.as_str(), path.as_path()), ("folder", dir.path()));
    }

    #[test]
    fn a_sticky_folder_holding_the_plugin_is_refused_but_one_further_up_is_not() {
        let (_dir, plugins) = world();
        chmod(&plugins, 0o1777);
        let (_, path, why) = refusal(&plugins.join("libx.so"));
        assert_eq!(path, plugins);
        assert!(
            why.contains("sticky bit still lets anyone create files"),
            "{why}"
        );
        // Like /tmp above a private tempdir: nobody else can rename our entry in it.
        chmod(&plugins, 0o755);
        let (dir, plugins) = world();
        chmod(dir.path(), 0o1777);
        assert!(PluginFile::open(&plugins.join("libx.so"), true).is_ok());
        if nix::unistd::geteuid().is_root() {
            // ... unless that entry belongs to someone else.
            std::os::unix::fs::chown(&plugins, Some(65534), None).unwrap();
            let (_, path, why) = refusal(&plugins.join("libx.so"));
            assert_eq!(path, dir.path());
            assert!(why.contains("belongs to uid 65534"), "{why}");
        }
        chmod(dir.path(), 0o700);
    }

    #[test]
    fn a_symlink_is_checked_where_it_leads() {
        let (dir, plugins) = world();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::write(open.join("real.so"), b"r").unwrap();
        chmod(&open.join("real.so"), 0o644);
        chmod(&open, 0o777);
        symlink(open.join("real.so"), plugins.join("liblink.so")).unwrap();
        let (what, path, why) = refusal(&plugins.join("liblink.so"));
        assert_eq!((what.as_str(), path.as_path()), ("folder", open.as_path()));
        assert!(why.contains("writable by everyone"), "{why}");
        assert!(why.contains("a symlink to"), "{why}");
        chmod(&open, 0o755);
        let mut file = PluginFile::open(&plugins.join("liblink.so"), true).unwrap();
        assert_eq!(file.read_all().unwrap(), b"r");
    }

    #[test]
    fn a_writable_or_foreign_file_or_a_fifo_is_refused() {
        let (_dir, plugins) = world();
        let file = plugins.join("libx.so");
        chmod(&file, 0o666);
        assert!(refusal(&file).2.contains("everyone"));
        chmod(&file, 0o644);
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
            let (what, path, why) = refusal(&file);
            assert_eq!((what.as_str(), path), ("plugin", file.clone()));
            assert!(why.contains("uid 65534"), "{why}");
        }
        let fifo = plugins.join("libfifo.so");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(refusal(&fifo).2.contains("not a regular file"));
    }

    #[test]
    fn the_runtime_folders_must_be_the_masters_own() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        Registry::open(&run, false).unwrap();
        assert_eq!(
            fs::metadata(run.join("plugins")).unwrap().mode() & 0o777,
            0o700
        );
        chmod(&run, 0o777);
        let e = Registry::open(&run, false).err().unwrap().to_string();
        assert!(
            e.contains("refusing to use runtime_dir") && e.contains("everyone"),
            "{e}"
        );
        chmod(&run, 0o755);
        chmod(&run.join("plugins"), 0o770);
        let e = Registry::open(&run, false).err().unwrap().to_string();
        assert!(
            e.contains("private plugin folder") && e.contains("its group"),
            "{e}"
        );
        fs::remove_dir(run.join("plugins")).unwrap();
        fs::create_dir(dir.path().join("elsewhere")).unwrap();
        symlink(dir.path().join("elsewhere"), run.join("plugins")).unwrap();
        let e = Registry::open(&run, false).err().unwrap().to_string();
        assert!(e.contains("jobhost follows no symlink there"), "{e}");
    }

    #[test]
    fn copies_of_earlier_runs_are_removed_and_copies_are_written_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        fs::create_dir_all(run.join("plugins")).unwrap();
        chmod(&run.join("plugins"), 0o700);
        let victim = dir.path().join("victim");
        fs::write(&victim, b"victim").unwrap();
        fs::write(run.join("plugins/stale-0123456789abcdef.so"), b"garbage").unwrap();
        symlink(&victim, run.join("plugins/link.so")).unwrap();
        let mut registry = Registry::open(&run, false).unwrap();
        assert_eq!(fs::read_dir(run.join("plugins")).unwrap().count(), 0);
        assert_eq!(fs::read(&victim).unwrap(), b"victim");
        // Garbage under the very name of a build, and a symlink at its temporary's name: the
        // copy is written afresh, and the link is not followed.
        let plugins = dir.path().join("plugins");
        fs::create_dir(&plugins).unwrap();
        chmod(&plugins, 0o755);
        fs::write(plugins.join("libx.so"), b"real bytes").unwrap();
        let hash = ContentHash::of(b"real bytes").short();
        fs::write(run.join(format!("plugins/x-{hash}.so")), b"garbage").unwrap();
        let tmp = format!(".x-{hash}.so.{}.1.tmp", std::process::id());
        symlink(&victim, run.join("plugins").join(tmp)).unwrap();
        let staged = registry.stage(&plugins.join("libx.so")).unwrap();
        assert_eq!(fs::read(&staged.private).unwrap(), b"real bytes");
        assert_eq!(fs::read(&victim).unwrap(), b"victim");
    }

    #[test]
    fn a_stamp_vouches_only_for_a_file_that_had_settled_when_it_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("libx.so");
        fs::write(&file, b"x").unwrap();
        let meta = fs::metadata(&file).unwrap();
        let stamp = FileStamp::of(&meta);
        let first_mtime = meta.modified().unwrap();
        let now = std::time::SystemTime::now();
        // Read in the same tick as its last change: a write now could leave ctime as it is.
        assert!(!stamp.settled(now));
        assert!(stamp.settled(now + SETTLED + Duration::from_millis(10)));
        // Any change to the file — even one that puts mtime back — moves ctime on.
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&file, b"y").unwrap();
        fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(first_mtime)
            .unwrap();
        let after = FileStamp::of(&fs::metadata(&file).unwrap());
        assert_eq!((after.size, after.mtime), (stamp.size, stamp.mtime));
        assert_ne!(after.ctime, stamp.ctime);
    }

    #[test]
    fn hashes_name_builds() {
        let a = ContentHash::of(b"a");
        assert_eq!(a.short().len(), 16);
        assert_eq!(a.to_string().len(), 64);
        assert_ne!(a, ContentHash::of(b"b"));
    }
}
