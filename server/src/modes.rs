//! Direct/proxy mode of each node, decided from verified probes.
//!
//! Sans-IO: [`ModeTracker`] takes events (a probe result, the tunnel going
//! up or down) with the time, and returns the transition, if any. The
//! probing and persisting live in [`crate::detector`].
//!
//! Rules:
//! - a successful probe of the node's endpoint makes it **direct**;
//! - `failures_to_proxy` consecutive failed probes (or no endpoint) make it
//!   **proxy** when a tunnel is up, else **offline**;
//! - without a successful probe, the tunnel decides between proxy and
//!   offline as it comes and goes.
//!
//! DNS answers the node's endpoint address in direct mode and the cluster
//! ingress in proxy and offline mode (offline: the cluster answers :443
//! with an alert and :80 with 503, which tells users more than a timeout).

use serde::Serialize;

pub use crate::store::Mode;

/// A change of mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// Unix seconds.
    pub at: i64,
    /// Old mode.
    pub from: Mode,
    /// New mode.
    pub to: Mode,
    /// Why, for operators.
    pub reason: String,
}

/// One node's mode and the counters the rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeTracker {
    mode: Mode,
    failures: u32,
    tunnel_up: bool,
    verified: Option<std::net::SocketAddr>,
}

impl ModeTracker {
    /// A tracker starting in `mode` (restored from the store, or offline).
    pub fn new(mode: Mode) -> Self {
        Self { mode, failures: 0, tunnel_up: false, verified: None }
    }

    /// A tracker restored from the store: a direct node keeps the endpoint
    /// it was verified at until the next probe says otherwise.
    pub fn restored(mode: Mode, verified: Option<std::net::SocketAddr>) -> Self {
        Self { mode, failures: 0, tunnel_up: false, verified: verified.filter(|_| mode == Mode::Direct) }
    }

    /// The endpoint the last successful probe verified.
    pub fn verified(&self) -> Option<std::net::SocketAddr> {
        self.verified
    }

