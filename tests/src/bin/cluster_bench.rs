//! `edge-cluster-bench`: what a cluster of servers costs and how fast it
//! heals, in one run on loopback with the harness's own PostgreSQL.
//!
//! - Forwarding: the same node reached through a server with its own
//!   tunnel and through one the agent cannot reach (it forwards to a peer),
//!   side by side: bulk echo throughput and new-connection GET latency.
//! - Failover: a server killed until the others' DNS stops answering its
//!   address; the mode decider killed until another server holds the lease.
//! - Idle agents: server memory and UDP datagrams per idle agent connection.
//!
//! `cargo build --release --workspace --bins && target/release/edge-cluster-bench`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use edge_tests::dns::dig;
use edge_tests::faults::UdpRelay;
use edge_tests::postgres::Postgres;
use edge_tests::{clients, rss_kib, upstreams, wait_for, Agent, Server, ZONE};
use tokio::io::AsyncWriteExt;

/// Benchmark a cluster of edge-servers.
#[derive(Debug, Parser)]
struct Args {
    /// MiB echoed per connection in the throughput phase.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Parallel connections in the throughput phase.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// GETs (each a new TLS connection) per path in the latency phase.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Kill-and-measure rounds for each failover figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Idle agents in the per-agent cost phase.
    #[arg(long, default_value_t = 20)]
    agents: usize,
    /// Seconds the idle agents are watched.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
}

fn config(store: &str, n: u8, extra: &str) -> String {
    format!(
        "{store}\n[dns]\nlisten = \"127.0.0.{n}:0\"\nnameservers = [\"ns{n}.{ZONE}\"]\n\
         [cluster]\nname = \"edge-{n}\"\nlease_ms = 3000\nrenew_ms = 500\ndecider_lease_ms = 3000\n{extra}"
    )
}

