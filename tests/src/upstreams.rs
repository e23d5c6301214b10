//! Small in-process upstream services standing in for a node's local app.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn listen() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind upstream")
}

fn serve<F, Fut>(listener: TcpListener, handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(handler(tcp));
        }
    });
    addr
}

/// Echoes every byte back; closes its write side after the client's FIN.
pub async fn echo() -> SocketAddr {
    serve(listen().await, |mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
}

/// HTTP/1.1 with keep-alive: answers every GET with 200 and `body`.
pub async fn http(body: &'static str) -> SocketAddr {
    serve(listen().await, move |tcp| http_conn(tcp, body, None))
}

/// Request lines an upstream has seen, in order.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`http`] that also records each request line (`GET /path HTTP/1.1`).
pub async fn http_recording(body: &'static str) -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let record = seen.clone();
    (serve(listen().await, move |tcp| http_conn(tcp, body, Some(record.clone()))), seen)
}

/// [`http`] on `bind` (e.g. `[::1]:0`).
pub async fn http_at(bind: SocketAddr, body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.expect("bind upstream");
    serve(listener, move |tcp| http_conn(tcp, body, None))
}

async fn http_conn(mut tcp: TcpStream, body: &'static str, seen: Option<Seen>) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            if let Some(seen) = &seen {
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(head.lines().next().unwrap_or("").to_string());
            }
            let request = head.to_ascii_lowercase();
            buf.drain(..end + 4);
            let close = request.contains("connection: close") || request.contains("http/1.0");
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
                body.len(),
                if close { "Connection: close\r\n" } else { "" }
            );
            if tcp.write_all(response.as_bytes()).await.is_err() || close {
                let _ = tcp.shutdown().await;
                return;
            }
        }
        if buf.len() > 64 * 1024 {
            return;
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads a PROXY v2 header, then answers one HTTP request with the client
/// address the header carried (or `none`).
pub async fn proxy_v2_reporter() -> SocketAddr {
    serve(listen().await, |mut tcp| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let client = loop {
            match edge_proto::proxy_v2::parse(&buf) {
                edge_proto::proxy_v2::Parsed::Header { client, len, .. } => {
                    buf.drain(..len);
                    break client.map_or("none".to_string(), |c| c.to_string());
                }
                edge_proto::proxy_v2::Parsed::Invalid => break "invalid".to_string(),
                edge_proto::proxy_v2::Parsed::Incomplete => {}
            }
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while find(&buf, b"\r\n\r\n").is_none() {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let response =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{client}", client.len());
        let _ = tcp.write_all(response.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
}

/// The benchmark upstream. A connection starting with `BLAST <n>\n` gets
/// `n` bytes and a close; one starting with `STALL\n` is held open for a
/// minute without another byte read (an application that stopped reading);
/// anything else is served as HTTP/1.1 keep-alive with a 2-byte body.
pub async fn bench() -> SocketAddr {
    serve(listen().await, bench_protocol)
}

/// The bench upstream's protocol on any byte stream (the TLS upstream of
/// `edge-bench-upstream` runs it behind rustls): `BLAST n\n` sends `n`
/// bytes and closes, `STALL\n` holds the connection for a minute, anything
/// else is keep-alive HTTP/1.1 answered `ok`.
pub async fn bench_protocol<S>(mut stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut first = [0u8; 6];
    if stream.read_exact(&mut first).await.is_err() {
        return;
    }
    if &first == b"STALL\n" {
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        return;
    }
    if &first == b"BLAST " {
        let mut digits = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' && digits.len() < 20 {
            digits.push(byte[0]);
        }
        let n: usize = String::from_utf8_lossy(&digits).parse().unwrap_or(0);
        let chunk = vec![0x5au8; 256 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            if stream.write_all(&chunk[..k]).await.is_err() {
                return;
            }
            left -= k;
        }
        let _ = stream.shutdown().await;
        return;
    }
    // Not a blast: hand the bytes read so far to the HTTP loop.
    let (mut r, w) = tokio::io::split(stream);
    let prefix = first.to_vec();
    let mut joined = tokio::io::join(std::io::Cursor::new(prefix).chain(&mut r), w);
    http_loop(&mut joined, "ok").await;
}

async fn http_loop<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(tcp: &mut S, body: &str) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            buf.drain(..end + 4);
            let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            if tcp.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
        if buf.len() > 64 * 1024 {
            return;
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                let _ = tcp.shutdown().await;
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A TCP forwarder that can be closed and opened like a firewall: while
/// closed, connections are accepted and dropped at once.
#[derive(Debug, Clone)]
pub struct Gate {
    /// Where clients connect.
    pub addr: SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    /// Forwards `bind` (port 0 picks one) to `target`, open.
    pub async fn start(bind: SocketAddr, target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(bind).await.expect("bind gate");
        let addr = listener.local_addr().expect("gate address");
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = open.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { addr, open }
    }

    /// Opens or closes the gate for new connections.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An HTTP upstream ([`http`]) that can be stopped (its port then refuses
/// connections) and started again on the same port.
#[derive(Debug)]
pub struct Switchable {
    /// Where it listens.
    pub addr: SocketAddr,
    body: &'static str,
    stop: std::sync::Mutex<Option<tokio_util::sync::CancellationToken>>,
}

impl Switchable {
    /// Starts on a free loopback port.
    pub async fn start(body: &'static str) -> Self {
        let listener = listen().await;
        let addr = listener.local_addr().expect("addr");
        let s = Self { addr, body, stop: std::sync::Mutex::new(None) };
        s.serve(listener);
        s
    }

    fn serve(&self, listener: TcpListener) {
        let stop = tokio_util::sync::CancellationToken::new();
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop.clone());
        let body = self.body;
        tokio::spawn(async move {
            let conns = tokio_util::task::TaskTracker::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => {
                            let stop = stop.clone();
                            conns.spawn(async move {
                                tokio::select! { _ = stop.cancelled() => {}, _ = http_conn(tcp, body, None) => {} }
                            });
                        }
                        Err(_) => break,
                    },
                }
            }
        });
    }

    /// Stops listening and closes open connections.
    pub async fn stop(&self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            stop.cancel();
        }
        // Until the listener is gone, a connect could still succeed.
        for _ in 0..100 {
            if TcpStream::connect(self.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind upstream");
        self.serve(listener);
    }
}

/// A TLS service of its own (a passthrough route's upstream): a
/// self-signed certificate for `name` with common name `cn`, answering
/// every HTTP/1.x request with 200 and `body`. Returns its address.
pub async fn tls_http(name: &str, cn: &str, body: &'static str) -> SocketAddr {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).expect("self-signed");
    let der_key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der_key)
        .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    serve(listen().await, move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while find(&buf, b"\r\n\r\n").is_none() && buf.len() < 64 * 1024 {
                match tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let response =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = tls.write_all(response.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
    })
}

/// HTTP/1.1 with keep-alive: `GET /bytes/N` answers N bytes (at most
/// 1 GiB), anything else 2 bytes. For the HTTP/3 benchmark.
pub async fn http_sized() -> SocketAddr {
    serve(listen().await, |mut tcp| async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut buf = Vec::with_capacity(4096);
        let mut read = [0u8; 4096];
        loop {
            while let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + 4);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let size: usize = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok()).unwrap_or(2);
                let size = size.min(1 << 30);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
                );
                if tcp.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut left = size;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if tcp.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            match tcp.read(&mut read).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&read[..n]),
            }
        }
    })
}
