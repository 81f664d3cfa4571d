//! SPIFFE Workload API sessions: the caller's permitted identities, the task one
//! `FetchX509SVID` stream is bound to, the SVIDs minted on it, and the streams' timing (renewal
//! at half life, keep-alive, CRL updates paced and bounded). `api/workload.rs` only translates
//! these into the Workload API's messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::caller::{Call, Caller};
use super::mint::{MintedJwt, MintedX509, audience_list, audience_resources};
use super::{Broker, BrokerError};
use crate::attest::{AttestedIdentity, Evidence};
use crate::ca::x509::SubjectKey;
use crate::id::{Audience, SpiffeId};
use crate::policy::MappingError;
use crate::policy::cedar::{Action, Resource};
use crate::store::{Task, TaskState};

/// How the Workload API streams carry the CRL. Every `FetchX509SVID` and `FetchX509Bundles`
/// response carries the CRL, and a new CRL is pushed to every open stream. Under heavy churn
/// the CRL grows (it lists each revoked serial until its `notAfter`) and changes many times a
/// second: both are bounded here so the streams stay within the 4 MiB message limit SPIFFE
/// clients apply by default and do not multiply the CRL by the number of streams on every
/// rebuild. `/crl` and the revocation watch are not affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadApiSettings {
    /// A CRL larger than this (DER bytes) is left out of responses (0: never carried).
    pub crl_max_bytes: usize,
    /// Shortest time from a stream's last response to a CRL-only update; SVID rotation and
    /// revocation of the stream's own SVIDs are never delayed.
    pub crl_push_interval: Duration,
}

