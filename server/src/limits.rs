//! Admission limits: per-source rates, connection caps, failed-auth
//! budgets, and the counting and rate-limited logging of refusals.
//!
//! [`SourceRates`] is sans-IO (it takes `now`), so its rules are tested
//! without sockets; [`Admission`] wraps it with a semaphore for one
//! listener. Refusals are cheap on purpose: a flood is answered by closing
//! sockets, counting, and at most one log line per listener and reason
//! every [`LOG_EVERY`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_net::logging::Throttle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most one refusal log line per listener and reason this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Where a refusal happened, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The public TLS listener.
    Tls,
    /// The plain HTTP listener.
    Http,
    /// The signal API.
    Api,
    /// The QUIC listener for agents.
    Quic,
    /// The DNS server (UDP and TCP).
    Dns,
    /// The separate metrics listener (`listen.metrics`).
    Metrics,
}

impl Listener {
    /// All listeners, in metric order.
    pub const ALL: [Listener; 6] =
        [Listener::Tls, Listener::Http, Listener::Api, Listener::Quic, Listener::Dns, Listener::Metrics];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Listener::Tls => "tls",
            Listener::Http => "http",
            Listener::Api => "api",
            Listener::Quic => "quic",
            Listener::Dns => "dns",
            Listener::Metrics => "metrics",
        }
    }
}

/// Why a connection, query or request was refused, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source exceeded its rate (`per_source_rate`, `dns_per_source_rate`).
    Rate,
    /// The server holds `max_connections` client connections.
    MaxConnections,
    /// The node holds `max_connections_per_node` client connections.
    NodeBusy,
    /// The source used up its failed-authentication budget.
    AuthFailures,
    /// The source holds `per_source_max_open` connections already.
    SourceOpen,
    /// An authenticated node exceeded its signal API budget
    /// (`node_signal_rate`).
    NodeRate,
    /// A request for `/metrics` over `metrics_rate`.
    MetricsRate,
}

impl Refusal {
    /// All reasons, in metric order.
    pub const ALL: [Refusal; 7] = [
        Refusal::Rate,
        Refusal::MaxConnections,
        Refusal::NodeBusy,
        Refusal::AuthFailures,
        Refusal::SourceOpen,
        Refusal::NodeRate,
        Refusal::MetricsRate,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Rate => "rate",
            Refusal::MaxConnections => "max_connections",
            Refusal::NodeBusy => "node_busy",
            Refusal::AuthFailures => "auth_failures",
            Refusal::SourceOpen => "source_open",
            Refusal::NodeRate => "node_rate",
            Refusal::MetricsRate => "metrics_rate",
        }
    }
}

const LISTENERS: usize = Listener::ALL.len();
const REASONS: usize = Refusal::ALL.len();

/// Refusal counters and the throttle of their log lines.
#[derive(Debug)]
pub struct Refusals {
    counts: [[AtomicU64; REASONS]; LISTENERS],
    logs: [[Throttle; REASONS]; LISTENERS],
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            counts: Default::default(),
            logs: std::array::from_fn(|_| std::array::from_fn(|_| Throttle::new(LOG_EVERY))),
        }
    }
}

fn index(listener: Listener, reason: Refusal) -> (usize, usize) {
    let l = Listener::ALL.iter().position(|x| *x == listener).unwrap_or(0);
    let r = Refusal::ALL.iter().position(|x| *x == reason).unwrap_or(0);
    (l, r)
}

impl Refusals {
    /// Counts one refusal and logs it, at most once per [`LOG_EVERY`] per
    /// listener and reason (the line says how many were not logged).
    pub fn refuse(&self, listener: Listener, reason: Refusal, source: IpAddr) {
        let (l, r) = index(listener, reason);
        self.counts[l][r].fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.logs[l][r].due() {
            tracing::warn!(listener = listener.label(), reason = reason.label(), %source, suppressed,
                "refusing: limit reached (further refusals for this reason are logged every 10 s)");
        }
    }

    /// Refusals so far.
    pub fn count(&self, listener: Listener, reason: Refusal) -> u64 {
        let (l, r) = index(listener, reason);
        self.counts[l][r].load(Ordering::Relaxed)
    }

    /// Appends `edge_refusals_total` in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP edge_refusals_total Connections, queries and requests refused by a limit.");
        let _ = writeln!(out, "# TYPE edge_refusals_total counter");
        for listener in Listener::ALL {
            for reason in Refusal::ALL {
                let _ = writeln!(
                    out,
                    "edge_refusals_total{{listener=\"{}\",reason=\"{}\"}} {}",
                    listener.label(),
                    reason.label(),
                    self.count(listener, reason)
                );
            }
        }
    }
}

