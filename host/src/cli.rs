//! The `jobhost` subcommands: argument parsing (clap) and what each command does at the top.
//!
//! Commands that load plugins (`check`, `plugin inspect`) do it only in probe children: a
//! broken plugin can make them print an error, never crash them.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, PoolMode};
use crate::plugins::{self, Info, PluginError};

/// Exit status for "something failed": a bad config, a refused plugin, a failed job.
pub const EXIT_ERROR: u8 = 1;

/// A preforking job host: loads plugins, forks workers, feeds them jobs, supervises them.
#[derive(Debug, Parser)]
#[command(name = "jobhost", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the master: load and init every plugin, fork the workers, serve jobs.
    Run {
        /// The config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Detach from the terminal once the plugins are loaded and the sockets bound.
        #[arg(long)]
        daemon: bool,
        /// The pidfile (default: host.pidfile, `jobhost.pid` in runtime_dir).
        #[arg(long, value_name = "FILE")]
        pidfile: Option<PathBuf>,
    },
    /// Validate a config and load + init every plugin it names, in a child process.
    Check {
        /// The config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Submit jobs: one PAYLOAD, or one job per stdin line with results in input order.
    Submit(crate::submit::SubmitArgs),
    /// Ask the running master to reload its config and plugins; exit 1 with the reason if it
    /// refused (nothing changed then).
    Reload {
        /// The config file (the master re-reads its own copy of this path).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Send one admin command to a running master and print the reply (exit 1 on ERR).
    Ctl(crate::ctl::CtlArgs),
    /// A live view of a running master's pools and workers (q quits).
    Top(crate::top::TopArgs),
    /// Work with plugin files.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// The master's HTTP child (`[admin] http`): started by the master, not by hand.
    #[command(hide = true)]
    HttpServe,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Print a plugin's name, version, description and plugin-api version, or why it is refused.
    Inspect {
        /// One or more plugin files (`lib<name>.so`).
        #[arg(required = true, value_name = "FILE.so")]
        files: Vec<PathBuf>,
    },
}

pub type CliResult = Result<ExitCode, Box<dyn Error>>;

pub fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Run {
            config,
            daemon,
            pidfile,
        } => {
            crate::master::run(&config, crate::master::RunOptions { daemon, pidfile })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => check(&config),
        Command::Submit(args) => crate::submit::run(args),
        Command::Ctl(args) => crate::ctl::run(args),
        Command::Top(args) => crate::top::run(args),
        Command::Reload { config } => reload(&config),
        Command::Plugin(PluginCommand::Inspect { files }) => inspect(&files),
        Command::HttpServe => Ok(crate::http::serve()),
    }
}

/// Connects to a redis pool's server (from this CLI process, never the master) and says
/// whether it answers and whether the group exists. Not reaching it is a warning, not a config
/// error: the workers wait for it with back-off.
fn redis_check(redis: &crate::config::RedisConfig) -> Result<String, String> {
    use crate::worker::redis as source;
    let mut conn = match source::open(redis) {
        Ok(conn) => conn,
        Err(e) => {
            return Ok(format!(
                "warn redis {}: does not answer: {e} (workers will retry until it does)",
                redis.shown_url
            ))
        }
    };
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let group = match source::group_exists(&mut conn, redis) {
        Ok(Some(true)) => format!("group {} on stream {} exists", redis.group, redis.stream),
        Ok(Some(false)) => format!(
            "stream {} has no group {} yet (the workers create it)",
            redis.stream, redis.group
        ),
        Ok(None) => format!(
            "no stream {} yet (the workers create it with group {})",
            redis.stream, redis.group
        ),
        Err(e) => format!("cannot look at stream {}: {e}", redis.stream),
    };
    // The workers settle entries with Lua scripts (a result and its XACK only while the entry
    // is still theirs): a user that may not run them cannot serve this pool at all.
    if let Err(e) = redis::cmd("EVAL")
        .arg("return 1")
        .arg(0)
        .query::<i64>(&mut conn)
    {
        return Err(format!(
            "redis {}: the workers need to run Lua scripts (EVAL, EVALSHA, SCRIPT LOAD), and this server refuses: {e}",
            redis.shown_url
        ));
    }
    Ok(format!("ok   redis {} answers; {group}", redis.shown_url))
}

