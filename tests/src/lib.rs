//! Test harness: starts the real `edge-server` and `edge-agent` binaries in
//! temporary directories on loopback, plus small in-process upstreams and
//! TLS clients. Used by the end-to-end tests, the demo and the benchmark.
//!
//! Every listener binds port 0; processes report their ports through files
//! (`listening.json`, `status.addr`). Every wait is bounded.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod clients;
pub mod dns;
pub mod faults;
pub mod h3client;
pub mod load;
pub mod pebble;
pub mod postgres;
pub mod upstreams;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Path of a workspace binary, next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} not built (run cargo build --workspace first)", path.display());
    path
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its stderr log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its stderr in `log` (stdin and stdout closed).
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Result<Self> {
        let file = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        // A caller that set or removed RUST_LOG itself keeps its choice.
        if !cmd.get_envs().any(|(key, _)| key == "RUST_LOG") {
            cmd.env("RUST_LOG", std::env::var("EDGE_TEST_LOG").unwrap_or_else(|_| "info".into()));
        }
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self { child, log })
    }

    /// Sends a signal (`TERM`, `KILL`, `INT`) with the `kill` command.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }

    /// Waits for exit up to `limit`; `None` if still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_for("process exit", limit, || self.child.try_wait().ok().flatten()).ok()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Addresses a running server bound.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct ServerAddrs {
    /// TLS listener.
    pub tls: SocketAddr,
    /// QUIC listener.
    pub quic: SocketAddr,
    /// Signal API.
    pub api: SocketAddr,
    /// DNS, when the config has `[dns]`.
    #[serde(default)]
    pub dns: Option<SocketAddr>,
    /// Plain HTTP listener.
    #[serde(default)]
    pub http: Option<SocketAddr>,
    /// Metrics listener (no token).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// The admin dashboard and API.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// The UDP listener for QUIC clients (HTTP/3).
    #[serde(default)]
    pub quic_clients: Option<SocketAddr>,
}

/// A running `edge-server`.
#[derive(Debug)]
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// Its directory (config, data).
    pub dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// Bound addresses.
    pub addrs: ServerAddrs,
}

/// Zone used by all tests.
pub const ZONE: &str = "edge.test";

impl Server {
    /// Starts a server in `dir` with ports chosen by the kernel. `extra` is
    /// appended to the config (top-level keys before any table).
    pub fn start(dir: &Path, extra: &str) -> Result<Self> {
        Self::start_on(dir, extra, None)
    }

    /// Starts a server on the given addresses (to restart on the same ports).
    pub fn start_on(dir: &Path, extra: &str, addrs: Option<ServerAddrs>) -> Result<Self> {
        Self::start_with_log(dir, extra, addrs, None)
    }

    /// Like [`Server::start_on`]; `rust_log` is the server's `RUST_LOG`,
    /// `Some("")` to leave it unset (the binary's default filter).
    pub fn start_with_log(dir: &Path, extra: &str, addrs: Option<ServerAddrs>, rust_log: Option<&str>) -> Result<Self> {
        Self::launch(dir, ZONE, extra, addrs, IpAddr::from([127, 0, 0, 1]), rust_log, &[])
    }

    /// Starts a server for another zone than [`ZONE`] (say, a customer's
    /// authoritative DNS), ports chosen by the kernel.
    pub fn start_zone(dir: &Path, zone: &str, extra: &str) -> Result<Self> {
        Self::launch(dir, zone, extra, None, IpAddr::from([127, 0, 0, 1]), None, &[])
    }

    /// Starts a server with extra environment variables (e.g.
    /// `NOTIFY_SOCKET`), ports chosen by the kernel.
    pub fn start_with_env(dir: &Path, extra: &str, env: &[(&str, &std::ffi::OsStr)]) -> Result<Self> {
        Self::launch(dir, ZONE, extra, None, IpAddr::from([127, 0, 0, 1]), None, env)
    }

