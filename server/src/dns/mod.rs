//! Authoritative DNS for the cluster zone, on hickory-server (UDP and TCP).
//!
//! [`edge_proto::dns_zone`] holds the data and the answering rules (sans-IO); this module
//! builds the zone from the config and the server's state, swaps in a new
//! snapshot on every change, and answers queries from the current one.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::caa::KeyValue;
use hickory_proto::rr::rdata::{A, AAAA, CAA, TXT};
use hickory_proto::rr::{Name, RData, Record};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::config::{CaaValue, DnsConfig, StaticKind};
use crate::store::StaticRecord as StoreRecord;
use edge_proto::dns_zone::{NodeAddresses, Zone, ZoneSettings};

pub mod query;

/// The static records of `[dns]`, validated (the error names the field).
fn configured_records(dns: &DnsConfig, zone: &str) -> Result<Vec<Record>, String> {
    let mut statics = Vec::new();
    for (i, r) in dns.records.iter().enumerate() {
        let record = static_record(&DnsConfig::absolute(&r.name, zone), r.kind, &r.value, r.ttl_secs)
            .map_err(|_| format!("dns.records[{i}].value = {:?}", r.value))?;
        statics.push(record);
    }
    Ok(statics)
}

/// The current zone snapshot, swapped as a whole on every change; waiters
/// can watch for a state (a TXT value served).
#[derive(Debug)]
pub struct ZoneCell {
    current: tokio::sync::watch::Sender<Arc<Zone>>,
    /// Static records from `[dns]` and the stored ones last set, merged
    /// under one lock (a reload and a store change can come at once).
    statics: std::sync::Mutex<(Vec<Record>, Vec<StoreRecord>)>,
}

impl ZoneCell {
    /// The zone from the config, with no nodes yet; `caa_issuers` are the
    /// CAs published at the apex (see [`crate::config::AcmeConfig::caa_issuers`]).
    pub fn from_config(dns: &DnsConfig, zone: &str, tls: SocketAddr, caa_issuers: &[String]) -> Result<Self, String> {
        let origin = fqdn(zone)?;
        let nameservers = if dns.nameservers.is_empty() {
            vec![fqdn(&format!("ns.{zone}"))?]
        } else {
            dns.nameservers.iter().map(|n| fqdn(n)).collect::<Result<_, _>>()?
        };
        let hostmaster = fqdn(dns.hostmaster.as_deref().unwrap_or(&format!("hostmaster.{zone}")))?;
        let settings = ZoneSettings {
            nameservers,
            hostmaster,
            address_ttl: dns.address_ttl_secs,
            txt_ttl: dns.txt_ttl_secs,
            zone_ttl: dns.zone_ttl_secs,
            negative_ttl: dns.negative_ttl_secs,
            caa_issuers: caa_issuers.iter().map(|ca| fqdn(ca)).collect::<Result<_, _>>()?,
        };
        let statics = configured_records(dns, zone)?;
        let zone = Zone::new(origin, settings, dns.ingress_addresses(tls), statics.clone());
        Ok(Self {
            current: tokio::sync::watch::Sender::new(Arc::new(zone)),
            statics: std::sync::Mutex::new((statics, Vec::new())),
        })
    }

    /// Replaces the records from `[dns]` (a reload); the stored ones stay.
    pub fn set_configured(&self, dns: &DnsConfig, zone: &str) -> Result<(), String> {
        let configured = configured_records(dns, zone)?;
        let mut statics = self.statics.lock().unwrap_or_else(|p| p.into_inner());
        statics.0 = configured;
        self.publish_statics(&statics);
        Ok(())
    }

    /// Replaces the records kept in the store (the configured ones stay).
    pub fn set_stored_records(&self, records: &[StoreRecord]) {
        let mut statics = self.statics.lock().unwrap_or_else(|p| p.into_inner());
        statics.1 = records.to_vec();
        self.publish_statics(&statics);
    }

