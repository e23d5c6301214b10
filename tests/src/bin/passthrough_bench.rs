//! `edge-passthrough-bench`: one TLS backend in its own process
//! (`edge-bench-upstream`, TLS 1.3, ECDSA P-256) reached three ways in one
//! run, as issue 16's table compares them:
//! - **direct**: the client talks to the backend;
//! - **tunnel**: client → edge-server :443 → QUIC → edge-agent in
//!   passthrough mode → backend (the agent never terminates TLS);
//! - **haproxy**: Debian's HAProxy in TCP mode routing by SNI, one thread,
//!   when `haproxy` is installed.
//!
//! Each round measures every path in turn (bulk MB/s over one connection,
//! new TLS connections/s, keep-alive requests/s on 16 connections with the
//! proxy processes' CPU per request); the table shows medians of the
//! rounds and each path's ratio to direct, plus the proxies' peak RSS.
//!
//! `cargo build --release --workspace --bins && target/release/edge-passthrough-bench`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use edge_tests::load::{blast, conns_per_sec, handshake_request, latency, median, throughput, Target};
use edge_tests::pebble::free_port;
use edge_tests::{bin, clients, cpu_seconds, rss_kib, status_kib, wait_for, Agent, Proc, Server, ZONE};

/// Benchmark the tunnel in passthrough mode against direct and HAProxy.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds per timed phase (connections/s, keep-alive).
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rounds; the table reports medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent connections for connections/s and keep-alive.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// MiB downloaded over one connection in the bulk phase.
    #[arg(long, default_value_t = 128)]
    mib: usize,
    /// `[tunnel] max_udp_payload` on both ends (1452: internet-sized).
    #[arg(long)]
    max_udp_payload: Option<u16>,
    /// A further `[tunnel]` setting for both ends (repeatable).
    #[arg(long = "tunnel", value_name = "KEY = VALUE")]
    tunnel_settings: Vec<String>,
    /// Worker threads of the backend.
    #[arg(long, default_value_t = 1)]
    backend_threads: usize,
    /// `[runtime] threads` of edge-server and edge-agent (default: their
    /// own default, auto).
    #[arg(long)]
    proxy_threads: Option<usize>,
    /// A further environment variable for edge-server and edge-agent
    /// (repeatable), for experiments such as `MALLOC_ARENA_MAX=1`.
    #[arg(long = "proxy-env", value_name = "KEY=VALUE")]
    proxy_env: Vec<String>,
}

/// One path and the processes that carry it (empty for direct).
struct Route {
    name: &'static str,
    target: Target,
    pids: Vec<u32>,
}

/// One round's figures for one path.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    bulk_mbps: f64,
    conns_per_sec: f64,
    requests_per_sec: f64,
    cpu_us_per_request: f64,
    p50_us: f64,
    p99_us: f64,
    keep_alive_rss_mib: f64,
    keep_alive_anon_mib: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    edge_net::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(bench(args))
}

