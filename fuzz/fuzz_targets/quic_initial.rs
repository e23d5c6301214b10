//! Fuzzes the QUIC Initial reader: header classification, Version
//! Negotiation, the CRYPTO frame walker and reassembly (fed the input as a
//! decrypted payload), and whole datagrams. Never panics; a verdict, once
//! reached, never changes.
//!
//! Input: two bytes (big-endian) giving the first datagram's length, the
//! first datagram, then the second. The whole input is also read as the
//! plaintext of an Initial packet.
#![no_main]

use edge_proto::quic_initial::{
    classify, version_negotiation, CryptoStream, InitialSni, Packet, Progress, DEFAULT_MAX_CRYPTO_BYTES,
};
use libfuzzer_sys::fuzz_target;

fn check_name(progress: &Progress) {
    if let Progress::Found(name) = progress {
        assert!(!name.is_empty());
        assert_eq!(name, &name.to_ascii_lowercase());
    }
}

fuzz_target!(|data: &[u8]| {
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
