//! The SNI reader against real ClientHellos: the captures in
//! `tests/fixtures/client_hello/` (see the README there) and hellos built live
//! by rustls, fed whole, in every prefix, one byte at a time, re-fragmented
//! into many TLS records, under size caps, with trailing bytes, and mutated.

use std::sync::Arc;

use edge_proto::client_hello::{parse, Parse, Rejection, DEFAULT_MAX_HELLO_BYTES};

const CAP: usize = DEFAULT_MAX_HELLO_BYTES;

struct Fixture {
    name: &'static str,
    wire: &'static [u8],
    /// The SNI listed in the README, `None` for `no_sni.bin`.
    sni: Option<&'static str>,
    /// Wire length listed in the README.
    len: usize,
}

impl Fixture {
    fn expected(&self) -> Parse {
        match self.sni {
            Some(name) => Parse::Found(name.to_owned()),
            None => Parse::Rejected(Rejection::NoSni),
        }
    }
}

macro_rules! fixture {
    ($file:literal, $sni:expr, $len:expr) => {
        Fixture {
            name: $file,
            wire: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/client_hello/", $file)),
            sni: $sni,
            len: $len,
        }
    };
}

fn fixtures() -> [Fixture; 6] {
    [
        fixture!("curl.bin", Some("app.node1.example.test"), 517),
        fixture!("openssl.bin", Some("n1.example.test"), 321),
        fixture!("openssl_tls12.bin", Some("n1.example.test"), 212),
        fixture!("chromium.bin", Some("browser.node1.example.test"), 1934),
        fixture!("no_sni.bin", None, 297),
        fixture!("python_ssl.bin", Some("py.node1.example.test"), 517),
    ]
}

/// The handshake message carried by a single-record hello.
fn handshake_message(wire: &[u8]) -> &[u8] {
    assert_eq!(wire[0], 0x16, "not a handshake record");
    let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
    assert_eq!(wire.len(), 5 + len, "expected exactly one record");
    let msg = &wire[5..];
    assert_eq!(msg[0], 0x01, "not a ClientHello");
    let msg_len = usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]);
    assert_eq!(msg.len(), 4 + msg_len, "record holds more than the hello");
    msg
}

/// Wraps `message` into handshake records of at most `size` bytes each.
fn refragment(message: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5 * message.len().div_ceil(size));
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn assert_every_prefix_incomplete(label: &str, wire: &[u8], cap: usize) {
    for end in 0..wire.len() {
        let got = parse(&wire[..end], cap);
        assert_eq!(got, Parse::Incomplete, "{label}: prefix of {end}/{} bytes", wire.len());
    }
}

/// Simulates a socket delivering one byte per read.
fn feed_byte_at_a_time(label: &str, wire: &[u8], expected: &Parse) {
    let mut buf = Vec::with_capacity(wire.len());
    for (i, &byte) in wire.iter().enumerate() {
        buf.push(byte);
        let got = parse(&buf, CAP);
        if i + 1 < wire.len() {
            assert_eq!(got, Parse::Incomplete, "{label}: after byte {}", i + 1);
        } else {
            assert_eq!(&got, expected, "{label}: after the last byte");
        }
    }
}

// ---------------------------------------------------------------------------
// Captured hellos
// ---------------------------------------------------------------------------

#[test]
fn fixtures_match_readme() {
    for f in fixtures() {
        assert_eq!(f.wire.len(), f.len, "{}: length", f.name);
        let msg = handshake_message(f.wire);
        // Sanity: the SNI is really (not) in the bytes.
        if let Some(sni) = f.sni {
            assert!(msg.windows(sni.len()).any(|w| w == sni.as_bytes()), "{}: SNI bytes not found", f.name);
        }
    }
    // chromium.bin carries an X25519MLKEM768 share (group 0x11ec, 1216 bytes).
    let chromium = &fixtures()[3];
    assert!(chromium.wire.windows(4).any(|w| w == [0x11, 0xec, 0x04, 0xc0]));
}

#[test]
fn whole_fixture_gives_expected_verdict() {
    for f in fixtures() {
        assert_eq!(parse(f.wire, CAP), f.expected(), "{}", f.name);
    }
}

#[test]
fn every_strict_prefix_is_incomplete() {
    for f in fixtures() {
        assert_every_prefix_incomplete(f.name, f.wire, CAP);
    }
}

