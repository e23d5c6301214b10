//! The node's publicly trusted certificate: obtained through ACME, stored
//! on the node, renewed on schedule, hot-swapped into the TLS terminator.
//!
//! Two flows ([`AcmeFlow`]): `server` sends a CSR to the signal API and the
//! server completes the order; `node` runs ACME here and has the server
//! publish the DNS-01 TXT values. In both, the private key is generated here
//! and never leaves the node. The key and chain live in one file,
//! `<data_dir>/certs/acme/node.pem` (mode 0600, replaced atomically), so a
//! crash never pairs a new key with an old chain. Until a certificate is
//! obtained, and whenever renewal fails, the current one keeps serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use edge_certs::acme::{AcmeClient, BoxFuture, ChallengeKind, ChallengeSink};
use edge_certs::info::CertInfo;
use edge_certs::store::{write_atomic, Sensitivity};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::AcmeFlow;
use crate::AgentShared;

/// Deadline for the CSR flow's request (the server runs the whole order).
const CSR_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Deadline for publishing or removing one TXT value.
const CHALLENGE_DEADLINE: Duration = Duration::from_secs(30);
/// Largest response read from the signal API (a chain is a few KiB).
const MAX_RESPONSE: usize = 256 * 1024;

/// Facts kept next to the certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// Unix seconds when this agent stored it.
    pub obtained_at: i64,
    /// The ACME directory that issued it.
    pub directory: String,
    /// The CA's suggested renewal window, if it offered one.
    pub renewal_window: Option<(i64, i64)>,
    /// Serial of the certificate these facts belong to.
    #[serde(default)]
    pub serial: String,
}

/// A certificate from the store.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Ready for rustls.
    pub key: Arc<rustls::sign::CertifiedKey>,
    /// Names and validity.
    pub info: CertInfo,
    /// When and where it was obtained.
    pub meta: Meta,
}

/// Where the ACME certificate of a node lives.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("certs").join("acme")
}

/// Which certificate a manager keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// The node's own names, validated by DNS-01 in the cluster's zone.
    Node,
    /// A verified custom domain, validated by TLS-ALPN-01 through the
    /// tunnel (its DNS is the customer's).
    Domain(String),
}

impl Slot {
    /// Where this slot's key and chain live.
    pub fn dir(&self, data_dir: &Path) -> PathBuf {
        match self {
            Slot::Node => store_dir(data_dir),
            Slot::Domain(domain) => store_dir(data_dir).join("domains").join(domain),
        }
    }
}

fn bundle_path(dir: &Path) -> PathBuf {
    dir.join("node.pem")
}

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("meta.json")
}

