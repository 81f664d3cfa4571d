//! The request flow of every mint: attest → map identity → clamp TTL → mint → audit.
//!
//! Nothing is carried over between requests: each one is attested and mapped from its own
//! evidence. Every decision, allow or deny, produces exactly one audit event on the
//! `ephemera::audit` target; audit events never contain tokens, keys or CSR bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::attest::{AttestError, AttestedIdentity, Attestors, Evidence};
use crate::ca::crl::{RevokedEntry, RevokedSet};
use crate::ca::jwt::JwtSvidClaims;
use crate::ca::x509::{SubjectKey, X509Svid, parse_csr};
use crate::ca::{Ca, MintError};
use crate::clock::{Clock, unix_secs};
use crate::config::{TaskSettings, TtlLimits};
use crate::id::{Audience, IdError, SpiffeId, TrustDomain, Ttl};
use crate::lease::RevocationBus;
use crate::policy::cedar::{Action, Decision, Principal, RequestContext, Resource, TaskContext};
use crate::policy::{Mapper, MappingError, PolicyEngine, PolicyError};
use crate::secret::Secret;
use crate::store::{
    Lease, LeaseKind, LeaseStatus, ListFilter, NewJoinToken, Revocation, Store, StoreError, Task,
    TaskState,
};

/// Why a request was refused.
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
}

/// A request for an X.509-SVID.
#[derive(Debug, Default)]
pub struct X509Request {
    /// A CSR (PEM or DER); `None` to have the broker generate the key.
    pub csr: Option<Vec<u8>>,
    /// Requested lifetime; `None` for the default.
    pub ttl: Option<Ttl>,
    /// Which of the caller's identities to use; `None` for the first.
    pub spiffe_id: Option<SpiffeId>,
    /// The task the credential belongs to; `None` for a standalone lease.
    pub task_id: Option<String>,
}

/// A request for a JWT-SVID.
#[derive(Debug)]
pub struct JwtRequest {
    /// Audiences, 1 to 16.
    pub audiences: Vec<Audience>,
    /// Requested lifetime; `None` for the default.
    pub ttl: Option<Ttl>,
    /// Which of the caller's identities to use; `None` for the first.
    pub spiffe_id: Option<SpiffeId>,
    /// The task the token belongs to; `None` for a standalone lease.
    pub task_id: Option<String>,
}

/// A request to begin a task.
#[derive(Debug, Default)]
pub struct BeginTaskRequest {
    /// Longest the task may live; `None` for the default.
    pub max_duration: Option<Duration>,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Which of the caller's identities owns the task; `None` for the first.
    pub spiffe_id: Option<SpiffeId>,
}

/// A minted X.509-SVID with its trust bundle.
#[derive(Debug)]
pub struct MintedX509 {
    /// The identity in the certificate.
    pub spiffe_id: SpiffeId,
    /// The certificate chain and, if generated, the key.
    pub svid: X509Svid,
    /// DER trust anchors.
    pub bundle: Vec<Vec<u8>>,
    /// The lease recording it.
    pub lease_id: String,
}

/// A minted JWT-SVID.
#[derive(Debug)]
pub struct MintedJwt {
    /// The identity in `sub`.
    pub spiffe_id: SpiffeId,
    /// The compact JWS.
    pub token: Secret<String>,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `jti`.
    pub jti: String,
}

/// Lifetime limits per credential kind, and task timing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// X.509-SVID lifetimes.
    pub x509: TtlLimits,
    /// JWT-SVID lifetimes.
    pub jwt: TtlLimits,
    /// Task timing.
    pub tasks: TaskSettings,
}

/// Who is calling, proven on this request, and the task it names.
struct Caller {
    identity: AttestedIdentity,
    spiffe_id: SpiffeId,
    task: Option<Arc<Task>>,
}

/// The one thread CRLs are built on. A large CRL's buffers (megabytes, several per build) are
/// then allocated and freed by one thread and reused from its malloc arena; built on whichever
/// blocking-pool thread was free, each of them kept its own arena's worth, and a busy broker's
/// RSS grew by tens of MiB per thread.
struct CrlThread {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl CrlThread {
    fn start() -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let spawned = std::thread::Builder::new()
            .name("ephemera-crl".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if let Err(e) = spawned {
            // `run` then answers `None`, and the rebuild fails with a clear error.
            tracing::error!(error = %e, "cannot start the CRL thread");
        }
        Self { jobs }
    }

    /// Runs `job` on the thread; `None` if the thread is gone.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(job());
            }))
            .ok()?;
        rx.await.ok()
    }
}

/// What a CRL rebuild starts from.
#[derive(Debug, Clone, Copy)]
pub enum CrlSource<'a> {
    /// Everything revoked, read from the store (at start, periodically, and after missed
    /// events).
    Store,
    /// The list kept since the last rebuild, plus the credentials of these revocations.
    Events(&'a [Revocation]),
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
    pub ca: Arc<Ca>,
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
}

/// The broker core.
pub struct Broker {
    trust_domain: TrustDomain,
    attestors: Attestors,
    mapper: std::sync::RwLock<Arc<Mapper>>,
    policy: Arc<PolicyEngine>,
    ca: Arc<Ca>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    limits: Limits,
    bus: RevocationBus,
    quotas: crate::quota::Quotas,
    crl: std::sync::RwLock<bytes::Bytes>,
    crl_number: std::sync::atomic::AtomicU64,
    /// What the CRL lists, kept between rebuilds; the mutex also makes rebuilds one at a time.
    crl_revoked: Arc<tokio::sync::Mutex<RevokedSet>>,
    crl_thread: CrlThread,
    expansions: crate::lease::Expansions,
    closing: tokio::sync::watch::Sender<bool>,
    crl_updates: tokio::sync::watch::Sender<u64>,
}

/// What introspection says of a token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Introspection {
    /// Honoured now.
    pub active: bool,
    /// Claims of an active token (empty otherwise).
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// The token's task, if any.
    pub task_id: Option<String>,
}

