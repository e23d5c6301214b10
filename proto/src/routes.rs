//! A node's routes: which of its hostnames go to which local upstreams, as
//! the agent reports them to the server, plus the rules both ends share
//! (host patterns, which route a name selects, the HTTP answers the agent
//! gives when a route cannot serve).

use serde::{Deserialize, Serialize};

/// Most routes an agent may declare (and report).
pub const MAX_ROUTES: usize = 64;
/// Most upstreams per route.
pub const MAX_UPSTREAMS: usize = 16;
/// The pattern of the default route (the agent's top-level `upstream`):
/// every name of the node that no other route matches.
pub const DEFAULT_HOST: &str = "*";

/// What the agent does with a route's client connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteMode {
    /// Terminate TLS with the node's certificate, forward plaintext.
    #[default]
    Terminate,
    /// Forward the raw TLS bytes to a local TLS service.
    Passthrough,
}

impl std::fmt::Display for RouteMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Terminate => "terminate",
            Self::Passthrough => "passthrough",
        })
    }
}

/// Which names a route serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// One name.
    Exact(String),
    /// `*.parent`: every name one label below `parent`.
    Wildcard(String),
    /// The default route: any name no other route matches.
    Any,
}

/// Why a host pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Not a hostname, `*.` plus a hostname, or `*`.
    #[error("{0:?} is not a hostname or *.hostname")]
    Invalid(String),
}

impl HostPattern {
    /// Parses `name`, `*.name` or `*` (names are normalized: lowercase, no
    /// trailing dot).
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text == DEFAULT_HOST {
            return Ok(Self::Any);
        }
        let invalid = || PatternError::Invalid(text.chars().take(300).collect());
        let (wild, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let name = crate::names::normalize_hostname(name).ok_or_else(invalid)?;
        if name.contains('*') {
            return Err(invalid());
        }
        Ok(if wild { Self::Wildcard(name) } else { Self::Exact(name) })
    }

    /// Whether the normalized name `sni` is one this pattern serves.
    pub fn matches(&self, sni: &str) -> bool {
        match self {
            Self::Exact(name) => name == sni,
            Self::Wildcard(parent) => {
                sni.len() > parent.len() + 1
                    && sni.ends_with(parent.as_str())
                    && sni.as_bytes()[sni.len() - parent.len() - 1] == b'.'
                    && !sni[..sni.len() - parent.len() - 1].contains('.')
            }
            Self::Any => true,
        }
    }

    /// Whether a node owning `hostnames` (exact names and `*.` wildcards)
    /// is sent names this pattern matches: a route outside the node's names
    /// would never see a client.
    pub fn within(&self, hostnames: &[String]) -> bool {
        let owned = |name: &str| {
            hostnames.iter().any(|h| h == name)
                || crate::names::wildcard_parent(name).is_some_and(|w| hostnames.contains(&w))
        };
        match self {
            Self::Exact(name) => owned(name),
            Self::Wildcard(parent) => hostnames.iter().any(|h| h.strip_prefix("*.") == Some(parent.as_str())),
            Self::Any => true,
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(parent) => write!(f, "*.{parent}"),
            Self::Any => f.write_str(DEFAULT_HOST),
        }
    }
}

/// The route for `sni` among `routes`: an exact match first, then a
/// wildcard, then the default; the first of equal kind wins.
pub fn select<'a, T>(routes: impl IntoIterator<Item = (&'a HostPattern, T)> + Clone, sni: &str) -> Option<T> {
    let pick = |want: fn(&HostPattern) -> bool| {
        routes.clone().into_iter().find(|(p, _)| want(p) && p.matches(sni)).map(|(_, t)| t)
    };
    pick(|p| matches!(p, HostPattern::Exact(_)))
        .or_else(|| pick(|p| matches!(p, HostPattern::Wildcard(_))))
        .or_else(|| pick(|p| matches!(p, HostPattern::Any)))
}

/// Why a TCP service name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceNameError {
    /// Not 1 to 63 of lowercase letters, digits and `-`, or starting or
    /// ending with `-`.
    #[error("service name {0:?} must be 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'")]
    Invalid(String),
}

/// Checks a TCP service name (the name the server uses and the agent
/// declares its target under): one DNS-label-like word.
pub fn validate_service_name(name: &str) -> Result<(), ServiceNameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ServiceNameError::Invalid(name.chars().take(80).collect()))
    }
}

/// One route as the agent reports it ([`crate::tunnel::AgentMessage::Routes`]).
/// Unknown fields are ignored: the report only informs operators, and a
/// newer agent's extra fields must not close its tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteReport {
    /// The host pattern (`name`, `*.name`, or `*` for the default route).
    pub host: String,
    /// Terminate or passthrough.
    pub mode: RouteMode,
    /// Its upstreams, in the configured order.
    pub upstreams: Vec<UpstreamReport>,
}

/// One upstream of a route and its health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamReport {
    /// `host:port`.
    pub addr: String,
    /// Whether it takes connections (active and passive checks).
    pub up: bool,
    /// Which active check runs: `tcp`, `http` or `none`.
    pub check: String,
}

