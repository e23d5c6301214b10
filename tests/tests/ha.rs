//! High availability of a node: two replicas share its traffic, and
//! restarting either (gracefully, or by a crash) loses no request; drains
//! are announced to the peer both ways.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server, ZONE};

const SERVER: &str = "[limits]\ndrain_timeout_secs = 5\nagent_answer_timeout_ms = 1000\n";
const AGENT: &str = "drain_timeout_secs = 10\n";

/// Replica B serves the certificate replica A generated (one node, one
/// certificate, as with ACME or a configured pair).
fn share_certificate(from: &Path, to: &Path) {
    let (src, dst) = (from.join("certs"), to.join("certs"));
    std::fs::create_dir_all(&dst).unwrap();
    for name in ["n1.crt", "n1.key", "n1-local-ca.crt", "n1.names"] {
        std::fs::copy(src.join(name), dst.join(name)).unwrap();
    }
}

fn streams_served(agent: &Agent) -> f64 {
    agent.metrics().ok().and_then(|m| metric(&m, "edge_agent_streams_total")).unwrap_or(0.0)
}

/// A failed request: the phase it ended in, how long it took, why.
type Failure = (u8, Duration, String);

/// Clients that each open a new TLS connection per request, counting
/// answers and failures (with the phase they ended in) until stopped.
struct Load {
    ok: Arc<AtomicU64>,
    phase: Arc<AtomicU8>,
    errors: Arc<Mutex<Vec<Failure>>>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

const GRACEFUL: u8 = 0;
const CRASH: u8 = 1;

impl Load {
    fn start(server: &Server, config: Arc<rustls::ClientConfig>, workers: usize) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let phase = Arc::new(AtomicU8::new(GRACEFUL));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (ok, phase, errors, stop) = (ok.clone(), phase.clone(), errors.clone(), stop.clone());
            let (addr, config) = (server.addrs.tls, config.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let result = clients::https_get(addr, &format!("n1.{ZONE}"), config.clone(), "/").await;
                    let ended_in = phase.load(Ordering::Relaxed);
                    match result {
                        Ok((200, body)) if body == "hello" => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(other) => errors.lock().unwrap().push((ended_in, started.elapsed(), format!("{other:?}"))),
                        Err(e) => errors.lock().unwrap().push((ended_in, started.elapsed(), format!("{e:#}"))),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
        Self { ok, phase, errors, stop, tasks }
    }

    /// Waits until `n` more requests have been answered (bounded).
    async fn progress(&self, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "load stalled: {:?}", self.errors.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> (u64, Vec<Failure>) {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        let errors = self.errors.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

fn restart(dir: &Path, join: &str, upstream: std::net::SocketAddr) -> Agent {
    Agent::spawn_with_config(dir, join, upstream, AGENT).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_node_and_restarts_lose_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), SERVER).unwrap();
    let join = server.add_node("n1").unwrap();
    let upstream = upstreams::http("hello").await;
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut a = restart(&dir_a, &join, upstream);
    a.wait_ready(Duration::from_secs(20)).unwrap();
    share_certificate(&dir_a, &dir_b);
    let mut b = restart(&dir_b, &join, upstream);
    b.wait_ready(Duration::from_secs(20)).unwrap();
    assert_ne!(
        std::fs::read_to_string(dir_a.join("replica.id")).unwrap(),
        std::fs::read_to_string(dir_b.join("replica.id")).unwrap(),
        "each installation has its own replica id"
    );
    let config = clients::client_config(&a.local_ca("n1")).unwrap();
    let load = Load::start(&server, config, 4);

    // Both replicas carry new connections.
    load.progress(200).await;
    let (served_a, served_b) = (streams_served(&a), streams_served(&b));
    println!("ha: spread over replicas: a={served_a} b={served_b}");
    assert!(served_a >= 20.0 && served_b >= 20.0, "streams not spread: a={served_a} b={served_b}");

    // Graceful restarts, one replica at a time: each says `leaving`, the
    // server moves new connections to the other, open ones finish.
    let mut restarts = 0;
    for _ in 0..2 {
        for (agent, dir) in [(&mut a, &dir_a), (&mut b, &dir_b)] {
            agent.proc.signal("TERM");
            let status = agent.proc.wait_exit(Duration::from_secs(15)).expect("agent drained and exited");
            assert!(status.success(), "agent exit: {status:?}\n{}", agent.proc.log_text());
            assert!(agent.proc.log_text().contains("asking the server for no new streams"));
            load.progress(50).await;
            *agent = restart(dir, &join, upstream);
            agent.wait_ready(Duration::from_secs(20)).unwrap();
            load.progress(50).await;
            restarts += 1;
        }
    }
    assert!(server.proc.log_text().contains("agent leaving"), "server saw no leaving notice");

    // A crash: the killed replica's tunnels look alive until the QUIC idle
    // timeout, so streams placed there go unanswered and are replayed on
    // the other replica. Requests it was serving at that instant are lost,
    // but must fail promptly (a reset when it comes back), never hang.
    load.phase.store(CRASH, Ordering::Relaxed);
    a.proc.child.kill().unwrap();
    let _ = a.proc.child.wait();
    load.progress(300).await;
    assert!(server.proc.log_text().contains("trying another tunnel"), "no replay after the crash");
    a = restart(&dir_a, &join, upstream);
    a.wait_ready(Duration::from_secs(20)).unwrap();
    load.progress(100).await;

    let (ok, errors) = load.stop().await;
    let graceful: Vec<_> = errors.iter().filter(|e| e.0 == GRACEFUL).collect();
    let crash: Vec<_> = errors.iter().filter(|e| e.0 == CRASH).collect();
    println!(
        "ha: {ok} requests answered; {} failed during {restarts} graceful restarts, {} in flight at the crash ({:?})",
        graceful.len(),
        crash.len(),
        crash.iter().map(|e| e.1).collect::<Vec<_>>()
    );
    assert!(graceful.is_empty(), "requests lost to graceful restarts: {graceful:?}");
    assert!(crash.len() <= 4, "more failures than requests in flight at the crash: {crash:?}");
    for (_, took, error) in &crash {
        assert!(
            *took < Duration::from_secs(8) && !error.contains("timed out"),
            "a client hung: {error} after {took:?}"
        );
    }

    // The server's drain is announced to the agents.
    let mut server = server;
    server.proc.signal("TERM");
    server.proc.wait_exit(Duration::from_secs(15)).expect("server exited");
    wait_for("agents told of the drain", Duration::from_secs(5), || {
        (a.proc.log_text().contains("server is shutting down") && b.proc.log_text().contains("server is shutting down"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nserver:\n{}\nagent a:\n{}", server.proc.log_text(), a.proc.log_text()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_an_agent_that_dies_mid_transfer_are_reset_promptly() {
    // The only agent of the node is killed: nothing can tell the server but
    // silence, so the tunnel's idle timeout (3 s here) bounds the wait.
    const IDLE: Duration = Duration::from_secs(3);
    let tmp = tempfile::tempdir().unwrap();
    let server =
        Server::start(&tmp.path().join("server"), "[tunnel]\nidle_timeout_secs = 3\nkeep_alive_secs = 1\n").unwrap();
    let join = server.add_node("n1").unwrap();
    let tuning = "[tunnel]\nidle_timeout_secs = 3\nkeep_alive_secs = 1\n";
    let mut agent = Agent::spawn_with_config(&tmp.path().join("a"), &join, upstreams::echo().await, tuning).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let config = clients::client_config(&agent.local_ca("n1")).unwrap();

    let mut transfers = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (addr, config) = (server.addrs.tls, config.clone());
        transfers.spawn(async move {
            let tls = clients::connect(addr, &format!("t{i}.n1.{ZONE}"), config).await.unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            // Echo continuously until the connection breaks.
            let writer = async move {
                let chunk = vec![0x5a; 16 * 1024];
                loop {
                    if let Err(e) = w.write_all(&chunk).await {
                        return e;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let reader = async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) => return std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "clean end"),
                        Ok(_) => {}
                        Err(e) => return e,
                    }
                }
            };
            let error = tokio::select! { e = writer => e, e = reader => e };
            (Instant::now(), error)
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.proc.child.kill().unwrap();
    let killed = Instant::now();
    let mut waits = Vec::new();
    while let Some(done) = transfers.join_next().await {
        let (at, error) = done.unwrap();
        let waited = at.duration_since(killed);
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "not a reset: {error}");
        waits.push(waited);
    }
    waits.sort();
    println!(
        "ha: 8 transfers of a killed agent reset after {:?}..{:?} (tunnel idle timeout {IDLE:?})",
        waits[0], waits[7]
    );
    assert!(waits[7] <= IDLE + Duration::from_secs(2), "clients hung for {:?}", waits[7]);
    let m = server.metrics().unwrap();
    assert_eq!(metric(&m, "edge_connections_open"), Some(0.0));
}
