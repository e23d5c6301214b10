//! Tests on Initials from a real QUIC client (quinn-proto with rustls,
//! post-quantum key share) and on Initials built here, split, reordered,
//! duplicated and truncated.

use std::sync::Arc;

use super::*;

pub(crate) const NAME: &str = "app.n1.edge.test";

fn rustls_client_config() -> rustls::ClientConfig {
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h3".to_vec()];
    config
}

/// The datagrams a real quinn client sends first when connecting to `name`.
pub(crate) fn quinn_first_flight(name: &str) -> Vec<Vec<u8>> {
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(rustls_client_config()).expect("QUIC config");
    let config = quinn_proto::ClientConfig::new(Arc::new(crypto));
    let mut endpoint =
        quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, true, Some([7; 32]));
    let now = std::time::Instant::now();
    let addr = "127.0.0.1:443".parse().expect("address");
    let (_, mut conn) = endpoint.connect(now, config, addr, name).expect("connect");
    let mut datagrams = Vec::new();
    let mut buf = Vec::new();
    while let Some(transmit) = conn.poll_transmit(now, 10, &mut buf) {
        let segment = transmit.segment_size.unwrap_or(transmit.size);
        datagrams.extend(buf[..transmit.size].chunks(segment).map(<[u8]>::to_vec));
        buf.clear();
    }
    datagrams
}

fn reader_for(datagram: &[u8]) -> InitialSni {
    match classify(datagram) {
        Ok(Packet::Initial(version, header)) => InitialSni::new(version, header.dcid, DEFAULT_MAX_CRYPTO_BYTES),
        other => panic!("not an Initial: {other:?}"),
    }
}

/// Feeds `datagrams` in order and returns the last answer.
fn feed_all(reader: &mut InitialSni, datagrams: &[Vec<u8>]) -> Progress {
    let mut last = Progress::NeedMore;
    for d in datagrams {
        if let Ok(progress) = reader.feed(d) {
            last = progress;
        }
    }
    last
}

#[test]
fn a_real_quinn_client_with_a_post_quantum_hello_is_read() {
    let flight = quinn_first_flight(NAME);
    assert!(flight.len() >= 2, "a post-quantum hello spans several Initials, got {}", flight.len());
    assert!(flight.iter().all(|d| d.len() >= MIN_INITIAL_DATAGRAM));
    let mut reader = reader_for(&flight[0]);
    assert_eq!(reader.feed(&flight[0]), Ok(Progress::NeedMore));
    assert_eq!(feed_all(&mut reader, &flight[1..]), Progress::Found(NAME.into()));
    // Settled: more datagrams change nothing.
    assert_eq!(reader.feed(&flight[0]), Ok(Progress::Found(NAME.into())));
}

#[test]
fn quinn_datagrams_in_reverse_and_duplicated_are_read() {
    let flight = quinn_first_flight(NAME);
    let mut reversed = flight.clone();
    reversed.reverse();
    let mut reader = reader_for(&reversed[0]);
    assert_eq!(feed_all(&mut reader, &reversed), Progress::Found(NAME.into()));

    let doubled: Vec<Vec<u8>> = flight.iter().flat_map(|d| [d.clone(), d.clone()]).collect();
    let mut reader = reader_for(&doubled[0]);
    assert_eq!(reader.feed(&doubled[0]), Ok(Progress::NeedMore));
    assert_eq!(reader.feed(&doubled[1]), Ok(Progress::NeedMore), "a duplicate adds nothing");
    assert_eq!(feed_all(&mut reader, &doubled[2..]), Progress::Found(NAME.into()));
}

#[test]
fn every_prefix_of_every_quinn_datagram_is_dropped_without_a_panic() {
    let flight = quinn_first_flight(NAME);
    for (i, datagram) in flight.iter().enumerate() {
        for cut in 0..datagram.len() {
            let prefix = &datagram[..cut];
            let _ = classify(prefix);
            let mut reader = reader_for(&flight[0]);
            // Earlier datagrams whole, this one cut: never a verdict from
            // the cut one, and never a panic.
            let before = feed_all(&mut reader, &flight[..i]);
            let result = reader.feed(prefix);
            assert!(result.is_err() || result == Ok(before.clone()), "datagram {i} cut at {cut}: {result:?}");
            // The same cut padded back to full size: framing holds, the
            // AEAD does not.
            let mut padded = prefix.to_vec();
            padded.resize(datagram.len(), 0);
            let result = reader.feed(&padded);
            assert!(
                result.is_err() || result == Ok(before.clone()) || cut == datagram.len(),
                "{i} at {cut}: {result:?}"
            );
        }
    }
}

