//! Failed-login budgets per source address and per user name: each key may
//! fail `per_minute` times in a fixed one-minute window, then every login
//! with that key is refused until the window ends, right password or not.
//!
//! Pure and clocked by the caller, so it is tested without waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Keys tracked at most; a full table refuses logins for new keys rather
/// than forget budgets (it takes thousands of sources to fill).
pub const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Source(IpAddr),
    User(u64),
}

/// Failure counts in their windows.
#[derive(Debug)]
pub struct LoginLimiter {
    per_minute: u32,
    windows: Mutex<HashMap<Key, (Instant, u32)>>,
}

fn user_key(user: &str) -> Key {
    // FNV-1a: the table holds no user names typed by strangers.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    Key::User(h)
}

impl LoginLimiter {
    /// `per_minute` failures allowed per key.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, windows: Mutex::new(HashMap::new()) }
    }

    /// Whether a login from `source` as `user` may be tried now.
    pub fn allowed(&self, source: IpAddr, user: &str, now: Instant) -> bool {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() >= MAX_KEYS {
            w.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let full = w.len() >= MAX_KEYS;
        [Key::Source(source), user_key(user)].iter().all(|k| match w.get(k) {
            Some(&(start, n)) if now.duration_since(start) < WINDOW => n < self.per_minute,
            Some(_) => {
                w.remove(k);
                true
            }
            None => !full,
        })
    }

    /// Counts a failed login against both keys.
    pub fn failed(&self, source: IpAddr, user: &str, now: Instant) {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() >= MAX_KEYS {
            w.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        for k in [Key::Source(source), user_key(user)] {
            if w.len() >= MAX_KEYS && !w.contains_key(&k) {
                continue;
            }
            let e = w.entry(k).or_insert((now, 0));
            if now.duration_since(e.0) >= WINDOW {
                *e = (now, 0);
            }
            e.1 = e.1.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn sixth_attempt_is_refused_until_the_window_ends() {
        let l = LoginLimiter::new(5);
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(l.allowed(A, "alice", t0), "attempt {}", i + 1);
            l.failed(A, "alice", t0);
        }
        assert!(!l.allowed(A, "alice", t0), "the sixth");
        assert!(!l.allowed(A, "bob", t0), "the source is spent");
        assert!(!l.allowed(B, "alice", t0), "the user is spent");
        assert!(l.allowed(B, "bob", t0));
        assert!(l.allowed(A, "alice", t0 + WINDOW), "a new window");
    }

    #[test]
    fn a_full_table_keeps_old_budgets() {
        let l = LoginLimiter::new(1);
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS as u32) {
            l.failed(IpAddr::from((i + 1).to_be_bytes()), "u", t0);
        }
        assert!(!l.allowed(B, "new", t0), "no room for new keys");
        assert!(l.allowed(B, "new", t0 + WINDOW), "expired windows make room");
    }
}