/// `jobhost check -c FILE`: one line per pool, exit 0; or the first error, exit 1.
fn check(path: &Path) -> CliResult {
    let config = Config::load(path)?;
    init_cli_logging(config.host.log_level);
    // One probe per plugin file, initialising it once per pool's settings.
    let mut files: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for pool in &config.pools {
        files
            .entry(pool.plugin_path(&config.host))
            .or_default()
            .push(pool.settings_toml());
    }
    let mut infos: BTreeMap<PathBuf, Info> = BTreeMap::new();
    for (file, settings) in &files {
        // The same checks as the master's, and the probe loads the very file they passed
        // (through its descriptor), not whatever the name points at a moment later.
        let opened = plugins::PluginFile::open(file, !config.host.insecure_plugins_dir)?;
        let info = plugins::probe(&opened.fd_path(), settings, config.host.init_timeout)
            .map_err(|e| opened.rename(e))?;
        infos.insert(file.clone(), info);
    }
    for pool in &config.pools {
        let file = pool.plugin_path(&config.host);
        let info = infos
            .get(&file)
            .ok_or_else(|| format!("internal: {} was not probed", file.display()))?;
        info.check_mode(&file, pool.mode == PoolMode::Loop)
            .map_err(|e| in_pool(&pool.name, e))?;
        println!(
            "ok  pool {:<12} plugin {} {} (plugin-api {}), mode {}, {} worker{} — {}",
            pool.name,
            info.name,
            info.version,
            info.api_version,
            match pool.mode {
                PoolMode::Jobs => "jobs",
                PoolMode::Loop => "loop",
            },
            pool.workers,
            if pool.workers == 1 { "" } else { "s" },
            file.display(),
        );
        if let Some(redis) = &pool.redis {
            println!(
                "    {}",
                redis_check(redis).map_err(|e| format!("pool {}: {e}", pool.name))?
            );
        }
        if let Some(gearman) = &pool.gearman {
            // A server that does not answer is a warning: the workers retry it with back-off.
            let timeout = std::time::Duration::from_secs(3);
            for answer in crate::worker::gearman::check_servers(gearman, timeout) {
                match answer {
                    Ok(line) => println!("    ok   {line}; function {}", gearman.function),
                    Err(line) => println!("    warn {line} (workers will retry until it answers)"),
                }
            }
        }
    }
    println!(
        "{}: {} pool(s), config ok",
        config.path.display(),
        config.pools.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn in_pool(pool: &str, e: PluginError) -> String {
    format!("pool {pool}: {e}")
}

/// `jobhost reload -c FILE`: the admin `reload` command, waiting as long as the plugins' `init`
/// may take in their probes.
fn reload(path: &Path) -> CliResult {
    // A config that does not load is still the master's to judge: it logs why and shows the
    // failed reload in `status`. Only when no master answers is the error ours to print.
    let (socket, wait, bad_config) = match Config::load(path) {
        Ok(config) => (
            config.admin.socket,
            config.host.init_timeout * (config.pools.len() as u32 + 1),
            None,
        ),
        Err(e @ crate::config::ConfigError::Read { .. }) => return Err(e.into()),
        Err(e) => (
            crate::config::admin_socket_lenient(path),
            std::time::Duration::from_secs(120),
            Some(e),
        ),
    };
    let wait = wait + std::time::Duration::from_secs(30);
    let reply = match (crate::ctl::exchange(&socket, "reload", wait), bad_config) {
        (Ok(reply), _) => reply,
        (Err(crate::ctl::CtlError::Connect { .. }), Some(config_error)) => {
            return Err(config_error.into())
        }
        (Err(e), _) => return Err(e.into()),
    };
    let stdout = &mut std::io::stdout();
    let stderr = &mut std::io::stderr();
    Ok(crate::ctl::print_reply(&reply, stdout, stderr)?)
}

/// `jobhost plugin inspect FILE.so...`: each file is probed in its own child.
fn inspect(files: &[PathBuf]) -> CliResult {
    init_cli_logging(log::LevelFilter::Warn);
    let mut failed = false;
    for (i, file) in files.iter().enumerate() {
        if i > 0 {
            println!();
        }
        match plugins::probe(file, &[], std::time::Duration::from_secs(30)) {
            Ok(info) => {
                println!("file:        {}", file.display());
                println!("name:        {}", info.name);
                println!("version:     {}", info.version);
                println!("description: {}", info.description);
                println!(
                    "plugin-api:  {} (this jobhost: {})",
                    info.api_version,
                    plugins::HOST_API_VERSION
                );
                println!("modes:       {}", info.modes());
            }
            Err(e) => {
                eprintln!("jobhost: refused: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

/// Logging for one-shot commands: stderr, so plugins' log lines show up next to our output.
fn init_cli_logging(level: log::LevelFilter) {
    // Only a file sink can fail to open; stderr cannot.
    let _ = crate::logging::init(level, None, "jobhost");
}