#[test]
fn a_flipped_bit_fails_authentication_and_changes_nothing() {
    let flight = quinn_first_flight(NAME);
    let mut reader = reader_for(&flight[0]);
    for at in [30, 200, 700, flight[0].len() - 1] {
        let mut bad = flight[0].clone();
        bad[at] ^= 0x04;
        assert_eq!(reader.feed(&bad), Err(DatagramError::NoInitial), "flip at {at}");
    }
    assert_eq!(feed_all(&mut reader, &flight), Progress::Found(NAME.into()));
}

#[test]
fn a_reader_for_another_connection_id_reads_nothing() {
    let flight = quinn_first_flight(NAME);
    let mut reader = InitialSni::new(Version::V1, &[1, 2, 3, 4, 5, 6, 7, 8], DEFAULT_MAX_CRYPTO_BYTES);
    for d in &flight {
        assert_eq!(reader.feed(d), Err(DatagramError::NoInitial));
    }
}

// ---- Initials built here: any split, order and version ----

/// The ClientHello rustls sends as a QUIC client (post-quantum key share
/// first, as the workspace's rustls prefers it).
pub(crate) fn client_hello(name: &str, version: Version) -> Vec<u8> {
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let mut conn = rustls::quic::ClientConnection::new(
        Arc::new(rustls_client_config()),
        version.rustls(),
        server_name,
        vec![0; 16],
    )
    .expect("client");
    let mut hello = Vec::new();
    conn.write_hs(&mut hello);
    assert_eq!(hello[0], 1, "a ClientHello");
    hello
}

fn varint(v: u64) -> Vec<u8> {
    match v {
        0..=63 => vec![v as u8],
        64..=16383 => (0x4000 | v as u16).to_be_bytes().to_vec(),
        _ => (0x8000_0000 | v as u32).to_be_bytes().to_vec(),
    }
}

pub(crate) fn crypto_frame(offset: usize, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x06];
    f.extend(varint(offset as u64));
    f.extend(varint(data.len() as u64));
    f.extend_from_slice(data);
    f
}

/// A client Initial datagram carrying `frames`, padded to 1200 bytes.
pub(crate) fn initial(version: Version, dcid: &[u8], pn: u32, frames: &[u8]) -> Vec<u8> {
    let suite = match rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256 {
        rustls::SupportedCipherSuite::Tls13(s) => s,
        rustls::SupportedCipherSuite::Tls12(_) => unreachable!(),
    };
    let keys = suite.quic_suite().expect("quic").keys(dcid, rustls::Side::Client, version.rustls()).local;
    let pn_len = 2;
    let mut header = vec![0xc0 | (version.initial_type() << 4) | (pn_len as u8 - 1)];
    header.extend_from_slice(&version.wire().to_be_bytes());
    header.push(dcid.len() as u8);
    header.extend_from_slice(dcid);
    header.push(4);
    header.extend_from_slice(&[9, 9, 9, 9]);
    header.push(0); // token length
    let fixed = header.len() + 4 + pn_len + 16; // 4: the length varint below
    let mut payload = frames.to_vec();
    payload.resize(payload.len().max(MIN_INITIAL_DATAGRAM.saturating_sub(fixed)), 0);
    let length = (pn_len + payload.len() + 16) as u64;
    header.extend((0x8000_0000 | length as u32).to_be_bytes());
    let pn_at = header.len();
    header.extend_from_slice(&(pn as u16).to_be_bytes());
    let tag = keys.packet.encrypt_in_place(u64::from(pn), &header, &mut payload).expect("seal");
    let mut packet = header;
    packet.extend_from_slice(&payload);
    packet.extend_from_slice(tag.as_ref());
    let sample: Vec<u8> = packet[pn_at + 4..pn_at + 20].to_vec();
    let (first, rest) = packet.split_at_mut(1);
    keys.header.encrypt_in_place(&sample, &mut first[0], &mut rest[pn_at - 1..pn_at - 1 + pn_len]).expect("protect");
    packet
}

