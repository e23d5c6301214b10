//! The zero-downtime upgrade's wire contract: what a running edge-server
//! and its successor (a new binary, possibly another version) say to each
//! other, how they share one UDP socket for QUIC, and what `edge-server
//! upgrade` says to the running server.
//!
//! - **Handover stream** (a Unix stream socket): length-prefixed JSON
//!   [`HandoverMessage`]s. The first, [`HandoverMessage::Offer`], carries
//!   the listening sockets as `SCM_RIGHTS` descriptors, in the order it lists
//!   them. Both sides check [`HANDOVER_VERSION`].
//! - **Shared QUIC socket**: both processes read the one UDP socket while
//!   the handover runs. Every connection ID a server issues carries its
//!   process epoch in the top bit of its first byte ([`mark_cid`]), so
//!   either process tells from a datagram's destination connection ID which
//!   process owns the connection ([`classify`]) and passes the other's
//!   datagrams over a Unix datagram socket ([`encode_forwarded`] /
//!   [`decode_forwarded`]). Datagrams that start connections go to the
//!   process that accepts them at the time.
//! - **Control socket** (`<data_dir>/edge-server.sock`): one JSON
//!   [`ControlRequest`] line from the CLI, then [`ControlEvent`] lines.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use serde::{Deserialize, Serialize};

/// Version of the handover protocol. A successor that does not speak the
/// predecessor's version fails the upgrade; the running server stays.
pub const HANDOVER_VERSION: u32 = 1;

/// Largest handover message (JSON body).
pub const MAX_HANDOVER_MESSAGE: usize = 64 * 1024;

/// Largest control-socket line.
pub const MAX_CONTROL_LINE: usize = 16 * 1024;

/// Length of every connection ID an edge-server issues.
pub const SERVER_CID_LEN: usize = 8;

/// What a listening socket handed over is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketRole {
    /// Public TLS (`listen.tls`).
    Tls,
    /// Plain HTTP (`listen.http`).
    Http,
    /// Signal API (`listen.api`).
    Api,
    /// Metrics (`listen.metrics`).
    Metrics,
    /// Admin dashboard and API (`listen.admin`).
    Admin,
    /// DNS over UDP (`dns.listen`).
    DnsUdp,
    /// DNS over TCP (`dns.listen`).
    DnsTcp,
    /// The QUIC socket for agents and peers (`listen.quic`).
    Quic,
    /// The UDP socket for QUIC clients (`listen.quic_clients`).
    QuicClients,
    /// The control socket `edge-server upgrade` talks to.
    Control,
    /// The successor's end of the datagram socket the two processes pass
    /// each other's QUIC datagrams over.
    QuicForward,
}

/// One socket of an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferedSocket {
    /// What it is for.
    pub role: SocketRole,
    /// The address it is bound to (none for Unix sockets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
}

/// Messages on the handover stream, in the order they are sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HandoverMessage {
    /// Predecessor → successor, with one descriptor per socket, in order.
    Offer {
        /// [`HANDOVER_VERSION`] of the predecessor.
        version: u32,
        /// The successor's QUIC epoch (0 or 1): the predecessor's flipped.
        epoch: u8,
        /// The predecessor's process id, for logs.
        predecessor_pid: u32,
        /// The sockets, in descriptor order.
        sockets: Vec<OfferedSocket>,
    },
    /// Successor → predecessor: it runs on the sockets (its QUIC endpoint,
    /// API, DNS), but takes no client connection yet.
    Ready {
        /// The successor's process id.
        pid: u32,
    },
    /// Predecessor → successor: the predecessor accepts no agent now (new
    /// QUIC connections go to the successor) and has told its agents to
    /// connect again; these are the nodes it holds tunnels to.
    AgentsMoving {
        /// Node names.
        nodes: Vec<String>,
    },
    /// Successor → predecessor: it holds tunnels to the nodes (or waited
    /// long enough) and accepts client connections now.
    TakeClients {
        /// Nodes of the list it has no tunnel to yet.
        missing: Vec<String>,
    },
    /// Predecessor → successor: it stopped accepting anything and its
    /// background jobs; its open connections drain, then it exits.
    Retired {
        /// Client connections still open on it.
        open_connections: u64,
    },
    /// Either side: the upgrade cannot go on (the sender says why). The
    /// predecessor keeps serving; a successor exits.
    Failed {
        /// Why.
        error: String,
    },
}

/// Errors of the handover and control formats.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A message is longer than its bound.
    #[error("message of {len} bytes exceeds the {max}-byte bound")]
    TooLong {
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A message is not the JSON it should be.
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    /// A forwarded datagram's header is cut short or invalid.
    #[error("malformed forwarded datagram")]
    BadForward,
}

