//! The command lines teach and every error names what was wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use edge_tests::{bin, Server};

fn run(binary: &str, args: &[&str]) -> Output {
    Command::new(bin(binary)).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn server_with(dir: &Path, text: &str, args: &[&str]) -> Output {
    let config = dir.join("server.toml");
    std::fs::write(&config, text).unwrap();
    let mut full = vec!["--config", config.to_str().unwrap()];
    full.extend_from_slice(args);
    run("edge-server", &full)
}

#[test]
fn help_teaches() {
    let out = run("edge-server", &["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["run", "node", "check-config", "--config", "join string"] {
        assert!(text.contains(word), "server --help lacks {word:?}:\n{text}");
    }
    let out = run("edge-server", &["node", "add", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("*.NAME.<zone>"));
    let out = run("edge-agent", &["run", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["--join", "--upstream", "--passthrough", "--proxy-protocol", "--status-listen"] {
        assert!(text.contains(word), "agent run --help lacks {word:?}");
    }
}

#[test]
fn server_config_errors_name_file_field_and_value() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = run("edge-server", &["--config", "/nonexistent/server.toml", "run"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("/nonexistent/server.toml"), "{}", stderr(&missing));

    let cases = [
        (
            "zone = \"edge.test\"\ndata_dir = \"d\"\n[limits]\nclient_hello_max_bytes = 3\n",
            "limits.client_hello_max_bytes = 3",
        ),
        ("zone = \"edge.test\"\ndata_dir = \"d\"\nlisten_tls = \"x\"\n", "listen_tls"),
        ("zone = \"Not A Zone\"\ndata_dir = \"d\"\n", "zone = \"Not A Zone\""),
        ("zone = \"edge.test\"\ndata_dir = \"d\"\n[listen]\ntls = \"127.0.0.1\"\n", "tls"),
    ];
    for (text, expected) in cases {
        let out = server_with(tmp.path(), text, &["check-config"]);
        let err = stderr(&out);
        assert!(!out.status.success());
        assert!(err.contains("server.toml") && err.contains(expected), "expected {expected:?} in {err}");
    }
}

#[test]
fn node_commands_report_bad_names_and_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "zone = \"edge.test\"\ndata_dir = \"data\"\n[public]\nquic = \"edge.test:4433\"\n";
    let out = server_with(tmp.path(), text, &["node", "add", "Bad_Name"]);
    assert!(!out.status.success() && stderr(&out).contains("\"Bad_Name\""), "{}", stderr(&out));
    let out = server_with(tmp.path(), text, &["node", "add", "web1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let join = String::from_utf8_lossy(&out.stdout);
    assert!(join.starts_with("edge://web1.") && join.contains("@edge.test:4433?fp="), "{join}");
    let out = server_with(tmp.path(), text, &["node", "add", "web1"]);
    assert!(stderr(&out).contains("node \"web1\" already exists"), "{}", stderr(&out));
    let out = server_with(tmp.path(), text, &["node", "remove", "nope"]);
    assert!(stderr(&out).contains("no node named \"nope\""));
    let out = server_with(tmp.path(), text, &["node", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("web1.edge.test *.web1.edge.test"));
    // The token is stored only as a hash.
    let token = join.trim().strip_prefix("edge://").unwrap().split('@').next().unwrap().to_string();
    let db = std::fs::read(tmp.path().join("data/edge.db")).unwrap();
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()), "token found in the database");

    // No public address and an unroutable listen address: a clear error.
    let unroutable = tempfile::tempdir().unwrap();
    let out = server_with(unroutable.path(), "zone = \"edge.test\"\ndata_dir = \"data\"\n", &["node", "add", "web1"]);
    assert!(stderr(&out).contains("set public.quic in"), "{}", stderr(&out));
}

#[test]
fn startup_failures_name_the_address_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let text = format!("zone = \"edge.test\"\ndata_dir = \"data\"\n[listen]\ntls = \"{addr}\"\nquic = \"127.0.0.1:0\"\napi = \"127.0.0.1:0\"\n");
    let out = server_with(tmp.path(), &text, &["run"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("cannot bind tls listener on {addr}")), "{}", stderr(&out));

    // A corrupt database file is reported by path.
    let corrupt = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(corrupt.path().join("data")).unwrap();
    std::fs::write(corrupt.path().join("data/edge.db"), vec![0x42u8; 8192]).unwrap();
    let out = server_with(corrupt.path(), "zone = \"edge.test\"\ndata_dir = \"data\"\n", &["node", "list"]);
    assert!(!out.status.success() && stderr(&out).contains("edge.db"), "{}", stderr(&out));
}

#[test]
fn agent_errors_name_the_field() {
    let out = run("edge-agent", &["run", "--upstream", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--join is required"), "{}", stderr(&out));
    let out = run("edge-agent", &["run", "--join", "edge://nope", "--upstream", "127.0.0.1:1"]);
    assert!(stderr(&out).contains("command line: join:"), "{}", stderr(&out));
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "join = \"x\"\nupstream = \"h:1\"\nretries = 3\n").unwrap();
    let out = run("edge-agent", &["check-config", "--config", config.to_str().unwrap()]);
    assert!(stderr(&out).contains("agent.toml") && stderr(&out).contains("retries"), "{}", stderr(&out));
}

#[test]
fn example_configs_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = run("edge-server", &["--config", root.join("examples/server.toml").to_str().unwrap(), "check-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run("edge-agent", &["check-config", "--config", root.join("examples/agent.toml").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("AAAAAAAAAAAA"), "token masked in output");
}

#[test]
fn admin_api_requires_the_admin_token() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), "").unwrap();
    server.add_node("n1").unwrap();
    assert_eq!(server.api_get("/api/nodes", None).unwrap().0, 401);
    assert_eq!(server.api_get("/api/nodes", Some("wrong-token-wrong-token")).unwrap().0, 401);
    // The running server picks the new node up within a second.
    let nodes: serde_json::Value =
        edge_tests::wait_for("node in /api/nodes", std::time::Duration::from_secs(5), || {
            let (code, body) = server.api_get("/api/nodes", Some(&server.admin_token())).ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (code == 200 && v[0]["name"] == "n1").then_some(v)
        })
        .unwrap();
    assert_eq!(nodes[0]["name"], "n1");
    assert_eq!(nodes[0]["connected"], false);
    assert_eq!(server.api_get("/healthz", None).unwrap(), (200, "ok\n".into()));
}
