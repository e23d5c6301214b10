//! The store conformance suite: one set of cases run against SQLite and
//! against a real PostgreSQL (a private cluster this test starts). Every
//! trait method, conflicts, concurrent writers, migrations from empty and
//! from the previous schema, change events for every kind of change (in
//! process and from another handle), copies between backends, and (on
//! PostgreSQL) the database going away and coming back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_server::store::{
    self, Change, FeedEvent, HttpMode, Mode, ModeChange, NodeStatus, ProbeSample, Published, StaticKind, StaticRecord,
    Store, StoreConfig, StoreError, StoreLocation,
};
use edge_tests::postgres::Postgres;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Where a case's store lives.
enum Backend<'a> {
    Sqlite(&'a Path),
    Postgres(&'a Postgres),
}

impl Backend<'_> {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// A fresh, empty store location for case `case`.
    fn fresh(&self, case: &str) -> (StoreConfig, std::path::PathBuf) {
        match self {
            Backend::Sqlite(dir) => {
                let data = dir.join(case);
                let cfg = StoreConfig { url: Some("sqlite://edge.db".into()), poll_ms: 50, ..Default::default() };
                (cfg, data)
            }
            Backend::Postgres(pg) => {
                let url = pg.create_db(case).unwrap();
                let cfg = StoreConfig {
                    url: Some(url),
                    password_file: Some(pg.password_file()),
                    connect_timeout_secs: 2,
                    ..Default::default()
                };
                (cfg, std::env::temp_dir())
            }
        }
    }
}

async fn open(cfg: &StoreConfig, dir: &Path) -> Arc<dyn Store> {
    store::open(cfg, dir).await.unwrap()
}

fn hosts(name: &str) -> Vec<String> {
    edge_proto::names::node_hostnames(name, "edge.test")
}

/// The next change event (skipping nothing), within `limit`.
async fn next_change(rx: &mut broadcast::Receiver<FeedEvent>, limit: Duration) -> Option<FeedEvent> {
    tokio::time::timeout(limit, rx.recv()).await.ok()?.ok()
}

/// Collects change events until `want` were seen (or `limit` passes).
async fn changes(rx: &mut broadcast::Receiver<FeedEvent>, want: usize, limit: Duration) -> Vec<Change> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while seen.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_change(rx, left).await {
            Some(FeedEvent::Change(e)) => seen.push(e.change),
            Some(FeedEvent::Resync) => {}
            None => break,
        }
    }
    seen
}

async fn nodes_and_conflicts(b: &Backend<'_>) {
    let (cfg, dir) = b.fresh("nodes");
    let s = open(&cfg, &dir).await;
    let r0 = s.revision().await.unwrap();
    let n1 = s.add_node("n1", &hosts("n1"), &[1; 32]).await.unwrap();
    assert_eq!((n1.mode, n1.http_mode, n1.status.connected), (Mode::Offline, HttpMode::Redirect, false));
    let err = s.add_node("n1", &hosts("n1"), &[2; 32]).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{}: {err}", b.name());
    assert!(err.to_string().contains("n1"), "{err}");
    s.add_node("n2", &hosts("n2"), &[2; 32]).await.unwrap();
    let r1 = s.revision().await.unwrap();
    assert!(r1 >= r0 + 2, "{}: revision {r0} -> {r1}", b.name());
    let got = s.get_node("n1").await.unwrap().unwrap();
    assert_eq!((got.token_hash, got.hostnames.clone()), ([1; 32], hosts("n1")));
    assert_eq!(s.list_nodes().await.unwrap().iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["n1", "n2"]);
    assert!(s.set_token_hash("n1", &[9; 32]).await.unwrap());
    assert!(!s.set_token_hash("nope", &[9; 32]).await.unwrap());
    assert_eq!(s.get_node("n1").await.unwrap().unwrap().token_hash, [9; 32]);
    assert!(s.set_http_mode("n1", HttpMode::Proxy).await.unwrap());
    assert!(!s.set_http_mode("nope", HttpMode::Proxy).await.unwrap());
    assert_eq!(s.get_node("n1").await.unwrap().unwrap().http_mode, HttpMode::Proxy);
    let state = s.routing_state().await.unwrap();
    assert_eq!((state.nodes.len(), state.revision), (2, s.revision().await.unwrap()));
    assert!(s.remove_node("n1").await.unwrap());
    assert!(!s.remove_node("n1").await.unwrap());
    assert!(s.get_node("n1").await.unwrap().is_none());
    assert!(s.get_node("nope").await.unwrap().is_none());
}

