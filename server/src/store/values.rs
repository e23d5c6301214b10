//! Typed values the store keeps as short text columns.

use std::fmt;

/// Where a node's names point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// DNS points at the node's own public endpoint.
    Direct,
    /// DNS points at the cluster; traffic goes through the tunnel.
    Proxy,
    /// Neither reachable nor tunneled.
    #[default]
    Offline,
}

impl Mode {
    /// Lowercase name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Proxy => "proxy",
            Mode::Offline => "offline",
        }
    }

    /// Parses [`Mode::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(Mode::Direct),
            "proxy" => Some(Mode::Proxy),
            "offline" => Some(Mode::Offline),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What plain HTTP on :80 does for a node in proxy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// 307 to https (the default).
    #[default]
    Redirect,
    /// The request goes to the agent's upstream through the tunnel.
    Proxy,
}

impl HttpMode {
    /// Lowercase name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMode::Redirect => "redirect",
            HttpMode::Proxy => "proxy",
        }
    }

    /// Parses [`HttpMode::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "redirect" => Some(HttpMode::Redirect),
            "proxy" => Some(HttpMode::Proxy),
            _ => None,
        }
    }
}

impl fmt::Display for HttpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HttpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("{s:?} is not an HTTP mode (redirect or proxy)"))
    }
}

/// Types of static DNS records (in `[dns]` or in the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum StaticKind {
    /// IPv4 address.
    A,
    /// IPv6 address.
    AAAA,
    /// Text.
    TXT,
    /// CA authorization: `<flags> issue|issuewild "<ca>[; key=value]..."`,
    /// e.g. `0 issue "letsencrypt.org; validationmethods=dns-01"`. A CAA
    /// record at the apex replaces the ones derived from `[acme]`.
    CAA,
}

impl StaticKind {
    /// The type's name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            StaticKind::A => "A",
            StaticKind::AAAA => "AAAA",
            StaticKind::TXT => "TXT",
            StaticKind::CAA => "CAA",
        }
    }

    /// Parses [`StaticKind::as_str`] (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "A" => Some(StaticKind::A),
            "AAAA" => Some(StaticKind::AAAA),
            "TXT" => Some(StaticKind::TXT),
            "CAA" => Some(StaticKind::CAA),
            _ => None,
        }
    }
}

impl fmt::Display for StaticKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StaticKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("{s:?} is not a record type (A, AAAA, TXT or CAA)"))
    }
}

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
