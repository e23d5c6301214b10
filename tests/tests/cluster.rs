//! A cluster of three edge-servers on 127.0.0.1, 127.0.0.2 and 127.0.0.3
//! sharing one PostgreSQL (the harness's own), with real agents, curl and
//! dig: every server serves every node, agents connect to every server and
//! keep the list across restarts, a killed server drops out of DNS after
//! its lease and loses no request through the others, a server without the
//! node's tunnel forwards through a peer, one decider writes each mode
//! transition once, and removal cuts tunnels everywhere within a second.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_tests::dns::dig;
use edge_tests::postgres::Postgres;
use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server, ServerAddrs, ZONE};

/// Config of server `n` (1..=3) of the cluster on `store`.
fn cluster_config(store: &str, n: u8, extra: &str) -> String {
    cluster_config_with_lease(store, n, 3000, extra)
}

fn cluster_config_with_lease(store: &str, n: u8, lease_ms: u64, extra: &str) -> String {
    format!(
        "{store}\n[dns]\nlisten = \"127.0.0.{n}:0\"\nnameservers = [\"ns{n}.{ZONE}\"]\n\
         [cluster]\nname = \"edge-{n}\"\nlease_ms = {lease_ms}\nrenew_ms = 500\ndecider_lease_ms = 3000\n{extra}"
    )
}