#[test]
fn byte_at_a_time_stream() {
    for f in fixtures() {
        feed_byte_at_a_time(f.name, f.wire, &f.expected());
    }
}

#[test]
fn refragmented_into_many_records() {
    for f in fixtures() {
        let msg = handshake_message(f.wire);
        for size in [1, 7, 100, 512, 1000] {
            let wire = refragment(msg, size);
            let label = format!("{} in records of {size}", f.name);
            assert!(wire.len() <= CAP, "{label}: test stream over the cap");
            assert_eq!(parse(&wire, CAP), f.expected(), "{label}");
            assert_every_prefix_incomplete(&label, &wire, CAP);
        }
    }
}

#[test]
fn refragmented_byte_at_a_time() {
    for f in fixtures() {
        let wire = refragment(handshake_message(f.wire), 100);
        feed_byte_at_a_time(&format!("{} in records of 100", f.name), &wire, &f.expected());
    }
}

#[test]
fn size_cap() {
    for f in fixtures() {
        let n = f.wire.len();
        // Exactly the wire length is allowed.
        assert_eq!(parse(f.wire, n), f.expected(), "{}: cap = {n}", f.name);
        // Any smaller cap refuses the hello (the handshake header announces
        // its length, so this is known from the first 9 bytes on).
        for cap in [n - 1, n / 2, 100, 9, 1] {
            assert_eq!(parse(f.wire, cap), Parse::Rejected(Rejection::TooLarge), "{}: cap = {cap}", f.name);
        }
        assert_eq!(
            parse(&f.wire[..9], n - 1),
            Parse::Rejected(Rejection::TooLarge),
            "{}: early TooLarge from the handshake header",
            f.name
        );
    }
}

#[test]
fn size_cap_counts_record_headers_of_fragmented_hellos() {
    for f in fixtures() {
        let msg = handshake_message(f.wire);
        for size in [7, 100, 512, 1000] {
            let wire = refragment(msg, size);
            let n = wire.len();
            let label = format!("{} in records of {size}", f.name);
            assert_eq!(parse(&wire, n), f.expected(), "{label}: cap = {n}");
            assert_eq!(parse(&wire, n - 1), Parse::Rejected(Rejection::TooLarge), "{label}: cap = {}", n - 1);
            // What the server does: never hands the parser more than the cap.
            assert_eq!(parse(&wire[..n - 1], n - 1), Parse::Rejected(Rejection::TooLarge), "{label}: capped buffer");
        }
    }
}

#[test]
fn bytes_after_the_hello_are_ignored() {
    // A middlebox-compat ChangeCipherSpec record, application data, garbage,
    // and the start of a second hello.
    let tails: [&[u8]; 4] = [
        &[0x14, 0x03, 0x03, 0x00, 0x01, 0x01],
        &[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5],
        b"GET / HTTP/1.1\r\n\r\n",
        &[0x16, 0x03, 0x01, 0x02],
    ];
    for f in fixtures() {
        for tail in tails {
            let mut wire = f.wire.to_vec();
            wire.extend_from_slice(tail);
            assert_eq!(parse(&wire, CAP), f.expected(), "{}: tail {tail:02x?}", f.name);
        }
        // Also after a re-fragmented hello.
        let mut wire = refragment(handshake_message(f.wire), 100);
        wire.extend_from_slice(tails[0]);
        assert_eq!(parse(&wire, CAP), f.expected(), "{}: fragmented + CCS", f.name);
    }
}

