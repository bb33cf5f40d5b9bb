//! The interface a jobhost plugin is built against — the only crate a plugin author needs.
//!
//! A plugin is a `cdylib` that implements [`Plugin`] and exports it with [`export_plugin!`].
//! jobhost loads the `.so`, calls [`Plugin::init`] **in the master, before it forks** its
//! workers (so whatever `init` builds is shared copy-on-write by every worker) — after trying
//! the same `init` in a throw-away probe process, so that a plugin that crashes or hangs there
//! cannot take the master down; `init` must therefore not assume it runs only once — then in each
//! worker calls [`Plugin::worker_start`], then [`Plugin::handle_with`] (which defaults to
//! [`Plugin::handle`]) for every job (job mode) or [`Plugin::run_once`] in a loop (loop mode),
//! and [`Plugin::worker_stop`] before the worker exits.
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "upper"
//! version = "0.1.0"
//! description = "Upper-cases the payload"
//! edition = "2021"
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! jobhost-plugin-api = "0.1"
//!
//! [profile.release]
//! panic = "unwind"   # so that a panic becomes an error instead of killing the worker
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use jobhost_plugin_api::{export_plugin, Plugin, Settings};
//!
//! pub struct Upper {
//!     prefix: String,
//! }
//!
//! impl Plugin for Upper {
//!     fn init(settings: &Settings) -> Result<Self, String> {
//!         let prefix = settings.get_or("prefix", String::new())?;
//!         log::info!("upper ready, prefix {prefix:?}");
//!         Ok(Upper { prefix })
//!     }
//!
//!     fn handle(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
//!         let text = std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8: {e}"))?;
//!         Ok(format!("{}{}", self.prefix, text.to_uppercase()).into_bytes())
//!     }
//! }
//!
//! export_plugin!(Upper);
//! # fn main() {
//! #     let settings = Settings::from_toml("prefix = '> '").unwrap();
//! #     let mut plugin = Upper::init(&settings).unwrap();
//! #     assert_eq!(plugin.handle(b"hi").unwrap(), b"> HI");
//! # }
//! ```
//!
//! # Progress and partial data
//!
//! A long job can say how far it got, and hand out partial results before its final one:
//! implement [`Plugin::handle_with`] instead of [`Plugin::handle`] and call
//! [`JobContext::progress`] and [`JobContext::data`] on the context it is given. The host sends
//! them on to whoever submitted the job (a progress bar in `jobhost submit`, WORK_STATUS /
//! WORK_DATA for Gearman); a host may coalesce progress calls that come faster than it forwards
//! them, and bounds the data of one job.
//!
//! ```
//! use jobhost_plugin_api::{JobContext, Plugin, Settings};
//!
//! pub struct Count;
//!
//! impl Plugin for Count {
//!     fn init(_: &Settings) -> Result<Self, String> {
//!         Ok(Count)
//!     }
//!
//!     fn handle_with(&mut self, payload: &[u8], ctx: &mut JobContext<'_>) -> Result<Vec<u8>, String> {
//!         let lines: Vec<&[u8]> = payload.split(|b| *b == b'\n').collect();
//!         for (i, line) in lines.iter().enumerate() {
//!             ctx.data(line); // a partial result
//!             ctx.progress(i as u64 + 1, lines.len() as u64);
//!         }
//!         Ok(format!("{} lines", lines.len()).into_bytes())
//!     }
//! }
//! # fn main() {
//! #     use jobhost_plugin_api::JobReport;
//! #     let mut seen = Vec::new();
//! #     let mut sink = |r: JobReport<'_>| seen.push(format!("{r:?}"));
//! #     let mut ctx = JobContext::new(&mut sink);
//! #     let mut plugin = Count::init(&Settings::from_toml("").unwrap()).unwrap();
//! #     assert_eq!(plugin.handle_with(b"a\nb", &mut ctx).unwrap(), b"2 lines");
//! #     assert_eq!(seen.len(), 4);
//! #     assert_eq!(seen[3], "Progress { numerator: 2, denominator: 2 }");
//! # }
//! ```
//!
//! A plugin built against plugin-api 0.1.0 has no `handle_with`: the host runs its jobs through
//! `handle`, and they report nothing.
//!
//! `cargo build --release` gives `target/release/libupper.so`; copy it into jobhost's plugins
//! folder, add a `[[pool]]` with `plugin = "upper"` to the config and send the master `SIGHUP`.
//!
//! # Rules of the road
//!
//! - `init` runs in the master before `fork`: it must not start threads or open sockets (a
//!   forked child gets only the forking thread, and a lock held by any other thread stays locked
//!   forever). Build read-only data there; open connections in `worker_start`.
//! - Keep what `init` built read-only in the workers: a page a worker writes is copied for it.
//! - A panic in any callback is caught on the plugin's side of the boundary and reported to the
//!   host as an error; the worker lives on. Build with `panic = "unwind"`: jobhost refuses a
//!   plugin built with `panic = "abort"` (since plugin-api 0.1.2, [`export_plugin!`] records
//!   which it was built with), as its panics would kill the master or a worker with SIGABRT.
//! - `init` must not leave threads or child processes behind: jobhost refuses such a plugin.
//! - `log::info!` and friends work: records are forwarded to the host's log.
//! - The root module is a prefix type: fields are only ever appended, so a plugin built against
//!   a newer 0.1.x of this crate still loads in an older 0.1 host.

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use abi_stable;
pub use log;

