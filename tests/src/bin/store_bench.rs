//! `edge-store-bench`: the state layer at scale, SQLite and PostgreSQL side
//! by side in one run. For each store: seed N nodes, start a real
//! `edge-server` on it, and measure start time (spawn to listening, and
//! the load the server logs), memory, and change propagation: a node added
//! by this process (another process than the server) until the server's
//! DNS answers for it, which it does once the route and the zone hold it.
//!
//! `cargo build --release --workspace --bins && target/release/edge-store-bench`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use edge_server::store::{self, NodeRecord, Snapshot, StoreConfig};
use edge_tests::postgres::Postgres;
use edge_tests::{rss_kib, Server, ZONE};

/// Benchmark the stores behind edge-server.
#[derive(Debug, Parser)]
struct Args {
    /// Nodes in the store before the server starts.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Nodes added while the server runs, one at a time, each timed.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Each change waits a random 0 to this many ms after the previous one
    /// was seen, so writes do not fall in step with SQLite's poll.
    #[arg(long, default_value_t = 500)]
    spread_ms: u64,
}

struct Row {
    name: String,
    start_s: f64,
    load_ms: f64,
    rss_mib: f64,
    peak_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// A DNS query for `name` A; whether the answer is NOERROR with an answer.
fn resolves(socket: &UdpSocket, server: SocketAddr, name: &str, id: u16) -> bool {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if socket.send_to(&q, server).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, _)) if n >= 12 && buf[..2] == id.to_be_bytes() => {
                let rcode = buf[3] & 0x0f;
                let answers = u16::from_be_bytes([buf[6], buf[7]]);
                return rcode == 0 && answers > 0;
            }
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
    false
}

fn seed(nodes: usize) -> Snapshot {
    let now = edge_server::unix_now();
    let nodes = (0..nodes)
        .map(|i| {
            let name = format!("n{i:05}");
            let hosts = edge_proto::names::node_hostnames(&name, ZONE);
            NodeRecord::new(&name, &hosts, &edge_server::token_hash(&name), now)
        })
        .collect();
    Snapshot { nodes, ..Default::default() }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn measure(name: &str, section: &str, config: StoreConfig, args: &Args) -> Result<Row> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("server");
    std::fs::create_dir_all(dir.join("data"))?;
    let seeded = Instant::now();
    let writer = store::open(&config, &dir.join("data")).await.context("opening the store")?;
    writer.import(&seed(args.nodes)).await?;
    eprintln!("{name}: seeded {} nodes in {:.1} s", args.nodes, seeded.elapsed().as_secs_f64());
    let extra = format!(
        "{section}\n[dns]\nlisten = \"127.0.0.1:0\"\naddresses = [\"127.0.0.1\"]\n[limits]\ndns_per_source_rate = 0\n"
    );
    let started = Instant::now();
    let server = Server::start(&dir, &extra)?;
    let start_s = started.elapsed().as_secs_f64();
    let load_ms = server
        .proc
        .log_text()
        .lines()
        .find(|l| l.contains("loaded routing state"))
        .and_then(|l| l.split("ms=").nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    std::thread::sleep(Duration::from_secs(1));
    let (rss, _) = rss_kib(server.proc.child.id());
    let dns = server.addrs.dns.context("dns listener")?;
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut latencies = Vec::with_capacity(args.changes);
    for i in 0..args.changes {
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % args.spread_ms.max(1))).await;
        let node = format!("p{i:04}");
        let hosts = edge_proto::names::node_hostnames(&node, ZONE);
        let qname = format!("{node}.{ZONE}");
        let t0 = Instant::now();
        writer.add_node(&node, &hosts, &edge_server::token_hash(&node)).await?;
        let mut id = i as u16;
        while !resolves(&socket, dns, &qname, id) {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "{name}: {node} not routed after 10 s");
            id = id.wrapping_add(997);
            std::thread::sleep(Duration::from_millis(1));
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let (_, peak) = rss_kib(server.proc.child.id());
    latencies.sort_by(f64::total_cmp);
    Ok(Row {
        name: name.to_string(),
        start_s,
        load_ms,
        rss_mib: rss as f64 / 1024.0,
        peak_mib: peak as f64 / 1024.0,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(0.0),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let pg = Postgres::start()?;
    let rows = runtime.block_on(async {
        let mut rows = Vec::new();
        for poll in [500u64, 100] {
            let config = StoreConfig { poll_ms: poll, ..Default::default() };
            let section = format!("[store]\npoll_ms = {poll}\n");
            rows.push(measure(&format!("sqlite (poll {poll} ms)"), &section, config, &args).await?);
        }
        let url = pg.create_db("bench")?;
        let config = StoreConfig { url: Some(url), password_file: Some(pg.password_file()), ..Default::default() };
        rows.push(measure("postgres (LISTEN/NOTIFY)", &pg.store_section("bench"), config, &args).await?);
        anyhow::Ok(rows)
    })?;
    println!(
        "\n{} nodes, {} changes timed one at a time, 0-{} ms apart (write in this process → DNS answer of the server process)\n",
        args.nodes, args.changes, args.spread_ms
    );
    println!("| store | start to listening (s) | load (ms) | RSS after load (MiB) | peak RSS (MiB) | propagation p50 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.name, r.start_s, r.load_ms, r.rss_mib, r.peak_mib, r.p50_ms, r.p99_ms, r.max_ms
        );
    }
    Ok(())
}
