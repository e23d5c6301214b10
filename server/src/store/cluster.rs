//! What the servers of a cluster record in the store: each server's row
//! with its liveness lease, named leases with fencing tokens (the mode
//! decider), and the cluster-wide lock a certificate order holds.
//!
//! Lease times are the database's clock (PostgreSQL) or this host's
//! (SQLite, one host), never a mix of servers' clocks.

/// A server as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerRecord {
    /// Persistent id (kept in the server's data directory).
    pub id: String,
    /// Name for operators (`cluster.name`).
    pub name: String,
    /// Where agents dial it, `host:port`.
    pub quic: String,
    /// Its signal API, `host:port` (probes between servers use it).
    pub api: String,
    /// Where other servers dial it to forward client connections.
    pub peer: String,
    /// SHA-256 of its identity certificate, hex.
    pub fingerprint: String,
    /// Its DNS listener, `ip:port`, queried to check that a TXT value is
    /// served everywhere; `None` without `[dns]`.
    pub dns: Option<String>,
    /// The nameserver names it answers as (NS at the apex).
    pub nameservers: Vec<String>,
    /// Its ingress addresses: what proxied node names answer while it is
    /// live, and the glue of its in-zone nameserver names.
    pub addresses: Vec<String>,
    /// Software version.
    pub version: String,
}

/// A registered server as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerEntry {
    /// What it registered.
    #[serde(flatten)]
    pub record: ServerRecord,
    /// Live: registered and not yet declared gone. A lease that ran out is
    /// declared gone by the next server that renews its own (one write, so
    /// every server sees the change at one revision).
    pub alive: bool,
    /// Milliseconds until its lease runs out (negative: ran out).
    pub lease_left_ms: i64,
    /// When it registered this run (Unix seconds).
    pub started_at: i64,
    /// Nodes it holds a tunnel to, as of its last renewal.
    pub tunnels: Vec<String>,
}

/// The registered servers as read at a store revision: every membership
/// change up to `revision` is in it (later ones may be too), so of two
/// reads the one with the higher revision is at least as new.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerList {
    /// The store's revision, read before the rows.
    pub revision: i64,
    /// Every registered server, live or gone, by name.
    pub servers: Vec<ServerEntry>,
}

/// A named lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    /// The lease's name.
    pub name: String,
    /// The server id holding it.
    pub holder: String,
    /// Fencing token: moves whenever the lease changes hands.
    pub token: i64,
    /// Milliseconds until it runs out (negative: ran out).
    pub left_ms: i64,
}

/// Proof that a write comes from the holder of a lease: the write is
/// refused once the lease has moved on, so a stalled former holder cannot
/// write after its successor started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lease's name.
    pub lease: String,
    /// The holder's id.
    pub holder: String,
    /// The token the holder got.
    pub token: i64,
}

/// The lease of the server that decides nodes' modes.
pub const MODE_DECIDER: &str = "mode-decider";

/// A held cluster-wide lock (released when dropped).
pub struct OrderLock {
    _held: Option<Box<dyn Send + Sync>>,
}

impl OrderLock {
    /// A lock that needs no holding (one server: the in-process lock is the
    /// whole story).
    pub fn local() -> Self {
        Self { _held: None }
    }

    /// A lock released when `held` is dropped.
    pub fn held(held: Box<dyn Send + Sync>) -> Self {
        Self { _held: Some(held) }
    }
}

impl std::fmt::Debug for OrderLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderLock").field("shared", &self._held.is_some()).finish()
    }
}

/// The advisory-lock key of a node's certificate order: a stable 64-bit
/// hash of the name (FNV-1a, so every server computes the same key).
pub fn order_lock_key(node: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"edge-order:".iter().chain(node.as_bytes()) {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_keys_are_stable_and_distinct() {
        assert_eq!(order_lock_key("n1"), order_lock_key("n1"));
        assert_ne!(order_lock_key("n1"), order_lock_key("n2"));
        // Fixed so that servers of different builds agree.
        assert_eq!(order_lock_key(""), 0xe845_9614_64cb_610d_u64 as i64);
    }
}
