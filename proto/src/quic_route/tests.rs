//! The router on a real quinn client's first flight and on built Initials.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::quic_initial::tests::{client_hello, crypto_frame, initial, quinn_first_flight, scattered, DCID, NAME};
use crate::quic_initial::Version;

const ROUTE: RouteId = RouteId(7);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn resolve(name: &str) -> Option<RouteId> {
    match name {
        NAME => Some(ROUTE),
        "other.n2.edge.test" => Some(RouteId(9)),
        _ => None,
    }
}

fn live(route: RouteId) -> bool {
    route == ROUTE || route == RouteId(9)
}

fn short_header(route: RouteId) -> Vec<u8> {
    let mut packet = vec![0x40];
    packet.extend_from_slice(&route.connection_id([5; 12]));
    packet.extend_from_slice(&[0xee; 40]);
    packet
}

#[test]
fn a_first_flight_is_buffered_then_forwarded_whole_with_its_name() {
    let flight = quinn_first_flight(NAME);
    let (mut router, now, client) = (QuicRouter::new(Limits::default()), Instant::now(), addr("192.0.2.1:5000"));
    let mut verdicts: Vec<Verdict> = flight.iter().map(|d| router.on_datagram(now, client, d, resolve, live)).collect();
    let last = verdicts.pop().expect("datagrams");
    assert!(verdicts.iter().all(|v| *v == Verdict::Buffered), "{verdicts:?}");
    assert_eq!(
        last,
        Verdict::Forward { route: ROUTE, buffered: flight[..flight.len() - 1].to_vec(), name: Some(NAME.into()) }
    );
    assert_eq!((router.pending(), router.flows()), (0, 1));
    // A retransmitted Initial of the same flight follows without a lookup.
    let again = router.on_datagram(now, client, &flight[0], |_| panic!("no lookup"), live);
    assert_eq!(again, Verdict::Forward { route: ROUTE, buffered: Vec::new(), name: None });
}

#[test]
fn later_packets_route_by_their_connection_id_from_any_address() {
    let mut router = QuicRouter::new(Limits::default());
    let now = Instant::now();
    let forward = Verdict::Forward { route: ROUTE, buffered: Vec::new(), name: None };
    assert_eq!(router.on_datagram(now, addr("192.0.2.1:5000"), &short_header(ROUTE), resolve, live), forward);
    // The client moved: same connection ID, new address.
    assert_eq!(router.on_datagram(now, addr("198.51.100.9:6000"), &short_header(ROUTE), resolve, live), forward);
    assert_eq!(
        router.on_datagram(now, addr("192.0.2.1:5000"), &short_header(RouteId(8)), resolve, live),
        Verdict::Drop(DropReason::UnknownRoute)
    );
    assert_eq!((router.pending(), router.flows()), (0, 0), "no state for routed packets");
}

#[test]
fn two_nodes_each_get_only_their_own_clients() {
    let mut router = QuicRouter::new(Limits::default());
    let now = Instant::now();
    let mine = quinn_first_flight(NAME);
    let theirs = quinn_first_flight("other.n2.edge.test");
    let (a, b) = (addr("192.0.2.1:5000"), addr("192.0.2.2:5000"));
    // Interleaved, so both flights are pending at once.
    let mut last = HashMap::new();
    for i in 0..mine.len().max(theirs.len()) {
        for (source, flight) in [(a, &mine), (b, &theirs)] {
            if let Some(d) = flight.get(i) {
                last.insert(source, router.on_datagram(now, source, d, resolve, live));
            }
        }
    }
    assert!(matches!(&last[&a], Verdict::Forward { route, name: Some(n), .. } if *route == ROUTE && n == NAME));
    assert!(
        matches!(&last[&b], Verdict::Forward { route, name: Some(n), .. } if *route == RouteId(9) && n == "other.n2.edge.test")
    );
}

