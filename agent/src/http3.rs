//! HTTP/3 for the node's clients (issue 17).
//!
//! Each tunnel the server gave a route gets its own quinn endpoint. Its
//! "socket" is the tunnel's DATAGRAM frames ([`edge_net::tunnel_udp`]), and
//! the connection IDs it issues start with the route
//! ([`edge_net::route_cids`]). It terminates QUIC and TLS with the node's
//! certificate, the same resolver TCP clients get, and serves HTTP/3 with
//! the `h3` crates. Each request goes to the route's upstream as HTTP/1.1.
//! A route in passthrough mode holds no certificate of its own here, so its
//! names are answered 421 (the client retries over TCP).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use edge_net::route_cids::RouteCids;
use edge_net::tunnel_udp::TunnelUdpSocket;
use edge_proto::quic_route::RouteId;
use edge_proto::routes::{Refusal, RouteMode};
use edge_proto::tunnel::StreamHeader;
use futures_util::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::routes::Connect;
use crate::{AgentShared, Node};

/// ALPN of HTTP/3.
const ALPN_H3: &[u8] = b"h3";
/// Datagrams queued toward the endpoint before new ones are dropped.
const INBOUND_QUEUE: usize = 4096;
/// Largest QUIC payload the endpoint sends or invites: with the address
/// header, a datagram still fits a tunnel on a 1452-byte path.
const MAX_UDP_PAYLOAD: u16 = 1350;
/// Deadline for the QUIC handshake and for a request's headers.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for the upstream's response head, and between body frames.
const UPSTREAM_IDLE: Duration = Duration::from_secs(120);
/// How long a bodiless request's end of stream is awaited after the
/// response (dropping the stream earlier would stop the client's sending).
const REQUEST_END_GRACE: Duration = Duration::from_secs(2);
/// Largest request header section accepted.
const MAX_FIELD_SECTION: u64 = 64 * 1024;
/// The address the endpoint believes it has: clients reach the server's
/// `listen.quic_clients`, whatever it is.
const LOCAL: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 443);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum Http3Error {
    /// The TLS or QUIC configuration was refused.
    #[error("HTTP/3 configuration: {0}")]
    Config(String),
    /// The endpoint could not be created.
    #[error("HTTP/3 endpoint: {0}")]
    Endpoint(#[from] std::io::Error),
}

/// Serves HTTP/3 clients carried by `tunnel` on `route` until the tunnel
/// closes or `shutdown`; then closes their connections. With `streams`
/// (both ends announced it), frames too large for a DATAGRAM frame cross
/// on frame streams ([`edge_net::frame_streams`]) both ways.
pub async fn serve(
    tunnel: quinn::Connection,
    route: RouteId,
    streams: bool,
    node: Arc<Node>,
    shutdown: CancellationToken,
) -> Result<(), Http3Error> {
    let stats = node.shared.metrics.http3_datagrams.clone();
    let (socket, feeder) = TunnelUdpSocket::new(tunnel.clone(), LOCAL, INBOUND_QUEUE, stats.clone(), streams);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(route)?,
        Some(server_config(&node.shared)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let feed = async {
        while let Ok(frame) = tunnel.read_datagram().await {
            if !feeder.feed(frame) {
                break;
            }
        }
    };
    let feed_streams = async {
        if !streams {
            return std::future::pending().await;
        }
        // Each stream lives at most STREAM_DEADLINE, and the server may
        // have only STREAMS_IN_FLIGHT open at once.
        while let Ok(recv) = tunnel.accept_uni().await {
            let (feeder, stats) = (feeder.clone(), stats.clone());
            tokio::spawn(async move {
                if let Some(frame) = edge_net::frame_streams::read(recv).await {
                    stats.received_on_streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    feeder.feed(frame);
                }
            });
        }
    };
    let stop = async {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            () = feed => {}
            () = feed_streams => {}
        }
    };
    accept_until(&endpoint, &node.shared, || Some(node.clone()), stop).await;
    Ok(())
}

/// Serves HTTP/3 on the agent's own UDP socket (direct mode: the same
/// address as the direct TLS listener) until `shutdown`. Clients arriving
/// before the server has told the agent its names are refused.
pub async fn serve_direct(
    socket: std::net::UdpSocket,
    shared: Arc<AgentShared>,
    shutdown: CancellationToken,
) -> Result<(), Http3Error> {
    let mut config = quinn::EndpointConfig::default();
    config.grease_quic_bit(false);
    let endpoint = quinn::Endpoint::new(config, Some(server_config(&shared)?), socket, Arc::new(quinn::TokioRuntime))?;
    accept_until(&endpoint, &shared, || shared.current_node(), shutdown.cancelled()).await;
    Ok(())
}

/// Accepts client connections on `endpoint` until `stop`, each served for
/// the node `node()` names at that moment; then closes them.
async fn accept_until(
    endpoint: &quinn::Endpoint,
    shared: &AgentShared,
    node: impl Fn() -> Option<Arc<Node>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let connections = TaskTracker::new();
    let max = u64::from(shared.config.http3.max_connections);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let metrics = &shared.metrics;
                let node = node();
                match node {
                    Some(node) if metrics.http3_connections.load(Ordering::Relaxed) < max => {
                        connections.spawn(connection(incoming, node));
                    }
                    _ => {
                        metrics.http3_refused.fetch_add(1, Ordering::Relaxed);
                        incoming.refuse();
                    }
                }
            }
        }
    }
    endpoint.close(quinn::VarInt::from_u32(0x100), b"closing");
    connections.close();
    // Bounded: the connections were closed just now.
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
}

