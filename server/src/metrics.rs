//! Server metrics in Prometheus text format.
//!
//! Counters are plain atomics updated on the data path; rendering walks the
//! registry for per-node series.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::registry::Registry;

/// Reasons a client connection is refused, as metric labels.
pub const REJECTION_REASONS: [&str; 12] = [
    "not_tls",
    "not_client_hello",
    "no_sni",
    "malformed",
    "too_large",
    "timeout",
    "unknown_sni",
    "node_offline",
    "tunnel_failed",
    "node_busy",
    "self_loop",
    "access_denied",
];

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// TCP connections accepted on the TLS listener.
    pub connections_accepted: AtomicU64,
    /// Client connections currently open (any stage).
    pub connections_open: AtomicU64,
    rejections: [AtomicU64; REJECTION_REASONS.len()],
    /// Agent authentications refused.
    pub auth_failures: AtomicU64,
    dns_responses: [AtomicU64; DNS_RCODES.len()],
    /// Certificates issued through the CSR flow.
    pub certificates_issued: AtomicU64,
    /// CSR-flow orders that failed at every directory.
    pub certificate_failures: AtomicU64,
    /// Challenge or certificate requests refused because they named another
    /// node's names.
    pub foreign_name_refusals: AtomicU64,
    /// Ownership checks of custom domains (scheduled ones).
    pub domain_checks: AtomicU64,
    /// Reachability probes that verified the node.
    pub probes_ok: AtomicU64,
    /// Reachability probes that failed.
    pub probes_failed: AtomicU64,
    transitions: [AtomicU64; 3],
    /// Store change events applied to the routing state.
    pub store_changes_applied: AtomicU64,
    /// Full reloads of the routing state after the change feed resynced.
    pub store_resyncs: AtomicU64,
    /// Client connections this server forwarded to a peer server (it had
    /// no tunnel to the node).
    pub peer_forwarded: AtomicU64,
    /// Client connections peer servers forwarded here, placed on a tunnel.
    pub peer_accepted: AtomicU64,
    /// Connections or streams from peers refused (unknown identity, no
    /// tunnel to the node).
    pub peer_refused: AtomicU64,
    /// Mode transitions this server wrote as the decider.
    pub decider_transitions: AtomicU64,
    /// Plain HTTP requests on :80, by answer.
    http_answers: [AtomicU64; HTTP_ANSWERS.len()],
}

/// Answers of the :80 listener, as metric labels.
pub const HTTP_ANSWERS: [&str; 7] =
    ["redirect", "proxied", "not_found", "offline", "bad_gateway", "bad_request", "forbidden"];

/// DNS response codes counted by name; anything else is `other`.
pub const DNS_RCODES: [&str; 7] = ["NOERROR", "NXDOMAIN", "REFUSED", "NOTIMP", "FORMERR", "SERVFAIL", "other"];

