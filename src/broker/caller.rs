//! Who is calling, proven on this request: attest the evidence, map it to a SPIFFE ID, admit it
//! under the rate limit and ask policy. A [`Call`] carries one request's evidence and audit
//! event through these steps.

use std::sync::Arc;

use super::audit::Audit;
use super::{Broker, BrokerError, task_context};
use crate::attest::{AttestError, AttestedIdentity, Evidence, TokenRejection};
use crate::clock::unix_secs;
use crate::id::{IdError, SpiffeId};
use crate::policy::PolicyError;
use crate::policy::cedar::{
    Action, BehaviourContext, Decision, Principal, RequestContext, Resource,
};
use crate::store::{StoreError, Task, TaskState};

/// Who is calling, proven on this request, and the task it names.
pub(super) struct Caller {
    pub(super) identity: AttestedIdentity,
    pub(super) spiffe_id: SpiffeId,
    pub(super) task: Option<Arc<Task>>,
}

/// One request going through the flow: the broker, the request's evidence and its audit event
/// (written when the call is dropped).
pub(super) struct Call<'a> {
    pub(super) broker: &'a Broker,
    pub(super) evidence: &'a Evidence,
    pub(super) audit: Audit,
}

impl<'a> Call<'a> {
    /// A call for `action` on `resource`.
    pub(super) fn new(
        broker: &'a Broker,
        evidence: &'a Evidence,
        action: &'static str,
        resource: String,
        requested_ttl_secs: Option<u64>,
    ) -> Self {
        Self {
            broker,
            evidence,
            audit: Audit::new(action, evidence, resource, requested_ttl_secs),
        }
    }

    /// Records the outcome in the audit event (and, for an identified caller's denial, in its
    /// recent behaviour) and returns it.
    pub(super) fn finish<T>(mut self, result: Result<T, BrokerError>) -> Result<T, BrokerError> {
        self.audit.outcome(&result);
        if result.is_err()
            && let Some(id) = self.audit.spiffe_id()
        {
            self.broker.count_denied(id);
        }
        result
    }

    /// Attests and maps the caller; with a task id, also requires the caller to be the task's
    /// owner (re-attested now) and the task to be active.
    pub(super) async fn caller(
        &mut self,
        requested: Option<&SpiffeId>,
        task_id: Option<&str>,
    ) -> Result<Caller, BrokerError> {
        let broker = self.broker;
        let identity = broker.attestors.attest(self.evidence).await?;
        self.audit.attested(&identity);
        let task = match task_id {
            None => None,
            Some(id) => Some(broker.active_task(id).await?),
        };
        let mapper = broker.mapper();
        let spiffe_id = match &task {
            None => mapper.select(&identity, requested)?,
            Some(t) => {
                self.audit.task_id = Some(t.id.clone());
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
        self.audit.identified(&spiffe_id);
        Ok(Caller {
            identity,
            spiffe_id,
            task,
        })
    }

    /// The start of every request that adds load: who is calling ([`Self::caller`]), one
    /// request from its rate limit, and policy on `action` over every resource.
    pub(super) async fn authorized(
        &mut self,
        requested: Option<&SpiffeId>,
        task_id: Option<&str>,
        action: Action,
        resources: &[Resource],
        requested_ttl_secs: u64,
    ) -> Result<Caller, BrokerError> {
        let caller = self.caller(requested, task_id).await?;
        self.broker.admit(&caller)?;
        let behaviour = self.broker.behaviour_of(&caller).await?;
        self.authorize(&caller, action, resources, requested_ttl_secs, behaviour)?;
        Ok(caller)
    }

    /// Asks policy about `action` on each resource; all must be allowed. The policies that
    /// decided go into the audit event.
    pub(super) fn authorize(
        &mut self,
        caller: &Caller,
        action: Action,
        resources: &[Resource],
        requested_ttl_secs: u64,
        behaviour: Option<BehaviourContext>,
    ) -> Result<(), BrokerError> {
        self.broker.authorize(
            self.evidence,
            caller,
            (action, resources),
            requested_ttl_secs,
            behaviour,
            &mut self.audit.policies,
        )
    }
}

impl Broker {
    /// Asks policy about `action` on each resource; all must be allowed. `policies` collects
    /// the policies that decided.
    pub(super) fn authorize(
        &self,
        evidence: &Evidence,
        caller: &Caller,
        (action, resources): (Action, &[Resource]),
        requested_ttl_secs: u64,
        behaviour: Option<BehaviourContext>,
        policies: &mut Vec<String>,
    ) -> Result<(), BrokerError> {
        self.check_locks(&caller.identity, &caller.spiffe_id, evidence)?;
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
            behaviour,
        };
        for resource in resources {
            let decision: Decision = self.policy.decide(&principal, action, resource, &ctx)?;
            for e in &decision.errors {
                tracing::warn!(action = action.name(), error = %e, "policy evaluation error");
            }
            if !decision.allowed {
                *policies = decision.policies.clone();
                return Err(PolicyError::Denied {
                    reason: decision.deny_reason(),
                }
                .into());
            }
            for p in decision.policies {
                if !policies.contains(&p) {
                    policies.push(p);
                }
            }
        }
        Ok(())
    }

    /// Takes one request from the caller's rate limit. Only requests that add load are counted
    /// (mints, `BeginTask`): ending a task or keeping it alive is never refused for rate.
    pub(super) fn admit(&self, caller: &Caller) -> Result<(), BrokerError> {
        self.quotas
            .admit(caller.spiffe_id.as_str(), std::time::Instant::now())?;
        Ok(())
    }

    /// Consumes single-use evidence once the request has succeeded; losing a race to another
    /// use fails this request, and its credential is never returned.
    pub(super) async fn consume_single_use(
        &self,
        identity: &AttestedIdentity,
    ) -> Result<(), BrokerError> {
        if let Some(hash) = identity.single_use
            && !self
                .store
                .consume_join_token(hash, self.clock.unix_now())
                .await?
        {
            return Err(AttestError::from(TokenRejection::JoinTokenUsed).into());
        }
        Ok(())
    }

    /// A task by id: from the bus's cache of active tasks, or else from the store.
    pub(super) async fn active_task(&self, id: &str) -> Result<Arc<Task>, BrokerError> {
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
}
