//! Customers' own domains end to end, over real processes: a second
//! edge-server is the customer's authoritative DNS for `customer.test`; the
//! cluster refuses the domain until the ownership TXT is published there,
//! routes it after, and stops once the record is gone for longer than the
//! grace period. Pebble issues the domain's certificate by TLS-ALPN-01 with
//! its `tlsPort` set to the cluster's TLS port, so the CA's validation
//! connection crosses the server and the tunnel to the agent; curl checks
//! the certificate against Pebble's root. A second node cannot claim the
//! same domain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine;

use edge_tests::pebble::{free_port, Pebble};
use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server};

const DOMAIN: &str = "www.customer.test";

fn domain_json(server: &Server) -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_str(&server.cli(&["domain", "list", "--json"]).unwrap()).unwrap();
    list.as_array().unwrap().iter().find(|d| d["name"] == DOMAIN).cloned().unwrap_or_default()
}

/// The customer's DNS (a second edge-server authoritative for
/// customer.test, with `www` at 127.0.0.1), the cluster's server checking
/// domains there (`extra` appended to its config), and Pebble resolving
/// through the customer's DNS and validating TLS-ALPN-01 on the server's
/// TLS port.
fn start(dir: &std::path::Path, extra: &str) -> (Server, Server, Pebble) {
    start_on_port(dir, extra, free_port().unwrap())
}

/// [`start`] with Pebble on `pebble_port`.
fn start_on_port(dir: &std::path::Path, extra: &str, pebble_port: u16) -> (Server, Server, Pebble) {
    let customer = Server::start_zone(
        &dir.join("customer-dns"),
        "customer.test",
        "[dns]\nlisten = \"127.0.0.1:0\"\naddresses = [\"127.0.0.1\"]\n[store]\npoll_ms = 100\n",
    )
    .unwrap();
    let customer_dns = customer.addrs.dns.unwrap();
    customer.cli(&["dns", "add", "www", "A", "127.0.0.1"]).unwrap();
    let server = Server::start(
        &dir.join("server"),
        &format!(
            "{extra}[domains]\nresolver = \"{customer_dns}\"\ncheck_interval_secs = 1\nrecheck_interval_secs = 1\n\
             grace_secs = 3\n[store]\npoll_ms = 100\n"
        ),
    )
    .unwrap();
    let pebble =
        Pebble::start_with_tls_port(&dir.join("pebble"), pebble_port, customer_dns, server.addrs.tls.port()).unwrap();
    (customer, server, pebble)
}

/// The agent's `[acme]`: running the orders itself at Pebble (`node`), or
/// sending CSRs to the server (`server`).
fn agent_acme(pebble: &Pebble, flow: &str) -> String {
    let renewal = "[acme.renewal]\nretry_initial_secs = 1\nretry_max_secs = 4\n";
    if flow == "server" {
        return format!("[acme]\nflow = \"server\"\n{renewal}");
    }
    format!(
        "[acme]\nflow = \"node\"\ndirectories = [\"{}\"]\nroot_ca_file = \"{}\"\n{renewal}",
        pebble.directory,
        pebble.listener_ca.display()
    )
}

/// Claims DOMAIN for `node` and returns the TXT value to publish.
fn claim(server: &Server, node: &str) -> String {
    let printed = server.cli(&["domain", "add", DOMAIN, "--node", node]).unwrap();
    let txt_line = printed.lines().find(|l| l.starts_with("_edge-verify.www.customer.test TXT")).unwrap();
    let value = txt_line.split('"').nth(1).unwrap().to_string();
    assert!(edge_proto::domains::is_verify_value(&value), "{printed}");
    assert!(printed.contains(&format!("www.customer.test CNAME {node}.edge.test")), "{printed}");
    value
}

