//! The certificate authority: keys, X.509-SVID and JWT-SVID minting, trust documents.
//!
//! Plain Rust: nothing here knows about gRPC or HTTP. Never logs key, CSR or token bytes.

pub mod bundle;
pub mod crl;
pub mod der;
pub mod jwt;
pub mod keys;
pub mod x509;

use std::path::Path;

use crate::id::TrustDomain;

pub use keys::CaError;

/// Why a credential could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// The CSR is larger than allowed.
    #[error("csr is {size} bytes, over the limit of {max} bytes")]
    CsrTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The CSR could not be parsed.
    #[error("csr is malformed: {0}")]
    CsrMalformed(String),
    /// The CSR's self-signature does not verify.
    #[error("csr signature does not verify")]
    CsrSignature,
    /// The CSR asks for a CA or certificate-signing certificate.
    #[error("csr requests a CA certificate; only leaf certificates are issued")]
    CsrRequestsCa,
    /// The CSR's key type or size is not accepted.
    #[error("csr key is not supported: {0}")]
    CsrUnsupportedKey(String),
    /// The signing CA has expired, or expires before the credential could be valid.
    #[error("the signing CA has expired")]
    CaExpired,
    /// Signing itself failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Everything the broker signs with, and the public documents derived from it.
pub struct Ca {
    /// X.509-SVID minting.
    pub x509: x509::X509Minter,
    /// JWT-SVID signing.
    pub jwt: jwt::JwtSigner,
    /// SPIFFE bundle JSON.
    pub bundle_json: String,
    /// JWKS JSON.
    pub jwks_json: String,
}

impl Ca {
    /// Loads the CA from `data_dir`. `public_url` is the broker's HTTP base URL: it names the
    /// CRL distribution point and, unless `jwt_issuer` is set, the JWT `iss`.
    pub fn load(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        public_url: &str,
        jwt_issuer: Option<String>,
    ) -> Result<Self, CaError> {
        let material = keys::load(data_dir, trust_domain)?;
        let invalid = |path: &str, e: MintError| CaError::Invalid {
            path: data_dir.join(path),
            reason: e.to_string(),
        };
        let jwt = jwt::JwtSigner::from_pkcs8(
            material.jwt_pkcs8.expose(),
            Some(jwt_issuer.unwrap_or_else(|| public_url.to_owned())),
        )
        .map_err(|e| invalid(keys::JWT_KEY, e))?;
        let x509 = x509::X509Minter::new(
            material.root_der,
            material.intermediate_der,
            material.intermediate_key,
            material.intermediate_not_after,
            Some(format!("{public_url}/crl")),
        )
        .map_err(|e| invalid(keys::INTERMEDIATE_CERT, e))?;
        let bundle_json = bundle::spiffe_bundle(x509.roots(), &jwt, 1)
            .map_err(|e| invalid(keys::ROOT_CERT, e))?
            .to_string();
        let jwks_json = bundle::jwks(&jwt).to_string();
        Ok(Self {
            x509,
            jwt,
            bundle_json,
            jwks_json,
        })
    }
}
