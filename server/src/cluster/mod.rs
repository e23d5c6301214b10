//! The cluster: servers sharing one store, each registered with a liveness
//! lease ([`membership`]), forwarding client connections to a peer that has
//! the node's tunnel when this one has none ([`peers`]), and one of them
//! deciding nodes' modes under a fenced lease ([`decider`]).
//!
//! [`ClusterView`] is what the rest of the server reads: the members as
//! last read from the store, and the list agents are given. It follows the
//! store (membership renewals and `ServersChanged` events); nothing else
//! writes it.

pub mod decider;
pub mod membership;
pub mod peers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use edge_proto::tunnel::ClusterServer;
use tokio::sync::watch;

use crate::store::{Fence, ServerEntry, ServerList, ServerRecord};

/// Whether `host:port` names a host others can dial (not `0.0.0.0` or
/// `[::]`: a server that binds a wildcard and sets no `public.*` address
/// registers one, and agents or peers would dial themselves).
pub fn dialable(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
    !host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified())
}

/// The cluster as this server sees it.
#[derive(Debug)]
pub struct ClusterView {
    /// This server's persistent id.
    pub id: String,
    members: watch::Sender<Arc<Members>>,
    agents: watch::Sender<Arc<AgentList>>,
    /// The fencing token while this server decides modes.
    decider: Mutex<Option<Fence>>,
    /// Wakes the membership job early: a tunnel came or went, and peers
    /// should learn it before the next renewal.
    tunnels_changed: tokio::sync::Notify,
}

/// The registered servers as last read from the store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Members {
    /// The store revision of the read (reads only move forward).
    pub revision: i64,
    /// Every registered server, live or gone.
    pub servers: Vec<ServerEntry>,
}

/// What agents are told, with the revision it was read at: an agent keeps
/// the newest list whichever server it came from.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentList {
    /// Store revision of the read.
    pub revision: i64,
    /// The live servers.
    pub servers: Vec<ClusterServer>,
}

impl Members {
    /// The live servers.
    pub fn live(&self) -> impl Iterator<Item = &ServerEntry> {
        self.servers.iter().filter(|s| s.alive)
    }

    /// The live server other than `own_id` whose identity is `fingerprint`.
    pub fn live_peer(&self, own_id: &str, fingerprint: &str) -> Option<&ServerEntry> {
        self.live().find(|s| s.record.id != own_id && s.record.fingerprint.eq_ignore_ascii_case(fingerprint))
    }

    /// Live servers other than `own_id` that reported a tunnel to `node`
    /// (and registered an address peers can dial).
    pub fn peers_with_tunnel<'a>(&'a self, own_id: &'a str, node: &'a str) -> impl Iterator<Item = &'a ServerEntry> {
        self.live()
            .filter(move |s| s.record.id != own_id && dialable(&s.record.peer) && s.tunnels.iter().any(|t| t == node))
    }

    /// Whether any live server other than `own_id` reported a tunnel to `node`.
    pub fn peer_has_tunnel(&self, own_id: &str, node: &str) -> bool {
        self.peers_with_tunnel(own_id, node).next().is_some()
    }

    /// What agents are told: every live server, by id.
    pub fn agent_list(&self) -> Vec<ClusterServer> {
        let mut list: Vec<ClusterServer> = self
            .live()
            .map(|s| ClusterServer {
                id: s.record.id.clone(),
                name: s.record.name.clone(),
                quic: s.record.quic.clone(),
                api: s.record.api.clone(),
                fingerprint: s.record.fingerprint.clone(),
            })
            .filter(|s| s.is_valid() && dialable(&s.quic))
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list.truncate(edge_proto::tunnel::MAX_CLUSTER_SERVERS);
        list
    }

    /// The DNS side of the live servers: apex NS names (sorted), the
    /// addresses of each, and the ingress addresses proxied nodes answer.
    /// `None` when no live server declares an address (the zone keeps what
    /// the config says).
    pub fn zone_servers(&self) -> Option<ZoneServers> {
        let mut nameservers = BTreeSet::new();
        let mut glue: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        let mut addresses = BTreeSet::new();
        for server in self.live() {
            let ips: Vec<IpAddr> = server.record.addresses.iter().filter_map(|a| a.parse().ok()).collect();
            for ns in &server.record.nameservers {
                let ns = ns.trim_end_matches('.').to_ascii_lowercase();
                nameservers.insert(ns.clone());
                glue.entry(ns).or_default().extend(ips.iter().copied());
            }
            addresses.extend(ips);
        }
        if addresses.is_empty() {
            return None;
        }
        Some(ZoneServers {
            nameservers: nameservers.into_iter().collect(),
            glue: glue.into_iter().map(|(n, a)| (n, a.into_iter().collect())).collect(),
            addresses: addresses.into_iter().collect(),
        })
    }
}

