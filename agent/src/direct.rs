//! Direct listener: clients connect to the node itself (no tunnel), and the
//! agent terminates TLS with the same certificate and upstream logic as for
//! tunnel streams. This is the node side of direct mode, and the baseline the
//! benchmark compares the tunnel against.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edge_net::stall::StallBudget;
use edge_proto::probe;
use edge_proto::tunnel::StreamHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::Mode;
use crate::{AgentShared, Node};

/// Deadline for a direct client's TLS handshake and a probe's nonce.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

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
            let header = StreamHeader { client: peer, local, sni: node.name.clone(), plain: false };
            if config.mode == Mode::Terminate {
                return terminate_direct(tcp, peer, header, &node).await;
            }
            let upstream =
                match crate::streams::connect_upstream(&config.upstream, &header, config.proxy_protocol).await {
                    Ok(u) => u,
                    Err(e) => return tracing::debug!(%peer, error = %e, "direct connection: upstream failed"),
                };
            let result = match config.mode {
                Mode::Terminate => Ok(()),
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

/// Terminates TLS first, then either answers the server's reachability
/// probe (ALPN `edge-probe/1`) or forwards to the upstream.
async fn terminate_direct(tcp: TcpStream, peer: SocketAddr, header: StreamHeader, node: &Node) {
    let acceptor = tokio_rustls::TlsAcceptor::from(node.direct_tls.clone());
    let mut tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "direct client TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "direct client TLS handshake timed out"),
    };
    if tls.get_ref().1.alpn_protocol() == Some(probe::ALPN) {
        let mut nonce = [0u8; probe::NONCE_LEN];
        match tokio::time::timeout(HANDSHAKE_DEADLINE, tls.read_exact(&mut nonce)).await {
            Ok(Ok(_)) => {
                let key = probe::key_from_token(&node.shared.ticket.token);
                let answer = probe::answer(&key, &node.name, &nonce);
                let _ = tokio::time::timeout(HANDSHAKE_DEADLINE, async {
                    tls.write_all(&answer).await?;
                    tls.shutdown().await
                })
                .await;
                tracing::debug!(%peer, "answered a reachability probe");
            }
            _ => tracing::debug!(%peer, "probe connection sent no nonce"),
        }
        return;
    }
    let config = &node.shared.config;
    match crate::streams::connect_upstream(&config.upstream, &header, config.proxy_protocol).await {
        // No tunnel window to protect: a budget that never sheds.
        Ok(upstream) => crate::streams::pump(tls, upstream, node, "direct", &StallBudget::new(usize::MAX)).await,
        Err(e) => tracing::debug!(%peer, error = %e, "direct connection: upstream failed"),
    }
}