/// Longest token accepted for introspection.
pub const MAX_INTROSPECT_TOKEN: usize = 16 * 1024;
/// How long a CRL is valid before relying parties must refetch it.
pub const CRL_VALIDITY: Duration = Duration::from_secs(900);

/// One audit event, filled in as the request goes through the flow.
struct Audit {
    decision_id: Uuid,
    action: &'static str,
    source: Option<SocketAddr>,
    resource: String,
    requested_ttl_secs: Option<u64>,
    attestor: &'static str,
    subject: Option<String>,
    spiffe_id: Option<String>,
    granted_ttl_secs: Option<u64>,
    policies: Vec<String>,
    task_id: Option<String>,
    lease_id: Option<String>,
}

impl Audit {
    fn new(
        action: &'static str,
        evidence: &Evidence,
        resource: String,
        requested_ttl_secs: Option<u64>,
    ) -> Self {
        Self {
            decision_id: Uuid::now_v7(),
            action,
            source: evidence.source,
            resource,
            requested_ttl_secs,
            attestor: "-",
            subject: None,
            spiffe_id: None,
            granted_ttl_secs: None,
            policies: Vec::new(),
            task_id: None,
            lease_id: None,
        }
    }

    fn attested(&mut self, identity: &AttestedIdentity) {
        self.attestor = identity.attestor;
        self.subject = Some(identity.subject.clone());
    }

    fn identified(&mut self, spiffe_id: &SpiffeId) {
        self.spiffe_id = Some(spiffe_id.to_string());
    }

