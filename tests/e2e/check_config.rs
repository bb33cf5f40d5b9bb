//! `jobhost check -c FILE`: a good config prints one line per pool and exits 0; a bad config
//! or a bad plugin prints one clear error — file, line and key, or plugin file and reason —
//! and exits 1; a plugin that crashes or hangs in `init` cannot take `check` down.

use jobhost_e2e::{bin_dir, repo_root, Env};

const HOST: &str = "[host]\nplugins_dir = \"plugins\"\ninit_timeout = \"3s\"\n\n";

#[test]
fn accepts_the_example_config_and_prints_one_line_per_pool() {
    let env = Env::new();
    // The example as shipped, but with the plugins of this test's own profile: it names
    // `../target/release`, which a debug `cargo test` has not built.
    let shipped = std::fs::read_to_string(repo_root().join("examples/jobhost.toml")).unwrap();
    let release_dir = "plugins_dir = \"../target/release\"";
    assert!(shipped.contains(release_dir), "{shipped}");
    let example = env.config(&shipped.replace(
        release_dir,
        &format!("plugins_dir = {:?}", bin_dir().display().to_string()),
    ));
    let run = env.jobhost(&["check", "-c", example.to_str().unwrap()]);
    run.assert_code(0);
    let pools: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("ok  pool "))
        .collect();
    assert_eq!(pools.len(), 4, "{}", run.stdout);
    run.assert_stdout_has("plugin lookup 0.1.0 (plugin-api 0.1.2), mode jobs, 2 workers");
    // lookup's init really ran (in the probe) and its log line reached our stderr.
    run.assert_stderr_has("lookup: built a 64 MiB table");
}

#[test]
fn names_file_line_and_key_of_an_unknown_key() {
    let env = Env::new();
    env.install("echo");
    let config = env.config(&format!(
        "{HOST}[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkrs = 2\n"
    ));
    env.jobhost(&["check", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has(&format!(
            "{}:8:1: pool[0].workrs: unknown key",
            config.display()
        ));
}

#[test]
fn names_file_line_and_key_of_a_bad_duration() {
    let env = Env::new();
    env.install("echo");
    let config = env.config(&format!(
        "{HOST}[[pool]]\nname = \"echo\"\nplugin = \"echo\"\njob_timeout = \"30x\"\n"
    ));
    env.jobhost(&["check", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has(&format!("{}:8:", config.display()))
        .assert_stderr_has("pool[0].job_timeout")
        .assert_stderr_has("30x");
}

#[test]
fn lists_the_plugins_that_exist_when_a_pool_names_one_that_does_not() {
    let env = Env::new();
    env.install("echo");
    env.install("hash");
    let config = env.config(&format!(
        "{HOST}[[pool]]\nname = \"e\"\nplugin = \"ecoh\"\n"
    ));
    env.jobhost(&["check", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has(&format!("{}:7:", config.display()))
        .assert_stderr_has("pool[0].plugin: no plugin \"ecoh\"")
        .assert_stderr_has("available: echo, hash");
}

#[test]
fn refuses_a_pool_mode_the_plugin_does_not_provide() {
    let env = Env::new();
    env.install("echo");
    let config = env.config(&format!(
        "{HOST}[[pool]]\nname = \"e\"\nplugin = \"echo\"\nmode = \"loop\"\n"
    ));
    env.jobhost(&["check", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has("pool e: plugin ")
        .assert_stderr_has("libecho.so does not provide loop mode (it provides: jobs)");
}

#[test]
fn reports_an_init_error_with_the_plugins_own_message() {
    let env = Env::new();
    env.install("lookup");
    let config = env.config(&format!(
        "{HOST}[[pool]]\nname = \"l\"\nplugin = \"lookup\"\n[pool.settings]\nbuild_in = \"nowhere\"\n"
    ));
    env.jobhost(&["check", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has("liblookup.so refused to start: init failed: ")
        .assert_stderr_has("nowhere");
}

/// `init` runs in the probe child: whatever it does, `check` reports it and exits 1 itself.
fn check_with_init(mode: &str) -> jobhost_e2e::Run {
    let env = Env::new();
    env.install("faulty");
    let config = env.config(&format!(
        "{HOST}[[pool]]\nname = \"f\"\nplugin = \"faulty\"\n[pool.settings]\ninit = \"{mode}\"\n"
    ));
    let run = env.jobhost(&["check", "-c", config.to_str().unwrap()]);
    run.assert_code(1);
    run
}

#[test]
fn survives_a_plugin_that_segfaults_in_init() {
    check_with_init("segv").assert_stderr_has(
        "libfaulty.so killed the probe process with SIGSEGV while running its init",
    );
}

#[test]
fn survives_a_plugin_that_aborts_in_init() {
    check_with_init("abort").assert_stderr_has(
        "libfaulty.so killed the probe process with SIGABRT while running its init",
    );
}

#[test]
fn survives_a_plugin_that_exits_in_init() {
    check_with_init("exit").assert_stderr_has(
        "libfaulty.so made the probe process exit with status 42 while running its init",
    );
}

#[test]
fn reports_a_panic_in_init_as_an_error() {
    check_with_init("panic").assert_stderr_has("init failed: plugin panicked in init at ");
}

#[test]
fn kills_a_plugin_that_hangs_in_init_after_the_init_timeout() {
    check_with_init("hang").assert_stderr_has(
        "libfaulty.so took longer than 3s while running its init; the probe was killed",
    );
}
