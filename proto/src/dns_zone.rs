//! The cluster zone as data, and the answer to one question about it.
//!
//! Sans-IO: [`Zone::answer`] maps (name, type, class) to a response code
//! and record sections, so every rule is tested without sockets. A new
//! [`Zone`] is built whenever state changes (a node added or removed, a
//! challenge value published); it is never edited in place, so an address
//! change replaces the whole record set and the SOA serial (the store's
//! revision) always moves with the content.
//!
//! What exists in the zone `z`:
//! - `z`: SOA, NS, CAA for the configured CAs (DNS-01 only: only this
//!   server can answer it, so an address a node left behind cannot be
//!   turned into a certificate by HTTP-01 or TLS-ALPN-01), plus static
//!   records;
//! - in-zone nameserver names (`ns.z` by default): A/AAAA of the server
//!   that declared the name (its glue), else of the cluster, unless static
//!   records say otherwise;
//! - `<node>.z` and any `<label>.<node>.z`: A/AAAA of the node: its own
//!   address in direct mode, else the cluster's (every live server's)
//!   ingress addresses ([`NodeAddresses`]);
//! - `_acme-challenge.<node>.z`: TXT with the published DNS-01 values;
//! - names given as static records.
//!
//! Everything else in `z` is NXDOMAIN with the SOA; names outside `z` are
//! REFUSED, so the server is never an open resolver.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::caa::KeyValue;
use hickory_proto::rr::rdata::svcb::{Alpn, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::{A, AAAA, CAA, HTTPS, NS, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// TTLs and SOA fields.
#[derive(Debug, Clone)]
pub struct ZoneSettings {
    /// Nameserver names (NS at the apex; the first is the SOA MNAME).
    pub nameservers: Vec<Name>,
    /// SOA RNAME.
    pub hostmaster: Name,
    /// TTL of node A/AAAA records (short: modes and addresses change).
    pub address_ttl: u32,
    /// TTL of DNS-01 TXT records.
    pub txt_ttl: u32,
    /// TTL of SOA and NS.
    pub zone_ttl: u32,
    /// SOA minimum: how long resolvers cache "no such name".
    pub negative_ttl: u32,
    /// CAs allowed to issue for the zone, published as CAA at the apex
    /// (`issue` and `issuewild`, each limited to `validationmethods=dns-01`)
    /// unless static CAA records at the apex say otherwise. Empty: no CAA.
    pub caa_issuers: Vec<Name>,
}

/// What a node's names answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAddresses {
    /// The cluster's ingress addresses, whatever they are now: a server
    /// that joins or leaves changes every such node at once.
    Cluster,
    /// The node's own addresses (direct mode).
    Own(Vec<IpAddr>),
}

/// One answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Response code.
    pub rcode: ResponseCode,
    /// Whether we are authoritative for the name (AA bit).
    pub authoritative: bool,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA on negative answers).
    pub authority: Vec<Record>,
}

/// A snapshot of the zone.
#[derive(Debug, Clone)]
pub struct Zone {
    origin: Name,
    settings: ZoneSettings,
    serial: u32,
    cluster: Vec<IpAddr>,
    /// Addresses of in-zone nameserver names, by lowercase name; a name
    /// without glue answers the cluster's addresses.
    glue: HashMap<Name, Vec<IpAddr>>,
    /// Node label → the addresses its names answer.
    nodes: HashMap<String, NodeAddresses>,
    /// Node label → TXT values at `_acme-challenge.<node>`.
    challenges: HashMap<String, Vec<String>>,
    /// Static records by lowercase owner name.
    statics: BTreeMap<Name, Vec<Record>>,
    /// Nodes that serve HTTP/3 now, published as HTTPS records.
    http3: Arc<HashSet<String>>,
    /// The UDP port proxied nodes' HTTP/3 is reached on, when it is not
    /// the TCP port their clients use.
    http3_port: Option<u16>,
}

/// The label under a node name that carries DNS-01 values.
pub const ACME_LABEL: &str = "_acme-challenge";

impl Zone {
    /// A zone with no nodes. `origin` must be a lowercase FQDN.
    pub fn new(origin: Name, settings: ZoneSettings, cluster: Vec<IpAddr>, statics: Vec<Record>) -> Self {
        let mut by_name: BTreeMap<Name, Vec<Record>> = BTreeMap::new();
        for r in statics {
            by_name.entry(r.name.to_lowercase()).or_default().push(r);
        }
        Self {
            origin,
            settings,
            serial: 1,
            cluster,
            glue: HashMap::new(),
            nodes: HashMap::new(),
            challenges: HashMap::new(),
            statics: by_name,
            http3: Arc::default(),
            http3_port: None,
        }
    }

