//! Sans-IO reader for the server name (SNI) in a TLS ClientHello.
//!
//! Feed it every byte received so far; it answers [`Parse::Incomplete`],
//! [`Parse::Rejected`] or [`Parse::Found`]. A ClientHello may be split over
//! several TCP reads *and* several TLS records (post-quantum key shares make
//! hellos of 1.5–2 KB, and some clients fragment records on purpose), so the
//! handshake message is reassembled from consecutive handshake records before
//! it is parsed. The caller keeps the bytes and replays them unchanged; this
//! module never consumes or rewrites anything.
//!
//! The record layer is walked by hand (it is five bytes of framing); the
//! handshake message itself is parsed by `tls-parser`. Extensions are walked
//! one by one and only `server_name` is decoded, so an extension this parser
//! does not know (GREASE, ECH, new key-share groups) can never make a valid
//! hello fail.

use std::fmt;

use tls_parser::{parse_tls_extension_sni_content, parse_tls_message_handshake, SNIType};
use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake};

use crate::names::normalize_hostname;

/// Default cap on the bytes read while looking for the SNI.
pub const DEFAULT_MAX_HELLO_BYTES: usize = 16 * 1024;

const RECORD_HEADER_LEN: usize = 5;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_PLAINTEXT_RECORD: usize = 1 << 14;
const EXTENSION_SERVER_NAME: u16 = 0;

/// What the bytes seen so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed before anything can be decided.
    Incomplete,
    /// The connection cannot be routed; the reason says why.
    Rejected(Rejection),
    /// A complete ClientHello carrying this server name (lowercased).
    Found(String),
}

/// Why a byte stream was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The first record is not a TLS handshake record.
    NotTls,
    /// A TLS handshake, but its first message is not a ClientHello.
    NotClientHello,
    /// A valid ClientHello without a `server_name` host name.
    NoSni,
    /// TLS framing or ClientHello contents are invalid.
    Malformed(&'static str),
    /// The ClientHello is larger than the configured cap.
    TooLarge,
}

impl Rejection {
    /// A short stable label, used in logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::NotTls => "not_tls",
            Rejection::NotClientHello => "not_client_hello",
            Rejection::NoSni => "no_sni",
            Rejection::Malformed(_) => "malformed",
            Rejection::TooLarge => "too_large",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotTls => f.write_str("not a TLS handshake"),
            Rejection::NotClientHello => f.write_str("first handshake message is not a ClientHello"),
            Rejection::NoSni => f.write_str("ClientHello carries no server name (SNI)"),
            Rejection::Malformed(why) => write!(f, "malformed ClientHello: {why}"),
            Rejection::TooLarge => f.write_str("ClientHello exceeds the size cap"),
        }
    }
}

/// Looks for a complete ClientHello at the start of `buf`.
///
/// `max_bytes` caps the total bytes (record headers included) the hello may
/// occupy; anything longer is [`Rejection::TooLarge`] as soon as that is
/// known, so a peer cannot make the caller buffer without bound.
pub fn parse(buf: &[u8], max_bytes: usize) -> Parse {
    match reassemble(buf, max_bytes) {
        Ok(Some(message)) => parse_message(&message),
        Ok(None) if buf.len() >= max_bytes => Parse::Rejected(Rejection::TooLarge),
        Ok(None) => Parse::Incomplete,
        Err(rejection) => Parse::Rejected(rejection),
    }
}

/// Collects the handshake message from consecutive handshake records.
/// `Ok(None)` means more bytes are needed.
fn reassemble(buf: &[u8], max_bytes: usize) -> Result<Option<Vec<u8>>, Rejection> {
    let mut message: Vec<u8> = Vec::new();
    let mut offset = 0;
    loop {
        let Some(header) = buf.get(offset..offset + RECORD_HEADER_LEN) else {
            check_prefix(&buf[offset..], offset == 0)?;
            return Ok(None);
        };
        let content_type = header[0];
        let (major, minor) = (header[1], header[2]);
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if offset == 0 && (content_type != CONTENT_TYPE_HANDSHAKE || major != 3 || minor > 4) {
            return Err(Rejection::NotTls);
        }
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Err(Rejection::Malformed("non-handshake record inside ClientHello"));
        }
        if major != 3 || minor > 4 {
            return Err(Rejection::Malformed("bad record version"));
        }
        if len == 0 {
            return Err(Rejection::Malformed("empty handshake record"));
        }
        if len > MAX_PLAINTEXT_RECORD {
            return Err(Rejection::Malformed("record longer than 2^14 bytes"));
        }
        let body_start = offset + RECORD_HEADER_LEN;
        let available = &buf[body_start..buf.len().min(body_start + len)];
        message.extend_from_slice(available);
        if message.len() >= 4 {
            if message[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(Rejection::NotClientHello);
            }
            let msg_len = 4 + (usize::from(message[1]) << 16 | usize::from(message[2]) << 8 | usize::from(message[3]));
            // Bytes on the wire: this message plus at least one record header
            // per 2^14 bytes of it.
            let min_wire = msg_len + RECORD_HEADER_LEN * msg_len.div_ceil(MAX_PLAINTEXT_RECORD);
            if min_wire > max_bytes {
                return Err(Rejection::TooLarge);
            }
            if message.len() >= msg_len {
                if message.len() > msg_len || available.len() < len {
                    // The record carries (or announces) more handshake data
                    // after the hello; a client must wait for the ServerHello,
                    // so this is bogus.
                    return Err(Rejection::Malformed("trailing data after ClientHello"));
                }
                // `min_wire` assumed full-size records; count the real ones.
                if body_start + len > max_bytes {
                    return Err(Rejection::TooLarge);
                }
                return Ok(Some(message));
            }
        }
        if available.len() < len {
            return Ok(None);
        }
        offset = body_start + len;
        if offset >= max_bytes {
            return Err(Rejection::TooLarge);
        }
    }
}

