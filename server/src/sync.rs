//! Store → registry and zone: the one place the routing state is brought in
//! line with the store. A full load at start and after a resync; otherwise
//! a batch of change events, each re-read from the store for just what it
//! names (so events may repeat or arrive out of order).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use crate::dns::ZoneCell;
use crate::state::Shared;
use crate::store::{Change, StoreError};

/// Applies the store's state to the registry and the zone.
#[derive(Debug)]
pub struct RoutingSync {
    shared: Arc<Shared>,
    zone: Option<Arc<ZoneCell>>,
}

/// What a batch of changes needs re-read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Nodes whose record is re-read (added, removed, re-keyed, settings).
    pub nodes: BTreeSet<String>,
    /// Nodes whose TXT values are re-read.
    pub challenges: BTreeSet<String>,
    /// Nodes whose DNS address is recomputed from the registry.
    pub addresses: BTreeSet<String>,
    /// The stored static DNS records are re-read.
    pub dns_records: bool,
    /// Nodes whose mode is re-read (followers of the cluster's decider
    /// take it from the store).
    pub modes: BTreeSet<String>,
    /// The cluster's servers are re-read.
    pub servers: bool,
    /// The TCP services are re-read.
    pub services: bool,
    /// The access policies are re-read.
    pub access: bool,
    /// The custom domains are re-read.
    pub domains: bool,
    /// Everything must be reloaded.
    pub everything: bool,
}

impl Work {
    /// Sorts `changes` into what must be re-read (pure, for tests).
    pub fn of(changes: &[Change]) -> Self {
        let mut work = Work::default();
        for change in changes {
            match change {
                Change::NodeRemoved(n) => {
                    // Its services and policies went with it (ON DELETE CASCADE).
                    work.services = true;
                    work.access = true;
                    work.domains = true;
                    work.nodes.insert(n.clone());
                    work.addresses.insert(n.clone());
                    work.challenges.insert(n.clone());
                }
                Change::NodeAdded(n) | Change::NodeUpdated(n) | Change::TokenRotated(n) => {
                    work.nodes.insert(n.clone());
                    work.addresses.insert(n.clone());
                    work.challenges.insert(n.clone());
                }
                Change::ChallengePut(n) | Change::ChallengeRemoved(n) => {
                    work.challenges.insert(n.clone());
                }
                Change::ModeChanged(n) => {
                    work.modes.insert(n.clone());
                    work.addresses.insert(n.clone());
                }
                Change::DnsRecordsChanged => work.dns_records = true,
                Change::ServicesChanged => work.services = true,
                Change::AccessChanged => work.access = true,
                Change::DomainsChanged => work.domains = true,
                Change::ServersChanged => work.servers = true,
                Change::Imported => work.everything = true,
            }
        }
        work
    }
}

impl RoutingSync {
    /// For `shared`'s registry and `zone` (when DNS runs).
    pub fn new(shared: Arc<Shared>, zone: Option<Arc<ZoneCell>>) -> Self {
        Self { shared, zone }
    }

    /// Loads everything; returns the revision loaded.
    pub async fn full_reload(&self) -> Result<i64, StoreError> {
        let state = self.shared.store.routing_state().await?;
        let servers = self.shared.store.list_servers().await?;
        self.shared.registry.reload(&state.nodes);
        if !self.shared.cluster.is_decider() {
            for record in &state.nodes {
                if let Some(node) = self.shared.registry.node(&record.name) {
                    node.adopt_mode(record.mode, record.endpoint.as_deref().and_then(|e| e.parse().ok()));
                }
            }
        }
        self.shared.cluster.set_members(servers);
        self.shared.services.send_replace(Arc::new(self.shared.store.list_services().await?));
        self.shared.access.set(&self.shared.store.list_access().await?);
        self.set_domains(self.shared.store.list_domains().await?);
        if let Some(zone) = &self.zone {
            zone.set_servers(None, self.shared.cluster.members().zone_servers().as_ref());
            // Direct-mode nodes answer their own endpoint; the others the cluster.
            let names: Vec<(String, Option<IpAddr>)> = self
                .shared
                .registry
                .nodes()
                .iter()
                .map(|n| (n.name.clone(), n.direct_address().map(|e| e.ip())))
                .collect();
            let mut values: HashMap<String, Vec<String>> = HashMap::new();
            for c in state.challenges {
                values.entry(c.node).or_default().push(c.value);
            }
            // Records first: each step leaves a whole zone (the update keeps
            // the statics), so a query in between never misses a record.
            zone.set_stored_records(&state.dns_records);
            let serial = crate::dns::next_serial(zone.current().serial(), Some(state.revision));
            zone.update(serial, &names, values);
        }
        Ok(state.revision)
    }