fn host(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// `cluster status --json` through `server`'s CLI.
fn status(server: &Server) -> serde_json::Value {
    serde_json::from_str(&server.cli(&["cluster", "status", "--json"]).unwrap()).unwrap()
}

/// Names of the live servers, and per server the nodes it has tunnels to.
fn live_servers(server: &Server) -> Vec<(String, Vec<String>)> {
    let status = status(server);
    let mut live: Vec<(String, Vec<String>)> = status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["alive"] == true)
        .map(|s| {
            let tunnels = s["tunnels"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
            (s["name"].as_str().unwrap().to_string(), tunnels)
        })
        .collect();
    live.sort();
    live
}

/// The node's page through `server`, with curl (resolving the name to it).
fn curl(server: &Server, ca: &Path, name: &str) -> Result<String, String> {
    let port = server.addrs.tls.port();
    let ip = server.addrs.tls.ip();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve", &format!("{name}:{port}:{ip}"), "--cacert"])
        .arg(ca)
        .arg(format!("https://{name}:{port}/"))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dns_of(server: &Server) -> SocketAddr {
    server.addrs.dns.expect("the server runs DNS")
}

fn soa_serial(dns: SocketAddr) -> u64 {
    let soa = dig(dns, ZONE, "SOA", false).unwrap().data("SOA");
    soa[0].split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Clients that each open a new TLS connection per request through one
/// of `targets`, in turn, counting answers and failures until stopped.
struct Load {
    ok: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(targets: Vec<SocketAddr>, sni: String, config: Arc<rustls::ClientConfig>, workers: usize) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            let (ok, errors, stop, targets, sni, config) =
                (ok.clone(), errors.clone(), stop.clone(), targets.clone(), sni.clone(), config.clone());
            tasks.spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let addr = targets[i % targets.len()];
                    i += 1;
                    match clients::https_get(addr, &sni, config.clone(), "/").await {
                        Ok((200, _)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(other) => errors.lock().unwrap().push(format!("{addr}: {other:?}")),
                        Err(e) => errors.lock().unwrap().push(format!("{addr}: {e:#}")),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
        Self { ok, errors, stop, tasks }
    }

    async fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        (self.ok.load(Ordering::Relaxed), self.errors.lock().unwrap().clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_serve_every_node_and_losing_one_loses_nothing() {
    let pg = Postgres::start().unwrap();
    pg.create_db("edge").unwrap();
    let store = pg.store_section("edge");
    let tmp = tempfile::tempdir().unwrap();
    let mut servers: Vec<Server> = (1..=3)
        .map(|n| Server::start_at(&tmp.path().join(format!("s{n}")), &cluster_config(&store, n, ""), host(n)).unwrap())
        .collect();
    // Every server sees all three live.
    let names = vec!["edge-1".to_string(), "edge-2".to_string(), "edge-3".to_string()];
    wait_for("three live servers", Duration::from_secs(10), || {
        (live_servers(&servers[0]).iter().map(|s| s.0.clone()).collect::<Vec<_>>() == names).then_some(())
    })
    .unwrap();

    // Added through B's CLI: every server routes it within 2 s.
    let added = Instant::now();
    servers[1].cli(&["node", "add", "web"]).unwrap();
    for server in &servers {
        wait_for("the node routed by every server", Duration::from_secs(2), || {
            let token = server.admin_token();
            server.api_get("/api/nodes/web", Some(&token)).is_ok_and(|(code, _)| code == 200).then_some(())
        })
        .unwrap();
    }
    eprintln!("cluster: node added through B routed by all three after {:?}", added.elapsed());
    // A join string naming A only (rotation works through any server too).
    let join = servers[0].cli(&["node", "rotate-token", "web"]).unwrap().trim().to_string();
    let ticket = edge_proto::join::JoinTicket::parse(&join).unwrap();
    assert!(ticket.server.starts_with("127.0.0.1:"), "the join string names server A: {}", ticket.server);
    let upstream = upstreams::http("hello from web").await;
    let agent_dir = tmp.path().join("agent");
    let mut agent = Agent::start(&agent_dir, &join, upstream, &[]).unwrap();
    let ca = agent.local_ca("web");
    let name = format!("web.{ZONE}");
    for server in &servers {
        let body =
            wait_for("the node served through each server", Duration::from_secs(10), || curl(server, &ca, &name).ok())
                .unwrap();
        assert_eq!(body, "hello from web");
    }

    // The agent holds tunnels to all three (it learned B and C from A).
    wait_for("tunnels on every server", Duration::from_secs(10), || {
        live_servers(&servers[2]).iter().all(|(_, t)| t == &["web".to_string()]).then_some(())
    })
    .unwrap();
    let kept = std::fs::read_to_string(agent_dir.join("servers.json")).unwrap();
    for n in 1..=3 {
        assert!(kept.contains(&format!("edge-{n}")), "the agent keeps the list: {kept}");
    }
    let decider = status(&servers[0])["decider"]["holder"].as_str().map(str::to_string);
    assert!(decider.is_some(), "one server decides modes: {}", status(&servers[0]));

    // DNS from every server: the same NS set, glue, proxied addresses and
    // SOA serial.
    let dns: Vec<SocketAddr> = servers.iter().map(dns_of).collect();
    let all_ns = vec![format!("ns1.{ZONE}."), format!("ns2.{ZONE}."), format!("ns3.{ZONE}.")];
    let all_ips = vec!["127.0.0.1".to_string(), "127.0.0.2".to_string(), "127.0.0.3".to_string()];
    wait_for("agreeing zones", Duration::from_secs(10), || {
        let serials: Vec<u64> = dns.iter().map(|d| soa_serial(*d)).collect();
        let agree = serials.iter().all(|s| *s == serials[0]);
        let complete = dns.iter().all(|d| {
            sorted(dig(*d, ZONE, "NS", false).unwrap().data("NS")) == all_ns
                && sorted(dig(*d, &name, "A", false).unwrap().data("A")) == all_ips
        });
        (agree && complete).then_some(())
    })
    .unwrap();
    assert_eq!(dig(dns[0], &format!("ns2.{ZONE}"), "A", false).unwrap().data("A"), vec!["127.0.0.2"]);

    // Server A killed under load through B and C: nothing fails there.
    let config = clients::client_config(&ca).unwrap();
    let load = Load::start(vec![servers[1].addrs.tls, servers[2].addrs.tls], name.clone(), config.clone(), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a_addrs: ServerAddrs = servers[0].addrs;
    let killed = Instant::now();
    servers[0].proc.signal("KILL");
    let _ = servers[0].proc.wait_exit(Duration::from_secs(5));
    // After the lease, B and C no longer answer A's address.
    let two_ips = vec!["127.0.0.2".to_string(), "127.0.0.3".to_string()];
    let dropped = wait_for("A out of DNS", Duration::from_secs(15), || {
        dns[1..]
            .iter()
            .all(|d| {
                sorted(dig(*d, &name, "A", false).unwrap().data("A")) == two_ips
                    && !dig(*d, ZONE, "NS", false).unwrap().data("NS").contains(&format!("ns1.{ZONE}."))
            })
            .then(|| killed.elapsed())
    })
    .unwrap();
    eprintln!("cluster: server killed -> its address gone from the others' DNS after {dropped:?}");
    let decider_after = wait_for("a decider after the kill", Duration::from_secs(10), || {
        let holder = status(&servers[1])["decider"]["holder"].as_str().map(str::to_string)?;
        let alive: Vec<String> = status(&servers[1])["servers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["alive"] == true)
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        alive.contains(&holder).then_some(holder)
    })
    .unwrap();
    eprintln!("cluster: decider after the kill: {decider_after} (before: {decider:?})");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, errors) = load.finish().await;
    assert!(ok > 20, "requests went through B and C ({ok})");
    assert!(
        errors.is_empty(),
        "{} failed requests through B and C: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    eprintln!("cluster: {ok} requests through B and C while A was killed, 0 failed");

    // The agent restarted while A (its join string's server) is down still
    // reaches B and C, from the list it kept.
    agent.proc.signal("TERM");
    assert!(agent.proc.wait_exit(Duration::from_secs(15)).is_some());
    let mut agent = Agent::start(&agent_dir, &join, upstream, &[]).unwrap();
    for server in &servers[1..] {
        let body =
            wait_for("served after the agent's restart", Duration::from_secs(15), || curl(server, &ca, &name).ok())
                .unwrap();
        assert_eq!(body, "hello from web");
    }

    // A restarted: the agent returns to it by itself.
    servers[0] = Server::start_on(&tmp.path().join("s1"), &cluster_config(&store, 1, ""), Some(a_addrs)).unwrap();
    wait_for("the agent back on A", Duration::from_secs(20), || {
        live_servers(&servers[1]).iter().find(|(n, _)| n == "edge-1").is_some_and(|(_, t)| !t.is_empty()).then_some(())
    })
    .unwrap();
    assert_eq!(curl(&servers[0], &ca, &name).unwrap(), "hello from web");

    // Removal through B cuts the tunnels on A and C within a second.
    let removed = Instant::now();
    servers[1].cli(&["node", "remove", "web"]).unwrap();
    let cut = wait_for("no tunnel left anywhere", Duration::from_secs(1), || {
        servers
            .iter()
            .all(|s| metric(&s.metrics().unwrap(), "edge_tunnels_connected") == Some(0.0))
            .then(|| removed.elapsed())
    })
    .unwrap();
    let Some(exit) = agent.proc.wait_exit(Duration::from_secs(3)) else {
        panic!("the agent did not exit once its node was removed:\n{}", agent.proc.log_text());
    };
    assert_eq!(exit.code(), Some(2), "{}", agent.proc.log_text());
    eprintln!("cluster: node removed through B, tunnels on every server gone after {cut:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_the_agent_cannot_reach_forwards_through_a_peer() {
    let pg = Postgres::start().unwrap();
    pg.create_db("edge").unwrap();
    let store = pg.store_section("edge");
    let tmp = tempfile::tempdir().unwrap();
    let b = Server::start_at(&tmp.path().join("b"), &cluster_config(&store, 2, ""), host(2)).unwrap();
    // C is reached by agents only through a relay the test blackholes;
    // peers dial its real address.
    let c_dir = tmp.path().join("c");
    let mut c = Server::start_at(&c_dir, &cluster_config(&store, 3, ""), host(3)).unwrap();
    let relay = edge_tests::faults::UdpRelay::start(c.addrs.quic).unwrap();
    relay.set_paused(true);
    let c_addrs = c.addrs;
    c.proc.signal("TERM");
    assert!(c.proc.wait_exit(Duration::from_secs(15)).is_some());
    let extra = format!("peer = \"{}\"\n[public]\nquic = \"{}\"\n", c_addrs.quic, relay.addr);
    let c = Server::start_on(&c_dir, &cluster_config(&store, 3, &extra), Some(c_addrs)).unwrap();

    let join = b.add_node("bulk").unwrap();
    let upstream = upstreams::echo().await;
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();
    let ca = agent.local_ca("bulk");
    wait_for("the agent's tunnel on B, none on C", Duration::from_secs(15), || {
        let live = live_servers(&c);
        let on = |n: &str| live.iter().find(|(s, _)| s == n).map(|(_, t)| t.clone());
        (on("edge-2") == Some(vec!["bulk".to_string()]) && on("edge-3") == Some(Vec::new())).then_some(())
    })
    .unwrap();
    assert!(relay.dropped() > 0, "the agent tried C through the blackholed relay");

    // 100 connections x 1 MiB through C, each echoed back and checked.
    let config = clients::client_config(&ca).unwrap();
    let sni = format!("bulk.{ZONE}");
    if let Err(e) = clients::connect(c.addrs.tls, &sni, config.clone()).await {
        panic!("through C: {e:#}\nC:\n{}\nB:\n{}", c.proc.log_text(), b.proc.log_text());
    }
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..100u32 {
        let (config, sni, addr) = (config.clone(), sni.clone(), c.addrs.tls);
        tasks.spawn(async move {
            use sha2::{Digest, Sha256};
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut data = vec![0u8; 1 << 20];
            for (j, b) in data.iter_mut().enumerate() {
                *b = (j as u32).wrapping_mul(2_654_435_761).wrapping_add(i).to_le_bytes()[0];
            }
            let stream = clients::connect(addr, &sni, config).await?;
            let (mut r, mut w) = tokio::io::split(stream);
            let sent = Sha256::digest(&data);
            let writer = async move {
                w.write_all(&data).await?;
                w.shutdown().await?;
                anyhow::Ok(())
            };
            let reader = async move {
                let mut back = Vec::with_capacity(1 << 20);
                r.read_to_end(&mut back).await?;
                anyhow::Ok(back)
            };
            let ((), back) = tokio::try_join!(writer, reader)?;
            anyhow::ensure!(back.len() == 1 << 20, "got {} bytes back", back.len());
            anyhow::ensure!(Sha256::digest(&back) == sent, "hash mismatch");
            anyhow::Ok(())
        });
        if tasks.len() >= 10 {
            tasks.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    eprintln!("cluster: 100 x 1 MiB through a forwarding server in {:?}", started.elapsed());
    let forwarded = metric(&c.metrics().unwrap(), "edge_peer_forwarded_total").unwrap();
    let accepted = metric(&b.metrics().unwrap(), "edge_peer_accepted_total").unwrap();
    assert!(forwarded >= 100.0 && accepted >= 100.0, "C forwarded {forwarded}, B placed {accepted}");
}

/// Which of `servers` holds the decider lease now (by the id each keeps in
/// its data directory).
fn decider_index(servers: &[Server], via: &Server) -> Option<usize> {
    let holder = status(via)["decider"]["holder"].as_str()?.to_string();
    servers
        .iter()
        .position(|s| std::fs::read_to_string(s.dir.join("data/server.id")).is_ok_and(|id| id.trim() == holder))
}

fn mode_of(server: &Server, name: &str) -> String {
    let list: serde_json::Value = serde_json::from_str(&server.cli(&["node", "list", "--json"]).unwrap()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .map(|n| n["mode"].as_str().unwrap().to_string())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_decider_writes_each_transition_once_and_fails_over() {
    let pg = Postgres::start().unwrap();
    pg.create_db("edge").unwrap();
    let store = pg.store_section("edge");
    let tmp = tempfile::tempdir().unwrap();
    let modes = "[modes]\nprobe_interval_ms = 300\nprobe_timeout_ms = 1000\nfailures_to_proxy = 3\n";
    let mut servers: Vec<Server> = (1..=3)
        .map(|n| {
            let config = format!("{}\n{modes}", cluster_config(&store, n, ""));
            Server::start_at(&tmp.path().join(format!("s{n}")), &config, host(n)).unwrap()
        })
        .collect();
    wait_for("three live servers", Duration::from_secs(10), || (live_servers(&servers[0]).len() == 3).then_some(()))
        .unwrap();

    // The node is reachable directly through a gate on 127.0.0.4.
    let direct: SocketAddr = ([127, 0, 0, 1], edge_tests::pebble::free_port().unwrap()).into();
    let gate = upstreams::Gate::start(([127, 0, 0, 4], 0).into(), direct).await;
    let upstream = upstreams::http("hello").await;
    let join = servers[0].add_node("n1").unwrap();
    let _agent = Agent::start(
        &tmp.path().join("agent"),
        &join,
        upstream,
        &["--direct-listen", &direct.to_string(), "--public-endpoint", &gate.addr.to_string()],
    )
    .unwrap();
    let count = |from: &str, to: &str| -> u64 {
        let sql = format!(
            "SELECT count(*) FROM mode_transitions WHERE name = 'n1' AND from_mode = '{from}' AND to_mode = '{to}'"
        );
        pg.sql("edge", &sql).unwrap().trim().parse().unwrap()
    };
    wait_for("n1 direct", Duration::from_secs(20), || (mode_of(&servers[1], "n1") == "direct").then_some(())).unwrap();
    assert_eq!(count("proxy", "direct"), 1, "three servers probing wrote one transition");

    // A flip: the gate closes; one transition back to proxy.
    gate.set_open(false);
    wait_for("n1 proxy", Duration::from_secs(20), || (mode_of(&servers[1], "n1") == "proxy").then_some(())).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count("direct", "proxy"), 1, "one transition row for one flip");

    // The decider killed as the gate opens again: another server takes
    // over within the lease and the flip back is written once.
    let leader = decider_index(&servers, &servers[0]).expect("a decider");
    let other = (leader + 1) % 3;
    gate.set_open(true);
    let killed = Instant::now();
    servers[leader].proc.signal("KILL");
    let _ = servers[leader].proc.wait_exit(Duration::from_secs(5));
    let (new_leader, failover) = wait_for("a new decider", Duration::from_secs(10), || {
        decider_index(&servers, &servers[other]).filter(|i| *i != leader).map(|i| (i, killed.elapsed()))
    })
    .unwrap();
    eprintln!("cluster: decider killed -> server {new_leader} decides after {failover:?}");
    wait_for("n1 direct again", Duration::from_secs(20), || (mode_of(&servers[other], "n1") == "direct").then_some(()))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count("proxy", "direct"), 2, "the flip back written once");
    assert_eq!(count("direct", "proxy"), 1, "and nothing written twice");
    // Every row follows the one before it (no transition repeated).
    let rows = pg
        .sql(
            "edge",
            "SELECT string_agg(from_mode || '>' || to_mode, ',' ORDER BY id) FROM mode_transitions WHERE name = 'n1'",
        )
        .unwrap();
    let steps: Vec<(&str, &str)> = rows.trim().split(',').filter_map(|s| s.split_once('>')).collect();
    for pair in steps.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "transitions chain: {rows}");
    }

    // The batch probe endpoint peers use: a live server's identity or the
    // admin token, and a bounded batch.
    let probe = r#"{"endpoint":"127.0.0.1:9","sni":"n1.edge.test","nonce":"NONCE"}"#.replace("NONCE", &"00".repeat(32));
    let batch = |n: usize| format!("{{\"probes\":[{}]}}", vec![probe.as_str(); n].join(","));
    let server = &servers[other];
    let (code, _) = server.api_call("POST", "/api/probe/batch", None, Some(&batch(1))).unwrap();
    assert_eq!(code, 401, "no credential, no probe");
    let (code, body) =
        server.api_call("POST", "/api/probe/batch", Some(&server.admin_token()), Some(&batch(2))).unwrap();
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["outcomes"].as_array().map(Vec::len), Some(2), "{body}");
    assert_eq!(answer["outcomes"][0]["result"], "failed", "nothing listens on port 9: {body}");
    let (code, _) =
        server.api_call("POST", "/api/probe/batch", Some(&server.admin_token()), Some(&batch(1001))).unwrap();
    assert_eq!(code, 413, "at most 1000 probes per batch");
}

#[test]
fn a_certificate_ordered_through_one_server_is_validated_against_another() {
    use edge_tests::pebble::{free_port, Pebble};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = Postgres::start().unwrap();
    pg.create_db("edge").unwrap();
    let store = pg.store_section("edge");
    let tmp = tempfile::tempdir().unwrap();
    let pebble_port = free_port().unwrap();
    let pebble_dir = tmp.path().join("pebble");
    let acme = format!(
        "[acme]\ndirectories = [\"{}\"]\nroot_ca_file = \"{}\"\ncaa_issuers = [\"pebble.test\"]\n",
        Pebble::directory_for(pebble_port),
        pebble_dir.join("listener-ca.pem").display()
    );
    let servers: Vec<Server> = (1..=3)
        .map(|n| {
            // A lease longer than B is frozen below: B stays live.
            let cluster = cluster_config_with_lease(&store, n, 10_000, "publish_timeout_ms = 1500\n");
            let config = format!("{cluster}\n{acme}");
            Server::start_at(&tmp.path().join(format!("s{n}")), &config, host(n)).unwrap()
        })
        .collect();
    wait_for("three live servers", Duration::from_secs(10), || (live_servers(&servers[0]).len() == 3).then_some(()))
        .unwrap();
    // The CA asks A's DNS; the agent's join string (and so its CSR) goes to C.
    let pebble = Pebble::start(&pebble_dir, pebble_port, dns_of(&servers[0])).unwrap();
    let join = servers[2].add_node("n1").unwrap();
    assert!(edge_proto::join::JoinTicket::parse(&join).unwrap().server.starts_with("127.0.0.3:"));

    // B frozen (still live: its lease runs 10 s, the publish wait 1.5 s): C
    // does not tell the CA anything while B's DNS does not serve the value.
    servers[1].proc.signal("STOP");
    let upstream = rt.block_on(upstreams::http("hello from n1"));
    let agent = Agent::spawn_with_config(
        &tmp.path().join("agent"),
        &join,
        upstream,
        "[acme.renewal]\nretry_initial_secs = 2\n",
    )
    .unwrap();
    wait_for("C's publish refused while B does not serve", Duration::from_secs(30), || {
        servers[2].proc.log_text().contains("not every live server's DNS serves the value").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nC:\n{}", servers[2].proc.log_text()));
    let log = servers[2].proc.log_text();
    assert!(log.contains("edge-2"), "the refusal names the server that does not serve it");
    assert!(!log.contains("ACME: TXT published"), "the CA was not told to validate");
    servers[1].proc.signal("CONT");

    // Every server's DNS, polled for the challenge value from now on: the
    // time each query that first saw it was sent.
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = servers
        .iter()
        .map(|s| {
            let (dns, stop) = (dns_of(s), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent = std::time::SystemTime::now();
                    let answer = dig(dns, &format!("_acme-challenge.n1.{ZONE}"), "TXT", false);
                    if answer.is_ok_and(|a| !a.data("TXT").is_empty()) {
                        return Some(sent);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                None
            })
        })
        .collect();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    wait_for("the certificate issued", Duration::from_secs(90), || {
        metric(&agent.metrics().ok()?, "edge_agent_certificate_renewals_total").filter(|r| *r >= 1.0)
    })
    .unwrap_or_else(|e| panic!("{e}\nC:\n{}\nagent:\n{}", servers[2].proc.log_text(), agent.proc.log_text()));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Option<std::time::SystemTime>> = pollers.into_iter().map(|p| p.join().unwrap()).collect();

    // C ran the order; it told the CA to validate only after every server
    // served the value.
    let log = servers[2].proc.log_text();
    let told = log
        .lines()
        .find(|l| l.contains("ACME: TXT published"))
        .and_then(|l| edge_tests::faults::rfc3339_secs(l.split_whitespace().next()?))
        .expect("C's order log");
    for (i, at) in seen.iter().enumerate() {
        let at = at.unwrap_or_else(|| panic!("server {} never served the TXT value", i + 1));
        let at = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        // A query sent before the CA was told already found it (within
        // the scheduling slack of a loaded machine).
        assert!(at <= told + 0.1, "server {} served the value {:.3} s after the CA was told", i + 1, at - told);
    }
    assert!(log.contains("ACME: certificate issued"), "the order ran on C");
    let accounts = pg.sql("edge", "SELECT count(*) FROM settings WHERE key LIKE 'acme-account:%'").unwrap();
    assert_eq!(accounts.trim(), "1", "one ACME account for the cluster, in the store");

    // Clients trusting only Pebble's root reach the node through every server.
    let root = pebble.issuing_root().unwrap();
    for server in &servers {
        let port = server.addrs.tls.port();
        let ip = server.addrs.tls.ip();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--resolve", &format!("n1.{ZONE}:{port}:{ip}"), "--cacert"])
            .arg(&root)
            .arg(format!("https://n1.{ZONE}:{port}/"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from n1", "{}", String::from_utf8_lossy(&out.stderr));
    }
}
