//! A deadline on every operation of a store that lives across a network.
//!
//! A database that stops answering without closing (a partition, a hung
//! server, a proxy in front of it) leaves a statement waiting for as long as
//! TCP keeps the connection: acknowledged bytes never trip the kernel's
//! timers. Here every operation fails as [`StoreError::Unavailable`] when
//! its deadline passes: point operations quickly, whole-table reads (the
//! load at start and after a resync) later. `store copy` has none: it is an
//! operator's one transaction and prints its progress.

use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{
    AccessRecord, AccountStore, ApiTokenRecord, AuditEntry, AuditQuery, ChallengeRecord, Counts, DomainRecord,
    FeedEvent, Fence, HttpMode, Lease, ModeChange, ModeHistory, NodeRecord, NodeStatus, OrderLock, ProbeSample,
    Published, RoutingState, ServerList, ServerRecord, ServiceRecord, SessionRecord, Snapshot, StaticKind,
    StaticRecord, Store, StoreError, UserRecord,
};

/// `inner` with deadlines.
#[derive(Debug)]
pub struct WithDeadline<S> {
    inner: S,
    point: Duration,
    bulk: Duration,
}

impl<S: Store> WithDeadline<S> {
    /// `point` for single rows and writes, `bulk` for whole-table reads.
    pub fn new(inner: S, point: Duration, bulk: Duration) -> Self {
        Self { inner, point, bulk }
    }

    async fn within<T>(
        &self,
        limit: Duration,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable {
                store: self.inner.describe().to_string(),
                reason: format!("no answer within {} ms", limit.as_millis()),
            }),
        }
    }
}

#[async_trait::async_trait]
impl<S: Store> Store for WithDeadline<S> {
    fn describe(&self) -> &str {
        self.inner.describe()
    }
    async fn add_node(&self, name: &str, hostnames: &[String], hash: &[u8; 32]) -> Result<NodeRecord, StoreError> {
        self.within(self.point, self.inner.add_node(name, hostnames, hash)).await
    }
    async fn remove_node(&self, name: &str) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.remove_node(name)).await
    }
    async fn set_token_hash(&self, name: &str, hash: &[u8; 32]) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.set_token_hash(name, hash)).await
    }
    async fn set_http_mode(&self, name: &str, mode: HttpMode) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.set_http_mode(name, mode)).await
    }
    async fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.within(self.point, self.inner.get_node(name)).await
    }
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.within(self.bulk, self.inner.list_nodes()).await
    }
    async fn revision(&self) -> Result<i64, StoreError> {
        self.within(self.point, self.inner.revision()).await
    }
    async fn routing_state(&self) -> Result<RoutingState, StoreError> {
        self.within(self.bulk, self.inner.routing_state()).await
    }
    async fn record_statuses(&self, statuses: &[(String, NodeStatus)]) -> Result<(), StoreError> {
        self.within(self.bulk, self.inner.record_statuses(statuses)).await
    }
    async fn reset_status(&self) -> Result<(), StoreError> {
        self.within(self.bulk, self.inner.reset_status()).await
    }
    async fn put_challenge(
        &self,
        node: &str,
        name: &str,
        value: &str,
        max: usize,
        stale_before: i64,
    ) -> Result<Published, StoreError> {
        self.within(self.point, self.inner.put_challenge(node, name, value, max, stale_before)).await
    }
    async fn remove_challenge(&self, node: &str, name: &str, value: Option<&str>) -> Result<usize, StoreError> {
        self.within(self.point, self.inner.remove_challenge(node, name, value)).await
    }
    async fn node_challenges(&self, node: &str) -> Result<Vec<ChallengeRecord>, StoreError> {
        self.within(self.point, self.inner.node_challenges(node)).await
    }
    async fn list_challenges(&self) -> Result<Vec<ChallengeRecord>, StoreError> {
        self.within(self.bulk, self.inner.list_challenges()).await
    }
    async fn expire_challenges(&self, before: i64) -> Result<usize, StoreError> {
        self.within(self.point, self.inner.expire_challenges(before)).await
    }
    async fn record_probe(&self, name: &str, sample: &ProbeSample, keep: usize) -> Result<(), StoreError> {
        self.within(self.point, self.inner.record_probe(name, sample, keep)).await
    }
    async fn record_transition(&self, name: &str, t: &ModeChange, endpoint: Option<&str>) -> Result<(), StoreError> {
        self.within(self.point, self.inner.record_transition(name, t, endpoint)).await
    }
    async fn record_transition_fenced(
        &self,
        name: &str,
        t: &ModeChange,
        endpoint: Option<&str>,
        fence: &Fence,
    ) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.record_transition_fenced(name, t, endpoint, fence)).await
    }
    async fn register_server(&self, record: &ServerRecord, lease_ms: i64) -> Result<(), StoreError> {
        self.within(self.point, self.inner.register_server(record, lease_ms)).await
    }
    async fn renew_server(&self, id: &str, lease_ms: i64, tunnels: &[String]) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.renew_server(id, lease_ms, tunnels)).await
    }
    async fn expire_servers(&self) -> Result<usize, StoreError> {
        self.within(self.point, self.inner.expire_servers()).await
    }
    async fn leave_server(&self, id: &str) -> Result<(), StoreError> {
        self.within(self.point, self.inner.leave_server(id)).await
    }
    async fn remove_server(&self, id: &str) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.remove_server(id)).await
    }
    async fn list_servers(&self) -> Result<ServerList, StoreError> {
        self.within(self.point, self.inner.list_servers()).await
    }
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<Option<i64>, StoreError> {
        self.within(self.point, self.inner.acquire_lease(name, holder, ttl_ms)).await
    }
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.within(self.point, self.inner.release_lease(name, holder)).await
    }
    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        self.within(self.point, self.inner.lease(name)).await
    }
    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.within(self.point, self.inner.setting(key)).await
    }
    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError> {
        self.within(self.point, self.inner.init_setting(key, value)).await
    }
    async fn lock_order(&self, node: &str, wait: Duration) -> Result<OrderLock, StoreError> {
        // The wait is the caller's; the deadline covers getting a connection.
        self.within(wait + self.point, self.inner.lock_order(node, wait)).await
    }
    async fn mode_history(&self, name: &str, limit: usize) -> Result<ModeHistory, StoreError> {
        self.within(self.point, self.inner.mode_history(name, limit)).await
    }
    async fn list_dns_records(&self) -> Result<Vec<StaticRecord>, StoreError> {
        self.within(self.point, self.inner.list_dns_records()).await
    }
    async fn add_dns_record(&self, record: &StaticRecord) -> Result<(), StoreError> {
        self.within(self.point, self.inner.add_dns_record(record)).await
    }
    async fn remove_dns_records(
        &self,
        name: &str,
        kind: Option<StaticKind>,
        value: Option<&str>,
    ) -> Result<usize, StoreError> {
        self.within(self.point, self.inner.remove_dns_records(name, kind, value)).await
    }
    async fn list_services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        self.within(self.point, self.inner.list_services()).await
    }
    async fn add_service(&self, service: &ServiceRecord) -> Result<(), StoreError> {
        self.within(self.point, self.inner.add_service(service)).await
    }
    async fn remove_service(&self, name: &str) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.remove_service(name)).await
    }
    async fn list_domains(&self) -> Result<Vec<DomainRecord>, StoreError> {
        self.within(self.point, self.inner.list_domains()).await
    }
    async fn add_domain(&self, domain: &DomainRecord) -> Result<(), StoreError> {
        self.within(self.point, self.inner.add_domain(domain)).await
    }
    async fn remove_domain(&self, name: &str) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.remove_domain(name)).await
    }
    async fn record_domain_check(
        &self,
        checked: &DomainRecord,
        state: &edge_proto::domains::VerifyState,
    ) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.record_domain_check(checked, state)).await
    }
    async fn list_access(&self) -> Result<Vec<AccessRecord>, StoreError> {
        self.within(self.point, self.inner.list_access()).await
    }
    async fn set_access(&self, record: &AccessRecord) -> Result<(), StoreError> {
        self.within(self.point, self.inner.set_access(record)).await
    }
    async fn clear_access(&self, scope: &str) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.clear_access(scope)).await
    }
    async fn counts(&self) -> Result<Counts, StoreError> {
        self.within(self.bulk, self.inner.counts()).await
    }
    async fn export(&self) -> Result<Snapshot, StoreError> {
        self.inner.export().await
    }
    async fn import(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.inner.import(snapshot).await
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FeedEvent> {
        self.inner.subscribe()
    }
    fn watch(&self, since: i64, shutdown: CancellationToken) -> BoxFuture<'static, ()> {
        self.inner.watch(since, shutdown)
    }
}

