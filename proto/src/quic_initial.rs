//! Sans-IO reader for the server name in a QUIC client's Initial packets.
//!
//! A QUIC client's first flight carries its TLS ClientHello in CRYPTO
//! frames inside Initial packets. Their keys derive from the client's
//! Destination Connection ID and a salt published in the RFC (RFC 9001
//! §5.2, RFC 9369 §3.3.1), so anyone can read them: this module derives
//! them, removes header protection, decrypts only Initial packets,
//! reassembles the CRYPTO stream and hands the ClientHello to
//! [`crate::client_hello`]. It never sees anything else of the session.
//!
//! - [`classify`] looks at a datagram's first header without any crypto.
//! - [`InitialSni`] holds one client connection's reassembly: feed it every
//!   datagram the client sends for that Destination Connection ID, in any
//!   order, duplicated or not, until it answers [`Progress::Found`].
//! - [`version_negotiation`] answers a long header of an unknown version.
//!
//! A post-quantum ClientHello (X25519MLKEM768) is about 1.8 KB and spans
//! two or three Initial packets; clients such as Chromium also scatter the
//! CRYPTO frames of one packet out of order. Datagrams are never modified:
//! the caller forwards them as they came.

use crate::client_hello::{self, Parse, Rejection};

/// RFC 9000 §14.1: a client's datagram carrying an Initial packet is at
/// least this long; shorter ones are dropped (amplification protection).
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
/// RFC 9000 §17.2: connection IDs in version 1 are at most 20 bytes.
pub const MAX_CID_LEN: usize = 20;
/// Default cap on the CRYPTO bytes reassembled.
pub const DEFAULT_MAX_CRYPTO_BYTES: usize = client_hello::DEFAULT_MAX_HELLO_BYTES;
/// Initial packets accepted per connection before giving up: a hello of
/// 16 KiB needs about 14, and retransmissions repeat them.
pub const MAX_INITIAL_PACKETS: usize = 32;

/// Separate pieces of CRYPTO data held at once before giving up.
pub const MAX_CRYPTO_GAPS: usize = 64;

const VERSION_1: u32 = 0x0000_0001;
const VERSION_2: u32 = 0x6b33_43cf;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

/// QUIC versions whose Initial packets this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// RFC 9000.
    V1,
    /// RFC 9369.
    V2,
}

impl Version {
    /// The version for a wire value, if supported.
    pub fn from_wire(value: u32) -> Option<Self> {
        match value {
            VERSION_1 => Some(Self::V1),
            VERSION_2 => Some(Self::V2),
            _ => None,
        }
    }

    /// The wire value.
    pub fn wire(self) -> u32 {
        match self {
            Self::V1 => VERSION_1,
            Self::V2 => VERSION_2,
        }
    }

    /// The long-header type bits (0x30 of the first byte) of an Initial.
    fn initial_type(self) -> u8 {
        match self {
            Self::V1 => 0b00,
            Self::V2 => 0b01,
        }
    }

    /// The long-header type bits of a Retry.
    fn retry_type(self) -> u8 {
        match self {
            Self::V1 => 0b11,
            Self::V2 => 0b00,
        }
    }

    fn rustls(self) -> rustls::quic::Version {
        match self {
            Self::V1 => rustls::quic::Version::V1,
            Self::V2 => rustls::quic::Version::V2,
        }
    }
}

/// The invariant fields of a long header (RFC 8999 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongHeader<'a> {
    /// The version field.
    pub version: u32,
    /// Destination Connection ID.
    pub dcid: &'a [u8],
    /// Source Connection ID.
    pub scid: &'a [u8],
}