impl RouteReport {
    /// Whether the report is bounded and plain (it reaches logs, the store
    /// and the dashboard).
    pub fn is_valid(&self) -> bool {
        let plain = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        };
        HostPattern::parse(&self.host).is_ok()
            && !self.upstreams.is_empty()
            && self.upstreams.len() <= MAX_UPSTREAMS
            && self.upstreams.iter().all(|u| plain(&u.addr, 262) && plain(&u.check, 16))
    }
}

/// Whether a whole report is acceptable: at most [`MAX_ROUTES`] valid routes.
pub fn valid_report(routes: &[RouteReport]) -> bool {
    routes.len() <= MAX_ROUTES && routes.iter().all(RouteReport::is_valid)
}

/// The HTTP answers the agent gives itself when a route cannot serve a
/// request (over the node's TLS, or on plain HTTP from the server's :80).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No route serves the name (and there is no default route).
    NotFound,
    /// Connecting to the upstream failed.
    BadGateway,
    /// Every upstream of the route is down.
    Unavailable,
}

impl Refusal {
    /// The status line's code and reason.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Self::NotFound => (404, "Not Found"),
            Self::BadGateway => (502, "Bad Gateway"),
            Self::Unavailable => (503, "Service Unavailable"),
        }
    }

    /// A complete HTTP/1.1 response that closes the connection.
    pub fn response(self) -> Vec<u8> {
        let (code, reason) = self.status();
        let body = match self {
            Self::NotFound => "no route for this name on the node\n",
            Self::BadGateway => "the node could not reach its upstream\n",
            Self::Unavailable => "every upstream of this route is down\n",
        };
        format!(
            "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
             connection: close\r\ncache-control: no-store\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn patterns_parse_and_normalize() {
        assert_eq!(p("Web1.Z.Test."), HostPattern::Exact("web1.z.test".into()));
        assert_eq!(p("*.web1.z.test"), HostPattern::Wildcard("web1.z.test".into()));
        assert_eq!(p("*"), HostPattern::Any);
        for bad in ["", "*.", "a.*.b", "**.a", "a b", "*.*.a", &"a".repeat(300)] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(p("*.a.b").to_string(), "*.a.b");
    }

    #[test]
    fn wildcards_cover_one_label() {
        let w = p("*.web1.z.test");
        assert!(w.matches("api.web1.z.test"));
        assert!(!w.matches("web1.z.test"));
        assert!(!w.matches("a.b.web1.z.test"));
        assert!(!w.matches("xweb1.z.test"));
        assert!(!w.matches(".web1.z.test"));
        assert!(p("*").matches("anything.z.test"));
    }

    #[test]
    fn exact_then_wildcard_then_default() {
        let routes = [(p("*"), 0), (p("*.web1.z.test"), 1), (p("api.web1.z.test"), 2), (p("api.web1.z.test"), 3)];
        let sel = |sni| select(routes.iter().map(|(p, n)| (p, *n)), sni);
        assert_eq!(sel("api.web1.z.test"), Some(2), "exact wins, first of equals");
        assert_eq!(sel("db.web1.z.test"), Some(1));
        assert_eq!(sel("web1.z.test"), Some(0));
        let no_default = [(p("web1.z.test"), 9)];
        assert_eq!(select(no_default.iter().map(|(p, n)| (p, *n)), "x.web1.z.test"), None);
    }

    #[test]
    fn within_the_nodes_names() {
        let names = vec!["web1.z.test".to_string(), "*.web1.z.test".to_string()];
        assert!(p("web1.z.test").within(&names));
        assert!(p("api.web1.z.test").within(&names));
        assert!(p("*.web1.z.test").within(&names));
        assert!(!p("web2.z.test").within(&names));
        assert!(!p("a.b.web1.z.test").within(&names));
        assert!(!p("*.api.web1.z.test").within(&names));
    }

    #[test]
    fn service_names() {
        for ok in ["ssh", "db-1", "a"] {
            assert!(validate_service_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a b", &"a".repeat(64)] {
            assert!(validate_service_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reports_are_bounded() {
        let up = UpstreamReport { addr: "127.0.0.1:80".into(), up: true, check: "tcp".into() };
        let ok = RouteReport { host: "a.z.test".into(), mode: RouteMode::Terminate, upstreams: vec![up.clone()] };
        assert!(ok.is_valid());
        assert!(!RouteReport { upstreams: vec![], ..ok.clone() }.is_valid());
        assert!(!RouteReport { host: "a\nb".into(), ..ok.clone() }.is_valid());
        let bad_addr = UpstreamReport { addr: "x\"y".into(), ..up.clone() };
        assert!(!RouteReport { upstreams: vec![bad_addr], ..ok.clone() }.is_valid());
        assert!(!RouteReport { upstreams: vec![up; MAX_UPSTREAMS + 1], ..ok.clone() }.is_valid());
        assert!(!valid_report(&vec![ok; MAX_ROUTES + 1]));
    }

    #[test]
    fn refusals_are_complete_responses() {
        for r in [Refusal::NotFound, Refusal::BadGateway, Refusal::Unavailable] {
            let text = String::from_utf8(r.response()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {} ", r.status().0)));
            assert!(head.contains(&format!("content-length: {}", body.len())));
        }
    }
}
