//! Upstream health: the state each upstream's check results and connect
//! outcomes feed (pure, given `now`), the active checks (TCP connect or
//! HTTP GET), and the task that runs them for a route table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{CheckKind, HealthConfig};
use crate::routes::{RouteTable, Upstream};

/// Without active checks, an upstream taken down by failed connects is
/// tried again after this long.
pub const PASSIVE_RETRY: Duration = Duration::from_secs(5);
/// Failed connects in a row that take an upstream without active checks down.
pub const PASSIVE_FALL: u32 = 1;
/// Most bytes of an HTTP check's answer read to find the status line.
const STATUS_LINE_MAX: usize = 1024;

/// One upstream's health as its observations left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    up: bool,
    /// Observations in a row that disagree with `up`.
    streak: u32,
    /// Down from passive failures only: usable again from this instant.
    retry_at: Option<Instant>,
}

impl Default for HealthState {
    /// Up until something says otherwise, so traffic flows before the
    /// first check.
    fn default() -> Self {
        Self { up: true, streak: 0, retry_at: None }
    }
}

impl HealthState {
    /// Whether the upstream is marked up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Whether a connection may be tried now: up, or down from passive
    /// failures with its retry time come.
    pub fn usable(&self, now: Instant) -> bool {
        self.up || self.retry_at.is_some_and(|at| now >= at)
    }

    /// An active check's result. Returns the new state when it changed:
    /// `rise` successes in a row bring it up, `fall` failures take it down.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        self.retry_at = None;
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak >= if ok { rise } else { fall } {
            self.up = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }

    /// A connect to the upstream failed (refused, reset, timed out). With
    /// active checks it counts as a failed check; without, the upstream is
    /// down for [`PASSIVE_RETRY`].
    pub fn connect_failed(&mut self, now: Instant, active: Option<&HealthConfig>) -> Option<bool> {
        match active {
            Some(h) => self.observe(false, h.rise, h.fall),
            None => {
                let change = self.observe(false, 1, PASSIVE_FALL);
                if !self.up {
                    self.retry_at = Some(now + PASSIVE_RETRY);
                }
                change
            }
        }
    }

    /// A connect succeeded. Without active checks that is the only sign an
    /// upstream is back; with them, the checks decide.
    pub fn connect_succeeded(&mut self, active: Option<&HealthConfig>) -> Option<bool> {
        match active {
            Some(_) => None,
            None => self.observe(true, 1, PASSIVE_FALL),
        }
    }
}

/// The status code in an HTTP/1.x status line (`HTTP/1.1 200 OK`).
pub fn status_of(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.").filter(|r| r.len() >= 5)?;
    if !rest[0].is_ascii_digit() || rest[1] != b' ' {
        return None;
    }
    let code = std::str::from_utf8(&rest[2..5]).ok()?.parse::<u16>().ok()?;
    let end_ok = rest.get(5).is_none_or(|b| matches!(b, b' ' | b'\r' | b'\n'));
    ((100..=599).contains(&code) && end_ok).then_some(code)
}

/// Whether `code` is what the check expects: the listed statuses, or any
/// 2xx/3xx when none are listed.
pub fn expected(code: u16, expect: &[u16]) -> bool {
    if expect.is_empty() {
        (200..400).contains(&code)
    } else {
        expect.contains(&code)
    }
}

/// Runs one active check of `addr` against its deadline.
/// With `proxy_protocol`, the check sends a PROXY v2 header first (the
/// agent's own addresses), as real connections do.
pub async fn check(addr: &str, host: &str, health: &HealthConfig, proxy_protocol: bool) -> Result<(), String> {
    let deadline = Duration::from_millis(health.timeout_ms);
    let run = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        if proxy_protocol {
            if let (Ok(local), Ok(peer)) = (tcp.local_addr(), tcp.peer_addr()) {
                let header = edge_proto::proxy_v2::encode(local, peer);
                tcp.write_all(&header).await.map_err(|e| format!("send: {e}"))?;
            }
        }
        if health.check == CheckKind::Tcp {
            return Ok(());
        }
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: edge-agent-health\r\nConnection: close\r\n\r\n",
            health.path
        );
        tcp.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        loop {
            let mut chunk = [0u8; 256];
            let n = tcp.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before a status line".into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let code = status_of(&buf[..end]).ok_or("not an HTTP/1.x status line")?;
                return if expected(code, &health.expect_status) { Ok(()) } else { Err(format!("status {code}")) };
            }
            if buf.len() >= STATUS_LINE_MAX {
                return Err("no status line in the first 1024 bytes".into());
            }
        }
    };
    tokio::time::timeout(deadline, run).await.map_err(|_| format!("timed out after {} ms", health.timeout_ms))?
}

