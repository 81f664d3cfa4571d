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

use super::claims::{ClaimPath, MatchValue};
use super::jwks::{Alg, JwksCache};
use super::{AttestError, AttestedIdentity, Attestor, BoxFuture, Evidence, TokenRejection, shown};
use crate::clock::Clock;

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
    /// Longest remaining validity (`exp` − now) accepted: a far-future `exp` is refused.
    pub max_token_lifetime: Duration,
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

fn malformed(what: &'static str) -> AttestError {
    TokenRejection::Malformed(what).into()
}

fn decode_json(
    part: &str,
    not_base64: &'static str,
    not_object: &'static str,
) -> Result<Map<String, Value>, AttestError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| malformed(not_base64))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(malformed(not_object)),
    }
}

fn count_claims(map: &Map<String, Value>, depth: usize) -> Result<usize, AttestError> {
    if depth > MAX_DEPTH {
        return Err(TokenRejection::TooDeep(MAX_DEPTH).into());
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

/// Latest NumericDate accepted: the end of year 9999.
pub const MAX_NUMERIC_DATE: i64 = 253_402_300_799;

/// A date claim (`exp`, `nbf`, `iat`): an integer NumericDate (RFC 7519) from 0 to
/// [`MAX_NUMERIC_DATE`]. A fraction, a string, or a number out of that range (2^64 + 7 read as
/// "never") is refused.
fn numeric(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, AttestError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if (0..=MAX_NUMERIC_DATE).contains(&n) => Ok(Some(n)),
            Some(_) => Err(TokenRejection::DateOutOfRange(name).into()),
            None if v.is_number() => Err(TokenRejection::DateOutOfRange(name).into()),
            None => Err(TokenRejection::NotANumber(name).into()),
        },
    }
}