pub(crate) const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

/// Three packets: the hello cut in five pieces, scattered out of order
/// and duplicated across them, with PING and PADDING between. Each packet
/// holds a piece no other has, so no two packets complete the hello.
pub(crate) fn scattered(version: Version, name: &str) -> Vec<Vec<u8>> {
    let hello = client_hello(name, version);
    let cuts = [0, hello.len() / 5, hello.len() * 2 / 5, hello.len() * 3 / 5, hello.len() * 4 / 5, hello.len()];
    let piece = |i: usize| crypto_frame(cuts[i], &hello[cuts[i]..cuts[i + 1]]);
    let packets: [Vec<u8>; 3] = [
        [piece(3), vec![0x01, 0x00, 0x00], piece(0)].concat(),
        [piece(4), piece(1), piece(0)].concat(),
        [vec![0x01], piece(2), piece(4)].concat(),
    ];
    packets.iter().enumerate().map(|(pn, frames)| initial(version, &DCID, pn as u32, frames)).collect()
}

#[test]
fn scattered_frames_in_every_packet_order_are_read_in_v1_and_v2() {
    for version in [Version::V1, Version::V2] {
        let packets = scattered(version, NAME);
        let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        for order in orders {
            let mut reader = reader_for(&packets[order[0]]);
            assert_eq!(reader.version(), version);
            let progress: Vec<Progress> = order.iter().map(|&i| reader.feed(&packets[i]).expect("authentic")).collect();
            assert_eq!(progress[..2], [Progress::NeedMore, Progress::NeedMore], "{version:?} {order:?}");
            assert_eq!(progress[2], Progress::Found(NAME.into()), "{version:?} {order:?}");
        }
    }
}

#[test]
fn a_v2_packet_is_not_read_as_v1() {
    let packets = scattered(Version::V2, NAME);
    let mut reader = InitialSni::new(Version::V1, &DCID, DEFAULT_MAX_CRYPTO_BYTES);
    assert_eq!(reader.feed(&packets[0]), Err(DatagramError::NoInitial));
}

#[test]
fn frames_an_initial_may_not_carry_reject_the_connection() {
    // A STREAM frame (0x08) in an Initial is a protocol violation.
    let packet = initial(Version::V1, &DCID, 0, &[0x08, 0x00, 0x01, 0xaa]);
    let mut reader = reader_for(&packet);
    assert_eq!(
        reader.feed(&packet),
        Ok(Progress::Rejected(Reject::Frame("frame type not allowed in an Initial packet")))
    );
    // A truncated CRYPTO frame (declared longer than the packet).
    let mut frame = vec![0x06, 0x00, 0x44, 0xff];
    frame.extend_from_slice(&[1; 10]);
    let packet = initial(Version::V1, &DCID, 0, &frame);
    assert!(matches!(reader_for(&packet).feed(&packet), Ok(Progress::Rejected(Reject::Frame(_)))));
}

#[test]
fn crypto_data_beyond_the_cap_is_too_large() {
    let packet = initial(Version::V1, &DCID, 0, &crypto_frame(16_000, &[1; 1000]));
    let mut reader = InitialSni::new(Version::V1, &DCID, 16 * 1024);
    assert_eq!(reader.feed(&packet), Ok(Progress::Rejected(Reject::TooLarge)));
    // A hello announcing more than the cap is refused before it arrives.
    let packet = initial(Version::V1, &DCID, 0, &crypto_frame(0, &[1, 0x01, 0x00, 0x00]));
    assert_eq!(InitialSni::new(Version::V1, &DCID, 16 * 1024).feed(&packet), Ok(Progress::Rejected(Reject::TooLarge)));
}

#[test]
fn a_server_hello_or_a_hello_without_sni_is_rejected() {
    let packet = initial(Version::V1, &DCID, 0, &crypto_frame(0, &[2, 0, 0, 1, 0]));
    assert_eq!(reader_for(&packet).feed(&packet), Ok(Progress::Rejected(Reject::Hello(Rejection::NotClientHello))));
}

