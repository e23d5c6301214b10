//! The tunnel protocol spoken over QUIC between `edge-server` and `edge-agent`.
//!
//! See `docs/protocol.md` for the prose description. In short:
//!
//! - ALPN [`ALPN`] (`edge-tunnel/1`); the version is part of the ALPN so an
//!   incompatible peer fails the handshake instead of misreading frames.
//! - The agent opens the first bidirectional stream, the **control stream**.
//!   Each frame is a big-endian `u32` length followed by one JSON message
//!   ([`AgentMessage`] up, [`ServerMessage`] down), at most
//!   [`MAX_CONTROL_FRAME`] bytes.
//! - For every client connection the server opens a new bidirectional
//!   **data stream**: a big-endian `u16` length, a JSON [`StreamHeader`] of at
//!   most [`MAX_STREAM_HEADER`] bytes, then the client's raw bytes, starting
//!   with the replayed ClientHello. The agent never opens data streams.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// ALPN of the tunnel protocol, version 1.
pub const ALPN: &[u8] = b"edge-tunnel/1";
/// ALPN of server-to-server connections in a cluster: the dialing server
/// opens one bidirectional stream per client connection it forwards, in
/// the data-stream format ([`StreamHeader`], then the raw bytes), and the
/// peer places it on its own tunnel to the node. Both ends present their
/// identity certificate; each checks the other's fingerprint against the
/// store's list of live servers.
pub const PEER_ALPN: &[u8] = b"edge-peer/1";
/// Capability an agent sends in its hello when it follows the cluster:
/// the welcome then lists the live servers, and [`ServerMessage::Servers`]
/// tells of changes.
pub const CAPABILITY_CLUSTER: &str = "cluster";
/// Capability an agent sends when it understands [`ServerMessage::Handover`]
/// (older agents get [`ServerMessage::Draining`] and reconnect after the drain).
pub const CAPABILITY_HANDOVER: &str = "handover";
/// Capability an agent sends when it reports its routes
/// ([`AgentMessage::Routes`]); a server that accepts them lists it back in
/// the welcome's `capabilities`.
pub const CAPABILITY_ROUTES: &str = "routes";
/// Capability an agent sends when it serves raw TCP services (data streams
/// whose header names a `service`).
pub const CAPABILITY_SERVICES: &str = "services";
/// Capability an agent sends when it serves customers' own domains: the
/// server then sends [`ServerMessage::Domains`] (older agents would refuse
/// the message).
pub const CAPABILITY_DOMAINS: &str = "domains";
/// Capability an agent sends when it answers TLS-ALPN-01 validations on
/// the server's word ([`ServerMessage::AcmeTlsAlpn`]): the CSR flow for
/// custom domains, where the server runs the order.
pub const CAPABILITY_ACME_TLS_ALPN: &str = "acme_tls_alpn";
/// Capability an agent sends when it serves QUIC clients (HTTP/3) carried
/// in the tunnel's DATAGRAM frames ([`crate::quic_datagram`]); a server
/// with a QUIC client listener lists it back and assigns the tunnel a
/// route in the welcome's `quic_route`.
pub const CAPABILITY_QUIC_CLIENTS: &str = "quic_clients";
/// Capability (with [`CAPABILITY_QUIC_CLIENTS`]) of an end that takes QUIC
/// client frames too large for a DATAGRAM frame on unidirectional streams
/// ([`crate::quic_datagram::STREAM_KIND_DATAGRAM`]); the server lists it
/// back when it does too.
pub const CAPABILITY_QUIC_CLIENT_STREAMS: &str = "quic_client_streams";
/// Most servers listed to an agent.
pub const MAX_CLUSTER_SERVERS: usize = 64;
/// Protocol version carried in [`AgentMessage::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest control frame accepted, in bytes (length prefix excluded).
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// Largest data-stream header accepted, in bytes (length prefix excluded).
pub const MAX_STREAM_HEADER: usize = 1024;