#[test]
fn custom_domain_is_routed_once_verified_gets_a_tls_alpn_certificate_and_lapses() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (customer, server, pebble) = start(tmp.path(), "");
    let join = server.add_node("web1").unwrap();
    let join2 = server.add_node("web2").unwrap();
    let upstream = rt.block_on(upstreams::http("customer site"));
    let agent_dir = tmp.path().join("agent");
    let agent = Agent::spawn_with_config(&agent_dir, &join, upstream, &agent_acme(&pebble, "node")).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let agent2 = Agent::start(&tmp.path().join("agent2"), &join2, upstream, &[]).unwrap();

    // Claimed: the output says what to publish.
    let value = claim(&server, "web1");

    // Refused before the TXT is published: not routed, the check says why.
    let out = server.cli_output(&["domain", "verify", DOMAIN]).unwrap();
    assert!(!out.status.success(), "verify fails while the record is missing");
    assert!(String::from_utf8_lossy(&out.stdout).contains("pending"), "{out:?}");
    let ca = agent.local_ca("web1");
    let config = clients::client_config(&ca).unwrap();
    let refused = rt.block_on(clients::https_get(server.addrs.tls, DOMAIN, config.clone(), "/"));
    assert!(refused.is_err(), "an unverified domain is not routed: {refused:?}");
    assert_eq!(domain_json(&server)["status"], "pending");

    // Other nodes cannot claim it, and names of the zone are no one's domain.
    let taken = server.cli_output(&["domain", "add", DOMAIN, "--node", "web2"]).unwrap();
    assert!(!taken.status.success());
    assert!(String::from_utf8_lossy(&taken.stderr).contains("held by another node"), "{taken:?}");
    let inside = server.cli_output(&["domain", "add", "x.web2.edge.test", "--node", "web2"]).unwrap();
    assert!(String::from_utf8_lossy(&inside.stderr).contains("inside the cluster zone"), "{inside:?}");

    // Published at the customer's DNS: the servers' own checks route it.
    customer.cli(&["dns", "add", "_edge-verify.www", "TXT", &value]).unwrap();
    wait_for("domain verified by the scheduled check", Duration::from_secs(20), || {
        (domain_json(&server)["status"] == "verified").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", server.proc.log_text()));
    assert!(domain_json(&server)["verified_at"].as_i64().is_some());
    let (status, body) = server.api_get("/api/v1/domains", Some(&server.admin_token())).unwrap();
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed[0]["name"], DOMAIN);
    assert_eq!(listed[0]["routed"], true);

    // The agent gets a certificate for it by TLS-ALPN-01 through the tunnel.
    let root = pebble.issuing_root().unwrap();
    wait_for("a Pebble certificate for the domain", Duration::from_secs(90), || {
        let (ok, body, _) = clients::curl_verified(&root, DOMAIN, server.addrs.tls);
        (ok && body == "customer site").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_text()));
    assert!(agent.proc.log_text().contains("answered a TLS-ALPN-01 validation"));
    let stored = std::fs::read_to_string(agent_dir.join("certs/acme/domains/www.customer.test/node.pem")).unwrap();
    let info = edge_certs::acme::leaf_info(&stored[stored.find("-----BEGIN CERTIFICATE").unwrap()..]).unwrap();
    assert_eq!(info.names, vec![DOMAIN.to_string()]);
    // The node's own name still gets the node's certificate.
    let own = rt.block_on(clients::https_get(server.addrs.tls, "web1.edge.test", config.clone(), "/")).unwrap();
    assert_eq!(own, (200, "customer site".to_string()));
    // web2 never sees the domain's traffic.
    assert_eq!(metric(&agent2.metrics().unwrap(), "edge_agent_streams_total").unwrap_or(0.0), 0.0);
    let shown = server.cli(&["node", "show", "web1"]).unwrap();
    assert!(shown.contains(DOMAIN) && shown.contains("verified"), "{shown}");
    let audit = server.cli(&["audit", "--action", "domain.create"]).unwrap();
    assert!(audit.contains(DOMAIN), "{audit}");

    // The record goes: routed through the 3 s grace period, then not.
    customer.cli(&["dns", "remove", "_edge-verify.www"]).unwrap();
    wait_for("domain lapsed", Duration::from_secs(20), || (domain_json(&server)["status"] == "lapsed").then_some(()))
        .unwrap();
    wait_for("the lapsed domain unrouted", Duration::from_secs(10), || {
        let (ok, _, _) = clients::curl_verified(&root, DOMAIN, server.addrs.tls);
        (!ok).then_some(())
    })
    .unwrap();

    // Removed: web2 may claim it now (a new value to publish).
    server.cli(&["domain", "remove", DOMAIN]).unwrap();
    let again = server.cli(&["domain", "add", DOMAIN, "--node", "web2"]).unwrap();
    assert!(!again.contains(&value), "a new claim gets a new value");
}

#[test]
fn csr_flow_gets_the_domain_certificate_with_the_agent_answering_for_the_server() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // The server runs the orders: [acme] (which needs [dns]) with Pebble.
    let (customer, server, pebble) = start_csr(tmp.path());
    let join = server.add_node("web1").unwrap();
    let join2 = server.add_node("web2").unwrap();
    let upstream = rt.block_on(upstreams::http("csr site"));
    let agent =
        Agent::spawn_with_config(&tmp.path().join("agent"), &join, upstream, &agent_acme(&pebble, "server")).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();

    let value = claim(&server, "web1");
    customer.cli(&["dns", "add", "_edge-verify.www", "TXT", &value]).unwrap();
    wait_for("domain verified", Duration::from_secs(20), || {
        server.cli_output(&["domain", "verify", DOMAIN]).ok()?.status.success().then_some(())
    })
    .unwrap();

    // Another node's CSR for the domain is refused before any order.
    let token2 = edge_proto::join::JoinTicket::parse(&join2).unwrap().token;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![DOMAIN.to_string()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    let body = format!(r#"{{"csr":"{}"}}"#, base64::engine::general_purpose::STANDARD.encode(der));
    let (status, text) = server.api_call("POST", "/api/signal/certificate", Some(&token2), Some(&body)).unwrap();
    assert_eq!(status, 403, "{text}");

    let root = pebble.issuing_root().unwrap();
    wait_for("a Pebble certificate for the domain (CSR flow)", Duration::from_secs(90), || {
        let (ok, body, _) = clients::curl_verified(&root, DOMAIN, server.addrs.tls);
        (ok && body == "csr site").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}\nagent log:\n{}", server.proc.log_text(), agent.proc.log_text()));
    assert!(server.proc.log_text().contains("TLS-ALPN-01 answer served by the node's agents"));
    assert!(agent.proc.log_text().contains("answered a TLS-ALPN-01 validation"));
}

/// [`start`] with `[dns]` and `[acme]` on the server, for the CSR flow.
fn start_csr(dir: &std::path::Path) -> (Server, Server, Pebble) {
    // Pebble's address must be known before the server's config is written.
    let port = free_port().unwrap();
    let listener_ca = dir.join("pebble").join("listener-ca.pem");
    let extra = format!(
        "[dns]\nlisten = \"127.0.0.1:0\"\n[acme]\ndirectories = [\"{}\"]\nroot_ca_file = \"{}\"\ncaa_issuers = []\n",
        Pebble::directory_for(port),
        listener_ca.display()
    );
    start_on_port(dir, &extra, port)
}
