//! `edge-bench`: the full path (TLS client → edge-server → QUIC → edge-agent
//! → TLS terminated → upstream) side by side with the same client talking
//! TLS directly to the agent's direct listener (same certificate, same
//! upstream, same termination code, no tunnel). Everything runs on loopback
//! in one run; the table goes to stdout.
//!
//! `cargo build --release --workspace --bins && target/release/edge-bench`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use edge_tests::load::{
    blast, connect, conns_per_sec, handshake_request, latency, median, read_response, throughput, Target,
};
use edge_tests::{clients, cpu_seconds, rss_kib, upstreams, wait_for, Agent, Server, ZONE};
use tokio::io::AsyncWriteExt;

/// Benchmark the tunnel against a direct connection.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds per timed phase (each connections/s round, latency).
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// MiB per connection in the throughput phase.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Idle connections held for the memory phase.
    #[arg(long, default_value_t = 2000)]
    idle: usize,
    /// Concurrent workers for connections/s and latency.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Throughput rounds, each measuring direct then tunnel with 1 and then
    /// 4 connections; the table reports medians, since one transfer on a
    /// shared machine is noisy.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only the throughput rounds, with one line per round and CPU per GB
    /// for server, agent and the bench process separately (for A/B
    /// experiments on the data path).
    #[arg(long)]
    bulk_only: bool,
    /// Upper bound for the tunnel's datagrams (`[tunnel] max_udp_payload`
    /// on both ends) instead of the default; 1452 gives the datagram size of
    /// an internet path.
    #[arg(long)]
    max_udp_payload: Option<u16>,
    /// A further `[tunnel]` setting for both ends, as TOML (repeatable),
    /// e.g. `--tunnel 'stream_window = 4194304'`.
    #[arg(long = "tunnel", value_name = "KEY = VALUE")]
    tunnel_settings: Vec<String>,
}

#[derive(Debug, Default, Clone)]
struct Row {
    single_mbps: f64,
    parallel_mbps: f64,
    cpu_per_gb: f64,
    conns_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    requests: usize,
    idle_kib_server: f64,
    idle_kib_agent: f64,
}

/// One throughput round with `connections` connections per target.
struct BulkRound {
    connections: usize,
    /// MB/s, direct and tunnel.
    mbps: [f64; 2],
    /// CPU seconds per GB of server, agent and the bench process (client
    /// and upstream), direct and tunnel.
    cpu_per_gb: [[f64; 3]; 2],
}

impl BulkRound {
    fn ratio(&self) -> f64 {
        self.mbps[1] / self.mbps[0]
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    edge_net::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(bench(args))
}

/// A server, an agent with a direct listener, an upstream, and the two
/// targets, in their own temporary directory.
struct Setup {
    tmp: tempfile::TempDir,
    server: Server,
    agent: Agent,
    join: String,
    upstream: SocketAddr,
    direct: Target,
    tunnel: Target,
}

impl Setup {
    async fn start(tunnel_config: &str) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let server = Server::start(&tmp.path().join("server"), tunnel_config)?;
        let join = server.add_node("bench")?;
        let upstream = upstreams::bench().await;
        let agent_dir = tmp.path().join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        std::fs::write(
            tmp.path().join("agent.toml"),
            format!("join = {join:?}\nupstream = \"{upstream}\"\n{tunnel_config}"),
        )?;
        let agent = Self::agent(&tmp, &join, upstream, true)?;
        let tls = clients::client_config(&agent.local_ca("bench"))?;
        let sni = format!("app.bench.{ZONE}");
        let direct =
            Target { addr: agent.direct_addr().context("direct listener")?, sni: sni.clone(), tls: tls.clone() };
        let tunnel = Target { addr: server.addrs.tls, sni, tls };
        Ok(Self { tmp, server, agent, join, upstream, direct, tunnel })
    }

