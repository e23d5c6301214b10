//! Path MTU: the tunnel grows its datagrams to what the path carries. On
//! loopback that is the configured bound (6500 by default), with every byte
//! intact and next to no loss; behind a path that drops anything over 1472
//! bytes (a 1500-byte MTU), discovery settles below that and data flows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use edge_proto::join::JoinTicket;
use edge_tests::faults::UdpRelay;
use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server, ZONE};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `len` random bytes through the tunnel to an echo upstream and
/// checks that exactly the same bytes come back.
async fn echo_through(tls_addr: SocketAddr, ca: &Path, host: &str, len: usize) {
    let mut payload = vec![0u8; len];
    rand::rng().fill_bytes(&mut payload);
    let tls = clients::connect(tls_addr, host, clients::client_config(ca).unwrap()).await.unwrap();
    let (mut r, mut w) = tokio::io::split(tls);
    let writer = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async {
        let mut back = Vec::with_capacity(len);
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(writer, reader) })
        .await
        .expect("echo within 60 s");
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");
}

/// The agent's tunnel path metrics once the MTU has stopped changing
/// (metrics refresh every second): (MTU, lost packets).
fn settled_path(agent: &Agent) -> (f64, f64) {
    let read = || {
        let text = agent.metrics().ok()?;
        Some((metric(&text, "edge_agent_path_mtu_bytes")?, metric(&text, "edge_agent_lost_packets")?))
    };
    let mut last = (0.0, 0.0);
    wait_for("path MTU unchanged over 3 s", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_secs(3));
        let now = read()?;
        let settled = now.0 == last.0 && now.0 > 0.0;
        last = now;
        settled.then_some(now)
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_tunnel_grows_datagrams_to_the_bound_without_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("big").unwrap();
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstreams::echo().await, &[]).unwrap();
    let (ca, host) = (agent.local_ca("big"), format!("big.{ZONE}"));
    for _ in 0..2 {
        echo_through(server.addrs.tls, &ca, &host, 32 << 20).await;
    }
    let (mtu, lost) = tokio::task::block_in_place(|| settled_path(&agent));
    println!("path_mtu: loopback settled at {mtu} bytes, {lost} packets lost after 64 MiB each way");
    assert_eq!(mtu, 6500.0, "discovery reaches the default bound on loopback");
    // Batches that do not fit one UDP send would be lost by the thousand.
    assert!(lost < 100.0, "{lost} packets lost on loopback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_with_a_1500_byte_mtu_settles_below_it() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let relay = UdpRelay::start(server.addrs.quic).unwrap();
    // 1500-byte IPv4 MTU: 1472 bytes of UDP payload.
    relay.set_max_datagram(1472);
    let mut ticket = JoinTicket::parse(&server.add_node("small").unwrap()).unwrap();
    ticket.server = relay.addr.to_string();
    let agent = Agent::start(&tmp.path().join("agent"), &ticket.to_string(), upstreams::echo().await, &[]).unwrap();
    let (ca, host) = (agent.local_ca("small"), format!("small.{ZONE}"));
    echo_through(server.addrs.tls, &ca, &host, 8 << 20).await;
    let (mtu, lost) = tokio::task::block_in_place(|| settled_path(&agent));
    println!(
        "path_mtu: 1500-byte path settled at {mtu} bytes ({} oversized probes dropped, {lost} packets lost)",
        relay.oversized()
    );
    assert!(relay.oversized() > 0, "discovery probed above the path MTU");
    assert!((1300.0..=1472.0).contains(&mtu), "MTU {mtu} must settle just below the path's 1472");
    // Traffic keeps flowing at the settled size.
    echo_through(server.addrs.tls, &ca, &host, 8 << 20).await;
}
