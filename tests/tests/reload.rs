//! Reloading the config without a restart: `edge-server reload` (SIGHUP)
//! lowers `per_source_rate` for new connections while 100 open transfers
//! through the tunnel finish intact; a file that does not validate is
//! refused, naming the field, and the running config stays in force.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server, ZONE};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TRANSFERS: usize = 100;
const CHUNK: usize = 16 * 1024;
const CHUNKS: usize = 16;

/// One transfer: `CHUNKS` chunks written slowly through the tunnel to the
/// echo upstream; true when every byte came back in order.
async fn transfer(
    tls: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    seed: u8,
    opened: Arc<tokio::sync::Barrier>,
) -> bool {
    let stream = clients::connect(tls, &format!("n1.{ZONE}"), config).await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    opened.wait().await;
    let writer = tokio::spawn(async move {
        let mut sent = Sha256::new();
        for i in 0..CHUNKS {
            let chunk: Vec<u8> = (0..CHUNK).map(|j| (j as u8) ^ seed ^ (i as u8)).collect();
            sent.update(&chunk);
            w.write_all(&chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        w.flush().await.unwrap();
        sent.finalize()
    });
    let mut got = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    while total < CHUNK * CHUNKS {
        match tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(n)) => {
                got.update(&buf[..n]);
                total += n;
            }
        }
    }
    writer.await.unwrap() == got.finalize()
}

/// Whether a new TLS connection from `source` gets its ClientHello through
/// (a refused one is reset at accept).
async fn new_connection_ok(tls: SocketAddr, source: IpAddr, config: Arc<rustls::ClientConfig>) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let Ok(tcp) = socket.connect(tls).await else { return false };
    let name = rustls::pki_types::ServerName::try_from(format!("n1.{ZONE}")).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    matches!(tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_lowers_the_rate_for_new_connections_while_open_transfers_finish() {
    edge_net::raise_fd_limit();
    let tmp = tempfile::tempdir().unwrap();
    let limits = "[limits]\nper_source_rate = 1000\nper_source_burst = 1000\nper_source_max_open = 0\n";
    let mut server = Server::start(&tmp.path().join("server"), limits).unwrap();
    let join = server.add_node("n1").unwrap();
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstreams::echo().await, &[]).unwrap();
    let config = clients::client_config(&agent.local_ca("n1")).unwrap();
    let tls = server.addrs.tls;

    let opened = Arc::new(tokio::sync::Barrier::new(TRANSFERS + 1));
    let mut transfers = tokio::task::JoinSet::new();
    for i in 0..TRANSFERS {
        transfers.spawn(transfer(tls, config.clone(), i as u8, opened.clone()));
    }
    opened.wait().await;

    // Lower the rate in the file and reload through the CLI.
    let text = std::fs::read_to_string(&server.config).unwrap();
    let lowered = text
        .replace("per_source_rate = 1000", "per_source_rate = 1")
        .replace("per_source_burst = 1000", "per_source_burst = 1");
    assert_ne!(text, lowered);
    std::fs::write(&server.config, &lowered).unwrap();
    server.cli(&["reload"]).unwrap();
    wait_for("the reload is logged", Duration::from_secs(10), || {
        server.proc.log_text().contains("config reloaded").then_some(())
    })
    .unwrap();
    assert!(server.proc.log_text().contains("applied=[\"limits\"]"), "{}", server.proc.log_text());

    // New connections from one source: a burst of one, then one a second.
    let source: IpAddr = [127, 0, 0, 9].into();
    let mut admitted = 0;
    for _ in 0..6 {
        if new_connection_ok(tls, source, config.clone()).await {
            admitted += 1;
        }
    }
    assert!(admitted <= 2, "the lowered rate admitted {admitted} of 6 rapid connections");

    // Meanwhile every open transfer finished intact.
    let mut intact = 0;
    while let Some(ok) = transfers.join_next().await {
        if ok.unwrap() {
            intact += 1;
        }
    }
    assert_eq!(intact, TRANSFERS, "open transfers were disturbed by the reload");
    assert!(agent.wait_ready(Duration::from_secs(1)).is_ok(), "the tunnel stayed up");

    // A file that does not validate is refused by the CLI, naming the
    // field, and by the server on SIGHUP; the lowered rate stays.
    let broken = lowered.replace("per_source_rate = 1\n", "per_source_rate = 1000\nper_source_rat = 5\n");
    std::fs::write(&server.config, broken).unwrap();
    let out = server.cli_output(&["reload"]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("per_source_rat"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.proc.signal("HUP");
    wait_for("the refusal is logged", Duration::from_secs(10), || {
        server.proc.log_text().contains("reload refused").then_some(())
    })
    .unwrap();
    let log = server.proc.log_text();
    let refusal = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(refusal.contains("per_source_rat"), "the log names the field: {refusal}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let source: IpAddr = [127, 0, 0, 10].into();
    let mut admitted = 0;
    for _ in 0..6 {
        if new_connection_ok(tls, source, config.clone()).await {
            admitted += 1;
        }
    }
    assert!(admitted <= 2, "the refused file took effect: {admitted} of 6 admitted");
    let metrics = edge_tests::http_get(server.addrs.metrics.unwrap(), "/metrics").unwrap().1;
    let refused = metric(&metrics, "edge_refusals_total{listener=\"tls\",reason=\"rate\"}").unwrap_or(0.0);
    assert!(refused >= 8.0, "rate refusals counted: {refused}");
    assert!(server.proc.alive(), "a reload never stops the server");
}
