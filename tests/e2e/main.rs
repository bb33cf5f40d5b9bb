//! End-to-end tests of the real `jobhost` binary with real plugin `.so` files and real
//! processes. One module per behaviour; `jobhost_e2e` (tests/harness.rs) sets up each world.

mod access;
mod admin;
mod admin_limits;
mod bad_input;
mod check_config;
mod client_limits;
mod daemon;
mod draining;
mod fairness;
mod gearman;
mod hardening;
mod http;
mod job_server;
mod loop_mode;
mod memory_limits;
mod metrics;
mod no_spin;
mod plugin_inspect;
mod plugin_loading;
mod plugin_rules;
mod prefetch;
mod progress;
mod progress_review;
mod redis;
mod reload;
mod resources;
mod shutdown;
mod status_counts;
mod submit_command;
mod supervision;
mod top;
mod trust;
