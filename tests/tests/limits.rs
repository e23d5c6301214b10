//! Limits under hostile load: slowloris connections are closed at the
//! ClientHello deadline while normal clients are served; per-source rates,
//! the connection cap and the failed-authentication budget refuse what
//! exceeds them, and every refusal is counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_tests::{clients, metric, upstreams, wait_for, Agent, Server, ZONE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const SLOWLORIS: usize = 5000;
const HELLO_DEADLINE: Duration = Duration::from_secs(4);

/// A distinct loopback source for client `i` (127.1.x.y).
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
}

async fn connect_from(src: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(to).await
}

/// One slowloris client: a real ClientHello, one byte every 1.5 s. Returns
/// how long after connecting the server closed it (None: never, within 20 s).
async fn slowloris(src: IpAddr, to: SocketAddr, hello: Arc<Vec<u8>>) -> Option<Duration> {
    let mut tcp = connect_from(src, to).await.ok()?;
    let opened = Instant::now();
    let mut buf = [0u8; 64];
    for byte in hello.iter().take(12) {
        if tcp.write_all(&[*byte]).await.is_err() {
            return Some(opened.elapsed());
        }
        match tokio::time::timeout(Duration::from_millis(1500), tcp.read(&mut buf)).await {
            Ok(_) => return Some(opened.elapsed()), // closed (EOF, reset or an alert)
            Err(_) => continue,
        }
    }
    match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
        Ok(_) => Some(opened.elapsed()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_at_the_deadline_while_clients_are_served() {
    edge_net::raise_fd_limit();
    let tmp = tempfile::tempdir().unwrap();
    // Default limits, but the deadline short enough for a bounded test.
    let limits = format!(
        "[limits]\nper_source_rate = 50\nper_source_max_open = 256\nclient_hello_timeout_ms = {}\n",
        HELLO_DEADLINE.as_millis()
    );
    let server = Server::start(&tmp.path().join("server"), &limits).unwrap();
    let join = server.add_node("n1").unwrap();
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstreams::http("hello").await, &[]).unwrap();
    let config = clients::client_config(&agent.local_ca("n1")).unwrap();
    let hello = Arc::new(clients::client_hello(&format!("n1.{ZONE}")));
    let fds_before = edge_tests::fd_count(server.proc.child.id());

    // Open the slowloris connections in batches (the accept backlog is finite).
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..SLOWLORIS {
        attackers.spawn(slowloris(source(i), server.addrs.tls, hello.clone()));
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let held = wait_for("slowloris connections held", Duration::from_secs(10), || {
        let open = metric(&server.metrics().ok()?, "edge_connections_open")?;
        (open >= SLOWLORIS as f64 * 0.9).then_some(open)
    })
    .unwrap();

    // A normal client is served meanwhile, without waiting for the deadline.
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let (status, body) =
            clients::https_get(server.addrs.tls, &format!("n1.{ZONE}"), config.clone(), "/").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "hello"));
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let worst = *latencies.last().unwrap();
    assert!(worst < HELLO_DEADLINE, "a normal client waited {worst:?} behind the slowloris connections");

    let mut closed_after = Vec::new();
    let mut never_closed = 0;
    while let Some(done) = attackers.join_next().await {
        match done.unwrap() {
            Some(after) => closed_after.push(after),
            None => never_closed += 1,
        }
    }
    closed_after.sort();
    let latest = *closed_after.last().unwrap();
    println!(
        "limits: slowloris {SLOWLORIS} connections, {held} held at once, closed after {:?}..{latest:?}; \
         normal client p50 {:?} max {worst:?}",
        closed_after[0],
        latencies[latencies.len() / 2]
    );
    assert_eq!(never_closed, 0, "connections the server never closed");
    assert_eq!(closed_after.len(), SLOWLORIS, "connections that could not be opened");
    assert!(latest < HELLO_DEADLINE + Duration::from_secs(3), "closed too late: {latest:?}");
    assert!(closed_after[0] >= HELLO_DEADLINE - Duration::from_millis(100), "closed early: {:?}", closed_after[0]);
    let metrics = server.metrics().unwrap();
    assert!(metric(&metrics, "edge_sni_rejections_total{reason=\"timeout\"}").unwrap() >= SLOWLORIS as f64);
    wait_for("server descriptors back to baseline", Duration::from_secs(10), || {
        (edge_tests::fd_count(server.proc.child.id()) <= fds_before + 5).then_some(())
    })
    .unwrap();
    assert_eq!(metric(&server.metrics().unwrap(), "edge_connections_open"), Some(0.0));
}