impl Metrics {
    /// Counts a refused client connection.
    pub fn reject(&self, reason: &str) {
        if let Some(i) = REJECTION_REASONS.iter().position(|r| *r == reason) {
            self.rejections[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a mode transition by its target mode.
    pub fn mode_transition(&self, to: crate::modes::Mode) {
        let i = match to {
            crate::modes::Mode::Direct => 0,
            crate::modes::Mode::Proxy => 1,
            crate::modes::Mode::Offline => 2,
        };
        self.transitions[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one answer of the :80 listener.
    pub fn http_answer(&self, label: &str) {
        if let Some(i) = HTTP_ANSWERS.iter().position(|l| *l == label) {
            self.http_answers[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one DNS response.
    pub fn dns_query(&self, rcode: hickory_proto::op::ResponseCode) {
        use hickory_proto::op::ResponseCode as R;
        let i = match rcode {
            R::NoError => 0,
            R::NXDomain => 1,
            R::Refused => 2,
            R::NotImp => 3,
            R::FormErr => 4,
            R::ServFail => 5,
            _ => 6,
        };
        self.dns_responses[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Renders all metrics.
    pub fn render(&self, registry: &Registry) -> String {
        let mut out = String::with_capacity(4096);
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP edge_connections_accepted_total TCP connections accepted on the TLS listener.");
        let _ = writeln!(out, "# TYPE edge_connections_accepted_total counter");
        let _ = writeln!(out, "edge_connections_accepted_total {}", g(&self.connections_accepted));
        let _ = writeln!(out, "# HELP edge_connections_open Client connections open, any stage.");
        let _ = writeln!(out, "# TYPE edge_connections_open gauge");
        let _ = writeln!(out, "edge_connections_open {}", g(&self.connections_open));
        let _ = writeln!(out, "# HELP edge_sni_rejections_total Client connections refused, by reason.");
        let _ = writeln!(out, "# TYPE edge_sni_rejections_total counter");
        for (reason, count) in REJECTION_REASONS.iter().zip(&self.rejections) {
            let _ = writeln!(out, "edge_sni_rejections_total{{reason=\"{reason}\"}} {}", g(count));
        }
        let _ = writeln!(out, "# HELP edge_agent_auth_failures_total Agent authentications refused.");
        let _ = writeln!(out, "# TYPE edge_agent_auth_failures_total counter");
        let _ = writeln!(out, "edge_agent_auth_failures_total {}", g(&self.auth_failures));

        let _ = writeln!(out, "# HELP edge_dns_responses_total DNS responses sent, by response code.");
        let _ = writeln!(out, "# TYPE edge_dns_responses_total counter");
        for (rcode, count) in DNS_RCODES.iter().zip(&self.dns_responses) {
            let _ = writeln!(out, "edge_dns_responses_total{{rcode=\"{rcode}\"}} {}", g(count));
        }
        for (name, help, v) in [
            (
                "edge_certificates_issued_total",
                "Node certificates issued through the CSR flow.",
                &self.certificates_issued,
            ),
            (
                "edge_certificate_failures_total",
                "CSR-flow orders that failed at every ACME directory.",
                &self.certificate_failures,
            ),
            (
                "edge_foreign_name_refusals_total",
                "Challenge or certificate requests refused for naming another node's names.",
                &self.foreign_name_refusals,
            ),
            (
                "edge_domain_checks_total",
                "Scheduled ownership checks of customers' domains (_edge-verify TXT lookups).",
                &self.domain_checks,
            ),
            (
                "edge_store_changes_applied_total",
                "Store change events applied to routes and the zone.",
                &self.store_changes_applied,
            ),
            (
                "edge_store_resyncs_total",
                "Full reloads of routes and the zone after the store's change feed resynced.",
                &self.store_resyncs,
            ),
            (
                "edge_peer_forwarded_total",
                "Client connections forwarded to a peer server that had the node's tunnel.",
                &self.peer_forwarded,
            ),
            (
                "edge_peer_accepted_total",
                "Client connections peer servers forwarded here and placed on a tunnel.",
                &self.peer_accepted,
            ),
            (
                "edge_peer_refused_total",
                "Peer connections or streams refused (unknown identity, or no tunnel to the node).",
                &self.peer_refused,
            ),
            (
                "edge_decider_transitions_total",
                "Mode transitions written by this server as the cluster's mode decider.",
                &self.decider_transitions,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", g(v));
        }

        let _ = writeln!(out, "# HELP edge_probes_total Reachability probes of node endpoints, by result.");
        let _ = writeln!(out, "# TYPE edge_probes_total counter");
        let _ = writeln!(out, "edge_probes_total{{result=\"ok\"}} {}", g(&self.probes_ok));
        let _ = writeln!(out, "edge_probes_total{{result=\"failed\"}} {}", g(&self.probes_failed));
        let _ = writeln!(out, "# HELP edge_mode_transitions_total Node mode transitions, by new mode.");
        let _ = writeln!(out, "# TYPE edge_mode_transitions_total counter");
        for (mode, count) in ["direct", "proxy", "offline"].iter().zip(&self.transitions) {
            let _ = writeln!(out, "edge_mode_transitions_total{{to=\"{mode}\"}} {}", g(count));
        }
        let _ = writeln!(out, "# HELP edge_http_requests_total Plain HTTP requests on the :80 listener, by answer.");
        let _ = writeln!(out, "# TYPE edge_http_requests_total counter");
        for (answer, count) in HTTP_ANSWERS.iter().zip(&self.http_answers) {
            let _ = writeln!(out, "edge_http_requests_total{{answer=\"{answer}\"}} {}", g(count));
        }

        let nodes = registry.nodes();
        // Each count takes the node's tunnel lock, which placement takes on
        // the data path: once per node and rendering.
        let tunnels: Vec<usize> = nodes.iter().map(|n| n.tunnel_count()).collect();
        let connected = tunnels.iter().sum::<usize>();
        let _ = writeln!(out, "# HELP edge_tunnels_connected Agent QUIC tunnels currently up.");
        let _ = writeln!(out, "# TYPE edge_tunnels_connected gauge");
        let _ = writeln!(out, "edge_tunnels_connected {connected}");
        type Getter = fn(&crate::registry::NodeMetrics) -> u64;
        let series: [(&str, &str, &str, Getter); 5] = [
            ("edge_node_connections_active", "gauge", "Client connections spliced to the node now.", |m| {
                m.active.load(Ordering::Relaxed)
            }),
            ("edge_node_connections_total", "counter", "Client connections routed to the node.", |m| {
                m.total.load(Ordering::Relaxed)
            }),
            ("edge_node_bytes_to_node_total", "counter", "Bytes from clients to the node.", |m| {
                m.bytes.tcp_to_quic.load(Ordering::Relaxed)
            }),
            ("edge_node_bytes_from_node_total", "counter", "Bytes from the node to clients.", |m| {
                m.bytes.quic_to_tcp.load(Ordering::Relaxed)
            }),
            (
                "edge_node_connections_shed_total",
                "counter",
                "Client connections reset because the client stopped reading while the tunnel needed the window.",
                |m| m.shed.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for node in &nodes {
                let _ = writeln!(out, "{name}{{node=\"{}\"}} {}", node.name, get(&node.metrics));
            }
        }
        let _ = writeln!(out, "# HELP edge_node_tunnels Live tunnels per node.");
        let _ = writeln!(out, "# TYPE edge_node_tunnels gauge");
        for (node, count) in nodes.iter().zip(&tunnels) {
            let _ = writeln!(out, "edge_node_tunnels{{node=\"{}\"}} {count}", node.name);
        }
        let _ = writeln!(out, "# HELP edge_node_mode Current mode of each node (1 for the mode it is in).");
        let _ = writeln!(out, "# TYPE edge_node_mode gauge");
        for node in &nodes {
            let current = node.current_mode();
            for mode in [crate::modes::Mode::Direct, crate::modes::Mode::Proxy, crate::modes::Mode::Offline] {
                let v = u8::from(mode == current);
                let _ = writeln!(out, "edge_node_mode{{node=\"{}\",mode=\"{}\"}} {v}", node.name, mode.as_str());
            }
        }
        let _ = writeln!(
            out,
            "# HELP edge_node_certificate_expiry_timestamp_seconds Expiry of the certificate the node's agent serves."
        );
        let _ = writeln!(out, "# TYPE edge_node_certificate_expiry_timestamp_seconds gauge");
        for node in &nodes {
            if let Some(t) = node.status.lock().unwrap_or_else(|p| p.into_inner()).cert_not_after {
                let _ = writeln!(out, "edge_node_certificate_expiry_timestamp_seconds{{node=\"{}\"}} {t}", node.name);
            }
        }
        out
    }
}
