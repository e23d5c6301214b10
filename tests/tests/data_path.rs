//! End to end over real processes: client → edge-server → QUIC → edge-agent
//! → upstream, with curl and rustls as clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use edge_tests::clients::{self, Closed};
use edge_tests::{upstreams, Agent, Server, ZONE};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl").args(args).output().expect("curl is installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_through_the_tunnel_and_sees_the_agents_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("web1").unwrap();
    let upstream = upstreams::http("hello from web1\n").await;
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();

    let port = server.addrs.tls.port();
    for host in [format!("web1.{ZONE}"), format!("app.web1.{ZONE}")] {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/");
        let ca = agent.local_ca("web1");
        let (ok, body, err) =
            curl(&["-sS", "--max-time", "10", "--resolve", &resolve, "--cacert", ca.to_str().unwrap(), &url]);
        assert!(ok, "curl failed for {host}: {err}");
        assert_eq!(body, "hello from web1\n");
    }

    // The certificate the client sees is the agent's leaf, byte for byte.
    let config = clients::client_config(&agent.local_ca("web1")).unwrap();
    let tls = clients::connect(server.addrs.tls, &format!("web1.{ZONE}"), config).await.unwrap();
    let seen = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let agent_leaf = edge_certs::pem::load_certs(&agent.data_dir.join("certs/web1.crt")).unwrap()[0].to_vec();
    assert_eq!(seen, agent_leaf);

    // The server holds no key for that name: the agent's key appears nowhere
    // in the server's directory, and every key file there is its own.
    let agent_key = std::fs::read_to_string(agent.data_dir.join("certs/web1.key")).unwrap();
    let key_body: String = agent_key.lines().filter(|l| !l.starts_with("-----")).collect();
    for entry in walk(&server.dir) {
        let bytes = std::fs::read(&entry).unwrap();
        let text = String::from_utf8_lossy(&bytes).replace(['\n', '\r'], "");
        // The PKCS#8 prefix is the same for every P-256 key; the tail is unique.
        assert!(!text.contains(&key_body[key_body.len() - 60..]), "agent key material found in {}", entry.display());
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else if path.is_file() {
            // Regular files only: the control socket cannot be read.
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_each_get_only_their_own_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let mut agents = Vec::new();
    for (name, body) in [("alpha", "i am alpha"), ("beta", "i am beta")] {
        let join = server.add_node(name).unwrap();
        let upstream = upstreams::http(body).await;
        agents.push(Agent::start(&tmp.path().join(name), &join, upstream, &[]).unwrap());
    }
    for (agent, name) in agents.iter().zip(["alpha", "beta"]) {
        let config = clients::client_config(&agent.local_ca(name)).unwrap();
        for host in [format!("{name}.{ZONE}"), format!("x.{name}.{ZONE}"), format!("{}.{ZONE}", name.to_uppercase())] {
            let (status, body) = clients::https_get(server.addrs.tls, &host, config.clone(), "/").await.unwrap();
            assert_eq!((status, body.as_str()), (200, format!("i am {name}").as_str()), "{host}");
        }
    }
    // alpha's CA does not validate beta's name: routing never crossed over.
    let alpha_ca = clients::client_config(&agents[0].local_ca("alpha")).unwrap();
    assert!(clients::https_get(server.addrs.tls, &format!("beta.{ZONE}"), alpha_ca, "/").await.is_err());
    let metrics = server.metrics().unwrap();
    assert!(edge_tests::metric(&metrics, "edge_node_connections_total{node=\"alpha\"}").unwrap() >= 3.0);
    assert!(edge_tests::metric(&metrics, "edge_node_connections_total{node=\"beta\"}").unwrap() >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_gets_unrecognized_name_and_bad_clients_are_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "[limits]\nclient_hello_timeout_ms = 1000").unwrap();
    let addr = server.addrs.tls;

    // Unknown name: a fatal unrecognized_name (112) alert, then close.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&clients::client_hello(&format!("nobody.{ZONE}"))).await.unwrap();
    let (bytes, how) = clients::read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert_eq!(bytes, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112]);
    assert_ne!(how, Closed::StillOpen);

    // curl reports it too.
    let resolve = format!("nobody.{ZONE}:{}:127.0.0.1", addr.port());
    let (ok, _, err) = curl(&[
        "-sS",
        "-k",
        "--max-time",
        "5",
        "--resolve",
        &resolve,
        &format!("https://nobody.{ZONE}:{}/", addr.port()),
    ]);
    assert!(!ok && err.contains("unrecognized name"), "{err}");

    // A client that sends nothing is closed at the 1 s deadline.
    let start = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let (bytes, how) = clients::read_until_closed(&mut silent, Duration::from_secs(5)).await;
    let waited = start.elapsed();
    assert!(bytes.is_empty() && how != Closed::StillOpen);
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "closed after {waited:?}");

    // A client that sends part of a hello and stalls: same deadline.
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(&clients::client_hello("x.example")[..40]).await.unwrap();
    let (_, how) = clients::read_until_closed(&mut partial, Duration::from_secs(5)).await;
    assert_ne!(how, Closed::StillOpen);

    // Non-TLS bytes are closed at once, without an alert.
    let start = Instant::now();
    let mut http = TcpStream::connect(addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (bytes, how) = clients::read_until_closed(&mut http, Duration::from_secs(5)).await;
    assert!(bytes.is_empty() && how != Closed::StillOpen);
    assert!(start.elapsed() < Duration::from_millis(500));

    // TLS without SNI gets an alert.
    let mut no_sni = TcpStream::connect(addr).await.unwrap();
    no_sni.write_all(include_bytes!("../../proto/tests/fixtures/client_hello/no_sni.bin")).await.unwrap();
    let (bytes, _) = clients::read_until_closed(&mut no_sni, Duration::from_secs(5)).await;
    assert_eq!(bytes.first(), Some(&0x15), "an alert record");

    let metrics = server.metrics().unwrap();
    for reason in ["unknown_sni", "timeout", "not_tls", "no_sni"] {
        let v = edge_tests::metric(&metrics, &format!("edge_sni_rejections_total{{reason=\"{reason}\"}}")).unwrap();
        assert!(v >= 1.0, "{reason} not counted");
    }
    assert_eq!(edge_tests::metric(&metrics, "edge_connections_open"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_and_proxy_protocol() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();

    // PROXY v2: the upstream learns the client's real address and port.
    let join = server.add_node("pp").unwrap();
    let reporter = upstreams::proxy_v2_reporter().await;
    let agent = Agent::start(&tmp.path().join("pp"), &join, reporter, &["--proxy-protocol"]).unwrap();
    let config = clients::client_config(&agent.local_ca("pp")).unwrap();
    let tcp = TcpStream::connect(server.addrs.tls).await.unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let name = rustls::pki_types::ServerName::try_from(format!("pp.{ZONE}")).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: pp\r\n\r\n").await.unwrap();
    let mut body = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut body).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(text.ends_with(&client_addr.to_string()), "upstream saw {text:?}, client is {client_addr}");

    // Passthrough: the raw TLS reaches a local TLS service (here another
    // agent-style terminator is not needed: an echo proves bytes are raw).
    let join = server.add_node("raw").unwrap();
    let echo = upstreams::echo().await;
    let _raw = Agent::start(&tmp.path().join("raw"), &join, echo, &["--passthrough"]).unwrap();
    let hello = clients::client_hello(&format!("raw.{ZONE}"));
    let mut tcp = TcpStream::connect(server.addrs.tls).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    tcp.write_all(b"after the hello").await.unwrap();
    tcp.shutdown().await.unwrap();
    let (bytes, how) = clients::read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert_eq!(how, Closed::Eof, "half-close propagated both ways");
    assert_eq!(bytes, [hello.as_slice(), b"after the hello"].concat(), "bytes replayed unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_spliced_connections_are_closed_after_the_idle_timeout() {
    use tokio::io::AsyncReadExt;
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "[limits]\nidle_timeout_secs = 1").unwrap();
    let join = server.add_node("idle").unwrap();
    let echo = upstreams::echo().await;
    let agent = Agent::start(&tmp.path().join("agent"), &join, echo, &[]).unwrap();
    let config = clients::client_config(&agent.local_ca("idle")).unwrap();
    let mut tls = clients::connect(server.addrs.tls, &format!("idle.{ZONE}"), config).await.unwrap();
    // Traffic keeps it open past the timeout...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        tls.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tls.read_exact(&mut back).await.unwrap();
    }
    // ...silence does not.
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await.expect("closed, not hanging");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(start.elapsed() < Duration::from_secs(3), "closed after {:?}", start.elapsed());
    edge_tests::wait_for("agent stream closed", Duration::from_secs(5), || {
        (edge_tests::metric(&agent.metrics().ok()?, "edge_agent_open_streams")? == 0.0).then_some(())
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_is_connected_only_after_the_clients_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("web1").unwrap();
    // An upstream that counts the connections it accepts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
                let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n").await;
            });
        }
    });
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();
    let count = || accepted.load(std::sync::atomic::Ordering::SeqCst);

    // 20 clients send a ClientHello and stall; 10 more send one and then
    // garbage instead of finishing the handshake.
    let hello = clients::client_hello(&format!("web1.{ZONE}"));
    let mut held = Vec::new();
    for i in 0..30 {
        let mut tcp = TcpStream::connect(server.addrs.tls).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        if i >= 20 {
            tcp.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]).await.unwrap();
        }
        held.push(tcp);
    }
    // Every stream has reached the agent (its open-stream gauge says so).
    edge_tests::wait_for("30 streams at the agent", Duration::from_secs(10), || {
        let open = edge_tests::metric(&agent.metrics().ok()?, "edge_agent_open_streams")?;
        (open >= 20.0).then_some(())
    })
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(), 0, "no upstream connection for a handshake that is not complete");

    // A client that completes its handshake gets exactly one.
    let port = server.addrs.tls.port();
    let host = format!("web1.{ZONE}");
    let (ok, body, err) = curl(&[
        "-sS",
        "--max-time",
        "10",
        "--resolve",
        &format!("{host}:{port}:127.0.0.1"),
        "--cacert",
        agent.local_ca("web1").to_str().unwrap(),
        &format!("https://{host}:{port}/"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(body, "ok\n");
    assert_eq!(count(), 1);
    drop(held);
}
