//! The mode detector: probes each node's declared endpoint, feeds the
//! results and tunnel changes to its [`crate::modes::ModeTracker`], and
//! applies transitions (store, DNS, log, metrics).
//!
//! A probe proves it reached *this* node (see [`edge_proto::probe`]): TCP
//! to the endpoint, TLS with ALPN `edge-probe/1` and the node's name as
//! SNI, a random nonce, and the agent's HMAC answer under the node's key.
//! The certificate is not what is checked (a node may still serve a local
//! one); the answer is.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::probe;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::modes::Transition;
use crate::registry::NodeHandle;
use crate::store::{ModeChange, ProbeSample};
use crate::Shared;

/// Runs until `shutdown`: tunnel changes are looked at every second, probes
/// run every `modes.probe_interval_ms`.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut cfg = shared.modes();
    let tls = probe_client_config();
    // Right after a start no agent has reconnected yet: a tunnel that is not
    // up in this window is not news (no proxy -> offline -> proxy churn).
    let grace = tokio::time::Instant::now() + Duration::from_millis(cfg.probe_interval_ms.max(10_000));
    let mut tunnels = tokio::time::interval(Duration::from_secs(1));
    let mut probes = tokio::time::interval(Duration::from_millis(cfg.probe_interval_ms));
    tunnels.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let probe_now = tokio::select! {
            _ = shutdown.cancelled() => {
                if let Some(r) = round.take() {
                    r.abort();
                }
                return;
            }
            _ = tunnels.tick() => false,
            _ = probes.tick() => true,
        };
        // A reload may change the probe interval.
        let now_cfg = shared.modes();
        if now_cfg.probe_interval_ms != cfg.probe_interval_ms {
            probes = tokio::time::interval(Duration::from_millis(now_cfg.probe_interval_ms));
            probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probes.tick().await;
        }
        cfg = now_cfg;
        // One server decides for the cluster; the others follow the store.
        if !shared.cluster.is_decider() {
            continue;
        }
        let nodes = shared.registry.nodes();
        let members = shared.cluster.members();
        for node in &nodes {
            // A tunnel to any live server counts: the node is reachable
            // through the cluster.
            let up = node.tunnel_count() > 0 || members.peer_has_tunnel(&shared.cluster.id, &node.name);
            if !up && tokio::time::Instant::now() < grace {
                continue;
            }
            let change = lock(&node.mode).tunnel(crate::unix_now(), up);
            if let Some(t) = change {
                apply(&shared, node, t).await;
            }
        }
        if !probe_now {
            continue;
        }
        // A round runs beside the tunnel checks (a slow peer must not hold
        // up offline detection); a round still running skips this tick.
        if round.as_ref().is_none_or(|r| r.is_finished()) {
            round = Some(tokio::spawn(probe_round(shared.clone(), nodes, members, tls.clone())));
        }
    }
}

