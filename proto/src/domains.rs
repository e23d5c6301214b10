//! Customers' own domains on a node: which names may be claimed, the TXT
//! record that proves ownership, and what a check's outcome does to a
//! domain's state (verified, lapsing, routed).
//!
//! A domain such as `www.customer.com` is claimed for one node by an
//! operator. It is routed only once `_edge-verify.www.customer.com` serves
//! the value the claim was given; a later check that no longer finds it
//! starts a grace period, after which the domain stops routing until the
//! value is back. Everything here is pure: the server feeds it the result
//! of a DNS lookup and the time.

use serde::{Deserialize, Serialize};

/// Label of the ownership TXT record: `_edge-verify.<domain>`.
pub const VERIFY_LABEL: &str = "_edge-verify";
/// Prefix of every ownership value (the rest is random).
pub const VERIFY_PREFIX: &str = "edge-verify=";
/// Most custom domains one node may hold.
pub const MAX_DOMAINS_PER_NODE: usize = 64;
/// ALPN protocol of the ACME TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Why a name cannot be claimed as a custom domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Not a hostname (characters, label lengths, total length).
    #[error("{0:?} is not a valid hostname")]
    Invalid(String),
    /// A single label (`localhost`, `com`): never a customer's name.
    #[error("{0:?} has one label; a custom domain has at least two (www.example.com)")]
    SingleLabel(String),
    /// A wildcard: ownership is proven per name.
    #[error("{0:?} is a wildcard; claim each name on its own")]
    Wildcard(String),
    /// An IP address literal.
    #[error("{0:?} is an IP address, not a domain")]
    Address(String),
    /// Inside the cluster's own zone, whose names belong to nodes already.
    #[error("{name:?} is inside the cluster zone {zone}; its names belong to nodes")]
    InZone {
        /// The name.
        name: String,
        /// The zone.
        zone: String,
    },
}

/// Validates and lowercases a custom domain for a cluster serving `zone`.
pub fn validate_domain(name: &str, zone: &str) -> Result<String, DomainError> {
    let trimmed = name.trim();
    if trimmed.starts_with("*.") {
        return Err(DomainError::Wildcard(trimmed.to_string()));
    }
    if trimmed.parse::<std::net::IpAddr>().is_ok() {
        return Err(DomainError::Address(trimmed.to_string()));
    }
    let name = crate::names::normalize_hostname(trimmed).ok_or_else(|| DomainError::Invalid(trimmed.to_string()))?;
    // Labels must not start or end with '-' nor carry '_' (hostnames, RFC 1123).
    let host_label = |l: &str| !l.starts_with('-') && !l.ends_with('-') && !l.contains('_');
    if !name.split('.').all(host_label) {
        return Err(DomainError::Invalid(name));
    }
    if !name.contains('.') {
        return Err(DomainError::SingleLabel(name));
    }
    if name.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(DomainError::Address(name));
    }
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    if !zone.is_empty() && (name == zone || name.ends_with(&format!(".{zone}"))) {
        return Err(DomainError::InZone { name, zone });
    }
    Ok(name)
}

/// A domain as an operator names an existing one (`domain remove`,
/// `domain verify`): trimmed, without a trailing dot, lowercase.
pub fn lookup_form(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Where the ownership value is published: `_edge-verify.<domain>`.
pub fn verify_name(domain: &str) -> String {
    format!("{VERIFY_LABEL}.{domain}")
}

/// An ownership value from 16 random bytes: `edge-verify=` and 32 hex digits.
pub fn verify_value(random: [u8; 16]) -> String {
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{VERIFY_PREFIX}{hex}")
}

/// Whether `value` has the form [`verify_value`] makes.
pub fn is_verify_value(value: &str) -> bool {
    value
        .strip_prefix(VERIFY_PREFIX)
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// What one lookup of the ownership record found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The expected value is among the TXT strings.
    Found,
    /// The name answered, without the value (or did not exist).
    Missing(String),
    /// The resolver did not answer usefully (timeout, SERVFAIL): says
    /// nothing about ownership.
    Unreachable(String),
}

impl CheckOutcome {
    /// The outcome of a lookup that returned `values` (each TXT record's
    /// strings joined, as RFC 7208 §3.3 reads long values).
    pub fn of_values(values: &[String], expected: &str) -> Self {
        if values.iter().any(|v| v == expected) {
            CheckOutcome::Found
        } else if values.is_empty() {
            CheckOutcome::Missing("no TXT record".into())
        } else {
            CheckOutcome::Missing(format!("{} TXT value(s), none is the expected one", values.len()))
        }
    }
}

/// How long things take, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckPolicy {
    /// Between checks of a domain not verified yet.
    pub pending_interval_secs: i64,
    /// Between re-checks of a verified domain.
    pub recheck_interval_secs: i64,
    /// How long a verified domain keeps routing after its value went
    /// missing.
    pub grace_secs: i64,
}