/// The key a source is limited under: the IPv4 address, or the /64 of an
/// IPv6 address (one host usually owns a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
    }

    /// Refills, then spends a token if there is one.
    fn spend(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        let allowed = self.tokens >= 1.0;
        if allowed {
            self.tokens -= 1.0;
        }
        allowed
    }
}

/// One token bucket, sans-IO: `burst` at once, `rate` per second after;
/// full until first used.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenBucket(Option<Bucket>);

impl TokenBucket {
    /// Spends a token; false (nothing spent) when there is none.
    /// `rate == 0` admits everything.
    pub fn take(&mut self, rate: f64, burst: u32, now: Instant) -> bool {
        if rate == 0.0 {
            return true;
        }
        let burst = f64::from(burst.max(1));
        self.0.get_or_insert(Bucket { tokens: burst, at: now }).spend(rate, burst, now)
    }
}

/// Token buckets per source, sans-IO.
///
/// Each source may spend `burst` at once and regains `rate` per second.
/// The table is bounded: when it is full, buckets that have refilled (and
/// so say nothing) are dropped; if it is still full (a flood from more
/// distinct sources than `capacity`), new sources are admitted untracked,
/// since the global caps still hold and refusing every newcomer would shut
/// out legitimate clients.
#[derive(Debug)]
pub struct SourceRates {
    rate: f64,
    burst: f64,
    capacity: usize,
    table: HashMap<IpAddr, Bucket>,
}

impl SourceRates {
    /// `rate` per second, `burst` at once; `rate == 0` admits everything.
    pub fn new(rate: u32, burst: u32, capacity: usize) -> Self {
        Self::with_rate(f64::from(rate), burst, capacity)
    }

    /// Like [`SourceRates::new`], with a rate that may be below one per second.
    pub fn with_rate(rate: f64, burst: u32, capacity: usize) -> Self {
        Self { rate, burst: f64::from(burst.max(1)), capacity: capacity.max(1), table: HashMap::new() }
    }

    /// Spends a token of `source`; false (nothing spent) when it has none.
    pub fn take(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let key = source_key(source);
        if !self.table.contains_key(&key) && self.table.len() >= self.capacity {
            self.sweep(now);
            if self.table.len() >= self.capacity {
                return true;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        self.table.entry(key).or_insert(Bucket { tokens: burst, at: now }).spend(rate, burst, now)
    }

    /// Returns a token taken by [`Self::take`] (never beyond the burst).
    pub fn give_back(&mut self, source: IpAddr) {
        let burst = self.burst;
        if let Some(bucket) = self.table.get_mut(&source_key(source)) {
            bucket.tokens = (bucket.tokens + 1.0).min(burst);
        }
    }

    /// Drops buckets that are full again.
    fn sweep(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.table.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// Connections open per source, for `per_source_max_open`. Only sources
/// with an open connection are in the table, so it is bounded by the
/// connection cap.
#[derive(Debug, Default)]
pub struct OpenPerSource {
    max: std::sync::atomic::AtomicU32,
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl OpenPerSource {
    /// At most `max` open connections per source (0: no limit).
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self { max: std::sync::atomic::AtomicU32::new(max), open: Mutex::new(HashMap::new()) })
    }

    /// Changes the cap for new connections (a reload); open ones stay.
    pub fn set_max(&self, max: u32) {
        self.max.store(max, std::sync::atomic::Ordering::Relaxed);
    }

    fn enter(self: &Arc<Self>, source: IpAddr) -> Option<SourceSlot> {
        let max = self.max.load(std::sync::atomic::Ordering::Relaxed);
        if max == 0 {
            return Some(SourceSlot(None));
        }
        let key = source_key(source);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(SourceSlot(Some((self.clone(), key))))
    }

    /// Connections open from `source` now.
    pub fn open(&self, source: IpAddr) -> u32 {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&source_key(source)).copied().unwrap_or(0)
    }
}

/// One open connection of a source; released when dropped.
#[derive(Debug)]
pub struct SourceSlot(Option<(Arc<OpenPerSource>, IpAddr)>);

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some((table, key)) = self.0.take() {
            let mut open = table.open.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = open.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(&key);
                }
            }
        }
    }
}

/// What an admitted connection holds until it ends: its place under the
/// global cap and under its source's cap.
#[derive(Debug)]
pub struct Admitted {
    _slot: Option<OwnedSemaphorePermit>,
    _source: SourceSlot,
}

/// The admission check of one listener: a slot under the connection cap
/// (shared by listeners that share one), a slot under the source's cap,
/// then the source's rate.
#[derive(Debug)]
pub struct Admission {
    listener: Listener,
    rates: Mutex<SourceRates>,
    slots: Option<Arc<Semaphore>>,
    per_source: Arc<OpenPerSource>,
}