async fn status(b: &Backend<'_>) {
    let (cfg, dir) = b.fresh("status");
    let s = open(&cfg, &dir).await;
    s.add_node("n1", &[], &[1; 32]).await.unwrap();
    s.add_node("n2", &[], &[2; 32]).await.unwrap();
    let r = s.revision().await.unwrap();
    let up = NodeStatus {
        connected: true,
        last_heartbeat: Some(100),
        open_connections: 3,
        agent_version: Some("1.2".into()),
        remote_addr: Some("192.0.2.1:5000".into()),
        cert_not_after: Some(2_000_000_000),
        routes: Some(vec![edge_proto::routes::RouteReport {
            host: "*.n1.edge.test".into(),
            mode: edge_proto::routes::RouteMode::Terminate,
            upstreams: vec![edge_proto::routes::UpstreamReport {
                addr: "127.0.0.1:8080".into(),
                up: false,
                check: "http".into(),
            }],
        }]),
    };
    let batch = vec![("n1".to_string(), up.clone()), ("gone".to_string(), up.clone()), ("n2".to_string(), up.clone())];
    s.record_statuses(&batch).await.unwrap();
    assert_eq!(s.get_node("n1").await.unwrap().unwrap().status, up);
    // A later report without optional fields keeps what was known.
    let sparse = NodeStatus { connected: false, ..Default::default() };
    s.record_statuses(&[("n1".into(), sparse)]).await.unwrap();
    let kept = s.get_node("n1").await.unwrap().unwrap().status;
    assert_eq!((kept.connected, kept.last_heartbeat, kept.agent_version.as_deref()), (false, Some(100), Some("1.2")));
    assert_eq!(kept.routes, up.routes, "{}: routes kept when a report has none", b.name());
    s.reset_status().await.unwrap();
    let n2 = s.get_node("n2").await.unwrap().unwrap().status;
    assert_eq!((n2.connected, n2.open_connections), (false, 0));
    assert_eq!(s.revision().await.unwrap(), r, "{}: status moves no revision", b.name());
    assert_eq!(s.counts().await.unwrap().nodes, 2, "the unknown name was skipped, not created");
}

async fn challenges(b: &Backend<'_>) {
    let (cfg, dir) = b.fresh("challenges");
    let s = open(&cfg, &dir).await;
    s.add_node("n1", &[], &[1; 32]).await.unwrap();
    s.add_node("n2", &[], &[2; 32]).await.unwrap();
    let at = "_acme-challenge.n1.edge.test";
    let now = edge_server::unix_now();
    let fresh = now - 600;
    assert_eq!(s.put_challenge("n1", at, "v1", 2, fresh).await.unwrap(), Published::Added);
    let r = s.revision().await.unwrap();
    for _ in 0..5 {
        assert_eq!(s.put_challenge("n1", at, "v1", 2, fresh).await.unwrap(), Published::Unchanged);
    }
    assert_eq!(s.revision().await.unwrap(), r, "{}: an unchanged value moves no revision", b.name());
    assert_eq!(s.put_challenge("n1", at, "v2", 2, fresh).await.unwrap(), Published::Added);
    assert_eq!(s.put_challenge("n1", at, "v3", 2, fresh).await.unwrap(), Published::Full, "fresh values are kept");
    assert_eq!(s.put_challenge("n1", at, "v3", 2, now + 60).await.unwrap(), Published::Added, "stale ones make room");
    let values: Vec<String> = s.node_challenges("n1").await.unwrap().into_iter().map(|c| c.value).collect();
    assert_eq!(values.len(), 2);
    assert!(values.contains(&"v3".to_string()), "{values:?}");
    assert_eq!(s.put_challenge("ghost", at, "v9", 2, fresh).await.unwrap(), Published::Full, "no such node");
    s.put_challenge("n2", "_acme-challenge.n2.edge.test", "w1", 2, fresh).await.unwrap();
    assert_eq!(s.list_challenges().await.unwrap().len(), 3);
    assert_eq!(s.remove_challenge("n1", at, Some("v3")).await.unwrap(), 1);
    assert_eq!(s.remove_challenge("n1", at, Some("v3")).await.unwrap(), 0);
    assert_eq!(s.remove_challenge("n2", at, None).await.unwrap(), 0, "one node cannot remove another's");
    assert_eq!(s.remove_challenge("n1", at, None).await.unwrap(), 1);
    assert_eq!(s.expire_challenges(now + 10).await.unwrap(), 1, "n2's value expires");
    assert!(s.list_challenges().await.unwrap().is_empty());
    // Removing a node removes its values.
    s.put_challenge("n2", "_acme-challenge.n2.edge.test", "w2", 2, fresh).await.unwrap();
    s.remove_node("n2").await.unwrap();
    assert!(s.list_challenges().await.unwrap().is_empty());
}

async fn modes(b: &Backend<'_>) {
    let (cfg, dir) = b.fresh("modes");
    let s = open(&cfg, &dir).await;
    s.add_node("n1", &[], &[1; 32]).await.unwrap();
    for i in 0..8 {
        let sample = ProbeSample { at: i, endpoint: "192.0.2.1:443".into(), ok: i % 2 == 0, detail: format!("p{i}") };
        s.record_probe("n1", &sample, 5).await.unwrap();
    }
    s.record_probe("ghost", &ProbeSample { at: 0, endpoint: "x".into(), ok: true, detail: "x".into() }, 5)
        .await
        .unwrap();
    let change = ModeChange { at: 50, from: Mode::Offline, to: Mode::Direct, reason: "verified".into() };
    s.record_transition("n1", &change, Some("192.0.2.1:443")).await.unwrap();
    let back = ModeChange { at: 60, from: Mode::Direct, to: Mode::Proxy, reason: "3 failed probes".into() };
    s.record_transition("n1", &back, None).await.unwrap();
    s.record_transition("ghost", &back, None).await.unwrap();
    let h = s.mode_history("n1", 10).await.unwrap();
    assert_eq!(h.samples.len(), 5, "{}: only the newest 5 kept", b.name());
    assert_eq!(h.samples[0].detail, "p7", "newest first");
    assert_eq!(h.transitions, vec![back.clone(), change.clone()]);
    assert_eq!((h.mode, h.endpoint.as_deref(), h.since), (Some(Mode::Proxy), None, Some(60)));
    assert_eq!(s.mode_history("n1", 1).await.unwrap().transitions, vec![back]);
    let node = s.get_node("n1").await.unwrap().unwrap();
    assert_eq!((node.mode, node.mode_since), (Mode::Proxy, Some(60)));
    assert_eq!(s.mode_history("ghost", 5).await.unwrap(), Default::default());
}

