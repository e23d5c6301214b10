//! `edge-h3-bench`: HTTP/3 through the tunnel (client → edge-server's
//! `listen.quic_clients` → tunnel DATAGRAM frames → edge-agent's endpoint →
//! upstream) side by side with the same client speaking HTTP/3 directly to
//! the agent's own UDP socket (same endpoint code, certificate and
//! upstream, no server, no tunnel). Rounds alternate the two paths; the
//! table shows medians.
//!
//! `cargo build --release --workspace --bins && target/release/edge-h3-bench`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use edge_tests::h3client::{client_config, H3Client};
use edge_tests::load::median;
use edge_tests::{cpu_seconds, metric, upstreams, Agent, Server, ZONE};

/// Benchmark HTTP/3 through the tunnel against HTTP/3 direct to the agent.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds of the requests phase.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// MiB per download in the bulk phase (4 downloads at once on one
    /// connection).
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Concurrent request loops in the requests phase (over 4 connections).
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Rounds, each measuring direct then tunnel.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Debug, Default, Clone)]
struct Row {
    bulk_mbps: Vec<f64>,
    rps: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    cpu_us_per_request: Vec<f64>,
}

async fn bulk(target: SocketAddr, name: &str, config: &quinn::ClientConfig, mib: usize) -> Result<f64> {
    let client = Arc::new(H3Client::connect(target, name, config.clone()).await?);
    let started = Instant::now();
    let mut downloads = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, name) = (client.clone(), name.to_string());
        downloads.spawn(async move { client.get(&name, &format!("/bytes/{}", mib << 20)).await });
    }
    let mut bytes = 0;
    while let Some(done) = downloads.join_next().await {
        let (status, body) = done??;
        anyhow::ensure!(status == 200 && body.len() == mib << 20, "download: status {status}, {} bytes", body.len());
        bytes += body.len();
    }
    let mbps = bytes as f64 / 1e6 / started.elapsed().as_secs_f64();
    if let Ok(client) = Arc::try_unwrap(client) {
        client.close().await;
    }
    Ok(mbps)
}

/// Requests/s and latency percentiles (µs) over `workers` loops.
async fn requests(
    target: SocketAddr,
    name: &str,
    config: &quinn::ClientConfig,
    workers: usize,
    length: Duration,
) -> Result<(f64, f64, f64, usize)> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Arc::new(H3Client::connect(target, name, config.clone()).await?));
    }
    let until = Instant::now() + length;
    let mut loops = tokio::task::JoinSet::new();
    for i in 0..workers {
        let (client, name) = (clients[i % clients.len()].clone(), name.to_string());
        loops.spawn(async move {
            let mut times = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let (status, _) = client.get(&name, "/bytes/100").await?;
                anyhow::ensure!(status == 200, "status {status}");
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok::<_, anyhow::Error>(times)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = loops.join_next().await {
        all.extend(done??);
    }
    for client in clients {
        if let Ok(client) = Arc::try_unwrap(client) {
            client.close().await;
        }
    }
    all.sort_by(f64::total_cmp);
    let pct =
        |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0.0);
    Ok((all.len() as f64 / length.as_secs_f64(), pct(0.50), pct(0.99), all.len()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let server = Server::start(&dir.path().join("server"), "")?;
    let join = server.add_node("bench")?;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let upstream = upstreams::http_sized().await;
    let config_file = agent_dir.join("agent.toml");
    std::fs::write(
        &config_file,
        format!(
            "join = {join:?}\nupstream = \"{upstream}\"\ndirect_listen = \"127.0.0.1:0\"\n[http3]\nenabled = true\n"
        ),
    )?;
    let agent = Agent::spawn(&agent_dir, &join, upstream, &["--config", &config_file.to_string_lossy()])?;
    agent.wait_ready(Duration::from_secs(20))?;
    let name = format!("bench.{ZONE}");
    let config = client_config(&agent.local_ca("bench"))?;
    let tunnel = server.addrs.quic_clients.context("server has no quic_clients listener")?;
    let direct = agent.direct_addr().context("agent has no direct listener")?;
    let (server_pid, agent_pid) = (server.proc.child.id(), agent.proc.child.id());

    let mut rows = [Row::default(), Row::default()];
    for round in 0..args.rounds {
        for (i, (path, target)) in [("direct", direct), ("tunnel", tunnel)].into_iter().enumerate() {
            let mbps = bulk(target, &name, &config, args.mib).await.with_context(|| format!("{path} bulk"))?;
            let cpu = || cpu_seconds(server_pid) + cpu_seconds(agent_pid);
            let before = cpu();
            let (rps, p50, p99, n) = requests(target, &name, &config, args.workers, Duration::from_secs(args.seconds))
                .await
                .with_context(|| format!("{path} requests"))?;
            // The direct path has no server: its CPU is the agent's alone.
            let spent = cpu() - before;
            let row = &mut rows[i];
            row.bulk_mbps.push(mbps);
            row.rps.push(rps);
            row.p50_us.push(p50);
            row.p99_us.push(p99);
            row.cpu_us_per_request.push(spent * 1e6 / n.max(1) as f64);
            eprintln!(
                "round {}/{} {path}: bulk {mbps:.0} MB/s, {rps:.0} req/s, p50 {p50:.0} µs, p99 {p99:.0} µs",
                round + 1,
                args.rounds
            );
        }
    }
    println!("| HTTP/3 path | bulk MB/s (4 × {} MiB) | requests/s ({} loops) | p50 µs | p99 µs | server + agent CPU µs / request |", args.mib, args.workers);
    println!("|---|---:|---:|---:|---:|---:|");
    let direct_rps = median(rows[0].rps.clone());
    let direct_bulk = median(rows[0].bulk_mbps.clone());
    for (path, row) in [("direct to the agent", &rows[0]), ("through the server's tunnel", &rows[1])] {
        let (bulk, rps) = (median(row.bulk_mbps.clone()), median(row.rps.clone()));
        println!(
            "| {path} | {bulk:.0} ({:.2}) | {rps:.0} ({:.2}) | {:.0} | {:.0} | {:.1} |",
            bulk / direct_bulk,
            rps / direct_rps,
            median(row.p50_us.clone()),
            median(row.p99_us.clone()),
            median(row.cpu_us_per_request.clone()),
        );
    }
    // Datagrams lost inside the path (each one a retransmission for the
    // client's or the node's QUIC).
    let server_metrics = server.metrics()?;
    let agent_metrics = agent.metrics()?;
    let get = |text: &str, series: &str| metric(text, series).unwrap_or(0.0);
    println!(
        "\ntunnel datagrams dropped: server→agent {:.0} (tunnel refused), agent→server {:.0}; answers refused {:.0}; \
         carried: {:.0} to the node, {:.0} to clients; on frame streams (too large for a DATAGRAM frame): \
         {:.0} to the node, {:.0} to clients",
        get(&server_metrics, "edge_quic_client_dropped_total{reason=\"tunnel_refused\"}"),
        get(&agent_metrics, "edge_agent_quic_client_datagrams_dropped_total"),
        get(&server_metrics, "edge_quic_client_dropped_total{reason=\"answer_refused\"}"),
        get(&server_metrics, "edge_quic_client_datagrams_total{direction=\"to_node\"}"),
        get(&server_metrics, "edge_quic_client_datagrams_total{direction=\"to_client\"}"),
        get(&server_metrics, "edge_quic_client_streamed_total{direction=\"to_node\"}"),
        get(&server_metrics, "edge_quic_client_streamed_total{direction=\"to_client\"}"),
    );
    Ok(())
}
