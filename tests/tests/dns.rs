//! The server's authoritative DNS, asked with real `dig` queries over UDP
//! and TCP: apex records, node names and wildcards, challenge TXT values,
//! negative answers, refusal outside the zone, and changes without restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use edge_tests::dns::dig;
use edge_tests::{wait_for, Server};

const DNS: &str = "[dns]\nlisten = \"127.0.0.1:0\"\naddress_ttl_secs = 30\n\
    [[dns.records]]\nname = \"www\"\ntype = \"A\"\nvalue = \"192.0.2.80\"\n";

fn token_of(join: &str) -> String {
    edge_proto::join::JoinTicket::parse(join).unwrap().token
}

#[test]
fn dns_answers_over_udp_and_tcp_and_follows_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), DNS).unwrap();
    let dns = server.addrs.dns.expect("dns address in listening.json");

    for tcp in [false, true] {
        let soa = dig(dns, "edge.test", "SOA", tcp).unwrap();
        assert_eq!(soa.status, "NOERROR");
        assert!(soa.authoritative, "AA flag on answers from the zone");
        let data = soa.data("SOA");
        assert_eq!(data.len(), 1);
        assert!(data[0].starts_with("ns.edge.test. hostmaster.edge.test."), "{data:?}");
        assert!(data[0].ends_with(" 5"), "negative-caching TTL (SOA minimum) stays short: {data:?}");
        assert_eq!(dig(dns, "edge.test", "NS", tcp).unwrap().data("NS"), vec!["ns.edge.test."]);
        assert_eq!(dig(dns, "ns.edge.test", "A", tcp).unwrap().data("A"), vec!["127.0.0.1"]);
        assert_eq!(dig(dns, "www.edge.test", "A", tcp).unwrap().data("A"), vec!["192.0.2.80"]);

        let unknown = dig(dns, "nobody.edge.test", "A", tcp).unwrap();
        assert_eq!(unknown.status, "NXDOMAIN");
        assert!(unknown.answers.is_empty());
        assert_eq!(unknown.authority.len(), 1);
        assert_eq!(unknown.authority[0].2, "SOA");
        assert!(unknown.authority[0].1 <= 5, "negative answer TTL is min(SOA TTL, minimum)");

        for outside in ["example.com", "edge.test.evil.example", "test"] {
            let refused = dig(dns, outside, "A", tcp).unwrap();
            assert_eq!(refused.status, "REFUSED", "{outside} is outside the zone: never an open resolver");
            assert!(refused.answers.is_empty() && !refused.authoritative);
        }
        assert_eq!(dig(dns, "edge.test", "ANY", tcp).unwrap().status, "NOTIMP");
    }
    let serial_before: u64 =
        dig(dns, "edge.test", "SOA", false).unwrap().data("SOA")[0].split_whitespace().nth(2).unwrap().parse().unwrap();

    // Operator names cannot become nodes: their certificates would cover
    // the operator's records.
    for taken in ["www", "ns"] {
        let err = server.cli(&["node", "add", taken]).unwrap_err().to_string();
        assert!(err.contains("taken by a DNS name of the operator"), "{err}");
    }

    // A node added by the CLI resolves within seconds, no restart.
    let join = server.add_node("n1").unwrap();
    for tcp in [false, true] {
        wait_for("A record of the new node", Duration::from_secs(5), || {
            (dig(dns, "n1.edge.test", "A", tcp).ok()?.data("A") == vec!["127.0.0.1"]).then_some(())
        })
        .unwrap();
        let wildcard = dig(dns, "api.N1.edge.test", "A", tcp).unwrap();
        assert_eq!(wildcard.data("A"), vec!["127.0.0.1"], "one-label wildcard, case-insensitive");
        assert_eq!(wildcard.answers[0].1, 30, "address TTL from the config");
        assert_eq!(dig(dns, "a.b.n1.edge.test", "A", tcp).unwrap().status, "NXDOMAIN", "routing is one label deep");
        let nodata = dig(dns, "n1.edge.test", "MX", tcp).unwrap();
        assert_eq!((nodata.status.as_str(), nodata.answers.len(), nodata.authority.len()), ("NOERROR", 0, 1));
    }
    let serial_after: u64 =
        dig(dns, "edge.test", "SOA", false).unwrap().data("SOA")[0].split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(serial_after > serial_before, "SOA serial moves with the zone: {serial_before} -> {serial_after}");

    // A challenge value published through the signal API is served over
    // both transports, and gone once deleted.
    let token = token_of(&join);
    let value = "abc-DEF_123abcdefghijklmnopqrstuvwxyz012345";
    let body = &format!(r#"{{"name":"_acme-challenge.n1.edge.test","value":"{value}"}}"#);
    let (code, text) = server.api_call("PUT", "/api/signal/acme-challenge", Some(&token), Some(body)).unwrap();
    assert_eq!(code, 200, "{text}");
    for tcp in [false, true] {
        let txt = dig(dns, "_acme-challenge.n1.edge.test", "TXT", tcp).unwrap();
        assert_eq!(txt.data("TXT"), vec![value]);
        assert!(txt.answers[0].1 <= 5, "challenge TXT TTL is short");
    }
    let (code, _) = server.api_call("DELETE", "/api/signal/acme-challenge", Some(&token), Some(body)).unwrap();
    assert_eq!(code, 200);
    let txt = dig(dns, "_acme-challenge.n1.edge.test", "TXT", false).unwrap();
    assert_eq!((txt.status.as_str(), txt.answers.len()), ("NOERROR", 0));

    // Removing the node removes its names.
    server.cli(&["node", "remove", "n1"]).unwrap();
    wait_for("NXDOMAIN after node remove", Duration::from_secs(5), || {
        (dig(dns, "n1.edge.test", "A", false).ok()?.status == "NXDOMAIN").then_some(())
    })
    .unwrap();
    let metrics = server.metrics().unwrap();
    assert!(edge_tests::metric(&metrics, "edge_dns_responses_total{rcode=\"REFUSED\"}").unwrap() >= 6.0);
}