async fn dns_records(b: &Backend<'_>) {
    let (cfg, dir) = b.fresh("dns_records");
    let s = open(&cfg, &dir).await;
    let mut feed = s.subscribe();
    let www =
        StaticRecord { name: "www.edge.test".into(), kind: StaticKind::A, value: "192.0.2.80".into(), ttl_secs: 300 };
    s.add_dns_record(&www).await.unwrap();
    let err = s.add_dns_record(&www).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{}: {err}", b.name());
    let www6 = StaticRecord { kind: StaticKind::AAAA, value: "2001:db8::80".into(), ..www.clone() };
    s.add_dns_record(&www6).await.unwrap();
    let spf =
        StaticRecord { name: "edge.test".into(), kind: StaticKind::TXT, value: "v=spf1 -all".into(), ttl_secs: 60 };
    s.add_dns_record(&spf).await.unwrap();
    assert_eq!(s.list_dns_records().await.unwrap(), vec![spf.clone(), www.clone(), www6.clone()]);
    assert_eq!(s.routing_state().await.unwrap().dns_records.len(), 3);
    assert_eq!(s.remove_dns_records("www.edge.test", Some(StaticKind::TXT), None).await.unwrap(), 0);
    assert_eq!(s.remove_dns_records("www.edge.test", Some(StaticKind::A), Some("192.0.2.1")).await.unwrap(), 0);
    assert_eq!(s.remove_dns_records("www.edge.test", Some(StaticKind::A), None).await.unwrap(), 1);
    assert_eq!(s.remove_dns_records("www.edge.test", None, None).await.unwrap(), 1);
    assert_eq!(s.list_dns_records().await.unwrap(), vec![spf]);
    assert_eq!(s.counts().await.unwrap().dns_records, 1);
    let seen = changes(&mut feed, 5, Duration::from_secs(2)).await;
    assert_eq!(seen, vec![Change::DnsRecordsChanged; 5], "{}: one event per effective write", b.name());
}

async fn services(b: &Backend<'_>) {
    let (cfg, dir) = b.fresh("services");
    let s = open(&cfg, &dir).await;
    s.add_node("n1", &[], &[1; 32]).await.unwrap();
    let mut feed = s.subscribe();
    let ssh = edge_server::store::ServiceRecord {
        name: "ssh-n1".into(),
        node: "n1".into(),
        listen: "127.0.0.1:2222".into(),
        target: "ssh".into(),
        created_at: 0,
    };
    s.add_service(&ssh).await.unwrap();
    for clash in [
        edge_server::store::ServiceRecord { listen: "127.0.0.1:2223".into(), ..ssh.clone() },
        edge_server::store::ServiceRecord { name: "other".into(), ..ssh.clone() },
    ] {
        let err = s.add_service(&clash).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{}: {err}", b.name());
    }
    let orphan = edge_server::store::ServiceRecord {
        name: "x".into(),
        node: "nope".into(),
        listen: "127.0.0.1:9".into(),
        ..ssh.clone()
    };
    assert!(matches!(s.add_service(&orphan).await.unwrap_err(), StoreError::NotFound(_)), "{}", b.name());
    let listed = s.list_services().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].name.as_str(), listed[0].listen.as_str(), listed[0].target.as_str()),
        ("ssh-n1", "127.0.0.1:2222", "ssh")
    );
    assert!(listed[0].created_at > 0);
    let db = edge_server::store::ServiceRecord { name: "db-n1".into(), listen: "127.0.0.1:5433".into(), ..ssh.clone() };
    s.add_service(&db).await.unwrap();
    assert!(s.remove_service("ssh-n1").await.unwrap());
    assert!(!s.remove_service("ssh-n1").await.unwrap());
    // Removing the node takes its services.
    s.remove_node("n1").await.unwrap();
    assert!(s.list_services().await.unwrap().is_empty(), "{}: cascade", b.name());
    let seen = changes(&mut feed, 4, Duration::from_secs(2)).await;
    assert_eq!(seen[..3], [Change::ServicesChanged, Change::ServicesChanged, Change::ServicesChanged], "{}", b.name());
}

