//! Customers' own domains: a claim ties a domain to one node in the store
//! (`edge-server domain add`); a check looks up `_edge-verify.<domain>` TXT
//! at the configured resolver and records what it found
//! ([`edge_proto::domains::VerifyState::after`] decides whether the domain
//! routes). The routed ones reach the registry through the sync, and each
//! agent learns its node's over the tunnel.
//!
//! - [`lookup`]: the TXT lookup (UDP, TCP on truncation).

pub mod lookup;

use std::net::SocketAddr;
use std::time::Duration;

use edge_proto::domains::{CheckOutcome, DomainView, VerifyState};

use crate::config::DomainsConfig;
use crate::store::{DomainRecord, Store, StoreError};

/// Where resolvers are listed when `domains.resolver` is not set.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The first `nameserver` of a resolv.conf text, on port 53.
pub fn parse_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver")).then(|| words.next())?.and_then(|ip| {
            // A scoped IPv6 address (fe80::1%eth0) is not usable as is.
            ip.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
    })
}

/// The resolver checks ask: `domains.resolver`, else the system's.
pub fn resolver(config: &DomainsConfig) -> Option<SocketAddr> {
    config.resolver.or_else(|| std::fs::read_to_string(RESOLV_CONF).ok().and_then(|t| parse_resolv_conf(&t)))
}

/// Looks the ownership record of `record` up once.
pub async fn check(config: &DomainsConfig, record: &DomainRecord) -> CheckOutcome {
    let Some(resolver) = resolver(config) else {
        return CheckOutcome::Unreachable(format!("no resolver: set domains.resolver (none in {RESOLV_CONF})"));
    };
    let name = edge_proto::domains::verify_name(&record.name);
    let deadline = Duration::from_millis(config.lookup_timeout_ms);
    match lookup::txt(resolver, &name, deadline).await {
        Ok(answer) if answer.nxdomain => CheckOutcome::Missing(format!("{name} does not exist")),
        Ok(answer) => CheckOutcome::of_values(&answer.values, &record.verify_value),
        Err(e) => CheckOutcome::Unreachable(e.to_string()),
    }
}

/// Checks `record` now and stores the result; returns the new state, or
/// `None` when the domain was removed or reclaimed meanwhile.
pub async fn check_and_record(
    store: &dyn Store,
    config: &DomainsConfig,
    record: &DomainRecord,
) -> Result<Option<VerifyState>, StoreError> {
    let outcome = check(config, record).await;
    let state = record.state.after(&outcome, crate::unix_now(), &config.policy());
    if state.routed != record.state.routed {
        let name = edge_net::logging::Untrusted(&record.name);
        if state.routed {
            tracing::info!(domain = %name, node = %record.node, "custom domain verified: routed");
        } else {
            tracing::warn!(domain = %name, node = %record.node, error = state.last_error.as_deref().unwrap_or(""),
                "custom domain no longer verified: not routed");
        }
    }
    let written = store.record_domain_check(record, &state).await?;
    Ok(written.then_some(state))
}

/// How operators see a domain.
pub fn view(record: &DomainRecord, zone: &str) -> DomainView {
    DomainView {
        name: record.name.clone(),
        node: record.node.clone(),
        verify_name: edge_proto::domains::verify_name(&record.name),
        verify_value: record.verify_value.clone(),
        cname_target: format!("{}.{}", record.node, zone.trim_end_matches('.')),
        created_at: record.created_at,
        status: record.state.status(),
        state: record.state.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_first_nameserver() {
        let text = "# generated\nsearch example\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(parse_resolv_conf(text), Some("10.0.0.2:53".parse().unwrap()));
        assert_eq!(parse_resolv_conf("nameserver ::1\n"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(
            parse_resolv_conf("nameserver fe80::1%eth0\nnameserver 127.0.0.53"),
            Some("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(parse_resolv_conf("options ndots:2\n"), None);
        assert_eq!(parse_resolv_conf("nameserver\n"), None);
    }
}
