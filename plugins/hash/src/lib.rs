//! `hash`: a job-mode plugin whose `handle` returns the lowercase hex SHA-256 of the payload.
//!
//! It exists to show a plugin with a real (CPU-bound, deterministic) job and an external
//! dependency, and to give tests a result they can check against `sha256sum`.
//!
//! Settings: none. Payload: any bytes. Result: 64 lowercase hex digits, no newline.

use jobhost_plugin_api::{export_plugin, Plugin, Settings};
use sha2::{Digest, Sha256};

/// Hashes every payload with SHA-256.
pub struct Hash;

impl Plugin for Hash {
    fn init(_settings: &Settings) -> Result<Self, String> {
        Ok(Hash)
    }

    fn handle(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        Ok(to_hex(&Sha256::digest(payload)).into_bytes())
    }
}

/// Lowercase hex of `bytes`.
fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

export_plugin!(Hash);

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(payload: &[u8]) -> String {
        let mut plugin = Hash::init(&Settings::from_toml("").unwrap()).unwrap();
        String::from_utf8(plugin.handle(payload).unwrap()).unwrap()
    }

    #[test]
    fn matches_known_sha256_digests() {
        assert_eq!(
            hash(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }
}