async fn domains(b: &Backend<'_>) {
    use edge_proto::domains::VerifyState;
    let (cfg, dir) = b.fresh("domains");
    let s = open(&cfg, &dir).await;
    s.add_node("n1", &[], &[1; 32]).await.unwrap();
    s.add_node("n2", &[], &[2; 32]).await.unwrap();
    let mut feed = s.subscribe();
    let www = edge_server::store::DomainRecord {
        name: "www.c.test".into(),
        node: "n1".into(),
        verify_value: edge_proto::domains::verify_value([1; 16]),
        created_at: 0,
        state: VerifyState::default(),
    };
    s.add_domain(&www).await.unwrap();
    let other = edge_server::store::DomainRecord { node: "n2".into(), ..www.clone() };
    assert!(matches!(s.add_domain(&other).await.unwrap_err(), StoreError::Conflict(_)), "{}", b.name());
    let orphan = edge_server::store::DomainRecord { name: "x.c.test".into(), node: "nope".into(), ..www.clone() };
    assert!(matches!(s.add_domain(&orphan).await.unwrap_err(), StoreError::NotFound(_)), "{}", b.name());
    let listed = s.list_domains().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].node.as_str(), listed[0].verify_value.as_str()), ("n1", www.verify_value.as_str()));
    assert!(listed[0].created_at > 0 && !listed[0].state.routed);
    let revision = s.revision().await.unwrap();
    // A check that changes nothing about routing moves no revision.
    let missed =
        VerifyState { checked_at: Some(5), last_error: Some("no TXT record".into()), ..VerifyState::default() };
    assert!(s.record_domain_check(&www, &missed).await.unwrap());
    assert_eq!(s.revision().await.unwrap(), revision, "{}", b.name());
    let found = VerifyState { verified_at: Some(6), checked_at: Some(6), routed: true, ..VerifyState::default() };
    assert!(!s.record_domain_check(&other, &found).await.unwrap(), "not n2's: nothing written");
    let old_claim =
        edge_server::store::DomainRecord { verify_value: edge_proto::domains::verify_value([9; 16]), ..www.clone() };
    assert!(!s.record_domain_check(&old_claim, &found).await.unwrap(), "a check of another claim: nothing written");
    assert!(s.record_domain_check(&www, &found).await.unwrap());
    assert!(s.revision().await.unwrap() > revision, "{}: routed flipped", b.name());
    assert_eq!(s.list_domains().await.unwrap()[0].state, found, "{}", b.name());
    assert!(!s.record_domain_check(&orphan, &found).await.unwrap());
    s.add_domain(&edge_server::store::DomainRecord { name: "api.c.test".into(), ..www.clone() }).await.unwrap();
    assert!(s.remove_domain("api.c.test").await.unwrap());
    assert!(!s.remove_domain("api.c.test").await.unwrap());
    // Removing the node takes its domains.
    s.remove_node("n1").await.unwrap();
    assert!(s.list_domains().await.unwrap().is_empty(), "{}: cascade", b.name());
    let seen = changes(&mut feed, 5, Duration::from_secs(2)).await;
    assert_eq!(seen[..4], vec![Change::DomainsChanged; 4][..], "{}", b.name());
}

