//! The certificate authority: keys, X.509-SVID and JWT-SVID minting, trust documents.
//!
//! Plain Rust: nothing here knows about gRPC or HTTP. Never logs key, CSR or token bytes.

pub mod bundle;
pub mod crl;
pub mod der;
pub mod jwt;
pub mod keys;
pub mod lifecycle;
pub mod x509;

pub use keys::CaError;
pub use lifecycle::CaSettings;

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
