//! 1,000 concurrent connections through one tunnel, each carrying a distinct
//! random 1 MiB payload to an echo upstream and back, verified by hash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server, ZONE};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 1000;
const PAYLOAD: usize = 1024 * 1024;
/// Windows that let every stream stall at once without shedding. Shedding
/// (`edge_net::stall`, tested in slow_readers.rs) resets a stream whose
/// reader made no progress for 1 s once more than three quarters of the
/// connection window could be parked that way: 24 streams at the default
/// 32 MiB. This client's 1,000 tasks on 2 threads, sharing 2 cores with
/// both proxies, can leave that many readers unpolled for a second, which
/// once reset 22 of them in CI. 0.75 × 1.5 GiB / 1 MiB admits 1,152.
const TUNNEL: &str = "[tunnel]\nconnection_window = 1610612736\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_megabyte_echoes_return_unchanged() {
    edge_net::raise_fd_limit();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), TUNNEL).unwrap();
    let join = server.add_node("bulk").unwrap();
    let echo = upstreams::echo().await;
    let agent_dir = tmp.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent_config = agent_dir.join("agent.toml");
    std::fs::write(&agent_config, format!("join = {join:?}\nupstream = \"{echo}\"\n{TUNNEL}")).unwrap();
    let config_arg = agent_config.to_string_lossy().into_owned();
    let agent = Agent::start(&agent_dir, &join, echo, &["--config", &config_arg]).unwrap();
    let config = clients::client_config(&agent.local_ca("bulk")).unwrap();
    let server_fds_before = edge_tests::fd_count(server.proc.child.id());
    let agent_fds_before = edge_tests::fd_count(agent.proc.child.id());

    // Connections are opened together (a barrier holds the transfers until
    // all 1,000 handshakes are done), so they really are concurrent.
    let barrier = Arc::new(tokio::sync::Barrier::new(CONNECTIONS));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let config = config.clone();
        let barrier = barrier.clone();
        let addr = server.addrs.tls;
        tasks.spawn(async move {
            let mut payload = vec![0u8; PAYLOAD];
            rand::rng().fill_bytes(&mut payload);
            let sent = Sha256::digest(&payload);
            let host = format!("c{i}.bulk.{ZONE}");
            let tls = clients::connect(addr, &host, config).await;
            barrier.wait().await;
            let tls = tls.map_err(|e| format!("connection {i}: {e:#}"))?;
            let (mut r, mut w) = tokio::io::split(tls);
            let writer = async move {
                w.write_all(&payload).await?;
                w.shutdown().await
            };
            let reader = async move {
                let mut hasher = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0usize;
                loop {
                    let n = r.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    total += n;
                }
                Ok::<_, std::io::Error>((hasher.finalize(), total))
            };
            let (w, r) = tokio::join!(writer, reader);
            w.map_err(|e| format!("connection {i} write: {e}"))?;
            let (got, total) = r.map_err(|e| format!("connection {i} read: {e}"))?;
            if total != PAYLOAD || got != sent {
                return Err(format!("connection {i}: {total} bytes back, hash mismatch: {}", got != sent));
            }
            Ok(())
        });
    }
    let mut failures = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(240), async {
        while let Some(result) = tasks.join_next().await {
            if let Err(e) = result.unwrap() {
                failures.push(e);
            }
        }
    })
    .await;
    if all.is_err() || !failures.is_empty() {
        // Keep the logs of both processes for the report.
        eprintln!("logs kept in {}", tmp.keep().display());
    }
    assert!(all.is_ok(), "transfers did not finish in 240 s");
    assert!(failures.is_empty(), "{} of {CONNECTIONS} failed, first: {:?}", failures.len(), failures.first());

    // Afterwards nothing is left open on either side.
    wait_for("open streams back to zero", Duration::from_secs(20), || {
        let s = server.metrics().ok()?;
        let a = agent.metrics().ok()?;
        let server_open = metric(&s, "edge_node_connections_active{node=\"bulk\"}")?;
        let server_conns = metric(&s, "edge_connections_open")?;
        let agent_open = metric(&a, "edge_agent_open_streams")?;
        (server_open == 0.0 && server_conns == 0.0 && agent_open == 0.0).then_some(())
    })
    .unwrap();
    let s = server.metrics().unwrap();
    assert_eq!(metric(&s, "edge_node_connections_total{node=\"bulk\"}"), Some(CONNECTIONS as f64));
    let moved = metric(&s, "edge_node_bytes_to_node_total{node=\"bulk\"}").unwrap();
    assert!(moved >= (CONNECTIONS * PAYLOAD) as f64, "server counted {moved} bytes to node");
    // File descriptors are back near where they started (no leaked sockets).
    let server_fds = edge_tests::fd_count(server.proc.child.id());
    let agent_fds = edge_tests::fd_count(agent.proc.child.id());
    assert!(server_fds <= server_fds_before + 5, "server fds {server_fds_before} -> {server_fds}");
    assert!(agent_fds <= agent_fds_before + 5, "agent fds {agent_fds_before} -> {agent_fds}");
}
