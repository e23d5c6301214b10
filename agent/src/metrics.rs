//! Agent counters, exposed on the local status endpoint.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use edge_net::splice::ByteCounters;

/// Counters for one agent process.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Tunnels currently up.
    pub tunnels_up: AtomicU64,
    /// Successful tunnel handshakes.
    pub connects: AtomicU64,
    /// Failed connection attempts.
    pub connect_failures: AtomicU64,
    /// Data streams open now.
    pub open_streams: AtomicU64,
    /// Data streams accepted.
    pub total_streams: AtomicU64,
    /// Streams that ended in an error (bad header, TLS, upstream).
    pub stream_errors: AtomicU64,
    /// Streams reset because the upstream stopped reading while the tunnel
    /// needed the window (`edge_net::stall`).
    pub streams_shed: AtomicU64,
    /// Path MTU (largest UDP payload) of the newest tunnel, as discovered.
    pub path_mtu: AtomicU64,
    /// Smoothed round-trip time of the newest tunnel, microseconds.
    pub rtt_us: AtomicU64,
    /// Congestion window of the newest tunnel, bytes.
    pub cwnd: AtomicU64,
    /// Congestion events (loss or ECN) on the newest tunnel.
    pub congestion_events: AtomicU64,
    /// Packets the newest tunnel has declared lost.
    pub lost_packets: AtomicU64,
    /// Bytes client → upstream (`tcp_to_quic` is upstream → client here).
    pub bytes: ByteCounters,
    /// Expiry (Unix seconds) of the certificate being served.
    pub cert_not_after: AtomicU64,
    /// Certificates obtained through ACME and installed.
    pub cert_renewals: AtomicU64,
    /// ACME attempts that failed (each is retried with backoff).
    pub cert_failures: AtomicU64,
    /// HTTP/3 client connections open now.
    pub http3_connections: AtomicU64,
    /// HTTP/3 client connections accepted.
    pub http3_connections_total: AtomicU64,
    /// HTTP/3 client connections refused (over `http3.max_connections`).
    pub http3_refused: AtomicU64,
    /// HTTP/3 requests answered.
    pub http3_requests: AtomicU64,
    /// HTTP/1.x responses over TCP that got an `Alt-Svc: h3` header.
    pub alt_svc_added: AtomicU64,
    /// QUIC client datagrams crossing the tunnel.
    pub http3_datagrams: std::sync::Arc<edge_net::tunnel_udp::TunnelUdpStats>,
}

impl AgentMetrics {
    /// Prometheus text format.
    pub fn render(&self) -> String {
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let d = &self.http3_datagrams;
        let rows: [(&str, &str, &str, u64); 29] = [
            ("edge_agent_http3_connections", "gauge", "HTTP/3 client connections open.", g(&self.http3_connections)),
            (
                "edge_agent_http3_connections_total",
                "counter",
                "HTTP/3 client connections accepted.",
                g(&self.http3_connections_total),
            ),
            (
                "edge_agent_http3_refused_total",
                "counter",
                "HTTP/3 client connections refused at http3.max_connections.",
                g(&self.http3_refused),
            ),
            ("edge_agent_http3_requests_total", "counter", "HTTP/3 requests answered.", g(&self.http3_requests)),
            (
                "edge_agent_alt_svc_advertised_total",
                "counter",
                "TCP connections whose first HTTP/1.x response got an Alt-Svc header advertising HTTP/3.",
                g(&self.alt_svc_added),
            ),
            ("edge_agent_quic_client_datagrams_in_total", "counter", "QUIC client datagrams in.", g(&d.received)),
            ("edge_agent_quic_client_bytes_in_total", "counter", "QUIC client bytes in.", g(&d.received_bytes)),
            ("edge_agent_quic_client_datagrams_out_total", "counter", "QUIC client datagrams out.", g(&d.sent)),
            ("edge_agent_quic_client_bytes_out_total", "counter", "QUIC client bytes out.", g(&d.sent_bytes)),
            (
                "edge_agent_quic_client_datagrams_streamed_out_total",
                "counter",
                "QUIC client datagrams sent on tunnel streams (too large for a DATAGRAM frame).",
                g(&d.sent_on_streams),
            ),
            (
                "edge_agent_quic_client_datagrams_streamed_in_total",
                "counter",
                "QUIC client datagrams received on tunnel streams.",
                g(&d.received_on_streams),
            ),
            (
                "edge_agent_quic_client_datagrams_dropped_total",
                "counter",
                "QUIC client datagrams dropped (queue full, too large for the tunnel now).",
                g(&d.dropped),
            ),
            ("edge_agent_cwnd_bytes", "gauge", "Congestion window of the tunnel.", g(&self.cwnd)),
            ("edge_agent_congestion_events", "gauge", "Congestion events on the tunnel.", g(&self.congestion_events)),
            ("edge_agent_lost_packets", "gauge", "Packets the tunnel declared lost.", g(&self.lost_packets)),
            ("edge_agent_path_mtu_bytes", "gauge", "Discovered path MTU of the tunnel.", g(&self.path_mtu)),
            ("edge_agent_rtt_microseconds", "gauge", "Smoothed RTT of the tunnel.", g(&self.rtt_us)),
            ("edge_agent_tunnels_up", "gauge", "Tunnels to the server currently up.", g(&self.tunnels_up)),
            ("edge_agent_connects_total", "counter", "Tunnel handshakes completed.", g(&self.connects)),
            ("edge_agent_connect_failures_total", "counter", "Failed connection attempts.", g(&self.connect_failures)),
            ("edge_agent_open_streams", "gauge", "Client streams open now.", g(&self.open_streams)),
            ("edge_agent_streams_total", "counter", "Client streams accepted.", g(&self.total_streams)),
            ("edge_agent_stream_errors_total", "counter", "Client streams that failed.", g(&self.stream_errors)),
            (
                "edge_agent_streams_shed_total",
                "counter",
                "Client streams reset because the upstream stopped reading while the tunnel needed the window.",
                g(&self.streams_shed),
            ),
            (
                "edge_agent_certificate_expiry_timestamp_seconds",
                "gauge",
                "Expiry of the certificate being served.",
                g(&self.cert_not_after),
            ),
            (
                "edge_agent_certificate_renewals_total",
                "counter",
                "Certificates obtained and installed.",
                g(&self.cert_renewals),
            ),
            (
                "edge_agent_certificate_failures_total",
                "counter",
                "Failed certificate attempts.",
                g(&self.cert_failures),
            ),
            (
                "edge_agent_bytes_to_upstream_total",
                "counter",
                "Bytes from clients to the upstream.",
                g(&self.bytes.quic_to_tcp),
            ),
            (
                "edge_agent_bytes_from_upstream_total",
                "counter",
                "Bytes from the upstream to clients.",
                g(&self.bytes.tcp_to_quic),
            ),
        ];
        let mut out = String::with_capacity(1024);
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}
