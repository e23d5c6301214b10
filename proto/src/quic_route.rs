//! Which tunnel a QUIC client's datagram goes to, sans-IO (issue 17).
//!
//! A client's first flight carries a Destination Connection ID the client
//! chose at random; the server learns the route from the SNI in its
//! Initial packets ([`crate::quic_initial`]) and remembers the pair
//! (client address, that ID) while the flight lasts. Every later packet
//! carries a connection ID the node's own QUIC endpoint issued, and those
//! begin with the tunnel's [`RouteId`] (the idea of QUIC-LB): the router
//! reads the route from the packet itself, with no table per connection,
//! and a client that moves to another address keeps being routed.
//!
//! State is bounded: pending first flights per source (an IPv4 address or
//! an IPv6 /64) and in total, datagrams and bytes buffered per flight and
//! in total, new flights per source per second, sources tracked, and
//! first-flight entries expire when idle. A source that never sends an
//! authentic Initial leaves nothing behind.
//!
//! Packets addressed to a node-issued ID are forwarded without a check of
//! the ID's rest: anyone may send datagrams into a live route, and the
//! node's endpoint drops those it did not issue. An Initial that opens
//! under its own ID always goes through its SNI, so a client cannot pick
//! a route by choosing its first ID.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::quic_initial::{classify, version_negotiation, InitialSni, Packet, Progress};

/// Length of the connection IDs a node's endpoint issues.
pub const ROUTABLE_CID_LEN: usize = 16;

/// A tunnel's routable prefix, assigned by the server holding the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(pub u32);

impl RouteId {
    /// A connection ID for this route: the prefix, then `random`.
    pub fn connection_id(self, random: [u8; ROUTABLE_CID_LEN - 4]) -> [u8; ROUTABLE_CID_LEN] {
        let mut cid = [0u8; ROUTABLE_CID_LEN];
        cid[..4].copy_from_slice(&self.0.to_be_bytes());
        cid[4..].copy_from_slice(&random);
        cid
    }

    /// The route a connection ID (or the bytes that start with one) names.
    pub fn of(cid: &[u8]) -> Option<Self> {
        let prefix: [u8; 4] = cid.get(..4)?.try_into().ok()?;
        Some(Self(u32::from_be_bytes(prefix)))
    }
}

/// Bounds on the router's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// First flights being read at once, in total.
    pub max_pending: usize,
    /// First flights being read at once from one IPv4 address or IPv6 /64.
    pub max_pending_per_source: usize,
    /// Datagrams kept per first flight until its route is known.
    pub max_buffered: usize,
    /// Bytes kept per first flight until its route is known.
    pub max_buffered_bytes: usize,
    /// Bytes kept over all first flights.
    pub max_buffered_bytes_total: usize,
    /// Sources (IPv4 addresses, IPv6 /64s) whose rate is tracked at once.
    pub max_sources: usize,
    /// How long a first flight may take to complete its ClientHello.
    pub hello_deadline: Duration,
    /// New first flights one IPv4 address or IPv6 /64 may start per second.
    pub new_per_source_per_sec: u32,
    /// First-flight entries (address, client-chosen ID) kept after the
    /// route is known, until idle this long.
    pub flow_idle: Duration,
    /// First-flight entries kept at once.
    pub max_flows: usize,
    /// How long after a client's last datagram to a route the route's
    /// answers may still be sent to the client's address (longer than the
    /// node's QUIC idle timeout, so a quiet connection is not cut here).
    pub answer_idle: Duration,
    /// Client addresses answers may go to, at once.
    pub max_answer_addresses: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending: 4096,
            max_pending_per_source: 16,
            max_buffered: 16,
            max_buffered_bytes: 32 * 1024,
            max_buffered_bytes_total: 16 * 1024 * 1024,
            max_sources: 65_536,
            hello_deadline: Duration::from_secs(3),
            new_per_source_per_sec: 50,
            flow_idle: Duration::from_secs(10),
            max_flows: 65_536,
            answer_idle: Duration::from_secs(60),
            max_answer_addresses: 262_144,
        }
    }
}