/// The verdict must not depend on where reads split the stream: once a
/// prefix gives a verdict, every longer input gives the same one.
#[test]
fn verdict_does_not_depend_on_read_boundaries() {
    // A record announcing more bytes than the hello: the client put other
    // handshake data after its hello, which it must not do.
    for f in fixtures() {
        let msg = handshake_message(f.wire);
        for extra in [1usize, 3, 100] {
            let mut wire = vec![0x16, 0x03, 0x01];
            wire.extend_from_slice(&((msg.len() + extra) as u16).to_be_bytes());
            wire.extend_from_slice(msg);
            wire.extend(std::iter::repeat_n(0x01, extra));
            let label = format!("{}: record {extra} bytes longer than the hello", f.name);
            assert!(matches!(parse(&wire, CAP), Parse::Rejected(Rejection::Malformed(_))), "{label}");
            for end in 5 + msg.len()..wire.len() {
                let got = parse(&wire[..end], CAP);
                assert!(
                    matches!(got, Parse::Rejected(Rejection::Malformed(_))),
                    "{label}: prefix of {end} bytes gave {got:?}"
                );
            }
        }
    }
    // The same property over mutated and re-fragmented fixtures.
    for f in fixtures() {
        for wire in [f.wire.to_vec(), refragment(handshake_message(f.wire), 100)] {
            let mut m = wire.clone();
            m.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
            for i in (0..m.len()).step_by(3) {
                let original = m[i];
                for v in [0x00, 0xff, original ^ 0x80, original.wrapping_add(1)] {
                    m[i] = v;
                    let whole = parse(&m, CAP);
                    for end in [i, i + 1, i + 5, wire.len() - 1, wire.len()] {
                        let Some(prefix) = m.get(..end) else { continue };
                        let early = parse(prefix, CAP);
                        if early != Parse::Incomplete {
                            assert_eq!(
                                verdict_kind(&early),
                                verdict_kind(&whole),
                                "{}: byte {i} = {v:#04x}, prefix {end}: {early:?} then {whole:?}",
                                f.name
                            );
                        }
                    }
                }
                m[i] = original;
            }
        }
    }
}

/// A verdict with the `Malformed` reason erased (the reason may legitimately
/// be worded differently once more bytes are known).
fn verdict_kind(p: &Parse) -> String {
    match p {
        Parse::Incomplete => "incomplete".into(),
        Parse::Rejected(r) => r.label().into(),
        Parse::Found(name) => format!("found {name}"),
    }
}

#[test]
fn mutations_never_panic() {
    for f in fixtures() {
        let mut m = f.wire.to_vec();
        for i in 0..m.len() {
            let original = m[i];
            for v in [0x00, 0xff, original ^ 0x80] {
                m[i] = v;
                let _ = parse(&m, CAP);
            }
            m[i] = original;
        }
        // Truncations of a mutated hello, and a hello mutated under a tight cap.
        for i in (0..m.len()).step_by(13) {
            let original = m[i];
            m[i] = original ^ 0x80;
            let _ = parse(&m[..i], CAP);
            let _ = parse(&m, m.len() / 2);
            m[i] = original;
        }
    }
}

// ---------------------------------------------------------------------------
// Hellos built live by rustls
// ---------------------------------------------------------------------------

mod live_rustls {
    use super::*;

