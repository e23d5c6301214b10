//! One data stream = one client connection: read the header, check the name
//! is this node's, then terminate TLS and, once the handshake is complete,
//! forward plaintext to the upstream (or forward the raw TLS in passthrough
//! mode).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use edge_net::stall::{is_shed, StallBudget, StallGuard};
use edge_proto::tunnel::{codes, StreamHeader, MAX_STREAM_HEADER};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::Mode;
use crate::Node;

/// Deadline for the header and for the client's TLS handshake.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for connecting to the upstream.
const UPSTREAM_CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// Backstop for idle passthrough streams; the server's own idle timeout
/// (`limits.idle_timeout_secs`) normally ends them first.
const PASSTHROUGH_IDLE: Duration = Duration::from_secs(3600);
/// Copy buffer per direction when terminating TLS.
const COPY_BUF: usize = 64 * 1024;

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
}

/// Serves one data stream to completion. `stalls` is the budget of the
/// stream's QUIC connection: an upstream that stops reading an upload while
/// the tunnel needs the window gets the stream shed.
pub async fn handle(mut send: SendStream, mut recv: RecvStream, node: Arc<Node>, stalls: Arc<StallBudget>) {
    let metrics = &node.shared.metrics;
    metrics.total_streams.fetch_add(1, Ordering::Relaxed);
    metrics.open_streams.fetch_add(1, Ordering::Relaxed);
    let result = match prepare(&mut recv, &node).await {
        Err((code, e)) => {
            let _ = send.reset(VarInt::from_u32(code));
            let _ = recv.stop(VarInt::from_u32(code));
            Err(e)
        }
        // Passthrough, and plain HTTP from the server's :80: bytes as they
        // are, so the upstream is connected at once.
        Ok(header) if header.plain || node.shared.config.mode == Mode::Passthrough => {
            match connect_upstream(&node.shared.config.upstream, &header, node.shared.config.proxy_protocol).await {
                Err(e) => {
                    let _ = send.reset(VarInt::from_u32(codes::STREAM_UPSTREAM_FAILED));
                    let _ = recv.stop(VarInt::from_u32(codes::STREAM_UPSTREAM_FAILED));
                    Err(e)
                }
                Ok(upstream) => {
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
            }
        }
        Ok(header) => terminate(tokio::io::join(recv, send), &header, &node, &stalls).await,
    };
    metrics.open_streams.fetch_sub(1, Ordering::Relaxed);
    if let Err(e) = result {
        metrics.stream_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %e, "stream failed");
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
/// upstream count against `stalls`.
pub async fn pump<IO>(
    mut tls: tokio_rustls::server::TlsStream<IO>,
    upstream: TcpStream,
    node: &Node,
    sni: &str,
    stalls: &Arc<StallBudget>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Abort,
{
    let mut upstream = StallGuard::new(upstream, stalls.clone());
    let copied = tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut upstream, COPY_BUF, COPY_BUF).await;
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
            edge_net::splice::reset_tcp(upstream.get_ref());
            if is_shed(&e) {
                node.shared.metrics.streams_shed.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(sni, error = %e, "stream aborted");
        }
    }
}

/// Terminates the client's TLS on `io` with the node certificate, then
/// connects the upstream and copies plaintext both ways until both sides
/// finish. The upstream is connected only once the handshake is complete:
/// a client that sends a ClientHello and stalls (or fails the handshake)
/// costs the upstream nothing.
pub async fn terminate<IO>(
    io: IO,
    header: &StreamHeader,
    node: &Node,
    stalls: &Arc<StallBudget>,
) -> Result<(), StreamError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Abort,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(node.tls.clone());
    let accept = acceptor.accept(io).into_fallible();
    let tls = match tokio::time::timeout(HANDSHAKE_DEADLINE, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, io))) => {
            io.abort(codes::STREAM_TLS_FAILED);
            return Err(StreamError::Tls(e.to_string()));
        }
        Err(_) => return Err(StreamError::Tls("timed out".into())),
    };
    let config = &node.shared.config;
    let upstream = match connect_upstream(&config.upstream, header, config.proxy_protocol).await {
        Ok(upstream) => upstream,
        Err(e) => {
            let (io, _) = tls.into_inner();
            io.abort(codes::STREAM_UPSTREAM_FAILED);
            return Err(e);
        }
    };
    pump(tls, upstream, node, &header.sni, stalls).await;
    Ok(())
}
