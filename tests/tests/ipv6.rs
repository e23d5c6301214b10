//! The whole path over IPv6 loopback: a client over IPv6, the server
//! listening on `[::1]`, the agent dialing `[::1]` (the join string names
//! it), an upstream on `[::1]`, the probe of a `[::1]` endpoint and AAAA
//! answers for the node's names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use edge_tests::dns::dig;
use edge_tests::pebble::free_port;
use edge_tests::{upstreams, wait_for, Agent, Server, ZONE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_over_ipv6() {
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    if std::net::TcpListener::bind((v6, 0)).is_err() {
        // A host (or container) without IPv6 loopback: nothing to test.
        eprintln!("skipped: no ::1 on this host");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = "[dns]\nlisten = \"[::1]:0\"\naddress_ttl_secs = 1\n\
                  [modes]\nprobe_interval_ms = 300\nprobe_timeout_ms = 1000\n";
    let server = Server::start_at(&tmp.path().join("server"), config, v6).unwrap();
    for addr in [server.addrs.tls, server.addrs.quic, server.addrs.api, server.addrs.dns.unwrap()] {
        assert_eq!(addr.ip(), v6, "{addr}");
    }
    let join = server.add_node("web6").unwrap();
    assert!(join.contains(&format!("@[::1]:{}", server.addrs.quic.port())), "{join}");

    let upstream = upstreams::http_at("[::1]:0".parse().unwrap(), "hello over v6\n").await;
    let direct: SocketAddr = SocketAddr::new(v6, free_port().unwrap());
    let agent = Agent::start(
        &tmp.path().join("agent"),
        &join,
        upstream,
        &["--direct-listen", &direct.to_string(), "--public-endpoint", &direct.to_string()],
    )
    .unwrap();

    // The agent's tunnel comes from [::1] (it dialed the server over IPv6).
    let token = server.admin_token();
    let node = wait_for("the node connected", Duration::from_secs(10), || {
        let (_, body) = server.api_get("/api/nodes", Some(&token)).ok()?;
        let nodes: serde_json::Value = serde_json::from_str(&body).ok()?;
        nodes.as_array()?.iter().find(|n| n["name"] == "web6" && n["connected"] == true).cloned()
    })
    .unwrap();
    assert!(node["remote_addr"].as_str().unwrap().starts_with("[::1]:"), "{node}");

    // A client over IPv6, through the server and the tunnel.
    let host = format!("web6.{ZONE}");
    let port = server.addrs.tls.port();
    let out = Command::new("curl")
        .args(["-sS", "-6", "--max-time", "10", "--resolve", &format!("{host}:{port}:[::1]"), "--cacert"])
        .arg(agent.local_ca("web6"))
        .arg(format!("https://{host}:{port}/"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over v6\n", "{}", String::from_utf8_lossy(&out.stderr));

    // AAAA for the node's names and the nameserver, none of A.
    let dns = server.addrs.dns.unwrap();
    for name in [host.as_str(), "api.web6.edge.test", "ns.edge.test"] {
        let aaaa = dig(dns, name, "AAAA", false).unwrap();
        assert_eq!(aaaa.data("AAAA"), vec!["::1"], "{name}");
        assert!(dig(dns, name, "A", true).unwrap().data("A").is_empty(), "{name}");
    }

    // The [::1] endpoint is probed and verified: direct mode.
    let node = wait_for("direct mode at [::1]", Duration::from_secs(10), || {
        let (_, body) = server.api_get("/api/nodes", Some(&token)).ok()?;
        let nodes: serde_json::Value = serde_json::from_str(&body).ok()?;
        nodes.as_array()?.iter().find(|n| n["name"] == "web6" && n["mode"] == "direct").cloned()
    })
    .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.proc.log_text()));
    assert_eq!(node["endpoint"], direct.to_string());
    let samples = node["samples"].as_array().unwrap();
    assert!(samples.iter().any(|s| s["endpoint"] == direct.to_string() && s["ok"] == true), "{node}");
    // Clients reaching the node directly over IPv6 get the same answer.
    let out = Command::new("curl")
        .args(["-sS", "-6", "--max-time", "10", "--resolve", &format!("{host}:{}:[::1]", direct.port()), "--cacert"])
        .arg(agent.local_ca("web6"))
        .arg(format!("https://{host}:{}/", direct.port()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over v6\n", "{}", String::from_utf8_lossy(&out.stderr));
}
