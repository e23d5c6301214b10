//! How a QUIC client's UDP datagram crosses the tunnel (issue 17).
//!
//! The server carries each datagram of a QUIC client in one QUIC DATAGRAM
//! frame of the tunnel (RFC 9221), unreliable like the UDP it came in: the
//! client's and the node's QUIC stacks repair losses end to end, and
//! nothing waits behind a lost packet. The frame's payload is the client's
//! address, then the client's datagram unchanged:
//!
//! ```text
//! family (1 byte: 4 or 6) | address (4 or 16 bytes) | port (2 bytes, big-endian) | datagram
//! ```
//!
//! Down the tunnel the address is the client's source; up the tunnel it is
//! where the server sends the node's answer. An IPv4-mapped IPv6 address
//! is carried as IPv4, so both ends agree on one form of each client.
//!
//! A frame larger than the tunnel takes in a DATAGRAM frame now (a client
//! padding its Initials to 1,472 bytes over a 1452-byte tunnel path, or
//! any datagram before the tunnel's MTU discovery has raised its size
//! from 1200) crosses on a unidirectional tunnel stream of its own
//! instead, when both ends announced
//! [`crate::tunnel::CAPABILITY_QUIC_CLIENT_STREAMS`]: the byte
//! [`STREAM_KIND_DATAGRAM`], then the frame, then the stream's end. Such
//! streams are rare (first flights, the first second of a tunnel), so one
//! per datagram costs little, and the inner QUIC still repairs any the
//! sender gives up on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Bytes the header takes for an IPv4 client.
pub const HEADER_LEN_V4: usize = 1 + 4 + 2;
/// Bytes the header takes for an IPv6 client (the most it takes).
pub const HEADER_LEN_V6: usize = 1 + 16 + 2;

/// First byte of a unidirectional tunnel stream carrying one frame.
pub const STREAM_KIND_DATAGRAM: u8 = 0x01;

/// The largest client datagram carried on a stream (jumbo paths aside,
/// QUIC datagrams are at most about 1,500 bytes).
pub const MAX_STREAM_DATAGRAM: usize = 4096;

/// The most bytes a frame stream holds.
pub const MAX_STREAM_LEN: usize = 1 + HEADER_LEN_V6 + MAX_STREAM_DATAGRAM;

/// The frame a whole stream carried, checked: its kind byte, then a frame
/// of at most [`MAX_STREAM_DATAGRAM`] bytes of datagram.
pub fn stream_frame(stream: &[u8]) -> Result<&[u8], DatagramFrameError> {
    match stream.split_first() {
        Some((&STREAM_KIND_DATAGRAM, frame)) if stream.len() <= MAX_STREAM_LEN => {
            if decode(frame)?.1.len() > MAX_STREAM_DATAGRAM {
                return Err(DatagramFrameError::TooLong);
            }
            Ok(frame)
        }
        Some((&STREAM_KIND_DATAGRAM, _)) => Err(DatagramFrameError::TooLong),
        Some((&kind, _)) => Err(DatagramFrameError::StreamKind(kind)),
        None => Err(DatagramFrameError::Truncated),
    }
}

/// Why a tunnel datagram was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramFrameError {
    /// Fewer bytes than the header needs.
    #[error("tunnel datagram shorter than its address header")]
    Truncated,
    /// The family byte is neither 4 nor 6.
    #[error("tunnel datagram with unknown address family {0}")]
    Family(u8),
    /// The header is followed by nothing.
    #[error("tunnel datagram with no QUIC payload")]
    Empty,
    /// A frame stream longer than [`MAX_STREAM_LEN`], or with a datagram
    /// longer than [`MAX_STREAM_DATAGRAM`].
    #[error("tunnel frame stream over {MAX_STREAM_LEN} bytes or with a datagram over {MAX_STREAM_DATAGRAM}")]
    TooLong,
    /// A unidirectional tunnel stream of an unknown kind.
    #[error("tunnel stream of unknown kind {0}")]
    StreamKind(u8),
}

/// The one form of a client's address both ends use (IPv4-mapped IPv6
/// becomes IPv4).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Bytes of the header for `client`.
pub fn header_len(client: SocketAddr) -> usize {
    match canonical(client) {
        SocketAddr::V4(_) => HEADER_LEN_V4,
        SocketAddr::V6(_) => HEADER_LEN_V6,
    }
}

/// Appends the frame for `client` and `datagram` to `out`.
pub fn encode(client: SocketAddr, datagram: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN_V6 + datagram.len());
    match canonical(client) {
        SocketAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.ip().octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(datagram);
}