    /// Starts a server whose listeners all bind `host` (e.g. `::1`), ports
    /// chosen by the kernel.
    pub fn start_at(dir: &Path, extra: &str, host: IpAddr) -> Result<Self> {
        Self::launch(dir, ZONE, extra, None, host, None, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        dir: &Path,
        zone: &str,
        extra: &str,
        addrs: Option<ServerAddrs>,
        host: IpAddr,
        rust_log: Option<&str>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let any = SocketAddr::new(host, 0).to_string();
        let (tls, quic, api) = match addrs {
            Some(a) => (a.tls.to_string(), a.quic.to_string(), a.api.to_string()),
            None => (any.clone(), any.clone(), any.clone()),
        };
        let http = addrs.and_then(|a| a.http).map_or(any.clone(), |h| h.to_string());
        let metrics = addrs.and_then(|a| a.metrics).map_or(any.clone(), |m| m.to_string());
        let quic_clients = addrs.and_then(|a| a.quic_clients).map_or(any.clone(), |m| m.to_string());
        let admin = addrs.and_then(|a| a.admin).map_or(any, |m| m.to_string());
        let config = dir.join("server.toml");
        // Tests load the server from one address and read metrics right
        // after acting: per-source and per-node limits and the metrics
        // cache are off unless a test sets them.
        let mut off = String::new();
        for key in ["per_source_rate", "per_source_max_open", "metrics_rate", "metrics_cache_ms", "node_signal_rate"] {
            if !extra.contains(key) {
                off.push_str(&format!("{key} = 0\n"));
            }
        }
        let extra = if extra.contains("[limits]\n") {
            extra.replacen("[limits]\n", &format!("[limits]\n{off}"), 1)
        } else {
            format!("{extra}\n[limits]\n{off}")
        };
        // Server and agents share one machine here: endpoints are loopback.
        let loopback = "allow_loopback_endpoints = true\n";
        let extra = if extra.contains("allow_loopback_endpoints") {
            extra
        } else if extra.contains("[modes]\n") {
            extra.replacen("[modes]\n", &format!("[modes]\n{loopback}"), 1)
        } else {
            format!("{extra}\n[modes]\n{loopback}")
        };
        let text = format!(
            "zone = \"{zone}\"\ndata_dir = \"data\"\n{extra}\n[listen]\ntls = \"{tls}\"\nquic = \"{quic}\"\napi = \"{api}\"\nhttp = \"{http}\"\nmetrics = \"{metrics}\"\nadmin = \"{admin}\"\nquic_clients = \"{quic_clients}\"\n"
        );
        std::fs::write(&config, text)?;
        let listening = dir.join("data/listening.json");
        let _ = std::fs::remove_file(&listening);
        let mut cmd = Command::new(bin("edge-server"));
        cmd.arg("--config").arg(&config).arg("run");
        cmd.envs(env.iter().copied());
        match rust_log {
            Some("") => {
                cmd.env_remove("RUST_LOG");
            }
            Some(filter) => {
                cmd.env("RUST_LOG", filter);
            }
            None => {}
        }
        let n = std::fs::read_dir(dir)?.count();
        let mut proc = Proc::spawn(cmd, dir.join(format!("server-{n}.log")))?;
        let addrs: ServerAddrs = wait_for("server listening.json", Duration::from_secs(20), || {
            if !proc.alive() {
                return Some(None);
            }
            let bytes = std::fs::read(&listening).ok()?;
            serde_json::from_slice(&bytes).ok().map(Some)
        })?
        .with_context(|| format!("edge-server exited at start:\n{}", proc.log_text()))?;
        Ok(Self { proc, dir: dir.to_path_buf(), config, addrs })
    }

    /// Runs `edge-server --config <config> <args>`; returns stdout, or the
    /// error with stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(bin("edge-server")).arg("--config").arg(&self.config).args(args).output()?;
        if !out.status.success() {
            bail!("edge-server {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `GET /` for `host` through the TLS listener, trusting `ca`; the body
    /// of a 200, an error otherwise.
    pub async fn fetch(&self, ca: &Path, host: &str) -> Result<String> {
        let config = clients::client_config(ca)?;
        let (status, body) = clients::https_get(self.addrs.tls, host, config, "/").await?;
        anyhow::ensure!(status == 200, "status {status}");
        Ok(body)
    }

    /// Runs `edge-server --config <config> <args>` and returns its output,
    /// whatever the exit code (for tests of failures).
    pub fn cli_output(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(bin("edge-server")).arg("--config").arg(&self.config).args(args).output()?)
    }

    /// `node add NAME` → join string.
    pub fn add_node(&self, name: &str) -> Result<String> {
        Ok(self.cli(&["node", "add", name])?.trim().to_string())
    }

    /// GET an API path with curl (`-k`: the identity is self-signed; agents
    /// pin it, tests only read).
    pub fn api_get(&self, path: &str, bearer: Option<&str>) -> Result<(u16, String)> {
        self.api_call("GET", path, bearer, None)
    }

    /// Any API request with curl; `body` is sent as JSON.
    pub fn api_call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        let url = format!("https://{}{path}", self.addrs.api);
        let mut cmd = Command::new("curl");
        cmd.args(["-sk", "--max-time", "60", "-X", method, "-w", "\n%{http_code}", &url]);
        if let Some(token) = bearer {
            cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
        }
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", body]);
        }
        let out = cmd.output().context("running curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.trim().parse().unwrap_or(0), body.to_string()))
    }

    /// `/metrics` text (the API serves it with the admin token).
    pub fn metrics(&self) -> Result<String> {
        let (code, body) = self.api_get("/metrics", Some(&self.admin_token()))?;
        if code != 200 {
            bail!("metrics answered {code}");
        }
        Ok(body)
    }

    /// The admin token the server generated.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("data/admin.token")).unwrap_or_default().trim().to_string()
    }
}

