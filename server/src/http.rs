//! Plain HTTP (:80): redirects to HTTPS, or Host-routed proxying through
//! the tunnel, per node.
//!
//! - unknown Host: 404; malformed request: 400;
//! - direct-mode node: 307 to the same URL over https;
//! - node with no tunnel here or on a live peer (and not direct): 503; a
//!   node whose only tunnels are on a peer is proxied through that peer;
//! - proxy-mode node, `http_mode = redirect` (default): 307 to https;
//! - proxy-mode node, `http_mode = proxy`: the request and everything after
//!   it go to the agent, which hands the bytes to its upstream unchanged;
//!   if the upstream cannot be reached, the client gets 502.
//!
//! Every answer of our own closes the connection. The request head is read
//! under the ClientHello deadline and size cap.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::tunnel::{codes, StreamHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::modes::Mode;
use crate::Shared;

/// How long the agent may take to send the first byte of a response.
const FIRST_BYTE_DEADLINE: Duration = Duration::from_secs(30);

/// Accepts plain HTTP connections until `shutdown`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken, tracker: TaskTracker) {
    let admitted = shared.clone();
    crate::ingress::accept_loop(
        listener,
        &admitted,
        |s| &s.admission.http,
        shutdown,
        tracker,
        move |tcp, peer| handle(tcp, peer, shared.clone()),
    )
    .await;
}

/// The parts of a request head we route on.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// Request target (`/path?query`).
    pub target: String,
    /// Host without port, lowercase.
    pub host: String,
}

/// Parses a request head (up to and excluding the blank line). `None` if
/// it is not HTTP/1.x with one usable Host header.
pub fn parse_head(head: &[u8]) -> Option<RequestHead> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (_method, target, version) = (first.next()?, first.next()?, first.next()?);
    // Visible ASCII only: the target is echoed in Location, where a CR or
    // LF would split the response.
    let printable = |s: &str| s.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if first.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') || !printable(target) {
        return None;
    }
    let mut host = None;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return None;
            }
            host = Some(value.trim());
        }
    }
    let host = host?;
    let name = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    };
    let name = edge_proto::names::normalize_hostname(name.trim_end_matches('.'))?;
    Some(RequestHead { target: target.to_string(), host: name })
}

async fn respond(tcp: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await;
}

