//! Zero-downtime upgrade: `edge-server upgrade` under continuous load, twice
//! in a row (so the QUIC epoch flips and flips back). No client connection
//! is refused or fails, transfers open across the upgrade finish intact,
//! the agent moves to each new process, and each old process exits after
//! its drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server, ZONE};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TRANSFERS: usize = 20;
const CHUNK: usize = 16 * 1024;
const CHUNKS: usize = 30;
const LOAD_WORKERS: usize = 4;

/// Kills a process we did not spawn (a successor) when the test ends.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
    }
}

/// The next `n` messages on the notification socket.
fn notifications(socket: &std::os::unix::net::UnixDatagram, n: usize) -> Vec<String> {
    let mut buf = [0u8; 512];
    (0..n)
        .map(|_| {
            let got = socket.recv(&mut buf).expect("a notification within 20 s");
            String::from_utf8_lossy(&buf[..got]).into_owned()
        })
        .collect()
}

/// Whether `pid` has exited (gone, or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// One slow transfer through the tunnel to the echo upstream; true when
/// every byte came back in order.
async fn transfer(tls: SocketAddr, config: Arc<rustls::ClientConfig>, seed: u8) -> Result<(), String> {
    let stream = clients::connect(tls, &format!("n1.{ZONE}"), config).await.map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut sent = Sha256::new();
        for i in 0..CHUNKS {
            let chunk: Vec<u8> = (0..CHUNK).map(|j| (j as u8) ^ seed ^ (i as u8)).collect();
            sent.update(&chunk);
            w.write_all(&chunk).await.map_err(|e| format!("write: {e}"))?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        w.flush().await.map_err(|e| format!("flush: {e}"))?;
        Ok::<_, String>(sent.finalize())
    });
    let mut got = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    while total < CHUNK * CHUNKS {
        match tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf)).await {
            Ok(Ok(0)) => return Err(format!("closed after {total} bytes")),
            Ok(Err(e)) => return Err(format!("read after {total} bytes: {e}")),
            Err(_) => return Err(format!("stalled after {total} bytes")),
            Ok(Ok(n)) => {
                got.update(&buf[..n]);
                total += n;
            }
        }
    }
    let sent = writer.await.unwrap()?;
    if sent == got.finalize() {
        Ok(())
    } else {
        Err("bytes differ".into())
    }
}

/// One short request: a new TLS connection, 1 KiB echoed back.
async fn short_request(tls: SocketAddr, config: Arc<rustls::ClientConfig>, n: u64) -> Result<(), String> {
    let work = async {
        let mut stream =
            clients::connect(tls, &format!("n1.{ZONE}"), config).await.map_err(|e| format!("connect: {e}"))?;
        let payload: Vec<u8> = (0..1024u32).map(|i| (i as u64 ^ n) as u8).collect();
        stream.write_all(&payload).await.map_err(|e| format!("write: {e}"))?;
        let mut back = vec![0u8; payload.len()];
        stream.read_exact(&mut back).await.map_err(|e| format!("read: {e}"))?;
        if back != payload {
            return Err("echo differs".to_string());
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), work).await.map_err(|_| "timed out".to_string())?
}