/// A domain's verification state as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyState {
    /// Unix seconds of the last check that found the value.
    pub verified_at: Option<i64>,
    /// Unix seconds of the last check of any outcome.
    pub checked_at: Option<i64>,
    /// Unix seconds of the first check that missed the value since it was
    /// last found (`None` while it is found).
    pub failing_since: Option<i64>,
    /// What the last check that did not find the value saw.
    pub last_error: Option<String>,
    /// Whether the servers route the domain.
    pub routed: bool,
}

impl VerifyState {
    /// The state after a check at `now`. A found value routes at once; a
    /// missing one stops routing once `grace_secs` have passed since it
    /// first went missing (never-verified domains do not route at all); an
    /// unreachable resolver changes nothing but the error shown, except
    /// that the grace period runs out all the same.
    pub fn after(&self, outcome: &CheckOutcome, now: i64, policy: &CheckPolicy) -> Self {
        let mut next = self.clone();
        next.checked_at = Some(now);
        match outcome {
            CheckOutcome::Found => {
                next.verified_at = Some(now);
                next.failing_since = None;
                next.last_error = None;
                next.routed = true;
            }
            CheckOutcome::Missing(why) => {
                next.last_error = Some(why.clone());
                if self.verified_at.is_some() {
                    let since = *next.failing_since.get_or_insert(now);
                    next.routed = self.routed && now - since < policy.grace_secs;
                } else {
                    next.routed = false;
                }
            }
            CheckOutcome::Unreachable(why) => {
                next.last_error = Some(why.clone());
                if let Some(since) = self.failing_since {
                    next.routed = self.routed && now - since < policy.grace_secs;
                }
            }
        }
        next
    }

    /// Whether a check is due at `now`: never-checked at once, pending and
    /// failing domains every `pending_interval_secs`, verified ones every
    /// `recheck_interval_secs`.
    pub fn check_due(&self, now: i64, policy: &CheckPolicy) -> bool {
        let Some(checked) = self.checked_at else { return true };
        let interval = if self.verified_at.is_some() && self.failing_since.is_none() && self.last_error.is_none() {
            policy.recheck_interval_secs
        } else {
            policy.pending_interval_secs
        };
        now - checked >= interval
    }

    /// A word for operators: `pending`, `verified`, `lapsing` (missing,
    /// still routed within the grace period) or `lapsed`.
    pub fn status(&self) -> DomainStatus {
        match (self.verified_at, self.routed, self.failing_since) {
            (_, true, None) => DomainStatus::Verified,
            (_, true, Some(_)) => DomainStatus::Lapsing,
            (Some(_), false, _) => DomainStatus::Lapsed,
            (None, false, _) => DomainStatus::Pending,
        }
    }
}

/// A domain's state in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainStatus {
    /// Never verified: not routed.
    Pending,
    /// Verified and routed.
    Verified,
    /// Verified before, missing now, still routed within the grace period.
    Lapsing,
    /// Verified before, missing for longer than the grace period: not routed.
    Lapsed,
}

impl DomainStatus {
    /// The word as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainStatus::Pending => "pending",
            DomainStatus::Verified => "verified",
            DomainStatus::Lapsing => "lapsing",
            DomainStatus::Lapsed => "lapsed",
        }
    }
}

impl std::fmt::Display for DomainStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A custom domain as the CLI and the admin API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainView {
    /// The domain, lowercase.
    pub name: String,
    /// The node that holds it.
    pub node: String,
    /// Where to publish the ownership value (`_edge-verify.<name>`).
    pub verify_name: String,
    /// The TXT value to publish there.
    pub verify_value: String,
    /// What the domain should be a CNAME of (the node's name in the zone).
    pub cname_target: String,
    /// Unix seconds.
    pub created_at: i64,
    /// `pending`, `verified`, `lapsing` or `lapsed`.
    pub status: DomainStatus,
    /// The verification state.
    #[serde(flatten)]
    pub state: VerifyState,
}