mod logging;
mod settings;

pub use settings::Settings;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

/// The version of this crate that a plugin was compiled against.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a loop-mode plugin tells the worker after one [`Plugin::run_once`].
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// There was work and there may be more: call again at once.
    More,
    /// Nothing to do now: sleep the pool's `idle_sleep` (cut short by a signal), then call again.
    Idle,
    /// This worker is done for good: exit, and do not refill the pool until it is restarted.
    Stop,
}

/// The modes a plugin provides; a pool's `mode` must be one of them.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    /// Takes jobs from the job server: implements [`Plugin::handle`].
    pub jobs: bool,
    /// Pulls its own work: implements [`Plugin::run_once`].
    pub looped: bool,
}

impl Modes {
    pub const JOBS: Modes = Modes {
        jobs: true,
        looped: false,
    };
    pub const LOOP: Modes = Modes {
        jobs: false,
        looped: true,
    };
    pub const BOTH: Modes = Modes {
        jobs: true,
        looped: true,
    };
}

/// A job handler. Implement this and export it with [`export_plugin!`].
///
/// Every method but `init` has a default, so a job-mode plugin implements `init` and `handle`,
/// a loop-mode plugin `init`, `run_once` and `const MODES = Modes::LOOP`.
pub trait Plugin: Sized + 'static {
    /// Which modes this plugin provides. Defaults to job mode only.
    const MODES: Modes = Modes::JOBS;

    /// Called in the master, before any worker is forked, with the pool's `[pool.settings]`
    /// table. Build shared read-only state here. jobhost first calls it in a throw-away probe
    /// process (and `jobhost check` calls it there only), so it must not assume it runs once:
    /// no side effects outside the process that a second call would trip over. An `Err`
    /// refuses the plugin: the message reaches the operator (`jobhost check`, the log, a
    /// failed reload).
    fn init(settings: &Settings) -> Result<Self, String>;

    /// Called in each worker right after it was forked: open connections, start threads.
    /// An `Err` stops the worker with that message.
    fn worker_start(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Called in each worker before it exits cleanly.
    fn worker_stop(&mut self) {}

    /// Job mode: handle one job's payload, returning the result bytes or an error message.
    fn handle(&mut self, _payload: &[u8]) -> Result<Vec<u8>, String> {
        Err("this plugin does not take jobs (it provides loop mode only)".into())
    }

    /// Job mode, with a way to report while the job runs: [`JobContext::progress`] and
    /// [`JobContext::data`]. What the host calls for every job (since plugin-api 0.1.1);
    /// defaults to [`Plugin::handle`], so implement one or the other. The context lives for
    /// this call only.
    fn handle_with(&mut self, payload: &[u8], ctx: &mut JobContext<'_>) -> Result<Vec<u8>, String> {
        let _ = ctx;
        self.handle(payload)
    }

    /// Loop mode: do one unit of work you fetched yourself.
    /// An `Err` is logged and the worker sleeps `idle_sleep` before calling again.
    fn run_once(&mut self) -> Result<Step, String> {
        Err("this plugin has no loop mode (it provides job mode only)".into())
    }
}

