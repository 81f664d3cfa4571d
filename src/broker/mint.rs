//! Minting: X.509-SVID and JWT-SVID requests, the lifetime granted, the credential issued, its
//! lease recorded (the credential is returned only after that commits) and the quotas kept.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::caller::{Call, Caller};
use super::{Broker, BrokerError, granted_secs};
use crate::attest::Evidence;
use crate::ca::MintError;
use crate::ca::jwt::JwtSvidClaims;
use crate::ca::x509::{SubjectKey, X509Svid, parse_csr};
use crate::clock::unix_secs;
use crate::id::{Audience, SpiffeId, Ttl};
use crate::policy::cedar::{Action, Resource};
use crate::secret::Secret;
use crate::store::{Lease, LeaseKind, StoreError, TaskState};

/// Default and maximum lifetime of one credential kind.
#[derive(Debug, Clone, Copy)]
pub struct TtlLimits {
    /// Lifetime when the caller asks for none.
    pub default_ttl: Ttl,
    /// Longest lifetime granted; longer requests are clamped to it.
    pub max_ttl: Ttl,
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

/// Clamps a requested lifetime: min(requested or default, configured max, the task's deadline,
/// `key_not_after`). Less than a second left is refused: a task about to end is
/// [`BrokerError::TaskEnding`], a signing key about to expire [`MintError::CaExpired`].
fn grant(
    requested: Option<Ttl>,
    limits: TtlLimits,
    now: SystemTime,
    caller: &Caller,
    key_not_after: Option<SystemTime>,
) -> Result<SystemTime, BrokerError> {
    let ttl = requested.unwrap_or(limits.default_ttl).min(limits.max_ttl);
    let floor = now + Duration::from_secs(1);
    let mut not_after = now + ttl.duration();
    if let Some(task) = &caller.task {
        let deadline =
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(task.deadline).unwrap_or(0));
        if deadline < floor {
            return Err(BrokerError::TaskEnding {
                task_id: task.id.clone(),
            });
        }
        not_after = not_after.min(deadline);
    }
    if let Some(key) = key_not_after {
        if key < floor {
            return Err(MintError::CaExpired.into());
        }
        not_after = not_after.min(key);
    }
    Ok(not_after)
}

