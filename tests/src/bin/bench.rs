//! `edge-bench`: the full path (TLS client → edge-server → QUIC → edge-agent
//! → TLS terminated → upstream) side by side with the same client talking
//! TLS directly to the agent's direct listener (same certificate, same
//! upstream, same termination code, no tunnel). Everything runs on loopback
//! in one run; the table goes to stdout.
//!
//! `cargo build --release --workspace --bins && target/release/edge-bench`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use edge_tests::{clients, cpu_seconds, rss_kib, upstreams, wait_for, Agent, Server, ZONE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Benchmark the tunnel against a direct connection.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds per timed phase (connections/s, latency).
    #[arg(long, default_value_t = 5)]
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
    /// Only the throughput phases, this many rounds alternating direct and
    /// tunnel, with CPU per GB for server and agent separately (for A/B
    /// experiments on the data path).
    #[arg(long)]
    bulk_rounds: Option<usize>,
    /// Upper bound for the tunnel's datagrams (`[tunnel] max_udp_payload`
    /// on both ends) instead of the default; 1452 gives the datagram size of
    /// an internet path.
    #[arg(long)]
    max_udp_payload: Option<u16>,
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

struct Target {
    addr: SocketAddr,
    sni: String,
    tls: Arc<rustls::ClientConfig>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    edge_net::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tunnel_config = args.max_udp_payload.map(|n| format!("[tunnel]\nmax_udp_payload = {n}\n")).unwrap_or_default();
    let server = Server::start(&tmp.path().join("server"), &tunnel_config)?;
    let join = server.add_node("bench")?;
    let upstream = upstreams::bench().await;
    let agent_dir = tmp.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let agent_config = tmp.path().join("agent.toml");
    std::fs::write(&agent_config, format!("join = {join:?}\nupstream = \"{upstream}\"\n{tunnel_config}"))?;
    let config_arg = agent_config.to_string_lossy().into_owned();
    let agent_args = ["--config", config_arg.as_str()];
    let mut agent =
        Agent::start(&agent_dir, &join, upstream, &[&agent_args[..], &["--direct-listen", "127.0.0.1:0"]].concat())?;
    let tls = clients::client_config(&agent.local_ca("bench"))?;
    let sni = format!("app.bench.{ZONE}");
    let direct = Target { addr: agent.direct_addr().context("direct listener")?, sni: sni.clone(), tls: tls.clone() };
    let tunnel = Target { addr: server.addrs.tls, sni: sni.clone(), tls: tls.clone() };
    let server_pid = server.proc.child.id();
    let agent_pid = agent.proc.child.id();

    eprintln!("warming up");
    for t in [&direct, &tunnel] {
        blast(t, 8 << 20).await?;
        handshake_request(t).await?;
    }

    if let Some(rounds) = args.bulk_rounds {
        bulk_rounds(&direct, &tunnel, rounds, args.mib, server_pid, agent_pid).await?;
        println!("{}", path_line(&agent).await);
        return Ok(());
    }
    let mut rows = Vec::new();
    for (name, target) in [("direct", &direct), ("tunnel", &tunnel)] {
        let mut row = Row::default();
        eprintln!("[{name}] throughput, 1 connection x {} MiB", args.mib);
        row.single_mbps = throughput(target, 1, args.mib << 20).await?;
        eprintln!("[{name}] throughput, 4 connections x {} MiB", args.mib / 4);
        let cpu_before = cpu_seconds(server_pid) + cpu_seconds(agent_pid);
        row.parallel_mbps = throughput(target, 4, (args.mib / 4) << 20).await?;
        let cpu = cpu_seconds(server_pid) + cpu_seconds(agent_pid) - cpu_before;
        row.cpu_per_gb = cpu / ((args.mib / 4 * 4) as f64 * 1.048576 / 1000.0);
        eprintln!("[{name}] new connections/s, {} workers, {} s", args.workers, args.seconds);
        row.conns_per_sec = conns_per_sec(target, args.workers, Duration::from_secs(args.seconds)).await?;
        eprintln!("[{name}] keep-alive latency, {} connections, {} s", args.workers, args.seconds);
        let (p50, p99, p999, n) = latency(target, args.workers, Duration::from_secs(args.seconds)).await?;
        (row.p50_us, row.p99_us, row.p999_us, row.requests) = (p50, p99, p999, n);
        eprintln!("[{name}] memory with {} idle connections", args.idle);
        let (s, a) = idle_memory(target, args.idle, server_pid, agent_pid).await?;
        (row.idle_kib_server, row.idle_kib_agent) = if name == "direct" { (0.0, a) } else { (s, a) };
        rows.push((name, row));
    }
    let path_line = path_line(&agent).await;
    let server_peak = rss_kib(server_pid).1;
    let agent_peak = rss_kib(agent_pid).1;

