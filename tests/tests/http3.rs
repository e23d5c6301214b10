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
    // for an Initial (MTU discovery starts at 1200); those cross on
    // streams, and the client would retry anyway.
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
async fn datagrams_too_large_for_the_tunnels_frames_cross_on_streams() {
    // At 1200-byte tunnel datagrams a DATAGRAM frame holds about 1,150
    // bytes: no client Initial (1,200 at least) and few of the agent's
    // packets fit. They cross on tunnel streams instead, both ways.
    let dir = tempfile::tempdir().unwrap();
    let tunnel = "[tunnel]\nmax_udp_payload = 1200\n";
    let server = Server::start(&dir.path().join("server"), tunnel).unwrap();
    let udp = server.addrs.quic_clients.unwrap();
    let join = server.add_node("n1").unwrap();
    let extra = format!("{HTTP3_ON}{tunnel}");
    let upstream = upstreams::http("carried on streams").await;
    let agent = Agent::spawn_with_config(&dir.path().join("n1"), &join, upstream, &extra).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let config = client_config(&agent.local_ca("n1")).unwrap();
    let client = tokio::time::timeout(Duration::from_secs(10), H3Client::connect(udp, &host("n1"), config))
        .await
        .expect("the handshake completes at once")
        .unwrap();
    for i in 0..3 {
        let (status, body) = client.get(&host("n1"), &format!("/{i}")).await.unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"carried on streams"[..]));
    }
    client.close().await;
    let m = server.metrics().unwrap();
    let to_node = metric(&m, "edge_quic_client_streamed_total{direction=\"to_node\"}").unwrap();
    let to_client = metric(&m, "edge_quic_client_streamed_total{direction=\"to_client\"}").unwrap();
    assert!(to_node >= 2.0 && to_client >= 2.0, "streamed to the node {to_node}, to clients {to_client}\n{m}");
    let refused = metric(&m, "edge_quic_client_dropped_total{reason=\"tunnel_refused\"}").unwrap();
    assert_eq!(refused, 0.0, "nothing dropped for its size\n{m}");
    let a = agent.metrics().unwrap();
    assert!(metric(&a, "edge_agent_quic_client_datagrams_streamed_in_total").unwrap() >= to_node.min(2.0), "{a}");
    assert!(metric(&a, "edge_agent_quic_client_datagrams_streamed_out_total").unwrap() >= 2.0, "{a}");
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

