//! A bounded soak: mixed echo load over three nodes (one with two replicas)
//! with random client aborts, agent restarts (graceful and killed) and one
//! server restart. Every byte that comes back is checked against what was
//! sent; at the end nothing is corrupted, no stream is left open, and
//! descriptors, tasks and memory are back near their baseline.
//!
//! `SOAK_SECS` sets the load time (default 100).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_tests::{clients, metric, upstreams, Agent, Server, ZONE};
use rand::{Rng, RngCore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER: &str = "[limits]\ndrain_timeout_secs = 3\nagent_answer_timeout_ms = 1000\n";
const AGENT: &str = "drain_timeout_secs = 5\n";
const WORKERS: usize = 16;

#[derive(Default)]
struct Tally {
    verified: AtomicU64,
    bytes: AtomicU64,
    aborted: AtomicU64,
    failed: AtomicU64,
    corrupted: AtomicU64,
}

/// One echo exchange: sends `size` random bytes (or, one time in ten, gives
/// up part way), checks every byte that comes back at its offset, and
/// tallies the outcome.
async fn exchange(addr: std::net::SocketAddr, host: &str, config: Arc<rustls::ClientConfig>, tally: &Tally) {
    let (size, abort_at) = {
        let mut rng = rand::rng();
        let size = rng.random_range(1..=256 * 1024usize);
        (size, rng.random_bool(0.1).then(|| rng.random_range(0..size)))
    };
    let mut payload = vec![0u8; size];
    rand::rng().fill_bytes(&mut payload);
    let Ok(tls) = clients::connect(addr, host, config).await else {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let (mut r, mut w) = tokio::io::split(tls);
    let sent = payload.clone();
    let writer = async move {
        let end = abort_at.unwrap_or(sent.len());
        w.write_all(&sent[..end]).await?;
        if abort_at.is_none() {
            w.shutdown().await?;
        }
        Ok::<_, std::io::Error>(w)
    };
    let reader = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0usize;
        loop {
            if abort_at.is_some_and(|a| at >= a) {
                return Err(at); // the client gives up here
            }
            let n = match r.read(&mut buf).await {
                Ok(0) => return Ok(at),
                Ok(n) => n,
                Err(_) => return Err(at),
            };
            if at + n > payload.len() || buf[..n] != payload[at..at + n] {
                return Ok(usize::MAX); // corrupted: bytes that were never sent
            }
            at += n;
        }
    };
    let deadline = Duration::from_secs(30);
    let (written, read) = match tokio::time::timeout(deadline, async { tokio::join!(writer, reader) }).await {
        Ok(done) => done,
        Err(_) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    drop(written);
    match (abort_at, read) {
        (_, Ok(usize::MAX)) => {
            tally.corrupted.fetch_add(1, Ordering::Relaxed);
        }
        (Some(_), _) => {
            tally.aborted.fetch_add(1, Ordering::Relaxed);
        }
        (None, Ok(n)) if n == size => {
            tally.verified.fetch_add(1, Ordering::Relaxed);
            tally.bytes.fetch_add(2 * size as u64, Ordering::Relaxed);
        }
        // A clean end before every byte came back: data lost silently.
        (None, Ok(_)) => {
            tally.corrupted.fetch_add(1, Ordering::Relaxed);
        }
        (None, Err(_)) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Quiet {
    fds: usize,
    tasks: f64,
    rss_kib: u64,
}

fn quiet_server(server: &Server) -> Quiet {
    let m = server.metrics().unwrap();
    Quiet {
        fds: edge_tests::fd_count(server.proc.child.id()),
        tasks: metric(&m, "edge_tasks_alive").unwrap(),
        rss_kib: edge_tests::rss_kib(server.proc.child.id()).0,
    }
}

/// The agents, their directories and joins, owned by the chaos thread.
struct Fleet {
    agents: Vec<(Agent, PathBuf, String)>,
    upstream: std::net::SocketAddr,
}

impl Fleet {
    fn restart(&mut self, i: usize, kill: bool) {
        let (agent, dir, join) = &mut self.agents[i];
        if kill {
            agent.proc.child.kill().unwrap();
            let _ = agent.proc.child.wait();
        } else {
            agent.proc.signal("TERM");
            let status = agent.proc.wait_exit(Duration::from_secs(20)).expect("agent drained");
            assert!(status.success(), "agent {i} exit {status:?}");
        }
        *agent = Agent::spawn_with_config(dir, join, self.upstream, AGENT).unwrap();
        agent.wait_ready(Duration::from_secs(30)).unwrap();
    }
}

fn share_certificate(node: &str, from: &Path, to: &Path) {
    let (src, dst) = (from.join("certs"), to.join("certs"));
    std::fs::create_dir_all(&dst).unwrap();
    for ext in [".crt", ".key", "-local-ca.crt", ".names"] {
        std::fs::copy(src.join(format!("{node}{ext}")), dst.join(format!("{node}{ext}"))).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_restarts_and_aborts_loses_and_leaks_nothing() {
    edge_net::raise_fd_limit();
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let tmp = tempfile::tempdir().unwrap();
    let server_dir = tmp.path().join("server");
    let server = Server::start(&server_dir, SERVER).unwrap();
    let upstream = upstreams::echo().await;
    // s1 runs two replicas; s2 and s3 one agent each.
    let mut agents = Vec::new();
    let mut configs = Vec::new();
    for (node, replicas) in [("s1", 2), ("s2", 1), ("s3", 1)] {
        let join = server.add_node(node).unwrap();
        for r in 0..replicas {
            let dir = tmp.path().join(format!("{node}-{r}"));
            if r > 0 {
                share_certificate(node, &tmp.path().join(format!("{node}-0")), &dir);
            }
            let agent = Agent::spawn_with_config(&dir, &join, upstream, AGENT).unwrap();
            agent.wait_ready(Duration::from_secs(20)).unwrap();
            if r == 0 {
                configs.push((format!("c.{node}.{ZONE}"), clients::client_config(&agent.local_ca(node)).unwrap()));
            }
            agents.push((agent, dir, join.clone()));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = quiet_server(&server);
    let agent_fds: Vec<usize> = agents.iter().map(|(a, _, _)| edge_tests::fd_count(a.proc.child.id())).collect();
    let addrs = server.addrs;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let (tally, stop, configs) = (tally.clone(), stop.clone(), configs.clone());
        workers.spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let (host, config) = &configs[i % configs.len()];
                let failed_before = tally.failed.load(Ordering::Relaxed);
                exchange(addrs.tls, host, config.clone(), &tally).await;
                if tally.failed.load(Ordering::Relaxed) > failed_before {
                    // Down (a restart in progress): do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                i += 1;
            }
        });
    }

    // Chaos on a plain thread (the harness blocks): restarts spread over
    // the run, the server restart in the middle.
    let started = Instant::now();
    let chaos = std::thread::spawn(move || {
        let mut fleet = Fleet { agents, upstream };
        let mut server = server;
        let mut faults = Vec::new();
        let at = |f: f64| Duration::from_secs_f64(secs as f64 * f);
        let steps: [(f64, &str); 6] = [
            (0.10, "term s1 replica 0"),
            (0.25, "kill s2"),
            (0.40, "term s1 replica 1"),
            (0.55, "restart server"),
            (0.75, "kill s3"),
            (0.85, "kill s1 replica 0"),
        ];
        for (when, what) in steps {
            if let Some(wait) = at(when).checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            match what {
                "term s1 replica 0" => fleet.restart(0, false),
                "kill s2" => fleet.restart(2, true),
                "term s1 replica 1" => fleet.restart(1, false),
                "kill s3" => fleet.restart(3, true),
                "kill s1 replica 0" => fleet.restart(0, true),
                _ => {
                    server.proc.signal("TERM");
                    server.proc.wait_exit(Duration::from_secs(20)).expect("server drained");
                    server = Server::start_on(&server_dir, SERVER, Some(addrs)).unwrap();
                    for (agent, _, _) in &fleet.agents {
                        agent.wait_ready(Duration::from_secs(30)).unwrap();
                    }
                }
            }
            faults.push(what);
        }
        (fleet, server, faults)
    });

    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while workers.join_next().await.is_some() {}
    let (fleet, server, faults) = tokio::task::spawn_blocking(move || chaos.join().unwrap()).await.unwrap();

    // Quiet again: nothing open, nothing leaked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = server.metrics().unwrap();
    let end = quiet_server(&server);
    let t = &tally;
    let verified = t.verified.load(Ordering::Relaxed);
    println!(
        "soak: {secs} s, {} faults ({faults:?}); streams verified {verified} ({:.1} MiB echoed), aborted {}, \
         failed {}, corrupted {}; server fds {} -> {}, tasks {} -> {}, RSS {} -> {} MiB",
        faults.len(),
        t.bytes.load(Ordering::Relaxed) as f64 / 1048576.0,
        t.aborted.load(Ordering::Relaxed),
        t.failed.load(Ordering::Relaxed),
        t.corrupted.load(Ordering::Relaxed),
        baseline.fds,
        end.fds,
        baseline.tasks,
        end.tasks,
        baseline.rss_kib / 1024,
        end.rss_kib / 1024
    );
    assert_eq!(faults.len(), 6, "every fault was injected");
    assert_eq!(t.corrupted.load(Ordering::Relaxed), 0, "corrupted or silently truncated streams");
    assert!(verified >= 500, "too little verified traffic: {verified}");
    assert!(t.aborted.load(Ordering::Relaxed) >= 20, "aborts were exercised");
    assert_eq!(metric(&m, "edge_connections_open"), Some(0.0));
    for node in ["s1", "s2", "s3"] {
        assert_eq!(metric(&m, &format!("edge_node_connections_active{{node=\"{node}\"}}")), Some(0.0));
    }
    assert!(end.fds <= baseline.fds + 4, "server descriptors {} -> {}", baseline.fds, end.fds);
    assert!(end.tasks <= baseline.tasks + 4.0, "server tasks {} -> {}", baseline.tasks, end.tasks);
    assert!(end.rss_kib <= baseline.rss_kib * 2 + 64 * 1024, "server RSS {} -> {} KiB", baseline.rss_kib, end.rss_kib);
    for (i, (agent, _, _)) in fleet.agents.iter().enumerate() {
        let am = agent.metrics().unwrap();
        assert_eq!(metric(&am, "edge_agent_open_streams"), Some(0.0), "agent {i} open streams");
        let fds = edge_tests::fd_count(agent.proc.child.id());
        assert!(fds <= agent_fds[i] + 4, "agent {i} descriptors {} -> {fds}", agent_fds[i]);
    }
}
