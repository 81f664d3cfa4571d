//! SQLite store, the embedded default: one file in the data directory, WAL journal,
//! `synchronous = NORMAL`, versioned migrations applied at start.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

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

/// File name of the database inside the data directory.
pub use crate::datadir::DATABASE as FILE;

/// Migrations, applied in order; a migration never changes once released.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE join_tokens (
            hash BLOB PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            claims TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            used_at INTEGER
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
            evidence_age_secs INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            deadline INTEGER NOT NULL,
            heartbeat_secs INTEGER NOT NULL,
            grace_secs INTEGER NOT NULL,
            due_at INTEGER NOT NULL,
            state TEXT NOT NULL,
            ended_at INTEGER,
            reason TEXT
        );
        CREATE INDEX tasks_due ON tasks (state, due_at);
        CREATE INDEX tasks_spiffe_id ON tasks (spiffe_id, state);
        CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            task_id TEXT REFERENCES tasks (id),
            kind TEXT NOT NULL,
            serial TEXT UNIQUE,
            spiffe_id TEXT NOT NULL,
            audience TEXT NOT NULL,
            issued_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            revoked INTEGER NOT NULL DEFAULT 0,
            revoked_at INTEGER,
            reason TEXT
        );
        CREATE INDEX leases_task ON leases (task_id);
        CREATE INDEX leases_expires ON leases (expires_at);
        CREATE INDEX leases_spiffe_id ON leases (spiffe_id);
        CREATE TABLE revocations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at INTEGER NOT NULL,
            task_id TEXT,
            lease_id TEXT,
            reason TEXT NOT NULL
        );",
    ),
    (
        3,
        "CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL);",
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
            seen_at INTEGER NOT NULL
        );
        ALTER TABLE tasks ADD COLUMN principal TEXT;
        ALTER TABLE tasks ADD COLUMN revoked_by INTEGER;
        ALTER TABLE leases ADD COLUMN principal TEXT;
        ALTER TABLE leases ADD COLUMN revoked_by INTEGER;
        CREATE INDEX tasks_revoked_by ON tasks (revoked_by) WHERE revoked_by IS NOT NULL;
        CREATE INDEX leases_revoked_by ON leases (revoked_by) WHERE revoked_by IS NOT NULL;
        CREATE TABLE locks (
            id TEXT PRIMARY KEY,
            target TEXT NOT NULL,
            reason TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER
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
            public BLOB NOT NULL,
            wrapped BLOB,
            not_before INTEGER NOT NULL,
            not_after INTEGER NOT NULL,
            activate_at INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            changed_at INTEGER NOT NULL,
            note TEXT
        );
        CREATE TABLE key_sequence (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
        INSERT INTO key_sequence (id, seq) VALUES (1, 0);
        ALTER TABLE leases ADD COLUMN signing_key TEXT;
        CREATE INDEX leases_signing_key ON leases (signing_key, expires_at)
            WHERE signing_key IS NOT NULL;",
    ),
];

/// Most leases committed in one transaction.
const BATCH: usize = 256;

/// Reading connections (WAL: they read beside the writer).
const READERS: u32 = 4;

/// The writing connection's page cache, KiB.
const WRITER_CACHE_KIB: u32 = 64 * 1024;

/// How often the checkpointer looks at the log.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// Leases committed since the last checkpoint that make the next one due at once.
const CHECKPOINT_BUSY_LEASES: u64 = 128;
/// How often the checkpointer runs while other writes than leases change the log.
const CHECKPOINT_QUIET_EVERY: Duration = Duration::from_secs(5);
/// WAL frames (pages) after which the log is restarted from its beginning: 32 MiB of 4 KiB
/// pages.
const WAL_RESTART_FRAMES: i64 = 8192;
/// How long a restart may hold the writer while waiting for readers to leave the log, ms.
const WAL_RESTART_WAIT_MS: u64 = 20;
/// The writer's own automatic checkpoint, a backstop should the checkpointer fall behind:
/// four times the restart size.
const WRITER_AUTOCHECKPOINT_FRAMES: i64 = 4 * WAL_RESTART_FRAMES;
/// The WAL file is truncated back to this size when the log restarts, bytes (a size the log
/// reaches only when the backstop had to act).
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
/// Free space the database's filesystem must have for the store to report ready, bytes.
const MIN_FREE_BYTES: u64 = 1024 * 1024;
/// The busy timeout of every connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A write transaction on one pooled connection, begun `IMMEDIATE` (the write lock is taken up
/// front, so writers queue on the busy timeout instead of failing to upgrade).
///
/// It is committed, rolled back, or its connection is closed instead of going back to the
/// pool: a COMMIT that fails (a full disk, an I/O error) leaves SQLite's transaction open with
/// the write lock held, and a pooled connection in that state would lock every other writer
/// out until restart. Closing the connection makes SQLite roll back and release the lock.
struct WriteTx {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>,
}