/// `curl` over TCP through the server; `-D -` puts each response's head
/// before its body on stdout.
fn curl_heads(server: &Server, ca: &std::path::Path, paths: &[&str]) -> String {
    let port = server.addrs.tls.port();
    let resolve = format!("{}:{port}:127.0.0.1", host("n1"));
    let urls: Vec<String> = paths.iter().map(|p| format!("https://{}:{port}{p}", host("n1"))).collect();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "10", "-D", "-", "--resolve", &resolve, "--cacert"])
        .arg(ca)
        .args(&urls)
        .output()
        .expect("curl is installed");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_learn_of_http3_from_alt_svc_and_the_https_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), "[dns]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let (udp, dns) = (server.addrs.quic_clients.unwrap(), server.addrs.dns.unwrap());
    let https_record = || edge_tests::dns::dig(dns, &host("n1"), "HTTPS", false).unwrap();

    let join = server.add_node("n1").unwrap();
    assert!(https_record().answers.is_empty(), "no agent serves HTTP/3 yet");
    let upstream = upstreams::http("over tcp, then over h3").await;
    let agent = Agent::spawn_with_config(&dir.path().join("n1"), &join, upstream, HTTP3_ON).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();

    // The HTTPS record names HTTP/3 on the QUIC listener's port (not the
    // TLS port here, so it also says that port takes no TCP).
    let record =
        wait_for("the HTTPS record", Duration::from_secs(10), || https_record().data("HTTPS").into_iter().next())
            .unwrap();
    assert_eq!(record, format!("1 . alpn=\"h3\" no-default-alpn port={}", udp.port()));
    assert_eq!(https_record().data("HTTPS"), vec![record.clone()], "on app.n1 too");
    let wildcard = edge_tests::dns::dig(dns, &format!("app.{}", host("n1")), "HTTPS", true).unwrap();
    assert_eq!(wildcard.data("HTTPS"), vec![record], "over TCP, at a name under the node");

    // Over TCP the first response of a connection says Alt-Svc; the second
    // on the same connection is untouched (clients cache it per origin).
    let heads = curl_heads(&server, &agent.local_ca("n1"), &["/first", "/second"]);
    let advert = format!("Alt-Svc: h3=\":{}\"; ma=3600", udp.port());
    assert_eq!(heads.matches("HTTP/1.1 200 OK").count(), 2, "{heads}");
    assert_eq!(heads.matches(&advert).count(), 1, "{heads}");
    let first_head = heads.split("\r\n\r\n").next().unwrap();
    assert!(first_head.contains(&advert), "the first response carries it: {heads}");
    assert_eq!(heads.matches("over tcp, then over h3").count(), 2, "bodies intact: {heads}");
    let m = agent.metrics().unwrap();
    assert_eq!(metric(&m, "edge_agent_alt_svc_advertised_total"), Some(1.0), "{m}");

    // Following the advert works.
    let config = client_config(&agent.local_ca("n1")).unwrap();
    let client = H3Client::connect(udp, &host("n1"), config).await.unwrap();
    let (status, body) = client.get(&host("n1"), "/via-alt-svc").await.unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"over tcp, then over h3"[..]));
    client.close().await;

    // The node's last tunnel gone (the agent stopped), the record goes
    // with it.
    let mut agent = agent;
    agent.proc.signal("TERM");
    assert!(agent.proc.wait_exit(Duration::from_secs(15)).is_some(), "the agent exits on SIGTERM");
    wait_for("the HTTPS record to go", Duration::from_secs(15), || https_record().answers.is_empty().then_some(()))
        .unwrap();
    assert_eq!(https_record().status, "NOERROR", "the name stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_switches_to_http3_after_an_alt_svc_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), "").unwrap();
    let (upstream, seen) = upstreams::http_recording("discovered").await;
    let agent = start_node(&server, dir.path(), "n1", upstream);
    let spki = spki_hash(&agent.data_dir.join("certs/n1.crt"));
    // The TCP origin; HTTP/3 is found only through its Alt-Svc.
    let origin = format!("{}:{}", host("n1"), server.addrs.tls.port());

    let (_driver, port) = chromium::start_driver(&dir.path().join("chromedriver.log"));
    let flags = [
        "--enable-quic".to_string(),
        // Chromium takes QUIC only to public roots (ERR_QUIC_CERT_ROOT_NOT_KNOWN)
        // except for hosts named in this flag; the origin named is one
        // never visited (port 9), so the page's own origin is not forced.
        format!("--origin-to-force-quic-on={}:9", host("n1")),
        format!("--host-resolver-rules=MAP {} 127.0.0.1", host("n1")),
        format!("--ignore-certificate-errors-spki-list={spki}"),
    ];
    let browser = chromium::browser(port, &dir.path().join("profile"), &flags).await;
    let protocol = || async {
        let p = browser.execute("return performance.getEntriesByType('navigation')[0].nextHopProtocol", vec![]);
        p.await.unwrap().as_str().unwrap_or("").to_string()
    };
    browser.goto(&format!("https://{origin}/over-tcp")).await.unwrap();
    assert_eq!(protocol().await, "http/1.1", "the first load knows nothing of HTTP/3");
    // Later loads race QUIC against the kept TCP connection; on loopback
    // QUIC wins within a few.
    let mut protocols = Vec::new();
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        browser.goto(&format!("https://{origin}/again-{i}")).await.unwrap();
        protocols.push(protocol().await);
        if protocols.last().is_some_and(|p| p == "h3") {
            break;
        }
    }
    browser.close().await.unwrap();
    assert_eq!(protocols.last().map(String::as_str), Some("h3"), "protocols of the later loads: {protocols:?}");
    let requests = seen.lock().unwrap().clone();
    assert!(requests.iter().any(|r| r.starts_with("GET /over-tcp ")), "upstream saw: {requests:?}");
    let m = agent.metrics().unwrap();
    assert!(metric(&m, "edge_agent_alt_svc_advertised_total").unwrap() >= 1.0, "{m}");
    assert!(metric(&m, "edge_agent_http3_requests_total").unwrap() >= 1.0, "{m}");
}
