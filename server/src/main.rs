//! `edge-server` command line: run the server, manage nodes.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use edge_server::admin::ops::{Actor, JoinInfo, OpError, Ops};
use edge_server::config::{DnsConfig, ServerConfig};
use edge_server::store::{HttpMode, StaticKind, Store, StoreConfig, StoreError, StoreTls};
use edge_server::{listening_file, BoundAddrs, Server};
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
    /// Make the running server re-read its config file (sends SIGHUP to
    /// the pid in <data_dir>/edge-server.pid). Limits, modes, [dns] records,
    /// [acme] and log_filter apply to new work without dropping connections
    /// or tunnels; other changes are logged as needing a restart. The file
    /// is checked first: an invalid one is refused here and by the server.
    Reload,
    /// Replace the running server by a new process without refusing a
    /// connection: after installing a new binary, run this. The running
    /// server starts the binary (by default the path it was started from)
    /// with its own arguments and hands it every listening socket; agents
    /// connect to the new process while their open streams finish on the
    /// old one; then the old process stops accepting, drains its open
    /// connections (limits.drain_timeout_secs at most) and exits. Prints
    /// each step and, on stdout, the new process's pid. If the new process
    /// fails to start, the running one keeps serving and this says why.
    /// Under systemd the new process becomes the unit's main process
    /// (Type=notify, NotifyAccess=all in the shipped unit).
    Upgrade {
        /// Start this executable instead of the one the server runs from.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
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
    /// Raw TCP services (SSH, databases...): this server listens on a port
    /// of its own and splices each connection to a node, whose agent
    /// connects a local target it declares under `[[services]]`.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Customers' own domains on a node (www.customer.com): claimed here,
    /// routed to the node once the customer publishes the TXT record this
    /// prints (checked with [domains] resolver, then re-checked on
    /// schedule). The agent gets a certificate for it by TLS-ALPN-01.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Access policies: which client addresses may reach a node, one of
    /// its hostnames, or a TCP service. Rules are evaluated in order, the
    /// first match decides, else the default; a hostname's or service's
    /// policy takes precedence over the node's. Denied TLS clients get the
    /// alert access_denied, plain HTTP 403, TCP services are closed.
    #[command(subcommand)]
    Access(AccessCommand),
    /// Operators who log in to the dashboard (listen.admin).
    #[command(subcommand)]
    User(UserCommand),
    /// API tokens for automation (`Authorization: Bearer ...` on /api/v1).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the audit log: every change made through the API, the
    /// dashboard or this CLI, newest first.
    Audit {
        /// Only this actor (`user:alice`, `token:ci`, `cli:root`).
        #[arg(long)]
        actor: Option<String>,
        /// Only this action (`node.create`, `node.remove`, `token.add`, ...).
        #[arg(long)]
        action: Option<String>,
        /// Only this target (a node, record, user or token name).
        #[arg(long)]
        target: Option<String>,
        /// How many entries.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: u16,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user. The password is read from a prompt, or from the first
    /// line of --password-file (`-` for standard input); never from an
    /// argument, which other users of the machine could see.
    Add {
        /// Login name: lowercase letters, digits, '.', '_', '-'.
        name: String,
        /// File whose first line is the password.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Remove a user; their sessions end at once.
    Remove {
        /// Login name.
        name: String,
    },
    /// List users.
    List,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token; prints it once on stdout (only its hash is kept).
    Add {
        /// Unique name, e.g. `ci`.
        #[arg(long)]
        name: String,
        /// `read` (GET only) or `admin` (everything).
        #[arg(long, value_parser = parse_scope)]
        scope: edge_proto::admin::TokenScope,
    },
    /// Revoke a token. (A server's `admin.token@<id>` comes back from its
    /// config or <data_dir>/admin.token at its next start: change it there.)
    Remove {
        /// Token name.
        name: String,
    },
    /// List tokens with their scope and last use.
    List,
}

fn parse_scope(s: &str) -> Result<edge_proto::admin::TokenScope, String> {
    s.parse()
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

/// Which policy a command is about.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct ScopeArgs {
    /// A node: every connection to its names and services.
    #[arg(long)]
    node: Option<String>,
    /// One hostname of a node, exactly as clients send it.
    #[arg(long)]
    host: Option<String>,
    /// One TCP service.
    #[arg(long)]
    service: Option<String>,
}

impl ScopeArgs {
    fn scope(self) -> edge_proto::access::Scope {
        use edge_proto::access::Scope;
        match (self.node, self.host, self.service) {
            (Some(n), _, _) => Scope::Node(n),
            (_, Some(h), _) => Scope::Host(h.to_ascii_lowercase()),
            (_, _, Some(s)) => Scope::Service(s),
            _ => unreachable!("clap requires one of --node, --host, --service"),
        }
    }
}

#[derive(Debug, Subcommand)]
enum AccessCommand {
    /// Set (replace) a policy, e.g.
    /// `access set --host db.web1.example.com --rule allow=10.0.0.0/8 --rule deny=0.0.0.0/0 --default deny`.
    Set {
        #[command(flatten)]
        scope: ScopeArgs,
        /// `allow=CIDR` or `deny=CIDR`, in the order they are evaluated
        /// (IPv4 or IPv6; a bare address is one host).
        #[arg(long = "rule", value_name = "ACTION=CIDR")]
        rules: Vec<String>,
        /// What happens when no rule matches: allow or deny.
        #[arg(long, default_value = "allow")]
        default: edge_proto::access::Action,
    },
    /// Remove a policy (the node's, or nothing, then applies).
    Clear {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List the policies.
    List,
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Add a service, e.g.
    /// `service add ssh-web1 --node web1 --listen :2222 --target ssh`
    /// (the agent of web1 declares `[[services]] name = "ssh"
    /// target = "127.0.0.1:22"`). Every server on the store listens.
    Add {
        /// The service's name: lowercase letters, digits, '-'.
        name: String,
        /// The node that serves it.
        #[arg(long)]
        node: String,
        /// Where the servers listen: `ip:port`, or `:port` for every IPv4
        /// address.
        #[arg(long)]
        listen: String,
        /// The name of the agent's `[[services]]` entry (never an address:
        /// the agent connects only targets it declares).
        #[arg(long)]
        target: String,
    },
    /// Remove a service (its listeners close).
    Remove {
        /// The service's name.
        name: String,
    },
    /// List the services.
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DomainCommand {
    /// Claim a domain for a node, e.g. `domain add www.customer.com --node
    /// web1`, and print the records the customer publishes. No other node
    /// can claim it while this one holds it.
    Add {
        /// The domain (not inside this cluster's zone, no wildcard).
        name: String,
        /// The node that is to serve it.
        #[arg(long)]
        node: String,
    },
    /// Check a domain's TXT record now and show the result (servers check
    /// on their own too: every [domains] check_interval_secs until it is
    /// verified, then every recheck_interval_secs).
    Verify {
        /// The domain.
        name: String,
    },
    /// Remove a domain: no server routes it any more.
    Remove {
        /// The domain.
        name: String,
    },
    /// List the domains with their state (pending, verified, lapsing,
    /// lapsed).
    List {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
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
                    || c.downcast_ref::<OpError>().is_some_and(|o| matches!(o, OpError::Store(e) if e.is_unavailable()))
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
        Command::Run => run(config, cli.config.clone()),
        Command::Reload => reload(&config),
        Command::Upgrade { binary } => cli_runtime()?.block_on(upgrade(&config, binary)),
        Command::CheckConfig => {
            println!("{config:#?}");
            Ok(())
        }
        Command::Node(cmd) => cli_runtime()?.block_on(node(config, &cli.config, cmd)),
        Command::Dns(cmd) => cli_runtime()?.block_on(dns(config, cmd)),
        Command::Service(cmd) => cli_runtime()?.block_on(service(config, cmd)),
        Command::Domain(cmd) => cli_runtime()?.block_on(domain(config, cmd)),
        Command::Access(cmd) => cli_runtime()?.block_on(access(config, cmd)),
        Command::Cluster(cmd) => cli_runtime()?.block_on(cluster(config, cmd)),
        Command::User(cmd) => cli_runtime()?.block_on(user(config, cmd)),
        Command::Token(cmd) => cli_runtime()?.block_on(token(config, cmd)),
        Command::Audit { actor, action, target, limit, json } => {
            let query = edge_server::store::AuditQuery {
                actor,
                action,
                target,
                since: None,
                before_id: None,
                limit: usize::from(limit),
            };
            cli_runtime()?.block_on(audit(config, query, json))
        }
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
            let ops = ops_for(&config, store.clone(), None);
            ops.remove_server(&Actor::cli(), &id).await.map_err(|e| match e {
                OpError::NotFound(m) => anyhow::anyhow!("{m} (see `cluster status`)"),
                other => other.into(),
            })?;
            eprintln!("forgot server {id}");
        }
    }
    Ok(())
}

async fn access(config: ServerConfig, cmd: AccessCommand) -> Result<()> {
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    match cmd {
        AccessCommand::Set { scope, rules, default } => {
            let scope = scope.scope();
            let mut parsed = Vec::with_capacity(rules.len());
            for (i, text) in rules.iter().enumerate() {
                let (action, cidr) = text
                    .split_once('=')
                    .with_context(|| format!("--rule {text:?} (rule {}): expected ACTION=CIDR", i + 1))?;
                let action = action.parse().with_context(|| format!("--rule {text:?} (rule {})", i + 1))?;
                let cidr = cidr.parse().with_context(|| format!("--rule {text:?} (rule {})", i + 1))?;
                parsed.push(edge_proto::access::Rule { action, cidr });
            }
            let policy = edge_proto::access::Policy::new(parsed, default).context("--rule")?;
            ops_for(&config, store.clone(), None).set_access(&Actor::cli(), &scope, policy).await?;
            eprintln!("access policy set for {}", scope.key());
        }
        AccessCommand::Clear { scope } => {
            let scope = scope.scope();
            ops_for(&config, store.clone(), None).clear_access(&Actor::cli(), &scope).await?;
            eprintln!("access policy cleared for {}", scope.key());
        }
        AccessCommand::List => {
            for r in store.list_access().await? {
                let rules: Vec<String> = r.policy.rules.iter().map(|x| format!("{}={}", x.action, x.cidr)).collect();
                println!("{:<40} node {:<16} {} default={}", r.scope, r.node, rules.join(" "), r.policy.default);
            }
        }
    }
    Ok(())
}

async fn service(config: ServerConfig, cmd: ServiceCommand) -> Result<()> {
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    match cmd {
        ServiceCommand::Add { name, node, listen, target } => {
            let s = ops_for(&config, store.clone(), None)
                .add_service(&Actor::cli(), &name, &node, &listen, &target)
                .await?;
            eprintln!("added service {}: {} -> node {}, target {}", s.name, s.listen, s.node, s.target);
        }
        ServiceCommand::Remove { name } => {
            ops_for(&config, store.clone(), None).remove_service(&Actor::cli(), &name).await?;
            eprintln!("removed service {name}");
        }
        ServiceCommand::List { json } => {
            let services = store.list_services().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&services)?);
            } else {
                println!("{:<24} {:<16} {:<24} TARGET", "NAME", "NODE", "LISTEN");
                for s in &services {
                    println!("{:<24} {:<16} {:<24} {}", s.name, s.node, s.listen, s.target);
                }
            }
        }
    }
    Ok(())
}