/// QUIC application error codes, used to close connections and reset streams.
pub mod codes {
    /// Normal close (shutdown, replaced by a newer connection).
    pub const CLOSE_NORMAL: u32 = 0;
    /// The agent's token was not accepted; the agent must not retry with it.
    pub const CLOSE_AUTH_FAILED: u32 = 0x10;
    /// The node was removed by an operator.
    pub const CLOSE_NODE_REMOVED: u32 = 0x11;
    /// The peer violated the protocol (bad frame, bad message order).
    pub const CLOSE_PROTOCOL_ERROR: u32 = 0x12;
    /// The server is shutting down; reconnect later.
    pub const CLOSE_SHUTDOWN: u32 = 0x13;
    /// The agent's protocol version is not supported.
    pub const CLOSE_VERSION_MISMATCH: u32 = 0x14;
    /// Too many failed authentications from the agent's address; the
    /// agent retries after its backoff.
    pub const CLOSE_RATE_LIMITED: u32 = 0x15;

    /// Data stream reset: the client side aborted (TCP reset or error).
    pub const STREAM_CLIENT_ABORTED: u32 = 0x1;
    /// Data stream reset: the agent could not reach or lost its upstream.
    pub const STREAM_UPSTREAM_FAILED: u32 = 0x2;
    /// Data stream reset: the stream header was invalid.
    pub const STREAM_BAD_HEADER: u32 = 0x3;
    /// Data stream reset: TLS termination on the agent failed.
    pub const STREAM_TLS_FAILED: u32 = 0x4;
    /// Data stream reset: shutting down.
    pub const STREAM_SHUTDOWN: u32 = 0x5;
    /// Peer stream reset: the peer has no tunnel to the node (it does not
    /// forward further: one hop at most).
    pub const STREAM_NO_TUNNEL: u32 = 0x6;
    /// Data stream reset: the agent declares no TCP service of that name
    /// (the server can never make an agent dial an address of its choice).
    pub const STREAM_NO_SERVICE: u32 = 0x7;
}

/// Messages the agent sends on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// First message: authenticate with the node token.
    Hello {
        /// [`PROTOCOL_VERSION`] the agent speaks.
        protocol: u32,
        /// The node token (`<node>.<secret>`).
        token: String,
        /// Agent software version, for operators.
        agent_version: String,
        /// Optional features the agent supports (e.g. `proxy_v2`).
        #[serde(default)]
        capabilities: Vec<String>,
        /// Random id of the agent process. Tunnels of the newest instance
        /// of a node carry new streams; an older instance's tunnels (say, of
        /// an agent that was killed) are used only if no newer one is up.
        #[serde(default)]
        instance: String,
        /// Stable id of the agent's installation (kept in its data
        /// directory). Several replicas of one node share new streams; among
        /// tunnels of one replica only the newest instance carries them.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        replica: String,
        /// Public endpoint for direct mode, `host:port`, or `:port` for
        /// "the address the server sees, this port". Absent: proxy only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
    /// Liveness and load report.
    Heartbeat {
        /// Sequence number echoed in [`ServerMessage::HeartbeatAck`].
        seq: u64,
        /// Data streams currently open on the agent.
        open_streams: u64,
    },
    /// The agent's routes and the health of their upstreams: sent after the
    /// welcome and whenever they change (a reload, a health transition),
    /// only to a server whose welcome listed [`CAPABILITY_ROUTES`].
    Routes {
        /// Every route, the default one (host `*`) included.
        routes: Vec<crate::routes::RouteReport>,
    },
    /// Answer to [`ServerMessage::AcmeTlsAlpn`] with a digest: the agent
    /// now answers the CA's `acme-tls/1` connections for `host`.
    AcmeTlsAlpnReady {
        /// The host, as the server named it.
        host: String,
        /// The digest now served, as the server sent it (a confirmation
        /// of an earlier order's answer never counts for a later one).
        digest: String,
    },
    /// The agent is shutting down: the server places new streams on other
    /// tunnels of the node (this one is used only if none is up) and
    /// answers [`ServerMessage::LeaveAck`]; open streams finish, then the
    /// agent closes the connection.
    Leaving,
}

