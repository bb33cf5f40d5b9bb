//! A pool's `[pool.settings]` table as the plugin sees it.
//!
//! The host passes the table across the boundary as TOML text; this module parses it back on
//! the plugin's side, so a plugin can read keys one by one or deserialize its own struct.

use serde::de::DeserializeOwned;

/// The free-form `[pool.settings]` table of the pool a plugin instance serves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    table: toml::Table,
}

impl Settings {
    /// Parses settings from TOML text (what the host sends; also handy in a plugin's tests).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| format!("settings are not valid TOML: {e}"))?;
        Ok(Settings { table })
    }

    /// The raw table.
    pub fn table(&self) -> &toml::Table {
        &self.table
    }

    /// The value of `key` as `T`, or `None` when the key is absent.
    /// A present key of the wrong type is an error naming the key.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        match self.table.get(key) {
            None => Ok(None),
            Some(value) => value
                .clone()
                .try_into()
                .map(Some)
                .map_err(|e| format!("setting `{key}`: {}", e.message().trim())),
        }
    }

    /// The value of `key` as `T`, or `default` when the key is absent.
    pub fn get_or<T: DeserializeOwned>(&self, key: &str, default: T) -> Result<T, String> {
        Ok(self.get(key)?.unwrap_or(default))
    }

    /// The whole table deserialized into the plugin's own settings struct.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        toml::Value::Table(self.table.clone())
            .try_into()
            .map_err(|e| format!("settings: {}", e.message().trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keys_and_reports_wrong_types_by_name() {
        let s = Settings::from_toml("table_mib = 8\nname = 'x'").unwrap();
        assert_eq!(s.get::<u64>("table_mib").unwrap(), Some(8));
        assert_eq!(s.get::<u64>("missing").unwrap(), None);
        assert_eq!(s.get_or("missing", 3u64).unwrap(), 3);
        let err = s.get::<u64>("name").unwrap_err();
        assert!(err.contains("setting `name`"), "{err}");
    }

    #[test]
    fn deserializes_a_struct_and_rejects_bad_toml() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Conf {
            table_mib: u32,
        }
        let s = Settings::from_toml("table_mib = 8").unwrap();
        assert_eq!(s.parse::<Conf>().unwrap().table_mib, 8);
        assert!(Settings::from_toml("table_mib = 8\nbogus = 1")
            .unwrap()
            .parse::<Conf>()
            .is_err());
        assert!(Settings::from_toml("= nope").is_err());
    }
}