impl Admission {
    /// A check for `listener`; `slots` caps concurrent connections,
    /// `per_source` the concurrent connections of one source.
    pub fn new(
        listener: Listener,
        rates: SourceRates,
        slots: Option<Arc<Semaphore>>,
        per_source: Arc<OpenPerSource>,
    ) -> Self {
        Self { listener, rates: Mutex::new(rates), slots, per_source }
    }

    /// Replaces the per-source rates for new connections (a reload: every
    /// source starts with a full burst under the new rate).
    pub fn set_rates(&self, rates: SourceRates) {
        *self.rates.lock().unwrap_or_else(|p| p.into_inner()) = rates;
    }

    /// The per-source open-connection table.
    pub fn per_source(&self) -> &Arc<OpenPerSource> {
        &self.per_source
    }

    /// The listener this admission guards.
    pub fn listener(&self) -> Listener {
        self.listener
    }

    /// Admits a new connection or query from `source`, or says why not.
    /// What it returns must live as long as the connection.
    pub fn admit(&self, source: IpAddr) -> Result<Admitted, Refusal> {
        // Slots first: a source refused for a cap does not also spend its
        // rate budget.
        let permit = match &self.slots {
            None => None,
            Some(slots) => Some(slots.clone().try_acquire_owned().map_err(|_| Refusal::MaxConnections)?),
        };
        let source_slot = self.per_source.enter(source).ok_or(Refusal::SourceOpen)?;
        let allowed = self.rates.lock().unwrap_or_else(|p| p.into_inner()).take(source, Instant::now());
        if !allowed {
            return Err(Refusal::Rate);
        }
        Ok(Admitted { _slot: permit, _source: source_slot })
    }
}

/// Failed authentications per source (node tokens on QUIC, bearer tokens on
/// the API): once a source has used its budget, its attempts are refused
/// before any token is checked, until the budget refills.
#[derive(Debug)]
pub struct AuthFailures {
    rates: Mutex<SourceRates>,
}

impl AuthFailures {
    /// `per_minute` failures allowed per source (0: unlimited).
    pub fn new(per_minute: u32, capacity: usize) -> Self {
        // A budget of `per_minute` that refills over a minute (a zero rate
        // admits everything).
        let rates = SourceRates::with_rate(f64::from(per_minute) / 60.0, per_minute, capacity);
        Self { rates: Mutex::new(rates) }
    }

    /// Spends one attempt of `source`'s budget before its token is checked;
    /// false when the budget is used up (refuse unchecked). Taking first,
    /// before any await, is what keeps concurrent attempts from all passing
    /// on the last token; a success gives it back with [`Self::refund`].
    pub fn try_take(&self, source: IpAddr) -> bool {
        self.rates.lock().unwrap_or_else(|p| p.into_inner()).take(source, Instant::now())
    }

    /// Gives back the attempt [`Self::try_take`] spent: the token was good.
    pub fn refund(&self, source: IpAddr) {
        self.rates.lock().unwrap_or_else(|p| p.into_inner()).give_back(source);
    }

    /// A new budget (a reload); sources start with a full one.
    pub fn set(&self, per_minute: u32, capacity: usize) {
        *self.rates.lock().unwrap_or_else(|p| p.into_inner()) =
            SourceRates::with_rate(f64::from(per_minute) / 60.0, per_minute, capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut r = SourceRates::new(10, 5, 100);
        for _ in 0..5 {
            assert!(r.take(ip("192.0.2.1"), t0));
        }
        assert!(!r.take(ip("192.0.2.1"), t0), "burst spent");
        assert!(r.take(ip("192.0.2.2"), t0), "other sources unaffected");
        // 10/s: one token back after 100 ms, not before.
        assert!(!r.take(ip("192.0.2.1"), t0 + Duration::from_millis(50)));
        assert!(r.take(ip("192.0.2.1"), t0 + Duration::from_millis(150)));
        assert!(!r.take(ip("192.0.2.1"), t0 + Duration::from_millis(160)));
        // Refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(r.take(ip("192.0.2.1"), later));
        }
        assert!(!r.take(ip("192.0.2.1"), later));
    }

