//! The `oidc` attestor: verifies an OIDC/JWT bearer token (GitHub Actions, GitLab CI
//! `id_tokens`, Kubernetes projected service-account tokens, any OIDC issuer).
//!
//! Checks, in order: size, shape, issuer (exact match with a configured one), algorithm (the
//! issuer's allow-list; `none` and HMAC never), key by `kid` (refetching the issuer's JWKS on an
//! unknown `kid`, rate limited), signature (ring), `exp`, `nbf`, `iat` age, audience, required
//! claims, and a bound on claim count. A verified signature may be cached by the token's hash;
//! every other check runs on every request. Never logs the token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::jwks::{Alg, JwksCache};
use super::{AttestError, AttestedIdentity, Attestor, BoxFuture, Evidence};
use crate::clock::Clock;
use crate::policy::mapping::{ClaimPath, MatchValue};

/// The attestor's name in mapping rules.
pub const NAME: &str = "oidc";
/// Largest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most claims (counting nested members) a token may carry.
pub const MAX_CLAIMS: usize = 128;
/// Deepest claim nesting accepted.
pub const MAX_DEPTH: usize = 8;
/// Most verified signatures remembered.
const CACHE_LIMIT: usize = 8192;

/// One trusted issuer.
pub struct OidcIssuer {
    /// Exact `iss` value.
    pub issuer: String,
    /// Accepted audiences: the token's `aud` must contain one.
    pub audiences: Vec<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<Alg>,
    /// Oldest `iat` accepted, if limited.
    pub max_token_age: Option<Duration>,
    /// Tolerance for `exp`, `nbf` and `iat`.
    pub clock_skew: Duration,
    /// Claims that must have given values.
    pub required_claims: Vec<(ClaimPath, MatchValue)>,
    /// The issuer's keys.
    pub jwks: JwksCache,
}

/// A token whose signature has been verified.
#[derive(Clone)]
struct Verified {
    issuer_index: usize,
    claims: Map<String, Value>,
}

/// The `oidc` attestor over its configured issuers.
pub struct OidcAttestor {
    issuers: Vec<OidcIssuer>,
    clock: Arc<dyn Clock>,
    verified: Mutex<HashMap<[u8; 32], Verified>>,
}

fn malformed(what: &str) -> AttestError {
    AttestError::TokenInvalid(format!("token is malformed: {what}"))
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, AttestError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| malformed(&format!("{what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(malformed(&format!("{what} is not a JSON object"))),
    }
}

fn count_claims(map: &Map<String, Value>, depth: usize) -> Result<usize, AttestError> {
    if depth > MAX_DEPTH {
        return Err(AttestError::TokenInvalid(format!(
            "claims are nested deeper than {MAX_DEPTH}"
        )));
    }
    let mut n = 0;
    for v in map.values() {
        n += 1;
        if let Value::Object(inner) = v {
            n += count_claims(inner, depth + 1)?;
        }
    }
    Ok(n)
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, AttestError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| malformed(&format!("{name} is not a number"))),
    }
}

fn unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

impl OidcAttestor {
    /// An attestor trusting `issuers`.
    pub fn new(issuers: Vec<OidcIssuer>, clock: Arc<dyn Clock>) -> Self {
        Self {
            issuers,
            clock,
            verified: Mutex::new(HashMap::new()),
        }
    }

