//! The broker core: the request flow of every mint, tasks, revocation, Workload API sessions
//! and introspection. `api/` and `http.rs` translate their protocols into calls on [`Broker`];
//! nothing here knows gRPC or HTTP.
//!
//! Each job has its own file:
//! - [`caller`]: who is calling, proven on this request (attest, map, admit, authorize);
//! - [`audit`]: the one audit event per decision, emitted when the request's guard drops;
//! - [`mint`]: X.509-SVID and JWT-SVID requests: grant, issue, record, quotas;
//! - [`tasks`]: begin, end, keep-alive (and its stream loop), re-evaluation after a reload;
//! - [`admin`]: admin revocation and join tokens;
//! - [`workload`]: SPIFFE Workload API sessions and their streams' pacing;
//! - [`introspect`]: introspection, JWT-SVID validation and the revocation log;
//! - [`reload`]: the reloader worker (policies, mapping rules, re-evaluation);
//! - [`trust`]: stored principals, locks, and deciding every live credential again.
//!
//! Nothing is carried over between requests: each one is attested and mapped from its own
//! evidence. Every decision, allow or deny, produces exactly one audit event on the
//! `ephemera::audit` target; audit events never contain tokens, keys or CSR bytes.

pub mod admin;
mod audit;
pub mod behaviour;
mod caller;
pub mod introspect;
pub mod keys;
pub mod mint;
pub mod reload;
pub mod tasks;
pub mod trust;
pub mod workload;

use std::sync::Arc;
use std::time::Duration;

use crate::attest::{AttestError, Attestors, Evidence};
use crate::ca::MintError;
use crate::clock::{Clock, unix_secs};
use crate::id::{IdError, TrustDomain, Ttl};
use crate::lease::RevocationBus;
use crate::lease::crl::CrlPublisher;
use crate::lease::keys::KeyRing;
use crate::policy::cedar::TaskContext;
use crate::policy::{Mapper, MappingError, PolicyEngine, PolicyError};
use crate::shutdown::ShutdownSignal;
use crate::store::{Store, StoreError, Task};

