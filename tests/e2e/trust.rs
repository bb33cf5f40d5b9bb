//! Only root's (or the master's own user's) code runs in the master, as sshd's StrictModes
//! has it: plugins in folders others can write, behind symlinks into such folders, or owned
//! by another user are refused with the folder or file named; a user racing renames in a
//! world-writable folder never gets their build loaded; `runtime_dir` must be the master's
//! own, and nothing found in it (stale private copies, symlinks at the pidfile's temporary or
//! lock) is trusted or followed.
//!
//! The tests that chown to `nobody` need root (CI runs as root) and say so when skipped.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobhost_e2e::{bin_dir, config_with, demo_plugin, fixture_plugin, wait_until, Env, SOON};

const ECHO: &str = "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 1\n";

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: this test chowns files to nobody, which needs root");
    false
}

fn nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
}

/// `jobhost check` and `jobhost run` both refuse the config, with `reason` on stderr.
fn both_refuse(env: &Env, reason: &str) {
    let config = env.config(&config_with(ECHO));
    let config = config.to_str().unwrap();
    env.jobhost(&["check", "-c", config])
        .assert_code(1)
        .assert_stderr_has(reason);
    run_refused(env, config, reason);
}

/// `jobhost run -c config` exits 1 at start with `reason` on stderr. A master that starts
/// anyway is killed after [`SOON`] and the test fails (it must not hang).
fn run_refused(env: &Env, config: &str, reason: &str) {
    let log = env.path().join("refused.log");
    let mut child = std::process::Command::new(bin_dir().join("jobhost"))
        .args(["run", "-c", config])
        .current_dir(env.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let workers = jobhost_e2e::children_of(child.id() as i32);
            let _ = child.kill();
            let _ = child.wait();
            for pid in workers {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            panic!(
                "the master started instead of refusing ({reason}):\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(reason),
        "stderr lacks {reason:?}:\n{stderr}"
    );
}

/// A world-writable folder `env/<name>` holding a copy of the demo echo plugin, and
/// `plugins/libecho.so` a symlink to it.
fn symlink_into_open_folder(env: &Env, name: &str, mode: u32) -> PathBuf {
    let open = env.path().join(name);
    fs::create_dir(&open).unwrap();
    fs::copy(demo_plugin("echo"), open.join("libecho.so")).unwrap();
    chmod(&open, mode);
    let link = env.plugins_dir().join("libecho.so");
    let _ = fs::remove_file(&link);
    symlink(open.join("libecho.so"), &link).unwrap();
    open
}

#[test]
fn a_plugin_below_a_world_writable_folder_is_refused_and_the_folder_named() {
    let env = Env::new();
    let shared = env.path().join("shared");
    fs::create_dir_all(shared.join("plugins")).unwrap();
    fs::copy(demo_plugin("echo"), shared.join("plugins/libecho.so")).unwrap();
    chmod(&shared, 0o777);
    let config = env.config(&config_with(ECHO).replace(
        "plugins_dir = \"plugins\"",
        "plugins_dir = \"shared/plugins\"",
    ));
    let reason = format!(
        "refusing to load plugins: folder {} is writable by everyone (mode 0777)",
        shared.display()
    );
    let config = config.to_str().unwrap();
    env.jobhost(&["check", "-c", config])
        .assert_code(1)
        .assert_stderr_has(&reason);
    run_refused(&env, config, &reason);
    chmod(&shared, 0o755);
    env.jobhost(&["check", "-c", config]).assert_code(0);
}

#[test]
fn a_symlinked_plugin_whose_target_folder_others_can_write_is_refused() {
    let env = Env::new();
    let open = symlink_into_open_folder(&env, "open", 0o777);
    both_refuse(
        &env,
        &format!(
            "refusing to load plugins: folder {} is writable by everyone (mode 0777) (on the way to the plugin {}",
            open.display(),
            env.plugins_dir().join("libecho.so").display()
        ),
    );
    // A sticky folder (like /tmp) is refused too: anyone may create files in it.
    chmod(&open, 0o1777);
    both_refuse(
        &env,
        &format!(
            "folder {} is writable by everyone (mode 1777; its sticky bit still lets anyone create files in it",
            open.display()
        ),
    );
    // The same symlink into a folder only root can write is fine.
    chmod(&open, 0o755);
    env.jobhost(&[
        "check",
        "-c",
        env.path().join("jobhost.toml").to_str().unwrap(),
    ])
    .assert_code(0);
}

#[test]
fn a_plugin_or_folder_owned_by_another_user_is_refused() {
    if !is_root() {
        return;
    }
    let env = Env::new();
    let plugin = env.install("echo");
    nobody(&plugin);
    both_refuse(
        &env,
        &format!(
            "refusing to load plugins: plugin {} belongs to uid 65534, neither root nor the user jobhost runs as (uid 0)",
            plugin.display()
        ),
    );
    std::os::unix::fs::chown(&plugin, Some(0), Some(0)).unwrap();
    nobody(&env.plugins_dir());
    both_refuse(
        &env,
        &format!(
            "plugins dir {} belongs to uid 65534",
            env.plugins_dir().display()
        ),
    );
    // And a reload of a running master refuses a build that another user owns.
    std::os::unix::fs::chown(env.plugins_dir(), Some(0), Some(0)).unwrap();
    let master = env.start_master(&config_with(ECHO));
    master.wait_for_workers(1);
    fs::copy(fixture_plugin("echo"), env.plugins_dir().join("new.so")).unwrap();
    nobody(&env.plugins_dir().join("new.so"));
    fs::rename(env.plugins_dir().join("new.so"), &plugin).unwrap();
    let reply = master.admin("reload");
    assert!(
        reply.starts_with("ERR reload failed, nothing changed: ")
            && reply.contains("belongs to uid 65534"),
        "{reply}"
    );
    assert_eq!(master.client().call("echo", b"hi").unwrap().body, b"hi");
}

/// The attack that was won after about 530 reloads: the plugin is a symlink into a
/// world-writable folder, and another user keeps renaming their build into place there. Every
/// reload must be refused, naming the folder, and the evil build (echo 0.2.0, answering
/// "v2:...") must never be loaded. The evil file is root's here, so that what stops it is the
/// folder check on the symlink's target, not the file's owner.
#[test]
fn renaming_an_evil_build_into_a_symlinked_world_writable_folder_never_gets_it_loaded() {
    let env = Env::new();
    env.install("echo");
    let mut master = env.start_master(&config_with(ECHO));
    master.wait_for_workers(1);
    let open = symlink_into_open_folder(&env, "open", 0o777);
    let target = open.join("libecho.so");
    let (evil, good) = (open.join("evil.so"), open.join("good.so"));
    let stop = Arc::new(AtomicBool::new(false));
    let renamer = {
        let stop = Arc::clone(&stop);
        let (evil_src, good_src) = (fixture_plugin("echo"), demo_plugin("echo"));
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Each build lands whole, by rename, as an attacker would do it.
                let _ = fs::copy(&evil_src, &evil);
                let _ = fs::rename(&evil, &target);
                let _ = fs::copy(&good_src, &good);
                let _ = fs::rename(&good, &target);
                swaps += 1;
            }
            swaps
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reloads = 0;
    let mut session = master.admin_session();
    while reloads < 300 && Instant::now() < deadline {
        let reply = session.command("reload");
        assert!(
            reply.starts_with("ERR reload failed, nothing changed: ")
                && reply.contains(&format!(
                    "folder {} is writable by everyone",
                    open.display()
                )),
            "reload {reloads}: {reply}"
        );
        reloads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = renamer.join().unwrap();
    assert!(
        swaps > 0 && reloads >= 50,
        "swaps {swaps}, reloads {reloads}"
    );
    let status: serde_json::Value =
        serde_json::from_str(master.admin("status json").lines().next().unwrap()).unwrap();
    assert_eq!(status["pools"][0]["plugin_version"], "0.1.0", "{status}");
    assert_eq!(master.client().call("echo", b"hi").unwrap().body, b"hi");
    assert_eq!(master.log_count("0.2.0"), 0, "{}", master.log_text());
    assert!(!master.exited());
}

#[test]
fn a_runtime_dir_others_can_write_or_own_is_refused() {
    let env = Env::new();
    env.install("echo");
    let run = env.path().join("run");
    fs::create_dir(&run).unwrap();
    chmod(&run, 0o777);
    let config = env.config(&config_with(ECHO));
    let config = config.to_str().unwrap();
    run_refused(
        &env,
        config,
        &format!(
            "refusing to use runtime_dir {}: it is writable by everyone (mode 0777)",
            run.display()
        ),
    );
    assert!(!run.join("plugins").exists(), "nothing was copied into it");
    chmod(&run, 0o755);
    if is_root() {
        nobody(&run);
        run_refused(
            &env,
            config,
            &format!(
                "refusing to use runtime_dir {}: it belongs to uid 65534, not to the user jobhost runs as (uid 0)",
                run.display()
            ),
        );
        std::os::unix::fs::chown(&run, Some(0), Some(0)).unwrap();
    }
    // Its plugins folder, too: group-writable, or a symlink to elsewhere.
    fs::create_dir(run.join("plugins")).unwrap();
    chmod(&run.join("plugins"), 0o770);
    run_refused(
        &env,
        config,
        &format!(
            "refusing to use the private plugin folder {}: it is writable by its group (mode 0770)",
            run.join("plugins").display()
        ),
    );
    fs::remove_dir(run.join("plugins")).unwrap();
    fs::create_dir(env.path().join("elsewhere")).unwrap();
    symlink(env.path().join("elsewhere"), run.join("plugins")).unwrap();
    run_refused(&env, config, "jobhost follows no symlink there");
}

/// The private copy's name, as the master makes it: `<name>-<first 16 hex digits of SHA-256>.so`.
fn private_name(plugin: &Path, name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(fs::read(plugin).unwrap());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{name}-{hex}.so")
}

#[test]
fn stale_private_copies_are_never_trusted_by_their_name() {
    let env = Env::new();
    env.install("echo");
    let private = env.path().join("run/plugins");
    fs::create_dir_all(&private).unwrap();
    chmod(&private, 0o700);
    // Garbage under the very name the real build's copy gets, and a leftover of another run.
    let name = private_name(&demo_plugin("echo"), "echo");
    fs::write(private.join(&name), b"garbage, not an ELF file").unwrap();
    fs::write(private.join("gone-0123456789abcdef.so"), b"old").unwrap();
    let master = env.start_master(&config_with(ECHO));
    master.wait_for_workers(1);
    assert_eq!(master.client().call("echo", b"hi").unwrap().body, b"hi");
    assert_eq!(
        fs::read(private.join(&name)).unwrap(),
        fs::read(demo_plugin("echo")).unwrap(),
        "the copy was written afresh"
    );
    assert!(!private.join("gone-0123456789abcdef.so").exists());
    master.wait_for_log("left by an earlier run", SOON);
    // The same during a reload: garbage planted under the new build's name is overwritten.
    let v2 = private_name(&fixture_plugin("echo"), "echo");
    fs::write(private.join(&v2), b"garbage").unwrap();
    fs::copy(fixture_plugin("echo"), env.plugins_dir().join("libecho.so")).unwrap();
    let reply = master.admin("reload");
    assert!(reply.ends_with("OK\n"), "{reply}");
    wait_until("v2 answers", SOON, || {
        master.client().call("echo", b"x").unwrap().body == b"v2:x"
    });
}

#[test]
fn a_symlink_at_the_pidfiles_temporary_does_not_overwrite_its_target() {
    let env = Env::new();
    env.install("echo");
    let run = env.path().join("run");
    fs::create_dir(&run).unwrap();
    let victim = env.path().join("victim");
    fs::write(&victim, b"precious\n").unwrap();
    symlink(&victim, run.join("jobhost.pid.tmp")).unwrap();
    let master = env.start_master(&config_with(ECHO));
    let pidfile = run.join("jobhost.pid");
    wait_until("the pidfile", SOON, || {
        fs::read_to_string(&pidfile).is_ok_and(|s| s.trim() == master.pid().to_string())
    });
    assert_eq!(fs::read(&victim).unwrap(), b"precious\n");
    assert!(fs::symlink_metadata(&pidfile)
        .unwrap()
        .file_type()
        .is_file());
    assert!(fs::symlink_metadata(run.join("jobhost.pid.tmp")).is_err());
    drop(master);

    // A symlink at the lock file is refused, and its target left as it was.
    let env = Env::new();
    env.install("echo");
    let run = env.path().join("run");
    fs::create_dir(&run).unwrap();
    let victim = env.path().join("victim");
    fs::write(&victim, b"precious\n").unwrap();
    chmod(&victim, 0o600);
    symlink(&victim, run.join("jobhost.pid.lock")).unwrap();
    let config = env.config(&config_with(ECHO));
    run_refused(
        &env,
        config.to_str().unwrap(),
        &format!(
            "the pidfile lock {} is a symbolic link; jobhost never follows a link for a file it writes",
            run.join("jobhost.pid.lock").display()
        ),
    );
    assert_eq!(fs::read(&victim).unwrap(), b"precious\n");
    assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn a_symlink_at_the_log_files_path_is_refused_and_its_target_untouched() {
    let env = Env::new();
    env.install("echo");
    let victim = env.path().join("victim");
    fs::write(&victim, "precious\n").unwrap();
    symlink(&victim, env.path().join("master.log")).unwrap();
    let config = env.config(
        &config_with("[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 1\n")
            .replace("[host]\n", "[host]\nlog = \"master.log\"\n"),
    );
    run_refused(&env, config.to_str().unwrap(), "is a symbolic link");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
}
