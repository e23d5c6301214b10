//! `edge-server` command line: run the server, manage nodes.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use edge_proto::join::JoinTicket;
use edge_server::config::{DnsConfig, RecordField, ServerConfig};
use edge_server::store::{HttpMode, StaticKind, StaticRecord, StoreConfig, StoreError, StoreTls};
use edge_server::{listening_file, token_hash, BoundAddrs, Server};
use tokio_util::sync::CancellationToken;

/// Public edge of the cluster: routes TLS by SNI over QUIC tunnels to node
/// agents, without decrypting.
///
/// Quick start:
///   edge-server --config server.toml run
///   edge-server --config server.toml node add web1     # prints a join string
///   edge-agent run --join '<join string>' --upstream 127.0.0.1:3000
///
/// State lives in SQLite in data_dir by default; set [store] url =
/// "postgres://..." to share it between servers (see `store copy`).
///
/// Exit codes: 0 ok, 1 error, 69 the store is unreachable (retry later).
#[derive(Debug, Parser)]
#[command(name = "edge-server", version, verbatim_doc_comment)]
struct Cli {
    /// Config file (TOML). See examples/server.toml for every field.
    #[arg(short, long, env = "EDGE_SERVER_CONFIG", default_value = "/etc/edge/server.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server until SIGINT or SIGTERM, then drain connections.
    Run,
    /// Check the config file and print it (secrets masked).
    CheckConfig,
    /// Manage nodes (works while the server runs: it follows the store's
    /// changes, at once on PostgreSQL and within `store.poll_ms` on SQLite).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Work on the store as a whole.
    #[command(subcommand)]
    Store(StoreCommand),
    /// The servers sharing this store: who is live, which nodes each holds
    /// tunnels to, and who decides nodes' modes.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Static DNS records kept in the store (every server on the store
    /// serves them; records in [dns] of a config file serve only there).
    #[command(subcommand)]
    Dns(DnsCommand),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// List the servers: liveness and lease, addresses, tunnels and nodes
    /// per server, and the current mode decider.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Forget a server that will not come back (retired): it leaves DNS
    /// answers and agents' lists at once. A server that still runs
    /// registers itself again at its next renewal.
    Remove {
        /// The server's id (see `cluster status`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum DnsCommand {
    /// Add a record, e.g. `dns add www A 192.0.2.80` or
    /// `dns add @ TXT "v=spf1 -all"`.
    Add {
        /// Name relative to the zone (`www`, `@` for the apex) or absolute
        /// (ending in `.`). Not a node's name or below it.
        name: String,
        /// A, AAAA, TXT or CAA.
        kind: StaticKind,
        /// Address, text, or a CAA value (`0 issue "letsencrypt.org"`).
        value: String,
        /// TTL in seconds.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(0..=86_400))]
        ttl: u32,
    },
    /// Remove the records at a name (only of one type, or one value, when
    /// given).
    Remove {
        /// Name, as for `add`.
        name: String,
        /// Only this type.
        kind: Option<StaticKind>,
        /// Only this value.
        value: Option<String>,
    },
    /// List the stored records.
    List,
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy everything (nodes, token hashes, TXT values, mode history,
    /// settings) from the configured store into an EMPTY store, in one
    /// transaction, then verify the row counts. This is how a server moves
    /// from SQLite to PostgreSQL: copy, point `[store] url` at the target,
    /// restart. Stop the server first so nothing is written meanwhile.
    ///
    ///   edge-server --config server.toml store copy --to postgres://edge@db:5432/edge --password-file /etc/edge/db.pw
    #[command(verbatim_doc_comment)]
    Copy {
        /// Target: postgres://user@host:port/db or sqlite://<path>.
        #[arg(long)]
        to: String,
        /// File holding the target's password (else EDGE_STORE_PASSWORD,
        /// else the URL's).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// TLS to the target: disable, verify-ca or verify-full (default:
        /// disable on loopback, verify-full elsewhere).
        #[arg(long, value_parser = parse_tls)]
        tls: Option<StoreTls>,
        /// PEM roots for the target's certificate (default: the system's).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
}

fn parse_tls(s: &str) -> Result<StoreTls, String> {
    match s {
        "disable" => Ok(StoreTls::Disable),
        "verify-ca" => Ok(StoreTls::VerifyCa),
        "verify-full" => Ok(StoreTls::VerifyFull),
        _ => Err(format!("{s:?}: use disable, verify-ca or verify-full")),
    }
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Create a node; prints the join string for its agent on stdout.
    ///
    /// The node NAME owns NAME.<zone> and *.NAME.<zone>. The token in the
    /// join string is shown only now; the server keeps only its hash.
    Add {
        /// One DNS label: lowercase letters, digits, '-'.
        name: String,
    },
    /// List nodes with their state.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node; its live tunnel is cut and its token stops working.
    Remove {
        /// Node name.
        name: String,
    },
    /// Issue a new token for a node (the old one stops working); prints
    /// the new join string.
    RotateToken {
        /// Node name.
        name: String,
    },
    /// Choose what plain HTTP (:80) does for a node in proxy mode:
    /// `redirect` to https (default) or `proxy` to the agent's upstream.
    Http {
        /// Node name.
        name: String,
        /// `redirect` or `proxy`.
        mode: HttpMode,
    },
    /// Show a node's mode, endpoint, recent probes and mode transitions.
    Show {
        /// Node name.
        name: String,
    },
}

/// Exit code when the store cannot be reached (sysexits' EX_UNAVAILABLE).
const EXIT_STORE_UNAVAILABLE: u8 = 69;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-server: error: {}", edge_net::error_chain(e.chain()));
            let unavailable = e.chain().any(|c| {
                c.downcast_ref::<StoreError>().is_some_and(StoreError::is_unavailable)
                    || c.downcast_ref::<edge_server::ServerError>()
                        .is_some_and(|s| matches!(s, edge_server::ServerError::Store(e) if e.is_unavailable()))
            });
            if unavailable {
                std::process::ExitCode::from(EXIT_STORE_UNAVAILABLE)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let config = ServerConfig::load(&cli.config).context("loading config")?;
    match cli.command {
        Command::Run => run(config),
        Command::CheckConfig => {
            println!("{config:#?}");
            Ok(())
        }
        Command::Node(cmd) => cli_runtime()?.block_on(node(config, &cli.config, cmd)),
        Command::Dns(cmd) => cli_runtime()?.block_on(dns(config, cmd)),
        Command::Cluster(cmd) => cli_runtime()?.block_on(cluster(config, cmd)),
        Command::Store(StoreCommand::Copy { to, password_file, tls, ca_file }) => {
            let target = StoreConfig { url: Some(to), password_file, tls, ca_file, ..StoreConfig::default() };
            target.validate().map_err(anyhow::Error::msg).context("--to")?;
            cli_runtime()?.block_on(store_copy(config, target))
        }
    }
}

fn cli_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio runtime")
}

/// `cluster status --json`.
#[derive(serde::Serialize)]
struct ClusterStatus {
    servers: Vec<edge_server::store::ServerEntry>,
    decider: Option<edge_server::store::Lease>,
    nodes: usize,
}

async fn cluster(config: ServerConfig, cmd: ClusterCommand) -> Result<()> {
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    match cmd {
        ClusterCommand::Status { json } => {
            let servers = store.list_servers().await?.servers;
            let decider = store.lease(edge_server::store::MODE_DECIDER).await?.filter(|l| l.left_ms >= 0);
            let nodes = store.list_nodes().await?.len();
            if json {
                println!("{}", serde_json::to_string_pretty(&ClusterStatus { servers, decider, nodes })?);
                return Ok(());
            }
            println!("store: {}  nodes: {nodes}", store.describe());
            match &decider {
                Some(lease) => {
                    let name = servers.iter().find(|s| s.record.id == lease.holder).map_or("?", |s| &s.record.name);
                    println!(
                        "mode decider: {name} ({}), lease token {}, {} ms left",
                        lease.holder, lease.token, lease.left_ms
                    );
                }
                None => println!("mode decider: none (no live server holds the lease)"),
            }
            println!(
                "{:<18} {:<16} {:<6} {:>9} {:<22} {:<22} {:>7}  NODES",
                "NAME", "ID", "LIVE", "LEASE MS", "QUIC", "API", "TUNNELS"
            );
            for s in &servers {
                println!(
                    "{:<18} {:<16} {:<6} {:>9} {:<22} {:<22} {:>7}  {}",
                    s.record.name,
                    s.record.id,
                    if s.alive { "yes" } else { "gone" },
                    s.lease_left_ms,
                    s.record.quic,
                    s.record.api,
                    s.tunnels.len(),
                    s.tunnels.join(" ")
                );
            }
        }
        ClusterCommand::Remove { id } => {
            if !store.remove_server(&id).await? {
                anyhow::bail!("no server with id {id:?} (see `cluster status`)");
            }
            eprintln!("forgot server {id}");
        }
    }
    Ok(())
}

async fn dns(config: ServerConfig, cmd: DnsCommand) -> Result<()> {
    let zone = config.zone().to_string();
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    if config.dns.is_none() {
        eprintln!("note: this config has no [dns] section; servers with one serve the stored records");
    }
    match cmd {
        DnsCommand::Add { name, kind, value, ttl } => {
            let name = DnsConfig::absolute(&name, &zone);
            match DnsConfig::check_record(&zone, &name, kind, &value) {
                Err(RecordField::Name) => bail!("name {name:?} is not a name in the zone {zone}"),
                Err(RecordField::Value) => bail!("value {value:?} is not a valid {kind} value"),
                Ok(()) => {}
            }
            if let Some(label) = DnsConfig::label_under(&name, &zone) {
                if store.get_node(&label).await?.is_some() {
                    bail!("{name} is a name of node {label:?}: its names are its own");
                }
            }
            store
                .add_dns_record(&StaticRecord { name: name.clone(), kind, value: value.clone(), ttl_secs: ttl })
                .await?;
            eprintln!("added {name} {ttl} {kind} {value}");
        }
        DnsCommand::Remove { name, kind, value } => {
            let name = DnsConfig::absolute(&name, &zone);
            let n = store.remove_dns_records(&name, kind, value.as_deref()).await?;
            if n == 0 {
                bail!("no such record at {name}");
            }
            eprintln!("removed {n} record(s) at {name}");
        }
        DnsCommand::List => {
            for r in store.list_dns_records().await? {
                println!("{} {} {} {}", r.name, r.ttl_secs, r.kind, r.value);
            }
        }
    }
    Ok(())
}

async fn store_copy(config: ServerConfig, target: StoreConfig) -> Result<()> {
    let source = edge_server::store::open(&config.store, &config.data_dir).await?;
    let to = edge_server::store::open(&target, &config.data_dir).await?;
    if source.describe() == to.describe() {
        bail!("source and target are the same store ({})", source.describe());
    }
    eprintln!("reading {} ...", source.describe());
    let snapshot = source.export().await?;
    let expected = edge_server::store::Counts::of(&snapshot);
    eprintln!("read {expected} (revision {})", snapshot.revision);
    eprintln!("writing {} in one transaction ...", to.describe());
    to.import(&snapshot).await?;
    let found = to.counts().await?;
    if found != expected {
        bail!("verification failed: {} holds {found:?} after the copy, expected {expected:?}", to.describe());
    }
    eprintln!("verified: {} holds the same counts; point [store] url at it and restart the server", to.describe());
    Ok(())
}

fn run(config: ServerConfig) -> Result<()> {
    edge_net::logging::init(config.log_format);
    edge_net::raise_fd_limit();
    let runtime = tokio::runtime::Runtime::new().context("starting tokio runtime")?;
    runtime.block_on(async {
        let server = Server::bind(config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_handler(shutdown.clone()));
        server.run(shutdown).await?;
        Ok(())
    })
}

/// Signals only cancel; the server drains by itself.
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

async fn node(config: ServerConfig, config_path: &std::path::Path, cmd: NodeCommand) -> Result<()> {
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    match cmd {
        NodeCommand::Add { name } => {
            edge_proto::names::validate_node_name(&name).map_err(anyhow::Error::msg)?;
            if let Some(dns) = &config.dns {
                if let Some(taken) = dns.reserved_labels(config.zone()).into_iter().find(|l| *l == name) {
                    bail!(
                        "node name {taken:?} is taken by a DNS name of the operator (dns.records or dns.nameservers)"
                    );
                }
            }
            let zone = config.zone();
            let stored = store.list_dns_records().await?;
            if let Some(r) = stored.iter().find(|r| DnsConfig::label_under(&r.name, zone).as_deref() == Some(&name)) {
                bail!("node name {name:?} is taken by the DNS record {} {} (edge-server dns list)", r.name, r.kind);
            }
            let hostnames = edge_proto::names::node_hostnames(&name, config.zone());
            let token = edge_proto::join::make_token(&name, &rand::random());
            let ticket = join_ticket(&config, config_path, token.clone())?;
            store.add_node(&name, &hostnames, &token_hash(&token)).await?;
            eprintln!("created node {name} owning {}", hostnames.join(", "));
            eprintln!("join string for its agent (shown once; keep it secret):");
            println!("{ticket}");
        }
        NodeCommand::RotateToken { name } => {
            let token = edge_proto::join::make_token(&name, &rand::random());
            let ticket = join_ticket(&config, config_path, token.clone())?;
            if !store.set_token_hash(&name, &token_hash(&token)).await? {
                bail!("no node named {name:?}");
            }
            eprintln!("new token for node {name}; the old one no longer works:");
            println!("{ticket}");
        }
        NodeCommand::Remove { name } => {
            if !store.remove_node(&name).await? {
                bail!("no node named {name:?}");
            }
            eprintln!("removed node {name}");
        }
        NodeCommand::Http { name, mode } => {
            if !store.set_http_mode(&name, mode).await? {
                bail!("no node named {name:?}");
            }
            eprintln!("plain HTTP for node {name}: {mode}");
        }
        NodeCommand::Show { name } => {
            let Some(node) = store.get_node(&name).await? else {
                bail!("no node named {name:?}");
            };
            let h = store.mode_history(&name, 10).await?;
            let t = edge_certs::format_unix;
            println!("node:      {}", node.name);
            println!("hostnames: {}", node.hostnames.join(", "));
            println!("mode:      {} (since {})", node.mode, h.since.map_or("-".into(), t));
            println!("endpoint:  {}", node.endpoint.as_deref().unwrap_or("none declared"));
            println!("http:      {}", node.http_mode);
            println!("recent probes (newest first):");
            for s in &h.samples {
                println!("  {}  {:<22} {:<4} {}", t(s.at), s.endpoint, if s.ok { "ok" } else { "FAIL" }, s.detail);
            }
            println!("mode transitions (newest first):");
            for c in &h.transitions {
                println!("  {}  {} -> {}: {}", t(c.at), c.from, c.to, c.reason);
            }
        }
        NodeCommand::List { json } => {
            let nodes = store.list_nodes().await?;
            if json {
                let mut rows = Vec::with_capacity(nodes.len());
                for n in &nodes {
                    let history = store.mode_history(&n.name, 5).await.unwrap_or_default();
                    rows.push(NodeListing {
                        name: &n.name,
                        hostnames: &n.hostnames,
                        created_at: n.created_at,
                        status: &n.status,
                        mode: n.mode,
                        endpoint: n.endpoint.as_deref(),
                        http_mode: n.http_mode,
                        last_transition: history.transitions.first().cloned(),
                        samples: history.samples,
                    });
                }
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<20} {:<8} {:<22} {:<10} {:<22} {:>6}  {:<20}  HOSTNAMES",
                    "NAME", "MODE", "ENDPOINT", "CONNECTED", "LAST HEARTBEAT", "CONNS", "CERT EXPIRES"
                );
                let now = edge_server::unix_now();
                for n in &nodes {
                    let hb =
                        n.status.last_heartbeat.map_or("never".to_string(), |t| format!("{}s ago", (now - t).max(0)));
                    let connected = if n.status.connected { "yes" } else { "no" };
                    let expiry = n.status.cert_not_after.map_or("unknown".to_string(), edge_certs::format_unix);
                    println!(
                        "{:<20} {:<8} {:<22} {:<10} {:<22} {:>6}  {:<20}  {}",
                        n.name,
                        n.mode,
                        n.endpoint.as_deref().unwrap_or("-"),
                        connected,
                        hb,
                        n.status.open_connections,
                        expiry,
                        n.hostnames.join(" ")
                    );
                }
            }
        }
    }
    Ok(())
}