/// Messages the server sends on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMessage {
    /// Authentication succeeded.
    Welcome {
        /// The node this agent serves.
        node: String,
        /// Hostnames routed to this node (exact and wildcard).
        hostnames: Vec<String>,
        /// How often the server expects heartbeats, in seconds.
        heartbeat_secs: u64,
        /// Server software version.
        server_version: String,
        /// The cluster's live servers, this one included (only to agents
        /// that sent [`CAPABILITY_CLUSTER`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        servers: Vec<ClusterServer>,
        /// The store revision the list was read at (0 with no list): of
        /// lists from several servers the agent keeps the newest.
        #[serde(default, skip_serializing_if = "is_zero")]
        servers_revision: u64,
        /// Capabilities of the server that the agent announced too (so an
        /// agent that announced none gets a welcome it already knows).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        capabilities: Vec<String>,
        /// The tunnel's routable prefix for QUIC clients
        /// ([`crate::quic_route::RouteId`]), when the server carries them to
        /// this agent: every connection ID the agent's QUIC endpoint issues
        /// on this tunnel starts with it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quic_route: Option<u32>,
        /// The UDP port of the server's listener for QUIC clients (with
        /// `quic_route`): what the agent advertises in `Alt-Svc`. Sent only
        /// to agents that announced [`CAPABILITY_QUIC_CLIENT_STREAMS`]:
        /// older ones refuse unknown fields.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quic_port: Option<u16>,
    },
    /// The cluster's live servers changed (only to agents that sent
    /// [`CAPABILITY_CLUSTER`]): the agent connects to new ones and leaves
    /// those no longer listed.
    Servers {
        /// Every live server, this one included.
        servers: Vec<ClusterServer>,
        /// The store revision the list was read at.
        revision: u64,
    },
    /// Authentication or version check failed; the connection closes next.
    Rejected {
        /// One of the `CLOSE_*` codes in [`codes`].
        code: u32,
        /// A human-readable reason.
        reason: String,
    },
    /// Answer to [`AgentMessage::Heartbeat`].
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
    },
    /// Something the operator should see in the agent's log.
    Notice {
        /// `info`, `warn` or `error`.
        level: String,
        /// The text.
        message: String,
    },
    /// Answer to [`AgentMessage::Leaving`]: from now on new streams come
    /// only if the node has no other tunnel (streams the server placed just
    /// before may still arrive).
    LeaveAck,
    /// The server is shutting down: it accepts no new clients, its open
    /// streams finish within `drain_secs`, then it closes the connection
    /// with `CLOSE_SHUTDOWN`, after which the agent reconnects at a random
    /// time within `reconnect.shutdown_spread_ms` (to this address, which
    /// may lead to another server, or to this one restarted).
    Draining {
        /// The server's drain timeout, in seconds.
        drain_secs: u64,
    },
    /// This server process is being replaced by a successor at the same
    /// address (an upgrade; only to agents that sent [`CAPABILITY_HANDOVER`]):
    /// the agent connects again now, and its new connection reaches the
    /// successor. This connection keeps the streams open on it; the server
    /// closes it with `CLOSE_SHUTDOWN` once they finished, and the agent
    /// does not reconnect for that.
    Handover,
    /// The node's custom domains whose ownership is verified, the ones the
    /// server routes to it (only to agents that sent
    /// [`CAPABILITY_DOMAINS`]): after the welcome and at every change. The
    /// agent serves them (certificates, routes) and nothing else beyond its
    /// own names.
    Domains {
        /// Lowercase hostnames, at most
        /// [`crate::domains::MAX_DOMAINS_PER_NODE`].
        domains: Vec<String>,
    },
    /// Answer the CA's TLS-ALPN-01 validation of `host` (one of the node's
    /// custom domains) while the server runs the order of a CSR (only to
    /// agents that sent [`CAPABILITY_ACME_TLS_ALPN`]). With `digest` (the
    /// SHA-256 of the key authorization, 64 hex digits) the agent serves a
    /// challenge certificate for `host` and confirms with
    /// [`AgentMessage::AcmeTlsAlpnReady`]; without, it stops.
    AcmeTlsAlpn {
        /// The custom domain being validated.
        host: String,
        /// 64 lowercase hex digits, or absent to withdraw.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
}