fn endpoint_config(route: RouteId) -> Result<quinn::EndpointConfig, Http3Error> {
    let mut config = quinn::EndpointConfig::default();
    let key = std::hash::RandomState::new();
    config.cid_generator(move || Box::new(RouteCids::new(route, key.clone())));
    config.max_udp_payload_size(MAX_UDP_PAYLOAD).map_err(|e| Http3Error::Config(e.to_string()))?;
    // Clients must keep QUIC's fixed bit set: the server reads it to tell
    // QUIC from garbage before routing (RFC 9287 lets a peer that
    // advertises greasing receive packets without it).
    config.grease_quic_bit(false);
    Ok(config)
}

fn server_config(shared: &AgentShared) -> Result<quinn::ServerConfig, Http3Error> {
    let settings = &shared.config.http3;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Http3Error::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(shared.cert_resolver());
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| Http3Error::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(settings.max_streams_per_connection))
        // The client's control and QPACK streams, with room for more.
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(8))
        .max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(settings.idle_timeout_secs)).ok())
        .initial_mtu(1200)
        .datagram_receive_buffer_size(None);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Open connections, counted while this lives.
struct Open<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(incoming: quinn::Incoming, node: Arc<Node>) {
    let metrics = &node.shared.metrics;
    metrics.http3_connections.fetch_add(1, Ordering::Relaxed);
    let _open = Open(&metrics.http3_connections);
    let client = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_DEADLINE, async { incoming.accept()?.await }).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%client, error = %e, "HTTP/3 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%client, "HTTP/3 handshake timed out");
            return;
        }
    };
    metrics.http3_connections_total.fetch_add(1, Ordering::Relaxed);
    let sni = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.server_name)
        .unwrap_or_default();
    if !node.owns(&sni) {
        // The server routed it here by this name: it is not ours.
        tracing::warn!(%client, sni = %sni.escape_debug(), "HTTP/3 client for a name this node does not own");
        conn.close(quinn::VarInt::from_u32(0x102), b"unknown name");
        return;
    }
    let mut h3 = match h3::server::builder()
        .max_field_section_size(MAX_FIELD_SECTION)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await
    {
        Ok(h3) => h3,
        Err(e) => {
            tracing::debug!(%client, error = %e, "HTTP/3 connection setup failed");
            return;
        }
    };
    let requests = TaskTracker::new();
    let pool = Arc::new(UpstreamPool::default());
    loop {
        match h3.accept().await {
            Ok(Some(resolver)) => {
                let (node, sni, pool) = (node.clone(), sni.clone(), pool.clone());
                requests.spawn(async move {
                    let resolved = tokio::time::timeout(HANDSHAKE_DEADLINE, resolver.resolve_request()).await;
                    let Ok(Ok((request, stream))) = resolved else { return };
                    if let Err(e) = request_to_upstream(request, stream, &node, &sni, client, &pool).await {
                        tracing::debug!(%client, error = %e, "HTTP/3 request failed");
                    }
                });
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%client, error = %e, "HTTP/3 connection ended");
                break;
            }
        }
    }
    requests.close();
    requests.wait().await;
}