async fn domain(config: ServerConfig, cmd: DomainCommand) -> Result<()> {
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    let zone = config.zone().to_string();
    match cmd {
        DomainCommand::Add { name, node } => {
            let d = ops_for(&config, store.clone(), None).add_domain(&Actor::cli(), &name, &node).await?;
            let view = edge_server::domains::view(&d, &zone);
            eprintln!("claimed {} for node {}; it is routed once its ownership is verified.", view.name, view.node);
            eprintln!("Publish in the customer's DNS:");
            println!("{} TXT \"{}\"", view.verify_name, view.verify_value);
            println!("{} CNAME {}", view.name, view.cname_target);
            eprintln!(
                "then run `edge-server domain verify {}` (servers also check every {} s).",
                view.name, config.domains.check_interval_secs
            );
        }
        DomainCommand::Verify { name } => {
            let name = edge_proto::domains::lookup_form(&name);
            let record = store
                .list_domains()
                .await?
                .into_iter()
                .find(|d| d.name == name)
                .ok_or_else(|| anyhow::anyhow!("no domain named {name:?} (see `domain list`)"))?;
            let Some(state) = edge_server::domains::check_and_record(store.as_ref(), &config.domains, &record).await?
            else {
                anyhow::bail!("{name} was removed or reclaimed during the check");
            };
            let view = edge_server::domains::view(&edge_server::store::DomainRecord { state, ..record }, &zone);
            match view.state.last_error.as_deref() {
                None => println!("{}: {} (TXT {} found)", view.name, view.status, view.verify_name),
                Some(e) => println!("{}: {} ({}: {e})", view.name, view.status, view.verify_name),
            }
            if !view.state.routed {
                std::process::exit(1);
            }
        }
        DomainCommand::Remove { name } => {
            ops_for(&config, store.clone(), None).remove_domain(&Actor::cli(), &name).await?;
            eprintln!("removed domain {name}");
        }
        DomainCommand::List { json } => {
            let views: Vec<_> =
                store.list_domains().await?.iter().map(|d| edge_server::domains::view(d, &zone)).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                println!("{:<32} {:<16} {:<9} {:<20} LAST ERROR", "DOMAIN", "NODE", "STATUS", "VERIFIED");
                for v in &views {
                    let verified = v.state.verified_at.map(edge_certs::format_unix).unwrap_or_else(|| "-".into());
                    let error = v.state.last_error.as_deref().unwrap_or("");
                    println!("{:<32} {:<16} {:<9} {:<20} {error}", v.name, v.node, v.status.as_str(), verified);
                }
            }
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
            let ops = ops_for(&config, store.clone(), None);
            let r = ops.add_dns_record(&Actor::cli(), &name, kind, &value, ttl).await?;
            eprintln!("added {} {} {} {}", r.name, r.ttl_secs, r.kind, r.value);
        }
        DnsCommand::Remove { name, kind, value } => {
            let ops = ops_for(&config, store.clone(), None);
            let n = ops.remove_dns_records(&Actor::cli(), &name, kind, value.as_deref()).await?;
            eprintln!("removed {n} record(s) at {}", DnsConfig::absolute(&name, &zone));
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

/// Where a running server keeps its pid, for `reload`.
fn pid_file(config: &ServerConfig) -> PathBuf {
    config.data_dir.join("edge-server.pid")
}

fn run(config: ServerConfig, config_path: PathBuf) -> Result<()> {
    edge_net::logging::init_with(config.log_format, config.log_filter.as_deref());
    edge_net::raise_fd_limit();
    let runtime = config.runtime.build().context("starting tokio runtime")?;
    let pid_path = pid_file(&config);
    // Resolved now: after a package upgrade replaced the file, the running
    // executable's own path names the deleted one. An absolute argv[0] (as
    // systemd gives) is kept as is, so that a symlink to a versioned binary
    // leads to the binary it points to then.
    let argv0 = std::env::args_os().next().map(PathBuf::from).filter(|p| p.is_absolute());
    let successor = argv0
        .or_else(|| std::env::current_exe().ok())
        .map(|program| edge_server::upgrade::Successor { program, args: std::env::args_os().skip(1).collect() });
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // First: SIGHUP's default action ends the process, and a reload
        // may come while the server is still starting.
        let signals = (
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::hangup()).context("SIGHUP handler")?,
        );
        let takeover =
            edge_server::upgrade::Takeover::from_env().await.context("taking over from the running server")?;
        if let Some(t) = &takeover {
            tracing::info!(predecessor = t.predecessor_pid(), epoch = t.epoch(), "taking over from the running server");
        }
        let mut server = Server::bind_with(config, takeover).await?;
        match successor {
            Some(successor) => server = server.with_successor(successor),
            None => tracing::warn!("cannot locate this executable; `edge-server upgrade` is unavailable"),
        }
        let reloader = std::sync::Arc::new(server.reloader());
        let pid = std::process::id().to_string();
        std::fs::write(&pid_path, format!("{pid}\n")).with_context(|| format!("writing {}", pid_path.display()))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_handler(shutdown.clone(), config_path, reloader, signals));
        let result = server.run(shutdown).await;
        // After an upgrade the file names the successor.
        if std::fs::read_to_string(&pid_path).is_ok_and(|text| text.trim() == pid) {
            let _ = std::fs::remove_file(&pid_path);
        }
        result?;
        Ok(())
    })
}