/// Encodes `message` as a 4-byte big-endian length and its JSON.
pub fn encode_message(message: &HandoverMessage) -> Vec<u8> {
    let json = serde_json::to_vec(message).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// The body length a 4-byte prefix announces, checked against the bound.
pub fn message_len(prefix: [u8; 4]) -> Result<usize, HandoverError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_HANDOVER_MESSAGE {
        return Err(HandoverError::TooLong { len, max: MAX_HANDOVER_MESSAGE });
    }
    Ok(len)
}

/// Decodes a message body (after its length prefix).
pub fn decode_message(body: &[u8]) -> Result<HandoverMessage, HandoverError> {
    if body.len() > MAX_HANDOVER_MESSAGE {
        return Err(HandoverError::TooLong { len: body.len(), max: MAX_HANDOVER_MESSAGE });
    }
    Ok(serde_json::from_slice(body)?)
}

/// A request on the control socket (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Replace the running process by a new one started from `binary`
    /// (default: the path the running server was started from).
    Upgrade {
        /// The successor's executable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<String>,
    },
}

/// An answer line on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlEvent {
    /// A step of the work, for the operator.
    Progress {
        /// What happened.
        message: String,
    },
    /// The upgrade is done: the successor serves; the old process drains.
    Done {
        /// The successor's process id.
        pid: u32,
    },
    /// The upgrade failed; the running server keeps serving.
    Failed {
        /// Why.
        error: String,
    },
}

/// Parses one control line (without its newline), bounded.
pub fn parse_control_line<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, HandoverError> {
    if line.len() > MAX_CONTROL_LINE {
        return Err(HandoverError::TooLong { len: line.len(), max: MAX_CONTROL_LINE });
    }
    Ok(serde_json::from_slice(line)?)
}

/// Sets the epoch bit (the top bit of the first byte) of a connection ID's
/// first byte.
pub fn mark_cid(first: u8, epoch: u8) -> u8 {
    (first & 0x7f) | ((epoch & 1) << 7)
}

/// The epoch a connection ID's first byte carries.
pub fn cid_epoch(first: u8) -> u8 {
    first >> 7
}

/// Which process a datagram arriving on the shared QUIC socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// It may start a connection (a client's Initial or 0-RTT packet, or a
    /// version this server does not know): the accepting process takes it.
    Acceptor,
    /// It belongs to a connection of the process with this epoch.
    Epoch(u8),
    /// Not a QUIC packet anyone could route: the reader keeps it (and its
    /// QUIC stack drops it).
    Reader,
}

/// QUIC version 1 (RFC 9000).
const QUIC_V1: u32 = 1;
/// QUIC version 2 (RFC 9369).
const QUIC_V2: u32 = 0x6b33_43cf;

/// Classifies one datagram by its first packet's header (RFC 9000 §17;
/// coalesced packets share one destination connection ID). Only header
/// bytes are read; nothing is decrypted.
pub fn classify(datagram: &[u8]) -> Destination {
    let Some(&first) = datagram.first() else { return Destination::Reader };
    if first & 0x80 == 0 {
        // Short header: the destination connection ID follows the first
        // byte; its length is the one this server issues.
        return match datagram.get(1..1 + SERVER_CID_LEN) {
            Some(cid) => Destination::Epoch(cid_epoch(cid[0])),
            None => Destination::Reader,
        };
    }
    let Some(version) = datagram.get(1..5) else { return Destination::Reader };
    let version = u32::from_be_bytes([version[0], version[1], version[2], version[3]]);
    let Some(&dcid_len) = datagram.get(5) else { return Destination::Reader };
    let Some(dcid) = datagram.get(6..6 + dcid_len as usize) else { return Destination::Reader };
    let kind = (first >> 4) & 0x3;
    // Packet types that may carry a client-chosen destination ID.
    let opens = match version {
        // v1, and the drafts 29 to 34 quinn still speaks (same layout).
        QUIC_V1 | 0xff00_001d..=0xff00_0022 => kind == 0 || kind == 1,
        QUIC_V2 => kind == 1 || kind == 2,
        // Version negotiation (0) answers a connection this server opened;
        // other versions get a version negotiation from the acceptor.
        0 => false,
        _ => return Destination::Acceptor,
    };
    // A client's first destination ID is its own choice (quinn's are 20
    // bytes); one of this server's length is an answer to a connection it
    // opened, or a client that already learned this server's ID.
    if dcid.len() == SERVER_CID_LEN {
        return Destination::Epoch(cid_epoch(dcid[0]));
    }
    if opens {
        Destination::Acceptor
    } else {
        Destination::Reader
    }
}

