//! Server-to-server QUIC: when this server has no tunnel to a node but a
//! live peer reported one, the client connection goes to that peer, which
//! places it on its own tunnel. Raw bytes only (the ClientHello replayed,
//! then the splice); nothing is decrypted.
//!
//! Both ends are authenticated by the identity fingerprints in the store:
//! the dialer pins the peer's, and the acceptor asks for a client
//! certificate and accepts only a live server's. A peer never forwards what
//! it received from a peer (it places on its own tunnels or refuses with
//! `STREAM_NO_TUNNEL`), so a connection takes one hop at most.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_proto::tunnel::{codes, StreamHeader, MAX_STREAM_HEADER, PEER_ALPN};
use quinn::VarInt;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::registry::NodeHandle;
use crate::state::Shared;
use crate::store::ServerEntry;

/// Most peers tried for one client connection.
const MAX_PEERS_TRIED: usize = 2;
/// A peer that could not be dialed is not dialed again for this long (a
/// crashed server is listed as live until its lease runs out).
const DIAL_BACKOFF: Duration = Duration::from_secs(3);
/// How often an unknown client certificate may make the acceptor re-read
/// the members (a server that just joined).
const MEMBERS_REFRESH: Duration = Duration::from_secs(1);

/// Why no peer took a client connection.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No live peer reported a tunnel to the node.
    #[error("no peer server has a tunnel to the node")]
    NoPeer,
    /// Peers were tried and none could place the connection.
    #[error("no peer server could place the connection ({0})")]
    Failed(String),
    /// The node's agent reset the stream (through the peer): a verdict.
    #[error("the agent reset the stream with code {0}")]
    AgentReset(u64),
}

/// A stream a peer answered on, with its first bytes.
#[derive(Debug)]
pub struct PeerAnswered {
    /// Towards the node, through the peer.
    pub send: quinn::SendStream,
    /// From the node, through the peer.
    pub recv: quinn::RecvStream,
    /// What the node sent first.
    pub first_bytes: bytes::Bytes,
}

impl PeerAnswered {
    /// As a tunnel's answer, spliced the same way.
    pub(crate) fn into_answered(self, stalls: Arc<edge_net::stall::StallBudget>) -> crate::ingress::Answered {
        crate::ingress::Answered { send: self.send, recv: self.recv, first_bytes: self.first_bytes, stalls }
    }
}

/// Connections to peers, dialed on first use and kept.
pub struct PeerLinks {
    endpoint: quinn::Endpoint,
    identity: Arc<CertifiedKey>,
    links: Mutex<HashMap<String, quinn::Connection>>,
    /// Dials to one peer take turns, so a burst of clients makes one
    /// connection; dials to different peers do not wait for each other.
    dialing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Peers whose last dial failed, and when.
    failed: Mutex<HashMap<String, Instant>>,
    stalls: Arc<edge_net::stall::StallBudget>,
    last_refresh: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for PeerLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let links = self.links.lock().map(|l| l.len()).unwrap_or(0);
        f.debug_struct("PeerLinks").field("links", &links).finish_non_exhaustive()
    }
}

impl PeerLinks {
    /// Links dialed from `endpoint` (the agents' QUIC endpoint), presenting
    /// `identity`.
    pub fn new(endpoint: quinn::Endpoint, identity: Arc<CertifiedKey>, tuning: &edge_net::quic::TunnelTuning) -> Self {
        Self {
            endpoint,
            identity,
            links: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            stalls: edge_net::stall::StallBudget::for_windows(tuning.connection_window, tuning.stream_window),
            last_refresh: Mutex::new(None),
        }
    }

    /// The stall budget of streams through peers.
    pub fn stalls(&self) -> Arc<edge_net::stall::StallBudget> {
        self.stalls.clone()
    }

