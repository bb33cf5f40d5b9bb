//! One job through the plugin, the same way for every job source (the master's socketpair,
//! Redis, and the Gearman source to come): [`handle`] calls the plugin's `handle_with` with a
//! [`JobContext`] whose reports reach the caller's closure, in order. A plugin built against
//! plugin-api 0.1.0 has no `handle_with` in its vtable: abi_stable then runs the default body
//! declared in `PluginObject`, which calls its `handle` (no reports) — never a panic.
//!
//! Owns the call and the translation of reports only. It never does I/O, never decides how
//! often a report is sent on (the source does: it knows its channel), and runs no plugin code
//! outside the one call.

use jobhost_plugin_api::abi_stable::std_types::{RResult, RSlice};
use jobhost_plugin_api::{JobContext, JobReport, PluginInstance};

/// What the plugin reported while it ran the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report<'a> {
    /// `numerator` of `denominator` done (the plugin's units; 0 as denominator: unknown).
    Progress { numerator: u64, denominator: u64 },
    /// Partial result bytes, in order, before the result.
    Data(&'a [u8]),
}

/// Runs `payload` through the plugin; every progress/data call of the plugin reaches `report`,
/// in order.
pub fn handle(
    plugin: &mut PluginInstance,
    payload: &[u8],
    report: &mut dyn FnMut(Report<'_>),
) -> Result<Vec<u8>, String> {
    let mut sink = |r: JobReport<'_>| {
        report(match r {
            JobReport::Progress {
                numerator,
                denominator,
            } => Report::Progress {
                numerator,
                denominator,
            },
            JobReport::Data(data) => Report::Data(data),
        })
    };
    // The context borrows `sink` for this call only: the plugin cannot keep it.
    let mut ctx = JobContext::new(&mut sink);
    match plugin.handle_with(RSlice::from_slice(payload), &mut ctx) {
        RResult::ROk(result) => Ok(result.into_vec()),
        RResult::RErr(message) => Err(message.into_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobhost_plugin_api::abi_stable::sabi_trait::TD_Opaque;
    use jobhost_plugin_api::abi_stable::std_types::{RString, RVec};
    use jobhost_plugin_api::{PluginObject, PluginObject_TO, Step};

    /// Implements `handle_with`: reports 1/2, the payload, 2/2.
    struct Reporting;
    /// Implements `handle` only, as a 0.1.0 plugin's object does.
    struct Old;

    impl PluginObject for Reporting {
        fn worker_start(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn worker_stop(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn handle(&mut self, _: RSlice<'_, u8>) -> RResult<RVec<u8>, RString> {
            RResult::RErr("handle_with is the one to call".into())
        }
        fn run_once(&mut self) -> RResult<Step, RString> {
            RResult::RErr("job mode only".into())
        }
        fn handle_with(
            &mut self,
            payload: RSlice<'_, u8>,
            ctx: &mut JobContext<'_>,
        ) -> RResult<RVec<u8>, RString> {
            ctx.progress(1, 2);
            ctx.data(payload.as_slice());
            ctx.progress(2, 2);
            RResult::ROk(b"done".to_vec().into())
        }
    }

    impl PluginObject for Old {
        fn worker_start(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn worker_stop(&mut self) -> RResult<(), RString> {
            RResult::ROk(())
        }
        fn handle(&mut self, payload: RSlice<'_, u8>) -> RResult<RVec<u8>, RString> {
            if payload.is_empty() {
                return RResult::RErr("empty".into());
            }
            RResult::ROk(payload.to_vec().into())
        }
        fn run_once(&mut self) -> RResult<Step, RString> {
            RResult::RErr("job mode only".into())
        }
    }

    fn run(plugin: &mut PluginInstance, payload: &[u8]) -> (Result<Vec<u8>, String>, Vec<String>) {
        let mut seen = Vec::new();
        let result = handle(plugin, payload, &mut |r| {
            seen.push(match r {
                Report::Progress {
                    numerator,
                    denominator,
                } => format!("{numerator}/{denominator}"),
                Report::Data(d) => String::from_utf8_lossy(d).into_owned(),
            })
        });
        (result, seen)
    }

    #[test]
    fn reports_reach_the_closure_in_order_before_the_result() {
        let mut plugin = PluginObject_TO::from_value(Reporting, TD_Opaque);
        let (result, seen) = run(&mut plugin, b"part");
        assert_eq!(result.unwrap(), b"done");
        assert_eq!(seen, ["1/2", "part", "2/2"]);
    }

    #[test]
    fn a_plugin_with_handle_only_answers_and_reports_nothing() {
        let mut plugin = PluginObject_TO::from_value(Old, TD_Opaque);
        assert_eq!(run(&mut plugin, b"x"), (Ok(b"x".to_vec()), vec![]));
        assert_eq!(run(&mut plugin, b""), (Err("empty".into()), vec![]));
    }
}
