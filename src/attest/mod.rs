//! Attestation: turning the evidence on one request into an [`AttestedIdentity`].
//!
//! Each attestor verifies one kind of evidence. An attestor that finds no evidence of its kind
//! on a request answers `Ok(None)` so the next one can try; one that finds evidence and rejects
//! it answers an error, and the request is refused. Attestors never log token contents.

pub mod join_token;
pub mod jwks;
pub mod oidc;
pub mod unix;
pub mod x509pop;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::secret::Secret;

/// Names of the attestors identity-mapping rules may refer to.
pub const ATTESTOR_NAMES: &[&str] = &[join_token::NAME, oidc::NAME, unix::NAME, x509pop::NAME];

/// A boxed future, so attestors can be stored as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The credentials of the process on the other end of a Unix socket, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Process id, when the kernel reports one.
    pub pid: Option<i32>,
}

/// Everything a request brings that could prove who sent it.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Peer credentials, for requests on the Unix socket.
    pub unix_peer: Option<UnixPeer>,
    /// Remote address, for requests over TCP.
    pub source: Option<SocketAddr>,
    /// A bearer token from the `authorization` metadata.
    pub bearer: Option<Secret<String>>,
    /// A join token from the `x-ephemera-join-token` metadata.
    pub join_token: Option<Secret<String>>,
    /// The client certificate chain of an mTLS connection, leaf first.
    pub client_chain: Option<std::sync::Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
}

/// Who the caller was proven to be.
#[derive(Debug, Clone, PartialEq)]
pub struct AttestedIdentity {
    /// Name of the attestor that verified the evidence.
    pub attestor: &'static str,
    /// A short subject for logs (e.g. `uid:1000`).
    pub subject: String,
    /// Attested claims, for identity mapping and policy.
    pub claims: Map<String, Value>,
    /// When the evidence was issued, if it says (for `evidence_age_secs` in policy).
    pub issued_at: Option<SystemTime>,
    /// When the evidence stops being valid, if it expires.
    pub expires_at: Option<SystemTime>,
    /// Single-use evidence (a join token hash) to consume when the request succeeds.
    pub single_use: Option<crate::store::TokenHash>,
}

/// Why evidence was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The request carried no evidence any configured attestor understands.
    #[error("no evidence: call over the broker's Unix socket or present a credential")]
    NoEvidence,
    /// The bearer token is larger than allowed.
    #[error("token is {size} bytes, over the limit of {max} bytes")]
    TokenTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The bearer token failed verification; the message says which check (never the token).
    #[error("{0}")]
    TokenInvalid(String),
    /// The client certificate does not verify against the configured CAs.
    #[error("{0}")]
    CertificateInvalid(String),
    /// The keys or records needed to verify evidence could not be read now.
    #[error("verification data unavailable: {0}")]
    KeysUnavailable(String),
    /// The peer process could not be inspected (it exited, or `/proc` refused).
    #[error("cannot inspect peer process {pid}: {reason}")]
    PeerUnreadable {
        /// The peer's pid.
        pid: i32,
        /// What failed.
        reason: String,
    },
}

/// Verifies one kind of evidence.
pub trait Attestor: Send + Sync {
    /// The attestor's name, as used in mapping rules and audit events.
    fn name(&self) -> &'static str;

    /// Attests `evidence`: `Ok(None)` when it holds nothing for this attestor.
    fn attest<'a>(
        &'a self,
        evidence: &'a Evidence,
    ) -> BoxFuture<'a, Result<Option<AttestedIdentity>, AttestError>>;
}

/// The configured attestors, tried in order.
pub struct Attestors(Vec<Box<dyn Attestor>>);

impl Attestors {
    /// Attestors tried in the given order.
    pub fn new(attestors: Vec<Box<dyn Attestor>>) -> Self {
        Self(attestors)
    }

    /// The first identity any attestor proves from `evidence`.
    pub async fn attest(&self, evidence: &Evidence) -> Result<AttestedIdentity, AttestError> {
        for attestor in &self.0 {
            if let Some(identity) = attestor.attest(evidence).await? {
                return Ok(identity);
            }
        }
        Err(AttestError::NoEvidence)
    }
}
