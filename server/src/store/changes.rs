//! Typed change events: what a write changed, named but not carried. A
//! subscriber re-reads what an event names, so events may arrive twice or
//! out of order without harm, and no secret (a token hash) travels in them.

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "node", rename_all = "snake_case")]
pub enum Change {
    /// A node was created.
    NodeAdded(String),
    /// A node was removed (its routes, tunnels and values go with it).
    NodeRemoved(String),
    /// A node's settings changed (plain HTTP mode).
    NodeUpdated(String),
    /// A node's token was replaced: its tunnels must be cut.
    TokenRotated(String),
    /// A TXT value was published for a node.
    ChallengePut(String),
    /// TXT values of a node were removed or expired.
    ChallengeRemoved(String),
    /// A node's mode changed (its DNS answer may change).
    ModeChanged(String),
    /// Static DNS records were added or removed.
    DnsRecordsChanged,
    /// TCP services were added or removed.
    ServicesChanged,
    /// Access policies were set or cleared.
    AccessChanged,
    /// Custom domains were claimed, removed, or started or stopped routing.
    DomainsChanged,
    /// A server joined the cluster, left it, or was declared gone.
    ServersChanged,
    /// A whole store was written by `store copy`: reload everything.
    Imported,
}

impl Change {
    /// The node the change is about (`None` for [`Change::Imported`]).
    pub fn node(&self) -> Option<&str> {
        match self {
            Change::NodeAdded(n)
            | Change::NodeRemoved(n)
            | Change::NodeUpdated(n)
            | Change::TokenRotated(n)
            | Change::ChallengePut(n)
            | Change::ChallengeRemoved(n)
            | Change::ModeChanged(n) => Some(n),
            Change::DnsRecordsChanged
            | Change::ServicesChanged
            | Change::AccessChanged
            | Change::DomainsChanged
            | Change::ServersChanged
            | Change::Imported => None,
        }
    }

    /// The kind as stored in the change log.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::NodeAdded(_) => "node_added",
            Change::NodeRemoved(_) => "node_removed",
            Change::NodeUpdated(_) => "node_updated",
            Change::TokenRotated(_) => "token_rotated",
            Change::ChallengePut(_) => "challenge_put",
            Change::ChallengeRemoved(_) => "challenge_removed",
            Change::ModeChanged(_) => "mode_changed",
            Change::DnsRecordsChanged => "dns_records_changed",
            Change::ServicesChanged => "services_changed",
            Change::AccessChanged => "access_changed",
            Change::DomainsChanged => "domains_changed",
            Change::ServersChanged => "servers_changed",
            Change::Imported => "imported",
        }
    }

    /// Parses a stored kind and node; unknown kinds (a newer server wrote
    /// them) read as [`Change::Imported`], which makes the reader reload.
    pub fn from_parts(kind: &str, node: &str) -> Self {
        let n = node.to_string();
        match kind {
            "node_added" => Change::NodeAdded(n),
            "node_removed" => Change::NodeRemoved(n),
            "node_updated" => Change::NodeUpdated(n),
            "token_rotated" => Change::TokenRotated(n),
            "challenge_put" => Change::ChallengePut(n),
            "challenge_removed" => Change::ChallengeRemoved(n),
            "mode_changed" => Change::ModeChanged(n),
            "dns_records_changed" => Change::DnsRecordsChanged,
            "services_changed" => Change::ServicesChanged,
            "access_changed" => Change::AccessChanged,
            "domains_changed" => Change::DomainsChanged,
            "servers_changed" => Change::ServersChanged,
            _ => Change::Imported,
        }
    }
}

/// A change at the revision it produced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeEvent {
    /// The store's revision after the change.
    pub revision: i64,
    /// What changed.
    pub change: Change,
    /// The store handle (process) that wrote it; a watcher skips its own,
    /// which were announced at once.
    pub origin: String,
}

impl ChangeEvent {
    /// The notification payload (PostgreSQL `NOTIFY`).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses [`ChangeEvent::encode`]; `None` if it is not one.
    pub fn decode(payload: &str) -> Option<Self> {
        serde_json::from_str(payload).ok()
    }
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// One change.
    Change(ChangeEvent),
    /// Changes may have been missed (reconnect, a pruned log, a lagging
    /// subscriber): reload everything.
    Resync,
}

/// A random id for one store handle, the `origin` of its events.
pub fn new_origin() -> String {
    let bytes: [u8; 8] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_unknown_kinds_reload() {
        let all = [
            Change::NodeAdded("a".into()),
            Change::NodeRemoved("a".into()),
            Change::NodeUpdated("a".into()),
            Change::TokenRotated("a".into()),
            Change::ChallengePut("a".into()),
            Change::ChallengeRemoved("a".into()),
            Change::ModeChanged("a".into()),
        ];
        for change in all {
            assert_eq!(Change::from_parts(change.kind(), change.node().unwrap()), change);
            let event = ChangeEvent { revision: 7, change, origin: "o".into() };
            assert_eq!(ChangeEvent::decode(&event.encode()), Some(event));
        }
        assert_eq!(Change::from_parts("dns_records_changed", ""), Change::DnsRecordsChanged);
        let event = ChangeEvent { revision: 1, change: Change::DnsRecordsChanged, origin: "o".into() };
        assert_eq!(ChangeEvent::decode(&event.encode()), Some(event));
        assert_eq!(Change::from_parts("domains_changed", ""), Change::DomainsChanged);
        assert_eq!(Change::from_parts("route_added", "a"), Change::Imported);
        assert_eq!(ChangeEvent::decode("{\"revision\":1}"), None);
        assert_eq!(ChangeEvent::decode("not json"), None);
    }
}