/// An upstream HTTP/1.1 connection; its driver stops when it is dropped.
struct UpstreamConn {
    route: Arc<crate::routes::Route>,
    sender: hyper::client::conn::http1::SendRequest<UpstreamBody>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for UpstreamConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Idle upstream connections of one client connection, reused by its
/// later requests (a connection per request would cost a TCP handshake
/// each). Per client connection, so a PROXY v2 header still names the
/// client the upstream connection serves.
#[derive(Default)]
struct UpstreamPool(std::sync::Mutex<Vec<UpstreamConn>>);

/// Idle upstream connections kept per client connection.
const POOL_MAX: usize = 8;
/// How long a pooled connection may take to be ready again.
const POOL_READY_WAIT: Duration = Duration::from_millis(100);

impl UpstreamPool {
    /// An idle connection to `route`, ready for a request.
    async fn take(&self, route: &Arc<crate::routes::Route>) -> Option<UpstreamConn> {
        let mut conn = {
            let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
            // Closed ones are dropped on the way.
            idle.retain(|c| !c.sender.is_closed());
            let i = idle.iter().position(|c| Arc::ptr_eq(&c.route, route))?;
            idle.swap_remove(i)
        };
        // Just returned ones may still be finishing their last response.
        match tokio::time::timeout(POOL_READY_WAIT, conn.sender.ready()).await {
            Ok(Ok(())) => Some(conn),
            _ => None,
        }
    }

    fn put(&self, conn: UpstreamConn) {
        let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < POOL_MAX && !conn.sender.is_closed() {
            idle.push(conn);
        }
    }
}

type H3Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;
type H3Send = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type H3Recv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;
type UpstreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// Why a request could not be relayed.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("HTTP/3 stream: {0}")]
    Stream(#[from] h3::error::StreamError),
    #[error("upstream: {0}")]
    Upstream(String),
}

async fn request_to_upstream(
    request: Request<()>,
    stream: H3Stream,
    node: &Node,
    sni: &str,
    client: SocketAddr,
    pool: &UpstreamPool,
) -> Result<(), RequestError> {
    let (mut send, recv) = stream.split();
    let host = request.uri().host().map(str::to_ascii_lowercase).unwrap_or_else(|| sni.to_string());
    if host != sni && !node.owns(&host) {
        return answer(&mut send, StatusCode::MISDIRECTED_REQUEST, "this connection does not serve that name\n").await;
    }
    let Some(route) = node.shared.routes().select(&host) else {
        return refuse(&mut send, Refusal::NotFound).await;
    };
    if route.mode == RouteMode::Passthrough {
        return answer(&mut send, StatusCode::MISDIRECTED_REQUEST, "this name is served over TCP only\n").await;
    }
    let mut upstream = match pool.take(&route).await {
        Some(conn) => conn,
        None => {
            // Same family as the client, so a PROXY v2 header stays IPv4 for
            // IPv4 clients.
            let local = if client.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 443)) } else { LOCAL };
            let header = StreamHeader { client, local, sni: sni.to_string(), plain: false, service: None };
            let tcp = match route.connect(&header).await {
                Connect::Ok(tcp) => tcp,
                Connect::Refused(refusal, why) => {
                    tracing::debug!(route = %route.pattern, why, "HTTP/3 request refused");
                    return refuse(&mut send, refusal).await;
                }
            };
            let io = hyper_util::rt::TokioIo::new(tcp);
            let (sender, conn) = match hyper::client::conn::http1::handshake::<_, UpstreamBody>(io).await {
                Ok(pair) => pair,
                Err(e) => return Err(RequestError::Upstream(e.to_string())),
            };
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            UpstreamConn { route: route.clone(), sender, driver }
        }
    };
    let result = exchange(&mut upstream.sender, request, &host, &mut send, recv).await;
    if result.is_ok() {
        node.shared.metrics.http3_requests.fetch_add(1, Ordering::Relaxed);
        pool.put(upstream);
    }
    result
}

