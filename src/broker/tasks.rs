//! Tasks: begin, end, keep-alive (and the keep-alive stream's loop), and re-evaluation of live
//! tasks after a policy reload.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use uuid::Uuid;

use super::caller::{Call, Caller};
use super::{Broker, BrokerError, secs};
use crate::attest::Evidence;
use crate::clock::unix_secs;
use crate::id::SpiffeId;
use crate::policy::cedar::{Action, Resource};
use crate::store::{Revocation, Task, TaskState};

/// Task timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSettings {
    /// Task lifetime when the caller asks for none.
    pub default_duration: Duration,
    /// Longest task lifetime.
    pub max_duration: Duration,
    /// Keep-alive interval.
    pub heartbeat_interval: Duration,
    /// Grace after a missed keep-alive.
    pub grace: Duration,
    /// How long ended tasks and expired leases are kept before pruning.
    pub retention: Duration,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            default_duration: Duration::from_secs(3600),
            max_duration: Duration::from_secs(24 * 3600),
            heartbeat_interval: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// A request to begin a task.
#[derive(Debug, Default)]
pub struct BeginTaskRequest {
    /// Longest the task may live; `None` for the default.
    pub max_duration: Option<Duration>,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The declared intent: scopes (sorted, unique; validated by the caller).
    pub scopes: Vec<String>,
    /// Which of the caller's identities owns the task; `None` for the first.
    pub spiffe_id: Option<SpiffeId>,
}