/// Every kind of change, seen by this handle's subscribers at once and by
/// another handle's (another process) through its watch.
async fn events(b: &Backend<'_>) {
    let (cfg, dir) = b.fresh("events");
    let writer = open(&cfg, &dir).await;
    let reader = open(&cfg, &dir).await;
    let mut local = writer.subscribe();
    let mut remote = reader.subscribe();
    let stop = CancellationToken::new();
    let since = reader.revision().await.unwrap();
    tokio::spawn(reader.watch(since, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at = "_acme-challenge.n1.edge.test";
    writer.add_node("n1", &[], &[1; 32]).await.unwrap();
    writer.set_http_mode("n1", HttpMode::Proxy).await.unwrap();
    writer.set_token_hash("n1", &[2; 32]).await.unwrap();
    writer.put_challenge("n1", at, "v1", 2, 0).await.unwrap();
    writer.put_challenge("n1", at, "v1", 2, 0).await.unwrap(); // unchanged: no event
    writer.remove_challenge("n1", at, None).await.unwrap();
    let t = ModeChange { at: 1, from: Mode::Offline, to: Mode::Proxy, reason: "tunnel up".into() };
    writer.record_transition("n1", &t, None).await.unwrap();
    writer.put_challenge("n1", at, "v2", 2, 0).await.unwrap();
    writer.expire_challenges(i64::MAX).await.unwrap();
    writer.record_statuses(&[("n1".into(), NodeStatus::default())]).await.unwrap(); // no event
    writer.remove_node("n1").await.unwrap();
    let txt = StaticRecord { name: "_x.edge.test".into(), kind: StaticKind::TXT, value: "v".into(), ttl_secs: 60 };
    writer.add_dns_record(&txt).await.unwrap();
    let n = |s: &str| s.to_string();
    let want = vec![
        Change::NodeAdded(n("n1")),
        Change::NodeUpdated(n("n1")),
        Change::TokenRotated(n("n1")),
        Change::ChallengePut(n("n1")),
        Change::ChallengeRemoved(n("n1")),
        Change::ModeChanged(n("n1")),
        Change::ChallengePut(n("n1")),
        Change::ChallengeRemoved(n("n1")),
        Change::NodeRemoved(n("n1")),
        Change::DnsRecordsChanged,
    ];
    assert_eq!(changes(&mut local, want.len(), Duration::from_secs(2)).await, want, "{}: local", b.name());
    assert!(next_change(&mut local, Duration::from_millis(200)).await.is_none(), "nothing more locally");
    assert_eq!(changes(&mut remote, want.len(), Duration::from_secs(5)).await, want, "{}: remote", b.name());
    assert!(next_change(&mut remote, Duration::from_millis(300)).await.is_none(), "no duplicates remotely");
    stop.cancel();
}

/// Writers on several handles at once: one winner per name, the TXT cap
/// holds, and nothing is lost.
async fn concurrent_writers(b: &Backend<'_>) {
    let (cfg, dir) = b.fresh("concurrent");
    let handles: Vec<Arc<dyn Store>> = futures(4, || open(&cfg, &dir)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, s) in handles.iter().enumerate() {
        let s = s.clone();
        tasks.spawn(async move {
            let mut won = Vec::new();
            for k in 0..20 {
                // Every handle tries the same 10 shared names and 10 of its own.
                let name = if k % 2 == 0 { format!("shared{}", k / 2) } else { format!("own{i}x{k}") };
                match s.add_node(&name, &[], &[k as u8; 32]).await {
                    Ok(_) => won.push(name),
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            won
        });
    }
    let mut won = Vec::new();
    while let Some(r) = tasks.join_next().await {
        won.extend(r.unwrap());
    }
    won.sort();
    let before = won.len();
    won.dedup();
    assert_eq!(before, won.len(), "{}: a name was created twice", b.name());
    assert_eq!(won.len(), 10 + 4 * 10, "{}", b.name());
    assert_eq!(handles[0].list_nodes().await.unwrap().len(), 50);
    // Ten publishers of distinct values for one node: the cap of 2 holds.
    let at = "_acme-challenge.shared0.edge.test";
    let mut puts = tokio::task::JoinSet::new();
    for v in 0..10 {
        let s = handles[v % handles.len()].clone();
        puts.spawn(async move { s.put_challenge("shared0", at, &format!("value{v}"), 2, 0).await.unwrap() });
    }
    let mut added = 0;
    while let Some(r) = puts.join_next().await {
        added += usize::from(r.unwrap() == Published::Added);
    }
    assert_eq!(added, 2, "{}", b.name());
    assert_eq!(handles[1].node_challenges("shared0").await.unwrap().len(), 2);
}

async fn futures<T, F: std::future::Future<Output = T>>(n: usize, mut f: impl FnMut() -> F) -> Vec<T> {
    let mut out = Vec::new();
    let pending: Vec<F> = (0..n).map(|_| f()).collect();
    for p in pending {
        out.push(p.await);
    }
    out
}

/// Schema migrations: from empty by several openers at once, and from the
/// previous version with data in it.
async fn migrations(b: &Backend<'_>) {
    let (cfg, dir) = b.fresh("migrate_fresh");
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let (cfg, dir) = (cfg.clone(), dir.clone());
            tokio::spawn(async move { store::open(&cfg, &dir).await.map(|_| ()) })
        })
        .collect();
    for o in openers {
        o.await.unwrap().unwrap_or_else(|e| panic!("{}: concurrent migration: {e}", b.name()));
    }
    let (cfg, dir) = b.fresh("migrate_old");
    let latest = match cfg.location(&dir).unwrap() {
        StoreLocation::Sqlite { path } => {
            let old = store::sqlite::SqliteStore::open_at_version(&path, Duration::from_secs(1), 3).unwrap();
            drop(old);
            // Data written by the previous version, straight into its schema.
            seed_schema_3(&path);
            store::sqlite::MIGRATIONS.len()
        }
        StoreLocation::Postgres(options) => {
            let old = store::postgres::PostgresStore::connect_at_version(*options, 1).await.unwrap();
            let previous: Arc<dyn Store> = Arc::new(old);
            // Version 1 has every table the trait uses.
            previous.add_node("old1", &hosts("old1"), &[7; 32]).await.unwrap();
            drop(previous);
            store::postgres::MIGRATIONS.len()
        }
    };
    let s = open(&cfg, &dir).await;
    let node = s.get_node("old1").await.unwrap().expect("data survives the migration");
    assert_eq!(node.token_hash, [7; 32], "{}", b.name());
    let r = s.revision().await.unwrap();
    s.add_node("new1", &[], &[8; 32]).await.unwrap();
    assert!(s.revision().await.unwrap() > r);
    assert!(latest >= 2);
}

/// Seeds an SQLite file at schema 3 the way the previous release wrote it.
fn seed_schema_3(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let hostnames = serde_json::to_string(&hosts("old1")).unwrap();
    conn.execute(
        "INSERT INTO nodes (name, hostnames, token_hash, created_at) VALUES ('old1', ?1, ?2, 1)",
        rusqlite::params![hostnames, [7u8; 32].as_slice()],
    )
    .unwrap();
    conn.execute("UPDATE meta SET value = 5 WHERE key = 'revision'", []).unwrap();
}

/// Export, import into an empty store of the other kind, verify; a
/// non-empty target is refused.
async fn copy_into(b: &Backend<'_>, other: &Backend<'_>) {
    let (cfg, dir) = b.fresh("copy_src");
    let src = open(&cfg, &dir).await;
    for i in 0..20 {
        src.add_node(&format!("c{i}"), &hosts(&format!("c{i}")), &[i as u8; 32]).await.unwrap();
    }
    src.set_http_mode("c3", HttpMode::Proxy).await.unwrap();
    src.put_challenge("c1", "_acme-challenge.c1.edge.test", "v", 2, 0).await.unwrap();
    src.record_probe("c2", &ProbeSample { at: 5, endpoint: "e".into(), ok: true, detail: "d".into() }, 5)
        .await
        .unwrap();
    let t = ModeChange { at: 6, from: Mode::Offline, to: Mode::Direct, reason: "r".into() };
    src.record_transition("c2", &t, Some("192.0.2.9:443")).await.unwrap();
    src.record_statuses(&[("c4".into(), NodeStatus { last_heartbeat: Some(9), ..Default::default() })]).await.unwrap();
    let www =
        StaticRecord { name: "www.edge.test".into(), kind: StaticKind::A, value: "192.0.2.80".into(), ttl_secs: 300 };
    src.add_dns_record(&www).await.unwrap();
    let snapshot = src.export().await.unwrap();
    let (tcfg, tdir) = other.fresh(&format!("copy_from_{}", b.name()));
    let dst = open(&tcfg, &tdir).await;
    dst.import(&snapshot).await.unwrap();
    assert_eq!(dst.counts().await.unwrap(), src.counts().await.unwrap());
    let copied = dst.export().await.unwrap();
    assert_eq!(copied.nodes, snapshot.nodes, "{} -> {}", b.name(), other.name());
    assert_eq!(
        (copied.samples.clone(), copied.transitions.clone()),
        (snapshot.samples.clone(), snapshot.transitions.clone())
    );
    assert_eq!(copied.challenges, snapshot.challenges);
    assert_eq!(copied.dns_records, vec![www]);
    assert!(dst.revision().await.unwrap() > snapshot.revision, "serials never go back");
    let err = dst.import(&snapshot).await.unwrap_err();
    assert!(matches!(err, StoreError::NotEmpty { .. }), "{err}");
    assert_eq!(dst.counts().await.unwrap().nodes, 20, "a refused import changed nothing");
}

async fn accounts(b: &Backend<'_>) {
    use edge_server::store::{ApiTokenRecord, AuditEntry, AuditQuery, SessionRecord, TokenScope, UserRecord};
    let (cfg, dir) = b.fresh("accounts");
    let s = open(&cfg, &dir).await;
    let r = s.revision().await.unwrap();
    let alice = UserRecord { name: "alice".into(), password_hash: "$argon2id$x".into(), created_at: 100 };
    s.add_user(&alice).await.unwrap();
    assert!(matches!(s.add_user(&alice).await, Err(StoreError::Conflict(_))), "{}: names are unique", b.name());
    assert_eq!(s.get_user("alice").await.unwrap(), Some(alice.clone()));
    assert_eq!(s.get_user("bob").await.unwrap(), None);
    let session =
        |id: u8, at: i64| SessionRecord { id_hash: [id; 32], user: "alice".into(), created_at: at, last_seen: at };
    s.add_session(&session(1, 1000), 0, 0).await.unwrap();
    s.add_session(&session(2, 1000), 0, 0).await.unwrap();
    // Valid: touched and returned.
    let used = s.use_session(&[1; 32], 1500, 900, 0).await.unwrap().unwrap();
    assert_eq!((used.user.as_str(), used.last_seen), ("alice", 1500));
    // A check with a time in the past (background polling) does not extend it.
    let checked = s.use_session(&[1; 32], 900, 900, 0).await.unwrap().unwrap();
    assert_eq!(checked.last_seen, 1500, "{}: never seen earlier than it was", b.name());
    // Idle past the bound: refused and deleted.
    assert_eq!(s.use_session(&[2; 32], 2000, 1200, 0).await.unwrap(), None);
    assert_eq!(s.use_session(&[2; 32], 2000, 0, 0).await.unwrap(), None, "{}: an expired session is gone", b.name());
    // Past the absolute bound however busy.
    assert_eq!(s.use_session(&[1; 32], 2000, 1400, 1001).await.unwrap(), None);
    s.add_session(&session(3, 3000), 0, 0).await.unwrap();
    assert!(s.remove_session(&[3; 32]).await.unwrap());
    assert!(!s.remove_session(&[3; 32]).await.unwrap());
    // Adding a session sweeps expired ones.
    s.add_session(&session(4, 10), 0, 0).await.unwrap();
    s.add_session(&session(5, 5000), 4000, 0).await.unwrap();
    assert_eq!(s.use_session(&[4; 32], 5000, 0, 0).await.unwrap(), None, "{}: swept at the next login", b.name());
    // Removing a user ends their sessions.
    s.add_session(&session(6, 5000), 0, 0).await.unwrap();
    assert!(s.remove_user("alice").await.unwrap());
    assert!(!s.remove_user("alice").await.unwrap());
    assert_eq!(s.use_session(&[6; 32], 5001, 0, 0).await.unwrap(), None);

    let token = |name: &str, id: u8| ApiTokenRecord {
        name: name.into(),
        scope: TokenScope::Read,
        hash: [id; 32],
        created_at: 1,
        last_used: None,
        created_by: "cli:root".into(),
    };
    s.add_api_token(&token("ci", 7)).await.unwrap();
    assert!(matches!(s.add_api_token(&token("ci", 8)).await, Err(StoreError::Conflict(_))));
    assert!(matches!(s.add_api_token(&token("other", 7)).await, Err(StoreError::Conflict(_))), "hashes are unique");
    let used = s.use_api_token(&[7; 32], 1000).await.unwrap().unwrap();
    assert_eq!((used.name.as_str(), used.last_used), ("ci", Some(1000)));
    let again = s.use_api_token(&[7; 32], 1030).await.unwrap().unwrap();
    assert_eq!(again.last_used, Some(1000), "{}: at most one write a minute", b.name());
    assert_eq!(s.use_api_token(&[7; 32], 1061).await.unwrap().unwrap().last_used, Some(1061));
    assert_eq!(s.use_api_token(&[9; 32], 1000).await.unwrap(), None);
    // put replaces the hash and scope of a token of that name.
    let mut admin = token("admin.token", 10);
    admin.scope = TokenScope::Admin;
    s.put_api_token(&admin).await.unwrap();
    s.put_api_token(&admin).await.unwrap();
    admin.hash = [11; 32];
    s.put_api_token(&admin).await.unwrap();
    assert_eq!(s.use_api_token(&[10; 32], 1).await.unwrap(), None, "the old value no longer works");
    assert_eq!(s.use_api_token(&[11; 32], 1).await.unwrap().unwrap().scope, TokenScope::Admin);
    let names: Vec<String> = s.list_api_tokens().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["admin.token", "ci"]);
    assert!(s.remove_api_token("ci").await.unwrap());
    assert_eq!(s.use_api_token(&[7; 32], 2000).await.unwrap(), None);

    for i in 0..7 {
        let e = AuditEntry {
            id: 0,
            at: 100 + i,
            actor: if i % 2 == 0 { "user:alice".into() } else { "token:ci".into() },
            source: "127.0.0.1".into(),
            action: if i < 3 { "node.create".into() } else { "node.remove".into() },
            target: format!("n{}", i % 3),
            summary: String::new(),
        };
        s.append_audit(&e).await.unwrap();
    }
    let q = |f: &dyn Fn(&mut AuditQuery)| {
        let mut q = AuditQuery { limit: 100, ..AuditQuery::default() };
        f(&mut q);
        q
    };
    let all = s.query_audit(&q(&|_| {})).await.unwrap();
    assert_eq!(all.len(), 7);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "{}: newest first", b.name());
    assert_eq!(s.query_audit(&q(&|q| q.actor = Some("token:ci".into()))).await.unwrap().len(), 3);
    assert_eq!(s.query_audit(&q(&|q| q.action = Some("node.create".into()))).await.unwrap().len(), 3);
    assert_eq!(s.query_audit(&q(&|q| q.target = Some("n0".into()))).await.unwrap().len(), 3);
    assert_eq!(s.query_audit(&q(&|q| q.since = Some(104))).await.unwrap().len(), 3);
    let page = s.query_audit(&q(&|q| q.limit = 2)).await.unwrap();
    let next = s
        .query_audit(&q(&|q| {
            q.limit = 2;
            q.before_id = Some(page[1].id);
        }))
        .await
        .unwrap();
    assert_eq!(next[0].id, all[2].id, "{}: paging continues where the page ended", b.name());
    assert_eq!(s.revision().await.unwrap(), r, "{}: accounts move no revision", b.name());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// An operator's change and its audit row commit together: one row for a
/// change, none for a refused change, a change of nothing, or a read.
async fn audited_changes(b: &Backend<'_>) {
    use edge_server::store::accounts::audited;
    use edge_server::store::{ApiTokenRecord, AuditEntry, AuditQuery, TokenScope, UserRecord};
    let (cfg, dir) = b.fresh("audited");
    let s = open(&cfg, &dir).await;
    let entry = |action: &str, target: &str| AuditEntry {
        id: 0,
        at: 1000,
        actor: "cli:test".into(),
        source: "test".into(),
        action: action.into(),
        target: target.into(),
        summary: "s".into(),
    };
    let rows = |action: &'static str| {
        let s = s.clone();
        async move {
            let q = AuditQuery { action: Some(action.into()), limit: 100, ..Default::default() };
            s.query_audit(&q).await.unwrap().len()
        }
    };
    let (r, written) = audited(entry("node.create", "a1"), s.add_node("a1", &hosts("a1"), &[1; 32])).await;
    assert!(r.is_ok() && written, "{}", b.name());
    let (r, written) = audited(entry("node.create", "a1"), s.add_node("a1", &hosts("a1"), &[2; 32])).await;
    assert!(matches!(r, Err(StoreError::Conflict(_))) && !written, "{}: a refused change writes no row", b.name());
    assert_eq!(rows("node.create").await, 1, "{}", b.name());
    let (r, written) = audited(entry("node.remove", "nope"), s.remove_node("nope")).await;
    assert!(!r.unwrap() && !written, "{}: a change of nothing writes no row", b.name());
    let (r, written) = audited(entry("node.remove", "a1"), s.list_nodes()).await;
    assert!(r.is_ok() && !written, "{}: a read writes no row", b.name());
    assert_eq!(rows("node.remove").await, 0, "{}", b.name());
    // A read before the change in one scope leaves the entry for the change.
    let (r, written) = audited(entry("node.remove", "a1"), async {
        s.list_nodes().await?;
        s.remove_node("a1").await
    })
    .await;
    assert!(r.unwrap() && written, "{}", b.name());
    assert_eq!(rows("node.remove").await, 1, "{}", b.name());

    let user = UserRecord { name: "carol".into(), password_hash: "$argon2id$x".into(), created_at: 1 };
    assert!(audited(entry("user.add", "carol"), s.add_user(&user)).await.1);
    assert!(!audited(entry("user.add", "carol"), s.add_user(&user)).await.1);
    assert!(audited(entry("user.remove", "carol"), s.remove_user("carol")).await.1);
    assert!(!audited(entry("user.remove", "carol"), s.remove_user("carol")).await.1);
    let token = ApiTokenRecord {
        name: "ci".into(),
        scope: TokenScope::Read,
        hash: [7; 32],
        created_at: 1,
        last_used: None,
        created_by: "cli:test".into(),
    };
    assert!(audited(entry("token.add", "ci"), s.add_api_token(&token)).await.1);
    assert!(audited(entry("token.remove", "ci"), s.remove_api_token("ci")).await.1);
    assert!(!audited(entry("token.remove", "ci"), s.remove_api_token("ci")).await.1);
    for (action, n) in [("user.add", 1), ("user.remove", 1), ("token.add", 1), ("token.remove", 1)] {
        assert_eq!(rows(action).await, n, "{}: {action}", b.name());
    }
}

