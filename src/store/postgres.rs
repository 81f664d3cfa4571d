//! PostgreSQL store, for several brokers sharing one database.
//!
//! - Versioned migrations, applied at start under an advisory lock so replicas starting together
//!   migrate once.
//! - Revocation events get their `seq` under a transaction-scoped advisory lock, so `seq` order is
//!   commit order and a watcher resuming from a cursor never skips an event committed late.
//!   Each event is announced with `NOTIFY ephemera_revocations` in the same transaction;
//!   [`revocation_feed`] turns those into bus events on every replica.
//! - The reaper claims due tasks with `FOR UPDATE SKIP LOCKED`: replicas reaping at once take
//!   disjoint tasks, and each task is ended (and announced) exactly once.
//! - Leases are group-committed: one `INSERT ... SELECT FROM UNNEST(...)` per batch.
//! - Every database error becomes [`StoreError::Unavailable`]; the pool replaces broken
//!   connections, so service resumes by itself when the database returns.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;

use crate::secret::Secret;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};

use super::rows::{
    GRANT_COLUMNS, GRANT_GROUP, KEY_COLUMNS, LEASE_COLUMNS, LOCK_COLUMNS, PRINCIPAL_COLUMNS,
    REVOCATION_COLUMNS, TASK_COLUMNS, TASK_INSERT_COLUMNS, TASK_INSERT_VALUES, bind_key, bind_task,
    grant_row, grants_json, key_row, lease_row, lock_row, principal_row, revocation_row, task_row,
};
use super::{
    BoxFuture, Grant, JoinToken, KeyOp, Lease, LeaseStatus, ListFilter, NewJoinToken, Revocation,
    RevokeSet, Revoked, RevokedSerial, Store, StoreError, StoredKey, StoredLock, StoredPrincipal,
    Task, TaskState, TokenHash, leases_from_json,
};

/// The channel revocation events are announced on.
pub const CHANNEL: &str = "ephemera_revocations";
/// Advisory lock key serializing revocation events (commit order = `seq` order).
const REVOCATION_LOCK: i64 = 0x6570_6865_6d72_0001;
/// Advisory lock key serializing migrations across replicas.
const MIGRATION_LOCK: i64 = 0x6570_6865_6d72_0002;
/// Most leases committed in one transaction.
const BATCH: usize = 512;

/// PostgreSQL connection settings.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The URL; may carry a password, so it is never logged. Empty when `url_file` is set.
    pub url: Secret<String>,
    /// A file holding the URL, read when the store opens (a mounted secret may appear late).
    pub url_file: Option<PathBuf>,
    /// Most connections per broker.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long a request waits for a connection.
    pub acquire_timeout: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: Secret::new(String::new()),
            url_file: None,
            max_connections: 16,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Migrations, applied in order; a migration never changes once released.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE join_tokens (
            hash BYTEA PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            claims TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            used_at BIGINT
        );",
    ),
    (
        2,
        "CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            spiffe_id TEXT NOT NULL,
            attestor TEXT NOT NULL,
            claims TEXT NOT NULL,
            labels TEXT NOT NULL,
            source_ip TEXT,
            evidence_age_secs BIGINT NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL,
            deadline BIGINT NOT NULL,
            heartbeat_secs BIGINT NOT NULL,
            grace_secs BIGINT NOT NULL,
            due_at BIGINT NOT NULL,
            state TEXT NOT NULL,
            ended_at BIGINT,
            reason TEXT
        );
        CREATE INDEX tasks_due ON tasks (due_at) WHERE state = 'active';
        CREATE INDEX tasks_spiffe_id ON tasks (spiffe_id, state);
        CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            task_id TEXT REFERENCES tasks (id),
            kind TEXT NOT NULL,
            serial TEXT UNIQUE,
            spiffe_id TEXT NOT NULL,
            audience TEXT NOT NULL,
            issued_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            revoked BOOLEAN NOT NULL DEFAULT FALSE,
            revoked_at BIGINT,
            reason TEXT
        );
        CREATE INDEX leases_task ON leases (task_id);
        CREATE INDEX leases_expires ON leases (expires_at);
        CREATE INDEX leases_spiffe_id ON leases (spiffe_id);
        CREATE TABLE revocations (
            seq BIGSERIAL PRIMARY KEY,
            at BIGINT NOT NULL,
            task_id TEXT,
            lease_id TEXT,
            reason TEXT NOT NULL
        );
        CREATE INDEX revocations_at ON revocations (at);",
    ),
    (
        3,
        "CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), at BIGINT NOT NULL);",
    ),
    (4, "ALTER TABLE revocations ADD COLUMN spiffe_id TEXT;"),
    (
        5,
        "CREATE TABLE principals (
            id TEXT PRIMARY KEY,
            attestor TEXT NOT NULL,
            subject TEXT NOT NULL,
            claims TEXT NOT NULL,
            source_ip TEXT,
            seen_at BIGINT NOT NULL
        );
        ALTER TABLE tasks ADD COLUMN principal TEXT;
        ALTER TABLE tasks ADD COLUMN revoked_by BIGINT;
        ALTER TABLE leases ADD COLUMN principal TEXT;
        ALTER TABLE leases ADD COLUMN revoked_by BIGINT;
        CREATE INDEX tasks_revoked_by ON tasks (revoked_by) WHERE revoked_by IS NOT NULL;
        CREATE INDEX leases_revoked_by ON leases (revoked_by) WHERE revoked_by IS NOT NULL;
        CREATE TABLE locks (
            id TEXT PRIMARY KEY,
            target TEXT NOT NULL,
            reason TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT
        );",
    ),
    (
        6,
        "ALTER TABLE tasks ADD COLUMN scopes TEXT NOT NULL DEFAULT '[]';",
    ),
    (
        7,
        "CREATE TABLE signing_keys (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            public BYTEA NOT NULL,
            wrapped BYTEA,
            not_before BIGINT NOT NULL,
            not_after BIGINT NOT NULL,
            activate_at BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            changed_at BIGINT NOT NULL,
            note TEXT
        );
        CREATE TABLE key_sequence (id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL);
        INSERT INTO key_sequence (id, seq) VALUES (1, 0);
        ALTER TABLE leases ADD COLUMN signing_key TEXT;
        CREATE INDEX leases_signing_key ON leases (signing_key, expires_at)
            WHERE signing_key IS NOT NULL;",
    ),
];

