//! Durable state behind one narrow trait: exactly the queries the broker needs.
//!
//! Backends: SQLite (embedded default) and PostgreSQL (several brokers on one database). Every
//! backend passes the same conformance suite
//! (`store::conformance`). Secrets are never stored in clear: join tokens are kept as SHA-256
//! hashes.

pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

/// A boxed future, so stores can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, read-only, full or otherwise failing.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A row that must be unique already exists.
    #[error("already exists")]
    Conflict,
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A lease was refused because its task is no longer active (it ended while the credential
    /// was being minted). Nothing was written.
    #[error("task {0} is no longer active")]
    TaskNotActive(String),
}

impl StoreError {
    /// The same error, for another waiter on one group commit.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::Unavailable(m) => Self::Unavailable(m.clone()),
            Self::Conflict => Self::Conflict,
            Self::Corrupt(m) => Self::Corrupt(m.clone()),
            Self::TaskNotActive(t) => Self::TaskNotActive(t.clone()),
        }
    }
}

/// A lease as the stores' revocation expansion reads it: one JSON array of the lease's columns
/// in table order (`revoked` as 0 or 1, `audience` as its JSON array).
type LeaseJson = (
    String,
    Option<String>,
    String,
    Option<String>,
    String,
    Vec<String>,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
);

/// The leases of a JSON array of [`LeaseJson`] rows, built by the database in one query: a task
/// may hold thousands of leases, and handing each back as a row of values costs several times
/// the read itself (per value copies, per row messages, decoding by column name).
pub(crate) fn leases_from_json(json: &str) -> Result<Vec<Lease>, StoreError> {
    let rows: Vec<LeaseJson> = serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("revoked leases: {e}")))?;
    rows.into_iter()
        .map(|row| {
            Ok(Lease {
                kind: LeaseKind::parse(&row.2)
                    .ok_or_else(|| StoreError::Corrupt(format!("lease kind {}", row.2)))?,
                id: row.0,
                task_id: row.1,
                serial: row.3,
                spiffe_id: row.4,
                audience: row.5,
                issued_at: row.6,
                expires_at: row.7,
                revoked: row.8 != 0,
                revoked_at: row.9,
                reason: row.10,
            })
        })
        .collect()
}

/// A queued lease and who waits for its commit.
pub(crate) type QueuedLease = (Lease, tokio::sync::oneshot::Sender<Result<(), StoreError>>);

/// Writes one batch of leases in one transaction; says, per lease, whether it was written
/// (`false`: its task was no longer active).
pub(crate) type WriteBatch =
    Box<dyn for<'a> Fn(&'a [Lease]) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> + Send>;

/// How long a contended writer waits for more leases before it commits (see [`lease_writer`]).
pub(crate) const COMMIT_LINGER: std::time::Duration = std::time::Duration::from_micros(500);

/// Group commit: one writer drains every queued lease (up to `batch`) into one transaction,
/// then acknowledges each waiter.
///
/// Alone, a lease commits at once. Under load — leases were already waiting when the last
/// commit finished — the writer first lingers up to [`COMMIT_LINGER`] for the leases being
/// minted at that moment, as PostgreSQL's `commit_delay` does: a commit costs the same few
/// round trips and index pages for one lease as for fifty, and without the wait a fast writer
/// commits leases one by one.
pub(crate) async fn lease_writer(
    mut rx: tokio::sync::mpsc::Receiver<QueuedLease>,
    batch: usize,
    write: WriteBatch,
) {
    let mut queued = Vec::with_capacity(batch);
    let mut leases = Vec::with_capacity(batch);
    let mut contended = false;
    while rx.recv_many(&mut queued, batch).await > 0 {
        if contended {
            let linger = tokio::time::sleep(COMMIT_LINGER);
            tokio::pin!(linger);
            while queued.len() < batch {
                let room = batch - queued.len();
                tokio::select! {
                    () = &mut linger => break,
                    n = rx.recv_many(&mut queued, room) => if n == 0 { break },
                }
            }
        }
        let started = std::time::Instant::now();
        let acks: Vec<_> = queued
            .drain(..)
            .map(|(lease, ack)| {
                leases.push(lease);
                ack
            })
            .collect();
        let result = write(&leases).await;
        ::metrics::histogram!(crate::telemetry::COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        ::metrics::histogram!(crate::telemetry::COMMIT_BATCH).record(leases.len() as f64);
        for (i, (lease, ack)) in leases.drain(..).zip(acks).enumerate() {
            let _ = ack.send(match &result {
                Ok(written) if written.get(i).copied().unwrap_or(false) => Ok(()),
                Ok(_) => Err(StoreError::TaskNotActive(lease.task_id.unwrap_or_default())),
                Err(e) => Err(e.duplicate()),
            });
        }
        contended = !rx.is_empty();
    }
}

/// SHA-256 of a join token: what is stored and looked up.
pub type TokenHash = [u8; 32];

/// A join token to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJoinToken {
    /// Hash of the token.
    pub hash: TokenHash,
    /// Public id (for listing and audit).
    pub id: String,
    /// Name, a claim for identity mapping.
    pub name: String,
    /// Extra claims (JSON object).
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
}