/// One probe round over `nodes`: from here and every configured location
/// per node, from every live peer in one batch; then each result feeds the
/// node's tracker.
async fn probe_round(
    shared: Arc<Shared>,
    nodes: Vec<Arc<NodeHandle>>,
    members: Arc<crate::cluster::Members>,
    tls: Arc<rustls::ClientConfig>,
) {
    let cfg = shared.modes();
    let own = shared.own_addresses();
    let mut jobs: Vec<(Arc<NodeHandle>, SocketAddr, String)> = Vec::new();
    for node in nodes {
        // An endpoint restored from the store was checked by an older
        // version, or before the host's addresses changed: checked again.
        let endpoint = node.current_endpoint().filter(|e| {
            let allowed = crate::endpoints::check(*e, &own, cfg.allow_loopback_endpoints);
            if let Err(why) = &allowed {
                tracing::warn!(node = %node.name, error = %why, "no longer probing the node's endpoint");
                *node.endpoint.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            allowed.is_ok()
        });
        let Some(endpoint) = endpoint else {
            let change = lock(&node.mode).no_endpoint(crate::unix_now());
            if let Some(t) = change {
                apply(&shared, &node, t).await;
            }
            continue;
        };
        let sni = format!("{}.{}", node.name, shared.config.zone());
        jobs.push((node, endpoint, sni));
    }
    // From here and each configured location, per node; from each live
    // peer, one batch for all nodes.
    let configured = Arc::new(cfg.probe_locations.clone());
    let mut round = tokio::task::JoinSet::new();
    for (i, (node, endpoint, sni)) in jobs.iter().cloned().enumerate() {
        let (tls, timeout, configured) = (tls.clone(), cfg.probe_timeout_ms, configured.clone());
        let loops = shared.self_loops.clone();
        round.spawn(async move {
            // Each location gets `timeout` too.
            let total = Duration::from_millis(timeout * (1 + configured.len() as u64));
            let result = tokio::time::timeout(total, probe(endpoint, &loops, &node, &sni, tls, &configured, timeout))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout} ms")));
            (i, result)
        });
    }
    let peers = peer_locations(&shared, &members);
    let from_peers =
        futures_util::future::join_all(peers.iter().map(|peer| batch_probe(peer, &jobs, cfg.probe_timeout_ms)));
    let mut results: Vec<Result<(), String>> = vec![Err("not probed".into()); jobs.len()];
    let collect_local = async {
        while let Some(done) = round.join_next().await {
            if let Ok((i, result)) = done {
                results[i] = result;
            }
        }
    };
    let ((), from_peers) = tokio::join!(collect_local, from_peers);
    for (peer, answers) in peers.iter().zip(from_peers) {
        // A location that could not be asked at all casts no vote this
        // round: one unreachable server must not demote every node.
        let answers = match answers {
            Ok(answers) => answers,
            Err(e) => {
                if let Some(suppressed) = PEER_PROBE_LOG.due() {
                    tracing::warn!(peer = %peer.name, error = %e, suppressed,
                        "a peer could not be asked to probe; its vote is left out of this round");
                }
                continue;
            }
        };
        for (i, answer) in answers.into_iter().enumerate() {
            if results[i].is_ok() {
                let (node, _, _) = &jobs[i];
                results[i] = answer
                    .and_then(|(nonce, answer)| {
                        probe::verify(&node.probe_key(), &node.name, &nonce, &answer)
                            .then_some(())
                            .ok_or_else(|| "wrong answer: not this node".to_string())
                    })
                    .map_err(|e| format!("from {}: {e}", peer.name));
            }
        }
    }
    for ((node, endpoint, _), result) in jobs.into_iter().zip(results) {
        let now = crate::unix_now();
        let ep = endpoint.to_string();
        let sample = ProbeSample {
            at: now,
            endpoint: ep.clone(),
            ok: result.is_ok(),
            detail: result.as_ref().err().cloned().unwrap_or_else(|| "verified".into()),
        };
        let counter = if sample.ok { &shared.metrics.probes_ok } else { &shared.metrics.probes_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        let change = {
            let mut tracker = lock(&node.mode);
            match &result {
                Ok(()) => tracker.probe_ok(now, endpoint),
                Err(why) => tracker.probe_failed(now, &ep, why, cfg.failures_to_proxy),
            }
        };
        // The transition first: DNS must not wait on the store.
        if let Some(t) = change {
            apply(&shared, &node, t).await;
        }
        let recorded = shared.store.record_probe(&node.name, &sample, cfg.samples_kept);
        let failed = match tokio::time::timeout(STORE_WRITE_TIMEOUT, recorded).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("the store did not answer in time".to_string()),
        };
        if let Some(e) = failed {
            // Every probe of every node fails while the store is down:
            // one line per period, not one per probe.
            if let Some(suppressed) = PROBE_STORE_LOG.due() {
                tracing::warn!(node = %node.name, error = %e, suppressed, "recording a probe sample failed");
            }
        }
    }
}

static PEER_PROBE_LOG: std::sync::LazyLock<edge_net::logging::Throttle> =
    std::sync::LazyLock::new(|| edge_net::logging::Throttle::new(crate::limits::LOG_EVERY));

static PROBE_STORE_LOG: std::sync::LazyLock<edge_net::logging::Throttle> =
    std::sync::LazyLock::new(|| edge_net::logging::Throttle::new(crate::limits::LOG_EVERY));

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A live server of the cluster asked to probe too, with this server's
/// identity as the credential.
#[derive(Debug, Clone)]
struct PeerLocation {
    /// Its name, for messages.
    name: String,
    /// Its signal API.
    api: String,
    /// TLS pinned to it, presenting our identity.
    tls: Arc<rustls::ClientConfig>,
}

/// Every other live server, unless `cluster.probe_from_peers` is off.
fn peer_locations(shared: &Shared, members: &crate::cluster::Members) -> Vec<PeerLocation> {
    if !shared.config.cluster.probe_from_peers {
        return Vec::new();
    }
    members
        .live()
        .filter(|s| s.record.id != shared.cluster.id && crate::cluster::dialable(&s.record.api))
        .filter_map(|peer| {
            let pin = edge_proto::join::parse_fingerprint(&peer.record.fingerprint)?;
            Some(PeerLocation {
                name: peer.record.name.clone(),
                api: peer.record.api.clone(),
                tls: shared.peers.api_tls(pin),
            })
        })
        .collect()
}

/// A nonce and the answer a peer got with it.
type PeerAnswer = Result<([u8; probe::NONCE_LEN], Vec<u8>), String>;

