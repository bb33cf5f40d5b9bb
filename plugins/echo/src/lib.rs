//! `echo`: a job-mode plugin whose `handle` returns the payload unchanged.
//!
//! It exists to show the smallest possible plugin, and to give tests and benchmarks a handler
//! that costs nothing, so what they measure is jobhost itself.
//!
//! Settings: none. Payload: any bytes. Result: the same bytes.

use jobhost_plugin_api::{export_plugin, Plugin, Settings};

/// Returns every payload as it came.
pub struct Echo;

impl Plugin for Echo {
    fn init(_settings: &Settings) -> Result<Self, String> {
        Ok(Echo)
    }

    fn handle(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        Ok(payload.to_vec())
    }
}

export_plugin!(Echo);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_payload_unchanged() {
        let mut echo = Echo::init(&Settings::from_toml("").unwrap()).unwrap();
        assert_eq!(echo.handle(b"hello").unwrap(), b"hello");
        assert_eq!(echo.handle(b"").unwrap(), b"");
        assert_eq!(echo.handle(&[0, 255, 10]).unwrap(), [0, 255, 10]);
    }
}
