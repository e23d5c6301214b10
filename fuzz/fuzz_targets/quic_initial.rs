//! Fuzzes the QUIC Initial reader: header classification, Version
//! Negotiation, the CRYPTO frame walker and reassembly (fed the input as a
//! decrypted payload), whole datagrams, and the router over them; and the
//! tunnel's datagram framing (the input as a frame). Never panics; a
//! verdict, once reached, never changes; nothing pending outlives its
//! deadline; a decoded frame re-encodes to the same bytes.
//!
//! Input: two bytes (big-endian) giving the first datagram's length, the
//! first datagram, then the second. The whole input is also read as the
//! plaintext of an Initial packet.
#![no_main]

use edge_proto::quic_datagram;
use edge_proto::quic_initial::{
    classify, version_negotiation, CryptoStream, InitialSni, Packet, Progress, DEFAULT_MAX_CRYPTO_BYTES,
};
use edge_proto::quic_route::{Limits, QuicRouter, RouteId, Verdict};
use libfuzzer_sys::fuzz_target;

fn check_name(progress: &Progress) {
    if let Progress::Found(name) = progress {
        assert!(!name.is_empty());
        assert_eq!(name, &name.to_ascii_lowercase());
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((client, datagram)) = quic_datagram::decode(data) {
        let mut again = Vec::new();
        quic_datagram::encode(client, datagram, &mut again);
        // Mapped IPv6 is re-encoded as IPv4, the one form both ends use.
        if data[0] == 4 || data.get(1..13) != Some(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff][..]) {
            assert_eq!(again, data);
        }
    }
    let _ = classify(data);
    if let Some(vn) = version_negotiation(data, 0x55) {
        assert!(data.len() >= 1200 && vn[1..5] == [0, 0, 0, 0]);
    }

    let mut stream = CryptoStream::new(DEFAULT_MAX_CRYPTO_BYTES);
    if stream.read_frames(data).is_ok() {
        check_name(&stream.hello());
    }

    let Some((&[l0, l1], rest)) = data.split_first_chunk::<2>().map(|(h, r)| (h, r)) else {
        return;
    };
    let split = usize::from(u16::from_be_bytes([l0, l1])).min(rest.len());
    let (first, second) = rest.split_at(split);

    // The router: whatever it forwards goes to a route it was given.
    let mut router = QuicRouter::new(Limits { max_buffered: 2, ..Limits::default() });
    let now = std::time::Instant::now();
    let source = "192.0.2.1:443".parse().expect("address");
    for datagram in [first, second, first] {
        if let Verdict::Forward { route, .. } =
            router.on_datagram(now, source, datagram, |_| Some(RouteId(5)), |r| r == RouteId(5))
        {
            assert_eq!(route, RouteId(5));
        }
    }
    router.expire(now + std::time::Duration::from_secs(60));
    assert_eq!(router.pending(), 0);
    if let Ok(Packet::Initial(version, header)) = classify(first) {
        let mut reader = InitialSni::new(version, header.dcid, DEFAULT_MAX_CRYPTO_BYTES);
        let mut settled: Option<Progress> = None;
        for datagram in [first, second, first] {
            if let Ok(progress) = reader.feed(datagram) {
                check_name(&progress);
                if let Some(before) = &settled {
                    assert_eq!(&progress, before, "a verdict changed");
                } else if progress != Progress::NeedMore {
                    settled = Some(progress);
                }
            }
        }
    }
});
