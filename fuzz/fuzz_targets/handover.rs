//! Fuzzes what one server process reads from another during an upgrade,
//! and the QUIC header classification every datagram goes through while
//! two processes share the QUIC socket.
//!
//! Invariants: nothing panics; a forwarded datagram that decodes encodes
//! back to one that decodes the same; handover messages and control lines
//! that decode round-trip.
#![no_main]

use edge_proto::handover::{self, ControlEvent, ControlRequest, HandoverMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = handover::classify(data);
    if let Ok((header, payload)) = handover::decode_forwarded(data) {
        let mut again = Vec::new();
        handover::encode_forwarded(&header, payload, &mut again);
        let (header2, payload2) = handover::decode_forwarded(&again).expect("an encoding decodes");
        assert_eq!((header2, payload2), (header, payload));
    }
    if let Ok(message) = handover::decode_message(data) {
        let encoded = handover::encode_message(&message);
        let len = handover::message_len(encoded[..4].try_into().expect("prefix")).expect("bounded");
        assert_eq!(handover::decode_message(&encoded[4..4 + len]).expect("decodes"), message);
    }
    if let Ok(request) = handover::parse_control_line::<ControlRequest>(data) {
        let line = serde_json::to_vec(&request).expect("encodes");
        assert_eq!(handover::parse_control_line::<ControlRequest>(&line).expect("decodes"), request);
    }
    let _ = handover::parse_control_line::<ControlEvent>(data);
    let _: Result<HandoverMessage, _> = serde_json::from_slice(data);
});
