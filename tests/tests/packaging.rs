//! What ships besides the binaries: the Grafana dashboard and the alerting
//! rules name only metrics (and labels) a running server exports, the
//! systemd units pass `systemd-analyze verify` with the real binaries, and
//! the Debian packages (cargo-deb) hold the binaries, units, configs and
//! maintainer scripts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use edge_tests::{bin, metric, upstreams, wait_for, Agent, Server, ZONE};

const DASHBOARD: &str = "deploy/grafana/edge-dashboard.json";
const ALERTS: &str = "deploy/prometheus/edge-alerts.yml";
const SERVER_UNIT: &str = "deploy/systemd/edge-server.service";
const AGENT_UNIT: &str = "deploy/systemd/edge-agent@.service";

/// Metrics the dashboard must graph.
const DASHBOARD_METRICS: [&str; 13] = [
    "edge_tunnels_connected",
    "edge_connections_open",
    "edge_connections_accepted_total",
    "edge_refusals_total",
    "edge_node_bytes_to_node_total",
    "edge_node_bytes_from_node_total",
    "edge_node_tunnels",
    "edge_node_mode",
    "edge_node_certificate_expiry_timestamp_seconds",
    "edge_dns_responses_total",
    "edge_sni_rejections_total",
    "edge_process_resident_memory_bytes",
    "edge_process_open_fds",
];

/// Alerts the rules file must define.
const ALERT_NAMES: [&str; 7] = [
    "EdgeServerDown",
    "EdgeNodeTunnelDown",
    "EdgeNodeCertificateExpiringSoon",
    "EdgeNodeCertificateExpiryCritical",
    "EdgeRefusalsRising",
    "EdgeAgentAuthFailuresRising",
    "EdgeStoreResyncs",
];

/// Labels Prometheus adds at scrape time (not in the exposition).
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn read(rel: &str) -> String {
    let path = workspace().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs `cmd` with stdout and stderr in files (no pipe to fill), killing it
/// after `limit`. `Err` only when it cannot be started.
fn run(cmd: &mut Command, limit: Duration) -> std::io::Result<Output> {
    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdin(Stdio::null()).stdout(File::create(&out_path)?).stderr(File::create(&err_path)?);
    let mut child = cmd.spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {limit:?}; stderr so far:\n{}", lossy(&err_path));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output { status, stdout: std::fs::read(&out_path)?, stderr: std::fs::read(&err_path)? })
}

fn lossy(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Runs `cmd`, which must succeed; its stdout.
fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let out = run(cmd, limit).unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'
}

/// Every `edge_...` identifier in `text`, with its byte offset.
fn edge_idents(text: &str) -> Vec<(usize, String)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("edge_") {
        let start = i + at;
        let mut end = start + "edge_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_')
        {
            end += 1;
        }
        if start == 0 || !is_ident(bytes[start - 1]) {
            found.push((start, text[start..end].to_string()));
        }
        i = end;
    }
    found
}

fn metric_names(text: &str) -> BTreeSet<String> {
    edge_idents(text).into_iter().map(|(_, name)| name).collect()
}

