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
    /// The node's certificate.
    #[command(subcommand)]
    Cert(CertCommand),
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Show the certificate the agent serves: names, issuer, serial,
    /// validity, and when it will be renewed.
    Status {
        /// Config file (TOML), for data_dir and the renewal policy.
        #[arg(short, long, env = "EDGE_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory (instead of, or overriding, the config's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, clap::Args)]
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
    /// Public endpoint the server may probe and point DNS at (direct mode):
    /// ip:port, or :port for the address the server sees.
    #[arg(long, requires = "direct_listen")]
    public_endpoint: Option<String>,
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
            config.upstream = Some(upstream);
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
        if self.public_endpoint.is_some() {
            config.public_endpoint = self.public_endpoint;
        }
        config.validate(&origin)?;
        Ok((config, origin))
    }
}

fn main() -> std::process::ExitCode {
    match real_main(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: error: {}", edge_net::error_chain(e.chain()));
            std::process::ExitCode::from(2)
        }
    }
}

fn cert_status(config: Option<PathBuf>, data_dir: Option<PathBuf>, json: bool) -> Result<()> {
    let (data_dir, policy, cert_file) = match &config {
        Some(path) => {
            let c = AgentConfig::read(path)?;
            (data_dir.unwrap_or(c.data_dir), c.acme.renewal, c.cert_file)
        }
        None => (
            data_dir.unwrap_or_else(|| PathBuf::from("edge-agent-data")),
            edge_certs::renewal::RenewalPolicy::default(),
            None,
        ),
    };
    if let Some(file) = cert_file {
        let chain = edge_certs::pem::load_certs(&file)?;
        let info = edge_certs::info::cert_info(chain.first().map(|c| c.as_ref()).unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        return print_status(
            &info,
            "configured file (not renewed by the agent)",
            &file.display().to_string(),
            None,
            json,
        );
    }
    let dir = edge_agent::acme::store_dir(&data_dir);
    let stored = edge_agent::acme::load_stored(&dir).map_err(|e| anyhow::anyhow!(e))?;
    let Some(stored) = stored else {
        anyhow::bail!(
            "no ACME certificate in {} yet (the agent serves a local certificate until one is issued)",
            dir.display()
        );
    };
    let i = &stored.info;
    let renew = policy.renew_at(i.not_before, i.not_after, stored.meta.obtained_at, stored.meta.renewal_window, 0.5);
    print_status(i, &stored.meta.directory, &dir.join("node.pem").display().to_string(), Some(renew), json)
}

fn print_status(
    info: &edge_certs::info::CertInfo,
    source: &str,
    file: &str,
    renew_at: Option<i64>,
    json: bool,
) -> Result<()> {
    let fmt = edge_certs::format_unix;
    if json {
        let v = serde_json::json!({
            "names": info.names, "issuer": info.issuer, "serial": info.serial,
            "not_before": info.not_before, "not_after": info.not_after,
            "next_renewal": renew_at, "source": source, "file": file,
        });
        println!("{v:#}");
        return Ok(());
    }
    println!("names:        {}", info.names.join(", "));
    println!("issuer:       {}", info.issuer);
    println!("serial:       {}", info.serial);
    println!("not before:   {}", fmt(info.not_before));
    println!("not after:    {}", fmt(info.not_after));
    match renew_at {
        Some(t) => println!("next renewal: {} (estimate; ACME Renewal Info can bring it forward)", fmt(t)),
        None => println!("next renewal: none (replace the file yourself)"),
    }
    println!("source:       {source}");
    println!("file:         {file}");
    Ok(())
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Cert(CertCommand::Status { config, data_dir, json }) => cert_status(config, data_dir, json),
        Command::CheckConfig(args) => {
            let (config, _) = args.into_config()?;
            println!("{config:#?}");
            Ok(())
        }
        Command::Run(args) => {
            let (config, origin) = args.clone().into_config()?;
            edge_net::logging::init(config.log_format);
            edge_net::raise_fd_limit();
            let runtime = config.runtime.build().context("starting tokio runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                let (reloads, reloaded) = tokio::sync::mpsc::channel(4);
                tokio::spawn(signal_handler(args, reloads, shutdown.clone()));
                edge_agent::run(config, &origin, reloaded, shutdown).await
            })?;
            Ok(())
        }
    }
}

/// SIGTERM and SIGINT cancel (the agent drains by itself); SIGHUP reads
/// the config again and, if it is valid, hands it to the agent.
async fn signal_handler(args: RunArgs, reloads: tokio::sync::mpsc::Sender<AgentConfig>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT received"); break; }
            _ = term.recv() => { tracing::info!("SIGTERM received"); break; }
            // A reload must never stop the agent (systemd maps reload to
            // SIGHUP): an invalid file is refused and the running config stays.
            _ = hup.recv() => match args.clone().into_config() {
                Ok((config, origin)) => {
                    tracing::info!(%origin, "SIGHUP received: reloading routes");
                    let _ = reloads.send(config).await;
                }
                // One line: a TOML error spans several.
                Err(e) => tracing::error!(error = %edge_net::error_chain(e.chain()).replace('\n', " "),
                    "SIGHUP received: the config is invalid; the running config stays"),
            },
        }
    }
    shutdown.cancel();
}
