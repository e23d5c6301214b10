//! Replays every file in the fuzz corpora (`fuzz/corpus/<target>/`) through
//! the parsers the fuzz targets exercise, on the stable toolchain and
//! without libFuzzer. A crash the fuzzer found becomes a regression test by
//! adding its input to the target's corpus directory (see docs/fuzzing.md).
//! The invariants checked here are the cheap ones; the fuzz targets check
//! more.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;

use bytes::BytesMut;
use edge_proto::client_hello::{parse, Parse, DEFAULT_MAX_HELLO_BYTES};
use edge_proto::dns_zone::{NodeAddresses, Zone, ZoneSettings};
use edge_proto::quic_initial::{classify, CryptoStream, InitialSni, Packet, Progress, DEFAULT_MAX_CRYPTO_BYTES};
use edge_proto::signal::{CertificateRequest, ChallengeRequest, HeartbeatRequest, ProbeRequest};
use edge_proto::tunnel::{AgentMessage, ControlCodec, ServerMessage, StreamHeader};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name};
use tokio_util::codec::Decoder;

/// The files of one corpus, sorted, with their contents.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seeds", dir.display());
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).expect("corpus file"))).collect()
}

#[test]
fn client_hello_corpus() {
    for (path, data) in corpus("client_hello") {
        let whole = parse(&data, DEFAULT_MAX_HELLO_BYTES);
        if let Parse::Found(name) = &whole {
            assert!(!name.is_empty() && *name == name.to_ascii_lowercase(), "{}", path.display());
        }
        for end in 0..data.len().min(64) {
            let _ = parse(&data[..end], DEFAULT_MAX_HELLO_BYTES);
        }
    }
}

#[test]
fn quic_initial_corpus() {
    let mut found = Vec::new();
    for (path, data) in corpus("quic_initial") {
        let mut stream = CryptoStream::new(DEFAULT_MAX_CRYPTO_BYTES);
        if stream.read_frames(&data).is_ok() {
            if let Progress::Found(name) = stream.hello() {
                found.push(name);
            }
        }
        let Some((len, rest)) = data.split_first_chunk::<2>() else { continue };
        let (first, second) = rest.split_at(usize::from(u16::from_be_bytes(*len)).min(rest.len()));
        if let Ok(Packet::Initial(version, header)) = classify(first) {
            let mut reader = InitialSni::new(version, header.dcid, DEFAULT_MAX_CRYPTO_BYTES);
            for datagram in [first, second] {
                if let Ok(Progress::Found(name)) = reader.feed(datagram) {
                    assert_eq!(name, "app.n1.edge.test", "{}", path.display());
                    found.push(name);
                }
            }
        }
    }
    // The seeds are real Initials (see `write_quic_initial_seeds`): a
    // change that stops reading them shows here.
    assert!(found.len() >= 2, "hellos found in the seeds (quinn_pq, frames): {found:?}");
    // And tunnel frames (the target reads its input as one too).
    let frames = corpus("quic_initial")
        .into_iter()
        .filter(|(_, data)| edge_proto::quic_datagram::decode(data).is_ok_and(|(_, d)| d.len() == 57))
        .count();
    assert_eq!(frames, 2, "tunnel_frame_v4 and tunnel_frame_v6 decode");
}

fn decode_all<In: serde::de::DeserializeOwned>(data: &[u8]) -> usize {
    let mut codec: ControlCodec<In, ()> = ControlCodec::default();
    let mut buf = BytesMut::from(data);
    let mut n = 0;
    while let Ok(Some(_)) = codec.decode(&mut buf) {
        n += 1;
    }
    n
}

#[test]
fn tunnel_frames_corpus() {
    for (path, data) in corpus("tunnel_frames") {
        if let Ok(Some((header, used))) = StreamHeader::decode(&data) {
            assert!(used <= data.len(), "{}", path.display());
            let again = StreamHeader::decode(&header.encode()).unwrap().unwrap().0;
            assert_eq!(again, header, "{}", path.display());
        }
        decode_all::<AgentMessage>(&data);
        decode_all::<ServerMessage>(&data);
    }
}

