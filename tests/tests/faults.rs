//! Faults from outside: a black-holed QUIC path, a fleet reconnecting after
//! a server restart, corrupt or missing files at start, a full disk during
//! certificate renewal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edge_proto::join::JoinTicket;
use edge_tests::faults::{self, UdpRelay};
use edge_tests::pebble::{free_port, Pebble};
use edge_tests::{bin, clients, http_get, metric, upstreams, wait_for, Agent, Server, ZONE};

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

fn ready(agent: &Agent) -> u16 {
    http_get(agent.status, "/ready").map(|(code, _)| code).unwrap_or(0)
}

const SHORT_TUNNEL: &str = "[tunnel]\nidle_timeout_secs = 3\nkeep_alive_secs = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_blackhole_is_noticed_and_the_agent_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), SHORT_TUNNEL).unwrap();
    let relay = UdpRelay::start(server.addrs.quic).unwrap();
    let mut ticket = JoinTicket::parse(&server.add_node("web").unwrap()).unwrap();
    ticket.server = relay.addr.to_string();
    let join = ticket.to_string();
    let upstream = upstreams::http("through the relay").await;
    let agent_config = format!("{SHORT_TUNNEL}[reconnect]\ninitial_ms = 250\nmax_ms = 2000\n");
    let mut agent = Agent::spawn_with_config(&tmp.path().join("agent"), &join, upstream, &agent_config).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let (ca, host) = (agent.local_ca("web"), format!("web.{ZONE}"));
    assert_eq!(server.fetch(&ca, &host).await.unwrap(), "through the relay");

    // Black hole: nothing passes either way. The agent notices within the
    // idle timeout (3 s) plus a margin, and so does the server.
    relay.set_paused(true);
    let paused = Instant::now();
    wait_for("agent /ready 503 while black-holed", Duration::from_secs(8), || (ready(&agent) == 503).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_text()));
    let noticed = paused.elapsed();
    assert!(agent.proc.log_text().contains("tunnel down; reconnecting"), "{}", agent.proc.log_text());
    wait_for("server drops the dead tunnel", Duration::from_secs(8), || {
        server.proc.log_text().contains("agent disconnected").then_some(())
    })
    .unwrap();
    let server_noticed = paused.elapsed();
    // Stay dark through a few failed attempts (the backoff tops at 2 s).
    let attempts = |a: &Agent| a.proc.log_text().matches("tunnel down; reconnecting").count();
    let before = attempts(&agent);
    wait_for("failed attempts while dark", Duration::from_secs(20), || (attempts(&agent) >= before + 2).then_some(()))
        .unwrap();
    assert_eq!(ready(&agent), 503);
    assert!(server.fetch(&ca, &host).await.is_err(), "no tunnel, no answer");

    relay.set_paused(false);
    let resumed = Instant::now();
    agent.wait_ready(Duration::from_secs(15)).unwrap();
    let back = resumed.elapsed();
    let body = wait_for("a request through the new tunnel", Duration::from_secs(10), || {
        block_on(server.fetch(&ca, &host)).ok()
    })
    .unwrap();
    assert_eq!(body, "through the relay");
    assert!(agent.proc.alive());
    println!(
        "faults: black hole noticed by the agent in {:.1} s, by the server in {:.1} s; \
         back {:.1} s after the path returned ({} datagrams dropped)",
        noticed.as_secs_f64(),
        server_noticed.as_secs_f64(),
        back.as_secs_f64(),
        relay.dropped()
    );

    // A new agent process (new UDP source port) through the same relay.
    drop(agent);
    let agent = Agent::start(&tmp.path().join("agent2"), &join, upstream, &[]).unwrap();
    assert_eq!(relay.clients(), 2, "one relay mapping per agent socket");
    let ca = agent.local_ca("web");
    let body = wait_for("a request through the second agent", Duration::from_secs(10), || {
        block_on(server.fetch(&ca, &host)).ok()
    })
    .unwrap();
    assert_eq!(body, "through the relay");
}

