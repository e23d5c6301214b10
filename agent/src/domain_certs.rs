//! A certificate for each verified custom domain the server sends
//! (`ServerMessage::Domains`), obtained by ACME TLS-ALPN-01 — the CA's
//! validation connection reaches this agent through the server, routed by
//! the domain's name like any client — and renewed like the node's own
//! ([`crate::acme::run`]). With `acme.flow = "node"` the agent runs the
//! order; with `"server"` it sends a CSR and the server runs it, telling
//! the agent what to answer ([`answer_for_server`]). Until then, and
//! without ACME, a certificate from a local CA serves the domain. A domain
//! the server stops sending loses its certificate at once; its files stay
//! for a later claim.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::acme::{self, Slot};
use crate::config::AcmeFlow;
use crate::AgentShared;

/// Follows the node's domains until `shutdown`.
pub async fn run(shared: Arc<AgentShared>, shutdown: CancellationToken) {
    let mut domains = shared.domains();
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        let wanted: Vec<String> = domains.borrow_and_update().clone();
        running.retain(|domain, stop| {
            let keep = wanted.contains(domain);
            if !keep {
                stop.cancel();
                shared.install_domain_certificate(domain, None);
                shared.challenges.set(domain, None);
                tracing::info!(%domain, "custom domain no longer served: its certificate is retired");
            }
            keep
        });
        for domain in wanted {
            if running.contains_key(&domain) {
                continue;
            }
            let stop = shutdown.child_token();
            tokio::spawn(keep(shared.clone(), domain.clone(), stop.clone()));
            running.insert(domain, stop);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = domains.changed() => if changed.is_err() { return },
        }
    }
}

/// Serves `domain` with the best certificate at hand, then keeps an ACME
/// one fresh when the agent runs ACME itself.
async fn keep(shared: Arc<AgentShared>, domain: String, stop: CancellationToken) {
    let acme = shared.config.cert_file.is_none() && shared.config.acme.flow != AcmeFlow::Off;
    let names = vec![domain.clone()];
    let data_dir = shared.config.data_dir.clone();
    let (d, n) = (domain.clone(), names.clone());
    let loaded = tokio::task::spawn_blocking(move || {
        let stored = if acme {
            acme::load_stored(&Slot::Domain(d.clone()).dir(&data_dir))
                .ok()
                .flatten()
                .filter(|s| acme::usable(&s.info, &n, crate::unix_now()))
        } else {
            None
        };
        let key = match &stored {
            Some(s) => s.key.clone(),
            None => {
                let local = edge_certs::generate::local_node_cert(&data_dir.join("certs").join("domains"), &d, &n)
                    .map_err(|e| e.to_string())?;
                Arc::new(
                    edge_certs::pem::load_certified_key(&local.pair.cert, &local.pair.key)
                        .map_err(|e| e.to_string())?,
                )
            }
        };
        Ok::<_, String>((key, stored))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    if stop.is_cancelled() {
        return; // retired while loading
    }
    let stored = match loaded {
        Ok((key, stored)) => {
            shared.install_domain_certificate(&domain, Some(key));
            stored
        }
        Err(e) => {
            tracing::error!(%domain, error = %e, "no certificate for the custom domain");
            None
        }
    };
    // A passthrough route's upstream terminates TLS itself: it holds the
    // domain's certificate, and the CA's acme-tls/1 connection goes to it.
    let passthrough = shared.routes().select(&domain).is_some_and(|r| r.mode == crate::config::Mode::Passthrough);
    if acme && passthrough {
        tracing::info!(%domain, "custom domain routed in passthrough mode: its upstream holds the certificate");
    } else if acme {
        acme::run(shared, Slot::Domain(domain), names, stored, stop).await;
    }
}

/// The server runs an order for one of this node's custom domains (CSR
/// flow): serve (with a digest) or stop serving the TLS-ALPN-01 answer for
/// `host`. Returns the confirmation to send, if any. Hosts that are not
/// this node's domains and malformed digests are refused.
pub fn answer_for_server(
    shared: &AgentShared,
    host: &str,
    digest: Option<&str>,
) -> Option<edge_proto::tunnel::AgentMessage> {
    let Some(digest) = digest else {
        shared.challenges.set(host, None);
        return None;
    };
    let ours = shared.domains().borrow().iter().any(|d| d == host);
    let Some(digest) = edge_proto::tunnel::decode_digest(digest).filter(|_| ours) else {
        tracing::warn!(host = %edge_net::logging::Untrusted(host),
            "the server asked for a TLS-ALPN-01 answer this agent does not give (not one of the node's domains)");
        return None;
    };
    match edge_certs::tls_alpn::challenge_certificate(host, &digest) {
        Ok(key) => {
            shared.challenges.set(host, Some(key));
            let digest = edge_proto::tunnel::encode_digest(&digest);
            Some(edge_proto::tunnel::AgentMessage::AcmeTlsAlpnReady { host: host.to_string(), digest })
        }
        Err(e) => {
            tracing::warn!(%host, error = %e, "could not make a TLS-ALPN-01 certificate");
            None
        }
    }
}
