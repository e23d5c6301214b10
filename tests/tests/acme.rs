//! Certificates from a real ACME CA (Pebble, validating DNS-01 against
//! edge-server's DNS), through both flows, with renewal, CA failures, and
//! the rule that a node touches only its own names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use edge_tests::dns::dig;
use edge_tests::pebble::{free_port, Pebble};
use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn token_of(join: &str) -> String {
    edge_proto::join::JoinTicket::parse(join).unwrap().token
}

fn renewals(agent: &Agent) -> f64 {
    agent.metrics().ok().and_then(|m| metric(&m, "edge_agent_certificate_renewals_total")).unwrap_or(0.0)
}

fn wait_renewals(agent: &Agent, at_least: f64, limit: Duration) {
    wait_for("certificate installed", limit, || (renewals(agent) >= at_least).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_text()));
}

/// Serial of the certificate a TLS stream was served.
fn serial_of(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    edge_certs::info::cert_info(&leaf).unwrap().serial
}

/// One keep-alive request on an open stream; returns the body.
async fn request_on(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, host: &str) -> String {
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "connection closed before the response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap())
                })
                .unwrap();
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return body[..len].to_string();
            }
        }
    }
}

/// The base64 body of the agent's private key, for searching the server side.
fn agent_key_material(agent_dir: &Path) -> String {
    let pem = std::fs::read_to_string(agent_dir.join("certs/acme/node.pem")).unwrap();
    let start = pem.find("PRIVATE KEY-----").unwrap() + "PRIVATE KEY-----".len();
    let end = pem[start..].find("-----END").unwrap() + start;
    pem[start..end].lines().map(str::trim).collect::<String>()
}

fn assert_not_under(dir: &Path, needle: &str) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            assert_not_under(&path, needle);
        } else {
            let bytes = std::fs::read(&path).unwrap_or_default();
            let flat: String = String::from_utf8_lossy(&bytes).lines().map(str::trim).collect();
            assert!(!flat.contains(needle), "the agent's private key appears in {}", path.display());
        }
    }
}

/// A server in `<dir>/server` with DNS and ACME at the Pebble that will run
/// on `pebble_port` from `<dir>/pebble`; `extra` follows the `[acme]` keys.
fn acme_server(dir: &Path, pebble_port: u16, extra: &str) -> Server {
    let config = format!(
        "[dns]\nlisten = \"127.0.0.1:0\"\n[acme]\ndirectories = [\"{}\"]\nroot_ca_file = \"{}\"\n\
         caa_issuers = [\"pebble.test\"]\n{extra}",
        Pebble::directory_for(pebble_port),
        dir.join("pebble/listener-ca.pem").display()
    );
    Server::start(&dir.join("server"), &config).unwrap()
}

