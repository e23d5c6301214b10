//! Several processes opening one fresh data directory at once, as when
//! systemd starts the server while an operator adds the first nodes: every
//! one succeeds, they agree on one identity and admin token, and the server
//! serves every node they added.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use edge_tests::pebble::free_port;
use edge_tests::{bin, upstreams, wait_for, Agent, ZONE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_processes_on_a_fresh_data_dir_all_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("server");
    std::fs::create_dir_all(&dir).unwrap();
    // Fixed ports: `node add` must print a usable join string before the
    // server has recorded what it bound.
    let (quic, api) = (free_port().unwrap(), free_port().unwrap());
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "zone = \"{ZONE}\"\ndata_dir = \"data\"\n[listen]\ntls = \"127.0.0.1:0\"\n\
             quic = \"127.0.0.1:{quic}\"\napi = \"127.0.0.1:{api}\"\n[limits]\nper_source_rate = 0\n"
        ),
    )
    .unwrap();
    let server_log = std::fs::File::create(dir.join("server.log")).unwrap();
    let mut server = Command::new(bin("edge-server"));
    server.arg("--config").arg(&config).arg("run").stdin(Stdio::null()).stdout(Stdio::null()).stderr(server_log);
    let mut adds: Vec<Command> = (0..7)
        .map(|i| {
            let mut c = Command::new(bin("edge-server"));
            c.arg("--config").arg(&config).args(["node", "add", &format!("node{i}")]);
            c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
            c
        })
        .collect();
    // All eight start within a millisecond or two of each other.
    let mut server = server.spawn().unwrap();
    let children: Vec<_> = adds.iter_mut().map(|c| c.spawn().unwrap()).collect();
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let server_alive = server.try_wait().unwrap().is_none();
    let server_text = || std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    for (i, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "node add node{i} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(server_alive, "the server died at start:\n{}", server_text());
    let joins: Vec<String> = outputs.iter().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).collect();

    // Every join string pins the identity the server actually serves.
    let fingerprints: Vec<&str> =
        joins.iter().map(|j| j.split("fp=").nth(1).expect("fingerprint in join string")).collect();
    assert!(fingerprints.iter().all(|f| *f == fingerprints[0]), "{fingerprints:?}");

    let listening = dir.join("data/listening.json");
    wait_for("server listening", Duration::from_secs(20), || std::fs::read(&listening).ok()).unwrap();
    let token = std::fs::read_to_string(dir.join("data/admin.token")).unwrap().trim().to_string();
    let listed = wait_for("7 nodes in /api/nodes", Duration::from_secs(10), || {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "5", "-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("https://127.0.0.1:{api}/api/nodes"))
            .output()
            .ok()?;
        let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (nodes.as_array()?.len() == 7).then_some(nodes)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", server_text()));
    assert_eq!(listed.as_array().unwrap().len(), 7);

    // And it serves them: an agent with the first and the last join string
    // connects (its pin holds) and carries a request.
    let upstream = upstreams::http("first start\n").await;
    for (i, join) in [(0, &joins[0]), (6, &joins[6])] {
        let agent = Agent::start(&tmp.path().join(format!("agent{i}")), join, upstream, &[]).unwrap();
        let tls_port = {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&listening).unwrap()).unwrap();
            v["tls"].as_str().unwrap().rsplit_once(':').unwrap().1.to_string()
        };
        let host = format!("node{i}.{ZONE}");
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--resolve", &format!("{host}:{tls_port}:127.0.0.1"), "--cacert"])
            .arg(agent.local_ca(&format!("node{i}")))
            .arg(format!("https://{host}:{tls_port}/"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "first start\n", "{}", String::from_utf8_lossy(&out.stderr));
    }
    let _ = server.kill();
    let _ = server.wait();
}