    fn emit<T>(self, result: &Result<T, BrokerError>) {
        let decision = if result.is_ok() { "allow" } else { "deny" };
        ::metrics::counter!(crate::telemetry::DECISIONS, "action" => self.action, "decision" => decision)
            .increment(1);
        let attestor = self.attestor;
        let subject = self.subject.as_deref().unwrap_or("-");
        let source = self.source.map(|s| s.to_string());
        let policies = self.policies.join(",");
        match result {
            Ok(_) => tracing::info!(
                target: "ephemera::audit",
                decision_id = %self.decision_id,
                action = self.action,
                decision = "allow",
                attestor,
                subject,
                spiffe_id = self.spiffe_id.as_deref(),
                resource = %self.resource,
                requested_ttl_secs = self.requested_ttl_secs,
                granted_ttl_secs = self.granted_ttl_secs,
                policies = %policies,
                task_id = self.task_id.as_deref(),
                lease_id = self.lease_id.as_deref(),
                source = source.as_deref(),
                "decision"
            ),
            Err(e) => tracing::info!(
                target: "ephemera::audit",
                decision_id = %self.decision_id,
                action = self.action,
                decision = "deny",
                reason = %e,
                attestor,
                subject,
                spiffe_id = self.spiffe_id.as_deref(),
                resource = %self.resource,
                requested_ttl_secs = self.requested_ttl_secs,
                task_id = self.task_id.as_deref(),
                source = source.as_deref(),
                "decision"
            ),
        }
    }
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
        } = parts;
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
            crl: std::sync::RwLock::new(bytes::Bytes::new()),
            crl_number: std::sync::atomic::AtomicU64::new(0),
            crl_revoked: Arc::default(),
            crl_thread: CrlThread::start(),
            expansions: crate::lease::Expansions::default(),
            closing: tokio::sync::watch::channel(false).0,
            crl_updates: tokio::sync::watch::channel(0).0,
        }
    }

    /// Notified every time the CRL is rebuilt.
    pub fn crl_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.crl_updates.subscribe()
    }

    /// Tells long-lived streams (keep-alive, watch) to end: the broker is shutting down.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves when [`Broker::close`] is called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// The current CRL (DER); empty until first built.
    pub fn crl(&self) -> bytes::Bytes {
        self.crl
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Rebuilds the CRL: every serial no longer honoured and not yet expired. From
    /// [`CrlSource::Store`], the list is read afresh; from [`CrlSource::Events`], only the
    /// credentials of those revocations are read and added to the list kept since the last
    /// rebuild. Returns how many serials it lists.
    pub async fn rebuild_crl(&self, source: CrlSource<'_>) -> Result<usize, BrokerError> {
        let mut revoked = Arc::clone(&self.crl_revoked).lock_owned().await;
        let now = self.clock.now();
        let now_unix = unix_secs(now);
        match source {
            CrlSource::Store => {
                let mut fresh = RevokedSet::default();
                for r in self.store.revoked_serials(now_unix).await? {
                    fresh.insert_hex(
                        &r.serial,
                        RevokedEntry {
                            revoked_at: r.revoked_at,
                            expires_at: r.expires_at,
                        },
                    )?;
                }
                *revoked = fresh;
            }
            CrlSource::Events(events) => {
                for event in events {
                    for lease in self.revoked_leases(event).await?.iter() {
                        let Some(serial) = lease.serial.as_deref() else {
                            continue;
                        };
                        revoked.insert_hex(
                            serial,
                            RevokedEntry {
                                revoked_at: lease.revoked_at.unwrap_or(event.at),
                                expires_at: lease.expires_at,
                            },
                        )?;
                    }
                }
            }
        }
        // Strictly increasing CRL numbers, also across restarts: milliseconds of the build,
        // bumped past the previous number when builds come faster than that.
        let stamp = u64::try_from(unix_secs(now)).unwrap_or(0) * 1000;
        let previous = self
            .crl_number
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| Some(stamp.max(n + 1)),
            )
            .unwrap_or(0);
        let number = stamp.max(previous + 1);
        // Encoding and signing a CRL of many serials is CPU-bound work: off the async workers,
        // so requests and streams are not held up behind it.
        let ca = self.ca.clone();
        let (der, listed) = self
            .crl_thread
            .run(move || {
                revoked.drop_expired(now_unix);
                let der = ca.x509.crl(&revoked, number, now, now + CRL_VALIDITY)?;
                Ok::<_, MintError>((der, revoked.len()))
            })
            .await
            .ok_or_else(|| MintError::Signing("the CRL thread stopped".into()))??;
        *self
            .crl
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = bytes::Bytes::from(der);
        self.crl_updates.send_modify(|n| *n += 1);
        Ok(listed)
    }

    /// Whether a JWT-SVID is honoured now: signed by this broker, unexpired, and its lease and
    /// task active. Anything else (garbage, foreign, revoked, expired) is inactive.
    pub async fn introspect(&self, token: &str) -> Result<Introspection, BrokerError> {
        if token.len() > MAX_INTROSPECT_TOKEN {
            return Ok(Introspection::default());
        }
        let Some(claims) = self.ca.jwt.verify(token) else {
            return Ok(Introspection::default());
        };
        let now = self.clock.unix_now();
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        let Some(jti) = claims.get("jti").and_then(serde_json::Value::as_str) else {
            return Ok(Introspection::default());
        };
        match self.store.lease(jti).await? {
            Some(status) if exp > now && status.active(now) => Ok(Introspection {
                active: true,
                task_id: status.lease.task_id.clone(),
                claims,
            }),
            _ => Ok(Introspection::default()),
        }
    }

    /// The revocation bus.
    pub fn bus(&self) -> &RevocationBus {
        &self.bus
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
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Replaces the identity-mapping rules (validated by the caller); the next request uses them.
    pub fn set_mapper(&self, mapper: Mapper) {
        *self
            .mapper
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(mapper);
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

    /// Clamps a requested lifetime: min(requested or default, configured max, `cap`).
    fn grant(
        requested: Option<Ttl>,
        limits: TtlLimits,
        now: SystemTime,
        cap: Option<SystemTime>,
    ) -> Result<SystemTime, MintError> {
        let ttl = requested.unwrap_or(limits.default_ttl).min(limits.max_ttl);
        let mut not_after = now + ttl.duration();
        if let Some(cap) = cap {
            not_after = not_after.min(cap);
        }
        if not_after < now + Duration::from_secs(1) {
            return Err(MintError::CaExpired);
        }
        Ok(not_after)
    }

    /// Asks policy about `action` on each resource; all must be allowed.
    fn authorize(
        &self,
        evidence: &Evidence,
        caller: &Caller,
        action: Action,
        resources: &[Resource],
        requested_ttl_secs: u64,
        audit: &mut Audit,
    ) -> Result<(), BrokerError> {
        let now = self.clock.now();
        let identity = &caller.identity;
        let principal = Principal {
            spiffe_id: &caller.spiffe_id,
            attestor: identity.attestor,
            claims: &identity.claims,
        };
        let ctx = RequestContext {
            source_ip: evidence.source.map(|s| s.ip()),
            requested_ttl_secs,
            evidence_age_secs: identity
                .issued_at
                .and_then(|t| now.duration_since(t).ok())
                .map_or(0, |d| d.as_secs()),
            now,
            task: caller
                .task
                .as_ref()
                .map(|t| task_context(t, unix_secs(now))),
        };
        for resource in resources {
            let decision: Decision = self.policy.decide(&principal, action, resource, &ctx)?;
            for e in &decision.errors {
                tracing::warn!(action = action.name(), error = %e, "policy evaluation error");
            }
            if !decision.allowed {
                audit.policies = decision.policies.clone();
                return Err(PolicyError::Denied {
                    reason: decision.deny_reason(),
                }
                .into());
            }
            for p in decision.policies {
                if !audit.policies.contains(&p) {
                    audit.policies.push(p);
                }
            }
        }
        Ok(())
    }

    /// Consumes single-use evidence once the request has succeeded; losing a race to another
    /// use fails this request, and its credential is never returned.
    async fn consume_single_use(&self, identity: &AttestedIdentity) -> Result<(), BrokerError> {
        if let Some(hash) = identity.single_use
            && !self
                .store
                .consume_join_token(hash, self.clock.unix_now())
                .await?
        {
            return Err(AttestError::TokenInvalid("join token already used".into()).into());
        }
        Ok(())
    }

    /// Creates a join token (an admin action, audited). Returns the token, its id and expiry.
    pub async fn create_join_token(
        &self,
        admin: &str,
        name: &str,
        ttl: Ttl,
        claims: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(Secret<String>, String, i64), BrokerError> {
        let token = crate::attest::join_token::generate(&ring::rand::SystemRandom::new())?;
        let now = self.clock.unix_now();
        let id = Uuid::now_v7().to_string();
        let expires_at = now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let result = self
            .store
            .create_join_token(NewJoinToken {
                hash: crate::attest::join_token::hash(token.expose()),
                id: id.clone(),
                name: name.to_owned(),
                claims,
                created_at: now,
                expires_at,
            })
            .await;
        tracing::info!(
            target: "ephemera::audit",
            action = "CreateJoinToken",
            admin,
            token_id = %id,
            name,
            ttl_secs = ttl.as_secs(),
            decision = if result.is_ok() { "allow" } else { "error" },
            "admin action"
        );
        result?;
        Ok((token, id, expires_at))
    }

    /// Attests and maps the caller; with a task id, also requires the caller to be the task's
    /// owner (re-attested now) and the task to be active.
    async fn caller(
        &self,
        evidence: &Evidence,
        requested: Option<&SpiffeId>,
        task_id: Option<&str>,
        audit: &mut Audit,
    ) -> Result<Caller, BrokerError> {
        let identity = self.attestors.attest(evidence).await?;
        audit.attested(&identity);
        let task = match task_id {
            None => None,
            Some(id) => Some(self.active_task(id).await?),
        };
        let mapper = self
            .mapper
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let spiffe_id = match &task {
            None => mapper.select(&identity, requested)?,
            Some(t) => {
                audit.task_id = Some(t.id.clone());
                let owner: SpiffeId = t
                    .spiffe_id
                    .parse()
                    .map_err(|e: IdError| StoreError::Corrupt(e.to_string()))?;
                let mine = mapper.map(&identity)?;
                if !mine.contains(&owner) || requested.is_some_and(|r| *r != owner) {
                    return Err(BrokerError::NotTaskOwner {
                        task_id: t.id.clone(),
                    });
                }
                if t.state != TaskState::Active {
                    return Err(BrokerError::TaskNotActive {
                        task_id: t.id.clone(),
                        state: t.state.as_str(),
                    });
                }
                owner
            }
        };
        audit.identified(&spiffe_id);
        Ok(Caller {
            identity,
            spiffe_id,
            task,
        })
    }

    /// Takes one request from the caller's rate limit. Only requests that add load are counted
    /// (mints, `BeginTask`): ending a task or keeping it alive is never refused for rate.
    fn admit(&self, caller: &Caller) -> Result<(), BrokerError> {
        self.quotas
            .admit(caller.spiffe_id.as_str(), std::time::Instant::now())?;
        Ok(())
    }

    /// A task by id: from the bus's cache of active tasks, or else from the store.
    async fn active_task(&self, id: &str) -> Result<Arc<Task>, BrokerError> {
        match self.bus.active_task(id) {
            Ok(task) => Ok(task),
            Err(generation) => {
                let task = Arc::new(
                    self.store
                        .task(id)
                        .await?
                        .ok_or_else(|| BrokerError::TaskNotFound(id.to_owned()))?,
                );
                self.bus.remember_task(&task, generation);
                Ok(task)
            }
        }
    }

    /// Records the lease of a minted credential; the credential is returned only after this
    /// commits. A task that ended since the caller was checked refuses the lease, so no
    /// credential outlives the revocation event of its task.
    async fn record(&self, lease: Lease) -> Result<(), BrokerError> {
        match self.store.insert_lease(lease).await {
            Ok(()) => Ok(()),
            Err(StoreError::TaskNotActive(task_id)) => Err(BrokerError::TaskNotActive {
                task_id,
                state: TaskState::Ended.as_str(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks the task's lease quota before minting into it; returns what the task holds.
    async fn lease_quota(&self, caller: &Caller) -> Result<Option<(String, u64)>, BrokerError> {
        let Some(task) = caller.task.as_ref().filter(|_| self.quotas.limits_leases()) else {
            return Ok(None);
        };
        let held = match self.quotas.task_leases(&task.id) {
            Some(n) => n,
            None => self.store.count_task_leases(&task.id).await?,
        };
        self.quotas.check_leases(held)?;
        Ok(Some((task.id.clone(), held)))
    }

    /// Latest expiry for a credential of `caller`: the task's deadline, if any.
    fn task_cap(caller: &Caller) -> Option<SystemTime> {
        caller.task.as_ref().map(|t| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.deadline).unwrap_or(0))
        })
    }

    /// Attests the caller and mints an X.509-SVID.
    pub async fn mint_x509(
        &self,
        evidence: &Evidence,
        req: X509Request,
    ) -> Result<MintedX509, BrokerError> {
        let started = std::time::Instant::now();
        let mut audit = Audit::new(
            "MintX509Svid",
            evidence,
            "x509-svid".to_owned(),
            req.ttl.map(Ttl::as_secs),
        );
        let result = self.mint_x509_audited(evidence, req, &mut audit).await;
        audit.emit(&result);
        ::metrics::histogram!(crate::telemetry::MINT_SECONDS, "kind" => "x509")
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn mint_x509_audited(
        &self,
        evidence: &Evidence,
        req: X509Request,
        audit: &mut Audit,
    ) -> Result<MintedX509, BrokerError> {
        let caller = self
            .caller(
                evidence,
                req.spiffe_id.as_ref(),
                req.task_id.as_deref(),
                audit,
            )
            .await?;
        self.admit(&caller)?;
        self.authorize(
            evidence,
            &caller,
            Action::MintX509Svid,
            &[Resource::Target("x509-svid".to_owned())],
            req.ttl.unwrap_or(self.limits.x509.default_ttl).as_secs(),
            audit,
        )?;
        // The CSR is parsed (and its signature verified) only for callers already identified.
        let key = match &req.csr {
            Some(csr) => SubjectKey::Csr(parse_csr(csr)?),
            None => SubjectKey::Generate,
        };
        let minted = self.issue_x509(&caller, key, req.ttl, audit).await?;
        self.consume_single_use(&caller.identity).await?;
        Ok(minted)
    }

    /// Mints and records an X.509-SVID for an authorized caller.
    async fn issue_x509(
        &self,
        caller: &Caller,
        key: SubjectKey,
        ttl: Option<Ttl>,
        audit: &mut Audit,
    ) -> Result<MintedX509, BrokerError> {
        let now = self.clock.now();
        let cap = Self::task_cap(caller).map_or(self.ca.x509.ca_not_after(), |d| {
            d.min(self.ca.x509.ca_not_after())
        });
        let not_after = Self::grant(ttl, self.limits.x509, now, Some(cap))?;
        let quota = self.lease_quota(caller).await?;
        let svid = self.ca.x509.mint(&caller.spiffe_id, key, now, not_after)?;
        let lease_id = Uuid::now_v7().to_string();
        self.record(Lease {
            id: lease_id.clone(),
            task_id: caller.task.as_ref().map(|t| t.id.clone()),
            kind: LeaseKind::X509,
            serial: Some(svid.serial.to_string()),
            spiffe_id: caller.spiffe_id.to_string(),
            audience: Vec::new(),
            issued_at: unix_secs(now),
            expires_at: unix_secs(svid.not_after),
            revoked: false,
            revoked_at: None,
            reason: None,
        })
        .await?;
        if let Some((task_id, held)) = quota {
            self.quotas.set_task_leases(&task_id, held + 1);
        }
        audit.granted_ttl_secs = Some(granted_secs(now, svid.not_after));
        audit.lease_id = Some(lease_id.clone());
        ::metrics::counter!(crate::telemetry::ISSUED, "kind" => "x509").increment(1);
        Ok(MintedX509 {
            spiffe_id: caller.spiffe_id.clone(),
            svid,
            bundle: self.ca.x509.roots().to_vec(),
            lease_id,
        })
    }

    /// Attests the caller and mints a JWT-SVID.
    pub async fn mint_jwt(
        &self,
        evidence: &Evidence,
        req: JwtRequest,
    ) -> Result<MintedJwt, BrokerError> {
        let resource = req
            .audiences
            .iter()
            .map(Audience::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let started = std::time::Instant::now();
        let mut audit = Audit::new("MintJwtSvid", evidence, resource, req.ttl.map(Ttl::as_secs));
        let result = self.mint_jwt_audited(evidence, req, &mut audit).await;
        audit.emit(&result);
        ::metrics::histogram!(crate::telemetry::MINT_SECONDS, "kind" => "jwt")
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn mint_jwt_audited(
        &self,
        evidence: &Evidence,
        req: JwtRequest,
        audit: &mut Audit,
    ) -> Result<MintedJwt, BrokerError> {
        let caller = self
            .caller(
                evidence,
                req.spiffe_id.as_ref(),
                req.task_id.as_deref(),
                audit,
            )
            .await?;
        self.admit(&caller)?;
        let resources: Vec<Resource> = req
            .audiences
            .iter()
            .map(|a| Resource::Audience(a.to_string()))
            .collect();
        self.authorize(
            evidence,
            &caller,
            Action::MintJwtSvid,
            &resources,
            req.ttl.unwrap_or(self.limits.jwt.default_ttl).as_secs(),
            audit,
        )?;
        let minted = self
            .issue_jwt(&caller, &req.audiences, req.ttl, audit)
            .await?;
        self.consume_single_use(&caller.identity).await?;
        Ok(minted)
    }

    /// Signs and records a JWT-SVID for an authorized caller.
    async fn issue_jwt(
        &self,
        caller: &Caller,
        audiences: &[Audience],
        ttl: Option<Ttl>,
        audit: &mut Audit,
    ) -> Result<MintedJwt, BrokerError> {
        let now = self.clock.now();
        let not_after = Self::grant(ttl, self.limits.jwt, now, Self::task_cap(caller))?;
        let quota = self.lease_quota(caller).await?;
        let iat = unix_secs(now);
        let exp = unix_secs(not_after);
        let jti = Uuid::now_v7().to_string();
        let token = self.ca.jwt.sign(&JwtSvidClaims {
            sub: caller.spiffe_id.as_str(),
            aud: audiences,
            exp,
            iat,
            jti: &jti,
        })?;
        self.record(Lease {
            id: jti.clone(),
            task_id: caller.task.as_ref().map(|t| t.id.clone()),
            kind: LeaseKind::Jwt,
            serial: None,
            spiffe_id: caller.spiffe_id.to_string(),
            audience: audiences.iter().map(ToString::to_string).collect(),
            issued_at: iat,
            expires_at: exp,
            revoked: false,
            revoked_at: None,
            reason: None,
        })
        .await?;
        if let Some((task_id, held)) = quota {
            self.quotas.set_task_leases(&task_id, held + 1);
        }
        audit.granted_ttl_secs = Some(u64::try_from(exp - iat).unwrap_or(0));
        audit.lease_id = Some(jti.clone());
        ::metrics::counter!(crate::telemetry::ISSUED, "kind" => "jwt").increment(1);
        Ok(MintedJwt {
            spiffe_id: caller.spiffe_id.clone(),
            token: Secret::new(token),
            expires_at: exp,
            jti,
        })
    }
}

impl Broker {
    /// Attests the caller, authorizes `BeginTask`, and records a new task it owns.
    pub async fn begin_task(
        &self,
        evidence: &Evidence,
        req: BeginTaskRequest,
    ) -> Result<Task, BrokerError> {
        let settings = self.limits.tasks;
        let duration = req
            .max_duration
            .unwrap_or(settings.default_duration)
            .min(settings.max_duration);
        let mut audit = Audit::new(
            "BeginTask",
            evidence,
            "task".to_owned(),
            Some(duration.as_secs()),
        );
        let result = async {
            let caller = self
                .caller(evidence, req.spiffe_id.as_ref(), None, &mut audit)
                .await?;
            self.admit(&caller)?;
            self.authorize(
                evidence,
                &caller,
                Action::BeginTask,
                &[Resource::Target("task".to_owned())],
                duration.as_secs(),
                &mut audit,
            )?;
            let task = self
                .start_task(evidence, &caller, duration, req.labels)
                .await?;
            self.consume_single_use(&caller.identity).await?;
            audit.task_id = Some(task.id.clone());
            audit.granted_ttl_secs = Some(duration.as_secs());
            Ok(task)
        }
        .await;
        audit.emit(&result);
        result
    }

    /// Records a new active task owned by `caller`.
    async fn start_task(
        &self,
        evidence: &Evidence,
        caller: &Caller,
        duration: Duration,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<Task, BrokerError> {
        let settings = self.limits.tasks;
        if self.quotas.settings().max_active_tasks_per_identity > 0 {
            let active = self
                .store
                .count_active_tasks(caller.spiffe_id.as_str())
                .await?;
            self.quotas.check_tasks(active)?;
        }
        let now = self.clock.unix_now();
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let deadline = now + secs(duration);
        let task = Task {
            id: Uuid::now_v7().to_string(),
            spiffe_id: caller.spiffe_id.to_string(),
            attestor: caller.identity.attestor.to_owned(),
            claims: caller.identity.claims.clone(),
            labels,
            source_ip: evidence.source.map(|a| a.ip().to_string()),
            evidence_age_secs: caller
                .identity
                .issued_at
                .map_or(0, |t| now - unix_secs(t))
                .max(0),
            created_at: now,
            deadline,
            heartbeat_secs: secs(settings.heartbeat_interval),
            grace_secs: secs(settings.grace),
            due_at: deadline.min(now + secs(settings.heartbeat_interval) + secs(settings.grace)),
            state: TaskState::Active,
            ended_at: None,
            reason: None,
        };
        self.store.insert_task(task.clone()).await?;
        Ok(task)
    }

    /// Ends a task on its owner's request and revokes its credentials. Idempotent: ending an
    /// ended task reports the state it already had.
    pub async fn end_task(
        &self,
        evidence: &Evidence,
        task_id: &str,
    ) -> Result<(TaskState, bool), BrokerError> {
        let mut audit = Audit::new("EndTask", evidence, format!("task:{task_id}"), None);
        let result = async {
            match self.caller(evidence, None, Some(task_id), &mut audit).await {
                Ok(_) => {}
                Err(BrokerError::TaskNotActive { state, .. }) => {
                    return Ok((TaskState::parse(state).unwrap_or(TaskState::Ended), true));
                }
                Err(e) => return Err(e),
            }
            let ended = self
                .end(task_id, TaskState::Ended, "ended by its owner")
                .await?;
            Ok((TaskState::Ended, !ended))
        }
        .await;
        audit.emit(&result);
        result
    }

    /// Opens a keep-alive for a task: the caller must be its owner, re-attested now. Returns the
    /// task and the due time written (for [`Self::ping`]).
    pub async fn keep_alive_open(
        &self,
        evidence: &Evidence,
        task_id: &str,
    ) -> Result<(Task, i64), BrokerError> {
        let mut audit = Audit::new("KeepAlive", evidence, format!("task:{task_id}"), None);
        let result = self
            .caller(evidence, None, Some(task_id), &mut audit)
            .await
            .and_then(|c| {
                c.task
                    .map(Arc::unwrap_or_clone)
                    .ok_or_else(|| BrokerError::TaskNotFound(task_id.to_owned()))
            });
        if result.is_err() {
            audit.emit(&result);
        }
        let task = result?;
        let mut written = 0;
        // The first ping always writes, and the write finds whether the task is still active
        // (the task above may come from memory, a moment behind another replica's EndTask).
        if !self.ping(&task, &mut written).await? {
            return Err(BrokerError::TaskNotActive {
                task_id: task.id,
                state: TaskState::Ended.as_str(),
            });
        }
        Ok((task, written))
    }

    /// Records that a task is alive now. Writes are coarse, so that several replicas can share
    /// liveness through the store without a write per ping: a write stores a due time of
    /// heartbeat + 1.5 × grace from now, and pings are not written while the stored due time is
    /// still at least heartbeat + grace away. A task is therefore never ended earlier than
    /// heartbeat + grace after its last ping, and at most grace/2 later. `written_due` is the
    /// due time this caller last wrote (0 at first). Returns `false` when a write finds the
    /// task no longer active (between writes, ends reach callers through the bus).
    pub async fn ping(&self, task: &Task, written_due: &mut i64) -> Result<bool, BrokerError> {
        let now = self.clock.unix_now();
        let window = task.heartbeat_secs + task.grace_secs;
        if written_due.saturating_sub(now) >= window {
            return Ok(true);
        }
        let due = now + window + task.grace_secs / 2;
        let alive = self.store.keep_alive(&task.id, due).await?;
        *written_due = due.min(task.deadline);
        Ok(alive)
    }

    /// A task's keep-alive stream ended: it has one grace period to reconnect, after which the
    /// reaper ends it.
    pub async fn keep_alive_closed(&self, task: &Task) -> Result<(), BrokerError> {
        let due = self.clock.unix_now() + task.grace_secs;
        self.store.keep_alive(&task.id, due).await?;
        Ok(())
    }

    /// Ends an active task (one store write) and announces it. Returns whether it was active.
    async fn end(
        &self,
        task_id: &str,
        state: TaskState,
        reason: &str,
    ) -> Result<bool, BrokerError> {
        match self
            .store
            .end_task(task_id, state, reason, self.clock.unix_now())
            .await?
        {
            Some(r) => {
                tracing::info!(task_id, state = state.as_str(), reason, "task ended");
                crate::telemetry::revoked(reason);
                self.bus.publish(r);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn admin_audit(&self, admin: &str, action: &str, target: &str, outcome: &str) {
        tracing::info!(target: "ephemera::audit", action, admin, resource = target, decision = "allow", outcome, "admin action");
    }

    /// Admin: revokes a task and every credential of it. `false` if it was not active.
    pub async fn revoke_task(&self, admin: &str, task_id: &str) -> Result<bool, BrokerError> {
        if self.store.task(task_id).await?.is_none() {
            return Err(BrokerError::TaskNotFound(task_id.to_owned()));
        }
        let done = self
            .end(
                task_id,
                TaskState::Revoked,
                &format!("revoked by admin ({admin})"),
            )
            .await?;
        self.admin_audit(
            admin,
            "RevokeTask",
            task_id,
            if done { "revoked" } else { "already inactive" },
        );
        Ok(done)
    }

    /// Admin: revokes one lease (by id or serial). `false` if it was already revoked.
    pub async fn revoke_lease(&self, admin: &str, key: &str) -> Result<bool, BrokerError> {
        let key = &lease_key(key);
        let status = self
            .store
            .lease(key)
            .await?
            .ok_or_else(|| BrokerError::LeaseNotFound(key.to_owned()))?;
        let r = self
            .store
            .revoke_lease(
                &status.lease.id,
                &format!("revoked by admin ({admin})"),
                self.clock.unix_now(),
            )
            .await?;
        let done = r.is_some();
        if let Some(r) = r {
            crate::telemetry::revoked(&r.reason);
            self.bus.publish(r);
        }
        self.admin_audit(
            admin,
            "RevokeLease",
            &status.lease.id,
            if done { "revoked" } else { "already revoked" },
        );
        Ok(done)
    }

    /// Admin: revokes every active task of a SPIFFE ID. Returns the tasks revoked.
    pub async fn revoke_identity(
        &self,
        admin: &str,
        spiffe_id: &SpiffeId,
    ) -> Result<Vec<String>, BrokerError> {
        let mut revoked = Vec::new();
        loop {
            let page = self
                .store
                .list_tasks(
                    ListFilter {
                        spiffe_id: Some(spiffe_id.to_string()),
                        active: Some(true),
                        limit: 500,
                        ..ListFilter::default()
                    },
                    self.clock.unix_now(),
                )
                .await?;
            if page.is_empty() {
                break;
            }
            for t in page {
                if self
                    .end(
                        &t.id,
                        TaskState::Revoked,
                        &format!("identity revoked by admin ({admin})"),
                    )
                    .await?
                {
                    revoked.push(t.id);
                }
            }
        }
        self.admin_audit(
            admin,
            "RevokeIdentity",
            spiffe_id.as_str(),
            &format!("{} task(s) revoked", revoked.len()),
        );
        Ok(revoked)
    }

    /// Re-evaluates every active task against the current policy (after a reload): a task its
    /// owner could no longer begin is revoked. Returns the tasks revoked.
    pub async fn reevaluate_tasks(&self) -> Result<Vec<String>, BrokerError> {
        let mut revoked = Vec::new();
        let mut after = None;
        loop {
            let page = self.store.active_tasks(after.clone(), 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for t in page {
                let Ok(spiffe_id) = t.spiffe_id.parse::<SpiffeId>() else {
                    continue;
                };
                let now = self.clock.unix_now();
                let principal = Principal {
                    spiffe_id: &spiffe_id,
                    attestor: &t.attestor,
                    claims: &t.claims,
                };
                // Decided as the task was begun (same source, same evidence), at the current
                // time and with the lifetime it has left.
                let ctx = RequestContext {
                    source_ip: t.source_ip.as_deref().and_then(|ip| ip.parse().ok()),
                    requested_ttl_secs: u64::try_from(t.deadline - now).unwrap_or(0),
                    evidence_age_secs: u64::try_from(t.evidence_age_secs).unwrap_or(0),
                    now: self.clock.now(),
                    task: Some(task_context(&t, now)),
                };
                let allowed = match self.policy.decide(
                    &principal,
                    Action::BeginTask,
                    &Resource::Target("task".into()),
                    &ctx,
                ) {
                    Ok(d) => d.allowed,
                    Err(e) => {
                        tracing::warn!(task_id = %t.id, error = %e, "cannot re-evaluate task; revoking");
                        false
                    }
                };
                if !allowed
                    && self
                        .end(
                            &t.id,
                            TaskState::Revoked,
                            "policy no longer permits the task",
                        )
                        .await?
                {
                    tracing::info!(target: "ephemera::audit", action = "ReevaluateTask", task_id = %t.id, spiffe_id = %t.spiffe_id, decision = "deny", reason = "policy no longer permits the task", "decision");
                    revoked.push(t.id);
                }
            }
        }
        Ok(revoked)
    }

    /// Whether a lease is honoured now, with its record.
    pub async fn lease_status(&self, key: &str) -> Result<Option<LeaseStatus>, BrokerError> {
        Ok(self.store.lease(&lease_key(key)).await?)
    }

    /// The credentials `event` revoked, read once however many watchers (and the CRL) ask.
    pub async fn revoked_leases(&self, event: &Revocation) -> Result<Arc<Vec<Lease>>, BrokerError> {
        Ok(self
            .expansions
            .get(event, self.store.revoked_leases(event))
            .await?)
    }

    /// The newest revocation event's number (0 when there is none).
    pub async fn newest_revocation(&self) -> Result<i64, BrokerError> {
        Ok(self.store.newest_revocation().await?)
    }

    /// The revocation events after `cursor`.
    pub async fn revocations_after(
        &self,
        cursor: i64,
        limit: u32,
    ) -> Result<Vec<Revocation>, BrokerError> {
        Ok(self.store.revocations_after(cursor, limit).await?)
    }
}

/// One workload's `FetchX509SVID` stream: the identities it is entitled to, bound to one task
/// that ends when the stream does.
#[derive(Debug, Clone)]
pub struct WorkloadSession {
    /// The task every SVID of the stream belongs to.
    pub task: Arc<Task>,
    /// The workload's identities that policy permits an X.509-SVID, default first.
    pub spiffe_ids: Vec<SpiffeId>,
    identity: AttestedIdentity,
}

impl Broker {
    /// Attests a Workload API caller and returns its identities that policy permits `action`
    /// on every resource; none is `PermissionDenied`.
    async fn workload_callers(
        &self,
        evidence: &Evidence,
        action: Action,
        resources: &[Resource],
        requested_ttl_secs: u64,
        only: Option<&SpiffeId>,
    ) -> Result<Vec<Caller>, BrokerError> {
        let mut audit = Audit::new(action.name(), evidence, "workload-api".to_owned(), None);
        let result = async {
            let identity = self.attestors.attest(evidence).await?;
            audit.attested(&identity);
            let mapper = self
                .mapper
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let mut ids = mapper.map(&identity)?;
            if let Some(want) = only {
                ids.retain(|i| i == want);
                if ids.is_empty() {
                    return Err(MappingError::NotMapped {
                        requested: want.to_string(),
                    }
                    .into());
                }
            }
            let mut permitted = Vec::new();
            let mut last_denial = None;
            for spiffe_id in ids {
                let caller = Caller {
                    identity: identity.clone(),
                    spiffe_id,
                    task: None,
                };
                let mut probe = Audit::new(
                    action.name(),
                    evidence,
                    "workload-api".to_owned(),
                    Some(requested_ttl_secs),
                );
                match self.authorize(
                    evidence,
                    &caller,
                    action,
                    resources,
                    requested_ttl_secs,
                    &mut probe,
                ) {
                    Ok(()) => permitted.push(caller),
                    Err(e) => last_denial = Some(e),
                }
            }
            match (permitted.is_empty(), last_denial) {
                (true, Some(e)) => Err(e),
                _ => Ok(permitted),
            }
        }
        .await;
        if result.is_err() {
            audit.emit(&result);
        }
        result
    }

    /// Opens a `FetchX509SVID` session: attests the workload and begins the task its SVIDs
    /// belong to, owned by its default identity.
    pub async fn workload_open(&self, evidence: &Evidence) -> Result<WorkloadSession, BrokerError> {
        let x509 = [Resource::Target("x509-svid".to_owned())];
        let ttl = self.limits.x509.default_ttl.as_secs();
        let callers = self
            .workload_callers(evidence, Action::MintX509Svid, &x509, ttl, None)
            .await?;
        let Some(first) = callers.first() else {
            return Err(MappingError::NoMapping.into());
        };
        let duration = self.limits.tasks.max_duration;
        let mut audit = Audit::new(
            "BeginTask",
            evidence,
            "task".to_owned(),
            Some(duration.as_secs()),
        );
        audit.attested(&first.identity);
        audit.identified(&first.spiffe_id);
        let labels = [("source".to_owned(), "workload-api".to_owned())].into();
        let result = async {
            self.authorize(
                evidence,
                first,
                Action::BeginTask,
                &[Resource::Target("task".to_owned())],
                duration.as_secs(),
                &mut audit,
            )?;
            self.start_task(evidence, first, duration, labels).await
        }
        .await;
        if let Ok(t) = &result {
            audit.task_id = Some(t.id.clone());
        }
        audit.emit(&result);
        let task = result?;
        Ok(WorkloadSession {
            identity: first.identity.clone(),
            spiffe_ids: callers.into_iter().map(|c| c.spiffe_id).collect(),
            task: Arc::new(task),
        })
    }

    /// Mints a fresh X.509-SVID (broker-generated key) for every identity of a session.
    pub async fn workload_svids(
        &self,
        evidence: &Evidence,
        session: &WorkloadSession,
    ) -> Result<Vec<MintedX509>, BrokerError> {
        let mut out = Vec::with_capacity(session.spiffe_ids.len());
        for spiffe_id in &session.spiffe_ids {
            let caller = Caller {
                identity: session.identity.clone(),
                spiffe_id: spiffe_id.clone(),
                task: Some(session.task.clone()),
            };
            let mut audit = Audit::new("MintX509Svid", evidence, "x509-svid".to_owned(), None);
            audit.attested(&caller.identity);
            audit.identified(spiffe_id);
            audit.task_id = Some(session.task.id.clone());
            let result = self
                .issue_x509(&caller, SubjectKey::Generate, None, &mut audit)
                .await;
            audit.emit(&result);
            out.push(result?);
        }
        Ok(out)
    }

    /// A Workload API stream ended: its task ends and everything issued on it is revoked,
    /// through the same path as `EndTask`.
    pub async fn workload_close(&self, session: &WorkloadSession) -> Result<(), BrokerError> {
        self.end(&session.task.id, TaskState::Ended, "workload stream closed")
            .await
            .map(|_| ())
    }

    /// `FetchJWTSVID`: a JWT-SVID for every identity of the caller (or just `only`) that policy
    /// permits for all `audiences`.
    pub async fn workload_jwts(
        &self,
        evidence: &Evidence,
        audiences: &[Audience],
        only: Option<&SpiffeId>,
    ) -> Result<Vec<MintedJwt>, BrokerError> {
        let resources: Vec<Resource> = audiences
            .iter()
            .map(|a| Resource::Audience(a.to_string()))
            .collect();
        let ttl = self.limits.jwt.default_ttl.as_secs();
        let callers = self
            .workload_callers(evidence, Action::MintJwtSvid, &resources, ttl, only)
            .await?;
        let resource = audiences
            .iter()
            .map(Audience::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let mut out = Vec::with_capacity(callers.len());
        for caller in &callers {
            let mut audit = Audit::new("MintJwtSvid", evidence, resource.clone(), None);
            audit.attested(&caller.identity);
            audit.identified(&caller.spiffe_id);
            let result = self.issue_jwt(caller, audiences, None, &mut audit).await;
            audit.emit(&result);
            out.push(result?);
        }
        Ok(out)
    }

    /// Whether the caller has any identity at all (for the bundle streams).
    pub async fn workload_identified(&self, evidence: &Evidence) -> Result<(), BrokerError> {
        let identity = self.attestors.attest(evidence).await?;
        let mapper = self
            .mapper
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        mapper.map(&identity)?;
        Ok(())
    }

    /// `ValidateJWTSVID`: a JWT-SVID signed by this broker, unexpired, for `audience`, whose
    /// lease is honoured. Returns its SPIFFE ID and claims.
    pub async fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(String, serde_json::Map<String, serde_json::Value>), BrokerError> {
        let invalid = |reason: &str| BrokerError::BadRequest {
            field: "svid",
            reason: reason.to_owned(),
        };
        let i = self.introspect(token).await?;
        if !i.active {
            return Err(invalid("not a valid, live JWT-SVID of this trust domain"));
        }
        let aud_ok = match i.claims.get("aud") {
            Some(serde_json::Value::String(a)) => a == audience,
            Some(serde_json::Value::Array(list)) => {
                list.iter().any(|a| a.as_str() == Some(audience))
            }
            _ => false,
        };
        if !aud_ok {
            return Err(invalid("audience does not match"));
        }
        let sub = i
            .claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Ok((sub, i.claims))
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
        age_secs: u64::try_from(now - t.created_at).unwrap_or(0),
    }
}

fn granted_secs(now: SystemTime, not_after: SystemTime) -> u64 {
    u64::try_from(unix_secs(not_after) - unix_secs(now)).unwrap_or(0)
}
