//! PROXY protocol version 2 headers (binary), as sent by the agent to an
//! upstream so it sees the real client address.
//!
//! Only the `PROXY` command with TCP over IPv4 or IPv6 is produced. The parser
//! exists for tests and for upstreams written in Rust; the agent itself never
//! accepts a PROXY header from anyone.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Encodes a v2 `PROXY` header for a TCP connection from `client` to `local`.
///
/// When the two addresses are of different families, both are mapped to IPv6.
pub fn encode(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    match (client.ip(), local.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&to_v6(src).octets());
            out.extend_from_slice(&to_v6(dst).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Result of parsing the start of a stream for a v2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// Not a valid v2 header.
    Invalid,
    /// A header: client and local address (if `PROXY` over TCP), bytes used.
    Header {
        /// Source address, `None` for `LOCAL` or unsupported families.
        client: Option<SocketAddr>,
        /// Destination address, `None` for `LOCAL` or unsupported families.
        local: Option<SocketAddr>,
        /// Header length in bytes.
        len: usize,
    },
}

/// Parses a v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let n = buf.len().min(12);
    if buf[..n] != SIGNATURE[..n] {
        return Parsed::Invalid;
    }
    let Some(&[ver_cmd, fam, l0, l1]) = buf.get(12..16) else {
        return Parsed::Incomplete;
    };
    if ver_cmd >> 4 != 2 || ver_cmd & 0x0f > 1 {
        return Parsed::Invalid;
    }
    let len = 16 + usize::from(u16::from_be_bytes([l0, l1]));
    let Some(body) = buf.get(16..len) else {
        return Parsed::Incomplete;
    };
    let addrs = match (ver_cmd & 0x0f, fam) {
        (1, 0x11) if body.len() >= 12 => {
            let src: [u8; 4] = body[0..4].try_into().unwrap_or_default();
            let dst: [u8; 4] = body[4..8].try_into().unwrap_or_default();
            let sp = u16::from_be_bytes([body[8], body[9]]);
            let dp = u16::from_be_bytes([body[10], body[11]]);
            Some((SocketAddr::from((src, sp)), SocketAddr::from((dst, dp))))
        }
        (1, 0x21) if body.len() >= 36 => {
            let src: [u8; 16] = body[0..16].try_into().unwrap_or_default();
            let dst: [u8; 16] = body[16..32].try_into().unwrap_or_default();
            let sp = u16::from_be_bytes([body[32], body[33]]);
            let dp = u16::from_be_bytes([body[34], body[35]]);
            Some((SocketAddr::from((src, sp)), SocketAddr::from((dst, dp))))
        }
        (1, 0x11 | 0x21) => return Parsed::Invalid,
        _ => None,
    };
    Parsed::Header { client: addrs.map(|a| a.0), local: addrs.map(|a| a.1), len }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_v6_round_trip_with_prefixes() {
        for (c, l) in [("198.51.100.7:40000", "127.0.0.1:443"), ("[2001:db8::7]:40000", "[::1]:443")] {
            let (c, l): (SocketAddr, SocketAddr) = (c.parse().unwrap(), l.parse().unwrap());
            let wire = encode(c, l);
            for end in 0..wire.len() {
                assert_eq!(parse(&wire[..end]), Parsed::Incomplete);
            }
            assert_eq!(parse(&wire), Parsed::Header { client: Some(c), local: Some(l), len: wire.len() });
        }
    }

    #[test]
    fn mixed_families_map_to_v6() {
        let c: SocketAddr = "198.51.100.7:1".parse().unwrap();
        let l: SocketAddr = "[::1]:443".parse().unwrap();
        let Parsed::Header { client: Some(got), .. } = parse(&encode(c, l)) else { panic!() };
        assert_eq!(got.ip(), IpAddr::V6("::ffff:198.51.100.7".parse().unwrap()));
    }

    #[test]
    fn rejects_non_proxy_bytes() {
        assert_eq!(parse(b"GET / HTTP/1.1"), Parsed::Invalid);
    }
}
