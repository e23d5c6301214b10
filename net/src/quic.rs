//! QUIC transport tuning and UDP socket setup.
//!
//! quinn's defaults suit a browser, not a tunnel that multiplexes thousands of
//! client connections: at most 100 concurrent bidirectional streams (opening
//! the 101st blocks) and windows sized for one download. Here the peer may
//! open up to `max_streams` streams; each stream may have `stream_window`
//! bytes in flight, but the connection-level window caps the total, so the
//! memory a peer can pin is bounded by `connection_window` whatever the
//! number of streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

/// Tunnel tuning shared by server and agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelTuning {
    /// Concurrent data streams (client connections) per tunnel.
    pub max_streams: u32,
    /// Per-stream receive window in bytes.
    pub stream_window: u32,
    /// Per-connection receive and send window in bytes; bounds total memory.
    pub connection_window: u64,
    /// Keep-alive interval in seconds; below common NAT UDP timeouts (30 s).
    pub keep_alive_secs: u64,
    /// Idle timeout in seconds after which a silent tunnel is dead.
    pub idle_timeout_secs: u64,
    /// UDP socket send and receive buffer size requested from the kernel.
    pub udp_buffer_bytes: usize,
    /// Largest UDP payload path MTU discovery may probe for (and the largest
    /// the endpoint accepts). Discovery settles at what the path carries:
    /// about 1452 on an Ethernet or internet path, the bound itself on
    /// loopback or jumbo-frame links, where fewer, larger datagrams cut the
    /// per-byte cost of the tunnel by about 40% (docs/benchmarks.md).
    /// At most [`MAX_UDP_PAYLOAD_LIMIT`].
    pub max_udp_payload: u16,
}

/// The largest `max_udp_payload` allowed. quinn 0.11 hands the kernel up to
/// 10 datagrams per `sendmsg` (UDP GSO), and one `sendmsg` carries at most
/// 65,507 bytes; a larger datagram size makes every full batch fail with
/// `EMSGSIZE` (dropped silently: the tunnel stalls) or turns GSO off.
pub const MAX_UDP_PAYLOAD_LIMIT: u16 = 6550;

impl Default for TunnelTuning {
    fn default() -> Self {
        Self {
            max_streams: 10_000,
            stream_window: 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            keep_alive_secs: 10,
            idle_timeout_secs: 30,
            udp_buffer_bytes: 8 * 1024 * 1024,
            max_udp_payload: 6500,
        }
    }
}

impl TunnelTuning {
    /// Checks the values, naming the first bad field.
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        if self.max_streams == 0 || self.max_streams > 1_000_000 {
            return Err(format!("{prefix}.max_streams = {} must be between 1 and 1000000", self.max_streams));
        }
        if self.stream_window < 16 * 1024 {
            return Err(format!("{prefix}.stream_window = {} must be at least 16384", self.stream_window));
        }
        if self.connection_window < u64::from(self.stream_window) || self.connection_window > (1 << 32) {
            return Err(format!(
                "{prefix}.connection_window = {} must be between stream_window and 4 GiB",
                self.connection_window
            ));
        }
        if self.keep_alive_secs == 0 || self.keep_alive_secs >= self.idle_timeout_secs {
            return Err(format!(
                "{prefix}.keep_alive_secs = {} must be at least 1 and below idle_timeout_secs ({})",
                self.keep_alive_secs, self.idle_timeout_secs
            ));
        }
        if !(1200..=MAX_UDP_PAYLOAD_LIMIT).contains(&self.max_udp_payload) {
            return Err(format!(
                "{prefix}.max_udp_payload = {} must be between 1200 and {MAX_UDP_PAYLOAD_LIMIT} \
                 (10 datagrams per GSO send must fit in one 64 KiB UDP send)",
                self.max_udp_payload
            ));
        }
        if self.idle_timeout_secs > 600 {
            return Err(format!("{prefix}.idle_timeout_secs = {} must be at most 600", self.idle_timeout_secs));
        }
        Ok(())
    }

    /// A transport config where the peer may open `peer_bidi_streams`.
    pub fn transport(&self, peer_bidi_streams: u32) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(peer_bidi_streams))
            // Only QUIC client frames too large for a DATAGRAM frame.
            .max_concurrent_uni_streams(VarInt::from_u32(crate::frame_streams::STREAMS_IN_FLIGHT))
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u64(self.connection_window).unwrap_or(VarInt::MAX))
            .send_window(self.connection_window)
            .keep_alive_interval(Some(Duration::from_secs(self.keep_alive_secs)))
            .max_idle_timeout(IdleTimeout::try_from(Duration::from_secs(self.idle_timeout_secs)).ok())
            // QUIC clients' datagrams (issue 17) cross in DATAGRAM frames;
            // what does not fit the buffer is dropped, as UDP would.
            .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES))
            .datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.mtu_discovery_config(Some(mtu));
        t
    }
}

