//! Loading plugins into one process (what the master does before it forks): several plugins
//! and several builds of one plugin side by side, private copies, new code for a changed file.
//!
//! These tests load plugins into the test process itself, through the host library's
//! `Registry`. They take `SERIAL` so that no other test thread is inside dlopen while the
//! registry forks a probe child (the master, which really does this, has one thread).

use std::fs;
use std::sync::Mutex;
use std::time::Duration;

use jobhost::plugins::Registry;
use jobhost_e2e::{fixture_plugin, Env};

const INIT_TIMEOUT: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::new(());

fn call(instance: &mut jobhost_plugin_api::PluginInstance, payload: &[u8]) -> Vec<u8> {
    use jobhost_plugin_api::abi_stable::std_types::RSlice;
    instance
        .handle(RSlice::from_slice(payload))
        .into_result()
        .expect("handle")
        .into_vec()
}

#[test]
fn several_plugins_and_builds_live_side_by_side_and_a_changed_file_gets_new_code() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fixture_echo = fixture_plugin("echo"); // built before any plugin is loaded here
    let env = Env::new();
    let private_dir = env.path().join("run/plugins");
    let mut registry = Registry::new(&private_dir).expect("registry");
    let echo_file = env.install("echo");
    let hash_file = env.install("hash");
    let no_settings = [String::new()];

    let echo_v1 = registry
        .load(&echo_file, &no_settings, INIT_TIMEOUT)
        .expect("load echo");
    let hash = registry
        .load(&hash_file, &no_settings, INIT_TIMEOUT)
        .expect("load hash");
    assert_eq!(
        (echo_v1.info.name.as_str(), echo_v1.info.version.as_str()),
        ("echo", "0.1.0")
    );
    assert_eq!(hash.info.name, "hash");

    let mut old_echo = echo_v1
        .library
        .instantiate(&echo_file, "")
        .expect("init echo");
    let mut hasher = hash.library.instantiate(&hash_file, "").expect("init hash");
    assert_eq!(call(&mut old_echo, b"hi"), b"hi");
    assert_eq!(
        call(&mut hasher, b"abc"),
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    // The user copies a new build over the old file, in place, as `cp` does.
    fs::copy(&fixture_echo, &echo_file).expect("cp v2 over v1");
    let echo_v2 = registry
        .load(&echo_file, &no_settings, INIT_TIMEOUT)
        .expect("load echo v2");
    assert_eq!(echo_v2.info.version, "0.2.0");
    assert_ne!(
        echo_v1.private, echo_v2.private,
        "a new build must get a new private copy"
    );
    let mut new_echo = echo_v2
        .library
        .instantiate(&echo_file, "")
        .expect("init echo v2");
    assert_eq!(
        call(&mut new_echo, b"hi"),
        b"v2:hi",
        "the changed file must run its new code"
    );
    assert_eq!(
        call(&mut old_echo, b"hi"),
        b"hi",
        "the old build keeps running for its users"
    );

    // The same bytes again: the library already loaded, no new copy.
    let again = registry
        .load(&echo_file, &no_settings, INIT_TIMEOUT)
        .expect("load again");
    assert_eq!(again.private, echo_v2.private);

    // Only private copies are mapped, never the user's files; no half-written copies remain.
    let maps = fs::read_to_string("/proc/self/maps").expect("maps");
    assert!(
        !maps.contains(echo_file.to_str().unwrap()),
        "the user's file is mapped in place"
    );
    for loaded in [&echo_v1, &hash, &echo_v2] {
        assert!(
            maps.contains(loaded.private.to_str().unwrap()),
            "{} not mapped",
            loaded.private.display()
        );
    }
    let mut names: Vec<String> = fs::read_dir(&private_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".so")), "{names:?}");
    assert_eq!(registry.loaded().count(), 3);
}

#[test]
fn a_library_whose_init_fails_is_refused_by_the_probe_and_never_loaded() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new();
    let mut registry = Registry::new(&env.path().join("run/plugins")).expect("registry");
    let lookup = env.install("lookup");
    let error = registry
        .load(
            &lookup,
            &["build_in = \"nowhere\"".to_string()],
            INIT_TIMEOUT,
        )
        .err()
        .expect("bad settings must be refused");
    let message = error.to_string();
    assert!(
        message.contains("liblookup.so refused to start: init failed"),
        "{message}"
    );
    assert!(
        message.contains(lookup.to_str().unwrap()),
        "names the user's file: {message}"
    );
    assert_eq!(registry.loaded().count(), 0);
}

#[test]
fn a_runtime_dir_on_a_noexec_mount_is_refused_with_the_reason() {
    let env = Env::new();
    env.install("echo");
    let mount_point = env.path().join("noexec");
    fs::create_dir(&mount_point).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "noexec,size=16m", "tmpfs"])
        .arg(&mount_point)
        .output();
    if !jobhost_e2e::prerequisite(
        mounted.as_ref().is_ok_and(|o| o.status.success()),
        &format!("cannot mount a noexec tmpfs here ({mounted:?})"),
    ) {
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount_point.clone());
    let config = env.config(
        "[host]\nplugins_dir = \"plugins\"\nruntime_dir = \"noexec/run\"\n\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n",
    );
    env.jobhost(&["run", "-c", config.to_str().unwrap()])
        .assert_code(1)
        .assert_stderr_has("is on a filesystem mounted noexec, so no plugin copied there could be loaded; set host.runtime_dir");
}
