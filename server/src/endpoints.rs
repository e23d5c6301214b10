//! Which public endpoints a node may declare for direct mode.
//!
//! Sans-IO: [`resolve`] takes the declared text, the address the agent
//! connects from and what the server knows of its own addresses, and says
//! which address to probe or why not. The rule that matters: the server
//! must never probe (or splice to) itself. A probe of our own :443 would be
//! routed back through the node's tunnel and "verify" an address that is
//! ours, and with the tunnel gone the fallback splice would loop. So
//! addresses are canonicalised first (`[::ffff:127.0.0.1]` is 127.0.0.1), and
//! loopback, unspecified, link-local, multicast and broadcast addresses,
//! port 0, and every address that is one of our own listeners are refused.

use std::net::{IpAddr, SocketAddr};

/// Why a declared endpoint is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not `ip:port` or `:port` (names are not resolved: a probe must not
    /// depend on DNS).
    #[error("endpoint {0:?} is not ip:port or :port")]
    Syntax(String),
    /// Port 0 cannot be connected to.
    #[error("endpoint {0} has port 0")]
    PortZero(SocketAddr),
    /// Loopback, unspecified, link-local, multicast or broadcast: not an
    /// address clients on the internet reach the node at.
    #[error("endpoint {0} is not a public address ({1})")]
    NotPublic(SocketAddr, &'static str),
    /// One of this server's own listeners.
    #[error("endpoint {0} is this server's own listener")]
    Own(SocketAddr),
}

/// The server's own addresses: its listeners (TLS, HTTP, API, metrics) and
/// every address of the host (interfaces, `dns.addresses`, the hosts of
/// `public.*` that are IP literals).
#[derive(Debug, Clone, Default)]
pub struct OwnAddresses {
    /// Bound TCP listeners (a wildcard IP stands for every host address).
    pub listeners: Vec<SocketAddr>,
    /// The host's addresses.
    pub host_ips: Vec<IpAddr>,
}

impl OwnAddresses {
    /// Whether `addr` reaches one of our listeners.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        let ours = |l_ip: IpAddr| {
            let l_ip = l_ip.to_canonical();
            l_ip == ip || (l_ip.is_unspecified() && (ip.is_loopback() || self.host_ips.contains(&ip)))
        };
        self.listeners.iter().any(|l| l.port() == addr.port() && ours(l.ip()))
    }
}

/// The class of address that is never a node's public endpoint.
fn not_public(ip: IpAddr, allow_loopback: bool) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("unspecified"),
        _ if ip.is_loopback() && !allow_loopback => Some("loopback"),
        _ if ip.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        _ => None,
    }
}

/// The address to probe for a declared endpoint: `ip:port`, or `:port` for
/// the address the agent connects from (`remote`). `allow_loopback` admits
/// loopback endpoints (tests and local demos on one machine); our own
/// listeners are refused even then.
pub fn resolve(
    declared: &str,
    remote: SocketAddr,
    own: &OwnAddresses,
    allow_loopback: bool,
) -> Result<SocketAddr, EndpointError> {
    let syntax = || EndpointError::Syntax(declared.chars().take(64).collect());
    let addr = match declared.strip_prefix(':') {
        Some(port) => SocketAddr::new(remote.ip(), port.parse().map_err(|_| syntax())?),
        None => declared.parse().map_err(|_| syntax())?,
    };
    check(addr, own, allow_loopback)
}