/// What the zone takes from the live servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneServers {
    /// Apex NS names, lowercase, without the trailing dot.
    pub nameservers: Vec<String>,
    /// Addresses of each nameserver name.
    pub glue: HashMap<String, Vec<IpAddr>>,
    /// Ingress addresses of every live server.
    pub addresses: Vec<IpAddr>,
}

impl ClusterView {
    /// The view of server `id` (no members read yet).
    pub fn new(id: String) -> Self {
        Self {
            id,
            members: watch::Sender::new(Arc::default()),
            agents: watch::Sender::new(Arc::default()),
            decider: Mutex::new(None),
            tunnels_changed: tokio::sync::Notify::new(),
        }
    }

    /// A tunnel of this server came up or went down.
    pub fn note_tunnels_changed(&self) {
        self.tunnels_changed.notify_one();
    }

    pub(crate) async fn tunnels_changed(&self) {
        self.tunnels_changed.notified().await;
    }

    /// The members as last read.
    pub fn members(&self) -> Arc<Members> {
        self.members.borrow().clone()
    }

    /// The members and their changes.
    pub fn watch_members(&self) -> watch::Receiver<Arc<Members>> {
        self.members.subscribe()
    }

    /// Replaces the members with a fresh read of the store, unless a read
    /// of a later revision is in already (reads race: the membership job,
    /// the change feed, a peer that just joined).
    pub fn set_members(&self, list: ServerList) {
        let members = Members { revision: list.revision, servers: list.servers };
        let mut taken = false;
        self.members.send_if_modified(|current| {
            if members.revision < current.revision {
                return false;
            }
            taken = true;
            let changed = **current != members;
            if changed {
                *current = Arc::new(members.clone());
            }
            changed
        });
        if !taken {
            return;
        }
        let agents = AgentList { revision: members.revision, servers: members.agent_list() };
        self.agents.send_if_modified(|current| {
            // A new revision alone is no news to agents.
            let changed = current.servers != agents.servers;
            if changed {
                *current = Arc::new(agents);
            }
            changed
        });
    }

    /// The list agents are given, and its changes.
    pub fn agent_list(&self) -> watch::Receiver<Arc<AgentList>> {
        self.agents.subscribe()
    }

    /// The fence while this server is the mode decider.
    pub fn decider_fence(&self) -> Option<Fence> {
        self.decider.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether this server decides modes now.
    pub fn is_decider(&self) -> bool {
        self.decider_fence().is_some()
    }

    pub(crate) fn set_decider(&self, fence: Option<Fence>) {
        *self.decider.lock().unwrap_or_else(|p| p.into_inner()) = fence;
    }
}

/// The server id kept in `<data_dir>/server.id`, created on first use.
pub fn server_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("server.id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if !id.is_empty() && id.len() <= 64 && id.bytes().all(plain) {
            return Ok(id.to_string());
        }
    }
    let id = format!("{:016x}", rand::random::<u64>());
    std::fs::create_dir_all(data_dir)?;
    // Created only if absent: of processes starting at once, one id wins.
    if edge_certs::store::create_new(&path, id.as_bytes(), edge_certs::store::Sensitivity::Public)
        .map_err(|e| std::io::Error::other(e.to_string()))?
    {
        return Ok(id);
    }
    Ok(std::fs::read_to_string(&path)?.trim().to_string())
}

