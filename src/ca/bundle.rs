//! Public trust documents: the SPIFFE trust bundle, the JWKS and the OIDC discovery document.
//!
//! These hold only public keys and certificates; they are rendered once when the CA is loaded.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::MintError;
use super::jwt::{EcPublicJwk, JwtSigner};

/// How often relying parties should refetch the bundle, in seconds.
pub const REFRESH_HINT_SECS: u64 = 300;

/// The EC public key of a DER certificate as JWK members.
pub fn certificate_jwk(der: &[u8]) -> Result<EcPublicJwk, MintError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| MintError::Signing(format!("bad CA certificate: {e}")))?;
    EcPublicJwk::from_uncompressed(&cert.public_key().subject_public_key.data)
        .ok_or_else(|| MintError::Signing("CA certificate key is not EC P-256/P-384".into()))
}

fn with_members(jwk: &EcPublicJwk, extra: Value) -> Value {
    let mut v = json!(jwk);
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), extra) {
        obj.extend(extra);
    }
    v
}

/// The SPIFFE bundle: a JWK Set with `x509-svid` authorities (with `x5c`) and `jwt-svid` keys.
pub fn spiffe_bundle(
    roots: &[Vec<u8>],
    jwt: &JwtSigner,
    sequence: u64,
) -> Result<Value, MintError> {
    let mut keys = Vec::new();
    for der in roots {
        keys.push(with_members(
            &certificate_jwk(der)?,
            json!({"use": "x509-svid", "x5c": [STANDARD.encode(der)]}),
        ));
    }
    keys.push(with_members(
        jwt.jwk(),
        json!({"use": "jwt-svid", "kid": jwt.kid()}),
    ));
    Ok(json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": REFRESH_HINT_SECS,
    }))
}

/// The JWKS for JWT verification by any JWT library.
pub fn jwks(jwt: &JwtSigner) -> Value {
    json!({"keys": [with_members(
        jwt.jwk(),
        json!({"use": "sig", "alg": "ES256", "kid": jwt.kid()}),
    )]})
}

/// The OIDC discovery document, so cloud OIDC federation can verify JWT-SVIDs.
pub fn openid_configuration(issuer: &str, jwks_uri: &str) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti"],
    })
}