/// Header of a datagram passed between the two processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// Where the datagram came from.
    pub source: SocketAddr,
    /// The local address it was sent to, when the kernel said.
    pub destination: Option<IpAddr>,
    /// Its ECN codepoint bits (0 for none).
    pub ecn: u8,
}

/// Length of the forwarded-datagram header.
pub const FORWARD_HEADER_LEN: usize = 1 + 16 + 2 + 4 + 1 + 16 + 1;

const FWD_V4: u8 = 4;
const FWD_V6: u8 = 6;
const DST_NONE: u8 = 0;

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.extend_from_slice(&v4.to_ipv6_mapped().octets());
        }
        IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
    }
}

/// Appends the header for `header` then `payload` to `out`.
pub fn encode_forwarded(header: &Forwarded, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(FORWARD_HEADER_LEN + payload.len());
    let (family, scope) = match header.source {
        SocketAddr::V4(_) => (FWD_V4, 0),
        SocketAddr::V6(v6) => (FWD_V6, v6.scope_id()),
    };
    out.push(family);
    put_ip(out, header.source.ip());
    out.extend_from_slice(&header.source.port().to_be_bytes());
    out.extend_from_slice(&scope.to_be_bytes());
    match header.destination {
        None => {
            out.push(DST_NONE);
            out.extend_from_slice(&[0; 16]);
        }
        Some(ip) => {
            out.push(if ip.is_ipv4() { FWD_V4 } else { FWD_V6 });
            put_ip(out, ip);
        }
    }
    out.push(header.ecn & 0x3);
    out.extend_from_slice(payload);
}