/// Whether `addr` may be probed at all (the rules of [`resolve`] for an
/// address already known, e.g. one restored from the store).
pub fn check(addr: SocketAddr, own: &OwnAddresses, allow_loopback: bool) -> Result<SocketAddr, EndpointError> {
    let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    if addr.port() == 0 {
        return Err(EndpointError::PortZero(addr));
    }
    if let Some(class) = not_public(addr.ip(), allow_loopback) {
        return Err(EndpointError::NotPublic(addr, class));
    }
    if own.contains(addr) {
        return Err(EndpointError::Own(addr));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnAddresses {
        OwnAddresses {
            listeners: vec![
                "0.0.0.0:443".parse().unwrap(),
                "[::]:80".parse().unwrap(),
                "127.0.0.1:4433".parse().unwrap(),
            ],
            host_ips: vec!["192.0.2.1".parse().unwrap(), "10.0.0.5".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        }
    }

    fn check(declared: &str) -> Result<SocketAddr, EndpointError> {
        resolve(declared, "198.51.100.7:50000".parse().unwrap(), &own(), false)
    }

    #[test]
    fn public_addresses_and_the_port_form_resolve() {
        assert_eq!(check("203.0.113.9:443"), Ok("203.0.113.9:443".parse().unwrap()));
        assert_eq!(check(":8443"), Ok("198.51.100.7:8443".parse().unwrap()));
        assert_eq!(check("[2001:db8:5::9]:443"), Ok("[2001:db8:5::9]:443".parse().unwrap()));
        // A v4 agent seen through a dual-stack socket: the v4 address.
        let mapped = resolve(":443", "[::ffff:198.51.100.7]:5".parse().unwrap(), &own(), false);
        assert_eq!(mapped, Ok("198.51.100.7:443".parse().unwrap()));
        // Our host, another port: a node on the same machine is allowed.
        assert_eq!(check("192.0.2.1:8443"), Ok("192.0.2.1:8443".parse().unwrap()));
    }

    #[test]
    fn every_shape_of_ourselves_is_refused() {
        for declared in
            ["192.0.2.1:443", "10.0.0.5:443", "[::ffff:192.0.2.1]:443", "[2001:db8::1]:80", "[::ffff:10.0.0.5]:80"]
        {
            assert!(matches!(check(declared), Err(EndpointError::Own(_))), "{declared}: {:?}", check(declared));
        }
        // The agent connecting from our own address, `:port` form.
        let from_us = resolve(":443", "[::ffff:192.0.2.1]:5".parse().unwrap(), &own(), false);
        assert!(matches!(from_us, Err(EndpointError::Own(_))), "{from_us:?}");
        // Loopback allowed (tests): our loopback listeners are still ours.
        for declared in ["127.0.0.1:443", "[::ffff:127.0.0.1]:443", "127.0.0.1:4433", "[::1]:80", "127.0.0.9:443"] {
            let r = resolve(declared, "127.0.0.1:5".parse().unwrap(), &own(), true);
            assert!(matches!(r, Err(EndpointError::Own(_))), "{declared}: {r:?}");
        }
        assert!(resolve("127.0.0.1:9000", "127.0.0.1:5".parse().unwrap(), &own(), true).is_ok());
    }

    #[test]
    fn addresses_no_client_can_use_are_refused() {
        for (declared, class) in [
            ("127.0.0.1:9000", "loopback"),
            ("[::ffff:127.0.0.1]:9000", "loopback"),
            ("[::1]:9000", "loopback"),
            ("0.0.0.0:9000", "unspecified"),
            ("[::]:9000", "unspecified"),
            ("169.254.1.1:9000", "link-local"),
            ("[fe80::1]:9000", "link-local"),
            ("224.0.0.1:9000", "multicast"),
            ("[ff02::1]:9000", "multicast"),
            ("255.255.255.255:9000", "broadcast"),
        ] {
            match check(declared) {
                Err(EndpointError::NotPublic(_, c)) => assert_eq!(c, class, "{declared}"),
                other => panic!("{declared}: {other:?}"),
            }
        }
        assert!(matches!(check(":0"), Err(EndpointError::PortZero(_))));
        assert!(matches!(check("203.0.113.9:0"), Err(EndpointError::PortZero(_))));
        for bad in ["", ":", ":x", "host:443", "203.0.113.9", ":65536", "203.0.113.9:443\n"] {
            assert!(matches!(check(bad), Err(EndpointError::Syntax(_))), "{bad:?}");
        }
        // The agent connecting over loopback with `:port`: loopback.
        let local = resolve(":9000", "127.0.0.1:5".parse().unwrap(), &own(), false);
        assert!(matches!(local, Err(EndpointError::NotPublic(_, "loopback"))), "{local:?}");
    }
}