/// The exposition: each metric with a `# TYPE` line, and its series' labels.
#[derive(Debug, Default)]
struct Exposition {
    typed: BTreeSet<String>,
    series: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    split_matchers(text)
        .into_iter()
        .filter_map(|m| {
            let (k, v) = m.split_once('=')?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

/// Splits `a="x", b=~"y"` at commas outside quotes.
fn split_matchers(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in text.chars() {
        if quoted {
            current.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                current.push(c);
            }
            ',' => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()
}

fn parse_exposition(text: &str) -> Exposition {
    let mut exposition = Exposition::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                exposition.typed.insert(name.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.rsplit_once('}').map_or("", |(l, _)| l))),
            None => (line.split_whitespace().next().unwrap_or(""), BTreeMap::new()),
        };
        exposition.series.entry(name.to_string()).or_default().push(labels);
    }
    exposition
}

/// The contents of the `{...}` right after `pos` (whitespace allowed), if any.
fn selector_at(expr: &str, pos: usize) -> Option<&str> {
    let rest = expr[pos..].trim_start();
    let inner = rest.strip_prefix('{')?;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in inner.char_indices() {
        if quoted {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
        } else if c == '"' {
            quoted = true;
        } else if c == '}' {
            return Some(&inner[..i]);
        }
    }
    None
}

/// Label names of every `by (...)` clause, each with the offset where the
/// clause ends (the aggregated metric follows).
fn by_clauses(expr: &str) -> Vec<(usize, Vec<String>)> {
    let bytes = expr.as_bytes();
    let mut clauses = Vec::new();
    let mut i = 0;
    while let Some(at) = expr[i..].find("by") {
        let start = i + at;
        i = start + 2;
        if start > 0 && is_ident(bytes[start - 1]) {
            continue;
        }
        let rest = expr[i..].trim_start();
        let Some(inner) = rest.strip_prefix('(') else { continue };
        let Some(close) = inner.find(')') else { continue };
        let labels = inner[..close].split(',').map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
        clauses.push((expr.len() - inner.len() + close, labels));
    }
    clauses
}

/// Checks that the labels `expr` selects or aggregates by are ones the
/// metric's series carry (and exact-match values ones they take).
fn check_labels(expr: &str, exposition: &Exposition, problems: &mut Vec<String>) {
    let idents = edge_idents(expr);
    let series_of = |name: &str| exposition.series.get(name).map(Vec::as_slice).unwrap_or(&[]);
    for (pos, name) in &idents {
        let Some(selector) = selector_at(expr, pos + name.len()) else { continue };
        for matcher in split_matchers(selector) {
            let Some(op_at) = matcher.find(['=', '!']) else {
                problems.push(format!("{expr}: cannot read matcher {matcher:?}"));
                continue;
            };
            let label = matcher[..op_at].trim();
            let (op, value) = matcher[op_at..]
                .split_at(if matcher[op_at..].starts_with("=~") || matcher[op_at..].starts_with('!') { 2 } else { 1 });
            let value = value.trim().trim_matches('"');
            if TARGET_LABELS.contains(&label) {
                continue;
            }
            let series = series_of(name);
            if !series.iter().any(|s| s.contains_key(label)) {
                problems.push(format!("{expr}: {name} has no label {label} (series: {series:?})"));
            } else if op == "="
                && !value.contains('$')
                && !series.iter().any(|s| s.get(label).map(String::as_str) == Some(value))
            {
                problems.push(format!("{expr}: no {name} series has {label}=\"{value}\""));
            }
        }
    }
    for (end, labels) in by_clauses(expr) {
        let Some((_, name)) = idents.iter().find(|(pos, _)| *pos >= end) else {
            problems.push(format!("{expr}: no metric after a by clause"));
            continue;
        };
        let series = series_of(name);
        for label in labels.iter().filter(|l| !TARGET_LABELS.contains(&l.as_str())) {
            if !series.iter().any(|s| s.contains_key(label)) {
                problems.push(format!("{expr}: aggregates {name} by {label}, which its series lack ({series:?})"));
            }
        }
    }
}

/// Every `expr` of the dashboard's panels (rows' nested panels included).
fn dashboard_exprs(panels: &[serde_json::Value], out: &mut Vec<String>) {
    for panel in panels {
        for target in panel["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(expr) = target["expr"].as_str() {
                out.push(expr.to_string());
            }
        }
        if let Some(nested) = panel["panels"].as_array() {
            dashboard_exprs(nested, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observability_files_name_only_real_metrics() {
    let dashboard_text = read(DASHBOARD);
    let alerts_text = read(ALERTS);

    // The dashboard: an importable Grafana JSON with a Prometheus input.
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    assert!(dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36, "schemaVersion");
    assert!(
        dashboard["__inputs"].as_array().is_some_and(|i| i.iter().any(|i| i["name"] == "DS_PROMETHEUS")),
        "DS_PROMETHEUS input"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let graphs: Vec<_> = panels.iter().filter(|p| p["type"] != "row").collect();
    assert!(graphs.len() >= 10, "{} panels", graphs.len());
    for panel in &graphs {
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "datasource of {}", panel["title"]);
        assert!(panel["targets"].as_array().is_some_and(|t| !t.is_empty()), "targets of {}", panel["title"]);
    }
    let mut dashboard_queries = Vec::new();
    dashboard_exprs(panels, &mut dashboard_queries);
    let graphed = metric_names(&dashboard_text);
    for name in DASHBOARD_METRICS {
        assert!(graphed.contains(name), "the dashboard graphs no {name}");
    }

    // The rules: plain YAML (no anchors, no tabs) with the alerts named.
    assert!(alerts_text.lines().any(|l| l.trim_end() == "groups:"), "groups:");
    assert!(!alerts_text.contains('\t'), "tabs in YAML");
    assert!(!alerts_text.contains("<<:") && !alerts_text.contains(": &") && !alerts_text.contains(": *"), "anchors");
    let alerts: Vec<&str> =
        alerts_text.lines().filter_map(|l| l.trim_start().strip_prefix("- alert:")).map(str::trim).collect();
    let rule_exprs: Vec<String> = alerts_text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect();
    for name in ALERT_NAMES {
        assert!(alerts.contains(&name), "no alert {name} in {alerts:?}");
    }
    assert_eq!(rule_exprs.len(), alerts.len(), "one expr per alert");
    assert!(rule_exprs.iter().any(|e| e.starts_with("up{") && e.contains("== 0")), "server down: {rule_exprs:?}");

    // A server with a node whose agent is connected, so that per-node
    // series exist, and one request through the tunnel.
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("server"), "").unwrap();
    let join = server.add_node("web1").unwrap();
    let upstream = upstreams::http("packaged").await;
    let agent = Agent::start(&tmp.path().join("agent"), &join, upstream, &[]).unwrap();
    let body = server.fetch(&agent.local_ca("web1"), &format!("web1.{ZONE}")).await.unwrap();
    assert_eq!(body, "packaged");
    // The certificate's expiry comes with the agent's heartbeat (every 15 s).
    let text = tokio::task::block_in_place(|| {
        wait_for("per-node series", Duration::from_secs(45), || {
            let text = server.metrics().ok()?;
            let tunnels = metric(&text, "edge_node_tunnels{node=\"web1\"}")?;
            let expiry = metric(&text, "edge_node_certificate_expiry_timestamp_seconds{node=\"web1\"}");
            (tunnels >= 1.0 && expiry.is_some()).then_some(text)
        })
    })
    .unwrap();
    let exposition = parse_exposition(&text);

    let mut problems = Vec::new();
    for (file, used) in [(DASHBOARD, &graphed), (ALERTS, &metric_names(&alerts_text))] {
        for name in used {
            if !exposition.typed.contains(name) && !exposition.series.contains_key(name) {
                problems.push(format!("{file} names {name}, which /metrics does not export"));
            }
        }
    }
    let mut queries = dashboard_queries;
    queries.extend(rule_exprs);
    for expr in &queries {
        check_labels(expr, &exposition, &mut problems);
    }
    // Template variables: label_values(<selector>, <label>).
    for var in dashboard["templating"]["list"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let Some(def) = var["definition"].as_str() else { continue };
        let Some(args) = def.strip_prefix("label_values(").and_then(|a| a.strip_suffix(')')) else { continue };
        let (selector, label) = args.rsplit_once(',').unwrap();
        check_labels(&format!("sum by ({}) ({selector})", label.trim()), &exposition, &mut problems);
    }
    assert!(problems.is_empty(), "{} problems:\n{}\n\n/metrics:\n{text}", problems.len(), problems.join("\n"));
    eprintln!("{} queries checked against {} exported metrics", queries.len(), exposition.typed.len());
}

/// Values of `key=` lines in a unit file.
fn settings(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines().filter_map(|l| l.trim().strip_prefix(prefix.as_str())).map(str::to_string).collect()
}

fn setting(unit: &str, key: &str) -> String {
    let values = settings(unit, key);
    assert_eq!(values.len(), 1, "{key}= set {} times", values.len());
    values.into_iter().next().unwrap()
}

/// Settings both units share: sandbox, restarts, reload.
fn assert_common(name: &str, unit: &str) {
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        ("Restart", "on-failure"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("LimitNOFILE", "65536"),
        ("After", "network-online.target"),
        ("Wants", "network-online.target"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(setting(unit, key), value, "{name}: {key}=");
    }
    let families: BTreeSet<String> =
        setting(unit, "RestrictAddressFamilies").split_whitespace().map(String::from).collect();
    let expected: BTreeSet<String> =
        ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"].into_iter().map(String::from).collect();
    assert_eq!(families, expected, "{name}: RestrictAddressFamilies=");
    for section in ["[Unit]", "[Service]", "[Install]"] {
        assert!(unit.lines().any(|l| l.trim() == section), "{name}: {section}");
    }
}

/// Points the unit's ExecStart at `binary` (systemd-analyze checks it exists).
fn with_binary(unit: &str, installed: &str, binary: &Path) -> String {
    let path = binary.display().to_string();
    let path = if path.contains(char::is_whitespace) { format!("\"{path}\"") } else { path };
    let from = format!("ExecStart={installed} ");
    assert!(unit.contains(&from), "no {from:?}");
    unit.replace(&from, &format!("ExecStart={path} "))
}

#[test]
fn systemd_units_verify() {
    let server = read(SERVER_UNIT);
    let agent = read(AGENT_UNIT);

    assert_common("edge-server.service", &server);
    assert_eq!(setting(&server, "ExecStart"), "/usr/bin/edge-server --config /etc/edge/server.toml run");
    assert_eq!(setting(&server, "User"), "edge");
    assert_eq!(setting(&server, "Group"), "edge");
    // READY=1 at start; MAINPID= from the successor of `edge-server upgrade`.
    assert_eq!(setting(&server, "Type"), "notify");
    assert_eq!(setting(&server, "NotifyAccess"), "all");
    assert_eq!(setting(&server, "StateDirectory"), "edge-server");
    assert_eq!(setting(&server, "AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(setting(&server, "CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");

    assert_common("edge-agent@.service", &agent);
    assert_eq!(
        setting(&agent, "ExecStart"),
        "/usr/bin/edge-agent run --config /etc/edge/agent-%i.toml --data-dir /var/lib/edge-agent/%i"
    );
    assert_eq!(setting(&agent, "User"), "edge-agent");
    assert_eq!(setting(&agent, "Group"), "edge-agent");
    assert_eq!(setting(&agent, "StateDirectory"), "edge-agent/%i");
    assert_eq!(setting(&agent, "CapabilityBoundingSet"), "", "the agent needs no capability");
    assert_eq!(setting(&agent, "AmbientCapabilities"), "", "no capability granted to the agent");

    // The packaged config keeps its state where StateDirectory= puts it.
    let config = read("examples/server.toml");
    assert!(
        config.lines().any(|l| l.trim() == "data_dir = \"/var/lib/edge-server\""),
        "examples/server.toml (packaged as /etc/edge/server.toml) must use data_dir = \"/var/lib/edge-server\""
    );

    // The binaries accept the units' command lines (check-config parses the
    // same flags as run, and the packaged example configs).
    let tmp = tempfile::tempdir().unwrap();
    let limit = Duration::from_secs(30);
    run_ok(
        Command::new(bin("edge-server"))
            .arg("--config")
            .arg(workspace().join("examples/server.toml"))
            .arg("check-config"),
        limit,
    );
    run_ok(
        Command::new(bin("edge-agent"))
            .args(["check-config", "--config"])
            .arg(workspace().join("examples/agent.toml"))
            .arg("--data-dir")
            .arg(tmp.path().join("web1")),
        limit,
    );

    let probe = Command::new("systemd-analyze").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if probe.is_err() {
        eprintln!("NOTE: systemd-analyze is not installed; skipping `systemd-analyze verify` of the units");
        return;
    }
    let dir = tmp.path().join("units");
    std::fs::create_dir_all(&dir).unwrap();
    let server_file = dir.join("edge-server.service");
    let agent_file = dir.join("edge-agent@.service");
    std::fs::write(&server_file, with_binary(&server, "/usr/bin/edge-server", &bin("edge-server"))).unwrap();
    std::fs::write(&agent_file, with_binary(&agent, "/usr/bin/edge-agent", &bin("edge-agent"))).unwrap();
    // The template on its own, and an instance of it (loaded from the
    // template beside it, as systemd would).
    let out = run(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(&server_file)
            .arg(&agent_file)
            .arg(dir.join("edge-agent@web1.service")),
        Duration::from_secs(60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("systemd-analyze verify: {}\n{stderr}", out.status);
    assert!(out.status.success(), "systemd-analyze verify failed ({}):\n{stderr}", out.status);
    let bad: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("edge-server") || l.contains("edge-agent@"))
        .filter(|l| {
            ["Unknown", "Failed", "failed", "bad-setting", "ignoring", "not executable", "Invalid", "invalid"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    assert!(bad.is_empty(), "systemd-analyze complains about the units:\n{}", bad.join("\n"));
}

/// One package built by cargo-deb from the already built binaries.
struct Deb {
    contents: String,
    info: String,
    path: PathBuf,
}

const CARGO_DEB_HINT: &str = "cargo-deb is missing: scripts/test.sh installs it \
     (cargo install --locked cargo-deb --version 2.12.1)";

fn build_deb(package: &str, out_dir: &Path) -> Deb {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Package the binaries these tests run: release, or the dev profile
    // when the tests were built without --release.
    let built = bin(package);
    let profile = built.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()).unwrap_or("release").to_string();
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace()).args(["deb", "-p", package, "--no-build", "--no-strip", "--fast", "-Z", "gzip"]);
    if profile == "debug" {
        cmd.args(["--profile", "dev"]);
    }
    cmd.arg("-o").arg(format!("{}/", out_dir.display()));
    run_ok(&mut cmd, Duration::from_secs(300));
    let path = std::fs::read_dir(out_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
        })
        .unwrap_or_else(|| panic!("no {package}_*.deb in {}", out_dir.display()));
    let limit = Duration::from_secs(60);
    let contents = run_ok(Command::new("dpkg-deb").arg("-c").arg(&path), limit);
    let info = run_ok(Command::new("dpkg-deb").arg("-I").arg(&path), limit);
    Deb { contents, info, path }
}

impl Deb {
    /// The `dpkg-deb -c` line of `path` (`./usr/bin/...`; cargo-deb may
    /// store the names without the `./`).
    fn entry(&self, path: &str) -> &str {
        let want = path.trim_start_matches("./");
        self.contents
            .lines()
            .find(|l| l.split_whitespace().last().map(|p| p.trim_start_matches("./")) == Some(want))
            .unwrap_or_else(|| panic!("{} lacks {path}:\n{}", self.path.display(), self.contents))
    }

    /// Asserts `path` is in the package with `mode` and the size of `source`.
    fn assert_file(&self, path: &str, mode: &str, source: &Path) {
        let line = self.entry(path);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], mode, "{line}");
        assert!(fields[1] == "root/root" || fields[1] == "0/0", "owned by root: {line}");
        let size = std::fs::metadata(source).unwrap().len().to_string();
        assert_eq!(fields[2], size, "{path} is not {}: {line}", source.display());
    }

    fn field_opt(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}:");
        self.info.lines().find_map(|l| l.trim().strip_prefix(prefix.as_str())).map(|v| v.trim().to_string())
    }

    fn field(&self, name: &str) -> String {
        self.field_opt(name).unwrap_or_else(|| panic!("no {name}: in\n{}", self.info))
    }

    /// A control member (`postinst`, `conffiles`).
    fn control(&self, member: &str) -> String {
        run_ok(Command::new("dpkg-deb").arg("-I").arg(&self.path).arg(member), Duration::from_secs(60))
    }

    fn assert_package(&self, package: &str, user: &str) {
        assert_eq!(self.field("Package"), package);
        let version = self.field("Version");
        assert!(version.starts_with(&format!("{}-", env!("CARGO_PKG_VERSION"))), "Version: {version}");
        assert_eq!(self.field("Section"), "net");
        assert_eq!(self.field("Priority"), "optional");
        let depends = self.field_opt("Depends").unwrap_or_default();
        assert!(
            depends.contains("libc6"),
            "Depends: {depends:?} (cargo-deb's $auto dependencies need dpkg-shlibdeps: apt-get install dpkg-dev)"
        );
        // The member list: `1601 bytes, 47 lines * postinst #!/bin/sh`.
        assert!(
            self.info.lines().any(|l| l.contains(" bytes,") && l.split_whitespace().any(|w| w == "postinst")),
            "no postinst:\n{}",
            self.info
        );
        let postinst = self.control("postinst");
        assert!(postinst.starts_with("#!/bin/sh"), "{postinst}");
        assert!(postinst.contains(&format!("user={user}\n")), "postinst does not create {user}:\n{postinst}");
        assert!(postinst.contains("adduser --system") && postinst.contains("useradd --system"), "{postinst}");
        assert!(postinst.contains("daemon-reload"), "{postinst}");
        assert!(!postinst.contains("#DEBHELPER#"), "{postinst}");
    }
}

#[test]
fn deb_packages_contain_binaries_units_and_configs() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let probe = run(Command::new(&cargo).args(["deb", "--version"]), Duration::from_secs(60));
    match probe {
        Ok(out) if out.status.success() => eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim()),
        Ok(out) => panic!("{CARGO_DEB_HINT}\n`cargo deb --version`: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("{CARGO_DEB_HINT}\nrunning {cargo}: {e}"),
    }
    let root = workspace();
    let tmp = tempfile::tempdir().unwrap();

    let server_dir = tmp.path().join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    let server = build_deb("edge-server", &server_dir);
    server.assert_package("edge-server", "edge");
    server.assert_file("./usr/bin/edge-server", "-rwxr-xr-x", &bin("edge-server"));
    server.assert_file("./lib/systemd/system/edge-server.service", "-rw-r--r--", &root.join(SERVER_UNIT));
    server.assert_file("./etc/edge/server.toml", "-rw-r--r--", &root.join("examples/server.toml"));
    server.assert_file(
        "./usr/share/doc/edge-server/examples/server-postgres.toml",
        "-rw-r--r--",
        &root.join("examples/server-postgres.toml"),
    );
    server.assert_file("./usr/share/doc/edge-server/examples/edge-dashboard.json", "-rw-r--r--", &root.join(DASHBOARD));
    server.assert_file("./usr/share/doc/edge-server/examples/edge-alerts.yml", "-rw-r--r--", &root.join(ALERTS));
    let conffiles = server.control("conffiles");
    assert_eq!(conffiles.lines().map(str::trim).collect::<Vec<_>>(), ["/etc/edge/server.toml"], "conffiles");
    assert!(
        !server.contents.contains("systemd/system/multi-user.target.wants"),
        "the unit is not enabled by the package"
    );

    let agent_dir = tmp.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = build_deb("edge-agent", &agent_dir);
    agent.assert_package("edge-agent", "edge-agent");
    agent.assert_file("./usr/bin/edge-agent", "-rwxr-xr-x", &bin("edge-agent"));
    agent.assert_file("./lib/systemd/system/edge-agent@.service", "-rw-r--r--", &root.join(AGENT_UNIT));
    agent.assert_file(
        "./usr/share/doc/edge-agent/examples/agent.toml",
        "-rw-r--r--",
        &root.join("examples/agent.toml"),
    );
    assert!(
        !agent
            .contents
            .lines()
            .any(|l| l.split_whitespace().last().is_some_and(|p| p.trim_start_matches("./").starts_with("etc/"))),
        "the agent package ships no /etc file:\n{}",
        agent.contents
    );
}