/// `edge-server upgrade`: asks the running server to start its successor.
async fn upgrade(config: &ServerConfig, binary: Option<PathBuf>) -> Result<()> {
    let path = edge_server::upgrade::control_socket(&config.data_dir);
    let binary = match binary {
        Some(b) => Some(
            std::fs::canonicalize(&b)
                .with_context(|| format!("--binary {}", b.display()))?
                .to_string_lossy()
                .into_owned(),
        ),
        None => None,
    };
    let pid = edge_server::upgrade::control::request_upgrade(&path, binary, |event| {
        if let edge_proto::handover::ControlEvent::Progress { message } = event {
            eprintln!("{message}");
        }
    })
    .await
    .with_context(|| format!("upgrading the server on {} (is it running with this config?)", path.display()))?;
    eprintln!("upgraded: edge-server pid {pid} serves; the old process exits once its connections drained");
    println!("{pid}");
    Ok(())
}

/// SIGINT and SIGTERM cancel (the server drains by itself); SIGHUP
/// re-reads the config file, keeping the running one if the new one does
/// not validate.
async fn signal_handler(
    shutdown: CancellationToken,
    config_path: PathBuf,
    reloader: std::sync::Arc<edge_server::reload::Reloader>,
    (mut term, mut hup): (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
) {
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT received"); break; }
            _ = term.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = hup.recv() => {
                tracing::info!(config = %config_path.display(), "SIGHUP received: reloading the config");
                match ServerConfig::load(&config_path) {
                    Ok(new) => {
                        reloader.apply(new);
                    }
                    Err(e) => {
                        // One log line: TOML errors span several.
                        let error = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
                        tracing::error!(%error,
                            "reload refused: the config file does not validate; the running config stays in force");
                    }
                }
            }
        }
    }
    shutdown.cancel();
}

