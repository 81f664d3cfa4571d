//! Public trust documents: the SPIFFE trust bundle, the JWKS and the OIDC discovery document.
//!
//! These hold only public keys and certificates; they are rendered once per key set.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::MintError;
use super::jwt::{EcPublicJwk, JwtVerifier};

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
    jwt_keys: &[JwtVerifier],
    sequence: u64,
    refresh_hint: u64,
) -> Result<Value, MintError> {
    let mut keys = Vec::new();
    for der in roots {
        keys.push(with_members(
            &certificate_jwk(der)?,
            json!({"use": "x509-svid", "x5c": [STANDARD.encode(der)]}),
        ));
    }
    for jwt in jwt_keys {
        keys.push(with_members(
            jwt.jwk(),
            json!({"use": "jwt-svid", "kid": jwt.kid()}),
        ));
    }
    Ok(json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint,
    }))
}

/// The JWKS for JWT verification by any JWT library: every published JWT key.
pub fn jwks(jwt_keys: &[JwtVerifier]) -> Value {
    let keys: Vec<Value> = jwt_keys
        .iter()
        .map(|jwt| {
            with_members(
                jwt.jwk(),
                json!({"use": "sig", "alg": "ES256", "kid": jwt.kid()}),
            )
        })
        .collect();
    json!({ "keys": keys })
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
