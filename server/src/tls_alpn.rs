//! TLS-ALPN-01 answers relayed to a node's agents, for the CSR flow of a
//! custom domain: the server runs the order, but the CA's validation
//! connection is routed to the node like any client, so the agent must
//! answer it. The order asks every connected agent of the node (each
//! replica holds a tunnel to this server) to serve the challenge
//! certificate, and tells the CA to validate only once all of them
//! confirmed.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// What the tunnels of one node tell their agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlpnCommand {
    /// The custom domain being validated.
    pub host: String,
    /// The key authorization's SHA-256 to serve, `None` to stop.
    pub digest: Option<[u8; 32]>,
}

/// One answer being put in place: its digest and the tunnels that
/// confirmed it.
type Waiting = ([u8; 32], HashSet<u64>);

/// Commands to a node's tunnels and the confirmations they got back.
#[derive(Debug)]
pub struct AlpnRelay {
    commands: tokio::sync::broadcast::Sender<AlpnCommand>,
    /// Per host being validated: the digest served and the tunnels that
    /// confirmed it.
    ready: Mutex<HashMap<String, Waiting>>,
    changed: tokio::sync::Notify,
}

impl Default for AlpnRelay {
    fn default() -> Self {
        Self {
            commands: tokio::sync::broadcast::Sender::new(16),
            ready: Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
        }
    }
}

/// Why an answer could not be put in place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// No agent of the node that answers TLS-ALPN-01 is connected here.
    #[error("no agent of this node that answers TLS-ALPN-01 is connected to this server")]
    NoAgent,
    /// Not every agent confirmed in time.
    #[error("{confirmed} of {wanted} agents confirmed the TLS-ALPN-01 answer within {secs} s")]
    Unconfirmed {
        /// Agents that confirmed.
        confirmed: usize,
        /// Agents asked.
        wanted: usize,
        /// The deadline.
        secs: u64,
    },
}

impl AlpnRelay {
    /// The commands, for one tunnel's control loop.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<AlpnCommand> {
        self.commands.subscribe()
    }

    /// The answers being waited for, to send a tunnel that connects now.
    pub fn pending(&self) -> Vec<(String, [u8; 32])> {
        let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        ready.iter().map(|(host, (digest, _))| (host.clone(), *digest)).collect()
    }

    /// The agent behind `tunnel` serves `digest` for `host` (a
    /// confirmation of another digest counts for nothing).
    pub fn confirmed(&self, host: &str, digest: &[u8; 32], tunnel: u64) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((wanted, tunnels)) = ready.get_mut(host) {
            if wanted == digest {
                tunnels.insert(tunnel);
                self.changed.notify_waiters();
            }
        }
    }

    /// Has every tunnel `tunnels()` lists serve `digest` for `host`, waiting
    /// up to `deadline` for their confirmations.
    pub async fn serve(
        &self,
        host: &str,
        digest: [u8; 32],
        tunnels: impl Fn() -> Vec<u64>,
        deadline: Duration,
    ) -> Result<(), RelayError> {
        if tunnels().is_empty() {
            return Err(RelayError::NoAgent);
        }
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).insert(host.to_string(), (digest, HashSet::new()));
        let _ = self.commands.send(AlpnCommand { host: host.to_string(), digest: Some(digest) });
        let wait = async {
            loop {
                let notified = self.changed.notified();
                let wanted = tunnels();
                let done = {
                    let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
                    let got = ready.get(host).map(|(_, tunnels)| tunnels);
                    !wanted.is_empty() && wanted.iter().all(|t| got.is_some_and(|g| g.contains(t)))
                };
                if done {
                    return;
                }
                // Tunnels come and go: look again every 200 ms as well.
                let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
            }
        };
        if tokio::time::timeout(deadline, wait).await.is_ok() {
            return Ok(());
        }
        let wanted = tunnels();
        let confirmed = {
            let ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
            ready.get(host).map_or(0, |(_, g)| wanted.iter().filter(|t| g.contains(t)).count())
        };
        self.withdraw(host);
        Err(RelayError::Unconfirmed { confirmed, wanted: wanted.len(), secs: deadline.as_secs() })
    }

    /// Stops serving the answer for `host`.
    pub fn withdraw(&self, host: &str) {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).remove(host);
        let _ = self.commands.send(AlpnCommand { host: host.to_string(), digest: None });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_every_tunnel_and_times_out_naming_the_count() {
        let relay = std::sync::Arc::new(AlpnRelay::default());
        assert_eq!(relay.serve("h", [1; 32], Vec::new, Duration::from_secs(1)).await, Err(RelayError::NoAgent));
        let mut rx = relay.subscribe();
        let confirmer = {
            let relay = relay.clone();
            tokio::spawn(async move {
                let command = rx.recv().await.unwrap();
                assert_eq!(command, AlpnCommand { host: "h".into(), digest: Some([1; 32]) });
                relay.confirmed("h", &[1; 32], 1);
                relay.confirmed("other", &[1; 32], 2);
                relay.confirmed("h", &[2; 32], 2);
                assert_eq!(relay.pending(), vec![("h".to_string(), [1; 32])]);
                relay.confirmed("h", &[1; 32], 2);
            })
        };
        relay.serve("h", [1; 32], || vec![1, 2], Duration::from_secs(5)).await.unwrap();
        confirmer.await.unwrap();
        let late = relay.serve("h", [1; 32], || vec![1, 2, 3], Duration::from_millis(300)).await;
        assert_eq!(late, Err(RelayError::Unconfirmed { confirmed: 0, wanted: 3, secs: 0 }), "confirmations reset");
        let mut rx = relay.subscribe();
        relay.withdraw("h");
        assert_eq!(rx.recv().await.unwrap().digest, None);
    }
}
