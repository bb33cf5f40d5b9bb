//! `template`: a minimal job-mode plugin to copy and start from (see README.md).
//!
//! It shows the three things every plugin has: `init` reading a setting, `handle` turning a
//! payload into a result, and `export_plugin!`.
//!
//! Settings: `greeting` (string, default `"Hello"`). Payload: UTF-8 text.
//! Result: `<greeting>, <payload>!`.

use jobhost_plugin_api::{export_plugin, log, Plugin, Settings};

pub struct Template {
    greeting: String,
}

impl Plugin for Template {
    fn init(settings: &Settings) -> Result<Self, String> {
        let greeting = settings.get_or("greeting", "Hello".to_string())?;
        log::info!("template ready, greeting {greeting:?}");
        Ok(Template { greeting })
    }

    fn handle(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let name =
            std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8: {e}"))?;
        Ok(format!("{}, {}!", self.greeting, name.trim()).into_bytes())
    }
}

export_plugin!(Template);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greets_with_the_configured_greeting() {
        let mut plugin = Template::init(&Settings::from_toml("greeting = 'Hi'").unwrap()).unwrap();
        assert_eq!(plugin.handle(b"world\n").unwrap(), b"Hi, world!");
        let mut plugin = Template::init(&Settings::from_toml("").unwrap()).unwrap();
        assert_eq!(plugin.handle(b"you").unwrap(), b"Hello, you!");
    }

    #[test]
    fn reports_bad_settings_and_payloads() {
        let err = Template::init(&Settings::from_toml("greeting = 3").unwrap())
            .err()
            .unwrap();
        assert!(err.contains("greeting"), "{err}");
        let mut plugin = Template::init(&Settings::from_toml("").unwrap()).unwrap();
        assert!(plugin
            .handle(&[0xff])
            .unwrap_err()
            .starts_with("payload is not UTF-8"));
    }
}