/// Name, version and description of a plugin, and the plugin-api version it was built against.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct PluginInfo {
    pub name: RStr<'static>,
    pub version: RStr<'static>,
    pub description: RStr<'static>,
    pub api_version: RStr<'static>,
    pub modes: Modes,
}

/// What the host hands a plugin at `init`: where its log records go.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct HostContext {
    /// Receives every record the plugin logs; `level` is 1 (error) to 5 (trace).
    pub log: extern "C" fn(level: u8, target: RStr<'_>, message: RStr<'_>),
    /// The most verbose level the host wants (0 = off … 5 = trace).
    pub max_level: u8,
}

/// What a plugin reports while it handles a job, as the host's sink receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobReport<'a> {
    /// `numerator` of `denominator` done (the plugin's units; a denominator of 0 means unknown).
    Progress { numerator: u64, denominator: u64 },
    /// Partial result bytes, in order; the final result still comes from the call's return.
    Data(&'a [u8]),
}

/// The job being handled, as [`Plugin::handle_with`] sees it: report progress and partial data
/// through it. Lent for one call only (`&mut JobContext<'_>`): it can be neither kept (it
/// borrows the host's sink for `'a`, and is not `Clone`), nor sent to another thread (not
/// `Send`), so no report can arrive after the call returned.
///
/// Across the boundary it is an opaque pointer to the host's sink and two `extern "C"`
/// functions that take it.
#[repr(C)]
#[derive(StableAbi)]
pub struct JobContext<'a> {
    /// The host's sink, erased; only `progress_fn` and `data_fn` know its type.
    sink: *mut (),
    progress_fn: extern "C" fn(sink: *mut (), numerator: u64, denominator: u64),
    data_fn: extern "C" fn(sink: *mut (), bytes: RSlice<'_, u8>),
    _borrow: PhantomData<&'a mut ()>,
}

impl<'a> JobContext<'a> {
    /// A context whose reports go to `sink`, for as long as it is borrowed. (The host builds
    /// one per job; plugin tests may too.) A panic in `sink` is caught on this side of the
    /// boundary and the report dropped.
    pub fn new<S: FnMut(JobReport<'_>)>(sink: &'a mut S) -> JobContext<'a> {
        JobContext {
            sink: (sink as *mut S).cast(),
            progress_fn: progress_to::<S>,
            data_fn: data_to::<S>,
            _borrow: PhantomData,
        }
    }

    /// Reports that `numerator` of `denominator` is done (e.g. bytes, rows, milliseconds).
    pub fn progress(&mut self, numerator: u64, denominator: u64) {
        (self.progress_fn)(self.sink, numerator, denominator)
    }

    /// Hands out partial result bytes; the host forwards them in order, before the result.
    /// What is handed out is gone: if the job is run again (its worker died, or it timed out),
    /// the client has the failed attempt's data already, and the new attempt's follows it.
    pub fn data(&mut self, bytes: &[u8]) {
        (self.data_fn)(self.sink, RSlice::from_slice(bytes))
    }
}

impl std::fmt::Debug for JobContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobContext")
    }
}

extern "C" fn progress_to<S: FnMut(JobReport<'_>)>(
    sink: *mut (),
    numerator: u64,
    denominator: u64,
) {
    // SAFETY: `sink` was made from a `&'a mut S` in `JobContext::new` together with this very
    // instantiation, and the context (which cannot outlive 'a) is borrowed mutably for the call.
    let sink = unsafe { &mut *sink.cast::<S>() };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        sink(JobReport::Progress {
            numerator,
            denominator,
        })
    }));
}

extern "C" fn data_to<S: FnMut(JobReport<'_>)>(sink: *mut (), bytes: RSlice<'_, u8>) {
    // SAFETY: as in `progress_to`.
    let sink = unsafe { &mut *sink.cast::<S>() };
    let _ = catch_unwind(AssertUnwindSafe(|| sink(JobReport::Data(bytes.as_slice()))));
}

mod object {
    // `#[sabi_trait]` generates impls that rustc's `non_local_definitions` lint dislikes; the
    // code is abi_stable's, so the lint is silenced for this module only.
    #![allow(non_local_definitions)]
    use super::*;