#[test]
fn dns_request_corpus() {
    let name = |s: &str| Name::from_str(s).unwrap();
    let settings = ZoneSettings {
        nameservers: vec![name("ns.edge.test.")],
        hostmaster: name("hostmaster.edge.test."),
        address_ttl: 30,
        txt_ttl: 5,
        zone_ttl: 3600,
        negative_ttl: 5,
        caa_issuers: vec![name("letsencrypt.org.")],
    };
    let cluster = vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
    let base = Zone::new(name("edge.test."), settings, cluster, Vec::new());
    let nodes = HashMap::from([("n1".to_string(), NodeAddresses::Cluster)]);
    let challenges = HashMap::from([("n1".to_string(), vec!["v1".to_string()])]);
    let zone = base.with_state(7, nodes, challenges);

    let mut decoded = 0;
    for (path, data) in corpus("dns_request") {
        let Ok(request) = Message::from_vec(&data) else { continue };
        decoded += 1;
        for query in &request.queries {
            let answer = zone.answer(query.name(), query.query_type(), query.query_class());
            if query.query_class() != DNSClass::IN || !zone.origin().zone_of(&query.name().to_lowercase()) {
                assert_eq!(answer.rcode, ResponseCode::Refused, "{}", path.display());
            }
            let mut response = Message::response(request.metadata.id, request.metadata.op_code);
            response.metadata.response_code = answer.rcode;
            response.add_query(query.clone());
            response.add_answers(answer.answers);
            response.add_authorities(answer.authority);
            let bytes = response.to_vec().unwrap();
            assert!(bytes.len() <= 1232, "{}: {} bytes", path.display(), bytes.len());
        }
    }
    assert!(decoded > 0, "no seed decodes as a DNS message");
}

fn round_trip<T>(data: &[u8]) -> bool
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(data) else { return false };
    let json = serde_json::to_vec(&value).expect("a decoded value encodes");
    let again: T = serde_json::from_slice(&json).expect("the re-encoding decodes");
    assert_eq!(again, value);
    true
}

#[test]
fn signal_json_corpus() {
    let mut decoded = 0;
    for (_, data) in corpus("signal_json") {
        let any = [
            round_trip::<HeartbeatRequest>(&data),
            round_trip::<ProbeRequest>(&data),
            round_trip::<ChallengeRequest>(&data),
            round_trip::<CertificateRequest>(&data),
            round_trip::<AgentMessage>(&data),
            round_trip::<ServerMessage>(&data),
        ]
        .contains(&true);
        decoded += usize::from(any);
    }
    assert!(decoded > 0, "no seed decodes as a signal body or control message");
}

#[test]
fn handover_corpus() {
    use edge_proto::handover::{self, ControlRequest, Destination, HandoverMessage};
    let (mut forwarded, mut messages, mut routed) = (0, 0, 0);
    for (_, data) in corpus("handover") {
        for end in 0..=data.len() {
            let _ = handover::classify(&data[..end]);
            let _ = handover::decode_forwarded(&data[..end]);
        }
        if matches!(handover::classify(&data), Destination::Epoch(_) | Destination::Acceptor) {
            routed += 1;
        }
        if let Ok((header, payload)) = handover::decode_forwarded(&data) {
            let mut again = Vec::new();
            handover::encode_forwarded(&header, payload, &mut again);
            assert_eq!(handover::decode_forwarded(&again).unwrap(), (header, payload));
            forwarded += 1;
        }
        messages += usize::from(round_trip::<HandoverMessage>(&data) || round_trip::<ControlRequest>(&data));
    }
    assert!(forwarded > 0 && messages > 0 && routed > 0, "the seeds cover each format");
}

#[test]
fn alt_svc_corpus() {
    use edge_proto::alt_svc::{h3_header, HeadInjector, Outcome};
    let mut added = 0;
    for (path, data) in corpus("alt_svc") {
        // The first byte picks the fuzz target's split; the rest is the stream.
        let input = &data[1..];
        let mut injector = HeadInjector::new(h3_header(443));
        let mut out = Vec::new();
        injector.push(input, &mut out);
        injector.finish(&mut out);
        if injector.outcome() == Outcome::Added {
            added += 1;
            assert_eq!(out.len(), input.len() + h3_header(443).len(), "{}", path.display());
        } else {
            assert_eq!(out, input, "{}", path.display());
        }
    }
    assert!(added >= 2, "seeds that get the header: {added}");
}
