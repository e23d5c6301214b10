//! Direct/proxy mode: verified probes flip DNS, traffic keeps flowing
//! through every flip, an impostor at the endpoint never counts, state
//! survives a restart, and plain HTTP on :80 answers as specified.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_tests::dns::dig;
use edge_tests::pebble::free_port;
use edge_tests::upstreams::{self, Gate};
use edge_tests::{wait_for, Agent, Server};

const CONFIG: &str = "[dns]\nlisten = \"127.0.0.1:0\"\naddress_ttl_secs = 1\n\
    [modes]\nprobe_interval_ms = 300\nprobe_timeout_ms = 1000\nfailures_to_proxy = 3\n";

fn node_json(server: &Server, name: &str) -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_str(&server.cli(&["node", "list", "--json"]).unwrap()).unwrap();
    list.as_array().unwrap().iter().find(|n| n["name"] == name).cloned().unwrap()
}

fn wait_mode(server: &Server, name: &str, mode: &str, limit: Duration) {
    wait_for(&format!("{name} in {mode} mode"), limit, || (node_json(server, name)["mode"] == mode).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: {}", node_json(server, name)));
}

fn a_record(dns: SocketAddr, name: &str) -> Vec<String> {
    dig(dns, name, "A", false).map(|a| a.data("A")).unwrap_or_default()
}

/// curl over plain HTTP to the server's :80 with a Host header:
/// (status, Location, body).
fn http(server: &Server, host: &str, path: &str) -> (u16, String, String) {
    let addr = server.addrs.http.unwrap();
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-D", "-", "-H", &format!("Host: {host}")])
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let location = head
        .lines()
        .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
        .unwrap_or("")
        .to_string();
    (status, location, body.to_string())
}

#[test]
fn probes_flip_dns_without_losing_requests_and_http_answers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), CONFIG).unwrap();
    let dns = server.addrs.dns.unwrap();
    let upstream = rt.block_on(upstreams::http("hello"));

    // n1: reachable through a gate on 127.0.0.2 (its "public address").
    let n1_direct: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
    let gate = rt.block_on(Gate::start(([127, 0, 0, 2], 0).into(), n1_direct));
    let a1 = Agent::start(
        &dir.path().join("a1"),
        &server.add_node("n1").unwrap(),
        upstream,
        &["--direct-listen", &n1_direct.to_string(), "--public-endpoint", &gate.addr.to_string()],
    )
    .unwrap();
    // n2: declares an endpoint where nothing listens.
    let dead: SocketAddr = ([127, 0, 0, 3], free_port().unwrap()).into();
    let _a2 = Agent::start(
        &dir.path().join("a2"),
        &server.add_node("n2").unwrap(),
        upstream,
        &["--direct-listen", "127.0.0.1:0", "--public-endpoint", &dead.to_string()],
    )
    .unwrap();
    // n3: its endpoint is n1's listener — a TLS server that answers
    // probes, but as another node.
    let _a3 = Agent::start(
        &dir.path().join("a3"),
        &server.add_node("n3").unwrap(),
        upstream,
        &["--direct-listen", "127.0.0.1:0", "--public-endpoint", &n1_direct.to_string()],
    )
    .unwrap();

    wait_mode(&server, "n1", "direct", Duration::from_secs(15));
    wait_for("n1's A record points at its endpoint", Duration::from_secs(5), || {
        (a_record(dns, "n1.edge.test") == vec!["127.0.0.2"]).then_some(())
    })
    .unwrap();
    assert_eq!(a_record(dns, "app.n1.edge.test"), vec!["127.0.0.2"], "the wildcard follows the mode");
    wait_mode(&server, "n2", "proxy", Duration::from_secs(15));
    assert_eq!(a_record(dns, "n2.edge.test"), vec!["127.0.0.1"]);
    // The impostor never makes n3 direct.
    wait_for("n3 probed several times", Duration::from_secs(15), || {
        let samples = node_json(&server, "n3")["samples"].as_array().cloned().unwrap_or_default();
        (samples.len() >= 4).then_some(samples)
    })
    .map(|samples| {
        assert!(samples.iter().all(|s| s["ok"] == false), "{samples:?}");
        assert!(samples.iter().any(|s| s["detail"].as_str().unwrap().contains("wrong answer")), "{samples:?}");
    })
    .unwrap();
    assert_eq!(node_json(&server, "n3")["mode"], "proxy");
    assert_eq!(a_record(dns, "n3.edge.test"), vec!["127.0.0.1"]);

    // A client keeps requesting n1 through the cluster address while the
    // endpoint is blocked and unblocked: not one request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let ca = a1.local_ca("n1");
        let tls = server.addrs.tls;
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = Command::new("curl")
                    .args(["-s", "--max-time", "10", "--cacert"])
                    .arg(&ca)
                    .args(["--resolve", &format!("n1.edge.test:{}:127.0.0.1", tls.port())])
                    .arg(format!("https://n1.edge.test:{}/", tls.port()))
                    .output()
                    .unwrap();
                if out.status.success() && out.stdout == b"hello" {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    gate.set_open(false);
    wait_mode(&server, "n1", "proxy", Duration::from_secs(15));
    wait_for("n1's A record back on the cluster", Duration::from_secs(5), || {
        (a_record(dns, "n1.edge.test") == vec!["127.0.0.1"]).then_some(())
    })
    .unwrap();
    gate.set_open(true);
    wait_mode(&server, "n1", "direct", Duration::from_secs(15));
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed during the flips");
    assert!(ok.load(Ordering::SeqCst) >= 5, "the client kept going: {}", ok.load(Ordering::SeqCst));
    let last = &node_json(&server, "n1")["last_transition"];
    assert_eq!((last["from"].as_str(), last["to"].as_str()), (Some("proxy"), Some("direct")), "{last}");
    let metrics = server.metrics().unwrap();
    assert!(edge_tests::metric(&metrics, "edge_mode_transitions_total{to=\"proxy\"}").unwrap() >= 1.0);
    assert_eq!(edge_tests::metric(&metrics, "edge_node_mode{node=\"n1\",mode=\"direct\"}"), Some(1.0));

    // Plain HTTP on :80.
    let (code, location, _) = http(&server, "n1.edge.test", "/a?b=1");
    assert_eq!((code, location.as_str()), (307, "https://n1.edge.test/a?b=1"), "direct node: 307 to https");
    let (code, location, _) = http(&server, "api.n2.edge.test", "/x");
    assert_eq!((code, location.as_str()), (307, "https://api.n2.edge.test/x"), "proxy node, default: redirect");
    assert_eq!(http(&server, "nobody.edge.test", "/").0, 404);
    server.cli(&["node", "http", "n2", "proxy"]).unwrap();
    wait_for("Host-routed proxying", Duration::from_secs(5), || {
        let (code, _, body) = http(&server, "n2.edge.test", "/");
        (code == 200 && body == "hello").then_some(())
    })
    .unwrap();
    server.add_node("n4").unwrap();
    wait_for("offline node: 503", Duration::from_secs(5), || {
        (http(&server, "n4.edge.test", "/").0 == 503).then_some(())
    })
    .unwrap();
    let closed: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
    let _a5 = Agent::start(&dir.path().join("a5"), &server.add_node("n5").unwrap(), closed, &[]).unwrap();
    server.cli(&["node", "http", "n5", "proxy"]).unwrap();
    wait_for("upstream failure: 502", Duration::from_secs(5), || {
        (http(&server, "n5.edge.test", "/").0 == 502).then_some(())
    })
    .unwrap();

    // Modes, samples and transitions survive a restart.
    let addrs = server.addrs;
    let before = server.cli(&["node", "show", "n1"]).unwrap();
    let server_dir = server.dir.clone();
    drop(server);
    let server = Server::start_on(&server_dir, CONFIG, Some(addrs)).unwrap();
    let n1 = node_json(&server, "n1");
    assert_eq!(n1["mode"], "direct", "{n1}");
    let after = server.cli(&["node", "show", "n1"]).unwrap();
    assert!(after.matches(" -> ").count() >= 3, "transitions kept:\n{after}");
    assert!(after.contains("verified"), "samples kept:\n{after}");
    assert!(before.contains("direct -> proxy") && after.contains("direct -> proxy"));
}

