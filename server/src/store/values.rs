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

#[cfg(test)]
mod tests {
    use super::*;

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
