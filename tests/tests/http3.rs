//! HTTP/3 end to end (issue 17), over real processes: QUIC clients reach
//! the server's UDP listener, are routed by the SNI of their Initial
//! packets (a post-quantum ClientHello spans several), and are served by
//! their node's agent with the node's certificate. The client is quinn +
//! h3 trusting only the node's CA, so a successful handshake proves which
//! agent answered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edge_tests::h3client::{client_config, H3Client};
use edge_tests::{metric, upstreams, wait_for, Agent, Server, ZONE};
use sha2::{Digest, Sha256};

const HTTP3_ON: &str = "[http3]\nenabled = true\n";

fn start_node(server: &Server, dir: &std::path::Path, name: &str, upstream: SocketAddr) -> Agent {
    let join = server.add_node(name).unwrap();
    let agent = Agent::spawn_with_config(&dir.join(name), &join, upstream, HTTP3_ON).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    agent
}

fn host(node: &str) -> String {
    format!("{node}.{ZONE}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_each_serve_only_their_own_http3_clients() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), "").unwrap();
    let udp = server.addrs.quic_clients.expect("the harness binds quic_clients");
    let n1 = start_node(&server, dir.path(), "n1", upstreams::http("hello from n1's upstream").await);
    let n2 = start_node(&server, dir.path(), "n2", upstreams::http("hello from n2's upstream").await);

    for (node, agent, body) in [("n1", &n1, "hello from n1's upstream"), ("n2", &n2, "hello from n2's upstream")] {
        let config = client_config(&agent.local_ca(node)).unwrap();
        let client = H3Client::connect(udp, &host(node), config).await.unwrap();
        let (status, got) = client.get(&host(node), "/").await.unwrap();
        assert_eq!((status, String::from_utf8_lossy(&got).as_ref()), (200, body), "{node} over HTTP/3");
        client.close().await;
    }
    // n2's name reaches n2's agent only: a client trusting n1's CA cannot
    // complete a handshake for it.
    let n1_trust = client_config(&n1.local_ca("n1")).unwrap();
    let crossed = tokio::time::timeout(Duration::from_secs(5), H3Client::connect(udp, &host("n2"), n1_trust)).await;
    assert!(!matches!(crossed, Ok(Ok(_))), "n2's name was answered with a certificate n1's CA signed");
    // A name no node owns is dropped, not answered.
    let config = client_config(&n1.local_ca("n1")).unwrap();
    let unknown =
        tokio::time::timeout(Duration::from_secs(3), H3Client::connect(udp, "nobody.edge.test", config)).await;
    assert!(!matches!(unknown, Ok(Ok(_))), "a name no node owns was answered");

    let server_metrics = server.metrics().unwrap();
    let routed = metric(&server_metrics, "edge_quic_client_connections_total").unwrap_or(0.0);
    assert!(routed >= 3.0, "connections routed by SNI: {routed}\n{server_metrics}");
    // The clients' ClientHellos are post-quantum (X25519MLKEM768): each
    // first flight spans several Initial datagrams, held until whole.
    let held = metric(&server_metrics, "edge_quic_client_first_flight_buffered_total").unwrap_or(0.0);
    assert!(held >= routed, "first-flight datagrams held ({held}) for {routed} connections\n{server_metrics}");
    let unknown_names = metric(&server_metrics, "edge_quic_client_dropped_total{reason=\"unknown_name\"}").unwrap();
    assert!(unknown_names >= 1.0, "{server_metrics}");
    for (node, agent) in [("n1", &n1), ("n2", &n2)] {
        let m = agent.metrics().unwrap();
        let requests = metric(&m, "edge_agent_http3_requests_total").unwrap_or(0.0);
        assert!(requests >= 1.0, "{node} answered HTTP/3 requests: {requests}\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unknown_versions_get_nothing_or_version_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), "").unwrap();
    let udp = server.addrs.quic_clients.unwrap();
    let agent = start_node(&server, dir.path(), "n1", upstreams::http("still serving").await);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Garbage, truncated long headers and a short header for no route.
    let mut junk: Vec<Vec<u8>> = vec![vec![], vec![0xff; 3], vec![0xc0, 0, 0, 0, 1], vec![0x40; 40]];
    junk.extend((0..200u32).map(|i| (0..(i % 1400) as usize).map(|j| (i as usize * 31 + j) as u8).collect()));
    for datagram in &junk {
        let _ = socket.send_to(datagram, udp).await;
    }
    // An unknown version, padded as a client must: Version Negotiation.
    let mut probe = vec![0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 8, 1, 2, 3, 4, 5, 6, 7, 8, 4, 9, 9, 9, 9];
    probe.resize(1200, 0);
    socket.send_to(&probe, udp).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("a Version Negotiation packet within 5 s")
        .unwrap();
    let vn = &buf[..n];
    assert_eq!(&vn[1..5], &[0, 0, 0, 0], "version 0 marks Version Negotiation");
    assert_eq!(&vn[6..10], &[9, 9, 9, 9], "the client's source ID comes back as the destination");
    let versions: Vec<u32> = vn[19..].chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
    assert!(versions.contains(&1), "QUIC v1 is offered: {versions:x?}");
    // Still serving.
    let client = H3Client::connect(udp, &host("n1"), client_config(&agent.local_ca("n1")).unwrap()).await.unwrap();
    assert_eq!(client.get(&host("n1"), "/").await.unwrap().0, 200);
    client.close().await;
    let m = server.metrics().unwrap();
    assert!(metric(&m, "edge_quic_version_negotiation_total").unwrap() >= 1.0, "{m}");
    assert!(metric(&m, "edge_quic_client_dropped_total{reason=\"malformed\"}").unwrap() >= 1.0, "{m}");
}

/// 1 MiB of bytes that are not all alike.
fn payload() -> &'static str {
    let text: String = (0..1024 * 1024).map(|i: usize| (b'a' + ((i * 7 + i / 4096) % 26) as u8) as char).collect();
    Box::leak(text.into_boxed_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_downloads_and_a_client_that_moves() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), "").unwrap();
    let udp = server.addrs.quic_clients.unwrap();
    let body = payload();
    let want: [u8; 32] = Sha256::digest(body.as_bytes()).into();
    let agent = start_node(&server, dir.path(), "n1", upstreams::http(body).await);
    let config = client_config(&agent.local_ca("n1")).unwrap();

    // 20 connections, 10 downloads on each at once.
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(Arc::new(H3Client::connect(udp, &host("n1"), config.clone()).await.unwrap()));
    }
    let mut downloads = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = clients[i % clients.len()].clone();
        downloads.spawn(async move { client.get(&host("n1"), &format!("/file/{i}")).await });
    }
    let mut verified = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(done) = tokio::time::timeout_at(deadline, downloads.join_next()).await.expect("downloads in 120 s") {
        let (status, got) = done.unwrap().unwrap();
        assert_eq!(status, 200);
        let hash: [u8; 32] = Sha256::digest(&got).into();
        assert_eq!((got.len(), hash), (body.len(), want), "a download arrived whole");
        verified += 1;
    }
    assert_eq!(verified, 200);
    for client in clients {
        Arc::try_unwrap(client).unwrap().close().await;
    }

    // A client that rebinds its UDP socket mid-download keeps going: its
    // packets carry the node's connection IDs, which name the route.
    let client = H3Client::connect(udp, &host("n1"), config).await.unwrap();
    let before = client.endpoint.local_addr().unwrap();
    let mut moved = None;
    let (status, got) = client
        .get_with(&host("n1"), "/moving", |received| {
            if moved.is_none() && received >= 64 * 1024 {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                moved = Some(socket.local_addr().unwrap());
                client.endpoint.rebind(socket).unwrap();
            }
        })
        .await
        .unwrap();
    let after = moved.expect("the client moved mid-download");
    assert_ne!(before.port(), after.port());
    assert_eq!(status, 200);
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&got)), want, "the moved client's download is whole");
    // And the connection still works from the new address.
    assert_eq!(client.get(&host("n1"), "/after-move").await.unwrap().0, 200);
    assert_eq!(client.endpoint.local_addr().unwrap(), after);
    client.close().await;

    let m = agent.metrics().unwrap();
    assert!(metric(&m, "edge_agent_http3_requests_total").unwrap() >= 202.0, "{m}");
    wait_for("HTTP/3 connections closed on the agent", Duration::from_secs(40), || {
        let m = agent.metrics().ok()?;
        (metric(&m, "edge_agent_http3_connections")? == 0.0).then_some(())
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internet_sized_tunnel_datagrams_still_carry_http3() {
    // A tunnel bounded to 1452-byte datagrams (an internet path) carries
    // DATAGRAM frames of about 1,400 bytes: the client's 1200-byte
    // Initials and the agent's packets of at most 1350 must fit with the
    // address header.
    let dir = tempfile::tempdir().unwrap();
    let tunnel = "[tunnel]\nmax_udp_payload = 1452\n";
    let server = Server::start(&dir.path().join("server"), tunnel).unwrap();
    let udp = server.addrs.quic_clients.unwrap();
    let body = payload();
    let join = server.add_node("n1").unwrap();
    let extra = format!("{HTTP3_ON}{tunnel}");
    let agent = Agent::spawn_with_config(&dir.path().join("n1"), &join, upstreams::http(body).await, &extra).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let config = client_config(&agent.local_ca("n1")).unwrap();
    // Right after the tunnel connects, its frames may still be too small
    // for an Initial (MTU discovery starts at 1200): the client retries.
    let client = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match H3Client::connect(udp, &host("n1"), config.clone()).await {
                Ok(client) => return client,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("an HTTP/3 connection within 30 s");
    let (status, got) = client.get(&host("n1"), "/big").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&got)), <[u8; 32]>::from(Sha256::digest(body.as_bytes())));
    client.close().await;
    let m = server.metrics().unwrap();
    let carried = metric(&m, "edge_quic_client_datagrams_total{direction=\"to_client\"}").unwrap();
    assert!(carried >= 700.0, "1 MiB in datagrams of at most 1350 bytes: {carried}\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_learns_the_http3_clients_address_by_proxy_v2() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), "").unwrap();
    let udp = server.addrs.quic_clients.unwrap();
    let join = server.add_node("n1").unwrap();
    let extra = format!("proxy_protocol = true\n{HTTP3_ON}");
    let agent =
        Agent::spawn_with_config(&dir.path().join("n1"), &join, upstreams::proxy_v2_reporter().await, &extra).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let client = H3Client::connect(udp, &host("n1"), client_config(&agent.local_ca("n1")).unwrap()).await.unwrap();
    let own = client.endpoint.local_addr().unwrap();
    let (status, body) = client.get(&host("n1"), "/who").await.unwrap();
    // The client's address as the server saw it (IPv4, not mapped).
    assert_eq!((status, String::from_utf8_lossy(&body).into_owned()), (200, own.to_string()));
    client.close().await;
}

#[path = "support/chromium.rs"]
mod chromium;

/// base64 of the SHA-256 of a certificate's public key, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it.
fn spki_hash(cert: &std::path::Path) -> String {
    let script = format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
        cert.display()
    );
    let out = std::process::Command::new("sh").args(["-c", &script]).output().expect("openssl is installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_page_over_http3_through_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start_with_log(&dir.path().join("server"), "", None, Some("info,edge_server::quic_clients=debug"))
            .unwrap();
    let udp = server.addrs.quic_clients.unwrap();
    let (upstream, seen) = upstreams::http_recording("served over h3 by the node").await;
    let agent = start_node(&server, dir.path(), "n1", upstream);
    let spki = spki_hash(&agent.data_dir.join("certs/n1.crt"));
    let origin = format!("{}:{}", host("n1"), udp.port());

    let (_driver, port) = chromium::start_driver(&dir.path().join("chromedriver.log"));
    let flags = [
        "--enable-quic".to_string(),
        format!("--origin-to-force-quic-on={origin}"),
        format!("--host-resolver-rules=MAP {} 127.0.0.1", host("n1")),
        format!("--ignore-certificate-errors-spki-list={spki}"),
    ];
    let browser = chromium::browser(port, &dir.path().join("profile"), &flags).await;
    browser.goto(&format!("https://{origin}/from-chromium")).await.unwrap();
    // The upstream answers text/plain: the page shows the markup as text.
    let page = browser.source().await.unwrap();
    assert!(page.contains("served over h3"), "page: {page}");
    let protocol =
        browser.execute("return performance.getEntriesByType('navigation')[0].nextHopProtocol", vec![]).await.unwrap();
    assert_eq!(protocol.as_str(), Some("h3"), "the page came over HTTP/3");
    browser.close().await.unwrap();

    // The agent served it, the upstream saw it, the server forwarded it.
    let requests = seen.lock().unwrap().clone();
    assert!(requests.iter().any(|r| r.starts_with("GET /from-chromium ")), "upstream saw: {requests:?}");
    let m = agent.metrics().unwrap();
    assert!(metric(&m, "edge_agent_http3_requests_total").unwrap() >= 1.0, "{m}");
    let log = server.proc.log_text();
    assert!(log.contains("QUIC client forwarded") && log.contains("n1.edge.test"), "server log:\n{log}");
}