/// Asks `peer` to probe every job, in batches; one result per job, or why
/// the peer could not be asked.
async fn batch_probe(
    peer: &PeerLocation,
    jobs: &[(Arc<NodeHandle>, SocketAddr, String)],
    timeout_ms: u64,
) -> Result<Vec<PeerAnswer>, String> {
    use edge_proto::signal::{ProbeBatchAnswer, ProbeBatchRequest, ProbeOutcome, ProbeRequest, MAX_PROBE_BATCH};
    let mut out = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(MAX_PROBE_BATCH) {
        let nonces: Vec<[u8; probe::NONCE_LEN]> = chunk.iter().map(|_| rand::random()).collect();
        let body = ProbeBatchRequest {
            probes: chunk
                .iter()
                .zip(&nonces)
                .map(|((_, endpoint, sni), nonce)| ProbeRequest {
                    endpoint: *endpoint,
                    sni: sni.clone(),
                    nonce: edge_proto::join::hex(nonce),
                    timeout_ms: Some(timeout_ms),
                })
                .collect(),
        };
        // The peer runs 64 at a time, each within `timeout_ms`.
        let waves = chunk.len().div_ceil(64) as u64;
        let deadline = Duration::from_millis(timeout_ms * (waves + 1) + 2_000);
        let request = edge_net::https::json_request(
            &peer.api,
            "edge-server",
            peer.tls.clone(),
            hyper::Method::POST,
            "/api/probe/batch",
            "",
            &body,
            MAX_PROBE_BATCH * 256,
        );
        let answer: Result<ProbeBatchAnswer, String> = match tokio::time::timeout(deadline, request).await {
            Ok(Ok((status, bytes))) if status.is_success() => {
                serde_json::from_slice(&bytes).map_err(|_| format!("{status}: not a probe batch answer"))
            }
            Ok(Ok((status, bytes))) => {
                let error: Option<edge_proto::signal::ErrorResponse> = serde_json::from_slice(&bytes).ok();
                Err(error.map_or_else(|| format!("{status}"), |e| e.error))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {} ms", deadline.as_millis())),
        };
        match answer {
            Ok(answer) if answer.outcomes.len() == chunk.len() => {
                for (outcome, nonce) in answer.outcomes.into_iter().zip(nonces) {
                    out.push(match outcome {
                        ProbeOutcome::Answer { answer } => parse_answer(&answer).map(|a| (nonce, a)),
                        ProbeOutcome::Failed { error } => Err(error),
                    });
                }
            }
            Ok(answer) => return Err(format!("{} outcomes for {} probes", answer.outcomes.len(), chunk.len())),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// 64 hex digits to the answer's bytes.
fn parse_answer(hex: &str) -> Result<Vec<u8>, String> {
    if hex.len() != 2 * probe::ANSWER_LEN {
        return Err("bad answer".into());
    }
    (0..probe::ANSWER_LEN)
        .map(|i| {
            u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16).map_err(|_| "bad answer".to_string())
        })
        .collect()
}

/// Persists a transition (fenced by the decider lease), logs it once,
/// counts it, and rebuilds the zone.
async fn apply(shared: &Arc<Shared>, node: &Arc<NodeHandle>, t: Transition) {
    let Some(fence) = shared.cluster.decider_fence() else {
        // The lease was lost mid-round: the tracker moved in memory only;
        // the store's mode wins.
        if let Ok(Some(record)) = shared.store.get_node(&node.name).await {
            node.adopt_mode(record.mode, record.endpoint.as_deref().and_then(|e| e.parse().ok()));
        }
        shared.nudge(crate::store::Change::ModeChanged(node.name.clone()));
        return;
    };
    let change = ModeChange { at: t.at, from: t.from, to: t.to, reason: t.reason };
    let endpoint = node.direct_address().map(|e| e.to_string());
    // The store's change event moves the zone (and its serial, with the
    // revision). When the store does not take the record in time, the
    // zone follows the in-memory mode anyway.
    let recorded = shared.store.record_transition_fenced(&node.name, &change, endpoint.as_deref(), &fence);
    let failed = match tokio::time::timeout(STORE_WRITE_TIMEOUT, recorded).await {
        Ok(Ok(true)) => {
            tracing::info!(node = %node.name, from = change.from.as_str(), to = change.to.as_str(),
                reason = %change.reason, "node mode changed");
            shared.metrics.mode_transition(change.to);
            shared.metrics.decider_transitions.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok(Ok(false)) => {
            // The lease moved on, or the stored mode is not what this
            // tracker started from: the store wins.
            tracing::info!(node = %node.name, to = change.to.as_str(),
                "not writing a mode transition: the stored mode or the decider changed; following the store");
            if let Ok(Some(record)) = shared.store.get_node(&node.name).await {
                node.adopt_mode(record.mode, record.endpoint.as_deref().and_then(|e| e.parse().ok()));
            }
            shared.nudge(crate::store::Change::ModeChanged(node.name.clone()));
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the store did not answer in time".to_string(),
    };
    tracing::info!(node = %node.name, from = change.from.as_str(), to = change.to.as_str(), reason = %change.reason,
        "node mode changed (not recorded)");
    shared.metrics.mode_transition(change.to);
    tracing::error!(node = %node.name, error = %failed, "recording a mode transition failed; DNS follows it anyway");
    shared.nudge(crate::store::Change::ModeChanged(node.name.clone()));
}

/// How long the detector waits for the store before going on without it.
const STORE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// One probe round for a node: from here and from every configured
/// location, each with its own nonce; every answer must verify.
async fn probe(
    endpoint: SocketAddr,
    loops: &Arc<crate::self_loop::SelfLoops>,
    node: &NodeHandle,
    sni: &str,
    tls: Arc<rustls::ClientConfig>,
    locations: &[crate::config::ProbeLocation],
    timeout_ms: u64,
) -> Result<(), String> {
    let check =
        |nonce: &[u8; probe::NONCE_LEN], answer: &[u8]| probe::verify(&node.probe_key(), &node.name, nonce, answer);
    let nonce: [u8; probe::NONCE_LEN] = rand::random();
    let answer = raw_probe(endpoint, sni, &nonce, tls, loops).await?;
    if !check(&nonce, &answer) {
        return Err("wrong answer: not this node".into());
    }
    for location in locations {
        let nonce: [u8; probe::NONCE_LEN] = rand::random();
        let answer = remote_probe(location, endpoint, sni, &nonce, timeout_ms)
            .await
            .map_err(|e| format!("from {}: {e}", location.api))?;
        if !check(&nonce, &answer) {
            return Err(format!("from {}: wrong answer: not this node", location.api));
        }
    }
    Ok(())
}

/// Asks another edge-server to probe `endpoint` with `nonce`; returns the
/// answer it got (verified here: the other server does not hold the key).
async fn remote_probe(
    location: &crate::config::ProbeLocation,
    endpoint: SocketAddr,
    sni: &str,
    nonce: &[u8; probe::NONCE_LEN],
    timeout_ms: u64,
) -> Result<Vec<u8>, String> {
    let fingerprint = edge_proto::join::parse_fingerprint(&location.fingerprint).ok_or("bad fingerprint")?;
    let tls = edge_net::https::pinned_client_config(fingerprint, b"http/1.1");
    let (api, bearer) = (location.api.as_str(), location.admin_token.0.as_str());
    let body = edge_proto::signal::ProbeRequest {
        endpoint,
        sni: sni.to_string(),
        nonce: edge_proto::join::hex(nonce),
        timeout_ms: Some(timeout_ms),
    };
    let (status, bytes) =
        edge_net::https::json_request(api, "edge-server", tls, hyper::Method::POST, "/api/probe", bearer, &body, 4096)
            .await?;
    if !status.is_success() {
        let error: Option<edge_proto::signal::ErrorResponse> = serde_json::from_slice(&bytes).ok();
        return Err(error.map_or_else(|| format!("{status}"), |e| e.error));
    }
    let answer: edge_proto::signal::ProbeAnswer =
        serde_json::from_slice(&bytes).map_err(|_| format!("{status}: not a probe answer"))?;
    parse_answer(&answer.answer)
}

/// TLS with the probe ALPN to `endpoint`, `nonce` out, the answer back
/// (unchecked). Also serves `POST /api/probe` for other servers.
pub async fn raw_probe(
    endpoint: SocketAddr,
    sni: &str,
    nonce: &[u8; probe::NONCE_LEN],
    tls: Arc<rustls::ClientConfig>,
    loops: &Arc<crate::self_loop::SelfLoops>,
) -> Result<[u8; probe::ANSWER_LEN], String> {
    // Registered as ours: if the endpoint leads back to our own :443, the
    // probe is refused there instead of reaching the node through its tunnel.
    let (tcp, _own) = loops.connect(endpoint).await.map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let mut stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    if stream.get_ref().1.alpn_protocol() != Some(probe::ALPN) {
        return Err("the endpoint does not speak the probe protocol".into());
    }
    stream.write_all(nonce).await.map_err(|e| format!("write: {e}"))?;
    stream.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut answer = [0u8; probe::ANSWER_LEN];
    stream.read_exact(&mut answer).await.map_err(|e| format!("read: {e}"))?;
    let _ = stream.shutdown().await;
    Ok(answer)
}

/// The client config of probes.
pub fn probe_client_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(AnswerIsTheProof(provider.clone()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| rustls::ClientConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS))
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![probe::ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Accepts any certificate (handshake signatures are still checked): the
/// node proves itself with the HMAC answer, not with its certificate, which
/// may be a local one before ACME has run.
#[derive(Debug)]
struct AnswerIsTheProof(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnswerIsTheProof {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