/// A TLS-ALPN-01 digest as sent in [`ServerMessage::AcmeTlsAlpn`].
pub fn encode_digest(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads [`encode_digest`]'s form; `None` for anything else.
pub fn decode_digest(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A server of the cluster as agents learn it from a server they trust:
/// trust in the others chains from the join string's pin.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterServer {
    /// The server's persistent id.
    pub id: String,
    /// Its name, for operators.
    pub name: String,
    /// Where agents dial it, `host:port`.
    pub quic: String,
    /// Its signal API, `host:port`.
    pub api: String,
    /// SHA-256 of its identity certificate, 64 hex digits.
    pub fingerprint: String,
}

impl ClusterServer {
    /// Whether every field is plain and bounded (the list reaches logs and
    /// the agent's data directory).
    pub fn is_valid(&self) -> bool {
        let id = |s: &str| {
            !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        let addr = |s: &str| {
            !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:[]".contains(&b))
        };
        id(&self.id)
            && id(&self.name)
            && addr(&self.quic)
            && addr(&self.api)
            && crate::join::parse_fingerprint(&self.fingerprint).is_some()
    }
}

/// Header at the start of every data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamHeader {
    /// The client's address as the server saw it.
    pub client: SocketAddr,
    /// The server address the client connected to.
    pub local: SocketAddr,
    /// The server name from the ClientHello (or the HTTP Host).
    pub sni: String,
    /// Plain HTTP from the server's :80 listener: the agent forwards the
    /// bytes to its upstream as they are (no TLS to terminate).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain: bool,
    /// A raw TCP service (`edge-server service add`): the agent connects
    /// the local target it declared under this name and splices the bytes
    /// (no TLS, no routes). `sni` is then the node's own name. Only sent on
    /// tunnels of agents that announced [`CAPABILITY_SERVICES`] (older
    /// agents refuse the field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// Errors decoding tunnel frames.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A frame or header is longer than its limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame's JSON does not match the protocol.
    #[error("invalid message: {0}")]
    Json(#[from] serde_json::Error),
    /// Underlying I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl StreamHeader {
    /// Encodes the header with its `u16` length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(json.len() + 2);
        out.extend_from_slice(&(json.len() as u16).to_be_bytes());
        out.extend_from_slice(&json);
        out
    }

    /// Decodes a header from the start of `buf`: `Ok(None)` when more bytes
    /// are needed, else the header and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(StreamHeader, usize)>, TunnelError> {
        let Some(&[a, b]) = buf.get(..2) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([a, b]));
        if len > MAX_STREAM_HEADER {
            return Err(TunnelError::TooLong { len, max: MAX_STREAM_HEADER });
        }
        let Some(json) = buf.get(2..2 + len) else {
            return Ok(None);
        };
        let header: StreamHeader = serde_json::from_slice(json)?;
        if crate::names::normalize_hostname(&header.sni).as_deref() != Some(header.sni.as_str()) {
            return Err(TunnelError::Json(serde::de::Error::custom("sni is not a normalized hostname")));
        }
        if header.service.as_deref().is_some_and(|s| crate::routes::validate_service_name(s).is_err()) {
            return Err(TunnelError::Json(serde::de::Error::custom("service is not a valid service name")));
        }
        Ok(Some((header, 2 + len)))
    }
}

