//! `lookup`: a job-mode plugin that answers keys from a large read-only table.
//!
//! It exists to show what building state in `init` buys: `init` runs once in the master before
//! it forks, so the table is built once and every worker shares its pages copy-on-write. With
//! `build_in = "worker_start"` each worker builds its own copy instead, so a benchmark can
//! compare the memory (and start-up time) of the two.
//!
//! Settings (all optional):
//! - `table_mib` (integer ≥ 1, default 64): the table's size in MiB, of u64 values.
//! - `build_in` (`"init"`, the default, or `"worker_start"`): where the table is built.
//!
//! Payload: a key. A decimal number (surrounding whitespace allowed) picks entry
//! `number % entries`; any other non-empty bytes are hashed (FNV-1a) to an entry.
//! Result: `key=<key> index=<entry> value=<16 lowercase hex digits>`. Entry `i` always holds the
//! `i`-th output of splitmix64 from a fixed seed, so an answer depends only on the key and
//! `table_mib`: it is the same in every worker, process and run.

use std::time::Instant;

use jobhost_plugin_api::{export_plugin, Plugin, Settings};

const SEED: u64 = 0x6a6f_6268_6f73_7421; // "jobhost!"
const ENTRIES_PER_MIB: usize = (1 << 20) / std::mem::size_of::<u64>();

/// Where the table is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BuildIn {
    Init,
    WorkerStart,
}

pub struct Lookup {
    table_mib: usize,
    build_in: BuildIn,
    /// `None` until built (in `init`, or in `worker_start` of each worker).
    table: Option<Vec<u64>>,
}

impl Plugin for Lookup {
    fn init(settings: &Settings) -> Result<Self, String> {
        if let Some(key) = settings
            .table()
            .keys()
            .find(|k| !["table_mib", "build_in"].contains(&k.as_str()))
        {
            return Err(format!(
                "unknown setting `{key}` (lookup knows `table_mib` and `build_in`)"
            ));
        }
        let table_mib: u64 = settings.get_or("table_mib", 64)?;
        let table_mib = usize::try_from(table_mib)
            .ok()
            .filter(|&mib| mib >= 1 && mib.checked_mul(1 << 20).is_some())
            .ok_or_else(|| {
                format!("setting `table_mib`: {table_mib} is not a usable size in MiB")
            })?;
        let build_in = match settings.get_or("build_in", "init".to_string())?.as_str() {
            "init" => BuildIn::Init,
            "worker_start" => BuildIn::WorkerStart,
            other => {
                return Err(format!(
                    "setting `build_in`: {other:?} is not \"init\" or \"worker_start\""
                ))
            }
        };
        let mut plugin = Lookup {
            table_mib,
            build_in,
            table: None,
        };
        if build_in == BuildIn::Init {
            plugin.build("init")?;
        }
        Ok(plugin)
    }

    fn worker_start(&mut self) -> Result<(), String> {
        if self.build_in == BuildIn::WorkerStart && self.table.is_none() {
            self.build("worker_start")?;
        }
        Ok(())
    }

    fn handle(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let table = self
            .table
            .as_ref()
            .ok_or("lookup: the table is not built yet (build_in = \"worker_start\" builds it in worker_start)")?;
        let (key, index) = key_and_index(payload, table.len())?;
        Ok(format!("key={key} index={index} value={:016x}", table[index]).into_bytes())
    }
}

impl Lookup {
    /// Builds the table, writing every entry (so every page is really backed), and logs it.
    fn build(&mut self, during: &str) -> Result<(), String> {
        let start = Instant::now();
        let entries = self.table_mib * ENTRIES_PER_MIB;
        let mut table = Vec::new();
        table.try_reserve_exact(entries).map_err(|e| {
            format!(
                "lookup: cannot allocate a {} MiB table: {e}",
                self.table_mib
            )
        })?;
        let mut state = SEED;
        table.extend((0..entries).map(|_| splitmix64(&mut state)));
        log::info!(
            "lookup: built a {} MiB table ({entries} entries) in {} in {:.1} ms",
            self.table_mib,
            during,
            start.elapsed().as_secs_f64() * 1000.0
        );
        self.table = Some(table);
        Ok(())
    }
}

