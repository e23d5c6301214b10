//! Sans-IO protocol core shared by `edge-server` and `edge-agent`.
//!
//! Nothing in this crate touches a socket or a clock: parsers take bytes and
//! return a verdict, so every path is tested exhaustively without a network.
//!
//! - [`client_hello`]: reads the SNI out of a TLS ClientHello as bytes arrive
//!   (incomplete / rejected / found).
//! - [`quic_initial`]: reads the SNI out of a QUIC client's Initial packets
//!   (public keys, RFC 9001 §5.2), for HTTP/3 passed through by name.
//! - [`quic_route`]: which tunnel a QUIC client's datagram goes to: first
//!   flights by SNI, later packets by the route prefix of their
//!   connection ID, with bounded state.
//! - [`tunnel`]: the wire protocol spoken over the QUIC tunnel between server
//!   and agent (ALPN, control messages, per-connection stream header).
//! - [`alt_svc`]: the `Alt-Svc` header the agent adds to the first HTTP/1.x
//!   response of a connection to advertise HTTP/3.
//! - [`proxy_v2`]: PROXY protocol v2 headers sent from the agent to upstreams.
//! - [`join`]: the one-line join string an operator hands to an agent.
//! - [`names`]: DNS name rules shared by routing and the node registry.
//! - [`probe`]: the nonce/answer proof that a probed endpoint is the node.
//! - [`dns_zone`]: the cluster DNS zone as data, and the answer to one
//!   question about it.
//! - [`routes`]: a node's routes by hostname, their upstreams' health as
//!   reported to the server, and the answers when a route cannot serve.
//! - [`signal`]: the signal API's JSON request bodies.
//! - [`access`]: allow/deny rules over client CIDRs for nodes, hostnames
//!   and TCP services.
//! - [`domains`]: customers' own domains: which names may be claimed, the
//!   ownership TXT record, and what a check does to a domain's state.
//! - [`admin`]: the admin API's (`/api/v1`) request, response and error bodies.
//! - [`handover`]: the zero-downtime upgrade between a running server and its
//!   successor, and the control socket `edge-server upgrade` talks to.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod alt_svc;
pub mod client_hello;
pub mod dns_zone;
pub mod domains;
pub mod handover;
pub mod join;
pub mod names;
pub mod probe;
pub mod proxy_v2;
pub mod quic_datagram;
pub mod quic_initial;
pub mod quic_route;
pub mod routes;
pub mod signal;
pub mod tunnel;