    /// Starts the agent (again), with the direct listener if `direct`.
    fn agent(tmp: &tempfile::TempDir, join: &str, upstream: SocketAddr, direct: bool) -> Result<Agent> {
        let config = tmp.path().join("agent.toml").to_string_lossy().into_owned();
        let mut args = vec!["--config", config.as_str()];
        if direct {
            args.extend(["--direct-listen", "127.0.0.1:0"]);
        }
        Agent::start(&tmp.path().join("agent"), join, upstream, &args)
    }

    fn pids(&self) -> (u32, u32) {
        (self.server.proc.child.id(), self.agent.proc.child.id())
    }
}

async fn bench(args: Args) -> Result<()> {
    let tunnel_config = edge_tests::load::tunnel_config(args.max_udp_payload, &args.tunnel_settings);
    // Memory per idle connection first, each target with fresh processes:
    // RSS growth after other phases mostly shows how much freed heap the
    // allocator reuses, not what a connection costs.
    let (mut idle, mut idle_peaks) = (Vec::new(), Vec::new());
    if !args.bulk_only {
        for name in ["direct", "tunnel"] {
            let fresh = Setup::start(&tunnel_config).await?;
            let target = if name == "direct" { &fresh.direct } else { &fresh.tunnel };
            handshake_request(target).await?;
            eprintln!("[{name}] memory with {} idle connections", args.idle);
            let (server_pid, agent_pid) = fresh.pids();
            idle.push(idle_memory(target, args.idle, server_pid, agent_pid).await?);
            idle_peaks.push((rss_kib(server_pid).1, rss_kib(agent_pid).1));
        }
    }

    let Setup { tmp, server, mut agent, join, upstream, direct, tunnel } = Setup::start(&tunnel_config).await?;
    let (server_pid, agent_pid) = (server.proc.child.id(), agent.proc.child.id());

    eprintln!("warming up");
    for t in [&direct, &tunnel] {
        blast(t, 8 << 20).await?;
        handshake_request(t).await?;
    }

    eprintln!(
        "throughput: {} rounds of 1 connection x {} MiB and 4 x {} MiB, direct then tunnel",
        args.rounds,
        args.mib,
        args.mib / 4
    );
    let rounds = bulk_rounds(&direct, &tunnel, args.rounds.max(1), args.mib, server_pid, agent_pid).await?;
    if args.bulk_only {
        print_rounds(&rounds);
        println!("{}", path_line(&agent).await);
        return Ok(());
    }
    let of = |connections: usize| rounds.iter().filter(move |r| r.connections == connections);
    let ratio = |connections: usize| median(of(connections).map(BulkRound::ratio).collect());
    eprintln!("new connections/s: {} rounds of {} s per target, {} workers", args.rounds, args.seconds, args.workers);
    let mut cps_rounds = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let length = Duration::from_secs(args.seconds);
        cps_rounds.push([
            conns_per_sec(&direct, args.workers, length).await?,
            conns_per_sec(&tunnel, args.workers, length).await?,
        ]);
    }
    let mut rows = Vec::new();
    for (name, target) in [("direct", &direct), ("tunnel", &tunnel)] {
        let mut row = Row::default();
        let i = usize::from(name == "tunnel");
        row.single_mbps = median(of(1).map(|r| r.mbps[i]).collect());
        row.parallel_mbps = median(of(4).map(|r| r.mbps[i]).collect());
        row.cpu_per_gb = median(of(4).map(|r| r.cpu_per_gb[i][0] + r.cpu_per_gb[i][1]).collect());
        row.conns_per_sec = median(cps_rounds.iter().map(|r| r[i]).collect());
        eprintln!("[{name}] keep-alive latency, {} connections, {} s", args.workers, args.seconds);
        let (p50, p99, p999, n) = latency(target, args.workers, Duration::from_secs(args.seconds)).await?;
        (row.p50_us, row.p99_us, row.p999_us, row.requests) = (p50, p99, p999, n);
        let (s, a) = if name == "direct" { (0.0, idle[0].1) } else { idle[1] };
        (row.idle_kib_server, row.idle_kib_agent) = (s, a);
        rows.push((name, row));
    }
    let path_line = path_line(&agent).await;
    let server_peak = rss_kib(server_pid).1;
    let agent_peak = rss_kib(agent_pid).1;

    eprintln!("reconnect: SIGKILL the agent and start it again");
    agent.proc.signal("KILL");
    agent.proc.wait_exit(Duration::from_secs(5));
    let started = Instant::now();
    agent = Setup::agent(&tmp, &join, upstream, false)?;
    let tunnel_up = started.elapsed();
    wait_for("tunnel traffic after restart", Duration::from_secs(30), || {
        let attempt = tokio::time::timeout(Duration::from_secs(1), handshake_request(&tunnel));
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(attempt)).ok()?.ok()
    })?;
    let first_request = started.elapsed();
    drop(agent);

    let (d, t) = (&rows[0].1, &rows[1].1);
    println!("| metric | direct (no tunnel) | tunnel | tunnel / direct |");
    println!("|---|---:|---:|---:|");
    let n = args.rounds.max(1);
    println!(
        "| bulk throughput, 1 connection (MB/s, median of {n} rounds) | {:.0} | {:.0} | {:.0}% |",
        d.single_mbps,
        t.single_mbps,
        100.0 * ratio(1)
    );
    println!(
        "| bulk throughput, 4 connections (MB/s, median of {n} rounds) | {:.0} | {:.0} | {:.0}% |",
        d.parallel_mbps,
        t.parallel_mbps,
        100.0 * ratio(4)
    );
    println!(
        "| server + agent CPU seconds per GB moved (4 connections, median) | {:.2} | {:.2} | |",
        d.cpu_per_gb, t.cpu_per_gb
    );
    println!(
        "| new TLS connections/s ({} workers, median of {n} rounds) | {:.0} | {:.0} | {:.0}% |",
        args.workers,
        d.conns_per_sec,
        t.conns_per_sec,
        100.0 * median(cps_rounds.iter().map(|r| r[1] / r[0]).collect())
    );
    println!("| keep-alive request p50 (µs) | {:.0} | {:.0} | |", d.p50_us, t.p50_us);
    println!("| keep-alive request p99 (µs) | {:.0} | {:.0} | |", d.p99_us, t.p99_us);
    println!("| keep-alive request p99.9 (µs) | {:.0} | {:.0} | |", d.p999_us, t.p999_us);
    println!("| keep-alive requests measured | {} | {} | |", d.requests, t.requests);
    println!("| memory per idle connection, server (KiB) | - | {:.1} | |", t.idle_kib_server);
    println!("| memory per idle connection, agent (KiB) | {:.1} | {:.1} | |", d.idle_kib_agent, t.idle_kib_agent);
    println!();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "| process | peak RSS, throughput/latency phases (MiB) | peak RSS, {} idle direct connections | peak RSS, {} idle tunnelled connections |",
        args.idle, args.idle
    );
    println!("|---|---:|---:|---:|");
    println!("| edge-server | {:.1} | {:.1} | {:.1} |", mib(server_peak), mib(idle_peaks[0].0), mib(idle_peaks[1].0));
    println!("| edge-agent | {:.1} | {:.1} | {:.1} |", mib(agent_peak), mib(idle_peaks[0].1), mib(idle_peaks[1].1));
    println!();
    println!("{path_line}");
    println!();
    println!("Throughput rounds (the tunnel/direct column above is the median of the per-round ratios):");
    println!();
    print_rounds(&rounds);
    let per_round: Vec<String> =
        cps_rounds.iter().map(|[d, t]| format!("{d:.0} / {t:.0} ({:.0}%)", 100.0 * t / d)).collect();
    println!();
    println!("New TLS connections/s per round, direct / tunnel: {}", per_round.join(", "));
    println!();
    println!(
        "agent SIGKILL, then restarted: tunnel up after {} ms, first request through it served after {} ms",
        tunnel_up.as_millis(),
        first_request.as_millis()
    );
    Ok(())
}

