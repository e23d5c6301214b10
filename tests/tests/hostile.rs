//! Hostile input on every listener: the server neither panics nor leaks, and
//! keeps serving honest clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use edge_proto::join::JoinTicket;
use edge_tests::clients::{self, Closed};
use edge_tests::{fd_count, metric, upstreams, wait_for, Agent, Server, ZONE};
use rand::{Rng, RngCore};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

fn quic_client(ticket: &JoinTicket, alpn: &[u8]) -> (quinn::Endpoint, quinn::ClientConfig) {
    let verifier = edge_net::pinned::PinnedVerifier::new(ticket.fingerprint.unwrap());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Sends raw bytes to the API over TLS (server pinned) and returns the reply.
async fn api_raw(ticket: &JoinTicket, addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::AsyncReadExt;
    let verifier = edge_net::pinned::PinnedVerifier::new(ticket.fingerprint.unwrap());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("edge-server").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_everywhere_then_business_as_usual() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "[limits]\nclient_hello_timeout_ms = 1000").unwrap();
    let join = server.add_node("target").unwrap();
    let ticket = JoinTicket::parse(&join).unwrap();
    let upstream = upstreams::http("still here").await;
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();
    let pid = server.proc.child.id();
    let fds_before = fd_count(pid);
    let mut rng = rand::rng();

    // 1. TLS listener: random bytes, TLS-looking headers with random bodies,
    //    an oversized hello, and a hello trickled one byte at a time.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let len = rng.random_range(1..6000);
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        if i % 3 == 0 {
            bytes[0] = 0x16;
            if len > 2 {
                bytes[1] = 3;
                bytes[2] = 1;
            }
        }
        let addr = server.addrs.tls;
        tasks.spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let _ = tcp.write_all(&bytes).await;
            let (_, how) = clients::read_until_closed(&mut tcp, Duration::from_secs(5)).await;
            assert_ne!(how, Closed::StillOpen, "garbage connection {i} left open");
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let mut big = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x50, 0x00];
    big.resize(17_000, 0xab);
    let mut tcp = TcpStream::connect(server.addrs.tls).await.unwrap();
    let _ = tcp.write_all(&big).await;
    let (reply, how) = clients::read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert_ne!(how, Closed::StillOpen);
    assert!(reply.is_empty() || reply[0] == 0x15, "only an alert comes back");

    let hello = clients::client_hello(&format!("slow.target.{ZONE}"));
    let mut slow = TcpStream::connect(server.addrs.tls).await.unwrap();
    slow.set_nodelay(true).unwrap();
    for b in &hello[..hello.len().min(150)] {
        slow.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    slow.write_all(&hello[150.min(hello.len())..]).await.unwrap();
    let (reply, _) = clients::read_until_closed(&mut slow, Duration::from_secs(3)).await;
    assert_eq!(reply.first(), Some(&0x16), "a trickled hello is still routed and answered by the agent");

    // 2. QUIC port: random datagrams.
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..3000 {
        let mut d = vec![0u8; rng.random_range(1..1500)];
        rng.fill_bytes(&mut d);
        if rng.random_bool(0.3) {
            d[0] |= 0xc0; // looks like a long-header packet
        }
        let _ = udp.send_to(&d, server.addrs.quic).await;
    }

    // 3. QUIC with the wrong ALPN is refused in the handshake.
    let (endpoint, config) = quic_client(&ticket, b"h3");
    let refused = endpoint.connect_with(config, server.addrs.quic, "edge-server").unwrap().await;
    assert!(refused.is_err(), "wrong ALPN must not connect");

    // 4. Right ALPN, hostile control stream: an absurd frame length.
    let (endpoint, config) = quic_client(&ticket, edge_proto::tunnel::ALPN);
    let conn = endpoint.connect_with(config.clone(), server.addrs.quic, "edge-server").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0xff, 0xff, 0xff, 0xff, b'{']).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("server closes it");
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == 0x12));
    //    Valid framing, wrong first message.
    let conn = endpoint.connect_with(config.clone(), server.addrs.quic, "edge-server").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let msg = br#"{"type":"heartbeat","seq":1,"open_streams":0}"#;
    send.write_all(&(msg.len() as u32).to_be_bytes()).await.unwrap();
    send.write_all(msg).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("server closes it");
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == 0x12));
    //    Silent after the handshake: closed at the hello deadline (10 s).
    let silent = endpoint.connect_with(config, server.addrs.quic, "edge-server").unwrap().await.unwrap();

    // 5. API: garbage TLS, bad JSON, huge body, no token.
    for _ in 0..50 {
        let mut junk = vec![0u8; rng.random_range(1..3000)];
        rng.fill_bytes(&mut junk);
        let mut tcp = TcpStream::connect(server.addrs.api).await.unwrap();
        let _ = tcp.write_all(&junk).await;
        let (_, how) = clients::read_until_closed(&mut tcp, Duration::from_secs(12)).await;
        assert_ne!(how, Closed::StillOpen);
    }
    let url = format!("https://{}/api/signal/heartbeat", server.addrs.api);
    let auth = format!("Authorization: Bearer {}", ticket.token);
    let post = |body: String, with_auth: bool| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            // No 100-continue dance: send the body at once, as an attacker would.
            "-H",
            "Expect:",
        ]);
        if with_auth {
            cmd.args(["-H", &auth]);
        }
        let out = cmd
            .args(["--data-binary", "@-", &url])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = out;
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
        drop(child.stdin.take());
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    assert_eq!(post("{}".into(), false), "401");
    assert_eq!(post("{not json".into(), true), "400");
    // A body over the limit is refused from its announced length, before it is read.
    let big = api_raw(&ticket, server.addrs.api, &format!(
        "POST /api/signal/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{{",
        ticket.token
    ))
    .await;
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    assert_eq!(post(r#"{"status":"ready","version":"0.1.0","counters":{"open_streams":1}}"#.into(), true), "200");

    // The silent QUIC client has been cut by now or soon.
    tokio::time::timeout(Duration::from_secs(15), silent.closed()).await.expect("silent agent connection closed");

    // Honest traffic still flows; nothing leaked; no panic anywhere.
    let config = clients::client_config(&agent.local_ca("target")).unwrap();
    let (status, body) = clients::https_get(server.addrs.tls, &format!("target.{ZONE}"), config, "/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "still here"));
    wait_for("server fds back to baseline", Duration::from_secs(15), || {
        (fd_count(pid) <= fds_before + 3).then_some(())
    })
    .unwrap_or_else(|_| panic!("server fds {fds_before} -> {}", fd_count(pid)));
    drop(slow);
    wait_for("no client connection left open", Duration::from_secs(10), || {
        (metric(&server.metrics().ok()?, "edge_connections_open")? == 0.0).then_some(())
    })
    .unwrap();
    let m = server.metrics().unwrap();
    assert!(metric(&m, "edge_sni_rejections_total{reason=\"not_tls\"}").unwrap() > 0.0);
    assert!(!server.proc.log_text().contains("panicked"));
    assert!(!agent.proc.log_text().contains("panicked"));
}