#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// Runs `edge-server upgrade` and returns the new process's pid.
async fn upgrade(server: &Server) -> u32 {
    let (config, bin) = (server.config.clone(), edge_tests::bin("edge-server"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin).arg("--config").arg(config).arg("upgrade").output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "upgrade failed: {stderr}\nserver log:\n{}", server.proc.log_text());
    assert!(stderr.contains("accepts clients"), "progress lines are printed: {stderr}");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("the new pid on stdout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_refuses_nothing_and_moves_the_agent_to_each_new_process() {
    edge_net::raise_fd_limit();
    let tmp = tempfile::tempdir().unwrap();
    // Stands in for systemd's notification socket (Type=notify).
    let notify_path = tmp.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut server =
        Server::start_with_env(&tmp.path().join("server"), "", &[("NOTIFY_SOCKET", notify_path.as_os_str())]).unwrap();
    let first_pid = server.proc.child.id();
    assert_eq!(notifications(&notify, 1), ["READY=1\nSTATUS=serving"], "READY=1 once serving");
    let join = server.add_node("n1").unwrap();
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstreams::echo().await, &[]).unwrap();
    let config = clients::client_config(&agent.local_ca("n1")).unwrap();
    let tls = server.addrs.tls;

    // Continuous short requests from the start to the end.
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..LOAD_WORKERS {
        let (load, stop, config) = (load.clone(), stop.clone(), config.clone());
        workers.spawn(async move {
            let mut n = w as u64;
            while !stop.load(Ordering::Relaxed) {
                match short_request(tls, config.clone(), n).await {
                    Ok(()) => load.ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        load.errors.lock().unwrap().push(e);
                        load.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                n += LOAD_WORKERS as u64;
            }
        });
    }
    // Slow transfers open across the first upgrade.
    let mut transfers = tokio::task::JoinSet::new();
    for i in 0..TRANSFERS {
        transfers.spawn(transfer(tls, config.clone(), i as u8));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = load.ok.load(Ordering::Relaxed);
    assert!(before > 0, "the load runs before the upgrade");

    // First upgrade: the harness's process hands over and exits.
    let second_pid = upgrade(&server).await;
    let _second = KillOnDrop(second_pid);
    assert_ne!(second_pid, first_pid);
    // The old process still drains the slow transfers: another upgrade now
    // is refused (the new process keeps passing the old one its datagrams).
    let refused = server.cli_output(&["upgrade"]).unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("still draining"), "{refused:?}");
    let told = notifications(&notify, 1);
    assert!(told[0].starts_with(&format!("MAINPID={second_pid}\nREADY=1")), "systemd follows the successor: {told:?}");
    let status = server.proc.wait_exit(Duration::from_secs(45)).expect("the old process exits after its drain");
    assert!(status.success(), "the old process exits cleanly: {status:?}\n{}", server.proc.log_text());
    let pid_file = server.dir.join("data/edge-server.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        second_pid.to_string(),
        "the pid file names the new process"
    );
    // Transfers that spanned the upgrade finished intact on the old process.
    while let Some(result) = transfers.join_next().await {
        result.unwrap().unwrap_or_else(|e| panic!("a transfer across the upgrade failed: {e}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_first = load.ok.load(Ordering::Relaxed);
    assert!(after_first > before, "requests kept succeeding through the new process");

    // Second upgrade, from the successor (the epoch flips back).
    let third_pid = upgrade(&server).await;
    let _third = KillOnDrop(third_pid);
    assert_ne!(third_pid, second_pid);
    wait_for("the second process exits", Duration::from_secs(45), || exited(second_pid).then_some(())).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    while workers.join_next().await.is_some() {}

    let (ok, failed) = (load.ok.load(Ordering::Relaxed), load.failed.load(Ordering::Relaxed));
    let errors = load.errors.lock().unwrap().clone();
    assert_eq!(failed, 0, "{failed} of {} requests failed during the upgrades: {errors:?}", ok + failed);
    assert!(ok > after_first, "requests succeed after the second upgrade ({ok} in all)");

    // The agent followed: it was told twice and its tunnel is up on the
    // newest process (whose metrics listener is the same socket).
    let agent_log = agent.proc.log_text();
    assert!(
        agent_log.matches("the server is being upgraded").count() >= 2,
        "the agent moved at each upgrade:\n{agent_log}"
    );
    agent.wait_ready(Duration::from_secs(5)).unwrap();
    let metrics = edge_tests::http_get(server.addrs.metrics.unwrap(), "/metrics").unwrap().1;
    assert!(metric(&metrics, "edge_tunnels_connected").unwrap_or(0.0) >= 1.0, "{metrics}");
    let log = server.proc.log_text();
    assert_eq!(log.matches("took over from the predecessor").count(), 2, "{log}");
    assert!(log.contains("the predecessor exited: the upgrade is complete"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    if std::env::var_os("EDGE_TEST_SHOW_LOG").is_some() {
        eprintln!("{log}\n---- agent\n{agent_log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_cannot_start_leaves_the_running_server_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("n1").unwrap();
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstreams::echo().await, &[]).unwrap();
    let config = clients::client_config(&agent.local_ca("n1")).unwrap();

    // A "new binary" that exits at once.
    let fake = tmp.path().join("broken-edge-server");
    std::fs::write(&fake, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = server.cli_output(&["upgrade", "--binary", fake.to_str().unwrap()]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exited before it took over"), "{stderr}");

    // Nothing changed: the server serves, the tunnel is the same.
    assert!(server.proc.alive());
    short_request(server.addrs.tls, config.clone(), 1).await.unwrap();
    assert!(agent.proc.log_text().matches("tunnel up").count() <= 2, "the agent was not moved");
    // And a real upgrade still works afterwards.
    let pid = upgrade(&server).await;
    let _guard = KillOnDrop(pid);
    server.proc.wait_exit(Duration::from_secs(45)).expect("the old process exits");
    short_request(server.addrs.tls, config, 2).await.unwrap();
}