/// A DNS query for `name` (type A), as bytes.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_caps_and_auth_budgets_refuse_and_count() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[dns]\nlisten = \"127.0.0.1:0\"\n[limits]\nper_source_rate = 5\nper_source_burst = 10\n\
        dns_per_source_rate = 5\ndns_per_source_burst = 10\nmax_connections = 100\nauth_failures_per_minute = 5\n\
        per_source_max_open = 12\nclient_hello_timeout_ms = 20000\n";
    let server = Server::start(&tmp.path().join("server"), config).unwrap();
    let join = server.add_node("n1").unwrap();
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstreams::http("hello").await, &[]).unwrap();
    let client = clients::client_config(&agent.local_ca("n1")).unwrap();
    let count = |m: &str, listener: &str, reason: &str| {
        metric(m, &format!("edge_refusals_total{{listener=\"{listener}\",reason=\"{reason}\"}}")).unwrap_or(-1.0)
    };

    // Per-source rate on :443: a burst of 10, then 5/s; other sources
    // unaffected.
    let flood_source: IpAddr = [127, 0, 0, 7].into();
    let mut flood = Vec::new();
    let mut refused = 0;
    for _ in 0..50 {
        // A reset can come back before connect() returns.
        match connect_from(flood_source, server.addrs.tls).await {
            Ok(tcp) => flood.push(tcp),
            Err(_) => refused += 1,
        }
    }
    for tcp in &mut flood {
        let mut buf = [0u8; 1];
        // A refused connection is reset at once; an admitted one waits for
        // its ClientHello.
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(20), tcp.read(&mut buf)).await {
            refused += 1;
        }
    }
    drop(flood);
    assert!((35..=40).contains(&refused), "refused {refused} of 50 (burst 10, 5/s)");
    let (status, _) = clients::https_get(server.addrs.tls, &format!("n1.{ZONE}"), client.clone(), "/").await.unwrap();
    assert_eq!(status, 200, "another source is served");

    // Open connections per source: 12 at most, however slowly they come
    // (within the rate: 10 at once, then one every 250 ms).
    let slow_source: IpAddr = [127, 0, 0, 10].into();
    let mut slow = Vec::new();
    let mut over_open = 0;
    for i in 0..15 {
        if i >= 10 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        match connect_from(slow_source, server.addrs.tls).await {
            Ok(mut tcp) => {
                let mut buf = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(20), tcp.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => over_open += 1,
                    _ => slow.push(tcp),
                }
            }
            Err(_) => over_open += 1,
        }
    }
    assert_eq!((slow.len(), over_open), (12, 3), "12 held, the 13th to 15th refused");
    drop(slow);

    // The connection cap: 100 open at once (from distinct sources), the
    // rest refused at accept.
    let mut held = Vec::new();
    let mut capped = 0;
    for i in 0..130 {
        match connect_from(source(i), server.addrs.tls).await {
            Ok(tcp) => held.push(tcp),
            Err(_) => capped += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for tcp in &mut held {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(5), tcp.read(&mut buf)).await {
            capped += 1;
        }
    }
    let held = 130 - capped;
    println!("limits: {refused}/50 over-rate connections refused; cap held {held}, refused {capped}");
    assert!(held <= 100 && capped >= 30, "held {held} refused {capped}");

    // DNS: over-rate UDP queries from one source get no answer at all.
    let dns = server.addrs.dns.unwrap();
    let udp = UdpSocket::bind("127.0.0.8:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    for id in 0..50u16 {
        udp.send_to(&dns_query(id, &format!("n1.{ZONE}")), dns).unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 512];
    while udp.recv_from(&mut buf).is_ok() {
        answered += 1;
    }
    assert!((10..=16).contains(&answered), "{answered} of 50 queries answered (burst 10, 5/s)");

    // Failed authentications: 5 per minute per source, then 429 before any
    // token is checked (even a right one).
    let api = server.addrs.api;
    let call = |token: &str| {
        let out = std::process::Command::new("curl")
            .args(["-sk", "--interface", "127.0.0.9", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("https://{api}/api/nodes"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<u16>().unwrap_or(0)
    };
    let answers: Vec<u16> = (0..7).map(|_| call("wrong-token-wrong-token")).collect();
    assert_eq!(answers, [401, 401, 401, 401, 401, 429, 429]);
    assert_eq!(call(&server.admin_token()), 429, "the budget is per source, whatever the token");
    let (status, _) = server.api_get("/api/nodes", Some(&server.admin_token())).unwrap();
    assert_eq!(status, 200, "other sources keep their budget");

    let m = server.metrics().unwrap();
    println!(
        "limits: refusals tls/rate {} tls/source_open {} tls/max_connections {} dns/rate {} api/auth_failures {}",
        count(&m, "tls", "rate"),
        count(&m, "tls", "source_open"),
        count(&m, "tls", "max_connections"),
        count(&m, "dns", "rate"),
        count(&m, "api", "auth_failures")
    );
    assert_eq!(count(&m, "tls", "rate"), refused as f64);
    assert_eq!(count(&m, "tls", "source_open"), 3.0);
    assert!(count(&m, "tls", "max_connections") >= capped as f64);
    assert!(count(&m, "dns", "rate") >= (50 - answered) as f64);
    assert_eq!(count(&m, "api", "auth_failures"), 3.0);
    let log = server.proc.log_text();
    let lines = log.lines().filter(|l| l.contains("refusing: limit reached") && l.contains("listener=\"dns\"")).count();
    assert_eq!(lines, 1, "DNS refusals are logged once per 10 s, not once each");
}

/// curl from loopback source `from`: one request per URL in `urls` on one
/// keep-alive connection; the status of each.
fn curl_codes(from: &str, method: &str, bearer: Option<&str>, body: Option<&str>, urls: &[String]) -> Vec<u16> {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sk", "--max-time", "30", "--interface", from, "-w", "%{http_code}\n", "-X", method]);
    if let Some(token) = bearer {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", body]);
    }
    for url in urls {
        cmd.args(["-o", "/dev/null", url]);
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().parse().unwrap_or(0)).collect()
}

#[test]
fn metrics_need_the_token_on_the_api_are_cached_and_budgeted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "[limits]\nmetrics_rate = 2\nmetrics_cache_ms = 1000\n").unwrap();
    let token = server.admin_token();
    let api = format!("https://{}/metrics", server.addrs.api);
    // The public API answers /metrics only with the admin token; /healthz
    // stays open.
    assert_eq!(curl_codes("127.0.0.20", "GET", None, None, std::slice::from_ref(&api)), [401]);
    assert_eq!(curl_codes("127.0.0.20", "GET", Some("not-the-admin-token"), None, std::slice::from_ref(&api)), [401]);
    assert_eq!(curl_codes("127.0.0.21", "GET", Some(&token), None, std::slice::from_ref(&api)), [200]);
    let healthz = format!("https://{}/healthz", server.addrs.api);
    assert_eq!(curl_codes("127.0.0.20", "GET", None, None, &[healthz]), [200]);

    // The metrics listener answers without a token, only /metrics and /healthz.
    let listener = server.addrs.metrics.expect("metrics listener");
    let open = |path: &str| edge_tests::http_get(listener, path).unwrap();
    let (status, first) = open("/metrics");
    assert_eq!(status, 200);
    assert!(first.contains("edge_connections_accepted_total"), "{first}");
    assert_eq!(open("/healthz").0, 200);
    assert_eq!(open("/api/nodes").0, 404);

    // One rendering serves every scrape for a second: a connection accepted
    // now shows only in a later rendering.
    let accepted = |text: &str| metric(text, "edge_connections_accepted_total");
    let rendered = Instant::now();
    let seen = accepted(&open("/metrics").1).unwrap();
    drop(std::net::TcpStream::connect(server.addrs.tls).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    let cached = accepted(&open("/metrics").1).unwrap();
    if rendered.elapsed() < Duration::from_millis(900) {
        assert_eq!(cached, seen, "the same rendering within the second");
    }
    // Polled at the source's own rate (2/s), a fresh rendering comes.
    let mut later = None;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        later = accepted(&open("/metrics").1).filter(|n| *n > seen);
        if later.is_some() {
            break;
        }
    }
    assert_eq!(later, Some(seen + 1.0), "a later rendering counts the connection");

    // Each source gets a few scrapes per second (burst 10, 2/s): 40 at once
    // on one keep-alive connection mostly get 429.
    let urls: Vec<String> = (0..40).map(|_| api.clone()).collect();
    let started = Instant::now();
    let codes = curl_codes("127.0.0.22", "GET", Some(&token), None, &urls);
    let took = started.elapsed().as_secs_f64();
    let ok = codes.iter().filter(|c| **c == 200).count();
    let refused = codes.iter().filter(|c| **c == 429).count();
    assert_eq!(codes.len(), 40);
    let most = 10 + (2.0 * took).ceil() as usize;
    assert!(
        (10..=most).contains(&ok) && ok + refused == 40,
        "{ok} answered in {took:.1} s, {refused} refused: {codes:?}"
    );
    assert!(refused >= 20, "{codes:?}");
    // Another source is not affected.
    assert_eq!(curl_codes("127.0.0.23", "GET", Some(&token), None, std::slice::from_ref(&api)), [200]);
    std::thread::sleep(Duration::from_millis(1100));
    let m = open("/metrics").1;
    let counted = metric(&m, "edge_refusals_total{listener=\"api\",reason=\"metrics_rate\"}");
    assert_eq!(counted, Some(refused as f64), "{m}");
}

#[test]
fn concurrent_wrong_tokens_cannot_exceed_the_failure_budget() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "[limits]\nauth_failures_per_minute = 5\n").unwrap();
    let join = server.add_node("n1").unwrap();
    // A well-formed token for a real node with the wrong secret: each check
    // asks the store, which is when the old check-then-spend raced.
    let wrong = format!("n1.{}", "A".repeat(43));
    assert_ne!(wrong, edge_proto::join::JoinTicket::parse(&join).unwrap().token);
    let url = format!("https://{}/api/signal/heartbeat", server.addrs.api);
    let body = r#"{"status":"ready","version":"test"}"#;
    // 40 attempts from one source at once: 8 curl processes, 5 requests each.
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let (url, wrong) = (url.clone(), wrong.clone());
            std::thread::spawn(move || {
                let urls: Vec<String> = (0..5).map(|_| url.clone()).collect();
                curl_codes("127.0.0.30", "POST", Some(&wrong), Some(body), &urls)
            })
        })
        .collect();
    let codes: Vec<u16> = attempts.into_iter().flat_map(|a| a.join().unwrap()).collect();
    let checked = codes.iter().filter(|c| **c == 401).count();
    let refused = codes.iter().filter(|c| **c == 429).count();
    assert_eq!(codes.len(), 40, "{codes:?}");
    assert!(checked <= 5, "{checked} wrong tokens were checked with a budget of 5: {codes:?}");
    assert_eq!(checked + refused, 40, "{codes:?}");
    // The right token from a fresh source still works, any number of times:
    // successes give their attempt back.
    let right = edge_proto::join::JoinTicket::parse(&join).unwrap().token;
    let urls: Vec<String> = (0..20).map(|_| url.clone()).collect();
    let ok = curl_codes("127.0.0.31", "POST", Some(&right), Some(body), &urls);
    assert!(ok.iter().all(|c| *c == 200), "{ok:?}");
}

#[test]
fn a_name_with_a_newline_is_logged_on_one_escaped_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "[dns]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let token = edge_proto::join::JoinTicket::parse(&server.add_node("n1").unwrap()).unwrap().token;
    let forged = "2026-12-01T00:00:00.000000Z  INFO edge_server: node n2 connected";
    let body = serde_json::json!({ "name": format!("x\n{forged}\r\nmore"), "value": "A".repeat(43) }).to_string();
    let (status, _) = server.api_call("PUT", "/api/signal/acme-challenge", Some(&token), Some(&body)).unwrap();
    assert_eq!(status, 403);
    std::thread::sleep(Duration::from_millis(200));
    let log = server.proc.log_text();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("refused a TXT record")).collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(refused[0].contains(r"x\n2026-12-01") && refused[0].contains(r"\r\nmore"), "{}", refused[0]);
    assert!(!log.lines().any(|l| l.starts_with("2026-12-01T00:00:00")), "a forged line reached the log:\n{log}");
    assert!(!log.lines().any(|l| l.starts_with("more")), "{log}");
}
