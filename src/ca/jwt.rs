//! JWT-SVID signing (SPIFFE JWT-SVID spec): compact JWS, ES256 on ring, key parsed once.
//!
//! The header is fixed (`alg`, `kid`, `typ: JWT`) and encoded once at start; each token costs one
//! claims serialization and one ECDSA signature. Never logs a token.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::Serialize;

use super::MintError;
use crate::id::Audience;

/// The public half of an EC P-256 key as JWK members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EcPublicJwk {
    /// Always `EC`.
    pub kty: &'static str,
    /// Curve name, `P-256` or `P-384`.
    pub crv: &'static str,
    /// Base64url X coordinate.
    pub x: String,
    /// Base64url Y coordinate.
    pub y: String,
}

impl EcPublicJwk {
    /// From an uncompressed SEC1 point (`0x04 || X || Y`).
    pub fn from_uncompressed(point: &[u8]) -> Option<Self> {
        let crv = match point.len() {
            65 => "P-256",
            97 => "P-384",
            _ => return None,
        };
        if point[0] != 0x04 {
            return None;
        }
        let n = (point.len() - 1) / 2;
        Some(Self {
            kty: "EC",
            crv,
            x: URL_SAFE_NO_PAD.encode(&point[1..=n]),
            y: URL_SAFE_NO_PAD.encode(&point[1 + n..]),
        })
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url): the `kid` of this key.
    pub fn thumbprint(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            self.crv, self.x, self.y
        );
        URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        ))
    }
}

/// The `aud` claim: a string for one audience, an array for several.
#[derive(Serialize)]
#[serde(untagged)]
enum Aud<'a> {
    One(&'a str),
    Many(Vec<&'a str>),
}

#[derive(Serialize)]
struct Claims<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    sub: &'a str,
    aud: Aud<'a>,
    exp: i64,
    iat: i64,
    jti: &'a str,
}

/// What goes into one JWT-SVID.
pub struct JwtSvidClaims<'a> {
    /// The SPIFFE ID (`sub`).
    pub sub: &'a str,
    /// Audiences (`aud`), at least one.
    pub aud: &'a [Audience],
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issue time, Unix seconds.
    pub iat: i64,
    /// Unique token id.
    pub jti: &'a str,
}

/// Verifies the tokens one of the broker's ES256 keys signed (published keys: prepared, active,
/// retired).
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    kid: String,
    jwk: EcPublicJwk,
    point: Vec<u8>,
    header_b64: String,
}

/// The base64url header of every token signed with the key `kid`.
fn header_b64(kid: &str) -> String {
    let header = serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    URL_SAFE_NO_PAD.encode(header.to_string())
}

impl JwtVerifier {
    /// From the key's uncompressed SEC1 point; `None` unless it is P-256.
    pub fn new(point: &[u8]) -> Option<Self> {
        let jwk = EcPublicJwk::from_uncompressed(point).filter(|j| j.crv == "P-256")?;
        let kid = jwk.thumbprint();
        Some(Self {
            header_b64: header_b64(&kid),
            kid,
            jwk,
            point: point.to_vec(),
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key.
    pub fn jwk(&self) -> &EcPublicJwk {
        &self.jwk
    }

    /// The public key as an uncompressed SEC1 point.
    pub fn point(&self) -> &[u8] {
        &self.point
    }

    /// Verifies a token this key signed: header (`ES256`, this `kid`) and signature. Returns
    /// its claims, or `None` for anything else. Expiry is the caller's to check.
    pub fn verify(&self, token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
        let mut parts = token.split('.');
        let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || h != self.header_b64 {
            return None;
        }
        let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
        let signed = &token[..h.len() + 1 + c.len()];
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            &self.point,
        )
        .verify(signed.as_bytes(), &sig)
        .ok()?;
        match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()? {
            serde_json::Value::Object(m) => Some(m),
            _ => None,
        }
    }
}

/// Signs JWT-SVIDs with the broker's ES256 key.
pub struct JwtSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    jwk: EcPublicJwk,
    header_b64: String,
    issuer: Option<String>,
}

impl JwtSigner {
    /// Parses the PKCS#8 key once; `issuer` becomes the `iss` claim.
    pub fn from_pkcs8(pkcs8: &[u8], issuer: Option<String>) -> Result<Self, MintError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|e| MintError::Signing(format!("jwt signing key rejected: {e}")))?;
        let jwk = EcPublicJwk::from_uncompressed(key.public_key().as_ref())
            .ok_or_else(|| MintError::Signing("jwt signing key is not P-256".into()))?;
        let kid = jwk.thumbprint();
        let header_b64 = header_b64(&kid);
        Ok(Self {
            key,
            rng,
            kid,
            jwk,
            header_b64,
            issuer,
        })
    }

    /// The key id in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key.
    pub fn jwk(&self) -> &EcPublicJwk {
        &self.jwk
    }

    /// The `iss` claim, if one is set.
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    /// What verifies this signer's tokens.
    pub fn verifier(&self) -> JwtVerifier {
        JwtVerifier::new(self.key.public_key().as_ref())
            .unwrap_or_else(|| unreachable!("a P-256 key pair has a P-256 public key"))
    }

    /// Signs one JWT-SVID.
    pub fn sign(&self, c: &JwtSvidClaims<'_>) -> Result<String, MintError> {
        let aud = match c.aud {
            [one] => Aud::One(one.as_str()),
            many => Aud::Many(many.iter().map(Audience::as_str).collect()),
        };
        let claims = Claims {
            iss: self.issuer.as_deref(),
            sub: c.sub,
            aud,
            exp: c.exp,
            iat: c.iat,
            jti: c.jti,
        };
        let payload = serde_json::to_vec(&claims).map_err(|e| MintError::Signing(e.to_string()))?;
        let mut token = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 100);
        token.push_str(&self.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let sig = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| MintError::Signing("ecdsa signing failed".into()))?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut token);
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    #[test]
    fn token_verifies_with_ring_and_has_spec_fields() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let signer = JwtSigner::from_pkcs8(pkcs8.as_ref(), Some("https://issuer".into())).unwrap();
        let aud: Vec<Audience> = vec!["a".parse().unwrap(), "b".parse().unwrap()];
        let token = signer
            .sign(&JwtSvidClaims {
                sub: "spiffe://example.org/x",
                aud: &aud,
                exp: 2000,
                iat: 1000,
                jti: "id-1",
            })
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], signer.kid());
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], serde_json::json!(["a", "b"]));
        assert_eq!(claims["iss"], "https://issuer");
        let public = UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_FIXED,
            signer.key.public_key().as_ref().to_vec(),
        );
        let signed = format!("{}.{}", parts[0], parts[1]);
        public
            .verify(
                signed.as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn thumbprint_matches_rfc7638_example_shape() {
        let jwk = EcPublicJwk::from_uncompressed(&[4u8; 65]).unwrap();
        assert_eq!(jwk.thumbprint().len(), 43);
        assert!(EcPublicJwk::from_uncompressed(&[4u8; 64]).is_none());
    }
}
