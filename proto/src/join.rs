//! The join string: one line an operator copies from `edge-server node add`
//! to `edge-agent run --join`.
//!
//! Format: `edge://<token>@<host>:<port>?fp=<sha256-hex>&api=<host>:<port>`
//!
//! - `<token>` is the node token, `<node>.<secret>`, where the secret is 32
//!   random bytes in unpadded base64url. The node name is part of the token so
//!   that one bearer value identifies and authenticates the node.
//! - `<host>:<port>` is the server's QUIC (UDP) address.
//! - `fp` pins the SHA-256 fingerprint of the server's certificate (DER). It
//!   may be omitted when the agent is configured with a CA file instead.
//! - `api` is the signal API (HTTPS) address; it defaults to the QUIC address
//!   (same port number, TCP).

use std::fmt;

use base64::Engine;

/// Parsed join string.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTicket {
    /// Node token, `<node>.<secret>`.
    pub token: String,
    /// Server QUIC address, `host:port`.
    pub server: String,
    /// Pinned SHA-256 fingerprint of the server certificate.
    pub fingerprint: Option<[u8; 32]>,
    /// Signal API address, `host:port`.
    pub api: String,
}

impl fmt::Debug for JoinTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinTicket")
            .field("node", &node_of_token(&self.token))
            .field("token", &"<redacted>")
            .field("server", &self.server)
            .field("fingerprint", &self.fingerprint.map(|f| hex(&f)))
            .field("api", &self.api)
            .finish()
    }
}

/// Why a join string or token could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// Does not start with `edge://`.
    #[error("join string must start with \"edge://\"")]
    Scheme,
    /// The token part is missing or malformed.
    #[error("join string has no valid token before '@' (expected <node>.<secret>)")]
    Token,
    /// The server address is missing or has no port.
    #[error("join string server address {0:?} must be host:port")]
    Server(String),
    /// `fp` is not 64 hex digits.
    #[error("join string fingerprint {0:?} must be 64 hex digits (SHA-256)")]
    Fingerprint(String),
    /// A query parameter this version does not know.
    #[error("join string has unknown parameter {0:?}")]
    UnknownParameter(String),
}

impl JoinTicket {
    /// Parses a join string.
    pub fn parse(s: &str) -> Result<Self, JoinError> {
        let rest = s.trim().strip_prefix("edge://").ok_or(JoinError::Scheme)?;
        let (token, rest) = rest.split_once('@').ok_or(JoinError::Token)?;
        node_of_token(token).ok_or(JoinError::Token)?;
        let (server, query) = match rest.split_once('?') {
            Some((server, query)) => (server.trim_end_matches('/'), query),
            None => (rest.trim_end_matches('/'), ""),
        };
        check_host_port(server)?;
        let mut fingerprint = None;
        let mut api = server.to_string();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("fp", value)) => {
                    fingerprint = Some(parse_fingerprint(value).ok_or_else(|| JoinError::Fingerprint(value.into()))?)
                }
                Some(("api", value)) => {
                    check_host_port(value)?;
                    api = value.to_string();
                }
                _ => return Err(JoinError::UnknownParameter(pair.split('=').next().unwrap_or("").into())),
            }
        }
        Ok(JoinTicket { token: token.to_string(), server: server.to_string(), fingerprint, api })
    }

    /// The node name carried in the token.
    pub fn node(&self) -> &str {
        node_of_token(&self.token).unwrap_or("")
    }
}

impl fmt::Display for JoinTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "edge://{}@{}", self.token, self.server)?;
        let mut sep = '?';
        if let Some(fp) = &self.fingerprint {
            write!(f, "{sep}fp={}", hex(fp))?;
            sep = '&';
        }
        if self.api != self.server {
            write!(f, "{sep}api={}", self.api)?;
        }
        Ok(())
    }
}

fn check_host_port(s: &str) -> Result<(), JoinError> {
    let bad = || JoinError::Server(s.to_string());
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    if host.contains(['/', '@', '?', '&', ' ']) {
        return Err(bad());
    }
    Ok(())
}

/// Generates a new node token from 32 random bytes.
pub fn make_token(node: &str, secret: &[u8; 32]) -> String {
    format!("{node}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret))
}

/// The node name of a well-formed token (`<node>.<43 base64url chars>`).
pub fn node_of_token(token: &str) -> Option<&str> {
    let (node, secret) = token.split_once('.')?;
    crate::names::validate_node_name(node).ok()?;
    let ok = secret.len() == 43 && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(node)
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a SHA-256 fingerprint: 64 hex digits, `:` separators allowed.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
    if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let token = make_token("n1", &[9u8; 32]);
        let ticket = JoinTicket {
            token: token.clone(),
            server: "edge.example.com:4433".into(),
            fingerprint: Some([0xab; 32]),
            api: "edge.example.com:8443".into(),
        };
        let text = ticket.to_string();
        assert_eq!(JoinTicket::parse(&text).unwrap(), ticket);
        assert_eq!(ticket.node(), "n1");
        assert!(!format!("{ticket:?}").contains(&token), "Debug must not show the token");
        let same_port = format!("edge://{token}@127.0.0.1:4433");
        let parsed = JoinTicket::parse(&same_port).unwrap();
        assert_eq!(parsed.api, "127.0.0.1:4433");
        assert_eq!(parsed.to_string(), same_port);
    }

    #[test]
    fn errors_name_the_part() {
        let token = make_token("n1", &[1u8; 32]);
        assert_eq!(JoinTicket::parse("http://x"), Err(JoinError::Scheme));
        assert_eq!(JoinTicket::parse("edge://bad@h:1"), Err(JoinError::Token));
        assert!(matches!(JoinTicket::parse(&format!("edge://{token}@h")), Err(JoinError::Server(_))));
        assert!(matches!(JoinTicket::parse(&format!("edge://{token}@h:1?fp=zz")), Err(JoinError::Fingerprint(_))));
        let plus = format!("+a{}", "0".repeat(62));
        assert!(matches!(JoinTicket::parse(&format!("edge://{token}@h:1?fp={plus}")), Err(JoinError::Fingerprint(_))));
        assert!(matches!(JoinTicket::parse(&format!("edge://{token}@h:1?x=1")), Err(JoinError::UnknownParameter(_))));
    }
}