/// A stored join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Extra claims.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// When it was used, if it was.
    pub used_at: Option<i64>,
}

/// A task's state. Only `Active` tasks' leases are honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Running.
    Active,
    /// Ended by its owner (`EndTask`).
    Ended,
    /// Ended by the broker: deadline passed or keep-alive lost.
    Expired,
    /// Revoked by an admin or by policy.
    Revoked,
}

impl TaskState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Ended => "ended",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Ended, Self::Expired, Self::Revoked]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// A task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Time-ordered id (UUIDv7).
    pub id: String,
    /// The owner.
    pub spiffe_id: String,
    /// The attestor that proved the owner.
    pub attestor: String,
    /// The owner's attested claims at begin time (for re-evaluation after a policy reload).
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The owner's address at begin time (absent on the Unix socket), for re-evaluation.
    pub source_ip: Option<String>,
    /// The age of the owner's evidence at begin time, for re-evaluation.
    pub evidence_age_secs: i64,
    /// Begin time, Unix seconds.
    pub created_at: i64,
    /// Latest end, Unix seconds.
    pub deadline: i64,
    /// Keep-alive interval, seconds.
    pub heartbeat_secs: i64,
    /// Grace after a missed keep-alive, seconds.
    pub grace_secs: i64,
    /// When the task is due to end unless kept alive: min(deadline, last ping + heartbeat +
    /// grace). Updated coarsely by keep-alives.
    pub due_at: i64,
    /// State.
    pub state: TaskState,
    /// When it stopped being active.
    pub ended_at: Option<i64>,
    /// Why it stopped.
    pub reason: Option<String>,
}

/// What a lease records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// An X.509-SVID (identified by serial).
    X509,
    /// A JWT-SVID (identified by jti = lease id).
    Jwt,
}

impl LeaseKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }

    /// The kind a stored name names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "x509" => Some(Self::X509),
            "jwt" => Some(Self::Jwt),
            _ => None,
        }
    }
}

/// One issued credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Time-ordered id (UUIDv7); the `jti` of a JWT-SVID.
    pub id: String,
    /// The task, or `None` for a standalone credential.
    pub task_id: Option<String>,
    /// Kind.
    pub kind: LeaseKind,
    /// X.509 serial (lowercase hex).
    pub serial: Option<String>,
    /// The identity in the credential.
    pub spiffe_id: String,
    /// JWT audiences.
    pub audience: Vec<String>,
    /// Issue time, Unix seconds.
    pub issued_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// Whether the lease itself was revoked (its task may also have ended).
    pub revoked: bool,
    /// When and why it was revoked.
    pub revoked_at: Option<i64>,
    /// Why.
    pub reason: Option<String>,
}

/// A lease and whether it is honoured right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The lease.
    pub lease: Lease,
    /// The state of its task, if it has one.
    pub task_state: Option<TaskState>,
}