#[test]
fn endless_initials_without_a_hello_are_cut_off() {
    let mut reader = InitialSni::new(Version::V1, &DCID, DEFAULT_MAX_CRYPTO_BYTES);
    let mut last = Progress::NeedMore;
    for pn in 0..MAX_INITIAL_PACKETS as u32 {
        last = reader.feed(&initial(Version::V1, &DCID, pn, &[0x01])).expect("authentic");
    }
    assert_eq!(last, Progress::Rejected(Reject::TooManyPackets));
}

#[test]
fn one_datagram_of_many_tiny_initials_stops_at_the_packet_limit() {
    // Coalesced packets of the minimum size, each only a PING.
    let mut datagram = Vec::new();
    for pn in 0..(MAX_INITIAL_PACKETS as u32 + 8) {
        let packet = initial(Version::V1, &DCID, pn, &[0x01]);
        datagram.extend_from_slice(&packet);
    }
    let mut reader = reader_for(&datagram);
    assert_eq!(reader.feed(&datagram), Ok(Progress::Rejected(Reject::TooManyPackets)));
}

#[test]
fn small_datagrams_are_dropped() {
    let packet = initial(Version::V1, &DCID, 0, &[0x01]);
    let mut reader = reader_for(&packet);
    assert_eq!(reader.feed(&packet[..1199]), Err(DatagramError::TooSmall(1199)));
}

#[test]
fn classify_tells_the_header_forms_apart() {
    let packet = initial(Version::V1, &DCID, 0, &[0x01]);
    assert!(matches!(classify(&packet), Ok(Packet::Initial(Version::V1, h)) if h.dcid == DCID && h.scid == [9; 4]));
    assert_eq!(classify(&[0x41, 1, 2, 3]), Ok(Packet::Short(&[1, 2, 3])));
    assert_eq!(classify(&[0x01, 1, 2, 3]), Err(DatagramError::NotQuic));
    assert_eq!(classify(&[]), Err(DatagramError::Truncated));
    let mut handshake = packet.clone();
    handshake[0] = (handshake[0] & 0xcf) | 0x20;
    assert!(matches!(classify(&handshake), Ok(Packet::OtherLong(Version::V1, _))));
    let mut unknown = packet.clone();
    unknown[1..5].copy_from_slice(&0x1a2a_3a4au32.to_be_bytes());
    assert!(matches!(classify(&unknown), Ok(Packet::UnknownVersion(h)) if h.version == 0x1a2a_3a4a));
    let mut long_cid = packet;
    long_cid[5] = 21;
    assert_eq!(classify(&long_cid), Err(DatagramError::ConnectionIdTooLong));
}

#[test]
fn unknown_versions_get_version_negotiation_with_the_ids_swapped() {
    let mut datagram = initial(Version::V1, &DCID, 0, &[0x01]);
    datagram[1..5].copy_from_slice(&0x1a2a_3a4au32.to_be_bytes());
    let vn = version_negotiation(&datagram, 0x7f).expect("an answer");
    assert_eq!(vn[0] & 0xc0, 0xc0);
    assert_eq!(vn[1..5], [0, 0, 0, 0]);
    assert_eq!(vn[5], 4);
    assert_eq!(vn[6..10], [9, 9, 9, 9]);
    assert_eq!(vn[10], 8);
    assert_eq!(vn[11..19], DCID);
    assert_eq!(vn[19..], [0, 0, 0, 1, 0x6b, 0x33, 0x43, 0xcf]);
    // Not for small datagrams, known versions, or Version Negotiation.
    assert_eq!(version_negotiation(&datagram[..1199], 0), None);
    assert_eq!(version_negotiation(&initial(Version::V1, &DCID, 0, &[0x01]), 0), None);
    datagram[1..5].copy_from_slice(&[0; 4]);
    assert_eq!(version_negotiation(&datagram, 0), None);
}