/// The agent's view of its tunnel path (metrics refresh every second).
async fn path_line(agent: &Agent) -> String {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let agent_metrics = agent.metrics().unwrap_or_default();
    let path = |name: &str| edge_tests::metric(&agent_metrics, name).unwrap_or(0.0);
    format!(
        "tunnel path after the run: MTU {} bytes, RTT {} µs, cwnd {:.0} KiB, {} congestion events, {} packets lost",
        path("edge_agent_path_mtu_bytes"),
        path("edge_agent_rtt_microseconds"),
        path("edge_agent_cwnd_bytes") / 1024.0,
        path("edge_agent_congestion_events"),
        path("edge_agent_lost_packets")
    )
}

/// Alternating throughput rounds: direct then tunnel, 1 then 4 connections.
async fn bulk_rounds(
    direct: &Target,
    tunnel: &Target,
    rounds: usize,
    mib: usize,
    server_pid: u32,
    agent_pid: u32,
) -> Result<Vec<BulkRound>> {
    let own_pid = std::process::id();
    let gb = |connections: usize| (mib / connections * connections) as f64 * 1.048576 / 1000.0;
    let mut results = Vec::new();
    for _ in 0..rounds {
        for connections in [1usize, 4] {
            let mut round = BulkRound { connections, mbps: [0.0; 2], cpu_per_gb: [[0.0; 3]; 2] };
            for (i, target) in [direct, tunnel].into_iter().enumerate() {
                let before = [cpu_seconds(server_pid), cpu_seconds(agent_pid), cpu_seconds(own_pid)];
                round.mbps[i] = throughput(target, connections, (mib / connections) << 20).await?;
                let after = [cpu_seconds(server_pid), cpu_seconds(agent_pid), cpu_seconds(own_pid)];
                for k in 0..3 {
                    round.cpu_per_gb[i][k] = (after[k] - before[k]) / gb(connections);
                }
            }
            results.push(round);
        }
    }
    Ok(results)
}

