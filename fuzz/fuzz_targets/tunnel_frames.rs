//! Fuzzes the tunnel wire decoders: the data-stream header and the control
//! stream codec, fed whole and in pieces. Neither may panic, and feeding the
//! same bytes in two reads must decode the same as feeding them in one.
//!
//! It found that a control frame split across two reads was rejected as
//! `TooLong` (the length prefix peeked after the inner codec had consumed
//! it); fixed, and `control_codec_round_trip_and_limits` in proto checks
//! every split point since.
#![no_main]

use bytes::BytesMut;
use edge_proto::tunnel::{AgentMessage, ControlCodec, ServerMessage, StreamHeader};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// Whether to check that two reads decode like one. Trips at once on the
/// finding above; set to `false` to fuzz the rest until it is fixed.
const CHECK_SPLIT_READS: bool = true;

/// Decodes every frame in `chunks` (fed one after another into one buffer,
/// as reads would be) and returns the messages seen and whether it failed.
fn decode_all<In>(chunks: &[&[u8]]) -> (Vec<In>, bool)
where
    In: serde::de::DeserializeOwned,
{
    let mut codec: ControlCodec<In, ()> = ControlCodec::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(msg)) => out.push(msg),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    // Data-stream header: a prefix never decodes to something else.
    let whole = StreamHeader::decode(data);
    if let Ok(Some((header, used))) = &whole {
        assert!(*used <= data.len());
        assert_eq!(
            StreamHeader::decode(&header.encode())
                .ok()
                .flatten()
                .map(|(h, _)| h)
                .as_ref(),
            Some(header)
        );
        for end in [0, 1, 2, used / 2, used.saturating_sub(1)] {
            if end < *used {
                assert!(matches!(StreamHeader::decode(&data[..end]), Ok(None)));
            }
        }
        assert!(
            matches!(StreamHeader::decode(&data[..*used]), Ok(Some((h, u))) if &h == header && u == *used)
        );
    }

    // Control codec, both directions, whole and split at a few points.
    if !CHECK_SPLIT_READS {
        let _ = decode_all::<AgentMessage>(&[data]);
        let _ = decode_all::<ServerMessage>(&[data]);
        return;
    }
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (a, a_err) = decode_all::<AgentMessage>(&[data]);
    let (s, s_err) = decode_all::<ServerMessage>(&[data]);
    for cut in [split, 4, 5, data.len() / 2] {
        let cut = cut.min(data.len());
        let pieces = [&data[..cut], &data[cut..]];
        let (a2, a2_err) = decode_all::<AgentMessage>(&pieces);
        let (s2, s2_err) = decode_all::<ServerMessage>(&pieces);
        assert_eq!(
            (a2, a2_err),
            (a.clone(), a_err),
            "agent messages, cut {cut}"
        );
        assert_eq!(
            (s2, s2_err),
            (s.clone(), s_err),
            "server messages, cut {cut}"
        );
    }
});
