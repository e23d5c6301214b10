//! Which servers the agent holds tunnels to. It starts with the join
//! string's server (pinned by the join string) and the list it kept from
//! its last run; every server's welcome and later notices list the
//! cluster's live servers with their fingerprints, so trust in each chains
//! from the join string's pin. Servers that join get sessions, servers that
//! leave lose theirs (drained, as at shutdown), and the list is kept in
//! `<data_dir>/servers.json` so that a restart works while the join
//! string's server is down. Each server's sessions back off on their own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edge_proto::tunnel::{ClusterServer, MAX_CLUSTER_SERVERS};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::tls::ServerTrust;
use crate::{AgentError, AgentShared};

/// A server the agent dials.
#[derive(Debug)]
pub struct Target {
    /// Its identity fingerprint (hex), or `join` when the join string's
    /// server is trusted through a CA instead of a pin.
    pub key: String,
    /// For logs.
    pub name: String,
    /// `host:port` to dial.
    pub address: String,
    /// How its certificate is checked.
    pub trust: ServerTrust,
    /// The join string's server: a wrong certificate there is fatal (the
    /// operator's pin is wrong); on a listed server it is retried.
    pub is_join: bool,
}

/// Where the list is kept.
pub fn list_file(data_dir: &Path) -> PathBuf {
    data_dir.join("servers.json")
}

/// The list kept from the last run (empty if none or unreadable).
pub fn load_list(data_dir: &Path) -> Vec<ClusterServer> {
    let Ok(bytes) = std::fs::read(list_file(data_dir)) else { return Vec::new() };
    let list: Vec<ClusterServer> = serde_json::from_slice(&bytes).unwrap_or_default();
    valid(list)
}

/// Only well-formed entries, at most [`MAX_CLUSTER_SERVERS`].
pub fn valid(mut list: Vec<ClusterServer>) -> Vec<ClusterServer> {
    list.retain(ClusterServer::is_valid);
    list.truncate(MAX_CLUSTER_SERVERS);
    list
}

fn save_list(data_dir: &Path, list: &[ClusterServer]) {
    let json = serde_json::to_vec_pretty(list).unwrap_or_default();
    if let Err(e) = edge_certs::store::write_atomic(&list_file(data_dir), &json, edge_certs::store::Sensitivity::Public)
    {
        tracing::warn!(error = %e, "could not keep the cluster's server list");
    }
}

fn join_target(shared: &AgentShared) -> Target {
    Target {
        key: shared.ticket.fingerprint.map_or_else(|| "join".to_string(), |fp| edge_proto::join::hex(&fp)),
        name: shared.ticket.server.clone(),
        address: shared.ticket.server.clone(),
        trust: shared.trust.clone(),
        is_join: true,
    }
}

fn listed_target(server: &ClusterServer) -> Option<Target> {
    let pin = edge_proto::join::parse_fingerprint(&server.fingerprint)?;
    Some(Target {
        key: server.fingerprint.to_ascii_lowercase(),
        name: server.name.clone(),
        address: server.quic.clone(),
        trust: ServerTrust::Pinned(edge_net::pinned::PinnedVerifier::new(pin)),
        is_join: false,
    })
}

/// The targets for `list` (the join string's server stays only if listed).
fn targets(shared: &AgentShared, list: &[ClusterServer]) -> Vec<Target> {
    let join = join_target(shared);
    let mut out: Vec<Target> = Vec::new();
    for server in list {
        if server.fingerprint.eq_ignore_ascii_case(&join.key) {
            // The join string's server, by its pin: dialed where the join
            // string says, with the join string's trust.
            out.push(join_target(shared));
        } else if let Some(t) = listed_target(server) {
            out.push(t);
        }
    }
    out
}

struct Running {
    generation: u64,
    address: String,
    stop: CancellationToken,
}

/// Runs sessions to every server until shutdown or a fatal error.
pub async fn run(
    endpoint: quinn::Endpoint,
    shared: Arc<AgentShared>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut sessions: JoinSet<(String, u64, Result<(), AgentError>)> = JoinSet::new();
    let mut generation = 0u64;
    let mut start = |target: Target, running: &mut HashMap<String, Running>, sessions: &mut JoinSet<_>| {
        match running.get(&target.key) {
            Some(r) if r.address == target.address => return,
            // The same server (by identity) at a new address: dialed there.
            Some(r) => {
                tracing::info!(server = %target.name, from = %r.address, to = %target.address, "server moved");
                r.stop.cancel();
            }
            None => {}
        }
        generation += 1;
        let stop = shutdown.child_token();
        tracing::info!(server = %target.name, address = %target.address, "connecting to server");
        running.insert(target.key.clone(), Running { generation, address: target.address.clone(), stop: stop.clone() });
        let target = Arc::new(target);
        for index in 0..shared.config.connections {
            let (endpoint, shared, stop, target, generation) =
                (endpoint.clone(), shared.clone(), stop.clone(), target.clone(), generation);
            sessions.spawn(async move {
                if index > 0 {
                    let mut welcomed = shared.welcomed.subscribe();
                    tokio::select! {
                        _ = stop.cancelled() => return (target.key.clone(), generation, Ok(())),
                        r = welcomed.wait_for(|w| *w) => if r.is_err() { return (target.key.clone(), generation, Ok(())) },
                    }
                }
                let result = crate::session::run(endpoint, shared, target.clone(), stop).await;
                (target.key.clone(), generation, result)
            });
        }
    };
    start(join_target(&shared), &mut running, &mut sessions);
    let kept = load_list(&shared.config.data_dir);
    if !kept.is_empty() {
        tracing::info!(servers = kept.len(), "connecting to the servers kept from the last run too");
    }
    for target in targets(&shared, &kept) {
        start(target, &mut running, &mut sessions);
    }
    let mut lists = shared.servers.subscribe();
    let mut listening = true;
    let mut result = Ok(());
    loop {
        tokio::select! {
            changed = lists.changed(), if listening => {
                if changed.is_err() {
                    listening = false;
                    continue;
                }
                let list = lists.borrow_and_update().clone();
                if list.is_empty() {
                    // A server that does not list the cluster: keep what runs.
                    continue;
                }
                save_list(&shared.config.data_dir, &list);
                let wanted = targets(&shared, &list);
                let keys: Vec<String> = wanted.iter().map(|t| t.key.clone()).collect();
                running.retain(|key, r| {
                    let keep = keys.contains(key);
                    if !keep {
                        tracing::info!(server = %key, "server left the cluster; closing its tunnels");
                        r.stop.cancel();
                    }
                    keep
                });
                for target in wanted {
                    start(target, &mut running, &mut sessions);
                }
            }
            ended = sessions.join_next() => {
                let Some(ended) = ended else { break };
                match ended {
                    Ok((key, generation, Ok(()))) => {
                        if running.get(&key).is_some_and(|r| r.generation == generation) && shutdown.is_cancelled() {
                            running.remove(&key);
                        }
                    }
                    Ok((_, _, Err(e))) => {
                        if result.is_ok() {
                            result = Err(e);
                        }
                        shutdown.cancel();
                    }
                    Err(e) => {
                        result = Err(AgentError::Fatal(format!("session task failed: {e}")));
                        shutdown.cancel();
                    }
                }
            }
        }
    }
    result
}