/// The tag names claims become in policy (`a.b` for `{"a": {"b": ..}}`), refusing two claims
/// with the same name (`{"a.b": 1, "a": {"b": 2}}`): policy and identity mapping then always
/// read the same value for a claim.
pub fn claim_names_are_unique(claims: &Map<String, Value>) -> Result<(), TokenRejection> {
    fn walk(
        prefix: &str,
        map: &Map<String, Value>,
        seen: &mut std::collections::HashSet<String>,
    ) -> Result<(), TokenRejection> {
        for (k, v) in map {
            let name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Object(inner) => walk(&name, inner, seen)?,
                _ => {
                    if !seen.insert(name.clone()) {
                        return Err(TokenRejection::ClaimCollision(shown(&name)));
                    }
                }
            }
        }
        Ok(())
    }
    walk("", claims, &mut std::collections::HashSet::new())
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
        let header = decode_json(h, "header is not base64url", "header is not a JSON object")?;
        let claims = decode_json(
            c,
            "payload is not base64url",
            "payload is not a JSON object",
        )?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(TokenRejection::MissingIssuer)?;
        let issuer_index = self
            .issuers
            .iter()
            .position(|i| i.issuer == iss)
            .ok_or_else(|| TokenRejection::UntrustedIssuer(shown(iss)))?;
        let issuer = &self.issuers[issuer_index];
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(TokenRejection::MissingAlgorithm)?;
        let alg = Alg::parse(alg_name)
            .ok()
            .filter(|a| issuer.algorithms.contains(a))
            .ok_or_else(|| TokenRejection::Algorithm(shown(alg_name)))?;
        let kid = header.get("kid").and_then(Value::as_str);
        let keys = issuer
            .jwks
            .keys_for(kid)
            .await
            .map_err(AttestError::KeysUnavailable)?;
        if keys.is_empty() {
            return Err(match kid {
                Some(k) => TokenRejection::UnknownKeyId(shown(k)),
                None => TokenRejection::NoKeys,
            }
            .into());
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| malformed("signature is not base64url"))?;
        let signed = &token[..h.len() + 1 + c.len()];
        if !keys.iter().any(|k| k.verify(alg, signed.as_bytes(), &sig)) {
            return Err(TokenRejection::Signature.into());
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
            return Err(TokenRejection::TooManyClaims {
                count,
                max: MAX_CLAIMS,
            }
            .into());
        }
        claim_names_are_unique(&claims)?;
        let now = self.clock.unix_now();
        let skew = i64::try_from(issuer.clock_skew.as_secs()).unwrap_or(0);
        let exp = numeric(&claims, "exp")?.ok_or(TokenRejection::MissingExpiry)?;
        if now >= exp.saturating_add(skew) {
            return Err(TokenRejection::Expired.into());
        }
        let lifetime = i64::try_from(issuer.max_token_lifetime.as_secs()).unwrap_or(i64::MAX);
        if exp.saturating_sub(now) > lifetime.saturating_add(skew) {
            return Err(TokenRejection::ExpiryTooFar { max_secs: lifetime }.into());
        }
        if let Some(nbf) = numeric(&claims, "nbf")?
            && now.saturating_add(skew) < nbf
        {
            return Err(TokenRejection::NotYetValid.into());
        }
        let iat = numeric(&claims, "iat")?;
        if let Some(iat) = iat
            && now.saturating_add(skew) < iat
        {
            return Err(TokenRejection::IssuedInFuture.into());
        }
        if let Some(max) = issuer.max_token_age {
            let iat = iat.ok_or(TokenRejection::MissingIssuedAt)?;
            let max_secs = i64::try_from(max.as_secs()).unwrap_or(i64::MAX);
            let age = now.saturating_sub(iat);
            if age > max_secs.saturating_add(skew) {
                return Err(TokenRejection::TooOld { age, max: max_secs }.into());
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
            return Err(TokenRejection::Audience.into());
        }
        for (path, want) in &issuer.required_claims {
            if !want.matches(path.lookup(&claims)) {
                return Err(TokenRejection::RequiredClaim(path.to_string()).into());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::MAX_SHOWN;
    use crate::clock::ManualClock;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    const ISS: &str = "https://issuer.example";
    const AUD: &str = "ephemera";
    const NOW: i64 = 1_800_000_000;

    struct Issuer {
        key: EcdsaKeyPair,
        _dir: tempfile::TempDir,
        attestor: OidcAttestor,
    }

    fn issuer() -> Issuer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = key.public_key().as_ref();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]});
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks.to_string()).unwrap();
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(NOW as u64));
        let attestor = OidcAttestor::new(
            vec![OidcIssuer {
                issuer: ISS.into(),
                audiences: vec![AUD.into()],
                algorithms: vec![Alg::Es256],
                max_token_age: Some(Duration::from_secs(600)),
                max_token_lifetime: Duration::from_secs(3600),
                clock_skew: Duration::from_secs(30),
                required_claims: vec![(
                    ClaimPath::parse("repository_owner").unwrap(),
                    MatchValue::Equals("acme".into()),
                )],
                jwks: JwksCache::new(
                    super::super::jwks::JwksSource::File(path),
                    Duration::from_secs(60),
                ),
            }],
            Arc::new(clock),
        );
        Issuer {
            key,
            _dir: dir,
            attestor,
        }
    }

    impl Issuer {
        fn sign(&self, header: &Value, claims: &Value) -> String {
            let signed = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let sig = self
                .key
                .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
                .unwrap();
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
        }

        async fn attest(&self, token: String) -> Result<AttestedIdentity, AttestError> {
            let evidence = Evidence {
                bearer: Some(crate::secret::Secret::new(token)),
                ..Evidence::default()
            };
            self.attestor.attest(&evidence).await.map(Option::unwrap)
        }
    }

    fn good() -> Value {
        json!({"iss": ISS, "aud": AUD, "sub": "repo:acme/api", "exp": NOW + 300,
               "iat": NOW - 10, "repository_owner": "acme"})
    }

    fn with(f: impl Fn(&mut Value)) -> Value {
        let mut c = good();
        f(&mut c);
        c
    }

    #[tokio::test]
    async fn each_rejected_token_names_the_rule_that_refused_it() {
        let i = issuer();
        let es = json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
        assert!(i.attest(i.sign(&es, &good())).await.is_ok());
        let long = "k".repeat(8 * 1024);
        let tampered = {
            let t = i.sign(&es, &good());
            let (head, _) = t.rsplit_once('.').unwrap();
            format!("{head}.{}", URL_SAFE_NO_PAD.encode([7u8; 64]))
        };
        let mut many = good();
        for n in 0..MAX_CLAIMS {
            many[format!("c{n}")] = json!(n);
        }
        let mut deep = json!("leaf");
        for _ in 0..=MAX_DEPTH + 1 {
            deep = json!({ "d": deep });
        }
        use TokenRejection as R;
        let rows: Vec<(&str, String, TokenRejection)> = vec![
            ("not a JWS", "a.b".into(), R::Malformed("not a compact JWS")),
            (
                "payload not base64",
                format!("{}.***.x", URL_SAFE_NO_PAD.encode(es.to_string())),
                R::Malformed("payload is not base64url"),
            ),
            (
                "no iss",
                i.sign(
                    &es,
                    &with(|c| drop(c.as_object_mut().unwrap().remove("iss"))),
                ),
                R::MissingIssuer,
            ),
            (
                "untrusted iss, bounded",
                i.sign(&es, &with(|c| c["iss"] = json!("x".repeat(1000)))),
                R::UntrustedIssuer(format!("{}…(1000 bytes)", "x".repeat(MAX_SHOWN))),
            ),
            (
                "no alg",
                i.sign(&json!({"kid": "k1"}), &good()),
                R::MissingAlgorithm,
            ),
            (
                "alg none",
                i.sign(&json!({"alg": "none", "kid": "k1"}), &good()),
                R::Algorithm("none".into()),
            ),
            (
                "alg HS256",
                i.sign(&json!({"alg": "HS256", "kid": "k1"}), &good()),
                R::Algorithm("HS256".into()),
            ),
            (
                "unknown kid, bounded",
                i.sign(&json!({"alg": "ES256", "kid": long}), &good()),
                R::UnknownKeyId(format!("{}…(8192 bytes)", "k".repeat(MAX_SHOWN))),
            ),
            ("signature", tampered, R::Signature),
            (
                "no exp",
                i.sign(
                    &es,
                    &with(|c| drop(c.as_object_mut().unwrap().remove("exp"))),
                ),
                R::MissingExpiry,
            ),
            (
                "exp not a number",
                i.sign(&es, &with(|c| c["exp"] = json!("soon"))),
                R::NotANumber("exp"),
            ),
            (
                "expired",
                i.sign(&es, &with(|c| c["exp"] = json!(NOW - 31))),
                R::Expired,
            ),
            (
                "nbf ahead",
                i.sign(&es, &with(|c| c["nbf"] = json!(NOW + 31))),
                R::NotYetValid,
            ),
            (
                "iat ahead",
                i.sign(&es, &with(|c| c["iat"] = json!(NOW + 31))),
                R::IssuedInFuture,
            ),
            (
                "no iat",
                i.sign(
                    &es,
                    &with(|c| drop(c.as_object_mut().unwrap().remove("iat"))),
                ),
                R::MissingIssuedAt,
            ),
            (
                "too old",
                i.sign(&es, &with(|c| c["iat"] = json!(NOW - 700))),
                R::TooOld { age: 700, max: 600 },
            ),
            (
                "audience",
                i.sign(&es, &with(|c| c["aud"] = json!("other"))),
                R::Audience,
            ),
            (
                "required claim",
                i.sign(&es, &with(|c| c["repository_owner"] = json!("evil"))),
                R::RequiredClaim("repository_owner".into()),
            ),
            (
                "too many claims",
                i.sign(&es, &many),
                R::TooManyClaims {
                    count: MAX_CLAIMS + 6,
                    max: MAX_CLAIMS,
                },
            ),
            (
                "too deep",
                i.sign(&es, &with(|c| c["deep"] = deep.clone())),
                R::TooDeep(MAX_DEPTH),
            ),
            (
                "exp 2^64+7",
                i.sign(
                    &es,
                    &with(|c| c["exp"] = serde_json::from_str("18446744073709551623").unwrap()),
                ),
                R::DateOutOfRange("exp"),
            ),
            (
                "exp a fraction",
                i.sign(&es, &with(|c| c["exp"] = json!(NOW as f64 + 60.5))),
                R::DateOutOfRange("exp"),
            ),
            (
                "iat negative",
                i.sign(&es, &with(|c| c["iat"] = json!(-1))),
                R::DateOutOfRange("iat"),
            ),
            (
                "nbf past year 9999",
                i.sign(&es, &with(|c| c["nbf"] = json!(MAX_NUMERIC_DATE + 1))),
                R::DateOutOfRange("nbf"),
            ),
            (
                "exp beyond the issuer's max_token_lifetime",
                i.sign(&es, &with(|c| c["exp"] = json!(NOW + 3600 + 31))),
                R::ExpiryTooFar { max_secs: 3600 },
            ),
            (
                "a claim colliding with a nested one",
                i.sign(
                    &es,
                    &with(|c| {
                        c["kubernetes.io"] = json!({"namespace": "prod"});
                        c["kubernetes.io.namespace"] = json!("dev");
                    }),
                ),
                R::ClaimCollision("kubernetes.io.namespace".into()),
            ),
        ];
        for (what, token, want) in rows {
            match i.attest(token).await {
                Err(AttestError::Token(got)) => assert_eq!(got, want, "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn shown_bounds_caller_strings_at_a_character_boundary() {
        assert_eq!(shown("short"), "short");
        let s = format!("{}é", "a".repeat(MAX_SHOWN - 1));
        assert_eq!(
            shown(&s),
            format!("{}…({} bytes)", "a".repeat(MAX_SHOWN - 1), s.len())
        );
    }
}