pub use introspect::{Introspection, MAX_INTROSPECT_TOKEN};
pub use mint::{JwtRequest, MintedJwt, MintedX509, X509Request};
pub use tasks::{BeginTaskRequest, KeepAliveEnd, TaskSettings};
pub use workload::{WorkloadApiSettings, WorkloadSession};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A request field is invalid.
    #[error("invalid {field}: {source}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        source: IdError,
    },
    /// A request field is invalid (fields without an identifier rule).
    #[error("invalid {field}: {reason}")]
    BadRequest {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The caller could not be attested.
    #[error(transparent)]
    Attest(#[from] AttestError),
    /// The caller's identity could not be mapped to a SPIFFE ID.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// Policy denied the request.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The credential could not be minted.
    #[error(transparent)]
    Mint(#[from] MintError),
    /// The store could not record or answer.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No task has this id.
    #[error("unknown task {0}")]
    TaskNotFound(String),
    /// The caller is not the task's owner.
    #[error("task {task_id} belongs to another identity")]
    NotTaskOwner {
        /// The task.
        task_id: String,
    },
    /// The task is no longer active.
    #[error("task {task_id} has {state}")]
    TaskNotActive {
        /// The task.
        task_id: String,
        /// Its state ("ended", "expired", "revoked").
        state: &'static str,
    },
    /// A lease id or serial that is not known.
    #[error("unknown lease {0}")]
    LeaseNotFound(String),
    /// A quota was reached.
    #[error(transparent)]
    LimitExceeded(#[from] crate::quota::Exceeded),
    /// The task's deadline is less than a second away: nothing more can be granted in it.
    #[error("task {task_id} reaches its deadline in less than a second")]
    TaskEnding {
        /// The task.
        task_id: String,
    },
    /// A stream's identity was withdrawn (its task ended or was revoked).
    #[error("{0}")]
    Withdrawn(String),
    /// A request on a stream contradicts the stream (a keep-alive naming another task).
    #[error("{0}")]
    StreamMisuse(&'static str),
    /// The task a stream belongs to has ended.
    #[error("the task has ended: {reason}")]
    TaskEnded {
        /// Why (the revocation event's reason).
        reason: String,
    },
    /// A lock matches the caller: nothing is issued to it.
    #[error("locked: {reason}")]
    Locked {
        /// The lock.
        lock_id: String,
        /// Its reason.
        reason: String,
    },
    /// The broker is shutting down; long-lived streams end and callers reconnect.
    #[error("the broker is shutting down; {0}")]
    ShuttingDown(&'static str),
}

impl BrokerError {
    /// A stable code for the audit log and metrics: which rule refused the request.
    pub fn code(&self) -> &'static str {
        use crate::ca::MintError as M;
        match self {
            Self::InvalidArgument { .. } | Self::BadRequest { .. } => "invalid_argument",
            Self::Attest(AttestError::NoEvidence) => "attest.no_evidence",
            Self::Attest(AttestError::TokenTooLarge { .. }) => "token.too_large",
            Self::Attest(AttestError::Token(t)) => t.code(),
            Self::Attest(AttestError::CertificateInvalid(_)) => "attest.certificate",
            Self::Attest(AttestError::KeysUnavailable(_)) => "attest.keys_unavailable",
            Self::Attest(AttestError::PeerUnreadable { .. }) => "attest.peer_unreadable",
            Self::Mapping(MappingError::NoMapping { .. }) => "mapping.none",
            Self::Mapping(MappingError::NotMapped { .. }) => "mapping.not_mapped",
            Self::Mapping(MappingError::UnsafeClaimValue { .. }) => "mapping.unsafe_claim",
            Self::Policy(PolicyError::Denied { .. }) => "policy.denied",
            Self::Policy(PolicyError::Request(_)) => "policy.request",
            Self::Mint(M::CsrTooLarge { .. }) => "csr.too_large",
            Self::Mint(
                M::CsrMalformed(_) | M::CsrSignature | M::CsrRequestsCa | M::CsrUnsupportedKey(_),
            ) => "csr.invalid",
            Self::Mint(M::CaExpired) => "ca.expired",
            Self::Mint(M::Signing(_)) => "ca.signing",
            Self::Store(_) => "store.unavailable",
            Self::TaskNotFound(_) => "task.not_found",
            Self::NotTaskOwner { .. } => "task.not_owner",
            Self::TaskNotActive { .. } | Self::TaskEnded { .. } => "task.not_active",
            Self::TaskEnding { .. } => "task.ending",
            Self::LeaseNotFound(_) => "lease.not_found",
            Self::LimitExceeded(_) => "limit.exceeded",
            Self::StreamMisuse(_) => "stream.misuse",
            Self::Withdrawn(_) => "withdrawn",
            Self::Locked { .. } => "locked",
            Self::ShuttingDown(_) => "shutting_down",
        }
    }
}

impl Broker {
    /// Audits a request refused before it reached the core (a malformed field, a missing
    /// header): one denial event with its reason code, like any other decision.
    pub fn refused(&self, evidence: &Evidence, action: &'static str, err: &BrokerError) {
        let mut audit = audit::Audit::new(action, evidence, "-".to_owned(), None);
        audit.outcome(&Err::<(), _>(err));
    }
}

/// Lifetime limits per credential kind, and task timing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// X.509-SVID lifetimes.
    pub x509: mint::TtlLimits,
    /// JWT-SVID lifetimes.
    pub jwt: mint::TtlLimits,
    /// Task timing.
    pub tasks: TaskSettings,
}

/// Everything a broker is made of.
pub struct BrokerParts {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Attestors, tried in order.
    pub attestors: Attestors,
    /// Identity mapping.
    pub mapper: Mapper,
    /// Cedar policy.
    pub policy: Arc<PolicyEngine>,
    /// Keys and minting.
    pub ca: Arc<KeyRing>,
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Lifetime limits.
    pub limits: Limits,
    /// Where committed revocations are announced.
    pub bus: RevocationBus,
    /// Per-identity quotas.
    pub quotas: crate::quota::QuotaSettings,
    /// Ends long-lived streams (keep-alive, watch, Workload API) at shutdown.
    pub shutdown: ShutdownSignal,
}

/// The broker core: a thin handle over its parts, shared by every listener.
pub struct Broker {
    trust_domain: TrustDomain,
    attestors: Attestors,
    mapper: std::sync::RwLock<Arc<Mapper>>,
    policy: Arc<PolicyEngine>,
    ca: Arc<KeyRing>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    bus: RevocationBus,
    quotas: crate::quota::Quotas,
    crl: Arc<CrlPublisher>,
    expansions: Arc<crate::lease::Expansions>,
    behaviour: behaviour::Tracker,
    principals: trust::PrincipalCache,
    locks: trust::Locks,
    /// The last policy generation decided again, and what that did.
    redecided: tokio::sync::Mutex<Option<(u64, trust::Redecision)>>,
    shutdown: ShutdownSignal,
}

impl Broker {
    /// A broker over its parts.
    pub fn new(parts: BrokerParts) -> Self {
        let BrokerParts {
            trust_domain,
            attestors,
            mapper,
            policy,
            ca,
            store,
            clock,
            limits,
            bus,
            quotas,
            shutdown,
        } = parts;
        let expansions = Arc::new(crate::lease::Expansions::default());
        let crl = Arc::new(CrlPublisher::new(
            ca.clone(),
            store.clone(),
            clock.clone(),
            expansions.clone(),
        ));
        Self {
            trust_domain,
            attestors,
            mapper: std::sync::RwLock::new(Arc::new(mapper)),
            policy,
            ca,
            store,
            clock,
            limits,
            bus,
            quotas: crate::quota::Quotas::new(quotas),
            crl,
            expansions,
            behaviour: behaviour::Tracker::default(),
            principals: trust::PrincipalCache::default(),
            locks: trust::Locks::default(),
            redecided: tokio::sync::Mutex::new(None),
            shutdown,
        }
    }

    /// Resolves when the broker is shutting down: long-lived streams end.
    pub async fn closed(&self) {
        self.shutdown.clone().wait().await;
    }

    /// The CRL publisher: the current CRL, its updates, rebuilds.
    pub fn crl(&self) -> &Arc<CrlPublisher> {
        &self.crl
    }

    /// The revocation bus.
    pub fn bus(&self) -> &RevocationBus {
        &self.bus
    }

    /// Lifetime limits and task timing.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Task timing.
    pub fn task_settings(&self) -> TaskSettings {
        self.limits.tasks
    }

    /// The broker's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA.
    pub fn ca(&self) -> &KeyRing {
        &self.ca
    }

    /// Replaces the identity-mapping rules (validated by the caller); the next request uses them.
    pub fn set_mapper(&self, mapper: Mapper) {
        *self
            .mapper
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(mapper);
    }

    /// The identity-mapping rules in force now.
    fn mapper(&self) -> Arc<Mapper> {
        self.mapper
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The policy engine.
    pub fn policy(&self) -> &PolicyEngine {
        &self.policy
    }

    /// The broker's clock.
    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// Seconds until the intermediate CA can no longer cover the longest X.509-SVID lifetime:
    /// its notAfter, minus now, minus `x509_svid.max_ttl`. Below zero, new certificates are cut
    /// short to the intermediate's end; at its end, X.509 minting fails.
    /// A staged successor counts: coverage is up to the end of the latest intermediate that
    /// signs or will.
    pub fn intermediate_coverage_secs(&self) -> i64 {
        let keys = self.ca.keys();
        let end = keys
            .keys
            .iter()
            .filter(|k| {
                k.kind == crate::store::KeyKind::X509
                    && matches!(
                        k.state,
                        crate::store::KeyState::Active | crate::store::KeyState::Prepared
                    )
            })
            .map(|k| k.not_after)
            .max()
            .unwrap_or_else(|| unix_secs(keys.x509_not_after()));
        end - self.clock.unix_now() - secs(self.limits.x509.max_ttl.duration())
    }
}

/// Lease ids and serials as stored: lowercase, and serials without the colons tools print
/// (`77:C2:6A:...` and `77C26A...` both find serial `77c26a...`).
fn lease_key(key: &str) -> String {
    key.trim().replace(':', "").to_ascii_lowercase()
}

/// What policy sees of a task.
fn task_context(t: &Task, now: i64) -> TaskContext {
    TaskContext {
        id: t.id.clone(),
        labels: t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        scopes: t.scopes.clone(),
        age_secs: u64::try_from(now - t.created_at).unwrap_or(0),
    }
}

/// Whole seconds from `now` to `not_after`.
fn granted_secs(now: std::time::SystemTime, not_after: std::time::SystemTime) -> u64 {
    u64::try_from(unix_secs(not_after) - unix_secs(now)).unwrap_or(0)
}

/// Whole seconds of a duration as the store keeps them.
fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Parses a TTL field of a request.
pub fn parse_ttl(field: &'static str, secs: Option<u64>) -> Result<Option<Ttl>, BrokerError> {
    secs.map(Ttl::from_secs)
        .transpose()
        .map_err(|source| BrokerError::InvalidArgument { field, source })
}
