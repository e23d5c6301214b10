//! The agent's route table: which local upstreams serve which of the
//! node's names, in which mode, and how one client connection gets an
//! upstream (round-robin over the healthy ones, the next one on a failed
//! connect). A reload builds a new table; connections keep the route they
//! started with.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use edge_proto::routes::{HostPattern, Refusal, RouteMode, RouteReport, UpstreamReport};
use edge_proto::tunnel::StreamHeader;
use tokio::net::TcpStream;

use crate::config::{AgentConfig, HealthConfig};
use crate::health::HealthState;
use crate::tls::NodeCertResolver;

/// One upstream of a route.
#[derive(Debug)]
pub struct Upstream {
    /// `host:port`.
    pub addr: String,
    /// The route's host pattern, for logs and metrics.
    pub route: String,
    state: Mutex<HealthState>,
    /// Told of every health transition (the session reports routes then).
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Upstream {
    /// Whether it is marked up.
    pub fn is_up(&self) -> bool {
        self.lock().is_up()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the state; a transition is announced.
    pub fn update(&self, f: impl FnOnce(&mut HealthState) -> Option<bool>) -> Option<bool> {
        let change = f(&mut self.lock());
        if change.is_some() {
            self.changed.send_modify(|n| *n += 1);
        }
        change
    }
}

/// One route of the table.
#[derive(Debug)]
pub struct Route {
    /// Which names it serves.
    pub pattern: HostPattern,
    /// Terminate or passthrough.
    pub mode: RouteMode,
    /// PROXY v2 header to the upstream.
    pub proxy_protocol: bool,
    /// In the configured order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Active checks, if configured.
    pub health: Option<HealthConfig>,
    /// TLS for terminating its clients (its ALPN).
    pub tls: Arc<rustls::ServerConfig>,
    /// The same plus the probe ALPN, for the direct listener.
    pub direct_tls: Arc<rustls::ServerConfig>,
    next: AtomicUsize,
}

/// How getting an upstream for a connection went.
#[derive(Debug)]
pub enum Connect {
    /// Connected (the PROXY header, if any, written).
    Ok(TcpStream),
    /// The route cannot serve: every upstream down, or every connect failed.
    Refused(Refusal, String),
}

impl Route {
    /// The Host the HTTP check sends: the route's name, or for a wildcard
    /// or default route, the first upstream's host.
    pub fn check_host(&self) -> String {
        match &self.pattern {
            HostPattern::Exact(name) => name.clone(),
            _ => self.upstreams.first().and_then(|u| u.addr.rsplit_once(':')).map_or("localhost", |(h, _)| h).into(),
        }
    }

    /// Connects an upstream for one client: the healthy ones in turn from
    /// the round-robin position, each failure noted. `Unavailable` when
    /// none is healthy, `BadGateway` when every healthy one failed.
    pub async fn connect(&self, header: &StreamHeader) -> Connect {
        let now = Instant::now();
        // Rotate over the usable ones, so each healthy upstream gets an
        // equal share whichever are down.
        let usable: Vec<&Arc<Upstream>> = self.upstreams.iter().filter(|u| u.lock().usable(now)).collect();
        if usable.is_empty() {
            return Connect::Refused(Refusal::Unavailable, format!("every upstream of route {} is down", self.pattern));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = usable.len();
        let mut last = String::new();
        for upstream in (0..n).map(|i| usable[(start + i) % n]) {
            match crate::streams::connect_upstream(&upstream.addr, header, self.proxy_protocol).await {
                Ok(tcp) => {
                    if upstream.update(|s| s.connect_succeeded(self.health.as_ref())).is_some() {
                        tracing::info!(route = %self.pattern, upstream = %upstream.addr, "upstream up (a connect succeeded)");
                    }
                    return Connect::Ok(tcp);
                }
                Err(e) => {
                    if upstream.update(|s| s.connect_failed(Instant::now(), self.health.as_ref())).is_some() {
                        tracing::warn!(route = %self.pattern, upstream = %upstream.addr, error = %e,
                            "upstream down (connect failed)");
                    }
                    last = e.to_string();
                }
            }
        }
        Connect::Refused(Refusal::BadGateway, last)
    }
}

/// Every route of the agent, the default one last.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Raw TCP service targets by name (`[[services]]`).
    services: std::collections::HashMap<String, crate::config::ServiceConfig>,
    /// TLS (top-level ALPN) for names no route serves: they get a 404.
    pub fallback_tls: Arc<rustls::ServerConfig>,
    /// The same plus the probe ALPN, for the direct listener (probes for
    /// a name no route serves are still answered).
    pub fallback_direct_tls: Arc<rustls::ServerConfig>,
    /// The top-level mode: whether names no route serves get a 404 over
    /// TLS (terminate) or a closed connection (passthrough).
    pub fallback_mode: RouteMode,
}

impl RouteTable {
    /// Builds the table of a validated config. Upstreams start up; their
    /// checks start with [`crate::health::run`].
    pub fn build(
        config: &AgentConfig,
        resolver: &Arc<NodeCertResolver>,
        changed: &Arc<tokio::sync::watch::Sender<u64>>,
    ) -> Self {
        let route = |pattern: HostPattern,
                     addrs: &[String],
                     mode: RouteMode,
                     proxy_protocol: bool,
                     alpn: &[String],
                     health: Option<HealthConfig>| {
            let label = pattern.to_string();
            let mut direct_alpn = alpn.to_vec();
            direct_alpn.push(String::from_utf8_lossy(edge_proto::probe::ALPN).into_owned());
            Arc::new(Route {
                upstreams: addrs
                    .iter()
                    .map(|a| {
                        Arc::new(Upstream {
                            addr: a.clone(),
                            route: label.clone(),
                            state: Mutex::default(),
                            changed: changed.clone(),
                        })
                    })
                    .collect(),
                pattern,
                mode,
                proxy_protocol,
                health,
                tls: crate::tls::termination_config(resolver.clone(), alpn),
                direct_tls: crate::tls::termination_config(resolver.clone(), &direct_alpn),
                next: AtomicUsize::new(0),
            })
        };
        let mut routes: Vec<Arc<Route>> = config
            .routes
            .iter()
            .filter_map(|r| {
                let pattern = HostPattern::parse(&r.host).ok()?;
                Some(route(
                    pattern,
                    &r.upstreams,
                    r.mode.unwrap_or(config.mode),
                    r.proxy_protocol.unwrap_or(config.proxy_protocol),
                    r.alpn.as_deref().unwrap_or(&config.alpn),
                    r.health.clone(),
                ))
            })
            .collect();
        if let Some(upstream) = &config.upstream {
            routes.push(route(
                HostPattern::Any,
                std::slice::from_ref(upstream),
                config.mode,
                config.proxy_protocol,
                &config.alpn,
                config.health.clone(),
            ));
        }
        Self {
            routes,
            services: config.services.iter().map(|s| (s.name.clone(), s.clone())).collect(),
            fallback_tls: crate::tls::termination_config(resolver.clone(), &config.alpn),
            fallback_direct_tls: crate::tls::termination_config(resolver.clone(), &{
                let mut alpn = config.alpn.clone();
                alpn.push(String::from_utf8_lossy(edge_proto::probe::ALPN).into_owned());
                alpn
            }),
            fallback_mode: config.mode,
        }
    }

    /// Takes the health of upstreams that `old` had on the same route (a
    /// reload must not send traffic to an upstream known to be down).
    pub fn carry_health_from(&self, old: &RouteTable) {
        for route in &self.routes {
            let Some(before) = old.routes.iter().find(|r| r.pattern == route.pattern) else { continue };
            for upstream in &route.upstreams {
                if let Some(prev) = before.upstreams.iter().find(|u| u.addr == upstream.addr) {
                    *upstream.lock() = prev.lock().clone();
                }
            }
        }
    }

    /// The declared target of TCP service `name`.
    pub fn service(&self, name: &str) -> Option<&crate::config::ServiceConfig> {
        self.services.get(name)
    }

    /// Every route.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The route serving `sni`: exact, then wildcard, then the default.
    pub fn select(&self, sni: &str) -> Option<Arc<Route>> {
        edge_proto::routes::select(self.routes.iter().map(|r| (&r.pattern, r)), sni).cloned()
    }

    /// Routes outside the node's `hostnames`: no client can reach them.
    pub fn unreachable(&self, hostnames: &[String]) -> Vec<String> {
        self.routes.iter().filter(|r| !r.pattern.within(hostnames)).map(|r| r.pattern.to_string()).collect()
    }

    /// What the agent reports to the server.
    pub fn report(&self) -> Vec<RouteReport> {
        self.routes
            .iter()
            .map(|r| RouteReport {
                host: r.pattern.to_string(),
                mode: r.mode,
                upstreams: r
                    .upstreams
                    .iter()
                    .map(|u| UpstreamReport {
                        addr: u.addr.clone(),
                        up: u.is_up(),
                        check: r.health.as_ref().map_or("none", |h| h.check.as_str()).into(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// `edge_agent_upstream_up{route,upstream}` in Prometheus text.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str("# HELP edge_agent_upstream_up Whether the upstream takes connections (1) or is down (0).\n");
        out.push_str("# TYPE edge_agent_upstream_up gauge\n");
        for r in &self.routes {
            for u in &r.upstreams {
                let _ = writeln!(
                    out,
                    "edge_agent_upstream_up{{route=\"{}\",upstream=\"{}\"}} {}",
                    label(&u.route),
                    label(&u.addr),
                    u8::from(u.is_up())
                );
            }
        }
    }
}

/// A Prometheus label value, escaped.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> RouteTable {
        let token = edge_proto::join::make_token("n1", &[7; 32]);
        let join = format!("edge://{token}@127.0.0.1:4433?fp={}", "ab".repeat(32));
        let config = AgentConfig::parse(&format!("join = {join:?}\n{text}"), "t").unwrap();
        config.validate("t").unwrap();
        RouteTable::build(&config, &NodeCertResolver::new(), &Arc::new(tokio::sync::watch::Sender::new(0)))
    }

    fn header() -> StreamHeader {
        StreamHeader {
            client: "127.0.0.2:5000".parse().unwrap(),
            local: "127.0.0.1:443".parse().unwrap(),
            sni: "n1.z.test".into(),
            plain: false,
            service: None,
        }
    }

    #[test]
    fn routes_select_and_report() {
        let t = table(
            "upstream = \"127.0.0.1:1\"\n[[routes]]\nhost = \"api.n1.z.test\"\nupstreams = [\"127.0.0.1:2\"]\n\
             mode = \"passthrough\"\n[[routes]]\nhost = \"*.n1.z.test\"\nupstreams = [\"127.0.0.1:3\"]\n",
        );
        let addr = |sni| t.select(sni).map(|r| r.upstreams[0].addr.clone());
        assert_eq!(addr("api.n1.z.test").as_deref(), Some("127.0.0.1:2"));
        assert_eq!(addr("db.n1.z.test").as_deref(), Some("127.0.0.1:3"));
        assert_eq!(addr("n1.z.test").as_deref(), Some("127.0.0.1:1"));
        let report = t.report();
        assert_eq!(report.iter().map(|r| r.host.as_str()).collect::<Vec<_>>(), ["api.n1.z.test", "*.n1.z.test", "*"]);
        assert_eq!(report[0].mode, RouteMode::Passthrough);
        assert!(edge_proto::routes::valid_report(&report));
        let names = vec!["n1.z.test".to_string(), "*.n1.z.test".to_string()];
        assert!(t.unreachable(&names).is_empty());
        assert_eq!(t.unreachable(&["n2.z.test".to_string()]), ["api.n1.z.test", "*.n1.z.test"]);
        let mut m = String::new();
        t.render_metrics(&mut m);
        assert!(m.contains("edge_agent_upstream_up{route=\"*.n1.z.test\",upstream=\"127.0.0.1:3\"} 1"), "{m}");
    }

    #[tokio::test]
    async fn fails_over_then_answers_503_when_all_are_down() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let t = table(&format!(
            "[[routes]]\nhost = \"n1.z.test\"\nupstreams = [\"{dead}\", \"{}\"]\n",
            live.local_addr().unwrap()
        ));
        let route = t.select("n1.z.test").unwrap();
        for _ in 0..4 {
            assert!(matches!(route.connect(&header()).await, Connect::Ok(_)), "the live one serves every time");
        }
        assert!(!route.upstreams[0].is_up(), "the dead one was marked down by a failed connect");
        drop(live);
        assert!(matches!(route.connect(&header()).await, Connect::Refused(Refusal::BadGateway, _)));
        assert!(matches!(route.connect(&header()).await, Connect::Refused(Refusal::Unavailable, _)));
    }
}
