//! Durable state behind one narrow trait: exactly the queries the broker needs.
//!
//! Backends: SQLite (embedded default). Every backend passes the same conformance suite
//! (`store::conformance`). Secrets are never stored in clear: join tokens are kept as SHA-256
//! hashes.

pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

/// A boxed future, so stores can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, read-only, full or otherwise failing.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A row that must be unique already exists.
    #[error("already exists")]
    Conflict,
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// SHA-256 of a join token: what is stored and looked up.
pub type TokenHash = [u8; 32];

/// A join token to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJoinToken {
    /// Hash of the token.
    pub hash: TokenHash,
    /// Public id (for listing and audit).
    pub id: String,
    /// Name, a claim for identity mapping.
    pub name: String,
    /// Extra claims (JSON object).
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
}

/// A stored join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Extra claims.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// When it was used, if it was.
    pub used_at: Option<i64>,
}

/// The broker's durable state.
pub trait Store: Send + Sync {
    /// Stores a new join token.
    fn create_join_token(&self, token: NewJoinToken) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Looks up a join token by hash.
    fn join_token(&self, hash: TokenHash) -> BoxFuture<'_, Result<Option<JoinToken>, StoreError>>;

    /// Marks a join token used, if it is unused and unexpired at `now`. Returns whether this
    /// call consumed it: of concurrent callers, exactly one wins.
    fn consume_join_token(
        &self,
        hash: TokenHash,
        now: i64,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Whether the store answers (for `/readyz`).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// The one conformance suite every backend must pass.
#[cfg(test)]
pub mod conformance {
    use super::*;

    fn token(hash: u8, expires_at: i64) -> NewJoinToken {
        let mut claims = serde_json::Map::new();
        claims.insert("rack".into(), serde_json::Value::from("r7"));
        NewJoinToken {
            hash: [hash; 32],
            id: format!("jt-{hash}"),
            name: "build-box".into(),
            claims,
            created_at: 1_000,
            expires_at,
        }
    }

    /// Join tokens: stored by hash, single use, expiry honoured, concurrent use has one winner.
    pub async fn join_tokens(store: std::sync::Arc<dyn Store>) {
        store.ping().await.unwrap();
        store.create_join_token(token(1, 2_000)).await.unwrap();
        assert!(matches!(
            store.create_join_token(token(1, 2_000)).await,
            Err(StoreError::Conflict)
        ));
        let got = store.join_token([1; 32]).await.unwrap().unwrap();
        assert_eq!(got.name, "build-box");
        assert_eq!(got.claims["rack"], "r7");
        assert_eq!(got.used_at, None);
        assert!(store.join_token([9; 32]).await.unwrap().is_none());

        // Expired tokens cannot be consumed.
        assert!(!store.consume_join_token([1; 32], 2_000).await.unwrap());
        // Concurrent use: exactly one winner.
        let mut handles = Vec::new();
        for _ in 0..8 {
            let s = store.clone();
            handles.push(tokio::spawn(async move {
                s.consume_join_token([1; 32], 1_500).await.unwrap()
            }));
        }
        let mut wins = 0;
        for h in handles {
            if h.await.unwrap() {
                wins += 1;
            }
        }
        assert_eq!(wins, 1);
        assert_eq!(
            store.join_token([1; 32]).await.unwrap().unwrap().used_at,
            Some(1_500)
        );
        assert!(!store.consume_join_token([9; 32], 1_500).await.unwrap());
    }
}