fn unavailable(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict,
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    leases: tokio::sync::mpsc::Sender<super::QueuedLease>,
}

/// Parses a `postgres://` URL (`sslmode`, `sslrootcert`, `application_name` and the other libpq
/// parameters sqlx knows are honoured). Errors never echo the URL: it may carry a password.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(
            "must be a postgres:// URL (leave it out for SQLite in the data directory)".into(),
        );
    }
    PgConnectOptions::from_str(url)
        .map(|o| o.application_name("ephemera"))
        .map_err(|_| "is not a valid postgres:// URL".to_owned())
}

/// The URL from the config, or read from `url_file`.
fn url_of(config: &PostgresConfig) -> Result<crate::secret::Secret<String>, StoreError> {
    let Some(path) = &config.url_file else {
        return Ok(config.url.clone());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| StoreError::Unavailable(format!("store.url_file {}: {e}", path.display())))?;
    Ok(crate::secret::Secret::new(text.trim().to_owned()))
}

impl PostgresStore {
    /// Connects, applies migrations and starts the lease writer.
    pub async fn open(config: &PostgresConfig) -> Result<Self, StoreError> {
        let url = url_of(config)?;
        let options = connect_options(url.expose())
            .map_err(|e| StoreError::Unavailable(format!("store URL {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(config.min_connections)
            .acquire_timeout(config.acquire_timeout)
            // A connection the server dropped is found here, not by a request.
            .test_before_acquire(true)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4 * BATCH);
        let writer = pool.clone();
        tokio::spawn(super::lease_writer(
            rx,
            BATCH,
            Box::new(move |leases| {
                let pool = writer.clone();
                Box::pin(async move { write_leases(&pool, leases).await })
            }),
        ));
        let store = Self { pool, leases: tx };
        store.migrate().await?;
        Ok(store)
    }

    /// The connection pool (for the revocation feed and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
        let result = async {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)",
            )
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
            let current: i64 =
                sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(unavailable)?;
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
                let mut tx = sqlx::Connection::begin(&mut *conn)
                    .await
                    .map_err(unavailable)?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                sqlx::query("INSERT INTO schema_migrations (version) VALUES ($1)")
                    .bind(version)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                tx.commit().await.map_err(unavailable)?;
                tracing::info!(version, "applied postgres migration");
            }
            Ok(())
        }
        .await;
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await;
        result
    }
}

/// One group commit (see [`super::lease_writer`]): every lease of the batch in one statement.
/// The active tasks of the batch are locked `FOR SHARE` by that statement, so an `EndTask`
/// either commits first (its leases are then left out here) or waits for this commit (and then
/// revokes them).
async fn write_leases(pool: &PgPool, leases: &[Lease]) -> Result<Vec<bool>, StoreError> {
    let text = |f: &dyn Fn(&Lease) -> String| leases.iter().map(f).collect::<Vec<_>>();
    let opt = |f: &dyn Fn(&Lease) -> Option<String>| leases.iter().map(f).collect::<Vec<_>>();
    let int = |f: &dyn Fn(&Lease) -> i64| leases.iter().map(f).collect::<Vec<_>>();
    let written: Vec<String> = sqlx::query_scalar(
        "INSERT INTO leases (id, task_id, kind, serial, spiffe_id, audience, issued_at, expires_at,
                             principal, signing_key)
         SELECT u.* FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                $6::text[], $7::bigint[], $8::bigint[], $9::text[], $10::text[])
              AS u(id, task_id, kind, serial, spiffe_id, audience, issued_at, expires_at,
                   principal, signing_key)
         WHERE u.task_id IS NULL
            OR u.task_id IN (SELECT t.id FROM tasks t
                             WHERE t.id = ANY($2::text[]) AND t.state = 'active' FOR SHARE)
         RETURNING id",
    )
    .bind(text(&|l| l.id.clone()))
    .bind(opt(&|l| l.task_id.clone()))
    .bind(text(&|l| l.kind.as_str().to_owned()))
    .bind(opt(&|l| l.serial.clone()))
    .bind(text(&|l| l.spiffe_id.clone()))
    .bind(text(&|l| {
        serde_json::Value::from(l.audience.clone()).to_string()
    }))
    .bind(int(&|l| l.issued_at))
    .bind(int(&|l| l.expires_at))
    .bind(opt(&|l| l.principal.clone()))
    .bind(opt(&|l| l.signing_key.clone()))
    .fetch_all(pool)
    .await
    .map_err(unavailable)?;
    if written.len() == leases.len() {
        return Ok(vec![true; leases.len()]);
    }
    let written: std::collections::HashSet<&str> = written.iter().map(String::as_str).collect();
    Ok(leases
        .iter()
        .map(|l| written.contains(l.id.as_str()))
        .collect())
}