    /// The per-pool plugin instance as the host sees it, across the ABI boundary.
    ///
    /// Method order is the vtable layout: append only, never reorder. The vtable is a prefix
    /// type: methods after `run_once` (the last of 0.1.0) may be missing from a plugin built
    /// against an older 0.1.x. Two things follow, both abi_stable's:
    /// - at load, its layout check refuses a library whose prefix type has *fewer* fields
    ///   than the host's ("too many fields"): the host therefore checks such a plugin against
    ///   plugin-api 0.1.0's own layout (see `load_in_process` in the host's `plugins.rs`);
    /// - at a call, a missing method without a default body panics; one with a default body
    ///   here gets an optional vtable field (`missing_field(option)`), and the trait object
    ///   runs that body, on the host's side, when the plugin's vtable lacks the method.
    /// So every method appended must have a default body that does what an old plugin would.
    #[sabi_trait]
    pub trait PluginObject {
        fn worker_start(&mut self) -> RResult<(), RString>;
        fn worker_stop(&mut self) -> RResult<(), RString>;
        fn handle(&mut self, payload: RSlice<'_, u8>) -> RResult<RVec<u8>, RString>;
        #[sabi(last_prefix_field)]
        fn run_once(&mut self) -> RResult<Step, RString>;
        /// Since 0.1.1: `handle` with a [`JobContext`]. A plugin built against 0.1.0 lacks it:
        /// the default body, run on the host's side, calls its `handle` (no reports).
        fn handle_with(
            &mut self,
            payload: RSlice<'_, u8>,
            _ctx: &mut JobContext<'_>,
        ) -> RResult<RVec<u8>, RString> {
            self.handle(payload)
        }
    }
}
pub use object::{PluginObject, PluginObject_TO};

/// An initialised plugin instance owned by the host.
pub type PluginInstance = PluginObject_TO<'static, RBox<()>>;

/// The root module every plugin exports. A prefix type: fields are append-only.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin's metadata; never fails.
    pub info: extern "C" fn() -> PluginInfo,
    /// Install log forwarding, then run [`Plugin::init`] with the settings (TOML text).
    #[sabi(last_prefix_field)]
    pub init:
        extern "C" fn(settings: RStr<'_>, host: HostContext) -> RResult<PluginInstance, RString>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "jobhost_plugin";
    const NAME: &'static str = "jobhost plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// Adapts a [`Plugin`] to [`PluginObject`], catching panics in every call.
struct Adapter<P>(P);

impl<P: Plugin> PluginObject for Adapter<P> {
    fn worker_start(&mut self) -> RResult<(), RString> {
        guard("worker_start", || self.0.worker_start())
    }
    fn worker_stop(&mut self) -> RResult<(), RString> {
        guard("worker_stop", || {
            self.0.worker_stop();
            Ok(())
        })
    }
    fn handle(&mut self, payload: RSlice<'_, u8>) -> RResult<RVec<u8>, RString> {
        guard("handle", || {
            self.0.handle(payload.as_slice()).map(RVec::from)
        })
    }
    fn run_once(&mut self) -> RResult<Step, RString> {
        guard("run_once", || self.0.run_once())
    }
    fn handle_with(
        &mut self,
        payload: RSlice<'_, u8>,
        ctx: &mut JobContext<'_>,
    ) -> RResult<RVec<u8>, RString> {
        guard("handle", || {
            self.0.handle_with(payload.as_slice(), ctx).map(RVec::from)
        })
    }
}

/// Runs plugin code so that nothing unwinds across the boundary: a panic becomes an error
/// naming the callback, the panic message and where it happened.
fn guard<T>(callback: &str, f: impl FnOnce() -> Result<T, String>) -> RResult<T, RString> {
    logging::install_panic_hook();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => RResult::ROk(value),
        Ok(Err(message)) => RResult::RErr(message.into()),
        Err(payload) => RResult::RErr(logging::describe_panic(callback, payload).into()),
    }
}

/// Implementation details used by [`export_plugin!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    pub use abi_stable::library::{LibHeader, RootModuleResult};
    use abi_stable::prefix_type::PrefixTypeTrait;