#[test]
fn a_thousand_queries_add_almost_no_log_lines_at_the_default_level() {
    let dir = tempfile::tempdir().unwrap();
    // No RUST_LOG: the binary's own default filter, as an operator runs it.
    let server = Server::start_with_log(dir.path(), DNS, None, Some("")).unwrap();
    let dns = server.addrs.dns.unwrap();
    server.add_node("n1").unwrap();
    wait_for("the new node resolves", Duration::from_secs(5), || {
        (dig(dns, "n1.edge.test", "A", false).ok()?.status == "NOERROR").then_some(())
    })
    .unwrap();
    let lines_before = server.proc.log_text().lines().count();
    // One dig process, 1,000 questions: names that exist, that do not, and
    // outside the zone.
    let batch = dir.path().join("queries.txt");
    let mut queries = String::new();
    for i in 0..1000 {
        let name = match i % 4 {
            0 => "n1.edge.test".to_string(),
            1 => format!("x{i}.n1.edge.test"),
            2 => format!("nobody{i}.edge.test"),
            _ => "example.com".to_string(),
        };
        queries.push_str(&format!("{name} A\n"));
    }
    std::fs::write(&batch, queries).unwrap();
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .args(["-p", &dns.port().to_string(), "+norecurse", "+time=2", "+tries=1", "+nocookie", "-f"])
        .arg(&batch)
        .output()
        .unwrap();
    let answered = String::from_utf8_lossy(&out.stdout).matches("status: ").count();
    assert!(answered >= 990, "{answered} of 1000 queries answered");
    std::thread::sleep(Duration::from_millis(200));
    let log = server.proc.log_text();
    let added: Vec<&str> = log.lines().skip(lines_before).collect();
    assert!(added.len() < 10, "{} log lines for 1,000 queries:\n{}", added.len(), added.join("\n"));
}