/// The join string for `token`: public addresses from the config, else
/// those a running server recorded, else the listen addresses.
fn join_ticket(config: &ServerConfig, config_path: &std::path::Path, token: String) -> Result<JoinTicket> {
    let running: Option<BoundAddrs> =
        std::fs::read(listening_file(&config.data_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let usable = |a: std::net::SocketAddr| (!a.ip().is_unspecified() && a.port() != 0).then(|| a.to_string());
    let server = config
        .public
        .quic
        .clone()
        .or_else(|| running.and_then(|r| usable(r.quic)))
        .or_else(|| usable(config.listen.quic));
    let Some(server) = server else {
        bail!(
            "cannot tell agents where to connect: set public.quic in {} (listen.quic = {} is not an address agents can dial)",
            config_path.display(),
            config.listen.quic
        );
    };
    let api = config
        .public
        .api
        .clone()
        .or_else(|| running.and_then(|r| usable(r.api)))
        .or_else(|| usable(config.listen.api))
        .unwrap_or_else(|| server.clone());
    let identity = edge_server::identity::load_or_create(config)?;
    Ok(JoinTicket { token, server, fingerprint: Some(identity.fingerprint), api })
}

/// One node in `node list --json`.
#[derive(serde::Serialize)]
struct NodeListing<'a> {
    name: &'a str,
    hostnames: &'a [String],
    created_at: i64,
    #[serde(flatten)]
    status: &'a edge_server::store::NodeStatus,
    mode: edge_server::store::Mode,
    endpoint: Option<&'a str>,
    http_mode: HttpMode,
    last_transition: Option<edge_server::store::ModeChange>,
    samples: Vec<edge_server::store::ProbeSample>,
}
