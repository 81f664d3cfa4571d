//! Admin actions on the core: revoking a task, a lease or an identity's tasks, and creating
//! join tokens. Each is audited as an admin action naming the admin.

use uuid::Uuid;

use super::{Broker, BrokerError, lease_key};
use crate::id::{SpiffeId, Ttl};
use crate::secret::Secret;
use crate::store::{LeaseStatus, NewJoinToken, Revoked, TaskState};

impl Broker {
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

    /// Admin: revokes everything a SPIFFE ID holds — its active tasks and every unexpired
    /// credential, in a task or not — in one store write and one revocation event. `None`
    /// when it held nothing.
    pub async fn revoke_identity(
        &self,
        admin: &str,
        spiffe_id: &SpiffeId,
    ) -> Result<Option<Revoked>, BrokerError> {
        let revoked = self
            .store
            .revoke_identity(
                spiffe_id.as_str(),
                &format!("identity revoked by admin ({admin})"),
                self.clock.unix_now(),
            )
            .await?;
        let outcome = match &revoked {
            Some(r) => {
                crate::telemetry::revoked(&r.event.reason);
                self.bus.publish(r.event.clone());
                format!(
                    "{} task(s) and {} credential(s) revoked",
                    r.task_ids.len(),
                    r.leases
                )
            }
            None => "nothing held".to_owned(),
        };
        self.admin_audit(admin, "RevokeIdentity", spiffe_id.as_str(), &outcome);
        Ok(revoked)
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

    /// Whether a lease is honoured now, with its record.
    pub async fn lease_status(&self, key: &str) -> Result<Option<LeaseStatus>, BrokerError> {
        Ok(self.store.lease(&lease_key(key)).await?)
    }
}
