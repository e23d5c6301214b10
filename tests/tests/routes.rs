//! Routes and health checks end to end, over real processes: one agent
//! serving several names from different local services, a reload that adds
//! a route under load, and upstream health answered with 503/502 by the
//! node's own TLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use edge_tests::{clients, upstreams, wait_for, Agent, Server, ZONE};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// curl through the server's TLS port: (HTTP status, body); status 0 when
/// curl itself failed.
fn curl(server: &Server, ca: &Path, host: &str, insecure: bool) -> (u16, String) {
    let port = server.addrs.tls.port();
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "10", "-w", "\n%{http_code}", "--resolve", &format!("{host}:{port}:127.0.0.1")]);
    if insecure {
        cmd.arg("-k");
    } else {
        cmd.arg("--cacert").arg(ca);
    }
    let out = cmd.arg(format!("https://{host}:{port}/")).output().expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The subject of the certificate `openssl s_client` is shown for `host`.
fn subject_seen(server: &Server, host: &str) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &server.addrs.tls.to_string(), "-servername", host, "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed");
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    text.lines().find(|l| l.contains("Peer certificate:")).unwrap_or("").to_string()
}

/// One echo transfer of `bytes` over TLS to `host`, written in slices with
/// pauses; the SHA-256 of what was sent and of what came back.
async fn slow_echo(server: &Server, ca: &Path, host: String, bytes: usize) -> anyhow::Result<([u8; 32], [u8; 32])> {
    let config = clients::client_config(ca)?;
    let tls = clients::connect(server.addrs.tls, &host, config).await?;
    let (mut r, mut w) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let mut sent = Sha256::new();
        let mut left = bytes;
        let mut n = 0u8;
        while left > 0 {
            let chunk: Vec<u8> = (0..left.min(64 * 1024)).map(|i| (i as u8).wrapping_mul(31).wrapping_add(n)).collect();
            w.write_all(&chunk).await?;
            sent.update(&chunk);
            left -= chunk.len();
            n = n.wrapping_add(1);
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        w.shutdown().await?;
        anyhow::Ok(<[u8; 32]>::from(sent.finalize()))
    });
    let mut got = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    while total < bytes {
        let n = tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "echo ended after {total} of {bytes} bytes");
        got.update(&buf[..n]);
        total += n;
    }
    let sent = writer.await??;
    Ok((sent, got.finalize().into()))
}