impl Broker {
    /// Attests the caller and mints an X.509-SVID.
    pub async fn mint_x509(
        &self,
        evidence: &Evidence,
        req: X509Request,
    ) -> Result<MintedX509, BrokerError> {
        let started = std::time::Instant::now();
        let mut call = Call::new(
            self,
            evidence,
            "MintX509Svid",
            "x509-svid".to_owned(),
            req.ttl.map(Ttl::as_secs),
        );
        let result = async {
            let caller = call
                .authorized(
                    req.spiffe_id.as_ref(),
                    req.task_id.as_deref(),
                    Action::MintX509Svid,
                    &[Resource::Target("x509-svid".to_owned())],
                    req.ttl.unwrap_or(self.limits.x509.default_ttl).as_secs(),
                )
                .await?;
            // The CSR is parsed (and its signature verified) only for callers already
            // identified.
            let key = match &req.csr {
                Some(csr) => SubjectKey::Csr(parse_csr(csr)?),
                None => SubjectKey::Generate,
            };
            let minted = call.issue_x509(&caller, key, req.ttl).await?;
            self.consume_single_use(&caller.identity).await?;
            Ok(minted)
        }
        .await;
        let result = call.finish(result);
        ::metrics::histogram!(crate::telemetry::MINT_SECONDS, "kind" => "x509")
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Attests the caller and mints a JWT-SVID.
    pub async fn mint_jwt(
        &self,
        evidence: &Evidence,
        req: JwtRequest,
    ) -> Result<MintedJwt, BrokerError> {
        let started = std::time::Instant::now();
        let mut call = Call::new(
            self,
            evidence,
            "MintJwtSvid",
            audience_list(&req.audiences),
            req.ttl.map(Ttl::as_secs),
        );
        let result = async {
            let caller = call
                .authorized(
                    req.spiffe_id.as_ref(),
                    req.task_id.as_deref(),
                    Action::MintJwtSvid,
                    &audience_resources(&req.audiences),
                    req.ttl.unwrap_or(self.limits.jwt.default_ttl).as_secs(),
                )
                .await?;
            let minted = call.issue_jwt(&caller, &req.audiences, req.ttl).await?;
            self.consume_single_use(&caller.identity).await?;
            Ok(minted)
        }
        .await;
        let result = call.finish(result);
        ::metrics::histogram!(crate::telemetry::MINT_SECONDS, "kind" => "jwt")
            .record(started.elapsed().as_secs_f64());
        result
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
}

impl Call<'_> {
    /// Mints and records an X.509-SVID for an authorized caller.
    pub(super) async fn issue_x509(
        &mut self,
        caller: &Caller,
        key: SubjectKey,
        ttl: Option<Ttl>,
    ) -> Result<MintedX509, BrokerError> {
        let broker = self.broker;
        broker.check_locks(&caller.identity, &caller.spiffe_id, self.evidence)?;
        let principal = broker.principal_id(&caller.identity, self.evidence).await?;
        let now = broker.clock.now();
        let keys = broker.ca.keys();
        let (key_id, minter) = keys.x509()?;
        let key_not_after = Some(minter.ca_not_after());
        let not_after = grant(ttl, broker.limits.x509, now, caller, key_not_after)?;
        let quota = broker.lease_quota(caller).await?;
        let svid = minter.mint(&caller.spiffe_id, key, now, not_after)?;
        let lease_id = Uuid::now_v7().to_string();
        broker
            .record(Lease {
                id: lease_id.clone(),
                task_id: caller.task.as_ref().map(|t| t.id.clone()),
                kind: LeaseKind::X509,
                serial: Some(svid.serial.to_string()),
                spiffe_id: caller.spiffe_id.to_string(),
                principal: Some(principal),
                audience: Vec::new(),
                issued_at: unix_secs(now),
                expires_at: unix_secs(svid.not_after),
                revoked: false,
                revoked_at: None,
                reason: None,
                signing_key: Some(key_id.to_owned()),
            })
            .await?;
        if let Some((task_id, held)) = quota {
            broker.quotas.set_task_leases(&task_id, held + 1);
        }
        self.audit.granted_ttl_secs = Some(granted_secs(now, svid.not_after));
        self.audit.lease_id = Some(lease_id.clone());
        ::metrics::counter!(crate::telemetry::ISSUED, "kind" => "x509").increment(1);
        broker.count_issued(caller.spiffe_id.as_str());
        Ok(MintedX509 {
            spiffe_id: caller.spiffe_id.clone(),
            svid,
            bundle: keys.roots.clone(),
            lease_id,
        })
    }

    /// Signs and records a JWT-SVID for an authorized caller.
    pub(super) async fn issue_jwt(
        &mut self,
        caller: &Caller,
        audiences: &[Audience],
        ttl: Option<Ttl>,
    ) -> Result<MintedJwt, BrokerError> {
        let broker = self.broker;
        broker.check_locks(&caller.identity, &caller.spiffe_id, self.evidence)?;
        let principal = broker.principal_id(&caller.identity, self.evidence).await?;
        let now = broker.clock.now();
        let keys = broker.ca.keys();
        let (key_id, signer, key_not_after) = keys.jwt()?;
        let not_after = grant(ttl, broker.limits.jwt, now, caller, Some(key_not_after))?;
        let quota = broker.lease_quota(caller).await?;
        let iat = unix_secs(now);
        let exp = unix_secs(not_after);
        let jti = Uuid::now_v7().to_string();
        let token = signer.sign(&JwtSvidClaims {
            sub: caller.spiffe_id.as_str(),
            aud: audiences,
            exp,
            iat,
            jti: &jti,
        })?;
        broker
            .record(Lease {
                id: jti.clone(),
                task_id: caller.task.as_ref().map(|t| t.id.clone()),
                kind: LeaseKind::Jwt,
                serial: None,
                spiffe_id: caller.spiffe_id.to_string(),
                principal: Some(principal),
                audience: audiences.iter().map(ToString::to_string).collect(),
                issued_at: iat,
                expires_at: exp,
                revoked: false,
                revoked_at: None,
                reason: None,
                signing_key: Some(key_id.to_owned()),
            })
            .await?;
        if let Some((task_id, held)) = quota {
            broker.quotas.set_task_leases(&task_id, held + 1);
        }
        self.audit.granted_ttl_secs = Some(u64::try_from(exp - iat).unwrap_or(0));
        self.audit.lease_id = Some(jti.clone());
        ::metrics::counter!(crate::telemetry::ISSUED, "kind" => "jwt").increment(1);
        broker.count_issued(caller.spiffe_id.as_str());
        Ok(MintedJwt {
            spiffe_id: caller.spiffe_id.clone(),
            token: Secret::new(token),
            expires_at: exp,
            jti,
        })
    }
}

/// The audit resource of a JWT request: its audiences, comma-separated.
pub(super) fn audience_list(audiences: &[Audience]) -> String {
    audiences
        .iter()
        .map(Audience::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// The policy resources of a JWT request: one per audience.
pub(super) fn audience_resources(audiences: &[Audience]) -> Vec<Resource> {
    audiences
        .iter()
        .map(|a| Resource::Audience(a.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn caller(deadline: i64) -> Caller {
        let identity = crate::attest::AttestedIdentity {
            attestor: "unix",
            subject: "uid:0".into(),
            claims: serde_json::Map::new(),
            issued_at: None,
            expires_at: None,
            single_use: None,
        };
        let task = crate::store::Task {
            id: "t1".into(),
            spiffe_id: "spiffe://example.org/a".into(),
            attestor: "unix".into(),
            principal: None,
            claims: serde_json::Map::new(),
            labels: std::collections::BTreeMap::new(),
            scopes: Vec::new(),
            source_ip: None,
            evidence_age_secs: 0,
            created_at: 0,
            deadline,
            heartbeat_secs: 10,
            grace_secs: 30,
            due_at: deadline,
            state: TaskState::Active,
            ended_at: None,
            reason: None,
        };
        Caller {
            identity,
            spiffe_id: "spiffe://example.org/a"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
            task: Some(Arc::new(task)),
        }
    }

    #[test]
    fn a_task_about_to_end_is_its_own_error_not_an_expired_ca() {
        let limits = TtlLimits {
            default_ttl: Ttl::from_secs(300).unwrap_or_else(|_| unreachable!()),
            max_ttl: Ttl::from_secs(3600).unwrap_or_else(|_| unreachable!()),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let far = Some(now + Duration::from_secs(86_400));
        let err = grant(None, limits, now, &caller(1_000_000), far);
        assert!(matches!(err, Err(BrokerError::TaskEnding { ref task_id }) if task_id == "t1"));
        let err = grant(None, limits, now, &caller(2_000_000), Some(now));
        assert!(matches!(err, Err(BrokerError::Mint(MintError::CaExpired))));
        let ok = grant(None, limits, now, &caller(1_000_010), far);
        assert_eq!(ok.ok(), Some(now + Duration::from_secs(10)));
    }
}
