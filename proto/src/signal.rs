//! Request bodies of the signal API, as the server reads them from untrusted
//! JSON.
//!
//! Every type refuses unknown fields, so a typo in an agent or an operator's
//! script is an error rather than a silently ignored setting. Parsing is pure
//! (`serde_json::from_slice`), which is what the `signal_json` fuzz target
//! exercises.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Body of `POST /api/signal/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// Agent state, e.g. `ready`.
    pub status: String,
    /// Agent version.
    pub version: String,
    /// Features the agent supports.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Agent counters (open streams, bytes, ...).
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    /// Expiry (Unix seconds) of the certificate the agent serves.
    #[serde(default)]
    pub cert_not_after: Option<i64>,
}

/// Body of `POST /api/probe`: another edge-server asks this one to probe.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeRequest {
    /// The endpoint to connect to.
    pub endpoint: SocketAddr,
    /// The SNI to present (checked with [`crate::names::normalize_hostname`]).
    pub sni: String,
    /// The probe nonce, 64 hex digits.
    pub nonce: String,
    /// How long to wait for an answer; the server clamps it.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Body of `PUT`/`DELETE /api/signal/acme-challenge`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {
    /// `_acme-challenge.<node>.<zone>`.
    pub name: String,
    /// The DNS-01 value (base64url of a SHA-256 digest). Optional for
    /// `DELETE`, which then removes every value at the name.
    #[serde(default)]
    pub value: Option<String>,
}

/// Body of `POST /api/signal/certificate`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// PKCS#10 CSR, DER, base64 (standard or URL-safe alphabet).
    pub csr: String,
}

/// Length of a DNS-01 TXT value: base64url, unpadded, of a SHA-256 digest
/// (RFC 8555 section 8.4).
pub const CHALLENGE_VALUE_LEN: usize = 43;

/// Whether `value` has the one shape a DNS-01 TXT value has: exactly
/// [`CHALLENGE_VALUE_LEN`] base64url characters. Nothing else is published,
/// so a node cannot make our UDP answers much larger than the queries.
pub fn is_valid_challenge_value(value: &str) -> bool {
    value.len() == CHALLENGE_VALUE_LEN && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_defaults_and_unknown_fields() {
        let hb: HeartbeatRequest = serde_json::from_str(r#"{"status":"ready","version":"0.1.0"}"#).unwrap();
        assert!(hb.capabilities.is_empty() && hb.counters.is_empty() && hb.cert_not_after.is_none());
        assert!(serde_json::from_str::<HeartbeatRequest>(r#"{"status":"ready","version":"1","x":1}"#).is_err());
    }

    #[test]
    fn probe_request_round_trips() {
        let body = r#"{"endpoint":"[::1]:443","sni":"a.example","nonce":"00","timeout_ms":500}"#;
        let req: ProbeRequest = serde_json::from_str(body).unwrap();
        let again: ProbeRequest = serde_json::from_slice(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!(req, again);
        let outcomes = ProbeBatchAnswer {
            outcomes: vec![
                ProbeOutcome::Answer { answer: "ab".repeat(32) },
                ProbeOutcome::Failed { error: "connect: refused".into() },
            ],
        };
        let json = serde_json::to_string(&outcomes).unwrap();
        assert!(json.contains(r#""result":"failed""#), "{json}");
        assert_eq!(serde_json::from_str::<ProbeBatchAnswer>(&json).unwrap(), outcomes);
    }

    #[test]
    fn challenge_values() {
        assert!(is_valid_challenge_value("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        assert!(!is_valid_challenge_value(""));
        assert!(!is_valid_challenge_value("a b"));
        assert!(!is_valid_challenge_value(&"a".repeat(42)), "one short");
        assert!(!is_valid_challenge_value(&"a".repeat(44)), "one long");
        assert!(!is_valid_challenge_value(&"a".repeat(129)));
        assert!(!is_valid_challenge_value(&format!("{}=", "a".repeat(42))), "no padding");
        assert!(!is_valid_challenge_value(&format!("{}\n", "a".repeat(42))));
        let req: ChallengeRequest = serde_json::from_str(r#"{"name":"_acme-challenge.n.z"}"#).unwrap();
        assert_eq!(req.value, None);
    }
}

/// The body of every error answer of the API: what went wrong, in words an
/// operator can act on (a 503 names the store that is unreachable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The reason.
    pub error: String,
}

/// Answer of `POST /api/signal/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The node the token belongs to.
    pub node: String,
    /// Its hostnames.
    pub hostnames: Vec<String>,
    /// Its live tunnels on this server.
    pub tunnels: usize,
    /// The server's clock (Unix seconds), to spot skew.
    pub server_time: i64,
}

/// Answer of `PUT /api/signal/acme-challenge`: the value is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengePublished {
    /// The TXT name it was published at.
    pub published: String,
}

/// Answer of `DELETE /api/signal/acme-challenge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengesRemoved {
    /// How many values were removed.
    pub removed: usize,
}

/// Most probes in one [`ProbeBatchRequest`].
pub const MAX_PROBE_BATCH: usize = 1000;

/// Body of `POST /api/probe/batch`: a cluster's mode decider asks each peer
/// once per round for every node, instead of once per node (which a peer's
/// per-source connection rate would refuse at a few hundred nodes).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeBatchRequest {
    /// At most [`MAX_PROBE_BATCH`] probes.
    pub probes: Vec<ProbeRequest>,
}

/// Answer of `POST /api/probe/batch`: one outcome per probe, in order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeBatchAnswer {
    /// As many as were asked for.
    pub outcomes: Vec<ProbeOutcome>,
}

/// How one probe of a batch went.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProbeOutcome {
    /// The node's answer to the nonce, 64 hex digits (unchecked: the asking
    /// server holds the key).
    Answer {
        /// Hex.
        answer: String,
    },
    /// No answer: why.
    Failed {
        /// What went wrong.
        error: String,
    },
}

/// Answer of `POST /api/probe`: the node's answer to the nonce, hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeAnswer {
    /// 64 hex digits.
    pub answer: String,
}