/// First "agent connected" time per replica in a JSON server log.
fn connect_times(log: &str) -> HashMap<String, f64> {
    let mut first = HashMap::new();
    for (at, fields) in faults::json_events(log, "agent connected") {
        let replica = fields["replica"].as_str().unwrap_or_default().to_string();
        first.entry(replica).or_insert(at);
    }
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_agents_reconnects_spread_out_after_a_server_restart() {
    const FLEET: usize = 100;
    let tmp = tempfile::tempdir().unwrap();
    let server_dir = tmp.path().join("server");
    let config = "log_format = \"json\"\n[limits]\ndrain_timeout_secs = 1\n";
    let mut server = Server::start(&server_dir, config).unwrap();
    let join = server.add_node("fleet").unwrap();
    let upstream = upstreams::http("fleet").await;
    let started = Instant::now();
    let agent_config = "connections = 1\n[tunnel]\nidle_timeout_secs = 5\nkeep_alive_secs = 1\n";
    let agents: Vec<Agent> = (0..FLEET)
        .map(|i| Agent::spawn_with_config(&tmp.path().join(format!("a{i}")), &join, upstream, agent_config).unwrap())
        .collect();
    wait_for("the whole fleet connected", Duration::from_secs(90), || {
        (connect_times(&server.proc.log_text()).len() >= FLEET).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {} connected", connect_times(&server.proc.log_text()).len()));
    println!("faults: {FLEET} agents connected in {:.1} s", started.elapsed().as_secs_f64());

    let addrs = server.addrs;
    server.proc.signal("TERM");
    let status = server.proc.wait_exit(Duration::from_secs(15)).expect("server exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    // Down for 2 s. Agents whose pending handshake is still retransmitting
    // when the server returns arrive together; with 3 s, whether they still
    // are depends on timing, and the outcome flips between runs.
    std::thread::sleep(Duration::from_secs(2));
    let restart = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    server = Server::start_on(&server_dir, config, Some(addrs)).unwrap();
    let times = wait_for("the whole fleet reconnected", Duration::from_secs(35), || {
        let t = connect_times(&server.proc.log_text());
        (t.len() >= FLEET).then_some(t)
    })
    .unwrap_or_else(|e| panic!("{e}: {} back", connect_times(&server.proc.log_text()).len()));
    let mut times: Vec<f64> = times.into_values().collect();
    times.sort_by(f64::total_cmp);
    let (first, last) = (times[0] - restart, times[FLEET - 1] - restart);
    let busiest = faults::busiest_window(&times, 0.1);
    let mut bins = vec![0usize; ((times[FLEET - 1] - times[0]) * 10.0) as usize + 1];
    for t in &times {
        bins[((t - times[0]) * 10.0) as usize] += 1;
    }
    println!("faults: reconnects per 100 ms from the first: {bins:?}");
    println!(
        "faults: reconnect spread {:.2} s over {FLEET} agents (first {first:.2} s, last {last:.2} s after the \
         restart began); busiest 100 ms window: {busiest}",
        last - first
    );
    assert!(last <= 30.0, "the last agent came back {last:.1} s after the restart");
    assert!(busiest * 10 <= FLEET * 6, "{busiest} of {FLEET} reconnects in one 100 ms window");
    let alive = agents.into_iter().map(|mut a| a.proc.alive()).filter(|&a| a).count();
    assert_eq!(alive, FLEET, "every agent survived the restart");
}

/// A minimal server config in `dir` (ports chosen by the kernel).
fn server_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let path = dir.join("server.toml");
    let listen = "[listen]\ntls = \"127.0.0.1:0\"\nquic = \"127.0.0.1:0\"\napi = \"127.0.0.1:0\"\n";
    std::fs::write(&path, format!("zone = \"{ZONE}\"\ndata_dir = \"data\"\n{extra}\n{listen}")).unwrap();
    path
}

/// Runs a command that should fail at start: asserts a non-zero exit within
/// 10 s and that stderr names `file`.
fn fails_naming(what: &str, cmd: Command, log: std::path::PathBuf, file: &Path) -> Duration {
    let started = Instant::now();
    let (code, stderr) = faults::run_bounded(cmd, log, Duration::from_secs(10)).unwrap();
    let took = started.elapsed();
    assert!(matches!(code, Some(c) if c != 0), "{what}: exit {code:?}\n{stderr}");
    assert!(stderr.contains(&*file.to_string_lossy()), "{what}: stderr does not name {}:\n{stderr}", file.display());
    let line = stderr.lines().find(|l| l.contains("error:")).unwrap_or_default();
    println!("faults: {what}: exit {} after {:.2} s: {line}", code.unwrap(), took.as_secs_f64());
    took
}

fn server_cmd(config: &Path) -> Command {
    let mut cmd = Command::new(bin("edge-server"));
    cmd.arg("--config").arg(config).arg("run");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_missing_files_fail_at_start_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    // (a) edge.db holds garbage.
    let config = server_config(&t.join("garbage"), "");
    let db = t.join("garbage/data/edge.db");
    std::fs::write(&db, "this is not an SQLite database\n".repeat(200)).unwrap();
    fails_naming("garbage edge.db", server_cmd(&config), t.join("garbage.log"), &db);

    // (d) the configured server identity is missing.
    let cert = t.join("identity/missing.crt");
    let extra = format!("[identity]\ncert_file = \"{}\"\nkey_file = \"{}\"\n", cert.display(), cert.display());
    let config = server_config(&t.join("identity"), &extra);
    fails_naming("missing identity cert", server_cmd(&config), t.join("identity.log"), &cert);

    // (e) a read-only data directory: an empty one, and one holding the
    // database of an earlier run.
    let config = server_config(&t.join("ro-empty"), "");
    let data = t.join("ro-empty/data");
    let setup = format!("mount -t tmpfs -o ro tmpfs '{}'", data.display());
    let cmd = faults::in_namespace(&setup, &bin("edge-server"), &["--config", &config.to_string_lossy(), "run"]);
    fails_naming("read-only empty data_dir", cmd, t.join("ro-empty.log"), &data.join("edge.db"));
    let dir = t.join("ro-db");
    let server = Server::start(&dir, "").unwrap();
    server.add_node("n1").unwrap();
    let config = server.config.clone();
    drop(server);
    let data = dir.join("data");
    let setup = format!("mount --bind '{0}' '{0}' && mount -o remount,ro,bind '{0}'", data.display());
    let cmd = faults::in_namespace(&setup, &bin("edge-server"), &["--config", &config.to_string_lossy(), "run"]);
    fails_naming("read-only data_dir with a database", cmd, t.join("ro-db.log"), &data.join("edge.db"));

    // Agents: (b) a missing certificate, (c) a key "file" that is a
    // directory. The files are read once the server has welcomed the
    // agent, so a server runs.
    let server = Server::start(&t.join("server"), "").unwrap();
    let join = server.add_node("n1").unwrap();
    let agent = |name: &str, cert: &Path, key: &Path| {
        let mut cmd = Command::new(bin("edge-agent"));
        cmd.args(["run", "--join", &join, "--upstream", "127.0.0.1:9", "--data-dir"])
            .arg(t.join(name))
            .arg("--cert-file")
            .arg(cert)
            .arg("--key-file")
            .arg(key);
        cmd
    };
    let missing = t.join("nowhere/node.crt");
    let key = t.join("node.key");
    let pair = rcgen::generate_simple_self_signed(vec![format!("n1.{ZONE}")]).unwrap();
    std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
    fails_naming("agent cert_file missing", agent("b", &missing, &key), t.join("b.log"), &missing);
    let cert = t.join("node.crt");
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    let key_dir = t.join("key-is-a-directory");
    std::fs::create_dir_all(&key_dir).unwrap();
    fails_naming("agent key_file is a directory", agent("c", &cert, &key_dir), t.join("c.log"), &key_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_cert_file_fails_at_start_even_without_a_server() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let token = edge_proto::join::make_token("n1", &[7; 32]);
    let join = format!("edge://{token}@127.0.0.1:{}?fp={}", free_port().unwrap(), "ab".repeat(32));
    let missing = t.join("nowhere/node.crt");
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["run", "--join", &join, "--upstream", "127.0.0.1:9", "--data-dir"]).arg(t.join("d"));
    cmd.arg("--cert-file").arg(&missing).arg("--key-file").arg(t.join("nowhere/node.key"));
    fails_naming("agent cert_file missing, server unreachable", cmd, t.join("a.log"), &missing);
}

/// Serial of the certificate a fresh TLS handshake for `host` gets.
async fn served_serial(server: &Server, root: &Path, host: &str) -> anyhow::Result<String> {
    let tls = clients::connect(server.addrs.tls, host, clients::client_config(root)?).await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    edge_certs::info::cert_info(&leaf).map(|i| i.serial).map_err(anyhow::Error::msg)
}

fn renewals(agent: &Agent) -> f64 {
    agent.metrics().ok().and_then(|m| metric(&m, "edge_agent_certificate_renewals_total")).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_current_certificate_in_service() {
    let tmp = tempfile::tempdir().unwrap();
    let pebble_port = free_port().unwrap();
    let pebble_dir = tmp.path().join("pebble");
    let server = Server::start(
        &tmp.path().join("server"),
        &format!(
            "[dns]\nlisten = \"127.0.0.1:0\"\n[acme]\ndirectories = [\"{}\"]\nroot_ca_file = \"{}\"\ncaa_issuers = [\"pebble.test\"]\n",
            Pebble::directory_for(pebble_port),
            pebble_dir.join("listener-ca.pem").display()
        ),
    )
    .unwrap();
    let pebble = Pebble::start(&pebble_dir, pebble_port, server.addrs.dns.unwrap()).unwrap();
    let join = server.add_node("n1").unwrap();
    let upstream = upstreams::http("hello from n1").await;
    let renewal = "[acme.renewal]\nrenew_after_secs = 8\nretry_initial_secs = 1\nretry_max_secs = 3\n";
    let mut agent = faults::agent_on_tmpfs(&tmp.path().join("agent"), "512k", &join, upstream, renewal).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    wait_for("first certificate", Duration::from_secs(90), || (renewals(&agent) >= 1.0).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_text()));
    let root = pebble.issuing_root().unwrap();
    let host = format!("n1.{ZONE}");

    // Fill the tmpfs until ENOSPC.
    let fill = agent.data_dir.join("fill");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&fill).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let err = loop {
            if let Err(e) = file.write_all(&chunk) {
                break e;
            }
        };
        assert_eq!(err.raw_os_error(), Some(28), "ENOSPC expected, got {err}");
    }
    // The serial served now, and the renewal count it belongs to.
    let (installed, s1) = wait_for("a stable serial", Duration::from_secs(30), || {
        let before = renewals(&agent);
        let serial = block_on(served_serial(&server, &root, &host)).ok()?;
        (renewals(&agent) == before).then_some((before, serial))
    })
    .unwrap();

    // A renewal falls due, gets a certificate, and cannot store it.
    let failed = Instant::now();
    let log_failures = |a: &Agent| a.proc.log_text().matches("storing the new certificate failed").count();
    wait_for("a storage failure in the log", Duration::from_secs(60), || (log_failures(&agent) >= 2).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_text()));
    let log = agent.proc.log_text();
    assert!(log.contains("No space left on device"), "{log}");
    assert!(agent.proc.alive(), "the agent survives a full disk");
    assert_eq!(renewals(&agent), installed, "nothing installed while the disk is full");
    let serial = served_serial(&server, &root, &host).await.unwrap();
    assert_eq!(serial, s1, "the current certificate stays in service");
    assert_eq!(server.fetch(&root, &host).await.unwrap(), "hello from n1");
    let failures = metric(&agent.metrics().unwrap(), "edge_agent_certificate_failures_total").unwrap_or(0.0);
    assert!(failures >= 2.0, "failures counted: {failures}");
    let stray: Vec<_> = std::fs::read_dir(agent.data_dir.join("certs/acme"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "temporary files left on the full disk: {stray:?}");

    // Space again: the next attempt stores and serves a new certificate.
    std::fs::remove_file(&fill).unwrap();
    let freed = Instant::now();
    let s2 = wait_for("a new serial after space returns", Duration::from_secs(60), || {
        let serial = block_on(served_serial(&server, &root, &host)).ok()?;
        (serial != s1).then_some(serial)
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_text()));
    assert!(agent.proc.alive());
    println!(
        "faults: full disk: {} failed stores over {:.1} s kept serial {s1}; serial {s2} served {:.1} s after space returned",
        log_failures(&agent),
        failed.elapsed().as_secs_f64() - freed.elapsed().as_secs_f64(),
        freed.elapsed().as_secs_f64()
    );
    agent.proc.signal("TERM");
    agent.proc.wait_exit(Duration::from_secs(10));
}