/// Runs a bound task query and decodes every row.
async fn fetch_tasks<'q>(
    pool: &PgPool,
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> Result<Vec<Task>, StoreError> {
    query
        .fetch_all(pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(task_row)
        .collect()
}

/// Appends a revocation event inside the transaction that made the revocation, in commit order,
/// and announces it to every replica when the transaction commits.
async fn record_revocation(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    task_id: Option<&str>,
    lease_id: Option<&str>,
    reason: &str,
    now: i64,
) -> Result<Revocation, StoreError> {
    record_event(tx, (task_id, lease_id, None), reason, now).await
}

/// [`record_revocation`] for any subject: a task, a lease, or an identity.
async fn record_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    (task_id, lease_id, spiffe_id): (Option<&str>, Option<&str>, Option<&str>),
    reason: &str,
    now: i64,
) -> Result<Revocation, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(REVOCATION_LOCK)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO revocations (at, task_id, lease_id, spiffe_id, reason)
         VALUES ($1, $2, $3, $4, $5) RETURNING {REVOCATION_COLUMNS}"
    )))
    .bind(now)
    .bind(task_id)
    .bind(lease_id)
    .bind(spiffe_id)
    .bind(reason)
    .fetch_one(&mut **tx)
    .await
    .map_err(unavailable)?;
    let event = revocation_row(&row)?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(event.seq.to_string())
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    Ok(event)
}

/// Ends the task `id` if active, recording and announcing the event; inside `tx`.
async fn end_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: &str,
    state: TaskState,
    reason: &str,
    now: i64,
) -> Result<Option<Revocation>, StoreError> {
    let r = sqlx::query(
        "UPDATE tasks SET state = $1, ended_at = $2, reason = $3 WHERE id = $4 AND state = 'active'",
    )
    .bind(state.as_str())
    .bind(now)
    .bind(reason)
    .bind(id)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    if r.rows_affected() == 0 {
        return Ok(None);
    }
    record_revocation(tx, Some(id), None, reason, now)
        .await
        .map(Some)
}

impl Store for PostgresStore {
    fn create_join_token(&self, t: NewJoinToken) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let claims = serde_json::Value::Object(t.claims).to_string();
            sqlx::query(
                "INSERT INTO join_tokens (hash, id, name, claims, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&t.hash[..])
            .bind(&t.id)
            .bind(&t.name)
            .bind(claims)
            .bind(t.created_at)
            .bind(t.expires_at)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }

    fn join_token(&self, hash: TokenHash) -> BoxFuture<'_, Result<Option<JoinToken>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT id, name, claims, created_at, expires_at, used_at
                 FROM join_tokens WHERE hash = $1",
            )
            .bind(&hash[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let claims: String = row.try_get("claims").map_err(unavailable)?;
            let claims = match serde_json::from_str(&claims) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => return Err(corrupt("join token claims")),
            };
            Ok(Some(JoinToken {
                id: row.try_get("id").map_err(unavailable)?,
                name: row.try_get("name").map_err(unavailable)?,
                claims,
                created_at: row.try_get("created_at").map_err(unavailable)?,
                expires_at: row.try_get("expires_at").map_err(unavailable)?,
                used_at: row.try_get("used_at").map_err(unavailable)?,
            }))
        })
    }

    fn consume_join_token(
        &self,
        hash: TokenHash,
        now: i64,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE join_tokens SET used_at = $1
                 WHERE hash = $2 AND used_at IS NULL AND expires_at > $1",
            )
            .bind(now)
            .bind(&hash[..])
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn insert_task(&self, t: Task) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let placeholders: Vec<String> =
                (1..=TASK_INSERT_VALUES).map(|n| format!("${n}")).collect();
            let sql = sqlx::AssertSqlSafe(format!(
                "INSERT INTO tasks ({TASK_INSERT_COLUMNS}) VALUES ({})",
                placeholders.join(", ")
            ));
            bind_task(sqlx::query(sql), &t)?
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn task(&self, id: &str) -> BoxFuture<'_, Result<Option<Task>, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let sql =
                sqlx::AssertSqlSafe(format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"));
            sqlx::query(sql)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?
                .as_ref()
                .map(task_row)
                .transpose()
        })
    }

    fn keep_alive(&self, id: &str, due_at: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let r = sqlx::query(
                "UPDATE tasks SET due_at = LEAST(deadline, $1) WHERE id = $2 AND state = 'active'",
            )
            .bind(due_at)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn end_task(
        &self,
        id: &str,
        state: TaskState,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revocation>, StoreError>> {
        let (id, reason) = (id.to_owned(), reason.to_owned());
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            let event = end_in(&mut tx, &id, state, &reason, now).await?;
            if event.is_some() {
                tx.commit().await.map_err(unavailable)?;
            }
            Ok(event)
        })
    }

    fn revoke_identity(
        &self,
        spiffe_id: &str,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revoked>, StoreError>> {
        let (spiffe_id, reason) = (spiffe_id.to_owned(), reason.to_owned());
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            let mut task_ids: Vec<String> = sqlx::query_scalar(
                "UPDATE tasks SET state = 'revoked', ended_at = $1, reason = $2
                 WHERE spiffe_id = $3 AND state = 'active' RETURNING id",
            )
            .bind(now)
            .bind(&reason)
            .bind(&spiffe_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
            let leases = sqlx::query(
                "UPDATE leases SET revoked = TRUE, revoked_at = $1, reason = $2
                 WHERE spiffe_id = $3 AND NOT revoked AND expires_at > $1",
            )
            .bind(now)
            .bind(&reason)
            .bind(&spiffe_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
            if task_ids.is_empty() && leases == 0 {
                return Ok(None);
            }
            let event = record_event(&mut tx, (None, None, Some(&spiffe_id)), &reason, now).await?;
            tx.commit().await.map_err(unavailable)?;
            task_ids.sort();
            Ok(Some(Revoked {
                event,
                task_ids,
                leases,
            }))
        })
    }

    fn remember_principal(
        &self,
        p: &StoredPrincipal,
        now: i64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let p = p.clone();
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO principals (id, attestor, subject, claims, source_ip, seen_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET seen_at = EXCLUDED.seen_at",
            )
            .bind(&p.id)
            .bind(&p.attestor)
            .bind(&p.subject)
            .bind(serde_json::Value::Object(p.claims).to_string())
            .bind(&p.source_ip)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }

    fn principals(
        &self,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<StoredPrincipal>, StoreError>> {
        Box::pin(async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {PRINCIPAL_COLUMNS} FROM principals WHERE id = ANY($1) ORDER BY id"
            ));
            sqlx::query(sql)
                .bind(ids)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?
                .iter()
                .map(principal_row)
                .collect()
        })
    }

    fn live_grants(
        &self,
        now: i64,
        tasks: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<Vec<Grant>, StoreError>> {
        Box::pin(async move {
            let scope = match &tasks {
                None => "l.task_id IS NULL",
                Some(_) => {
                    "l.task_id = ANY($2)
                     AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = l.task_id AND t.state = 'active')"
                }
            };
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {GRANT_COLUMNS} FROM leases l
                 WHERE {scope} AND l.principal IS NOT NULL AND NOT l.revoked AND l.expires_at > $1
                 GROUP BY {GRANT_GROUP}"
            ));
            let query = sqlx::query(sql).bind(now);
            let query = match tasks {
                None => query,
                Some(ids) => query.bind(ids),
            };
            query
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?
                .iter()
                .map(grant_row)
                .collect()
        })
    }

    fn revoke_set(
        &self,
        set: RevokeSet,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revoked>, StoreError>> {
        let reason = reason.to_owned();
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            // The event first: what it revokes names it.
            let event = record_event(&mut tx, (None, None, None), &reason, now).await?;
            let mut task_ids: Vec<String> = sqlx::query_scalar(
                "UPDATE tasks SET state = 'revoked', ended_at = $1, reason = $2, revoked_by = $3
                 WHERE state = 'active' AND id = ANY($4) RETURNING id",
            )
            .bind(now)
            .bind(&reason)
            .bind(event.seq)
            .bind(&set.tasks)
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
            let mut leases = 0;
            if !set.grants.is_empty() {
                leases += sqlx::query(
                    "UPDATE leases l SET revoked = TRUE, revoked_at = $1, reason = $2,
                                         revoked_by = $3
                     FROM (SELECT g ->> 0 AS principal, g ->> 1 AS spiffe_id, g ->> 2 AS kind,
                                  g ->> 3 AS audience, g ->> 4 AS task_id
                           FROM jsonb_array_elements($4::jsonb) g) g
                     WHERE NOT l.revoked AND l.expires_at > $1 AND l.principal = g.principal
                       AND l.spiffe_id = g.spiffe_id AND l.kind = g.kind
                       AND l.audience = g.audience
                       AND l.task_id IS NOT DISTINCT FROM g.task_id",
                )
                .bind(now)
                .bind(&reason)
                .bind(event.seq)
                .bind(grants_json(&set.grants))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?
                .rows_affected();
            }
            if !set.signing_keys.is_empty() {
                leases += sqlx::query(
                    "UPDATE leases SET revoked = TRUE, revoked_at = $1, reason = $2, revoked_by = $3
                     WHERE signing_key = ANY($4) AND expires_at > $1 AND NOT revoked",
                )
                .bind(now)
                .bind(&reason)
                .bind(event.seq)
                .bind(&set.signing_keys)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?
                .rows_affected();
            }
            // Counted after the grants, so a lease revoked both ways counts once.
            let in_tasks: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM leases
                 WHERE NOT revoked AND expires_at > $1 AND task_id = ANY($2)",
            )
            .bind(now)
            .bind(&task_ids)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
            leases += u64::try_from(in_tasks).unwrap_or(0);
            if task_ids.is_empty() && leases == 0 && !set.announce {
                // Dropped without commit: rolled back, the event with it.
                return Ok(None);
            }
            tx.commit().await.map_err(unavailable)?;
            task_ids.sort();
            Ok(Some(Revoked {
                event,
                task_ids,
                leases,
            }))
        })
    }

    fn signing_keys(&self) -> BoxFuture<'_, Result<(u64, Vec<StoredKey>), StoreError>> {
        Box::pin(async move {
            // One snapshot: the sequence and the rows it numbers.
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            let seq: i64 = sqlx::query_scalar("SELECT seq FROM key_sequence WHERE id = 1")
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
            let keys = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {KEY_COLUMNS} FROM signing_keys ORDER BY created_at, id"
            )))
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?
            .iter()
            .map(key_row)
            .collect::<Result<Vec<_>, _>>()?;
            tx.rollback().await.map_err(unavailable)?;
            Ok((u64::try_from(seq).unwrap_or(0), keys))
        })
    }

    fn change_keys(
        &self,
        expected: u64,
        ops: Vec<KeyOp>,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            // The sequence row is the lock: a replica changing the keys at the same time waits
            // here, then finds the sequence moved and changes nothing.
            let seq: Option<i64> = sqlx::query_scalar(
                "UPDATE key_sequence SET seq = seq + 1 WHERE id = 1 AND seq = $1 RETURNING seq",
            )
            .bind(i64::try_from(expected).unwrap_or(i64::MAX))
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
            let Some(seq) = seq else {
                return Ok(None);
            };
            for op in ops {
                match op {
                    KeyOp::Put(k) => {
                        bind_key(
                            sqlx::query(sqlx::AssertSqlSafe(format!(
                                "INSERT INTO signing_keys ({KEY_COLUMNS})
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                             ON CONFLICT (id) DO UPDATE SET
                                 kind = EXCLUDED.kind, state = EXCLUDED.state,
                                 public = EXCLUDED.public, wrapped = EXCLUDED.wrapped,
                                 not_before = EXCLUDED.not_before, not_after = EXCLUDED.not_after,
                                 activate_at = EXCLUDED.activate_at,
                                 created_at = EXCLUDED.created_at,
                                 changed_at = EXCLUDED.changed_at, note = EXCLUDED.note"
                            ))),
                            k,
                        )
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    }
                    KeyOp::Delete(id) => {
                        sqlx::query("DELETE FROM signing_keys WHERE id = $1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await
                            .map_err(unavailable)?;
                    }
                }
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(Some(u64::try_from(seq).unwrap_or(0)))
        })
    }

    fn live_by_signing_key(
        &self,
        now: i64,
    ) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreError>> {
        Box::pin(async move {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT l.signing_key, COUNT(*) FROM leases l LEFT JOIN tasks t ON t.id = l.task_id
                 WHERE l.signing_key IS NOT NULL AND l.expires_at > $1 AND NOT l.revoked
                   AND (l.task_id IS NULL OR t.state = 'active')
                 GROUP BY l.signing_key",
            )
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(rows
                .into_iter()
                .map(|(k, n)| (k, u64::try_from(n).unwrap_or(0)))
                .collect())
        })
    }

    fn create_lock(&self, l: StoredLock) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO locks (id, target, reason, created_by, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&l.id)
            .bind(&l.target)
            .bind(&l.reason)
            .bind(&l.created_by)
            .bind(l.created_at)
            .bind(l.expires_at)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }

    fn locks(&self) -> BoxFuture<'_, Result<Vec<StoredLock>, StoreError>> {
        Box::pin(async move {
            let sql =
                sqlx::AssertSqlSafe(format!("SELECT {LOCK_COLUMNS} FROM locks ORDER BY id DESC"));
            sqlx::query(sql)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?
                .iter()
                .map(lock_row)
                .collect()
        })
    }

    fn delete_lock(&self, id: &str) -> BoxFuture<'_, Result<bool, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let r = sqlx::query("DELETE FROM locks WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn due_tasks(&self, now: i64, limit: u32) -> BoxFuture<'_, Result<Vec<Task>, StoreError>> {
        Box::pin(async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'active' AND due_at <= $1
                 ORDER BY due_at LIMIT $2"
            ));
            let query = sqlx::query(sql).bind(now).bind(i64::from(limit));
            fetch_tasks(&self.pool, query).await
        })
    }

    fn end_due_tasks(
        &self,
        now: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(Task, Revocation)>, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            // Another replica reaping now holds its claimed rows: skip them, take the rest.
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'active' AND due_at <= $1
                 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED"
            ));
            let due: Vec<Task> = sqlx::query(sql)
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?
                .iter()
                .map(task_row)
                .collect::<Result<_, _>>()?;
            let mut ended = Vec::with_capacity(due.len());
            for task in due {
                let reason = super::reap_reason(task.deadline, now);
                if let Some(event) =
                    end_in(&mut tx, &task.id, TaskState::Expired, reason, now).await?
                {
                    ended.push((task, event));
                }
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(ended)
        })
    }

    fn refresh_active_tasks(&self, now: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            // Safe beside running replicas: a due time their keep-alives wrote is never later
            // than now + heartbeat + grace, so this never shortens a live task's due time.
            let r = sqlx::query(
                "UPDATE tasks SET due_at = LEAST(deadline, $1 + heartbeat_secs + grace_secs)
                 WHERE state = 'active'",
            )
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(r.rows_affected())
        })
    }

    fn insert_lease(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let (ack, done) = tokio::sync::oneshot::channel();
            self.leases
                .send((lease, ack))
                .await
                .map_err(|_| StoreError::Unavailable("lease writer stopped".into()))?;
            done.await
                .map_err(|_| StoreError::Unavailable("lease writer stopped".into()))?
        })
    }

    fn lease(&self, key: &str) -> BoxFuture<'_, Result<Option<LeaseStatus>, StoreError>> {
        let key = key.to_owned();
        Box::pin(async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {LEASE_COLUMNS} FROM leases l LEFT JOIN tasks t ON t.id = l.task_id
                 WHERE l.id = $1 OR l.serial = $1"
            ));
            sqlx::query(sql)
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?
                .as_ref()
                .map(lease_row)
                .transpose()
        })
    }

    fn revoke_lease(
        &self,
        id: &str,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revocation>, StoreError>> {
        let (id, reason) = (id.to_owned(), reason.to_owned());
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            let r = sqlx::query(
                "UPDATE leases SET revoked = TRUE, revoked_at = $1, reason = $2
                 WHERE id = $3 AND NOT revoked",
            )
            .bind(now)
            .bind(&reason)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            if r.rows_affected() == 0 {
                return Ok(None);
            }
            let event = record_revocation(&mut tx, None, Some(&id), &reason, now).await?;
            tx.commit().await.map_err(unavailable)?;
            Ok(Some(event))
        })
    }

    fn revocations_after(
        &self,
        cursor: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Revocation>, StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "SELECT seq, at, task_id, lease_id, spiffe_id, reason FROM revocations
                 WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(cursor)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?
            .iter()
            .map(revocation_row)
            .collect()
        })
    }

    fn newest_revocation(&self) -> BoxFuture<'_, Result<i64, StoreError>> {
        Box::pin(newest_seq(self))
    }

    fn revoked_leases(&self, event: &Revocation) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>> {
        let event = event.clone();
        Box::pin(async move {
            // One row of JSON, built inside PostgreSQL (see `leases_from_json`).
            let which = super::EventLeases::of(&event);
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT COALESCE(json_agg(json_build_array(id, task_id, kind, serial, spiffe_id,
                            audience::json, issued_at, expires_at, revoked::int, revoked_at,
                            reason) ORDER BY id), '[]')::text
                 FROM leases WHERE {}",
                which.condition(|i| format!("${i}"))
            ));
            let query = sqlx::query_scalar(sql);
            let query = match which {
                super::EventLeases::Task(id) | super::EventLeases::Lease(id) => query.bind(id),
                super::EventLeases::Identity {
                    spiffe_id,
                    at,
                    reason,
                } => query.bind(spiffe_id).bind(at).bind(reason),
                super::EventLeases::Set(seq) => query.bind(seq),
            };
            let json: String = query.fetch_one(&self.pool).await.map_err(unavailable)?;
            leases_from_json(&json)
        })
    }

    fn revoked_serials(&self, now: i64) -> BoxFuture<'_, Result<Vec<RevokedSerial>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT l.serial AS serial, COALESCE(l.revoked_at, t.ended_at) AS revoked_at,
                        l.expires_at AS expires_at
                 FROM leases l LEFT JOIN tasks t ON t.id = l.task_id
                 WHERE l.kind = 'x509' AND l.serial IS NOT NULL AND l.expires_at > $1
                   AND (l.revoked OR (t.id IS NOT NULL AND t.state != 'active'))
                 ORDER BY l.serial",
            )
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            rows.iter()
                .map(|r| {
                    Ok(RevokedSerial {
                        serial: r.try_get("serial").map_err(unavailable)?,
                        revoked_at: r
                            .try_get::<Option<i64>, _>("revoked_at")
                            .map_err(unavailable)?
                            .unwrap_or(now),
                        expires_at: r.try_get("expires_at").map_err(unavailable)?,
                    })
                })
                .collect()
        })
    }

    fn list_tasks(&self, f: ListFilter, _now: i64) -> BoxFuture<'_, Result<Vec<Task>, StoreError>> {
        Box::pin(async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {TASK_COLUMNS} FROM tasks
                 WHERE ($1::text IS NULL OR spiffe_id = $1)
                   AND {state}
                   AND ($3::text IS NULL OR id < $3)
                   AND ($4::text IS NULL OR id = $4)
                 ORDER BY id DESC LIMIT $5",
                state = super::state_condition("state", "$2::text")
            ));
            let query = sqlx::query(sql)
                .bind(&f.spiffe_id)
                .bind(&f.state)
                .bind(&f.after)
                .bind(&f.task_id)
                .bind(i64::from(f.limit));
            fetch_tasks(&self.pool, query).await
        })
    }

    fn list_leases(
        &self,
        f: ListFilter,
        now: i64,
    ) -> BoxFuture<'_, Result<Vec<LeaseStatus>, StoreError>> {
        Box::pin(async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {LEASE_COLUMNS} FROM leases l LEFT JOIN tasks t ON t.id = l.task_id
                 WHERE {task}
                   AND ($2::text IS NULL OR l.spiffe_id = $2)
                   AND ($3::text IS NULL OR l.id < $3)
                   AND {state}
                 ORDER BY l.id DESC LIMIT $6",
                task = super::task_condition(&f, "$1::text"),
                state = super::state_condition(
                    &super::lease_state_sql("$5::bigint", "l.revoked"),
                    "$4::text"
                ),
            ));
            sqlx::query(sql)
                .bind(&f.task_id)
                .bind(&f.spiffe_id)
                .bind(&f.after)
                .bind(&f.state)
                .bind(now)
                .bind(i64::from(f.limit))
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?
                .iter()
                .map(lease_row)
                .collect()
        })
    }

    fn active_tasks(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Task>, StoreError>> {
        Box::pin(async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {TASK_COLUMNS} FROM tasks
                 WHERE state = 'active' AND ($1::text IS NULL OR id > $1)
                 ORDER BY id LIMIT $2"
            ));
            let query = sqlx::query(sql).bind(after).bind(i64::from(limit));
            fetch_tasks(&self.pool, query).await
        })
    }

    fn prune(&self, before: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            let mut deleted = 0;
            let principals = "DELETE FROM principals p WHERE seen_at < {before}
                 AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.principal = p.id)
                 AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.principal = p.id)";
            for statement in super::PRUNE.iter().chain([&principals]) {
                let sql = sqlx::AssertSqlSafe(statement.replace("{before}", "$1"));
                deleted += sqlx::query(sql)
                    .bind(before)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?
                    .rows_affected();
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(deleted)
        })
    }

    fn counts(&self, now: i64) -> BoxFuture<'_, Result<(u64, u64), StoreError>> {
        Box::pin(async move {
            let tasks: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE state = 'active'")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(unavailable)?;
            let leases: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM leases l LEFT JOIN tasks t ON t.id = l.task_id
                 WHERE l.expires_at > $1 AND NOT l.revoked AND (t.id IS NULL OR t.state = 'active')",
            )
            .bind(now)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok((
                u64::try_from(tasks).unwrap_or(0),
                u64::try_from(leases).unwrap_or(0),
            ))
        })
    }

    fn count_active_tasks(&self, spiffe_id: &str) -> BoxFuture<'_, Result<u64, StoreError>> {
        let spiffe_id = spiffe_id.to_owned();
        Box::pin(async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM tasks WHERE spiffe_id = $1 AND state = 'active'",
            )
            .bind(spiffe_id)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn count_task_leases(&self, task_id: &str) -> BoxFuture<'_, Result<u64, StoreError>> {
        let task_id = task_id.to_owned();
        Box::pin(async move {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM leases WHERE task_id = $1")
                .bind(task_id)
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // A real write: a read-only server (a standby after failover) fails here.
            sqlx::query(
                "INSERT INTO health (id, at) VALUES (1, extract(epoch from now())::bigint)
                 ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at",
            )
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }
}

