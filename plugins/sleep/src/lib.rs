//! `sleep`: a job-mode plugin that sleeps for as many milliseconds as the payload says.
//!
//! It exists to make slow jobs on demand: tests use it to fill every worker, hit timeouts and
//! queue limits, and check that a graceful reload lets jobs in flight finish.
//!
//! Settings: none. Payload: a decimal number of milliseconds in ASCII, surrounding whitespace
//! allowed (e.g. `250` or `" 250\n"`). Result: `slept <N>`.

use std::time::Duration;

use jobhost_plugin_api::{export_plugin, Plugin, Settings};

/// Sleeps for the payload's number of milliseconds.
pub struct Sleep;

impl Plugin for Sleep {
    fn init(_settings: &Settings) -> Result<Self, String> {
        Ok(Sleep)
    }

    fn handle(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let millis = parse_millis(payload)?;
        std::thread::sleep(Duration::from_millis(millis));
        Ok(format!("slept {millis}").into_bytes())
    }
}

/// The payload as a number of milliseconds, or an error quoting it.
fn parse_millis(payload: &[u8]) -> Result<u64, String> {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            format!(
                "payload is not a number of milliseconds: {:?}",
                String::from_utf8_lossy(payload)
            )
        })
}

export_plugin!(Sleep);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn plugin() -> Sleep {
        Sleep::init(&Settings::from_toml("").unwrap()).unwrap()
    }

    #[test]
    fn sleeps_and_reports_how_long() {
        let start = Instant::now();
        assert_eq!(plugin().handle(b" 30\n").unwrap(), b"slept 30");
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(plugin().handle(b"0").unwrap(), b"slept 0");
    }

    #[test]
    fn a_bad_payload_is_an_error_naming_it() {
        let err = plugin().handle(b"abc").unwrap_err();
        assert_eq!(err, "payload is not a number of milliseconds: \"abc\"");
        assert!(plugin().handle(b"-5").is_err());
        assert!(plugin().handle(b"").is_err());
        assert!(plugin().handle(b"1.5").is_err());
    }
}
