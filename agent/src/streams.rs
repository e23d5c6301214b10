//! One data stream = one client connection: read the header, check the name
//! is this node's, pick the route for it, then terminate TLS and, once the
//! handshake is complete, forward plaintext to an upstream of the route (or
//! forward the raw TLS in passthrough mode). A route that cannot serve
//! answers 404/502/503 in HTTP.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use edge_net::stall::{is_shed, StallBudget, StallGuard};
use edge_proto::tunnel::{codes, StreamHeader, MAX_STREAM_HEADER};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use edge_proto::routes::Refusal;

use crate::config::Mode;
use crate::routes::{Connect, Route};
use crate::Node;

/// Deadline for the header and for the client's TLS handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for connecting to the upstream.
const UPSTREAM_CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// Backstop for idle passthrough streams; the server's own idle timeout
/// (`limits.idle_timeout_secs`) normally ends them first.
const PASSTHROUGH_IDLE: Duration = Duration::from_secs(3600);
/// How long an answered client may take to close after the answer.
const LINGER: Duration = Duration::from_secs(2);

/// Why a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The header was missing, late or invalid.
    #[error("bad stream header: {0}")]
    Header(String),
    /// The server sent a name this node does not own.
    #[error("stream for {0:?}, which this node does not own")]
    NotOurs(String),
    /// The upstream could not be reached.
    #[error("upstream {addr}: {error}")]
    Upstream {
        /// Upstream address.
        addr: String,
        /// Why.
        error: String,
    },
    /// The client's TLS handshake failed.
    #[error("client TLS handshake: {0}")]
    Tls(String),
    /// The server named a TCP service this agent does not declare.
    #[error("no TCP service named {0:?} is declared")]
    NoService(String),
    /// No route serves the name, and the connection could only be closed.
    #[error("no route for {0:?}")]
    NoRoute(String),
    /// The client was answered with an HTTP error (404, 502, 503).
    #[error("answered {0}: {1}")]
    Refused(u16, String),
    /// The connection was an ACME TLS-ALPN-01 validation, now answered.
    #[error("answered a TLS-ALPN-01 validation for {0}")]
    AcmeChallenge(String),
}

