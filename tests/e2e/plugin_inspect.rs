//! `jobhost plugin inspect`: metadata of a good plugin, and a clear refusal — never a crash —
//! for every kind of bad file.

use std::fs;
use std::process::Command;

use jobhost_e2e::{bin_dir, demo_plugin, fixture_plugin, run, Env};

#[test]
fn shows_name_version_description_and_api_version() {
    let env = Env::new();
    let echo = demo_plugin("echo");
    env.jobhost(&["plugin", "inspect", echo.to_str().unwrap()])
        .assert_code(0)
        .assert_stdout_has("name:        echo\n")
        .assert_stdout_has("version:     0.1.0\n")
        .assert_stdout_has("plugin-api:  0.1.2 (this jobhost: 0.1.2)\n")
        .assert_stdout_has("modes:       jobs\n");
}

#[test]
fn shows_loop_mode_and_the_description_from_the_manifest() {
    let env = Env::new();
    let run = env.jobhost(&[
        "plugin",
        "inspect",
        demo_plugin("wordcount").to_str().unwrap(),
    ]);
    run.assert_code(0).assert_stdout_has("modes:       loop\n");
    let description = run
        .stdout
        .lines()
        .find(|l| l.starts_with("description:"))
        .unwrap();
    assert!(
        description.len() > "description: ".len() + 10,
        "empty description: {description}"
    );
}

#[test]
fn refuses_a_missing_file() {
    let env = Env::new();
    env.jobhost(&["plugin", "inspect", "plugins/libnothere.so"])
        .assert_code(1)
        .assert_stderr_has("cannot read plugin plugins/libnothere.so: No such file or directory");
}

#[test]
fn refuses_a_file_that_is_not_a_shared_library() {
    let env = Env::new();
    let bogus = env.plugins_dir().join("libtext.so");
    fs::write(
        &bogus,
        "this is not an ELF file, just text that is long enough to have a header\n".repeat(20),
    )
    .unwrap();
    env.jobhost(&["plugin", "inspect", bogus.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has("is not a loadable shared library")
        .assert_stderr_has("invalid ELF header");
}

#[test]
fn refuses_a_library_without_the_jobhost_export() {
    let env = Env::new();
    env.jobhost(&[
        "plugin",
        "inspect",
        fixture_plugin("noexport").to_str().unwrap(),
    ])
    .assert_code(1)
    .assert_stderr_has(
        "libnoexport.so is not a jobhost plugin: it does not export a plugin root module",
    );
}

#[test]
fn refuses_a_plugin_built_against_an_incompatible_api_layout() {
    let env = Env::new();
    let run = env.jobhost(&[
        "plugin",
        "inspect",
        fixture_plugin("wrongabi").to_str().unwrap(),
    ]);
    run.assert_code(1)
        .assert_stderr_has("libwrongabi.so has an incompatible plugin-api layout")
        .assert_stderr_has("found `fn(settings,: RStr<'a>)->RResult`")
        .assert_stderr_has("(the plugin's types come from plugin-api 0.1.4)");
    // The verdict, not abi_stable's 240-line report.
    assert!(
        run.stderr.lines().count() <= 3,
        "too verbose:\n{}",
        run.stderr
    );
}

#[test]
fn refuses_a_plugin_built_against_an_older_api_version() {
    let env = Env::new();
    env.jobhost(&["plugin", "inspect", fixture_plugin("oldapi").to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has("liboldapi.so was built against plugin-api 0.0.9, which this jobhost (plugin-api 0.1.2) cannot load");
}

#[test]
fn survives_a_truncated_copy_that_kills_whoever_loads_it() {
    let env = Env::new();
    // A copy interrupted early: the ELF headers are there, the segments they map are not.
    // (A cut in the trailing debug info would load fine; the first 64 KiB is inside the
    // first loaded segment of any of our builds.)
    let bytes = fs::read(demo_plugin("hash")).unwrap();
    let half = env.plugins_dir().join("libhash.so");
    fs::write(&half, &bytes[..64 * 1024]).unwrap();
    env.jobhost(&["plugin", "inspect", half.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has("libhash.so killed the probe process with SIGBUS while loading it — is the file truncated, or still being copied?");
}

#[test]
fn inspects_several_files_and_fails_if_any_is_refused() {
    let env = Env::new();
    let run = env.jobhost(&[
        "plugin",
        "inspect",
        demo_plugin("echo").to_str().unwrap(),
        "nothere.so",
        demo_plugin("hash").to_str().unwrap(),
    ]);
    run.assert_code(1)
        .assert_stdout_has("name:        echo\n")
        .assert_stdout_has("name:        hash\n");
    run.assert_stderr_has("cannot read plugin nothere.so");
}

#[test]
fn a_bare_file_name_is_the_file_in_the_working_directory_not_a_library_search() {
    // dlopen("libecho.so") would search the library path; jobhost means the file right here.
    // So the library path holds other plugins under the same names: a search would find them.
    let env = Env::new();
    let lib = env.path().join("lib");
    fs::create_dir(&lib).unwrap();
    fs::copy(demo_plugin("hash"), lib.join("libecho.so")).unwrap();
    fs::copy(demo_plugin("hash"), lib.join("libhere-only-by-search.so")).unwrap();
    fs::copy(demo_plugin("echo"), env.path().join("libecho.so")).unwrap();
    let inspect = |name: &str| {
        run(Command::new(bin_dir().join("jobhost"))
            .args(["plugin", "inspect", name])
            .current_dir(env.path())
            .env("LD_LIBRARY_PATH", &lib))
    };
    inspect("libecho.so")
        .assert_code(0)
        .assert_stdout_has("name:        echo\n");
    // A bare name that is not here is "not found" — not the library the path search finds,
    // nor a system library.
    for name in ["libhere-only-by-search.so", "libc.so.6"] {
        let refused = inspect(name);
        refused.assert_code(1).assert_stderr_has(&format!(
            "cannot read plugin {name}: No such file or directory"
        ));
        assert!(!refused.stdout.contains("name:"), "{}", refused.stdout);
    }
}
