//! `jobhost submit`: one job from the command line, or a stream of jobs from stdin answered in
//! input order as they complete.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use jobhost_e2e::{bin_dir, config_with, Env};

/// `jobhost submit --socket SOCKET e` fed the lines `0` .. `count - 1` on stdin (from a thread,
/// so that results stream out while input goes in); its whole output.
fn submit_lines(socket: &str, count: usize, stderr: Stdio) -> std::process::Output {
    let input: String = (0..count).map(|i| format!("{i}\n")).collect();
    let mut child = Command::new(bin_dir().join("jobhost"))
        .args(["submit", "--socket", socket, "e"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    output
}

#[test]
fn one_payload_prints_its_result_and_a_failure_exits_1() {
    let env = Env::new();
    env.install("hash");
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"hash\"\nplugin = \"hash\"\n\n[[pool]]\nname = \"f\"\nplugin = \"faulty\"\n",
    ));
    let config = env.path().join("jobhost.toml");
    env.jobhost(&["submit", "-c", config.to_str().unwrap(), "hash", "abc"])
        .assert_code(0)
        .assert_stdout_has("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n");
    env.jobhost(&[
        "submit",
        "--socket",
        master.socket.to_str().unwrap(),
        "f",
        "panic",
    ])
    .assert_code(1)
    .assert_stderr_has("jobhost: job failed: plugin panicked in handle at ");
    env.jobhost(&["submit", "-c", config.to_str().unwrap(), "nosuch", "x"])
        .assert_code(1)
        .assert_stderr_has("jobhost: job rejected: unknown pool \"nosuch\"");
}

#[test]
fn no_master_is_a_clear_error() {
    let env = Env::new();
    env.jobhost(&["submit", "--socket", "run/jobs.sock", "e", "x"])
        .assert_code(1)
        .assert_stderr_has("no jobhost master at run/jobs.sock — is it running?");
}

#[test]
fn stdin_lines_are_answered_in_order_as_they_complete_not_at_the_end() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 2\n",
    ));
    let mut submit = Command::new(bin_dir().join("jobhost"))
        .args(["submit", "--socket", master.socket.to_str().unwrap(), "e"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = submit.stdin.take().unwrap();
    let mut stdout = BufReader::new(submit.stdout.take().unwrap());
    // Results arrive while stdin is still open: streamed, not collected.
    for i in 0..3 {
        writeln!(stdin, "line {i}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line, format!("line {i}\n"));
    }
    drop(stdin);
    assert!(submit.wait().unwrap().success());
}

#[test]
fn a_hundred_thousand_lines_come_back_in_order_and_json_marks_failures() {
    let env = Env::new();
    env.install("echo");
    env.install("faulty");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 2\n\n[[pool]]\nname = \"f\"\nplugin = \"faulty\"\n",
    ));
    let socket = master.socket.to_str().unwrap().to_owned();
    let output = submit_lines(&socket, 100_000, Stdio::inherit());
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.lines().enumerate().all(|(i, l)| l == i.to_string()),
        "out of order or missing"
    );
    assert_eq!(text.lines().count(), 100_000);

    let mut child = Command::new(bin_dir().join("jobhost"))
        .args(["submit", "--json", "--socket", &socket, "f"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"ok\npanic\nok\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "a failed job makes the exit status 1"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["status"], "ok");
    assert_eq!(lines[0]["result"], "ok");
    assert_eq!(lines[1]["id"], 1);
    assert_eq!(lines[1]["status"], "failed");
    assert!(lines[1]["error"]
        .as_str()
        .unwrap()
        .starts_with("plugin panicked in handle"));
    assert_eq!(lines[2]["status"], "ok");
}

/// What indicatif writes on a terminal: the bar's text, and the "erase line" it redraws with.
const BAR_TEXT: &str = "jobs done";
const ERASE_LINE: &str = "\x1b[2K";

#[test]
fn no_progress_bar_when_stderr_is_not_a_terminal() {
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 2\n",
    ));
    let output = submit_lines(master.socket.to_str().unwrap(), 20_000, Stdio::piped());
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().lines().count(),
        20_000
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.is_empty(),
        "stderr is a pipe, yet submit wrote to it: {stderr:?}"
    );
}

#[test]
fn a_progress_bar_is_drawn_when_stderr_is_a_terminal() {
    // util-linux `script` runs a command on a pseudo-terminal and copies what it wrote there.
    let have_script = Command::new("script").arg("--version").output().is_ok();
    if !jobhost_e2e::prerequisite(
        have_script,
        "no `script` (util-linux / bsdutils) to give submit a pseudo-terminal",
    ) {
        return;
    }
    let env = Env::new();
    env.install("echo");
    let master = env.start_master(&config_with(
        "[[pool]]\nname = \"e\"\nplugin = \"echo\"\nworkers = 2\n",
    ));
    let input = env.path().join("in.txt");
    let out = env.path().join("out.txt");
    std::fs::write(
        &input,
        (0..20_000).map(|i| format!("{i}\n")).collect::<String>(),
    )
    .unwrap();
    // stdin and stdout are files; only stderr is left on the terminal.
    let command = format!(
        "'{}' submit --socket '{}' e < '{}' > '{}'",
        bin_dir().join("jobhost").display(),
        master.socket.display(),
        input.display(),
        out.display()
    );
    let run = jobhost_e2e::run(
        Command::new("script")
            .args([
                "--quiet",
                "--return",
                "--flush",
                "--command",
                &command,
                "/dev/null",
            ])
            .env("TERM", "xterm")
            .stdin(Stdio::null()),
    );
    run.assert_code(0);
    let results = std::fs::read_to_string(&out).unwrap();
    assert!(
        results.lines().enumerate().all(|(i, l)| l == i.to_string())
            && results.lines().count() == 20_000,
        "the results, in order, went to stdout (not the terminal)"
    );
    // The terminal got the bar, redrawn in place, ending at the total.
    assert!(
        run.stdout.contains(BAR_TEXT) && run.stdout.contains(ERASE_LINE),
        "no progress bar on the terminal: {:?}",
        run.stdout
    );
    assert!(
        run.stdout.contains("20000/20000 jobs done"),
        "the bar does not end at 20000/20000: {:?}",
        run.stdout
    );
    assert!(!results.contains(BAR_TEXT));
}