/// `edge-server reload`: signals the running server.
fn reload(config: &ServerConfig) -> Result<()> {
    let path = pid_file(config);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is the server running with this config?)", path.display()))?;
    let pid: u32 = text.trim().parse().with_context(|| format!("{} holds no pid", path.display()))?;
    // A stale file may name a pid that now belongs to another program.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "edge-server" {
        bail!("no edge-server runs as pid {pid} ({} is stale)", path.display());
    }
    let status =
        std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().context("running kill")?;
    if !status.success() {
        bail!("kill -HUP {pid} failed");
    }
    eprintln!("asked edge-server (pid {pid}) to reload its config; its log says what was applied");
    Ok(())
}

async fn node(config: ServerConfig, config_path: &std::path::Path, cmd: NodeCommand) -> Result<()> {
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    match cmd {
        NodeCommand::Add { name } => {
            let ops = ops_for(&config, store.clone(), Some(config_path));
            let created = ops.create_node(&Actor::cli(), &name).await?;
            eprintln!("created node {name} owning {}", created.hostnames.join(", "));
            eprintln!("join string for its agent (shown once; keep it secret):");
            println!("{}", created.join);
        }
        NodeCommand::RotateToken { name } => {
            let ops = ops_for(&config, store.clone(), Some(config_path));
            let rotated = ops.rotate_token(&Actor::cli(), &name).await?;
            eprintln!("new token for node {name}; the old one no longer works:");
            println!("{}", rotated.join);
        }
        NodeCommand::Remove { name } => {
            ops_for(&config, store.clone(), None).remove_node(&Actor::cli(), &name).await?;
            eprintln!("removed node {name}");
        }
        NodeCommand::Http { name, mode } => {
            ops_for(&config, store.clone(), None).set_http_mode(&Actor::cli(), &name, mode).await?;
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
            for r in store.list_access().await?.into_iter().filter(|r| r.node == node.name) {
                let rules: Vec<String> = r.policy.rules.iter().map(|x| format!("{}={}", x.action, x.cidr)).collect();
                println!("access:    {} {} default={}", r.scope, rules.join(" "), r.policy.default);
            }
            let domains: Vec<_> = store.list_domains().await?.into_iter().filter(|d| d.node == node.name).collect();
            if !domains.is_empty() {
                println!("custom domains:");
                for d in &domains {
                    let error = d.state.last_error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
                    println!("  {:<32} {}{error}", d.name, d.state.status());
                }
            }
            let services: Vec<_> = store.list_services().await?.into_iter().filter(|s| s.node == node.name).collect();
            if !services.is_empty() {
                println!("tcp services:");
                for s in &services {
                    println!("  {:<24} {:<24} -> target {}", s.name, s.listen, s.target);
                }
            }
            match &node.status.routes {
                None => println!("routes:    not reported (the agent predates routes, or never connected)"),
                Some(routes) => {
                    println!("routes (as the agent last reported):");
                    for r in routes {
                        let ups: Vec<String> = r
                            .upstreams
                            .iter()
                            .map(|u| format!("{} {} ({})", u.addr, if u.up { "up" } else { "DOWN" }, u.check))
                            .collect();
                        println!("  {:<32} {:<11} {}", r.host, r.mode.to_string(), ups.join(", "));
                    }
                }
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

/// The operations for the CLI. Join strings use public addresses from the
/// config, else those a running server recorded, else the listen
/// addresses; `config_path` names the file in the error when none works
/// (only commands that print join strings pass it).
fn ops_for(config: &ServerConfig, store: std::sync::Arc<dyn Store>, config_path: Option<&std::path::Path>) -> Ops {
    let join = match config_path {
        None => Err("this command makes no join strings".to_string()),
        Some(path) => {
            let running: Option<BoundAddrs> =
                std::fs::read(listening_file(&config.data_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok());
            edge_server::identity::load_or_create(config)
                .map_err(|e| e.to_string())
                .and_then(|id| JoinInfo::new(config, running, id.fingerprint).map_err(|e| e.to_string()))
                .map_err(|e| format!("{e} ({})", path.display()))
        }
    };
    let reserved = edge_server::admin::ops::ReservedLabels::from_config(config);
    Ops { store, config: std::sync::Arc::new(config.clone()), reserved, join }
}

async fn user(config: ServerConfig, cmd: UserCommand) -> Result<()> {
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    let ops = ops_for(&config, store.clone(), None);
    match cmd {
        UserCommand::Add { name, password_file } => {
            let password = match password_file {
                Some(path) if path.as_os_str() == "-" => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).context("reading the password from standard input")?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
                Some(path) => {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    text.lines().next().unwrap_or_default().to_string()
                }
                None => {
                    use std::io::IsTerminal;
                    if !std::io::stdin().is_terminal() {
                        bail!("no terminal to prompt for the password: use --password-file FILE (or - for stdin)");
                    }
                    let first = rpassword::prompt_password(format!("password for {name}: "))
                        .context("reading the password (no terminal? use --password-file)")?;
                    let again = rpassword::prompt_password("again: ").context("reading the password")?;
                    if first != again {
                        bail!("the passwords differ");
                    }
                    first
                }
            };
            ops.add_user(&Actor::cli(), &name, &password).await?;
            eprintln!("added user {name}");
        }
        UserCommand::Remove { name } => {
            ops.remove_user(&Actor::cli(), &name).await?;
            eprintln!("removed user {name}; their sessions have ended");
        }
        UserCommand::List => {
            println!("{:<24} ADDED", "NAME");
            for u in store.list_users().await? {
                println!("{:<24} {}", u.name, edge_certs::format_unix(u.created_at));
            }
        }
    }
    Ok(())
}

async fn token(config: ServerConfig, cmd: TokenCommand) -> Result<()> {
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    let ops = ops_for(&config, store.clone(), None);
    match cmd {
        TokenCommand::Add { name, scope } => {
            let made = ops.add_token(&Actor::cli(), &name, scope).await?;
            eprintln!("token {name} ({scope}); shown once, keep it secret:");
            println!("{}", made.token);
        }
        TokenCommand::Remove { name } => {
            ops.remove_token(&Actor::cli(), &name).await?;
            eprintln!("revoked token {name}");
        }
        TokenCommand::List => {
            println!("{:<24} {:<6} {:<20} {:<20} BY", "NAME", "SCOPE", "MADE", "LAST USED");
            for t in store.list_api_tokens().await? {
                println!(
                    "{:<24} {:<6} {:<20} {:<20} {}",
                    t.name,
                    t.scope,
                    edge_certs::format_unix(t.created_at),
                    t.last_used.map_or("never".into(), edge_certs::format_unix),
                    t.created_by
                );
            }
        }
    }
    Ok(())
}

async fn audit(config: ServerConfig, query: edge_server::store::AuditQuery, json: bool) -> Result<()> {
    if let Some(a) = &query.action {
        if edge_proto::admin::AuditAction::parse(a).is_none() {
            let all: Vec<&str> = edge_proto::admin::AuditAction::ALL.iter().map(|a| a.as_str()).collect();
            bail!("--action {a:?} is not an action; one of: {}", all.join(", "));
        }
    }
    let store = edge_server::store::open(&config.store, &config.data_dir).await?;
    let entries = store.query_audit(&query).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!("{:<20} {:<20} {:<16} {:<18} {:<28} SUMMARY", "WHEN", "WHO", "FROM", "ACTION", "TARGET");
    for e in &entries {
        // Escaped: targets and summaries hold names and values operators
        // typed, which must not drive the terminal.
        let u = edge_net::logging::Untrusted;
        println!(
            "{:<20} {:<20} {:<16} {:<18} {:<28} {}",
            edge_certs::format_unix(e.at),
            u(&e.actor).to_string(),
            u(&e.source).to_string(),
            u(&e.action).to_string(),
            u(&e.target).to_string(),
            u(&e.summary)
        );
    }
    Ok(())
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