impl WriteTx {
    async fn begin(pool: &SqlitePool) -> Result<Self, StoreError> {
        let mut conn = pool.acquire().await.map_err(unavailable)?;
        if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
            drop(conn.detach());
            return Err(unavailable(e));
        }
        Ok(Self { conn: Some(conn) })
    }

    async fn commit(mut self) -> Result<(), StoreError> {
        let Some(mut conn) = self.conn.take() else {
            return Err(StoreError::Unavailable(
                "transaction already finished".into(),
            ));
        };
        match sqlx::query("COMMIT").execute(&mut *conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                drop(conn.detach());
                Err(unavailable(e))
            }
        }
    }

    async fn rollback(mut self) {
        if let Some(mut conn) = self.conn.take()
            && sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err()
        {
            drop(conn.detach());
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        // Neither committed nor rolled back (an error returned early): discard the connection.
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::SqliteConnection;

    fn deref(&self) -> &Self::Target {
        // Present until commit/rollback, which consume the transaction.
        self.conn
            .as_deref()
            .unwrap_or_else(|| unreachable!("transaction used after it ended"))
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.conn
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("transaction used after it ended"))
    }
}

/// The one row a query must return. Every query here reads all its rows (`fetch_all`), never
/// stopping early: sqlx's SQLite driver resets a statement only once its rows are read to the
/// end, and a statement left mid-way keeps its connection's read snapshot open, so a later read
/// there could miss a lease committed since (sqlx#2543).
fn single<T>(rows: Vec<T>) -> Result<T, StoreError> {
    rows.into_iter()
        .next()
        .ok_or_else(|| StoreError::Corrupt("query returned no row".into()))
}

fn unavailable(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict,
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    /// Readers (WAL: they run beside the writer).
    pool: SqlitePool,
    /// The one connection every write goes through. SQLite serializes writers anyway; with a
    /// single writing connection, writers queue here instead of on the busy timeout, and the
    /// writer's page cache stays valid between commits (a connection discards its cache when
    /// another one has written), so a group commit does not re-read the index pages it touches.
    writer: SqlitePool,
    leases: tokio::sync::mpsc::Sender<super::QueuedLease>,
    /// Leases committed so far: how busy the log is, for the checkpointer.
    committed: Arc<AtomicU64>,
    /// The checkpointer worker: dropping its sender stops it (at shutdown through
    /// [`SqliteStore::stop_checkpointer`], or when the last clone of the store is dropped).
    checkpointer: Arc<std::sync::Mutex<Option<Checkpointer>>>,
    /// The directory of the database file (none in memory), whose free space `ping` checks.
    dir: Option<std::path::PathBuf>,
}

/// Copies committed WAL frames into the database file on its own connection, beside the writer:
/// a `PASSIVE` checkpoint neither waits for nor blocks it, so commits (which every waiting
/// credential waits on) no longer copy pages and sync the file.
///
/// A pass costs two file syncs however little it copies, so passes follow the load: every
/// [`CHECKPOINT_EVERY`] while leases are being committed ([`CHECKPOINT_BUSY_LEASES`] or more
/// since the last pass), every [`CHECKPOINT_QUIET_EVERY`] while only other writes (tasks,
/// keep-alives, the reaper) touch the log, and not at all while the log file is unchanged.
///
/// Under continuous writes a passive checkpoint never finds the log fully copied at the moment a
/// new write begins, so the log would never start over. Past [`WAL_RESTART_FRAMES`], a
/// `RESTART` checkpoint runs on the writer's own connection, queued between its commits: the
/// passive pass just before left it only the last few frames to copy, and no other connection
/// competes for the write lock (SQLite's busy handler sleeps in growing steps, which a busy
/// writer would keep winning). It waits at most [`WAL_RESTART_WAIT_MS`] for readers to leave
/// the log, and is tried again on the next pass if one is still reading. Ends when the store is
/// dropped.
async fn run_checkpointer(
    pool: SqlitePool,
    writer: SqlitePool,
    wal: std::path::PathBuf,
    committed: Arc<AtomicU64>,
    mut stop: tokio::sync::mpsc::Receiver<()>,
) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut last, mut leases) = (None, std::time::Instant::now(), 0);
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = tick.tick() => {}
        }
        let stamp = std::fs::metadata(&wal)
            .and_then(|m| Ok((m.len(), m.modified()?)))
            .ok();
        let now_leases = committed.load(Ordering::Relaxed);
        let busy = now_leases.saturating_sub(leases) >= CHECKPOINT_BUSY_LEASES;
        if stamp == seen || !(busy || last.elapsed() >= CHECKPOINT_QUIET_EVERY) {
            continue;
        }
        (seen, last, leases) = (stamp, std::time::Instant::now(), now_leases);
        let result = match passive_checkpoint(&pool).await {
            Ok((_, log, _)) if log >= WAL_RESTART_FRAMES => restart_wal(&writer).await,
            other => other.map(|_| ()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "sqlite checkpoint failed; the writer's own checkpoint is the backstop");
        }
    }
    pool.close().await;
}

