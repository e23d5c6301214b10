//! Readers that stop reading must not stall a node's tunnel for everybody.
//! A QUIC connection's receive window is shared by its streams, and unread
//! bytes hold it: without shedding, about 64 clients that request a large
//! download and never read it (two tunnels × 32 MiB / 1 MiB) stall every
//! connection to the node, new ones included; the same goes for uploads to
//! an upstream that stopped reading, on the agent's side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server, ZONE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Stalled connections opened by each test: well past what stalls a node
/// without shedding (64).
const STALLED: usize = 150;

struct Node {
    _tmp: tempfile::TempDir,
    server: Server,
    agent: Agent,
    host: String,
    tls: Arc<rustls::ClientConfig>,
}

async fn node() -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("web").unwrap();
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstreams::bench().await, &[]).unwrap();
    let tls = clients::client_config(&agent.local_ca("web")).unwrap();
    Node { _tmp: tmp, server, agent, host: format!("web.{ZONE}"), tls }
}

/// Five 1 MiB downloads one after another, each within 10 s; returns the
/// slowest.
async fn downloads_still_work(node: &Node, what: &str) -> Duration {
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let start = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            let mut tls = clients::connect(node.server.addrs.tls, &node.host, node.tls.clone()).await?;
            tls.write_all(format!("BLAST {}\n", 1 << 20).as_bytes()).await?;
            let mut all = Vec::new();
            tls.read_to_end(&mut all).await?;
            anyhow::Ok(all.len())
        })
        .await;
        assert!(matches!(got, Ok(Ok(n)) if n == 1 << 20), "download {i} with {STALLED} {what}: {got:?}");
        slowest = slowest.max(start.elapsed());
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_download_are_shed_not_the_tunnel() {
    let node = node().await;
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut tls = clients::connect(node.server.addrs.tls, &node.host, node.tls.clone()).await.unwrap();
        tls.write_all(format!("BLAST {}\n", 64 << 20).as_bytes()).await.unwrap();
        stalled.push(tls);
    }
    // Let the downloads fill every window they can, then stall.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let slowest = downloads_still_work(&node, "non-reading downloads").await;
    let shed = wait_for("shed connections in the server's metrics", Duration::from_secs(10), || {
        metric(&node.server.metrics().ok()?, "edge_node_connections_shed_total{node=\"web\"}").filter(|n| *n > 0.0)
    })
    .unwrap();
    println!(
        "slow_readers: {STALLED} non-reading downloads, {shed} shed by the server; slowest 1 MiB download {slowest:?}"
    );
    // Shedding takes the longest-stalled first and keeps at most 24 per
    // tunnel; the rest stay open.
    assert!(shed <= STALLED as f64);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_to_an_upstream_that_stopped_reading_are_shed_not_the_tunnel() {
    let node = node().await;
    let mut uploads = tokio::task::JoinSet::new();
    for _ in 0..STALLED {
        let mut tls = clients::connect(node.server.addrs.tls, &node.host, node.tls.clone()).await.unwrap();
        uploads.spawn(async move {
            // The upstream reads "STALL\n" and nothing more; these writes
            // block once every buffer on the way is full.
            let _ = tls.write_all(b"STALL\n").await;
            let _ = tls.write_all(&vec![7u8; 8 << 20]).await;
            tls
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let slowest = downloads_still_work(&node, "uploads to a stalled upstream").await;
    let shed = wait_for("shed streams in the agent's metrics", Duration::from_secs(10), || {
        metric(&node.agent.metrics().ok()?, "edge_agent_streams_shed_total").filter(|n| *n > 0.0)
    })
    .unwrap();
    println!("slow_readers: {STALLED} uploads to a stalled upstream, {shed} shed by the agent; slowest 1 MiB download {slowest:?}");
    uploads.abort_all();
}
