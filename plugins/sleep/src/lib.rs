//! `sleep`: a job-mode plugin that sleeps for as many milliseconds as the payload says, and
//! reports its progress while it does.
//!
//! It exists to make slow jobs on demand: tests use it to fill every worker, hit timeouts and
//! queue limits, check that a graceful reload lets jobs in flight finish, and watch a job's
//! progress and partial data on their way to the client.
//!
//! Settings: none. Payload: a decimal number of milliseconds in ASCII, surrounding whitespace
//! allowed (e.g. `250` or `" 250\n"`), optionally followed by the word `data` (`"600 data"`).
//! Result: `slept <N>`. While it sleeps (through `handle_with`) it reports progress every
//! 100 ms as milliseconds slept of the total (`0/N` first, `N/N` last); with `data`, it also
//! hands out `<ms slept>\n` as partial data at each of those steps.

use std::time::{Duration, Instant};

use jobhost_plugin_api::{export_plugin, JobContext, Plugin, Settings};

/// How often it reports.
const STEP: Duration = Duration::from_millis(100);

/// Sleeps for the payload's number of milliseconds.
pub struct Sleep;

impl Plugin for Sleep {
    fn init(_settings: &Settings) -> Result<Self, String> {
        Ok(Sleep)
    }

    fn handle(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let (millis, _) = parse(payload)?;
        std::thread::sleep(Duration::from_millis(millis));
        Ok(format!("slept {millis}").into_bytes())
    }

    fn handle_with(&mut self, payload: &[u8], ctx: &mut JobContext<'_>) -> Result<Vec<u8>, String> {
        let (millis, data) = parse(payload)?;
        let total = Duration::from_millis(millis);
        let start = Instant::now();
        ctx.progress(0, millis);
        loop {
            let slept = start.elapsed();
            if slept >= total {
                break;
            }
            std::thread::sleep(STEP.min(total - slept));
            let done = (start.elapsed().as_millis() as u64).min(millis);
            ctx.progress(done, millis);
            if data {
                ctx.data(format!("{done}\n").as_bytes());
            }
        }
        Ok(format!("slept {millis}").into_bytes())
    }
}

/// The payload as a number of milliseconds and whether `data` follows it, or an error quoting
/// it.
fn parse(payload: &[u8]) -> Result<(u64, bool), String> {
    let bad = || {
        format!(
            "payload is not a number of milliseconds: {:?}",
            String::from_utf8_lossy(payload)
        )
    };
    let text = std::str::from_utf8(payload).map_err(|_| bad())?.trim();
    let (number, data) = match text.split_once(char::is_whitespace) {
        Some((number, "data")) => (number, true),
        Some((number, rest)) if rest.trim() == "data" => (number, true),
        Some(_) => return Err(bad()),
        None => (text, false),
    };
    let millis = number.parse::<u64>().map_err(|_| bad())?;
    Ok((millis, data))
}

export_plugin!(Sleep);

#[cfg(test)]
mod tests {
    use super::*;
    use jobhost_plugin_api::JobReport;

    fn plugin() -> Sleep {
        Sleep::init(&Settings::from_toml("").unwrap()).unwrap()
    }

    #[test]
    fn sleeps_and_reports_how_long() {
        let start = Instant::now();
        assert_eq!(plugin().handle(b" 30\n").unwrap(), b"slept 30");
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(plugin().handle(b"0").unwrap(), b"slept 0");
        assert_eq!(plugin().handle(b"5 data").unwrap(), b"slept 5");
    }

    #[test]
    fn a_bad_payload_is_an_error_naming_it() {
        let err = plugin().handle(b"abc").unwrap_err();
        assert_eq!(err, "payload is not a number of milliseconds: \"abc\"");
        assert!(plugin().handle(b"-5").is_err());
        assert!(plugin().handle(b"").is_err());
        assert!(plugin().handle(b"1.5").is_err());
        assert!(plugin().handle(b"5 bytes").is_err());
    }

    #[test]
    fn progress_grows_to_the_total_and_data_comes_with_each_step() {
        let mut seen = Vec::new();
        let mut sink = |r: JobReport<'_>| {
            seen.push(match r {
                JobReport::Progress {
                    numerator,
                    denominator,
                } => (numerator, denominator, None),
                JobReport::Data(d) => (0, 0, Some(String::from_utf8_lossy(d).into_owned())),
            })
        };
        let mut ctx = JobContext::new(&mut sink);
        assert_eq!(
            plugin().handle_with(b"250 data", &mut ctx).unwrap(),
            b"slept 250"
        );
        let progress: Vec<u64> = seen.iter().filter(|s| s.2.is_none()).map(|s| s.0).collect();
        assert_eq!(progress.first(), Some(&0));
        assert_eq!(progress.last(), Some(&250));
        assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
        assert!(progress.len() >= 3, "{progress:?}");
        let data: Vec<&String> = seen.iter().filter_map(|s| s.2.as_ref()).collect();
        assert_eq!(data.last().map(|s| s.as_str()), Some("250\n"));
        assert_eq!(data.len(), progress.len() - 1);
    }
}
