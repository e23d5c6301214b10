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
use crate::routes::{Connect, Route};
use crate::{AgentShared, Node};

/// Deadline for a direct client's TLS handshake and a probe's nonce.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Most bytes of a ClientHello read to find its name.
const CLIENT_HELLO_MAX: usize = 16 * 1024;

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
            // The route by the ClientHello's name (left in the socket for
            // the handshake or the passthrough upstream).
            let sni = match peek_sni(&tcp).await {
                Ok(sni) => sni.unwrap_or_else(|| {
                    node.hostnames.iter().find(|h| !h.starts_with("*.")).cloned().unwrap_or_else(|| node.name.clone())
                }),
                Err(why) => return tracing::debug!(%peer, %why, "direct connection: no ClientHello"),
            };
            let header = StreamHeader { client: peer, local, sni, plain: false, service: None };
            let table = node.shared.routes();
            let Some(route) = table.select(&header.sni) else {
                if table.fallback_mode == Mode::Terminate {
                    return terminate_direct(tcp, peer, header, None, table.fallback_direct_tls.clone(), &node).await;
                }
                return tracing::debug!(%peer, sni = %header.sni, "direct connection: no route for the name");
            };
            if route.mode == Mode::Terminate {
                let tls = route.direct_tls.clone();
                return terminate_direct(tcp, peer, header, Some(&route), tls, &node).await;
            }
            let mut upstream = match route.connect(&header).await {
                Connect::Ok(u) => u,
                Connect::Refused(_, why) => return tracing::debug!(%peer, %why, "direct connection: upstream failed"),
            };
            let mut tcp = tcp;
            if let Err(e) = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await {
                tracing::debug!(%peer, error = %e, "direct connection failed");
            }
        });
    }
    tasks.close();
}

/// Terminates TLS first, then either answers the server's reachability
/// probe (ALPN `edge-probe/1`) or forwards to the upstream.
async fn terminate_direct(
    tcp: TcpStream,
    peer: SocketAddr,
    header: StreamHeader,
    route: Option<&Route>,
    config: Arc<rustls::ServerConfig>,
    node: &Node,
) {
    let mut tls = match crate::streams::accept(tcp, config, &node.shared.challenges).await {
        Ok(tls) => tls,
        Err(e) => return tracing::debug!(%peer, error = %e, "direct client TLS handshake"),
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
    let Some(route) = route else {
        return crate::streams::answer_over_tls(tls, edge_proto::routes::Refusal::NotFound).await;
    };
    // No tunnel window to protect: a budget that never sheds.
    let unbounded = Arc::new(StallBudget::new(usize::MAX));
    // HTTP/3 is served on the same address over UDP.
    let http3 = &node.shared.config.http3;
    let alt_svc = (http3.enabled && http3.alt_svc).then_some(header.local.port());
    if let Err(e) = crate::streams::serve_terminated(tls, &header, route, node, &unbounded, alt_svc).await {
        tracing::debug!(%peer, error = %e, "direct connection");
    }
}

/// Reads the server name of the ClientHello waiting in `tcp` without taking
/// it off the socket. `Ok(None)`: a ClientHello without a name.
async fn peek_sni(tcp: &TcpStream) -> Result<Option<String>, String> {
    let mut buf = vec![0u8; CLIENT_HELLO_MAX];
    let read = async {
        loop {
            let n = tcp.peek(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed".to_string());
            }
            match edge_proto::client_hello::parse(&buf[..n], CLIENT_HELLO_MAX) {
                edge_proto::client_hello::Parse::Incomplete => {
                    // Peeking again returns at once with the same bytes:
                    // wait for more to arrive.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                edge_proto::client_hello::Parse::Rejected(edge_proto::client_hello::Rejection::NoSni) => {
                    return Ok(None)
                }
                edge_proto::client_hello::Parse::Rejected(r) => return Err(r.label().to_string()),
                edge_proto::client_hello::Parse::Found(name) => return Ok(Some(name)),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_DEADLINE, read).await.map_err(|_| "timed out".to_string())?
}
