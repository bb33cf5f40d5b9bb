//! jobhost: a preforking job host for Linux.
//!
//! The master loads every plugin (a `cdylib` built against `jobhost-plugin-api`) and runs its
//! `init` *before* it forks workers, so the workers share code and read-only data
//! copy-on-write; the workers run jobs in a batch-runner loop; the master supervises them.
//!
//! Module map (one concern each):
//! - [`config`]: the TOML config file — schema, defaults, validation, error positions.
//! - [`plugins`]: private copies of plugin files, the probe child, loading, the registry.
//! - [`cli`]: the `jobhost` subcommands.
//!
//! See `ARCHITECTURE.md` at the repository root for the process diagram.

pub mod cli;
pub mod config;
pub mod plugins;
