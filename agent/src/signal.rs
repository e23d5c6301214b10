//! Heartbeats to the server's signal API over HTTPS, with the same server
//! trust as the tunnel (pinned fingerprint or CA).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::AgentShared;

/// Interval between heartbeats.
pub const INTERVAL: Duration = Duration::from_secs(15);
/// Deadline for one heartbeat request, connect to response.
const DEADLINE: Duration = Duration::from_secs(10);
/// Largest response body read.
const MAX_RESPONSE: usize = 64 * 1024;

/// Sends a heartbeat every [`INTERVAL`] until shutdown. Failures are logged
/// and do not stop the agent: the tunnel is what carries traffic.
pub async fn run(shared: Arc<AgentShared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if shared.metrics.tunnels_up.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match tokio::time::timeout(DEADLINE, send(&shared)).await {
            Ok(Ok(())) => tracing::debug!("heartbeat sent to signal API"),
            Ok(Err(e)) => {
                tracing::warn!(api = %shared.ticket.api, error = %e, "heartbeat to signal API failed")
            }
            Err(_) => tracing::warn!(api = %shared.ticket.api, "heartbeat to signal API timed out"),
        }
    }
}

/// One heartbeat request.
pub async fn send(shared: &AgentShared) -> Result<(), String> {
    let cert_not_after = shared.certificate().map(|c| c.not_after);
    let m = &shared.metrics;
    let counters = [
        ("open_streams", &m.open_streams),
        ("total_streams", &m.total_streams),
        ("stream_errors", &m.stream_errors),
        ("tunnels_up", &m.tunnels_up),
        ("bytes_to_upstream", &m.bytes.quic_to_tcp),
        ("bytes_from_upstream", &m.bytes.tcp_to_quic),
    ];
    let body = edge_proto::signal::HeartbeatRequest {
        status: "ready".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        capabilities: crate::session::capabilities(&shared.config),
        counters: counters.iter().map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed))).collect(),
        cert_not_after,
    };
    let (status, body) = request(shared, hyper::Method::POST, "/api/signal/heartbeat", &body, MAX_RESPONSE).await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&body).trim()))
    }
}

/// One JSON request to the signal API with the node token, over HTTPS with
/// the tunnel's server trust. Returns the status and up to `max_response`
/// bytes of body; the caller sets the deadline.
pub async fn request(
    shared: &AgentShared,
    method: hyper::Method,
    path: &str,
    body: &impl serde::Serialize,
    max_response: usize,
) -> Result<(hyper::StatusCode, Bytes), String> {
    let api = &shared.ticket.api;
    let tls = shared.trust.client_config(b"http/1.1");
    let name = crate::tls::server_name(api);
    let first =
        edge_net::https::json_request(api, &name, tls, method.clone(), path, &shared.ticket.token, body, max_response)
            .await;
    // The join string's server unreachable: any other live server of the
    // cluster serves the same API (pinned by the fingerprint it was listed
    // with). Only connection failures move on: an answer is an answer.
    let unreachable = |e: &String| e.starts_with("connect:") || e.starts_with("TLS:");
    let Err(e) = &first else { return first };
    if !unreachable(e) {
        return first;
    }
    let join_fp = shared.ticket.fingerprint.map(|fp| edge_proto::join::hex(&fp));
    let mut last = first;
    for server in shared.known_servers() {
        if join_fp.as_deref().is_some_and(|fp| fp.eq_ignore_ascii_case(&server.fingerprint)) {
            continue;
        }
        let Some(pin) = edge_proto::join::parse_fingerprint(&server.fingerprint) else { continue };
        let tls = edge_net::https::pinned_client_config(pin, b"http/1.1");
        let name = crate::tls::server_name(&server.api);
        last = edge_net::https::json_request(
            &server.api,
            &name,
            tls,
            method.clone(),
            path,
            &shared.ticket.token,
            body,
            max_response,
        )
        .await;
        match &last {
            Err(e) if unreachable(e) => continue,
            _ => return last,
        }
    }
    last
}