#[async_trait::async_trait]
impl<S: Store> AccountStore for WithDeadline<S> {
    async fn add_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        self.within(self.point, self.inner.add_user(user)).await
    }
    async fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.remove_user(name)).await
    }
    async fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.within(self.point, self.inner.get_user(name)).await
    }
    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.within(self.bulk, self.inner.list_users()).await
    }
    async fn add_session(&self, s: &SessionRecord, idle_before: i64, created_before: i64) -> Result<(), StoreError> {
        self.within(self.point, self.inner.add_session(s, idle_before, created_before)).await
    }
    async fn use_session(
        &self,
        id_hash: &[u8; 32],
        now: i64,
        idle_before: i64,
        created_before: i64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.within(self.point, self.inner.use_session(id_hash, now, idle_before, created_before)).await
    }
    async fn remove_session(&self, id_hash: &[u8; 32]) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.remove_session(id_hash)).await
    }
    async fn add_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        self.within(self.point, self.inner.add_api_token(token)).await
    }
    async fn put_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        self.within(self.point, self.inner.put_api_token(token)).await
    }
    async fn remove_api_token(&self, name: &str) -> Result<bool, StoreError> {
        self.within(self.point, self.inner.remove_api_token(name)).await
    }
    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        self.within(self.bulk, self.inner.list_api_tokens()).await
    }
    async fn use_api_token(&self, hash: &[u8; 32], now: i64) -> Result<Option<ApiTokenRecord>, StoreError> {
        self.within(self.point, self.inner.use_api_token(hash, now)).await
    }
    async fn append_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        self.within(self.point, self.inner.append_audit(entry)).await
    }
    async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        self.within(self.bulk, self.inner.query_audit(query)).await
    }
}