#[test]
fn unknown_names_dead_tunnels_and_garbage_leave_no_state() {
    let mut router = QuicRouter::new(Limits::default());
    let now = Instant::now();
    let client = addr("192.0.2.1:5000");
    let flight = quinn_first_flight("nobody.edge.test");
    let verdicts: Vec<Verdict> = flight.iter().map(|d| router.on_datagram(now, client, d, resolve, live)).collect();
    assert_eq!(verdicts.last(), Some(&Verdict::Drop(DropReason::UnknownName)));
    let flight = quinn_first_flight(NAME);
    let verdicts: Vec<Verdict> =
        flight.iter().map(|d| router.on_datagram(now, client, d, resolve, |_| false)).collect();
    assert_eq!(verdicts.last(), Some(&Verdict::Drop(DropReason::UnknownName)), "the tunnel is gone");
    assert_eq!(router.on_datagram(now, client, &[], resolve, live), Verdict::Drop(DropReason::Malformed));
    let mut forged = flight[0].clone();
    forged[300] ^= 1;
    assert_eq!(router.on_datagram(now, client, &forged, resolve, live), Verdict::Drop(DropReason::BadInitial));
    assert_eq!(
        router.on_datagram(now, client, &flight[0][..1000], resolve, live),
        Verdict::Drop(DropReason::BadInitial)
    );
    assert_eq!((router.pending(), router.flows()), (0, 0));
}

/// The first Initial of flight `id`: PING only, so never complete.
fn first_of(id: u8) -> Vec<u8> {
    let mut dcid = DCID;
    dcid[0] = id;
    initial(Version::V1, &dcid, 0, &[0x01])
}

#[test]
fn pending_flights_are_bounded_per_source_and_expire() {
    let mut router = QuicRouter::new(Limits { max_pending_per_source: 2, ..Limits::default() });
    let now = Instant::now();
    let client = addr("192.0.2.1:5000");
    assert_eq!(router.on_datagram(now, client, &first_of(1), resolve, live), Verdict::Buffered);
    assert_eq!(router.on_datagram(now, client, &first_of(2), resolve, live), Verdict::Buffered);
    assert_eq!(router.on_datagram(now, client, &first_of(3), resolve, live), Verdict::Drop(DropReason::Busy));
    // Another address is not held back by this one.
    assert_eq!(router.on_datagram(now, addr("192.0.2.9:1"), &first_of(4), resolve, live), Verdict::Buffered);
    router.expire(now + Duration::from_millis(500));
    assert_eq!(router.pending(), 3, "within the deadline");
    let later = now + Limits::default().hello_deadline;
    router.expire(later);
    assert_eq!(router.pending(), 0, "past the deadline");
    assert_eq!(router.on_datagram(later, client, &first_of(3), resolve, live), Verdict::Buffered);
}

#[test]
fn new_flights_per_source_are_rate_limited() {
    let mut router = QuicRouter::new(Limits { new_per_source_per_sec: 3, ..Limits::default() });
    let now = Instant::now();
    let client = addr("192.0.2.1:5000");
    for id in 1..=3 {
        assert_eq!(router.on_datagram(now, client, &first_of(id), resolve, live), Verdict::Buffered);
    }
    let soon = now + Duration::from_millis(900);
    assert_eq!(router.on_datagram(soon, client, &first_of(4), resolve, live), Verdict::Drop(DropReason::Busy));
    // Datagrams of flights already pending are not new flights.
    assert_eq!(router.on_datagram(soon, client, &first_of(1), resolve, live), Verdict::Buffered);
    let next_second = now + Duration::from_secs(1);
    router.expire(next_second);
    assert_eq!(router.on_datagram(next_second, client, &first_of(4), resolve, live), Verdict::Buffered);
}

#[test]
fn zero_rtt_sent_with_the_hello_waits_for_it() {
    let mut router = QuicRouter::new(Limits::default());
    let now = Instant::now();
    let client = addr("192.0.2.1:5000");
    let packets = scattered(Version::V1, NAME);
    assert_eq!(router.on_datagram(now, client, &packets[0], resolve, live), Verdict::Buffered);
    // A 0-RTT packet (type 0b01 in v1) of the same flight.
    let mut zero_rtt = packets[0].clone();
    zero_rtt[0] = (zero_rtt[0] & 0xcf) | 0x10;
    assert_eq!(router.on_datagram(now, client, &zero_rtt, resolve, live), Verdict::Buffered);
    assert_eq!(router.on_datagram(now, client, &packets[1], resolve, live), Verdict::Buffered);
    let done = router.on_datagram(now, client, &packets[2], resolve, live);
    assert_eq!(
        done,
        Verdict::Forward {
            route: ROUTE,
            buffered: vec![packets[0].clone(), zero_rtt, packets[1].clone()],
            name: Some(NAME.into())
        }
    );
}