    /// Applies a batch of changes seen up to `revision`.
    pub async fn apply(&self, changes: &[Change], revision: i64) -> Result<(), StoreError> {
        let mut work = Work::of(changes);
        if work.everything {
            return self.full_reload().await.map(|_| ());
        }
        let store = &self.shared.store;
        let registry = &self.shared.registry;
        for name in &work.nodes {
            match store.get_node(name).await? {
                Some(record) => {
                    registry.upsert(&record);
                }
                None => {
                    registry.remove(name);
                }
            }
        }
        if !self.shared.cluster.is_decider() {
            // An updated node keeps its tracker (`Registry::upsert`): its
            // mode is taken here too.
            for name in &work.modes {
                if let (Some(record), Some(node)) = (store.get_node(name).await?, registry.node(name)) {
                    node.adopt_mode(record.mode, record.endpoint.as_deref().and_then(|e| e.parse().ok()));
                }
            }
        }
        if work.servers {
            self.shared.cluster.set_members(store.list_servers().await?);
        }
        if work.access {
            self.shared.access.set(&store.list_access().await?);
        }
        if work.domains {
            self.set_domains(store.list_domains().await?);
        }
        if work.services {
            let services = Arc::new(store.list_services().await?);
            self.shared.services.send_if_modified(|current| {
                let changed = *current != services;
                *current = services;
                changed
            });
        }
        let Some(zone) = &self.zone else { return Ok(()) };
        let revision = (revision > 0).then_some(revision);
        if work.servers {
            zone.set_servers(revision, self.shared.cluster.members().zone_servers().as_ref());
        }
        let addresses: Vec<(String, Option<Option<IpAddr>>)> = std::mem::take(&mut work.addresses)
            .into_iter()
            .map(|name| {
                let entry = registry.node(&name).map(|n| n.direct_address().map(|e| e.ip()));
                (name, entry)
            })
            .collect();
        let mut challenges = Vec::with_capacity(work.challenges.len());
        for name in std::mem::take(&mut work.challenges) {
            let values = if registry.node(&name).is_some() {
                store.node_challenges(&name).await?.into_iter().map(|c| c.value).collect()
            } else {
                Vec::new()
            };
            challenges.push((name, values));
        }
        if work.dns_records {
            zone.set_stored_records(&store.list_dns_records().await?);
        }
        // Last: the serial moves once the whole batch is in.
        zone.edit(revision, addresses, challenges);
        Ok(())
    }

    /// Routes the verified domains and tells the agents' sessions.
    fn set_domains(&self, domains: Vec<crate::store::DomainRecord>) {
        self.shared.registry.set_domains(&domains);
        let domains = Arc::new(domains);
        self.shared.domains.send_if_modified(|current| {
            let changed = *current != domains;
            *current = domains;
            changed
        });
    }

    /// The part of `changes` that needs no store: DNS answers of nodes
    /// whose mode changed in memory (applied even while a resync waits for
    /// an unreachable store).
    pub fn apply_in_memory(&self, changes: &[Change]) {
        let Some(zone) = &self.zone else { return };
        let registry = &self.shared.registry;
        let addresses: Vec<(String, Option<Option<IpAddr>>)> = Work::of(changes)
            .addresses
            .into_iter()
            .filter_map(|name| {
                let node = registry.node(&name)?;
                Some((name, Some(node.direct_address().map(|e| e.ip()))))
            })
            .collect();
        if !addresses.is_empty() {
            zone.edit(None, addresses, Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_sort_into_work() {
        let w = Work::of(&[
            Change::ChallengePut("a".into()),
            Change::ModeChanged("b".into()),
            Change::ChallengeRemoved("a".into()),
            Change::TokenRotated("c".into()),
        ]);
        assert_eq!(w.nodes, BTreeSet::from(["c".to_string()]));
        assert_eq!(w.challenges, BTreeSet::from(["a".to_string(), "c".to_string()]));
        assert_eq!(w.addresses, BTreeSet::from(["b".to_string(), "c".to_string()]));
        assert!(!w.everything);
        assert!(Work::of(&[Change::NodeAdded("a".into()), Change::Imported]).everything);
        let w = Work::of(&[Change::DnsRecordsChanged]);
        assert!(w.dns_records && w.nodes.is_empty() && !w.everything);
    }
}