/// Loads the stored certificate, if there is a usable one.
pub fn load_stored(dir: &Path) -> Result<Option<Stored>, String> {
    // A crash between writing and checking a new pair leaves this behind.
    let _ = std::fs::remove_file(dir.join(".incoming.pem"));
    let path = bundle_path(dir);
    if !path.exists() {
        return Ok(None);
    }
    let key = edge_certs::pem::load_bundle(&path).map_err(|e| e.to_string())?;
    let leaf = key.cert.first().ok_or_else(|| format!("{}: empty chain", path.display()))?;
    let info = edge_certs::info::cert_info(leaf).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = std::fs::read(meta_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
        // Facts of another certificate (a crash between the two writes) do not count.
        .filter(|m| m.serial == info.serial)
        .unwrap_or(Meta {
            obtained_at: info.not_before,
            directory: String::new(),
            renewal_window: None,
            serial: info.serial.clone(),
        });
    Ok(Some(Stored { key: Arc::new(key), info, meta }))
}

/// Whether `info` covers every one of `hostnames` and is valid at `now`.
pub fn usable(info: &CertInfo, hostnames: &[String], now: i64) -> bool {
    now < info.not_after && hostnames.iter().all(|h| info.names.contains(h))
}

fn save(dir: &Path, key_pem: &str, chain_pem: &str, meta: &Meta) -> Result<(), String> {
    let bundle = format!("{}\n{}", key_pem.trim_end(), chain_pem);
    write_atomic(&bundle_path(dir), bundle.as_bytes(), Sensitivity::Secret).map_err(|e| e.to_string())?;
    let json = serde_json::to_vec_pretty(meta).map_err(|e| e.to_string())?;
    write_atomic(&meta_path(dir), &json, Sensitivity::Public).map_err(|e| e.to_string())
}

/// What one attempt gave.
struct Obtained {
    key_pem: String,
    chain_pem: String,
    directory: String,
    renewal_window: Option<(i64, i64)>,
}

/// Why an attempt failed.
enum ObtainError {
    /// The server offers no ACME (CSR flow): keep the local certificate.
    NotOffered(String),
    /// Anything else: retry later.
    Failed(String),
}

/// Keeps the certificate of `slot` obtained and fresh until `shutdown`.
pub async fn run(
    shared: Arc<AgentShared>,
    slot: Slot,
    hostnames: Vec<String>,
    mut current: Option<Stored>,
    shutdown: CancellationToken,
) {
    let flow = shared.config.acme.flow;
    let policy = shared.config.acme.renewal;
    let dir = slot.dir(&shared.config.data_dir);
    let client = (flow == AcmeFlow::Node)
        .then(|| AcmeClient::new(shared.config.acme.settings(), &shared.config.data_dir.join("acme")));
    let mut attempt: u32 = 0;
    // After a success, the next order waits at least the first retry delay:
    // a past ARI window or a zero renew_after_secs never becomes a loop.
    let mut not_before_next = i64::MIN;
    loop {
        let now = crate::unix_now();
        let due = match &current {
            Some(c) if usable(&c.info, &hostnames, now) => policy.renew_at(
                c.info.not_before,
                c.info.not_after,
                c.meta.obtained_at,
                c.meta.renewal_window,
                rand::random(),
            ),
            _ => now,
        }
        .max(not_before_next);
        if due > now {
            tracing::info!(next_renewal = %edge_certs::format_unix(due), "certificate is current");
            // Sleep in slices so a long wait never overflows a timer.
            let wait = Duration::from_secs((due - now).clamp(0, 86_400) as u64);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => continue,
            }
        }
        let renewing = current.is_some();
        tracing::info!(?flow, names = ?hostnames, renewing, "requesting a certificate through ACME");
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = obtain(&shared, &slot, &hostnames, client.as_ref()) => r,
        };
        match result {
            Ok(obtained) => {
                attempt = 0;
                let meta = Meta {
                    obtained_at: crate::unix_now(),
                    directory: obtained.directory,
                    renewal_window: obtained.renewal_window,
                    serial: edge_certs::acme::leaf_info(&obtained.chain_pem).map(|i| i.serial).unwrap_or_default(),
                };
                match install(&shared, &slot, &dir, &obtained.key_pem, &obtained.chain_pem, meta) {
                    Ok(stored) => {
                        shared.metrics.cert_renewals.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(serial = %stored.info.serial, issuer = %stored.info.issuer,
                            not_after = %edge_certs::format_unix(stored.info.not_after),
                            "certificate installed; new connections use it");
                        current = Some(stored);
                        not_before_next = crate::unix_now() + policy.retry_initial_secs.ceil() as i64;
                        // Tell the server the new expiry now, not at the next beat.
                        let _ = tokio::time::timeout(Duration::from_secs(10), crate::signal::send(&shared)).await;
                    }
                    Err(e) => {
                        // E.g. disk full: the old certificate stays in service.
                        shared.metrics.cert_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "storing the new certificate failed; keeping the current one");
                        if !sleep_retry(&shutdown, &policy, &mut attempt).await {
                            return;
                        }
                    }
                }
            }
            Err(ObtainError::NotOffered(message)) => {
                tracing::info!(%message, "the server offers no ACME; serving the current certificate (set acme.flow = \"node\" to run ACME on the node)");
                return;
            }
            Err(ObtainError::Failed(message)) => {
                shared.metrics.cert_failures.fetch_add(1, Ordering::Relaxed);
                let delay = policy.retry_delay(attempt, 0.5);
                tracing::warn!(error = %message, attempt = attempt + 1, retry_in_secs = delay.as_secs_f64(),
                    "certificate request failed; the current certificate stays in service");
                if !sleep_retry(&shutdown, &policy, &mut attempt).await {
                    return;
                }
            }
        }
    }
}

/// Waits out the backoff for the next attempt; `false` on shutdown.
async fn sleep_retry(
    shutdown: &CancellationToken,
    policy: &edge_certs::renewal::RenewalPolicy,
    attempt: &mut u32,
) -> bool {
    let delay = policy.retry_delay(*attempt, rand::random());
    *attempt = attempt.saturating_add(1);
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Stores a new key and chain, then swaps them into the TLS terminator.
fn install(
    shared: &AgentShared,
    slot: &Slot,
    dir: &Path,
    key_pem: &str,
    chain_pem: &str,
    meta: Meta,
) -> Result<Stored, String> {
    // Check the pair before it replaces anything on disk.
    let check = dir.join(".incoming.pem");
    write_atomic(&check, format!("{}\n{}", key_pem.trim_end(), chain_pem).as_bytes(), Sensitivity::Secret)
        .map_err(|e| e.to_string())?;
    let verified = edge_certs::pem::load_bundle(&check).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&check);
    verified?;
    save(dir, key_pem, chain_pem, &meta)?;
    let stored = load_stored(dir)?.ok_or("certificate vanished after writing")?;
    match slot {
        Slot::Node => shared.install_certificate(stored.key.clone()),
        Slot::Domain(domain) => shared.install_domain_certificate(domain, Some(stored.key.clone())),
    }
    Ok(stored)
}