/// Rejects a partial first record header as early as its bytes allow.
fn check_prefix(partial: &[u8], first: bool) -> Result<(), Rejection> {
    let bad_type = partial.first().is_some_and(|&t| t != CONTENT_TYPE_HANDSHAKE);
    let bad_major = partial.get(1).is_some_and(|&v| v != 3);
    let bad_minor = partial.get(2).is_some_and(|&v| v > 4);
    match (first, bad_type || bad_major || bad_minor) {
        (true, true) => Err(Rejection::NotTls),
        (false, true) => Err(Rejection::Malformed("bad record header inside ClientHello")),
        _ => Ok(()),
    }
}

/// Parses one complete handshake message without record framing, as QUIC
/// carries it in CRYPTO frames, and extracts the SNI host name.
pub fn parse_handshake_message(message: &[u8]) -> Parse {
    parse_message(message)
}

/// Parses a complete handshake message and extracts the SNI host name.
fn parse_message(message: &[u8]) -> Parse {
    let hello = match parse_tls_message_handshake(message) {
        Ok(([], TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(_)))) => {
            return Parse::Rejected(Rejection::Malformed("trailing bytes in ClientHello"))
        }
        Ok(_) => return Parse::Rejected(Rejection::NotClientHello),
        Err(_) => return Parse::Rejected(Rejection::Malformed("invalid ClientHello body")),
    };
    let Some(mut extensions) = hello.ext else {
        return Parse::Rejected(Rejection::NoSni);
    };
    while !extensions.is_empty() {
        let Some(&[t0, t1, l0, l1]) = extensions.get(..4) else {
            return Parse::Rejected(Rejection::Malformed("truncated extension header"));
        };
        let ext_type = u16::from_be_bytes([t0, t1]);
        let ext_len = usize::from(u16::from_be_bytes([l0, l1]));
        let Some(data) = extensions.get(4..4 + ext_len) else {
            return Parse::Rejected(Rejection::Malformed("extension longer than the hello"));
        };
        if ext_type == EXTENSION_SERVER_NAME {
            return server_name(data);
        }
        extensions = &extensions[4 + ext_len..];
    }
    Parse::Rejected(Rejection::NoSni)
}

fn server_name(data: &[u8]) -> Parse {
    let names = match parse_tls_extension_sni_content(data) {
        Ok(([], TlsExtension::SNI(names))) => names,
        _ => return Parse::Rejected(Rejection::Malformed("invalid server_name extension")),
    };
    let Some((_, raw)) = names.into_iter().find(|(kind, _)| *kind == SNIType::HostName) else {
        return Parse::Rejected(Rejection::NoSni);
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return Parse::Rejected(Rejection::Malformed("server name is not ASCII"));
    };
    match normalize_hostname(text) {
        Some(name) => Parse::Found(name),
        None => Parse::Rejected(Rejection::Malformed("server name is not a valid hostname")),
    }
}

/// A TLS alert record (fatal) with the given description code, suitable to
/// send back on a connection we refuse.
pub fn fatal_alert(description: AlertDescription) -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description as u8]
}

/// The TLS alert descriptions the server sends when it refuses a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AlertDescription {
    /// `unexpected_message` (10).
    UnexpectedMessage = 10,
    /// `handshake_failure` (40).
    HandshakeFailure = 40,
    /// `access_denied` (49).
    AccessDenied = 49,
    /// `decode_error` (50).
    DecodeError = 50,
    /// `internal_error` (80).
    InternalError = 80,
    /// `unrecognized_name` (112).
    UnrecognizedName = 112,
}