impl LeaseStatus {
    /// Honoured: unexpired, not revoked, and its task (if any) active.
    pub fn active(&self, now: i64) -> bool {
        !self.lease.revoked
            && self.lease.expires_at > now
            && self.task_state.is_none_or(|s| s == TaskState::Active)
    }
}

/// One revocation, as recorded and streamed to watchers; `seq` is the resumable cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Cursor: strictly increasing.
    pub seq: i64,
    /// When.
    pub at: i64,
    /// The task ended, if a whole task was.
    pub task_id: Option<String>,
    /// The lease revoked, if a single lease was.
    pub lease_id: Option<String>,
    /// Why.
    pub reason: String,
}

/// A revoked, unexpired X.509 serial (for the CRL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Lowercase hex serial.
    pub serial: String,
    /// When it stopped being honoured.
    pub revoked_at: i64,
    /// The certificate's notAfter.
    pub expires_at: i64,
}

/// Filters and paging for listings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this task's leases.
    pub task_id: Option<String>,
    /// Only this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Only active (`true`) or only inactive (`false`).
    pub active: Option<bool>,
    /// Return rows with id greater than this (the previous page's last id).
    pub after: Option<String>,
    /// At most this many rows.
    pub limit: u32,
}

/// The condition of a lease listing on its task filter, whose value is bound as `param`.
///
/// With a task, the condition is a plain equality, so the database finds the task's leases
/// through its index and sorts that many (a task holds a bounded number). The always-true form,
/// `param IS NULL OR task_id = param`, hides the index from a plan made before the value is
/// known, and a listing of one task's leases then read the whole table in id order.
fn task_condition(f: &ListFilter, param: &str) -> String {
    match f.task_id {
        Some(_) => format!("l.task_id = {param}"),
        None => format!("{param} IS NULL"),
    }
}

/// Why the reaper ends a task at `now`.
pub fn reap_reason(deadline: i64, now: i64) -> &'static str {
    if deadline <= now {
        "deadline passed"
    } else {
        "keep-alive lost"
    }
}

/// The broker's durable state.
pub trait Store: Send + Sync {
    /// Records a new task.
    fn insert_task(&self, task: Task) -> BoxFuture<'_, Result<(), StoreError>>;

    /// A task by id.
    fn task(&self, id: &str) -> BoxFuture<'_, Result<Option<Task>, StoreError>>;

