//! Real DNS queries with `dig` (from Debian's bind9-dnsutils), UDP or TCP.

use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context, Result};

/// What `dig` saw.
#[derive(Debug, Clone)]
pub struct DigAnswer {
    /// `NOERROR`, `NXDOMAIN`, `REFUSED`, ...
    pub status: String,
    /// Whether the AA flag was set.
    pub authoritative: bool,
    /// Answer section: `(name, ttl, type, data)`.
    pub answers: Vec<(String, u32, String, String)>,
    /// Authority section, same shape.
    pub authority: Vec<(String, u32, String, String)>,
}

impl DigAnswer {
    /// Data of the answers of one type.
    pub fn data(&self, rtype: &str) -> Vec<String> {
        self.answers.iter().filter(|a| a.2 == rtype).map(|a| a.3.clone()).collect()
    }
}

/// Asks `server` for `name`/`rtype`, over TCP when `tcp`.
pub fn dig(server: SocketAddr, name: &str, rtype: &str, tcp: bool) -> Result<DigAnswer> {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+norecurse", "+time=2", "+tries=2", "+nocookie"])
        .arg(if tcp { "+tcp" } else { "+notcp" })
        .args([name, rtype]);
    let out = cmd.output().context("running dig (install bind9-dnsutils)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(str::to_string)
        .with_context(|| format!("no answer from {server}: {text}"))?;
    let authoritative =
        text.lines().any(|l| l.starts_with(";; flags:") && l.split(';').nth(2).is_some_and(|f| f.contains(" aa")));
    let section = |title: &str| -> Vec<(String, u32, String, String)> {
        let mut rows = Vec::new();
        let mut inside = false;
        for line in text.lines() {
            if line.starts_with(";; ") && line.ends_with("SECTION:") {
                inside = line.contains(title);
                continue;
            }
            if inside {
                if line.trim().is_empty() {
                    inside = false;
                    continue;
                }
                let parts: Vec<&str> = line.split_whitespace().collect();
                if parts.len() >= 5 {
                    let data = parts[4..].join(" ").trim_matches('"').to_string();
                    rows.push((parts[0].to_string(), parts[1].parse().unwrap_or(0), parts[3].to_string(), data));
                }
            }
        }
        rows
    };
    Ok(DigAnswer { status, authoritative, answers: section("ANSWER"), authority: section("AUTHORITY") })
}