    fn open_link(&self, fingerprint: &str) -> Option<quinn::Connection> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.get(fingerprint).filter(|c| c.close_reason().is_none()).cloned()
    }

    /// The connection to `peer`, dialed if there is none.
    async fn link(&self, shared: &Shared, peer: &ServerEntry) -> Result<quinn::Connection, String> {
        let fp = peer.record.fingerprint.to_ascii_lowercase();
        if let Some(conn) = self.open_link(&fp) {
            return Ok(conn);
        }
        let turn = self.dialing.lock().unwrap_or_else(|p| p.into_inner()).entry(fp.clone()).or_default().clone();
        let _turn = turn.lock().await;
        if let Some(conn) = self.open_link(&fp) {
            return Ok(conn);
        }
        let recently_failed = self.failed.lock().unwrap_or_else(|p| p.into_inner()).get(&fp).copied();
        if recently_failed.is_some_and(|at| at.elapsed() < DIAL_BACKOFF) {
            return Err("its last dial failed moments ago".into());
        }
        let deadline = Duration::from_millis(shared.limits().open_stream_timeout_ms);
        let dialed = tokio::time::timeout(deadline, self.dial(shared, peer, &fp)).await;
        match dialed {
            Ok(Ok(conn)) => {
                self.failed.lock().unwrap_or_else(|p| p.into_inner()).remove(&fp);
                tracing::info!(peer = %peer.record.name, addr = %conn.remote_address(), "connected to peer server");
                self.links.lock().unwrap_or_else(|p| p.into_inner()).insert(fp, conn.clone());
                Ok(conn)
            }
            failed => {
                self.failed.lock().unwrap_or_else(|p| p.into_inner()).insert(fp, Instant::now());
                Err(match failed {
                    Ok(Err(e)) => e,
                    _ => format!("no connection to {} within {} ms", peer.record.peer, deadline.as_millis()),
                })
            }
        }
    }

    async fn dial(&self, shared: &Shared, peer: &ServerEntry, fp: &str) -> Result<quinn::Connection, String> {
        let pin = edge_proto::join::parse_fingerprint(fp).ok_or("bad fingerprint in the store")?;
        let addr = tokio::net::lookup_host(&peer.record.peer)
            .await
            .map_err(|e| format!("resolving {}: {e}", peer.record.peer))?
            .next()
            .ok_or_else(|| format!("{} resolved to no address", peer.record.peer))?;
        let tls = peer_client_tls(pin, self.identity.clone(), PEER_ALPN);
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(shared.config.tunnel.transport(0)));
        let connecting = self.endpoint.connect_with(client, addr, "edge-server").map_err(|e| e.to_string())?;
        connecting.await.map_err(|e| format!("connecting to {addr}: {e}"))
    }

    /// Forgets a link that stopped answering, so the next client dials anew.
    fn drop_link(&self, conn: &quinn::Connection) {
        conn.close(VarInt::from_u32(codes::CLOSE_NORMAL), b"peer did not answer");
        self.links.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, c| c.stable_id() != conn.stable_id());
    }

    /// Sends `first` (stream header and replayed bytes) to a live peer that
    /// has a tunnel to `node`, and waits up to `answer_within` for the
    /// node's first bytes. A peer whose connection stays silent for
    /// `agent_answer_timeout_ms` after the write (a crashed server whose
    /// connection has not timed out yet) is dropped and the next is tried.
    pub async fn place(
        &self,
        shared: &Shared,
        node: &NodeHandle,
        first: &[u8],
        answer_within: Duration,
    ) -> Result<PeerAnswered, PeerError> {
        let members = shared.cluster.members();
        let candidates: Vec<ServerEntry> =
            members.peers_with_tunnel(&shared.cluster.id, &node.name).take(MAX_PEERS_TRIED).cloned().collect();
        if candidates.is_empty() {
            return Err(PeerError::NoPeer);
        }
        let limits = shared.limits();
        let give_up = tokio::time::Instant::now() + answer_within;
        let mut why = Vec::new();
        for peer in &candidates {
            let abandon = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream| {
                // Dropped streams would be finished, not reset: the peer
                // would pass a cut request on as a complete one.
                let _ = send.reset(VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
                let _ = recv.stop(VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
            };
            let conn = match self.link(shared, peer).await {
                Ok(c) => c,
                Err(e) => {
                    why.push(format!("{}: {e}", peer.record.name));
                    continue;
                }
            };
            let open = tokio::time::timeout(Duration::from_millis(limits.open_stream_timeout_ms), conn.open_bi());
            let Ok(Ok((mut send, mut recv))) = open.await else {
                why.push(format!("{}: no stream", peer.record.name));
                continue;
            };
            let written =
                tokio::time::timeout(Duration::from_millis(limits.agent_answer_timeout_ms), send.write_all(first));
            if !matches!(written.await, Ok(Ok(()))) {
                abandon(&mut send, &mut recv);
                why.push(format!("{}: write failed", peer.record.name));
                continue;
            }
            let heard_before = conn.stats().udp_rx.datagrams;
            let silent = tokio::time::sleep(Duration::from_millis(limits.agent_answer_timeout_ms));
            let late = tokio::time::sleep_until(give_up);
            tokio::pin!(silent, late);
            let mut checked = false;
            loop {
                tokio::select! {
                    read = recv.read_chunk(64 * 1024, true) => {
                        match read {
                            Ok(Some(chunk)) => return Ok(PeerAnswered { send, recv, first_bytes: chunk.bytes }),
                            Ok(None) => return Ok(PeerAnswered { send, recv, first_bytes: bytes::Bytes::new() }),
                            Err(quinn::ReadError::Reset(code))
                                if code.into_inner() == u64::from(codes::STREAM_NO_TUNNEL) =>
                            {
                                why.push(format!("{}: no tunnel there", peer.record.name));
                            }
                            Err(quinn::ReadError::Reset(code)) => return Err(PeerError::AgentReset(code.into_inner())),
                            Err(e) => {
                                abandon(&mut send, &mut recv);
                                why.push(format!("{}: {e}", peer.record.name));
                            }
                        }
                        break;
                    }
                    _ = &mut silent, if !checked => {
                        checked = true;
                        if conn.stats().udp_rx.datagrams == heard_before {
                            abandon(&mut send, &mut recv);
                            self.drop_link(&conn);
                            why.push(format!("{}: silent", peer.record.name));
                            break;
                        }
                    }
                    _ = &mut late => {
                        abandon(&mut send, &mut recv);
                        return Err(PeerError::Failed(format!("{}: no answer in time", peer.record.name)));
                    }
                }
            }
        }
        Err(PeerError::Failed(why.join("; ")))
    }

    /// Whether a live peer has a tunnel to `node`; when none is known, the
    /// members are re-read (at most once a second): a peer's new tunnel
    /// may not have reached us with the last renewal.
    pub async fn peer_has_tunnel(&self, shared: &Shared, node: &str) -> bool {
        if shared.cluster.members().peer_has_tunnel(&shared.cluster.id, node) {
            return true;
        }
        if !self.may_refresh() {
            return false;
        }
        match shared.store.list_servers().await {
            Ok(servers) => shared.cluster.set_members(servers),
            Err(_) => return false,
        }
        shared.cluster.members().peer_has_tunnel(&shared.cluster.id, node)
    }

    /// Whether an unknown peer identity may make us re-read the members now.
    fn may_refresh(&self) -> bool {
        let mut last = self.last_refresh.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < MEMBERS_REFRESH) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// TLS to a peer's signal API (probes): its pinned certificate, and
    /// this server's identity as the client certificate, which is how the
    /// peer knows the request comes from a server of the cluster.
    pub fn api_tls(&self, pin: [u8; 32]) -> Arc<rustls::ClientConfig> {
        Arc::new(peer_client_tls(pin, self.identity.clone(), b"http/1.1"))
    }

    /// Closes every link (shutdown).
    pub fn close_all(&self) {
        for (_, conn) in self.links.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            conn.close(VarInt::from_u32(codes::CLOSE_SHUTDOWN), b"server shutting down");
        }
    }
}