    /// Metadata the macro captures from the plugin crate's own Cargo manifest.
    pub struct CrateInfo {
        pub name: &'static str,
        pub version: &'static str,
        pub description: &'static str,
    }

    pub extern "C" fn info<P: Plugin>(krate: &'static CrateInfo) -> PluginInfo {
        PluginInfo {
            name: RStr::from_str(krate.name),
            version: RStr::from_str(krate.version),
            description: RStr::from_str(krate.description),
            api_version: RStr::from_str(API_VERSION),
            modes: P::MODES,
        }
    }

    pub fn init<P: Plugin>(
        settings: RStr<'_>,
        host: HostContext,
    ) -> RResult<PluginInstance, RString> {
        logging::forward_to(host);
        guard("init", || {
            let settings = Settings::from_toml(settings.as_str())?;
            let plugin = P::init(&settings)?;
            Ok(PluginObject_TO::from_value(
                Adapter(plugin),
                sabi_trait::TD_Opaque,
            ))
        })
    }

    pub fn root_module(
        info: extern "C" fn() -> PluginInfo,
        init: extern "C" fn(RStr<'_>, HostContext) -> RResult<PluginInstance, RString>,
    ) -> PluginModRef {
        PluginMod { info, init }.leak_into_prefix()
    }

    pub fn construct(f: fn() -> PluginModRef) -> RootModuleResult {
        abi_stable::library::__call_root_module_loader(f)
    }

    /// # Safety
    /// `constructor` must return the [`PluginModRef`] built by [`root_module`].
    pub const unsafe fn header(constructor: extern "C" fn() -> RootModuleResult) -> LibHeader {
        LibHeader::from_constructor::<PluginModRef>(
            constructor,
            abi_stable::library::CheckTypeLayout::Yes,
        )
    }
}

/// Exports a [`Plugin`] implementation as this library's jobhost plugin.
///
/// The plugin's name, version and description come from the crate's `Cargo.toml`
/// (the library name, `version` and `description`). Use it once, at the crate root.
///
/// It expands to what `#[abi_stable::export_root_module]` would, spelled through this crate so
/// that a plugin needs no direct dependency on `abi_stable`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub mod __jobhost_plugin_export {
            use super::*;
            use $crate::__private as p;

            static CRATE: p::CrateInfo = p::CrateInfo {
                name: env!("CARGO_CRATE_NAME"),
                version: env!("CARGO_PKG_VERSION"),
                description: env!("CARGO_PKG_DESCRIPTION"),
            };

            extern "C" fn info() -> $crate::PluginInfo {
                p::info::<$plugin>(&CRATE)
            }

            extern "C" fn init(
                settings: $crate::abi_stable::std_types::RStr<'_>,
                host: $crate::HostContext,
            ) -> $crate::abi_stable::std_types::RResult<
                $crate::PluginInstance,
                $crate::abi_stable::std_types::RString,
            > {
                p::init::<$plugin>(settings, host)
            }

            /// Whether this plugin unwinds on a panic (since plugin-api 0.1.2; the host refuses
            /// a plugin built with `panic = "abort"`). `cfg!` is evaluated here, in the
            /// plugin's own crate, whose build decides how the library panics: in plugin-api's
            /// code it would say how plugin-api was compiled. Exported beside the root module,
            /// not in it, so that the root module's layout stays that of 0.1.1 and plugins
            /// built against 0.1.0 and 0.1.1 (which lack the symbol) load as before.
            #[no_mangle]
            pub extern "C" fn jobhost_plugin_panic_unwind() -> bool {
                cfg!(panic = "unwind")
            }

            fn root_module() -> $crate::PluginModRef {
                p::root_module(info, init)
            }

            extern "C" fn construct() -> p::RootModuleResult {
                p::construct(root_module)
            }

            /// The symbol jobhost (through abi_stable) looks up in the library. The name is
            /// abi_stable 0.11's `ROOT_MODULE_LOADER_NAME`; a test in plugin-api keeps it in step.
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            pub static LIB_HEADER: p::LibHeader = unsafe { p::header(construct) };
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Panicky;
    impl Plugin for Panicky {
        fn init(_: &Settings) -> Result<Self, String> {
            Ok(Panicky)
        }
        fn handle(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
            if payload == b"panic" {
                panic!("asked to panic");
            }
            Ok(payload.to_vec())
        }
    }