#[test]
fn probe_locations_must_all_verify_the_node() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Server B only lends its vantage point.
    let b = Server::start(&dir.path().join("b"), "").unwrap();
    let b_join = b.add_node("unused").unwrap();
    let fingerprint =
        edge_proto::join::hex(&edge_proto::join::JoinTicket::parse(&b_join).unwrap().fingerprint.unwrap());
    let config = format!(
        "{CONFIG}[[modes.probe_locations]]\napi = \"{}\"\nadmin_token = \"{}\"\nfingerprint = \"{fingerprint}\"\n",
        b.addrs.api,
        b.admin_token()
    );
    let a = Server::start(&dir.path().join("a"), &config).unwrap();
    let upstream = rt.block_on(upstreams::http("hello"));
    let direct: SocketAddr = ([127, 0, 0, 1], free_port().unwrap()).into();
    let _agent = Agent::start(
        &dir.path().join("agent"),
        &a.add_node("n2").unwrap(),
        upstream,
        &["--direct-listen", &direct.to_string(), "--public-endpoint", &direct.to_string()],
    )
    .unwrap();
    wait_mode(&a, "n2", "direct", Duration::from_secs(15));
    // The location goes away: rounds fail there, and the node is no longer
    // considered reachable.
    drop(b);
    wait_mode(&a, "n2", "proxy", Duration::from_secs(15));
    let samples = node_json(&a, "n2")["samples"].as_array().cloned().unwrap();
    assert!(samples[0]["detail"].as_str().unwrap().starts_with("from 127.0.0.1:"), "{samples:?}");
}

