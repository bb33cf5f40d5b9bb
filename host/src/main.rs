//! The `jobhost` binary: parse the command line, run one subcommand, decide the exit code.
//! All the work lives in the library (`jobhost::cli`); this file only reports errors.

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = jobhost::cli::Cli::parse();
    match jobhost::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            report(error.as_ref());
            ExitCode::from(jobhost::cli::EXIT_ERROR)
        }
    }
}

/// Prints the error and each cause on its own line.
fn report(error: &dyn Error) {
    eprintln!("jobhost: error: {error}");
    let mut cause = error.source();
    while let Some(c) = cause {
        eprintln!("  caused by: {c}");
        cause = c.source();
    }
}
