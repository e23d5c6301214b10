//! `edge-agent` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edge_agent::config::{AgentConfig, Mode};
use tokio_util::sync::CancellationToken;

/// Serves a node's HTTPS names through an edge-server, from behind NAT.
///
/// The agent dials the server (QUIC, outbound only), terminates TLS with
/// the node's own certificate, and forwards plaintext to the local upstream.
///
/// Examples:
///   edge-agent run --join 'edge://...' --upstream 127.0.0.1:3000
///   edge-agent run --config /etc/edge/agent.toml
#[derive(Debug, Parser)]
#[command(name = "edge-agent", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect and serve until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Check a config (file and flags) and print it with secrets masked.
    CheckConfig(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Config file (TOML); flags below override its values.
    #[arg(short, long, env = "EDGE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Join string printed by `edge-server node add`.
    #[arg(long, env = "EDGE_AGENT_JOIN", hide_env_values = true)]
    join: Option<String>,
    /// Local service that receives client connections, host:port.
    #[arg(long)]
    upstream: Option<String>,
    /// Forward raw TLS to the upstream instead of terminating it here.
    #[arg(long)]
    passthrough: bool,
    /// Send a PROXY protocol v2 header with the client address to the upstream.
    #[arg(long)]
    proxy_protocol: bool,
    /// Directory for generated certificates.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node certificate chain (PEM); generated locally when omitted.
    #[arg(long, requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// Node private key (PEM).
    #[arg(long, requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// Serve /ready and /metrics on this loopback address.
    #[arg(long)]
    status_listen: Option<SocketAddr>,
    /// Also accept clients directly on this address (no tunnel).
    #[arg(long)]
    direct_listen: Option<SocketAddr>,
}

impl RunArgs {
    fn into_config(self) -> Result<(AgentConfig, String)> {
        let (mut config, origin) = match &self.config {
            Some(path) => (AgentConfig::read(path)?, path.display().to_string()),
            None => {
                let missing = |what| anyhow::anyhow!("{what} is required (or give --config FILE)");
                let join = self.join.clone().ok_or_else(|| missing("--join"))?;
                let upstream = self.upstream.clone().ok_or_else(|| missing("--upstream"))?;
                let text = format!("join = {join:?}\nupstream = {upstream:?}\n");
                (AgentConfig::parse(&text, "command line")?, "command line".to_string())
            }
        };
        if let Some(join) = self.join {
            config.join = join;
        }
        if let Some(upstream) = self.upstream {
            config.upstream = upstream;
        }
        if self.passthrough {
            config.mode = Mode::Passthrough;
        }
        if self.proxy_protocol {
            config.proxy_protocol = true;
        }
        if let Some(dir) = self.data_dir {
            config.data_dir = dir;
        }
        if self.cert_file.is_some() {
            config.cert_file = self.cert_file;
            config.key_file = self.key_file;
        }
        if self.status_listen.is_some() {
            config.status_listen = self.status_listen;
        }
        if self.direct_listen.is_some() {
            config.direct_listen = self.direct_listen;
        }
        config.validate(&origin)?;
        Ok((config, origin))
    }
}

fn main() -> std::process::ExitCode {
    match real_main(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::CheckConfig(args) => {
            let (config, _) = args.into_config()?;
            println!("{config:#?}");
            Ok(())
        }
        Command::Run(args) => {
            let (config, origin) = args.into_config()?;
            edge_net::logging::init(config.log_format);
            edge_net::raise_fd_limit();
            let runtime = tokio::runtime::Runtime::new().context("starting tokio runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(signal_handler(shutdown.clone()));
                edge_agent::run(config, &origin, shutdown).await
            })?;
            Ok(())
        }
    }
}

/// Signals only cancel; the agent drains by itself.
async fn signal_handler(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
    shutdown.cancel();
}