    #[test]
    fn one_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::default();
        for _ in 0..3 {
            assert!(b.take(2.0, 3, t0));
        }
        assert!(!b.take(2.0, 3, t0));
        assert!(b.take(2.0, 3, t0 + Duration::from_millis(600)));
        assert!(!b.take(2.0, 3, t0 + Duration::from_millis(600)));
        assert!(TokenBucket::default().take(0.0, 0, t0));
    }

    #[test]
    fn zero_rate_admits_everything() {
        let mut r = SourceRates::new(0, 1, 1);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(r.take(ip("192.0.2.1"), t0));
        }
        assert!(r.is_empty());
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let t0 = Instant::now();
        let mut r = SourceRates::new(1, 2, 100);
        assert!(r.take(ip("2001:db8:1:2::1"), t0));
        assert!(r.take(ip("2001:db8:1:2::ffff"), t0));
        assert!(!r.take(ip("2001:db8:1:2:abcd::9"), t0));
        assert!(r.take(ip("2001:db8:1:3::1"), t0));
        // A v4-mapped address is the v4 source.
        assert!(r.take(ip("198.51.100.7"), t0));
        assert!(r.take(ip("::ffff:198.51.100.7"), t0));
        assert!(!r.take(ip("198.51.100.7"), t0));
    }

    #[test]
    fn table_is_bounded() {
        let t0 = Instant::now();
        let mut r = SourceRates::new(1, 1, 100);
        for i in 0..1000u32 {
            let source = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(r.take(source, t0), "new sources are admitted while the table is full");
        }
        assert_eq!(r.len(), 100);
        // Once buckets refill they are swept to make room.
        let later = t0 + Duration::from_secs(5);
        assert!(r.take(ip("192.0.2.200"), later));
        assert!(r.len() <= 2, "{}", r.len());
        assert!(!r.take(ip("192.0.2.200"), later), "tracked again");
    }

    #[test]
    fn auth_failure_budget() {
        let a = AuthFailures::new(3, 100);
        let src = ip("203.0.113.9");
        // Successes are refunded: any number of them.
        for _ in 0..10 {
            assert!(a.try_take(src));
            a.refund(src);
        }
        // Attempts in flight at once each hold a token: the fourth is refused
        // before any of the three is checked.
        for _ in 0..3 {
            assert!(a.try_take(src));
        }
        assert!(!a.try_take(src), "budget used");
        assert!(a.try_take(ip("203.0.113.10")));
        let off = AuthFailures::new(0, 100);
        for _ in 0..100 {
            assert!(off.try_take(src));
        }
    }

    #[test]
    fn refusals_counted_and_rendered() {
        let r = Refusals::default();
        for _ in 0..5 {
            r.refuse(Listener::Dns, Refusal::Rate, ip("192.0.2.1"));
        }
        assert_eq!(r.count(Listener::Dns, Refusal::Rate), 5);
        assert_eq!(r.count(Listener::Tls, Refusal::Rate), 0);
        let mut out = String::new();
        r.render(&mut out);
        assert!(out.contains("edge_refusals_total{listener=\"dns\",reason=\"rate\"} 5"), "{out}");
        assert_eq!(out.lines().filter(|l| l.starts_with("edge_refusals_total{")).count(), 42);
    }

    #[test]
    fn admission_caps_connections() {
        let slots = Arc::new(Semaphore::new(2));
        let a = Admission::new(Listener::Tls, SourceRates::new(0, 1, 10), Some(slots), OpenPerSource::new(0));
        let p1 = a.admit(ip("192.0.2.1")).unwrap();
        let _p2 = a.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.3")).unwrap_err(), Refusal::MaxConnections);
        drop(p1);
        assert!(a.admit(ip("192.0.2.3")).is_ok());
        // A refusal for the cap spends no rate token.
        let both = Admission::new(
            Listener::Tls,
            SourceRates::new(1, 2, 10),
            Some(Arc::new(Semaphore::new(1))),
            OpenPerSource::new(0),
        );
        let held = both.admit(ip("192.0.2.9")).unwrap();
        assert_eq!(both.admit(ip("192.0.2.9")).unwrap_err(), Refusal::MaxConnections);
        drop(held);
        assert!(both.admit(ip("192.0.2.9")).is_ok(), "the second token is still there");
        let rated = Admission::new(Listener::Api, SourceRates::new(1, 1, 10), None, OpenPerSource::new(0));
        assert!(rated.admit(ip("192.0.2.1")).is_ok());
        assert_eq!(rated.admit(ip("192.0.2.1")).unwrap_err(), Refusal::Rate);
        // Open connections per source (IPv6 by /64), released on drop.
        let per_source = OpenPerSource::new(2);
        let capped = Admission::new(Listener::Tls, SourceRates::new(0, 1, 10), None, per_source.clone());
        let c1 = capped.admit(ip("2001:db8::1")).unwrap();
        let _c2 = capped.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(capped.admit(ip("2001:db8::3")).unwrap_err(), Refusal::SourceOpen);
        assert!(capped.admit(ip("2001:db8:1::1")).is_ok(), "another /64");
        assert_eq!(per_source.open(ip("2001:db8::9")), 2);
        drop(c1);
        assert_eq!(per_source.open(ip("2001:db8::9")), 1);
        assert!(capped.admit(ip("2001:db8::3")).is_ok());
    }
}
