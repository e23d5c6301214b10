//! [`AccountStore`] on PostgreSQL.

use tokio_postgres::Row;

use super::{col, PostgresStore};
use crate::store::accounts::{
    AccountStore, ApiTokenRecord, AuditEntry, AuditQuery, SessionRecord, TokenScope, UserRecord,
};
use crate::store::StoreError;

const TOKEN_COLUMNS: &str = "name, scope, hash, created_at, last_used, created_by";

impl PostgresStore {
    fn token_row(&self, row: &Row) -> Result<ApiTokenRecord, StoreError> {
        let s = self.store();
        let scope: String = col(s, row, 1)?;
        Ok(ApiTokenRecord {
            name: col(s, row, 0)?,
            scope: scope
                .parse::<TokenScope>()
                .map_err(|_| StoreError::Corrupt { store: s.to_string(), what: format!("token scope {scope:?}") })?,
            hash: col::<Vec<u8>>(s, row, 2)?.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                store: s.to_string(),
                what: "api_tokens.hash is not 32 bytes".into(),
            })?,
            created_at: col(s, row, 3)?,
            last_used: col(s, row, 4)?,
            created_by: col(s, row, 5)?,
        })
    }

    fn user_row(&self, row: &Row) -> Result<UserRecord, StoreError> {
        let s = self.store();
        Ok(UserRecord { name: col(s, row, 0)?, password_hash: col(s, row, 1)?, created_at: col(s, row, 2)? })
    }
}

