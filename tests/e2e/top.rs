//! `jobhost top`: the live view on a real pseudo-terminal (util-linux `script`), against a real
//! master with two pools: what it shows, that it refreshes, that `q` quits and gives the
//! terminal back, that a master that stops answering is shown as such; and `--once`.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobhost_e2e::{bin_dir, children_of, config_with, wait_until, Env, Master, SOON};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const TWO_POOLS: &str = "[[pool]]\nname = \"echo\"\nplugin = \"echo\"\nworkers = 2\n\n[[pool]]\nname = \"sleep\"\nplugin = \"sleep\"\nworkers = 1\n";

/// What `top` writes to leave the alternate screen (after showing the cursor again).
const LEAVE_SCREEN: &str = "\x1b[?25h\x1b[?1049l";

/// What `top` writes to take the alternate screen.
const ENTER_SCREEN: &str = "\x1b[?1049h";

fn two_pools(env: &Env) -> Master {
    env.install("echo");
    env.install("sleep");
    let master = env.start_master(&config_with(TWO_POOLS));
    master.wait_for_workers(3);
    master
}

/// The workers' pids from `workers json`.
fn worker_pids(master: &Master) -> Vec<i32> {
    let reply = master.admin("workers json");
    let doc: serde_json::Value = serde_json::from_str(reply.lines().next().unwrap()).unwrap();
    doc["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

fn have_script() -> bool {
    jobhost_e2e::prerequisite(
        Command::new("script").arg("--version").output().is_ok(),
        "no `script` (util-linux / bsdutils) to give top a pseudo-terminal",
    )
}

/// `jobhost top` on a pseudo-terminal: `script` copies what it draws to our pipe, and what we
/// write to its stdin to the terminal's keyboard.
struct Top {
    child: Child,
    keyboard: Option<ChildStdin>,
    drawn: Arc<Mutex<Vec<u8>>>,
}

impl Top {
    fn start(admin_socket: &std::path::Path) -> Top {
        let command = format!(
            "'{}' top --interval 200ms --socket '{}'",
            bin_dir().join("jobhost").display(),
            admin_socket.display()
        );
        let mut child = Command::new("script")
            .args(["--quiet", "--return", "--flush", "--command", &command])
            .arg("/dev/null")
            .env("TERM", "xterm")
            // The pseudo-terminal gets no size from a `script` whose stdin is a pipe: top
            // falls back to these.
            .env("LINES", "40")
            .env("COLUMNS", "120")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn script");
        let keyboard = child.stdin.take();
        let mut out = child.stdout.take().expect("piped stdout");
        let drawn = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&drawn);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Top {
            child,
            keyboard,
            drawn,
        }
    }

    /// Everything written to the terminal so far.
    fn raw(&self) -> String {
        String::from_utf8_lossy(&self.drawn.lock().unwrap()).into_owned()
    }

    /// The last whole frame (cursor home … erase below), as plain lines.
    fn screen(&self) -> String {
        let raw = self.raw();
        let frame = raw
            .rsplit("\x1b[H")
            .find_map(|piece| piece.split_once("\x1b[J").map(|(frame, _)| frame))
            .unwrap_or_default();
        strip_escapes(frame).replace("\r\n", "\n")
    }

    /// Waits until the screen shows what `ok` looks for; fails showing the screen.
    fn wait_for(&self, what: &str, mut ok: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + SOON;
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what}; last frame:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn press(&mut self, keys: &[u8]) {
        let keyboard = self.keyboard.as_mut().expect("the keyboard");
        keyboard.write_all(keys).expect("type");
        keyboard.flush().expect("type");
    }

    /// The pid of `jobhost top` itself, under `script` (and maybe a shell).
    fn pid(&self) -> i32 {
        let mut found = None;
        wait_until("top to start under script", SOON, || {
            let mut queue = vec![self.child.id() as i32];
            while let Some(pid) = queue.pop() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim_end() == "jobhost" {
                    found = Some(pid);
                    return true;
                }
                queue.extend(children_of(pid));
            }
            false
        });
        found.unwrap()
    }

    /// Waits for top (and `script`, which exits with its status) to exit.
    fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until("top to exit", SOON, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for Top {
    fn drop(&mut self) {
        // Killing `script` hangs up the terminal, which ends top.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Text without its CSI escapes (`ESC [ … final byte`) and other two-byte escapes.
fn strip_escapes(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// The cells of the row starting with `first` in the table whose header starts with
/// `header`, if it is there.
fn row(screen: &str, header: &str, first: &str) -> Option<Vec<String>> {
    let mut lines = screen
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(header));
    lines.next()?;
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cells| cells.first().map(String::as_str) == Some(first))
}

/// The DONE cell of a pool's row.
fn done(screen: &str, pool: &str) -> Option<String> {
    row(screen, "POOL", pool).and_then(|cells| cells.get(6).cloned())
}

#[test]
fn top_shows_the_pools_and_workers_refreshes_and_quits_on_q() {
    if !have_script() {
        return;
    }
    let env = Env::new();
    let master = two_pools(&env);
    let pids = worker_pids(&master);
    assert_eq!(pids.len(), 3);
    let mut top = Top::start(&master.admin_socket());

    let screen = top.wait_for("both pools and every worker", |s| {
        done(s, "echo").is_some()
            && done(s, "sleep").is_some()
            && pids
                .iter()
                .all(|pid| row(s, "PID", &pid.to_string()).is_some())
    });
    assert!(
        screen.contains(&format!("master pid {}", master.pid())),
        "{screen}"
    );
    assert_eq!(done(&screen, "echo").as_deref(), Some("0"), "{screen}");
    let echo_worker = row(&screen, "PID", &pids[0].to_string()).unwrap();
    assert!(
        echo_worker[1] == "echo" || echo_worker[1] == "sleep",
        "{echo_worker:?}"
    );

    // Jobs done: the figure changes on a later refresh.
    let mut client = master.client();
    for i in 0..25 {
        let payload = format!("job {i}");
        assert_eq!(
            client.call("echo", payload.as_bytes()).unwrap().body,
            payload.as_bytes()
        );
    }
    top.wait_for("25 echo jobs done", |s| {
        done(s, "echo").as_deref() == Some("25")
    });

    top.press(b"q");
    let status = top.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let raw = top.raw();
    assert!(raw.contains("\x1b[?1049h"), "it used the alternate screen");
    let left = raw
        .rfind(LEAVE_SCREEN)
        .unwrap_or_else(|| panic!("the terminal was not given back: {raw:?}"));
    assert!(
        raw.rfind("\x1b[H").is_some_and(|home| home < left),
        "nothing was drawn after leaving the alternate screen"
    );
}

#[test]
fn a_master_that_stops_answering_is_shown_and_q_still_quits() {
    if !have_script() {
        return;
    }
    let env = Env::new();
    let mut master = two_pools(&env);
    let workers = master.workers();
    let mut top = Top::start(&master.admin_socket());
    top.wait_for("the pools", |s| done(s, "echo").is_some());

    // Stopped: it still accepts connections, and answers nothing.
    master.signal(Signal::SIGSTOP);
    let screen = top.wait_for("the master not answering", |s| {
        s.contains("master not answering: no reply within 2s")
    });
    assert!(
        done(&screen, "echo").is_some(),
        "the last figures stay: {screen}"
    );

    // Gone: nothing listens on its socket any more.
    master.signal(Signal::SIGKILL);
    let _ = master.child.wait();
    for pid in workers {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let admin_socket = master.admin_socket();
    top.wait_for("no master", |s| {
        s.contains(&format!(
            "master not answering: no master at {}",
            admin_socket.display()
        ))
    });

    top.press(b"q");
    let status = top.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(top.raw().contains(LEAVE_SCREEN));
}

#[test]
fn once_prints_one_plain_frame() {
    let env = Env::new();
    let master = two_pools(&env);
    let pids = worker_pids(&master);
    let status: serde_json::Value =
        serde_json::from_str(master.admin("status json").lines().next().unwrap()).unwrap();
    let version = status["version"].as_str().unwrap().to_owned();
    let socket = master.admin_socket();
    let socket = socket.to_str().unwrap();
    // With --once, and without it when stdout is not a terminal (a pipe here).
    for args in [
        &["top", "--once", "--socket", socket][..],
        &["top", "--socket", socket],
    ] {
        let run = env.jobhost(args);
        run.assert_code(0);
        assert!(!run.stdout.contains('\x1b'), "{:?}", run.stdout);
        assert!(
            run.stdout
                .starts_with(&format!("jobhost {version}  master pid {}", master.pid())),
            "{}",
            run.stdout
        );
        assert_eq!(
            done(&run.stdout, "echo").as_deref(),
            Some("0"),
            "{}",
            run.stdout
        );
        assert!(done(&run.stdout, "sleep").is_some(), "{}", run.stdout);
        for pid in &pids {
            assert!(
                row(&run.stdout, "PID", &pid.to_string()).is_some(),
                "worker {pid}: {}",
                run.stdout
            );
        }
    }

    // The config file names the socket too.
    let config = env.path().join("jobhost.toml");
    env.jobhost(&["top", "--once", "-c", config.to_str().unwrap()])
        .assert_code(0)
        .assert_stdout_has("master pid");

    // No master: said on stdout, exit status 1.
    drop(master);
    let run = env.jobhost(&["top", "--once", "--socket", socket]);
    run.assert_code(1)
        .assert_stdout_has(&format!("master not answering: no master at {socket}"));
}

/// The scheduler state letter of `pid` (`T` when stopped).
fn state_of(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

#[test]
fn sigtstp_gives_the_terminal_back_while_stopped_and_sigquit_restores_it_on_the_way_out() {
    if !have_script() {
        return;
    }
    let env = Env::new();
    let master = two_pools(&env);
    let top = Top::start(&master.admin_socket());
    top.wait_for("the pools", |s| done(s, "echo").is_some());
    let pid = top.pid();

    let before_stop = top.raw().len();
    kill(Pid::from_raw(pid), Signal::SIGTSTP).unwrap();
    wait_until("top to stop", SOON, || state_of(pid) == Some('T'));

    // `script` stops itself when its child stops (as a shell takes the terminal back) — maybe
    // before it has copied what top wrote last, maybe only after a moment — and continues its
    // child when it is continued: whichever of the two is found stopped is continued, on every
    // look, and what top wrote before it stopped is told by the order of what arrives.
    let script = Pid::from_raw(top.child.id() as i32);
    wait_until(
        "the terminal given back, then taken again and drawn on",
        SOON,
        || {
            for each in [script, Pid::from_raw(pid)] {
                if state_of(each.as_raw()) == Some('T') {
                    let _ = kill(each, Signal::SIGCONT);
                }
            }
            let raw = top.raw();
            let Some(left) = raw[before_stop..].find(LEAVE_SCREEN) else {
                return false;
            };
            let after_leaving = &raw[before_stop + left..];
            after_leaving.find(ENTER_SCREEN).is_some_and(|entered| {
                let drawn = &after_leaving[entered..];
                drawn.contains("\x1b[H") && drawn.contains("\x1b[J")
            })
        },
    );
    top.wait_for("the pools again", |s| done(s, "echo").is_some());

    // A signal that would end it by default ends it with the terminal given back.
    let before_quit = top.raw().len();
    kill(Pid::from_raw(pid), Signal::SIGQUIT).unwrap();
    let mut top = top;
    let status = top.wait_exit();
    assert_eq!(
        status.code(),
        Some(128 + Signal::SIGQUIT as i32),
        "{status:?}"
    );
    let raw = top.raw();
    assert!(
        raw[before_quit..].contains(LEAVE_SCREEN),
        "SIGQUIT left the terminal on the alternate screen: {:?}",
        &raw[before_quit..]
    );
}