async fn obtain(
    shared: &AgentShared,
    slot: &Slot,
    hostnames: &[String],
    client: Option<&AcmeClient>,
) -> Result<Obtained, ObtainError> {
    let key = rcgen::KeyPair::generate().map_err(|e| ObtainError::Failed(format!("generating key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(hostnames.to_vec())
        .map_err(|e| ObtainError::Failed(format!("CSR names: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| ObtainError::Failed(format!("CSR: {e}")))?;
    let key_pem = key.serialize_pem();
    match client {
        Some(client) => {
            let sink = SignalSink { shared };
            let kind = match slot {
                Slot::Node => ChallengeKind::Dns01,
                Slot::Domain(_) => ChallengeKind::TlsAlpn01,
            };
            let issued = client
                .issue_by(hostnames, csr.der(), &sink, kind)
                .await
                .map_err(|e| ObtainError::Failed(e.to_string()))?;
            Ok(Obtained {
                key_pem,
                chain_pem: issued.chain_pem,
                directory: issued.directory,
                renewal_window: issued.renewal_window,
            })
        }
        None => {
            // One CSR at a time from this agent: the server runs one order
            // per node and answers a second one 409.
            let _one = shared.csr_lock.lock().await;
            let body = edge_proto::signal::CertificateRequest {
                csr: base64::engine::general_purpose::STANDARD.encode(csr.der()),
            };
            let response = tokio::time::timeout(
                CSR_DEADLINE,
                crate::signal::request(shared, hyper::Method::POST, "/api/signal/certificate", &body, MAX_RESPONSE),
            )
            .await
            .map_err(|_| ObtainError::Failed("the server did not answer the CSR in time".into()))?
            .map_err(ObtainError::Failed)?;
            let (status, bytes) = response;
            let text = String::from_utf8_lossy(&bytes);
            if status == hyper::StatusCode::NOT_IMPLEMENTED {
                return Err(ObtainError::NotOffered(text.trim().to_string()));
            }
            if !status.is_success() {
                return Err(ObtainError::Failed(format!("{status}: {}", text.trim())));
            }
            #[derive(Deserialize)]
            struct Answer {
                chain_pem: String,
                directory: String,
                renewal_window: Option<(i64, i64)>,
            }
            let a: Answer =
                serde_json::from_slice(&bytes).map_err(|e| ObtainError::Failed(format!("server answer: {e}")))?;
            Ok(Obtained { key_pem, chain_pem: a.chain_pem, directory: a.directory, renewal_window: a.renewal_window })
        }
    }
}

/// The server's zone, reached through the signal API (node-side flow).
struct SignalSink<'a> {
    shared: &'a AgentShared,
}

impl SignalSink<'_> {
    async fn call(&self, method: hyper::Method, name: &str, value: &str) -> Result<(), String> {
        let body = edge_proto::signal::ChallengeRequest { name: name.to_string(), value: Some(value.to_string()) };
        let (status, bytes) = tokio::time::timeout(
            CHALLENGE_DEADLINE,
            crate::signal::request(self.shared, method, "/api/signal/acme-challenge", &body, MAX_RESPONSE),
        )
        .await
        .map_err(|_| "the server did not answer in time".to_string())??;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()))
        }
    }
}

impl ChallengeSink for SignalSink<'_> {
    fn publish<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.call(hyper::Method::PUT, name, value))
    }

    fn remove<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.call(hyper::Method::DELETE, name, value))
    }

    /// Served here: the CA's validation reaches this agent through the
    /// server, routed by the domain's name like any client.
    fn publish_tls_alpn<'a>(&'a self, host: &'a str, digest: [u8; 32]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let key = edge_certs::tls_alpn::challenge_certificate(host, &digest).map_err(|e| e.to_string())?;
            self.shared.challenges.set(host, Some(key));
            Ok(())
        })
    }

    fn remove_tls_alpn<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<(), String>> {
        self.shared.challenges.set(host, None);
        Box::pin(async { Ok(()) })
    }
}