async fn handle(mut tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let limits = shared.limits();
    let local = tcp.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut buf = Vec::with_capacity(2048);
    let read = tokio::time::timeout(Duration::from_millis(limits.client_hello_timeout_ms), async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(end);
            }
            if buf.len() >= limits.client_hello_max_bytes {
                return None;
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let Ok(Some(end)) = read else {
        shared.metrics.http_answer("bad_request");
        return respond(&mut tcp, "400 Bad Request", "", "incomplete or oversized request head\n").await;
    };
    let Some(head) = parse_head(&buf[..end]) else {
        shared.metrics.http_answer("bad_request");
        return respond(&mut tcp, "400 Bad Request", "", "malformed request or missing Host\n").await;
    };
    let Some(node) = shared.registry.route(&head.host) else {
        shared.metrics.http_answer("not_found");
        return respond(&mut tcp, "404 Not Found", "", &format!("no node serves {}\n", head.host)).await;
    };
    if !shared.access.allows(&node.name, &edge_proto::access::Scope::Host(head.host.clone()), peer.ip()) {
        shared.metrics.http_answer("forbidden");
        return respond(&mut tcp, "403 Forbidden", "", "access denied\n").await;
    }
    let location = format!("Location: https://{}{}\r\n", head.host, head.target);
    if node.current_mode() == Mode::Direct {
        shared.metrics.http_answer("redirect");
        return respond(&mut tcp, "307 Temporary Redirect", &location, "served over https\n").await;
    }
    let tunnel = node.pick_tunnel(&[]);
    // No tunnel here, but a peer server has one: the request goes through it.
    let via_peer = tunnel.is_none() && shared.peers.peer_has_tunnel(&shared, &node.name).await;
    if tunnel.is_none() && !via_peer {
        shared.metrics.http_answer("offline");
        return respond(&mut tcp, "503 Service Unavailable", "", &format!("{} is offline\n", head.host)).await;
    }
    if *node.http_mode.lock().unwrap_or_else(|p| p.into_inner()) != crate::store::HttpMode::Proxy {
        shared.metrics.http_answer("redirect");
        return respond(&mut tcp, "307 Temporary Redirect", &location, "served over https\n").await;
    }
    let per_tunnel = u64::from(shared.config.tunnel.max_streams) * node.tunnel_count().max(1) as u64;
    let cap = per_tunnel.min(limits.max_connections_per_node);
    if node.metrics.active.load(Ordering::Relaxed) >= cap {
        shared.refusals.refuse(crate::limits::Listener::Http, crate::limits::Refusal::NodeBusy, peer.ip());
        shared.metrics.http_answer("offline");
        return respond(&mut tcp, "503 Service Unavailable", "", "the node is at its connection limit\n").await;
    }
    let _active = crate::ingress::GaugeGuard::new(&node.metrics.active);
    let mut first = StreamHeader { client: peer, local, sni: head.host.clone(), plain: true, service: None }.encode();
    // One request per connection: the head goes out with `Connection: close`,
    // so a later request for another host on the same connection can never
    // reach this node (the upstream stops reading after this one).
    first.extend_from_slice(&close_after(&buf[..end]));
    first.extend_from_slice(&buf[end + 4..]);
    let (mut send, recv, answer, stalls) = match tunnel {
        Some(tunnel) => {
            let open =
                tokio::time::timeout(Duration::from_millis(limits.open_stream_timeout_ms), tunnel.conn.open_bi()).await;
            let Ok(Ok((mut send, mut recv))) = open else {
                shared.metrics.http_answer("bad_gateway");
                return respond(&mut tcp, "502 Bad Gateway", "", "could not reach the node\n").await;
            };
            if send.write_all(&first).await.is_err() {
                shared.metrics.http_answer("bad_gateway");
                return respond(&mut tcp, "502 Bad Gateway", "", "could not reach the node\n").await;
            }
            // The first bytes decide between a proxied answer and our 502: an
            // agent that cannot reach its upstream resets the stream before
            // sending any.
            let mut chunk = vec![0u8; 16 * 1024];
            let n = match tokio::time::timeout(FIRST_BYTE_DEADLINE, recv.read(&mut chunk)).await {
                Ok(Ok(Some(n))) if n > 0 => n,
                _ => {
                    let _ = send.reset(quinn::VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
                    shared.metrics.http_answer("bad_gateway");
                    return respond(&mut tcp, "502 Bad Gateway", "", "the node's upstream did not answer\n").await;
                }
            };
            chunk.truncate(n);
            (send, recv, bytes::Bytes::from(chunk), tunnel.stalls.clone())
        }
        None => match shared.peers.place(&shared, &node, &first, FIRST_BYTE_DEADLINE).await {
            Ok(answered) if !answered.first_bytes.is_empty() => {
                shared.metrics.peer_forwarded.fetch_add(1, Ordering::Relaxed);
                (answered.send, answered.recv, answered.first_bytes, shared.peers.stalls())
            }
            answered => {
                if let Ok(mut answered) = answered {
                    let _ = answered.send.reset(quinn::VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
                    let _ = answered.recv.stop(quinn::VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
                }
                shared.metrics.http_answer("bad_gateway");
                return respond(&mut tcp, "502 Bad Gateway", "", "the node's upstream did not answer\n").await;
            }
        },
    };
    if tcp.write_all(&answer).await.is_err() {
        let _ = send.reset(quinn::VarInt::from_u32(codes::STREAM_CLIENT_ABORTED));
        return;
    }
    shared.metrics.http_answer("proxied");
    node.metrics.total.fetch_add(1, Ordering::Relaxed);
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let bytes = &node.metrics.bytes;
    let end = edge_net::splice::splice(tcp, send, recv, codes::STREAM_CLIENT_ABORTED, bytes, idle, &stalls).await;
    if end == edge_net::splice::SpliceEnd::Shed {
        node.metrics.shed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The request head with its connection headers replaced by
/// `Connection: close`, plus the blank line.
pub fn close_after(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(head.len() + 24);
    for (i, line) in text.split("\r\n").enumerate() {
        let name = line.split(':').next().unwrap_or("").trim();
        if i > 0 && ["connection", "keep-alive", "proxy-connection"].iter().any(|h| name.eq_ignore_ascii_case(h)) {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_host_and_target() {
        let h = parse_head(b"GET /a?b=1 HTTP/1.1\r\nHost: App.N1.Edge.Test:8080\r\nAccept: */*").unwrap();
        assert_eq!(h, RequestHead { target: "/a?b=1".into(), host: "app.n1.edge.test".into() });
        assert_eq!(parse_head(b"GET / HTTP/1.0\r\nhost: n1.edge.test.").unwrap().host, "n1.edge.test");
    }

    #[test]
    fn forwarded_heads_close_after_one_request() {
        let head = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX: y";
        let out = String::from_utf8(close_after(head)).unwrap();
        assert_eq!(out, "GET / HTTP/1.1\r\nHost: a.test\r\nX: y\r\nConnection: close\r\n\r\n");
    }

    #[test]
    fn bad_heads_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1"[..],
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test",
            b"GET http://x/ HTTP/1.1\r\nHost: a.test",
            b"GET / SPDY/3\r\nHost: a.test",
            b"GET / HTTP/1.1\r\nHost: bad host",
            b"GET / HTTP/1.1\r\nnot a header",
            b"GET /a\nSet-Cookie:x HTTP/1.1\r\nHost: a.test",
            b"GET /a\rb HTTP/1.1\r\nHost: a.test",
            b"\xff\xfe",
            b"",
        ] {
            assert!(parse_head(bad).is_none(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
