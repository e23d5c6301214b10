//! Typed values the store keeps as short text columns.

pub use edge_proto::admin::{HttpMode, Mode, StaticKind};

/// A static DNS record kept in the store (added with `edge-server dns add`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct StaticRecord {
    /// Absolute owner name, lowercase, no trailing dot.
    pub name: String,
    /// Type.
    pub kind: StaticKind,
    /// Address or text.
    pub value: String,
    /// TTL in seconds.
    pub ttl_secs: u32,
}

/// A raw TCP service: the server listens on `listen` and splices each
/// connection over the tunnel of `node`, whose agent connects the target it
/// declared as `target`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceRecord {
    /// The service's name (unique).
    pub name: String,
    /// The node that serves it.
    pub node: String,
    /// Where the server listens, `ip:port` (unique).
    pub listen: String,
    /// The name of the agent's `[[services]]` entry.
    pub target: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A customer's own domain claimed for a node (`edge-server domain add`):
/// routed to it only while its ownership is verified.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DomainRecord {
    /// The domain, lowercase (unique: one node at most holds it).
    pub name: String,
    /// The node that serves it.
    pub node: String,
    /// The TXT value that proves ownership at `_edge-verify.<name>`.
    pub verify_value: String,
    /// Unix seconds.
    pub created_at: i64,
    /// What the checks found.
    pub state: edge_proto::domains::VerifyState,
}

/// An access policy as stored: its scope's key (`node:web1`,
/// `host:api.web1.example.com`, `service:ssh-web1`), the node it belongs
/// to (removed with it) and the policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AccessRecord {
    /// [`edge_proto::access::Scope::key`].
    pub scope: String,
    /// The node the scope is part of.
    pub node: String,
    /// The rules and default.
    pub policy: edge_proto::access::Policy,
}

/// The routes column: JSON text, `None` when never reported.
pub fn encode_routes(routes: Option<&[edge_proto::routes::RouteReport]>) -> Option<String> {
    routes.map(|r| serde_json::to_string(r).unwrap_or_else(|_| "[]".into()))
}

/// Reads the routes column. A value that does not decode (say, written by
/// a newer server of the cluster) reads as not reported: it is what the
/// agent said, shown to operators, and never routes anything.
pub fn decode_routes(text: Option<&str>) -> Option<Vec<edge_proto::routes::RouteReport>> {
    text.and_then(|t| serde_json::from_str(t).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_round_trip() {
        use edge_proto::routes::{RouteMode, RouteReport, UpstreamReport};
        let up = UpstreamReport { addr: "127.0.0.1:80".into(), up: false, check: "http".into() };
        let routes = vec![RouteReport { host: "*".into(), mode: RouteMode::Passthrough, upstreams: vec![up] }];
        assert_eq!(decode_routes(encode_routes(Some(&routes)).as_deref()), Some(routes));
        assert_eq!(decode_routes(None), None);
        assert_eq!(decode_routes(Some("{not json")), None);
    }

    #[test]
    fn names_round_trip() {
        for m in [Mode::Direct, Mode::Proxy, Mode::Offline] {
            assert_eq!(Mode::parse(m.as_str()), Some(m));
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
        for m in [HttpMode::Redirect, HttpMode::Proxy] {
            assert_eq!(m.as_str().parse::<HttpMode>(), Ok(m));
        }
        assert!(Mode::parse("Direct").is_none());
        for k in [StaticKind::A, StaticKind::AAAA, StaticKind::TXT, StaticKind::CAA] {
            assert_eq!(k.as_str().to_lowercase().parse::<StaticKind>(), Ok(k));
        }
        assert!("MX".parse::<StaticKind>().is_err());
        assert!("tunnel".parse::<HttpMode>().is_err());
    }
}
