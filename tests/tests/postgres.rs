//! The server on PostgreSQL, end to end: the core data path, two server
//! processes sharing one database through its change feed, the database
//! stopping under load, and moving 1,000 nodes from SQLite with
//! `store copy`. Each test starts its own private PostgreSQL cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use edge_server::store::Store;
use edge_tests::postgres::Postgres;
use edge_tests::{bin, clients, metric, upstreams, wait_for, Agent, Server, ZONE};

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// Whether `server`'s registry has node `name` (`GET /api/nodes/{name}`).
fn routes(server: &Server, name: &str) -> bool {
    server.api_get(&format!("/api/nodes/{name}"), Some(&server.admin_token())).is_ok_and(|(code, _)| code == 200)
}

/// Polls every 10 ms until `server` has (or has not) `name`; the time taken.
fn time_until(server: &Server, name: &str, present: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    while routes(server, name) != present {
        assert!(
            start.elapsed() < limit,
            "node {name} still {} after {limit:?}",
            if present { "absent" } else { "present" }
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_core_data_path_runs_on_postgres() {
    let pg = Postgres::start().unwrap();
    pg.create_db("edge").unwrap();
    let store = pg.store_section("edge");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("server");
    let mut server = Server::start(&dir, &store).unwrap();
    assert!(server.proc.log_text().contains(&pg.url("edge")), "the log names the store");
    let mut agents = Vec::new();
    for (name, body) in [("alpha", "i am alpha"), ("beta", "i am beta")] {
        let join = server.add_node(name).unwrap();
        let upstream = upstreams::http(body).await;
        agents.push(Agent::start(&tmp.path().join(name), &join, upstream, &[]).unwrap());
    }
    let (ca_a, ca_b) = (agents[0].local_ca("alpha"), agents[1].local_ca("beta"));
    // curl through the tunnel, as in data_path.rs.
    let port = server.addrs.tls.port();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve", &format!("alpha.{ZONE}:{port}:127.0.0.1"), "--cacert"])
        .arg(&ca_a)
        .arg(format!("https://alpha.{ZONE}:{port}/"))
        .output()
        .expect("curl is installed");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "i am alpha");
    assert_eq!(server.fetch(&ca_a, &format!("alpha.{ZONE}")).await.unwrap(), "i am alpha");
    assert_eq!(server.fetch(&ca_b, &format!("x.beta.{ZONE}")).await.unwrap(), "i am beta");
    assert_eq!(pg.sql("edge", "SELECT count(*) FROM nodes").unwrap(), "2", "the rows are in PostgreSQL");

    // Removal cuts the tunnel and the route.
    server.cli(&["node", "remove", "beta"]).unwrap();
    let status = agents[1].proc.wait_exit(Duration::from_secs(10)).expect("agent exits after removal");
    assert_eq!(status.code(), Some(2));
    assert!(server.fetch(&ca_b, &format!("beta.{ZONE}")).await.is_err());

    // A restart keeps the nodes: the agent comes back by itself.
    let addrs = server.addrs;
    server.proc.signal("TERM");
    assert!(server.proc.wait_exit(Duration::from_secs(15)).expect("exits on SIGTERM").success());
    server = Server::start_on(&dir, &store, Some(addrs)).unwrap();
    let body = wait_for("traffic after the restart", Duration::from_secs(30), || {
        block(server.fetch(&ca_a, &format!("alpha.{ZONE}"))).ok()
    })
    .unwrap();
    assert_eq!(body, "i am alpha");
    let list = server.cli(&["node", "list", "--json"]).unwrap();
    let nodes: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_follow_each_others_writes_within_a_second() {
    let pg = Postgres::start().unwrap();
    pg.create_db("edge").unwrap();
    let store = pg.store_section("edge");
    let tmp = tempfile::tempdir().unwrap();
    let a = Server::start(&tmp.path().join("a"), &store).unwrap();
    let b = Server::start(&tmp.path().join("b"), &store).unwrap();
    let applied_before = metric(&b.metrics().unwrap(), "edge_store_changes_applied_total").unwrap_or(0.0);

    // Added with A's CLI: B routes it within a second, through the feed
    // (PostgreSQL has no poll: only LISTEN/NOTIFY can have told it).
    let join = a.add_node("web").unwrap();
    let added = time_until(&b, "web", true, Duration::from_secs(1));
    eprintln!("postgres: node added by one process routed by the other after {added:?}");
    let applied = metric(&b.metrics().unwrap(), "edge_store_changes_applied_total").unwrap();
    assert!(applied > applied_before, "B applied a change event ({applied_before} -> {applied})");
    assert_eq!(metric(&b.metrics().unwrap(), "edge_store_resyncs_total"), Some(0.0), "no full reload");

    // The agent's tunnel is on A (its join string pins A); removing the
    // node with B's CLI cuts it within a second.
    let upstream = upstreams::http("web").await;
    let mut agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();
    assert_eq!(a.fetch(&agent.local_ca("web"), &format!("web.{ZONE}")).await.unwrap(), "web");
    let removed = Instant::now();
    b.cli(&["node", "remove", "web"]).unwrap();
    let status = agent.proc.wait_exit(Duration::from_secs(1)).expect("the tunnel on A was cut within 1 s");
    let cut = removed.elapsed();
    eprintln!("postgres: node removed by one process, its tunnel on the other cut after {cut:?}");
    assert_eq!(status.code(), Some(2), "{}", agent.proc.log_text());
    assert!(!routes(&a, "web") && !routes(&b, "web"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_ten_seconds_under_load_fails_no_request() {
    let pg = Postgres::start().unwrap();
    pg.create_db("edge").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("server"), &pg.store_section("edge")).unwrap();
    let join = server.add_node("web").unwrap();
    let upstream = upstreams::http("still here").await;
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();
    let ca = agent.local_ca("web");
    let host = format!("web.{ZONE}");
    assert_eq!(server.fetch(&ca, &host).await.unwrap(), "still here");

    // Continuous client load, each request a new TLS connection.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (stop, addr, config) = (stop.clone(), server.addrs.tls, clients::client_config(&ca).unwrap());
        let host = host.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.is_cancelled() {
                match clients::https_get(addr, &host, config.clone(), "/").await {
                    Ok((200, body)) if body == "still here" => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.stop().unwrap();
    let down = Instant::now();

    // Writes fail fast with a clear message and their own exit code.
    let out = server.cli_output(&["node", "add", "late"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("unavailable") && stderr.contains(&pg.url("edge")), "{stderr}");
    assert!(down.elapsed() < Duration::from_secs(5), "node add took {:?}", down.elapsed());

    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    pg.restart().unwrap();
    eprintln!("postgres: down for {:?}", down.elapsed());
    // The server resyncs by itself (same process), then a new node routes
    // within a second.
    wait_for("a resync after the database returned", Duration::from_secs(15), || {
        (metric(&server.metrics().ok()?, "edge_store_resyncs_total")? >= 1.0).then_some(())
    })
    .unwrap();
    server.add_node("late").unwrap();
    let routed = time_until(&server, "late", true, Duration::from_secs(1));
    eprintln!("postgres: node added after the outage routed after {routed:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let (ok, failed) = load.await.unwrap();
    eprintln!("postgres: {ok} requests during the outage window, {} failed", failed.len());
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 50, "the load ran ({ok} requests)");
    assert!(server.proc.alive(), "no restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_a_thousand_nodes_from_sqlite_to_postgres() {
    let pg = Postgres::start().unwrap();
    let url = pg.create_db("edge").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("server");
    let mut server = Server::start(&dir, "").unwrap();
    let join = server.add_node("web").unwrap();
    {
        // 999 more, written through the store as `node add` does.
        let sqlite =
            edge_server::store::sqlite::SqliteStore::open(&dir.join("data/edge.db"), Duration::from_secs(1)).unwrap();
        for i in 0..999 {
            let name = format!("n{i:03}");
            let hosts = edge_proto::names::node_hostnames(&name, ZONE);
            sqlite.add_node(&name, &hosts, &edge_server::token_hash(&name)).await.unwrap();
        }
    }
    let addrs = server.addrs;
    server.proc.signal("TERM");
    assert!(server.proc.wait_exit(Duration::from_secs(15)).unwrap().success());

    let copy = |extra: &[&str]| {
        Command::new(bin("edge-server"))
            .arg("--config")
            .arg(&server.config)
            .args(["store", "copy", "--to", &url, "--password-file"])
            .arg(pg.password_file())
            .args(extra)
            .output()
            .unwrap()
    };
    let out = copy(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("read 1000 nodes") && stderr.contains("verified"), "{stderr}");
    assert_eq!(pg.sql("edge", "SELECT count(*) FROM nodes").unwrap(), "1000");
    // A second copy into the now non-empty target is refused.
    let again = copy(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"), "{}", String::from_utf8_lossy(&again.stderr));

    // The server on PostgreSQL serves them: all 1000 listed, and the agent
    // with the join string made on SQLite connects and serves.
    server = Server::start_on(&dir, &pg.store_section("edge"), Some(addrs)).unwrap();
    let (code, body) = server.api_get("/api/nodes", Some(&server.admin_token())).unwrap();
    assert_eq!(code, 200);
    let nodes: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(nodes.as_array().map(Vec::len), Some(1000));
    let upstream = upstreams::http("moved").await;
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();
    assert_eq!(server.fetch(&agent.local_ca("web"), &format!("web.{ZONE}")).await.unwrap(), "moved");
    let pg_store = edge_server::store::open(
        &edge_server::store::StoreConfig {
            url: Some(url.clone()),
            password_file: Some(pg.password_file()),
            ..Default::default()
        },
        tmp.path(),
    )
    .await
    .unwrap();
    assert_eq!(pg_store.get_node("n500").await.unwrap().unwrap().token_hash, edge_server::token_hash("n500"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_record_added_through_one_server_is_served_by_every_server() {
    let pg = Postgres::start().unwrap();
    pg.create_db("edge").unwrap();
    let extra = format!("{}[dns]\nlisten = \"127.0.0.1:0\"\n", pg.store_section("edge"));
    let tmp = tempfile::tempdir().unwrap();
    let a = Server::start(&tmp.path().join("a"), &extra).unwrap();
    let b = Server::start(&tmp.path().join("b"), &extra).unwrap();
    let added = Instant::now();
    a.cli(&["dns", "add", "www", "A", "192.0.2.80"]).unwrap();
    for server in [&a, &b] {
        let dns = server.addrs.dns.unwrap();
        wait_for("the record on every server", Duration::from_secs(1), || {
            (edge_tests::dns::dig(dns, &format!("www.{ZONE}"), "A", false).ok()?.data("A") == ["192.0.2.80"])
                .then_some(())
        })
        .unwrap();
    }
    eprintln!("postgres: a DNS record added through one server served by both after {:?}", added.elapsed());
    b.cli(&["dns", "remove", "www"]).unwrap();
    let dns = a.addrs.dns.unwrap();
    wait_for("the record removed everywhere", Duration::from_secs(1), || {
        (edge_tests::dns::dig(dns, &format!("www.{ZONE}"), "A", false).ok()?.status == "NXDOMAIN").then_some(())
    })
    .unwrap();
}

/// The database hangs without closing anything (every byte to and from it
/// held by a relay): writes fail within seconds as unavailable, clients are
/// still served, and the server recovers by itself when it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_fails_writes_within_seconds_and_serving_goes_on() {
    let pg = Postgres::start().unwrap();
    pg.create_db("edge").unwrap();
    let relay = edge_tests::faults::TcpRelay::start(([127, 0, 0, 1], pg.port).into()).unwrap();
    let store = format!(
        "[store]\nurl = \"postgres://edge@127.0.0.1:{}/edge\"\npassword_file = \"{}\"\nconnect_timeout_secs = 1\n\
         [dns]\nlisten = \"127.0.0.1:0\"\n",
        relay.addr.port(),
        pg.password_file().display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(&tmp.path().join("server"), &store).unwrap();
    let join = server.add_node("web").unwrap();
    let upstream = upstreams::http("served").await;
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();
    let (ca, host) = (agent.local_ca("web"), format!("web.{ZONE}"));
    assert_eq!(server.fetch(&ca, &host).await.unwrap(), "served");

    relay.set_paused(true);
    let hung = Instant::now();
    let out = server.cli_output(&["node", "add", "late"]).unwrap();
    let took = hung.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("unavailable"), "{stderr}");
    assert!(took < Duration::from_secs(6), "node add gave up after {took:?}");
    eprintln!("postgres: with the database hung, node add failed after {took:?}");
    // A write by the running server itself, on a pooled connection that
    // now hangs: the store's deadline (twice the connect timeout) answers.
    let token = edge_proto::join::JoinTicket::parse(&join).unwrap().token;
    let body = format!("{{\"name\":\"_acme-challenge.web.{ZONE}\",\"value\":\"{}\"}}", "a".repeat(43));
    let asked = Instant::now();
    let (code, answer) = server.api_call("PUT", "/api/signal/acme-challenge", Some(&token), Some(&body)).unwrap();
    let took = asked.elapsed();
    assert_eq!(code, 503, "{answer}");
    let error: edge_proto::signal::ErrorResponse = serde_json::from_str(&answer).unwrap();
    assert!(error.error.contains("unavailable") && error.error.contains("postgres://"), "{answer}");
    assert!(took < Duration::from_secs(5), "the API answered after {took:?}");
    eprintln!("postgres: with the database hung, a server-side write answered 503 after {took:?}: {}", error.error);
    for _ in 0..20 {
        assert_eq!(server.fetch(&ca, &host).await.unwrap(), "served", "clients are served from memory");
    }

    relay.set_paused(false);
    wait_for("a write through the recovered store", Duration::from_secs(30), || {
        server
            .cli_output(&["node", "add", "later"])
            .ok()
            // A try whose answer was lost may have committed.
            .filter(|o| o.status.success() || String::from_utf8_lossy(&o.stderr).contains("already exists"))
    })
    .unwrap();
    time_until(&server, "later", true, Duration::from_secs(15));
    assert!(server.proc.alive());
}