#[test]
fn a_flight_that_buffers_too_much_is_dropped() {
    let mut router = QuicRouter::new(Limits { max_buffered: 1, ..Limits::default() });
    let now = Instant::now();
    let client = addr("192.0.2.1:5000");
    let packets = scattered(Version::V1, NAME);
    assert_eq!(router.on_datagram(now, client, &packets[0], resolve, live), Verdict::Buffered);
    assert_eq!(router.on_datagram(now, client, &packets[1], resolve, live), Verdict::Drop(DropReason::BufferFull));
    assert_eq!(router.pending(), 0);
}

#[test]
fn unknown_versions_are_answered_with_version_negotiation() {
    let mut router = QuicRouter::new(Limits::default());
    let mut datagram = initial(Version::V1, &DCID, 0, &[0x01]);
    datagram[1..5].copy_from_slice(&0x0a0a_0a0au32.to_be_bytes());
    let verdict = router.on_datagram(Instant::now(), addr("192.0.2.1:5000"), &datagram, resolve, live);
    assert!(matches!(verdict, Verdict::Reply(ref vn) if vn[1..5] == [0, 0, 0, 0]), "{verdict:?}");
}

#[test]
fn route_ids_round_trip_through_connection_ids() {
    for id in [0, 1, 7, u32::MAX] {
        let cid = RouteId(id).connection_id([0xab; 12]);
        assert_eq!(RouteId::of(&cid), Some(RouteId(id)));
        assert_eq!(cid.len(), ROUTABLE_CID_LEN);
    }
    assert_eq!(RouteId::of(&[1, 2, 3]), None);
}

#[test]
fn a_client_cannot_pick_a_route_by_choosing_its_first_id() {
    let mut router = QuicRouter::new(Limits::default());
    let now = Instant::now();
    let client = addr("192.0.2.1:5000");
    // A first flight whose own ID carries a live route's prefix still
    // goes through its SNI: an unknown name is dropped...
    let chosen = ROUTE.connection_id([3; 12]);
    let hello = client_hello("nobody.edge.test", Version::V1);
    let flight = initial(Version::V1, &chosen, 0, &crypto_frame(0, &hello));
    assert_eq!(router.on_datagram(now, client, &flight, resolve, live), Verdict::Drop(DropReason::UnknownName));
    // ...and a known one is forwarded with its name, to its own route.
    let hello = client_hello("other.n2.edge.test", Version::V1);
    let flight = initial(Version::V1, &chosen, 0, &crypto_frame(0, &hello));
    assert!(matches!(
        router.on_datagram(now, addr("192.0.2.2:5000"), &flight, resolve, live),
        Verdict::Forward { route: RouteId(9), name: Some(_), .. }
    ));
}

#[test]
fn a_later_initial_to_the_nodes_id_routes_by_prefix() {
    let mut router = QuicRouter::new(Limits::default());
    // Sealed under other keys (the client's first ID's), it does not open
    // under the node's ID: a later Initial of an answered connection.
    let mut later = initial(Version::V1, &ROUTE.connection_id([4; 12]), 3, &[0x01]);
    let n = later.len();
    later[n - 1] ^= 0xff;
    let verdict = router.on_datagram(Instant::now(), addr("192.0.2.1:5000"), &later, resolve, live);
    assert_eq!(verdict, Verdict::Forward { route: ROUTE, buffered: Vec::new(), name: None });
    assert_eq!(router.pending(), 0);
}

