//! Attestation: turning the evidence on one request into an [`AttestedIdentity`].
//!
//! Each attestor verifies one kind of evidence. An attestor that finds no evidence of its kind
//! on a request answers `Ok(None)` so the next one can try; one that finds evidence and rejects
//! it answers an error, and the request is refused. Attestors never log token contents.

pub mod claims;
pub mod join_token;
pub mod jwks;
pub mod oidc;
pub mod unix;
pub mod x509pop;

/// The static name of a built-in attestor (`unix`, `oidc`, `x509pop`, `join_token`), for a
/// principal read back from the store.
pub fn static_name(name: &str) -> Option<&'static str> {
    [unix::NAME, oidc::NAME, x509pop::NAME, join_token::NAME]
        .into_iter()
        .find(|n| *n == name)
}

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
    /// The bearer token failed a check; the variant says which (never the token).
    #[error(transparent)]
    Token(#[from] TokenRejection),
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

/// Which check refused a bearer token (an OIDC/JWT token or a join token). Strings the token
/// chose (issuer, key id, algorithm) are bounded by [`shown`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// Not a compact JWS with JSON header and payload.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// A date claim is not an integer NumericDate.
    #[error("token is malformed: {0} is not a number")]
    NotANumber(&'static str),
    /// No `iss` claim.
    #[error("token has no iss claim")]
    MissingIssuer,
    /// The issuer is not configured.
    #[error("issuer {0:?} is not trusted")]
    UntrustedIssuer(String),
    /// The header names no algorithm.
    #[error("token is malformed: header has no alg")]
    MissingAlgorithm,
    /// The algorithm is not accepted for this issuer.
    #[error("algorithm {0:?} is not accepted for this issuer")]
    Algorithm(String),
    /// The key id is not among the issuer's keys.
    #[error("unknown key id {0:?}")]
    UnknownKeyId(String),
    /// No key id, and no key to try.
    #[error("token has no kid and the issuer has no keys")]
    NoKeys,
    /// The signature does not verify with the issuer's keys.
    #[error("signature does not verify")]
    Signature,
    /// No `exp` claim.
    #[error("token has no exp claim")]
    MissingExpiry,
    /// A date claim is a number, but not an integer NumericDate in range.
    #[error("token {0} is not a NumericDate in range (an integer from 0 to year 9999)")]
    DateOutOfRange(&'static str),
    /// `exp` further ahead than the issuer's `max_token_lifetime`.
    #[error("token expires more than {max_secs}s from now (the issuer's max_token_lifetime)")]
    ExpiryTooFar {
        /// The limit, seconds.
        max_secs: i64,
    },
    /// Two claims become the same name in policy (`a.b` and `a` → `b`).
    #[error("token has two claims named {0:?} once nested names are joined with dots")]
    ClaimCollision(String),
    /// Past `exp` (beyond the allowed skew).
    #[error("token has expired")]
    Expired,
    /// Before `nbf`.
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// `iat` in the future.
    #[error("token is issued in the future (iat)")]
    IssuedInFuture,
    /// No `iat` claim where a maximum age is configured.
    #[error("token has no iat claim")]
    MissingIssuedAt,
    /// Older than the issuer's `max_token_age`.
    #[error("token was issued {age}s ago, more than the maximum age of {max}s")]
    TooOld {
        /// Its age, seconds.
        age: i64,
        /// The limit, seconds.
        max: i64,
    },
    /// No accepted audience.
    #[error("token audience is not accepted")]
    Audience,
    /// A required claim is missing or has another value.
    #[error("required claim {0} does not have an accepted value")]
    RequiredClaim(String),
    /// Claims nested deeper than the limit.
    #[error("claims are nested deeper than {0}")]
    TooDeep(usize),
    /// More claims than the limit.
    #[error("token has {count} claims, more than the limit of {max}")]
    TooManyClaims {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A join token that was never issued.
    #[error("unknown join token")]
    UnknownJoinToken,
    /// A join token already used.
    #[error("join token already used")]
    JoinTokenUsed,
    /// A join token past its expiry.
    #[error("join token has expired")]
    JoinTokenExpired,
}

impl TokenRejection {
    /// A stable code for the audit log.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) | Self::NotANumber(_) | Self::MissingAlgorithm => "token.malformed",
            Self::MissingIssuer => "token.no_issuer",
            Self::UntrustedIssuer(_) => "token.issuer",
            Self::Algorithm(_) => "token.algorithm",
            Self::UnknownKeyId(_) | Self::NoKeys => "token.unknown_key",
            Self::Signature => "token.signature",
            Self::MissingExpiry => "token.no_expiry",
            Self::DateOutOfRange(_) => "token.date_range",
            Self::ExpiryTooFar { .. } => "token.expiry_too_far",
            Self::ClaimCollision(_) => "token.claim_collision",
            Self::Expired => "token.expired",
            Self::NotYetValid => "token.not_yet_valid",
            Self::IssuedInFuture => "token.issued_in_future",
            Self::MissingIssuedAt => "token.no_issued_at",
            Self::TooOld { .. } => "token.too_old",
            Self::Audience => "token.audience",
            Self::RequiredClaim(_) => "token.required_claim",
            Self::TooDeep(_) | Self::TooManyClaims { .. } => "token.too_many_claims",
            Self::UnknownJoinToken => "join_token.unknown",
            Self::JoinTokenUsed => "join_token.used",
            Self::JoinTokenExpired => "join_token.expired",
        }
    }
}

/// Longest caller-chosen string repeated in an error, in bytes.
pub const MAX_SHOWN: usize = 64;

/// A caller-chosen string as errors and logs repeat it: at most [`MAX_SHOWN`] bytes (cut at a
/// character boundary and marked), so a 16 KiB `kid` is not echoed whole. Errors show it with
/// `{:?}`, which escapes control characters and quotes.
pub fn shown(s: &str) -> String {
    if s.len() <= MAX_SHOWN {
        return s.to_owned();
    }
    let mut end = MAX_SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &s[..end], s.len())
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
