//! Direct listener: clients connect to the node itself (no tunnel), and the
//! agent terminates TLS with the same certificate and upstream logic as for
//! tunnel streams. This is the node side of direct mode, and the baseline the
//! benchmark compares the tunnel against.

use std::net::SocketAddr;
use std::sync::Arc;

use edge_proto::tunnel::StreamHeader;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Mode;
use crate::AgentShared;

/// Accepts direct clients until shutdown. Connections arriving before the
/// first tunnel has told the agent its names are refused (no certificate).
pub async fn serve(listener: TcpListener, shared: Arc<AgentShared>, shutdown: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on direct listener");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(node) = shared.current_node() else {
            tracing::debug!(%peer, "direct connection before the node is known; refused");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tasks.spawn(async move {
            let local = tcp.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            let config = &node.shared.config;
            let header = StreamHeader { client: peer, local, sni: node.name.clone() };
            let upstream =
                match crate::streams::connect_upstream(&config.upstream, &header, config.proxy_protocol).await {
                    Ok(u) => u,
                    Err(e) => return tracing::debug!(%peer, error = %e, "direct connection: upstream failed"),
                };
            let result = match config.mode {
                Mode::Terminate => crate::streams::terminate(tcp, upstream, &node, "direct").await,
                Mode::Passthrough => {
                    let mut tcp = tcp;
                    let mut upstream = upstream;
                    tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await.map(|_| ()).map_err(|e| {
                        crate::streams::StreamError::Upstream { addr: config.upstream.clone(), error: e.to_string() }
                    })
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "direct connection failed");
            }
        });
    }
    tasks.close();
}
