//! Operators' accounts in the store: users (Argon2id hashes), browser
//! sessions (only a hash of the id), API tokens (only a hash), and the
//! audit log of every change made by an operator.
//!
//! Every method is one transaction; a user's removal takes their sessions
//! with it. Times are Unix seconds.
//!
//! An operator's change and its audit row commit together: [`audited`]
//! makes an entry pending for one store call, and the backend writes it in
//! that call's transaction when (and only if) the call changes something.

use std::cell::RefCell;
use std::future::Future;

use serde::Serialize;

use super::StoreError;

tokio::task_local! {
    /// The audit entry of the store call being made (see [`audited`]).
    static PENDING_AUDIT: RefCell<Option<AuditEntry>>;
}

/// Runs `call` (one store call) with `entry` pending: the backend writes
/// the entry in the call's own transaction, at its first change. Returns
/// the call's result and whether the entry was written (false when the
/// call changed nothing or failed).
pub async fn audited<T>(
    entry: AuditEntry,
    call: impl Future<Output = Result<T, StoreError>>,
) -> (Result<T, StoreError>, bool) {
    PENDING_AUDIT
        .scope(RefCell::new(Some(entry)), async move {
            let result = call.await;
            let written = result.is_ok() && PENDING_AUDIT.with(|p| p.borrow().is_none());
            (result, written)
        })
        .await
}

/// Takes the pending entry, if any (backends, in the transaction).
pub(crate) fn take_pending_audit() -> Option<AuditEntry> {
    PENDING_AUDIT.try_with(|p| p.borrow_mut().take()).ok().flatten()
}

/// Puts back an entry a call did not write.
pub(crate) fn restore_pending_audit(entry: AuditEntry) {
    let _ = PENDING_AUDIT.try_with(|p| *p.borrow_mut() = Some(entry));
}

pub use edge_proto::admin::{AuditEntry, TokenScope};

/// An operator who logs in to the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRecord {
    /// Login name.
    pub name: String,
    /// The Argon2id hash in PHC string form.
    #[serde(skip)]
    pub password_hash: String,
    /// When the user was added.
    pub created_at: i64,
}

/// A logged-in browser session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// SHA-256 of the session id (the id itself is only in the cookie).
    pub id_hash: [u8; 32],
    /// Whose session.
    pub user: String,
    /// Login time (the absolute expiry counts from it).
    pub created_at: i64,
    /// Last request (the idle expiry counts from it).
    pub last_seen: i64,
}

/// An API token for automation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiTokenRecord {
    /// Unique name (`ci`, `admin.token`).
    pub name: String,
    /// What it may do.
    pub scope: TokenScope,
    /// SHA-256 of the token.
    #[serde(skip)]
    pub hash: [u8; 32],
    /// When it was made.
    pub created_at: i64,
    /// Last request made with it (updated at most once a minute).
    pub last_used: Option<i64>,
    /// Who made it.
    pub created_by: String,
}

/// Filters and paging for [`AccountStore::query_audit`].
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<i64>,
    /// Only entries with a smaller id (the next page).
    pub before_id: Option<i64>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// Accounts and the audit log.
#[async_trait::async_trait]
pub trait AccountStore: Send + Sync {
    /// Adds a user; [`StoreError::Conflict`] when the name is taken.
    async fn add_user(&self, user: &UserRecord) -> Result<(), StoreError>;
    /// Removes a user and every session of theirs; `false` if no such user.
    async fn remove_user(&self, name: &str) -> Result<bool, StoreError>;
    /// One user.
    async fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError>;
    /// Every user, by name.
    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError>;
    /// Stores a new session, first dropping every session that is past
    /// `idle_before` (idle) or `created_before` (absolute).
    async fn add_session(
        &self,
        session: &SessionRecord,
        idle_before: i64,
        created_before: i64,
    ) -> Result<(), StoreError>;
    /// The session with this id hash if it is still valid (seen at or after
    /// `idle_before`, created at or after `created_before`, its user still
    /// exists), marking it seen at `now` (never earlier than it was: a
    /// `now` in the past checks without extending); an expired one is
    /// deleted.
    async fn use_session(
        &self,
        id_hash: &[u8; 32],
        now: i64,
        idle_before: i64,
        created_before: i64,
    ) -> Result<Option<SessionRecord>, StoreError>;
    /// Ends a session; `false` if there was none.
    async fn remove_session(&self, id_hash: &[u8; 32]) -> Result<bool, StoreError>;
    /// Adds a token; [`StoreError::Conflict`] when the name is taken.
    async fn add_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError>;
    /// Adds the token, or gives the one of that name this hash and scope
    /// (how the configured admin token stays valid across restarts).
    async fn put_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError>;
    /// Revokes a token; `false` if no such token.
    async fn remove_api_token(&self, name: &str) -> Result<bool, StoreError>;
    /// Every token, by name.
    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError>;
    /// The token with this hash, noting its use at `now` (at most one write
    /// a minute per token).
    async fn use_api_token(&self, hash: &[u8; 32], now: i64) -> Result<Option<ApiTokenRecord>, StoreError>;
    /// Appends to the audit log (`id` is assigned; the given one is ignored).
    async fn append_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError>;
    /// Audit entries matching `query`, newest first.
    async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
}
