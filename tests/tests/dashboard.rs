//! The dashboard in a real browser: Debian's headless Chromium driven over
//! WebDriver (chromedriver) with fantoccini, against a real edge-server and
//! a real edge-agent. Screenshots of every page go to
//! `target/tmp/dashboard/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chromium::start_driver;
use edge_tests::admin::request;
use edge_tests::{upstreams, Agent, Server};
use fantoccini::{Client, Locator};

#[path = "support/chromium.rs"]
mod chromium;

async fn browser(port: u16, profile: &Path) -> Client {
    chromium::browser(port, profile, &["--disable-quic".to_string()]).await
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// The text of the element, waiting up to 10 s for it to appear. The live
/// nodes table replaces its rows every second, so an element found may be
/// gone when its text is read: then it is looked up again.
async fn text_of(c: &Client, css: &str) -> String {
    let start = Instant::now();
    loop {
        let left = Duration::from_secs(10).saturating_sub(start.elapsed());
        let e = c.wait().at_most(left).for_element(Locator::Css(css)).await;
        let e = e.unwrap_or_else(|err| panic!("no {css}: {err}"));
        match e.text().await {
            Ok(text) => return text,
            Err(err) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("reading {css} again: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("cannot read {css}: {err}"),
        }
    }
}

/// Waits up to `limit` for `f` to be true, polling the page.
async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Waits for a navigation to land on a path ending in `suffix` (a click
/// returns before the form's redirect is followed).
async fn wait_path(c: &Client, suffix: &str) {
    let landed = eventually(Duration::from_secs(10), || async {
        c.current_url().await.is_ok_and(|u| u.path().ends_with(suffix))
    })
    .await;
    assert!(landed, "never reached {suffix}: at {:?}", c.current_url().await.map(|u| u.to_string()));
}

async fn log_in(c: &Client, base: &str, user: &str, password: &str) {
    c.goto(&format!("{base}/ui/login")).await.unwrap();
    c.find(Locator::Id("user")).await.unwrap().send_keys(user).await.unwrap();
    c.find(Locator::Id("password")).await.unwrap().send_keys(password).await.unwrap();
    c.find(Locator::Id("login")).await.unwrap().click().await.unwrap();
}

fn screenshots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Origin and cookie checks with curl on the browser's own session.
fn forged_requests(admin: SocketAddr, cookie: &str, csrf: &str) {
    let post = |origin: &str, body: &str| {
        let url = format!("https://{admin}/ui/nodes");
        let out = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", &url])
            .args(["-H", &format!("Cookie: __Host-edge_session={cookie}")])
            .args(["-H", &format!("Origin: {origin}")])
            .args(["-H", "Content-Type: application/x-www-form-urlencoded", "--data", body])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<u16>().unwrap_or(0)
    };
    assert_eq!(post("https://evil.example", &format!("csrf={csrf}&name=forged")), 403, "cross-origin POST");
    assert_eq!(post(&format!("https://{admin}"), "name=forged"), 403, "no CSRF token");
    assert_eq!(post(&format!("https://{admin}"), "csrf=wrong&name=forged"), 403, "wrong CSRF token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_adds_watches_rotates_and_removes_a_node_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let shots = screenshots_dir();
    let server = Server::start(&dir.path().join("server"), "").unwrap();
    let admin = server.addrs.admin.unwrap();
    let base = format!("https://{admin}");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "correct horse battery staple\n").unwrap();
    server.cli(&["user", "add", "alice", "--password-file", pw.to_str().unwrap()]).unwrap();

    let (_driver, port) = start_driver(&dir.path().join("chromedriver.log"));
    let c = browser(port, &dir.path().join("profile")).await;

    // Unauthenticated pages lead to the login page.
    c.goto(&format!("{base}/ui/nodes")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/login"));
    shot(&c, &shots, "login").await;

    log_in(&c, &base, "alice", "correct horse battery staple").await;
    wait_path(&c, "/ui/nodes").await;
    let cookies = c.get_all_cookies().await.unwrap();
    let session = cookies.iter().find(|k| k.name() == "__Host-edge_session").expect("session cookie");
    assert_eq!(session.http_only(), Some(true), "HttpOnly");
    assert_eq!(session.secure(), Some(true), "Secure");
    assert_eq!(format!("{:?}", session.same_site()), "Some(Strict)", "SameSite=Strict");
    let cookie_value = session.value().to_string();
    // Scripts cannot read it.
    let visible = c.execute("return document.cookie", vec![]).await.unwrap();
    assert!(!visible.as_str().unwrap_or("").contains("edge_session"), "{visible}");

    // Add a node; the page shows the join string and the agent command once.
    c.goto(&format!("{base}/ui/nodes/new")).await.unwrap();
    shot(&c, &shots, "add-node").await;
    c.find(Locator::Id("name")).await.unwrap().send_keys("web1").await.unwrap();
    c.find(Locator::Id("create")).await.unwrap().click().await.unwrap();
    let join = text_of(&c, "#join").await;
    assert!(join.starts_with("edge://"), "{join}");
    let command = text_of(&c, "#agent-command").await;
    assert!(command.contains(&join) && command.starts_with("edge-agent run"), "{command}");
    c.find(Locator::Css("button[data-copy=join]")).await.unwrap();
    shot(&c, &shots, "node-created").await;
    let csrf = c.find(Locator::Css("input[name=csrf]")).await.unwrap().attr("value").await.unwrap().unwrap();
    forged_requests(admin, &cookie_value, &csrf);

    // The nodes page, left open: the node turns connected without a reload.
    c.goto(&format!("{base}/ui/nodes")).await.unwrap();
    let row = "tr#node-web1";
    assert_eq!(
        c.find(Locator::Css(row)).await.unwrap().attr("data-connected").await.unwrap().as_deref(),
        Some("false")
    );
    c.execute("window.__stillHere = 42;", vec![]).await.unwrap();
    let upstream = upstreams::http("hello from web1").await;
    let agent = Agent::start(&dir.path().join("agent"), &join, upstream, &[]).unwrap();
    let ready = Instant::now();
    let connected = eventually(Duration::from_secs(5), || async {
        let r = c.find(Locator::Css(row)).await;
        match r {
            Ok(e) => e.attr("data-connected").await.ok().flatten().as_deref() == Some("true"),
            Err(_) => false,
        }
    })
    .await;
    assert!(connected, "the node did not show connected within 5 s of the agent's tunnel");
    let took = ready.elapsed();
    let marker = c.execute("return window.__stillHere;", vec![]).await.unwrap();
    assert_eq!(marker, serde_json::json!(42), "the page was not reloaded");
    let servers_cell = text_of(&c, "tr#node-web1 td[data-f=servers]").await;
    assert!(!servers_cell.is_empty() && servers_cell != "—", "{servers_cell}");
    eprintln!("node shown connected {} ms after the agent was ready", took.as_millis());
    shot(&c, &shots, "nodes").await;

    // At a phone's width nothing overflows sideways.
    c.set_window_size(390, 844).await.unwrap();
    let overflow = c
        .execute("return document.documentElement.scrollWidth - document.documentElement.clientWidth;", vec![])
        .await
        .unwrap();
    assert!(overflow.as_i64().unwrap_or(1) <= 0, "horizontal overflow at phone width: {overflow}");
    shot(&c, &shots, "nodes-phone").await;
    c.set_window_size(1280, 1000).await.unwrap();

    // The node page shows the transition offline -> proxy (the detector
    // decides within a probe round; the page is reloaded to look again).
    let node_url = format!("{base}/ui/nodes/web1");
    let proxied = eventually(Duration::from_secs(30), || async {
        c.goto(&node_url).await.is_ok() && text_of(&c, "#timeline").await.contains("offline -> proxy")
    })
    .await;
    assert!(proxied, "no offline -> proxy transition on the node page: {}", text_of(&c, "#timeline").await);
    assert!(text_of(&c, "#hostnames").await.contains("web1.edge.test"));
    shot(&c, &shots, "node").await;

    // Rotate the token (with confirmation): the agent is refused.
    c.find(Locator::Id("rotate")).await.unwrap().click().await.unwrap();
    c.accept_alert().await.unwrap();
    let new_join = text_of(&c, "#join").await;
    assert_ne!(new_join, join);
    shot(&c, &shots, "token-rotated").await;
    let mut agent = agent;
    let exited = agent.proc.wait_exit(Duration::from_secs(15));
    assert!(exited.is_some_and(|s| !s.success()), "the agent with the old token was not refused");
    assert!(agent.proc.log_text().to_lowercase().contains("token"), "{}", agent.proc.log_text());

    // Claim a customer's domain for the node: pending, with what to publish.
    c.goto(&format!("{base}/ui/domains")).await.unwrap();
    c.find(Locator::Id("dname")).await.unwrap().send_keys("www.shop.test").await.unwrap();
    c.find(Locator::Id("add-domain")).await.unwrap().click().await.unwrap();
    // Same path before and after the submit: wait for the new page.
    let claimed = eventually(Duration::from_secs(10), || async {
        let domains = text_of(&c, "#domains").await;
        domains.contains("www.shop.test")
            && domains.contains("pending")
            && domains.contains("_edge-verify.www.shop.test")
    })
    .await;
    assert!(claimed, "{}", text_of(&c, "#domains").await);
    shot(&c, &shots, "domains").await;

    // Remove the node (with confirmation).
    c.goto(&node_url).await.unwrap();
    c.find(Locator::Id("remove")).await.unwrap().click().await.unwrap();
    c.accept_alert().await.unwrap();
    wait_path(&c, "/ui/nodes").await;
    let gone = eventually(Duration::from_secs(5), || async { c.find(Locator::Css(row)).await.is_err() }).await;
    assert!(gone, "the removed node is still listed");

    // The other pages render.
    for (path, name) in [("/ui/dns", "dns"), ("/ui/servers", "servers"), ("/ui/access", "access")] {
        c.goto(&format!("{base}{path}")).await.unwrap();
        c.find(Locator::Css("main h1")).await.unwrap();
        shot(&c, &shots, name).await;
    }
    assert!(text_of(&c, "#users").await.contains("alice"));
    assert!(text_of(&c, "#tokens").await.contains("admin.token"));

    // The audit log page has all three changes.
    c.goto(&format!("{base}/ui/audit")).await.unwrap();
    let audit = text_of(&c, "#audit").await;
    for action in ["node.create", "node.rotate_token", "node.remove", "domain.create"] {
        assert!(
            audit.lines().any(|l| l.contains(action) && l.contains("web1") && l.contains("user:alice")),
            "{action} missing:\n{audit}"
        );
    }
    shot(&c, &shots, "audit").await;
    // The filter form's blank fields filter nothing; a target narrows.
    c.find(Locator::Id("ftarget")).await.unwrap().send_keys("web1").await.unwrap();
    c.find(Locator::Css("form.filters button")).await.unwrap().click().await.unwrap();
    // The path is /ui/audit before and after the submit: wait for the
    // filtered page itself, not just the path.
    let filtered = eventually(Duration::from_secs(10), || async {
        let shown = text_of(&c, "#audit").await;
        shown.contains("node.remove") && !shown.contains("session.login")
    })
    .await;
    assert!(filtered, "the filter did not apply:\n{}", text_of(&c, "#audit").await);

    // Security headers on every page.
    let r = request(admin, "GET", "/ui/login", &[], None).unwrap();
    let csp = r.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"));
    assert!(r.header("referrer-policy").is_some());

    // Log out: the old cookie no longer works.
    c.goto(&format!("{base}/ui/nodes")).await.unwrap();
    c.find(Locator::Id("logout")).await.unwrap().click().await.unwrap();
    wait_path(&c, "/ui/login").await;
    let r =
        request(admin, "GET", "/api/v1/nodes", &[format!("Cookie: __Host-edge_session={cookie_value}")], None).unwrap();
    assert_eq!(r.status, 401, "a logged-out session still works: {r:?}");

    // Wrong passwords show an error; the sixth rapid attempt is refused,
    // even with the right password.
    for i in 0..5 {
        log_in(&c, &base, "alice", "not the password").await;
        let err = text_of(&c, "#login-error").await;
        assert!(err.contains("wrong user name or password"), "attempt {}: {err}", i + 1);
    }
    log_in(&c, &base, "alice", "correct horse battery staple").await;
    let err = text_of(&c, "#login-error").await;
    assert!(err.contains("too many failed logins"), "{err}");
    shot(&c, &shots, "login-refused").await;

    c.close().await.unwrap();
}
