//! Raw TCP services end to end, over real processes: a port of the
//! server's own spliced to a target the agent declares, data verified by
//! hash, a target the agent does not declare refused, and the service
//! still there after a server restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use edge_tests::pebble::free_port;
use edge_tests::{upstreams, wait_for, Agent, Server};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DRAIN: &str = "[limits]\ndrain_timeout_secs = 2";

/// Sends `bytes` of a pattern through `addr` (an echo behind it) and
/// returns the hashes of what was sent and what came back.
async fn echo_once(addr: SocketAddr, seed: u8, bytes: usize) -> anyhow::Result<([u8; 32], [u8; 32])> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut r, mut w) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = Sha256::new();
        let mut left = bytes;
        while left > 0 {
            let chunk: Vec<u8> =
                (0..left.min(64 * 1024)).map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed)).collect();
            w.write_all(&chunk).await?;
            sent.update(&chunk);
            left -= chunk.len();
        }
        w.shutdown().await?;
        anyhow::Ok(<[u8; 32]>::from(sent.finalize()))
    });
    let mut got = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
        total += n;
    }
    anyhow::ensure!(total == bytes, "{total} of {bytes} bytes came back");
    Ok((writer.await??, got.finalize().into()))
}

/// Whether a connection to `addr` is closed without any byte coming back
/// after it sent some.
async fn refused(addr: SocketAddr) -> bool {
    let Ok(mut tcp) = TcpStream::connect(addr).await else { return true };
    let _ = tcp.write_all(b"hello?").await;
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_service_splices_verified_bytes_refuses_undeclared_targets_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let server_dir = tmp.path().join("server");
    let mut server = Server::start(&server_dir, DRAIN).unwrap();
    let join = server.add_node("web1").unwrap();
    let echo = upstreams::echo().await;
    let web = upstreams::http("web\n").await;
    let agent = Agent::spawn_with_config(
        &tmp.path().join("agent"),
        &join,
        web,
        &format!("[[services]]\nname = \"echo\"\ntarget = \"{echo}\"\n"),
    )
    .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();

    let port = free_port().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let out = server
        .cli_output(&[
            "service",
            "add",
            "echo-web1",
            "--node",
            "web1",
            "--listen",
            &listen.to_string(),
            "--target",
            "echo",
        ])
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Refusals name the field.
    for (args, field) in [
        (vec!["service", "add", "Bad", "--node", "web1", "--listen", ":1", "--target", "echo"], "name"),
        (vec!["service", "add", "x", "--node", "nope", "--listen", "127.0.0.1:1", "--target", "echo"], "node"),
        (vec!["service", "add", "y", "--node", "web1", "--listen", "nowhere", "--target", "echo"], "listen"),
        (
            vec!["service", "add", "z", "--node", "web1", "--listen", "127.0.0.1:1", "--target", "127.0.0.1:22"],
            "target",
        ),
    ] {
        let out = server.cli_output(&args).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains(field), "{args:?}: {err}");
    }
    let tls_port = server.addrs.tls.to_string();
    let out = server
        .cli_output(&["service", "add", "w", "--node", "web1", "--listen", &tls_port, "--target", "echo"])
        .unwrap();
    assert!(!out.status.success(), "the server's own TLS port is refused");

    wait_for("the service listener", Duration::from_secs(10), || std::net::TcpStream::connect(listen).ok()).unwrap();

    // 200 connections of 1 MiB each, 20 at a time, every byte verified.
    let started = std::time::Instant::now();
    for batch in 0..10u8 {
        let runs: Vec<_> = (0..20u8).map(|i| echo_once(listen, batch * 20 + i, 1 << 20)).collect();
        for (i, r) in futures_util::future::join_all(runs).await.into_iter().enumerate() {
            let (sent, got) = r.unwrap_or_else(|e| panic!("batch {batch} connection {i}: {e}"));
            assert_eq!(sent, got, "batch {batch} connection {i} intact");
        }
    }
    eprintln!("200 x 1 MiB through the TCP service in {:?}", started.elapsed());

    // A target the agent does not declare: the server can name it, the
    // agent refuses, the client is closed with nothing.
    let port2 = free_port().unwrap();
    let sneaky: SocketAddr = format!("127.0.0.1:{port2}").parse().unwrap();
    server
        .cli(&["service", "add", "sneaky", "--node", "web1", "--listen", &sneaky.to_string(), "--target", "ssh"])
        .unwrap();
    wait_for("the second listener", Duration::from_secs(10), || std::net::TcpStream::connect(sneaky).ok()).unwrap();
    assert!(refused(sneaky).await, "an undeclared target is refused");
    wait_for("the agent's refusal", Duration::from_secs(5), || {
        agent.proc.log_text().contains("does not declare").then_some(())
    })
    .unwrap();

    // Listed, shown with the node, and removable.
    let list = server.cli(&["service", "list"]).unwrap();
    assert!(list.contains("echo-web1") && list.contains(&listen.to_string()) && list.contains("sneaky"), "{list}");
    let show = server.cli(&["node", "show", "web1"]).unwrap();
    assert!(show.contains("echo-web1") && show.contains("target echo"), "{show}");
    server.cli(&["service", "remove", "sneaky"]).unwrap();
    wait_for("the removed listener closes", Duration::from_secs(10), || {
        std::net::TcpStream::connect(sneaky).is_err().then_some(())
    })
    .unwrap();

    // After a restart the service listens again, from the store.
    let addrs = server.addrs;
    server.proc.signal("TERM");
    assert!(server.proc.wait_exit(Duration::from_secs(15)).is_some(), "server exits on SIGTERM");
    assert!(std::net::TcpStream::connect(listen).is_err(), "closed while the server is down");
    server = Server::start_on(&server_dir, DRAIN, Some(addrs)).unwrap();
    let (sent, got) = wait_for("the service after the restart", Duration::from_secs(30), || {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(echo_once(listen, 7, 64 * 1024))).ok()
    })
    .unwrap();
    assert_eq!(sent, got);
    let audit = server.cli(&["audit", "--action", "service.create"]).unwrap();
    assert!(audit.contains("echo-web1"), "{audit}");
    drop(server);
}
