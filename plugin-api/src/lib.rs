//! The interface a jobhost plugin is built against — the only crate a plugin author needs.
//!
//! A plugin is a `cdylib` that implements [`Plugin`] and exports it with [`export_plugin!`].
//! jobhost loads the `.so`, calls [`Plugin::init`] **in the master, before it forks** its
//! workers (so whatever `init` builds is shared copy-on-write by every worker) — after trying
//! the same `init` in a throw-away probe process, so that a plugin that crashes or hangs there
//! cannot take the master down; `init` must therefore not assume it runs only once — then in each
//! worker calls [`Plugin::worker_start`], then [`Plugin::handle`] for every job (job mode) or
//! [`Plugin::run_once`] in a loop (loop mode), and [`Plugin::worker_stop`] before the worker exits.
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
//!   host as an error; the worker lives on. Build with `panic = "unwind"`.
//! - `log::info!` and friends work: records are forwarded to the host's log.
//! - The root module is a prefix type: fields are only ever appended, so a plugin built against
//!   a newer 0.1.x of this crate still loads in an older 0.1 host.

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

mod object {
    // `#[sabi_trait]` generates impls that rustc's `non_local_definitions` lint dislikes; the
    // code is abi_stable's, so the lint is silenced for this module only.
    #![allow(non_local_definitions)]
    use super::*;

    /// The per-pool plugin instance as the host sees it, across the ABI boundary.
    ///
    /// Method order is the vtable layout: append only, never reorder.
    #[sabi_trait]
    pub trait PluginObject {
        fn worker_start(&mut self) -> RResult<(), RString>;
        fn worker_stop(&mut self) -> RResult<(), RString>;
        fn handle(&mut self, payload: RSlice<'_, u8>) -> RResult<RVec<u8>, RString>;
        #[sabi(last_prefix_field)]
        fn run_once(&mut self) -> RResult<Step, RString>;
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
