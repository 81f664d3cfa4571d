//! JSON Web Key Sets for verifying OIDC evidence: parsing, signature verification on ring, and a
//! cache that refetches on an unknown `kid` at most once per interval.
//!
//! Sources are a file (re-read on refresh) or a URL: `https://` with the system's roots or a
//! configured CA file, or `http://` on loopback only. Responses are bounded in size and time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use tokio::sync::Mutex;

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Time allowed for one JWKS fetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWKS is refetched after this long even when every `kid` is known.
pub const MAX_AGE: Duration = Duration::from_secs(3600);

/// A JWS algorithm accepted for evidence. HMAC and `none` do not exist here on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// ECDSA P-384 with SHA-384.
    Es384,
    /// Ed25519.
    EdDsa,
}

impl Alg {
    /// Parses a JOSE `alg` name; `none` and HMAC are refused with a reason.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "EdDSA" => Self::EdDsa,
            "none" => return Err("alg \"none\" is never accepted".into()),
            a if a.starts_with("HS") => {
                return Err(format!("HMAC algorithm {a:?} is never accepted"));
            }
            other => return Err(format!("unsupported algorithm {other:?}")),
        })
    }

    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::EdDsa => "EdDSA",
        }
    }
}

/// One verification key.
#[derive(Debug, Clone)]
pub struct Jwk {
    /// Key id, if the set gives one.
    pub kid: Option<String>,
    /// The algorithm the set pins for this key, if any.
    pub alg: Option<String>,
    key: KeyMaterial,
}

#[derive(Debug, Clone)]
enum KeyMaterial {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Ec { curve: &'static str, point: Vec<u8> },
    Ed25519(Vec<u8>),
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

fn b64(field: &Option<String>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(field.as_deref()?).ok()
}

/// Parses a JWKS document; keys it cannot use (encryption keys, unknown types) are skipped.
pub fn parse_jwks(doc: &[u8]) -> Result<Vec<Jwk>, String> {
    let raw: RawJwks = serde_json::from_slice(doc).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for v in raw.keys {
        let Ok(k) = serde_json::from_value::<RawJwk>(v) else {
            continue;
        };
        if k.use_.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let key = match (k.kty.as_str(), k.crv.as_deref()) {
            ("RSA", _) => match (b64(&k.n), b64(&k.e)) {
                (Some(n), Some(e)) => KeyMaterial::Rsa { n, e },
                _ => continue,
            },
            ("EC", Some(crv @ ("P-256" | "P-384"))) => match (b64(&k.x), b64(&k.y)) {
                (Some(x), Some(y)) => {
                    let mut point = vec![4u8];
                    point.extend(x);
                    point.extend(y);
                    KeyMaterial::Ec {
                        curve: if crv == "P-256" { "P-256" } else { "P-384" },
                        point,
                    }
                }
                _ => continue,
            },
            ("OKP", Some("Ed25519")) => match b64(&k.x) {
                Some(x) => KeyMaterial::Ed25519(x),
                None => continue,
            },
            _ => continue,
        };
        keys.push(Jwk {
            kid: k.kid,
            alg: k.alg,
            key,
        });
    }
    Ok(keys)
}

impl Jwk {
    /// Verifies `sig` over `msg` with `alg`; the key type must fit the algorithm.
    pub fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        if self.alg.as_deref().is_some_and(|a| a != alg.name()) {
            return false;
        }
        match (&self.key, alg) {
            (KeyMaterial::Rsa { n, e }, Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256) => {
                let params = match alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    _ => &signature::RSA_PSS_2048_8192_SHA256,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            (
                KeyMaterial::Ec {
                    curve: "P-256",
                    point,
                },
                Alg::Es256,
            ) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(msg, sig)
                .is_ok(),
            (
                KeyMaterial::Ec {
                    curve: "P-384",
                    point,
                },
                Alg::Es384,
            ) => UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point)
                .verify(msg, sig)
                .is_ok(),
            (KeyMaterial::Ed25519(x), Alg::EdDsa) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(msg, sig)
                .is_ok(),
            _ => false,
        }
    }
}

/// Where a JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A local file.
    File(PathBuf),
    /// A URL, with optional PEM trust anchors (default: the system's roots).
    Url {
        /// `https://...` (or `http://` on loopback).
        url: String,
        /// PEM CA file for the TLS connection.
        ca_file: Option<PathBuf>,
    },
}