/// Every case, in order, on one backend.
async fn conformance(b: &Backend<'_>) {
    nodes_and_conflicts(b).await;
    status(b).await;
    challenges(b).await;
    dns_records(b).await;
    services(b).await;
    domains(b).await;
    modes(b).await;
    events(b).await;
    concurrent_writers(b).await;
    migrations(b).await;
    accounts(b).await;
    audited_changes(b).await;
}

#[test]
fn sqlite_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    runtime().block_on(conformance(&Backend::Sqlite(tmp.path())));
}

#[test]
fn postgres_conforms() {
    let pg = Postgres::start().unwrap();
    runtime().block_on(conformance(&Backend::Postgres(&pg)));
}

#[test]
fn copies_go_both_ways_between_backends() {
    let pg = Postgres::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (sqlite, postgres) = (Backend::Sqlite(tmp.path()), Backend::Postgres(&pg));
    runtime().block_on(async {
        copy_into(&sqlite, &postgres).await;
        copy_into(&postgres, &sqlite).await;
    });
}

/// The database stops: reads and writes fail fast as unavailable; it comes
/// back: the pool recovers, and the watch asks for a resync.
#[test]
fn postgres_outage_fails_fast_and_recovers() {
    let pg = Postgres::start().unwrap();
    let b = Backend::Postgres(&pg);
    runtime().block_on(async {
        let (cfg, dir) = b.fresh("outage");
        let s = open(&cfg, &dir).await;
        s.add_node("n1", &[], &[1; 32]).await.unwrap();
        let mut feed = s.subscribe();
        let stop = CancellationToken::new();
        tokio::spawn(s.watch(s.revision().await.unwrap(), stop.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        pg.stop().unwrap();
        let started = Instant::now();
        let err = s.add_node("n2", &[], &[2; 32]).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(err.to_string().contains(&pg.url("outage")), "the error names the store: {err}");
        assert!(started.elapsed() < Duration::from_secs(4), "failed in {:?}", started.elapsed());
        assert!(s.get_node("n1").await.unwrap_err().is_unavailable());
        pg.restart().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let resynced = loop {
            match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), feed.recv()).await {
                Ok(Ok(FeedEvent::Resync)) => break true,
                Ok(Ok(_)) => {}
                _ => break false,
            }
        };
        assert!(resynced, "the watch asked for a resync after reconnecting");
        s.add_node("n2", &[], &[2; 32]).await.expect("writes work again without reopening");
        assert_eq!(s.list_nodes().await.unwrap().len(), 2, "nothing acknowledged was lost");
        stop.cancel();
    });
}