#[test]
fn varints_and_packet_numbers_decode_as_in_the_rfc() {
    // RFC 9000 §A.1 and §A.3.
    assert_eq!(read_varint(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]), Some((151_288_809_941_952_652, 8)));
    assert_eq!(read_varint(&[0x9d, 0x7f, 0x3e, 0x7d]), Some((494_878_333, 4)));
    assert_eq!(read_varint(&[0x7b, 0xbd]), Some((15_293, 2)));
    assert_eq!(read_varint(&[0x25]), Some((37, 1)));
    assert_eq!(read_varint(&[0x40]), None);
    assert_eq!(decode_packet_number(Some(0xa82f_30ea), 0x9b32, 2), 0xa82f_9b32);
    assert_eq!(decode_packet_number(None, 0, 1), 0);
    assert_eq!(decode_packet_number(Some(0), 3, 2), 3);
    assert_eq!(decode_packet_number(Some(300), 2, 1), 258);
    let _ = decode_packet_number(Some(u64::MAX), u64::from(u32::MAX), 4);
}

#[test]
fn crypto_data_in_too_many_pieces_is_refused() {
    let mut stream = CryptoStream::new(DEFAULT_MAX_CRYPTO_BYTES);
    // One byte at every other offset: each a piece of its own.
    let frames: Vec<u8> = (0..MAX_CRYPTO_GAPS).flat_map(|i| crypto_frame(2 * i + 1, &[0])).collect();
    assert_eq!(stream.read_frames(&frames), Ok(()));
    assert_eq!(stream.read_frames(&crypto_frame(1000, &[0])), Err(Reject::Frame("CRYPTO data in too many pieces")));
}

#[test]
fn plaintext_frames_assemble_a_hello_from_any_split() {
    let hello = client_hello(NAME, Version::V1);
    for piece in [1, 7, 100, 999, hello.len()] {
        let mut stream = CryptoStream::new(DEFAULT_MAX_CRYPTO_BYTES);
        let chunks: Vec<(usize, &[u8])> = hello.chunks(piece).enumerate().map(|(i, c)| (i * piece, c)).collect();
        // Last piece first, then the rest in order: the hello completes
        // only with the final frame.
        let (last, rest) = chunks.split_last().expect("pieces");
        let order: Vec<&(usize, &[u8])> = std::iter::once(last).chain(rest.iter()).collect();
        for (i, (offset, data)) in order.iter().enumerate() {
            if stream.read_frames(&crypto_frame(*offset, data)).is_err() {
                // Pieces of one byte exceed the gap limit: refused, not read.
                assert!(piece < 100, "piece {piece}");
                break;
            }
            let expected = if i + 1 == order.len() { Progress::Found(NAME.into()) } else { Progress::NeedMore };
            assert_eq!(stream.hello(), expected, "piece {piece}, frame {i}");
        }
    }
}

/// Writes the seed corpus of the `quic_initial` fuzz target (run with
/// `cargo test -p edge-proto write_quic_initial_seeds -- --ignored`).
#[test]
#[ignore]
fn write_quic_initial_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/quic_initial");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let pair = |a: &[u8], b: &[u8]| [&(a.len() as u16).to_be_bytes()[..], a, b].concat();
    let quinn = quinn_first_flight(NAME);
    std::fs::write(dir.join("quinn_pq.bin"), pair(&quinn[0], &quinn[1])).expect("seed");
    let v1 = scattered(Version::V1, NAME);
    std::fs::write(dir.join("scattered_v1.bin"), pair(&v1[2], &v1[0])).expect("seed");
    let v2 = scattered(Version::V2, NAME);
    std::fs::write(dir.join("scattered_v2.bin"), pair(&v2[1], &v2[2])).expect("seed");
    // Two PADDING bytes (an empty first datagram), then plaintext frames.
    let hello = client_hello(NAME, Version::V1);
    let half = hello.len() / 2;
    let frames =
        [&[0u8, 0][..], &[0x01], &crypto_frame(half, &hello[half..]), &crypto_frame(0, &hello[..half])].concat();
    std::fs::write(dir.join("frames.bin"), frames).expect("seed");
    let mut unknown = v1[0].clone();
    unknown[1..5].copy_from_slice(&0x1a2a_3a4au32.to_be_bytes());
    std::fs::write(dir.join("unknown_version.bin"), pair(&unknown, &[])).expect("seed");
}