/// Body of `POST /api/v1/domains`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDomain {
    /// The domain.
    pub name: String,
    /// The node that is to serve it.
    pub node: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: CheckPolicy = CheckPolicy { pending_interval_secs: 30, recheck_interval_secs: 3600, grace_secs: 100 };

    #[test]
    fn domains_are_validated() {
        assert_eq!(validate_domain("WWW.Customer.com.", "edge.test").unwrap(), "www.customer.com");
        assert_eq!(validate_domain("customer.com", "edge.test").unwrap(), "customer.com");
        let bad = [
            ("*.customer.com", "Wildcard"),
            ("localhost", "SingleLabel"),
            ("127.0.0.1", "Address"),
            ("::1", "Address"),
            ("1.2.3.4.5", "Address"),
            ("a b.com", "Invalid"),
            ("-a.com", "Invalid"),
            ("a_b.com", "Invalid"),
            ("", "Invalid"),
            ("edge.test", "InZone"),
            ("web1.edge.test", "InZone"),
            ("x.web1.EDGE.test", "InZone"),
        ];
        for (name, kind) in bad {
            let e = validate_domain(name, "edge.test").unwrap_err();
            assert!(format!("{e:?}").starts_with(kind), "{name:?}: {e:?}");
        }
        assert!(validate_domain("notedge.test", "edge.test").is_ok(), "a suffix that is not a label boundary");
        assert_eq!(lookup_form(" WWW.C.com. "), "www.c.com");
    }

    #[test]
    fn values_have_one_form() {
        let v = verify_value([0xab; 16]);
        assert_eq!(v, format!("edge-verify={}", "ab".repeat(16)));
        assert!(is_verify_value(&v));
        for bad in ["", "edge-verify=", "edge-verify=AB", &format!("x{v}"), &format!("{v}0")] {
            assert!(!is_verify_value(bad), "{bad:?}");
        }
        assert_eq!(verify_name("www.c.com"), "_edge-verify.www.c.com");
    }

    #[test]
    fn outcome_of_values() {
        let want = "edge-verify=1";
        assert_eq!(CheckOutcome::of_values(&["a".into(), want.into()], want), CheckOutcome::Found);
        assert!(matches!(CheckOutcome::of_values(&[], want), CheckOutcome::Missing(_)));
        assert!(matches!(CheckOutcome::of_values(&["edge-verify=2".into()], want), CheckOutcome::Missing(_)));
    }

    #[test]
    fn pending_domains_route_only_once_found() {
        let s = VerifyState::default();
        assert_eq!(s.status(), DomainStatus::Pending);
        let s = s.after(&CheckOutcome::Missing("none".into()), 10, &POLICY);
        assert!(!s.routed && s.verified_at.is_none() && s.failing_since.is_none());
        assert_eq!(s.status(), DomainStatus::Pending);
        let s = s.after(&CheckOutcome::Unreachable("timeout".into()), 20, &POLICY);
        assert!(!s.routed);
        let s = s.after(&CheckOutcome::Found, 30, &POLICY);
        assert!(s.routed && s.verified_at == Some(30) && s.last_error.is_none());
        assert_eq!(s.status(), DomainStatus::Verified);
    }

    #[test]
    fn a_lapse_stops_routing_after_the_grace_period() {
        let s = VerifyState::default().after(&CheckOutcome::Found, 0, &POLICY);
        let s = s.after(&CheckOutcome::Missing("gone".into()), 50, &POLICY);
        assert!(s.routed && s.failing_since == Some(50));
        assert_eq!(s.status(), DomainStatus::Lapsing);
        let s = s.after(&CheckOutcome::Unreachable("timeout".into()), 120, &POLICY);
        assert!(s.routed, "70 s into a 100 s grace period");
        let s = s.after(&CheckOutcome::Missing("gone".into()), 149, &POLICY);
        assert!(s.routed && s.failing_since == Some(50), "the lapse is timed from its first miss");
        let s = s.after(&CheckOutcome::Unreachable("timeout".into()), 150, &POLICY);
        assert!(!s.routed, "an unreachable resolver does not extend the grace period");
        assert_eq!(s.status(), DomainStatus::Lapsed);
        let s = s.after(&CheckOutcome::Missing("gone".into()), 160, &POLICY);
        assert!(!s.routed, "a lapsed domain stays unrouted");
        let s = s.after(&CheckOutcome::Found, 170, &POLICY);
        assert!(s.routed && s.failing_since.is_none());
    }

    #[test]
    fn an_unreachable_resolver_never_unroutes_a_verified_domain_alone() {
        let s = VerifyState::default().after(&CheckOutcome::Found, 0, &POLICY);
        let s = s.after(&CheckOutcome::Unreachable("timeout".into()), 1_000_000, &POLICY);
        assert!(s.routed && s.last_error.is_some());
    }

    #[test]
    fn checks_fall_due() {
        let s = VerifyState::default();
        assert!(s.check_due(0, &POLICY));
        let s = s.after(&CheckOutcome::Missing("none".into()), 0, &POLICY);
        assert!(!s.check_due(29, &POLICY) && s.check_due(30, &POLICY));
        let s = s.after(&CheckOutcome::Found, 30, &POLICY);
        assert!(!s.check_due(30 + 3599, &POLICY) && s.check_due(30 + 3600, &POLICY));
        let s = s.after(&CheckOutcome::Unreachable("x".into()), 4000, &POLICY);
        assert!(s.check_due(4030, &POLICY), "a failed re-check is retried at the pending pace");
    }

    #[test]
    fn views_serialize_flat() {
        let view = DomainView {
            name: "www.c.com".into(),
            node: "web1".into(),
            verify_name: verify_name("www.c.com"),
            verify_value: verify_value([1; 16]),
            cname_target: "web1.edge.test".into(),
            created_at: 1,
            status: DomainStatus::Pending,
            state: VerifyState::default(),
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["status"], "pending");
        assert_eq!(json["routed"], false);
        assert_eq!(serde_json::from_value::<DomainView>(json).unwrap(), view);
    }
}