#[test]
fn large_udp_answers_are_truncated_and_complete_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    // 12 TXT strings of 200 bytes at one name: about 2.5 KB of answer.
    let mut config = String::from(DNS);
    for i in 0..12 {
        config.push_str(&format!(
            "[[dns.records]]\nname = \"big\"\ntype = \"TXT\"\nvalue = \"{}\"\n",
            format!("{i:02}").repeat(100)
        ));
    }
    let server = Server::start(dir.path(), &config).unwrap();
    let dns = server.addrs.dns.unwrap();
    let ask = |args: &[&str]| {
        let out = std::process::Command::new("dig")
            .arg(format!("@{}", dns.ip()))
            .args(["-p", &dns.port().to_string(), "+norecurse", "+time=2", "+tries=1", "+nocookie", "+ignore"])
            .args(args)
            .args(["big.edge.test", "TXT"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let flags = |text: &str| text.lines().find(|l| l.starts_with(";; flags:")).unwrap_or("").to_string();
    for udp in [ask(&["+notcp", "+noedns"]), ask(&["+notcp", "+bufsize=1232"])] {
        assert!(flags(&udp).contains(" tc"), "a UDP answer over its size limit sets TC: {}", flags(&udp));
        let size: usize = udp.split("MSG SIZE  rcvd: ").nth(1).and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        assert!(size > 0 && size <= 1232, "UDP answer of {size} bytes");
    }
    let tcp = ask(&["+tcp"]);
    assert!(!flags(&tcp).contains(" tc"), "{}", flags(&tcp));
    assert_eq!(tcp.matches("\tTXT\t").count(), 12, "{tcp}");
}

/// Records kept in the store (`edge-server dns add`) join the configured
/// ones without a restart, the SOA serial moves, and names are kept apart
/// from nodes' both ways.
#[test]
fn stored_records_are_served_without_restart_and_never_shadow_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &format!("[store]\npoll_ms = 100\n{DNS}")).unwrap();
    let dns = server.addrs.dns.unwrap();
    let serial = || -> u64 {
        let soa = dig(dns, "edge.test", "SOA", false).unwrap().data("SOA");
        soa[0].split(' ').nth(2).unwrap().parse().unwrap()
    };
    let before = serial();
    server.cli(&["dns", "add", "api", "A", "192.0.2.90", "--ttl", "120"]).unwrap();
    server.cli(&["dns", "add", "@", "TXT", "v=spf1 -all"]).unwrap();
    let answer = wait_for("the stored A record", Duration::from_secs(5), || {
        let a = dig(dns, "api.edge.test", "A", false).ok()?;
        (a.status == "NOERROR" && !a.answers.is_empty()).then_some(a)
    })
    .unwrap();
    assert_eq!(answer.data("A"), vec!["192.0.2.90"]);
    assert_eq!(answer.answers[0].1, 120, "the record's TTL");
    wait_for("the stored TXT record", Duration::from_secs(5), || {
        dig(dns, "edge.test", "TXT", false).ok()?.data("TXT").iter().any(|t| t.contains("v=spf1")).then_some(())
    })
    .unwrap();
    assert!(serial() > before, "the serial moved");
    assert_eq!(dig(dns, "www.edge.test", "A", false).unwrap().data("A"), vec!["192.0.2.80"], "configured ones stay");
    let list = server.cli(&["dns", "list"]).unwrap();
    assert!(list.contains("api.edge.test 120 A 192.0.2.90"), "{list}");

    // A node may not take a stored record's name, nor a record a node's.
    let err = server.cli(&["node", "add", "api"]).unwrap_err().to_string();
    assert!(err.contains("taken by the DNS record"), "{err}");
    server.add_node("web").unwrap();
    let err = server.cli(&["dns", "add", "x.web", "A", "192.0.2.1"]).unwrap_err().to_string();
    assert!(err.contains("node \"web\""), "{err}");
    let err = server.cli(&["dns", "add", "bad", "A", "::1"]).unwrap_err().to_string();
    assert!(err.contains("not a valid A value"), "{err}");

    server.cli(&["dns", "remove", "api"]).unwrap();
    wait_for("the removed record gone", Duration::from_secs(5), || {
        (dig(dns, "api.edge.test", "A", false).ok()?.status == "NXDOMAIN").then_some(())
    })
    .unwrap();
    assert!(server.cli(&["dns", "remove", "api"]).is_err(), "nothing left to remove");
}