    /// The same zone with new dynamic content.
    pub fn with_state(
        &self,
        serial: u32,
        nodes: HashMap<String, NodeAddresses>,
        challenges: HashMap<String, Vec<String>>,
    ) -> Self {
        Self { serial, nodes, challenges, ..self.clone() }
    }

    /// The same zone with the cluster's servers replaced: the apex NS set
    /// (the first is the SOA MNAME), the glue of in-zone nameserver names,
    /// and the ingress addresses that proxied nodes answer.
    pub fn with_servers(
        &self,
        serial: u32,
        nameservers: Vec<Name>,
        glue: HashMap<Name, Vec<IpAddr>>,
        cluster: Vec<IpAddr>,
    ) -> Self {
        let mut zone = Self { serial, cluster, ..self.clone() };
        zone.settings.nameservers = nameservers;
        zone.glue = glue.into_iter().map(|(n, a)| (n.to_lowercase(), a)).collect();
        zone
    }

    /// What `node`'s names answer, if it is in the zone.
    pub fn node_addresses(&self, node: &str) -> Option<&NodeAddresses> {
        self.nodes.get(node)
    }

    /// The TXT values published for `node` (empty if none).
    pub fn challenge_values(&self, node: &str) -> &[String] {
        self.challenges.get(node).map_or(&[], Vec::as_slice)
    }

    /// The apex NS names.
    pub fn nameservers(&self) -> &[Name] {
        &self.settings.nameservers
    }

    fn addresses_of<'a>(&'a self, node: &'a NodeAddresses) -> &'a [IpAddr] {
        match node {
            NodeAddresses::Cluster => &self.cluster,
            NodeAddresses::Own(own) => own,
        }
    }

    /// The same zone with some entries replaced: a node set to `Some`
    /// answers those addresses, `None` removes it; a node's TXT values are
    /// replaced by the list given (empty removes them).
    pub fn edited(
        &self,
        serial: u32,
        nodes: impl IntoIterator<Item = (String, Option<NodeAddresses>)>,
        challenges: impl IntoIterator<Item = (String, Vec<String>)>,
    ) -> Self {
        let mut zone = Self { serial, ..self.clone() };
        for (node, addrs) in nodes {
            match addrs {
                Some(addrs) => zone.nodes.insert(node, addrs),
                None => zone.nodes.remove(&node),
            };
        }
        for (node, values) in challenges {
            if values.is_empty() {
                zone.challenges.remove(&node);
            } else {
                zone.challenges.insert(node, values);
            }
        }
        zone
    }

    /// The same zone with `statics` as its static records (the
    /// configured ones and those in the store, together).
    pub fn with_statics(&self, statics: Vec<Record>) -> Self {
        let mut by_name: BTreeMap<Name, Vec<Record>> = BTreeMap::new();
        for r in statics {
            by_name.entry(r.name.to_lowercase()).or_default().push(r);
        }
        Self { statics: by_name, ..self.clone() }
    }

    /// The same zone with `nodes` publishing HTTPS records (RFC 9460,
    /// `alpn="h3"`): live state, not stored content, so the serial stays.
    /// `port` is the UDP port of the servers' QUIC listener when it differs
    /// from their TLS port; proxied nodes' records then say so, with
    /// `no-default-alpn` (that port takes no TCP).
    pub fn with_http3(&self, nodes: HashSet<String>, port: Option<u16>) -> Self {
        Self { http3: Arc::new(nodes), http3_port: port, ..self.clone() }
    }

    /// Whether `node`'s names publish an HTTPS record.
    pub fn serves_http3(&self, node: &str) -> bool {
        self.http3.contains(node)
    }

    /// Whether `node` has names in the zone.
    pub fn has_node(&self, node: &str) -> bool {
        self.nodes.contains_key(node)
    }

    /// The zone apex.
    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// The cluster's ingress addresses.
    pub fn cluster_addresses(&self) -> &[IpAddr] {
        &self.cluster
    }

