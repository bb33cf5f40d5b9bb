//! jobhost: a preforking job host for Linux.
//!
//! The master loads every plugin (a `cdylib` built against `jobhost-plugin-api`) and runs its
//! `init` *before* it forks workers, so the workers share code and read-only data
//! copy-on-write; the workers run jobs in a batch-runner loop; the master supervises them.
//!
//! Module map (one concern each):
//! - [`config`]: the TOML config file — schema, defaults, validation, error positions.
//! - [`plugins`]: private copies of plugin files, the probe child, loading, the registry.
//! - [`master`]: the master's epoll loop — supervision, dispatch, signals, shutdown.
//! - [`worker`]: a worker process — after-fork setup, the batch-runner loop, job sources.
//! - [`server`]: the job socket and its client connections.
//! - [`protocol`]: the binary frames on every socket.
//! - [`signals`]: signals as counted events on a self-pipe.
//! - [`daemon`]: the locked pidfile and detaching (`--daemon`).
//! - [`logging`]: the host's log (pid and role on every line).
//! - [`sys`]: RSS, PSS and available memory from /proc.
//! - [`scoreboard`]: the page of memory each worker shares with the master.
//! - [`procinfo`]: what a process is doing (its system call, descriptor, kernel function) from /proc.
//! - [`client`]: a Rust client of the job socket (used by `submit`, tests, benchmarks).
//! - [`redis_client`]: the submitting side of a Redis-fed pool (used by `submit`).
//! - [`gearman`]: the worker side of the Gearman protocol.
//! - [`submit`]: `jobhost submit`, streaming jobs from stdin.
//! - [`admin`]: the admin line protocol: parsing, replies, status tables (pure).
//! - [`human`]: durations, sizes and aligned tables as people read them (pure).
//! - [`metrics`]: the figures in OpenMetrics / Prometheus text (pure).
//! - [`ctl`]: `jobhost ctl`, one admin command from the shell.
//! - [`top`]: `jobhost top`, a live terminal view of pools and workers.
//! - [`cli`]: the `jobhost` subcommands.
//! - [`http`]: `jobhost http-serve`, the status child: `/metrics` and the status page.
//! - [`view`]: `status json` and `workers json` as the page and `top` read them (lenient).
//!
//! See `ARCHITECTURE.md` at the repository root for the process diagram.

pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod gearman;
pub mod http;
pub mod human;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod plugins;
pub mod procinfo;
pub mod protocol;
pub mod redis_client;
pub mod scoreboard;
pub mod server;
pub mod signals;
pub mod submit;
pub mod sys;
pub mod top;
pub mod view;
pub mod worker;
