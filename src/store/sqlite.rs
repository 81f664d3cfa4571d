//! SQLite store, the embedded default: one file in the data directory, WAL journal,
//! `synchronous = NORMAL`, versioned migrations applied at start.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::{BoxFuture, JoinToken, NewJoinToken, Store, StoreError, TokenHash};

/// File name of the database inside the data directory.
pub const FILE: &str = "ephemera.db";

/// Migrations, applied in order; a migration never changes once released.
const MIGRATIONS: &[(i64, &str)] = &[(
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
)];

fn unavailable(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict,
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
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
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        Self::connect(options).await
    }

    /// A private in-memory database (tests).
    pub async fn in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(unavailable)?;
        Self::connect(options).await
    }

    async fn connect(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let pool = SqlitePoolOptions::new()
            // One connection: SQLite has one writer, and an in-memory database is per connection.
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable)?;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            sqlx::query("INSERT INTO schema_migrations (version) VALUES (?)")
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
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
                 FROM join_tokens WHERE hash = ?",
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
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
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