/// TLS to PostgreSQL: verify-full and verify-ca against the test CA work
/// (and the sessions are TLS); the system roots, which do not hold the test
/// CA, are refused at the handshake; a server without TLS is refused rather
/// than spoken to in plain text.
#[test]
fn postgres_over_verified_tls() {
    let pg = Postgres::start_tls().unwrap();
    let plain = Postgres::start().unwrap();
    runtime().block_on(async {
        let url = pg.create_db("tls").unwrap();
        let dir = std::env::temp_dir();
        let verified = StoreConfig {
            url: Some(url.clone()),
            password_file: Some(pg.password_file()),
            tls: Some(store::StoreTls::VerifyFull),
            ca_file: pg.ca.clone(),
            ..Default::default()
        };
        let s = store::open(&verified, &dir).await.unwrap();
        s.add_node("n1", &[], &[1; 32]).await.unwrap();
        let sessions = "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s
            JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'edge-server'";
        let counts = pg.sql("tls", sessions).unwrap();
        let (tls, all) = counts.split_once('|').unwrap();
        assert!(all.parse::<u32>().unwrap() >= 1 && tls == all, "every session of the store is TLS: {counts}");
        let ca_only = StoreConfig { tls: Some(store::StoreTls::VerifyCa), ..verified.clone() };
        store::open(&ca_only, &dir).await.unwrap().get_node("n1").await.unwrap().unwrap();
        let wrong_roots = StoreConfig { ca_file: None, ..verified.clone() };
        let err = store::open(&wrong_roots, &dir).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("UnknownIssuer") || text.contains("invalid peer certificate"), "{text}");
        assert!(!err.is_unavailable(), "a bad certificate is no outage to wait out: {err}");
        // The same settings against a server that offers no TLS.
        let no_tls = StoreConfig {
            url: Some(plain.create_db("tls").unwrap()),
            password_file: Some(plain.password_file()),
            ..verified
        };
        let err = store::open(&no_tls, &dir).await.unwrap_err();
        assert!(err.to_string().to_lowercase().contains("tls") || err.to_string().contains("ssl"), "{err}");
        let seen = plain
            .sql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'edge-server'")
            .unwrap();
        assert_eq!(seen, "0", "no plaintext session was opened");
    });
}