/// Whether an accepted connection is a peer server's (by its ALPN).
pub fn is_peer_connection(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == PEER_ALPN)
}

/// The SHA-256 of the client certificate a connection presented.
fn peer_fingerprint(conn: &quinn::Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|leaf| edge_proto::join::hex(&edge_certs::fingerprint(leaf)))
}

/// Serves a peer server's connection: each stream is one client
/// connection to place on this server's tunnel to the node.
pub async fn serve(conn: quinn::Connection, shared: Arc<Shared>, close: CancellationToken) {
    let remote = conn.remote_address();
    let Some(fingerprint) = peer_fingerprint(&conn) else {
        shared.metrics.peer_refused.fetch_add(1, Ordering::Relaxed);
        conn.close(VarInt::from_u32(codes::CLOSE_AUTH_FAILED), b"peer connections need a server identity");
        return;
    };
    let mut known = shared.cluster.members().live_peer(&shared.cluster.id, &fingerprint).map(|p| p.record.name.clone());
    if known.is_none() && shared.peers.may_refresh() {
        if let Ok(servers) = shared.store.list_servers().await {
            shared.cluster.set_members(servers);
            known = shared.cluster.members().live_peer(&shared.cluster.id, &fingerprint).map(|p| p.record.name.clone());
        }
    }
    let Some(peer) = known else {
        shared.metrics.peer_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%remote, "refused a peer connection: its identity is not a live server of this cluster");
        conn.close(VarInt::from_u32(codes::CLOSE_AUTH_FAILED), b"not a live server of this cluster");
        return;
    };
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(shared.config.tunnel.max_streams));
    tracing::info!(%peer, %remote, "peer server connected");
    let streams = TaskTracker::new();
    let mut members = shared.cluster.watch_members();
    loop {
        tokio::select! {
            _ = close.cancelled() => {
                conn.close(VarInt::from_u32(codes::CLOSE_SHUTDOWN), b"server shutting down");
                break;
            }
            changed = members.changed() => {
                let gone = changed.is_err()
                    || members.borrow_and_update().live_peer(&shared.cluster.id, &fingerprint).is_none();
                if gone {
                    // Declared gone, left or removed: its identity no longer
                    // counts for new streams; those it forwarded while
                    // draining finish (up to the drain timeout).
                    tracing::info!(%peer, %remote, "peer server is no longer live; no new streams from it");
                    conn.set_max_concurrent_bi_streams(VarInt::from_u32(0));
                    streams.close();
                    let drain = Duration::from_secs(shared.limits().drain_timeout_secs);
                    tokio::select! {
                        _ = tokio::time::timeout(drain, streams.wait()) => {}
                        _ = close.cancelled() => {}
                    }
                    conn.close(VarInt::from_u32(codes::CLOSE_AUTH_FAILED), b"not a live server of this cluster");
                    break;
                }
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(handle_stream(send, recv, shared.clone()));
                }
                Err(e) => {
                    tracing::info!(%peer, %remote, reason = %e, "peer server disconnected");
                    break;
                }
            }
        }
    }
    streams.close();
    streams.wait().await;
}