/// The running checkpointer: its stop channel and task.
struct Checkpointer {
    stop: tokio::sync::mpsc::Sender<()>,
    worker: tokio::task::JoinHandle<()>,
}

/// A `PASSIVE` checkpoint on one connection of `pool`: (whether it was blocked, frames in the
/// log, frames copied into the database file).
async fn passive_checkpoint(pool: &SqlitePool) -> Result<(i64, i64, i64), StoreError> {
    sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(pool)
        .await
        .map_err(unavailable)
}

/// Restarts the log on the writer's connection (see [`run_checkpointer`]), waiting at most
/// [`WAL_RESTART_WAIT_MS`] for readers.
async fn restart_wal(writer: &SqlitePool) -> Result<(), StoreError> {
    let mut conn = writer.acquire().await.map_err(unavailable)?;
    let timeout = |ms: u128| sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {ms}"));
    sqlx::query(timeout(u128::from(WAL_RESTART_WAIT_MS)))
        .execute(&mut *conn)
        .await
        .map_err(unavailable)?;
    let restarted: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
        .fetch_one(&mut *conn)
        .await;
    if let Err(e) = sqlx::query(timeout(BUSY_TIMEOUT.as_millis()))
        .execute(&mut *conn)
        .await
    {
        // A writer left with the short timeout would give up on busy readers: replace it.
        conn.close_on_drop();
        return Err(unavailable(e));
    }
    restarted.map(|_| ()).map_err(unavailable)
}

/// One group commit (see [`super::lease_writer`]): every lease of the batch in one write
/// transaction. Writers are serialized, so a task's state read here cannot change before the
/// commit: a lease lands either before its task's `EndTask` (and is revoked with it) or not at
/// all.
async fn write_leases(pool: &SqlitePool, leases: &[Lease]) -> Result<Vec<bool>, StoreError> {
    let rows = serde_json::Value::Array(
        leases
            .iter()
            .map(|l| {
                serde_json::json!([
                    l.id,
                    l.task_id,
                    l.kind.as_str(),
                    l.serial,
                    l.spiffe_id,
                    serde_json::Value::from(l.audience.clone()).to_string(),
                    l.issued_at,
                    l.expires_at,
                    l.principal,
                    l.signing_key,
                ])
            })
            .collect(),
    )
    .to_string();
    // One statement for the whole batch, whatever its size: the rows travel as one JSON array.
    // It runs in autocommit, so it is its own transaction: it takes the write lock (waiting out
    // the busy timeout) before it reads, and needs no statement journal.
    let written: std::collections::HashSet<String> = sqlx::query_scalar::<_, String>(
        "INSERT INTO leases (id, task_id, kind, serial, spiffe_id, audience, issued_at, expires_at,
                             principal, signing_key)
         SELECT r.value ->> 0, r.value ->> 1, r.value ->> 2, r.value ->> 3, r.value ->> 4,
                r.value ->> 5, r.value ->> 6, r.value ->> 7, r.value ->> 8, r.value ->> 9
         FROM json_each(?1) AS r
         WHERE r.value ->> 1 IS NULL
            OR EXISTS (SELECT 1 FROM tasks WHERE id = r.value ->> 1 AND state = 'active')
         RETURNING id",
    )
    .bind(rows)
    .fetch_all(pool)
    .await
    .map_err(unavailable)?
    .into_iter()
    .collect();
    Ok(leases.iter().map(|l| written.contains(&l.id)).collect())
}

/// The lease listing for `f`: `?1` task, `?2` SPIFFE ID, `?3` after, `?4` active, `?5` now,
/// `?6` limit.
fn list_leases_sql(f: &ListFilter) -> String {
    format!(
        "SELECT {LEASE_COLUMNS} FROM leases l LEFT JOIN tasks t ON t.id = l.task_id
         WHERE {task}
           AND (?2 IS NULL OR l.spiffe_id = ?2)
           AND (?3 IS NULL OR l.id < ?3)
           AND {state}
         ORDER BY l.id DESC LIMIT ?6",
        task = super::task_condition(f, "?1"),
        state = super::state_condition(&super::lease_state_sql("?5", "l.revoked = 1"), "?4"),
    )
}

/// Runs a bound task query and decodes every row.
async fn fetch_tasks(
    pool: &SqlitePool,
    query: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
) -> Result<Vec<Task>, StoreError> {
    query
        .fetch_all(pool)
        .await
        .map_err(unavailable)?
        .iter()
        .map(task_row)
        .collect()
}

