//! What relying parties ask of the core: whether a JWT-SVID is honoured now (introspection and
//! the Workload API's `ValidateJWTSVID`), and the revocation log behind `Watch`.

use std::sync::Arc;

use super::{Broker, BrokerError};
use crate::store::{Lease, Revocation};

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

impl Broker {
    /// Whether a JWT-SVID is honoured now: signed by this broker, unexpired, and its lease and
    /// task active. Anything else (garbage, foreign, revoked, expired) is inactive.
    pub async fn introspect(&self, token: &str) -> Result<Introspection, BrokerError> {
        if token.len() > MAX_INTROSPECT_TOKEN {
            return Ok(Introspection::default());
        }
        let Some(claims) = self.ca.keys().verify_jwt(token) else {
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
