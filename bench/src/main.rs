//! `jobhost-bench`: where jobhost stands, in one command.
//!
//! Every figure comes from real processes: a real `jobhost run` master with forked workers and
//! the demo plugins built next to this binary, driven over its job socket by
//! [`jobhost::client::Client`]s in this process; the peer is Python's `multiprocessing.Pool`
//! (`bench/mp_pool_peer.py`) run in the same invocation. Each figure is the median of
//! `--runs` runs; ratios (against the peer, against one worker) are taken within one run,
//! because the machines this runs on are shared and noisy.
//!
//! It owns the scenarios and the table; it never changes jobhost's code or config defaults
//! (each scenario writes its own config).

mod master;
mod scenarios;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "jobhost-bench",
    about = "Benchmarks jobhost end to end and prints one table"
)]
pub struct Opts {
    /// A smoke check in under a minute: fewer jobs, one run each.
    #[arg(long)]
    pub quick: bool,
    /// Runs per figure (the median is reported); default 3, or 1 with --quick.
    #[arg(long)]
    pub runs: Option<usize>,
    /// Only these sections (letters a–f, e.g. `--only af`).
    #[arg(long)]
    pub only: Option<String>,
    /// Jobs a client keeps in flight (submitted, not yet answered) in the dispatch runs.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Where to write the table and the machine description [default: bench/RESULTS.md in
    /// the source tree].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One line of the table.
pub struct Row {
    pub section: char,
    pub what: String,
    pub value: String,
    pub target: String,
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jobhost-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Opts) -> Result<(), String> {
    let runs = opts.runs.unwrap_or(if opts.quick { 1 } else { 3 }).max(1);
    let wanted = |s: char| opts.only.as_deref().is_none_or(|only| only.contains(s));
    let machine = machine();
    eprintln!(
        "{machine}\nmode: {}, {runs} run(s) per figure",
        if opts.quick { "quick" } else { "full" }
    );
    let started = std::time::Instant::now();
    let mut rows = Vec::new();
    if wanted('a') || wanted('f') {
        rows.extend(scenarios::dispatch_and_peer(opts, runs, wanted('f'))?);
    }
    if wanted('b') {
        rows.extend(scenarios::cpu_scaling(opts, runs)?);
    }
    if wanted('c') {
        rows.extend(scenarios::memory(runs)?);
    }
    if wanted('d') {
        rows.extend(scenarios::recovery(opts, runs)?);
    }
    if wanted('e') {
        rows.extend(scenarios::reload_under_load(opts, runs)?);
    }
    let table = table(&rows);
    println!("{table}");
    let mut doc = String::new();
    let _ = writeln!(doc, "# jobhost benchmark results\n");
    let _ = writeln!(
        doc,
        "Written by `target/release/jobhost-bench{}` ({} mode, median of {runs} run(s) per figure, {:.0} s in all).\n",
        if opts.quick { " --quick" } else { "" },
        if opts.quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(doc, "```\n{machine}\n```\n\n{table}");
    let _ = writeln!(doc, "{}", scenarios::NOTES);
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md")));
    std::fs::write(&out, doc).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    eprintln!("written to {}", out.display());
    Ok(())
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from("| | measure | result | target |\n|---|---|---|---|\n");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            row.section, row.what, row.value, row.target
        );
    }
    out
}

/// Cores, kernel, CPU model and memory, as the results depend on them.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{} {}",
                u.release().to_string_lossy(),
                u.machine().to_string_lossy()
            )
        })
        .unwrap_or_else(|_| "unknown kernel".into());
    let mem = jobhost::sys::mem_available().map_or("?".into(), |b| format!("{} MiB", b >> 20));
    format!("machine: {cores} cores, {model}; kernel {kernel}; memory available {mem}")
}

/// The median of `values` (the mean of the two middle ones for an even count).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}
