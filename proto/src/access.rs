//! Access rules: which client addresses may reach a node, one of its
//! hostnames, or a TCP service. A policy is an ordered list of allow and
//! deny rules over CIDR blocks (IPv4 and IPv6) with a default; the first
//! rule that matches decides.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Most rules in one policy.
pub const MAX_RULES: usize = 256;

/// What a rule (or the default) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The client is let through.
    Allow,
    /// The client is refused (TLS alert `access_denied`, or closed).
    Deny,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

impl std::str::FromStr for Action {
    type Err = AccessError;
    fn from_str(s: &str) -> Result<Self, AccessError> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            other => Err(AccessError::Action(other.chars().take(40).collect())),
        }
    }
}

/// A CIDR block, `192.0.2.0/24` or `2001:db8::/32` (a bare address is a
/// block of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

/// Why a rule or policy is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// Not an address or `address/length` with a length that fits.
    #[error("{0:?} is not a CIDR block (192.0.2.0/24, 2001:db8::/32 or an address)")]
    Cidr(String),
    /// Neither `allow` nor `deny`.
    #[error("{0:?} is not allow or deny")]
    Action(String),
    /// More than [`MAX_RULES`] rules.
    #[error("{0} rules, at most 256")]
    TooMany(usize),
}

impl std::str::FromStr for Cidr {
    type Err = AccessError;
    fn from_str(text: &str) -> Result<Self, AccessError> {
        let bad = || AccessError::Cidr(text.chars().take(60).collect());
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => l.parse::<u8>().map_err(|_| bad())?,
            Some(_) => return Err(bad()),
            None => max,
        };
        if len > max {
            return Err(bad());
        }
        Ok(Self { addr: mask(addr, len), len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            IpAddr::V6((bits & m).into())
        }
    }
}

/// IPv4-mapped IPv6 clients (`::ffff:192.0.2.1` on a dual-stack socket)
/// are matched as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Cidr {
    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
}

/// One rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Allow or deny.
    pub action: Action,
    /// The clients it covers.
    pub cidr: Cidr,
}

/// An ordered list of rules and a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Evaluated in order; the first match decides.
    pub rules: Vec<Rule>,
    /// When no rule matches.
    pub default: Action,
}

impl Policy {
    /// A policy, refused when it has too many rules.
    pub fn new(rules: Vec<Rule>, default: Action) -> Result<Self, AccessError> {
        if rules.len() > MAX_RULES {
            return Err(AccessError::TooMany(rules.len()));
        }
        Ok(Self { rules, default })
    }

    /// What the policy says for a client at `ip`.
    pub fn evaluate(&self, ip: IpAddr) -> Action {
        self.rules.iter().find(|r| r.cidr.contains(ip)).map_or(self.default, |r| r.action)
    }
}

/// What a policy applies to. The most specific scope that has a policy
/// decides: a hostname's or a service's policy, else the node's, else
/// everyone is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every connection to the node (its names and its services).
    Node(String),
    /// One hostname (exact, as clients send it in SNI).
    Host(String),
    /// One TCP service by name.
    Service(String),
}

impl Scope {
    /// The stored key: `node:NAME`, `host:NAME` or `service:NAME`.
    pub fn key(&self) -> String {
        match self {
            Self::Node(n) => format!("node:{n}"),
            Self::Host(h) => format!("host:{h}"),
            Self::Service(s) => format!("service:{s}"),
        }
    }

    /// Parses [`Scope::key`].
    pub fn parse(key: &str) -> Option<Self> {
        let (kind, name) = key.split_once(':')?;
        if name.is_empty() {
            return None;
        }
        match kind {
            "node" => Some(Self::Node(name.into())),
            "host" => Some(Self::Host(name.into())),
            "service" => Some(Self::Service(name.into())),
            _ => None,
        }
    }
}

/// The decision for a client at `ip`, given the policy of the specific
/// scope (hostname or service) and of the node, when they exist.
pub fn decide(specific: Option<&Policy>, node: Option<&Policy>, ip: IpAddr) -> Action {
    specific.or(node).map_or(Action::Allow, |p| p.evaluate(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(action: Action, cidr: &str) -> Rule {
        Rule { action, cidr: cidr.parse().unwrap() }
    }

    #[test]
    fn cidrs_parse_mask_and_match() {
        let c: Cidr = "192.0.2.77/24".parse().unwrap();
        assert_eq!(c.to_string(), "192.0.2.0/24");
        assert!(c.contains(ip("192.0.2.1")) && !c.contains(ip("192.0.3.1")));
        assert!(c.contains(ip("::ffff:192.0.2.9")), "mapped IPv4 matches as IPv4");
        let one: Cidr = "127.0.0.2".parse().unwrap();
        assert!(one.contains(ip("127.0.0.2")) && !one.contains(ip("127.0.0.3")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")) && !v6.contains(ip("192.0.2.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.5")) && !all.contains(ip("::1")));
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("::1")));
        for bad in ["", "x", "1.2.3.4/33", "::/129", "1.2.3.4/", "1.2.3.4/+1", "1.2.3.4/ 8", "10.0.0.0/8/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn first_match_then_default() {
        let p = Policy::new(vec![rule(Action::Deny, "127.0.0.3"), rule(Action::Allow, "127.0.0.0/8")], Action::Deny)
            .unwrap();
        assert_eq!(p.evaluate(ip("127.0.0.2")), Action::Allow);
        assert_eq!(p.evaluate(ip("127.0.0.3")), Action::Deny, "the deny comes first");
        assert_eq!(p.evaluate(ip("192.0.2.1")), Action::Deny, "default");
        assert!(Policy::new(vec![rule(Action::Allow, "::1"); MAX_RULES + 1], Action::Allow).is_err());
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"rules":[{"action":"deny","cidr":"127.0.0.3/32"},{"action":"allow","cidr":"127.0.0.0/8"}],"default":"deny"}"#
        );
        assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), p);
    }

    #[test]
    fn the_most_specific_scope_decides() {
        let deny_all = Policy::new(vec![], Action::Deny).unwrap();
        let allow_all = Policy::new(vec![], Action::Allow).unwrap();
        assert_eq!(decide(None, None, ip("192.0.2.1")), Action::Allow);
        assert_eq!(decide(None, Some(&deny_all), ip("192.0.2.1")), Action::Deny);
        assert_eq!(decide(Some(&allow_all), Some(&deny_all), ip("192.0.2.1")), Action::Allow);
        for s in [Scope::Node("n1".into()), Scope::Host("a.n1.z".into()), Scope::Service("ssh".into())] {
            assert_eq!(Scope::parse(&s.key()), Some(s));
        }
        assert_eq!(Scope::parse("node:"), None);
        assert_eq!(Scope::parse("zone:x"), None);
    }
}