    /// Publishes configured and stored records together. A stored record
    /// that no longer converts (edited in the database by hand) is skipped
    /// with a warning.
    fn publish_statics(&self, (configured, stored): &(Vec<Record>, Vec<StoreRecord>)) {
        let mut statics = configured.clone();
        for r in stored {
            match static_record(&r.name, r.kind, &r.value, r.ttl_secs) {
                Ok(record) => statics.push(record),
                Err(e) => tracing::warn!(name = %edge_net::logging::Untrusted(&r.name), error = %e,
                    "skipping a stored DNS record that is not valid"),
            }
        }
        self.current.send_modify(|zone| *zone = Arc::new(zone.with_statics(statics)));
    }

    /// The snapshot answering queries now.
    pub fn current(&self) -> Arc<Zone> {
        self.current.borrow().clone()
    }

    /// Replaces the dynamic content (at start and after a resync): node
    /// names with their own address (direct mode) or `None` (the cluster's
    /// addresses), challenge values per node, and the serial.
    pub fn update(&self, serial: u32, nodes: &[(String, Option<IpAddr>)], challenges: HashMap<String, Vec<String>>) {
        self.current.send_modify(|zone| {
            let nodes: HashMap<String, NodeAddresses> =
                nodes.iter().map(|(n, own)| (n.clone(), node_addresses(*own))).collect();
            *zone = Arc::new(zone.with_state(serial, nodes, challenges));
        });
    }

    /// Takes the live servers' nameservers, glue and ingress addresses
    /// (proxied nodes answer every live server). `None` keeps what the
    /// zone has (no live server declared an address).
    pub fn set_servers(&self, revision: Option<i64>, servers: Option<&crate::cluster::ZoneServers>) {
        let Some(servers) = servers else { return };
        let names: Result<Vec<Name>, String> = servers.nameservers.iter().map(|n| fqdn(n)).collect();
        let glue: Result<HashMap<Name, Vec<IpAddr>>, String> =
            servers.glue.iter().map(|(n, a)| fqdn(n).map(|n| (n, a.clone()))).collect();
        let (Ok(names), Ok(glue)) = (names, glue) else {
            tracing::warn!("a live server declared a nameserver name that is not a DNS name; keeping the zone's");
            return;
        };
        self.current.send_if_modified(|zone| {
            let same =
                zone.cluster_addresses() == servers.addresses.as_slice() && zone.nameservers() == names.as_slice();
            let serial =
                if same { next_serial_at_least(zone.serial(), revision) } else { next_serial(zone.serial(), revision) };
            if same && serial == zone.serial() {
                return false;
            }
            *zone = Arc::new(zone.with_servers(serial, names.clone(), glue.clone(), servers.addresses.clone()));
            true
        });
    }

    /// Applies a batch of changes: nodes set (`Some(own address or None
    /// for the cluster's)`) or removed (`None`), and nodes' TXT values
    /// replaced. The serial moves with every batch: to the store's
    /// `revision` when that is ahead (so it survives restarts), else by one
    /// (a change made in memory, the store unreachable or not yet caught up).
    pub fn edit(
        &self,
        revision: Option<i64>,
        nodes: Vec<(String, Option<Option<IpAddr>>)>,
        challenges: Vec<(String, Vec<String>)>,
    ) {
        self.current.send_if_modified(|zone| {
            let nodes: Vec<(String, Option<NodeAddresses>)> =
                nodes.into_iter().map(|(n, set)| (n, set.map(node_addresses))).collect();
            // An edit made in memory that changes nothing keeps the serial:
            // servers of a cluster agree on it for the same content.
            let unchanged = nodes.iter().all(|(n, set)| zone.node_addresses(n) == set.as_ref())
                && challenges.iter().all(|(n, values)| zone.challenge_values(n) == values.as_slice());
            if unchanged && revision.is_none_or(|r| r <= i64::from(zone.serial())) {
                return false;
            }
            let serial = if unchanged {
                next_serial_at_least(zone.serial(), revision)
            } else {
                next_serial(zone.serial(), revision)
            };
            *zone = Arc::new(zone.edited(serial, nodes, challenges));
            true
        });
    }