#[async_trait::async_trait]
impl AccountStore for PostgresStore {
    async fn add_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx
            .execute(
                "INSERT INTO users (name, password_hash, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&user.name, &user.password_hash, &user.created_at],
            )
            .await
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("a user named {:?} exists already", user.name)));
        }
        self.audit_pending(&tx).await?;
        self.commit(tx, Vec::new()).await
    }

    async fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM sessions WHERE username = $1", &[&name]).await.map_err(|e| self.err(e))?;
        let n = tx.execute("DELETE FROM users WHERE name = $1", &[&name]).await.map_err(|e| self.err(e))?;
        if n > 0 {
            self.audit_pending(&tx).await?;
        }
        self.commit(tx, Vec::new()).await?;
        Ok(n > 0)
    }

    async fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT name, password_hash, created_at FROM users WHERE name = $1", &[&name])
            .await
            .map_err(|e| self.err(e))?;
        row.map(|r| self.user_row(&r)).transpose()
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT name, password_hash, created_at FROM users ORDER BY name", &[])
            .await
            .map_err(|e| self.err(e))?;
        rows.iter().map(|r| self.user_row(r)).collect()
    }

    async fn add_session(
        &self,
        session: &SessionRecord,
        idle_before: i64,
        created_before: i64,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM sessions WHERE last_seen < $1 OR created_at < $2", &[&idle_before, &created_before])
            .await
            .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO sessions (id_hash, username, created_at, last_seen) VALUES ($1, $2, $3, $4)",
            &[&session.id_hash.as_slice(), &session.user, &session.created_at, &session.last_seen],
        )
        .await
        .map_err(|e| self.err(e))?;
        self.commit(tx, Vec::new()).await
    }

    async fn use_session(
        &self,
        id_hash: &[u8; 32],
        now: i64,
        idle_before: i64,
        created_before: i64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let client = self.client().await?;
        let id = id_hash.as_slice();
        // One statement: a valid session is touched and returned.
        let row = client
            .query_opt(
                "UPDATE sessions SET last_seen = GREATEST(last_seen, $2)
                 WHERE id_hash = $1 AND last_seen >= $3 AND created_at >= $4
                 RETURNING username, created_at, last_seen",
                &[&id, &now, &idle_before, &created_before],
            )
            .await
            .map_err(|e| self.err(e))?;
        match row {
            Some(r) => Ok(Some(SessionRecord {
                id_hash: *id_hash,
                user: col(self.store(), &r, 0)?,
                created_at: col(self.store(), &r, 1)?,
                last_seen: col(self.store(), &r, 2)?,
            })),
            None => {
                client
                    .execute(
                        "DELETE FROM sessions WHERE id_hash = $1 AND (last_seen < $2 OR created_at < $3)",
                        &[&id, &idle_before, &created_before],
                    )
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(None)
            }
        }
    }

    async fn remove_session(&self, id_hash: &[u8; 32]) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM sessions WHERE id_hash = $1", &[&id_hash.as_slice()])
            .await
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    async fn add_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx
            .execute(
                "INSERT INTO api_tokens (name, scope, hash, created_at, last_used, created_by)
                 VALUES ($1, $2, $3, $4, NULL, $5) ON CONFLICT DO NOTHING",
                &[&token.name, &token.scope.as_str(), &token.hash.as_slice(), &token.created_at, &token.created_by],
            )
            .await
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "a token named {:?} (or with that value) exists already",
                token.name
            )));
        }
        self.audit_pending(&tx).await?;
        self.commit(tx, Vec::new()).await
    }

    async fn put_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO api_tokens (name, scope, hash, created_at, last_used, created_by)
                 VALUES ($1, $2, $3, $4, NULL, $5)
                 ON CONFLICT (name) DO UPDATE SET scope = excluded.scope, hash = excluded.hash
                 WHERE api_tokens.hash <> excluded.hash OR api_tokens.scope <> excluded.scope",
                &[&token.name, &token.scope.as_str(), &token.hash.as_slice(), &token.created_at, &token.created_by],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn remove_api_token(&self, name: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.err(e))?;
        let n = tx.execute("DELETE FROM api_tokens WHERE name = $1", &[&name]).await.map_err(|e| self.err(e))?;
        if n > 0 {
            self.audit_pending(&tx).await?;
        }
        self.commit(tx, Vec::new()).await?;
        Ok(n > 0)
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY name"), &[])
            .await
            .map_err(|e| self.err(e))?;
        rows.iter().map(|r| self.token_row(r)).collect()
    }

    async fn use_api_token(&self, hash: &[u8; 32], now: i64) -> Result<Option<ApiTokenRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE hash = $1"), &[&hash.as_slice()])
            .await
            .map_err(|e| self.err(e))?;
        let Some(row) = row else { return Ok(None) };
        let mut token = self.token_row(&row)?;
        if token.last_used.is_none_or(|t| t < now - 60) {
            client
                .execute("UPDATE api_tokens SET last_used = $2 WHERE hash = $1", &[&hash.as_slice(), &now])
                .await
                .map_err(|e| self.err(e))?;
            token.last_used = Some(now);
        }
        Ok(Some(token))
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO audit (at, actor, source, action, target, summary) VALUES ($1, $2, $3, $4, $5, $6)
                 RETURNING id",
                &[&entry.at, &entry.actor, &entry.source, &entry.action, &entry.target, &entry.summary],
            )
            .await
            .map_err(|e| self.err(e))?;
        col(self.store(), &row, 0)
    }

    async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let client = self.client().await?;
        let limit = query.limit as i64;
        let rows = client
            .query(
                "SELECT id, at, actor, source, action, target, summary FROM audit
                 WHERE ($1::text IS NULL OR actor = $1) AND ($2::text IS NULL OR action = $2)
                   AND ($3::text IS NULL OR target = $3) AND ($4::bigint IS NULL OR at >= $4)
                   AND ($5::bigint IS NULL OR id < $5)
                 ORDER BY id DESC LIMIT $6",
                &[&query.actor, &query.action, &query.target, &query.since, &query.before_id, &limit],
            )
            .await
            .map_err(|e| self.err(e))?;
        let s = self.store();
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: col(s, r, 0)?,
                    at: col(s, r, 1)?,
                    actor: col(s, r, 2)?,
                    source: col(s, r, 3)?,
                    action: col(s, r, 4)?,
                    target: col(s, r, 5)?,
                    summary: col(s, r, 6)?,
                })
            })
            .collect()
    }
}
