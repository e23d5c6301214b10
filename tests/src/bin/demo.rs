//! `edge-demo`: a complete local demo on loopback, no root: edge-server,
//! one node with its edge-agent, and a tiny HTTP upstream, with embedded
//! SQLite in a temporary directory. Prints a `curl` line that works, then
//! waits for Ctrl-C (or, with `--check`, runs that request itself and exits).
//!
//! Run it with `scripts/demo.sh` (builds the binaries first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use edge_tests::{upstreams, Agent, Server, ZONE};

/// Start a local edge-server + edge-agent + upstream and print a curl line.
#[derive(Debug, Parser)]
struct Args {
    /// Run the printed curl command, check the answer, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(demo(args))
}

async fn demo(args: Args) -> Result<()> {
    let dir = tempfile::Builder::new().prefix("edge-demo-").tempdir()?;
    println!("edge demo: working directory {}", dir.path().display());
    let server = Server::start(&dir.path().join("server"), "[dns]\nlisten = \"127.0.0.1:0\"\n")
        .context("starting edge-server")?;
    println!(
        "edge-server: TLS on {}, QUIC for agents on {}, signal API on https://{}",
        server.addrs.tls, server.addrs.quic, server.addrs.api
    );
    let join = server.add_node("web1").context("edge-server node add web1")?;
    println!("node web1 created; its join string: {join}");
    let upstream = upstreams::http("Hello from web1, through edge-server and a QUIC tunnel to edge-agent!\n").await;
    println!("upstream (the node's local app): http://{upstream}");
    let agent = Agent::start(&dir.path().join("agent"), &join, upstream, &[]).context("starting edge-agent")?;
    println!("edge-agent: tunnel up; status on http://{}/ready", agent.status);

    let host = format!("web1.{ZONE}");
    let port = server.addrs.tls.port();
    let ca = agent.local_ca("web1");
    let curl = [
        "--resolve".to_string(),
        format!("{host}:{port}:127.0.0.1"),
        "--cacert".to_string(),
        ca.display().to_string(),
        format!("https://{host}:{port}/"),
    ];
    println!();
    println!("Try it (the certificate is the agent's own; edge-server never decrypts):");
    println!("  curl {}", curl.join(" "));
    println!(
        "Any name under the node works too, e.g. https://app.{host}:{port}/ with --resolve app.{host}:{port}:127.0.0.1"
    );
    println!("Node list:  {} --config {} node list", edge_tests::bin("edge-server").display(), server.config.display());
    if let Some(dns) = server.addrs.dns {
        println!("DNS (the server is authoritative for {ZONE}):  dig @{} -p {} {host} A", dns.ip(), dns.port());
    }
    if let Some(http) = server.addrs.http {
        println!("Plain HTTP redirects to https:  curl -i -H 'Host: {host}' http://{http}/");
    }
    // An operator for the dashboard, with a fresh password.
    let password = format!("demo-{:016x}", rand::random::<u64>());
    let pw_file = dir.path().join("demo.password");
    std::fs::write(&pw_file, format!("{password}\n"))?;
    server
        .cli(&["user", "add", "demo", "--password-file", &pw_file.display().to_string()])
        .context("edge-server user add demo")?;
    let dashboard = server.addrs.admin.context("the demo server has no admin listener")?;
    println!("Dashboard:  https://{dashboard}/  user demo, password {password}");
    println!("  (the certificate is edge-server's self-signed identity: accept it once in the browser;");
    println!("   in production keep listen.admin on a private address or behind a VPN)");
    println!();

    if args.check {
        let login = format!(r#"{{"user":"demo","password":"{password}"}}"#);
        let reply = edge_tests::admin::request(dashboard, "POST", "/api/v1/session", &[], Some(&login))?;
        if reply.status != 200 {
            bail!("dashboard login failed: {reply:?}");
        }
        println!("dashboard login works");
        let out =
            Command::new("curl").arg("-sS").arg("--max-time").arg("10").args(&curl).output().context("running curl")?;
        let body = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !body.contains("Hello from web1") {
            bail!("curl failed: {}{}", body, String::from_utf8_lossy(&out.stderr));
        }
        print!("curl answered: {body}");
        println!("demo check passed");
        return Ok(());
    }
    println!("Running; press Ctrl-C to stop (everything is removed on exit).");
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    drop(agent);
    drop(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