/// Whether `bytes` (what follows the stream header) hold a whole TLS
/// ClientHello, which may span several records. The agent answers only a
/// whole one, so it must all be placed before the answer is awaited.
fn hello_complete(bytes: &[u8]) -> bool {
    let mut payload = Vec::new();
    let mut rest = bytes;
    while let [_, _, _, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(fragment) = tail.get(..len) else { break };
        payload.extend_from_slice(fragment);
        rest = &tail[len..];
    }
    match payload.get(..4) {
        Some(&[_, a, b, c]) => payload.len() >= 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c)),
        _ => false,
    }
}

/// Reads the stream header a peer sent and, for TLS, the whole ClientHello
/// after it, within the ClientHello deadline and byte cap.
async fn read_header(
    recv: &mut quinn::RecvStream,
    deadline: Duration,
    max_hello: usize,
) -> Option<(StreamHeader, Vec<u8>)> {
    let mut buf = Vec::with_capacity(2048);
    let read = async {
        let mut header: Option<(StreamHeader, usize)> = None;
        loop {
            if header.is_none() {
                match StreamHeader::decode(&buf) {
                    Ok(Some(decoded)) => header = Some(decoded),
                    Ok(None) => {}
                    Err(_) => return None,
                }
            }
            if let Some((h, used)) = &header {
                if h.plain || hello_complete(&buf[*used..]) {
                    return header.map(|(h, _)| h);
                }
            }
            if buf.len() > 2 + MAX_STREAM_HEADER + max_hello {
                return None;
            }
            let chunk = recv.read_chunk(4096, true).await.ok()??;
            buf.extend_from_slice(&chunk.bytes);
        }
    };
    let header = tokio::time::timeout(deadline, read).await.ok()??;
    Some((header, buf))
}

