//! The admin API (`/api/v1`) against a real server: every endpoint, its
//! validation errors (422 naming the field), 409 on duplicates, 401/403 by
//! scope, sessions with their cookie flags and CSRF checks, the audit log
//! of API and CLI changes, and the OpenAPI document checked against the
//! routes the server answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;

use edge_tests::admin::{bearer, request, Reply};
use edge_tests::{bin, Server};

fn call(addr: SocketAddr, method: &str, path: &str, token: &str, body: Option<&str>) -> Reply {
    request(addr, method, path, &[bearer(token)], body).unwrap()
}

fn assert_invalid(r: &Reply, field: &str) {
    assert_eq!(r.status, 422, "{r:?}");
    let j = r.json();
    assert_eq!(j["error"], "invalid", "{r:?}");
    assert_eq!(j["field"], field, "{r:?}");
}

#[test]
fn every_documented_route_is_served_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "").unwrap();
    let admin = server.addrs.admin.unwrap();
    let token = server.admin_token();
    let doc = request(admin, "GET", "/api/v1/openapi.json", &[], None).unwrap();
    assert_eq!(doc.status, 200, "served without a token");
    let doc = doc.json();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut operations = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{name}", "nonexistent").replace("{id}", "nonexistent");
        let concrete = if path == "/api/v1/dns/records" { format!("{concrete}?name=nonexistent") } else { concrete };
        for method in ops.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            let body = matches!(m.as_str(), "POST" | "PUT").then_some("{}");
            let r = call(admin, &m, &concrete, &token, body);
            assert_ne!(r.status, 405, "{m} {path} is documented but not routed");
            assert_ne!(r.json()["message"], "no such route", "{m} {path} is documented but not routed");
            assert!(r.status < 500, "{m} {path}: {r:?}");
            // Documented answers only.
            let documented = ops[method]["responses"].as_object().unwrap();
            assert!(documented.contains_key(&r.status.to_string()), "{m} {path} answered undocumented {}", r.status);
            operations += 1;
        }
    }
    assert!(operations >= 20, "{operations} operations");
    let r = call(admin, "GET", "/api/v1/nope", &token, None);
    assert_eq!((r.status, r.json()["message"].as_str()), (404, Some("no such route")));
    // The same API is on the signal API's listener for automation.
    let r = call(server.addrs.api, "GET", "/api/v1/nodes", &token, None);
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn nodes_records_tokens_users_and_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "").unwrap();
    let a = server.addrs.admin.unwrap();
    let admin = server.admin_token();

    // Nodes.
    let r = call(a, "POST", "/api/v1/nodes", &admin, Some(r#"{"name":"web1"}"#));
    assert_eq!(r.status, 201, "{r:?}");
    let created = r.json();
    let join = created["join"].as_str().unwrap().to_string();
    assert!(join.starts_with("edge://"), "{join}");
    assert_eq!(created["hostnames"][0], "web1.edge.test");
    assert!(created["agent_command"].as_str().unwrap().starts_with(&format!("edge-agent run --join '{join}'")));
    let r = call(a, "POST", "/api/v1/nodes", &admin, Some(r#"{"name":"web1"}"#));
    assert_eq!(
        (r.status, r.json()["error"].as_str(), r.json()["field"].as_str()),
        (409, Some("conflict"), Some("name"))
    );
    assert_invalid(&call(a, "POST", "/api/v1/nodes", &admin, Some(r#"{"name":"Bad_Name"}"#)), "name");
    assert_invalid(&call(a, "POST", "/api/v1/nodes", &admin, Some(r#"{"name":"x","extra":1}"#)), "extra");
    assert_invalid(&call(a, "POST", "/api/v1/nodes", &admin, Some(r#"{}"#)), "name");
    assert_invalid(&call(a, "POST", "/api/v1/nodes", &admin, Some(r#"{"name":7}"#)), "name");
    assert_eq!(call(a, "POST", "/api/v1/nodes", &admin, Some("not json")).status, 400);
    let big = format!(r#"{{"name":"{}"}}"#, "a".repeat(100_000));
    // The server answers 413 and closes with the rest of the body unread;
    // the kernel may then reset the connection before curl reads the
    // answer (status 0). A reset is retried; any answer must be 413.
    let status =
        (0..5).map(|_| call(a, "POST", "/api/v1/nodes", &admin, Some(&big)).status).find(|s| *s != 0).unwrap_or(0);
    assert_eq!(status, 413);

    let r = call(a, "GET", "/api/v1/nodes/web1", &admin, None);
    assert_eq!(r.status, 200, "{r:?}");
    let d = r.json();
    assert_eq!(
        (d["name"].as_str(), d["mode"].as_str(), d["connected"].as_bool()),
        (Some("web1"), Some("offline"), Some(false))
    );
    assert!(d["transitions"].is_array() && d["probes"].is_array() && d["servers"].is_array(), "{d}");
    assert_eq!(call(a, "GET", "/api/v1/nodes/ghost", &admin, None).status, 404);
    let list = call(a, "GET", "/api/v1/nodes", &admin, None).json();
    assert_eq!(list.as_array().unwrap().len(), 1);

    assert_eq!(call(a, "PUT", "/api/v1/nodes/web1/http-mode", &admin, Some(r#"{"mode":"proxy"}"#)).status, 204);
    assert_eq!(call(a, "GET", "/api/v1/nodes/web1", &admin, None).json()["http_mode"], "proxy");
    assert_invalid(&call(a, "PUT", "/api/v1/nodes/web1/http-mode", &admin, Some(r#"{"mode":"teleport"}"#)), "mode");
    assert_eq!(call(a, "PUT", "/api/v1/nodes/ghost/http-mode", &admin, Some(r#"{"mode":"proxy"}"#)).status, 404);

    let r = call(a, "POST", "/api/v1/nodes/web1/rotate-token", &admin, None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_ne!(r.json()["join"].as_str().unwrap(), join, "a new token");
    assert_eq!(call(a, "POST", "/api/v1/nodes/ghost/rotate-token", &admin, None).status, 404);

    // Static DNS records.
    let rec = r#"{"name":"www","kind":"A","value":"192.0.2.80","ttl":120}"#;
    let r = call(a, "POST", "/api/v1/dns/records", &admin, Some(rec));
    assert_eq!((r.status, r.json()["name"].as_str()), (201, Some("www.edge.test")), "{r:?}");
    assert_eq!(call(a, "POST", "/api/v1/dns/records", &admin, Some(rec)).status, 409);
    assert_invalid(
        &call(a, "POST", "/api/v1/dns/records", &admin, Some(r#"{"name":"www","kind":"A","value":"nope"}"#)),
        "value",
    );
    assert_invalid(
        &call(a, "POST", "/api/v1/dns/records", &admin, Some(r#"{"name":"x.other.","kind":"A","value":"192.0.2.1"}"#)),
        "name",
    );
    assert_invalid(
        &call(a, "POST", "/api/v1/dns/records", &admin, Some(r#"{"name":"x","kind":"MX","value":"1"}"#)),
        "kind",
    );
    assert_invalid(
        &call(
            a,
            "POST",
            "/api/v1/dns/records",
            &admin,
            Some(r#"{"name":"x","kind":"A","value":"192.0.2.1","ttl":90000}"#),
        ),
        "ttl",
    );
    let r = call(a, "POST", "/api/v1/dns/records", &admin, Some(r#"{"name":"a.web1","kind":"A","value":"192.0.2.1"}"#));
    assert_eq!(r.status, 409, "a node's names are its own: {r:?}");
    let records = call(a, "GET", "/api/v1/dns/records", &admin, None).json();
    assert_eq!(records.as_array().unwrap().len(), 1, "{records}");
    assert_eq!(call(a, "DELETE", "/api/v1/dns/records?name=www&kind=A", &admin, None).status, 204);
    assert_eq!(call(a, "DELETE", "/api/v1/dns/records?name=www", &admin, None).status, 404);
    assert_invalid(&call(a, "DELETE", "/api/v1/dns/records?kind=A", &admin, None), "name");

    // Cluster servers.
    let servers = call(a, "GET", "/api/v1/servers", &admin, None).json();
    assert_eq!(servers.as_array().unwrap().len(), 1, "{servers}");
    assert_eq!(servers[0]["alive"], true);
    assert_eq!(call(a, "DELETE", "/api/v1/servers/ghost", &admin, None).status, 404);

    // Tokens by scope.
    let r = call(a, "POST", "/api/v1/tokens", &admin, Some(r#"{"name":"ci","scope":"read"}"#));
    assert_eq!(r.status, 201, "{r:?}");
    let read = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(call(a, "POST", "/api/v1/tokens", &admin, Some(r#"{"name":"ci","scope":"admin"}"#)).status, 409);
    assert_invalid(&call(a, "POST", "/api/v1/tokens", &admin, Some(r#"{"name":"x","scope":"root"}"#)), "scope");
    assert_eq!(call(a, "GET", "/api/v1/nodes", &read, None).status, 200, "read scope reads");
    let r = call(a, "POST", "/api/v1/nodes", &read, Some(r#"{"name":"web2"}"#));
    assert_eq!((r.status, r.json()["error"].as_str()), (403, Some("forbidden")), "read scope cannot change");
    assert_eq!(call(a, "GET", "/api/v1/tokens", &read, None).status, 403, "nor see tokens");
    assert_eq!(request(a, "GET", "/api/v1/nodes", &[], None).unwrap().status, 401);
    assert_eq!(call(a, "GET", "/api/v1/nodes", "edge_wrong", None).status, 401);
    let tokens = call(a, "GET", "/api/v1/tokens", &admin, None).json();
    let names: Vec<&str> = tokens.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].starts_with("admin.token@") && names[1] == "ci", "the configured admin token is one: {names:?}");
    let ci = tokens.as_array().unwrap().iter().find(|t| t["name"] == "ci").unwrap();
    assert!(ci["last_used"].is_i64(), "last use shown: {ci}");
    assert!(!tokens.to_string().contains(&read), "values are never listed");
    assert_eq!(call(a, "DELETE", "/api/v1/tokens/ci", &admin, None).status, 204);
    assert_eq!(call(a, "GET", "/api/v1/nodes", &read, None).status, 401, "revoked");
    assert_eq!(call(a, "DELETE", "/api/v1/tokens/ci", &admin, None).status, 404);
    // The old endpoint keeps taking the admin token.
    assert_eq!(server.api_get("/api/nodes", Some(&admin)).unwrap().0, 200);

    // Users.
    let r = call(a, "POST", "/api/v1/users", &admin, Some(r#"{"name":"bob","password":"bob's long password"}"#));
    assert_eq!(r.status, 201, "{r:?}");
    assert_invalid(&call(a, "POST", "/api/v1/users", &admin, Some(r#"{"name":"eve","password":"short"}"#)), "password");
    assert_invalid(
        &call(a, "POST", "/api/v1/users", &admin, Some(r#"{"name":"Eve!","password":"long enough pw"}"#)),
        "name",
    );
    assert_eq!(
        call(a, "POST", "/api/v1/users", &admin, Some(r#"{"name":"bob","password":"another long one"}"#)).status,
        409
    );
    let users = call(a, "GET", "/api/v1/users", &admin, None).json();
    assert_eq!(users[0]["name"], "bob");
    assert!(!users.to_string().contains("argon2"), "hashes are never listed");

    // Sessions: login, cookie flags, CSRF, logout.
    let login = |user: &str, pw: &str| {
        request(a, "POST", "/api/v1/session", &[], Some(&format!(r#"{{"user":"{user}","password":"{pw}"}}"#))).unwrap()
    };
    let r = login("bob", "wrong password!");
    assert_eq!((r.status, r.json()["error"].as_str()), (401, Some("unauthorized")));
    let r = login("bob", "bob's long password");
    assert_eq!(r.status, 200, "{r:?}");
    let cookie = r.header("set-cookie").unwrap();
    for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    let pair = cookie.split(';').next().unwrap().to_string();
    let csrf = r.json()["csrf_token"].as_str().unwrap().to_string();
    let with_cookie = |extra: &[&str]| {
        let mut h = vec![format!("Cookie: {pair}")];
        h.extend(extra.iter().map(|s| s.to_string()));
        h
    };
    let r = request(a, "GET", "/api/v1/session", &with_cookie(&[]), None).unwrap();
    assert_eq!((r.status, r.json()["user"].as_str()), (200, Some("bob")));
    let origin = format!("Origin: https://{a}");
    let csrf_h = format!("X-CSRF-Token: {csrf}");
    let body = Some(r#"{"name":"web3"}"#);
    let r = request(a, "POST", "/api/v1/nodes", &with_cookie(&[&origin]), body).unwrap();
    assert_eq!(r.status, 403, "no CSRF token: {r:?}");
    let r =
        request(a, "POST", "/api/v1/nodes", &with_cookie(&["Origin: https://evil.example", &csrf_h]), body).unwrap();
    assert_eq!(r.status, 403, "cross-origin: {r:?}");
    let r = request(a, "POST", "/api/v1/nodes", &with_cookie(&[&csrf_h]), body).unwrap();
    assert_eq!(r.status, 403, "no Origin: {r:?}");
    let r = request(a, "POST", "/api/v1/nodes", &with_cookie(&[&origin, &csrf_h]), body).unwrap();
    assert_eq!(r.status, 201, "{r:?}");
    let r = request(a, "DELETE", "/api/v1/session", &with_cookie(&[&origin, &csrf_h]), None).unwrap();
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(request(a, "GET", "/api/v1/session", &with_cookie(&[]), None).unwrap().status, 401, "logged out");
    // Removing a user ends their sessions.
    let r = login("bob", "bob's long password");
    let pair2 = r.header("set-cookie").unwrap().split(';').next().unwrap().to_string();
    assert_eq!(call(a, "DELETE", "/api/v1/users/bob", &admin, None).status, 204);
    let r = request(a, "GET", "/api/v1/nodes", &[format!("Cookie: {pair2}")], None).unwrap();
    assert_eq!(r.status, 401, "sessions end with the user");

    // CLI changes are audited too.
    let out = server.cli(&["node", "add", "cli1"]).unwrap();
    assert!(out.starts_with("edge://"));
    server.cli(&["node", "remove", "web3"]).unwrap();

    // The audit log: filters and paging.
    let page = call(a, "GET", "/api/v1/audit?limit=500", &admin, None).json();
    let entries = page["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e["action"].as_str().unwrap()).collect();
    for want in [
        "node.create",
        "node.http_mode",
        "node.rotate_token",
        "dns.create",
        "dns.delete",
        "token.add",
        "token.remove",
        "user.add",
        "user.remove",
        "session.login",
        "session.logout",
        "node.remove",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    let by_cli = entries.iter().find(|e| e["target"] == "cli1").unwrap();
    assert!(by_cli["actor"].as_str().unwrap().starts_with("cli:") && by_cli["source"] == "cli", "{by_cli}");
    let by_bob = entries.iter().find(|e| e["target"] == "web3" && e["action"] == "node.create").unwrap();
    assert_eq!(by_bob["actor"], "user:bob");
    assert_eq!(by_bob["source"], "127.0.0.1");
    let by_token = entries.iter().find(|e| e["target"] == "web1" && e["action"] == "node.create").unwrap();
    assert!(by_token["actor"].as_str().unwrap().starts_with("token:admin.token@"), "{by_token}");
    let only = call(a, "GET", "/api/v1/audit?action=node.create", &admin, None).json();
    let only = only["entries"].as_array().unwrap();
    assert_eq!(only.len(), 3, "web1, web3, cli1: {only:?}");
    assert!(only.iter().all(|e| e["action"] == "node.create"));
    let p1 = call(a, "GET", "/api/v1/audit?limit=2", &admin, None).json();
    assert_eq!(p1["entries"].as_array().unwrap().len(), 2);
    let before = p1["next_before"].as_i64().unwrap();
    let p2 = call(a, "GET", &format!("/api/v1/audit?limit=2&before={before}"), &admin, None).json();
    assert!(p2["entries"][0]["id"].as_i64().unwrap() < before);
    assert_invalid(&call(a, "GET", "/api/v1/audit?action=node.nuke", &admin, None), "action");
    assert_invalid(&call(a, "GET", "/api/v1/audit?limit=0", &admin, None), "limit");
    let cli_audit = server.cli(&["audit", "--action", "node.remove"]).unwrap();
    assert!(cli_audit.contains("web3") && cli_audit.contains("cli:"), "{cli_audit}");
}

#[test]
fn cli_users_tokens_and_login_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "").unwrap();
    let a = server.addrs.admin.unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "a password of some length\n").unwrap();
    let out = server.cli_output(&["user", "add", "alice", "--password-file", pw.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = server.cli_output(&["user", "add", "alice", "--password-file", pw.to_str().unwrap()]).unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists already"));
    // Without a terminal and without a file the CLI says how.
    let out = Command::new(bin("edge-server"))
        .args(["--config", server.config.to_str().unwrap(), "user", "add", "carol"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--password-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.cli(&["user", "list"]).unwrap().contains("alice"));

    let token = server.cli(&["token", "add", "--name", "deploy", "--scope", "admin"]).unwrap().trim().to_string();
    assert!(token.starts_with("edge_"), "{token}");
    assert_eq!(call(a, "POST", "/api/v1/nodes", &token, Some(r#"{"name":"n1"}"#)).status, 201);
    let list = server.cli(&["token", "list"]).unwrap();
    assert!(list.contains("deploy") && list.contains("admin.token") && !list.contains(&token), "{list}");
    server.cli(&["token", "remove", "deploy"]).unwrap();
    assert_eq!(call(a, "GET", "/api/v1/nodes", &token, None).status, 401);
    let bad = server.cli_output(&["token", "add", "--name", "x", "--scope", "root"]).unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("read or admin"));

    // Five failures in a minute per user, then even the right password is
    // refused.
    let login = |pw: &str| {
        request(a, "POST", "/api/v1/session", &[], Some(&format!(r#"{{"user":"alice","password":"{pw}"}}"#))).unwrap()
    };
    for i in 0..5 {
        assert_eq!(login("wrong password").status, 401, "attempt {}", i + 1);
    }
    let r = login("a password of some length");
    assert_eq!((r.status, r.json()["error"].as_str()), (429, Some("rate_limited")), "{r:?}");

    server.cli(&["user", "remove", "alice"]).unwrap();
    assert!(!server.cli(&["user", "list"]).unwrap().contains("alice"));
    let audit = server.cli(&["audit"]).unwrap();
    for want in ["user.add", "user.remove", "token.add", "token.remove", "node.create"] {
        assert!(audit.contains(want), "{want} missing:\n{audit}");
    }
}
