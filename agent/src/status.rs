//! Local status endpoint for supervisors: `/ready` (200 with a tunnel up,
//! 503 without) and `/metrics`. Plain HTTP on a loopback address only.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::AgentShared;

/// The status routes.
pub fn router(shared: Arc<AgentShared>) -> Router {
    Router::new().route("/ready", get(ready)).route("/metrics", get(metrics)).with_state(shared)
}

async fn ready(State(shared): State<Arc<AgentShared>>) -> impl IntoResponse {
    if shared.metrics.tunnels_up.load(Ordering::Relaxed) > 0 {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no tunnel\n")
    }
}

async fn metrics(State(shared): State<Arc<AgentShared>>) -> impl IntoResponse {
    let mut body = shared.metrics.render();
    shared.routes().render_metrics(&mut body);
    edge_net::render_process_metrics(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<AgentShared>, shutdown: CancellationToken) {
    let result =
        axum::serve(listener, router(shared)).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "status endpoint stopped");
    }
}