/// The node's endpoint as the server resolved it (`None` when refused).
fn endpoint_of(server: &Server, name: &str) -> Option<String> {
    node_json(server, name)["endpoint"].as_str().map(str::to_string)
}

#[test]
fn an_agent_whose_address_changes_gets_its_endpoint_resolved_again() {
    // `:port` endpoints are resolved against the address the tunnel comes
    // from. A NAT that rebinds moves the agent to a new address; the server
    // must not keep probing (and pointing DNS at) the old one as the node's.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), CONFIG).unwrap();
    let relay = edge_tests::faults::UdpRelay::start(server.addrs.quic).unwrap();
    let mut ticket = edge_proto::join::JoinTicket::parse(&server.add_node("n1").unwrap()).unwrap();
    ticket.server = relay.addr.to_string();
    let upstream = rt.block_on(upstreams::http("hello"));
    let port = free_port().unwrap();
    let agent = Agent::spawn_with_config(
        &dir.path().join("agent"),
        &ticket.to_string(),
        upstream,
        &format!(
            "connections = 1\ndirect_listen = \"0.0.0.0:{port}\"\npublic_endpoint = \":{port}\"\n\
             [tunnel]\nidle_timeout_secs = 3\nkeep_alive_secs = 1\n[reconnect]\ninitial_ms = 200\nmax_ms = 1000\n"
        ),
    )
    .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    wait_mode(&server, "n1", "direct", Duration::from_secs(10));
    assert_eq!(endpoint_of(&server, "n1").as_deref(), Some(format!("127.0.0.1:{port}").as_str()));

    // The NAT in front of the agent now maps it to 127.0.0.2.
    relay.rebind("127.0.0.2".parse().unwrap());
    let moved = format!("127.0.0.2:{port}");
    wait_for("the endpoint resolved at the new address", Duration::from_secs(20), || {
        (endpoint_of(&server, "n1").as_deref() == Some(moved.as_str())).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}\nserver log:\n{}", node_json(&server, "n1"), server.proc.log_text()));
    // And the new address is the one probed and verified.
    wait_for("a verified probe of the new address", Duration::from_secs(10), || {
        let samples = node_json(&server, "n1")["samples"].clone();
        samples.as_array()?.iter().any(|s| s["endpoint"] == moved.as_str() && s["ok"] == true).then_some(())
    })
    .unwrap();
    assert_eq!(node_json(&server, "n1")["mode"], "direct");
}

#[test]
fn endpoints_that_are_the_server_itself_are_never_probed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), CONFIG).unwrap();
    let upstream = rt.block_on(upstreams::http("hello"));
    let tls = server.addrs.tls.port();
    let api = server.addrs.api.port();
    let http = server.addrs.http.unwrap().port();
    // Each shape an agent could use to point the server at itself.
    let shapes = [
        format!("127.0.0.1:{tls}"),
        format!("[::ffff:127.0.0.1]:{tls}"),
        format!("127.0.0.1:{http}"),
        format!("127.0.0.1:{api}"),
        format!(":{tls}"),
        ":0".to_string(),
        "0.0.0.0:9".to_string(),
        "169.254.0.1:443".to_string(),
        "224.0.0.1:443".to_string(),
    ];
    let mut agents = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let name = format!("self{i}");
        let join = server.add_node(&name).unwrap();
        let agent = Agent::start(
            &dir.path().join(&name),
            &join,
            upstream,
            &["--direct-listen", "127.0.0.1:0", "--public-endpoint", shape],
        );
        // The agent itself may refuse a shape it can tell is unusable.
        if let Ok(agent) = agent {
            agents.push((name, shape.clone(), agent));
        }
    }
    assert!(agents.len() >= 5, "most shapes reach the server: {}", agents.len());
    // Several probe rounds (300 ms each).
    std::thread::sleep(Duration::from_secs(2));
    for (name, shape, _agent) in &agents {
        let node = node_json(&server, name);
        assert_eq!(node["mode"], "proxy", "{shape}: {node}");
        assert!(node["endpoint"].is_null(), "{shape} must not be kept as an endpoint: {node}");
        assert!(node["samples"].as_array().unwrap().is_empty(), "{shape} must never be probed: {node}");
    }
    let log = server.proc.log_text();
    assert!(log.matches("ignoring the agent's endpoint").count() >= agents.len(), "{log}");
}