/// The key as shown in the answer, and the table entry it selects.
fn key_and_index(payload: &[u8], entries: usize) -> Result<(String, usize), String> {
    let text = std::str::from_utf8(payload).map(str::trim).unwrap_or("");
    if let Ok(number) = text.parse::<u64>() {
        // `entries` fits in u64 and the remainder is below it, so both casts are lossless.
        return Ok((number.to_string(), (number % entries as u64) as usize));
    }
    if payload.is_empty() {
        return Err("payload is empty: expected a key".into());
    }
    let index = (fnv1a(payload) % entries as u64) as usize;
    Ok((String::from_utf8_lossy(payload).into_owned(), index))
}

/// One step of splitmix64 (Steele, Lea, Flood 2014).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a: a fixed hash, unlike std's randomly seeded one.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

export_plugin!(Lookup);

#[cfg(test)]
mod tests {
    use super::*;

    fn init(toml: &str) -> Result<Lookup, String> {
        Lookup::init(&Settings::from_toml(toml).unwrap())
    }

    fn ask(plugin: &mut Lookup, key: &str) -> String {
        String::from_utf8(plugin.handle(key.as_bytes()).unwrap()).unwrap()
    }

    /// The `i`-th splitmix64 output from the fixed seed, computed without a table.
    fn expected(i: usize) -> u64 {
        let mut state = SEED;
        let mut value = 0;
        for _ in 0..=i {
            value = splitmix64(&mut state);
        }
        value
    }

    #[test]
    fn builds_in_init_by_default_and_answers_deterministically() {
        let mut plugin = init("table_mib = 1").unwrap();
        let table = plugin.table.as_ref().unwrap();
        assert_eq!(table.len(), ENTRIES_PER_MIB);
        assert_eq!(
            ask(&mut plugin, "5"),
            format!("key=5 index=5 value={:016x}", expected(5))
        );
        // Numbers wrap around the table; whitespace is ignored.
        let wrapped = ask(&mut plugin, &format!(" {}\n", ENTRIES_PER_MIB + 7));
        assert!(
            wrapped.ends_with(&format!("index=7 value={:016x}", expected(7))),
            "{wrapped}"
        );
        // A text key hashes to a fixed entry: same answer from a second instance.
        let mut other = init("table_mib = 1").unwrap();
        assert_eq!(ask(&mut plugin, "user:42"), ask(&mut other, "user:42"));
        assert!(ask(&mut plugin, "user:42").starts_with("key=user:42 index="));
    }

    #[test]
    fn worker_start_mode_builds_the_table_per_worker() {
        let mut plugin = init("table_mib = 1\nbuild_in = 'worker_start'").unwrap();
        assert!(plugin.table.is_none());
        let err = plugin.handle(b"1").unwrap_err();
        assert!(err.contains("not built yet"), "{err}");
        plugin.worker_start().unwrap();
        assert_eq!(
            ask(&mut plugin, "1"),
            format!("key=1 index=1 value={:016x}", expected(1))
        );
    }

    #[test]
    fn bad_settings_and_payloads_are_clear_errors() {
        let err = init("build_in = 'sometimes'").err().unwrap();
        assert!(
            err.contains("build_in") && err.contains("sometimes"),
            "{err}"
        );
        let err = init("table_mib = 0").err().unwrap();
        assert!(err.contains("table_mib"), "{err}");
        let err = init("table_mib = 'big'").err().unwrap();
        assert!(err.contains("table_mib"), "{err}");
        let err = init("tabel_mib = 1").err().unwrap();
        assert!(err.contains("unknown setting `tabel_mib`"), "{err}");
        let mut plugin = init("table_mib = 1").unwrap();
        assert_eq!(
            plugin.handle(b"").unwrap_err(),
            "payload is empty: expected a key"
        );
    }
}