/// What this server registers, from its config and bound addresses.
pub fn own_record(
    config: &crate::config::ServerConfig,
    id: &str,
    fingerprint: &str,
    addrs: &crate::BoundAddrs,
) -> ServerRecord {
    let quic = config.public.quic.clone().unwrap_or_else(|| addrs.quic.to_string());
    let host = quic.rsplit_once(':').map_or(quic.as_str(), |(h, _)| h).trim_matches(['[', ']']);
    let name = config.cluster.name.clone().unwrap_or_else(|| {
        if host.parse::<IpAddr>().is_ok() || host.is_empty() {
            format!("edge-{}", &id[..id.len().min(8)])
        } else {
            host.split('.').next().unwrap_or(host).to_string()
        }
    });
    let (nameservers, addresses, dns) = match &config.dns {
        Some(d) => {
            let nameservers = if d.nameservers.is_empty() {
                vec![format!("ns.{}", config.zone())]
            } else {
                d.nameservers.iter().map(|n| n.trim_end_matches('.').to_ascii_lowercase()).collect()
            };
            let addresses = d.ingress_addresses(addrs.tls).iter().map(|a| a.to_string()).collect();
            let dns = config.cluster.dns.or(addrs.dns.filter(|a| !a.ip().is_unspecified())).map(|a| a.to_string());
            (nameservers, addresses, dns)
        }
        None => (Vec::new(), Vec::new(), None),
    };
    ServerRecord {
        id: id.to_string(),
        name,
        peer: config.cluster.peer.clone().unwrap_or_else(|| quic.clone()),
        quic,
        api: config.public.api.clone().unwrap_or_else(|| addrs.api.to_string()),
        fingerprint: fingerprint.to_string(),
        dns,
        nameservers,
        addresses,
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, alive: bool, addresses: &[&str], ns: &[&str], tunnels: &[&str]) -> ServerEntry {
        ServerEntry {
            record: ServerRecord {
                id: id.into(),
                name: format!("edge-{id}"),
                quic: format!("127.0.0.1:{}", 4000 + id.len()),
                api: "127.0.0.1:8443".into(),
                peer: "127.0.0.1:4433".into(),
                fingerprint: id.repeat(64 / id.len()),
                dns: None,
                nameservers: ns.iter().map(|s| s.to_string()).collect(),
                addresses: addresses.iter().map(|s| s.to_string()).collect(),
                version: "0".into(),
            },
            alive,
            lease_left_ms: 1000,
            started_at: 0,
            tunnels: tunnels.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn live_servers_make_the_zone_and_the_agent_list() {
        let members = Members {
            revision: 1,
            servers: vec![
                entry("b", true, &["192.0.2.2"], &["ns2.edge.test"], &["n1"]),
                entry("a", true, &["192.0.2.1"], &["NS1.edge.test."], &[]),
                entry("c", false, &["192.0.2.3"], &["ns3.edge.test"], &["n1"]),
            ],
        };
        let zone = members.zone_servers().unwrap();
        assert_eq!(zone.nameservers, ["ns1.edge.test", "ns2.edge.test"], "gone servers drop out");
        assert_eq!(zone.addresses, ["192.0.2.1".parse::<IpAddr>().unwrap(), "192.0.2.2".parse().unwrap()]);
        assert_eq!(zone.glue["ns2.edge.test"], ["192.0.2.2".parse::<IpAddr>().unwrap()]);
        let agents: Vec<String> = members.agent_list().into_iter().map(|s| s.id).collect();
        assert_eq!(agents, ["a", "b"]);
        assert!(members.peer_has_tunnel("a", "n1"));
        assert!(!members.peer_has_tunnel("b", "n1"), "its own tunnel and a gone server's do not count");
        assert!(members.live_peer("a", &"B".repeat(64)).is_some());
        assert!(members.live_peer("a", &"c".repeat(64)).is_none());
        assert!(Members::default().zone_servers().is_none());
    }

    #[test]
    fn wildcard_addresses_are_not_dialable() {
        assert!(!dialable("0.0.0.0:4433") && !dialable("[::]:4433"));
        assert!(dialable("127.0.0.1:4433") && dialable("edge.example.com:4433") && dialable("[2001:db8::1]:443"));
    }

    #[test]
    fn older_reads_do_not_replace_newer_ones() {
        let view = ClusterView::new("a".into());
        let list = |revision, ids: &[&str]| ServerList {
            revision,
            servers: ids.iter().map(|id| entry(id, true, &["192.0.2.1"], &[], &[])).collect(),
        };
        let agents = view.agent_list();
        view.set_members(list(5, &["a", "b"]));
        view.set_members(list(4, &["a"]));
        assert_eq!(view.members().servers.len(), 2, "the read at revision 4 came late");
        assert_eq!(agents.borrow().servers.len(), 2);
        view.set_members(list(5, &["a", "b", "c"]));
        assert_eq!(view.members().servers.len(), 3, "the same revision may carry newer tunnels and rows");
        assert_eq!((agents.borrow().revision, agents.borrow().servers.len()), (5, 3));
    }
}