    /// Publishes HTTPS records for `nodes` (those that serve HTTP/3 through
    /// this server now), with `port` when the QUIC listener's port is not
    /// the TLS port.
    pub fn set_http3(&self, nodes: &BTreeSet<String>, port: Option<u16>) {
        self.current.send_modify(|zone| {
            *zone = Arc::new(zone.with_http3(nodes.iter().cloned().collect(), port));
        });
    }

    /// Waits up to `limit` for the zone to satisfy `ready`.
    pub async fn wait_for(&self, limit: Duration, ready: impl FnMut(&Arc<Zone>) -> bool) -> bool {
        let mut rx = self.current.subscribe();
        let ready = matches!(tokio::time::timeout(limit, rx.wait_for(ready)).await, Ok(Ok(_)));
        ready
    }
}

/// What a node's names answer: its own address, or the cluster's.
fn node_addresses(own: Option<IpAddr>) -> NodeAddresses {
    own.map_or(NodeAddresses::Cluster, |ip| NodeAddresses::Own(vec![ip]))
}

/// `current`, or the store's revision when that is ahead (nothing changed
/// in the content, but the serial follows the revision).
fn next_serial_at_least(current: u32, revision: Option<i64>) -> u32 {
    match revision.map(|r| r.clamp(0, u32::MAX as i64) as u32) {
        Some(r) if r > current => r,
        _ => current,
    }
}

/// The serial after a change: the store's revision when it is ahead, else
/// one more than now.
pub fn next_serial(current: u32, revision: Option<i64>) -> u32 {
    match revision.map(|r| r.clamp(0, u32::MAX as i64) as u32) {
        Some(r) if r > current => r,
        _ => current.wrapping_add(1).max(1),
    }
}

/// One static record as DNS data: `name` absolute (no trailing dot).
pub fn static_record(name: &str, kind: StaticKind, value: &str, ttl: u32) -> Result<Record, String> {
    let owner = fqdn(name)?;
    let bad = || format!("{value:?} is not a valid {kind} value");
    let data = match kind {
        StaticKind::A => RData::A(A(value.parse().map_err(|_| bad())?)),
        StaticKind::AAAA => RData::AAAA(AAAA(value.parse().map_err(|_| bad())?)),
        StaticKind::TXT => RData::TXT(TXT::new(vec![value.to_string()])),
        StaticKind::CAA => {
            let v = CaaValue::parse(value).ok_or_else(bad)?;
            // On the wire without the root dot (RFC 8659 section 4.2).
            let issuer = v.issuer.as_deref().map(Name::from_ascii).transpose().map_err(|_| bad())?;
            let parameters = v.parameters.iter().map(|(k, val)| KeyValue::new(k.as_str(), val.as_str())).collect();
            RData::CAA(if v.wildcard {
                CAA::new_issuewild(v.critical, issuer, parameters)
            } else {
                CAA::new_issue(v.critical, issuer, parameters)
            })
        }
    };
    Ok(Record::from_rdata(owner, ttl, data))
}

fn fqdn(name: &str) -> Result<Name, String> {
    Name::from_str(&format!("{}.", name.trim_end_matches('.').to_ascii_lowercase()))
        .map_err(|e| format!("{name:?} is not a DNS name: {e}"))
}