/// Why a datagram was dropped (a metrics label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a QUIC packet this router can read.
    Malformed,
    /// A short header or non-Initial long header for no known route.
    UnknownRoute,
    /// An Initial that is too small, unauthentic or not for a pending flight.
    BadInitial,
    /// The ClientHello names no route here.
    UnknownName,
    /// The ClientHello or its frames were rejected.
    Rejected,
    /// A limit on pending flights or the per-source rate.
    Busy,
    /// More datagrams than a pending flight may buffer.
    BufferFull,
}

impl DropReason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [DropReason; 7] = [
        DropReason::Malformed,
        DropReason::UnknownRoute,
        DropReason::BadInitial,
        DropReason::UnknownName,
        DropReason::Rejected,
        DropReason::Busy,
        DropReason::BufferFull,
    ];

    /// A short stable label, used in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownRoute => "unknown_route",
            DropReason::BadInitial => "bad_initial",
            DropReason::UnknownName => "unknown_name",
            DropReason::Rejected => "rejected",
            DropReason::Busy => "busy",
            DropReason::BufferFull => "buffer_full",
        }
    }
}

/// What to do with one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the `buffered` datagrams, then this one, to the route's tunnel.
    Forward {
        /// The tunnel.
        route: RouteId,
        /// Earlier datagrams of the same first flight, in arrival order.
        buffered: Vec<Vec<u8>>,
        /// The server name, when this datagram completed a ClientHello.
        name: Option<String>,
    },
    /// Kept until the ClientHello is complete.
    Buffered,
    /// Send this packet back to the source (Version Negotiation).
    Reply(Vec<u8>),
    /// Drop it.
    Drop(DropReason),
}

/// (client address, client-chosen Destination Connection ID).
type FlowKey = (SocketAddr, Vec<u8>);

struct Pending {
    reader: InitialSni,
    buffered: Vec<Vec<u8>>,
    /// Bytes in `buffered`.
    bytes: usize,
    source: SourceKey,
    deadline: Instant,
}

struct Flow {
    route: RouteId,
    last_seen: Instant,
}

/// Routes client datagrams; see the module documentation.
pub struct QuicRouter {
    limits: Limits,
    pending: HashMap<FlowKey, Pending>,
    pending_per_source: HashMap<SourceKey, usize>,
    /// Bytes buffered over all pending flights.
    buffered_bytes: usize,
    flows: HashMap<FlowKey, Flow>,
    /// Per source: the start of its current one-second window and the new
    /// flights started in it.
    rate: HashMap<SourceKey, (Instant, u32)>,
    /// Per client address: the route it last sent to, and when. A route's
    /// answers go only to addresses here (the server is no reflector).
    answers: HashMap<SocketAddr, (RouteId, Instant)>,
}

impl std::fmt::Debug for QuicRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicRouter")
            .field("pending", &self.pending.len())
            .field("flows", &self.flows.len())
            .field("sources", &self.rate.len())
            .field("answer_addresses", &self.answers.len())
            .finish()
    }
}