    use rustls::crypto::{aws_lc_rs, CryptoProvider};
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, NamedGroup, RootCertStore};

    const SNI: &str = "rustls.node1.example.test";

    fn client_hello(provider: CryptoProvider, alpn: &[&[u8]]) -> Vec<u8> {
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(SNI.to_owned()).expect("server name");
        let mut conn = ClientConnection::new(Arc::new(config), name).expect("connection");
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire).expect("write_tls");
        }
        wire
    }

    fn check(label: &str, wire: &[u8]) {
        let expected = Parse::Found(SNI.to_owned());
        assert_eq!(parse(wire, CAP), expected, "{label}");
        assert_every_prefix_incomplete(label, wire, CAP);
        assert_eq!(parse(wire, wire.len()), expected, "{label}: cap = length");
        assert_eq!(parse(wire, wire.len() - 1), Parse::Rejected(Rejection::TooLarge), "{label}: cap = length - 1");
        let msg = handshake_message(wire);
        for size in [7, 512] {
            let fragmented = refragment(msg, size);
            let label = format!("{label} in records of {size}");
            assert_eq!(parse(&fragmented, CAP), expected, "{label}");
            assert_every_prefix_incomplete(&label, &fragmented, CAP);
        }
    }

    fn offers_key_share(wire: &[u8], group: NamedGroup) -> bool {
        // Loose check: the group id followed by the share length we expect.
        let (id, share_len): (u16, u16) = match group {
            NamedGroup::X25519MLKEM768 => (0x11ec, 1216),
            NamedGroup::X25519 => (0x001d, 32),
            _ => unreachable!(),
        };
        let mut pattern = id.to_be_bytes().to_vec();
        pattern.extend_from_slice(&share_len.to_be_bytes());
        wire.windows(4).any(|w| w == pattern)
    }

    fn x25519_only() -> CryptoProvider {
        CryptoProvider { kx_groups: vec![aws_lc_rs::kx_group::X25519], ..aws_lc_rs::default_provider() }
    }

    #[test]
    fn default_provider() {
        let provider = aws_lc_rs::default_provider();
        let groups: Vec<NamedGroup> = provider.kx_groups.iter().map(|g| g.name()).collect();
        // A key share is sent for the first group only (plus, for a hybrid,
        // its classical component), so the hello is large only when the
        // post-quantum group is preferred. rustls 0.23 prefers it with its
        // `prefer-post-quantum` feature (on by default, but this workspace
        // builds rustls with default features off).
        let pq_preferred = groups.first() == Some(&NamedGroup::X25519MLKEM768);
        let wire = client_hello(provider, &[]);
        eprintln!("default aws_lc_rs kx_groups {groups:?}: hello of {} bytes", wire.len());
        assert!(groups.contains(&NamedGroup::X25519));
        assert_eq!(offers_key_share(&wire, NamedGroup::X25519MLKEM768), pq_preferred);
        if pq_preferred {
            assert!(wire.len() > 1100, "PQ hello of {} bytes", wire.len());
        } else {
            assert!(wire.len() < 1000, "classical hello of {} bytes", wire.len());
        }
        check("rustls default provider", &wire);
    }

    #[test]
    fn post_quantum_preferred() {
        // Whatever the build's feature set, put X25519MLKEM768 first.
        let mut provider = aws_lc_rs::default_provider();
        provider.kx_groups.retain(|g| g.name() != NamedGroup::X25519MLKEM768);
        provider.kx_groups.insert(0, aws_lc_rs::kx_group::X25519MLKEM768);
        let wire = client_hello(provider, &[]);
        assert!(offers_key_share(&wire, NamedGroup::X25519MLKEM768));
        assert!(wire.len() > 1100, "PQ hello of {} bytes", wire.len());
        check("rustls X25519MLKEM768 first", &wire);
    }

    #[test]
    fn x25519_only_provider() {
        let wire = client_hello(x25519_only(), &[]);
        assert!(!offers_key_share(&wire, NamedGroup::X25519MLKEM768));
        assert!(offers_key_share(&wire, NamedGroup::X25519));
        assert!(wire.len() < 1000, "classical hello of {} bytes", wire.len());
        check("rustls X25519 only", &wire);
    }

    #[test]
    fn with_alpn_h2_http11() {
        for provider in [aws_lc_rs::default_provider(), x25519_only()] {
            let wire = client_hello(provider, &[b"h2", b"http/1.1"]);
            // ALPN extension (0x0010) with both protocols, and no ECH (0xfe0d).
            assert!(wire.windows(12).any(|w| w == b"\x02h2\x08http/1.1"));
            assert!(has_extension(&wire, 0x0010));
            assert!(!has_extension(&wire, 0xfe0d));
            check("rustls with ALPN", &wire);
        }
    }

    /// Whether the hello carries an extension of this type (walks the hello).
    fn has_extension(wire: &[u8], ext_type: u16) -> bool {
        let msg = handshake_message(wire);
        let mut p = 4 + 2 + 32; // header, version, random
        p += 1 + usize::from(msg[p]); // session id
        p += 2 + usize::from(u16::from_be_bytes([msg[p], msg[p + 1]])); // suites
        p += 1 + usize::from(msg[p]); // compression
        let end = p + 2 + usize::from(u16::from_be_bytes([msg[p], msg[p + 1]]));
        p += 2;
        while p < end {
            let t = u16::from_be_bytes([msg[p], msg[p + 1]]);
            let len = usize::from(u16::from_be_bytes([msg[p + 2], msg[p + 3]]));
            if t == ext_type {
                return true;
            }
            p += 4 + len;
        }
        false
    }

    #[test]
    fn extension_walker_agrees_with_fixtures() {
        // Keeps `has_extension` honest: chromium sends GREASE ECH, openssl not.
        let f = fixtures();
        assert!(has_extension(f[3].wire, 0xfe0d));
        assert!(has_extension(f[3].wire, 0x0000));
        assert!(!has_extension(f[1].wire, 0xfe0d));
        assert!(!has_extension(f[4].wire, 0x0000));
    }
}