/// Answers queries from the current zone snapshot.
#[derive(Debug, Clone)]
pub struct Handler {
    zone: Arc<ZoneCell>,
    shared: Arc<crate::Shared>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let source = request.src().ip();
        if let Err(reason) = self.shared.admission.dns.admit(source) {
            self.shared.refusals.refuse(crate::limits::Listener::Dns, reason, source);
            // Over its rate, a UDP source gets nothing: an answer would make
            // us the reflector of a spoofed flood. TCP sources (no spoofing)
            // are told REFUSED.
            if request.protocol() == hickory_server::net::xfer::Protocol::Udp {
                metadata.response_code = ResponseCode::Refused;
                return hickory_proto::op::Header { metadata, counts: Default::default() }.into();
            }
            self.shared.metrics.dns_query(ResponseCode::Refused);
            let refused = builder.error_msg(&request.metadata, ResponseCode::Refused);
            return response
                .send_response(refused)
                .await
                .unwrap_or_else(|_| hickory_proto::op::Header { metadata, counts: Default::default() }.into());
        }
        let mut edns_out = None;
        if let Some(req_edns) = request.edns.as_ref() {
            let mut e = Edns::new();
            e.set_max_payload(req_edns.max_payload().clamp(512, 1232));
            e.set_version(0);
            edns_out = Some(e);
        }
        let answer = if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query
        {
            None
        } else {
            request.request_info().ok().map(|info| {
                let name: Name = info.query.name().into();
                self.zone.current().answer(&name, info.query.query_type(), info.query.query_class())
            })
        };
        let result = match answer {
            Some(answer) => {
                metadata.authoritative = answer.authoritative;
                metadata.response_code = answer.rcode;
                self.shared.metrics.dns_query(answer.rcode);
                let mut builder = builder;
                if let Some(e) = edns_out.as_ref() {
                    builder.edns(e);
                }
                let response_message = builder.build(
                    metadata,
                    answer.answers.iter(),
                    answer.authority.iter(),
                    std::iter::empty(),
                    std::iter::empty(),
                );
                response.send_response(response_message).await
            }
            None => {
                let code = if request.metadata.op_code != OpCode::Query {
                    ResponseCode::NotImp
                } else {
                    ResponseCode::FormErr
                };
                self.shared.metrics.dns_query(code);
                response.send_response(builder.error_msg(&request.metadata, code)).await
            }
        };
        result.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "sending a DNS response failed");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            hickory_proto::op::Header { metadata, counts: Default::default() }.into()
        })
    }
}

/// Sockets of the DNS server, bound before the server runs.
#[derive(Debug)]
pub struct DnsSockets {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl DnsSockets {
    /// Binds UDP and TCP on `addr`. With port 0 the kernel picks the UDP
    /// port, and TCP takes the same one; when that TCP port happens to be
    /// busy, another pick is tried (a few times).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let mut tries = if addr.port() == 0 { 16 } else { 1 };
        loop {
            let udp = UdpSocket::bind(addr).await?;
            match TcpListener::bind(udp.local_addr()?).await {
                Ok(tcp) => return Ok(Self { udp, tcp }),
                Err(e) if tries > 1 && e.kind() == std::io::ErrorKind::AddrInUse => tries -= 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sockets a predecessor handed over (an upgrade).
    pub fn from_std(udp: std::net::UdpSocket, tcp: std::net::TcpListener) -> std::io::Result<Self> {
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok(Self { udp: UdpSocket::from_std(udp)?, tcp: TcpListener::from_std(tcp)? })
    }

    /// Keeps duplicates of both sockets to hand over to a successor.
    pub fn keep(&self, keep: &mut crate::upgrade::HandoverSockets) {
        use edge_proto::handover::SocketRole;
        keep.keep(SocketRole::DnsUdp, self.udp.local_addr().ok(), &self.udp);
        keep.keep(SocketRole::DnsTcp, self.tcp.local_addr().ok(), &self.tcp);
    }

    /// The bound address (same port for UDP and TCP).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// How long a TCP client may stay silent before its connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// Serves DNS until `shutdown`.
pub async fn serve(sockets: DnsSockets, zone: Arc<ZoneCell>, shared: Arc<crate::Shared>, shutdown: CancellationToken) {
    let mut server = hickory_server::Server::new(Handler { zone, shared });
    server.register_socket(sockets.udp);
    server.register_listener(sockets.tcp, TCP_IDLE, 64);
    shutdown.cancelled().await;
    if let Err(e) = server.shutdown_gracefully().await {
        tracing::warn!(error = %e, "DNS server stopped with an error");
    }
}