impl Rejection {
    /// The alert to send for this rejection, if the peer spoke TLS.
    pub fn alert(&self) -> Option<AlertDescription> {
        match self {
            Rejection::NotTls => None,
            Rejection::NotClientHello => Some(AlertDescription::UnexpectedMessage),
            Rejection::NoSni => Some(AlertDescription::UnrecognizedName),
            Rejection::Malformed(_) | Rejection::TooLarge => Some(AlertDescription::DecodeError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wraps a handshake body into one record.
    fn record(body: &[u8]) -> Vec<u8> {
        let mut out = vec![0x16, 0x03, 0x01];
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// A minimal ClientHello handshake message with the given extensions.
    fn hello_message(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(extensions);
        let mut msg = vec![0x01];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    fn sni_extension(name: &[u8]) -> Vec<u8> {
        let mut list = vec![0x00];
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
        let mut ext = vec![0x00, 0x00];
        ext.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    #[test]
    fn finds_sni_in_minimal_hello() {
        let wire = record(&hello_message(&sni_extension(b"A.Example.TEST")));
        assert_eq!(parse(&wire, DEFAULT_MAX_HELLO_BYTES), Parse::Found("a.example.test".into()));
        for end in 0..wire.len() {
            assert_eq!(parse(&wire[..end], DEFAULT_MAX_HELLO_BYTES), Parse::Incomplete, "prefix {end}");
        }
    }

    #[test]
    fn reassembles_across_records_of_any_split() {
        let mut ext = vec![0xfa, 0xfa, 0x00, 0x00]; // GREASE extension first
        ext.extend_from_slice(&[0x11, 0x11, 0x03, 0x00]);
        ext.extend_from_slice(&[0xab; 0x300]);
        ext.extend(sni_extension(b"split.example"));
        let msg = hello_message(&ext);
        for split in 1..msg.len() {
            let mut wire = record(&msg[..split]);
            wire.extend(record(&msg[split..]));
            assert_eq!(parse(&wire, DEFAULT_MAX_HELLO_BYTES), Parse::Found("split.example".into()), "split {split}");
        }
    }

    #[test]
    fn rejections() {
        let cap = DEFAULT_MAX_HELLO_BYTES;
        assert_eq!(parse(b"GET / HTTP/1.1\r\n", cap), Parse::Rejected(Rejection::NotTls));
        assert_eq!(parse(b"G", cap), Parse::Rejected(Rejection::NotTls));
        assert_eq!(parse(&[0x16, 0x02], cap), Parse::Rejected(Rejection::NotTls));
        assert_eq!(parse(&record(&[0x02, 0, 0, 0]), cap), Parse::Rejected(Rejection::NotClientHello));
        assert_eq!(parse(&record(&hello_message(&[])), cap), Parse::Rejected(Rejection::NoSni));
        assert_eq!(
            parse(&[0x16, 0x03, 0x01, 0x00, 0x00], cap),
            Parse::Rejected(Rejection::Malformed("empty handshake record"))
        );
        // Announces a 1 MiB hello: rejected before it arrives.
        assert_eq!(parse(&record(&[0x01, 0x10, 0x00, 0x00]), cap), Parse::Rejected(Rejection::TooLarge));
        // A valid hello larger than a small cap.
        let wire = record(&hello_message(&sni_extension(b"x.example")));
        assert_eq!(parse(&wire, 40), Parse::Rejected(Rejection::TooLarge));
        // Garbage extension block.
        let bad = record(&hello_message(&[0x00, 0x00, 0xff, 0xff]));
        assert!(matches!(parse(&bad, cap), Parse::Rejected(Rejection::Malformed(_))));
        // Invalid host name bytes.
        let bad = record(&hello_message(&sni_extension(b"a b")));
        assert!(matches!(parse(&bad, cap), Parse::Rejected(Rejection::Malformed(_))));
        // A change-cipher-spec record in the middle of a fragmented hello.
        let msg = hello_message(&sni_extension(b"x.example"));
        let mut wire = record(&msg[..10]);
        wire.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]);
        assert!(matches!(parse(&wire, cap), Parse::Rejected(Rejection::Malformed(_))));
    }

    #[test]
    fn never_panics_on_mutations() {
        let wire = record(&hello_message(&sni_extension(b"fuzz.example")));
        for i in 0..wire.len() {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut m = wire.clone();
                m[i] = v;
                let _ = parse(&m, DEFAULT_MAX_HELLO_BYTES);
                let _ = parse(&m[..i], DEFAULT_MAX_HELLO_BYTES);
            }
        }
    }
}
