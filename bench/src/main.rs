//! `jobhost-bench`: where jobhost stands, in one command.
//!
//! Every figure comes from real processes: a real `jobhost run` master with forked workers and
//! the demo plugins built next to this binary, driven over its job socket by
//! [`jobhost::client::Client`]s in this process; the peer is Python's `multiprocessing.Pool`
//! (`bench/mp_pool_peer.py`) run in the same invocation, and for section g (pools fed from
//! Redis Streams) redis-py consumers (`../shared/bench/redis_stream_peer.py`) on the same
//! private redis-server, and for section h (pools fed by gearmand) libgearman's C workers and
//! client (`../shared/bench/gearman/`) on the same private gearmand. Each figure is the median of
//! `--runs` runs; ratios (against the peer, against one worker) are taken within one run,
//! because the machines this runs on are shared and noisy.
//!
//! It owns the scenarios and the table, and RESULTS.md: a run with `--only` replaces the rows
//! of the sections it ran and keeps the others' rows as they were. It never changes jobhost's
//! code or config defaults (each scenario writes its own config).

mod gearman;
mod master;
mod scenarios;
mod streams;

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
    /// Only these sections (letters a–i, e.g. `--only af`); RESULTS.md keeps the other
    /// sections' rows from its last run.
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

/// The section letters, in the order they are run.
const SECTIONS: &str = "afbcdeghi";

fn run(opts: &Opts) -> Result<(), String> {
    if let Some(only) = &opts.only {
        if let Some(bad) = only.chars().find(|c| !SECTIONS.contains(*c)) {
            return Err(format!("--only {only}: there is no section {bad:?} (a–i)"));
        }
    }
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
    if wanted('g') {
        rows.extend(streams::redis_streams(opts, runs)?);
    }
    if wanted('h') {
        rows.extend(gearman::gearman(opts, runs)?);
    }
    if wanted('i') {
        rows.extend(scenarios::metrics_cost(opts, runs)?);
    }
    let table = table(&rows);
    println!("{table}");
    let how = format!(
        "`target/release/jobhost-bench{}{}` ({} mode, median of {runs} run(s) per figure, {:.0} s in all)",
        if opts.quick { " --quick" } else { "" },
        opts.only
            .as_deref()
            .map_or(String::new(), |only| format!(" --only {only}")),
        if opts.quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64()
    );
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md")));
    let old = match std::fs::read_to_string(&out) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", out.display())),
    };
    let doc = match (&opts.only, old) {
        (Some(_), Some(old)) => merged(&old, &rows, &how, &machine),
        _ => whole(&rows, &how, &machine),
    };
    std::fs::write(&out, doc).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    eprintln!("written to {}", out.display());
    Ok(())
}

/// RESULTS.md from this run's rows alone.
fn whole(rows: &[Row], how: &str, machine: &str) -> String {
    let mut doc = String::new();
    let _ = writeln!(doc, "# jobhost benchmark results\n");
    let _ = writeln!(doc, "Written by {how}.\n");
    let _ = writeln!(doc, "```\n{machine}\n```\n\n{}", table(rows));
    let _ = writeln!(doc, "{}", scenarios::NOTES);
    doc
}

/// The last RESULTS.md with the rows of the sections this run took replaced (in place; a
/// section it did not have goes at the end), a line saying which run wrote them, and the notes
/// as they are now. Other sections' rows are kept as they were.
fn merged(old: &str, rows: &[Row], how: &str, machine: &str) -> String {
    let section_of = |line: &str| -> Option<char> {
        let rest = line.strip_prefix("| ")?;
        let mut chars = rest.chars();
        let c = chars.next()?;
        (c.is_ascii_lowercase() && chars.as_str().starts_with(" |")).then_some(c)
    };
    let mut ran: Vec<char> = Vec::new();
    for row in rows {
        if !ran.contains(&row.section) {
            ran.push(row.section);
        }
    }
    let old_lines: Vec<&str> = old.lines().collect();
    let Some(table_at) = old_lines
        .iter()
        .position(|l| l.starts_with("| | measure |"))
    else {
        return whole(rows, how, machine);
    };
    // The header: everything before the table, less the lines about earlier `--only` runs of
    // exactly the sections rerun now.
    let ours = format!(
        "Section{} {}: ",
        if ran.len() == 1 { "" } else { "s" },
        ran.iter().collect::<String>()
    );
    let mut doc = String::new();
    let mut header: Vec<&str> = old_lines[..table_at]
        .iter()
        .copied()
        .filter(|l| !l.starts_with(&ours))
        .collect();
    while header.last().is_some_and(|l| l.trim().is_empty()) {
        header.pop();
    }
    for line in header {
        let _ = writeln!(doc, "{line}");
    }
    let _ = writeln!(
        doc,
        "\n{ours}rewritten by {how}{}.\n",
        if old.contains(machine) {
            String::new()
        } else {
            format!(" on {}", machine.trim_start_matches("machine: "))
        }
    );
    // The table: old rows in their order, each rerun section's rows where its first row was.
    let mut table = String::from("| | measure | result | target |\n|---|---|---|---|\n");
    let mut placed = Vec::new();
    for line in old_lines.iter().skip(table_at + 2) {
        let Some(section) = section_of(line) else {
            break;
        };
        if !ran.contains(&section) {
            let _ = writeln!(table, "{line}");
        } else if !placed.contains(&section) {
            placed.push(section);
            table.push_str(&table_rows(rows, section));
        }
    }
    for &section in &ran {
        if !placed.contains(&section) {
            table.push_str(&table_rows(rows, section));
        }
    }
    let _ = writeln!(doc, "{table}");
    // After the table: the notes as they are now (they describe every section).
    let _ = writeln!(doc, "{}", scenarios::NOTES);
    doc
}

/// The table lines of `section`'s rows.
fn table_rows(rows: &[Row], section: char) -> String {
    rows.iter()
        .filter(|r| r.section == section)
        .map(table_row)
        .collect()
}

fn table_row(row: &Row) -> String {
    format!(
        "| {} | {} | {} | {} |\n",
        row.section, row.what, row.value, row.target
    )
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from("| | measure | result | target |\n|---|---|---|---|\n");
    for row in rows {
        out.push_str(&table_row(row));
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