/// Reads a frame: the client's address and its datagram.
pub fn decode(frame: &[u8]) -> Result<(SocketAddr, &[u8]), DatagramFrameError> {
    let (&family, rest) = frame.split_first().ok_or(DatagramFrameError::Truncated)?;
    let (ip, rest) = match family {
        4 => {
            let (octets, rest) = split::<4>(rest)?;
            (IpAddr::V4(Ipv4Addr::from(octets)), rest)
        }
        6 => {
            let (octets, rest) = split::<16>(rest)?;
            (IpAddr::V6(Ipv6Addr::from(octets)), rest)
        }
        other => return Err(DatagramFrameError::Family(other)),
    };
    let (port, datagram) = split::<2>(rest)?;
    if datagram.is_empty() {
        return Err(DatagramFrameError::Empty);
    }
    Ok((canonical(SocketAddr::new(ip, u16::from_be_bytes(port))), datagram))
}

fn split<const N: usize>(bytes: &[u8]) -> Result<([u8; N], &[u8]), DatagramFrameError> {
    let head = bytes.get(..N).ok_or(DatagramFrameError::Truncated)?;
    let mut out = [0u8; N];
    out.copy_from_slice(head);
    Ok((out, &bytes[N..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(client: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(client.parse().unwrap(), payload, &mut out);
        out
    }

    #[test]
    fn round_trips_both_families() {
        for client in ["192.0.2.7:51000", "[2001:db8::5]:443"] {
            let bytes = frame(client, b"\xc0quic");
            assert_eq!(bytes.len(), header_len(client.parse().unwrap()) + 5);
            let (addr, datagram) = decode(&bytes).unwrap();
            assert_eq!(addr, client.parse().unwrap());
            assert_eq!(datagram, b"\xc0quic");
        }
    }

    #[test]
    fn mapped_addresses_travel_as_ipv4() {
        let bytes = frame("[::ffff:192.0.2.9]:7000", b"x");
        assert_eq!(bytes[0], 4);
        assert_eq!(bytes.len(), HEADER_LEN_V4 + 1);
        assert_eq!(decode(&bytes).unwrap().0, "192.0.2.9:7000".parse().unwrap());
    }

    #[test]
    fn every_prefix_is_an_error_not_a_panic() {
        for client in ["192.0.2.7:51000", "[2001:db8::5]:443"] {
            let bytes = frame(client, b"payload");
            let header = header_len(client.parse().unwrap());
            for end in 0..bytes.len() {
                let got = decode(&bytes[..end]);
                if end < header {
                    assert_eq!(got, Err(DatagramFrameError::Truncated), "prefix {end}");
                } else if end == header {
                    assert_eq!(got, Err(DatagramFrameError::Empty), "prefix {end}");
                } else {
                    assert_eq!(got.unwrap().1, &b"payload"[..end - header], "prefix {end}");
                }
            }
        }
    }

    #[test]
    fn unknown_family_is_refused() {
        let mut bytes = frame("192.0.2.7:1", b"x");
        bytes[0] = 5;
        assert_eq!(decode(&bytes), Err(DatagramFrameError::Family(5)));
    }

    #[test]
    fn frame_streams_are_checked_whole() {
        let client: SocketAddr = "192.0.2.7:4433".parse().unwrap();
        let mut frame = Vec::new();
        encode(client, &[0xc0; 1472], &mut frame);
        let mut stream = vec![STREAM_KIND_DATAGRAM];
        stream.extend_from_slice(&frame);
        assert_eq!(stream_frame(&stream), Ok(frame.as_slice()));
        assert_eq!(decode(stream_frame(&stream).unwrap()).unwrap().1.len(), 1472);
        assert_eq!(stream_frame(&[]), Err(DatagramFrameError::Truncated));
        assert_eq!(stream_frame(&[STREAM_KIND_DATAGRAM]), Err(DatagramFrameError::Truncated));
        assert_eq!(stream_frame(&[9, 4]), Err(DatagramFrameError::StreamKind(9)));
        let mut long = vec![STREAM_KIND_DATAGRAM];
        encode(client, &[0; MAX_STREAM_DATAGRAM + 1], &mut long);
        assert!(stream_frame(&long) == Err(DatagramFrameError::TooLong), "a datagram over the cap");
        long.truncate(1 + HEADER_LEN_V4 + MAX_STREAM_DATAGRAM);
        assert!(stream_frame(&long).is_ok(), "the largest IPv4 frame fits");
        let mut v6 = vec![STREAM_KIND_DATAGRAM];
        encode("[2001:db8::1]:1".parse().unwrap(), &[0; MAX_STREAM_DATAGRAM], &mut v6);
        assert_eq!(v6.len(), MAX_STREAM_LEN, "the largest IPv6 frame is the cap");
        assert!(stream_frame(&v6).is_ok());
        v6.push(0);
        assert!(stream_frame(&v6) == Err(DatagramFrameError::TooLong));
    }
}
