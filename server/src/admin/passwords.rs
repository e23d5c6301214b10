//! Password hashing with Argon2id (the crate's defaults: 19 MiB, two
//! passes, one lane, as OWASP recommends), in PHC string form.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Why a password could not be hashed or a stored hash read.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The hasher failed (it does not, for valid parameters).
    #[error("hashing failed: {0}")]
    Hash(String),
    /// The stored hash is not a PHC string.
    #[error("stored password hash is unreadable: {0}")]
    Stored(String),
}

/// Hashes `password` with a fresh random salt.
pub fn hash(password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| PasswordError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Whether `password` matches the stored PHC hash (constant time in the
/// comparison; the cost is the hash's).
pub fn verify(password: &str, stored: &str) -> Result<bool, PasswordError> {
    let parsed = PasswordHash::new(stored).map_err(|e| PasswordError::Stored(e.to_string()))?;
    Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

/// A hash to verify against when the user does not exist, so that a
/// missing user costs as much time as a wrong password.
pub fn decoy() -> &'static str {
    static DECOY: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| hash("decoy password, never valid").unwrap_or_default());
    &DECOY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_salt_differs() {
        let a = hash("correct horse battery").unwrap();
        let b = hash("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        assert!(verify("correct horse battery", &a).unwrap());
        assert!(!verify("correct horse batterx", &a).unwrap());
        assert!(verify("x", "not a hash").is_err());
        assert!(!verify("decoy", decoy()).unwrap());
    }
}
