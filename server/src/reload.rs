//! Reloading the config file without a restart (SIGHUP, `edge-server
//! reload`).
//!
//! [`plan`] compares the running config with the new one, section by
//! section: what can change under a running server (limits, modes, the
//! static records of `[dns]`, `[acme]`, the log filter) is applied to new
//! work; connections and tunnels stay. What cannot (listeners, the store,
//! the identity, the zone...) is reported as needing a restart and keeps
//! its running value. A file that does not parse or validate is refused as
//! a whole before anything is applied.

use std::sync::{Arc, Mutex};

use crate::certificates::CertService;
use crate::config::ServerConfig;
use crate::Shared;

/// A section of the config, as [`plan`] sorts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `[limits]`: applied.
    Limits,
    /// `[modes]`: applied.
    Modes,
    /// `dns.records`: applied.
    DnsRecords,
    /// `[acme]`: applied to new orders.
    Acme,
    /// `log_filter`: applied.
    LogFilter,
    /// Anything else that differs: needs a restart. The name says which.
    Restart(&'static str),
}

impl Section {
    /// The config field, for logs.
    pub fn field(self) -> &'static str {
        match self {
            Section::Limits => "limits",
            Section::Modes => "modes",
            Section::DnsRecords => "dns.records",
            Section::Acme => "acme",
            Section::LogFilter => "log_filter",
            Section::Restart(f) => f,
        }
    }
}

fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    // Every config type derives Debug (secrets masked, and compared apart).
    format!("{a:?}") != format!("{b:?}")
}