    /// Pushes an active task's `due_at` forward (a keep-alive); `false` if it is not active.
    fn keep_alive(&self, id: &str, due_at: i64) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Ends an active task with `state` and records one revocation event; one write whatever
    /// the task's lease count. `None` if the task was not active.
    fn end_task(
        &self,
        id: &str,
        state: TaskState,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revocation>, StoreError>>;

    /// Active tasks whose `due_at` is at or before `now` (at most `limit`).
    fn due_tasks(&self, now: i64, limit: u32) -> BoxFuture<'_, Result<Vec<Task>, StoreError>>;

    /// Ends every due task (deadline passed, keep-alive lost), at most `limit`, each exactly once
    /// even when several brokers reap at the same time. Returns the tasks ended and their events.
    fn end_due_tasks(
        &self,
        now: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(Task, Revocation)>, StoreError>> {
        Box::pin(async move {
            let mut ended = Vec::new();
            for task in self.due_tasks(now, limit).await? {
                let reason = reap_reason(task.deadline, now);
                if let Some(event) = self
                    .end_task(&task.id, TaskState::Expired, reason, now)
                    .await?
                {
                    ended.push((task, event));
                }
            }
            Ok(ended)
        })
    }

    /// After a restart: gives every active task one fresh grace period to reconnect.
    fn refresh_active_tasks(&self, now: i64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Records a lease durably (group-committed); returns once committed. A lease of a task
    /// is written only while the task is active, checked atomically with the write (an
    /// `EndTask` that commits first makes this return [`StoreError::TaskNotActive`]), so every
    /// lease of an ended task is covered by its revocation event.
    fn insert_lease(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>>;

    /// A lease by id, or by X.509 serial.
    fn lease(&self, id_or_serial: &str) -> BoxFuture<'_, Result<Option<LeaseStatus>, StoreError>>;

    /// Revokes one lease and records a revocation event; `None` if already revoked or unknown.
    fn revoke_lease(
        &self,
        id: &str,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revocation>, StoreError>>;

    /// Revocation events after `cursor`, oldest first.
    fn revocations_after(
        &self,
        cursor: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Revocation>, StoreError>>;

    /// The newest revocation event's number; 0 when there is none.
    fn newest_revocation(&self) -> BoxFuture<'_, Result<i64, StoreError>>;

    /// Leases affected by a revocation event (the lease, or every lease of the task).
    fn revoked_leases(&self, event: &Revocation) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>>;

    /// Serials of X.509 leases no longer honoured but not yet expired at `now`.
    fn revoked_serials(&self, now: i64) -> BoxFuture<'_, Result<Vec<RevokedSerial>, StoreError>>;

    /// Tasks, newest first by id order, filtered and paged.
    fn list_tasks(
        &self,
        filter: ListFilter,
        now: i64,
    ) -> BoxFuture<'_, Result<Vec<Task>, StoreError>>;

    /// Leases, filtered and paged.
    fn list_leases(
        &self,
        filter: ListFilter,
        now: i64,
    ) -> BoxFuture<'_, Result<Vec<LeaseStatus>, StoreError>>;

    /// Active tasks (for re-evaluation after a policy reload), paged by id.
    fn active_tasks(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Task>, StoreError>>;

    /// Deletes leases and tasks that stopped mattering before `before` (expired or ended), and
    /// revocation events older than that. Returns rows deleted.
    fn prune(&self, before: i64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Stores a new join token.
    fn create_join_token(&self, token: NewJoinToken) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Looks up a join token by hash.
    fn join_token(&self, hash: TokenHash) -> BoxFuture<'_, Result<Option<JoinToken>, StoreError>>;

    /// Marks a join token used, if it is unused and unexpired at `now`. Returns whether this
    /// call consumed it: of concurrent callers, exactly one wins.
    fn consume_join_token(
        &self,
        hash: TokenHash,
        now: i64,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// How many tasks are active and how many leases are honoured at `now` (for metrics).
    fn counts(&self, now: i64) -> BoxFuture<'_, Result<(u64, u64), StoreError>>;

    /// How many active tasks `spiffe_id` owns (for its quota).
    fn count_active_tasks(&self, spiffe_id: &str) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// How many leases were recorded in a task (for its quota).
    fn count_task_leases(&self, task_id: &str) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Whether the store accepts writes now (for `/readyz`): a small real write.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// The one conformance suite every backend must pass.
#[cfg(test)]
pub mod conformance {
    use super::*;

    fn token(hash: u8, expires_at: i64) -> NewJoinToken {
        let mut claims = serde_json::Map::new();
        claims.insert("rack".into(), serde_json::Value::from("r7"));
        NewJoinToken {
            hash: [hash; 32],
            id: format!("jt-{hash}"),
            name: "build-box".into(),
            claims,
            created_at: 1_000,
            expires_at,
        }
    }

    /// A task row for tests.
    pub fn task(id: &str, spiffe_id: &str, deadline: i64, due_at: i64) -> Task {
        Task {
            id: id.into(),
            spiffe_id: spiffe_id.into(),
            attestor: "unix".into(),
            claims: serde_json::Map::new(),
            labels: [("env".to_owned(), "test".to_owned())].into(),
            source_ip: Some("10.1.2.3".into()),
            evidence_age_secs: 5,
            created_at: 100,
            deadline,
            heartbeat_secs: 10,
            grace_secs: 30,
            due_at,
            state: TaskState::Active,
            ended_at: None,
            reason: None,
        }
    }

    pub fn lease(id: &str, task: Option<&str>, serial: Option<&str>, expires_at: i64) -> Lease {
        Lease {
            id: id.into(),
            task_id: task.map(Into::into),
            kind: if serial.is_some() {
                LeaseKind::X509
            } else {
                LeaseKind::Jwt
            },
            serial: serial.map(Into::into),
            spiffe_id: "spiffe://e.org/a".into(),
            audience: if serial.is_some() {
                vec![]
            } else {
                vec!["aud".into()]
            },
            issued_at: 100,
            expires_at,
            revoked: false,
            revoked_at: None,
            reason: None,
        }
    }

    /// Leases racing their task's end: every lease written is in the task's revocation event as
    /// read right when the end commits.
    pub async fn ended_task_covers_racing_leases(store: std::sync::Arc<dyn Store>) {
        for round in 0..10 {
            let id = format!("race{round}");
            store
                .insert_task(task(&id, "spiffe://e.org/r", 1_000, 900))
                .await
                .unwrap();
            let writers: Vec<_> = (0..8)
                .map(|i| {
                    let (st, id) = (store.clone(), id.clone());
                    tokio::spawn(async move {
                        let l = lease(&format!("{id}-{i}"), Some(&id), None, 150);
                        st.insert_lease(l).await.map(|()| format!("{id}-{i}"))
                    })
                })
                .collect();
            tokio::task::yield_now().await;
            let ev = store
                .end_task(&id, TaskState::Ended, "done", 140)
                .await
                .unwrap()
                .unwrap();
            // What relying parties learn of the event: read now, while writers may still be
            // committing. A lease written after this read would have escaped the revocation.
            let mut revoked: Vec<String> = store
                .revoked_leases(&ev)
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.id)
                .collect();
            let mut written = Vec::new();
            for w in writers {
                match w.await.unwrap() {
                    Ok(lease_id) => written.push(lease_id),
                    Err(StoreError::TaskNotActive(t)) => assert_eq!(t, id),
                    Err(e) => panic!("{e}"),
                }
            }
            written.sort();
            revoked.sort();
            assert_eq!(written, revoked, "round {round}");
        }
    }

    /// Tasks, leases and revocations: lifecycle, one-write task revocation, the CRL query,
    /// the event log, listings with filters and paging, restart refresh, pruning.
    pub async fn tasks_and_leases(store: std::sync::Arc<dyn Store>) {
        let s = store.as_ref();
        assert_eq!(s.newest_revocation().await.unwrap(), 0, "no events yet");
        s.insert_task(task("t1", "spiffe://e.org/a", 1_000, 140))
            .await
            .unwrap();
        s.insert_task(task("t2", "spiffe://e.org/a", 1_000, 500))
            .await
            .unwrap();
        s.insert_task(task("t3", "spiffe://e.org/b", 120, 120))
            .await
            .unwrap();
        assert!(matches!(
            s.insert_task(task("t1", "x", 1, 1)).await,
            Err(StoreError::Conflict)
        ));
        let t1 = s.task("t1").await.unwrap().unwrap();
        assert_eq!(
            t1,
            task("t1", "spiffe://e.org/a", 1_000, 140),
            "stored as given"
        );
        assert!(s.task("nope").await.unwrap().is_none());

        // Leases, concurrently through group commit.
        let mut writers = Vec::new();
        for i in 0..50 {
            let st = store.clone();
            writers.push(tokio::spawn(async move {
                st.insert_lease(lease(&format!("l{i:02}"), Some("t1"), None, 900))
                    .await
            }));
        }
        for w in writers {
            w.await.unwrap().unwrap();
        }
        s.insert_lease(lease("x1", Some("t1"), Some("aa01"), 900))
            .await
            .unwrap();
        s.insert_lease(lease("x2", None, Some("aa02"), 900))
            .await
            .unwrap();
        s.insert_lease(lease("x3", None, Some("aa03"), 900))
            .await
            .unwrap();
        s.insert_lease(lease("x5", None, Some("aa05"), 150))
            .await
            .unwrap();
        assert!(
            s.revoke_lease("x5", "compromised", 120)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            s.insert_lease(lease("x4", None, Some("aa01"), 900))
                .await
                .is_err(),
            "serials are unique"
        );
        let by_serial = s.lease("aa01").await.unwrap().unwrap();
        assert_eq!(by_serial.lease.id, "x1");
        assert!(by_serial.active(200));

        // Due tasks and keep-alive.
        let due: Vec<String> = s
            .due_tasks(140, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(due, ["t3", "t1"]);
        assert!(s.keep_alive("t1", 2_000).await.unwrap());
        assert_eq!(
            s.task("t1").await.unwrap().unwrap().due_at,
            1_000,
            "capped at the deadline"
        );

        // Ending a task: one event, its leases inactive, idempotent.
        let ev = s
            .end_task("t1", TaskState::Ended, "done", 200)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (ev.task_id.as_deref(), ev.reason.as_str()),
            (Some("t1"), "done")
        );
        assert!(
            s.end_task("t1", TaskState::Revoked, "again", 201)
                .await
                .unwrap()
                .is_none()
        );
        assert!(!s.keep_alive("t1", 300).await.unwrap());
        assert!(!s.lease("l07").await.unwrap().unwrap().active(200));
        assert_eq!(s.revoked_leases(&ev).await.unwrap().len(), 51);

        // A lease of an ended task is refused, also when it shares a group commit with leases
        // that are written.
        let (late, fine) = tokio::join!(
            store.insert_lease(lease("late", Some("t1"), None, 900)),
            store.insert_lease(lease("fine", Some("t2"), None, 150)),
        );
        assert!(
            matches!(&late, Err(StoreError::TaskNotActive(t)) if t == "t1"),
            "{late:?}"
        );
        fine.unwrap();
        assert!(s.lease("late").await.unwrap().is_none(), "nothing written");
        assert_eq!(s.revoked_leases(&ev).await.unwrap().len(), 51);

        // Revoking a single lease.
        let ev2 = s.revoke_lease("x2", "admin", 210).await.unwrap().unwrap();
        let x5_seq = s.revocations_after(0, 10).await.unwrap()[0].seq;
        assert!(ev2.seq > ev.seq);
        assert!(s.revoke_lease("x2", "admin", 211).await.unwrap().is_none());
        // Expansions carry each lease whole (audience, serial, revocation), in id order.
        assert_eq!(
            *s.revoked_leases(&ev2).await.unwrap(),
            [s.lease("x2").await.unwrap().unwrap().lease]
        );
        let expanded = s.revoked_leases(&ev).await.unwrap();
        assert!(expanded.windows(2).all(|w| w[0].id < w[1].id));
        for l in &expanded {
            assert_eq!(*l, s.lease(&l.id).await.unwrap().unwrap().lease);
        }

        // The CRL query: task-ended and revoked X.509 leases until their expiry (x5 expired).
        let serials: Vec<String> = s
            .revoked_serials(210)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.serial)
            .collect();
        assert_eq!(serials, ["aa01", "aa02"]);
        assert!(s.revoked_serials(901).await.unwrap().is_empty());

        // The event log, in order, after a cursor.
        let all = s.revocations_after(0, 10).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [x5_seq, ev.seq, ev2.seq]
        );
        assert_eq!(s.revocations_after(ev.seq, 10).await.unwrap().len(), 1);
        assert!(x5_seq < ev.seq);
        assert_eq!(s.newest_revocation().await.unwrap(), ev2.seq);

        // Listings.
        let f =
            |spiffe: Option<&str>, active: Option<bool>, after: Option<&str>, limit| ListFilter {
                task_id: None,
                spiffe_id: spiffe.map(Into::into),
                active,
                after: after.map(Into::into),
                limit,
            };
        let ids = |v: Vec<Task>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.list_tasks(f(None, None, None, 10), 200).await.unwrap()),
            ["t1", "t2", "t3"]
        );
        assert_eq!(
            ids(s
                .list_tasks(f(Some("spiffe://e.org/a"), Some(true), None, 10), 200)
                .await
                .unwrap()),
            ["t2"]
        );
        assert_eq!(
            ids(s
                .list_tasks(f(None, None, Some("t1"), 1), 200)
                .await
                .unwrap()),
            ["t2"]
        );
        let leases = s
            .list_leases(
                ListFilter {
                    task_id: Some("t1".into()),
                    limit: 100,
                    ..ListFilter::default()
                },
                200,
            )
            .await
            .unwrap();
        assert_eq!(leases.len(), 51);
        let active = s
            .list_leases(f(None, Some(true), None, 100), 200)
            .await
            .unwrap();
        assert_eq!(
            active
                .iter()
                .map(|l| l.lease.id.as_str())
                .collect::<Vec<_>>(),
            ["x3"]
        );
        assert_eq!(ids(s.active_tasks(None, 10).await.unwrap()), ["t2", "t3"]);
        assert_eq!(
            ids(s.active_tasks(Some("t2".into()), 10).await.unwrap()),
            ["t3"]
        );

        // Counts for metrics: t2 and t3 active; x3 the only honoured lease.
        assert_eq!(s.counts(200).await.unwrap(), (2, 1));
        // Quota counts: a/t2 is active (t1 ended); b/t3 active.
        assert_eq!(s.count_active_tasks("spiffe://e.org/a").await.unwrap(), 1);
        assert_eq!(
            s.count_active_tasks("spiffe://e.org/nobody").await.unwrap(),
            0
        );
        assert_eq!(s.count_task_leases("t-none").await.unwrap(), 0);
        let in_t1 = s
            .list_leases(
                ListFilter {
                    task_id: Some("t1".into()),
                    limit: 1000,
                    ..ListFilter::default()
                },
                200,
            )
            .await
            .unwrap()
            .len() as u64;
        assert!(in_t1 > 0);
        assert_eq!(s.count_task_leases("t1").await.unwrap(), in_t1);

        // Restart: live tasks get a fresh grace, capped at their deadline.
        assert_eq!(s.refresh_active_tasks(300).await.unwrap(), 2);
        assert_eq!(s.task("t2").await.unwrap().unwrap().due_at, 340);
        assert_eq!(s.task("t3").await.unwrap().unwrap().due_at, 120);

        // Pruning: expired leases, ended tasks without leases, old events.
        assert!(s.prune(950).await.unwrap() > 0);
        assert!(s.lease("x1").await.unwrap().is_none());
        assert!(s.task("t1").await.unwrap().is_none());
        assert!(
            s.task("t2").await.unwrap().is_some(),
            "active tasks are never pruned"
        );
        assert!(s.revocations_after(0, 10).await.unwrap().is_empty());

        // Expansions survive text that needs escaping on its way through the database's JSON.
        let mut odd = lease("q\"1", Some("t2"), None, 900);
        odd.audience = vec!["a\"b\\c".into(), "ünï\u{1}\n".into()];
        store.insert_lease(odd).await.unwrap();
        let ev3 = s
            .revoke_lease("q\"1", "said \"stop\"\t", 960)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            *s.revoked_leases(&ev3).await.unwrap(),
            [s.lease("q\"1").await.unwrap().unwrap().lease]
        );
    }

    /// Join tokens: stored by hash, single use, expiry honoured, concurrent use has one winner.
    pub async fn join_tokens(store: std::sync::Arc<dyn Store>) {
        store.ping().await.unwrap();
        store.create_join_token(token(1, 2_000)).await.unwrap();
        assert!(matches!(
            store.create_join_token(token(1, 2_000)).await,
            Err(StoreError::Conflict)
        ));
        let got = store.join_token([1; 32]).await.unwrap().unwrap();
        assert_eq!(got.name, "build-box");
        assert_eq!(got.claims["rack"], "r7");
        assert_eq!(got.used_at, None);
        assert!(store.join_token([9; 32]).await.unwrap().is_none());

        // Expired tokens cannot be consumed.
        assert!(!store.consume_join_token([1; 32], 2_000).await.unwrap());
        // Concurrent use: exactly one winner.
        let mut handles = Vec::new();
        for _ in 0..8 {
            let s = store.clone();
            handles.push(tokio::spawn(async move {
                s.consume_join_token([1; 32], 1_500).await.unwrap()
            }));
        }
        let mut wins = 0;
        for h in handles {
            if h.await.unwrap() {
                wins += 1;
            }
        }
        assert_eq!(wins, 1);
        assert_eq!(
            store.join_token([1; 32]).await.unwrap().unwrap().used_at,
            Some(1_500)
        );
        assert!(!store.consume_join_token([9; 32], 1_500).await.unwrap());
    }
}