/// Serves one data stream to completion. `stalls` is the budget of the
/// stream's QUIC connection: an upstream that stops reading an upload while
/// the tunnel needs the window gets the stream shed.
///
/// `alt_svc` is the UDP port to advertise HTTP/3 on (`Alt-Svc`) in the
/// first HTTP/1.x response of a terminated connection, when the tunnel
/// carries QUIC clients.
pub async fn handle(
    mut send: SendStream,
    mut recv: RecvStream,
    node: Arc<Node>,
    stalls: Arc<StallBudget>,
    alt_svc: Option<u16>,
) {
    let metrics = &node.shared.metrics;
    metrics.total_streams.fetch_add(1, Ordering::Relaxed);
    metrics.open_streams.fetch_add(1, Ordering::Relaxed);
    let reset = |send: &mut SendStream, recv: &mut RecvStream, code: u32| {
        let _ = send.reset(VarInt::from_u32(code));
        let _ = recv.stop(VarInt::from_u32(code));
    };
    let result = match prepare(&mut recv, &node).await {
        Err((code, e)) => {
            reset(&mut send, &mut recv, code);
            Err(e)
        }
        Ok(header) if header.service.is_some() => serve_service(send, recv, &header, &node, &stalls).await,
        Ok(header) => {
            let table = node.shared.routes();
            match table.select(&header.sni) {
                // Plain HTTP gets the refusal as is; TLS gets it over the
                // node's TLS when terminating, a reset when passing through.
                None if header.plain => refuse_plain(send, recv, Refusal::NotFound).await,
                None if table.fallback_mode == Mode::Terminate => {
                    let challenges = &node.shared.challenges;
                    refuse_tls(tokio::io::join(recv, send), table.fallback_tls.clone(), Refusal::NotFound, challenges)
                        .await
                }
                None => {
                    reset(&mut send, &mut recv, codes::STREAM_UPSTREAM_FAILED);
                    Err(StreamError::NoRoute(header.sni))
                }
                // Passthrough, and plain HTTP from the server's :80: bytes as
                // they are, so the upstream is connected at once.
                Some(route) if header.plain || route.mode == Mode::Passthrough => match route.connect(&header).await {
                    Connect::Refused(refusal, why) => {
                        if header.plain {
                            let _ = refuse_plain(send, recv, refusal).await;
                        } else {
                            reset(&mut send, &mut recv, codes::STREAM_UPSTREAM_FAILED);
                        }
                        Err(StreamError::Refused(refusal.status().0, why))
                    }
                    Connect::Ok(upstream) => {
                        let end = edge_net::splice::splice(
                            upstream,
                            send,
                            recv,
                            codes::STREAM_UPSTREAM_FAILED,
                            &metrics.bytes,
                            PASSTHROUGH_IDLE,
                            &stalls,
                        )
                        .await;
                        if end == edge_net::splice::SpliceEnd::Shed {
                            metrics.streams_shed.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::trace!(?end, name = %header.sni, plain = header.plain, "raw stream done");
                        Ok(())
                    }
                },
                Some(route) => terminate(tokio::io::join(recv, send), &header, &route, &node, &stalls, alt_svc).await,
            }
        }
    };
    metrics.open_streams.fetch_sub(1, Ordering::Relaxed);
    if let Err(e) = result {
        if !matches!(e, StreamError::AcmeChallenge(_)) {
            metrics.stream_errors.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(error = %e, "stream failed");
    }
}

/// A raw TCP service: the target this agent declared under the header's
/// service name, or a reset when it declares none (the server names
/// services, never addresses).
async fn serve_service(
    mut send: SendStream,
    mut recv: RecvStream,
    header: &StreamHeader,
    node: &Node,
    stalls: &Arc<StallBudget>,
) -> Result<(), StreamError> {
    let name = header.service.as_deref().unwrap_or_default();
    let table = node.shared.routes();
    let Some(service) = table.service(name) else {
        let _ = send.reset(VarInt::from_u32(codes::STREAM_NO_SERVICE));
        let _ = recv.stop(VarInt::from_u32(codes::STREAM_NO_SERVICE));
        static LOG: std::sync::LazyLock<edge_net::logging::Throttle> =
            std::sync::LazyLock::new(|| edge_net::logging::Throttle::new(Duration::from_secs(10)));
        if let Some(suppressed) = LOG.due() {
            tracing::warn!(service = %name, suppressed,
                "the server sent a connection for a TCP service this agent does not declare; refused \
                 (add it under [[services]]; logged at most every 10 s)");
        }
        return Err(StreamError::NoService(name.to_string()));
    };
    let upstream = match connect_upstream(&service.target, header, service.proxy_protocol).await {
        Ok(u) => u,
        Err(e) => {
            let _ = send.reset(VarInt::from_u32(codes::STREAM_UPSTREAM_FAILED));
            let _ = recv.stop(VarInt::from_u32(codes::STREAM_UPSTREAM_FAILED));
            return Err(e);
        }
    };
    let metrics = &node.shared.metrics;
    let end = edge_net::splice::splice(
        upstream,
        send,
        recv,
        codes::STREAM_UPSTREAM_FAILED,
        &metrics.bytes,
        PASSTHROUGH_IDLE,
        stalls,
    )
    .await;
    if end == edge_net::splice::SpliceEnd::Shed {
        metrics.streams_shed.fetch_add(1, Ordering::Relaxed);
    }
    tracing::trace!(?end, service = %name, "service stream done");
    Ok(())
}

/// Answers plain HTTP (from the server's :80) with `refusal` and ends the stream.
async fn refuse_plain(mut send: SendStream, mut recv: RecvStream, refusal: Refusal) -> Result<(), StreamError> {
    let _ = tokio::time::timeout(HANDSHAKE_DEADLINE, send.write_all(&refusal.response())).await;
    let _ = send.finish();
    drain_until_closed(&mut recv).await;
    Err(StreamError::Refused(refusal.status().0, "answered on plain HTTP".into()))
}

/// After an answer that closes: reads what the client still sends until it
/// closes too (or [`LINGER`] passes). Hanging up on unread input would have
/// the server reset the client's TCP, and a reset can destroy the answer
/// before the client reads it.
async fn drain_until_closed<R: tokio::io::AsyncRead + Unpin>(r: &mut R) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = r.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Completes the client's TLS handshake, then answers `refusal` over it.
async fn refuse_tls<IO>(
    io: IO,
    tls: Arc<rustls::ServerConfig>,
    refusal: Refusal,
    challenges: &crate::tls::ChallengeCerts,
) -> Result<(), StreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Abort,
{
    let tls = accept(io, tls, challenges).await?;
    answer_over_tls(tls, refusal).await;
    Err(StreamError::Refused(refusal.status().0, "no route for the name".into()))
}

/// Writes `refusal` as HTTP/1.1 on an established TLS session and closes
/// it, unless the client negotiated another protocol (then it is aborted:
/// an HTTP/1.1 answer would be garbage to it).
pub async fn answer_over_tls<IO>(mut tls: tokio_rustls::server::TlsStream<IO>, refusal: Refusal)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Abort,
{
    let http1 = tls.get_ref().1.alpn_protocol().is_none_or(|p| p == b"http/1.1");
    if !http1 {
        let (io, _) = tls.into_inner();
        io.abort(codes::STREAM_UPSTREAM_FAILED);
        return;
    }
    let answered = tokio::time::timeout(HANDSHAKE_DEADLINE, async {
        tls.write_all(&refusal.response()).await?;
        tls.shutdown().await
    })
    .await;
    if matches!(answered, Ok(Ok(()))) {
        drain_until_closed(&mut tls).await;
    }
}

async fn read_header(recv: &mut RecvStream) -> Result<StreamHeader, StreamError> {
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await.map_err(|e| StreamError::Header(e.to_string()))?;
    let n = usize::from(u16::from_be_bytes(len));
    if n > MAX_STREAM_HEADER {
        return Err(StreamError::Header(format!("{n} bytes exceeds {MAX_STREAM_HEADER}")));
    }
    let mut buf = vec![0u8; 2 + n];
    buf[..2].copy_from_slice(&len);
    recv.read_exact(&mut buf[2..]).await.map_err(|e| StreamError::Header(e.to_string()))?;
    match StreamHeader::decode(&buf) {
        Ok(Some((header, _))) => Ok(header),
        Ok(None) => Err(StreamError::Header("truncated".into())),
        Err(e) => Err(StreamError::Header(e.to_string())),
    }
}

/// Connects to the upstream, writing a PROXY v2 header first if configured.
pub async fn connect_upstream(
    addr: &str,
    header: &StreamHeader,
    proxy_protocol: bool,
) -> Result<TcpStream, StreamError> {
    let fail = |error: String| StreamError::Upstream { addr: addr.to_string(), error };
    let mut tcp = tokio::time::timeout(UPSTREAM_CONNECT_DEADLINE, TcpStream::connect(addr))
        .await
        .map_err(|_| fail("connect timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    if proxy_protocol {
        let proxy = edge_proto::proxy_v2::encode(header.client, header.local);
        tcp.write_all(&proxy).await.map_err(|e| fail(e.to_string()))?;
    }
    Ok(tcp)
}

/// Reads the header and checks the name is this node's.
async fn prepare(recv: &mut RecvStream, node: &Node) -> Result<StreamHeader, (u32, StreamError)> {
    let header = tokio::time::timeout(HANDSHAKE_DEADLINE, read_header(recv))
        .await
        .map_err(|_| StreamError::Header("timed out".into()))
        .and_then(|r| r)
        .map_err(|e| (codes::STREAM_BAD_HEADER, e))?;
    if !node.owns(&header.sni) {
        tracing::warn!(sni = %header.sni, "server sent a stream for a name this node does not own; refused");
        return Err((codes::STREAM_BAD_HEADER, StreamError::NotOurs(header.sni)));
    }
    Ok(header)
}

/// A client transport that can be aborted (QUIC reset, TCP RST).
pub trait Abort {
    /// Aborts both directions with `code` where the transport carries one.
    fn abort(self, code: u32);
}

impl Abort for tokio::io::Join<RecvStream, SendStream> {
    fn abort(self, code: u32) {
        let (mut r, mut s) = self.into_inner();
        let _ = s.reset(VarInt::from_u32(code));
        let _ = r.stop(VarInt::from_u32(code));
    }
}

impl Abort for TcpStream {
    fn abort(self, _code: u32) {
        edge_net::splice::reset_tcp(&self);
    }
}

/// Copies plaintext between an established client TLS session and the
/// upstream until both sides finish; an error aborts both. Writes to the
/// upstream count against `stalls`. With `alt_svc`, an HTTP/1.x session's
/// first response advertises HTTP/3 on that UDP port.
pub async fn pump<IO>(
    mut tls: tokio_rustls::server::TlsStream<IO>,
    upstream: TcpStream,
    node: &Node,
    sni: &str,
    stalls: &Arc<StallBudget>,
    alt_svc: Option<u16>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Abort,
{
    let advertise = alt_svc
        .filter(|_| crate::alt_svc::speaks_http1(tls.get_ref().1.alpn_protocol()))
        .map(edge_proto::alt_svc::h3_header);
    let upstream = StallGuard::new(upstream, stalls.clone());
    let added = &node.shared.metrics.alt_svc_added;
    let mut upstream = crate::alt_svc::AdvertisingUpstream::new(upstream, advertise, added);
    // No buffer held while idle: tokio's copy kept two zeroed 64 KiB
    // buffers per connection resident (docs/benchmarks.md, issue 16).
    let copied = edge_net::lean_copy::copy_bidirectional(&mut tls, &mut upstream).await;
    let bytes = &node.shared.metrics.bytes;
    match copied {
        Ok((to_upstream, from_upstream)) => {
            bytes.quic_to_tcp.fetch_add(to_upstream, Ordering::Relaxed);
            bytes.tcp_to_quic.fetch_add(from_upstream, Ordering::Relaxed);
            tracing::trace!(sni, to_upstream, from_upstream, "stream done");
        }
        Err(e) => {
            // Abort both ways: reset the client side, RST the upstream.
            let (io, _) = tls.into_inner();
            io.abort(codes::STREAM_UPSTREAM_FAILED);
            edge_net::splice::reset_tcp(upstream.get_ref().get_ref());
            if is_shed(&e) {
                node.shared.metrics.streams_shed.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(sni, error = %e, "stream aborted");
        }
    }
}

/// The client's TLS handshake on `io` with `tls`, under the deadline. While
/// a TLS-ALPN-01 answer is served, a client offering ALPN `acme-tls/1` for
/// its host (the CA validating a custom domain) gets the challenge
/// certificate instead, and the connection ends there
/// ([`StreamError::AcmeChallenge`]).
pub(crate) async fn accept<IO>(
    io: IO,
    tls: Arc<rustls::ServerConfig>,
    challenges: &crate::tls::ChallengeCerts,
) -> Result<tokio_rustls::server::TlsStream<IO>, StreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Abort,
{
    if challenges.is_empty() {
        let accept = tokio_rustls::TlsAcceptor::from(tls).accept(io).into_fallible();
        return match tokio::time::timeout(HANDSHAKE_DEADLINE, accept).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err((e, io))) => {
                io.abort(codes::STREAM_TLS_FAILED);
                Err(StreamError::Tls(e.to_string()))
            }
            Err(_) => Err(StreamError::Tls("timed out".into())),
        };
    }
    let handshake = async {
        let mut lazy = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let start = match (&mut lazy).await {
            Ok(start) => start,
            Err(e) => {
                if let Some(io) = lazy.take_io() {
                    io.abort(codes::STREAM_TLS_FAILED);
                }
                return Err(StreamError::Tls(e.to_string()));
            }
        };
        let hello = start.client_hello();
        let acme = hello.alpn().is_some_and(|mut alpn| alpn.any(|p| p == edge_proto::domains::ACME_TLS_ALPN));
        let host = hello.server_name().map(str::to_ascii_lowercase).unwrap_or_default();
        let answer = acme.then(|| challenges.config_for(&host)).flatten();
        let config = answer.clone().unwrap_or(tls);
        let stream = match start.into_stream(config).into_fallible().await {
            Ok(stream) => stream,
            Err((e, io)) => {
                io.abort(codes::STREAM_TLS_FAILED);
                return Err(StreamError::Tls(e.to_string()));
            }
        };
        if answer.is_none() {
            return Ok(stream);
        }
        // The handshake was the answer; the CA sends nothing more.
        let mut stream = stream;
        let _ = stream.shutdown().await;
        tracing::info!(%host, "answered a TLS-ALPN-01 validation");
        Err(StreamError::AcmeChallenge(host))
    };
    tokio::time::timeout(HANDSHAKE_DEADLINE, handshake)
        .await
        .unwrap_or_else(|_| Err(StreamError::Tls("timed out".into())))
}

/// Terminates the client's TLS on `io` with the route's TLS config, then
/// connects an upstream of the route and copies plaintext both ways until
/// both sides finish. The upstream is connected only once the handshake is
/// complete: a client that sends a ClientHello and stalls (or fails the
/// handshake) costs the upstream nothing. A route that cannot serve
/// answers 503 (every upstream down) or 502 (every connect failed).
pub async fn terminate<IO>(
    io: IO,
    header: &StreamHeader,
    route: &Route,
    node: &Node,
    stalls: &Arc<StallBudget>,
    alt_svc: Option<u16>,
) -> Result<(), StreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Abort,
{
    let tls = accept(io, route.tls.clone(), &node.shared.challenges).await?;
    serve_terminated(tls, header, route, node, stalls, alt_svc).await
}

/// The part of [`terminate`] after the handshake (the direct listener
/// shares it).
pub async fn serve_terminated<IO>(
    tls: tokio_rustls::server::TlsStream<IO>,
    header: &StreamHeader,
    route: &Route,
    node: &Node,
    stalls: &Arc<StallBudget>,
    alt_svc: Option<u16>,
) -> Result<(), StreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Abort,
{
    match route.connect(header).await {
        Connect::Ok(upstream) => {
            pump(tls, upstream, node, &header.sni, stalls, alt_svc).await;
            Ok(())
        }
        Connect::Refused(refusal, why) => {
            answer_over_tls(tls, refusal).await;
            Err(StreamError::Refused(refusal.status().0, why))
        }
    }
}