/// What the first packet of a datagram is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// An Initial packet of a supported version.
    Initial(Version, LongHeader<'a>),
    /// Another long-header packet of a supported version (0-RTT,
    /// Handshake, Retry).
    OtherLong(Version, LongHeader<'a>),
    /// A long header of a version this reader does not speak (0 is a
    /// Version Negotiation packet).
    UnknownVersion(LongHeader<'a>),
    /// A short-header packet: the bytes after the first one start with the
    /// Destination Connection ID, whose length only its issuer knows.
    Short(&'a [u8]),
}

/// Why a datagram is dropped without touching any state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Empty, or too short for the header it starts.
    #[error("truncated QUIC header")]
    Truncated,
    /// The fixed bit (0x40) is clear: not QUIC v1 or v2 at all.
    #[error("QUIC fixed bit is clear")]
    NotQuic,
    /// A connection ID is longer than 20 bytes.
    #[error("connection ID longer than 20 bytes")]
    ConnectionIdTooLong,
    /// An Initial in a datagram shorter than 1200 bytes.
    #[error("Initial packet in a datagram of {0} bytes (at least 1200 required)")]
    TooSmall(usize),
    /// A length field is not a valid variable-length integer, or points
    /// past the datagram.
    #[error("bad length in QUIC long header")]
    BadLength,
    /// No Initial packet for this connection decrypted in the datagram.
    #[error("no authentic Initial packet for this connection in the datagram")]
    NoInitial,
}

/// Why a client connection cannot be routed. Final: feed no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// The ClientHello itself was rejected.
    #[error("{0}")]
    Hello(Rejection),
    /// A frame an Initial packet may not carry (RFC 9000 §12.4), or a
    /// truncated one.
    #[error("invalid frame in Initial packet: {0}")]
    Frame(&'static str),
    /// The CRYPTO stream goes beyond the cap.
    #[error("CRYPTO data beyond the size cap")]
    TooLarge,
    /// More Initial packets than [`MAX_INITIAL_PACKETS`] without a hello.
    #[error("too many Initial packets without a complete ClientHello")]
    TooManyPackets,
}

impl Reject {
    /// A short stable label, used in logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reject::Hello(r) => r.label(),
            Reject::Frame(_) => "bad_frame",
            Reject::TooLarge => "too_large",
            Reject::TooManyPackets => "too_many_packets",
        }
    }
}

/// What a connection's datagrams say so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Part of the ClientHello is still missing.
    NeedMore,
    /// The complete ClientHello names this server (lowercased).
    Found(String),
    /// The connection cannot be routed.
    Rejected(Reject),
}

/// Reads a variable-length integer (RFC 9000 §16) at the start of `buf`:
/// the value and its length.
pub fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut value = u64::from(first & 0x3f);
    for &b in &bytes[1..] {
        value = (value << 8) | u64::from(b);
    }
    Some((value, len))
}

/// Looks at the first packet of `datagram`, without decrypting anything.
pub fn classify(datagram: &[u8]) -> Result<Packet<'_>, DatagramError> {
    let &first = datagram.first().ok_or(DatagramError::Truncated)?;
    if first & 0x80 == 0 {
        if first & 0x40 == 0 {
            return Err(DatagramError::NotQuic);
        }
        return Ok(Packet::Short(&datagram[1..]));
    }
    let (header, _) = long_header(datagram)?;
    let Some(version) = Version::from_wire(header.version) else {
        return Ok(Packet::UnknownVersion(header));
    };
    if first & 0x40 == 0 {
        return Err(DatagramError::NotQuic);
    }
    if (first >> 4) & 0b11 == version.initial_type() {
        Ok(Packet::Initial(version, header))
    } else {
        Ok(Packet::OtherLong(version, header))
    }
}

/// The invariant long header and the offset just past it.
fn long_header(packet: &[u8]) -> Result<(LongHeader<'_>, usize), DatagramError> {
    let version = packet.get(1..5).ok_or(DatagramError::Truncated)?;
    let version = u32::from_be_bytes([version[0], version[1], version[2], version[3]]);
    let mut at = 5;
    let cid = |at: &mut usize| -> Result<&[u8], DatagramError> {
        let len = usize::from(*packet.get(*at).ok_or(DatagramError::Truncated)?);
        // Unknown versions may use longer IDs (RFC 8999 allows 255); a
        // version this reader speaks may not.
        if len > MAX_CID_LEN && Version::from_wire(version).is_some() {
            return Err(DatagramError::ConnectionIdTooLong);
        }
        let id = packet.get(*at + 1..*at + 1 + len).ok_or(DatagramError::Truncated)?;
        *at += 1 + len;
        Ok(id)
    };
    let dcid = cid(&mut at)?;
    let scid = cid(&mut at)?;
    Ok((LongHeader { version, dcid, scid }, at))
}

