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
use crate::ca::jwt::JwtSvidClaims;
use crate::ca::x509::{SubjectKey, X509Svid, parse_csr};
use crate::ca::{Ca, MintError};
use crate::clock::{Clock, unix_secs};
use crate::config::TtlLimits;
use crate::id::{Audience, IdError, SpiffeId, TrustDomain, Ttl};
use crate::policy::cedar::{Action, Decision, Principal, RequestContext, Resource};
use crate::policy::{Mapper, MappingError, PolicyEngine, PolicyError};
use crate::secret::Secret;
use crate::store::{NewJoinToken, Store, StoreError};

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

/// Lifetime limits per credential kind.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// X.509-SVID lifetimes.
    pub x509: TtlLimits,
    /// JWT-SVID lifetimes.
    pub jwt: TtlLimits,
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
}

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
}

impl Audit {
    fn new(action: &'static str, evidence: &Evidence, resource: String, ttl: Option<Ttl>) -> Self {
        Self {
            decision_id: Uuid::now_v7(),
            action,
            source: evidence.source,
            resource,
            requested_ttl_secs: ttl.map(Ttl::as_secs),
            attestor: "-",
            subject: None,
            spiffe_id: None,
            granted_ttl_secs: None,
            policies: Vec::new(),
        }
    }

    fn identified(&mut self, identity: &AttestedIdentity, spiffe_id: &SpiffeId) {
        self.attestor = identity.attestor;
        self.subject = Some(identity.subject.clone());
        self.spiffe_id = Some(spiffe_id.to_string());
    }

    fn emit<T>(self, result: &Result<T, BrokerError>) {
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
        }
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
        (identity, spiffe_id): (&AttestedIdentity, &SpiffeId),
        action: Action,
        resources: &[Resource],
        requested_ttl: Ttl,
        audit: &mut Audit,
    ) -> Result<(), BrokerError> {
        let now = self.clock.now();
        let principal = Principal {
            spiffe_id,
            attestor: identity.attestor,
            claims: &identity.claims,
        };
        let ctx = RequestContext {
            source_ip: evidence.source.map(|s| s.ip()),
            requested_ttl_secs: requested_ttl.as_secs(),
            evidence_age_secs: identity
                .issued_at
                .and_then(|t| now.duration_since(t).ok())
                .map_or(0, |d| d.as_secs()),
            now,
            task: None,
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

    async fn identify(
        &self,
        evidence: &Evidence,
        requested: Option<&SpiffeId>,
    ) -> Result<(AttestedIdentity, SpiffeId), BrokerError> {
        let identity = self.attestors.attest(evidence).await?;
        let mapper = self
            .mapper
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let spiffe_id = mapper.select(&identity, requested)?;
        Ok((identity, spiffe_id))
    }

    /// Attests the caller and mints an X.509-SVID.
    pub async fn mint_x509(
        &self,
        evidence: &Evidence,
        req: X509Request,
    ) -> Result<MintedX509, BrokerError> {
        let mut audit = Audit::new("MintX509Svid", evidence, "x509-svid".to_owned(), req.ttl);
        let result = self.mint_x509_audited(evidence, req, &mut audit).await;
        audit.emit(&result);
        result
    }

    async fn mint_x509_audited(
        &self,
        evidence: &Evidence,
        req: X509Request,
        audit: &mut Audit,
    ) -> Result<MintedX509, BrokerError> {
        let (identity, spiffe_id) = self.identify(evidence, req.spiffe_id.as_ref()).await?;
        audit.identified(&identity, &spiffe_id);
        self.authorize(
            evidence,
            (&identity, &spiffe_id),
            Action::MintX509Svid,
            &[Resource::Target("x509-svid".to_owned())],
            req.ttl.unwrap_or(self.limits.x509.default_ttl),
            audit,
        )?;
        // The CSR is parsed (and its signature verified) only for callers already identified.
        let key = match &req.csr {
            Some(csr) => SubjectKey::Csr(parse_csr(csr)?),
            None => SubjectKey::Generate,
        };
        let now = self.clock.now();
        let not_after = Self::grant(
            req.ttl,
            self.limits.x509,
            now,
            Some(self.ca.x509.ca_not_after()),
        )?;
        let svid = self.ca.x509.mint(&spiffe_id, key, now, not_after)?;
        self.consume_single_use(&identity).await?;
        audit.granted_ttl_secs = Some(granted_secs(now, svid.not_after));
        tracing::debug!(spiffe_id = %spiffe_id, serial = %svid.serial, "minted x509 svid");
        Ok(MintedX509 {
            spiffe_id,
            svid,
            bundle: self.ca.x509.roots().to_vec(),
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
        let mut audit = Audit::new("MintJwtSvid", evidence, resource, req.ttl);
        let result = self.mint_jwt_audited(evidence, req, &mut audit).await;
        audit.emit(&result);
        result
    }

    async fn mint_jwt_audited(
        &self,
        evidence: &Evidence,
        req: JwtRequest,
        audit: &mut Audit,
    ) -> Result<MintedJwt, BrokerError> {
        let (identity, spiffe_id) = self.identify(evidence, req.spiffe_id.as_ref()).await?;
        audit.identified(&identity, &spiffe_id);
        let resources: Vec<Resource> = req
            .audiences
            .iter()
            .map(|a| Resource::Audience(a.to_string()))
            .collect();
        self.authorize(
            evidence,
            (&identity, &spiffe_id),
            Action::MintJwtSvid,
            &resources,
            req.ttl.unwrap_or(self.limits.jwt.default_ttl),
            audit,
        )?;
        let now = self.clock.now();
        let not_after = Self::grant(req.ttl, self.limits.jwt, now, None)?;
        let iat = unix_secs(now);
        let exp = unix_secs(not_after);
        let jti = Uuid::now_v7().to_string();
        let token = self.ca.jwt.sign(&JwtSvidClaims {
            sub: spiffe_id.as_str(),
            aud: &req.audiences,
            exp,
            iat,
            jti: &jti,
        })?;
        self.consume_single_use(&identity).await?;
        audit.granted_ttl_secs = Some(u64::try_from(exp - iat).unwrap_or(0));
        tracing::debug!(spiffe_id = %spiffe_id, jti = %jti, "minted jwt svid");
        Ok(MintedJwt {
            spiffe_id,
            token: Secret::new(token),
            expires_at: exp,
            jti,
        })
    }
}

fn granted_secs(now: SystemTime, not_after: SystemTime) -> u64 {
    u64::try_from(unix_secs(not_after) - unix_secs(now)).unwrap_or(0)
}
