//! The agent token: a per-session secret the server hands both to the backend
//! (which publishes only its SHA-256 where the guest can read it, in a
//! microVM's MMDS) and to the agent in its configuration. An agent in a
//! microVM refuses a configuration whose token does not hash to what MMDS
//! holds, so a configuration meant for another session is never run.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A session's agent token. Its `Debug` never shows the secret, and equality
/// is decided in constant time.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AgentToken(String);

impl AgentToken {
    /// Wraps a token (the server makes it: 32 random bytes, URL-safe base64).
    pub fn new(token: impl Into<String>) -> Self {
        AgentToken(token.into())
    }

    /// The secret itself, for sending it where it belongs; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the token, lowercase hex: what a backend may publish.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(self.0.as_bytes())
    }

    /// Whether this token hashes to `hash_hex` (lowercase hex SHA-256),
    /// compared in constant time.
    pub fn matches_sha256_hex(&self, hash_hex: &str) -> bool {
        self.sha256_hex()
            .as_bytes()
            .ct_eq(hash_hex.as_bytes())
            .into()
    }
}

impl std::fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentToken(<redacted>)")
    }
}

impl PartialEq for AgentToken {
    fn eq(&self, other: &Self) -> bool {
        // Digests first, so neither the contents nor the length leak.
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(other.0.as_bytes());
        a.ct_eq(&b).into()
    }
}

impl Eq for AgentToken {}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        // SHA-256("abc") from FIPS 180-2.
        let t = AgentToken::new("abc");
        assert_eq!(
            t.sha256_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(t.matches_sha256_hex(&t.sha256_hex()));
    }

    #[test]
    fn other_tokens_and_malformed_hashes_do_not_match() {
        let t = AgentToken::new("abc");
        let other = AgentToken::new("abd").sha256_hex();
        assert!(!t.matches_sha256_hex(&other));
        assert!(!t.matches_sha256_hex(""));
        assert!(!t.matches_sha256_hex(&t.sha256_hex()[..63]));
        assert!(!t.matches_sha256_hex(&t.sha256_hex().to_uppercase()));
        assert_ne!(t, AgentToken::new("abd"));
        assert_eq!(t, AgentToken::new("abc"));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = AgentToken::new("s3cret-value");
        let shown = format!("{t:?} {:?}", Some(&t));
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn serialises_as_a_plain_string() {
        let t = AgentToken::new("tok");
        assert_eq!(serde_json::to_string(&t).unwrap(), r#""tok""#);
        let back: AgentToken = serde_json::from_str(r#""tok""#).unwrap();
        assert_eq!(back.expose(), "tok");
    }
}