/// The Version Negotiation packet answering `datagram`, when its first
/// packet is a long header of a version this reader does not speak and the
/// datagram is large enough to answer without amplification (RFC 9000
/// §6.1). `unused` fills the first byte's seven free bits.
pub fn version_negotiation(datagram: &[u8], unused: u8) -> Option<Vec<u8>> {
    if datagram.len() < MIN_INITIAL_DATAGRAM {
        return None;
    }
    let Ok(Packet::UnknownVersion(header)) = classify(datagram) else {
        return None;
    };
    // Never answer a Version Negotiation packet (version 0), and keep to
    // IDs a version-1 endpoint could have sent.
    if header.version == 0 || header.dcid.len() > MAX_CID_LEN || header.scid.len() > MAX_CID_LEN {
        return None;
    }
    let mut out = Vec::with_capacity(7 + header.dcid.len() + header.scid.len() + 8);
    out.push(0xc0 | (unused & 0x3f));
    out.extend_from_slice(&0u32.to_be_bytes());
    // The client's Source Connection ID becomes the Destination, and back.
    out.push(header.scid.len() as u8);
    out.extend_from_slice(header.scid);
    out.push(header.dcid.len() as u8);
    out.extend_from_slice(header.dcid);
    out.extend_from_slice(&VERSION_1.to_be_bytes());
    out.extend_from_slice(&VERSION_2.to_be_bytes());
    Some(out)
}

/// One client connection's CRYPTO stream, reassembled from its Initials.
pub struct InitialSni {
    version: Version,
    dcid: Vec<u8>,
    keys: rustls::quic::DirectionalKeys,
    crypto: CryptoStream,
    largest_pn: Option<u64>,
    packets: usize,
    done: Option<Progress>,
}

impl std::fmt::Debug for InitialSni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitialSni")
            .field("version", &self.version)
            .field("dcid_len", &self.dcid.len())
            .field("crypto_bytes", &self.crypto.received())
            .field("packets", &self.packets)
            .field("done", &self.done)
            .finish()
    }
}

impl InitialSni {
    /// A reader for the connection whose Initials carry `dcid`, keeping at
    /// most `max_crypto_bytes` of CRYPTO data.
    pub fn new(version: Version, dcid: &[u8], max_crypto_bytes: usize) -> Self {
        let suite = match rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256 {
            rustls::SupportedCipherSuite::Tls13(suite) => suite,
            rustls::SupportedCipherSuite::Tls12(_) => unreachable!("a TLS 1.3 suite"),
        };
        // RFC 9001 §5.2: Initial packets always use AES-128-GCM.
        let quic = suite.quic_suite().expect("TLS13_AES_128_GCM_SHA256 supports QUIC");
        // The server's view: `remote` decrypts what the client sends.
        let keys = quic.keys(dcid, rustls::Side::Server, version.rustls()).remote;
        Self {
            version,
            dcid: dcid.to_vec(),
            keys,
            crypto: CryptoStream::new(max_crypto_bytes),
            largest_pn: None,
            packets: 0,
            done: None,
        }
    }

    /// The version of the connection.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Reads the Initial packets of one datagram the client sent. An error
    /// means the datagram was dropped and nothing changed; once the answer
    /// is `Found` or `Rejected`, it stays so.
    pub fn feed(&mut self, datagram: &[u8]) -> Result<Progress, DatagramError> {
        if let Some(done) = &self.done {
            return Ok(done.clone());
        }
        if datagram.len() < MIN_INITIAL_DATAGRAM {
            return Err(DatagramError::TooSmall(datagram.len()));
        }
        let mut rest = datagram;
        let mut read_any = false;
        let mut frames: Result<(), Reject> = Ok(());
        while !rest.is_empty() {
            let packet = match self.next_packet(rest) {
                Ok(packet) => packet,
                // The first packet's header decides the datagram's fate;
                // junk after a packet (padding) just ends it.
                Err(e) if rest.len() == datagram.len() => return Err(e),
                Err(_) => break,
            };
            let Some(NextPacket { len, pn_at, initial_for_us }) = packet else {
                break;
            };
            let bytes = &rest[..len];
            rest = &rest[len..];
            if !initial_for_us {
                continue; // 0-RTT, or another connection's: not ours to read.
            }
            let Some((pn, payload)) = self.open(bytes, pn_at) else {
                continue; // Failed authentication: dropped, as RFC 9001 says.
            };
            read_any = true;
            self.packets += 1;
            if self.packets > MAX_INITIAL_PACKETS {
                return Ok(self.finish(Progress::Rejected(Reject::TooManyPackets)));
            }
            self.largest_pn = Some(self.largest_pn.map_or(pn, |l| l.max(pn)));
            if let Err(reject) = self.crypto.read_frames(&payload) {
                frames = Err(reject);
                break;
            }
        }
        if !read_any {
            return Err(DatagramError::NoInitial);
        }
        let progress = match frames {
            Err(reject) => Progress::Rejected(reject),
            Ok(()) => self.crypto.hello(),
        };
        if matches!(progress, Progress::NeedMore) && self.packets >= MAX_INITIAL_PACKETS {
            return Ok(self.finish(Progress::Rejected(Reject::TooManyPackets)));
        }
        Ok(self.finish(progress))
    }