#[test]
fn csr_flow_issues_through_server_and_renews_without_dropping_connections() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pebble_port = free_port().unwrap();
    let pebble_dir = dir.path().join("pebble");
    let server = acme_server(dir.path(), pebble_port, "contact = [\"ops@edge.test\"]\n");
    let dns = server.addrs.dns.unwrap();
    // Only DNS-01, which only this server can answer, may issue for the zone
    // (RFC 8657): whoever holds an address a direct node left behind cannot
    // get a certificate for its name by HTTP-01 or TLS-ALPN-01.
    for tcp in [false, true] {
        let caa = dig(dns, "edge.test", "CAA", tcp).unwrap().data("CAA");
        assert_eq!(caa.len(), 2, "{caa:?}");
        assert!(caa.iter().any(|c| c.starts_with("0 issue \"pebble.test; validationmethods=dns-01")), "{caa:?}");
        assert!(caa.iter().any(|c| c.starts_with("0 issuewild \"pebble.test; validationmethods=dns-01")), "{caa:?}");
    }
    let pebble = Pebble::start(&pebble_dir, pebble_port, dns).unwrap();
    let join = server.add_node("n1").unwrap();
    let upstream = rt.block_on(upstreams::http("hello from n1"));
    let agent_dir = dir.path().join("agent");
    let agent = Agent::spawn_with_config(
        &agent_dir,
        &join,
        upstream,
        "[acme.renewal]\nrenew_after_secs = 10\nretry_initial_secs = 2\n",
    )
    .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    wait_renewals(&agent, 1.0, Duration::from_secs(90));

    // Clients that trust only Pebble's root reach the node through the
    // cluster, for the node name and the wildcard.
    let root = pebble.issuing_root().unwrap();
    for host in ["n1.edge.test", "api.n1.edge.test"] {
        let (ok, body, err) = clients::curl_verified(&root, host, server.addrs.tls);
        assert!(ok && body == "hello from n1", "{host}: {err}");
    }
    let log = agent.proc.log_text();
    let server_log = server.proc.log_text();
    for line in ["ACME: order created", "ACME: TXT published", "ACME: validated", "ACME: certificate issued"] {
        assert!(server_log.contains(line), "server progress line {line:?} missing");
    }
    assert!(log.contains("certificate installed"), "{log}");

    // TXT values are gone after validation.
    let txt = dig(dns, "_acme-challenge.n1.edge.test", "TXT", false).unwrap();
    assert!(txt.answers.is_empty(), "challenge values left in the zone: {:?}", txt.answers);
    // The key stayed on the node.
    assert_not_under(&dir.path().join("server"), &agent_key_material(&agent_dir));

    // A connection opened before the renewal keeps working after it; new
    // connections get the new certificate.
    let config = clients::client_config(&root).unwrap();
    let (serial_before, mut old) = rt.block_on(async {
        let mut tls = clients::connect(server.addrs.tls, "n1.edge.test", config.clone()).await.unwrap();
        assert_eq!(request_on(&mut tls, "n1.edge.test").await, "hello from n1");
        (serial_of(&tls), tls)
    });
    let before = renewals(&agent);
    wait_renewals(&agent, before + 1.0, Duration::from_secs(60));
    rt.block_on(async {
        assert_eq!(request_on(&mut old, "n1.edge.test").await, "hello from n1", "pre-renewal connection still serves");
        // A fresh client config: no session to resume, so a full handshake.
        let fresh = clients::client_config(&root).unwrap();
        let tls = clients::connect(server.addrs.tls, "n1.edge.test", fresh).await.unwrap();
        assert_ne!(serial_of(&tls), serial_before, "new connections see the renewed certificate");
    });

    // Operator view: expiry in node list and metrics; cert status on the node.
    let list = server.cli(&["node", "list", "--json"]).unwrap();
    let nodes: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert!(nodes[0]["cert_not_after"].as_i64().unwrap() > edge_tests_now(), "{list}");
    let metrics = server.metrics().unwrap();
    assert!(metric(&metrics, "edge_node_certificate_expiry_timestamp_seconds{node=\"n1\"}").is_some());
    assert!(metric(&metrics, "edge_certificates_issued_total").unwrap() >= 2.0);
    let status = Command::new(edge_tests::bin("edge-agent"))
        .args(["cert", "status", "--config"])
        .arg(agent_dir.join("agent.toml"))
        .arg("--data-dir")
        .arg(&agent_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    for field in ["names:        n1.edge.test, *.n1.edge.test", "issuer:", "Pebble", "not after:", "next renewal:"] {
        assert!(text.contains(field), "cert status lacks {field:?}:\n{text}");
    }
}

