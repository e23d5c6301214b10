//! Fuzzes the DNS request path: arbitrary bytes decoded as a DNS message,
//! every question answered by the sans-IO zone, the response built the way
//! the server builds it (`server/src/dns/mod.rs`), encoded and decoded again.
//!
//! Invariants: nothing panics; every response encodes and decodes back to
//! the same sections; a name outside the zone (or a class other than IN) is
//! REFUSED, not authoritative and empty; ANY/AXFR/IXFR are NOTIMP; answers
//! only carry the question's name and type, negative answers only the SOA;
//! and the encoded response stays small (no amplification).
#![no_main]

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::OnceLock;

use edge_proto::dns_zone::{Answer, NodeAddresses, Zone, ZoneSettings};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use libfuzzer_sys::fuzz_target;

/// Largest UDP payload the server advertises (DNS flag day 2020).
const MAX_PAYLOAD: u16 = 1232;
/// Most records one answer of the test zone can hold (the three NS).
const MAX_RECORDS: usize = 3;

fn name(s: &str) -> Name {
    Name::from_str(s).expect("test name")
}

/// The zone the server would build for `zone = "edge.test"` with two nodes
/// (one behind the cluster, one direct), published challenge values, and a
/// few static records (as in the zone's unit tests).
fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let settings = ZoneSettings {
            nameservers: vec![name("ns.edge.test."), name("ns.other.example."), name("ns1.dns.edge.test.")],
            hostmaster: name("hostmaster.edge.test."),
            address_ttl: 30,
            txt_ttl: 5,
            zone_ttl: 3600,
            negative_ttl: 5,
            caa_issuers: vec![name("letsencrypt.org.")],
        };
        let statics = vec![
            Record::from_rdata(name("www.edge.test."), 300, RData::A(A([192, 0, 2, 80].into()))),
            Record::from_rdata(name("www.edge.test."), 300, RData::AAAA(AAAA("2001:db8::80".parse().unwrap()))),
            Record::from_rdata(name("a.b.edge.test."), 60, RData::A(A([192, 0, 2, 9].into()))),
            Record::from_rdata(name("edge.test."), 300, RData::TXT(TXT::new(vec!["v=spf1 -all".into()]))),
        ];
        let cluster: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let base = Zone::new(name("edge.test."), settings, cluster, statics);
        let nodes = HashMap::from([
            ("n1".to_string(), NodeAddresses::Cluster),
            ("n2".to_string(), NodeAddresses::Own(vec!["198.51.100.7".parse().unwrap()])),
        ]);
        let challenges = HashMap::from([(
            "n1".to_string(),
            vec!["LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0".to_string(), "v2".to_string()],
        )]);
        // Both nodes serve HTTP/3: HTTPS answers, with a port for n1.
        let http3 = ["n1".to_string(), "n2".to_string()].into_iter().collect();
        base.with_state(42, nodes, challenges).with_http3(http3, Some(8443))
    })
}

/// Whether `qname` is at or below the zone apex, compared label by label
/// without the zone's own code (ASCII case-insensitive, as DNS is).
fn in_zone(qname: &Name, origin: &Name) -> bool {
    let q: Vec<&[u8]> = qname.iter().collect();
    let o: Vec<&[u8]> = origin.iter().collect();
    q.len() >= o.len() && q[q.len() - o.len()..].iter().zip(&o).all(|(a, b)| a.eq_ignore_ascii_case(b))
}

fn check_answer(zone: &Zone, query: &Query, answer: &Answer) {
    let qname = query.name();
    let (qtype, qclass) = (query.query_type(), query.query_class());
    if qclass != DNSClass::IN || !in_zone(qname, zone.origin()) {
        assert_eq!(answer.rcode, ResponseCode::Refused, "{qname} {qtype} {qclass}");
        assert!(!answer.authoritative && answer.answers.is_empty() && answer.authority.is_empty());
        return;
    }
    assert!(answer.authoritative, "{qname} {qtype}");
    if matches!(qtype, RecordType::ANY | RecordType::AXFR | RecordType::IXFR) {
        assert_eq!(answer.rcode, ResponseCode::NotImp);
        assert!(answer.answers.is_empty() && answer.authority.is_empty());
        return;
    }
    assert!(matches!(answer.rcode, ResponseCode::NoError | ResponseCode::NXDomain), "{:?}", answer.rcode);
    assert!(answer.answers.len() <= MAX_RECORDS, "{qname} {qtype}: {:?}", answer.answers);
    let lower = qname.to_lowercase();
    for r in &answer.answers {
        assert_eq!(r.name, lower, "answer owner");
        assert_eq!(r.record_type(), qtype, "answer type");
        assert_eq!(r.dns_class, DNSClass::IN);
    }
    if answer.answers.is_empty() {
        // NXDOMAIN or NODATA: exactly the SOA, with a short TTL.
        assert_eq!(answer.authority.len(), 1);
        assert_eq!(answer.authority[0].record_type(), RecordType::SOA);
        assert_eq!(&answer.authority[0].name, zone.origin());
        assert!(answer.authority[0].ttl <= 5);
    } else {
        assert_eq!(answer.rcode, ResponseCode::NoError);
        assert!(answer.authority.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = Message::from_vec(data) else { return };
    let zone = zone();

    // Every question, whatever the server would do with the message.
    for query in &request.queries {
        let answer = zone.answer(query.name(), query.query_type(), query.query_class());
        check_answer(zone, query, &answer);
    }

    // The server's path: one question in a standard query gets an answer;
    // anything else gets FORMERR or NOTIMP.
    let meta = &request.metadata;
    let answerable =
        meta.message_type == MessageType::Query && meta.op_code == OpCode::Query && request.queries.len() == 1;
    let mut response = Message::response(meta.id, meta.op_code);
    response.metadata.recursion_desired = meta.recursion_desired;
    response.metadata.checking_disabled = meta.checking_disabled;
    if let Some(req_edns) = &request.edns {
        let mut e = Edns::new();
        e.set_max_payload(req_edns.max_payload().clamp(512, MAX_PAYLOAD));
        e.set_version(0);
        response.set_edns(e);
    }
    if answerable {
        let query = &request.queries[0];
        let answer = zone.answer(query.name(), query.query_type(), query.query_class());
        response.metadata.authoritative = answer.authoritative;
        response.metadata.response_code = answer.rcode;
        response.add_query(query.clone());
        response.add_answers(answer.answers);
        response.add_authorities(answer.authority);
    } else {
        response.metadata.response_code =
            if meta.op_code != OpCode::Query { ResponseCode::NotImp } else { ResponseCode::FormErr };
    }

    let bytes = response.to_vec().expect("a response always encodes");
    let limit = if request.edns.is_some() { usize::from(MAX_PAYLOAD) } else { 512 };
    assert!(bytes.len() <= limit, "response of {} bytes over {limit}", bytes.len());
    let again = Message::from_vec(&bytes).expect("our own response decodes");
    assert_eq!(again.metadata.response_code, response.metadata.response_code);
    assert_eq!(again.metadata.authoritative, response.metadata.authoritative);
    assert_eq!(again.queries.len(), response.queries.len());
    assert_eq!(again.answers, response.answers);
    assert_eq!(again.authorities, response.authorities);
});