/// Notifications of revocations committed by any replica (`LISTEN` on [`CHANNEL`]), for the
/// revocation feed in `lease::feed`.
pub struct RevocationNotices {
    listener: PgListener,
}

impl PostgresStore {
    /// Listens for revocation notifications on a connection of its own.
    pub async fn revocation_notices(&self) -> Result<RevocationNotices, StoreError> {
        let mut listener = PgListener::connect_with(self.pool())
            .await
            .map_err(unavailable)?;
        listener.listen(CHANNEL).await.map_err(unavailable)?;
        Ok(RevocationNotices { listener })
    }
}

impl RevocationNotices {
    /// Waits for the next notification; an error means the connection was lost (and events
    /// may have been missed).
    pub async fn recv(&mut self) -> Result<(), StoreError> {
        self.listener.recv().await.map(|_| ()).map_err(unavailable)
    }
}

async fn newest_seq(store: &PostgresStore) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM revocations")
        .fetch_one(store.pool())
        .await
        .map_err(unavailable)
}

/// Test support: a fresh database per test on the server `EPHEMERA_TEST_POSTGRES_URL` names.
/// Only with the `testing` feature (the crate's tests and the benchmark).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;

    /// The test server's URL, or `None` (and a note on stderr) when the variable is unset.
    pub fn server_url(test: &str) -> Option<String> {
        match std::env::var("EPHEMERA_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                eprintln!("{test}: skipped: EPHEMERA_TEST_POSTGRES_URL is not set");
                None
            }
        }
    }

    /// Creates an empty database on the server at `server_url`; returns its URL.
    pub async fn fresh_database(server_url: &str) -> Result<String, String> {
        let name = format!("ephemera_test_{}", uuid::Uuid::now_v7().simple());
        let options = connect_options(server_url)?;
        let mut conn = sqlx::ConnectOptions::connect(&options)
            .await
            .map_err(|e| format!("connecting to {server_url}: {e}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .map_err(|e| format!("creating database {name}: {e}"))?;
        // Test databases clean up after each other: drop those made over an hour ago (the name
        // carries its creation time).
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'ephemera\\_test\\_%'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        let hour_ago = uuid::Uuid::now_v7()
            .get_timestamp()
            .map_or(0, |t| t.to_unix().0.saturating_sub(3600));
        for old in stale {
            let made = old
                .strip_prefix("ephemera_test_")
                .and_then(|u| uuid::Uuid::try_parse(u).ok())
                .and_then(|u| u.get_timestamp())
                .map_or(0, |t| t.to_unix().0);
            if made < hour_ago {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {old} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await;
            }
        }
        let mut url = url_without_database(server_url);
        url.push('/');
        url.push_str(&name);
        if let Some(q) = server_url.split_once('?').map(|(_, q)| q) {
            url.push('?');
            url.push_str(q);
        }
        Ok(url)
    }

    /// Drops a database [`fresh_database`] made (its URL), closing its connections first.
    pub async fn drop_database(database_url: &str) -> Result<(), String> {
        let base = database_url.split('?').next().unwrap_or(database_url);
        let name = base
            .rsplit('/')
            .next()
            .filter(|n| {
                n.starts_with("ephemera_test_") && n[14..].bytes().all(|b| b.is_ascii_hexdigit())
            })
            .ok_or_else(|| format!("{database_url} is not a database fresh_database made"))?;
        let server = url_without_database(database_url);
        let options = connect_options(&server)?;
        let mut conn = sqlx::ConnectOptions::connect(&options)
            .await
            .map_err(|e| format!("connecting to {server}: {e}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await
        .map_err(|e| format!("dropping database {name}: {e}"))?;
        Ok(())
    }

    fn url_without_database(url: &str) -> String {
        let base = url.split('?').next().unwrap_or(url);
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        match base[scheme_end..].find('/') {
            Some(i) => base[..scheme_end + i].to_owned(),
            None => base.to_owned(),
        }
    }

    #[cfg(test)]
    #[test]
    fn urls() {
        assert_eq!(
            url_without_database("postgres://postgres@127.0.0.1:5432/test"),
            "postgres://postgres@127.0.0.1:5432"
        );
        assert_eq!(
            url_without_database("postgres://h/db?sslmode=disable"),
            "postgres://h"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::secret::Secret;

    async fn store(test: &str) -> Option<PostgresStore> {
        let server = testing::server_url(test)?;
        let url = testing::fresh_database(&server).await.unwrap();
        let config = PostgresConfig {
            url: Secret::new(url),
            ..PostgresConfig::default()
        };
        Some(PostgresStore::open(&config).await.unwrap())
    }

    #[tokio::test]
    async fn conformance_postgres() {
        let Some(s) = store("conformance_postgres").await else {
            return;
        };
        super::super::conformance::join_tokens(Arc::new(s.clone())).await;
        super::super::conformance::tasks_and_leases(Arc::new(s)).await;
        let Some(s) = store("conformance_postgres_identity").await else {
            return;
        };
        super::super::conformance::identity_revocation(Arc::new(s)).await;
        let Some(s) = store("conformance_postgres_sets").await else {
            return;
        };
        super::super::conformance::principals_sets_and_locks(Arc::new(s)).await;
        let Some(s) = store("conformance_postgres_keys").await else {
            return;
        };
        super::super::conformance::signing_keys(Arc::new(s)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_racing_their_task_end() {
        let Some(s) = store("leases_racing_their_task_end").await else {
            return;
        };
        super::super::conformance::ended_task_covers_racing_leases(Arc::new(s)).await;
    }

    #[tokio::test]
    async fn replicas_reap_each_task_once() {
        let Some(a) = store("replicas_reap_each_task_once").await else {
            return;
        };
        // A second pool on the same database: another replica.
        let b = PostgresStore {
            pool: PgPoolOptions::new()
                .max_connections(4)
                .connect_with(a.pool.connect_options().as_ref().clone())
                .await
                .unwrap(),
            leases: a.leases.clone(),
        };
        for i in 0..200 {
            let mut t =
                super::super::conformance::task(&format!("t{i:03}"), "spiffe://e.org/a", 1_000, 10);
            t.due_at = 10;
            a.insert_task(t).await.unwrap();
        }
        let (ra, rb) = tokio::join!(
            async {
                let mut n = 0;
                loop {
                    let got = a.end_due_tasks(100, 7).await.unwrap().len();
                    if got == 0 {
                        break n;
                    }
                    n += got;
                }
            },
            async {
                let mut n = 0;
                loop {
                    let got = b.end_due_tasks(100, 7).await.unwrap().len();
                    if got == 0 {
                        break n;
                    }
                    n += got;
                }
            }
        );
        assert_eq!(ra + rb, 200, "every task ended once ({ra} + {rb})");
        let events = a.revocations_after(0, 1000).await.unwrap();
        assert_eq!(events.len(), 200, "one event per task");
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    }
}