    /// Reports `payload` as three progress steps and one piece of data, then answers "done";
    /// panics in handle_with on "panic".
    struct Reporter;
    impl Plugin for Reporter {
        fn init(_: &Settings) -> Result<Self, String> {
            Ok(Reporter)
        }
        fn handle_with(
            &mut self,
            payload: &[u8],
            ctx: &mut JobContext<'_>,
        ) -> Result<Vec<u8>, String> {
            for i in 1..=3 {
                ctx.progress(i, 3);
            }
            ctx.data(payload);
            if payload == b"panic" {
                panic!("asked to panic");
            }
            Ok(b"done".to_vec())
        }
    }

    fn host() -> HostContext {
        extern "C" fn sink(_: u8, _: RStr<'_>, _: RStr<'_>) {}
        HostContext {
            log: sink,
            max_level: 3,
        }
    }

    #[test]
    fn handle_with_reports_in_order_through_the_boundary() {
        let mut obj = __private::init::<Reporter>(RStr::from_str(""), host()).unwrap();
        let mut seen = Vec::new();
        let mut sink = |r: JobReport<'_>| {
            seen.push(match r {
                JobReport::Progress {
                    numerator,
                    denominator,
                } => format!("{numerator}/{denominator}"),
                JobReport::Data(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            })
        };
        let mut ctx = JobContext::new(&mut sink);
        let result = obj.handle_with(RSlice::from_slice(b"part"), &mut ctx);
        assert_eq!(result.unwrap().as_slice(), b"done");
        assert_eq!(seen, ["1/3", "2/3", "3/3", "part"]);
    }

    #[test]
    fn a_panic_in_handle_with_or_in_the_sink_is_caught() {
        let mut obj = __private::init::<Reporter>(RStr::from_str(""), host()).unwrap();
        let mut calls = 0;
        let mut sink = |_: JobReport<'_>| {
            calls += 1;
            panic!("the host's sink panicked");
        };
        let mut ctx = JobContext::new(&mut sink);
        let err = obj
            .handle_with(RSlice::from_slice(b"panic"), &mut ctx)
            .unwrap_err();
        assert!(
            err.as_str().starts_with("plugin panicked in handle at "),
            "{err}"
        );
        assert!(err.as_str().ends_with(": asked to panic"), "{err}");
        // Every report reached the sink, whose panics stayed on its side.
        let ok = obj.handle_with(RSlice::from_slice(b"x"), &mut ctx);
        assert_eq!(ok.unwrap().as_slice(), b"done");
        assert_eq!(calls, 8);
    }

    #[test]
    fn a_plugin_that_implements_only_handle_answers_handle_with_and_reports_nothing() {
        let mut obj = __private::init::<Panicky>(RStr::from_str(""), host()).unwrap();
        let mut reports = 0;
        let mut sink = |_: JobReport<'_>| reports += 1;
        let mut ctx = JobContext::new(&mut sink);
        let result = obj.handle_with(RSlice::from_slice(b"hi"), &mut ctx);
        assert_eq!(result.unwrap().as_slice(), b"hi");
        assert_eq!(reports, 0);
    }

    #[test]
    fn export_symbol_matches_abi_stable() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }

    #[test]
    fn a_panic_becomes_an_error_and_the_next_call_works() {
        extern "C" fn sink(_: u8, _: RStr<'_>, _: RStr<'_>) {}
        let host = HostContext {
            log: sink,
            max_level: 3,
        };
        let mut obj = __private::init::<Panicky>(RStr::from_str(""), host).unwrap();
        let err = obj.handle(RSlice::from_slice(b"panic")).unwrap_err();
        assert!(
            err.as_str().starts_with("plugin panicked in handle at "),
            "{err}"
        );
        assert!(err.as_str().ends_with(": asked to panic"), "{err}");
        assert_eq!(
            obj.handle(RSlice::from_slice(b"ok")).unwrap().as_slice(),
            b"ok"
        );
        assert!(obj
            .run_once()
            .unwrap_err()
            .as_str()
            .contains("no loop mode"));
    }
}