/// A CA and a leaf for the node's names: (CA file, chain file, key file).
fn certificates(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "edge bench backend CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let names = vec![format!("bench.{ZONE}"), format!("*.bench.{ZONE}")];
    let leaf = rcgen::CertificateParams::new(names)?.signed_by(&key, &issuer)?;
    let paths = (dir.join("ca.pem"), dir.join("chain.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca.pem())?;
    std::fs::write(&paths.1, format!("{}{}", leaf.pem(), ca.pem()))?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// HAProxy in TCP mode, routing the node's names by SNI to `backend`, one
/// thread; `None` when it is not installed.
fn haproxy(dir: &Path, backend: SocketAddr) -> Result<Option<(Proc, SocketAddr)>> {
    if Command::new("haproxy").arg("-v").output().is_err() {
        eprintln!("haproxy is not installed: no reference row (apt-get install haproxy)");
        return Ok(None);
    }
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let config = format!(
        "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  \
         timeout server 60s\nfrontend tls\n  bind {listen}\n  tcp-request inspect-delay 5s\n  \
         tcp-request content accept if {{ req.ssl_hello_type 1 }}\n  \
         use_backend node if {{ req.ssl_sni -m end .bench.{ZONE} }}\nbackend node\n  server backend {backend}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-f").arg(&path).arg("-db");
    let mut proc = Proc::spawn(cmd, dir.join("haproxy.log"))?;
    wait_for("haproxy listening", Duration::from_secs(10), || {
        if !proc.alive() {
            return Some(false);
        }
        std::net::TcpStream::connect(listen).ok().map(|_| true)
    })?
    .then_some(())
    .with_context(|| format!("haproxy exited: {}", proc.log_text()))?;
    Ok(Some((proc, listen)))
}

async fn bench(args: Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (ca, chain, key) = certificates(tmp.path())?;
    let addr_file = tmp.path().join("backend.addr");
    let mut cmd = Command::new(bin("edge-bench-upstream"));
    cmd.arg("--cert").arg(&chain).arg("--key").arg(&key).arg("--addr-file").arg(&addr_file);
    cmd.args(["--threads", &args.backend_threads.to_string()]);
    let backend_proc = Proc::spawn(cmd, tmp.path().join("backend.log"))?;
    let backend: SocketAddr = wait_for("backend address", Duration::from_secs(10), || {
        std::fs::read_to_string(&addr_file).ok()?.trim().parse().ok()
    })?;

    let mut tunnel_config = edge_tests::load::tunnel_config(args.max_udp_payload, &args.tunnel_settings);
    if let Some(n) = args.proxy_threads {
        tunnel_config.push_str(&format!("[runtime]\nthreads = {n}\n"));
    }
    let mut env: Vec<(&str, &std::ffi::OsStr)> = Vec::new();
    for setting in &args.proxy_env {
        let (key, value) = setting.split_once('=').context("--proxy-env takes KEY=VALUE")?;
        env.push((key, std::ffi::OsStr::new(value)));
    }
    let server = Server::start_with_env(&tmp.path().join("server"), &tunnel_config, &env)?;
    let join = server.add_node("bench")?;
    let agent_dir = tmp.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let agent_config = agent_dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!("join = {join:?}\nupstream = \"{backend}\"\nmode = \"passthrough\"\n{tunnel_config}"),
    )?;
    let config_arg = agent_config.to_string_lossy().into_owned();
    let agent = Agent::spawn_with_env(&agent_dir, &join, backend, &["--config", &config_arg], &env)?;
    agent.wait_ready(Duration::from_secs(20))?;
    let haproxy = haproxy(tmp.path(), backend)?;

    let tls = clients::client_config(&ca)?;
    let sni = format!("app.bench.{ZONE}");
    let target = |addr| Target { addr, sni: sni.clone(), tls: tls.clone() };
    let mut paths = vec![
        Route { name: "direct", target: target(backend), pids: Vec::new() },
        Route {
            name: "edge tunnel (passthrough)",
            target: target(server.addrs.tls),
            pids: vec![server.proc.child.id(), agent.proc.child.id()],
        },
    ];
    if let Some((proc, listen)) = &haproxy {
        paths.push(Route {
            name: "HAProxy (TCP, SNI, 1 thread)",
            target: target(*listen),
            pids: vec![proc.child.id()],
        });
    }

    eprintln!("warming up");
    for p in &paths {
        blast(&p.target, 8 << 20).await?;
        handshake_request(&p.target).await?;
    }
    let seconds = Duration::from_secs(args.seconds);
    let mut rounds: Vec<Vec<Figures>> = Vec::new();
    // Peak RSS per process over the whole run, kept across the resets.
    let mut whole_run_peak: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for round in 1..=args.rounds.max(1) {
        let mut figures = Vec::new();
        for p in &paths {
            eprintln!("round {round}: {}", p.name);
            let mut f = Figures { bulk_mbps: throughput(&p.target, 1, args.mib << 20).await?, ..Figures::default() };
            f.conns_per_sec = conns_per_sec(&p.target, args.workers, seconds).await?;
            let cpu = || p.pids.iter().map(|&pid| cpu_seconds(pid)).sum::<f64>();
            // The peak RSS of this phase alone: the kernel's high-water
            // mark is reset first (`clear_refs` 5 resets VmHWM).
            for &pid in &p.pids {
                let peak = whole_run_peak.entry(pid).or_default();
                *peak = (*peak).max(rss_kib(pid).1);
                let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
            }
            let before = cpu();
            let (p50, p99, _, requests) = latency(&p.target, args.workers, seconds).await?;
            let used = cpu() - before;
            f.keep_alive_rss_mib = p.pids.iter().map(|&pid| rss_kib(pid).1).sum::<u64>() as f64 / 1024.0;
            f.keep_alive_anon_mib = p.pids.iter().map(|&pid| status_kib(pid, "RssAnon")).sum::<u64>() as f64 / 1024.0;
            f.requests_per_sec = requests as f64 / seconds.as_secs_f64();
            f.cpu_us_per_request = used * 1e6 / requests.max(1) as f64;
            (f.p50_us, f.p99_us) = (p50, p99);
            figures.push(f);
        }
        rounds.push(figures);
    }
    let med = |i: usize, field: fn(&Figures) -> f64| median(rounds.iter().map(|r| field(&r[i])).collect());
    let ratio =
        |i: usize, field: fn(&Figures) -> f64| median(rounds.iter().map(|r| field(&r[i]) / field(&r[0])).collect());
    let payload = args.max_udp_payload.map_or("default".to_string(), |n| n.to_string());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match args.proxy_threads {
        None | Some(0) => {
            format!("auto ({} on {cpus} CPUs)", edge_net::runtime::RuntimeConfig::default().worker_threads(cpus))
        }
        Some(n) => n.to_string(),
    };
    println!(
        "Passthrough to one TLS backend (TLS 1.3, ECDSA P-256), {} workers, {} s phases, medians of {} rounds; tunnel datagrams: {payload}; server and agent runtime threads: {threads}",
        args.workers,
        args.seconds,
        args.rounds.max(1)
    );
    println!();
    println!("| path | bulk MB/s | new TLS conn/s | keep-alive req/s | keep-alive p50 / p99 µs | proxy CPU µs per keep-alive request | proxy peak RSS MiB, keep-alive / whole run | of which anonymous MiB |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in paths.iter().enumerate() {
        let rss: u64 =
            p.pids.iter().map(|&pid| rss_kib(pid).1.max(whole_run_peak.get(&pid).copied().unwrap_or(0))).sum();
        let rel =
            |field: fn(&Figures) -> f64| if i == 0 { String::new() } else { format!(" ({:.2})", ratio(i, field)) };
        println!(
            "| {} | {:.0}{} | {:.0}{} | {:.0}{} | {:.0} / {:.0} | {} | {} | {} |",
            p.name,
            med(i, |f| f.bulk_mbps),
            rel(|f| f.bulk_mbps),
            med(i, |f| f.conns_per_sec),
            rel(|f| f.conns_per_sec),
            med(i, |f| f.requests_per_sec),
            rel(|f| f.requests_per_sec),
            med(i, |f| f.p50_us),
            med(i, |f| f.p99_us),
            if p.pids.is_empty() { "-".to_string() } else { format!("{:.1}", med(i, |f| f.cpu_us_per_request)) },
            if p.pids.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1} / {:.1}", med(i, |f| f.keep_alive_rss_mib), rss as f64 / 1024.0)
            },
            if p.pids.is_empty() { "-".to_string() } else { format!("{:.1}", med(i, |f| f.keep_alive_anon_mib)) },
        );
    }
    println!();
    println!("(ratio to direct in brackets, the median of the rounds' ratios; anonymous: RssAnon at the end of the keep-alive phase)");
    drop(backend_proc);
    Ok(())
}
