//! Access policies end to end, over real processes: clients from 127.0.0.2
//! and 127.0.0.3 (loopback sources the test binds) reaching a hostname and
//! a TCP service, the TLS alert `access_denied`, and the node's policy for
//! names without their own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use edge_tests::pebble::free_port;
use edge_tests::{clients, upstreams, wait_for, Agent, Server, ZONE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))?;
    socket.connect(to).await
}

/// An HTTPS GET of `/` for `host` from `source`: the status, or the TLS
/// error text.
async fn get_from(source: &str, server: &Server, host: &str, config: Arc<rustls::ClientConfig>) -> Result<u16, String> {
    let tcp = from(source, server.addrs.tls).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let connect = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0))
}

/// Whether 4 bytes sent through the service from `source` come back.
async fn echoed_from(source: &str, addr: SocketAddr) -> bool {
    let Ok(mut tcp) = from(source, addr).await else { return false };
    if tcp.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut buf)).await, Ok(Ok(_)))
        && &buf == b"ping"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_allow_one_source_and_deny_another_for_a_hostname_and_a_tcp_service() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("web1").unwrap();
    let web = upstreams::http("web\n").await;
    let echo = upstreams::echo().await;
    let agent = Agent::spawn_with_config(
        &tmp.path().join("agent"),
        &join,
        web,
        &format!("[[services]]\nname = \"echo\"\ntarget = \"{echo}\"\n"),
    )
    .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let config = clients::client_config(&agent.local_ca("web1")).unwrap();
    let port = free_port().unwrap();
    let service: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    server
        .cli(&["service", "add", "echo-web1", "--node", "web1", "--listen", &service.to_string(), "--target", "echo"])
        .unwrap();
    wait_for("the service listener", Duration::from_secs(10), || std::net::TcpStream::connect(service).ok()).unwrap();
    let web1 = format!("web1.{ZONE}");
    let app = format!("app.web1.{ZONE}");
    assert_eq!(get_from("127.0.0.3", &server, &web1, config.clone()).await, Ok(200), "no policy: allowed");

    // The hostname: only 127.0.0.2.
    server.cli(&["access", "set", "--host", &web1, "--rule", "allow=127.0.0.2", "--default", "deny"]).unwrap();
    // The service: everyone but 127.0.0.3.
    server.cli(&["access", "set", "--service", "echo-web1", "--rule", "deny=127.0.0.3/32"]).unwrap();
    wait_for("the policies in force", Duration::from_secs(10), || {
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(get_from("127.0.0.3", &server, &web1, config.clone()))
        });
        r.is_err().then_some(())
    })
    .unwrap();
    assert_eq!(get_from("127.0.0.2", &server, &web1, config.clone()).await, Ok(200));
    let denied = get_from("127.0.0.3", &server, &web1, config.clone()).await.unwrap_err();
    assert!(denied.contains("AccessDenied"), "the client gets the alert access_denied: {denied}");
    assert!(echoed_from("127.0.0.2", service).await, "the service serves 127.0.0.2");
    assert!(!echoed_from("127.0.0.3", service).await, "and closes 127.0.0.3");
    // Other names of the node follow the node's policy (none yet: allowed).
    assert_eq!(get_from("127.0.0.3", &server, &app, config.clone()).await, Ok(200));

    // A node policy covers the names without one of their own.
    server.cli(&["access", "set", "--node", "web1", "--rule", "deny=127.0.0.0/8", "--rule", "allow=::/0"]).unwrap();
    wait_for("the node policy", Duration::from_secs(10), || {
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(get_from("127.0.0.2", &server, &app, config.clone()))
        });
        r.is_err().then_some(())
    })
    .unwrap();
    assert_eq!(get_from("127.0.0.2", &server, &web1, config.clone()).await, Ok(200), "the host's own policy wins");

    // Counted, listed, shown, audited, and refusals of bad input name the field.
    let metrics = server.metrics().unwrap();
    let denials = edge_tests::metric(&metrics, "edge_sni_rejections_total{reason=\"access_denied\"}").unwrap_or(0.0);
    assert!(denials >= 3.0, "{denials} denials counted");
    let list = server.cli(&["access", "list"]).unwrap();
    assert!(
        list.contains(&format!("host:{web1}")) && list.contains("service:echo-web1") && list.contains("node:web1"),
        "{list}"
    );
    let show = server.cli(&["node", "show", "web1"]).unwrap();
    assert!(show.contains("allow=127.0.0.2/32"), "{show}");
    for (args, want) in [
        (vec!["access", "set", "--host", "web9.edge.test", "--rule", "allow=::1"], "host"),
        (vec!["access", "set", "--node", "web1", "--rule", "allow=300.0.0.1"], "rule"),
        (vec!["access", "set", "--node", "web1", "--rule", "permit=::1"], "rule"),
        (vec!["access", "set", "--service", "nope", "--rule", "allow=::1"], "service"),
    ] {
        let out = server.cli_output(&args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains(want), "{args:?}: {err}");
    }
    server.cli(&["access", "clear", "--node", "web1"]).unwrap();
    wait_for("the node policy cleared", Duration::from_secs(10), || {
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(get_from("127.0.0.2", &server, &app, config.clone()))
        });
        (r == Ok(200)).then_some(())
    })
    .unwrap();
    let audit = server.cli(&["audit", "--action", "access.set"]).unwrap();
    assert!(audit.contains("service:echo-web1"), "{audit}");

    // The admin API covers policies and services too.
    let token = server.admin_token();
    let api = |method: &str, path: &str, body: Option<&str>| {
        tokio::task::block_in_place(|| server.api_call(method, path, Some(&token), body).unwrap())
    };
    let (status, body) = api("GET", "/api/v1/access", None);
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(listed.as_array().unwrap().iter().any(|p| p["scope"] == "service:echo-web1"), "{body}");
    let app_scope = format!("/api/v1/access/host:{app}");
    let policy = r#"{"rules":[{"action":"deny","cidr":"127.0.0.2"}],"default":"allow"}"#;
    assert_eq!(api("PUT", &app_scope, Some(policy)).0, 204);
    wait_for("the API's policy in force", Duration::from_secs(10), || {
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(get_from("127.0.0.2", &server, &app, config.clone()))
        });
        r.is_err().then_some(())
    })
    .unwrap();
    assert_eq!(api("PUT", "/api/v1/access/planet:x", Some(policy)).0, 422, "scopes are checked");
    assert_eq!(api("PUT", &app_scope, Some(r#"{"rules":[],"default":"maybe"}"#)).0, 422, "the field is named");
    assert_eq!(api("DELETE", &app_scope, None).0, 204);
    assert_eq!(api("DELETE", &app_scope, None).0, 404);
    let (status, body) = api("GET", "/api/v1/services", None);
    assert_eq!(status, 200);
    assert!(body.contains("echo-web1") && body.contains(&service.to_string()), "{body}");
    let port = free_port().unwrap();
    let create = format!(r#"{{"name":"echo2","node":"web1","listen":"127.0.0.1:{port}","target":"echo"}}"#);
    assert_eq!(api("POST", "/api/v1/services", Some(&create)).0, 201);
    assert_eq!(api("POST", "/api/v1/services", Some(&create)).0, 409, "the name is taken");
    let echo2: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("the API's service listening", Duration::from_secs(10), || std::net::TcpStream::connect(echo2).ok())
        .unwrap();
    assert!(echoed_from("127.0.0.2", echo2).await);
    assert_eq!(api("DELETE", "/api/v1/services/echo2", None).0, 204);
    assert_eq!(api("DELETE", "/api/v1/services/echo2", None).0, 404);
}