    /// The SOA serial.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    fn soa(&self) -> Record {
        let mname = self.settings.nameservers.first().cloned().unwrap_or_else(|| self.origin.clone());
        let soa = SOA::new(
            mname,
            self.settings.hostmaster.clone(),
            self.serial,
            3600,
            600,
            604_800,
            self.settings.negative_ttl,
        );
        // RFC 2308: the SOA in a negative answer carries min(TTL, MINIMUM).
        Record::from_rdata(self.origin.clone(), self.settings.zone_ttl, RData::SOA(soa))
    }

    fn address_records(&self, name: &Name, addrs: &[IpAddr], qtype: RecordType, ttl: u32) -> Vec<Record> {
        addrs
            .iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|data| Record::from_rdata(name.clone(), ttl, data))
            .collect()
    }

    /// The records of type `qtype` at `name`, one of `node`'s names.
    fn node_records(&self, name: &Name, node: &str, qtype: RecordType) -> Vec<Record> {
        let addresses = &self.nodes[node];
        if qtype != RecordType::HTTPS {
            return self.address_records(name, self.addresses_of(addresses), qtype, self.settings.address_ttl);
        }
        if !self.http3.contains(node) {
            return Vec::new();
        }
        let mut params = vec![(SvcParamKey::Alpn, SvcParamValue::Alpn(Alpn(vec!["h3".into()])))];
        // A node in direct mode serves HTTP/3 on its own address, on the
        // port its TCP clients use.
        if let (NodeAddresses::Cluster, Some(port)) = (addresses, self.http3_port) {
            params.push((SvcParamKey::NoDefaultAlpn, SvcParamValue::NoDefaultAlpn));
            params.push((SvcParamKey::Port, SvcParamValue::Port(port)));
        }
        // ServiceMode, TargetName "." (the owner name itself).
        let https = HTTPS(SVCB::new(1, Name::root(), params));
        vec![Record::from_rdata(name.clone(), self.settings.address_ttl, RData::HTTPS(https))]
    }

    fn negative(&self, rcode: ResponseCode) -> Answer {
        let mut soa = self.soa();
        soa.ttl = soa.ttl.min(self.settings.negative_ttl);
        Answer { rcode, authoritative: true, answers: Vec::new(), authority: vec![soa] }
    }

    fn positive(&self, answers: Vec<Record>) -> Answer {
        if answers.is_empty() {
            // NODATA: the name exists, the type does not.
            return self.negative(ResponseCode::NoError);
        }
        Answer { rcode: ResponseCode::NoError, authoritative: true, answers, authority: Vec::new() }
    }

    /// Answers one question.
    pub fn answer(&self, qname: &Name, qtype: RecordType, qclass: DNSClass) -> Answer {
        let refused = Answer { rcode: ResponseCode::Refused, authoritative: false, answers: vec![], authority: vec![] };
        let qname = qname.to_lowercase();
        if qclass != DNSClass::IN || !self.origin.zone_of(&qname) {
            return refused;
        }
        if matches!(qtype, RecordType::ANY | RecordType::AXFR | RecordType::IXFR) {
            // No zone transfers and no ANY (RFC 8482): nothing to amplify.
            return Answer { rcode: ResponseCode::NotImp, authoritative: true, answers: vec![], authority: vec![] };
        }
        let depth = qname.num_labels().saturating_sub(self.origin.num_labels());
        let labels: Vec<String> =
            qname.iter().take(depth as usize).map(|l| String::from_utf8_lossy(l).into_owned()).collect();

        // Static records define their names entirely.
        if let Some(records) = self.statics.get(&qname) {
            let mut answers: Vec<Record> = records.iter().filter(|r| r.record_type() == qtype).cloned().collect();
            if depth == 0 {
                answers.extend(self.apex_records(&qname, qtype));
            }
            return self.positive(answers);
        }
        // In-zone nameservers, at any depth, answer their glue (or the
        // cluster's addresses).
        if depth > 0 && self.settings.nameservers.iter().any(|n| n.to_lowercase() == qname) {
            let addrs = self.glue.get(&qname).map_or(self.cluster.as_slice(), Vec::as_slice);
            return self.positive(self.address_records(&qname, addrs, qtype, self.settings.zone_ttl));
        }
        match labels.as_slice() {
            [] => self.positive(self.apex_records(&qname, qtype)),
            [label] if self.nodes.contains_key(label) => self.positive(self.node_records(&qname, label, qtype)),
            [first, node] if first == ACME_LABEL && self.nodes.contains_key(node) => {
                let answers = match qtype {
                    RecordType::TXT => self
                        .challenges
                        .get(node)
                        .into_iter()
                        .flatten()
                        .map(|v| {
                            Record::from_rdata(
                                qname.clone(),
                                self.settings.txt_ttl,
                                RData::TXT(TXT::new(vec![v.clone()])),
                            )
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                self.positive(answers)
            }
            [_, node] if self.nodes.contains_key(node) => self.positive(self.node_records(&qname, node, qtype)),
            // A name with static or nameserver names below it exists (an
            // empty non-terminal): NODATA, not NXDOMAIN, or resolvers that
            // follow RFC 8020 would treat the whole subtree as gone.
            _ if self.has_names_below(&qname) => self.negative(ResponseCode::NoError),
            _ => self.negative(ResponseCode::NXDomain),
        }
    }

    /// Whether TXT `value` is served at `name` (a lowercase name without the
    /// trailing dot, as the signal API stores it).
    pub fn serves_txt(&self, name: &str, value: &str) -> bool {
        let Ok(qname) = Name::from_ascii(format!("{name}.")) else { return false };
        self.answer(&qname, RecordType::TXT, DNSClass::IN).answers.iter().any(|r| match &r.data {
            RData::TXT(txt) => txt.txt_data.iter().map(|s| String::from_utf8_lossy(s)).collect::<String>() == value,
            _ => false,
        })
    }

    fn has_names_below(&self, name: &Name) -> bool {
        let below = |n: &Name| n.num_labels() > name.num_labels() && name.zone_of(n);
        self.statics.keys().any(below) || self.settings.nameservers.iter().any(|n| below(&n.to_lowercase()))
    }

    fn apex_records(&self, apex: &Name, qtype: RecordType) -> Vec<Record> {
        match qtype {
            RecordType::CAA => {
                let operator_set = self
                    .statics
                    .get(&apex.to_lowercase())
                    .is_some_and(|records| records.iter().any(|r| r.record_type() == RecordType::CAA));
                if operator_set {
                    return Vec::new();
                }
                let dns01 = || vec![KeyValue::new("validationmethods", "dns-01")];
                self.settings
                    .caa_issuers
                    .iter()
                    .flat_map(|ca| {
                        // The issuer domain goes on the wire without the
                        // root dot ("letsencrypt.org", RFC 8659 section 4.2).
                        let mut ca = ca.clone();
                        ca.set_fqdn(false);
                        [
                            CAA::new_issue(false, Some(ca.clone()), dns01()),
                            CAA::new_issuewild(false, Some(ca.clone()), dns01()),
                        ]
                    })
                    .map(|caa| Record::from_rdata(apex.clone(), self.settings.zone_ttl, RData::CAA(caa)))
                    .collect()
            }
            RecordType::SOA => vec![self.soa()],
            RecordType::NS => self
                .settings
                .nameservers
                .iter()
                .map(|ns| Record::from_rdata(apex.clone(), self.settings.zone_ttl, RData::NS(NS(ns.clone()))))
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn zone() -> Zone {
        let settings = ZoneSettings {
            nameservers: vec![name("ns.edge.test."), name("ns.other.example.")],
            hostmaster: name("hostmaster.edge.test."),
            address_ttl: 30,
            txt_ttl: 5,
            zone_ttl: 3600,
            negative_ttl: 5,
            caa_issuers: vec![name("letsencrypt.org.")],
        };
        let statics = vec![Record::from_rdata(name("www.edge.test."), 300, RData::A(A([192, 0, 2, 80].into())))];
        let base = Zone::new(
            name("edge.test."),
            settings,
            vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            statics,
        );
        let nodes = HashMap::from([("n1".to_string(), NodeAddresses::Cluster)]);
        let challenges = HashMap::from([("n1".to_string(), vec!["v1".to_string(), "v2".to_string()])]);
        base.with_state(42, nodes, challenges)
    }

    fn ask(z: &Zone, q: &str, t: RecordType) -> Answer {
        z.answer(&name(q), t, DNSClass::IN)
    }

    fn data(a: &Answer) -> Vec<String> {
        a.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn https_records_only_for_nodes_serving_http3() {
        let own = |ip: &str| Some(NodeAddresses::Own(vec![ip.parse().unwrap()]));
        let z = zone().edited(43, [("n2".to_string(), own("198.51.100.7")), ("n3".into(), own("198.51.100.8"))], []);
        // (Records as hickory presents them; dig writes alpn="h3".)
        // Nothing serves HTTP/3 yet: NODATA, the names exist.
        let none = ask(&z, "n1.edge.test.", RecordType::HTTPS);
        assert_eq!((none.rcode, none.answers.len()), (ResponseCode::NoError, 0));

        let nodes: HashSet<String> = ["n1".to_string(), "n2".to_string()].into();
        let same_port = z.with_http3(nodes.clone(), None);
        assert_eq!(same_port.serial(), 43, "live state moves no serial");
        for q in ["n1.edge.test.", "app.n1.edge.test.", "n2.edge.test."] {
            let a = ask(&same_port, q, RecordType::HTTPS);
            assert_eq!(data(&a), vec!["1 . alpn=h3,"], "{q}");
            assert_eq!(a.answers[0].ttl, 30);
        }
        assert!(ask(&same_port, "n3.edge.test.", RecordType::HTTPS).answers.is_empty(), "n3 does not serve it");
        assert!(same_port.serves_http3("n1") && !same_port.serves_http3("n3"));

        // Another UDP port: proxied nodes say so, and that the port takes
        // no TCP; a direct node serves on its own address and port.
        let other_port = z.with_http3(nodes, Some(8443));
        let a = ask(&other_port, "n1.edge.test.", RecordType::HTTPS);
        assert_eq!(data(&a), vec!["1 . alpn=h3, no-default-alpn= port=8443"]);
        assert_eq!(data(&ask(&other_port, "n2.edge.test.", RecordType::HTTPS)), vec!["1 . alpn=h3,"]);
        // The addresses are unchanged, and the record survives edits.
        assert_eq!(data(&ask(&other_port, "n1.edge.test.", RecordType::A)), vec!["192.0.2.1"]);
        let edited = other_port.edited(44, [("n9".to_string(), Some(NodeAddresses::Cluster))], []);
        assert_eq!(ask(&edited, "n1.edge.test.", RecordType::HTTPS).answers.len(), 1);
        // The wire form round-trips.
        let record = &a.answers[0];
        let bytes = hickory_proto::serialize::binary::BinEncodable::to_bytes(record).unwrap();
        let back: Record = hickory_proto::serialize::binary::BinDecodable::from_bytes(&bytes).unwrap();
        assert_eq!(&back, record);
    }

    #[test]
    fn statics_are_replaced_as_a_whole() {
        let z = zone();
        let txt = Record::from_rdata(name("_x.edge.test."), 60, RData::TXT(TXT::new(vec!["hello".into()])));
        let z2 = z.with_statics(vec![txt]);
        assert!(z2.serves_txt("_x.edge.test", "hello"));
        assert_eq!(ask(&z2, "www.edge.test.", RecordType::A).rcode, ResponseCode::NXDomain, "www was replaced");
        assert_eq!(data(&ask(&z, "www.edge.test.", RecordType::A)), vec!["192.0.2.80"]);
    }

    #[test]
    fn edits_replace_only_what_they_name() {
        let z = zone();
        let own: IpAddr = "198.51.100.7".parse().unwrap();
        let e = z.edited(
            43,
            [("n2".to_string(), Some(NodeAddresses::Own(vec![own])))],
            [("n1".to_string(), vec!["v3".to_string()])],
        );
        assert_eq!(e.serial(), 43);
        assert_eq!(data(&ask(&e, "n2.edge.test.", RecordType::A)), vec!["198.51.100.7"]);
        assert_eq!(data(&ask(&e, "n1.edge.test.", RecordType::A)), vec!["192.0.2.1"], "n1 untouched");
        assert!(e.serves_txt("_acme-challenge.n1.edge.test", "v3"));
        assert!(!e.serves_txt("_acme-challenge.n1.edge.test", "v1"));
        let gone = e.edited(44, [("n1".to_string(), None)], [("n1".to_string(), Vec::new())]);
        assert_eq!(ask(&gone, "n1.edge.test.", RecordType::A).rcode, ResponseCode::NXDomain);
        assert!(!gone.serves_txt("_acme-challenge.n1.edge.test", "v3"));
        assert!(gone.has_node("n2") && !gone.has_node("n1"));
        assert!(z.serves_txt("_acme-challenge.n1.edge.test", "v1"), "the original snapshot is unchanged");
    }

    #[test]
    fn apex_has_soa_and_ns() {
        let z = zone();
        let soa = ask(&z, "edge.test.", RecordType::SOA);
        assert_eq!((soa.rcode, soa.authoritative, soa.answers.len()), (ResponseCode::NoError, true, 1));
        let RData::SOA(s) = &soa.answers[0].data else { panic!() };
        assert_eq!((s.serial, s.minimum), (42, 5));
        assert_eq!(data(&ask(&z, "edge.test.", RecordType::NS)), vec!["ns.edge.test.", "ns.other.example."]);
    }

    #[test]
    fn caa_at_the_apex_allows_only_dns_01() {
        let z = zone();
        let caa = ask(&z, "edge.test.", RecordType::CAA);
        let shown = data(&caa);
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(
            shown.iter().any(|d| d.contains("issue ") && d.contains("letsencrypt.org; validationmethods=dns-01")),
            "{shown:?}"
        );
        assert!(shown.iter().any(|d| d.contains("issuewild ")), "{shown:?}");
        // Below the apex there is none: CAs climb to the apex (RFC 8659).
        assert!(ask(&z, "n1.edge.test.", RecordType::CAA).answers.is_empty());
        // A static CAA at the apex replaces ours.
        let mut own = z.clone();
        let apex = name("edge.test.");
        let static_caa = Record::from_rdata(apex.clone(), 300, RData::CAA(CAA::new_issue(false, None, vec![])));
        own.statics.insert(apex, vec![static_caa]);
        assert_eq!(ask(&own, "edge.test.", RecordType::CAA).answers.len(), 1);
        // No issuers: no CAA.
        let mut none = z.clone();
        none.settings.caa_issuers.clear();
        assert!(ask(&none, "edge.test.", RecordType::CAA).answers.is_empty());
    }

    #[test]
    fn node_names_and_one_label_wildcard_answer_addresses() {
        let z = zone();
        for q in ["n1.edge.test.", "N1.Edge.Test.", "api.n1.edge.test.", "_acme-challenge.n1.edge.test."] {
            let a = ask(&z, q, RecordType::A);
            if q.starts_with("_acme") {
                assert!(a.answers.is_empty(), "the challenge name has only TXT");
                continue;
            }
            assert_eq!(data(&a), vec!["192.0.2.1"], "{q}");
            assert_eq!(a.answers[0].ttl, 30);
        }
        assert_eq!(data(&ask(&z, "n1.edge.test.", RecordType::AAAA)), vec!["2001:db8::1"]);
        assert_eq!(data(&ask(&z, "ns.edge.test.", RecordType::A)), vec!["192.0.2.1"]);
    }

    #[test]
    fn challenge_txt_values() {
        let z = zone();
        let a = ask(&z, "_acme-challenge.n1.edge.test.", RecordType::TXT);
        assert_eq!(data(&a), vec!["v1", "v2"]);
        assert!(z.serves_txt("_acme-challenge.n1.edge.test", "v2"));
        assert!(!z.serves_txt("_acme-challenge.n1.edge.test", "v3"));
        assert!(!z.serves_txt("_acme-challenge.n2.edge.test", "v1"));
        assert_eq!(a.answers[0].ttl, 5);
        let none = z.with_state(43, z.nodes.clone(), HashMap::new());
        let a = ask(&none, "_acme-challenge.n1.edge.test.", RecordType::TXT);
        assert_eq!((a.rcode, a.answers.len(), a.authority.len()), (ResponseCode::NoError, 0, 1));
    }

    #[test]
    fn negative_answers_carry_a_short_soa() {
        let z = zone();
        for q in ["nobody.edge.test.", "a.b.n1.edge.test.", "_acme-challenge.nobody.edge.test."] {
            let a = ask(&z, q, RecordType::A);
            assert_eq!(a.rcode, ResponseCode::NXDomain, "{q}");
            assert_eq!(a.authority.len(), 1);
            assert_eq!(a.authority[0].record_type(), RecordType::SOA);
            assert_eq!(a.authority[0].ttl, 5, "negative caching stays short");
        }
        let nodata = ask(&z, "n1.edge.test.", RecordType::MX);
        assert_eq!((nodata.rcode, nodata.answers.len(), nodata.authority.len()), (ResponseCode::NoError, 0, 1));
    }

    #[test]
    fn outside_the_zone_is_refused() {
        let z = zone();
        for q in ["example.com.", "test.", "xedge.test.", "n1.edge.test.evil."] {
            let a = ask(&z, q, RecordType::A);
            assert_eq!((a.rcode, a.authoritative, a.answers.len()), (ResponseCode::Refused, false, 0), "{q}");
        }
        let chaos = z.answer(&name("n1.edge.test."), RecordType::A, DNSClass::CH);
        assert_eq!(chaos.rcode, ResponseCode::Refused);
        assert_eq!(ask(&z, "edge.test.", RecordType::ANY).rcode, ResponseCode::NotImp);
        assert_eq!(ask(&z, "edge.test.", RecordType::AXFR).rcode, ResponseCode::NotImp);
    }

    #[test]
    fn empty_non_terminals_exist() {
        let mut z = zone();
        z.statics.insert(
            name("a.b.edge.test."),
            vec![Record::from_rdata(name("a.b.edge.test."), 60, RData::A(A([192, 0, 2, 9].into())))],
        );
        z.settings.nameservers.push(name("ns1.dns.edge.test."));
        for q in ["b.edge.test.", "dns.edge.test."] {
            let a = ask(&z, q, RecordType::A);
            assert_eq!((a.rcode, a.answers.len(), a.authority.len()), (ResponseCode::NoError, 0, 1), "{q}");
        }
        assert_eq!(data(&ask(&z, "a.b.edge.test.", RecordType::A)), vec!["192.0.2.9"]);
        assert_eq!(data(&ask(&z, "ns1.dns.edge.test.", RecordType::A)), vec!["192.0.2.1"], "deep nameserver");
        assert_eq!(ask(&z, "c.b.edge.test.", RecordType::A).rcode, ResponseCode::NXDomain);
    }

    #[test]
    fn static_records_and_removed_nodes() {
        let z = zone();
        assert_eq!(data(&ask(&z, "www.edge.test.", RecordType::A)), vec!["192.0.2.80"]);
        let gone = z.with_state(44, HashMap::new(), HashMap::new());
        assert_eq!(ask(&gone, "n1.edge.test.", RecordType::A).rcode, ResponseCode::NXDomain);
        assert_eq!(ask(&gone, "x.n1.edge.test.", RecordType::A).rcode, ResponseCode::NXDomain);
    }

    #[test]
    fn servers_set_ns_glue_and_proxied_addresses() {
        let z = zone();
        let own: IpAddr = "198.51.100.7".parse().unwrap();
        let z = z.edited(43, [("n2".to_string(), Some(NodeAddresses::Own(vec![own])))], []);
        let glue = HashMap::from([
            (name("NS1.edge.test."), vec!["192.0.2.11".parse().unwrap()]),
            (name("ns2.edge.test."), vec!["192.0.2.12".parse().unwrap()]),
        ]);
        let cluster = vec!["192.0.2.11".parse().unwrap(), "192.0.2.12".parse().unwrap()];
        let c = z.with_servers(44, vec![name("ns1.edge.test."), name("ns2.edge.test.")], glue, cluster);
        assert_eq!(data(&ask(&c, "edge.test.", RecordType::NS)), vec!["ns1.edge.test.", "ns2.edge.test."]);
        assert_eq!(data(&ask(&c, "ns1.edge.test.", RecordType::A)), vec!["192.0.2.11"]);
        assert_eq!(data(&ask(&c, "ns2.edge.test.", RecordType::A)), vec!["192.0.2.12"]);
        assert_eq!(ask(&c, "ns.edge.test.", RecordType::A).rcode, ResponseCode::NXDomain, "no longer a nameserver");
        assert_eq!(data(&ask(&c, "n1.edge.test.", RecordType::A)), vec!["192.0.2.11", "192.0.2.12"]);
        assert_eq!(data(&ask(&c, "n2.edge.test.", RecordType::A)), vec!["198.51.100.7"], "direct stays");
        let RData::SOA(soa) = &ask(&c, "edge.test.", RecordType::SOA).answers[0].data else { panic!() };
        assert_eq!((soa.serial, soa.mname.to_string().as_str()), (44, "ns1.edge.test."));
        assert_eq!(c.node_addresses("n1"), Some(&NodeAddresses::Cluster));
        assert_eq!(c.challenge_values("n1"), ["v1", "v2"]);
        assert!(c.challenge_values("n2").is_empty());
    }
}
