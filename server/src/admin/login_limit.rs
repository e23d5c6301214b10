//! Failed-login budgets per source (IPv6 by /64) and per user name: each
//! key may fail `per_minute` times in a fixed one-minute window, then every
//! login with that key is refused until the window ends, right password or
//! not.
//!
//! An attempt is counted when it starts ([`LoginLimiter::begin`]) and given
//! back when it succeeds, so concurrent guesses cannot all pass the check
//! before the first failure is recorded. Pure and clocked by the caller.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Keys tracked at most; when full, expired windows go first, then the
/// oldest (so a flood of new keys cannot lock out everyone).
pub const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Source(IpAddr),
    User(u64),
}

/// Attempt counts in their windows.
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

fn keys(source: IpAddr, user: &str) -> [Key; 2] {
    [Key::Source(crate::limits::source_key(source)), user_key(user)]
}

impl LoginLimiter {
    /// `per_minute` failures allowed per key.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, windows: Mutex::new(HashMap::new()) }
    }

    /// Starts a login from `source` as `user`: `false` (nothing counted)
    /// when either key has spent its budget, else the attempt is counted
    /// against both until [`LoginLimiter::succeeded`] gives it back.
    pub fn begin(&self, source: IpAddr, user: &str, now: Instant) -> bool {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let keys = keys(source, user);
        let spent = keys
            .iter()
            .any(|k| w.get(k).is_some_and(|&(start, n)| now.duration_since(start) < WINDOW && n >= self.per_minute));
        if spent {
            return false;
        }
        for k in keys {
            if !w.contains_key(&k) && w.len() >= MAX_KEYS {
                make_room(&mut w, now);
            }
            let e = w.entry(k).or_insert((now, 0));
            if now.duration_since(e.0) >= WINDOW {
                *e = (now, 0);
            }
            e.1 = e.1.saturating_add(1);
        }
        true
    }

    /// The attempt [`LoginLimiter::begin`] counted was a success.
    pub fn succeeded(&self, source: IpAddr, user: &str) {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys(source, user) {
            if let Some(e) = w.get_mut(&k) {
                e.1 = e.1.saturating_sub(1);
            }
        }
    }
}

/// Drops expired windows, else the oldest one.
fn make_room(w: &mut HashMap<Key, (Instant, u32)>, now: Instant) {
    w.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
    if w.len() >= MAX_KEYS {
        if let Some(oldest) = w.iter().min_by_key(|(_, (start, _))| *start).map(|(k, _)| *k) {
            w.remove(&oldest);
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
            assert!(l.begin(A, "alice", t0), "attempt {}", i + 1);
        }
        assert!(!l.begin(A, "alice", t0), "the sixth");
        assert!(!l.begin(A, "bob", t0), "the source is spent");
        assert!(!l.begin(B, "alice", t0), "the user is spent");
        assert!(l.begin(B, "bob", t0));
        assert!(l.begin(A, "alice", t0 + WINDOW), "a new window");
    }

    #[test]
    fn concurrent_attempts_are_counted_when_they_start_and_successes_given_back() {
        let l = LoginLimiter::new(3);
        let t0 = Instant::now();
        // Three in flight at once: a fourth is refused before any ends.
        assert!(l.begin(A, "alice", t0) && l.begin(A, "alice", t0) && l.begin(A, "alice", t0));
        assert!(!l.begin(A, "alice", t0));
        l.succeeded(A, "alice");
        assert!(l.begin(A, "alice", t0), "a success frees its attempt");
    }

    #[test]
    fn ipv6_sources_count_by_64_and_a_full_table_evicts() {
        let l = LoginLimiter::new(1);
        let t0 = Instant::now();
        assert!(l.begin("2001:db8::1".parse().unwrap(), "u1", t0));
        assert!(!l.begin("2001:db8::2".parse().unwrap(), "u2", t0), "one /64 is one source");
        for i in 0..(MAX_KEYS as u32) {
            l.begin(IpAddr::from((i + 1).to_be_bytes()), &format!("user{i}"), t0 + Duration::from_millis(u64::from(i)));
        }
        let late = t0 + Duration::from_secs(30);
        assert!(l.begin(B, "newcomer", late), "a full table makes room rather than refusing");
        assert!(l.windows.lock().unwrap().len() <= MAX_KEYS);
    }
}