/// Sends the request upstream and relays the response.
async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<UpstreamBody>,
    request: Request<()>,
    host: &str,
    send: &mut H3Send,
    recv: H3Recv,
) -> Result<(), RequestError> {
    let (parts, ()) = request.into_parts();
    let bodiless = matches!(parts.method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS)
        && !parts.headers.contains_key(http::header::CONTENT_LENGTH);
    // A bodiless request's receive half stays open until the response is
    // sent: dropping it earlier sends STOP_SENDING, which fails a client
    // whose end of stream is still in flight.
    let (body, request_end): (UpstreamBody, Option<H3Recv>) = if bodiless {
        (http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync(), Some(recv))
    } else {
        let frames = futures_util::stream::unfold(recv, |mut recv| async move {
            match tokio::time::timeout(UPSTREAM_IDLE, recv.recv_data()).await {
                Ok(Ok(Some(mut chunk))) => {
                    let bytes = chunk.copy_to_bytes(chunk.remaining());
                    Some((Ok(hyper::body::Frame::data(bytes)), recv))
                }
                Ok(Ok(None)) => None,
                Ok(Err(e)) => Some((Err(std::io::Error::other(e.to_string())), recv)),
                Err(_) => Some((Err(std::io::Error::other("request body stalled")), recv)),
            }
        });
        (BodyExt::boxed_unsync(http_body_util::StreamBody::new(frames.boxed())), None)
    };
    let mut upstream_request = Request::builder()
        .method(parts.method)
        .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
        .version(http::Version::HTTP_11)
        .body(body)
        .map_err(|e| RequestError::Upstream(e.to_string()))?;
    let headers = upstream_request.headers_mut();
    for (name, value) in parts.headers.iter() {
        if !is_connection_specific(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(value) = HeaderValue::from_str(host) {
        headers.insert(http::header::HOST, value);
    }
    let response = match tokio::time::timeout(UPSTREAM_IDLE, sender.send_request(upstream_request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            answer(send, StatusCode::BAD_GATEWAY, "the upstream failed\n").await?;
            return Err(RequestError::Upstream(e.to_string()));
        }
        Err(_) => {
            answer(send, StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time\n").await?;
            return Err(RequestError::Upstream("no response in time".into()));
        }
    };
    let (parts, mut body) = response.into_parts();
    let mut head =
        Response::builder().status(parts.status).body(()).map_err(|e| RequestError::Upstream(e.to_string()))?;
    for (name, value) in parts.headers.iter() {
        if !is_connection_specific(name) {
            head.headers_mut().append(name.clone(), value.clone());
        }
    }
    send.send_response(head).await?;
    loop {
        let frame = match tokio::time::timeout(UPSTREAM_IDLE, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return Err(RequestError::Upstream(e.to_string()));
            }
            Err(_) => {
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return Err(RequestError::Upstream("response body stalled".into()));
            }
        };
        match frame.into_data() {
            Ok(data) => send.send_data(data).await?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    send.send_trailers(trailers).await?;
                }
            }
        }
    }
    send.finish().await?;
    if let Some(mut recv) = request_end {
        // Until the client's end of stream, briefly (it is usually here).
        let _ =
            tokio::time::timeout(REQUEST_END_GRACE, async { while let Ok(Some(_)) = recv.recv_data().await {} }).await;
    }
    Ok(())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), which HTTP/3 forbids.
fn is_connection_specific(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade" | "te" | "host"
    )
}

async fn refuse(send: &mut H3Send, refusal: Refusal) -> Result<(), RequestError> {
    let (code, reason) = refusal.status();
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    answer(send, status, &format!("{reason}\n")).await
}

async fn answer(send: &mut H3Send, status: StatusCode, body: &str) -> Result<(), RequestError> {
    let head = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(())
        .map_err(|e| RequestError::Upstream(e.to_string()))?;
    send.send_response(head).await?;
    send.send_data(Bytes::copy_from_slice(body.as_bytes())).await?;
    send.finish().await?;
    Ok(())
}