/// A `tokio-util` codec for control frames carrying JSON messages.
///
/// `In` is the message type decoded, `Out` the type encoded; the server uses
/// `ControlCodec<AgentMessage, ServerMessage>` and the agent the reverse.
/// The length is checked before the frame is buffered, so a peer cannot
/// make the reader hold more than [`MAX_CONTROL_FRAME`] bytes.
#[derive(Debug)]
pub struct ControlCodec<In, Out> {
    _types: std::marker::PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for ControlCodec<In, Out> {
    fn default() -> Self {
        Self { _types: std::marker::PhantomData }
    }
}

impl<In: serde::de::DeserializeOwned, Out> Decoder for ControlCodec<In, Out> {
    type Item = In;
    type Error = TunnelError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, TunnelError> {
        let Some(&[a, b, c, d]) = src.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > MAX_CONTROL_FRAME {
            return Err(TunnelError::TooLong { len, max: MAX_CONTROL_FRAME });
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let frame = src.split_to(len);
        Ok(Some(serde_json::from_slice(&frame)?))
    }
}

impl<In, Out: Serialize> Encoder<Out> for ControlCodec<In, Out> {
    type Error = TunnelError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), TunnelError> {
        let json = serde_json::to_vec(&item)?;
        if json.len() > MAX_CONTROL_FRAME {
            return Err(TunnelError::TooLong { len: json.len(), max: MAX_CONTROL_FRAME });
        }
        dst.reserve(4 + json.len());
        dst.put_u32(json.len() as u32);
        dst.extend_from_slice(&json);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip_and_refuse_other_text() {
        let d = [0xa5u8; 32];
        assert_eq!(decode_digest(&encode_digest(&d)), Some(d));
        for bad in ["", "a5", &"g".repeat(64), &"a5".repeat(33), &"\u{e9}".repeat(32)] {
            assert_eq!(decode_digest(bad), None, "{bad:?}");
        }
        let m = ServerMessage::AcmeTlsAlpn { host: "www.c.test".into(), digest: None };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"type":"acme_tls_alpn","host":"www.c.test"}"#);
        assert_eq!(serde_json::from_str::<ServerMessage>(&json).unwrap(), m);
    }

    #[test]
    fn stream_header_round_trip_and_prefixes() {
        let header = StreamHeader {
            client: "203.0.113.9:51000".parse().unwrap(),
            local: "[2001:db8::1]:443".parse().unwrap(),
            sni: "app.n1.example".into(),
            plain: false,
            service: None,
        };
        let text = String::from_utf8_lossy(&header.encode()).into_owned();
        assert!(!text.contains("plain") && !text.contains("service"), "old agents still read it");
        let ssh = StreamHeader { service: Some("ssh".into()), ..header.clone() };
        assert_eq!(StreamHeader::decode(&ssh.encode()).unwrap().unwrap().0, ssh);
        let bad = StreamHeader { service: Some("../x".into()), ..header.clone() };
        assert!(StreamHeader::decode(&bad.encode()).is_err(), "service names are checked");
        let mut wire = header.encode();
        wire.extend_from_slice(b"\x16\x03\x01rest");
        for end in 0..wire.len() - 9 {
            assert!(StreamHeader::decode(&wire[..end]).unwrap().is_none(), "prefix {end}");
        }
        let (decoded, used) = StreamHeader::decode(&wire).unwrap().unwrap();
        assert_eq!(decoded, header);
        assert_eq!(&wire[used..], b"\x16\x03\x01rest");
    }

    #[test]
    fn stream_header_rejects_hostile_input() {
        assert!(StreamHeader::decode(&[0xff, 0xff]).is_err());
        assert!(StreamHeader::decode(b"\x00\x03abc").is_err());
        let mut bad = br#"{"client":"1.2.3.4:5","local":"1.2.3.4:443","sni":"A B"}"#.to_vec();
        bad.splice(0..0, (bad.len() as u16).to_be_bytes());
        assert!(StreamHeader::decode(&bad).is_err());
    }