    eprintln!("reconnect: SIGKILL the agent and start it again");
    agent.proc.signal("KILL");
    agent.proc.wait_exit(Duration::from_secs(5));
    let started = Instant::now();
    agent = Agent::start(&agent_dir, &join, upstream, &agent_args)?;
    let tunnel_up = started.elapsed();
    wait_for("tunnel traffic after restart", Duration::from_secs(30), || {
        let attempt = tokio::time::timeout(Duration::from_secs(1), handshake_request(&tunnel));
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(attempt)).ok()?.ok()
    })?;
    let first_request = started.elapsed();
    drop(agent);

    let (d, t) = (&rows[0].1, &rows[1].1);
    let pct = |tun: f64, dir: f64| if dir > 0.0 { format!("{:.0}%", 100.0 * tun / dir) } else { "-".into() };
    println!("| metric | direct (no tunnel) | tunnel | tunnel / direct |");
    println!("|---|---:|---:|---:|");
    println!(
        "| bulk throughput, 1 connection (MB/s) | {:.0} | {:.0} | {} |",
        d.single_mbps,
        t.single_mbps,
        pct(t.single_mbps, d.single_mbps)
    );
    println!(
        "| bulk throughput, 4 connections (MB/s) | {:.0} | {:.0} | {} |",
        d.parallel_mbps,
        t.parallel_mbps,
        pct(t.parallel_mbps, d.parallel_mbps)
    );
    println!(
        "| server + agent CPU seconds per GB moved (4 connections) | {:.2} | {:.2} | |",
        d.cpu_per_gb, t.cpu_per_gb
    );
    println!(
        "| new TLS connections/s ({} workers) | {:.0} | {:.0} | {} |",
        args.workers,
        d.conns_per_sec,
        t.conns_per_sec,
        pct(t.conns_per_sec, d.conns_per_sec)
    );
    println!("| keep-alive request p50 (µs) | {:.0} | {:.0} | |", d.p50_us, t.p50_us);
    println!("| keep-alive request p99 (µs) | {:.0} | {:.0} | |", d.p99_us, t.p99_us);
    println!("| keep-alive request p99.9 (µs) | {:.0} | {:.0} | |", d.p999_us, t.p999_us);
    println!("| keep-alive requests measured | {} | {} | |", d.requests, t.requests);
    println!("| memory per idle connection, server (KiB) | - | {:.1} | |", t.idle_kib_server);
    println!("| memory per idle connection, agent (KiB) | {:.1} | {:.1} | |", d.idle_kib_agent, t.idle_kib_agent);
    println!();
    println!("| process | peak RSS (MiB) |");
    println!("|---|---:|");
    println!("| edge-server | {:.1} |", server_peak as f64 / 1024.0);
    println!("| edge-agent | {:.1} |", agent_peak as f64 / 1024.0);
    println!();
    println!("{path_line}");
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