async fn handle_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, shared: Arc<Shared>) {
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream| {
        shared.metrics.peer_refused.fetch_add(1, Ordering::Relaxed);
        let _ = send.reset(VarInt::from_u32(codes::STREAM_NO_TUNNEL));
        let _ = recv.stop(VarInt::from_u32(codes::STREAM_NO_TUNNEL));
    };
    let limits = shared.limits();
    let deadline = Duration::from_millis(limits.client_hello_timeout_ms);
    let Some((header, first)) = read_header(&mut recv, deadline, limits.client_hello_max_bytes).await else {
        let _ = send.reset(VarInt::from_u32(codes::STREAM_BAD_HEADER));
        return;
    };
    tracing::debug!(sni = %header.sni, client = %header.client, "peer stream");
    let Some(node) = shared.registry.route(&header.sni) else { return refuse(&mut send, &mut recv) };
    let tunnels = node.tunnel_count();
    let cap = (u64::from(shared.config.tunnel.max_streams) * tunnels as u64).min(limits.max_connections_per_node);
    if tunnels == 0 || node.metrics.active.load(Ordering::Relaxed) >= cap {
        return refuse(&mut send, &mut recv);
    }
    let _active = crate::ingress::GaugeGuard::new(&node.metrics.active);
    let answered = match crate::ingress::place(&node, &first, &shared).await {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(node = %node.name, error = %e, "a peer's connection found no tunnel answering");
            let code = e.agent_code().unwrap_or(u64::from(codes::STREAM_NO_TUNNEL));
            let _ = send.reset(VarInt::from_u64(code).unwrap_or(VarInt::from_u32(codes::STREAM_NO_TUNNEL)));
            let _ = recv.stop(VarInt::from_u32(codes::STREAM_NO_TUNNEL));
            return;
        }
    };
    shared.metrics.peer_accepted.fetch_add(1, Ordering::Relaxed);
    node.metrics.total.fetch_add(1, Ordering::Relaxed);
    let crate::ingress::Answered { send: tunnel_send, recv: tunnel_recv, first_bytes, .. } = answered;
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    if !first_bytes.is_empty() {
        let written = tokio::time::timeout(idle, send.write_chunk(first_bytes)).await;
        if !matches!(written, Ok(Ok(()))) {
            let _ = send.reset(VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
            return;
        }
    }
    let end = edge_net::splice::splice_quic(
        (send, recv),
        (tunnel_send, tunnel_recv),
        codes::STREAM_CLIENT_ABORTED,
        &node.metrics.bytes,
        idle,
    )
    .await;
    tracing::trace!(node = %node.name, ?end, "forwarded connection finished");
}

/// The TLS config of the dialing side: the peer's pinned certificate, and
/// this server's identity as the client certificate.
fn peer_client_tls(pin: [u8; 32], identity: Arc<CertifiedKey>, alpn: &[u8]) -> rustls::ClientConfig {
    let mut config = edge_net::https::tls13_client_builder()
        .dangerous()
        .with_custom_certificate_verifier(edge_net::pinned::PinnedVerifier::new(pin))
        .with_client_cert_resolver(Arc::new(OwnIdentity(identity)));
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

#[derive(Debug)]
struct OwnIdentity(Arc<CertifiedKey>);

impl ResolvesClientCert for OwnIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Asks connecting peers for a certificate without requiring one (agents
/// send none) and checks only that the handshake is signed by its key: who
/// it is is decided afterwards, against the store's live servers.
#[derive(Debug)]
pub struct AnyClientCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl AnyClientCert {
    /// The verifier.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()) })
    }
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_hello_is_complete_across_records_only_when_whole() {
        // Handshake header: ClientHello of 6 bytes, split over two records.
        let message = [1u8, 0, 0, 6, 10, 11, 12, 13, 14, 15];
        let record = |p: &[u8]| {
            let mut r = vec![0x16, 3, 1, 0, p.len() as u8];
            r.extend_from_slice(p);
            r
        };
        let mut two = record(&message[..7]);
        two.extend(record(&message[7..]));
        assert!(hello_complete(&two));
        for end in 0..two.len() {
            assert!(!hello_complete(&two[..end]), "prefix {end}");
        }
        assert!(hello_complete(&record(&message)));
        assert!(!hello_complete(b""));
    }
}
