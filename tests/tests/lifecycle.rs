//! Agent and server restarts, node removal, bad credentials.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server, ZONE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_comes_back_and_server_restart_keeps_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let server_dir = tmp.path().join("server");
    let mut server = Server::start(&server_dir, "[limits]\ndrain_timeout_secs = 2").unwrap();
    let join = server.add_node("web").unwrap();
    let upstream = upstreams::http("web says hi").await;
    let agent_dir = tmp.path().join("agent");
    let mut agent = Agent::start(&agent_dir, &join, upstream, &[]).unwrap();
    let ca = agent.local_ca("web");
    let host = format!("web.{ZONE}");
    assert_eq!(server.fetch(&ca, &host).await.unwrap(), "web says hi");

    // SIGKILL: no goodbye. The restarted agent's new tunnel serves at once,
    // even though the server has not yet noticed the old one is dead.
    agent.proc.signal("KILL");
    agent.proc.wait_exit(Duration::from_secs(5)).unwrap();
    let restarted = Instant::now();
    agent = Agent::start(&agent_dir, &join, upstream, &[]).unwrap();
    let body = wait_for("traffic after agent restart", Duration::from_secs(15), || {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(server.fetch(&ca, &host))).ok()
    })
    .unwrap();
    assert_eq!(body, "web says hi");
    eprintln!("agent restart to first good request: {:?}", restarted.elapsed());

    // Server restart on the same ports: the agent reconnects by itself and
    // the node and its token survive (the same join string keeps working).
    let addrs = server.addrs;
    server.proc.signal("TERM");
    let status = server.proc.wait_exit(Duration::from_secs(10)).expect("server exits on SIGTERM");
    assert!(status.success(), "clean exit after drain: {status:?}");
    server = Server::start_on(&server_dir, "[limits]\ndrain_timeout_secs = 2", Some(addrs)).unwrap();
    let body = wait_for("traffic after server restart", Duration::from_secs(30), || {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(server.fetch(&ca, &host))).ok()
    })
    .unwrap();
    assert_eq!(body, "web says hi");
    assert!(agent.proc.alive());
    let list = server.cli(&["node", "list", "--json"]).unwrap();
    let nodes: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(nodes[0]["name"], "web");
    // Both of the agent's connections came back (2 before, 2 after).
    let connects = edge_tests::metric(&agent.metrics().unwrap(), "edge_agent_connects_total").unwrap();
    assert!(connects >= 3.0, "connects_total = {connects}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_node_is_cut_and_cannot_return() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("gone").unwrap();
    let upstream = upstreams::http("x").await;
    let mut agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();

    server.cli(&["node", "remove", "gone"]).unwrap();
    // The live tunnel is cut and the agent stops with a clear message.
    let status = agent.proc.wait_exit(Duration::from_secs(10)).expect("agent exits after removal");
    assert_eq!(status.code(), Some(2));
    assert!(agent.proc.log_text().contains("this node was removed"), "{}", agent.proc.log_text());
    let (code, _) = {
        let config = clients::client_config(&agent.local_ca("gone")).unwrap();
        let r = clients::https_get(server.addrs.tls, &format!("gone.{ZONE}"), config, "/").await;
        (r.is_err(), ())
    };
    assert!(code, "removed node's name no longer routes");

    // Its old token does not work any more.
    let mut again = Agent::spawn(&tmp.path().join("agent2"), &join, upstream, &[]).unwrap();
    let status = again.proc.wait_exit(Duration::from_secs(10)).expect("agent with a dead token exits");
    assert_eq!(status.code(), Some(2));
    assert!(again.proc.log_text().contains("server refused the node token"), "{}", again.proc.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_or_fingerprint_is_a_clear_error_not_a_retry_storm() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("n1").unwrap();
    let upstream = upstreams::http("x").await;

    // Wrong secret, right node name.
    let ticket = edge_proto::join::JoinTicket::parse(&join).unwrap();
    let mut bad = ticket.clone();
    bad.token = edge_proto::join::make_token("n1", &[0u8; 32]);
    let start = Instant::now();
    let mut agent = Agent::spawn(&tmp.path().join("a1"), &bad.to_string(), upstream, &[]).unwrap();
    let status = agent.proc.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(2));
    assert!(start.elapsed() < Duration::from_secs(5));
    let log = agent.proc.log_text();
    assert!(log.contains("server refused the node token") && log.contains("invalid node token"), "{log}");
    // Exactly one attempt reached the server.
    let failures = metric(&server.metrics().unwrap(), "edge_agent_auth_failures_total").unwrap();
    assert_eq!(failures, 1.0);

    // Wrong fingerprint: the agent refuses the server and says why.
    let mut wrong_fp = ticket.clone();
    wrong_fp.fingerprint = Some([0x42; 32]);
    let mut agent = Agent::spawn(&tmp.path().join("a2"), &wrong_fp.to_string(), upstream, &[]).unwrap();
    let status = agent.proc.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(2));
    let log = agent.proc.log_text();
    // It names the fingerprint the server really presented.
    let real = edge_proto::join::hex(&ticket.fingerprint.unwrap());
    assert!(log.contains("pins a different one") && log.contains(&real), "{log}");

    // Nothing reached the node's route.
    let m = server.metrics().unwrap();
    assert_eq!(metric(&m, "edge_tunnels_connected"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_connections_and_refuses_new_ones() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("server"), "[limits]\ndrain_timeout_secs = 20").unwrap();
    let join = server.add_node("drain").unwrap();
    let echo = upstreams::echo().await;
    let agent = Agent::start(&tmp.path().join("agent"), &join, echo, &[]).unwrap();
    let config = clients::client_config(&agent.local_ca("drain")).unwrap();
    let mut tls = clients::connect(server.addrs.tls, &format!("drain.{ZONE}"), config).await.unwrap();
    tls.write_all(b"first half, ").await.unwrap();

    server.proc.signal("TERM");
    // New connections are refused once the listener stops accepting.
    wait_for("listener closed", Duration::from_secs(5), || {
        std::net::TcpStream::connect(server.addrs.tls).is_err().then_some(())
    })
    .unwrap();
    assert!(server.proc.alive(), "still draining the open connection");

    tokio::time::sleep(Duration::from_millis(500)).await;
    tls.write_all(b"second half").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, b"first half, second half");
    let status = server.proc.wait_exit(Duration::from_secs(10)).expect("exits once drained");
    assert!(status.success());
    assert!(server.proc.log_text().contains("draining connections"));
}