/// Bytes of QUIC DATAGRAM frames a tunnel buffers each way.
pub const DATAGRAM_BUFFER_BYTES: usize = 2 * 1024 * 1024;

/// Binds a UDP socket with large buffers (the kernel may clamp them to
/// `net.core.rmem_max`/`wmem_max`; the granted sizes are logged).
pub fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        match socket.set_only_v6(false) {
            Ok(()) => {}
            // A wildcard IPv6 socket is meant to be dual-stack: where it
            // cannot be, say so (the caller may fall back to IPv4).
            Err(e) if addr.ip().is_unspecified() => return Err(e),
            Err(_) => {}
        }
    }
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.bind(&addr.into())?;
    tracing::debug!(
        recv = socket.recv_buffer_size().unwrap_or(0),
        send = socket.send_buffer_size().unwrap_or(0),
        "udp socket buffers"
    );
    Ok(socket.into())
}

/// A quinn endpoint on `socket`, serving when `server` is given. The
/// endpoint advertises `tuning.max_udp_payload` as the largest datagram it
/// accepts (quinn's default, 1472, would cap MTU discovery on both sides).
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
    tuning: &TunnelTuning,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(tuning.max_udp_payload).map_err(|e| std::io::Error::other(e.to_string()))?;
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}

/// A quinn endpoint on a [`SharedQuicSocket`](crate::shared_quic::SharedQuicSocket),
/// issuing connection IDs that carry the socket's epoch (see
/// [`endpoint`] for the rest).
pub fn shared_endpoint(
    socket: Arc<crate::shared_quic::SharedQuicSocket>,
    server: Option<quinn::ServerConfig>,
    tuning: &TunnelTuning,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config.max_udp_payload_size(tuning.max_udp_payload).map_err(|e| std::io::Error::other(e.to_string()))?;
    let epoch = socket.epoch();
    config.cid_generator(move || Box::new(crate::shared_quic::EpochCids::new(epoch)));
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, Arc::new(quinn::TokioRuntime))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn datagram_bound_keeps_a_gso_batch_within_one_udp_send() {
        // 10 segments (quinn's batch) of the largest allowed payload fit in
        // the 65,507 bytes one IPv4 UDP send can carry.
        assert!(10 * usize::from(MAX_UDP_PAYLOAD_LIMIT) <= 65_535 - 20 - 8);
        let ok = TunnelTuning { max_udp_payload: MAX_UDP_PAYLOAD_LIMIT, ..TunnelTuning::default() };
        assert_eq!(ok.validate("tunnel"), Ok(()));
        assert_eq!(TunnelTuning::default().validate("tunnel"), Ok(()));
        for bad in [1199, MAX_UDP_PAYLOAD_LIMIT + 1, 8952] {
            let tuning = TunnelTuning { max_udp_payload: bad, ..TunnelTuning::default() };
            let err = tuning.validate("tunnel").unwrap_err();
            assert!(err.starts_with(&format!("tunnel.max_udp_payload = {bad} must be between 1200 and 6550")), "{err}");
        }
    }
}
