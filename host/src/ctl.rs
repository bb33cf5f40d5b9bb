//! `jobhost ctl`: send one command to a running master's admin socket and print the reply.
//!
//! This module owns the command's arguments, finding the admin socket (`--socket`, or the
//! `[admin] socket` of a config file), building the command line from the words given
//! (`--json` appends ` json` to `status` and `workers`), one exchange on the socket with a
//! deadline, and turning the reply into output and an exit status: the reply's lines on
//! stdout, and on `ERR <reason>` the reason on stderr and exit status 1.
//!
//! It never interprets a command (the master parses it; see [`crate::admin`]), never retries
//! or reconnects, never sends more than one line, never prints a reply that did not end in
//! `OK` or `ERR`, and never treats a closed stdout (`| head`) as an error.

use std::error::Error;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::admin;
use crate::cli::EXIT_ERROR;
use crate::config::Config;

/// How long the master has to answer (the whole reply, not each read).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest reply line accepted (a `status json` with many workers is one long line).
const MAX_REPLY_LINE: u64 = 64 << 20;

/// Send one admin command to a running master and print the reply (see [`AFTER_HELP`]).
#[derive(clap::Args, Debug)]
#[command(
    group(clap::ArgGroup::new("master").required(true).args(["config", "socket"])),
    after_help = AFTER_HELP
)]
pub struct CtlArgs {
    /// The master's config file: use its `[admin] socket`.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The master's admin socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// For `status` and `workers`: ask for JSON and print the document as it is.
    #[arg(long)]
    pub json: bool,
    /// The command and its arguments, e.g. `status`, `scale echo 4`, `shutdown now`.
    #[arg(
        value_name = "COMMAND",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

/// What `jobhost ctl --help` says after the options.
pub const AFTER_HELP: &str = "\
Commands: help, status, workers, metrics [prometheus], scale POOL N, restart POOL|all,
stop POOL, start POOL, reload, shutdown [graceful|now]; `jobhost ctl -c FILE help` asks the master for the list.
Options go before COMMAND: every word after it belongs to the command.
The reply is printed to stdout; if the master refuses the command, its reason is printed to
stderr. Exit status: 0 when the master answered OK, 1 otherwise.";

/// Why `jobhost ctl` could not get an answer (a refusal by the master is not one of these:
/// it is printed and gives exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The words do not make one command line.
    #[error("{0}")]
    Usage(String),
    /// The socket is there, but this user may not connect to it.
    #[error("cannot connect to {}: permission denied (admin.socket_mode and admin.socket_group say who may)", path.display())]
    Denied { path: PathBuf },
    /// Nothing accepted the connection at `path`.
    #[error("no jobhost master at {} — is it running? ({source})", path.display())]
    Connect { path: PathBuf, source: io::Error },
    /// The whole reply did not arrive in time.
    #[error("the master did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
    /// End of file (or a reset) before the final `OK` or `ERR` line.
    #[error("the master closed the connection before answering")]
    Closed,
    /// A reply line longer than any the master sends.
    #[error("the master's reply has a line over {MAX_REPLY_LINE} bytes")]
    LineTooLong,
    /// Another read or write error on the socket.
    #[error("admin socket: {0}")]
    Io(io::Error),
    /// Writing the reply to stdout or stderr failed.
    #[error("cannot write the reply: {0}")]
    Output(io::Error),
}

/// The master's answer to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The lines before the final one, without their line endings.
    pub lines: Vec<String>,
    /// `Ok(())` for `OK`, `Err(reason)` for `ERR reason`.
    pub outcome: Result<(), String>,
}

/// Runs `jobhost ctl`.
pub fn run(args: CtlArgs) -> Result<ExitCode, Box<dyn Error>> {
    let socket = admin_socket(&args)?;
    let line = command_line(&args.command, args.json)?;
    // Each message already names its cause: report it as one line.
    let reply = exchange(&socket, &line, REPLY_TIMEOUT).map_err(|e| e.to_string())?;
    Ok(print_reply(
        &reply,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    )?)
}

/// The admin socket: `--socket`, or the `[admin] socket` of the `--config` file.
pub fn admin_socket(args: &CtlArgs) -> Result<PathBuf, Box<dyn Error>> {
    match (&args.socket, &args.config) {
        (Some(socket), _) => Ok(socket.clone()),
        // A config edited into a bad state since the master started must not lock the
        // operator out of the master that still runs with the old one.
        (None, Some(config)) => match Config::load(config) {
            Ok(c) => Ok(c.admin.socket),
            Err(e @ crate::config::ConfigError::Read { .. }) => Err(e.into()),
            Err(_) => Ok(crate::config::admin_socket_lenient(config)),
        },
        (None, None) => Err("give --config FILE or --socket PATH".into()),
    }
}

