//! Attacks on progress and partial data (plugin-api 0.1.1's `JobContext`, WORK_PROGRESS /
//! WORK_DATA, PROGRESS / DATA), each a bug found in review: the test shows it, the fix keeps it
//! shown.

use jobhost_e2e::{fixture_plugin, Env};

/// The 0.1.0 fallback loads a plugin with our types unchecked once it passes plugin-api
/// 0.1.0's layout check. abi_stable's check takes a prefix type with more fields than the
/// caller's: a plugin whose `PluginObject` has 0.1.0's four methods and then a fifth that is
/// not 0.1.1's `handle_with` passed it, was loaded, and every job called that fifth method as
/// `handle_with` (here: with the context's address as a number). It must be refused, with the
/// layout check's reason.
#[test]
fn a_plugin_that_matches_0_1_0_only_in_part_is_refused_not_loaded_unchecked() {
    let env = Env::new();
    let run = env.jobhost(&[
        "plugin",
        "inspect",
        fixture_plugin("forked").to_str().unwrap(),
    ]);
    run.assert_code(1)
        .assert_stderr_has("libforked.so has an incompatible plugin-api layout")
        .assert_stderr_has("expected `handle_with: ")
        .assert_stderr_has("found `handle_tagged: ")
        .assert_stderr_has("(the plugin's types come from plugin-api 0.1.3)");

    // The genuine 0.1.0 plugin still loads.
    let run = env.jobhost(&[
        "plugin",
        "inspect",
        fixture_plugin("echo_old").to_str().unwrap(),
    ]);
    run.assert_code(0);
}