/// A running `edge-agent`.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its status endpoint.
    pub status: SocketAddr,
}

impl Agent {
    /// Starts an agent and waits until its tunnel is up (`/ready` is 200).
    pub fn start(dir: &Path, join: &str, upstream: SocketAddr, extra_args: &[&str]) -> Result<Self> {
        let agent = Self::spawn(dir, join, upstream, extra_args)?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts an agent without waiting for its tunnel.
    pub fn spawn(dir: &Path, join: &str, upstream: SocketAddr, extra_args: &[&str]) -> Result<Self> {
        Self::spawn_with_env(dir, join, upstream, extra_args, &[])
    }

    /// [`Agent::spawn`] with extra environment variables (e.g.
    /// `MALLOC_ARENA_MAX` for a benchmark).
    pub fn spawn_with_env(
        dir: &Path,
        join: &str,
        upstream: SocketAddr,
        extra_args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let status_file = dir.join("status.addr");
        let _ = std::fs::remove_file(&status_file);
        let mut cmd = Command::new(bin("edge-agent"));
        cmd.args(["run", "--join", join, "--upstream", &upstream.to_string(), "--status-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .args(extra_args)
            .envs(env.iter().copied());
        let n = std::fs::read_dir(dir)?.count();
        let mut proc = Proc::spawn(cmd, dir.join(format!("agent-{n}.log")))?;
        // An agent may exit at once (bad token): then there is no status
        // address, and the caller inspects the exit status and log.
        let status = wait_for("agent status.addr", Duration::from_secs(20), || {
            let recorded = std::fs::read_to_string(&status_file).ok().and_then(|s| s.trim().parse().ok());
            recorded.or_else(|| (!proc.alive()).then(|| SocketAddr::from(([127, 0, 0, 1], 1))))
        })?;
        Ok(Self { proc, data_dir: dir.to_path_buf(), status })
    }

    /// Starts an agent with a config file: `join`, `upstream`, then `extra`
    /// (TOML tables such as `[acme]`); flags set the status and data paths.
    pub fn spawn_with_config(dir: &Path, join: &str, upstream: SocketAddr, extra: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("agent.toml");
        std::fs::write(&config, format!("join = {join:?}\nupstream = \"{upstream}\"\n{extra}\n"))?;
        let path = config.to_string_lossy().into_owned();
        Self::spawn(dir, join, upstream, &["--config", &path])
    }

    /// Waits until `/ready` answers 200.
    pub fn wait_ready(&self, limit: Duration) -> Result<()> {
        wait_for("agent /ready", limit, || (http_get(self.status, "/ready").ok()?.0 == 200).then_some(()))
            .with_context(|| format!("agent log:\n{}", self.proc.log_text()))
    }

    /// The direct listener's address, when started with `--direct-listen`.
    pub fn direct_addr(&self) -> Option<SocketAddr> {
        std::fs::read_to_string(self.data_dir.join("direct.addr")).ok()?.trim().parse().ok()
    }

    /// The local CA clients trust for this node's generated certificate.
    pub fn local_ca(&self, node: &str) -> PathBuf {
        self.data_dir.join(format!("certs/{node}-local-ca.crt"))
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        Ok(http_get(self.status, "/metrics")?.1)
    }
}

/// A plain HTTP/1.0 GET with a 5 s deadline: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The value of a Prometheus series (exact `name{labels}` match).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Number of open file descriptors of a process (Linux).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// CPU time (user + system) a process has used, in seconds (Linux).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident set size of a process in KiB, and its peak (Linux).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    (status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM"))
}

/// One KiB field of `/proc/PID/status` (`VmRSS`, `VmHWM`, `RssAnon`...);
/// 0 when the process or field is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