/// Appends a revocation event inside the transaction that made the revocation, so the event
/// log and the state can never disagree.
async fn record_revocation(
    tx: &mut sqlx::SqliteConnection,
    task_id: Option<&str>,
    lease_id: Option<&str>,
    reason: &str,
    now: i64,
) -> Result<Revocation, StoreError> {
    record_event(tx, (task_id, lease_id, None), reason, now).await
}

/// [`record_revocation`] for any subject: a task, a lease, or an identity.
async fn record_event(
    tx: &mut sqlx::SqliteConnection,
    (task_id, lease_id, spiffe_id): (Option<&str>, Option<&str>, Option<&str>),
    reason: &str,
    now: i64,
) -> Result<Revocation, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO revocations (at, task_id, lease_id, spiffe_id, reason) VALUES (?, ?, ?, ?, ?)
         RETURNING {REVOCATION_COLUMNS}"
    )))
    .bind(now)
    .bind(task_id)
    .bind(lease_id)
    .bind(spiffe_id)
    .bind(reason)
    .fetch_all(&mut *tx)
    .await
    .map_err(unavailable)
    .and_then(single)?;
    revocation_row(&row)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(unavailable)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        // The writer first: it creates the file and switches it to WAL.
        // Its page cache holds the index pages that inserts land on (SQLite's default, 2 MiB,
        // holds fewer than a busy lease table's random-keyed indexes touch).
        // Checkpoints run on their own connection (see `run_checkpointer`), not inside the writer's
        // commits, which every waiting credential would wait on.
        let writer = Self::pool(
            options
                .clone()
                .pragma("cache_size", format!("-{WRITER_CACHE_KIB}"))
                .pragma(
                    "wal_autocheckpoint",
                    WRITER_AUTOCHECKPOINT_FRAMES.to_string(),
                )
                .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string()),
            1,
        )
        .await?;
        let readers = Self::pool(options.clone(), READERS).await?;
        let (stop, stopped) = tokio::sync::mpsc::channel(1);
        let mut store = Self::connect(readers, writer).await?;
        store.dir = Some(
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned(),
        );
        let checkpoints = Self::pool(options, 1).await?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let worker = tokio::spawn(run_checkpointer(
            checkpoints,
            store.writer.clone(),
            wal.into(),
            store.committed.clone(),
            stopped,
        ));
        *store
            .checkpointer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Checkpointer { stop, worker });
        Ok(store)
    }

    /// Stops the checkpointer worker and returns it to be joined (`None` when there is none or
    /// it was already stopped). The writer's own checkpoint carries on after it.
    pub fn stop_checkpointer(&self) -> Option<tokio::task::JoinHandle<()>> {
        let Checkpointer { stop, worker } = self
            .checkpointer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        drop(stop);
        Some(worker)
    }

    /// A private in-memory database (tests).
    pub async fn in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(unavailable)?;
        // An in-memory database exists per connection: exactly one, for reads and writes.
        let pool = Self::pool(options, 1).await?;
        Self::connect(pool.clone(), pool).await
    }

    async fn pool(
        options: SqliteConnectOptions,
        connections: u32,
    ) -> Result<SqlitePool, StoreError> {
        SqlitePoolOptions::new()
            .max_connections(connections)
            // Waiting for a connection is bounded like waiting for SQLite's lock.
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(unavailable)
    }

    async fn connect(pool: SqlitePool, writer: SqlitePool) -> Result<Self, StoreError> {
        let (tx, rx) = tokio::sync::mpsc::channel(4 * BATCH);
        let lease_writer = writer.clone();
        let committed = Arc::new(AtomicU64::new(0));
        let counter = committed.clone();
        tokio::spawn(super::lease_writer(
            rx,
            BATCH,
            Box::new(move |leases| {
                let (pool, counter) = (lease_writer.clone(), counter.clone());
                Box::pin(async move {
                    let written = write_leases(&pool, leases).await;
                    if written.is_ok() {
                        counter.fetch_add(leases.len() as u64, Ordering::Relaxed);
                    }
                    written
                })
            }),
        ));
        let store = Self {
            pool,
            writer,
            leases: tx,
            committed,
            checkpointer: Arc::default(),
            dir: None,
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_all(&self.writer)
                .await
                .map_err(unavailable)
                .and_then(single)?;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let mut tx = WriteTx::begin(&self.writer).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            sqlx::query("INSERT INTO schema_migrations (version) VALUES (?)")
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.commit().await?;
            tracing::info!(version, "applied sqlite migration");
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn create_join_token(&self, t: NewJoinToken) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let claims = serde_json::Value::Object(t.claims).to_string();
            sqlx::query(
                "INSERT INTO join_tokens (hash, id, name, claims, created_at, expires_at)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&t.hash[..])
            .bind(&t.id)
            .bind(&t.name)
            .bind(claims)
            .bind(t.created_at)
            .bind(t.expires_at)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }

    fn join_token(&self, hash: TokenHash) -> BoxFuture<'_, Result<Option<JoinToken>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT id, name, claims, created_at, expires_at, used_at
                 FROM join_tokens WHERE hash = ?",
            )
            .bind(&hash[..])
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?
            .into_iter()
            .next();
            let Some(row) = row else {
                return Ok(None);
            };
            let claims: String = row.try_get("claims").map_err(unavailable)?;
            let claims = match serde_json::from_str(&claims) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => return Err(StoreError::Corrupt("join token claims".into())),
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
                "UPDATE join_tokens SET used_at = ?
                 WHERE hash = ? AND used_at IS NULL AND expires_at > ?",
            )
            .bind(now)
            .bind(&hash[..])
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn insert_task(&self, t: Task) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "INSERT INTO tasks ({TASK_INSERT_COLUMNS}) VALUES ({})",
                vec!["?"; TASK_INSERT_VALUES].join(", ")
            ));
            bind_task(sqlx::query(sql), &t)?
                .execute(&self.writer)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn task(&self, id: &str) -> BoxFuture<'_, Result<Option<Task>, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let sql = sqlx::AssertSqlSafe(format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"));
            sqlx::query(sql)
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?
                .first()
                .map(task_row)
                .transpose()
        })
    }

    fn keep_alive(&self, id: &str, due_at: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let r = sqlx::query(
                "UPDATE tasks SET due_at = MIN(deadline, ?) WHERE id = ? AND state = 'active'",
            )
            .bind(due_at)
            .bind(id)
            .execute(&self.writer)
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
            let mut tx = WriteTx::begin(&self.writer).await?;
            let r = sqlx::query(
                "UPDATE tasks SET state = ?, ended_at = ?, reason = ? WHERE id = ? AND state = 'active'",
            )
            .bind(state.as_str())
            .bind(now)
            .bind(&reason)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            if r.rows_affected() == 0 {
                tx.rollback().await;
                return Ok(None);
            }
            let event = record_revocation(&mut tx, Some(&id), None, &reason, now).await?;
            tx.commit().await?;
            Ok(Some(event))
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
            let mut tx = WriteTx::begin(&self.writer).await?;
            let mut task_ids: Vec<String> = sqlx::query_scalar(
                "UPDATE tasks SET state = 'revoked', ended_at = ?, reason = ?
                 WHERE spiffe_id = ? AND state = 'active' RETURNING id",
            )
            .bind(now)
            .bind(&reason)
            .bind(&spiffe_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
            let leases = sqlx::query(
                "UPDATE leases SET revoked = 1, revoked_at = ?, reason = ?
                 WHERE spiffe_id = ? AND revoked = 0 AND expires_at > ?",
            )
            .bind(now)
            .bind(&reason)
            .bind(&spiffe_id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
            if task_ids.is_empty() && leases == 0 {
                tx.rollback().await;
                return Ok(None);
            }
            let event = record_event(&mut tx, (None, None, Some(&spiffe_id)), &reason, now).await?;
            tx.commit().await?;
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
                 VALUES (?, ?, ?, ?, ?, ?)
                 ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
            )
            .bind(&p.id)
            .bind(&p.attestor)
            .bind(&p.subject)
            .bind(serde_json::Value::Object(p.claims).to_string())
            .bind(&p.source_ip)
            .bind(now)
            .execute(&self.writer)
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
                "SELECT {PRINCIPAL_COLUMNS} FROM principals
                 WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id"
            ));
            sqlx::query(sql)
                .bind(serde_json::Value::from(ids).to_string())
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
                    "l.task_id IN (SELECT value FROM json_each(?2))
                     AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = l.task_id AND t.state = 'active')"
                }
            };
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {GRANT_COLUMNS} FROM leases l
                 WHERE {scope} AND l.principal IS NOT NULL AND l.revoked = 0 AND l.expires_at > ?1
                 GROUP BY {GRANT_GROUP}"
            ));
            let query = sqlx::query(sql).bind(now);
            let query = match tasks {
                None => query,
                Some(ids) => query.bind(serde_json::Value::from(ids).to_string()),
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
            let mut tx = WriteTx::begin(&self.writer).await?;
            // The event first: what it revokes names it.
            let event = record_event(&mut tx, (None, None, None), &reason, now).await?;
            let mut task_ids: Vec<String> = sqlx::query_scalar(
                "UPDATE tasks SET state = 'revoked', ended_at = ?1, reason = ?2, revoked_by = ?3
                 WHERE state = 'active' AND id IN (SELECT value FROM json_each(?4)) RETURNING id",
            )
            .bind(now)
            .bind(&reason)
            .bind(event.seq)
            .bind(serde_json::Value::from(set.tasks).to_string())
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
            let mut leases = 0;
            if !set.grants.is_empty() {
                leases += sqlx::query(
                    "UPDATE leases SET revoked = 1, revoked_at = ?1, reason = ?2, revoked_by = ?3
                     WHERE revoked = 0 AND expires_at > ?1 AND principal IS NOT NULL
                       AND EXISTS (SELECT 1 FROM json_each(?4) g
                                   WHERE g.value ->> 0 = leases.principal
                                     AND g.value ->> 1 = leases.spiffe_id
                                     AND g.value ->> 2 = leases.kind
                                     AND g.value ->> 3 = leases.audience
                                     AND g.value ->> 4 IS leases.task_id)",
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
                    "UPDATE leases SET revoked = 1, revoked_at = ?1, reason = ?2, revoked_by = ?3
                     WHERE signing_key IN (SELECT value FROM json_each(?4))
                       AND expires_at > ?1 AND revoked = 0",
                )
                .bind(now)
                .bind(&reason)
                .bind(event.seq)
                .bind(serde_json::Value::from(set.signing_keys).to_string())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?
                .rows_affected();
            }
            // Counted after the grants, so a lease revoked both ways counts once.
            let in_tasks: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM leases
                 WHERE revoked = 0 AND expires_at > ? AND task_id IN
                       (SELECT id FROM tasks WHERE revoked_by = ?)",
            )
            .bind(now)
            .bind(event.seq)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
            leases += u64::try_from(in_tasks).unwrap_or(0);
            if task_ids.is_empty() && leases == 0 && !set.announce {
                tx.rollback().await;
                return Ok(None);
            }
            tx.commit().await?;
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
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
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
            let mut tx = WriteTx::begin(&self.writer).await?;
            let seq: Option<i64> = sqlx::query_scalar(
                "UPDATE key_sequence SET seq = seq + 1 WHERE id = 1 AND seq = ? RETURNING seq",
            )
            .bind(i64::try_from(expected).unwrap_or(i64::MAX))
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
            let Some(seq) = seq else {
                tx.rollback().await;
                return Ok(None);
            };
            for op in ops {
                match op {
                    KeyOp::Put(k) => {
                        bind_key(
                            sqlx::query(sqlx::AssertSqlSafe(format!(
                                "INSERT OR REPLACE INTO signing_keys ({KEY_COLUMNS})
                             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                            ))),
                            k,
                        )
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                    }
                    KeyOp::Delete(id) => {
                        sqlx::query("DELETE FROM signing_keys WHERE id = ?")
                            .bind(id)
                            .execute(&mut *tx)
                            .await
                            .map_err(unavailable)?;
                    }
                }
            }
            tx.commit().await?;
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
                 WHERE l.signing_key IS NOT NULL AND l.expires_at > ?1 AND l.revoked = 0
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
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&l.id)
            .bind(&l.target)
            .bind(&l.reason)
            .bind(&l.created_by)
            .bind(l.created_at)
            .bind(l.expires_at)
            .execute(&self.writer)
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
            let r = sqlx::query("DELETE FROM locks WHERE id = ?")
                .bind(id)
                .execute(&self.writer)
                .await
                .map_err(unavailable)?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn due_tasks(&self, now: i64, limit: u32) -> BoxFuture<'_, Result<Vec<Task>, StoreError>> {
        Box::pin(async move {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'active' AND due_at <= ? ORDER BY due_at LIMIT ?"
            ));
            let query = sqlx::query(sql).bind(now).bind(i64::from(limit));
            fetch_tasks(&self.pool, query).await
        })
    }

    fn refresh_active_tasks(&self, now: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let r = sqlx::query(
                "UPDATE tasks SET due_at = MIN(deadline, ? + heartbeat_secs + grace_secs)
                 WHERE state = 'active'",
            )
            .bind(now)
            .execute(&self.writer)
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
                 WHERE l.id = ?1 OR l.serial = ?1"
            ));
            sqlx::query(sql)
                .bind(key)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?
                .first()
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
            let mut tx = WriteTx::begin(&self.writer).await?;
            let r = sqlx::query(
                "UPDATE leases SET revoked = 1, revoked_at = ?, reason = ? WHERE id = ? AND revoked = 0",
            )
            .bind(now)
            .bind(&reason)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            if r.rows_affected() == 0 {
                tx.rollback().await;
                return Ok(None);
            }
            let event = record_revocation(&mut tx, None, Some(&id), &reason, now).await?;
            tx.commit().await?;
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
                 WHERE seq > ? ORDER BY seq LIMIT ?",
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
        Box::pin(async move {
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM revocations")
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable)
        })
    }

    fn revoked_leases(&self, event: &Revocation) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>> {
        let event = event.clone();
        Box::pin(async move {
            // One row of JSON, built inside SQLite (see `leases_from_json`).
            let which = super::EventLeases::of(&event);
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT json_group_array(json_array(id, task_id, kind, serial, spiffe_id,
                            json(audience), issued_at, expires_at, revoked, revoked_at, reason)
                        ORDER BY id)
                 FROM leases WHERE {}",
                which.condition(|i| format!("?{i}"))
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
            let json: Option<String> = query.fetch_one(&self.pool).await.map_err(unavailable)?;
            leases_from_json(json.as_deref().unwrap_or("[]"))
        })
    }

    fn revoked_serials(&self, now: i64) -> BoxFuture<'_, Result<Vec<RevokedSerial>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT l.serial AS serial, COALESCE(l.revoked_at, t.ended_at) AS revoked_at,
                        l.expires_at AS expires_at
                 FROM leases l LEFT JOIN tasks t ON t.id = l.task_id
                 WHERE l.kind = 'x509' AND l.serial IS NOT NULL AND l.expires_at > ?
                   AND (l.revoked = 1 OR (t.id IS NOT NULL AND t.state != 'active'))
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
                 WHERE (?1 IS NULL OR spiffe_id = ?1)
                   AND {state}
                   AND (?3 IS NULL OR id < ?3)
                   AND (?4 IS NULL OR id = ?4)
                 ORDER BY id DESC LIMIT ?5",
                state = super::state_condition("state", "?2")
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
            let sql = sqlx::AssertSqlSafe(list_leases_sql(&f));
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
                "SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'active' AND (?1 IS NULL OR id > ?1)
                 ORDER BY id LIMIT ?2"
            ));
            let query = sqlx::query(sql).bind(after).bind(i64::from(limit));
            fetch_tasks(&self.pool, query).await
        })
    }

    fn prune(&self, before: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let mut tx = WriteTx::begin(&self.writer).await?;
            let mut deleted = 0;
            let principals = "DELETE FROM principals WHERE seen_at < {before}
                 AND id NOT IN (SELECT principal FROM leases WHERE principal IS NOT NULL)
                 AND id NOT IN (SELECT principal FROM tasks WHERE principal IS NOT NULL)";
            for statement in super::PRUNE.iter().chain([&principals]) {
                let sql = sqlx::AssertSqlSafe(statement.replace("{before}", "?"));
                deleted += sqlx::query(sql)
                    .bind(before)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?
                    .rows_affected();
            }
            tx.commit().await?;
            Ok(deleted)
        })
    }

    fn counts(&self, now: i64) -> BoxFuture<'_, Result<(u64, u64), StoreError>> {
        Box::pin(async move {
            let tasks: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE state = 'active'")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(unavailable)
                    .and_then(single)?;
            let leases: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM leases l LEFT JOIN tasks t ON t.id = l.task_id
                 WHERE l.expires_at > ? AND l.revoked = 0 AND (t.id IS NULL OR t.state = 'active')",
            )
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)
            .and_then(single)?;
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
                "SELECT COUNT(*) FROM tasks WHERE spiffe_id = ? AND state = 'active'",
            )
            .bind(spiffe_id)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)
            .and_then(single)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn count_task_leases(&self, task_id: &str) -> BoxFuture<'_, Result<u64, StoreError>> {
        let task_id = task_id.to_owned();
        Box::pin(async move {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM leases WHERE task_id = ?")
                .bind(task_id)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)
                .and_then(single)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // A real write: a full disk or a read-only file fails here, not only on the next
            // credential.
            sqlx::query("INSERT OR REPLACE INTO health (id, at) VALUES (1, unixepoch())")
                .execute(&self.writer)
                .await
                .map_err(unavailable)?;
            // SQLite reuses the space of its log once the log restarts, so that small write can
            // succeed on a full disk while the next commit that needs new space fails.
            if let Some(dir) = &self.dir {
                let fs = rustix::fs::statvfs(dir.as_path()).map_err(|e| {
                    StoreError::Unavailable(format!(
                        "cannot read free space of {}: {e}",
                        dir.display()
                    ))
                })?;
                let free = fs.f_bavail.saturating_mul(fs.f_frsize);
                if free < MIN_FREE_BYTES {
                    return Err(StoreError::Unavailable(format!(
                        "{} has {free} bytes free, under the {MIN_FREE_BYTES} the store needs",
                        dir.display()
                    )));
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn conformance_in_memory() {
        super::super::conformance::join_tokens(Arc::new(SqliteStore::in_memory().await.unwrap()))
            .await;
        super::super::conformance::tasks_and_leases(Arc::new(
            SqliteStore::in_memory().await.unwrap(),
        ))
        .await;
        super::super::conformance::identity_revocation(Arc::new(
            SqliteStore::in_memory().await.unwrap(),
        ))
        .await;
        super::super::conformance::principals_sets_and_locks(Arc::new(
            SqliteStore::in_memory().await.unwrap(),
        ))
        .await;
        super::super::conformance::signing_keys(Arc::new(SqliteStore::in_memory().await.unwrap()))
            .await;
    }

    /// SQLite's plan for listing leases, filtered by `task` or not.
    async fn query_plan(s: &SqliteStore, task: Option<&str>) -> String {
        let f = ListFilter {
            task_id: task.map(str::to_owned),
            limit: 100,
            ..ListFilter::default()
        };
        let sql = format!("EXPLAIN QUERY PLAN {}", list_leases_sql(&f));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(task)
            .fetch_all(&s.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>("detail"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Listing one task's leases reads them through the task index, not the whole table.
    #[tokio::test]
    async fn a_task_listing_reads_the_task_index() {
        let s = SqliteStore::in_memory().await.unwrap();
        let one_task = query_plan(&s, Some("t1")).await;
        assert!(
            one_task.contains("SEARCH l USING INDEX leases_task (task_id=?)"),
            "{one_task}"
        );
        // Without a task filter a page is read in id order, and stops at its limit.
        let all = query_plan(&s, None).await;
        assert!(
            all.contains("SCAN l USING INDEX sqlite_autoindex_leases_1"),
            "{all}"
        );
    }

    /// Each kind of revocation event reads its leases through an index, never the whole table.
    #[tokio::test]
    async fn revoked_leases_read_an_index_for_every_kind_of_event() {
        let s = SqliteStore::in_memory().await.unwrap();
        let event = |task: Option<&str>, lease: Option<&str>, spiffe: Option<&str>| Revocation {
            seq: 7,
            at: 100,
            task_id: task.map(Into::into),
            lease_id: lease.map(Into::into),
            spiffe_id: spiffe.map(Into::into),
            reason: "r".into(),
        };
        for e in [
            event(Some("t"), None, None),
            event(None, Some("l"), None),
            event(None, None, Some("spiffe://e.org/a")),
            event(None, None, None),
        ] {
            let which = super::super::EventLeases::of(&e);
            let sql = format!(
                "EXPLAIN QUERY PLAN SELECT id FROM leases WHERE {}",
                which.condition(|i| format!("?{i}"))
            );
            let plan = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind("x")
                .bind(1)
                .bind("r")
                .fetch_all(&s.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| r.try_get::<String, _>("detail").unwrap())
                .collect::<Vec<_>>()
                .join("; ");
            assert!(!plan.contains("SCAN leases"), "{e:?}: {plan}");
        }
    }

    #[tokio::test]
    async fn conformance_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join(FILE)).await.unwrap();
        super::super::conformance::tasks_and_leases(Arc::new(s)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_racing_their_task_end() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join(FILE)).await.unwrap();
        super::super::conformance::ended_task_covers_racing_leases(Arc::new(s)).await;
    }

    /// Under continuous writes the checkpointer copies the log into the database file and
    /// restarts it before the writer's own backstop checkpoint is reached, and nothing written
    /// is lost on the way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_restarts_under_continuous_writes() {
        use super::super::conformance::{lease, task};
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(SqliteStore::open(&dir.path().join(FILE)).await.unwrap());
        const TASKS: usize = 64;
        for t in 0..TASKS {
            let t = task(
                &format!("t{t}"),
                "spiffe://e.org/w",
                i64::MAX / 2,
                i64::MAX / 2,
            );
            s.insert_task(t).await.unwrap();
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..TASKS)
            .map(|t| {
                let (s, stop) = (s.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let l = lease(
                            &format!("t{t}-{n}"),
                            Some(&format!("t{t}")),
                            None,
                            i64::MAX / 2,
                        );
                        s.insert_lease(l).await.unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut peak = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (_, log, _) = passive_checkpoint(&s.pool).await.unwrap();
            assert!(
                log < WRITER_AUTOCHECKPOINT_FRAMES,
                "{log} frames: the checkpointer fell behind"
            );
            if peak >= WAL_RESTART_FRAMES && log < peak / 2 {
                break;
            }
            peak = peak.max(log);
            assert!(
                std::time::Instant::now() < deadline,
                "the log never restarted (peak {peak} frames)"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut written = 0;
        for w in writers {
            written += w.await.unwrap();
        }
        let mut held = 0;
        for t in 0..TASKS {
            held += s.count_task_leases(&format!("t{t}")).await.unwrap();
        }
        assert_eq!(held, written);
    }

    #[tokio::test]
    async fn file_database_survives_reopen_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let s = SqliteStore::open(&path).await.unwrap();
        super::super::conformance::join_tokens(Arc::new(s.clone())).await;
        drop(s);
        let again = SqliteStore::open(&path).await.unwrap();
        assert!(again.join_token([1; 32]).await.unwrap().is_some());
    }
}