impl JwksSource {
    async fn fetch(&self) -> Result<Vec<u8>, String> {
        match self {
            Self::File(path) => {
                let meta = tokio::fs::metadata(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if meta.len() > MAX_JWKS_BYTES as u64 {
                    return Err(format!("{} is over {MAX_JWKS_BYTES} bytes", path.display()));
                }
                tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            Self::Url { url, ca_file } => tokio::time::timeout(
                FETCH_TIMEOUT,
                crate::httpc::get(url, ca_file.as_deref(), &[], MAX_JWKS_BYTES),
            )
            .await
            .map_err(|_| format!("fetching {url}: timed out"))?,
        }
    }
}

struct CacheState {
    keys: Vec<Jwk>,
    fetched: Option<Instant>,
}

/// A JWKS cache: fetched on first use, refreshed after [`MAX_AGE`], and refetched when a token
/// names an unknown `kid` — at most once per `min_refetch` so bogus kids cannot hammer the issuer.
pub struct JwksCache {
    source: JwksSource,
    min_refetch: Duration,
    state: Mutex<CacheState>,
}

impl JwksCache {
    /// A cache over `source`.
    pub fn new(source: JwksSource, min_refetch: Duration) -> Self {
        Self {
            source,
            min_refetch,
            state: Mutex::new(CacheState {
                keys: Vec::new(),
                fetched: None,
            }),
        }
    }

    /// Keys that may verify a token with `kid` (all keys when the token has none).
    pub async fn keys_for(&self, kid: Option<&str>) -> Result<Vec<Jwk>, String> {
        let mut state = self.state.lock().await;
        let matching = |keys: &[Jwk]| -> Vec<Jwk> {
            keys.iter()
                .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
                .cloned()
                .collect()
        };
        let stale = state.fetched.is_none_or(|t| t.elapsed() > MAX_AGE);
        let found = matching(&state.keys);
        let may_refetch = state
            .fetched
            .is_none_or(|t| t.elapsed() >= self.min_refetch);
        if stale || (found.is_empty() && may_refetch) {
            match self.source.fetch().await.and_then(|doc| parse_jwks(&doc)) {
                Ok(keys) => {
                    state.keys = keys;
                    state.fetched = Some(Instant::now());
                }
                Err(e) => {
                    // Keep serving the keys we have; record the attempt for the rate limit.
                    tracing::warn!(error = %e, "jwks fetch failed");
                    if state.fetched.is_none() {
                        return Err(e);
                    }
                    state.fetched = Some(Instant::now());
                }
            }
            return Ok(matching(&state.keys));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms() {
        assert_eq!(Alg::parse("ES256"), Ok(Alg::Es256));
        assert!(Alg::parse("none").unwrap_err().contains("never"));
        assert!(Alg::parse("HS256").unwrap_err().contains("HMAC"));
        assert!(Alg::parse("XX1").is_err());
    }

    #[test]
    fn skips_unusable_keys_and_verifies_es256() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let kp = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        use ring::signature::KeyPair;
        let pt = kp.public_key().as_ref();
        let doc = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "k1", "x": URL_SAFE_NO_PAD.encode(&pt[1..33]), "y": URL_SAFE_NO_PAD.encode(&pt[33..])},
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "oct", "k": "c2VjcmV0"},
            "garbage"
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        let sig = kp.sign(&rng, b"msg").unwrap();
        assert!(keys[0].verify(Alg::Es256, b"msg", sig.as_ref()));
        assert!(!keys[0].verify(Alg::Es256, b"other", sig.as_ref()));
        assert!(
            !keys[0].verify(Alg::Rs256, b"msg", sig.as_ref()),
            "key type must fit alg"
        );
    }
}
