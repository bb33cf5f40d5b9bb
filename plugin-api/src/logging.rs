//! The plugin's side of logging and panics.
//!
//! A `cdylib` carries its own copy of the `log` crate's globals and of std's panic hook, so a
//! plugin's `log::info!` would go nowhere and its panics would print raw to stderr. At `init`
//! this module installs, inside the plugin, a logger that forwards every record to the host's
//! callback, and a panic hook that records where a panic happened so the error returned to the
//! host can say it. Nothing here may panic or unwind into the host.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use abi_stable::std_types::RStr;
use log::{LevelFilter, Log, Metadata, Record};

use crate::HostContext;

type HostLogFn = extern "C" fn(u8, RStr<'_>, RStr<'_>);

/// The host's log callback, as an address (0 = not installed yet).
static HOST_LOG: AtomicUsize = AtomicUsize::new(0);

struct Forwarder;

static FORWARDER: Forwarder = Forwarder;

impl Log for Forwarder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        let addr = HOST_LOG.load(Ordering::Acquire);
        if addr == 0 || !self.enabled(record.metadata()) {
            return;
        }
        // SAFETY: `addr` was stored from a `HostLogFn` in `forward_to` and functions of the
        // host binary stay mapped for the life of the process.
        let host_log: HostLogFn = unsafe { std::mem::transmute::<usize, HostLogFn>(addr) };
        let message = record.args().to_string();
        host_log(
            record.level() as u8,
            RStr::from_str(record.target()),
            RStr::from_str(&message),
        );
    }

    fn flush(&self) {}
}

/// Routes this plugin's `log` records to the host from now on.
pub(crate) fn forward_to(host: HostContext) {
    HOST_LOG.store(host.log as usize, Ordering::Release);
    // A library loaded once serves every pool that uses it: set the logger only the first time.
    let _ = log::set_logger(&FORWARDER);
    log::set_max_level(level_filter(host.max_level));
}

fn level_filter(level: u8) -> LevelFilter {
    match level {
        0 => LevelFilter::Off,
        1 => LevelFilter::Error,
        2 => LevelFilter::Warn,
        3 => LevelFilter::Info,
        4 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

thread_local! {
    /// Where the last panic on this thread happened, set by the hook, taken by `describe_panic`.
    static LAST_PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces this library's panic hook (once) with one that remembers the location instead of
/// printing: the panic is reported once, as the callback's error, by the host.
pub(crate) fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            let _ = LAST_PANIC_AT.try_with(|slot| *slot.borrow_mut() = at);
        }));
    });
}

/// "plugin panicked in handle at src/lib.rs:12: index out of bounds".
pub(crate) fn describe_panic(callback: &str, payload: Box<dyn Any + Send>) -> String {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    };
    let at = LAST_PANIC_AT
        .try_with(|slot| slot.borrow_mut().take())
        .ok()
        .flatten();
    // Dropping an arbitrary payload could itself panic; leak it instead (a panic is rare).
    std::mem::forget(payload);
    match at {
        Some(at) => format!("plugin panicked in {callback} at {at}: {message}"),
        None => format!("plugin panicked in {callback}: {message}"),
    }
}