fn get_ip(family: u8, bytes: &[u8]) -> Option<IpAddr> {
    let octets: [u8; 16] = bytes.try_into().ok()?;
    let v6 = Ipv6Addr::from(octets);
    match family {
        FWD_V4 => v6.to_ipv4_mapped().map(IpAddr::V4),
        FWD_V6 => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

/// Splits a forwarded datagram into its header and payload.
pub fn decode_forwarded(bytes: &[u8]) -> Result<(Forwarded, &[u8]), HandoverError> {
    if bytes.len() < FORWARD_HEADER_LEN {
        return Err(HandoverError::BadForward);
    }
    let family = bytes[0];
    let ip = get_ip(family, &bytes[1..17]).ok_or(HandoverError::BadForward)?;
    let port = u16::from_be_bytes([bytes[17], bytes[18]]);
    let scope = u32::from_be_bytes([bytes[19], bytes[20], bytes[21], bytes[22]]);
    let source = match ip {
        IpAddr::V4(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
        IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, scope)),
    };
    let destination = match bytes[23] {
        DST_NONE => None,
        family => Some(get_ip(family, &bytes[24..40]).ok_or(HandoverError::BadForward)?),
    };
    let ecn = bytes[40];
    if ecn > 3 {
        return Err(HandoverError::BadForward);
    }
    Ok((Forwarded { source, destination, ecn }, &bytes[FORWARD_HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn short(cid0: u8) -> Vec<u8> {
        let mut d = vec![0x40, cid0, 1, 2, 3, 4, 5, 6, 7];
        d.extend_from_slice(&[0xaa; 30]);
        d
    }

    fn long(first: u8, version: u32, dcid: &[u8]) -> Vec<u8> {
        let mut d = vec![first];
        d.extend_from_slice(&version.to_be_bytes());
        d.push(dcid.len() as u8);
        d.extend_from_slice(dcid);
        d.push(8);
        d.extend_from_slice(&[9; 8]);
        d.extend_from_slice(&[0; 20]);
        d
    }

    #[test]
    fn the_epoch_bit_round_trips_and_keeps_the_rest() {
        for first in [0u8, 0x7f, 0x80, 0xff, 0x35] {
            for epoch in [0u8, 1] {
                let marked = mark_cid(first, epoch);
                assert_eq!(cid_epoch(marked), epoch);
                assert_eq!(marked & 0x7f, first & 0x7f);
            }
        }
    }

    #[test]
    fn short_headers_go_by_the_epoch_of_their_connection_id() {
        assert_eq!(classify(&short(mark_cid(0x12, 0))), Destination::Epoch(0));
        assert_eq!(classify(&short(mark_cid(0x12, 1))), Destination::Epoch(1));
        // Too short to hold a connection ID.
        assert_eq!(classify(&[0x40, 0x80, 1]), Destination::Reader);
        assert_eq!(classify(&[]), Destination::Reader);
    }

    #[test]
    fn client_initials_go_to_the_acceptor_and_answers_by_epoch() {
        // A client's Initial (v1 type 0) with its own 20-byte ID.
        assert_eq!(classify(&long(0xc0, QUIC_V1, &[0x80; 20])), Destination::Acceptor);
        // 0-RTT (v1 type 1).
        assert_eq!(classify(&long(0xd0, QUIC_V1, &[0x01; 20])), Destination::Acceptor);
        // v2's Initial is type 1.
        assert_eq!(classify(&long(0xd0, QUIC_V2, &[0x01; 20])), Destination::Acceptor);
        // A Handshake packet (v1 type 2) to one of our IDs.
        assert_eq!(classify(&long(0xe0, QUIC_V1, &[mark_cid(3, 1); 8])), Destination::Epoch(1));
        // An Initial answering a connection we opened carries our ID.
        assert_eq!(classify(&long(0xc0, QUIC_V1, &[mark_cid(3, 0); 8])), Destination::Epoch(0));
        // Draft 29's Handshake to one of our IDs, and its Initial.
        assert_eq!(classify(&long(0xe0, 0xff00_001d, &[mark_cid(3, 1); 8])), Destination::Epoch(1));
        assert_eq!(classify(&long(0xc0, 0xff00_001d, &[3; 20])), Destination::Acceptor);
        // An unknown version goes to the acceptor (version negotiation).
        assert_eq!(classify(&long(0xc0, 0x0a0a_0a0a, &[0; 20])), Destination::Acceptor);
        // Version negotiation to one of our IDs, and one that is not.
        assert_eq!(classify(&long(0x80, 0, &[mark_cid(0, 1); 8])), Destination::Epoch(1));
        assert_eq!(classify(&long(0x80, 0, &[0; 20])), Destination::Reader);
        // Cut short anywhere in the header.
        let full = long(0xe0, QUIC_V1, &[mark_cid(3, 1); 8]);
        for n in 0..14 {
            assert_eq!(classify(&full[..n]), Destination::Reader, "{n}");
        }
    }

    #[test]
    fn forwarded_datagrams_round_trip_every_address_kind() {
        let cases = [
            Forwarded { source: "192.0.2.7:4433".parse().unwrap(), destination: None, ecn: 0 },
            Forwarded {
                source: "[2001:db8::1]:9".parse().unwrap(),
                destination: Some("2001:db8::2".parse().unwrap()),
                ecn: 3,
            },
            Forwarded {
                source: "127.0.0.1:1".parse().unwrap(),
                destination: Some("127.0.0.2".parse().unwrap()),
                ecn: 2,
            },
            Forwarded {
                source: SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 5, 0, 7)),
                destination: Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                ecn: 1,
            },
        ];
        for case in cases {
            let mut out = Vec::new();
            encode_forwarded(&case, b"payload", &mut out);
            let (header, payload) = decode_forwarded(&out).unwrap();
            assert_eq!(header, case);
            assert_eq!(payload, b"payload");
            // Every prefix short of the header is refused, not misread.
            for n in 0..FORWARD_HEADER_LEN {
                assert!(decode_forwarded(&out[..n]).is_err(), "prefix {n}");
            }
        }
        let mut bad = Vec::new();
        encode_forwarded(&cases[0], b"", &mut bad);
        bad[0] = 9;
        assert!(decode_forwarded(&bad).is_err());
        bad[0] = FWD_V4;
        bad[40] = 7;
        assert!(decode_forwarded(&bad).is_err());
    }

    #[test]
    fn messages_round_trip_and_unknown_fields_fail() {
        let offer = HandoverMessage::Offer {
            version: HANDOVER_VERSION,
            epoch: 1,
            predecessor_pid: 42,
            sockets: vec![
                OfferedSocket { role: SocketRole::Tls, addr: Some("127.0.0.1:443".parse().unwrap()) },
                OfferedSocket { role: SocketRole::Control, addr: None },
            ],
        };
        let bytes = encode_message(&offer);
        let len = message_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(decode_message(&bytes[4..]).unwrap(), offer);
        assert!(decode_message(br#"{"type":"ready","pid":1,"extra":2}"#).is_err());
        assert!(message_len((MAX_HANDOVER_MESSAGE as u32 + 1).to_be_bytes()).is_err());
        let request: ControlRequest = parse_control_line(br#"{"type":"upgrade"}"#).unwrap();
        assert_eq!(request, ControlRequest::Upgrade { binary: None });
        assert!(parse_control_line::<ControlRequest>(&vec![b' '; MAX_CONTROL_LINE + 1]).is_err());
        let done = serde_json::to_string(&ControlEvent::Done { pid: 7 }).unwrap();
        assert_eq!(parse_control_line::<ControlEvent>(done.as_bytes()).unwrap(), ControlEvent::Done { pid: 7 });
    }
}