    #[test]
    fn control_codec_round_trip_and_limits() {
        let mut up: ControlCodec<ServerMessage, AgentMessage> = ControlCodec::default();
        let mut down: ControlCodec<AgentMessage, ServerMessage> = ControlCodec::default();
        let hello = AgentMessage::Hello {
            protocol: PROTOCOL_VERSION,
            token: "n1.secret".into(),
            agent_version: "0.1.0".into(),
            capabilities: vec!["proxy_v2".into()],
            instance: "5f1e".into(),
            replica: "r1".into(),
            endpoint: Some(":443".into()),
        };
        let mut buf = BytesMut::new();
        up.encode(hello.clone(), &mut buf).unwrap();
        let full = buf.clone();
        for end in 0..full.len() {
            let mut part = BytesMut::from(&full[..end]);
            assert!(down.decode(&mut part).unwrap().is_none());
            // The same codec then gets the rest, as from a second read.
            part.extend_from_slice(&full[end..]);
            assert_eq!(down.decode(&mut part).unwrap(), Some(hello.clone()), "split at {end}");
        }
        assert_eq!(down.decode(&mut buf).unwrap(), Some(hello));

        let mut huge = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(down.decode(&mut huge), Err(TunnelError::TooLong { .. })));
        let mut junk = BytesMut::from(&b"\x00\x00\x00\x02{}"[..]);
        assert!(matches!(down.decode(&mut junk), Err(TunnelError::Json(_))));
    }

    #[test]
    fn routes_reports_round_trip() {
        use crate::routes::{RouteMode, RouteReport, UpstreamReport};
        let up = UpstreamReport { addr: "127.0.0.1:4000".into(), up: true, check: "none".into() };
        let msg = AgentMessage::Routes {
            routes: vec![RouteReport { host: "*".into(), mode: RouteMode::Passthrough, upstreams: vec![up] }],
        };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(serde_json::from_str::<AgentMessage>(&json).unwrap(), msg);
        assert!(json.contains(r#""type":"routes""#) && json.contains(r#""mode":"passthrough""#), "{json}");
        let extra = json.replace(r#""check":"none""#, r#""check":"none","x":1"#);
        assert!(serde_json::from_str::<AgentMessage>(&extra).is_ok(), "a newer agent's extra fields are ignored");
    }

    #[test]
    fn welcome_lists_servers_only_when_there_are_some() {
        let welcome = |servers: Vec<ClusterServer>| ServerMessage::Welcome {
            node: "n1".into(),
            hostnames: vec!["n1.edge.test".into()],
            heartbeat_secs: 15,
            server_version: "0.1.0".into(),
            servers_revision: if servers.is_empty() { 0 } else { 7 },
            servers,
            capabilities: Vec::new(),
            quic_route: None,
            quic_port: None,
        };
        let json = serde_json::to_string(&welcome(Vec::new())).unwrap();
        assert!(!json.contains("servers"), "agents without the cluster capability still read it: {json}");
        assert!(!json.contains("capabilities"), "nor a capability list they never asked for: {json}");
        assert!(!json.contains("quic_"), "nor the QUIC client fields: {json}");
        let server = ClusterServer {
            id: "a1b2".into(),
            name: "edge-b".into(),
            quic: "127.0.0.2:4433".into(),
            api: "[::1]:8443".into(),
            fingerprint: "ab".repeat(32),
        };
        assert!(server.is_valid());
        let json = serde_json::to_string(&welcome(vec![server.clone()])).unwrap();
        assert_eq!(serde_json::from_str::<ServerMessage>(&json).unwrap(), welcome(vec![server.clone()]));
        for bad in [
            ClusterServer { name: "a\nb".into(), ..server.clone() },
            ClusterServer { quic: String::new(), ..server.clone() },
            ClusterServer { quic: "x".repeat(300), ..server.clone() },
            ClusterServer { fingerprint: "zz".into(), ..server.clone() },
        ] {
            assert!(!bad.is_valid(), "{bad:?}");
        }
    }
}