fn edge_tests_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn node_flow_falls_back_to_next_directory_and_keeps_serving_through_a_ca_outage() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), "[dns]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let dns = server.addrs.dns.unwrap();
    let pebble = Pebble::start(&dir.path().join("pebble"), free_port().unwrap(), dns).unwrap();
    let join = server.add_node("n1").unwrap();
    let upstream = rt.block_on(upstreams::http("node flow"));
    // Nothing listens on the first directory's port.
    let dead = format!("https://127.0.0.1:{}/dir", free_port().unwrap());
    let agent_dir = dir.path().join("agent");
    let agent = Agent::spawn_with_config(
        &agent_dir,
        &join,
        upstream,
        &format!(
            "[acme]\nflow = \"node\"\ndirectories = [\"{dead}\", \"{}\"]\nroot_ca_file = \"{}\"\n\
             [acme.renewal]\nrenew_after_secs = 4\nretry_initial_secs = 0.5\nretry_max_secs = 4\n",
            pebble.directory,
            pebble.listener_ca.display()
        ),
    )
    .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    wait_renewals(&agent, 1.0, Duration::from_secs(90));
    let log = agent.proc.log_text();
    assert!(log.contains("ACME order failed at this directory") && log.contains(&dead), "first directory tried: {log}");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent_dir.join("certs/acme/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["directory"], pebble.directory.as_str(), "issued by the second directory");
    let root = pebble.issuing_root().unwrap();
    let (ok, body, err) = clients::curl_verified(&root, "n1.edge.test", server.addrs.tls);
    assert!(ok && body == "node flow", "{err}");
    assert!(server.proc.log_text().contains("DNS-01 TXT value published"));
    wait_for("TXT values removed", Duration::from_secs(5), || {
        dig(dns, "_acme-challenge.n1.edge.test", "TXT", false).ok()?.answers.is_empty().then_some(())
    })
    .unwrap();
    let account_files = std::fs::read_dir(agent_dir.join("acme")).unwrap().count();
    assert!(account_files >= 1, "the node-side account is persisted");

    // The CA goes away: renewal fails, is retried with growing delays, and
    // the current certificate keeps being served.
    let config = clients::client_config(&root).unwrap();
    let serial = rt.block_on(async {
        let tls = clients::connect(server.addrs.tls, "n1.edge.test", config.clone()).await.unwrap();
        serial_of(&tls)
    });
    let mut pebble = pebble;
    pebble.proc.signal("KILL");
    pebble.proc.wait_exit(Duration::from_secs(5));
    let installed = renewals(&agent);
    let delays = wait_for("three failed renewal attempts", Duration::from_secs(60), || {
        let log = agent.proc.log_text();
        let delays: Vec<f64> = log
            .lines()
            .filter(|l| l.contains("certificate request failed"))
            .filter_map(|l| l.split("retry_in_secs=").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        (delays.len() >= 3).then_some(delays)
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_text()));
    assert!(delays[0] < delays[1] && delays[1] < delays[2], "backoff grows: {delays:?}");
    assert_eq!(renewals(&agent), installed, "nothing installed while the CA is down");
    rt.block_on(async {
        let mut tls = clients::connect(server.addrs.tls, "n1.edge.test", config.clone()).await.unwrap();
        assert_eq!(serial_of(&tls), serial, "the current certificate stays in service");
        assert_eq!(request_on(&mut tls, "n1.edge.test").await, "node flow");
    });
    assert!(metric(&agent.metrics().unwrap(), "edge_agent_certificate_failures_total").unwrap() >= 3.0);
}

#[test]
fn a_node_cannot_publish_or_obtain_anything_for_another_nodes_names() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "[dns]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let dns = server.addrs.dns.unwrap();
    let n1 = token_of(&server.add_node("n1").unwrap());
    server.add_node("n2").unwrap();
    let call = |method: &str, path: &str, token: Option<&str>, body: &str| {
        server.api_call(method, path, token, Some(body)).unwrap().0
    };
    let challenge = "/api/signal/acme-challenge";
    for name in
        ["_acme-challenge.n2.edge.test", "_acme-challenge.x.n1.edge.test", "_acme-challenge.edge.test", "n1.edge.test"]
    {
        let body = format!(r#"{{"name":"{name}","value":"abcdef"}}"#);
        assert_eq!(call("PUT", challenge, Some(&n1), &body), 403, "PUT {name}");
        assert_eq!(call("DELETE", challenge, Some(&n1), &body), 403, "DELETE {name}");
    }
    let txt = dig(dns, "_acme-challenge.n2.edge.test", "TXT", false).unwrap();
    assert!(txt.answers.is_empty(), "nothing was published for n2");
    assert_eq!(call("PUT", challenge, None, r#"{"name":"_acme-challenge.n1.edge.test","value":"a"}"#), 401);
    assert_eq!(call("PUT", challenge, Some("n1.bogus"), r#"{"name":"_acme-challenge.n1.edge.test","value":"a"}"#), 401);
    assert_eq!(
        call("PUT", challenge, Some(&n1), r#"{"name":"_acme-challenge.n1.edge.test","value":"no spaces"}"#),
        400
    );
    assert_eq!(call("PUT", challenge, Some(&n1), r#"{"name":"_acme-challenge.n1.edge.test","valu":"x"}"#), 400);

    // Only the shape of a real DNS-01 value (43 base64url characters), and
    // at most 2 values per node (its name and its wildcard).
    let value = |i: u32| format!("{}{i}", "A".repeat(42));
    let put = |v: &str| {
        call("PUT", challenge, Some(&n1), &format!(r#"{{"name":"_acme-challenge.n1.edge.test","value":"{v}"}}"#))
    };
    for bad in ["a".repeat(42), "a".repeat(44), format!("{}=", "a".repeat(42)), "short".into()] {
        assert_eq!(put(&bad), 400, "{bad:?}");
    }
    for i in 0..2 {
        assert_eq!(put(&value(i)), 200);
    }
    assert_eq!(put(&value(0)), 200, "publishing a value again is no error");
    // A third is refused while the two belong to a running order (stale
    // ones, older than 10 minutes, would make room).
    assert_eq!(put(&value(9)), 429);
    assert_eq!(dig(dns, "_acme-challenge.n1.edge.test", "TXT", true).unwrap().data("TXT").len(), 2);
    assert_eq!(call("DELETE", challenge, Some(&n1), r#"{"name":"_acme-challenge.n1.edge.test"}"#), 200);
    assert!(dig(dns, "_acme-challenge.n1.edge.test", "TXT", false).unwrap().answers.is_empty());

    // CSRs: another node's name is refused before anything else; an own
    // name on a server without [acme] is "not implemented".
    let csr = |names: &[&str]| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        // rcgen's default subject CN would itself be a foreign name.
        params.distinguished_name = rcgen::DistinguishedName::new();
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        format!(r#"{{"csr":"{}"}}"#, base64::engine::general_purpose::STANDARD.encode(der))
    };
    let cert = "/api/signal/certificate";
    assert_eq!(call("POST", cert, Some(&n1), &csr(&["n1.edge.test", "n2.edge.test"])), 403);
    assert_eq!(call("POST", cert, Some(&n1), &csr(&["*.edge.test"])), 403);
    assert_eq!(call("POST", cert, Some(&n1), &csr(&["example.com"])), 403);
    assert_eq!(call("POST", cert, Some(&n1), r#"{"csr":"bm90IGEgY3Ny"}"#), 400);
    assert_eq!(call("POST", cert, Some(&n1), &csr(&["n1.edge.test", "*.n1.edge.test"])), 501);
    let metrics = server.metrics().unwrap();
    assert!(metric(&metrics, "edge_foreign_name_refusals_total").unwrap() >= 11.0);
}

#[test]
fn a_node_hammering_the_signal_api_does_not_delay_another_nodes_certificate() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pebble_port = free_port().unwrap();
    let pebble_dir = dir.path().join("pebble");
    let server = acme_server(dir.path(), pebble_port, "[limits]\nnode_signal_rate = 5\nnode_signal_burst = 30\n");
    let dns = server.addrs.dns.unwrap();
    let _pebble = Pebble::start(&pebble_dir, pebble_port, dns).unwrap();
    let noisy = token_of(&server.add_node("noisy").unwrap());
    let join = server.add_node("n1").unwrap();

    // The noisy node publishes one value, then PUTs it again and again on
    // keep-alive connections for 10 s.
    let value = "NoisyNoisyNoisyNoisyNoisyNoisyNoisyNoisy123";
    let body = format!(r#"{{"name":"_acme-challenge.noisy.edge.test","value":"{value}"}}"#);
    let url = format!("https://{}/api/signal/acme-challenge", server.addrs.api);
    let serial = || -> u64 {
        dig(dns, "edge.test", "SOA", true).unwrap().data("SOA")[0].split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    assert_eq!(server.api_call("PUT", "/api/signal/acme-challenge", Some(&noisy), Some(&body)).unwrap().0, 200);
    let serial_before = serial();
    let hammer = {
        let (url, body, noisy) = (url.clone(), body.clone(), noisy.clone());
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let (mut sent, mut codes) = (0u64, std::collections::BTreeMap::<String, u64>::new());
            while start.elapsed() < Duration::from_secs(10) {
                let mut cmd = Command::new("curl");
                cmd.args(["-sk", "--max-time", "20", "-w", "%{http_code}\n", "-X", "PUT"])
                    .args(["-H", &format!("Authorization: Bearer {noisy}"), "-H", "Content-Type: application/json"])
                    .args(["--data-binary", &body]);
                // 300 requests per curl, on one connection.
                for _ in 0..300 {
                    cmd.args(["-o", "/dev/null", &url]);
                }
                let out = cmd.output().unwrap();
                for code in String::from_utf8_lossy(&out.stdout).lines() {
                    sent += 1;
                    *codes.entry(code.to_string()).or_default() += 1;
                }
            }
            (sent, codes, start.elapsed())
        })
    };

    // Meanwhile n1 obtains its certificate (CSR flow) in normal time.
    let started = std::time::Instant::now();
    let upstream = rt.block_on(upstreams::http("hello from n1"));
    let agent = Agent::spawn_with_config(
        &dir.path().join("agent"),
        &join,
        upstream,
        "[acme.renewal]\nretry_initial_secs = 2\n",
    )
    .unwrap();
    wait_renewals(&agent, 1.0, Duration::from_secs(30));
    let took = started.elapsed();
    let (sent, codes, hammered) = hammer.join().unwrap();
    assert!(took < Duration::from_secs(30), "n1's certificate took {took:?}");
    assert!(sent >= 600, "the noisy node sent {sent} requests: {codes:?}");
    // Its budget (burst 30, then 5/s) held it to a few requests per second;
    // everything else was refused before it touched the store.
    let accepted = codes.get("200").copied().unwrap_or(0);
    let budget = 30 + 5 * (hammered.as_secs() + 1);
    assert!(accepted <= budget, "{accepted} of {sent} accepted in {hammered:?}: {codes:?}");
    assert!(codes.get("429").copied().unwrap_or(0) > sent / 2, "{codes:?}");
    let metrics = server.metrics().unwrap();
    assert!(metric(&metrics, "edge_refusals_total{listener=\"api\",reason=\"node_rate\"}").unwrap() > 100.0);
    // The accepted repeats changed nothing: the zone moved only for n1's
    // two challenge values (published, then removed).
    let moved = serial() - serial_before;
    assert!(moved <= 8, "the SOA serial moved {moved} times");
    eprintln!("noisy node: {sent} requests {codes:?}; n1's certificate after {took:?}");
}