/// Alternating throughput rounds; prints one line per round and the medians.
async fn bulk_rounds(
    direct: &Target,
    tunnel: &Target,
    rounds: usize,
    mib: usize,
    server_pid: u32,
    agent_pid: u32,
) -> Result<()> {
    let own_pid = std::process::id();
    let gb = |connections: usize| (mib / connections * connections) as f64 * 1.048576 / 1000.0;
    let mut ratios = (Vec::new(), Vec::new());
    println!("| round | conns | direct MB/s | tunnel MB/s | tunnel/direct | CPU s/GB direct: agent | tunnel: server | tunnel: agent | tunnel: bench (client+upstream) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for round in 1..=rounds {
        for connections in [1usize, 4] {
            let mut mbps = [0.0; 2];
            let mut cpu = [[0.0; 3]; 2];
            for (i, target) in [direct, tunnel].into_iter().enumerate() {
                let before = [cpu_seconds(server_pid), cpu_seconds(agent_pid), cpu_seconds(own_pid)];
                mbps[i] = throughput(target, connections, (mib / connections) << 20).await?;
                let after = [cpu_seconds(server_pid), cpu_seconds(agent_pid), cpu_seconds(own_pid)];
                for k in 0..3 {
                    cpu[i][k] = (after[k] - before[k]) / gb(connections);
                }
            }
            let ratio = mbps[1] / mbps[0];
            if connections == 1 {
                ratios.0.push(ratio)
            } else {
                ratios.1.push(ratio)
            }
            println!(
                "| {round} | {connections} | {:.0} | {:.0} | {:.0}% | {:.2} | {:.2} | {:.2} | {:.2} |",
                mbps[0],
                mbps[1],
                100.0 * ratio,
                cpu[0][1],
                cpu[1][0],
                cpu[1][1],
                cpu[1][2]
            );
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 100.0
    };
    println!();
    println!(
        "median tunnel/direct: 1 connection {:.0}%, 4 connections {:.0}%",
        median(&mut ratios.0),
        median(&mut ratios.1)
    );
    Ok(())
}

async fn connect(t: &Target) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    clients::connect(t.addr, &t.sni, t.tls.clone()).await
}

/// Downloads `bytes` over one connection.
async fn blast(t: &Target, bytes: usize) -> Result<()> {
    let mut tls = connect(t).await?;
    tls.write_all(format!("BLAST {bytes}\n").as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    anyhow::ensure!(got == bytes, "got {got} of {bytes} bytes");
    Ok(())
}

async fn throughput(t: &Target, connections: usize, bytes: usize) -> Result<f64> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let t = Target { addr: t.addr, sni: t.sni.clone(), tls: t.tls.clone() };
        tasks.spawn(async move { blast(&t, bytes).await });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok((connections * bytes) as f64 / start.elapsed().as_secs_f64() / 1e6)
}

async fn handshake_request(t: &Target) -> Result<()> {
    let mut tls = connect(t).await?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n").await?;
    read_response(&mut tls).await?;
    Ok(())
}

/// Reads one `Content-Length: 2` response (the bench upstream's).
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<()> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 128];
    loop {
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        if buf.ends_with(b"\r\n\r\nok") {
            return Ok(());
        }
    }
}

async fn conns_per_sec(t: &Target, workers: usize, length: Duration) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + length;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let t = Target { addr: t.addr, sni: t.sni.clone(), tls: t.tls.clone() };
        let (done, failed) = (done.clone(), failed.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                match handshake_request(&t).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    anyhow::ensure!(failed.load(Ordering::Relaxed) == 0, "{} connections failed", failed.load(Ordering::Relaxed));
    Ok(done.load(Ordering::Relaxed) as f64 / length.as_secs_f64())
}

async fn latency(t: &Target, workers: usize, length: Duration) -> Result<(f64, f64, f64, usize)> {
    let deadline = Instant::now() + length;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let t = Target { addr: t.addr, sni: t.sni.clone(), tls: t.tls.clone() };
        tasks.spawn(async move {
            let mut tls = connect(&t).await?;
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                let start = Instant::now();
                tls.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n").await?;
                read_response(&mut tls).await?;
                samples.push(start.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(samples)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    all.sort_unstable();
    let q = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0) as f64
    };
    Ok((q(0.50), q(0.99), q(0.999), all.len()))
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