impl Default for WorkloadApiSettings {
    fn default() -> Self {
        Self {
            crl_max_bytes: 2 * 1024 * 1024,
            crl_push_interval: Duration::from_secs(1),
        }
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

/// What a `FetchX509SVID` stream sends: the session's current SVIDs and the CRL to carry.
#[derive(Debug, Clone)]
pub struct X509Update {
    /// The SVIDs, default identity first.
    pub svids: Arc<Vec<MintedX509>>,
    /// The CRL (empty when there is none or it is left out).
    pub crl: Vec<Bytes>,
    /// The trust anchors (DER) in force when the update is sent: a root published since the
    /// SVIDs were minted is in it.
    pub roots: Vec<Vec<u8>>,
}

impl Broker {
    /// Attests a Workload API caller and returns its identities that policy permits `action`
    /// on every resource; none is `PermissionDenied` (audited; the permitted ones are audited
    /// as each credential is issued).
    async fn workload_callers(
        &self,
        evidence: &Evidence,
        action: Action,
        resources: &[Resource],
        requested_ttl_secs: u64,
        only: Option<&SpiffeId>,
    ) -> Result<Vec<Caller>, BrokerError> {
        let mut call = Call::new(
            self,
            evidence,
            action.name(),
            "workload-api".to_owned(),
            None,
        );
        let result = async {
            let identity = self.attestors.attest(evidence).await?;
            call.audit.attested(&identity);
            let mut ids = self.mapper().map(&identity)?;
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
                let mut policies = Vec::new();
                let behaviour = self.behaviour_of(&caller).await?;
                match self.authorize(
                    evidence,
                    &caller,
                    (action, resources),
                    requested_ttl_secs,
                    behaviour,
                    &mut policies,
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
        call.audit.refused(&result);
        if result.is_ok() {
            call.audit.discard();
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
            return Err(MappingError::NoMapping { attestor: "unix" }.into());
        };
        let duration = self.limits.tasks.max_duration;
        let mut call = Call::new(
            self,
            evidence,
            "BeginTask",
            "task".to_owned(),
            Some(duration.as_secs()),
        );
        call.audit.attested(&first.identity);
        call.audit.identified(&first.spiffe_id);
        let labels = [("source".to_owned(), "workload-api".to_owned())].into();
        let result = async {
            let behaviour = self.behaviour_of(first).await?;
            call.authorize(
                first,
                Action::BeginTask,
                &[Resource::Target("task".to_owned())],
                duration.as_secs(),
                behaviour,
            )?;
            self.start_task(evidence, first, duration, labels).await
        }
        .await;
        if let Ok(t) = &result {
            call.audit.task_id = Some(t.id.clone());
        }
        let task = call.finish(result)?;
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
            let mut call = Call::new(self, evidence, "MintX509Svid", "x509-svid".to_owned(), None);
            call.audit.attested(&caller.identity);
            call.audit.identified(spiffe_id);
            call.audit.task_id = Some(session.task.id.clone());
            let result = call.issue_x509(&caller, SubjectKey::Generate, None).await;
            out.push(call.finish(result)?);
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
        let ttl = self.limits.jwt.default_ttl.as_secs();
        let callers = self
            .workload_callers(
                evidence,
                Action::MintJwtSvid,
                &audience_resources(audiences),
                ttl,
                only,
            )
            .await?;
        let mut out = Vec::with_capacity(callers.len());
        for caller in &callers {
            let mut call = Call::new(
                self,
                evidence,
                "MintJwtSvid",
                audience_list(audiences),
                None,
            );
            call.audit.attested(&caller.identity);
            call.audit.identified(&caller.spiffe_id);
            let result = call.issue_jwt(caller, audiences, None).await;
            out.push(call.finish(result)?);
        }
        Ok(out)
    }

    /// Whether the caller has any identity at all (for the bundle streams).
    pub async fn workload_identified(&self, evidence: &Evidence) -> Result<(), BrokerError> {
        let identity = self.attestors.attest(evidence).await?;
        self.mapper().map(&identity)?;
        Ok(())
    }
}

/// The Workload API's long-lived streams over one broker, with the CRL as they carry it.
pub struct WorkloadStreams {
    broker: Arc<Broker>,
    settings: WorkloadApiSettings,
    /// Whether the last look found the CRL too large (logged when this changes).
    omitting: AtomicBool,
}

impl WorkloadStreams {
    /// Streams over `broker`.
    pub fn new(broker: Arc<Broker>, settings: WorkloadApiSettings) -> Self {
        Self {
            broker,
            settings,
            omitting: AtomicBool::new(false),
        }
    }

    /// The CRLs as responses carry them: every published intermediate's, shared, unless
    /// together they are larger than `crl_max_bytes`.
    pub fn crl(&self) -> Vec<Bytes> {
        let crls: Vec<Bytes> = self
            .broker
            .crl()
            .all()
            .into_iter()
            .filter(|c| !c.is_empty())
            .collect();
        if crls.is_empty() {
            return Vec::new();
        }
        let size: usize = crls.iter().map(Bytes::len).sum();
        let limit = self.settings.crl_max_bytes;
        let too_big = size > limit;
        if limit > 0 && self.omitting.swap(too_big, Ordering::Relaxed) != too_big {
            if too_big {
                tracing::warn!(
                    crl_bytes = size,
                    limit,
                    "the CRL is larger than workload_api.crl_max_bytes: Workload API responses \
                     leave it out until it shrinks; relying parties read it from /crl"
                );
            } else {
                tracing::info!(
                    crl_bytes = size,
                    "the CRL fits workload_api.crl_max_bytes again: Workload API responses carry it"
                );
            }
        }
        if too_big { Vec::new() } else { crls }
    }

    fn pacer(&self) -> CrlPacer {
        CrlPacer {
            interval: self.settings.crl_push_interval,
            last: None,
            due: None,
            roots: Vec::new(),
        }
    }

    /// Serves one `FetchX509SVID` session until the client leaves (the receiver is dropped),
    /// the task ends, or shutdown; then the task ends and everything issued on it is revoked.
    pub fn x509_svids(
        self: &Arc<Self>,
        evidence: Evidence,
        session: WorkloadSession,
    ) -> mpsc::Receiver<Result<X509Update, BrokerError>> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(self.clone().x509_session(evidence, session, tx));
        rx
    }

    async fn x509_session(
        self: Arc<Self>,
        evidence: Evidence,
        session: WorkloadSession,
        tx: mpsc::Sender<Result<X509Update, BrokerError>>,
    ) {
        let broker = self.broker.clone();
        let mut revocations = broker.bus().subscribe();
        let mut crl_updates = broker.crl().updates();
        let heartbeat = Duration::from_secs(
            u64::try_from(session.task.heartbeat_secs)
                .unwrap_or(10)
                .max(1),
        );
        // The task was stored with its first due time: the first keep-alive is one heartbeat
        // away.
        let mut keep_alive =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        let mut written_due = session.task.due_at;
        let mut svids = Arc::new(Vec::new());
        let mut renew = tokio::time::Instant::now();
        let mut pacer = self.pacer();
        let update = |svids: &Arc<Vec<MintedX509>>, crl| {
            Ok(X509Update {
                svids: svids.clone(),
                crl,
                roots: broker.ca().keys().roots.clone(),
            })
        };
        loop {
            if tokio::time::Instant::now() >= renew {
                match broker.workload_svids(&evidence, &session).await {
                    Ok(fresh) => {
                        renew =
                            tokio::time::Instant::now() + renew_after(&fresh, broker.clock().now());
                        svids = Arc::new(fresh);
                        let sent = update(&svids, self.crl());
                        if let Ok(u) = &sent {
                            pacer.sent(&u.roots);
                        }
                        if tx.send(sent).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                }
            }
            tokio::select! {
                () = tx.closed() => break,
                () = tokio::time::sleep_until(renew) => {}
                _ = keep_alive.tick() => {
                    if let Ok(false) = broker.ping(&session.task, &mut written_due).await {
                        let _ = tx.send(Err(BrokerError::Withdrawn("the workload's task has ended".into()))).await;
                        return;
                    }
                }
                changed = crl_updates.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    pacer.changed();
                }
                () = pacer.due() => {
                    let crl = self.crl();
                    let roots = broker.ca().keys().roots.clone();
                    if pacer.take(&crl, &roots) {
                        pacer.sent(&roots);
                        if tx.send(update(&svids, crl)).await.is_err() {
                            break;
                        }
                    }
                }
                ev = revocations.recv() => match ev {
                    Ok(r) if broker.event_ends(&r, &session.task).await => {
                        // The task was revoked or ended: every SVID of the stream is withdrawn.
                        let _ = tx
                            .send(Err(BrokerError::Withdrawn(format!("identity withdrawn: {}", r.reason))))
                            .await;
                        return;
                    }
                    Ok(r) if r.lease_id.as_ref().is_some_and(|l| svids.iter().any(|s| &s.lease_id == l))
                        || r.spiffe_id.as_ref().is_some_and(|id| svids.iter().any(|s| s.spiffe_id.as_str() == id))
                        || r.is_set() => {
                        // One SVID was revoked: replace it (and its siblings) at once. A
                        // revoked signing key (on any replica): read the keys first, so the
                        // replacement is signed by its successor.
                        if r.reason.starts_with(super::keys::KEY_REVOKED)
                            && let Err(e) = broker.ca().refresh().await
                        {
                            tracing::warn!(error = %e, "cannot read the signing keys");
                        }
                        renew = tokio::time::Instant::now();
                    }
                    _ => {}
                },
                () = broker.closed() => {
                    let _ = tx.send(Err(BrokerError::ShuttingDown("reconnect"))).await;
                    return;
                }
            }
        }
        if let Err(e) = broker.workload_close(&session).await {
            tracing::warn!(task_id = %session.task.id, error = %e, "cannot end the workload's task");
        }
    }

    /// Serves one `FetchX509Bundles` stream: the CRL to carry now, and again (paced) whenever
    /// it changes, until the receiver is dropped or shutdown.
    pub fn x509_bundles(self: &Arc<Self>) -> mpsc::Receiver<Vec<Bytes>> {
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let broker = this.broker.clone();
            let mut crl_updates = broker.crl().updates();
            let mut pacer = this.pacer();
            pacer.sent(&broker.ca().keys().roots);
            if tx.send(this.crl()).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    () = broker.closed() => return,
                    changed = crl_updates.changed() => match changed {
                        Ok(()) => pacer.changed(),
                        Err(_) => return,
                    },
                    () = pacer.due() => {
                        let crl = this.crl();
                        let roots = broker.ca().keys().roots.clone();
                        if pacer.take(&crl, &roots) {
                            pacer.sent(&roots);
                            if tx.send(crl).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        rx
    }
}

/// Half the remaining lifetime of the shortest-lived SVID: when to renew.
fn renew_after(svids: &[MintedX509], now: SystemTime) -> Duration {
    svids
        .iter()
        .map(|m| m.svid.not_after.duration_since(now).unwrap_or_default() / 2)
        .min()
        .unwrap_or(Duration::from_secs(60))
        .max(Duration::from_secs(1))
}

/// Paces one stream's CRL-only updates: a new CRL is sent no sooner than `interval` after the
/// last response, and not at all while it is left out (unless the roots changed). A client
/// then keeps the last CRL it was given (signed, and valid until its `nextUpdate`) rather than
/// being told of an empty one. A key change (a new root) rebuilds the CRL, so it arrives here.
struct CrlPacer {
    interval: Duration,
    /// When the last response was sent.
    last: Option<tokio::time::Instant>,
    /// When the pending CRL update is due.
    due: Option<tokio::time::Instant>,
    /// The trust anchors the last response carried.
    roots: Vec<Vec<u8>>,
}

impl CrlPacer {
    /// A response carrying `roots` was sent.
    fn sent(&mut self, roots: &[Vec<u8>]) {
        self.last = Some(tokio::time::Instant::now());
        self.due = None;
        if self.roots != roots {
            self.roots = roots.to_vec();
        }
    }

    /// The broker's CRL changed: schedule an update.
    fn changed(&mut self) {
        let now = tokio::time::Instant::now();
        self.due
            .get_or_insert_with(|| self.last.map_or(now, |l| (l + self.interval).max(now)));
    }

    /// Resolves when an update is due.
    async fn due(&self) {
        match self.due {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }

    /// The update is due with `crl` and `roots`: whether to send it (with a CRL to carry, or
    /// roots the client does not have).
    fn take(&mut self, crl: &[Bytes], roots: &[Vec<u8>]) -> bool {
        self.due = None;
        !crl.is_empty() || self.roots != roots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crl_updates_are_paced_and_never_sent_without_a_crl_or_new_roots() {
        let interval = Duration::from_secs(1);
        let mut pacer = CrlPacer {
            interval,
            last: None,
            due: None,
            roots: Vec::new(),
        };
        let before = tokio::time::Instant::now();
        // Before any response, a change is due at once.
        pacer.changed();
        assert!(pacer.due.is_some_and(|d| d <= tokio::time::Instant::now()));
        let roots = vec![b"root".to_vec()];
        pacer.sent(&roots);
        let sent = pacer.last.unwrap();
        assert!(sent >= before);
        assert_eq!(pacer.due, None);
        // Changes right after a response wait out the interval, however many arrive.
        pacer.changed();
        pacer.changed();
        assert!(pacer.due.is_some_and(|d| d >= sent + interval));
        let crl = vec![Bytes::from_static(b"crl")];
        assert!(pacer.take(&crl, &roots));
        assert_eq!(pacer.due, None, "taken");
        // A CRL left out (too large) is not sent as an update: the client keeps its last one.
        pacer.changed();
        assert!(!pacer.take(&[], &roots));
        // Unless the roots changed: they are sent without a CRL.
        let more = vec![b"root".to_vec(), b"new root".to_vec()];
        assert!(pacer.take(&[], &more));
        // Long after the last response, a change is due at once.
        pacer.last = Some(tokio::time::Instant::now() - 2 * interval);
        pacer.changed();
        assert!(pacer.due.is_some_and(|d| d <= tokio::time::Instant::now()));
    }
}
