//! Secrets: the operator API key and per-session viewer tokens.
//!
//! Viewer tokens are stored only as SHA-256 hashes; every comparison is in
//! constant time. Nothing here logs a secret.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A fresh random secret: 32 bytes, URL-safe base64.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of a token, hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `token` hashes to `hash`, compared in constant time.
pub fn token_matches(token: &str, hash: &str) -> bool {
    let got = hash_token(token);
    got.as_bytes().ct_eq(hash.as_bytes()).into()
}

/// Whether two secrets are equal, in constant time (of the longer length:
/// both are hashed first so lengths leak nothing either).
pub fn secret_eq(a: &str, b: &str) -> bool {
    let ha = Sha256::digest(a.as_bytes());
    let hb = Sha256::digest(b.as_bytes());
    ha.ct_eq(&hb).into()
}

/// The API key: the configured one, else the one in `path`, else a new one
/// written there with mode 0600.
pub fn load_or_create_api_key(configured: &str, path: &Path) -> std::io::Result<String> {
    if !configured.is_empty() {
        return Ok(configured.to_string());
    }
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let key = new_secret();
    write_private(path, format!("{key}\n").as_bytes())?;
    Ok(key)
}

/// Writes a file only its owner (root) reads, whole or not at all: a
/// temporary file of mode 0600 beside it, synced, renamed over it. For
/// secrets (the API key, collected results) and records of users.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Whether a request carries the operator key. Only the `Authorization`
/// header counts: a key in a URL ends up in proxy and browser logs.
pub fn is_operator(headers: &axum::http::HeaderMap, api_key: &str) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .is_some_and(|k| secret_eq(k, api_key))
}

/// The TURN REST password for `username` (`<expiry-unix>:<who>`):
/// base64(HMAC-SHA1(shared secret, username)), what coturn's
/// `use-auth-secret` checks.
pub fn turn_credential(shared_secret: &str, username: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(shared_secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_match_only_their_hash() {
        let t = new_secret();
        assert_eq!(t.len(), 43);
        let h = hash_token(&t);
        assert!(token_matches(&t, &h));
        assert!(!token_matches(&new_secret(), &h));
        assert!(!token_matches("", &h));
        assert!(secret_eq("abc", "abc"));
        assert!(!secret_eq("abc", "abd"));
        assert!(!secret_eq("abc", "abcd"));
    }

    #[test]
    fn api_key_is_generated_once_with_private_mode() {
        let dir = std::env::temp_dir().join(format!("sc-auth-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api_key");
        let k1 = load_or_create_api_key("", &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_api_key("", &path).unwrap(), k1);
        assert_eq!(
            load_or_create_api_key("configured", &path).unwrap(),
            "configured"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn turn_credentials_follow_the_rest_scheme() {
        // RFC 2202 test case 2: HMAC-SHA1("Jefe", "what do ya want for nothing?").
        assert_eq!(
            turn_credential("Jefe", "what do ya want for nothing?"),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
        assert_ne!(
            turn_credential("secret", "1700000000:a"),
            turn_credential("secret", "1700000000:b")
        );
    }

    #[test]
    fn operator_key_only_from_the_authorization_header() {
        let mut h = axum::http::HeaderMap::new();
        assert!(!is_operator(&h, "k"));
        h.insert("authorization", "Bearer k".parse().unwrap());
        assert!(is_operator(&h, "k"));
        h.insert("authorization", "Bearer kk".parse().unwrap());
        assert!(!is_operator(&h, "k"));
        h.insert("authorization", "k".parse().unwrap());
        assert!(!is_operator(&h, "k"));
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
