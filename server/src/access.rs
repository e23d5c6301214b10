//! Access policies in force, as the store sync last published them, and the
//! check every listener makes before anything reaches a tunnel: the
//! policy of the hostname (or TCP service), else of the node, else allow.
//! Denials are counted and logged at a limited rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use edge_proto::access::{decide, Action, Policy, Scope};

use crate::store::AccessRecord;

/// The policies by scope key, swapped whole.
#[derive(Debug)]
pub struct AccessTable {
    policies: RwLock<Arc<HashMap<String, Policy>>>,
    /// Clients refused so far.
    pub denied: AtomicU64,
    log: edge_net::logging::Throttle,
}

impl Default for AccessTable {
    fn default() -> Self {
        Self::new()
    }
}

impl AccessTable {
    /// An empty table (everyone allowed).
    pub fn new() -> Self {
        Self {
            policies: RwLock::default(),
            denied: AtomicU64::new(0),
            log: edge_net::logging::Throttle::new(crate::limits::LOG_EVERY),
        }
    }

    /// Puts `records` in force.
    pub fn set(&self, records: &[AccessRecord]) {
        let map = records.iter().map(|r| (r.scope.clone(), r.policy.clone())).collect();
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }

    /// Whether a client at `ip` may reach `specific` (a hostname or TCP
    /// service) of `node`. A denial is counted and logged (at most one line
    /// per 10 s).
    pub fn allows(&self, node: &str, specific: &Scope, ip: IpAddr) -> bool {
        let policies = self.policies.read().unwrap_or_else(|p| p.into_inner()).clone();
        if policies.is_empty() {
            return true;
        }
        let node_policy = policies.get(&Scope::Node(node.to_string()).key());
        let action = decide(policies.get(&specific.key()), node_policy, ip);
        if action == Action::Deny {
            self.denied.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.log.due() {
                tracing::info!(client = %ip, %node, scope = %specific.key(), suppressed,
                    "client denied by an access policy (logged at most every 10 s)");
            }
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_proto::access::Rule;

    #[test]
    fn hostname_policy_overrides_the_nodes() {
        let t = AccessTable::new();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let host = Scope::Host("api.n1.z".into());
        assert!(t.allows("n1", &host, ip("127.0.0.3")), "no policy: allowed");
        let deny3 = Policy::new(vec![Rule { action: Action::Deny, cidr: "127.0.0.3".parse().unwrap() }], Action::Allow)
            .unwrap();
        let only2 = Policy::new(vec![Rule { action: Action::Allow, cidr: "127.0.0.2".parse().unwrap() }], Action::Deny)
            .unwrap();
        t.set(&[
            AccessRecord { scope: "node:n1".into(), node: "n1".into(), policy: deny3 },
            AccessRecord { scope: host.key(), node: "n1".into(), policy: only2 },
        ]);
        assert!(t.allows("n1", &host, ip("127.0.0.2")));
        assert!(!t.allows("n1", &host, ip("127.0.0.4")), "the host's default");
        let other = Scope::Host("n1.z".into());
        assert!(t.allows("n1", &other, ip("127.0.0.4")), "the node's policy for other names");
        assert!(!t.allows("n1", &other, ip("127.0.0.3")));
        assert!(t.allows("n2", &Scope::Host("n2.z".into()), ip("127.0.0.3")), "another node is untouched");
        assert_eq!(t.denied.load(Ordering::Relaxed), 2);
    }
}