/// Why a keep-alive stream's loop stopped (after which the task has one grace to reconnect,
/// unless it ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAliveEnd {
    /// The caller closed the stream or it broke.
    Closed,
    /// Nothing arrived for heartbeat + grace.
    Silent,
    /// The loop sent an error to the caller and stopped.
    Refused,
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
        let mut call = Call::new(
            self,
            evidence,
            "BeginTask",
            "task".to_owned(),
            Some(duration.as_secs()),
        );
        let result = async {
            // Policy decides on the task as it would be: its labels and declared scopes are in
            // `context.task`, as they are when the task is decided again after a reload.
            let mut caller = call.caller(req.spiffe_id.as_ref(), None).await?;
            self.admit(&caller)?;
            let task = self
                .new_task(evidence, &caller, duration, req.labels, req.scopes)
                .await?;
            caller.task = Some(Arc::new(task.clone()));
            call.audit.scopes = task.scopes.clone();
            let behaviour = self.behaviour_of(&caller).await?;
            call.authorize(
                &caller,
                Action::BeginTask,
                &[Resource::Target("task".to_owned())],
                duration.as_secs(),
                behaviour,
            )?;
            self.record_task(&caller, task.clone()).await?;
            self.consume_single_use(&caller.identity).await?;
            call.audit.task_id = Some(task.id.clone());
            call.audit.granted_ttl_secs = Some(duration.as_secs());
            Ok(task)
        }
        .await;
        call.finish(result)
    }

    /// Records a new active task owned by `caller` (no declared scopes).
    pub(super) async fn start_task(
        &self,
        evidence: &Evidence,
        caller: &Caller,
        duration: Duration,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<Task, BrokerError> {
        let task = self
            .new_task(evidence, caller, duration, labels, Vec::new())
            .await?;
        self.record_task(caller, task.clone()).await?;
        Ok(task)
    }

    /// Stores a new task, within the owner's task quota.
    async fn record_task(&self, caller: &Caller, task: Task) -> Result<(), BrokerError> {
        if self.quotas.settings().max_active_tasks_per_identity > 0 {
            let active = self
                .store
                .count_active_tasks(caller.spiffe_id.as_str())
                .await?;
            self.quotas.check_tasks(active)?;
        }
        self.store.insert_task(task).await?;
        Ok(())
    }

    /// A new active task owned by `caller`, not yet stored (its principal is).
    async fn new_task(
        &self,
        evidence: &Evidence,
        caller: &Caller,
        duration: Duration,
        labels: std::collections::BTreeMap<String, String>,
        scopes: Vec<String>,
    ) -> Result<Task, BrokerError> {
        let settings = self.limits.tasks;
        let principal = self.principal_id(&caller.identity, evidence).await?;
        let now = self.clock.unix_now();
        let deadline = now + secs(duration);
        let task = Task {
            id: Uuid::now_v7().to_string(),
            spiffe_id: caller.spiffe_id.to_string(),
            attestor: caller.identity.attestor.to_owned(),
            principal: Some(principal),
            claims: caller.identity.claims.clone(),
            labels,
            scopes,
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
        Ok(task)
    }

    /// Ends a task on its owner's request and revokes its credentials. Idempotent: ending an
    /// ended task reports the state it already had.
    pub async fn end_task(
        &self,
        evidence: &Evidence,
        task_id: &str,
    ) -> Result<(TaskState, bool), BrokerError> {
        let mut call = Call::new(self, evidence, "EndTask", format!("task:{task_id}"), None);
        let result = async {
            match call.caller(None, Some(task_id)).await {
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
        call.finish(result)
    }

    /// Opens a keep-alive for a task: the caller must be its owner, re-attested now. Returns the
    /// task and the due time written (for [`Self::ping`]).
    pub async fn keep_alive_open(
        &self,
        evidence: &Evidence,
        task_id: &str,
    ) -> Result<(Task, i64), BrokerError> {
        let mut call = Call::new(self, evidence, "KeepAlive", format!("task:{task_id}"), None);
        let result = call.caller(None, Some(task_id)).await.and_then(|c| {
            c.task
                .map(Arc::unwrap_or_clone)
                .ok_or_else(|| BrokerError::TaskNotFound(task_id.to_owned()))
        });
        // Only refusals are decisions here; an accepted keep-alive is not audited.
        call.audit.refused(&result);
        if result.is_ok() {
            call.audit.discard();
        }
        drop(call);
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

    /// Serves one keep-alive stream after [`Self::keep_alive_open`]: each message in `inbound`
    /// (the task id it names; empty for "this stream's task") is a ping, answered with the
    /// task's deadline on the returned channel. The loop stops when the stream closes, breaks or
    /// goes silent for heartbeat + grace (the task then has one grace to reconnect), when the
    /// task ends (the caller is told why), or when the broker shuts down.
    pub fn serve_keep_alive<S, E>(
        self: &Arc<Self>,
        task: Task,
        mut written_due: i64,
        mut inbound: S,
    ) -> mpsc::Receiver<Result<i64, BrokerError>>
    where
        S: Stream<Item = Result<String, E>> + Send + Unpin + 'static,
        E: Send + 'static,
    {
        let broker = self.clone();
        let mut revocations = broker.bus().subscribe();
        let (tx, rx) = mpsc::channel(4);
        let deadline = task.deadline;
        let silence =
            Duration::from_secs(u64::try_from(task.heartbeat_secs + task.grace_secs).unwrap_or(60));
        tokio::spawn(async move {
            let _ = tx.send(Ok(deadline)).await;
            let end = loop {
                tokio::select! {
                    msg = tokio::time::timeout(silence, inbound.next()) => match msg {
                        Ok(Some(Ok(named))) => {
                            if !named.is_empty() && named != task.id {
                                let _ = tx.send(Err(BrokerError::StreamMisuse("task_id must not change on a stream"))).await;
                                break KeepAliveEnd::Refused;
                            }
                            match broker.ping(&task, &mut written_due).await {
                                Ok(true) => {
                                    if tx.send(Ok(deadline)).await.is_err() {
                                        break KeepAliveEnd::Closed;
                                    }
                                }
                                Ok(false) => {
                                    let _ = tx.send(Err(BrokerError::TaskNotActive { task_id: task.id.clone(), state: TaskState::Ended.as_str() })).await;
                                    break KeepAliveEnd::Refused;
                                }
                                Err(e) => {
                                    let _ = tx.send(Err(e)).await;
                                    break KeepAliveEnd::Refused;
                                }
                            }
                        }
                        Ok(_) => break KeepAliveEnd::Closed,
                        Err(_) => break KeepAliveEnd::Silent,
                    },
                    () = broker.closed() => {
                        let _ = tx.send(Err(BrokerError::ShuttingDown("reconnect the keep-alive within the grace"))).await;
                        break KeepAliveEnd::Closed;
                    }
                    r = revocations.recv() => match r {
                        Ok(ev) if broker.event_ends(&ev, &task).await => {
                            let _ = tx.send(Err(BrokerError::TaskEnded { reason: ev.reason.clone() })).await;
                            return;
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break KeepAliveEnd::Closed,
                    },
                }
            };
            tracing::debug!(task_id = %task.id, end = ?end, "keep-alive stream ended");
            let ended = match end {
                // Already silent for heartbeat + grace: what is left of the bound.
                KeepAliveEnd::Silent => broker.keep_alive_silent(&task).await,
                KeepAliveEnd::Closed | KeepAliveEnd::Refused => {
                    broker.keep_alive_closed(&task).await
                }
            };
            if let Err(e) = ended {
                tracing::warn!(task_id = %task.id, error = %e, "cannot record keep-alive loss");
            }
        });
        rx
    }

    /// Whether a revocation event ended `task`: it names the task or its owner, or it is a set
    /// event ([`Revocation::is_set`]) and the store no longer has the task active.
    pub(super) async fn event_ends(&self, event: &Revocation, task: &Task) -> bool {
        if event.ends_task(task) {
            return true;
        }
        if !event.is_set() {
            return false;
        }
        match self.store.task(&task.id).await {
            Ok(Some(t)) => t.state != TaskState::Active,
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(task_id = %task.id, error = %e, "cannot tell whether a revocation ended the task");
                false
            }
        }
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

    /// A task's keep-alive stream went silent for heartbeat + grace: the task is ended within
    /// grace/2 more, the most the keep-alive bound allows after its last ping.
    pub async fn keep_alive_silent(&self, task: &Task) -> Result<(), BrokerError> {
        let due = self.clock.unix_now() + task.grace_secs / 2;
        self.store.keep_alive(&task.id, due).await?;
        Ok(())
    }

    /// A task's keep-alive stream ended: it has one grace period to reconnect, after which the
    /// reaper ends it.
    pub async fn keep_alive_closed(&self, task: &Task) -> Result<(), BrokerError> {
        let due = self.clock.unix_now() + task.grace_secs;
        self.store.keep_alive(&task.id, due).await?;
        Ok(())
    }

    /// Ends an active task (one store write) and announces it. Returns whether it was active.
    pub(super) async fn end(
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
}
