//! The config loader against arbitrary text: `Config::parse` (TOML, schema, validation) as if
//! the text were `jobhost.toml` in a scratch folder that holds the demo plugins' file names,
//! and the duration and size grammars (`parse_duration`, `parse_size`).
//!
//! Owns these properties:
//! - nothing panics; an accepted text parses again to the same config;
//! - an error displays as one line that starts `FILE:LINE:COL: ` with a position inside the
//!   text (or one past its end);
//! - an accepted config keeps the documented invariants (at least one pool, unique names,
//!   1 ..= 1024 workers, a queue and attempts of at least 1, a payload limit of 1 B ..= 1 GiB,
//!   a non-zero init timeout, absolute paths);
//! - a duration or size that parses reads back the same from its plain form (`S.NNNNNNNNNs`,
//!   the number of bytes).
//!
//! It never writes a file after start-up: the scratch folder is made once per process.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use jobhost::config::{self, Config, ConfigError};
use libfuzzer_sys::fuzz_target;

/// `<scratch>/jobhost.toml`, beside `plugins/` and `run/` holding the demo plugins' names.
fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("jobhost-fuzz-config-{}", std::process::id()));
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins).expect("make the scratch plugins folder");
        std::fs::create_dir_all(dir.join("run")).expect("make the scratch run folder");
        for name in [
            "echo",
            "hash",
            "sleep",
            "lookup",
            "faulty",
            "wordcount",
            "p",
        ] {
            std::fs::write(plugins.join(format!("lib{name}.so")), b"").expect("write a plugin");
        }
        dir.join("jobhost.toml")
    })
}

fn check_error(text: &str, e: &ConfigError) {
    let shown = e.to_string();
    assert!(!shown.contains('\n'), "{shown:?}");
    let (line, column) = e.position().expect("a parse error has a position");
    let lines = text.split('\n').count();
    assert!(
        line >= 1 && line <= lines + 1,
        "line {line} of {lines}: {shown}"
    );
    assert!(column >= 1, "{shown}");
    let prefix = format!("{}:{line}:{column}: ", config_path().display());
    assert!(shown.starts_with(&prefix), "{shown:?}");
}

fn check_config(c: &Config) {
    assert!(!c.pools.is_empty());
    let mut names: Vec<&str> = c.pools.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), c.pools.len(), "pool names are not unique");
    for pool in &c.pools {
        assert!(!pool.name.is_empty() && !pool.plugin.is_empty());
        assert!(
            pool.workers <= jobhost::admin::MAX_WORKERS,
            "{} workers",
            pool.workers
        );
        assert!(pool.max_queue >= 1 && pool.max_attempts >= 1);
        assert!(pool.line >= 1);
        assert!(pool.plugin_path(&c.host).is_absolute());
    }
    assert!((1..=1 << 30).contains(&c.server.max_payload));
    assert!(!c.host.init_timeout.is_zero());
    assert!(c.path.is_absolute());
    assert!(c.host.plugins_dir.is_absolute() && c.host.runtime_dir.is_absolute());
    assert!(c.server.socket.is_absolute() && c.admin.socket.is_absolute());
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = config_path();
    match Config::parse(text, path) {
        Ok(c) => {
            check_config(&c);
            let again = Config::parse(text, path).expect("the same text parses again");
            assert_eq!(format!("{c:?}"), format!("{again:?}"));
        }
        Err(e) => {
            // (Not parsed twice: errors are most executions, and parsing is their cost.)
            check_error(text, &e);
        }
    }
    // The value grammars, on each line and on the whole text.
    for value in text.lines().chain([text]) {
        if let Ok(d) = config::parse_duration(value) {
            let plain = format!("{}.{:09}s", d.as_secs(), d.subsec_nanos());
            assert_eq!(config::parse_duration(&plain), Ok(d), "{value:?} → {plain}");
        }
        if let Ok(n) = config::parse_size(value) {
            assert_eq!(config::parse_size(&n.to_string()), Ok(n), "{value:?}");
        }
    }
});
