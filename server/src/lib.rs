//! `edge-server`: accepts public TLS, reads only the SNI, and splices the raw
//! bytes over QUIC tunnels to the agent of the node that owns the name.
//!
//! Entry point: [`Server::bind`] then [`BoundServer::run`] with a
//! cancellation token; the binary in `main.rs` is a thin CLI around it.
//!
//! Data flows one way: [`store`] → [`sync`] → [`registry`] and the zone
//! ([`dns`]) → the listeners.
//!
//! - [`config`]: TOML configuration and validation.
//! - [`cluster`]: servers sharing one store: membership leases, forwarding
//!   to a peer that has the node's tunnel, and the one mode decider.
//! - [`store`]: persistent state (SQLite or PostgreSQL) behind one trait,
//!   with a change feed.
//! - [`sync`]: applies the store's state and changes to the registry and the
//!   zone; [`jobs`]: the change feed, status flush and TXT expiry jobs.
//! - [`state`]: what the tasks share; [`server`]: bind and run.
//! - [`registry`]: in-memory routes and live tunnels.
//! - [`ingress`]: the TLS listener and the splice to agents.
//! - [`sni`]: reading the ClientHello under a cap.
//! - [`tunnel`]: the QUIC listener and agent sessions.
//! - [`api`]: the signal API, health and metrics over HTTPS.
//! - [`scrape`]: `/metrics` rendered once per second, budgeted per source.
//! - [`metrics`]: counters and their Prometheus rendering.
//! - [`identity`]: the server certificate agents pin.
//! - [`dns`]: authoritative DNS for the zone (hickory-server).
//! - [`certificates`]: DNS-01 challenges and the CSR flow for nodes;
//!   [`tls_alpn`]: TLS-ALPN-01 answers relayed to a node's agents.
//! - [`modes`], [`detector`]: direct/proxy mode from verified probes;
//!   [`endpoints`]: which endpoints may be probed at all; [`self_loop`]:
//!   refusing our own connections that come back to us.
//! - [`http`]: plain HTTP on :80 (redirects, Host-routed proxying).
//! - [`domains`]: customers' own domains: ownership checks by TXT lookup.
//! - [`access`]: access policies in force, checked by every listener.
//! - [`services`]: raw TCP services, one listener each, spliced to agents.
//! - [`limits`]: per-source rates, connection caps, refusal counting.
//! - [`upgrade`]: zero-downtime upgrade: a successor process takes over the
//!   sockets while this one drains.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod api;
pub mod certificates;
pub mod cluster;
pub mod config;
pub mod detector;
pub mod dns;
pub mod domains;
pub mod endpoints;
pub mod http;
pub mod identity;
pub mod ingress;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod modes;
pub mod quic_clients;
pub mod registry;
pub mod reload;
pub mod scrape;
pub mod self_loop;
pub mod server;
pub mod services;
pub mod sni;
pub mod state;
pub mod store;
pub mod sync;
pub mod tls_alpn;
pub mod tunnel;
pub mod upgrade;

use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

pub use server::{listening_file, BoundAddrs, BoundServer, Server, ServerError};
pub use state::Shared;

/// SHA-256 of a bearer token, the only form in which tokens are stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