/// Joins the words into one command line; with `json`, asks `status`/`workers` for JSON.
pub fn command_line(words: &[String], json: bool) -> Result<String, CtlError> {
    if words
        .iter()
        .any(|w| w.chars().any(|c| c.is_control() && c != '\t'))
    {
        return Err(CtlError::Usage(
            "the command must be one line of text (no newlines or control characters)".into(),
        ));
    }
    let mut line = words.join(" ");
    if line.trim_matches([' ', '\t']).is_empty() {
        return Err(CtlError::Usage("no command given".into()));
    }
    if json {
        let mut parts = line.split([' ', '\t']).filter(|w| !w.is_empty());
        let name = parts.next().unwrap_or("").to_ascii_lowercase();
        let rest: Vec<&str> = parts.collect();
        if name != "status" && name != "workers" {
            return Err(CtlError::Usage(
                "--json works with status and workers only".into(),
            ));
        }
        // With other arguments, `status x`, the master explains what is wrong.
        if rest.is_empty() {
            line.push_str(" json");
        }
    }
    if line.len() > admin::MAX_LINE {
        return Err(CtlError::Usage(format!(
            "the command is over {} bytes",
            admin::MAX_LINE
        )));
    }
    Ok(line)
}

/// Connects to the admin socket at `path`, sends `line` and reads the reply, all within
/// `timeout`.
pub fn exchange(path: &Path, line: &str, timeout: Duration) -> Result<Reply, CtlError> {
    let deadline = Instant::now() + timeout;
    let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::PermissionDenied => CtlError::Denied {
            path: path.to_owned(),
        },
        _ => CtlError::Connect {
            path: path.to_owned(),
            source,
        },
    })?;
    let io_error = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CtlError::Timeout(timeout),
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => CtlError::Closed,
        _ => CtlError::Io(e),
    };
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(CtlError::Timeout(timeout))
    };
    stream
        .set_write_timeout(Some(remaining()?))
        .map_err(CtlError::Io)?;
    (&stream)
        .write_all(format!("{line}\n").as_bytes())
        .map_err(io_error)?;

    let mut reader = BufReader::new(&stream);
    let mut lines = Vec::new();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        // A read timeout of what is left: a master that trickles bytes still has to finish.
        stream
            .set_read_timeout(Some(remaining()?))
            .map_err(CtlError::Io)?;
        let n = (&mut reader)
            .take(MAX_REPLY_LINE + 1)
            .read_until(b'\n', &mut raw)
            .map_err(io_error)?;
        if n == 0 || raw.last() != Some(&b'\n') {
            // No LF: end of file (possibly in the middle of a line), or a line over the limit.
            return Err(if raw.len() as u64 > MAX_REPLY_LINE {
                CtlError::LineTooLong
            } else {
                CtlError::Closed
            });
        }
        raw.pop();
        if raw.last() == Some(&b'\r') {
            raw.pop();
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        if admin::is_final_line(&text) {
            let outcome = match text.strip_prefix("ERR") {
                None => Ok(()),
                Some(reason) => Err(reason.trim_start_matches(' ').to_owned()),
            };
            return Ok(Reply { lines, outcome });
        }
        lines.push(text);
    }
}