    /// Frames the long-header packet at the start of `rest`; `None` for a
    /// short header or another version, which run to the datagram's end.
    fn next_packet(&self, rest: &[u8]) -> Result<Option<NextPacket>, DatagramError> {
        let first = rest[0];
        if first & 0x80 == 0 {
            return Ok(None);
        }
        let (header, after_header) = long_header(rest)?;
        if Version::from_wire(header.version) != Some(self.version) {
            return Ok(None);
        }
        let initial = (first >> 4) & 0b11 == self.version.initial_type();
        let length_at = if initial {
            let (token_len, n) = rest.get(after_header..).and_then(read_varint).ok_or(DatagramError::BadLength)?;
            let token_len = usize::try_from(token_len).map_err(|_| DatagramError::BadLength)?;
            (after_header + n).checked_add(token_len).ok_or(DatagramError::BadLength)?
        } else if (first >> 4) & 0b11 == self.version.retry_type() {
            // A Retry has no length field (it fills the datagram), and a
            // client never sends one.
            return Ok(None);
        } else {
            after_header
        };
        let (length, n) = rest.get(length_at..).and_then(read_varint).ok_or(DatagramError::BadLength)?;
        let pn_at = length_at + n;
        let len = usize::try_from(length).ok().and_then(|l| pn_at.checked_add(l)).ok_or(DatagramError::BadLength)?;
        if len > rest.len() {
            return Err(DatagramError::BadLength);
        }
        Ok(Some(NextPacket { len, pn_at, initial_for_us: initial && header.dcid == self.dcid.as_slice() }))
    }

    fn finish(&mut self, progress: Progress) -> Progress {
        if !matches!(progress, Progress::NeedMore) {
            self.done = Some(progress.clone());
        }
        progress
    }

    /// Removes header protection from a copy of `packet` and decrypts it:
    /// the full packet number and the plaintext payload.
    fn open(&self, packet: &[u8], pn_at: usize) -> Option<(u64, Vec<u8>)> {
        let sample_at = pn_at + 4;
        let sample = packet.get(sample_at..sample_at + self.keys.header.sample_len())?;
        let mut first = packet[0];
        let mut pn_bytes = [0u8; 4];
        pn_bytes.copy_from_slice(packet.get(pn_at..pn_at + 4)?);
        self.keys.header.decrypt_in_place(sample, &mut first, &mut pn_bytes).ok()?;
        let pn_len = usize::from(first & 0x03) + 1;
        let mut truncated = 0u64;
        for &b in &pn_bytes[..pn_len] {
            truncated = (truncated << 8) | u64::from(b);
        }
        let pn = decode_packet_number(self.largest_pn, truncated, pn_len);
        let mut header = packet[..pn_at + pn_len].to_vec();
        header[0] = first;
        header[pn_at..].copy_from_slice(&pn_bytes[..pn_len]);
        let mut payload = packet[pn_at + pn_len..].to_vec();
        let len = self.keys.packet.decrypt_in_place(pn, &header, &mut payload).ok()?.len();
        payload.truncate(len);
        Some((pn, payload))
    }
}

/// The CRYPTO stream of a client's Initial packets, from their decrypted
/// payloads: frames walked, data reassembled at its offsets, and the
/// ClientHello parsed once all of it is there.
#[derive(Debug)]
pub struct CryptoStream {
    data: Reassembly,
}