fn host(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Echoes `mib` MiB on each of `connections` TLS connections through
/// `addr`; MB/s of payload one way.
async fn throughput(addr: SocketAddr, sni: &str, ca: &Path, mib: usize, connections: usize) -> Result<f64> {
    let config = clients::client_config(ca)?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (config, sni) = (config.clone(), sni.to_string());
        tasks.spawn(async move {
            let stream = clients::connect(addr, &sni, config).await?;
            let (mut r, mut w) = tokio::io::split(stream);
            let total = mib << 20;
            let writer = async move {
                let chunk = vec![0x5au8; 64 * 1024];
                let mut sent = 0;
                while sent < total {
                    w.write_all(&chunk).await?;
                    sent += chunk.len();
                }
                w.shutdown().await?;
                anyhow::Ok(())
            };
            let reader = async move {
                let got = edge_tests::load::read_to_end_counting(&mut r).await?;
                anyhow::ensure!(got == total, "echoed {got} of {total} bytes");
                anyhow::Ok(())
            };
            tokio::try_join!(writer, reader)?;
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok((mib * connections) as f64 * 1.048_576 / started.elapsed().as_secs_f64())
}

/// Milliseconds per GET on a new TLS connection, sorted.
async fn latencies(addr: SocketAddr, sni: &str, ca: &Path, requests: usize) -> Result<Vec<f64>> {
    let config = clients::client_config(ca)?;
    let mut out = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let (status, _) = clients::https_get(addr, sni, config.clone(), "/").await?;
        anyhow::ensure!(status == 200, "status {status}");
        out.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn status(server: &Server) -> serde_json::Value {
    serde_json::from_str(&server.cli(&["cluster", "status", "--json"]).unwrap()).unwrap()
}

fn holder(server: &Server) -> Option<String> {
    status(server)["decider"]["holder"].as_str().map(str::to_string)
}

fn server_id(server: &Server) -> String {
    std::fs::read_to_string(server.dir.join("data/server.id")).unwrap().trim().to_string()
}

/// UDP datagrams received by this host so far (every loopback datagram
/// is received once).
fn udp_datagrams() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InDatagrams")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let pg = Postgres::start()?;
    pg.create_db("edge")?;
    let store = pg.store_section("edge");
    let tmp = tempfile::tempdir()?;
    eprintln!("starting three servers on one PostgreSQL");
    let a = Server::start_at(&tmp.path().join("s1"), &config(&store, 1, ""), host(1))?;
    let b = Server::start_at(&tmp.path().join("s2"), &config(&store, 2, ""), host(2))?;
    // C is reached by agents only through a blackholed relay: it forwards.
    let c_dir = tmp.path().join("s3");
    let mut c = Server::start_at(&c_dir, &config(&store, 3, ""), host(3))?;
    let relay = UdpRelay::start(c.addrs.quic)?;
    relay.set_paused(true);
    let c_addrs = c.addrs;
    c.proc.signal("TERM");
    c.proc.wait_exit(Duration::from_secs(15));
    let extra = format!("peer = \"{}\"\n[public]\nquic = \"{}\"\n", c_addrs.quic, relay.addr);
    let c = Server::start_on(&c_dir, &config(&store, 3, &extra), Some(c_addrs))?;

    let echo = upstreams::echo().await;
    let web = upstreams::http("hello").await;
    let bulk_agent = Agent::start(&tmp.path().join("bulk"), &a.add_node("bulk")?, echo, &[])?;
    let web_agent = Agent::start(&tmp.path().join("web"), &a.add_node("web")?, web, &[])?;
    let (bulk_ca, web_ca) = (bulk_agent.local_ca("bulk"), web_agent.local_ca("web"));
    let (bulk, webname) = (format!("bulk.{ZONE}"), format!("web.{ZONE}"));
    wait_for("tunnels on B", Duration::from_secs(15), || {
        let s = status(&b);
        s["servers"].as_array()?.iter().find(|s| s["name"] == "edge-2")?["tunnels"]
            .as_array()
            .is_some_and(|t| t.len() == 2)
            .then_some(())
    })?;

    eprintln!("forwarding: {} x {} MiB echo and {} GETs per path", args.connections, args.mib, args.requests);
    let mut rows = Vec::new();
    for (label, server) in [("own tunnel (B)", &b), ("forwarded (C -> peer)", &c)] {
        let mbps = throughput(server.addrs.tls, &bulk, &bulk_ca, args.mib, args.connections).await?;
        let lat = latencies(server.addrs.tls, &webname, &web_ca, args.requests).await?;
        rows.push((label, mbps, percentile(&lat, 0.5), percentile(&lat, 0.99)));
    }
    let forwarded = edge_tests::metric(&c.metrics()?, "edge_peer_forwarded_total").unwrap_or(0.0);

    eprintln!("failover: {} rounds each", args.rounds);
    let mut dns_drop = Vec::new();
    let mut a = a;
    for round in 0..args.rounds {
        let addrs = a.addrs;
        let killed = Instant::now();
        a.proc.signal("KILL");
        a.proc.wait_exit(Duration::from_secs(5));
        let dns = b.addrs.dns.unwrap();
        let took = wait_for("A out of B's DNS", Duration::from_secs(30), || {
            let answer = dig(dns, &webname, "A", false).ok()?;
            (!answer.data("A").contains(&"127.0.0.1".to_string())).then(|| killed.elapsed())
        })?;
        dns_drop.push(took.as_secs_f64() * 1000.0);
        eprintln!("  round {}: server killed -> out of DNS after {took:?}", round + 1);
        a = Server::start_on(&tmp.path().join("s1"), &config(&store, 1, ""), Some(addrs))?;
        wait_for("A back in DNS", Duration::from_secs(30), || {
            dig(dns, &webname, "A", false).ok()?.data("A").contains(&"127.0.0.1".to_string()).then_some(())
        })?;
    }
    let mut servers = [a, b, c];
    let mut leader_move = Vec::new();
    for round in 0..args.rounds {
        let id = wait_for("a decider", Duration::from_secs(15), || holder(&servers[1]))?;
        let i = servers.iter().position(|s| server_id(s) == id).unwrap();
        let other = (i + 1) % servers.len();
        let (dir, addrs) = (servers[i].dir.clone(), servers[i].addrs);
        let killed = Instant::now();
        servers[i].proc.signal("KILL");
        servers[i].proc.wait_exit(Duration::from_secs(5));
        let took = wait_for("a new decider", Duration::from_secs(30), || {
            holder(&servers[other]).filter(|h| *h != id).map(|_| killed.elapsed())
        })?;
        leader_move.push(took.as_secs_f64() * 1000.0);
        eprintln!("  round {}: decider killed -> another decides after {took:?}", round + 1);
        let n = (i + 1) as u8;
        let extra = if n == 3 {
            format!("peer = \"{}\"\n[public]\nquic = \"{}\"\n", addrs.quic, relay.addr)
        } else {
            String::new()
        };
        servers[i] = Server::start_on(&dir, &config(&store, n, &extra), Some(addrs))?;
    }
    dns_drop.sort_by(f64::total_cmp);
    leader_move.sort_by(f64::total_cmp);

    eprintln!("idle agents: {} agents, watched {} s", args.agents, args.idle_secs);
    relay.set_paused(false);
    let pid = servers[1].proc.child.id();
    let before = rss_kib(pid).0;
    let mut idle = Vec::new();
    for i in 0..args.agents {
        let name = format!("idle{i}");
        idle.push(Agent::start(&tmp.path().join(&name), &servers[1].add_node(&name)?, web, &[])?);
    }
    // Every agent connected to every server: 3 servers x 2 connections.
    let want = args.agents + 2;
    wait_for("idle agents on every server", Duration::from_secs(60), || {
        let s = status(&servers[1]);
        s["servers"].as_array()?.iter().all(|s| s["tunnels"].as_array().is_some_and(|t| t.len() >= want)).then_some(())
    })?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid).0;
    let conns_per_agent = 2.0;
    let datagrams_before = udp_datagrams();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let datagrams = udp_datagrams() - datagrams_before;
    // Idle agent connections on all three servers (plus the two busy agents').
    let connections = ((args.agents + 2) * 3) as f64 * conns_per_agent;
    let per_min = datagrams as f64 / connections * 60.0 / args.idle_secs as f64;
    let kib_per_agent = after.saturating_sub(before) as f64 / args.agents as f64;

    println!("\n## edge-cluster-bench (3 servers, one PostgreSQL, loopback)\n");
    println!("| path | echo MB/s ({} conns) | GET p50 ms | GET p99 ms |", args.connections);
    println!("|---|---:|---:|---:|");
    for (label, mbps, p50, p99) in &rows {
        println!("| {label} | {mbps:.1} | {p50:.2} | {p99:.2} |");
    }
    println!("\nforwarded connections counted by C: {forwarded}");
    println!("\n| failover ({} rounds) | min ms | median ms | max ms |", args.rounds);
    println!("|---|---:|---:|---:|");
    for (label, v) in
        [("server killed -> its address out of DNS", &dns_drop), ("decider killed -> another decides", &leader_move)]
    {
        println!("| {label} | {:.0} | {:.0} | {:.0} |", percentile(v, 0.0), percentile(v, 0.5), percentile(v, 1.0));
    }
    println!("\n| idle agents ({} agents x 3 servers x 2 connections) | value |", args.agents);
    println!("|---|---:|");
    println!("| server RSS per idle agent (2 connections) | {kib_per_agent:.0} KiB |");
    println!("| UDP datagrams per idle agent connection per minute (both ways) | {per_min:.1} |");
    drop(idle);
    Ok(())
}