/// One line per throughput round, then the median ratios.
fn print_rounds(rounds: &[BulkRound]) {
    println!("| round | conns | direct MB/s | tunnel MB/s | tunnel/direct | CPU s/GB direct: agent | tunnel: server | tunnel: agent | tunnel: bench (client+upstream) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.2} |",
            i / 2 + 1,
            r.connections,
            r.mbps[0],
            r.mbps[1],
            100.0 * r.ratio(),
            r.cpu_per_gb[0][1],
            r.cpu_per_gb[1][0],
            r.cpu_per_gb[1][1],
            r.cpu_per_gb[1][2]
        );
    }
    let ratio = |connections: usize| {
        100.0 * median(rounds.iter().filter(|r| r.connections == connections).map(BulkRound::ratio).collect())
    };
    println!();
    println!("median tunnel/direct: 1 connection {:.0}%, 4 connections {:.0}%", ratio(1), ratio(4));
}

/// RSS growth per connection while `n` TLS connections sit idle.
async fn idle_memory(t: &Target, n: usize, server_pid: u32, agent_pid: u32) -> Result<(f64, f64)> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s0, a0) = (rss_kib(server_pid).0, rss_kib(agent_pid).0);
    let mut held = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(100) {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100.min(n - chunk * 100) {
            let t = Target { addr: t.addr, sni: t.sni.clone(), tls: t.tls.clone() };
            tasks.spawn(async move {
                let mut tls = connect(&t).await?;
                tls.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n").await?;
                read_response(&mut tls).await?;
                Ok::<_, anyhow::Error>(tls)
            });
        }
        while let Some(r) = tasks.join_next().await {
            held.push(r??);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s1, a1) = (rss_kib(server_pid).0, rss_kib(agent_pid).0);
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = |before: u64, after: u64| after.saturating_sub(before) as f64 / n as f64;
    Ok((per(s0, s1), per(a0, a1)))
}
