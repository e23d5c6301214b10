//! [`AccountStore`] on SQLite.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::store::accounts::{AccountStore, ApiTokenRecord, AuditEntry, AuditQuery, SessionRecord, UserRecord};
use crate::store::StoreError;

fn token_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ApiTokenRecord> {
    let scope: String = row.get(1)?;
    Ok(ApiTokenRecord {
        name: row.get(0)?,
        scope: scope.parse().unwrap_or(crate::store::accounts::TokenScope::Read),
        hash: row.get::<_, [u8; 32]>(2)?,
        created_at: row.get(3)?,
        last_used: row.get(4)?,
        created_by: row.get(5)?,
    })
}

const TOKEN_COLUMNS: &str = "name, scope, hash, created_at, last_used, created_by";

#[async_trait::async_trait]
impl AccountStore for SqliteStore {
    async fn add_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        let u = user.clone();
        let added = self
            .run(move |db| {
                db.write(|tx, _| {
                    let n = tx.execute(
                        "INSERT OR IGNORE INTO users (name, password_hash, created_at) VALUES (?1, ?2, ?3)",
                        params![u.name, u.password_hash, u.created_at],
                    )?;
                    if n > 0 {
                        db.audit_pending(tx)?;
                    }
                    Ok(n)
                })
            })
            .await?;
        if added == 0 {
            return Err(StoreError::Conflict(format!("a user named {:?} exists already", user.name)));
        }
        Ok(())
    }

    async fn remove_user(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.run(move |db| {
            db.write(|tx, _| {
                tx.execute("DELETE FROM sessions WHERE user = ?1", params![name])?;
                let removed = tx.execute("DELETE FROM users WHERE name = ?1", params![name])? > 0;
                if removed {
                    db.audit_pending(tx)?;
                }
                Ok(removed)
            })
        })
        .await
    }

    async fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let name = name.to_string();
        self.read(move |conn| {
            conn.query_row("SELECT name, password_hash, created_at FROM users WHERE name = ?1", params![name], |r| {
                Ok(UserRecord { name: r.get(0)?, password_hash: r.get(1)?, created_at: r.get(2)? })
            })
            .optional()
        })
        .await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare("SELECT name, password_hash, created_at FROM users ORDER BY name")?;
            let rows = stmt.query_map([], |r| {
                Ok(UserRecord { name: r.get(0)?, password_hash: r.get(1)?, created_at: r.get(2)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn add_session(
        &self,
        session: &SessionRecord,
        idle_before: i64,
        created_before: i64,
    ) -> Result<(), StoreError> {
        let s = session.clone();
        self.run(move |db| {
            db.write(|tx, _| {
                tx.execute(
                    "DELETE FROM sessions WHERE last_seen < ?1 OR created_at < ?2",
                    params![idle_before, created_before],
                )?;
                tx.execute(
                    "INSERT INTO sessions (id_hash, user, created_at, last_seen) VALUES (?1, ?2, ?3, ?4)",
                    params![s.id_hash.to_vec(), s.user, s.created_at, s.last_seen],
                )?;
                Ok(())
            })
        })
        .await
    }

    async fn use_session(
        &self,
        id_hash: &[u8; 32],
        now: i64,
        idle_before: i64,
        created_before: i64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let (id, id_hash) = (id_hash.to_vec(), *id_hash);
        self.run(move |db| {
            // A read first: an unknown id (a forged cookie) takes no write
            // lock.
            let found = db.with(|conn| {
                conn.query_row(
                    "SELECT user, created_at, last_seen FROM sessions WHERE id_hash = ?1",
                    params![id],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
                )
                .optional()
            })?;
            let Some((user, created_at, last_seen)) = found else { return Ok((None, Vec::new())) };
            if last_seen < idle_before || created_at < created_before {
                db.write(|tx, _| {
                    tx.execute(
                        "DELETE FROM sessions WHERE id_hash = ?1 AND (last_seen < ?2 OR created_at < ?3)",
                        params![id, idle_before, created_before],
                    )
                })?;
                return Ok((None, Vec::new()));
            }
            // Touched only if still there (a logout may have raced us).
            let (touched, _) = db.write(|tx, _| {
                tx.execute("UPDATE sessions SET last_seen = MAX(last_seen, ?2) WHERE id_hash = ?1", params![id, now])
            })?;
            let session = SessionRecord { id_hash, user, created_at, last_seen: last_seen.max(now) };
            Ok(((touched > 0).then_some(session), Vec::new()))
        })
        .await
    }

    async fn remove_session(&self, id_hash: &[u8; 32]) -> Result<bool, StoreError> {
        let id = id_hash.to_vec();
        self.run(move |db| {
            db.write(|tx, _| Ok(tx.execute("DELETE FROM sessions WHERE id_hash = ?1", params![id])? > 0))
        })
        .await
    }

    async fn add_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        let t = token.clone();
        let added = self
            .run(move |db| {
                db.write(|tx, _| {
                    let n = tx.execute(
                        "INSERT OR IGNORE INTO api_tokens (name, scope, hash, created_at, last_used, created_by)
                         VALUES (?1, ?2, ?3, ?4, NULL, ?5)",
                        params![t.name, t.scope.as_str(), t.hash.to_vec(), t.created_at, t.created_by],
                    )?;
                    if n > 0 {
                        db.audit_pending(tx)?;
                    }
                    Ok(n)
                })
            })
            .await?;
        if added == 0 {
            return Err(StoreError::Conflict(format!("a token named {:?} exists already", token.name)));
        }
        Ok(())
    }

    async fn put_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        let t = token.clone();
        self.run(move |db| {
            db.write(|tx, _| {
                tx.execute(
                    "INSERT INTO api_tokens (name, scope, hash, created_at, last_used, created_by)
                     VALUES (?1, ?2, ?3, ?4, NULL, ?5)
                     ON CONFLICT(name) DO UPDATE SET scope = excluded.scope, hash = excluded.hash
                     WHERE api_tokens.hash != excluded.hash OR api_tokens.scope != excluded.scope",
                    params![t.name, t.scope.as_str(), t.hash.to_vec(), t.created_at, t.created_by],
                )?;
                Ok(())
            })
        })
        .await
    }

    async fn remove_api_token(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.run(move |db| {
            db.write(|tx, _| {
                let removed = tx.execute("DELETE FROM api_tokens WHERE name = ?1", params![name])? > 0;
                if removed {
                    db.audit_pending(tx)?;
                }
                Ok(removed)
            })
        })
        .await
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY name"))?;
            let rows = stmt.query_map([], token_row)?;
            rows.collect()
        })
        .await
    }

    async fn use_api_token(&self, hash: &[u8; 32], now: i64) -> Result<Option<ApiTokenRecord>, StoreError> {
        let hash = hash.to_vec();
        self.run(move |db| {
            // A read first: most requests find a recent `last_used` and
            // need no write lock.
            let found = db.with(|conn| {
                conn.query_row(
                    &format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE hash = ?1"),
                    params![hash],
                    token_row,
                )
                .optional()
            })?;
            let Some(mut token) = found else { return Ok((None, Vec::new())) };
            if token.last_used.is_none_or(|t| t < now - 60) {
                db.write(|tx, _| {
                    tx.execute("UPDATE api_tokens SET last_used = ?2 WHERE hash = ?1", params![hash, now])
                })?;
                token.last_used = Some(now);
            }
            Ok((Some(token), Vec::new()))
        })
        .await
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<i64, StoreError> {
        let e = entry.clone();
        self.run(move |db| {
            db.write(|tx, _| {
                tx.execute(
                    "INSERT INTO audit (at, actor, source, action, target, summary) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![e.at, e.actor, e.source, e.action, e.target, e.summary],
                )?;
                Ok(tx.last_insert_rowid())
            })
        })
        .await
    }

    async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let q = query.clone();
        self.read(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, at, actor, source, action, target, summary FROM audit
                 WHERE (?1 IS NULL OR actor = ?1) AND (?2 IS NULL OR action = ?2) AND (?3 IS NULL OR target = ?3)
                   AND (?4 IS NULL OR at >= ?4) AND (?5 IS NULL OR id < ?5)
                 ORDER BY id DESC LIMIT ?6",
            )?;
            let rows =
                stmt.query_map(params![q.actor, q.action, q.target, q.since, q.before_id, q.limit as i64], |r| {
                    Ok(AuditEntry {
                        id: r.get(0)?,
                        at: r.get(1)?,
                        actor: r.get(2)?,
                        source: r.get(3)?,
                        action: r.get(4)?,
                        target: r.get(5)?,
                        summary: r.get(6)?,
                    })
                })?;
            rows.collect()
        })
        .await
    }
}
