//! The `join_token` attestor: a single-use token created by an admin, presented once in the
//! `x-ephemera-join-token` metadata. Stored only as a SHA-256 hash. The token is consumed when
//! the request it authenticates succeeds (so a denied request does not burn it), and of two
//! concurrent uses exactly one succeeds.
//!
//! Claims: `name`, `token_id`, and the extra claims given at creation.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;
use serde_json::Value;

use super::{AttestError, AttestedIdentity, Attestor, BoxFuture, Evidence, TokenRejection};
use crate::clock::Clock;
use crate::secret::Secret;
use crate::store::{Store, TokenHash};

/// The attestor's name in mapping rules.
pub const NAME: &str = "join_token";
/// The metadata key carrying a join token.
pub const METADATA_KEY: &str = "x-ephemera-join-token";
/// Prefix of every join token, so one is recognisable in a leaked log or file.
pub const PREFIX: &str = "ejt_";
/// Longest join token accepted.
pub const MAX_LEN: usize = 128;

/// A new random join token: the prefix and 256 random bits.
pub fn generate(rng: &dyn SecureRandom) -> Result<Secret<String>, AttestError> {
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes)
        .map_err(|_| AttestError::KeysUnavailable("random number generator failed".into()))?;
    Ok(Secret::new(format!(
        "{PREFIX}{}",
        URL_SAFE_NO_PAD.encode(bytes)
    )))
}

/// The stored form of a token.
pub fn hash(token: &str) -> TokenHash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// The `join_token` attestor.
pub struct JoinTokenAttestor {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl JoinTokenAttestor {
    /// An attestor over the tokens in `store`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
    }
}

impl Attestor for JoinTokenAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn attest<'a>(
        &'a self,
        evidence: &'a Evidence,
    ) -> BoxFuture<'a, Result<Option<AttestedIdentity>, AttestError>> {
        Box::pin(async move {
            let Some(token) = &evidence.join_token else {
                return Ok(None);
            };
            let token = token.expose();
            if token.len() > MAX_LEN || !token.starts_with(PREFIX) {
                return Err(TokenRejection::UnknownJoinToken.into());
            }
            let h = hash(token);
            let stored = self
                .store
                .join_token(h)
                .await
                .map_err(|e| AttestError::KeysUnavailable(e.to_string()))?
                .ok_or(TokenRejection::UnknownJoinToken)?;
            if stored.used_at.is_some() {
                return Err(TokenRejection::JoinTokenUsed.into());
            }
            if self.clock.unix_now() >= stored.expires_at {
                return Err(TokenRejection::JoinTokenExpired.into());
            }
            let mut claims = stored.claims;
            claims.insert("name".into(), Value::from(stored.name));
            claims.insert("token_id".into(), Value::from(stored.id.clone()));
            Ok(Some(AttestedIdentity {
                attestor: NAME,
                subject: format!("join_token:{}", stored.id),
                claims,
                issued_at: Some(
                    std::time::SystemTime::UNIX_EPOCH
                        + std::time::Duration::from_secs(
                            u64::try_from(stored.created_at).unwrap_or(0),
                        ),
                ),
                expires_at: None,
                single_use: Some(h),
            }))
        })
    }
}