fn agent_config(routes: &str) -> String {
    format!(
        "[health]\ncheck = \"tcp\"\ninterval_ms = 500\ntimeout_ms = 400\nrise = 1\nfall = 1\n{routes}",
        routes = routes
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_name_reaches_its_own_service_and_a_reload_adds_a_route_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("web1").unwrap();
    let a = upstreams::http("service A\n").await;
    let b = upstreams::http("service B\n").await;
    let c = upstreams::http("service C\n").await;
    let echo = upstreams::echo().await;
    let db_name = format!("db.web1.{ZONE}");
    let db = upstreams::tls_http(&db_name, "db-own-service", "database over its own TLS\n").await;
    let routes = format!(
        "[[routes]]\nhost = \"api.web1.{ZONE}\"\nupstreams = [\"{b}\"]\n\
         [[routes]]\nhost = \"{db_name}\"\nupstreams = [\"{db}\"]\nmode = \"passthrough\"\n\
         [[routes]]\nhost = \"echo.web1.{ZONE}\"\nupstreams = [\"{echo}\"]\n"
    );
    let dir = tmp.path().join("agent");
    let agent = Agent::spawn_with_config(&dir, &join, a, &agent_config(&routes)).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let ca = agent.local_ca("web1");

    // Each name reaches only its own service.
    assert_eq!(curl(&server, &ca, &format!("web1.{ZONE}"), false), (200, "service A\n".into()));
    assert_eq!(curl(&server, &ca, &format!("app.web1.{ZONE}"), false), (200, "service A\n".into()), "default");
    assert_eq!(curl(&server, &ca, &format!("api.web1.{ZONE}"), false), (200, "service B\n".into()));
    // Passthrough: the client sees the local service's certificate, not the node's.
    assert_eq!(curl(&server, &ca, &db_name, false).0, 0, "the node's CA does not vouch for the db service");
    assert_eq!(curl(&server, &ca, &db_name, true), (200, "database over its own TLS\n".into()));
    let db_subject = subject_seen(&server, &db_name);
    assert!(db_subject.contains("db-own-service"), "openssl saw {db_subject:?}");
    let api_subject = subject_seen(&server, &format!("api.web1.{ZONE}"));
    assert!(!api_subject.contains("db-own-service") && !api_subject.is_empty(), "openssl saw {api_subject:?}");

    // The server knows the routes from the agent's report.
    let shown = wait_for("routes in node show", Duration::from_secs(10), || {
        let text = server.cli(&["node", "show", "web1"]).ok()?;
        text.contains(&format!("api.web1.{ZONE}")).then_some(text)
    })
    .unwrap();
    assert!(shown.contains(&db_name) && shown.contains("passthrough"), "{shown}");
    assert!(shown.contains(&format!("{b} up (none)")) && shown.contains(&format!("{a} up (tcp)")), "{shown}");

    // 20 slow transfers through the echo route; the config gains a route
    // mid-way and SIGHUP applies it.
    let transfers: Vec<_> = (0..20).map(|_| slow_echo(&server, &ca, format!("echo.web1.{ZONE}"), 1 << 20)).collect();
    let all = futures_util::future::join_all(transfers);
    let reload = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let with_new = format!("{routes}[[routes]]\nhost = \"new.web1.{ZONE}\"\nupstreams = [\"{c}\"]\n");
        std::fs::write(
            dir.join("agent.toml"),
            format!("join = {join:?}\nupstream = \"{a}\"\n{}\n", agent_config(&with_new)),
        )
        .unwrap();
        agent.proc.signal("HUP");
        wait_for("the new route", Duration::from_secs(10), || {
            (curl(&server, &ca, &format!("new.web1.{ZONE}"), false) == (200, "service C\n".into())).then_some(())
        })
        .unwrap();
    };
    let (results, ()) = tokio::join!(all, reload);
    for (i, r) in results.into_iter().enumerate() {
        let (sent, got) = r.unwrap_or_else(|e| panic!("transfer {i}: {e}"));
        assert_eq!(sent, got, "transfer {i} intact");
    }
    assert!(agent.proc.log_text().contains("reload: routes in force"));
    // The routes that were there before still serve.
    assert_eq!(curl(&server, &ca, &format!("api.web1.{ZONE}"), false), (200, "service B\n".into()));

    // An invalid file is refused; the routes in force stay.
    std::fs::write(
        dir.join("agent.toml"),
        format!("join = {join:?}\nupstream = \"{a}\"\n[[routes]]\nhost = \"a..b\"\nupstreams = [\"{c}\"]\n"),
    )
    .unwrap();
    agent.proc.signal("HUP");
    wait_for("the refusal in the log", Duration::from_secs(5), || {
        agent.proc.log_text().contains("the config is invalid").then_some(())
    })
    .unwrap();
    assert!(agent.proc.log_text().contains("routes[0].host"), "the log names the field");
    assert_eq!(curl(&server, &ca, &format!("new.web1.{ZONE}"), false), (200, "service C\n".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_upstreams_get_503_and_failover_loses_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("web1").unwrap();
    let a = upstreams::Switchable::start("service A\n").await;
    let pair_live = upstreams::http("pair\n").await;
    let pair_dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let unchecked_dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let failover_dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let one = upstreams::http("one\n").await;
    let two = upstreams::http("two\n").await;
    let routes = format!(
        "[[routes]]\nhost = \"pair.web1.{ZONE}\"\nupstreams = [\"{pair_dead}\", \"{pair_live}\"]\n\
         [routes.health]\ncheck = \"tcp\"\ninterval_ms = 300\ntimeout_ms = 200\n\
         [[routes]]\nhost = \"gone.web1.{ZONE}\"\nupstreams = [\"{unchecked_dead}\"]\n\
         [[routes]]\nhost = \"rr.web1.{ZONE}\"\nupstreams = [\"{one}\", \"{two}\"]\n\
         [[routes]]\nhost = \"failover.web1.{ZONE}\"\nupstreams = [\"{failover_dead}\", \"{pair_live}\"]\n"
    );
    let health =
        "[health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval_ms = 500\ntimeout_ms = 400\nrise = 1\nfall = 1\n";
    let dir = tmp.path().join("agent");
    let agent = Agent::spawn_with_config(&dir, &join, a.addr, &format!("{health}{routes}")).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let ca = agent.local_ca("web1");
    let web1 = format!("web1.{ZONE}");
    assert_eq!(curl(&server, &ca, &web1, false), (200, "service A\n".into()));

    // A stops: within the check interval plus one, the node's TLS answers 503.
    a.stop().await;
    let stopped = std::time::Instant::now();
    let (code, body) = wait_for("503 from the node", Duration::from_secs(5), || {
        let r = curl(&server, &ca, &web1, false);
        (r.0 == 503).then_some(r)
    })
    .unwrap();
    assert!(stopped.elapsed() <= Duration::from_millis(500 * 2 + 1000), "took {:?}", stopped.elapsed());
    assert_eq!(code, 503);
    assert!(body.contains("every upstream of this route is down"), "{body}");
    let series = format!("edge_agent_upstream_up{{route=\"*\",upstream=\"{}\"}}", a.addr);
    assert_eq!(edge_tests::metric(&agent.metrics().unwrap(), &series), Some(0.0));
    wait_for("DOWN in node show", Duration::from_secs(10), || {
        server.cli(&["node", "show", "web1"]).ok()?.contains(&format!("{} DOWN (http)", a.addr)).then_some(())
    })
    .unwrap();
    assert!(agent.proc.log_text().contains("upstream down"));

    // A back: 200 again.
    a.restart().await;
    wait_for("200 again", Duration::from_secs(5), || {
        (curl(&server, &ca, &web1, false) == (200, "service A\n".into())).then_some(())
    })
    .unwrap();
    assert_eq!(edge_tests::metric(&agent.metrics().unwrap(), &series), Some(1.0));

    // Two upstreams, one dead from the start: no request is lost, and the
    // dead one is marked down.
    let config = clients::client_config(&ca).unwrap();
    let pair = format!("pair.web1.{ZONE}");
    for i in 0..40 {
        let (status, body) = clients::https_get(server.addrs.tls, &pair, config.clone(), "/").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "pair\n"), "request {i}");
    }
    let dead_series = format!("edge_agent_upstream_up{{route=\"{pair}\",upstream=\"{pair_dead}\"}}");
    assert_eq!(edge_tests::metric(&agent.metrics().unwrap(), &dead_series), Some(0.0));

    // Round-robin: two live upstreams share the requests evenly; with a
    // dead one first and no checks, the request fails over in place.
    let rr = format!("rr.web1.{ZONE}");
    let mut seen = std::collections::HashMap::new();
    for _ in 0..10 {
        let (status, body) = clients::https_get(server.addrs.tls, &rr, config.clone(), "/").await.unwrap();
        assert_eq!(status, 200);
        *seen.entry(body).or_insert(0) += 1;
    }
    assert_eq!(seen.get("one\n"), Some(&5), "{seen:?}");
    assert_eq!(seen.get("two\n"), Some(&5), "{seen:?}");
    let failover = format!("failover.web1.{ZONE}");
    for i in 0..6 {
        let (status, body) = clients::https_get(server.addrs.tls, &failover, config.clone(), "/").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "pair\n"), "request {i}");
    }
    assert!(agent.proc.log_text().contains("upstream down (connect failed)"), "the first request met the dead one");

    // Without active checks, the failed connect answers 502, and the
    // upstream it marked down answers 503 until it is tried again.
    let gone = format!("gone.web1.{ZONE}");
    assert_eq!(curl(&server, &ca, &gone, false).0, 502);
    assert_eq!(curl(&server, &ca, &gone, false).0, 503);
}