#[test]
fn an_ipv6_slash_64_counts_as_one_source() {
    let mut router = QuicRouter::new(Limits { max_pending_per_source: 1, ..Limits::default() });
    let now = Instant::now();
    assert_eq!(router.on_datagram(now, addr("[2001:db8:1:2::1]:5000"), &first_of(1), resolve, live), Verdict::Buffered);
    assert_eq!(
        router.on_datagram(now, addr("[2001:db8:1:2:ffff::9]:6000"), &first_of(2), resolve, live),
        Verdict::Drop(DropReason::Busy)
    );
    assert_eq!(router.on_datagram(now, addr("[2001:db8:1:3::1]:5000"), &first_of(3), resolve, live), Verdict::Buffered);
}

#[test]
fn buffered_bytes_are_capped_per_flight_and_in_total() {
    let packets = scattered(Version::V1, NAME);
    let now = Instant::now();
    let client = addr("192.0.2.1:5000");
    let mut router = QuicRouter::new(Limits { max_buffered_bytes: packets[0].len() + 10, ..Limits::default() });
    assert_eq!(router.on_datagram(now, client, &packets[0], resolve, live), Verdict::Buffered);
    assert_eq!(router.on_datagram(now, client, &packets[1], resolve, live), Verdict::Drop(DropReason::BufferFull));
    assert_eq!(router.pending(), 0);

    let mut router = QuicRouter::new(Limits { max_buffered_bytes_total: packets[0].len() * 2, ..Limits::default() });
    assert_eq!(router.on_datagram(now, client, &first_of(1), resolve, live), Verdict::Buffered);
    assert_eq!(router.on_datagram(now, addr("192.0.2.2:1"), &first_of(2), resolve, live), Verdict::Buffered);
    assert_eq!(
        router.on_datagram(now, addr("192.0.2.3:1"), &first_of(3), resolve, live),
        Verdict::Drop(DropReason::Busy)
    );
    router.expire(now + Duration::from_secs(5));
    assert_eq!(router.on_datagram(now, addr("192.0.2.3:1"), &first_of(3), resolve, live), Verdict::Buffered);
}

#[test]
fn a_route_answers_only_addresses_that_sent_to_it_lately() {
    let mut router = QuicRouter::new(Limits::default());
    let now = Instant::now();
    let (client, stranger) = (addr("192.0.2.1:5000"), addr("203.0.113.3:53"));
    assert!(!router.may_answer(now, ROUTE, client), "nothing sent yet");
    router.on_datagram(now, client, &short_header(ROUTE), resolve, live);
    assert!(router.may_answer(now, ROUTE, client));
    assert!(!router.may_answer(now, RouteId(9), client), "another node's route may not answer it");
    assert!(!router.may_answer(now, ROUTE, stranger), "no reflection to an address that sent nothing");
    // A dropped datagram grants nothing.
    router.on_datagram(now, stranger, &short_header(RouteId(8)), resolve, live);
    assert!(!router.may_answer(now, RouteId(8), stranger));
    // The client moves to the other node's route: the first loses it.
    router.on_datagram(now, client, &short_header(RouteId(9)), resolve, live);
    assert!(!router.may_answer(now, ROUTE, client) && router.may_answer(now, RouteId(9), client));
    let later = now + Limits::default().answer_idle;
    assert!(!router.may_answer(later, RouteId(9), client), "expired after the idle time");
    router.expire(later);
    assert_eq!(router.answer_addresses(), 0);
}

#[test]
fn answer_addresses_are_bounded() {
    let mut router = QuicRouter::new(Limits { max_answer_addresses: 2, ..Limits::default() });
    let now = Instant::now();
    let forward = Verdict::Forward { route: ROUTE, buffered: Vec::new(), name: None };
    for port in [1, 2] {
        assert_eq!(
            router.on_datagram(now, addr(&format!("192.0.2.1:{port}")), &short_header(ROUTE), resolve, live),
            forward
        );
    }
    let third = router.on_datagram(now, addr("192.0.2.1:3"), &short_header(ROUTE), resolve, live);
    assert_eq!(third, Verdict::Drop(DropReason::Busy));
    // Known addresses still pass.
    assert_eq!(router.on_datagram(now, addr("192.0.2.1:1"), &short_header(ROUTE), resolve, live), forward);
    assert_eq!(router.answer_addresses(), 2);
}