/// Prints the reply lines to `out`, and on `ERR` the reason to `err` as `jobhost: <reason>`;
/// gives the exit status. A closed `out` is not an error (the reader left on purpose).
pub fn print_reply(
    reply: &Reply,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<ExitCode, CtlError> {
    let mut text = String::new();
    for line in &reply.lines {
        text.push_str(line);
        text.push('\n');
    }
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(CtlError::Output(e)),
        _ => {}
    }
    match &reply.outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(reason) => {
            let reason = if reason.is_empty() {
                "the master refused the command"
            } else {
                reason
            };
            writeln!(err, "jobhost: {reason}").map_err(CtlError::Output)?;
            Ok(ExitCode::from(EXIT_ERROR))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread::{self, JoinHandle};

    use clap::Parser;

    /// A fake master: accepts one connection, reads one line, answers with `reply` (then
    /// waits `hold` before closing), and gives back the line it read.
    fn fake_master(
        path: &Path,
        reply: &'static [u8],
        hold: Duration,
    ) -> JoinHandle<Result<String, String>> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            (&stream).write_all(reply).map_err(|e| e.to_string())?;
            thread::sleep(hold);
            Ok(line)
        })
    }

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    /// One exchange with a fake master answering `reply`, printed: (line sent, result,
    /// stdout, stderr).
    fn talk(
        command: &str,
        reply: &'static [u8],
    ) -> (String, Result<ExitCode, CtlError>, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let master = fake_master(&path, reply, Duration::ZERO);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let result = exchange(&path, command, Duration::from_secs(10))
            .and_then(|reply| print_reply(&reply, &mut out, &mut err));
        let sent = master.join().unwrap().unwrap();
        (
            sent,
            result,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn ok_reply_is_printed_without_ok() {
        let (sent, result, out, err) = talk("status", b"jobhost 0.1.0\n\nPOOL  STATE\nOK\n");
        assert_eq!(sent, "status\n");
        assert_eq!(result.unwrap(), ExitCode::SUCCESS);
        assert_eq!(out, "jobhost 0.1.0\n\nPOOL  STATE\n");
        assert_eq!(err, "");
    }

    #[test]
    fn ok_alone_prints_nothing() {
        let (sent, result, out, err) = talk("scale echo 4", b"OK\n");
        assert_eq!(sent, "scale echo 4\n");
        assert_eq!(result.unwrap(), ExitCode::SUCCESS);
        assert_eq!((out.as_str(), err.as_str()), ("", ""));
    }

    #[test]
    fn err_reply_goes_to_stderr_with_status_1() {
        let (_, result, out, err) = talk("scale nope 4", b"ERR unknown pool \"nope\"\n");
        assert_eq!(result.unwrap(), ExitCode::from(EXIT_ERROR));
        assert_eq!(out, "");
        assert_eq!(err, "jobhost: unknown pool \"nope\"\n");

        // Lines before the ERR are still printed; a bare ERR gets a reason.
        let (_, result, out, err) = talk("restart all", b"restarting echo\r\nERR\r\n");
        assert_eq!(result.unwrap(), ExitCode::from(EXIT_ERROR));
        assert_eq!(out, "restarting echo\n");
        assert_eq!(err, "jobhost: the master refused the command\n");
    }

    #[test]
    fn crlf_and_look_alike_lines() {
        let (_, result, out, _) = talk(
            "status",
            b"OK then\r\nERRORS  ok  1/1\r\n OK\r\nok\r\nOK\r\nnot read\n",
        );
        assert_eq!(result.unwrap(), ExitCode::SUCCESS);
        assert_eq!(out, "OK then\nERRORS  ok  1/1\n OK\nok\n");
    }

    #[test]
    fn json_document_is_printed_as_is() {
        let (sent, result, out, _) = talk(
            &command_line(&words("status"), true).unwrap(),
            b"{\"pid\":1,\"pools\":[]}\nOK\n",
        );
        assert_eq!(sent, "status json\n");
        assert_eq!(result.unwrap(), ExitCode::SUCCESS);
        assert_eq!(out, "{\"pid\":1,\"pools\":[]}\n");
    }

    #[test]
    fn closed_before_the_end_is_an_error() {
        for reply in [&b""[..], b"jobhost 0.1.0\n", b"jobhost 0.1.0\nOK"] {
            let reply: &'static [u8] = Box::leak(reply.to_vec().into_boxed_slice());
            let (_, result, out, _) = talk("status", reply);
            let e = result.unwrap_err();
            assert!(matches!(e, CtlError::Closed), "{reply:?}: {e:?}");
            assert_eq!(
                e.to_string(),
                "the master closed the connection before answering"
            );
            assert_eq!(out, "", "nothing is printed from a cut reply");
        }
    }

    #[test]
    fn silence_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        // Answers one line, then nothing, and keeps the connection open.
        let master = fake_master(&path, b"jobhost 0.1.0\n", Duration::from_secs(2));
        let started = Instant::now();
        let e = exchange(&path, "status", Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, CtlError::Timeout(_)), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            CtlError::Timeout(REPLY_TIMEOUT).to_string(),
            "the master did not answer within 30s"
        );
        master.join().unwrap().unwrap();
    }

    #[test]
    fn trickling_does_not_extend_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let master = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // One line every 100 ms, never OK; stops once the client is gone.
            for _ in 0..50 {
                if stream.write_all(b"still here\n").is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let e = exchange(&path, "status", Duration::from_millis(500)).unwrap_err();
        assert!(matches!(e, CtlError::Timeout(_)), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        master.join().unwrap();
    }

    #[test]
    fn no_master() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let e = exchange(&path, "status", Duration::from_secs(1)).unwrap_err();
        let shown = e.to_string();
        let want = format!("no jobhost master at {} — is it running? (", path.display());
        assert!(shown.starts_with(&want), "{shown}");
        assert!(shown.ends_with(')'), "{shown}");

        // A socket file nobody listens on (a dead master's).
        drop(UnixListener::bind(&path).unwrap());
        let e = exchange(&path, "status", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, CtlError::Connect { .. }), "{e:?}");
    }

    #[test]
    fn command_lines() {
        assert_eq!(command_line(&words("status"), false).unwrap(), "status");
        assert_eq!(
            command_line(&words("scale echo 4"), false).unwrap(),
            "scale echo 4"
        );
        assert_eq!(
            command_line(&words("workers"), true).unwrap(),
            "workers json"
        );
        assert_eq!(command_line(&words("STATUS"), true).unwrap(), "STATUS json");
        assert_eq!(
            command_line(&words("status json"), true).unwrap(),
            "status json"
        );
        // Bad arguments are the master's to report.
        assert_eq!(command_line(&words("status x"), true).unwrap(), "status x");
        let usage = |words: &[String], json| match command_line(words, json) {
            Err(CtlError::Usage(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            usage(&words("scale echo 4"), true),
            "--json works with status and workers only"
        );
        assert!(usage(&["status\nshutdown now".to_owned()], false).contains("one line"));
        assert!(usage(&["status\r".to_owned()], false).contains("one line"));
        assert_eq!(usage(&[String::new()], false), "no command given");
        assert!(usage(&["x".repeat(5000)], false).contains("over 4096 bytes"));
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse_args(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied())).map(|c| c.ctl)
    }

    #[test]
    fn arguments() {
        let a = parse_args(&["--socket", "/run/a.sock", "scale", "echo", "-1"]).unwrap();
        assert_eq!(a.socket, Some(PathBuf::from("/run/a.sock")));
        assert_eq!(a.config, None);
        assert!(!a.json);
        assert_eq!(a.command, words("scale echo -1"));

        let a = parse_args(&["-c", "jobhost.toml", "--json", "workers"]).unwrap();
        assert_eq!(a.config, Some(PathBuf::from("jobhost.toml")));
        assert!(a.json);
        assert_eq!(a.command, words("workers"));

        // Every word after the command belongs to it.
        let a = parse_args(&["--socket", "s", "status", "--json"]).unwrap();
        assert_eq!(a.command, words("status --json"));

        for bad in [
            &["status"][..],
            &["-c", "f", "--socket", "s", "status"],
            &["--socket", "s"],
        ] {
            assert!(parse_args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn socket_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        fs_write(&dir.path().join("plugins/libecho.so"), "");
        let config = dir.path().join("jobhost.toml");
        fs_write(
            &config,
            "[admin]\nsocket = \"ctl.sock\"\n[[pool]]\nname = \"echo\"\nplugin = \"echo\"\n",
        );
        let args = parse_args(&["-c", config.to_str().unwrap(), "status"]).unwrap();
        let socket = admin_socket(&args).unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(socket, root.join("run/ctl.sock"));

        std::fs::create_dir(root.join("run")).unwrap();
        let master = fake_master(&socket, b"pong\nOK\n", Duration::ZERO);
        let reply = exchange(&socket, "status", Duration::from_secs(10)).unwrap();
        assert_eq!(reply.lines, ["pong"]);
        assert_eq!(reply.outcome, Ok(()));
        master.join().unwrap().unwrap();

        let args = parse_args(&["-c", "/nonexistent/jobhost.toml", "status"]).unwrap();
        let e = admin_socket(&args).unwrap_err().to_string();
        assert!(e.contains("cannot read the config file"), "{e}");
    }

    fn fs_write(path: &Path, text: &str) {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn closed_stdout_is_not_an_error() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let reply = Reply {
            lines: vec!["a".into()],
            outcome: Ok(()),
        };
        let mut err = Vec::new();
        assert_eq!(
            print_reply(&reply, &mut Closed, &mut err).unwrap(),
            ExitCode::SUCCESS
        );
    }
}