    /// Drops the verified endpoint (token rotated): DNS and the fallback
    /// splice stop using it at once; the next round records the change.
    pub fn forget_verified(&mut self) {
        self.verified = None;
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Consecutive failed probes so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn go(&mut self, to: Mode, at: i64, reason: String) -> Option<Transition> {
        if to == self.mode {
            return None;
        }
        let from = std::mem::replace(&mut self.mode, to);
        Some(Transition { at, from, to, reason })
    }

    fn fallback(&self) -> Mode {
        if self.tunnel_up {
            Mode::Proxy
        } else {
            Mode::Offline
        }
    }

    /// A probe of `endpoint` succeeded. A direct node that moved to a new
    /// verified endpoint reports a transition too (direct → direct), so the
    /// change reaches the store and DNS.
    pub fn probe_ok(&mut self, at: i64, endpoint: std::net::SocketAddr) -> Option<Transition> {
        self.failures = 0;
        let moved = self.mode == Mode::Direct && self.verified != Some(endpoint);
        self.verified = Some(endpoint);
        let reason = format!("probe of {endpoint} verified the node");
        if moved {
            return Some(Transition { at, from: Mode::Direct, to: Mode::Direct, reason });
        }
        self.go(Mode::Direct, at, reason)
    }

    /// A probe failed (`why` says how); `threshold` consecutive failures
    /// end direct mode.
    pub fn probe_failed(&mut self, at: i64, endpoint: &str, why: &str, threshold: u32) -> Option<Transition> {
        self.failures = self.failures.saturating_add(1);
        if self.mode == Mode::Direct && self.failures < threshold.max(1) {
            return None;
        }
        let to = self.fallback();
        let n = self.failures;
        self.verified = None;
        self.go(to, at, format!("{n} consecutive failed probes of {endpoint} (last: {why})"))
    }

    /// The node has no endpoint (never declared, or withdrawn).
    pub fn no_endpoint(&mut self, at: i64) -> Option<Transition> {
        self.failures = 0;
        self.verified = None;
        let to = self.fallback();
        self.go(to, at, "the node declares no public endpoint".into())
    }

    /// Takes the mode the store holds (written by the cluster's decider):
    /// no transition, the failure count starts over, and a direct node's
    /// stored endpoint counts as verified.
    pub fn adopt(&mut self, mode: Mode, endpoint: Option<std::net::SocketAddr>) {
        self.mode = mode;
        self.failures = 0;
        self.verified = if mode == Mode::Direct { endpoint } else { None };
    }

    /// The node's tunnel count changed to `up` (some) or not.
    pub fn tunnel(&mut self, at: i64, up: bool) -> Option<Transition> {
        self.tunnel_up = up;
        if self.mode == Mode::Direct {
            // Direct stands on its own probes, not on the tunnel.
            return None;
        }
        let (to, reason) =
            if up { (Mode::Proxy, "tunnel up") } else { (Mode::Offline, "no tunnel and not reachable directly") };
        self.go(to, at, reason.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> std::net::SocketAddr {
        "192.0.2.5:443".parse().unwrap()
    }

    #[test]
    fn a_new_verified_endpoint_is_a_transition_and_failures_forget_it() {
        let mut t = ModeTracker::new(Mode::Offline);
        t.probe_ok(1, ep());
        assert_eq!(t.verified(), Some(ep()));
        let other: std::net::SocketAddr = "192.0.2.6:443".parse().unwrap();
        let moved = t.probe_ok(2, other).unwrap();
        assert_eq!((moved.from, moved.to), (Mode::Direct, Mode::Direct));
        assert!(t.probe_ok(3, other).is_none());
        t.forget_verified();
        assert_eq!(t.verified(), None);
        assert_eq!(ModeTracker::restored(Mode::Proxy, Some(ep())).verified(), None);
    }

    #[test]
    fn probes_decide_direct_and_failures_fall_back() {
        let mut t = ModeTracker::new(Mode::Offline);
        assert_eq!(t.tunnel(1, true).unwrap().to, Mode::Proxy);
        let tr = t.probe_ok(2, ep()).unwrap();
        assert_eq!((tr.from, tr.to), (Mode::Proxy, Mode::Direct));
        assert!(t.probe_failed(3, "e", "refused", 3).is_none());
        assert!(t.probe_failed(4, "e", "refused", 3).is_none());
        let tr = t.probe_failed(5, "e", "refused", 3).unwrap();
        assert_eq!((tr.from, tr.to, tr.at), (Mode::Direct, Mode::Proxy, 5));
        assert!(tr.reason.contains("3 consecutive"));
        // One success resets the count and goes back to direct.
        assert_eq!(t.probe_ok(6, ep()).unwrap().to, Mode::Direct);
        assert_eq!(t.failures(), 0);
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let mut t = ModeTracker::restored(Mode::Direct, Some(ep()));
        t.tunnel(0, true);
        assert!(t.probe_failed(1, "e", "x", 3).is_none());
        assert!(t.probe_failed(2, "e", "x", 3).is_none());
        assert!(t.probe_ok(3, ep()).is_none());
        assert!(t.probe_failed(4, "e", "x", 3).is_none());
        assert!(t.probe_failed(5, "e", "x", 3).is_none());
        assert_eq!(t.probe_failed(6, "e", "x", 3).unwrap().to, Mode::Proxy);
    }

    #[test]
    fn without_tunnel_failures_mean_offline_and_tunnel_restores_proxy() {
        let mut t = ModeTracker::new(Mode::Direct);
        t.probe_failed(1, "e", "x", 2);
        assert_eq!(t.probe_failed(2, "e", "x", 2).unwrap().to, Mode::Offline);
        assert_eq!(t.tunnel(3, true).unwrap().to, Mode::Proxy);
        assert_eq!(t.tunnel(4, false).unwrap().to, Mode::Offline);
        // Direct does not care about the tunnel.
        t.probe_ok(5, ep());
        assert!(t.tunnel(6, true).is_none());
        assert!(t.tunnel(7, false).is_none());
        assert_eq!(t.mode(), Mode::Direct);
        assert_eq!(t.no_endpoint(8).unwrap().to, Mode::Offline);
    }

    #[test]
    fn adopting_the_stored_mode_is_no_transition() {
        let mut t = ModeTracker::new(Mode::Offline);
        t.tunnel(0, true);
        t.adopt(Mode::Direct, Some(ep()));
        assert_eq!((t.mode(), t.verified()), (Mode::Direct, Some(ep())));
        assert!(t.probe_ok(1, ep()).is_none(), "already direct at this endpoint");
        t.adopt(Mode::Proxy, Some(ep()));
        assert_eq!((t.mode(), t.verified()), (Mode::Proxy, None));
        assert!(t.tunnel(2, true).is_none());
    }

    #[test]
    fn failed_probes_of_a_proxy_node_change_nothing() {
        let mut t = ModeTracker::new(Mode::Offline);
        t.tunnel(0, true);
        for i in 1..10 {
            assert!(t.probe_failed(i, "e", "x", 3).is_none());
        }
        assert_eq!(t.mode(), Mode::Proxy);
        assert_eq!(Mode::parse(Mode::Proxy.as_str()), Some(Mode::Proxy));
    }
}
