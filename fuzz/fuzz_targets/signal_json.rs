//! Fuzzes the JSON the server reads from untrusted peers: the signal API
//! request bodies and the tunnel control messages.
//!
//! Invariants: decoding never panics, nor does the pure validation the
//! server runs on a decoded body; whatever decodes re-encodes, and the
//! re-encoding decodes to an equal value.
#![no_main]

use std::fmt::Debug;

use edge_proto::signal::{
    is_valid_challenge_value, CertificateRequest, ChallengeRequest, HeartbeatRequest, ProbeRequest,
};
use edge_proto::tunnel::{AgentMessage, ServerMessage};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `data` as `T`; if that works, checks the round trip.
fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let value: T = serde_json::from_slice(data).ok()?;
    let json = serde_json::to_vec(&value).expect("a decoded value encodes");
    let again: T = match serde_json::from_slice(&json) {
        Ok(v) => v,
        Err(e) => panic!("re-encoding does not decode: {e}: {}", String::from_utf8_lossy(&json)),
    };
    assert_eq!(again, value, "round trip through {}", String::from_utf8_lossy(&json));
    Some(value)
}

fuzz_target!(|data: &[u8]| {
    if let Some(hb) = round_trip::<HeartbeatRequest>(data) {
        assert!(hb.capabilities.len() <= data.len());
    }
    if let Some(probe) = round_trip::<ProbeRequest>(data) {
        // What `POST /api/probe` does with the body before any I/O.
        if let Some(sni) = edge_proto::names::normalize_hostname(&probe.sni) {
            assert!(!sni.is_empty());
            assert_eq!(sni, sni.to_ascii_lowercase());
            assert_eq!(edge_proto::names::normalize_hostname(&sni).as_deref(), Some(sni.as_str()));
        }
        if let Some(nonce) = edge_proto::join::parse_fingerprint(&probe.nonce) {
            assert_eq!(edge_proto::join::parse_fingerprint(&edge_proto::join::hex(&nonce)), Some(nonce));
        }
    }
    if let Some(challenge) = round_trip::<ChallengeRequest>(data) {
        if let Some(value) = &challenge.value {
            if is_valid_challenge_value(value) {
                assert!((1..=128).contains(&value.len()));
                assert!(value.is_ascii());
            }
        }
    }
    let _ = round_trip::<CertificateRequest>(data);
    let _ = round_trip::<AgentMessage>(data);
    let _ = round_trip::<ServerMessage>(data);
});
