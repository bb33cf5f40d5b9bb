//! End-to-end tests of the real `jobhost` binary with real plugin `.so` files and real
//! processes. One module per behaviour; `jobhost_e2e` (tests/harness.rs) sets up each world.

mod check_config;
mod plugin_inspect;
mod plugin_loading;