impl CryptoStream {
    /// A stream keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self { data: Reassembly::new(cap) }
    }

    /// Bytes received from offset 0 without a gap.
    pub fn received(&self) -> usize {
        self.data.contiguous().len()
    }

    /// Walks the frames of a decrypted Initial payload (RFC 9000 §12.4:
    /// PADDING, PING, ACK, CRYPTO and CONNECTION_CLOSE only).
    pub fn read_frames(&mut self, mut payload: &[u8]) -> Result<(), Reject> {
        if payload.is_empty() {
            return Err(Reject::Frame("empty packet"));
        }
        let bad = |why| Reject::Frame(why);
        while !payload.is_empty() {
            let (kind, n) = read_varint(payload).ok_or(bad("truncated frame type"))?;
            payload = &payload[n..];
            match kind {
                0x00 | 0x01 => {} // PADDING, PING
                0x02 | 0x03 => payload = skip_ack(payload, kind == 0x03).ok_or(bad("truncated ACK"))?,
                0x06 => {
                    let (offset, n) = read_varint(payload).ok_or(bad("truncated CRYPTO"))?;
                    let (len, m) = read_varint(&payload[n..]).ok_or(bad("truncated CRYPTO"))?;
                    let end = usize::try_from(len).ok().and_then(|len| (n + m).checked_add(len));
                    let end = end.ok_or(bad("CRYPTO length"))?;
                    let data = payload.get(n + m..end).ok_or(bad("CRYPTO longer than the packet"))?;
                    self.data.insert(offset, data)?;
                    payload = &payload[end..];
                }
                0x1c => return Ok(()), // CONNECTION_CLOSE: the rest is the close's.
                _ => return Err(bad("frame type not allowed in an Initial packet")),
            }
        }
        Ok(())
    }

    /// Parses the ClientHello once the CRYPTO stream holds all of it.
    pub fn hello(&self) -> Progress {
        let stream = self.data.contiguous();
        let Some(&[kind, l0, l1, l2]) = stream.get(..4) else {
            return Progress::NeedMore;
        };
        if kind != HANDSHAKE_CLIENT_HELLO {
            return Progress::Rejected(Reject::Hello(Rejection::NotClientHello));
        }
        let len = 4 + (usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2));
        if len > self.data.cap {
            return Progress::Rejected(Reject::TooLarge);
        }
        match stream.get(..len) {
            None => Progress::NeedMore,
            Some(message) => match client_hello::parse_handshake_message(message) {
                Parse::Found(name) => Progress::Found(name),
                Parse::Rejected(r) => Progress::Rejected(Reject::Hello(r)),
                Parse::Incomplete => Progress::NeedMore,
            },
        }
    }
}

/// One long-header packet's framing within a datagram.
struct NextPacket {
    /// Bytes of the packet.
    len: usize,
    /// Offset of the (protected) packet number.
    pn_at: usize,
    /// An Initial with this connection's Destination Connection ID.
    initial_for_us: bool,
}

/// Skips an ACK frame's body (after its type).
fn skip_ack(mut buf: &[u8], ecn: bool) -> Option<&[u8]> {
    let next = |buf: &mut &[u8]| -> Option<u64> {
        let (v, n) = read_varint(buf)?;
        *buf = &buf[n..];
        Some(v)
    };
    next(&mut buf)?; // largest acknowledged
    next(&mut buf)?; // delay
    let ranges = next(&mut buf)?;
    next(&mut buf)?; // first range
                     // Each further range is two varints of at least one byte.
    if ranges > buf.len() as u64 / 2 {
        return None;
    }
    for _ in 0..ranges * 2 {
        next(&mut buf)?;
    }
    if ecn {
        for _ in 0..3 {
            next(&mut buf)?;
        }
    }
    Some(buf)
}

/// RFC 9000 §A.3: the full packet number closest to the next expected.
pub fn decode_packet_number(largest: Option<u64>, truncated: u64, len: usize) -> u64 {
    // Packet numbers stay below 2^62 (RFC 9000 §12.3).
    let expected = largest.map_or(0, |l| l.min((1 << 62) - 1) + 1);
    let bits = 8 * len as u32;
    let window = 1u64 << bits;
    let half = window / 2;
    let mask = window - 1;
    let candidate = (expected & !mask) | truncated;
    if candidate + half <= expected && candidate < (1u64 << 62) - window {
        candidate + window
    } else if candidate > expected + half && candidate >= window {
        candidate - window
    } else {
        candidate
    }
}

/// A byte stream received at arbitrary offsets, with its contiguous prefix.
#[derive(Debug)]
struct Reassembly {
    data: Vec<u8>,
    /// Received ranges, sorted and merged.
    ranges: Vec<(usize, usize)>,
    cap: usize,
}

impl Reassembly {
    fn new(cap: usize) -> Self {
        Self { data: Vec::new(), ranges: Vec::new(), cap }
    }

    fn insert(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Reject> {
        let start = usize::try_from(offset).map_err(|_| Reject::TooLarge)?;
        let end = start.checked_add(bytes.len()).ok_or(Reject::TooLarge)?;
        if end > self.cap {
            return Err(Reject::TooLarge);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(bytes);
        self.ranges.push((start, end));
        self.ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
        // Gaps cost a sort per frame: a client scatters a few frames, a
        // hostile one thousands of one-byte pieces.
        if self.ranges.len() > MAX_CRYPTO_GAPS {
            return Err(Reject::Frame("CRYPTO data in too many pieces"));
        }
        Ok(())
    }

    fn contiguous(&self) -> &[u8] {
        match self.ranges.first() {
            Some(&(0, end)) => &self.data[..end],
            _ => &[],
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
