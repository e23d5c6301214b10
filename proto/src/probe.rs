//! Reachability probes: proof that an endpoint is *this* node.
//!
//! The server connects to a node's declared endpoint, completes TLS with
//! ALPN [`ALPN`] and the node's name as SNI, and sends a random nonce of
//! [`NONCE_LEN`] bytes. The agent answers with [`answer`]: HMAC-SHA256 under
//! the SHA-256 of the node token (the server stores only that hash; the
//! agent derives it from its token) over a domain label, the node name and
//! the nonce. Anyone else at a stale address (another tenant's TLS server,
//! a reused IP) cannot produce it, so an open port never counts as the node.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// ALPN of a probe connection.
pub const ALPN: &[u8] = b"edge-probe/1";
/// Bytes of the server's nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of the agent's answer.
pub const ANSWER_LEN: usize = 32;

const LABEL: &[u8] = b"edge-probe/1 answer\0";

/// The key both sides hold: SHA-256 of the node token.
pub fn key_from_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn keyed(key: &[u8; 32], node: &str, nonce: &[u8; NONCE_LEN]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(LABEL);
    mac.update(&(node.len() as u32).to_be_bytes());
    mac.update(node.as_bytes());
    mac.update(nonce);
    mac
}

/// The answer to `nonce` for `node` under `key`.
pub fn answer(key: &[u8; 32], node: &str, nonce: &[u8; NONCE_LEN]) -> [u8; ANSWER_LEN] {
    keyed(key, node, nonce).finalize().into_bytes().into()
}

/// Whether `got` is the right answer (constant time).
pub fn verify(key: &[u8; 32], node: &str, nonce: &[u8; NONCE_LEN], got: &[u8]) -> bool {
    keyed(key, node, nonce).verify_slice(got).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_bind_key_node_and_nonce() {
        let key = key_from_token("n1.secret");
        let nonce = [7u8; NONCE_LEN];
        let a = answer(&key, "n1", &nonce);
        assert!(verify(&key, "n1", &nonce, &a));
        assert!(!verify(&key_from_token("n1.other"), "n1", &nonce, &a), "another token");
        assert!(!verify(&key, "n2", &nonce, &a), "another node");
        assert!(!verify(&key, "n1", &[8u8; NONCE_LEN], &a), "another nonce");
        assert!(!verify(&key, "n1", &nonce, &a[..31]), "truncated");
        assert!(!verify(&key, "n1", &nonce, &[0u8; 32]));
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // The crate's HMAC-SHA256 against RFC 4231 test case 2.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let out = mac.finalize().into_bytes();
        let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