    async fn verify_signature(&self, token: &str) -> Result<Verified, AttestError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        if let Some(v) = self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(v.clone());
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not a compact JWS"));
        };
        let header = decode_json(h, "header")?;
        let claims = decode_json(c, "payload")?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(AttestError::TokenInvalid("token has no iss claim".into()))?;
        let issuer_index = self
            .issuers
            .iter()
            .position(|i| i.issuer == iss)
            .ok_or_else(|| AttestError::TokenInvalid(format!("issuer {iss:?} is not trusted")))?;
        let issuer = &self.issuers[issuer_index];
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("header has no alg"))?;
        let alg = Alg::parse(alg_name)
            .ok()
            .filter(|a| issuer.algorithms.contains(a))
            .ok_or_else(|| {
                AttestError::TokenInvalid(format!(
                    "algorithm {alg_name:?} is not accepted for this issuer"
                ))
            })?;
        let kid = header.get("kid").and_then(Value::as_str);
        let keys = issuer
            .jwks
            .keys_for(kid)
            .await
            .map_err(AttestError::KeysUnavailable)?;
        if keys.is_empty() {
            return Err(AttestError::TokenInvalid(match kid {
                Some(k) => format!("unknown key id {k:?}"),
                None => "token has no kid and the issuer has no keys".into(),
            }));
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| malformed("signature is not base64url"))?;
        let signed = &token[..h.len() + 1 + c.len()];
        if !keys.iter().any(|k| k.verify(alg, signed.as_bytes(), &sig)) {
            return Err(AttestError::TokenInvalid(
                "signature does not verify".into(),
            ));
        }
        let v = Verified {
            issuer_index,
            claims,
        };
        let mut cache = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, v.clone());
        Ok(v)
    }

    fn check_claims(&self, v: Verified) -> Result<AttestedIdentity, AttestError> {
        let issuer = &self.issuers[v.issuer_index];
        let claims = v.claims;
        let count = count_claims(&claims, 0)?;
        if count > MAX_CLAIMS {
            return Err(AttestError::TokenInvalid(format!(
                "token has {count} claims, more than the limit of {MAX_CLAIMS}"
            )));
        }
        let now = self.clock.unix_now();
        let skew = i64::try_from(issuer.clock_skew.as_secs()).unwrap_or(0);
        let exp = numeric(&claims, "exp")?
            .ok_or(AttestError::TokenInvalid("token has no exp claim".into()))?;
        if now >= exp.saturating_add(skew) {
            return Err(AttestError::TokenInvalid("token has expired".into()));
        }
        if let Some(nbf) = numeric(&claims, "nbf")?
            && now.saturating_add(skew) < nbf
        {
            return Err(AttestError::TokenInvalid(
                "token is not valid yet (nbf)".into(),
            ));
        }
        let iat = numeric(&claims, "iat")?;
        if let Some(iat) = iat
            && now.saturating_add(skew) < iat
        {
            return Err(AttestError::TokenInvalid(
                "token is issued in the future (iat)".into(),
            ));
        }
        if let Some(max) = issuer.max_token_age {
            let iat = iat.ok_or(AttestError::TokenInvalid("token has no iat claim".into()))?;
            let max_secs = i64::try_from(max.as_secs()).unwrap_or(i64::MAX);
            let age = now.saturating_sub(iat);
            if age > max_secs.saturating_add(skew) {
                return Err(AttestError::TokenInvalid(format!(
                    "token was issued {age}s ago, more than the maximum age of {max_secs}s"
                )));
            }
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => issuer.audiences.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| issuer.audiences.iter().any(|w| w == a)),
            _ => false,
        };
        if !aud_ok {
            return Err(AttestError::TokenInvalid(
                "token audience is not accepted".into(),
            ));
        }
        for (path, want) in &issuer.required_claims {
            if !want.matches(path.lookup(&claims)) {
                return Err(AttestError::TokenInvalid(format!(
                    "required claim {path} does not have an accepted value"
                )));
            }
        }
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned();
        Ok(AttestedIdentity {
            attestor: NAME,
            subject: format!("{}#{}", issuer.issuer, sub),
            claims,
            issued_at: iat.map(unix),
            expires_at: Some(unix(exp)),
            single_use: None,
        })
    }
}

impl Attestor for OidcAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn attest<'a>(
        &'a self,
        evidence: &'a Evidence,
    ) -> BoxFuture<'a, Result<Option<AttestedIdentity>, AttestError>> {
        Box::pin(async move {
            let Some(token) = &evidence.bearer else {
                return Ok(None);
            };
            let token = token.expose().as_str();
            if token.len() > MAX_TOKEN_BYTES {
                return Err(AttestError::TokenTooLarge {
                    size: token.len(),
                    max: MAX_TOKEN_BYTES,
                });
            }
            let verified = self.verify_signature(token).await?;
            self.check_claims(verified).map(Some)
        })
    }
}