/// What differs between the running config and a new one.
pub fn plan(old: &ServerConfig, new: &ServerConfig) -> Vec<Section> {
    let mut out = Vec::new();
    let restart: [(&'static str, bool); 13] = [
        ("zone", old.zone != new.zone),
        ("data_dir", old.data_dir != new.data_dir),
        ("store", differs(&old.store, &new.store)),
        ("listen", differs(&old.listen, &new.listen)),
        ("public", differs(&old.public, &new.public)),
        ("identity", differs(&old.identity, &new.identity)),
        ("admin_token", old.admin_token.as_ref().map(|t| &t.0) != new.admin_token.as_ref().map(|t| &t.0)),
        ("tunnel", differs(&old.tunnel, &new.tunnel)),
        ("runtime", old.runtime != new.runtime),
        ("log_format", old.log_format != new.log_format),
        ("cluster", differs(&old.cluster, &new.cluster)),
        ("admin", differs(&old.admin, &new.admin)),
        ("dns", old.dns.is_some() != new.dns.is_some() || dns_settings_differ(old, new)),
    ];
    out.extend(restart.iter().filter(|(_, d)| *d).map(|(f, _)| Section::Restart(f)));
    if differs(&old.limits, &new.limits) {
        out.push(Section::Limits);
    }
    if differs(&old.modes, &new.modes) {
        out.push(Section::Modes);
    }
    if let (Some(a), Some(b)) = (&old.dns, &new.dns) {
        if differs(&a.records, &b.records) {
            out.push(Section::DnsRecords);
        }
    }
    if differs(&old.acme, &new.acme) {
        out.push(Section::Acme);
    }
    if old.log_filter != new.log_filter {
        out.push(Section::LogFilter);
    }
    out
}

/// Whether `[dns]` differs in anything but its records.
fn dns_settings_differ(old: &ServerConfig, new: &ServerConfig) -> bool {
    match (&old.dns, &new.dns) {
        (Some(a), Some(b)) => {
            let (mut a, mut b) = (a.clone(), b.clone());
            a.records.clear();
            b.records.clear();
            differs(&a, &b)
        }
        _ => false,
    }
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Fields applied to new work.
    pub applied: Vec<&'static str>,
    /// Fields that differ but keep their running value until a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Applies reloaded configs to a running server.
#[derive(Debug)]
pub struct Reloader {
    shared: Arc<Shared>,
    certs: Arc<crate::api::ApiState>,
    reserved: crate::admin::ops::ReservedLabels,
    current: Mutex<ServerConfig>,
}

impl Reloader {
    /// For the server whose state is `shared`; `reserved` are the labels
    /// the admin operations keep from nodes.
    pub fn new(
        shared: Arc<Shared>,
        certs: Arc<crate::api::ApiState>,
        reserved: crate::admin::ops::ReservedLabels,
    ) -> Self {
        let current = Mutex::new(shared.config.clone());
        Self { shared, certs, reserved, current }
    }

    fn certs(&self) -> &CertService {
        &self.certs.certs
    }

    /// Applies `new` (already parsed and validated) and logs what changed.
    pub fn apply(&self, new: ServerConfig) -> Outcome {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut outcome = Outcome::default();
        for section in plan(&current, &new) {
            match section {
                Section::Restart(field) => {
                    tracing::warn!(field, "config change needs a restart; the running value stays in force");
                    outcome.needs_restart.push(field);
                    continue;
                }
                Section::Limits => {
                    let (old, l) = (&current.limits, &new.limits);
                    self.shared.admission.apply(l);
                    if old.auth_failures_per_minute != l.auth_failures_per_minute {
                        self.shared.auth_failures.set(l.auth_failures_per_minute, l.source_table_size);
                    }
                    // The metrics cache keeps its budget until a restart.
                    for (field, changed) in [
                        ("limits.metrics_rate", old.metrics_rate != l.metrics_rate),
                        ("limits.metrics_cache_ms", old.metrics_cache_ms != l.metrics_cache_ms),
                    ] {
                        if changed {
                            tracing::warn!(field, "config change needs a restart; the running value stays in force");
                            outcome.needs_restart.push(field);
                        }
                    }
                    let (metrics_rate, metrics_cache_ms) = (old.metrics_rate, old.metrics_cache_ms);
                    current.limits = new.limits.clone();
                    current.limits.metrics_rate = metrics_rate;
                    current.limits.metrics_cache_ms = metrics_cache_ms;
                }
                Section::Modes => current.modes = new.modes.clone(),
                Section::DnsRecords => {
                    let (Some(zone), Some(dns)) = (self.certs().zone(), &new.dns) else { continue };
                    if let Err(e) = zone.set_configured(dns, new.zone.as_str()) {
                        tracing::error!(error = %e, "dns.records not applied");
                        continue;
                    }
                    if let Some(d) = current.dns.as_mut() {
                        d.records = dns.records.clone();
                    }
                    self.reserved.set(&current);
                }
                Section::Acme => {
                    self.certs().set_acme(crate::certificates::acme_client(&new, self.shared.store.clone()));
                    current.acme = new.acme.clone();
                }
                Section::LogFilter => {
                    match edge_net::logging::set_filter(new.log_filter.as_deref().unwrap_or("info")) {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!("log_filter changed, but RUST_LOG is set and takes precedence"),
                        Err(e) => {
                            tracing::error!(error = %e, "log_filter not applied");
                            continue;
                        }
                    }
                    current.log_filter = new.log_filter.clone();
                }
            }
            outcome.applied.push(section.field());
        }
        self.shared.live.set(&current);
        tracing::info!(applied = ?outcome.applied, needs_restart = ?outcome.needs_restart, "config reloaded");
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "zone = \"edge.test\"\ndata_dir = \"/tmp/x\"\n";

    fn parse(extra: &str) -> ServerConfig {
        ServerConfig::parse(&format!("{BASE}{extra}"), "t").unwrap()
    }

    #[test]
    fn sections_are_sorted_into_applied_and_restart() {
        let a = parse("[limits]\nper_source_rate = 100\n");
        assert_eq!(plan(&a, &a), vec![]);
        let b = parse("log_filter = \"debug\"\n[limits]\nper_source_rate = 5\n");
        assert_eq!(plan(&a, &b), vec![Section::Limits, Section::LogFilter]);
        let c = parse("[listen]\ntls = \"127.0.0.1:8443\"\n[limits]\nper_source_rate = 100\n");
        assert_eq!(plan(&a, &c), vec![Section::Restart("listen")]);
        let d = parse("admin_token = \"0123456789abcdef0123\"\n[limits]\nper_source_rate = 100\n");
        assert_eq!(plan(&a, &d), vec![Section::Restart("admin_token")], "a masked secret still compares");
    }

    #[test]
    fn dns_records_apply_but_dns_settings_need_a_restart() {
        let dns = "[dns]\nlisten = \"127.0.0.1:5353\"\naddresses = [\"192.0.2.1\"]\n";
        let a = parse(dns);
        let b = parse(&format!("{dns}[[dns.records]]\nname = \"www\"\ntype = \"A\"\nvalue = \"192.0.2.9\"\n"));
        assert_eq!(plan(&a, &b), vec![Section::DnsRecords]);
        let c = parse("[dns]\nlisten = \"127.0.0.1:5354\"\naddresses = [\"192.0.2.1\"]\n");
        assert_eq!(plan(&a, &c), vec![Section::Restart("dns")]);
    }

    #[test]
    fn reserved_labels_follow_a_reloaded_dns_records() {
        let dns = "[dns]\nlisten = \"127.0.0.1:5353\"\naddresses = [\"192.0.2.1\"]\n";
        let a = parse(dns);
        let b = parse(&format!("{dns}[[dns.records]]\nname = \"www\"\ntype = \"A\"\nvalue = \"192.0.2.9\"\n"));
        let reserved = crate::admin::ops::ReservedLabels::from_config(&a);
        assert!(!reserved.contains("www"));
        reserved.set(&b);
        assert!(reserved.contains("www"), "a node may not take a name reloaded into dns.records");
        assert!(reserved.contains("ns"), "nor the default nameserver's");
    }
}