impl QuicRouter {
    /// An empty router.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            pending: HashMap::new(),
            pending_per_source: HashMap::new(),
            buffered_bytes: 0,
            flows: HashMap::new(),
            rate: HashMap::new(),
            answers: HashMap::new(),
        }
    }

    /// Takes new limits (a reload); state already kept stays until it
    /// expires or ends.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// First flights being read.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// First-flight entries with a known route.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Client addresses a route's answers may go to.
    pub fn answer_addresses(&self) -> usize {
        self.answers.len()
    }

    /// Decides what to do with `datagram` from `source`. `resolve` maps a
    /// server name to its route; `live` says whether a route's tunnel is
    /// still up. A datagram forwarded to a route lets the route answer
    /// `source` ([`QuicRouter::may_answer`]) until [`Limits::answer_idle`].
    pub fn on_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        datagram: &[u8],
        resolve: impl FnOnce(&str) -> Option<RouteId>,
        live: impl Fn(RouteId) -> bool,
    ) -> Verdict {
        let verdict = self.decide(now, source, datagram, resolve, live);
        if let Verdict::Forward { route, .. } = &verdict {
            let full = self.answers.len() >= self.limits.max_answer_addresses;
            match self.answers.get_mut(&source) {
                Some(entry) => *entry = (*route, now),
                // Its answers could not reach it: not worth carrying.
                None if full => return Verdict::Drop(DropReason::Busy),
                None => {
                    self.answers.insert(source, (*route, now));
                }
            }
        }
        verdict
    }

    /// Whether `route` may send a datagram to `client`: the client sent
    /// one to that route within [`Limits::answer_idle`].
    pub fn may_answer(&self, now: Instant, route: RouteId, client: SocketAddr) -> bool {
        self.answers
            .get(&client)
            .is_some_and(|&(r, seen)| r == route && now.saturating_duration_since(seen) < self.limits.answer_idle)
    }

    fn decide(
        &mut self,
        now: Instant,
        source: SocketAddr,
        datagram: &[u8],
        resolve: impl FnOnce(&str) -> Option<RouteId>,
        live: impl Fn(RouteId) -> bool,
    ) -> Verdict {
        let packet = match classify(datagram) {
            Ok(packet) => packet,
            Err(_) => return Verdict::Drop(DropReason::Malformed),
        };
        let dcid = match packet {
            Packet::Short(after_first) => {
                return match RouteId::of(after_first) {
                    Some(route) if live(route) => Verdict::Forward { route, buffered: Vec::new(), name: None },
                    _ => Verdict::Drop(DropReason::UnknownRoute),
                };
            }
            Packet::UnknownVersion(_) => {
                let unused = datagram.get(1).copied().unwrap_or(0) ^ 0x2a;
                return version_negotiation(datagram, unused)
                    .map_or(Verdict::Drop(DropReason::Malformed), Verdict::Reply);
            }
            Packet::OtherLong(_, header) | Packet::Initial(_, header) => header.dcid,
        };
        // A known first flight (its Initials, 0-RTT and retransmissions).
        let key: FlowKey = (source, dcid.to_vec());
        if let Some(flow) = self.flows.get_mut(&key) {
            if live(flow.route) {
                flow.last_seen = now;
                return Verdict::Forward { route: flow.route, buffered: Vec::new(), name: None };
            }
            self.flows.remove(&key);
        }
        let Packet::Initial(version, _) = packet else {
            // 0-RTT sent with the hello waits for it; Handshake packets
            // carry the node's own ID.
            if self.pending.contains_key(&key) {
                return self.buffer(&key, datagram);
            }
            return match RouteId::of(dcid) {
                Some(route) if dcid.len() == ROUTABLE_CID_LEN && live(route) => {
                    Verdict::Forward { route, buffered: Vec::new(), name: None }
                }
                _ => Verdict::Drop(DropReason::UnknownRoute),
            };
        };
        let progress = match self.pending.get_mut(&key) {
            Some(pending) => match pending.reader.feed(datagram) {
                Ok(progress) => progress,
                Err(_) => return Verdict::Drop(DropReason::BadInitial),
            },
            None => {
                // Initial keys come from the client's first chosen ID, so
                // an Initial that opens under its own ID starts a flight
                // and must go through its SNI, whatever the ID looks like.
                // One that does not is a later Initial of a connection the
                // node already answered, addressed to the node's own ID.
                let mut reader = InitialSni::new(version, dcid, crate::quic_initial::DEFAULT_MAX_CRYPTO_BYTES);
                let progress = match reader.feed(datagram) {
                    Ok(progress) => progress,
                    Err(_) => {
                        return match RouteId::of(dcid) {
                            Some(route) if dcid.len() == ROUTABLE_CID_LEN && live(route) => {
                                Verdict::Forward { route, buffered: Vec::new(), name: None }
                            }
                            // Nothing kept for a source that sent nothing
                            // authentic.
                            _ => Verdict::Drop(DropReason::BadInitial),
                        };
                    }
                };
                let source_key = SourceKey::of(source.ip());
                if !self.rate_allows(now, source_key) {
                    return Verdict::Drop(DropReason::Busy);
                }
                if progress == Progress::NeedMore {
                    if !self.may_start_pending(source_key, datagram.len()) {
                        return Verdict::Drop(DropReason::Busy);
                    }
                    self.note_new(now, source_key);
                    self.start_pending(now, key, source_key, reader, datagram);
                    return Verdict::Buffered;
                }
                self.note_new(now, source_key);
                progress
            }
        };
        match progress {
            Progress::NeedMore => self.buffer(&key, datagram),
            Progress::Rejected(_) => {
                self.end_pending(&key);
                Verdict::Drop(DropReason::Rejected)
            }
            Progress::Found(name) => {
                let buffered = self.end_pending(&key).map(|p| p.buffered).unwrap_or_default();
                match resolve(&name) {
                    Some(route) if live(route) => {
                        if self.flows.len() < self.limits.max_flows {
                            self.flows.insert(key, Flow { route, last_seen: now });
                        }
                        Verdict::Forward { route, buffered, name: Some(name) }
                    }
                    _ => Verdict::Drop(DropReason::UnknownName),
                }
            }
        }
    }

    /// Drops first flights past their deadline and idle entries.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<FlowKey> =
            self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(k, _)| k.clone()).collect();
        for key in expired {
            self.end_pending(&key);
        }
        let idle = self.limits.flow_idle;
        self.flows.retain(|_, f| now.saturating_duration_since(f.last_seen) < idle);
        self.rate.retain(|_, (start, _)| now.saturating_duration_since(*start) < Duration::from_secs(1));
        let answer_idle = self.limits.answer_idle;
        self.answers.retain(|_, (_, seen)| now.saturating_duration_since(*seen) < answer_idle);
    }

    /// Whether `source` may start another first flight now (per-second
    /// rate; the table of sources is bounded too).
    fn rate_allows(&self, now: Instant, source: SourceKey) -> bool {
        match self.rate.get(&source) {
            Some(&(start, count)) if now.saturating_duration_since(start) < Duration::from_secs(1) => {
                count < self.limits.new_per_source_per_sec
            }
            Some(_) => true,
            None => self.rate.len() < self.limits.max_sources,
        }
    }

    /// Whether a flight that needs more datagrams may be kept.
    fn may_start_pending(&self, source: SourceKey, bytes: usize) -> bool {
        self.pending.len() < self.limits.max_pending
            && self.pending_per_source.get(&source).copied().unwrap_or(0) < self.limits.max_pending_per_source
            && self.buffered_bytes + bytes <= self.limits.max_buffered_bytes_total
    }

    /// Counts a new first flight against its source's rate.
    fn note_new(&mut self, now: Instant, source: SourceKey) {
        let entry = self.rate.entry(source).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= Duration::from_secs(1) {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }

    fn start_pending(&mut self, now: Instant, key: FlowKey, source: SourceKey, reader: InitialSni, datagram: &[u8]) {
        *self.pending_per_source.entry(source).or_insert(0) += 1;
        self.buffered_bytes += datagram.len();
        let deadline = now + self.limits.hello_deadline;
        self.pending.insert(
            key,
            Pending { reader, buffered: vec![datagram.to_vec()], bytes: datagram.len(), source, deadline },
        );
    }

    fn buffer(&mut self, key: &FlowKey, datagram: &[u8]) -> Verdict {
        let Some(pending) = self.pending.get_mut(key) else {
            return Verdict::Drop(DropReason::BadInitial);
        };
        if pending.buffered.len() >= self.limits.max_buffered
            || pending.bytes + datagram.len() > self.limits.max_buffered_bytes
            || self.buffered_bytes + datagram.len() > self.limits.max_buffered_bytes_total
        {
            self.end_pending(key);
            return Verdict::Drop(DropReason::BufferFull);
        }
        pending.buffered.push(datagram.to_vec());
        pending.bytes += datagram.len();
        self.buffered_bytes += datagram.len();
        Verdict::Buffered
    }

    fn end_pending(&mut self, key: &FlowKey) -> Option<Pending> {
        let pending = self.pending.remove(key)?;
        self.buffered_bytes -= pending.bytes;
        if let Some(n) = self.pending_per_source.get_mut(&pending.source) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_source.remove(&pending.source);
            }
        }
        Some(pending)
    }
}

/// Whom the per-source limits count: an IPv4 address, or an IPv6 /64
/// (one host usually holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SourceKey(IpAddr);

impl SourceKey {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => Self(IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into())),
            },
        }
    }
}

#[cfg(test)]
mod tests;