/// Runs the active checks of every upstream of `table` until `stop`.
/// Each upstream is checked at once, then every `interval_ms`.
pub async fn run(table: Arc<RouteTable>, stop: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    for route in table.routes() {
        let Some(health) = route.health.clone() else { continue };
        for upstream in &route.upstreams {
            let (upstream, health, stop) = (upstream.clone(), health.clone(), stop.clone());
            let host = route.check_host();
            let proxy_protocol = route.proxy_protocol;
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(health.interval_ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let result = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = check(&upstream.addr, &host, &health, proxy_protocol) => r,
                    };
                    record(&upstream, &health, result);
                }
            });
        }
    }
    tasks.close();
    tasks.wait().await;
}

fn record(upstream: &Upstream, health: &HealthConfig, result: Result<(), String>) {
    let change = upstream.update(|s| s.observe(result.is_ok(), health.rise, health.fall));
    match (change, result) {
        (Some(true), _) => tracing::info!(route = %upstream.route, upstream = %upstream.addr, "upstream up"),
        (Some(false), Err(why)) => {
            tracing::warn!(route = %upstream.route, upstream = %upstream.addr, reason = %why, "upstream down")
        }
        (None, Err(why)) => tracing::debug!(route = %upstream.route, upstream = %upstream.addr, reason = %why,
            "health check failed"),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rise: u32, fall: u32) -> HealthConfig {
        HealthConfig {
            check: CheckKind::Tcp,
            path: "/".into(),
            expect_status: vec![],
            interval_ms: 1000,
            timeout_ms: 500,
            rise,
            fall,
        }
    }

    #[test]
    fn rise_and_fall_need_results_in_a_row() {
        let mut s = HealthState::default();
        assert!(s.is_up());
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(true, 2, 3), None, "a success resets the streak");
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(false, 2, 3), Some(false));
        assert!(!s.is_up());
        assert_eq!(s.observe(false, 2, 3), None);
        assert_eq!(s.observe(true, 2, 3), None);
        assert_eq!(s.observe(true, 2, 3), Some(true));
        assert_eq!(s.observe(true, 2, 3), None);
    }

    #[test]
    fn passive_failures_count_with_active_checks() {
        let now = Instant::now();
        let h = cfg(1, 2);
        let mut s = HealthState::default();
        assert_eq!(s.connect_failed(now, Some(&h)), None);
        assert_eq!(s.connect_failed(now, Some(&h)), Some(false));
        assert!(!s.usable(now + Duration::from_secs(3600)), "only a check brings it back");
        assert_eq!(s.connect_succeeded(Some(&h)), None);
        assert_eq!(s.observe(true, h.rise, h.fall), Some(true));
    }

    #[test]
    fn without_checks_a_failed_connect_is_retried_later() {
        let now = Instant::now();
        let mut s = HealthState::default();
        assert_eq!(s.connect_failed(now, None), Some(false));
        assert!(!s.usable(now));
        assert!(!s.usable(now + PASSIVE_RETRY - Duration::from_millis(1)));
        assert!(s.usable(now + PASSIVE_RETRY));
        assert_eq!(s.connect_failed(now + PASSIVE_RETRY, None), None, "still down, retried later again");
        assert!(!s.usable(now + PASSIVE_RETRY));
        assert_eq!(s.connect_succeeded(None), Some(true));
        assert!(s.usable(now));
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(status_of(b"HTTP/1.0 503"), Some(503));
        assert_eq!(status_of(b"HTTP/1.1 204\r"), Some(204));
        for bad in [
            &b""[..],
            b"HTTP/1.1",
            b"HTTP/2 200 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 099 x",
            b"FTP 200",
        ] {
            assert_eq!(status_of(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(expected(200, &[]) && expected(302, &[]) && !expected(404, &[]) && !expected(101, &[]));
        assert!(expected(404, &[404]) && !expected(200, &[404]));
    }

    #[tokio::test]
    async fn checks_against_real_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            for answer in ["HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 500 Oops\r\n\r\n", "garbage\n"] {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"GET /healthz HTTP/1.1\r\nHost: a.test\r\n"));
                tcp.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let mut h = cfg(1, 1);
        h.check = CheckKind::Http;
        h.path = "/healthz".into();
        assert_eq!(check(&addr, "a.test", &h, false).await, Ok(()));
        assert_eq!(check(&addr, "a.test", &h, false).await, Err("status 500".into()));
        assert!(check(&addr, "a.test", &h, false).await.is_err());
        server.await.unwrap();
        h.check = CheckKind::Tcp;
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
        assert!(check(&closed, "a.test", &h, false).await.unwrap_err().starts_with("connect"));
    }
}
